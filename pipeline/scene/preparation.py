"""The ``prepare`` step: read a scene, validate it, split it, render it, and write the store."""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.errors import (
    ConfigError,
    HsicacheWarning,
    LabelError,
    NonFiniteError,
    SceneFormatError,
    ShapeMismatchError,
)
from pipeline.scene.builtin import load_builtin
from pipeline.scene.config import PrepareConfig
from pipeline.scene.core import Scene, image_fingerprint, scene_fingerprint, write_scene
from pipeline.scene.readers import Raster, read_cube, read_map
from pipeline.scene.render import Rendering, render_rgb
from pipeline.scene.splits import encode_labels, make_split
from pipeline.utils.arrays import pixels_where_all
from pipeline.utils.checks import counted

__all__ = ["build_scene", "prepare"]


def build_scene(
    config: PrepareConfig | None = None,
    *,
    cube: str | Path | None = None,
    key: str | None = None,
    builtin: str | None = None,
    labels: str | Path | None = None,
    label_key: str | None = None,
    train_mask: str | Path | None = None,
    test_mask: str | Path | None = None,
    mask_key: str | None = None,
    class_names: Sequence[str] | None = None,
    **settings: Any,
) -> Scene:
    """Read, validate, split and render a scene in memory (see :func:`prepare`)."""
    cfg = config.replace(**settings) if config is not None else PrepareConfig(**settings)
    if (cube is None) == (builtin is None):
        got = (
            "got both (a params file may give one: set the other to null there)"
            if cube is not None
            else "got neither"
        )
        raise ConfigError(f"give exactly one of `cube=PATH` and `builtin=NAME`; {got}")
    if (train_mask is None) != (test_mask is None):
        raise ConfigError("`train_mask` and `test_mask` go together: give both or neither")
    # 1. the split masks, read first so a synthetic scene can be rendered on their geometry
    masks = _read_masks(train_mask, test_mask, mask_key)
    # 2. the cube and its labels: a label file, the built-in's, or the union of the masks
    src = _read_source(cube, key, builtin, cfg.seed, masks)
    if labels is not None:
        lab = read_map(labels, label_key, role="label map", key_option="label_key")
        _check_placement(src, lab, f"label map `{labels}`")
        src.label_ids, src.label_source = lab.data, f"label map `{labels}`"
        src.label_names = lab.class_names
    elif src.label_ids is None:
        if masks is None:
            raise ConfigError("no labels: give `labels=PATH` or `train_mask`/`test_mask`")
        src.label_ids, src.label_source = masks.union(), f"masks {masks.names}"
    _check_shapes(src, masks)
    index_map, class_ids = encode_labels(src.label_ids, source=src.label_source)
    if src.label_names:  # the label file names its ids (an ENVI classification header)
        src.class_names = [src.label_names.get(int(c), f"class {c}") for c in class_ids]
    names = _class_names(class_names or src.class_names, class_ids)
    # 3. the cube's values: a pixel without data (a NaN/inf band, or every band at the file's
    #    no-data value) is filled as `nan_policy` says and left out of the split
    cube_f, empty = _cube_values(src, cfg)
    index_map, masks = _leave_out(empty, index_map, class_ids, masks, src.source)
    # 4. the split
    train, test, record = _split(index_map, class_ids, cfg, masks)
    # 5. the rendering the backbone will see
    rgb, rendering = render_rgb(
        cube_f,
        mode=cfg.rgb_mode,
        bands=cfg.rgb_bands,
        wavelengths=src.wavelengths,
        gamma=cfg.gamma,
        clip=cfg.clip,
        valid=~empty,
    )
    _check_degenerate(cube_f, rgb, class_ids, test, src.source, cfg.allow_degenerate)
    extra = {"split": record, "nan_policy": cfg.nan_policy}
    scene = _scene(src, cube_f, rgb, rendering, index_map, class_ids, names, train, test, extra)
    return replace(scene, no_data=empty if empty.any() else None)


@dataclass
class _Masks:
    """The official split masks and the files they came from."""

    train: np.ndarray
    test: np.ndarray
    train_path: str | Path
    test_path: str | Path
    placed: tuple[Raster, ...] = ()  # the masks as read, with their georeferencing

    @property
    def names(self) -> str:
        return f"`{self.train_path}` + `{self.test_path}`"

    def union(self) -> np.ndarray:
        return _union_of_masks((self.train, self.test), self.train_path, self.test_path)


