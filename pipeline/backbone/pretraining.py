"""``pretrain``: train hsicache's own natural-image diffusion backbone, offline.

Pretrained diffusion weights cannot be downloaded here, so hsicache trains a small diffusers
``UNet2DModel`` with a ``DDPMScheduler`` (ε-prediction, AdamW with warm-up, EMA of the weights)
on random crops (random scale, flips) of natural photographs that ship inside its dependencies:
scikit-image's ``skimage.data`` photographs and scikit-learn's sample images. ``images`` adds
any folder of JPEG/PNG photographs, ``scene`` the scene's own unlabeled 3-band rendering.

Output: a folder that ``extract`` accepts as a backbone::

    BACKBONE/
      unet/                 save_pretrained of the EMA weights (config.json + safetensors)
      scheduler/            scheduler_config.json
      train_log.csv         step, loss, learning rate
      pretrain.json         configuration, images, held-out denoising losses before and after

Training is resumable: state is checkpointed to ``BACKBONE.partial/`` every
``checkpoint_every`` steps, an interrupted run continues from there, and the final folder
appears only when training has finished.
"""

from __future__ import annotations

import csv
import io
import json
import math
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline.backbone.config import PretrainConfig
from pipeline.errors import ConfigError, SceneFormatError, SceneNotFoundError
from pipeline.io.outputs import BACKBONE, check_outputs
from pipeline.io.store import (
    as_os_error,
    atomic_output,
    jsonable,
    package_versions,
    umask_modes,
)

__all__ = ["BUILTIN_PHOTOS", "load_photos", "pretrain"]

#: The photographs bundled with scikit-image and scikit-learn (no download) used by default:
#: only those whose licence, as the package states it, allows shipping what is learned from
#: them (CC0, public domain, CC BY with attribution). name -> (source, licence, attribution).
PHOTO_LICENCES: dict[str, tuple[str, str, str]] = {
    "astronaut": ("skimage.data.astronaut", "public domain", "Eileen Collins, NASA"),
    "coffee": ("skimage.data.coffee", "CC0", "Rachel Michetti, courtesy of Pikolo Espresso Bar"),
    "chelsea": ("skimage.data.chelsea", "CC0", "Stefan van der Walt"),
    "rocket": ("skimage.data.rocket", "public domain", "SpaceX"),
    "grass": ("skimage.data.grass", "CC0", "linolafett (DeviantArt, Grass-01)"),
    "gravel": ("skimage.data.gravel", "CC0", "CC0Textures, Gravel04"),
    "brick": ("skimage.data.brick", "CC0", "CC0Textures, Bricks25"),
    "camera": ("skimage.data.camera", "CC0", "Lav Varshney"),
    "clock": ("skimage.data.clock", "public domain", "Stefan van der Walt"),
    "hubble_deep_field": ("skimage.data.hubble_deep_field", "public domain", "NASA, HubbleSite"),
    "retina": ("skimage.data.retina", "CC0 1.0", "Mikael Häggström (Wikimedia Commons)"),
    "china": (
        "sklearn.datasets.load_sample_images",
        "CC BY 2.0",
        "danielbuechele, flickr.com/photos/danielbuechele/6061409035",
    ),
    "flower": (
        "sklearn.datasets.load_sample_images",
        "CC BY 2.0",
        "vultilion, flickr.com/photos/vultilion/6056698931 (scikit-learn's README "
        "credits danielbuechele; its link names vultilion)",
    ),
}
BUILTIN_PHOTOS = tuple(n for n, (src, _, _) in PHOTO_LICENCES.items() if src.startswith("skimage"))
_SKLEARN_PHOTOS = ("china", "flower")
_PHOTO_SUFFIXES = (".jpg", ".jpeg", ".png", ".tif", ".tiff", ".bmp")


BACKBONE_FORMAT = "hsicache-backbone/1"
_CHECKPOINT_FILES = ("checkpoint.pt", "checkpoint.pt.tmp")


def _check_partial(partial: Path) -> None:
    """The checkpoint folder beside the output may hold only pretrain's own checkpoint."""
    from pipeline.errors import OutputConflictError
    from pipeline.io.outputs import describe

    if not partial.exists() and not partial.is_symlink():
        return
    if partial.is_dir() and all(p.name in _CHECKPOINT_FILES for p in partial.iterdir()):
        return
    raise OutputConflictError(
        f"`{partial}` (where pretrain keeps its checkpoint, beside `out`) holds "
        f"{describe(partial)}: hsicache replaces only its own files; move that away first"
    )


