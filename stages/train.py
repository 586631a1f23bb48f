"""``hsicache train``: fit one head on the train pixels of a scene and its feature cache."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import typer

from stages._errors import run_app, user_errors
from stages._options import (
    CONTEXT_STORE_OPTION,
    DEBUG_OPTION,
    PARAMS_OPTION,
    SCENE_OPTION,
    parse_csv,
    parse_csv_ints,
    progress_bar,
)

app = typer.Typer(add_completion=False, help=__doc__)


def _head_help() -> str:
    from pipeline.heads.registry import head_help

    return head_help()


HEAD_HELP = _head_help()


def head_params_for(head: str, given: str | None, params_file: Path | None) -> dict[str, Any]:
    """``--head-params`` JSON, else the ``heads.<head>`` section of the params file, else {}."""
    from pipeline.errors import ConfigError

    if given:
        try:
            value = json.loads(given)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"`--head-params` is not valid JSON: {exc.msg}") from None
        if not isinstance(value, dict):
            raise ConfigError("`--head-params` must be a JSON object of keyword arguments")
        return value
    if params_file is not None:
        from pipeline.io.params import head_settings

        return head_settings(params_file, head)
    return {}


@app.command()
def train(
    scene: str = SCENE_OPTION,
    features: str | None = typer.Option(
        None, "--features", help="Feature cache from `hsicache extract` (not needed: spectral)."
    ),
    head: str = typer.Option(..., "--head", help=HEAD_HELP),
    head_params: str | None = typer.Option(
        None,
        "--head-params",
        help="JSON keyword arguments of the head (default: `heads.<head>` in --params); "
        '"kind" names the head type when --head is a custom name; "context" lists context '
        'families, "timesteps" and "sites" the cached arrays; classic heads also take "use": '
        'spectral|spatial|both and "pca": N.',
    ),
    timesteps: str | None = typer.Option(
        None,
        "--timesteps",
        help="Cached timesteps to use (default: the head's `timesteps` entry, else all).",
    ),
    sites: str | None = typer.Option(
        None, "--sites", help="Cached sites to use (default: the head's `sites` entry, else all)."
    ),
    context_store: str | None = CONTEXT_STORE_OPTION,
    context: str | None = typer.Option(
        None,
        "--context",
        help="Comma-separated context families to read, e.g. mean7,mean15,emp (default: the "
        "head's `context` entry, else none).",
    ),
    seed: int = typer.Option(
        0, "--seed", help="Seed of the head's training (default 0).", show_default=False
    ),
    out: Path = typer.Option(..., "--out", help="Head folder to write."),
    params: Path | None = PARAMS_OPTION,
    debug: bool = DEBUG_OPTION,
) -> None:
    """Fit a head on the train pixels (the backbone never runs) and save it."""
    from pipeline.heads.training import train_head

    with user_errors(debug), progress_bar("train") as progress:
        trained = train_head(
            scene=scene,
            cache=features,
            head=head,
            out=out,
            params=head_params_for(head, head_params, params),
            timesteps=parse_csv_ints(timesteps, "--timesteps"),
            sites=parse_csv(sites),
            seed=seed,
            context_store=context_store,
            context=parse_csv(context) if context else None,
            progress=progress,
        )
    meta = trained.meta
    typer.echo(f"wrote {out}: {meta['name']} on {meta['n_train']} pixels x "
               f"{meta['n_features']} features in {trained.train_seconds:.1f} s")  # fmt: skip


if __name__ == "__main__":
    run_app(app)
