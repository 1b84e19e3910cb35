"""Which implementation runs a layer call: the routing table, in one function.

``choose_route(layer, x, state, lengths)`` returns the :class:`Route` that ``Recurrent.forward``
runs, from what the caller can see: the device and dtype, whether gradients are wanted, autocast
and functorch, the shapes, the cell and the layer's options. ``explain(layer, x)`` (``rnnkit.explain``)
returns the same choice without running anything, with the reason every earlier route was passed
over; each call's route is also logged at DEBUG level on the ``rnnkit.routing`` logger. Every route
computes the same function (the tests hold each to ``reference``); they differ in speed only.

The table, tried in order; the first route that can compute the call, and that measured fastest
where that is the question, is taken:

1. ``traced-ops``: while ``torch.compile``, ``torch.export`` or ``torch.onnx.export(dynamo=True)``
   traces the call (``torch.compiler.is_compiling()``), a built-in cell's loop over time is one
   registered operator per (layer, direction) (core/ops.py: ``torch.ops.rnnkit.lstm_scan`` and its
   training and backward twins), lengths, directions, dropout and (in training) the input
   projection torch ops around it: a graph with symbolic batch size and length, the eager routes'
   kernels inside (in inference the projecting LSTM loop; one step on cached packed weights); not with
   zoneout or recurrent dropout (the operators apply neither; ``traced-scan`` does). Under that
   tracer only this route, ``traced-scan`` (every other call) and ``reference`` are taken. Under
   ``torch.jit.trace`` (which ``torch.onnx.export(dynamo=False)`` runs) only ``torch-kernel`` is
   taken, whose ``aten::lstm``/``gru``/``rnn_*`` node runs at any batch size and length and
   exports to ONNX's LSTM/GRU/RNN; a call it cannot take (lengths, a user's cell, dropout in
   training) raises ``RuntimeError`` rather than record a graph that would be wrong at another
   shape or with other inputs.
2. ``step-graph``: one step of the whole stack on CUDA replayed from a CUDA graph captured per
   batch size (core/cuda_graphs.py: ``step-matmul``'s step, captured once, reading the weights in
   place; re-captured when a weight object or its storage changes). Taken for one step with a
   carried state, no lengths, gradients off and no autocast on a CUDA tensor; not with dropout in
   training or weights made under ``torch.inference_mode()``.
3. ``step-loops``: one step of each cell through the C++ loops with T = 1, the weights packed for
   them at each call (step.py). It can take a lean step (T = 1 with a carried state, no lengths,
   gradients off, no autocast) on the CPU in float32/float64 where the C++ loops are built, but
   measured slower than ``step-matmul`` at every batch (packing costs more than the blocked matmul
   saves), so it runs only where forced (``force("step-loops")``), to compare the two.
4. ``step-matmul``: one step on the weights as stored, ``x W_ih^T + h W_hh^T`` and the gate math;
   on the CPU the LSTM's and GRU's whole step one C++ call (the products through the C++
   matrix-vector kernels at batch 1, torch's matmul at other batches), the others' gate math in
   torch ops, their products at batch 1 through the matrix-vector kernels (step.py). Every other
   lean step.
5. ``torch-kernel``: the whole stack in torch's own kernel, oneDNN's LSTM on the CPU and cuDNN on
   CUDA (kernels/vendor.py). A stack of one built-in cell as shipped, no dropout in training, no
   functorch; on CUDA always (with lengths, its packed-sequence kernel, ``PACKED_DEVICES``); on the
   CPU in float32 without autocast or lengths, the LSTM where the C++ loops measured slower
   (``lstm_loops_faster``) and the GRU and RNN in inference where the C++ loops are not built.
6. ``triton-loops``: a cell's loop over time on CUDA, the recurrent matmul in torch (cuBLAS) and the
   pointwise step one Triton kernel generated from the cell's compiled ``combine`` (core/pointwise.py,
   the program ``cpp-compiled`` runs), its derivative likewise (kernels/triton_loops.py,
   kernels/triton_pointwise.py). A cell that changes only ``combine`` (a user's, or a built-in one
   that ``torch-kernel`` passed over), whose ``combine`` compiles, on a CUDA tensor, Triton installed,
   no functorch. In half precision (autocast or bf16/fp16 weights) the matmuls run in it and the
   pointwise math and the carried state in float32.
7. ``cpp-projecting``: inference in the C++ loop that projects its input per step
   (kernels/cpp_loops.py). Gradients not wanted, the CPU in float32/float64 where the C++ loops are
   built, no autocast; the LSTM, or a user's cell whose ``combine`` compiles.
8. ``cpp-loops``: a built-in cell's C++ loop over time, its backward in C++ too
   (kernels/cpp_loops.py; the sLSTM's, with its block-diagonal recurrent weights, kernels/slstm.py).
   A built-in cell on the CPU in float32/float64 where the loops are built.
9. ``cpp-compiled``: a user's ``combine`` compiled to a program and run over time in C++
   (kernels/compiled.py). A user's cell (only ``combine`` changed) whose ``combine`` compiles, where
   ``cpp-loops`` would run.
10. ``cpp-layernorm``: a layer-normalised LSTM or GRU (``LayerNormLSTMCell``, ``LayerNormGRUCell``)
   over time in C++, backward by hand with the gradients of the gains and normalisation biases
   (kernels/layernorm_loops.py, core/layernorm.cpp); the input projection and its normalisation
   torch ops; zoneout and recurrent dropout applied inside the loops. A stack of those cells as
   shipped, on the CPU in float32/float64 where the loops are built, not inside a functorch transform.
11. ``python-loops``: a built-in cell's loop over time in torch ops, its backward written by hand
   (kernels/python_loops.py). A built-in cell anywhere else: another device or dtype, the C++ loops
   not built, CUDA without Triton.
12. ``generic``: a user's ``combine`` stepped in torch ops, the backward through time one autograd
   call (kernels/generic.py). A user's cell that changes only ``combine``, anywhere else.
13. ``parallel-scan``: a stack of cells whose gates read the input only (``ParallelScanCell``:
   minGRU, minLSTM), each (layer, direction) one input projection and one scan over time
   (core/parallel_scan.py: stepped with a hand-written backward on the CPU, in C++ where built, the
   log-space parallel scan elsewhere); zoneout folded into the scan's coefficients (a kept unit's
   ``z`` is 0). Not inside a functorch transform; not with recurrent dropout (these cells' gates read
   no previous output).
14. ``traced-scan``: while ``torch.compile``, ``torch.export`` or the ONNX exporter traces the call,
   any cell that ``traced-ops`` does not take (a user's cell, the layer-normalised cells, minGRU and
   minLSTM, the LSTM with ``proj_size``), and every cell with zoneout or recurrent dropout: each
   (layer, direction) its input projection, then ``cell.step`` over time as one node of PyTorch's
   ``scan`` operator (core/traced_scan.py), the masks applied in its body, so the graph holds one
   copy of the step and the length stays symbolic; the ONNX exporter writes it as ONNX's ``Scan``.
   Not inside a functorch transform.
15. ``reference``: ``cell.project_input``, then ``cell.step`` over time with autograd (core/scan.py).
   Anything else: a cell that rewrites ``step`` or a projection or has parameters of its own, a
   stack of mixed cell classes, a call inside a functorch transform (vmap, grad).

The measurements behind the thresholds (development machine, 2 threads, alternated pairs):

- ``lstm_loops_faster``: the C++ loops against oneDNN's LSTM on the CPU (float32) over batch 1-64,
  H 128 and 512, T 64 and 256. Inference: the C++ loops everywhere, with the projection inside the
  loop 1.04-2.06x up to batch x hidden 1024 and a draw beyond (0.97-1.06x at T=64). Training: the
  C++ loops for a small step, batch x hidden <= ``NATIVE_LSTM_MAX_STATE`` (1.04-1.64x; a draw at
  2048, 0.93-1.03x), and where the gates (T x B x 4H values) pass ``NATIVE_LSTM_MIN_TRAIN_GATES``
  (1.03-1.49x), where oneDNN slows as its workspace leaves the cache; between the two oneDNN trains
  5-14% faster. With the input's gradient taken (which oneDNN computes anyway): the C++ loops
  1.07-1.42x above these lines, 0.83-0.91x at 32 and 64 x 128 x 64 below them.
- ``cpp-layernorm`` against ``reference`` (the layer-normalised cells' only other route), B=32,
  H=512, input 512, T=256, training: see docs/cells.md's benchmark rows.
- GRU and RNN: the C++ loops beat torch's kernels on the CPU in training and inference; where they
  are not built, torch's kernel wins inference over the Python loops.
- CUDA with lengths (``PACKED_DEVICES``): torch.nn's packed path measured 1.6-2.5x faster than the
  per-step loop (H100, B=64, H=512, T=256, training); routed, rnnkit runs at 0.95-0.96x of it. On
  the CPU torch's packed path is slow, so lengths keep rnnkit's kernels there.
- ``step-graph`` is placed by launch count too (one graph replay and the copies in and out, where
  ``step-matmul`` launches a few kernels per layer), not yet measured on a GPU.
- ``triton-loops`` is placed by launch count, not yet by a measurement on a GPU: one matmul and one
  kernel per step, where ``generic`` launches a dozen pointwise kernels and ``python-loops`` about
  six; its rows in ``python -m rnnkit.bench --device cuda`` measure it against torch.nn.
- cpp-projecting against projecting beforehand (one matmul, then the loop), LSTM, batch 1-64,
  H 128 and 512: 1.03-1.27x.
- step-loops against step-matmul (tokens alternated in one process, 1 thread), both reading the
  weights at each call (nothing cached, so nothing can be stale): step-matmul 1.3-3.5x faster for
  the LSTM, GRU and RNN at batch 1, 8 and 64, 1 layer of 64 to 3 of 512 (packing per call costs
  more than the blocked matmul saves). Against the packs once cached (the earlier design, which
  missed writes through ``.data``): batch 1 a draw or faster at 1 x 64 (LSTM 1.5-3x as one C++
  call, ``lstm_step_rows``; its kernel 1.2x the cached loop's at 1 x 512), the LSTM 1.2x slower at
  2 x 256 and batch 8 and 1.05-1.1x at batch 64, the GRU within 1.0-1.2x. The GRU's step as one C++
  call (``gru_step_rows``) against its gate math in torch ops: torch.nn's time over rnnkit's from
  0.88 to 0.98-0.99 at 2 x 256, batch 1 and 8 (1 thread, loaded machine).

Choices inside a route, each a kernel's own and documented where it is made: step-matmul's
matrix-vector kernels up to ``step.NATIVE_MAX_BYTES``; the generic kernel's recurrent matmul
(rnnkit's blocked matmul, oneDNN from ``generic.DNN_MIN_MACS``, or at::mm); buffers from the C++
workspace from ``native.WORKSPACE_MIN_BYTES``.

Choosing a route: ``with routing.force("reference"):`` runs every layer call inside the block
through that route (a ``contextvars.ContextVar``: scoped to the block, the thread and the task);
a route that cannot compute a call raises ``ValueError`` saying why. Tests and the benchmark use
it to compare routes. A new route is one ``Route`` entry in ``ROUTES``: its name, what it runs,
when it is taken, ``supports`` (``None`` where it can compute a call, else why not), ``faster``
and ``run`` (for a route that runs each cell over time, ``stack.per_cell(scan)``).

>>> import torch, rnnkit
>>> lstm = rnnkit.LSTM(8, 16)
>>> rnnkit.explain(lstm, torch.randn(4, 10, 8)).name in ("cpp-loops", "torch-kernel", "python-loops")
True
>>> with rnnkit.routing.force("reference"):
...     out, _ = lstm(torch.randn(4, 10, 8))
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
from torch import Tensor

from rnnkit.core import cuda_graphs, native, ops, parallel_scan, pointwise, stack, step, traced_scan
from rnnkit.core.cells.lstm import LSTMCell, ProjectedLSTMCell
from rnnkit.core.cells.scan_cell import ParallelScanCell
from rnnkit.core.gates import only_combine_customised
from rnnkit.core.kernels import triton_loops, triton_pointwise
from rnnkit.core.kernels.base import Kernel
from rnnkit.core.kernels.layernorm_loops import LAYERNORM_CELLS, scan_layernorm
from rnnkit.core.kernels.state_noise import active_for, describe
from rnnkit.core.kernels.table import GENERIC, KERNELS, kernel_for, own_loops
from rnnkit.core.kernels.vendor import VENDOR

LOG = logging.getLogger("rnnkit.routing")

NATIVE_LSTM_MAX_STATE = 1024  # batch x hidden: LSTM training at or below this runs the C++ loops
NATIVE_LSTM_MIN_TRAIN_GATES = 2 << 20  # T x B x 4H: LSTM training above this runs the C++ loops
PACKED_DEVICES = ("cuda",)  # where a built-in stack with lengths runs torch's packed-sequence kernel


def functorch_active() -> bool:
    """Whether a functorch transform (vmap, grad, ...) is running: only the reference runs there."""
    active = getattr(torch._C, "_are_functorch_transforms_active", None)
    return bool(active and active())


class Call:
    """What a route is chosen from: the call's arguments and the facts about them, computed once."""

    __slots__ = (
        "B",
        "T",
        "_programs",
        "autocast",
        "combine",
        "full",
        "functorch",
        "grad",
        "kernel",
        "layer",
        "lean",
        "lengths",
        "native",
        "noise",
        "state",
        "tracer",
        "x",
    )
    lean: str | None  # None where the lean one-step path can take the call, else why not
    B: int
    T: int
    kernel: Kernel | None  # the stack's kernel (kernels/table.py), None: the reference only
    combine: Callable  # the cells' combine
    grad: bool  # gradients wanted: grad mode on and x, a weight or the state requires them
    native: bool  # the C++ loops run on x (the CPU, float32/float64, built), no functorch
    autocast: bool  # autocast on for x's device
    functorch: bool  # inside a functorch transform
    tracer: str | None  # which PyTorch tracer records the call (``tracer()``), None in an eager call
    noise: str | None  # zoneout and recurrent dropout current for the cells (kernels/state_noise.py), or None

    def __init__(self, layer, x, state, lengths):
        self.layer, self.x, self.state, self.lengths = layer, x, state, lengths
        self.tracer = tracer()
        self.noise = None
        self.full = False  # the facts below ``lean`` computed (``_complete``)
        self._programs: object = ()  # the compiled combine once looked up (``_programs``)


