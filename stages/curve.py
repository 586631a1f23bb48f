"""``hsicache curve``: OA, AA and kappa against labels per class, head by head."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from stages._errors import run_app, user_errors
from stages._options import (
    CONTEXT_OPTION,
    DEBUG_OPTION,
    FEATURES_OPTION,
    HEADS_OPTION,
    RECIPES_PARAMS_OPTION,
    SCENE_OPTION,
    SEEDS_OPTION,
    parse_csv,
    parse_csv_ints,
    progress_bar,
)

app = typer.Typer(add_completion=False, help=__doc__)


@app.command()
def curve(
    scene: str = SCENE_OPTION,
    features: str | None = FEATURES_OPTION,
    context_store: str | None = CONTEXT_OPTION,
    heads: str | None = HEADS_OPTION,
    per_class: str = typer.Option(
        "1,2,3,5,10,20", "--per-class", help="Comma-separated counts of labels per class."
    ),
    seeds: str = SEEDS_OPTION,
    out: Path | None = typer.Option(None, "--out", help="JSON file of the rows (a DVC metric)."),
    csv_path: Path | None = typer.Option(
        None, "--csv", help="CSV of OA: per_class, then a column per head (a DVC plot)."
    ),
    png: Path | None = typer.Option(None, "--png", help="Chart with a ±std band per head."),
    as_json: bool = typer.Option(
        False, "--json", help="Print a JSON list of rows (head, per_class, oa_mean, ...) only."
    ),
    params: Path | None = RECIPES_PARAMS_OPTION,
    debug: bool = DEBUG_OPTION,
) -> None:
    """Accuracy against labels per class: each head's recipe refitted on the split re-drawn
    with every count and seed, reusing the caches."""
    from pipeline.evaluation.curve import CURVE_KEYS, run_curve

    recipes_file = params or (Path("params.yaml") if Path("params.yaml").is_file() else None)
    with user_errors(debug), progress_bar("curve") as progress:
        result = run_curve(
            scene=scene,
            cache=features,
            context=context_store,
            heads=parse_csv(heads) or [],
            recipes=recipes_file,
            counts=parse_csv_ints(per_class, "--per-class") or [],
            seeds=parse_csv_ints(seeds, "--seeds") or [],
            out=out,
            csv_path=csv_path,
            png=png,
            progress=progress,
        )
    if as_json:
        typer.echo(json.dumps([{k: r[k] for k in CURVE_KEYS} for r in result["rows"]]))
        return
    typer.echo(f"{'head':<20} {'labels/class':>12} {'OA':>14} {'AA':>8} {'kappa':>8}")
    for r in result["rows"]:
        oa = f"{100 * r['oa_mean']:.1f} ± {100 * r['oa_std']:.1f}"
        typer.echo(
            f"{r['head']:<20} {r['per_class']:>12} {oa:>14} "
            f"{100 * r['aa_mean']:>8.1f} {100 * r['kappa_mean']:>8.1f}"
        )


if __name__ == "__main__":
    run_app(app)
