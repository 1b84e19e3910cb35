"""A user's ``combine`` compiled to one C++ pass per step, with its derivative.

A cell that customises only ``combine`` (the GatedCell contract) is elementwise at every step: each
output is a function of the gates' parts and the state at the same (row, column). Run as torch ops,
``combine`` is a dozen single-threaded passes over (B, H) per step and as many autograd nodes back.
Here it is traced once (``make_fx`` with fake tensors, so a branch on a value refuses to trace),
turned into a small program of registers and derived symbolically for the backward; native.cpp runs
the loops over time (``pointwise_scan`` and its backward), a program in one threaded pass per step.

What compiles: ``+ - * /`` (tensors or numbers), ``neg``, ``sigmoid``, ``tanh``, ``relu``, ``exp``,
comparisons and ``where``, in whatever spelling reaches those aten ops (``torch.sigmoid``,
``x.sigmoid()``, ``F.relu``, ``1 - z``...). Anything else, a value-dependent branch, a shape other
than (B, H), randomness (dropout), or more than about 30 gates leaves the cell on the autograd loop,
which computes the same.
Every compiled cell is checked once against its own ``combine`` (forward and gradients, float64, on
random values) before it is used; a mismatch also means the autograd loop.

The programs are cached per cell class and the values of the attributes of the cell (its child
modules' included) and of its classes, which a ``combine`` may read as constants (a forget bias, an
activation function, a config object): change one and it is traced again, so a value changed at
every step (an annealed temperature) re-traces at every step (about 10 ms). Not seen: module
globals that ``combine`` reads, and a branch on a tensor's shape (the trace runs at one shape).
"""

from __future__ import annotations

import dataclasses
import math
import threading
import types
from collections import OrderedDict
from typing import NamedTuple

import torch
from torch import Tensor, nn

from rnnkit.core import native
from rnnkit.core.gates import GatedCell

# op name -> native.cpp's PwOp code and arity
OPS = {
    "add": (0, 2),
    "sub": (1, 2),
    "mul": (2, 2),
    "div": (3, 2),
    "neg": (4, 1),
    "sigmoid": (5, 1),
    "tanh": (6, 1),
    "relu": (7, 1),
    "exp": (8, 1),
    "where": (9, 3),
    "gt": (10, 2),
    "ge": (11, 2),
}
TRACE_SHAPE = (3, 5)  # rows and columns differ, so a reduction or a transpose shows in the shapes
MAX_OPERANDS = 64  # native.cpp's PW_MAX_OPERANDS: a scan's inputs (or outputs) at most


class Unsupported(Exception):
    """``combine`` does something the programs cannot express."""


class Graph:
    """Values of one step, in creation order (so any order of ids is topological), shared between
    equal expressions. A node is ``(op, *args)``: ``("in", slot)``, ``("const", value)`` or an op of
    ``OPS`` over earlier node ids."""

    def __init__(self):
        self.nodes: list[tuple] = []
        self._ids: dict[tuple, int] = {}

    def node(self, op: str, *args) -> int:
        key = (op, *args)
        if key not in self._ids:
            self._ids[key] = len(self.nodes)
            self.nodes.append(key)
        return self._ids[key]

    def copy(self) -> Graph:
        other = Graph()
        other.nodes, other._ids = list(self.nodes), dict(self._ids)
        return other

    def const(self, value) -> int:
        return self.node("const", float(value))

    def input(self, slot: int) -> int:
        return self.node("in", slot)


# -- tracing: combine -> Graph -----------------------------------------------------------------

_A = torch.ops.aten


def _operand(graph: Graph, env: dict, arg) -> int:
    if isinstance(arg, torch.fx.Node):
        return env[arg]
    if isinstance(arg, (bool, int, float)):
        return graph.const(arg)
    raise Unsupported(f"operand {arg!r}")


def _scaled(graph: Graph, value: int, alpha) -> int:
    return value if alpha == 1 else graph.node("mul", value, graph.const(alpha))