# -- the facts ---------------------------------------------------------------------------------

TRACERS = {
    "dynamo": "torch.compile / torch.export",
    "jit": "torch.jit.trace (and torch.onnx.export(dynamo=False), which runs it)",
}


def tracer() -> str | None:
    """Which of PyTorch's tracers records the call: ``"jit"`` (``torch.jit.trace``, the legacy ONNX
    exporter), ``"dynamo"`` (``torch.compile``, ``torch.export``, the ONNX exporter with
    ``dynamo=True``), or ``None`` for an eager call."""
    if torch.jit.is_tracing():
        return "jit"
    if torch.compiler.is_compiling():
        return "dynamo"
    return None


def _lean(layer, x, state, lengths) -> str | None:
    if state is None:
        return "no state carried"
    if lengths is not None:
        return "lengths given"
    if torch.is_grad_enabled():
        return "gradients are on"
    return lean_step(layer, x, state)


def lean_step(layer, x, state) -> str | None:
    """``None`` where a call with a carried state, no lengths and gradients off is one step the lean
    path (step.py) can take as it is, else why not (the general routes then validate and name a
    problem)."""
    return _lean_step(layer, x, state)[0]


def _cells(layer) -> list:
    """The layer's cells without nn.Module's slow attribute access: a ``Recurrent``'s submodules, or
    the cells a torch.nn-contract layer binds to its weights (layers.py's ``_Bound``, a plain list)."""
    modules = layer.__dict__.get("_modules")
    if modules is not None and "cells" in modules:
        return list(modules["cells"]._modules.values())
    return list(layer.cells)


