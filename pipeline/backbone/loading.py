"""The frozen diffusion backbone: loading, named feature sites, truncated forward passes.

A backbone SPEC is one of:

* ``builtin:natural-s`` — hsicache's own natural-image UNet (2.7 M parameters), trained by
  ``hsicache pretrain`` on photographs whose licences allow it and shipped inside the package
  (``pipeline/backbone/shipped/natural-s``: fp16 weights, recipe, training log, held-out losses,
  attribution): the pipeline's default, offline;
* ``builtin:tiny`` — a small random-init ``UNet2DModel`` (tests, demos);
* ``builtin:adm64`` — the OpenAI ADM ImageNet-64 architecture (192 channels, mult 1-2-3-4, 3 res
  blocks, attention at 32/16/8 with 64-channel heads, scale-shift norm, resnet up/down-sampling,
  learned sigma, 1000 classes; about 296 M parameters) with random weights;
* a local diffusers folder (``save_pretrained`` output, optionally with a ``unet/`` and
  ``scheduler/`` sub-folder, as written by ``hsicache pretrain``) holding a ``UNet2DModel`` or
  a pixel-space ``UNet2DConditionModel`` (run with an empty conditioning: one all-zero token);
* an original OpenAI guided-diffusion / ADM checkpoint (``64x64_diffusion.pt``,
  ``256x256_diffusion_uncond.pt``), converted in-process (see :mod:`pipeline.backbone.adm`);
* a Hugging Face hub id (``google/ddpm-cifar10-32``); offline, a clear error says how to supply a
  local copy.

Feature sites have readable names in forward order: ``mid`` (the mid block), then for every
decoder level ``i`` (0 = deepest): ``up{i}.res{j}``, ``up{i}.attn{j}`` and ``up{i}.upsample``.
In ADM's own numbering the decoder ``output_blocks[k]`` is level ``k // (res_blocks + 1)``,
position ``k % (res_blocks + 1)``: with ``adm64`` the paper's *block 10* (Augsburg) is
``up2.attn2`` (32 x 32, 384 channels) and *block 11* (Berlin) is ``up2.upsample`` (64 x 64).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline.errors import ConfigError, SceneNotFoundError
from pipeline.io.store import jsonable

__all__ = [
    "BUILTIN_BACKBONES",
    "Backbone",
    "Site",
    "check_timesteps",
    "load_backbone",
    "noised",
    "seeded_noise",
    "shipped_backbones",
]

BUILTIN_BACKBONES: dict[str, dict[str, Any]] = {
    "tiny": {
        "sample_size": 32,
        "in_channels": 3,
        "out_channels": 3,
        "layers_per_block": 1,
        "block_out_channels": (16, 32),
        "down_block_types": ("DownBlock2D", "AttnDownBlock2D"),
        "up_block_types": ("AttnUpBlock2D", "UpBlock2D"),
        "norm_num_groups": 4,
        "attention_head_dim": 8,
    },
    "adm64": {
        "sample_size": 64,
        "in_channels": 3,
        "out_channels": 6,
        "layers_per_block": 3,
        "num_class_embeds": 1000,
        "block_out_channels": (192, 384, 576, 768),
        "attention_head_dim": 64,
        "down_block_types": (
            "ResnetDownsampleBlock2D",
            "AttnDownBlock2D",
            "AttnDownBlock2D",
            "AttnDownBlock2D",
        ),
        "up_block_types": (
            "AttnUpBlock2D",
            "AttnUpBlock2D",
            "AttnUpBlock2D",
            "ResnetUpsampleBlock2D",
        ),
        "resnet_time_scale_shift": "scale_shift",
        "upsample_type": "resnet",
        "downsample_type": "resnet",
        "norm_num_groups": 32,
        "attn_norm_num_groups": 32,
    },
}


@dataclass(frozen=True)
class Site:
    """A named place in the decoder whose output is a feature map.

    Attributes:
        name: readable name (``up2.attn2``).
        module: the dotted module path inside the UNet (``up_blocks.2.attentions.2``).
        channels: feature channels.
        resolution: spatial side of the feature map for a ``sample_size`` input.
        order: position in the forward pass (0 = first computed).
    """

    name: str
    module: str
    channels: int
    resolution: int
    order: int


class _Truncate(Exception):
    """Raised by a hook once the deepest requested site has been computed."""


@dataclass
class Backbone:
    """A frozen UNet with its scheduler and the feature sites it offers.

    Attributes:
        unet: the ``UNet2DModel`` in ``eval()`` mode, gradients off.
        scheduler: the diffusers noise scheduler (its ``alphas_cumprod`` define x_t).
        spec: what it was loaded from.
        weights_sha256: SHA-256 over the state dict (names, dtypes, shapes, bytes).
        sites: the feature sites in forward order.
    """

    unet: torch.nn.Module
    scheduler: Any
    spec: str
    weights_sha256: str
    sites: list[Site] = field(default_factory=list)

    @property
    def dtype(self) -> torch.dtype:
        """Parameter dtype of the UNet."""
        return next(self.unet.parameters()).dtype

    def cast(self, dtype: torch.dtype) -> Backbone:
        """Cast the UNet in place (without diffusers' warning about fp32-only modules)."""
        _quietly(self.unet.to, dtype=dtype)
        return self

    def forward_kwargs(self, n: int, class_labels: torch.Tensor | None) -> dict[str, Any]:
        """Extra UNet arguments for a batch of ``n``: class labels, empty text conditioning."""
        return _forward_kwargs(self.unet, n, class_labels)

    @property
    def sample_size(self) -> int:
        """Input side the UNet was built for (the patch size)."""
        return _sample_size(self.unet)

    @property
    def num_class_embeds(self) -> int | None:
        """Number of classes of a class-conditional UNet, else ``None``."""
        return self.unet.config.get("num_class_embeds")

    def site(self, name: str) -> Site:
        """The site called ``name``; an unknown name lists the valid ones."""
        for s in self.sites:
            if s.name == name:
                return s
        raise ConfigError(
            f"unknown site `{name}` for backbone `{self.spec}`; valid sites: "
            + ", ".join(s.name for s in self.sites)
        )

    def provenance(self) -> dict[str, Any]:
        """What identifies this backbone in a cache's attributes."""
        conditioning = "none"
        if self.unet.config.get("cross_attention_dim") is not None:
            conditioning = "empty (one all-zero token)"
        return {
            "spec": self.spec,
            "weights_sha256": self.weights_sha256,
            "conditioning": conditioning,
            "config": _stable_config(self.unet.config),
            "scheduler": _stable_config(self.scheduler.config),
        }

    @torch.inference_mode()
    def features(
        self,
        x: torch.Tensor,
        timestep: int,
        sites: list[str],
        *,
        class_labels: torch.Tensor | None = None,
        truncate: bool = True,
    ) -> dict[str, torch.Tensor]:
        """Run the UNet on ``x`` (already noised to ``timestep``) and return the sites' outputs.

        Args:
            x: ``(N, 3, S, S)`` input in [-1, 1] (noised).
            timestep: the diffusion timestep fed to the UNet.
            sites: names of the sites to return.
            class_labels: ``(N,)`` class ids for a class-conditional UNet.
            truncate: stop the forward pass once the deepest requested site is computed.

        Returns:
            ``{site: (N, C, r, r)}`` tensors.
        """
        wanted = [self.site(name) for name in sites]
        last = max(s.order for s in wanted)
        out: dict[str, torch.Tensor] = {}

        def tap(site: Site) -> Callable[[torch.Tensor], None]:
            def keep(output: torch.Tensor) -> None:
                out[site.name] = output
                if truncate and site.order == last:
                    raise _Truncate

            return keep

        kwargs = self.forward_kwargs(x.shape[0], class_labels)
        _run_hooked(self.unet, x, timestep, kwargs, {s.module: tap(s) for s in wanted})
        return out


def _stable_config(config: Any) -> dict[str, Any]:
    """A diffusers config as JSON types, the same for every load: its ``_use_default_values``
    list comes in the order of a set, which would make two identical caches differ."""
    out = jsonable(dict(config))
    if isinstance(out.get("_use_default_values"), list):
        out["_use_default_values"] = sorted(out["_use_default_values"])
    return out


def shipped_backbones() -> dict[str, Path]:
    """hsicache's own pretrained backbones inside the package (``builtin:NAME``): each a folder
    written by ``hsicache pretrain`` (fp16 weights, config, training log, held-out losses and the
    attribution of its photographs)."""
    from importlib import resources

    root = Path(str(resources.files("pipeline.backbone") / "shipped"))
    if not root.is_dir():
        return {}
    return {p.name: p for p in sorted(root.iterdir()) if (p / "unet" / "config.json").is_file()}


def load_backbone(
    spec: str,
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
) -> Backbone:
    """Load a backbone from a SPEC (see the module docstring), frozen and in ``eval()`` mode.

    Args:
        spec: a shipped backbone (``builtin:natural-s``), ``builtin:tiny``, ``builtin:adm64``, a
            local diffusers folder, an ADM ``.pt`` checkpoint, or a hub id.
        device: where to put it.
        dtype: parameter dtype.
        seed: initialisation seed of a ``builtin:`` backbone (its weights are random).

    Raises:
        ConfigError: an unknown built-in name, a folder that is not a diffusers UNet, a latent
            UNet (it would need a VAE), or an ADM checkpoint that cannot be converted exactly.
        SceneNotFoundError: a hub id that cannot be fetched (offline) and is not cached.
    """
    from diffusers import DDPMScheduler, UNet2DModel

    path = Path(spec).expanduser()
    name = spec.split(":", 1)[1] if spec.startswith("builtin:") else None
    if name is not None and name in shipped_backbones():
        unet, scheduler = _load_pretrained(str(shipped_backbones()[name]), DDPMScheduler)
    elif name is not None:
        if name not in BUILTIN_BACKBONES:
            raise ConfigError(
                f"unknown built-in backbone `{name}`: choose one of "
                + ", ".join(f"builtin:{n}" for n in [*shipped_backbones(), *BUILTIN_BACKBONES])
            )
        with torch.random.fork_rng(devices=[]):  # seeded init, caller's RNG untouched
            torch.manual_seed(seed)
            unet = UNet2DModel(**BUILTIN_BACKBONES[name])
        scheduler = DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear")
    elif path.suffix in ADM_SUFFIXES and not path.is_dir():
        from pipeline.backbone.adm import load_adm_checkpoint

        unet, scheduler = load_adm_checkpoint(path)
    else:
        unet, scheduler = _load_pretrained(spec, DDPMScheduler)
    if unet.config.in_channels != 3:
        raise ConfigError(
            f"backbone `{spec}` takes {unet.config.in_channels}-channel input: a latent-space "
            "UNet needs its VAE, which hsicache does not run; use a pixel-space UNet"
        )
    unet.requires_grad_(False)
    unet.eval()
    unet.to(device=device)
    backbone = Backbone(
        unet=unet, scheduler=scheduler, spec=spec, weights_sha256=_weights_hash(unet)
    )
    if dtype != torch.float32:
        backbone.cast(dtype)
    backbone.sites = _discover_sites(unet)
    return backbone


ADM_SUFFIXES = (".pt", ".pth", ".ckpt")


def _load_pretrained(spec: str, scheduler_cls: Any) -> tuple[Any, Any]:
    path = Path(spec).expanduser()
    local = path.is_dir()
    if path.is_file():
        raise ConfigError(
            f"backbone `{spec}` is a file but not a guided-diffusion checkpoint "
            f"({', '.join(ADM_SUFFIXES)}): give a diffusers folder, such a checkpoint, a hub id "
            "or builtin:NAME"
        )
    if not local and (spec.startswith((".", "/", "~")) or path.suffix):
        raise SceneNotFoundError(f"backbone folder `{spec}` does not exist")
    if not local and spec in (*shipped_backbones(), *BUILTIN_BACKBONES):
        raise ConfigError(
            f"backbone `{spec}` is no folder here, and hsicache's own is called "
            f"`builtin:{spec}`: write that (a bare name means a Hugging Face hub id)"
        )
    offline = not local and not _hub_reachable()
    try:
        root = path if local else spec
        sub = "unet" if (local and (path / "unet").is_dir()) else None
        if not local:
            sub = _hub_subfolder(spec, offline)
        unet_cls = _unet_class(root, sub, offline)
        unet = _quietly(unet_cls.from_pretrained, root, subfolder=sub, local_files_only=offline)
        try:
            scheduler = _quietly(
                scheduler_cls.from_pretrained,
                root,
                subfolder="scheduler" if sub == "unet" else None,
                local_files_only=offline,
            )
        except Exception:  # a UNet folder without a scheduler: the DDPM default
            scheduler = scheduler_cls(num_train_timesteps=1000)
    except OSError as exc:
        if local:
            raise ConfigError(f"`{spec}` is not a diffusers UNet folder: {exc}") from exc
        why = (
            "the hub is not reachable and it is not in the Hugging Face cache"
            if offline
            else ("unknown id, or a repository without a diffusers UNet")
        )
        raise SceneNotFoundError(
            f"cannot load hub backbone `{spec}` ({why}). Download it where the hub is reachable "
            f"(`huggingface-cli download {spec} --local-dir DIR`) and pass the folder DIR as "
            "`backbone`"
        ) from exc
    return unet, scheduler


def _hub_reachable(timeout: float = 3.0) -> bool:
    """Whether a TCP connection to the Hugging Face hub (``HF_ENDPOINT``) opens within
    ``timeout`` seconds; ``False`` with ``HF_HUB_OFFLINE`` set, ``True`` without asking when a
    proxy is configured (the hub client goes through it; a direct probe would not). Offline,
    a hub id is looked up in the local cache only, at once, instead of after the hub client's
    retries."""
    import os
    import socket
    from urllib.parse import urlparse
    from urllib.request import getproxies

    if os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on"):
        return False
    url = urlparse(os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    if url.scheme in getproxies() or "all" in getproxies():
        return True
    try:
        port = url.port or (80 if url.scheme == "http" else 443)
        with socket.create_connection((url.hostname or "", port), timeout=timeout):
            return True
    except (OSError, ValueError):  # unreachable, or a port that is no number
        return False


def _quietly(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """Call ``fn`` with diffusers' logging at error level (no advice about `accelerate`) and
    without the hub client's deprecation warnings."""
    import warnings

    from diffusers.utils import logging as dlogging

    level = dlogging.get_verbosity()
    dlogging.set_verbosity_error()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            warnings.simplefilter("ignore", DeprecationWarning)
            warnings.filterwarnings("ignore", message=".*local_dir_use_symlinks")
            return fn(*args, **kwargs)
    finally:
        dlogging.set_verbosity(level)


def _unet_class(root: str | Path, sub: str | None, offline: bool = False) -> Any:
    """``UNet2DModel`` or ``UNet2DConditionModel``, as the folder's ``config.json`` names it."""
    from diffusers import UNet2DConditionModel, UNet2DModel

    config = _quietly(UNet2DModel.load_config, root, subfolder=sub, local_files_only=offline)
    name = config.get("_class_name", "UNet2DModel")
    classes = {"UNet2DModel": UNet2DModel, "UNet2DConditionModel": UNet2DConditionModel}
    if name not in classes:
        raise ConfigError(f"backbone `{root}` is a {name}; expected one of " + ", ".join(classes))
    return classes[name]


def _hub_subfolder(spec: str, offline: bool = False) -> str | None:
    """Pipelines on the hub keep the UNet in ``unet/``; bare UNet repos at the root (offline:
    as the local cache holds it)."""
    try:
        if offline:
            from huggingface_hub import try_to_load_from_cache

            cached = try_to_load_from_cache(spec, "unet/config.json")
            return "unet" if isinstance(cached, str) else None
        from huggingface_hub import file_exists

        return "unet" if file_exists(spec, "unet/config.json") else None
    except Exception:
        return None


def _weights_hash(unet: torch.nn.Module) -> str:
    h = hashlib.sha256()
    for name, tensor in sorted(unet.state_dict().items()):
        t = tensor.detach().to("cpu").contiguous()
        h.update(f"{name}{t.dtype}{tuple(t.shape)}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def _discover_sites(unet: torch.nn.Module) -> list[Site]:
    """Name every decoder output and record its channels/resolution with one dry forward.

    The forward runs on a twin built from the config on torch's ``meta`` device (shapes only,
    no arithmetic: 0.3 s instead of 3 s for ADM-64); on the UNet itself if that fails.
    """
    try:
        with torch.device("meta"):
            twin = type(unet).from_config(unet.config)
        return _dry_run_sites(twin)
    except Exception:  # an op without a meta kernel: the real (slower) dry run
        return _dry_run_sites(unet)


def _dry_run_sites(unet: torch.nn.Module) -> list[Site]:
    """The sites of ``unet``, found with one forward of a zero input."""
    candidates: list[tuple[str, str]] = [("mid", "mid_block")]
    for i, block in enumerate(unet.up_blocks):
        attns = getattr(block, "attentions", None)
        for j in range(len(block.resnets)):
            candidates.append((f"up{i}.res{j}", f"up_blocks.{i}.resnets.{j}"))
            if attns is not None and j < len(attns):
                candidates.append((f"up{i}.attn{j}", f"up_blocks.{i}.attentions.{j}"))
        if getattr(block, "upsamplers", None):
            candidates.append((f"up{i}.upsample", f"up_blocks.{i}.upsamplers.0"))
    seen: list[tuple[str, str, tuple[int, ...]]] = []

    def tap(name: str, path: str) -> Callable[[torch.Tensor], None]:
        return lambda output: seen.append((name, path, tuple(output.shape)))

    param = next(unet.parameters())
    size = _sample_size(unet)
    x = torch.zeros(1, unet.config.in_channels, size, size, device=param.device, dtype=param.dtype)
    class_labels = (
        torch.zeros(1, dtype=torch.long, device=param.device)
        if unet.config.get("num_class_embeds")
        else None
    )
    kwargs = _forward_kwargs(unet, 1, class_labels)
    with torch.inference_mode():
        _run_hooked(unet, x, 0, kwargs, {path: tap(n, path) for n, path in candidates})
    return [
        Site(name=n, module=p, channels=shape[1], resolution=shape[-1], order=k)
        for k, (n, p, shape) in enumerate(seen)
    ]


def _forward_kwargs(
    unet: torch.nn.Module, n: int, class_labels: torch.Tensor | None
) -> dict[str, Any]:
    kwargs: dict[str, Any] = {"class_labels": class_labels}
    cross = unet.config.get("cross_attention_dim")
    if cross is not None:  # UNet2DConditionModel: the empty conditioning, one all-zero token
        param = next(unet.parameters())
        width = cross[0] if isinstance(cross, (tuple, list)) else cross
        kwargs["encoder_hidden_states"] = torch.zeros(
            n, 1, int(width), device=param.device, dtype=param.dtype
        )
    return kwargs


def _run_hooked(
    unet: torch.nn.Module,
    x: torch.Tensor,
    timestep: int,
    kwargs: dict[str, Any],
    taps: dict[str, Callable[[torch.Tensor], None]],
) -> None:
    """Forward ``x`` with each module path in ``taps`` handing its output to its callback.

    A callback may raise :class:`_Truncate` to stop the forward pass there; hooks are removed
    whatever happens.
    """

    def hook(callback: Callable[[torch.Tensor], None]) -> Callable[..., None]:
        def run(_m: torch.nn.Module, _i: object, output: Any) -> None:
            callback(output[0] if isinstance(output, tuple) else output)

        return run

    handles = [unet.get_submodule(p).register_forward_hook(hook(cb)) for p, cb in taps.items()]
    try:
        t = torch.full((x.shape[0],), timestep, device=x.device, dtype=torch.long)
        unet(x, t, **kwargs)
    except _Truncate:
        pass
    finally:
        for h in handles:
            h.remove()


def _sample_size(unet: torch.nn.Module) -> int:
    size = unet.config.sample_size
    return int(size[0] if isinstance(size, (tuple, list)) else size)


def check_timesteps(bb: Backbone, timesteps: Any) -> None:
    """Refuse a timestep the backbone's scheduler does not have."""
    n_train_t = int(bb.scheduler.config.num_train_timesteps)
    for t in timesteps:
        if not 0 <= int(t) < n_train_t:
            raise ConfigError(
                f"timestep {t} is out of range (`timesteps`): the scheduler of `{bb.spec}` "
                f"has 0..{n_train_t - 1}"
            )


def seeded_noise(shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """The one ε shared by every patch: float32 standard normal from a CPU generator."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    return torch.randn(shape, generator=gen, dtype=torch.float32)


def noised(x0: torch.Tensor, eps: torch.Tensor, timestep: int, scheduler: Any) -> torch.Tensor:
    """x_t = √ᾱ_t · x₀ + √(1 - ᾱ_t) · ε with the scheduler's own ᾱ."""
    abar = float(np.asarray(scheduler.alphas_cumprod)[timestep])
    return (abar**0.5) * x0 + ((1.0 - abar) ** 0.5) * eps.to(x0)
