"""``hsicache cache info|verify|unlock``: inspect, check and unlock a feature cache or a
context store."""

from __future__ import annotations

import json

import typer

from stages._errors import run_app, user_errors
from stages._options import DEBUG_OPTION, STORE_HELP

STORE_ARGUMENT = typer.Argument(
    ..., help="The feature cache (FEATURES.zarr) or context store (CONTEXT.zarr)." + STORE_HELP
)
app = typer.Typer(add_completion=False, no_args_is_help=True, help=__doc__)


@app.command()
def info(
    store: str = STORE_ARGUMENT,
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object."),
    debug: bool = DEBUG_OPTION,
) -> None:
    """Sites, shapes, bytes on disk, compression ratio and provenance."""
    from pipeline.features.cache import cache_info

    with user_errors(debug):
        rep = cache_info(store)
    if as_json:
        typer.echo(json.dumps(rep, indent=2))
        return
    ident = rep["identity"]
    typer.echo(f"{rep['path']}: {rep['kind']}, "
               f"{'complete' if rep['complete'] else 'UNFINISHED'}, "
               f"{rep['shape'][0]}x{rep['shape'][1]} px")  # fmt: skip
    if rep["kind"] == "context store":
        cfg = ident["config"]
        typer.echo(f"{cfg['components']} principal components ("
                   f"{sum(rep['pca']['explained_variance_ratio']):.1%} of the variance), "
                   f"{cfg['filter']} windows {cfg['windows']}")  # fmt: skip
    else:
        typer.echo(f"backbone {ident['backbone']} (weights {ident['weights_sha256'][:12]}), "
                   f"patch {ident['patch']}, stride {ident['stride']}, "
                   f"noise seed {ident['noise_seed']}, computed in {ident['compute_dtype']}, "
                   f"zoom {ident.get('zoom', 1)}, "
                   f"noise draws {ident.get('noise_samples', 1)}")  # fmt: skip
    typer.echo(f"image fingerprint {ident['image_fingerprint'][:12]}")
    for name, a in rep.get("arrays", rep.get("families", {})).items():
        typer.echo(f"  {name:<24} {tuple(a['shape'])!s:<18} {a['bytes_on_disk'] / 1e6:8.2f} MB")
    typer.echo(
        f"{rep['bytes_on_disk'] / 1e6:.2f} MB on disk = {rep['cache_to_raw']:.3f} of raw fp32"
    )
    arrays = rep.get("arrays", rep.get("families", {}))
    stored = {f"{a['dtype']}, {a['compression']}" for a in arrays.values()}
    if stored:
        typer.echo(f"stored as {'; '.join(sorted(stored))}")


@app.command()
def verify(
    store: str = STORE_ARGUMENT,
    scene: str | None = typer.Option(None, "--scene", help="Also check it matches this scene."),
    debug: bool = DEBUG_OPTION,
) -> None:
    """Check the store is complete and every chunk present, readable and finite; with --scene,
    that it was made from that scene's image.

    Exits 1 listing what it found when the store is damaged, 2 when it is no store at all.
    """
    from pipeline.features.cache import verify_cache
    from pipeline.scene.core import open_scene

    with user_errors(debug):
        fp = open_scene(scene).image_fingerprint if scene is not None else None
        problems = verify_cache(store, scene_fingerprint=fp)
    if problems:
        typer.echo(f"error: `{store}` failed verification: {'; '.join(problems)}", err=True)
        raise typer.Exit(code=1)
    typer.echo(f"{store}: ok")


@app.command()
def unlock(
    store: str = STORE_ARGUMENT,
    debug: bool = DEBUG_OPTION,
) -> None:
    """Remove the writer lock of a cache whose `extract` died on another host.

    A lock left by a killed process on the same host is taken over by the next `extract`
    without this, and the lock of an `extract` still running on this host is refused; use it
    only when you are sure no `extract` on another host still writes the cache.
    """
    from pipeline.features.cache import unlock_cache

    with user_errors(debug):
        owner = unlock_cache(store)
    if owner is None:
        typer.echo(f"{store}: was not locked")
    elif not owner:
        typer.echo(f"{store}: removed a lock file that could not be read")
    else:
        typer.echo(f"{store}: removed the lock of pid {owner.get('pid')} on {owner.get('host')}")


if __name__ == "__main__":
    run_app(app)
