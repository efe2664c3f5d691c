"""Tests for models/unet.py: shapes, dtypes, logits, and the analytic size against Keras and TF."""

from __future__ import annotations

import keras
import numpy as np
import pytest
import tensorflow as tf

from models import unet

# The project's reference figure for base 32, depth 4, 128x128 (Buda et al.'s width).
REFERENCE_GFLOPS = 6.05


@pytest.fixture
def dtype_policy():
    """Lets a test set the global Keras dtype policy and always restores the previous one."""
    previous = keras.config.dtype_policy()
    yield keras.config.set_dtype_policy
    keras.config.set_dtype_policy(previous)


def _profiler_conv_flops(model: keras.Model, image_size: int, in_channels: int) -> int:
    """FLOPs TF's own profiler assigns to the convolutions and transposed convolutions."""
    fn = tf.function(lambda x: model(x, training=False)).get_concrete_function(
        tf.TensorSpec([1, image_size, image_size, in_channels], tf.float32))
    options = tf.compat.v1.profiler.ProfileOptionBuilder.float_operation()
    options["output"] = "none"
    profile = tf.compat.v1.profiler.profile(graph=fn.graph, cmd="scope", options=options)
    flops, nodes = 0, list(profile.children)
    while nodes:
        node = nodes.pop()
        nodes.extend(node.children)
        op_type = fn.graph.get_operation_by_name(node.name).type
        if op_type in ("Conv2D", "Conv2DBackpropInput"):
            flops += node.float_ops
    return flops


SMALL_CONFIGS = [
    dict(image_size=32, base_filters=4, depth=2),
    dict(image_size=32, base_filters=3, depth=1, batch_norm=False, in_channels=1),
    dict(image_size=64, base_filters=2, depth=3, in_channels=4),
    dict(image_size=48, base_filters=5, depth=4, batch_norm=False),
]


@pytest.mark.parametrize("config", SMALL_CONFIGS, ids=str)
def test_params_equal_keras_count(config):
    model = unet.build_unet(**config, dropout=0.3)
    assert unet.unet_size(**config).params == model.count_params()


@pytest.mark.parametrize("config", [
    SMALL_CONFIGS[0],
    SMALL_CONFIGS[3],
    dict(image_size=128, base_filters=32, depth=4),
], ids=str)
def test_flops_equal_tf_profiler(config):
    model = unet.build_unet(**config)
    expected = _profiler_conv_flops(model, config["image_size"], config.get("in_channels", 3))
    assert expected > 0
    assert unet.unet_size(**config).forward_flops_per_image == expected


def test_reference_flops_and_scaling():
    size_128 = unet.unet_size(image_size=128, base_filters=32, depth=4)
    assert size_128.forward_flops_per_image / 1e9 == pytest.approx(REFERENCE_GFLOPS, rel=0.01)
    # Every layer is per-pixel, so doubling the side quadruples the FLOPs and keeps the params.
    size_256 = unet.unet_size(image_size=256, base_filters=32, depth=4)
    assert size_256.forward_flops_per_image == 4 * size_128.forward_flops_per_image
    assert size_256.params == size_128.params


@pytest.mark.parametrize("policy", ["float32", "mixed_float16", "mixed_bfloat16"])
def test_output_shape_and_float32_logits(dtype_policy, policy):
    dtype_policy(policy)
    model = unet.build_unet(image_size=32, base_filters=4, depth=2)
    images = np.random.default_rng(0).uniform(size=(2, 32, 32, 3)).astype(np.float32)
    logits = model(images, training=False)
    assert tuple(logits.shape) == (2, 32, 32, 1)
    assert logits.dtype == tf.float32
    # The policy really reached the body of the network.
    assert model.get_layer("enc0_conv1").compute_dtype == keras.mixed_precision.Policy(
        policy).compute_dtype
    assert np.all(np.isfinite(logits.numpy()))


def test_outputs_logits_not_probabilities():
    model = unet.build_unet(image_size=32, base_filters=4, depth=2)
    head = model.get_layer("logits")
    kernel, bias = head.get_weights()
    head.set_weights([np.zeros_like(kernel), np.full_like(bias, -3.0)])
    logits = model(np.ones((1, 32, 32, 3), np.float32), training=False).numpy()
    # A sigmoid at the end would give 0.047 here.
    np.testing.assert_allclose(logits, -3.0)


def test_dropout_sits_after_bottleneck():
    model = unet.build_unet(image_size=32, base_filters=4, depth=2, dropout=0.25)
    dropouts = [layer for layer in model.layers if isinstance(layer, keras.layers.Dropout)]
    assert [layer.rate for layer in dropouts] == [0.25]
    assert dropouts[0].input is model.get_layer("bottleneck_relu").output
    no_dropout = unet.build_unet(image_size=32, base_filters=4, depth=2)
    assert not any(isinstance(layer, keras.layers.Dropout) for layer in no_dropout.layers)


@pytest.mark.parametrize("batch_norm,sync", [(True, False), (True, True), (False, False)])
def test_batch_norm_options(batch_norm, sync):
    depth = 2
    model = unet.build_unet(image_size=32, base_filters=4, depth=depth, batch_norm=batch_norm,
                            sync_batch_norm=sync)
    norms = [layer for layer in model.layers
             if isinstance(layer, keras.layers.BatchNormalization)]
    # One per block: depth encoder blocks, the bottleneck and depth decoder blocks.
    assert len(norms) == (2 * depth + 1 if batch_norm else 0)
    assert all(layer.synchronized == sync for layer in norms)


@pytest.mark.parametrize("kwargs,message", [
    (dict(image_size=100, depth=3), r"image_size.*2\*\*depth = 8.*100"),
    (dict(image_size=0), r"image_size.*got 0"),
    (dict(image_size=64, depth=0), r"depth.*got 0"),
    (dict(image_size=64, depth=True), r"depth.*got True"),
    (dict(image_size=64, base_filters=0), r"base_filters.*got 0"),
    (dict(image_size=64, base_filters=2.5), r"base_filters.*got 2.5"),
    (dict(image_size=64, in_channels=-1), r"in_channels.*got -1"),
])
def test_invalid_sizes_name_the_value(kwargs, message):
    kwargs = {"base_filters": 4, "depth": 2, **kwargs}
    with pytest.raises(ValueError, match=message):
        unet.build_unet(**kwargs)
    with pytest.raises(ValueError, match=message):
        unet.unet_size(**kwargs)


@pytest.mark.parametrize("dropout", [-0.1, 1.0, "0.5"])
def test_invalid_dropout_names_the_value(dropout):
    with pytest.raises(ValueError, match=f"dropout.*{dropout!r}"):
        unet.build_unet(image_size=32, base_filters=4, depth=2, dropout=dropout)
