"""Small helpers shared by every store hsicache writes: atomic publication and provenance."""

from __future__ import annotations

import contextlib
import contextvars
import errno
import functools
import hashlib
import json
import os
import re
import shutil
import signal
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.errors import OutputConflictError
from pipeline.io.outputs import OutputKind, check_output, local_path

__all__ = [
    "all_or_nothing",
    "as_os_error",
    "atomic_output",
    "describe_codecs",
    "jsonable",
    "package_versions",
    "publish",
    "sha256_arrays",
    "umask_modes",
]


@dataclass
class _Finished:
    """An output written to its temporary sibling, waiting to take its place."""

    tmp: Path
    final: Path
    kind: OutputKind
    made: list[Path]  # folders created to hold it, innermost first
    option: str


@dataclass
class _Held:
    """What an :func:`all_or_nothing` block holds back: finished outputs, and the folders made
    for outputs that failed (removed, if empty, once the others' temporary files are gone)."""

    outputs: list[_Finished] = field(default_factory=list)
    folders: list[Path] = field(default_factory=list)

    def drop(self) -> None:
        for out in reversed(self.outputs):
            _discard(out.tmp, out.made)
        for folder in sorted(self.folders, key=lambda f: len(f.parts), reverse=True):
            with contextlib.suppress(OSError):
                folder.rmdir()


#: The innermost open :func:`all_or_nothing` block of this thread or task.
_HELD: contextvars.ContextVar[_Held | None] = contextvars.ContextVar("hsicache_held", default=None)

_VERSIONED = (
    "hsicache",
    "numpy",
    "zarr",
    "xarray",
    "torch",
    "diffusers",
    "scikit-learn",
    "xgboost",
    "skops",
)


@contextlib.contextmanager
def atomic_output(path: str | Path, kind: OutputKind, *, option: str = "path") -> Iterator[Path]:
    """Yield a temporary sibling of ``path``; on success it replaces ``path``, on error it goes.

    Readers therefore never see a half-written store or file, and a failed run leaves nothing
    behind (a previous complete output at ``path`` survives a failed rewrite; folders this call
    created to hold ``path`` are removed again). Only an output of the same ``kind`` that
    hsicache wrote is ever replaced (:func:`pipeline.io.outputs.check_output`, asked again right
    before the replacement); anything else is an :class:`~pipeline.errors.OutputConflictError`.

    Args:
        path: the final file or folder.
        kind: what it is (:mod:`pipeline.io.outputs`).
        option: how messages name the path (``out``).
    """
    check_output(path, kind, option=option)
    final = local_path(path)  # the very path the check looked at
    made = _make_parents(final.parent)
    tmp = final.with_name(f".{final.name}.tmp-{uuid.uuid4().hex[:8]}")
    held = _HELD.get()
    try:
        yield tmp
        if held is not None:  # published with the others when all_or_nothing's block ends
            held.outputs.append(_Finished(tmp, final, kind, made, option))
            return
        _publish_checked(tmp, final, kind, option)
    except BaseException as exc:
        _discard(tmp, made)
        if held is not None:
            held.folders.extend(made)  # others' temporary files may still be in them
        _name_the_output(exc, final)
        raise


#: What a write, and only a write, fails with: a full disk or quota, a read-only one.
_WRITE_ERRORS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EFBIG})


def _name_the_output(exc: BaseException, final: Path) -> None:
    """An error about a temporary sibling of ``final``, or about no file at all (zarr's writes
    on a full disk), names ``final``, the user's path."""
    if not isinstance(exc, OSError) or exc.errno is None:
        return
    unnamed = not exc.filename and exc.errno in _WRITE_ERRORS
    if unnamed or f"/.{final.name}." in f"/{exc.filename or ''}":
        raise OSError(exc.errno, exc.strerror or os.strerror(exc.errno), str(final)) from exc


def _publish_checked(tmp: Path, final: Path, kind: OutputKind, option: str) -> None:
    check_output(final, kind, option=option)  # nothing else appeared there meanwhile
    publish(tmp, final, kind)


