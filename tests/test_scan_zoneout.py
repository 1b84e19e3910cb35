"""Zoneout on minGRU and minLSTM, on the parallel-scan route: the mask folded into the scan's
coefficients (a kept unit's ``z`` is 0), exact against the reference loop with the same masks, in
every form of the scan (C++, torch ops, log space), gradients included, NaN-free where whole runs of
steps are kept."""

from __future__ import annotations

import pytest
import torch

import rnnkit
from rnnkit.core import native, parallel_scan, routing
from rnnkit.core.functional import length_mask
from rnnkit.core.gates import HiddenState
from rnnkit.core.kernels.state_noise import StateNoise, applying
from rnnkit.core.regularise import Regularised
from rnnkit.core.scan import scan_reference

SCAN_CELLS = {"mingru": rnnkit.MinGRUCell, "minlstm": rnnkit.MinLSTMCell}


class _Catch:
    level = 0

    def __init__(self, seen):
        self.seen = seen

    def handle(self, record):
        self.seen.append(record.getMessage())


def _routes_of(fn):
    """``fn()`` and the routes its layer calls took (the routing log)."""
    seen: list[str] = []
    handler = _Catch(seen)
    routing.LOG.addHandler(handler)
    routing.LOG.setLevel("DEBUG")
    try:
        result = fn()
    finally:
        routing.LOG.removeHandler(handler)
        routing.LOG.setLevel("NOTSET")
    return result, {message.split(": ")[-1] for message in seen}


@pytest.mark.parametrize("cell", list(SCAN_CELLS))
@pytest.mark.parametrize("form", ["cpp", "torch-ops"])
def test_zoneout_on_the_parallel_scan_route_equals_the_reference_loop(cell, form, monkeypatch):
    """Two layers, both directions, lengths and an initial state: outputs, final state and the gradients
    of the input, the initial state and every weight, against the reference loop with the same masks."""
    if form == "torch-ops":
        monkeypatch.setitem(native._state, "ops", None)  # the stepped recurrence in torch ops
    elif native.ops() is None:
        pytest.skip("the C++ loops are not built here")
    # H = 12: one whole SIMD vector of doubles (AVX2, AVX-512) and a part of one
    layer = rnnkit.Recurrent(SCAN_CELLS[cell], 3, 12, num_layers=2, bidirectional=True, batch_first=True).double()
    reg = Regularised(layer, zoneout=0.4, generator=torch.Generator().manual_seed(1))
    x = torch.randn(3, 7, 3, dtype=torch.float64, requires_grad=True)
    h0 = torch.randn(4, 3, 12, dtype=torch.float64, requires_grad=True)
    masks = reg.sample_masks(x)
    assert set(masks.state) == {0, 1, 2, 3} and all(n.recurrent is None for n in masks.state.values())

    def run():
        out, h = reg(x, h0, lengths=[7, 2, 5], masks=masks)
        loss = (out * torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view_as(out)).sum() + h.pow(2).sum()
        return (out, h, *torch.autograd.grad(loss, [x, h0, *layer.parameters()]))

    got, routes = _routes_of(run)
    assert routes == {"parallel-scan"}  # the masks applied inside the scan, not on a fallback
    with routing.force("reference"):
        want = run()
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)
    assert not torch.allclose(got[0], layer(x, h0, lengths=[7, 2, 5])[0])  # zoneout changed the call


def _by_hand(k, v, h0, mask, keep):
    """The recurrence with zoneout written out: a kept unit (or a padded step) keeps its state."""
    h, outs = h0, []
    for t in range(k.shape[1]):
        z = torch.sigmoid(k[:, t])
        g = torch.where(v[:, t] >= 0, v[:, t] + 0.5, torch.sigmoid(v[:, t]))
        h = torch.where(keep[:, t] | ~mask[:, t, None], h, (1 - z) * h + z * g)
        outs.append(h)
    return torch.stack(outs, 1)


def _log_space(k, v, h0, mask, keep):
    coefficients = parallel_scan.masked_coefficients(*parallel_scan.log_coefficients(k, v), mask, keep)
    return parallel_scan.scan_log_space(*coefficients, h0)


