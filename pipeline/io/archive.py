"""Byte-reproducible skops files: the same fitted estimator gives the same bytes in any process.

skops names each array member of its zip after the array's memory address (``id``), a binary
member after a random UUID, records every object's address as its ``__id__`` in
``schema.json``, and stamps each member with the current time. Saved twice, one model gives two
files, so DVC sees a changed head on every ``train`` and re-runs every stage after it.
:func:`skops_bytes` renumbers members and ids in the order the schema first names them and
stamps every member (and the members of a nested ``.npz``) 1980-01-01: what the model is
decides the bytes, not when or where it was saved. ``skops.io.load`` reads the result as it
reads its own files: members are looked up by the names the schema gives, ids only tie
repeated objects together.
"""

from __future__ import annotations

import io
import json
import zipfile
from typing import Any

__all__ = ["skops_bytes"]

FIXED_DATE = (1980, 1, 1, 0, 0, 0)  # the earliest date a zip member can carry
_SCHEMA = "schema.json"


def skops_bytes(obj: Any) -> bytes:
    """``skops.io.dumps(obj)`` in a canonical form: member names, ``__id__`` values and
    timestamps no longer depend on the process or the clock."""
    import skops.io as sio

    src = zipfile.ZipFile(io.BytesIO(sio.dumps(obj)))
    schema = json.loads(src.read(_SCHEMA))
    names: dict[str, str] = {}
    ids: dict[int, int] = {}
    members = set(src.namelist()) - {_SCHEMA}
    schema = _renumber(schema, members, names, ids)
    names.update({m: m for m in sorted(members - set(names))})  # never drop what it wrote
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as dst:
        for old, new in names.items():
            info = src.getinfo(old)
            data = src.read(old)
            _write(dst, info, new, _fixed_zip(data) if new.endswith(".npz") else data)
        info = src.getinfo(_SCHEMA)
        _write(dst, info, _SCHEMA, json.dumps(schema, indent=2).encode())
    return out.getvalue()


def _renumber(node: Any, members: set[str], names: dict[str, str], ids: dict[int, int]) -> Any:
    """``node`` with every member name and ``__id__`` replaced by its order of first
    appearance (a depth-first walk in the schema's own key order), ids counted from 1: skops
    ties repeated objects together only by a true (non-zero) id."""
    if isinstance(node, list):
        return [_renumber(v, members, names, ids) for v in node]
    if not isinstance(node, dict):
        return node
    out = {}
    for key, value in node.items():
        if key == "__id__" and isinstance(value, int) and not isinstance(value, bool):
            out[key] = ids.setdefault(value, len(ids) + 1)  # skops memoises no id 0
        elif key == "file" and isinstance(value, str) and value in members:
            suffix = value[value.rfind(".") :] if "." in value else ""
            out[key] = names.setdefault(value, f"{len(names)}{suffix}")
        else:
            out[key] = _renumber(value, members, names, ids)
    return out


def _fixed_zip(data: bytes) -> bytes:
    """A zip archive (a nested ``.npz``) with every member stamped :data:`FIXED_DATE`."""
    src = zipfile.ZipFile(io.BytesIO(data))
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as dst:
        for info in src.infolist():
            _write(dst, info, info.filename, src.read(info))
    return out.getvalue()


def _write(dst: zipfile.ZipFile, like: zipfile.ZipInfo, name: str, data: bytes) -> None:
    info = zipfile.ZipInfo(name, date_time=FIXED_DATE)
    info.compress_type = like.compress_type
    info.external_attr = like.external_attr
    dst.writestr(info, data)
