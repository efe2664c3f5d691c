"""Tests for engine/checkpoint.py: round trips, hashes, retention, corruption, crashes and full disks."""

import errno
import hashlib
import json
import logging
import os
import random
import shutil
import subprocess
import sys
import threading
import time

import keras
import numpy as np
import pytest
import tensorflow as tf

from engine import checkpoint as ckpt_lib
from engine.checkpoint import CheckpointError, CheckpointManager, find_checkpoint


def _restore_newest(manager, checkpoint):
    """What a resume does: the newest checkpoint that verifies, read into `checkpoint` (None: none)."""
    info = manager.newest_verified()
    return None if info is None else ckpt_lib.restore(checkpoint, info)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATA = "ckpt.data-00000-of-00001"


def _vars(value: float = 0.0, size: int = 16):
    """A tiny checkpoint: one vector filled with `value` and a step counter."""
    v = tf.Variable(tf.fill([size], float(value)))
    step = tf.Variable(0, dtype=tf.int64)
    return v, step, tf.train.Checkpoint(v=v, step=step)


def _save_steps(manager: CheckpointManager, losses: dict[int, float | None]) -> None:
    """Saves one checkpoint per step, its vector filled with the step; None = no metrics."""
    for step, loss in losses.items():
        v, s, ckpt = _vars(step)
        s.assign(step)
        manager.save(ckpt, step=step, epoch=step, metrics={} if loss is None else {"val_loss": loss},
                     state={"plateau": {"wait": step}})


def _names(directory) -> list[str]:
    return sorted(os.listdir(directory))


def _tiny_model_and_adam():
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(8, activation="relu"),
                              keras.layers.Dense(1)])
    return model, keras.optimizers.Adam(1e-2)


def _train(model, optimizer, steps: int) -> None:
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(16, 4)).astype("float32"), rng.normal(size=(16, 1)).astype("float32")
    for _ in range(steps):
        with tf.GradientTape() as tape:
            loss = tf.reduce_mean((model(x) - y) ** 2)
        optimizer.apply_gradients(zip(tape.gradient(loss, model.trainable_variables),
                                      model.trainable_variables))


def test_round_trip_restores_model_weights_and_adam_slots(tmp_path):
    model, opt = _tiny_model_and_adam()
    _train(model, opt, 3)
    step = tf.Variable(3, dtype=tf.int64)
    manager = CheckpointManager(directory=str(tmp_path / "ckpts"))
    saved = manager.save(tf.train.Checkpoint(model=model, optimizer=opt, step=step), step=3, epoch=1,
                         metrics={"val_loss": np.float32(0.25)},
                         state={"best": np.float32(0.25), "order": [3, 1]})

    for build_first in (True, False):  # Built slots are filled; unbuilt ones are filled when created.
        model2, opt2 = _tiny_model_and_adam()
        if build_first:
            opt2.build(model2.trainable_variables)
        step2 = tf.Variable(0, dtype=tf.int64)
        info = _restore_newest(CheckpointManager(directory=str(tmp_path / "ckpts")), 
            tf.train.Checkpoint(model=model2, optimizer=opt2, step=step2))
        if not build_first:
            opt2.build(model2.trainable_variables)
        assert info == saved
        assert (info.step, info.epoch, info.metrics, info.state) == (3, 1, {"val_loss": 0.25},
                                                                    {"best": 0.25, "order": [3, 1]})
        assert int(step2.numpy()) == 3
        for a, b in zip(model.weights, model2.weights, strict=True):
            np.testing.assert_array_equal(a.numpy(), b.numpy())
        assert len(opt.variables) == len(opt2.variables) > 2  # iterations, lr, 2 slots per weight
        for a, b in zip(opt.variables, opt2.variables, strict=True):
            np.testing.assert_array_equal(a.numpy(), b.numpy(), err_msg=a.path)
        assert int(opt2.iterations.numpy()) == 3


