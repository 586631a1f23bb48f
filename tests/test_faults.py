"""Faults: SIGKILL at seven points of an extraction, a full disk, a read-only store, and two
writers on one store. Every interrupted store is resumed to the bytes of an uninterrupted run."""

from __future__ import annotations

import errno
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from pipeline.errors import HsicacheError
from pipeline.features.cache import FeatureCache, verify_cache
from pipeline.features.extract import extract_features
from pipeline.io.storage import LOCK_KEY
from stages.cli import app
from tests.interrupt import extract_until
from tests.killpoint import POINTS

HERE = Path(__file__).resolve().parent
# 96 x 96 synthetic scene, 16-px chunks of 8-px tiles: 36 chunks, 4 forward passes each
KW = dict(backbone="builtin:tiny", timesteps=[0, 25], sites=["up1.res1"], stride=8,
          chunk_tiles=2, threads=1, batch_size=1)  # fmt: skip
CLI = ["extract", "--backbone", "builtin:tiny", "--timesteps", "0,25", "--sites", "up1.res1",
       "--stride", "8", "--chunk-tiles", "2", "--threads", "1", "--batch-size", "1"]  # fmt: skip


def _features(path) -> bytes:
    return np.asarray(FeatureCache.open(path).to_dask().compute()).tobytes()


def _chunks_done(err: Exception) -> int:
    """``n`` of "is incomplete (n/36 chunks)"."""
    return int(re.search(r"is incomplete \((\d+)/36 chunks\)", str(err)).group(1))


def _one_line(result) -> str:
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.output
    return lines[0]


@pytest.fixture(scope="module")
def reference(scene, tmp_path_factory) -> bytes:
    out = tmp_path_factory.mktemp("ref") / "f.zarr"
    extract_features(scene=scene, out=out, **KW)
    return _features(out)


# the N-th time the point is reached; forward 7: the 2nd chunk's 3rd of 8 passes
KILLS = {"locked": 1, "created": 1, "forward": 7, "between-arrays": 4, "before-done-flag": 3,
         "after-done-flag": 5, "before-complete": 2}  # fmt: skip


@pytest.mark.parametrize("point", POINTS)
def test_sigkill_then_rerun_is_bit_identical(point, scene, reference, tmp_path):
    out = tmp_path / "f.zarr"
    killed = subprocess.run(
        [sys.executable, str(HERE / "killpoint.py"), point, str(KILLS[point]), "--",
         *CLI, "--scene", scene, "--out", str(out)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert killed.returncode == -9, killed.stderr[-2000:]
    with pytest.raises(HsicacheError, match=r"does not exist|is incomplete"):
        FeatureCache.open(out)
    assert (out / LOCK_KEY).exists()  # the dead writer's lock: the rerun takes it over
    extract_features(scene=scene, out=out, **KW)
    assert _features(out) == reference
    assert verify_cache(out) == []
    assert not (out / LOCK_KEY).exists()


def test_a_live_writer_locks_out_a_second_one(runner, scene, reference, tmp_path):
    out = tmp_path / "f.zarr"
    holder = subprocess.Popen(
        [sys.executable, "-c",
         "import sys, time\nfrom pipeline.io.storage import Location, StoreLock\n"
         f"StoreLock(Location.of({str(out)!r})).__enter__()\nprint('locked', flush=True)\n"
         "time.sleep(120)"],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert holder.stdout.readline().strip() == "locked"
        refused = runner.invoke(app, [*CLI, "--scene", scene, "--out", str(out)])
        assert refused.exit_code == 2
        line = _one_line(refused)
        assert f"is being written by pid {holder.pid}" in line and "or stop it" in line
        unlock = runner.invoke(app, ["cache", "unlock", str(out)])  # a live writer's lock stays
        assert unlock.exit_code == 2 and "still running" in _one_line(unlock)
        assert (out / LOCK_KEY).is_file()
    finally:
        holder.kill()
        holder.wait()
    done = runner.invoke(app, [*CLI, "--scene", scene, "--out", str(out)])  # its writer died
    assert done.exit_code == 0, done.output
    assert _features(out) == reference


def test_a_lock_from_another_host_needs_cache_unlock(runner, scene, tmp_path):
    out = tmp_path / "f.zarr"
    out.mkdir()
    (out / LOCK_KEY).write_text('{"host": "node-17", "pid": 4242, "token": "x", "started": 0}')
    refused = runner.invoke(app, [*CLI, "--scene", scene, "--out", str(out)])
    assert refused.exit_code == 2 and "pid 4242 on node-17" in _one_line(refused)
    unlocked = runner.invoke(app, ["cache", "unlock", str(out)])
    assert unlocked.exit_code == 0 and "node-17" in unlocked.stdout
    assert runner.invoke(app, [*CLI, "--scene", scene, "--out", str(out)]).exit_code == 0


def test_unlock_says_what_it_found(runner, tmp_path):
    out = tmp_path / "f.zarr"
    out.mkdir()
    (out / LOCK_KEY).write_text("not json")
    garbage = runner.invoke(app, ["cache", "unlock", str(out)])
    assert garbage.exit_code == 0 and "could not be read" in garbage.stdout
    assert not (out / LOCK_KEY).exists()


def _mount_tmpfs(where: Path, size: str) -> bool:
    where.mkdir(parents=True, exist_ok=True)
    ok = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)],
                        capture_output=True).returncode == 0  # fmt: skip
    return ok


