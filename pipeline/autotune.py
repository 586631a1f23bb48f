"""Measured choices for the CPU: fp32 or bf16, whichever is faster within the features' tolerance.

On a GPU bf16/fp16 is always the right call; on a CPU it depends on the instruction set (AVX-512
BF16 / AMX make bf16 fast, plain AVX2 makes it slower than fp32). ``dtype=auto`` on CPU therefore
times one truncated forward of the real first patches in both dtypes and keeps bf16 only when it
is at least 10 % faster *and* its features stay within :data:`BF16_TOLERANCE` (relative L2) of
fp32. The decision is remembered per machine, torch version, backbone and sites in
``$XDG_CACHE_HOME/hsicache/autotune.json`` so it is measured once.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import platform
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from pipeline.backbone import Backbone

__all__ = ["BF16_TOLERANCE", "choose_cpu_dtype", "time_call"]

#: Largest relative L2 error of bf16 features against fp32 that still counts as the same features.
BF16_TOLERANCE = 2e-2
_MIN_GAIN = 1.10


def time_call(fn: Any, repeats: int = 3, warmup: int = 1) -> float:
    """Median wall seconds of ``fn()`` after ``warmup`` calls (CUDA synchronised)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        _sync()
        start = time.perf_counter()
        fn()
        _sync()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _bf16_copy(bb: Backbone) -> Backbone:
    """A bf16 copy of the backbone; the original keeps its exact fp32 weights."""
    low = dataclasses.replace(bb, unet=copy.deepcopy(bb.unet))
    return low.cast(torch.bfloat16)


def _cache_file() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "hsicache" / "autotune.json"


def _key(bb: Backbone, sites: Sequence[str], batch: int) -> str:
    cpu = platform.processor() or platform.machine()
    return "|".join(
        [cpu, torch.__version__, str(torch.get_num_threads()), bb.weights_sha256[:16],
         ",".join(sites), str(batch)]
    )  # fmt: skip


def choose_cpu_dtype(
    bb: Backbone,
    x: torch.Tensor,
    timestep: int,
    sites: Sequence[str],
    class_labels: torch.Tensor | None,
    *,
    remember: bool = True,
) -> tuple[torch.dtype, dict[str, Any]]:
    """Time fp32 against bf16 on ``x`` and return the dtype to use with the measurements.

    Args:
        bb: an fp32 backbone on the CPU (left in fp32).
        x: a small batch of real, noised patches.
        timestep, sites, class_labels: as for :meth:`Backbone.features`.
        remember: read/write the per-machine decision file.

    Returns:
        ``(dtype, report)`` with ``fp32_s``, ``bf16_s``, ``rel_error`` and ``choice``.
    """
    key = _key(bb, sites, x.shape[0])
    store = _cache_file()
    known: dict[str, Any] = {}
    if remember and store.is_file():
        try:
            known = json.loads(store.read_text())
        except (OSError, json.JSONDecodeError):
            known = {}
    if key in known:
        report = dict(known[key], cached=True)
        return (torch.bfloat16 if report["choice"] == "bf16" else torch.float32), report

    def runner(model: Backbone) -> Any:
        return lambda: model.features(
            x.to(model.dtype), timestep, list(sites), class_labels=class_labels
        )

    fp32_s = time_call(runner(bb), repeats=1)
    ref = runner(bb)()
    low_bb = _bf16_copy(bb)
    bf16_s = time_call(runner(low_bb), repeats=1)
    low = runner(low_bb)()
    del low_bb
    rel = max(
        float((low[s].float() - ref[s]).norm() / ref[s].norm().clamp_min(1e-12)) for s in sites
    )
    choice = "bf16" if bf16_s * _MIN_GAIN < fp32_s and rel <= BF16_TOLERANCE else "fp32"
    report = {"fp32_s": fp32_s, "bf16_s": bf16_s, "rel_error": rel, "choice": choice}
    if remember:
        try:
            store.parent.mkdir(parents=True, exist_ok=True)
            store.write_text(json.dumps({**known, key: report}, indent=1))
        except OSError:  # a read-only home only costs a re-measurement next time
            pass
    return (torch.bfloat16 if choice == "bf16" else torch.float32), report
