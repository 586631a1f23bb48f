"""``hsicache pretrain``: train hsicache's own natural-image diffusion backbone, offline."""

from __future__ import annotations

from pathlib import Path

import typer

from stages._common import (
    DEBUG_OPTION,
    PARAMS_OPTION,
    parse_csv_ints,
    progress_bar,
    run_app,
    user_errors,
)

app = typer.Typer(add_completion=False, help=__doc__)


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
    block_out_channels: str | None = typer.Option(
        None, "--block-out-channels", help="UNet widths per level, e.g. 32,64,128."
    ),
    layers_per_block: int | None = typer.Option(None, "--layers-per-block", help="Res blocks."),
    crop: int | None = typer.Option(None, "--crop", help="Training crop side in pixels."),
    sample_size: int | None = typer.Option(
        None, "--sample-size", help="Patch side `extract` uses with this backbone."
    ),
    batch_size: int | None = typer.Option(None, "--batch-size", help="Crops per step."),
    steps: int | None = typer.Option(None, "--steps", help="Optimisation steps."),
    learning_rate: float | None = typer.Option(None, "--learning-rate", help="AdamW peak rate."),
    seed: int | None = typer.Option(None, "--seed", help="Seed of initialisation and crops."),
    device: str = typer.Option("auto", "--device", help="auto (cuda > mps > cpu) or a device."),
    shipped: str | None = typer.Option(
        None,
        "--shipped",
        help="Write hsicache's shipped backbone of this name (natural-s) instead of training: "
        "what `dvc repro` does by default. It was trained by this command with the recipe in "
        "its pretrain.json.",
    ),
    weights_dtype: str = typer.Option(
        "fp32", "--weights-dtype", help="fp32 | fp16: the dtype the weights are saved in."
    ),
    params: Path | None = PARAMS_OPTION,
    debug: bool = DEBUG_OPTION,
) -> None:
    """Train a small UNet (epsilon-prediction, EMA) on natural photographs, resumably; or write
    hsicache's shipped one (--shipped natural-s), as `dvc repro` does by default."""
    from pipeline.backbone.pretraining import PretrainConfig
    from pipeline.backbone.pretraining import pretrain as run_pretrain

    with user_errors(debug):
        config = PretrainConfig(
            block_out_channels=parse_csv_ints(block_out_channels, "--block-out-channels"),
            layers_per_block=layers_per_block,
            crop=crop,
            sample_size=sample_size,
            batch_size=batch_size,
            steps=steps,
            learning_rate=learning_rate,
            seed=seed,
        )
        with progress_bar("pretrain") as progress:
            summary = run_pretrain(out, config=config, images=images, scene=scene,
                                   builtin_photos=builtin_photos, device=device,
                                   progress=progress, shipped=shipped,
                                   weights_dtype=weights_dtype)  # fmt: skip
    before, after = summary["heldout_loss_untrained"], summary["heldout_loss_trained"]
    what = f" (hsicache's shipped `{shipped}`)" if shipped else ""
    typer.echo(f"wrote {out}{what}: {summary['parameters'] / 1e6:.2f} M parameters")
    typer.echo(f"held-out denoising loss, t < 100: {before['t<100']:.4f} untrained -> "
               f"{after['t<100']:.4f} trained; all t: {before['all_t']:.4f} -> "
               f"{after['all_t']:.4f}")  # fmt: skip


if __name__ == "__main__":
    run_app(app)
