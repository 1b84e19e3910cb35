"""The built-in cells' loops over time as PyTorch operators (``torch.ops.rnnkit``).

What ``torch.compile``, ``torch.export`` and the ONNX exporter see of a layer: one operator per
(layer, direction), with a schema, a fake kernel (the output shapes from the input shapes, so a
symbolic batch size and length stay symbolic) and a registered autograd formula whose backward is
itself an operator. The routing table (core/routing.py) takes the ``traced-ops`` route, which calls
them, while PyTorch traces a call; eager calls keep their own routes.

Per cell kind ``K`` in ``lstm``, ``gru``, ``rnn``, with ``xz = x W_ih^T + b_ih`` (B, T, G*H) the input
projection of every step (outside the operator, in torch ops), ``state`` the cell's (B, H) parts
(LSTM ``h, c``; GRU and RNN ``h``) and ``mask`` (B, T) bool or None::

    rnnkit::K_scan(xz, w_hh, b_hh?, *state, mask?, relu)        -> (out, *final)
    rnnkit::K_scan_train(xz, w_hh, b_hh?, *state, mask?, relu)  -> (out, *final, *saved)
    rnnkit::K_scan_backward(*saved, w_hh, mask?, grad_out?, *grad_state?, relu)
                                                                 -> (d_xz, d_w_hh, d_b_hh, *d_state)

``out`` (B, T, H); padded steps are zero and the final state is each sequence's own last valid
step's (the layer's contract). ``relu`` is the RNN's nonlinearity (ignored by the LSTM and the GRU).
``K_scan`` is inference (nothing saved); ``K_scan_train`` also returns what its backward needs
(``saved``: the activated gates and the states of every step), and is the one with the autograd
formula. The implementation is the C++ loops (kernels/cpp_loops.py) on the CPU in float32/float64
where they are built, the Python loops (kernels/python_loops.py) on any other device or dtype: the
same functions the eager routes run.

>>> import torch, rnnkit
>>> from rnnkit.core import ops
>>> xz, w_hh = torch.randn(2, 5, 9), torch.randn(9, 3)   # GRU: 3 gates of H = 3
>>> out, h = torch.ops.rnnkit.gru_scan(xz, w_hh, None, torch.zeros(2, 3), None, False)
>>> tuple(out.shape), tuple(h.shape)
((2, 5, 3), (2, 3))
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor

from rnnkit.core import native
from rnnkit.core.cells.gru import GRUCell
from rnnkit.core.cells.lstm import LSTMCell
from rnnkit.core.cells.rnn import RNNCell
from rnnkit.core.gates import GatedCell
from rnnkit.core.kernels.base import Kernel
from rnnkit.core.kernels.cpp_loops import CppGRU, CppLSTM, CppRNN
from rnnkit.core.kernels.python_loops import PythonGRU, PythonLSTM, PythonRNN

NAMESPACE = "rnnkit"


@dataclass(frozen=True)
class Spec:
    """One cell kind's operators: its state's parts, kernels and the shapes of what backward needs."""

    kind: str  # "lstm", "gru", "rnn": the operators' name prefix
    gates: int  # G: xz is (B, T, G*H)
    states: tuple[str, ...]  # the state's parts, in the cell's order
    cpp: Kernel  # the C++ loops (CPU, float32/float64, where built)
    python: Kernel  # the Python loops (anywhere)
    # (B, T, H, cpp) -> the shapes of ``saved``, as the kernel that runs returns them
    saved: Callable[[int, int, int, bool], tuple[tuple, ...]]
    padded_saved: tuple[int, ...]  # the C++ loops' saved (B, T, ...) buffers, unwritten at padded steps


def _lstm_saved(B, T, H, cpp):
    return ((B, T, 4 * H) if cpp else (T, B, 4 * H), (T + 1, B, H), (T + 1, B, H))


def _gru_saved(B, T, H, cpp):
    return ((B, T, 3 * H), (B, T, H), (T + 1, B, H)) if cpp else ((T, B, 3 * H), (T, B, H), (T + 1, B, H))


def _rnn_saved(B, T, H, cpp):
    return ((T + 1, B, H),)


SPECS = {
    "lstm": Spec("lstm", 4, ("h", "c"), CppLSTM(), PythonLSTM(), _lstm_saved, (0,)),
    "gru": Spec("gru", 3, ("h",), CppGRU(), PythonGRU(), _gru_saved, (0, 1)),
    "rnn": Spec("rnn", 1, ("h",), CppRNN(), PythonRNN(), _rnn_saved, ()),
}


class _Cell:
    """What a built-in kernel reads of its cell: the RNN's nonlinearity."""

    def __init__(self, relu: bool):
        self.nonlinearity = "relu" if relu else "tanh"


