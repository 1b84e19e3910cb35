"""Any cell's loop over time as one ``scan`` node: how a traced graph holds a cell without operators.

The built-in LSTM, GRU and RNN reach ``torch.compile``, ``torch.export`` and the ONNX exporter as
registered operators (core/ops.py). Every other cell (a user's ``GatedCell``, the layer-normalised
cells, minGRU and minLSTM, the LSTM with ``proj_size``) is stepped by PyTorch's ``scan`` higher-order
operator (``torch._higher_order_ops.scan``): the tracer records ``cell.step`` once, as the body of
a loop whose trip count is the input's length, so a graph holds one copy of the step whatever the
length, the length stays symbolic (one graph for every batch size and length, and
``torch.export`` with a dynamic time axis), autograd differentiates the loop (training under
``torch.compile``), and the ONNX exporter (``dynamo=True``) writes the loop as ONNX's ``Scan``
with the step as its body, which onnxruntime runs at any batch size and length.

Per (layer, direction) (core/stack.py's scan contract): ``xz = cell.project_input(x)`` (B, T, G*H)
for every step at once, then the loop over its time axis with the state as the carry::

    h_t, s_t = cell.step(xz_t, s_{t-1})
    s_t = where(mask_t, s_t, s_{t-1});  out_t = h_t * mask_t        (with lengths)

exactly ``core/scan.py``'s reference: padded steps' outputs are zero and the final state is each
sequence's own last valid step's. With zoneout and recurrent dropout (``rnnkit.Regularised``, passed
as ``noise``: a traced call cannot read the masks current in an eager one) the step is
``noisy_step(cell, xz_t, s_{t-1}, recurrent, keep_t)`` (kernels/state_noise.py): zoneout's mask
(B, T, H) is scanned beside ``xz``, recurrent dropout's (B, H), the same at every step, is read by
the body as the weights are.

>>> import torch, rnnkit
>>> layer = rnnkit.Recurrent(rnnkit.CELLS["mingru"], 4, 8, batch_first=True)
>>> compiled = torch.compile(layer, fullgraph=True, dynamic=True, backend="eager")
>>> out, h = compiled(torch.randn(2, 5, 4))
>>> tuple(out.shape)
(2, 5, 8)
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
from torch import Tensor

from rnnkit.core.gates import GatedCell
from rnnkit.core.kernels.state_noise import StateNoise, noisy_step


def _loop():
    from torch._higher_order_ops.scan import scan  # imported on first trace: not needed by eager calls

    return scan


def scan_cell(
    cell: GatedCell, x: Tensor, state: NamedTuple, mask: Tensor | None, noise: StateNoise | None = None
) -> tuple[Tensor, NamedTuple]:
    """The ``traced-scan`` route's scan: ``cell`` over (B, T, I) ``x`` from ``state`` as one ``scan``
    node, with ``noise``'s zoneout and recurrent dropout where given; returns the outputs (B, T, H)
    and the final state."""
    dtype = cell.weight_ih.dtype
    xz = cell.project_input(x).to(dtype).transpose(0, 1)  # (T, B, G*H); under autocast it may come back in half
    carry = [s.to(dtype) for s in state]
    make: Any = type(state)  # the cell's State NamedTuple
    recurrent = noise.recurrent if noise is not None else None
    keep = noise.zoneout if noise is not None else None
    xs = {"xz": xz}
    if mask is not None:
        xs["valid"] = mask.transpose(0, 1)  # (T, B)
    if keep is not None:
        xs["keep"] = keep.transpose(0, 1)  # (T, B, H)

    def step(parts: list[Tensor], inputs: dict[str, Tensor]):
        previous = make(*parts)
        h, new = noisy_step(cell, inputs["xz"], previous, recurrent, inputs.get("keep"))  # cell.step without noise
        if "valid" in inputs:  # lengths: a padded step keeps the state and outputs zero
            valid = inputs["valid"][:, None]  # (B, 1)
            new = make(*(torch.where(valid, n, p) for n, p in zip(new, previous)))
            h = h * valid
        return list(new), h.clone()  # the scan's outputs may not alias its carry

    final, out = _loop()(step, carry, xs)
    return out.transpose(0, 1), make(*final)
