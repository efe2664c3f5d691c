"""Runs survive anything: exact resume, kill -9, SIGTERM, corrupt checkpoints, full disks (real subprocesses)."""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import tensorflow as tf

from engine.checkpoint import CheckpointManager, verify
from tests.helpers import REPO, config_flags, read_history, run_engine, tiny_config

pytestmark = pytest.mark.slow


def _flags(run_dir, **overrides):
    return config_flags(tiny_config(run_dir, **overrides))


def _checkpoint_values(run_dir) -> dict[str, np.ndarray]:
    """Every variable of the newest checkpoint, by its checkpoint key."""
    latest = CheckpointManager(directory=os.path.join(run_dir, "checkpoints")).latest()
    reader = tf.train.load_checkpoint(os.path.join(latest.path, "ckpt"))
    return {k: reader.get_tensor(k) for k in reader.get_variable_to_shape_map()
            if "OBJECT_GRAPH" not in k}


def _complete_checkpoints(run_dir) -> list:
    return CheckpointManager(directory=os.path.join(run_dir, "checkpoints")).entries()


def _latest_state(run_dir) -> dict:
    return CheckpointManager(directory=os.path.join(run_dir, "checkpoints")).latest()


def test_resume_after_one_epoch_equals_three_uninterrupted_epochs(tmp_path):
    common = dict(deterministic=True, plateau_patience=1, plateau_factor=0.5,
                  early_stopping_patience=3, eval_every=1)
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    run_engine(_flags(straight, epochs=3, **common), check=True)
    run_engine(_flags(resumed, epochs=1, **common), check=True)
    second = run_engine(_flags(resumed, epochs=3, **common), check=True)
    assert "Resumed from" in second.stdout

    a, b = _checkpoint_values(straight), _checkpoint_values(resumed)
    assert a.keys() == b.keys() and len(a) > 10
    for key in a:
        np.testing.assert_allclose(a[key], b[key], atol=1e-6, rtol=0, err_msg=key)
    sa, sb = _latest_state(straight), _latest_state(resumed)
    assert sa.step == sb.step and sa.epoch == sb.epoch == 3
    assert sa.state == sb.state  # plateau, early stopping, learning rate, data order
    ha, hb = read_history(straight), read_history(resumed)
    assert [h["epoch"] for h in hb] == [1, 2, 3]
    for x, y in zip(ha, hb):
        assert x["learning_rate"] == y["learning_rate"]
        assert x["val_loss"] == pytest.approx(y["val_loss"], abs=1e-6)


def _start(args):
    return subprocess.Popen([sys.executable, "-m", "engine.main", *args], cwd=REPO,
                            env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _wait_for_line(proc, needle, timeout=180):
    deadline = time.time() + timeout
    lines = []
    while time.time() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        lines.append(line)
        if needle in line:
            return lines
    raise AssertionError(f"never saw {needle!r}:\n{''.join(lines)}")


def test_sigterm_saves_exits_cleanly_and_resumes_at_the_next_step(tmp_path):
    run_dir = tmp_path / "run"
    args = _flags(run_dir, epochs=3)
    proc = _start(args)
    _wait_for_line(proc, "epoch 1/3")
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 143, out  # 128 + SIGTERM: interrupted, resumable
    assert "SIGTERM received: saved a checkpoint at step" in out
    saved_step = int(out.split("saved a checkpoint at step ")[1].split()[0])
    latest = _latest_state(run_dir)
    assert latest.step == saved_step
    verify(latest)

    resumed = run_engine(args, check=True)
    assert f"(step {saved_step}," in resumed.stdout
    assert f"Training from step {saved_step} " in resumed.stdout
    history = read_history(run_dir)
    assert [h["epoch"] for h in history] == [1, 2, 3]
    assert history[-1]["step"] == 3 * history[0]["step"]


def test_kill_9_at_random_moments_never_resumes_from_a_partial_checkpoint(tmp_path):
    run_dir = tmp_path / "run"
    overrides = dict(epochs=6, batch_size=4, checkpoint_every_steps=5)
    args = _flags(run_dir, **overrides)
    reference = tmp_path / "reference"
    run_engine(_flags(reference, **overrides), check=True)
    expected_step = read_history(reference)[-1]["step"]
    rng = random.Random(0)
    kills = 0
    for attempt in range(3):
        proc = _start(args)
        _wait_for_line(proc, "Training from step")
        if attempt == 1:
            # Aim for a checkpoint write: kill the moment a temporary save directory shows up.
            ckpt_dir = run_dir / "checkpoints"
            deadline = time.time() + 60
            while time.time() < deadline and proc.poll() is None:
                # The folder appears with the first save: before that there is nothing to aim at.
                if ckpt_dir.is_dir() and any(p.name.startswith(".tmp-") for p in ckpt_dir.iterdir()):
                    break
        else:
            # Once a checkpoint exists there is something to lose: then somewhere in a step, an
            # eval or a save.
            deadline = time.time() + 60
            while time.time() < deadline and proc.poll() is None and not _complete_checkpoints(run_dir):
                time.sleep(0.05)
            time.sleep(rng.uniform(0.0, 2.0))
        if proc.poll() is None:
            proc.kill()
            kills += 1
        proc.communicate(timeout=60)
        # Whatever is on disk now: every complete checkpoint verifies.
        for info in CheckpointManager(directory=str(run_dir / "checkpoints")).entries():
            verify(info)
    assert kills >= 2
    final = run_engine(args, check=True)
    assert "Resumed from" in final.stdout and "Training ended" in final.stdout
    history = read_history(run_dir)
    assert history[-1]["step"] == expected_step and history[-1]["epoch"] == 6
    assert [h["epoch"] for h in history] == sorted({h["epoch"] for h in history})
    assert not any(p.name.startswith(".tmp-") for p in (run_dir / "checkpoints").iterdir())


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
    assert sorted(os.listdir(run_dir / "checkpoints")) == before
    fresh = run_engine(_flags(run_dir, epochs=1, base_filters=8, overwrite=True), check=True)
    assert "Resumed" not in fresh.stdout
    with open(run_dir / "config.json") as f:
        assert json.load(f)["config"]["base_filters"] == 8


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
rm -f {mount}/filler
{python} -c "
from engine.checkpoint import CheckpointManager, verify
m = CheckpointManager(directory='{run_dir}/checkpoints')
print('VERIFIED', [verify(e).step for e in m.entries()])
" > {tmp_path}/verify.out 2>&1
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
    verified = (tmp_path / "verify.out").read_text()
    assert "VERIFIED [" in verified and "VERIFIED []" not in verified, verified