def _lean_step(layer, x, state) -> tuple[str | None, list, int]:
    """``lean_step``'s answer, and where it is ``None`` the layer's cells and the batch size."""
    if not isinstance(x, Tensor) or x.dim() != 3:
        return "x is not a (B, T, I) tensor", [], 0
    if layer.batch_first:
        B, T, I = x.shape
    else:
        T, B, I = x.shape
    cells = _cells(layer)
    ref = cells[0]._parameters["weight_ih"]
    if T != 1:
        return "more than one step", [], 0
    if B == 0 or layer.input_size != I or x.dtype != ref.dtype or x.device != ref.device:
        return "x does not match the layer", [], 0
    if torch.is_autocast_enabled(x.device.type):  # its linears would come back in half precision
        return "autocast is on", [], 0
    if functorch_active():
        return "inside a functorch transform", [], 0
    parts = (state,) if isinstance(state, Tensor) else tuple(state)
    rows, H = len(cells), layer.hidden_size
    if len(parts) != len(layer.State._fields) or any(
        not isinstance(p, Tensor) or p.shape != (rows, B, H) or p.dtype != x.dtype or p.device != x.device
        for p in parts
    ):
        return "the state does not match the layer", [], 0
    # the steppers run the weights themselves: cells that change only combine (a torch.nn-contract
    # layer's bound cells say so once, when bound: layers.py's _Bound)
    plain = layer.__dict__.get("plain_cells")
    if not (plain if plain is not None else all(map(only_combine_customised, cells))):
        return "a cell changes more than combine", [], 0
    noisy = active_for(cells)
    if noisy is not None:
        return f"{noisy} in training (rnnkit.Regularised): the steppers apply neither", [], 0
    return None, cells, B


