"""The lean stepping path: one time step of a whole layer stack with a carried state, no autograd.

Generating text runs a model one token at a time, ``T = 1`` with the state of the previous
call. At batch 1 every step is a handful of matrix-vector products, so what costs is overhead:
validation, re-packing weights, autograd bookkeeping, Python. ``step_layers`` is what
``Recurrent.forward`` calls first when gradients are off and ``T == 1``. Per (layer, direction):

- on the CPU in float32/float64, where the C++ loops are built (``_loops_for``), one call of the
  fused kernels' loop with T = 1 (``_loop_step``), on weights packed once for it and cached: the
  LSTM's loop projects its input itself, the GRU and the RNN take theirs from one blocked matmul,
  a user's cell whose ``combine`` compiles (core/pointwise.py) runs its program. The blocked
  product with the gate math right after it, in one pass of the threads, beats a BLAS call followed
  by torch's pointwise ops at every batch for the LSTM and the GRU; at batch 1 the RNN (one product
  and a tanh) and a small user's cell (whose program lookup costs about 11 us) keep the route below;
- otherwise one matmul over the concatenation ``[x, h]`` against ``[W_ih, W_hh]`` packed once and
  cached (GRU: two, since its reset gate acts on ``h W_hn + b_hn`` alone; a user's cell: two, then
  its ``combine`` as written), at batch 1 on the CPU through the C++ matrix-vector kernels
  (``native.cpp``), then the pointwise gate math in place.

The cache is keyed on every parameter's identity, storage and version counter, so an optimizer
step, ``load_state_dict``, ``.to()`` or any in-place change under ``torch.no_grad()`` repacks it on
the next call. A change written through ``.data`` bypasses the version counter (as it bypasses
autograd's own checks) and is not seen: update weights in place under ``torch.no_grad()``, as
torch.optim does.

Anything unusual (a wrong shape, dtype or device, lengths, a cell with its own ``step``) returns
``None`` and the caller takes the general route, which validates and names the problem.

>>> import torch, rnnkit
>>> lstm = rnnkit.LSTM(4, 8, num_layers=2).eval()
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

from rnnkit.core import fused, native, pointwise
from rnnkit.core.cells.gru import GRUCell
from rnnkit.core.cells.lstm import LSTMCell
from rnnkit.core.cells.rnn import RNNCell
from rnnkit.core.gates import GatedCell, only_combine_customised

CACHE_ATTR = "_rnnkit_step_cache"


def _weights(cells) -> list[Tensor]:
    """The cells' parameters, read from ``_parameters`` (``nn.Module.parameters()`` costs tens of
    microseconds a call, as much as a small step); ``step_layers`` checks they are the stacked weights."""
    return [p for c in cells for p in c._parameters.values() if p is not None]


def _key(weights) -> tuple:
    return tuple((id(p), p.data_ptr(), p._version) for p in weights)


# At batch 1 on the CPU a step's matmuls go to the C++ matrix-vector kernels (native.cpp), whose
# fixed cost per call is far below a BLAS call's, for matrices up to this size. Measured on the
# development machine, 2 threads, x W^T+b at batch 1 (C++ vs torch): 1 MB 11 vs 32 us, 8 MB 64 vs
# 256 us, 32 MB 0.79 vs 1.54 ms; at 64 MB the transposed form lost (3.7 vs 2.9 ms).
NATIVE_MAX_BYTES = 32 << 20


def _native_for(x: Tensor, w: Tensor):
    if x.shape[0] != 1 or x.device.type != "cpu" or x.dtype not in (torch.float32, torch.float64):
        return None
    if w.numel() * w.element_size() > NATIVE_MAX_BYTES or not (w.is_contiguous() and x.is_contiguous()):
        return None
    return native.ops()


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
    cache = getattr(layer, CACHE_ATTR, None)
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
            return [tuple(w.clone() for w in fused.loop_weights(c)) for c in cells]
        return [_pack(c) if STEPPERS.get(type(c).combine, _GENERIC)[0] else None for c in cells]


# -- the fused kernels' C++ loops at T = 1 --------------------------------------------------------

# Measured on the development machine (2 threads, tokens alternated in one process), against the
# route below (matrix-vector kernels at batch 1, a BLAS call above it, then torch's pointwise ops):
# - batch 2, 8 and 64, 2 layers of 256 and of 512: LSTM 1.6-4.3x, GRU 1.35-3.2x, RNN 1.06-1.6x and
#   a user's LSTM cell 1.5-5.1x faster. Against torch.nn's stepping the route below had been
#   0.71-2.03x (below 1.0 in 17 of the 24 cases), the loops 0.79-7.9x (RNN at 2 x 256, batch 2 and
#   8: 0.79-0.83x, where Python's few tens of microseconds a call are most of a step);
# - batch 1: LSTM 1.02-1.50x and GRU 1.09-1.64x (1 layer of 64 to 3 of 512); the RNN 0.75-0.86x,
#   so it keeps the route below at batch 1; a user's LSTM cell (weights packed for its 4 gates)
#   0.90-0.93x at 1 x 64, 1.00-1.08x at 2 x 128, 1.08-1.12x at 2 x 256 and 1.37-1.53x at 3 x 512,
#   so at batch 1 a user's cell takes the loops from LOOPS_MIN_USER_WEIGHTS weights (W_ih and W_hh)
#   in a layer (2 x 256 has 512K a layer, 2 x 128 128K).
LOOPS_MIN_USER_WEIGHTS = 1 << 18


def _loops_at_batch_one(cell) -> bool:
    """Whether ``cell`` steps batch 1 faster through the loops than through the route below (above)."""
    combine = type(cell).combine
    if combine in STEPPERS:
        return combine is not RNNCell.combine
    return cell.weight_ih.numel() + cell.weight_hh.numel() >= LOOPS_MIN_USER_WEIGHTS


def _loops_for(x: Tensor, cells, weights) -> object | None:
    """The native ops where ``cells`` (a layer stack's) step a batch ``x`` (B, I) through ``_loop_step``,
    else ``None``; at batch 1, where one of them is faster so (the whole stack takes one route)."""
    if x.device.type != "cpu" or x.dtype not in (torch.float32, torch.float64):
        return None
    if any(p.dtype != x.dtype for p in weights):
        return None
    if x.shape[0] == 1 and not any(map(_loops_at_batch_one, cells)):
        return None
    return native.ops()


def _loop_step(cell, x, ins, pack, outs, ops) -> Tensor | None:
    """One step of a batch ``x`` (B, I) through the C++ loops of the fused kernels (T = 1, inference),
    on ``pack`` (``fused.loop_weights(cell)``), the new state copied into ``outs``; ``None`` for a
    user's cell whose ``combine`` does not compile, which the caller then steps as written."""
    B, H = x.shape[0], cell.hidden_size
    combine = type(cell).combine
    x = x.contiguous()
    if combine in (GRUCell.combine, RNNCell.combine):  # the input projected first, by one matmul
        (p_ih, p_hh), GH = pack, cell.weight_ih.shape[0]
        xz = ops.linear_packed(x, p_ih, GH, cell.bias_ih).view(B, 1, GH)
        states = [fused.states_rows(part, 1, False) for part in ins]  # the old state in row 0, the new one to row 1
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
        out, final = fused.projecting_loop(cell, x.view(B, 1, -1), pack, ins, None, programs)
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


def step_layers(layer, x: Tensor, state) -> tuple | None:
    """One step of ``layer`` (a ``Recurrent``) from ``state``, or ``None`` to take the general route."""
    if not isinstance(x, Tensor) or x.dim() != 3:
        return None
    if layer.batch_first:
        B, T, I = x.shape
    else:
        T, B, I = x.shape
    cells = list(layer.cells)
    ref = cells[0].weight_ih
    if T != 1 or B == 0 or I != layer.input_size or x.dtype != ref.dtype or x.device != ref.device:
        return None  # (an empty batch: the general route names the problem)
    if torch.is_autocast_enabled(x.device.type):  # its linears would come back in half precision
        return None
    fields = layer.State._fields
    parts = (state,) if isinstance(state, Tensor) else tuple(state)
    rows, H = len(cells), layer.hidden_size
    if len(parts) != len(fields) or any(
        not isinstance(p, Tensor) or p.shape != (rows, B, H) or p.dtype != x.dtype or p.device != x.device
        for p in parts
    ):
        return None
    if not all(map(only_combine_customised, cells)):  # the steppers run the weights themselves
        return None
    inp = x.reshape(B, I)
    weights = _weights(cells)
    loops = _loops_for(inp, cells, weights)
    packs = _packed(layer, cells, weights, loops)
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
            h = _loop_step(cell, inp, state_in, packs[row], state_out, loops) if loops is not None else None
            if h is None:  # no loops here; or (loops given) a user's cell whose combine did not compile
                _, stepper = STEPPERS.get(type(cell).combine, _GENERIC)  # _GENERIC: no packed weights
                h = stepper(cell, inp, state_in, packs[row] if loops is None else None, state_out)
            halves.append(h)
        inp = halves[0] if D == 1 else torch.cat(halves, dim=1)  # (B, D*H)
    output = inp.unsqueeze(1) if layer.batch_first else inp.unsqueeze(0)
    return output, (new[0] if len(new) == 1 else layer.State(*new))
