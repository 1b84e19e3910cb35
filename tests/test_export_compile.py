"""torch.compile(fullgraph=True) and torch.export of every built-in layer and option: one graph,
eager's results, and no new graph when the batch size or the length changes.

Training is compiled with ``aot_eager`` (AOTAutograd traces the forward and the registered backward
operator, as Inductor would see them), inference with ``eager`` (the graph capture with the
operators' fake kernels, which is what inference tests); one case each runs Inductor itself.
torch.export and ONNX share one exported program per layer. A user's cell and every other cell
are tests/test_export_cells.py's.
"""

from __future__ import annotations

import pytest
import torch
from torch._dynamo.utils import counters

import rnnkit

I, H = 5, 7
SHAPES = ((3, 6), (4, 9))  # (B, T) of successive calls: the first traces, the second must reuse its graph


LAYERS = {
    "LSTM": lambda **kw: rnnkit.LSTM(I, H, **kw, batch_first=True),
    "GRU": lambda **kw: rnnkit.GRU(I, H, **kw, batch_first=True),
    "RNN": lambda **kw: rnnkit.RNN(I, H, nonlinearity="relu", **kw, batch_first=True),
}
# option -> (layer keywords, call keywords from (B, T, layer)); each compiled case costs seconds,
# so the options come together where they can
OPTIONS = {
    "plain": ({}, lambda B, T, layer: {}),
    "stacked, bidirectional, lengths, initial state": (
        dict(num_layers=2, bidirectional=True),
        lambda B, T, layer: dict(lengths=torch.randint(1, T + 1, (B,)), hx=_state(layer, B)),
    ),
    "dropout": (dict(num_layers=2, dropout=0.3), lambda B, T, layer: {}),
}


def _state(layer, B):
    parts = [torch.randn(layer.num_layers * layer.num_directions, B, H) for _ in layer.State._fields]
    return layer.State(*parts) if len(parts) > 1 else parts[0]


def _compile_and_compare(layer, call, train: bool, backend=None):
    """Call ``layer`` compiled and eagerly at each of SHAPES; returns the number of graphs traced.
    ``backend``: by default ``aot_eager`` in training, ``eager`` in inference."""
    backend = backend or ("aot_eager" if train else "eager")
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
    """Generation: one step at a time (T = 1) with the state carried, gradients off: one graph for
    two batch sizes, eager's results. Then every weight is changed through ``.data`` (which
    bypasses the version counter): the next step is a fresh eager model's on the new weights, at
    batch 3 (torch's matmul) and at batch 1 (the matrix-vector kernels), never a stale one."""
    torch._dynamo.reset()
    counters.clear()
    layer = LAYERS[name](num_layers=2).eval()
    compiled = torch.compile(layer, fullgraph=True, dynamic=True, backend="eager")
    with torch.no_grad():
        for B in (3, 4):
            x, state = torch.randn(B, 1, I), _state(layer, B)
            torch.testing.assert_close(compiled(x, state), layer(x, state), atol=1e-5, rtol=1e-5)
        assert counters["stats"]["unique_graphs"] == 1
        for B in (3, 1):
            x, state = torch.randn(B, 1, I), _state(layer, B)
            compiled(x, state)
            for p in layer.parameters():
                p.data.mul_(0.5)
            fresh = LAYERS[name](num_layers=2).eval()
            fresh.load_state_dict(layer.state_dict())
            torch.testing.assert_close(compiled(x, state), fresh(x, state), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("train", [True, False], ids=["training", "inference"])
def test_compile_inductor(train):
    """The default backend (Inductor) too, on one small case each: Inductor's own code around the
    operators, in training (with lengths) and in inference."""
    layer = rnnkit.LSTM(I, H, batch_first=True)
    call = (lambda B, T, layer: dict(lengths=torch.randint(1, T + 1, (B,)))) if train else OPTIONS["plain"][1]
    assert _compile_and_compare(layer, call, train, backend="inductor") == 1


class Tagger(torch.nn.Module):
    """A stack with lengths and an initial state in, the outputs and the final state out."""

    def __init__(self, layer):
        super().__init__()
        self.rnn = layer

    def forward(self, x, lengths, state):
        return self.rnn(x, state, lengths=lengths)


# the layers torch.export and ONNX take (state in and out, lengths as an input), as the tables say
ONNX_LAYERS = {name: dict(num_layers=2, bidirectional=True) for name in LAYERS}


@pytest.mark.parametrize("name", list(LAYERS))
def test_export_and_onnx(name, tmp_path):
    """torch.export with symbolic B and T and lengths as an input: the program runs at other B and
    T with eager's results. The same program through torch.onnx.export(dynamo=True) with rnnkit's
    translations writes ONNX's own LSTM/GRU/RNN nodes (lengths as sequence_lens, the initial state
    in, the final state out); onnxruntime matches eager within 1e-5 at other B and T."""
    layer = LAYERS[name](**ONNX_LAYERS[name]).eval()
    model = Tagger(layer).eval()

    def inputs(B, T):
        return torch.randn(B, T, I), torch.randint(1, T + 1, (B,)), _state(layer, B)

    B, T = torch.export.Dim("B", min=2), torch.export.Dim("T", min=2)
    state_dims = layer.State(*({1: B} for _ in layer.State._fields)) if name == "LSTM" else {1: B}
    with torch.no_grad():
        program = torch.export.export(model, inputs(3, 6), dynamic_shapes=({0: B, 1: T}, {0: B}, state_dims))
    assert any("rnnkit" in str(node.target) for node in program.graph.nodes)
    shapes = ((5, 11), (2, 3))
    for shape in shapes:
        args = inputs(*shape)
        with torch.no_grad():
            torch.testing.assert_close(program.module()(*args), model(*args), atol=1e-5, rtol=1e-5)

    ort = pytest.importorskip("onnxruntime")
    onnx = pytest.importorskip("onnx")
    pytest.importorskip("onnxscript")
    from rnnkit.core import onnx_ops

    path = tmp_path / "model.onnx"
    onnx_ops.export(program, (), path, verbose=False)
    kinds = {node.op_type for node in onnx.load(str(path)).graph.node}
    assert name in kinds and "Loop" not in kinds and "Scan" not in kinds  # onnxruntime's own recurrent kernel runs
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]
    for shape in shapes:
        x, lengths, state = inputs(*shape)
        parts = state if isinstance(state, tuple) else (state,)
        feeds = dict(zip(names, [t.numpy() for t in (x, lengths, *parts)]))
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
