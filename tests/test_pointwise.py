"""A user's ``combine`` compiled to the C++ ``pointwise`` programs (core/pointwise.py): what compiles,
what falls back, and the compiled layers held to the reference loop."""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F

import rnnkit
from rnnkit.core import native, pointwise
from rnnkit.core.gates import GatedCell, HiddenState
from rnnkit.core.kernels import compiled as compiled_module
from rnnkit.core.kernels import cpp_loops
from test_fused import _fused, _max_diff
from user_cells import MGUCell, UserGRUCell, UserLSTMCell

pytestmark = pytest.mark.skipif(native.ops() is None, reason="the C++ loops are not built here")


class SpellingCell(GatedCell):
    """Every op the programs know, in the spellings a user writes: methods, functions, numbers on
    either side, ``alpha``, comparisons both ways, ``where`` with a number, class and instance constants."""

    gate_names = ("a", "b")
    scale = 0.5  # a class constant

    def __init__(self, *args, offset: float = 1.0, **kwargs):
        super().__init__(*args, **kwargs)
        self.offset = offset  # an instance constant

    def combine(self, x, h, state):
        a = (x.a + h.a).sigmoid()
        b = F.relu(x.b) - torch.sub(h.b, state.h, alpha=2)
        w = torch.where(x.b < 0, b, 0.0)
        e = torch.exp(-w) / (2 + a)
        n = torch.tanh(e * self.scale).neg() + self.offset - a * state.h / 3
        n = torch.where(h.a >= x.a, n, 1.0 - n)
        return n, HiddenState(n)


class SinCell(GatedCell):
    gate_names = ("a",)

    def combine(self, x, h, state):
        n = torch.sin(x.a + h.a)  # no program op
        return n, HiddenState(n)


class BranchCell(GatedCell):
    gate_names = ("a",)

    def combine(self, x, h, state):
        n = x.a + h.a
        if (n > 0).all():  # a branch on values: refuses to trace
            n = n * 2
        return n, HiddenState(n)


class MeanCell(GatedCell):
    gate_names = ("a",)

    def combine(self, x, h, state):
        n = torch.tanh(x.a + h.a - x.a.mean(dim=1, keepdim=True))  # not elementwise
        return n, HiddenState(n)


class DropoutCell(GatedCell):
    gate_names = ("a",)

    def combine(self, x, h, state):
        n = F.dropout(torch.tanh(x.a + h.a), 0.5, self.training)  # random in training
        return n, HiddenState(n)


def _grads(layer, x, state, lengths, fused_on: bool):
    with _fused(fused_on):
        xi = x.clone().requires_grad_()
        si = tuple(s.clone().requires_grad_() for s in state)
        out, final = layer(xi, si if len(si) > 1 else si[0], lengths=lengths)
        parts = list(final) if isinstance(final, tuple) else [final]
        g = torch.Generator().manual_seed(1)
        loss = sum((t * torch.randn(t.shape, generator=g, dtype=t.dtype)).sum() for t in [out, *parts])
        return [out, *parts, *torch.autograd.grad(loss, [xi, *si, *layer.parameters()])]


@pytest.mark.parametrize(
    "cell,dtype,bidirectional,with_lengths",
    list(
        itertools.product(
            [SpellingCell, MGUCell, UserGRUCell, UserLSTMCell],
            [torch.float64, torch.float32],
            [False, True],
            [False, True],
        )
    ),
)
def test_compiled_layer_equals_the_reference(cell, dtype, bidirectional, with_lengths, monkeypatch):
    """Outputs, final states and every gradient through the compiled route against the Python
    reference loop; the route is asserted taken, in training and (``cpp-projecting``) inference."""
    B, T, I, H, L = 3, 6, 4, 37, 2  # H off the vector width
    layer = rnnkit.Recurrent(cell, I, H, num_layers=L, bidirectional=bidirectional, batch_first=True).to(dtype)
    D = 2 if bidirectional else 1
    x = torch.randn(B, T, I, dtype=dtype)
    state = tuple(torch.randn(L * D, B, H, dtype=dtype) for _ in layer.State._fields)
    lengths = torch.tensor([6, 2, 4]) if with_lengths else None
    calls = []
    loop = compiled_module.compiled_loop
    spy = lambda *a, **k: calls.append(a[-1]) or loop(*a, **k)
    monkeypatch.setattr(compiled_module, "compiled_loop", spy)
    monkeypatch.setattr(cpp_loops, "compiled_loop", spy)
    tol = 1e-10 if dtype == torch.float64 else 1e-5
    assert _max_diff(_grads(layer, x, state, lengths, True), _grads(layer, x, state, lengths, False)) < tol
    assert calls == [True] * (L * D)  # training: every (layer, direction) compiled
    with torch.no_grad():
        got = layer(x, state if len(state) > 1 else state[0], lengths=lengths)
        with _fused(False):
            want = layer(x, state if len(state) > 1 else state[0], lengths=lengths)
    assert calls[L * D :] == [False] * (L * D)  # inference: projecting per step, compiled
    assert _max_diff(torch.utils._pytree.tree_leaves(got), torch.utils._pytree.tree_leaves(want)) < tol


