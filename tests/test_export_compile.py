"""torch.compile(fullgraph=True) and torch.export of every layer and option: one graph, eager's
results, and no new graph when the batch size or the length changes."""

from __future__ import annotations

import pytest
import torch
from torch._dynamo.utils import counters

import rnnkit
from rnnkit.core.gates import GatedCell, HiddenState, gate

I, H = 5, 7
SHAPES = ((3, 6), (4, 9))  # (B, T) of successive calls: the first traces, the second must reuse its graph


class MGUCell(GatedCell):
    """A user's cell (minimal gated unit): only ``combine`` written."""

    gate_names = ("f", "n")

    def combine(self, x, h, state):
        f = gate(torch.sigmoid, x.f, h.f)
        h_new = (1 - f) * state.h + f * torch.tanh(x.n + f * h.n)
        return h_new, HiddenState(h_new)


LAYERS = {
    "LSTM": lambda **kw: rnnkit.LSTM(I, H, **kw, batch_first=True),
    "GRU": lambda **kw: rnnkit.GRU(I, H, **kw, batch_first=True),
    "RNN": lambda **kw: rnnkit.RNN(I, H, nonlinearity="relu", **kw, batch_first=True),
}
# option -> (layer keywords, call keywords from (B, T, layer))
OPTIONS = {
    "plain": ({}, lambda B, T, layer: {}),
    "lengths, bidirectional": (
        dict(bidirectional=True),
        lambda B, T, layer: dict(lengths=torch.randint(1, T + 1, (B,))),
    ),
    "dropout": (dict(num_layers=2, dropout=0.3), lambda B, T, layer: {}),
    "initial state": (dict(num_layers=2), lambda B, T, layer: dict(hx=_state(layer, B))),
}


def _state(layer, B):
    parts = [torch.randn(layer.num_layers * layer.num_directions, B, H) for _ in layer.State._fields]
    return layer.State(*parts) if len(parts) > 1 else parts[0]


def _compile_and_compare(layer, call, train: bool, backend="aot_eager"):
    """Call ``layer`` compiled and eagerly at each of SHAPES; returns the number of graphs traced."""
    torch._dynamo.reset()
    counters.clear()
    layer.train(train)
    compiled = torch.compile(layer, fullgraph=True, backend=backend, dynamic=True)
    for B, T in SHAPES:
        x = torch.randn(B, T, I, requires_grad=train)
        kwargs = call(B, T, layer)
        torch.manual_seed(1)
        out, state = compiled(x, **kwargs)
        torch.manual_seed(1)  # the same dropout masks (aot_eager draws them as eager does)
        ref, ref_state = layer(x, **kwargs)
        torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(state, ref_state, atol=1e-5, rtol=1e-5)
        if train:
            grad = torch.autograd.grad(out.sum(), [x, *layer.parameters()])
            expected = torch.autograd.grad(ref.sum(), [x, *layer.parameters()])
            for g, e in zip(grad, expected):
                torch.testing.assert_close(g, e, atol=1e-5, rtol=1e-5)
    return counters["stats"]["unique_graphs"]


@pytest.mark.parametrize("train", [True, False], ids=["training", "inference"])
@pytest.mark.parametrize("option", list(OPTIONS))
@pytest.mark.parametrize("name", list(LAYERS))
def test_compile_fullgraph(name, option, train):
    if option == "dropout" and not train:
        pytest.skip("dropout acts in training only")
    kwargs, call = OPTIONS[option]
    assert _compile_and_compare(LAYERS[name](**kwargs), call, train) == 1


STEPPING = ("LSTM", "GRU")


@pytest.mark.parametrize("name", STEPPING)
def test_compile_stepping(name):
    """Generation: one step at a time with the state carried, gradients off."""
    layer = LAYERS[name](num_layers=2)
    with torch.no_grad():
        graphs = _compile_and_compare(layer, lambda B, T, layer: dict(hx=_state(layer, B)), False)
    assert graphs == 1


