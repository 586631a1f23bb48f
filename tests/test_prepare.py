"""``hsicache prepare`` end to end through the CLI, on tiny fixtures and on real data."""

from __future__ import annotations

import re
import subprocess
import sys

import numpy as np
import pytest
import xarray as xr

from pipeline.scene.core import open_scene
from stages.cli import app
from tests.conftest import leftovers


def _prepare(runner, *args: str):
    return runner.invoke(app, ["prepare", *map(str, args)])


class TestPrepareCli:
    def test_mat_cube_with_labels(self, runner, scenes, tmp_path):
        out = tmp_path / "scene.zarr"
        result = _prepare(
            runner, "--cube", scenes / "tiny_v5.mat", "--key", "tiny",
            "--labels", scenes / "tiny_v5.mat", "--label-key", "tiny_gt",
            "--per-class", 3, "--rgb-mode", "bands", "--rgb-bands", "3,2,1",
            "--out", out, "--preview", tmp_path / "preview.png",
        )  # fmt: skip
        assert result.exit_code == 0, result.output
        assert "3 classes, 9 train" in result.output
        ds = xr.open_zarr(out, consolidated=False)
        assert ds["cube"].dims == ("y", "x", "band") and ds["cube"].shape == (12, 10, 6)
        assert ds["rgb"].dims == ("y", "x", "color")
        assert list(ds["class_id"].values) == [1, 10, 11]
        assert ds.attrs["rendering"]["bands"] == [3, 2, 1]
        assert len(ds.attrs["fingerprint"]) == 64
        assert (tmp_path / "preview.png").read_bytes()[:4] == b"\x89PNG"
        assert leftovers(tmp_path) == ["preview.png", "scene.zarr"]

    def test_a_wide_scene_previews_its_panels_one_above_the_other(self, runner, tmp_path):
        """A scene 7x wider than tall (as the Houston 2013 masks): side by side, matplotlib
        collapsed both panels to strips and warned; stacked, each keeps the figure's width."""
        import warnings

        from pipeline.scene.plots import plot_scene_preview

        rng = np.random.default_rng(0)
        cube, labels = rng.random((12, 84, 5)), np.repeat(np.arange(1, 4), 28)[None].repeat(12, 0)
        np.save(tmp_path / "c.npy", cube)
        np.save(tmp_path / "gt.npy", labels)
        out = tmp_path / "s.zarr"
        result = _prepare(runner, "--cube", tmp_path / "c.npy", "--labels", tmp_path / "gt.npy",
                          "--per-class", 2, "--out", out, "--preview", tmp_path / "p.png")  # fmt: skip
        assert result.exit_code == 0 and "warning" not in result.output, result.output
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # constrained layout's "axes sizes collapsed"
            fig = plot_scene_preview(open_scene(out))
            fig.draw_without_rendering()
        top, bottom = (ax.get_position() for ax in fig.axes[:2])
        assert top.y0 > bottom.y1 and top.width > 0.8 and bottom.width > 0.8

    def test_envi_wavelengths_drive_the_default_rendering(self, runner, scenes, tmp_path):
        out = tmp_path / "s.zarr"
        result = _prepare(
            runner, "--cube", scenes / "tiny_bil.hdr", "--labels", scenes / "tiny_gt.npy",
            "--per-class", 2, "--out", out,
        )  # fmt: skip
        assert result.exit_code == 0, result.output
        scene = open_scene(out)
        assert scene.attrs["rendering"]["mode"] == "wavelengths"
        assert scene.attrs["rendering"]["bands"] == [4, 2, 0]  # 650, 550, 450 nm
        np.testing.assert_allclose(scene.wavelengths, [450, 500, 550, 600, 650, 700])

    def test_geotiff_keeps_georeferencing(self, runner, scenes, tmp_path):
        out = tmp_path / "s.zarr"
        result = _prepare(
            runner, "--cube", scenes / "tiny.tif", "--labels", scenes / "tiny_gt.tif",
            "--per-class", 2, "--out", out,
        )  # fmt: skip
        assert result.exit_code == 0, result.output
        scene = open_scene(out)
        assert scene.crs is not None and "32632" in scene.crs
        assert scene.transform == (30.0, 0.0, 600000.0, 0.0, -30.0, 5360000.0)

    @pytest.mark.parametrize(
        "pair", [("TrainImage.mat", "TestImage.mat"), ("tiny_TR.tif", "tiny_VA.tif")]
    )
    def test_official_masks_give_labels_and_split(self, runner, scenes, tmp_path, pair):
        out = tmp_path / "s.zarr"
        result = _prepare(
            runner, "--cube", scenes / "tiny.npy", "--train-mask", scenes / pair[0],
            "--test-mask", scenes / pair[1], "--out", out,
        )  # fmt: skip
        assert result.exit_code == 0, result.output
        scene = open_scene(out)
        train_ref = np.load(scenes / "tiny_gt.npy") * (np.arange(10) % 3 == 0)
        np.testing.assert_array_equal(scene.train, train_ref > 0)
        assert scene.attrs["split"]["protocol"] == "official"
        assert "warning" not in result.stderr

    def test_masks_with_another_split_warn_that_theirs_is_dropped(self, runner, scenes, tmp_path):
        """A params file's `split: per-class` beside masks re-splits their labels: say so."""
        result = _prepare(
            runner, "--cube", scenes / "tiny.npy", "--train-mask", scenes / "TrainImage.mat",
            "--test-mask", scenes / "TestImage.mat", "--split", "per-class", "--per-class", 2,
            "--out", tmp_path / "s.zarr",
        )  # fmt: skip
        assert result.exit_code == 0, result.output
        assert "warning: `--split per-class` draws a new split" in result.stderr
        assert "`--split official` keeps theirs" in result.stderr

    def test_fingerprint_follows_the_split_image_fingerprint_does_not(
        self, runner, scenes, tmp_path
    ):
        fps, image_fps = [], []
        for seed in (0, 0, 1):
            out = tmp_path / f"s{len(fps)}.zarr"
            args = ["--cube", scenes / "tiny.npy", "--labels", scenes / "tiny_gt.npy"]
            result = _prepare(runner, *args, "--per-class", 2, "--seed", seed, "--out", out)
            assert result.exit_code == 0, result.output
            fps.append(open_scene(out).fingerprint)
            image_fps.append(open_scene(out).image_fingerprint)
        assert fps[0] == fps[1] != fps[2]
        assert len(set(image_fps)) == 1  # a new split reuses the feature cache

    def test_rewrite_replaces_the_store(self, runner, scenes, tmp_path):
        out = tmp_path / "s.zarr"
        base = ["--cube", scenes / "tiny.npy", "--labels", scenes / "tiny_gt.npy", "--out", out]
        assert _prepare(runner, *base, "--per-class", 2).exit_code == 0
        assert _prepare(runner, *base, "--per-class", 3).exit_code == 0
        assert int(open_scene(out).train.sum()) == 9
        assert leftovers(tmp_path) == ["s.zarr"]

    def test_a_scene_read_again_comes_from_memory_until_the_store_changes(
        self, runner, scenes, tmp_path, monkeypatch
    ):
        import shutil

        from pipeline.io.storage import MemoryCache

        monkeypatch.setattr("pipeline.io.storage.memory_cache", MemoryCache(2**20))
        out = tmp_path / "s.zarr"
        base = ["--cube", scenes / "tiny.npy", "--labels", scenes / "tiny_gt.npy", "--out", out]
        assert _prepare(runner, *base, "--per-class", 2).exit_code == 0
        first = open_scene(out)
        with pytest.raises(ValueError, match="read-only"):
            first.train[0, 0] = True  # shared with later readers: not writable
        shutil.rmtree(out / "cube")  # the second read must not touch the arrays
        again = open_scene(out, lazy=True)  # read in full once: served in full from memory
        np.testing.assert_array_equal(again.cube, first.cube)
        again.train = None  # each caller gets its own Scene
        assert first.train is not None and int(open_scene(out).train.sum()) == 6
        assert _prepare(runner, *base, "--per-class", 3).exit_code == 0  # a new store version
        assert int(open_scene(out).train.sum()) == 9

    def test_builtin_indian_pines(self, runner, tmp_path):
        out = tmp_path / "ip.zarr"
        result = _prepare(runner, "--builtin", "indian_pines", "--out", out)
        assert result.exit_code == 0, result.output
        scene = open_scene(out)
        assert scene.cube.shape == (145, 145, 200) and scene.n_classes == 16
        assert scene.class_names[0] == "Alfalfa"
        assert "CC BY 3.0" in scene.attrs["attribution"]
        assert int(scene.train.sum()) == 80

    def test_module_entry_point(self, scenes, tmp_path):
        out = tmp_path / "m.zarr"
        proc = subprocess.run(
            [sys.executable, "-m", "stages.prepare", "--cube", str(scenes / "tiny.npz"),
             "--per-class", "2", "--labels", str(scenes / "tiny_gt.npy"), "--out", str(out)],
            capture_output=True, text=True, check=False,
        )  # fmt: skip
        assert proc.returncode == 0, proc.stderr
        assert out.is_dir()

    def test_help_explains_every_option(self, runner):
        result = runner.invoke(app, ["prepare", "--help"])
        assert result.exit_code == 0
        for option in (
            "--cube",
            "--key",
            "--builtin",
            "--labels",
            "--split",
            "--rgb-mode",
            "--gamma",
        ):
            assert option in result.output


