"""The scene store: a validated, fingerprinted hyperspectral scene in Zarr v3.

Layout (``xarray.open_zarr(path)`` shows it with named dimensions):

========================  ======================  =============================================
variable                  dims                    content
========================  ======================  =============================================
``cube``                  (y, x, band)            float32 spectra, as read (after NaN filling)
``rgb``                   (y, x, color)            float32 rendering in [0, 1] for the backbone
``labels``                (y, x)                  int32 class index, -1 = unlabeled
``train`` / ``test``      (y, x)                  bool split masks, disjoint
``band_mean``/``band_std``(band)                  per-band statistics over all pixels
``wavelength``            (band)                  coordinate, nm (NaN when unknown)
``class_id``/``class_name``(class)                original label ids and names
========================  ======================  =============================================

Attributes hold the source, rendering and split parameters, the georeferencing (CRS as WKT and
the affine transform), attribution, package versions, the format version and the ``fingerprint``:
SHA-256 over cube, labels, masks and rendering parameters.
"""

from __future__ import annotations

import hashlib
import tempfile
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.errors import SceneNotFoundError, StoreError
from pipeline.io import storage
from pipeline.io.outputs import SCENE as SCENE_OUTPUT
from pipeline.io.outputs import check_output
from pipeline.io.storage import Location, publish_folder
from pipeline.io.store import atomic_output, jsonable, package_versions, sha256_arrays
from pipeline.utils.arrays import column_moments

__all__ = [
    "SCENE_FORMAT",
    "Scene",
    "image_fingerprint",
    "open_scene",
    "read_region",
    "scene_array",
    "scene_fingerprint",
    "write_scene",
]

SCENE_FORMAT = "hsicache-scene/1"


@dataclass
class Scene:
    """A prepared scene, in memory.

    Attributes:
        cube: ``(H, W, B)`` float32 spectra.
        rgb: ``(H, W, 3)`` float32 rendering in [0, 1].
        labels: ``(H, W)`` int32 class index, ``-1`` = unlabeled.
        train, test: ``(H, W)`` bool masks.
        class_ids: ``(K,)`` original label ids.
        class_names: ``K`` names.
        wavelengths: ``(B,)`` nm, or ``None``.
        crs: WKT or ``None``; transform: affine 6-tuple or ``None``.
        attrs: provenance (source, rendering, split, attribution, fingerprint...).
        no_data: ``(H, W)`` bool, the pixels the file had no data for (filled as
            ``nan_policy`` said, never in the split, no class in a map); ``None`` when none.
    """

    cube: np.ndarray
    rgb: np.ndarray
    labels: np.ndarray
    train: np.ndarray
    test: np.ndarray
    class_ids: np.ndarray
    class_names: list[str]
    wavelengths: np.ndarray | None = None
    crs: str | None = None
    transform: tuple[float, ...] | None = None
    attrs: dict[str, Any] = field(default_factory=dict)
    no_data: np.ndarray | None = None

    @property
    def shape(self) -> tuple[int, int]:
        """``(height, width)``."""
        return self.labels.shape  # type: ignore[return-value]

    @property
    def has_data(self) -> np.ndarray:
        """``(H, W)`` bool: the pixels with data (every pixel when ``no_data`` is ``None``)."""
        return np.ones(self.shape, bool) if self.no_data is None else ~self.no_data

    @property
    def split_record(self) -> dict[str, Any]:
        """How ``prepare`` drew the split (``protocol``, ``seed``, ``per_class``, ...; empty for
        a scene made without one), a copy."""
        return dict(self.attrs.get("split") or {})

    @property
    def split_protocol(self) -> str:
        """The split's protocol: official, per-class, fraction or blocks."""
        return str(self.split_record.get("protocol", "per-class"))

    @property
    def nbytes(self) -> int:
        """Bytes of the arrays held in memory (a lazy ``cube``/``rgb`` counts nothing)."""
        return sum(v.nbytes for v in vars(self).values() if isinstance(v, np.ndarray))

    @property
    def n_classes(self) -> int:
        """Number of classes."""
        return len(self.class_ids)

    @property
    def fingerprint(self) -> str:
        """The fingerprint stored with the scene (computed when it was prepared)."""
        return str(self.attrs["fingerprint"])

    @property
    def image_fingerprint(self) -> str:
        """Fingerprint of what the backbone sees (cube + rendering), independent of the split.

        Feature caches are keyed on it, so a new split (another seed, other masks) of the same
        image reuses stage one.
        """
        return str(self.attrs.get("image_fingerprint") or self.attrs["fingerprint"])


