"""Recurrent layers: a cell run over whole sequences, stacked and in both directions.

``Recurrent(cell, ...)`` runs any :class:`~rnnkit.core.gates.GatedCell` subclass; ``LSTM``,
``GRU`` and ``RNN`` are it with the built-in cells and torch.nn's constructor arguments.
Layers know nothing about gates: a call runs the route the routing table chooses
(core/routing.py; ``rnnkit.explain(layer, x)`` names it), every route the same function.

Call: ``output, state = layer(x, state=None, lengths=None)``

- ``x``: (B, T, I) (batch_first, the default) or (T, B, I) with ``batch_first=False``;
- ``output``: (B, T, D*H), D = 2 if bidirectional (forward and backward halves concatenated);
- ``state``: torch.nn's layout, ``h`` (num_layers*D, B, H), for LSTM ``LSTMState(h, c)``;
  row ``layer*D + direction`` belongs to that layer and direction;
- ``lengths`` (B,), a tensor on any device or a list of ints in ``[1, T]``: sequence b uses
  only its first ``lengths[b]`` steps. Outputs at padded steps are zero; the returned state is
  each sequence's state after its own last valid step; the backward direction starts at each
  sequence's own last valid step. These are torch's packed-sequence semantics.

Dropout (probability ``dropout``) is applied to the outputs of every layer but the last,
in training mode only, as torch.nn does.

>>> import torch, rnnkit
>>> lstm = rnnkit.LSTM(input_size=8, hidden_size=16, num_layers=2, bidirectional=True)
>>> out, (h, c) = lstm(torch.randn(3, 5, 8), lengths=[5, 2, 4])
>>> tuple(out.shape), tuple(h.shape)
((3, 5, 32), (4, 3, 16))
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import NamedTuple

import torch
from torch import Tensor, nn

from rnnkit.core.cells import GRUCell, LSTMCell, RNNCell
from rnnkit.core.gates import GatedCell
from rnnkit.core.routing import choose_route
from rnnkit.core.step import CACHE_ATTR as STEP_CACHE


class Recurrent(nn.Module):
    """Any gated cell over time, ``num_layers`` deep, optionally bidirectional.

    ``cell`` is a GatedCell subclass (or a callable ``(input_size, hidden_size, bias=...) ->
    GatedCell``); ``cell_kwargs`` go to every cell it builds.
    """

    def __init__(
        self,
        cell: Callable[..., GatedCell],
        input_size: int,
        hidden_size: int,
        num_layers: int = 1,
        bias: bool = True,
        batch_first: bool = True,
        dropout: float = 0.0,
        bidirectional: bool = False,
        **cell_kwargs,
    ):
        super().__init__()
        if not isinstance(num_layers, int) or num_layers < 1:
            raise ValueError(f"num_layers must be a positive int, got {num_layers!r}")
        if not 0.0 <= float(dropout) <= 1.0:
            raise ValueError(f"dropout must be in [0, 1], got {dropout!r}")
        self.input_size = input_size
        self.hidden_size = hidden_size
        self.num_layers = num_layers
        self.bias = bias
        self.batch_first = batch_first
        self.dropout = float(dropout)
        self.bidirectional = bidirectional
        self.num_directions = 2 if bidirectional else 1
        D = self.num_directions
        # cells[layer * D + direction], the same order as torch's h_n rows
        self.cells = nn.ModuleList(
            cell(input_size if layer == 0 else D * hidden_size, hidden_size, bias=bias, **cell_kwargs)
            for layer in range(num_layers)
            for _ in range(D)
        )
        self.State = type(self.cells[0]).State

    # -- state in torch's layout -------------------------------------------------------
    def _unpack_state(self, state, batch_size: int, x: Tensor) -> list[NamedTuple]:
        """Layer state (torch layout) -> one cell state per (layer, direction)."""
        if state is None:
            return [cell.initial_state(batch_size, device=x.device, dtype=x.dtype) for cell in self.cells]
        parts = self._check_state(state, batch_size, x)
        return [self.State(*(part[row] for part in parts)) for row in range(len(self.cells))]

    def _check_state(self, state, batch_size: int, x: Tensor) -> tuple[Tensor, ...]:
        """A layer state in torch's layout, checked: its parts, each (num_layers*D, B, H)."""
        fields = self.State._fields
        rows = self.num_layers * self.num_directions
        parts = (state,) if isinstance(state, Tensor) and len(fields) == 1 else state
        if isinstance(parts, Tensor) or not isinstance(parts, (tuple, list)) or len(parts) != len(fields):
            want = "a tensor h" if len(fields) == 1 else f"a tuple ({', '.join(fields)})"
            raise TypeError(f"state must be {want} of shape ({rows}, B, {self.hidden_size}), got {type(state).__name__}")
        expected = (rows, batch_size, self.hidden_size)
        for name, part in zip(fields, parts):
            if not isinstance(part, Tensor):
                raise TypeError(f"state.{name} must be a torch.Tensor, got {type(part).__name__}")
            if tuple(part.shape) != expected:
                raise ValueError(
                    f"state.{name} must have shape (num_layers*D={rows}, B={batch_size}, H={self.hidden_size}), "
                    f"got {tuple(part.shape)}"
                )
            _check_like(f"state.{name}", part, x)
        return tuple(parts)

    def _pack_state(self, states: list[NamedTuple]):
        stacked = self.State(*(torch.stack(parts) for parts in zip(*states)))
        return stacked[0] if len(stacked) == 1 else stacked

    # -- forward -------------------------------------------------------------------------
    def forward(self, x: Tensor, state=None, lengths: Tensor | Sequence[int] | None = None):
        route = choose_route(self, x, state, lengths)  # validates x; the route validates state and lengths
        return route.run(self, x, state, lengths)

    def __getstate__(self):
        """Pickling and ``copy.deepcopy`` leave out the lean stepping path's packed weights (step.py),
        which the next step makes again."""
        state = self.__dict__.copy()
        state.pop(STEP_CACHE, None)
        return state

    def extra_repr(self) -> str:
        parts = [f"{self.input_size}, {self.hidden_size}", f"num_layers={self.num_layers}"]
        if not self.bias:
            parts.append("bias=False")
        if not self.batch_first:
            parts.append("batch_first=False")
        if self.dropout:
            parts.append(f"dropout={self.dropout}")
        if self.bidirectional:
            parts.append("bidirectional=True")
        return ", ".join(parts)


