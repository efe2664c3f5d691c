"""The training loop: calls the compiled steps, asks the policies, saves, logs. It owns no math."""

from __future__ import annotations

import logging
import math
import os
import shutil
import signal
import sys
import tempfile
import time

import numpy as np
import tensorflow as tf

from data import pipeline, split as split_lib
from data.lgg import DataError
from engine import build, rundir
from engine import steps as steps_lib
from engine.checkpoint import CheckpointManager, find_checkpoint
from engine.config import Config
from engine.policies import EarlyStopping, ReduceLROnPlateau
from engine.runtime import Runtime
from engine.summaries import SummaryWriter, overlay


class NonFiniteLossError(RuntimeError):
    """The loss went NaN or infinite outside float16's skipped steps."""


def itstime(step: int, every: int, total: int | None = None) -> bool:
    """The one answer to "is it time to log / save / evaluate" at this step or epoch."""
    return (every > 0 and step % every == 0) or (total is not None and step == total)


class StopRequest:
    """Turns SIGTERM/SIGINT into a flag the loop checks between steps.

    The current step finishes, a checkpoint is written, and the run exits
    cleanly; a second signal falls back to the default (immediate) behaviour.
    """

    def __init__(self):
        self.signal_name: str | None = None
        self._previous = {}

    def __enter__(self):
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        self.signal_name = signal.Signals(signum).name
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        return False


class Progress:
    """A one-line progress bar on a terminal, silent elsewhere (logs get the epoch line)."""

    def __init__(self, enabled: bool):
        self.enabled = enabled and sys.stderr.isatty()

    def update(self, epoch: int, done: int, total: int, loss: float, dice: float, ips: float):
        if self.enabled:
            bar = "#" * int(30 * done / max(total, 1))
            sys.stderr.write(f"\repoch {epoch} [{bar:<30}] {done}/{total} loss {loss:.4f} "
                             f"dice {dice:.4f} {ips:.1f} img/s ")
            sys.stderr.flush()

    def end(self):
        if self.enabled:
            sys.stderr.write("\n")


def _fetch(totals: dict) -> dict[str, float]:
    """Reads a metric dict back to the host (this is where the step's time is paid)."""
    return {k: float(v) for k, v in totals.items()}


