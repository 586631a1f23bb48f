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
metrics file       JSON with ``format: hsicache-metrics/…`` and its command's ``kind``
confusion CSV      the header line ``actual,predicted``
curve CSV          a header line starting ``per_class,``
suggestions CSV    the header line ``row,col,x,y,predicted_class,score``
GeoJSON            a FeatureCollection with the member ``"hsicache"``
Markdown table     a first line ``<!-- hsicache ...``
PNG                a ``Software: hsicache`` text chunk
.npy map           ``# hsicache-npy`` in the header's padding (``np.load`` ignores it)
GeoTIFF            the ``TIFFTAG_SOFTWARE`` tag ``hsicache``
=================  ==============================================================

An output equal to, inside, or holding one of the command's inputs is refused too, and so are
two outputs of one command at the same place. :func:`pipeline.io.store.atomic_output` checks the
kind again right before it replaces anything, so a library caller who skipped the check still
cannot lose a file.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.errors import ConfigError, OutputConflictError
from pipeline.io.storage import LOCK_KEY, Location

__all__ = [
    "BACKBONE",
    "COMPARE_METRICS",
    "CONFIDENCE_NPY",
    "CONFUSION_CSV",
    "CONTEXT",
    "CURVE_CSV",
    "CURVE_METRICS",
    "FEATURES",
    "GEOJSON",
    "GEOTIFF",
    "HEAD",
    "MARKDOWN",
    "METRICS",
    "NPY",
    "PNG",
    "PROBE_METRICS",
    "SCENE",
    "SIMULATION_METRICS",
    "SUGGEST_CSV",
    "OutputKind",
    "check_outputs",
    "local_path",
    "mark_npy",
    "png_metadata",
]

NPY_MARKER = b"# hsicache-npy/1"
_URL_LIKE = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]+:/")  # a scheme (2+ letters: not a drive)
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


def _format_of(data: Any) -> str:
    """The ``format`` entry of a JSON document, or ``""`` (whatever shape it has)."""
    return str(data.get("format", "")) if isinstance(data, dict) else ""


def _json_format(path: Path, prefix: str) -> bool:
    return _format_of(_read_json(path)).startswith(prefix)


def _lockish(name: str) -> bool:
    return name.startswith((LOCK_KEY, f".{LOCK_KEY}"))


def _zarr_store(prefix: str) -> Callable[[Path], bool]:
    """A store of that format, holding nothing but zarr nodes, their chunks and the writer
    lock, at any depth: a folder the user added files to is not hsicache's to delete."""

    def recognise(path: Path) -> bool:
        entries = list(path.iterdir())
        if not (path / "zarr.json").is_file():  # an extraction killed before its metadata
            return bool(entries) and all(_lockish(e.name) for e in entries)
        fmt = str(Location.of(path).store_format())
        return fmt.startswith(prefix) and _zarr_node(path, root=True)

    return recognise


def _zarr_node(path: Path, *, root: bool = False) -> bool:
    """``path`` holds its ``zarr.json`` and, for an array, its chunk folder ``c``; for a group,
    child nodes; for the root, also the writer lock. Nothing else, and no symbolic link."""
    meta = _read_json(path / "zarr.json")
    if not isinstance(meta, dict):
        return False
    array = meta.get("node_type") == "array"
    for entry in path.iterdir():
        if entry.is_symlink():
            return False
        if entry.name == "zarr.json" or (root and _lockish(entry.name)):
            continue
        if array:
            if entry.name != "c" or not entry.is_dir() or not _chunk_tree(entry):
                return False
        elif not entry.is_dir() or not _zarr_node(entry):
            return False
    return True


def _chunk_tree(folder: Path) -> bool:
    """Nothing under ``folder`` but folders and chunk files named by chunk indices."""
    for _, dirs, files in os.walk(folder):
        if not all(name.isdigit() for name in (*dirs, *files)):
            return False
    return True


def _only(path: Path, names: tuple[str, ...]) -> bool:
    """Every entry of the folder is one of ``names`` (what hsicache writes there), and a file
    or folder as hsicache writes it: the backbone's two folders hold only their own files."""
    for entry in path.iterdir():
        if entry.name not in names or entry.is_symlink():
            return False
        pattern = _SUBFOLDERS.get(entry.name)
        if pattern is None:
            if not entry.is_file():
                return False
        elif not entry.is_dir() or not all(pattern.fullmatch(e.name) for e in entry.iterdir()):
            return False
    return True


def _head(path: Path) -> bool:
    return _only(path, _HEAD_FILES) and _json_format(path / "head.json", "hsicache-head/")


def _backbone(path: Path) -> bool:
    data = _read_json(path / "pretrain.json")
    if not isinstance(data, dict) or not (path / "unet").is_dir() or not _only(path, _BACKBONE):
        return False  # the format marker, or a backbone pretrain wrote before it had one
    return _format_of(data).startswith("hsicache-backbone/") or (
        "heldout_loss_trained" in data and "config" in data
    )


