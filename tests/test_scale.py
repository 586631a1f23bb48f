"""Scale-out: extraction and prediction on dask.distributed, and stores on a real S3 API (moto
in server mode on a free loopback port)."""

from __future__ import annotations

import logging
import os
import signal

import numpy as np
import pytest

from pipeline.evaluation.scoring import predict_map
from pipeline.features.cache import FeatureCache, verify_cache
from pipeline.features.extract import extract_features
from pipeline.heads.training import train_head
from pipeline.io.cluster import dask_client, worker_loads
from pipeline.scene.core import open_scene
from stages.cli import app
from tests.interrupt import extract_until

# 96 x 96 synthetic scene, 16-px chunks of 8-px tiles: 36 chunk tasks
KW = dict(backbone="builtin:tiny", timesteps=[0, 25], sites=["up1.res1"], stride=8,
          chunk_tiles=2, threads=1)  # fmt: skip


def _features(path) -> np.ndarray:
    return np.asarray(FeatureCache.open(path).to_dask().compute())


@pytest.fixture(scope="module")
def reference(scene, tmp_path_factory) -> str:
    """The single-process cache every other way of computing it must equal, byte for byte."""
    out = tmp_path_factory.mktemp("ref") / "f.zarr"
    extract_features(scene=scene, out=out, **KW)
    return str(out)


@pytest.fixture(scope="module")
def client():
    with dask_client(workers=2) as c:
        yield c


class TestDistributed:
    def test_two_workers_bit_identical_and_one_backbone_load_per_worker(
        self, client, scene, reference, tmp_path
    ):
        extract_features(scene=scene, out=tmp_path / "d.zarr", client=client, **KW)
        assert _features(tmp_path / "d.zarr").tobytes() == _features(reference).tobytes()
        loads = client.run(worker_loads)
        assert len(loads) == 2
        assert all(n.get("backbone", 0) <= 1 for n in loads.values())
        assert sum(n.get("backbone", 0) for n in loads.values()) >= 1
        assert verify_cache(tmp_path / "d.zarr") == []

    def test_cluster_resumes_a_single_process_start(self, client, scene, reference, tmp_path):
        out = tmp_path / "r.zarr"
        extract_until(5, scene=scene, out=out, **KW)
        extract_features(scene=scene, out=out, client=client, **KW)
        assert _features(out).tobytes() == _features(reference).tobytes()

    def test_predict_on_the_cluster_equals_local(self, client, scene, reference, tmp_path):
        head = tmp_path / "head"
        train_head(scene=scene, cache=reference, head="logreg", out=head)
        local = predict_map(scene=scene, cache=reference, head=head, out=tmp_path / "a.npy",
                            confidence=tmp_path / "ca.npy", block=40)  # fmt: skip
        remote = predict_map(scene=scene, cache=reference, head=head, out=tmp_path / "b.npy",
                             confidence=tmp_path / "cb.npy", block=40, client=client)  # fmt: skip
        assert local["blocks"] == remote["blocks"] == 9
        np.testing.assert_array_equal(np.load(tmp_path / "a.npy"), np.load(tmp_path / "b.npy"))
        np.testing.assert_array_equal(np.load(tmp_path / "ca.npy"), np.load(tmp_path / "cb.npy"))

    def test_cli_workers_is_bit_identical_and_prints_the_dashboard(self, runner, scene, tmp_path):
        args = ["extract", "--scene", scene, "--backbone", "builtin:tiny", "--timesteps", "0,25",
                "--sites", "up1.res1", "--stride", "8", "--threads", "1"]  # fmt: skip
        single = runner.invoke(app, [*args, "--out", str(tmp_path / "s.zarr")])
        assert single.exit_code == 0, single.output
        result = runner.invoke(app, [*args, "--workers", "2", "--out", str(tmp_path / "c.zarr")])
        assert result.exit_code == 0, result.output
        assert "dask dashboard: http://" in result.stderr
        assert (_features(tmp_path / "c.zarr").tobytes()
                == _features(tmp_path / "s.zarr").tobytes())  # fmt: skip

    def test_workers_and_scheduler_are_exclusive(self, runner, scene, tmp_path):
        result = runner.invoke(app, [
            "extract", "--scene", scene, "--backbone", "builtin:tiny", "--sites", "up1.res1",
            "--workers", "2", "--scheduler", "tcp://127.0.0.1:1", "--out", str(tmp_path / "x"),
        ])  # fmt: skip
        assert result.exit_code == 2 and "not both" in result.stderr

    def test_a_worker_killed_mid_task_is_replaced_and_the_cache_is_identical(
        self, scene, reference, tmp_path
    ):
        from distributed.diagnostics.plugin import WorkerPlugin

        marker = tmp_path / "killed"

        class KillOnce(WorkerPlugin):
            """SIGKILL the first worker that starts a chunk task (once, cluster-wide)."""

            def transition(self, key, start, finish, **kwargs):
                if finish != "executing" or "hsicache-chunk" not in str(key):
                    return
                try:
                    os.close(os.open(marker, os.O_CREAT | os.O_EXCL))
                except FileExistsError:
                    return
                os.kill(os.getpid(), signal.SIGKILL)

        with dask_client(workers=2) as fresh:
            fresh.register_plugin(KillOnce())
            extract_features(scene=scene, out=tmp_path / "k.zarr", client=fresh, **KW)
        assert marker.exists()
        assert _features(tmp_path / "k.zarr").tobytes() == _features(reference).tobytes()


