"""A user's files are never lost and a failure is never a traceback.

Each case of the matrix runs one command on a bad or odd input inside a folder that looks like a
user's project (inputs, earlier outputs, unrelated files) and checks: exit code 2, exactly one
line on stderr naming the culprit, no traceback, and every file of the folder byte-identical
afterwards with nothing added. Then: an ``ENOSPC``/``EROFS`` at the write step of every
command, a bug reported as an internal error, degenerate scenes, damaged stores, and two
identical runs writing identical stores.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from pipeline.features.extract import extract_features
from pipeline.heads.training import train_head
from pipeline.io.outputs import mark_npy
from pipeline.scene.preparation import prepare
from stages.cli import app
from tests.conftest import SCENES

TINY = ["--backbone", "builtin:tiny", "--sites", "up1.res1", "--stride", "16"]
PRETRAIN = ["--no-builtin-photos", "--block-out-channels", "8,16", "--crop", "16",
            "--sample-size", "16", "--batch-size", "2", "--steps", "2"]  # fmt: skip


def _snapshot(root: Path) -> dict[str, str]:
    """Every path under ``root``: files by content hash, folders and links by kind."""
    seen = {}
    for p in sorted(root.rglob("*")):
        rel = str(p.relative_to(root))
        if p.is_symlink():
            seen[rel] = f"link:{p.readlink()}"
        elif p.is_dir():
            seen[rel] = "dir"
        else:
            seen[rel] = hashlib.sha256(p.read_bytes()).hexdigest()
    return seen


def _write_envi(folder: Path, stem: str, header_edits: dict[str, str | None]) -> Path:
    """A copy of the tiny BSQ fixture whose header lines ``key`` are replaced (None: dropped)."""
    header = (SCENES / "tiny_bsq.hdr").read_text()
    for key, value in header_edits.items():
        lines = [ln for ln in header.splitlines() if not ln.startswith(key)]
        header = "\n".join(lines + ([f"{key} = {value}"] if value is not None else [])) + "\n"
    shutil.copy(SCENES / "tiny_bsq.img", folder / f"{stem}.img")
    (folder / f"{stem}.hdr").write_text(header)
    return folder / f"{stem}.hdr"


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict[str, str]:
    """A user's project: input files, hsicache outputs, their own files, and broken things."""
    d = tmp_path_factory.mktemp("project")
    data = d / "data"
    data.mkdir()
    shutil.copy(SCENES / "tiny.npy", data / "cube.npy")
    shutil.copy(SCENES / "tiny_gt.npy", data / "gt.npy")
    cube, gt = np.load(data / "cube.npy"), np.load(data / "gt.npy")
    np.save(data / "one_class.npy", (gt > 0).astype(np.uint8))
    np.save(data / "zeros.npy", np.zeros_like(cube))
    np.save(data / "huge_ids.npy", np.where(gt > 0, np.uint64(2**64 - 1), np.uint64(0)))
    _write_envi(data, "xyz", {"interleave": "xyz"})
    _write_envi(data, "bands60", {"bands": "60", "wavelength": None})
    notes = d / "notes"
    notes.mkdir()
    (notes / "todo.txt").write_text("my own notes\n")
    (d / "photos").mkdir()
    from skimage.io import imsave

    photo = np.random.default_rng(0).integers(0, 255, size=(48, 48, 3), dtype=np.uint8)
    imsave(d / "photos" / "holiday.png", photo, check_contrast=False)
    (d / "user.png").write_bytes(b"\x89PNG\r\n\x1a\n a png hsicache did not write")
    (d / "user.json").write_text('{"oa": 0.99, "mine": true}\n')
    (d / "user.csv").write_text("actual;predicted\n")
    np.save(d / "user.npy", np.arange(10))
    (d / "count_is_true.yaml").write_text("prepare:\n  per_class: true\n")
    (d / "compare.json").write_text('{"format": "hsicache-metrics/1", "kind": "compare"}')
    np.save(d / "class_map.npy", np.zeros((4, 4), dtype=np.int32))
    mark_npy(d / "class_map.npy")  # another command's output: not this one's to replace
    (d / "fieldwork.csv").write_text("row,col,x,y,predicted_class,score\n1,2,2.5,1.5,a,1\n# mine\n")
    (d / "binary.yaml").write_bytes(b"\xff\xfe\x00prepare")
    kw = dict(backbone="builtin:tiny", timesteps=[0], sites=["up1.res1"], stride=16)
    prepare(out=d / "a.zarr", builtin="synthetic", per_class=3, seed=0)
    extract_features(scene=d / "a.zarr", out=d / "fa.zarr", **kw)
    train_head(scene=d / "a.zarr", cache=d / "fa.zarr", head="logreg", out=d / "head")
    for name in ("rgb_missing", "rgb_corrupt", "cube_corrupt"):
        shutil.copytree(d / "a.zarr", d / f"{name}.zarr")
    (d / "rgb_missing.zarr" / "rgb" / "c" / "1" / "0" / "0").unlink()
    (d / "rgb_corrupt.zarr" / "rgb" / "c" / "0" / "1" / "0").write_bytes(b"\x13" * 64)
    (d / "cube_corrupt.zarr" / "cube" / "c" / "0" / "0" / "0").write_bytes(b"\x13" * 64)
    for name in ("no_identity", "no_progress"):
        shutil.copytree(d / "fa.zarr", d / f"{name}.zarr")
    meta = json.loads((d / "no_identity.zarr" / "zarr.json").read_text())
    del meta["attributes"]["identity"]
    (d / "no_identity.zarr" / "zarr.json").write_text(json.dumps(meta))
    shutil.rmtree(d / "no_progress.zarr" / "progress")
    shutil.copytree(d / "head", d / "head_with_notes")
    (d / "head_with_notes" / "notes.md").write_text("why this head: ...\n")
    shutil.copytree(d / "head", d / "head_damaged")
    (d / "head_damaged" / "head.json").write_text('{"format": "hsicache-head/1", "stor')
    (d / "link_head").symlink_to(d / "head", target_is_directory=True)
    shutil.copytree(d / "head", d / "head_edited")  # valid JSON, a value edited by hand
    meta = json.loads((d / "head_edited" / "head.json").read_text())
    (d / "head_edited" / "head.json").write_text(json.dumps({**meta, "scene_fingerprint": None}))
    for name in ("labels_missing", "cube_chunk_missing"):
        shutil.copytree(d / "a.zarr", d / f"{name}.zarr")
    shutil.rmtree(d / "labels_missing.zarr" / "labels")
    (d / "cube_chunk_missing.zarr" / "cube" / "c" / "0" / "0" / "0").unlink()
    for name, inside in (("notes_in_array", "cube"), ("notes_in_chunks", "cube/c/0")):
        shutil.copytree(d / "a.zarr", d / f"{name}.zarr")  # a store the user wrote into
        (d / f"{name}.zarr" / inside / "notes.txt").write_text("my own notes\n")
    shipped = Path(__file__).parents[1] / "pipeline" / "backbone" / "shipped" / "natural-s"
    shutil.copytree(shipped, d / "backbone_with_notes")
    (d / "backbone_with_notes" / "unet" / "notes.txt").write_text("my own notes\n")
    paths = {p.name: str(p) for p in d.rglob("*") if p.parent in (d, data)}
    return {**paths, "dir": str(d)}


