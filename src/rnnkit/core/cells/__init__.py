"""The built-in cells, each in its own file with its equations, and the ``CELLS`` registry."""

from rnnkit.core.cells.gru import GRUCell
from rnnkit.core.cells.ln_gru import LayerNormGRUCell
from rnnkit.core.cells.ln_lstm import LayerNormLSTMCell
from rnnkit.core.cells.lstm import LSTMCell, LSTMState
from rnnkit.core.cells.mingru import MinGRUCell
from rnnkit.core.cells.minlstm import MinLSTMCell
from rnnkit.core.cells.rnn import RNNCell
from rnnkit.core.cells.scan_cell import ParallelScanCell
from rnnkit.core.cells.slstm import SLSTMCell, SLSTMState

CELLS = {
    "lstm": LSTMCell,
    "gru": GRUCell,
    "rnn": RNNCell,
    "ln-lstm": LayerNormLSTMCell,
    "ln-gru": LayerNormGRUCell,
    "mingru": MinGRUCell,
    "minlstm": MinLSTMCell,
    "slstm": SLSTMCell,
}

__all__ = [
    "CELLS",
    "GRUCell",
    "LSTMCell",
    "LSTMState",
    "LayerNormGRUCell",
    "LayerNormLSTMCell",
    "MinGRUCell",
    "MinLSTMCell",
    "ParallelScanCell",
    "RNNCell",
    "SLSTMCell",
    "SLSTMState",
]
