"""``hsicache pretrain``: train hsicache's own natural-image diffusion backbone, offline."""

from __future__ import annotations

import functools
from pathlib import Path

import typer

from pipeline.backbone.config import PretrainConfig
from stages._errors import run_app, user_errors
from stages._options import DEBUG_OPTION, PARAMS_OPTION, config_option, parse_csv_ints, progress_bar

app = typer.Typer(add_completion=False, help=__doc__)


#: An option for a field of :class:`PretrainConfig` (see :func:`config_option`).
option = functools.partial(config_option, PretrainConfig)


@app.command()
def pretrain(
    out: Path = typer.Option(..., "--out", help="Backbone folder to write (unet/, scheduler/)."),
    images: Path | None = typer.Option(
        None, "--images", help="Also train on this folder of JPEG/PNG photographs."
    ),
    scene: Path | None = typer.Option(
        None, "--scene", help="Also train on this scene's (unlabeled) 3-band rendering."
    ),
    builtin_photos: bool = typer.Option(
        True,
        "--builtin-photos/--no-builtin-photos",
        help="Train on the photographs bundled with scikit-image and scikit-learn.",
    ),
    block_out_channels: str | None = option(
        "block_out_channels", help="UNet widths per level, e.g. 32,64,128."
    ),
    layers_per_block: int | None = option("layers_per_block", help="Res blocks per level."),
    crop: int | None = option("crop", help="Training crop side in pixels."),
    sample_size: int | None = option(
        "sample_size", help="Patch side `extract` uses with this backbone."
    ),
    batch_size: int | None = option("batch_size", help="Crops per step."),
    steps: int | None = option("steps", help="Optimisation steps."),
    learning_rate: float | None = option("learning_rate", help="AdamW peak rate."),
    seed: int | None = option("seed", help="Seed of initialisation and crops."),
    device: str | None = option("device", help="auto (cuda > mps > cpu) or a device."),
    shipped: str | None = typer.Option(
        None,
        "--shipped",
        help="Write hsicache's shipped backbone of this name (natural-s) instead of training: "
        "what `dvc repro` does by default. It was trained by this command with the recipe in "
        "its pretrain.json.",
    ),
    weights_dtype: str | None = option(
        "weights_dtype", help="fp32 | fp16: the dtype the weights are saved in."
    ),
    params: Path | None = PARAMS_OPTION,
    debug: bool = DEBUG_OPTION,
) -> None:
    """Train a small UNet (epsilon-prediction, EMA) on natural photographs, resumably; or write
    hsicache's shipped one (--shipped natural-s), as `dvc repro` does by default."""
    from pipeline.backbone.pretraining import pretrain as run_pretrain

    given = dict(locals())
    with user_errors(debug, resumable=True):
        given["block_out_channels"] = parse_csv_ints(block_out_channels, "block_out_channels")
        config = PretrainConfig.from_given(given)
        with progress_bar("pretrain") as progress:
            summary = run_pretrain(
                out,
                config,
                images=images,
                scene=scene,
                builtin_photos=builtin_photos,
                shipped=shipped,
                progress=progress,
            )
    before, after = summary["heldout_loss_untrained"], summary["heldout_loss_trained"]
    what = f" (hsicache's shipped `{shipped}`)" if shipped else ""
    typer.echo(f"wrote {out}{what}: {summary['parameters'] / 1e6:.2f} M parameters")
    typer.echo(
        f"held-out denoising loss, t < 100: {before['t<100']:.4f} untrained -> "
        f"{after['t<100']:.4f} trained; all t: {before['all_t']:.4f} -> {after['all_t']:.4f}"
    )


if __name__ == "__main__":
    run_app(app)
