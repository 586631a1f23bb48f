"""Shared fixtures: the tiny generated scenes, the real data in ../shared/data, a CLI runner."""

from __future__ import annotations

import os
from pathlib import Path

import matplotlib
import pytest
from typer.testing import CliRunner

matplotlib.use("agg")


def pytest_configure(config: pytest.Config) -> None:
    """Under pytest-xdist (``-n N``) each worker takes its share of the cores, so N workers'
    torch and BLAS threads do not outnumber them (oversubscribed, they run many times slower);
    the command-line runs the tests start inherit the same share."""
    workers = os.environ.get("PYTEST_XDIST_WORKER_COUNT")
    if not workers:
        return
    import torch
    from threadpoolctl import threadpool_limits

    from pipeline.utils.devices import usable_cores

    share = str(max(1, usable_cores() // int(workers)))
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ.setdefault(var, share)

    torch.set_num_threads(int(share))
    threadpool_limits(int(share))  # BLAS was loaded (by numpy) before these variables were set


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Tests marked ``slow`` first (in order otherwise): under pytest-xdist a worker starts the
    minutes-long DVC test at once and the others share the rest, instead of everyone waiting for
    it at the end."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)


ROOT = Path(__file__).resolve().parents[1]
SCENES = Path(__file__).resolve().parent / "data" / "scenes"


def shared_data_dir() -> Path:
    """``$HSICACHE_SHARED_DATA`` or ``../shared/data`` beside the repository."""
    return Path(os.environ.get("HSICACHE_SHARED_DATA", ROOT.parent / "shared" / "data"))


@pytest.fixture
def scenes() -> Path:
    """Folder of the tiny fixtures written by ``tests/data/scenes/make.py``."""
    return SCENES


@pytest.fixture
def shared_data() -> Path:
    """The real data folder; the test is skipped when it is absent."""
    path = shared_data_dir()
    if not path.is_dir():
        pytest.skip(f"real data not found at {path} (set HSICACHE_SHARED_DATA)")
    return path


@pytest.fixture
def runner() -> CliRunner:
    return CliRunner()


def leftovers(folder: Path) -> list[str]:
    """Names in ``folder`` (temporary files of atomic writes included)."""
    return sorted(p.name for p in folder.iterdir())


@pytest.fixture(autouse=True, scope="session")
def _private_user_cache(tmp_path_factory) -> None:
    """Measured choices (pipeline.backbone.autotune) go to a throw-away cache, not the user's."""
    os.environ["XDG_CACHE_HOME"] = str(tmp_path_factory.mktemp("xdg-cache"))


@pytest.fixture(scope="module")
def scene(tmp_path_factory) -> str:
    """A 96 x 96 synthetic scene store, 3 labels per class (one per test module that asks)."""
    from pipeline.scene.preparation import prepare

    path = tmp_path_factory.mktemp("scene") / "scene.zarr"
    prepare(out=path, builtin="synthetic", per_class=3, seed=0)
    return str(path)
