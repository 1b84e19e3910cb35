"""rnnkit's operators (core/ops.py) pass torch.library.opcheck, and PyTorch's legacy tracers either
record a layer correctly or refuse with a clear error: never a graph that is silently wrong."""

from __future__ import annotations

import pytest
import torch

import rnnkit
from rnnkit.core import native
from rnnkit.core.gates import GatedCell, HiddenState, gate

B, T, H = 3, 5, 4


def _args(kind: str, masked: bool, grad: bool, dtype=torch.float64, projecting: bool = False, steps: int = T):
    """Arguments of ``kind``'s training operator, or (``projecting``) of its inference one, which
    takes the input and W_ih rather than the projection; ``steps`` long (the lengths 5, 2, 4 cut to it)."""
    G, parts = {"lstm": (4, 2), "gru": (3, 1), "rnn": (1, 1)}[kind]
    gen = torch.Generator().manual_seed(0)
    make = lambda *shape: torch.randn(*shape, generator=gen, dtype=dtype).requires_grad_(grad)
    mask = torch.arange(steps)[None, :] < torch.tensor([5, 2, 4])[:, None] if masked else None
    inputs = (make(B, steps, 2), make(G * H, 2), make(G * H)) if projecting else (make(B, steps, G * H),)
    return (*inputs, make(G * H, H), make(G * H), *(make(B, H) for _ in range(parts)), mask, False)


@pytest.mark.parametrize("kind", ["lstm", "gru", "rnn"])
@pytest.mark.parametrize("masked", [False, True])
def test_operators_pass_opcheck(kind, masked):
    """Schema, fake kernel (shapes from shapes), autograd formula and the backward operator, checked
    by torch.library.opcheck, for the inference and the training operator."""
    torch.library.opcheck(getattr(torch.ops.rnnkit, f"{kind}_scan"), _args(kind, masked, False, projecting=True))
    # one step (T = 1) runs its own kernel: the products on the weights as stored
    one_step = _args(kind, masked, False, projecting=True, steps=1)
    checks = ("test_schema", "test_faketensor")  # an inference operator: no autograd to check
    torch.library.opcheck(getattr(torch.ops.rnnkit, f"{kind}_scan"), one_step, test_utils=checks)
    if masked:  # a padded step: zero output, the state unchanged
        masked_step = (*one_step[:-2], torch.tensor([[True], [False], [True]]), False)
        out, *final = getattr(torch.ops.rnnkit, f"{kind}_scan")(*masked_step)
        assert not out[1].any()
        for f, s in zip(final, one_step[5:-2]):
            torch.testing.assert_close(f[1], s[1])
    torch.library.opcheck(getattr(torch.ops.rnnkit, f"{kind}_scan_train"), _args(kind, masked, grad=True))
    saved_out = getattr(torch.ops.rnnkit, f"{kind}_scan_train")(*_args(kind, masked, grad=False))
    n = 2 if kind == "lstm" else 1
    saved, w_hh, mask = saved_out[1 + n :], _args(kind, masked, False)[1], _args(kind, masked, False)[-2]
    grad_out = torch.randn(B, T, H, dtype=torch.float64)
    grads = tuple(torch.randn(B, H, dtype=torch.float64) for _ in range(n))
    torch.library.opcheck(
        getattr(torch.ops.rnnkit, f"{kind}_scan_backward"), (*saved, w_hh, mask, grad_out, *grads, False)
    )


@pytest.mark.parametrize("kind", ["lstm", "gru"])
def test_operators_gradients_match_the_reference(kind):
    """The training operator's registered backward gives the reference loop's gradients."""
    layer = {"lstm": rnnkit.LSTM, "gru": rnnkit.GRU}[kind](4, H, bidirectional=True, batch_first=True).double()
    x = torch.randn(B, T, 4, dtype=torch.float64, requires_grad=True)
    lengths = torch.tensor([5, 2, 4])
    from rnnkit.core import ops, stack

    out, _ = stack.per_cell(ops.scan_cell)(layer, x, None, lengths)
    grads = torch.autograd.grad(out.square().sum(), [x, *layer.parameters()])
    with rnnkit.routing.force("reference"):
        ref, _ = layer(x, lengths=lengths)
    expected = torch.autograd.grad(ref.square().sum(), [x, *layer.parameters()])
    torch.testing.assert_close(out, ref)
    for g, e in zip(grads, expected):
        torch.testing.assert_close(g, e)


@pytest.mark.parametrize("cls", [rnnkit.LSTM, rnnkit.GRU, rnnkit.RNN])
def test_jit_trace_records_a_graph_that_runs_at_other_shapes(cls):
    """torch.jit.trace records torch's own aten::lstm/gru/rnn node, so the traced module (saved and
    loaded, without rnnkit's operators) runs at another batch size and length with eager's results."""
    layer = cls(4, 6, num_layers=2, bidirectional=True).eval()
    traced = torch.jit.trace(layer, torch.randn(3, 5, 4))
    x = torch.randn(2, 9, 4)
    torch.testing.assert_close(traced(x)[0], layer(x)[0], atol=1e-5, rtol=1e-5)


class _MGU(GatedCell):
    gate_names = ("f", "n")

    def combine(self, x, h, state):
        f = gate(torch.sigmoid, x.f, h.f)
        h_new = (1 - f) * state.h + f * torch.tanh(x.n + f * h.n)
        return h_new, HiddenState(h_new)


