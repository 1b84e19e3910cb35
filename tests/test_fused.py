"""The fast routes equal the specification: every kernel == scan_reference, lean stepping == the general route.

The kernels (rnnkit.core.kernels) are held to ``scan_reference`` -- outputs, final states and
the gradients of x, the initial state and every weight -- for every built-in cell, for cells
written by users, with lengths, both directions, stacking and dropout, in float64 (1e-10) and
float32 (1e-5); plus gradcheck on small sizes. Parity with torch.nn itself is test_core_parity.
"""

from __future__ import annotations

import contextlib
import copy
import itertools
import json
import pickle
import shutil
import subprocess
import sys

import pytest
import torch

import rnnkit
from rnnkit.bench import run as bench_run
from rnnkit.core import native, pointwise, routing
from rnnkit.core import step as step_module
from rnnkit.core.kernels import table
from rnnkit.core.kernels.compiled import CompiledKernel
from rnnkit.core.kernels.dispatch import FusedScan, fused_scan
from rnnkit.core.scan import scan_reference
from user_cells import MGUCell, UserGRUCell, UserLSTMCell

TOL = {torch.float32: 1e-5, torch.float64: 1e-10}

LOOPS = ["python"] + (["cpp"] if native.ops() is not None else [])


@pytest.fixture(params=LOOPS)
def loops(request, monkeypatch):
    """Run a test with the built-in kernels' C++ step loops (where they build) and with the Python ones."""
    if request.param == "python":
        monkeypatch.setitem(native._state, "ops", None)
    return request.param


def test_the_cpp_loops_build_where_there_is_a_compiler():
    if shutil.which("c++") is None and shutil.which("g++") is None:
        pytest.skip("no C++ compiler here: the Python loops run instead")
    assert native.ops() is not None


class OwnStepCell(MGUCell):
    """A cell that rewrites ``step`` itself: the fused kernels must leave it to the reference loop."""

    def step(self, xz, state):
        return super().step(xz * 0.5, state)


LAYERS = {
    "lstm": lambda **kw: rnnkit.LSTM(**{"batch_first": True, **kw}),
    "gru": lambda **kw: rnnkit.GRU(**{"batch_first": True, **kw}),
    "rnn_tanh": lambda **kw: rnnkit.RNN(**{"batch_first": True, **kw}),
    "rnn_relu": lambda **kw: rnnkit.RNN(nonlinearity="relu", **{"batch_first": True, **kw}),
    "mgu": lambda **kw: rnnkit.Recurrent(MGUCell, **{"batch_first": True, **kw}),
    "user_lstm": lambda **kw: rnnkit.Recurrent(UserLSTMCell, **{"batch_first": True, **kw}),
    "user_gru": lambda **kw: rnnkit.Recurrent(UserGRUCell, **{"batch_first": True, **kw}),
}


def _parts(state):
    return tuple(state) if isinstance(state, tuple) else (state,)


def _fused(on: bool):
    """Layers through the routes the table picks (on) or through ``reference`` (off) inside the block."""
    return contextlib.nullcontext() if on else routing.force("reference")


def _kernel(cell):
    """The kernel the routing table gives ``cell`` over time where the C++ loops are built (or not)."""
    kernel = table.kernel_for(cell)
    if native.ops() is None:
        return kernel
    if kernel is table.GENERIC:
        programs = pointwise.compiled(cell)
        return CompiledKernel(programs) if programs is not None else kernel
    return table.CPP[type(cell).combine]


def _run(layer, x, state, lengths, fused_on: bool, seed=0):
    """Outputs, final state and all gradients of a random linear functional of them."""
    with _fused(fused_on):
        xi = x.clone().requires_grad_()
        si = tuple(s.clone().requires_grad_() for s in state)
        torch.manual_seed(seed)  # the same dropout masks on both paths
        out, final = layer(xi, si if len(si) > 1 else si[0], lengths=lengths)
        g = torch.Generator().manual_seed(1)
        weights = lambda t: torch.randn(t.shape, generator=g, dtype=t.dtype).to(t.device)  # same on any device
        loss = (out * weights(out)).sum()
        for f in _parts(final):
            loss = loss + (f * weights(f)).sum()
        grads = torch.autograd.grad(loss, [xi, *si, *layer.parameters()])
        return [out, *_parts(final), *grads]


def _max_diff(a, b):
    """Largest difference, relative to each tensor's scale where that exceeds 1 (float32 sums over steps)."""
    return max(((x - y).abs().max() / y.abs().max().clamp(min=1)).item() for x, y in zip(a, b))


@pytest.mark.parametrize(
    "kind,dtype,bidirectional,with_lengths",
    list(itertools.product(LAYERS, [torch.float64, torch.float32], [False, True], [False, True])),
)
def test_fused_equals_reference(kind, dtype, bidirectional, with_lengths, loops):
    B, T, I, H, L = 3, 7, 4, 5, 2
    layer = LAYERS[kind](input_size=I, hidden_size=H, num_layers=L, bidirectional=bidirectional).to(dtype)
    D = 2 if bidirectional else 1
    x = torch.randn(B, T, I, dtype=dtype)
    state = tuple(torch.randn(L * D, B, H, dtype=dtype) for _ in layer.State._fields)
    lengths = torch.tensor([7, 3, 5]) if with_lengths else None
    got = _run(layer, x, state, lengths, fused_on=True)
    want = _run(layer, x, state, lengths, fused_on=False)
    assert _max_diff(got, want) < TOL[dtype]


@pytest.mark.parametrize("kind", list(LAYERS))
def test_fused_with_dropout_and_without_bias(kind, loops):
    layer = LAYERS[kind](input_size=3, hidden_size=4, num_layers=3, dropout=0.3, bias=False).double().train()
    x = torch.randn(2, 6, 3, dtype=torch.float64)
    state = tuple(torch.randn(3, 2, 4, dtype=torch.float64) for _ in layer.State._fields)
    got = _run(layer, x, state, [6, 4], fused_on=True)
    want = _run(layer, x, state, [6, 4], fused_on=False)
    assert _max_diff(got, want) < 1e-10


@pytest.mark.parametrize("kind", ["lstm", "gru", "rnn_tanh", "rnn_relu", "mgu"])
def test_fused_float32_larger_sizes(kind, loops):
    layer = LAYERS[kind](input_size=16, hidden_size=32, num_layers=2, bidirectional=True)
    x = torch.randn(8, 40, 16)
    state = tuple(torch.randn(4, 8, 32) for _ in layer.State._fields)
    lengths = torch.randint(1, 41, (8,))
    got = _run(layer, x, state, lengths, fused_on=True)
    want = _run(layer, x, state, lengths, fused_on=False)
    assert _max_diff(got, want) < 1e-5