def _convert(graph: Graph, env: dict, node: torch.fx.Node) -> int:
    """One aten call of the trace as graph nodes."""
    target, kwargs = node.target, dict(node.kwargs)
    args = [_operand(graph, env, a) for a in node.args] if target is not _A.scalar_tensor.default else []
    alpha = kwargs.pop("alpha", 1)
    if target in (_A.add.Tensor, _A.add.Scalar):
        result = graph.node("add", args[0], _scaled(graph, args[1], alpha))
    elif target in (_A.sub.Tensor, _A.sub.Scalar):
        result = graph.node("sub", args[0], _scaled(graph, args[1], alpha))
    elif target in (_A.rsub.Tensor, _A.rsub.Scalar):
        result = graph.node("sub", args[1], _scaled(graph, args[0], alpha))
    elif target in (_A.mul.Tensor, _A.mul.Scalar):
        result = graph.node("mul", *args)
    elif target in (_A.div.Tensor, _A.div.Scalar) and kwargs.pop("rounding_mode", None) is None:
        result = graph.node("div", *args)
    elif target in (_A.gt.Tensor, _A.gt.Scalar, _A.ge.Tensor, _A.ge.Scalar):
        result = graph.node(target.overloadpacket.__name__, *args)
    elif target in (_A.lt.Tensor, _A.lt.Scalar, _A.le.Tensor, _A.le.Scalar):  # a < b is b > a
        result = graph.node("gt" if target.overloadpacket is _A.lt else "ge", args[1], args[0])
    elif target is _A.where.self:
        result = graph.node("where", *args)
    elif target in (_A.neg.default, _A.sigmoid.default, _A.tanh.default, _A.relu.default, _A.exp.default):
        result = graph.node(target.overloadpacket.__name__, *args)
    elif target in (_A.clone.default, _A.alias.default, _A.detach.default):
        result = args[0]
    elif target is _A.scalar_tensor.default:
        result = graph.const(node.args[0])
        kwargs.clear()  # dtype, device, layout: a number either way
    else:
        raise Unsupported(f"{target}")
    if kwargs and any(v is not None for v in kwargs.values()):
        raise Unsupported(f"{target} with {kwargs}")
    return result


def trace(cell) -> tuple[Graph, list[int]]:
    """``cell.combine`` as a Graph: inputs x gates (G), h gates (G), state fields (S), in that slot
    order; returns the graph and the ids of its outputs (h, then the new state's fields)."""
    from torch.fx.experimental.proxy_tensor import make_fx

    G, S = cell.num_gates, len(cell.State._fields)

    def flat(*parts):
        h, state = cell.combine(cell.Gates(*parts[:G]), cell.Gates(*parts[G : 2 * G]), cell.State(*parts[2 * G :]))
        if not isinstance(state, tuple) or len(state) != S:
            raise Unsupported("combine's state is not the cell's State")
        return (h, *state)

    try:
        traced = make_fx(flat, tracing_mode="fake")(*(torch.zeros(TRACE_SHAPE) for _ in range(2 * G + S)))
    except Unsupported:
        raise
    except Exception as exc:
        raise Unsupported(f"tracing failed: {type(exc).__name__}") from exc
    graph, env, slot = Graph(), {}, 0
    for node in traced.graph.nodes:
        if node.op == "placeholder":
            env[node] = graph.input(slot)
            slot += 1
        elif node.op == "call_function":
            value = node.meta.get("val")
            scalar = node.target is _A.scalar_tensor.default
            if (
                not isinstance(value, Tensor)
                or (tuple(value.shape) != (() if scalar else TRACE_SHAPE))
                or (value.dtype not in (torch.float32, torch.bool))
            ):
                raise Unsupported(f"{node.target} gives {getattr(value, 'shape', value)}")
            env[node] = _convert(graph, env, node)
        elif node.op == "output":
            outputs = [_operand(graph, env, o) for o in node.args[0]]
        else:
            raise Unsupported(node.op)
    return graph, outputs


# -- the derivative ----------------------------------------------------------------------------


