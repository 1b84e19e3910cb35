"""rnnkit's LSTM, GRU, RNN and cells hold torch.nn's contract exactly: construction (the same initial
weights under the same seed), the call (batched, unbatched, packed; with and without hx), outputs,
states, every gradient, parameter names, state_dict, pickling and saving, and conversion both ways."""

from __future__ import annotations

import copy
import io
import pickle

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence

import rnnkit

LAYER_PAIRS = {"lstm": (nn.LSTM, rnnkit.LSTM), "gru": (nn.GRU, rnnkit.GRU), "rnn": (nn.RNN, rnnkit.RNN)}
CELL_PAIRS = {
    "lstm": (nn.LSTMCell, rnnkit.LSTMCell),
    "gru": (nn.GRUCell, rnnkit.GRUCell),
    "rnn": (nn.RNNCell, rnnkit.RNNCell),
}
REL = {torch.float32: 1e-5, torch.float64: 1e-10}


def flat(obj) -> list:
    """Every tensor of an output (a tensor, a PackedSequence or a tuple of them), in order."""
    if isinstance(obj, PackedSequence):
        return [obj.data]
    if isinstance(obj, torch.Tensor):
        return [obj]
    return [t for part in obj for t in flat(part)]


def assert_rel(ours, theirs, rel, what):
    """Max abs difference within ``rel`` of the reference's largest magnitude, floored at 0.1: a result
    near zero (a gradient whose terms cancel) carries the rounding of terms of order one."""
    assert ours.shape == theirs.shape and ours.dtype == theirs.dtype, what
    scale = theirs.abs().max().item() if theirs.numel() else 0.0
    err = (ours - theirs).abs().max().item() if theirs.numel() else 0.0
    assert err <= rel * max(scale, 0.1), f"{what}: max abs difference {err:.3g} at scale {scale:.3g}"


def twins(pair, *args, **kwargs):
    """torch.nn's module and rnnkit's, each constructed right after the same manual_seed."""
    theirs_cls, ours_cls = pair
    torch.manual_seed(1234)
    theirs = theirs_cls(*args, **kwargs)
    torch.manual_seed(1234)
    ours = ours_cls(*args, **kwargs)
    return theirs, ours


def run_both(theirs, ours, make_inputs, rel):
    """Call both modules on equal inputs; compare outputs, states and every gradient."""
    results = []
    for module in (theirs, ours):
        inputs, leaves = make_inputs()
        out = module(*inputs)
        tensors = flat(out)
        torch.manual_seed(7)
        loss = sum((t * torch.randn(t.shape, dtype=t.dtype)).sum() for t in tensors)  # not randn_like: strides
        params = [p for p in module.parameters() if p.requires_grad]
        grads = torch.autograd.grad(loss, [*leaves, *params], allow_unused=True)
        results.append((out, tensors, grads))
    (out_t, tensors_t, grads_t), (out_o, tensors_o, grads_o) = results
    assert type(out_o[0]) is type(out_t[0]) if isinstance(out_t, tuple) else type(out_o) is type(out_t)
    assert len(tensors_o) == len(tensors_t)
    for i, (a, b) in enumerate(zip(tensors_o, tensors_t)):
        assert_rel(a, b, rel, f"output {i}")
    names = ["input"] * (len(grads_t) - len(list(theirs.parameters()))) + [n for n, _ in theirs.named_parameters()]
    for name, a, b in zip(names, grads_o, grads_t):
        assert (a is None) == (b is None), name
        if a is not None:
            assert_rel(a, b, rel, f"gradient of {name}")
    if isinstance(out_t, tuple) and isinstance(out_t[0], PackedSequence):
        for field in ("batch_sizes", "sorted_indices", "unsorted_indices"):
            a, b = getattr(out_o[0], field), getattr(out_t[0], field)
            assert (a is None and b is None) or torch.equal(a, b), field


