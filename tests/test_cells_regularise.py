"""Variational dropout and weight-drop around a layer: exact against the layer run by hand with the same
masks, for every cell and on the layer's own route; off in eval; reproducible from a seeded generator."""

from __future__ import annotations

import pytest
import torch

import rnnkit
from rnnkit.core.regularise import Regularised, bernoulli_bools
from user_cells import MGUCell


def wrapped(cell, batch_first=True, seed=0):
    layer = rnnkit.Recurrent(
        rnnkit.CELLS[cell], input_size=3, hidden_size=4, num_layers=2, bidirectional=True, batch_first=batch_first
    ).double()
    return Regularised(
        layer, input_dropout=0.3, output_dropout=0.4, weight_drop=0.5, generator=torch.Generator().manual_seed(seed)
    )


@pytest.mark.parametrize("cell", list(rnnkit.CELLS))
def test_equals_the_layer_run_by_hand_with_the_same_masks(cell):
    reg = wrapped(cell)
    x = torch.randn(3, 6, 3, dtype=torch.float64)
    lengths = [6, 2, 4]
    masks = reg.sample_masks(x)
    out, state = reg(x, lengths=lengths, masks=masks)
    loss = out.pow(2).sum()
    grads = torch.autograd.grad(loss, list(reg.layer.parameters()))

    by_hand = rnnkit.Recurrent(
        rnnkit.CELLS[cell], input_size=3, hidden_size=4, num_layers=2, bidirectional=True, batch_first=True
    ).double()
    by_hand.load_state_dict(reg.layer.state_dict())
    with torch.no_grad():
        for name, m in masks.weights.items():
            by_hand.get_parameter(name).mul_(m)
    want_out, want_state = by_hand(x * masks.input, lengths=lengths)
    want_out = want_out * masks.output
    torch.testing.assert_close(out, want_out)
    for got, want in zip(
        state if isinstance(state, tuple) else (state,), want_state if isinstance(want_state, tuple) else (want_state,)
    ):
        torch.testing.assert_close(got, want)
    want_grads = dict(
        zip(
            [n for n, _ in by_hand.named_parameters()],
            torch.autograd.grad(want_out.pow(2).sum(), list(by_hand.parameters())),
        )
    )
    for (name, _), got in zip(reg.layer.named_parameters(), grads):
        want = want_grads[name] * masks.weights[name] if name in masks.weights else want_grads[name]
        torch.testing.assert_close(got, want, msg=name)  # d/dW of (W * M) is the mask times d/d(W * M)


@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_the_layer_keeps_its_route(cell):
    reg = Regularised(rnnkit.LAYERS[cell](3, 4, batch_first=True), weight_drop=0.5)
    x = torch.randn(2, 5, 3)
    route = rnnkit.explain(reg.layer, x).name
    seen = []
    handler = _Catch(seen)
    rnnkit.routing.LOG.addHandler(handler)
    rnnkit.routing.LOG.setLevel("DEBUG")
    try:
        reg(x)
    finally:
        rnnkit.routing.LOG.removeHandler(handler)
        rnnkit.routing.LOG.setLevel("NOTSET")
    assert seen and all(route in message for message in seen)


class _Catch:
    level = 0

    def __init__(self, seen):
        self.seen = seen

    def handle(self, record):
        self.seen.append(record.getMessage())


def test_masks_are_per_sequence_and_shared_over_time_and_layouts_agree():
    reg = wrapped("gru")
    x = torch.randn(3, 6, 3, dtype=torch.float64)
    masks = reg.sample_masks(x)
    assert masks.input.shape == (3, 1, 3) and masks.output.shape == (3, 1, 8)
    assert set(masks.weights) == {f"cells.{i}.weight_hh" for i in range(4)}
    assert set(masks.input.unique().tolist()) <= {0.0, 1 / 0.7}
    time_major = wrapped("gru", batch_first=False)
    time_major.layer.load_state_dict(reg.layer.state_dict())
    out, _ = reg(x, masks=masks)
    out_t, _ = time_major(x.transpose(0, 1), masks=masks)
    torch.testing.assert_close(out_t.transpose(0, 1), out)


