"""Stage one: run the frozen backbone once over every patch and write the feature cache.

Tiling: the rendering is reflect-padded by ``(patch - stride) / 2`` and cut into ``patch`` x
``patch`` windows every ``stride`` pixels. Each window *owns* its central ``stride`` x ``stride``
square, so every pixel takes its features from the window in which it lies most central, is
written exactly once, and windows write disjoint regions. Feature maps are resized to the patch
size (bilinear) before the central square is cut out.

Noise: x_t = √ᾱ_t·x₀ + √(1-ᾱ_t)·ε with the backbone's scheduler and one seeded ε shared by every
patch; a class-conditional backbone gets a class id per patch drawn from ``class_seed`` and the
patch's position, so results never depend on batch composition.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline.backbone.loading import (
    Backbone,
    Site,
    check_timesteps,
    load_backbone,
    noised,
    seeded_noise,
)
from pipeline.errors import ConfigError, StoreError
from pipeline.features.cache import (
    all_finite,
    array_path,
    create_or_resume,
    done_chunks,
    read_identity,
)
from pipeline.features.config import ExtractConfig
from pipeline.io.cluster import as_they_finish, connected
from pipeline.io.outputs import FEATURES, check_outputs
from pipeline.io.storage import Location, StoreLock
from pipeline.io.store import package_versions
from pipeline.scene.core import open_scene, scene_array
from pipeline.utils.devices import resolve_device, resolve_dtype

__all__ = [
    "ChunkJob",
    "TileLayout",
    "compute_chunk",
    "extract_features",
    "patch_class_labels",
    "resolve_device",
    "resolve_dtype",
]

_MIN_CHUNK_BYTES = 1 << 20
ProgressFn = Callable[[int, int], None]


@dataclass(frozen=True)
class TileLayout:
    """Where every patch lies and which pixels it owns.

    Attributes:
        height, width: scene size.
        patch: window side.
        stride: distance between windows = side of the owned square.
        chunk_tiles: owned squares per cache chunk side.
        zoom: the rendering is upsampled this many times (bilinear) before the windows tile
            it; patch, stride and owned squares are in upsampled pixels, the cache and its
            chunks in scene pixels (each scene pixel averages its ``zoom x zoom`` block).
    """

    height: int
    width: int
    patch: int
    stride: int
    chunk_tiles: int
    zoom: int = 1

    @property
    def shape(self) -> tuple[int, int]:
        """``(height, width)`` of the scene."""
        return self.height, self.width

    @property
    def pad(self) -> int:
        """Reflect padding before the first window."""
        return (self.patch - self.stride) // 2

    @property
    def tiles(self) -> tuple[int, int]:
        """Windows per column and per row (of the upsampled rendering)."""
        z = self.zoom
        return math.ceil(self.height * z / self.stride), math.ceil(self.width * z / self.stride)

    @property
    def chunk(self) -> int:
        """Cache chunk side in scene pixels."""
        return self.chunk_tiles * self.stride // self.zoom

    @property
    def chunks(self) -> tuple[int, int]:
        """Chunks per column and per row."""
        return math.ceil(self.height / self.chunk), math.ceil(self.width / self.chunk)

    def tiles_of_chunk(self, ci: int, cj: int) -> list[tuple[int, int]]:
        """The windows ``(ti, tj)`` whose owned squares lie in chunk ``(ci, cj)``."""
        ty, tx = self.tiles
        k = self.chunk_tiles
        return [
            (ti, tj)
            for ti in range(ci * k, min((ci + 1) * k, ty))
            for tj in range(cj * k, min((cj + 1) * k, tx))
        ]

    def chunk_bounds(self, ci: int, cj: int) -> tuple[int, int, int, int]:
        """``(y0, y1, x0, x1)`` of chunk ``(ci, cj)`` in scene pixels, clipped to the scene."""
        y0, x0 = ci * self.chunk, cj * self.chunk
        return y0, min(y0 + self.chunk, self.height), x0, min(x0 + self.chunk, self.width)

    def window(
        self, padded: np.ndarray, ti: int, tj: int, origin: tuple[int, int] = (0, 0)
    ) -> np.ndarray:
        """Window ``(ti, tj)`` of the padded image, ``(patch, patch, C)``; ``padded`` may be a
        part of it whose first pixel lies at ``origin`` of the whole."""
        y, x = ti * self.stride - origin[0], tj * self.stride - origin[1]
        return padded[y : y + self.patch, x : x + self.patch]

    def owned_squares(
        self, features: torch.Tensor, dtype: torch.dtype = torch.float16
    ) -> np.ndarray:
        """``(N, C, r, r)`` feature maps → the owned squares, ``(N, stride, stride, C)``
        (float16 unless ``dtype`` says otherwise).

        Maps coarser than the patch are first resized to it (bilinear).
        """
        f = features.float()
        if f.shape[-1] != self.patch:
            f = torch.nn.functional.interpolate(
                f, size=(self.patch, self.patch), mode="bilinear", align_corners=False
            )
        p0 = self.pad
        core = f[:, :, p0 : p0 + self.stride, p0 : p0 + self.stride]
        return core.permute(0, 2, 3, 1).to(dtype).cpu().numpy()

    @property
    def all_tiles(self) -> list[tuple[int, int]]:
        """Every window ``(ti, tj)``, row by row."""
        return [(i, j) for i in range(self.tiles[0]) for j in range(self.tiles[1])]

    def model_input(self, rgb: np.ndarray) -> np.ndarray:
        """The rendering in [0, 1] as the backbone sees it: upsampled (``zoom``), scaled to
        [-1, 1], reflect-padded."""
        image = np.asarray(rgb, dtype=np.float32)
        if self.zoom > 1:
            rows = np.arange(self.height * self.zoom)
            cols = np.arange(self.width * self.zoom)
            image = upsample_region(image, rows, cols, self.zoom)
        return self.pad_image(image * 2.0 - 1.0)

    def batch(
        self,
        padded: np.ndarray,
        tiles: Sequence[tuple[int, int]],
        origin: tuple[int, int] = (0, 0),
    ) -> torch.Tensor:
        """Windows ``tiles`` of the padded image (or of its part at ``origin``) as one
        ``(N, C, patch, patch)`` tensor."""
        windows = np.stack([self.window(padded, ti, tj, origin) for ti, tj in tiles])
        return torch.from_numpy(np.ascontiguousarray(windows.transpose(0, 3, 1, 2)))

    def pad_image(self, image: np.ndarray) -> np.ndarray:
        """Reflect-pad ``(H, W, C)`` so every window lies inside."""
        ty, tx = self.tiles
        h, w = self.height * self.zoom, self.width * self.zoom
        after_y = ty * self.stride + self.patch - self.stride - self.pad - h
        after_x = tx * self.stride + self.patch - self.stride - self.pad - w
        return np.pad(image, ((self.pad, after_y), (self.pad, after_x), (0, 0)), mode="reflect")


def _bilinear_taps(index: np.ndarray, n: int, zoom: int) -> tuple[np.ndarray, ...]:
    """For pixels ``index`` of an ``n``-pixel axis upsampled ``zoom`` times: the two source
    pixels and the second one's weight (bilinear, pixel centres aligned: torch's
    ``interpolate(mode="bilinear", align_corners=False)``)."""
    src = np.clip((index + 0.5) / zoom - 0.5, 0.0, n - 1)
    i0 = np.floor(src).astype(np.int64)
    i1 = np.minimum(i0 + 1, n - 1)
    return i0, i1, (src - i0).astype(np.float32)


def upsample_region(rgb: Any, rows: np.ndarray, cols: np.ndarray, zoom: int) -> np.ndarray:
    """Pixels ``rows x cols`` of the rendering ``rgb`` (``(H, W, C)``, numpy or zarr) upsampled
    ``zoom`` times, bilinear; only the box of ``rgb`` that holds their taps is read."""
    r0, r1, rw = _bilinear_taps(rows, rgb.shape[0], zoom)
    c0, c1, cw = _bilinear_taps(cols, rgb.shape[1], zoom)
    y, x = int(r0.min()), int(c0.min())
    box = np.asarray(rgb[y : int(r1.max()) + 1, x : int(c1.max()) + 1], dtype=np.float32)
    top = box[r0 - y] * (1 - rw)[:, None, None] + box[r1 - y] * rw[:, None, None]
    return top[:, c0 - x] * (1 - cw)[None, :, None] + top[:, c1 - x] * cw[None, :, None]


def extract_features(
    scene: str | Path,
    backbone: str | Backbone,
    out: str | Path,
    config: ExtractConfig | None = None,
    *,
    progress: ProgressFn | None = None,
    stats: dict[str, Any] | None = None,
    client: Any = None,
    resources: dict[str, float] | None = None,
    **settings: Any,
) -> Location:
    """Extract per-pixel features of a prepared scene into a (resumable) Zarr cache.

    Args:
        scene: the scene store written by ``prepare``.
        backbone: a backbone SPEC or an already loaded :class:`Backbone`.
        out: the cache store (a folder or an fsspec URL such as ``s3://bucket/f.zarr``); an
            unfinished one with the same inputs is resumed, a finished one is left as it is.
        config: the settings (:class:`~pipeline.features.config.ExtractConfig`: sites,
            timesteps, stride, dtype...).
        progress: called as ``progress(done_patches, total_patches)``.
        stats: if given, filled with ``patches``, ``forward_s`` (forward passes and stitching),
            ``write_s`` and ``written_bytes`` (uncompressed) of this call, ``run_s`` (the chunks,
            from the first to the last), ``first_chunk_s`` (from this call's start to the
            first chunk written: backbone load and dtype choice included) and the dtype report.
        client: a ``distributed.Client``, or a zero-argument callable opening one as a context
            manager (:func:`pipeline.io.cluster.dask_client`; opened only once the inputs are
            checked and there is work): one task per chunk on its workers (each loads the
            backbone once and writes its own chunk-aligned region; ``out`` and ``scene`` must
            be reachable from the workers: a shared file system or an object store).
        resources: dask resources each chunk task needs (``{"GPU": 1}``: one task per GPU).
        **settings: :class:`ExtractConfig` fields, given directly (``sites=["up1.res1"],
            stride=32``) or overriding ``config``'s.

    Returns:
        Where the cache is. While it is written the store holds a writer lock
        (:class:`~pipeline.io.storage.StoreLock`): a second extraction into it is refused.
    """
    started = time.perf_counter()
    cfg = config.replace(**settings) if config is not None else ExtractConfig(**settings)
    plan = _plan(scene, backbone, out, cfg)
    with _writing(plan.where), StoreLock(plan.where):
        job, root, done, report = _open_or_resume(plan, cfg)
        if root.attrs.get("complete"):
            return plan.where
        tally = stats if stats is not None else {}
        tally.update(
            patches=0,
            forward_s=0.0,
            write_s=0.0,
            written_bytes=0,
            dtype_report=report,
            first_chunk_s=None,
            run_s=0.0,
        )
        runner = _ChunkRunner(job, plan.backbone, root, tally, started, progress)
        runner.run(done, plan.scene.rgb, client, resources, plan.preloaded)
        _mark_complete(root, plan.where)
    return plan.where


@dataclass
class _Plan:
    """What an extraction will do, decided and checked before anything is written."""

    scene: Any
    backbone: Backbone
    device: torch.device
    dtype: torch.dtype
    sites: list[Site]
    layout: TileLayout
    where: Location
    preloaded: bool
    source: str  # the scene's location, as workers open it


def _plan(
    scene: str | Path, backbone: str | Backbone, out: str | Path, cfg: ExtractConfig
) -> _Plan:
    """The inputs opened and checked, the backbone loaded, the tiling chosen."""
    spec_path = backbone if isinstance(backbone, (str, Path)) and Path(backbone).exists() else None
    check_outputs({"out": (out, FEATURES)}, {"scene": scene, "backbone": spec_path})
    sc = open_scene(scene, lazy=True)
    dev = resolve_device(cfg.device)
    dt = resolve_dtype(cfg.dtype, dev)
    preloaded = isinstance(backbone, Backbone)
    if isinstance(backbone, Backbone):
        bb = backbone
        dev = next(bb.unet.parameters()).device
        dt = bb.dtype if cfg.dtype == "auto" else dt
    else:
        bb = load_backbone(backbone, device=dev, dtype=dt)
    chosen, patch = _check_backbone_fit(bb, cfg)
    layout = _layout(sc.shape, patch, cfg, chosen)
    check_rendering(sc.rgb, scene)  # before anything is written: a hole would become NaNs
    where = Location.of(out)
    return _Plan(sc, bb, dev, dt, chosen, layout, where, preloaded, str(Location.of(scene)))


def _open_or_resume(
    plan: _Plan, cfg: ExtractConfig
) -> tuple[ChunkJob, Any, np.ndarray, dict[str, Any]]:
    """The compute dtype settled, the cache created (or the unfinished one reopened): the
    chunk job, the store's root, which chunks are done, and the dtype report."""
    dt = plan.dtype
    report: dict[str, Any] = {"choice": str(dt).replace("torch.", "")}
    if cfg.threads is not None and torch.get_num_threads() != cfg.threads:
        torch.set_num_threads(cfg.threads)  # the dtype is chosen for the threads that will run
    if cfg.dtype == "auto" and plan.device.type == "cpu" and not plan.preloaded:
        dt, report = _auto_cpu_dtype(plan, cfg.noise_seed, cfg.timesteps[0])
    job = ChunkJob(
        scene=plan.source,
        out=str(plan.where),
        backbone=plan.backbone.spec,
        weights_sha256=plan.backbone.weights_sha256,
        device=cfg.device,
        dtype=str(dt).replace("torch.", ""),
        layout=plan.layout,
        timesteps=tuple(int(t) for t in cfg.timesteps),
        sites=tuple(cfg.sites),
        noise_seed=cfg.noise_seed,
        class_seed=cfg.class_seed,
        class_label=cfg.class_label,
        truncate=cfg.truncate,
        batch_size=cfg.batch_size,
        threads=cfg.threads or torch.get_num_threads(),
        noise_samples=cfg.noise_samples,
    )
    root, done = create_or_resume(
        plan.where,
        shape=plan.layout.shape,
        chunk=plan.layout.chunk,
        site_channels={s.name: s.channels for s in plan.sites},
        timesteps=cfg.timesteps,
        identity=job.identity(plan.scene.image_fingerprint),
        attrs=_provenance(job, plan.backbone, plan.sites, plan.scene, report),
    )
    return job, root, done, report


def _check_backbone_fit(bb: Backbone, cfg: ExtractConfig) -> tuple[list[Site], int]:
    """The chosen sites and the patch side, checked against what the backbone can do."""
    chosen = [bb.site(s) for s in cfg.sites]
    classes = bb.num_class_embeds or 0
    if cfg.class_label is not None and not 0 <= cfg.class_label < classes:
        has = f"classes 0..{classes - 1}" if classes else "no class input"
        raise ConfigError(
            f"`class_label={cfg.class_label}` needs a class-conditional backbone with that "
            f"class; `{bb.spec}` has {has}"
        )
    check_timesteps(bb, cfg.timesteps)
    patch = cfg.patch if cfg.patch is not None else bb.sample_size
    stride = cfg.stride
    if not 0 < stride <= patch or (patch - stride) % 2:
        raise ConfigError(
            f"`stride={stride}` must be in 1..{patch} (`patch`) with patch - stride even"
        )
    levels = len(bb.unet.config.block_out_channels) - 1
    if patch % (2**levels):
        raise ConfigError(f"`patch={patch}` must be a multiple of {2**levels} for this backbone")
    return chosen, patch


def _layout(
    shape: tuple[int, int], patch: int, cfg: ExtractConfig, chosen: list[Site]
) -> TileLayout:
    """The tiling, with chunks of about 1 MB or more unless ``chunk_tiles`` is given."""
    h, w = shape
    min_channels = min(s.channels for s in chosen)
    side = cfg.stride // cfg.zoom  # scene pixels per owned square
    k = cfg.chunk_tiles if cfg.chunk_tiles is not None else 1
    while cfg.chunk_tiles is None and (k * side) ** 2 * min_channels * 2 < _MIN_CHUNK_BYTES:
        if k * side >= max(h, w):
            break
        k += 1
    return TileLayout(
        height=h, width=w, patch=patch, stride=cfg.stride, chunk_tiles=k, zoom=cfg.zoom
    )


def _provenance(
    job: ChunkJob, bb: Backbone, chosen: list[Site], sc: Any, report: dict[str, Any]
) -> dict[str, Any]:
    """The cache's attributes beside its identity (all deterministic: no times, no hosts)."""
    from pipeline.backbone.autotune import provenance_of

    return {
        "shape": list(job.layout.shape),
        "chunk": job.layout.chunk,
        "site_info": {s.name: {"channels": s.channels, "resolution": s.resolution} for s in chosen},
        "backbone": bb.provenance(),
        "rendering": sc.attrs.get("rendering"),
        "package_versions": package_versions(),
        "truncated_forward": job.truncate,
        "compute_dtype_choice": provenance_of(report),
        "torch_threads": job.threads,
    }


class _ChunkRunner:
    """Computes the chunks not yet done, here or on a dask cluster, keeping the tally and
    marking each chunk done in the store once its data is written."""

    def __init__(
        self,
        job: ChunkJob,
        bb: Backbone,
        root: Any,
        tally: dict[str, Any],
        started: float,
        progress: ProgressFn | None,
    ) -> None:
        self.job, self.bb, self.root, self.tally = job, bb, root, tally
        self.started, self.progress = started, progress
        self.finished = self.total = 0

    def run(
        self,
        done: np.ndarray,
        rgb: Any,
        client: Any,
        resources: dict[str, float] | None,
        preloaded: bool,
    ) -> None:
        """Compute every pending chunk."""
        layout = self.job.layout
        pending = [(int(i), int(j)) for i, j in zip(*np.nonzero(~done), strict=True)]
        self.total = layout.tiles[0] * layout.tiles[1]
        self.finished = self.total - sum(len(layout.tiles_of_chunk(i, j)) for i, j in pending)
        loop_started = time.perf_counter()
        with connected(client if pending else None) as dask:
            self.advance(0)
            if dask is not None:
                self._on_cluster(dask, pending, resources, preloaded)
            else:
                self._here(rgb, pending, loop_started)
        self.tally["run_s"] = time.perf_counter() - loop_started

    def advance(self, n: int) -> None:
        """``n`` more patches computed."""
        self.finished += n
        self.tally["patches"] += n
        if self.progress:
            self.progress(self.finished, self.total)

    def chunk_done(self, ci: int, cj: int, figures: dict[str, float]) -> None:
        """Chunk ``(ci, cj)`` written: mark it done and add its figures."""
        self.root["progress/done"][ci, cj] = True
        if self.tally["first_chunk_s"] is None:
            self.tally["first_chunk_s"] = time.perf_counter() - self.started
        for key in ("forward_s", "write_s", "written_bytes"):
            self.tally[key] += figures[key]

    def _here(self, rgb: Any, pending: list[tuple[int, int]], loop_started: float) -> None:
        image = _SceneImage(rgb, self.job.layout)
        for ci, cj in pending:
            figures = compute_chunk(
                self.job, self.bb, image, self.root, ci, cj, on_batch=self.advance
            )
            self.chunk_done(ci, cj, figures)
            self.tally["run_s"] = time.perf_counter() - loop_started

    def _on_cluster(
        self,
        client: Any,
        pending: list[tuple[int, int]],
        resources: dict[str, float] | None,
        preloaded: bool,
    ) -> None:
        """One dask task per pending chunk; this process marks each chunk done as it
        arrives."""
        model = client.scatter(self.bb, broadcast=True) if preloaded else None
        finished = as_they_finish(
            client,
            _chunk_task,
            pending,
            self.job,
            model,
            name="hsicache-chunk",
            resources=resources,
        )
        for (ci, cj), figures in finished:
            self.chunk_done(ci, cj, figures)
            self.advance(int(figures["patches"]))


def _mark_complete(root: Any, where: Location) -> None:
    """Mark the cache complete, once every chunk is recorded as written."""
    done = done_chunks(root)
    if not done.all():
        raise StoreError(
            f"feature cache `{where}`: {int((~done).sum())} of {done.size} chunks are not "
            "recorded as written; re-run the same command to finish it"
        )
    root.attrs["complete"] = True


def check_rendering(rgb: Any, scene: str | Path | Location) -> None:
    """Refuse a scene whose rendering has a missing, undecodable or non-finite chunk.

    The backbone would turn any of them into NaN features; every chunk is read once (a
    missing one reads as NaN, the rendering's fill value).

    Raises:
        StoreError: naming the store, the array and the block.
    """
    cy, cx = (getattr(rgb, "chunks", None) or rgb.shape)[:2]  # a scene in memory: one block
    for y0 in range(0, rgb.shape[0], cy):
        for x0 in range(0, rgb.shape[1], cx):
            block = f"rows {y0}-{min(y0 + cy, rgb.shape[0])}, columns {x0}-" + str(
                min(x0 + cx, rgb.shape[1])
            )
            try:
                values = np.asarray(rgb[y0 : y0 + cy, x0 : x0 + cx])
            except Exception as exc:  # the codec's own error type differs per codec
                raise StoreError(
                    f"scene store `{scene}`: array `rgb` at {block} cannot be decoded "
                    f"({type(exc).__name__}): a corrupt chunk; re-run `hsicache prepare`"
                ) from None
            if not np.isfinite(values).all():
                raise StoreError(
                    f"scene store `{scene}`: array `rgb` at {block} holds missing or "
                    "non-finite values (a deleted chunk?); re-run `hsicache prepare`"
                )


def write_block(array: Any, region: tuple[slice, ...], values: np.ndarray) -> None:
    """``array[region] = values``: every chunk an extraction writes goes through here."""
    array[region] = values


@contextlib.contextmanager
def _writing(where: Location) -> Iterator[None]:
    """Turn a failed write (disk full, permission denied, store gone) into one clear line."""
    try:
        yield
    except OSError as exc:
        reason = exc.strerror or str(exc) or type(exc).__name__
        raise StoreError(
            f"cannot write feature cache `{where}`: {reason}; it stays unfinished (not marked "
            "complete) - fix that and re-run the same command to resume"
        ) from exc


@dataclass(frozen=True)
class ChunkJob:
    """Everything needed to compute and write any chunk of one cache: small and picklable, so
    it travels to dask workers, which load the backbone themselves (once per worker)."""

    scene: str
    out: str
    backbone: str
    weights_sha256: str
    device: str
    dtype: str
    layout: TileLayout
    timesteps: tuple[int, ...]
    sites: tuple[str, ...]
    noise_seed: int
    class_seed: int
    class_label: int | None
    truncate: bool
    batch_size: int
    threads: int
    noise_samples: int = 1

    def identity(self, image_fingerprint: str) -> dict[str, Any]:
        """What determines the cache's content; a store made with another one is refused.
        (``zoom`` and ``noise_samples`` appear only when not 1, so such caches are the same
        as before they existed.)"""
        extra = {"zoom": self.layout.zoom} if self.layout.zoom != 1 else {}
        if self.noise_samples != 1:
            extra["noise_samples"] = self.noise_samples
        return extra | {
            "image_fingerprint": image_fingerprint,
            "backbone": self.backbone,
            "weights_sha256": self.weights_sha256,
            "timesteps": list(self.timesteps),
            "sites": list(self.sites),
            "patch": self.layout.patch,
            "stride": self.layout.stride,
            "noise_seed": self.noise_seed,
            "class_seed": self.class_seed,
            "class_label": self.class_label,
            "compute_dtype": self.dtype,
        }


class _SceneImage:
    """The rendering as the backbone sees it, read chunk by chunk (never the whole scene)."""

    def __init__(self, rgb: Any, layout: TileLayout) -> None:
        self.rgb, self.layout = rgb, layout

    def chunk_input(self, ci: int, cj: int) -> tuple[np.ndarray, int, int]:
        """The reflect-padded input covering the windows of chunk ``(ci, cj)``, in [-1, 1],
        and its offset ``(row, col)`` in padded-image coordinates."""
        lay = self.layout
        tiles = lay.tiles_of_chunk(ci, cj)
        t0, t1 = tiles[0], tiles[-1]
        r0, c0 = t0[0] * lay.stride, t0[1] * lay.stride
        z = lay.zoom
        rows = _reflect(np.arange(r0, t1[0] * lay.stride + lay.patch) - lay.pad, lay.height * z)
        cols = _reflect(np.arange(c0, t1[1] * lay.stride + lay.patch) - lay.pad, lay.width * z)
        if z > 1:
            return upsample_region(self.rgb, rows, cols, z) * 2.0 - 1.0, r0, c0
        box = np.asarray(
            self.rgb[rows.min() : rows.max() + 1, cols.min() : cols.max() + 1], dtype=np.float32
        )
        window = box[np.ix_(rows - rows.min(), cols - cols.min())]
        return window * 2.0 - 1.0, r0, c0


def _reflect(index: np.ndarray, n: int) -> np.ndarray:
    """Indices into ``n`` samples mirrored at both ends without repeating the edge, as
    ``np.pad(mode="reflect")`` does, for any distance outside."""
    if n == 1:
        return np.zeros_like(index)
    period = 2 * (n - 1)
    folded = np.abs(index) % period
    return np.where(folded >= n, period - folded, folded)


def compute_chunk(
    job: ChunkJob,
    bb: Backbone,
    image: _SceneImage,
    root: Any,
    ci: int,
    cj: int,
    *,
    on_batch: Callable[[int], None] | None = None,
) -> dict[str, float]:
    """Compute chunk ``(ci, cj)`` and write it to ``root`` (not marked done: the caller does).

    The same function runs in the single process and on dask workers, so both give the same
    bytes (for equal torch thread counts: CPU kernels are chosen by thread count).
    """
    if torch.get_num_threads() != job.threads:
        torch.set_num_threads(job.threads)
    lay = job.layout
    started = time.perf_counter()
    y0, y1, x0, x1 = lay.chunk_bounds(ci, cj)
    tiles = lay.tiles_of_chunk(ci, cj)
    padded, r0, c0 = image.chunk_input(ci, cj)
    dev = next(bb.unet.parameters()).device
    noises = [seeded_noise((3, lay.patch, lay.patch), s).to(dev) for s in noise_seeds(job)]
    exact = lay.zoom == 1 and len(noises) == 1  # float16 straight from the backbone
    buffers = {  # scene pixels: a zoomed square is pooled as soon as it is computed
        (t, name): np.zeros(
            (y1 - y0, x1 - x0, bb.site(name).channels), dtype=np.float16 if exact else np.float32
        )
        for t in job.timesteps
        for name in job.sites
    }
    for b0 in range(0, len(tiles), job.batch_size):
        batch = tiles[b0 : b0 + job.batch_size]
        x0_batch = lay.batch(padded, batch, origin=(r0, c0)).to(dev)
        labels = patch_class_labels(bb, batch, job.class_seed, job.class_label, device=dev)
        for t in job.timesteps:
            for eps in noises:
                xt = noised(x0_batch, eps, int(t), bb.scheduler).to(getattr(torch, job.dtype))
                feats = bb.features(
                    xt, int(t), list(job.sites), class_labels=labels, truncate=job.truncate
                )
                for name in job.sites:
                    _stitch(lay, feats[name], batch, buffers[(t, name)], (y0, x0), exact)
        if on_batch:
            on_batch(len(batch))
    if not exact:
        buffers = {key: (buf / len(noises)).astype(np.float16) for key, buf in buffers.items()}
    written = time.perf_counter()
    _check_finite(job, buffers, (y0, y1, x0, x1))
    for (t, name), buf in buffers.items():
        write_block(root[array_path(t, name)], (slice(y0, y1), slice(x0, x1)), buf)
    return {
        "forward_s": written - started,
        "write_s": time.perf_counter() - written,
        "written_bytes": float(sum(buf.nbytes for buf in buffers.values())),
        "patches": float(len(tiles)),
    }


def _check_finite(
    job: ChunkJob, buffers: dict[tuple[int, str], np.ndarray], bounds: tuple[int, ...]
) -> None:
    """Non-finite features never enter a cache: they would pass as features."""
    y0, y1, x0, x1 = bounds
    for (t, name), buf in buffers.items():
        if not all_finite(buf):
            remedy = (
                "its weights may be broken (a diverged training?)"
                if str(job.dtype) in ("fp32", "float32", "torch.float32")
                else "try `dtype=fp32` or another site"
            )
            raise StoreError(
                f"backbone `{job.backbone}` gave non-finite features at t={t}, site `{name}`, "
                f"rows {y0}-{y1}, columns {x0}-{x1} (beyond float16's range, or NaN from the "
                f"{job.dtype} forward); nothing of this chunk was written; {remedy}"
            )


def noise_seeds(job: ChunkJob) -> list[int]:
    """The seeds of the noise draws averaged at each timestep: ``noise_seed`` first (one draw:
    the cache of old), then seeds derived from it."""
    return [job.noise_seed] + [
        (job.noise_seed + 1_000_003 * k) % 2**32 for k in range(1, job.noise_samples)
    ]


def _stitch(
    lay: TileLayout,
    features: torch.Tensor,
    batch: Sequence[tuple[int, int]],
    buf: np.ndarray,
    origin: tuple[int, int],
    exact: bool,
) -> None:
    """Each window's owned square of ``features``, average-pooled ``zoom x zoom`` onto scene
    pixels, into ``buf`` (whose first pixel lies at ``origin`` of the scene): written when
    ``exact``, else added (a sum over the noise draws). Edge squares are clipped to the
    scene."""
    core = lay.owned_squares(features, torch.float16 if exact else torch.float32)
    z, side = lay.zoom, lay.stride // lay.zoom
    if z > 1:
        n, s, _, c = core.shape
        core = core.reshape(n, s // z, z, s // z, z, c).mean(axis=(2, 4))
    for n, (ti, tj) in enumerate(batch):
        ry, rx = ti * side - origin[0], tj * side - origin[1]
        hh, ww = min(side, buf.shape[0] - ry), min(side, buf.shape[1] - rx)
        if exact:
            buf[ry : ry + hh, rx : rx + ww] = core[n, :hh, :ww]
        else:
            buf[ry : ry + hh, rx : rx + ww] += core[n, :hh, :ww]


def _chunk_task(chunk: tuple[int, int], job: ChunkJob, model: Backbone | None) -> dict[str, float]:
    """A dask task: compute and write one chunk with this worker's backbone (loaded once)."""
    from pipeline.io.cluster import worker_state

    if model is None:
        model = worker_state(
            "backbone", (job.backbone, job.device, job.dtype), lambda: _load_for_worker(job)
        )

    def rendering() -> _SceneImage:
        return _SceneImage(scene_array(job.scene, "rgb"), job.layout)

    image = worker_state("image", (job.scene, *dataclasses.astuple(job.layout)), rendering)
    root = worker_state("cache", job.out, lambda: _open_for_writing(job))
    with _writing(Location.of(job.out)):
        return compute_chunk(job, model, image, root, *chunk)


def _load_for_worker(job: ChunkJob) -> Backbone:
    dev = resolve_device(job.device)
    bb = load_backbone(job.backbone, device=dev, dtype=getattr(torch, job.dtype))
    if bb.weights_sha256 != job.weights_sha256:
        raise StoreError(
            f"backbone `{job.backbone}` on this worker has weights {bb.weights_sha256[:12]}, "
            f"not {job.weights_sha256[:12]} as on the client: give every worker the same files"
        )
    return bb


def _open_for_writing(job: ChunkJob) -> Any:
    import zarr

    return zarr.open_group(Location.of(job.out).zarr_store(read_only=False), mode="r+")


def _auto_cpu_dtype(
    plan: _Plan, noise_seed: int, timestep: int
) -> tuple[torch.dtype, dict[str, Any]]:
    """``dtype=auto`` on CPU: the dtype an unfinished cache was started with, else fp32 where
    the CPU has no native bf16, else the faster of the two on the scene's first patch."""
    from pipeline.backbone.autotune import choose_cpu_dtype
    from pipeline.utils.devices import cpu_capability

    bb, layout = plan.backbone, plan.layout
    started = read_identity(plan.where).get("compute_dtype")
    if started:
        cap = cpu_capability()
        dt = getattr(torch, started)
        report: dict[str, Any] = {
            "choice": started,
            "reason": "resumed",
            "resumed": True,
            "capability": cap["kernels"],
            "native_bf16": cap["native_bf16"],
        }
    else:
        tiles = layout.tiles_of_chunk(0, 0)[:1]
        padded, _, _ = _SceneImage(plan.scene.rgb, layout).chunk_input(0, 0)
        eps = seeded_noise((3, layout.patch, layout.patch), noise_seed)
        x = noised(layout.batch(padded, tiles), eps, timestep, bb.scheduler)
        labels = patch_class_labels(bb, tiles, 0, device=eps.device)
        dt, report = choose_cpu_dtype(
            bb,
            x,
            timestep,
            [s.name for s in plan.sites],
            labels,
            reload=lambda: load_backbone(bb.spec),
        )
    if dt != bb.dtype:
        bb.cast(dt)
    return dt, report


def patch_class_labels(
    bb: Backbone,
    batch: list[tuple[int, int]],
    class_seed: int,
    class_label: int | None = None,
    *,
    device: torch.device,
) -> torch.Tensor | None:
    """Class ids of a class-conditional backbone: ``class_label`` for every patch, else one per
    patch drawn from the seed and the patch position."""
    if not bb.num_class_embeds:
        return None
    if class_label is not None:
        return torch.full((len(batch),), class_label, dtype=torch.long, device=device)
    return torch.tensor(
        [
            int(np.random.default_rng([class_seed, ti, tj]).integers(bb.num_class_embeds))
            for ti, tj in batch
        ],
        device=device,
    )
