"""The pipeline's parameter file (``params.yaml``): one section per stage, plus ``heads:``."""

from __future__ import annotations

from collections.abc import Collection
from pathlib import Path
from typing import Any

from pipeline.errors import ConfigError

__all__ = ["head_settings", "load_section"]

# Every section hsicache reads: a command's options (its name) and the heads' recipes.
SECTIONS = (
    "prepare",
    "pretrain",
    "context",
    "extract",
    "train",
    "evaluate",
    "predict",
    "compare",
    "curve",
    "probe",
    "suggest",
    "heads",
)


def load_section(path: Path, section: str, known: Collection[str] | None = None) -> dict[str, Any]:
    """The mapping under ``section`` in the YAML file ``path`` (empty when absent).

    ``known``: the keys ``section`` may hold (a command's options), to tell a misspelt section
    from a section of the user's own; ``None`` for ``heads`` (a mapping of head recipes).
    """
    import yaml

    if path.is_dir():
        raise ConfigError(f"params file `{path}` is a folder, not a YAML file")
    if not path.is_file():
        raise ConfigError(f"params file `{path}` does not exist")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except UnicodeDecodeError:
        raise ConfigError(f"params file `{path}` is not a text (UTF-8) file") from None
    except yaml.YAMLError as exc:
        reason = str(exc).splitlines()[0]
        raise ConfigError(f"params file `{path}` is not valid YAML: {reason}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"params file `{path}` must hold a mapping of stage sections")
    _check_spelling(path, data, section, known)
    table = data.get(section) or {}
    if not isinstance(table, dict):
        raise ConfigError(f"`{section}:` in `{path}` must be a mapping of option names to values")
    return table


def _check_spelling(
    path: Path, data: dict[Any, Any], section: str, known: Collection[str] | None
) -> None:
    """Refuse a near miss of ``section`` (``contxt:``) holding what ``section`` would hold:
    its settings would otherwise be ignored in silence. Beside ``section`` itself, only a near
    miss whose every key is one of ``section``'s is taken for a misspelling. Sections of a
    user's own (other names, or other keys) are left alone."""
    import difflib

    others = {str(key): value for key, value in data.items() if key not in SECTIONS}
    beside = section in data
    for near in difflib.get_close_matches(section, list(others), n=5, cutoff=0.75):
        if _holds_settings_of(others[near], known, strict=beside):
            raise ConfigError(
                f"params file `{path}` has `{near}:` beside `{section}:`, with {section} settings "
                f"in it that would be ignored: move them into `{section}:`"
                if beside
                else f"params file `{path}` has no `{section}:` section but has `{near}:`, with "
                f"{section} settings in it: did you mean `{section}:`?"
            )


def _holds_settings_of(body: Any, known: Collection[str] | None, *, strict: bool) -> bool:
    """Whether ``body`` looks like the section whose keys are ``known`` (``None``: head
    recipes): any key of it, or with ``strict`` every key."""
    if not isinstance(body, dict) or not body:
        return False
    if known is None:
        return all(isinstance(v, dict) for v in body.values())
    ours = [str(k).replace("-", "_") in known for k in body]
    return all(ours) if strict else any(ours)


def head_settings(path: Path, head: str) -> dict[str, Any]:
    """The settings of ``heads.<head>`` in the params file ``path`` (empty when absent)."""
    section = load_section(path, "heads").get(head) or {}
    if not isinstance(section, dict):
        raise ConfigError(f"`heads.{head}` in `{path}` must be a mapping")
    return dict(section)
