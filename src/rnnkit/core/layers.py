"""Recurrent layers: a cell run over whole sequences, stacked and in both directions.

``LSTM``, ``GRU`` and ``RNN`` are torch.nn's classes with rnnkit's kernels: they subclass
``torch.nn.RNNBase`` and take ``torch.nn.LSTM``/``GRU``/``RNN``'s methods, so the
constructor (argument order, names and defaults,
``batch_first=False``, ``proj_size``, ``device``, ``dtype``), the parameters (``weight_ih_l0``,
``bias_hh_l1_reverse``, ``weight_hr_l0``), ``all_weights``, ``flatten_parameters()``, the
initialisation, the warnings, the errors and the pickled state are torch.nn's own. Only
``forward`` is rnnkit's: it runs the route the routing table chooses (core/routing.py;
``rnnkit.explain(layer, x)`` names it), every route the same function.
``Recurrent(cell, ...)`` runs any :class:`~rnnkit.core.gates.GatedCell` subclass with the same
call; its cells are submodules (``cells.0.weight_ih``), since a cell of your own may hold more
than torch's four weights.

Call: ``output, h_n = layer(input, hx=None, *, lengths=None)``, torch.nn's contract:

- ``input``: (T, B, I), or (B, T, I) with ``batch_first=True``; (T, I) unbatched; or a
  ``PackedSequence`` (sorted or not), which gives a ``PackedSequence`` output;
- ``output``: (T, B, D*H) (or batch-first, unbatched, packed like the input), D = 2 if
  bidirectional, the forward and backward halves concatenated; with ``proj_size`` P, D*P;
- ``h_n``: (num_layers*D, B, H), for an LSTM ``LSTMState(h_n, c_n)``, a tuple; row
  ``layer*D + direction`` belongs to that layer and direction;
- ``lengths`` (rnnkit's, keyword-only) (B,), a tensor on any device or a list of ints in
  ``[0, T]``: sequence b uses only its first ``lengths[b]`` steps, as a packed sequence would.
  Outputs at padded steps are zero; the returned state is each sequence's state after its own
  last valid step (the initial state for an empty sequence); the backward direction starts at
  each sequence's own last valid step;
- ``state_noise`` (rnnkit's, keyword-only) ``{cell index: StateNoise}``: zoneout and recurrent
  dropout inside the recurrence, the masks ``rnnkit.Regularised`` draws (``sample_masks(x).state``,
  core/kernels/state_noise.py) and passes here, applied by whichever route runs the call, traced by
  ``torch.compile`` too.

Dropout (probability ``dropout``) is applied to the outputs of every layer but the last,
in training mode only, as torch.nn does.

>>> import torch, rnnkit
>>> lstm = rnnkit.LSTM(input_size=8, hidden_size=16, num_layers=2, bidirectional=True)
>>> out, (h, c) = lstm(torch.randn(5, 3, 8), lengths=[5, 2, 4])  # (T, B, I)
>>> tuple(out.shape), tuple(h.shape)
((5, 3, 32), (4, 3, 16))
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import ClassVar, NamedTuple

import torch
from torch import Tensor, nn
from torch.nn.utils.rnn import PackedSequence, pad_packed_sequence

from rnnkit.core.cells import GRUCell, LSTMCell, LSTMState, RNNCell
from rnnkit.core.cells.lstm import ProjectedLSTMCell
from rnnkit.core.gates import GatedCell, HiddenState, only_combine_customised
from rnnkit.core.kernels.state_noise import StateNoise, applying
from rnnkit.core.routing import choose_route, lean_route, tracer


class _Stack:
    """What every layer shares: the state in torch's layout, and the call (``_call``) that takes
    torch.nn's inputs (batched, unbatched, packed) to the route the routing table chooses."""

    State: type
    cells: Sequence[GatedCell]
    num_layers: int
    hidden_size: int
    batch_first: bool

    def _state_sizes(self) -> tuple[int, ...]:
        """The last dimension of each state field."""
        return (self.hidden_size,) * len(self.State._fields)

    # -- state in torch's layout -------------------------------------------------------
    def _unpack_state(self, state, batch_size: int, x: Tensor) -> list[NamedTuple]:
        """Layer state (torch layout) -> one cell state per (layer, direction)."""
        if state is None:
            zeros = [x.new_zeros(batch_size, size) for size in self._state_sizes()]
            return [self.State(*zeros) for _ in range(len(self.cells))]
        parts = self._check_state(state, batch_size, x)
        return [self.State(*(part[row] for part in parts)) for row in range(len(self.cells))]

    def _check_state(self, state, batch_size: int, x: Tensor) -> tuple[Tensor, ...]:
        """A layer state in torch's layout, checked: its parts, each (num_layers*D, B, size)."""
        fields = self.State._fields
        rows = len(self.cells)
        parts = (state,) if isinstance(state, Tensor) and len(fields) == 1 else state
        if isinstance(parts, Tensor) or not isinstance(parts, (tuple, list)) or len(parts) != len(fields):
            want = "a tensor h" if len(fields) == 1 else f"a tuple ({', '.join(fields)})"
            raise TypeError(
                f"state must be {want} of shape ({rows}, B, {self.hidden_size}), got {type(state).__name__}"
            )
        for name, part, size in zip(fields, parts, self._state_sizes()):
            if not isinstance(part, Tensor):
                raise TypeError(f"state.{name} must be a torch.Tensor, got {type(part).__name__}")
            if tuple(part.shape) != (rows, batch_size, size):
                raise ValueError(
                    f"state.{name} must have shape (num_layers*D={rows}, B={batch_size}, H={size}), "
                    f"got {tuple(part.shape)}"
                )
            _check_like(f"state.{name}", part, x)
        return tuple(parts)

    def _pack_state(self, states: list[NamedTuple]):
        stacked = self.State(*(torch.stack(parts) for parts in zip(*states)))
        return stacked[0] if len(stacked) == 1 else stacked

    # -- the call ------------------------------------------------------------------------
    def _call(self, layer, input, hx, lengths, noise=None):
        """``input`` batched, unbatched or packed -> the route's result in the same form.
        ``layer`` is what the routes run: ``self``, or its cells bound to the current weights."""
        if isinstance(input, PackedSequence):
            if lengths is not None:
                raise ValueError("lengths= is for padded input; a PackedSequence carries its own lengths")
            return self._call_packed(layer, input, hx, noise)
        if isinstance(input, Tensor) and input.dim() == 2:  # unbatched (T, I): a batch of one
            hx = (
                None
                if hx is None
                else (
                    hx.unsqueeze(1)
                    if isinstance(hx, Tensor)
                    else type(hx)(*(p.unsqueeze(1) for p in hx))
                    if hasattr(hx, "_fields")
                    else tuple(p.unsqueeze(1) for p in hx)
                )
            )
            dim = 0 if self.batch_first else 1
            out, state = self._run(layer, input.unsqueeze(dim), hx, lengths, noise)
            return out.squeeze(dim), _map_state(state, lambda p: p.squeeze(1))
        return self._run(layer, input, hx, lengths, noise)

    def _run(self, layer, x, hx, lengths, noise=None):
        if not noise:
            route = choose_route(layer, x, hx, lengths)  # validates x; the route validates state and lengths
            return route.run(layer, x, hx, lengths)
        if tracer() == "dynamo":  # torch.compile cannot read the masks current for the cells: the route takes them
            return choose_route(layer, x, hx, lengths, noise).run(layer, x, hx, lengths, noise)
        cells = layer.cells
        with applying({cells[i]: n for i, n in noise.items()}):  # read by the route's kernels
            return choose_route(layer, x, hx, lengths).run(layer, x, hx, lengths)

    def _call_packed(self, layer, packed: PackedSequence, hx, noise=None):
        """Packed in, packed out: run on the padded batch in the caller's order with its lengths
        (the state rows stay in the caller's order, as torch.nn's do), then pack the output as
        the input was packed."""
        x, lengths = pad_packed_sequence(packed, batch_first=self.batch_first)  # caller's order
        out, state = self._run(layer, x, hx, lengths, noise)
        if not self.batch_first:
            out = out.transpose(0, 1)  # (B, T, D*H)
        if packed.sorted_indices is not None:
            out = out.index_select(0, packed.sorted_indices)
        B = out.shape[0]
        valid = torch.arange(B)[None, :] < packed.batch_sizes[:, None]  # (T, B): step t of sorted row b
        data = out.transpose(0, 1)[valid.to(out.device)]  # the packed order: time-major over valid rows
        return PackedSequence(data, packed.batch_sizes, packed.sorted_indices, packed.unsorted_indices), state


