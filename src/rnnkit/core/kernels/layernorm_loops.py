"""The layer-normalised LSTM and GRU over time in C++ (core/layernorm.cpp), backward by hand.

``scan_layernorm(cell, x, state, mask)`` runs one (layer, direction) of a ``LayerNormLSTMCell`` or
``LayerNormGRUCell``: the normalised input projection of every step at once with torch ops,
``LN(x W_ih^T; gamma_ih, b_ih)`` (autograd takes its gradients), then one autograd Function whose
forward and backward are each one C++ loop over time. The loop normalises the recurrent
projection (and the LSTM's cell state) at every step and, backward, returns the gradients of
``W_hh``, the gains and the normalisation biases besides those of the projection and the state,
which the built-in cells' kernels (``base.Kernel``) have no place for.

A backward that must itself be differentiable (``create_graph=True``) or that runs under vmap is
computed by autograd through the cells' step written in torch ops (``_backward_by_autograd``), as
``dispatch.FusedScan`` does: the same gradients, with a graph.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor
from torch.nn import functional as F

from rnnkit.core import native
from rnnkit.core.cells.layernorm import EPS
from rnnkit.core.cells.ln_gru import LayerNormGRUCell
from rnnkit.core.cells.ln_lstm import LayerNormLSTMCell
from rnnkit.core.kernels.base import batch_major_states, grad_in, grad_rows, grads_through, states_rows, transformed

LAYERNORM_CELLS = (LayerNormLSTMCell, LayerNormGRUCell)  # exactly these classes (a subclass may change the math)


class _LayerNormScan(torch.autograd.Function):
    """The loop over time of a layer-normalised cell, ``xz`` (B, T, G*H) the normalised input
    projection; returns the outputs (B, T, H) and the final state's parts."""

    @staticmethod
    def forward(ctx, lstm: bool, mask, xz, w_hh, gamma_hh, beta_hh, gamma_c, beta_c, *state):
        saved = _forward(lstm, mask, xz, w_hh, gamma_hh, beta_hh, gamma_c, beta_c, state, training=True)
        out, final, buffers = saved
        ctx.lstm, ctx.mask, ctx.buffers = lstm, mask, buffers
        ctx.save_for_backward(xz, w_hh, gamma_hh, beta_hh, gamma_c, beta_c, *state)
        ctx.set_materialize_grads(False)
        return (out, *(s.clone() for s in final))

    @staticmethod
    def backward(ctx, grad_out, *grad_state):
        xz, w_hh, gamma_hh, beta_hh, gamma_c, beta_c, *state = ctx.saved_tensors
        inputs = (xz, w_hh, gamma_hh, beta_hh, gamma_c, beta_c, *state)
        if torch.is_grad_enabled() or transformed(grad_out, *grad_state):
            grads = _backward_by_autograd(ctx, inputs, grad_out, grad_state)
        else:
            grads = _backward(ctx, w_hh, gamma_hh, beta_hh, gamma_c, beta_c, grad_out, grad_state)
        return (None, None, *(g if needed else None for g, needed in zip(grads, ctx.needs_input_grad[2:])))


def _forward(lstm, mask, xz, w_hh, gamma_hh, beta_hh, gamma_c, beta_c, state, training):
    ops = native.ops()
    B, T, _ = xz.shape
    H = w_hh.shape[1]
    hs = states_rows(state[0], T, training)
    out = native.buffer((B, T, H), xz)
    keep = (native.buffer(xz.shape, xz), native.buffer(xz.shape, xz), xz.new_empty(B, T, 2)) if training else None
    gates, hhat, rstd = keep if keep is not None else (None, None, None)
    if lstm:
        cs = states_rows(state[1], T, training)
        chat = native.buffer((B, T, H), xz) if training else None
        ops.ln_lstm_forward(
            xz, w_hh, gamma_hh, beta_hh, gamma_c, beta_c, hs, cs, out, gates, hhat, rstd, chat, mask, EPS
        )
        last = T % hs.shape[0]
        return out, (hs[last], cs[last]), (gates, hhat, rstd, chat, hs, cs)
    ops.ln_gru_forward(xz, w_hh, gamma_hh, beta_hh, hs, out, gates, hhat, rstd, mask, EPS)
    return out, (hs[T % hs.shape[0]],), (gates, hhat, rstd, hs)