def _at(w, path: str) -> str:
    """``path`` inside the project folder, unless it is absolute."""
    return path if Path(path).is_absolute() else f"{w['dir']}/{path}"


def _prepare(w, *extra, out="new.zarr"):
    return ["prepare", "--out", _at(w, out), *extra]


def _cube(w, *extra, **kw):
    return _prepare(w, "--cube", w["cube.npy"], "--labels", w["gt.npy"], *extra, **kw)


def _extract(w, *extra, scene="a.zarr", out="new_f.zarr"):
    return ["extract", "--scene", w[scene], *TINY, "--out", _at(w, out), *extra]


def _train(w, *extra, out="new_head"):
    return ["train", "--scene", w["a.zarr"], "--out", _at(w, out), *extra]


def _evaluate(w, *extra, metrics="new.json"):
    return ["evaluate", "--scene", w["a.zarr"], "--features", w["fa.zarr"], "--head", w["head"],
            "--metrics", _at(w, metrics), *extra]  # fmt: skip


def _predict(w, *extra, out="map.npy"):
    return ["predict", "--scene", w["a.zarr"], "--features", w["fa.zarr"], "--head", w["head"],
            "--out", _at(w, out), *extra]  # fmt: skip


def _curve(w, *extra, out="new.json"):
    return ["curve", "--scene", w["a.zarr"], "--features", w["fa.zarr"], "--heads", "logreg",
            "--per-class", "2", "--seeds", "0", "--out", _at(w, out), *extra]  # fmt: skip


def _probe(w, *extra, out="new.json"):
    return ["probe", "--scene", w["a.zarr"], "--features", w["fa.zarr"], "--seeds", "0",
            "--out", _at(w, out), *extra]  # fmt: skip


def _suggest(w, *extra, out="next.csv"):
    return ["suggest", "--scene", w["a.zarr"], "--features", w["fa.zarr"], "--head", "logreg",
            "--n", "5", "--out", _at(w, out), *extra]  # fmt: skip


def _pretrain(w, *extra, out="backbone"):
    return ["pretrain", "--out", _at(w, out), "--images", w["photos"], *PRETRAIN, *extra]


