"""Stage one: backbone sites, stitching, truncation, determinism, resume and the cache API."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.backbone.loading import Backbone, Site, _weights_hash, load_backbone, seeded_noise
from pipeline.errors import ConfigError, StoreError
from pipeline.features.cache import FeatureCache
from pipeline.features.extract import TileLayout, extract_features
from pipeline.scene.preparation import prepare
from stages.cli import app
from tests.interrupt import extract_until

SITES = ["up0.upsample", "up1.res1"]


@pytest.fixture(scope="module")
def tiny() -> Backbone:
    return load_backbone("builtin:tiny")


@pytest.fixture(scope="module")
def scene(tmp_path_factory) -> str:
    """A 40 x 37 synthetic scene: odd sizes exercise edge tiles and partial chunks."""
    from pipeline.scene.core import write_scene

    path = tmp_path_factory.mktemp("scene") / "scene.zarr"
    sc = prepare(out=path, builtin="synthetic", per_class=2, seed=0)
    sc.cube, sc.rgb, sc.labels = sc.cube[:40, :37], sc.rgb[:40, :37], sc.labels[:40, :37]
    sc.train, sc.test = sc.train[:40, :37], sc.test[:40, :37]
    sc.attrs["fingerprint"] = sc.attrs["image_fingerprint"] = "f" * 64
    write_scene(sc, path)
    return str(path)


def _read_all(path, timesteps=(0,), sites=SITES) -> np.ndarray:
    return np.asarray(FeatureCache.open(path).to_dask(timesteps, sites).compute())


class _ProbeBackbone(Backbone):
    """Its one site returns the noised input itself: each cached value reveals its patch."""

    def features(self, x, timestep, sites, *, class_labels=None, truncate=True):
        return {"probe": x.clone()}


class TestBackbone:
    def test_sites_in_forward_order(self, tiny):
        names = [s.name for s in tiny.sites]
        assert names[0] == "mid" and names[-1] == "up1.res1"
        assert tiny.site("up0.upsample").resolution == 32
        assert [s.order for s in tiny.sites] == list(range(len(names)))

    def test_adm64_architecture(self):
        bb = load_backbone("builtin:adm64")
        assert 290e6 < sum(p.numel() for p in bb.unet.parameters()) < 300e6
        assert bb.site("up2.attn2").channels == 384 and bb.site("up2.attn2").resolution == 32
        assert bb.site("up2.upsample").resolution == 64
        assert bb.num_class_embeds == 1000

    def test_unknown_site_lists_valid_ones(self, tiny):
        with pytest.raises(ConfigError, match=r"unknown site `nope`.*valid sites: mid, up0.res0"):
            tiny.site("nope")

    def test_truncation_does_not_change_features(self, tiny):
        x = seeded_noise((2, 3, 32, 32), 1)
        full = tiny.features(x, 0, ["up0.res0", "up1.res1"], truncate=False)
        cut = tiny.features(x, 0, ["up0.res0"], truncate=True)
        torch.testing.assert_close(cut["up0.res0"], full["up0.res0"], rtol=0, atol=0)

    def test_same_weights_same_hash(self):
        assert (
            load_backbone("builtin:tiny").weights_sha256
            == load_backbone("builtin:tiny").weights_sha256
        )
        assert (
            load_backbone("builtin:tiny", seed=1).weights_sha256
            != load_backbone("builtin:tiny").weights_sha256
        )

    def test_diffusers_folder_round_trip(self, tiny, tmp_path):
        tiny.unet.save_pretrained(tmp_path / "unet")
        tiny.scheduler.save_pretrained(tmp_path / "scheduler")
        again = load_backbone(str(tmp_path))
        assert again.weights_sha256 == tiny.weights_sha256
        assert not again.unet.training

    def test_offline_hub_id_says_how_to_supply_a_copy(self, monkeypatch):
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
        with pytest.raises(FileNotFoundError, match=r"huggingface-cli download"):
            load_backbone("nobody/no-such-diffusion-model")

    def test_an_unreachable_hub_is_not_asked(self, monkeypatch):
        # Offline the hub client retries for half a minute: hsicache looks in the cache at once.
        import socket
        import urllib.request

        import huggingface_hub

        def unreachable(*_a, **_k):
            raise OSError("Network is unreachable")

        calls = []

        def asked(*a, **_k):
            calls.append(a)
            raise OSError("the hub was asked")

        monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
        monkeypatch.setattr(urllib.request, "getproxies", dict)
        monkeypatch.setattr(socket, "create_connection", unreachable)
        monkeypatch.setattr(huggingface_hub, "file_exists", asked)
        with pytest.raises(FileNotFoundError, match="not reachable and it is not in the Hugging"):
            load_backbone("nobody/no-such-diffusion-model")
        assert calls == []

    def test_behind_a_proxy_the_hub_client_is_left_to_reach_the_hub(self, monkeypatch):
        import socket
        import urllib.request

        from pipeline.backbone.loading import _hub_reachable

        def direct(*_a, **_k):
            raise AssertionError("a direct connection was tried")

        monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
        monkeypatch.setattr(socket, "create_connection", direct)
        monkeypatch.setattr(urllib.request, "getproxies", lambda: {"https": "http://proxy:3128"})
        assert _hub_reachable()
        monkeypatch.setattr(urllib.request, "getproxies", dict)
        monkeypatch.setenv("HF_ENDPOINT", "https://mirror.example:notaport")
        assert not _hub_reachable()

    def test_a_builtin_name_without_its_prefix_is_named(self, monkeypatch):
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
        with pytest.raises(ConfigError, match="`builtin:natural-s`"):
            load_backbone("natural-s")

    def test_a_hub_id_in_the_local_cache_loads_offline(self, tiny, tmp_path):
        # The Hugging Face cache's own layout, as `huggingface-cli download` leaves it.
        repo = tmp_path / "hub" / "models--nobody--tiny-ddpm"
        snapshot = repo / "snapshots" / ("0" * 40)
        tiny.unet.save_pretrained(snapshot / "unet")
        tiny.scheduler.save_pretrained(snapshot / "scheduler")
        (repo / "refs").mkdir()
        (repo / "refs" / "main").write_text("0" * 40)
        code = (
            "from pipeline.backbone.loading import load_backbone;"
            "print(load_backbone('nobody/tiny-ddpm').weights_sha256)"
        )
        env = {**os.environ, "HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HUB_OFFLINE": "1"}
        out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                             text=True, cwd=Path(__file__).parents[1])  # fmt: skip
        assert out.returncode == 0, out.stderr
        assert out.stdout.split()[-1] == tiny.weights_sha256


NATIVE = {"kernels": "AVX512", "native_bf16": True, "features": {}}
AVX2 = {"kernels": "AVX2", "native_bf16": False, "features": {"avx2": True}}


class TestAutoDtype:
    def test_a_cpu_without_native_bf16_is_fp32_at_once(self, tiny, monkeypatch):
        from pipeline.backbone import autotune

        def no_bf16(_bb):
            raise AssertionError("a bf16 copy was made on a CPU without native bf16")

        monkeypatch.setattr(autotune, "_bf16_copy", no_bf16)
        started = time.perf_counter()
        dtype, report = autotune.choose_cpu_dtype(tiny, torch.randn(2, 3, 32, 32), 0,
                                                  ["up1.res1"], None, capability=AVX2)  # fmt: skip
        assert dtype == torch.float32 and time.perf_counter() - started < 0.5
        assert report == {"capability": "AVX2", "native_bf16": False, "choice": "fp32",
                          "reason": "no native bf16 on this CPU"}  # fmt: skip

    def test_a_slow_bf16_is_abandoned_within_one_patch(self, tiny, monkeypatch):
        from pipeline.backbone import autotune

        made, seen = [], []
        real_copy = autotune._bf16_copy

        def slow_copy(bb):
            low = real_copy(bb)
            made.append(low)
            for m in low.unet.modules():  # 10 ms in front of every module: hundreds of ms
                m.register_forward_pre_hook(lambda *_: time.sleep(0.01))
            low.unet.register_forward_pre_hook(lambda _m, args: seen.append(args[0].shape[0]))
            return low

        monkeypatch.setattr(autotune, "_bf16_copy", slow_copy)
        started = time.perf_counter()
        dtype, report = autotune.choose_cpu_dtype(tiny, torch.randn(4, 3, 32, 32), 0,
                                                  ["up1.res1"], None, remember=False,
                                                  capability=NATIVE)  # fmt: skip
        trial = time.perf_counter() - started
        assert dtype == torch.float32 and report["bf16_s"] is None
        assert report["reason"] == "measured: bf16 not faster than fp32"
        assert len(made) == 1 and set(seen) == {1}  # one patch, never the batch
        assert trial < 0.5 + 4 * report["fp32_s"]  # abandoned, not run to the end

    def test_measures_once_and_leaves_the_weights_exact(self, tiny):
        from pipeline.backbone.autotune import choose_cpu_dtype

        before = tiny.weights_sha256
        x = torch.randn(2, 3, 32, 32)
        dtype, report = choose_cpu_dtype(tiny, x, 0, ["up1.res1"], None, capability=NATIVE)
        assert dtype in (torch.float32, torch.bfloat16)
        assert report["choice"] in ("fp32", "bf16") and report["fp32_s"] > 0
        assert report["native_bf16"] and report["capability"] == "AVX512"
        if report["bf16_s"] is not None:
            assert 0 < report["rel_error"] < 0.1
        assert _weights_hash(tiny.unet) == before and tiny.dtype == torch.float32
        again_dtype, again = choose_cpu_dtype(tiny, x, 0, ["up1.res1"], None, capability=NATIVE)
        assert again["cached"] and again_dtype == dtype


class TestTileLayout:
    def test_every_pixel_owned_exactly_once(self):
        layout = TileLayout(height=40, width=37, patch=32, stride=16, chunk_tiles=2)
        owned = np.zeros((40, 37), dtype=int)
        for ci in range(layout.chunks[0]):
            for cj in range(layout.chunks[1]):
                for ti, tj in layout.tiles_of_chunk(ci, cj):
                    owned[ti * 16 : ti * 16 + 16, tj * 16 : tj * 16 + 16] += 1
        assert (owned == 1).all()


class TestExtract:
    def test_stitching_takes_each_pixel_from_its_most_central_patch(self, tiny, scene, tmp_path):
        probe = _ProbeBackbone(tiny.unet, tiny.scheduler, "probe", "0" * 64)
        probe.sites = [Site("probe", "", 3, 32, 0)]
        out = tmp_path / "probe.zarr"
        extract_features(
            scene=scene,
            backbone=probe,
            timesteps=[10],
            sites=["probe"],
            out=out,
            stride=16,
            noise_seed=3,
        )
        got = _read_all(out, (10,), ["probe"]).astype(np.float32)
        from pipeline.scene.core import open_scene

        rgb = open_scene(scene).rgb * 2 - 1
        eps = seeded_noise((3, 32, 32), 3).numpy()
        abar = float(tiny.scheduler.alphas_cumprod[10])
        ys, xs = np.mgrid[0:40, 0:37]
        pad = (32 - 16) // 2  # each pixel sits at (pad + y % stride, pad + x % stride) of its patch
        noise = eps[:, pad + ys % 16, pad + xs % 16].transpose(1, 2, 0)
        expected = np.sqrt(abar) * rgb + np.sqrt(1 - abar) * noise
        np.testing.assert_allclose(got, expected, atol=2e-3)  # float16 storage

    def test_deterministic_bit_identical(self, scene, tmp_path):
        for name in ("a.zarr", "b.zarr"):
            extract_features(
                scene=scene,
                backbone="builtin:tiny",
                timesteps=[0, 25],
                sites=SITES,
                out=tmp_path / name,
                stride=16,
            )
        a = _read_all(tmp_path / "a.zarr", (0, 25))
        b = _read_all(tmp_path / "b.zarr", (0, 25))
        assert np.isfinite(a).all()
        assert a.tobytes() == b.tobytes()

    def test_truncated_equals_full_forward(self, tiny, scene, tmp_path):
        kw = dict(scene=scene, backbone=tiny, timesteps=[0], sites=["up0.res1"], stride=16)
        extract_features(out=tmp_path / "t.zarr", truncate=True, **kw)
        extract_features(out=tmp_path / "f.zarr", truncate=False, **kw)
        assert (
            _read_all(tmp_path / "t.zarr", sites=["up0.res1"]).tobytes()
            == _read_all(tmp_path / "f.zarr", sites=["up0.res1"]).tobytes()
        )

    @pytest.mark.parametrize("stop_after", [1, 2, 3])
    def test_resume_after_interruption_is_bit_identical(self, tiny, scene, tmp_path, stop_after):
        # 16-px chunks of 2x2 tiles: the 40x37 scene has 3x3 chunks, cut after 1, 2 or 3 of them
        kw = dict(
            scene=scene, backbone=tiny, timesteps=[0], sites=["up1.res1"], stride=8, chunk_tiles=2
        )
        extract_features(out=tmp_path / "ref.zarr", **kw)
        extract_until(stop_after, out=tmp_path / "cut.zarr", **kw)
        with pytest.raises(StoreError, match=r"is incomplete \(\d+/\d+ chunks\)"):
            FeatureCache.open(tmp_path / "cut.zarr")
        extract_features(out=tmp_path / "cut.zarr", **kw)
        ref = _read_all(tmp_path / "ref.zarr", sites=["up1.res1"])
        assert _read_all(tmp_path / "cut.zarr", sites=["up1.res1"]).tobytes() == ref.tobytes()

    def test_auto_dtype_resumes_with_the_dtype_it_started_with(self, scene, tmp_path):
        kw = dict(scene=scene, backbone="builtin:tiny", timesteps=[0], sites=["up1.res1"],
                  out=tmp_path / "c.zarr", stride=8, chunk_tiles=2)  # fmt: skip
        extract_until(1, dtype="bf16", **kw)
        extract_features(dtype="auto", **kw)  # not measured afresh: no identity mismatch
        cache = FeatureCache.open(tmp_path / "c.zarr")
        assert cache.attrs["identity"]["compute_dtype"] == "bfloat16"

    def test_other_parameters_refuse_to_mix(self, tiny, scene, tmp_path):
        kw = dict(scene=scene, backbone=tiny, sites=SITES, out=tmp_path / "c.zarr", stride=16)
        extract_until(1, timesteps=[0], **kw)
        with pytest.raises(StoreError, match=r"made with other inputs or parameters \(`timesteps`"):
            extract_features(timesteps=[25], **kw)

    def test_reader_refuses_another_scene(self, tiny, scene, tmp_path):
        extract_features(
            scene=scene,
            backbone=tiny,
            timesteps=[0],
            sites=SITES,
            out=tmp_path / "c.zarr",
            stride=16,
        )
        with pytest.raises(
            StoreError, match=r"was made from scene image ffffffffffff, not 000000000000"
        ):
            FeatureCache.open(tmp_path / "c.zarr", expect_fingerprint="0" * 64)

    def test_gather_matches_the_full_array(self, tiny, scene, tmp_path):
        extract_features(
            scene=scene,
            backbone=tiny,
            timesteps=[0, 25],
            sites=SITES,
            out=tmp_path / "c.zarr",
            stride=16,
        )
        cache = FeatureCache.open(tmp_path / "c.zarr")
        rows, cols = np.array([0, 39, 17, 3]), np.array([0, 36, 20, 30])
        got = cache.gather(rows, cols)
        full = _read_all(tmp_path / "c.zarr", (0, 25)).astype(np.float32)
        np.testing.assert_array_equal(got, full[rows, cols])
        assert got.shape == (4, cache.channels())

    def test_bad_parameters(self, tiny, scene, tmp_path):
        with pytest.raises(ConfigError, match=r"timestep 1000 is out of range"):
            extract_features(
                scene=scene, backbone=tiny, timesteps=[1000], sites=SITES, out=tmp_path / "x.zarr"
            )
        with pytest.raises(ConfigError, match=r"`stride=33` must be in 1..32"):
            extract_features(
                scene=scene,
                backbone=tiny,
                timesteps=[0],
                sites=SITES,
                out=tmp_path / "x.zarr",
                stride=33,
            )
        assert not (tmp_path / "x.zarr").exists()


class TestExtractCli:
    def test_layers_json(self, runner):
        result = runner.invoke(app, ["layers", "--backbone", "builtin:tiny", "--json"])
        assert result.exit_code == 0, result.output
        rows = json.loads(result.stdout)
        assert rows[0] == {"name": "mid", "channels": 32, "resolution": 16}

    def test_extract_end_to_end(self, runner, scene, tmp_path):
        out = tmp_path / "f.zarr"
        args = ["extract", "--scene", scene, "--backbone", "builtin:tiny", "--timesteps", "0,25",
                "--sites", ",".join(SITES), "--stride", "16", "--out", str(out)]  # fmt: skip
        result = runner.invoke(app, args)
        assert result.exit_code == 0, result.output
        assert FeatureCache.open(out).timesteps == [0, 25]
        again = runner.invoke(app, args)  # a finished cache: a no-op
        assert again.exit_code == 0

    def test_unknown_site_is_one_line(self, runner, scene, tmp_path):
        result = runner.invoke(
            app,
            [
                "extract",
                "--scene",
                scene,
                "--backbone",
                "builtin:tiny",
                "--sites",
                "up9",
                "--out",
                str(tmp_path / "f.zarr"),
            ],
        )
        assert result.exit_code == 2
        assert result.stderr.strip().splitlines() == [result.stderr.strip()]
        assert "unknown site `up9`" in result.stderr

    @pytest.mark.shared
    def test_salinas_a_end_to_end(self, runner, shared_data, tmp_path):
        d = shared_data / "salinasA"
        scene_path = tmp_path / "salinasA.zarr"
        prepare(
            out=scene_path,
            cube=d / "SalinasA_corrected.mat",
            labels=d / "SalinasA_gt.mat",
            rgb_mode="bands",
            rgb_bands=(29, 19, 9),
        )
        out = tmp_path / "f.zarr"
        result = runner.invoke(
            app,
            [
                "extract",
                "--scene",
                str(scene_path),
                "--backbone",
                "builtin:tiny",
                "--timesteps",
                "0",
                "--sites",
                "up1.res1",
                "--stride",
                "16",
                "--out",
                str(out),
            ],
        )
        assert result.exit_code == 0, result.output
        cache = FeatureCache.open(
            out,
            expect_fingerprint=__import__("pipeline.scene", fromlist=["open_scene"])
            .open_scene(scene_path)
            .image_fingerprint,
        )
        assert cache.shape == (83, 86)
        assert np.isfinite(cache.to_dask().compute()).all()


def _small_chunked_cache(scene, tmp_path, until=None):
    """A tiny-backbone cache of 3 x 3 chunks (16-px chunks of 8-px tiles) at ``tmp_path/c.zarr``,
    stopped after ``until`` chunks if given."""
    out = tmp_path / "c.zarr"
    kw = dict(scene=scene, backbone="builtin:tiny", timesteps=[0], sites=["up1.res1"], out=out,
              stride=8, chunk_tiles=2)  # fmt: skip
    extract_features(**kw) if until is None else extract_until(until, **kw)
    return out


class TestCacheCommands:
    def test_info_and_verify(self, runner, scene, tmp_path):
        out = tmp_path / "c.zarr"
        extract_features(  # fp32 fixed: `auto` takes bf16 on a CPU with native bf16
            scene=scene,
            backbone="builtin:tiny",
            timesteps=[0],
            sites=SITES,
            out=out,
            stride=16,
            dtype="fp32",
        )
        info = runner.invoke(app, ["cache", "info", str(out), "--json"])
        assert info.exit_code == 0, info.output
        rep = json.loads(info.stdout)
        assert rep["complete"] and rep["sites"] == SITES and 0 < rep["cache_to_raw"] < 0.5
        assert {(a["dtype"], a["compression"]) for a in rep["arrays"].values()} == {
            ("float16", "blosc zstd 3 bitshuffle")
        }
        text = runner.invoke(app, ["cache", "info", str(out)]).stdout
        assert "stored as float16, blosc zstd 3 bitshuffle" in text
        assert "computed in float32, zoom 1, noise draws 1" in text
        ok = runner.invoke(app, ["cache", "verify", str(out), "--scene", scene])
        assert ok.exit_code == 0 and "ok" in ok.stdout

    def test_verify_finds_a_missing_chunk(self, runner, scene, tmp_path):
        out = _small_chunked_cache(scene, tmp_path)
        chunk = next(p for p in (out / "t0" / "up1.res1" / "c").rglob("*") if p.is_file())
        chunk.unlink()
        result = runner.invoke(app, ["cache", "verify", str(out)])
        assert result.exit_code == 1
        assert "missing or non-finite values" in result.stderr

    def test_unfinished_cache_fails_verify(self, runner, scene, tmp_path):
        out = _small_chunked_cache(scene, tmp_path, until=1)
        result = runner.invoke(app, ["cache", "verify", str(out)])
        assert result.exit_code == 1 and "8 of 9 chunks not written" in result.stderr


class TestBenchExtract:
    def test_json_figures(self, runner):
        result = runner.invoke(
            app,
            ["bench", "extract", "--backbone", "builtin:tiny", "--naive-patches", "2", "--json"],
        )
        assert result.exit_code == 0, result.output
        figures = json.loads(result.stdout)
        assert list(figures) == [
            "patches_per_s", "first_chunk_s", "fp32_first_chunk_s", "first_chunk_ratio",
            "gflops", "matmul_gflops", "ratio_to_matmul", "write_mb_per_s", "cache_to_raw",
            "naive_speedup",
        ]  # fmt: skip
        assert all(v > 0 for v in figures.values())
        assert figures["first_chunk_ratio"] == pytest.approx(
            figures["first_chunk_s"] / figures["fp32_first_chunk_s"]
        )
        assert figures["ratio_to_matmul"] == pytest.approx(
            figures["gflops"] / figures["matmul_gflops"]
        )
        assert figures["cache_to_raw"] < 1  # float16 + compression beat raw fp32

    def test_unknown_site_is_one_line(self, runner):
        result = runner.invoke(app, ["bench", "extract", "--backbone", "builtin:tiny",
                                     "--sites", "up9.res9"])  # fmt: skip
        assert result.exit_code == 2 and "unknown site `up9.res9`" in result.stderr


def test_ctrl_c_says_that_running_again_resumes(runner, scene, tmp_path, monkeypatch):
    import pipeline.features.extract as extract_module

    def interrupted(*_args, **_kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(extract_module, "extract_features", interrupted)
    result = runner.invoke(app, ["extract", "--scene", scene, "--backbone", "builtin:tiny",
                                 "--timesteps", "0", "--sites", "up1.res1", "--out",
                                 str(tmp_path / "f.zarr")])  # fmt: skip
    assert result.exit_code == 130
    assert "interrupted: run the same command again to resume" in result.stderr