def derive(graph: Graph, outputs: list[int], seeds: list[int]) -> dict[int, int]:
    """Reverse mode over ``graph``: node id -> the id of d(sum seeds * outputs)/d node, for every node
    a seed reaches. New nodes are appended; only those created before this call are walked."""
    grads: dict[int, int] = {}
    zero, one = graph.const(0), graph.const(1)

    def add(node: int, grad: int):
        grads[node] = grad if node not in grads else graph.node("add", grads[node], grad)

    for out, seed in zip(outputs, seeds):
        add(out, seed)
    n = graph.node
    for v in range(len(graph.nodes) - 1, -1, -1):
        if v not in grads:
            continue
        op, *a = graph.nodes[v]
        d = grads[v]
        if op == "add":
            add(a[0], d), add(a[1], d)
        elif op == "sub":
            add(a[0], d), add(a[1], n("neg", d))
        elif op == "mul":
            add(a[0], n("mul", d, a[1])), add(a[1], n("mul", d, a[0]))
        elif op == "div":  # d(a/b)/db = -(a/b)/b
            quotient = n("div", d, a[1])
            add(a[0], quotient), add(a[1], n("neg", n("mul", quotient, v)))
        elif op == "neg":
            add(a[0], n("neg", d))
        elif op == "sigmoid":
            add(a[0], n("mul", d, n("mul", v, n("sub", one, v))))
        elif op == "tanh":
            add(a[0], n("mul", d, n("sub", one, n("mul", v, v))))
        elif op == "relu":
            add(a[0], n("where", n("gt", v, zero), d, zero))
        elif op == "exp":
            add(a[0], n("mul", d, v))
        elif op == "where":  # the branch not taken gets an exact zero, NaN or not (as torch)
            add(a[1], n("where", a[0], d, zero)), add(a[2], n("where", a[0], zero, d))
        # in, const, gt, ge: nothing to pass on
    return grads


# -- registers and code ------------------------------------------------------------------------


class Program(NamedTuple):
    code: Tensor  # int64, native.cpp's layout
    consts: Tensor  # float64


def emit(
    graph: Graph, inputs: list[int], in_map: list[tuple[int, int]], outputs: list[int], out_map: list[tuple[int, int]]
) -> Program:
    """Allocate registers (inputs, constants, then temporaries reused after their last read) and
    write the program. ``in_map``/``out_map``: (tensor index, column block) per slot."""
    live, stack = set(), list(outputs)
    while stack:
        v = stack.pop()
        if v not in live:
            live.add(v)
            if graph.nodes[v][0] not in ("in", "const"):
                stack.extend(graph.nodes[v][1:])
    reg = {v: k for k, v in enumerate(inputs)}
    consts = [v for v in sorted(live) if graph.nodes[v][0] == "const"]
    reg.update({v: len(inputs) + k for k, v in enumerate(consts)})
    order = [v for v in sorted(live) if graph.nodes[v][0] not in ("in", "const")]
    last: dict[int, float] = {a: i for i, v in enumerate(order) for a in graph.nodes[v][1:]}
    last.update(dict.fromkeys(outputs, math.inf))
    free, n_regs, code = [], len(inputs) + len(consts), []
    for i, v in enumerate(order):
        op, *args = graph.nodes[v]
        free += [reg[a] for a in set(args) if last[a] == i and graph.nodes[a][0] not in ("in", "const")]
        if free:  # an elementwise op may write the register it reads
            reg[v] = free.pop()
        else:
            reg[v], n_regs = n_regs, n_regs + 1
        operands = [reg[a] for a in args] + [0] * (3 - len(args))
        code.append((OPS[op][0], reg[v], *operands))
    header = [n_regs, len(inputs), len(consts), len(outputs), len(code)]
    flat = header + [x for pair in in_map for x in pair]
    flat += [x for o, (t, b) in zip(outputs, out_map) for x in (reg[o], t, b)]
    flat += [x for instr in code for x in instr]
    return Program(
        torch.tensor(flat, dtype=torch.int64), torch.tensor([graph.nodes[v][1] for v in consts], dtype=torch.float64)
    )


# -- the compiled cell -------------------------------------------------------------------------


