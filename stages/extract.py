"""``hsicache extract``: run the frozen backbone once over every patch into a feature cache."""

from __future__ import annotations

from pathlib import Path

import typer

from stages._common import (
    BACKBONE_HELP,
    DEBUG_OPTION,
    DTYPE_HELP,
    PARAMS_OPTION,
    SCENE_OPTION,
    SCHEDULER_OPTION,
    STORE_HELP,
    WORKERS_OPTION,
    cluster,
    parse_csv,
    parse_csv_ints,
    progress_bar,
    run_app,
    user_errors,
)

app = typer.Typer(add_completion=False, help=__doc__)


@app.command()
def extract(
    scene: str = SCENE_OPTION,
    backbone: str = typer.Option(..., "--backbone", help=BACKBONE_HELP),
    timesteps: str = typer.Option("0", "--timesteps", help="Comma-separated timesteps, e.g. 0,25."),
    sites: str = typer.Option(
        ..., "--sites", help="Comma-separated site names (`hsicache layers` lists them)."
    ),
    out: str = typer.Option(
        ..., "--out", help="Feature cache to write (FEATURES.zarr)." + STORE_HELP
    ),
    patch: int | None = typer.Option(
        None, "--patch", help="Patch side (default: the backbone's sample size)."
    ),
    stride: int = typer.Option(32, "--stride", help="Patch step = side of the square it owns."),
    batch_size: int = typer.Option(16, "--batch-size", help="Patches per forward pass."),
    device: str = typer.Option("auto", "--device", help="auto (cuda > mps > cpu) or a device."),
    dtype: str = typer.Option("auto", "--dtype", help=DTYPE_HELP),
    noise_seed: int = typer.Option(0, "--noise-seed", help="Seed of the shared noise."),
    class_seed: int = typer.Option(
        0, "--class-seed", help="Seed of per-patch class ids (class-conditional backbones)."
    ),
    class_label: int | None = typer.Option(
        None,
        "--class-label",
        help="Give every patch this class id instead of a seeded random one per patch.",
    ),
    zoom: int = typer.Option(
        1,
        "--zoom",
        help="Upsample the rendering this many times (1, 2, 4, 8; bilinear) before the backbone "
        "and average-pool the features back onto the pixels. --stride is in upsampled pixels; "
        "the work grows as zoom squared.",
    ),
    noise_samples: int = typer.Option(
        1, "--noise-samples", help="Average the features over this many seeded noise draws."
    ),
    chunk_tiles: int | None = typer.Option(
        None,
        "--chunk-tiles",
        help="Owned squares per cache chunk side (default: the fewest giving chunks of >= 1 MB)."
        " A chunk is the unit of work, of resume and of a dask task.",
    ),
    workers: int | None = WORKERS_OPTION,
    scheduler: str | None = SCHEDULER_OPTION,
    resources: str | None = typer.Option(
        None, "--resources", help="dask resources per chunk task, e.g. GPU=1 (one per GPU)."
    ),
    threads: int | None = typer.Option(
        None,
        "--threads",
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

    with user_errors(debug), progress_bar("extract") as progress:
        wanted = parse_resources(resources)
        extract_features(
            scene=scene,
            backbone=backbone,
            timesteps=parse_csv_ints(timesteps, "--timesteps") or [],
            sites=parse_csv(sites) or [],
            out=out,
            patch=patch,
            stride=stride,
            batch_size=batch_size,
            device=device,
            dtype=dtype,
            noise_seed=noise_seed,
            class_seed=class_seed,
            class_label=class_label,
            progress=progress,
            chunk_tiles=chunk_tiles,
            client=cluster(workers, scheduler),
            resources=wanted,
            threads=threads,
            zoom=zoom,
            noise_samples=noise_samples,
        )
    typer.echo(f"wrote {out}")


if __name__ == "__main__":
    run_app(app)
