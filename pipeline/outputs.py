"""Output paths: hsicache replaces only what hsicache made, and never one of its inputs.

Every command checks each of its outputs before it computes anything (:func:`check_outputs`):
an output path must be absent, an empty folder, or an output of the same kind that hsicache
wrote, recognised by the format marker hsicache puts in everything it writes:

=================  ==============================================================
kind               marker
=================  ==============================================================
scene store        ``zarr.json`` attribute ``format: hsicache-scene/…``
feature cache      ``zarr.json`` attribute ``format: hsicache-features/…``
context store      ``zarr.json`` attribute ``format: hsicache-context/…``
head folder        ``head.json`` with ``format: hsicache-head/…``
backbone folder    ``pretrain.json`` with ``format: hsicache-backbone/…``
metrics file       JSON with ``format: hsicache-metrics/…``
confusion CSV      the header line ``actual,predicted``
Markdown table     a first line ``<!-- hsicache ...``
PNG                a ``Software: hsicache`` text chunk
.npy map           ``# hsicache-npy`` in the header's padding (``np.load`` ignores it)
GeoTIFF            the ``TIFFTAG_SOFTWARE`` tag ``hsicache``
=================  ==============================================================

An output equal to, inside, or holding one of the command's inputs is refused too, and so are
two outputs of one command at the same place. :func:`pipeline.store.atomic_output` checks the
kind again right before it replaces anything, so a library caller who skipped the check still
cannot lose a file.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.errors import OutputConflictError

__all__ = [
    "BACKBONE",
    "CONFUSION_CSV",
    "CONTEXT",
    "FEATURES",
    "GEOTIFF",
    "HEAD",
    "MARKDOWN",
    "METRICS",
    "NPY",
    "PNG",
    "SCENE",
    "OutputKind",
    "check_outputs",
    "mark_npy",
    "png_metadata",
]

NPY_MARKER = b"# hsicache-npy/1"
PNG_SOFTWARE = "hsicache"


@dataclass(frozen=True)
class OutputKind:
    """A kind of output and how to recognise one that hsicache wrote.

    Attributes:
        name: how messages call it (``"scene store"``).
        folder: a folder (``True``) or a single file.
        recognise: ``recognise(path) -> bool`` for an existing local path.
        marker: the remote-store format prefix (zarr stores only), else ``None``.
    """

    name: str
    folder: bool
    recognise: Callable[[Path], bool]
    marker: str | None = None


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _json_format(path: Path, prefix: str) -> bool:
    data = _read_json(path)
    return isinstance(data, dict) and str(data.get("format", "")).startswith(prefix)


def _zarr_store(prefix: str) -> Callable[[Path], bool]:
    def recognise(path: Path) -> bool:
        meta = _read_json(path / "zarr.json")
        if not isinstance(meta, dict):
            return _only_lock(path)  # an extraction killed before its metadata was written
        attrs = meta.get("attributes") or {}
        return str(attrs.get("format", "")).startswith(prefix)

    return recognise


def _only_lock(path: Path) -> bool:
    from pipeline.storage import LOCK_KEY

    names = [p.name for p in path.iterdir()] if path.is_dir() else []
    return bool(names) and all(n.startswith((LOCK_KEY, f".{LOCK_KEY}")) for n in names)


def _head(path: Path) -> bool:
    return _json_format(path / "head.json", "hsicache-head/")


def _backbone(path: Path) -> bool:
    data = _read_json(path / "pretrain.json")
    if not isinstance(data, dict) or not (path / "unet").is_dir():
        return False  # the format marker, or a backbone pretrain wrote before it had one
    return str(data.get("format", "")).startswith("hsicache-backbone/") or (
        "heldout_loss_trained" in data and "config" in data
    )


def _metrics(path: Path) -> bool:
    return _json_format(path, "hsicache-metrics/")


def _confusion_csv(path: Path) -> bool:
    try:
        with path.open("rb") as fh:
            return fh.readline().strip() == b"actual,predicted"
    except OSError:
        return False


def _markdown(path: Path) -> bool:
    try:
        with path.open("rb") as fh:
            return fh.readline().startswith(b"<!-- hsicache")
    except OSError:
        return False


def _png(path: Path) -> bool:
    try:
        with path.open("rb") as fh:
            head = fh.read(4096)
    except OSError:
        return False
    return head.startswith(b"\x89PNG") and b"Software\x00" + PNG_SOFTWARE.encode() in head


def _npy(path: Path) -> bool:
    try:
        with path.open("rb") as fh:
            head = fh.read(512)
    except OSError:
        return False
    return head.startswith(b"\x93NUMPY") and NPY_MARKER in head


def _geotiff(path: Path) -> bool:
    try:
        import rasterio

        with rasterio.open(path) as ds:
            return str(ds.tags().get("TIFFTAG_SOFTWARE", "")).startswith(PNG_SOFTWARE)
    except Exception:  # not a raster rasterio can open: not ours
        return False


SCENE = OutputKind("scene store", True, _zarr_store("hsicache-scene/"), "hsicache-scene/")
FEATURES = OutputKind(
    "feature cache", True, _zarr_store("hsicache-features/"), "hsicache-features/"
)
CONTEXT = OutputKind("context store", True, _zarr_store("hsicache-context/"), "hsicache-context/")
HEAD = OutputKind("head folder", True, _head)
BACKBONE = OutputKind("backbone folder", True, _backbone)
METRICS = OutputKind("metrics file", False, _metrics)
CONFUSION_CSV = OutputKind("confusion CSV", False, _confusion_csv)
PNG = OutputKind("PNG written by hsicache", False, _png)
MARKDOWN = OutputKind("Markdown table written by hsicache", False, _markdown)
NPY = OutputKind(".npy written by hsicache", False, _npy)
GEOTIFF = OutputKind("GeoTIFF written by hsicache", False, _geotiff)


def png_metadata() -> dict[str, str]:
    """``savefig(..., metadata=png_metadata())``: the marker :data:`PNG` recognises."""
    return {"Software": PNG_SOFTWARE}


def mark_npy(path: str | Path) -> None:
    """Put :data:`NPY_MARKER` into the header padding of the ``.npy`` file at ``path``.

    The header is a Python literal that NumPy parses with ``ast.literal_eval``, so a comment in
    its padding changes nothing for ``np.load``; it only tells :data:`NPY` the file is ours.
    """
    with open(path, "r+b") as fh:
        start = fh.read(10)
        major = start[6]
        size_bytes = 2 if major == 1 else 4
        fh.seek(8)
        length = int.from_bytes(fh.read(size_bytes), "little")
        header = fh.read(length)
        body = header.rstrip(b"\n").rstrip(b" ")
        marked = body + b" " + NPY_MARKER
        if len(marked) + 1 > length:  # no room: leave the file unmarked rather than break it
            return
        fh.seek(8 + size_bytes)
        fh.write(marked + b" " * (length - 1 - len(marked)) + b"\n")


def describe(path: Path) -> str:
    """What sits at ``path``, in a few words, for messages."""
    if path.is_symlink() and not path.exists():
        return "a broken symbolic link"
    if path.is_dir():
        entries = sorted(p.name for p in path.iterdir())
        shown = ", ".join(f"`{n}`" for n in entries[:3]) + (", ..." if len(entries) > 3 else "")
        return f"a folder of {len(entries)} entries ({shown})"
    try:
        size = path.stat().st_size
    except OSError:
        return "something unreadable"
    return f"a file of {size:,} bytes"


def _resolved(path: str | Path) -> Path:
    return Path(path).expanduser().resolve()


def _is_local(path: str | Path) -> bool:
    return "://" not in str(path) or str(path).startswith("file://")


def _local(path: str | Path) -> Path:
    text = str(path)
    return Path(text[len("file://") :] if text.startswith("file://") else text)


def check_output(path: str | Path, kind: OutputKind, *, option: str) -> None:
    """Refuse ``path`` unless it is absent, an empty folder, or hsicache's ``kind`` of output.

    Raises:
        OutputConflictError: naming ``option``, the path and what is there.
    """
    if not _is_local(path):
        _check_remote(str(path), kind, option)
        return
    p = _local(path).expanduser()
    if not p.exists() and not p.is_symlink():
        return
    if kind.folder and p.is_dir() and not p.is_symlink():
        if not any(p.iterdir()) or kind.recognise(p):
            return
    elif not kind.folder and p.is_file() and not p.is_symlink() and kind.recognise(p):
        return
    raise OutputConflictError(
        f"`{option} {path}` already holds {describe(p)}, not a {kind.name} hsicache wrote: "
        "hsicache replaces only its own outputs; choose another path, or move that away first"
    )


def _check_remote(url: str, kind: OutputKind, option: str) -> None:
    from pipeline.storage import Location

    where = Location.of(url)
    if where.exists("zarr.json"):
        try:
            attrs = json.loads(where.read_bytes("zarr.json")).get("attributes") or {}
        except (OSError, ValueError):
            attrs = {}
        ours = kind.marker is not None and str(attrs.get("format", "")).startswith(kind.marker)
    else:
        ours = where.is_empty()
    if not ours:
        raise OutputConflictError(
            f"`{option} {url}` already holds objects that are not a {kind.name} hsicache "
            "wrote: hsicache replaces only its own outputs; choose another path, or remove "
            "them first"
        )


def check_outputs(
    outputs: Mapping[str, tuple[str | Path | None, OutputKind]],
    inputs: Mapping[str, str | Path | None] | None = None,
) -> None:
    """Check every output of one command before it computes anything.

    Args:
        outputs: ``{option: (path or None, kind)}``; ``None`` paths are skipped.
        inputs: ``{option: path or None}`` of what the command reads.

    Raises:
        OutputConflictError: an output holds something else, lies on an input, or two outputs
            share a place.
    """
    given = {opt: (p, kind) for opt, (p, kind) in outputs.items() if p is not None}
    read = {opt: p for opt, p in (inputs or {}).items() if p is not None and _is_local(p)}
    seen: dict[Path, str] = {}
    for opt, (path, kind) in given.items():
        if _is_local(path):
            out = _resolved(_local(path))
            for in_opt, in_path in read.items():
                _refuse_overlap(opt, path, out, in_opt, in_path)
            for other, other_opt in seen.items():
                if other == out or other in out.parents or out in other.parents:
                    raise OutputConflictError(
                        f"`{opt} {path}` and `{other_opt}` are the same place or one holds "
                        "the other: give each output its own path"
                    )
            seen[out] = f"{opt} {path}"
        check_output(path, kind, option=opt)


def _refuse_overlap(opt: str, path: Any, out: Path, in_opt: str, in_path: Any) -> None:
    inp = _resolved(_local(in_path))
    if out == inp:
        how = "is"
    elif inp in out.parents:
        how = "lies inside"
    elif out in inp.parents:
        how = "holds"
    else:
        return
    raise OutputConflictError(
        f"`{opt} {path}` {how} the input `{in_opt} {in_path}`: writing there would replace "
        "what the command reads; choose another output path"
    )
