"""The built-in cells' loops over time as PyTorch operators (``torch.ops.rnnkit``).

What ``torch.compile``, ``torch.export``, AOTInductor and the ONNX exporter see of a layer: one
operator per (layer, direction), with a schema, a fake kernel (the output shapes from the input
shapes, so a symbolic batch size and length stay symbolic) and a registered autograd formula whose
backward is itself an operator. The routing table (core/routing.py) takes the ``traced-ops``
route, which calls them, while PyTorch traces a call; eager calls keep their own routes.

Per cell kind ``K`` in ``lstm``, ``gru``, ``rnn``, with ``x`` (B, T, I) the layer's input, ``xz =
x W_ih^T + b_ih`` (B, T, G*H) its projection, ``state`` the cell's (B, H) parts (LSTM ``h, c``; GRU
and RNN ``h``) and ``mask`` (B, T) bool or None::

    rnnkit::K_scan(x, w_ih, b_ih?, w_hh, b_hh?, *state, mask?, relu) -> (out, *final)
    rnnkit::K_scan_train(xz, w_hh, b_hh?, *state, mask?, relu)       -> (out, *final, *saved)
    rnnkit::K_scan_backward(*saved, w_hh, mask?, grad_out?, *grad_state?, relu)
                                                                      -> (d_xz, d_w_hh, d_b_hh, *d_state)

``out`` (B, T, H); padded steps are zero and the final state is each sequence's own last valid
step's (the layer's contract). ``relu`` is the RNN's nonlinearity (ignored by the LSTM and the GRU).
``K_scan`` is inference, the input projection included (the LSTM's C++ loop projects each step
itself, as the eager ``cpp-projecting`` route does; one step (``T = 1``) runs the eager stepping
path's products on the weights as stored, nothing packed or cached, so a weight written by any
means, ``.data`` included, is what the next step reads). ``K_scan_train`` takes the projection from torch ops
(whose backward gives ``d x`` and ``d W_ih``) and also returns what its backward needs (``saved``:
the activated gates and the states of every step); it is the one with the autograd formula.

The schemas and their CPU kernels are C++ (``ops.cpp``, in the library core/native.py builds), so
a process that loads that library alone (``torch.ops.load_library(native.library_path())``) runs
an exported or AOTInductor-compiled model; this module adds the fake kernels, the autograd
formula and, on other devices, the Python loops (kernels/python_loops.py). Where the C++ library
is not built (``RNNKIT_NATIVE=0``, no compiler) the operators are defined here, on the Python
loops everywhere: the same schemas and results.

>>> import torch, rnnkit
>>> from rnnkit.core import ops
>>> x, w_ih, w_hh = torch.randn(2, 5, 4), torch.randn(9, 4), torch.randn(9, 3)  # GRU: 3 gates of H = 3
>>> out, h = torch.ops.rnnkit.gru_scan(x, w_ih, None, w_hh, None, torch.zeros(2, 3), None, False)
>>> tuple(out.shape), tuple(h.shape)
((2, 5, 3), (2, 3))
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor
from torch.nn import functional as F

from rnnkit.core import native
from rnnkit.core.cells.gru import GRUCell
from rnnkit.core.cells.lstm import LSTMCell
from rnnkit.core.cells.rnn import RNNCell
from rnnkit.core.gates import GatedCell
from rnnkit.core.kernels.base import Kernel
from rnnkit.core.kernels.python_loops import PythonGRU, PythonLSTM, PythonRNN

NAMESPACE = "rnnkit"
OTHER_DEVICES = ("cuda", "xpu", "mps")  # where the Python loops run the operators (the CPU runs ops.cpp's)


@dataclass(frozen=True)
class Spec:
    """One cell kind's operators: its state's parts, its Python loops and the shapes of what backward needs."""

    kind: str  # "lstm", "gru", "rnn": the operators' name prefix
    gates: int  # G: xz is (B, T, G*H)
    states: tuple[str, ...]  # the state's parts, in the cell's order
    python: Kernel  # the Python loops (kernels/python_loops.py)
    # (B, T, H, cpp) -> the shapes of ``saved``, as the C++ kernels (cpp) or the Python loops return them
    saved: Callable[[int, int, int, bool], tuple[tuple, ...]]


def _lstm_saved(B, T, H, cpp):
    return ((B, T, 4 * H) if cpp else (T, B, 4 * H), (T + 1, B, H), (T + 1, B, H))


def _gru_saved(B, T, H, cpp):
    return ((B, T, 3 * H), (B, T, H), (T + 1, B, H)) if cpp else ((T, B, 3 * H), (T, B, H), (T + 1, B, H))


def _rnn_saved(B, T, H, cpp):
    return ((T + 1, B, H),)


SPECS = {
    "lstm": Spec("lstm", 4, ("h", "c"), PythonLSTM(), _lstm_saved),
    "gru": Spec("gru", 3, ("h",), PythonGRU(), _gru_saved),
    "rnn": Spec("rnn", 1, ("h",), PythonRNN(), _rnn_saved),
}


class _Cell:
    """What a built-in kernel reads of its cell: the RNN's nonlinearity."""

    def __init__(self, relu: bool):
        self.nonlinearity = "relu" if relu else "tanh"


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