# (case id, arguments, text the one line must hold, environment)
CASES = [
    # -- an output may only replace what hsicache made, never an input --
    ("prepare-out-holds-its-inputs", lambda w: _cube(w, out="data"), "holds the input", None),
    ("prepare-out-is-its-input", lambda w: _cube(w, out="data/cube.npy"), "is the input", None),
    ("prepare-out-a-users-folder", lambda w: _cube(w, out="notes"), "not a scene store", None),
    ("prepare-preview-a-folder", lambda w: _cube(w, "--preview", w["photos"]), "--preview", None),
    ("prepare-preview-a-users-png", lambda w: _cube(w, "--preview", w["user.png"]),
     "already holds a file of 37 bytes, not a PNG hsicache wrote:", None),
    ("prepare-out-a-head", lambda w: _cube(w, out="head"), "not a scene store", None),
    ("prepare-preview-not-a-png-name", lambda w: _cube(w, "--preview", f"{w['dir']}/p.jpg"),
     "this output is a PNG; name it `.png`", None),
    ("predict-out-not-an-npy-name", lambda w: _predict(w, out="map.txt"),
     "this output is a .npy file; name it `.npy`", None),
    ("predict-geotiff-not-a-tif-name", lambda w: _predict(w, "--geotiff", f"{w['dir']}/m.geotiff"),
     "this output is a GeoTIFF; name it `.tif` or `.tiff`", None),
    ("extract-out-a-users-folder", lambda w: _extract(w, out="notes"), "not a feature cache", None),
    ("extract-out-is-the-scene", lambda w: _extract(w, out="a.zarr"), "is the input", None),
    ("extract-out-a-head", lambda w: _extract(w, out="head"), "not a feature cache", None),
    ("train-out-is-the-scene", lambda w: _train(w, "--head", "spectral", out="a.zarr"), "is the input", None),
    ("train-out-inside-the-cache", lambda w: _train(w, "--features", w["fa.zarr"], "--head", "spatial",
                                                    out="fa.zarr/head"), "lies inside", None),
    ("train-out-a-users-folder", lambda w: _train(w, "--head", "spectral", out="notes"), "not a head folder", None),
    ("train-out-a-users-file", lambda w: _train(w, "--head", "spectral", out="user.json"), "not a head folder", None),
    ("evaluate-metrics-a-folder", lambda w: _evaluate(w, metrics="photos"), "--metrics", None),
    ("evaluate-metrics-a-compare-table", lambda w: _evaluate(w, metrics="compare.json"),
     "not a metrics file hsicache wrote", None),
    ("curve-out-a-compare-table", lambda w: _curve(w, out="compare.json"), "not a metrics file (curve)", None),
    ("predict-confidence-a-class-map", lambda w: _predict(w, "--confidence", w["class_map.npy"]),
     "not a .npy file (confidence)", None),
    ("suggest-out-a-csv-with-the-users-notes", lambda w: _suggest(w, out="fieldwork.csv"),
     "not a suggestions CSV", None),
    ("evaluate-metrics-a-users-json", lambda w: _evaluate(w, metrics="user.json"), "not a metrics file", None),
    ("evaluate-plot-a-users-csv", lambda w: _evaluate(w, "--plot", w["user.csv"]), "not a confusion CSV", None),
    ("evaluate-png-a-users-png", lambda w: _evaluate(w, "--png", w["user.png"]), "--png", None),
    ("evaluate-two-outputs-one-path", lambda w: _evaluate(w, "--plot", f"{w['dir']}/new.json"),
     "its own path", None),
    ("evaluate-metrics-is-the-head", lambda w: _evaluate(w, metrics="head"), "is the input", None),
    ("predict-out-a-users-npy", lambda w: _predict(w, out="data/gt.npy"),
     "not a .npy file hsicache wrote:", None),
    ("predict-out-a-folder", lambda w: _predict(w, out="notes"), "--out", None),
    ("predict-confidence-a-users-npy", lambda w: _predict(w, "--confidence", w["user.npy"]), "--confidence", None),
    ("pretrain-out-a-users-folder", lambda w: _pretrain(w, out="notes"), "not a backbone folder", None),
    ("pretrain-out-a-head", lambda w: _pretrain(w, out="head"), "not a backbone folder", None),
    ("train-out-a-head-holding-the-users-notes", lambda w: _train(w, "--head", "spectral",
                                                                  out="head_with_notes"),
     "not a head folder", None),
    ("prepare-out-a-store-holding-the-users-notes", lambda w: _cube(w, out="notes_in_array.zarr"),
     "not a scene store", None),
    ("prepare-out-a-store-with-notes-among-its-chunks", lambda w: _cube(w, out="notes_in_chunks.zarr"),
     "not a scene store", None),
    ("pretrain-out-a-backbone-holding-the-users-notes", lambda w: _pretrain(w, out="backbone_with_notes"),
     "not a backbone folder", None),
    ("train-out-a-symbolic-link", lambda w: _train(w, "--head", "spectral", out="link_head"),
     "symbolic link", None),
    ("evaluate-metrics-under-a-file", lambda w: _evaluate(w, metrics="user.json/m.json"),
     "is a file, not a folder", None),
    ("train-out-names-no-file", lambda w: ["train", "--scene", w["a.zarr"], "--head", "spectral", "--out", "."],
     "names no file or folder", None),
    ("evaluate-metrics-a-url", lambda w: [*_evaluate(w)[:-1], "s3://bucket/m.json"],
     "local path only", None),
    ("evaluate-seeds-with-a-confusion-png", lambda w: _evaluate(w, "--seeds", "0,1", "--png",
                                                                f"{w['dir']}/c.png"), "--png", None),
    ("evaluate-a-damaged-head", lambda w: [*_evaluate(w)[:6], w["head_damaged"], *_evaluate(w)[7:]],
     "is damaged", None),
    ("curve-out-a-users-json", lambda w: _curve(w, out="user.json"), "not a metrics file", None),
    ("curve-csv-a-users-csv", lambda w: _curve(w, "--csv", w["user.csv"]), "--csv", None),
    ("curve-png-a-users-png", lambda w: _curve(w, "--png", w["user.png"]), "--png", None),
    ("probe-out-a-users-json", lambda w: _probe(w, out="user.json"), "not a metrics file", None),
    ("probe-out-is-the-scene", lambda w: _probe(w, out="a.zarr"), "is the input", None),
    ("suggest-out-a-users-csv", lambda w: _suggest(w, out="user.csv"), "--out", None),
    ("suggest-geojson-a-users-json", lambda w: _suggest(w, "--geojson", w["user.json"]), "--geojson", None),
    ("suggest-simulate-out-a-head", lambda w: _suggest(w, "--simulate", "2", out="head"),
     "not a metrics file", None),
    # -- values checked up front, naming the option (or the params file and key) --
    ("prepare-params-a-count-that-is-true", lambda w: _cube(w, "--params", w["count_is_true.yaml"]),
     "`prepare.per_class` in", None),
    ("prepare-params-not-text", lambda w: _cube(w, "--params", w["binary.yaml"]), "is not a text (UTF-8) file", None),
    ("prepare-params-a-folder", lambda w: _cube(w, "--params", w["notes"]), "is a folder, not a YAML file", None),
    ("prepare-negative-seed", lambda w: _cube(w, "--seed", "-1"), "--seed", None),
    ("prepare-unknown-small-classes", lambda w: _cube(w, "--small-classes", "bogus"), "--small-classes", None),
    ("prepare-infinite-gamma", lambda w: _cube(w, "--gamma", "inf"), "--gamma", None),
    ("prepare-clip-reversed", lambda w: _cube(w, "--clip-low", "60", "--clip-high", "10"), "--clip-low", None),
    ("prepare-per-class-zero", lambda w: _cube(w, "--per-class", "0"), "--per-class", None),
    ("prepare-fraction-above-one", lambda w: _cube(w, "--split", "fraction", "--fraction", "1.5"),
     "--fraction", None),
    ("extract-patch-zero", lambda w: _extract(w, "--patch", "0"), "--patch", None),
    ("extract-negative-noise-seed", lambda w: _extract(w, "--noise-seed", "-3"), "--noise-seed", None),
    ("extract-a-device-not-there", lambda w: _extract(w, "--device", "cuda:7"), "--device cuda:7", None),
    ("train-a-head-device-not-there", lambda w: _train(w, "--head", "spectral", "--head-params",
                                                       '{"device": "cuda:7"}'), "cuda:7", None),
    ("train-negative-seed", lambda w: _train(w, "--head", "spectral", "--seed", "-1"), "--seed", None),
    ("train-negative-hidden", lambda w: _train(w, "--head", "spectral", "--head-params", '{"hidden": -3}'),
     "hidden", None),
    ("train-svm-negative-c", lambda w: _train(w, "--head", "svm", "--head-params", '{"C": -1, "use": "spectral"}'), "'C'", None),
    ("train-xgboost-negative-rounds", lambda w: _train(w, "--head", "xgboost", "--head-params",
                                                       '{"n_estimators": -5, "use": "spectral"}'), "xgboost", None),
    ("train-unknown-kind", lambda w: _train(w, "--head", "mine", "--head-params", '{"kind": "gpt"}'),
     "head `mine`: unknown `kind: gpt`: choose one of", None),
    ("evaluate-a-seed-twice", lambda w: _evaluate(w, "--seeds", "0,0"), "lists seed 0 more than once", None),
    ("evaluate-seeds-empty", lambda w: _evaluate(w, "--seeds", ""), "`--seeds` is empty", None),
    ("evaluate-seeds-with-an-empty-part", lambda w: _evaluate(w, "--seeds", "0,,1"), "--seeds", None),
    ("train-a-clusterer-as-head", lambda w: _train(w, "--head", "sklearn.cluster.KMeans", "--head-params",
                                                   '{"use": "spectral"}'), "is not a classifier", None),
    ("evaluate-negative-seed", lambda w: _evaluate(w, "--seeds", "0,-1"), "--seeds", None),
    ("curve-per-class-zero", lambda w: _curve(w, "--per-class", "0"), "--per-class", None),
    ("probe-one-fold", lambda w: _probe(w, "--folds", "1"), "--folds", None),
    ("suggest-n-zero", lambda w: _suggest(w, "--n", "0"), "--n", None),
    ("extract-zoom-three", lambda w: _extract(w, "--zoom", "3"), "--zoom", None),
    ("extract-no-noise-draws", lambda w: _extract(w, "--noise-samples", "0"), "--noise-samples", None),
    ("train-propagate-no-neighbours", lambda w: _train(w, "--head", "propagate", "--head-params",
                                                       '{"n_neighbors": 0, "use": "spectral"}'), "n_neighbors", None),
    ("train-self-training-threshold-one", lambda w: _train(w, "--head", "logreg", "--head-params",
                                                           '{"use": "spectral", "self_training": {"threshold": 1}}'),
     "threshold", None),
    ("bench-extract-timestep-out-of-range", lambda w: ["bench", "extract", "--backbone", "builtin:tiny",
                                                       "--timesteps", "5000"], "timestep 5000", None),
    ("pretrain-widths-not-multiples-of-8", lambda w: _pretrain(w, "--block-out-channels", "12,20"),
     "--block-out-channels", None),
    ("pretrain-diverges", lambda w: _pretrain(w, "--learning-rate", "1e9", "--steps", "3"),
     "training diverged", None),
    ("pretrain-negative-learning-rate", lambda w: _pretrain(w, "--learning-rate", "-1"), "`--learning-rate` must be", None),
    # -- the right culprit --
    ("prepare-envi-unknown-interleave", lambda w: _prepare(w, "--cube", w["xyz.hdr"], "--labels", w["gt.npy"]),
     "interleave", None),
    ("prepare-envi-header-bigger-than-file", lambda w: _prepare(w, "--cube", w["bands60.hdr"], "--labels",
                                                                w["gt.npy"]), "does not match", None),
    ("prepare-uint64-label-ids", lambda w: _prepare(w, "--cube", w["cube.npy"], "--labels", w["huge_ids.npy"]),
     "18446744073709551615", None),
    ("layers-backbone-is-a-data-file", lambda w: ["layers", "--backbone", w["cube.npy"]], "is a file but not", None),
    # -- degenerate data --
    ("prepare-one-class", lambda w: _prepare(w, "--cube", w["cube.npy"], "--labels", w["one_class.npy"]),
     "one class", None),
    ("prepare-all-zero-cube", lambda w: _prepare(w, "--cube", w["zeros.npy"], "--labels", w["gt.npy"]),
     "constant", None),
    ("prepare-no-test-pixel", lambda w: _cube(w, "--per-class", "100", "--small-classes", "take-all"),
     "no test pixel", None),
    # -- damaged stores --
    ("extract-rendering-chunk-missing", lambda w: _extract(w, scene="rgb_missing.zarr"), "rgb_missing.zarr", None),
    ("extract-rendering-chunk-corrupt", lambda w: _extract(w, scene="rgb_corrupt.zarr"), "rgb_corrupt.zarr", None),
    ("train-spectra-chunk-corrupt", lambda w: ["train", "--scene", w["cube_corrupt.zarr"], "--head",
                                               "spectral", "--out", f"{w['dir']}/new_head"], "`cube`", None),
    ("evaluate-a-head-json-edited", lambda w: [*_evaluate(w)[:6], w["head_edited"], *_evaluate(w)[7:]],
     "lacks `scene_fingerprint`", None),
    ("evaluate-scene-labels-missing", lambda w: ["evaluate", "--scene", w["labels_missing.zarr"], "--features",
                                                 w["fa.zarr"], "--head", w["head"], "--metrics",
                                                 _at(w, "new.json")], "array `labels` is missing", None),
    ("train-scene-cube-chunk-missing", lambda w: ["train", "--scene", w["cube_chunk_missing.zarr"], "--head",
                                                  "spectral", "--out", _at(w, "new_head")],
     "missing or non-finite spectra", None),
    ("cache-info-identity-missing", lambda w: ["cache", "info", w["no_identity.zarr"]], "identity", None),
    ("train-on-a-cache-without-identity", lambda w: _train(w, "--features", w["no_identity.zarr"], "--head",
                                                           "spatial"), "no_identity.zarr", None),
    ("cache-info-a-users-folder", lambda w: ["cache", "info", w["notes"]], "is not a feature cache", None),
    ("cache-unlock-nothing-there", lambda w: ["cache", "unlock", f"{w['dir']}/nothing.zarr"], "nothing.zarr", None),
    ("cache-unlock-a-users-folder", lambda w: ["cache", "unlock", w["notes"]], "notes", None),
    ("cache-unlock-a-scene-store", lambda w: ["cache", "unlock", w["a.zarr"]], "a.zarr", None),
]  # fmt: skip


