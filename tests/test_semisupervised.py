"""Heads that use the unlabeled pixels: label propagation and self-training."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from sklearn.datasets import make_circles
from sklearn.linear_model import LogisticRegression

from pipeline.evaluation.scoring import evaluate, evaluate_seeds
from pipeline.features.config import ContextConfig
from pipeline.features.context import write_context
from pipeline.heads import semisupervised
from pipeline.heads.semisupervised import NeighbourIndex, PropagationHead
from pipeline.heads.training import fit_rows, load_head, train_head
from pipeline.scene.core import open_scene
from pipeline.scene.preparation import prepare
from stages.cli import app

PROPAGATE = {"use": "spectral", "context": ["mean3"]}


@pytest.fixture(scope="module")
def stores(tmp_path_factory) -> dict[str, Path]:
    """A synthetic scene (3 labels per class) and its context store."""
    d = tmp_path_factory.mktemp("semi")
    prepare(out=d / "scene.zarr", builtin="synthetic", per_class=3, seed=0)
    cfg = ContextConfig(components=4, windows=(3,), emp_components=0, slic_sizes=())
    write_context(scene=d / "scene.zarr", out=d / "ctx.zarr", config=cfg)
    return {"scene": d / "scene.zarr", "ctx": d / "ctx.zarr", "dir": d}


class TestPropagation:
    def test_labels_reach_what_only_the_graph_connects(self):
        X, y = make_circles(600, noise=0.04, factor=0.5, random_state=0)
        given = np.full(600, -1)
        one_each = [np.flatnonzero(y == 0)[0], np.flatnonzero(y == 1)[0]]
        given[one_each] = y[one_each]
        linear = LogisticRegression().fit(X[one_each], y[one_each]).predict(X)
        spread = PropagationHead(n_components=None).fit(X, given)
        assert (linear == y).mean() < 0.8  # no straight line separates the rings
        assert (spread.transduction_ == y).mean() > 0.98
        np.testing.assert_array_equal(spread.predict(X), spread.transduction_)

    def test_unlabelled_rows_change_the_answer(self):
        X, y = make_circles(600, noise=0.04, factor=0.5, random_state=0)
        given = np.full(600, -1)
        one_each = [np.flatnonzero(y == 0)[0], np.flatnonzero(y == 1)[0]]
        given[one_each] = y[one_each]
        alone = PropagationHead(n_neighbors=1, n_components=None).fit(X[one_each], y[one_each])
        assert (alone.predict(X) == y).mean() < 0.8  # two rows: nearest of the two, no rings

    def test_a_part_no_label_reaches_takes_the_nearest_labelled_class(self):
        rng = np.random.default_rng(0)
        centres = [(0, 0)] * 100 + [(10, 10)] * 100 + [(30, 30)] * 50
        X = rng.normal(np.array(centres, dtype=float), 1.0)
        y = np.full(250, -1)
        y[0], y[100] = 3, 7  # the third blob is its own graph component, nearest to class 7
        head = PropagationHead(n_components=None, n_neighbors=10).fit(X, y)
        assert head.n_unreached_ == 50
        assert (head.transduction_[200:] == 7).all() and (head.transduction_[:100] == 3).all()

    def test_inverted_file_finds_the_exact_neighbours(self, monkeypatch):
        rng = np.random.default_rng(0)
        centres = rng.normal(0, 5, (40, 8))
        base = (centres[rng.integers(0, 40, 6000)] + rng.normal(0, 1, (6000, 8))).astype("f4")
        exact_idx, exact_d = NeighbourIndex(base).search(base, 5, self_ids=np.arange(6000))
        monkeypatch.setattr(semisupervised, "EXACT_LIMIT", 1000)
        index = NeighbourIndex(base)
        assert index.centres is not None  # the inverted file, not brute force
        idx, dist = index.search(base, 5, self_ids=np.arange(6000))
        assert not (idx == np.arange(6000)[:, None]).any()  # never its own neighbour
        recall = np.mean([len(set(a) & set(b)) / 5 for a, b in zip(idx, exact_idx, strict=True)])
        assert recall > 0.9
        assert (dist >= exact_d - 1e-3).all()  # never nearer than the true neighbours

    def test_spreading_in_row_blocks_gives_the_same_bits(self, monkeypatch):
        """The sparse product in threaded row blocks and the in-place iteration give the bits
        of the plain ``F <- alpha S F + (1 - alpha) Y`` loop."""
        rng = np.random.default_rng(1)
        X = rng.normal(size=(3000, 6)).astype("f4")
        y = np.full(3000, -1)
        y[:12] = np.arange(12) % 3
        head = PropagationHead(n_components=None, max_iter=60, tol=0.0)
        _, _, S = head.set_params(random_state=0)._graph(X)
        head.classes_ = np.arange(3)
        Y = np.zeros((3000, 3), "f4")
        Y[np.arange(12), y[:12]] = 1.0
        Y /= Y.sum(axis=0, keepdims=True)
        F = Y.copy()
        for _ in range(60):
            F = head.alpha * (S @ F) + (1.0 - head.alpha) * Y
        plain = F / F.sum(axis=1, keepdims=True)
        whole = head._spread(S, y, y >= 0)
        blocks = semisupervised._RowBlocks(S, parts=3)
        assert len(blocks.blocks) == 3
        monkeypatch.setattr(semisupervised, "_RowBlocks", lambda S: blocks)
        split = head._spread(S, y, y >= 0)
        assert np.array_equal(whole, plain) and np.array_equal(split, plain)

    @pytest.mark.parametrize("bad,culprit", [
        ({"n_neighbors": 0}, "n_neighbors"),
        ({"n_neighbors": 10**6}, "n_neighbors=1000000 must be below"),
        ({"alpha": 1.0}, "alpha"),
    ])  # fmt: skip
    def test_bad_parameters_are_one_line(self, runner, stores, tmp_path, bad, culprit):
        out = tmp_path / "h"
        result = runner.invoke(app, [
            "train", "--scene", str(stores["scene"]), "--context-store", str(stores["ctx"]),
            "--head", "propagate", "--head-params", json.dumps({**PROPAGATE, **bad}),
            "--out", str(out)])  # fmt: skip
        assert result.exit_code == 2, result.output
        assert len(result.stderr.strip().splitlines()) == 1 and culprit in result.stderr
        assert not out.exists()


class TestPropagateHead:
    def test_fits_every_pixel_and_never_a_test_label(self, stores):
        sc = open_scene(stores["scene"])
        rows, cols, y = fit_rows(sc, sc.train, "all", seed=0)
        assert rows.size == sc.shape[0] * sc.shape[1]  # every pixel of the scene is a node
        labelled = sc.train[rows, cols]
        np.testing.assert_array_equal(y[labelled], sc.labels[rows, cols][labelled])
        assert (y[~labelled] == -1).all()  # test pixels' labels are hidden
        assert len(set(zip(rows.tolist(), cols.tolist(), strict=True))) == rows.size
        r, c, y = fit_rows(sc, sc.train, 100, seed=3)
        assert (y == -1).sum() == 100 and not sc.train[r[y == -1], c[y == -1]].any()
        empty = np.zeros(sc.shape, bool)
        empty[: sc.shape[0] // 2] = True  # half the scene without data: never sampled
        r, c, y = fit_rows(replace(sc, no_data=empty), sc.train & ~empty, 10**6, seed=3)
        assert not empty[r, c].any() and (y == -1).sum() == (~empty & ~sc.train).sum()
        r, c, y = fit_rows(replace(sc, no_data=empty), sc.train & ~empty, "all", seed=0)
        assert not empty[r, c].any() and r.size == (~empty).sum()  # no graph node without data
        np.testing.assert_array_equal(y >= 0, (sc.train & ~empty)[r, c])

    def test_saved_head_evaluates_like_its_refit(self, stores, tmp_path):
        head = tmp_path / "h"
        trained = train_head(scene=stores["scene"], cache=None, head="propagate", out=head,
                             params=PROPAGATE, context_store=stores["ctx"])  # fmt: skip
        sc = open_scene(stores["scene"])
        assert trained.meta["n_unlabeled"] == sc.shape[0] * sc.shape[1] - int(sc.train.sum())
        assert type(load_head(head).estimator) is PropagationHead
        single, _, _ = evaluate(scene=stores["scene"], cache=None, head=head, context=stores["ctx"])
        refit = evaluate_seeds(scene=stores["scene"], cache=None, head=head, seeds=[0],
                               context=stores["ctx"])  # fmt: skip
        assert single["oa"] > 0.6
        assert refit["seeds"][0]["oa"] == pytest.approx(single["oa"])

    def test_predict_maps_the_transduction(self, runner, stores, tmp_path):
        head = tmp_path / "h"
        train_head(scene=stores["scene"], cache=None, head="propagate", out=head,
                   params=PROPAGATE, context_store=stores["ctx"])  # fmt: skip
        result = runner.invoke(app, ["predict", "--scene", str(stores["scene"]), "--head",
                                     str(head), "--context-store", str(stores["ctx"]), "--out",
                                     str(tmp_path / "map.npy")])  # fmt: skip
        assert result.exit_code == 0, result.output
        est = load_head(head).estimator
        sc = open_scene(stores["scene"])
        rows, cols, _ = fit_rows(sc, sc.train, "all", seed=0)  # the order it was fitted in
        expected = np.empty(sc.shape, dtype=np.int64)
        expected[rows, cols] = sc.class_ids[est.transduction_]
        np.testing.assert_array_equal(np.load(tmp_path / "map.npy"), expected)


def _twin_scene(d: Path) -> Path:
    """Two classes whose spectra differ along one direction, and two labelled pixels each at
    the edges of their clusters that face the other class: the boundary the labels alone give
    is tilted, the unlabelled pixels' clusters straighten it."""
    rng = np.random.default_rng(0)
    a = rng.normal(0, 1, (500, 2)) + np.array([-2.5, 0])
    b = rng.normal(0, 1, (500, 2)) + np.array([2.5, 0])
    cube = np.c_[np.r_[a, b] + 10, rng.normal(10, 0.01, 1000)].reshape(20, 50, 3)
    train = np.zeros(1000, bool)
    train[np.argsort(-(a[:, 1] * 2 + a[:, 0]))[:2]] = True
    train[500 + np.argsort(b[:, 1] * 2 + b[:, 0])[:2]] = True
    np.save(d / "cube.npy", cube.astype(np.float32))
    np.save(d / "labels.npy", np.r_[np.ones(500, int), np.full(500, 2)].reshape(20, 50))
    np.save(d / "train.npy", train.reshape(20, 50).astype(np.uint8))
    np.save(d / "test.npy", (~train).reshape(20, 50).astype(np.uint8))
    prepare(out=d / "scene.zarr", cube=d / "cube.npy", labels=d / "labels.npy",
            train_mask=d / "train.npy", test_mask=d / "test.npy")  # fmt: skip
    return d / "scene.zarr"