@pytest.fixture
def small_disk(tmp_path):
    """A 4 MiB tmpfs (needs the right to mount, else the test is skipped)."""
    disk = tmp_path / "disk"
    if shutil.which("mount") is None or not _mount_tmpfs(disk, "4m"):
        pytest.skip("cannot mount a small tmpfs here (needs root/CAP_SYS_ADMIN)")
    try:
        yield disk
    finally:
        subprocess.run(["umount", "-l", str(disk)], capture_output=True)


def test_disk_full_is_one_line_and_resumes(runner, scene, reference, tmp_path, small_disk):
    # leave room for about a third of the cache (its chunks compress to ~1.1 MB in all)
    free = os.statvfs(small_disk)
    filler = small_disk / "filler"
    filler.write_bytes(b"\0" * (free.f_bavail * free.f_frsize - 400_000))
    out = small_disk / "f.zarr"
    full = runner.invoke(app, [*CLI, "--scene", scene, "--out", str(out)])
    assert full.exit_code == 2
    line = _one_line(full)
    assert f"cannot write feature cache `{out}`" in line and "No space left on device" in line
    assert "re-run the same command to resume" in line
    with pytest.raises(HsicacheError, match=r"is incomplete") as err:
        FeatureCache.open(out)
    assert 0 < _chunks_done(err.value) < 36  # the chunks written before the disk filled stay
    assert not (out / LOCK_KEY).exists()
    filler.unlink()
    resumed = runner.invoke(app, [*CLI, "--scene", scene, "--out", str(out)])
    assert resumed.exit_code == 0, resumed.output
    assert _features(out) == reference


def _fill(disk: Path, leave: int) -> None:
    free = os.statvfs(disk)
    (disk / "filler").write_bytes(b"\0" * (free.f_bavail * free.f_frsize - leave))


def test_a_full_disk_names_the_output_and_leaves_nothing(runner, small_disk):
    """zarr writes chunks concurrently: the writes in flight when the disk filled must not
    recreate the temporary store after it was removed, nor print asyncio's complaints."""
    _fill(small_disk, 200_000)
    out = small_disk / "s.zarr"
    full = runner.invoke(app, ["prepare", "--builtin", "indian_pines", "--out", str(out)])
    assert full.exit_code == 2
    assert _one_line(full) == f"error: No space left on device: `{out}`"
    assert sorted(p.name for p in small_disk.iterdir()) == ["filler"]


