"""FusedBatchNormalization computes what keras.layers.BatchNormalization computes."""

from __future__ import annotations

import keras
import numpy as np
import pytest
import tensorflow as tf

from models.fused_batch_norm import FusedBatchNormalization
from models.unet import build_unet


def _pair(channels=5, **kwargs):
    keras_bn = keras.layers.BatchNormalization(momentum=0.9, **kwargs)
    fused_bn = FusedBatchNormalization(momentum=0.9, **kwargs)
    for layer in (keras_bn, fused_bn):
        layer.build((None, 8, 8, channels))
        if layer.scale:
            layer.gamma.assign(np.linspace(0.5, 2.0, channels))
        if layer.center:
            layer.beta.assign(np.linspace(-1.0, 1.0, channels))
    return keras_bn, fused_bn


def _inputs(shape=(4, 8, 8, 5)):
    return tf.random.stateless_normal(shape, seed=(1, 2)) * 3.0 + 1.0


def _train_call(layer, x):
    with tf.GradientTape() as tape:
        tape.watch(x)
        y = layer(x, training=True)
        loss = tf.reduce_sum(y * tf.sin(x))
    grads = tape.gradient(loss, [x, layer.gamma.value, layer.beta.value])
    return y, grads


def test_training_output_gradients_and_moving_statistics_match_keras():
    keras_bn, fused_bn = _pair()
    x = _inputs()
    for _ in range(3):  # moving statistics accumulate over calls
        y_keras, g_keras = _train_call(keras_bn, x)
        y_fused, g_fused = _train_call(fused_bn, x)
    np.testing.assert_allclose(y_fused, y_keras, atol=1e-5)
    for a, b in zip(g_fused, g_keras):
        np.testing.assert_allclose(a, b, atol=1e-4, rtol=1e-5)
    # The moving variance tracks the biased batch variance, as Keras' does.
    np.testing.assert_allclose(fused_bn.moving_mean.numpy(), keras_bn.moving_mean.numpy(), atol=1e-6)
    np.testing.assert_allclose(fused_bn.moving_variance.numpy(), keras_bn.moving_variance.numpy(),
                               rtol=1e-6)
    assert not np.allclose(fused_bn.moving_variance.numpy(), 1.0)  # they moved


def test_inference_uses_moving_statistics_like_keras():
    keras_bn, fused_bn = _pair()
    for layer in (keras_bn, fused_bn):
        layer.moving_mean.assign(np.linspace(-2.0, 2.0, 5))
        layer.moving_variance.assign(np.linspace(0.5, 4.0, 5))
    x = _inputs()
    np.testing.assert_allclose(fused_bn(x, training=False), keras_bn(x, training=False), atol=1e-5)


def test_float16_activations_stay_float16_and_close():
    keras.config.set_dtype_policy("mixed_float16")
    try:
        keras_bn, fused_bn = _pair()
        x = tf.cast(_inputs(), tf.float16)
        y_keras, y_fused = keras_bn(x, training=True), fused_bn(x, training=True)
    finally:
        keras.config.set_dtype_policy("float32")
    assert y_fused.dtype == tf.float16
    assert fused_bn.moving_mean.dtype == "float32"
    np.testing.assert_allclose(np.float32(y_fused), np.float32(y_keras), atol=1e-2)
    np.testing.assert_allclose(fused_bn.moving_mean.numpy(), keras_bn.moving_mean.numpy(), atol=1e-3)


def test_xla_compiled_training_matches_eager():
    _, fused_bn = _pair()
    x = _inputs()
    eager = fused_bn(x, training=True)
    compiled = tf.function(lambda t: fused_bn(t, training=True), jit_compile=True)(x)
    np.testing.assert_allclose(compiled, eager, atol=1e-5)


@pytest.mark.parametrize("kwargs", [{"synchronized": True}, {"center": False}])
def test_uncovered_cases_fall_back_to_keras(kwargs):
    keras_bn, fused_bn = _pair(**kwargs)
    x = _inputs()
    np.testing.assert_array_equal(fused_bn(x, training=True), keras_bn(x, training=True))


def test_unet_uses_it_and_round_trips_through_a_keras_file(tmp_path):
    model = build_unet(image_size=32, base_filters=4, depth=2)
    assert any(isinstance(layer, FusedBatchNormalization) for layer in model.layers)
    images = np.random.default_rng(0).random((2, 32, 32, 3), np.float32)
    model(images, training=True)  # move the moving statistics off their initial values
    path = tmp_path / "m.keras"
    model.save(path)
    loaded = keras.models.load_model(path, compile=False)
    assert any(isinstance(layer, FusedBatchNormalization) for layer in loaded.layers)
    np.testing.assert_allclose(loaded(images, training=False), model(images, training=False),
                               atol=1e-6)
