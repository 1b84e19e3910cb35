"""The generic kernel: any gated cell that changes only ``combine``, backward through time by autograd.

In training, forward records ``combine`` and the recurrence ``h_{t-1} -> hz_t`` with autograd, the
recurrent weights detached; backward is one ``autograd.grad`` call over that graph (the whole
backward through time in autograd's C++ engine) for ``d xz``, every ``d hz_t`` and the initial
state, then the batched weight gradients (``base.weight_grads``). Inference runs the same loop
under ``no_grad``. On the CPU the recurrent matmul runs on weights packed once per call
(``_recurrent_matmul``): rnnkit's blocked matmul where the C++ loops are built, else oneDNN at
large float32 sizes (``DNN_MIN_MACS``, ``DNN_MIN_WEIGHT``), else at::mm.

Where the C++ loops are built and ``combine`` compiles (core/pointwise.py), ``compiled.py`` takes
this kernel's place.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import torch
from torch import Tensor

from rnnkit.core import native
from rnnkit.core.gates import GatedCell
from rnnkit.core.kernels.base import Kernel, batch_major, weight_grads


def _masked(state, new_state, h, m_t):
    """``scan_reference``'s masking of one step: frozen state, zero output where ``m_t`` is False."""
    new_state = type(state)(*(torch.where(m_t, new, old) for new, old in zip(new_state, state)))
    return new_state, h * m_t


class _GenericSaved(NamedTuple):
    """What the generic backward needs: the recorded graph's ends and the recurrent matmul's inputs."""

    anchor: Tensor  # scalar leaf: the graph's entry to every step's input gates
    state: tuple  # initial state parts, leaves of the recorded graph
    x_sink: list  # [buffer, rows written]: each backward call's (T, B, G*H) for d xz, from _Gates
    h_sink: list  # the same for d hz = dz, the recurrent pre-activations
    h_prev: list  # T detached h_{t-1} (B, H), for dW_hh = dz^T h_prev
    out: Tensor  # (T, B, H) recorded outputs
    final: tuple  # recorded final state parts


class _Gates(torch.autograd.Function):
    """A step's (B, G*H) pre-activations split into its G gates, as ``cell.split`` does; backward
    writes the gates' gradients into row ``t`` of the buffer in ``sink`` (allocated by each backward
    call) rather than autograd concatenating them into a new tensor at every step, and passes
    that row on as the gradient of ``carrier`` (the recurrent projection) when ``source`` is None.
    For the input side, ``carrier`` is a scalar leaf that only connects the step to the graph."""

    @staticmethod
    def forward(ctx, carrier, source, sink, t, H):
        ctx.sink, ctx.t, ctx.H, ctx.through = sink, t, H, source is None
        return (carrier if source is None else source).split(H, dim=1)

    @staticmethod
    def backward(ctx, *grads):
        ctx.sink[1].add(ctx.t)
        row = ctx.sink[0][ctx.t]
        for g, grad in enumerate(grads):
            part = row[:, g * ctx.H : (g + 1) * ctx.H]
            part.zero_() if grad is None else part.copy_(grad)
        return (row if ctx.through else None), None, None, None, None


