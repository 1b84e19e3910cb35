"""Layer-normalised LSTM and GRU: each step against its equations written out (random gains, not the
initial ones), the layer against each sequence run alone, one step at a time against the whole
sequence, gradients in float64."""

from __future__ import annotations

import pytest
import torch
from torch.nn import functional as F

import rnnkit
from rnnkit.core import native
from rnnkit.core.cells import CELLS, LayerNormGRUCell, LayerNormLSTMCell
from rnnkit.core.layers import Recurrent

LN_CELLS = [LayerNormLSTMCell, LayerNormGRUCell]


def ln(v, gain, bias):
    """Layer normalisation over the last dim, written out."""
    mean = v.mean(-1, keepdim=True)
    var = ((v - mean) ** 2).mean(-1, keepdim=True)
    return (v - mean) / torch.sqrt(var + 1e-5) * gain + bias


def randomised(cell):
    """Every parameter random (gains away from 1, normalisation biases away from 0)."""
    with torch.no_grad():
        for p in cell.parameters():
            p.copy_(torch.randn_like(p))
    return cell


def test_ln_lstm_step_is_its_equations():
    cell = randomised(LayerNormLSTMCell(3, 4).double())
    x, h, c = (torch.randn(5, n, dtype=torch.float64) for n in (3, 4, 4))
    z = ln(x @ cell.weight_ih.T, cell.gamma_ih, cell.bias_ih) + ln(h @ cell.weight_hh.T, cell.gamma_hh, cell.bias_hh)
    i, f, g, o = z.chunk(4, dim=-1)  # torch.nn.LSTM's gate order
    c_new = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
    h_new = torch.sigmoid(o) * torch.tanh(ln(c_new, cell.gamma_c, cell.beta_c))
    out, state = cell(x, (h, c))
    torch.testing.assert_close(out, h_new)
    torch.testing.assert_close(state.c, c_new)  # the carried state is not normalised
    torch.testing.assert_close(state.h, h_new)


def test_ln_gru_step_is_its_equations():
    cell = randomised(LayerNormGRUCell(3, 4).double())
    x, h = torch.randn(5, 3, dtype=torch.float64), torch.randn(5, 4, dtype=torch.float64)
    a_r, a_z, a_n = ln(x @ cell.weight_ih.T, cell.gamma_ih, cell.bias_ih).chunk(3, dim=-1)
    b_r, b_z, b_n = ln(h @ cell.weight_hh.T, cell.gamma_hh, cell.bias_hh).chunk(3, dim=-1)
    r, z = torch.sigmoid(a_r + b_r), torch.sigmoid(a_z + b_z)
    n = torch.tanh(a_n + r * b_n)
    out, _ = cell(x, h)
    torch.testing.assert_close(out, (1 - z) * n + z * h)


@pytest.mark.parametrize("cell_class", LN_CELLS)
def test_initial_gains_and_biases(cell_class):
    cell = cell_class(3, 4)
    gains = [p for name, p in cell.named_parameters() if name.startswith("gamma")]
    assert gains and all(torch.equal(p, torch.ones_like(p)) for p in gains)
    if cell_class is LayerNormLSTMCell:
        assert torch.equal(cell.beta_c, torch.zeros(4))
    bound = 1 / 4**0.5
    assert all(p.abs().max() <= bound for p in (cell.weight_ih, cell.weight_hh, cell.bias_ih, cell.bias_hh))
    assert cell.weight_ih.std() > 0.1  # random, not constant


@pytest.mark.parametrize("name, cell_class", [("ln-lstm", LayerNormLSTMCell), ("ln-gru", LayerNormGRUCell)])
def test_registry_names(name, cell_class):
    assert CELLS[name] is cell_class


def each_alone(layer, x, lengths):
    """The layer on each sequence alone, cut to its length: outputs padded back with zeros, states stacked."""
    outs, states = [], []
    for b, n in enumerate(lengths):
        out, state = layer(x[b : b + 1, :n])
        outs.append(F.pad(out, (0, 0, 0, x.shape[1] - n)))
        states.append(state)
    parts = [torch.cat(p, dim=1) for p in zip(*[(s,) if isinstance(s, torch.Tensor) else s for s in states])]
    return torch.cat(outs), parts


@pytest.mark.parametrize("cell_class", LN_CELLS)
def test_layer_equals_each_sequence_run_alone(cell_class):
    layer = Recurrent(
        cell_class, input_size=3, hidden_size=4, num_layers=2, bidirectional=True, batch_first=True
    ).double()
    randomised(layer)
    x = torch.randn(4, 9, 3, dtype=torch.float64)
    lengths = [9, 2, 5, 1]
    out, state = layer(x, lengths=lengths)
    want_out, want_state = each_alone(layer, x, lengths)
    torch.testing.assert_close(out, want_out)
    for got, want in zip((state,) if isinstance(state, torch.Tensor) else state, want_state):
        torch.testing.assert_close(got, want)