def test_off_in_eval_and_reproducible_from_the_generator():
    x = torch.randn(2, 5, 3, dtype=torch.float64)
    a, b = wrapped("lstm", seed=7), wrapped("lstm", seed=7)
    b.layer.load_state_dict(a.layer.state_dict())
    torch.testing.assert_close(a(x)[0], b(x)[0])  # same seed, same masks
    assert not torch.equal(a(x)[0], b.eval()(x)[0])
    torch.testing.assert_close(b(x)[0], b.layer(x)[0])  # eval: the layer itself


def test_scan_cells_have_no_recurrent_weights_to_drop():
    reg = Regularised(rnnkit.Recurrent(rnnkit.MinGRUCell, 3, 4, batch_first=True), weight_drop=0.5)
    assert reg.sample_masks(torch.randn(2, 5, 3)).weights == {}


def test_probabilities_are_checked():
    with pytest.raises(ValueError, match=r"weight_drop must be in \[0, 1\), got 1.0"):
        Regularised(rnnkit.LSTM(3, 4, batch_first=True), weight_drop=1.0)


# -- zoneout and recurrent dropout: inside the recurrence, on the layer's own kernels -----------------


def _routes_of(fn):
    seen = []
    handler = _Catch(seen)
    rnnkit.routing.LOG.addHandler(handler)
    rnnkit.routing.LOG.setLevel("DEBUG")
    try:
        result = fn()
    finally:
        rnnkit.routing.LOG.removeHandler(handler)
        rnnkit.routing.LOG.setLevel("NOTSET")
    return result, {message.split(": ")[-1] for message in seen}


STATE_NOISE_CELLS = {
    "lstm": (rnnkit.LSTMCell, "cpp-loops"),
    "gru": (rnnkit.GRUCell, "cpp-loops"),
    "rnn": (rnnkit.RNNCell, "cpp-loops"),
    "slstm": (rnnkit.SLSTMCell, "cpp-loops"),
    "user": (MGUCell, "cpp-compiled"),
    "ln-lstm": (rnnkit.CELLS["ln-lstm"], "cpp-layernorm"),
    "ln-gru": (rnnkit.CELLS["ln-gru"], "cpp-layernorm"),
}


@pytest.mark.parametrize("cell", list(STATE_NOISE_CELLS))
def test_zoneout_and_recurrent_dropout_equal_the_reference_loop_with_the_same_masks(cell):
    cls, route = STATE_NOISE_CELLS[cell]
    H, extra = (16, {"num_heads": 2}) if cell == "slstm" else (4, {})
    layer = rnnkit.Recurrent(cls, 3, H, num_layers=2, bidirectional=True, batch_first=True, **extra).double()
    reg = Regularised(layer, zoneout=0.3, recurrent_dropout=0.4, generator=torch.Generator().manual_seed(1))
    x = torch.randn(3, 6, 3, dtype=torch.float64, requires_grad=True)
    masks = reg.sample_masks(x)

    def run():
        out, state = reg(x, lengths=[6, 2, 4], masks=masks)
        state = state if isinstance(state, tuple) else (state,)
        loss = out.pow(2).sum() + sum((s * s).sum() for s in state)
        return (out, *state, *torch.autograd.grad(loss, [x, *layer.parameters()]))

    got, routes = _routes_of(run)
    assert routes == {route}  # the layer's fast route, the masks applied inside it
    with rnnkit.routing.force("reference"):
        want = run()
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)


def test_the_reference_step_is_zoneout_and_recurrent_dropout_written_out():
    layer = rnnkit.Recurrent(rnnkit.LSTMCell, 3, 4, batch_first=True).double()
    reg = Regularised(layer, zoneout=0.5, recurrent_dropout=0.5, generator=torch.Generator().manual_seed(2))
    x = torch.randn(2, 5, 3, dtype=torch.float64)
    masks = reg.sample_masks(x)
    r, keep = masks.state[0]
    assert r.shape == (2, 4) and set(r.unique().tolist()) <= {0.0, 2.0} and keep.shape == (2, 5, 4)
    assert keep.dtype == torch.bool and 0 < keep.sum() < keep.numel()
    cell = layer.cells[0]
    h = c = torch.zeros(2, 4, dtype=torch.float64)
    outs = []
    for t in range(5):
        z = x[:, t] @ cell.weight_ih.T + cell.bias_ih + (h * r) @ cell.weight_hh.T + cell.bias_hh
        i, f, g, o = z.chunk(4, dim=-1)
        c_new = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        h_new = torch.sigmoid(o) * torch.tanh(c_new)
        c, h = torch.where(keep[:, t], c, c_new), torch.where(keep[:, t], h, h_new)  # kept units keep both
        outs.append(h)
    out, (h_n, c_n) = reg(x, masks=masks)
    torch.testing.assert_close(out, torch.stack(outs, 1))
    torch.testing.assert_close((h_n[0], c_n[0]), (h, c))


