"""A whole built-in stack through torch's own fused kernels: oneDNN's LSTM on the CPU, cuDNN on CUDA.

torch's ``_VF.lstm``, ``_VF.gru`` and ``_VF.rnn_tanh/relu`` compute exactly the built-in layers'
functions (the parity tests hold them to the reference), with the weights in torch.nn's layout,
so the choice of this route is speed alone; where it is taken is the routing table's business
(core/routing.py). With lengths, the stack runs torch's packed-sequence kernel: sequences sorted
by length inside, the states permuted to match and back, the same semantics as the masks.
"""

from __future__ import annotations

import warnings

import torch
from torch import Tensor
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from rnnkit.core.cells.gru import GRUCell
from rnnkit.core.cells.lstm import LSTMCell
from rnnkit.core.cells.rnn import RNNCell

# a built-in cell's combine -> the torch._VF function that runs a whole stack of it
VENDOR = {
    LSTMCell.combine: lambda cell: torch._VF.lstm,
    GRUCell.combine: lambda cell: torch._VF.gru,
    RNNCell.combine: lambda cell: getattr(torch._VF, f"rnn_{cell.nonlinearity}"),
}

_TORCH_ORDER = ("weight_ih", "weight_hh", "bias_ih", "bias_hh", "weight_hr")  # torch._VF's per-layer order


def vendor_stack(
    layer, x: Tensor, state: tuple | None, lengths: Tensor | None, batch_first: bool = True
) -> tuple[Tensor, tuple]:
    """Run ``layer`` (a stack of one built-in cell kind) on ``x`` (B, T, I) through torch's kernel
    (or, ``batch_first=False``, on (T, B, I) ``x``, giving a (T, B, D*H) output: torch's kernel runs
    time-major, so such input needs no transposes).

    ``state``: the layer's checked state in torch's layout (its parts, each (num_layers*D, B, H)) or
    ``None``; ``lengths`` (B,), validated, or ``None``. Returns the output (B, T, D*H) and the final
    state's parts in the same layout, in the weights' dtype.
    """
    cell = layer.cells[0]
    combine = type(cell).combine
    lstm = isinstance(cell, LSTMCell)  # ProjectedLSTMCell too: torch.nn.LSTM's proj_size
    params = [c._parameters for c in layer.cells]  # not attribute access: nn.Module's __getattr__ is slow
    weights = [p[name] for p in params for name in _TORCH_ORDER if p.get(name) is not None]
    dtype = weights[0].dtype
    if state is None:
        rows = layer.num_layers * layer.num_directions
        sizes = layer._state_sizes()  # an LSTM with proj_size P: h (rows, B, P), c (rows, B, H)
        B = x.shape[0 if batch_first else 1]
        hx = tuple(torch.zeros(rows, B, size, dtype=dtype, device=x.device) for size in sizes)
    else:
        hx = tuple(part.to(dtype) for part in state)
    args = (weights, layer.bias, layer.num_layers, 0.0, layer.training, layer.bidirectional)
    run = torch._VF.lstm if lstm else VENDOR[combine](cell)

    def call():
        if lengths is None:
            out, *final = run(x.to(dtype), hx if lstm else hx[0], *args, batch_first)
            return out, tuple(final)
        # packed: sequences sorted by length inside, the states permuted to match and back
        packed = pack_padded_sequence(x.to(dtype), lengths.cpu(), batch_first=batch_first, enforce_sorted=False)
        order = tuple(h.index_select(1, packed.sorted_indices) for h in hx)
        data, *final = run(packed.data, packed.batch_sizes, order if lstm else order[0], *args)
        total = x.shape[1 if batch_first else 0]
        out, _ = pad_packed_sequence(packed._replace(data=data), batch_first=batch_first, total_length=total)
        return out, tuple(f.index_select(1, packed.unsorted_indices) for f in final)

    if x.device.type == "cpu":  # the route runs here without autocast (core/routing.py)
        return call()
    # Under float16 autocast, torch's cast for cuDNN's RNN takes the input, the state and the
    # weights to float16, as for torch.nn's layers: the same computation, so the same numbers, and
    # 2.4x faster than a float32 recurrence (LSTM training, B=64, H=512, T=256, H100: 5.6 against
    # 13.3 ms). That cast picks float16 under bf16 autocast too, where no GradScaler guards
    # float16's range (the trainer keeps one for fp16 only): there the recurrence runs in the
    # weights' dtype, as the fused kernels' does.
    half = torch.is_autocast_enabled(x.device.type) and torch.get_autocast_dtype(x.device.type) == torch.float16
    with torch.autocast(x.device.type, enabled=half), warnings.catch_warnings():
        # rnnkit.LSTM/GRU/RNN on CUDA hand cuDNN torch.nn's flat buffer (RNNBase lays the weights out
        # in one block at .to()/.cuda(), tests/test_gpu_flat.py); a Recurrent stack of built-in cells
        # holds each cell's own weights, which cuDNN warns about and compacts on each call
        warnings.filterwarnings("ignore", message="RNN module weights are not part of single contiguous")
        out, final = call()
    # the final state, float16 under autocast, in the weights' dtype: the next call's state has it
    return out, tuple(f.to(dtype) for f in final)
