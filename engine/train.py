"""`--mode=train`: one model or K fold members, each in phases: open the run, load the data and its
split, build the state, restore it, run the controller, finish; then the run's inference record."""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import shutil

import numpy as np
import tensorflow as tf

from data import dataset as lgg_dataset
from data import pipeline
from data.lgg import DataError
from engine import actions, inputs, postprocessing, start
from engine import state as state_lib
from engine import steps as steps_lib
from engine.checkpoint import CheckpointError, CheckpointManager, find_checkpoint, restore
from engine.cluster import Cluster
from engine.config import HPARAM_FIELDS, LOCAL_FIELDS, Config, ConfigError, from_record
from engine.controller import Controller, StopReason, StopRequest
from engine.inference_spec import InferenceSpec
from engine.policies import EarlyStopping, ReduceLROnPlateau
from engine.rundir import CONFIG_FILE, EVENTS, FINAL_MODEL, MEMBERS, RunDir, RunDirError, confined
from engine.runtime import Runtime
from engine.schedule import Schedule
from engine.summaries import SummaryWriter
from engine.trainer import Trainer

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class TrainResult:
    """What training came to.

    Attributes:
      stop: why it ended (finished, an early stop, or the signal that interrupted it).
      step, epoch: where it ended.
      restored: it resumed from a checkpoint.
      traces: Python traces of each compiled function ("train", "eval", "predict").
      iterators: training-data iterators made (one for the whole run).
      stop_detail: the early stop's sentence, for the log.
      final_model, best, best_metrics: the model written, and the best checkpoint's name and
        metrics (a run that ended, not an interrupted one).
      inference: the inference recorded for the run (its inference.json), once it is.
    """

    stop: StopReason
    step: int
    epoch: int
    restored: bool
    traces: dict[str, int]
    iterators: int
    stop_detail: str = ""
    final_model: str | None = None
    best: str | None = None
    best_metrics: dict = dataclasses.field(default_factory=dict)
    inference: InferenceSpec | None = None


def run(config: Config, runtime: Runtime) -> TrainResult:
    """Trains the run's members and records the inference evaluate, predict and export apply.

    With --ensemble=K (K >= 2) the patients outside the test split are cut into K folds (by
    --seed) and member k trains on all of them but fold k, in <run_dir>/members/<k>; each member
    is a run of its own, resumed where it stopped. The members' predictions on their own
    held-out fold (out-of-fold, as nnU-Net's cross-validation) choose the post-processing. With
    one model, its validation patients choose it, if there are any.

    Returns:
      The last member's result, with the recorded inference when training ended.
    """
    cluster = Cluster(runtime.strategy, num_workers=runtime.num_workers, worker_index=runtime.worker_index)
    # From the start, so that a signal while the data loads still ends in a save, not a kill.
    with StopRequest() as stop:
        # Everything that can refuse the run is checked before the run directory is written.
        data = cluster.together("load the data", lambda: _before_writing(config, runtime))
        with _open(config, runtime, cluster) as run_dir:
            if run_dir.read_split() is None:
                inputs.write_split(run_dir, config, data.split)
            if config.ensemble < 2:
                result = train_model(config, runtime, run_dir, cluster, stop, data)
                val = data.part("val")
                held_out, members = ([(FINAL_MODEL, val)] if val.records else []), [FINAL_MODEL]
            else:
                result, held_out, members = _train_members(config, runtime, run_dir, cluster, stop, data)
            if result.stop.interrupted or not runtime.is_chief:
                return result
            return dataclasses.replace(
                result, inference=postprocessing.record(config, run_dir, held_out, members=members,
                                                        precision=runtime.precision))


def _before_writing(config: Config, runtime: Runtime) -> inputs.SplitData:
    """The data and its split, and every refusal that needs no write, before anything is written:
    a refused command leaves the run directory as it was (or absent)."""
    state_lib.check_memory(config, config.batch_size)
    run = RunDir(config.run_dir, writer=False)
    _check_folders(config, run)
    if os.path.isdir(run.path) and not config.overwrite:
        stored = run.read_config()  # a config.json brainseg did not write is refused here, by name
        if stored is not None:  # and so is one with a field of the wrong type or range
            from_record(stored, run.file(CONFIG_FILE))
    data = inputs.load_split(config, run, create=True, fresh=config.overwrite)
    train = data.part("train")
    problem = lgg_dataset.class_problem(int(train.positive.sum()), len(train.records), config.positive_fraction)
    if problem:
        raise DataError(f"{config.data_dir}: {problem}")
    _check_batches(config, runtime, data)
    # The decision the run will follow (made again, under the lock, once the folder is open).
    held = start.Folder(run.path) if config.overwrite else start.survey(run.path)  # it goes
    decision = start.decide(held, overwrite=config.overwrite, restore_from=config.restore_from,
                            total_steps=0)  # the steps matter only to the final model, untouched here
    start.refuse(decision)
    if decision.action is start.Action.WARM:
        _check_restore_from(config)
    return data