def scene_fingerprint(
    cube: np.ndarray,
    labels: np.ndarray,
    train: np.ndarray,
    test: np.ndarray,
    rendering: dict[str, Any],
) -> str:
    """SHA-256 over the cube, labels, masks and rendering parameters."""
    return sha256_arrays(
        np.asarray(cube, dtype=np.float32),
        np.asarray(labels, dtype=np.int32),
        np.asarray(train, dtype=bool),
        np.asarray(test, dtype=bool),
        rendering,
    )


def image_fingerprint(cube: np.ndarray, rendering: dict[str, Any]) -> str:
    """SHA-256 over the cube and rendering parameters: what the feature cache depends on."""
    return sha256_arrays(np.asarray(cube, dtype=np.float32), rendering)


def write_scene(scene: Scene, path: str | Path, *, chunk: int = 64) -> Location:
    """Write ``scene`` to a Zarr v3 store at ``path`` atomically (nothing half-written is left).

    Args:
        scene: the scene; ``scene.attrs`` must hold ``fingerprint`` and ``rendering``.
        path: the store folder (conventionally ``*.zarr``) or an fsspec URL; replaced if it
            exists. A URL is written locally first and uploaded with its root metadata last.
        chunk: spatial chunk side.

    Returns:
        Where it was written.
    """
    import xarray as xr

    h, w, b = scene.cube.shape
    wl = scene.wavelengths if scene.wavelengths is not None else np.full(b, np.nan)
    cube = np.asarray(scene.cube, dtype=np.float32)  # a copy only if it is not float32
    band_mean, band_std = _band_statistics(cube, scene.no_data)
    attrs = dict(scene.attrs)
    attrs.update(
        format=SCENE_FORMAT,
        crs=scene.crs,
        transform=list(scene.transform) if scene.transform is not None else None,
        has_wavelengths=scene.wavelengths is not None,
        package_versions=package_versions(),
    )
    extra = {}  # written only when there is one, so other scenes' stores stay as they were
    if scene.no_data is not None and scene.no_data.any():
        attrs["has_no_data"] = True
        extra["no_data"] = (("y", "x"), scene.no_data.astype(bool))
    ds = xr.Dataset(
        {
            "cube": (("y", "x", "band"), cube),
            "rgb": (("y", "x", "color"), scene.rgb.astype(np.float32)),
            "labels": (("y", "x"), scene.labels.astype(np.int32)),
            "train": (("y", "x"), scene.train.astype(bool)),
            "test": (("y", "x"), scene.test.astype(bool)),
            "band_mean": (("band",), band_mean.astype(np.float32)),
            "band_std": (("band",), band_std.astype(np.float32)),
            "class_id": (("class",), np.asarray(scene.class_ids, dtype=np.int64)),
            "class_name": (("class",), np.asarray(scene.class_names, dtype=object)),
            **extra,
        },
        coords={
            "wavelength": (("band",), wl.astype(np.float64)),
            "color": np.asarray(["r", "g", "b"], dtype=object),
        },
        attrs=jsonable(attrs),
    )
    cy, cx = min(chunk, h), min(chunk, w)
    encoding = {
        "cube": {"chunks": (cy, cx, b)},
        "rgb": {"chunks": (cy, cx, 3)},
        "labels": {"chunks": (cy, cx)},
        "train": {"chunks": (cy, cx)},
        "test": {"chunks": (cy, cx)},
        **({"no_data": {"chunks": (cy, cx)}} if extra else {}),
    }
    where = Location.of(path)
    if where.is_local:
        with atomic_output(where.path, SCENE_OUTPUT, option="out") as tmp:
            ds.to_zarr(tmp, mode="w", zarr_format=3, consolidated=False, encoding=encoding)
        return where
    check_output(str(where), SCENE_OUTPUT, option="out")
    with tempfile.TemporaryDirectory(prefix="hsicache-scene-") as tmp:
        ds.to_zarr(Path(tmp) / "scene.zarr", zarr_format=3, consolidated=False, encoding=encoding)
        publish_folder(Path(tmp) / "scene.zarr", where)
    return where


def _band_statistics(cube: np.ndarray, no_data: np.ndarray | None) -> tuple[np.ndarray, ...]:
    """Each band's mean and std over the pixels with data (not over the values filled in)."""
    keep = None if no_data is None else ~no_data.ravel()
    spectra = cube.reshape(-1, cube.shape[-1])
    return column_moments(spectra, keep, cast_first=False)  # no float64 copy of the cube