@st.composite
def layer_case(draw):
    kind = draw(st.sampled_from(sorted(LAYER_PAIRS)))
    H = draw(st.integers(2, 5))
    kwargs = dict(
        num_layers=draw(st.integers(1, 2)),
        bias=draw(st.booleans()),
        batch_first=draw(st.booleans()),
        bidirectional=draw(st.booleans()),
    )
    if kind == "rnn":
        kwargs["nonlinearity"] = draw(st.sampled_from(["tanh", "relu"]))
    if kind == "lstm" and draw(st.booleans()):
        kwargs["proj_size"] = draw(st.integers(1, H - 1))
    if kwargs["num_layers"] > 1 and draw(st.booleans()):
        kwargs["dropout"] = 0.3  # compared in eval mode only: train mode draws masks
    form = draw(st.sampled_from(["batched", "unbatched", "packed-sorted", "packed-unsorted"]))
    return dict(
        kind=kind,
        I=draw(st.integers(1, 4)),
        H=H,
        kwargs=kwargs,
        form=form,
        B=draw(st.integers(1, 3)),
        T=draw(st.integers(1, 5)),
        with_hx=draw(st.booleans()),
        dtype=draw(st.sampled_from([torch.float32, torch.float64])),
        train=draw(st.booleans()),
        seed=draw(st.integers(0, 2**16)),
    )


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=layer_case())
def test_layers_hold_torch_nn_contract(case):
    kind, I, H, kwargs, form, B, T = (case[k] for k in ("kind", "I", "H", "kwargs", "form", "B", "T"))
    dtype = case["dtype"]
    theirs, ours = twins(LAYER_PAIRS[kind], I, H, **kwargs)
    for (name, a), (name_o, b) in zip(theirs.named_parameters(), ours.named_parameters(), strict=True):
        assert name == name_o and torch.equal(a, b), f"initial {name} differs"
    theirs, ours = theirs.to(dtype), ours.to(dtype)
    train = case["train"] and "dropout" not in kwargs
    theirs.train(train)
    ours.train(train)
    D = 2 if kwargs["bidirectional"] else 1
    rows, P = kwargs["num_layers"] * D, kwargs.get("proj_size") or H
    g = torch.Generator().manual_seed(case["seed"])
    x = torch.randn(B, T, I, generator=g, dtype=dtype)
    lengths = torch.randint(1, T + 1, (B,), generator=g)
    if form == "packed-sorted":
        lengths = lengths.sort(descending=True).values
    hx = [torch.randn(rows, B, size, generator=g, dtype=dtype) for size in ((P, H) if kind == "lstm" else (H,))]

    def make_inputs():
        xi = x.clone().requires_grad_()
        hi = [h.clone().requires_grad_() for h in hx]
        if form == "unbatched":
            inp = xi[0]  # (T, I)
            state = [h[:, 0] for h in hi]
        else:
            inp = xi if kwargs["batch_first"] else xi.transpose(0, 1)
            state = hi
            if form.startswith("packed"):
                inp = pack_padded_sequence(
                    inp, lengths, batch_first=kwargs["batch_first"], enforce_sorted=form == "packed-sorted"
                )
        args = (inp,)
        if case["with_hx"]:
            args += (tuple(state) if kind == "lstm" else state[0],)
        return args, [xi, *hi] if case["with_hx"] else [xi]

    run_both(theirs, ours, make_inputs, REL[dtype])


