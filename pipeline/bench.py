"""Benchmarks that print figures (never timed tests): stage one's throughput, stage two's reuse.

``bench_extract`` runs the real extraction on a scene (a synthetic one by default) and reports

* ``patches_per_s`` — whole pipeline: noising, truncated forward, stitching, compressed writes;
* ``first_chunk_s`` — from the start of ``extract`` (backbone load and dtype choice included, as
  on a machine that has not chosen before) to its first written chunk, beside fp32's own
  (``fp32_first_chunk_s``) and their ratio (``first_chunk_ratio``, target <= 1.2);
* ``gflops`` — achieved GFLOP/s of the extraction's truncated forwards (FLOPs of one patch
  counted by ``torch.utils.flop_counter``, times the patches and timesteps, over the seconds the
  forwards and stitching took), ``matmul_gflops`` — a large matmul in the same process, device
  and dtype, and ``ratio_to_matmul`` between them;
* ``write_mb_per_s`` — uncompressed feature bytes the cache writer absorbs per second;
* ``cache_to_raw`` — cache bytes on disk ÷ the same features as raw fp32;
* ``naive_speedup`` — seconds per patch of the naive approach (fp32, one patch at a time, full
  forward, every overlapping patch's full feature maps kept as fp32), measured in the same run on
  the first ``naive_patches`` windows, ÷ our seconds per patch.
"""

from __future__ import annotations

import functools
import gc
import itertools
import math
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline.backbone.autotune import time_call
from pipeline.backbone.loading import Backbone, load_backbone, noised, seeded_noise
from pipeline.errors import ConfigError

__all__ = [
    "CONTEXT_KEYS",
    "EXTRACT_KEYS",
    "HEADS_KEYS",
    "PREPARE_KEYS",
    "PROPAGATE_HEAD",
    "PROPAGATE_KEYS",
    "bench_context",
    "bench_extract",
    "bench_heads",
    "bench_prepare",
    "bench_propagate",
    "default_site",
    "extraction_seconds",
    "matmul_gflops",
]

