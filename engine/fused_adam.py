"""Adam whose per-variable update is TensorFlow's fused ResourceApplyAdam kernel."""

from __future__ import annotations

import keras
import tensorflow as tf


@keras.saving.register_keras_serializable(package="brainseg")
class FusedAdam(keras.optimizers.Adam):
    """keras.optimizers.Adam with the update of dense gradients fused into one kernel.

    Keras 3's Adam updates each variable with about ten element-wise ops, each a pass over its
    memory; `ResourceApplyAdam` does the same arithmetic in one pass. Only `update_step` is
    replaced: the variables are Keras Adam's, so checkpoints of either restore into the other.

    The kernel computes, like Keras' Adam:
      alpha = lr * sqrt(1 - beta_2**t) / (1 - beta_1**t),  t = iterations + 1
      m += (g - m) * (1 - beta_1);  v += (g**2 - v) * (1 - beta_2)
      w -= alpha * m / (sqrt(v) + epsilon)
    AMSGrad and sparse (IndexedSlices) gradients use Keras' implementation.
    """

    def update_step(self, gradient, variable, learning_rate):
        if self.amsgrad or isinstance(gradient, tf.IndexedSlices):
            return super().update_step(gradient, variable, learning_rate)
        index = self._get_variable_index(variable)
        dtype = variable.dtype
        step = tf.cast(self.iterations + 1, dtype)
        beta_1 = tf.cast(self.beta_1, dtype)
        beta_2 = tf.cast(self.beta_2, dtype)
        tf.raw_ops.ResourceApplyAdam(
            var=_handle(variable), m=_handle(self._momentums[index]),
            v=_handle(self._velocities[index]),
            beta1_power=tf.pow(beta_1, step), beta2_power=tf.pow(beta_2, step),
            lr=tf.cast(learning_rate, dtype), beta1=beta_1, beta2=beta_2,
            epsilon=tf.cast(self.epsilon, dtype), grad=tf.cast(gradient, dtype),
            use_locking=False)


def _handle(variable):
    """The resource handle of a Keras or tf.Variable; under tf.distribute, this replica's copy."""
    value = variable.value if isinstance(variable, keras.Variable) else variable
    return value.handle
