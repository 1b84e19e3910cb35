"""Run one cell over time: the reference loop that is the specification of every fast path.

``scan(cell, xz, state, mask)`` takes the input projection of all steps at once
(``xz = cell.project_input(x)``, (B, T, G*H), one matmul) and steps the cell. With a
``mask`` (B, T) a sequence's state stops changing after its last valid step and its
outputs there are zero, which gives packed-sequence semantics without packing.

``scan`` is what layers call: the fused kernels of ``rnnkit.core.fused`` (hand-written backward
through time, batched weight gradients) for every cell that only defines ``combine``, and
``scan_reference`` for anything else. ``FUSED = False`` routes everything through the reference,
which the tests and the benchmark use to compare the two.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from rnnkit.core.fused import fused_scan
from rnnkit.core.gates import GatedCell


def scan_reference(cell: GatedCell, xz: Tensor, state: NamedTuple, mask: Tensor | None) -> tuple[Tensor, NamedTuple]:
    """Step ``cell`` over ``xz`` (B, T, G*H) from ``state``; returns outputs (B, T, H) and the final state."""
    outputs = []
    steps = xz.unbind(1)  # unbind, not xz[:, t]: indexing would allocate a full gradient per step
    valid = mask.unbind(1) if mask is not None else [None] * len(steps)
    for xz_t, m in zip(steps, valid):
        h, new_state = cell.step(xz_t, state)
        if m is not None:
            m = m[:, None]
            new_state = type(state)(*(torch.where(m, new, old) for new, old in zip(new_state, state)))
            h = h * m
        state = new_state
        outputs.append(h)
    return torch.stack(outputs, dim=1), state


FUSED = True  # False: every layer runs scan_reference (a switch for tests and benchmarks)


def scan(cell: GatedCell, xz: Tensor, state: NamedTuple, mask: Tensor | None) -> tuple[Tensor, NamedTuple]:
    """``scan_reference``'s function, through a fused kernel whenever the cell has one."""
    if FUSED:
        result = fused_scan(cell, xz, state, mask)
        if result is not None:
            return result
    return scan_reference(cell, xz, state, mask)
