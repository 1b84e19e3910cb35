"""minGRU and minLSTM and the linear scans they train with: each scan against the recurrence stepped
by hand, the cells' steps against their equations, the layer against a loop over its cell, one step
at a time against the whole sequence, gradients in float64."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.nn import functional as F

import rnnkit
from rnnkit.core import native, parallel_scan, routing
from rnnkit.core.cells import CELLS, MinGRUCell, MinLSTMCell
from rnnkit.core.functional import length_mask
from rnnkit.core.gates import HiddenState
from rnnkit.core.layers import Recurrent
from rnnkit.core.scan import scan_reference

SCAN_CELLS = [MinGRUCell, MinLSTMCell]


def by_hand(k, v, h0, mask):
    """h_t = (1 - z_t) h_{t-1} + z_t g(v_t) step by step; at a padded step the state stays, the output is 0."""
    h, outs = h0, []
    for t in range(k.shape[1]):
        z = torch.sigmoid(k[:, t])
        g = torch.where(v[:, t] >= 0, v[:, t] + 0.5, torch.sigmoid(v[:, t]))
        new = (1 - z) * h + z * g
        m = mask[:, t, None]
        h = torch.where(m, new, h)
        outs.append(new * m)
    return torch.stack(outs, 1), h


def log_space(k, v, h0, mask):
    log_a, log_b = parallel_scan.masked_coefficients(*parallel_scan.log_coefficients(k, v), mask)
    return parallel_scan.scan_log_space(log_a, log_b, h0)


SCANS = [log_space, parallel_scan.scan_stepped]


def random_inputs(B, T, H, dtype=torch.float64, spread=3.0):
    k = torch.randn(B, T, H, dtype=dtype) * spread  # z from near 0 to near 1
    v = torch.randn(B, T, H, dtype=dtype) * spread  # both pieces of g
    h0 = torch.randn(B, H, dtype=dtype)  # negative entries too: h0 is carried by linearity, never logged
    return k, v, h0


@pytest.mark.parametrize("run", SCANS)
@settings(max_examples=25, deadline=None)
@given(B=st.integers(1, 4), T=st.integers(1, 150), H=st.integers(1, 5), seed=st.integers(0, 2**31 - 1))
def test_scan_equals_the_recurrence_stepped_by_hand(run, B, T, H, seed):
    torch.manual_seed(seed)
    k, v, h0 = random_inputs(B, T, H)
    mask = length_mask(torch.randint(1, T + 1, (B,)), T)
    hs = run(k, v, h0, mask)
    want_out, want_final = by_hand(k, v, h0, mask)
    torch.testing.assert_close(hs * mask[:, :, None], want_out, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(hs[:, -1], want_final, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("run", SCANS)
def test_scan_gradients_float64(run):
    B, T, H = 2, 70, 3  # more than one chunk of the log-space scan
    k, v, h0 = random_inputs(B, T, H, spread=1.5)
    mask = length_mask(torch.tensor([70, 33]), T)
    inputs = [t.clone().requires_grad_() for t in (k, v, h0)]
    assert torch.autograd.gradcheck(lambda k, v, h0: run(k, v, h0, mask), inputs)


def test_log_space_scan_float32_long_sequence():
    """T=4096 in float32, chunked: close to the float64 recurrence (relative error)."""
    k, v, h0 = random_inputs(2, 4096, 8, spread=2.0)
    want = parallel_scan.scan_stepped(k, v, h0, None)
    got = log_space(k.float(), v.float(), h0.float(), None).double()
    assert ((got - want).abs() / want.abs().clamp_min(1e-3)).max() < 1e-4


@pytest.mark.parametrize("cell_class", SCAN_CELLS)
@pytest.mark.parametrize("form", ["log-space", "stepped", "stepped-torch-ops"])
def test_cell_scan_equals_reference_loop(cell_class, form, monkeypatch):
    """The whole-sequence scan of a cell == stepping the cell (scan_reference), outputs, final state and
    every gradient, with random lengths and a random initial state: the log-space scan, the stepped
    recurrence (in C++ where built) and the stepped recurrence in torch ops (no C++ loops)."""
    log_space = form == "log-space"
    if form == "stepped-torch-ops":
        monkeypatch.setitem(native._state, "ops", None)
    torch.manual_seed(1)
    B, T, I, H = 3, 80, 5, 4
    cell = cell_class(I, H).double()
    x = torch.randn(B, T, I, dtype=torch.float64, requires_grad=True)
    h0 = torch.randn(B, H, dtype=torch.float64, requires_grad=True)
    mask = length_mask(torch.tensor([80, 1, 47]), T)

    def run_with(scan):
        out, final = scan(cell, cell.project_input(x), HiddenState(h0), mask)
        loss = (out * torch.randn_like(out, generator=torch.Generator().manual_seed(2))).sum() + final.h.pow(2).sum()
        return (out, final.h, *torch.autograd.grad(loss, [x, h0, *cell.parameters()]))

    def parallel(*args):
        return parallel_scan.scan(*args, log_space=log_space)

    for got, want in zip(run_with(parallel), run_with(scan_reference)):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


def test_min_gru_step_is_its_equations():
    cell = MinGRUCell(3, 4).double()
    x, h = torch.randn(5, 3, dtype=torch.float64), torch.randn(5, 4, dtype=torch.float64)
    k, v = F.linear(x, cell.weight_ih, cell.bias_ih).chunk(2, dim=-1)
    z = torch.sigmoid(k)
    h_tilde = torch.where(v >= 0, v + 0.5, torch.sigmoid(v))
    out, state = cell(x, h)
    torch.testing.assert_close(out, (1 - z) * h + z * h_tilde)
    torch.testing.assert_close(state.h, out)


def test_min_lstm_step_is_its_equations():
    cell = MinLSTMCell(3, 4).double()
    x, h = torch.randn(5, 3, dtype=torch.float64), torch.randn(5, 4, dtype=torch.float64)
    kf, ki, v = F.linear(x, cell.weight_ih, cell.bias_ih).chunk(3, dim=-1)
    f, i = torch.sigmoid(kf), torch.sigmoid(ki)
    h_tilde = torch.where(v >= 0, v + 0.5, torch.sigmoid(v))
    out, _ = cell(x, h)
    torch.testing.assert_close(out, f / (f + i) * h + i / (f + i) * h_tilde)


@pytest.mark.parametrize("cell_class", SCAN_CELLS)
def test_cells_have_no_recurrent_weights(cell_class):
    cell = cell_class(3, 4)
    assert {name for name, _ in cell.named_parameters()} == {"weight_ih", "bias_ih"}
    assert cell.weight_ih.shape == (len(cell.gate_names) * 4, 3)
    with pytest.raises(TypeError, match="no recurrent weights"):
        cell.project_hidden(torch.zeros(1, 4))


@pytest.mark.parametrize("name, cell_class", [("mingru", MinGRUCell), ("minlstm", MinLSTMCell)])
def test_registry_names(name, cell_class):
    assert CELLS[name] is cell_class


def manual_layer(layer, x, lengths):
    """The layer's function written out: each sequence alone, each cell stepped, outputs concatenated."""
    outs, finals = [], []
    for b, n in enumerate(lengths):
        inp = x[b : b + 1, :n]
        states = []
        for k in range(layer.num_layers):
            halves = []
            for d in range(layer.num_directions):
                cell = layer.cells[k * layer.num_directions + d]
                seq = inp.flip(1) if d else inp
                state, steps = cell.initial_state(1, dtype=x.dtype), []
                for t in range(n):
                    h, state = cell(seq[:, t], state)
                    steps.append(h)
                out = torch.stack(steps, 1)
                halves.append(out.flip(1) if d else out)
                states.append(state.h)
            inp = torch.cat(halves, dim=2)
        outs.append(F.pad(inp, (0, 0, 0, x.shape[1] - n)))
        finals.append(torch.cat(states))  # (L*D, H)
    return torch.cat(outs), torch.stack(finals, 1)


