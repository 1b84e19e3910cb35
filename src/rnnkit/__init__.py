"""rnnkit: recurrent neural networks on PyTorch, built from the seed deck's gate primitive.

>>> import torch, rnnkit
>>> out, (h, c) = rnnkit.LSTM(8, 16)(torch.randn(2, 5, 8))
>>> tuple(out.shape)
(2, 5, 16)
"""
from rnnkit.core import (
    CELLS, GRU, GRUCell, GatedCell, HiddenState, LAYERS, LSTM, LSTMCell, LSTMState, RNN, RNNCell, Recurrent,
    empty_cache, explain, from_torch, gate, routing, to_torch,
)

__version__ = "0.1.0"

__all__ = [
    "CELLS", "GRU", "GRUCell", "GatedCell", "HiddenState", "LAYERS", "LSTM", "LSTMCell", "LSTMState", "RNN", "RNNCell",
    "Recurrent", "__version__", "empty_cache", "explain", "from_torch", "gate", "routing", "to_torch",
]
