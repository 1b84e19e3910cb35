"""The fast path of ``scan``: one direction of one layer with a hand-written backward through time.

``scan_reference`` (core/scan.py) steps a cell with autograd, which records about ten nodes per
step and computes the recurrent weight gradient as T small matmuls. Here the same function is one
``torch.autograd.Function`` per (layer, direction):

forward, per step ``t`` (time-major buffers, preallocated, written in place)::

    z_t = xz_t + h_{t-1} W_hh^T + b_hh          one addmm
    h_t, state_t = pointwise(z_t, state_{t-1})   a handful of fused in-place ops

backward, per step, only the recurrent ``dz_t W_hh`` and a few pointwise ops: every factor of
the pointwise derivative that does not depend on the incoming gradient (``sigmoid'``,
``tanh'``, ...) is computed for all steps at once before the loop. The weight gradients are then
one matmul over all steps::

    dW_hh = dz^T @ h_prev      (G*H, T*B) @ (T*B, H)
    db_hh = sum over (t, b) of dz

and ``d xz`` goes back to autograd, so ``dW_ih`` is one matmul too (the projection's backward:
``project_input``'s, or ``_Projection``'s where the C++ loops run, which writes into the workspace).

Kernels: the built-in cells have hand-written pointwise forward and backward
(LSTM ``i, f, g, o``; GRU ``r, z, n`` with torch's ``r * (h W_hn + b_hn)``; RNN tanh/relu).
On the CPU in float32/float64 their loops over time run in C++ (``native.cpp``, compiled on
first use; the ``_Native*`` kernels below), which computes the backward's gate derivatives inside
the loop and runs its own recurrent matmul, split across threads by blocks of hidden units, each
block's gate math right after its product; the Python loops here are the fallback where that
can't be built, and the second implementation the tests hold to the reference.
Any other :class:`GatedCell` gets the generic kernel: in training, forward records ``combine``
and the recurrence ``h_{t-1} -> hz_t`` with autograd, the recurrent weights detached; backward is
one ``autograd.grad`` call over that graph (the whole backward through time in autograd's C++
engine) for ``d xz``, every ``d hz_t`` and the initial state, then the same batched weight
gradients. Inference runs the same loop under ``no_grad``. Where the C++ loops are built and
``combine`` compiles (core/pointwise.py), the generic kernel's place goes to ``_CompiledGeneric``:
per step the C++ recurrent matmul and one C++ pass of the compiled ``combine``, back through time
one pass of its derivative and ``dh += dz W_hh``, no autograd.

Masks (B, T) follow ``scan_reference`` exactly: at a step where ``mask`` is False a sequence's
state is carried unchanged and its output is zero. In the backward pass this becomes, per step,
multiplying the precomputed factors by the mask (no gradient into the step's gates) and letting
the state's gradient pass through.
"""
from __future__ import annotations

import functools
import warnings
from typing import NamedTuple

import torch
from torch import Tensor
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from rnnkit.core import native, pointwise
from rnnkit.core.cells.gru import GRUCell
from rnnkit.core.cells.lstm import LSTMCell
from rnnkit.core.cells.rnn import RNNCell
from rnnkit.core.gates import GatedCell, only_combine_customised


# -- helpers ---------------------------------------------------------------------------------

def _time_major(xz: Tensor, b_hh: Tensor | None) -> Tensor:
    """(B, T, G*H) -> a fresh contiguous (T, B, G*H), with ``b_hh`` added if given."""
    B, T, GH = xz.shape
    out = torch.empty(T, B, GH, dtype=xz.dtype, device=xz.device)
    if b_hh is None:
        out.copy_(xz.transpose(0, 1))
    else:
        torch.add(xz.transpose(0, 1), b_hh, out=out)
    return out


def _mask_parts(mask: Tensor | None, dtype) -> tuple[Tensor | None, Tensor | None]:
    """(B, T) bool -> time-major (T, B, 1) bool and the same as ``dtype`` (or ``None, None``)."""
    if mask is None:
        return None, None
    m = mask.t().unsqueeze(-1).contiguous()  # (T, B, 1)
    return m, m.to(dtype)


def _grad_out_time_major(grad_out: Tensor | None, like: Tensor, mf: Tensor | None) -> Tensor:
    """Output gradient (B, T, H) -> (T, B, H), zero at padded steps (outputs there are constant zero)."""
    if grad_out is None:
        return torch.zeros_like(like)
    g = grad_out.transpose(0, 1)
    return g * mf if mf is not None else g


def _weight_grads(dz: Tensor, h_prev: Tensor | None, need_w: bool, need_b: bool):
    """``dW = dz^T h_prev`` and ``db = sum dz`` over all steps at once; dz (T, B, G*H) and h_prev (T, B, H),
    or both batch-major (``h_prev`` may be None when ``need_w`` is False)."""
    flat = dz.reshape(-1, dz.shape[-1])
    dw = flat.t().mm(h_prev.reshape(-1, h_prev.shape[-1])) if need_w else None
    db = flat.sum(0) if need_b else None
    return dw, db


# -- LSTM ------------------------------------------------------------------------------------

def _ifog(w: Tensor) -> Tensor:
    """Rows (or columns, last dim) in torch's gate order ``i, f, g, o`` -> ``i, f, o, g``.

    The sigmoid gates become one contiguous block, so a step needs one ``sigmoid_`` and one
    ``tanh_`` instead of three activations. The permutation is its own inverse.
    """
    H = w.shape[-1] // 4 if w.dim() == 1 else w.shape[0] // 4
    if w.dim() == 1:
        return torch.cat((w[: 2 * H], w[3 * H :], w[2 * H : 3 * H]))
    return torch.cat((w[: 2 * H], w[3 * H :], w[2 * H : 3 * H]), dim=0)


