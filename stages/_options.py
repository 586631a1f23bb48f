"""What every command shares about its options: the common ones, options for a stage
configuration's fields (``config_option``), ``--params``, value parsing and the progress bar."""

from __future__ import annotations

import contextlib
import dataclasses
import typing
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import typer

from pipeline.errors import ConfigError
from pipeline.io.params import load_section
from pipeline.utils.config import StageConfig
from stages._errors import user_errors

BACKBONE_HELP = (
    "builtin:natural-s | builtin:tiny | builtin:adm64 | diffusers folder | hub id | "
    "guided-diffusion .pt checkpoint."
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


#: The feature cache of the commands that fit heads again (compare, curve, suggest).
FEATURES_OPTION = typer.Option(
    None,
    "--features",
    help="Feature cache from `hsicache extract`, for heads that read diffusion features."
    + STORE_HELP,
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
        for key, val in load_section(value, section, known).items():
            name = known.get(str(key).replace("-", "_"), "")
            if not name or name in ("params", "debug"):
                raise ConfigError(
                    f"unknown key `{section}.{key}` in `{value}`: `hsicache {section} --help` "
                    "lists the options it can set"
                )
            if isinstance(val, list):  # R,G,B lists and the like: the CLI's comma form
                val = ",".join(str(v) for v in val)
            if val is not None:
                _check_value(ctx, name, val, f"`{section}.{key}` in `{value}`")
                defaults[name] = val
    ctx.default_map = {**(ctx.default_map or {}), **defaults}
    return value


def _check_value(ctx: typer.Context, name: str, value: Any, where: str) -> None:
    """A params file's number for option ``name``, refused as the command line would refuse
    it but naming the file and key (``per_class: true`` is no count, though Python says 1)."""
    param = next(p for p in ctx.command.params if p.name == name)
    annotation = getattr(getattr(param, "type_descriptor", None), "annotation", None)
    given = [a for a in typing.get_args(annotation) if a is not type(None)]
    annotation = given[0] if len(given) == 1 else annotation  # int | None: int
    if annotation not in (int, float):
        return
    what = "a whole number" if annotation is int else "a number"
    try:
        if isinstance(value, bool):
            raise ValueError(value)
        annotation(str(value))
    except ValueError:
        raise ConfigError(f"{where} must be {what}, got `{value}`") from None


PARAMS_OPTION = typer.Option(
    None,
    "--params",
    is_eager=True,
    callback=_load_params,
    help="YAML file whose section named after this command gives defaults for its options "
    "(e.g. params.yaml); options on the command line win.",
)
#: ``--params`` of the commands that look heads up by name (compare, curve, suggest).
RECIPES_PARAMS_OPTION = typer.Option(
    None,
    "--params",
    is_eager=True,
    callback=_load_params,
    help="YAML file whose `heads:` gives the recipes of the heads named (without --params: "
    "./params.yaml's, when there is one), and whose section named after this command gives "
    "defaults for its options (options on the command line win).",
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
    if not value.strip():
        return []  # a params file's empty list
    try:
        return [int(v) for v in value.split(",")]  # "0,,1": an empty part is a slip
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
        if not bar.console.is_terminal:
            bar.console.quiet = True  # a file or pipe: nothing to take back, so nothing more
        raise
    finally:
        if bar.live.is_started:
            bar.stop()
