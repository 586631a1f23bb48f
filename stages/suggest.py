"""``hsicache suggest``: the next pixels to label, or a simulation of the labelling loop."""

from __future__ import annotations

from pathlib import Path

import typer

from stages._errors import run_app, user_errors
from stages._options import (
    CONTEXT_OPTION,
    DEBUG_OPTION,
    FEATURES_OPTION,
    RECIPES_PARAMS_OPTION,
    SCENE_OPTION,
    parse_csv_ints,
    progress_bar,
)

app = typer.Typer(add_completion=False, help=__doc__)


@app.command()
def suggest(
    ctx: typer.Context,
    scene: str = SCENE_OPTION,
    features: str | None = FEATURES_OPTION,
    context_store: str | None = CONTEXT_OPTION,
    head: str = typer.Option(
        ..., "--head", help="A name under `heads:` of the params file (its recipe) or a kind."
    ),
    n: int = typer.Option(
        50, "--n", help="How many pixels to suggest (per round with --simulate)."
    ),
    out: Path = typer.Option(
        ...,
        "--out",
        help="CSV row,col,x,y,predicted_class,score to write; with --simulate, the JSON of "
        "both curves.",
    ),
    png: Path | None = typer.Option(
        None,
        "--png",
        help="PNG: the suggestions on the rendering and the label map (with "
        "--simulate: both curves).",
    ),
    geojson: Path | None = typer.Option(
        None,
        "--geojson",
        help="GeoJSON points of the suggestions, in WGS84 longitude/latitude (a scene with a "
        "CRS only).",
    ),
    seed: int = typer.Option(0, "--seed", help="Seed of the head and the candidate sample."),
    pool: int = typer.Option(
        50_000, "--pool", help="Candidates scored: a seeded sample of the unlabelled pixels."
    ),
    simulate: int | None = typer.Option(
        None,
        "--simulate",
        help="ROUNDS: run the loop against the ground truth (each round adds --n suggested "
        "pixels with their true labels, or --n random ones) and write both curves.",
    ),
    seeds: str = typer.Option("0,1,2,3,4", "--seeds", help="Split seeds of --simulate."),
    per_class: int | None = typer.Option(
        None,
        "--per-class",
        help="Labels per class --simulate starts from (default: the scene's split).",
    ),
    params: Path | None = RECIPES_PARAMS_OPTION,
    debug: bool = DEBUG_OPTION,
) -> None:
    """The next pixels to label: uncertain (small margin between the two likeliest classes),
    diverse (k-centre greedy in feature space) and spread over the predicted classes; never a
    train pixel. With --simulate, the loop against the ground truth beside random picks."""
    from pipeline.evaluation.suggest import run_simulation, run_suggest

    recipes = params or (Path("params.yaml") if Path("params.yaml").is_file() else None)
    stores = {"scene": scene, "cache": features, "context": context_store}
    if simulate is not None:
        with user_errors(debug), progress_bar("simulate") as progress:
            result = run_simulation(
                **stores,
                head=head,
                recipes=recipes,
                n=n,
                rounds=simulate,
                seeds=parse_csv_ints(seeds, "--seeds") or [],
                per_class=per_class,
                out=out,
                png=png,
                progress=progress,
            )
        for strategy in ("suggested", "random"):
            oa = " ".join(f"{100 * v:.1f}" for v in result[strategy]["oa_mean"])
            typer.echo(f"{strategy:<10} OA by round: {oa}")
        also = f", {png}" if png is not None else ""
        typer.echo(f"gain at the end: {100 * result['gain_at_end']:+.1f} points OA -> {out}{also}")
        return
    with user_errors(debug):
        _only_with_simulate(ctx, per_class)
        result = run_suggest(
            **stores,
            head=head,
            recipes=recipes,
            n=n,
            out=out,
            png=png,
            geojson=geojson,
            seed=seed,
            pool=pool,
        )
    also = "".join(f", {p}" for p in (png, geojson) if p is not None)
    typer.echo(f"wrote {out}{also}: {len(result['suggestions'])} pixels to label next")


def _only_with_simulate(ctx: typer.Context, per_class: int | None) -> None:
    """``--seeds`` and ``--per-class`` set the simulation: refused without ``--simulate``
    rather than ignored."""
    from pipeline.errors import ConfigError

    source = ctx.get_parameter_source("seeds")  # typer's own click: compare by name
    seeds_given = source is not None and source.name == "COMMANDLINE"
    for flag, given in (("--seeds", seeds_given), ("--per-class", per_class is not None)):
        if given:
            raise ConfigError(
                f"`{flag}` sets the loop of `--simulate ROUNDS`: give both or neither"
            )


if __name__ == "__main__":
    run_app(app)
