"""``hsicache compare``: heads side by side over split seeds, and what diffusion features add."""

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
def compare(
    scene: str = SCENE_OPTION,
    features: str | None = FEATURES_OPTION,
    context_store: str | None = CONTEXT_OPTION,
    heads: str | None = HEADS_OPTION,
    seeds: str = SEEDS_OPTION,
    reference: str | None = typer.Option(
        None,
        "--reference",
        help="One of --heads to set every other head against, seed by seed on the same "
        "splits (mean ± std of the differences, seeds above). With --params params.yaml its "
        "compare section gives ctx_logreg; --reference '' then gives none.",
    ),
    out: Path | None = typer.Option(
        None, "--out", help="JSON file of the table and its protocol card (a DVC metric)."
    ),
    markdown: Path | None = typer.Option(None, "--markdown", help="Markdown table to write."),
    png: Path | None = typer.Option(None, "--png", help="Bar chart (OA ± std) to write."),
    as_json: bool = typer.Option(
        False, "--json", help="Print a JSON list of rows (head, oa_mean, oa_std, ...) only."
    ),
    params: Path | None = RECIPES_PARAMS_OPTION,
    debug: bool = DEBUG_OPTION,
) -> None:
    """Heads side by side: OA, AA, kappa (mean ± std) over re-drawn splits, with and without
    the diffusion features.

    Each head's recipe is refitted on the split re-drawn for every seed, reusing the caches.
    """
    from pipeline.evaluation.compare import run_comparison

    recipes_file = params or (Path("params.yaml") if Path("params.yaml").is_file() else None)
    with user_errors(debug), progress_bar("compare") as progress:
        result = run_comparison(
            scene=scene,
            cache=features,
            context=context_store,
            heads=parse_csv(heads) or [],
            recipes=recipes_file,
            seeds=parse_csv_ints(seeds, "--seeds") or [],
            reference=reference,
            out=out,
            markdown=markdown,
            png=png,
            progress=progress,
            warn=lambda line: typer.echo(f"warning: {line}", err=True),
        )
    if as_json:
        typer.echo(json.dumps(result["rows"]))
        return
    from pipeline.evaluation.compare import markdown_table

    typer.echo(markdown_table(result).split("\n", 2)[2].rstrip())


if __name__ == "__main__":
    run_app(app)
