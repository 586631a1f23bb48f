"""``extract --zoom`` (the rendering upsampled before the backbone, features pooled back) and
``--noise-samples`` (features averaged over several noise draws)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline.backbone.loading import Backbone, Site, load_backbone, seeded_noise
from pipeline.features.cache import FeatureCache
from pipeline.features.extract import extract_features, upsample_region
from pipeline.scene.core import open_scene
from pipeline.scene.preparation import prepare
from stages.cli import app
from tests.interrupt import extract_until
from tests.test_extract import _ProbeBackbone


@pytest.fixture(scope="module")
def tiny() -> Backbone:
    return load_backbone("builtin:tiny")


@pytest.fixture(scope="module")
def scene(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("zoom") / "scene.zarr"
    prepare(out=path, builtin="synthetic", per_class=2, seed=0)
    return str(path)


def _probe(tiny: Backbone) -> Backbone:
    probe = _ProbeBackbone(tiny.unet, tiny.scheduler, "probe", "0" * 64)
    probe.sites = [Site("probe", "", 3, 32, 0)]
    return probe


def _read(path, t: int) -> np.ndarray:
    return np.asarray(FeatureCache.open(path).to_dask((t,), ["probe"]).compute(), np.float32)


def test_upsampling_is_torchs_bilinear():
    rgb = np.random.default_rng(0).random((9, 7, 3)).astype(np.float32)
    ref = torch.nn.functional.interpolate(
        torch.from_numpy(rgb).permute(2, 0, 1)[None],
        scale_factor=4,
        mode="bilinear",
        align_corners=False,
    )
    ours = upsample_region(rgb, np.arange(36), np.arange(28), 4)
    np.testing.assert_allclose(ours, ref[0].permute(1, 2, 0).numpy(), atol=1e-6)
    part = upsample_region(rgb, np.arange(5, 20), np.arange(11, 17), 4)  # reads a box only
    np.testing.assert_allclose(part, ours[5:20, 11:17], atol=1e-6)


def test_zoom_pools_the_upsampled_features_back(tiny, scene, tmp_path):
    extract_features(scene=scene, backbone=_probe(tiny), timesteps=[10], sites=["probe"],
                     out=tmp_path / "z.zarr", stride=16, noise_seed=3, zoom=2)  # fmt: skip
    got = _read(tmp_path / "z.zarr", 10)
    rgb = np.array(open_scene(scene).rgb, dtype=np.float32)
    h, w = rgb.shape[:2]
    up = torch.nn.functional.interpolate(
        torch.from_numpy(rgb).permute(2, 0, 1)[None],
        scale_factor=2,
        mode="bilinear",
        align_corners=False,
    )
    up = up[0].permute(1, 2, 0).numpy() * 2 - 1
    eps = seeded_noise((3, 32, 32), 3).numpy()
    abar = float(tiny.scheduler.alphas_cumprod[10])
    ys, xs = np.mgrid[0 : 2 * h, 0 : 2 * w]
    noise = eps[:, 8 + ys % 16, 8 + xs % 16].transpose(1, 2, 0)
    zoomed = np.sqrt(abar) * up + np.sqrt(1 - abar) * noise
    expected = zoomed.reshape(h, 2, w, 2, 3).mean(axis=(1, 3))
    assert got.shape == (h, w, 3)
    np.testing.assert_allclose(got, expected, atol=3e-3)  # float16 storage
    ident = FeatureCache.open(tmp_path / "z.zarr").attrs["identity"]
    assert ident["zoom"] == 2 and "noise_samples" not in ident


def test_noise_samples_average_the_draws(tiny, scene, tmp_path):
    extract_features(scene=scene, backbone=_probe(tiny), timesteps=[10], sites=["probe"],
                     out=tmp_path / "k.zarr", stride=16, noise_seed=3, noise_samples=3)  # fmt: skip
    extract_features(scene=scene, backbone=_probe(tiny), timesteps=[10], sites=["probe"],
                     out=tmp_path / "one.zarr", stride=16, noise_seed=3)  # fmt: skip
    got, one = _read(tmp_path / "k.zarr", 10), _read(tmp_path / "one.zarr", 10)
    rgb = np.asarray(open_scene(scene).rgb, dtype=np.float32) * 2 - 1
    abar = float(tiny.scheduler.alphas_cumprod[10])
    h, w = rgb.shape[:2]
    ys, xs = np.mgrid[0:h, 0:w]
    seeds = [3, 3 + 1_000_003, 3 + 2_000_006]
    eps = np.mean([seeded_noise((3, 32, 32), s).numpy() for s in seeds], axis=0)
    expected = np.sqrt(abar) * rgb + np.sqrt(1 - abar) * eps[:, 8 + ys % 16, 8 + xs % 16].transpose(
        1, 2, 0
    )
    np.testing.assert_allclose(got, expected, atol=3e-3)
    assert np.abs(got - one).max() > 0.01  # three draws are not one
    ident = FeatureCache.open(tmp_path / "k.zarr").attrs["identity"]
    assert ident["noise_samples"] == 3 and "zoom" not in ident


def test_zoom_1_and_one_draw_are_the_cache_of_old(scene, tmp_path):
    kw = dict(scene=scene, backbone="builtin:tiny", timesteps=[0], sites=["up1.res1"],
              stride=16, dtype="fp32")  # fmt: skip
    extract_features(out=tmp_path / "a.zarr", **kw)
    extract_features(out=tmp_path / "b.zarr", zoom=1, noise_samples=1, **kw)
    files = sorted(p.relative_to(tmp_path / "a.zarr") for p in (tmp_path / "a.zarr").rglob("*")
                   if p.is_file())  # fmt: skip
    for rel in files:
        assert (tmp_path / "a.zarr" / rel).read_bytes() == (tmp_path / "b.zarr" / rel).read_bytes()
    ident = FeatureCache.open(tmp_path / "a.zarr").attrs["identity"]
    assert "zoom" not in ident and "noise_samples" not in ident


def test_a_zoomed_cache_resumes_bit_identically(scene, tmp_path):
    kw = dict(scene=scene, backbone="builtin:tiny", timesteps=[0], sites=["up1.res1"],
              stride=16, dtype="fp32", zoom=2, noise_samples=2, chunk_tiles=2)  # fmt: skip
    extract_features(out=tmp_path / "whole.zarr", **kw)
    extract_until(1, out=tmp_path / "cut.zarr", **kw)
    cut = FeatureCache.open(tmp_path / "cut.zarr", allow_incomplete=True)
    assert not cut.attrs.get("complete")
    extract_features(out=tmp_path / "cut.zarr", **kw)
    a = np.asarray(FeatureCache.open(tmp_path / "whole.zarr").to_dask((0,), ["up1.res1"]))
    b = np.asarray(FeatureCache.open(tmp_path / "cut.zarr").to_dask((0,), ["up1.res1"]))
    assert a.shape[:2] == open_scene(scene).shape
    np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("extra,culprit", [
    (["--zoom", "3"], "`--zoom` must be one of 1, 2, 4, 8"),
    (["--noise-samples", "0"], "`--noise-samples` must be"),
    (["--zoom", "8", "--stride", "4", "--patch", "32"], "`--stride 4` must be a multiple of `--zoom 8`"),
])  # fmt: skip
def test_bad_values_are_one_line(runner, scene, tmp_path, extra, culprit):
    result = runner.invoke(app, ["extract", "--scene", scene, "--backbone", "builtin:tiny",
                                 "--timesteps", "0", "--sites", "up1.res1", "--out",
                                 str(tmp_path / "f.zarr"), *extra])  # fmt: skip
    assert result.exit_code == 2 and culprit in result.stderr, result.output
    assert len(result.stderr.strip().splitlines()) == 1 and not list(tmp_path.iterdir())