def lstm_forward(xz, w_hh, b_hh, h0, c0, mask, training: bool):
    """LSTM over time. Returns outputs (T, B, H), final (h, c) and what backward needs.

    The saved gates are activated and in the internal order ``i, f, o, g`` (see ``_ifog``).
    """
    B, T, G4 = xz.shape
    H = G4 // 4
    z = xz.new_empty(T, B, G4)  # time-major xz + b_hh in i, f, o, g order; activated in place
    xt = xz.transpose(0, 1)
    for dst, src in ((slice(0, 2 * H), slice(0, 2 * H)), (slice(2 * H, 3 * H), slice(3 * H, 4 * H)),
                     (slice(3 * H, 4 * H), slice(2 * H, 3 * H))):
        if b_hh is None:
            z[..., dst].copy_(xt[..., src])
        else:
            torch.add(xt[..., src], b_hh[src], out=z[..., dst])
    w_t = _ifog(w_hh).t()  # (H, 4H)
    m, _ = _mask_parts(mask, z.dtype)
    hs = z.new_empty(T + 1, B, H)  # states h_0 .. h_T
    cs = z.new_empty(T + 1, B, H)
    hs[0] = h0
    cs[0] = c0
    out = hs[1:] if m is None else z.new_empty(T, B, H)
    zl = z.unbind(0)
    if training:  # per-step views made in C++ by unbind: slicing in the loop costs as much as an op
        gl, sig, tnh = zl, z[..., : 3 * H].unbind(0), z[..., 3 * H :].unbind(0)
        il, fl, ol = z[..., :H].unbind(0), z[..., H : 2 * H].unbind(0), z[..., 2 * H : 3 * H].unbind(0)
    else:  # inference: one scratch step instead of T saved ones
        s = z.new_empty(B, G4)
        gl, sig, tnh = [s] * T, [s[:, : 3 * H]] * T, [s[:, 3 * H :]] * T
        il, fl, ol = [s[:, :H]] * T, [s[:, H : 2 * H]] * T, [s[:, 2 * H : 3 * H]] * T
    tc = z.new_empty(B, H)
    hl, cl, outl = hs.unbind(0), cs.unbind(0), out.unbind(0)
    ml = m.unbind(0) if m is not None else None
    for t in range(T):
        if training:
            gl[t].addmm_(hl[t], w_t)
        else:
            torch.addmm(zl[t], hl[t], w_t, out=gl[t])
        sig[t].sigmoid_()
        tnh[t].tanh_()
        c_new = cl[t + 1]
        torch.mul(fl[t], cl[t], out=c_new)
        c_new.addcmul_(il[t], tnh[t])
        torch.tanh(c_new, out=tc)
        if ml is None:
            torch.mul(ol[t], tc, out=hl[t + 1])
        else:
            m_t = ml[t]
            h_new = torch.mul(ol[t], tc, out=outl[t])
            torch.where(m_t, h_new, hl[t], out=hl[t + 1])
            torch.where(m_t, c_new, cl[t], out=c_new)
            h_new.mul_(m_t)
    return out, (hs[T], cs[T]), (z, hs, cs)


def lstm_backward(saved, w_hh, mask, grad_out, grad_h, grad_c, needs):
    z, hs, cs = saved
    T, B, G4 = z.shape
    H = G4 // 4
    m, mf = _mask_parts(mask, z.dtype)
    i, f, o, g = z[..., :H], z[..., H : 2 * H], z[..., 2 * H : 3 * H], z[..., 3 * H :]  # internal order
    c_prev, c = cs[:-1], cs[1:]
    tc = torch.tanh(c)
    # dz_t = [dc*P_i, dc*P_f, dc*P_g, dh*P_o]; the P's depend only on the forward pass
    dz = torch.empty_like(z)
    dz4 = dz.view(T, B, 4, H)
    torch.mul(g, i - i * i, out=dz4[:, :, 0])
    torch.mul(c_prev, f - f * f, out=dz4[:, :, 1])
    torch.mul(i, 1 - g * g, out=dz4[:, :, 2])
    torch.mul(tc, o - o * o, out=dz4[:, :, 3])
    A = o * (1 - tc * tc)  # d c_t / d h_t through h_t = o * tanh(c_t)
    f_carry = f
    if mf is not None:
        dz.view(T, B, 4 * H).mul_(mf)
        A.mul_(mf)
        f_carry = torch.where(m, f, torch.ones((), dtype=f.dtype, device=f.device))
        not_m = 1 - mf
    gout = _grad_out_time_major(grad_out, c, mf)
    dh = gout[T - 1].clone() if grad_h is None else gout[T - 1] + grad_h
    dc = torch.zeros_like(dh) if grad_c is None else grad_c.clone()
    dc3 = dc.unsqueeze(1)  # (B, 1, H), broadcast over gates i, f, g
    dz_ifg = dz4[:, :, :3].unbind(0)
    dz_o = dz4[:, :, 3].unbind(0)
    dzl = dz.unbind(0)
    Al, fl, gl = A.unbind(0), f_carry.unbind(0), gout.unbind(0)
    for t in range(T - 1, -1, -1):
        dc.addcmul_(dh, Al[t])
        dz_ifg[t].mul_(dc3)
        dz_o[t].mul_(dh)
        dc.mul_(fl[t])
        if mf is None:
            if t > 0:
                torch.addmm(gl[t - 1], dzl[t], w_hh, out=dh)
            else:
                dh = dzl[t].mm(w_hh)
        else:
            dh.mul_(not_m[t])
            dh.addmm_(dzl[t], w_hh)
            if t > 0:
                dh.add_(gl[t - 1])
    dw, db = _weight_grads(dz, hs[:-1], needs["w"], needs["b"])
    return dz.transpose(0, 1), dw, db, (dh, dc)


# -- GRU -------------------------------------------------------------------------------------

def gru_forward(xz, w_hh, b_hh, h0, mask, training: bool):
    """GRU over time in torch's convention ``n = tanh(x_n + r * (h W_hn + b_hn))``."""
    T, B = xz.shape[1], xz.shape[0]
    H = h0.shape[-1]
    x = _time_major(xz, None)  # (T, B, 3H), becomes the activated gates r, z, n in place
    w_t = w_hh.t()
    m, _ = _mask_parts(mask, x.dtype)
    hs = x.new_empty(T + 1, B, H)
    hs[0] = h0
    out = hs[1:] if m is None else x.new_empty(T, B, H)
    # x_rz += h W_hr,z^T + b_hr,z in place; the n part h W_hn^T + b_hn is kept alone (r multiplies it)
    if b_hh is not None:
        x[..., : 2 * H] += b_hh[: 2 * H]
    w_rz, w_n = w_t[:, : 2 * H], w_t[:, 2 * H :]
    b_n = b_hh[2 * H :] if b_hh is not None else None
    hzn = x.new_empty(T if training else 1, B, H)  # kept for backward: dr = dn_pre * hzn
    hznl = hzn.unbind(0) if training else [hzn[0]] * T
    rz = x[..., : 2 * H].unbind(0)
    n = x[..., 2 * H :].unbind(0)
    r = x[..., :H].unbind(0)
    z = x[..., H : 2 * H].unbind(0)
    hl, outl = hs.unbind(0), out.unbind(0)
    ml = m.unbind(0) if m is not None else None
    for t in range(T):
        rz[t].addmm_(hl[t], w_rz).sigmoid_()
        if b_n is None:
            torch.mm(hl[t], w_n, out=hznl[t])
        else:
            torch.addmm(b_n, hl[t], w_n, out=hznl[t])
        n[t].addcmul_(r[t], hznl[t]).tanh_()
        if ml is None:
            torch.lerp(n[t], hl[t], z[t], out=hl[t + 1])  # n + z * (h - n)
        else:
            h_new = torch.lerp(n[t], hl[t], z[t], out=outl[t])
            torch.where(ml[t], h_new, hl[t], out=hl[t + 1])
            h_new.mul_(ml[t])
    return out, (hs[T],), (x, hzn, hs)


