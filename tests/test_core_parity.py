"""rnnkit layers compute exactly torch.nn's function: outputs, states and every gradient.

Every combination of cell kind x 1-3 layers x uni/bidirectional x with/without lengths x
float32/float64 runs with random weights and inputs; with lengths torch runs on
``pack_padded_sequence(..., enforce_sorted=False)``.
"""

from __future__ import annotations

import itertools

import pytest
import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

import rnnkit

KINDS = {
    "lstm": lambda **kw: nn.LSTM(**kw),
    "gru": lambda **kw: nn.GRU(**kw),
    "rnn_tanh": lambda **kw: nn.RNN(nonlinearity="tanh", **kw),
    "rnn_relu": lambda **kw: nn.RNN(nonlinearity="relu", **kw),
}
TOL = {torch.float32: 1e-5, torch.float64: 1e-10}


def run_torch(module, x, state, lengths):
    """torch reference: packed when lengths are given, padded back to (B, T, D*H)."""
    if lengths is None:
        return module(x, state)
    packed = pack_padded_sequence(x, lengths, batch_first=True, enforce_sorted=False)
    out, final = module(packed, state)
    out, _ = pad_packed_sequence(out, batch_first=True, total_length=x.shape[1])
    return out, final


def as_tuple(state):
    return tuple(state) if isinstance(state, tuple) else (state,)


def compare(kind, num_layers, bidirectional, with_lengths, dtype, B=3, T=6, I=4, H=5, bias=True):
    """Max abs difference between rnnkit and torch over outputs, states and all gradients."""
    theirs = KINDS[kind](
        input_size=I, hidden_size=H, num_layers=num_layers, bias=bias, batch_first=True, bidirectional=bidirectional
    ).to(dtype)
    ours = rnnkit.from_torch(theirs)
    D = 2 if bidirectional else 1
    x = torch.randn(B, T, I, dtype=dtype)
    state = tuple(torch.randn(num_layers * D, B, H, dtype=dtype) for _ in as_tuple_kind(kind))
    lengths = torch.randint(1, T + 1, (B,)) if with_lengths else None
    if with_lengths:
        lengths[0] = T  # pad_packed_sequence needs one full-length row to keep T
    out_weights = torch.randn(B, T, D * H, dtype=dtype)
    state_weights = [torch.randn_like(s) for s in state]

    results = []
    for module, run in ((theirs, run_torch), (ours, lambda m, x, s, l: m(x, s, lengths=l))):
        xi = x.clone().requires_grad_()
        si = tuple(s.clone().requires_grad_() for s in state)
        out, final = run(module, xi, si if len(si) > 1 else si[0], lengths)
        loss = (out * out_weights).sum() + sum((f * w).sum() for f, w in zip(as_tuple(final), state_weights))
        params = list(module.parameters())
        grads = torch.autograd.grad(loss, [xi, *si, *params])
        results.append([out, *as_tuple(final), *grads])
    return max((a - b).abs().max().item() for a, b in zip(*results))


def as_tuple_kind(kind):
    return ("h", "c") if kind == "lstm" else ("h",)


@pytest.mark.parametrize(
    "kind,num_layers,bidirectional,with_lengths,dtype",
    list(itertools.product(KINDS, [1, 2, 3], [False, True], [False, True], [torch.float32, torch.float64])),
)
def test_parity_with_torch(kind, num_layers, bidirectional, with_lengths, dtype):
    err = compare(kind, num_layers, bidirectional, with_lengths, dtype)
    assert err < TOL[dtype], f"max abs difference {err:.3g}"


@pytest.mark.parametrize("kind", list(KINDS))
def test_parity_without_bias(kind):
    assert compare(kind, 2, True, True, torch.float64, bias=False) < 1e-10


@pytest.mark.parametrize("kind", list(KINDS))
def test_to_torch_round_trip(kind):
    ours = rnnkit.from_torch(KINDS[kind](input_size=3, hidden_size=4, num_layers=2, bidirectional=True))
    assert not ours.batch_first  # carried over from torch's default
    theirs = rnnkit.to_torch(ours)
    x = torch.randn(5, 2, 3)  # (T, B, I), torch's default layout
    out_ours, _ = ours(x)
    out_theirs, _ = theirs(x)
    torch.testing.assert_close(out_ours, out_theirs, atol=1e-6, rtol=0)
    for (name, a), (_, b) in zip(rnnkit.from_torch(theirs).named_parameters(), ours.named_parameters()):
        assert torch.equal(a, b), name


def test_from_torch_rejects_other_modules():
    with pytest.raises(TypeError, match="torch.nn.LSTM, GRU or RNN"):
        rnnkit.from_torch(nn.Linear(2, 2))


@pytest.mark.parametrize(
    "cell,theirs", [(rnnkit.LSTMCell, nn.LSTMCell), (rnnkit.GRUCell, nn.GRUCell), (rnnkit.RNNCell, nn.RNNCell)]
)
def test_cells_equal_torch_cells(cell, theirs):
    ref = theirs(4, 6).double()
    ours = cell(4, 6).double()
    ours.load_state_dict(ref.state_dict())
    x = torch.randn(3, 4, dtype=torch.float64)
    h0 = torch.randn(3, 6, dtype=torch.float64)
    if cell is rnnkit.LSTMCell:  # torch.nn's call: (h, c) for the LSTM, h for the others
        c0 = torch.randn(3, 6, dtype=torch.float64)
        h_ref, c_ref = ref(x, (h0, c0))
        h, c = ours(x, (h0, c0))
        torch.testing.assert_close(c, c_ref, atol=1e-12, rtol=0)
    else:
        h_ref = ref(x, h0)
        h = ours(x, h0)
        assert isinstance(h, torch.Tensor)
    torch.testing.assert_close(h, h_ref, atol=1e-12, rtol=0)
