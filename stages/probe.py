"""``hsicache probe``: rank cached arrays and context families on the train pixels alone."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from stages._errors import run_app, user_errors
from stages._options import (
    DEBUG_OPTION,
    PARAMS_OPTION,
    SCENE_OPTION,
    SEEDS_OPTION,
    STORE_HELP,
    parse_csv_ints,
    progress_bar,
)

app = typer.Typer(add_completion=False, help=__doc__)


@app.command()
def probe(
    scene: str = SCENE_OPTION,
    features: str | None = typer.Option(
        None, "--features", help="Feature cache whose arrays to rank." + STORE_HELP
    ),
    context_store: str | None = typer.Option(
        None,
        "--context-store",
        "--context",
        help="Context store whose families to rank." + STORE_HELP,
    ),
    per_class: int | None = typer.Option(
        None, "--per-class", help="Train pixels per class (default: the scene's split)."
    ),
    seeds: str = SEEDS_OPTION,
    folds: int = typer.Option(5, "--folds", help="Cross-validation folds on the train pixels."),
    pairs_of: int = typer.Option(
        4, "--pairs-of", help="Also score every pair of this many best single candidates."
    ),
    out: Path | None = typer.Option(None, "--out", help="JSON file of the ranking to write."),
    as_json: bool = typer.Option(False, "--json", help="Print the ranking as JSON only."),
    params: Path | None = PARAMS_OPTION,
    debug: bool = DEBUG_OPTION,
) -> None:
    """Rank every cached (timestep, site) array and context family, alone and in the best
    pairs, by a linear probe cross-validated on the train pixels alone; print the selection
    to give `train`.

    The test pixels' accuracy is shown in its own column and never ranks anything.
    """
    from pipeline.evaluation.probing import run_probe

    with user_errors(debug), progress_bar("probe") as progress:
        result = run_probe(
            scene=scene,
            cache=features,
            context=context_store,
            out=out,
            seeds=parse_csv_ints(seeds, "--seeds") or [],
            per_class=per_class,
            folds=folds,
            pairs_of=pairs_of,
            progress=progress,
        )
    if as_json:
        typer.echo(json.dumps(result))
        return
    typer.echo(f"{'selection':<40} {'CV on train (ranks)':>20} {'test OA (never ranks)':>22}")
    for r in result["rows"]:
        cv = f"{100 * r['cv_mean']:.1f} ± {100 * r['cv_std']:.1f}"
        te = f"{100 * r['test_oa_mean']:.1f} ± {100 * r['test_oa_std']:.1f}"
        typer.echo(f"{r['selection']:<40} {cv:>20} {te:>22}")
    rec = result["recommended"]
    if rec:
        typer.echo(f"recommended: {rec['flags']}   (hsicache train ... {rec['flags']})")
        typer.echo("as keys of a `heads:` entry (compare, curve, train --params):")
        typer.echo("\n".join(f"    {line}" for line in rec["entry"].splitlines()))


if __name__ == "__main__":
    run_app(app)
