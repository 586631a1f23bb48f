"""Readers for hyperspectral cubes, label maps and split masks.

Supported formats (chosen by file suffix):

* MATLAB ``.mat`` v5 (scipy) and v7.3 / HDF5 (h5py; v7.3 stores arrays transposed, which is
  undone here);
* NumPy ``.npy`` and ``.npz``;
* ENVI: a ``.hdr`` header beside a binary file, BSQ / BIL / BIP, with wavelengths when the header
  has them (read with the ``spectral`` package);
* GeoTIFF ``.tif`` / ``.tiff`` (rasterio), keeping the CRS and affine transform, and reading
  a GDAL mask (internal, ``.msk`` sidecar, or alpha band) as no data (see :class:`Raster`).

A container (``.mat``, ``.npz``) that holds exactly one array of the wanted rank is read without a
key; otherwise the error lists what it found and asks for a key.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline.errors import (
    HsicacheError,
    HsicacheWarning,
    KeyAmbiguityError,
    SceneFormatError,
    SceneNotFoundError,
)

__all__ = [
    "ENVI_DATA_SUFFIXES",
    "Raster",
    "read_cube",
    "read_map",
]

ENVI_DATA_SUFFIXES = (".img", ".dat", ".raw", ".bsq", ".bil", ".bip", "")
_MATLAB_INTERNAL = ("#refs#", "#subsystem#")


@dataclass
class Raster:
    """An array read from a file, with what the file said about it.

    Attributes:
        data: ``(height, width, bands)`` for a cube, ``(height, width)`` for a map.
        wavelengths: band centres in nanometres, ``(bands,)``, when the file gives them.
        crs: coordinate reference system as WKT, when the file is georeferenced.
        transform: affine pixel-to-map transform ``(a, b, c, d, e, f)`` as in rasterio.
        source: the path that was read.
        key: the variable name inside a container file, when there was one.
        nodata: the value the file declares for "no data" (a GeoTIFF's ``nodata``, per band
            when its bands differ; an ENVI header's ``data ignore value``). A map's no-data
            pixels are read as 0 (unlabelled); a cube keeps its values, and ``prepare`` takes
            a pixel whose every band is no-data as a pixel without data.
        class_names: the names a map's file gives its class ids (an ENVI classification
            header's ``class names``: id ``i`` is the ``i``-th name), when it gives them.

    A GeoTIFF's GDAL mask (an internal per-dataset mask, a ``.msk`` sidecar, or an alpha band)
    marks no data too, whether or not the file declares ``nodata``: a map reads the pixels it
    marks invalid as 0 (unlabelled), and a cube reads them as NaN in every band (as float, for
    an integer file), which ``prepare`` takes as a pixel without data like any NaN. An alpha
    band is never read as a band of ``data``.
    """

    data: np.ndarray
    wavelengths: np.ndarray | None = None
    crs: str | None = None
    transform: tuple[float, ...] | None = None
    source: str = ""
    key: str | None = None
    nodata: float | tuple[float, ...] | None = None
    class_names: dict[int, str] | None = None


def read_cube(path: str | Path, key: str | None = None, *, key_option: str = "key") -> Raster:
    """Read a hyperspectral cube as ``(height, width, bands)``.

    Args:
        path: the cube file (see the module docstring for formats).
        key: variable name inside a ``.mat`` / ``.npz`` file; needed only when it holds
            several 3-D arrays.
        key_option: how the caller calls ``key``, for error messages.

    Returns:
        The cube and its metadata.

    Raises:
        SceneNotFoundError: ``path`` does not exist.
        SceneFormatError: the file cannot be read, or holds no 3-D array.
        KeyAmbiguityError: several 3-D arrays and no ``key``, or ``key`` is not in the file.
    """
    return _read(Path(path), key, ndim=3, role="cube", key_option=key_option)


def read_map(
    path: str | Path,
    key: str | None = None,
    *,
    role: str = "label map",
    key_option: str = "label_key",
) -> Raster:
    """Read a 2-D map (labels or a split mask) as ``(height, width)``.

    Args:
        path: the map file.
        key: variable name inside a container file, when it holds several 2-D arrays.
        role: what the map is, for error messages (``"label map"``, ``"train mask"``...).
        key_option: how the caller calls ``key``, for error messages.

    Raises:
        SceneNotFoundError, SceneFormatError, KeyAmbiguityError: as :func:`read_cube`.
    """
    return _read(Path(path), key, ndim=2, role=role, key_option=key_option)


def _read(path: Path, key: str | None, *, ndim: int, role: str, key_option: str) -> Raster:
    if not path.exists():
        raise SceneNotFoundError(f"{role} file `{path}` does not exist: check the path")
    if path.is_dir():
        raise SceneFormatError(f"{role} `{path}` is a folder: give the path of a file")
    try:
        raster = _read_by_suffix(path, key, ndim, role, key_option)
    except HsicacheError:
        raise
    except Exception as exc:  # any library's failure to parse is a corrupt / unreadable file
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise SceneFormatError(f"cannot read {role} `{path}`: {reason}") from exc

    data = np.asarray(raster.data)
    if ndim == 2 and data.ndim == 3 and data.shape[-1] == 1:
        data = data[..., 0]
    if data.ndim != ndim:
        raise SceneFormatError(
            f"{role} `{path}` holds an array of shape {data.shape}; expected {ndim} dimensions"
        )
    if not (np.issubdtype(data.dtype, np.number) or data.dtype == bool):
        raise SceneFormatError(f"{role} `{path}` holds non-numeric data of dtype {data.dtype}")
    if ndim == 2 and raster.nodata is not None:
        data = _unlabelled_where_no_data(data, raster.nodata, f"{role} `{path}`")
    raster.data = data
    raster.source = str(path)
    return raster


def _unlabelled_where_no_data(data: np.ndarray, nodata: float, what: str) -> np.ndarray:
    """A map's no-data pixels as 0, the value every map reader takes for "no label" (said in
    a warning when the no-data value is another one: it could be a class id)."""
    empty = np.isnan(data) if np.isnan(nodata) else data == nodata
    if not empty.any():
        return data
    if nodata != 0:
        warnings.warn(
            f"{what}: {int(empty.sum())} pixels at its no-data value {nodata:g} are read as "
            "unlabelled",
            HsicacheWarning,
            stacklevel=4,
        )
    return np.where(empty, 0, data).astype(data.dtype)


def _read_by_suffix(path: Path, key: str | None, ndim: int, role: str, key_option: str) -> Raster:
    suffix = path.suffix.lower()
    if key is not None and suffix not in (".mat", ".npz"):
        raise SceneFormatError(
            f"{role} `{path}` holds one array: `{key_option}` chooses a variable of a .mat or "
            ".npz file only; leave it out"
        )
    if suffix == ".mat":
        return _read_mat(path, key, ndim, role, key_option)
    if suffix == ".npy":
        return Raster(np.load(path, allow_pickle=False))
    if suffix == ".npz":
        with np.load(path, allow_pickle=False) as npz:
            arrays = {name: npz[name] for name in npz.files}
        name = _choose_key(_layouts(arrays), key, ndim, path, role, key_option)
        return Raster(arrays[name], key=name)
    if suffix in (".tif", ".tiff"):
        return _read_geotiff(path, ndim, role)
    if suffix == ".hdr" or suffix in ENVI_DATA_SUFFIXES:
        return _read_envi(path)
    raise SceneFormatError(
        f"{role} `{path}` has an unknown suffix `{path.suffix}`: use .mat, .npy, .npz, "
        ".hdr (ENVI), or .tif"
    )


Layout = tuple[tuple[int, ...], np.dtype]


def _layouts(arrays: dict[str, np.ndarray]) -> dict[str, Layout]:
    return {name: (np.shape(arr), np.asarray(arr).dtype) for name, arr in arrays.items()}


def _choose_key(
    layouts: dict[str, Layout],
    key: str | None,
    ndim: int,
    path: Path,
    role: str,
    key_option: str,
) -> str:
    """Pick the variable named ``key``, or the only numeric one of rank ``ndim``.

    ``layouts`` maps each variable to its (shape, dtype), so a caller can choose before reading.
    """
    if key is not None:
        if key not in layouts:
            raise KeyAmbiguityError(
                f"{role} `{path}` has no variable `{key}` (`{key_option}`); it holds: "
                f"{_describe(layouts)}"
            )
        return key
    candidates = [
        name
        for name, (shape, dtype) in layouts.items()
        if len(shape) == ndim and np.issubdtype(dtype, np.number)
    ]
    if len(candidates) == 1:
        return candidates[0]
    if not candidates:
        raise KeyAmbiguityError(
            f"{role} `{path}` holds no {ndim}-D numeric array; it holds: {_describe(layouts)}"
        )
    raise KeyAmbiguityError(
        f"{role} `{path}` holds {len(candidates)} {ndim}-D arrays "
        f"({', '.join(candidates)}): choose one with `{key_option}`"
    )


def _describe(layouts: dict[str, Layout]) -> str:
    if not layouts:
        return "nothing"
    return ", ".join(f"{k} {tuple(shape)}" for k, (shape, _) in layouts.items())


def _read_mat(path: Path, key: str | None, ndim: int, role: str, key_option: str) -> Raster:
    import h5py
    import scipy.io

    if h5py.is_hdf5(path):  # MATLAB v7.3 is HDF5 with a 512-byte user block
        with h5py.File(path, "r") as f:
            # MATLAB writes column-major, so h5py sees every axis reversed; choose from the
            # shapes alone, then read just the chosen variable.
            layouts = {
                name: (tuple(reversed(obj.shape)), obj.dtype)
                for name, obj in f.items()
                if isinstance(obj, h5py.Dataset) and name not in _MATLAB_INTERNAL
            }
            name = _choose_key(layouts, key, ndim, path, role, key_option)
            data = np.ascontiguousarray(f[name][()].T)
        return Raster(data, key=name)
    try:
        contents = scipy.io.loadmat(path)
    except NotImplementedError as exc:  # pragma: no cover - v7.3 without HDF5 signature
        raise SceneFormatError(f"cannot read {role} `{path}`: {exc}") from exc
    arrays = {k: v for k, v in contents.items() if not k.startswith("__")}
    name = _choose_key(_layouts(arrays), key, ndim, path, role, key_option)
    return Raster(np.asarray(arrays[name]), key=name)


def _read_geotiff(path: Path, ndim: int, role: str) -> Raster:
    import rasterio
    from rasterio.enums import ColorInterp
    from rasterio.errors import NotGeoreferencedWarning

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NotGeoreferencedWarning)
        with rasterio.open(path) as ds:
            alphas = [b for b, ci in enumerate(ds.colorinterp, 1) if ci == ColorInterp.alpha]
            bands = [b for b in range(1, ds.count + 1) if b not in alphas]
            besides = " besides its alpha band" if alphas else ""
            if ndim == 2 and len(bands) != 1:
                raise SceneFormatError(
                    f"{role} `{path}` has {len(bands)} bands{besides}; a map must have exactly one"
                )
            if not bands:
                raise SceneFormatError(f"{role} `{path}` holds an alpha band and no data band")
            data = ds.read(bands[0]) if ndim == 2 else np.moveaxis(ds.read(bands), 0, -1)
            crs = ds.crs.to_wkt() if ds.crs else None
            transform = tuple(ds.transform)[:6] if ds.crs or not ds.transform.is_identity else None
            wavelengths = _geotiff_wavelengths(ds, bands)
            nodata = _geotiff_nodata(tuple(ds.nodatavals[b - 1] for b in bands))
            invalid = _geotiff_mask(ds, bands, alphas)
    if invalid is not None:
        data = _no_data_where_masked(data, invalid, f"{role} `{path}`")
    return Raster(data, wavelengths=wavelengths, crs=crs, transform=transform, nodata=nodata)


def _geotiff_mask(ds: object, bands: list[int], alphas: list[int]) -> np.ndarray | None:
    """``(H, W)``: the pixels the file's GDAL mask marks invalid (a per-dataset mask, internal or
    a ``.msk`` sidecar, or an alpha band at 0), or ``None`` when it has no mask or the mask marks
    nothing. No-data values are not a mask here: ``nodata`` carries them."""
    from rasterio.enums import MaskFlags

    invalid = np.zeros(ds.shape, dtype=bool)  # type: ignore[attr-defined]
    for band in alphas:  # GDAL takes only some band layouts' alpha as their mask: read it here
        invalid |= ds.read(band) == 0  # type: ignore[attr-defined]
    flags = ds.mask_flag_enums[bands[0] - 1]  # type: ignore[attr-defined]
    if MaskFlags.per_dataset in flags and MaskFlags.alpha not in flags:
        invalid |= ds.read_masks(bands[0]) == 0  # type: ignore[attr-defined]
    return invalid if invalid.any() else None


def _no_data_where_masked(data: np.ndarray, invalid: np.ndarray, what: str) -> np.ndarray:
    """The pixels a mask marks invalid as no data: 0 (unlabelled) in a map, said in a warning
    when that drops labels; NaN in every band of a cube (made float if it was not)."""
    if data.ndim == 2:
        dropped = int((invalid & (data != 0)).sum())
        if dropped:
            warnings.warn(
                f"{what}: {dropped} labelled pixels its mask marks invalid are read as unlabelled",
                HsicacheWarning,
                stacklevel=6,
            )
        return np.where(invalid, 0, data).astype(data.dtype)
    cube = data.astype(np.result_type(data.dtype, np.float32))
    cube[invalid] = np.nan
    return cube


def _geotiff_nodata(values: tuple[float | None, ...]) -> float | tuple[float, ...] | None:
    """The bands' no-data values: one value, one per band (NaN where a band has none), or
    ``None`` when no band declares one."""
    if all(v is None for v in values):
        return None
    per_band = tuple(np.nan if v is None else float(v) for v in values)
    same = len(set(per_band)) == 1 or all(np.isnan(v) for v in per_band)
    return per_band[0] if same else per_band


def _geotiff_wavelengths(ds: object, bands: list[int]) -> np.ndarray | None:
    """Band centres from GDAL band metadata (``wavelength`` / ``WAVELENGTH`` tags), if all
    ``bands`` set them."""
    values = []
    for band in bands:
        tags = {k.lower(): v for k, v in ds.tags(band).items()}  # type: ignore[attr-defined]
        if "wavelength" not in tags:
            return None
        values.append(float(tags["wavelength"]))
        unit = tags.get("wavelength_units", "nanometers").lower()
        if unit.startswith("micro") or unit in ("um", "µm"):
            values[-1] *= 1000.0
    return np.asarray(values, dtype=np.float64)


def _read_envi(path: Path) -> Raster:
    import spectral.io.envi as envi

    if path.suffix.lower() == ".hdr":
        header, data_file = path, None
    else:
        tried = (
            [path.with_suffix(".hdr"), Path(str(path) + ".hdr")]
            if path.suffix
            else [Path(str(path) + ".hdr")]
        )
        header = next((h for h in tried if h.exists()), tried[0])
        data_file = path
        if not header.exists():
            raise SceneNotFoundError(
                f"ENVI header for `{path}` not found: expected "
                + " or ".join(f"`{h.name}`" for h in tried)
                + " beside the data file"
            )
    fields = envi.read_envi_header(str(header))
    interleave = str(fields.get("interleave", "bsq")).lower()
    if interleave not in ("bsq", "bil", "bip"):
        raise SceneFormatError(
            f"ENVI header `{header}` says `interleave = {interleave}`; it must be bsq, bil or bip"
        )
    try:
        image = envi.open(str(header), None if data_file is None else str(data_file))
    except envi.EnviDataFileNotFoundError:
        endings = ", ".join(f".{e}" for e in [*envi.KNOWN_EXTS, interleave])
        raise SceneNotFoundError(
            f"ENVI header `{header}` has no data file beside it (looked for `{header.stem}` "
            f"with no ending or {endings}): put it there, or give the data file as the cube"
        ) from None
    _check_envi_size(image, header)
    # a memory map in BIP order is (rows, cols, bands) in the file's own dtype
    data = np.array(image.open_memmap(interleave="bip", writable=False))
    wavelengths = None
    centers = getattr(image.bands, "centers", None)
    if centers:
        wl = np.asarray(centers, dtype=np.float64)
        unit = (getattr(image.bands, "band_unit", None) or "").lower()
        if unit.startswith("micro") or unit in ("um", "µm") or (not unit and wl.max() < 100):
            wl = wl * 1000.0
        wavelengths = wl
    crs, transform = (
        _envi_georeferencing(image.filename, header) if "map info" in fields else (None, None)
    )
    nodata = _envi_ignore_value(fields, header)
    names = fields.get("class names")
    return Raster(
        data,
        wavelengths=wavelengths,
        crs=crs,
        transform=transform,
        nodata=nodata,
        class_names=dict(enumerate(map(str, names))) if isinstance(names, list) else None,
    )


def _envi_georeferencing(
    data_file: str, header: Path
) -> tuple[str | None, tuple[float, ...] | None]:
    """CRS (WKT) and affine transform from the header's ``map info``, read by GDAL's ENVI
    driver as for a GeoTIFF; a warning and none when GDAL cannot read them."""
    import rasterio
    from rasterio.errors import NotGeoreferencedWarning

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", NotGeoreferencedWarning)
            with rasterio.open(data_file) as ds:
                crs = ds.crs.to_wkt() if ds.crs else None
                placed = ds.crs or not ds.transform.is_identity
                transform = tuple(v + 0.0 for v in ds.transform[:6]) if placed else None  # no -0
    except Exception as exc:  # the cube itself was read: only its placement is lost
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        warnings.warn(
            f"ENVI header `{header}` has `map info`, but GDAL cannot read it ({reason}): the "
            "scene is not georeferenced",
            HsicacheWarning,
            stacklevel=2,
        )
        return None, None
    return crs, transform


def _envi_ignore_value(fields: dict[str, object], header: Path) -> float | None:
    """The header's ``data ignore value``, if it has one."""
    value = fields.get("data ignore value")
    if value is None:
        return None
    try:
        return float(str(value).strip())
    except ValueError:
        raise SceneFormatError(
            f"ENVI header `{header}` has `data ignore value = {value}`, which is not a number"
        ) from None


def _check_envi_size(image: object, header: Path) -> None:
    """Refuse a data file smaller than the header's lines x samples x bands say."""
    import os

    dims = (image.nrows, image.ncols, image.nbands)  # type: ignore[attr-defined]
    item = np.dtype(image.dtype).itemsize  # type: ignore[attr-defined]
    need = int(image.offset) + int(np.prod(dims)) * item  # type: ignore[attr-defined]
    have = os.path.getsize(image.filename)  # type: ignore[attr-defined]
    if have < need:
        raise SceneFormatError(
            f"ENVI header `{header}` describes {dims[0]} lines x {dims[1]} samples x {dims[2]} "
            f"bands of {np.dtype(image.dtype).name} ({need:,} bytes with the header offset), "  # type: ignore[attr-defined]
            f"but `{image.filename}` holds {have:,} bytes: the header does not match the file"  # type: ignore[attr-defined]
        )
