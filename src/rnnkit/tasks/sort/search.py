"""Decoding a SortModel: greedy, and beam search over the decoder's step contract (model.py).

Beam search keeps the K best partial outputs per sequence, scored by their summed log-probabilities;
all B*K hypotheses run as one batch, and after each step the decoder state is reordered with one index
so each surviving hypothesis carries its parent's state (nothing is recomputed). The output length is
the input length N, so there is no end token and no length normalisation. With K = 1 it is greedy.

>>> import torch
>>> from rnnkit.tasks.sort.model import SortModel
>>> from rnnkit.tasks.sort.search import decode
>>> model = SortModel(decoder="pointer", vocab=16, floats=False, embed=8, hidden=8).eval()
>>> x = torch.tensor([[3, 1, 2, 1]])
>>> sorted(decode(model, x, beam=3)[0].tolist()) == sorted(x[0].tolist())   # always a permutation
True
"""

from __future__ import annotations

from typing import Any, Protocol, cast

import torch
from torch import Tensor

from rnnkit.tasks.sort.model import SortModel, map_tensors


class Decoder(Protocol):
    """The step contract every decoder in sort/model.py speaks."""

    def start(self, memory: Any) -> Any: ...

    def step(self, prev: Tensor, state: Any, memory: Any) -> tuple[Tensor, Any]: ...


def greedy(model: SortModel, inputs: Tensor) -> Tensor:
    """inputs (B, N) -> choices (B, N): each step's most likely token (or position)."""
    logits, _ = model(inputs)
    return logits.argmax(dim=2)


def beam_search(model: SortModel, inputs: Tensor, beam: int) -> Tensor:
    """inputs (B, N) -> choices (B, N) of the best of `beam` hypotheses per sequence."""
    B, N = inputs.shape
    K = beam
    memory = model.encode(inputs)
    rows = torch.arange(B, device=inputs.device).repeat_interleave(K)  # hypothesis b*K + k reads sequence b
    memory = map_tensors(lambda t: t[rows], memory)
    decoder = cast(Decoder, model.decoder)  # one of sort/model.py's DECODERS
    state = decoder.start(memory)
    scores = torch.full((B, K), float("-inf"), device=inputs.device)
    scores[:, 0] = 0.0  # one live hypothesis to start, so the K beams do not begin as copies
    prev = torch.full((B * K,), -1, dtype=torch.long, device=inputs.device)
    history = torch.zeros(B, K, 0, dtype=torch.long, device=inputs.device)
    for _ in range(N):
        logits, state = decoder.step(prev, state, memory)  # (B*K, C)
        C = logits.shape[1]
        candidates = scores[:, :, None] + torch.log_softmax(logits, dim=1).view(B, K, C)  # (B, K, C)
        scores, flat = candidates.view(B, K * C).topk(min(K, K * C), dim=1)  # (B, K)
        parent, choice = flat // C, flat % C
        if scores.shape[1] < K:  # fewer candidates than beams (C < K at the first step): pad dead ones
            pad = K - scores.shape[1]
            scores = torch.cat([scores, scores.new_full((B, pad), float("-inf"))], dim=1)
            parent = torch.cat([parent, parent[:, :1].expand(B, pad)], dim=1)
            choice = torch.cat([choice, choice[:, :1].expand(B, pad)], dim=1)
        history = torch.cat([history.gather(1, parent[:, :, None].expand_as(history)), choice[:, :, None]], dim=2)
        source = (torch.arange(B, device=inputs.device)[:, None] * K + parent).reshape(B * K)
        state = map_tensors(lambda t, source=source: t[source], state)
        prev = choice.reshape(B * K)
    return history[:, 0]  # topk sorts descending: beam 0 is the best


def choose(model: SortModel, inputs: Tensor, beam: int = 1) -> Tensor:
    """The model's choices (B, N): tokens, or input positions for a pointer; greedy when beam is 1."""
    if beam < 1:
        raise ValueError(f"beam must be a positive int, got {beam!r}")
    with torch.no_grad():
        return greedy(model, inputs) if beam == 1 else beam_search(model, inputs, beam)


def decode(model: SortModel, inputs: Tensor, beam: int = 1) -> Tensor:
    """The sorted output values (B, N): tokens, or the input values at the chosen positions."""
    choices = choose(model, inputs, beam)
    return inputs.gather(1, choices) if model.points else choices
