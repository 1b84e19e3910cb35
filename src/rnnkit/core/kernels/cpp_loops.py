"""The built-in cells' loops over time in C++ (native.cpp), and the loops that project their input.

The same functions as the Python loops (``python_loops.py``), on the CPU in float32 and float64
where ``native.ops()`` is built. Their buffers are batch-major like the layer's (no transposes),
the states time-major; the C++ backward computes every gate derivative from the saved activations
inside the loop and runs its own recurrent matmul, split across threads by blocks of hidden units,
each block's gate math right after its product, so the only work here is allocation and the
batched weight gradients.

``Projection`` is the input projection of all steps into a workspace buffer (training, and the
GRU's and RNN's inference). In inference the LSTM and a user's compiled cell project their input
inside the loop instead (``projecting_loop``, on ``loop_weights``).
"""

from __future__ import annotations

import torch
from torch import Tensor

from rnnkit.core import native
from rnnkit.core.cells.gru import GRUCell
from rnnkit.core.cells.rnn import RNNCell
from rnnkit.core.gates import GatedCell
from rnnkit.core.kernels.base import (
    Kernel,
    backward_noise,
    dropped_states,
    flat_rows,
    grad_in,
    grad_rows,
    native_loop,
    native_weight_grads,
    noise_args,
    prev_states_rows,
    rows_buffer,
    states_rows,
    time_major_rows,
)
from rnnkit.core.kernels.compiled import compiled_loop, program_gates


class Projection(torch.autograd.Function):
    """``x W^T + b`` for all steps, (B, T, I) -> (B, T, G*H), written into a workspace buffer (F.linear
    would take a fresh block on every call), in x's layout: a time-major ``x`` (``time_major_rows``)
    gives a time-major projection, with no copy of either. Backward is F.linear's: ``dx = g W``,
    ``dW = g^T x``, ``db = sum g``, with ``dx`` in the workspace too, in x's layout."""

    @staticmethod
    def forward(ctx, x, w, b):
        flat = flat_rows(x)  # (B*T, I), a view where x is batch-major or time-major
        out = rows_buffer(x, w.shape[0])  # (B, T, G*H) in x's layout
        if b is None:
            torch.mm(flat, w.t(), out=flat_rows(out))
        else:
            torch.addmm(b, flat, w.t(), out=flat_rows(out))
        ctx.save_for_backward(x, w)  # x, not its reshape: a double backward needs the graph to x
        ctx.has_bias = b is not None
        return out

    @staticmethod
    def backward(ctx, grad):
        x, w = ctx.saved_tensors
        time_major = time_major_rows(x)
        flat = flat_rows(x)
        g = (grad.transpose(0, 1) if time_major else grad).reshape(-1, grad.shape[-1])  # rows in flat's order
        dx = dw = db = None
        # into the workspace, except where this backward is itself differentiated (create_graph)
        # or batched by vmap, neither of which takes out=
        plain = (
            not torch.is_grad_enabled()
            and not torch._C._functorch.is_legacy_batchedtensor(g)
            and not torch._C._functorch.is_batchedtensor(g)
        )
        if ctx.needs_input_grad[0]:
            dx = torch.mm(g, w, out=flat_rows(rows_buffer(x, x.shape[-1]))) if plain else torch.mm(g, w)
            B, T, I = x.shape
            dx = dx.view(T, B, I).transpose(0, 1) if time_major else dx.view(B, T, I)
        if ctx.needs_input_grad[1]:
            dw = g.t().mm(flat)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            db = g.sum(0)
        return dx, dw, db


