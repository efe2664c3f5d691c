"""Mixed precision on CPU: bfloat16 and float16 train; float16 really scales the loss and counts skips."""

from __future__ import annotations

import dataclasses
import os

import keras
import numpy as np
import pytest
import tensorflow as tf

from engine import steps as steps_lib
from engine.state import TrainState
from engine.config import Config
from engine.runtime import Cpu, Runtime, cpu_info, resolve_jit, resolve_precision


@pytest.fixture
def policy():
    """Sets a global mixed-precision policy for one test and always puts float32 back."""
    def set_policy(name):
        keras.mixed_precision.set_global_policy(name)
    yield set_policy
    keras.mixed_precision.set_global_policy("float32")


def _runtime(precision):
    strategy = tf.distribute.OneDeviceStrategy("/cpu:0")
    return Runtime(strategy=strategy, precision=precision, precision_reason="test", jit_compile=False, replicas=1,
                   per_replica_batch=4, global_batch=4, device="CPU", gpus=(), intra_threads=0,
                   inter_threads=0, is_chief=True, worker_index=0, num_workers=1,
                   sync_batch_norm=False)


def _batches(n):
    rng = np.random.default_rng(0)
    images = rng.random((n * 4, 32, 32, 3), np.float32)
    masks = (images[..., 1:2] > 0.6).astype(np.float32)
    ds = tf.data.Dataset.from_tensor_slices(
        {"image": images, "mask": masks, "weight": np.ones(n * 4, np.float32)})
    return ds.batch(4, drop_remainder=True).repeat()


def _setup(precision, policy):
    policy(precision)
    config = Config(image_size=32, base_filters=4, depth=2, batch_size=4, learning_rate=1e-2,
                    precision=precision)
    rt = _runtime(precision)
    state = TrainState.build(config, rt)
    return state, state.steps(config, rt)


# CPUs measured (BUILD.md "Device policy"), their flags trimmed to what decides.
AMX_XEON = Cpu("GenuineIntel", 6, 167, "Intel Xeon", frozenset("avx2 avx512f avx512_bf16 amx_bf16 amx_tile amx_int8".split()))
BF16_XEON = Cpu("GenuineIntel", 6, 207, "Intel Xeon", frozenset("avx2 avx512f avx512_bf16".split()))
ZEN5 = Cpu("AuthenticAMD", 26, 2, "AMD EPYC", frozenset("avx2 avx512f avx512_bf16".split()))
ZEN4 = Cpu("AuthenticAMD", 25, 17, "AMD EPYC", frozenset("avx2 avx512f avx512_bf16".split()))
PLAIN = Cpu("GenuineIntel", 6, 85, "Intel Xeon", frozenset("sse4_2 avx2 fma".split()))


def _auto(cpu, *, has_gpu=False, mode="train"):
    return resolve_precision("auto", has_gpu=has_gpu, cpu=cpu, mode=mode)


def test_auto_precision_follows_the_cpu():
    # bfloat16 where it measured faster: AMX tiles, and Zen 5's full-width AVX512_BF16.
    assert _auto(AMX_XEON)[0] == "mixed_bfloat16" and "AMX" in _auto(AMX_XEON)[1]
    assert _auto(ZEN5)[0] == "mixed_bfloat16" and "Zen 5" in _auto(ZEN5)[1]
    # float32 where bfloat16 ran slower (an Intel CPU without AMX), was not measured (Zen 4),
    # or has no bfloat16 instructions; half of AMX is not AMX.
    assert _auto(BF16_XEON)[0] == "float32"
    assert _auto(ZEN4)[0] == "float32"
    assert _auto(PLAIN)[0] == "float32"
    assert _auto(Cpu("AuthenticAMD", 26, 2, "AMD EPYC", frozenset({"avx2", "avx512f"})))[0] == "float32"
    assert _auto(dataclasses.replace(AMX_XEON, flags=frozenset({"amx_tile"})))[0] == "float32"
    assert _auto(Cpu())[0] == "float32"
    assert _auto(ZEN5, has_gpu=True)[0] == "mixed_float16"
    # An export is served elsewhere; a precision that is asked for is taken as it is.
    assert _auto(AMX_XEON, mode="export")[0] == "float32"
    assert _auto(ZEN5, mode="export")[0] == "float32"
    assert resolve_precision("mixed_bfloat16", has_gpu=False, cpu=PLAIN) == (
        "mixed_bfloat16", "--precision=mixed_bfloat16")


