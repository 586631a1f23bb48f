"""`select:` chooses a head's context families and parameters on its train pixels alone."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from sklearn.linear_model import LogisticRegression

from pipeline.evaluation.scoring import evaluate, evaluate_seeds, refit_over_seeds
from pipeline.features.config import ContextConfig
from pipeline.features.context import write_context
from pipeline.heads.select import TrainCVSelect
from pipeline.heads.semisupervised import PropagationHead
from pipeline.heads.training import Inputs, fit_head, load_head, open_inputs, train_head
from pipeline.scene.preparation import prepare
from stages.cli import app


@pytest.fixture(scope="module")
def stores(tmp_path_factory) -> dict[str, Path]:
    """A synthetic scene (3 labels per class) and a context store with two window sizes."""
    d = tmp_path_factory.mktemp("select")
    prepare(out=d / "scene.zarr", builtin="synthetic", per_class=3, seed=0)
    cfg = ContextConfig(components=4, windows=(3, 9), emp_components=0, slic_sizes=())
    write_context(scene=d / "scene.zarr", out=d / "ctx.zarr", config=cfg)
    return {"scene": d / "scene.zarr", "ctx": d / "ctx.zarr"}


def _blobs(n_per_class: int = 60, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Columns 0-1 separate three classes; columns 2-41 (family `noise`) are loud noise."""
    rng = np.random.default_rng(seed)
    y = np.repeat([0, 1, 2], n_per_class)
    signal = np.eye(3)[y][:, :2] * 3 + rng.normal(0, 0.4, (len(y), 2))
    return np.hstack([signal, rng.normal(0, 10, (len(y), 40))]), y


class TestTrainCVSelect:
    def test_drops_a_family_that_only_adds_noise(self):
        X, y = _blobs()
        grid = [{"context": ["noise"]}, {"context": []}]
        sel = TrainCVSelect(LogisticRegression(), grid, {"noise": (2, 42)}, folds=5).fit(X, y)
        assert sel.best_params_ == {"context": []}
        with_noise, without = (r["accuracy"] for r in sel.cv_results_)
        assert without > with_noise + 0.1
        np.testing.assert_array_equal(sel.columns_, [0, 1])
        assert sel.estimator_.n_features_in_ == 2 and (sel.predict(X) == y).mean() > 0.95

    def test_chooses_a_head_parameter_and_breaks_ties_by_order(self):
        X, y = _blobs()
        sel = TrainCVSelect(LogisticRegression(), [{"C": 1e-6}, {"C": 1.0}, {"C": 10.0}],
                            {"noise": (2, 42)}).fit(X[:, :2], y)  # fmt: skip
        accuracy = [r["accuracy"] for r in sel.cv_results_]
        assert accuracy[0] < accuracy[1]
        best = max(range(3), key=lambda i: (accuracy[i], sel.cv_results_[i]["probability"], -i))
        assert sel.best_params_ == sel.cv_results_[best]["params"]

    def test_transductive_folds_hide_labels_not_rows(self):
        X, y = _blobs(40)
        given = np.full(len(y), -1)
        labelled = np.concatenate([np.flatnonzero(y == c)[:5] for c in range(3)])
        given[labelled] = y[labelled]
        est = PropagationHead(n_components=None)
        sel = TrainCVSelect(est, [{"n_neighbors": 3}, {"n_neighbors": 7}], transductive=True)
        sel.fit(X[:, :2], given)
        assert sel.estimator_.label_distributions_.shape[0] == len(y)  # every row a node
        assert all(r["accuracy"] > 0.9 for r in sel.cv_results_)


AUTO = {
    "kind": "propagate",
    "use": "spectral",
    "select": {"context": [["mean3"], ["mean3", "mean9"]], "n_neighbors": [3, 5]},
}


