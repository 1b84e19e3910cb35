"""Sort (many-to-one-to-many): an encoder RNN reads numbers, a decoder writes them sorted.

data.py: synthetic sequences and fixed test sets; model.py: encoder and the four decoders (DECODERS);
search.py: greedy and beam search; task.py: the config, the Task the trainer drives, metrics, text
input and output.
"""

from rnnkit.tasks.sort.model import DECODERS, SortModel
from rnnkit.tasks.sort.task import SortConfig, SortEvalOptions, SortTask

__all__ = ["DECODERS", "SortConfig", "SortEvalOptions", "SortModel", "SortTask"]
