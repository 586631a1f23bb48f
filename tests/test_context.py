"""Context features, heads that read them, and ``compare``."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from scipy import ndimage

from pipeline.errors import ConfigError, StoreError
from pipeline.evaluation.compare import paired_difference, twin_without
from pipeline.features.config import ContextConfig
from pipeline.features.context import ContextStore, reduce_spectra, write_context
from pipeline.features.extract import extract_features
from pipeline.heads.training import load_head, train_head
from pipeline.scene.core import open_scene
from pipeline.scene.preparation import prepare
from stages.cli import app

SMALL = ContextConfig(components=4, windows=(3, 7), emp_components=2, emp_radii=(1, 2),
                      slic_sizes=(16,))  # fmt: skip


@pytest.fixture(scope="module")
def stores(tmp_path_factory) -> dict[str, Path]:
    """A synthetic scene with a context store and a feature cache; another scene's context."""
    d = tmp_path_factory.mktemp("context")
    prepare(out=d / "scene.zarr", builtin="synthetic", per_class=3, seed=0)
    prepare(out=d / "other.zarr", builtin="synthetic", per_class=3, seed=0, gamma=0.5)
    write_context(scene=d / "scene.zarr", out=d / "ctx.zarr", config=SMALL)
    write_context(scene=d / "other.zarr", out=d / "other_ctx.zarr", config=SMALL)
    extract_features(scene=d / "scene.zarr", out=d / "f.zarr", backbone="builtin:tiny",
                     timesteps=[0], sites=["up1.res1"], stride=16)  # fmt: skip
    return {p.name: p for p in d.iterdir()} | {"dir": d}


def _reference_pcs(scene: Path, k: int) -> np.ndarray:
    """The standardised cube's first principal components, by scikit-learn directly."""
    from sklearn.decomposition import PCA

    sc = open_scene(scene)
    cube = np.asarray(sc.cube, dtype=np.float32)
    h, w, b = cube.shape
    std = cube.reshape(-1, b).std(axis=0)
    z = (cube.reshape(-1, b) - cube.reshape(-1, b).mean(axis=0)) / np.where(std > 0, std, 1)
    return PCA(k, svd_solver="full").fit_transform(z).reshape(h, w, k)