EXTRACT_KEYS = (
    "patches_per_s",
    "first_chunk_s",
    "fp32_first_chunk_s",
    "first_chunk_ratio",
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


def forward_flops(
    bb: Backbone,
    x: torch.Tensor,
    timestep: int,
    sites: Sequence[str],
    labels: torch.Tensor | None,
    truncate: bool,
) -> int:
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

    The extraction runs twice as ``hsicache extract`` runs it (the backbone loaded from its
    SPEC inside the call): first with ``dtype`` as asked, chosen as on a new machine (no
    remembered decision, so ``first_chunk_s`` includes any dtype trial), then in fp32 for
    reference; the first run also pays any one-off costs, so the ratio errs high.

    Returns:
        The :data:`EXTRACT_KEYS` figures plus a ``details`` mapping (device, CPU capability,
        dtype, patches, FLOPs per patch, seconds, the naive figures and the dtype report).
    """
    from pipeline.backbone.autotune import without_memory
    from pipeline.features.cache import cache_info
    from pipeline.scene.core import open_scene
    from pipeline.utils.checks import check_int
    from pipeline.utils.devices import cpu_capability, resolve_device

    check_int("naive_patches", naive_patches, low=1)
    check_int("batch_size", batch_size, low=1)
    dev = resolve_device(device)
    with tempfile.TemporaryDirectory(prefix="hsicache-bench-") as tmp:
        work = Path(tmp)
        scene = scene if scene is not None else _bench_scene(work / "scene.zarr")
        sc = open_scene(scene)
        # the naive baseline and the FLOPs with a backbone of their own, gone before the timed
        # runs load theirs (a second resident copy made the first timed run 20-40 % slower)
        names, stride, naive, flops_per_patch = _naive_and_flops(
            backbone, dev, sc.rgb, sites, timesteps, stride, naive_patches, work
        )
        gc.collect()
        run = functools.partial(
            _timed_extraction, backbone, scene, timesteps, names, stride, batch_size, device, work
        )
        with without_memory():  # first, so that it pays whatever a first run pays
            stats, out = run(dtype, "features.zarr", progress)
        reference = run("fp32", "fp32.zarr", None)
        dt = getattr(torch, _chosen(stats, dtype, dev))
        cache_to_raw = cache_info(out)["cache_to_raw"]
    figures = _extract_figures(
        stats, reference[0], naive, flops_per_patch * len(timesteps), dt, dev
    )
    figures["cache_to_raw"] = cache_to_raw
    figures["details"] = {
        "backbone": backbone,
        "device": str(dev),
        "cpu_capability": cpu_capability() if dev.type == "cpu" else None,
        "dtype": str(dt).replace("torch.", ""),
        "sites": names,
        "timesteps": [int(t) for t in timesteps],
        "scene_shape": list(sc.shape),
        "patches": stats["patches"],
        "batch_size": batch_size,
        "gflop_per_patch_truncated": flops_per_patch / 1e9,
        "seconds": stats["run_s"],
        "naive": naive,
        "dtype_report": stats["dtype_report"],
    }
    return figures


def _bench_scene(out: Path) -> Path:
    """The built-in synthetic scene, prepared at ``out`` (what ``bench extract`` times by
    default)."""
    from pipeline.scene.preparation import prepare

    prepare(out=out, builtin="synthetic", per_class=5, seed=0)
    return out


def _extract_figures(
    stats: dict[str, Any],
    reference: dict[str, Any],
    naive: dict[str, Any],
    flops_per_patch: float,
    dt: torch.dtype,
    dev: torch.device,
) -> dict[str, Any]:
    """The :data:`EXTRACT_KEYS` figures (all but ``cache_to_raw``) of a timed extraction, its
    fp32 reference and the naive baseline; ``flops_per_patch`` counts every timestep."""
    patches = stats["patches"]
    # all timesteps' forwards and the stitching: what the extraction's forward seconds cover
    gflops = flops_per_patch * patches / stats["forward_s"] / 1e9
    mm = matmul_gflops(dt, dev)
    return {
        "patches_per_s": patches / stats["run_s"],
        "first_chunk_s": stats["first_chunk_s"],
        "fp32_first_chunk_s": reference["first_chunk_s"],
        "first_chunk_ratio": stats["first_chunk_s"] / reference["first_chunk_s"],
        "gflops": gflops,
        "matmul_gflops": mm,
        "ratio_to_matmul": gflops / mm,
        "write_mb_per_s": stats["written_bytes"] / max(stats["write_s"], 1e-9) / 1e6,
        "naive_speedup": naive["s_per_patch"] / (stats["run_s"] / patches),
    }


def _naive_and_flops(
    backbone: str,
    dev: torch.device,
    rgb: np.ndarray,
    sites: Sequence[str] | None,
    timesteps: Sequence[int],
    stride: int | None,
    naive_patches: int,
    work: Path,
) -> tuple[list[str], int, dict[str, Any], int]:
    """``(sites, stride, naive figures, FLOPs of one truncated patch forward)``."""
    from pipeline.backbone.loading import check_timesteps
    from pipeline.features.extract import TileLayout, patch_class_labels

    bb = load_backbone(backbone, device=dev)
    names = list(sites) if sites else [default_site(bb)]
    for name in names:
        bb.site(name)
    check_timesteps(bb, timesteps)
    stride = stride or bb.sample_size // 2
    layout = TileLayout(
        height=rgb.shape[0], width=rgb.shape[1], patch=bb.sample_size, stride=stride, chunk_tiles=1
    )
    padded = layout.model_input(rgb)
    eps = seeded_noise((3, bb.sample_size, bb.sample_size), 0).to(dev)
    tiles = layout.all_tiles
    t0 = int(timesteps[0])

    def batch_of(sel: list[tuple[int, int]]) -> tuple[torch.Tensor, torch.Tensor | None]:
        x = noised(layout.batch(padded, sel).to(dev), eps, t0, bb.scheduler)
        return x, patch_class_labels(bb, sel, 0, device=dev)

    naive = _naive(bb, layout, tiles[:naive_patches], batch_of, t0, names, work)
    x, labels = batch_of(tiles[:1])  # FLOPs grow linearly with the batch: one patch counts
    return names, stride, naive, forward_flops(bb, x, t0, names, labels, truncate=True)


def _timed_extraction(
    backbone: str,
    scene: str | Path,
    timesteps: Sequence[int],
    sites: list[str],
    stride: int,
    batch_size: int,
    device: str,
    work: Path,
    dtype: str,
    name: str,
    progress: Callable[[int, int], None] | None,
) -> tuple[dict[str, Any], Path]:
    """One ``extract`` from the backbone SPEC, as the command runs it; its statistics."""
    from pipeline.features.config import ExtractConfig
    from pipeline.features.extract import extract_features

    stats: dict[str, Any] = {}
    config = ExtractConfig(
        sites=tuple(sites),
        timesteps=tuple(timesteps),
        stride=stride,
        batch_size=batch_size,
        device=device,
        dtype=dtype,
    )
    extract_features(scene, backbone, work / name, config, progress=progress, stats=stats)
    return stats, work / name


def _chosen(stats: dict[str, Any], dtype: str, dev: torch.device) -> str:
    """The torch dtype name an extraction computed in."""
    from pipeline.utils.devices import resolve_dtype

    choice = stats["dtype_report"].get("choice")
    if choice:
        return str(resolve_dtype(choice, dev)).replace("torch.", "")
    return str(resolve_dtype(dtype, dev)).replace("torch.", "")


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
        work / "naive.npy",
        mode="w+",
        dtype=np.float32,
        shape=(len(tiles), patch, patch, channels),
    )
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
    stage one itself, :func:`~pipeline.features.extract.extract_features` over the whole scene
    into a temporary store, with the cache's parameters restricted to these timesteps and sites.
    ``run=False``: an estimate for scenes where that takes too long, one batch of real
    patches per timestep scaled to all patches (rendering and cache writes left out, so it
    errs low). ``None`` when the backbone cannot be loaded here.
    """
    from pipeline.errors import HsicacheError
    from pipeline.features.config import ExtractConfig
    from pipeline.utils.devices import resolve_device, resolve_dtype

    ident = cache.attrs["identity"]
    dev = resolve_device("auto")
    started = time.perf_counter()
    try:
        bb = load_backbone(ident["backbone"], device=dev)
    except (HsicacheError, OSError):
        return None
    computed = ident.get("compute_dtype") or "float32"
    bb.cast(getattr(torch, computed) if dev.type == "cpu" else resolve_dtype("auto", dev))
    load_s = time.perf_counter() - started
    same = ("patch", "stride", "noise_seed", "class_seed", "class_label")
    config = ExtractConfig(
        sites=tuple(sites),
        timesteps=tuple(timesteps),
        batch_size=batch_size,
        zoom=ident.get("zoom", 1),
        noise_samples=ident.get("noise_samples", 1),
        **{key: ident[key] for key in same},
    )
    if run:
        return load_s + _rerun_seconds(bb, scene, config)
    return load_s + _estimated_seconds(bb, scene, config)


def _rerun_seconds(bb: Backbone, scene: str | Path, config: Any) -> float:
    """Seconds :func:`extract_features` takes with ``config`` into a temporary store."""
    from pipeline.features.extract import extract_features

    with tempfile.TemporaryDirectory(prefix="hsicache-bench-extract-") as tmp:
        started = time.perf_counter()
        extract_features(scene, bb, Path(tmp) / "features.zarr", config)
        return time.perf_counter() - started


def _estimated_seconds(bb: Backbone, scene: str | Path, config: Any) -> float:
    """One batch of real patches per timestep (and noise draw), scaled to all patches."""
    from pipeline.features.extract import TileLayout, _SceneImage, patch_class_labels
    from pipeline.scene.core import open_scene

    sc = open_scene(scene)
    dev = next(bb.unet.parameters()).device
    layout = TileLayout(
        height=sc.shape[0],
        width=sc.shape[1],
        patch=config.patch,
        stride=config.stride,
        chunk_tiles=math.ceil(math.sqrt(config.batch_size)),  # chunk (0, 0): a whole batch
        zoom=config.zoom,
    )
    sel = layout.tiles_of_chunk(0, 0)[: config.batch_size]
    padded, r0, c0 = _SceneImage(sc.rgb, layout).chunk_input(0, 0)  # one chunk, never all
    x0 = layout.batch(padded, sel, origin=(r0, c0)).to(dev)
    eps = seeded_noise((3, layout.patch, layout.patch), config.noise_seed).to(dev)
    labels = patch_class_labels(bb, sel, config.class_seed, config.class_label, device=dev)
    per_batch = 0.0
    for t in config.timesteps:
        x = noised(x0, eps, int(t), bb.scheduler).to(bb.dtype)

        def forward(x: torch.Tensor = x, t: int = int(t)) -> Any:
            return bb.features(x, t, list(config.sites), class_labels=labels)

        per_batch += time_call(forward, repeats=1)
    return per_batch * config.noise_samples * len(layout.all_tiles) / len(sel)


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
    from a cold :data:`~pipeline.io.storage.memory_cache`; each step's median counts.

    Per head: ``train_s``, ``evaluate_s``, ``predict_s``; ``reuse_ratio`` = seconds to
    re-extract the features the head reads with the cache's backbone (stage one run for real,
    or estimated with ``run_extraction=False``: see :func:`extraction_seconds`) ÷ the head's
    three steps (``None`` for spectral-only heads or when the backbone is not available here);
    ``read_amplification`` = bytes fetched from the cache (compressed chunks, all three steps,
    cold) ÷ bytes of the features the head actually needs (float16, every pixel it touches).
    """
    from pipeline.features.cache import FeatureCache
    from pipeline.scene.core import open_scene

    if repeats < 1:
        raise ConfigError(f"repeats must be at least 1, got {repeats}")
    heads = heads or DEFAULT_BENCH_HEADS
    sc = open_scene(scene)
    cache = FeatureCache.open(features, expect_fingerprint=sc.image_fingerprint)
    results: dict[str, dict[str, Any]] = {}
    extraction: dict[tuple[tuple[int, ...], tuple[str, ...]], float | None] = {}
    with tempfile.TemporaryDirectory(prefix="hsicache-bench-heads-") as tmp:
        steps = functools.partial(_head_steps, scene, features, Path(tmp))
        selections = {}  # untimed first runs: each head's one-off costs, and what it reads
        for name, params in heads.items():
            selections[name] = steps(name, params)[0].selection
        for sel in selections.values():  # stage one, before the timed runs, for all of them alike
            key = (sel.timesteps, sel.sites)
            if sel.spatial and key not in extraction:
                extraction[key] = extraction_seconds(cache, scene, *key, run=run_extraction)
        for k, (name, params) in enumerate(heads.items()):
            sel = selections[name]
            extract_s = extraction.get((sel.timesteps, sel.sites)) if sel.spatial else None
            results[name] = _head_row(steps, name, params, repeats, sel, extract_s, cache, sc)
            if progress:
                progress(k + 1, len(heads))
    return results


def _head_steps(
    scene: str | Path, features: str | Path, work: Path, name: str, params: dict[str, Any]
) -> tuple[Any, list[float]]:
    """Train, evaluate and predict head ``name`` once: the trained head and the three times."""
    from pipeline.evaluation.scoring import evaluate, predict_map
    from pipeline.heads.training import train_head

    slug = name.replace(".", "_")  # an import path names a head folder too
    times = [time.perf_counter()]
    trained = train_head(
        scene=scene, cache=features, head=name, out=work / slug, params=dict(params)
    )
    times.append(time.perf_counter())
    evaluate(scene=scene, cache=features, head=work / slug)
    times.append(time.perf_counter())
    predict_map(scene=scene, cache=features, head=work / slug, out=work / f"{slug}.npy")
    times.append(time.perf_counter())
    return trained, [b - a for a, b in itertools.pairwise(times)]


def _head_row(
    steps: Callable[..., tuple[Any, list[float]]],
    name: str,
    params: dict[str, Any],
    repeats: int,
    sel: Any,
    extract_s: float | None,
    cache: Any,
    sc: Any,
) -> dict[str, Any]:
    """One head's figures: the medians of ``repeats`` cold runs, reuse and read amplification."""
    from pipeline.features.cache import count_reads
    from pipeline.io.storage import memory_cache

    runs, reads = [], []
    for _ in range(repeats):
        memory_cache.clear()  # every run starts cold: its own reads are counted
        with count_reads() as read:
            seconds = steps(name, params)[1]
        runs.append(seconds)
        reads.append(read[0])
    train_s, evaluate_s, predict_s = np.median(np.asarray(runs), axis=0).tolist()
    total = train_s + evaluate_s + predict_s
    reuse = amplification = None
    if sel.spatial:
        if extract_s is not None:
            reuse = extract_s / total
        h, w = sc.shape
        amplification = max(reads) / (h * w * cache.channels(sel.timesteps, sel.sites) * 2)
    return {
        "train_s": train_s,
        "evaluate_s": evaluate_s,
        "predict_s": predict_s,
        "reuse_ratio": reuse,
        "read_amplification": amplification,
        "extract_s": extract_s,
        "bytes_read": max(reads),
    }


