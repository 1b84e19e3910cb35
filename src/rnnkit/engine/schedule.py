"""Optimizers and learning-rate schedules, each a registry entry.

The schedule is a pure function of the step, so resuming needs only the step, never a scheduler object:

    warmup (step < W):   lr(step) = lr * (step + 1) / W
    cosine (after W):    lr(step) = lr * (r + (1 - r) * (1 + cos(pi * p)) / 2),  p = (step - W) / (S - W)
    constant (after W):  lr(step) = lr
with S = --steps, W = --warmup-steps, r = --min-lr-ratio.
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


def _constant(progress: float, min_ratio: float) -> float:
    return 1.0


SCHEDULES: dict[str, Callable[[float, float], float]] = {"cosine": _cosine, "constant": _constant}


def lr_at(step: int, config) -> float:
    """Learning rate for optimizer step `step` (0-based) under TrainConfig `config`."""
    if step < config.warmup_steps:
        return config.lr * (step + 1) / config.warmup_steps
    span = max(1, config.steps - config.warmup_steps)
    return config.lr * SCHEDULES[config.schedule]((step - config.warmup_steps) / span, config.min_lr_ratio)
