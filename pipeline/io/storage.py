"""Where stores live: local folders or fsspec URLs (``s3://bucket/x.zarr``, ``gs://``,
``file://``, ``memory://``...), and the writer lock a feature cache is extracted under.

Object-store credentials and endpoints come from the usual places of each fsspec backend: for
S3, ``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY``/``AWS_ENDPOINT_URL`` or ``~/.aws``; any
backend option can also be set as ``FSSPEC_<PROTOCOL>_<OPTION>`` (e.g.
``FSSPEC_S3_ENDPOINT_URL``), which fsspec reads at start-up.

The lock: one writer per feature cache. ``StoreLock`` creates ``.hsicache-lock.json`` inside the
store *exclusively* (a hard link on local disks, a conditional ``If-None-Match`` PUT on S3), so
of two processes racing for a store exactly one wins; the other is refused with the owner's
host, pid and start time. A lock left by a killed process on the same host (its pid gone, or
reused by a younger process) is taken over; one from another host can only be broken by hand
(``hsicache cache unlock``), because there is no way to tell from here whether it still runs.

What one process has decoded from stores (feature blocks, opened scenes) is kept in
:data:`memory_cache`, a bounded LRU, so that training, evaluating and predicting heads one after
another in one process (``bench heads``, ``evaluate --seeds``, a notebook) read each byte once.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import time
import uuid
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.errors import StoreError

__all__ = ["Location", "MemoryCache", "StoreLock", "memory_cache", "publish_folder"]

LOCK_KEY = ".hsicache-lock.json"


@dataclass(frozen=True)
class Location:
    """A store: a local folder or an fsspec URL.

    Attributes:
        url: as the user spelled it (used in messages); ``file://`` URLs become local paths.
    """

    url: str

    @classmethod
    def of(cls, where: str | Path | Location) -> Location:
        """A location from a path, a URL or another location."""
        if isinstance(where, Location):
            return where
        text = str(where)
        if text.startswith("file://"):
            text = text[len("file://") :]
        return cls(text)

    def __str__(self) -> str:
        return self.url

    @property
    def is_local(self) -> bool:
        """A folder on this machine's file system."""
        return "://" not in self.url

    @property
    def path(self) -> Path:
        """The local folder (local locations only)."""
        if not self.is_local:
            raise ValueError(f"`{self.url}` is not a local path")
        return Path(self.url).expanduser()

    def filesystem(self) -> tuple[Any, str]:
        """``(fsspec filesystem, root path inside it)``; a clear error when the backend is not
        installed or cannot be reached."""
        import fsspec

        if self.is_local:
            return fsspec.filesystem("file"), str(self.path.absolute())
        try:
            fs, root = fsspec.core.url_to_fs(self.url)
        except ImportError as exc:
            protocol = self.url.split("://", 1)[0]
            extra = " (pip install 'hsicache[s3]')" if protocol in ("s3", "s3a") else ""
            raise StoreError(f"cannot open `{self.url}`: {exc}{extra}") from None
        except ValueError as exc:
            raise StoreError(f"cannot open `{self.url}`: {exc}") from None
        return fs, root.rstrip("/")

    def remote(self, name: str) -> tuple[Any, str]:
        """``(fsspec filesystem, path of name inside the store)``."""
        fs, root = self.filesystem()
        return fs, f"{root}/{name}"

    def zarr_store(self, *, read_only: bool) -> Any:
        """A Zarr v3 store over this location."""
        from zarr.storage import FsspecStore, LocalStore

        if self.is_local:
            return LocalStore(self.path, read_only=read_only)
        self.filesystem()  # turns a missing backend into a one-line error
        return FsspecStore.from_url(self.url, read_only=read_only)

    def exists(self, name: str = "zarr.json") -> bool:
        """Whether ``name`` exists inside the store (its root metadata by default)."""
        if self.is_local:
            return (self.path / name).exists()
        fs, key = self.remote(name)
        try:
            return bool(fs.exists(key))
        except OSError as exc:  # an unreachable endpoint, a missing bucket, no credentials
            raise StoreError(f"cannot reach `{self.url}`: {exc}") from None

    def is_empty(self) -> bool:
        """Whether nothing is stored under this location (absent counts as empty)."""
        if self.is_local:
            return not self.path.exists() or (self.path.is_dir() and not any(self.path.iterdir()))
        fs, root = self.filesystem()
        try:
            return not fs.ls(root, detail=False)
        except FileNotFoundError:
            return True
        except OSError as exc:
            raise StoreError(f"cannot reach `{self.url}`: {exc}") from None

    def store_format(self) -> str | None:
        """The ``format`` attribute of the zarr store here (``None``: no readable store, or no
        such attribute), whatever shape its root metadata has."""
        try:
            meta = json.loads(self.read_bytes("zarr.json"))
        except (OSError, ValueError):
            return None
        attrs = meta.get("attributes") if isinstance(meta, dict) else None
        fmt = attrs.get("format") if isinstance(attrs, dict) else None
        return str(fmt) if fmt is not None else None

    def read_bytes(self, name: str) -> bytes:
        """The content of ``name`` inside the store."""
        if self.is_local:
            return (self.path / name).read_bytes()
        fs, key = self.remote(name)
        return bytes(fs.cat_file(key))

    def create_exclusive(self, name: str, data: bytes) -> bool:
        """Write ``name`` only if it does not exist yet, atomically; ``False`` if it did."""
        if self.is_local:
            self.path.mkdir(parents=True, exist_ok=True)
            tmp = self.path / f".{name}.{uuid.uuid4().hex[:8]}"
            tmp.write_bytes(data)
            try:
                os.link(tmp, self.path / name)  # atomic, and fails if the name exists
            except FileExistsError:
                return False
            finally:
                tmp.unlink()
            return True
        fs, key = self.remote(name)
        try:
            fs.pipe_file(key, data, mode="create")
        except FileExistsError:
            return False
        return True

    def remove(self, name: str | None = None) -> None:
        """Delete ``name`` inside the store, or the whole store; missing is fine."""
        if self.is_local:
            target = self.path / name if name else self.path
            if target.is_dir():
                import shutil

                shutil.rmtree(target, ignore_errors=True)
            else:
                target.unlink(missing_ok=True)
            return
        fs, target = self.remote(name) if name else self.filesystem()
        with contextlib.suppress(FileNotFoundError):
            fs.rm(target, recursive=name is None)

    def nbytes(self, prefix: str) -> int:
        """Bytes stored under ``prefix`` inside the store."""
        if self.is_local:
            return sum(f.stat().st_size for f in (self.path / prefix).rglob("*") if f.is_file())
        fs, key = self.remote(prefix)
        return int(fs.du(key))


