"""Benchmarks that print figures (never timed tests): stage one's throughput, stage two's reuse.

``bench_extract`` runs the real extraction on a scene (a synthetic one by default) and reports

* ``patches_per_s`` — whole pipeline: noising, truncated forward, stitching, compressed writes;
* ``gflops`` — achieved GFLOP/s of the truncated forward alone (FLOPs counted by
  ``torch.utils.flop_counter``), ``matmul_gflops`` — a large matmul in the same process, device
  and dtype, and ``ratio_to_matmul`` between them;
* ``write_mb_per_s`` — uncompressed feature bytes the cache writer absorbs per second;
* ``cache_to_raw`` — cache bytes on disk ÷ the same features as raw fp32;
* ``naive_speedup`` — seconds per patch of the naive approach (fp32, one patch at a time, full
  forward, every overlapping patch's full feature maps kept as fp32), measured in the same run on
  the first ``naive_patches`` windows, ÷ our seconds per patch.
"""

from __future__ import annotations

import itertools
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline.autotune import choose_cpu_dtype, time_call
from pipeline.backbone import Backbone, load_backbone, noised, seeded_noise
from pipeline.errors import ConfigError

__all__ = [
    "EXTRACT_KEYS",
    "HEADS_KEYS",
    "bench_extract",
    "bench_heads",
    "default_site",
    "extraction_seconds",
    "matmul_gflops",
]

EXTRACT_KEYS = (
    "patches_per_s",
    "gflops",
    "matmul_gflops",
    "ratio_to_matmul",
    "write_mb_per_s",
    "cache_to_raw",
    "naive_speedup",
)


def matmul_gflops(dtype: torch.dtype, device: torch.device) -> float:
    """GFLOP/s of a square matmul large enough to reach the device's practical peak."""
    n = 8192 if device.type == "cuda" else 2048
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    seconds = time_call(lambda: a @ b, repeats=5, warmup=2)
    return 2 * n**3 / seconds / 1e9


def forward_flops(bb: Backbone, x: torch.Tensor, timestep: int, sites: Sequence[str],
                  labels: torch.Tensor | None, truncate: bool) -> int:  # fmt: skip
    """FLOPs of one (truncated) forward of the batch ``x``."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        bb.features(x, timestep, list(sites), class_labels=labels, truncate=truncate)
    return int(counter.get_total_flops())


def default_site(bb: Backbone) -> str:
    """The paper's *block 10* (``up2.attn2``) where the backbone has it, else its last site."""
    names = [s.name for s in bb.sites]
    return "up2.attn2" if "up2.attn2" in names else names[-1]