@pytest.mark.parametrize(("args", "culprit", "env"), [c[1:] for c in CASES],
                         ids=[c[0] for c in CASES])  # fmt: skip
def test_bad_input_is_one_line_and_touches_nothing(runner, world, args, culprit, env):
    before = _snapshot(Path(world["dir"]))
    result = runner.invoke(app, args(world), env=env)
    lines = result.stderr.strip().splitlines()
    assert result.exit_code == 2, result.output
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ") and culprit in lines[0], lines[0]
    assert "Traceback" not in result.output
    assert isinstance(result.exception, SystemExit) and result.exception.code == 2
    assert _snapshot(Path(world["dir"])) == before


def test_the_matrix_is_at_least_forty_cases_over_every_command():
    commands = {c[1]({"dir": "d", **{k: "x" for k in ("a.zarr", "fa.zarr", "head", "cube.npy", "gt.npy", "head_damaged",
                                                       "photos", "notes", "user.png", "user.json", "count_is_true.yaml", "binary.yaml", "class_map.npy",
                                                       "user.csv", "user.npy", "xyz.hdr", "bands60.hdr",
                                                       "huge_ids.npy", "one_class.npy", "zeros.npy",
                                                       "rgb_missing.zarr", "rgb_corrupt.zarr",
                                                       "cube_corrupt.zarr", "no_identity.zarr", "head_edited", "labels_missing.zarr", "cube_chunk_missing.zarr")}})[0]
                for c in CASES}  # fmt: skip
    assert {"prepare", "extract", "train", "evaluate", "predict", "pretrain", "layers", "cache",
            "bench", "curve", "probe", "suggest"} <= commands  # fmt: skip
    assert len({c[0] for c in CASES}) == len(CASES) >= 40


