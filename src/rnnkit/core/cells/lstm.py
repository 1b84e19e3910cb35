"""LSTM cell with a forget gate (Hochreiter & Schmidhuber 1997; Gers, Schmidhuber & Cummins 2000).

Gate order in the stacked weights is torch.nn.LSTM's, ``i, f, g, o``::

    i = sigmoid(x W_ii + b_ii + h W_hi + b_hi)      input gate
    f = sigmoid(x W_if + b_if + h W_hf + b_hf)      forget gate
    g = tanh   (x W_ig + b_ig + h W_hg + b_hg)      candidate
    o = sigmoid(x W_io + b_io + h W_ho + b_ho)      output gate
    c' = f * c + i * g
    h' = o * tanh(c')

State: ``LSTMState(h, c)``, each (B, H).
"""
from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from rnnkit.core.gates import GatedCell, gate


class LSTMState(NamedTuple):
    """Output ``h`` and memory cell ``c`` of an LSTM, each (B, H)."""

    h: Tensor
    c: Tensor


class LSTMCell(GatedCell):
    """One LSTM step; weights interchangeable with ``torch.nn.LSTMCell``."""

    gate_names = ("i", "f", "g", "o")
    State = LSTMState

    def combine(self, x, h, state: LSTMState) -> tuple[Tensor, LSTMState]:
        i = gate(torch.sigmoid, x.i, h.i)
        f = gate(torch.sigmoid, x.f, h.f)
        g = gate(torch.tanh, x.g, h.g)
        o = gate(torch.sigmoid, x.o, h.o)
        c = f * state.c + i * g
        h_new = o * torch.tanh(c)
        return h_new, LSTMState(h_new, c)
