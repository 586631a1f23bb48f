"""``hsicache predict``: the full-scene land-cover map, streamed block by block from the cache."""

from __future__ import annotations

from pathlib import Path

import typer

from stages._errors import run_app, user_errors
from stages._options import (
    CONTEXT_STORE_OPTION,
    DEBUG_OPTION,
    HEAD_FEATURES_OPTION,
    PARAMS_OPTION,
    SCENE_OPTION,
    SCHEDULER_OPTION,
    WORKERS_OPTION,
    cluster,
    progress_bar,
)

app = typer.Typer(add_completion=False, help=__doc__)


@app.command()
def predict(
    scene: str = SCENE_OPTION,
    features: str | None = HEAD_FEATURES_OPTION,
    head: Path = typer.Option(..., "--head", help="Head folder from `hsicache train`."),
    context_store: str | None = CONTEXT_STORE_OPTION,
    out: Path = typer.Option(..., "--out", help="Map to write (.npy of the scene's class ids)."),
    png: Path | None = typer.Option(None, "--png", help="Colour map PNG with a class legend."),
    geotiff: Path | None = typer.Option(
        None, "--geotiff", help="GeoTIFF with the scene's CRS/transform (georeferenced scenes)."
    ),
    confidence: Path | None = typer.Option(
        None, "--confidence", help="Per-pixel confidence (.npy, winning class probability)."
    ),
    workers: int | None = WORKERS_OPTION,
    scheduler: str | None = SCHEDULER_OPTION,
    params: Path | None = PARAMS_OPTION,
    debug: bool = DEBUG_OPTION,
) -> None:
    """Predict every pixel without loading all features into memory."""
    from pipeline.evaluation.scoring import predict_map

    with user_errors(debug), progress_bar("predict") as progress:
        summary = predict_map(scene=scene, cache=features, head=head, out=out, png=png,
                              geotiff=geotiff, confidence=confidence,
                              progress=progress, client=cluster(workers, scheduler),
                              context=context_store)  # fmt: skip
    h, w = summary["shape"]
    n = summary["blocks"]
    also = "".join(f", {p}" for p in (png, geotiff, confidence) if p is not None)
    typer.echo(f"wrote {out} ({h}x{w}, {n} block{'' if n == 1 else 's'}){also}")


if __name__ == "__main__":
    run_app(app)
