"""What every stage command shares: turning user errors into one line and exit code 2."""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import re
import sys
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, NoReturn

import typer
from typer.core import TyperGroup

try:  # typer vendors click from 0.2x on; its usage errors are typer._click's
    from typer._click import exceptions as _usage
    from typer._click.globals import get_current_context
except ImportError:  # pragma: no cover - older typer on click
    from click import exceptions as _usage  # type: ignore[no-redef]
    from click import get_current_context  # type: ignore[no-redef]

from pipeline.errors import ConfigError, HsicacheError, HsicacheWarning
from pipeline.io.params import load_section
from pipeline.utils.config import StageConfig

BACKBONE_HELP = (
    "builtin:tiny | builtin:adm64 | diffusers folder | hub id | guided-diffusion .pt checkpoint."
)
DTYPE_HELP = (
    "auto | fp32 | bf16 | fp16. auto: bf16 (else fp16) on a GPU; on a CPU fp32, unless the CPU "
    "computes bf16 natively (AVX-512 BF16 or AMX), then bf16 if one timed patch is 10 % faster "
    "with the same features (decided once per machine; recorded in the cache's provenance)."
)
DEBUG_OPTION = typer.Option(False, "--debug", help="Show the full traceback on errors.")
STORE_HELP = " A folder or an fsspec URL (s3://bucket/path.zarr, file://...)."
SCENE_OPTION = typer.Option(
    ..., "--scene", help="Scene store from `hsicache prepare`." + STORE_HELP
)
HEAD_FEATURES_OPTION = typer.Option(
    None, "--features", help="Feature cache the head was trained on." + STORE_HELP
)
CONTEXT_STORE_OPTION = typer.Option(
    None,
    "--context-store",
    help="Context store from `hsicache context`, for heads that read context families."
    + STORE_HELP,
)
#: The context store of the commands that put heads side by side (``--context`` for short).
CONTEXT_OPTION = typer.Option(
    None,
    "--context-store",
    "--context",
    help="Context store from `hsicache context`." + STORE_HELP,
)
#: The heads of ``compare`` and ``curve``.
HEADS_OPTION = typer.Option(
    None,
    "--heads",
    help="Comma-separated heads: names under `heads:` of the params file (their recipes) "
    "or bare kinds (svm, logreg, film...).",
)
#: Split seeds.
SEEDS_OPTION = typer.Option("0,1,2,3,4", "--seeds", help="Comma-separated split seeds.")
WORKERS_OPTION = typer.Option(
    None, "--workers", help="Run on a new local dask cluster of this many worker processes."
)
SCHEDULER_OPTION = typer.Option(
    None,
    "--scheduler",
    help="Run on the existing dask cluster at this address (tcp://host:8786); the stores must "
    "be reachable from its workers.",
)


def cluster(workers: int | None, scheduler: str | None) -> Callable[[], Any] | None:
    """``--workers``/``--scheduler`` checked now, the cluster opened once there is work, with
    its dashboard address on stderr (see :func:`pipeline.io.cluster.cluster_opener`)."""
    from pipeline.io.cluster import cluster_opener

    def show(client: Any) -> None:
        typer.echo(f"dask dashboard: {client.dashboard_link}", err=True)

    return cluster_opener(workers, scheduler, on_open=show)


EXIT_USER = 2  # a mistake the user can fix: bad input, a path that cannot be written
EXIT_INTERNAL = 3  # a bug in hsicache


def failure_line(exc: BaseException) -> tuple[int, str]:
    """``(exit code, one line)`` for an exception that ends a command.

    hsicache's own errors and the operating system's (disk full, read-only, not a folder,
    permission denied...) are the user's to fix: exit 2. Anything else is a bug: exit 3 and a
    line that says so.
    """
    if isinstance(exc, HsicacheError):
        return EXIT_USER, f"error: {_one(str(exc))}"
    if isinstance(exc, OSError):
        reason = exc.strerror or str(exc) or type(exc).__name__
        where = exc.filename or exc.filename2
        return EXIT_USER, f"error: {_one(reason)}" + (f": `{where}`" if where else "")
    if isinstance(exc, MemoryError) or type(exc).__name__ == "OutOfMemoryError":
        return EXIT_USER, (
            "error: out of memory: use a smaller input, a smaller `--batch-size`, or a machine "
            "(or GPU) with more memory"
        )
    text = str(exc).splitlines()[0] if str(exc) else ""
    return EXIT_INTERNAL, (
        f"internal error ({type(exc).__name__}{': ' + text[:200] if text else ''}): a bug in "
        "hsicache, not in your input; re-run with --debug for the traceback and report it"
    )


