"""Sampling from a trained lm: the prompt runs once, then one step per character with the carried
state (O(length), never re-running the prefix). Temperature, top-k and top-p (nucleus) sampling, many
samples as one batch, randomness only from a seeded torch.Generator.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from rnnkit.common.errors import UsageError
from rnnkit.tasks.base import device_of
from rnnkit.tasks.lm.data import Vocab


class Sampler:
    """Carries K samples' state through a model: `feed` ids, read `probs`, `draw` the next ids.

    temperature 0 is greedy; top_k keeps the k most likely tokens; top_p keeps the smallest set whose
    probability reaches p (nucleus). Randomness comes only from a torch.Generator seeded with `seed`.
    """

    def __init__(
        self,
        model: nn.Module,
        num_samples: int = 1,
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float | None = None,
        seed: int | None = None,
    ):
        if temperature < 0 or not math.isfinite(temperature):
            raise UsageError(f"--temperature must be >= 0 (0 = greedy), got {temperature}")
        if top_k is not None and top_k < 1:
            raise UsageError(f"--top-k must be at least 1, got {top_k}")
        if top_p is not None and not 0.0 < top_p <= 1.0:
            raise UsageError(f"--top-p must be in (0, 1], got {top_p}")
        if num_samples < 1:
            raise UsageError(f"--num-samples must be at least 1, got {num_samples}")
        self.model, self.K = model, num_samples
        self.temperature, self.top_k, self.top_p = temperature, top_k, top_p
        self.device = device_of(model)
        self.generator = torch.Generator(self.device)
        if seed is None:
            self.generator.seed()
        else:
            self.generator.manual_seed(seed)
        self.state = None
        self.logits: Tensor | None = None  # (K, V) scores for the next token

    @torch.no_grad()
    def feed(self, ids: Tensor) -> None:
        """Run ids (K, T) (or (T,) for all samples) from the carried state."""
        if ids.dim() == 1:
            ids = ids.expand(self.K, -1)
        out = self.model(ids.to(self.device), None, self.state)
        self.state, self.logits = out.state, out.logits[:, -1].float()  # (K, V)

    def _logits(self) -> Tensor:
        if self.logits is None:
            raise RuntimeError("feed the prompt before drawing: there are no logits yet")
        return self.logits

    def probs(self) -> Tensor:
        """(K, V) distribution of the next token after temperature, top-k and top-p."""
        logits = self._logits()
        if self.temperature == 0:
            return F.one_hot(logits.argmax(-1), logits.shape[-1]).float()
        logits = logits / self.temperature
        if self.top_k is not None and self.top_k < logits.shape[-1]:
            kth = torch.topk(logits, self.top_k, dim=-1).values[:, -1:]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        probs = F.softmax(logits, dim=-1)
        if self.top_p is not None and self.top_p < 1.0:
            sorted_p, order = probs.sort(dim=-1, descending=True)
            drop = sorted_p.cumsum(-1) - sorted_p >= self.top_p  # mass before a token already reaches p
            sorted_p = sorted_p.masked_fill(drop, 0.0)
            probs = torch.zeros_like(probs).scatter(-1, order, sorted_p)
            probs = probs / probs.sum(-1, keepdim=True)
        return probs

    def draw(self) -> Tensor:
        """(K,) next ids, sampled from `probs` (argmax when temperature is 0)."""
        if self.temperature == 0:
            return self._logits().argmax(-1)
        return torch.multinomial(self.probs(), 1, generator=self.generator).squeeze(1)


def start_ids(vocab: Vocab, prompt: str) -> list[int]:
    """The ids the model reads before the first generated token: the prompt, or with an empty
    prompt a newline (the start of a line), or the first token of the vocabulary without one."""
    if prompt:
        return vocab.encode(prompt, source="the prompt")
    if vocab.is_bytes:
        return [10]
    return [vocab.index.get("\n", 0)]


def generate_batch(
    model: nn.Module,
    vocab: Vocab,
    prompt: str = "",
    length: int = 200,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int | None = None,
    num_samples: int = 1,
) -> Iterator[tuple[str, ...]]:
    """Sample `num_samples` continuations of `prompt` as one batch; yields, per step, a tuple with each
    sample's new text (one character; with --bytes, possibly '' until a UTF-8 character completes).
    The prompt runs once; each step feeds one token with the carried state."""
    if length < 0:
        raise UsageError(f"--length must be >= 0, got {length}")
    ids = torch.tensor(start_ids(vocab, prompt), dtype=torch.long)
    was_training = model.training
    model.eval()
    try:
        sampler = Sampler(model, num_samples, temperature, top_k, top_p, seed)
        sampler.feed(ids)
        decoders = [vocab.decoder() for _ in range(num_samples)]
        for i in range(length):
            nxt = sampler.draw()  # (K,)
            values = nxt.tolist()
            yield tuple(d([v]) for d, v in zip(decoders, values))
            if i + 1 < length:
                sampler.feed(nxt[:, None])
        tail = tuple(d.flush() for d in decoders)
        if any(tail):
            yield tail
    finally:
        model.train(was_training)


def generate(
    model: nn.Module,
    vocab: Vocab,
    prompt: str = "",
    length: int = 200,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int | None = None,
) -> Iterator[str]:
    """One sample, as an iterator of characters (see `generate_batch`)."""
    for (piece,) in generate_batch(model, vocab, prompt, length, temperature, top_k, top_p, seed, 1):
        if piece:
            yield piece