def _check_folders(config: Config, run: RunDir) -> None:
    """Refuses a run folder (or an ensemble member's) that training could not write safely:
    links among its files, records that leave it, a user's files of the engine's names."""
    if os.path.exists(run.checkpoints) and not os.path.isdir(run.checkpoints):
        raise RunDirError(f"{run.checkpoints} is a file, not the run's checkpoints folder; the run "
                          "is left as it is: move the file away")
    run.check(overwrite=config.overwrite)
    for k in range(config.ensemble if config.ensemble >= 2 else 0):
        member = confined(run.path, f"{MEMBERS}/{k}", source=f"member {k} of the ensemble")
        RunDir(member, writer=False).check(overwrite=config.overwrite)


def _check_batches(config: Config, runtime: Runtime, data: inputs.SplitData) -> None:
    """Refuses a global batch larger than the training slices of the model (or of any member)."""
    pool = data.split["train"] + data.split["val"]
    trains = ([data.split["train"]] if config.ensemble < 2 else
              [set(pool) - set(fold) for fold in member_folds(pool, config.ensemble, seed=config.seed)])
    for patients in trains:
        pipeline.steps_per_epoch(len(data.dataset.indices_of(patients)), runtime.global_batch,
                                 what="the training split")


def _check_restore_from(config: Config) -> None:
    """Refuses a --restore_from that holds no checkpoint, or one that does not fit the model."""
    try:
        info = find_checkpoint(config.restore_from)
        restore(tf.train.Checkpoint(model=state_lib.build_model(config)), info, partial=True)
    except CheckpointError as e:
        raise ConfigError("restore_from", str(e)) from None


def _open(config: Config, runtime: Runtime, cluster: Cluster) -> RunDir:
    """The run directory, locked and checked by the chief, with flags every worker shares."""
    run_dir = cluster.together("open the run directory",
                               lambda: RunDir(config.run_dir, writer=runtime.is_chief).open(config, runtime.record()))
    cluster.check_same("flags", {k: v for k, v in config.to_dict().items() if k not in LOCAL_FIELDS})
    return run_dir


def _train_members(config: Config, runtime: Runtime, top: RunDir, cluster: Cluster, stop: StopRequest,
                   data: inputs.SplitData):
    """Trains the K fold members; returns the last result, the held-out folds and the members."""
    members, held_out, result = [], [], None
    for k, fold in enumerate(member_folds(data.split["train"] + data.split["val"], config.ensemble,
                                          seed=config.seed)):
        split = {"train": sorted(set(data.split["train"] + data.split["val"]) - set(fold)), "val": fold,
                 "test": data.split["test"]}
        log.info(f"Member {k + 1} of {config.ensemble}: {len(split['train'])} training patients, "
                 f"{len(fold)} held out for the post-processing")
        member_config = dataclasses.replace(config, model_dir=os.path.join(config.run_dir, MEMBERS, str(k)),
                                            ensemble=0, num_folds=0, fold=0, overwrite=False)
        with _open(member_config, runtime, cluster) as member:
            member_data = cluster.together("read the member's split",
                                           lambda: _member_data(member_config, member, data, split, k))
            result = train_model(member_config, runtime, member, cluster, stop, member_data)
        if result.stop.interrupted:
            break
        members.append(os.path.join(MEMBERS, str(k), FINAL_MODEL))
        held_out.append((members[-1], data.dataset.subset(fold)))
    return result, held_out, members


def _member_data(config: Config, run: RunDir, data: inputs.SplitData, split: dict, k: int) -> inputs.SplitData:
    """A fold member's split, recorded in its split.json the first time and checked after."""
    if run.read_split() is None:
        inputs.write_split(run, config, split, ensemble_member=k)
    return inputs.SplitData(data.dataset, inputs.run_split(data.dataset, run, config, create=True))


def member_folds(patients: list[str], k: int, *, seed: int) -> list[list[str]]:
    """K disjoint folds of the patients, cut by the seed."""
    pool = sorted(patients)
    order = [pool[i] for i in np.random.RandomState(seed).permutation(len(pool))]
    return [sorted(order[i] for i in chunk) for chunk in np.array_split(np.arange(len(pool)), k)]