def _to_rgb(image: np.ndarray) -> np.ndarray:
    a = np.asarray(image)
    if a.dtype == bool:
        a = a.astype(np.float32)
    elif np.issubdtype(a.dtype, np.integer):
        a = a.astype(np.float32) / float(np.iinfo(a.dtype).max)
    a = a.astype(np.float32)
    if a.ndim == 2:
        a = np.repeat(a[..., None], 3, axis=-1)
    return np.clip(a[..., :3], 0.0, 1.0)


def load_photos(
    images: str | Path | None = None,
    scene: str | Path | None = None,
    builtin: bool = True,
) -> dict[str, np.ndarray]:
    """Training photographs as ``name -> (H, W, 3) float32 in [0, 1]``.

    Args:
        images: a folder of JPEG/PNG/TIFF photographs (searched recursively).
        scene: a scene store whose rendering is added as one more (unlabeled) image.
        builtin: include the photographs bundled with scikit-image and scikit-learn.
    """
    photos = _builtin_photos() if builtin else {}
    if images is not None:
        photos.update(_folder_photos(Path(images)))
    if scene is not None:
        from pipeline.scene.core import open_scene

        photos["scene"] = np.asarray(open_scene(scene).rgb, dtype=np.float32)
    if not photos:
        raise ConfigError("no training images: keep `builtin_photos` or give `images`")
    return photos


def _builtin_photos() -> dict[str, np.ndarray]:
    """The photographs bundled with scikit-image and scikit-learn."""
    import skimage.data
    from sklearn.datasets import load_sample_images

    photos = {}
    for name in BUILTIN_PHOTOS:
        img = getattr(skimage.data, name)()
        photos[name] = _to_rgb(img[0] if isinstance(img, tuple) else img)
    sample = load_sample_images()
    for name, img in zip(_SKLEARN_PHOTOS, sample.images, strict=True):
        photos[name] = _to_rgb(img)
    return photos


def _folder_photos(folder: Path) -> dict[str, np.ndarray]:
    """Every JPEG/PNG/TIFF under ``folder``, named ``folder/relative/path``."""
    from skimage.io import imread

    if folder.is_file():
        raise SceneFormatError(f"image folder `{folder}` is a file: give the folder that holds it")
    if not folder.is_dir():
        raise SceneNotFoundError(f"image folder `{folder}` does not exist")
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in _PHOTO_SUFFIXES)
    if not files:
        raise SceneFormatError(f"image folder `{folder}` holds no JPEG/PNG/TIFF photographs")
    photos = {}
    for f in files:
        try:
            photos[f"{folder.name}/{f.relative_to(folder)}"] = _to_rgb(imread(f))
        except Exception as exc:
            raise SceneFormatError(f"{f}: cannot read as an image ({exc})") from None
    return photos


def _pyramids(
    photos: dict[str, np.ndarray], scales: Sequence[float], crop: int
) -> list[np.ndarray]:
    """Each photo at each scale (area-averaged), keeping those at least one crop large."""
    from skimage.transform import rescale

    out = []
    for img in photos.values():
        for s in scales:
            scaled = img if s == 1.0 else rescale(img, s, channel_axis=-1, anti_aliasing=True)
            if min(scaled.shape[:2]) >= crop:
                out.append(np.ascontiguousarray(scaled, dtype=np.float32))
    return out


def _crops(levels: list[np.ndarray], n: int, crop: int, rng: np.random.Generator) -> np.ndarray:
    """``n`` random crops (random level, position, flips): ``(n, 3, crop, crop)`` in [-1, 1]."""
    weights = np.array([lv.shape[0] * lv.shape[1] for lv in levels], dtype=np.float64)
    picks = rng.choice(len(levels), size=n, p=weights / weights.sum())
    batch = np.empty((n, crop, crop, 3), dtype=np.float32)
    for k, i in enumerate(picks):
        lv = levels[i]
        y = rng.integers(0, lv.shape[0] - crop + 1)
        x = rng.integers(0, lv.shape[1] - crop + 1)
        c = lv[y : y + crop, x : x + crop]
        if rng.random() < 0.5:
            c = c[:, ::-1]
        if rng.random() < 0.5:
            c = c[::-1]
        batch[k] = c
    return batch.transpose(0, 3, 1, 2) * 2.0 - 1.0


