"""When a monitored metric improves: Keras' rule, and the best-so-far tracker that ranks checkpoints."""

import numpy as np

MODES = ("min", "max")


def is_better(value: float, reference: float | None, mode: str, min_delta: float) -> bool:
    """Keras' MonitorCallback._is_improvement: beats `reference` by more than `min_delta`."""
    if reference is None:
        return True
    # Keras turns Python floats into float32 tensors before comparing, so a gain
    # finer than float32 resolution is no gain; do the same to trigger on the same epochs.
    if mode == "min":
        return bool(np.float32(value + min_delta) < np.float32(reference))
    return bool(np.float32(value - min_delta) > np.float32(reference))


def check_mode(mode: str, min_delta: float) -> None:
    if mode not in MODES:
        raise ValueError(f"mode must be 'min' or 'max', got {mode!r}")
    if not min_delta >= 0:  # Also rejects NaN.
        raise ValueError(f"min_delta must be >= 0, got {min_delta!r}")


class BestMetric:
    """Tracks the best monitored value, as Keras' ModelCheckpoint(save_best_only=True) does.

    The checkpoint manager ranks its checkpoints with it, so the checkpoint that becomes the final
    model is the one Keras would have kept.
    """

    def __init__(self, *, mode: str, min_delta: float = 0.0):
        """Creates the tracker.

        Args:
            mode: "min" or "max": the direction in which the monitored value improves.
            min_delta: An improvement must be larger than this.

        Raises:
            ValueError: If an argument is out of range; the message names it.
        """
        check_mode(mode, min_delta)
        self.mode, self.min_delta = mode, min_delta
        self.best: float | None = None

    def update(self, value: float) -> bool:
        """Records a monitored value.

        Args:
            value: The monitored metric.

        Returns:
            True if `value` is a new best (the first value always is).
        """
        if not is_better(float(value), self.best, self.mode, self.min_delta):
            return False
        self.best = float(value)
        return True

    def state(self) -> dict:
        return {"best": self.best}

    def restore(self, state: dict) -> None:
        if set(state) != {"best"}:
            raise ValueError(f"BestMetric state must have keys ['best'], got {sorted(state)}")
        self.best = state["best"]