@pytest.mark.parametrize("name", STEPPING)
def test_compiled_step_reads_weights_written_through_data(name):
    """A compiled model stepped, then every weight changed through ``.data`` (which bypasses the
    version counter): the next step is a fresh eager model's on the new weights, at batch 1 (the
    matrix-vector kernels) and at batch 3 (torch's matmul), never a step on stale weights."""
    torch._dynamo.reset()
    layer = LAYERS[name](num_layers=2).eval()
    compiled = torch.compile(layer, fullgraph=True, dynamic=True, backend="aot_eager")
    for B in (1, 3):
        x, state = torch.randn(B, 1, I), _state(layer, B)
        with torch.no_grad():
            compiled(x, state)
            for p in layer.parameters():
                p.data.mul_(0.5)
            out, final = compiled(x, state)
            fresh = LAYERS[name](num_layers=2).eval()
            fresh.load_state_dict(layer.state_dict())
            ref, ref_final = fresh(x, state)
        torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(final, ref_final, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("train", [True, False], ids=["training", "inference"])
def test_compile_a_users_cell(train):
    """A user's cell compiles into one graph with eager's results, in training; its loop over time is
    unrolled (one copy of the step per step), so a new length traces the call again."""
    torch._dynamo.reset()
    layer = rnnkit.Recurrent(MGUCell, I, H, batch_first=True).train(train)
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager", dynamic=True)
    for B in (3, 5):
        x = torch.randn(B, 3, I, requires_grad=train)
        out, _ = compiled(x)
        ref, _ = layer(x)
        torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
        if not train:
            continue
        grad, expected = (torch.autograd.grad(o.sum(), x)[0] for o in (out, ref))
        torch.testing.assert_close(grad, expected, atol=1e-5, rtol=1e-5)


def test_compile_inductor_lstm():
    """The default backend (Inductor) too, on one small case."""
    layer = rnnkit.LSTM(I, H, batch_first=True)
    assert _compile_and_compare(layer, OPTIONS["plain"][1], False, backend="inductor") == 1


class Tagger(torch.nn.Module):
    """A stack with lengths and an initial state in, the outputs and the final state out."""

    def __init__(self, layer):
        super().__init__()
        self.rnn = layer

    def forward(self, x, lengths, state):
        return self.rnn(x, state, lengths=lengths)


@pytest.mark.parametrize("name", list(LAYERS))
def test_export_dynamic_batch_and_length(name):
    """torch.export with symbolic B and T and lengths as an input; the program runs at other B and T
    with eager's results."""
    layer = LAYERS[name](num_layers=2, bidirectional=True).eval()
    model = Tagger(layer)

    def inputs(B, T):
        return torch.randn(B, T, I), torch.randint(1, T + 1, (B,)), _state(layer, B)

    B, T = torch.export.Dim("B", min=2), torch.export.Dim("T", min=2)
    state_dims = layer.State(*({1: B} for _ in layer.State._fields)) if name == "LSTM" else {1: B}
    program = torch.export.export(model, inputs(3, 6), dynamic_shapes=({0: B, 1: T}, {0: B}, state_dims))
    assert any("rnnkit" in str(node.target) for node in program.graph.nodes)
    for shape in ((5, 11), (2, 3)):
        args = inputs(*shape)
        out, state = program.module()(*args)
        ref, ref_state = model(*args)
        torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(state, ref_state, atol=1e-5, rtol=1e-5)


ONNX_LAYERS = {"LSTM": dict(num_layers=2, bidirectional=True), "GRU": dict(bidirectional=True), "RNN": {}}


@pytest.mark.parametrize("name", list(ONNX_LAYERS))
def test_onnx_runs_in_onnxruntime_at_other_shapes(name, tmp_path):
    """torch.onnx.export(dynamo=True) with rnnkit's translations writes ONNX's own LSTM/GRU/RNN nodes
    (lengths as sequence_lens, the initial state in, the final state out); onnxruntime matches
    eager within 1e-5 at batch sizes and lengths other than the example's."""
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    from rnnkit.core import onnx_ops

    layer = LAYERS[name](**ONNX_LAYERS[name]).eval()
    model = Tagger(layer).eval()

    def inputs(B, T):
        return torch.randn(B, T, I), torch.randint(1, T + 1, (B,)), _state(layer, B)

    B, T = torch.export.Dim("B", min=2), torch.export.Dim("T", min=2)
    state_dims = layer.State(*({1: B} for _ in layer.State._fields)) if name == "LSTM" else {1: B}
    path = tmp_path / "model.onnx"
    onnx_ops.export(model, inputs(3, 6), path, dynamic_shapes=({0: B, 1: T}, {0: B}, state_dims))
    import onnx

    kinds = {node.op_type for node in onnx.load(str(path)).graph.node}
    assert name in kinds and "Loop" not in kinds  # onnxruntime's own recurrent kernel runs
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for shape in ((5, 11), (2, 3)):
        x, lengths, state = inputs(*shape)
        parts = state if isinstance(state, tuple) else (state,)
        feeds = dict(zip([i.name for i in session.get_inputs()], [t.numpy() for t in (x, lengths, *parts)]))
        got = [torch.from_numpy(a) for a in session.run(None, feeds)]
        with torch.no_grad():
            out, final = model(x, lengths, state)
        expected = [out, *(final if isinstance(final, tuple) else (final,))]
        assert len(got) == len(expected)
        for g, e in zip(got, expected):
            torch.testing.assert_close(g, e, atol=1e-5, rtol=1e-5)


def test_shipping_tables_are_generated_from_these_tests():
    """docs/shipping.md's and the README's tables are what docs/gen_shipping.py makes from the
    parametrization above: run ``python docs/gen_shipping.py`` after changing it."""
    import importlib.util
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "docs" / "gen_shipping.py"
    if not script.is_file():
        pytest.skip("docs/ is not beside the tests")
    spec = importlib.util.spec_from_file_location("gen_shipping", script)
    gen = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gen)
    assert gen.stale() == [], "run: python docs/gen_shipping.py"