def _check_like(name: str, tensor: Tensor, reference: Tensor, what: str = "x") -> None:
    if tensor.device != reference.device:
        raise ValueError(f"{name} is on {tensor.device} but {what} is on {reference.device}")
    if tensor.dtype != reference.dtype:
        raise TypeError(f"{name} has dtype {tensor.dtype} but {what} has dtype {reference.dtype}")


class LSTM(Recurrent):
    """Multi-layer LSTM (see ``rnnkit.core.cells.lstm``); state is ``LSTMState(h, c)``."""

    def __init__(self, input_size, hidden_size, num_layers=1, bias=True, batch_first=True, dropout=0.0,
                 bidirectional=False):
        super().__init__(LSTMCell, input_size, hidden_size, num_layers, bias, batch_first, dropout, bidirectional)


class GRU(Recurrent):
    """Multi-layer GRU in torch.nn.GRU's convention (see ``rnnkit.core.cells.gru``)."""

    def __init__(self, input_size, hidden_size, num_layers=1, bias=True, batch_first=True, dropout=0.0,
                 bidirectional=False):
        super().__init__(GRUCell, input_size, hidden_size, num_layers, bias, batch_first, dropout, bidirectional)


class RNN(Recurrent):
    """Multi-layer Elman RNN with ``nonlinearity`` "tanh" or "relu"."""

    def __init__(self, input_size, hidden_size, num_layers=1, nonlinearity="tanh", bias=True, batch_first=True,
                 dropout=0.0, bidirectional=False):
        super().__init__(RNNCell, input_size, hidden_size, num_layers, bias, batch_first, dropout, bidirectional,
                         nonlinearity=nonlinearity)
        self.nonlinearity = nonlinearity


# layer classes by cell name, for `--cell` choices (tasks build their RNNs from it)
LAYERS = {"lstm": LSTM, "gru": GRU, "rnn": RNN}