def _bad_inputs(scenes, tmp_path):
    """(name, extra args, expected message regex) for every documented bad input."""
    corrupt = tmp_path / "corrupt.mat"
    corrupt.write_bytes(b"garbage" * 20)
    wrong_shape = tmp_path / "wrong_shape.npy"
    np.save(wrong_shape, np.ones((5, 5), dtype=np.uint8))
    fractional = tmp_path / "fractional.npy"
    np.save(fractional, np.full((12, 10), 1.5))
    negative = tmp_path / "negative.npy"
    np.save(negative, -np.load(scenes / "tiny_gt.npy").astype(np.int16))
    nan_cube = tmp_path / "nan_cube.npy"
    cube = np.load(scenes / "tiny.npy").astype(np.float32)
    cube[0, 0, :2] = np.nan
    np.save(nan_cube, cube)
    empty_train = tmp_path / "empty_train.npy"
    np.save(empty_train, np.zeros((12, 10), dtype=np.uint8))
    bands_first = tmp_path / "bands_first.npy"
    np.save(bands_first, np.moveaxis(np.load(scenes / "tiny.npy"), -1, 0))
    gt = ["--labels", scenes / "tiny_gt.npy"]
    npy = ["--cube", scenes / "tiny.npy"]
    return [
        ("missing file", ["--cube", tmp_path / "nope.mat", *gt], r"cube file `.*nope.mat` does not exist"),
        ("corrupt file", ["--cube", corrupt, *gt], r"cannot read cube `.*corrupt.mat`"),
        ("several cubes", ["--cube", scenes / "two_cubes.mat", *gt], r"2 3-D arrays \(radiance, reflectance\): choose one with `--key`"),
        ("no 3-D array", ["--cube", scenes / "tiny_gt.npy", *gt], r"shape \(12, 10\); expected 3 dimensions"),
        ("label shape", [*npy, "--labels", wrong_shape], r"label map `.*wrong_shape.npy` has shape \(5, 5\) but the cube is 12x10"),
        ("non-integer labels", [*npy, "--labels", fractional], r"non-integer values \(e.g. 1.5\)"),
        ("negative labels", [*npy, "--labels", negative], r"110 negative values \(min -11\)"),
        ("nan in cube", ["--cube", nan_cube, *gt], r"1 pixel without data \(NaN/inf values\): pass `--nan-policy zero`"),
        ("band index", [*npy, *gt, "--rgb-bands", "6,1,0"], r"`--rgb-bands` index 6 is out of range: the cube has 6 bands"),
        ("overlapping masks", [*npy, "--train-mask", scenes / "tiny_gt.npy", "--test-mask", scenes / "tiny_gt.npy"], r"overlap in 110 pixels"),
        ("empty train", [*npy, *gt, "--train-mask", empty_train, "--test-mask", scenes / "tiny_gt.npy"], r"train set is empty"),
        ("too few per class", [*npy, *gt, "--per-class", 50], r"class 1 has only 44 labeled pixels, fewer than `--per-class 50`"),
        ("no input", [*gt], r"give exactly one of `--cube PATH` and `--builtin NAME`"),
        ("unknown builtin", ["--builtin", "pavia"], r"unknown built-in scene `pavia`"),
        ("bad rgb-bands", [*npy, *gt, "--rgb-bands", "a,b,c"], r"`--rgb-bands` takes comma-separated integers"),
        ("key for a .npy", [*npy, *gt, "--key", "cube"], r"`--key` chooses a variable of a .mat or .npz file only"),
        ("bands first", ["--cube", bands_first, *gt], r"the cube looks bands-first: save it as \(height, width, bands\)"),
        ("fraction without it", [*npy, *gt, "--split", "fraction"], r"`--split fraction` needs `--fraction F`"),
        ("rgb-bands with pca", [*npy, *gt, "--rgb-mode", "pca", "--rgb-bands", "3,2,1"],
         r"`--rgb-bands` is for `--rgb-mode bands`, not `--rgb-mode pca`: drop one of them"),
    ]  # fmt: skip


