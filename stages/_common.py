"""What every stage command shares: turning user errors into one line and exit code 2."""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator

import typer

from pipeline.errors import HsicacheError

DEBUG_OPTION = typer.Option(False, "--debug", help="Show the full traceback on errors.")


@contextlib.contextmanager
def user_errors(debug: bool) -> Iterator[None]:
    """Print a hsicache error as one line on stderr and exit 2; re-raise it with ``--debug``."""
    try:
        yield
    except HsicacheError as exc:
        if debug:
            raise
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(code=2) from None
    except KeyboardInterrupt:
        typer.echo("interrupted", err=True)
        raise typer.Exit(code=130) from None


def parse_csv_ints(value: str | None, option: str) -> list[int] | None:
    """``"21,11,6"`` -> ``[21, 11, 6]``; a clear error names ``option`` otherwise."""
    if value is None:
        return None
    try:
        return [int(v) for v in value.split(",") if v.strip()]
    except ValueError:
        from pipeline.errors import ConfigError

        raise ConfigError(f"`{option}` takes comma-separated integers, got `{value}`") from None


def run_app(app: typer.Typer) -> None:
    """Entry point for ``python -m stages.<name>``."""
    app(prog_name=f"python -m {sys.modules['__main__'].__spec__.name}")  # type: ignore[union-attr]