@pytest.mark.parametrize("cell_class", SCAN_CELLS)
def test_layer_equals_each_sequence_run_alone(cell_class):
    """Bidirectional, two layers, random lengths: padded outputs zero, the final state at each sequence's
    own end, the backward direction from each sequence's own end."""
    layer = Recurrent(
        cell_class, input_size=3, hidden_size=4, num_layers=2, bidirectional=True, batch_first=True
    ).double()
    x = torch.randn(4, 9, 3, dtype=torch.float64)
    lengths = [9, 2, 5, 1]
    out, h = layer(x, lengths=lengths)
    want_out, want_h = manual_layer(layer, x, lengths)
    torch.testing.assert_close(out, want_out)
    torch.testing.assert_close(h, want_h)


@pytest.mark.parametrize("cell_class", SCAN_CELLS)
def test_stepping_with_a_carried_state_equals_the_whole_sequence(cell_class):
    """One token at a time (O(1) a step, the state carried) == the whole sequence at once."""
    layer = Recurrent(cell_class, input_size=3, hidden_size=6, num_layers=3, batch_first=True).eval()
    x = torch.randn(2, 12, 3)
    h0 = torch.randn(3, 2, 6)
    whole, h_whole = layer(x, h0)
    h, steps = h0, []
    with torch.no_grad():
        for t in range(12):
            out, h = layer(x[:, t : t + 1], h)
            steps.append(out)
    torch.testing.assert_close(torch.cat(steps, 1), whole.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(h, h_whole.detach(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("cell_class", SCAN_CELLS)
def test_layer_gradients_float64(cell_class):
    layer = Recurrent(
        cell_class, input_size=2, hidden_size=3, num_layers=2, bidirectional=True, batch_first=True
    ).double()
    x = torch.randn(2, 6, 2, dtype=torch.float64, requires_grad=True)
    h0 = torch.randn(4, 2, 3, dtype=torch.float64, requires_grad=True)
    params = list(layer.parameters())

    def f(x, h0, *weights):
        with torch.nn.utils.stateless._reparametrize_module(
            layer, dict(zip([n for n, _ in layer.named_parameters()], weights))
        ):
            out, h = layer(x, h0, lengths=[6, 3])
        return out, h

    assert torch.autograd.gradcheck(f, (x, h0, *[p.detach().clone().requires_grad_() for p in params]))


@pytest.mark.parametrize("cell_class", SCAN_CELLS)
def test_layers_of_scan_cells_take_the_parallel_scan_route(cell_class):
    layer = Recurrent(cell_class, input_size=3, hidden_size=4, num_layers=2, batch_first=True)
    x = torch.randn(2, 5, 3)
    assert rnnkit.explain(layer, x).name == "parallel-scan"
    with torch.no_grad():  # one step with a carried state too: O(1), no lean path needed
        assert rnnkit.explain(layer, x[:, :1], torch.zeros(2, 2, 4)).name == "parallel-scan"


@pytest.mark.parametrize("cell_class", SCAN_CELLS)
@pytest.mark.parametrize("batch_first", [True, False])
def test_parallel_scan_route_equals_the_reference_route(cell_class, batch_first):
    """Outputs, state and every gradient, with lengths, both directions, two layers and a state in."""
    layer = Recurrent(
        cell_class, input_size=3, hidden_size=4, num_layers=2, bidirectional=True, batch_first=batch_first
    ).double()
    x = torch.randn(4, 7, 3, dtype=torch.float64) if batch_first else torch.randn(7, 4, 3, dtype=torch.float64)
    x.requires_grad_()
    h0 = torch.randn(4, 4, 4, dtype=torch.float64, requires_grad=True)
    lengths = torch.tensor([7, 3, 1, 6])

    def run():
        out, h = layer(x, h0, lengths=lengths)
        loss = (out * torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view_as(out)).sum() + h.pow(2).sum()
        return (out, h, *torch.autograd.grad(loss, [x, h0, *layer.parameters()]))

    assert rnnkit.explain(layer, x, h0, lengths).name == "parallel-scan"
    fast = run()
    with routing.force("reference"):
        slow = run()
    for got, want in zip(fast, slow):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


@pytest.mark.skipif(native.ops() is None, reason="the C++ loops are not built here")
@pytest.mark.parametrize("cell_class", SCAN_CELLS)
def test_native_scan_second_derivatives_and_extreme_gates(cell_class):
    """The C++ recurrence's differentiable backward (create_graph: torch ops) passes gradgradcheck; in
    float32, gates far in both tails (minLSTM's f and i both vanishing) stay finite and match float64."""
    cell = cell_class(3, 2).double()
    x = torch.randn(2, 4, 3, dtype=torch.float64, requires_grad=True)
    h0 = torch.randn(2, 2, dtype=torch.float64, requires_grad=True)
    assert parallel_scan.native_scan_runs(cell, x)

    def f(x, h0):
        return parallel_scan.scan(cell, cell.project_input(x), HiddenState(h0), None, log_space=False)[0]

    assert torch.autograd.gradgradcheck(f, (x, h0))
    xz = torch.randn(2, 50, cell.weight_ih.shape[0], dtype=torch.float64) * 150  # sigmoid underflows in float32
    got = parallel_scan.scan(cell.float(), xz.float(), HiddenState(torch.zeros(2, 2)), None, log_space=False)[0]
    cell.double()
    want = parallel_scan.scan_stepped(*cell.mix_inputs(cell.split(xz)), torch.zeros(2, 2, dtype=torch.float64), None)
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-3)