class TestContextFeatures:
    def test_components_match_scikit_learn(self, stores):
        sc = open_scene(stores["scene.zarr"])
        cube = np.asarray(sc.cube)
        b = cube.shape[-1]
        pcs, info = reduce_spectra(cube, cube.reshape(-1, b).mean(0), cube.reshape(-1, b).std(0),
                                   4, seed=0)  # fmt: skip
        assert info["fitted_on_pixels"] == 96 * 96  # small scenes: every pixel
        np.testing.assert_allclose(pcs, _reference_pcs(stores["scene.zarr"], 4), atol=2e-3)

    def test_families_equal_scipy_and_scikit_image(self, stores):
        from skimage.morphology import dilation, disk, erosion, reconstruction
        from skimage.segmentation import slic

        ctx = ContextStore.open(stores["ctx.zarr"])
        pcs = np.asarray(ctx.array("mean3")[...])  # only to get the shape
        ref = _reference_pcs(stores["scene.zarr"], 4)
        mean7 = ndimage.uniform_filter(ref, size=(7, 7, 1), mode="reflect")
        np.testing.assert_allclose(np.asarray(ctx.array("mean7")[...]), mean7, atol=2e-3)
        c0 = ref[..., 0].astype(np.float64)
        footprint = disk(2, decomposition="sequence")  # scikit-image's fast exact-enough disc
        opened = reconstruction(erosion(c0, footprint), c0, method="dilation")
        closed = reconstruction(dilation(c0, footprint), c0, method="erosion")
        emp = np.asarray(ctx.array("emp")[...])
        assert emp.shape == (*pcs.shape[:2], 2 * (1 + 2 * 2))  # 2 comps x (itself + 2 radii x 2)
        np.testing.assert_allclose(emp[..., 3], opened, atol=2e-3)
        np.testing.assert_allclose(emp[..., 4], closed, atol=2e-3)
        guide = ref[..., :3].astype(np.float64)
        guide = (guide - guide.min()) / (guide.max() - guide.min())
        segments = slic(guide, n_segments=round(96 * 96 / 16), compactness=0.1, channel_axis=-1,
                        convert2lab=False, start_label=0, enforce_connectivity=True)  # fmt: skip
        means = ndimage.mean(ref[..., 1], segments, index=np.arange(segments.max() + 1))
        slic16 = np.asarray(ctx.array("slic16")[...])
        agree = np.isclose(slic16[..., 1], means[segments], atol=2e-3).mean()
        assert agree > 0.99  # superpixel borders may move by a pixel with PCA round-off

    def test_store_opens_with_xarray_named_dims_and_provenance(self, stores):
        import xarray as xr

        ds = xr.open_zarr(stores["ctx.zarr"], consolidated=False)
        assert ds["mean7"].dims == ("y", "x", "mean7.channel")
        assert ds.attrs["format"] == "hsicache-context/1"
        assert ds.attrs["identity"]["config"]["windows"] == [3, 7]
        assert ds.attrs["families"]["mean7"] == {"channels": 4, "reach": 3}

    def test_a_killed_run_leaves_nothing_and_the_rerun_gives_the_same_bytes(self, stores, tmp_path):
        code = ("import os, signal, pipeline.features.context as c\n"
                "real = c.slic_family\n"
                "def die(*a, **k):\n    os.kill(os.getpid(), signal.SIGKILL)\n"
                "c.slic_family = die\n"
                "from stages.cli import main\nimport sys\n"
                f"sys.argv = ['hsicache', 'context', '--scene', {str(stores['scene.zarr'])!r}, "
                f"'--out', {str(tmp_path / 'c.zarr')!r}, '--components', '4', '--windows', '3,7',"
                " '--emp-components', '2', '--emp-radii', '1,2', '--slic-sizes', '16']\nmain()\n")  # fmt: skip
        killed = subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=300)
        assert killed.returncode == -9
        assert not [p for p in tmp_path.iterdir() if "c.zarr" in p.name]  # not even a temp
        write_context(scene=stores["scene.zarr"], out=tmp_path / "c.zarr", config=SMALL)
        for f in (stores["ctx.zarr"]).rglob("*"):
            if f.is_file():
                assert (tmp_path / "c.zarr" / f.relative_to(stores["ctx.zarr"])).read_bytes() == (
                    f.read_bytes()
                ), f

    def test_cache_info_and_verify_know_a_context_store(self, runner, stores, tmp_path):
        info = runner.invoke(app, ["cache", "info", str(stores["ctx.zarr"]), "--json"])
        assert info.exit_code == 0, info.output
        families = json.loads(info.stdout)["families"]
        assert set(families) == {"mean3", "mean7", "emp", "slic16"}
        assert {f["dtype"] for f in families.values()} == {"float32"}
        assert (
            "stored as float32, blosc"
            in runner.invoke(app, ["cache", "info", str(stores["ctx.zarr"])]).stdout
        )
        assert runner.invoke(app, ["cache", "verify", str(stores["ctx.zarr"])]).exit_code == 0
        broken = tmp_path / "b.zarr"
        shutil.copytree(stores["ctx.zarr"], broken)
        (broken / "mean7" / "c" / "0" / "0" / "0").write_bytes(b"\x13" * 40)
        result = runner.invoke(app, ["cache", "verify", str(broken)])
        assert result.exit_code == 1 and "mean7 chunk at (0, 0) unreadable" in result.stderr

    @pytest.mark.parametrize(("edit", "command", "code", "said"), [
        ({"complete": False}, "verify", 1, "the store is not marked complete"),
        ({"shape": [5, 5]}, "verify", 1, "the store says 5x5"),
        ({"pca": None}, "info", 2, "its `pca` attribute is missing"),
        ({"families": {}}, "verify", 2, "its `families` attribute is missing or empty"),
    ])  # fmt: skip
    def test_damaged_attributes_are_found_not_crashed_on(self, runner, stores, tmp_path, edit,
                                                         command, code, said):  # fmt: skip
        """Hand-edited attributes: `cache info` had crashed (exit 3) and `verify` said ok."""
        broken = tmp_path / "b.zarr"
        shutil.copytree(stores["ctx.zarr"], broken)
        meta = json.loads((broken / "zarr.json").read_text())
        meta["attributes"].update(edit)
        (broken / "zarr.json").write_text(json.dumps(meta))
        result = runner.invoke(app, ["cache", command, str(broken)])
        assert result.exit_code == code, result.output
        assert said in result.stderr and "internal error" not in result.stderr


