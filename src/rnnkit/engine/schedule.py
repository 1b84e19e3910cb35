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


def progress(step: int, elapsed: float, config) -> float:
    """How far the schedule is after warmup, in [0, 1]: by steps when `config.steps` is set, else by
    `elapsed` seconds of the `config.time_budget`."""
    if config.steps is None:
        return min(1.0, max(0.0, elapsed / config.time_budget))
    span = max(1, config.steps - config.warmup_steps)
    return min(1.0, max(0.0, (step - config.warmup_steps) / span))


def lr_at(step: int, config, elapsed: float = 0.0) -> float:
    """Learning rate for optimizer step `step` (0-based) under TrainConfig `config`, `elapsed` seconds
    of training into the run (read only when the schedule runs by time)."""
    if step < config.warmup_steps:
        return config.lr * (step + 1) / config.warmup_steps
    return config.lr * SCHEDULES[config.schedule](progress(step, elapsed, config), config.min_lr_ratio)
