"""``dtype=auto`` on a CPU: fp32, or bf16 where the CPU computes it natively and it is faster.

A CPU without native bfloat16 (no AVX-512 BF16, no AMX: every AVX2-only laptop) runs torch's
bf16 kernels as emulation, many times slower than fp32, so there ``auto`` is fp32 at once, with
no trial (:func:`pipeline.utils.devices.cpu_capability` asks torch, which costs nothing). Where bf16
is native, one real patch (at half its side) is timed in fp32 and then in bf16, and the bf16
forward is abandoned the moment it takes longer than fp32 already did; bf16 is kept only when
it is at least 10 % faster *and* its features stay within :data:`BF16_TOLERANCE` (relative L2)
of fp32. The decision is remembered per machine, torch version, backbone and sites in
``$XDG_CACHE_HOME/hsicache/autotune.json`` so it is measured once.
"""

from __future__ import annotations

import contextlib
import contextvars
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

from pipeline.backbone.loading import Backbone
from pipeline.utils.devices import cpu_capability

__all__ = [
    "BF16_TOLERANCE",
    "choose_cpu_dtype",
    "provenance_of",
    "time_call",
    "without_memory",
]

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


_FORGETFUL: contextvars.ContextVar[bool] = contextvars.ContextVar("hsicache_fresh", default=False)


@contextlib.contextmanager
def without_memory() -> Iterator[None]:
    """Inside, :func:`choose_cpu_dtype` neither reads nor writes remembered decisions (what
    ``bench extract`` uses to time a first run on a new machine)."""
    token = _FORGETFUL.set(True)
    try:
        yield
    finally:
        _FORGETFUL.reset(token)


def _cache_file() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "hsicache" / "autotune.json"


def _key(bb: Backbone, sites: Sequence[str]) -> str:
    cpu = platform.processor() or platform.machine()
    return "|".join(
        [
            cpu,
            cpu_capability()["kernels"],
            torch.__version__,
            str(torch.get_num_threads()),
            bb.weights_sha256[:16],
            ",".join(sites),
            "1-patch",
        ]
    )


def choose_cpu_dtype(
    bb: Backbone,
    x: torch.Tensor,
    timestep: int,
    sites: Sequence[str],
    class_labels: torch.Tensor | None,
    *,
    remember: bool = True,
    capability: dict[str, Any] | None = None,
    reload: Callable[[], Backbone] | None = None,
) -> tuple[torch.dtype, dict[str, Any]]:
    """fp32 or bf16 for ``bb`` on this CPU (see the module docstring).

    Args:
        bb: an fp32 backbone on the CPU.
        x: real, noised patches; only the first is run, at half its side where the UNet
            allows (one patch's forward is bound by reading the weights, so the dtypes compare
            as at full size, in about half the time).
        timestep, sites, class_labels: as for :meth:`Backbone.features`.
        remember: read/write the per-machine decision file.
        capability: the CPU's capability (default: :func:`~pipeline.utils.devices.cpu_capability`).
        reload: a way to load ``bb`` again. Given, the trial casts ``bb`` itself to bf16 (no
            copy of the weights: 2 s less for ADM-64) and ``bb`` ends in the chosen dtype, its
            exact fp32 weights loaded again when fp32 wins. Without it ``bb`` stays as it was
            and the trial runs a bf16 copy.

    Returns:
        ``(dtype, report)``: ``choice``, ``reason``, the CPU ``capability`` and
        ``native_bf16``; after a trial also ``fp32_s``, ``bf16_s`` (``None`` when abandoned),
        ``rel_error`` and ``trial_s``, the seconds the whole trial took.
    """
    cap = capability or cpu_capability()
    base = {"capability": cap["kernels"], "native_bf16": bool(cap["native_bf16"])}
    if not cap["native_bf16"]:
        return torch.float32, {**base, "choice": "fp32", "reason": "no native bf16 on this CPU"}
    remember = remember and not _FORGETFUL.get()
    key = _key(bb, sites)
    store = _cache_file()
    known = _read_known(store) if remember else {}
    if key in known:
        return _dtype(known[key]["choice"]), {**known[key], **base, "cached": True}
    labels = class_labels[:1] if class_labels is not None else None
    report = {**base, **_trial(bb, _trial_input(bb, x[:1]), timestep, sites, labels, reload)}
    if remember:
        with contextlib.suppress(OSError):  # a read-only home only costs a new trial next time
            store.parent.mkdir(parents=True, exist_ok=True)
            store.write_text(json.dumps({**known, key: report}, indent=1))
    return _dtype(report["choice"]), report


def _trial_input(bb: Backbone, x: torch.Tensor) -> torch.Tensor:
    """The patch at half its side (area average) when the UNet's levels allow it."""
    side = x.shape[-1] // 2
    if side % 2 ** (len(bb.unet.config.block_out_channels) - 1) or side < 8:
        return x
    return torch.nn.functional.avg_pool2d(x, 2)


def _trial(
    bb: Backbone,
    x: torch.Tensor,
    timestep: int,
    sites: Sequence[str],
    class_labels: torch.Tensor | None,
    reload: Callable[[], Backbone] | None,
) -> dict[str, Any]:
    """One patch in fp32, then in bf16 with fp32's time as its deadline."""
    started = time.perf_counter()

    def runner(model: Backbone) -> Callable[[], dict[str, torch.Tensor]]:
        return lambda: model.features(
            x.to(model.dtype), timestep, list(sites), class_labels=class_labels
        )

    fp32_s, ref = _timed(runner(bb), bb.unet, None)
    low = bb.cast(torch.bfloat16) if reload is not None else _bf16_copy(bb)
    try:
        bf16_s, out = _timed(runner(low), low.unet, fp32_s)
    except Exception:  # an op without a bf16 kernel here: fp32 it is
        bf16_s, out = None, None
    if bf16_s is not None and bf16_s * _MIN_GAIN > (fp32_s or 0.0):
        bf16_s = None  # finished, but not faster by enough to be worth it
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
    if reload is not None and report["choice"] == "fp32":
        bb.unet = reload().unet  # the exact fp32 weights again (a cast back would round them)
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
