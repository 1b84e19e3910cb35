"""minGRU (Feng et al. 2024, "Were RNNs All We Needed?"), in the paper's log-space form.

A GRU whose gates see the input only, so it trains as a parallel scan over time. Gate order in
``weight_ih`` is ``z, h``::

    z  = sigmoid(x W_z + b_z)            update gate
    h~ = g(x W_h + b_h)                  candidate, g(v) = v + 1/2 (v >= 0), sigmoid(v) (v < 0)
    h' = (1 - z) * h + z * h~

``g`` keeps the candidate positive, so the scan can run in log space (the paper's appendix;
``rnnkit.core.parallel_scan``): ``log(1 - z) = -softplus(k)``, ``log z = -softplus(-k)``; this is a
``ParallelScanCell`` with ``k = x W_z + b_z`` and ``v = x W_h + b_h``. The paper's plain listings use
``h~ = x W_h + b_h`` without ``g``, its log-space form uses ``g``; this cell uses ``g`` everywhere
(step, scan, every route), so stepping and scanning compute the same function.

State: ``HiddenState(h)``, (B, H). No recurrent weights (``weight_ih`` (2H, I), ``bias_ih`` (2H,)).

>>> import torch
>>> from rnnkit.core.cells import MinGRUCell
>>> from rnnkit.core.layers import Recurrent
>>> layer = Recurrent(MinGRUCell, input_size=4, hidden_size=8, batch_first=True)
>>> out, h = layer(torch.randn(2, 5, 4), lengths=[5, 3])
>>> tuple(out.shape), tuple(h.shape)
((2, 5, 8), (1, 2, 8))
"""

from __future__ import annotations

from torch import Tensor

from rnnkit.core.cells.scan_cell import ParallelScanCell


class MinGRUCell(ParallelScanCell):
    """One minGRU step: ``h' = (1 - z) h + z g(x W_h + b_h)`` with ``z = sigmoid(x W_z + b_z)``."""

    gate_names = ("z", "h")

    def mix_inputs(self, x) -> tuple[Tensor, Tensor]:
        return x.z, x.h
