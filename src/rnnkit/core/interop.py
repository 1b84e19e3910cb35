"""Exact conversion between rnnkit and torch.nn: one module, or every recurrent module in a model.

rnnkit's ``LSTM``, ``GRU``, ``RNN`` and cells hold torch.nn's parameters under torch.nn's names,
so conversion is a state_dict copy: the converted module computes the same function (outputs,
states, gradients) with the same constructor options (``batch_first``, ``proj_size``, ...),
device, dtype, ``requires_grad`` and train/eval mode.

``convert(model)`` replaces every torch.nn recurrent layer and cell inside any ``nn.Module`` by
rnnkit's, in place, and returns the model; ``convert(model, to="torch")`` does the inverse, for
shipping a model where rnnkit is not installed. ``from_torch`` and ``to_torch`` convert one
module.

>>> import torch, rnnkit
>>> model = torch.nn.Sequential(torch.nn.GRU(4, 6, num_layers=2))
>>> x = torch.randn(3, 2, 4)
>>> want = model(x)[0][0]
>>> model = rnnkit.convert(model)
>>> type(model[0]).__module__, torch.allclose(model(x)[0][0], want, atol=1e-6)
('rnnkit.core.layers', True)
>>> type(rnnkit.convert(model, to="torch")[0]) is torch.nn.GRU
True
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from rnnkit.core.cells import GRUCell, LSTMCell, RNNCell
from rnnkit.core.layers import GRU, LSTM, RNN

# torch.nn class -> rnnkit's class with the same contract (exact types: a subclass is left alone)
TO_RNNKIT: dict[type, type] = {
    nn.LSTM: LSTM,
    nn.GRU: GRU,
    nn.RNN: RNN,
    nn.LSTMCell: LSTMCell,
    nn.GRUCell: GRUCell,
    nn.RNNCell: RNNCell,
}
TO_TORCH: dict[type, type] = {ours: theirs for theirs, ours in TO_RNNKIT.items()}


def _options(module: nn.Module) -> tuple[tuple, dict]:
    """The constructor arguments that rebuild ``module`` (a layer or cell of either side)."""
    kwargs: dict[str, Any]
    if isinstance(module, nn.RNNBase):
        kwargs = dict(
            num_layers=module.num_layers,
            bias=module.bias,
            batch_first=module.batch_first,
            dropout=module.dropout,
            bidirectional=module.bidirectional,
        )
        if module.mode == "LSTM":
            kwargs["proj_size"] = module.proj_size
        if module.mode.startswith("RNN_"):
            kwargs["nonlinearity"] = module.nonlinearity
        return (module.input_size, module.hidden_size), kwargs
    kwargs = dict(bias=module.bias)
    if getattr(module, "nonlinearity", None) is not None:
        kwargs["nonlinearity"] = module.nonlinearity
    return (module.input_size, module.hidden_size), kwargs


def _rebuild(module: nn.Module, cls: type) -> nn.Module:
    """``module`` as an instance of ``cls``: same options, weights, device, dtype, requires_grad, mode."""
    args, kwargs = _options(module)
    ref = next(iter(module.parameters()), None)
    factory = {"device": ref.device, "dtype": ref.dtype} if ref is not None else {}
    with torch.random.fork_rng(devices=[]):  # its random init is overwritten: the global stream stays as it was
        new = cls(*args, **kwargs, **factory)
    new.load_state_dict(module.state_dict(), strict=True)
    for theirs, ours in zip(module.parameters(), new.parameters()):
        ours.requires_grad_(theirs.requires_grad)
    new.train(module.training)
    return new


def from_torch(module: nn.Module) -> nn.Module:
    """A ``torch.nn`` LSTM, GRU, RNN or cell -> the rnnkit module computing the same function."""
    cls = TO_RNNKIT.get(type(module))
    if cls is None:
        raise TypeError(
            f"from_torch expects torch.nn.LSTM, GRU or RNN or one of their cells, got {type(module).__name__}"
        )
    return _rebuild(module, cls)


def to_torch(module: nn.Module) -> nn.Module:
    """An rnnkit LSTM, GRU, RNN or cell -> the equivalent ``torch.nn`` module."""
    cls = TO_TORCH.get(type(module))
    if cls is None:
        raise TypeError(f"to_torch expects rnnkit.LSTM, GRU or RNN or one of their cells, got {type(module).__name__}")
    return _rebuild(module, cls)


def convert(model: nn.Module, to: str = "rnnkit") -> nn.Module:
    """Replace every recurrent layer and cell inside ``model`` (the model itself included) by the
    other side's: ``to="rnnkit"`` (torch.nn's -> rnnkit's) or ``to="torch"``. Submodules are
    replaced in place; the returned module is ``model`` or, if ``model`` itself is converted, its
    replacement. Weights, options, device, dtype, ``requires_grad`` and train/eval mode are kept;
    a module shared by several parents stays shared."""
    if to not in ("rnnkit", "torch"):
        raise ValueError(f"to must be 'rnnkit' or 'torch', got {to!r}")
    table = TO_RNNKIT if to == "rnnkit" else TO_TORCH
    done: dict[int, nn.Module] = {}

    def swap(module: nn.Module) -> nn.Module:
        if id(module) in done:
            return done[id(module)]
        cls = table.get(type(module))
        if cls is not None:
            new = _rebuild(module, cls)
        else:
            new = module
            for name, child in list(module._modules.items()):
                if child is not None:
                    replacement = swap(child)
                    if replacement is not child:
                        module._modules[name] = replacement
        done[id(module)] = new
        return new

    return swap(model)