def gru_backward(saved, w_hh, mask, grad_out, grad_h, needs):
    x, hzn, hs = saved
    T, B, G3 = x.shape
    H = G3 // 3
    m, mf = _mask_parts(mask, x.dtype)
    r, z, n = x[..., :H], x[..., H : 2 * H], x[..., 2 * H :]
    h_prev = hs[:-1]
    # d xz_t = dh_t * P_t and d hz_t = dh_t * Q_t (Q = P with the n part times r)
    P = torch.empty_like(x)
    P3 = P.view(T, B, 3, H)
    dn_pre = torch.mul(1 - z, 1 - n * n, out=P3[:, :, 2])
    torch.mul(dn_pre * hzn, r - r * r, out=P3[:, :, 0])
    torch.mul(h_prev - n, z - z * z, out=P3[:, :, 1])
    z_carry = z
    if mf is not None:
        P.mul_(mf)
        z_carry = torch.where(m, z, torch.ones((), dtype=z.dtype, device=z.device))
    Q = P.clone()
    Q.view(T, B, 3, H)[:, :, 2].mul_(r)
    gout = _grad_out_time_major(grad_out, h_prev, mf)
    dh = gout[T - 1].clone() if grad_h is None else gout[T - 1] + grad_h
    dh3 = dh.unsqueeze(1)
    Pl, Ql = P3.unbind(0), Q.view(T, B, 3, H).unbind(0)
    Qflat = Q.unbind(0)
    zl, gl = z_carry.unbind(0), gout.unbind(0)
    for t in range(T - 1, -1, -1):
        Pl[t].mul_(dh3)
        Ql[t].mul_(dh3)
        if t > 0:
            torch.addcmul(gl[t - 1], dh, zl[t], out=dh)
        else:
            dh.mul_(zl[t])
        dh.addmm_(Qflat[t], w_hh)
    dw, db = _weight_grads(Q, h_prev, needs["w"], needs["b"])
    return P.transpose(0, 1), dw, db, (dh,)


# -- Elman RNN -------------------------------------------------------------------------------

def rnn_forward(xz, w_hh, b_hh, h0, mask, training: bool, relu: bool):
    T, B = xz.shape[1], xz.shape[0]
    H = h0.shape[-1]
    x = _time_major(xz, b_hh)  # (T, B, H)
    w_t = w_hh.t()
    m, _ = _mask_parts(mask, x.dtype)
    hs = x.new_empty(T + 1, B, H)
    hs[0] = h0
    hl, xl = hs.unbind(0), x.unbind(0)
    act_ = torch.relu_ if relu else torch.tanh_
    if m is None:
        for t in range(T):
            act_(torch.addmm(xl[t], hl[t], w_t, out=hl[t + 1]))
        out = hs[1:]
    else:
        out = x  # activations written over the input projection, then masked in place
        for t in range(T):
            h_new = act_(xl[t].addmm_(hl[t], w_t))
            torch.where(m[t], h_new, hl[t], out=hl[t + 1])
            h_new.mul_(m[t])
    return out, (hs[T],), (hs,)


def rnn_backward(saved, w_hh, mask, grad_out, grad_h, needs, relu: bool):
    (hs,) = saved
    T = hs.shape[0] - 1
    m, mf = _mask_parts(mask, hs.dtype)
    h = hs[1:]  # at valid steps the activation itself; padded steps are zeroed by the mask
    P = (h > 0).to(h.dtype) if relu else 1 - h * h
    if mf is not None:
        P.mul_(mf)
        not_m = 1 - mf
    gout = _grad_out_time_major(grad_out, h, mf)
    dh = gout[T - 1].clone() if grad_h is None else gout[T - 1] + grad_h
    Pl, gl = P.unbind(0), gout.unbind(0)
    for t in range(T - 1, -1, -1):
        Pl[t].mul_(dh)
        if mf is not None:
            dh.mul_(not_m[t])
            dh.addmm_(Pl[t], w_hh)
            if t > 0:
                dh.add_(gl[t - 1])
        elif t > 0:
            torch.addmm(gl[t - 1], Pl[t], w_hh, out=dh)
        else:
            dh = Pl[t].mm(w_hh)
    dw, db = _weight_grads(P, hs[:-1], needs["w"], needs["b"])
    return P.transpose(0, 1), dw, db, (dh,)


# -- any other gated cell: ``combine`` recorded by autograd, the recurrent weight left out ------

def _masked(state, new_state, h, m_t):
    """``scan_reference``'s masking of one step: frozen state, zero output where ``m_t`` is False."""
    new_state = type(state)(*(torch.where(m_t, new, old) for new, old in zip(new_state, state)))
    return new_state, h * m_t


class _GenericSaved(NamedTuple):
    """What the generic backward needs: the recorded graph's ends and the recurrent matmul's inputs."""

    anchor: Tensor       # scalar leaf: the graph's entry to every step's input gates
    state: tuple         # initial state parts, leaves of the recorded graph
    x_sink: list         # [buffer, rows written]: each backward call's (T, B, G*H) for d xz, from _Gates
    h_sink: list         # the same for d hz = dz, the recurrent pre-activations
    h_prev: list         # T detached h_{t-1} (B, H), for dW_hh = dz^T h_prev
    out: Tensor          # (T, B, H) recorded outputs
    final: tuple         # recorded final state parts


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


