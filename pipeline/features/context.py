"""Spectral-spatial context: per-pixel features computed from the scene cube, not the backbone.

On a few-label scene most of the spatial signal is context: a pixel's neighbours, the object it
belongs to. :func:`write_context` computes named *families* of context features once into a
context store that every head can read beside (or instead of) the diffusion features:

=============  ==================================================================================
family         what it holds (``k`` = ``components`` principal components of the standardised
               cube, fitted on a seeded sample of all pixels, labelled or not)
=============  ==================================================================================
``meanW``      the ``k`` components averaged over a W x W window (``filter: box``; ``gaussian``
               uses sigma = W / 6), one family per window of ``windows``
``emp``        an extended morphological profile: the first ``emp_components`` components and
               their openings and closings by reconstruction with discs of ``emp_radii``
``slicN``      the mean of the ``k`` components over the SLIC superpixel (about N pixels) a pixel
               belongs to, one family per size of ``slic_sizes``
=============  ==================================================================================

The store (``CONTEXT.zarr``) holds one ``(y, x, <family>.channel)`` float32 array per family and
opens with ``xarray.open_zarr``; its attributes hold the format, an identity (the scene's image
fingerprint and the configuration: a store made from another image or with other settings is
refused) and provenance (explained variance, package versions). It is written atomically: a
run that dies leaves nothing, and running it again gives the same bytes.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.errors import ConfigError, StoreError
from pipeline.features.config import ContextConfig
from pipeline.io.storage import Location
from pipeline.io.store import describe_codecs, jsonable, package_versions, sha256_arrays
from pipeline.scene.render import fill_no_data

__all__ = [
    "CONTEXT_FORMAT",
    "ContextStore",
    "context_features",
    "context_info",
    "reduce_spectra",
    "verify_context",
    "write_context",
]

CONTEXT_FORMAT = "hsicache-context/1"
_PCA_SAMPLE = 65536  # pixels the principal components are fitted on (all, in smaller scenes)
_ROWS = 128  # rows of the cube standardised and projected at a time (bounded memory)

ProgressFn = Callable[[int, int], None]


def reduce_spectra(
    cube: Any,
    band_mean: np.ndarray,
    band_std: np.ndarray,
    components: int,
    seed: int,
    valid: np.ndarray | None = None,
) -> tuple[np.ndarray, dict[str, Any]]:
    """The standardised cube projected on its first principal components.

    The components are fitted (scikit-learn's PCA) on a seeded sample of at most
    65,536 pixels, labelled or not (only ``valid`` ones: not the pixels without data), and the
    whole cube is projected a block of rows at a time, so memory stays near the size of the
    result.

    Returns:
        ``((H, W, components) float32, provenance)``.
    """
    from sklearn.decomposition import PCA

    h, w, b = cube.shape
    scale = np.where(band_std > 0, band_std, 1.0).astype(np.float32)
    rng = np.random.default_rng(seed)
    pool = np.arange(h * w) if valid is None else np.flatnonzero(valid.ravel())
    picks = np.sort(rng.choice(pool, size=min(pool.size, _PCA_SAMPLE), replace=False))
    sample = _standardised(cube, picks // w, picks % w, band_mean, scale)
    pca = PCA(n_components=components, svd_solver="full").fit(sample)
    out = np.empty((h, w, components), dtype=np.float32)
    for y0 in range(0, h, _ROWS):
        block = np.asarray(cube[y0 : y0 + _ROWS], dtype=np.float32)
        z = ((block - band_mean) / scale).reshape(-1, b)
        out[y0 : y0 + _ROWS] = pca.transform(z).reshape(block.shape[0], w, components)
    info = {
        "explained_variance_ratio": pca.explained_variance_ratio_.astype(float).round(6),
        "fitted_on_pixels": int(picks.size),
    }
    return out, jsonable(info)


def _standardised(
    cube: Any, rows: np.ndarray, cols: np.ndarray, mean: np.ndarray, scale: np.ndarray
) -> np.ndarray:
    """Standardised spectra of the pixels ``(rows, cols)`` (rows sorted), read row block by
    row block."""
    parts = []
    for y0 in range(0, int(rows.max()) + 1 if rows.size else 0, _ROWS):
        sel = (rows >= y0) & (rows < y0 + _ROWS)
        if sel.any():
            block = np.asarray(cube[y0 : y0 + _ROWS], dtype=np.float32)
            parts.append(block[rows[sel] - y0, cols[sel]])
    return (np.concatenate(parts) - mean) / scale


def mean_family(
    pcs: np.ndarray, window: int, kind: str = "box", valid: np.ndarray | None = None
) -> np.ndarray:
    """The components averaged over a ``window`` x ``window`` neighbourhood (reflect border);
    with ``valid``, over its valid pixels only (normalised convolution), so the values filled
    in where the scene has no data do not bleed into their neighbours' context."""
    if valid is None:
        return _smoothed(pcs, window, kind)
    weight = valid.astype(np.float32)[..., None]
    total = _smoothed(pcs * weight, window, kind)
    share = _smoothed(weight, window, kind)
    return np.where(share > 1e-6, total / np.maximum(share, 1e-6), pcs).astype(np.float32)


def _smoothed(values: np.ndarray, window: int, kind: str) -> np.ndarray:
    from scipy import ndimage

    if kind == "box":
        return ndimage.uniform_filter(values, size=(window, window, 1), mode="reflect")
    sigma = window / 6.0
    return ndimage.gaussian_filter(values, sigma=(sigma, sigma, 0), mode="reflect", truncate=3.0)


def emp_family(
    pcs: np.ndarray, n_components: int, radii: Sequence[int], valid: np.ndarray | None = None
) -> np.ndarray:
    """Extended morphological profile: per component, the component itself and its openings
    and closings by reconstruction with a disc of each radius (scikit-image). With ``valid``,
    each pixel without data first takes the value of its nearest valid pixel, so the values
    filled in there make no plateau of their own that openings and closings would spread."""
    from skimage.morphology import dilation, disk, erosion, reconstruction

    pcs = pcs if valid is None else fill_no_data(pcs, ~valid)
    layers = []
    for c in range(n_components):
        image = np.ascontiguousarray(pcs[..., c], dtype=np.float64)
        layers.append(image)
        for r in radii:
            footprint = disk(r, decomposition="sequence")
            opened = reconstruction(erosion(image, footprint), image, method="dilation")
            closed = reconstruction(dilation(image, footprint), image, method="erosion")
            layers += [opened, closed]
    return np.stack(layers, axis=-1).astype(np.float32)


def slic_family(
    pcs: np.ndarray, size: int, seed_channels: int = 3, valid: np.ndarray | None = None
) -> np.ndarray:
    """Mean of the components over each pixel's SLIC superpixel of about ``size`` pixels.

    The superpixels are cut (scikit-image's SLIC) on the first ``seed_channels`` components,
    scaled to [0, 1] together; every component is then averaged per superpixel. With ``valid``,
    superpixels are cut over the valid pixels only (SLIC's ``mask``) and a pixel without data
    keeps its own components.
    """
    from skimage.segmentation import slic

    h, w, k = pcs.shape
    valid = None if valid is None or np.all(valid) else np.asarray(valid, bool)
    inside = np.ones((h, w), bool) if valid is None else valid.copy()
    n_segments = max(1, round(int(inside.sum()) / size))
    guide = pcs[..., : min(seed_channels, k)].astype(np.float64)
    lo, hi = guide[inside].min(), guide[inside].max()
    guide = (guide - lo) / (hi - lo) if hi > lo else np.zeros_like(guide)
    if n_segments == 1:  # one superpixel (SLIC's masked seeding needs two seeds)
        segments = inside.astype(np.intp)
    else:
        segments = slic(
            guide,
            n_segments=n_segments,
            compactness=0.1,
            channel_axis=-1,
            convert2lab=False,  # principal components are not RGB
            start_label=1,  # 0: outside the mask
            enforce_connectivity=True,
            mask=valid,
        )
    inside &= segments > 0  # label 0: without data, or with data but reached by no seed
    flat = np.where(inside, segments, 0).ravel()
    weight = inside.ravel().astype(np.float64)
    counts = np.bincount(flat, weights=weight)
    means = np.stack(
        [
            np.bincount(flat, weights=pcs[..., c].ravel() * weight) / np.maximum(counts, 1e-12)
            for c in range(k)
        ],
        axis=-1,
    )
    return np.where(inside[..., None], means[segments], pcs).astype(np.float32)


def context_features(
    pcs: np.ndarray,
    config: ContextConfig,
    progress: ProgressFn | None = None,
    valid: np.ndarray | None = None,
) -> dict[str, np.ndarray]:
    """Every family of ``config`` computed from the reduced cube ``pcs``, by name; from the
    ``valid`` pixels only when given (the values filled in where the scene has no data reach
    no other pixel's context)."""
    if valid is not None and not valid.any():
        raise ConfigError("the scene has no pixel with data to compute context from")
    out: dict[str, np.ndarray] = {}
    names = config.families
    for k, name in enumerate(names):
        if name.startswith("mean"):
            out[name] = mean_family(pcs, int(name[4:]), config.filter, valid).astype(np.float32)
        elif name == "emp":
            out[name] = emp_family(pcs, config.emp_components, config.emp_radii, valid)
        else:
            out[name] = slic_family(pcs, int(name[4:]), valid=valid)
        if progress:
            progress(k + 1, len(names))
    return out


def write_context(
    *,
    scene: str | Path,
    out: str | Path,
    config: ContextConfig | None = None,
    progress: ProgressFn | None = None,
) -> ContextStore:
    """Compute the context families of a prepared scene and write the context store.

    Args:
        scene: the scene store written by ``prepare``.
        out: the context store to write (a folder or an fsspec URL); replaces only a context
            store hsicache wrote.
        config: which families (default: :class:`ContextConfig`'s).
        progress: called as ``progress(done_families, total)``.

    Returns:
        The store, opened.
    """
    from pipeline.io.outputs import CONTEXT, check_outputs
    from pipeline.scene.core import open_scene, scene_array

    cfg = config or ContextConfig()
    check_outputs({"out": (out, CONTEXT)}, {"scene": scene})
    sc = open_scene(scene, lazy=True)
    cube = scene_array(scene, "cube")
    cfg.check(sc.shape, int(cube.shape[-1]))
    mean = np.asarray(scene_array(scene, "band_mean")[...], dtype=np.float32)
    std = np.asarray(scene_array(scene, "band_std")[...], dtype=np.float32)
    valid = ~sc.no_data if sc.no_data is not None else None  # None: every pixel has data
    pcs, pca = reduce_spectra(cube, mean, std, cfg.components, cfg.seed, valid)
    families = context_features(pcs, cfg, progress, valid)
    attrs = {
        "format": CONTEXT_FORMAT,
        "complete": True,
        "identity": _identity(sc.image_fingerprint, cfg, valid),
        "families": {
            n: {"channels": int(a.shape[-1]), "reach": cfg.reach(n)} for n, a in families.items()
        },
        "pca": pca,
        "shape": list(sc.shape),
        "package_versions": package_versions(),
    }
    _write_store(families, attrs, Location.of(out))
    return ContextStore.open(out, expect_fingerprint=sc.image_fingerprint)


def _identity(fingerprint: str, cfg: ContextConfig, valid: np.ndarray | None) -> dict[str, Any]:
    """The store's identity. On a scene with pixels without data it names the rule that keeps
    their filled values out of other pixels' context (2: out of emp and slicN too, not only
    the PCA and window means), so heads fitted on a store made by the earlier rule refuse it."""
    ident: dict[str, Any] = {"image_fingerprint": fingerprint, "config": cfg.to_dict()}
    if valid is not None:
        ident["no_data_rule"] = 2
    return ident


def _write_store(families: dict[str, np.ndarray], attrs: dict[str, Any], where: Location) -> None:
    """The families as one zarr store, atomically (a URL: built locally, uploaded last)."""
    import xarray as xr
    from zarr.codecs import BloscCodec, BloscShuffle

    from pipeline.io.outputs import CONTEXT
    from pipeline.io.storage import publish_folder
    from pipeline.io.store import atomic_output

    h, w = next(iter(families.values())).shape[:2]
    chunk = min(256, h), min(256, w)
    ds = xr.Dataset(
        {n: (("y", "x", f"{n}.channel"), a) for n, a in families.items()}, attrs=jsonable(attrs)
    )
    codec = BloscCodec(cname="zstd", clevel=3, shuffle=BloscShuffle.shuffle)
    encoding = {
        n: {"chunks": (*chunk, a.shape[-1]), "compressors": codec} for n, a in families.items()
    }
    if where.is_local:
        with atomic_output(where.path, CONTEXT, option="out") as tmp:
            ds.to_zarr(tmp, mode="w", zarr_format=3, consolidated=False, encoding=encoding)
        return
    from pipeline.io.outputs import check_output

    with tempfile.TemporaryDirectory(prefix="hsicache-context-") as tmp:
        ds.to_zarr(Path(tmp) / "c.zarr", zarr_format=3, consolidated=False, encoding=encoding)
        check_output(str(where), CONTEXT, option="out")  # nothing else arrived meanwhile
        publish_folder(Path(tmp) / "c.zarr", where)


@dataclass
class ContextStore:
    """A context store opened for reading (what heads read context features from).

    Attributes:
        path: the store.
        attrs: its attributes.
    """

    path: Location
    attrs: dict[str, Any]
    _root: Any
    kind = "context store"

    @classmethod
    def open(
        cls, path: str | Path | Location, *, expect_fingerprint: str | None = None
    ) -> ContextStore:
        """Open a context store, refusing one made from another scene image.

        Raises:
            SceneNotFoundError: no store at ``path``.
            StoreError: not a context store, or another image fingerprint.
        """
        from pipeline.features.cache import check_fingerprint, open_store

        p = Location.of(path)
        root, attrs = open_store(p, CONTEXT_FORMAT, "context store", "context")
        damage = _attribute_damage(attrs)
        if damage:
            raise StoreError(f"context store `{p}` is damaged: {damage}")
        check_fingerprint(attrs, expect_fingerprint, p, "context store", "context")
        return cls(path=p, attrs=attrs, _root=root)

    @property
    def families(self) -> list[str]:
        """The families in the store."""
        return list(self.attrs.get("families") or {})

    @property
    def digest(self) -> str:
        """SHA-256 of the identity: what a head records as the context it was trained on."""
        return sha256_arrays(self.attrs["identity"])

    def reach(self, family: str) -> int:
        """Pixels away from a pixel that ``family`` looks."""
        return int(self.attrs["families"][family]["reach"])

    def array(self, family: str) -> Any:
        """The zarr array of one family."""
        if family not in self.families:
            raise ConfigError(
                f"context family `{family}` is not in `{self.path}` (it holds "
                f"{', '.join(self.families)}): add it to the `context:` settings and re-run "
                "`hsicache context`"
            )
        try:
            return self._root[family]
        except (KeyError, OSError, ValueError):
            raise StoreError(
                f"context store `{self.path}` is damaged: array `{family}` is missing"
            ) from None

    def selection(self, families: Sequence[str]) -> list[Any]:
        """The arrays of ``families``, in that order."""
        return [self.array(f) for f in families]

    def gather(self, rows: np.ndarray, cols: np.ndarray, families: Sequence[str]) -> np.ndarray:
        """Context features of the pixels ``(rows[i], cols[i])``: ``(N, C)`` float32."""
        from pipeline.features.cache import gather_points

        rows = np.asarray(rows, dtype=np.int64)
        cols = np.asarray(cols, dtype=np.int64)
        parts = [gather_points(arr, rows, cols, self) for arr in self.selection(families)]
        return np.concatenate(parts, axis=1) if parts else np.empty((rows.size, 0), np.float32)


def context_info(path: str | Path | Location) -> dict[str, Any]:
    """Families, shapes, bytes on disk and provenance of a context store."""
    store = ContextStore.open(path)
    families = {}
    for name in store.families:
        arr = store.array(name)
        families[name] = {
            "shape": list(arr.shape),
            "chunks": list(arr.chunks),
            "dtype": str(arr.dtype),
            "compression": describe_codecs(arr),
            "bytes_on_disk": store.path.nbytes(name),
            "reach": store.reach(name),
        }
    stored = sum(f["bytes_on_disk"] for f in families.values())
    raw = sum(int(np.prod(f["shape"])) * 4 for f in families.values())
    return {
        "path": str(store.path),
        "kind": "context store",
        "complete": bool(store.attrs.get("complete")),
        "shape": list(store.attrs.get("shape") or []),
        "families": families,
        "bytes_on_disk": stored,
        "raw_fp32_bytes": raw,
        "cache_to_raw": stored / raw if raw else 0.0,
        "identity": store.attrs["identity"],
        "pca": store.attrs.get("pca"),
        "package_versions": store.attrs.get("package_versions"),
    }


def _attribute_damage(attrs: dict[str, Any]) -> str | None:
    """What is wrong with a context store's attributes, or ``None``."""
    ident = attrs.get("identity")
    if not isinstance(ident, dict) or "image_fingerprint" not in ident:
        return "its `identity` is missing"
    if not isinstance(ident.get("config"), dict):
        return "its `identity` lacks the `config` it was made with"
    families = attrs.get("families")
    if not isinstance(families, dict) or not families:
        return "its `families` attribute is missing or empty"
    if not all(isinstance(f, dict) and isinstance(f.get("reach"), int) for f in families.values()):
        return "its `families` attribute lacks a family's `reach`"
    shape = attrs.get("shape")
    if not isinstance(shape, list) or len(shape) != 2:
        return "its `shape` attribute is missing"
    pca = attrs.get("pca")
    if not isinstance(pca, dict) or not isinstance(pca.get("explained_variance_ratio"), list):
        return "its `pca` attribute is missing"
    return None


def verify_context(
    path: str | Path | Location, *, scene_fingerprint: str | None = None
) -> list[str]:
    """Every problem of a context store: missing or unreadable arrays and chunks, non-finite
    values, another scene. One line each; empty when it is sound."""
    from pipeline.features.cache import store_problems

    store = ContextStore.open(path)
    unfinished = [] if store.attrs.get("complete") is True else ["the store is not marked complete"]
    return unfinished + store_problems(store._root, store.attrs, store.families, scene_fingerprint)