def test_the_cpu_is_read_from_cpuinfo(tmp_path):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nvendor_id\t: AuthenticAMD\ncpu family\t: 26\nmodel\t\t: 2\n"
                       "model name\t: AMD EPYC\nflags\t\t: fpu avx2 avx512_bf16\n\n"
                       "processor\t: 1\nvendor_id\t: AuthenticAMD\nflags\t\t: fpu avx2 avx512_bf16\n")
    cpu = cpu_info(str(cpuinfo))
    assert cpu == Cpu("AuthenticAMD", 26, 2, "AMD EPYC", frozenset({"fpu", "avx2", "avx512_bf16"}))
    assert _auto(cpu)[0] == "mixed_bfloat16"
    assert cpu.record()["flags"] == ["avx2", "avx512_bf16"]
    assert cpu_info(str(tmp_path / "missing")) == Cpu()


def test_auto_jit_is_decided_by_the_hardware():
    assert resolve_jit("auto", has_gpu=True) is True
    assert resolve_jit("auto", has_gpu=False) is False
    assert resolve_jit("true", has_gpu=False) is True


@pytest.mark.parametrize("precision", ["mixed_bfloat16", "mixed_float16"])
def test_mixed_precision_trains_on_cpu_with_float32_logits(precision, policy):
    state, steps = _setup(precision, policy)
    compute = "bfloat16" if precision == "mixed_bfloat16" else "float16"
    assert state.model.layers[1].compute_dtype == compute
    assert state.model.output.dtype == "float32"
    iterator = iter(_batches(2))
    losses = [float(steps.train(iterator, tf.constant(5))["loss"]) / 5 for _ in range(6)]
    assert np.all(np.isfinite(losses))
    assert losses[-1] < losses[0]


def test_float16_scales_the_loss_and_counts_skipped_steps(policy):
    state, steps = _setup("mixed_float16", policy)
    optimizer = state.optimizer
    assert isinstance(optimizer, keras.optimizers.LossScaleOptimizer)
    scale = float(steps_lib.loss_scale(optimizer))
    assert scale > 1.0
    loss = tf.constant(0.25)
    assert float(optimizer.scale_loss(loss)) == pytest.approx(0.25 * scale)

    iterator = iter(_batches(2))
    out = steps.train(iterator, tf.constant(1))
    assert float(out["skipped"]) == 0.0
    # An absurd scale overflows float16 gradients: the step is skipped, counted,
    # the weights stay, and the scale halves.
    optimizer.dynamic_scale.assign(3e38)
    before = [w.numpy().copy() for w in state.model.trainable_weights]
    iterations = int(optimizer.iterations.numpy())
    out = steps.train(iterator, tf.constant(1))
    assert float(out["skipped"]) == 1.0 and float(out["nonfinite"]) == 0.0
    assert int(optimizer.iterations.numpy()) == iterations
    assert float(steps_lib.loss_scale(optimizer)) == pytest.approx(1.5e38, rel=1e-3)
    for b, w in zip(before, state.model.trainable_weights):
        np.testing.assert_array_equal(b, w.numpy())
    assert int(state.step.numpy()) == 2  # The run's clock still advanced past the batch.


def test_a_saved_model_predicts_in_the_precision_chosen_for_the_machine(tmp_path, policy):
    from engine.loading import load_model
    from models.unet import build_unet

    policy("float32")
    trained = build_unet(image_size=32, base_filters=4, depth=2)
    trained.save(tmp_path / "final_model.keras")
    x = np.random.default_rng(0).uniform(size=(2, 32, 32, 3)).astype(np.float32)
    # The precision the run resolved (mixed_bfloat16 on a CPU with AMX) wins over Keras' global policy.
    loaded, _ = load_model(str(tmp_path / "final_model.keras"), precision="mixed_bfloat16")
    assert loaded.get_layer("enc0_conv1").compute_dtype == "bfloat16"
    assert loaded.get_layer("logits").compute_dtype == "float32" and loaded.output.dtype == "float32"
    difference = np.abs(loaded(x).numpy() - trained(x).numpy()).max()
    assert 0 < difference < 0.05  # the same weights, computed in bfloat16
    policy("mixed_bfloat16")
    again, _ = load_model(str(tmp_path / "final_model.keras"), precision="float32")
    np.testing.assert_array_equal(again(x).numpy(), trained(x).numpy())


