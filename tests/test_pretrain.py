"""The offline pretraining stage: it learns, resumes exactly, and its output is a backbone."""

from __future__ import annotations

import json

import numpy as np
import pytest

from pipeline.backbone.config import PretrainConfig
from pipeline.backbone.loading import _weights_hash, load_backbone
from pipeline.backbone.pretraining import load_photos, pretrain
from stages.cli import app
from tests.interrupt import pretrain_until

TINY = dict(block_out_channels=[8, 16], crop=16, sample_size=32, batch_size=4, steps=40,
            checkpoint_every=10, warmup=5, eval_crops=16, learning_rate=2e-3)  # fmt: skip


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    """A folder of small generated 'photographs': smooth blobs and stripes."""
    from skimage.io import imsave

    folder = tmp_path_factory.mktemp("photos")
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:64, :64] / 64.0
    for k in range(4):
        f = rng.uniform(1, 4, size=3)
        img = 0.5 + 0.5 * np.stack([np.sin(2 * np.pi * f[c] * (xx + k * yy)) for c in range(3)], -1)
        imsave(folder / f"p{k}.png", (img * 255).astype(np.uint8), check_contrast=False)
    return folder


def _run(out, photos, **kw):
    cfg = PretrainConfig(**{**TINY, "holdout": [f"{photos.name}/p3.png"], **kw})
    return pretrain(out, config=cfg, images=photos, builtin_photos=False, device="cpu")


def test_learns_and_writes_a_backbone(tmp_path, photos):
    summary = _run(tmp_path / "bb", photos)
    before, after = summary["heldout_loss_untrained"], summary["heldout_loss_trained"]
    assert after["all_t"] < 0.8 * before["all_t"]
    assert summary["holdout_images"] == [f"{photos.name}/p3.png"]
    bb = load_backbone(str(tmp_path / "bb"))
    assert bb.sample_size == 32 and "up1.res0" in [s.name for s in bb.sites]
    rows = (tmp_path / "bb" / "train_log.csv").read_text().splitlines()
    assert rows[0] == "step,loss,lr" and len(rows) == 41
    assert json.loads((tmp_path / "bb" / "pretrain.json").read_text())["parameters"] > 0
    assert not (tmp_path / "bb.partial").exists()


@pytest.mark.parametrize("stop_after", [10, 17])
def test_resume_equals_an_uninterrupted_run(tmp_path, photos, stop_after):
    _run(tmp_path / "ref", photos)
    cfg = PretrainConfig(**{**TINY, "holdout": [f"{photos.name}/p3.png"]})
    assert pretrain_until(stop_after, tmp_path / "again", config=cfg, images=photos,
                          builtin_photos=False, device="cpu")  # fmt: skip
    assert not (tmp_path / "again").exists()
    _run(tmp_path / "again", photos)
    ref = load_backbone(str(tmp_path / "ref")).unet
    again = load_backbone(str(tmp_path / "again")).unet
    assert _weights_hash(again) == _weights_hash(ref)


def test_builtin_photographs_need_no_download():
    photos = load_photos()
    assert {"astronaut", "coffee", "chelsea", "china", "flower"} <= set(photos)
    assert all(p.ndim == 3 and p.shape[2] == 3 and p.max() <= 1 for p in photos.values())


def test_bad_input_is_one_line(runner, tmp_path):
    result = runner.invoke(app, ["pretrain", "--out", str(tmp_path / "bb"), "--images",
                                 str(tmp_path / "none")])  # fmt: skip
    assert result.exit_code == 2 and "image folder" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    result = runner.invoke(app, ["pretrain", "--out", str(tmp_path / "bb"), "--crop", "30"])
    assert result.exit_code == 2 and "`--crop 30` must be a multiple of 4" in result.stderr
    assert not (tmp_path / "bb").exists()
