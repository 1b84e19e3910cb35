"""The lean stepping path: one time step of a whole layer stack with a carried state, no autograd.

Generating text runs a model one token at a time, ``T = 1`` with the state of the previous
call. At batch 1 every step is a handful of matrix-vector products, so what costs is overhead:
validation, re-packing weights, autograd bookkeeping, Python. ``step_layers`` is what
the routing table (core/routing.py) sends a call to when gradients are off, ``T == 1`` and a state
is carried (the routes ``step-loops`` and ``step-rows``). Per (layer, direction):

- ``step-loops``: on the CPU in float32/float64, where the C++ loops are built, one call of the
  kernels' C++ loop with T = 1 (``_loop_step``), on weights packed once for it and cached: the
  LSTM's loop projects its input itself, the GRU and the RNN take theirs from one blocked matmul,
  a user's cell whose ``combine`` compiles (core/pointwise.py) runs its program. The blocked
  product with the gate math right after it, in one pass of the threads, beats a BLAS call followed
  by torch's pointwise ops at every batch for the LSTM and the GRU; at batch 1 the RNN (one product
  and a tanh) and a small user's cell (whose program lookup costs about 11 us) keep the route below;
- ``step-rows``: one matmul over the concatenation ``[x, h]`` against ``[W_ih, W_hh]`` packed once and
  cached (GRU: two, since its reset gate acts on ``h W_hn + b_hn`` alone; a user's cell: two, then
  its ``combine`` as written), at batch 1 on the CPU through the C++ matrix-vector kernels
  (``native.cpp``), then the pointwise gate math in place.

The cache is keyed on every parameter's identity, storage and version counter, so an optimizer
step, ``load_state_dict``, ``.to()`` or any in-place change under ``torch.no_grad()`` repacks it on
the next call. A change written through ``.data`` bypasses the version counter (as it bypasses
autograd's own checks) and is not seen: update weights in place under ``torch.no_grad()``, as
torch.optim does.

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

from typing import Any

import torch
from torch import Tensor
from torch.nn import functional as F

from rnnkit.core import native, pointwise
from rnnkit.core.cells.gru import GRUCell
from rnnkit.core.cells.lstm import LSTMCell
from rnnkit.core.cells.rnn import RNNCell
from rnnkit.core.gates import GatedCell
from rnnkit.core.kernels.base import states_rows
from rnnkit.core.kernels.cpp_loops import loop_weights, projecting_loop

CACHE_ATTR = "_rnnkit_step_cache"


def weights(cells) -> list[Tensor]:
    """The cells' parameters, read from ``_parameters`` (``nn.Module.parameters()`` costs tens of
    microseconds a call, as much as a small step); the routing table checks they are the stacked weights."""
    return [p for c in cells for p in c._parameters.values() if p is not None]


def _key(weights) -> tuple:
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


def _times(x: Tensor, wt: Tensor, b: Tensor | None) -> Tensor:
    """``x wt + b`` for a packed, transposed weight ``wt`` (K, N)."""
    ops = _native_for(x, wt)
    if ops is not None:
        return ops.rows_times(x, wt, b)
    return torch.addmm(b, x, wt) if b is not None else x.mm(wt)


def _pack(cell: GatedCell) -> tuple[Tensor, Tensor | None]:
    """``[W_ih, W_hh]^T`` (I+H, G*H) and ``b_ih + b_hh``; LSTM gates in ``i, f, o, g`` order."""
    w = torch.cat((cell.weight_ih, cell.weight_hh), dim=1)
    b = cell.bias_ih + cell.bias_hh if cell.bias_ih is not None else None
    if isinstance(cell, LSTMCell):
        H = cell.hidden_size
        order = torch.cat((torch.arange(2 * H), torch.arange(3 * H, 4 * H), torch.arange(2 * H, 3 * H)))
        order = order.to(w.device)
        w = w.index_select(0, order)
        b = b.index_select(0, order) if b is not None else None
    return w.t().contiguous(), b


def _packed(layer, cells, weights, loops) -> list:
    """Per cell, its packed weights: for ``_loop_step`` (``loops`` the native ops) or for its stepper.

    Made on first use and kept until a weight changes. The key is each weight's identity, storage
    and version counter; the cache also holds an alias of each weight, so that while it lives no
    new weight can take a freed one's address and pass for it. The loops' packs are copied out of
    the workspace, whose blocks round a large one up to 2 MiB. A layer made under
    ``torch.inference_mode()`` has weights without a version counter: its packs are made per call."""
    if any(p.is_inference() for p in weights):
        return _pack_all(cells, loops)
    key = _key(weights)
    cache: tuple[Any, list[Tensor], dict[str, Any]] | None = getattr(layer, CACHE_ATTR, None)
    if cache is None or cache[0] != key:
        cache = (key, [p.detach() for p in weights], {})
        object.__setattr__(layer, CACHE_ATTR, cache)  # a plain attribute: not a parameter, not pickled
    which = "loops" if loops is not None else "rows"
    if which not in cache[2]:
        cache[2][which] = _pack_all(cells, loops)
    return cache[2][which]


def _pack_all(cells, loops) -> list:
    with torch.no_grad():
        if loops is not None:
            return [tuple(w.clone() for w in loop_weights(c)) for c in cells]
        return [_pack(c) if STEPPERS.get(type(c).combine, _GENERIC)[0] else None for c in cells]


# -- step-loops: the kernels' C++ loops at T = 1 -------------------------------------------------


def _loop_step(cell, x, ins, pack, outs, ops) -> Tensor | None:
    """One step of a batch ``x`` (B, I) through the C++ loops of the fused kernels (T = 1, inference),
    on ``pack`` (``loop_weights(cell)``), the new state copied into ``outs``; ``None`` for a
    user's cell whose ``combine`` does not compile, which the caller then steps as written."""
    B, H = x.shape[0], cell.hidden_size
    combine = type(cell).combine
    x = x.contiguous()
    if combine in (GRUCell.combine, RNNCell.combine):  # the input projected first, by one matmul
        (p_ih, p_hh), GH = pack, cell.weight_ih.shape[0]
        xz = ops.linear_packed(x, p_ih, GH, cell.bias_ih).view(B, 1, GH)
        states = [states_rows(part, 1, False) for part in ins]  # the old state in row 0, the new one to row 1
        out = torch.empty(B, 1, H, dtype=x.dtype)
        if combine is GRUCell.combine:
            ops.gru_forward(xz, p_hh, cell.bias_hh, *states, out, None, None, None)
        else:
            ops.rnn_forward(xz, p_hh, cell.bias_hh, *states, out, None, cell.nonlinearity == "relu")
        final = [rows[1] for rows in states]
    else:  # the LSTM, or a user's compiled cell: the loop projects its input itself
        programs = None
        if combine is not LSTMCell.combine:
            programs = pointwise.compiled(cell)
            if programs is None:
                return None
        out, final = projecting_loop(cell, x.view(B, 1, -1), pack, ins, None, programs)
    for part, new in zip(outs, final):
        part.copy_(new)
    return out.view(B, H)


