"""The gate primitive and the base class every gated cell is built on.

Every cell is built from one primitive,

    gate = act(x A + h B + b),

an affine map of the step's input ``x`` and the previous output ``h``, squashed by an
activation. A :class:`GatedCell` owns the parameters of all its gates at once, stacked in
torch.nn's layout so weights are interchangeable with ``torch.nn.LSTM/GRU/RNN``::

    weight_ih  (G*H, I)    the A of every gate, gate k in rows k*H:(k+1)*H
    weight_hh  (G*H, H)    the B of every gate
    bias_ih    (G*H,)      the b of every gate (input side)
    bias_hh    (G*H,)      a second bias on the recurrent side, as torch.nn has

A subclass names its gates in weight order and says how they combine (``combine``); it
never touches weights or time. Everything else -- layers, lengths, both directions,
stacking, the fused fast path -- works for it unchanged. A minimal gated unit
(Zhou et al. 2016) in six lines::

    >>> import torch
    >>> from rnnkit.core.gates import GatedCell, HiddenState, gate
    >>> class MGUCell(GatedCell):
    ...     gate_names = ("f", "n")                      # forget gate, candidate
    ...     def combine(self, x, h, state):
    ...         f = gate(torch.sigmoid, x.f, h.f)
    ...         n = torch.tanh(x.n + f * h.n)             # f gates the recurrent part
    ...         h_new = (1 - f) * state.h + f * n
    ...         return h_new, HiddenState(h_new)
    >>> cell = MGUCell(input_size=3, hidden_size=5)
    >>> h, state = cell(torch.randn(2, 3))
    >>> tuple(h.shape)
    (2, 5)
"""

from __future__ import annotations

import math
from collections import namedtuple
from collections.abc import Callable
from typing import ClassVar, NamedTuple

import torch
from torch import Tensor, nn
from torch.nn import functional as F


class HiddenState(NamedTuple):
    """The state of a cell whose whole memory is its output ``h`` (RNN, GRU), (B, H)."""

    h: Tensor


def only_combine_customised(cell) -> bool:
    """True when ``cell`` changes nothing but ``combine`` (and its gate names and state): the
    projections, ``split`` and ``step`` are GatedCell's, and its only parameters are the stacked
    weights. Fast paths that run the weights themselves may take exactly these cells."""
    kind = type(cell)
    standard = ("step", "split", "project_input", "project_hidden")
    if not isinstance(cell, GatedCell) or any(getattr(kind, name) is not getattr(GatedCell, name) for name in standard):
        return False
    # cell._parameters and children() rather than named_parameters(): this runs on every layer call
    return cell._parameters.keys() <= WEIGHT_NAMES and not any(True for m in cell.children() for _ in m.parameters())


WEIGHT_NAMES = {"weight_ih", "weight_hh", "bias_ih", "bias_hh"}


def gate(act: Callable[[Tensor], Tensor], x_part: Tensor, h_part: Tensor) -> Tensor:
    """The gate primitive: ``act(x A + b + h B + b')`` given the two affine parts."""
    return act(x_part + h_part)