def test_each_checkpoint_records_the_sha256_of_its_files_and_its_monitor(tmp_path):
    manager = CheckpointManager(directory=str(tmp_path), monitor="val_dice", mode="max")
    for step, dice in ((10, 0.5), (20, 0.7), (30, 0.6)):
        v, s, ckpt = _vars(step)
        manager.save(ckpt, step=step, epoch=step // 10, metrics={"val_dice": dice, "val_loss": 1 - dice},
                     state={"step": step})
    assert _names(tmp_path) == ["ckpt-000000010", "ckpt-000000020", "ckpt-000000030"]
    assert (manager.best().name, manager.latest().name) == ("ckpt-000000020", "ckpt-000000030")
    assert [(e.name, e.step, e.epoch, e.metrics) for e in manager.entries()][:2] == [
        ("ckpt-000000010", 10, 1, {"val_dice": 0.5, "val_loss": 0.5}),
        ("ckpt-000000020", 20, 2, {"val_dice": 0.7, "val_loss": pytest.approx(0.3)})]
    for entry in manager.entries():
        folder = tmp_path / entry.name
        state = json.loads((folder / "state.json").read_text())
        assert sorted(state["files"]) == [DATA, "ckpt.index"]
        assert sorted(os.listdir(folder)) == [DATA, "ckpt.index", "state.json"]
        for name, meta in state["files"].items():
            data = (folder / name).read_bytes()
            assert meta == {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
        assert state["step"] == entry.step and state["state"] == {"step": entry.step}
        assert (state["monitor"], state["mode"]) == ("val_dice", "max")
    # Another process finds the best by the monitor the run saved with, with no flags.
    assert find_checkpoint(str(tmp_path)).name == "ckpt-000000020"


@pytest.mark.parametrize("mode", ["min", "max"])
def test_retention_keeps_the_latest_n_plus_an_old_best(tmp_path, mode):
    sign = 1 if mode == "min" else -1
    manager = CheckpointManager(directory=str(tmp_path), keep=2, monitor="val_loss", mode=mode)
    # The best is the first checkpoint; mid-epoch saves (None) have no metric and never are best.
    _save_steps(manager, {1: sign * 0.1, 2: sign * 0.5, 3: None, 4: sign * 0.4, 5: sign * 0.6,
                          6: None, 7: sign * 0.3})
    expected = ["ckpt-000000001", "ckpt-000000006", "ckpt-000000007"]
    assert _names(tmp_path) == expected
    assert manager.best().step == 1 and manager.latest().step == 7
    assert [i.step for i in manager.entries()] == [1, 6, 7]


def _corrupt(folder, how: str) -> None:
    if how == "truncate_data":
        data = (folder / DATA).read_bytes()
        (folder / DATA).write_bytes(data[: len(data) // 2])
    elif how == "flip_data_bytes":
        data = bytearray((folder / DATA).read_bytes())
        data[len(data) // 2] ^= 0xFF
        (folder / DATA).write_bytes(bytes(data))
    elif how == "delete_index":
        (folder / "ckpt.index").unlink()
    elif how == "edit_state_json":  # Still valid JSON, but not what was saved.
        text = (folder / "state.json").read_text()
        (folder / "state.json").write_text(text.replace('"epoch": 3', '"epoch": 7'))
    elif how == "garble_state_json":
        data = bytearray((folder / "state.json").read_bytes())
        data[5:9] = b"\xff\xfe\x00\x01"
        (folder / "state.json").write_bytes(bytes(data))
    else:
        raise AssertionError(how)


@pytest.mark.parametrize("how", ["truncate_data", "flip_data_bytes", "delete_index", "edit_state_json",
                                 "garble_state_json"])
def test_corrupt_newest_is_reported_by_name_and_the_previous_restored(tmp_path, how, caplog):
    _save_steps(CheckpointManager(directory=str(tmp_path)), {1: 0.5, 2: 0.4, 3: 0.3})
    _corrupt(tmp_path / "ckpt-000000003", how)
    caplog.set_level(logging.INFO)
    manager = CheckpointManager(directory=str(tmp_path))
    v, step, ckpt = _vars(-1.0)
    info = _restore_newest(manager, ckpt)
    assert (info.name, info.step, info.state) == ("ckpt-000000002", 2, {"plateau": {"wait": 2}})
    np.testing.assert_array_equal(v.numpy(), np.full(16, 2.0))
    assert int(step.numpy()) == 2
    logs = caplog.messages
    assert len(logs) == 1 and str(tmp_path / "ckpt-000000003") in logs[0], logs
    with pytest.raises(CheckpointError, match="ckpt-000000003"):
        ckpt_lib.verify(str(tmp_path / "ckpt-000000003"))


def test_no_checkpoint_verifies_is_an_error_naming_each(tmp_path):
    _save_steps(CheckpointManager(directory=str(tmp_path)), {1: 0.5, 2: 0.4})
    _corrupt(tmp_path / "ckpt-000000001", "truncate_data")
    _corrupt(tmp_path / "ckpt-000000002", "flip_data_bytes")
    with pytest.raises(CheckpointError) as e:
        _restore_newest(CheckpointManager(directory=str(tmp_path)), _vars()[2])
    assert "ckpt-000000001" in str(e.value) and "ckpt-000000002" in str(e.value)
    assert "truncated" in str(e.value) and "sha256" in str(e.value)
    assert _restore_newest(CheckpointManager(directory=str(tmp_path / "empty")), _vars()[2]) is None


def test_remove_temporaries_cleans_up_after_crashes(tmp_path):
    manager = CheckpointManager(directory=str(tmp_path))
    _save_steps(manager, {1: 0.5, 2: 0.4})
    partial = tmp_path / ".tmp-ckpt-000000003-4242"
    partial.mkdir()
    (partial / "ckpt_temp").mkdir()
    (partial / DATA).write_bytes(b"half")
    (tmp_path / ".tmp-notes.json-4242").write_text("{")
    (tmp_path / ".del-ckpt-000000000-4242").mkdir()
    # A same-step replacement that crashed after moving step 2 aside, before the new one arrived...
    os.rename(tmp_path / "ckpt-000000002", tmp_path / ".old-ckpt-000000002-4242")
    # ...and one that crashed after the new one arrived.
    shutil.copytree(tmp_path / "ckpt-000000001", tmp_path / ".old-ckpt-000000001-4242")

    removed = manager.remove_temporaries()

    assert sorted(removed) == sorted(str(tmp_path / n) for n in (
        ".tmp-ckpt-000000003-4242", ".del-ckpt-000000000-4242", ".old-ckpt-000000001-4242"))
    assert _names(tmp_path) == [".tmp-notes.json-4242", "ckpt-000000001", "ckpt-000000002"]
    # Only a checkpoint's own temporaries are the manager's to remove.
    assert (tmp_path / ".tmp-notes.json-4242").read_text() == "{"
    assert [ckpt_lib.verify(i).step for i in manager.entries()] == [1, 2]
    assert manager.remove_temporaries() == []


def test_saving_the_same_step_again_replaces_it(tmp_path):
    manager = CheckpointManager(directory=str(tmp_path))
    v, step, ckpt = _vars(1.0)
    manager.save(ckpt, step=5, epoch=0, metrics={}, state={"in_epoch": 5})
    v.assign(tf.fill([16], 2.0))
    info = manager.save(ckpt, step=5, epoch=1, metrics={"val_loss": 0.3}, state={"in_epoch": 0})
    assert _names(tmp_path) == ["ckpt-000000005"]
    assert (info.epoch, info.metrics, info.state) == (1, {"val_loss": 0.3}, {"in_epoch": 0})
    assert manager.best() == info
    v2, _, ckpt2 = _vars()
    assert _restore_newest(manager, ckpt2) == info and v2.numpy()[0] == 2.0


def _enospc(*args, **kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


@pytest.mark.parametrize("where", ["fsync", "state_json", "rename"])
def test_disk_full_mid_save_leaves_earlier_checkpoints_intact(tmp_path, monkeypatch, where):
    manager = CheckpointManager(directory=str(tmp_path))
    _save_steps(manager, {1: 0.5, 2: 0.4})
    _save_steps(manager, {2: 0.3})  # A same-step save, so the failing one below must move it aside.
    if where == "fsync":
        monkeypatch.setattr(ckpt_lib.os, "fsync", _enospc)
    elif where == "state_json":
        monkeypatch.setattr(ckpt_lib, "_write_json", _enospc)
    else:
        real_replace = os.replace  # the rename that puts a finished save in place
        monkeypatch.setattr(ckpt_lib.atomic.os, "replace", lambda a, b: _enospc() if ".tmp-" in str(a)
                            else real_replace(a, b))
    v, step, ckpt = _vars(9.0)
    for new_step in (3, 2):  # a new step, and one replacing an existing checkpoint
        with pytest.raises(CheckpointError) as e:
            manager.save(ckpt, step=new_step, epoch=9, metrics={"val_loss": 0.0}, state={})
        assert str(tmp_path) in str(e.value) and "No space left on device" in str(e.value)
    monkeypatch.undo()
    assert _names(tmp_path) == ["ckpt-000000001", "ckpt-000000002"]
    assert [ckpt_lib.verify(i).metrics for i in manager.entries()] == [{"val_loss": 0.5}, {"val_loss": 0.3}]


def test_unwritable_directory_path_is_a_clear_error(tmp_path):
    (tmp_path / "run").write_text("a file where the run directory should be")
    manager = CheckpointManager(directory=str(tmp_path / "run" / "checkpoints"))
    with pytest.raises(CheckpointError, match=r"in .*run/checkpoints: Not a directory"):
        _save_steps(manager, {1: 0.5})


_FS_CHILD = r"""
import json, os, subprocess, sys
import tensorflow as tf
from engine import checkpoint as ckpt_lib
from engine.checkpoint import CheckpointError, CheckpointManager, verify
root = sys.argv[1]
d = os.path.join(root, "checkpoints")
m = CheckpointManager(directory=d)
small = tf.train.Checkpoint(v=tf.Variable(tf.fill([1000], 1.0)))
for step in (1, 2):
    m.save(small, step=step, epoch=step, metrics={"val_loss": 1.0 / step}, state={})
out = {}
def attempt(key, ckpt):
    try:
        m.save(ckpt, step=3, epoch=3, metrics={"val_loss": 0.1}, state={})
        out[key] = "saved"
    except CheckpointError as e:
        out[key] = str(e)
    out[key + "_listing"] = sorted(os.listdir(d))
    out[key + "_verified"] = [verify(i).step for i in m.entries()]
attempt("full", tf.train.Checkpoint(v=tf.Variable(tf.zeros([1 << 20]))))  # 4 MB on a 1 MB disk
subprocess.run(["mount", "-o", "remount,ro", root], check=True)
attempt("read_only", small)
v = tf.Variable(tf.zeros([1000]))
out["restored"] = ckpt_lib.restore(tf.train.Checkpoint(v=v), m.newest_verified()).step
print("RESULT " + json.dumps(out))
"""


@pytest.mark.slow
def test_real_full_disk_and_read_only_filesystem(tmp_path):
    """A 1 MB tmpfs in a private mount namespace: the kernel's ENOSPC and EROFS, not a mock."""
    if os.geteuid() != 0 or not shutil.which("unshare"):
        pytest.skip("needs root and unshare to mount a private tmpfs")
    mount = tmp_path / "fs"
    mount.mkdir()
    proc = subprocess.run(
        ["unshare", "--mount", "--propagation", "private", "sh", "-c",
         'mount -t tmpfs -o size=1m tmpfs "$1" && exec "$2" -c "$3" "$1"', "sh",
         str(mount), sys.executable, _FS_CHILD],
        cwd=REPO, env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}, capture_output=True, text=True,
        timeout=120)
    if proc.returncode != 0 and "mount" in proc.stderr and "RESULT" not in proc.stdout:
        pytest.skip(f"cannot mount a tmpfs here: {proc.stderr.strip()[-200:]}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.split("RESULT ", 1)[1])
    for key, reason in (("full", "No space left on device"), ("read_only", "Read-only file system")):
        assert "Could not save checkpoint ckpt-000000003" in out[key] and reason in out[key], out[key]
        assert str(mount / "checkpoints") in out[key]
        assert out[key + "_listing"] == ["ckpt-000000001", "ckpt-000000002"]
        assert out[key + "_verified"] == [1, 2]
    assert out["restored"] == 2
    assert not os.listdir(mount)  # the tmpfs vanished with its namespace


def test_find_checkpoint_accepts_run_dir_checkpoints_dir_or_one_checkpoint(tmp_path, caplog):
    run = tmp_path / "run"
    _save_steps(CheckpointManager(directory=str(run / "checkpoints"), keep=2),
                {1: 0.5, 2: 0.2, 3: 0.4, 4: None})  # keeps 2 (the best), 3 and 4
    assert find_checkpoint(str(run)).name == "ckpt-000000002"  # the best, older than the latest
    assert find_checkpoint(str(run / "checkpoints")).name == "ckpt-000000002"
    assert find_checkpoint(str(run), monitor="val_loss", mode="max").name == "ckpt-000000003"
    assert find_checkpoint(str(run / "checkpoints" / "ckpt-000000004")).step == 4

    caplog.set_level(logging.INFO)
    _corrupt(run / "checkpoints" / "ckpt-000000002", "truncate_data")
    assert find_checkpoint(str(run)).name == "ckpt-000000004"
    assert len(caplog.messages) == 1 and "ckpt-000000002" in caplog.messages[0]
    with pytest.raises(CheckpointError, match="ckpt-000000002 is corrupt"):
        find_checkpoint(str(run / "checkpoints" / "ckpt-000000002"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="holds no checkpoints"):
        find_checkpoint(str(tmp_path / "empty"))
    with pytest.raises(CheckpointError, match="does not exist"):
        find_checkpoint(str(tmp_path / "nowhere"))


def test_restore_checks_that_the_checkpoint_fits(tmp_path):
    model, opt = _tiny_model_and_adam()
    _train(model, opt, 1)
    manager = CheckpointManager(directory=str(tmp_path))
    info = manager.save(tf.train.Checkpoint(model=model, optimizer=opt), step=1, epoch=1,
                        metrics={}, state={})

    warm, _ = _tiny_model_and_adam()  # Weights only, from a checkpoint that also holds an optimizer.
    assert ckpt_lib.restore(tf.train.Checkpoint(model=warm), str(tmp_path), partial=True) == info
    for a, b in zip(model.weights, warm.weights, strict=True):
        np.testing.assert_array_equal(a.numpy(), b.numpy())

    wider = keras.Sequential([keras.Input((4,)), keras.layers.Dense(9), keras.layers.Dense(1)])
    with pytest.raises(CheckpointError, match=r"ckpt-000000001 does not fit this model: .*shape"):
        ckpt_lib.restore(tf.train.Checkpoint(model=wider), info, partial=True)
    with pytest.raises(CheckpointError, match="ckpt-000000001 does not fit this model"):
        ckpt_lib.restore(tf.train.Checkpoint(model=warm, extra=tf.Variable(1.0)), info)


def test_arguments_are_validated(tmp_path):
    with pytest.raises(ValueError, match="keep=0"):
        CheckpointManager(directory=str(tmp_path), keep=0)
    with pytest.raises(ValueError, match="mode='auto'"):
        CheckpointManager(directory=str(tmp_path), mode="auto")
    with pytest.raises(TypeError, match="not JSON-serialisable"):
        CheckpointManager(directory=str(tmp_path)).save(_vars()[2], step=1, epoch=0, metrics={},
                                                        state={"policy": object()})
    assert os.listdir(tmp_path) == []  # a refused save leaves nothing behind
    assert CheckpointManager(directory=str(tmp_path)).latest() is None


_KILL_CHILD = r"""
import json, logging, sys
import tensorflow as tf
from engine import checkpoint as ckpt_lib
from engine.checkpoint import CheckpointManager
logging.basicConfig(level=logging.INFO, format="LOG %(message)s", stream=sys.stdout)
m = CheckpointManager(directory=sys.argv[1], keep=2)
removed = m.remove_temporaries()
v, step = tf.Variable(tf.zeros([1 << 20])), tf.Variable(0, dtype=tf.int64)  # 4 MB per save
ckpt = tf.train.Checkpoint(v=v, step=step)
newest = m.newest_verified()
info = ckpt_lib.restore(ckpt, newest) if newest else None
print("RESUMED " + json.dumps({"step": int(step.numpy()), "v": float(v[0]), "v_last": float(v[-1]),
                               "state": info.state if info else None, "removed": removed}), flush=True)
s = int(step.numpy())
while sys.argv[2] == "train":
    s += 1
    step.assign(s)
    v.assign(tf.fill([1 << 20], float(s)))
    m.save(ckpt, step=s, epoch=s, metrics={"val_loss": 1.0 / s}, state={"s": s})
    print(f"SAVED {s}", flush=True)
"""


def _run_child(directory: str, mode: str, kill_when=None) -> list[str]:
    """Runs _KILL_CHILD; once it has saved 3 checkpoints, SIGKILLs it when `kill_when()` is true."""
    proc = subprocess.Popen([sys.executable, "-c", _KILL_CHILD, directory, mode], cwd=REPO,
                            env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lines, saved_three = [], threading.Event()

    def read():
        for line in proc.stdout:
            lines.append(line.strip())
            if sum(x.startswith("SAVED") for x in lines) >= 3:
                saved_three.set()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    if kill_when is not None:
        if not saved_three.wait(120):
            proc.kill()
            pytest.fail(f"the child saved fewer than 3 checkpoints: {proc.stderr.read()[-3000:]}")
        deadline = time.monotonic() + 30
        while not kill_when():
            assert time.monotonic() < deadline, "the kill moment never came"
        proc.kill()
    proc.wait(120)
    reader.join(10)
    assert kill_when is not None or proc.returncode == 0, proc.stderr.read()[-3000:]
    return lines


@pytest.mark.slow
def test_kill_9_at_random_moments_never_leaves_a_partial_checkpoint(tmp_path):
    directory = str(tmp_path / "checkpoints")
    rng = random.Random(1234)
    deadline = []

    def after_random_delay():  # anywhere: a save, a retention delete, the loop
        deadline.append(deadline[0] if deadline else time.monotonic() + rng.uniform(0.0, 0.3))
        return time.monotonic() >= deadline[0]

    def mid_write():  # while a save is still in its temporary directory
        return any(n.startswith(".tmp-ckpt-") for n in os.listdir(directory))

    last_saved, left_behind = 0, []
    for kill_when in (after_random_delay, mid_write, None):
        lines = _run_child(directory, "train" if kill_when else "resume", kill_when)
        resumed = json.loads(next(x for x in lines if x.startswith("RESUMED"))[len("RESUMED "):])
        # It resumes from the newest complete save, whose contents are that step's,
        # after removing what the previous kill interrupted.
        assert resumed["step"] >= last_saved
        assert resumed["v"] == resumed["v_last"] == resumed["step"]
        assert resumed["state"] == ({"s": resumed["step"]} if resumed["step"] else None)
        assert [p for p in left_behind if p.startswith(".tmp-")] == [
            os.path.basename(p) for p in resumed["removed"] if os.path.basename(p).startswith(".tmp-")]
        # Nothing was damaged.
        assert not any(x.startswith("LOG Skipping") for x in lines), lines
        if kill_when is None:
            break
        last_saved = max(int(x.split()[1]) for x in lines if x.startswith("SAVED"))
        # Whatever the kill interrupted, every ckpt-* directory on disk verifies.
        left_behind = sorted(n for n in os.listdir(directory) if n.startswith("."))
        finals = [n for n in os.listdir(directory) if n.startswith("ckpt-")]
        assert len(finals) >= 2
        for name in finals:
            ckpt_lib.verify(os.path.join(directory, name))
    assert last_saved >= 6


def test_a_damaged_checkpoint_is_named_and_removed_by_retention(tmp_path, caplog):
    caplog.set_level(logging.INFO)
    manager = CheckpointManager(directory=str(tmp_path), keep=2)
    _save_steps(manager, {1: None, 2: None, 3: None})
    assert _names(tmp_path) == ["ckpt-000000002", "ckpt-000000003"]
    (tmp_path / "ckpt-000000002" / "state.json").write_text("{torn")
    assert [i.step for i in manager.entries()] == [3]
    assert [i.step for i in manager.entries()] == [3]
    named = [m for m in caplog.messages if "ckpt-000000002" in m and "damaged" in m]
    assert len(named) == 1  # once, however often the manager looks
    _save_steps(manager, {4: None})
    # The damaged one counted for nothing and went; two intact checkpoints remain.
    assert _names(tmp_path) == ["ckpt-000000003", "ckpt-000000004"]
