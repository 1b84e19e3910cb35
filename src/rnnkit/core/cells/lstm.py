"""LSTM cell with a forget gate (Hochreiter & Schmidhuber 1997; Gers, Schmidhuber & Cummins 2000).

Gate order in the stacked weights is torch.nn.LSTM's, ``i, f, g, o``::

    i = sigmoid(x W_ii + b_ii + h W_hi + b_hi)      input gate
    f = sigmoid(x W_if + b_if + h W_hf + b_hf)      forget gate
    g = tanh   (x W_ig + b_ig + h W_hg + b_hg)      candidate
    o = sigmoid(x W_io + b_io + h W_ho + b_ho)      output gate
    c' = f * c + i * g
    h' = o * tanh(c')

State: ``LSTMState(h, c)``, each (B, H). Called as torch.nn.LSTMCell is,
``h, c = cell(x, (h, c))`` (``cell.advance(x, state)`` gives rnnkit's ``(h, state)``).

With a projection (torch.nn.LSTM's ``proj_size`` P, Sak et al. 2014) the output is projected,
``h' = (o * tanh(c')) W_hr^T`` (B, P), and it is ``h'`` that the gates read at the next step:
``ProjectedLSTMCell``, whose state is ``LSTMState(h (B, P), c (B, H))``.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor, nn

from rnnkit.core.gates import GatedCell, gate


class LSTMState(NamedTuple):
    """Output ``h`` and memory cell ``c`` of an LSTM, each (B, H)."""

    h: Tensor
    c: Tensor


class LSTMCell(GatedCell):
    """One LSTM step; weights interchangeable with ``torch.nn.LSTMCell``."""

    gate_names = ("i", "f", "g", "o")
    State = LSTMState

    def __init__(self, input_size: int, hidden_size: int, bias: bool = True, device=None, dtype=None):
        super().__init__(input_size, hidden_size, bias, device, dtype)

    def forward(self, input: Tensor, hx: tuple[Tensor, Tensor] | None = None) -> LSTMState:  # type: ignore[override]  # torch.nn.LSTMCell's call, not GatedCell.forward's (h, state)
        """torch.nn.LSTMCell's call: ``input`` (B, I) or (I,) -> ``(h, c)``, each (B, H) or (H,)."""
        return self._torch_call(input, hx, nn.LSTMCell.forward)

    def combine(self, x, h, state: LSTMState) -> tuple[Tensor, LSTMState]:
        i = gate(torch.sigmoid, x.i, h.i)
        f = gate(torch.sigmoid, x.f, h.f)
        g = gate(torch.tanh, x.g, h.g)
        o = gate(torch.sigmoid, x.o, h.o)
        c = f * state.c + i * g
        h_new = o * torch.tanh(c)
        return h_new, LSTMState(h_new, c)


class ProjectedLSTMCell(LSTMCell):
    """An LSTM step whose output is projected by ``weight_hr`` (P, H): torch.nn.LSTM's ``proj_size``.
    Layers build it over their own weights; its state is ``LSTMState(h (B, P), c (B, H))``."""

    weight_hr: Tensor  # (P, H), set by the layer that builds the cell

    def combine(self, x, h, state: LSTMState) -> tuple[Tensor, LSTMState]:
        _, (h_full, c) = super().combine(x, h, state)
        h_new = torch.nn.functional.linear(h_full, self.weight_hr)  # (B, P)
        return h_new, LSTMState(h_new, c)
