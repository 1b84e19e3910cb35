"""sLSTM: a step against the paper's equations without the stabiliser, the C++ loops against the reference
loop (both recurrent products: the diagonal blocks and the dense form), gradients in float64, stepping
against the whole sequence."""

from __future__ import annotations

import pytest
import torch
from torch.func import functional_call

import rnnkit
from rnnkit.core.cells import CELLS, SLSTMCell
from rnnkit.core.cells.slstm import dense_recurrent
from rnnkit.core.layers import Recurrent


def test_a_step_is_the_papers_equations_without_the_stabiliser():
    cell = SLSTMCell(3, 6, num_heads=2).double()
    x, h, c = (torch.randn(5, n, dtype=torch.float64) for n in (3, 6, 6))
    n = torch.rand(5, 6, dtype=torch.float64) + 0.5
    m = torch.randn(5, 6, dtype=torch.float64)
    R = dense_recurrent(cell.weight_hh)  # (4H, H), zero off the heads' blocks
    assert torch.equal(R.view(4, 2, 3, 2, 3)[:, 0, :, 1], torch.zeros(4, 3, 3, dtype=torch.float64))
    a = x @ cell.weight_ih.T + cell.bias_ih + h @ R.T + cell.bias_hh
    i_raw, f_raw, z_raw, o_raw = a.chunk(4, dim=-1)  # xLSTM's gate order
    # the state (c, n) is scaled by exp(-m); unscaled, the paper's i = exp(i~), f = sigmoid(f~)
    c_plain = torch.sigmoid(f_raw) * c * m.exp() + i_raw.exp() * torch.tanh(z_raw)
    n_plain = torch.sigmoid(f_raw) * n * m.exp() + i_raw.exp()
    out, state = cell(x, (h, c, n, m))
    torch.testing.assert_close(out, torch.sigmoid(o_raw) * c_plain / n_plain)
    torch.testing.assert_close(state.c * state.m.exp(), c_plain)
    torch.testing.assert_close(state.n * state.m.exp(), n_plain)
    torch.testing.assert_close(state.m, torch.maximum(i_raw, torch.nn.functional.logsigmoid(f_raw) + m))
    _, fresh = cell(x)  # zero state: m' = i~
    torch.testing.assert_close(fresh.m, (x @ cell.weight_ih.T + cell.bias_ih + cell.bias_hh)[:, :6])


@pytest.mark.parametrize("hidden, heads", [(16, 2), (6, 2)])  # head of 8 (the blocks' product), of 3 (dense)
def test_cpp_loops_equal_the_reference_loop(hidden, heads):
    layer = Recurrent(SLSTMCell, 3, hidden, num_layers=2, bidirectional=True, batch_first=True, num_heads=heads)
    layer = layer.double()
    x = torch.randn(3, 5, 3, dtype=torch.float64, requires_grad=True)
    state = tuple(torch.randn(4, 3, hidden, dtype=torch.float64) for _ in range(4))
    state = (state[0], state[1], state[2].abs() + 0.1, state[3])  # n > 0
    lengths = [5, 2, 4]
    assert rnnkit.explain(layer, x).name == "cpp-loops"

    def run():
        out, final = layer(x, state, lengths=lengths)
        loss = out.pow(2).sum() + sum((s * torch.randn_like(s)).sum() for s in final)
        return out, final, torch.autograd.grad(loss, [x, *layer.parameters()])

    torch.manual_seed(1)
    out, final, grads = run()
    torch.manual_seed(1)
    with rnnkit.routing.force("reference"):
        want_out, want_final, want_grads = run()
    torch.testing.assert_close(out, want_out)
    assert bool((out[1, 2:] == 0).all())
    for got, want in zip(final, want_final):
        torch.testing.assert_close(got, want)
    for got, want in zip(grads, want_grads):
        torch.testing.assert_close(got, want)


@pytest.mark.parametrize("hidden", [16, 6])
def test_gradcheck_on_the_cpp_loops(hidden):
    layer = Recurrent(SLSTMCell, 2, hidden, batch_first=True, num_heads=2).double()
    x = torch.randn(2, 3, 2, dtype=torch.float64, requires_grad=True)
    params = {k: v.detach().requires_grad_() for k, v in layer.named_parameters()}
    names = list(params)
    c0 = torch.randn(1, 2, hidden, dtype=torch.float64, requires_grad=True)

    def f(x, c0, *weights):
        zeros = torch.zeros_like(c0)
        out, (_, c, n, m) = functional_call(layer, dict(zip(names, weights)), (x, (zeros, c0, zeros + 1, zeros)))
        return out, c, n, m

    assert rnnkit.explain(layer, x).name == "cpp-loops"
    if hidden == 16:  # the blocks' product: every weight but the input's, which enters as x does
        params["cells.0.weight_ih"].requires_grad_(False)
    assert torch.autograd.gradcheck(f, (x, c0, *params.values()))


def test_stepping_with_the_state_equals_the_whole_sequence():
    layer = Recurrent(CELLS["slstm"], 3, 8, num_layers=2, batch_first=True)
    assert layer.cells[0].num_heads == 4  # xLSTM's default where 4 divides H
    x = torch.randn(2, 6, 3)
    out, _ = layer(x)
    with torch.no_grad():
        state, steps = None, []
        for t in range(6):
            y, state = layer(x[:, t : t + 1], state)
            steps.append(y)
    torch.testing.assert_close(torch.cat(steps, 1), out)


def test_heads_must_divide_the_hidden_size():
    with pytest.raises(ValueError, match="num_heads=3 must divide hidden_size=8"):
        SLSTMCell(3, 8, num_heads=3)
    assert SLSTMCell(3, 6).num_heads == 2 and SLSTMCell(3, 5).weight_hh.shape == (20, 5)