# -- an OS error at the write step of every command --

WRITERS = {
    "prepare": (lambda w, o: _cube(w, "--preview", f"{o}/s.png", out=f"{o}/s.zarr"), ()),
    "extract": (lambda w, o: _extract(w, out=f"{o}/f.zarr"), ("f.zarr",)),
    "train": (lambda w, o: _train(w, "--head", "spectral", out=f"{o}/h"), ()),
    "evaluate": (lambda w, o: _evaluate(w, "--png", _at(w, f"{o}/c.png"), metrics=f"{o}/m.json"), ()),
    "predict": (lambda w, o: _predict(w, "--png", _at(w, f"{o}/m.png"), out=f"{o}/m.npy"), ()),
    "pretrain": (lambda w, o: _pretrain(w, out=f"{o}/bb"), ("bb.partial",)),
    "curve": (lambda w, o: _curve(w, "--csv", _at(w, f"{o}/c.csv"), out=f"{o}/c.json"), ()),
    "probe": (lambda w, o: _probe(w, out=f"{o}/p.json"), ()),
    "suggest": (lambda w, o: _suggest(w, "--png", _at(w, f"{o}/n.png"), out=f"{o}/n.csv"), ()),
}  # fmt: skip


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EROFS], ids=["ENOSPC", "EROFS"])
@pytest.mark.parametrize("command", sorted(WRITERS))
def test_an_os_error_at_the_write_step_is_one_line(runner, world, monkeypatch, command, code):
    """Every file write goes through ``publish`` (atomic outputs) or ``write_block`` (cache
    chunks): failing both there is a disk that fills up or turns read-only mid-run."""
    import pipeline.features.extract
    import pipeline.io.store

    def fail(*_args, **_kw):
        raise OSError(code, os.strerror(code), "out-file")

    monkeypatch.setattr(pipeline.io.store, "publish", fail)
    monkeypatch.setattr(pipeline.features.extract, "write_block", fail)
    out = f"out_{command}_{code}"
    before = _snapshot(Path(world["dir"]))
    make_args, resumable = WRITERS[command]
    result = runner.invoke(app, make_args(world, out))
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and os.strerror(code) in lines[0], result.stderr
    after = _snapshot(Path(world["dir"]))
    assert {k: after[k] for k in before} == before  # nothing that was there is touched
    new = {Path(k).relative_to(out).parts[0] for k in set(after) - set(before) if k != out}
    assert new <= set(resumable)  # only the documented resumable state of extract/pretrain