def test_pretrain_on_a_full_disk_is_one_line(runner, small_disk, tmp_path):
    from skimage.io import imsave

    photos = tmp_path / "photos"
    photos.mkdir()
    photo = np.random.default_rng(0).integers(0, 255, size=(48, 48, 3), dtype=np.uint8)
    imsave(photos / "a.png", photo, check_contrast=False)
    _fill(small_disk, 60_000)  # less than one checkpoint of this tiny UNet
    out = small_disk / "bb"
    full = runner.invoke(app, ["pretrain", "--out", str(out), "--images", str(photos),
                               "--no-builtin-photos", "--block-out-channels", "8,16", "--crop",
                               "16", "--sample-size", "16", "--batch-size", "2", "--steps", "2"])  # fmt: skip
    assert full.exit_code == 2, full.output
    assert _one_line(full) == f"error: No space left on device: `{small_disk / 'bb.partial'}`"
    assert not list(small_disk.rglob("*.tmp*"))


def test_predict_on_a_full_disk_is_one_line(runner, scene, small_disk, tmp_path):
    """The maps are memory-mapped: a sparse file on a full disk ended in SIGBUS (exit 135),
    leaving its temporary file; its blocks are now reserved before any page is written."""
    from pipeline.heads.training import train_head

    train_head(scene=scene, cache=None, head="spectral", out=tmp_path / "h")
    _fill(small_disk, 16_000)  # less than the 96 x 96 int32 map
    out = small_disk / "p.npy"
    full = runner.invoke(app, ["predict", "--scene", scene, "--head", str(tmp_path / "h"),
                               "--out", str(out)])  # fmt: skip
    assert full.exit_code == 2, full.output
    assert _one_line(full) == f"error: No space left on device: `{out}`"
    assert sorted(p.name for p in small_disk.iterdir()) == ["filler"]


def _deny_writes(folder: Path) -> str | None:
    """Make ``folder`` refuse new files for real: chmod, or chattr +i as root. Returns the undo
    command's tool, or None when this machine allows neither."""
    if os.geteuid() != 0:
        folder.chmod(0o555)
        return "chmod"
    if shutil.which("chattr") and subprocess.run(["chattr", "+i", str(folder)],
                                                 capture_output=True).returncode == 0:  # fmt: skip
        return "chattr"
    return None


def _allow_writes(folder: Path, tool: str) -> None:
    if tool == "chmod":
        folder.chmod(0o755)
    else:
        subprocess.run(["chattr", "-i", str(folder)], check=True)


def test_permission_denied_is_one_line_and_resumes(runner, scene, reference, tmp_path):
    out = tmp_path / "f.zarr"
    extract_until(3, scene=scene, out=out, **KW)
    chunks = out / "t0" / "up1.res1" / "c"
    tool = _deny_writes(chunks)
    if tool is None:
        pytest.skip("no way to deny writes here (root without chattr)")
    try:
        denied = runner.invoke(app, [*CLI, "--scene", scene, "--out", str(out)])
        assert denied.exit_code == 2
        line = _one_line(denied)
        reason = os.strerror(errno.EACCES if tool == "chmod" else errno.EPERM)
        assert f"cannot write feature cache `{out}`: {reason}" in line
    finally:
        _allow_writes(chunks, tool)
    with pytest.raises(HsicacheError, match=r"is incomplete") as err:
        FeatureCache.open(out)
    assert 3 <= _chunks_done(err.value) < 36  # (chunks in existing row folders still went in)
    resumed = runner.invoke(app, [*CLI, "--scene", scene, "--out", str(out)])
    assert resumed.exit_code == 0, resumed.output
    assert _features(out) == reference


def test_lock_waits_for_nobody_after_a_clean_run(scene, tmp_path):
    out = tmp_path / "f.zarr"
    started = time.perf_counter()
    extract_features(scene=scene, out=out, **KW)
    extract_features(scene=scene, out=out, **KW)  # a finished cache: a quick no-op, unlocked
    assert not (out / LOCK_KEY).exists() and time.perf_counter() - started < 120