@settings(max_examples=30, deadline=None)
@given(
    kind=st.sampled_from(sorted(CELL_PAIRS)),
    bias=st.booleans(),
    batched=st.booleans(),
    with_hx=st.booleans(),
    dtype=st.sampled_from([torch.float32, torch.float64]),
    B=st.integers(1, 3),
    seed=st.integers(0, 2**16),
)
def test_cells_hold_torch_nn_contract(kind, bias, batched, with_hx, dtype, B, seed):
    kwargs = {"bias": bias}
    theirs, ours = twins(CELL_PAIRS[kind], 3, 4, **kwargs)
    assert [n for n, _ in theirs.named_parameters()] == [n for n, _ in ours.named_parameters()]
    assert all(torch.equal(a, b) for a, b in zip(theirs.parameters(), ours.parameters()))
    theirs, ours = theirs.to(dtype), ours.to(dtype)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, 3, generator=g, dtype=dtype)
    hx = [torch.randn(B, 4, generator=g, dtype=dtype) for _ in range(2 if kind == "lstm" else 1)]

    def make_inputs():
        xi = x.clone().requires_grad_()
        hi = [h.clone().requires_grad_() for h in hx]
        inp, state = (xi, hi) if batched else (xi[0], [h[0] for h in hi])
        args = (inp,) + (((tuple(state) if kind == "lstm" else state[0]),) if with_hx else ())
        return args, [xi, *hi] if with_hx else [xi]

    run_both(theirs, ours, make_inputs, REL[dtype])
    out = ours(x) if batched else ours(x[0])
    if kind == "lstm":
        assert isinstance(out, tuple) and len(out) == 2
    else:
        assert type(out) is torch.Tensor


@pytest.mark.parametrize("kind", sorted(LAYER_PAIRS))
def test_names_all_weights_and_flatten_parameters(kind):
    kwargs = {"proj_size": 2} if kind == "lstm" else {}
    theirs, ours = twins(LAYER_PAIRS[kind], 3, 4, num_layers=2, bidirectional=True, **kwargs)
    assert list(ours.state_dict()) == list(theirs.state_dict())
    assert "weight_hr_l1_reverse" in ours.state_dict() or kind != "lstm"
    assert [[p.shape for p in layer] for layer in ours.all_weights] == [
        [p.shape for p in layer] for layer in theirs.all_weights
    ]
    ours.flatten_parameters()  # torch.nn's, a no-op on the CPU
    assert repr(ours).split("(", 1)[1] == repr(theirs).split("(", 1)[1]
    # initialising by name, a common pattern, reaches the weights rnnkit runs
    for name, p in ours.named_parameters():
        if "weight_hh" in name:
            nn.init.zeros_(p)
    x = torch.randn(4, 2, 3)
    for name, p in theirs.named_parameters():
        if "weight_hh" in name:
            nn.init.zeros_(p)
    torch.testing.assert_close(ours(x)[0], theirs(x)[0])


@pytest.mark.parametrize("kind", sorted(LAYER_PAIRS))
def test_state_dict_round_trips_strict_both_ways(kind):
    theirs, ours = twins(LAYER_PAIRS[kind], 3, 4, num_layers=2, bidirectional=True)
    with torch.no_grad():
        for p in theirs.parameters():
            p.normal_()
    ours.load_state_dict(theirs.state_dict(), strict=True)
    x = torch.randn(5, 2, 3)
    torch.testing.assert_close(ours(x)[0], theirs(x)[0], rtol=1e-5, atol=1e-6)
    fresh = LAYER_PAIRS[kind][0](3, 4, num_layers=2, bidirectional=True)
    fresh.load_state_dict(ours.state_dict(), strict=True)
    torch.testing.assert_close(fresh(x)[0], theirs(x)[0], rtol=0, atol=0)


@pytest.mark.parametrize("weights_only", [False, True])
def test_whole_model_save_load_pickle_deepcopy(weights_only):
    lstm, cell = rnnkit.LSTM(3, 4, num_layers=2, bidirectional=True), rnnkit.GRUCell(3, 4)
    x = torch.randn(5, 2, 3)
    with torch.no_grad():
        lstm(x[:1], lstm(x)[1])  # fills the stepping path's cache, which must not be saved
    pickled = pickle.dumps(lstm)
    for kind in (rnnkit.LSTM, rnnkit.GRU, rnnkit.RNN, rnnkit.LSTMCell, rnnkit.GRUCell, rnnkit.RNNCell):
        module = kind(3, 4)
        buf = io.BytesIO()
        torch.save(module, buf)
        buf.seek(0)
        if weights_only:
            with torch.serialization.safe_globals([kind]):
                loaded = torch.load(buf, weights_only=True)
        else:
            loaded = torch.load(buf, weights_only=False)
        assert type(loaded) is kind
        args = (x,) if kind in (rnnkit.LSTM, rnnkit.GRU, rnnkit.RNN) else (x[0],)
        for a, b in zip(flat(loaded(*args)), flat(module(*args))):
            assert torch.equal(a, b)
    for other in (pickle.loads(pickled), copy.deepcopy(lstm)):
        for a, b in zip(flat(other(x)), flat(lstm(x))):
            assert torch.equal(a, b)
    assert torch.equal(copy.deepcopy(cell)(x[0]), cell(x[0]))


