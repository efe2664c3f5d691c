"""Reduce-on-plateau and early stopping as small stateful policies."""

import numpy as np

from engine.monitor import check_mode as _check_common, is_better as _is_better


def _check_count(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{name} must be an integer >= 0, got {value!r}")


class _Policy:
    """Saves and restores the attributes named in `_STATE`."""

    _STATE: tuple[str, ...] = ()

    def state(self) -> dict:
        """Returns the mutable state as a JSON-serialisable dict."""
        return {key: getattr(self, key) for key in self._STATE}

    def restore(self, state: dict) -> None:
        """Restores what `state()` returned.

        Args:
            state: A dict from `state()` of a policy of the same class.

        Raises:
            ValueError: If `state` does not have exactly the expected keys.
        """
        if set(state) != set(self._STATE):
            raise ValueError(
                f"{type(self).__name__} state must have keys {sorted(self._STATE)}, "
                f"got {sorted(state)}")
        for key in self._STATE:
            setattr(self, key, state[key])


class ReduceLROnPlateau(_Policy):
    """Multiplies the learning rate by `factor` when the monitored value stops improving.

    Same decisions as `keras.callbacks.ReduceLROnPlateau`. The policy does not own the
    learning rate: the loop passes in the value of its float32 LR variable and assigns
    the returned one, so the compiled step never retraces.
    """

    _STATE = ("best", "wait", "cooldown_counter")

    def __init__(self, *, mode: str, factor: float, patience: int, min_delta: float = 1e-4,
                 cooldown: int = 0, min_lr: float = 0.0):
        """Creates the policy.

        Args:
            mode: "min" or "max": the direction in which the monitored value improves.
            factor: The LR is multiplied by this on a plateau; in (0, 1).
            patience: Epochs without improvement before the LR is reduced.
            min_delta: An improvement must be larger than this.
            cooldown: Epochs after a reduction during which no new plateau is counted.
            min_lr: The LR is never reduced below this.

        Raises:
            ValueError: If an argument is out of range; the message names it.
        """
        _check_common(mode, min_delta)
        if not 0.0 < factor < 1.0:
            raise ValueError(f"factor must be in (0, 1), got {factor!r}")
        _check_count("patience", patience)
        _check_count("cooldown", cooldown)
        if not min_lr >= 0.0:
            raise ValueError(f"min_lr must be >= 0, got {min_lr!r}")
        self.mode, self.factor, self.patience = mode, factor, patience
        self.min_delta, self.cooldown, self.min_lr = min_delta, cooldown, min_lr
        self.best: float | None = None
        self.wait = 0
        self.cooldown_counter = 0

    def update(self, value: float, lr: float) -> float:
        """Records one epoch's monitored value.

        Args:
            value: The monitored metric at the end of the epoch.
            lr: The current learning rate, as held by the float32 LR variable.

        Returns:
            The learning rate for the next epoch: `lr` itself unless it is reduced now.
        """
        value = float(value)
        if self.cooldown_counter > 0:
            self.cooldown_counter -= 1
            self.wait = 0
        if _is_better(value, self.best, self.mode, self.min_delta):
            self.best = value
            self.wait = 0
            return lr
        if self.cooldown_counter > 0:
            return lr
        self.wait += 1
        # Keras tests `lr > float32(min_lr)`, so an LR already clipped to min_lr is left
        # alone and, unlike a reduction, does not reset the wait or start a cooldown.
        lr32 = np.float32(lr)
        if self.wait < self.patience or not lr32 > np.float32(self.min_lr):
            return lr
        self.wait = 0
        self.cooldown_counter = self.cooldown
        # Rounded to what the float32 LR variable will hold.
        return float(np.float32(max(float(lr32) * self.factor, self.min_lr)))


class EarlyStopping(_Policy):
    """Asks to stop when the monitored value has not improved for `patience` epochs.

    Same decisions as `keras.callbacks.EarlyStopping`. Restoring the best weights is
    the trainer's job: `best` and `best_epoch` say which checkpoint holds them.
    """

    _STATE = ("best", "best_epoch", "wait", "epoch")

    def __init__(self, *, mode: str, patience: int, min_delta: float = 0.0):
        """Creates the policy.

        Args:
            mode: "min" or "max": the direction in which the monitored value improves.
            patience: Epochs without improvement after which to stop.
            min_delta: An improvement must be larger than this.

        Raises:
            ValueError: If an argument is out of range; the message names it.
        """
        _check_common(mode, min_delta)
        _check_count("patience", patience)
        self.mode, self.patience, self.min_delta = mode, patience, min_delta
        self.best: float | None = None
        self.best_epoch: int | None = None
        self.wait = 0
        self.epoch = -1  # The epoch of the last update.

    def update(self, value: float, epoch: int | None = None) -> bool:
        """Records one epoch's monitored value.

        Args:
            value: The monitored metric at the end of the epoch.
            epoch: 0-based epoch of `value`; defaults to one after the previous update.

        Returns:
            True if training should stop now.
        """
        value = float(value)
        self.epoch = self.epoch + 1 if epoch is None else epoch
        self.wait += 1
        if _is_better(value, self.best, self.mode, self.min_delta):
            self.best, self.best_epoch, self.wait = value, self.epoch, 0
            return False
        return self.wait >= self.patience and self.epoch > 0