_HEAD_FILES = ("head.json", "config.json", "model.safetensors", "model.skops")
_BACKBONE = ("unet", "scheduler", "pretrain.json", "train_log.csv", "ATTRIBUTION.md")
#: What ``save_pretrained`` writes in a backbone's folders (weights may be sharded).
_SUBFOLDERS = {
    "unet": re.compile(r"config\.json|diffusion_pytorch_model[\w.-]*\.(safetensors|json)"),
    "scheduler": re.compile(r"scheduler_config\.json"),
}


def _metrics_of(kind: str | None) -> Callable[[Path], bool]:
    """A metrics JSON of one command, told apart by its ``kind`` entry (``evaluate``'s has
    none): one command's table is not another's to replace."""

    def recognise(path: Path) -> bool:
        data = _read_json(path)
        return _format_of(data).startswith("hsicache-metrics/") and data.get("kind") == kind

    return recognise


def _csv_of(header: Callable[[list[str]], bool], *cells: Callable[[str], Any]) -> Callable:
    """A CSV hsicache writes: its header line, and every row of the header's width whose cells
    parse as ``cells`` say (``str`` for text, ``int``, ``float``; the last one repeats). A file
    the user wrote in that format with notes or other columns in it is not hsicache's."""

    def recognise(path: Path) -> bool:
        import csv

        try:
            with path.open(newline="", encoding="utf-8") as fh:
                rows = csv.reader(fh)
                names = next(rows, None)
                if names is None or not header(names):
                    return False
                for row in rows:
                    if len(row) != len(names):
                        return False
                    for i, cell in enumerate(row):
                        cells[min(i, len(cells) - 1)](cell)
        except (OSError, UnicodeDecodeError, ValueError, csv.Error):
            return False
        return True

    return recognise


def _text(cell: str) -> str:
    if not cell:
        raise ValueError("an empty cell")
    return cell


_confusion_csv = _csv_of(lambda h: h == ["actual", "predicted"], _text)
_curve_csv = _csv_of(lambda h: len(h) > 1 and h[0] == "per_class", int, float)
_suggest_csv = _csv_of(
    lambda h: h == ["row", "col", "x", "y", "predicted_class", "score"],
    int, int, float, float, _text, float,
)  # fmt: skip


def _geojson(path: Path) -> bool:
    try:
        body = json.loads(path.read_text())
    except (OSError, ValueError):
        return False
    return isinstance(body, dict) and "hsicache" in body


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


def _npy_of(dtype_kind: str) -> Callable[[Path], bool]:
    """A marked ``.npy`` of one NumPy dtype kind: ``i`` a class map, ``f`` a confidence map
    (one is not the other's to replace)."""

    def recognise(path: Path) -> bool:
        try:
            with path.open("rb") as fh:
                head = fh.read(512)
                fh.seek(0)
                major, _minor = np.lib.format.read_magic(fh)
                read = (
                    np.lib.format.read_array_header_1_0
                    if major == 1
                    else np.lib.format.read_array_header_2_0
                )
                dtype = read(fh)[2]
        except (OSError, ValueError):
            return False
        return NPY_MARKER in head and dtype.kind == dtype_kind

    return recognise


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
METRICS = OutputKind("metrics file", False, _metrics_of(None))
COMPARE_METRICS = OutputKind("metrics file (compare)", False, _metrics_of("compare"))
CURVE_METRICS = OutputKind("metrics file (curve)", False, _metrics_of("curve"))
PROBE_METRICS = OutputKind("metrics file (probe)", False, _metrics_of("probe"))
SIMULATION_METRICS = OutputKind(
    "metrics file (suggest --simulate)", False, _metrics_of("suggest-simulation")
)
CONFUSION_CSV = OutputKind("confusion CSV", False, _confusion_csv)
CURVE_CSV = OutputKind("curve CSV", False, _curve_csv)
SUGGEST_CSV = OutputKind("suggestions CSV", False, _suggest_csv)
GEOJSON = OutputKind("GeoJSON", False, _geojson)
PNG = OutputKind("PNG", False, _png)
MARKDOWN = OutputKind("Markdown table", False, _markdown)
NPY = OutputKind(".npy file", False, _npy_of("i"))
CONFIDENCE_NPY = OutputKind(".npy file (confidence)", False, _npy_of("f"))
GEOTIFF = OutputKind("GeoTIFF", False, _geotiff)


#: File name endings a single-file output must have, where other programs go by them.
_SUFFIXES: dict[OutputKind, tuple[str, ...]] = {
    PNG: (".png",),
    NPY: (".npy",),
    CONFIDENCE_NPY: (".npy",),
    GEOTIFF: (".tif", ".tiff"),
}


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
    if path.is_symlink():
        return f"a symbolic link (to `{path.readlink()}`)"
    if path.is_dir():
        entries = sorted(p.name for p in path.iterdir())
        shown = ", ".join(f"`{n}`" for n in entries[:3]) + (", ..." if len(entries) > 3 else "")
        return f"a folder of {len(entries)} entr{'y' if len(entries) == 1 else 'ies'} ({shown})"
    try:
        size = path.stat().st_size
    except OSError:
        return "something unreadable"
    return f"a file of {size:,} bytes"


