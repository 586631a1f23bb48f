"""The feature cache: per-pixel backbone features in a chunked Zarr v3 store.

Layout::

    FEATURES.zarr/
      zarr.json                 attributes: format, provenance, timesteps, sites, complete, ...
      t0/up1.res1               (y, x, channel) float16, one array per (timestep, site)
      t25/up1.res1
      progress/done             (chunk_row, chunk_col) bool, one chunk per spatial chunk

``xarray.open_zarr(path, group="t0")`` shows the sites of one timestep with named dimensions
``y``, ``x`` and ``<site>.channel``. Spatial chunks are aligned to the extraction's stitch tiles,
so parallel writers write disjoint chunk-aligned regions and a killed run resumes at the first
chunk not marked done. Readers refuse a store that is not complete, of another format, or made
from another image (the scene's ``image_fingerprint``: cube + rendering, so a new split of the
same image reuses the cache) or backbone.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import itertools
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.errors import SceneNotFoundError, StoreError
from pipeline.io import storage
from pipeline.io.storage import Location
from pipeline.io.store import describe_codecs, jsonable, sha256_arrays

__all__ = [
    "CACHE_FORMAT",
    "FeatureCache",
    "array_path",
    "check_fingerprint",
    "count_reads",
    "create_or_resume",
    "open_store",
    "read_features",
]

_READ_COUNTER: contextvars.ContextVar[list[int] | None] = contextvars.ContextVar(
    "hsicache_read_counter", default=None
)


@contextlib.contextmanager
def count_reads() -> Iterator[list[int]]:
    """Count the bytes feature caches opened inside the block fetch from storage.

    Yields a one-element list whose value grows as chunks (compressed, as stored) are read.
    """
    counter = [0]
    token = _READ_COUNTER.set(counter)
    try:
        yield counter
    finally:
        _READ_COUNTER.reset(token)


def _counting_store(where: Location) -> Any:
    """A read-only store over ``where`` that adds every byte it returns to the active counter."""
    from zarr.storage import WrapperStore

    counter = _READ_COUNTER.get()

    class _Counting(WrapperStore):  # type: ignore[type-arg]
        async def get(self, key: str, prototype: Any = None, byte_range: Any = None) -> Any:
            buf = await super().get(key, prototype, byte_range)
            if buf is not None and counter is not None:
                counter[0] += len(buf)
            return buf

    return _Counting(where.zarr_store(read_only=True))


CACHE_FORMAT = "hsicache-features/2"  # 2: keyed on the image fingerprint
#: Formats of the stores written under a :class:`~pipeline.io.storage.StoreLock`.
LOCKED_FORMATS = ("hsicache-features/", "hsicache-context/")


def array_path(timestep: int, site: str) -> str:
    """The store path of one (timestep, site) feature array."""
    return f"t{int(timestep)}/{site}"


def _codecs() -> dict[str, Any]:
    from zarr.codecs import BloscCodec, BloscShuffle

    return {"compressors": BloscCodec(cname="zstd", clevel=3, shuffle=BloscShuffle.bitshuffle)}


def create_or_resume(
    path: str | Path | Location,
    *,
    shape: tuple[int, int],
    chunk: int,
    site_channels: dict[str, int],
    timesteps: Sequence[int],
    identity: dict[str, Any],
    attrs: dict[str, Any],
) -> tuple[Any, np.ndarray]:
    """Create the store, or reopen an unfinished one made with the same ``identity``.

    Args:
        path: the store.
        shape: ``(height, width)`` of the scene.
        chunk: spatial chunk side (a multiple of the stitch tile).
        site_channels: channels of each site.
        timesteps: timesteps.
        identity: everything that determines the content (image fingerprint, backbone hash,
            sites, timesteps, patch/stride, seeds, dtype); a store with another identity is
            refused rather than mixed.
        attrs: further provenance to store (package versions...).

    Returns:
        ``(root group, done)``: ``done[i, j]`` tells whether chunk ``(i, j)`` is written.
    """
    import zarr

    where = Location.of(path)
    h, w = shape
    grid = (-(-h // chunk), -(-w // chunk))
    store = where.zarr_store(read_only=False)
    if where.exists():
        root = zarr.open_group(store, mode="r+")
        if root.attrs.get("format") != CACHE_FORMAT:
            raise StoreError(
                f"`{where}` exists and is not a hsicache feature cache: remove it first"
            )
        if root.attrs.get("identity") != jsonable(identity):
            raise StoreError(
                f"feature cache `{where}` exists but was made with other inputs or parameters "
                f"({_first_difference(root.attrs.get('identity') or {}, jsonable(identity))}): "
                "remove it, or choose another `out`"
            )
    else:  # not zarr.open_group(mode="w"): that would empty the folder, the writer lock with it
        root = zarr.create_group(
            store,
            zarr_format=3,
            attributes=jsonable(
                {"format": CACHE_FORMAT, "complete": False, "identity": identity, **attrs}
            ),
        )
    # arrays are created on resume too: a run killed while creating them left some out
    for t in timesteps:
        for site, channels in site_channels.items():
            if where.exists(f"{array_path(t, site)}/zarr.json"):
                continue
            root.create_array(
                array_path(t, site),
                shape=(h, w, channels),
                chunks=(min(chunk, h), min(chunk, w), channels),
                dtype="float16",
                dimension_names=("y", "x", f"{site}.channel"),
                fill_value=np.nan,
                **_codecs(),
            )
    if not where.exists("progress/done/zarr.json"):
        root.create_array("progress/done", shape=grid, chunks=(1, 1), dtype=bool, fill_value=False)
    return root, done_chunks(root)


def read_identity(path: str | Path | Location) -> dict[str, Any]:
    """The identity an existing (possibly unfinished) cache was created with; ``{}`` if none."""
    import zarr

    where = Location.of(path)
    if not where.exists():
        return {}
    attrs = zarr.open_group(where.zarr_store(read_only=True), mode="r").attrs
    return dict(attrs.get("identity") or {}) if attrs.get("format") == CACHE_FORMAT else {}


def open_store(
    where: Location, fmt: str, what: str, command: str, *, counting: bool = False
) -> tuple[Any, dict[str, Any]]:
    """``(root group, attributes)`` of the hsicache store of format ``fmt`` at ``where``.

    Args:
        what, command: how messages name the store and the command that writes it.
        counting: count the bytes its chunks return (:func:`count_reads`).

    Raises:
        SceneNotFoundError: nothing there.
        StoreError: not a readable Zarr store, or another format.
    """
    import zarr

    if not where.exists():
        if _something_else(where):
            raise StoreError(f"`{where}` is not a {what} (no Zarr store there)")
        raise SceneNotFoundError(f"{what} `{where}` does not exist: run `hsicache {command}`")
    try:
        store = _counting_store(where) if counting else where.zarr_store(read_only=True)
        root = zarr.open_group(store, mode="r")
        attrs = dict(root.attrs)
    except (OSError, ValueError, TypeError, KeyError) as exc:  # zarr on damaged metadata
        raise StoreError(f"`{where}` is not a readable Zarr store: {exc}") from None
    if attrs.get("format") != fmt:
        raise StoreError(f"`{where}` is not a hsicache {what} of format {fmt}")
    return root, attrs


def _something_else(where: Location) -> bool:
    """A local file, or a folder holding more than a writer's lock, where a store is missing
    (a folder with only the lock is an extraction killed before its metadata)."""
    from pipeline.io.storage import LOCK_KEY

    if not where.is_local or not where.path.exists():
        return False
    if where.path.is_file():
        return True
    return any(not e.name.startswith((LOCK_KEY, f".{LOCK_KEY}")) for e in where.path.iterdir())


def check_fingerprint(
    attrs: dict[str, Any], expect: str | None, where: Location, what: str, command: str
) -> None:
    """Refuse a store made from another scene image than ``expect`` (``None``: any)."""
    fp = attrs["identity"]["image_fingerprint"]
    if expect is not None and fp != expect:
        raise StoreError(
            f"{what} `{where}` was made from scene image {fp[:12]}, not {expect[:12]}: re-run "
            f"`hsicache {command}` on this scene"
        )


@dataclass
class FeatureCache:
    """A complete feature cache opened for reading.

    Attributes:
        path: the store (a local folder or a URL).
        attrs: its attributes (provenance).
    """

    path: Location
    attrs: dict[str, Any]
    _root: Any
    kind = "feature cache"

    @classmethod
    def open(
        cls,
        path: str | Path | Location,
        *,
        expect_fingerprint: str | None = None,
        allow_incomplete: bool = False,
    ) -> FeatureCache:
        """Open a cache, refusing an incomplete one or one made from another scene.

        Raises:
            SceneNotFoundError: no store at ``path``.
            StoreError: not a feature cache, incomplete, or another image fingerprint
                (``expect_fingerprint`` is the scene's ``image_fingerprint``).
        """
        p = Location.of(path)
        root, attrs = open_store(p, CACHE_FORMAT, "feature cache", "extract", counting=True)
        if not attrs.get("complete") and not allow_incomplete:
            try:
                done = done_chunks(root)
            except Exception:  # the progress array itself is damaged
                raise StoreError(
                    f"feature cache `{p}` is incomplete and its progress array is missing: "
                    "re-extract it"
                ) from None
            raise StoreError(
                f"feature cache `{p}` is incomplete ({int(done.sum())}/{done.size} chunks): "
                "re-run the same `hsicache extract` command to finish it"
            )
        damage = _identity_damage(attrs)
        if damage:
            raise StoreError(
                f"feature cache `{p}` is damaged: {damage}; `hsicache cache verify {p}` lists "
                "what else is wrong; re-extract it"
            )
        check_fingerprint(attrs, expect_fingerprint, p, "feature cache", "extract")
        return cls(path=p, attrs=attrs, _root=root)

    @property
    def timesteps(self) -> list[int]:
        """Timesteps in the cache."""
        return list(self.attrs["identity"]["timesteps"])

    @property
    def sites(self) -> list[str]:
        """Sites in the cache."""
        return list(self.attrs["identity"]["sites"])

    @property
    def shape(self) -> tuple[int, int]:
        """``(height, width)``."""
        return tuple(self.attrs["shape"])  # type: ignore[return-value]

    @functools.cached_property
    def digest(self) -> str:
        """SHA-256 of everything that determines the content (the identity attributes): what a
        saved head records as the cache it was trained on, and what names its blocks in
        :data:`~pipeline.io.storage.memory_cache`."""
        return sha256_arrays(self.attrs["identity"])

    @property
    def fingerprint(self) -> str:
        """The image fingerprint of the scene the cache was made from."""
        return str(self.attrs["identity"]["image_fingerprint"])

    def array(self, timestep: int, site: str) -> Any:
        """The zarr array of one (timestep, site)."""
        if timestep not in self.timesteps:
            raise StoreError(
                f"timestep {timestep} is not in cache `{self.path}` ({self.timesteps})"
            )
        if site not in self.sites:
            raise StoreError(
                f"site `{site}` is not in cache `{self.path}` ({', '.join(self.sites)})"
            )
        try:
            return self._root[array_path(timestep, site)]
        except (KeyError, OSError, ValueError):
            raise StoreError(
                f"feature cache `{self.path}` is damaged: array `{array_path(timestep, site)}` "
                f"is missing or unreadable; `hsicache cache verify {self.path}` lists all"
            ) from None

    def channels(
        self, timesteps: Sequence[int] | None = None, sites: Sequence[str] | None = None
    ) -> int:
        """Total channels of a feature selection."""
        return sum(arr.shape[-1] for arr in self.selection(timesteps, sites))

    def selection(
        self, timesteps: Sequence[int] | None = None, sites: Sequence[str] | None = None
    ) -> list[Any]:
        """The zarr arrays of a selection (default: all), timestep-major, in feature order."""
        return [
            self.array(t, s) for t in (timesteps or self.timesteps) for s in (sites or self.sites)
        ]

    def gather(
        self,
        rows: np.ndarray,
        cols: np.ndarray,
        *,
        timesteps: Sequence[int] | None = None,
        sites: Sequence[str] | None = None,
    ) -> np.ndarray:
        """Features of the pixels ``(rows[i], cols[i])``, reading only the chunks that hold them.

        Returns:
            ``(N, C)`` float32, the selected (timestep, site) arrays concatenated in order.
        """
        rows = np.asarray(rows, dtype=np.int64)
        cols = np.asarray(cols, dtype=np.int64)
        parts = [gather_points(arr, rows, cols, self) for arr in self.selection(timesteps, sites)]
        return np.concatenate(parts, axis=1) if parts else np.empty((rows.size, 0), np.float32)

    def to_dask(
        self, timesteps: Sequence[int] | None = None, sites: Sequence[str] | None = None
    ) -> Any:
        """The selected features of the whole scene: one lazy ``(H, W, C)`` dask array."""
        import dask.array as da

        return da.concatenate(
            [da.from_zarr(arr) for arr in self.selection(timesteps, sites)], axis=-1
        )


def read_features(
    arr: Any, y0: int, y1: int, x0: int, x1: int, cache: FeatureCache | None = None
) -> np.ndarray:
    """``arr[y0:y1, x0:x1]`` as float32, refusing a chunk that is missing or corrupt.

    A missing chunk reads as the fill value (NaN) and a corrupt one fails to decode; either is
    a one-line :class:`StoreError` naming the cache, the array and the block, rather than NaN
    features passed on to a head. Blocks of ``cache`` are kept in
    :data:`pipeline.io.storage.memory_cache`.
    """
    y1, x1 = min(y1, arr.shape[0]), min(x1, arr.shape[1])  # one key per block, however asked
    key = ("features", str(cache.path), cache.digest, arr.path, y0, y1, x0, x1) if cache else None
    kept = storage.memory_cache.get(key) if key else None
    if kept is not None:
        return kept.astype(np.float32)
    where = f"{cache.kind} `{cache.path}`" if cache else "the feature cache"
    try:
        block = np.asarray(arr[y0:y1, x0:x1])
    except Exception as exc:  # the codec's own error type differs per codec
        raise StoreError(
            f"{where}: `{arr.path}` at rows {y0}-{y1}, columns {x0}-{x1} cannot be decoded "
            f"({type(exc).__name__}): a corrupt chunk; `hsicache cache verify` lists all"
        ) from None
    if not all_finite(block):
        raise StoreError(
            f"{where}: `{arr.path}` at rows {y0}-{y1}, columns {x0}-{x1} holds missing "
            "(deleted or never written) or non-finite values; `hsicache cache verify` lists all"
        )
    if key:
        storage.memory_cache.put(key, block)
    return block.astype(np.float32)


def all_finite(block: np.ndarray) -> bool:
    """Whether every value of ``block`` is finite (float16 checked on its bits)."""
    if block.dtype == np.float16:  # all exponent bits set = inf or NaN; 3-4x faster than isfinite
        return not ((block.view(np.uint16) & 0x7C00) == 0x7C00).any()
    return bool(np.isfinite(block).all())


def gather_points(arr: Any, rows: np.ndarray, cols: np.ndarray, cache: FeatureCache) -> np.ndarray:
    """``arr[rows[i], cols[i], :]`` reading each chunk that holds a requested pixel once."""
    cy, cx = arr.chunks[0], arr.chunks[1]
    out = np.empty((rows.size, arr.shape[-1]), dtype=np.float32)
    key = (rows // cy) * (-(-arr.shape[1] // cx)) + cols // cx
    order = np.argsort(key, kind="stable")
    bounds = np.flatnonzero(np.diff(key[order])) + 1
    for group in np.split(order, bounds):
        if group.size == 0:
            continue
        y0 = int(rows[group[0]] // cy) * cy
        x0 = int(cols[group[0]] // cx) * cx
        block = read_features(arr, y0, y0 + cy, x0, x0 + cx, cache)
        out[group] = block[rows[group] - y0, cols[group] - x0]
    return out


def _first_difference(a: dict[str, Any], b: dict[str, Any]) -> str:
    for key in sorted(set(a) | set(b)):
        if a.get(key) != b.get(key):
            return f"`{key}`: {str(a.get(key))[:40]} vs {str(b.get(key))[:40]}"
    return "no difference"


def cache_info(path: str | Path | Location) -> dict[str, Any]:
    """Sites, shapes, bytes on disk, compression ratio and provenance (finished or not); for a
    context store its families (:func:`pipeline.features.context.context_info`)."""
    if str(Location.of(path).store_format()).startswith("hsicache-context/"):
        from pipeline.features.context import context_info

        return context_info(path)
    cache = FeatureCache.open(path, allow_incomplete=True)
    arrays = {}
    for arr in cache.selection():
        nbytes = cache.path.nbytes(arr.path)
        arrays[arr.path] = {
            "shape": list(arr.shape),
            "chunks": list(arr.chunks),
            "dtype": str(arr.dtype),
            "compression": describe_codecs(arr),
            "bytes_on_disk": nbytes,
        }
    stored = sum(a["bytes_on_disk"] for a in arrays.values())
    raw = sum(int(np.prod(a["shape"])) * 4 for a in arrays.values())
    return {
        "path": str(cache.path),
        "complete": bool(cache.attrs.get("complete")),
        "shape": list(cache.shape),
        "timesteps": cache.timesteps,
        "sites": cache.sites,
        "arrays": arrays,
        "bytes_on_disk": stored,
        "raw_fp32_bytes": raw,
        "cache_to_raw": stored / raw if raw else 0.0,
        "identity": cache.attrs["identity"],
        "package_versions": cache.attrs.get("package_versions"),
        "kind": "feature cache",
    }


def verify_cache(path: str | Path | Location, *, scene_fingerprint: str | None = None) -> list[str]:
    """Every problem found: a damaged identity, missing arrays or progress, unfinished chunks,
    missing or non-finite values, another scene.

    Returns:
        One line per problem; empty when the cache is sound.

    Raises:
        SceneNotFoundError: nothing at ``path``.
        StoreError: ``path`` is not a feature cache at all.
    """

    where = Location.of(path)
    if not where.exists():
        if _something_else(where):
            raise StoreError(f"`{where}` is not a feature cache or context store (no Zarr store)")
        raise SceneNotFoundError(f"feature cache `{where}` does not exist")
    if str(where.store_format()).startswith("hsicache-context/"):
        from pipeline.features.context import verify_context

        return verify_context(where, scene_fingerprint=scene_fingerprint)
    root, attrs = open_store(where, CACHE_FORMAT, "feature cache", "extract")
    problems = []
    damage = _identity_damage(attrs)
    if damage:
        problems.append(damage)
    try:
        done = done_chunks(root)
        if not done.all():
            problems.append(f"{int((~done).sum())} of {done.size} chunks not written")
    except Exception:
        problems.append("the progress array `progress/done` is missing or unreadable")
    if attrs.get("complete") is not True:
        problems.append("the store is not marked complete")
    if damage:
        return problems  # without an identity there is no list of arrays to check
    ident = attrs["identity"]
    names = [array_path(t, site) for t in ident["timesteps"] for site in ident["sites"]]
    return problems + store_problems(root, attrs, names, scene_fingerprint)


def store_problems(
    root: Any, attrs: dict[str, Any], names: Sequence[str], scene_fingerprint: str | None
) -> list[str]:
    """A store's data problems: made from another scene than ``scene_fingerprint``, arrays of
    ``names`` missing or unreadable, chunks missing, corrupt or non-finite."""
    problems = []
    fp = attrs["identity"]["image_fingerprint"]
    if scene_fingerprint is not None and fp != scene_fingerprint:
        problems.append(
            f"image fingerprint {fp[:12]} differs from the scene's {scene_fingerprint[:12]}"
        )
    for name in names:
        try:
            arr = root[name]
        except Exception:
            problems.append(f"array `{name}` is missing or unreadable")
            continue
        if list(arr.shape[:2]) != list(attrs["shape"]):
            problems.append(f"array `{name}` is {arr.shape[0]}x{arr.shape[1]} px, the store "
                            f"says {attrs['shape'][0]}x{attrs['shape'][1]}")  # fmt: skip
            continue
        problems.extend(chunk_problems(arr))
    return problems


_IDENTITY_KEYS = ("image_fingerprint", "backbone", "timesteps", "sites", "patch", "stride")


def _identity_damage(attrs: dict[str, Any]) -> str | None:
    """What is wrong with a cache's identity and shape attributes, or ``None``."""
    ident = attrs.get("identity")
    if not isinstance(ident, dict):
        return "its `identity` attribute is missing"
    missing = [k for k in _IDENTITY_KEYS if k not in ident]
    if missing:
        return f"its `identity` attribute lacks {', '.join(f'`{k}`' for k in missing)}"
    if not isinstance(attrs.get("shape"), list) or len(attrs["shape"]) != 2:
        return "its `shape` attribute is missing"
    return None


def unlock_cache(path: str | Path | Location) -> dict[str, Any] | None:
    """Remove the writer lock of a feature cache whoever holds it; who held it, or ``None``.

    Raises:
        SceneNotFoundError: no store (and no lock) at ``path``.
        StoreError: ``path`` holds something that is not a hsicache store.
    """
    from pipeline.io.storage import LOCK_KEY, StoreLock

    where = Location.of(path)
    if not where.exists("zarr.json"):
        if not where.exists(LOCK_KEY):
            raise SceneNotFoundError(f"no feature cache at `{where}`: check the path")
    else:
        fmt = where.store_format()
        if not str(fmt).startswith(LOCKED_FORMATS):
            raise StoreError(
                f"`{where}` is not a store hsicache writes under a lock (format {fmt!r}): only "
                "feature caches are unlocked; nothing done"
            )
    return StoreLock(where).force_release()


def chunk_problems(arr: Any) -> list[str]:
    """Unreadable chunks and chunks holding missing (fill value) or non-finite values."""
    cy, cx = arr.chunks[0], arr.chunks[1]
    problems = []
    for y0, x0 in itertools.product(range(0, arr.shape[0], cy), range(0, arr.shape[1], cx)):
        try:
            block = arr[y0 : y0 + cy, x0 : x0 + cx]
        except Exception as exc:  # a corrupt chunk fails to decode
            problems.append(f"{arr.path} chunk at ({y0}, {x0}) unreadable: {exc}")
            continue
        bad = int((~np.isfinite(block)).sum())
        if bad:
            problems.append(f"{arr.path} chunk at ({y0}, {x0}): {bad} missing or non-finite values")
    return problems


def done_chunks(root: Any) -> np.ndarray:
    """``done[i, j]``: chunk ``(i, j)`` has been written."""
    return np.asarray(root["progress/done"][...])