def bench_extract(
    backbone: str,
    *,
    scene: str | Path | None = None,
    sites: Sequence[str] | None = None,
    timesteps: Sequence[int] = (0,),
    dtype: str = "auto",
    device: str = "auto",
    batch_size: int = 16,
    stride: int | None = None,
    naive_patches: int = 4,
    progress: Callable[[int, int], None] | None = None,
) -> dict[str, Any]:
    """Measure stage one for one backbone / scene / dtype (see the module docstring).

    Returns:
        The :data:`EXTRACT_KEYS` figures plus a ``details`` mapping (device, dtype, patches,
        FLOPs per patch, seconds, the naive figures and the CPU dtype measurement).
    """
    from pipeline.cache import cache_info
    from pipeline.extract import TileLayout, extract_features, patch_class_labels, resolve_device
    from pipeline.extract import resolve_dtype as _resolve
    from pipeline.prepare import prepare
    from pipeline.scene import open_scene

    if naive_patches < 1:
        raise ConfigError(f"`--naive-patches` must be at least 1, got {naive_patches}")
    dev = resolve_device(device)
    bb = load_backbone(backbone, device=dev)
    names = list(sites) if sites else [default_site(bb)]
    for name in names:
        bb.site(name)
    patch = bb.sample_size
    stride = stride or patch // 2
    with tempfile.TemporaryDirectory(prefix="hsicache-bench-") as tmp:
        work = Path(tmp)
        if scene is None:
            scene = work / "scene.zarr"
            prepare(out=scene, builtin="synthetic", per_class=5, seed=0)
        sc = open_scene(scene)
        layout = TileLayout(height=sc.shape[0], width=sc.shape[1], patch=patch, stride=stride,
                            chunk_tiles=1)  # fmt: skip
        padded = layout.model_input(sc.rgb)
        eps = seeded_noise((3, patch, patch), 0).to(dev)
        tiles = layout.all_tiles
        t0 = int(timesteps[0])

        def batch_of(sel: list[tuple[int, int]]) -> tuple[torch.Tensor, torch.Tensor | None]:
            x = noised(layout.batch(padded, sel).to(dev), eps, t0, bb.scheduler)
            return x, patch_class_labels(bb, sel, 0, device=dev)

        naive = _naive(bb, layout, tiles[:naive_patches], batch_of, t0, names, work)

        report: dict[str, Any] = {}
        if dtype == "auto" and dev.type == "cpu":
            x, labels = batch_of(tiles[:2])
            dt, report = choose_cpu_dtype(bb, x, t0, names, labels)
        else:
            dt = _resolve(dtype, dev)
        bb.cast(dt)

        stats: dict[str, Any] = {}
        started = time.perf_counter()
        out = extract_features(scene=scene, backbone=bb, timesteps=timesteps, sites=names,
                               out=work / "features.zarr", stride=stride, batch_size=batch_size,
                               progress=progress, stats=stats)  # fmt: skip
        wall = time.perf_counter() - started
        patches = stats["patches"]
        cache_to_raw = cache_info(out)["cache_to_raw"]

        x, labels = batch_of(tiles[: min(batch_size, len(tiles))])
        x = x.to(dt)
        flops = forward_flops(bb, x, t0, names, labels, truncate=True)
        fwd_s = time_call(lambda: bb.features(x, t0, names, class_labels=labels), repeats=3)
    gflops = flops / fwd_s / 1e9
    mm = matmul_gflops(dt, dev)
    ours_s = wall / patches
    figures = {
        "patches_per_s": patches / wall,
        "gflops": gflops,
        "matmul_gflops": mm,
        "ratio_to_matmul": gflops / mm,
        "write_mb_per_s": stats["written_bytes"] / max(stats["write_s"], 1e-9) / 1e6,
        "cache_to_raw": cache_to_raw,
        "naive_speedup": naive["s_per_patch"] / ours_s,
    }
    figures["details"] = {
        "backbone": backbone,
        "device": str(dev),
        "dtype": str(dt).replace("torch.", ""),
        "sites": names,
        "timesteps": [int(t) for t in timesteps],
        "scene_shape": list(sc.shape),
        "patches": patches,
        "batch_size": batch_size,
        "gflop_per_patch_truncated": flops / x.shape[0] / 1e9,
        "seconds": wall,
        "naive": naive,
        "cpu_dtype_measurement": report,
    }
    return figures


def _naive(
    bb: Backbone,
    layout: Any,
    tiles: list[tuple[int, int]],
    batch_of: Callable[[list[tuple[int, int]]], tuple[torch.Tensor, torch.Tensor | None]],
    timestep: int,
    names: list[str],
    work: Path,
) -> dict[str, Any]:
    """fp32, one patch per forward, full forward, every patch's full feature maps kept (fp32)."""
    channels = sum(bb.site(n).channels for n in names)
    patch = layout.patch
    kept = np.lib.format.open_memmap(
        work / "naive.npy", mode="w+", dtype=np.float32,
        shape=(len(tiles), patch, patch, channels),
    )  # fmt: skip
    was = bb.dtype
    bb.cast(torch.float32)

    def one(k: int, tile: tuple[int, int]) -> None:
        x, labels = batch_of([tile])
        feats = bb.features(x, timestep, names, class_labels=labels, truncate=False)
        maps = [
            torch.nn.functional.interpolate(feats[n].float(), size=(patch, patch), mode="bilinear")
            for n in names
        ]
        kept[k] = torch.cat(maps, dim=1)[0].permute(1, 2, 0).cpu().numpy()

    one(0, tiles[0])  # warm-up
    started = time.perf_counter()
    for k, tile in enumerate(tiles):
        one(k, tile)
    kept.flush()
    seconds = time.perf_counter() - started
    bb.cast(was)
    return {
        "patches": len(tiles),
        "s_per_patch": seconds / len(tiles),
        "bytes_per_patch": int(kept[0].nbytes),
    }


