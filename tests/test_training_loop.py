"""What the training loop does with its policies and its clock, through `python -m engine.main`."""

from __future__ import annotations

import json
import dataclasses
import os
import random
import signal
import subprocess
import sys
import time

import keras
import numpy as np
import pytest
import tensorflow as tf

from engine import checkpoint as ckpt_lib
from engine import state as state_lib
from engine.checkpoint import CheckpointManager
from engine.controller import itstime, steps_to_next
from engine.schedule import lr_at
from tests.helpers import REPO, config_flags, read_history, run_engine, tiny_config

pytestmark = pytest.mark.slow


def _checkpoint_values(path) -> dict[str, np.ndarray]:
    reader = tf.train.load_checkpoint(os.path.join(path, "ckpt"))
    return {k: reader.get_tensor(k) for k in reader.get_variable_to_shape_map() if "OBJECT_GRAPH" not in k}


def _latest(run_dir):
    return CheckpointManager(directory=os.path.join(run_dir, "checkpoints")).latest()


# --- the clock and the learning rate, alone ---------------------------------------------------------


def test_lr_at_warms_up_linearly_then_holds_the_base():
    assert [lr_at(s, base_lr=1.0, warmup_steps=4) for s in range(6)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
    assert lr_at(0, base_lr=0.3, warmup_steps=0) == 0.3
    # A base lowered by the plateau policy mid-warm-up lowers the rest of the ramp with it.
    assert lr_at(2, base_lr=0.5, warmup_steps=4) == 0.375


@pytest.mark.parametrize("seed", range(5))
def test_steps_to_next_lands_exactly_on_the_next_due_step(seed):
    rng = random.Random(seed)
    for _ in range(200):
        everies = tuple(rng.choice([0, 1, 3, 7, 12, 50]) for _ in range(3))
        step, most = rng.randrange(0, 500), rng.randrange(1, 20)
        n = steps_to_next(step, everies, most)
        brute = next((k for k in range(1, most + 1) if any(itstime(step + k, e) for e in everies)), most)
        assert n == brute, (step, everies, most)


# --- the loop's use of its clock and policies, end to end ------------------------------------------


def test_kills_during_a_save_and_mid_epoch_resume_to_the_uninterrupted_run(tmp_path):
    # Plateau and early stopping active, so their state has to come back too.
    overrides = dict(epochs=2, checkpoint_every_steps=5, deterministic=True, plateau_patience=1,
                     plateau_factor=0.5, early_stopping_patience=3)
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    run_engine(config_flags(tiny_config(straight, **overrides)), check=True)
    steps_per_epoch = read_history(straight)[0]["step"]
    assert steps_per_epoch % 5  # so the step-5 and step-10 saves are mid-epoch
    args = config_flags(tiny_config(killed, **overrides))
    checkpoints = killed / "checkpoints"

    def kill_when(ready):
        proc = subprocess.Popen([sys.executable, "-m", "engine.main", *args], cwd=REPO,
                                env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"},
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.time() + 120
        while not ready() and proc.poll() is None and time.time() < deadline:
            time.sleep(0.002)
        proc.send_signal(signal.SIGKILL)
        proc.wait(60)

    # First while a save is still in its temporary folder, then right after a mid-epoch save.
    kill_when(lambda: checkpoints.is_dir() and any(p.name.startswith(".tmp-") for p in checkpoints.iterdir()))
    for info in CheckpointManager(directory=str(checkpoints)).entries():
        ckpt_lib.verify(info)  # whatever the kill interrupted, what is complete verifies
    kill_when(lambda: any(_latest(killed) and _latest(killed).step == s for s in (5, 10)))
    assert _latest(killed).step % steps_per_epoch, "the kill did not land mid-epoch"
    resumed = run_engine(args, check=True)
    assert "Resumed from" in resumed.stdout
    assert not any(p.name.startswith(".tmp-") for p in checkpoints.iterdir())

    a, b = _checkpoint_values(_latest(straight).path), _checkpoint_values(_latest(killed).path)
    assert a.keys() == b.keys() and len(a) > 10
    for key in a:
        np.testing.assert_allclose(a[key], b[key], atol=1e-6, rtol=0, err_msg=key)
    assert _latest(straight).state == _latest(killed).state  # policies, learning rate, data position
    ha, hb = read_history(straight), read_history(killed)
    assert [h["epoch"] for h in hb] == [1, 2]
    for x, y in zip(ha, hb):
        for key in ("step", "loss", "dice", "val_loss", "val_dice", "learning_rate"):
            assert x[key] == pytest.approx(y[key], abs=1e-6), key


def test_a_nan_loss_stops_the_run_with_exit_1_and_the_last_checkpoint_intact(tmp_path):
    # No BatchNorm and a learning rate of 10: the activations overflow within a few steps.
    run_dir = tmp_path / "run"
    proc = run_engine(config_flags(tiny_config(run_dir, epochs=3, batch_norm=False, learning_rate=10.0,
                                               checkpoint_every_steps=1)))
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr
    assert "became NaN or infinite at step" in proc.stderr and str(run_dir / "checkpoints") in proc.stderr
    nan_step = int(proc.stderr.split("infinite at step ")[1].split()[0])
    entries = CheckpointManager(directory=str(run_dir / "checkpoints")).entries()
    assert entries and entries[-1].step == nan_step - 1  # every step before the NaN, none after
    for info in entries:
        ckpt_lib.verify(info)
        assert all(np.isfinite(v).all() for v in _checkpoint_values(info.path).values())
    assert not (run_dir / "final_model.keras").exists()


def test_early_stopping_ends_the_run_and_it_stays_ended_after_a_resume(tmp_path):
    run_dir = tmp_path / "run"
    # No change can beat a min_delta of 1e9: patience 1 ends the run at its second evaluation.
    args = config_flags(tiny_config(run_dir, epochs=5, early_stopping_patience=1,
                                    early_stopping_min_delta=1e9))
    first = run_engine(args, check=True)
    assert "Training ended (early stopping: no val_loss improvement for 1 evaluations)" in first.stdout
    history = read_history(run_dir)
    assert [h["epoch"] for h in history] == [1, 2]
    again = run_engine(args, check=True)
    assert "Resumed from" in again.stdout and "Training ended (early stopping" in again.stdout
    assert [h["epoch"] for h in read_history(run_dir)] == [1, 2]
    assert _latest(run_dir).step == history[-1]["step"]
    assert (run_dir / "final_model.keras").exists()


def test_restore_best_weights_puts_the_best_epoch_in_the_final_model(tmp_path):
    run_dir = tmp_path / "run"
    config = tiny_config(run_dir, epochs=2, monitor="val_dice", keep_checkpoints=1, deterministic=True)
    run_engine(config_flags(config), check=True)
    # Two more epochs on images shifted out of view (and their masks with them): the model unlearns
    # the lesions, so the best epoch is an early one and the last is not.
    config = dataclasses.replace(config, epochs=4, shift=1.0)
    run_engine(config_flags(config), check=True)
    manager = CheckpointManager(directory=str(run_dir / "checkpoints"), monitor="val_dice", mode="max")
    best, last = manager.best(), manager.latest()
    history = read_history(run_dir)
    assert best.epoch == max(history, key=lambda h: (h["val_dice"], -h["epoch"]))["epoch"]
    assert best.epoch <= 2 < last.epoch == 4, [(h["epoch"], h["val_dice"]) for h in history]
    final = keras.models.load_model(str(run_dir / "final_model.keras"), compile=False)

    def weights_of(info):
        model = state_lib.build_model(config)
        ckpt_lib.restore(tf.train.Checkpoint(model=model), info, partial=True)
        return [w.numpy() for w in model.weights]

    for got, want in zip([w.numpy() for w in final.weights], weights_of(best), strict=True):
        np.testing.assert_array_equal(got, want)
    # The final model is not simply the last weights.
    assert any(not np.array_equal(a, b) for a, b in zip(weights_of(best), weights_of(last)))


def test_a_plateau_during_warm_up_lowers_the_ramp_it_climbs(tmp_path):
    run_dir = tmp_path / "run"
    lr0 = 1e-2
    # Warm-up over 3 epochs; no improvement can beat min_delta 1e9, so from the second evaluation
    # on, every evaluation halves the base learning rate (patience 1).
    run_engine(config_flags(tiny_config(run_dir, epochs=4, learning_rate=lr0, warmup_epochs=3,
                                        plateau_patience=1, plateau_factor=0.5,
                                        plateau_min_delta=1e9, early_stopping_patience=10)),
               check=True)
    history = read_history(run_dir)
    s = history[0]["step"]
    # The learning rate of each epoch's last step: the ramp, then its lowered target.
    want = [lr_at(s - 1, base_lr=lr0, warmup_steps=3 * s),
            lr_at(2 * s - 1, base_lr=lr0, warmup_steps=3 * s),
            lr_at(3 * s - 1, base_lr=lr0 / 2, warmup_steps=3 * s),
            lr_at(4 * s - 1, base_lr=lr0 / 4, warmup_steps=3 * s)]
    assert want == pytest.approx([lr0 / 3, 2 * lr0 / 3, lr0 / 2, lr0 / 4])
    assert [h["learning_rate"] for h in history] == pytest.approx(want, rel=1e-6)


def test_restore_from_warm_starts_the_model_weights_of_another_run(tmp_path):
    source, warm = tmp_path / "source", tmp_path / "warm"
    run_engine(config_flags(tiny_config(source, epochs=1)), check=True)
    # A learning rate of 1e-12 leaves the weights where training starts them.
    still = dict(epochs=1, learning_rate=1e-12)
    proc = run_engine(config_flags(tiny_config(warm, restore_from=str(source), **still)), check=True)
    assert f"Warm start: model weights from {_latest(source).path}" in proc.stdout

    def kernels(path):  # the trainable weights (BatchNorm's moving statistics move at any rate)
        return {k: v for k, v in _checkpoint_values(path).items()
                if k.startswith("optimizer/_trainable_variables/")}

    trained, warmed = (kernels(_latest(r).path) for r in (source, warm))
    assert trained.keys() == warmed.keys() and len(trained) > 5
    for key in trained:
        np.testing.assert_allclose(warmed[key], trained[key], atol=1e-6, err_msg=key)
    # Without the warm start the weights would be the initial ones (the same seed as the source's
    # start), which a 1e-2 epoch moved far from what the source saved.


def test_a_standardised_2_5d_cosine_run_records_what_predict_then_applies_by_itself(tmp_path):
    run_dir = tmp_path / "run"
    config = tiny_config(run_dir, epochs=2, normalize="volume", neighbours=1, lr_schedule="cosine",
                         val_fraction=0.0, learning_rate=1e-2, min_lr=1e-4)
    run_engine(config_flags(config), check=True)
    history = read_history(run_dir)
    assert [h["epoch"] for h in history] == [1, 2] and "val_loss" not in history[-1]  # no val split
    assert history[-1]["learning_rate"] == pytest.approx(1e-4, rel=1e-5)  # the cosine's last step
    recorded = json.loads((run_dir / "inference.json").read_text())
    assert (recorded["normalize"], recorded["neighbours"], recorded["members"]) == ("volume", 1, ["final_model.keras"])
    # Predict with nothing but the run: the 5-channel model gets its standardised 2.5D inputs.
    data = os.path.join(config.data_dir, "kaggle_3m")
    out = tmp_path / "masks"
    proc = run_engine([f"--model_dir={run_dir}", "--mode=predict", f"--input={data}", f"--output={out}",
                       "--precision=float32", "--strategy=one_device"], timeout=180)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "normalize volume, neighbours 1" in proc.stdout
    patient = next(p for p in sorted(os.listdir(data)) if p.startswith("TCGA_"))
    written = sorted(os.listdir(out / patient))
    assert written and all(name.endswith("_mask.tif") for name in written)
