"""Cells written the way a user writes them (only ``combine``), shared by the tests."""

from __future__ import annotations

import torch

from rnnkit.bench.run import UserLSTMCell  # the benchmark's LSTM written from gates
from rnnkit.core.gates import GatedCell, HiddenState, gate

__all__ = ["MGUCell", "UserGRUCell", "UserLSTMCell"]


class MGUCell(GatedCell):
    """Minimal gated unit (Zhou et al. 2016): two gates, one state."""

    gate_names = ("f", "n")

    def combine(self, x, h, state):
        f = gate(torch.sigmoid, x.f, h.f)
        n = torch.tanh(x.n + f * h.n)
        h_new = (1 - f) * state.h + f * n
        return h_new, HiddenState(h_new)


class UserGRUCell(GatedCell):
    """torch's GRU written from its three gates: the candidate sees ``h W_hn + b_hn`` apart, so its
    projections are not folded; three gates, so its weights are packed for them (``program_gates``)."""

    gate_names = ("r", "z", "n")

    def combine(self, x, h, state):
        r = torch.sigmoid(x.r + h.r)
        z = torch.sigmoid(x.z + h.z)
        n = torch.tanh(x.n + r * h.n)
        h_new = (1 - z) * n + z * state.h
        return h_new, HiddenState(h_new)
