"""``probe`` (what is worth reading, ranked on train pixels alone) and ``curve`` (accuracy
against labels per class)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml

from pipeline.evaluation.probing import as_entry, probe
from pipeline.evaluation.scoring import evaluate_seeds, resplit
from pipeline.features.config import ContextConfig
from pipeline.features.context import write_context
from pipeline.features.extract import extract_features
from pipeline.heads.training import Inputs, open_inputs, train_head
from pipeline.scene.core import open_scene
from pipeline.scene.preparation import prepare
from stages.cli import app


@pytest.fixture(scope="module")
def stores(tmp_path_factory) -> dict[str, Path]:
    """A synthetic scene (4 labels per class), its context store and a tiny feature cache."""
    d = tmp_path_factory.mktemp("probe")
    prepare(out=d / "scene.zarr", builtin="synthetic", per_class=4, seed=0)
    cfg = ContextConfig(components=4, windows=(3, 7), emp_components=0, slic_sizes=(16,))
    write_context(scene=d / "scene.zarr", out=d / "ctx.zarr", config=cfg)
    extract_features(scene=d / "scene.zarr", out=d / "f.zarr", backbone="builtin:tiny",
                     timesteps=[0], sites=["up1.res1", "up0.upsample"], stride=16)  # fmt: skip
    return {"scene": d / "scene.zarr", "ctx": d / "ctx.zarr", "f": d / "f.zarr"}


class _Poisoned:
    """A context store whose features are noise at ``bad`` pixels."""

    def __init__(self, store, bad: np.ndarray) -> None:
        self.store, self.bad, self.families = store, bad, store.families

    def gather(self, rows, cols, families):
        out = self.store.gather(rows, cols, families)
        hit = self.bad[rows, cols]
        out[hit] = np.random.default_rng(1).normal(0, 50, (int(hit.sum()), out.shape[1]))
        return out


class TestProbe:
    def test_ranks_without_reading_a_test_pixel(self, stores):
        inputs = open_inputs(stores["scene"], stores["f"], stores["ctx"])
        clean = probe(inputs, seeds=[0], pairs_of=3)
        _, test = resplit(inputs.scene, 0)
        poisoned = Inputs(inputs.scene, inputs.cache, _Poisoned(inputs.context, test))
        dirty = probe(poisoned, seeds=[0], pairs_of=3)
        assert [r["selection"] for r in clean["rows"]] == [r["selection"] for r in dirty["rows"]]
        assert [r["cv_mean"] for r in clean["rows"]] == [r["cv_mean"] for r in dirty["rows"]]
        changed = [r["selection"] for r, s in zip(clean["rows"], dirty["rows"], strict=True)
                   if r["test_oa_mean"] != s["test_oa_mean"]]  # fmt: skip
        assert "mean3" in changed  # the poison did reach the test column

    def test_rows_pairs_and_recommendation(self, stores):
        inputs = open_inputs(stores["scene"], stores["f"], stores["ctx"])
        result = probe(inputs, seeds=[0, 1], pairs_of=3)
        names = [r["selection"] for r in result["rows"]]
        singles = {"spectrum", "mean3", "mean7", "slic16", "t0:up1.res1", "t0:up0.upsample"}
        assert singles <= set(names) and len(names) == len(singles) + 3
        cvs = [r["cv_mean"] for r in result["rows"]]
        assert cvs == sorted(cvs, reverse=True)
        rec = result["recommended"]
        best_context = next(
            r["selection"]
            for r in result["rows"]
            if r["selection"].startswith(("mean", "slic")) and ":" not in r["selection"]
        )
        best_array = next(
            r["selection"]
            for r in result["rows"]
            if all(p.startswith("t") for p in r["selection"].split("+"))
        )
        assert rec["selection"] == f"{best_context} + {best_array}"
        assert rec["context"] == best_context.split("+") and rec["timesteps"] == [0]
        assert "never ranks" in result["protocol"]["ranking"]

    def test_recommended_flags_are_what_train_takes(self, runner, stores, tmp_path):
        args = ["probe", "--scene", str(stores["scene"]), "--features", str(stores["f"]),
                "--context-store", str(stores["ctx"]), "--seeds", "0", "--pairs-of", "2",
                "--out", str(tmp_path / "p.json")]  # fmt: skip
        result = runner.invoke(app, args)
        assert result.exit_code == 0, result.output
        assert "test OA (never ranks)" in result.stdout
        assert "    timesteps: [" in result.stdout  # the entry keys, indented to paste
        body = json.loads((tmp_path / "p.json").read_text())
        flags = body["recommended"]["flags"].split()
        train = runner.invoke(app, ["train", "--scene", str(stores["scene"]), "--features",
                                    str(stores["f"]), "--context-store", str(stores["ctx"]),
                                    "--head", "concat", "--head-params", '{"max_epochs": 2}',
                                    "--out", str(tmp_path / "h"), *flags])  # fmt: skip
        assert train.exit_code == 0, train.output

    def test_recommended_entry_is_what_a_head_recipe_takes(self, runner, stores, tmp_path):
        """The probe's selection, as a `heads:` entry's keys, is what `compare` then reads."""
        inputs = open_inputs(stores["scene"], stores["f"], stores["ctx"])
        rec = probe(inputs, seeds=[0], pairs_of=2)["recommended"]
        entry = yaml.safe_load(rec["entry"])
        assert entry == {k: rec[k] for k in ("context", "timesteps", "sites")}
        assert as_entry({"context": [], "timesteps": [0], "sites": ["s"]}) == (
            "timesteps: [0]\nsites: [s]"
        )  # an empty selection is no key
        params = tmp_path / "params.yaml"
        params.write_text(yaml.safe_dump({"heads": {"picked": {
            "kind": "concat", "max_epochs": 2, **entry}}}))  # fmt: skip
        result = runner.invoke(app, ["compare", "--scene", str(stores["scene"]), "--features",
                                     str(stores["f"]), "--context-store", str(stores["ctx"]),
                                     "--params", str(params), "--heads", "picked",
                                     "--seeds", "0", "--json"])  # fmt: skip
        assert result.exit_code == 0, result.output
        arrays = [f"t{t}:{s}" for t in entry["timesteps"] for s in entry["sites"]]
        want = ["spectrum", *entry["context"], "diffusion " + ",".join(arrays)]
        assert json.loads(result.stdout)[0]["reads"] == want

    @pytest.mark.parametrize("extra,culprit", [
        (["--per-class", "1"], "--per-class"),
        (["--seeds", ""], "--seeds"),
        (["--folds", "1"], "--folds"),
    ])  # fmt: skip
    def test_bad_input_is_one_line(self, runner, stores, tmp_path, extra, culprit):
        result = runner.invoke(app, ["probe", "--scene", str(stores["scene"]), "--context",
                                     str(stores["ctx"]), "--out", str(tmp_path / "p.json"),
                                     *extra])  # fmt: skip
        assert result.exit_code == 2 and culprit in result.stderr, result.output
        assert len(result.stderr.strip().splitlines()) == 1 and not list(tmp_path.iterdir())

    def test_params_section_gives_its_options(self, runner, stores, tmp_path):
        """`probe:` in a params file sets its options, as every pipeline command's section."""
        params = tmp_path / "params.yaml"
        params.write_text("probe:\n  seeds: [0]\n  pairs_of: 0\n")
        args = ["probe", "--scene", str(stores["scene"]), "--context", str(stores["ctx"]),
                "--params", str(params), "--json"]  # fmt: skip
        result = runner.invoke(app, args)
        assert result.exit_code == 0, result.output
        body = json.loads(result.stdout)
        assert body["protocol"]["seeds"] == [0]
        assert not [r for r in body["rows"] if "+" in r["selection"]]  # no pairs
        params.write_text("probe:\n  folds: 1\n")
        result = runner.invoke(app, args)
        assert result.exit_code == 2 and "--folds" in result.stderr, result.output

    def test_nothing_to_probe(self, runner, stores):
        result = runner.invoke(app, ["probe", "--scene", str(stores["scene"])])
        assert result.exit_code == 2 and "nothing to probe" in result.stderr


