"""The 3-band rendering of a hyperspectral cube that a natural-image backbone sees.

Modes:

* ``bands`` — three band indices (0-based) as R, G, B;
* ``wavelengths`` — the bands nearest 640 / 550 / 460 nm (needs band wavelengths);
* ``pca`` — the first three principal components of the standardised cube.

Each channel is clipped to its ``clip`` percentiles, scaled to [0, 1], then raised to ``gamma``
(``gamma < 1`` brightens dark scenes; the paper uses 0.4 on Augsburg with bands 21/11/6).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace

import numpy as np

from pipeline.errors import BandMismatchError, ConfigError
from pipeline.utils.arrays import BLOCK_ROWS, column_moments
from pipeline.utils.checks import check_int, check_number

__all__ = [
    "RGB_MODES",
    "TARGET_WAVELENGTHS_NM",
    "Rendering",
    "check_rendering_options",
    "render_rgb",
]

RGB_MODES = ("bands", "wavelengths", "pca")
TARGET_WAVELENGTHS_NM = (640.0, 550.0, 460.0)
_PCA_MAX_SAMPLES = 200_000


@dataclass(frozen=True)
class Rendering:
    """The parameters that produced a rendering; stored in the scene and cache provenance."""

    mode: str
    bands: tuple[int, int, int] | None
    gamma: float
    clip: tuple[float, float]
    #: How pixels without data are rendered: ``None`` (a scene that has none) or ``"nearest"``
    #: (each shows its nearest pixel with data, so the backbone sees no edge around a hole).
    no_data_fill: str | None = None

    def to_dict(self) -> dict[str, object]:
        """JSON-serialisable form (``no_data_fill`` only when set: the renderings, and so the
        fingerprints, of scenes without such pixels are what they were)."""
        d = asdict(self)
        d["bands"] = list(self.bands) if self.bands is not None else None
        d["clip"] = list(self.clip)
        if self.no_data_fill is None:
            del d["no_data_fill"]
        return d


def fill_no_data(values: np.ndarray, empty: np.ndarray) -> np.ndarray:
    """``values`` ``(H, W, ...)`` with each pixel of ``empty`` taking its nearest pixel with
    data's values (scipy's distance transform), so no filled value reaches what is computed
    from them: the backbone's features around a hole in the rendering, a context window."""
    from scipy import ndimage

    if not empty.any() or empty.all():
        return values
    nearest = ndimage.distance_transform_edt(empty, return_distances=False, return_indices=True)
    return values[nearest[0], nearest[1]]


def check_rendering_options(
    mode: str | None, bands: Sequence[int] | None, gamma: float, clip: tuple[float, float]
) -> None:
    """The rendering options that need no cube (``prepare`` checks them before reading one).

    Raises:
        ConfigError: an unknown mode, not three band indices, band indices with another mode,
            ``gamma`` not finite and > 0,
            or ``clip`` not ``0 <= low < high <= 100``.
    """
    if mode is not None and mode not in RGB_MODES:
        raise ConfigError(f"unknown `rgb_mode={mode}`: choose one of {', '.join(RGB_MODES)}")
    if bands is not None:
        if len(bands) != 3:
            raise ConfigError(f"`rgb_bands` needs exactly three indices, got {list(bands)}")
        for b in bands:
            check_int("rgb_bands", b, low=0)
        if mode not in (None, "bands"):  # it would be ignored
            raise ConfigError(
                f"`rgb_bands` is for `rgb_mode=bands`, not `rgb_mode={mode}`: drop one of them"
            )
    check_number("gamma", gamma, low=0, low_open=True)
    lo = check_number("clip_low", clip[0], low=0, high=100)
    hi = check_number("clip_high", clip[1], low=0, high=100)
    if lo >= hi:
        raise ConfigError(f"`clip_low` {lo:g} must be below `clip_high` {hi:g}")


