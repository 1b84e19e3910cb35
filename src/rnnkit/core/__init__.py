"""Core: cells (gates -> one step), layers (a cell over time), interop with torch.nn."""

from rnnkit.core import routing
from rnnkit.core.cells import (
    CELLS,
    GRUCell,
    LayerNormGRUCell,
    LayerNormLSTMCell,
    LSTMCell,
    LSTMState,
    MinGRUCell,
    MinLSTMCell,
    ParallelScanCell,
    RNNCell,
    SLSTMCell,
)
from rnnkit.core.gates import GatedCell, HiddenState, gate
from rnnkit.core.interop import convert, from_torch, to_torch
from rnnkit.core.layers import GRU, LAYERS, LSTM, RNN, Recurrent
from rnnkit.core.native import empty_cache
from rnnkit.core.regularise import Regularised
from rnnkit.core.routing import explain

__all__ = [
    "CELLS",
    "GRU",
    "LAYERS",
    "LSTM",
    "RNN",
    "GRUCell",
    "GatedCell",
    "HiddenState",
    "LSTMCell",
    "LSTMState",
    "LayerNormGRUCell",
    "LayerNormLSTMCell",
    "MinGRUCell",
    "MinLSTMCell",
    "ParallelScanCell",
    "RNNCell",
    "Recurrent",
    "Regularised",
    "SLSTMCell",
    "convert",
    "empty_cache",
    "explain",
    "from_torch",
    "gate",
    "routing",
    "to_torch",
]
