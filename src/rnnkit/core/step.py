"""The lean stepping path: one time step of a whole layer stack with a carried state, no autograd.

Generating text runs a model one token at a time, ``T = 1`` with the state of the previous
call. At batch 1 every step is a handful of matrix-vector products, so what costs is overhead:
validation, autograd bookkeeping, Python. ``step_layers`` is what the routing table
(core/routing.py) sends a call to when gradients are off, ``T == 1`` and a state is carried. Per
(layer, direction):

- ``step-matmul`` (every such call): the products on the weights as stored. On the CPU the LSTM
  and the GRU are one C++ call each (``lstm_step_rows``, ``gru_step_rows``: ``W_ih x + b_ih``,
  ``W_hh h + b_hh`` and the gate math; the products through the matrix-vector kernels at batch 1,
  torch's matmul at other batches); the RNN and a user's cell take their two products from the C++
  matrix-vector kernels at batch 1 (``linear_rows``), then the gate math in torch ops (a user's
  cell: its ``combine`` as written); elsewhere torch's matmul on the weights transposed in place
  (no copy).
- ``step-loops`` (only where forced, to compare): the kernels' C++ loop with T = 1 (``_loop_step``)
  on the weights packed for its blocked matmul at each call.

Nothing is packed or cached: every step reads the parameters as they are at that call, as
torch.nn's own kernels do (its flat weights are the parameters). A weight changed by any means (an
optimizer step, ``load_state_dict``, an in-place write under ``torch.no_grad()`` or through
``.data``, a new Parameter, ``torch.nn.utils.parametrize``, weight norm) is what the next step
computes with. Packing once and caching (keyed on the weights' version counters) measured at most
1.1-1.3x faster at 3 x 512 and batch 8-64, and could not see a write through ``.data``, which
bypasses the version counter; at batch 1 the kernels on the weights as stored are as fast as the
blocked ones on packed weights (core/routing.py has the measurements).

Anything unusual (a wrong shape, dtype or device, lengths, a cell with its own ``step``) is not
routed here (``routing.lean_step``) but to the general route, which validates and names the problem.

>>> import torch, rnnkit
>>> lstm = rnnkit.LSTM(4, 8, num_layers=2, batch_first=True).eval()
>>> _, state = lstm(torch.randn(1, 5, 4))
>>> with torch.inference_mode():
...     out, state = lstm(torch.randn(1, 1, 4), state)   # the lean path
>>> tuple(out.shape), tuple(state.h.shape)
((1, 1, 8), (2, 1, 8))
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.nn import functional as F

from rnnkit.core import native, pointwise
from rnnkit.core.cells.gru import GRUCell
from rnnkit.core.cells.lstm import LSTMCell
from rnnkit.core.cells.rnn import RNNCell
from rnnkit.core.kernels.base import states_rows
from rnnkit.core.kernels.cpp_loops import loop_weights, projecting_loop


def weights(cells) -> list[Tensor]:
    """The cells' parameters, read from ``_parameters`` (``nn.Module.parameters()`` costs tens of
    microseconds a call, as much as a small step); the routing table checks they are the stacked weights."""
    return [p for c in cells for p in c._parameters.values() if p is not None]


def _key(weights) -> tuple:
    """Each weight's identity, storage and version counter: what a step captured as a CUDA graph
    (core/cuda_graphs.py) is re-captured on. The graph reads the weights in place, so a change that
    leaves the key as it is (a write through ``.data``) is seen at its next replay too."""
    return tuple((id(p), p.data_ptr(), p._version) for p in weights)


# At batch 1 on the CPU a step's matmuls go to the C++ matrix-vector kernels (native.cpp), whose
# fixed cost per call is far below a BLAS call's, for matrices up to this size. Measured on the
# development machine, 2 threads, x W^T+b at batch 1 (C++ vs torch): 1 MB 11 vs 32 us, 8 MB 64 vs
# 256 us, 32 MB 0.79 vs 1.54 ms; at 64 MB the transposed form lost (3.7 vs 2.9 ms).
NATIVE_MAX_BYTES = 32 << 20


def _native_for(x: Tensor, w: Tensor):
    if x.shape[0] != 1 or w.numel() * w.element_size() > NATIVE_MAX_BYTES:
        return None
    if not (w.is_contiguous() and x.is_contiguous()):
        return None
    return native.ops_for(x)


def _linear(x: Tensor, w: Tensor, b: Tensor | None) -> Tensor:
    """``x w^T + b`` for a weight ``w`` (N, K) as stored."""
    ops = _native_for(x, w)
    return ops.linear_rows(w, x, b) if ops is not None else F.linear(x, w, b)


def _project(x: Tensor, h: Tensor, cell) -> Tensor:
    """``x W_ih^T + b_ih + h W_hh^T + b_hh`` (B, G*H) on the cell's weights as stored."""
    params = cell._parameters  # not attribute access: nn.Module's __getattr__ is slow
    z = _linear(x, params["weight_ih"], params["bias_ih"])
    if _native_for(h, params["weight_hh"]) is not None:
        return z.add_(_linear(h, params["weight_hh"], params["bias_hh"]))
    z.addmm_(h, params["weight_hh"].t())
    return z if params["bias_hh"] is None else z.add_(params["bias_hh"])


