"""Layer-normalised GRU: Ba, Kiros & Hinton's (2016, "Layer Normalization") normalisation of the
summed inputs applied to torch.nn.GRU's cell.

The input and the recurrent projections are normalised separately over all three gates
(``LayerNormGatedCell``); as in torch's GRU the reset gate multiplies the recurrent part of the
candidate after it (here after its normalisation). Gate order ``r, z, n``::

    a = LN(x W_ih^T; gamma_ih, b_ih),   b = LN(h W_hh^T; gamma_hh, b_hh)      (B, 3H) each
    r = sigmoid(a_r + b_r),   z = sigmoid(a_z + b_z)
    n = tanh(a_n + r * b_n)
    h' = (1 - z) * n + z * h

The GRU has no separate memory cell, so nothing else is normalised (the output is the state).

Parameters: ``weight_ih`` (3H, I), ``weight_hh`` (3H, H), ``bias_ih``/``bias_hh`` (3H,), the gains
``gamma_ih``/``gamma_hh`` (3H,). State: ``HiddenState(h)``, (B, H).

>>> import torch
>>> from rnnkit.core.cells import LayerNormGRUCell
>>> cell = LayerNormGRUCell(input_size=4, hidden_size=8)
>>> h, state = cell(torch.randn(2, 4))
>>> tuple(h.shape)
(2, 8)
"""

from __future__ import annotations

import torch
from torch import Tensor

from rnnkit.core.cells.layernorm import LayerNormGatedCell
from rnnkit.core.gates import HiddenState


class LayerNormGRUCell(LayerNormGatedCell):
    """One layer-normalised GRU step (the module docstring's equations)."""

    gate_names = ("r", "z", "n")

    def combine(self, x, h, state: HiddenState) -> tuple[Tensor, HiddenState]:
        r = torch.sigmoid(x.r + h.r)
        z = torch.sigmoid(x.z + h.z)
        n = torch.tanh(x.n + r * h.n)
        h_new = (1 - z) * n + z * state.h
        return h_new, HiddenState(h_new)
