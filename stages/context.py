"""``hsicache context``: per-pixel spectral-spatial context features of a scene, into a store."""

from __future__ import annotations

import functools
from pathlib import Path

import typer

from pipeline.features.config import ContextConfig
from stages._errors import run_app, user_errors
from stages._options import (
    DEBUG_OPTION,
    PARAMS_OPTION,
    SCENE_OPTION,
    STORE_HELP,
    config_option,
    parse_csv_ints,
    progress_bar,
)

app = typer.Typer(add_completion=False, help=__doc__)


#: An option for a field of :class:`ContextConfig` (see :func:`config_option`).
option = functools.partial(config_option, ContextConfig)


@app.command()
def context(
    scene: str = SCENE_OPTION,
    out: str = typer.Option(
        ..., "--out", help="Context store to write (CONTEXT.zarr)." + STORE_HELP
    ),
    components: int | None = option(
        "components", help="Principal components of the standardised cube."
    ),
    windows: str | None = option("windows", help="Window sides of the meanW families."),
    filter_: str | None = option("filter", help="box | gaussian (sigma = window / 6) for meanW."),
    emp_components: int | None = option(
        "emp_components", help="Components of the morphological profile `emp` (0: no emp)."
    ),
    emp_radii: str | None = option("emp_radii", help="Disc radii of its openings/closings."),
    slic_sizes: str | None = option(
        "slic_sizes", help="Pixels per SLIC superpixel of the slicN families (empty: none)."
    ),
    seed: int | None = option(
        "seed", help="Seed of the pixel sample the components are fitted on."
    ),
    params: Path | None = PARAMS_OPTION,
    debug: bool = DEBUG_OPTION,
) -> None:
    """Compute context families (meanW, emp, slicN) from the scene's cube, not the backbone."""
    from pipeline.features.context import write_context

    given = dict(locals())
    with user_errors(debug):
        given.update(
            filter=filter_,
            windows=parse_csv_ints(windows, "windows"),
            emp_radii=parse_csv_ints(emp_radii, "emp_radii"),
            slic_sizes=parse_csv_ints(slic_sizes, "slic_sizes"),
        )
        config = ContextConfig.from_given(given)
        with progress_bar("context") as progress:
            store = write_context(scene=scene, out=out, config=config, progress=progress)
    shown = ", ".join(f"{n} ({store.attrs['families'][n]['channels']})" for n in store.families)
    typer.echo(f"wrote {out}: {shown}")


if __name__ == "__main__":
    run_app(app)