CONTEXT_KEYS = ("seconds", "peak_rss_gb", "megapixels_per_s")


def bench_context(
    *,
    size: int = 1000,
    bands: int = 224,
    config: Any = None,
    scene: str | Path | None = None,
) -> dict[str, Any]:
    """Time :func:`pipeline.features.context.write_context` and measure its peak memory.

    The context stage runs in a fresh child process (``spawn``), so ``peak_rss_gb`` is that
    process's own peak resident memory, interpreter and imports included, and ``seconds`` its
    wall time from the scene store to the finished context store. The scene is a synthetic
    ``size`` x ``size`` x ``bands`` cube unless ``scene`` names one (writing it is not timed).

    Returns:
        :data:`CONTEXT_KEYS` figures and ``details`` (shape, families, per-family channels).
    """
    import multiprocessing as mp

    from pipeline.features.config import ContextConfig
    from pipeline.utils.checks import check_int

    cfg = config or ContextConfig()
    synthetic = scene is None
    with tempfile.TemporaryDirectory(prefix="hsicache-bench-context-") as tmp:
        work = Path(tmp)
        if scene is None:
            check_int("size", size, low=16)
            check_int("bands", bands, low=3)
            scene = _synthetic_scene(work, size, bands)
        ctx = mp.get_context("spawn")
        with ctx.Pool(1) as pool:
            seconds, rss, families = pool.apply(
                _context_child, (str(scene), str(work / "c.zarr"), cfg)
            )
        from pipeline.scene.core import open_scene

        shape = open_scene(scene, lazy=True).shape
    return {
        "seconds": seconds,
        "peak_rss_gb": rss / 2**30,
        "megapixels_per_s": shape[0] * shape[1] / 1e6 / seconds,
        "details": {
            "shape": list(shape),
            "synthetic": synthetic,
            "families": families,
            "config": cfg.to_dict(),
        },
    }