def train_model(config: Config, runtime: Runtime, run_dir: RunDir, cluster: Cluster, stop: StopRequest,
                data: inputs.SplitData) -> TrainResult:
    """Trains one model to --epochs or an early stop, resuming from its run directory if it can.

    Args:
      config: the model's flags.
      runtime: the resolved device policy.
      run_dir: its open run directory.
      cluster: what the workers agree through (nothing on one process).
      stop: the signal a run saves and ends on.
      data: the dataset and the run's split (recorded in its split.json).

    Returns:
      Why training ended, where, and (unless a signal interrupted it) the model it wrote.

    Raises:
      RunDirError, DataError, CheckpointError: a user-facing problem, named.
      NonFiniteLossError: the loss went NaN; the last good checkpoint is intact.
    """
    cluster.check_same("patients or split", data.split)
    state = state_lib.TrainState.build(config, runtime)
    wired = _wire(config, runtime, run_dir, data, state, cluster)
    restored = _restore(config, runtime, run_dir, cluster, state, wired)
    try:
        interrupted = wired.controller.run(stop)
    finally:
        if not runtime.is_chief:  # its copies of the checkpoints were only there to take part
            shutil.rmtree(wired.manager.directory, ignore_errors=True)
    step, per_epoch = wired.trainer.step, wired.trainer.steps_per_epoch
    where = dict(step=step, epoch=step // per_epoch, restored=restored is not None, traces=wired.traces,
                 iterators=wired.trainer.iterators)
    if interrupted is not None:
        wired.writer.close()
        log.info(f"{stop.signal_name or 'A signal to another worker'} received: saved a checkpoint at "
                 f"step {step} ({_where(step, per_epoch)}); exiting. Run the same command to resume.")
        return TrainResult(stop=interrupted, **where)
    result = TrainResult(stop=wired.policies.stopped or StopReason.FINISHED, stop_detail=wired.policies.stop_detail,
                         **where, **finish(config, state, wired, run_dir))
    log.info(f"Training ended ({result.stop_detail or result.stop.value}) at step {step}, "
             f"epoch {step // per_epoch}.")
    return result


def _where(step: int, per_epoch: int) -> str:
    epoch, offset = divmod(step, per_epoch)
    return f"{offset}/{per_epoch} steps into epoch {epoch + 1}" if offset else f"end of epoch {epoch}"


@dataclasses.dataclass
class Wired:
    """The pieces of one model's training, as _wire connects them."""

    steps: steps_lib.Steps
    trainer: Trainer
    schedule: Schedule
    policies: actions.Policies
    manager: CheckpointManager  # this process's checkpoints (a non-chief's go to scratch)
    checkpointer: actions.Checkpointer
    overlays: actions.Overlays
    writer: SummaryWriter
    controller: Controller

    @property
    def traces(self) -> dict[str, int]:
        """Python traces so far of each compiled function: the train and eval steps, the overlays'."""
        return {**self.steps.traces, "predict": self.overlays.traces}


def _wire(config: Config, runtime: Runtime, run: RunDir, data: inputs.SplitData,
          state: state_lib.TrainState, cluster: Cluster) -> Wired:
    """The trainer, the policies and every action, given to one controller."""
    train_set, val_set = (inputs.model_data(data.part(p), config) for p in ("train", "val"))
    log.info(f"Split: {len(data.split['train'])} train / {len(data.split['val'])} val / "
             f"{len(data.split['test'])} test patients; {len(train_set.records)} train slices, "
             f"{len(val_set.records)} val slices")
    steps = state.steps(config, runtime)
    per_epoch = pipeline.train_batches_per_epoch(len(train_set.records), runtime.global_batch)
    schedule = Schedule(base_lr=config.learning_rate, warmup_steps=int(config.warmup_epochs * per_epoch),
                        total_steps=per_epoch * config.epochs, min_lr=config.min_lr,
                        cosine=config.lr_schedule == "cosine")
    trainer = Trainer(state=state, steps=steps, strategy=runtime.strategy, data=train_set,
                      schedule=schedule, global_batch=runtime.global_batch, image_size=config.image_size,
                      seed=config.seed, augment=config.augmentation,
                      positive_fraction=config.positive_fraction, checkpoints=run.checkpoints,
                      epochs=config.epochs)
    policies = actions.Policies(
        monitor=config.monitor, schedule=schedule, lower_lr=config.lr_schedule == "plateau",
        plateau=ReduceLROnPlateau(mode=config.monitor_mode, factor=config.plateau_factor,
                                  patience=config.plateau_patience, min_delta=config.plateau_min_delta,
                                  cooldown=config.plateau_cooldown, min_lr=config.min_lr),
        stopper=EarlyStopping(mode=config.monitor_mode, patience=config.early_stopping_patience,
                              min_delta=config.early_stopping_min_delta))
    # Every worker takes part in each save; a non-chief writes its copy to scratch that goes.
    directory = run.checkpoints if runtime.is_chief else state_lib.scratch(run.path, runtime.worker_index)
    manager = CheckpointManager(directory=directory, keep=config.keep_checkpoints,
                                monitor=config.monitor, mode=config.monitor_mode)
    checkpointer = actions.Checkpointer(manager, state.checkpoint(), per_epoch,
                                        {"policies": policies, "schedule": schedule, "trainer": trainer},
                                        runtime.precision)
    writer = run.recording("", EVENTS, lambda: SummaryWriter(run.summaries))
    overlays = actions.Overlays(model=state.model, data=val_set, count=config.num_overlays if runtime.is_chief else 0,
                                image_size=config.image_size, writer=writer, every=config.overlay_every,
                                epochs=config.epochs)
    progress = actions.Progress(config.progress, steps_per_epoch=per_epoch, global_batch=runtime.global_batch)
    report = actions.EpochReport(append=run.append_history, epochs=config.epochs,
                                 images_per_epoch=per_epoch * runtime.global_batch,
                                 learning_rate=lambda: state.learning_rate)
    controller = Controller(
        trainer=trainer, epochs=config.epochs, steps_per_execution=config.steps_per_execution,
        log_every=config.log_every, checkpoint_every=config.checkpoint_every_steps,
        eval_every=config.eval_every, save=checkpointer,
        evaluate=actions.Evaluate(steps=steps, strategy=runtime.strategy, data=val_set,
                                  batch_size=config.eval_batch * runtime.replicas, image_size=config.image_size),
        train_actions=[progress],
        log_actions=[actions.TrainScalars(writer=writer, global_batch=runtime.global_batch,
                                          learning_rate=lambda: state.learning_rate,
                                          loss_scale=lambda: state.loss_scale)],
        eval_actions=[progress.end, policies, report, actions.ValScalars(writer), overlays],
        stop_reason=lambda: policies.stopped, agree_stop=cluster.any)
    return Wired(steps, trainer, schedule, policies, manager, checkpointer, overlays, writer, controller)


