"""The training state: the model a config describes, its optimizer and step, and how they are restored."""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
import shutil
import tempfile

import keras
import tensorflow as tf

from data import volume
from engine import checkpoint as checkpoint_lib
from engine import steps as steps_lib
from engine.checkpoint import CheckpointError, CheckpointInfo
from engine.cluster import Cluster
from engine.config import Config, ConfigError
from engine.runtime import Runtime
from engine.start import Action, Decision, refuse
from models import unet

log = logging.getLogger(__name__)


def build_model(config: Config, runtime: Runtime | None = None) -> keras.Model:
    """The U-Net of the config, under the global precision policy."""
    return unet.build_unet(
        image_size=config.image_size, base_filters=config.base_filters, depth=config.depth,
        dropout=config.dropout, batch_norm=config.batch_norm,
        in_channels=volume.channels(config.neighbours),
        sync_batch_norm=bool(runtime and runtime.sync_batch_norm))


# Float32 tensors a training step keeps per pixel and channel of each U-Net level, counted
# roughly: the encoder's and decoder's convolution, BatchNorm and ReLU outputs, the
# concatenation and their gradients. A refusal needs the order of magnitude, not the byte.
_TENSORS_PER_LEVEL = 24
_WEIGHT_COPIES = 4  # the weights, their gradients and Adam's two moments


def check_memory(config: Config, batch: int) -> None:
    """Refuses a model or batch that cannot fit this machine's memory, before anything runs.

    Raises:
      ConfigError: the estimate exceeds the physical memory; it names the flags and the sizes.
    """
    params = unet.unet_size(image_size=config.image_size, base_filters=config.base_filters,
                            depth=config.depth, in_channels=volume.channels(config.neighbours)).params
    per_image = sum((config.image_size >> level) ** 2 * (config.base_filters << level)
                    for level in range(config.depth + 1)) * _TENSORS_PER_LEVEL * 4
    need = params * 4 * _WEIGHT_COPIES + per_image * max(batch, config.eval_batch)
    have = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    if need > have:
        raise ConfigError(
            "batch_size", f"--base_filters={config.base_filters} --depth={config.depth} "
            f"--image_size={config.image_size} with batches of {max(batch, config.eval_batch)} needs "
            f"about {need / 2**30:.0f} GiB ({params:,} parameters, {per_image / 2**20:.0f} MiB of "
            f"activations per image), more than this machine's {have / 2**30:.0f} GiB: use a smaller "
            "model, image size or batch")


@dataclasses.dataclass
class TrainState:
    """Everything a checkpoint holds as variables. `step` is the run's only clock."""

    model: keras.Model
    optimizer: keras.optimizers.Optimizer
    step: tf.Variable

    @classmethod
    def build(cls, config: Config, runtime: Runtime) -> "TrainState":
        """Creates the model, optimizer (with its slots) and step under the strategy's scope.

        The optimizer is built eagerly so that a checkpoint restore finds every slot
        variable in place, and restoring is just reading values.
        """
        with runtime.strategy.scope():
            model = build_model(config, runtime)
            optimizer = steps_lib.build_optimizer(config.learning_rate, runtime.precision)
            optimizer.build(model.trainable_variables)
            # optimizer.iterations does not advance on float16-skipped steps, so the
            # clock that places the run in its data is a variable of its own.
            step = tf.Variable(0, dtype=tf.int64, trainable=False, name="step",
                               aggregation=tf.VariableAggregation.ONLY_FIRST_REPLICA)
        return cls(model=model, optimizer=optimizer, step=step)

    def steps(self, config: Config, runtime: Runtime) -> steps_lib.Steps:
        """The compiled train and eval steps of this state."""
        return steps_lib.Steps(
            model=self.model, optimizer=self.optimizer, strategy=runtime.strategy,
            global_batch=runtime.global_batch, jit_compile=runtime.jit_compile, step=self.step,
            loss=config.loss)

    def checkpoint(self, *, loss_scale: bool = True) -> tf.train.Checkpoint:
        """The variables of a checkpoint: the model, Adam, the step, and float16's loss scale.

        Adam is saved under its own name whatever the precision, and the loss scale (if any)
        beside it, so that a run resumes under another --precision: restores ask for
        loss_scale=False, then `read_loss_scale`, and a float32 run continued under
        mixed_float16 starts with a fresh scale.
        """
        parts = dict(model=self.model, optimizer=steps_lib.inner_optimizer(self.optimizer),
                     step=self.step)
        if loss_scale and isinstance(self.optimizer, keras.optimizers.LossScaleOptimizer):
            parts["loss_scale"] = self._loss_scale()
        return tf.train.Checkpoint(**parts)

    def read_loss_scale(self, info: CheckpointInfo) -> None:
        """Reads the float16 loss scale of a checkpoint, where it has one."""
        if isinstance(self.optimizer, keras.optimizers.LossScaleOptimizer):
            checkpoint_lib.restore(tf.train.Checkpoint(loss_scale=self._loss_scale()), info, partial=True)

    def _loss_scale(self) -> tf.train.Checkpoint:
        return tf.train.Checkpoint(scale=self.optimizer.dynamic_scale,
                                   counter=self.optimizer.step_counter)

    @property
    def loss_scale(self) -> float:
        return float(steps_lib.loss_scale(self.optimizer))

    @property
    def learning_rate(self) -> float:
        return float(steps_lib.inner_optimizer(self.optimizer).learning_rate.numpy())

    def set_learning_rate(self, value: float) -> None:
        steps_lib.inner_optimizer(self.optimizer).learning_rate.assign(value)


