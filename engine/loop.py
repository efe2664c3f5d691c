"""Trains one model: wires the data, the model, the checkpoints and the actions into one controller."""

from __future__ import annotations

import hashlib
import logging
import math
import os
import shutil
import tempfile

import tensorflow as tf

from engine import build
from engine import steps as steps_lib
from engine.actions import Evaluate, Overlays, Policies, Progress
from engine.checkpoint import PREFIX, CheckpointError, CheckpointInfo, CheckpointManager, find_checkpoint, restore
from engine.cluster import Cluster
from engine.config import Config
from engine.controller import Controller, LoopState, StopRequest
from engine.policies import EarlyStopping, ReduceLROnPlateau
from engine.inference import InferenceSpec
from engine.rundir import FINAL_MODEL, INFERENCE_FILE, RunDir
from engine.runtime import Runtime
from engine.summaries import SummaryWriter
from engine.trainer import NonFiniteLossError, Trainer

log = logging.getLogger(__name__)

# Flags that may differ between the workers of one cluster: where things are on each machine,
# and what each one shows. Every other flag must be the chief's.
LOCAL_FLAGS = ("data_dir", "cache_dir", "decode_cache", "model_dir", "run_name", "progress",
               "threads", "restore_from")
# Run-directory values shown in TensorBoard's HParams tab.
HPARAMS = ("image_size", "base_filters", "depth", "dropout", "batch_norm", "batch_size",
           "learning_rate", "positive_fraction", "dice_smooth", "bce_weight", "dice_weight",
           "augment", "precision", "epochs")


def train(config: Config, runtime: Runtime) -> dict:
    """Trains to --epochs or early stop, resuming from the run directory if it can.

    Returns:
      A summary: final step, epoch, best metric and why training ended ("finished", an
      early-stopping reason, or the name of the signal that interrupted it).

    Raises:
      RunDirError, DataError, CheckpointError: a user-facing problem, named.
      NonFiniteLossError: the loss went NaN; the last good checkpoint is intact.
    """
    # From the start, so that a signal while the data loads still ends in a save, not a kill.
    with StopRequest() as stop:
        return _train(config, runtime, stop)


def _train(config: Config, runtime: Runtime, stop: StopRequest) -> dict:
    cluster = Cluster(runtime.strategy, num_workers=runtime.num_workers,
                      worker_index=runtime.worker_index)
    run = cluster.together("open the run directory",
                           lambda: RunDir(config.run_dir, writer=runtime.is_chief).open(config))
    cluster.check_same("flags", {k: v for k, v in config.to_dict().items() if k not in LOCAL_FLAGS})
    data = cluster.together("load the data", lambda: build.load_split(config, run, create=True))
    cluster.check_same("patients or split", data.split)
    train_set, val_set = (build.model_data(data.part(p), config) for p in ("train", "val"))
    log.info(f"Split: {len(data.split['train'])} train / {len(data.split['val'])} val / "
             f"{len(data.split['test'])} test patients; {len(train_set.records)} train slices, "
             f"{len(val_set.records)} val slices")

    state = build.build_train_state(config, runtime)
    steps = build.make_steps(config, runtime, state)
    checkpoint = state.checkpoint()
    # Every worker takes part in each save; a non-chief writes its copy to scratch that goes.
    checkpoints = run.checkpoints if runtime.is_chief else _scratch(config.run_dir, runtime.worker_index)
    manager = CheckpointManager(directory=checkpoints, keep=config.keep_checkpoints,
                                monitor=config.monitor, mode=config.monitor_mode)
    if runtime.is_chief:
        for path in manager.remove_temporaries():
            log.info(f"Removed a partial checkpoint left by a crash: {path}")
    policies = Policies(
        monitor=config.monitor,
        plateau=ReduceLROnPlateau(mode=config.monitor_mode, factor=config.plateau_factor,
                                  patience=config.plateau_patience, min_delta=config.plateau_min_delta,
                                  cooldown=config.plateau_cooldown, min_lr=config.min_lr),
        stopper=EarlyStopping(mode=config.monitor_mode, patience=config.early_stopping_patience,
                              min_delta=config.early_stopping_min_delta),
        lower_lr=config.lr_schedule == "plateau")
    loop = LoopState(base_lr=config.learning_rate)

    restored = resume(state, CheckpointManager(directory=run.checkpoints), cluster, runtime.is_chief)
    if restored is not None:
        policies.restore(restored.state)
        loop.restore(restored.state["run"])
        run.truncate_history(restored.epoch)
        log.info(f"Resumed from {restored.path} (step {restored.step}, epoch {restored.epoch})")
        previous = restored.state.get("precision", runtime.precision)
        if previous != runtime.precision:
            log.info(f"The run was trained in {previous} so far; it continues in {runtime.precision}"
                     + (" with a fresh float16 loss scale" if runtime.precision == "mixed_float16" else ""))
    elif config.restore_from:
        source = find_checkpoint(config.restore_from)
        restore(tf.train.Checkpoint(model=state.model), source, partial=True)
        log.info(f"Warm start: model weights from {source.path}")

    trainer = Trainer(state=state, steps=steps, strategy=runtime.strategy, data=train_set,
                      global_batch=runtime.global_batch, image_size=config.image_size,
                      seed=config.seed, augment=config.augmentation,
                      positive_fraction=config.positive_fraction)
    writer = SummaryWriter(run.summaries)
    if restored is None:
        writer.text(0, "config", "```\n" + config.to_json() + "\n```")
        writer.text(0, "runtime", runtime.describe())

    def save(step: int, epoch: int, metrics: dict) -> None:
        manager.save(checkpoint, step=step, epoch=epoch, metrics=metrics,
                     state={**policies.state(), "run": loop.state(), "precision": runtime.precision})

    overlays = Overlays(model=state.model, data=val_set,
                        count=config.num_overlays if runtime.is_chief else 0,
                        image_size=config.image_size, writer=writer)
    controller = Controller(
        trainer=trainer, loop=loop, epochs=config.epochs,
        warmup_steps=int(config.warmup_epochs * trainer.steps_per_epoch),
        cosine=config.lr_schedule == "cosine", min_lr=config.min_lr,
        steps_per_execution=config.steps_per_execution, log_every=config.log_every,
        checkpoint_every=config.checkpoint_every_steps, eval_every=config.eval_every,
        overlay_every=config.overlay_every,
        evaluate=Evaluate(steps=steps, strategy=runtime.strategy, data=val_set,
                          batch_size=config.eval_batch * runtime.replicas, image_size=config.image_size),
        policies=policies, save=save, record=run.append_history, writer=writer, overlays=overlays,
        progress=Progress(config.progress), learning_rate=lambda: state.learning_rate,
        loss_scale=lambda: float(steps_lib.loss_scale(state.optimizer)), agree_stop=cluster.any)
    if trainer.step < trainer.steps_per_epoch * config.epochs and loop.stopped is None:
        # An older final model would outlive this run if it were interrupted: evaluate would
        # score stale weights. It is written again when the run finishes.
        if run.remove(FINAL_MODEL):
            log.info(f"Removed {run.final_model} of the run so far: the run goes on past it, and "
                     "writes it again when it finishes")
    log.info(f"Training from step {trainer.step} (epoch {trainer.step // trainer.steps_per_epoch}) "
             f"to {trainer.steps_per_epoch * config.epochs} steps: {trainer.steps_per_epoch} "
             f"steps/epoch, global batch {runtime.global_batch}")
    try:
        interrupted = controller.run(stop)
    except NonFiniteLossError as e:
        raise NonFiniteLossError(f"{e}; the last good checkpoint in {manager.directory} is intact. "
                                 "Lower --learning_rate or check the data.") from None
    finally:
        if not runtime.is_chief:
            shutil.rmtree(checkpoints, ignore_errors=True)
    traces = {**steps.traces, "predict": overlays.predictor.traces}
    step, epoch = trainer.step, trainer.step // trainer.steps_per_epoch
    if interrupted:
        writer.close()
        return {"step": step, "epoch": epoch, "stopped": interrupted, "traces": traces}
    summary = finish(config, state, manager, writer, run)
    summary.update(step=step, epoch=epoch, stopped=loop.stopped or "finished", traces=traces)
    log.info(f"Training ended ({summary['stopped']}) at step {step}, epoch {epoch}.")
    return summary


