"""The start decision on a table of run-directory states: every state the suite and the README name."""

from __future__ import annotations

import json

import pytest

from engine.checkpoint import CheckpointError
from engine.rundir import RunDirError
from engine.start import Action, Decision, Folder, Saved, decide, refuse, survey

RUN = "/runs/demo"
TOTAL = 20  # steps of --epochs: 2 epochs of 10 steps
AT_1 = Saved(f"{RUN}/checkpoints/ckpt-000000010", step=10, epoch=1)
AT_END = Saved(f"{RUN}/checkpoints/ckpt-000000020", step=20, epoch=2)
STOPPED = Saved(f"{RUN}/checkpoints/ckpt-000000010", step=10, epoch=1, stopped=True)
DAMAGED = f"None of the 2 checkpoints in {RUN}/checkpoints verifies"

TABLE = [
    # (what the folder holds, --overwrite, --restore_from) -> (action, step, keep_epochs, remove_final_model)
    ("a new folder", Folder(RUN), False, None, (Action.FRESH, 0, 0, False)),
    ("a new folder, --restore_from", Folder(RUN), False, "/runs/old", (Action.WARM, 0, 0, False)),
    ("a run stopped after epoch 1 (signal, kill)", Folder(RUN, newest=AT_1), False, None,
     (Action.RESUME, 10, 1, False)),
    ("a history written past its checkpoint (a crash between them)", Folder(RUN, newest=AT_1), False, None,
     (Action.RESUME, 10, 1, False)),
    ("a resumable run ignores --restore_from", Folder(RUN, newest=AT_1), False, "/runs/old",
     (Action.RESUME, 10, 1, False)),
    ("a finished run given more --epochs", Folder(RUN, newest=AT_1, final_model=True), False, None,
     (Action.RESUME, 10, 1, True)),
    ("a finished run, the same command again", Folder(RUN, newest=AT_END, final_model=True), False, None,
     (Action.RESUME, 20, 2, False)),
    ("an early-stopped run given more --epochs", Folder(RUN, newest=STOPPED, final_model=True), False, None,
     (Action.RESUME, 10, 1, False)),
    ("epoch 1 recorded, killed before its first save", Folder(RUN, history=(1,)), False, None,
     (Action.FRESH, 0, 0, False)),
    ("the same, with --restore_from", Folder(RUN, history=(1,)), False, "/runs/old", (Action.WARM, 0, 0, False)),
    ("--overwrite over a finished run", Folder(RUN, history=(1, 2), newest=AT_END, final_model=True), True,
     None, (Action.FRESH, 0, 0, False)),
    ("--overwrite over damaged checkpoints", Folder(RUN, damaged=DAMAGED), True, "/runs/old",
     (Action.WARM, 0, 0, False)),
]

REFUSED = [
    ("a finished run whose checkpoints were deleted", Folder(RUN, history=(1, 2), final_model=True),
     False, "no checkpoint to resume from"),
    ("one epoch recorded, no checkpoint, a final model", Folder(RUN, history=(1,), final_model=True),
     False, "no checkpoint to resume from"),
    ("checkpoints none of which verifies", Folder(RUN, damaged=DAMAGED), True, DAMAGED),
]


@pytest.mark.parametrize("name, folder, overwrite, restore_from, expected", TABLE, ids=[t[0] for t in TABLE])
def test_the_start_of_each_folder_state(name, folder, overwrite, restore_from, expected):
    decision = decide(folder, overwrite=overwrite, restore_from=restore_from, total_steps=TOTAL)
    action, step, keep, remove = expected
    assert (decision.action, decision.step, decision.keep_epochs, decision.remove_final_model) == expected
    assert decision.checkpoint == {Action.RESUME: folder.newest and folder.newest.path,
                                   Action.WARM: restore_from, Action.FRESH: None}[action]
    refuse(decision)  # passes


@pytest.mark.parametrize("name, folder, broken, says", REFUSED, ids=[t[0] for t in REFUSED])
def test_the_refused_states(name, folder, broken, says):
    decision = decide(folder, overwrite=False, restore_from="/runs/old", total_steps=TOTAL)
    assert decision.action is Action.REFUSE and decision.broken is broken and says in decision.message
    assert "\n" not in decision.message or broken
    with pytest.raises(CheckpointError if broken else RunDirError, match=says.split(" ")[0]):
        refuse(decision)
    assert decide(folder, overwrite=True, restore_from=None, total_steps=TOTAL) == Decision(Action.FRESH)


def test_survey_reads_what_the_folder_holds(tmp_path):
    assert survey(str(tmp_path / "absent")) == Folder(str(tmp_path / "absent"))
    (tmp_path / "history.jsonl").write_text(json.dumps({"epoch": 1}) + "\n" + json.dumps({"epoch": 2}) + "\n")
    (tmp_path / "final_model.keras").write_bytes(b"weights")
    (tmp_path / "checkpoints").mkdir()
    assert survey(str(tmp_path)) == Folder(str(tmp_path), history=(1, 2), final_model=True)
    (tmp_path / "checkpoints" / "ckpt-000000010").mkdir()  # no state.json: damaged
    held = survey(str(tmp_path))
    assert held.newest is None and "ckpt-000000010" in held.damaged and held.history == ()