@contextlib.contextmanager
def all_or_nothing() -> Iterator[None]:
    """Hold back the outputs that :func:`atomic_output` finishes inside this block and publish
    them together when it ends without error; when it fails, none of them appears.

    A command with several outputs (a map, its PNG and GeoTIFF) then never leaves some written
    and others not: every held output is checked once more, and the outputs they replace are
    moved aside, before the first is put in place; a failure puts them back. A nested block
    hands its outputs to the enclosing one when it succeeds and drops them when it fails.

    Not held back: remote stores (``s3://``, published by their own protocol), outputs written
    by threads this block starts (the hold is per thread), and so code inside the block that
    reads an output back sees what was there before.
    """
    outer = _HELD.get()
    held = _Held()
    token = _HELD.set(held)
    try:
        yield
    except BaseException:
        held.drop()
        raise
    finally:
        _HELD.reset(token)
    if outer is not None:
        outer.outputs += held.outputs
        outer.folders += held.folders
        return
    _publish_all(held)


def _publish_all(held: _Held) -> None:
    with _interrupts_held():
        _publish_all_now(held)


def _publish_all_now(held: _Held) -> None:
    """Check every held output, move the outputs they replace aside, put each in its place,
    then delete what was moved aside. A failure at any step (a file that cannot be moved:
    immutable, or in a folder that is not the user's) puts everything back as it was."""
    aside: list[tuple[Path, Path]] = []  # (final, where its previous content waits)
    placed: list[_Finished] = []
    try:
        for out in held.outputs:
            check_output(out.final, out.kind, option=out.option)
        for out in held.outputs:
            if out.final.exists() or out.final.is_symlink():
                old = out.final.with_name(f".{out.final.name}.old-{uuid.uuid4().hex[:8]}")
                out.final.rename(old)
                aside.append((out.final, old))
        for out in held.outputs:
            publish(out.tmp, out.final, out.kind)  # its place is free now
            placed.append(out)
    except BaseException as exc:
        for out in reversed(placed):
            out.final.rename(out.tmp)  # back to where drop() removes it
        for final, old in reversed(aside):
            old.rename(final)
        held.drop()
        for out in held.outputs:
            _name_the_output(exc, out.final)  # a temporary or set-aside name: the user's path
        raise
    for _final, old in aside:
        _discard(old, [])
    held.outputs = []
    held.drop()  # the folders of outputs that failed before, now empty


def _discard(tmp: Path, made: list[Path]) -> None:
    """Remove a failed write's temporary output and the folders made for it (if empty)."""
    with _interrupts_held():
        _discard_now(tmp, made)


def _discard_now(tmp: Path, made: list[Path]) -> None:
    if tmp.is_dir() and not tmp.is_symlink():
        for _ in range(40):  # zarr's writes still in flight after the first failure recreate
            shutil.rmtree(tmp, ignore_errors=True)  # their folders: until they have ended
            time.sleep(0.05)
            if not tmp.exists():
                break
    elif tmp.exists() or tmp.is_symlink():
        tmp.unlink()
    for folder in made:  # innermost first; only while still empty
        with contextlib.suppress(OSError):
            folder.rmdir()


def publish(tmp: Path, final: Path, kind: OutputKind | None = None) -> None:
    """Put the finished ``tmp`` in the place of ``final`` (atomic for a file; for a folder the
    old one is moved aside first, checked once more to be ``kind``'s, and deleted after)."""
    with _interrupts_held():
        _publish_now(tmp, final, kind)


_HOLDING = threading.local()


@contextlib.contextmanager
def _interrupts_held() -> Iterator[None]:
    """Ctrl-C (SIGINT) and SIGTERM wait until the block ends, then act as they would have: the
    renames and deletions that put outputs in place, or clear a failed run's temporary files,
    are never cut halfway (that left hidden ``.NAME.tmp-…`` or ``.NAME.old-…`` folders). Main
    thread only (signals are delivered there); nested blocks wait for the outermost."""
    if threading.current_thread() is not threading.main_thread() or getattr(_HOLDING, "depth", 0):
        _HOLDING.depth = getattr(_HOLDING, "depth", 0) + 1
        try:
            yield
        finally:
            _HOLDING.depth -= 1
        return
    caught: list[int] = []
    previous = {
        sig: signal.signal(sig, lambda signum, _frame: caught.append(signum))
        for sig in (signal.SIGINT, signal.SIGTERM)
    }
    _HOLDING.depth = 1
    try:
        yield
    finally:
        _HOLDING.depth = 0
        for sig, handler in previous.items():
            signal.signal(sig, handler if handler is not None else signal.SIG_DFL)
    for sig in dict.fromkeys(caught):  # now as it would have been: Ctrl-C, or termination
        signal.raise_signal(sig)