def generic_forward(cell: GatedCell, xz, w_hh, b_hh, state: NamedTuple, mask, training: bool):
    """Step ``cell.combine`` over time.

    In training, autograd records every step with the recurrent weights detached: the graph holds
    ``combine`` and ``h_{t-1} -> hz_t`` through a constant matrix, so one ``autograd.grad`` call in
    backward runs the whole backward through time in C++, and ``dW_hh`` is one matmul afterwards.
    """
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
            x_sink, h_sink = [None, set()], [None, set()]
            state = type(state)(*(s.detach().requires_grad_() for s in state))
        init, xl = state, xz.detach().unbind(1)
        h_prev, outs = [], []
        for t in range(T):
            hz = recurrent(state.h)  # (B, G*H)
            if training:
                x_gates = cell.Gates(*_Gates.apply(anchor, xl[t], x_sink, t, H))
                h_gates = cell.Gates(*_Gates.apply(hz, None, h_sink, t, H))
                h_prev.append(state.h.detach())
            else:
                x_gates, h_gates = cell.split(xl[t]), cell.split(hz)
            h, new_state = cell.combine(x_gates, h_gates, state)
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
    ops = native.ops() if w_hh.dtype in (torch.float32, torch.float64) else None
    if ops is not None:
        GH, H = w_hh.shape
        packed = ops.pack_linear(w_hh)
        forward = lambda h: ops.linear_packed(h, packed, GH, b)  # noqa: E731
        if training:
            packed_t = ops.pack_linear(w_hh.t())
            backward = lambda g: ops.linear_packed(g, packed_t, H, None)  # noqa: E731
    else:
        packed = _packed(w_hh, batch)
        if packed is None:
            return None
        forward = lambda h: torch.ops.mkldnn._linear_pointwise(h, packed, b, "none", [], "")  # noqa: E731
        if training:
            packed_t = _packed(w_hh.t(), batch)
            backward = lambda g: torch.ops.mkldnn._linear_pointwise(g, packed_t, None, "none", [], "")  # noqa: E731
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
    grads = torch.autograd.grad([o for o, _ in ends], inputs, [g for _, g in ends],
                                retain_graph=True, allow_unused=True) if ends else (None,) * len(inputs)
    dstate = [torch.zeros_like(i) if g is None else g for g, i in zip(grads[1:], saved.state)]
    for buffer, written in (saved.x_sink, saved.h_sink):  # filled by the _Gates nodes during autograd.grad
        for t in set(range(T)) - written:  # steps no gradient reached
            buffer[t].zero_()
    dxz, dhz = saved.x_sink[0], saved.h_sink[0]
    saved.x_sink[:], saved.h_sink[:] = [None, set()], [None, set()]
    dw, db = _weight_grads(dhz, h_prev, needs["w"], needs["b"])
    return dxz.transpose(0, 1), dw, db, tuple(dstate)


# -- the autograd Function and the dispatch --------------------------------------------------

class _Kernel:
    """Pointwise forward/backward of one cell kind, in a common signature."""

    def forward(self, cell, xz, w_hh, b_hh, state, mask, training):
        raise NotImplementedError

    def backward(self, cell, saved, w_hh, mask, grad_out, grad_state, needs):
        raise NotImplementedError


def _batch_major(result):
    """A Python loop's (T, B, H) outputs -> (B, T, H), contiguous as torch.nn returns them."""
    out, final, saved = result
    return out.transpose(0, 1).contiguous(), final, saved


class _LSTMKernel(_Kernel):
    def forward(self, cell, xz, w_hh, b_hh, state, mask, training):
        return _batch_major(lstm_forward(xz, w_hh, b_hh, state[0], state[1], mask, training))

    def backward(self, cell, saved, w_hh, mask, grad_out, grad_state, needs):
        return lstm_backward(saved, w_hh, mask, grad_out, grad_state[0], grad_state[1], needs)


class _GRUKernel(_Kernel):
    def forward(self, cell, xz, w_hh, b_hh, state, mask, training):
        return _batch_major(gru_forward(xz, w_hh, b_hh, state[0], mask, training))

    def backward(self, cell, saved, w_hh, mask, grad_out, grad_state, needs):
        return gru_backward(saved, w_hh, mask, grad_out, grad_state[0], needs)


class _RNNKernel(_Kernel):
    def forward(self, cell, xz, w_hh, b_hh, state, mask, training):
        return _batch_major(rnn_forward(xz, w_hh, b_hh, state[0], mask, training, cell.nonlinearity == "relu"))

    def backward(self, cell, saved, w_hh, mask, grad_out, grad_state, needs):
        return rnn_backward(saved, w_hh, mask, grad_out, grad_state[0], needs, cell.nonlinearity == "relu")


class _GenericKernel(_Kernel):
    def forward(self, cell, xz, w_hh, b_hh, state, mask, training):
        return _batch_major(generic_forward(cell, xz, w_hh, b_hh, state, mask, training))

    def backward(self, cell, saved, w_hh, mask, grad_out, grad_state, needs):
        return generic_backward(cell, saved, w_hh, mask, grad_out, grad_state, needs)


# ``combine`` of a built-in cell -> its hand-written kernel. Keyed on the function, not the class,
# so a subclass that rewrites ``combine`` gets the generic kernel, never a wrong fused one.
KERNELS = {LSTMCell.combine: _LSTMKernel(), GRUCell.combine: _GRUKernel(), RNNCell.combine: _RNNKernel()}
GENERIC = _GenericKernel()


# -- the built-in kernels with their loops in C++ (native.cpp): CPU, float32 and float64 --------
#
# Same functions as the Python kernels above, which they replace when native.ops() is available.
# Their buffers are batch-major like the layer's (no transposes), the states time-major; the C++
# backward computes every gate derivative from the saved activations, so the only work here is
# allocation and the batched weight gradients.

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


class _Projection(torch.autograd.Function):
    """``x W^T + b`` for all steps, (B, T, I) -> (B, T, G*H), written into a workspace buffer (F.linear
    would take a fresh block on every call). Backward is F.linear's: ``dx = g W``, ``dW = g^T x``,
    ``db = sum g``, with ``dx`` in the workspace too."""

    @staticmethod
    def forward(ctx, x, w, b):
        B, T, I = x.shape
        flat = x.reshape(B * T, I)
        out = native.buffer((B, T, w.shape[0]), x)  # (B, T, G*H)
        if b is None:
            torch.mm(flat, w.t(), out=out.view(B * T, -1))
        else:
            torch.addmm(b, flat, w.t(), out=out.view(B * T, -1))
        ctx.save_for_backward(flat, w)
        ctx.shape, ctx.has_bias = x.shape, b is not None
        return out

    @staticmethod
    def backward(ctx, grad):
        flat, w = ctx.saved_tensors
        g = grad.reshape(-1, grad.shape[-1])
        dx = dw = db = None
        if ctx.needs_input_grad[0]:
            dx = torch.mm(g, w, out=native.buffer(flat.shape, flat)).view(ctx.shape)
        if ctx.needs_input_grad[1]:
            dw = g.t().mm(flat)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            db = g.sum(0)
        return dx, dw, db