@dataclass
class _Source:
    """What the cube's file (or the built-in scene) gives."""

    data: np.ndarray
    attrs: dict[str, Any]
    wavelengths: np.ndarray | None = None
    crs: Any = None
    transform: Any = None
    label_ids: np.ndarray | None = None
    label_source: str = "label map"
    class_names: Sequence[str] | None = None
    nodata: float | tuple[float, ...] | None = None
    label_names: dict[int, str] | None = None  # what the label file calls its ids

    @property
    def source(self) -> str:
        return self.attrs["source"]


def _read_masks(
    train_mask: str | Path | None, test_mask: str | Path | None, mask_key: str | None
) -> _Masks | None:
    if train_mask is None or test_mask is None:
        return None
    train_map = read_map(train_mask, mask_key, role="train mask", key_option="mask_key")
    test_map = read_map(test_mask, mask_key, role="test mask", key_option="mask_key")
    train, test = train_map.data, test_map.data
    if train.shape != test.shape:
        raise ShapeMismatchError(
            f"train mask `{train_mask}` has shape {train.shape} but test mask "
            f"`{test_mask}` has {test.shape}"
        )
    return _Masks(train, test, train_mask, test_mask, placed=(train_map, test_map))


def _read_source(
    cube: str | Path | None, key: str | None, builtin: str | None, seed: int, masks: _Masks | None
) -> _Source:
    """The cube of a file, or a built-in scene with its labels (drawn on the masks' geometry)."""
    if builtin is not None:
        geometry = masks.union() if masks is not None else None
        found = load_builtin(builtin, seed=seed, label_map=geometry)
        attrs = {"source": found.source, "attribution": found.attribution}
        return _Source(
            found.cube,
            attrs,
            wavelengths=found.wavelengths,
            label_ids=found.labels,
            label_source=f"built-in `{builtin}` labels",
            class_names=found.class_names,
        )
    raster = read_cube(cube, key)  # type: ignore[arg-type]
    if raster.data.shape[-1] < 3:
        n = raster.data.shape[-1]
        raise SceneFormatError(
            f"cube `{cube}` has {n} band{'s' if n > 1 else ''}: hsicache classifies spectral "
            "cubes of at least 3 bands (is it a label map?)"
        )
    wavelengths = raster.wavelengths
    if wavelengths is not None and len(wavelengths) != raster.data.shape[-1]:
        warnings.warn(
            f"cube `{cube}` gives {len(wavelengths)} wavelengths for {raster.data.shape[-1]} "
            "bands: they are ignored (no wavelength rendering)",
            HsicacheWarning,
            stacklevel=3,
        )
        wavelengths = None
    attrs = {"source": str(cube), "source_key": raster.key, "attribution": None}
    return _Source(
        raster.data, attrs, wavelengths, raster.crs, raster.transform, nodata=raster.nodata
    )


def _check_placement(src: _Source, other: Raster, what: str) -> None:
    """Refuse a georeferenced map that lies elsewhere on Earth than its georeferenced cube."""
    if not (src.crs and other.crs and src.transform and other.transform):
        return
    from rasterio.crs import CRS

    if CRS.from_wkt(src.crs) != CRS.from_wkt(other.crs):
        theirs, ours = _crs_name(other.crs), _crs_name(src.crs)
        if theirs == ours:  # two CRSs that print alike: their WKT tells them apart
            theirs, ours = f"`{other.crs}`", f"`{src.crs}`"
        differs = f"its CRS is {theirs}, the cube's {ours}"
    else:
        pixel = max(abs(v) for v in (*src.transform[:2], *src.transform[3:5]))
        if np.allclose(src.transform, other.transform, rtol=0, atol=1e-3 * pixel):
            return
        differs = f"its transform {tuple(other.transform)} is not the cube's {tuple(src.transform)}"
    raise ShapeMismatchError(
        f"{what} is georeferenced differently from the cube `{src.source}`: {differs}; they "
        "must cover the same pixels"
    )