# Each stepper: (cell, x (B, I), state parts in, packed weights or None, state parts out) -> h (B, H),
# writing the new state parts into the `out` tensors.
def _lstm(cell, x, ins, pack, outs):
    (h, c), (w, b), (h_out, c_out) = ins, pack, outs
    H = h.shape[-1]
    xh = torch.cat((x, h), dim=1)
    z = _times(xh, w, b)  # (B, 4H) in i, f, o, g order
    z[:, : 3 * H].sigmoid_()
    g = z[:, 3 * H :].tanh_()
    torch.mul(z[:, H : 2 * H], c, out=c_out)
    c_out.addcmul_(z[:, :H], g)
    return torch.mul(z[:, 2 * H : 3 * H], torch.tanh(c_out), out=h_out)


def _rnn(cell, x, ins, pack, outs):
    (h,), (w, b), (h_out,) = ins, pack, outs
    xh = torch.cat((x, h), dim=1)
    z = h_out.copy_(_times(xh, w, b))
    return z.relu_() if cell.nonlinearity == "relu" else z.tanh_()


def _gru(cell, x, ins, pack, outs):
    (h,), (h_out,) = ins, outs
    H = h.shape[-1]
    zx = _linear(x, cell.weight_ih, cell.bias_ih)  # (B, 3H)
    zh = _linear(h, cell.weight_hh, cell.bias_hh)
    rz = zx[:, : 2 * H].add_(zh[:, : 2 * H]).sigmoid_()
    n = zx[:, 2 * H :].addcmul_(rz[:, :H], zh[:, 2 * H :]).tanh_()
    return torch.lerp(n, h, rz[:, H:], out=h_out)  # n + z * (h - n)


def _generic(cell, x, ins, pack, outs):
    """Any other gated cell (``combine`` its only change, as ``step_layers`` checks): GatedCell's own
    ``step`` with both projections through ``_linear``, the new state copied into place."""
    state = cell.State(*ins)
    xz, hz = _linear(x, cell.weight_ih, cell.bias_ih), _linear(state.h, cell.weight_hh, cell.bias_hh)
    h, state = cell.combine(cell.split(xz), cell.split(hz), state)
    for out, part in zip(outs, state):
        out.copy_(part)
    return h


# a cell's combine -> (packs [W_ih, W_hh] once?, its stepper); cells not listed take _GENERIC
STEPPERS = {LSTMCell.combine: (True, _lstm), RNNCell.combine: (True, _rnn), GRUCell.combine: (False, _gru)}
_GENERIC = (False, _generic)


def step_layers(layer, x: Tensor, state, loops: bool) -> tuple:
    """One step of ``layer`` (a ``Recurrent``) from ``state``: the output (B, 1, D*H) (or (1, B, D*H))
    and the new state. ``loops``: through the C++ loops (``step-loops``), else the steppers
    (``step-rows``). The routing table has checked the call (``routing.lean_step``)."""
    cells = list(layer.cells)
    B = x.shape[0] if layer.batch_first else x.shape[1]
    inp = x.reshape(B, layer.input_size)
    parts = (state,) if isinstance(state, Tensor) else tuple(state)
    ops = native.ops() if loops else None
    packs = _packed(layer, cells, weights(cells), ops)
    new = [torch.empty_like(p) for p in parts]  # (rows, B, H) each, written row by row
    ins = [p.unbind(0) for p in parts]
    outs = [p.unbind(0) for p in new]
    D = layer.num_directions
    for k in range(layer.num_layers):
        if k > 0 and layer.dropout > 0 and layer.training:
            inp = F.dropout(inp, layer.dropout, training=True)
        halves = []
        for d in range(D):
            row = k * D + d
            cell, state_in, state_out = cells[row], [p[row] for p in ins], [p[row] for p in outs]
            h = _loop_step(cell, inp, state_in, packs[row], state_out, ops) if ops is not None else None
            if h is None:  # no loops here; or (loops given) a user's cell whose combine did not compile
                _, stepper = STEPPERS.get(type(cell).combine, _GENERIC)  # _GENERIC: no packed weights
                h = stepper(cell, inp, state_in, packs[row] if ops is None else None, state_out)
            halves.append(h)
        inp = halves[0] if D == 1 else torch.cat(halves, dim=1)  # (B, D*H)
    output = inp.unsqueeze(1) if layer.batch_first else inp.unsqueeze(0)
    return output, (new[0] if len(new) == 1 else layer.State(*new))
