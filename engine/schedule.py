"""The learning-rate schedule: a pure function of the step, around a base rate the plateau policy lowers."""

from __future__ import annotations

import math


def lr_at(step: int, *, base_lr: float, warmup_steps: int, total_steps: int = 0,
          min_lr: float = 0.0, cosine: bool = False) -> float:
    """The learning rate of a step: a linear warm-up to base_lr, then base_lr or a cosine decay.

    The plateau policy lowers base_lr; during the warm-up the ramp climbs towards the lowered
    value, so a reduction is never undone by the ramp.
    """
    if step < warmup_steps:  # Warm-up: from base_lr / warmup_steps up to base_lr.
        return base_lr * (step + 1) / warmup_steps
    if not cosine:  # After it: whatever the plateau policy has left.
        return base_lr
    # Cosine: from base_lr after the warm-up down to min_lr at the last step.
    t = (step - warmup_steps) / max(1, total_steps - 1 - warmup_steps)
    return min_lr + 0.5 * (base_lr - min_lr) * (1.0 + math.cos(math.pi * min(t, 1.0)))


class Schedule:
    """`schedule(step)` is the learning rate of that step; `base_lr` is its only state."""

    def __init__(self, *, base_lr: float, warmup_steps: int, total_steps: int, min_lr: float,
                 cosine: bool):
        self.base_lr, self.warmup_steps, self.total_steps = base_lr, warmup_steps, total_steps
        self.min_lr, self.cosine = min_lr, cosine

    def __call__(self, step: int) -> float:
        return lr_at(step, base_lr=self.base_lr, warmup_steps=self.warmup_steps,
                     total_steps=self.total_steps, min_lr=self.min_lr, cosine=self.cosine)

    def state(self) -> dict:
        return {"base_lr": self.base_lr}

    def restore(self, state: dict) -> None:
        self.base_lr = state["base_lr"]