def test_user_gru_equals_torch_gru():
    """The user's GRU is torch's (its weights loaded), through the compiled route with 3-gate packing."""
    theirs = torch.nn.GRU(4, 37, batch_first=True).double()
    ours = rnnkit.Recurrent(UserGRUCell, 4, 37, batch_first=True).double()
    ours.load_state_dict(rnnkit.from_torch(theirs).state_dict())
    assert compiled_module.program_gates(ours.cells[0]) == 3 and pointwise.compiled(ours.cells[0]) is not None
    x = torch.randn(3, 6, 4, dtype=torch.float64)
    for grad in (True, False):
        with torch.set_grad_enabled(grad):
            torch.testing.assert_close(ours(x)[0], theirs(x)[0], atol=1e-12, rtol=0)


def test_program_gates():
    """Weights for ``pointwise_scan`` are packed for the cell's 3 or 4 gates, else for 1."""
    assert [compiled_module.program_gates(c(3, 5)) for c in (UserLSTMCell, UserGRUCell, MGUCell, SinCell)] == [
        4,
        3,
        1,
        1,
    ]


@pytest.mark.parametrize("cell", [SinCell, BranchCell, MeanCell])
def test_what_does_not_compile_runs_the_autograd_loop(cell):
    """An op the programs lack, a branch on values, a reduction: no program, and the layer still
    computes the reference's outputs and gradients (the generic autograd kernel)."""
    layer = rnnkit.Recurrent(cell, 3, 5, batch_first=True).double()
    assert pointwise.compiled(layer.cells[0]) is None
    x = torch.randn(2, 4, 3, dtype=torch.float64)
    state = (torch.randn(1, 2, 5, dtype=torch.float64),)
    assert _max_diff(_grads(layer, x, state, None, True), _grads(layer, x, state, None, False)) < 1e-10


@pytest.mark.parametrize("cell", [SinCell, BranchCell])
def test_stepping_a_cell_that_does_not_compile_runs_its_combine(cell):
    """A batch stepped with a carried state: where no program compiles, the lean path's C++ loop
    declines and the cell's ``combine`` runs as written, on the same projections."""
    layer = rnnkit.Recurrent(cell, 3, 5, batch_first=True).double().eval()
    c = layer.cells[0]
    x, h = torch.randn(4, 1, 3, dtype=torch.float64), torch.randn(1, 4, 5, dtype=torch.float64)
    with torch.inference_mode():
        out, state = layer(x, h)
    want, _ = c.combine(c.split(c.project_input(x[:, 0])), c.split(c.project_hidden(h[0])), HiddenState(h[0]))
    torch.testing.assert_close(out[:, 0], want, atol=1e-12, rtol=0)
    torch.testing.assert_close(state[0], want, atol=1e-12, rtol=0)


def test_dropout_compiles_only_where_it_is_off():
    """``self.training`` is part of the cache key: in eval the dropout is the identity and compiles;
    in training it is random and does not."""
    cell = DropoutCell(3, 5)
    assert pointwise.compiled(cell.eval()) is not None
    assert pointwise.compiled(cell.train()) is None


