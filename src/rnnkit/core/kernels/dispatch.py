"""One autograd Function for every kernel: ``fused_scan`` runs a cell over time through a given kernel.

``scan_reference`` (core/scan.py) steps a cell with autograd, which records about ten nodes per
step and computes the recurrent weight gradient as T small matmuls. Here one (layer, direction) is
one ``torch.autograd.Function`` whose backward through time is the kernel's own (``base.Kernel``):
``d xz`` goes back to autograd, so ``d W_ih`` is one matmul too (the projection's backward). In
inference the kernel's forward runs alone, under ``no_grad``. Which kernel a cell gets is decided
by the routing table (core/routing.py) from the kernel table (``table.py``); this module takes it
as given.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from rnnkit.core.gates import GatedCell
from rnnkit.core.kernels.base import Kernel, grads_through, time_major_rows, transformed
from rnnkit.core.kernels.state_noise import StateNoise, noise_for


class FusedScan(torch.autograd.Function):
    """``scan`` of one cell over (B, T, G*H) with the backward through time written by hand.

    The kernels' backward writes into buffers (``out=``), which autograd cannot differentiate and
    vmap cannot batch. A backward that must itself be differentiable (``create_graph=True``:
    gradient penalties, ``gradgradcheck``) or that runs under vmap (``check_batched_grad``,
    ``torch.func``) is computed instead by autograd over the reference step (``_backward_by_autograd``),
    from the saved inputs: the same gradients, with a graph."""

    @staticmethod
    def forward(ctx, kernel, cell, mask, noise, xz, w_hh, b_hh, *state):
        with torch.autocast(xz.device.type, enabled=False):
            out, final, saved = _forward(kernel, cell, xz, w_hh, b_hh, cell.State(*state), mask, True, noise)
        ctx.kernel, ctx.cell, ctx.saved, ctx.mask, ctx.noise = kernel, cell, saved, mask, noise
        # the kernels keep what else they need in ``saved``; xz, b_hh and the state only serve
        # a differentiable backward (references to the inputs, not copies)
        ctx.save_for_backward(w_hh, xz, b_hh, *state)
        ctx.set_materialize_grads(False)  # every kernel takes None for an output no gradient reached
        return (out, *(s.clone() for s in final))

    @staticmethod
    def backward(ctx, grad_out, *grad_state):
        w_hh, xz, b_hh, *state = ctx.saved_tensors
        if torch.is_grad_enabled() or transformed(grad_out, *grad_state):
            return (None, None, None, None, *_backward_by_autograd(ctx, xz, w_hh, b_hh, state, grad_out, grad_state))
        needs = {"w": ctx.needs_input_grad[5], "b": ctx.needs_input_grad[6]}
        with torch.autocast(w_hh.device.type, enabled=False):
            dxz, dw, db, dstate = ctx.kernel.backward(ctx.cell, ctx.saved, w_hh, ctx.mask, grad_out, grad_state, needs)
        return (None, None, None, None, dxz, dw, db, *dstate)


def _backward_by_autograd(ctx, xz, w_hh, b_hh, state, grad_out, grad_state):
    """The gradients of ``(xz, w_hh, b_hh, *state)`` by autograd through the reference step (the
    cell's ``combine`` on ``xz_t`` and ``h W_hh^T + b_hh``), with a graph when grad mode is on."""
    cell, mask = ctx.cell, ctx.mask
    inputs = (xz, w_hh, b_hh, *state)
    # h W_hh^T + b_hh, or the cell's own product of its recurrent weights (the sLSTM's block-diagonal one)
    product = getattr(cell, "recurrent_product", torch.nn.functional.linear)
    with torch.enable_grad():
        leaves = list(inputs)
        s = cell.State(*leaves[3:])
        outs = []
        valid = mask.unbind(1) if mask is not None else [None] * xz.shape[1]
        noise = ctx.noise
        for t, (xz_t, m) in enumerate(zip(leaves[0].unbind(1), valid)):
            dropped = s.h if noise is None or noise.recurrent is None else s.h * noise.recurrent
            hz = product(dropped, leaves[1], leaves[2])
            h, new = cell.combine(cell.split(xz_t), cell.split(hz), s)
            if noise is not None and noise.zoneout is not None:
                keep = noise.zoneout[:, t]
                new = cell.State(*(torch.where(keep, old, a) for a, old in zip(new, s)))
                h = torch.where(keep, s.h, h)
            if m is not None:
                m = m[:, None]
                new = cell.State(*(torch.where(m, a, b) for a, b in zip(new, s)))
                h = h * m
            s = new
            outs.append(h)
        results = [torch.stack(outs, dim=1), *s]
    return grads_through(results, (grad_out, *grad_state), inputs, ctx.needs_input_grad[4:])


def _forward(kernel: Kernel, cell, xz, w_hh, b_hh, state, mask, training: bool, noise: StateNoise | None):
    """``kernel.forward``, with ``noise`` where there is any (a kernel the routing table gives a call
    with noise takes it as the keyword ``noise``)."""
    if noise is None:
        return kernel.forward(cell, xz, w_hh, b_hh, state, mask, training)
    return kernel.forward(cell, xz, w_hh, b_hh, state, mask, training, noise=noise)  # type: ignore[call-arg]


def fused_scan(cell: GatedCell, xz: Tensor, state: NamedTuple, mask: Tensor | None, kernel: Kernel):
    """``scan_reference(cell, xz, state, mask)``'s function through ``kernel``: the outputs (B, T, H)
    and the final state. ``xz`` (B, T, G*H) may arrive in half precision under autocast; the
    recurrence runs in the weights' dtype."""
    w_hh, b_hh = cell.weight_hh, cell.bias_hh
    dtype = w_hh.dtype
    if xz.dtype != dtype:  # autocast: the input projection may arrive in half precision
        xz = xz.to(dtype)
    parts = tuple(s.to(dtype) for s in state)
    noise = noise_for(cell)  # zoneout and recurrent dropout (kernels/state_noise.py): batch-major buffers
    if kernel.dense_inputs:  # the loops read rows directly: dense buffers (a no-op when they are)
        if not (kernel.time_major_ok and noise is None and time_major_rows(xz)):
            xz = xz.contiguous()
        mask = mask.contiguous() if mask is not None else None
    tensors = (xz, w_hh, b_hh, *parts)
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors):
        out, *final = FusedScan.apply(kernel, cell, mask, noise, xz, w_hh, b_hh, *parts)
        return out, cell.State(*final)
    with torch.no_grad(), torch.autocast(xz.device.type, enabled=False):
        out, final, _ = _forward(kernel, cell, xz, w_hh, b_hh, cell.State(*parts), mask, False, noise)
    return out, cell.State(*(s.clone() for s in final))  # clones: the states buffer is not kept alive
