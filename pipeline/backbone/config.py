"""The ``pretrain`` stage's settings: the training recipe and how it runs (torch-free)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pipeline.errors import ConfigError
from pipeline.utils.checks import check_choice, check_int, check_number, check_seed
from pipeline.utils.config import StageConfig

__all__ = ["PretrainConfig"]

_NORM_GROUPS = 8  # the UNet's group-norm groups: every width is a multiple of it


@dataclass(frozen=True)
class PretrainConfig(StageConfig):
    """How :func:`~pipeline.backbone.pretraining.pretrain` trains the backbone.

    The recipe (every field but ``device`` and ``weights_dtype``) is recorded in the output's
    ``pretrain.json`` and decides whether a checkpoint can be resumed; the defaults are the
    recipe of hsicache's shipped ``natural-s``.

    Attributes:
        block_out_channels: UNet widths per level (multiples of 8; 1 to 6 levels).
        layers_per_block: residual blocks per level.
        attention: self-attention in the deepest level.
        sample_size: the patch side ``extract`` uses with this backbone.
        crop: training crop side in pixels.
        scales: the photographs' scales crops are cut from, each in (0, 1].
        batch_size: crops per step.
        steps: optimisation steps.
        learning_rate: AdamW's peak rate (linear warm-up, then cosine decay).
        warmup: warm-up steps.
        ema: decay of the weights' exponential moving average (what is saved).
        seed: seed of the initialisation and of the crops.
        holdout: photographs kept out of training, for the held-out denoising loss.
        checkpoint_every: steps between checkpoints (what a killed run resumes from).
        eval_crops: held-out crops the loss is measured on.
        device: ``auto`` (cuda > mps > cpu) or a torch device.
        weights_dtype: ``fp32`` or ``fp16``: the dtype the weights are saved in (training
            always runs in fp32; the shipped backbone is fp16).
    """

    section = "pretrain"
    #: Fields that say how the recipe runs, not what it learns.
    RUN_FIELDS = ("device", "weights_dtype")

    block_out_channels: tuple[int, ...] = (32, 64, 128)
    layers_per_block: int = 1
    attention: bool = True
    sample_size: int = 64
    crop: int = 32
    scales: tuple[float, ...] = (1.0, 0.5, 0.25)
    batch_size: int = 16
    steps: int = 2000
    learning_rate: float = 5e-4
    warmup: int = 100
    ema: float = 0.995
    seed: int = 0
    holdout: tuple[str, ...] = ("chelsea",)
    checkpoint_every: int = 250
    eval_crops: int = 64
    device: str = "auto"
    weights_dtype: str = "fp32"

    def _check(self) -> None:
        """Every setting in range, and the widths a UNet with 8 norm groups can have."""
        self._check_widths()
        step = 2 ** (len(self.block_out_channels) - 1)
        for name in ("crop", "sample_size"):
            if check_int(name, getattr(self, name), low=step) % step:
                raise ConfigError(
                    f"`{name}={getattr(self, name)}` must be a multiple of {step} for "
                    f"{len(self.block_out_channels)} levels"
                )
        for name in ("layers_per_block", "batch_size", "steps", "checkpoint_every", "eval_crops"):
            check_int(name, getattr(self, name), low=1)
        check_int("warmup", self.warmup, low=0)
        check_seed("seed", self.seed)
        check_number("learning_rate", self.learning_rate, low=0, low_open=True)
        check_number("ema", self.ema, low=0, high=1, high_open=True)
        if not self.scales:
            raise ConfigError("`scales` must list one or more scales in (0, 1]")
        for v in self.scales:
            check_number("scales", v, low=0, high=1, low_open=True)
        check_choice("weights_dtype", self.weights_dtype, ("fp32", "fp16"))

    def _check_widths(self) -> None:
        chans = self.block_out_channels
        if not 1 <= len(chans) <= 6:
            raise ConfigError(f"`block_out_channels` must list 1 to 6 widths, got {list(chans)}")
        for c in chans:
            check_int("block_out_channels", c, low=8)
            if c % _NORM_GROUPS:
                raise ConfigError(
                    f"`block_out_channels` {list(chans)}: every width must be a multiple of "
                    f"{_NORM_GROUPS} (the UNet's group-norm groups), {c} is not"
                )

    def recipe(self) -> dict[str, Any]:
        """What the backbone learns from (recorded, and compared on resume)."""
        return {k: v for k, v in self.to_dict().items() if k not in self.RUN_FIELDS}

    def unet_kwargs(self) -> dict[str, Any]:
        """``UNet2DModel``'s arguments."""
        chans = tuple(int(c) for c in self.block_out_channels)
        deepest = "AttnDownBlock2D" if self.attention else "DownBlock2D"
        return {
            "sample_size": int(self.sample_size),
            "in_channels": 3,
            "out_channels": 3,
            "layers_per_block": int(self.layers_per_block),
            "block_out_channels": chans,
            "down_block_types": ("DownBlock2D",) * (len(chans) - 1) + (deepest,),
            "up_block_types": (deepest.replace("Down", "Up"),) + ("UpBlock2D",) * (len(chans) - 1),
            "norm_num_groups": _NORM_GROUPS,
            "attention_head_dim": min(32, chans[-1]),
        }