# `state` is the cell's own NamedTuple (HiddenState, LSTMState, ...): typed Any, its fields vary by cell
def generic_forward(cell: GatedCell, xz, w_hh, b_hh, state: Any, mask, training: bool, noise=None):
    """Step ``cell.combine`` over time.

    In training, autograd records every step with the recurrent weights detached: the graph holds
    ``combine`` and ``h_{t-1} -> hz_t`` through a constant matrix, so one ``autograd.grad`` call in
    backward runs the whole backward through time in C++, and ``dW_hh`` is one matmul afterwards.
    ``noise`` (kernels/state_noise.py): the recurrent product reads ``h_{t-1} * noise.recurrent``, and
    zoneout keeps a unit's previous state where ``noise.zoneout`` says so.
    """
    r = noise.recurrent if noise is not None else None
    keep = noise.zoneout.unbind(1) if noise is not None and noise.zoneout is not None else None
    B, T = xz.shape[0], xz.shape[1]
    m = mask.t().unsqueeze(-1).unbind(0) if mask is not None else None
    w_t = w_hh.detach().t()
    b = b_hh.detach() if b_hh is not None else None
    recurrent = _recurrent_matmul(w_hh.detach(), b, B, training) if xz.device.type == "cpu" else None
    if recurrent is None:
        recurrent = (lambda h: h.mm(w_t)) if b is None else (lambda h: torch.addmm(b, h, w_t))
    H = w_hh.shape[1]
    with torch.set_grad_enabled(training):
        if training:
            anchor = xz.new_zeros(()).requires_grad_()
            x_sink: list[Any] = [None, set()]  # [gradient rows, steps written], filled by _Gates
            h_sink: list[Any] = [None, set()]
            state = type(state)(*(s.detach().requires_grad_() for s in state))
        init, xl = state, xz.detach().unbind(1)
        h_prev, outs = [], []
        for t in range(T):
            h_in = state.h if r is None else state.h * r
            hz = recurrent(h_in)  # (B, G*H)
            if training:
                x_gates = cell.Gates(*_Gates.apply(anchor, xl[t], x_sink, t, H))
                h_gates = cell.Gates(*_Gates.apply(hz, None, h_sink, t, H))
                h_prev.append(h_in.detach())
            else:
                x_gates, h_gates = cell.split(xl[t]), cell.split(hz)
            h, new_state = cell.combine(x_gates, h_gates, state)
            if keep is not None:
                new_state = type(state)(*(torch.where(keep[t], old, new) for new, old in zip(new_state, state)))
                h = torch.where(keep[t], state.h, h)
            if m is not None:
                new_state, h = _masked(state, new_state, h, m[t])
            state = type(state)(*new_state)
            outs.append(h)
        out = torch.stack(outs)  # (T, B, H)
    if not training:
        return out, tuple(state), None
    saved = _GenericSaved(anchor, tuple(init), x_sink, h_sink, h_prev, out, tuple(state))
    return out.detach(), tuple(s.detach() for s in state), saved


class _ConstLinear(torch.autograd.Function):
    """``h -> h W^T + b`` through ``forward``, differentiable in ``h`` only, ``d h = grad W`` through
    ``backward``: the weights are constants of the recorded graph (their gradients come from the
    batched matmul afterwards)."""

    @staticmethod
    def forward(ctx, h, forward, backward):
        ctx.backward_fn = backward
        return forward(h)

    @staticmethod
    def backward(ctx, grad):
        return ctx.backward_fn(grad.contiguous()), None, None


def _recurrent_matmul(w_hh: Tensor, b: Tensor | None, batch: int, training: bool):
    """The generic kernel's ``h -> h W_hh^T + b`` on the CPU with the weights packed once per call:
    rnnkit's blocked matmul (native.cpp) where the C++ loops are built (float32/float64), else
    oneDNN at large float32 sizes (``_packed``); ``None`` leaves it to at::mm."""
    ops = native.ops_for(w_hh)
    if ops is not None:
        GH, H = w_hh.shape
        packed = ops.pack_linear(w_hh)
        forward = lambda h: ops.linear_packed(h, packed, GH, b)
        if training:
            packed_t = ops.pack_linear(w_hh.t())
            backward = lambda g: ops.linear_packed(g, packed_t, H, None)
    else:
        packed = _packed(w_hh, batch)
        if packed is None:
            return None
        forward = lambda h: torch.ops.mkldnn._linear_pointwise(h, packed, b, "none", [], "")
        if training:
            packed_t = _packed(w_hh.t(), batch)
            backward = lambda g: torch.ops.mkldnn._linear_pointwise(g, packed_t, None, "none", [], "")
    if not training:
        return forward
    return lambda h: _ConstLinear.apply(h, forward, backward)