def project(cell: GatedCell, x: Tensor) -> Tensor:
    """``cell.project_input(x)`` for a layer's (B, T, I) input; through ``_Projection`` where the
    C++ loops run (CPU, float32/float64, a cell with GatedCell's own projection, no autocast)."""
    w = cell.weight_ih
    if (x.device.type != "cpu" or x.dtype not in (torch.float32, torch.float64) or x.dtype != w.dtype
            or kernel_for(cell) is None or torch.is_autocast_enabled("cpu") or _functorch_active()
            or native.ops() is None):
        return cell.project_input(x)
    return _Projection.apply(x, w, cell.bias_ih)


def scan_projecting(cell: GatedCell, x: Tensor, state: NamedTuple, mask: Tensor | None):
    """``scan(cell, project(cell, x), state, mask)`` in inference with the input projection inside
    the C++ loop, or ``None`` where that does not apply: gradients wanted, a cell that is neither
    the LSTM (``lstm_forward_projecting``) nor a user's cell whose ``combine`` compiles
    (``pointwise_scan`` with ``W_ih``), or anywhere the C++ loops do not run. For the LSTM, measured
    against projecting beforehand (one matmul, then the loop) over batch 1-64, H 128 and 512:
    1.03-1.27x.

    ``x`` (B, T, I), ``state`` the cell's state of (B, H) parts, ``mask`` (B, T) or ``None``;
    returns the outputs (B, T, H) and the final state."""
    kernel = kernel_for(cell)
    if (native.ops() is None or kernel not in (KERNELS[LSTMCell.combine], GENERIC) or x.device.type != "cpu"
            or x.dtype not in (torch.float32, torch.float64) or x.dtype != cell.weight_hh.dtype
            or x.dtype != cell.weight_ih.dtype or torch.is_autocast_enabled("cpu") or _functorch_active()):
        return None
    tensors = (x, cell.weight_ih, cell.weight_hh, cell.bias_ih, cell.bias_hh, *state)
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors):
        return None
    programs = None
    if kernel is GENERIC:  # a user's cell: per step x_t W_ih^T + b_ih, then the compiled combine
        programs = pointwise.compiled(cell)
        if programs is None:
            return None
    with torch.no_grad():
        out, final = projecting_loop(cell, x, loop_weights(cell), [s.to(x.dtype) for s in state], mask, programs)
        return out, cell.State(*(s.clone() for s in final))


def loop_weights(cell: GatedCell) -> tuple[Tensor, Tensor]:
    """``(W_ih, W_hh)`` packed (``pack_linear``) as the C++ loops read them in inference: for the
    LSTM and a user's compiled cell, whose loops project their input per step (``projecting_loop``),
    both for the cell's gates (``program_gates``); for the GRU and the RNN, ``W_ih`` for one matmul
    (``linear_packed``: 1 gate) and ``W_hh`` for their loops. Where the C++ loops run.

    Packed on every call of a whole sequence, as torch's own kernels do: a cache would miss a
    change written through ``.data``, which bypasses the version counter. The lean stepping path
    keeps them (step.py), where packing would be a large part of a step."""
    params = cell._parameters  # not attribute access: nn.Module's __getattr__ is slow
    w_ih, w_hh = params["weight_ih"], params["weight_hh"]
    ops = native.ops()
    with torch.no_grad():
        if type(cell).combine in (GRUCell.combine, RNNCell.combine):
            return ops.pack_linear(w_ih, 1), ops.pack_linear(w_hh, cell.num_gates)
        G = program_gates(cell)
        return ops.pack_linear(w_ih, G), ops.pack_linear(w_hh, G)


def projecting_loop(cell: GatedCell, x: Tensor, weights, state, mask, programs=None):
    """Inference over (B, T, I) ``x`` in the C++ loop that projects its input per step, on
    ``loop_weights(cell)``: the LSTM's (``lstm_forward_projecting``), or a user's cell's with its
    compiled ``programs`` (``pointwise_scan``). ``state``: the cell's (B, H) parts, in x's dtype.
    Returns the outputs (B, T, H) and the final state's parts, views of buffers that a later call
    may reuse (copy what is kept)."""
    w_ih, w_hh = weights
    if programs is not None:
        out, final, _ = _compiled_loop(programs, x, w_ih, cell.bias_ih, cell.weight_hh, cell.bias_hh, state, mask,
                                       False, packed_hh=w_hh)
        return out, final
    B, T = x.shape[0], x.shape[1]
    hs, cs = states_rows(state[0], T, False), states_rows(state[1], T, False)
    out = native.buffer((B, T, cell.hidden_size), x)  # (B, T, H)
    native.ops().lstm_forward_projecting(x.contiguous(), w_ih, cell.bias_ih, w_hh, cell.bias_hh, hs, cs, out,
                                         mask.contiguous() if mask is not None else None)
    return out, (hs[T % 2], cs[T % 2])


def states_rows(first: Tensor, T: int, training: bool) -> Tensor:
    """(T+1, B, H) buffer for h_0 .. h_T (or c), h_0 filled in; in inference, where backward needs
    none of them, (2, B, H) with h_t in row t % 2 (the C++ loops' layout): less memory to touch."""
    hs = native.buffer((T + 1 if training else 2, *first.shape), first)
    hs[0] = first
    return hs


def _grad_in(grad: Tensor | None, like: Tensor) -> Tensor:
    """An incoming state gradient as a fresh contiguous buffer the C++ loop may update in place."""
    return torch.zeros_like(like, memory_format=torch.contiguous_format) if grad is None else grad.clone(
        memory_format=torch.contiguous_format)


def _grad_rows(grad_out: Tensor | None) -> Tensor | None:
    """The output gradient (B, T, H) with a contiguous last dimension (what the C++ loops read)."""
    if grad_out is None or grad_out.stride(-1) == 1:
        return grad_out
    return native.buffer(grad_out.shape, grad_out).copy_(grad_out)


def _batch_major_states(hs: Tensor) -> Tensor:
    """h_0 .. h_{T-1} of the time-major states ``hs`` (T+1, B, H) as a batch-major (B*T, H) copy,
    row for row with a batch-major ``dxz``."""
    T, B, H = hs.shape[0] - 1, hs.shape[1], hs.shape[2]
    return native.buffer((B, T, H), hs).copy_(hs[:-1].transpose(0, 1)).view(B * T, H)


