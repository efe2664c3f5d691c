"""Runs survive damage: corrupt checkpoints, another configuration, retention, full disks (real subprocesses).

Exact resume after kill -9 and SIGTERM: test_training_loop and test_safety."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

from engine.checkpoint import CheckpointManager, verify
from tests.helpers import REPO, config_flags, read_history, run_engine, tiny_config

pytestmark = pytest.mark.slow


def _flags(run_dir, **overrides):
    return config_flags(tiny_config(run_dir, **overrides))


def test_a_corrupt_newest_checkpoint_is_reported_and_the_run_falls_back(tmp_path):
    run_dir = tmp_path / "run"
    run_engine(_flags(run_dir, epochs=2), check=True)
    manager = CheckpointManager(directory=str(run_dir / "checkpoints"))
    newest, previous = manager.entries()[-1], manager.entries()[-2]
    data = [n for n in os.listdir(newest.path) if n.startswith("ckpt.data")][0]
    with open(os.path.join(newest.path, data), "r+b") as f:
        f.seek(100)
        byte = f.read(1)
        f.seek(100)
        f.write(bytes([byte[0] ^ 0xFF]))
    out = run_engine(_flags(run_dir, epochs=3), check=True).stdout
    assert os.path.basename(newest.path) in out and "corrupt" in out
    assert f"Resumed from {previous.path}" in out


def test_a_different_configuration_in_the_run_directory_is_refused(tmp_path):
    run_dir = tmp_path / "run"
    run_engine(_flags(run_dir, epochs=1), check=True)
    before = sorted(os.listdir(run_dir / "checkpoints"))
    proc = run_engine(_flags(run_dir, epochs=1, base_filters=8))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "--base_filters: run has 4, flags say 8" in proc.stderr
    assert sorted(os.listdir(run_dir / "checkpoints")) == before  # (--overwrite: test_safety)


def test_retention_keeps_the_latest_n_plus_the_best(tmp_path):
    run_dir = tmp_path / "run"
    # A learning rate this high makes validation loss jump around, so the best is rarely the newest.
    run_engine(_flags(run_dir, epochs=6, keep_checkpoints=2, monitor="val_dice"), check=True)
    manager = CheckpointManager(directory=str(run_dir / "checkpoints"), monitor="val_dice", mode="max")
    entries = manager.entries()
    history = read_history(run_dir)
    best_epoch = max(history, key=lambda h: (h["val_dice"], -h["epoch"]))["epoch"]
    kept_epochs = sorted(e.epoch for e in entries)
    assert kept_epochs[-2:] == [5, 6]
    assert best_epoch in kept_epochs
    assert len(entries) == (2 if best_epoch >= 5 else 3)
    for entry in entries:  # each kept checkpoint carries the hashes it verifies against
        with open(os.path.join(entry.path, "state.json")) as f:
            assert json.dumps(json.load(f)["files"]).count("sha256") >= 2
        verify(entry)


@pytest.mark.skipif(shutil.which("unshare") is None or os.geteuid() != 0,
                    reason="needs root and unshare to mount a tiny private tmpfs")
def test_a_full_disk_gives_a_clear_error_and_keeps_earlier_checkpoints(tmp_path):
    mount = tmp_path / "tiny"
    mount.mkdir()
    run_dir = mount / "run"
    flags_one = " ".join(_flags(run_dir, epochs=1, cache_dir=str(tmp_path / "cache")))
    flags_two = " ".join(_flags(run_dir, epochs=3, cache_dir=str(tmp_path / "cache")))
    python = sys.executable
    script = f"""
set -u
mount -t tmpfs -o size=4m tmpfs {mount} || exit 77
cd {REPO}
{python} -m engine.main {flags_one} > {tmp_path}/first.log 2>&1 || exit 10
# Fill the disk, leaving room for small files but too little for the next checkpoint.
avail=$(df --output=avail -k {mount} | tail -1)
dd if=/dev/zero of={mount}/filler bs=1k count=$((avail - 24)) 2>/dev/null
{python} -m engine.main {flags_two} > {tmp_path}/second.out 2> {tmp_path}/second.err
echo $? > {tmp_path}/second.rc
cp -a {run_dir}/checkpoints {tmp_path}/kept  # the mount goes with this shell
"""
    proc = subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-c", script],
                          capture_output=True, text=True, timeout=600,
                          env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"})
    if proc.returncode == 77:
        pytest.skip("mounting a tmpfs is not permitted here")
    assert proc.returncode == 0, proc.stdout + proc.stderr + (tmp_path / "first.log").read_text()
    rc = int((tmp_path / "second.rc").read_text())
    err = (tmp_path / "second.err").read_text()
    assert rc == 1, err
    assert "Traceback" not in err
    assert "No space left on device" in err and str(run_dir) in err
    entries = CheckpointManager(directory=str(tmp_path / "kept")).entries()
    assert entries and [verify(e).step for e in entries] == [e.step for e in entries]
