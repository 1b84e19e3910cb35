"""A layer computes with its weights as they are at the call, however they were changed: the lean
stepping path (one step, a carried state, gradients off) included, at batch 1 (the C++
matrix-vector kernels) and above (torch's matmul), as torch.nn does."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrize

import rnnkit

TORCH = {"lstm": nn.LSTM, "gru": nn.GRU, "rnn": nn.RNN}
OURS = {"lstm": rnnkit.LSTM, "gru": rnnkit.GRU, "rnn": rnnkit.RNN}


class Doubled(nn.Module):
    def forward(self, w):
        return 2.0 * w


def _optimizer_step(m):
    with torch.enable_grad():
        out, _ = m(torch.randn(4, 2, 3))
        out.square().sum().backward()
    torch.optim.SGD(m.parameters(), lr=0.5).step()


def _weight_norm_then_scale(m):
    nn.utils.parametrizations.weight_norm(m, "weight_hh_l1")
    m.parametrizations.weight_hh_l1.original0.data.mul_(3.0)  # the norm g, through .data


CHANGES = {
    "optimizer step": _optimizer_step,
    "load_state_dict": lambda m: m.load_state_dict({k: torch.randn_like(v) for k, v in m.state_dict().items()}),
    "in place under no_grad": lambda m: m.weight_hh_l0.mul_(0.5),
    "in place through .data": lambda m: m.weight_ih_l1.data.mul_(0.5),
    ".data assigned": lambda m: setattr(m.weight_hh_l1, "data", torch.randn_like(m.weight_hh_l1)),
    "a new Parameter": lambda m: setattr(m, "weight_ih_l0", nn.Parameter(torch.randn_like(m.weight_ih_l0))),
    "parametrize": lambda m: parametrize.register_parametrization(m, "weight_hh_l0", Doubled()),
    "weight norm": _weight_norm_then_scale,
}


def _torch_twin(layer, kind):
    """torch.nn's layer holding ``layer``'s weights as they are now (computed ones included)."""
    twin = TORCH[kind](3, 5, num_layers=2)
    twin.load_state_dict({name: getattr(layer, name).detach().clone() for name in layer._flat_weights_names})
    return twin.eval()


@pytest.mark.parametrize("change", sorted(CHANGES))
@pytest.mark.parametrize("kind", sorted(OURS))
def test_a_step_sees_weights_changed_by_any_means(kind, change):
    layer = OURS[kind](3, 5, num_layers=2).eval()
    xs = {B: torch.randn(1, B, 3) for B in (1, 2)}
    states = {B: layer(torch.randn(2, B, 3))[1] for B in (1, 2)}
    with torch.inference_mode():
        before = {B: layer(xs[B], states[B])[0] for B in (1, 2)}  # each batch's step path used once
    with torch.no_grad():
        CHANGES[change](layer)
    twin = _torch_twin(layer, kind)
    for B in (1, 2):
        with torch.inference_mode():
            assert rnnkit.explain(layer, xs[B], states[B]).name == "step-matmul"
            got, got_state = layer(xs[B], states[B])
        with torch.no_grad():
            want, want_state = twin(xs[B], states[B])
        assert not torch.allclose(got, before[B]), "the change should change the step"
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)
        for a, b in zip(got_state if kind == "lstm" else [got_state], want_state if kind == "lstm" else [want_state]):
            torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


def test_a_user_cells_step_sees_a_write_through_data():
    """``Recurrent`` with a cell of one's own steps on its cells' weights as they are too."""

    class MyLSTMCell(rnnkit.LSTMCell):
        def combine(self, x, h, state):
            i, f, o = (torch.sigmoid(a + b) for a, b in ((x.i, h.i), (x.f, h.f), (x.o, h.o)))
            c = f * state.c + i * torch.tanh(x.g + h.g)
            return o * torch.tanh(c), rnnkit.LSTMState(o * torch.tanh(c), c)

    layer = rnnkit.Recurrent(MyLSTMCell, 3, 5, num_layers=2).eval()
    x = torch.randn(1, 1, 3)
    _, state = layer(torch.randn(2, 1, 3))
    with torch.inference_mode():
        before, _ = layer(x, state)
        layer.cells[1].weight_hh.data.mul_(0.5)
        got, _ = layer(x, state)
    want, _ = layer(x, state)  # gradients on: the general route
    assert not torch.allclose(got, before)
    torch.testing.assert_close(got, want.detach(), atol=1e-6, rtol=1e-5)
