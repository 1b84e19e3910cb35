"""Every cell that is not a built-in LSTM, GRU or RNN, under PyTorch's shipping tools: a user's cell,
the layer-normalised cells, minGRU, minLSTM and the LSTM with ``proj_size``, whose loop over time a
traced graph holds as one ``scan`` node (core/traced_scan.py).

The matrix: each layer of ``LAYERS`` under ``torch.compile(fullgraph=True, dynamic=True)`` in
training and in inference (one graph for two batch sizes and lengths, eager's outputs, states and
gradients), ``torch.export`` with dynamic batch and time, lengths and the state as inputs (the
program run at other shapes), and ONNX (``dynamo=True``) through onnxruntime (ONNX's ``Scan``) at
other shapes. docs/gen_shipping.py writes the shipping tables from ``LAYERS`` and ``COLUMNS``.
"""

from __future__ import annotations

import pytest
import torch
from torch._dynamo.utils import counters

import rnnkit
from user_cells import MGUCell

I, H, P = 5, 7, 2  # P unlike any batch size below: dynamic=True gives equal sizes one symbol (docs/shipping.md)
SHAPES = ((3, 6), (4, 9))  # (B, T) of successive compiled calls: the first traces, the second reuses its graph
OTHER_SHAPES = ((5, 11), (2, 3))  # (B, T) an exported program runs at, other than the example's (3, 6)


def _recurrent(name):
    return lambda **kw: rnnkit.Recurrent(rnnkit.CELLS[name], I, H, batch_first=True, **kw)


LAYERS = {
    "a user's cell (MGU)": lambda **kw: rnnkit.Recurrent(MGUCell, I, H, batch_first=True, **kw),
    "LayerNorm LSTM": _recurrent("ln-lstm"),
    "LayerNorm GRU": _recurrent("ln-gru"),
    "minGRU": _recurrent("mingru"),
    "minLSTM": _recurrent("minlstm"),
    "LSTM, proj_size": lambda **kw: rnnkit.LSTM(I, H, proj_size=P, batch_first=True, **kw),
}
# the table's columns: column -> (the test that checks it, per layer; what it checks)
COLUMNS = {
    "compile training": ("test_compile_training", "`torch.compile(fullgraph=True)` training (lengths)"),
    "compile inference": ("test_compile_inference", "inference (initial state)"),
    "export": ("test_export_and_onnx", "`torch.export` (dynamic B and T, lengths, state in and out)"),
    "onnx": ("test_export_and_onnx", "ONNX through onnxruntime"),
}


def _state(layer, B):
    """A random initial state of ``layer`` for batch ``B``, in its own layout (proj_size's h is P wide)."""
    _, shaped = layer(torch.zeros(B, 1, I))
    parts = shaped if isinstance(shaped, tuple) else (shaped,)
    made = [torch.randn_like(p) for p in parts]
    return layer.State(*made) if isinstance(shaped, tuple) else made[0]


def _graphs(layer, train: bool, call) -> int:
    """Call ``layer`` compiled and eagerly at each of SHAPES, comparing outputs, states and (in training)
    every gradient; returns the number of graphs traced. Training is compiled with ``aot_eager``
    (AOTAutograd traces the loop's backward), inference with ``eager`` (the graph capture)."""
    torch._dynamo.reset()
    counters.clear()
    layer.train(train)
    compiled = torch.compile(layer, fullgraph=True, dynamic=True, backend="aot_eager" if train else "eager")
    for B, T in SHAPES:
        x = torch.randn(B, T, I, requires_grad=train)
        kwargs = call(layer, B, T)
        out, state = compiled(x, **kwargs)
        ref, ref_state = layer(x, **kwargs)
        torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(state, ref_state, atol=1e-5, rtol=1e-5)
        if train:
            wrt = [x, *layer.parameters()]
            grads = (torch.autograd.grad(sum(t.sum() for t in _flat(r)), wrt) for r in ((out, state), (ref, ref_state)))
            for g, e in zip(*grads):
                torch.testing.assert_close(g, e, atol=1e-5, rtol=1e-5)
    return counters["stats"]["unique_graphs"]


