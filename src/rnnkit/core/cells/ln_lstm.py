"""Layer-normalised LSTM (Ba, Kiros & Hinton 2016, "Layer Normalization", section 3.1 and eq. 20-22).

The variant of the paper and of haste's ``LayerNormLSTM``: the input and the recurrent projections
normalised separately over all four gates (``LayerNormGatedCell``), and the cell state normalised
on its way to the output only; the carried ``c`` is not normalised. Gate order is
torch.nn.LSTM's, ``i, f, g, o``::

    z  = LN(x W_ih^T; gamma_ih, b_ih) + LN(h W_hh^T; gamma_hh, b_hh)      (B, 4H)
    i, f, o = sigmoid(z_i), sigmoid(z_f), sigmoid(z_o);   g = tanh(z_g)
    c' = f * c + i * g
    h' = o * tanh(LN(c'; gamma_c, beta_c))

Other variants exist, not offered: torch's benchmark LSTM (``benchmarks/fastrnns/custom_lstms.py``)
carries the normalised state ``c' = LN(f c + i g)`` and has no biases besides the normalisations';
TensorFlow Addons' ``LayerNormLSTMCell`` normalises each gate on its own (over H, not 4H).

Parameters: ``weight_ih`` (4H, I), ``weight_hh`` (4H, H), ``bias_ih``/``bias_hh`` (4H,), the gains
``gamma_ih``/``gamma_hh`` (4H,), and ``gamma_c``/``beta_c`` (H,). State: ``LSTMState(h, c)``.

>>> import torch
>>> from rnnkit.core.cells import LayerNormLSTMCell
>>> from rnnkit.core.layers import Recurrent
>>> layer = Recurrent(LayerNormLSTMCell, input_size=4, hidden_size=8, num_layers=2, batch_first=True)
>>> out, (h, c) = layer(torch.randn(2, 5, 4), lengths=[5, 3])
>>> tuple(out.shape), tuple(c.shape)
((2, 5, 8), (2, 2, 8))
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from rnnkit.core.cells.layernorm import LayerNormGatedCell
from rnnkit.core.cells.lstm import LSTMState


class LayerNormLSTMCell(LayerNormGatedCell):
    """One layer-normalised LSTM step (the module docstring's equations)."""

    gate_names = ("i", "f", "g", "o")
    State = LSTMState

    def __init__(self, input_size: int, hidden_size: int, bias: bool = True, *, device=None, dtype=None):
        super().__init__(input_size, hidden_size, bias, device=device, dtype=dtype)
        self.gamma_c = nn.Parameter(torch.ones(hidden_size, device=device, dtype=dtype))
        self.beta_c = nn.Parameter(torch.zeros(hidden_size, device=device, dtype=dtype))

    def combine(self, x, h, state: LSTMState) -> tuple[Tensor, LSTMState]:
        i = torch.sigmoid(x.i + h.i)
        f = torch.sigmoid(x.f + h.f)
        g = torch.tanh(x.g + h.g)
        o = torch.sigmoid(x.o + h.o)
        c = f * state.c + i * g
        h_new = o * torch.tanh(F.layer_norm(c, self.gamma_c.shape, self.gamma_c, self.beta_c, 1e-5))  # layernorm.EPS
        return h_new, LSTMState(h_new, c)
