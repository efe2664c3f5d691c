"""FusedAdam applies Keras Adam's update, and its checkpoints are Keras Adam's."""

from __future__ import annotations

import keras
import numpy as np
import pytest
import tensorflow as tf

from engine.fused_adam import FusedAdam

SHAPES = [(5, 7), (7,)]


def _train(optimizer_class, *, steps=5, jit_compile=False, learning_rate=1e-2):
    rng = np.random.default_rng(0)
    variables = [keras.Variable(rng.normal(size=s).astype(np.float32)) for s in SHAPES]
    optimizer = optimizer_class(learning_rate=learning_rate)
    optimizer.build(variables)

    @tf.function(jit_compile=jit_compile)
    def apply(grads):
        optimizer.apply_gradients(zip(grads, variables))

    grad_rng = np.random.default_rng(1)
    for _ in range(steps):
        apply([tf.constant(grad_rng.normal(size=s).astype(np.float32)) for s in SHAPES])
    return variables, optimizer


@pytest.mark.parametrize("jit_compile", [False, True])
def test_matches_keras_adam_over_several_steps(jit_compile):
    keras_vars, keras_opt = _train(keras.optimizers.Adam)
    fused_vars, fused_opt = _train(FusedAdam, jit_compile=jit_compile)
    initial = np.random.default_rng(0).normal(size=SHAPES[0]).astype(np.float32)
    assert not np.allclose(fused_vars[0].numpy(), initial)  # it moved
    for a, b in zip(fused_vars, keras_vars):
        np.testing.assert_allclose(a.numpy(), b.numpy(), atol=1e-6)
    for a, b in zip(fused_opt._momentums + fused_opt._velocities,
                    keras_opt._momentums + keras_opt._velocities):
        np.testing.assert_allclose(a.numpy(), b.numpy(), atol=1e-6)
    assert int(fused_opt.iterations.numpy()) == int(keras_opt.iterations.numpy()) == 5


def test_a_keras_adam_checkpoint_restores_into_it(tmp_path):
    keras_vars, keras_opt = _train(keras.optimizers.Adam, steps=3)
    path = tf.train.Checkpoint(optimizer=keras_opt).write(str(tmp_path / "ckpt"))
    fresh = [keras.Variable(np.zeros(s, np.float32)) for s in SHAPES]
    fused_opt = FusedAdam(learning_rate=1e-2)
    fused_opt.build(fresh)
    tf.train.Checkpoint(optimizer=fused_opt).read(path).assert_existing_objects_matched()
    assert int(fused_opt.iterations.numpy()) == 3
    for a, b in zip(fused_opt._velocities, keras_opt._velocities):
        np.testing.assert_array_equal(a.numpy(), b.numpy())


def test_under_loss_scaling_an_overflowing_step_changes_nothing():
    variable = keras.Variable(np.ones((4,), np.float32))
    optimizer = keras.optimizers.LossScaleOptimizer(FusedAdam(learning_rate=0.1))
    optimizer.build([variable])
    optimizer.apply_gradients([(tf.constant([np.inf, 1.0, 1.0, 1.0]), variable)])
    np.testing.assert_array_equal(variable.numpy(), np.ones(4))
    optimizer.apply_gradients([(tf.constant([1.0, 1.0, 1.0, 1.0]) * optimizer.dynamic_scale, variable)])
    np.testing.assert_allclose(variable.numpy(), np.full(4, 0.9), atol=1e-6)