PREPARE_KEYS = ("seconds", "peak_rss_gb", "cube_gb", "peak_to_cube")


def bench_prepare(*, size: int = 1000, bands: int = 224) -> dict[str, Any]:
    """Time :func:`pipeline.scene.preparation.prepare` and measure its peak memory.

    The cube is a synthetic ``size`` x ``size`` x ``bands`` int16 ``.npy`` file (counts, as a
    sensor's file holds them) with a label map and no wavelengths; writing them is not timed.
    ``prepare`` (reading, checks, split, the ``pca`` rendering, which reads the whole cube
    twice, the preview, the store) runs in a fresh child process (``spawn``): ``peak_rss_gb``
    is that child's own peak resident memory, interpreter and imports included, and
    ``peak_to_cube`` its ratio to the float32 cube the store holds (``cube_gb``).

    Returns:
        :data:`PREPARE_KEYS` figures and ``details`` (shape, rendering).
    """
    import multiprocessing as mp

    from pipeline.scene.synthetic import make_synthetic_scene
    from pipeline.utils.checks import check_int

    check_int("size", size, low=24)  # smaller synthetic scenes have classes under 5 pixels
    check_int("bands", bands, low=3)
    with tempfile.TemporaryDirectory(prefix="hsicache-bench-prepare-") as tmp:
        work = Path(tmp)
        synth = make_synthetic_scene(size, size, bands, seed=0, region_size=48)
        low, high = float(synth.cube.min()), float(synth.cube.max())
        counts = (synth.cube - low) * (8000.0 / max(high - low, 1e-12))
        np.save(work / "cube.npy", counts.astype(np.int16))
        np.save(work / "labels.npy", synth.labels)
        del synth, counts
        with mp.get_context("spawn").Pool(1) as pool:
            seconds, rss = pool.apply(_prepare_child, (str(work),))
    cube_gb = size * size * bands * 4 / 2**30
    return {
        "seconds": seconds,
        "peak_rss_gb": rss / 2**30,
        "cube_gb": cube_gb,
        "peak_to_cube": rss / 2**30 / cube_gb,
        "details": {"shape": [size, size, bands], "source_dtype": "int16", "rgb_mode": "pca"},
    }


