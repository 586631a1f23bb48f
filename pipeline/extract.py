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

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline.backbone import Backbone, Site, load_backbone, noised, seeded_noise
from pipeline.cache import array_path, create_or_resume, read_identity
from pipeline.errors import ConfigError
from pipeline.scene import open_scene
from pipeline.store import package_versions

__all__ = [
    "TileLayout",
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
    """

    height: int
    width: int
    patch: int
    stride: int
    chunk_tiles: int

    @property
    def pad(self) -> int:
        """Reflect padding before the first window."""
        return (self.patch - self.stride) // 2

    @property
    def tiles(self) -> tuple[int, int]:
        """Windows per column and per row."""
        return math.ceil(self.height / self.stride), math.ceil(self.width / self.stride)

    @property
    def chunk(self) -> int:
        """Cache chunk side in pixels."""
        return self.chunk_tiles * self.stride

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

    def window(self, padded: np.ndarray, ti: int, tj: int) -> np.ndarray:
        """Window ``(ti, tj)`` of the padded image, ``(patch, patch, C)``."""
        y, x = ti * self.stride, tj * self.stride
        return padded[y : y + self.patch, x : x + self.patch]

    def owned_squares(self, features: torch.Tensor) -> np.ndarray:
        """``(N, C, r, r)`` feature maps → the owned squares, ``(N, stride, stride, C)`` float16.

        Maps coarser than the patch are first resized to it (bilinear).
        """
        f = features.float()
        if f.shape[-1] != self.patch:
            f = torch.nn.functional.interpolate(
                f, size=(self.patch, self.patch), mode="bilinear", align_corners=False
            )
        p0 = self.pad
        core = f[:, :, p0 : p0 + self.stride, p0 : p0 + self.stride]
        return core.permute(0, 2, 3, 1).to(torch.float16).cpu().numpy()

    @property
    def all_tiles(self) -> list[tuple[int, int]]:
        """Every window ``(ti, tj)``, row by row."""
        return [(i, j) for i in range(self.tiles[0]) for j in range(self.tiles[1])]

    def model_input(self, rgb: np.ndarray) -> np.ndarray:
        """The rendering in [0, 1] as the backbone sees it: scaled to [-1, 1], reflect-padded."""
        return self.pad_image(np.asarray(rgb, dtype=np.float32) * 2.0 - 1.0)

    def batch(self, padded: np.ndarray, tiles: Sequence[tuple[int, int]]) -> torch.Tensor:
        """Windows ``tiles`` of the padded image as one ``(N, C, patch, patch)`` tensor."""
        windows = np.stack([self.window(padded, ti, tj) for ti, tj in tiles])
        return torch.from_numpy(np.ascontiguousarray(windows.transpose(0, 3, 1, 2)))

    def pad_image(self, image: np.ndarray) -> np.ndarray:
        """Reflect-pad ``(H, W, C)`` so every window lies inside."""
        ty, tx = self.tiles
        after_y = ty * self.stride + self.patch - self.stride - self.pad - self.height
        after_x = tx * self.stride + self.patch - self.stride - self.pad - self.width
        return np.pad(image, ((self.pad, after_y), (self.pad, after_x), (0, 0)), mode="reflect")


def resolve_device(device: str) -> torch.device:
    """``auto`` → cuda, then mps, then cpu; anything else as given."""
    if device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        return torch.device(device)
    except RuntimeError as exc:
        raise ConfigError(
            f"unknown `--device` `{device}`: use auto, cpu, cuda, cuda:N or mps"
        ) from exc


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """``auto`` → bf16 on a GPU that has it (else fp16), fp32 on CPU."""
    table = {
        "fp32": torch.float32,
        "float32": torch.float32,
        "bf16": torch.bfloat16,
        "bfloat16": torch.bfloat16,
        "fp16": torch.float16,
        "float16": torch.float16,
    }
    if dtype == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        if device.type == "mps":
            return torch.float16
        return torch.float32
    if dtype not in table:
        raise ConfigError(f"unknown `--dtype` `{dtype}`: use auto, fp32, bf16 or fp16")
    return table[dtype]


def extract_features(
    *,
    scene: str | Path,
    backbone: str | Backbone,
    timesteps: Sequence[int],
    sites: Sequence[str],
    out: str | Path,
    patch: int | None = None,
    stride: int = 32,
    batch_size: int = 16,
    device: str = "auto",
    dtype: str = "auto",
    noise_seed: int = 0,
    class_seed: int = 0,
    class_label: int | None = None,
    truncate: bool = True,
    chunk_tiles: int | None = None,
    progress: ProgressFn | None = None,
    stop_after_chunks: int | None = None,
    stats: dict[str, Any] | None = None,
) -> Path:
    """Extract per-pixel features of a prepared scene into a (resumable) Zarr cache.

    Args:
        scene: the scene store written by ``prepare``.
        backbone: a backbone SPEC or an already loaded :class:`Backbone`.
        timesteps: diffusion timesteps, each in ``[0, num_train_timesteps)``.
        sites: feature site names (``hsicache layers`` lists them).
        out: the cache store; an unfinished one with the same inputs is resumed, a finished one
            is left as it is.
        patch: window side (default: the backbone's sample size).
        stride: window step = side of the square each window owns.
        batch_size: windows per forward pass.
        device, dtype: ``auto`` or an explicit torch device / ``fp32|bf16|fp16``. On CPU,
            ``auto`` is the faster of fp32/bf16 as measured on the first patches (see
            :mod:`pipeline.autotune`); a resumed cache keeps the dtype it was started with; an
            already loaded backbone keeps its own dtype.
        noise_seed: seed of the one ε shared by all patches.
        class_seed: seed of the per-patch class ids of a class-conditional backbone.
        class_label: give every patch this class id instead (a class-conditional backbone);
            one class for all patches avoids a per-patch offset in the features.
        truncate: stop each forward pass after the deepest requested site.
        chunk_tiles: owned squares per cache chunk side (default: the fewest that make chunks of
            about 1 MB or more, capped at the scene size).
        progress: called as ``progress(done_patches, total_patches)``.
        stop_after_chunks: testing aid: return after writing this many chunks (as if killed).
        stats: if given, filled with ``patches``, ``forward_s`` (forward passes and stitching),
            ``write_s`` and ``written_bytes`` (uncompressed) of this call, and the dtype report.

    Returns:
        ``out`` as a :class:`~pathlib.Path`.
    """
    if not timesteps:
        raise ConfigError("give at least one timestep (`--timesteps 0`)")
    if not sites:
        raise ConfigError("give at least one site (`--sites NAME`; `hsicache layers` lists them)")
    if batch_size < 1:
        raise ConfigError(f"`--batch-size` must be at least 1, got {batch_size}")
    sc = open_scene(scene)
    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev)
    if isinstance(backbone, Backbone):
        bb = backbone
        dev = next(bb.unet.parameters()).device
        dt = bb.dtype if dtype == "auto" else dt
    else:
        bb = load_backbone(backbone, device=dev, dtype=dt)
    chosen = [bb.site(s) for s in sites]
    if class_label is not None and not 0 <= class_label < (bb.num_class_embeds or 0):
        raise ConfigError(
            f"`--class-label` {class_label} needs a class-conditional backbone with classes "
            f"0..{(bb.num_class_embeds or 0) - 1}; `{bb.spec}` has "
            + (f"{bb.num_class_embeds}" if bb.num_class_embeds else "none")
        )
    n_train_t = int(bb.scheduler.config.num_train_timesteps)
    for t in timesteps:
        if not 0 <= int(t) < n_train_t:
            raise ConfigError(f"timestep {t} is out of range: the scheduler has 0..{n_train_t - 1}")
    patch = patch or bb.sample_size
    if not 0 < stride <= patch or (patch - stride) % 2:
        raise ConfigError(
            f"`--stride` {stride} must be in 1..{patch} (`--patch`) with patch - stride even"
        )
    levels = len(bb.unet.config.block_out_channels) - 1
    if patch % (2**levels):
        raise ConfigError(f"`--patch` {patch} must be a multiple of {2**levels} for this backbone")

    h, w = sc.shape
    min_channels = min(s.channels for s in chosen)
    k = chunk_tiles or 1
    while chunk_tiles is None and (k * stride) ** 2 * min_channels * 2 < _MIN_CHUNK_BYTES:
        if k * stride >= max(h, w):
            break
        k += 1
    if k < 1:
        raise ConfigError(f"`chunk_tiles` must be at least 1, got {k}")
    layout = TileLayout(height=h, width=w, patch=patch, stride=stride, chunk_tiles=k)
    padded = layout.model_input(sc.rgb)
    eps = seeded_noise((3, patch, patch), noise_seed).to(dev)
    report: dict[str, Any] = {}
    if dtype == "auto" and dev.type == "cpu" and not isinstance(backbone, Backbone):
        dt, report = _auto_cpu_dtype(bb, out, layout, padded, eps, timesteps[0], chosen, batch_size)
    identity = {
        "image_fingerprint": sc.image_fingerprint,
        "backbone": bb.spec,
        "weights_sha256": bb.weights_sha256,
        "timesteps": [int(t) for t in timesteps],
        "sites": list(sites),
        "patch": patch,
        "stride": stride,
        "noise_seed": noise_seed,
        "class_seed": class_seed,
        "class_label": class_label,
        "compute_dtype": str(dt).replace("torch.", ""),
    }
    root, done = create_or_resume(
        out,
        shape=(h, w),
        chunk=layout.chunk,
        site_channels={s.name: s.channels for s in chosen},
        timesteps=timesteps,
        identity=identity,
        attrs={
            "shape": [h, w],
            "chunk": layout.chunk,
            "site_info": {
                s.name: {"channels": s.channels, "resolution": s.resolution} for s in chosen
            },
            "backbone": bb.provenance(),
            "rendering": sc.attrs.get("rendering"),
            "package_versions": package_versions(),
            "truncated_forward": truncate,
            "compute_dtype_choice": report or {"choice": str(dt).replace("torch.", "")},
        },
    )
    if root.attrs.get("complete"):
        return Path(out)

    tally = stats if stats is not None else {}
    tally.update(patches=0, forward_s=0.0, write_s=0.0, written_bytes=0, dtype_report=report)
    total = layout.tiles[0] * layout.tiles[1]
    finished = sum(len(layout.tiles_of_chunk(i, j)) for i, j in zip(*np.nonzero(done), strict=True))
    if progress:
        progress(finished, total)

    def advance(n: int) -> None:
        nonlocal finished
        finished += n
        tally["patches"] += n
        if progress:
            progress(finished, total)

    for n_chunks, (ci, cj) in enumerate(zip(*np.nonzero(~done), strict=True), start=1):
        y0, y1, x0, x1 = layout.chunk_bounds(ci, cj)
        started = time.perf_counter()
        buffers = _extract_chunk(
            bb, layout, padded, eps, layout.tiles_of_chunk(ci, cj), (y0, y1, x0, x1), timesteps,
            chosen, batch_size=batch_size, dtype=dt, class_seed=class_seed,
            class_label=class_label, truncate=truncate,
            on_batch=advance,
        )  # fmt: skip
        written = time.perf_counter()
        for (t, name), buf in buffers.items():
            root[array_path(t, name)][y0:y1, x0:x1] = buf
            tally["written_bytes"] += buf.nbytes
        root["progress/done"][ci, cj] = True
        tally["forward_s"] += written - started
        tally["write_s"] += time.perf_counter() - written
        if stop_after_chunks is not None and n_chunks >= stop_after_chunks:
            return Path(out)
    root.attrs["complete"] = True
    return Path(out)


def _auto_cpu_dtype(
    bb: Backbone,
    out: str | Path,
    layout: TileLayout,
    padded: np.ndarray,
    eps: torch.Tensor,
    timestep: int,
    chosen: list[Site],
    batch_size: int,
) -> tuple[torch.dtype, dict[str, Any]]:
    """``dtype=auto`` on CPU: the dtype an unfinished cache was started with, else measured."""
    from pipeline.autotune import choose_cpu_dtype

    started = read_identity(out).get("compute_dtype")
    if started:
        dt = getattr(torch, started)
        report: dict[str, Any] = {"choice": started, "resumed": True}
    else:
        tiles = layout.tiles_of_chunk(0, 0)[: min(batch_size, 2)]
        x = noised(layout.batch(padded, tiles), eps, timestep, bb.scheduler)
        labels = patch_class_labels(bb, tiles, 0, device=eps.device)
        dt, report = choose_cpu_dtype(bb, x, timestep, [s.name for s in chosen], labels)
    if dt != bb.dtype:
        bb.cast(dt)
    return dt, report


def _extract_chunk(
    bb: Backbone,
    layout: TileLayout,
    padded: np.ndarray,
    eps: torch.Tensor,
    tiles: list[tuple[int, int]],
    bounds: tuple[int, int, int, int],
    timesteps: Sequence[int],
    chosen: list[Site],
    *,
    batch_size: int,
    dtype: torch.dtype,
    class_seed: int,
    class_label: int | None,
    truncate: bool,
    on_batch: Callable[[int], None],
) -> dict[tuple[int, str], np.ndarray]:
    """Features of one cache chunk: ``{(timestep, site): (y1 - y0, x1 - x0, C) float16}``."""
    y0, y1, x0, x1 = bounds
    stride = layout.stride
    buffers = {
        (t, s.name): np.empty((y1 - y0, x1 - x0, s.channels), dtype=np.float16)
        for t in timesteps
        for s in chosen
    }
    names = [s.name for s in chosen]
    for b0 in range(0, len(tiles), batch_size):
        batch = tiles[b0 : b0 + batch_size]
        x0_batch = layout.batch(padded, batch).to(eps.device)
        labels = patch_class_labels(bb, batch, class_seed, class_label, device=eps.device)
        for t in timesteps:
            xt = noised(x0_batch, eps, int(t), bb.scheduler).to(dtype)
            feats = bb.features(xt, int(t), names, class_labels=labels, truncate=truncate)
            for name in names:
                core = layout.owned_squares(feats[name])
                buf = buffers[(t, name)]
                for n, (ti, tj) in enumerate(batch):  # edge squares are clipped to the scene
                    ry, rx = ti * stride - y0, tj * stride - x0
                    hh, ww = min(stride, buf.shape[0] - ry), min(stride, buf.shape[1] - rx)
                    buf[ry : ry + hh, rx : rx + ww] = core[n, :hh, :ww]
        on_batch(len(batch))
    return buffers


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
        [int(np.random.default_rng([class_seed, ti, tj]).integers(bb.num_class_embeds))
         for ti, tj in batch],
        device=device,
    )  # fmt: skip
