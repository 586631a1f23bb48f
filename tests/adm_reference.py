"""An independent, compact re-implementation of OpenAI guided-diffusion's ``UNetModel``.

Written for the conversion test only: it follows ``guided_diffusion/unet.py`` module for module so
that its ``state_dict`` keys and its forward pass are those of a real ADM checkpoint, at any width.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F


def timestep_embedding(t: torch.Tensor, dim: int, max_period: int = 10000) -> torch.Tensor:
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32) / half)
    args = t[:, None].float() * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


def norm(ch: int) -> nn.GroupNorm:
    return nn.GroupNorm(32, ch)


class ResBlock(nn.Module):
    def __init__(self, ch: int, emb: int, out: int, scale_shift: bool, up=False, down=False):
        super().__init__()
        self.in_layers = nn.Sequential(norm(ch), nn.SiLU(), nn.Conv2d(ch, out, 3, padding=1))
        self.up, self.down = up, down
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb, 2 * out if scale_shift else out))
        self.out_layers = nn.Sequential(
            norm(out), nn.SiLU(), nn.Dropout(0.0), nn.Conv2d(out, out, 3, padding=1)
        )
        self.scale_shift = scale_shift
        self.skip_connection = nn.Identity() if out == ch else nn.Conv2d(ch, out, 1)

    def resample(self, x: torch.Tensor) -> torch.Tensor:
        if self.up:
            return F.interpolate(x, scale_factor=2, mode="nearest")
        if self.down:
            return F.avg_pool2d(x, kernel_size=2, stride=2)
        return x

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.in_layers[:-1](x)
        h, x = self.resample(h), self.resample(x)
        h = self.in_layers[-1](h)
        e = self.emb_layers(emb)[..., None, None]
        if self.scale_shift:
            scale, shift = e.chunk(2, dim=1)
            h = self.out_layers[1:](self.out_layers[0](h) * (1 + scale) + shift)
        else:
            h = self.out_layers(h + e)
        return self.skip_connection(x) + h


class AttentionBlock(nn.Module):
    def __init__(self, ch: int, head_ch: int, new_order: bool):
        super().__init__()
        self.heads = ch // head_ch
        self.new_order = new_order
        self.norm = norm(ch)
        self.qkv = nn.Conv1d(ch, 3 * ch, 1)
        self.proj_out = nn.Conv1d(ch, ch, 1)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        b, c, *spatial = x.shape
        flat = x.reshape(b, c, -1)
        qkv = self.qkv(self.norm(flat))
        n, length = self.heads, qkv.shape[-1]
        ch = c // n
        if self.new_order:
            q, k, v = (t.reshape(b * n, ch, length) for t in qkv.chunk(3, dim=1))
        else:
            q, k, v = qkv.reshape(b * n, 3 * ch, length).split(ch, dim=1)
        scale = 1 / math.sqrt(math.sqrt(ch))
        w = torch.einsum("bct,bcs->bts", q * scale, k * scale).softmax(dim=-1)
        h = torch.einsum("bts,bcs->bct", w, v).reshape(b, c, length)
        return (flat + self.proj_out(h)).reshape(b, c, *spatial)


class Seq(nn.Sequential):
    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        for layer in self:
            x = layer(x, emb) if isinstance(layer, ResBlock | AttentionBlock) else layer(x)
        return x


class ADMUNet(nn.Module):
    """guided-diffusion ``UNetModel`` with ``resblock_updown=True`` and ``num_head_channels``."""

    def __init__(
        self,
        *,
        model_channels: int,
        channel_mult: tuple[int, ...],
        num_res_blocks: int,
        attention_ds: tuple[int, ...],
        head_channels: int,
        new_order: bool,
        num_classes: int | None,
        out_channels: int = 6,
        scale_shift: bool = True,
    ):
        super().__init__()
        mc, emb = model_channels, 4 * model_channels
        self.mc = mc
        self.time_embed = nn.Sequential(nn.Linear(mc, emb), nn.SiLU(), nn.Linear(emb, emb))
        if num_classes:
            self.label_emb = nn.Embedding(num_classes, emb)
        self.input_blocks = nn.ModuleList([Seq(nn.Conv2d(3, mc, 3, padding=1))])
        chans, ch, ds = [mc], mc, 1
        for level, mult in enumerate(channel_mult):
            for _ in range(num_res_blocks):
                layers: list[nn.Module] = [ResBlock(ch, emb, mult * mc, scale_shift)]
                ch = mult * mc
                if ds in attention_ds:
                    layers.append(AttentionBlock(ch, head_channels, new_order))
                self.input_blocks.append(Seq(*layers))
                chans.append(ch)
            if level != len(channel_mult) - 1:
                self.input_blocks.append(Seq(ResBlock(ch, emb, ch, scale_shift, down=True)))
                chans.append(ch)
                ds *= 2
        self.middle_block = Seq(
            ResBlock(ch, emb, ch, scale_shift),
            AttentionBlock(ch, head_channels, new_order),
            ResBlock(ch, emb, ch, scale_shift),
        )
        self.output_blocks = nn.ModuleList()
        for level, mult in list(enumerate(channel_mult))[::-1]:
            for i in range(num_res_blocks + 1):
                layers = [ResBlock(ch + chans.pop(), emb, mc * mult, scale_shift)]
                ch = mc * mult
                if ds in attention_ds:
                    layers.append(AttentionBlock(ch, head_channels, new_order))
                if level and i == num_res_blocks:
                    layers.append(ResBlock(ch, emb, ch, scale_shift, up=True))
                    ds //= 2
                self.output_blocks.append(Seq(*layers))
        self.out = nn.Sequential(norm(ch), nn.SiLU(), nn.Conv2d(mc, out_channels, 3, padding=1))

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None):
        emb = self.time_embed(timestep_embedding(t, self.mc))
        if y is not None:
            emb = emb + self.label_emb(y)
        hs, h = [], x
        for block in self.input_blocks:
            h = block(h, emb)
            hs.append(h)
        h = self.middle_block(h, emb)
        for block in self.output_blocks:
            h = block(torch.cat([h, hs.pop()], dim=1), emb)
        return self.out(h)
