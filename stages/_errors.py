"""What every command shares about failing: a user's mistake as one line on stderr and exit
code 2, a bug as one line and exit code 3, library messages in the command line's words
(``in_flags``), and the entry points that apply this to every command."""

from __future__ import annotations

import contextlib
import functools
import logging
import re
import signal
import sys
import traceback
import warnings
from collections.abc import Callable, Iterator
from pathlib import PurePath
from typing import Any, NoReturn

import typer
from typer.core import TyperGroup

try:  # typer vendors click from 0.2x on; its usage errors are typer._click's
    from typer._click import exceptions as _usage
    from typer._click.globals import get_current_context
except ImportError:  # pragma: no cover - older typer on click
    from click import exceptions as _usage  # type: ignore[no-redef]
    from click import get_current_context  # type: ignore[no-redef]

from pipeline.errors import HsicacheError, HsicacheWarning

EXIT_USER = 2  # a mistake the user can fix: bad input, a path that cannot be written


EXIT_INTERNAL = 3  # a bug in hsicache


def failure_line(exc: BaseException, *, debug: bool = False) -> tuple[int, str]:
    """``(exit code, one line)`` for an exception that ends a command.

    hsicache's own errors and the operating system's (disk full, read-only, not a folder,
    permission denied...), and a remote store's refusal (no credentials, no such bucket), are
    the user's to fix: exit 2. Anything else is a bug: exit 3 and a line that says so (with
    ``debug``, after the traceback).
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
    if type(exc).__module__.split(".")[0] in _REMOTE_LIBRARIES:
        return EXIT_USER, f"error: the remote store refused: {_one(str(exc))[:300]}"
    again = (
        "report it with the traceback above"
        if debug
        else ("re-run with --debug for the traceback and report it")
    )
    return EXIT_INTERNAL, (
        f"internal error ({type(exc).__name__}{': ' + text[:200] if text else ''}): a bug in "
        f"hsicache, not in your input; {again}"
    )


#: Libraries behind ``s3://``, ``gs://`` and ``az://`` stores: their errors are about
#: credentials, buckets and networks, the user's to fix.
_REMOTE_LIBRARIES = frozenset({"botocore", "aiobotocore", "s3fs", "gcsfs", "adlfs", "google"})


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


#: Options whose value (or each comma-separated part of it) is a name or location of the
#: user's own (a store path or URL, a head, a backbone, context families, sites): never read as
#: a parameter's name in a message.
NAMED_BY_USER = frozenset({"scene", "features", "cache", "context_store", "head", "backbone",
                           "out", "store", "images", "context", "sites", "heads",
                           "class_names"})  # fmt: skip

_NAMED = re.compile(r"`([A-Za-z_][A-Za-z0-9_]*)(?:=([^`]*))?`")


def in_flags(message: str, ctx: Any = None) -> str:
    """A library message in the command line's words: a backticked parameter ``stride``
    becomes ``--stride``, ``split=fraction`` becomes ``--split fraction`` (and
    ``allow_degenerate=True`` ``--allow-degenerate``), for the parameters of the command that
    is running; anything else is left as it is, and so is a word that is a path or a variable
    name given (``--key seed`` names a variable, not ``--seed``). The one place where hsicache's
    library and command-line vocabularies meet."""
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

    given = _named_by_user(ctx)

    def flag(m: re.Match[str]) -> str:
        name, value = m.group(1), m.group(2)
        if name not in flags or (value is None and name in given):
            return m.group(0)
        if value is None or value == "True":
            return f"`{flags[name]}`"
        return f"`{flags[name]} {value.strip(chr(39) + chr(34))}`"

    return _NAMED.sub(flag, message)


def _named_by_user(ctx: Any) -> set[str]:
    """The free text given to the running command: paths, stores, names and container
    variables (each part of a comma-separated list too)."""
    given = set()
    for k, v in (ctx.params or {}).items():
        if isinstance(v, PurePath):
            given.add(str(v))
        elif isinstance(v, str) and (k in NAMED_BY_USER or k.endswith("key")):
            given |= {v, *(part.strip() for part in v.split(","))}
    return given


def _one(text: str) -> str:
    """A message on one line (wrapped library text can span several)."""
    return " ".join(part.strip() for part in text.splitlines() if part.strip())


@contextlib.contextmanager
def user_errors(debug: bool, *, resumable: bool = False) -> Iterator[None]:
    """Print any error as one line on stderr and exit with :func:`failure_line`'s code;
    with ``--debug``, after its traceback. Ctrl-C exits 130, saying so; a ``resumable`` command
    (``extract``, ``pretrain``) also says that running it again resumes."""
    try:
        yield
    except (typer.Exit, typer.Abort, _usage.ClickException):
        raise  # the command line's own exits and usage errors pass through
    except KeyboardInterrupt:
        again = ": run the same command again to resume" if resumable else ""
        typer.echo(f"interrupted{again}", err=True)
        raise typer.Exit(code=130) from None
    except Exception as exc:
        if debug:
            traceback.print_exc()
        code, line = failure_line(exc, debug=debug)
        typer.echo(in_flags(line), err=True)
        raise typer.Exit(code=code) from None


def _show_warning(message: Warning | str, category: type[Warning], *_args: Any, **_kw: Any) -> None:
    """A warning as one line on stderr (Python's default adds a line of source), in the
    command line's words (:func:`in_flags`)."""
    text = in_flags(str(message).splitlines()[0]) if str(message) else category.__name__
    typer.echo(f"warning: {text}", err=True)


def _terminate(_signum: int, _frame: Any) -> NoReturn:
    """SIGTERM (a job scheduler's or ``timeout``'s stop) unwinds the command like Ctrl-C, so
    its temporary outputs are removed; the default action would kill it where it stood."""
    raise KeyboardInterrupt


def _one_line(main: Callable[..., Any], args: Any, prog_name: str | None, **extra: Any) -> NoReturn:
    """Run a click ``main`` so that every failure is one line on stderr: a usage error
    (unknown option, a value of the wrong type, a missing option) exits 2 like every other
    user error, and an exception that escaped a command exits as :func:`failure_line` says
    (with ``--debug`` it keeps its traceback). Warnings are one line each; those of libraries
    about their own future (Deprecation/FutureWarning) are not shown."""
    argv = list(args) if args is not None else sys.argv[1:]
    # zarr's writes still pending when one failed (a full disk) are logged by asyncio as
    # "Task was destroyed but it is pending!" at exit: the one line already said what failed
    logging.getLogger("asyncio").setLevel(logging.CRITICAL)
    signal.signal(signal.SIGTERM, _terminate)  # cleans up as Ctrl-C does: no temporary files
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
            debug = "--debug" in argv
            if debug:
                traceback.print_exc()
            code, line = failure_line(exc, debug=debug)
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