@pytest.mark.parametrize("cell", ["lstm", "slstm", "user", "ln-lstm", "ln-gru"])
def test_gradcheck_with_zoneout_and_recurrent_dropout(cell):
    cls, _ = STATE_NOISE_CELLS[cell]
    H = 8 if cell == "slstm" else 3  # the sLSTM: heads of 8, its blocks' product in float64 (AVX-512)
    layer = rnnkit.Recurrent(cls, 2, H, batch_first=True).double()
    if cell == "slstm":
        layer = rnnkit.Recurrent(cls, 2, H, batch_first=True, num_heads=1).double()
    reg = Regularised(layer, zoneout=0.4, recurrent_dropout=0.3, generator=torch.Generator().manual_seed(3))
    x = torch.randn(2, 3, 2, dtype=torch.float64, requires_grad=True)
    masks = reg.sample_masks(x)
    w_hh = layer.cells[0].weight_hh.detach().clone().requires_grad_()

    def f(x, w_hh):
        out, state = torch.func.functional_call(reg, {"layer.cells.0.weight_hh": w_hh}, (x,), {"masks": masks})
        return out, *(state if isinstance(state, tuple) else (state,))

    assert torch.autograd.gradcheck(f, (x, w_hh))


def test_state_noise_off_in_eval_reproducible_and_absent_where_nothing_is_read():
    x = torch.randn(2, 5, 3, dtype=torch.float64)
    a = Regularised(
        rnnkit.Recurrent(rnnkit.GRUCell, 3, 4, batch_first=True).double(),
        zoneout=0.5,
        generator=torch.Generator().manual_seed(4),
    )
    b = Regularised(
        rnnkit.Recurrent(rnnkit.GRUCell, 3, 4, batch_first=True).double(),
        zoneout=0.5,
        generator=torch.Generator().manual_seed(4),
    )
    b.layer.load_state_dict(a.layer.state_dict())
    torch.testing.assert_close(a(x)[0], b(x)[0])
    assert not torch.equal(a(x)[0], a.layer(x)[0])
    a.eval()
    assert torch.equal(a(x)[0], a.layer(x)[0])
    scan = Regularised(rnnkit.Recurrent(rnnkit.MinGRUCell, 3, 4, batch_first=True), zoneout=0.2, recurrent_dropout=0.5)
    (noise,) = scan.sample_masks(torch.randn(2, 5, 3)).state.values()
    assert noise.recurrent is None and noise.zoneout.shape == (2, 5, 4)  # minGRU's gates read no h
    assert rnnkit.explain(scan.layer, x.float()).name == "parallel-scan"


@pytest.mark.parametrize("p", [0.02, 0.1, 0.5, 0.8])
def test_zoneout_masks_are_independent_bernoulli_draws(p):
    """The masks' sampler (gaps between the rarer value): each element True with probability p,
    neighbours independent (pairs True together p^2 of the time), along the last dimension and
    across rows, the same draws from the same seed."""
    keep = bernoulli_bools((8, 50, 500), p, "cpu", torch.Generator().manual_seed(11))
    assert keep.dtype == torch.bool and keep.shape == (8, 50, 500)
    f = keep.double()
    n = f.numel()
    sd = (p * (1 - p) / n) ** 0.5
    assert abs(f.mean().item() - p) < 5 * sd
    for a, b in ((f[..., 1:], f[..., :-1]), (f[:, 1:], f[:, :-1]), (f[1:], f[:-1])):
        assert abs((a * b).mean().item() - p * p) < 5 * (p * p * (1 - p * p) / a.numel()) ** 0.5
    assert torch.equal(keep, bernoulli_bools((8, 50, 500), p, "cpu", torch.Generator().manual_seed(11)))
    assert not torch.equal(keep, bernoulli_bools((8, 50, 500), p, "cpu", torch.Generator().manual_seed(12)))
    assert bernoulli_bools((0, 3), p, "cpu", None).shape == (0, 3)