class TestPrepareBadInput:
    def test_every_bad_input(self, runner, scenes, tmp_path):
        inputs = tmp_path / "inputs"
        inputs.mkdir()
        for name, args, pattern in _bad_inputs(scenes, inputs):
            outdir = tmp_path / name.replace(" ", "_")
            outdir.mkdir()
            result = _prepare(
                runner, *args, "--out", outdir / "scene.zarr", "--preview", outdir / "p.png"
            )
            assert result.exit_code == 2, (name, result.output)
            lines = result.stderr.strip().splitlines()
            assert len(lines) == 1, (name, result.stderr)
            assert lines[0].startswith("error: "), (name, lines)
            assert "Traceback" not in result.output
            assert re.search(pattern, lines[0]), (name, lines[0])
            assert leftovers(outdir) == [], (name, leftovers(outdir))

    def test_debug_shows_the_traceback(self, runner, tmp_path):
        result = _prepare(
            runner, "--cube", tmp_path / "nope.mat", "--out", tmp_path / "s.zarr", "--debug"
        )
        assert result.exit_code == 2  # a user's mistake, with or without the traceback
        assert "Traceback" in result.stderr and "SceneNotFoundError" in result.stderr
        assert result.stderr.strip().splitlines()[-1].startswith("error: ")

    def test_nan_policy_fills(self, runner, scenes, tmp_path):
        cube = np.load(scenes / "tiny.npy").astype(np.float32)
        cube[0, 0, 1] = np.inf
        np.save(tmp_path / "c.npy", cube)
        out = tmp_path / "s.zarr"
        result = _prepare(
            runner, "--cube", tmp_path / "c.npy", "--labels", scenes / "tiny_gt.npy",
            "--per-class", 2, "--nan-policy", "band-mean", "--out", out,
        )  # fmt: skip
        assert result.exit_code == 0, result.output
        filled = open_scene(out).cube[0, 0, 1]
        assert np.isfinite(filled)
        np.testing.assert_allclose(filled, np.delete(cube[..., 1].ravel(), 0).mean(), rtol=1e-5)


