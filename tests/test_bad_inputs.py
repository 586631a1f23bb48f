"""The bad-input matrix: every stage, fed a bad file, format, parameter key or value, a head on
another scene's cache, or a cache with a missing or corrupt chunk, answers with exit code 2 and
one line naming the culprit, shows no traceback, and leaves no output behind."""

from __future__ import annotations

import errno
import shutil
from pathlib import Path

import pytest

from pipeline.features.extract import extract_features
from pipeline.heads.training import train_head
from pipeline.scene.preparation import prepare
from stages.cli import app

TINY = ["--backbone", "builtin:tiny"]


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict[str, str]:
    """Two scenes of different images with their caches, a head, and broken files."""
    d = tmp_path_factory.mktemp("world")
    kw = dict(backbone="builtin:tiny", timesteps=[0], sites=["up1.res1"], stride=16,
              chunk_tiles=2)  # fmt: skip
    prepare(out=d / "a.zarr", builtin="synthetic", per_class=3, seed=0)
    prepare(out=d / "b.zarr", builtin="synthetic", per_class=3, seed=0, gamma=0.5)
    extract_features(scene=d / "a.zarr", out=d / "fa.zarr", **kw)
    extract_features(scene=d / "b.zarr", out=d / "fb.zarr", **kw)
    train_head(scene=d / "a.zarr", cache=d / "fa.zarr", head="logreg", out=d / "head")
    for name in ("missing", "corrupt"):
        shutil.copytree(d / "fa.zarr", d / f"f{name}.zarr")
    chunk = d / "fmissing.zarr" / "t0" / "up1.res1" / "c" / "1" / "1" / "0"
    chunk.unlink()
    (d / "fcorrupt.zarr" / "t0" / "up1.res1" / "c" / "0" / "1" / "0").write_bytes(b"\x13" * 77)
    (d / "garbage.mat").write_bytes(b"this is not a MATLAB file")
    (d / "unknown_key.yaml").write_text("extract:\n  strides: 8\n")
    (d / "wrong_type.yaml").write_text("extract:\n  stride: eight\n")
    (d / "not_mapping.yaml").write_text("- extract\n- 8\n")
    (d / "broken.yaml").write_text("extract: {stride: [8\n")
    (d / "misspelt.yaml").write_text("extrac:\n  stride: 8\nheds:\n  spectral: {width: 8}\n")
    return {k: str(d / k) for k in ("a.zarr", "b.zarr", "fa.zarr", "fb.zarr", "head",
                                    "fmissing.zarr", "fcorrupt.zarr", "garbage.mat",
                                    "unknown_key.yaml", "wrong_type.yaml", "not_mapping.yaml",
                                    "broken.yaml", "misspelt.yaml")} | {"dir": str(d)}  # fmt: skip


def _extract(w, *extra, out="new.zarr"):
    return ["extract", "--scene", w["a.zarr"], *TINY, "--sites", "up1.res1",
            "--out", f"{w['dir']}/{out}", *extra]  # fmt: skip


def _prepare(w, *extra):
    return ["prepare", "--out", f"{w['dir']}/new.zarr", *extra]


def _predict(w, cache, *extra):
    return ["predict", "--scene", w["a.zarr"], "--features", w[cache], "--head", w["head"],
            "--out", f"{w['dir']}/map.npy", *extra]  # fmt: skip


