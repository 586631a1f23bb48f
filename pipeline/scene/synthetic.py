"""A seeded synthetic hyperspectral scene for tests, demos and scale runs.

The scene is a mosaic of spatially coherent regions (Voronoi cells), each of one class. Every class
has a smooth, endmember-like spectrum (a sum of broad Gaussian absorption/reflection features over
400-2500 nm) plus per-pixel noise and a gentle illumination field. The last two classes are
*spectral twins*: their mean spectra differ by well under the noise, so no spectral classifier can
separate them, but one is smooth and the other carries a strong stripe texture, which a spatial
feature extractor sees at once.

With ``label_map`` the scene is rendered on a real label geometry (e.g. the Augsburg masks,
332 x 485): labeled pixels take their class from the map, unlabeled ones are filled with
background regions of their own spectra.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from pipeline.errors import ConfigError

__all__ = ["SyntheticScene", "make_synthetic_scene"]


@dataclass
class SyntheticScene:
    """A generated scene.

    Attributes:
        cube: ``(H, W, B)`` float32 reflectance-like values in about [0, 1].
        labels: ``(H, W)`` int32 class ids, ``0`` = unlabeled (region borders are unlabeled).
        wavelengths: ``(B,)`` band centres in nm.
        class_names: one name per class id ``1..K``.
        texture_classes: the ids of the two spectral twins (smooth, striped).
    """

    cube: np.ndarray
    labels: np.ndarray
    wavelengths: np.ndarray
    class_names: list[str]
    texture_classes: tuple[int, int]


def make_synthetic_scene(
    height: int = 96,
    width: int = 96,
    n_bands: int = 64,
    n_classes: int = 8,
    *,
    seed: int = 0,
    region_size: int = 16,
    noise: float = 0.01,
    label_map: np.ndarray | None = None,
) -> SyntheticScene:
    """Generate a synthetic scene.

    Args:
        height, width: scene size in pixels (ignored when ``label_map`` is given).
        n_bands: number of spectral bands, spread evenly over 400-2500 nm.
        n_classes: number of classes, at least 6 (ignored when ``label_map`` is given).
        seed: random seed; the same arguments give the same scene, bit for bit.
        region_size: typical region side in pixels.
        noise: standard deviation of the per-pixel, per-band Gaussian noise.
        label_map: optional ``(H, W)`` integer map (0 = unlabeled) to render on.

    Returns:
        The generated :class:`SyntheticScene`.
    """
    given, ids = _check_synthetic(height, width, n_bands, n_classes, label_map)
    if given is not None:
        (height, width), n_classes = given.shape, int(ids.size)
    rng = np.random.default_rng(seed)
    wavelengths = np.linspace(400.0, 2500.0, n_bands)
    spectra = _endmembers(n_classes + _BACKGROUNDS, wavelengths, rng)
    # the spectral twins: the last two classes share a spectrum up to a tiny offset
    twin_a, twin_b = n_classes - 2, n_classes - 1
    spectra[twin_b] = spectra[twin_a] * (1.0 + 0.2 * noise)
    regions = _voronoi(height, width, region_size, rng)
    if given is None:
        labels, class_index = _random_classes(regions, n_classes, region_size, rng)
        class_names = [f"class_{k + 1}" for k in range(n_classes)]
        twins = (twin_a + 1, twin_b + 1)
    else:
        labels, class_index = _given_classes(given, ids, regions)
        class_names = [f"class_{int(v)}" for v in ids]
        twins = (int(ids[twin_a]), int(ids[twin_b]))
    cube = _cube(spectra, class_index, twin_b, noise, rng)
    names = list(class_names)
    names[twin_a] += "_smooth"
    names[twin_b] += "_striped"
    return SyntheticScene(
        cube=cube.astype(np.float32),
        labels=labels,
        wavelengths=wavelengths,
        class_names=names,
        texture_classes=twins,
    )


_BACKGROUNDS = 3  # spectra of the unlabelled background around a given label map


def _check_synthetic(
    height: int, width: int, n_bands: int, n_classes: int, label_map: np.ndarray | None
) -> tuple[np.ndarray | None, np.ndarray]:
    """The sizes checked; the given label map (as integers) and its class ids, if any."""
    if n_bands < 3:
        raise ConfigError(f"`n_bands` must be at least 3, got {n_bands}")
    given, ids = None, np.arange(1, n_classes + 1)
    if label_map is not None:
        given = np.asarray(label_map).astype(np.int64)
        height, width = given.shape
        ids = np.unique(given[given > 0])
        if ids.size < 2:
            raise ConfigError("`label_map` must hold at least two classes")
    elif n_classes < 6:
        raise ConfigError(f"`n_classes` must be at least 6, got {n_classes}")
    if height < 8 or width < 8:
        raise ConfigError(f"scene must be at least 8x8 pixels, got {height}x{width}")
    return given, ids


def _random_classes(
    regions: np.ndarray, n_classes: int, region_size: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """A class per region, every class at least once; labels with the regions' borders left
    unlabelled, and every pixel's class index."""
    n_regions = int(regions.max()) + 1
    if n_regions < n_classes:
        height, width = regions.shape
        raise ConfigError(
            f"a {height}x{width} scene with `region_size` {region_size} has only "
            f"{n_regions} regions, fewer than {n_classes} classes: lower `region_size`"
        )
    region_class = rng.integers(0, n_classes, n_regions)
    region_class[rng.permutation(n_regions)[:n_classes]] = np.arange(n_classes)
    cls = region_class[regions]
    labels = np.where(_borders(regions), 0, cls + 1).astype(np.int32)
    return labels, cls