class Compiled(NamedTuple):
    """A cell's step programs, indexed by whether a mask is passed.

    forward:  inputs (xz_t (B, G*H), hz_t (B, G*H), *state (B, H)[, m_t (B, 1)]),
              outputs (out_t (B, H), *new_state (B, H)); a masked row keeps its state, outputs 0.
    backward: inputs (xz_t, hz_t, *state[, m_t], d out_t, *d new_state),
              outputs (d xz_t, d hz_t, *d state): d state without the path through hz_t's matmul;
              where ``shared``, d hz_t is d xz_t and the program leaves it out.
    """

    forward: tuple[Program, Program]
    backward: tuple[Program, Program]
    shared: tuple[bool, bool]  # d hz_t = d xz_t (every gate sees x and h only as x + h): not written


def _build(graph: Graph, outs: list[int], G: int, S: int, masked: bool) -> tuple[Program, Program, bool]:
    state_in = [graph.input(2 * G + s) for s in range(S)]
    if masked:
        m = graph.input(2 * G + S)
        outs = [graph.node("mul", outs[0], m)] + [
            graph.node("where", m, new, old) for new, old in zip(outs[1:], state_in)
        ]
    n_fwd = 2 * G + S + masked
    fwd_inputs = [graph.input(k) for k in range(n_fwd)]
    in_map = [(0, k) for k in range(G)] + [(1, k) for k in range(G)] + [(2 + s, 0) for s in range(S)]
    in_map += [(2 + S, 0)] * masked
    forward = emit(graph, fwd_inputs, in_map, outs, [(0, 0)] + [(1 + s, 0) for s in range(S)])
    seeds = [graph.input(n_fwd + k) for k in range(1 + S)]
    grads = derive(graph, outs, seeds)
    zero = graph.const(0)
    wanted = [grads.get(v, zero) for v in fwd_inputs[: 2 * G + S]]
    bwd_map = in_map + [(2 + S + masked + k, 0) for k in range(1 + S)]  # after xz, hz, the state[, m]
    shared = wanted[:G] == wanted[G : 2 * G]
    out_map = [(0, k) for k in range(G)] + [(1, k) for k in range(G)] * (not shared) + [(2 + s, 0) for s in range(S)]
    written = wanted[:G] + wanted[2 * G :] if shared else wanted
    backward = emit(graph, fwd_inputs + seeds, bwd_map, written, out_map)
    return forward, backward, shared


def compile_cell(cell) -> Compiled | None:
    """``cell``'s programs, or ``None`` where ``combine`` does not compile or fails its check.
    Whatever the caller's mode (no_grad, inference_mode, autocast), the check needs autograd."""
    with torch.inference_mode(False), torch.enable_grad(), torch.autocast("cpu", enabled=False):
        try:
            graph, outs = trace(cell)
        except Unsupported:
            return None
        G, S = cell.num_gates, len(cell.State._fields)
        if 2 * G + 2 * S + 2 > MAX_OPERANDS:  # the backward's inputs: xz, hz parts, state, mask, d out, d state
            return None
        built = [_build(graph.copy(), outs, G, S, masked) for masked in (False, True)]
        compiled = Compiled(*zip(*built))
        return compiled if _agrees(cell, compiled) else None


def _agrees(cell, compiled: Compiled) -> bool:
    """Both variants' programs against ``combine`` and autograd on random float64 values (the
    masked one with a masked row); where ``shared``, also as the C++ loops run them folded, with
    the parts (0, xz + hz)."""
    G, S = cell.num_gates, len(cell.State._fields)
    gen = torch.Generator().manual_seed(0)
    B, H = 4, 37  # a partial vector
    xz, hz = (torch.randn(B, G * H, dtype=torch.float64, generator=gen) * 2 for _ in range(2))
    state = [torch.randn(B, H, dtype=torch.float64, generator=gen) for _ in range(S)]
    m = torch.tensor([[1.0], [0.0], [1.0], [1.0]], dtype=torch.float64)
    grads = [torch.randn(B, H, dtype=torch.float64, generator=gen) for _ in range(1 + S)]
    close = lambda a, b: torch.allclose(a, b.detach(), rtol=1e-9, atol=1e-12, equal_nan=True)
    ops = native.ops()
    for masked in (False, True):
        extra = [m] if masked else []
        parts = [(xz, hz)] + [(torch.zeros_like(xz), xz + hz)] * compiled.shared[masked]
        try:
            leaves = [t.clone().requires_grad_() for t in (xz, hz, *state)]
            h, new = cell.combine(cell.split(leaves[0]), cell.split(leaves[1]), cell.State(*leaves[2:]))
            want = [h, *new] if not masked else [h * m] + [torch.where(m.bool(), n, o) for n, o in zip(new, leaves[2:])]
            reference = torch.autograd.grad(want, leaves, grads, allow_unused=True)
            want_grads = [torch.zeros_like(t) if g is None else g for g, t in zip(reference, leaves)]
            for x_part, h_part in parts:
                got = [torch.empty(B, H, dtype=torch.float64) for _ in range(1 + S)]
                ops.pointwise(*compiled.forward[masked], [x_part, h_part, *state, *extra], got, H)
                got_grads = [torch.empty_like(t) for t in (xz, hz, *state)]
                ops.pointwise(*compiled.backward[masked], [x_part, h_part, *state, *extra, *grads], got_grads, H)
                if compiled.shared[masked]:  # not written: d hz is d xz
                    got_grads[1] = got_grads[0]
                if not (all(map(close, got, want)) and all(map(close, got_grads, want_grads))):
                    return False
        except Exception:
            return False
    return True