# -- step-loops: the kernels' C++ loops at T = 1 -------------------------------------------------


def _loop_step(cell, x, ins, outs, ops) -> Tensor | None:
    """One step of a batch ``x`` (B, I) through the C++ loops of the fused kernels (T = 1, inference),
    on the cell's weights packed for them now (``loop_weights``), the new state copied into ``outs``;
    ``None`` for a user's cell whose ``combine`` does not compile, which the caller then steps as
    written."""
    B, H = x.shape[0], cell.hidden_size
    combine = type(cell).combine
    x = x.contiguous()
    params = cell._parameters
    if combine in (GRUCell.combine, RNNCell.combine):  # the input projected first, by one matmul
        p_ih, p_hh = loop_weights(cell)
        GH = params["weight_ih"].shape[0]
        xz = ops.linear_packed(x, p_ih, GH, params["bias_ih"]).view(B, 1, GH)
        states = [states_rows(part, 1, False) for part in ins]  # the old state in row 0, the new one to row 1
        out = torch.empty(B, 1, H, dtype=x.dtype)
        if combine is GRUCell.combine:
            ops.gru_forward(xz, p_hh, params["bias_hh"], *states, out, None, None, None)
        else:
            ops.rnn_forward(xz, p_hh, params["bias_hh"], *states, out, None, cell.nonlinearity == "relu")
        final = [rows[1] for rows in states]
    else:  # the LSTM, or a user's compiled cell: the loop projects its input itself
        programs = None
        if combine is not LSTMCell.combine:
            programs = pointwise.compiled(cell)
            if programs is None:
                return None
        out, final = projecting_loop(cell, x.view(B, 1, -1), loop_weights(cell), ins, None, programs)
    for part, new in zip(outs, final):
        part.copy_(new)
    return out.view(B, H)


# Each stepper: (cell, x (B, I), state parts in, state parts out) -> h (B, H), writing the new state
# parts into the `out` tensors; the weights read from the cell at the call.
def _step_ops(x: Tensor, h: Tensor, params, *more: Tensor):
    """The C++ ops for a whole step of a built-in cell in one call (``lstm_step_rows``,
    ``gru_step_rows``: the two products and the gate math), where they take these operands: dense,
    on the CPU where the loops are built; at batch 1 the weights up to ``NATIVE_MAX_BYTES`` (the
    matrix-vector kernels), at other batches any (torch's matmul inside, one call instead of a
    handful of torch ops for the gate math)."""
    w_ih, w_hh = params["weight_ih"], params["weight_hh"]
    if x.shape[0] == 1 and max(w_ih.numel(), w_hh.numel()) * w_ih.element_size() > NATIVE_MAX_BYTES:
        return None
    if not (x.is_contiguous() and h.is_contiguous() and w_ih.is_contiguous() and w_hh.is_contiguous()):
        return None
    if not all(t.is_contiguous() for t in more):
        return None
    return native.ops_for(x)


