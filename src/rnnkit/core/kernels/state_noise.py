"""Zoneout and recurrent dropout: masks that change each step of the recurrence, applied by the kernels.

``rnnkit.Regularised`` (core/regularise.py) draws them for a training call and hands them to its
layer (the layer call's ``state_noise=``, per cell index). In an eager call the layer makes them
current for its cells (``applying``); every route that runs the call reads its cell's masks here
(``noise_for``) and applies them inside its loop over time, or declines the call (the routing table
then names the reason). ``torch.compile`` cannot read the ``ContextVar`` that holds them, so a
traced call passes them to its route as arguments instead (core/traced_scan.py applies them in the
body of its loop). Per (layer, direction), for batch B, steps T and hidden size H:

- ``recurrent`` (B, H), recurrent dropout (Gal & Ghahramani 2016, one mask per sequence), scaled by
  ``1 / (1 - p)``: the recurrent product reads ``h_{t-1} * recurrent`` in place of ``h_{t-1}``, at
  every step; the cell's own use of its previous state (the GRU's ``z * h``) is not dropped;
- ``zoneout`` (B, T, H) bool, zoneout (Krueger et al. 2016): where it is True the unit keeps its whole
  previous state at step t (every state field, and the output is the kept ``h``); elsewhere it takes
  the cell's new values.

``noisy_step`` is one step of the specification (the reference loop); the fast kernels compute the
same with the same masks.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator
from typing import NamedTuple

import torch
from torch import Tensor

from rnnkit.core.gates import GatedCell


class StateNoise(NamedTuple):
    """One (layer, direction)'s masks of one call; ``None`` where that regulariser is off."""

    recurrent: Tensor | None  # (B, H), scaled
    zoneout: Tensor | None  # (B, T, H) bool: True keeps the previous state


_ACTIVE: contextvars.ContextVar[dict | None] = contextvars.ContextVar("rnnkit_state_noise", default=None)


def _key(cell) -> int:
    """A cell's key: its input weight, the one object a cell and the cell views a torch.nn-contract layer
    makes again for swapped weights (weight-drop's ``functional_call``) have in common."""
    return id(cell._parameters.get("weight_ih"))


@contextlib.contextmanager
def applying(noise: dict) -> Iterator[None]:
    """``noise`` ({cell: StateNoise}) current for the block: the calls of those cells (or of cells on
    the same input weights) apply it."""
    token = _ACTIVE.set({_key(cell): n for cell, n in noise.items()})
    try:
        yield
    finally:
        _ACTIVE.reset(token)


def noise_for(cell) -> StateNoise | None:
    """The masks current for ``cell``, or ``None`` (always under torch.compile, which cannot read them:
    a traced call's route takes them as arguments)."""
    if torch.compiler.is_compiling():
        return None
    active = _ACTIVE.get()
    return None if not active else active.get(_key(cell))


def active_for(cells) -> str | None:
    """What of zoneout and recurrent dropout is current for any of ``cells`` (for the routing table's
    reasons), or ``None``."""
    active = _ACTIVE.get()
    if not active:
        return None
    return describe(active[_key(c)] for c in cells if _key(c) in active)


def describe(noises) -> str | None:
    """What of zoneout and recurrent dropout ``noises`` (StateNoise) apply: ``"zoneout"``, ``"recurrent
    dropout"``, both joined by "and", or ``None``."""
    noises = list(noises)
    parts = []
    if any(n.zoneout is not None for n in noises):
        parts.append("zoneout")
    if any(n.recurrent is not None for n in noises):
        parts.append("recurrent dropout")
    return " and ".join(parts) or None


def drops_recurrent_input(cell) -> bool:
    """Whether recurrent dropout has a recurrent input to drop in ``cell``: a step that is GatedCell's
    (``combine`` of the projections; minGRU and minLSTM read no previous output)."""
    return type(cell).step is GatedCell.step


def noisy_step(cell, xz_t: Tensor, state, recurrent: Tensor | None, keep_t: Tensor | None):
    """``cell.step`` with recurrent dropout's mask ``recurrent`` (B, H) and zoneout's mask of this step
    ``keep_t`` (B, H) bool: the specification the kernels are held to."""
    if recurrent is None:
        h, new = cell.step(xz_t, state)
    else:
        hz = cell.project_hidden(state.h * recurrent)
        h, new = cell.combine(cell.split(xz_t), cell.split(hz), state)
    if keep_t is not None:
        new = type(state)(*(torch.where(keep_t, old, n) for n, old in zip(new, state)))
        h = torch.where(keep_t, state.h, h)
    return h, new