@pytest.mark.shared
class TestPrepareRealData:
    def test_salinas_a_end_to_end(self, runner, shared_data, tmp_path):
        d = shared_data / "salinasA"
        out = tmp_path / "salinasA.zarr"
        result = _prepare(
            runner, "--cube", d / "SalinasA_corrected.mat", "--labels", d / "SalinasA_gt.mat",
            "--per-class", 5, "--rgb-mode", "bands", "--rgb-bands", "29,19,9", "--seed", 0,
            "--out", out, "--preview", tmp_path / "salinasA.png",
        )  # fmt: skip
        assert result.exit_code == 0, result.output
        scene = open_scene(out)
        assert scene.cube.shape == (83, 86, 204)
        assert list(scene.class_ids) == [1, 10, 11, 12, 13, 14]
        assert int(scene.train.sum()) == 30 and int(scene.test.sum()) == 5348 - 30

    def test_augsburg_official_counts(self, runner, shared_data, tmp_path):
        d = shared_data / "augsburg_split"
        out = tmp_path / "augsburg.zarr"
        result = _prepare(
            runner, "--builtin", "synthetic", "--train-mask", d / "TrainImage.mat",
            "--test-mask", d / "TestImage.mat", "--out", out,
        )  # fmt: skip
        assert result.exit_code == 0, result.output
        scene = open_scene(out)
        assert scene.shape == (332, 485)
        assert list(np.bincount(scene.labels[scene.train])) == [146, 264, 21, 248, 52, 7, 23]
        assert list(np.bincount(scene.labels[scene.test])) == [
            13361, 30065, 3830, 26609, 523, 1638, 1507,
        ]  # fmt: skip
        assert int(scene.test.sum()) == 77533

    def test_dfc2013_official_counts(self, shared_data):
        from pipeline.scene.readers import read_map

        d = shared_data / "houston2013_split"
        train = read_map(d / "2013_IEEE_GRSS_DF_Contest_Samples_TR.tif").data
        test = read_map(d / "2013_IEEE_GRSS_DF_Contest_Samples_VA.tif").data
        assert train.shape == test.shape == (349, 1905)
        assert int((train > 0).sum()) == 2832 and int((test > 0).sum()) == 12197
        assert not ((train > 0) & (test > 0)).any()
        assert len(np.unique(train[train > 0])) == 15