@pytest.mark.parametrize("run", [_log_space, parallel_scan.scan_stepped], ids=["log-space", "stepped"])
def test_each_form_of_the_scan_folds_the_mask_exactly_and_without_nans(run):
    """Runs of kept steps longer than a log-space chunk (64 steps), a sequence kept throughout, units
    kept at every step: the kept states are the previous ones exactly, every value and gradient finite,
    the gradients the recurrence's by autograd; float64 gradcheck at a tiny size."""
    torch.manual_seed(0)
    B, T, H = 3, 150, 2
    k, v = torch.randn(B, T, H, dtype=torch.float64) * 3, torch.randn(B, T, H, dtype=torch.float64) * 3
    h0 = torch.randn(B, H, dtype=torch.float64)
    mask = length_mask(torch.tensor([150, 150, 90]), T)
    keep = torch.rand(B, T, H) < 0.3
    keep[0, 10:140] = True  # two whole chunks kept
    keep[1] = True  # a sequence that never changes
    keep[2, :, 0] = True  # a unit that never changes
    inputs = [t.clone().requires_grad_() for t in (k, v, h0)]
    hs = run(*inputs, mask, keep)
    want = _by_hand(*inputs, mask, keep)
    torch.testing.assert_close(hs, want, rtol=1e-9, atol=1e-9)
    assert torch.equal(hs[1], h0[1].expand(T, H)) and torch.equal(hs[2, :, 0], h0[2, 0].expand(T))
    assert torch.equal(hs[0, 10:140], hs[0, 9:10].expand(130, H))
    weights = torch.randn(B, T, H, dtype=torch.float64)
    grads = torch.autograd.grad((hs * weights).sum(), inputs)
    for got, expected in zip(grads, torch.autograd.grad((want * weights).sum(), inputs), strict=True):
        assert torch.isfinite(got).all()
        torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-9)
    dk, dv, dh0 = grads
    assert not dk[keep].any() and not dv[keep].any()  # no gradient into a kept unit's gates
    torch.testing.assert_close(dh0[1], weights[1].sum(0))  # carried throughout: every step's gradient
    small = [t[:2, :5].detach().clone().requires_grad_() for t in (k, v)] + [h0[:2].clone().requires_grad_()]
    small_keep = keep[:2, :5].clone()
    assert torch.autograd.gradcheck(lambda k, v, h0: run(k, v, h0, mask[:2, :5], small_keep), small)


@pytest.mark.parametrize("cell", list(SCAN_CELLS))
def test_gradcheck_through_the_route_with_zoneout(cell):
    """float64 gradcheck of the input, the initial state and the input weight through rnnkit.Regularised
    on the parallel-scan route (the C++ recurrence where built), one sequence padded; gradgradcheck of
    its differentiable backward (torch ops, the mask folded the same way)."""
    layer = rnnkit.Recurrent(SCAN_CELLS[cell], 2, 3, batch_first=True).double()
    reg = Regularised(layer, zoneout=0.5, generator=torch.Generator().manual_seed(3))
    x = torch.randn(2, 4, 2, dtype=torch.float64, requires_grad=True)
    h0 = torch.randn(1, 2, 3, dtype=torch.float64, requires_grad=True)
    masks = reg.sample_masks(x)
    w = layer.cells[0].weight_ih.detach().clone().requires_grad_()

    def f(x, h0, w):
        return torch.func.functional_call(
            reg, {"layer.cells.0.weight_ih": w}, (x, h0), {"lengths": [4, 3], "masks": masks}
        )

    _, routes = _routes_of(lambda: f(x, h0, w))
    assert routes == {"parallel-scan"}
    assert torch.autograd.gradcheck(f, (x, h0, w))
    assert torch.autograd.gradgradcheck(lambda x, h0: f(x, h0, w)[0], (x, h0))


def test_the_log_space_scan_of_a_cell_with_zoneout_equals_the_reference_loop():
    """The form CUDA runs, on the CPU: ``scan(..., log_space=True, keep=...)`` against the reference loop
    with the same mask current, outputs, final state and gradients."""
    torch.manual_seed(4)
    cell = rnnkit.MinLSTMCell(3, 4).double()
    x = torch.randn(2, 70, 3, dtype=torch.float64, requires_grad=True)
    h0 = torch.randn(2, 4, dtype=torch.float64, requires_grad=True)
    mask = length_mask(torch.tensor([70, 40]), 70)
    keep = torch.rand(2, 70, 4) < 0.5

    def run(scan):
        out, final = scan(cell, cell.project_input(x), HiddenState(h0), mask)
        loss = (out * out.detach().sin()).sum() + final.h.pow(2).sum()
        return (out, final.h, *torch.autograd.grad(loss, [x, h0, *cell.parameters()]))

    got = run(lambda *args: parallel_scan.scan(*args, log_space=True, keep=keep))
    with applying({cell: StateNoise(None, keep)}):
        want = run(scan_reference)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)


def test_recurrent_dropout_still_passes_the_scan_by():
    """These cells' gates read no previous output: the scan declines recurrent dropout, saying why."""
    layer = rnnkit.Recurrent(rnnkit.MinGRUCell, 3, 4, batch_first=True)
    x = torch.randn(2, 5, 3)
    with applying({layer.cells[0]: StateNoise(torch.ones(2, 4), None)}):
        passed = dict(rnnkit.explain(layer, x).passed)
        assert "read no previous output" in passed["parallel-scan"]
    with applying({layer.cells[0]: StateNoise(None, torch.zeros(2, 5, 4, dtype=torch.bool))}):
        assert rnnkit.explain(layer, x).name == "parallel-scan"


@pytest.mark.parametrize("cell", list(SCAN_CELLS))
def test_zoneout_in_float32_on_the_route(cell):
    """float32, H = 40 (whole SIMD vectors of floats and a part of one): the route's outputs and the
    input's gradient against the reference loop with the same masks."""
    layer = rnnkit.Recurrent(SCAN_CELLS[cell], 3, 40, batch_first=True)
    reg = Regularised(layer, zoneout=0.3, generator=torch.Generator().manual_seed(5))
    x = torch.randn(2, 9, 3, requires_grad=True)
    masks = reg.sample_masks(x)

    def run():
        out, h = reg(x, lengths=[9, 4], masks=masks)
        return out, h, torch.autograd.grad(out.sin().sum() + h.sum(), x)[0]

    got, routes = _routes_of(run)
    assert routes == {"parallel-scan"}
    with routing.force("reference"):
        want = run()
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
