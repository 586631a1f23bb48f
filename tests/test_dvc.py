"""The DVC pipeline on a copy of the repository: it runs, and re-runs only what a change touches."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]

TINY_PARAMS = {
    "prepare": {"builtin": "synthetic", "split": "per-class", "per_class": 5, "seed": 0},
    "pretrain": {"shipped": None, "builtin_photos": False, "block_out_channels": [8, 16],
                 "crop": 16, "sample_size": 32, "batch_size": 4, "steps": 4, "device": "cpu"},
    "context": {"components": 4, "windows": [3, 7], "emp_components": 0, "slic_sizes": []},
    "extract": {"backbone": "cache/backbone", "timesteps": [0], "sites": ["up1.res0"],
                "stride": 16, "batch_size": 16, "device": "cpu", "dtype": "fp32"},
    "train": {"seed": 0},
    "heads": {"spectral": {"hidden": 16, "max_epochs": 5},
              "spatial": {"hidden": 16, "max_epochs": 5}},
    "compare": {"heads": ["spectral", "spatial"], "seeds": [0, 1]},
    "curve": {"heads": ["spectral"], "per_class": [2, 5], "seeds": [0]},
}  # fmt: skip


def _run(cwd: Path, *args: str) -> str:
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    proc = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"{' '.join(args)} failed:\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout + proc.stderr


def _ran(output: str) -> set[str]:
    return set(re.findall(r"Running stage '([^']+)'", output))


def _write_params(repo: Path, params: dict) -> None:
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


@pytest.mark.slow
def test_repro_runs_everything_then_only_what_changed(tmp_path):
    if shutil.which("git") is None:
        pytest.skip("git is not installed")
    repo = tmp_path / "repo"
    files = _run(REPO, "git", "ls-files").split()
    for name in files:
        if (REPO / name).is_file():
            (repo / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, repo / name)
    # a tiny photo folder instead of the bundled photographs keeps pretraining to seconds
    from skimage.io import imsave

    (repo / "photos").mkdir()
    rng = np.random.default_rng(0)
    for k in range(2):
        imsave(repo / "photos" / f"p{k}.png", rng.integers(0, 255, (48, 48, 3), dtype=np.uint8),
               check_contrast=False)  # fmt: skip
    params = {**TINY_PARAMS, "pretrain": {**TINY_PARAMS["pretrain"], "images": "photos"}}
    _write_params(repo, params)
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@example.org"]
    _run(repo, "git", "init", "-q")
    _run(repo, *git, "add", "-A")
    _run(repo, *git, "commit", "-qm", "copy")
    dvc = [sys.executable, "-m", "dvc"]

    # (1) everything runs and writes metrics and maps
    out = _run(repo, *dvc, "repro")
    heads = {"spectral", "spatial"}
    expected = {"prepare", "pretrain", "context", "extract", "compare", "curve"} | {
        f"{stage}@{h}" for stage in ("train", "evaluate", "predict") for h in heads
    }
    assert _ran(out) == expected
    for h in heads:
        assert (repo / "metrics" / f"{h}.json").is_file()
        assert (repo / "cache" / "maps" / f"{h}.npy").is_file()
    assert "spatial" in _run(repo, *dvc, "metrics", "show")

    # (2) a second repro runs nothing
    assert _ran(_run(repo, *dvc, "repro")) == set()

    # (3) a new head, and one head's parameter, run only those heads' stages
    params["heads"]["logreg_spec"] = {"kind": "logreg", "use": "spectral"}
    params["heads"]["spectral"] = {"hidden": 24, "max_epochs": 5}
    _write_params(repo, params)
    out = _run(repo, *dvc, "repro")
    assert _ran(out) == {"compare", "curve"} | {
        f"{stage}@{h}" for stage in ("train", "evaluate", "predict")
        for h in ("logreg_spec", "spectral")
    }  # fmt: skip

    # (4) an extraction parameter makes extraction alone stale, not pretraining; its new
    #     features make every stage that reads them stale (DVC runs what follows from there,
    #     as step 3 saw; running extraction alone keeps this test to minutes)
    lock = (repo / "dvc.lock").read_text()
    params["extract"]["noise_seed"] = 1
    _write_params(repo, params)
    assert _changed_deps(repo) == {"extract"}
    assert _ran(_run(repo, *dvc, "repro", "--single-item", "extract")) == {"extract"}
    readers = {f"train@{h}" for h in params["heads"]} | {"compare", "curve"}
    assert _changed_deps(repo) == readers
    params["extract"].pop("noise_seed")  # back to step 3's state: its lock and features
    _write_params(repo, params)
    (repo / "dvc.lock").write_text(lock)
    _run(repo, *dvc, "checkout", "--force", "extract")
    assert _changed_deps(repo) == set()

    # (5) editing a library module makes `dvc status` report exactly the stages importing it
    per_head = {f"{s}@{h}" for s in ("train", "evaluate", "predict") for h in params["heads"]}
    for module, importers in {
        "pipeline/heads/semisupervised.py": per_head | {"compare", "curve"},
        "pipeline/backbone/adm.py": {"pretrain", "extract"},
        "stages/context.py": {"context"},
    }.items():
        path = repo / module
        source = path.read_text()
        path.write_text(source + "\n# an edit\n")
        assert _changed_deps(repo) == importers, module
        path.write_text(source)
    assert _changed_deps(repo) == set()


def _changed_deps(repo: Path) -> set[str]:
    """The stages `dvc status` reports with changed deps."""
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    cmd = [sys.executable, "-m", "dvc", "status", "--json"]
    proc = subprocess.run(cmd, cwd=repo, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    status = json.loads(proc.stdout)
    return {
        stage
        for stage, changes in status.items()
        if any(isinstance(c, dict) and "changed deps" in c for c in changes)
    }
