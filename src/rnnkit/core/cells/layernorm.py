"""Layer normalisation of a gated cell's summed inputs (Ba, Kiros & Hinton 2016, "Layer Normalization").

Ba et al. normalise the input projection and the recurrent projection of a recurrent cell
separately, each over all its gates at once (the G*H summed inputs of one step), with a learned
gain, and add the bias after the normalisation (a bias inside it would be normalised away)::

    LN(v; gamma, beta) = gamma * (v - mean(v)) / sqrt(var(v) + eps) + beta      over the last dim
    z = LN(x W_ih^T; gamma_ih, b_ih) + LN(h W_hh^T; gamma_hh, b_hh)            (B, G*H)

``b_ih`` and ``b_hh`` are :class:`GatedCell`'s biases, here the normalisations' ``beta``; the gains
start at 1. :class:`LayerNormGatedCell` is this projection step, shared by ``LayerNormLSTMCell``
(core/cells/ln_lstm.py) and ``LayerNormGRUCell`` (core/cells/ln_gru.py); a subclass writes
``combine`` as for any gated cell.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from rnnkit.core.gates import GatedCell

# torch.nn.LayerNorm's epsilon, written as the literal 1e-5 at each use: torch.compile(dynamic=True) makes a
# float read from a name a symbolic input, which the body of a traced loop (core/traced_scan.py) cannot take
EPS = 1e-5


class LayerNormGatedCell(GatedCell):
    """A gated cell whose input and recurrent projections are each layer-normalised (the module docstring).

    Parameters beyond :class:`GatedCell`'s: ``gamma_ih`` and ``gamma_hh`` (G*H,), the gains."""

    def __init__(self, input_size: int, hidden_size: int, bias: bool = True, *, device=None, dtype=None):
        super().__init__(input_size, hidden_size, bias, device=device, dtype=dtype)
        rows = self.num_gates * hidden_size
        self.gamma_ih = nn.Parameter(torch.ones(rows, device=device, dtype=dtype))
        self.gamma_hh = nn.Parameter(torch.ones(rows, device=device, dtype=dtype))

    def reset_parameters(self) -> None:
        """Weights and biases as torch.nn's (uniform in +-1/sqrt(H)), gains 1, normalisation biases 0."""
        bound = 1.0 / self.hidden_size**0.5
        for name, p in self.named_parameters():
            if name.startswith("gamma"):
                nn.init.ones_(p)
            elif name.startswith("beta"):
                nn.init.zeros_(p)
            else:
                nn.init.uniform_(p, -bound, bound)

    def project_input(self, x: Tensor) -> Tensor:
        """``LN(x W_ih^T; gamma_ih, b_ih)``: (..., I) -> (..., G*H), all steps at once."""
        return F.layer_norm(F.linear(x, self.weight_ih), self.gamma_ih.shape, self.gamma_ih, self.bias_ih, 1e-5)

    def project_hidden(self, h: Tensor) -> Tensor:
        """``LN(h W_hh^T; gamma_hh, b_hh)``: (B, H) -> (B, G*H)."""
        return F.layer_norm(F.linear(h, self.weight_hh), self.gamma_hh.shape, self.gamma_hh, self.bias_hh, 1e-5)
