"""Core: cells (gates -> one step), layers (a cell over time), interop with torch.nn."""
from rnnkit.core import routing
from rnnkit.core.cells import CELLS, GRUCell, LSTMCell, LSTMState, RNNCell
from rnnkit.core.gates import GatedCell, HiddenState, gate
from rnnkit.core.interop import convert, from_torch, to_torch
from rnnkit.core.layers import GRU, LAYERS, LSTM, RNN, Recurrent
from rnnkit.core.native import empty_cache
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
    "RNNCell",
    "Recurrent",
    "convert",
    "empty_cache",
    "explain",
    "from_torch",
    "gate",
    "routing",
    "to_torch",
]
