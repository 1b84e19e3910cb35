"""Optimizers and learning-rate schedules, each a registry entry.

The learning rate is a pure function of the run's progress, so resuming needs only the step and the
run's elapsed time, never a scheduler object:

    warmup (step < W):   lr(step) = lr * (step + 1) / W
    after W:             lr(step) = lr * shape(p)
        cosine:          shape(p) = r + (1 - r) * (1 + cos(pi * p)) / 2
        linear:          shape(p) = r + (1 - r) * (1 - p)
        constant:        shape(p) = 1
with W = --warmup-steps, r = --min-lr-ratio and p the progress in [0, 1]:

    by steps (--steps S):                  p = (step - W) / (S - W)
    by time (--time-budget B, no --steps): p = t / B, t the run's training wall time so far

so a run given only a time budget decays over that budget's wall time, whatever its speed, and
ends at r * lr when the budget runs out.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable

import torch


def _adamw(params: Iterable, config) -> torch.optim.Optimizer:
    return torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)


def _sgd(params: Iterable, config) -> torch.optim.Optimizer:
    return torch.optim.SGD(params, lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay)


OPTIMIZERS: dict[str, Callable[[Iterable, object], torch.optim.Optimizer]] = {"adamw": _adamw, "sgd": _sgd}


def _cosine(progress: float, min_ratio: float) -> float:
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))


def _linear(progress: float, min_ratio: float) -> float:
    return min_ratio + (1.0 - min_ratio) * (1.0 - min(progress, 1.0))


def _constant(progress: float, min_ratio: float) -> float:
    return 1.0


SCHEDULES: dict[str, Callable[[float, float], float]] = {"cosine": _cosine, "linear": _linear, "constant": _constant}


def progress(step: int, elapsed: float, config, cap: int | None = None) -> float:
    """How far the schedule is after warmup, in [0, 1]: by steps when `config.steps` is set, else by
    `elapsed` seconds of the `config.time_budget`, or by `cap` steps where those come first (a task's
    most useful steps under a budget, Task.budget_steps)."""
    if config.steps is None:
        by_time = min(1.0, max(0.0, elapsed / config.time_budget))
        return by_time if cap is None else max(by_time, _by_steps(step, cap, config.warmup_steps))
    return _by_steps(step, config.steps, config.warmup_steps)


def _by_steps(step: int, steps: int, warmup: int) -> float:
    return min(1.0, max(0.0, (step - warmup) / max(1, steps - warmup)))


def lr_at(step: int, config, elapsed: float = 0.0, cap: int | None = None) -> float:
    """Learning rate for optimizer step `step` (0-based) under TrainConfig `config`, `elapsed` seconds
    of training into the run (read only when the schedule runs by time) and the step `cap` the task
    puts on a time budget, if any."""
    if step < config.warmup_steps:
        return config.lr * (step + 1) / config.warmup_steps
    return config.lr * SCHEDULES[config.schedule](progress(step, elapsed, config, cap), config.min_lr_ratio)