def test_a_changed_constant_is_traced_again():
    """A plain attribute ``combine`` reads is part of the key: changing it changes the result."""
    layer = rnnkit.Recurrent(SpellingCell, 3, 5, offset=1.0, batch_first=True).double()
    x = torch.randn(2, 4, 3, dtype=torch.float64)
    with torch.no_grad():
        before = layer(x)[0]
        layer.cells[0].offset = 2.0
        after = layer(x)[0]
        with _fused(False):
            want = layer(x)[0]
    assert (before - after).abs().max() > 1e-3
    assert torch.allclose(after, want, atol=1e-12)


def test_compiles_under_no_grad_and_inference_mode():
    """The first call may come in inference: the check against autograd still runs (a cell first
    seen under ``no_grad`` once compiled to nothing, for good)."""

    class Fresh(MGUCell):  # a class no other test compiled
        pass

    for mode in (torch.no_grad, torch.inference_mode):
        pointwise._cache.clear()
        with mode():
            assert pointwise.compiled(Fresh(2, 3)) is not None


def test_the_derivative_of_each_op():
    """Each op's derivative in ``derive`` against autograd, one program per op (float64)."""
    B, H = 3, 19
    unary = {"neg": torch.neg, "sigmoid": torch.sigmoid, "tanh": torch.tanh, "relu": torch.relu, "exp": torch.exp}
    binary = {"add": torch.add, "sub": torch.sub, "mul": torch.mul, "div": torch.div}
    for name, fn in [*unary.items(), *binary.items(), ("where", None)]:
        g = pointwise.Graph()
        args = [g.input(k) for k in range(3 if name == "where" else (2 if name in binary else 1))]
        if name == "where":
            out = g.node("where", g.node("gt", args[0], g.const(0)), args[1], args[2])
            fn = lambda c, a, b: torch.where(c > 0, a, b)
        else:
            out = g.node(name, *args)
        seed = g.input(len(args))
        grads = pointwise.derive(g, [out], [seed])
        zero = g.const(0)
        n = len(args)
        forward = pointwise.emit(g, args, [(k, 0) for k in range(n)], [out], [(0, 0)])
        backward = pointwise.emit(
            g,
            [*args, seed],
            [(k, 0) for k in range(n + 1)],
            [grads.get(a, zero) for a in args],
            [(k, 0) for k in range(n)],
        )
        values = [torch.randn(B, H, dtype=torch.float64) + (3 if name == "div" and k == 1 else 0) for k in range(n)]
        d_out = torch.randn(B, H, dtype=torch.float64)
        leaves = [v.clone().requires_grad_() for v in values]
        want = fn(*leaves)
        want_grads = torch.autograd.grad(want, leaves, d_out, allow_unused=True)
        got = torch.empty(B, H, dtype=torch.float64)
        native.ops().pointwise(*forward, values, [got], H)
        got_grads = [torch.empty(B, H, dtype=torch.float64) for _ in range(n)]
        native.ops().pointwise(*backward, [*values, d_out], got_grads, H)
        assert torch.allclose(got, want, rtol=1e-12, atol=1e-14), name
        for k, (a, b) in enumerate(zip(got_grads, want_grads)):
            b = torch.zeros_like(a) if b is None else b
            assert torch.allclose(a, b, rtol=1e-12, atol=1e-14), (name, k)


def _program(*instructions, n_in=1, n_const=0, consts=(), outputs=((1, 0, 0),), n_regs=2):
    flat = [n_regs, n_in, n_const, len(outputs), len(instructions)] + [0, 0] * n_in
    flat += [x for o in outputs for x in o] + [x for i in instructions for x in i]
    return torch.tensor(flat, dtype=torch.int64), torch.tensor(consts, dtype=torch.float64)