#: Library parameters a command spells differently (library name -> the command's parameter
#: name): with the commands' own option names, all :func:`in_flags` needs.
SPELLED_AS = {
    "cache": "features",
    "recipes": "params",
    "rounds": "simulate",
    "context": "context_store",
    "context_store": "context",
    "filter": "filter_",
}
_NAMED = re.compile(r"`([A-Za-z_][A-Za-z0-9_]*)(?:=([^`]*))?`")


def in_flags(message: str, ctx: Any = None) -> str:
    """A library message in the command line's words: a backticked parameter ``stride``
    becomes ``--stride``, ``split=fraction`` becomes ``--split fraction`` (and
    ``allow_degenerate=True`` ``--allow-degenerate``), for the parameters of the command that
    is running; anything else is left as it is. The one place where hsicache's library and
    command-line vocabularies meet."""
    ctx = ctx if ctx is not None else get_current_context(silent=True)
    if ctx is None:
        return message
    flags = {}
    for p in ctx.command.params:
        longs = [o for o in getattr(p, "opts", []) if o.startswith("--")]
        if p.name and longs:
            flags[p.name] = longs[0]
    for name, spelled in SPELLED_AS.items():
        if name not in flags and spelled in flags:
            flags[name] = flags[spelled]

    def flag(m: re.Match[str]) -> str:
        name, value = m.group(1), m.group(2)
        if name not in flags:
            return m.group(0)
        if value is None or value == "True":
            return f"`{flags[name]}`"
        return f"`{flags[name]} {value.strip(chr(39) + chr(34))}`"

    return _NAMED.sub(flag, message)


def config_option(config: type[StageConfig], name: str, *decls: str, help: str) -> Any:
    """A ``typer.Option`` for field ``name`` of a stage's configuration: ``None`` (not given)
    by default, so the configuration stays the single source of defaults; ``--help`` shows
    the configuration's default."""
    default = config.default(name)
    shown = "" if default in (None, (), dataclasses.MISSING) else _as_option_text(default)
    flags = decls or ("--" + name.replace("_", "-"),)
    return typer.Option(None, *flags, help=help + (f" (default {shown})" if shown else ""))


def _as_option_text(value: Any) -> str:
    if isinstance(value, tuple):
        return ",".join(str(v) for v in value)
    return str(value).lower() if isinstance(value, bool) else str(value)


def _one(text: str) -> str:
    """A message on one line (wrapped library text can span several)."""
    return " ".join(part.strip() for part in text.splitlines() if part.strip())


@contextlib.contextmanager
def user_errors(debug: bool) -> Iterator[None]:
    """Print any error as one line on stderr and exit with :func:`failure_line`'s code;
    re-raise it with ``--debug``."""
    try:
        yield
    except (typer.Exit, typer.Abort, _usage.ClickException):
        raise  # the command line's own exits and usage errors pass through
    except KeyboardInterrupt:
        typer.echo("interrupted", err=True)
        raise typer.Exit(code=130) from None
    except Exception as exc:
        if debug:
            raise
        code, line = failure_line(exc)
        typer.echo(in_flags(line), err=True)
        raise typer.Exit(code=code) from None


def _show_warning(message: Warning | str, category: type[Warning], *_args: Any, **_kw: Any) -> None:
    """A warning as one line on stderr (Python's default adds a line of source)."""
    text = str(message).splitlines()[0] if str(message) else category.__name__
    typer.echo(f"warning: {text}", err=True)


def _load_params(ctx: typer.Context, _param: object, value: Path | None) -> Path | None:
    """Eager ``--params`` callback: the command's section of a YAML file becomes its defaults.

    Options given on the command line still win. Keys are the option names with ``_`` or ``-``;
    an unknown key, or a file that is not a mapping, is a one-line error naming the key.
    """
    if value is None:
        return value
    section = ctx.command.name or ctx.info_name or ""  # not `python -m stages.x`'s prog name
    known = {p.name: p.name for p in ctx.command.params if p.name}
    for p in ctx.command.params:  # a key may also be spelled as the option (filter for --filter)
        for opt in getattr(p, "opts", []):
            if opt.startswith("--") and p.name:
                known.setdefault(opt[2:].replace("-", "_"), p.name)
    defaults: dict[str, Any] = {}
    with user_errors(debug=False):  # --debug is not parsed yet: eager options come first
        for key, val in load_section(value, section).items():
            name = known.get(str(key).replace("-", "_"), "")
            if not name or name in ("params", "debug"):
                raise ConfigError(
                    f"unknown key `{section}.{key}` in `{value}`: `hsicache {section} --help` "
                    "lists the options it can set"
                )
            if isinstance(val, list):  # R,G,B lists and the like: the CLI's comma form
                val = ",".join(str(v) for v in val)
            if val is not None:
                defaults[name] = val
    ctx.default_map = {**(ctx.default_map or {}), **defaults}
    return value