def publish_folder(local: Path, where: Location) -> None:
    """Upload a finished local store to an object store, root ``zarr.json`` last.

    Readers find a store by its root metadata, so a store whose upload was cut off reads as
    absent rather than half there; an existing store at ``where`` is replaced.
    """
    fs, root = where.filesystem()
    with contextlib.suppress(FileNotFoundError):
        fs.rm(root, recursive=True)
    files = sorted(p for p in local.rglob("*") if p.is_file())
    last = local / "zarr.json"
    for f in [p for p in files if p != last] + [last]:
        fs.put_file(str(f), f"{root}/{f.relative_to(local).as_posix()}")


@dataclass
class StoreLock:
    """Hold ``.hsicache-lock.json`` in a store while writing it (a context manager).

    Attributes:
        where: the store.
        what: how messages name it ("feature cache").
    """

    where: Location
    what: str = "feature cache"
    token: str = ""

    def __enter__(self) -> StoreLock:
        self.token = uuid.uuid4().hex
        me = {"host": socket.gethostname(), "pid": os.getpid(), "token": self.token}
        mine = json.dumps({**me, "started": time.time()}).encode()
        for _ in range(3):
            if self.where.create_exclusive(LOCK_KEY, mine):
                return self
            owner = self.owner()
            if owner is None or _stale(owner):
                self.where.remove(LOCK_KEY)  # its writer died: take the store over
                continue
            when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(owner.get("started", 0)))
            gone = (  # a dead writer on this host is taken over above, never unlocked by hand
                "or stop it"
                if owner.get("host") == me["host"]
                else f"if that process is gone, run `hsicache cache unlock {self.where}`"
            )
            raise StoreError(
                f"{self.what} `{self.where}` is being written by pid {owner.get('pid')} on "
                f"{owner.get('host')} since {when}: wait for it to finish; {gone}"
            )
        raise StoreError(f"could not lock {self.what} `{self.where}`: another writer keeps racing")

    def owner(self) -> dict[str, Any] | None:
        """Who holds the lock, or ``None`` when nobody (or an unreadable lock file) does."""
        try:
            return dict(json.loads(self.where.read_bytes(LOCK_KEY)))
        except (FileNotFoundError, ValueError):
            return None

    def force_release(self) -> dict[str, Any] | None:
        """Remove the lock of a writer that is not running on this host (``hsicache cache
        unlock``); returns who held it: ``None`` when nobody did, ``{}`` for a lock file that
        could not be read.

        Raises:
            StoreError: the lock's writer runs on this host.
        """
        if not self.where.exists(LOCK_KEY):
            return None
        owner = self.owner()
        if owner is not None and owner.get("host") == socket.gethostname() and not _stale(owner):
            raise StoreError(
                f"{self.what} `{self.where}` is being written by pid {owner.get('pid')} on this "
                "host, which is still running: stop it, or let it finish; nothing done"
            )
        self.where.remove(LOCK_KEY)
        return owner if owner is not None else {}

    def __exit__(self, *exc: object) -> None:
        owner = self.owner()
        if owner is not None and owner.get("token") == self.token:
            self.where.remove(LOCK_KEY)