def _cpp(x: Tensor) -> bool:
    return native.ops_for(x) is not None


def _fresh(tensors) -> list[Tensor]:
    """``tensors`` with any that shares memory with an earlier one cloned: an operator's outputs
    may not alias each other (a loop's output can be a view of its states buffer)."""
    seen: set = set()
    result = []
    for t in tensors:
        ptr = t.untyped_storage().data_ptr()
        if ptr in seen:
            t = t.clone()
            ptr = t.untyped_storage().data_ptr()
        seen.add(ptr)
        result.append(t)
    return result


def _schemas(spec: Spec) -> dict[str, str]:
    state = ", ".join(f"Tensor {s}0" for s in spec.states)
    final = ", ".join("Tensor" for _ in spec.states)
    saved = ", ".join("Tensor" for _ in spec.saved(1, 1, 1, True))
    saved_in = ", ".join(f"Tensor saved{i}" for i in range(len(spec.saved(1, 1, 1, True))))
    grad_state = ", ".join(f"Tensor? grad_{s}" for s in spec.states)
    d_state = ", ".join("Tensor" for _ in spec.states)
    args = f"(Tensor xz, Tensor w_hh, Tensor? b_hh, {state}, Tensor? mask, bool relu)"
    return {
        "scan": f"{args} -> (Tensor, {final})",
        "scan_train": f"{args} -> (Tensor, {final}, {saved})",
        "scan_backward": f"({saved_in}, Tensor w_hh, Tensor? mask, Tensor? grad_out, {grad_state}, bool relu) "
                         f"-> (Tensor, Tensor, Tensor, {d_state})",
    }


