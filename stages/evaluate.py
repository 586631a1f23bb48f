"""``hsicache evaluate``: a head's accuracy on the test pixels (or over several seeds)."""

from __future__ import annotations

from pathlib import Path

import typer

from pipeline.errors import ConfigError
from stages._errors import run_app, user_errors
from stages._options import (
    CONTEXT_STORE_OPTION,
    DEBUG_OPTION,
    HEAD_FEATURES_OPTION,
    PARAMS_OPTION,
    SCENE_OPTION,
    parse_csv_ints,
    progress_bar,
)

app = typer.Typer(add_completion=False, help=__doc__)


@app.command()
def evaluate(
    scene: str = SCENE_OPTION,
    features: str | None = HEAD_FEATURES_OPTION,
    head: Path = typer.Option(..., "--head", help="Head folder from `hsicache train`."),
    context_store: str | None = CONTEXT_STORE_OPTION,
    metrics: Path = typer.Option(..., "--metrics", help="metrics.json to write (DVC metrics)."),
    plot: Path | None = typer.Option(
        None,
        "--plot",
        help="CSV of actual,predicted per test pixel (DVC confusion plot); not with --seeds.",
    ),
    png: Path | None = typer.Option(None, "--png", help="Confusion-matrix PNG; not with --seeds."),
    seeds: str | None = typer.Option(
        None,
        "--seeds",
        help="Comma-separated seeds: refit the head's recipe on the split re-drawn with each "
        "seed and report mean ± std (the cache is reused).",
    ),
    params: Path | None = PARAMS_OPTION,
    debug: bool = DEBUG_OPTION,
) -> None:
    """OA, AA, kappa, per-class precision/recall/F1/IoU, mIoU and the confusion matrix."""
    from pipeline.evaluation.scoring import (
        check_evaluation_outputs,
        evaluate_seeds,
        write_evaluation,
    )
    from pipeline.evaluation.scoring import evaluate as run_evaluate

    with user_errors(debug):
        seed_list = parse_csv_ints(seeds, "--seeds")
        if seed_list == []:
            raise ConfigError("`--seeds` is empty: give comma-separated seeds, or leave it out")
        check_evaluation_outputs(metrics=metrics, plot=plot, png=png, seeds=seed_list,
                                 inputs={"--scene": scene, "--features": features,
                                         "--head": head,
                                         "--context-store": context_store})  # fmt: skip
        if seed_list:
            with progress_bar("seeds") as progress:
                summary = evaluate_seeds(scene=scene, cache=features, head=head,
                                         seeds=seed_list, progress=progress,
                                         context=context_store)  # fmt: skip
            write_evaluation(summary, metrics)
            typer.echo(f"{summary['head']} over {len(seed_list)} seeds, in %: "
                       + ", ".join(f"{name} {100 * summary[k]['mean']:.1f} ± "
                                   f"{100 * summary[k]['std']:.1f}"
                                   for k, name in (("oa", "OA"), ("aa", "AA"),
                                                   ("kappa", "kappa"))))  # fmt: skip
            return
        result, actual, predicted = run_evaluate(scene=scene, cache=features, head=head,
                                                 context=context_store)  # fmt: skip
        write_evaluation(result, metrics, actual=actual, predicted=predicted, plot=plot,
                         png=png)  # fmt: skip
    typer.echo(f"{result['head']}, in %: OA {100 * result['oa']:.1f}, AA {100 * result['aa']:.1f}, "
               f"kappa {100 * result['kappa']:.1f}, mIoU {100 * result['miou']:.1f} "
               f"on {result['n_test']} test pixels -> {metrics}")  # fmt: skip


if __name__ == "__main__":
    run_app(app)
