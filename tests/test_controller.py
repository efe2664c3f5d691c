"""The controller's cadence, with a fake trainer: no TensorFlow, every decision of the clock checked."""

from __future__ import annotations

import sys

from engine.controller import Controller, StopReason, StopRequest, itstime, steps_to_next


class FakeTrainer:
    """Counts steps; its metrics say which steps they cover."""

    def __init__(self, steps_per_epoch: int, step: int = 0):
        self.steps_per_epoch, self.step, self.calls = steps_per_epoch, step, []
        self._window, self._epoch = [], []

    def train(self, num_steps: int) -> dict:
        assert (self.step % self.steps_per_epoch) + num_steps <= self.steps_per_epoch  # never past an epoch end
        covered = list(range(self.step + 1, self.step + num_steps + 1))
        self.calls.append(num_steps)
        self.step += num_steps
        self._window += covered
        self._epoch += covered
        return {"steps": len(self._window)}

    def pop_window(self) -> dict:
        window, self._window = self._window, []
        return {"steps": window}

    def pop_epoch(self) -> dict:
        epoch, self._epoch = self._epoch, []
        return {"steps": epoch}


def _controller(trainer, events, **overrides):
    stop_after = overrides.pop("stop_after_epoch", None)
    values = dict(
        trainer=trainer, epochs=3, steps_per_execution=4, log_every=5, checkpoint_every=0, eval_every=2,
        evaluate=lambda: events.append(("evaluate", trainer.step)) or {"val_dice": 0.5},
        save=lambda step, metrics: events.append(("save", step, bool(metrics))),
        train_actions=[lambda step, window: events.append(("train", step))],
        log_actions=[lambda step, window: events.append(("log", step, window["steps"]))],
        eval_actions=[lambda end: events.append(("epoch", end.epoch, end.step, end.train["steps"], end.val))],
        stop_reason=lambda: (StopReason.EARLY_STOP if stop_after and any(e[0] == "epoch" and e[1] >= stop_after
                                                            for e in events) else None))
    values.update(overrides)
    return Controller(**values)


def _of(events, kind):
    return [e[1:] for e in events if e[0] == kind]


def test_the_clock_decides_train_calls_logs_evaluations_and_saves():
    trainer, events = FakeTrainer(steps_per_epoch=7), []
    assert _controller(trainer, events).run(StopRequest()) is None
    assert trainer.step == 21
    # At most 4 steps a call, and a call ends at every log step (5, 10, ...) and epoch end (7, 14).
    assert trainer.calls == [4, 1, 2, 3, 4, 1, 4, 1, 1]
    assert [s for (s,) in _of(events, "train")] == [4, 5, 7, 10, 14, 15, 19, 20, 21]
    # Each log gets exactly the steps since the last log, across calls and epoch ends.
    assert _of(events, "log") == [(5, [1, 2, 3, 4, 5]), (10, [6, 7, 8, 9, 10]), (15, [11, 12, 13, 14, 15]),
                                  (20, [16, 17, 18, 19, 20])]
    # Every epoch end: the epoch's own steps; evaluation at epochs 2 and 3 (every 2, and the last).
    assert [(e, s, steps[0], steps[-1], bool(val)) for e, s, steps, val in _of(events, "epoch")] == [
        (1, 7, 1, 7, False), (2, 14, 8, 14, True), (3, 21, 15, 21, True)]
    assert _of(events, "evaluate") == [(14,), (21,)]
    # A save at every epoch end, after its actions, with the metrics of the evaluation if any.
    assert _of(events, "save") == [(7, False), (14, True), (21, True)]
    assert events.index(("save", 14, True)) > events.index(("epoch", 2, 14, list(range(8, 15)), {"val_dice": 0.5}))


def test_checkpoints_every_n_steps_as_well_as_at_epoch_ends():
    trainer, events = FakeTrainer(steps_per_epoch=10), []
    _controller(trainer, events, epochs=2, checkpoint_every=4, log_every=0, steps_per_execution=100).run(StopRequest())
    assert trainer.calls == [4, 4, 2, 2, 4, 4]
    assert [s for s, _ in _of(events, "save")] == [4, 8, 10, 12, 16, 20]


def test_early_stopping_ends_the_run_after_the_epoch_that_asked():
    trainer, events = FakeTrainer(steps_per_epoch=5), []
    assert _controller(trainer, events, epochs=10, stop_after_epoch=2).run(StopRequest()) is None
    assert trainer.step == 10 and [e for e, *_ in _of(events, "epoch")] == [1, 2]


def test_a_resumed_run_starts_from_the_trainers_step_mid_epoch():
    trainer, events = FakeTrainer(steps_per_epoch=7, step=9), []
    _controller(trainer, events, log_every=0).run(StopRequest())
    assert trainer.calls == [4, 1, 4, 3] and trainer.step == 21
    assert [(e, steps[0]) for e, _, steps, _ in _of(events, "epoch")] == [(2, 10), (3, 15)]


def test_a_signal_saves_at_the_next_step_and_ends_with_its_name():
    trainer, events = FakeTrainer(steps_per_epoch=7), []
    stop, train = StopRequest(), trainer.train

    def train_until_a_signal(num_steps):  # SIGTERM arrives during the call that ends at step 4
        window = train(num_steps)
        stop.signal_name = "SIGTERM" if trainer.step == 4 else None
        return window

    trainer.train = train_until_a_signal
    assert _controller(trainer, events, log_every=0, steps_per_execution=2).run(stop) is StopReason.SIGTERM
    assert trainer.step == 4 and _of(events, "save") == [(4, False)] and not _of(events, "epoch")


def test_sigint_ends_with_its_own_reason_and_the_shells_exit_codes():
    trainer, events = FakeTrainer(steps_per_epoch=7), []
    stop, train = StopRequest(), trainer.train

    def train_until_ctrl_c(num_steps):
        window = train(num_steps)
        stop.signal_name = "SIGINT"
        return window

    trainer.train = train_until_ctrl_c
    assert _controller(trainer, events, log_every=0).run(stop) is StopReason.SIGINT
    # What the README documents: 128 + the signal's number for a run that resumes, 0 otherwise.
    assert {r: (r.exit_code, r.interrupted) for r in StopReason} == {
        StopReason.FINISHED: (0, False), StopReason.EARLY_STOP: (0, False),
        StopReason.SIGINT: (130, True), StopReason.SIGTERM: (143, True)}


def test_a_signal_to_another_worker_stops_this_one_too():
    trainer, events = FakeTrainer(steps_per_epoch=7), []
    agreed = iter([False, True])
    controller = _controller(trainer, events, log_every=0, steps_per_execution=4,
                             agree_stop=lambda mine: next(agreed))
    assert controller.run(StopRequest()) is StopReason.SIGTERM  # this worker got no signal itself
    assert trainer.step == 7 and _of(events, "save") == [(7, False)]  # the epoch end's save only


def test_the_controller_needs_no_tensorflow():
    import subprocess

    probe = "import sys, engine.controller; sys.exit(1 if 'tensorflow' in sys.modules else 0)"
    assert subprocess.run([sys.executable, "-c", probe]).returncode == 0


def test_itstime_and_steps_to_next():
    assert [s for s in range(1, 13) if itstime(s, 5, 12)] == [5, 10, 12]
    assert not itstime(3, 0) and itstime(4, 0, 4)
    assert steps_to_next(3, (7, 5, 0), 100) == 2 and steps_to_next(5, (7, 5), 100) == 2
    assert steps_to_next(0, (7, 5), 3) == 3