@pytest.mark.parametrize("cell_class", LN_CELLS)
def test_stepping_with_a_carried_state_equals_the_whole_sequence(cell_class):
    layer = randomised(Recurrent(cell_class, input_size=3, hidden_size=6, num_layers=2, batch_first=True)).eval()
    x = torch.randn(2, 10, 3)
    with torch.no_grad():
        whole, final = layer(x)
        state, steps = None, []
        for t in range(10):
            out, state = layer(x[:, t : t + 1], state)
            steps.append(out)
    torch.testing.assert_close(torch.cat(steps, 1), whole, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(state, final, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("cell_class", LN_CELLS)
def test_layer_gradients_float64(cell_class):
    layer = randomised(
        Recurrent(cell_class, input_size=2, hidden_size=3, bidirectional=True, batch_first=True).double()
    )
    names = [n for n, _ in layer.named_parameters()]
    x = torch.randn(2, 5, 2, dtype=torch.float64, requires_grad=True)

    def f(x, *weights):
        with torch.nn.utils.stateless._reparametrize_module(layer, dict(zip(names, weights))):
            out, _ = layer(x, lengths=[5, 3])
        return out

    assert torch.autograd.gradcheck(f, (x, *[p.detach().clone().requires_grad_() for p in layer.parameters()]))


NATIVE = native.ops() is not None


@pytest.mark.parametrize("cell_class", LN_CELLS)
def test_route_is_the_cpp_loop_where_built(cell_class):
    layer = Recurrent(cell_class, input_size=3, hidden_size=4, batch_first=True)
    x = torch.randn(2, 5, 3)
    assert rnnkit.explain(layer, x).name == ("cpp-layernorm" if NATIVE else "reference")
    assert rnnkit.explain(layer.double(), x.double()).name == ("cpp-layernorm" if NATIVE else "reference")


@pytest.mark.skipif(not NATIVE, reason="the C++ loops are not built here")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("cell_class", LN_CELLS)
def test_cpp_loop_equals_the_reference(cell_class, dtype):
    """Outputs, final states and every gradient (input, weights, gains, biases, initial state) of the
    C++ loop against the reference loop; H=19 leaves a partial SIMD vector, lengths leave padded steps,
    and bias=False drops the normalisations' biases."""
    for bias in (True, False):
        layer = Recurrent(
            cell_class, input_size=5, hidden_size=19, num_layers=2, bias=bias, bidirectional=True, batch_first=True
        ).to(dtype)
        with torch.no_grad():
            for p in layer.parameters():
                p.copy_(torch.randn_like(p) * 0.5)
        x = torch.randn(6, 9, 5, dtype=dtype, requires_grad=True)
        h0 = torch.randn(4, 6, 19, dtype=dtype, requires_grad=True)
        state = (h0, torch.randn_like(h0)) if cell_class is LayerNormLSTMCell else h0
        got = {}
        for route in ("cpp-layernorm", "reference"):
            with rnnkit.routing.force(route):
                out, final = layer(x, state, lengths=[9, 2, 5, 1, 9, 7])
            parts = (final,) if isinstance(final, torch.Tensor) else tuple(final)
            weights = torch.linspace(-1, 1, out.numel(), dtype=dtype).view_as(out)
            loss = (out * weights).sum() + sum((p**2).sum() for p in parts)
            got[route] = (out, *parts, *torch.autograd.grad(loss, [x, h0, *layer.parameters()]))
            with torch.no_grad(), rnnkit.routing.force(route):  # inference: the loop that keeps no buffers
                got[route] += (layer(x, state, lengths=[9, 2, 5, 1, 9, 7])[0],)
        tol = {"rtol": 1e-4, "atol": 1e-5} if dtype == torch.float32 else {}  # float32: sums over steps
        for a, b in zip(got["cpp-layernorm"], got["reference"]):
            torch.testing.assert_close(a, b, **tol)


@pytest.mark.skipif(not NATIVE, reason="the C++ loops are not built here")
@pytest.mark.parametrize("cell_class", LN_CELLS)
def test_cpp_loop_second_derivatives_float64(cell_class):
    """A differentiable backward (create_graph) goes through the step in torch ops: gradgradcheck."""
    layer = randomised(Recurrent(cell_class, input_size=2, hidden_size=3, batch_first=True).double())
    x = torch.randn(2, 3, 2, dtype=torch.float64, requires_grad=True)
    assert rnnkit.explain(layer, x).name == "cpp-layernorm"
    assert torch.autograd.gradgradcheck(lambda x: layer(x, lengths=[3, 2])[0], (x,))


@pytest.mark.skipif(not NATIVE, reason="the C++ loops are not built here")
@pytest.mark.parametrize("cell_class", LN_CELLS)
def test_cpp_loop_on_two_threads_equals_the_reference(cell_class):
    """Sizes above the loop's grain, so two threads split each step's product by hidden units and
    the normalisations by rows (every other test runs one thread): training and inference."""
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        layer = randomised(Recurrent(cell_class, input_size=4, hidden_size=64, batch_first=True).double())
        x = torch.randn(16, 5, 4, dtype=torch.float64, requires_grad=True)
        lengths = [5, 3, 1, 4, 5, 2, 5, 5, 1, 3, 4, 5, 2, 5, 5, 4]
        got = {}
        for route in ("cpp-layernorm", "reference"):
            with rnnkit.routing.force(route):
                out, _ = layer(x, lengths=lengths)
                grads = torch.autograd.grad((out * out.detach().sin()).sum(), [x, *layer.parameters()])
                with torch.no_grad():
                    got[route] = (out, *grads, layer(x, lengths=lengths)[0])
        for a, b in zip(got["cpp-layernorm"], got["reference"]):
            torch.testing.assert_close(a, b)
    finally:
        torch.set_num_threads(threads)
