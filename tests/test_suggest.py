"""``suggest``: the next pixels to label, and the simulated labelling loop."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from pipeline.evaluation.suggest import choose
from pipeline.scene.core import open_scene
from pipeline.scene.preparation import prepare
from stages.cli import app


@pytest.fixture(scope="module")
def ambiguous(tmp_path_factory) -> Path:
    """40 x 40 pixels: class 1 on the left, class 2 on the right, and a 20 x 30 region at the
    bottom whose spectra are an even mix of both (labelled class 1): the only uncertain place."""
    d = tmp_path_factory.mktemp("ambiguous")
    rng = np.random.default_rng(0)
    a, b = np.array([1.0, 2.0, 3.0]), np.array([3.0, 2.0, 1.0])
    cube = np.where(np.arange(40)[None, :, None] < 20, a, b) * np.ones((40, 40, 1))
    cube[20:40, 5:35] = (a + b) / 2
    cube = (cube + rng.normal(0, 0.05, cube.shape)).astype(np.float32)
    labels = np.where(np.arange(40)[None, :] < 20, 1, 2) * np.ones((40, 40), int)
    labels[20:40, 5:35] = 1
    train = np.zeros((40, 40), np.uint8)
    train[2:5, 2:5] = 1  # clear class 1
    train[2:5, 35:38] = 1  # clear class 2
    np.save(d / "cube.npy", cube)
    np.save(d / "labels.npy", labels)
    np.save(d / "train.npy", train)
    np.save(d / "test.npy", (1 - train).astype(np.uint8))
    prepare(out=d / "scene.zarr", cube=d / "cube.npy", labels=d / "labels.npy",
            train_mask=d / "train.npy", test_mask=d / "test.npy")  # fmt: skip
    (d / "p.yaml").write_text("heads:\n  logreg: {use: spectral}\n")
    return d / "scene.zarr"


def _suggest(runner, scene: Path, tmp_path: Path, *extra: str):
    params = str(scene.parent / "p.yaml")
    return runner.invoke(app, ["suggest", "--scene", str(scene), "--head", "logreg", "--params",
                               params, "--out", str(tmp_path / "next.csv"), *extra])  # fmt: skip


class TestSuggest:
    def test_picks_the_ambiguous_region_never_a_train_pixel(self, runner, ambiguous, tmp_path):
        result = _suggest(
            runner, ambiguous, tmp_path, "--n", "12", "--png", str(tmp_path / "n.png")
        )
        assert result.exit_code == 0, result.output
        assert f"next.csv, {tmp_path / 'n.png'}:" in result.stdout  # every output it wrote
        rows = list(csv.DictReader((tmp_path / "next.csv").open()))
        assert list(rows[0]) == ["row", "col", "x", "y", "predicted_class", "score"]
        picked = {(int(r["row"]), int(r["col"])) for r in rows}
        assert len(rows) == len(picked) == 12  # exactly --n, distinct
        train = open_scene(ambiguous).train
        assert not any(train[p] for p in picked)
        assert all(20 <= r < 40 and 5 <= c < 35 for r, c in picked)  # the ambiguous region
        assert (tmp_path / "n.png").stat().st_size > 1000

    def test_geojson_points_land_on_their_pixels(self, runner, ambiguous, tmp_path):
        import rasterio
        from rasterio.transform import from_origin
        from rasterio.warp import transform

        d = ambiguous.parent
        cube = np.load(d / "cube.npy")
        crs, at = "EPSG:32610", from_origin(500_000.0, 4_200_000.0, 3.7, 3.7)
        with rasterio.open(tmp_path / "cube.tif", "w", driver="GTiff", height=40, width=40,
                           count=3, dtype="float32", crs=crs, transform=at) as ds:  # fmt: skip
            ds.write(cube.transpose(2, 0, 1))
        prepare(out=tmp_path / "geo.zarr", cube=tmp_path / "cube.tif", labels=d / "labels.npy",
                train_mask=d / "train.npy", test_mask=d / "test.npy")  # fmt: skip
        shutil.copy(d / "p.yaml", tmp_path / "p.yaml")
        result = _suggest(runner, tmp_path / "geo.zarr", tmp_path, "--n", "12", "--geojson",
                          str(tmp_path / "n.geojson"))  # fmt: skip
        assert result.exit_code == 0, result.output
        geo = json.loads((tmp_path / "n.geojson").read_text())
        assert geo["type"] == "FeatureCollection" and len(geo["features"]) == 12
        lon, lat = zip(*(f["geometry"]["coordinates"] for f in geo["features"]), strict=True)
        xs, ys = transform("EPSG:4326", crs, list(lon), list(lat))
        for f, x, y in zip(geo["features"], xs, ys, strict=True):
            row, col = rasterio.transform.rowcol(at, x, y)
            assert (row, col) == (f["properties"]["row"], f["properties"]["col"])

    def test_geojson_of_a_scene_without_crs_is_refused(self, runner, ambiguous, tmp_path):
        result = _suggest(runner, ambiguous, tmp_path, "--geojson", str(tmp_path / "n.geojson"))
        assert result.exit_code == 2
        assert "has no CRS/transform" in result.output and "drop `--geojson`" in result.output
        assert list(tmp_path.iterdir()) == []

    def test_diversity_spreads_the_picks(self):
        rng = np.random.default_rng(0)
        proba = np.full((100, 2), 0.5)  # equally uncertain everywhere
        features = np.r_[rng.normal(0, 0.1, (90, 2)), rng.normal(5, 0.1, (10, 2))]
        picks, _ = choose(proba, features, features[:0], 4)
        assert (picks >= 90).any()  # the far cluster gets a pick, not only the big one
        assert len(set(picks.tolist())) == 4

    @pytest.mark.parametrize("extra,culprit", [
        (["--n", "0"], "`--n` must be"),
        (["--n", "5000"], "`--n` 5000 is more than the 1582 pixels"),
        (["--head", "nosuch"], "unknown head `nosuch`"),
        (["--simulate", "0"], "`--simulate` must be"),
        (["--simulate", "400", "--n", "10"], "more than the 791 pixels the loop can label"),
    ])  # fmt: skip
    def test_bad_input_is_one_line(self, runner, ambiguous, tmp_path, extra, culprit):
        result = _suggest(runner, ambiguous, tmp_path, *extra)
        assert result.exit_code == 2 and culprit in result.stderr, result.output
        assert len(result.stderr.strip().splitlines()) == 1 and not list(tmp_path.iterdir())

    def test_a_head_without_probabilities_is_named_before_any_fit(self, runner, ambiguous,
                                                                   tmp_path):  # fmt: skip
        result = runner.invoke(app, ["suggest", "--scene", str(ambiguous), "--head", "svm",
                                     "--params", str(tmp_path / "none.yaml"), "--out",
                                     str(tmp_path / "n.csv")])  # fmt: skip
        assert result.exit_code == 2, result.output
        (tmp_path / "p.yaml").write_text("heads:\n  svm: {use: spectral}\n")
        result = runner.invoke(app, ["suggest", "--scene", str(ambiguous), "--head", "svm",
                                     "--params", str(tmp_path / "p.yaml"), "--out",
                                     str(tmp_path / "n.csv")])  # fmt: skip
        assert result.exit_code == 2 and "svm: add `probability: true`" in result.stderr
        assert not (tmp_path / "n.csv").exists()

    def test_simulation_writes_both_curves(self, runner, ambiguous, tmp_path):
        out = tmp_path / "sim.json"
        result = runner.invoke(app, ["suggest", "--scene", str(ambiguous), "--head", "logreg",
                                     "--params", str(ambiguous.parent / "p.yaml"), "--n", "4",
                                     "--simulate", "2", "--seeds", "0", "--out", str(out),
                                     "--png", str(tmp_path / "sim.png")])  # fmt: skip
        assert result.exit_code == 0, result.output
        body = json.loads(out.read_text())
        assert body["labels"] == [18, 22, 26]
        for strategy in ("suggested", "random"):
            assert len(body[strategy]["oa_mean"]) == 3
        assert body["suggested"]["oa_mean"][-1] > body["suggested"]["oa_mean"][0]
        assert "never labelled" in body["protocol"]["scoring"]