HEADS_KEYS = ("train_s", "evaluate_s", "predict_s", "reuse_ratio", "read_amplification")
DEFAULT_BENCH_HEADS: dict[str, dict[str, Any]] = {
    "film": {},
    "concat": {},
    "spatial": {},
    "spectral": {},
    "svm": {"use": "spectral"},
    "xgboost": {"use": "both"},
}


def extraction_seconds(
    cache: Any,
    scene: str | Path,
    timesteps: Sequence[int],
    sites: Sequence[str],
    *,
    run: bool = True,
    batch_size: int = 16,
) -> float | None:
    """Seconds stage one takes to re-extract these features with the cache's backbone.

    Both ways time loading the backbone named in the cache's provenance. ``run=True``: then
    stage one itself, :func:`~pipeline.extract.extract_features` over the whole scene into a
    temporary store, with the cache's parameters restricted to these timesteps and sites.
    ``run=False``: an estimate for scenes where that takes too long, one batch of real
    patches per timestep scaled to all patches (rendering and cache writes left out, so it
    errs low). ``None`` when the backbone cannot be loaded here.
    """
    from pipeline.errors import HsicacheError
    from pipeline.extract import (
        TileLayout,
        extract_features,
        patch_class_labels,
        resolve_device,
        resolve_dtype,
    )
    from pipeline.scene import open_scene

    ident = cache.attrs["identity"]
    dev = resolve_device("auto")
    started = time.perf_counter()
    try:
        bb = load_backbone(ident["backbone"], device=dev)
    except (HsicacheError, OSError):
        return None
    bb.cast(getattr(torch, ident.get("compute_dtype") or "float32")
            if dev.type == "cpu" else resolve_dtype("auto", dev))  # fmt: skip
    load_s = time.perf_counter() - started
    if run:
        with tempfile.TemporaryDirectory(prefix="hsicache-bench-extract-") as tmp:
            started = time.perf_counter()
            extract_features(scene=scene, backbone=bb, timesteps=list(timesteps),
                             sites=list(sites), out=Path(tmp) / "features.zarr",
                             patch=ident["patch"], stride=ident["stride"], batch_size=batch_size,
                             noise_seed=ident["noise_seed"], class_seed=ident["class_seed"],
                             class_label=ident["class_label"])  # fmt: skip
            return load_s + time.perf_counter() - started
    sc = open_scene(scene)
    layout = TileLayout(height=sc.shape[0], width=sc.shape[1], patch=ident["patch"],
                        stride=ident["stride"], chunk_tiles=1)  # fmt: skip
    tiles = layout.all_tiles
    sel = tiles[: min(batch_size, len(tiles))]
    x0 = layout.batch(layout.model_input(sc.rgb), sel).to(dev)
    eps = seeded_noise((3, layout.patch, layout.patch), ident["noise_seed"]).to(dev)
    labels = patch_class_labels(bb, sel, ident["class_seed"], ident["class_label"], device=dev)
    per_batch = 0.0
    for t in timesteps:
        x = noised(x0, eps, int(t), bb.scheduler).to(bb.dtype)

        def forward(x: torch.Tensor = x, t: int = int(t)) -> Any:
            return bb.features(x, t, list(sites), class_labels=labels)

        per_batch += time_call(forward, repeats=1)
    return load_s + per_batch * len(tiles) / len(sel)