@pytest.mark.parametrize("kind", ["lstm", "gru", "rnn_tanh", "rnn_relu", "mgu"])
@pytest.mark.parametrize(
    "batch,hidden,dtype",
    [(1, 70, torch.float64), (7, 70, torch.float32), (3, 300, torch.float32), (11, 33, torch.float64)],
)
@pytest.mark.parametrize("bias", [True, False])
def test_every_remainder_of_the_blocked_matmul(kind, batch, hidden, dtype, bias):
    """native.cpp's recurrent matmul runs MR rows at a time (4 for the LSTM, 5 or 4 for the GRU, 8 for
    the RNN) and L hidden units per block (16 floats or 8 doubles with AVX-512): batches of 1, 3, 7
    and 11 leave every smaller row count, and hidden 33, 70 and 300 leave partial blocks. Lengths keep
    the LSTM off torch's kernel; the user's cell (mgu) runs the generic kernel."""
    layer = LAYERS[kind](input_size=6, hidden_size=hidden, bidirectional=True, bias=bias).to(dtype)
    x = torch.randn(batch, 9, 6, dtype=dtype)
    state = tuple(torch.randn(2, batch, hidden, dtype=dtype) for _ in layer.State._fields)
    lengths = ([9, 4, 7] * 4)[:batch]
    got = _run(layer, x, state, lengths, fused_on=True)
    want = _run(layer, x, state, lengths, fused_on=False)
    assert _max_diff(got, want) < TOL[dtype]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("rows,inputs,outputs", [(1, 5, 3), (37, 70, 33), (300, 128, 512)])
def test_the_blocked_matmul_the_benchmark_measures(dtype, rows, inputs, outputs):
    """``linear_blocks`` (the bench's measure of the C++ loops' matmul) is F.linear, for row counts
    past a tile (256) and sizes that leave partial blocks, with and without a bias."""
    if native.ops() is None:
        pytest.skip("the C++ loops are not built here")
    x, w, b = (torch.randn(*shape, dtype=dtype) for shape in ((rows, inputs), (outputs, inputs), (outputs,)))
    for bias in (b, None):
        want = torch.nn.functional.linear(x, w, bias)
        assert _max_diff([native.ops().linear_blocks(x, w, bias)], [want]) < TOL[dtype] * inputs


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("rows,inputs,outputs", [(1, 5, 3), (37, 70, 33), (300, 128, 512)])
@pytest.mark.parametrize("transposed", [False, True])
def test_the_packed_matmul_of_the_generic_kernel(dtype, rows, inputs, outputs, transposed):
    """``pack_linear`` once, then ``linear_packed`` per step (the generic kernel's recurrent matmul and
    its backward's, which packs the transpose of a row-major weight from its rows) is F.linear."""
    if native.ops() is None:
        pytest.skip("the C++ loops are not built here")
    x, b = torch.randn(rows, inputs, dtype=dtype), torch.randn(outputs, dtype=dtype)
    w = torch.randn(inputs, outputs, dtype=dtype).t() if transposed else torch.randn(outputs, inputs, dtype=dtype)
    packed = native.ops().pack_linear(w)
    for bias in (b, None):
        want = torch.nn.functional.linear(x, w, bias)
        assert _max_diff([native.ops().linear_packed(x, packed, outputs, bias)], [want]) < TOL[dtype] * inputs
    with pytest.raises(RuntimeError, match="not packed by pack_linear"):
        native.ops().linear_packed(x, packed, outputs + 16, None)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("gates,hidden,inputs", [(4, 20, 7), (3, 33, 16), (1, 5, 40)])