def _publish_now(tmp: Path, final: Path, kind: OutputKind | None) -> None:
    if final.is_dir() and not final.is_symlink():
        old = final.with_name(f".{final.name}.old-{uuid.uuid4().hex[:8]}")
        final.rename(old)
        if kind is not None and any(old.iterdir()) and not kind.recognise(old):
            old.rename(final)  # something else took its place since the check: leave it be
            raise OutputConflictError(
                f"`{final}` changed while hsicache was writing it and is no longer a "
                f"{kind.name} it wrote; nothing was replaced"
            )
        try:
            tmp.rename(final)
        except BaseException:
            old.rename(final)  # put the previous output back
            raise
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)


_OS_ERROR = re.compile(r"\(os error (\d+)\)")


def as_os_error(exc: Exception, path: str | Path) -> Exception:
    """The :class:`OSError` behind a library's own error about a failed write (safetensors
    says ``... (os error 28)``), naming ``path``; ``exc`` itself when it names none."""
    if isinstance(exc, OSError):
        return exc
    found = _OS_ERROR.search(str(exc))
    if found is None:
        return exc
    code = int(found.group(1))
    return OSError(code, os.strerror(code), str(path))


def umask_modes(folder: Path) -> None:
    """Give every file under ``folder`` the mode a plain ``open`` would (``0o666`` less the
    umask): libraries that write through ``mkstemp`` leave theirs readable by the owner only."""
    mask = os.umask(0)
    os.umask(mask)
    for path in folder.rglob("*"):
        if path.is_file() and not path.is_symlink():
            path.chmod(0o666 & ~mask)


def _make_parents(folder: Path) -> list[Path]:
    """Create ``folder`` and its missing parents; the ones created, innermost first."""
    missing = []
    while not folder.exists() and folder != folder.parent:
        missing.append(folder)
        folder = folder.parent
    for f in reversed(missing):
        f.mkdir()
    return missing


def sha256_arrays(*parts: np.ndarray | dict | str) -> str:
    """SHA-256 over arrays (shape, dtype and bytes) and JSON-able objects, in order."""
    h = hashlib.sha256()
    for part in parts:
        if isinstance(part, np.ndarray):
            part = part.reshape(1) if part.ndim == 0 else part  # as np.ascontiguousarray did
            h.update(f"{part.dtype.str}{part.shape}".encode())
            for block in _c_order_blocks(part):  # the C-order bytes, never a whole copy
                h.update(block.reshape(-1).view(np.uint8))
        else:
            h.update(json.dumps(part, sort_keys=True, default=str).encode())
    return h.hexdigest()


def _c_order_blocks(arr: np.ndarray, size: int = 1 << 26) -> Any:
    """``arr``'s bytes in C order: the array itself when it lies so, else C-order copies of
    blocks along its first axis of about ``size`` bytes (a band-sequential cube)."""
    if arr.flags.c_contiguous:
        yield arr
        return
    step = max(1, size // max(1, arr[:1].nbytes))
    for start in range(0, len(arr), step):
        yield np.ascontiguousarray(arr[start : start + step])


def jsonable(value: Any) -> Any:
    """``value`` as plain JSON types (Zarr attributes must be JSON): numpy scalars and arrays
    become numbers and lists, tuples lists, paths strings, anything else its ``str``."""
    return json.loads(json.dumps(value, default=_json_default))


def _json_default(obj: Any) -> Any:
    if isinstance(obj, (np.ndarray, np.generic)):
        return obj.tolist()
    return str(obj)


def package_versions() -> dict[str, str]:
    """Versions of the packages that shape a store's content."""
    return dict(_package_versions())


@functools.cache
def _package_versions() -> dict[str, str]:  # read once: installed versions do not change under us
    out = {}
    for name in _VERSIONED:
        with contextlib.suppress(metadata.PackageNotFoundError):
            out[name] = metadata.version(name)
    return out


def describe_codecs(arr: Any) -> str:
    """A zarr array's compression in a few words, e.g. ``blosc zstd 3 bitshuffle`` (zarr
    format 3 codecs, or format 2's numcodecs)."""
    parts = []
    for codec in getattr(arr, "compressors", ()) or ():
        if hasattr(codec, "to_dict"):
            spec = codec.to_dict()
            name, config = spec.get("name"), spec.get("configuration", {})
        else:
            name, config = codec.codec_id, codec.get_config()
        keys = ("cname", "clevel", "level", "shuffle")
        values = [getattr(config[k], "value", config[k]) for k in keys if k in config]
        parts.append(" ".join(str(w) for w in [name, *values]))
    return ", ".join(parts) or "none"