class TestMissingValues:
    """A cube's no-data value (declared by its file) and NaN/inf are missing values: refused by
    default, filled on request, and their pixels never train or test pixels."""

    @pytest.fixture
    def files(self, tmp_path):
        from tests.test_readers import _geotiff

        rng = np.random.default_rng(0)
        cube = rng.integers(100, 900, size=(16, 16, 5)).astype(np.int16)
        cube[:2, :3] = -32768  # a no-data corner, labelled below
        labels = np.repeat(np.arange(1, 5), 64).reshape(16, 16).astype(np.uint8)
        _geotiff(tmp_path / "cube.tif", cube, nodata=-32768)
        np.save(tmp_path / "gt.npy", labels)
        return tmp_path / "cube.tif", tmp_path / "gt.npy"

    def test_refused_by_default_naming_the_value(self, files):
        from pipeline.errors import NonFiniteError
        from pipeline.scene.preparation import build_scene

        with pytest.raises(NonFiniteError, match=r"6 pixels without data \(NaN/inf values, or "
                                                 r"every band at the file's no-data value "
                                                 r"-32768, or invalid in its mask\)"):  # fmt: skip
            build_scene(cube=files[0], labels=files[1], per_class=3)

    @pytest.mark.parametrize("split", [{"per_class": 3}, {"split": "fraction", "fraction": 0.9}])
    def test_filled_pixels_leave_the_split(self, files, split):
        from pipeline.errors import HsicacheWarning
        from pipeline.scene.preparation import build_scene

        with pytest.warns(HsicacheWarning, match="6 labelled pixels .* left out of the split"):
            scene = build_scene(cube=files[0], labels=files[1], nan_policy="band-mean", **split)
        corner = np.zeros((16, 16), bool)
        corner[:2, :3] = True
        assert (scene.labels[corner] == -1).all() and (scene.labels[~corner] >= 0).all()
        assert not (scene.train | scene.test)[corner].any()
        assert (scene.train | scene.test)[~corner].all()
        assert np.isfinite(scene.cube).all() and (scene.cube[corner] > 100).all()

    @pytest.mark.parametrize("mode", ["pca", "bands"])
    def test_the_rendering_never_shows_the_fill(self, files, mode):
        # The backbone sees the rendering: a filled value there is a flat patch whose edges
        # change the features of the pixels around it. Each pixel without data shows its nearest
        # pixel with data instead, and the statistics come from pixels with data alone.
        from pipeline.errors import HsicacheWarning
        from pipeline.scene.preparation import build_scene

        bands = {"rgb_bands": (4, 2, 0)} if mode == "bands" else {}
        kw = {"cube": files[0], "labels": files[1], "per_class": 3, "rgb_mode": mode, **bands}
        with pytest.warns(HsicacheWarning):
            zero = build_scene(nan_policy="zero", **kw)
        with pytest.warns(HsicacheWarning):
            mean = build_scene(nan_policy="band-mean", **kw)
        np.testing.assert_array_equal(zero.rgb, mean.rgb)
        rows, cols = np.nonzero(zero.no_data)
        data = np.argwhere(~zero.no_data)
        for r, c in zip(rows, cols, strict=True):  # a nearest pixel with data, by brute force
            d = ((data - (r, c)) ** 2).sum(axis=1)
            nearest = [zero.rgb[tuple(x)] for x in data[d == d.min()]]
            assert any(np.array_equal(zero.rgb[r, c], v) for v in nearest)
        assert len(rows) == 6
        assert zero.attrs["rendering"]["no_data_fill"] == "nearest"

    def test_a_scene_with_data_everywhere_renders_as_before(self, tmp_path):
        from pipeline.scene.render import render_rgb

        cube = np.random.default_rng(0).normal(size=(8, 8, 5))
        plain = render_rgb(cube)
        masked = render_rgb(cube, valid=np.ones((8, 8), bool))
        np.testing.assert_array_equal(plain[0], masked[0])
        assert "no_data_fill" not in plain[1].to_dict() == masked[1].to_dict()

    def test_a_dead_band_is_not_a_pixel_without_data(self, tmp_path):
        from pipeline.scene.preparation import build_scene
        from tests.test_readers import _geotiff

        cube = np.random.default_rng(1).integers(1, 9, size=(8, 8, 4)).astype(np.uint16)
        cube[..., 2] = 0  # a dead band, at the no-data value
        cube[0, 0] = 0  # one pixel without data
        _geotiff(tmp_path / "c.tif", cube, nodata=0)
        np.save(tmp_path / "gt.npy", np.repeat([1, 2], 32).reshape(8, 8))
        with pytest.warns(match="1 labelled pixel of .* left out of the split"):
            scene = build_scene(cube=tmp_path / "c.tif", labels=tmp_path / "gt.npy",
                                per_class=2, nan_policy="zero")  # fmt: skip
        assert scene.labels[0, 0] == -1 and (scene.labels.ravel()[1:] >= 0).all()

    def test_a_geotiff_mask_is_no_data_as_the_value_is(self, files, tmp_path):
        from pipeline.errors import NonFiniteError
        from pipeline.scene.preparation import build_scene, prepare
        from pipeline.scene.readers import read_cube
        from tests.test_readers import _geotiff

        cube = read_cube(files[0]).data  # the no-data corner at -32768
        corner = cube[..., 0] == -32768
        # the same cube without `nodata`: its corner holds values, marked invalid by a mask
        _geotiff(tmp_path / "masked.tif", np.where(corner[..., None], 500, cube), nodata=None,
                 mask=~corner)  # fmt: skip
        with pytest.raises(NonFiniteError, match=r"6 pixels without data"):
            build_scene(cube=tmp_path / "masked.tif", labels=files[1], per_class=3)
        scenes = []
        for name, path in (("value", files[0]), ("mask", tmp_path / "masked.tif")):
            with pytest.warns(match="6 labelled pixels .* left out of the split"):
                prepare(cube=path, labels=files[1], per_class=3, nan_policy="band-mean",
                        out=tmp_path / f"{name}.zarr")  # fmt: skip
            scenes.append(open_scene(tmp_path / f"{name}.zarr"))
        by_value, by_mask = scenes
        np.testing.assert_array_equal(by_mask.no_data, corner)
        for field in ("no_data", "labels", "train", "test", "cube"):
            np.testing.assert_array_equal(getattr(by_mask, field), getattr(by_value, field))
        assert by_mask.attrs["fingerprint"] == by_value.attrs["fingerprint"]

    def test_a_label_map_mask_is_unlabelled_as_the_value_is(self, files, tmp_path):
        from pipeline.scene.preparation import build_scene
        from tests.test_readers import _geotiff

        cube = np.random.default_rng(4).integers(100, 900, size=(16, 16, 5)).astype(np.int16)
        _geotiff(tmp_path / "c.tif", cube, nodata=None)
        labels = np.load(files[1])
        corner = np.zeros(labels.shape, bool)
        corner[:2, :3] = True
        _geotiff(tmp_path / "by_mask.tif", labels, nodata=None, mask=~corner)
        _geotiff(tmp_path / "by_value.tif", np.where(corner, 255, labels), nodata=255)
        scenes = []
        for name in ("by_value", "by_mask"):
            with pytest.warns(match="6 .*pixels .* read as unlabelled"):
                scene = build_scene(cube=tmp_path / "c.tif", labels=tmp_path / f"{name}.tif",
                                    per_class=3)  # fmt: skip
            scenes.append(scene)
        by_value, by_mask = scenes
        assert (by_mask.labels[corner] == -1).all() and (by_mask.labels[~corner] >= 0).all()
        for field in ("labels", "train", "test"):
            np.testing.assert_array_equal(getattr(by_mask, field), getattr(by_value, field))
        assert by_mask.no_data is None

    def test_per_band_no_data_values(self):
        from pipeline.scene.readers import _geotiff_nodata

        assert _geotiff_nodata((None, None)) is None
        assert _geotiff_nodata((-1.0, -1.0)) == -1.0
        per_band = _geotiff_nodata((-1.0, None))
        assert per_band[0] == -1.0 and np.isnan(per_band[1])

        from pipeline.scene.preparation import _no_data_pixels, _Source

        data = np.array([[[-1, -2], [-1, 5]], [[-1, -2], [-1, -2]]], dtype=np.int16)
        found = _no_data_pixels(_Source(data, {"source": "s"}, nodata=(-1.0, -2.0)))
        np.testing.assert_array_equal(found, [[True, False], [True, True]])

    def test_a_class_with_no_data_at_all_is_an_error(self, files, tmp_path):
        from pipeline.errors import LabelError
        from pipeline.scene.preparation import build_scene

        labels = np.load(files[1])
        labels[:2, :3] = 9  # class 9 lies only on the no-data corner
        np.save(tmp_path / "gt9.npy", labels)
        with pytest.raises(LabelError, match=r"every labelled pixel of class 9 has no data"):
            build_scene(cube=files[0], labels=tmp_path / "gt9.npy", nan_policy="zero",
                        split="fraction", fraction=0.5)  # fmt: skip

    def test_values_beyond_float32_are_missing_too(self, tmp_path):
        from pipeline.errors import NonFiniteError
        from pipeline.scene.preparation import build_scene

        cube = np.random.default_rng(2).random((6, 6, 3))
        cube[1, 1, 1] = 1e39  # a float64 sentinel: inf once the cube is float32
        np.save(tmp_path / "c.npy", cube)
        np.save(tmp_path / "gt.npy", np.repeat([1, 2], 18).reshape(6, 6))
        with pytest.raises(NonFiniteError, match=r"1 pixel without data \(NaN/inf values\)"):
            build_scene(cube=tmp_path / "c.npy", labels=tmp_path / "gt.npy", per_class=2)

    def test_official_masks_lose_them_too(self, files, tmp_path):
        from pipeline.scene.preparation import build_scene

        labels = np.load(files[1])
        train = np.where(np.arange(256).reshape(16, 16) % 7 == 0, labels, 0)
        np.save(tmp_path / "tr.npy", train)
        np.save(tmp_path / "te.npy", np.where(train > 0, 0, labels))
        with pytest.warns(match="left out of the split"):
            scene = build_scene(cube=files[0], train_mask=tmp_path / "tr.npy",
                                test_mask=tmp_path / "te.npy", nan_policy="zero")  # fmt: skip
        assert train[:2, :3].any() and not scene.train[:2, :3].any()
        assert not scene.test[:2, :3].any()
        np.testing.assert_array_equal(scene.train[2:], train[2:] > 0)


