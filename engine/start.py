"""How a run starts: what its run directory holds (`survey`), and one pure function of that and
of the flags (`decide`) that says start fresh, resume at step N, warm start, or refuse."""

from __future__ import annotations

import dataclasses
import enum
import os

from engine.checkpoint import CheckpointError, CheckpointInfo, CheckpointManager
from engine.rundir import RunDir, RunDirError


class Action(enum.Enum):
    FRESH = "fresh"  # step 0, new weights
    RESUME = "resume"  # the newest checkpoint that verifies, at its step
    WARM = "warm"  # step 0, the model weights of --restore_from
    REFUSE = "refuse"  # nothing is written; `message` says why


@dataclasses.dataclass(frozen=True)
class Saved:
    """The newest checkpoint that verifies: where it is, its clock, and whether its run had stopped."""

    path: str
    step: int
    epoch: int
    stopped: bool = False  # early stopping had ended the run when it was saved


@dataclasses.dataclass(frozen=True)
class Folder:
    """What a run directory holds, as the start decision reads it (`survey` in train.py fills it).

    checkpoints: how many checkpoints have an intact state.json.
    newest: the newest that verifies, or None.
    damaged: why none verifies, when there are checkpoints but none does.
    """

    path: str
    history: tuple[int, ...] = ()  # the epochs history.jsonl records
    checkpoints: int = 0
    newest: Saved | None = None
    damaged: str | None = None
    final_model: bool = False


@dataclasses.dataclass(frozen=True)
class Decision:
    """What the run does: its action, the step it starts at, the history it keeps, and whether
    the final model of the run so far goes (the run goes on past it; it is written at the end)."""

    action: Action
    step: int = 0
    checkpoint: str | None = None  # RESUME: the checkpoint folder; WARM: --restore_from
    keep_epochs: int = 0  # history records past this epoch were written after the checkpoint
    remove_final_model: bool = False
    message: str = ""  # REFUSE: one line for the user
    broken: bool = False  # REFUSE: the checkpoints are damaged (exit 1), not a user's mistake (2)


def decide(folder: Folder, *, overwrite: bool, restore_from: str | None, total_steps: int) -> Decision:
    """The start of a run, from what its directory holds and the flags.

    Args:
      folder: what the directory holds (empty for a new one).
      overwrite: --overwrite: the directory's run is removed, so it starts afresh.
      restore_from: --restore_from, the weights a fresh start begins with.
      total_steps: the steps of --epochs, past which a run has finished.

    Returns:
      RESUME at the newest checkpoint that verifies; REFUSE checkpoints none of which verifies,
      or a history with no checkpoint behind it (its clock is lost: only --overwrite restarts
      it), except a first epoch recorded before its save was made (it is trained again); else
      WARM with --restore_from, or FRESH.
    """
    if overwrite:
        folder = Folder(folder.path)
    start = Decision(Action.WARM, checkpoint=restore_from) if restore_from else Decision(Action.FRESH)
    if folder.damaged:
        return Decision(Action.REFUSE, message=folder.damaged, broken=True)
    if folder.newest is not None:
        saved = folder.newest
        return Decision(Action.RESUME, step=saved.step, checkpoint=saved.path, keep_epochs=saved.epoch,
                        remove_final_model=folder.final_model and saved.step < total_steps and not saved.stopped)
    killed_before_first_save = folder.history == (1,) and not folder.final_model
    if folder.history and not killed_before_first_save:
        return Decision(Action.REFUSE, message=(
            f"{folder.path} holds {len(folder.history)} epochs of training history but no checkpoint "
            "to resume from (its checkpoints folder is missing or empty); the run and its final model "
            "are left as they are. Pass --overwrite to train it again from step 0, or use another "
            "--model_dir"))
    return dataclasses.replace(start, remove_final_model=folder.final_model)


def refuse(decision: Decision) -> None:
    """Raises the refusal a REFUSE decision carries; any other decision passes.

    Raises:
      CheckpointError: the checkpoints are damaged (exit 1).
      RunDirError: the folder cannot be resumed as it is (exit 2).
    """
    if decision.action is Action.REFUSE:
        raise (CheckpointError if decision.broken else RunDirError)(decision.message)


def survey(path: str) -> Folder:
    """What the run directory at `path` holds, read without writing: its newest checkpoint that
    verifies (or why none does), its history's epochs when it has no checkpoint, its final model."""
    run = RunDir(path, writer=False)
    if not os.path.isdir(path):
        return Folder(path)
    try:
        info, damaged = CheckpointManager(directory=run.checkpoints).newest_verified(), None
    except CheckpointError as e:
        info, damaged = None, str(e)
    newest = None
    if info is not None:
        stopped = run_state(info).get("policies", {}).get("stopped")  # a reason, or None
        newest = Saved(info.path, info.step, info.epoch, stopped=bool(stopped))
    history = () if info or damaged else tuple(r.get("epoch") for r in run.history())
    return Folder(path, history=history, newest=newest, damaged=damaged,
                  final_model=os.path.exists(run.final_model))


def run_state(info: CheckpointInfo) -> dict:
    """The JSON state a checkpoint saved beside its variables, in today's layout.

    Checkpoints written before the schedule and the trainer kept their own state held it under
    "run": the base rate and the stop reason read as they were; a part-epoch's sums, which
    lacked their step count, are dropped, so that epoch's record counts the steps after the
    resume only.
    """
    state = dict(info.state)
    old = state.pop("run", None)
    if old is not None:
        state["schedule"] = {"base_lr": old["base_lr"]}
        state["trainer"] = {"epoch_sums": None}
        state["policies"] = {"plateau": state.pop("plateau"), "early_stopping": state.pop("early_stopping"),
                             "stopped": old["stopped"]}
    return state
