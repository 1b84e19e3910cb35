"""rnnkit: recurrent neural networks on PyTorch: fast RNN, LSTM and GRU layers, and cells of your
own, each built from one gate primitive, act(x A + h B + b).

>>> import torch, rnnkit
>>> out, (h, c) = rnnkit.LSTM(8, 16)(torch.randn(5, 2, 8))  # torch.nn's contract: (T, B, I)
>>> tuple(out.shape)
(5, 2, 16)
"""

from rnnkit.core import (
    CELLS,
    GRU,
    LAYERS,
    LSTM,
    RNN,
    GatedCell,
    GRUCell,
    HiddenState,
    LayerNormGRUCell,
    LayerNormLSTMCell,
    LSTMCell,
    LSTMState,
    MinGRUCell,
    MinLSTMCell,
    ParallelScanCell,
    Recurrent,
    Regularised,
    RNNCell,
    SLSTMCell,
    convert,
    empty_cache,
    explain,
    from_torch,
    gate,
    routing,
    to_torch,
)

__version__ = "0.1.0"

# Training from Python (rnnkit.engine.fit), imported on first use so `import rnnkit` stays light.
_ENGINE = {
    "fit": "rnnkit.engine.fit",
    "load": "rnnkit.engine.fit",
    "train": "rnnkit.engine.fit",
    "load_run": "rnnkit.engine.rundir",
    "stream_batches": "rnnkit.engine.data",
    "register_task": "rnnkit.tasks.base",
    "Task": "rnnkit.tasks.base",
}


def __getattr__(name: str):
    if name in _ENGINE:
        import importlib

        return getattr(importlib.import_module(_ENGINE[name]), name)
    raise AttributeError(f"module 'rnnkit' has no attribute {name!r}")


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
    "Task",
    "__version__",
    "convert",
    "empty_cache",
    "explain",
    "fit",
    "from_torch",
    "gate",
    "load",
    "load_run",
    "register_task",
    "routing",
    "stream_batches",
    "to_torch",
    "train",
]