def _restore(config: Config, runtime: Runtime, run: RunDir, cluster: Cluster,
             state: state_lib.TrainState, wired: Wired):
    """Starts the run as the start decision says (resumed, warm-started or fresh), the chief's
    decision on every worker; returns the restored checkpoint, if any."""
    trainer, total = wired.trainer, wired.trainer.steps_per_epoch * config.epochs
    chosen = None
    if runtime.is_chief:
        for path in wired.manager.remove_temporaries():
            log.info(f"Removed a partial checkpoint left by a crash: {path}")
        chosen = start.decide(start.survey(run.path), overwrite=config.overwrite,
                              restore_from=config.restore_from, total_steps=total)
    decision = state_lib.agree(chosen, cluster, checkpoints=run.checkpoints, restore_from=config.restore_from)
    restored = state_lib.begin(state, decision, cluster)
    run.truncate_history(decision.keep_epochs)  # records written after the checkpoint, or a lost epoch 1
    if restored is not None:
        saved = start.run_state(restored)
        wired.checkpointer.restore(saved)
        log.info(f"Resumed from {restored.path} (step {restored.step}, epoch {restored.epoch})")
        previous = saved.get("precision", runtime.precision)
        if previous != runtime.precision:
            log.info(f"The run was trained in {previous} so far; it continues in {runtime.precision}"
                     + (" with a fresh float16 loss scale" if runtime.precision == "mixed_float16" else ""))
    else:
        wired.writer.text(0, "config", "```\n" + config.to_json() + "\n```")
        wired.writer.text(0, "runtime", runtime.describe())
    # An older final model would outlive this run if it were interrupted: evaluate would score
    # stale weights. It is written again when the run finishes.
    if decision.remove_final_model and run.remove(FINAL_MODEL):
        log.info(f"Removed {run.final_model} of the run so far: the run goes on past it, and "
                 "writes it again when it finishes")
    log.info(f"Training from step {trainer.step} (epoch {trainer.step // trainer.steps_per_epoch}) "
             f"to {total} steps: {trainer.steps_per_epoch} steps/epoch, global batch {runtime.global_batch}")
    return restored


def finish(config: Config, state: state_lib.TrainState, wired: Wired, run: RunDir) -> dict:
    """Restores the best weights if asked, writes the final model and the hparams summary."""
    best = wired.manager.best()
    if config.restore_best_weights and best is not None:
        restore(tf.train.Checkpoint(model=state.model), best, partial=True)
        log.info(f"Restored the best weights: {best.name} ({config.monitor} "
                 f"{best.metrics.get(config.monitor, float('nan')):.4f}, epoch {best.epoch})")
    final_path = run.write(FINAL_MODEL, lambda tmp: state.model.save(tmp))
    best_metrics = best.metrics if best is not None else {}
    wired.writer.hparams(wired.trainer.step, {k: getattr(config, k) for k in HPARAM_FIELDS}, {
        "hparams/val_dice": best_metrics.get("val_dice", math.nan),
        "hparams/val_loss": best_metrics.get("val_loss", math.nan)})
    wired.writer.close()
    return {"final_model": final_path, "best": best.name if best else None, "best_metrics": best_metrics}
