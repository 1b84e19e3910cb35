"""Losses and metrics by name, for `rnnkit.fit(loss="mse", metrics=["mae"])`.

Each maps (output, target) to a 0-d tensor, the mean over the batch. A user's own is any callable
with that signature. Classification losses accept a sequence of class scores (B, T, C) with targets
(B, T) as well as (B, C) with (B,): the time dimension is folded into the batch.

    mse            mean of (output - target)^2
    mae            mean of |output - target|
    cross_entropy  softmax cross-entropy of class scores against integer classes, in nats
    accuracy       fraction of rows whose highest score is the target class
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from rnnkit.engine.errors import UsageError

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def _classes(output: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    if output.dim() != target.dim() + 1 or output.shape[:-1] != target.shape:
        raise UsageError(
            f"class scores of shape {tuple(output.shape)} do not fit integer targets of shape "
            f"{tuple(target.shape)}: expected scores (..., C) over targets (...)"
        )
    return output.reshape(-1, output.shape[-1]), target.reshape(-1)


def _same_shape(name: str, output: torch.Tensor, target: torch.Tensor) -> None:
    if output.shape != target.shape:
        raise UsageError(
            f"{name}: the model's output has shape {tuple(output.shape)} but the target has shape {tuple(target.shape)}"
        )


def mse(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    _same_shape("mse", output, target)
    return F.mse_loss(output, target)


def mae(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    _same_shape("mae", output, target)
    return F.l1_loss(output, target)


def cross_entropy(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(*_classes(output, target))


def accuracy(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    scores, classes = _classes(output, target)
    return (scores.argmax(-1) == classes).float().mean()


LOSSES: dict[str, LossFn] = {"mse": mse, "mae": mae, "cross_entropy": cross_entropy}
METRICS: dict[str, LossFn] = {"mse": mse, "mae": mae, "cross_entropy": cross_entropy, "accuracy": accuracy}


def resolve(spec: str | LossFn, table: dict[str, LossFn], what: str) -> tuple[str, LossFn]:
    """(name, function) for a registry name or a callable."""
    if callable(spec):
        return getattr(spec, "__name__", what), spec
    if spec not in table:
        raise UsageError(
            f"unknown {what} {spec!r}; choose from {', '.join(table)} or pass a function "
            f"(output, target) -> scalar tensor"
        )
    return spec, table[spec]