def overlay_indices(positive: np.ndarray, count: int) -> np.ndarray:
    """A fixed, spread-out choice of validation slices: half with lesions, half empty."""
    pos, neg = np.flatnonzero(positive), np.flatnonzero(~positive)
    n_pos = min(len(pos), (count + 1) // 2)
    n_neg = min(len(neg), count - n_pos)
    pick = lambda idx, n: idx[np.linspace(0, len(idx) - 1, n).astype(int)] if n else idx[:0]
    return np.concatenate([pick(pos, n_pos), pick(neg, n_neg)])


def evaluate_split(steps: steps_lib.Steps, runtime: Runtime, images, masks, *,
                   batch_size: int, image_size: int) -> dict[str, float]:
    """Streams the eval step over a whole split: sums counts, then one Dice."""
    ds = pipeline.eval_dataset(images, masks, batch_size=batch_size, image_size=image_size)
    totals = None
    for batch in runtime.strategy.experimental_distribute_dataset(ds):
        totals = steps_lib.add_sums(totals, steps.evaluate(batch))
    return steps_lib.summarize_eval(_fetch(totals))


def train(config: Config, runtime: Runtime, *, log=logging.info) -> dict:
    """Trains to --epochs or early stop, resuming from the run directory if it can.

    Returns:
      A summary: final step, epoch, best metric and the reason training ended.
    """
    run_dir = rundir.prepare(config, log=log) if runtime.is_chief else tempfile.mkdtemp()
    dataset = build.load_dataset(config, log=log)
    split = split_lib.load_or_make_split(
        run_dir, dataset, val_fraction=config.val_fraction,
        test_fraction=config.test_fraction, seed=config.seed, num_folds=config.num_folds,
        fold=config.fold)
    train_set, val_set = dataset.subset(split["train"]), dataset.subset(split["val"])
    log(f"Split: {len(split['train'])} train / {len(split['val'])} val / "
        f"{len(split['test'])} test patients; {len(train_set.records)} train slices, "
        f"{len(val_set.records)} val slices")

    state = build.build_train_state(config, runtime)
    steps = build.make_steps(config, runtime, state)
    checkpoint = state.checkpoint()
    manager = CheckpointManager(directory=os.path.join(run_dir, "checkpoints"),
                                keep=config.keep_checkpoints, monitor=config.monitor,
                                mode=config.monitor_mode, log=log)
    for path in manager.remove_temporaries():
        log(f"Removed a partial checkpoint left by a crash: {path}")

    plateau = ReduceLROnPlateau(mode=config.monitor_mode, factor=config.plateau_factor,
                                patience=config.plateau_patience,
                                min_delta=config.plateau_min_delta,
                                cooldown=config.plateau_cooldown, min_lr=config.min_lr)
    stopper = EarlyStopping(mode=config.monitor_mode, patience=config.early_stopping_patience,
                            min_delta=config.early_stopping_min_delta)
    run_state = {"base_lr": config.learning_rate, "epoch_totals": None, "stopped": None}

    restored = manager.restore_latest(checkpoint)
    if restored is not None:
        plateau.restore(restored.state["plateau"])
        stopper.restore(restored.state["early_stopping"])
        run_state.update(restored.state["run"])
        rundir.truncate_history(run_dir, restored.epoch)
        log(f"Resumed from {restored.path} (step {restored.step}, epoch {restored.epoch})")
    elif config.restore_from:
        source = find_checkpoint(config.restore_from)
        manager.restore(tf.train.Checkpoint(model=state.model), source, partial=True)
        log(f"Warm start: model weights from {source.path}")

    batches_per_epoch = pipeline.train_batches_per_epoch(len(train_set.records), runtime.global_batch)
    if batches_per_epoch == 0:
        raise DataError(
            f"the training split has {len(train_set.records)} slices, fewer than one global "
            f"batch of {runtime.global_batch}; lower --batch_size or add patients")
    total_steps = batches_per_epoch * config.epochs
    warmup_steps = int(config.warmup_epochs * batches_per_epoch)
    writer = SummaryWriter(run_dir if runtime.is_chief else None)
    if restored is None:
        writer.text(0, "config", "```\n" + config.to_json() + "\n```")
        writer.text(0, "runtime", runtime.describe())
    val_overlay = overlay_indices(val_set.positive, config.num_overlays)
    eval_batch = (config.eval_batch_size or config.batch_size) * runtime.replicas
    progress = Progress(config.progress)

    def save(epoch: int, metrics: dict) -> None:
        manager.save(checkpoint, step=int(state.step.numpy()), epoch=epoch, metrics=metrics,
                     state={"plateau": plateau.state(), "early_stopping": stopper.state(),
                            "run": run_state})

    def set_lr_for(step: int) -> None:
        if step < warmup_steps:
            state.set_learning_rate(run_state["base_lr"] * (step + 1) / warmup_steps)
        elif state.learning_rate != run_state["base_lr"]:
            state.set_learning_rate(run_state["base_lr"])

    step = int(state.step.numpy())
    epoch, in_epoch = divmod(step, batches_per_epoch)
    stop_reason = run_state["stopped"]
    log(f"Training from step {step} (epoch {epoch}) to {total_steps} steps: "
        f"{batches_per_epoch} steps/epoch, global batch {runtime.global_batch}")
    with StopRequest() as stop:
        while epoch < config.epochs and stop_reason is None:
            ds = pipeline.train_dataset(
                train_set.images, train_set.masks, batch_size=runtime.global_batch,
                image_size=config.image_size, seed=config.seed, epoch=epoch,
                augment=config.augmentation, positive_fraction=config.positive_fraction,
                skip_batches=in_epoch)
            iterator = iter(runtime.strategy.experimental_distribute_dataset(ds))
            epoch_totals = run_state["epoch_totals"] or {}
            window, window_steps, window_start = {}, 0, time.perf_counter()
            epoch_start = time.perf_counter()
            while in_epoch < batches_per_epoch:
                n = min(config.steps_per_execution, batches_per_epoch - in_epoch)
                if config.log_every:
                    n = min(n, config.log_every - step % config.log_every)
                if config.checkpoint_every_steps:
                    n = min(n, config.checkpoint_every_steps - step % config.checkpoint_every_steps)
                set_lr_for(step)
                totals = _fetch(steps.train(iterator, tf.constant(n, tf.int32)))
                if totals["nonfinite"]:
                    raise NonFiniteLossError(
                        f"the training loss became NaN or infinite at step {step + n} "
                        f"(epoch {epoch}); the last good checkpoint in {manager.directory} is "
                        f"intact. Lower --learning_rate or check the data.")
                step, in_epoch = step + n, in_epoch + n
                epoch_totals = {k: epoch_totals.get(k, 0.0) + v for k, v in totals.items()}
                window = {k: window.get(k, 0.0) + v for k, v in totals.items()}
                window_steps += n
                elapsed = time.perf_counter() - window_start
                ips = window_steps * runtime.global_batch / max(elapsed, 1e-9)
                live = steps_lib.summarize_train(window, window_steps)
                progress.update(epoch, in_epoch, batches_per_epoch, live["loss"], live["dice"], ips)
                if itstime(step, config.log_every):
                    writer.scalars(step, {"train": {
                        **live, "learning_rate": state.learning_rate,
                        "loss_scale": float(steps_lib.loss_scale(state.optimizer)),
                        "skipped_steps": window["skipped"],
                        "steps_per_sec": window_steps / max(elapsed, 1e-9),
                        "images_per_sec": ips}})
                    if window["skipped"]:
                        log(f"step {step}: {int(window['skipped'])} step(s) skipped by float16 "
                            f"loss scaling (scale now {float(steps_lib.loss_scale(state.optimizer)):g})")
                    window, window_steps, window_start = {}, 0, time.perf_counter()
                run_state["epoch_totals"] = epoch_totals if in_epoch < batches_per_epoch else None
                if stop.signal_name or itstime(step, config.checkpoint_every_steps):
                    save(epoch, {})
                if stop.signal_name:
                    progress.end()
                    log(f"{stop.signal_name} received: saved a checkpoint at step {step} "
                        f"(epoch {epoch}, {in_epoch}/{batches_per_epoch} steps); exiting. "
                        f"Run the same command to resume.")
                    writer.close()
                    return {"step": step, "epoch": epoch, "stopped": stop.signal_name,
                            "traces": dict(steps.traces)}
            progress.end()
            epoch, in_epoch = epoch + 1, 0
            epoch_seconds = time.perf_counter() - epoch_start
            train_metrics = steps_lib.summarize_train(epoch_totals, batches_per_epoch)
            record = {"epoch": epoch, "step": step, "learning_rate": state.learning_rate,
                      "wall_time": time.time(), "epoch_seconds": epoch_seconds,
                      "skipped_steps": epoch_totals.get("skipped", 0.0), **train_metrics}
            metrics = {}
            if itstime(epoch, config.eval_every, config.epochs):
                val = evaluate_split(steps, runtime, val_set.images, val_set.masks,
                                     batch_size=eval_batch, image_size=config.image_size)
                metrics = {f"val_{k}": v for k, v in val.items()}
                record.update(metrics)
                writer.scalars(step, {"val": val})
                monitored = metrics[config.monitor]
                new_lr = plateau.update(monitored, run_state["base_lr"])
                if new_lr != run_state["base_lr"]:
                    log(f"Plateau in {config.monitor}: learning rate {run_state['base_lr']:g} -> {new_lr:g}")
                    run_state["base_lr"] = new_lr
                    state.set_learning_rate(new_lr)
                if stopper.update(monitored, epoch=epoch):
                    stop_reason = f"early stopping: no {config.monitor} improvement for {config.early_stopping_patience} evaluations"
                    run_state["stopped"] = stop_reason
            if len(val_overlay) and itstime(epoch, config.overlay_every, config.epochs):
                images = pipeline.preprocess(val_set.images[val_overlay], config.image_size)
                probs = steps.predict(images).numpy()
                gt = pipeline.resize_masks(val_set.masks[val_overlay], config.image_size).numpy()
                writer.images(step, "val/overlay", overlay(images.numpy(), gt, probs))
            rundir.append_history(run_dir, record) if runtime.is_chief else None
            save(epoch, metrics)
            writer.flush()
            log(f"epoch {epoch}/{config.epochs} step {step}: loss {train_metrics['loss']:.4f} "
                f"dice {train_metrics['dice']:.4f}"
                + "".join(f" {k} {v:.4f}" for k, v in metrics.items())
                + f" lr {state.learning_rate:.3g} ({epoch_seconds:.1f}s, "
                f"{batches_per_epoch * runtime.global_batch / max(epoch_seconds, 1e-9):.1f} img/s)")

    summary = finish(config, runtime, state, manager, writer, run_dir, log=log)
    summary.update(step=step, epoch=epoch, stopped=stop_reason or "finished",
                   traces=dict(steps.traces))
    log(f"Training ended ({summary['stopped']}) at step {step}, epoch {epoch}.")
    if not runtime.is_chief:
        shutil.rmtree(run_dir, ignore_errors=True)
    return summary


def finish(config: Config, runtime: Runtime, state: build.TrainState, manager: CheckpointManager,
           writer: SummaryWriter, run_dir: str, *, log) -> dict:
    """Restores the best weights, writes the final model and the hparams summary."""
    best = manager.best()
    if config.restore_best_weights and best is not None:
        manager.restore(tf.train.Checkpoint(model=state.model), best, partial=True)
        log(f"Restored the best weights: {best.name} ({config.monitor} "
            f"{best.metrics.get(config.monitor, float('nan')):.4f}, epoch {best.epoch})")
    final_path = build.save_final_model(state.model, run_dir) if runtime.is_chief else None
    best_metrics = best.metrics if best is not None else {}
    writer.hparams(int(state.step.numpy()), _hparams(config), {
        "hparams/val_dice": best_metrics.get("val_dice", math.nan),
        "hparams/val_loss": best_metrics.get("val_loss", math.nan)})
    writer.close()
    return {"final_model": final_path, "best": best.name if best else None,
            "best_metrics": best_metrics}


def _hparams(config: Config) -> dict:
    keys = ("image_size", "base_filters", "depth", "dropout", "batch_norm", "batch_size",
            "learning_rate", "positive_fraction", "dice_smooth", "bce_weight", "dice_weight",
            "augment", "precision", "epochs")
    return {k: getattr(config, k) for k in keys}