def test_a_bad_block_cache_size_is_one_line_not_an_import_failure(runner, world, monkeypatch):
    from pipeline.io import storage

    monkeypatch.setattr(storage.memory_cache, "_limit", None)  # read again, as a new process
    monkeypatch.setattr(storage.memory_cache, "_values", type(storage.memory_cache._values)())
    before = _snapshot(Path(world["dir"]))
    result = runner.invoke(app, _train(world, "--head", "spectral"),
                           env={"HSICACHE_BLOCK_CACHE_MB": "abc"})  # fmt: skip
    assert result.exit_code == 2, result.output
    assert result.stderr.strip() == (
        "error: environment variable `HSICACHE_BLOCK_CACHE_MB` must be a number of megabytes "
        ">= 0 (0 turns the block cache off), got `abc`"
    )
    assert _snapshot(Path(world["dir"])) == before


def test_a_bug_is_an_internal_error_and_debug_shows_it(runner, world, monkeypatch):
    import pipeline.heads.training

    def broken(*_a, **_kw):
        raise RuntimeError("something hsicache got wrong")

    monkeypatch.setattr(pipeline.heads.training, "fit_head", broken)
    args = _train(world, "--head", "spectral")
    result = runner.invoke(app, args)
    assert result.exit_code == 3
    line = result.stderr.strip()
    assert line.startswith("internal error (RuntimeError: something hsicache got wrong)")
    assert "--debug" in line and "\n" not in line
    debug = runner.invoke(app, [*args, "--debug"])
    assert debug.exit_code == 3  # the same exit code, after the traceback
    assert "Traceback" in debug.stderr and "RuntimeError: something hsicache got" in debug.stderr
    assert debug.stderr.strip().splitlines()[-1].endswith("report it with the traceback above")