# (case id, arguments, text the one line must hold, outputs that must not exist)
CASES = [
    # files and formats
    ("prepare-missing-cube", lambda w: _prepare(w, "--cube", "/no/such/cube.mat"),
     "/no/such/cube.mat", ["new.zarr"]),
    ("prepare-garbage-mat", lambda w: _prepare(w, "--cube", w["garbage.mat"]),
     "garbage.mat", ["new.zarr"]),
    ("prepare-unknown-builtin", lambda w: _prepare(w, "--builtin", "atlantis"),
     "atlantis", ["new.zarr"]),
    ("extract-missing-scene", lambda w: [*_extract(w)[:2], "/no/scene.zarr", *_extract(w)[3:]],
     "/no/scene.zarr", ["new.zarr"]),
    ("extract-scene-is-a-cache", lambda w: [*_extract(w)[:2], w["fa.zarr"], *_extract(w)[3:]],
     "fa.zarr", ["new.zarr"]),
    ("extract-unknown-backbone", lambda w: [*_extract(w)[:3], "--backbone", "/no/unet.pt",
                                            *_extract(w)[5:]], "/no/unet.pt", ["new.zarr"]),
    # parameter values
    ("extract-unknown-site", lambda w: [*_extract(w)[:5], "--sites", "up9.res9",
                                        *_extract(w)[7:]], "up9.res9", ["new.zarr"]),
    ("extract-timestep-out-of-range", lambda w: _extract(w, "--timesteps", "1000"),
     "timestep 1000", ["new.zarr"]),
    ("extract-timestep-not-integer", lambda w: _extract(w, "--timesteps", "0,early"),
     "--timesteps", ["new.zarr"]),
    ("extract-stride-out-of-range", lambda w: _extract(w, "--stride", "40"),
     "--stride", ["new.zarr"]),
    ("extract-patch-not-multiple", lambda w: _extract(w, "--patch", "31", "--stride", "31"),
     "--patch", ["new.zarr"]),
    ("extract-stride-wrong-type", lambda w: _extract(w, "--stride", "wide"),
     "--stride", ["new.zarr"]),
    ("extract-unknown-option", lambda w: _extract(w, "--strides", "8"),
     "--strides", ["new.zarr"]),
    ("extract-workers-zero", lambda w: _extract(w, "--workers", "0"),
     "--workers", ["new.zarr"]),
    ("extract-bad-resources", lambda w: _extract(w, "--workers", "1", "--resources", "GPU"),
     "--resources", ["new.zarr"]),
    ("extract-chunk-tiles-zero", lambda w: _extract(w, "--chunk-tiles", "0"),
     "--chunk-tiles", ["new.zarr"]),
    ("extract-missing-option", lambda w: ["extract", "--scene", w["a.zarr"], *TINY,
                                          "--out", f"{w['dir']}/new.zarr"], "--sites", ["new.zarr"]),
    # params.yaml keys and values
    ("params-unknown-key", lambda w: _extract(w, "--params", w["unknown_key.yaml"]),
     "extract.strides", ["new.zarr"]),
    ("params-wrong-type", lambda w: _extract(w, "--params", w["wrong_type.yaml"]),
     "`extract.stride` in", ["new.zarr"]),
    ("params-not-a-mapping", lambda w: _extract(w, "--params", w["not_mapping.yaml"]),
     "not_mapping.yaml", ["new.zarr"]),
    ("params-broken-yaml", lambda w: _extract(w, "--params", w["broken.yaml"]),
     "broken.yaml", ["new.zarr"]),
    ("params-misspelt-section", lambda w: _extract(w, "--params", w["misspelt.yaml"]),
     "has `extrac:`", ["new.zarr"]),
    ("params-misspelt-heads", lambda w: ["train", "--scene", w["a.zarr"], "--head", "spectral",
                                         "--params", w["misspelt.yaml"], "--out",
                                         f"{w['dir']}/h2"], "has `heds:`", ["h2"]),
    ("suggest-seeds-without-simulate", lambda w: ["suggest", "--scene", w["a.zarr"], "--features",
                                                  w["fa.zarr"], "--head", "logreg", "--n", "2",
                                                  "--out", f"{w['dir']}/s.csv", "--seeds", "1"],
     "`--seeds` sets the loop of `--simulate ROUNDS`", ["s.csv"]),
    ("params-missing-file", lambda w: _extract(w, "--params", "/no/params.yaml"),
     "/no/params.yaml", ["new.zarr"]),
    # heads
    ("train-unknown-head", lambda w: ["train", "--scene", w["a.zarr"], "--features", w["fa.zarr"],
                                      "--head", "transformer", "--out", f"{w['dir']}/h2"],
     "transformer", ["h2"]),
    ("train-bad-head-params", lambda w: ["train", "--scene", w["a.zarr"], "--head", "spectral",
                                         "--head-params", "{width: 8}", "--out", f"{w['dir']}/h2"],
     "--head-params", ["h2"]),
    ("train-unknown-head-param", lambda w: ["train", "--scene", w["a.zarr"], "--head", "spectral",
                                            "--head-params", '{"widht": 8}',
                                            "--out", f"{w['dir']}/h2"], "widht", ["h2"]),
    ("train-unknown-cached-site", lambda w: ["train", "--scene", w["a.zarr"], "--features",
                                             w["fa.zarr"], "--head", "film", "--sites", "mid",
                                             "--out", f"{w['dir']}/h2"], "mid", ["h2"]),
    ("evaluate-head-on-another-scenes-cache",
     lambda w: ["evaluate", "--scene", w["b.zarr"], "--features", w["fb.zarr"], "--head",
                w["head"], "--metrics", f"{w['dir']}/m.json"], "head", ["m.json"]),
    ("evaluate-cache-of-another-scene",
     lambda w: ["evaluate", "--scene", w["a.zarr"], "--features", w["fb.zarr"], "--head",
                w["head"], "--metrics", f"{w['dir']}/m.json"], "fb.zarr", ["m.json"]),
    ("evaluate-missing-head", lambda w: ["evaluate", "--scene", w["a.zarr"], "--features",
                                         w["fa.zarr"], "--head", "/no/head",
                                         "--metrics", f"{w['dir']}/m.json"], "/no/head", ["m.json"]),
    # broken caches
    ("predict-missing-chunk", lambda w: _predict(w, "fmissing.zarr"), "fmissing.zarr",
     ["map.npy"]),
    ("predict-corrupt-chunk", lambda w: _predict(w, "fcorrupt.zarr"), "fcorrupt.zarr",
     ["map.npy"]),
    ("evaluate-corrupt-chunk", lambda w: ["evaluate", "--scene", w["a.zarr"], "--features",
                                          w["fcorrupt.zarr"], "--head", w["head"],
                                          "--seeds", "0,1", "--metrics", f"{w['dir']}/m.json"],
     "fcorrupt.zarr", ["m.json"]),
    ("cache-info-not-a-cache", lambda w: ["cache", "info", w["a.zarr"]], "a.zarr", []),
    ("bench-heads-unknown-head", lambda w: ["bench", "heads", "--scene", w["a.zarr"],
                                            "--features", w["fa.zarr"], "--heads", "nope"],
     "nope", []),
    ("bench-heads-zero-repeats", lambda w: ["bench", "heads", "--scene", w["a.zarr"],
                                            "--features", w["fa.zarr"], "--repeats", "0"],
     "--repeats", []),
]  # fmt: skip