def schemas(spec: Spec) -> dict[str, str]:
    """The operators' schemas, by suffix (``scan``, ``scan_train``, ``scan_backward``): ops.cpp
    defines the same ones."""
    state = ", ".join(f"Tensor {s}0" for s in spec.states)
    final = ", ".join("Tensor" for _ in spec.states)
    saved = ", ".join("Tensor" for _ in spec.saved(1, 1, 1, True))
    saved_in = ", ".join(f"Tensor saved{i}" for i in range(len(spec.saved(1, 1, 1, True))))
    grad_state = ", ".join(f"Tensor? grad_{s}" for s in spec.states)
    d_state = ", ".join("Tensor" for _ in spec.states)
    tail = f"{state}, Tensor? mask, bool relu)"
    return {
        "scan": f"(Tensor x, Tensor w_ih, Tensor? b_ih, Tensor w_hh, Tensor? b_hh, {tail} -> (Tensor, {final})",
        "scan_train": f"(Tensor xz, Tensor w_hh, Tensor? b_hh, {tail} -> (Tensor, {final}, {saved})",
        "scan_backward": f"({saved_in}, Tensor w_hh, Tensor? mask, Tensor? grad_out, {grad_state}, bool relu) "
        f"-> (Tensor, Tensor, Tensor, {d_state})",
    }


def _native_defined() -> bool:
    """Whether ops.cpp defined the operators: the C++ library loaded (built on first use)."""
    if native.ops() is None:  # RNNKIT_NATIVE=0, or no compiler: defined below, on the Python loops
        return False
    return torch._C._dispatch_has_kernel_for_dispatch_key(f"{NAMESPACE}::lstm_scan", "CPU")


# whether the CPU runs ops.cpp's kernels (else the Python loops run everywhere)
NATIVE = _native_defined()


def _cpp_layout(t: Tensor) -> bool:
    """Whether the kernel that runs on ``t`` saves for backward in the C++ loops' layout."""
    return NATIVE and t.device.type == "cpu"


def _python_kernels(spec: Spec):
    """The operators' implementations on the Python loops, and their fake kernels, by suffix."""
    n = len(spec.states)

    def forward(training: bool):
        def run(xz, w_hh, b_hh, state, mask, relu):
            xz = xz.contiguous()
            mask = mask.contiguous() if mask is not None else None
            out, final, saved = spec.python.forward(_Cell(relu), xz, w_hh, b_hh, tuple(state), mask, training)
            outputs = [out.contiguous(), *(f.clone() for f in final)]
            if training:
                outputs += [s.contiguous() for s in saved]
            return tuple(_fresh(outputs))

        return run

    infer, train = forward(False), forward(True)

    def scan_impl(x, w_ih, b_ih, w_hh, b_hh, *rest):
        *state, mask, relu = rest
        return infer(F.linear(x, w_ih, b_ih), w_hh, b_hh, state, mask, relu)

    def scan_train_impl(xz, w_hh, b_hh, *rest):
        *state, mask, relu = rest
        return train(xz, w_hh, b_hh, state, mask, relu)

    def scan_fake(x, w_ih, b_ih, w_hh, b_hh, *rest):
        B, T, _ = x.shape
        return (x.new_empty(B, T, w_hh.shape[1]), *(s.new_empty(s.shape) for s in rest[:n]))

    def scan_train_fake(xz, w_hh, b_hh, *rest):
        B, T, _ = xz.shape
        H = w_hh.shape[1]
        state = rest[:n]
        saved = [xz.new_empty(shape) for shape in spec.saved(B, T, H, _cpp_layout(xz))]
        return (xz.new_empty(B, T, H), *(s.new_empty(s.shape) for s in state), *saved)

    n_saved = len(spec.saved(1, 1, 1, True))

    def backward_impl(*args):
        saved, (w_hh, mask, grad_out), rest = args[:n_saved], args[n_saved : n_saved + 3], args[n_saved + 3 :]
        *grad_state, relu = rest
        mask = mask.contiguous() if mask is not None else None
        needs = {"w": True, "b": True}
        kernel = spec.python
        dxz, dw, db, dstate = kernel.backward(_Cell(relu), tuple(saved), w_hh, mask, grad_out, tuple(grad_state), needs)
        return tuple(_fresh([dxz.contiguous(), dw.contiguous(), db.contiguous(), *(d.contiguous() for d in dstate)]))

    def backward_fake(*args):
        saved, w_hh = args[:n_saved], args[n_saved]
        hs = saved[-1]  # (T+1, B, H) in every kernel's layout
        T, B, H = hs.shape[0] - 1, hs.shape[1], hs.shape[2]
        GH = w_hh.shape[0]
        return (
            w_hh.new_empty(B, T, GH),
            w_hh.new_empty(w_hh.shape),
            w_hh.new_empty(GH),
            *(w_hh.new_empty(B, H) for _ in range(n)),
        )

    return {
        "scan": (scan_impl, scan_fake),
        "scan_train": (scan_train_impl, scan_train_fake),
        "scan_backward": (backward_impl, backward_fake),
    }