def test_a_constant_band_is_a_one_line_warning(runner, tmp_path):
    cube = np.load(SCENES / "tiny.npy")
    cube[..., 2] = 7
    np.save(tmp_path / "cube.npy", cube)
    result = runner.invoke(app, ["prepare", "--cube", str(tmp_path / "cube.npy"), "--labels",
                                 str(SCENES / "tiny_gt.npy"), "--out", str(tmp_path / "s.zarr")])  # fmt: skip
    assert result.exit_code == 0, result.output
    warning = [ln for ln in result.stderr.splitlines() if ln.startswith("warning:")]
    assert warning == [f"warning: 1 of 6 bands of `{tmp_path / 'cube.npy'}` are constant "
                       "(0-based 2): they carry no information"]  # fmt: skip


def test_allow_degenerate_prepares_a_one_class_scene(runner, world, tmp_path):
    result = runner.invoke(app, ["prepare", "--cube", world["cube.npy"], "--labels",
                                 world["one_class.npy"], "--allow-degenerate", "--out",
                                 str(tmp_path / "s.zarr")])  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "1 classes" in result.stdout


def test_verify_reports_structural_damage_as_findings(runner, world):
    for name, finding in (("no_progress.zarr", "progress array `progress/done` is missing"),
                          ("no_identity.zarr", "`identity` attribute is missing")):  # fmt: skip
        result = runner.invoke(app, ["cache", "verify", world[name]])
        assert result.exit_code == 1, result.output
        assert finding in result.stderr and "Traceback" not in result.output


def test_a_cache_with_non_finite_features_is_never_complete(world, tmp_path, monkeypatch):
    from pipeline.backbone.loading import Backbone
    from pipeline.errors import StoreError

    real = Backbone.features

    def overflowing(self, x, *args, **kw):
        return {k: v * 1e30 for k, v in real(self, x, *args, **kw).items()}  # beyond float16

    monkeypatch.setattr(Backbone, "features", overflowing)
    out = tmp_path / "f.zarr"
    with pytest.raises(StoreError, match="non-finite features"):
        extract_features(scene=world["a.zarr"], out=out, backbone="builtin:tiny", timesteps=[0],
                         sites=["up1.res1"], stride=16)  # fmt: skip
    meta = json.loads((out / "zarr.json").read_text())
    assert meta["attributes"]["complete"] is False
    assert not list((out / "t0" / "up1.res1").rglob("c/*/*/*"))  # no chunk written


class TestIdenticalRunsIdenticalStores:
    def test_two_extractions_are_equal_file_by_file(self, world, tmp_path):
        kw = dict(scene=world["a.zarr"], backbone="builtin:tiny", timesteps=[0, 10],
                  sites=["up1.res1"], stride=16, dtype="auto", threads=1)  # fmt: skip
        extract_features(out=tmp_path / "one.zarr", **kw)
        extract_features(out=tmp_path / "two.zarr", **kw)
        assert _snapshot(tmp_path / "one.zarr") == _snapshot(tmp_path / "two.zarr")

    def test_two_prepares_are_equal_file_by_file(self, tmp_path):
        for name in ("one", "two"):
            prepare(out=tmp_path / f"{name}.zarr", cube=SCENES / "tiny.npy",
                    labels=SCENES / "tiny_gt.npy", per_class=3, seed=4)  # fmt: skip
        assert _snapshot(tmp_path / "one.zarr") == _snapshot(tmp_path / "two.zarr")


def test_outputs_hsicache_wrote_are_replaced(runner, world, tmp_path):
    """The guard's other side: re-running commands over their own outputs works."""
    runs = [
        _evaluate(world, "--plot", str(tmp_path / "c.csv"), "--png", str(tmp_path / "c.png"),
                  metrics=str(tmp_path / "m.json")),
        _predict(world, "--png", str(tmp_path / "m.png"), "--confidence",
                 str(tmp_path / "p.npy"), out=str(tmp_path / "m.npy")),
        _train(world, "--head", "spectral", out=str(tmp_path / "h")),
        _prepare(world, "--builtin", "synthetic", "--preview", str(tmp_path / "s.png"),
                 out=str(tmp_path / "s.zarr")),
    ]  # fmt: skip
    for args in runs:
        for _ in range(2):
            result = runner.invoke(app, args)
            assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "m.json").read_text())["format"] == "hsicache-metrics/1"
    assert np.load(tmp_path / "m.npy").shape == (96, 96)  # the header's marker is harmless


def test_a_tilde_in_an_output_is_the_home_folder_for_the_check_and_the_write(runner, world,
                                                                            tmp_path):  # fmt: skip
    home = tmp_path / "home"
    home.mkdir()
    args = ["train", "--scene", world["a.zarr"], "--head", "spectral", "--out=~/heads/h"]
    result = runner.invoke(app, args, env={"HOME": str(home)})
    assert result.exit_code == 0, result.output
    assert (home / "heads" / "h" / "head.json").is_file()
    assert not Path("~").exists() and not (Path(world["dir"]) / "~").exists()


