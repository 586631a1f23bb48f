"""``hsicache extract``: run the frozen backbone once over every patch into a feature cache."""

from __future__ import annotations

import functools
from pathlib import Path

import typer

from pipeline.features.config import ExtractConfig
from stages._errors import run_app, user_errors
from stages._options import (
    BACKBONE_HELP,
    DEBUG_OPTION,
    DTYPE_HELP,
    PARAMS_OPTION,
    SCENE_OPTION,
    SCHEDULER_OPTION,
    STORE_HELP,
    WORKERS_OPTION,
    cluster,
    config_option,
    parse_csv,
    parse_csv_ints,
    progress_bar,
)

app = typer.Typer(add_completion=False, help=__doc__)


#: An option for a field of :class:`ExtractConfig` (see :func:`config_option`).
option = functools.partial(config_option, ExtractConfig)


@app.command()
def extract(
    scene: str = SCENE_OPTION,
    backbone: str = typer.Option(..., "--backbone", help=BACKBONE_HELP),
    timesteps: str = option("timesteps", help="Comma-separated timesteps, e.g. 0,25."),
    sites: str = typer.Option(
        ..., "--sites", help="Comma-separated site names (`hsicache layers` lists them)."
    ),
    out: str = typer.Option(
        ..., "--out", help="Feature cache to write (FEATURES.zarr)." + STORE_HELP
    ),
    patch: int | None = option("patch", help="Patch side (default: the backbone's sample size)."),
    stride: int | None = option("stride", help="Patch step = side of the square it owns."),
    batch_size: int | None = option("batch_size", help="Patches per forward pass."),
    device: str | None = option("device", help="auto (cuda > mps > cpu) or a device."),
    dtype: str | None = option("dtype", help=DTYPE_HELP),
    noise_seed: int | None = option("noise_seed", help="Seed of the shared noise."),
    class_seed: int | None = option(
        "class_seed", help="Seed of per-patch class ids (class-conditional backbones)."
    ),
    class_label: int | None = option(
        "class_label",
        help="Give every patch this class id instead of a seeded random one per patch.",
    ),
    zoom: int | None = option(
        "zoom",
        help="Upsample the rendering this many times (1, 2, 4, 8; bilinear) before the backbone "
        "and average-pool the features back onto the pixels. --stride is in upsampled pixels; "
        "the work grows as zoom squared.",
    ),
    noise_samples: int | None = option(
        "noise_samples", help="Average the features over this many seeded noise draws."
    ),
    chunk_tiles: int | None = option(
        "chunk_tiles",
        help="Owned squares per cache chunk side (default: the fewest giving chunks of >= 1 MB)."
        " A chunk is the unit of work, of resume and of a dask task.",
    ),
    workers: int | None = WORKERS_OPTION,
    scheduler: str | None = SCHEDULER_OPTION,
    resources: str | None = typer.Option(
        None, "--resources", help="dask resources per chunk task, e.g. GPU=1 (one per GPU)."
    ),
    threads: int | None = option(
        "threads",
        help="torch threads per forward pass (default: torch's; workers use the same number, "
        "so their cache is bit-identical to a single process's).",
    ),
    params: Path | None = PARAMS_OPTION,
    debug: bool = DEBUG_OPTION,
) -> None:
    """Extract per-pixel multi-layer, multi-timestep features; resumes an unfinished cache.

    One writer per cache: a second `extract` into a cache being written is refused.
    """
    from pipeline.features.extract import extract_features
    from pipeline.io.cluster import parse_resources

    given = dict(locals())
    with user_errors(debug, resumable=True), progress_bar("extract") as progress:
        given.update(timesteps=parse_csv_ints(timesteps, "timesteps"), sites=parse_csv(sites))
        config = ExtractConfig.from_given(given)
        extract_features(
            scene,
            backbone,
            out,
            config,
            progress=progress,
            client=cluster(workers, scheduler),
            resources=parse_resources(resources),
        )
    typer.echo(f"wrote {out}")


if __name__ == "__main__":
    run_app(app)