@pytest.mark.parametrize("name", list(LAYERS))
def test_compile_training(name):
    """Training with lengths: one graph for two batch sizes and lengths, eager's gradients."""
    layer = LAYERS[name]()
    assert _graphs(layer, True, lambda layer, B, T: dict(lengths=torch.randint(1, T + 1, (B,)))) == 1


@pytest.mark.parametrize("name", list(LAYERS))
def test_compile_inference(name):
    """Inference from an initial state: one graph for two batch sizes and lengths."""
    layer = LAYERS[name]().eval()
    with torch.no_grad():
        assert _graphs(layer, False, lambda layer, B, T: dict(hx=_state(layer, B))) == 1


class Tagger(torch.nn.Module):
    """A layer with lengths and an initial state in, the outputs and the final state out."""

    def __init__(self, layer):
        super().__init__()
        self.rnn = layer

    def forward(self, x, lengths, state):
        return self.rnn(x, state, lengths=lengths)


def _inputs(layer, B, T):
    return torch.randn(B, T, I), torch.randint(1, T + 1, (B,)), _state(layer, B)


def _flat(result):
    out, state = result
    return [out, *(state if isinstance(state, tuple) else (state,))]


@pytest.mark.parametrize("name", list(LAYERS))
def test_export_and_onnx(name, tmp_path):
    """torch.export of the layer (bidirectional) with symbolic batch and length: one scan node per
    direction (the loop is not unrolled), and the program runs at other batch sizes and lengths
    with eager's results. The same program to ONNX (dynamo=True): the loop as ONNX's Scan, run by
    onnxruntime at other batch sizes and lengths with eager's results. Eager LayerNorm cells run
    their C++ loop, whose float32 sums are ordered differently from the traced ops: parity is
    within 1e-5 absolute plus 1e-4 relative."""
    torch.manual_seed(0)
    layer = LAYERS[name](bidirectional=True).eval()
    model = Tagger(layer).eval()
    B, T = torch.export.Dim("B", min=2), torch.export.Dim("T", min=2)
    fields = layer.State._fields
    state_dims = layer.State(*({1: B} for _ in fields)) if len(fields) > 1 else {1: B}
    with torch.no_grad():
        program = torch.export.export(model, _inputs(layer, 3, 6), dynamic_shapes=({0: B, 1: T}, {0: B}, state_dims))
    scans = [node for node in program.graph.nodes if node.target is torch.ops.higher_order.scan]
    assert len(scans) == 2  # one per direction: the loop is not unrolled
    inputs = [_inputs(layer, B, T) for B, T in OTHER_SHAPES]
    with torch.no_grad():
        expected = [_flat(model(*args)) for args in inputs]
        for args, want in zip(inputs, expected):
            for got, e in zip(_flat(program.module()(*args)), want):
                torch.testing.assert_close(got, e, atol=1e-5, rtol=1e-4)

    ort = pytest.importorskip("onnxruntime")
    onnx = pytest.importorskip("onnx")
    pytest.importorskip("onnxscript")
    from rnnkit.core import onnx_ops

    path = tmp_path / "model.onnx"
    onnx_ops.export(program, (), path, optimize=False, verbose=False)
    kinds = {node.op_type for node in onnx.load(str(path)).graph.node}
    assert "Scan" in kinds
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]
    for (x, lengths, state), want in zip(inputs, expected):
        parts = state if isinstance(state, tuple) else (state,)
        got = session.run(None, dict(zip(names, [t.numpy() for t in (x, lengths, *parts)])))
        assert len(got) == len(want)
        for g, e in zip(got, want):
            torch.testing.assert_close(torch.from_numpy(g), e, atol=1e-5, rtol=1e-4)