def _define(spec: Spec) -> None:
    n = len(spec.states)
    n_saved = len(spec.saved(1, 1, 1, True))
    schemas = _schemas(spec)
    lib_name = f"{NAMESPACE}::{spec.kind}"

    def forward(training: bool):
        def impl(xz, w_hh, b_hh, *rest):
            *state, mask, relu = rest
            xz = xz.contiguous()
            mask = mask.contiguous() if mask is not None else None
            kernel = spec.cpp if _cpp(xz) else spec.python
            out, final, saved = kernel.forward(_Cell(relu), xz, w_hh, b_hh, tuple(state), mask, training)
            outputs = [out.contiguous(), *(f.clone() for f in final)]
            if training:
                if mask is not None and kernel is spec.cpp:
                    # the C++ loops leave padded steps' gates unwritten (their backward never reads them):
                    # zeros, so that the operator's outputs are a function of its inputs
                    for i in spec.padded_saved:
                        saved[i].masked_fill_(~mask[..., None], 0)
                outputs += [s.contiguous() for s in saved]
            return tuple(_fresh(outputs))

        def fake(xz, w_hh, b_hh, *rest):
            state = rest[:n]
            B, T, _ = xz.shape
            H = w_hh.shape[1]
            outputs = [xz.new_empty(B, T, H), *(s.new_empty(s.shape) for s in state)]
            if training:
                outputs += [xz.new_empty(shape) for shape in spec.saved(B, T, H, _cpp(xz))]
            return tuple(outputs)

        return impl, fake

    for name, training in (("scan", False), ("scan_train", True)):
        impl, fake = forward(training)
        op = torch.library.custom_op(f"{lib_name}_{name}", impl, mutates_args=(), schema=schemas[name])
        op.register_fake(fake)

    def backward_impl(*args):
        saved, (w_hh, mask, grad_out), rest = args[:n_saved], args[n_saved:n_saved + 3], args[n_saved + 3:]
        *grad_state, relu = rest
        kernel = spec.cpp if _cpp(w_hh) else spec.python
        mask = mask.contiguous() if mask is not None else None
        needs = {"w": True, "b": True}
        dxz, dw, db, dstate = kernel.backward(_Cell(relu), tuple(saved), w_hh, mask, grad_out, tuple(grad_state),
                                              needs)
        return tuple(_fresh([dxz.contiguous(), dw.contiguous(), db.contiguous(), *(d.contiguous() for d in dstate)]))

    def backward_fake(*args):
        saved, w_hh = args[:n_saved], args[n_saved]
        hs = saved[-1]  # (T+1, B, H) in every kernel's layout
        T, B, H = hs.shape[0] - 1, hs.shape[1], hs.shape[2]
        GH = w_hh.shape[0]
        return (w_hh.new_empty(B, T, GH), w_hh.new_empty(w_hh.shape), w_hh.new_empty(GH),
                *(w_hh.new_empty(B, H) for _ in range(n)))

    bwd = torch.library.custom_op(f"{lib_name}_scan_backward", backward_impl, mutates_args=(),
                                  schema=schemas["scan_backward"])
    bwd.register_fake(backward_fake)
    backward_op = getattr(torch.ops.rnnkit, f"{spec.kind}_scan_backward").default

    def setup_context(ctx, inputs, output):
        _xz, w_hh, b_hh, *rest = inputs
        mask, relu = rest[n], rest[n + 1]
        ctx.save_for_backward(w_hh, mask, *output[1 + n:])
        ctx.relu, ctx.has_bias = relu, b_hh is not None

    def autograd_backward(ctx, grad_out, *grads):
        w_hh, mask, *saved = ctx.saved_tensors
        grad_state = grads[:n]  # the saved outputs' gradients (grads[n:]) are never used
        dxz, dw, db, *dstate = backward_op(*saved, w_hh, mask, grad_out, *grad_state, ctx.relu)
        return (dxz, dw, db if ctx.has_bias else None, *dstate, None, None)

    torch.library.register_autograd(f"{lib_name}_scan_train", autograd_backward, setup_context=setup_context)


for _spec in SPECS.values():
    _define(_spec)


def scan(kind: str, xz: Tensor, w_hh: Tensor, b_hh: Tensor | None, state: tuple, mask: Tensor | None,
         relu: bool = False) -> tuple[Tensor, tuple]:
    """A built-in cell of ``kind`` over ``xz`` (B, T, G*H) from ``state`` through its operator: the
    training one where gradients are wanted, else the inference one. Returns the outputs (B, T, H)
    and the final state's parts."""
    tensors = (xz, w_hh, b_hh, *state)
    # torch.export records the inference operator: an exported program is run, not trained, and
    # the ONNX exporter translates that one (core/onnx_ops.py)
    train = (torch.is_grad_enabled() and not torch.compiler.is_exporting()
             and any(t is not None and t.requires_grad for t in tensors))
    namespace = torch.ops.rnnkit
    op = getattr(namespace, f"{kind}_scan_train" if train else f"{kind}_scan")
    out, *rest = op(xz, w_hh, b_hh, *state, mask, relu)
    return out, tuple(rest[: len(state)])


# a built-in cell's combine -> its operators' kind
KINDS = {LSTMCell.combine: "lstm", GRUCell.combine: "gru", RNNCell.combine: "rnn"}


def scan_cell(cell: GatedCell, x: Tensor, state: NamedTuple, mask: Tensor | None):
    """The ``traced-ops`` route's scan (core/stack.py's contract): a built-in cell over (B, T, I) ``x``,
    the input projection in torch ops, the loop over time one operator."""
    w_hh, b_hh = cell.weight_hh, cell.bias_hh
    xz = cell.project_input(x).to(w_hh.dtype)  # under autocast the projection may come back in half precision
    parts = tuple(s.to(w_hh.dtype) for s in state)
    relu = getattr(cell, "nonlinearity", "tanh") == "relu"
    out, final = scan(KINDS[type(cell).combine], xz, w_hh, b_hh, parts, mask, relu)
    return out, cell.State(*final)