class TestThroughTheTrainingLayer:
    def test_saved_head_reads_the_chosen_families(self, stores, tmp_path):
        out, steps = tmp_path / "auto", []
        trained = train_head(scene=stores["scene"], cache=None, head="auto", out=out,
                             params=AUTO, context_store=stores["ctx"],
                             progress=lambda done, total: steps.append((done, total)))  # fmt: skip
        assert steps == [(k, 6) for k in range(1, 7)]  # features read, 4 candidates, the refit
        chosen = trained.meta["select"]["chosen"]
        assert trained.meta["selection"]["context"] == chosen["context"]
        assert len(trained.meta["select"]["cv"]) == 4
        head = load_head(out)
        assert type(head.estimator).__name__ == "PropagationHead"
        assert head.estimator.n_neighbors == chosen["n_neighbors"]
        metrics = evaluate(scene=stores["scene"], cache=None, head=out, context=stores["ctx"])[0]
        assert metrics["oa"] > 0.5

    def test_evaluate_seeds_chooses_the_context_again_on_each_split(self, stores, tmp_path):
        # The saved head reads the families chosen on the store's split, whose train pixels are
        # other splits' test pixels: a refit per seed must choose among every candidate again,
        # exactly as compare and curve do from the recipe.
        params = {"kind": "logreg", "use": "spectral",
                  "select": {"context": [["mean3"], ["mean9"], ["mean3", "mean9"]]}}  # fmt: skip
        out = tmp_path / "logreg_auto"
        trained = train_head(scene=stores["scene"], cache=None, head="logreg_auto", out=out,
                             params=params, context_store=stores["ctx"])  # fmt: skip
        assert trained.meta["selection"]["context"] == ["mean3"]  # the fixture's own choice
        assert load_head(out).refit_selection.context == ("mean3", "mean9")
        seeds = [1, 2, 3, 4, 5]
        refit = evaluate_seeds(scene=stores["scene"], cache=None, head=out, seeds=seeds,
                               context=stores["ctx"])  # fmt: skip
        inputs = open_inputs(stores["scene"], None, stores["ctx"])
        recipe = refit_over_seeds(inputs, "logreg_auto", params, seeds)
        assert [r["oa"] for r in refit["seeds"]] == [r["oa"] for r in recipe["seeds"]]
        fixed = refit_over_seeds(inputs, "logreg_auto", {"kind": "logreg", "use": "spectral",
                                 "context": ["mean3"]}, seeds)  # fmt: skip
        assert [r["oa"] for r in refit["seeds"]] != [r["oa"] for r in fixed["seeds"]]

    def test_evaluate_seeds_without_the_store_a_choice_needs_is_one_line(self, stores, tmp_path):
        from pipeline.errors import ConfigError

        params = {"kind": "logreg", "use": "spectral", "select": {"context": [[], ["mean9"]]}}
        out = tmp_path / "maybe_none"
        trained = train_head(scene=stores["scene"], cache=None, head="maybe_none", out=out,
                             params=params, context_store=stores["ctx"])  # fmt: skip
        assert trained.meta["select"]["chosen"]["context"] == []  # the fixture's own choice
        assert trained.meta["select_context"] == ["mean9"]
        with pytest.raises(ConfigError, match="chooses among context families on each split"):
            evaluate_seeds(scene=stores["scene"], cache=None, head=out, seeds=[1, 2])

    def test_test_labels_play_no_part(self, stores):
        inputs = open_inputs(stores["scene"], None, stores["ctx"])
        sc = inputs.scene
        poisoned = np.array(sc.labels)
        poisoned[sc.test] = (poisoned[sc.test] + 1) % sc.n_classes  # every test label wrong
        runs = []
        for labels in (np.array(sc.labels), poisoned):
            scene = replace(sc, labels=labels)
            trained = fit_head("auto", AUTO, Inputs(scene, None, inputs.context),
                               train_mask=sc.train, seed=0)  # fmt: skip
            runs.append(trained.meta["select"])
        assert runs[0] == runs[1]

    @pytest.mark.parametrize("select,culprit", [
        ({"n_neighbors": 5}, "`select.n_neighbors` of head `logreg` must be a non-empty list"),
        ({"folds": 1, "C": [1.0]}, "`select.folds`"),
        ({"context": ["mean3"]}, "`select.context` of head `logreg` must list lists"),
        ({"context": [["mean4"]]}, "mean4"),
        ({"C": [-1.0]}, "C"),
        ({"widht": [3]}, "widht"),
    ])  # fmt: skip
    def test_bad_settings_are_one_line(self, runner, stores, tmp_path, select, culprit):
        result = runner.invoke(app, [
            "train", "--scene", str(stores["scene"]), "--context-store", str(stores["ctx"]),
            "--head", "logreg", "--head-params", json.dumps({"use": "spectral", "select": select}),
            "--out", str(tmp_path / "h")])  # fmt: skip
        assert result.exit_code == 2 and culprit in result.stderr, result.output
        assert len(result.stderr.strip().splitlines()) == 1 and not list(tmp_path.iterdir())

    def test_select_and_self_training_do_not_combine(self, runner, stores, tmp_path):
        params = {"use": "spectral", "select": {"C": [1.0]}, "self_training": {}}
        result = runner.invoke(app, [
            "train", "--scene", str(stores["scene"]), "--head", "logreg", "--head-params",
            json.dumps(params), "--out", str(tmp_path / "h")])  # fmt: skip
        assert result.exit_code == 2 and "do not combine" in result.stderr
