"""``hsicache context``: per-pixel spectral-spatial context features of a scene, into a store."""

from __future__ import annotations

from pathlib import Path

import typer

from stages._common import (
    DEBUG_OPTION,
    PARAMS_OPTION,
    SCENE_OPTION,
    STORE_HELP,
    parse_csv_ints,
    progress_bar,
    run_app,
    user_errors,
)

app = typer.Typer(add_completion=False, help=__doc__)


@app.command()
def context(
    scene: str = SCENE_OPTION,
    out: str = typer.Option(
        ..., "--out", help="Context store to write (CONTEXT.zarr)." + STORE_HELP
    ),
    components: int | None = typer.Option(
        None, "--components", help="Principal components of the standardised cube (default 32)."
    ),
    windows: str | None = typer.Option(
        None, "--windows", help="Window sides of the meanW families (default 7,15,21)."
    ),
    filter_: str | None = typer.Option(
        None, "--filter", help="box | gaussian (sigma = window / 6) for meanW (default box)."
    ),
    emp_components: int | None = typer.Option(
        None,
        "--emp-components",
        help="Components of the morphological profile `emp` (default 4; 0: no emp).",
    ),
    emp_radii: str | None = typer.Option(
        None, "--emp-radii", help="Disc radii of its openings/closings (default 2,4,8)."
    ),
    slic_sizes: str | None = typer.Option(
        None,
        "--slic-sizes",
        help="Pixels per SLIC superpixel of the slicN families (default 64,256; empty: none).",
    ),
    seed: int | None = typer.Option(
        None, "--seed", help="Seed of the pixel sample the components are fitted on."
    ),
    params: Path | None = PARAMS_OPTION,
    debug: bool = DEBUG_OPTION,
) -> None:
    """Compute context families (meanW, emp, slicN) from the scene's cube, not the backbone."""
    from pipeline.features.context import ContextConfig, write_context

    with user_errors(debug):
        given = {
            "components": components,
            "windows": parse_csv_ints(windows, "--windows"),
            "filter": filter_,
            "emp_components": emp_components,
            "emp_radii": parse_csv_ints(emp_radii, "--emp-radii"),
            "slic_sizes": parse_csv_ints(slic_sizes, "--slic-sizes"),
            "seed": seed,
        }
        config = ContextConfig.from_mapping({k: v for k, v in given.items() if v is not None})
        with progress_bar("context") as progress:
            store = write_context(scene=scene, out=out, config=config, progress=progress)
    shown = ", ".join(f"{n} ({store.attrs['families'][n]['channels']})" for n in store.families)
    typer.echo(f"wrote {out}: {shown}")


if __name__ == "__main__":
    run_app(app)
