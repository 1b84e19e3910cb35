"""Exact conversion between rnnkit layers and torch.nn.LSTM / GRU / RNN.

Both sides keep each (layer, direction)'s weights in the same stacked layout and gate order,
so conversion is a copy: torch's ``weight_ih_l{k}{_reverse}`` is rnnkit's
``cells[k*D + d].weight_ih``. ``batch_first`` is carried over, so the converted layer takes
the same tensors and returns the same outputs, states and gradients.

>>> import torch, rnnkit
>>> theirs = torch.nn.GRU(4, 6, num_layers=2, batch_first=True)
>>> ours = rnnkit.from_torch(theirs)
>>> x = torch.randn(2, 3, 4)
>>> torch.allclose(ours(x)[0], theirs(x)[0], atol=1e-6)
True
"""
from __future__ import annotations

import torch
from torch import nn

from rnnkit.core.layers import GRU, LSTM, RNN, Recurrent

# torch class -> the rnnkit layer with the same math
_PAIRS = {nn.LSTM: LSTM, nn.GRU: GRU, nn.RNN: RNN}
_NAMES = ("weight_ih", "weight_hh", "bias_ih", "bias_hh")


def _torch_name(name: str, layer: int, direction: int) -> str:
    return f"{name}_l{layer}{'_reverse' if direction else ''}"


def _copy(src, dst, src_name, dst_name) -> None:
    with torch.no_grad():
        getattr(dst, dst_name).copy_(getattr(src, src_name))


def from_torch(module: nn.Module) -> Recurrent:
    """A ``torch.nn.LSTM``/``GRU``/``RNN`` -> the rnnkit layer computing the same function."""
    kind = type(module)
    if kind not in _PAIRS:
        raise TypeError(f"from_torch expects torch.nn.LSTM, GRU or RNN, got {kind.__name__}")
    if getattr(module, "proj_size", 0):
        raise ValueError(f"from_torch does not support LSTM proj_size, got proj_size={module.proj_size}")
    kwargs = dict(
        num_layers=module.num_layers, bias=module.bias, batch_first=module.batch_first,
        dropout=module.dropout, bidirectional=module.bidirectional,
    )
    if kind is nn.RNN:
        kwargs["nonlinearity"] = module.nonlinearity
    ref = next(module.parameters())
    layer = _PAIRS[kind](module.input_size, module.hidden_size, **kwargs).to(device=ref.device, dtype=ref.dtype)
    _transfer(module, layer, to_torch=False)
    layer.train(module.training)
    return layer


def to_torch(layer: Recurrent) -> nn.Module:
    """A built-in rnnkit layer (LSTM, GRU, RNN) -> the equivalent ``torch.nn`` module."""
    kinds = {ours: theirs for theirs, ours in _PAIRS.items()}
    if type(layer) not in kinds:
        raise TypeError(f"to_torch expects rnnkit.LSTM, GRU or RNN, got {type(layer).__name__}")
    kwargs = dict(
        num_layers=layer.num_layers, bias=layer.bias, batch_first=layer.batch_first,
        dropout=layer.dropout, bidirectional=layer.bidirectional,
    )
    if isinstance(layer, RNN):
        kwargs["nonlinearity"] = layer.nonlinearity
    ref = layer.cells[0].weight_ih
    module = kinds[type(layer)](layer.input_size, layer.hidden_size, **kwargs).to(device=ref.device, dtype=ref.dtype)
    _transfer(module, layer, to_torch=True)
    module.train(layer.training)
    return module


def _transfer(module: nn.Module, layer: Recurrent, to_torch: bool) -> None:
    D = layer.num_directions
    names = _NAMES if layer.bias else _NAMES[:2]
    for k in range(layer.num_layers):
        for d in range(D):
            cell = layer.cells[k * D + d]
            for name in names:
                if to_torch:
                    _copy(cell, module, name, _torch_name(name, k, d))
                else:
                    _copy(module, cell, _torch_name(name, k, d), name)