def generic_backward(cell: GatedCell, saved: _GenericSaved, w_hh, mask, grad_out, grad_state, needs):
    """One ``autograd.grad`` over the recorded graph, then ``dW_hh`` and ``db_hh`` over all steps at once.

    ``d h_{t-1}`` already holds the path through ``hz_t`` (the detached-weight matmul is in the
    graph), so ``dz_t W_hh`` is never added by hand. The graph is retained, as the caller's may be:
    it goes with this call's ``saved``.
    """
    h_prev = torch.stack(saved.h_prev)  # (T, B, H)
    T, B = h_prev.shape[:2]
    GH = w_hh.shape[0]
    # fresh buffers per call (a retained graph may run backward again), and the rows written
    for sink in (saved.x_sink, saved.h_sink):
        sink[:] = [native.buffer((T, B, GH), h_prev), set()]
    ends = [(saved.out, None if grad_out is None else grad_out.transpose(0, 1))]
    ends += list(zip(saved.final, grad_state))
    ends = [(o, g) for o, g in ends if g is not None and o.requires_grad]
    inputs = (saved.anchor, *saved.state)
    grads = (
        torch.autograd.grad([o for o, _ in ends], inputs, [g for _, g in ends], retain_graph=True, allow_unused=True)
        if ends
        else (None,) * len(inputs)
    )
    dstate = [torch.zeros_like(i) if g is None else g for g, i in zip(grads[1:], saved.state)]
    for buffer, written in (saved.x_sink, saved.h_sink):  # filled by the _Gates nodes during autograd.grad
        for t in set(range(T)) - written:  # steps no gradient reached
            buffer[t].zero_()
    dxz, dhz = saved.x_sink[0], saved.h_sink[0]
    saved.x_sink[:], saved.h_sink[:] = [None, set()], [None, set()]
    dw, db = weight_grads(dhz, h_prev, needs["w"], needs["b"])
    return dxz.transpose(0, 1), dw, db, tuple(dstate)


class GenericKernel(Kernel):
    dense_inputs = False  # torch ops read any strides

    def forward(self, cell, xz, w_hh, b_hh, state, mask, training, noise=None):
        return batch_major(generic_forward(cell, xz, w_hh, b_hh, state, mask, training, noise))

    def backward(self, cell, saved, w_hh, mask, grad_out, grad_state, needs):
        return generic_backward(cell, saved, w_hh, mask, grad_out, grad_state, needs)


# -- oneDNN's packed matmul where the C++ loops are not built ------------------------------------

# Where the C++ loops are not built, the generic kernel's recurrent matmuls of at least this many
# multiply-adds per step, with a weight of at least this many elements, go to oneDNN with packed
# weights (measured on the development machine: below either, oneDNN's fixed ~15 us a call loses
# to at::mm). Where they are, it runs their blocked matmul (``linear_packed``): 5-30% faster than
# oneDNN and 1.3-2.7x faster than at::mm per step at the sizes measured (batch 1-64, outputs 33-2048).
DNN_MIN_MACS = 768 * 1024
DNN_MIN_WEIGHT = 48 * 1024


def _packed(w: Tensor, batch: int) -> Tensor | None:
    """oneDNN's packed form of ``w`` (N, K) for ``x @ w^T`` at ``batch`` rows, or ``None``.

    ``None`` leaves the generic kernel at::mm."""
    if w.dtype != torch.float32 or batch == 1 or w.numel() < DNN_MIN_WEIGHT or batch * w.numel() < DNN_MIN_MACS:
        return None
    if not onednn_matmul_works():
        return None
    return torch.ops.mkldnn._reorder_linear_weight(w.contiguous(), batch)


@functools.cache
def onednn_matmul_works() -> bool:
    """Whether this torch's oneDNN matmul ops (internal ones) behave as the generic kernel expects:
    checked once, on a small problem, against at::mm."""
    if not torch.backends.mkldnn.is_available():
        return False
    g = torch.Generator().manual_seed(0)
    w, x = torch.randn(4, 4, generator=g), torch.randn(2, 4, generator=g)
    try:
        packed = torch.ops.mkldnn._reorder_linear_weight(w, 2)
        y = torch.ops.mkldnn._linear_pointwise(x, packed, None, "none", [], "")
    except (RuntimeError, AttributeError, TypeError):
        return False
    return bool(torch.allclose(y, x @ w.t(), atol=1e-5))
