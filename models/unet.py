"""The seed U-Net (Keras 3), with its parameter count and forward FLOPs computed analytically."""

from __future__ import annotations

import dataclasses
import numbers

import keras

from models.fused_batch_norm import FusedBatchNormalization


@dataclasses.dataclass(frozen=True)
class ModelSize:
    """Size of one U-Net configuration.

    Attributes:
      params: all parameters including BatchNorm moving statistics; equals
        `build_unet(...).count_params()`.
      forward_flops_per_image: 2 x multiply-accumulates of the convolutions and
        transposed convolutions for one image, forward only (BatchNorm, ReLU,
        pooling and bias additions are not counted).
    """

    params: int
    forward_flops_per_image: int


def _check_int(name: str, value, minimum: int) -> None:
    # bool is an int subclass, but `depth=True` is a caller's bug, not depth 1.
    if not isinstance(value, numbers.Integral) or isinstance(value, bool) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")


def _validate(*, image_size, base_filters, depth, in_channels) -> None:
    _check_int("depth", depth, 1)
    _check_int("base_filters", base_filters, 1)
    _check_int("in_channels", in_channels, 1)
    _check_int("image_size", image_size, 1)
    if image_size % 2**depth:
        raise ValueError(
            f"image_size must be divisible by 2**depth = {2**depth} (depth {depth} halves it "
            f"{depth} times), got image_size {image_size}")


def _filters(base_filters: int, level: int) -> int:
    # The seed doubles the filters at every level: base, 2*base, ..., 2**depth * base.
    return base_filters * 2**level


def build_unet(*, image_size: int, base_filters: int = 64, depth: int = 4, dropout: float = 0.0,
               batch_norm: bool = True, sync_batch_norm: bool = False, in_channels: int = 3,
               name: str = "unet") -> keras.Model:
    """Builds the seed U-Net, which outputs one channel of logits.

    Every block is conv3x3-ReLU-conv3x3-BatchNorm-ReLU with "same" padding. The
    encoder has `depth` blocks, each followed by 2x2 max-pooling, then comes the
    bottleneck block with `base_filters * 2**depth` filters. Each decoder level
    upsamples with a 2x2 stride-2 Conv2DTranspose, concatenates the encoder
    output of the same resolution and applies a block. A 1x1 convolution gives
    the logits; no sigmoid is applied (the loss and prediction apply it).

    Dropout, when `dropout > 0`, is applied in one place: to the output of the
    bottleneck block (the widest, lowest-resolution features), before the first
    upsampling.

    Layers follow the global Keras dtype policy the caller set (e.g.
    mixed_float16), except the final 1x1 convolution, which is float32 so that
    the logits and the loss computed from them are float32.

    Args:
      image_size: height and width of the square input; divisible by 2**depth.
      base_filters: filters of the first block (the seed uses 64, Buda et al. 32).
      depth: number of 2x2 poolings (the seed uses 4).
      dropout: dropout rate applied after the bottleneck block, in [0, 1).
      batch_norm: whether blocks contain BatchNormalization; without it a block
        is conv3x3-ReLU-conv3x3-ReLU.
      sync_batch_norm: use BatchNormalization(synchronized=True), which reduces
        the batch statistics over all replicas of a tf.distribute strategy.
        Ignored when batch_norm is False.
      in_channels: channels of the input image.
      name: name of the Keras model.

    Returns:
      A functional keras.Model mapping [B, S, S, in_channels] images to float32
      [B, S, S, 1] logits.

    Raises:
      ValueError: if an argument is out of range; the message names it and its value.
    """
    _validate(image_size=image_size, base_filters=base_filters, depth=depth,
              in_channels=in_channels)
    if isinstance(dropout, bool) or not isinstance(dropout, numbers.Real) or not (
            0.0 <= dropout < 1.0):
        raise ValueError(f"dropout must be a number in [0, 1), got {dropout!r}")

    def block(x, filters: int, prefix: str):
        x = keras.layers.Conv2D(filters, 3, padding="same", activation="relu",
                                name=f"{prefix}_conv1")(x)
        # No bias before BatchNorm: BN's beta replaces it, and a bias whose true
        # gradient is zero only lets Adam amplify rounding noise into updates.
        x = keras.layers.Conv2D(filters, 3, padding="same", use_bias=not batch_norm,
                                name=f"{prefix}_conv2")(x)
        if batch_norm:
            # momentum 0.9 (PyTorch's 0.1): Keras' 0.99 leaves the moving statistics
            # lagging the weights for hundreds of steps, so evaluation-mode
            # predictions swing while training-mode Dice is already high.
            # One fused kernel each way instead of Keras' separate ops (see fused_batch_norm.py).
            x = FusedBatchNormalization(momentum=0.9, synchronized=sync_batch_norm,
                                        name=f"{prefix}_bn")(x)
        return keras.layers.ReLU(name=f"{prefix}_relu")(x)

    inputs = keras.Input((image_size, image_size, in_channels), name="image")
    x = inputs
    skips = []
    for level in range(depth):
        x = block(x, _filters(base_filters, level), f"enc{level}")
        skips.append(x)
        x = keras.layers.MaxPooling2D(2, name=f"enc{level}_pool")(x)

    x = block(x, _filters(base_filters, depth), "bottleneck")
    if dropout > 0:
        x = keras.layers.Dropout(dropout, name="bottleneck_dropout")(x)

    for level in reversed(range(depth)):
        filters = _filters(base_filters, level)
        x = keras.layers.Conv2DTranspose(filters, 2, strides=2, padding="same",
                                         name=f"dec{level}_up")(x)
        x = keras.layers.Concatenate(name=f"dec{level}_concat")([x, skips[level]])
        x = block(x, filters, f"dec{level}")

    # float32 even under mixed precision: float16 logits would lose range and
    # precision right where the loss needs them. Never narrower than the model:
    # a float64 model (the strategy-equivalence test) keeps float64 logits.
    wide = keras.mixed_precision.global_policy().compute_dtype == "float64"
    logits = keras.layers.Conv2D(1, 1, dtype="float64" if wide else "float32", name="logits")(x)
    return keras.Model(inputs, logits, name=name)