def _call_options(options: dict) -> tuple[Tensor | Sequence[int] | None, dict[int, StateNoise] | None]:
    """The keyword-only extras of a layer call: ``lengths`` and ``state_noise``, nothing else."""
    lengths = options.pop("lengths", None)
    noise = options.pop("state_noise", None)
    if options:
        raise TypeError(f"forward() got an unexpected keyword argument {next(iter(options))!r}")
    return lengths, noise


def _map_state(state, fn):
    if isinstance(state, Tensor):
        return fn(state)
    return type(state)(*(fn(p) for p in state))


def _check_like(name: str, tensor: Tensor, reference: Tensor, what: str = "x") -> None:
    if tensor.device != reference.device:
        raise ValueError(f"{name} is on {tensor.device} but {what} is on {reference.device}")
    if tensor.dtype != reference.dtype:
        raise TypeError(f"{name} has dtype {tensor.dtype} but {what} has dtype {reference.dtype}")


class Recurrent(_Stack, nn.Module):
    """Any gated cell over time, ``num_layers`` deep, optionally bidirectional.

    ``cell`` is a GatedCell subclass (or a callable ``(input_size, hidden_size, bias=...) ->
    GatedCell``); ``cell_kwargs`` go to every cell it builds. The arguments after ``cell`` are
    torch.nn.RNN's, with its defaults (``batch_first=False``: input (T, B, I)); the parameters
    are the cells' own, ``cells.{layer*D + direction}.weight_ih`` and so on.
    """

    def __init__(
        self,
        cell: Callable[..., GatedCell],
        input_size: int,
        hidden_size: int,
        num_layers: int = 1,
        bias: bool = True,
        batch_first: bool = False,
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

    def forward(self, input, hx=None, **options):
        """torch.nn's ``forward(input, hx=None)`` and rnnkit's ``lengths=`` keyword (module docstring)."""
        return self._call(self, input, hx, *_call_options(options))

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        """torch.nn's names load too: ``weight_ih_l1_reverse`` is ``cells.3.weight_ih`` (D = 2), so a
        torch.nn or rnnkit LSTM's state_dict loads into ``Recurrent(MyLSTMCell, ...)``."""
        D = self.num_directions
        for key in [k for k in state_dict if k.startswith(prefix) and "_l" in k[len(prefix) :]]:
            name, _, where = key[len(prefix) :].rpartition("_l")
            layer, reverse = (where[: -len("_reverse")], 1) if where.endswith("_reverse") else (where, 0)
            if name in ("weight_ih", "weight_hh", "bias_ih", "bias_hh") and layer.isdigit():
                state_dict[f"{prefix}cells.{int(layer) * D + reverse}.{name}"] = state_dict.pop(key)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def extra_repr(self) -> str:
        parts = [f"{self.input_size}, {self.hidden_size}", f"num_layers={self.num_layers}"]
        if not self.bias:
            parts.append("bias=False")
        if self.batch_first:
            parts.append("batch_first=True")
        if self.dropout:
            parts.append(f"dropout={self.dropout}")
        if self.bidirectional:
            parts.append("bidirectional=True")
        return ", ".join(parts)


# -- torch.nn's classes with rnnkit's forward ----------------------------------------------------------

_VIEWS_ATTR = "_rnnkit_bound"  # a plain attribute, never pickled: the cells bound to the current weights


class _Bound:
    """A torch.nn-contract layer as the routes see it: ``cells`` are light cell objects holding the
    layer's current weights (no copies), everything else is read from the layer. Made again when a
    weight object changes (a new Parameter, ``load_state_dict(assign=True)``, ``functional_call``,
    a parametrization or weight norm, which compute the weight each call); in-place changes need
    nothing, the cells hold the same tensors."""

    def __init__(self, layer, weights: list, cells: list):
        self.layer, self.weights, self.cells = layer, weights, cells
        # what the lean stepping path asks at every step (routing._lean_step), known once bound
        self.plain_cells = all(map(only_combine_customised, cells))

    def __getattr__(self, name):
        return getattr(self.layer, name)


class _TorchContract(_Stack):
    """torch.nn.RNNBase subclasses with rnnkit's forward. Nothing but torch.nn's own state is kept
    on the module (the bound cells are a plain attribute left out of pickles),
    so ``torch.save(model)`` loads with ``weights_only=True`` once the class is a safe global."""

    cell_class: ClassVar[type]
    State: ClassVar[type] = HiddenState

    @property
    def num_directions(self) -> int:
        return 2 if self.bidirectional else 1

    @property
    def cells(self) -> list[GatedCell]:
        """One cell per (layer, direction), ``cells[layer*D + direction]``, holding this layer's
        current weights (``weight_ih_l{layer}{_reverse}`` is ``cells[...].weight_ih``)."""
        return self._bound().cells

    def _current_weights(self) -> list:
        params = self._parameters  # not attribute access: nn.Module's __getattr__ is slow
        try:
            return [params[name] for name in self._flat_weights_names]
        except KeyError:  # a parametrization or weight norm: the weight is computed on access
            return [getattr(self, name) for name in self._flat_weights_names]

    def _bound(self) -> _Bound:
        weights = self._current_weights()
        bound = self.__dict__.get(_VIEWS_ATTR)
        if (
            bound is not None
            and len(bound.weights) == len(weights)
            and all(a is b for a, b in zip(bound.weights, weights))
        ):
            return bound
        bound = _Bound(self, weights, self._make_cells(weights))
        object.__setattr__(self, _VIEWS_ATTR, bound)
        return bound

    def _make_cells(self, weights: list) -> list[GatedCell]:
        by_name = dict(zip(self._flat_weights_names, weights))
        cells = []
        for names in self._all_weights:
            w = {name.rsplit("_l", 1)[0]: by_name[name] for name in names}
            cells.append(self._cell_view(w))
        return cells

    def _cell_view(self, w: dict) -> GatedCell:
        cls = ProjectedLSTMCell if "weight_hr" in w else self.cell_class
        cell = cls.__new__(cls)
        nn.Module.__init__(cell)
        cell.input_size, cell.hidden_size, cell.bias = w["weight_ih"].shape[1], self.hidden_size, self.bias
        if cls is RNNCell:
            cell.nonlinearity = self.nonlinearity
        for name in ("weight_ih", "weight_hh", "bias_ih", "bias_hh", "weight_hr"):
            if name in w or name.startswith("bias"):
                cell._parameters[name] = w.get(name)  # the layer's own tensors, not copies
        return cell

    def forward(self, input, hx=None, **options):
        """torch.nn's ``forward(input, hx=None)``; rnnkit's ``lengths=`` keyword (see the module
        docstring). ``**options`` rather than a keyword-only parameter: torch.onnx's exporter fills
        every named parameter's default in positionally."""
        if hx is not None and not options:  # one step with a carried state: the lean path at once
            bound = self._bound()
            route = lean_route(bound, input, hx)
            if route is not None:
                return route.run(bound, input, hx, None)
        lengths, noise = _call_options(options)
        if not self._plain_call(input, hx):
            if lengths is not None or noise:
                raise ValueError("lengths= and state_noise= take a batched (T, B, I) or (B, T, I) tensor input")
            # anything torch.nn would refuse gets torch.nn's own error (and anything else it computes)
            return self._torch_forward(input, hx)
        return self._call(self._bound(), input, hx, lengths, noise)

    def _plain_call(self, input, hx) -> bool:
        """Whether the call is one rnnkit's routes take as torch.nn would: the input and state of
        the shapes, dtype and device torch.nn accepts (the rest goes to torch.nn's forward)."""
        packed = isinstance(input, PackedSequence)
        data = input.data if packed else input
        if not isinstance(data, Tensor) or data.dim() not in ((2,) if packed else (2, 3)):
            return False
        w = self.__dict__.get(_VIEWS_ATTR)
        ref = w.weights[0] if w is not None else self._current_weights()[0]
        if data.shape[-1] != self.input_size or data.dtype != ref.dtype or data.device != ref.device:
            return False
        if packed:
            B, batched = int(input.batch_sizes[0]), True
        else:
            batched = data.dim() == 3
            B = data.shape[0 if self.batch_first else 1] if batched else 1
            if data.numel() == 0:
                return False
        if hx is None:
            return True
        parts = (hx,) if len(self.State._fields) == 1 else hx
        if isinstance(parts, Tensor) or not isinstance(parts, (tuple, list)) or len(parts) != len(self.State._fields):
            return False
        rows = self.num_layers * self.num_directions
        for part, size in zip(parts, self._state_sizes()):
            if not isinstance(part, Tensor) or part.dtype != data.dtype or part.device != data.device:
                return False
            if tuple(part.shape) != ((rows, B, size) if batched else (rows, size)):
                return False
        return True

    def __getstate__(self):
        state = super().__getstate__()
        state.pop(_VIEWS_ATTR, None)
        return state

    # The bound cells are made eagerly wherever the weights are made or replaced, so that a call
    # (under torch.compile too) finds them ready; ``_bound`` remakes them for any other change.
    def __setstate__(self, state):
        super().__setstate__(state)
        self._bound()

    def _apply(self, fn, recurse=True):
        result = super()._apply(fn, recurse)
        self._bound()
        return result

    def __setattr__(self, name, value):
        super().__setattr__(name, value)
        if _VIEWS_ATTR in self.__dict__ and name in self._flat_weights_names:
            self._bound()


# The classes subclass torch.nn.RNNBase, whose __init__ makes the parameters, and take the rest of
# torch.nn.LSTM/GRU/RNN's methods as they are; they do not subclass those three themselves, which
# torch.compile (dynamo) refuses to trace by class.


class LSTM(_TorchContract, nn.RNNBase):
    """``torch.nn.LSTM`` (same constructor, parameters and call) with rnnkit's kernels; the state
    is ``LSTMState(h, c)``, a tuple. See ``rnnkit.core.cells.lstm`` for the equations.

    ``LSTM(input_size, hidden_size, num_layers=1, bias=True, batch_first=False, dropout=0.0,
    bidirectional=False, proj_size=0, device=None, dtype=None)``"""

    cell_class = LSTMCell
    State = LSTMState
    _torch_forward = nn.LSTM.forward
    get_expected_cell_size = nn.LSTM.get_expected_cell_size
    check_forward_args = nn.LSTM.check_forward_args
    permute_hidden = nn.LSTM.permute_hidden

    def __init__(self, *args, **kwargs):
        super().__init__("LSTM", *args, **kwargs)
        self._bound()

    def _state_sizes(self) -> tuple[int, ...]:
        return (self.proj_size or self.hidden_size, self.hidden_size)


class GRU(_TorchContract, nn.RNNBase):
    """``torch.nn.GRU`` (same constructor, parameters and call) with rnnkit's kernels (see
    ``rnnkit.core.cells.gru``).

    ``GRU(input_size, hidden_size, num_layers=1, bias=True, batch_first=False, dropout=0.0,
    bidirectional=False, device=None, dtype=None)``"""

    cell_class = GRUCell
    _torch_forward = nn.GRU.forward

    def __init__(self, *args, **kwargs):
        if "proj_size" in kwargs:
            raise ValueError("proj_size argument is only supported for LSTM, not RNN or GRU")
        super().__init__("GRU", *args, **kwargs)
        self._bound()


class RNN(_TorchContract, nn.RNNBase):
    """``torch.nn.RNN`` (same constructor, parameters and call; ``nonlinearity`` "tanh" or
    "relu") with rnnkit's kernels.

    ``RNN(input_size, hidden_size, num_layers=1, nonlinearity="tanh", bias=True, batch_first=False,
    dropout=0.0, bidirectional=False, device=None, dtype=None)``"""

    cell_class = RNNCell
    _torch_forward = nn.RNN.forward

    def __init__(self, *args, **kwargs):  # torch.nn.RNN's, word for word in effect
        if "proj_size" in kwargs:
            raise ValueError("proj_size argument is only supported for LSTM, not RNN or GRU")
        if len(args) > 3:
            self.nonlinearity = args[3]
            args = args[:3] + args[4:]
        else:
            self.nonlinearity = kwargs.pop("nonlinearity", "tanh")
        if self.nonlinearity == "tanh":
            mode = "RNN_TANH"
        elif self.nonlinearity == "relu":
            mode = "RNN_RELU"
        else:
            raise ValueError(f"Unknown nonlinearity '{self.nonlinearity}'. Select from 'tanh' or 'relu'.")
        super().__init__(mode, *args, **kwargs)
        self._bound()


# layer classes by cell name, for `--cell` choices (tasks build their RNNs from it)
LAYERS = {"lstm": LSTM, "gru": GRU, "rnn": RNN}
