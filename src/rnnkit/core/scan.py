"""Run one cell over time: the reference loop that is the specification of every fast route.

``scan_reference(cell, xz, state, mask)`` takes the input projection of all steps at once
(``xz = cell.project_input(x)``, (B, T, G*H), one matmul) and steps the cell with autograd. With
a ``mask`` (B, T) a sequence's state stops changing after its last valid step and its outputs
there are zero, which gives packed-sequence semantics without packing. Zoneout and recurrent dropout
(``rnnkit.Regularised``: ``noise``, or in an eager call the masks current for ``cell``) enter each step
(``kernels/state_noise.py``).

Every other route of the routing table (core/routing.py) computes this function faster; the tests
hold each of them to it, running the reference through ``routing.force("reference")``.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from rnnkit.core.gates import GatedCell
from rnnkit.core.kernels.state_noise import StateNoise, noise_for, noisy_step


def scan_reference(
    cell: GatedCell, xz: Tensor, state: NamedTuple, mask: Tensor | None, noise: StateNoise | None = None
) -> tuple[Tensor, NamedTuple]:
    """Step ``cell`` over ``xz`` (B, T, G*H) from ``state``; returns outputs (B, T, H) and the final state."""
    outputs = []
    steps = xz.unbind(1)  # unbind, not xz[:, t]: indexing would allocate a full gradient per step
    valid = mask.unbind(1) if mask is not None else [None] * len(steps)
    noise = noise if noise is not None else noise_for(cell)  # zoneout and recurrent dropout (rnnkit.Regularised)
    recurrent = noise.recurrent if noise is not None else None
    keep = noise.zoneout.unbind(1) if noise is not None and noise.zoneout is not None else [None] * len(steps)
    for xz_t, m, keep_t in zip(steps, valid, keep):
        h, new_state = noisy_step(cell, xz_t, state, recurrent, keep_t)  # cell.step where both are None
        if m is not None:
            m = m[:, None]
            new_state = state._make(torch.where(m, new, old) for new, old in zip(new_state, state))
            h = h * m
        state = new_state
        outputs.append(h)
    return torch.stack(outputs, dim=1), state