def unet_size(*, image_size: int, base_filters: int, depth: int, batch_norm: bool = True,
              in_channels: int = 3) -> ModelSize:
    """Counts the parameters and forward FLOPs of `build_unet` analytically.

    Dropout and sync_batch_norm change neither figure, so they are not arguments.

    Args:
      image_size: height and width of the square input; divisible by 2**depth.
      base_filters: filters of the first block.
      depth: number of 2x2 poolings.
      batch_norm: whether blocks contain BatchNormalization (4 values per
        channel: gamma, beta, moving mean and moving variance).
      in_channels: channels of the input image.

    Returns:
      ModelSize: the parameter count (equal to `count_params()` of the built
      model) and the forward FLOPs of one image (2 x multiply-accumulates of the
      convolutions and transposed convolutions).

    Raises:
      ValueError: if an argument is out of range; the message names it and its value.
    """
    _validate(image_size=image_size, base_filters=base_filters, depth=depth,
              in_channels=in_channels)
    params = 0
    macs = 0

    def conv(size: int, kernel: int, cin: int, cout: int, bias: bool = True) -> None:
        # A "same" convolution: every output pixel reads kernel**2 * cin inputs per output channel.
        nonlocal params, macs
        params += kernel * kernel * cin * cout + (cout if bias else 0)
        macs += size * size * kernel * kernel * cin * cout

    def up_conv(out_size: int, cin: int, cout: int) -> None:
        # A 2x2 stride-2 transposed convolution: every input pixel writes a 2x2
        # patch, so each output pixel receives exactly one cin x cout product.
        nonlocal params, macs
        params += 2 * 2 * cin * cout + cout
        macs += out_size * out_size * cin * cout

    def block(size: int, cin: int, filters: int) -> None:
        nonlocal params
        conv(size, 3, cin, filters)
        conv(size, 3, filters, filters, bias=not batch_norm)
        if batch_norm:
            params += 4 * filters

    channels = in_channels
    for level in range(depth + 1):  # the encoder blocks, then the bottleneck
        filters = _filters(base_filters, level)
        block(image_size // 2**level, channels, filters)
        channels = filters
    for level in reversed(range(depth)):
        filters = _filters(base_filters, level)
        size = image_size // 2**level
        up_conv(size, channels, filters)
        block(size, 2 * filters, filters)  # the upsampled features concatenated with the skip
        channels = filters
    conv(image_size, 1, channels, 1)  # logits
    return ModelSize(params=params, forward_flops_per_image=2 * macs)