def _heldout_loss(unet: Any, scheduler: Any, x0: torch.Tensor, t_max: int, seed: int) -> float:
    """Mean ε-prediction MSE on fixed held-out crops, timesteps uniform in ``[0, t_max)``."""
    gen = torch.Generator().manual_seed(seed)
    t = torch.randint(0, t_max, (x0.shape[0],), generator=gen)
    eps = torch.randn(x0.shape, generator=gen)
    dev = next(unet.parameters()).device
    losses = []
    with torch.inference_mode():
        for i in range(0, x0.shape[0], 32):
            xt = scheduler.add_noise(x0[i : i + 32], eps[i : i + 32], t[i : i + 32]).to(dev)
            pred = unet(xt, t[i : i + 32].to(dev)).sample
            losses.append(float(((pred.cpu() - eps[i : i + 32]) ** 2).mean()) * len(pred))
    return sum(losses) / x0.shape[0]


@dataclass
class _Data:
    """Training crops' pyramids, fixed held-out crops, and which photos went where."""

    levels: list[np.ndarray]
    eval_x0: torch.Tensor
    train_names: list[str]
    holdout: list[str]


def _training_data(
    cfg: PretrainConfig, images: str | Path | None, scene: str | Path | None, builtin: bool
) -> _Data:
    photos = load_photos(images, scene, builtin)
    holdout = [n for n in cfg.holdout if n in photos]
    train_photos = {n: p for n, p in photos.items() if n not in holdout}
    if not train_photos:
        raise ConfigError("every training image is held out: shorten `holdout`")
    crop = int(cfg.crop)
    levels = _pyramids(train_photos, cfg.scales, crop)
    if not levels:
        raise ConfigError(f"no training image is at least {crop} pixels on each side")
    eval_levels = _pyramids({n: photos[n] for n in holdout}, cfg.scales, crop) or levels
    eval_x0 = torch.from_numpy(
        _crops(eval_levels, int(cfg.eval_crops), crop, np.random.default_rng(10_000))
    )
    return _Data(levels, eval_x0, sorted(train_photos), holdout)