def test_pointwise_refuses_a_bad_program_or_operand():
    ops = native.ops()
    x, y = torch.randn(4, 8), torch.empty(4, 8)
    code, consts = _program((5, 1, 0, 0, 0))  # y = sigmoid(x)
    ops.pointwise(code, consts, [x], [y], 8)
    assert torch.allclose(y, torch.sigmoid(x), atol=1e-6)
    cases = {
        "shorter than its header": (torch.tensor([1, 1], dtype=torch.int64), consts, [x], [y], 8),
        "disagrees with its length": (code[:-1], consts, [x], [y], 8),
        "out of range": (_program((5, 0, 0, 0, 0))[0], consts, [x], [y], 8),  # writes an input
        "op or register": (_program((99, 1, 0, 0, 0))[0], consts, [x], [y], 8),
        "narrower": (code, consts, [x], [y], 16),
        "not passed": (torch.cat([code[:5], torch.tensor([1]), code[6:]]), consts, [x], [y], 8),  # input 1 of 1
        "one floating dtype": (code, consts, [x.double()], [y], 8),
        "int64 vector": (code.int(), consts, [x], [y], 8),
        "reads no register": (_program((5, 1, 0, 0, 0), outputs=((7, 0, 0),))[0], consts, [x], [y], 8),
    }
    for message, args in cases.items():
        with pytest.raises(RuntimeError, match=message):
            ops.pointwise(*args)


def test_compiled_without_bias_and_with_one_hidden_unit():
    """No biases (the matmuls take None) and H = 1 (the mask is then an ordinary column)."""
    for H, bias in ((5, False), (1, True)):
        layer = rnnkit.Recurrent(UserLSTMCell, 3, H, bias=bias, batch_first=True).double()
        assert pointwise.compiled(layer.cells[0]) is not None
        x = torch.randn(2, 4, 3, dtype=torch.float64)
        state = tuple(torch.randn(1, 2, H, dtype=torch.float64) for _ in range(2))
        lengths = torch.tensor([4, 2])
        assert _max_diff(_grads(layer, x, state, lengths, True), _grads(layer, x, state, lengths, False)) < 1e-10


def test_the_scan_ops_refuse_buffers_that_disagree():
    """``pointwise_scan`` and its backward check every buffer against the others before their thread
    team starts (where an exception could not be caught)."""
    ops = native.ops()
    cell = UserLSTMCell(3, 5)
    program = pointwise.compiled(cell)
    B, T, H = 2, 4, 5
    xz, hs = torch.randn(B, T, 4 * H), [torch.zeros(T + 1, B, H) for _ in range(2)]
    out, hz, packed = torch.empty(B, T, H), torch.empty(T, B, 4 * H), ops.pack_linear(cell.weight_hh.detach())
    ops.pointwise_scan(*program.forward[0], xz, None, None, packed, None, 4 * H, hs, out, hz, None)  # accepted
    forward = {
        "disagree on G\\*H": dict(width=4 * H + 1),
        "T \\+ 1 or 2 state rows": dict(hs=[torch.zeros(3, B, H) for _ in range(2)]),
        "hz_all \\(T, B, G\\*H\\)": dict(hz=torch.empty(T - 1, B, 4 * H)),
        "names a tensor that was not passed": dict(hs=hs[:1]),  # the program reads two state fields
    }
    for message, change in forward.items():
        args = dict(width=4 * H, hs=hs, hz=hz) | change
        with pytest.raises(RuntimeError, match=message):
            ops.pointwise_scan(
                *program.forward[0], xz, None, None, packed, None, args["width"], args["hs"], out, args["hz"], None
            )
    x, w_ih = torch.randn(B, T, 3), cell.weight_ih.detach()
    for gates_ih, gates_hh in ((4, 4), (1, 1)):  # packed for the 4 gates or for 1: accepted
        ops.pointwise_scan(
            *program.forward[0],
            x,
            ops.pack_linear(w_ih, gates_ih),
            None,
            ops.pack_linear(cell.weight_hh.detach(), gates_hh),
            None,
            4 * H,
            hs,
            out,
            hz,
            None,
        )
    with pytest.raises(RuntimeError, match="disagree on G\\*H"):  # W_ih and W_hh packed for different gates
        ops.pointwise_scan(
            *program.forward[0],
            x,
            ops.pack_linear(w_ih, 1),
            None,
            ops.pack_linear(cell.weight_hh.detach(), 4),
            None,
            4 * H,
            hs,
            out,
            hz,
            None,
        )
    with pytest.raises(RuntimeError, match="1, 3 or 4 gates that divide"):  # 4 gates do not divide G*H = 18
        ops.pointwise_scan(
            *program.forward[0], x, None, None, ops.pack_linear(torch.randn(16, 5), 4), None, 18, hs, out, hz, None
        )
    packed_t = ops.pack_linear(cell.weight_hh.detach().t())
    d, dxz, dhz = [torch.zeros(B, H) for _ in range(2)], torch.empty_like(xz), torch.empty_like(hz)
    ops.pointwise_scan_backward(*program.backward[0], xz, hz, hs, None, None, packed_t, d, dxz, dhz)  # accepted
    with pytest.raises(RuntimeError, match="one gradient per state"):
        ops.pointwise_scan_backward(*program.backward[0], xz, hz, hs, None, None, packed_t, d[:1], dxz, dhz)
    with pytest.raises(RuntimeError, match="disagree"):
        ops.pointwise_scan_backward(*program.backward[0], xz, hz, hs, None, None, packed, d, dxz, dhz)


