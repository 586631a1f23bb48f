"""``dtype=auto`` on a CPU: fp32, or bf16 where the CPU computes it natively and it is faster.

A CPU without native bfloat16 (no AVX-512 BF16, no AMX: every AVX2-only laptop) runs torch's
bf16 kernels as emulation, many times slower than fp32, so there ``auto`` is fp32 at once, with
no trial (:func:`pipeline.devices.cpu_capability` asks torch, which costs nothing). Where bf16
is native, one real patch is timed in fp32 (after one warm-up forward) and then in bf16, and the
bf16 forward is abandoned the moment it takes longer than fp32 already did; bf16 is kept only
when it is at least 10 % faster *and* its features stay within :data:`BF16_TOLERANCE` (relative
L2) of fp32. The decision is remembered per machine, torch version, backbone and sites in
``$XDG_CACHE_HOME/hsicache/autotune.json`` so it is measured once.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import os
import platform
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

from pipeline.backbone import Backbone
from pipeline.devices import cpu_capability

__all__ = ["BF16_TOLERANCE", "choose_cpu_dtype", "provenance_of", "time_call"]

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


class _Abandoned(Exception):
    """Raised inside a forward pass that has run past its deadline."""


@contextlib.contextmanager
def _deadline(module: torch.nn.Module, seconds: float) -> Iterator[None]:
    """Abort any forward of ``module`` (at its next sub-module) once ``seconds`` have passed."""
    stop = time.perf_counter() + seconds

    def check(_m: torch.nn.Module, _inputs: object) -> None:
        if time.perf_counter() > stop:
            raise _Abandoned

    handles = [m.register_forward_pre_hook(check) for m in module.modules()]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def _timed(
    run: Callable[[], Any], module: torch.nn.Module, limit: float | None
) -> tuple[float | None, Any]:
    """``(seconds, result)`` of ``run()``; ``(None, None)`` when it was abandoned after
    ``limit`` seconds."""
    guard = _deadline(module, limit) if limit is not None else contextlib.nullcontext()
    start = time.perf_counter()
    try:
        with guard:
            result = run()
    except _Abandoned:
        return None, None
    return time.perf_counter() - start, result


def _cache_file() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "hsicache" / "autotune.json"


def _key(bb: Backbone, sites: Sequence[str]) -> str:
    cpu = platform.processor() or platform.machine()
    return "|".join(
        [cpu, cpu_capability()["kernels"], torch.__version__, str(torch.get_num_threads()),
         bb.weights_sha256[:16], ",".join(sites), "1-patch"]
    )  # fmt: skip


def choose_cpu_dtype(
    bb: Backbone,
    x: torch.Tensor,
    timestep: int,
    sites: Sequence[str],
    class_labels: torch.Tensor | None,
    *,
    remember: bool = True,
    capability: dict[str, Any] | None = None,
) -> tuple[torch.dtype, dict[str, Any]]:
    """fp32 or bf16 for ``bb`` on this CPU (see the module docstring).

    Args:
        bb: an fp32 backbone on the CPU (left in fp32).
        x: real, noised patches; only the first is run.
        timestep, sites, class_labels: as for :meth:`Backbone.features`.
        remember: read/write the per-machine decision file.
        capability: the CPU's capability (default: :func:`~pipeline.devices.cpu_capability`).

    Returns:
        ``(dtype, report)``: ``choice``, ``reason``, the CPU ``capability`` and
        ``native_bf16``; after a trial also ``fp32_s``, ``bf16_s`` (``None`` when abandoned),
        ``rel_error`` and ``trial_s``, the seconds the whole trial took.
    """
    cap = capability or cpu_capability()
    base = {"capability": cap["kernels"], "native_bf16": bool(cap["native_bf16"])}
    if not cap["native_bf16"]:
        return torch.float32, {**base, "choice": "fp32", "reason": "no native bf16 on this CPU"}
    key = _key(bb, sites)
    store = _cache_file()
    known = _read_known(store) if remember else {}
    if key in known:
        return _dtype(known[key]["choice"]), {**known[key], **base, "cached": True}
    report = {**base, **_trial(bb, x[:1], timestep, sites, class_labels[:1]
                               if class_labels is not None else None)}  # fmt: skip
    if remember:
        with contextlib.suppress(OSError):  # a read-only home only costs a new trial next time
            store.parent.mkdir(parents=True, exist_ok=True)
            store.write_text(json.dumps({**known, key: report}, indent=1))
    return _dtype(report["choice"]), report


def _trial(
    bb: Backbone,
    x: torch.Tensor,
    timestep: int,
    sites: Sequence[str],
    class_labels: torch.Tensor | None,
) -> dict[str, Any]:
    """One patch in fp32 (warm-up + timed), then in bf16 under fp32's time as a deadline."""
    started = time.perf_counter()

    def runner(model: Backbone) -> Callable[[], dict[str, torch.Tensor]]:
        return lambda: model.features(
            x.to(model.dtype), timestep, list(sites), class_labels=class_labels
        )

    warm32, _ = _timed(runner(bb), bb.unet, None)
    fp32_s, ref = _timed(runner(bb), bb.unet, None)
    low = _bf16_copy(bb)
    bf16_s = out = None
    # the warm-up may pay one-off set-up costs, as fp32's did; the timed run may not
    warm16, _ = _timed(runner(low), low.unet, 3 * max(warm32 or 0.0, fp32_s or 0.0))
    if warm16 is not None:
        bf16_s, out = _timed(runner(low), low.unet, (fp32_s or 0.0) / _MIN_GAIN)
    report: dict[str, Any] = {"fp32_s": fp32_s, "bf16_s": bf16_s, "rel_error": None}
    if bf16_s is None:
        report.update(choice="fp32", reason="measured: bf16 not faster than fp32")
    else:
        rel = max(
            float((out[s].float() - ref[s]).norm() / ref[s].norm().clamp_min(1e-12)) for s in sites
        )
        report["rel_error"] = rel
        if rel > BF16_TOLERANCE:
            report.update(choice="fp32", reason="measured: bf16 features differ from fp32")
        else:
            report.update(choice="bf16", reason="measured: bf16 faster with the same features")
    del low
    report["trial_s"] = time.perf_counter() - started
    return report


def _read_known(store: Path) -> dict[str, Any]:
    try:
        return dict(json.loads(store.read_text())) if store.is_file() else {}
    except (OSError, ValueError, TypeError):
        return {}


def _dtype(choice: str) -> torch.dtype:
    return torch.bfloat16 if choice == "bf16" else torch.float32


def provenance_of(report: dict[str, Any]) -> dict[str, Any]:
    """The part of a dtype report a cache records: the decision, its reason and the CPU, never
    timings (two identical extractions must write identical metadata)."""
    keep = ("choice", "reason", "capability", "native_bf16", "resumed")
    return {k: report[k] for k in keep if k in report}