def agree(decision: Decision | None, cluster: Cluster, *, checkpoints: str, restore_from: str | None) -> Decision:
    """The chief's start decision (None on the other workers) on every worker.

    Its action and step cross the cluster; the rest a worker knows from the shared flags and
    folder, or does not need (only the chief writes).
    """
    actions = list(Action)
    action = actions[cluster.broadcast(actions.index(decision.action) if decision else 0)]
    step = cluster.broadcast(decision.step if decision else 0)
    broken = bool(cluster.broadcast(int(decision.broken) if decision else 0))
    if decision is not None:
        return decision
    where = os.path.join(checkpoints, f"{checkpoint_lib.PREFIX}-{step:09d}")
    return Decision(action, step=step, checkpoint=where if action is Action.RESUME else restore_from,
                    message=f"the chief refused to start from {checkpoints}: see its log", broken=broken)


def begin(state: TrainState, decision: Decision, cluster: Cluster) -> CheckpointInfo | None:
    """Does what the start decision says to the state, on every worker: restores the checkpoint
    it names (RESUME), reads --restore_from's weights (WARM), or nothing (FRESH).

    Returns:
      The restored checkpoint (RESUME), else None.

    Raises:
      CheckpointError: the checkpoints are damaged, or a worker cannot read the chosen one.
      RunDirError: the decision refused the run directory.
    """
    refuse(decision)
    if decision.action is Action.WARM:
        warm_start(state, decision.checkpoint)
    if decision.action is not Action.RESUME:
        return None
    info, problem = None, None
    try:
        info = checkpoint_lib.restore(state.checkpoint(loss_scale=False), decision.checkpoint)
        state.read_loss_scale(info)
    except CheckpointError as e:
        problem = e
    if cluster.any(problem is not None):
        raise problem or CheckpointError(
            f"another worker could not read {decision.checkpoint}: the run directory must be one "
            "folder that every worker can read")
    return info


def warm_start(state: TrainState, source: str) -> CheckpointInfo:
    """Reads only the model weights of another run or checkpoint (--restore_from)."""
    info = checkpoint_lib.find_checkpoint(source)
    checkpoint_lib.restore(tf.train.Checkpoint(model=state.model), info, partial=True)
    log.info(f"Warm start: model weights from {info.path}")
    return info


def scratch(run_dir: str, worker: int) -> str:
    """A non-chief worker's checkpoint folder, made afresh at start (a kill -9 leaves it behind).

    It lies in the shared temporary folder, so what is found under its name is removed, never
    followed: a link there (anyone's) would have the checkpoints written through it.
    """
    digest = hashlib.sha256(os.path.abspath(run_dir).encode(errors="surrogateescape")).hexdigest()[:12]
    path = os.path.join(tempfile.gettempdir(), f"brainseg-{os.getuid()}-worker{worker}-{digest}")
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path)
    elif os.path.lexists(path):
        os.remove(path)
    os.mkdir(path, 0o700)  # fails, rather than follows, if something took the name meanwhile
    return path
