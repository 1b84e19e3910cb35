"""Run one cell over time: the reference loop that is the specification of every fast route.

``scan_reference(cell, xz, state, mask)`` takes the input projection of all steps at once
(``xz = cell.project_input(x)``, (B, T, G*H), one matmul) and steps the cell with autograd. With
a ``mask`` (B, T) a sequence's state stops changing after its last valid step and its outputs
there are zero, which gives packed-sequence semantics without packing. Zoneout and recurrent dropout, where
``rnnkit.Regularised`` makes them current, enter each step (``kernels/state_noise.py``).

Every other route of the routing table (core/routing.py) computes this function faster; the tests
hold each of them to it, running the reference through ``routing.force("reference")``.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from rnnkit.core.gates import GatedCell
from rnnkit.core.kernels.state_noise import noise_for, noisy_step


def scan_reference(cell: GatedCell, xz: Tensor, state: NamedTuple, mask: Tensor | None) -> tuple[Tensor, NamedTuple]:
    """Step ``cell`` over ``xz`` (B, T, G*H) from ``state``; returns outputs (B, T, H) and the final state."""
    outputs = []
    steps = xz.unbind(1)  # unbind, not xz[:, t]: indexing would allocate a full gradient per step
    valid = mask.unbind(1) if mask is not None else [None] * len(steps)
    noise = noise_for(cell)  # zoneout and recurrent dropout, where rnnkit.Regularised applies them
    for t, (xz_t, m) in enumerate(zip(steps, valid)):
        h, new_state = cell.step(xz_t, state) if noise is None else noisy_step(cell, xz_t, state, noise, t)
        if m is not None:
            m = m[:, None]
            new_state = state._make(torch.where(m, new, old) for new, old in zip(new_state, state))
            h = h * m
        state = new_state
        outputs.append(h)
    return torch.stack(outputs, dim=1), state
