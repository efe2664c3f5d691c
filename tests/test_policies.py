"""Tests for engine/policies.py: Keras parity, state round trips and argument checks."""

import dataclasses
import json

import keras
import numpy as np
import pytest
import tensorflow as tf

from engine import policies
from engine.monitor import BestMetric
from engine.config import Config

LR0 = 0.01
EPOCHS = 40
KINDS = ("random_walk", "plateau", "noisy", "quantised", "near_ties", "nan")
MONITOR = "val_metric"  # A neutral name, so only the explicit mode sets the direction.


def _values(rng: np.random.Generator, kind: str, mode: str) -> list[float]:
    """A monitored-metric sequence of EPOCHS Python floats, as the loop would log them."""
    n = EPOCHS
    if kind == "random_walk":
        v = 1.0 + np.cumsum(rng.normal(0.0, 0.05, n))
    elif kind == "plateau":  # Falls, holds exactly flat, then falls again.
        a, b = rng.integers(3, n // 2, size=2)
        v = np.concatenate([np.linspace(1.0, 0.5, a), np.full(b, 0.5),
                            np.linspace(0.5, 0.3, n - a - b)])
    elif kind == "noisy":
        v = np.linspace(1.0, 0.2, n) + rng.normal(0.0, rng.choice([0.01, 0.05]), n)
    elif kind == "quantised":  # Exact ties and steps of exactly min_delta.
        v = np.round(1.0 + np.cumsum(rng.choice([-0.01, 0.0, 0.01, -1e-4, 1e-4], n)), 4)
    elif kind == "near_ties":  # Steps of min_delta give or take less than a float32 ulp.
        steps = rng.choice([0.0, 1e-4, 1e-2], n) + rng.integers(-2, 3, n) * 1e-9
        v = 0.5 - np.cumsum(steps * rng.choice([1, 1, 1, -1], n))
    else:  # A NaN in a random walk, possibly on the first epoch.
        v = 1.0 + np.cumsum(rng.normal(0.0, 0.05, n))
        v[rng.integers(0, 5)] = np.nan
    if mode == "max":
        v = -v
    return [float(x) for x in v]


def _cases(seed: int, per_kind_and_mode: int) -> list[dict]:
    """Sequences and policy arguments covering every kind in both modes."""
    rng = np.random.default_rng(seed)
    cases = []
    for kind in KINDS:
        for mode in ("min", "max"):
            for _ in range(per_kind_and_mode):
                values = _values(rng, kind, mode)
                cases.append(dict(
                    kind=kind, mode=mode, values=values,
                    patience=int(rng.integers(0, 5)),
                    factor=float(rng.choice([0.1, 0.2, 0.5, 0.75])),
                    min_delta=float(rng.choice([0.0, 1e-4, 1e-2])),
                    cooldown=int(rng.integers(0, 4)),
                    # 1e-3 rounds up in float32, 1e-4 rounds down: both sides of Keras' test.
                    min_lr=float(rng.choice([0.0, 1e-4, 1e-3, 2.5e-3])),
                ))
    return cases


CASES = _cases(seed=0, per_kind_and_mode=20)


def _plateau_args(case):
    return {k: case[k] for k in ("mode", "factor", "patience", "min_delta", "cooldown", "min_lr")}


def _stopping_args(case):
    return {k: case[k] for k in ("mode", "patience", "min_delta")}


def _describe(case, epoch):
    args = {k: v for k, v in case.items() if k != "values"}
    return f"epoch {epoch} of {args}, values={case['values'][:epoch + 1]}"


@pytest.fixture(scope="module")
def model():
    """A tiny compiled model: the Keras callbacks read and set its optimizer's LR."""
    m = keras.Sequential([keras.Input((1,)), keras.layers.Dense(1)])
    m.compile(optimizer=keras.optimizers.SGD(learning_rate=LR0), loss="mse")
    return m


def _run_plateau(policy, values, lr_var):
    """Drives the policy the way the loop will: through a float32 LR variable."""
    trace = []
    for value in values:
        lr_var.assign(policy.update(value, float(lr_var.numpy())))
        trace.append((float(lr_var.numpy()), policy.wait, policy.cooldown_counter, policy.best))
    return trace


def _keras_plateau(model, case):
    model.optimizer.learning_rate = LR0
    cb = keras.callbacks.ReduceLROnPlateau(monitor=MONITOR, **_plateau_args(case))
    cb.set_model(model)
    cb.on_train_begin()
    trace = []
    for epoch, value in enumerate(case["values"]):
        cb.on_epoch_end(epoch, {MONITOR: value})
        lr = float(keras.ops.convert_to_numpy(model.optimizer.learning_rate))
        trace.append((lr, cb.wait, cb.cooldown_counter, cb.best))
    return trace


def _keras_stopping(model, case):
    cb = keras.callbacks.EarlyStopping(monitor=MONITOR, **_stopping_args(case))
    cb.set_model(model)
    cb.on_train_begin()
    trace = []
    for epoch, value in enumerate(case["values"]):
        # Cleared every epoch so each epoch's decision is compared, not just the first stop.
        model.stop_training = False
        cb.on_epoch_end(epoch, {MONITOR: value})
        improved = cb.best_epoch == epoch  # Keras sets best_epoch only on a new best.
        trace.append((model.stop_training, improved, cb.wait, cb.best, cb.best_epoch))
    return trace


@pytest.mark.slow
def test_reduce_lr_on_plateau_matches_keras(model):
    reductions = clipped = cooled = 0
    for case in CASES:
        expected = _keras_plateau(model, case)
        lr_var = tf.Variable(LR0, dtype=tf.float32)
        policy = policies.ReduceLROnPlateau(**_plateau_args(case))
        got = _run_plateau(policy, case["values"], lr_var)
        for epoch, (g, e) in enumerate(zip(got, expected)):
            # assert_equal treats NaN == NaN; (lr, wait, cooldown_counter, best) must match exactly.
            np.testing.assert_equal(g, e, err_msg=_describe(case, epoch))
        lrs = [LR0] + [e[0] for e in expected]
        reductions += sum(b < a for a, b in zip(lrs, lrs[1:]))
        clipped += case["min_lr"] > 0 and expected[-1][0] == float(np.float32(case["min_lr"]))
        cooled += any(e[2] > 0 for e in expected)
    # The cases exercise every branch, so the equality above is not vacuous.
    assert reductions > 100 and clipped > 10 and cooled > 10, (reductions, clipped, cooled)


def test_early_stopping_and_best_metric_match_keras(model):
    stops = 0
    for case in CASES:
        expected = _keras_stopping(model, case)
        stopping = policies.EarlyStopping(**_stopping_args(case))
        best = BestMetric(mode=case["mode"], min_delta=case["min_delta"])
        for epoch, value in enumerate(case["values"]):
            stop = stopping.update(value)
            new_best = best.update(value)
            improved = stopping.best_epoch == epoch
            got = (stop, improved, stopping.wait, stopping.best, stopping.best_epoch)
            np.testing.assert_equal(got, expected[epoch], err_msg=_describe(case, epoch))
            np.testing.assert_equal((new_best, best.best), (improved, stopping.best),
                                    err_msg=_describe(case, epoch))
        stops += any(e[0] for e in expected)
    assert stops > 100, stops


@pytest.mark.parametrize("mode", ["min", "max"])
def test_best_metric_matches_keras_model_checkpoint(tmp_path, model, mode):
    # BestMetric picks the checkpoints ModelCheckpoint(save_best_only=True) would save.
    for case in CASES[:60]:
        cb = keras.callbacks.ModelCheckpoint(str(tmp_path / "unused.keras"), monitor=MONITOR,
                                             mode=mode, save_best_only=True)
        cb.set_model(model)
        cb._set_monitor_op()
        best = BestMetric(mode=mode)
        for epoch, value in enumerate(case["values"]):
            expected = cb._should_save_model(epoch, None, {MONITOR: value}, "unused.keras")
            assert best.update(value) == expected, _describe(case, epoch)
    assert not list(tmp_path.iterdir())


def test_improvement_is_judged_in_float32_like_keras():
    # 0.5 - 1e-9 is below 0.5 in float64 but equal in float32: Keras sees no improvement.
    best = BestMetric(mode="min")
    assert best.update(0.5)
    assert not best.update(0.5 - 1e-9)
    assert best.update(0.5 - 1e-7)
    best = BestMetric(mode="max", min_delta=0.01)
    assert best.update(0.5)
    assert not best.update(0.51 + 1e-10)
    assert best.update(0.5101)


def test_reduction_stops_at_min_lr_in_float32(model):
    # float32(1e-3) > 1e-3: once the LR variable holds min_lr it is not "reduced" again, so
    # the wait keeps counting and no new cooldown starts.
    case = dict(mode="min", factor=0.1, patience=1, min_delta=1e-4, cooldown=2, min_lr=1e-3,
                values=[1.0] * 6)
    lr_var = tf.Variable(LR0, dtype=tf.float32)
    trace = _run_plateau(policies.ReduceLROnPlateau(**_plateau_args(case)), case["values"], lr_var)
    assert [lr for lr, *_ in trace] == [float(np.float32(x)) for x in [LR0] + [1e-3] * 5]
    assert [(wait, cooldown) for _, wait, cooldown, _ in trace] == [
        (0, 0), (0, 2), (0, 1), (1, 0), (2, 0), (3, 0)]
    np.testing.assert_equal(trace, _keras_plateau(model, case))


def _step(policy, value, lr):
    """One epoch as the loop sees it: (what the loop acts on, the LR for the next epoch)."""
    if isinstance(policy, policies.ReduceLROnPlateau):
        lr = policy.update(value, lr)
        return lr, lr
    if isinstance(policy, policies.EarlyStopping):
        return (policy.update(value), policy.best, policy.best_epoch, policy.wait), lr
    return (policy.update(value), policy.best), lr


def _run(policy, values, lr=LR0):
    outputs = []
    for value in values:
        output, lr = _step(policy, value, lr)
        outputs.append(output)
    return outputs, lr


MAKERS = {
    "plateau": lambda c: policies.ReduceLROnPlateau(**_plateau_args(c)),
    "stopping": lambda c: policies.EarlyStopping(**_stopping_args(c)),
    "best": lambda c: BestMetric(mode=c["mode"], min_delta=c["min_delta"]),
}


@pytest.mark.parametrize("name", MAKERS)
@pytest.mark.parametrize("index", range(0, len(CASES), 8))
def test_restored_policy_continues_like_an_uninterrupted_one(name, index):
    case, make = CASES[index], MAKERS[name]
    cut = int(np.random.default_rng(index).integers(1, EPOCHS))
    whole = make(case)
    expected, _ = _run(whole, case["values"])
    first = make(case)
    head, lr = _run(first, case["values"][:cut])
    second = make(case)
    # The LR travels in the checkpointed variable; the policy state through JSON.
    second.restore(json.loads(json.dumps(first.state())))
    tail, _ = _run(second, case["values"][cut:], lr)
    np.testing.assert_equal(head + tail, expected,
                            err_msg=f"cut at {cut}: {_describe(case, EPOCHS - 1)}")
    np.testing.assert_equal(second.state(), whole.state())


def test_state_is_plain_json():
    policy = policies.EarlyStopping(mode="max", patience=3)
    for value in [0.1, 0.3, 0.2]:
        policy.update(value)
    state = policy.state()
    assert json.loads(json.dumps(state, allow_nan=False)) == state == {
        "best": 0.3, "best_epoch": 1, "wait": 1, "epoch": 2}


def test_restore_rejects_a_foreign_state():
    plateau = policies.ReduceLROnPlateau(mode="min", factor=0.5, patience=2)
    with pytest.raises(ValueError, match="ReduceLROnPlateau state must have keys"):
        plateau.restore(policies.EarlyStopping(mode="min", patience=2).state())


def test_early_stopping_counts_epochs_it_is_given():
    policy = policies.EarlyStopping(mode="min", patience=2)
    assert not policy.update(1.0, epoch=5)
    assert not policy.update(0.5, epoch=7)
    assert (policy.best, policy.best_epoch, policy.epoch) == (0.5, 7, 7)
    assert not policy.update(0.6)
    assert policy.update(0.7) and policy.epoch == 9


PLATEAU = dict(mode="min", factor=0.5, patience=1)
STOPPING = dict(mode="max", patience=2)


@pytest.mark.parametrize("cls, args, arg", [
    (policies.ReduceLROnPlateau, dict(PLATEAU, factor=1.0), "factor"),
    (policies.ReduceLROnPlateau, dict(PLATEAU, factor=1.5), "factor"),
    (policies.ReduceLROnPlateau, dict(PLATEAU, factor=0.0), "factor"),
    (policies.ReduceLROnPlateau, dict(PLATEAU, patience=-1), "patience"),
    (policies.ReduceLROnPlateau, dict(PLATEAU, patience=1.5), "patience"),
    (policies.ReduceLROnPlateau, dict(PLATEAU, mode="auto"), "mode"),
    (policies.ReduceLROnPlateau, dict(PLATEAU, cooldown=-1), "cooldown"),
    (policies.ReduceLROnPlateau, dict(PLATEAU, min_lr=-1e-3), "min_lr"),
    (policies.ReduceLROnPlateau, dict(PLATEAU, min_delta=-1.0), "min_delta"),
    (policies.EarlyStopping, dict(STOPPING, mode="minimum"), "mode"),
    (policies.EarlyStopping, dict(STOPPING, patience=-2), "patience"),
    (policies.EarlyStopping, dict(STOPPING, min_delta=float("nan")), "min_delta"),
    (BestMetric, dict(mode="up"), "mode"),
    (BestMetric, dict(mode="min", min_delta=-0.1), "min_delta"),
])
def test_bad_arguments_are_rejected_by_name(cls, args, arg):
    with pytest.raises(ValueError, match=rf"^{arg} must"):
        cls(**args)


@pytest.mark.parametrize("monitor, mode", [
    ("val_loss", "min"), ("loss", "min"), ("val_bce_loss", "min"),
    ("val_dice", "max"), ("val_iou", "max"), ("dice", "max"),
])
def test_monitor_mode(monitor, mode):
    assert dataclasses.replace(Config(), monitor=monitor).monitor_mode == mode


def _policies():
    from engine.actions import Policies
    from engine.schedule import Schedule

    return Policies(monitor="val_loss", plateau=policies.ReduceLROnPlateau(mode="min", factor=0.5, patience=5),
                    stopper=policies.EarlyStopping(mode="min", patience=1),
                    schedule=Schedule(base_lr=LR0, warmup_steps=0, total_steps=10, min_lr=0.0, cosine=False))


def _feed(policy, values):
    from engine.controller import EpochEnd

    for epoch, value in enumerate(values, 1):
        policy(EpochEnd(epoch=epoch, step=epoch, train={}, val={"val_loss": value}))
        if policy.stopped is not None:
            return epoch


SENTENCE = "early stopping: no val_loss improvement for 1 evaluations"


def test_early_stopping_gives_a_typed_reason_and_keeps_its_sentence_for_the_log():
    from engine.controller import StopReason

    policy = _policies()
    assert _feed(policy, [1.0, 0.5, 0.6, 0.7]) == 3
    assert policy.stopped is StopReason.EARLY_STOP and policy.stop_detail == SENTENCE
    restored = _policies()
    restored.restore(json.loads(json.dumps(policy.state(), allow_nan=False)))
    assert (restored.stopped, restored.stop_detail) == (StopReason.EARLY_STOP, SENTENCE)
    assert restored.state() == policy.state()


@pytest.mark.parametrize("stored, reason", [(SENTENCE, "EARLY_STOP"), (None, None)])
def test_a_checkpoint_that_stored_the_sentence_restores_a_typed_reason(stored, reason):
    # Checkpoints written before the reason was typed held early stopping's sentence, or None.
    from engine.controller import StopReason

    policy = _policies()
    state = policy.state()
    del state["stop_detail"]
    policy.restore({**state, "stopped": stored})
    assert policy.stopped is (reason and StopReason[reason]) and policy.stop_detail == (stored or "")
    assert policy.state()["stopped"] == (reason and StopReason[reason].value)