def _define(spec: Spec) -> None:
    n = len(spec.states)
    lib_name = f"{NAMESPACE}::{spec.kind}"
    for suffix, schema in schemas(spec).items():
        impl, fake = _python_kernels(spec)[suffix]
        name = f"{lib_name}_{suffix}"
        if NATIVE:  # defined by ops.cpp, with its CPU kernel
            torch.library.register_kernel(name, OTHER_DEVICES, impl)
        else:
            torch.library.custom_op(name, impl, mutates_args=(), schema=schema)
        torch.library.register_fake(name, fake)
    backward_op = getattr(torch.ops.rnnkit, f"{spec.kind}_scan_backward").default

    def setup_context(ctx, inputs, output):
        _xz, w_hh, b_hh, *rest = inputs
        mask, relu = rest[n], rest[n + 1]
        ctx.save_for_backward(w_hh, mask, *output[1 + n :])
        ctx.relu, ctx.has_bias = relu, b_hh is not None

    def autograd_backward(ctx, grad_out, *grads):
        w_hh, mask, *saved = ctx.saved_tensors
        grad_state = grads[:n]  # the saved outputs' gradients (grads[n:]) are never used
        dxz, dw, db, *dstate = backward_op(*saved, w_hh, mask, grad_out, *grad_state, ctx.relu)
        return (dxz, dw, db if ctx.has_bias else None, *dstate, None, None)

    torch.library.register_autograd(f"{lib_name}_scan_train", autograd_backward, setup_context=setup_context)


for _spec in SPECS.values():
    _define(_spec)


def scan(
    kind: str,
    x: Tensor,
    w_ih: Tensor,
    b_ih: Tensor | None,
    w_hh: Tensor,
    b_hh: Tensor | None,
    state: tuple,
    mask: Tensor | None,
    relu: bool = False,
) -> tuple[Tensor, tuple]:
    """A built-in cell of ``kind`` over ``x`` (B, T, I) from ``state`` through its operators: the
    projection in torch ops and the training operator where gradients are wanted, else the
    inference one. Returns the outputs (B, T, H) and the final state's parts."""
    tensors = (x, w_ih, b_ih, w_hh, b_hh, *state)
    # torch.export records the inference operator: an exported program is run, not trained, and
    # the ONNX exporter translates that one (core/onnx_ops.py)
    train = (
        torch.is_grad_enabled()
        and not torch.compiler.is_exporting()
        and any(t is not None and t.requires_grad for t in tensors)
    )
    namespace = torch.ops.rnnkit
    if train:
        xz = F.linear(x, w_ih, b_ih).to(w_hh.dtype)  # under autocast the projection comes back in half precision
        out, *rest = getattr(namespace, f"{kind}_scan_train")(xz, w_hh, b_hh, *state, mask, relu)
    else:
        out, *rest = getattr(namespace, f"{kind}_scan")(x, w_ih, b_ih, w_hh, b_hh, *state, mask, relu)
    return out, tuple(rest[: len(state)])


# a built-in cell's combine -> its operators' kind
KINDS = {LSTMCell.combine: "lstm", GRUCell.combine: "gru", RNNCell.combine: "rnn"}


def scan_cell(cell: GatedCell, x: Tensor, state: NamedTuple, mask: Tensor | None):
    """The ``traced-ops`` route's scan (core/stack.py's contract): a built-in cell over (B, T, I) ``x``,
    each (layer, direction) one operator (the training one with the input projection before it)."""
    w_hh = cell.weight_hh
    dtype = w_hh.dtype
    # under autocast the input may come in half precision: the layer runs in its weights' dtype
    parts = tuple(s.to(dtype) for s in state)
    relu = getattr(cell, "nonlinearity", "tanh") == "relu"
    kind = KINDS[type(cell).combine]
    out, final = scan(kind, x.to(dtype), cell.weight_ih, cell.bias_ih, w_hh, cell.bias_hh, parts, mask, relu)
    return out, cell.State(*final)