class GatedCell(nn.Module):
    """Base class: one step of a recurrent cell whose gates are affine in ``x`` and ``h``.

    Contract (every cell): ``h_t, state_t = cell(x_t, state_{t-1})`` with ``x_t`` of shape
    (B, I), ``h_t`` of shape (B, H) and ``state`` a NamedTuple (``State``) whose first field
    is ``h`` and whose every field is (B, H). ``state=None`` means zeros.

    A subclass sets ``gate_names`` (weight order) and, if its state has more than ``h``,
    ``State``; it implements ``combine(x, h, state)`` where ``x`` and ``h`` hold each gate's
    input part ``x A + b`` and recurrent part ``h B + b'`` as attributes named after the gates,
    each (B, H).
    """

    gate_names: ClassVar[tuple[str, ...]] = ()
    State: ClassVar[type] = HiddenState
    Gates: ClassVar[type]

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if cls.gate_names:
            cls.Gates = namedtuple(f"{cls.__name__}Gates", cls.gate_names)

    def __init__(self, input_size: int, hidden_size: int, bias: bool = True, device=None, dtype=None):
        super().__init__()
        if not self.gate_names:
            raise TypeError(f"{type(self).__name__} must name its gates in `gate_names`")
        for name, value in (("input_size", input_size), ("hidden_size", hidden_size)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        self.input_size = input_size
        self.hidden_size = hidden_size
        self.bias = bias
        rows = len(self.gate_names) * hidden_size
        factory = {"device": device, "dtype": dtype}
        self.weight_ih = nn.Parameter(torch.empty(rows, input_size, **factory))
        self.weight_hh = nn.Parameter(torch.empty(rows, hidden_size, **factory))
        if bias:
            self.bias_ih = nn.Parameter(torch.empty(rows, **factory))
            self.bias_hh = nn.Parameter(torch.empty(rows, **factory))
        else:
            self.register_parameter("bias_ih", None)
            self.register_parameter("bias_hh", None)
        self.reset_parameters()

    @property
    def num_gates(self) -> int:
        return len(self.gate_names)

    def reset_parameters(self) -> None:
        """torch.nn's initialisation: every weight and bias uniform in +-1/sqrt(H)."""
        bound = 1.0 / math.sqrt(self.hidden_size)
        for weight in self.parameters():
            nn.init.uniform_(weight, -bound, bound)

    def project_input(self, x: Tensor) -> Tensor:
        """``x A + b`` for every gate at once: (..., I) -> (..., G*H)."""
        return F.linear(x, self.weight_ih, self.bias_ih)

    def project_hidden(self, h: Tensor) -> Tensor:
        """``h B + b'`` for every gate at once: (B, H) -> (B, G*H)."""
        return F.linear(h, self.weight_hh, self.bias_hh)

    def split(self, z: Tensor):
        """(B, G*H) -> ``Gates`` of G tensors (B, H), one per gate name."""
        return self.Gates(*z.chunk(self.num_gates, dim=-1))

    def combine(self, x, h, state) -> tuple[Tensor, NamedTuple]:
        """Pointwise step: gate parts of this step -> ``(h_t, state_t)``."""
        raise NotImplementedError

    def step(self, xz: Tensor, state) -> tuple[Tensor, NamedTuple]:
        """One step from a precomputed input projection ``xz`` (B, G*H)."""
        return self.combine(self.split(xz), self.split(self.project_hidden(state.h)), state)

    def initial_state(self, batch_size: int, *, device=None, dtype=None) -> NamedTuple:
        """Zeros for every state field, each (B, H)."""
        device = device if device is not None else self.weight_ih.device
        dtype = dtype if dtype is not None else self.weight_ih.dtype
        zeros = [torch.zeros(batch_size, self.hidden_size, device=device, dtype=dtype) for _ in self.State._fields]
        return self.State(*zeros)

    def advance(self, x: Tensor, state=None) -> tuple[Tensor, NamedTuple]:
        """The cell contract: ``h_t, state_t = cell.advance(x_t, state_{t-1})``, ``x_t`` (B, I), every
        state field (B, H), ``state=None`` meaning zeros. A cell of your own is called so
        (``cell(x, state)`` is the same); the built-in cells' ``cell(x, hx)`` is torch.nn's."""
        if not isinstance(x, Tensor):
            raise TypeError(f"x must be a torch.Tensor of shape (B, {self.input_size}), got {type(x).__name__}")
        if x.dim() != 2 or x.shape[1] != self.input_size:
            raise ValueError(f"x must have shape (B, input_size={self.input_size}), got {tuple(x.shape)}")
        if state is None:
            state = self.initial_state(x.shape[0], device=x.device, dtype=x.dtype)
        elif isinstance(state, Tensor) and len(self.State._fields) == 1:
            state = self.State(state)
        elif isinstance(state, (tuple, list)) and len(state) == len(self.State._fields):
            state = self.State(*state)
        else:
            fields = self.State._fields
            want = "a tensor h" if len(fields) == 1 else f"a tuple ({', '.join(fields)})"
            raise TypeError(f"state must be {want} of shape (B, {self.hidden_size}) each, got {type(state).__name__}")
        for name, part in zip(self.State._fields, state):
            if not isinstance(part, Tensor) or tuple(part.shape) != (x.shape[0], self.hidden_size):
                got = tuple(part.shape) if isinstance(part, Tensor) else type(part).__name__
                raise ValueError(f"state.{name} must have shape (B={x.shape[0]}, H={self.hidden_size}), got {got}")
        return self.step(self.project_input(x), state)

    def forward(self, x: Tensor, state=None) -> tuple[Tensor, NamedTuple]:
        return self.advance(x, state)

    def _torch_call(self, input, hx, theirs: Callable):
        """torch.nn's cell call, ``hx' = cell(input, hx)``: ``input`` (B, I) or unbatched (I,), ``hx``
        the state's parts (a tensor for one field); returns the new state in the same form. A call
        torch.nn would refuse is handed to torch.nn's ``forward`` (``theirs``), so its errors are
        torch.nn's own."""
        fields = self.State._fields
        if not self._plain_torch_call(input, hx):
            return theirs(self, input, hx)
        batched = input.dim() == 2
        if not batched:
            input = input.unsqueeze(0)
            if hx is not None:
                hx = hx.unsqueeze(0) if len(fields) == 1 else tuple(p.unsqueeze(0) for p in hx)
        _, state = self.advance(input, hx)
        if not batched:
            state = self.State(*(p.squeeze(0) for p in state))
        return state[0] if len(fields) == 1 else state

    def _plain_torch_call(self, input, hx) -> bool:
        if not isinstance(input, Tensor) or input.dim() not in (1, 2) or input.shape[-1] != self.input_size:
            return False
        w = self._parameters["weight_ih"]
        if input.dtype != w.dtype or input.device != w.device or input.numel() == 0:
            return False
        if hx is None:
            return True
        parts = (hx,) if len(self.State._fields) == 1 else hx
        if isinstance(parts, Tensor) or not isinstance(parts, (tuple, list)) or len(parts) != len(self.State._fields):
            return False
        want = (*input.shape[:-1], self.hidden_size)
        return all(
            isinstance(p, Tensor) and tuple(p.shape) == want and p.dtype == input.dtype and p.device == input.device
            for p in parts
        )

    def extra_repr(self) -> str:
        return f"{self.input_size}, {self.hidden_size}, bias={self.bias}"