def _copied(value):
    if isinstance(value, torch.Tensor):
        return value.clone()
    if isinstance(value, (list, tuple)):
        return type(value)(_copied(v) for v in value)
    if isinstance(value, dict):
        return {k: _copied(v) for k, v in value.items()}
    return value


def test_the_loops_with_masks_are_ops_that_pass_opcheck(monkeypatch):
    """The C++ loops with zoneout and recurrent dropout are ops of their own (``*_noisy``: the loops
    without them keep their schemas); every call a training step makes of them passes opcheck."""
    from rnnkit.core.kernels import base

    real, calls = base.noisy_ops(), []

    class Recorder:
        def __getattr__(self, name):
            op = getattr(real, name)

            def call(*args, **kwargs):
                calls.append((name, op, _copied(args), _copied(kwargs)))
                return op(*args, **kwargs)

            return call

    monkeypatch.setattr(base, "noisy_ops", Recorder)
    for cell, (cls, _) in STATE_NOISE_CELLS.items():
        H, extra = (8, {"num_heads": 2}) if cell == "slstm" else (4, {})
        layer = rnnkit.Recurrent(cls, 3, H, batch_first=True, **extra).double()
        reg = Regularised(layer, zoneout=0.3, recurrent_dropout=0.4, generator=torch.Generator().manual_seed(5))
        out, _ = reg(torch.randn(2, 3, 3, dtype=torch.float64, requires_grad=True), lengths=[3, 2])
        out.sum().backward()
    assert {name for name, *_ in calls} == set(base.NOISY_OPS)
    for _, op, args, kwargs in calls:
        torch.library.opcheck(op, args, kwargs)


@pytest.mark.parametrize("noise", ["zoneout", "recurrent dropout", "both"])
@pytest.mark.parametrize("cell", ["ln-lstm", "ln-gru"])
def test_layer_normalised_loops_apply_zoneout_and_recurrent_dropout_exactly(cell, noise):
    """The layer-normalised C++ loops (``cpp-layernorm``) take each regulariser alone and both: outputs,
    final states and every gradient (input, initial state, weights, gains, normalisation biases) equal
    the reference loop's with the same masks, random gains and biases, padded lengths, two layers
    both ways; ``rnnkit.explain`` names the route while the masks are current."""
    from rnnkit.core.kernels.state_noise import applying

    layer = rnnkit.Recurrent(rnnkit.CELLS[cell], 3, 5, num_layers=2, bidirectional=True, batch_first=True).double()
    with torch.no_grad():
        for p in layer.parameters():
            p.copy_(torch.randn_like(p) * 0.5)
    p_zone, p_drop = {"zoneout": (0.4, 0.0), "recurrent dropout": (0.0, 0.4), "both": (0.4, 0.4)}[noise]
    reg = Regularised(layer, zoneout=p_zone, recurrent_dropout=p_drop, generator=torch.Generator().manual_seed(6))
    x = torch.randn(3, 6, 3, dtype=torch.float64, requires_grad=True)
    h0 = torch.randn(4, 3, 5, dtype=torch.float64, requires_grad=True)
    state = (h0, torch.randn_like(h0)) if cell == "ln-lstm" else h0
    masks = reg.sample_masks(x)
    assert all((n.zoneout is not None) == (p_zone > 0) for n in masks.state.values())
    assert all((n.recurrent is not None) == (p_drop > 0) for n in masks.state.values())

    def run():
        out, final = reg(x, state, lengths=[6, 2, 4], masks=masks)
        parts = (final,) if isinstance(final, torch.Tensor) else tuple(final)
        weights = torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view_as(out)
        loss = (out * weights).sum() + sum((s * s).sum() for s in parts)
        return (out, *parts, *torch.autograd.grad(loss, [x, h0, *layer.parameters()]))

    got, routes = _routes_of(run)
    assert routes == {"cpp-layernorm"}
    with applying({layer.cells[i]: n for i, n in masks.state.items()}):
        assert rnnkit.explain(layer, x).name == "cpp-layernorm"
    with rnnkit.routing.force("reference"):
        want = run()
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)
    assert not torch.allclose(got[0], layer(x, state, lengths=[6, 2, 4])[0])  # the masks did act