def _crs_name(wkt: str) -> str:
    """A CRS in a few words for messages: its EPSG code when it has one, else its PROJ
    string."""
    from rasterio.crs import CRS

    crs = CRS.from_wkt(wkt)
    code = crs.to_epsg()
    return f"EPSG:{code}" if code else f"`{crs.to_string()}`"


def _check_shapes(src: _Source, masks: _Masks | None) -> None:
    for raster in masks.placed if masks is not None else ():
        _check_placement(src, raster, f"mask `{raster.source}`")
    height, width = src.data.shape[:2]
    if src.label_ids.shape != (height, width):
        hint = (
            "; the cube looks bands-first: save it as (height, width, bands)"
            if src.label_ids.shape == src.data.shape[1:]
            else ""
        )
        raise ShapeMismatchError(
            f"{src.label_source} has shape {src.label_ids.shape} but the cube is "
            f"{height}x{width} (height x width): they must match{hint}"
        )
    if masks is not None and masks.train.shape != (height, width):
        raise ShapeMismatchError(
            f"train mask `{masks.train_path}` has shape {masks.train.shape} but the cube is "
            f"{height}x{width}"
        )


def _class_names(given: Sequence[str] | None, class_ids: np.ndarray) -> list[str]:
    if given is not None and len(given) != len(class_ids):
        raise ConfigError(
            f"`class_names` gives {len(given)} names but the labels have "
            f"{len(class_ids)} classes (ids {', '.join(map(str, class_ids))})"
        )
    return list(given) if given is not None else [f"class {c}" for c in class_ids]


def _scene(
    src: _Source,
    cube: np.ndarray,
    rgb: np.ndarray,
    rendering: Rendering,
    index_map: np.ndarray,
    class_ids: np.ndarray,
    names: list[str],
    train: np.ndarray,
    test: np.ndarray,
    record: dict[str, Any],
) -> Scene:
    """The scene, with its provenance and fingerprints in its attributes."""
    attrs = {
        **src.attrs,
        "rendering": rendering.to_dict(),
        **record,
        "n_train": int(train.sum()),
        "n_test": int(test.sum()),
        "fingerprint": scene_fingerprint(cube, index_map, train, test, rendering.to_dict()),
        "image_fingerprint": image_fingerprint(cube, rendering.to_dict()),
    }
    return Scene(
        cube=cube,
        rgb=rgb,
        labels=index_map,
        train=train,
        test=test,
        class_ids=class_ids,
        class_names=names,
        wavelengths=src.wavelengths,
        crs=src.crs,
        transform=src.transform,
        attrs=attrs,
    )


def _split(
    index_map: np.ndarray, class_ids: np.ndarray, cfg: PrepareConfig, masks: _Masks | None
) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """The train and test masks, and the split's record (only the values it used)."""
    protocol = cfg.split or ("official" if masks is not None else "per-class")
    if protocol == "official" and masks is None:
        raise ConfigError("`split=official` needs `train_mask` and `test_mask`")
    if masks is not None and protocol != "official":
        warnings.warn(
            f"`split={protocol}` draws a new split from the labels of `train_mask` and "
            "`test_mask` together; `split=official` keeps theirs",
            HsicacheWarning,
            stacklevel=3,
        )
    counted = protocol in ("per-class", "blocks")
    train, test = make_split(
        protocol,
        index_map,
        class_ids,
        seed=cfg.seed,
        per_class=cfg.per_class if counted else None,
        fraction=cfg.fraction,
        small_classes=cfg.small_classes,  # type: ignore[arg-type]
        block_size=cfg.block_size,
        buffer=cfg.buffer,
        train_mask=masks.train if masks else None,
        test_mask=masks.test if masks else None,
    )
    record = {
        "protocol": protocol,
        "seed": cfg.seed,
        "per_class": cfg.per_class if counted else None,
        "fraction": cfg.fraction if protocol in ("fraction", "blocks") else None,
        "small_classes": cfg.small_classes,
        "block_size": cfg.block_size if protocol == "blocks" else None,
        "buffer": cfg.buffer if protocol == "blocks" else None,
        "train_mask": str(masks.train_path) if masks else None,
        "test_mask": str(masks.test_path) if masks else None,
    }
    return train, test, record