# -- inference with the input projected inside the loop ----------------------------------------


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
    Returns the outputs (B, T, H), in x's layout (batch-major or time-major, read and written in
    place), and the final state's parts, views of buffers that a later call may reuse (copy what is
    kept)."""
    w_ih, w_hh = weights
    if programs is not None:
        out, final, _ = compiled_loop(
            programs, x, w_ih, cell.bias_ih, cell.weight_hh, cell.bias_hh, state, mask, False, packed_hh=w_hh
        )
        return out, final
    T = x.shape[1]
    hs, cs = states_rows(state[0], T, False), states_rows(state[1], T, False)
    if not (x.is_contiguous() or time_major_rows(x)):
        x = x.contiguous()
    out = rows_buffer(x, cell.hidden_size)  # (B, T, H) in x's layout
    native.ops().lstm_forward_projecting(
        x,
        w_ih,
        cell.bias_ih,
        w_hh,
        cell.bias_hh,
        hs,
        cs,
        out,
        mask.contiguous() if mask is not None else None,
    )
    return out, (hs[T % 2], cs[T % 2])


# -- the built-in cells' loops as kernels ------------------------------------------------------


class CppLSTM(Kernel):
    time_major_ok = True  # every per-step buffer in xz's layout (rows_buffer); batch-major with noise

    def forward(self, cell, xz, w_hh, b_hh, state, mask, training, noise=None):
        T, G4 = xz.shape[1], xz.shape[2]
        hs, cs = states_rows(state[0], T, training), states_rows(state[1], T, training)
        out = rows_buffer(xz, G4 // 4)
        gates = rows_buffer(xz, G4) if training else None
        extra = noise_args(noise, hs[0])
        native_loop("lstm_forward", xz, native.ops().pack_linear(w_hh, 4), b_hh, hs, cs, out, gates, mask, noise=extra)
        last = T % hs.shape[0]
        return out, (hs[last], cs[last]), (gates, hs, cs, *backward_noise(extra))

    def backward(self, cell, saved, w_hh, mask, grad_out, grad_state, needs):
        gates, hs, cs, *noise = saved
        extra = noise[0] if noise else {}
        dh, dc = grad_in(grad_state[0], hs[0]), grad_in(grad_state[1], cs[0])
        dxz = rows_buffer(gates, gates.shape[-1])
        native_loop("lstm_backward", gates, cs, grad_rows(grad_out), w_hh, dh, dc, dxz, mask, noise=extra)
        dw, db = native_weight_grads(dxz, hs, needs, extra.get("r"))
        return dxz, dw, db, (dh, dc)


class CppGRU(Kernel):
    time_major_ok = True

    def forward(self, cell, xz, w_hh, b_hh, state, mask, training, noise=None):
        T, G3 = xz.shape[1], xz.shape[2]
        hs = states_rows(state[0], T, training)
        out = rows_buffer(xz, G3 // 3)
        gates, hzn = (rows_buffer(xz, G3), rows_buffer(xz, G3 // 3)) if training else (None, None)
        extra = noise_args(noise, hs[0])
        native_loop("gru_forward", xz, native.ops().pack_linear(w_hh, 3), b_hh, hs, out, gates, hzn, mask, noise=extra)
        return out, (hs[T % hs.shape[0]],), (gates, hzn, hs, *backward_noise(extra))

    def backward(self, cell, saved, w_hh, mask, grad_out, grad_state, needs):
        gates, hzn, hs, *noise = saved
        extra = noise[0] if noise else {}
        dh = grad_in(grad_state[0], hs[0])
        dxz, dhn = (
            rows_buffer(gates, gates.shape[-1]),
            rows_buffer(gates, hzn.shape[-1]),
        )  # d hz's r, z parts are d xz's; its n part
        native_loop("gru_backward", gates, hzn, hs, grad_rows(grad_out), w_hh, dh, dxz, dhn, mask, noise=extra)
        H = hzn.shape[-1]
        rz, dn = flat_rows(dxz)[:, : 2 * H], flat_rows(dhn)  # views, rows in the same order
        dw = None
        if needs["w"]:
            r = extra.get("r")  # recurrent dropout: the product read h_{t-1} r (batch-major buffers)
            h_prev = prev_states_rows(hs, dxz) if r is None else dropped_states(hs, r)
            dw = torch.cat((rz.t().mm(h_prev), dn.t().mm(h_prev)))
        db = torch.cat((rz.sum(0), dn.sum(0))) if needs["b"] else None
        return dxz, dw, db, (dh,)


class CppRNN(Kernel):
    time_major_ok = True

    def forward(self, cell, xz, w_hh, b_hh, state, mask, training, noise=None):
        T = xz.shape[1]
        hs = states_rows(state[0], T, training)
        out = rows_buffer(xz, xz.shape[-1])
        extra = noise_args(noise, hs[0])
        relu = cell.nonlinearity == "relu"
        native_loop("rnn_forward", xz, native.ops().pack_linear(w_hh, 1), b_hh, hs, out, mask, relu, noise=extra)
        return out, (hs[T % hs.shape[0]],), (hs, time_major_rows(xz), *backward_noise(extra))

    def backward(self, cell, saved, w_hh, mask, grad_out, grad_state, needs):
        hs, time_major, *noise = saved
        extra = noise[0] if noise else {}
        dh = grad_in(grad_state[0], hs[0])
        T, B, H = hs.shape[0] - 1, hs.shape[1], hs.shape[2]
        dxz = native.buffer((T, B, H), hs).transpose(0, 1) if time_major else native.buffer((B, T, H), hs)
        relu = cell.nonlinearity == "relu"
        native_loop("rnn_backward", hs, grad_rows(grad_out), w_hh, dh, dxz, mask, relu, noise=extra)
        dw, db = native_weight_grads(dxz, hs, needs, extra.get("r"))
        return dxz, dw, db, (dh,)