def _native_weight_grads(dhz: Tensor, hs: Tensor, needs: dict):
    """``_weight_grads`` for batch-major ``dhz`` (B, T, G*H) and the time-major states ``hs`` (T+1, B, H)."""
    return _weight_grads(dhz, _batch_major_states(hs) if needs["w"] else None, needs["w"], needs["b"])


class _NativeLSTM(_Kernel):
    def forward(self, cell, xz, w_hh, b_hh, state, mask, training):
        B, T, G4 = xz.shape
        hs, cs = states_rows(state[0], T, training), states_rows(state[1], T, training)
        out = native.buffer((B, T, G4 // 4), xz)
        gates = native.buffer(xz.shape, xz) if training else None
        native.ops().lstm_forward(xz, native.ops().pack_linear(w_hh, 4), b_hh, hs, cs, out, gates, mask)
        last = T % hs.shape[0]
        return out, (hs[last], cs[last]), (gates, hs, cs)

    def backward(self, cell, saved, w_hh, mask, grad_out, grad_state, needs):
        gates, hs, cs = saved
        dh, dc = _grad_in(grad_state[0], hs[0]), _grad_in(grad_state[1], cs[0])
        dxz = native.buffer(gates.shape, gates)
        native.ops().lstm_backward(gates, cs, _grad_rows(grad_out), w_hh, dh, dc, dxz, mask)
        dw, db = _native_weight_grads(dxz, hs, needs)
        return dxz, dw, db, (dh, dc)


class _NativeGRU(_Kernel):
    def forward(self, cell, xz, w_hh, b_hh, state, mask, training):
        B, T, G3 = xz.shape
        hs = states_rows(state[0], T, training)
        out = native.buffer((B, T, G3 // 3), xz)
        gates, hzn = (native.buffer(xz.shape, xz), native.buffer(out.shape, out)) if training else (None, None)
        native.ops().gru_forward(xz, native.ops().pack_linear(w_hh, 3), b_hh, hs, out, gates, hzn, mask)
        return out, (hs[T % hs.shape[0]],), (gates, hzn, hs)

    def backward(self, cell, saved, w_hh, mask, grad_out, grad_state, needs):
        gates, hzn, hs = saved
        dh = _grad_in(grad_state[0], hs[0])
        dxz, dhn = native.buffer(gates.shape, gates), native.buffer(hzn.shape, hzn)  # d hz's r, z parts are d xz's; its n part
        native.ops().gru_backward(gates, hzn, hs, _grad_rows(grad_out), w_hh, dh, dxz, dhn, mask)
        H = hzn.shape[-1]
        rz = dxz.view(-1, 3 * H)[:, : 2 * H]  # a strided view, no copy
        dw = None
        if needs["w"]:
            h_prev = _batch_major_states(hs)
            dw = torch.cat((rz.t().mm(h_prev), dhn.view(-1, H).t().mm(h_prev)))
        db = torch.cat((rz.sum(0), dhn.view(-1, H).sum(0))) if needs["b"] else None
        return dxz, dw, db, (dh,)


class _NativeRNN(_Kernel):
    def forward(self, cell, xz, w_hh, b_hh, state, mask, training):
        B, T, H = xz.shape
        hs = states_rows(state[0], T, training)
        out = native.buffer(xz.shape, xz)
        native.ops().rnn_forward(xz, native.ops().pack_linear(w_hh, 1), b_hh, hs, out, mask, cell.nonlinearity == "relu")
        return out, (hs[T % hs.shape[0]],), (hs,)

    def backward(self, cell, saved, w_hh, mask, grad_out, grad_state, needs):
        (hs,) = saved
        dh = _grad_in(grad_state[0], hs[0])
        T, B, H = hs.shape[0] - 1, hs.shape[1], hs.shape[2]
        dxz = native.buffer((B, T, H), hs)
        native.ops().rnn_backward(hs, _grad_rows(grad_out), w_hh, dh, dxz, mask, cell.nonlinearity == "relu")
        dw, db = _native_weight_grads(dxz, hs, needs)
        return dxz, dw, db, (dh,)


# a Python kernel -> its C++ twin, used for CPU float32/float64 when native.ops() is available
NATIVE = {type(KERNELS[LSTMCell.combine]): _NativeLSTM(), type(KERNELS[GRUCell.combine]): _NativeGRU(),
          type(KERNELS[RNNCell.combine]): _NativeRNN()}


# -- a user's cell with ``combine`` compiled (pointwise.py) -------------------------------------
#
# The generic kernel's work without autograd: per step the blocked recurrent matmul and one pass of
# the compiled ``combine``; back through time one pass of its derivative and ``dh += dz W_hh``.
# The states of every step are kept (the derivative recomputes the gates from them and hz).

def program_gates(cell: GatedCell) -> int:
    """The gate count ``pointwise_scan`` takes a user's cell's weights packed for: the cell's own where
    the blocked matmul has a register tile for it (3 or 4 gates: more rows' products share each load
    of ``x``), else 1. The (B, G*H) products come out the same either way."""
    return cell.num_gates if cell.num_gates in (3, 4) else 1


def _compiled_loop(compiled, x: Tensor, w_ih_packed, b_ih, w_hh, b_hh, state, mask, training: bool, *, packed_hh):
    """A cell's ``compiled`` combine over T steps in C++ (``pointwise_scan``): ``x`` is xz (B, T, G*H),
    or with ``w_ih_packed`` the input (B, T, I), projected per step; ``packed_hh``: ``w_hh`` (G*H, H)
    packed, both weights for ``program_gates(cell)`` gates. Returns the outputs (B, T, H), the final
    state's parts and, in training, what backward needs."""
    ops = native.ops()
    B, T = x.shape[0], x.shape[1]
    GH, H = w_hh.shape
    hs = [states_rows(s, T, training) for s in state]  # inference: step t's state in row t % 2
    out = native.buffer((B, T, H), x)
    hz = native.buffer((T, B, GH), x) if training else None
    masked = mask is not None
    m = mask.to(x.dtype).contiguous() if masked else None  # the programs' mask: a number per row
    fold = compiled.shared[masked]  # hz_t keeps xz_t + hz_t, and xz need not be kept
    ops.pointwise_scan(*compiled.forward[masked], x.contiguous(), w_ih_packed, b_ih, packed_hh, b_hh, GH, hs, out,
                       hz, m, fold)
    final = tuple(h[T % h.shape[0]] for h in hs)
    return out, final, ((None if fold else x, hz, hs, m) if training else None)


class _CompiledGeneric(_Kernel):
    """The generic kernel's twin for one cell's compiled programs (``pointwise.compiled``)."""

    def __init__(self, compiled: pointwise.Compiled):
        self.compiled = compiled

    def forward(self, cell, xz, w_hh, b_hh, state, mask, training):
        packed_hh = native.ops().pack_linear(w_hh, program_gates(cell))
        return _compiled_loop(self.compiled, xz, None, None, w_hh, b_hh, state, mask, training, packed_hh=packed_hh)

    def backward(self, cell, saved, w_hh, mask, grad_out, grad_state, needs):
        xz, hz, hs, m = saved  # xz None: hz holds xz + hz (folded)
        ops, masked, compiled = native.ops(), mask is not None, self.compiled  # the forward's programs
        T, B, GH = hz.shape
        dxz = native.buffer((B, T, GH), hz)
        dhz = None if compiled.shared[masked] else native.buffer(hz.shape, hz)  # else d hz = d xz
        d = [_grad_in(g, h[0]) for g, h in zip(grad_state, hs)]  # updated in place: the initial state's
        ops.pointwise_scan_backward(*compiled.backward[masked], xz, hz, hs, m, _grad_rows(grad_out),
                                    ops.pack_linear(w_hh.t()), d, dxz, dhz)
        if dhz is None:
            dw, db = _native_weight_grads(dxz, hs[0], needs)
        else:
            dw, db = _weight_grads(dhz, hs[0][:-1], needs["w"], needs["b"])
        return dxz, dw, db, tuple(d)


def _native_twin(kernel: _Kernel, cell, xz: Tensor) -> _Kernel:
    if xz.device.type != "cpu" or xz.dtype not in (torch.float32, torch.float64) or native.ops() is None:
        return kernel
    if kernel is GENERIC:
        programs = pointwise.compiled(cell)
        return _CompiledGeneric(programs) if programs is not None else kernel
    return NATIVE.get(type(kernel), kernel)


def kernel_for(cell) -> _Kernel | None:
    """The fused kernel for ``cell``, or ``None`` if it must run through ``scan_reference``.

    A cell qualifies when it customises only ``combine`` (the GatedCell contract); one that
    rewrites ``step``, ``split`` or a projection changes what a step means, and one with parameters
    of its own would get no gradient for them here, so both keep the reference loop.
    """
    if not only_combine_customised(cell):
        return None
    return KERNELS.get(type(cell).combine, GENERIC)


class FusedScan(torch.autograd.Function):
    """``scan`` of one cell over (B, T, G*H) with the backward through time written by hand."""

    @staticmethod
    def forward(ctx, kernel, cell, mask, xz, w_hh, b_hh, *state):
        with torch.autocast(xz.device.type, enabled=False):
            out, final, saved = kernel.forward(cell, xz, w_hh, b_hh, cell.State(*state), mask, True)
        ctx.kernel, ctx.cell, ctx.saved, ctx.mask = kernel, cell, saved, mask
        ctx.save_for_backward(w_hh)  # the kernels keep what else they need in ``saved``
        ctx.set_materialize_grads(False)  # every kernel takes None for an output no gradient reached
        return (out, *(s.clone() for s in final))

    @staticmethod
    def backward(ctx, grad_out, *grad_state):
        (w_hh,) = ctx.saved_tensors
        needs = {"w": ctx.needs_input_grad[4], "b": ctx.needs_input_grad[5]}
        with torch.autocast(w_hh.device.type, enabled=False):
            dxz, dw, db, dstate = ctx.kernel.backward(
                ctx.cell, ctx.saved, w_hh, ctx.mask, grad_out, grad_state, needs
            )
        return (None, None, None, dxz, dw, db, *dstate)


def _functorch_active() -> bool:
    active = getattr(torch._C, "_are_functorch_transforms_active", None)
    return bool(active and active())


def fused_scan(cell: GatedCell, xz: Tensor, state: NamedTuple, mask: Tensor | None, kernel: _Kernel | None = None):
    """``scan_reference``'s function through a fused kernel; ``None`` if the cell cannot use one."""
    kernel = kernel if kernel is not None else kernel_for(cell)
    if kernel is None or _functorch_active():
        return None
    w_hh, b_hh = cell.weight_hh, cell.bias_hh
    dtype = w_hh.dtype
    if xz.dtype != dtype:  # autocast: the input projection may arrive in half precision
        xz = xz.to(dtype)
    state = tuple(s.to(dtype) for s in state)
    kernel = _native_twin(kernel, cell, xz)
    if kernel is not GENERIC:  # the C++ loops read rows directly: dense buffers (a no-op when they are)
        xz, mask = xz.contiguous(), mask.contiguous() if mask is not None else None
    tensors = (xz, w_hh, b_hh, *state)
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors):
        out, *final = FusedScan.apply(kernel, cell, mask, xz, w_hh, b_hh, *state)
        return out, cell.State(*final)
    with torch.no_grad(), torch.autocast(xz.device.type, enabled=False):
        out, final, _ = kernel.forward(cell, xz, w_hh, b_hh, cell.State(*state), mask, False)
    return out, cell.State(*(s.clone() for s in final))  # clones: the states buffer is not kept alive


# -- routing whole built-in stacks to torch's own kernels ---------------------------------------

# a built-in cell's combine -> the torch._VF function that runs a whole stack of it
VENDOR = {
    LSTMCell.combine: lambda cell: torch._VF.lstm,
    GRUCell.combine: lambda cell: torch._VF.gru,
    RNNCell.combine: lambda cell: getattr(torch._VF, f"rnn_{cell.nonlinearity}"),
}


def _needs_grad(layer, x: Tensor, state: tuple | None) -> bool:
    tensors = [x, *layer.parameters(), *(state or ())]
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


_TORCH_ORDER = ("weight_ih", "weight_hh", "bias_ih", "bias_hh")  # torch._VF's per-layer weight order

PACKED_DEVICES = {"cuda"}  # where a stack with lengths goes to torch's packed-sequence kernel

# Where the C++ loops beat oneDNN's LSTM on the CPU (float32), measured against each other over
# batch 1-64, H 128 and 512, T 64 and 256 (alternated, 2 threads):
# - inference: everywhere, with the input projection inside the loop (``scan_projecting``): 1.04-2.06x
#   up to batch x hidden 1024, a draw beyond (0.97-1.06x at T=64);
# - training: a small step, batch x hidden <= NATIVE_LSTM_MAX_STATE (1.04-1.64x; at B x H = 2048 a
#   draw, 0.93-1.03x), and training whose gates (T x B x 4H floats) pass NATIVE_LSTM_MIN_TRAIN_GATES
#   (1.03-1.49x), where oneDNN's LSTM slows as its workspace leaves the cache. Below that, oneDNN
#   trains 5-14% faster and keeps it.
# Those were timed without the input's gradient, which oneDNN computes anyway. With it (stop 15,
# alternated pairs): the C++ loops 1.07-1.42x at the grid's points above these lines (1.07 at
# B=32, H=512, T=64), 0.83-0.91x at 32 and 64 x 128 x 64 below them, and a draw at 1 x 128 x 64
# (0.95-1.08x); the lines stay.
NATIVE_LSTM_MAX_STATE = 1024
NATIVE_LSTM_MIN_TRAIN_GATES = 2 << 20


def _native_lstm_is_faster(x: Tensor, hidden: int, training: bool) -> bool:
    """Whether an LSTM stack on (B, T, I) ``x`` runs faster on the C++ loops than on oneDNN (above)."""
    B, T = x.shape[0], x.shape[1]
    return not training or B * hidden <= NATIVE_LSTM_MAX_STATE or T * B * 4 * hidden > NATIVE_LSTM_MIN_TRAIN_GATES


def vendor_stack(layer, x: Tensor, state: tuple | None, lengths: Tensor | None):
    """A whole built-in stack through torch's own fused kernel where that is the fastest, or ``None``.

    ``state`` is the layer's checked state in torch's layout (its parts, each (num_layers*D, B, H))
    or ``None``; the result is the output and the final state's parts in the same layout.

    torch's kernels compute exactly these layers' functions (the parity tests hold them to the
    reference), so the choice is speed alone, as measured by ``python -m rnnkit.bench``:
    - LSTM: on CPU, torch.nn.LSTM runs on oneDNN's LSTM primitive (float32). The C++ loops take
      inference, small steps (batch x hidden <= ``NATIVE_LSTM_MAX_STATE``) and training with many
      gates (``NATIVE_LSTM_MIN_TRAIN_GATES``), where they measured faster; the rest of training
      stays on oneDNN (``_native_lstm_is_faster``). On CUDA it is cuDNN.
    - GRU and RNN: on CPU the C++ loops (native.cpp) beat torch for training and inference; only
      where they can't be built does inference go to torch (faster than the Python loops), and
      on CUDA, cuDNN always.
    ``lengths`` (B,), validated, or ``None``. With lengths, only CUDA routes (``PACKED_DEVICES``):
    cuDNN runs packed sequences natively, with the semantics the fused kernels' masks give
    (measured on an H100 at B=64, H=512, T=256, training: torch.nn's packed path 1.6-2.5x faster
    than the fused kernels' per-step loop; routed, rnnkit runs at 0.95-0.96x of it), where torch's
    CPU packed path is slow. Dropout in training
    (a different random stream), other dtypes and every other cell keep the fused kernels.
    """
    if lengths is not None and x.device.type not in PACKED_DEVICES:
        return None
    if (layer.training and layer.dropout > 0) or _functorch_active():
        return None
    cell = layer.cells[0]
    combine = type(cell).combine
    if combine not in VENDOR or any(kernel_for(c) is not KERNELS[combine] for c in layer.cells):
        return None
    lstm = combine is LSTMCell.combine
    if x.device.type == "cpu":
        if x.dtype != torch.float32 or torch.is_autocast_enabled("cpu"):
            return None
        if lstm and (not torch.backends.mkldnn.is_available() or (native.ops() is not None and _native_lstm_is_faster(
                x, layer.hidden_size, _needs_grad(layer, x, state)))):
            return None
        if not lstm and (_needs_grad(layer, x, state) or native.ops() is not None):
            return None  # the C++ loops beat torch's GRU and RNN; without them, only its inference does
    elif x.device.type != "cuda":
        return None
    params = [c._parameters for c in layer.cells]  # not attribute access: nn.Module's __getattr__ is slow
    weights = [p[name] for p in params for name in _TORCH_ORDER if p[name] is not None]
    dtype = weights[0].dtype
    if state is None:
        shape = (layer.num_layers * layer.num_directions, x.shape[0], layer.hidden_size)
        hx = tuple(torch.zeros(shape, dtype=dtype, device=x.device) for _ in cell.State._fields)
    else:
        hx = tuple(part.to(dtype) for part in state)
    args = (weights, layer.bias, layer.num_layers, 0.0, layer.training, layer.bidirectional)
    run = VENDOR[combine](cell)

    def call():
        if lengths is None:
            out, *final = run(x.to(dtype), hx if lstm else hx[0], *args, True)  # batch_first
            return out, tuple(final)
        # packed: sequences sorted by length inside, the states permuted to match and back
        packed = pack_padded_sequence(x.to(dtype), lengths.cpu(), batch_first=True, enforce_sorted=False)
        order = tuple(h.index_select(1, packed.sorted_indices) for h in hx)
        data, *final = run(packed.data, packed.batch_sizes, order if lstm else order[0], *args)
        out, _ = pad_packed_sequence(packed._replace(data=data), batch_first=True, total_length=x.shape[1])
        return out, tuple(f.index_select(1, packed.unsorted_indices) for f in final)

    if x.device.type == "cpu":  # autocast is off here (checked above)
        return call()
    # Under float16 autocast, torch's cast for cuDNN's RNN takes the input, the state and the
    # weights to float16, as for torch.nn's layers: the same computation, so the same numbers, and
    # 2.4x faster than a float32 recurrence (LSTM training, B=64, H=512, T=256, H100: 5.6 against
    # 13.3 ms). That cast picks float16 under bf16 autocast too, where no GradScaler guards
    # float16's range (the trainer keeps one for fp16 only): there the recurrence runs in the
    # weights' dtype, as the fused kernels' does.
    half = torch.is_autocast_enabled(x.device.type) and torch.get_autocast_dtype(x.device.type) == torch.float16
    with torch.autocast(x.device.type, enabled=half), warnings.catch_warnings():
        # cuDNN warns that our per-cell weights are not one contiguous block and compacts them on
        # each call (a known cost, in the README); its advice, flatten_parameters(), is torch.nn's
        warnings.filterwarnings("ignore", message="RNN module weights are not part of single contiguous")
        out, final = call()
    # the final state, float16 under autocast, in the weights' dtype: the next call's state has it
    return out, tuple(f.to(dtype) for f in final)
