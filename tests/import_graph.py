"""hsicache's own import graph, read from the source, and the DVC deps it implies.

Every import statement counts, at module level or inside a function (a function-level import
runs when the stage runs), and so does a string naming a module of ours (the head registry's
``"pipeline.heads.build:film"`` factories are imported by name). Importing ``a.b.c`` runs
``a/__init__.py`` and ``a/b/__init__.py`` too. The packages' ``__init__`` files load their
submodules lazily, so importing one submodule does not pull in its siblings.

A DVC stage runs ``hsicache <command>``: ``stages/cli.py``, which registers every command (it
imports the other command modules only to register them, so those edges are not followed), and
``stages/<command>.py``, with everything they import. Its deps are the library's subpackage
folders (``pipeline/heads``) and the single files (``pipeline/errors.py``, ``stages/train.py``)
in that closure.
"""

from __future__ import annotations

import ast
import re
from collections.abc import Iterable
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
OURS = ("pipeline", "stages")
_MODULE_STRING = re.compile(r"^((?:pipeline|stages)(?:\.\w+)+)(?::\w+)?$")


def module_file(name: str) -> Path | None:
    """The source file of module ``name`` (a package's ``__init__.py``), if it is ours."""
    if name.split(".")[0] not in OURS:
        return None
    base = REPO.joinpath(*name.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def module_name(path: Path) -> str:
    rel = path.relative_to(REPO).with_suffix("")
    parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
    return ".".join(parts)


def _with_parents(name: str) -> set[str]:
    parts = name.split(".")
    return {".".join(parts[: k + 1]) for k in range(len(parts))}


def imported_names(path: Path) -> set[str]:
    """Every module of ours that ``path`` imports (with the packages above it)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            found.add(node.module)
            found |= {f"{node.module}.{a.name}" for a in node.names}
        elif isinstance(node, ast.Constant) and isinstance(node.value, str):
            match = _MODULE_STRING.match(node.value)
            if match:
                found.add(match.group(1))
    ours = {n for n in found if module_file(n) is not None}
    return set().union(*(_with_parents(n) for n in ours)) if ours else set()


def closure(starts: Iterable[Path], *, skip: set[tuple[str, str]] = frozenset()) -> set[Path]:
    """The files ``starts`` import, directly or not; ``skip`` holds (importer, imported) edges
    not to follow."""
    todo = [module_name(p) for p in starts]
    seen: set[str] = set()
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        for parent in _with_parents(name):
            if parent not in seen:
                todo.append(parent)
        for dep in imported_names(module_file(name)):
            if dep not in seen and (name, dep) not in skip:
                todo.append(dep)
    return {module_file(n) for n in seen}


def dep_entry(path: Path) -> str:
    """The DVC dep that covers ``path``: its subpackage folder, or the file itself."""
    rel = path.relative_to(REPO)
    if rel.parts[0] == "pipeline" and len(rel.parts) > 2:
        return "/".join(rel.parts[:2])
    return rel.as_posix()


def command_files(command: str) -> set[Path]:
    """The files ``hsicache <command>`` runs."""
    cli = REPO / "stages" / "cli.py"
    registered = {
        n
        for n in imported_names(cli)
        if n.startswith("stages.") and n not in ("stages._errors", "stages._options")
    }
    skip = {("stages.cli", n) for n in registered}
    return closure([cli, REPO / "stages" / f"{command}.py"], skip=skip)


def command_deps(command: str) -> set[str]:
    """The code deps a DVC stage running ``hsicache <command>`` must list."""
    return {dep_entry(p) for p in command_files(command)}