@pytest.mark.parametrize("cell", ["ln-lstm", "ln-gru"])
def test_layer_normalised_loops_with_masks_differentiate_their_backward(cell):
    """A differentiable backward (create_graph) of the layer-normalised loops applies the same masks:
    gradgradcheck in float64."""
    layer = rnnkit.Recurrent(rnnkit.CELLS[cell], 2, 3, batch_first=True).double()
    reg = Regularised(layer, zoneout=0.4, recurrent_dropout=0.3, generator=torch.Generator().manual_seed(7))
    x = torch.randn(2, 3, 2, dtype=torch.float64, requires_grad=True)
    masks = reg.sample_masks(x)
    _, routes = _routes_of(lambda: reg(x, lengths=[3, 2], masks=masks))
    assert routes == {"cpp-layernorm"}
    assert torch.autograd.gradgradcheck(lambda x: reg(x, lengths=[3, 2], masks=masks)[0], (x,))


# -- zoneout and recurrent dropout under torch.compile -------------------------------------------------

COMPILED_NOISE = {  # name -> (layer, zoneout, recurrent dropout); each compiled case costs seconds
    "lstm, 2 layers both ways, both": (
        lambda: rnnkit.LSTM(3, 4, num_layers=2, bidirectional=True, batch_first=True),
        0.3,
        0.4,
    ),
    "gru, time-major, recurrent dropout": (lambda: rnnkit.GRU(3, 4), 0.0, 0.4),
    "user cell, zoneout": (lambda: rnnkit.Recurrent(MGUCell, 3, 4, batch_first=True), 0.3, 0.0),
    "mingru, zoneout": (lambda: rnnkit.Recurrent(rnnkit.MinGRUCell, 3, 4, batch_first=True), 0.3, 0.0),
}


@pytest.mark.parametrize("case", list(COMPILED_NOISE))
def test_compiled_zoneout_and_recurrent_dropout_equal_eager_with_the_same_masks(case):
    """torch.compile (one graph, fullgraph=True) of a Regularised layer with zoneout, recurrent dropout
    or both, in training with lengths and an initial state: the outputs, final states and every
    gradient equal the eager call's with the same masks (float64), and the masks did act."""
    make, p_zone, p_drop = COMPILED_NOISE[case]
    layer = make().double()
    reg = Regularised(layer, zoneout=p_zone, recurrent_dropout=p_drop, generator=torch.Generator().manual_seed(8))
    B, T = 3, 6
    x = torch.randn(B, T, 3, dtype=torch.float64, requires_grad=True)
    x_call = x if layer.batch_first else x.transpose(0, 1)
    h0 = torch.randn(layer.num_layers * layer.num_directions, B, 4, dtype=torch.float64, requires_grad=True)
    state = layer.State(h0, torch.randn_like(h0)) if len(layer.State._fields) == 2 else h0
    lengths = torch.tensor([6, 2, 4])
    masks = reg.sample_masks(x_call)
    torch._dynamo.reset()
    compiled = torch.compile(reg, fullgraph=True, backend="aot_eager")

    def run(module):
        out, final = module(x_call, state, lengths=lengths, masks=masks)
        parts = (final,) if isinstance(final, torch.Tensor) else tuple(final)
        weights = torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view_as(out)
        loss = (out * weights).sum() + sum((s * s).sum() for s in parts)
        return (out, *parts, *torch.autograd.grad(loss, [x, h0, *layer.parameters()]))

    got, want = run(compiled), run(reg)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b)
    assert not torch.allclose(got[0], layer(x_call, state, lengths=lengths)[0])  # the masks did act


def test_compiled_layer_draws_its_masks_in_the_graph_and_is_itself_in_eval():
    """Without given masks the compiled call draws them in its graph (one graph, fullgraph=True), each
    call anew; in evaluation the compiled wrapper is the layer."""
    layer = rnnkit.GRU(3, 4, batch_first=True)
    reg = Regularised(layer, zoneout=0.3, recurrent_dropout=0.4)
    compiled = torch.compile(reg, fullgraph=True, backend="aot_eager")
    x = torch.randn(2, 5, 3)
    torch._dynamo.reset()
    first, second, plain = compiled(x)[0], compiled(x)[0], layer(x)[0]
    assert not torch.allclose(first, plain) and not torch.allclose(first, second)
    reg.eval()
    torch.testing.assert_close(compiled(x)[0], plain)