class _Run:
    """One pretraining: the UNet, its optimiser, schedules, EMA and RNGs, checkpointed in
    ``partial`` so a killed run resumes exactly where it stopped."""

    def __init__(self, cfg: PretrainConfig, data: _Data, dev: torch.device, partial: Path):
        from diffusers import DDPMScheduler, UNet2DModel
        from diffusers.training_utils import EMAModel

        self.cfg, self.data, self.dev, self.partial = cfg, data, dev, partial
        torch.manual_seed(int(cfg.seed))
        self.unet = UNet2DModel(**cfg.unet_kwargs()).to(dev)
        self.scheduler = DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear")
        self.before = self.heldout()
        lr, decay = float(cfg.learning_rate), float(cfg.ema)
        self.opt = torch.optim.AdamW(self.unet.parameters(), lr=lr, weight_decay=1e-4)
        self.ema = EMAModel(self.unet.parameters(), decay=decay)
        self.steps, self.warmup = int(cfg.steps), int(cfg.warmup)
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, self._lr_at)
        self.start, self.log = 0, []
        self.rng = np.random.default_rng(int(cfg.seed))
        self.fingerprint = jsonable({"config": cfg.recipe(), "images": data.train_names})

    def _lr_at(self, step: int) -> float:
        if step < self.warmup:
            return (step + 1) / self.warmup
        span = max(1, self.steps - self.warmup)
        return 0.5 * (1 + math.cos(math.pi * (step - self.warmup) / span))

    def heldout(self) -> dict[str, float]:
        x0 = self.data.eval_x0
        return {
            "t<100": _heldout_loss(self.unet, self.scheduler, x0, 100, 1),
            "all_t": _heldout_loss(self.unet, self.scheduler, x0, 1000, 2),
        }

    def _state(self) -> dict[str, Any]:
        return {"unet": self.unet, "opt": self.opt, "sched": self.sched, "ema": self.ema}

    def resume(self) -> None:
        """Continue from the checkpoint when it is of this recipe; else start afresh."""
        ckpt = self.partial / "checkpoint.pt"
        if ckpt.is_file():
            state = torch.load(ckpt, map_location="cpu", weights_only=False)
            if state.get("fingerprint") == self.fingerprint:
                for name, part in self._state().items():
                    part.load_state_dict(state[name])
                self.start, self.log, self.before = state["step"], state["log"], state["before"]
                torch.set_rng_state(state["torch_rng"])
                self.rng.bit_generator.state = state["np_rng"]
            else:
                shutil.rmtree(self.partial)
        self.partial.mkdir(parents=True, exist_ok=True)

    def save(self, step: int) -> None:
        state = {name: part.state_dict() for name, part in self._state().items()}
        state.update(
            fingerprint=self.fingerprint,
            step=step,
            log=self.log,
            before=self.before,
            torch_rng=torch.get_rng_state(),
            np_rng=self.rng.bit_generator.state,
        )
        buffer = io.BytesIO()  # torch reports a failed write (a full disk) as no OSError
        torch.save(state, buffer)
        tmp = self.partial / "checkpoint.pt.tmp"
        try:
            tmp.write_bytes(buffer.getbuffer())
        except OSError as exc:
            tmp.unlink(missing_ok=True)
            raise OSError(exc.errno, exc.strerror, str(self.partial)) from exc
        tmp.replace(self.partial / "checkpoint.pt")

    def train(self, progress: Callable[..., None] | None) -> None:
        """Every step left, checkpointed as it goes; then the EMA weights, ready to save."""
        running = None
        self.unet.train()
        for step in range(self.start, self.steps):
            value = self.step(step)
            if not math.isfinite(value):  # nothing worth resuming: its checkpoints go too
                shutil.rmtree(self.partial, ignore_errors=True)
                raise ConfigError(
                    f"training diverged: the loss was {value} at step {step + 1}; lower "
                    f"`learning_rate` (now {self.cfg.learning_rate:g})"
                )
            running = value if running is None else 0.98 * running + 0.02 * value
            if progress:
                progress(step + 1, self.steps, f"loss {running:.4f}")
            self.step_done(step + 1)
        self.ema.copy_to(self.unet.parameters())
        self.unet.eval()

    def step_done(self, done: int) -> None:
        """``done`` steps are done: checkpoint every ``checkpoint_every`` and at the end."""
        if done % self.cfg.checkpoint_every == 0 or done == self.steps:
            self.save(done)

    def step(self, step: int) -> float:
        """One optimiser step on a fresh batch of crops; its loss."""
        crop, batch = int(self.cfg.crop), int(self.cfg.batch_size)
        x0 = torch.from_numpy(_crops(self.data.levels, batch, crop, self.rng)).to(self.dev)
        t = torch.randint(0, 1000, (x0.shape[0],)).to(self.dev)
        eps = torch.randn_like(x0)
        noisy = self.scheduler.add_noise(x0, eps, t)
        loss = torch.nn.functional.mse_loss(self.unet(noisy, t).sample, eps)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.unet.parameters(), 1.0)
        self.opt.step()
        self.sched.step()
        self.ema.step(self.unet.parameters())
        value = float(loss.detach())
        self.log.append([step + 1, value, self.sched.get_last_lr()[0]])
        return value