PARAMS_OPTION = typer.Option(
    None,
    "--params",
    is_eager=True,
    callback=_load_params,
    help="YAML file whose section named after this command gives defaults for its options "
    "(e.g. params.yaml); options on the command line win.",
)


def parse_csv(value: str | None) -> list[str] | None:
    """``"up1.res1, mid"`` -> ``["up1.res1", "mid"]``; ``None`` stays ``None``."""
    if value is None:
        return None
    return [v.strip() for v in value.split(",") if v.strip()]


def parse_csv_ints(value: str | None, option: str) -> list[int] | None:
    """``"21,11,6"`` -> ``[21, 11, 6]``; a clear error names ``option`` otherwise."""
    if value is None:
        return None
    try:
        return [int(v) for v in value.split(",") if v.strip()]
    except ValueError:
        raise ConfigError(f"`{option}` takes comma-separated integers, got `{value}`") from None


@contextlib.contextmanager
def progress_bar(description: str) -> Iterator[Any]:
    """A rich progress bar with items/s on stderr, yielded as a ``progress(done, total)`` callback.

    On stderr so that stdout stays clean for ``--json`` output and pipes; it appears with the
    first update and is taken away when the work fails, so an error is the only line printed.
    """
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
    )

    class _Rate(TextColumn):
        def render(self, task: Any) -> Any:
            from rich.text import Text

            speed = task.finished_speed or task.speed
            return Text(f"{speed:.1f}/s" if speed else "-/s")

    bar = Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        _Rate(""),
        TimeRemainingColumn(),
        console=Console(stderr=True),
        transient=False,
    )
    task = bar.add_task(description, total=None)

    def update(done: int, total: int, note: str | None = None) -> None:
        if not bar.live.is_started:  # shown once work starts: input errors come first, alone
            bar.start()
        label = f"{description} {note}" if note else description
        bar.update(task, completed=done, total=total, description=label)

    try:
        yield update
    except BaseException:
        bar.live.transient = True  # an error stands alone: the bar goes
        raise
    finally:
        if bar.live.is_started:
            bar.stop()


def _one_line(main: Callable[..., Any], args: Any, prog_name: str | None, **extra: Any) -> NoReturn:
    """Run a click ``main`` so that every failure is one line on stderr: a usage error
    (unknown option, a value of the wrong type, a missing option) exits 2 like every other
    user error, and an exception that escaped a command exits as :func:`failure_line` says
    (with ``--debug`` it keeps its traceback). Warnings are one line each; those of libraries
    about their own future (Deprecation/FutureWarning) are not shown."""
    argv = list(args) if args is not None else sys.argv[1:]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", FutureWarning)
        warnings.simplefilter("default", HsicacheWarning)
        warnings.showwarning = _show_warning
        try:
            rv = main(args=args, prog_name=prog_name, standalone_mode=False, **extra)
        except _usage.NoArgsIsHelpError:
            main(args=args, prog_name=prog_name, standalone_mode=True, **extra)  # the help; exits
            raise
        except _usage.ClickException as exc:
            ctx = getattr(exc, "ctx", None)
            where = ctx.command_path if ctx is not None else prog_name or "hsicache"
            typer.echo(
                f"error: {exc.format_message()} (`{where} --help` lists the options)", err=True
            )
            sys.exit(exc.exit_code)
        except typer.Abort:
            typer.echo("aborted", err=True)
            sys.exit(1)
        except KeyboardInterrupt:
            typer.echo("interrupted", err=True)
            sys.exit(130)
        except Exception as exc:
            if "--debug" in argv:
                raise
            code, line = failure_line(exc)
            typer.echo(line, err=True)
            sys.exit(code)
    sys.exit(rv if isinstance(rv, int) else 0)


class OneLineErrorsGroup(TyperGroup):
    """The ``hsicache`` command group, with usage errors as one line (see :func:`_one_line`)."""

    def main(  # type: ignore[override]
        self,
        args: Any = None,
        prog_name: str | None = None,
        complete_var: str | None = None,
        standalone_mode: bool = True,
        **extra: Any,
    ) -> Any:
        run = functools.partial(super().main, complete_var=complete_var)
        if not standalone_mode:
            return run(args=args, prog_name=prog_name, standalone_mode=False, **extra)
        _one_line(run, args, prog_name, **extra)


def run_app(app: typer.Typer) -> None:
    """Entry point for ``python -m stages.<name>``."""
    name = sys.modules["__main__"].__spec__.name  # type: ignore[union-attr]
    _one_line(typer.main.get_command(app).main, None, f"python -m {name}")