def test_d_hz_is_d_xz_only_where_every_gate_sees_x_plus_h():
    """The LSTM written from gates takes each gate as act(x + h): its d hz is its d xz, not written
    twice. The MGU's candidate takes x.n + f * h.n: there the two differ, and the backward must get a
    dhz buffer."""
    assert pointwise.compiled(UserLSTMCell(3, 5)).shared == (True, True)
    mgu = MGUCell(3, 5)
    program = pointwise.compiled(mgu)
    assert program.shared == (False, False)
    ops, B, T, H = native.ops(), 2, 3, 5
    xz, hz, hs = torch.randn(B, T, 2 * H), torch.randn(T, B, 2 * H), [torch.randn(T + 1, B, H)]
    with pytest.raises(RuntimeError, match="no dhz was passed"):
        ops.pointwise_scan_backward(
            *program.backward[0],
            xz,
            hz,
            hs,
            None,
            None,
            ops.pack_linear(mgu.weight_hh.detach().t()),
            [torch.zeros(B, H)],
            torch.empty_like(xz),
            None,
        )


class ActivationCell(GatedCell):
    """``combine`` reads an activation from a child module and a config object (the review's cases)."""

    gate_names = ("a",)

    def __init__(self, *args, act=None, config=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.act, self.config = act, config

    def combine(self, x, h, state):
        n = self.act(x.a + h.a) * self.config["scale"][0]
        return n, HiddenState(n)


def test_cells_differing_in_any_attribute_get_their_own_programs():
    """A child module, a function, a list in a dict: two cells of one class that differ there must
    not share a program (before, only numbers and strings were in the key)."""
    x = torch.randn(2, 4, 3, dtype=torch.float64)
    variants = [
        dict(act=torch.nn.Tanh(), config={"scale": [1.0]}),
        dict(act=torch.nn.ReLU(), config={"scale": [1.0]}),
        dict(act=torch.sigmoid, config={"scale": [1.0]}),
        dict(act=torch.sigmoid, config={"scale": [3.0]}),
    ]
    for kwargs in variants:
        layer = rnnkit.Recurrent(ActivationCell, 3, 4, **kwargs, batch_first=True).double()
        assert pointwise.compiled(layer.cells[0]) is not None
        with torch.no_grad():
            got = layer(x)[0]
            with _fused(False):
                want = layer(x)[0]
        assert torch.allclose(got, want, atol=1e-12), kwargs


def test_an_attribute_without_equality_keeps_the_autograd_loop():
    """An unhashable object that is no list, dict, module or dataclass cannot be compared with its
    value at the trace: no program."""

    class Box:  # unhashable, mutable
        __hash__ = None

    cell = ActivationCell(3, 4, act=torch.tanh, config={"scale": [1.0]})
    cell.box = Box()
    assert pointwise.compiled(cell) is None


def test_too_many_gates_for_the_scan_keep_the_autograd_loop():
    class ManyGates(GatedCell):
        gate_names = tuple(f"g{k}" for k in range(32))

        def combine(self, x, h, state):
            n = torch.tanh(sum(a + b for a, b in zip(x, h)))
            return n, HiddenState(n)

    layer = rnnkit.Recurrent(ManyGates, 3, 2, batch_first=True).double()
    assert pointwise.compiled(layer.cells[0]) is None
    x = torch.randn(2, 3, 3, dtype=torch.float64)
    state = (torch.randn(1, 2, 2, dtype=torch.float64),)
    assert _max_diff(_grads(layer, x, state, None, True), _grads(layer, x, state, None, False)) < 1e-10