def test_wavelengths_of_another_length_are_ignored_with_a_warning(scenes, tmp_path):
    from pipeline.errors import HsicacheWarning
    from pipeline.scene.preparation import build_scene

    header = re.sub(r"wavelength = \{[^}]*\}", "wavelength = {450, 500, 550}",
                    (scenes / "tiny_bsq.hdr").read_text())  # fmt: skip
    (tmp_path / "c.hdr").write_text(header)
    (tmp_path / "c.img").write_bytes((scenes / "tiny_bsq.img").read_bytes())
    with pytest.warns(HsicacheWarning, match=r"gives 3 wavelengths for 6 bands: they are ignored"):
        scene = build_scene(cube=tmp_path / "c.hdr", labels=scenes / "tiny_gt.npy", per_class=2)
    assert scene.wavelengths is None


def test_a_label_map_placed_elsewhere_is_refused(tmp_path):
    from pipeline.errors import ShapeMismatchError
    from pipeline.scene.preparation import build_scene
    from tests.test_readers import _geotiff

    cube = np.random.default_rng(0).integers(1, 9, size=(8, 8, 4)).astype(np.int16)
    labels = np.repeat([1, 2], 32).reshape(8, 8).astype(np.uint8)
    _geotiff(tmp_path / "cube.tif", cube, nodata=None)
    _geotiff(tmp_path / "here.tif", labels, nodata=None)
    _geotiff(tmp_path / "there.tif", labels, nodata=None, x0=700000)
    build_scene(cube=tmp_path / "cube.tif", labels=tmp_path / "here.tif", per_class=2)
    with pytest.raises(ShapeMismatchError, match=r"there.tif` is georeferenced differently"):
        build_scene(cube=tmp_path / "cube.tif", labels=tmp_path / "there.tif", per_class=2)