def prepare(
    config: PrepareConfig | None = None,
    *,
    out: str | Path,
    preview: str | Path | None = None,
    **kwargs: Any,
) -> Scene:
    """Read, validate, split and render a scene, then write the store (and a preview PNG).

    Args:
        config: how the scene is split and rendered
            (:class:`~pipeline.scene.config.PrepareConfig`).
        out: the scene store to write (``*.zarr``); written atomically.
        preview: optional PNG of the rendering with the train/test pixels drawn on it.
        **kwargs: as :func:`build_scene`: the input (``cube``/``key`` or ``builtin``;
            ``labels``/``label_key``; ``train_mask``/``test_mask``/``mask_key``;
            ``class_names``) and any :class:`PrepareConfig` field (``per_class=5``...),
            given directly or overriding ``config``'s.

    Returns:
        The prepared :class:`~pipeline.scene.core.Scene`.
    """
    from pipeline.io.outputs import PNG, SCENE, check_outputs

    check_outputs(
        {"out": (out, SCENE), "preview": (preview, PNG)},
        {k: kwargs.get(k) for k in _INPUT_FILES},
    )
    scene = build_scene(config, **kwargs)
    from pipeline.io.outputs import png_metadata
    from pipeline.io.store import all_or_nothing, atomic_output
    from pipeline.scene.plots import plot_scene_preview

    with all_or_nothing():  # the scene and its preview, or neither
        if preview is not None:
            with atomic_output(preview, PNG, option="preview") as tmp_png:
                fig = plot_scene_preview(scene)
                fig.savefig(tmp_png, format="png", dpi=110, metadata=png_metadata())
        write_scene(scene, out)
    return scene


_INPUT_FILES = ("cube", "labels", "train_mask", "test_mask")


def _check_degenerate(
    cube: np.ndarray,
    rgb: np.ndarray,
    class_ids: np.ndarray,
    test: np.ndarray,
    source: str,
    allow: bool,
) -> None:
    """Refuse data no classifier can be trained or judged on, unless ``allow``; warn about
    constant bands (they carry nothing)."""
    flat = cube.reshape(-1, cube.shape[-1])
    low, high = flat.min(axis=0), flat.max(axis=0)
    problems = []
    if len(class_ids) < 2:
        problems.append(
            f"the labels hold one class only (id {class_ids[0]}): a classifier needs two or more"
        )
    if not test.any():
        problems.append("the split leaves no test pixel, so no accuracy can be measured")
    if (low == high).all() and low.min() == high.max():
        problems.append(f"the cube is constant (every value is {float(low[0]):g})")
    elif float(rgb.min()) == float(rgb.max()):
        problems.append("the 3-band rendering is constant: the backbone would see a flat image")
    if problems and not allow:
        raise SceneFormatError(
            f"scene `{source}`: {problems[0]}; pass `allow_degenerate` to prepare it anyway"
        )
    constant = np.flatnonzero(low == high)
    if constant.size and constant.size < flat.shape[1]:
        shown = ", ".join(str(b) for b in constant[:5]) + (", ..." if constant.size > 5 else "")
        warnings.warn(
            f"{constant.size} of {flat.shape[1]} bands of `{source}` are constant (0-based "
            f"{shown}): they carry no information",
            HsicacheWarning,
            stacklevel=3,
        )


def _union_of_masks(
    masks: tuple[np.ndarray, np.ndarray], train_path: object, test_path: object
) -> np.ndarray:
    """The label map given by two class-valued split masks (they must not overlap)."""
    a, b = (np.nan_to_num(np.asarray(m, dtype=np.float64)) for m in masks)
    overlap = (a != 0) & (b != 0)
    if overlap.any():
        ys, xs = np.nonzero(overlap)
        raise LabelError(
            f"train mask `{train_path}` and test mask `{test_path}` overlap in "
            f"{int(overlap.sum())} pixels (first at row {ys[0]}, column {xs[0]}); "
            "they must be disjoint"
        )
    return a + b