class TestSelfTraining:
    def test_improves_a_head_with_the_unlabelled_pixels(self, tmp_path):
        scene = _twin_scene(tmp_path)
        oa = {}
        loop = {"threshold": 0.75, "max_iter": 10, "pool": 1000}
        for name, params in [("plain", {}), ("self", {"self_training": loop})]:
            trained = train_head(scene=scene, cache=None, head="logreg", out=tmp_path / name,
                                 params={"use": "spectral", **params})  # fmt: skip
            oa[name] = evaluate(scene=scene, cache=None, head=tmp_path / name)[0]["oa"]
        assert trained.meta["self_training"]["pseudo_labelled"] > 500
        assert trained.meta["n_unlabeled"] == 996
        assert oa["self"] > oa["plain"] + 0.015

    def test_wraps_film_and_saves_it_as_film(self, stores, tmp_path):
        loop = {"threshold": 0.9, "max_iter": 2, "pool": 200}
        params = {"max_epochs": 5, "context": ["mean3"], "self_training": loop}
        out = tmp_path / "film"
        from pipeline.features.extract import extract_features

        extract_features(scene=stores["scene"], out=tmp_path / "f.zarr", backbone="builtin:tiny",
                         timesteps=[0], sites=["up1.res1"], stride=16)  # fmt: skip
        trained = train_head(scene=stores["scene"], cache=tmp_path / "f.zarr", head="film",
                             out=out, params=params, context_store=stores["ctx"])  # fmt: skip
        assert trained.meta["n_unlabeled"] == 200 and trained.meta["self_training"]["iterations"]
        assert type(load_head(out).estimator).__name__ == "FiLMClassifier"

    @pytest.mark.parametrize("loop,culprit", [
        ({"threshold": 0}, "`self_training.threshold` of head `logreg` must be in (0, 1)"),
        ({"threshold": 1.5}, "must be in (0, 1)"),
        ({"max_iter": 0}, "`self_training.max_iter`"),
        ({"pool": -3}, "`self_training.pool`"),
        ({"rounds": 3}, "unknown key(s) rounds"),
    ])  # fmt: skip
    def test_bad_settings_are_one_line(self, runner, stores, tmp_path, loop, culprit):
        result = runner.invoke(app, [
            "train", "--scene", str(stores["scene"]), "--head", "logreg", "--head-params",
            json.dumps({"use": "spectral", "self_training": loop}), "--out",
            str(tmp_path / "h")])  # fmt: skip
        assert result.exit_code == 2 and culprit in result.stderr, result.output
        assert len(result.stderr.strip().splitlines()) == 1 and not list(tmp_path.iterdir())

    def test_a_head_without_probabilities_is_named(self, runner, stores, tmp_path):
        result = runner.invoke(app, [
            "train", "--scene", str(stores["scene"]), "--head", "svm", "--head-params",
            json.dumps({"use": "spectral", "self_training": {}}), "--out", str(tmp_path / "h")])  # fmt: skip
        assert result.exit_code == 2 and "svm: add `probability: true`" in result.stderr
