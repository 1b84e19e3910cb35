"""The built-in cells, each in its own file with its equations, and the ``CELLS`` registry."""
from rnnkit.core.cells.gru import GRUCell
from rnnkit.core.cells.lstm import LSTMCell, LSTMState
from rnnkit.core.cells.rnn import RNNCell

CELLS = {"lstm": LSTMCell, "gru": GRUCell, "rnn": RNNCell}

__all__ = ["CELLS", "GRUCell", "LSTMCell", "LSTMState", "RNNCell"]