def _step_loops_why(x: Tensor, cells: list) -> str | None:
    """``None`` where step-loops can run a lean step of ``cells``, else why not."""
    if native.ops_for(x) is None:
        return "the C++ loops do not run here (the CPU, float32/float64, built)"
    if any(p.dtype != x.dtype for p in step.weights(cells)):
        return "the weights' dtypes differ from x's"
    return None


def lean_route(layer, x, state) -> Route | None:
    """The route of an eager lean step (a carried state, gradients off, no route forced), decided in
    one pass over the checks since it runs at every generated token; ``None`` where the call is
    anything else (``choose_route`` then decides, and the table says why). The same choice as the
    table's first rows (a test holds the two together)."""
    if state is None or torch.is_grad_enabled() or tracer() is not None or _FORCED.get() is not None:
        return None
    if _lean_step(layer, x, state)[0] is not None:
        return None
    route = STEP_GRAPH if x.device.type == "cuda" and cuda_graphs.why_not(layer, x) is None else STEP_MATMUL
    if LOG.isEnabledFor(logging.DEBUG):
        LOG.debug("%s: %s", type(getattr(layer, "layer", layer)).__name__, route.name)
    return route


def validate(layer, x) -> None:
    """The checks of ``x`` every whole-sequence route relies on, with messages for the user."""
    if not isinstance(x, Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    layout = "(B, T, input_size)" if layer.batch_first else "(T, B, input_size)"
    if x.dim() != 3 or x.shape[2] != layer.input_size:
        raise ValueError(f"x must have shape {layout} with input_size={layer.input_size}, got {tuple(x.shape)}")
    if not x.dtype.is_floating_point:
        raise TypeError(f"x must be a floating-point tensor, got dtype {x.dtype}")
    ref = layer.cells[0].weight_ih
    if x.device != ref.device:
        raise ValueError(f"x is on {x.device} but the layer's parameters are on {ref.device}")
    if x.dtype != ref.dtype:
        raise TypeError(f"x has dtype {x.dtype} but the layer's parameters have dtype {ref.dtype}")
    if x.shape[0] == 0 or x.shape[1] == 0:
        raise ValueError(f"x must have at least one sequence and one step, got shape {tuple(x.shape)}")


def _complete(call: Call) -> Call:
    """The facts the whole-sequence routes need (``x`` validated first)."""
    layer, x = call.layer, call.x
    validate(layer, x)
    cells = layer.cells
    call.B, call.T = (x.shape[0], x.shape[1]) if layer.batch_first else (x.shape[1], x.shape[0])
    first = cells[0]
    same = all(type(c) is type(first) for c in cells)
    call.kernel = kernel_for(first) if same and all(map(only_combine_customised, cells)) else None
    call.combine = type(first).combine
    call.functorch = functorch_active()
    call.autocast = torch.is_autocast_enabled(x.device.type)
    # a traced call takes no route that reads it, and torch.compile cannot trace the first load's lock
    call.native = not call.functorch and call.tracer is None and native.ops_for(x) is not None
    state = call.state
    parts = (state,) if isinstance(state, Tensor) else tuple(state) if isinstance(state, (tuple, list)) else ()
    call.grad = torch.is_grad_enabled() and (
        x.requires_grad
        or any(p.requires_grad for c in cells for p in c._parameters.values() if p is not None)
        or any(isinstance(p, Tensor) and p.requires_grad for p in parts)
    )
    # zoneout and recurrent dropout (rnnkit.Regularised); torch.compile cannot read their ContextVar, so a
    # traced call's come as choose_route's argument
    if call.tracer != "dynamo":
        call.noise = active_for(cells)
    call.full = True
    return call


def _programs(call: Call):
    """The user's cell's compiled ``combine`` (core/pointwise.py), or ``None``; looked up once a call."""
    if call._programs == ():
        call._programs = pointwise.compiled(call.layer.cells[0]) if call.kernel is GENERIC and call.native else None
    return call._programs


def _builtin(call: Call) -> bool:
    return call.kernel is not None and call.kernel is KERNELS.get(call.combine)


def lstm_loops_faster(call: Call) -> bool:
    """Whether an LSTM stack runs this call faster on the C++ loops than on oneDNN (measured: above)."""
    B, T, H = call.B, call.T, call.layer.hidden_size
    return not call.grad or B * H <= NATIVE_LSTM_MAX_STATE or T * B * 4 * H > NATIVE_LSTM_MIN_TRAIN_GATES


# -- each route's conditions: supports (None or why not) and faster ------------------------------


def _traced_ops_supports(call: Call) -> str | None:
    if call.tracer != "dynamo":
        return "not traced by torch.compile or torch.export (eager calls take the measured routes)"
    if not _builtin(call):
        return "not a built-in cell as shipped"
    if call.noise:
        return f"{call.noise}: the operators apply neither (traced-scan does)"
    return "inside a functorch transform" if call.functorch else None


def _step_graph_supports(call: Call) -> str | None:
    if call.lean is not None:
        return call.lean
    return cuda_graphs.why_not(call.layer, call.x)


def _step_loops_supports(call: Call) -> str | None:
    if call.lean is not None:
        return call.lean
    return _step_loops_why(call.x, _lean_step(call.layer, call.x, call.state)[1])


def _step_loops_faster(call: Call) -> bool:
    return False  # packing at each call costs more than the blocked matmul saves (module docstring)


def _step_matmul_supports(call: Call) -> str | None:
    return call.lean


def _projected(call: Call) -> bool:
    return type(call.layer.cells[0]) is ProjectedLSTMCell


def _vendor_supports(call: Call) -> str | None:
    layer = call.layer
    if not _projected(call) and (not _builtin(call) or call.combine not in VENDOR):
        return "not a stack of one built-in cell as shipped"
    if call.tracer == "jit" and call.lengths is not None:
        return "lengths under torch.jit.trace (its packed-sequence graph holds this batch's lengths and order)"
    if call.lengths is not None and call.tracer is None and _has_empty(call.lengths):
        return "an empty sequence (length 0), which torch's packed kernel refuses"
    if layer.training and layer.dropout > 0:
        return "dropout in training (torch's kernel draws another random stream)"
    if call.noise:
        return f"{call.noise}: torch's kernel applies neither"
    if call.functorch:
        return "inside a functorch transform"
    device = call.x.device.type
    if device == "cpu":
        if call.autocast:
            return "CPU autocast"
        if call.x.dtype not in native.FLOATS:
            return "not float32/float64"
    elif device != "cuda":
        return f"no torch kernel routed on {device}"
    return None


def _has_empty(lengths) -> bool:
    if isinstance(lengths, Tensor):
        return bool((lengths == 0).any())
    return isinstance(lengths, (list, tuple)) and 0 in lengths


def _vendor_faster(call: Call) -> bool:
    if call.tracer == "jit":
        return True  # the one route torch.jit.trace records correctly
    device = call.x.device.type
    if _projected(call):  # torch.nn.LSTM's proj_size: the other kernels compute no projection
        return True
    if call.lengths is not None and device not in PACKED_DEVICES:
        return False
    if device != "cpu":
        return True
    if call.x.dtype != torch.float32:
        return False
    if call.combine is LSTMCell.combine:
        return torch.backends.mkldnn.is_available() and not (native.ops() is not None and lstm_loops_faster(call))
    return not call.grad and native.ops() is None  # the C++ loops beat torch's GRU and RNN


def _triton_loops_supports(call: Call) -> str | None:
    if call.x.device.type != "cuda":
        return "not a CUDA tensor"
    if call.kernel is None:
        return "not a stack of one cell class that changes only combine"
    if call.functorch:
        return "inside a functorch transform"
    if call.noise:
        return f"{call.noise}: the Triton loops apply neither (the generic kernel does)"
    if not triton_pointwise.available():
        return "Triton is not installed (pip install rnnkit[gpu])"
    if pointwise.compiled(call.layer.cells[0]) is None:
        return "its combine does not compile (core/pointwise.py)"
    return None


def _cpp_projecting_supports(call: Call) -> str | None:
    if call.grad:
        return "gradients are wanted"
    if call.noise:
        return f"{call.noise}: the projecting loops apply neither"
    if not call.native or call.autocast:
        return "the C++ loops do not run here (the CPU, float32/float64, built, no autocast)"
    if call.kernel is KERNELS[LSTMCell.combine] or (call.kernel is GENERIC and _programs(call) is not None):
        return None
    return "neither the LSTM nor a user's cell whose combine compiles"


def _cpp_loops_supports(call: Call) -> str | None:
    if not _builtin(call) and own_loops(call.layer.cells) is None:
        return "not a built-in cell as shipped"
    return None if call.native else "the C++ loops do not run here (the CPU, float32/float64, built)"


def _cpp_compiled_supports(call: Call) -> str | None:
    if call.kernel is not GENERIC:
        return "not a user's cell that changes only combine"
    if not call.native:
        return "the C++ loops do not run here (the CPU, float32/float64, built)"
    return None if _programs(call) is not None else "its combine does not compile (core/pointwise.py)"


def _cpp_layernorm_supports(call: Call) -> str | None:
    if not all(type(c) in LAYERNORM_CELLS for c in call.layer.cells):
        return "not a stack of layer-normalised LSTM or GRU cells as shipped"
    if not call.native:
        return "the C++ loops do not run here (the CPU, float32/float64, built)"
    if any(p.dtype not in native.FLOATS for c in call.layer.cells for p in c._parameters.values() if p is not None):
        return "the weights are not float32/float64"
    return None


def _python_loops_supports(call: Call) -> str | None:
    if not _builtin(call):
        return "not a built-in cell as shipped"
    if call.noise:
        return f"{call.noise}: the Python loops apply neither (the generic kernel does)"
    return "inside a functorch transform" if call.functorch else None


def _generic_supports(call: Call) -> str | None:
    if call.kernel is None or (call.kernel is not GENERIC and not call.noise):  # with noise, built-in cells too
        return "not a user's cell that changes only combine"
    return "inside a functorch transform" if call.functorch else None


def _parallel_scan_supports(call: Call) -> str | None:
    if not all(isinstance(c, ParallelScanCell) for c in call.layer.cells):
        return "not a stack of parallel-scan cells (minGRU, minLSTM)"
    if call.noise and "recurrent dropout" in call.noise:  # zoneout: folded into the scan's coefficients
        return "recurrent dropout: the scan's gates read no previous output to drop"
    return "inside a functorch transform" if call.functorch else None


def _traced_scan_supports(call: Call) -> str | None:
    if call.tracer != "dynamo":
        return "not traced by torch.compile or torch.export (eager calls take the measured routes)"
    return "inside a functorch transform" if call.functorch else None


def _always(call: Call):
    return None


def _yes(call: Call) -> bool:
    return True


# -- the table -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Route:
    """One implementation of a layer call: its name, what it runs, when the table takes it."""

    name: str  # what ``force`` and ``explain`` call it
    runs: str  # the implementation, in words
    when: str  # the condition the table takes it under, in words
    supports: Callable[[Call], str | None] = field(repr=False, compare=False)  # None: it can compute the call
    faster: Callable[[Call], bool] = field(repr=False, compare=False)  # where it measured fastest
    run: Callable = field(repr=False, compare=False)  # (layer, x, state, lengths) -> (output, state)
    step: bool = False  # runs only the lean one-step calls (the call's facts for the others not needed)
    tracers: tuple[str, ...] = ()  # the tracers (``tracer()``) that record this route as a correct graph
    traced_only: bool = False  # taken only under a tracer: an eager call passes it over at no cost (a lean
    # step would otherwise pay for the whole-sequence facts, ``_complete``, before reaching its route)

    def __str__(self) -> str:
        return f"{self.name}: {self.runs}"


ROUTES: tuple[Route, ...] = (
    Route(
        "traced-ops",
        "each cell's loop over time as one registered operator (torch.ops.rnnkit), the rest torch ops",
        "a built-in cell while torch.compile or torch.export traces the call",
        _traced_ops_supports,
        _yes,
        stack.per_cell(ops.scan_cell),
        tracers=("dynamo",),
        traced_only=True,
    ),
    Route(
        "step-graph",
        "one step of the stack on CUDA replayed from a CUDA graph captured per batch size",
        "one step with a carried state and gradients off, on CUDA",
        _step_graph_supports,
        _yes,
        lambda layer, x, state, lengths: cuda_graphs.step_graphed(layer, x, state),
        step=True,
    ),
    Route(
        "step-loops",
        "one step of each cell through the C++ loops with T = 1, the weights packed at each call",
        "only where forced: measured slower than step-matmul",
        _step_loops_supports,
        _step_loops_faster,
        lambda layer, x, state, lengths: step.step_layers(layer, x, state, loops=True),
        step=True,
    ),
    Route(
        "step-matmul",
        "one step on the weights as stored (x W_ih^T + h W_hh^T), then the gate math (the LSTM and GRU one C++ call)",
        "one step with a carried state and gradients off",
        _step_matmul_supports,
        _yes,
        lambda layer, x, state, lengths: step.step_layers(layer, x, state, loops=False),
        step=True,
    ),
    Route(
        "torch-kernel",
        "the whole stack in torch's own kernel (oneDNN's LSTM on the CPU, cuDNN on CUDA)",
        "a built-in cell as shipped, where torch's kernel measured fastest",
        _vendor_supports,
        _vendor_faster,
        stack.run_vendor,
        tracers=("jit",),
    ),
    Route(
        "triton-loops",
        "a cell's loop over time on CUDA: the recurrent matmul, then one Triton kernel from its compiled combine",
        "a cell that changes only combine and compiles, on CUDA, where torch's kernel does not run",
        _triton_loops_supports,
        _yes,
        stack.per_cell(triton_loops.scan_triton),
    ),
    Route(
        "cpp-projecting",
        "inference in the C++ loop that projects its input per step",
        "inference on the CPU where the C++ loops are built: the LSTM or a user's compiled cell",
        _cpp_projecting_supports,
        _yes,
        stack.per_cell(stack.scan_cpp_projecting),
    ),
    Route(
        "cpp-loops",
        "a built-in cell's C++ loop over time, backward in C++",
        "a built-in cell on the CPU where the C++ loops are built",
        _cpp_loops_supports,
        _yes,
        stack.per_cell(stack.scan_cpp),
    ),
    Route(
        "cpp-compiled",
        "a user's combine compiled to a program, run over time in C++",
        "a user's cell whose combine compiles, on the CPU where the C++ loops are built",
        _cpp_compiled_supports,
        _yes,
        stack.per_cell(stack.scan_cpp_compiled),
    ),
    Route(
        "cpp-layernorm",
        "a layer-normalised LSTM or GRU over time in C++, backward by hand (gains and biases included)",
        "a stack of layer-normalised LSTM or GRU cells on the CPU where the C++ loops are built",
        _cpp_layernorm_supports,
        _yes,
        stack.per_cell(scan_layernorm),
    ),
    Route(
        "python-loops",
        "a built-in cell's loop over time in torch ops, backward written by hand",
        "a built-in cell where the C++ loops do not run",
        _python_loops_supports,
        _yes,
        stack.per_cell(stack.scan_python),
    ),
    Route(
        "generic",
        "a user's combine stepped in torch ops, backward through time by one autograd call",
        "a user's cell that changes only combine, where it does not compile",
        _generic_supports,
        _yes,
        stack.per_cell(stack.scan_generic),
    ),
    Route(
        "parallel-scan",
        "each cell's input projection, then one linear scan over time (core/parallel_scan.py)",
        "a stack of cells whose gates read the input only (minGRU, minLSTM)",
        _parallel_scan_supports,
        _yes,
        stack.per_cell(parallel_scan.scan_layer),
    ),
    Route(
        "traced-scan",
        "each cell's input projection, then cell.step over time as one node of torch's scan operator",
        "any other cell while torch.compile or torch.export traces the call",
        _traced_scan_supports,
        _yes,
        stack.per_cell(traced_scan.scan_cell),
        tracers=("dynamo",),
        traced_only=True,
    ),
    Route(
        "reference",
        "cell.project_input, then cell.step over time with autograd (the specification)",
        "anything else: a cell that changes step, a projection or has parameters of its own; functorch",
        _always,
        _yes,
        stack.per_cell(stack.scan_cell_reference),
        tracers=("dynamo",),
    ),
)
ROUTE_NAMES = {route.name: route for route in ROUTES}
STEP_GRAPH, STEP_LOOPS, STEP_MATMUL = ROUTE_NAMES["step-graph"], ROUTE_NAMES["step-loops"], ROUTE_NAMES["step-matmul"]

_FORCED: contextvars.ContextVar[Route | None] = contextvars.ContextVar("rnnkit_forced_route", default=None)


@contextlib.contextmanager
def force(name: str) -> Iterator[Route]:
    """Run every layer call inside the block through the route ``name`` (one of ``ROUTE_NAMES``).

    Scoped to the block and to the thread or task that entered it. A call the route cannot
    compute raises ``ValueError`` with the reason, rather than quietly taking another route.
    """
    if name not in ROUTE_NAMES:
        raise ValueError(f"unknown route {name!r}; routes: {', '.join(ROUTE_NAMES)}")
    token = _FORCED.set(ROUTE_NAMES[name])
    try:
        yield ROUTE_NAMES[name]
    finally:
        _FORCED.reset(token)


def choose_route(layer, x, state=None, lengths=None, noise: dict | None = None) -> Route:
    """The route ``layer(x, state, lengths)`` runs (the table in this module's docstring).

    ``noise`` ({cell index: StateNoise}) is the zoneout and recurrent dropout of a traced call, which
    its route then takes as an argument (an eager call's are current for its cells,
    kernels/state_noise.py). Raises what the layer call would raise for a malformed ``x``; ``state``
    and ``lengths`` are validated by the route that runs."""
    route = lean_route(layer, x, state) if lengths is None else None  # a lean step: in one pass
    if route is not None:
        return route
    call = Call(layer, x, state, lengths)
    if call.tracer == "dynamo" and noise:
        call.noise = describe(noise.values())
    call.lean = _lean(layer, x, state, lengths) if call.tracer is None else f"traced by {TRACERS[call.tracer]}"
    # torch.compile cannot read a ContextVar: a forced route applies to eager (and jit-traced) calls
    forced = _FORCED.get() if call.tracer != "dynamo" else None
    if forced is not None:
        if not forced.step:
            _complete(call)
        why = forced.supports(call)
        if why is not None:
            raise ValueError(f"route {forced.name!r} cannot run this call: {why}")
        route = forced
    else:
        route = _choose(call)
    if call.tracer is None and LOG.isEnabledFor(logging.DEBUG):  # torch.compile cannot trace logging
        LOG.debug("%s: %s", type(getattr(layer, "layer", layer)).__name__, route.name)  # layers.py's _Bound
    return route


def _choose(call: Call, passed: list | None = None) -> Route:
    if call.tracer is not None and passed is None:
        passed = []  # the reasons go into the error if no route can be traced
    for route in ROUTES:
        if route.traced_only and call.tracer is None:
            if passed is not None:
                passed.append(
                    (route.name, "not traced by torch.compile or torch.export (eager calls take the measured routes)")
                )
            continue
        if not route.step and not call.full:
            _complete(call)
        if call.tracer is not None and call.tracer not in route.tracers:
            why: str | None = f"{TRACERS[call.tracer]} would not record it as a correct graph"
        else:
            why = route.supports(call)
        if why is None and route.faster(call):
            return route
        if passed is not None:
            passed.append((route.name, why if why is not None else "measured slower here"))
    # only a traced call gets here (the reference takes every eager call)
    reasons = "; ".join(f"{name}: {why}" for name, why in passed or () if not why.endswith("correct graph"))
    raise RuntimeError(
        f"{type(call.layer).__name__} cannot be recorded by {TRACERS[call.tracer or 'jit']} for this call ({reasons}). "
        "Use torch.export.export or torch.onnx.export(..., dynamo=True), which record rnnkit's operators "
        "at any batch size and length (docs: shipping)"
    )


@dataclass(frozen=True)
class Explanation:
    """The route of one call and why each route before it in the table was passed over."""

    route: Route
    passed: tuple[tuple[str, str], ...]  # (route name, why not), in the table's order

    @property
    def name(self) -> str:
        return self.route.name

    def __str__(self) -> str:
        lines = [f"{self.route.name}: {self.route.runs}", f"  taken: {self.route.when}"]
        lines += [f"  not {name}: {why}" for name, why in self.passed]
        return "\n".join(lines)


def explain(layer, x, state=None, lengths=None) -> Explanation:
    """Which route ``layer(x, state, lengths)`` would run, and why, without running it.

    ``str()`` of the result reads as a few lines; ``.name`` is the route's name. Inside
    ``force(name)`` it is the forced route (or the ``ValueError`` the call would raise).

    >>> import torch, rnnkit
    >>> gru = rnnkit.GRU(4, 8, batch_first=True).eval()
    >>> _, h = gru(torch.randn(1, 3, 4))
    >>> with torch.no_grad():
    ...     print(rnnkit.explain(gru, torch.randn(1, 1, 4), h).name in ("step-loops", "step-matmul"))
    True
    """
    if _FORCED.get() is not None:
        return Explanation(choose_route(layer, x, state, lengths), ())
    call = Call(layer, x, state, lengths)
    call.lean = _lean(layer, x, state, lengths)
    passed: list = []
    route = _choose(call, passed)
    return Explanation(route, tuple(passed))