class TestHeadsReadContext:
    @pytest.mark.parametrize("head,params", [
        ("logreg", {"use": "spectral"}), ("svm", {"use": "spectral"}),
        ("rf", {"use": "both", "n_estimators": 20}), ("xgboost", {"use": "spectral"}),
        ("concat", {"max_epochs": 5}), ("spectral", {"max_epochs": 5}),
        ("film", {"max_epochs": 5}),
        ("sklearn.neighbors.KNeighborsClassifier", {"use": "spectral", "n_neighbors": 1}),
    ])  # fmt: skip
    def test_every_kind_trains_evaluates_and_maps_with_context(self, stores, tmp_path, head,
                                                               params):  # fmt: skip
        from pipeline.evaluation.scoring import evaluate, predict_map

        kw = dict(scene=stores["scene.zarr"], cache=stores["f.zarr"])
        trained = train_head(**kw, head=head, out=tmp_path / "h", params=params,
                             context_store=stores["ctx.zarr"], context=["mean3", "slic16"])  # fmt: skip
        assert trained.meta["selection"]["context"] == ["mean3", "slic16"]
        assert trained.meta["n_context"] == 8
        metrics, *_ = evaluate(**kw, head=tmp_path / "h", context=stores["ctx.zarr"])
        summary = predict_map(**kw, head=tmp_path / "h", out=tmp_path / "m.npy",
                              context=stores["ctx.zarr"])  # fmt: skip
        assert 0 < metrics["oa"] <= 1 and summary["shape"] == [96, 96]
        assert metrics["protocol"]["split"] == "per-class"

    def test_film_feeds_context_to_its_spectral_branch(self, stores, tmp_path):
        train_head(scene=stores["scene.zarr"], cache=stores["f.zarr"], head="film",
                   out=tmp_path / "h", params={"max_epochs": 3, "spectral_pca": 5},
                   context_store=stores["ctx.zarr"], context=["mean7"])  # fmt: skip
        film = load_head(tmp_path / "h").estimator
        embed = film.module_.embed[0]
        assert embed.in_features == 5 + 4  # 5 spectral components + the 4 of mean7
        assert film.n_context == 4

    def test_another_scenes_context_store_is_refused(self, stores, tmp_path):
        with pytest.raises(StoreError, match="made from scene"):
            train_head(scene=stores["scene.zarr"], cache=None, head="logreg", out=tmp_path / "h",
                       params={"use": "spectral", "context": ["mean3"]},
                       context_store=stores["other_ctx.zarr"])  # fmt: skip
        assert not (tmp_path / "h").exists()

    def test_a_saved_head_refuses_a_context_store_made_otherwise(self, stores, tmp_path):
        from pipeline.evaluation.scoring import evaluate

        train_head(scene=stores["scene.zarr"], cache=None, head="logreg", out=tmp_path / "h",
                   params={"use": "spectral", "context": ["mean3"]},
                   context_store=stores["ctx.zarr"])  # fmt: skip
        write_context(scene=stores["scene.zarr"], out=tmp_path / "c2.zarr",
                      config=ContextConfig(components=3, windows=(3,), emp_components=0,
                                           slic_sizes=()))  # fmt: skip
        with pytest.raises(StoreError, match="was trained on context store"):
            evaluate(scene=stores["scene.zarr"], cache=None, head=tmp_path / "h",
                     context=tmp_path / "c2.zarr")  # fmt: skip