def open_scene(
    path: str | Path, *, expect_fingerprint: str | None = None, lazy: bool = False
) -> Scene:
    """Read a scene store written by :func:`write_scene`.

    Args:
        path: the store: a folder or an fsspec URL.
        expect_fingerprint: when given, refuse a store whose fingerprint differs.
        lazy: leave ``cube`` and ``rgb`` as zarr arrays whose slices read only their chunks
            (for streaming over scenes larger than memory); the label maps are always read.
            A scene this process has already read in full (and still keeps in
            :data:`pipeline.io.storage.memory_cache`) is returned from memory either way.

    The arrays of the returned scene are read-only: a scene read in full is kept in
    :data:`~pipeline.io.storage.memory_cache` under the hash of the store's root metadata (which
    holds its content fingerprint), so reading the same store again in this process costs one
    small read.

    Raises:
        SceneNotFoundError: no store at ``path``.
        StoreError: not a hsicache scene store, another format version, or another fingerprint.
    """
    p = Location.of(path)
    if not (p.path.exists() if p.is_local else p.exists()):
        raise SceneNotFoundError(f"scene store `{p}` does not exist: run `hsicache prepare` first")
    try:  # the root metadata holds the content fingerprint: it names this version of the store
        key = ("scene", str(p), hashlib.sha256(p.read_bytes("zarr.json")).hexdigest())
    except OSError as exc:
        raise StoreError(f"`{p}` is not a readable Zarr store: {exc}") from exc
    scene = storage.memory_cache.get(key)
    if scene is None:
        scene = _read_scene(p, lazy=lazy)
        if not lazy:
            storage.memory_cache.put(key, scene)
    fp = scene.attrs["fingerprint"]
    if expect_fingerprint is not None and fp != expect_fingerprint:
        raise StoreError(
            f"scene `{p}` has fingerprint {fp[:12]}, expected {expect_fingerprint[:12]}: "
            "it was prepared from other data or parameters"
        )
    return replace(scene, attrs=dict(scene.attrs))  # the caller may reassign fields freely


def _read_scene(p: Location, *, lazy: bool) -> Scene:
    import zarr

    try:  # zarr directly rather than xarray: the same arrays, a third faster to open
        group = zarr.open_group(p.zarr_store(read_only=True), mode="r")
        attrs = dict(group.attrs)
    except Exception as exc:
        raise StoreError(f"`{p}` is not a readable Zarr store: {exc}") from exc
    fmt = attrs.get("format")
    if fmt != SCENE_FORMAT:
        raise StoreError(
            f"`{p}` is not a hsicache scene store of format {SCENE_FORMAT} (found {fmt!r}): "
            "re-run `hsicache prepare`"
        )

    def array(name: str) -> Any:
        try:
            return group[name]
        except Exception as exc:  # gone (KeyError), or its zarr.json damaged
            raise StoreError(
                f"scene store `{p}`: array `{name}` is missing or its metadata is damaged "
                f"({type(exc).__name__}); re-run `hsicache prepare`"
            ) from None

    def read(name: str) -> np.ndarray:
        return read_region(array(name), p, name)

    transform = attrs.get("transform")
    scene = Scene(
        cube=array("cube") if lazy else read("cube"),
        rgb=array("rgb") if lazy else read("rgb"),
        labels=read("labels"),
        train=read("train"),
        test=read("test"),
        class_ids=read("class_id"),
        class_names=[str(s) for s in read("class_name")],
        wavelengths=read("wavelength") if attrs.get("has_wavelengths") else None,
        crs=attrs.get("crs"),
        transform=tuple(transform) if transform is not None else None,
        attrs=attrs,
        no_data=read("no_data") if attrs.get("has_no_data") else None,
    )
    for value in vars(scene).values():
        if isinstance(value, np.ndarray):
            value.flags.writeable = False  # shared through the memory cache: read-only
    return scene


def read_region(array: Any, store: Any, name: str, region: tuple[slice, ...] = ()) -> np.ndarray:
    """``array[region]`` of the scene store ``store`` as NumPy, a chunk that is gone or fails
    to decode being a one-line :class:`StoreError` naming store, array and region."""
    try:
        return np.asarray(array[region] if region else array[...])
    except Exception as exc:  # zarr's and the codec's own error types differ per codec
        where = ", ".join(f"{r.start}:{r.stop}" for r in region) if region else "all"
        raise StoreError(
            f"scene store `{store}`: array `{name}` [{where}] cannot be read "
            f"({type(exc).__name__}): a missing or corrupt chunk; re-run `hsicache prepare`"
        ) from None


def scene_array(path: str | Path | Location, name: str) -> Any:
    """One array of a scene store (``cube``, ``rgb``...) as a zarr array whose slices read only
    their chunks, without opening the rest of the store (what a dask task needs)."""
    import zarr

    return zarr.open_array(Location.of(path).zarr_store(read_only=True), path=name, mode="r")