@pytest.mark.parametrize("what", ["lengths", "user cell", "dropout"])
def test_jit_trace_refuses_what_it_cannot_record(what):
    layer = (
        rnnkit.Recurrent(_MGU, 4, 6, batch_first=True)
        if what == "user cell"
        else rnnkit.LSTM(4, 6, num_layers=2, dropout=0.5, batch_first=True)
    )
    layer.train(what == "dropout")
    x = torch.randn(3, 5, 4)
    call = (lambda x: layer(x, lengths=torch.tensor([5, 2, 4]))[0]) if what == "lengths" else (lambda x: layer(x)[0])
    with pytest.raises(RuntimeError, match=r"cannot be recorded by torch\.jit\.trace.*torch\.export"):
        torch.jit.trace(call, x)


def test_legacy_onnx_export_is_correct_at_other_shapes(tmp_path):
    """torch.onnx.export(dynamo=False) writes ONNX's LSTM, not a constant: onnxruntime matches eager
    at another batch size and length."""
    ort = pytest.importorskip("onnxruntime")
    layer = rnnkit.LSTM(4, 6, num_layers=2, batch_first=True).eval()
    path = tmp_path / "lstm.onnx"
    torch.onnx.export(
        layer,
        (torch.randn(3, 5, 4),),
        str(path),
        dynamo=False,
        input_names=["x"],
        output_names=["y", "h", "c"],
        dynamic_axes={"x": {0: "B", 1: "T"}, "y": {0: "B", 1: "T"}},
    )
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    x = torch.randn(2, 9, 4)
    (y, *_) = session.run(None, {"x": x.numpy()})
    torch.testing.assert_close(torch.from_numpy(y), layer(x)[0], atol=1e-5, rtol=1e-5)


@pytest.mark.skipif(native.ops() is None, reason="the C++ loops are not built")
def test_native_and_python_operators_agree():
    """The operator runs the C++ loops on float64 CPU tensors and the Python loops elsewhere (here
    bfloat16): the same function."""
    args = _args("gru", True, grad=False, dtype=torch.float32, projecting=True)
    out, _ = torch.ops.rnnkit.gru_scan(*args)
    low = tuple(a.bfloat16() if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in args)
    out16, _ = torch.ops.rnnkit.gru_scan(*low)
    torch.testing.assert_close(out16.float(), out, atol=0.05, rtol=0.05)


@pytest.mark.skipif(native.ops() is None, reason="the C++ library is not built")
def test_operators_schemas_are_the_ones_python_writes():
    """ops.cpp defines the operators where the C++ library loads, core/ops.py where it does not: the
    same schemas either way."""
    from rnnkit.core import ops

    for kind, spec in ops.SPECS.items():
        for suffix, schema in ops.schemas(spec).items():
            op = getattr(torch.ops.rnnkit, f"{kind}_{suffix}").default
            assert str(op._schema) == f"rnnkit::{kind}_{suffix}{schema}"


@pytest.mark.skipif(native.ops() is None, reason="the C++ library is not built")
def test_aoti_package_runs_in_a_process_without_rnnkit(tmp_path):
    """An AOTInductor package of an exported rnnkit model, and the exported program itself saved
    with ``torch.export.save`` (``rnnkit export --format pt2``), run in a fresh process that imports
    torch and loads rnnkit's C++ library (``torch.ops.load_library``), and nothing else of rnnkit,
    at another batch size and length, with eager's results."""
    import subprocess
    import sys

    class Tagger(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.rnn = rnnkit.LSTM(4, 6, batch_first=True)

        def forward(self, x, lengths):
            out, (h, _) = self.rnn(x, lengths=lengths)
            return out, h

    model = Tagger().eval()
    B, T = torch.export.Dim("B", min=2, max=64), torch.export.Dim("T", min=2, max=64)
    example = (torch.randn(3, 5, 4), torch.tensor([5, 2, 4]))
    program = torch.export.export(model, example, dynamic_shapes=({0: B, 1: T}, {0: B}))
    torch.export.save(program, tmp_path / "tagger-program.pt2")
    with torch._inductor.config.patch({"aot_inductor.compile_wrapper_opt_level": "O0"}):  # compiles faster
        package = torch._inductor.aoti_compile_and_package(program, package_path=str(tmp_path / "tagger.pt2"))
    x, lengths = torch.randn(4, 7, 4), torch.tensor([7, 1, 3, 6])
    with torch.no_grad():
        expected = model(x, lengths)
    torch.save((x, lengths, expected), tmp_path / "io.pt")
    script = f"""
import sys, torch
torch.ops.load_library({str(native.library_path())!r})
runner = torch._inductor.aoti_load_package({package!r})
x, lengths, expected = torch.load({str(tmp_path / "io.pt")!r})
program = torch.export.load({str(tmp_path / "tagger-program.pt2")!r}).module()
for got in (runner(x, lengths), program(x, lengths)):
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, atol=1e-5, rtol=1e-5)
assert not [m for m in sys.modules if m.startswith("rnnkit")], "rnnkit's Python code was imported"
print("ok")
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-2000:]


def test_operators_without_the_cpp_library():
    """With ``RNNKIT_NATIVE=0`` (or no compiler) rnnkit imports and defines its operators on the
    Python loops, with the results of the layer's own eager call."""
    import os
    import subprocess
    import sys

    script = """
import torch, rnnkit
from rnnkit.core import native, ops
assert native.ops() is None and not ops.NATIVE
layer = rnnkit.GRU(4, 6, batch_first=True).eval()
x, h0 = torch.randn(3, 5, 4), torch.zeros(3, 6)
weights = (layer.weight_ih_l0, layer.bias_ih_l0, layer.weight_hh_l0, layer.bias_hh_l0)
out, h = torch.ops.rnnkit.gru_scan(x, *weights, h0, None, False)
ref, ref_h = layer(x)
torch.testing.assert_close((out, h), (ref, ref_h[0]), atol=1e-5, rtol=1e-5)
print("ok")
"""
    env = {**os.environ, "RNNKIT_NATIVE": "0"}
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-2000:]