def _prepare_child(work: str) -> tuple[float, int]:
    """In the child: ``prepare`` with a preview, its wall seconds and peak resident bytes."""
    from pipeline.scene.preparation import prepare

    started = time.perf_counter()
    prepare(
        out=Path(work) / "scene.zarr",
        preview=Path(work) / "scene.png",
        cube=Path(work) / "cube.npy",
        labels=Path(work) / "labels.npy",
        per_class=5,
        rgb_mode="pca",
    )
    return time.perf_counter() - started, _peak_rss()


PROPAGATE_KEYS = ("train_seconds", "evaluate_seconds", "peak_rss_gb", "oa")
#: The head ``hsicache bench propagate`` times: params.yaml's ``propagate`` entry.
PROPAGATE_HEAD: dict[str, Any] = {
    "use": "spectral",
    "context": ["mean7", "mean15", "mean21", "mean31", "mean45"],
}


def bench_propagate(
    *,
    size: int = 1000,
    bands: int = 224,
    head: dict[str, Any] | None = None,
    scene: str | Path | None = None,
    context: str | Path | None = None,
) -> dict[str, Any]:
    """Time the ``propagate`` head at scene scale and measure its peak memory.

    ``train`` (reading every pixel's features, the neighbour graph of all pixels, the
    spreading, saving) and ``evaluate`` (the test pixels' nearest graph nodes) run in a fresh
    child process (``spawn``): ``peak_rss_gb`` is that child's own peak resident memory. The
    scene is a synthetic ``size`` x ``size`` x ``bands`` cube (5 labels per class) and its
    context store holds the ``meanW`` windows the head reads, unless ``scene`` and ``context``
    name stores; making them is not timed.

    Returns:
        :data:`PROPAGATE_KEYS` figures (``oa`` on the scene's test pixels) and ``details``.
    """
    import multiprocessing as mp

    from pipeline.features.config import ContextConfig
    from pipeline.features.context import write_context
    from pipeline.utils.checks import check_int

    params = {**PROPAGATE_HEAD, **(head or {})}
    with tempfile.TemporaryDirectory(prefix="hsicache-bench-propagate-") as tmp:
        work = Path(tmp)
        if scene is None:
            check_int("size", size, low=16)
            check_int("bands", bands, low=3)
            scene = _synthetic_scene(work, size, bands)
        if context is None:
            windows = tuple(int(f[4:]) for f in params.get("context", []) if f.startswith("mean"))
            cfg = ContextConfig(windows=windows or (7,), emp_components=0, slic_sizes=())
            context = work / "context.zarr"
            write_context(scene=scene, out=context, config=cfg)
        with mp.get_context("spawn").Pool(1) as pool:
            figures = pool.apply(
                _propagate_child, (str(scene), str(context), str(work / "head"), params)
            )
    return {k: figures[k] for k in PROPAGATE_KEYS} | {"details": figures["details"]}


