"""``hsicache prepare``: read a hyperspectral scene, validate, split and render it into a store."""

from __future__ import annotations

import functools
from pathlib import Path

import typer

from pipeline.scene.config import PrepareConfig
from stages._errors import run_app, user_errors
from stages._options import DEBUG_OPTION, PARAMS_OPTION, STORE_HELP, config_option, parse_csv_ints

app = typer.Typer(add_completion=False, help=__doc__)


#: An option for a field of :class:`PrepareConfig` (see :func:`config_option`).
option = functools.partial(config_option, PrepareConfig)


@app.command()
def prepare(
    out: str = typer.Option(..., "--out", help="Scene store to write (SCENE.zarr)." + STORE_HELP),
    cube: Path | None = typer.Option(
        None, "--cube", help="Cube file: .mat (v5 or v7.3), .npy/.npz, ENVI .hdr, GeoTIFF."
    ),
    key: str | None = typer.Option(
        None, "--key", help="Variable of the cube in a .mat/.npz that holds several 3-D arrays."
    ),
    builtin: str | None = typer.Option(
        None, "--builtin", help="Built-in scene instead of --cube: indian_pines or synthetic."
    ),
    labels: Path | None = typer.Option(
        None, "--labels", help="Label map (2-D integers, 0 = unlabeled), any cube format."
    ),
    label_key: str | None = typer.Option(None, "--label-key", help="Variable of the labels."),
    train_mask: Path | None = typer.Option(
        None, "--train-mask", help="Official train mask (non-zero = train), e.g. TrainImage.mat."
    ),
    test_mask: Path | None = typer.Option(
        None, "--test-mask", help="Official test mask (non-zero = test), e.g. TestImage.mat."
    ),
    mask_key: str | None = typer.Option(None, "--mask-key", help="Variable of the masks."),
    split: str | None = option(
        "split",
        help="official | per-class | fraction | blocks. Default: official when masks are "
        "given, else per-class.",
    ),
    per_class: int | None = option("per_class", help="Train pixels per class."),
    fraction: float | None = option(
        "fraction", help="Fraction of each class for train (fraction, blocks)."
    ),
    small_classes: str | None = option(
        "small_classes",
        help="A class with fewer pixels than --per-class: error, or take-all (all to train).",
    ),
    block_size: int | None = option("block_size", help="Block side in pixels (blocks)."),
    buffer: int | None = option(
        "buffer",
        "--buffer",
        "--margin",
        help="Pixels left out between train and test blocks (blocks): test pixels this close "
        "to a train block are dropped. Make it at least the widest context a head reads.",
    ),
    seed: int | None = option("seed", help="Random seed of the split (and synthetic scene)."),
    rgb_mode: str | None = option(
        "rgb_mode",
        help="bands | wavelengths (nearest 640/550/460 nm) | pca. Default: bands when "
        "--rgb-bands is given, else wavelengths when known, else pca.",
    ),
    rgb_bands: str | None = option("rgb_bands", help="0-based R,G,B band indices, e.g. 21,11,6."),
    gamma: float | None = option("gamma", help="Gamma applied after the stretch."),
    clip_low: float | None = option("clip_low", help="Lower stretch percentile."),
    clip_high: float | None = option("clip_high", help="Upper stretch percentile."),
    nan_policy: str | None = option(
        "nan_policy",
        help="Pixels without data (NaN/inf, the file's no-data value or mask): error | zero | "
        "band-mean (filled, and left out of the split).",
    ),
    class_names: str | None = typer.Option(
        None,
        "--class-names",
        help="Comma-separated class names: one per class id the labels hold, in increasing id "
        "order (SalinasA: 6 names for ids 1, 10-14).",
    ),
    preview: Path | None = typer.Option(
        None, "--preview", help="PNG of the rendering with train/test pixels drawn on it."
    ),
    allow_degenerate: bool | None = option(
        "allow_degenerate",
        help="Prepare a scene no classifier can be judged on anyway: one class, no test pixel, "
        "a constant cube or rendering.",
    ),
    params: Path | None = PARAMS_OPTION,
    debug: bool = DEBUG_OPTION,
) -> None:
    """Read a scene, check it, split its labels and write SCENE.zarr."""
    from pipeline.scene.preparation import prepare as run

    given = dict(locals())
    with user_errors(debug):
        given["rgb_bands"] = parse_csv_ints(rgb_bands, "rgb_bands")
        scene = run(
            PrepareConfig.from_given(given),
            out=out,
            preview=preview,
            cube=cube,
            key=key,
            builtin=builtin,
            labels=labels,
            label_key=label_key,
            train_mask=train_mask,
            test_mask=test_mask,
            mask_key=mask_key,
            class_names=class_names.split(",") if class_names else None,
        )
    h, w = scene.shape
    typer.echo(
        f"wrote {out}: {h}x{w}x{scene.cube.shape[-1]}, {scene.n_classes} classes, "
        f"{int(scene.train.sum())} train / {int(scene.test.sum())} test px, "
        f"fingerprint {scene.fingerprint[:12]} (image {scene.image_fingerprint[:12]})"
    )


if __name__ == "__main__":
    run_app(app)