@pytest.mark.parametrize(("args", "culprit", "outputs"), [c[1:] for c in CASES],
                         ids=[c[0] for c in CASES])  # fmt: skip
def test_bad_input_is_one_line_exit_2_nothing_left(runner, world, args, culprit, outputs):
    before = sorted(p.name for p in Path(world["dir"]).iterdir())
    result = runner.invoke(app, args(world))
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ") and culprit in lines[0], lines[0]
    assert ("Traceback" not in result.output and result.exception is None) or isinstance(
        result.exception, SystemExit
    )
    for name in outputs:
        assert not (Path(world["dir"]) / name).exists(), name
    assert sorted(p.name for p in Path(world["dir"]).iterdir()) == before  # no temp leftovers


def test_the_matrix_covers_every_stage():
    stages = {c[1]({"dir": "d", **dict.fromkeys(("a.zarr", "fa.zarr", "fb.zarr", "b.zarr",
                                                 "head", "fmissing.zarr", "fcorrupt.zarr",
                                                 "garbage.mat", "unknown_key.yaml",
                                                 "wrong_type.yaml", "not_mapping.yaml",
                                                 "broken.yaml", "misspelt.yaml"), "x")})[0] for c in CASES}  # fmt: skip
    assert {"prepare", "extract", "train", "evaluate", "predict", "cache", "bench"} <= stages
    assert len(CASES) >= 20