class TestCurve:
    def test_agrees_with_evaluate_seeds_at_the_same_count(self, runner, stores, tmp_path):
        params = tmp_path / "p.yaml"
        params.write_text("heads:\n  lr: {kind: logreg, use: spectral, context: [mean3]}\n")
        args = ["curve", "--scene", str(stores["scene"]), "--context", str(stores["ctx"]),
                "--heads", "lr", "--per-class", "2,4", "--seeds", "0,1", "--params",
                str(params), "--out", str(tmp_path / "c.json"), "--csv",
                str(tmp_path / "c.csv"), "--png", str(tmp_path / "c.png"), "--json"]  # fmt: skip
        result = runner.invoke(app, args)
        assert result.exit_code == 0, result.output
        rows = json.loads(result.stdout)
        assert [(r["head"], r["per_class"]) for r in rows] == [("lr", 2), ("lr", 4)]
        assert all({"head", "per_class", "oa_mean", "oa_std", "aa_mean", "kappa_mean"} <= set(r)
                   for r in rows)  # fmt: skip
        train_head(scene=stores["scene"], cache=None, head="lr", out=tmp_path / "h",
                   params={"kind": "logreg", "use": "spectral", "context": ["mean3"]},
                   context_store=stores["ctx"])  # fmt: skip
        ref = evaluate_seeds(scene=stores["scene"], cache=None, head=tmp_path / "h",
                             seeds=[0, 1], context=stores["ctx"])  # fmt: skip
        assert rows[1]["oa_mean"] == pytest.approx(ref["oa"]["mean"])  # the scene's own 4/class
        assert rows[0]["oa_mean"] != pytest.approx(ref["oa"]["mean"])
        lines = (tmp_path / "c.csv").read_text().splitlines()
        assert lines[0] == "per_class,lr" and len(lines) == 3
        assert lines[2] == f"4,{rows[1]['oa_mean']:.6f}"
        assert (tmp_path / "c.png").stat().st_size > 1000

    @pytest.mark.parametrize("extra,culprit", [
        (["--per-class", "0"], "--per-class"),
        (["--per-class", "2,-1"], "--per-class"),
        (["--heads", "nosuch"], "unknown head `nosuch`"),
        (["--per-class", "99999"], "lower `--per-class`, or make the scene again with `hsicache "
                                   "prepare --small-classes take-all`"),
    ])  # fmt: skip
    def test_bad_input_is_one_line(self, runner, stores, tmp_path, extra, culprit):
        args = ["curve", "--scene", str(stores["scene"]), "--heads", "logreg", "--out",
                str(tmp_path / "c.json"), "--csv", str(tmp_path / "c.csv"), *extra]  # fmt: skip
        result = runner.invoke(app, args)
        assert result.exit_code == 2 and culprit in result.stderr, result.output
        assert len(result.stderr.strip().splitlines()) == 1 and not list(tmp_path.iterdir())

    def test_refuses_to_replace_a_users_csv(self, runner, stores, tmp_path):
        mine = tmp_path / "c.csv"
        mine.write_text("my,data\n1,2\n")
        result = runner.invoke(app, ["curve", "--scene", str(stores["scene"]), "--heads",
                                     "logreg", "--per-class", "2", "--csv", str(mine)])  # fmt: skip
        assert result.exit_code == 2 and "--csv" in result.stderr
        assert mine.read_text() == "my,data\n1,2\n"