def test_pack_linear_lays_out_blocks_of_hidden_units(dtype, gates, hidden, inputs):
    """``pack_linear(w, G)`` (the forward loops' recurrent weight, packed on every call): block q holds,
    for every k, its L hidden units of each gate side by side, zero past H; from a weight's rows,
    from the rows of the matrix it transposes (G = 1), or from any strided view."""
    if native.ops() is None:
        pytest.skip("the C++ loops are not built here")
    pack = native.ops().pack_linear
    w = torch.randn(gates * hidden, inputs, dtype=dtype)
    packed = pack(w, gates)
    nq, K, G, L = packed.shape
    assert (K, G, nq) == (inputs, gates, -(-hidden // L))
    padded = torch.zeros(gates, nq * L, inputs, dtype=dtype)
    padded[:, :hidden] = w.view(gates, hidden, inputs)
    assert torch.equal(packed, padded.view(gates, nq, L, inputs).permute(1, 3, 0, 2))
    wide = torch.randn(gates * hidden, 2 * inputs, dtype=dtype)
    assert torch.equal(pack(wide[:, ::2], gates), pack(wide[:, ::2].contiguous(), gates))
    a = torch.randn(inputs, gates * hidden, dtype=dtype)  # W = a^T: packed from a's rows
    assert torch.equal(pack(a.t()), pack(a.t().contiguous()))
    with pytest.raises(RuntimeError, match="not a multiple of the gates"):
        pack(torch.randn(5, 3, dtype=dtype), 4)


def test_a_forward_loop_refuses_a_weight_packed_for_other_sizes():
    """The forward ops check the packed weight against xz and the states, and the projecting op its
    operands, before any loop runs (a wrong size would read out of bounds)."""
    if native.ops() is None:
        pytest.skip("the C++ loops are not built here")
    B, T, H = 2, 3, 5
    xz, w = torch.randn(B, T, 4 * H), torch.randn(4 * H, H)
    hs, cs, out = torch.zeros(2, B, H), torch.zeros(2, B, H), torch.empty(B, T, H)
    with pytest.raises(RuntimeError, match="not packed by pack_linear"):
        native.ops().lstm_forward(xz, native.ops().pack_linear(w, 1), None, hs, cs, out, None, None)
    with pytest.raises(RuntimeError, match="disagree on the hidden size"):
        native.ops().lstm_forward(
            xz, native.ops().pack_linear(torch.randn(4 * H, H + 1), 4), None, hs, cs, out, None, None
        )
    x, w_ih = torch.randn(B, T, 3), torch.randn(4 * H, 3)
    packed_ih, packed = native.ops().pack_linear(w_ih, 4), native.ops().pack_linear(w, 4)
    project = native.ops().lstm_forward_projecting
    with pytest.raises(RuntimeError, match="x .B, T, I., hs and cs"):
        project(x[0], packed_ih, None, packed, None, hs, cs, out, None)
    with pytest.raises(RuntimeError, match="disagree on B, T or H"):
        project(x, packed_ih, None, packed, None, hs, cs, torch.empty(B, T + 1, H), None)
    with pytest.raises(RuntimeError, match="disagree on the sizes"):
        project(torch.randn(B, T, 4), packed_ih, None, packed, None, hs, cs, out, None)
    with pytest.raises(RuntimeError, match="a bias of 4H numbers"):
        project(x, packed_ih, torch.randn(4 * H + 1), packed, None, hs, cs, out, None)
    with pytest.raises(RuntimeError, match="mask .B, T. bool"):
        project(x, packed_ih, None, packed, None, hs, cs, out, torch.ones(B, T + 1, dtype=torch.bool))


def test_the_workspace_reuses_a_freed_buffer_and_frees_on_request():
    """Large buffers of the C++ loops come from a workspace: whole 2 MiB blocks, reused for the next
    request of the same size, handed back to the system by ``release_workspace``."""
    ops = native.ops()
    if ops is None:
        pytest.skip("the C++ loops are not built here")
    ops.release_workspace()
    a = ops.workspace([3, 1 << 18], torch.float32)  # 3 MiB: a 4 MiB block
    assert a.shape == (3, 1 << 18) and a.dtype == torch.float32 and a.data_ptr() % (2 << 20) == 0
    where = a.data_ptr()
    a.fill_(1.0)
    del a
    b = ops.workspace([3 << 18], torch.float32)
    assert b.data_ptr() == where
    del b
    assert ops.release_workspace() == 4 << 20
    assert ops.release_workspace() == 0
    # its buffers of 1 MiB or more: the workspace's
    out, _ = rnnkit.GRU(4, 256, batch_first=True)(torch.randn(8, 200, 4))
    out.sum().backward()
    del out
    assert rnnkit.empty_cache() > 0
    assert rnnkit.empty_cache() == 0


@pytest.mark.parametrize("kind", ["lstm", "gru", "rnn_tanh", "mgu"])
def test_every_buffer_through_the_workspace_poisoned_matches_the_reference(kind, monkeypatch):
    """With every buffer taken from the workspace and filled with NaN first, the fused kernels still
    equal the reference (outputs, states, every gradient): no kernel reads a buffer before writing
    it, and no ``out=`` resizes one. Lengths keep the LSTM off torch's kernel."""
    if native.ops() is None:
        pytest.skip("the C++ loops are not built here")
    monkeypatch.setattr(native, "WORKSPACE_MIN_BYTES", 0)
    buffer = native.buffer

    def poisoned(shape, like):
        return buffer(shape, like).fill_(float("nan"))

    monkeypatch.setattr(native, "buffer", poisoned)
    layer = LAYERS[kind](input_size=5, hidden_size=20, num_layers=2, bidirectional=True)
    x = torch.randn(4, 9, 5)
    state = tuple(torch.randn(4, 4, 20) for _ in layer.State._fields)
    lengths = [9, 3, 7, 5]
    got = _run(layer, x, state, lengths, fused_on=True)
    want = _run(layer, x, state, lengths, fused_on=False)
    assert _max_diff(got, want) < 1e-5


def test_the_workspace_frees_its_oldest_blocks_beyond_its_cap():
    """Up to 2 GiB of freed blocks wait; one more frees the oldest, and the newest is served first.
    (1 GiB blocks, never touched: address space only.)"""
    ops = native.ops()
    if ops is None:
        pytest.skip("the C++ loops are not built here")
    ops.release_workspace()
    gib = [1 << 28]  # float32: 1 GiB
    a, b, c = (ops.workspace(gib, torch.float32) for _ in range(3))
    where = {name: t.data_ptr() for name, t in (("a", a), ("b", b), ("c", c))}
    del a, b, c  # a, then b wait; c makes room by freeing a
    d = ops.workspace(gib, torch.float32)
    assert d.data_ptr() == where["c"]
    e = ops.workspace(gib, torch.float32)
    assert e.data_ptr() == where["b"]
    del d, e
    assert ops.release_workspace() == 2 << 30


@pytest.mark.parametrize("kind", list(LAYERS))
def test_any_mask_matches_scan_reference(kind, loops):
    """``scan`` accepts any (B, T) mask, not only prefixes: frozen state and zero output where False."""
    cell = LAYERS[kind](input_size=3, hidden_size=4).double().cells[0]
    B, T = 4, 6
    mask = torch.rand(B, T) > 0.4
    xz = cell.project_input(torch.randn(B, T, 3, dtype=torch.float64)).detach()
    state = cell.State(*(torch.randn(B, 4, dtype=torch.float64) for _ in cell.State._fields))

    def run(fn):
        x = xz.detach().requires_grad_()
        s = cell.State(*(p.clone().requires_grad_() for p in state))
        out, final = fn(cell, x, s, mask)
        loss = (out * torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view_as(out)).sum()
        loss = loss + sum((f * (i + 2)).sum() for i, f in enumerate(final))
        return [out, *final, *torch.autograd.grad(loss, [x, *s, cell.weight_hh, cell.bias_hh])]

    kernel = _kernel(cell)
    assert _max_diff(run(lambda *a: fused_scan(*a, kernel)), run(scan_reference)) < 1e-10


@pytest.mark.parametrize("kind", list(LAYERS))
def test_gradcheck_fused(kind, loops):
    cell = LAYERS[kind](input_size=2, hidden_size=3).double().cells[0]
    mask = torch.tensor([[True, True, True, True], [True, True, False, False], [True, True, True, False]])
    xz = cell.project_input(torch.randn(3, 4, 2, dtype=torch.float64)).detach().requires_grad_()
    state = [torch.randn(3, 3, dtype=torch.float64, requires_grad=True) for _ in cell.State._fields]
    w_hh = cell.weight_hh.detach().clone().requires_grad_()
    b_hh = cell.bias_hh.detach().clone().requires_grad_()
    kernel = _kernel(cell)
    assert (loops == "cpp") == (kernel in table.CPP.values() or isinstance(kernel, CompiledKernel))

    def f(xz, w_hh, b_hh, *state):
        return FusedScan.apply(
            kernel, cell, mask, None, xz, w_hh, b_hh, *state
        )  # None: no zoneout or recurrent dropout

    assert torch.autograd.gradcheck(f, (xz, w_hh, b_hh, *state), eps=1e-6, atol=1e-7)


@pytest.mark.parametrize("kind", ["lstm", "gru", "rnn_tanh", "user_lstm"])
@pytest.mark.parametrize("batch,hidden", [(512, 64), (1, 512)])
def test_two_threads(kind, batch, hidden):
    """Sizes above the C++ loops' grain, so their blocks of hidden units are split across two
    threads (one team through all steps); every other test runs on one. Training, and inference
    (for the LSTM and a user's compiled cell, the loop that projects its input itself)."""
    torch.set_num_threads(2)  # the autouse fixture restores the count
    layer = LAYERS[kind](input_size=8, hidden_size=hidden)
    x = torch.randn(batch, 5, 8)
    state = tuple(torch.randn(1, batch, hidden) for _ in layer.State._fields)
    lengths = torch.randint(1, 6, (batch,))
    lengths[0] = 5
    assert (
        _max_diff(_run(layer, x, state, lengths, fused_on=True), _run(layer, x, state, lengths, fused_on=False)) < 1e-5
    )

    def infer(fused_on):
        with _fused(fused_on), torch.no_grad():
            out, final = layer(x, state if len(state) > 1 else state[0], lengths=lengths)
            return [out, *_parts(final)]

    assert _max_diff(infer(True), infer(False)) < 1e-5


@pytest.mark.parametrize("kind", ["lstm", "gru", "rnn_tanh", "user_lstm"])
def test_hidden_size_one_with_a_strided_output_gradient(kind):
    """H = 1: a (B, T, 1) gradient whose last stride is not 1 (a transposed head) is still dense."""
    layer = LAYERS[kind](input_size=3, hidden_size=1)
    x = torch.randn(2, 5, 3)

    def grads(fused_on):
        with _fused(fused_on):
            xi = x.clone().requires_grad_()
            out, _ = layer(xi, lengths=[5, 3])
            loss = (out.transpose(1, 2) * torch.arange(5.0)).sum()
            return torch.autograd.grad(loss, [xi, *layer.parameters()])

    assert _max_diff(grads(True), grads(False)) < 1e-5


@pytest.mark.parametrize("kind", ["lstm", "gru", "rnn_tanh"])
def test_nan_propagates(kind):
    """A diverged weight gives NaN outputs on every path, as torch.nn would, not finite numbers."""
    layer = LAYERS[kind](input_size=3, hidden_size=20)
    with torch.no_grad():
        layer.cells[0].bias_hh[0] = float("nan")
    x = torch.randn(2, 4, 3)
    for batch in (2, 1):
        out, _ = layer(x[:batch], lengths=[4, 2][:batch])
        assert torch.isnan(out[:, -1]).any() or torch.isnan(out[:, 1]).any()


def test_a_strided_bias_at_batch_one():
    """The C++ loops read the bias as an array: a strided one must be made dense first."""
    layer = rnnkit.GRU(4, 8, batch_first=True)
    layer.bias_hh_l0 = torch.nn.Parameter(torch.randn(48)[::2])
    assert not layer.cells[0].bias_hh.is_contiguous()
    x, h0 = torch.randn(1, 5, 4), (torch.randn(1, 1, 8),)
    got = _run(layer, x, h0, [5], fused_on=True)
    want = _run(layer, x, h0, [5], fused_on=False)
    assert _max_diff(got, want) < 1e-5
    with torch.no_grad():
        _, state = layer(x[:, :4])
        with torch.inference_mode():
            last, _ = layer(x[:, 4:], state)
        full, _ = layer(x)
    torch.testing.assert_close(last[:, 0], full[:, 4], atol=1e-5, rtol=0)


class InputFreeCell(rnnkit.GatedCell):
    """A cell whose step ignores its input: no gradient ever reaches the input side of the graph."""

    gate_names = ("n",)

    def combine(self, x, h, state):
        h_new = torch.tanh(h.n)
        return h_new, rnnkit.HiddenState(h_new)


def test_generic_kernel_when_no_gradient_reaches_a_step_input():
    layer = rnnkit.Recurrent(InputFreeCell, 3, 4, batch_first=True).double()
    x, h0 = torch.randn(2, 5, 3, dtype=torch.float64), torch.randn(1, 2, 4, dtype=torch.float64)

    def grads(fused_on):
        with _fused(fused_on):
            xi = x.clone().requires_grad_()
            out, final = layer(xi, h0)
            got = torch.autograd.grad(out.square().sum() + final.sum(), [xi, *layer.parameters()], allow_unused=True)
            return [torch.zeros_like(t) if g is None else g for g, t in zip(got, [xi, *layer.parameters()])]

    assert _max_diff(grads(True), grads(False)) < 1e-10


def test_kernel_choice():
    from rnnkit.core.kernels.python_loops import PythonGRU, PythonLSTM, PythonRNN

    assert isinstance(table.kernel_for(rnnkit.LSTMCell(2, 3)), PythonLSTM)
    assert isinstance(table.kernel_for(rnnkit.GRUCell(2, 3)), PythonGRU)
    assert isinstance(table.kernel_for(rnnkit.RNNCell(2, 3)), PythonRNN)
    assert table.kernel_for(UserLSTMCell(2, 3)) is table.GENERIC  # its own combine: never the LSTM kernel
    assert table.kernel_for(MGUCell(2, 3)) is table.GENERIC
    assert table.kernel_for(OwnStepCell(2, 3)) is None  # its own step: the reference loop
    x = torch.randn(2, 5, 2)
    assert rnnkit.explain(rnnkit.Recurrent(OwnStepCell, 2, 3, batch_first=True), x).name == "reference"


def test_cell_with_its_own_step_still_runs_its_step():
    layer = rnnkit.Recurrent(OwnStepCell, input_size=3, hidden_size=4, batch_first=True).double()
    x = torch.randn(2, 5, 3, dtype=torch.float64)
    out, _ = layer(x)
    cell = layer.cells[0]
    state = cell.initial_state(2, dtype=torch.float64)
    ref = []
    for t in range(5):
        h, state = cell.step(cell.project_input(x[:, t]), state)
        ref.append(h)
    torch.testing.assert_close(out, torch.stack(ref, 1), atol=1e-12, rtol=0)


@pytest.mark.parametrize("kind", list(LAYERS))
def test_inference_path_equals_training_path(kind):
    layer = LAYERS[kind](input_size=3, hidden_size=4, num_layers=2, bidirectional=True).double()
    x = torch.randn(3, 6, 3, dtype=torch.float64)
    want_out, want_final = layer(x, lengths=[6, 2, 4])
    with torch.no_grad():
        out, final = layer(x, lengths=[6, 2, 4])
    torch.testing.assert_close(out, want_out, atol=1e-12, rtol=0)
    for a, b in zip(_parts(final), _parts(want_final)):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=0)


@pytest.mark.parametrize("kind,bidirectional", list(itertools.product(LAYERS, [False, True])))
@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("batch", [1, 2])  # batch 1: the C++ matrix-vector kernels, where they build
def test_stepping_equals_general_route(kind, bidirectional, batch_first, batch):
    layer = (
        LAYERS[kind](input_size=3, hidden_size=4, num_layers=3, bidirectional=bidirectional, batch_first=batch_first)
        .double()
        .eval()
    )
    x = torch.randn(batch, 5, 3, dtype=torch.float64)
    if not batch_first:
        x = x.transpose(0, 1)
    steps = [x[:, t : t + 1] if batch_first else x[t : t + 1] for t in range(5)]
    state_ref = state = None
    for x_t in steps:
        out_ref, state_ref = layer(x_t, state_ref)  # grad enabled: the general route
        with torch.inference_mode():
            out, state = layer(x_t, state if state is not None else None)
        torch.testing.assert_close(out, out_ref.detach(), atol=1e-12, rtol=0)
        for a, b in zip(_parts(state), _parts(state_ref)):
            torch.testing.assert_close(a, b.detach(), atol=1e-12, rtol=0)
        state_ref = tuple(s.detach() for s in _parts(state_ref))
        state_ref = state_ref if len(state_ref) > 1 else state_ref[0]


@pytest.mark.parametrize("kind", ["lstm", "gru", "rnn_tanh", "rnn_relu", "mgu", "user_lstm"])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("route", ["cpp", "blas"])
def test_stepping_at_batch_one_float32(kind, bias, route, monkeypatch):
    """The ``step-matmul`` route: whole SIMD vectors and a partial one (70 = 4 x 16 + 6) through the
    batch-1 kernels, and through torch's matmul, which takes weights above ``NATIVE_MAX_BYTES``;
    users' cells too (their projections go through the same kernels, their ``combine`` as written)."""
    if route == "blas":
        monkeypatch.setattr(step_module, "NATIVE_MAX_BYTES", 0)
    layer = LAYERS[kind](input_size=33, hidden_size=70, num_layers=2, bias=bias).eval()
    native_route = step_module._native_for(torch.randn(1, 33), layer.cells[0].weight_ih) is not None
    assert native_route == (route == "cpp" and native.ops() is not None)
    x = torch.randn(1, 4, 33)
    with torch.no_grad():
        want, _ = layer(x)
        _, state = layer(x[:, :3])
        with torch.inference_mode(), routing.force("step-matmul"):
            last, _ = layer(x[:, 3:], state)
    torch.testing.assert_close(last[:, 0], want[:, 3], atol=1e-5, rtol=0)


@pytest.mark.skipif(native.ops() is None, reason="the C++ loops are not built here")
@pytest.mark.parametrize("kind", list(LAYERS))
@pytest.mark.parametrize("batch", [1, 2, 5])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_stepping_through_the_cpp_loops_equals_the_general_route(kind, batch, dtype, monkeypatch):
    """A step as one call of the kernels' C++ loops (``step-loops``, forced here for every cell and
    batch), held to the general route over a few steps: both directions, two layers, H = 70 (a
    partial SIMD vector); the loops asserted taken. Unforced, the table sends every lean step to
    ``step-matmul``, which measured faster (the loops pack the weights at each call)."""
    taken = []

    def counted(*args):
        h = real(*args)
        taken.append(h is not None)
        return h

    real = step_module._loop_step
    monkeypatch.setattr(step_module, "_loop_step", counted)
    layer = LAYERS[kind](input_size=33, hidden_size=70, num_layers=2, bidirectional=True).to(dtype).eval()
    x = torch.randn(batch, 4, 33, dtype=dtype)
    state_ref = state = None
    for t in range(4):
        out_ref, state_ref = layer(x[:, t : t + 1], state_ref)  # grad enabled: the general route
        with torch.inference_mode():
            if state is None:  # the first step carries no state: a general route
                out, state = layer(x[:, t : t + 1])
            else:
                assert rnnkit.explain(layer, x[:, t : t + 1], state).name == "step-matmul"
                with routing.force("step-loops"):
                    out, state = layer(x[:, t : t + 1], state)
        torch.testing.assert_close(out, out_ref.detach(), atol=TOL[dtype], rtol=0)
        for a, b in zip(_parts(state), _parts(state_ref)):
            torch.testing.assert_close(a, b.detach(), atol=TOL[dtype], rtol=0)
        state_ref = tuple(s.detach() for s in _parts(state_ref))
        state_ref = state_ref if len(state_ref) > 1 else state_ref[0]
    assert taken == [True] * (3 * 4)  # 3 lean steps x 2 layers x 2 directions


@pytest.mark.parametrize("kind,batch", [("lstm", 1), ("gru", 3), ("rnn_tanh", 1), ("user_lstm", 2)])
def test_stepping_sees_parameter_updates(kind, batch):
    """A lean step reads the weights at each call: it sees in-place updates and load_state_dict."""
    layer = LAYERS[kind](input_size=3, hidden_size=4, num_layers=2).eval()
    x = torch.randn(batch, 1, 3)
    state = tuple(torch.zeros(2, batch, 4) for _ in layer.State._fields)
    state = state if len(state) > 1 else state[0]
    with torch.no_grad():
        before, _ = layer(x, state)
        layer.cells[1].weight_ih.mul_(2.0)  # as an optimizer step would, in place
        after, _ = layer(x, state)
        layer.load_state_dict({k: torch.randn_like(v) for k, v in layer.state_dict().items()})
        reloaded, _ = layer(x, state)
    with torch.enable_grad():
        want, _ = layer(x, state)
    assert not torch.allclose(before, after)
    torch.testing.assert_close(reloaded, want.detach(), atol=1e-6, rtol=0)


@pytest.mark.parametrize("kind", ["lstm", "user_lstm"])
def test_inference_packs_the_current_weights(kind):
    """Whole-sequence inference (the loops that project their input) packs the weights on every call:
    it sees an in-place change, ``load_state_dict``, a replaced parameter and a write through
    ``.data``, which bypasses the version counter."""
    layer = LAYERS[kind](input_size=3, hidden_size=4, num_layers=2).eval()
    x = torch.randn(2, 5, 3)
    changes = [
        lambda: layer.cells[1].weight_hh.mul_(2.0),
        lambda: layer.load_state_dict({k: torch.randn_like(v) for k, v in layer.state_dict().items()}),
        lambda: setattr(layer.cells[0], "weight_ih", torch.nn.Parameter(torch.randn(16, 3))),
        lambda: layer.cells[0].weight_hh.data.mul_(3.0),
    ]
    for change in [lambda: None, *changes]:
        with torch.no_grad():
            change()
            got, _ = layer(x)
            with _fused(False):
                want, _ = layer(x)
        torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


@pytest.mark.parametrize("kind", ["lstm", "gru", "user_lstm"])
def test_a_layer_made_under_inference_mode_runs_and_steps(kind):
    """Its weights are inference tensors, without a version counter."""
    with torch.inference_mode():
        layer = LAYERS[kind](input_size=3, hidden_size=4, num_layers=2).eval()
        x = torch.randn(2, 5, 3)
        out, _ = layer(x)
        step, _ = layer(x[:, 4:], layer(x[:, :4])[1])
        with _fused(False):
            want, _ = layer(x)
    torch.testing.assert_close(out, want, atol=1e-5, rtol=0)
    torch.testing.assert_close(step[:, 0], want[:, 4], atol=1e-5, rtol=0)


def test_pickling_a_layer_keeps_torch_nns_state_only():
    layer = rnnkit.LSTM(3, 4, batch_first=True).eval()
    x, state = torch.randn(2, 1, 3), rnnkit.LSTMState(torch.zeros(1, 2, 4), torch.zeros(1, 2, 4))
    with torch.no_grad():
        want, _ = layer(x, state)  # the lean path
        for other in (copy.deepcopy(layer), pickle.loads(pickle.dumps(layer))):
            assert set(other.__getstate__()) == set(torch.nn.LSTM(3, 4).__getstate__())  # torch.nn's state only
            torch.testing.assert_close(other(x, state)[0], want, atol=0, rtol=0)


@pytest.mark.parametrize("kind", list(LAYERS))
def test_stepping_an_empty_batch_names_the_problem(kind):
    """A batch of 0 with a carried state leaves the lean path to the general route's message (a
    torch.nn class: torch.nn's answer, an empty output)."""
    layer = LAYERS[kind](input_size=3, hidden_size=5).eval()
    state = tuple(torch.zeros(1, 0, 5) for _ in layer.State._fields)
    if isinstance(layer, torch.nn.RNNBase):
        with torch.no_grad():
            out, _ = layer(torch.randn(0, 1, 3), state if len(state) > 1 else state[0])
        assert tuple(out.shape) == (0, 1, 5)
        return
    with torch.no_grad(), pytest.raises(ValueError, match="at least one sequence"):
        layer(torch.randn(0, 1, 3), state if len(state) > 1 else state[0])


def test_stepping_bad_state_still_names_the_problem():
    with torch.no_grad(), pytest.raises(RuntimeError, match=r"Expected hidden\[1\] size \(1, 2, 5\), got \[2, 2, 5\]"):
        rnnkit.LSTM(3, 5, batch_first=True)(torch.randn(2, 1, 3), (torch.zeros(1, 2, 5), torch.zeros(2, 2, 5)))


@pytest.mark.parametrize("kind", ["gru", "mgu"])
def test_backward_twice_with_retain_graph(kind):
    layer = LAYERS[kind](input_size=3, hidden_size=4, num_layers=2)
    out, _ = layer(torch.randn(2, 5, 3), lengths=[5, 3])
    loss = out.square().sum()
    first = torch.autograd.grad(loss, list(layer.parameters()), retain_graph=True)
    second = torch.autograd.grad(loss, list(layer.parameters()))
    for a, b in zip(first, second):
        assert torch.equal(a, b)


def test_cpu_autocast_keeps_dtypes_consistent():
    layer = rnnkit.LSTM(8, 16, num_layers=2, batch_first=True)
    x = torch.randn(4, 6, 8)
    want, _ = layer(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, (h, c) = layer(x)
        out.float().sum().backward()
    assert h.dtype == c.dtype
    torch.testing.assert_close(out.float(), want, atol=5e-2, rtol=0)
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in layer.parameters())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("kind", list(LAYERS))
def test_cuda_matches_cpu(kind):
    layer = LAYERS[kind](input_size=3, hidden_size=4, num_layers=2, bidirectional=True).double()
    x = torch.randn(3, 6, 3, dtype=torch.float64)
    state = tuple(torch.randn(4, 3, 4, dtype=torch.float64) for _ in layer.State._fields)
    cpu = _run(layer, x, state, torch.tensor([6, 2, 4]), fused_on=True)
    gpu = _run(layer.cuda(), x.cuda(), tuple(s.cuda() for s in state), torch.tensor([6, 2, 4]).cuda(), fused_on=True)
    assert _max_diff(cpu, [g.cpu() for g in gpu]) < 1e-10
    layer32 = layer.float()
    with torch.autocast("cuda", dtype=torch.float16):
        out, _ = layer32(x.float().cuda())
        out.sum().backward()
    assert torch.isfinite(out).all() and all(p.grad is not None for p in layer32.parameters())


def test_bench_pairs_quartiles():
    """The spread the benchmark prints beside a ratio: the first and third quartiles of the pairs'
    ratios (inclusive method: within the values), one pair giving its own ratio twice."""
    assert bench_run._quartiles([2.0]) == (2.0, 2.0)
    assert bench_run._quartiles([1.0, 3.0]) == (1.5, 2.5)
    assert bench_run._quartiles([0.9, 1.0, 1.1, 1.2, 5.0]) == pytest.approx((1.0, 1.2))


def test_bench_smoke(tmp_path):
    """The benchmark runs end to end on a tiny grid and writes valid JSON (not a timing test)."""
    path = tmp_path / "bench.json"
    subprocess.run(
        [sys.executable, "-m", "rnnkit.bench", "--smoke", "--json", str(path), "--threads", "1"],
        check=True,
        capture_output=True,
        timeout=60,
    )
    report = json.loads(path.read_text())
    assert report["rows"] and all(r["torch_ms"] > 0 and r["rnnkit_ms"] > 0 for r in report["rows"])
    assert all(0 < r["ratio_q1"] <= r["ratio_q3"] for r in report["rows"] + report["stepping"])
    assert all(r["route"] in routing.ROUTE_NAMES for r in report["rows"] + report["stepping"])
    assert {s["route"] for s in report["stepping"]} <= {"step-loops", "step-matmul"}
    low = min(report["rows"], key=lambda r: r["ratio"])
    machine = report["machine"]  # the peak measured at the start and at the end, the higher kept
    peak = max(machine["matmul_gflops"]["peak"], machine["matmul_gflops_end"]["peak"])
    assert machine["matmul_peak_gflops"] == peak
    assert all(r["peak_frac"] == pytest.approx(r["gflops"] / peak) for r in report["rows"])
    assert [low["ratio_q1"], low["ratio_q3"]] in (
        report["summary"]["train_min_ratio_pairs_iqr"],
        report["summary"]["infer_min_ratio_pairs_iqr"],
    )
    assert [(s["kind"], s["batch"]) for s in report["stepping"]] == [("lstm", 1), ("lstm", 2), ("gru", 1), ("gru", 2)]
    assert [c["mode"] for c in report["custom_cell"]] == ["train", "infer", "step"]
    assert all(c["user_cell_ms"] > 0 and c["builtin_ms"] > 0 for c in report["custom_cell"])
    # torch.nn's defaults (time-major) and rnnkit.convert, each point beside the batch-first layer
    assert [(r["kind"], r["mode"]) for r in report["layouts"]] == [("lstm", "train"), ("lstm", "infer")]
    assert all(r[way]["slowdown"] > 0 for r in report["layouts"] for way in ("time-major", "convert"))


@pytest.mark.parametrize(
    "kind,kwargs", [("gru", {}), ("rnn", {"nonlinearity": "tanh"}), ("rnn", {"nonlinearity": "relu"}), ("lstm", {})]
)
def test_inference_through_torchs_kernel_equals_the_reference(kind, kwargs, monkeypatch):
    """Where rnnkit routes a stack to torch's own kernel, the result is the reference's.

    On the CPU, inference goes there only where the C++ loops are unavailable (here: switched off),
    since they are faster than torch's (oneDNN for the LSTM in float32).
    """
    monkeypatch.setitem(native._state, "ops", None)
    layer = rnnkit.LAYERS[kind](5, 7, num_layers=2, bidirectional=True, **kwargs, batch_first=True).eval()
    x = torch.randn(3, 6, 5)
    state = layer(x)[1]
    with torch.no_grad():
        assert rnnkit.explain(layer, x, state).name == "torch-kernel"
        out, final = layer(x, state)
        with routing.force("reference"):
            ref_out, ref_final = layer(x, state)
    torch.testing.assert_close(out, ref_out, atol=1e-5, rtol=0)
    for a, b in zip(_parts(final), _parts(ref_final)):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
    if kind != "lstm":  # training keeps rnnkit's own kernels, which train faster on a CPU
        assert rnnkit.explain(layer, x.requires_grad_(), state).name == "python-loops"


@pytest.mark.skipif(native.ops() is None, reason="the C++ loops could not be built here")
@pytest.mark.parametrize("kind", ["gru", "rnn"])
def test_with_the_cpp_loops_gru_and_rnn_inference_stay_in_rnnkit(kind):
    layer = rnnkit.LAYERS[kind](5, 7, batch_first=True).eval()
    with torch.no_grad():
        assert rnnkit.explain(layer, torch.randn(3, 6, 5)).name == "cpp-loops"


@pytest.mark.skipif(
    native.ops() is None or not torch.backends.mkldnn.is_available(), reason="needs the C++ loops and torch's oneDNN"
)
def test_lstm_routes_to_the_cpp_loops_where_they_measured_faster():
    """Inference, small steps (batch x hidden <= ``NATIVE_LSTM_MAX_STATE``) and training with more
    than ``NATIVE_LSTM_MIN_TRAIN_GATES`` gate values leave oneDNN for the C++ loops; the rest of
    training stays on it (the route asked, at the real thresholds: nothing runs). On each route the
    gradients are the reference's."""
    H = 32
    layer = rnnkit.LSTM(5, H, batch_first=True)
    max_batch = routing.NATIVE_LSTM_MAX_STATE // H
    long = routing.NATIVE_LSTM_MIN_TRAIN_GATES // (4 * H * (max_batch + 1)) + 1  # steps whose gates pass the line
    for batch, steps, grad, route in (
        (max_batch, 3, True, "cpp-loops"),
        (max_batch + 1, 3, True, "torch-kernel"),
        (max_batch + 1, long, True, "cpp-loops"),
        (max_batch + 1, 3, False, "cpp-projecting"),
    ):
        with torch.set_grad_enabled(grad):
            assert rnnkit.explain(layer, torch.empty(batch, steps, 5)).name == route, (batch, steps, grad)
    x = torch.randn(5, 5, 5)

    def grads():
        out, (h, c) = layer(x)
        return [out, h, c, *torch.autograd.grad((out.sum() + h.sum() + 2 * c.sum()), list(layer.parameters()))]

    with routing.force("reference"):
        want = grads()
    for name in ("cpp-loops", "torch-kernel"):
        with routing.force(name):
            assert _max_diff(grads(), want) < 1e-5


@pytest.mark.skipif(native.ops() is None, reason="the C++ loops could not be built here")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("batch,hidden,bias", [(3, 7, True), (2, 33, False), (4, 300, True)])
def test_lstm_inference_projecting_inside_the_loop_equals_the_reference(dtype, batch, hidden, bias):
    """LSTM inference projects its input inside the C++ loop (``cpp-projecting``): outputs and
    final states are the reference's, with lengths, both directions, two layers and a state passed
    in; hidden 33 and 300 leave partial blocks."""
    layer = rnnkit.LSTM(6, hidden, num_layers=2, bidirectional=True, bias=bias, batch_first=True).to(dtype).eval()
    x = torch.randn(batch, 9, 6, dtype=dtype)
    state = tuple(torch.randn(4, batch, hidden, dtype=dtype) for _ in range(2))
    lengths = ([9, 4, 7, 1] * 2)[:batch]

    def run():
        with torch.no_grad():
            out, final = layer(x, state, lengths=lengths)
        return [out, *final]

    with torch.no_grad():
        assert rnnkit.explain(layer, x, state, lengths).name == "cpp-projecting"
    got = run()
    with routing.force("reference"):
        assert _max_diff(got, run()) < TOL[dtype]
    assert rnnkit.explain(layer, x, state, lengths).name == "cpp-loops"  # gradients wanted


@pytest.mark.parametrize("kind", ["lstm", "gru", "rnn"])
def test_lengths_through_torchs_packed_kernel_equal_the_reference(kind):
    """With lengths, a stack on CUDA goes to torch's packed-sequence kernel (cuDNN). The same route,
    forced here on the CPU, gives the reference's outputs, final states and every gradient:
    unsorted lengths, both directions, two layers, a state passed in."""
    layer = rnnkit.LAYERS[kind](5, 7, num_layers=2, bidirectional=True, batch_first=True).eval()
    x = torch.randn(3, 6, 5)
    lengths = torch.tensor([4, 6, 2])
    with torch.no_grad():
        state = layer(x)[1]
    assert rnnkit.explain(layer, x, state, lengths).name != "torch-kernel"  # on the CPU, not by choice
    parts = _parts(state)
    with routing.force("torch-kernel"):
        got = _run(layer, x, parts, lengths, True)
        with torch.no_grad():
            got_inference = layer(x, state, lengths=lengths)
    want = _run(layer, x, parts, lengths, False)
    assert _max_diff(got, want) < 1e-5
    assert _max_diff([got_inference[0], *_parts(got_inference[1])], want[: 1 + len(parts)]) < 1e-5


class ScaledMGUCell(MGUCell):
    """A cell with a parameter of its own, used inside ``combine``."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.scale = torch.nn.Parameter(torch.tensor(1.5))

    def combine(self, x, h, state):
        h_new, new_state = super().combine(x, h, state)
        return self.scale * h_new, type(new_state)(self.scale * h_new)


class DoubledInputLSTMCell(rnnkit.LSTMCell):
    """A built-in cell whose input projection is overridden: fast paths must not bypass it."""

    def project_input(self, x):
        return 2 * super().project_input(x)


def _grads_and_outputs(layer, x, h0):
    out, final = layer(x, h0)
    loss = out.square().sum() + sum(f.square().sum() for f in (final if isinstance(final, tuple) else (final,)))
    names, params = zip(*layer.named_parameters())
    return [out, *torch.autograd.grad(loss, params)], names


def test_a_cells_own_parameters_get_their_gradients(monkeypatch):
    layer = rnnkit.Recurrent(ScaledMGUCell, 3, 4, num_layers=2, batch_first=True).double()
    x, h0 = torch.randn(2, 5, 3, dtype=torch.float64), torch.randn(2, 2, 4, dtype=torch.float64)
    assert rnnkit.explain(layer, x, h0).name == "reference"  # a parameter of its own
    fast, names = _grads_and_outputs(layer, x, h0)
    with routing.force("reference"):
        reference, _ = _grads_and_outputs(layer, x, h0)
    assert "cells.0.scale" in names
    for name, a, b in zip(("output", *names), fast, reference):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=0, msg=name)


def test_an_overridden_input_projection_is_honoured_by_every_path(monkeypatch):
    layer = rnnkit.Recurrent(DoubledInputLSTMCell, 3, 4, num_layers=2, batch_first=True).eval()
    x = torch.randn(2, 5, 3)
    with torch.no_grad():
        out, state = layer(x)  # whole sequence, no gradient
        step_out, _ = layer(x[:, :1], state)  # one step with a carried state
        assert rnnkit.explain(layer, x).name == "reference"  # its own projection
        with routing.force("reference"):
            ref_out, ref_state = layer(x)
            ref_step, _ = layer(x[:, :1], ref_state)
    torch.testing.assert_close(out, ref_out, atol=1e-5, rtol=0)
    torch.testing.assert_close(step_out, ref_step, atol=1e-5, rtol=0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("kind", ["lstm", "gru", "rnn"])
def test_cuda_autocast_state_can_be_carried(kind):
    """Under autocast the returned state keeps the weights' dtype, so it can go back in (lm training)."""
    layer = rnnkit.LAYERS[kind](5, 8, num_layers=2, batch_first=True).cuda()
    x = torch.randn(2, 4, 5, device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        _, state = layer(x)
        _, state = layer(x, state)
        with torch.no_grad():
            layer(x[:, :1], state)
    for part in state if isinstance(state, tuple) else (state,):
        assert part.dtype == torch.float32


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("kind", [torch.nn.LSTM, torch.nn.GRU, torch.nn.RNN])
def test_cuda_autocast_matches_torch_nn(kind):
    """Under float16 autocast a built-in stack runs cuDNN as torch.nn's does, in float16: the same
    output and final state (rnnkit's cast to the weights' dtype) and the same gradients. Under bf16
    autocast, where torch's cast would pick float16 too, the recurrence stays in float32."""
    theirs = kind(5, 8, num_layers=2, bidirectional=True, batch_first=True).cuda()
    ours = rnnkit.from_torch(theirs).cuda()
    x = torch.randn(3, 7, 5, device="cuda")
    results = []
    for model in (theirs, ours):
        with torch.autocast("cuda", dtype=torch.float16):
            out, state = model(x)
        out.float().square().sum().backward()
        results.append((out, state if isinstance(state, tuple) else (state,)))
    (out_t, state_t), (out_r, state_r) = results
    assert out_r.dtype == out_t.dtype == torch.float16 and torch.equal(out_r, out_t)
    for a, b in zip(state_t, state_r, strict=True):
        assert b.dtype == torch.float32 and torch.equal(a.float(), b)
    for k in range(2):
        for d in range(2):
            for name in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"):
                ours_grad = getattr(ours.cells[k * 2 + d], name).grad
                assert torch.equal(ours_grad, getattr(theirs, f"{name}_l{k}{'_reverse' if d else ''}").grad)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out, state = ours(x)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, ours(x)[0], atol=1e-5, rtol=0)  # float16 would be ~1e-3 off


def test_stepping_under_autocast_keeps_the_states_dtype():
    """lm's on_eval samples under the trainer's autocast: one-step calls must hand back float32 state."""
    layer = rnnkit.GRU(5, 8, num_layers=2, batch_first=True).eval()
    x = torch.randn(2, 1, 5)
    _, state = layer(x)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        _, state = layer(x, state)
        _, state = layer(x, state)
    assert state.dtype == torch.float32
