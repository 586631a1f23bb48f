"""Stage two: the heads' estimator contract, FiLM fusion, metrics, saved heads and the CLI."""

from __future__ import annotations

import io
import json
import time
import tracemalloc
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn.utils.estimator_checks import parametrize_with_checks
from xgboost import XGBClassifier

from pipeline.errors import StoreError
from pipeline.evaluation.metrics import classification_metrics, confusion_matrix
from pipeline.evaluation.scoring import predict_map
from pipeline.features.extract import extract_features
from pipeline.heads.build import _EncodedXGB, make_head
from pipeline.heads.neural import FiLMClassifier, MLPHead, _FiLMNet
from pipeline.heads.training import load_head, split_recipe, train_head
from pipeline.io.archive import skops_bytes
from pipeline.scene.preparation import prepare
from stages.cli import app


@parametrize_with_checks(
    [
        FiLMClassifier(max_epochs=60),
        MLPHead(max_epochs=60),
        _EncodedXGB(XGBClassifier(n_estimators=10)),
    ]
)
def test_sklearn_estimator_contract(estimator, check):
    check(estimator)


def _twins(n: int, *, separable_by: str, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Two classes; only the ``spectral`` or only the ``spatial`` block tells them apart."""
    rng = np.random.default_rng(seed)
    y = np.arange(n) % 2
    spec = rng.normal(size=(n, 16))
    spat = rng.normal(size=(n, 32))
    signal = np.where(y == 1, 1.5, -1.5)[:, None]
    if separable_by == "spectral":
        spec[:, :4] += signal
    else:
        spat[:, :4] += signal
    return np.hstack([spec, spat]).astype(np.float32), y


class TestFiLM:
    @pytest.mark.parametrize("separable_by", ["spatial", "spectral"])
    def test_learns_from_whichever_part_separates(self, separable_by):
        X, y = _twins(400, separable_by=separable_by)
        Xt, yt = _twins(400, separable_by=separable_by, seed=1)
        film = FiLMClassifier(n_spectral=16, max_epochs=150).fit(X, y)
        assert film.score(Xt, yt) > 0.9
        # the part that does not separate really does not: an MLP on it alone is at chance
        other = slice(16, None) if separable_by == "spectral" else slice(0, 16)
        mlp = MLPHead(max_epochs=150).fit(X[:, other], y)
        assert mlp.score(Xt[:, other], yt) < 0.65

    def test_seeded(self):
        X, y = _twins(100, separable_by="spatial")
        a = FiLMClassifier(n_spectral=16, max_epochs=20, random_state=3).fit(X, y)
        b = FiLMClassifier(n_spectral=16, max_epochs=20, random_state=3).fit(X, y)
        np.testing.assert_array_equal(a.predict_proba(X), b.predict_proba(X))

    def test_members_average_the_nets_their_seeds_train(self):
        X, y = _twins(60, separable_by="spatial")
        kw = dict(n_spectral=16, max_epochs=15)
        ensemble = FiLMClassifier(n_members=3, random_state=7, **kw).fit(X, y)
        singles = [FiLMClassifier(random_state=s, **kw).fit(X, y) for s in (7, 8, 9)]
        mean = np.mean([m.predict_proba(X) for m in singles], axis=0)
        np.testing.assert_allclose(ensemble.predict_proba(X), mean, rtol=1e-5, atol=1e-6)
        assert not np.allclose(singles[0].predict_proba(X), mean, atol=1e-3)  # they differ
        one = FiLMClassifier(n_members=1, random_state=7, **kw).fit(X, y)
        np.testing.assert_array_equal(one.predict_proba(X), singles[0].predict_proba(X))

    def test_spatial_dropout_drops_whole_pixels_in_training_only(self):
        net = _FiLMNet(4, 6, 3, 8, 8, dropout=0.0, skip=True, spatial_dropout=0.5)
        spec, spat = torch.randn(200, 4), torch.randn(200, 6)
        net.eval()
        full, blind = net(spec, spat), net(spec, torch.zeros_like(spat))
        net.train()
        out = net(spec, spat)
        as_full = torch.isclose(out, full, atol=1e-6).all(1)
        as_blind = torch.isclose(out, blind, atol=1e-6).all(1)
        assert bool((as_full ^ as_blind).all()) and 60 < int(as_blind.sum()) < 140
        net.spatial_dropout = 0.0  # the paper's head draws nothing, so its runs are as they were
        state = torch.get_rng_state()
        assert torch.equal(net(spec, spat), full) and torch.equal(torch.get_rng_state(), state)
        X, y = _twins(20, separable_by="spatial")
        with pytest.raises(ValueError, match="spatial_dropout"):
            FiLMClassifier(n_spectral=16, spatial_dropout=1.0).fit(X, y)

    def test_spectral_pca_and_early_stopping(self):
        X, y = _twins(200, separable_by="spectral")
        film = FiLMClassifier(n_spectral=16, spectral_pca=4, max_epochs=400, patience=5)
        film.fit(X, y)
        assert film.components_.shape == (16, 4)
        assert film.n_epochs_ < 400 and film.best_val_ is not None

    def test_few_labels_stop_once_the_training_loss_converged(self):
        X, y = _twins(10, separable_by="spectral")  # 5 per class: no validation part
        kw = dict(n_spectral=16, max_epochs=400, patience=40, random_state=0)
        quick = FiLMClassifier(**kw).fit(X, y)
        plateau = FiLMClassifier(converged_loss=None, **kw).fit(X, y)
        assert quick.best_val_ is None and quick.n_epochs_ < plateau.n_epochs_
        assert quick.score(X, y) == 1.0


@pytest.mark.parametrize("name, step", [("xgboost", "_encodedxgb"),
                                        ("rf", "randomforestclassifier")])  # fmt: skip
def test_tree_heads_skip_standardisation_unless_pca(name, step):
    assert [n for n, _ in make_head(name, n_spectral=4).steps] == [step]
    with_pca = [n for n, _ in make_head(name, n_spectral=4, pca=2).steps]
    assert with_pca == ["standardscaler", "pca", step]
    assert make_head("svm", n_spectral=4).steps[0][0] == "standardscaler"


class TestMetrics:
    def test_against_a_hand_computed_confusion_matrix(self):
        actual = np.array([0, 0, 0, 0, 1, 1, 2, 2, 2, 2])
        predicted = np.array([0, 0, 1, 2, 1, 1, 2, 2, 0, 2])
        np.testing.assert_array_equal(
            confusion_matrix(actual, predicted, 3), [[2, 1, 1], [0, 2, 0], [1, 0, 3]]
        )
        m = classification_metrics(actual, predicted, ["a", "b", "c"])
        assert m["oa"] == pytest.approx(0.7)
        assert m["aa"] == pytest.approx((2 / 4 + 2 / 2 + 3 / 4) / 3)
        # kappa: pe = (4*3 + 2*3 + 4*4) / 100 = 0.34
        assert m["kappa"] == pytest.approx((0.7 - 0.34) / (1 - 0.34))
        assert m["per_class"]["a"]["precision"] == pytest.approx(2 / 3)
        assert m["per_class"]["b"]["f1"] == pytest.approx(2 * (2 / 3) * 1 / (2 / 3 + 1))
        assert m["per_class"]["c"]["iou"] == pytest.approx(3 / (4 + 4 - 3))
        ious = [2 / (4 + 3 - 2), 2 / (2 + 3 - 2), 3 / 5]
        assert m["miou"] == pytest.approx(np.mean(ious))

    def test_absent_class_is_left_out_of_averages(self):
        m = classification_metrics(np.array([0, 0, 1]), np.array([0, 0, 1]), ["a", "b", "c"])
        assert m["aa"] == 1.0 and m["miou"] == 1.0 and m["per_class"]["c"]["support"] == 0

    def test_perfect_and_chance_kappa(self):
        y = np.array([0, 1, 0, 1])
        assert classification_metrics(y, y, ["a", "b"])["kappa"] == 1.0
        assert classification_metrics(y, np.array([0, 0, 1, 1]), ["a", "b"])["kappa"] == 0.0


@pytest.fixture(scope="module")
def stage_one(tmp_path_factory):
    """A synthetic scene and two tiny-backbone caches (different noise seeds)."""
    root = tmp_path_factory.mktemp("stage1")
    scene = root / "scene.zarr"
    prepare(out=scene, builtin="synthetic", per_class=10, seed=0)
    caches = []
    for noise_seed in (0, 1):
        out = root / f"features{noise_seed}.zarr"
        extract_features(scene=scene, backbone="builtin:tiny", timesteps=[0],
                         sites=["up0.upsample", "up1.res1"], out=out, stride=16,
                         noise_seed=noise_seed)  # fmt: skip
        caches.append(out)
    return scene, caches


class TestSavedHeads:
    @pytest.mark.parametrize(
        ("head", "params"),
        [("film", {"max_epochs": 30}), ("film", {"max_epochs": 10, "n_members": 3}),
         ("xgboost", {"use": "both", "n_estimators": 20}),
         ("logreg", {"use": "spatial", "pca": 8})],
    )  # fmt: skip
    def test_round_trip_predicts_the_same(self, stage_one, tmp_path, head, params):
        scene, (cache, _) = stage_one
        trained = train_head(scene=scene, cache=cache, head=head, out=tmp_path / head,
                             params=params)  # fmt: skip
        again = load_head(tmp_path / head)
        assert again.meta["name"] == head and again.meta["cache_identity_sha256"]
        X = np.random.default_rng(0).normal(size=(50, trained.meta["n_features"]))
        np.testing.assert_array_equal(
            again.estimator.predict_proba(X), trained.estimator.predict_proba(X)
        )

    @pytest.mark.parametrize(
        ("head", "params"),
        [("spatial", {"max_epochs": 3}), ("xgboost", {"use": "both", "n_estimators": 5}),
         ("logreg", {"use": "spatial", "pca": 8})],
    )  # fmt: skip
    def test_the_same_model_is_saved_as_the_same_bytes(self, stage_one, tmp_path, head, params):
        # DVC re-runs every stage after a head whose bytes changed: nothing in the folder may
        # depend on the process, the clock or how long the fit took
        scene, (cache, _) = stage_one
        a, b = tmp_path / "a", tmp_path / "b"
        for out in (a, b):
            train_head(scene=scene, cache=cache, head=head, out=out, params=params)
        assert sorted(p.name for p in a.iterdir()) == sorted(p.name for p in b.iterdir())
        for file in a.iterdir():
            assert file.read_bytes() == (b / file.name).read_bytes(), file.name

    def test_skops_bytes_depend_on_the_model_alone(self, monkeypatch):
        import skops.io as sio
        from scipy import sparse

        def model():  # fresh objects each time: other addresses, as in another process
            shared = np.arange(3.0)  # first: the first id given out must still tie x to y
            return {"x": shared, "y": shared, "w": np.eye(2), "s": sparse.csr_matrix(np.eye(3)),
                    "raw": b"booster"}  # fmt: skip

        def dumped_at(clock: float, dump) -> bytes:  # saved in 2001, then in 2023
            with monkeypatch.context() as m:
                m.setattr(time, "time", lambda: clock)
                return dump(model())

        assert dumped_at(1.0e9, sio.dumps) != dumped_at(1.7e9, sio.dumps)  # skops alone
        first, second = dumped_at(1.0e9, skops_bytes), dumped_at(1.7e9, skops_bytes)
        assert first == second
        members = zipfile.ZipFile(io.BytesIO(first)).infolist()
        assert {m.date_time for m in members} == {(1980, 1, 1, 0, 0, 0)}
        back = sio.loads(first, trusted=sio.get_untrusted_types(data=first))
        assert back["x"] is back["y"] and back["raw"] == b"booster"
        np.testing.assert_array_equal(back["s"].toarray(), np.eye(3))

    def test_refuses_another_cache(self, stage_one, tmp_path):
        scene, (cache, other) = stage_one
        train_head(scene=scene, cache=cache, head="spatial", out=tmp_path / "h",
                   params={"max_epochs": 5})  # fmt: skip
        with pytest.raises(StoreError, match=r"was trained on feature cache [0-9a-f]{12}, but"):
            predict_map(scene=scene, cache=other, head=tmp_path / "h", out=tmp_path / "m.npy")
        assert not (tmp_path / "m.npy").exists()

    def test_skops_file_with_foreign_types_is_refused(self, stage_one, tmp_path):
        scene, (cache, _) = stage_one
        path = "tests.custom_estimators.NearestMean"
        train_head(scene=scene, cache=cache, head=path, out=tmp_path / "h",
                   params={"shrink": 0.5, "use": "spectral"})  # fmt: skip
        assert load_head(tmp_path / "h").estimator.steps[-1][1].shrink == 0.5
        meta = json.loads((tmp_path / "h" / "head.json").read_text())
        meta["kind"] = "x"  # the import path no longer vouches for the estimator's class
        (tmp_path / "h" / "head.json").write_text(json.dumps(meta))
        with pytest.raises(StoreError, match="holds types it may not load"):
            load_head(tmp_path / "h")

    def test_named_configuration_of_a_kind_and_its_seeds(self, stage_one, tmp_path):
        from pipeline.evaluation.scoring import evaluate_seeds

        scene, (cache, _) = stage_one
        params = {"kind": "logreg", "use": "spectral", "C": 0.5}
        train_head(scene=scene, cache=cache, head="lr_spec", out=tmp_path / "h", params=params)
        head = load_head(tmp_path / "h")
        assert head.meta["kind"] == "logreg" and head.meta["params"] == params
        summary = evaluate_seeds(scene=scene, cache=cache, head=tmp_path / "h", seeds=[0, 1])
        assert summary["head"] == "lr_spec" and len(summary["seeds"]) == 2
        assert head.meta["cache_identity_sha256"] is None  # spectral: bound to no cache

    def test_unknown_head_and_parameter(self):
        from pipeline.errors import ConfigError

        with pytest.raises(ConfigError, match="unknown head `nope`"):
            make_head("nope", n_spectral=3)
        with pytest.raises(ConfigError, match='head `film` has no parameter "wings": it takes '):
            make_head("film", n_spectral=3, wings=2)
        with pytest.raises(ConfigError, match='no parameter "widht": did you mean "width"'):
            make_head("film", n_spectral=3, widht=2)
        with pytest.raises(ConfigError, match='no parameter "contxt": did you mean "context"'):
            make_head("logreg", n_spectral=3, contxt=["mean7"])  # an entry's key, misspelt

    def test_a_bad_parameter_names_the_entry_too(self, stage_one, tmp_path):
        from pipeline.errors import ConfigError

        scene, (cache, _) = stage_one
        with pytest.raises(
            ConfigError, match=r'^head `lr_spec` \(kind `logreg`\) has no parameter "C2"'
        ):
            train_head(scene=scene, cache=cache, head="lr_spec", out=tmp_path / "h",
                       params={"kind": "logreg", "use": "spectral", "C2": 0.5})  # fmt: skip
        assert not (tmp_path / "h").exists()
        with pytest.raises(ConfigError, match='parameter "n_estimator": did you mean "n_esti'):
            make_head("sklearn.ensemble.ExtraTreesClassifier", n_spectral=3, n_estimator=5)
        with pytest.raises(ConfigError, match="head `lr`: unknown `kind: logregg`: choose one"):
            split_recipe("lr", {"kind": "logregg"})
        with pytest.raises(ConfigError, match="configured under `heads:` of a params file is"):
            split_recipe("ctx_lr", {})  # a configured head's name without its file


def _predict_peak(scene, cache, head, out) -> int:
    from pipeline.io.storage import memory_cache

    memory_cache.clear()  # kept blocks are bounded on their own (test_block_cache_is_bounded...)
    limit, memory_cache.limit_bytes = memory_cache.limit_bytes, 0
    tracemalloc.start()
    try:
        predict_map(scene=scene, cache=cache, head=head, out=out,
                    confidence=out.with_suffix(".c.npy"))  # fmt: skip
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
        memory_cache.limit_bytes = limit


def test_block_cache_is_bounded_and_reads_each_chunk_once(stage_one, tmp_path, monkeypatch):
    from pipeline.features.cache import count_reads
    from pipeline.io.storage import MemoryCache

    kept = MemoryCache(limit_bytes=1000)
    for k in range(5):
        kept.put((k,), np.zeros(100, np.float16))  # 200 bytes each
    kept.put(("big",), np.zeros(1000, np.float16))  # larger than the whole limit: not kept
    assert kept.nbytes == 1000 and kept.get((0,)) is not None and kept.get(("big",)) is None
    kept.put((9,), np.zeros(100, np.float16))  # evicts the least recently used: (1,)
    assert kept.get((1,)) is None and kept.get((0,)) is not None and kept.nbytes == 1000

    scene, (cache, _) = stage_one
    monkeypatch.setattr("pipeline.io.storage.memory_cache", MemoryCache(64 * 2**20))
    with count_reads() as first:
        train_head(scene=scene, cache=cache, head="concat", out=tmp_path / "h",
                   params={"max_epochs": 3})  # fmt: skip
        predict_map(scene=scene, cache=cache, head=tmp_path / "h", out=tmp_path / "m.npy")
    with count_reads() as again:  # everything is in memory now
        predict_map(scene=scene, cache=cache, head=tmp_path / "h", out=tmp_path / "n.npy")
    stored = sum(p.stat().st_size for p in Path(cache).rglob("*") if "/c/" in str(p)
                 and p.is_file() and "progress" not in str(p))  # fmt: skip
    assert stored <= first[0] < 1.1 * stored  # each chunk once (+ metadata), not twice
    assert again[0] < 0.02 * stored  # metadata only: the blocks come from memory


def test_an_edge_block_is_kept_under_one_key_however_it_is_asked_for(tmp_path, monkeypatch):
    """Training reads whole chunks (``y0:y0 + chunk``), predict clips its blocks to the scene:
    the same edge block must not be fetched twice."""
    from pipeline.features.cache import FeatureCache, count_reads, read_features
    from pipeline.io.storage import MemoryCache

    monkeypatch.setattr("pipeline.io.storage.memory_cache", MemoryCache(2**20))
    scene, cache = tmp_path / "s.zarr", tmp_path / "f.zarr"
    prepare(out=scene, builtin="synthetic", per_class=2)
    extract_features(scene=scene, backbone="builtin:tiny", timesteps=[0], sites=["up1.res1"],
                     out=cache, stride=16, chunk_tiles=5)  # fmt: skip
    with count_reads() as read:  # counts what caches opened inside fetch
        fc = FeatureCache.open(cache)
        arr = fc.selection()[0]
        c, h = arr.chunks[0], arr.shape[0]
        assert h % c  # the last row of chunks is shorter than a chunk
        opened = read[0]
        whole = read_features(arr, c, 2 * c, 0, c, fc)
        first = read[0]
        clipped = read_features(arr, c, h, 0, c, fc)
    assert first > opened and read[0] == first
    np.testing.assert_array_equal(whole, clipped)
    assert whole.shape == (h - c, c, arr.shape[2])


def test_predict_streams_with_memory_independent_of_scene_size(tmp_path):
    """Peak memory of predict on an Augsburg-size scene (332 x 485) vs a 96 x 112 one."""
    peaks, sizes = {}, {}
    for name, shape in (("small", (96, 112)), ("augsburg", (332, 485))):
        ys, xs = np.mgrid[: shape[0], : shape[1]]
        classes = 1 + (ys // 24 + xs // 24) % 4
        train = np.where((ys % 24 == 12) & (xs % 24 == 12), classes, 0)
        np.save(tmp_path / f"{name}_tr.npy", train)
        np.save(tmp_path / f"{name}_te.npy", np.where(train == 0, classes, 0))
        scene = tmp_path / f"{name}.zarr"
        prepare(out=scene, builtin="synthetic", train_mask=tmp_path / f"{name}_tr.npy",
                test_mask=tmp_path / f"{name}_te.npy")  # fmt: skip
        cache = tmp_path / f"{name}_f.zarr"
        extract_features(scene=scene, backbone="builtin:tiny", timesteps=[0],
                         sites=["up1.res1"], out=cache, stride=16, chunk_tiles=4)  # fmt: skip
        head = tmp_path / f"{name}_head"
        train_head(scene=scene, cache=cache, head="film", out=head, params={"max_epochs": 5})
        out = tmp_path / f"{name}_map.npy"
        peaks[name] = _predict_peak(scene, cache, head, out)
        sizes[name] = np.load(out).size
        assert np.load(out).shape == shape
    assert sizes["augsburg"] > 14 * sizes["small"]  # the maps written: 14x the pixels...
    assert peaks["augsburg"] < 1.5 * peaks["small"], peaks  # ...in less than 1.5x the memory


#: Head entries of `film` (as --head-params) that are refused, and what the refusal says.
_BAD_FILM_ENTRIES = [
    ('{"sites": "up7.res0"}', "head `film`: `sites:` names up7.res0, which cache"),
    ('{"timesteps": [99]}', "head `film`: `timesteps:` names 99, which cache"),
    ('{"timesteps": "--5"}', "head `film`: `timesteps: '--5'` must list integers"),
    ('{"timesteps": [0, 0]}', "head `film`: `timesteps:` lists 0 more than once"),
    ('{"context": ["mean3", "mean3"]}', "head `film`: `context:` lists mean3 more than once"),
    ('{"timesteps": [true]}', "head `film`: `timesteps: [True]` must list integers"),
]


class TestCli:
    def test_train_evaluate_predict(self, runner, stage_one, tmp_path):
        scene, (cache, _) = stage_one
        base = ["--scene", str(scene), "--features", str(cache)]
        result = runner.invoke(app, ["train", *base, "--head", "film", "--head-params",
                                     '{"max_epochs": 20}', "--out", str(tmp_path / "film")])  # fmt: skip
        assert result.exit_code == 0, result.output
        result = runner.invoke(app, ["evaluate", *base, "--head", str(tmp_path / "film"),
                                     "--metrics", str(tmp_path / "m.json"),
                                     "--plot", str(tmp_path / "c.csv"),
                                     "--png", str(tmp_path / "c.png")])  # fmt: skip
        assert result.exit_code == 0, result.output
        metrics = json.loads((tmp_path / "m.json").read_text())
        assert {"oa", "aa", "kappa", "miou", "per_class", "confusion_matrix"} <= set(metrics)
        rows = (tmp_path / "c.csv").read_text().splitlines()
        assert rows[0] == "actual,predicted" and len(rows) == metrics["n_test"] + 1
        assert (tmp_path / "c.png").read_bytes()[:4] == b"\x89PNG"
        result = runner.invoke(app, ["predict", *base, "--head", str(tmp_path / "film"),
                                     "--out", str(tmp_path / "map.npy"),
                                     "--png", str(tmp_path / "map.png"),
                                     "--confidence", str(tmp_path / "conf.npy")])  # fmt: skip
        assert result.exit_code == 0, result.output
        assert f"{tmp_path / 'map.png'}, {tmp_path / 'conf.npy'}" in result.stdout  # every output
        conf = np.load(tmp_path / "conf.npy")
        assert conf.min() > 0 and conf.max() <= 1
        result = runner.invoke(app, ["evaluate", *base, "--head", str(tmp_path / "film"),
                                     "--metrics", str(tmp_path / "s.json"), "--seeds", "0,1"])  # fmt: skip
        assert result.exit_code == 0, result.output
        summary = json.loads((tmp_path / "s.json").read_text())
        assert [r["seed"] for r in summary["seeds"]] == [0, 1]
        per_seed = [r["oa"] for r in summary["seeds"]]
        assert summary["oa"]["mean"] == pytest.approx(np.mean(per_seed))
        assert summary["oa"]["std"] == pytest.approx(np.std(per_seed))

    def test_spectral_head_needs_no_cache_and_params_file(self, runner, stage_one, tmp_path):
        scene, _ = stage_one
        (tmp_path / "p.yaml").write_text("heads:\n  svm:\n    use: spectral\n    C: 10\n")
        result = runner.invoke(app, ["train", "--scene", str(scene), "--head", "svm", "--params",
                                     str(tmp_path / "p.yaml"), "--out", str(tmp_path / "svm")])  # fmt: skip
        assert result.exit_code == 0, result.output
        head = load_head(tmp_path / "svm")
        assert head.meta["params"] == {"use": "spectral", "C": 10}
        assert head.meta["kind"] == "svm" and head.meta["selection"]["mode"] == "spectral"

    def test_a_recipe_names_its_arrays_and_the_flags_win(self, runner, stage_one, tmp_path):
        scene, (cache, _) = stage_one
        (tmp_path / "p.yaml").write_text(
            "heads:\n  f:\n    kind: film\n    max_epochs: 2\n    sites: [up1.res1]\n"
        )
        base = ["train", "--scene", str(scene), "--features", str(cache), "--head", "f",
                "--params", str(tmp_path / "p.yaml")]  # fmt: skip
        runs = [([], ["up1.res1"]), (["--sites", "up0.upsample"], ["up0.upsample"]),
                (["--sites", "", "--timesteps", ""], ["up1.res1"])]  # fmt: skip
        for extra, sites in runs:  # a blank flag is no flag: the entry's arrays
            result = runner.invoke(app, [*base, *extra, "--out", str(tmp_path / "h")])
            assert result.exit_code == 0, result.output
            selection = load_head(tmp_path / "h").meta["selection"]
            assert selection["sites"] == sites and selection["timesteps"] == [0]
        flag = runner.invoke(app, [*base, "--timesteps", "99", "--out", str(tmp_path / "g")])
        assert flag.exit_code == 2 and "timestep 99 is not in cache" in flag.stderr
        assert "head `f`" not in flag.stderr  # the flag's mistake, not the entry's

    @pytest.mark.parametrize(
        ("args", "message"),
        [
            (["--head", "nope"], "unknown head `nope`"),
            (["--head", "film", "--head-params", "{bad"], "`--head-params` is not valid JSON"),
            (["--head", "film", "--sites", "up7.res0"], "site `up7.res0` is not in cache"),
            (["--head", "film", "--timesteps", "0,0"], "`--timesteps` lists 0 more than once"),
            (["--head", "svm", "--head-params", '{"use": "all"}'], "`use` must be one of"),
            *(
                (["--head", "film", "--head-params", entry], message)
                for entry, message in _BAD_FILM_ENTRIES
            ),
            (
                ["--head", "svm", "--head-params", '{"use": "spectral", "timesteps": [0]}'],
                "reads no cached arrays (`use: spectral`): drop `timesteps:`",
            ),
        ],
    )
    def test_bad_input_is_one_line(self, runner, stage_one, tmp_path, args, message):
        scene, (cache, _) = stage_one
        result = runner.invoke(app, ["train", "--scene", str(scene), "--features", str(cache),
                                     *args, "--out", str(tmp_path / "h")])  # fmt: skip
        assert result.exit_code == 2
        assert message in result.stderr and len(result.stderr.strip().splitlines()) == 1
        assert not (tmp_path / "h").exists()


def test_bench_heads_json(runner, stage_one):
    scene, (cache, _) = stage_one
    result = runner.invoke(app, ["bench", "heads", "--scene", str(scene), "--features",
                                 str(cache), "--heads", "spatial,spectral", "--repeats", "2",
                                 "--json"])  # fmt: skip
    assert result.exit_code == 0, result.output
    figures = json.loads(result.stdout)
    assert list(figures) == ["spatial", "spectral"]
    for row in figures.values():
        assert list(row) == ["train_s", "evaluate_s", "predict_s", "reuse_ratio",
                             "read_amplification"]  # fmt: skip
        assert row["train_s"] > 0 and row["predict_s"] > 0
    assert figures["spatial"]["reuse_ratio"] > 0
    assert 0 < figures["spatial"]["read_amplification"] < 10
    assert figures["spectral"]["reuse_ratio"] is None  # reads no cached features
    estimated = runner.invoke(app, ["bench", "heads", "--scene", str(scene), "--features",
                                    str(cache), "--heads", "spatial", "--repeats", "1",
                                    "--estimate-extraction"])  # fmt: skip
    assert estimated.exit_code == 0, estimated.output
    assert "estimated from one batch" in estimated.stdout


def test_a_registered_kind_is_a_head_everywhere():
    from pipeline.errors import ConfigError
    from pipeline.heads.registry import HEADS, REGISTRY, HeadSpec, head_help, register
    from pipeline.heads.training import split_recipe

    register(HeadSpec("nearest", "tests.custom_estimators:nearest_mean", help="nearest mean"))
    try:
        assert "nearest" in HEADS and HEADS["nearest"] is None and "nearest" in head_help()
        est = make_head("nearest", n_spectral=3, shrink=0.5)
        assert [n for n, _ in est.steps] == ["standardscaler", "nearestmean"]
        assert est.steps[-1][1].shrink == 0.5
        assert split_recipe("mine", {"kind": "nearest", "use": "spectral"}).mode == "spectral"
    finally:
        REGISTRY.pop("nearest")
    with pytest.raises(ConfigError, match="unknown head `nearest`: choose one of film, concat"):
        make_head("nearest", n_spectral=3)
