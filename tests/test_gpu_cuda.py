"""The CUDA routes on a GPU: the Triton loop chosen by the routing table, equal to the reference.

Skipped without CUDA (and, for the Triton route, without Triton). tools/gpu_check.sh runs these
with the benchmark on a GPU machine."""

from __future__ import annotations

import pytest
import torch

import rnnkit
from rnnkit.core import routing
from rnnkit.core.cells.lstm import LSTMCell
from user_cells import MGUCell

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def _triton():
    pytest.importorskip("triton")


@pytest.mark.parametrize("cell", [MGUCell, LSTMCell], ids=["user-mgu", "lstm"])
def test_the_triton_route_equals_the_reference_on_cuda(cell):
    _triton()
    torch.manual_seed(0)
    layer = rnnkit.Recurrent(cell, 16, 32, num_layers=2, batch_first=True).cuda()
    x = torch.randn(4, 12, 16, device="cuda", requires_grad=True)
    lengths = torch.tensor([12, 7, 3, 12])
    with routing.force("triton-loops"):
        out, state = layer(x, lengths=lengths)
    grads = torch.autograd.grad(out.square().sum(), [x, *layer.parameters()])
    with routing.force("reference"):
        want, want_state = layer(x, lengths=lengths)
    want_grads = torch.autograd.grad(want.square().sum(), [x, *layer.parameters()])
    torch.testing.assert_close(out, want, atol=1e-4, rtol=1e-4)
    for got, ref in zip((*state, *grads), (*want_state, *want_grads)):
        torch.testing.assert_close(got, ref, atol=1e-4, rtol=1e-4)


def test_a_user_cell_on_cuda_takes_the_triton_route():
    _triton()
    layer = rnnkit.Recurrent(MGUCell, 8, 16, batch_first=True).cuda()
    assert rnnkit.explain(layer, torch.randn(2, 5, 8, device="cuda")).name == "triton-loops"


def test_bf16_autocast_trains_like_float32():
    """A user's cell under bf16 autocast: a few optimizer steps follow float32's losses."""
    _triton()
    losses = {}
    for name, autocast in (("float32", False), ("bf16", True)):
        torch.manual_seed(0)
        layer = rnnkit.Recurrent(MGUCell, 16, 64, batch_first=True).cuda()
        head = torch.nn.Linear(64, 1).cuda()
        opt = torch.optim.Adam([*layer.parameters(), *head.parameters()], lr=1e-2)
        x = torch.randn(32, 24, 16, device="cuda")
        y = x.sum(dim=(1, 2), keepdim=False)[:, None] / 10
        curve = []
        for _ in range(20):
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
                assert rnnkit.explain(layer, x).name == "triton-loops"
                out, _ = layer(x)
                loss = torch.nn.functional.mse_loss(head(out[:, -1]).float(), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            curve.append(loss.item())
        losses[name] = curve
    assert losses["bf16"][-1] < 0.5 * losses["bf16"][0]
    for a, b in zip(losses["bf16"], losses["float32"]):
        assert abs(a - b) <= 0.1 * max(b, 1e-3) + 1e-2


@pytest.mark.parametrize("batch", [1, 4])
def test_graphed_steps_equal_the_unrolled_steps(batch):
    """Generation through step-graph (one graph per batch size) equals step-matmul token for token."""
    from rnnkit.core import cuda_graphs

    torch.manual_seed(0)
    layer = rnnkit.LSTM(16, 32, num_layers=3, batch_first=True).cuda().eval()
    prompt = torch.randn(batch, 5, 16, device="cuda")
    tokens = torch.randn(batch, 6, 1, 16, device="cuda")
    with torch.inference_mode():
        _, state = layer(prompt)
        assert rnnkit.explain(layer, tokens[:, 0], state).name == "step-graph"
        graphed_state, unrolled_state = state, state
        for t in range(tokens.shape[1]):
            graphed, graphed_state = layer(tokens[:, t], graphed_state)
            with routing.force("step-matmul"):
                unrolled, unrolled_state = layer(tokens[:, t], unrolled_state)
            torch.testing.assert_close(graphed, unrolled)
            torch.testing.assert_close(graphed_state.c, unrolled_state.c)
    assert cuda_graphs.graphs_of(layer).captures == 1


def test_no_graph_for_dropout_in_training():
    from rnnkit.core import cuda_graphs

    layer = rnnkit.LSTM(3, 5, num_layers=2, dropout=0.5).cuda()
    assert cuda_graphs.why_not(layer, torch.randn(1, 1, 3, device="cuda")) == "dropout in training"
