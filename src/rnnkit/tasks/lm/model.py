"""The lm task's network: embedding (or one-hot) -> multi-layer RNN -> dropout -> linear to the vocabulary,
and the helpers that carry its recurrent state between steps and through checkpoints.

>>> import torch
>>> from rnnkit.tasks.lm.task import LMConfig
>>> model = CharRNN(10, LMConfig(hidden=16, layers=2, embed=0))
>>> out = model(torch.tensor([[1, 2, 3]]), targets=torch.tensor([[2, 3, 4]]))
>>> tuple(out.logits.shape), out.loss.dim(), tuple(out.state.shape)
((1, 3, 10), 0, (2, 1, 16))
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, NamedTuple

from torch import Tensor, nn
from torch.nn import functional as F

from rnnkit.tasks.cell_spec import recurrent_layer, resolve_cell
from rnnkit.tasks.regularisers import regularised

if TYPE_CHECKING:
    from rnnkit.tasks.lm.task import LMConfig


class LMOutput(NamedTuple):
    logits: Tensor  # (B, T, V) next-token scores
    loss: Tensor | None  # mean cross-entropy in nats, None without targets
    state: Any  # final recurrent state in the layer's layout (LSTMState(h, c) or h)


class CharRNN(nn.Module):
    """Embedding (or one-hot) -> multi-layer RNN -> dropout -> linear to the vocabulary."""

    def __init__(self, vocab_size: int, config: LMConfig):
        super().__init__()
        self.vocab_size = vocab_size
        self.embed = nn.Embedding(vocab_size, config.embed) if config.embed else None
        layer = recurrent_layer(
            config.cell,
            config.embed or vocab_size,
            config.hidden,
            config.layers,
            batch_first=True,
            dropout=config.dropout if config.layers > 1 else 0.0,
        )
        self.rnn = regularised(layer, config)  # the layer itself unless --weight-drop, --zoneout, ... are given
        self.drop = nn.Dropout(config.dropout)
        self.head = nn.Linear(config.hidden, vocab_size)

    def forward(self, idx: Tensor, targets: Tensor | None = None, state: Any = None) -> LMOutput:
        if self.embed is not None:
            x = self.embed(idx)  # (B, T, E)
        else:
            x = F.one_hot(idx, self.vocab_size).to(self.head.weight.dtype)  # (B, T, V)
        out, state = self.rnn(x, state)  # (B, T, H)
        logits = self.head(self.drop(out))  # (B, T, V)
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.reshape(-1, self.vocab_size).float(), targets.reshape(-1))
        return LMOutput(logits, loss, state)


def detach_state(state: Any) -> Any:
    if isinstance(state, Tensor):
        return state.detach()
    return type(state)(*(s.detach() for s in state))


def state_to_dict(state: Any) -> dict[str, Tensor]:
    if isinstance(state, Tensor):
        return {"h": state}
    return dict(zip(state._fields, state))


def state_from_dict(d: dict[str, Tensor], cell: str) -> Any:
    """Inverse of `state_to_dict` for a layer of `cell`: the cell's State NamedTuple (LSTMState(h, c)),
    or the bare h tensor the layers return for a one-part state."""
    State = resolve_cell(cell).State
    if State._fields == ("h",):
        return d["h"]
    return State(*(d[name] for name in State._fields))
