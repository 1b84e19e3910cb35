"""Layers as executable specifications: a layer is a loop over its cell, a padded batch is each
sequence run alone, gradients are right, a user-defined cell works everywhere, bad input is named."""

from __future__ import annotations

import re

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import rnnkit
from rnnkit.core.functional import reverse_padded
from user_cells import MGUCell

LAYERS = {  # batch-first: the tests below feed (B, T, I)
    "lstm": lambda **kw: rnnkit.LSTM(batch_first=True, **kw),
    "gru": lambda **kw: rnnkit.GRU(batch_first=True, **kw),
    "rnn": lambda **kw: rnnkit.RNN(batch_first=True, **kw),
    "mgu": lambda **kw: rnnkit.Recurrent(MGUCell, batch_first=True, **kw),
}


def _state_rows(state, rows):
    parts = tuple(state) if isinstance(state, tuple) else (state,)
    return [p[rows] for p in parts]


@pytest.mark.parametrize("kind", list(LAYERS))
def test_layer_equals_manual_loop_over_its_cell(kind):
    layer = LAYERS[kind](input_size=3, hidden_size=4).double()
    x = torch.randn(2, 7, 3, dtype=torch.float64)
    out, final = layer(x)
    cell = layer.cells[0]
    state = None
    steps = []
    for t in range(x.shape[1]):
        h, state = cell.advance(x[:, t], state)
        steps.append(h)
    torch.testing.assert_close(out, torch.stack(steps, 1), atol=1e-12, rtol=0)
    for got, want in zip(_state_rows(final, 0), state):
        torch.testing.assert_close(got, want, atol=1e-12, rtol=0)


@pytest.mark.parametrize("kind", list(LAYERS))
def test_padded_batch_equals_each_sequence_alone(kind):
    layer = LAYERS[kind](input_size=3, hidden_size=4, num_layers=2, bidirectional=True).double()
    lengths = [6, 2, 4, 1]
    x = torch.randn(4, 6, 3, dtype=torch.float64)
    x_padded = x.clone()
    for b, n in enumerate(lengths):
        x_padded[b, n:] = 1e3 * torch.randn_like(x_padded[b, n:])  # padding must never be read
    out, final = layer(x_padded, lengths=lengths)
    for b, n in enumerate(lengths):
        alone, alone_final = layer(x[b : b + 1, :n])
        torch.testing.assert_close(out[b, :n], alone[0], atol=1e-12, rtol=0)
        assert torch.all(out[b, n:] == 0)
        for got, want in zip(_state_rows(final, slice(None)), _state_rows(alone_final, slice(None))):
            torch.testing.assert_close(got[:, b], want[:, 0], atol=1e-12, rtol=0)


@pytest.mark.parametrize("kind", list(LAYERS))
def test_gradcheck(kind):
    layer = LAYERS[kind](input_size=2, hidden_size=3, num_layers=2, bidirectional=True).double()
    x = torch.randn(3, 4, 2, dtype=torch.float64, requires_grad=True)
    lengths = torch.tensor([4, 2, 3])

    def f(x, *params):
        out, final = torch.func.functional_call(layer, dict(zip(names, params)), (x,), {"lengths": lengths})
        return out, *_state_rows(final, slice(None))

    names = [n for n, _ in layer.named_parameters()]
    params = [p.detach().clone().requires_grad_() for p in layer.parameters()]
    assert torch.autograd.gradcheck(f, (x, *params), eps=1e-6, atol=1e-6)


@settings(max_examples=25, deadline=None)
@given(
    B=st.integers(1, 4),
    T=st.integers(1, 7),
    I=st.integers(1, 5),
    H=st.integers(1, 6),
    num_layers=st.integers(1, 3),
    bidirectional=st.booleans(),
    kind=st.sampled_from(["lstm", "gru", "rnn"]),
    data=st.data(),
)
def test_property_matches_torch_packed(B, T, I, H, num_layers, bidirectional, kind, data):
    lengths = data.draw(st.lists(st.integers(1, T), min_size=B, max_size=B))
    theirs = {"lstm": torch.nn.LSTM, "gru": torch.nn.GRU, "rnn": torch.nn.RNN}[kind](
        I, H, num_layers, batch_first=True, bidirectional=bidirectional
    ).double()
    ours = rnnkit.from_torch(theirs)
    x = torch.randn(B, T, I, dtype=torch.float64)
    packed = torch.nn.utils.rnn.pack_padded_sequence(x, lengths, batch_first=True, enforce_sorted=False)
    ref_out, ref_final = theirs(packed)
    ref_out, _ = torch.nn.utils.rnn.pad_packed_sequence(ref_out, batch_first=True, total_length=T)
    out, final = ours(x, lengths=torch.tensor(lengths))
    torch.testing.assert_close(out, ref_out, atol=1e-10, rtol=0)
    for a, b in zip(_state_rows(final, slice(None)), _state_rows(ref_final, slice(None))):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=0)