@pytest.fixture(scope="session")
def s3_bucket():
    """``s3://hsicache-test`` on a moto server on a free loopback port, for this session."""
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    env = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
           "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL": f"http://{host}:{port}"}  # fmt: skip
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    import s3fs

    s3fs.S3FileSystem.clear_instance_cache()
    s3fs.S3FileSystem().mkdir("hsicache-test")
    try:
        yield "s3://hsicache-test"
    finally:
        s3fs.S3FileSystem.clear_instance_cache()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        server.stop()


class TestObjectStorage:
    def test_prepare_extract_resume_and_read_back_through_s3(
        self, s3_bucket, runner, scene, reference, tmp_path
    ):
        url_scene, url_cache = f"{s3_bucket}/scene.zarr", f"{s3_bucket}/f.zarr"
        done = runner.invoke(app, ["prepare", "--builtin", "synthetic", "--per-class", "3",
                                   "--seed", "0", "--out", url_scene])  # fmt: skip
        assert done.exit_code == 0, done.output
        assert open_scene(url_scene).fingerprint == open_scene(scene).fingerprint
        extract_until(4, scene=url_scene, out=url_cache, **KW)
        with pytest.raises(Exception, match=r"is incomplete \(4/36 chunks\)"):
            FeatureCache.open(url_cache)
        extract_features(scene=url_scene, out=url_cache, **KW)  # resumes
        assert _features(url_cache).tobytes() == _features(reference).tobytes()
        verified = runner.invoke(app, ["cache", "verify", url_cache, "--scene", url_scene])
        assert verified.exit_code == 0, verified.output
        info = runner.invoke(app, ["cache", "info", url_cache, "--json"])
        assert info.exit_code == 0 and '"bytes_on_disk"' in info.stdout
        trained = runner.invoke(app, ["train", "--scene", url_scene, "--features", url_cache,
                                      "--head", "logreg", "--out", str(tmp_path / "h")])  # fmt: skip
        assert trained.exit_code == 0, trained.output
        mapped = runner.invoke(app, ["predict", "--scene", url_scene, "--features", url_cache,
                                     "--head", str(tmp_path / "h"),
                                     "--out", str(tmp_path / "m.npy")])  # fmt: skip
        assert mapped.exit_code == 0, mapped.output
        assert np.load(tmp_path / "m.npy").shape == (96, 96)

    def test_missing_store_and_bucket_are_one_line(self, s3_bucket, runner):
        for url in (f"{s3_bucket}/nothing.zarr", "s3://no-such-bucket/f.zarr"):
            result = runner.invoke(app, ["cache", "info", url])
            assert result.exit_code == 2, result.output
            assert len(result.stderr.strip().splitlines()) == 1 and url in result.stderr