def _propagate_child(scene: str, context: str, out: str, params: dict[str, Any]) -> dict[str, Any]:
    """In the child: train and evaluate the head, with wall seconds and peak resident bytes."""
    from pipeline.evaluation.scoring import evaluate
    from pipeline.heads.training import train_head

    started = time.perf_counter()
    trained = train_head(
        scene=scene, cache=None, head="propagate", out=out, params=params, context_store=context
    )
    trained_at = time.perf_counter()
    metrics, _, _ = evaluate(scene=scene, cache=None, head=out, context=context)
    done = time.perf_counter()
    meta = trained.meta
    return {
        "train_seconds": trained_at - started,
        "evaluate_seconds": done - trained_at,
        "peak_rss_gb": _peak_rss() / 2**30,
        "oa": metrics["oa"],
        "details": {
            "pixels": meta["n_train"] + meta["n_unlabeled"],
            "features": meta["n_features"],
            "n_test": metrics["n_test"],
            "params": params,
        },
    }


def _synthetic_scene(work: Path, size: int, bands: int) -> Path:
    """A ``size`` x ``size`` x ``bands`` synthetic scene store (Voronoi fields, 8 classes)."""
    from pipeline.scene.preparation import prepare
    from pipeline.scene.synthetic import make_synthetic_scene

    synth = make_synthetic_scene(size, size, bands, seed=0, region_size=48)
    np.save(work / "cube.npy", synth.cube.astype(np.float32))
    np.save(work / "labels.npy", synth.labels)
    del synth
    prepare(
        out=work / "scene.zarr",
        cube=work / "cube.npy",
        labels=work / "labels.npy",
        per_class=5,
        seed=0,
    )
    (work / "cube.npy").unlink()
    return work / "scene.zarr"


def _context_child(scene: str, out: str, cfg: Any) -> tuple[float, int, dict[str, int]]:
    """In the child: the context stage, its wall seconds and its peak resident bytes."""
    from pipeline.features.context import write_context

    started = time.perf_counter()
    store = write_context(scene=scene, out=out, config=cfg)
    seconds = time.perf_counter() - started
    return seconds, _peak_rss(), {n: store.attrs["families"][n]["channels"] for n in store.families}


def _peak_rss() -> int:
    """This process's peak resident bytes. Linux: ``VmHWM``, the high-water mark of this
    process's own memory (``ru_maxrss`` would also count the parent's at the fork before exec);
    elsewhere ``ru_maxrss``."""
    import resource

    status = Path("/proc/self/status")
    if status.is_file():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak * (1 if sys.platform == "darwin" else 1024)  # bytes on macOS, else kB