def bench_heads(
    *,
    scene: str | Path,
    features: str | Path,
    heads: dict[str, dict[str, Any]] | None = None,
    repeats: int = 5,
    run_extraction: bool = True,
    progress: Callable[[int, int], None] | None = None,
) -> dict[str, dict[str, Any]]:
    """Train, evaluate and predict each head against an existing cache and time it.

    Every head first runs once untimed (the process's one-off costs: imports, kernel set-up),
    then stage one is timed once per feature selection, then each head runs ``repeats`` times
    from a cold :data:`~pipeline.storage.memory_cache`; each step's median counts.

    Per head: ``train_s``, ``evaluate_s``, ``predict_s``; ``reuse_ratio`` = seconds to
    re-extract the features the head reads with the cache's backbone (stage one run for real,
    or estimated with ``run_extraction=False``: see :func:`extraction_seconds`) ÷ the head's
    three steps (``None`` for spectral-only heads or when the backbone is not available here);
    ``read_amplification`` = bytes fetched from the cache (compressed chunks, all three steps,
    cold) ÷ bytes of the features the head actually needs (float16, every pixel it touches).
    """
    from pipeline.cache import FeatureCache, count_reads
    from pipeline.evaluation import evaluate, predict_map
    from pipeline.scene import open_scene
    from pipeline.storage import memory_cache
    from pipeline.training import train_head

    if repeats < 1:
        raise ConfigError(f"repeats must be at least 1, got {repeats}")
    heads = heads or DEFAULT_BENCH_HEADS
    sc = open_scene(scene)
    cache = FeatureCache.open(features, expect_fingerprint=sc.image_fingerprint)
    results: dict[str, dict[str, Any]] = {}
    extraction: dict[tuple[tuple[int, ...], tuple[str, ...]], float | None] = {}
    h, w = sc.shape
    with tempfile.TemporaryDirectory(prefix="hsicache-bench-heads-") as tmp:
        work = Path(tmp)

        def steps(name: str, params: dict[str, Any]) -> tuple[Any, list[float]]:
            slug = name.replace(".", "_")  # an import path names a head folder too
            times = [time.perf_counter()]
            trained = train_head(scene=scene, cache=features, head=name, out=work / slug,
                                 params=dict(params))  # fmt: skip
            times.append(time.perf_counter())
            evaluate(scene=scene, cache=features, head=work / slug)
            times.append(time.perf_counter())
            predict_map(scene=scene, cache=features, head=work / slug, out=work / f"{slug}.npy")
            times.append(time.perf_counter())
            return trained, [b - a for a, b in itertools.pairwise(times)]

        selections = {}  # untimed first runs: each head's one-off costs, and what it reads
        for name, params in heads.items():
            selections[name] = steps(name, params)[0].selection
        for sel in selections.values():  # stage one, before the timed runs, for all of them alike
            key = (sel.timesteps, sel.sites)
            if sel.spatial and key not in extraction:
                extraction[key] = extraction_seconds(cache, scene, *key, run=run_extraction)
        for k, (name, params) in enumerate(heads.items()):
            runs, reads = [], []
            for _ in range(repeats):
                memory_cache.clear()  # every run starts cold: its own reads are counted
                with count_reads() as read:
                    seconds = steps(name, params)[1]
                runs.append(seconds)
                reads.append(read[0])
            train_s, evaluate_s, predict_s = np.median(np.asarray(runs), axis=0).tolist()
            sel = selections[name]
            key = (sel.timesteps, sel.sites)
            total = train_s + evaluate_s + predict_s
            reuse = amplification = None
            if sel.spatial:
                if extraction[key] is not None:
                    reuse = extraction[key] / total
                needed = h * w * cache.channels(sel.timesteps, sel.sites) * 2
                amplification = max(reads) / needed
            results[name] = {
                "train_s": train_s,
                "evaluate_s": evaluate_s,
                "predict_s": predict_s,
                "reuse_ratio": reuse,
                "read_amplification": amplification,
                "extract_s": extraction.get(key) if sel.spatial else None,
                "bytes_read": max(reads),
            }
            if progress:
                progress(k + 1, len(heads))
    return results
