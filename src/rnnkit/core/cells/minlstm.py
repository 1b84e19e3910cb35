"""minLSTM (Feng et al. 2024, "Were RNNs All We Needed?"), in the paper's log-space form.

An LSTM reduced to gates that see the input only, with the forget and input gates normalised to
sum to one (the paper's time-independent scale) and no output gate: the state is the output.
Gate order in ``weight_ih`` is ``f, i, h``::

    f  = sigmoid(x W_f + b_f)            forget gate
    i  = sigmoid(x W_i + b_i)            input gate
    h~ = g(x W_h + b_h)                  candidate, g(v) = v + 1/2 (v >= 0), sigmoid(v) (v < 0)
    f' = f / (f + i),   i' = i / (f + i)
    h' = f' * h + i' * h~

With ``d = softplus(-k_f) - softplus(-k_i) = log(i / f)`` (``k_f = x W_f + b_f``), ``i' = sigmoid(d)``
and ``f' = 1 - i'``: a ``ParallelScanCell`` with ``k = d``, ``v = x W_h + b_h``. In log space
(``rnnkit.core.parallel_scan``), ``log f' = -softplus(d)`` and ``log i' = -softplus(-d)``. As for
minGRU, ``g`` (from the paper's log-space form) is used everywhere, so stepping and scanning
compute the same function.

State: ``HiddenState(h)``, (B, H). No recurrent weights (``weight_ih`` (3H, I), ``bias_ih`` (3H,)).

>>> import torch
>>> from rnnkit.core.cells import MinLSTMCell
>>> from rnnkit.core.layers import Recurrent
>>> layer = Recurrent(MinLSTMCell, input_size=4, hidden_size=8, bidirectional=True, batch_first=True)
>>> out, h = layer(torch.randn(2, 5, 4))
>>> tuple(out.shape), tuple(h.shape)
((2, 5, 16), (2, 2, 8))
"""

from __future__ import annotations

from torch import Tensor
from torch.nn import functional as F

from rnnkit.core.cells.scan_cell import ParallelScanCell


class MinLSTMCell(ParallelScanCell):
    """One minLSTM step: ``h' = f' h + i' g(x W_h + b_h)`` with ``f' + i' = 1`` (see the module docstring)."""

    gate_names = ("f", "i", "h")

    def mix_inputs(self, x) -> tuple[Tensor, Tensor]:
        return F.softplus(-x.f) - F.softplus(-x.i), x.h  # i' = i / (f + i) = sigmoid(log(i / f))