@settings(max_examples=25, deadline=None)
@given(lengths=st.lists(st.integers(1, 9), min_size=1, max_size=5))
def test_property_reverse_padded_is_an_involution_within_lengths(lengths):
    T = max(lengths)
    x = torch.randn(len(lengths), T, 2)
    lengths_t = torch.tensor(lengths)
    flipped = reverse_padded(x, lengths_t)
    torch.testing.assert_close(reverse_padded(flipped, lengths_t), x)
    for b, n in enumerate(lengths):
        torch.testing.assert_close(flipped[b, :n], x[b, :n].flip(0))
        torch.testing.assert_close(flipped[b, n:], x[b, n:])


def test_user_defined_cell_trains_stacked_bidirectional_with_lengths():
    """A gate-defined cell learns a toy task: is the first valid token 1 or 0?"""
    g = torch.Generator().manual_seed(0)
    model = rnnkit.Recurrent(MGUCell, input_size=2, hidden_size=16, num_layers=2, bidirectional=True, batch_first=True)
    head = torch.nn.Linear(32, 2)
    opt = torch.optim.Adam([*model.parameters(), *head.parameters()], lr=1e-2)
    losses = []
    for _ in range(60):
        lengths = torch.randint(2, 9, (16,), generator=g)
        tokens = torch.randint(0, 2, (16, 8), generator=g)
        x = torch.nn.functional.one_hot(tokens, 2).float()
        out, _ = model(x, lengths=lengths)
        logits = head(out[:, 0])  # backward half of step 0 has read the whole sequence
        loss = torch.nn.functional.cross_entropy(logits, tokens[:, 0])
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert sum(losses[-10:]) / 10 < 0.25 * sum(losses[:10]) / 10


def test_dropout_between_layers_respects_train_and_eval():
    layer = rnnkit.LSTM(3, 8, num_layers=2, dropout=0.5)
    x = torch.randn(2, 5, 3)
    layer.eval()
    assert torch.equal(layer(x)[0], layer(x)[0])
    theirs = rnnkit.to_torch(layer).eval()
    torch.testing.assert_close(layer(x)[0], theirs(x)[0], atol=1e-6, rtol=0)
    layer.train()
    assert not torch.equal(layer(x)[0], layer(x)[0])
    single = rnnkit.LSTM(3, 8, num_layers=1, dropout=0.5).train()  # nothing between layers to drop
    assert torch.equal(single(x)[0], single(x)[0])


def test_state_in_and_out_uses_torch_layout():
    layer = rnnkit.LSTM(3, 4, num_layers=2, bidirectional=True, batch_first=True)
    _, state = layer(torch.randn(5, 6, 3))
    assert isinstance(state, rnnkit.LSTMState) and tuple(state.h.shape) == (4, 5, 4)
    out2, _ = layer(torch.randn(5, 1, 3), state)  # carried state, one step
    assert tuple(out2.shape) == (5, 1, 8)
    gru_out, h = rnnkit.GRU(3, 4)(torch.randn(6, 5, 3))  # time-major by default, as torch.nn
    assert isinstance(h, torch.Tensor) and tuple(h.shape) == (1, 5, 4) and tuple(gru_out.shape) == (6, 5, 4)


# -- bad input: torch.nn's own errors for torch.nn's arguments, named ones for rnnkit's extras -------


