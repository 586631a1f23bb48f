"""The ``hsicache`` command: one subcommand per pipeline stage."""

from __future__ import annotations

import re

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
COMMANDS = {
    "prepare": prepare.prepare,
    "pretrain": pretrain.pretrain,
    "layers": layers.layers,
    "extract": extract.extract,
    "context": context.context,
    "train": train.train,
    "evaluate": evaluate.evaluate,
    "predict": predict.predict,
    "compare": compare.compare,
    "probe": probe.probe,
    "curve": curve.curve,
    "suggest": suggest.suggest,
}


def _summary(doc: str | None) -> str:
    """The first paragraph of a docstring on one line: the command list's entry (the
    docstring's own line breaks would show there as they are)."""
    first = (doc or "").strip().split("\n\n")[0]
    text = " ".join(line.strip() for line in first.splitlines())
    text = re.sub(r"^``[^`]*``:\s*", "", text)  # a module's "``hsicache cache ...``: " lead
    return text[:1].upper() + text[1:]


for _name, _fn in COMMANDS.items():
    app.command(_name, help=_fn.__doc__, short_help=_summary(_fn.__doc__))(_fn)
app.add_typer(cache.app, name="cache", help=cache.__doc__, short_help=_summary(cache.__doc__))
app.add_typer(bench.app, name="bench", help=bench.__doc__, short_help=_summary(bench.__doc__))


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
