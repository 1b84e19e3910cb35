"""The Triton route's kernels (core/kernels/triton_*.py) against the reference loop, on the CPU.

``TRITON_INTERPRET=1`` runs a Triton kernel's source in numpy on CPU tensors: the generated
pointwise kernels and the loop around them are checked here on any machine with Triton installed
(tiny sizes: the interpreter is slow). On CUDA the same tests run again through the route itself
(tests/test_gpu_cuda.py)."""

from __future__ import annotations

import re

import pytest
import torch

from rnnkit.core import pointwise
from rnnkit.core.cells.gru import GRUCell
from rnnkit.core.cells.lstm import LSTMCell
from rnnkit.core.scan import scan_reference
from user_cells import MGUCell

pytest.importorskip("triton")

from rnnkit.core.kernels import triton_loops, triton_pointwise


@pytest.fixture(autouse=True)
def _interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")


def _compiled(cell):
    programs = pointwise.compiled(cell)
    if programs is None:
        pytest.skip("the C++ loops are not built here (core/pointwise.py checks the programs with them)")
    return programs


def test_the_generated_source_has_one_line_per_instruction():
    programs = _compiled(LSTMCell(3, 4))
    program = programs.forward[False]
    text = triton_pointwise.source(program, 4, 3)
    n_code = int(program.code[4])
    body = [line for line in text.splitlines() if re.match(r"    r\d+ = ", line) and "tl.load" not in line]
    assert len(body) == n_code + int(program.code[2])  # the instructions and the constants
    assert text.count("tl.store(") == int(program.code[3])


@pytest.mark.parametrize("make", [LSTMCell, GRUCell, MGUCell], ids=["lstm", "gru", "user-mgu"])
@pytest.mark.parametrize("masked", [False, True], ids=["full", "lengths"])
def test_the_triton_loop_equals_the_reference(make, masked):
    """Outputs, final state and every gradient (input, weights, initial state) in float64."""
    torch.manual_seed(0)
    cell = make(3, 5).double()
    B, T = 3, 4
    x = torch.randn(B, T, 3, dtype=torch.float64, requires_grad=True)
    state = cell.State(*(torch.randn(B, 5, dtype=torch.float64, requires_grad=True) for _ in cell.State._fields))
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0], [1, 0, 0, 0]], dtype=torch.bool) if masked else None
    _compiled(cell)

    want_out, want_state = scan_reference(cell, cell.project_input(x), state, mask)
    got_out, got_state = triton_loops.scan_triton(cell, x, state, mask)
    torch.testing.assert_close(got_out, want_out)
    for got, want in zip(got_state, want_state):
        torch.testing.assert_close(got, want)

    seeds = [torch.randn_like(want_out), *(torch.randn_like(s) for s in want_state)]
    leaves = [x, *state, *cell.parameters()]
    want_grads = torch.autograd.grad([want_out, *want_state], leaves, seeds)
    got_grads = torch.autograd.grad([got_out, *got_state], leaves, seeds)
    for got, want in zip(got_grads, want_grads):
        torch.testing.assert_close(got, want)


def test_half_precision_runs_float32_state_and_arithmetic():
    """bf16 tensors: the matmuls in bf16, the pointwise step and the carried state in float32; the
    result stays within bf16's rounding of the float32 reference (a bf16 state would drift)."""
    torch.manual_seed(0)
    cell = LSTMCell(4, 8)
    _compiled(cell)
    x = torch.randn(2, 6, 4)
    state = cell.initial_state(2, device=x.device, dtype=torch.float32)
    with torch.no_grad():
        want_out, want_state = scan_reference(cell, cell.project_input(x), state, None)
        half = LSTMCell(4, 8).to(torch.bfloat16)
        half.load_state_dict(cell.state_dict())
        got_out, got_state = triton_loops.scan_triton(half, x.bfloat16(), state, None)
    assert got_out.dtype == torch.bfloat16 and got_state.c.dtype == torch.bfloat16
    torch.testing.assert_close(got_out.float(), want_out, atol=3e-2, rtol=0)
    torch.testing.assert_close(got_state.c.float(), want_state.c, atol=3e-2, rtol=0)


def test_inference_keeps_two_state_rows_and_agrees_with_training():
    torch.manual_seed(0)
    cell = GRUCell(3, 4)
    _compiled(cell)
    x = torch.randn(2, 5, 3)
    state = cell.initial_state(2, device=x.device, dtype=x.dtype)
    with torch.no_grad():
        infer_out, infer_state = triton_loops.scan_triton(cell, x, state, None)
    train_out, train_state = triton_loops.scan_triton(cell, x, state, None)
    torch.testing.assert_close(infer_out, train_out.detach())
    torch.testing.assert_close(infer_state.h, train_state.h.detach())


def test_the_route_runs_a_bidirectional_stack_with_lengths_as_the_reference_does():
    """The route's runner (what choose_route sends a CUDA call to), here on CPU tensors."""
    import rnnkit
    from rnnkit.core import routing

    torch.manual_seed(0)
    layer = rnnkit.Recurrent(MGUCell, 3, 4, num_layers=2, bidirectional=True, batch_first=True)
    _compiled(layer.cells[0])
    x = torch.randn(2, 3, 3)
    lengths = torch.tensor([3, 2])
    with torch.no_grad():
        got, got_state = routing.ROUTE_NAMES["triton-loops"].run(layer, x, None, lengths)
        with routing.force("reference"):
            want, want_state = layer(x, lengths=lengths)
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(got_state, want_state)


def test_the_route_is_taken_on_cuda_only():
    import rnnkit
    from rnnkit.core import routing

    layer = rnnkit.Recurrent(MGUCell, 3, 4, batch_first=True)
    x = torch.randn(2, 3, 3)
    passed = dict(rnnkit.explain(layer, x).passed)
    assert passed["triton-loops"] == "not a CUDA tensor"
    with routing.force("triton-loops"), pytest.raises(ValueError, match="not a CUDA tensor"):
        layer(x)