def pretrain(
    out: str | Path,
    config: PretrainConfig | None = None,
    *,
    images: str | Path | None = None,
    scene: str | Path | None = None,
    builtin_photos: bool = True,
    shipped: str | None = None,
    progress: Callable[..., None] | None = None,
    **settings: Any,
) -> dict[str, Any]:
    """Train the backbone and write it to ``out`` (see the module docstring).

    Args:
        out: the backbone folder to write.
        config: the recipe and how it runs (:class:`~pipeline.backbone.config.PretrainConfig`;
            its defaults finish in about 11 minutes on two CPU cores with AVX-512).
        images, scene, builtin_photos: the training images (see :func:`load_photos`).
        shipped: instead of training, write hsicache's shipped backbone of this name
            (``natural-s``: trained by this function with the recipe in its ``pretrain.json``),
            what ``dvc repro`` does by default.
        progress: called as ``progress(step, steps, note)`` with the running loss.
        **settings: :class:`PretrainConfig` fields, given directly or overriding ``config``'s.

    Returns:
        The summary also written to ``pretrain.json`` (held-out losses before and after).
    """
    from pipeline.utils.devices import resolve_device

    cfg = config.replace(**settings) if config is not None else PretrainConfig(**settings)
    out = Path(out)
    check_outputs({"out": (out, BACKBONE)}, {"images": images, "scene": scene})
    if shipped is not None:
        return _write_shipped(shipped, out)
    partial = out.with_name(out.name + ".partial")
    _check_partial(partial)
    dev = resolve_device(cfg.device)
    run = _Run(cfg, _training_data(cfg, images, scene, builtin_photos), dev, partial)
    run.resume()
    started = time.perf_counter()
    run.train(progress)
    summary = _summary(run, time.perf_counter() - started, cfg.weights_dtype)
    _write_backbone(out, run, summary, cfg.weights_dtype)
    shutil.rmtree(partial, ignore_errors=True)
    return summary


def _summary(run: _Run, seconds: float, weights_dtype: str) -> dict[str, Any]:
    return {
        "format": BACKBONE_FORMAT,
        "config": run.cfg.recipe(),
        "train_images": run.data.train_names,
        "holdout_images": run.data.holdout,
        "parameters": sum(p.numel() for p in run.unet.parameters()),
        "heldout_loss_untrained": run.before,
        "heldout_loss_trained": run.heldout(),
        "seconds_this_run": seconds,
        "device": str(run.dev),
        "package_versions": package_versions(),
        "weights_dtype": weights_dtype,
    }


def _write_backbone(out: Path, run: _Run, summary: dict[str, Any], weights_dtype: str) -> None:
    """The diffusers folders, the training log, ``pretrain.json`` and the photos' credits."""
    from pipeline.backbone.loading import _quietly

    with atomic_output(out, BACKBONE, option="out") as tmp:
        dtype = torch.float16 if weights_dtype == "fp16" else torch.float32
        _quietly(run.unet.to, "cpu", dtype=dtype)
        try:
            run.unet.save_pretrained(tmp / "unet")
        except Exception as exc:  # safetensors reports a full disk as its own error
            raise as_os_error(exc, out) from exc
        run.scheduler.save_pretrained(tmp / "scheduler")
        with open(tmp / "train_log.csv", "w", newline="") as fh:
            writer = csv.writer(fh)
            writer.writerow(["step", "loss", "lr"])
            writer.writerows(run.log)
        (tmp / "pretrain.json").write_text(json.dumps(jsonable(summary), indent=2))
        credits = attribution(summary["train_images"] + summary["holdout_images"])
        if credits:
            (tmp / "ATTRIBUTION.md").write_text(credits)
        umask_modes(tmp)


def attribution(names: Sequence[str]) -> str:
    """The credits of the built-in photographs among ``names``, as Markdown ('' if none)."""
    used = [n for n in names if n in PHOTO_LICENCES]
    if not used:
        return ""
    lines = [
        "# Photographs this backbone was trained on",
        "",
        "Weights learned from these photographs, each under the licence its package states:",
        "",
        "| photograph | from | licence | credit |",
        "|---|---|---|---|",
    ]
    for name in used:
        source, licence, credit = PHOTO_LICENCES[name]
        lines.append(f"| {name} | `{source}` | {licence} | {credit} |")
    others = [n for n in names if n not in PHOTO_LICENCES]
    if others:
        lines += ["", f"And {len(others)} other image(s) given to `hsicache pretrain`."]
    return "\n".join(lines) + "\n"


def _write_shipped(name: str, out: Path) -> dict[str, Any]:
    """Copy the shipped backbone ``name`` to ``out``, as ``pretrain`` would have written it."""
    from pipeline.backbone.loading import shipped_backbones

    found = shipped_backbones()
    if name not in found:
        raise ConfigError(
            f"unknown shipped backbone `shipped={name}`: hsicache ships "
            + (", ".join(found) or "none in this installation")
        )
    with atomic_output(out, BACKBONE, option="out") as tmp:
        shutil.copytree(found[name], tmp)
    summary = json.loads((out / "pretrain.json").read_text())
    return {**summary, "shipped": name}
