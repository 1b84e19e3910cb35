"""sLSTM: the scalar LSTM of xLSTM (Beck et al. 2024, "xLSTM: Extended Long Short-Term Memory", section 2.2).

Exponential input gating, a normaliser state ``n`` that the cell state is divided by, a stabiliser
state ``m`` that keeps the exponentials finite, and several heads: the recurrent weights are
block-diagonal, each head's units reading only the previous output of its own head. Gate order
is xLSTM's, ``i, f, z, o``; the forget gate is the sigmoid one (xLSTM's default), so
``log f = logsigmoid(f~)``::

    a   = x W_ih^T + b_ih + R h + b_hh        (B, 4H): i~, f~, z~, o~; R block-diagonal over heads
    m'  = max(i~, logsigmoid(f~) + m)         (m' = i~ where n = 0: a fresh state)
    i   = exp(i~ - m'),   f = exp(logsigmoid(f~) + m - m')
    c'  = f * c + i * tanh(z~)
    n'  = f * n + i
    h'  = sigmoid(o~) * c' / n'

Without the stabiliser (``i = exp(i~)``, ``f = sigmoid(f~)``) ``c'`` and ``n'`` are the paper's
equations (8-13); ``m`` rescales both by the same ``exp(-m')``, so ``h'`` is the same function,
computed without overflow. The reference implementation (NX-AI's ``xlstm``, ``vanilla/slstm.py``)
takes ``m' = i~`` when the whole batch's ``n`` is zero; here that choice is per unit (where
``n = 0``), the same at a zero initial state and afterwards (``n > 0`` from the first step on).

Weights: ``weight_ih`` (4H, I) and the biases (4H,) as every cell's; ``weight_hh`` (4H, H/heads)
holds the diagonal blocks only: row ``g*H + j`` is gate g's unit j, its columns the units of j's
head, ``R_g[j, head(j)*D + k] = weight_hh[g*H + j, k]`` with D = H / heads. State:
``SLSTMState(h, c, n, m)``, each (B, H); zeros to start.

>>> import torch
>>> from rnnkit.core.cells import SLSTMCell
>>> from rnnkit.core.layers import Recurrent
>>> layer = Recurrent(SLSTMCell, input_size=4, hidden_size=8, num_heads=2, batch_first=True)
>>> out, (h, c, n, m) = layer(torch.randn(2, 5, 4), lengths=[5, 3])
>>> tuple(out.shape), tuple(n.shape)
((2, 5, 8), (1, 2, 8))
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor
from torch.nn import functional as F

from rnnkit.core.gates import GatedCell


class SLSTMState(NamedTuple):
    """Output ``h``, cell ``c``, normaliser ``n`` and stabiliser ``m`` of an sLSTM, each (B, H)."""

    h: Tensor
    c: Tensor
    n: Tensor
    m: Tensor


def default_heads(hidden_size: int) -> int:
    """xLSTM's 4 heads where they divide ``hidden_size``, else 2 or 1."""
    return math.gcd(hidden_size, 4)


def block_product(h: Tensor, weight_hh: Tensor, bias_hh: Tensor | None) -> Tensor:
    """``R h + b_hh`` for the block-diagonal ``R`` that ``weight_hh`` (G*H, D) holds: (B, H) -> (B, G*H)."""
    B, H = h.shape
    D = weight_hh.shape[1]
    G = weight_hh.shape[0] // H
    heads = H // D
    z = torch.einsum("bkj,gkij->bgki", h.reshape(B, heads, D), weight_hh.reshape(G, heads, D, D)).reshape(B, G * H)
    return z if bias_hh is None else z + bias_hh


def dense_recurrent(weight_hh: Tensor) -> Tensor:
    """The block-diagonal ``R`` (G*H, H) that ``weight_hh`` (G*H, D) holds, zeros off the blocks."""
    GH, D = weight_hh.shape
    H = GH // 4
    heads = H // D
    blocks = weight_hh.reshape(4, heads, D, D)
    eye = torch.eye(heads, dtype=weight_hh.dtype, device=weight_hh.device)
    return torch.einsum("gkij,kl->gkilj", blocks, eye).reshape(GH, H)


class SLSTMCell(GatedCell):
    """One sLSTM step (the module docstring's equations) with ``num_heads`` heads (default: 4 where
    they divide ``hidden_size``, else 2 or 1)."""

    gate_names = ("i", "f", "z", "o")
    State = SLSTMState

    def __init__(
        self,
        input_size: int,
        hidden_size: int,
        bias: bool = True,
        device=None,
        dtype=None,
        *,
        num_heads: int | None = None,
    ):
        heads = default_heads(hidden_size) if num_heads is None and isinstance(hidden_size, int) else num_heads
        if not isinstance(heads, int) or isinstance(heads, bool) or heads < 1:
            raise ValueError(f"num_heads must be a positive int, got {num_heads!r}")
        if isinstance(hidden_size, int) and hidden_size % heads:
            raise ValueError(f"num_heads={heads} must divide hidden_size={hidden_size}")
        self.num_heads = heads
        super().__init__(input_size, hidden_size, bias, device, dtype)
        with torch.no_grad():  # the diagonal blocks only: (4H, H / heads)
            self.weight_hh = torch.nn.Parameter(self.weight_hh[:, : hidden_size // heads].clone())

    recurrent_product = staticmethod(block_product)  # (h, weight_hh, bias_hh) -> R h + b_hh, for the kernels

    @property
    def head_size(self) -> int:
        return self.hidden_size // self.num_heads

    def project_hidden(self, h: Tensor) -> Tensor:
        """``R h + b_hh`` with ``R`` block-diagonal over the heads: (B, H) -> (B, 4H)."""
        return block_product(h, self.weight_hh, self.bias_hh)

    def combine(self, x, h, state: SLSTMState) -> tuple[Tensor, SLSTMState]:
        i_raw, f_raw = x.i + h.i, x.f + h.f
        log_f = F.logsigmoid(f_raw) + state.m
        m = torch.where(state.n == 0, i_raw, torch.maximum(i_raw, log_f))
        i = torch.exp(i_raw - m)
        f = torch.exp(log_f - m)
        c = f * state.c + i * torch.tanh(x.z + h.z)
        n = f * state.n + i
        h_new = torch.sigmoid(x.o + h.o) * c / n
        return h_new, SLSTMState(h_new, c, n, m)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, num_heads={self.num_heads}"
