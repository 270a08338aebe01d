"""Learning rate as a pure function of the optimizer step: linear warmup, then decay.

Being a function of the step alone, the schedule needs nothing in a checkpoint besides the step.
"""

from __future__ import annotations

import math


def lr_at(step: int, lr: float, warmup_steps: int, decay_steps: int, decay: str = "linear",
          min_lr_ratio: float = 0.0) -> float:
    """LR of optimizer step `step` (0-based): lr * (step + 1) / warmup_steps during warmup, then a
    decay that reaches lr * min_lr_ratio at step decay_steps and stays there."""
    if warmup_steps > 0 and step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    floor = lr * min_lr_ratio
    if decay == "constant" or decay_steps <= warmup_steps:
        return lr
    progress = min(1.0, (step - warmup_steps) / max(1, decay_steps - warmup_steps))
    if decay == "linear":
        return floor + (lr - floor) * (1.0 - progress)
    if decay == "cosine":
        return floor + (lr - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))
    raise ValueError(f"optim.decay={decay!r} is not one of ['linear', 'cosine', 'constant']")


def schedule_from_config(optim, max_steps: int):
    decay_steps = optim.decay_steps or max_steps

    def fn(step: int) -> float:
        return lr_at(step, optim.lr, optim.warmup_steps, decay_steps, optim.decay, optim.min_lr_ratio)

    return fn