def _resolved(path: str | Path) -> Path:
    return local_path(path).resolve()


def _is_local(path: str | Path) -> bool:
    return "://" not in str(path) or str(path).startswith("file://")


def local_path(path: str | Path) -> Path:
    """The local path an output option names (``file://`` and ``~`` undone): the one place
    both the check and the write take it from, so they look at the same file."""
    text = str(path)
    return Path(text[len("file://") :] if text.startswith("file://") else text).expanduser()


def check_output(path: str | Path, kind: OutputKind, *, option: str) -> None:
    """Refuse ``path`` unless it is absent, an empty folder, or hsicache's ``kind`` of output
    (never a symbolic link), in a folder that exists or can be made and can be written.

    Raises:
        OutputConflictError: naming ``option``, the path and what is there.
        ConfigError: a path that names no file of its own, a URL for a single-file output, or
            a PNG, ``.npy`` or GeoTIFF output whose name does not end as such files do.
    """
    if not _is_local(path) or _URL_LIKE.match(str(path)):
        if kind.marker is None or "://" not in str(path):  # s3://b/x made a Path: s3:/b/x
            raise ConfigError(f"`{option}={path}`: this output is written to a local path only")
        _check_remote(str(path), kind, option)
        return
    p = local_path(path)
    if not p.name or p.name in (".", ".."):
        raise ConfigError(f"`{option}={path}` names no file or folder of its own: give a name")
    if (p.is_symlink() or p.exists()) and not _ours(p, kind):
        raise OutputConflictError(
            f"`{option}={path}` already holds {describe(p)}, not a {kind.name} hsicache wrote: "
            "hsicache replaces only its own outputs; choose another path, or move that away first"
        )
    wanted = _SUFFIXES.get(kind)
    if wanted and p.suffix.lower() not in wanted:  # a viewer would take it for what it says
        raise ConfigError(
            f"`{option}={path}`: this output is a {kind.name}; name it `{wanted[0]}`"
            + (f" or `{wanted[1]}`" if len(wanted) > 1 else "")
        )
    _check_parent(p, option, path)


def _ours(p: Path, kind: OutputKind) -> bool:
    if p.is_symlink():
        return False  # never replaced: the link, or what it points at, is someone's
    if kind.folder:
        return p.is_dir() and (not any(p.iterdir()) or kind.recognise(p))
    return p.is_file() and kind.recognise(p)


def _check_parent(p: Path, option: str, given: Any) -> None:
    """The nearest existing folder above ``p`` is a folder this process may write in."""
    parent = p.absolute().parent
    while not parent.exists() and not parent.is_symlink() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise OutputConflictError(
            f"`{option}={given}` cannot be written: `{parent}` is a file, not a folder"
        )
    if not os.access(parent, os.W_OK | os.X_OK):
        raise OutputConflictError(
            f"`{option}={given}` cannot be written: folder `{parent}` is not writable"
        )


def _check_remote(url: str, kind: OutputKind, option: str) -> None:
    where = Location.of(url)
    if where.exists("zarr.json"):
        ours = kind.marker is not None and str(where.store_format()).startswith(kind.marker)
    else:
        ours = where.is_empty()
    if not ours:
        raise OutputConflictError(
            f"`{option}={url}` already holds objects that are not a {kind.name} hsicache "
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
    read = {opt: p for opt, p in (inputs or {}).items() if p is not None}
    seen: dict[Path, str] = {}
    for opt, (path, kind) in given.items():
        if not _is_local(path):
            for in_opt, in_path in read.items():
                _refuse_remote_overlap(opt, str(path), in_opt, str(in_path))
        else:
            out = _resolved(path)
            for in_opt, in_path in read.items():
                if _is_local(in_path):
                    _refuse_overlap(opt, path, out, in_opt, in_path)
            for other, other_opt in seen.items():
                if other == out or other in out.parents or out in other.parents:
                    raise OutputConflictError(
                        f"`{opt}={path}` and `{other_opt}` are the same place or one holds "
                        "the other: give each output its own path"
                    )
            seen[out] = f"{opt}={path}"
        check_output(path, kind, option=opt)


def _refuse_remote_overlap(opt: str, url: str, in_opt: str, in_url: str) -> None:
    """The same rule for URLs: no output equal to, inside or holding an input."""
    a, b = url.rstrip("/") + "/", in_url.rstrip("/") + "/"
    if a.startswith(b) or b.startswith(a):
        raise OutputConflictError(
            f"`{opt}={url}` is, lies inside or holds the input `{in_opt}={in_url}`: writing "
            "there would replace what the command reads; choose another output path"
        )


def _refuse_overlap(opt: str, path: Any, out: Path, in_opt: str, in_path: Any) -> None:
    inp = _resolved(in_path)
    if out == inp:
        how = "is"
    elif inp in out.parents:
        how = "lies inside"
    elif out in inp.parents:
        how = "holds"
    else:
        return
    raise OutputConflictError(
        f"`{opt}={path}` {how} the input `{in_opt}={in_path}`: writing there would replace "
        "what the command reads; choose another output path"
    )