def _lstm(cell, x, ins, outs):
    (h, c), (h_out, c_out) = ins, outs
    params = cell._parameters
    ops = _step_ops(x, h, params, c, h_out, c_out)
    if ops is not None:  # the two products and the gate math in one C++ call (native.cpp)
        ops.lstm_step_rows(
            x, h, c, params["weight_ih"], params["bias_ih"], params["weight_hh"], params["bias_hh"], h_out, c_out
        )
        return h_out
    H = h.shape[-1]
    z = _project(x, h, cell)  # (B, 4H) in torch's i, f, g, o order
    z[:, : 2 * H].sigmoid_()
    z[:, 3 * H :].sigmoid_()
    g = z[:, 2 * H : 3 * H].tanh_()
    torch.mul(z[:, H : 2 * H], c, out=c_out)
    c_out.addcmul_(z[:, :H], g)
    return torch.mul(z[:, 3 * H :], torch.tanh(c_out), out=h_out)


def _rnn(cell, x, ins, outs):
    (h,), (h_out,) = ins, outs
    z = _project(x, h, cell)
    return torch.clamp(z, min=0, out=h_out) if cell.nonlinearity == "relu" else torch.tanh(z, out=h_out)


def _gru(cell, x, ins, outs):
    (h,), (h_out,) = ins, outs
    H = h.shape[-1]
    params = cell._parameters
    ops = _step_ops(x, h, params, h_out)
    if ops is not None:  # the two products and the gate math in one C++ call (native.cpp)
        ops.gru_step_rows(x, h, params["weight_ih"], params["bias_ih"], params["weight_hh"], params["bias_hh"], h_out)
        return h_out
    zx = _linear(x, params["weight_ih"], params["bias_ih"])  # (B, 3H)
    zh = _linear(h, params["weight_hh"], params["bias_hh"])
    rz = zx[:, : 2 * H].add_(zh[:, : 2 * H]).sigmoid_()
    n = zx[:, 2 * H :].addcmul_(rz[:, :H], zh[:, 2 * H :]).tanh_()
    return torch.lerp(n, h, rz[:, H:], out=h_out)  # n + z * (h - n)


def _generic(cell, x, ins, outs):
    """Any other gated cell (``combine`` its only change, as ``step_layers`` checks): GatedCell's own
    ``step`` with both projections through ``_linear``, the new state copied into place."""
    state = cell.State(*ins)
    params = cell._parameters
    xz = _linear(x, params["weight_ih"], params["bias_ih"])
    hz = _linear(state.h, params["weight_hh"], params["bias_hh"])
    h, state = cell.combine(cell.split(xz), cell.split(hz), state)
    for out, part in zip(outs, state):
        out.copy_(part)
    return h


# a cell's combine -> its stepper; cells not listed take _generic
STEPPERS = {LSTMCell.combine: _lstm, RNNCell.combine: _rnn, GRUCell.combine: _gru}


def step_layers(layer, x: Tensor, state, loops: bool) -> tuple:
    """One step of ``layer`` (a ``Recurrent``, or a torch.nn-contract layer's bound cells) from
    ``state``: the output (B, 1, D*H) (or (1, B, D*H)) and the new state. ``loops``: through the C++
    loops (``step-loops``), else the steppers (``step-matmul``). The routing table has checked the
    call (``routing.lean_step``)."""
    cells = layer.cells
    if not isinstance(cells, list):
        cells = list(cells)
    batch_first = layer.batch_first
    B = x.shape[0] if batch_first else x.shape[1]
    inp = x.view(B, -1) if x.is_contiguous() else x.reshape(B, -1)
    parts = (state,) if isinstance(state, Tensor) else tuple(state)
    ops = native.ops() if loops else None
    new = [torch.empty_like(p) for p in parts]  # (rows, B, H) each, written row by row
    D = 2 if layer.bidirectional else 1
    dropout = layer.dropout if layer.training else 0.0
    for k in range(layer.num_layers):
        if k > 0 and dropout > 0:
            inp = F.dropout(inp, dropout, training=True)
        halves = []
        for d in range(D):
            row = k * D + d
            cell, state_in, state_out = cells[row], [p[row] for p in parts], [p[row] for p in new]
            h = _loop_step(cell, inp, state_in, state_out, ops) if ops is not None else None
            if h is None:  # no loops here; or (loops given) a user's cell whose combine did not compile
                h = STEPPERS.get(type(cell).combine, _generic)(cell, inp, state_in, state_out)
            halves.append(h)
        inp = halves[0] if D == 1 else torch.cat(halves, dim=1)  # (B, D*H)
    output = inp.unsqueeze(1) if batch_first else inp.unsqueeze(0)
    return output, (new[0] if len(new) == 1 else layer.State(*new))