def _checkpoint_values(run_dir, step=None) -> dict:
    """The float variables a run's checkpoint holds (the newest, or the one at `step`), by name: the
    weights and moving statistics, Adam's moments."""
    from engine.checkpoint import CheckpointManager

    infos = CheckpointManager(directory=str(run_dir / "checkpoints")).entries()
    info = infos[-1] if step is None else next(i for i in infos if i.step == step)
    reader = tf.train.load_checkpoint(os.path.join(info.path, "ckpt"))
    values = {k: reader.get_tensor(k) for k in reader.get_variable_to_shape_map() if "OBJECT" not in k}
    return {k: v for k, v in values.items() if v.dtype == np.float32 and v.ndim >= 1}


def _train(run_dir, **overrides):
    from tests.helpers import config_flags, run_engine, tiny_config

    values = {"epochs": 2, "deterministic": True, "precision": "mixed_bfloat16", "image_size": 32,
              **overrides}
    return run_engine(config_flags(tiny_config(run_dir, **values)), check=True)


@pytest.mark.slow
def test_bfloat16_trains_and_resumes_exactly_and_across_precisions(tmp_path):
    from tests.helpers import read_history

    _train(tmp_path / "straight")
    # Stopped after epoch 1 and resumed: the same bfloat16 run, bit for bit.
    _train(tmp_path / "resumed", epochs=1)
    out = _train(tmp_path / "resumed").stdout
    assert "Resumed from" in out
    straight, resumed = _checkpoint_values(tmp_path / "straight"), _checkpoint_values(tmp_path / "resumed")
    assert straight.keys() == resumed.keys() and len(straight) > 10
    for name in straight:
        np.testing.assert_array_equal(straight[name], resumed[name], err_msg=name)
    assert ([(h["epoch"], h["loss"]) for h in read_history(tmp_path / "straight")]
            == [(h["epoch"], h["loss"]) for h in read_history(tmp_path / "resumed")])

    # A bfloat16 checkpoint continued in float32, and a float32 one continued in bfloat16: each
    # starts from the saved values, so it ends near the run that stayed in its first precision,
    # far nearer than the distance the second epoch itself moved them.
    _train(tmp_path / "straight-float32", precision="float32")
    for start, then in (("mixed_bfloat16", "float32"), ("float32", "mixed_bfloat16")):
        reference = tmp_path / ("straight" if start == "mixed_bfloat16" else "straight-float32")
        history = read_history(reference)
        after_one, after_two = (_checkpoint_values(reference, step=h["step"]) for h in history)
        run = tmp_path / f"{start}-then-{then}"
        _train(run, epochs=1, precision=start)
        out = _train(run, precision=then).stdout
        assert f"trained in {start} so far; it continues in {then}" in out
        ended = _checkpoint_values(run)
        moved = sum(float(np.abs(after_two[k] - after_one[k]).sum()) for k in after_two)
        apart = sum(float(np.abs(ended[k] - after_two[k]).sum()) for k in after_two)
        assert moved > 0 and apart < 0.5 * moved, (start, then, apart, moved)
        assert [h["epoch"] for h in read_history(run)] == [1, 2]


def test_config_json_records_what_auto_chose_and_why(tmp_path):
    import json

    from tests.helpers import config_flags, run_engine, tiny_config

    run_dir = tmp_path / "run"
    proc = run_engine(config_flags(tiny_config(run_dir, image_size=32, epochs=1, precision="auto")))
    assert proc.returncode == 0, proc.stderr
    recorded = json.loads((run_dir / "config.json").read_text())["runtime"]
    expected = resolve_precision("auto", has_gpu=False, cpu=cpu_info())
    assert (recorded["precision"], recorded["precision_reason"]) == expected
    assert recorded["cpu"] == cpu_info().record()  # which CPU the choice was made on
    assert recorded["global_batch"] == 8