def test_resplit_draws_the_count_asked(stores):
    sc = open_scene(stores["scene"])
    train, _ = resplit(sc, 0, per_class=2)
    assert np.bincount(sc.labels[train]).tolist() == [2] * len(sc.class_ids)


def test_probe_reads_a_bounded_sample_of_test_pixels(stores, monkeypatch):
    import pipeline.evaluation.probing

    inputs = open_inputs(stores["scene"], None, stores["ctx"])
    whole = probe(inputs, seeds=[0], pairs_of=0)
    read = []
    gather = inputs.context.gather
    monkeypatch.setattr(
        inputs.context, "gather", lambda r, c, f: read.append(r.size) or gather(r, c, f)
    )
    monkeypatch.setattr(pipeline.evaluation.probing, "_TEST_SAMPLE", 50)
    sampled = probe(inputs, seeds=[0], pairs_of=0)
    n_train = int(resplit(inputs.scene, 0)[0].sum())
    assert set(read) == {n_train + 50}  # the train pixels and 50 test pixels, nothing else
    assert [r["cv_mean"] for r in sampled["rows"]] == [r["cv_mean"] for r in whole["rows"]]


@pytest.mark.parametrize("command", ["compare", "curve"])
def test_a_bad_recipe_is_refused_before_the_first_fit(stores, command):
    from pipeline.errors import HsicacheError
    from pipeline.evaluation.compare import compare_heads
    from pipeline.evaluation.curve import label_curve

    heads = {"logreg": {"use": "spectral"}, "wide": {"kind": "logreg", "context": ["mean45"]}}
    fits: list[int] = []
    with pytest.raises(HsicacheError, match="mean45"):
        if command == "compare":
            compare_heads(scene=stores["scene"], cache=None, context=stores["ctx"], heads=heads,
                          seeds=[0, 1], progress=lambda k, n: fits.append(k))  # fmt: skip
        else:
            inputs = open_inputs(stores["scene"], None, stores["ctx"])
            label_curve(inputs, heads, [2], [0, 1], lambda k, n: fits.append(k))
    assert fits == []  # `logreg`, first in the table, was never fitted


@pytest.fixture(scope="module")
def official(tmp_path_factory) -> dict[str, Path]:
    """The tiny scene with the Augsburg-style official masks, and its context store."""
    d, scenes = tmp_path_factory.mktemp("official"), Path(__file__).parent / "data" / "scenes"
    prepare(out=d / "scene.zarr", cube=scenes / "tiny.npy", train_mask=scenes / "TrainImage.mat",
            test_mask=scenes / "TestImage.mat")  # fmt: skip
    cfg = ContextConfig(components=3, windows=(3,), emp_components=0, slic_sizes=())
    write_context(scene=d / "scene.zarr", out=d / "ctx.zarr", config=cfg)
    return {"scene": d / "scene.zarr", "ctx": d / "ctx.zarr"}


