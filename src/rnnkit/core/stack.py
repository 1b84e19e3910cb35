"""A layer stack over whole sequences: the runners of the routing table's whole-sequence routes.

``run_vendor`` hands the whole stack to torch's kernel (``kernels/vendor.py``). ``per_cell(scan)``
makes a runner that goes layer by layer and direction by direction, each (layer, direction) one
call of ``scan(cell, x, state, mask)``: ``x`` (B, T, I) that layer's input (for the backward
direction reversed within each sequence's length), ``state`` the cell's initial state, ``mask``
(B, T) or ``None``; it returns the outputs (B, T, H) and the final state. The ``scan_*`` functions
below are the routes' scans: each projects the input and runs one kernel (core/kernels/).

Zoneout and recurrent dropout reach an eager call's scans as the masks current for their cell
(kernels/state_noise.py). A traced call, which cannot read them there, gives the runner ``noise``
({cell index: StateNoise}), and it passes each cell's to ``scan(..., noise)``: the scans that take
them (``traced_scan.scan_cell``, ``scan_cell_reference``) are the only ones the routing table runs
such a call on.

Dropout (training only, ``layer.dropout``) goes between layers, as torch.nn's does. Outputs at
padded steps are zero and the backward direction starts at each sequence's own last valid step
(``reverse_padded``): the layer docstring's contract.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import Tensor
from torch.nn import functional as F

from rnnkit.core import native, pointwise
from rnnkit.core.cells.lstm import LSTMCell
from rnnkit.core.functional import as_lengths, length_mask, reverse_padded
from rnnkit.core.gates import GatedCell
from rnnkit.core.kernels.base import time_major_rows
from rnnkit.core.kernels.compiled import CompiledKernel
from rnnkit.core.kernels.cpp_loops import Projection, loop_weights, projecting_loop
from rnnkit.core.kernels.dispatch import fused_scan
from rnnkit.core.kernels.state_noise import StateNoise
from rnnkit.core.kernels.table import CPP, GENERIC, KERNELS
from rnnkit.core.kernels.vendor import vendor_stack
from rnnkit.core.scan import scan_reference

Scan = Callable[[GatedCell, Tensor, NamedTuple, "Tensor | None"], "tuple[Tensor, NamedTuple]"]


def _batch_first(layer, x: Tensor, lengths):
    """``x`` as (B, T, I) and the lengths as a validated tensor (or ``None``)."""
    if not layer.batch_first:
        x = x.transpose(0, 1)
    B, T, _ = x.shape
    return x, (as_lengths(lengths, B, T, x.device) if lengths is not None else None)


def _out(layer, output: Tensor) -> Tensor:
    # time-major output contiguous, as torch.nn's: code that calls .view() on it must not break
    # (a no-op where the loops ran time-major, core/kernels/base.py's time_major_rows)
    return output if layer.batch_first else output.transpose(0, 1).contiguous()


def _cat_features(halves: list[Tensor]) -> Tensor:
    """The two directions' outputs side by side, (B, T, 2H), time-major where they are (so the next
    layer runs time-major too)."""
    if all(time_major_rows(h) for h in halves):
        return torch.cat([h.transpose(0, 1) for h in halves], dim=2).transpose(0, 1)
    return torch.cat(halves, dim=2)


def run_vendor(layer, x: Tensor, state, lengths):
    """The ``torch-kernel`` route: the whole stack in one call of torch's kernel, in the layer's
    own layout (torch's kernel runs time-major: batch-first input is transposed inside it)."""
    _, lengths_t = _batch_first(layer, x, lengths)
    B = x.shape[0 if layer.batch_first else 1]
    checked = None if state is None else layer._check_state(state, B, x)
    output, final = vendor_stack(layer, x, checked, lengths_t, batch_first=layer.batch_first)
    return output, final[0] if len(final) == 1 else layer.State(*final)


def per_cell(scan: Scan):
    """A runner for a route that runs each (layer, direction) through ``scan``."""

    def run(layer, x: Tensor, state, lengths, noise: dict[int, StateNoise] | None = None):
        x, lengths_t = _batch_first(layer, x, lengths)
        B, T, _ = x.shape
        mask = length_mask(lengths_t, T) if lengths_t is not None else None  # (B, T)
        states = layer._unpack_state(state, B, x)
        D = layer.num_directions
        final_states = []
        for k in range(layer.num_layers):
            if k > 0 and layer.dropout > 0 and layer.training:
                x = F.dropout(x, layer.dropout, training=True)
            halves = []
            for d in range(D):
                row = k * D + d
                x_dir = reverse_padded(x, lengths_t) if d == 1 else x
                if noise is None:
                    out, final = scan(layer.cells[row], x_dir, states[row], mask)  # (B, T, H)
                else:
                    out, final = scan(layer.cells[row], x_dir, states[row], mask, noise.get(row))  # type: ignore[call-arg]
                halves.append(reverse_padded(out, lengths_t) if d == 1 else out)
                final_states.append(final)
            x = halves[0] if D == 1 else _cat_features(halves)  # (B, T, D*H)
        return _out(layer, x), layer._pack_state(final_states)

    return run


# -- the routes' scans -------------------------------------------------------------------------


def project(cell: GatedCell, x: Tensor) -> Tensor:
    """``cell.project_input(x)`` for (B, T, I) ``x``: into the C++ loops' workspace (``Projection``)
    where they run on ``x`` and autocast is off, else as the cell writes it."""
    if native.ops_for(x) is None or torch.is_autocast_enabled("cpu"):
        return cell.project_input(x)
    return Projection.apply(x, cell.weight_ih, cell.bias_ih)


def scan_cpp_projecting(cell: GatedCell, x: Tensor, state: NamedTuple, mask: Tensor | None):
    """Inference with the input projection inside the C++ loop: the LSTM's, or a user's compiled cell's."""
    programs = None
    if type(cell).combine is not LSTMCell.combine:
        programs = pointwise.compiled(cell)
        if programs is None:  # this cell's attributes do not compile, the stack's first cell's did
            return fused_scan(cell, project(cell, x), state, mask, GENERIC)
    with torch.no_grad():
        out, final = projecting_loop(cell, x, loop_weights(cell), [s.to(x.dtype) for s in state], mask, programs)
        return out, cell.State(*(s.clone() for s in final))


def scan_cpp(cell: GatedCell, x: Tensor, state: NamedTuple, mask: Tensor | None):
    """A built-in cell's C++ loop (``kernels/cpp_loops.py``)."""
    return fused_scan(cell, project(cell, x), state, mask, CPP[type(cell).combine])


def scan_cpp_compiled(cell: GatedCell, x: Tensor, state: NamedTuple, mask: Tensor | None):
    """A user's cell with ``combine`` compiled, in C++ (``kernels/compiled.py``)."""
    programs = pointwise.compiled(cell)
    kernel = CompiledKernel(programs) if programs is not None else GENERIC
    return fused_scan(cell, project(cell, x), state, mask, kernel)


def scan_python(cell: GatedCell, x: Tensor, state: NamedTuple, mask: Tensor | None):
    """A built-in cell's Python loop (``kernels/python_loops.py``)."""
    return fused_scan(cell, project(cell, x), state, mask, KERNELS[type(cell).combine])


def scan_generic(cell: GatedCell, x: Tensor, state: NamedTuple, mask: Tensor | None):
    """Any cell that changes only ``combine``, backward through time by autograd (``kernels/generic.py``)."""
    return fused_scan(cell, project(cell, x), state, mask, GENERIC)


def scan_cell_reference(
    cell: GatedCell, x: Tensor, state: NamedTuple, mask: Tensor | None, noise: StateNoise | None = None
):
    """The specification: ``cell.project_input`` and ``cell.step`` over time with autograd (core/scan.py)."""
    return scan_reference(cell, cell.project_input(x), state, mask, noise)
