"""The ``hsicache`` command: one subcommand per pipeline stage."""

from __future__ import annotations

import typer

from stages import (
    bench,
    cache,
    compare,
    context,
    curve,
    evaluate,
    extract,
    layers,
    predict,
    prepare,
    pretrain,
    probe,
    suggest,
    train,
)
from stages._errors import OneLineErrorsGroup

app = typer.Typer(
    cls=OneLineErrorsGroup,
    add_completion=False,
    no_args_is_help=True,
    help="Precomputed diffusion-feature cache and cheap heads for hyperspectral classification.",
)
app.command("prepare", help=prepare.prepare.__doc__)(prepare.prepare)
app.command("pretrain", help=pretrain.pretrain.__doc__)(pretrain.pretrain)
app.command("layers", help=layers.layers.__doc__)(layers.layers)
app.command("extract", help=extract.extract.__doc__)(extract.extract)
app.command("context", help=context.context.__doc__)(context.context)
app.command("train", help=train.train.__doc__)(train.train)
app.command("evaluate", help=evaluate.evaluate.__doc__)(evaluate.evaluate)
app.command("predict", help=predict.predict.__doc__)(predict.predict)
app.command("compare", help=compare.compare.__doc__)(compare.compare)
app.command("probe", help=probe.probe.__doc__)(probe.probe)
app.command("curve", help=curve.curve.__doc__)(curve.curve)
app.command("suggest", help=suggest.suggest.__doc__)(suggest.suggest)
app.add_typer(cache.app, name="cache", help=cache.__doc__)
app.add_typer(bench.app, name="bench", help=bench.__doc__)


def _version(value: bool) -> None:
    if value:
        from pipeline import __version__

        typer.echo(f"hsicache {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(
        False, "--version", callback=_version, is_eager=True, help="Print the version and exit."
    ),
) -> None:
    """hsicache: run a frozen diffusion backbone once, cache its features, train heads cheaply.

    Stages, in pipeline order: prepare -> pretrain -> extract (and context) -> train ->
    evaluate -> predict; compare puts heads side by side over split seeds.
    Every user error prints one line on stderr and exits with code 2 (add --debug to a stage
    for the traceback).
    """


def main() -> None:
    """Console-script entry point."""
    app(prog_name="hsicache")


if __name__ == "__main__":
    main()