class TestCompare:
    def test_a_twin_keeps_the_training_settings_and_drops_the_arrays(self):
        film = {"kind": "film", "width": 32, "dropout": 0.5, "n_members": 5,
                "context": ["mean7"], "timesteps": [0], "sites": ["up1.res1"]}  # fmt: skip
        assert twin_without("f", film) == {
            "kind": "spectral", "dropout": 0.5, "n_members": 5, "spectral_pca": 30,
            "hidden": 128, "context": ["mean7"]}  # fmt: skip
        lr = {"kind": "logreg", "use": "both", "C": 0.5, "timesteps": [0]}
        assert twin_without("lr", lr) == {"kind": "logreg", "use": "spectral", "C": 0.5}
        assert twin_without("s", {"kind": "svm", "use": "spectral"}) is None

    def test_an_unknown_head_name_says_where_it_looked_and_what_is_close(self, tmp_path):
        from pipeline.evaluation.compare import head_recipe

        params = tmp_path / "p.yaml"
        params.write_text("heads:\n  ctx_logreg: {kind: logreg}\n")
        with pytest.raises(ConfigError, match=r"neither an entry under `heads:` in `.*p.yaml` "
                           r"nor a head kind; did you mean `ctx_logreg`\?"):  # fmt: skip
            head_recipe("ctx_logerg", params)
        with pytest.raises(ConfigError, match="no params file was read: give `recipes`"):
            head_recipe("ctx_logreg", None)
        assert head_recipe("ctx_logreg", params) == {"kind": "logreg"}

    def test_a_twin_keeps_self_training_and_the_choices_it_can_make(self):
        loop = {"threshold": 0.9, "max_iter": 3, "pool": 100}
        film = {"kind": "film", "context": ["mean7"], "self_training": loop}
        twin = twin_without("f", film)
        assert twin["self_training"] == loop and twin["kind"] == "spectral"
        chooses = {"kind": "concat", "select": {"context": [["mean7"], ["mean7", "mean15"]],
                   "dropout": [0.1, 0.5], "spatial_dropout": [0.0, 0.5], "folds": 3}}  # fmt: skip
        assert twin_without("c", chooses)["select"] == {
            "context": [["mean7"], ["mean7", "mean15"]], "dropout": [0.1, 0.5], "folds": 3}  # fmt: skip
        only_diffusion = {"kind": "film", "select": {"width": [8, 32]}}
        assert "select" not in twin_without("f", only_diffusion)

    def test_json_rows_agree_with_evaluate_seeds(self, runner, stores, tmp_path):
        params = tmp_path / "p.yaml"
        params.write_text("heads:\n  ctx_lr: {kind: logreg, use: spectral, context: [mean7]}\n"
                          "  both_lr: {kind: logreg, use: both, context: [mean7]}\n")  # fmt: skip
        args = ["compare", "--scene", str(stores["scene.zarr"]), "--features", str(stores["f.zarr"]),
                "--context", str(stores["ctx.zarr"]), "--heads", "ctx_lr,both_lr,svm",
                "--seeds", "0,1", "--params", str(params), "--reference", "ctx_lr",
                "--json", "--markdown", str(tmp_path / "t.md")]  # fmt: skip
        result = runner.invoke(app, args)
        assert result.exit_code == 0, result.output
        rows = json.loads(result.stdout)
        assert [r["head"] for r in rows] == ["ctx_lr", "both_lr", "svm"]
        for r in rows:
            assert {"head", "oa_mean", "oa_std", "aa_mean", "kappa_mean", "per_seed_oa"} <= set(r)
            assert len(r["per_seed_oa"]) == 2
        assert rows[1]["without_diffusion_oa_mean"] is not None  # its twin: use spectral
        assert rows[0]["diffusion_gain"] is None
        train_head(scene=stores["scene.zarr"], cache=None, head="ctx_lr", out=tmp_path / "h",
                   params={"kind": "logreg", "use": "spectral", "context": ["mean7"]},
                   context_store=stores["ctx.zarr"])  # fmt: skip
        from pipeline.evaluation.scoring import evaluate_seeds

        seeds = evaluate_seeds(scene=stores["scene.zarr"], cache=None, head=tmp_path / "h",
                               seeds=[0, 1], context=stores["ctx.zarr"])  # fmt: skip
        assert rows[0]["per_seed_oa"] == [s["oa"] for s in seeds["seeds"]]
        assert rows[1]["without_diffusion_per_seed_oa"] == rows[0]["per_seed_oa"]
        assert rows[0]["vs_reference"] is None  # the reference itself
        for r in rows[1:]:  # the others, seed by seed on the same splits
            d = np.subtract(r["per_seed_oa"], rows[0]["per_seed_oa"])
            assert r["vs_reference"]["head"] == "ctx_lr"
            assert r["vs_reference"]["per_seed"] == d.tolist()
            assert r["vs_reference"]["mean"] == pytest.approx(d.mean())
            assert r["vs_reference"]["above"] == (d > 0).sum()
        assert rows[1]["diffusion_gain_std"] == pytest.approx(rows[1]["vs_reference"]["std"])
        table = (tmp_path / "t.md").read_text().splitlines()
        assert table[6].endswith("| diffusion adds | vs ctx_lr |")
        assert table[8].startswith("| ctx_lr |") and table[8].endswith("| - | - | - |")
        vs = rows[1]["vs_reference"]
        shown = f"{100 * vs['mean']:+.1f} ± {100 * vs['std']:.1f} ({vs['above']} of 2 above) |"
        assert table[9].endswith(shown.replace("+0.0", "0.0").replace("-0.0", "0.0"))

    def test_a_difference_that_rounds_to_zero_has_no_sign_and_one_seed_no_spread(self):
        from pipeline.evaluation.compare import _difference

        assert _difference(-0.0004, 0.01, 2, 5) == "0.0 ± 1.0 (2 of 5 above)"
        assert _difference(0.012, 0.0, 1, 1) == "+1.2 (1 of 1 above)"
        with pytest.raises(ValueError, match="as many seeds"):
            paired_difference([0.5], [0.5, 0.6])

    def test_paired_difference(self):
        d = paired_difference([0.8, 0.7, 0.9], [0.7, 0.7, 0.95])
        assert d["per_seed"] == pytest.approx([0.1, 0.0, -0.05])
        assert d["mean"] == pytest.approx(0.05 / 3) and (d["above"], d["below"]) == (1, 1)
        assert d["std"] == pytest.approx(np.std([0.1, 0.0, -0.05]))

    def test_a_reference_outside_the_heads_is_one_line(self, runner, stores, tmp_path):
        out = tmp_path / "c.md"
        result = runner.invoke(app, ["compare", "--scene", str(stores["scene.zarr"]), "--heads",
                                     "svm", "--reference", "logreg", "--markdown",
                                     str(out)])  # fmt: skip
        assert result.exit_code == 2 and len(result.stderr.strip().splitlines()) == 1
        assert "`--reference` head `logreg` is not one of `--heads` (svm)" in result.stderr
        assert not out.exists()

    def test_writes_a_metrics_file_a_table_and_a_chart(self, runner, stores, tmp_path):
        args = ["compare", "--scene", str(stores["scene.zarr"]), "--heads", "svm",
                "--seeds", "0", "--out", str(tmp_path / "c.json"), "--markdown",
                str(tmp_path / "c.md"), "--png", str(tmp_path / "c.png")]  # fmt: skip
        params = tmp_path / "p.yaml"
        params.write_text("heads:\n  svm: {C: 10}\n")  # a bare svm reads the spectrum and a cache
        result = runner.invoke(app, [*args, "--params", str(params)])
        assert result.exit_code == 2 and "head `svm` reads cached diffusion" in result.stderr
        assert not list(tmp_path.glob("c.*"))
        params.write_text("heads:\n  svm: {use: spectral}\n")
        result = runner.invoke(app, [*args, "--params", str(params)])
        assert result.exit_code == 0, result.output
        body = json.loads((tmp_path / "c.json").read_text())
        assert body["format"] == "hsicache-metrics/1" and "svm" in body["heads"]
        assert body["protocol"]["seeds"] == [0] and "test pixels never" in body["protocol"][
            "model_selection"]  # fmt: skip
        scene = open_scene(stores["scene.zarr"])
        assert body["protocol"]["scene"] == scene.attrs["source"]
        assert body["protocol"]["image_fingerprint"] == scene.image_fingerprint
        table = (tmp_path / "c.md").read_text()
        assert table.startswith("<!-- hsicache compare") and "| vs " not in table
        assert f"(image {scene.image_fingerprint[:12]})" in table
        assert (tmp_path / "c.png").read_bytes().startswith(b"\x89PNG")

    def test_a_blocks_split_warns_when_context_reaches_past_its_buffer(self, runner, tmp_path):
        prepare(out=tmp_path / "s.zarr", builtin="synthetic", split="blocks", per_class=3,
                block_size=16, buffer=2, seed=0)  # fmt: skip
        write_context(scene=tmp_path / "s.zarr", out=tmp_path / "c.zarr", config=SMALL)
        params = tmp_path / "p.yaml"
        params.write_text("heads:\n  lr: {kind: logreg, use: spectral, context: [mean7]}\n")
        result = runner.invoke(app, ["compare", "--scene", str(tmp_path / "s.zarr"), "--context",
                                     str(tmp_path / "c.zarr"), "--heads", "lr", "--seeds", "0",
                                     "--params", str(params)])  # fmt: skip
        assert result.exit_code == 0, result.output
        assert "warning: head `lr` reads features spanning more than the blocks split's buffer " \
               "of 2 px: mean7 (6 px)" in result.stderr  # fmt: skip