def test_python_m_reads_its_own_params_section(world, tmp_path):
    import subprocess
    import sys

    params = tmp_path / "p.yaml"
    params.write_text("context:\n  components: 3\n  windows: [5]\n  emp_components: 0\n"
                      "  slic_sizes: []\n")  # fmt: skip
    done = subprocess.run([sys.executable, "-m", "stages.context", "--params", str(params),
                           "--scene", world["a.zarr"], "--out", str(tmp_path / "c.zarr")],
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr
    attrs = json.loads((tmp_path / "c.zarr" / "zarr.json").read_text())["attributes"]
    assert attrs["identity"]["config"]["windows"] == [5] and list(attrs["families"]) == ["mean5"]


class TestAllOrNothing:
    """``all_or_nothing``: outputs finished in the block appear together, or none does."""

    @staticmethod
    def _write(path, kind, text):
        from pipeline.io.store import atomic_output

        with atomic_output(path, kind, option="out") as tmp:
            tmp.write_text(text)

    def test_a_conflict_found_at_the_end_publishes_none(self, tmp_path):
        from pipeline.errors import OutputConflictError
        from pipeline.io.outputs import MARKDOWN, METRICS
        from pipeline.io.store import all_or_nothing

        with pytest.raises(OutputConflictError), all_or_nothing():
            self._write(tmp_path / "m.json", METRICS, '{"format": "hsicache-metrics/1"}')
            self._write(tmp_path / "t.md", MARKDOWN, "| a |")
            (tmp_path / "t.md").write_text("the user's notes")  # appears meanwhile
        assert sorted(p.name for p in tmp_path.iterdir()) == ["t.md"]
        assert (tmp_path / "t.md").read_text() == "the user's notes"

    def test_a_failure_removes_the_folders_made_for_the_outputs(self, tmp_path):
        from pipeline.io.outputs import MARKDOWN, METRICS, NPY
        from pipeline.io.store import all_or_nothing, atomic_output

        with pytest.raises(OSError), all_or_nothing():
            self._write(tmp_path / "new" / "sub" / "t.md", MARKDOWN, "| a |")
            with atomic_output(tmp_path / "other" / "m.npy", NPY) as tmp:  # makes other/
                tmp.write_bytes(b"half")
                self._write(tmp_path / "other" / "m.json", METRICS, "{}")  # drawn from it
                raise OSError(errno.ENOSPC, "No space left on device")
        assert list(tmp_path.iterdir()) == []

    def test_a_nested_failure_caught_inside_drops_only_its_own(self, tmp_path):
        from pipeline.io.outputs import MARKDOWN, METRICS
        from pipeline.io.store import all_or_nothing

        with all_or_nothing():
            self._write(tmp_path / "m.json", METRICS, "{}")
            with pytest.raises(RuntimeError), all_or_nothing():
                self._write(tmp_path / "t.md", MARKDOWN, "| a |")
                raise RuntimeError("inner")
            assert not (tmp_path / "m.json").exists()  # still held back
        assert sorted(p.name for p in tmp_path.iterdir()) == ["m.json"]

    def test_an_output_that_cannot_be_moved_leaves_every_old_one(self, tmp_path, monkeypatch):
        from pipeline.io.outputs import METRICS
        from pipeline.io.store import all_or_nothing

        self._write(tmp_path / "m.json", METRICS, '{"format": "hsicache-metrics/1", "v": 1}')
        self._write(tmp_path / "n.json", METRICS, '{"format": "hsicache-metrics/1", "v": 1}')
        real = Path.rename

        def stuck(self, target):  # n.json is immutable (chattr +i): it cannot be moved
            if self.name == "n.json":
                raise PermissionError(errno.EPERM, "Operation not permitted", str(self))
            return real(self, target)

        monkeypatch.setattr(Path, "rename", stuck)
        with pytest.raises(PermissionError, match=r"n\.json"), all_or_nothing():
            self._write(tmp_path / "m.json", METRICS, '{"format": "hsicache-metrics/1", "v": 2}')
            self._write(tmp_path / "n.json", METRICS, '{"format": "hsicache-metrics/1", "v": 2}')
        assert sorted(p.name for p in tmp_path.iterdir()) == ["m.json", "n.json"]
        assert '"v": 1' in (tmp_path / "m.json").read_text()
        assert '"v": 1' in (tmp_path / "n.json").read_text()


def test_a_signal_while_outputs_are_moved_waits_until_they_are_in_place():
    """Ctrl-C or SIGTERM in the middle of the renames that publish outputs (or remove a failed
    run's temporary files) left hidden ``.NAME.tmp-…``/``.old-…`` folders: they now wait."""
    import signal
    import threading
    import time

    from pipeline.io.store import _interrupts_held

    if threading.current_thread() is not threading.main_thread():
        pytest.skip("signals reach the main thread only")
    seen: list[int] = []
    previous = signal.signal(signal.SIGTERM, lambda signum, _frame: seen.append(signum))
    try:
        with _interrupts_held():
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.05)
            assert seen == []  # held while the block runs
        assert seen == [signal.SIGTERM]  # delivered to the handler it had, once it ended
    finally:
        signal.signal(signal.SIGTERM, previous)
