"""The layer-normalised LSTM and GRU over time in C++ (core/layernorm.cpp), backward by hand.

``scan_layernorm(cell, x, state, mask)`` runs one (layer, direction) of a ``LayerNormLSTMCell`` or
``LayerNormGRUCell``: the input projection of every step at once, then one autograd Function whose
forward and backward are each one C++ loop over time. The GRU's projection is normalised with torch
ops, ``LN(x W_ih^T; gamma_ih, b_ih)`` (autograd takes its gradients); the LSTM's loop takes
``x W_ih^T`` as one matmul into a workspace buffer (``Projection``) and normalises it row by row
itself, its backward returning the gradients of ``gamma_ih`` and ``b_ih``: at long sequences the
normalisation's own (B, T, 4H) tensors, each fresh memory on every call, cost more than the loop's
work on them. The loop normalises the recurrent projection (and the LSTM's cell state) at every step
and, backward, returns the gradients of ``W_hh``, the gains and the normalisation biases besides
those of the projection and the state, which the built-in cells' kernels (``base.Kernel``) have no
place for.

Zoneout and recurrent dropout (``rnnkit.Regularised``, kernels/state_noise.py) run inside the same
loops (their ``*_noisy`` ops): the recurrent product reads ``h_{t-1}`` times the recurrent dropout
mask, and a unit that zoneout keeps takes its previous ``h`` (and ``c``) back after the step. The
LSTM's backward computes a kept unit's discarded new ``c_t`` again, which the normalisation of ``c_t``
read.

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
from rnnkit.core.kernels.base import (
    backward_noise,
    dropped_states,
    grad_in,
    grad_rows,
    grads_through,
    native_loop,
    noise_args,
    states_rows,
    transformed,
)
from rnnkit.core.kernels.cpp_loops import Projection
from rnnkit.core.kernels.state_noise import StateNoise, noise_for

LAYERNORM_CELLS = (LayerNormLSTMCell, LayerNormGRUCell)  # exactly these classes (a subclass may change the math)


class _LayerNormScan(torch.autograd.Function):
    """The loop over time of a layer-normalised cell: the LSTM's on ``xz`` (B, T, 4H) its input
    projection unnormalised, normalised by the loop with ``gamma_ih``, ``beta_ih``; the GRU's on
    ``xz`` (B, T, 3H) the normalised projection (``gamma_ih``, ``beta_ih`` None); ``noise`` the
    zoneout and recurrent dropout masks, or None. Returns the outputs (B, T, H) and the final state's
    parts."""

    @staticmethod
    def forward(ctx, lstm: bool, mask, noise, xz, gamma_ih, beta_ih, w_hh, gamma_hh, beta_hh, gamma_c, beta_c, *state):
        weights = (gamma_ih, beta_ih, w_hh, gamma_hh, beta_hh, gamma_c, beta_c)
        out, final, buffers = _forward(lstm, mask, noise, xz, *weights, state, training=True)
        ctx.lstm, ctx.mask, ctx.noise, ctx.buffers = lstm, mask, noise, buffers
        ctx.save_for_backward(xz, *weights, *state)
        ctx.set_materialize_grads(False)
        return (out, *(s.clone() for s in final))

    @staticmethod
    def backward(ctx, grad_out, *grad_state):
        inputs = ctx.saved_tensors
        xz, gamma_ih, beta_ih, w_hh, gamma_hh, beta_hh, gamma_c, beta_c, *state = inputs
        weights = (gamma_ih, beta_ih, w_hh, gamma_hh, beta_hh, gamma_c, beta_c)
        if torch.is_grad_enabled() or transformed(grad_out, *grad_state):
            grads = _backward_by_autograd(ctx, inputs, grad_out, grad_state)
        else:
            if ctx.buffers is None:  # a second backward through the same graph (retain_graph): the loop again
                ctx.buffers = _forward(ctx.lstm, ctx.mask, ctx.noise, xz, *weights, tuple(state), training=True)[2]
            grads = _backward(ctx, xz, *weights, grad_out, grad_state)
            if ctx.lstm:  # its backward wrote the gradients over hhat
                ctx.buffers = None
        return (None, None, None, *(g if needed else None for g, needed in zip(grads, ctx.needs_input_grad[3:])))


def _forward(lstm, mask, noise, xz, gamma_ih, beta_ih, w_hh, gamma_hh, beta_hh, gamma_c, beta_c, state, training):
    B, T, _ = xz.shape
    H = w_hh.shape[1]
    hs = states_rows(state[0], T, training)
    out = native.buffer((B, T, H), xz)
    extra = noise_args(noise, hs[0])  # r, hd, keep for the loops' *_noisy ops; empty without noise
    if lstm:
        cs = states_rows(state[1], T, training)
        hhat, stats = (native.buffer(xz.shape, xz), xz.new_empty(B, T, 5)) if training else (None, None)
        weights = (gamma_ih, beta_ih, w_hh, gamma_hh, beta_hh, gamma_c, beta_c)
        native_loop("ln_lstm_forward", xz, *weights, hs, cs, out, hhat, stats, mask, EPS, noise=extra)
        last = T % hs.shape[0]
        return out, (hs[last], cs[last]), (hhat, stats, hs, cs, *backward_noise(extra))
    kept = (native.buffer(xz.shape, xz), native.buffer(xz.shape, xz), xz.new_empty(B, T)) if training else None
    gates, hhat, rstd = kept if kept is not None else (None, None, None)
    native_loop("ln_gru_forward", xz, w_hh, gamma_hh, beta_hh, hs, out, gates, hhat, rstd, mask, EPS, noise=extra)
    return out, (hs[T % hs.shape[0]],), (gates, hhat, rstd, hs, *backward_noise(extra))


def _backward(ctx, xz, gamma_ih, beta_ih, w_hh, gamma_hh, beta_hh, gamma_c, beta_c, grad_out, grad_state):
    w = w_hh.contiguous()
    gout = grad_rows(grad_out)
    dxz = native.buffer(xz.shape, xz)
    if ctx.lstm:
        hhat, stats, hs, cs, *noise = ctx.buffers
        extra = noise[0] if noise else {}
        H = cs.shape[2]
        dh, dc = grad_in(grad_state[0], hs[0]), grad_in(grad_state[1], cs[0])
        dparams = xz.new_empty(xz.shape[0], 18 * H)
        weights = (gamma_ih, beta_ih, gamma_hh, beta_hh, gamma_c, beta_c)
        native_loop(
            "ln_lstm_backward", xz, hhat, stats, cs, gout, w, *weights, dh, dc, dxz, dparams, ctx.mask, noise=extra
        )
        dhz = hhat  # the loop wrote the gradient of h_{t-1} W_hh^T over it
        dg_hh, db_hh, dg_c, db_c, dg_ih, db_ih = dparams.sum(0).split([4 * H, 4 * H, H, H, 4 * H, 4 * H])
        dstate: tuple = (dh, dc)
    else:
        gates, hhat, rstd, hs, *noise = ctx.buffers
        extra = noise[0] if noise else {}
        H = hs.shape[2]
        dh = grad_in(grad_state[0], hs[0])
        dhz = native.buffer(gates.shape, gates)
        dparams = gates.new_empty(gates.shape[0], 6 * H)
        args = (gates, hhat, rstd, hs, gout, w, gamma_hh, beta_hh, dh, dxz, dhz, dparams, ctx.mask)
        native_loop("ln_gru_backward", *args, noise=extra)
        dg_hh, db_hh = dparams.sum(0).split([3 * H, 3 * H])
        dg_ih = db_ih = dg_c = db_c = None
        dstate = (dh,)
    # with recurrent dropout the product read h_{t-1} r: dW_hh = sum dhz^T (h_{t-1} r)
    dw = dhz.view(-1, dhz.shape[-1]).t().mm(dropped_states(hs, extra.get("r"))) if ctx.needs_input_grad[6] else None
    return (
        dxz,
        dg_ih,
        db_ih if beta_ih is not None else None,
        dw,
        dg_hh,
        db_hh if beta_hh is not None else None,
        dg_c,
        db_c if beta_c is not None else None,
        *dstate,
    )


def _step(lstm, xz_t, state, dropped, gamma_ih, beta_ih, w_hh, gamma_hh, beta_hh, gamma_c, beta_c):
    """One step of the cell in torch ops (the cells' equations, on the Function's inputs); ``dropped``
    is what the recurrent product reads, ``h_{t-1}`` or with recurrent dropout ``h_{t-1} r``."""
    hb = F.layer_norm(F.linear(dropped, w_hh), gamma_hh.shape, gamma_hh, beta_hh, EPS)
    if lstm:
        xn = F.layer_norm(xz_t, gamma_ih.shape, gamma_ih, beta_ih, EPS)
        i, f, g, o = (xn + hb).chunk(4, dim=-1)
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
    xz, *weights = inputs[:8]
    state = inputs[8:]
    mask, noise = ctx.mask, ctx.noise
    with torch.enable_grad():
        s = tuple(state)
        outs = []
        valid = mask.unbind(1) if mask is not None else [None] * xz.shape[1]
        for t, (xz_t, m) in enumerate(zip(xz.unbind(1), valid)):
            dropped = s[0] if noise is None or noise.recurrent is None else s[0] * noise.recurrent
            h, new = _step(ctx.lstm, xz_t, s, dropped, *weights)
            if noise is not None and noise.zoneout is not None:  # kept units: the whole previous state
                keep = noise.zoneout[:, t]
                new = tuple(torch.where(keep, old, a) for a, old in zip(new, s))
                h = torch.where(keep, s[0], h)
            if m is not None:
                m = m[:, None]
                new = tuple(torch.where(m, a, b) for a, b in zip(new, s))
                h = h * m
            s = new
            outs.append(h)
        results = [torch.stack(outs, dim=1), *s]
    return grads_through(results, (grad_out, *grad_state), inputs, ctx.needs_input_grad[3:])


def scan_layernorm(cell, x: Tensor, state: NamedTuple, mask: Tensor | None):
    """One (layer, direction) of a layer-normalised cell over (B, T, I) ``x``: the outputs (B, T, H)
    and the final state, with the zoneout and recurrent dropout current for ``cell`` (``noise_for``)
    applied inside the loop. Where the C++ loops run (the routing table checks). The LSTM's loop takes
    the input projection unnormalised (``Projection``: one matmul into a workspace buffer) and
    normalises it itself; the GRU's takes it normalised. Under autocast the projection may come back
    in half precision: the loop runs in the weights' dtype."""
    lstm = isinstance(cell, LayerNormLSTMCell)
    p = cell._parameters
    w_hh = p["weight_hh"]
    dtype = w_hh.dtype
    if not lstm:
        xz = cell.project_input(x).to(dtype).contiguous()  # (B, T, 3H)
        gamma_ih = beta_ih = None
    else:
        gamma_ih, beta_ih = p["gamma_ih"], p["bias_ih"]
        if torch.is_autocast_enabled(x.device.type):
            xz = F.linear(x, p["weight_ih"]).to(dtype).contiguous()
        else:
            xz = Projection.apply(x if x.is_contiguous() else x.contiguous(), p["weight_ih"], None)  # (B, T, 4H)
    mask = mask.contiguous() if mask is not None else None
    noise: StateNoise | None = noise_for(cell)
    weights = (gamma_ih, beta_ih, w_hh, p["gamma_hh"], p["bias_hh"], p.get("gamma_c"), p.get("beta_c"))
    parts = tuple(s.to(dtype).contiguous() for s in state)
    tensors = (xz, *weights, *parts)
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors):
        out, *final = _LayerNormScan.apply(lstm, mask, noise, xz, *weights, *parts)
        return out, cell.State(*final)
    with torch.no_grad():
        out, final, _ = _forward(lstm, mask, noise, xz, *weights, parts, training=False)
    return out, cell.State(*(s.clone() for s in final))