def _no_space(*_args, **_kwargs):
    raise OSError(errno.ENOSPC, "No space left on device", "somewhere")


@pytest.mark.parametrize(
    ("args", "breaks", "outputs"),
    [
        (lambda w: ["predict", "--scene", w["a.zarr"], "--features", w["fa.zarr"], "--head",
                    w["head"], "--out", f"{w['dir']}/m.npy", "--confidence",
                    f"{w['dir']}/c.npy", "--png", f"{w['dir']}/m.png"],
         "pipeline.evaluation.scoring._write_png", ["m.npy", "c.npy", "m.png"]),
        (lambda w: ["evaluate", "--scene", w["a.zarr"], "--features", w["fa.zarr"], "--head",
                    w["head"], "--metrics", f"{w['dir']}/m.json", "--plot",
                    f"{w['dir']}/m.csv", "--png", f"{w['dir']}/m.png"],
         "pipeline.evaluation.scoring.plot_confusion", ["m.json", "m.csv", "m.png"]),
    ],
    ids=["predict", "evaluate"],
)  # fmt: skip
def test_a_failure_at_the_last_output_leaves_none(runner, world, monkeypatch, args, breaks,
                                                  outputs):  # fmt: skip
    monkeypatch.setattr(breaks, _no_space)
    before = sorted(p.name for p in Path(world["dir"]).iterdir())
    result = runner.invoke(app, args(world))
    assert result.exit_code == 2, result.output
    assert result.stderr == "error: No space left on device: `somewhere`\n"  # not even a blank line
    assert sorted(p.name for p in Path(world["dir"]).iterdir()) == before


def _tif(path: Path, data, crs: str) -> None:
    import rasterio
    from rasterio.transform import from_origin

    bands = data[None] if data.ndim == 2 else data.transpose(2, 0, 1)
    with rasterio.open(path, "w", driver="GTiff", height=bands.shape[1], width=bands.shape[2],
                       count=bands.shape[0], dtype=bands.dtype, crs=crs,
                       transform=from_origin(600000, 5360000, 30, 30)) as ds:  # fmt: skip
        ds.write(bands)


def test_a_label_map_given_as_the_cube_is_refused(runner, tmp_path):
    import numpy as np

    labels = np.repeat([1, 2], 32).reshape(8, 8).astype(np.uint8)
    _tif(tmp_path / "gt.tif", labels, "EPSG:32632")
    result = runner.invoke(app, ["prepare", "--cube", str(tmp_path / "gt.tif"), "--labels",
                                 str(tmp_path / "gt.tif"), "--out", str(tmp_path / "s.zarr")])  # fmt: skip
    assert result.exit_code == 2
    assert "gt.tif` has 1 band: hsicache classifies spectral cubes of at least 3" in result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gt.tif"]


def test_a_crs_mismatch_names_both_crs(runner, tmp_path):
    import numpy as np

    cube = np.random.default_rng(0).integers(1, 9, size=(8, 8, 4)).astype(np.int16)
    _tif(tmp_path / "cube.tif", cube, "EPSG:32632")
    _tif(tmp_path / "gt.tif", np.repeat([1, 2], 32).reshape(8, 8).astype(np.uint8), "EPSG:32633")
    result = runner.invoke(app, ["prepare", "--cube", str(tmp_path / "cube.tif"), "--labels",
                                 str(tmp_path / "gt.tif"), "--out", str(tmp_path / "s.zarr")])  # fmt: skip
    assert result.exit_code == 2
    assert "its CRS is EPSG:32633, the cube's EPSG:32632" in result.stderr