# -- the cache -----------------------------------------------------------------------------------

CACHE_SIZE = 64  # programs kept, the least recently used dropped first
_cache: OrderedDict = OrderedDict()
_lock = threading.Lock()
_MODULE_STATE = frozenset(vars(nn.Module())) - {"training"}  # nn.Module's own bookkeeping


class _Unkeyable(Exception):
    """An attribute whose value cannot be compared with a later one (a mutable object)."""


_PLAIN = frozenset({bool, int, float, str, type(None)})
_AS_IS = frozenset({type, types.FunctionType, types.BuiltinFunctionType, types.MethodType})  # hashed by identity


def _value_key(value):
    """What a traced ``combine`` may have baked in from ``value``, as a hashable key."""
    kind = type(value)  # the exact types first: this runs on every call of a layer (about 30 values a cell)
    if kind in _PLAIN:
        return value
    if kind in _AS_IS:
        return kind, value
    if isinstance(value, (bool, int, float, str, type(None))):
        return value
    if isinstance(value, (tuple, list)):
        return type(value).__name__, tuple(map(_value_key, value))
    if isinstance(value, dict):
        return "dict", tuple((k if type(k) is str else _value_key(k), _value_key(v)) for k, v in value.items())
    if isinstance(value, nn.Module):
        return type(value), _attributes_key(value)
    if isinstance(value, Tensor):  # a tensor that combine reads does not trace: only its identity matters
        return "tensor", id(value)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return type(value), tuple((f.name, _value_key(getattr(value, f.name))) for f in dataclasses.fields(value))
    try:
        hash(value)
    except TypeError:
        raise _Unkeyable(type(value).__name__) from None
    return type(value), value  # functions, classes, enums, frozen objects: by their own equality


def _attributes_key(module: nn.Module):
    own = sorted((k, v) for k, v in vars(module).items() if k not in _MODULE_STATE)
    return (
        tuple((k, _value_key(v)) for k, v in own),
        tuple((k, _value_key(child)) for k, child in module._modules.items()),
    )


def _key(cell):
    """The cell's class and every value ``combine`` could have read as a constant: the attributes of
    the cell (child modules included, recursively) and of its own classes (below GatedCell)."""
    classes = [k for k in type(cell).__mro__ if issubclass(k, GatedCell) and k is not GatedCell]
    return type(cell), _attributes_key(cell), tuple(_value_key(dict(vars(k))) for k in classes)


def compiled(cell) -> Compiled | None:
    """The cached ``compile_cell(cell)``; ``None`` also where the C++ loops are not built or an
    attribute of the cell cannot be compared with its value at the trace (a list, say, works; an
    object with no equality of its own and unhashable does not)."""
    if native.ops() is None:
        return None
    try:
        key = _key(cell)
    except _Unkeyable:
        return None
    with _lock:
        if key in _cache:
            _cache.move_to_end(key)
            return _cache[key]
    programs = compile_cell(cell)
    with _lock:
        _cache[key] = programs
        while len(_cache) > CACHE_SIZE:
            _cache.popitem(last=False)
    return programs
