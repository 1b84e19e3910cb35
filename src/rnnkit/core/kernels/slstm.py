"""The sLSTM's loop over time in C++ (native.cpp's ``slstm_forward`` and ``slstm_backward``).

The cell (core/cells/slstm.py) keeps only the diagonal blocks of its recurrent weights,
``weight_hh`` (4H, D) for heads of D units; the C++ loops multiply by them block by block where D is
a multiple of the SIMD width (each block of hidden units reads its own head's D inputs: a product
``heads`` times smaller than a dense one), else by the blocks written out as a dense matrix. The
gradient of ``weight_hh`` is the blocks' share of ``dz^T h``, one batched matmul over all steps.
"""

from __future__ import annotations

import torch
from torch import Tensor

from rnnkit.core import native
from rnnkit.core.kernels.base import (
    Kernel,
    backward_noise,
    dropped_states,
    grad_in,
    grad_rows,
    native_loop,
    noise_args,
    states_rows,
)


def block_weight_grad(dz: Tensor, h_prev: Tensor, D: int) -> Tensor:
    """``weight_hh``'s gradient (4H, D) from ``dz`` (N, 4H) and ``h_prev`` (N, H): each gate's diagonal
    blocks of ``dz^T h_prev``."""
    N, GH = dz.shape
    H = h_prev.shape[1]
    heads = H // D
    per_head = dz.reshape(N, 4, heads, D).permute(2, 1, 3, 0).reshape(heads, 4 * D, N)
    grads = torch.bmm(per_head, h_prev.reshape(N, heads, D).transpose(0, 1))  # (heads, 4D, D)
    return grads.reshape(heads, 4, D, D).transpose(0, 1).reshape(GH, D)


class CppSLSTM(Kernel):
    def forward(self, cell, xz, w_hh, b_hh, state, mask, training, noise=None):
        B, T, G4 = xz.shape
        hs, cs, ns, ms = (states_rows(s, T, training) for s in state)
        out = native.buffer((B, T, G4 // 4), xz)
        gates = native.buffer(xz.shape, xz) if training else None
        extra = noise_args(noise, hs[0])
        native_loop("slstm_forward", xz, w_hh, b_hh, hs, cs, ns, ms, out, gates, mask, noise=extra)
        last = T % hs.shape[0]
        return out, (hs[last], cs[last], ns[last], ms[last]), (gates, hs, cs, ns, ms, *backward_noise(extra))

    def backward(self, cell, saved, w_hh, mask, grad_out, grad_state, needs):
        gates, hs, cs, ns, ms, *noise = saved
        extra = noise[0] if noise else {}
        d = [grad_in(g, s[0]) for g, s in zip(grad_state, (hs, cs, ns, ms))]
        dxz = native.buffer(gates.shape, gates)
        native_loop("slstm_backward", gates, cs, ns, ms, grad_rows(grad_out), w_hh, *d, dxz, mask, noise=extra)
        flat = dxz.view(-1, dxz.shape[-1])
        h_prev = dropped_states(hs, extra.get("r")) if needs["w"] else None
        dw = block_weight_grad(flat, h_prev, w_hh.shape[1]) if h_prev is not None else None
        db = flat.sum(0) if needs["b"] else None
        return dxz, dw, db, tuple(d)