def test_a_test_mask_placed_elsewhere_is_refused(tmp_path):
    from pipeline.errors import ShapeMismatchError
    from pipeline.scene.preparation import build_scene
    from tests.test_readers import _geotiff

    cube = np.random.default_rng(0).integers(1, 9, size=(8, 8, 4)).astype(np.int16)
    train = np.zeros((8, 8), np.uint8)
    train[0, :2], train[7, :2] = 1, 2
    test = np.where(train > 0, 0, np.repeat([1, 2], 32).reshape(8, 8)).astype(np.uint8)
    _geotiff(tmp_path / "cube.tif", cube, nodata=None)
    _geotiff(tmp_path / "tr.tif", train, nodata=None)
    _geotiff(tmp_path / "te.tif", test, nodata=None, x0=600015)  # half a pixel off
    with pytest.raises(ShapeMismatchError, match=r"mask `.*te.tif` is georeferenced differently"
                                                 r".*its transform"):  # fmt: skip
        build_scene(cube=tmp_path / "cube.tif", train_mask=tmp_path / "tr.tif",
                    test_mask=tmp_path / "te.tif")  # fmt: skip


def test_pixels_without_data_have_no_class_in_maps_and_are_never_suggested(tmp_path):
    import rasterio

    from pipeline.evaluation.scoring import predict_map
    from pipeline.heads.training import train_head
    from pipeline.scene.core import open_scene
    from pipeline.scene.preparation import prepare
    from tests.test_readers import _geotiff

    rng = np.random.default_rng(3)
    labels = np.repeat([1, 2], 32).reshape(8, 8).astype(np.uint8)
    cube = (rng.normal(size=(8, 8, 4)) + 3 * labels[..., None]).astype(np.float32) * 100
    cube[:2, :2] = -9999
    _geotiff(tmp_path / "c.tif", cube, nodata=-9999)
    np.save(tmp_path / "gt.npy", labels)
    with pytest.warns(match="left out of the split"):
        prepare(cube=tmp_path / "c.tif", labels=tmp_path / "gt.npy", per_class=3,
                nan_policy="band-mean", out=tmp_path / "s.zarr")  # fmt: skip
    sc = open_scene(tmp_path / "s.zarr")
    assert sc.no_data[:2, :2].all() and sc.no_data.sum() == 4
    stored = xr.open_zarr(tmp_path / "s.zarr", consolidated=False)["band_mean"].values
    np.testing.assert_allclose(stored, cube[~sc.no_data].mean(axis=0), rtol=1e-5)  # data only
    train_head(scene=tmp_path / "s.zarr", cache=None, head="logreg", params={"use": "spectral"},
               out=tmp_path / "h")  # fmt: skip
    predict_map(scene=tmp_path / "s.zarr", cache=None, head=tmp_path / "h",
                out=tmp_path / "m.npy", confidence=tmp_path / "c.npy",
                geotiff=tmp_path / "m.tif", png=tmp_path / "m.png")  # fmt: skip
    found = np.load(tmp_path / "m.npy")
    assert (found[:2, :2] == -1).all() and set(np.unique(found[sc.no_data == 0])) <= {1, 2}
    assert np.isnan(np.load(tmp_path / "c.npy")[:2, :2]).all()
    with rasterio.open(tmp_path / "m.tif") as ds:
        assert ds.nodata == -1 and (ds.read(1)[:2, :2] == -1).all()
    from pipeline.errors import ConfigError
    from pipeline.evaluation.suggest import suggest_pixels
    from pipeline.heads.training import open_inputs

    inputs = open_inputs(tmp_path / "s.zarr", None, None)
    picks = suggest_pixels(inputs, "logreg", {"use": "spectral"}, n=54)  # 64 - 6 train - 4
    assert not sc.no_data[picks["rows"], picks["cols"]].any()
    with pytest.raises(ConfigError, match="more than the 54 pixels"):
        suggest_pixels(inputs, "logreg", {"use": "spectral"}, n=55)