def render_rgb(
    cube: np.ndarray,
    *,
    mode: str | None = None,
    bands: tuple[int, int, int] | None = None,
    wavelengths: np.ndarray | None = None,
    gamma: float = 1.0,
    clip: tuple[float, float] = (2.0, 98.0),
    valid: np.ndarray | None = None,
) -> tuple[np.ndarray, Rendering]:
    """Render ``cube`` ``(H, W, B)`` to a float32 ``(H, W, 3)`` image in [0, 1].

    Args:
        cube: the hyperspectral cube.
        mode: ``bands``, ``wavelengths`` or ``pca``; ``None`` picks ``bands`` when ``bands`` is
            given, else ``wavelengths`` when wavelengths are known, else ``pca``.
        bands: 0-based R, G, B band indices for ``bands`` mode.
        wavelengths: band centres in nm, ``(B,)``.
        gamma: exponent applied after scaling to [0, 1]; must be > 0.
        clip: lower and upper percentiles for the per-channel contrast stretch.
        valid: ``(H, W)`` pixels with data, when some have none: the principal components and
            percentiles come from them alone, and each other pixel shows its nearest pixel
            with data (``no_data_fill="nearest"``), so whatever filled it never reaches the
            rendering.

    Returns:
        The rendering and the :class:`Rendering` that describes it (with the bands chosen).

    Raises:
        BandMismatchError: a band index is out of range, or ``wavelengths`` mode without
            wavelengths.
        ConfigError: as :func:`check_rendering_options`.
    """
    check_rendering_options(mode, bands, gamma, clip)
    holes = None if valid is None or valid.all() or not valid.any() else ~valid
    if mode is None:
        mode = "bands" if bands is not None else "wavelengths" if wavelengths is not None else "pca"
    raw, chosen = _channels(cube, mode, bands, wavelengths, holes)
    rgb = _stretch(raw, clip, gamma, holes)
    lo, hi = clip
    rendering = Rendering(mode=mode, bands=chosen, gamma=float(gamma), clip=(float(lo), float(hi)))
    if holes is None:
        return rgb, rendering
    return fill_no_data(rgb, holes), replace(rendering, no_data_fill="nearest")


def _channels(
    cube: np.ndarray,
    mode: str,
    bands: tuple[int, int, int] | None,
    wavelengths: np.ndarray | None,
    holes: np.ndarray | None,
) -> tuple[np.ndarray, tuple[int, int, int] | None]:
    """The three raw channels ``mode`` takes from ``cube``, and the bands chosen (if any)."""
    n_bands = cube.shape[-1]
    if mode == "bands":
        if bands is None:
            raise ConfigError("`rgb_mode=bands` needs `rgb_bands=R,G,B` (0-based indices)")
        for b in bands:
            if not 0 <= b < n_bands:
                raise BandMismatchError(
                    f"`rgb_bands` index {b} is out of range: the cube has {n_bands} bands "
                    f"(valid indices 0..{n_bands - 1})"
                )
        chosen = (int(bands[0]), int(bands[1]), int(bands[2]))
    elif mode == "wavelengths":
        if wavelengths is None:
            raise BandMismatchError(
                "`rgb_mode=wavelengths` needs band wavelengths and this cube has none: use "
                "`rgb_mode=bands` with `rgb_bands=R,G,B` or `rgb_mode=pca`"
            )
        wl = np.asarray(wavelengths, dtype=np.float64)
        r, g, b = (int(np.argmin(np.abs(wl - t))) for t in TARGET_WAVELENGTHS_NM)
        chosen = (r, g, b)
    else:
        return _pca3(cube, holes), None
    return cube[..., list(chosen)].astype(np.float64), chosen


def _stretch(
    raw: np.ndarray, clip: tuple[float, float], gamma: float, holes: np.ndarray | None
) -> np.ndarray:
    """Each channel stretched between its ``clip`` percentiles (over the pixels outside
    ``holes``) into [0, 1], then raised to ``gamma``."""
    rgb = np.empty(raw.shape, dtype=np.float32)
    for c in range(3):
        ch = raw[..., c]
        p_lo, p_hi = np.percentile(ch if holes is None else ch[~holes], list(clip))
        scale = p_hi - p_lo if p_hi > p_lo else 1.0
        rgb[..., c] = np.clip((ch - p_lo) / scale, 0.0, 1.0)
    if gamma != 1.0:
        np.power(rgb, gamma, out=rgb)
    return rgb


def _pca3(cube: np.ndarray, holes: np.ndarray | None = None) -> np.ndarray:
    """First three principal components of the per-band standardised cube, signs fixed; fitted
    on the pixels outside ``holes`` (pixels without data) when given."""
    h, w, b = cube.shape
    x = cube.reshape(-1, b)  # read in blocks of rows: no float64 copy of the whole cube
    keep = None if holes is None else ~holes.reshape(-1)
    mean, std = column_moments(x, keep)
    std[std == 0] = 1.0
    fit = np.arange(len(x)) if keep is None else np.flatnonzero(keep)
    step = max(1, len(fit) // _PCA_MAX_SAMPLES)
    sample = (x[fit[::step]].astype(np.float64) - mean) / std
    _, _, vt = np.linalg.svd(sample, full_matrices=False)
    comps = vt[:3] if vt.shape[0] >= 3 else np.pad(vt, ((0, 3 - vt.shape[0]), (0, 0)))
    # deterministic sign: the largest loading of each component is positive
    signs = np.sign(comps[np.arange(3), np.argmax(np.abs(comps), axis=1)])
    signs[signs == 0] = 1.0
    comps = comps * signs[:, None]
    out = np.empty((len(x), 3))
    for s in range(0, len(x), BLOCK_ROWS):
        rows = x[s : s + BLOCK_ROWS].astype(np.float64)
        out[s : s + BLOCK_ROWS] = ((rows - mean) / std) @ comps.T
    return out.reshape(h, w, 3)
