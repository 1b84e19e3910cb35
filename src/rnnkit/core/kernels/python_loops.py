"""The built-in cells' loops over time in Python (torch ops): LSTM, GRU and RNN, forward and backward.

Forward, per step ``t`` (time-major buffers, preallocated, written in place)::

    z_t = xz_t + h_{t-1} W_hh^T + b_hh          one addmm
    h_t, state_t = pointwise(z_t, state_{t-1})   a handful of fused in-place ops

Backward, per step, only the recurrent ``dz_t W_hh`` and a few pointwise ops: every factor of the
pointwise derivative that does not depend on the incoming gradient (``sigmoid'``, ``tanh'``, ...)
is computed for all steps at once before the loop. The weight gradients are then one matmul over
all steps (``base.weight_grads``)::

    dW_hh = dz^T @ h_prev      (G*H, T*B) @ (T*B, H)
    db_hh = sum over (t, b) of dz

Gate math: LSTM ``i, f, g, o`` (held internally as ``i, f, o, g``, see ``_ifog``); GRU ``r, z, n``
with torch's ``n = tanh(x_n + r * (h W_hn + b_hn))``; RNN tanh or relu. These run where the C++
loops (``cpp_loops.py``) do not: off the CPU, in other dtypes, or where they cannot be built; the
tests hold both to the reference loop.

Masks (B, T) follow ``scan_reference`` exactly: where ``mask`` is False a sequence's state is
carried unchanged and its output is zero; backward multiplies the precomputed factors by the mask
(no gradient into that step's gates) and lets the state's gradient pass through.
"""

from __future__ import annotations

import torch
from torch import Tensor

from rnnkit.core.kernels.base import Kernel, batch_major, grad_out_time_major, mask_parts, time_major, weight_grads

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
    for dst, src in (
        (slice(0, 2 * H), slice(0, 2 * H)),
        (slice(2 * H, 3 * H), slice(3 * H, 4 * H)),
        (slice(3 * H, 4 * H), slice(2 * H, 3 * H)),
    ):
        if b_hh is None:
            z[..., dst].copy_(xt[..., src])
        else:
            torch.add(xt[..., src], b_hh[src], out=z[..., dst])
    w_t = _ifog(w_hh).t()  # (H, 4H)
    m, _ = mask_parts(mask, z.dtype)
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
    m, mf = mask_parts(mask, z.dtype)
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
    if m is not None and mf is not None:  # mask_parts gives both or neither
        dz.view(T, B, 4 * H).mul_(mf)
        A.mul_(mf)
        f_carry = torch.where(m, f, torch.ones((), dtype=f.dtype, device=f.device))
        not_m = 1 - mf
    gout = grad_out_time_major(grad_out, c, mf)
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
    dw, db = weight_grads(dz, hs[:-1], needs["w"], needs["b"])
    return dz.transpose(0, 1), dw, db, (dh, dc)


# -- GRU -------------------------------------------------------------------------------------


def gru_forward(xz, w_hh, b_hh, h0, mask, training: bool):
    """GRU over time in torch's convention ``n = tanh(x_n + r * (h W_hn + b_hn))``."""
    T, B = xz.shape[1], xz.shape[0]
    H = h0.shape[-1]
    x = time_major(xz, None)  # (T, B, 3H), becomes the activated gates r, z, n in place
    w_t = w_hh.t()
    m, _ = mask_parts(mask, x.dtype)
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
    m, mf = mask_parts(mask, x.dtype)
    r, z, n = x[..., :H], x[..., H : 2 * H], x[..., 2 * H :]
    h_prev = hs[:-1]
    # d xz_t = dh_t * P_t and d hz_t = dh_t * Q_t (Q = P with the n part times r)
    P = torch.empty_like(x)
    P3 = P.view(T, B, 3, H)
    dn_pre = torch.mul(1 - z, 1 - n * n, out=P3[:, :, 2])
    torch.mul(dn_pre * hzn, r - r * r, out=P3[:, :, 0])
    torch.mul(h_prev - n, z - z * z, out=P3[:, :, 1])
    z_carry = z
    if m is not None and mf is not None:  # mask_parts gives both or neither
        P.mul_(mf)
        z_carry = torch.where(m, z, torch.ones((), dtype=z.dtype, device=z.device))
    Q = P.clone()
    Q.view(T, B, 3, H)[:, :, 2].mul_(r)
    gout = grad_out_time_major(grad_out, h_prev, mf)
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
    dw, db = weight_grads(Q, h_prev, needs["w"], needs["b"])
    return P.transpose(0, 1), dw, db, (dh,)


# -- Elman RNN -------------------------------------------------------------------------------


def rnn_forward(xz, w_hh, b_hh, h0, mask, training: bool, relu: bool):
    T, B = xz.shape[1], xz.shape[0]
    H = h0.shape[-1]
    x = time_major(xz, b_hh)  # (T, B, H)
    w_t = w_hh.t()
    m, _ = mask_parts(mask, x.dtype)
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
    _, mf = mask_parts(mask, hs.dtype)
    h = hs[1:]  # at valid steps the activation itself; padded steps are zeroed by the mask
    P = (h > 0).to(h.dtype) if relu else 1 - h * h
    if mf is not None:
        P.mul_(mf)
        not_m = 1 - mf
    gout = grad_out_time_major(grad_out, h, mf)
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
    dw, db = weight_grads(P, hs[:-1], needs["w"], needs["b"])
    return P.transpose(0, 1), dw, db, (dh,)


# -- the three as kernels -----------------------------------------------------------------


class PythonLSTM(Kernel):
    def forward(self, cell, xz, w_hh, b_hh, state, mask, training):
        return batch_major(lstm_forward(xz, w_hh, b_hh, state[0], state[1], mask, training))

    def backward(self, cell, saved, w_hh, mask, grad_out, grad_state, needs):
        return lstm_backward(saved, w_hh, mask, grad_out, grad_state[0], grad_state[1], needs)


class PythonGRU(Kernel):
    def forward(self, cell, xz, w_hh, b_hh, state, mask, training):
        return batch_major(gru_forward(xz, w_hh, b_hh, state[0], mask, training))

    def backward(self, cell, saved, w_hh, mask, grad_out, grad_state, needs):
        return gru_backward(saved, w_hh, mask, grad_out, grad_state[0], needs)


class PythonRNN(Kernel):
    def forward(self, cell, xz, w_hh, b_hh, state, mask, training):
        return batch_major(rnn_forward(xz, w_hh, b_hh, state[0], mask, training, cell.nonlinearity == "relu"))

    def backward(self, cell, saved, w_hh, mask, grad_out, grad_state, needs):
        return rnn_backward(saved, w_hh, mask, grad_out, grad_state[0], needs, cell.nonlinearity == "relu")