@pytest.mark.parametrize(
    "call",
    [
        lambda l: l([1.0]),
        lambda l: l(torch.randn(2, 4, 5)),
        lambda l: l(torch.randn(2, 4, 3, dtype=torch.float64)),
        lambda l: l(torch.randn(4, 2, 3), torch.zeros(1, 2, 5)),
        lambda l: l(torch.randn(4, 2, 3), (torch.zeros(1, 2, 5), torch.zeros(2, 2, 5))),
        lambda l: l(torch.randn(4, 2, 3), (torch.zeros(1, 2, 5), torch.zeros(1, 2, 5, dtype=torch.float64))),
        lambda l: l(torch.randn(4, 3), (torch.zeros(1, 1, 5), torch.zeros(1, 1, 5))),
    ],
)
def test_bad_input_raises_torch_nn_error(call):
    torch.manual_seed(0)
    with pytest.raises(Exception) as theirs:
        call(torch.nn.LSTM(3, 5))
    with pytest.raises(type(theirs.value)) as ours:
        call(rnnkit.LSTM(3, 5))
    assert str(ours.value) == str(theirs.value)


@pytest.mark.parametrize(
    "call,error,message",
    [
        (
            lambda l: l(torch.randn(2, 4, 3), lengths=[4, 5]),
            ValueError,
            r"lengths must be in \[0, T=4\], got 5 at batch index 1",
        ),
        (lambda l: l(torch.randn(2, 4, 3), lengths=[-1, 4]), ValueError, r"got -1 at batch index 0"),
        (lambda l: l(torch.randn(2, 4, 3), lengths=[4]), ValueError, r"lengths must have shape \(B=2,\)"),
        (lambda l: l(torch.randn(2, 4, 3), lengths=torch.tensor([1.0, 2.0])), TypeError, "lengths must hold integers"),
        (lambda l: l(torch.randn(2, 4, 3), lengths="ab"), TypeError, "list of ints"),
    ],
)
def test_bad_lengths_are_named(call, error, message):
    with pytest.raises(error, match=message):
        call(rnnkit.LSTM(3, 5, batch_first=True))


def test_bad_constructor_arguments_raise_torch_nn_errors():
    for args, kwargs in [
        ((3, 0), {}),
        ((3, 4), {"dropout": 1.5}),
        ((3, 4), {"num_layers": 0}),
        ((3, 4), {"bias": 1}),
        ((3, 4), {"proj_size": 4}),
    ]:
        with pytest.raises(Exception) as theirs:
            torch.nn.LSTM(*args, **kwargs)
        with pytest.raises(type(theirs.value), match=re.escape(str(theirs.value))):
            rnnkit.LSTM(*args, **kwargs)
    with pytest.raises(ValueError, match="Unknown nonlinearity 'sigmoid'"):
        rnnkit.RNN(3, 4, nonlinearity="sigmoid")
    with pytest.raises(ValueError, match="proj_size argument is only supported for LSTM"):
        rnnkit.GRU(3, 4, proj_size=2)


def test_user_cell_layer_state_must_be_of_the_right_shape():
    with pytest.raises(ValueError, match=r"state.h must have shape \(num_layers\*D=2, B=2, H=4\), got \(1, 2, 4\)"):
        rnnkit.Recurrent(MGUCell, 3, 4, bidirectional=True)(torch.randn(5, 2, 3), torch.zeros(1, 2, 4))


def test_cell_state_of_the_wrong_kind_is_named():
    """A cell's own contract (``advance``) names a malformed state; its torch.nn call raises torch.nn's errors."""
    x = torch.randn(2, 3)
    with pytest.raises(TypeError, match=r"state must be a tuple \(h, c\)"):
        rnnkit.LSTMCell(3, 4).advance(x, torch.zeros(2, 2, 4))  # a stacked tensor is not (h, c)
    with pytest.raises(TypeError, match=r"state must be a tuple \(h, c\)"):
        rnnkit.LSTMCell(3, 4).advance(x, (torch.zeros(2, 4),))
    with pytest.raises(ValueError, match=r"state.h must have shape \(B=2, H=4\), got \(1, 4\)"):
        rnnkit.GRUCell(3, 4).advance(x, torch.zeros(1, 4))
    for ours, theirs, hx in [
        (rnnkit.GRUCell, torch.nn.GRUCell, torch.zeros(1, 4)),
        (rnnkit.LSTMCell, torch.nn.LSTMCell, torch.zeros(2, 2, 4)),
        (rnnkit.RNNCell, torch.nn.RNNCell, torch.zeros(2, 5)),
    ]:
        with pytest.raises(Exception) as want:
            theirs(3, 4)(x, hx)
        with pytest.raises(type(want.value), match=re.escape(str(want.value))):
            ours(3, 4)(x, hx)