BAD = [
    ("context-unknown-setting", ["--components", "0"], "components"),
    ("context-window-zero", ["--windows", "0"], "windows"),
    ("context-window-wider-than-the-scene", ["--windows", "500"], "windows"),
    ("context-more-components-than-bands", ["--components", "999"], "components"),
    ("context-unknown-filter", ["--filter", "median"], "filter"),
]


@pytest.mark.parametrize(("extra", "culprit"), [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_bad_context_settings_are_one_line(runner, stores, tmp_path, extra, culprit):
    result = runner.invoke(app, ["context", "--scene", str(stores["scene.zarr"]), "--out",
                                 str(tmp_path / "c.zarr"), *extra])  # fmt: skip
    assert result.exit_code == 2 and len(result.stderr.strip().splitlines()) == 1
    assert culprit in result.stderr
    assert not list(tmp_path.iterdir())


def test_bad_head_context_and_seeds_are_one_line(runner, stores, tmp_path):
    base = ["train", "--scene", str(stores["scene.zarr"]), "--head", "logreg", "--head-params",
            '{"use": "spectral"}', "--out", str(tmp_path / "h")]  # fmt: skip
    missing = runner.invoke(app, [*base, "--context-store", str(stores["ctx.zarr"]), "--context",
                                  "mean99"])  # fmt: skip
    assert missing.exit_code == 2 and "context family `mean99` is not in" in missing.stderr
    no_store = runner.invoke(app, [*base, "--context", "mean3"])
    assert no_store.exit_code == 2 and "--context-store" in no_store.stderr
    store_as_family = runner.invoke(app, [*base, "--context", str(stores["ctx.zarr"])])
    assert store_as_family.exit_code == 2 and "among its context families" in store_as_family.stderr
    assert "give the store as `--context-store`" in store_as_family.stderr
    no_seeds = runner.invoke(app, ["compare", "--scene", str(stores["scene.zarr"]), "--heads",
                                   "svm", "--seeds", ","])  # fmt: skip
    assert no_seeds.exit_code == 2 and "--seeds" in no_seeds.stderr
    assert not list(tmp_path.iterdir())


def test_window_means_skip_pixels_without_data():
    from pipeline.features.context import mean_family

    rng = np.random.default_rng(0)
    pcs = rng.normal(size=(9, 9, 2)).astype(np.float32)
    valid = np.ones((9, 9), bool)
    valid[3:5, 3:6] = False
    pcs[~valid] = 1e3  # made-up values: must not reach any valid pixel's mean
    got = mean_family(pcs, 3, "box", valid)
    for y, x in [(2, 2), (4, 6), (5, 4), (7, 7)]:
        window = (slice(y - 1, y + 2), slice(x - 1, x + 2))
        expect = pcs[window][valid[window]].mean(axis=0)
        np.testing.assert_allclose(got[y, x], expect, rtol=1e-5, atol=1e-6)
    everywhere = np.ones((9, 9), bool)
    np.testing.assert_allclose(
        mean_family(pcs, 3, "gaussian", everywhere), mean_family(pcs, 3, "gaussian"), atol=1e-3
    )
    cube = rng.normal(size=(9, 9, 4)).astype(np.float32)
    _, info = reduce_spectra(cube, np.zeros(4, np.float32), np.ones(4, np.float32), 2, 0, valid)
    assert info["fitted_on_pixels"] == valid.sum()


@pytest.mark.parametrize("family", ["emp", "slic"])
@pytest.mark.parametrize("data", ["hole", "small", "island"])
def test_profiles_and_superpixels_do_not_see_filled_values(family, data):
    from pipeline.features.context import emp_family, slic_family

    rng = np.random.default_rng(1)
    pcs = np.repeat(np.linspace(-2, 2, 24), 24).reshape(24, 24, 1) + rng.normal(size=(24, 24, 3))
    pcs = pcs.astype(np.float32)
    valid = np.ones((24, 24), bool)
    valid[8:14, 6:12] = False  # a hole without data
    if data != "hole":  # data in a 4 x 4 corner only (one superpixel's worth), or beside it
        valid[:] = False  # a lone pixel far away that no seed of the corner's may reach
        valid[:4, :4] = True
        valid[23, 23] = data == "island"
    make = {
        "emp": lambda v, mask: emp_family(v, 2, [1, 3], mask),
        "slic": lambda v, mask: slic_family(v, 16, valid=mask),
    }[family]
    outputs = []
    for fill in (-50.0, 50.0):  # two made-up fills: the valid pixels' context must not change
        filled = pcs.copy()
        filled[~valid] = fill
        outputs.append(make(filled, valid))
    np.testing.assert_array_equal(outputs[0][valid], outputs[1][valid])
    np.testing.assert_array_equal(make(pcs, None), make(pcs, np.ones_like(valid)))


def test_a_scene_without_any_data_has_no_context():
    from pipeline.errors import ConfigError
    from pipeline.features.context import context_features

    with pytest.raises(ConfigError, match="no pixel with data"):
        context_features(np.zeros((4, 4, 2), np.float32), ContextConfig(components=2, windows=(3,),
                         emp_components=0, slic_sizes=()), valid=np.zeros((4, 4), bool))  # fmt: skip