def _given_classes(
    given: np.ndarray, ids: np.ndarray, regions: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """The given label map's classes; its unlabelled pixels take background spectra by
    region."""
    index_of = {int(v): i for i, v in enumerate(ids)}
    class_index = np.full(given.shape, -1, dtype=np.int64)
    labeled = given > 0
    class_index[labeled] = np.vectorize(index_of.__getitem__)(given[labeled])
    background = ids.size + regions % _BACKGROUNDS
    class_index = np.where(labeled, class_index, background)
    return np.where(labeled, given, 0).astype(np.int32), class_index


def _cube(
    spectra: np.ndarray,
    class_index: np.ndarray,
    twin_b: int,
    noise: float,
    rng: np.random.Generator,
) -> np.ndarray:
    """Each pixel's class spectrum, stripes on twin B, a smooth illumination field, noise."""
    height, width = class_index.shape
    cube = spectra[class_index].astype(np.float64)
    # stripe texture on twin B only: period-4 stripes, +-25 % brightness
    yy, xx = np.mgrid[0:height, 0:width]
    stripes = np.where(((xx + yy) // 2) % 2 == 0, 1.25, 0.75)
    cube *= np.where(class_index == twin_b, stripes, 1.0)[..., None]
    illum = ndimage.gaussian_filter(
        rng.normal(0.0, 1.0, (height, width)), sigma=max(height, width) / 8
    )
    illum = 1.0 + 0.05 * illum / (np.abs(illum).max() + 1e-12)
    cube *= illum[..., None]
    cube += rng.normal(0.0, noise, cube.shape)
    return cube


def _endmembers(n: int, wavelengths: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """``n`` smooth, distinct spectra over ``wavelengths``, ``(n, B)``, in about [0.05, 0.8]."""
    wl = (wavelengths - 400.0) / 2100.0
    out = np.empty((n, wl.size))
    for i in range(n):
        base = rng.uniform(0.15, 0.45) + rng.uniform(-0.15, 0.15) * wl
        for _ in range(3):
            centre, width = rng.uniform(0.0, 1.0), rng.uniform(0.05, 0.2)
            base += rng.uniform(-0.2, 0.25) * np.exp(-0.5 * ((wl - centre) / width) ** 2)
        out[i] = np.clip(base, 0.05, 0.8)
    return out


def _voronoi(height: int, width: int, region_size: int, rng: np.random.Generator) -> np.ndarray:
    """Region index per pixel from random seed points (nearest-seed cells)."""
    n_seeds = max(8, (height * width) // max(1, region_size**2))
    seeds = np.stack([rng.uniform(0, height, n_seeds), rng.uniform(0, width, n_seeds)], axis=1)
    marker = np.zeros((height, width), dtype=bool)
    marker[seeds[:, 0].astype(int), seeds[:, 1].astype(int)] = True
    _, (iy, ix) = ndimage.distance_transform_edt(~marker, return_indices=True)
    seed_id = np.full((height, width), -1, dtype=np.int64)
    seed_id[seeds[:, 0].astype(int), seeds[:, 1].astype(int)] = np.arange(n_seeds)
    regions = seed_id[iy, ix]
    _, regions = np.unique(regions, return_inverse=True)
    return regions.reshape(height, width)


def _borders(regions: np.ndarray) -> np.ndarray:
    """Pixels whose 4-neighbourhood holds another region."""
    border = np.zeros(regions.shape, dtype=bool)
    border[1:, :] |= regions[1:, :] != regions[:-1, :]
    border[:-1, :] |= regions[:-1, :] != regions[1:, :]
    border[:, 1:] |= regions[:, 1:] != regions[:, :-1]
    border[:, :-1] |= regions[:, :-1] != regions[:, 1:]
    return border
