"""Convert an original OpenAI guided-diffusion (ADM) checkpoint into a diffusers ``UNet2DModel``.

The released checkpoints (``64x64_diffusion.pt``, ``256x256_diffusion_uncond.pt``, …) are bare
``state_dict`` files. The architecture is read from the tensors themselves (width, channel
multipliers, residual blocks per level, attention levels, classes, learned sigma, scale-shift
norm). Two facts are *not* in the tensors and come from the file's name (the released
checkpoints are known) or from a JSON side-car ``NAME.pt.json`` / ``NAME.json`` holding the
guided-diffusion flags:

* ``num_head_channels`` (64 in every released model with a fixed head width), and
* ``use_new_attention_order``: the 64x64 model stores ``qkv`` as ``(3, heads, ch)`` ("new"),
  the others as ``(heads, 3, ch)`` ("legacy");

plus ``noise_schedule`` (``cosine`` for 64x64, ``linear`` otherwise) for the scheduler.

The conversion is exact: every tensor of the checkpoint is consumed and every parameter of the
diffusers model is filled, or :class:`~pipeline.errors.ConfigError` says which are not.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import torch

from pipeline.errors import ConfigError, SceneFormatError, SceneNotFoundError

__all__ = ["ADM_PRESETS", "AdmArchitecture", "convert_adm_state_dict", "load_adm_checkpoint"]

#: guided-diffusion flags of the released checkpoints that the tensors do not reveal.
ADM_PRESETS: dict[str, dict[str, Any]] = {
    "64x64_diffusion.pt": {
        "num_head_channels": 64,
        "use_new_attention_order": True,
        "noise_schedule": "cosine",
    },
    "256x256_diffusion_uncond.pt": {
        "num_head_channels": 64,
        "use_new_attention_order": False,
        "noise_schedule": "linear",
    },
    "256x256_diffusion.pt": {
        "num_head_channels": 64,
        "use_new_attention_order": False,
        "noise_schedule": "linear",
    },
}

_FLAG_TYPES = {
    "num_head_channels": int,
    "use_new_attention_order": bool,
    "noise_schedule": str,
    "image_size": int,
}


class AdmArchitecture:
    """The ADM hyper-parameters recovered from a state dict (plus the side-car flags).

    Attributes:
        model_channels, channel_mult, num_res_blocks, attention_levels, in_channels,
        out_channels, num_classes, scale_shift, num_head_channels, new_attention_order,
        image_size, noise_schedule.
    """

    def __init__(self, state: dict[str, torch.Tensor], flags: dict[str, Any]) -> None:
        try:
            conv_in = state["input_blocks.0.0.weight"]
            self.out_channels = int(state["out.2.weight"].shape[0])
        except KeyError as exc:
            raise ConfigError(f"not a guided-diffusion UNet state dict: no tensor {exc}") from None
        self.model_channels = int(conv_in.shape[0])
        self.in_channels = int(conv_in.shape[1])
        label = state.get("label_emb.weight")
        self.num_classes = None if label is None else int(label.shape[0])

        n_out = 1 + max(_indices(state, "output_blocks"))
        # an output block ending a level (all but the last) holds an up-sampling ResBlock after
        # its ResBlock (and attention): the first one sits at index num_res_blocks
        ups = [k for k in range(n_out) if _ends_in_upsampler(state, f"output_blocks.{k}")]
        if not ups:
            raise ConfigError("guided-diffusion checkpoint without up-sampling ResBlocks")
        if any(f"output_blocks.{k}.1.conv.weight" in state for k in range(n_out)):
            raise ConfigError(
                "only guided-diffusion checkpoints with resblock_updown=True are supported "
                "(every released ADM model)"
            )
        self.num_res_blocks = ups[0]
        levels, rem = divmod(n_out, self.num_res_blocks + 1)
        if rem:
            raise ConfigError(f"{n_out} output blocks do not split into levels")
        mult, attn = [], []
        for level in range(levels):  # output level 0 is the deepest
            k = level * (self.num_res_blocks + 1)
            ch = int(state[f"output_blocks.{k}.0.out_layers.3.weight"].shape[0])
            mult.append(ch // self.model_channels)
            attn.append(f"output_blocks.{k}.1.qkv.weight" in state)
        self.channel_mult = tuple(reversed(mult))
        self.attention_levels = tuple(reversed(attn))
        emb = state["output_blocks.0.0.emb_layers.1.weight"].shape[0]
        self.scale_shift = emb == 2 * mult[0] * self.model_channels

        self.num_head_channels = int(flags.get("num_head_channels", -1))
        if self.num_head_channels <= 0:
            raise ConfigError(
                "this checkpoint needs `num_head_channels` (fixed attention head width) in its "
                "side-car JSON; per-level head counts (num_heads) cannot be expressed in diffusers"
            )
        self.new_attention_order = bool(flags.get("use_new_attention_order", False))
        self.noise_schedule = str(flags.get("noise_schedule", "linear"))
        if self.noise_schedule not in ("linear", "cosine"):
            raise ConfigError(f"noise_schedule must be linear or cosine, not {self.noise_schedule}")
        self.image_size = int(flags.get("image_size", 0)) or None

    def unet_config(self) -> dict[str, Any]:
        """Keyword arguments of the equivalent ``UNet2DModel``."""
        levels = len(self.channel_mult)
        down = [
            "AttnDownBlock2D" if a else "ResnetDownsampleBlock2D" for a in self.attention_levels
        ]
        up = [
            "AttnUpBlock2D" if a else "ResnetUpsampleBlock2D"
            for a in reversed(self.attention_levels)
        ]
        config: dict[str, Any] = {
            "in_channels": self.in_channels,
            "out_channels": self.out_channels,
            "layers_per_block": self.num_res_blocks,
            "block_out_channels": tuple(m * self.model_channels for m in self.channel_mult),
            "down_block_types": tuple(down),
            "up_block_types": tuple(up),
            "attention_head_dim": self.num_head_channels,
            "norm_num_groups": 32,
            "attn_norm_num_groups": 32,
            "resnet_time_scale_shift": "scale_shift" if self.scale_shift else "default",
            "downsample_type": "resnet",
            "upsample_type": "resnet",
            "flip_sin_to_cos": True,
            "freq_shift": 0,
        }
        if self.image_size:
            config["sample_size"] = self.image_size
        else:  # the deepest level is 8x8 in every released model
            config["sample_size"] = 8 * 2 ** (levels - 1)
        if self.num_classes:
            config["num_class_embeds"] = self.num_classes
        return config

    def scheduler_config(self) -> dict[str, Any]:
        """Keyword arguments of the matching ``DDPMScheduler``."""
        return {
            "num_train_timesteps": 1000,
            "beta_schedule": "squaredcos_cap_v2" if self.noise_schedule == "cosine" else "linear",
            "variance_type": "learned_range"
            if self.out_channels == 2 * self.in_channels
            else "fixed_small",
        }


def _indices(state: dict[str, torch.Tensor], prefix: str) -> set[int]:
    pattern = re.compile(rf"^{re.escape(prefix)}\.(\d+)\.")
    return {int(m.group(1)) for key in state if (m := pattern.match(key))}


def _ends_in_upsampler(state: dict[str, torch.Tensor], block: str) -> bool:
    """Whether output block ``block`` ends in a ResBlock after its first one: the up-sampler."""
    last = max(_indices(state, block), default=0)
    return last > 0 and f"{block}.{last}.in_layers.0.weight" in state


def _resblock_map(src: str, dst: str) -> dict[str, str]:
    names = {
        "in_layers.0": "norm1",
        "in_layers.2": "conv1",
        "emb_layers.1": "time_emb_proj",
        "out_layers.0": "norm2",
        "out_layers.3": "conv2",
        "skip_connection": "conv_shortcut",
    }
    return {
        f"{src}.{a}.{p}": f"{dst}.{b}.{p}" for a, b in names.items() for p in ("weight", "bias")
    }


class _Converter:
    def __init__(self, state: dict[str, torch.Tensor], arch: AdmArchitecture) -> None:
        self.state = state
        self.arch = arch
        self.out: dict[str, torch.Tensor] = {}
        self.used: set[str] = set()

    def take(self, src: str) -> torch.Tensor:
        self.used.add(src)
        return self.state[src]

    def copy(self, mapping: dict[str, str]) -> None:
        for src, dst in mapping.items():
            if src in self.state:
                self.out[dst] = self.take(src)

    def resblock(self, src: str, dst: str) -> None:
        self.copy(_resblock_map(src, dst))

    def attention(self, src: str, dst: str) -> None:
        self.copy({f"{src}.norm.{p}": f"{dst}.group_norm.{p}" for p in ("weight", "bias")})
        w = self.take(f"{src}.qkv.weight")[..., 0]  # conv1d kernel 1 -> linear
        b = self.take(f"{src}.qkv.bias")
        channels = w.shape[1]
        heads = channels // self.arch.num_head_channels
        if self.arch.new_attention_order:  # (3, heads, ch): q, k, v are contiguous thirds
            ws, bs = w.reshape(3, channels, channels), b.reshape(3, channels)
        else:  # legacy (heads, 3, ch): q, k, v interleaved per head
            ws = w.reshape(heads, 3, -1, channels).transpose(0, 1).reshape(3, channels, channels)
            bs = b.reshape(heads, 3, -1).transpose(0, 1).reshape(3, channels)
        for i, name in enumerate(("to_q", "to_k", "to_v")):
            self.out[f"{dst}.{name}.weight"] = ws[i].contiguous()
            self.out[f"{dst}.{name}.bias"] = bs[i].contiguous()
        self.out[f"{dst}.to_out.0.weight"] = self.take(f"{src}.proj_out.weight")[..., 0]
        self.out[f"{dst}.to_out.0.bias"] = self.take(f"{src}.proj_out.bias")

    def run(self) -> dict[str, torch.Tensor]:
        arch = self.arch
        self.copy(
            {
                "input_blocks.0.0.weight": "conv_in.weight",
                "input_blocks.0.0.bias": "conv_in.bias",
                "time_embed.0.weight": "time_embedding.linear_1.weight",
                "time_embed.0.bias": "time_embedding.linear_1.bias",
                "time_embed.2.weight": "time_embedding.linear_2.weight",
                "time_embed.2.bias": "time_embedding.linear_2.bias",
                "label_emb.weight": "class_embedding.weight",
                "out.0.weight": "conv_norm_out.weight",
                "out.0.bias": "conv_norm_out.bias",
                "out.2.weight": "conv_out.weight",
                "out.2.bias": "conv_out.bias",
            }
        )
        levels = len(arch.channel_mult)
        k = 1
        for level, has_attn in enumerate(arch.attention_levels):
            for j in range(arch.num_res_blocks):
                self.resblock(f"input_blocks.{k}.0", f"down_blocks.{level}.resnets.{j}")
                if has_attn:
                    self.attention(f"input_blocks.{k}.1", f"down_blocks.{level}.attentions.{j}")
                k += 1
            if level < levels - 1:
                self.resblock(f"input_blocks.{k}.0", f"down_blocks.{level}.downsamplers.0")
                k += 1
        self.resblock("middle_block.0", "mid_block.resnets.0")
        self.attention("middle_block.1", "mid_block.attentions.0")
        self.resblock("middle_block.2", "mid_block.resnets.1")
        k = 0
        for level, has_attn in enumerate(reversed(arch.attention_levels)):
            for j in range(arch.num_res_blocks + 1):
                self.resblock(f"output_blocks.{k}.0", f"up_blocks.{level}.resnets.{j}")
                if has_attn:
                    self.attention(f"output_blocks.{k}.1", f"up_blocks.{level}.attentions.{j}")
                if j == arch.num_res_blocks and level < levels - 1:
                    up = 2 if has_attn else 1
                    self.resblock(f"output_blocks.{k}.{up}", f"up_blocks.{level}.upsamplers.0")
                k += 1
        return self.out


def convert_adm_state_dict(
    state: dict[str, torch.Tensor], flags: dict[str, Any]
) -> tuple[Any, Any]:
    """Build the diffusers ``UNet2DModel`` and ``DDPMScheduler`` equal to an ADM state dict.

    Args:
        state: the checkpoint's tensors.
        flags: guided-diffusion flags the tensors do not reveal (see the module docstring).

    Raises:
        ConfigError: an unsupported variant, a tensor left unused, or a parameter left unfilled.
    """
    from diffusers import DDPMScheduler, UNet2DModel

    arch = AdmArchitecture(state, flags)
    converter = _Converter(state, arch)
    converted = converter.run()
    unused = sorted(set(state) - converter.used)
    if unused:
        raise ConfigError(
            f"ADM conversion left {len(unused)} checkpoint tensors unused, e.g. {unused[0]}"
        )
    with torch.device("meta"):
        unet = UNet2DModel(**arch.unet_config())
    expected = unet.state_dict()
    missing = sorted(set(expected) - set(converted))
    extra = sorted(set(converted) - set(expected))
    bad = [n for n in expected if n in converted and converted[n].shape != expected[n].shape]
    if missing or extra or bad:
        first = (missing or extra or bad)[0]
        raise ConfigError(
            f"ADM conversion does not fit UNet2DModel: {len(missing)} unfilled, {len(extra)} "
            f"unknown, {len(bad)} mis-shaped parameters (first: {first})"
        )
    unet.load_state_dict({n: t.float() for n, t in converted.items()}, assign=True, strict=True)
    return unet, DDPMScheduler(**arch.scheduler_config())


def adm_flags(path: Path) -> dict[str, Any]:
    """The guided-diffusion flags for checkpoint ``path``: its side-car JSON, else a preset."""
    for sidecar in (path.with_name(path.name + ".json"), path.with_suffix(".json")):
        if sidecar.is_file():
            try:
                flags = json.loads(sidecar.read_text())
            except json.JSONDecodeError as exc:
                raise SceneFormatError(f"{sidecar}: not valid JSON ({exc.msg})") from None
            if not isinstance(flags, dict):
                raise SceneFormatError(f"{sidecar}: expected an object of guided-diffusion flags")
            unknown = sorted(set(flags) - set(_FLAG_TYPES))
            if unknown:
                raise ConfigError(
                    f"{sidecar}: unknown flag `{unknown[0]}`; known: " + ", ".join(_FLAG_TYPES)
                )
            return flags
    if path.name in ADM_PRESETS:
        return dict(ADM_PRESETS[path.name])
    raise ConfigError(
        f"{path}: unknown guided-diffusion checkpoint; put its flags in {path.name}.json, e.g. "
        '{"num_head_channels": 64, "use_new_attention_order": false, "noise_schedule": "linear"}'
    )


def load_adm_checkpoint(path: str | Path) -> tuple[Any, Any]:
    """Load and convert a guided-diffusion ``.pt`` checkpoint (see the module docstring)."""
    path = Path(path)
    if not path.is_file():
        raise SceneNotFoundError(f"ADM checkpoint `{path}` does not exist")
    flags = adm_flags(path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise SceneFormatError(f"{path}: cannot read as a torch checkpoint ({exc})") from None
    if isinstance(state, dict) and "state_dict" in state:
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise SceneFormatError(f"{path}: expected a state dict of tensors")
    try:
        return convert_adm_state_dict(state, flags)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None