def test_the_map_geotiff_names_and_colours_its_classes(tmp_path):
    import json

    import rasterio
    from matplotlib.colors import to_hex

    from pipeline.evaluation.scoring import predict_map
    from pipeline.heads.training import train_head
    from pipeline.scene.plots import class_colors
    from pipeline.scene.preparation import prepare
    from tests.test_readers import _geotiff

    rng = np.random.default_rng(5)
    labels = np.repeat([2, 5, 7], [24, 20, 20]).reshape(8, 8).astype(np.uint8)
    cube = (rng.normal(size=(8, 8, 4)) + 3 * labels[..., None]).astype(np.float32) * 100
    _geotiff(tmp_path / "c.tif", cube, nodata=None)
    np.save(tmp_path / "gt.npy", labels)
    prepare(cube=tmp_path / "c.tif", labels=tmp_path / "gt.npy", per_class=3,
            class_names=["asphalt", "grass, healthy", "Wasser"],
            out=tmp_path / "s.zarr")  # fmt: skip
    train_head(scene=tmp_path / "s.zarr", cache=None, head="logreg", params={"use": "spectral"},
               out=tmp_path / "h")  # fmt: skip
    predict_map(scene=tmp_path / "s.zarr", cache=None, head=tmp_path / "h",
                out=tmp_path / "m.npy", geotiff=tmp_path / "m.tif")  # fmt: skip
    with rasterio.open(tmp_path / "m.tif") as ds:
        assert ds.dtypes == ("int32",) and ds.nodata == -1  # the values are the class ids
        np.testing.assert_array_equal(ds.read(1), np.load(tmp_path / "m.npy"))
        tags = ds.tags(1)
    names = {"2": "asphalt", "5": "grass, healthy", "7": "Wasser"}
    assert json.loads(tags["CLASS_NAMES"]) == names
    colours = dict(zip(names, (to_hex(c) for c in class_colors(3)), strict=True))  # the PNG's
    assert json.loads(tags["CLASS_COLORS"]) == colours


def test_an_envi_classification_names_its_classes(scenes, tmp_path):
    # An ENVI classification header names its class ids: `class names` item i is id i.
    from pipeline.scene.preparation import build_scene

    labels = np.load(scenes / "tiny_gt.npy")  # ids 0 (unlabelled), 1, 10, 11
    labels.astype(np.uint8).tofile(tmp_path / "gt.img")
    names = ["Unclassified", "corn", *(f"unused {i}" for i in range(2, 10)), "wheat", "soy"]
    (tmp_path / "gt.hdr").write_text(
        "ENVI\nsamples = 10\nlines = 12\nbands = 1\nheader offset = 0\n"
        "file type = ENVI Classification\ndata type = 1\ninterleave = bsq\nbyte order = 0\n"
        f"classes = {len(names)}\nclass names = {{{', '.join(names)}}}\n"
    )
    scene = build_scene(cube=scenes / "tiny_bsq.hdr", labels=tmp_path / "gt.hdr", per_class=1)
    assert list(scene.class_ids) == [1, 10, 11]
    assert scene.class_names == ["corn", "wheat", "soy"]
    given = build_scene(cube=scenes / "tiny_bsq.hdr", labels=tmp_path / "gt.hdr", per_class=1,
                        class_names=["a", "b", "c"])  # fmt: skip
    assert given.class_names == ["a", "b", "c"]  # --class-names wins


def test_bench_prepare_prints_its_figures(runner):
    """`hsicache bench prepare` on a tiny synthetic cube: seconds and the child's peak memory
    (the figures themselves are for the benchmark run, docs/results.md)."""
    import json

    result = runner.invoke(app, ["bench", "prepare", "--size", "24", "--bands", "6", "--json"])
    assert result.exit_code == 0, result.output
    rep = json.loads(result.output)
    assert set(rep) == {"seconds", "peak_rss_gb", "cube_gb", "peak_to_cube"}
    assert rep["seconds"] > 0 and rep["peak_rss_gb"] > 0
    assert rep["cube_gb"] == pytest.approx(24 * 24 * 6 * 4 / 2**30)
    assert rep["peak_to_cube"] == pytest.approx(rep["peak_rss_gb"] / rep["cube_gb"])
