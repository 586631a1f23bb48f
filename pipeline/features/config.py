"""The ``extract`` stage's settings (torch-free, so the command line reads its defaults
without loading torch)."""

from __future__ import annotations

import math
from dataclasses import dataclass

from pipeline.errors import ConfigError
from pipeline.utils.checks import check_choice, check_int, check_seed
from pipeline.utils.config import StageConfig

__all__ = ["DTYPE_NAMES", "FILTERS", "ZOOMS", "ContextConfig", "ExtractConfig"]

#: The upsampling factors ``zoom`` takes.
ZOOMS = (1, 2, 4, 8)
#: The window filters of the ``meanW`` context families.
FILTERS = ("box", "gaussian")
#: The words ``dtype`` takes (``auto`` and the torch dtypes' short and long names).
DTYPE_NAMES = ("auto", "fp32", "bf16", "fp16", "float32", "bfloat16", "float16")


@dataclass(frozen=True)
class ExtractConfig(StageConfig):
    """How the frozen backbone runs over the scene (what :func:`extract_features` computes).

    Attributes:
        sites: feature site names (``hsicache layers`` lists a backbone's); at least one.
        timesteps: diffusion timesteps, each in ``[0, num_train_timesteps)``.
        patch: window side (``None``: the backbone's sample size).
        stride: window step = side of the square each window owns.
        batch_size: windows per forward pass.
        device: ``auto`` (cuda > mps > cpu) or a torch device.
        dtype: ``auto``, ``fp32``, ``bf16`` or ``fp16``. On CPU, ``auto`` is fp32 unless the
            CPU computes bf16 natively, then the faster of the two on the scene's first patch
            (:mod:`pipeline.backbone.autotune`); a resumed cache keeps the dtype it was
            started with; an already loaded backbone keeps its own.
        noise_seed: seed of the one noise draw shared by all patches.
        class_seed: seed of the per-patch class ids of a class-conditional backbone.
        class_label: give every patch this class id instead (one class for all patches
            avoids a per-patch offset in the features).
        zoom: upsample the rendering this many times (:data:`ZOOMS`; bilinear) before the
            backbone and average-pool the features back onto the scene's pixels; ``patch``
            and ``stride`` are in upsampled pixels and the work grows as ``zoom`` squared.
        noise_samples: average the features over this many seeded noise draws per timestep.
        chunk_tiles: owned squares per cache chunk side (``None``: the fewest that make
            chunks of about 1 MB or more, capped at the scene size).
        threads: torch intra-op threads per forward pass (``None``: this process's). CPU
            kernels depend on it, so equal thread counts give bit-identical caches.
        truncate: stop each forward pass after the deepest requested site.
    """

    section = "extract"

    sites: tuple[str, ...] = ()
    timesteps: tuple[int, ...] = (0,)
    patch: int | None = None
    stride: int = 32
    batch_size: int = 16
    device: str = "auto"
    dtype: str = "auto"
    noise_seed: int = 0
    class_seed: int = 0
    class_label: int | None = None
    zoom: int = 1
    noise_samples: int = 1
    chunk_tiles: int | None = None
    threads: int | None = None
    truncate: bool = True

    def _check(self) -> None:
        if not self.sites:
            raise ConfigError(
                "give at least one site in `sites` (`hsicache layers` lists a backbone's)"
            )
        if not self.timesteps:
            raise ConfigError("give at least one timestep in `timesteps`, e.g. `timesteps=0`")
        for t in self.timesteps:
            check_int("timesteps", t, low=0)
        for name in ("patch", "chunk_tiles", "threads"):
            if getattr(self, name) is not None:
                check_int(name, getattr(self, name), low=1)
        for name in ("stride", "batch_size", "noise_samples"):
            check_int(name, getattr(self, name), low=1)
        check_seed("noise_seed", self.noise_seed)
        check_seed("class_seed", self.class_seed)
        if self.class_label is not None:
            check_int("class_label", self.class_label, low=0)
        check_choice("dtype", self.dtype, DTYPE_NAMES)
        if isinstance(self.zoom, bool) or self.zoom not in ZOOMS:
            raise ConfigError(
                f"`zoom` must be one of {', '.join(map(str, ZOOMS))}, got {self.zoom!r}"
            )
        if self.stride % self.zoom:
            raise ConfigError(
                f"`stride={self.stride}` must be a multiple of `zoom={self.zoom}` (a window's "
                "owned square must cover whole scene pixels)"
            )


@dataclass(frozen=True)
class ContextConfig(StageConfig):
    """Which context families to compute, and how (see the module docstring).

    Attributes:
        components: principal components ``k`` of the standardised cube.
        windows: window sides of the ``meanW`` families (odd or even, at least 1).
        filter: ``box`` or ``gaussian``.
        emp_components: components the morphological profile is built on (0: no ``emp``).
        emp_radii: disc radii of the openings and closings by reconstruction.
        slic_sizes: pixels per superpixel of the ``slicN`` families.
        seed: seed of the pixel sample the components are fitted on.
    """

    section = "context"

    components: int = 32
    windows: tuple[int, ...] = (7, 15, 21)
    filter: str = "box"
    emp_components: int = 4
    emp_radii: tuple[int, ...] = (2, 4, 8)
    slic_sizes: tuple[int, ...] = (64, 256)
    seed: int = 0

    @property
    def families(self) -> list[str]:
        """Names of the families this configuration computes, in store order."""
        names = [f"mean{w}" for w in self.windows]
        names += ["emp"] if self.emp_components else []
        return names + [f"slic{n}" for n in self.slic_sizes]

    def reach(self, family: str) -> int:
        """How many pixels away from a pixel its ``family`` features can look (for the blocks
        split's buffer): half a window (the Gaussian's truncation radius), a superpixel's
        largest side (SLIC lets one grow to three times its size), or -1 for ``emp``, whose
        reconstruction follows a region as far as it reaches: no buffer bounds it."""
        if family.startswith("mean"):
            w = int(family[4:])
            return w // 2 if self.filter == "box" else int(3.0 * w / 6.0 + 0.5)
        if family == "emp":
            return -1
        if family.startswith("slic"):
            return math.ceil(math.sqrt(3 * int(family[4:])))
        raise ConfigError(f"unknown context family `{family}`")

    def check(self, shape: tuple[int, int], bands: int) -> None:
        """Every setting in range for a scene of ``shape`` with ``bands`` bands."""
        # principal components: no more than the bands, nor than the pixels they are fitted on
        check_int("components", self.components, low=1, high=min(bands, shape[0] * shape[1]))
        check_choice("filter", self.filter, FILTERS)
        check_int("emp_components", self.emp_components, low=0, high=self.components)
        check_seed("seed", self.seed)
        side = min(shape)
        for w in self.windows:
            check_int("windows", w, low=1, high=side)
        for r in self.emp_radii if self.emp_components else ():  # no profile: radii unused
            check_int("emp_radii", r, low=1, high=side)
        for n in self.slic_sizes:
            check_int("slic_sizes", n, low=2, high=shape[0] * shape[1])
        if not self.families:
            raise ConfigError(
                "the context configuration names no family: give `windows`, "
                "`emp_components` or `slic_sizes`"
            )
        if len(set(self.families)) != len(self.families):
            raise ConfigError(f"a context family is named twice: {', '.join(self.families)}")