def _cube_values(src: _Source, cfg: PrepareConfig) -> tuple[np.ndarray, np.ndarray]:
    """The float32 cube with its missing values filled (or an error), and ``(H, W)``: the
    pixels without data. ``src.data`` becomes the float32 cube: a file's own array (int16
    counts, say) is not kept beside it."""
    no_data = _no_data_pixels(src)
    cube = src.data = np.asarray(src.data, dtype=np.float32)
    empty = no_data | ~pixels_where_all(cube, np.isfinite)
    if not empty.any():
        return cube, empty
    missing = ~np.isfinite(cube) | no_data[..., None]
    return _fill_missing(cube, missing, cfg, src), empty


def _no_data_pixels(src: _Source) -> np.ndarray:
    """``(H, W)``: the pixels whose every band holds the file's no-data value (GDAL's rule:
    a band that is no-data throughout, such as a sensor's dead band, leaves its pixels valid)."""
    data = np.asarray(src.data)
    if src.nodata is None:
        return np.zeros(data.shape[:2], dtype=bool)
    values = np.broadcast_to(np.asarray(src.nodata, dtype=np.float64), data.shape[-1:])

    def hit(block: np.ndarray) -> np.ndarray:
        same = block == values
        return same | (np.isnan(values) & np.isnan(block)) if np.isnan(values).any() else same

    return pixels_where_all(data, hit)


def _fill_missing(
    cube: np.ndarray, bad: np.ndarray, cfg: PrepareConfig, src: _Source
) -> np.ndarray:
    """The cube with its missing values filled as ``cfg.nan_policy`` says, or an error."""
    if not bad.any():
        return cube
    if cfg.nan_policy == "error":
        pixels = counted(int(bad.any(axis=-1).sum()), "pixel")
        raise NonFiniteError(
            f"cube `{src.source}` has {pixels} without data (NaN/inf values"
            f"{_declared(src.nodata)}{_masked(src.source)}): pass `nan_policy=zero` or "
            "`nan_policy=band-mean` to "
            "fill them (they then take no part in the split)"
        )
    cube = cube.copy()
    if cfg.nan_policy == "zero":
        cube[bad] = 0.0
    else:
        masked = np.where(bad, np.nan, cube)
        means = np.nanmean(masked.reshape(-1, cube.shape[-1]), axis=0)
        means = np.nan_to_num(means)
        cube[bad] = np.broadcast_to(means, cube.shape)[bad]
    return cube


def _masked(source: str) -> str:
    """How a message names a GeoTIFF's mask (read as NaN by the reader) among the causes."""
    return ", or invalid in its mask" if str(source).lower().endswith((".tif", ".tiff")) else ""


def _declared(nodata: float | tuple[float, ...] | None) -> str:
    """How a message names the file's no-data value(s)."""
    if nodata is None or (np.isscalar(nodata) and np.isnan(nodata)):
        return ""
    if not np.isscalar(nodata):
        return ", or every band at its no-data value in the file"
    value = float(np.asarray(nodata))
    shown = str(int(value)) if value.is_integer() else repr(value)
    return f", or every band at the file's no-data value {shown}"


def _leave_out(
    empty: np.ndarray,
    index_map: np.ndarray,
    class_ids: np.ndarray,
    masks: _Masks | None,
    source: str,
) -> tuple[np.ndarray, _Masks | None]:
    """Pixels without data are neither train nor test pixels: a classifier is not fitted or
    judged on values made up for them. A class left without pixels is an error."""
    dropped = int((empty & (index_map >= 0)).sum())
    if not dropped:
        return index_map, masks
    index_map = np.where(empty, -1, index_map).astype(index_map.dtype)
    left = np.bincount(index_map[index_map >= 0], minlength=len(class_ids))
    if (left == 0).any():
        k = int(np.flatnonzero(left == 0)[0])
        raise LabelError(
            f"every labelled pixel of class {class_ids[k]} has no data in `{source}` (NaN/inf "
            "or the file's no-data value): no split can hold that class"
        )
    warnings.warn(
        f"{counted(dropped, 'labelled pixel')} of `{source}` without data left out of the split",
        HsicacheWarning,
        stacklevel=3,
    )
    if masks is not None:
        masks = replace(
            masks, train=np.where(empty, 0, masks.train), test=np.where(empty, 0, masks.test)
        )
    return index_map, masks