class TestOfficialSplit:
    """Seeds cannot re-draw an official split: every command that takes seeds says what they
    did instead, as a warning and in its protocol card."""

    def _run(self, runner, official, tmp_path, *args):
        params = tmp_path / "params.yaml"
        params.write_text("heads:\n  ctx: {kind: logreg, use: spectral, context: [mean3]}\n")
        recipes = [] if args[0] == "probe" else ["--params", str(params)]
        result = runner.invoke(app, [*args, "--scene", str(official["scene"]), "--context",
                                     str(official["ctx"]), *recipes, "--json"])  # fmt: skip
        assert result.exit_code == 0, result.output
        return result

    def test_compare_says_seeds_vary_only_the_heads(self, runner, official, tmp_path):
        md = tmp_path / "t.md"
        args = ["compare", "--heads", "ctx", "--seeds", "0,1", "--markdown", str(md)]
        result = self._run(runner, official, tmp_path, *args)
        assert result.stderr.count("warning: the scene's split is official and fixed") == 1
        assert "Note: the scene's split is official and fixed" in md.read_text()
        one = self._run(runner, official, tmp_path, "compare", "--heads", "ctx", "--seeds", "0")
        assert "warning" not in one.stderr  # one seed: nothing to say

    @pytest.mark.parametrize("command", ["compare", "curve"])
    def test_a_bad_seed_is_one_line_without_the_warning(self, runner, official, command):
        result = runner.invoke(app, [command, "--scene", str(official["scene"]), "--context",
                                     str(official["ctx"]), "--heads", "svm",
                                     "--seeds", "0,-1"])  # fmt: skip
        assert result.exit_code == 2 and "`--seeds` must be" in result.stderr, result.output
        assert len(result.stderr.strip().splitlines()) == 1

    def test_curve_says_it_draws_from_every_labelled_pixel(self, runner, official, tmp_path):
        args = ["curve", "--heads", "ctx", "--per-class", "1,2", "--seeds", "0,1",
                "--out", str(tmp_path / "c.json")]  # fmt: skip
        result = self._run(runner, official, tmp_path, *args)
        assert result.stderr.count("official split is not used") == 1  # once, not per count
        note = json.loads((tmp_path / "c.json").read_text())["protocol"]["split_note"]
        assert "train and test pixels together" in note

    def test_probe_warns_that_its_folds_lie_together(self, runner, official, tmp_path):
        result = self._run(runner, official, tmp_path, "probe", "--seeds", "0", "--folds", "2")
        assert "train pixels lie together" in result.stderr
        assert "train pixels lie together" in json.loads(result.stdout)["protocol"]["cv_note"]
        args = ["probe", "--seeds", "0,1", "--folds", "2", "--per-class", "2"]
        card = json.loads(self._run(runner, official, tmp_path, *args).stdout)["protocol"]
        assert card["split"] == "per-class" and "cv_note" not in card  # drawn, not clustered
        assert "official split is not used" in card["split_note"]

    def test_evaluate_seeds_warns_too(self, runner, official, tmp_path):
        head = tmp_path / "h"
        train = runner.invoke(app, ["train", "--scene", str(official["scene"]), "--head", "svm",
                                    "--head-params", '{"use": "spectral"}',
                                    "--out", str(head)])  # fmt: skip
        assert train.exit_code == 0, train.output
        result = runner.invoke(app, ["evaluate", "--scene", str(official["scene"]), "--head",
                                     str(head), "--metrics", str(tmp_path / "m.json"),
                                     "--seeds", "0,1"])  # fmt: skip
        assert result.exit_code == 0, result.output
        assert "seeds vary only the heads' own seeds" in result.stderr


def test_seeds_that_redraw_the_split_say_nothing(runner, stores, tmp_path):
    """The default: a per-class scene, whose every seed draws its split again."""
    for args in (["curve", "--heads", "svm", "--per-class", "2", "--seeds", "0,1"],
                 ["probe", "--seeds", "0,1", "--folds", "2"]):  # fmt: skip
        result = runner.invoke(app, [*args, "--scene", str(stores["scene"]), "--context",
                                     str(stores["ctx"]), "--out", str(tmp_path / f"{args[0]}.json")])  # fmt: skip
        assert result.exit_code == 0 and "warning" not in result.stderr, result.output
        out = json.loads((tmp_path / f"{args[0]}.json").read_text())
        assert "split_note" not in out["protocol"]
