"""The ``prepare`` stage's settings: how the scene is checked, split and rendered."""

from __future__ import annotations

from dataclasses import dataclass

from pipeline.utils.checks import check_choice
from pipeline.utils.config import StageConfig

__all__ = ["NAN_POLICIES", "PrepareConfig"]

#: What ``nan_policy`` takes: refuse NaN/inf, or fill them with 0 or the band's mean.
NAN_POLICIES = ("error", "zero", "band-mean")


@dataclass(frozen=True)
class PrepareConfig(StageConfig):
    """How :func:`~pipeline.scene.preparation.prepare` splits and renders a scene (the scene's
    files themselves are its inputs).

    Attributes:
        split: ``official`` (the masks), ``per-class``, ``fraction`` or ``blocks``
            (``None``: official when masks are given, else per-class).
        per_class: train pixels per class (per-class; blocks, when ``fraction`` is unset).
        fraction: fraction of each class for train (fraction, blocks).
        small_classes: ``error``, or ``take-all``: a class with too few pixels gives all.
        block_size: block side in pixels (blocks).
        buffer: test pixels closer than this to a train block are dropped (blocks).
        seed: seed of the split (and of the synthetic scene).
        rgb_mode: ``bands``, ``wavelengths`` or ``pca`` (``None``: bands when ``rgb_bands``
            is given, else wavelengths when known, else pca).
        rgb_bands: 0-based R, G, B band indices.
        gamma: gamma applied after the stretch.
        clip_low, clip_high: the stretch's percentiles.
        nan_policy: NaN/inf in the cube: one of :data:`NAN_POLICIES`.
        allow_degenerate: prepare a scene with one class, no test pixel or a constant cube
            or rendering anyway.
    """

    section = "prepare"

    split: str | None = None
    per_class: int | None = 5
    fraction: float | None = None
    small_classes: str = "error"
    block_size: int = 16
    buffer: int = 0
    seed: int = 0
    rgb_mode: str | None = None
    rgb_bands: tuple[int, ...] | None = None
    gamma: float = 1.0
    clip_low: float = 2.0
    clip_high: float = 98.0
    nan_policy: str = "error"
    allow_degenerate: bool = False

    @property
    def clip(self) -> tuple[float, float]:
        """The stretch's percentiles, low and high."""
        return self.clip_low, self.clip_high

    def _check(self) -> None:
        from pipeline.scene.render import check_rendering_options
        from pipeline.scene.splits import check_split_options

        check_split_options(
            self.split,
            self.per_class,
            self.fraction,
            self.small_classes,
            self.block_size,
            self.buffer,
            self.seed,
        )
        check_rendering_options(self.rgb_mode, self.rgb_bands, self.gamma, self.clip)
        check_choice("nan_policy", self.nan_policy, NAN_POLICIES)
