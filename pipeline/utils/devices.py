"""Devices and compute dtypes: what ``auto`` means, what this machine's CPU can do.

``resolve_device`` and ``resolve_dtype`` turn the ``device``/``dtype`` words into torch
objects and refuse a device that is not there (a CUDA device on a CPU build of torch...) before
any work. :func:`cpu_capability` says whether the CPU computes bfloat16 natively (AVX-512 BF16 or
AMX): without it torch emulates bf16 in fp32 instructions, many times slower than fp32 itself,
so ``dtype=auto`` never even tries it there (:mod:`pipeline.backbone.autotune`).
"""

from __future__ import annotations

import functools
import os
from typing import Any

import torch

from pipeline.errors import ConfigError

__all__ = ["DTYPES", "cpu_capability", "resolve_device", "resolve_dtype", "usable_cores"]


def usable_cores() -> int:
    """The cores this process may run on (its CPU affinity where the OS has one)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return cores or 1


DTYPES: dict[str, torch.dtype] = {
    "fp32": torch.float32,
    "float32": torch.float32,
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
    "fp16": torch.float16,
    "float16": torch.float16,
}


def resolve_device(device: str, *, option: str = "device") -> torch.device:
    """``auto`` → cuda, then mps, then cpu; anything else as given, if this machine has it.

    Raises:
        ConfigError: an unknown device name, or one torch cannot use here.
    """
    if device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if _mps_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise ConfigError(
            f"unknown `{option}={device}`: use auto, cpu, cuda, cuda:N or mps"
        ) from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            why = "a CPU-only build" if torch.version.cuda is None else "a CUDA build seeing no GPU"
            raise ConfigError(
                f"`{option}={device}`: torch {torch.__version__} here is {why}; use "
                f"`{option}=cpu` or `{option}=auto`"
            )
        count = torch.cuda.device_count()
        if dev.index is not None and dev.index >= count:
            raise ConfigError(
                f"`{option}={device}`: this machine has {count} CUDA device(s), 0..{count - 1}"
            )
    elif dev.type == "mps" and not _mps_available():
        raise ConfigError(f"`{option}={device}`: no Apple MPS device here; use cpu or auto")
    elif dev.type not in ("cpu", "cuda", "mps"):
        raise ConfigError(f"`{option}={device}`: hsicache runs on cpu, cuda or mps")
    return dev


def _mps_available() -> bool:
    mps = getattr(torch.backends, "mps", None)
    return bool(mps and mps.is_available())


def resolve_dtype(dtype: str, device: torch.device, *, option: str = "dtype") -> torch.dtype:
    """``auto`` → bf16 on a GPU that has it (else fp16), fp16 on MPS, fp32 on CPU (the CPU's
    measured choice is :func:`pipeline.backbone.autotune.choose_cpu_dtype`'s); else the named
    dtype."""
    if dtype == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        if device.type == "mps":
            return torch.float16
        return torch.float32
    if dtype not in DTYPES:
        raise ConfigError(f"unknown `{option}={dtype}`: use auto, fp32, bf16 or fp16")
    return DTYPES[dtype]


@functools.cache
def cpu_capability() -> dict[str, Any]:
    """What this CPU offers torch, probed once (no computation).

    Returns:
        ``{"kernels": torch's CPU kernel level (AVX2, AVX512, DEFAULT...), "native_bf16":
        whether bf16 runs on hardware here (AVX-512 BF16 or AMX, and torch is allowed to use
        AVX-512 kernels), "features": the probed instruction-set flags}``.
    """
    kernels = str(torch.backends.cpu.get_cpu_capability())
    probes = {
        "avx2": "_is_avx2_supported",
        "avx512": "_is_avx512_supported",
        "avx512_bf16": "_is_avx512_bf16_supported",
        "amx": "_is_amx_tile_supported",
    }
    features = {}
    for name, probe in probes.items():
        fn = getattr(torch.cpu, probe, None)
        try:
            features[name] = bool(fn()) if fn is not None else False
        except Exception:  # an older torch or an unusual platform: unknown means no
            features[name] = False
    native = kernels.upper().startswith("AVX512") and (features["avx512_bf16"] or features["amx"])
    return {"kernels": kernels, "native_bf16": native, "features": features}