def _stale(owner: dict[str, Any]) -> bool:
    """A lock from this host whose process is gone (or whose pid now names a younger one)."""
    if owner.get("host") != socket.gethostname():
        return False
    import psutil

    try:
        proc = psutil.Process(int(owner["pid"]))
        if proc.status() == psutil.STATUS_ZOMBIE:  # killed, not yet reaped by its parent
            return True
        return proc.create_time() > float(owner["started"]) + 1.0
    except (psutil.NoSuchProcess, KeyError, ValueError, TypeError):
        return True


class MemoryCache:
    """Values decoded from stores, kept in memory up to ``limit_bytes``, least recently used
    first out.

    A value is anything with ``nbytes`` (a decoded feature block, an opened scene); keys say
    what was read and from which version of the store, so a rewritten store is never answered
    from memory. The process-wide instance :data:`memory_cache` is bounded by
    ``$HSICACHE_BLOCK_CACHE_MB`` (default 256; 0 turns it off), read when the cache is first
    used (a bad value is a one-line :class:`~pipeline.errors.ConfigError` then, not an import
    failure), which also bounds the memory it adds to a streamed ``predict``.
    """

    def __init__(self, limit_bytes: int | None = None) -> None:
        self._limit = limit_bytes
        self._values: OrderedDict[tuple[Any, ...], Any] = OrderedDict()
        self._bytes = 0

    @property
    def limit_bytes(self) -> int:
        """The bound, from ``$HSICACHE_BLOCK_CACHE_MB`` unless given to the constructor."""
        if self._limit is None:
            self._limit = _limit_from_environment()
        return self._limit

    @limit_bytes.setter
    def limit_bytes(self, value: int) -> None:
        self._limit = value

    def get(self, key: tuple[Any, ...]) -> Any:
        """The value kept under ``key``, or ``None``."""
        value = self._values.get(key)
        if value is not None:
            self._values.move_to_end(key)
        return value

    def put(self, key: tuple[Any, ...], value: Any) -> None:
        """Keep ``value`` (unless it alone is over the limit), evicting the oldest as needed."""
        if value.nbytes > self.limit_bytes or key in self._values:
            return
        self._values[key] = value
        self._bytes += value.nbytes
        while self._bytes > self.limit_bytes:
            _, old = self._values.popitem(last=False)
            self._bytes -= old.nbytes

    def clear(self) -> None:
        """Forget everything."""
        self._values.clear()
        self._bytes = 0

    @property
    def nbytes(self) -> int:
        """Bytes held now."""
        return self._bytes


def _limit_from_environment() -> int:
    from pipeline.errors import ConfigError

    text = os.environ.get("HSICACHE_BLOCK_CACHE_MB", "256")
    try:
        mb = float(text)
    except ValueError:
        mb = float("nan")
    if not (mb >= 0 and mb != float("inf")):
        raise ConfigError(
            f"environment variable `HSICACHE_BLOCK_CACHE_MB` must be a number of megabytes "
            f">= 0 (0 turns the block cache off), got `{text}`"
        )
    return int(mb * 2**20)


memory_cache = MemoryCache()
