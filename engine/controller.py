"""The controller: the step clock, and at each tick which actions are due (log, evaluate, save, stop)."""

from __future__ import annotations

import dataclasses
import enum
import signal
from typing import Callable, Protocol


def itstime(step: int, every: int, total: int | None = None) -> bool:
    """The one answer to "is it time to log / save / evaluate" at this step or epoch."""
    return (every > 0 and step % every == 0) or (total is not None and step == total)


def steps_to_next(step: int, everies: tuple[int, ...], most: int) -> int:
    """Steps from `step` to the next step at which `itstime` holds for one of `everies` (<= most)."""
    return min([most] + [every - step % every for every in everies if every > 0])


@dataclasses.dataclass(frozen=True)
class EpochEnd:
    """What the eval actions get at the end of an epoch: its train metrics and its evaluation."""

    epoch: int  # 1-based: the epoch that just ended
    step: int
    train: dict  # the trainer's epoch metrics (loss, dice, iou, skipped_steps, steps, seconds)
    val: dict  # {"val_loss": ...}, or {} when the epoch was not evaluated


class StopReason(enum.Enum):
    """Why training ended, and the exit code the command ends with."""

    FINISHED = "finished"  # the last step
    EARLY_STOP = "early stop"  # the monitored metric stopped improving
    SIGTERM = "SIGTERM"
    SIGINT = "SIGINT"

    @property
    def interrupted(self) -> bool:
        """A signal ended the run before its last step: it saved a checkpoint and resumes."""
        return self in (StopReason.SIGTERM, StopReason.SIGINT)

    @property
    def exit_code(self) -> int:
        """0 for a run that ended; 128 + the signal's number for an interrupted one, as a shell
        reports a process the signal ended (130 for SIGINT, 143 for SIGTERM)."""
        return {StopReason.SIGINT: 130, StopReason.SIGTERM: 143}.get(self, 0)


class StopRequest:
    """Turns SIGTERM/SIGINT into a flag the controller checks between steps.

    The current step finishes, a checkpoint is written, and the run exits;
    a second signal falls back to the default (immediate) behaviour.
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


class Trainer(Protocol):
    """What the controller needs of a trainer (engine.trainer.Trainer)."""

    steps_per_epoch: int

    @property
    def step(self) -> int: ...

    def train(self, num_steps: int) -> dict: ...

    def pop_window(self) -> dict: ...

    def pop_epoch(self) -> dict: ...


@dataclasses.dataclass
class Controller:
    """Runs the trainer to the last step, and runs each list of actions when the clock says so.

    Attributes:
      trainer: runs N steps from `trainer.step`, the one step counter, and keeps their metrics.
      epochs, steps_per_execution: the last step is epochs x trainer.steps_per_epoch; a train
        call runs at most steps_per_execution steps, and never past a log, save or epoch end.
      log_every, checkpoint_every: in steps (0: never); eval_every: in epochs (and the last).
      evaluate: the validation metrics ({"val_dice": ...}), called at the epochs due.
      save: (step, metrics) at every epoch end, every checkpoint_every steps and on a signal.
      train_actions: (step, the logging window so far) after every train call.
      log_actions: (step, the closed logging window) every log_every steps.
      eval_actions: (EpochEnd) at every epoch end, before the save.
      stop_reason: why training should end early (StopReason.EARLY_STOP), or None.
      agree_stop: True on every worker if it is True on any (one process: itself).
    """

    trainer: Trainer
    epochs: int
    steps_per_execution: int
    log_every: int
    checkpoint_every: int
    eval_every: int
    evaluate: Callable[[], dict]
    save: Callable[[int, dict], None]
    train_actions: list = dataclasses.field(default_factory=list)
    log_actions: list = dataclasses.field(default_factory=list)
    eval_actions: list = dataclasses.field(default_factory=list)
    stop_reason: Callable[[], StopReason | None] = lambda: None
    agree_stop: Callable[[bool], bool] = lambda stop: stop

    def run(self, stop: StopRequest) -> StopReason | None:
        """Trains until the last step, early stopping or a signal; returns the signal's reason, if any.

        On a signal to any worker, every worker saves at the same step and returns.
        """
        per_epoch = self.trainer.steps_per_epoch
        total = per_epoch * self.epochs
        while self.trainer.step < total and self.stop_reason() is None:
            n = steps_to_next(self.trainer.step, (per_epoch, self.log_every, self.checkpoint_every),
                              self.steps_per_execution)
            window = self.trainer.train(n)
            step = self.trainer.step
            stopping = self.agree_stop(stop.signal_name is not None)
            for action in self.train_actions:
                action(step, window)
            if itstime(step, self.log_every):
                window = self.trainer.pop_window()
                for action in self.log_actions:
                    action(step, window)
            if step % per_epoch == 0:
                self._end_epoch(step, step // per_epoch)
            elif stopping or itstime(step, self.checkpoint_every):
                self.save(step, {})
            if stopping:
                # SIGTERM when another worker got the signal: it was preempted.
                return StopReason(stop.signal_name or "SIGTERM")
        return None

    def _end_epoch(self, step: int, epoch: int) -> None:
        val = self.evaluate() if itstime(epoch, self.eval_every, self.epochs) else {}
        end = EpochEnd(epoch=epoch, step=step, train=self.trainer.pop_epoch(), val=val)
        for action in self.eval_actions:
            action(end)
        self.save(step, val)