def test_pickled_state_holds_only_torch_nn_state():
    ours, theirs = rnnkit.LSTM(3, 4, num_layers=2), nn.LSTM(3, 4, num_layers=2)
    with torch.no_grad():
        ours(torch.randn(1, 1, 3), ours(torch.randn(2, 1, 3))[1])
    assert set(ours.__getstate__()) == set(theirs.__getstate__())


def test_dropout_with_one_layer_warns_as_torch_nn():
    with pytest.warns(UserWarning, match="non-zero dropout expects num_layers greater than 1"):
        rnnkit.GRU(3, 4, dropout=0.5)


def test_convert_replaces_every_recurrent_module_both_ways():
    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.encoder = nn.LSTM(3, 6, num_layers=2, proj_size=4, batch_first=True, bidirectional=True)
            self.blocks = nn.ModuleList(
                [nn.Sequential(nn.Linear(8, 5), nn.GRU(5, 5)), nn.RNNCell(5, 5, nonlinearity="relu")]
            )
            self.cell = nn.LSTMCell(5, 5)

        def forward(self, x):
            out, _ = self.encoder(x)
            out, h = self.blocks[0](out)
            y = self.blocks[1](out[:, -1])
            return self.cell(y)[0] + h.sum()

    model = Model().double().eval()
    model.encoder.weight_hh_l0.requires_grad_(False)
    x = torch.randn(2, 4, 3, dtype=torch.float64)
    want = model(x)
    converted = rnnkit.convert(model)
    assert converted is model
    assert type(model.encoder) is rnnkit.LSTM and type(model.blocks[0][1]) is rnnkit.GRU
    assert type(model.blocks[1]) is rnnkit.RNNCell and type(model.cell) is rnnkit.LSTMCell
    assert model.encoder.batch_first and model.encoder.proj_size == 4 and not model.encoder.training
    assert model.encoder.weight_ih_l0.dtype == torch.float64 and not model.encoder.weight_hh_l0.requires_grad
    torch.testing.assert_close(model(x), want, rtol=1e-10, atol=1e-12)
    back = rnnkit.convert(model, to="torch")
    assert type(back.encoder) is nn.LSTM and type(back.cell) is nn.LSTMCell and type(back.blocks[0][1]) is nn.GRU
    torch.testing.assert_close(back(x), want, rtol=1e-10, atol=1e-12)
    assert type(rnnkit.convert(nn.GRU(2, 3))) is rnnkit.GRU  # the model itself
    with pytest.raises(ValueError, match="to must be"):
        rnnkit.convert(model, to="keras")


def test_convert_keeps_the_global_random_stream():
    torch.manual_seed(0)
    rnnkit.convert(nn.Sequential(nn.LSTM(3, 4)))
    a = torch.rand(3)
    torch.manual_seed(0)
    nn.Sequential(nn.LSTM(3, 4))
    assert torch.equal(a, torch.rand(3))


