"""Cells written the way a user writes them (only ``combine``), shared by the tests."""
from __future__ import annotations

import torch

from rnnkit.bench.run import UserLSTMCell  # the benchmark's LSTM written from gates

__all__ = ["MGUCell", "UserLSTMCell"]
from rnnkit.core.gates import GatedCell, HiddenState, gate


class MGUCell(GatedCell):
    """Minimal gated unit (Zhou et al. 2016): two gates, one state."""

    gate_names = ("f", "n")

    def combine(self, x, h, state):
        f = gate(torch.sigmoid, x.f, h.f)
        n = torch.tanh(x.n + f * h.n)
        h_new = (1 - f) * state.h + f * n
        return h_new, HiddenState(h_new)
