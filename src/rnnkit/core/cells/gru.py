"""GRU cell (Cho et al. 2014) in torch.nn.GRU's convention.

Gate order in the stacked weights is torch.nn.GRU's, ``r, z, n``. As in torch (and cuDNN),
the reset gate multiplies the recurrent part *after* its affine map::

    r = sigmoid(x W_ir + b_ir + h W_hr + b_hr)          reset gate
    z = sigmoid(x W_iz + b_iz + h W_hz + b_hz)          update gate
    n = tanh   (x W_in + b_in + r * (h W_hn + b_hn))    candidate
    h' = (1 - z) * n + z * h

State: ``HiddenState(h)``, (B, H). Called as torch.nn.GRUCell is, ``h = cell(x, h)``
(``cell.advance(x, state)`` gives rnnkit's ``(h, state)``).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from rnnkit.core.gates import GatedCell, HiddenState, gate


class GRUCell(GatedCell):
    """One GRU step; weights interchangeable with ``torch.nn.GRUCell``."""

    gate_names = ("r", "z", "n")

    def __init__(self, input_size: int, hidden_size: int, bias: bool = True, device=None, dtype=None):
        super().__init__(input_size, hidden_size, bias, device, dtype)

    def forward(self, input: Tensor, hx: Tensor | None = None) -> Tensor:  # type: ignore[override]  # torch.nn.GRUCell's call, not GatedCell.forward's (h, state)
        """torch.nn.GRUCell's call: ``input`` (B, I) or (I,) -> ``h`` (B, H) or (H,)."""
        return self._torch_call(input, hx, nn.GRUCell.forward)

    def combine(self, x, h, state: HiddenState) -> tuple[Tensor, HiddenState]:
        r = gate(torch.sigmoid, x.r, h.r)
        z = gate(torch.sigmoid, x.z, h.z)
        n = torch.tanh(x.n + r * h.n)
        h_new = (1 - z) * n + z * state.h
        return h_new, HiddenState(h_new)