def _backward(ctx, w_hh, gamma_hh, beta_hh, gamma_c, beta_c, grad_out, grad_state):
    ops = native.ops()
    w = w_hh.contiguous()
    gout = grad_rows(grad_out)
    if ctx.lstm:
        gates, hhat, rstd, chat, hs, cs = ctx.buffers
        H = cs.shape[2]
        dh, dc = grad_in(grad_state[0], hs[0]), grad_in(grad_state[1], cs[0])
        dxz, dhz = native.buffer(gates.shape, gates), native.buffer(gates.shape, gates)
        dparams = gates.new_empty(gates.shape[0], 10 * H)
        ops.ln_lstm_backward(
            gates, hhat, rstd, chat, cs, gout, w, gamma_hh, gamma_c, beta_c, dh, dc, dxz, dhz, dparams, ctx.mask
        )
        dg_hh, db_hh, dg_c, db_c = dparams.sum(0).split([4 * H, 4 * H, H, H])
        dstate: tuple = (dh, dc)
    else:
        gates, hhat, rstd, hs = ctx.buffers
        H = hs.shape[2]
        dh = grad_in(grad_state[0], hs[0])
        dxz, dhz = native.buffer(gates.shape, gates), native.buffer(gates.shape, gates)
        dparams = gates.new_empty(gates.shape[0], 6 * H)
        ops.ln_gru_backward(gates, hhat, rstd, hs, gout, w, gamma_hh, beta_hh, dh, dxz, dhz, dparams, ctx.mask)
        dg_hh, db_hh = dparams.sum(0).split([3 * H, 3 * H])
        dg_c = db_c = None
        dstate = (dh,)
    dw = dhz.view(-1, dhz.shape[-1]).t().mm(batch_major_states(hs)) if ctx.needs_input_grad[3] else None
    return (dxz, dw, dg_hh, db_hh if beta_hh is not None else None, dg_c, db_c if beta_c is not None else None, *dstate)


def _step(lstm, xz_t, state, w_hh, gamma_hh, beta_hh, gamma_c, beta_c):
    """One step of the cell in torch ops (the cells' equations, on the Function's inputs)."""
    hb = F.layer_norm(F.linear(state[0], w_hh), gamma_hh.shape, gamma_hh, beta_hh, EPS)
    if lstm:
        i, f, g, o = (xz_t + hb).chunk(4, dim=-1)
        c = torch.sigmoid(f) * state[1] + torch.sigmoid(i) * torch.tanh(g)
        h = torch.sigmoid(o) * torch.tanh(F.layer_norm(c, gamma_c.shape, gamma_c, beta_c, EPS))
        return h, (h, c)
    a_r, a_z, a_n = xz_t.chunk(3, dim=-1)
    b_r, b_z, b_n = hb.chunk(3, dim=-1)
    r, z = torch.sigmoid(a_r + b_r), torch.sigmoid(a_z + b_z)
    n = torch.tanh(a_n + r * b_n)
    h = n + z * (state[0] - n)
    return h, (h,)


def _backward_by_autograd(ctx, inputs, grad_out, grad_state):
    """The gradients of the Function's inputs by autograd through ``_step``, with a graph when grad
    mode is on (a differentiable backward) and batchable by vmap."""
    xz, w_hh, gamma_hh, beta_hh, gamma_c, beta_c, *state = inputs
    mask = ctx.mask
    with torch.enable_grad():
        s = tuple(state)
        outs = []
        valid = mask.unbind(1) if mask is not None else [None] * xz.shape[1]
        for xz_t, m in zip(xz.unbind(1), valid):
            h, new = _step(ctx.lstm, xz_t, s, w_hh, gamma_hh, beta_hh, gamma_c, beta_c)
            if m is not None:
                m = m[:, None]
                new = tuple(torch.where(m, a, b) for a, b in zip(new, s))
                h = h * m
            s = new
            outs.append(h)
        results = [torch.stack(outs, dim=1), *s]
    return grads_through(results, (grad_out, *grad_state), inputs, ctx.needs_input_grad[2:])


def scan_layernorm(cell, x: Tensor, state: NamedTuple, mask: Tensor | None):
    """One (layer, direction) of a layer-normalised cell over (B, T, I) ``x``: the outputs (B, T, H)
    and the final state. Where the C++ loops run (the routing table checks). Under autocast the
    projection may come back in half precision: the loop runs in the weights' dtype."""
    lstm = isinstance(cell, LayerNormLSTMCell)
    p = cell._parameters
    w_hh = p["weight_hh"]
    dtype = w_hh.dtype
    xz = cell.project_input(x).to(dtype).contiguous()  # (B, T, G*H)
    mask = mask.contiguous() if mask is not None else None
    weights = (w_hh, p["gamma_hh"], p["bias_hh"], p["gamma_c"] if lstm else None, p["beta_c"] if lstm else None)
    parts = tuple(s.to(dtype).contiguous() for s in state)
    tensors = (xz, *weights, *parts)
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors):
        out, *final = _LayerNormScan.apply(lstm, mask, xz, *weights, *parts)
        return out, cell.State(*final)
    with torch.no_grad():
        out, final, _ = _forward(lstm, mask, xz, *weights, parts, training=False)
    return out, cell.State(*(s.clone() for s in final))