def resume(state: build.TrainState, shared: CheckpointManager, cluster: Cluster,
           is_chief: bool) -> CheckpointInfo | None:
    """Restores, on every worker, the newest checkpoint of the run directory that verifies.

    The chief chooses it and every worker restores that same step from the shared directory, so
    a damaged newest checkpoint makes them all fall back together; on one process this is just
    the manager's newest verified checkpoint.

    Raises:
      CheckpointError: none verifies, or a worker cannot read the chosen one.
    """
    chosen, problem = None, None
    if is_chief:
        try:
            chosen = shared.newest_verified()
        except CheckpointError as e:
            problem = e
    # -1: start afresh; -2: the chief found checkpoints but none that verifies.
    step = cluster.broadcast(-2 if problem else chosen.step if chosen else -1)
    if step == -2:
        raise problem or CheckpointError(f"none of the checkpoints in {shared.directory} verifies "
                                         "(see the chief's log)")
    if step == -1:
        return None
    info, problem = None, None
    try:
        info = restore(state.checkpoint(loss_scale=False), os.path.join(shared.directory, f"{PREFIX}-{step:09d}"))
        state.read_loss_scale(info)
    except CheckpointError as e:
        problem = e
    if cluster.any(problem is not None):
        raise problem or CheckpointError(
            f"another worker could not read checkpoint step {step} in {shared.directory}: the run "
            "directory must be one folder that every worker can read")
    return info


def _scratch(run_dir: str, worker: int) -> str:
    """A non-chief worker's checkpoint folder, emptied at start (a kill -9 leaves it behind)."""
    digest = hashlib.sha256(os.path.abspath(run_dir).encode(errors="surrogateescape")).hexdigest()[:12]
    path = os.path.join(tempfile.gettempdir(), f"brainseg-worker{worker}-{digest}")
    shutil.rmtree(path, ignore_errors=True)
    return path


def finish(config: Config, state: build.TrainState, manager: CheckpointManager,
           writer: SummaryWriter, run: RunDir) -> dict:
    """Restores the best weights, writes the final model and the hparams summary."""
    best = manager.best()
    if config.restore_best_weights and best is not None:
        restore(tf.train.Checkpoint(model=state.model), best, partial=True)
        log.info(f"Restored the best weights: {best.name} ({config.monitor} "
                 f"{best.metrics.get(config.monitor, float('nan')):.4f}, epoch {best.epoch})")
    final_path = build.save_final_model(state.model, run)
    # What evaluate, predict and export apply to this run's model.
    run.write_json(INFERENCE_FILE, InferenceSpec(normalize=config.normalize,
                                                 neighbours=config.neighbours).to_json())
    best_metrics = best.metrics if best is not None else {}
    writer.hparams(int(state.step.numpy()), {k: getattr(config, k) for k in HPARAMS}, {
        "hparams/val_dice": best_metrics.get("val_dice", math.nan),
        "hparams/val_loss": best_metrics.get("val_loss", math.nan)})
    writer.close()
    return {"final_model": final_path, "best": best.name if best else None,
            "best_metrics": best_metrics}