@pytest.mark.parametrize("kind", sorted(LAYER_PAIRS))
def test_empty_sequences_give_zero_outputs_and_the_initial_state(kind):
    layer = LAYER_PAIRS[kind][1](3, 4, num_layers=2, bidirectional=True, batch_first=True).double()
    x = torch.randn(3, 5, 3, dtype=torch.float64)
    h0 = [torch.randn(4, 3, 4, dtype=torch.float64) for _ in range(2 if kind == "lstm" else 1)]
    state = tuple(h0) if kind == "lstm" else h0[0]
    for route in ("reference", None):
        ctx = rnnkit.routing.force(route) if route else torch.enable_grad()
        with ctx:
            out, final = layer(x, state, lengths=[5, 0, 2])
        assert torch.all(out[1] == 0)
        for got, want in zip(flat(final), h0):
            assert torch.equal(got[:, 1], want[:, 1])
        alone, _ = layer(x[2:, :2], tuple(h[:, 2:] for h in h0) if kind == "lstm" else h0[0][:, 2:])
        torch.testing.assert_close(out[2, :2], alone[0], rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize(
    "kind,kwargs",
    [("lstm", {}), ("lstm", {"proj_size": 1}), ("gru", {}), ("rnn", {}), ("rnn", {"nonlinearity": "relu"})],
)
@pytest.mark.parametrize("route", [None, "python-loops"])
def test_layers_gradcheck_and_gradgradcheck_with_batched_grad(kind, kwargs, route):
    """Double backward (create_graph) and vmap over the backward work on every route.

    The default route here is the C++ loops (float64 on the CPU, gradients wanted); sizes are the
    smallest that still have two layers, two directions and unequal lengths.
    """
    if route and "proj_size" in kwargs:
        pytest.skip("a projected LSTM runs torch's kernel or the reference (routing table)")
    torch.manual_seed(0)
    layer = LAYER_PAIRS[kind][1](2, 2, num_layers=2, bidirectional=True, **kwargs).double()
    if route is None:
        assert rnnkit.explain(layer, torch.randn(3, 2, 2, dtype=torch.float64)).name in {"cpp-loops", "torch-kernel"}
    names = [n for n, _ in layer.named_parameters()]
    x = torch.randn(3, 2, 2, dtype=torch.float64, requires_grad=True)
    params = [p.detach().clone().requires_grad_() for p in layer.parameters()]

    def f(x, *ps):
        out, h = torch.func.functional_call(layer, dict(zip(names, ps)), (x,), {"lengths": [3, 1]})
        return (out, *flat(h))

    with rnnkit.routing.force(route) if route else torch.enable_grad():
        assert torch.autograd.gradcheck(f, (x, *params), check_batched_grad=True, fast_mode=True)
        assert torch.autograd.gradgradcheck(f, (x, *params), check_batched_grad=True, fast_mode=True)


@pytest.mark.parametrize("kind", sorted(CELL_PAIRS))
def test_cells_gradcheck_and_gradgradcheck_with_batched_grad(kind):
    torch.manual_seed(0)
    cell = CELL_PAIRS[kind][1](2, 3).double()
    names = [n for n, _ in cell.named_parameters()]
    x = torch.randn(2, 2, dtype=torch.float64, requires_grad=True)
    hx = [torch.randn(2, 3, dtype=torch.float64, requires_grad=True) for _ in range(2 if kind == "lstm" else 1)]
    params = [p.detach().clone().requires_grad_() for p in cell.parameters()]

    def f(x, *rest):
        state, ps = rest[: len(hx)], rest[len(hx) :]
        out = torch.func.functional_call(cell, dict(zip(names, ps)), (x, tuple(state) if kind == "lstm" else state[0]))
        return tuple(flat(out))

    assert torch.autograd.gradcheck(f, (x, *hx, *params), check_batched_grad=True)
    assert torch.autograd.gradgradcheck(f, (x, *hx, *params), check_batched_grad=True)


def test_gradient_penalty_through_create_graph_matches_torch_nn():
    theirs, ours = twins(LAYER_PAIRS["lstm"], 3, 4, num_layers=2)
    x = torch.randn(5, 2, 3)
    results = []
    for module in (theirs, ours):
        xi = x.clone().requires_grad_()
        (g,) = torch.autograd.grad(module(xi)[0].square().sum(), xi, create_graph=True)
        results.append(torch.autograd.grad(g.square().sum(), list(module.parameters())))
    for a, b in zip(*results):
        assert_rel(b, a, 1e-4, "second-order gradient")
