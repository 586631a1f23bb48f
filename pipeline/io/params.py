"""The pipeline's parameter file (``params.yaml``): one section per stage, plus ``heads:``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pipeline.errors import ConfigError

__all__ = ["head_settings", "load_section"]


def load_section(path: Path, section: str) -> dict[str, Any]:
    """The mapping under ``section`` in the YAML file ``path`` (empty when absent)."""
    import yaml

    if not path.is_file():
        raise ConfigError(f"params file `{path}` does not exist")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        reason = str(exc).splitlines()[0]
        raise ConfigError(f"params file `{path}` is not valid YAML: {reason}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"params file `{path}` must hold a mapping of stage sections")
    table = data.get(section) or {}
    if not isinstance(table, dict):
        raise ConfigError(f"`{section}` in `{path}` must be a mapping of option names to values")
    return table


def head_settings(path: Path, head: str) -> dict[str, Any]:
    """The settings of ``heads.<head>`` in the params file ``path`` (empty when absent)."""
    section = load_section(path, "heads").get(head) or {}
    if not isinstance(section, dict):
        raise ConfigError(f"`heads.{head}` in `{path}` must be a mapping")
    return dict(section)
