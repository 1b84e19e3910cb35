"""The classify task's network (ByteClassifier): bytes -> input vectors -> bidirectional RNN -> pooled ends
-> class logits, with the hashed n-gram and word embeddings it may add and the bag-of-words model it
may train beside it; see the package docstring for the equations.

>>> import torch
>>> from rnnkit.tasks.classify.task import ClassifyConfig
>>> model = ByteClassifier(ClassifyConfig(hidden=8, e_dim=8, layers=1), num_classes=3)
>>> logits, loss = model(torch.randint(0, 256, (2, 12)), torch.tensor([12, 5]), torch.tensor([0, 2]))
>>> tuple(logits.shape), loss.dim()
((2, 3), 0)
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from rnnkit.tasks.cell_spec import recurrent_layer
from rnnkit.tasks.regularisers import regularised

if TYPE_CHECKING:
    from rnnkit.tasks.classify.task import ClassifyConfig

VOCAB = 256  # byte values; UTF-8 bytes >= 128 are symbols of their own
BAG_DIM = 16  # width of the --bag model's word and word-pair vectors


def masked_pool(x: Tensor, lengths: Tensor, how: str) -> Tensor:
    """Max or mean of x (B, S, C) over each row's first lengths[b] steps -> (B, C)."""
    valid = torch.arange(x.shape[1], device=x.device)[None, :, None] < lengths[:, None, None]  # (B, S, 1)
    if how == "max":
        return x.masked_fill(~valid, float("-inf")).amax(dim=1)
    return (x * valid).sum(dim=1) / lengths[:, None].to(x.dtype)


class ByteClassifier(nn.Module):
    """Bytes (B, T) and lengths (B,) -> class logits (B, K); see the module docstring for the equations."""

    def __init__(self, config: ClassifyConfig, num_classes: int):
        super().__init__()
        self.config = config
        c = config
        width = VOCAB if c.input == "onehot" else c.embed
        self.byte_embedding = nn.Embedding(VOCAB, c.embed) if c.input == "embedding" else None
        self.ngram_embedding = nn.Embedding(c.buckets, c.embed) if c.ngrams > 1 or c.words else None
        for table in (self.byte_embedding, self.ngram_embedding):
            if table is not None:  # N(0, 1) rows, summed and concatenated, would saturate the gates at the start
                nn.init.normal_(table.weight, std=0.1)
        # --dropout between the layers only where there are several: one layer has no "between", and
        # torch.nn's layers warn at a non-zero value there (the inputs' and the classifier's stay)
        between = c.dropout if c.layers > 1 else 0.0
        layer = recurrent_layer(
            c.cell, c.patch * width, c.hidden, c.layers, batch_first=True, dropout=between, bidirectional=True
        )
        self.rnn = regularised(layer, c)  # the layer itself unless --weight-drop, --zoneout, ... are given
        self.project_forward = nn.Linear(c.hidden, c.e_dim)
        self.project_backward = nn.Linear(c.hidden, c.e_dim)
        self.classifier = nn.Linear(c.e_dim, num_classes)
        self.dropout = nn.Dropout(c.dropout)
        # --bag: fastText's model of the text's words and word pairs, trained beside the recurrent one
        self.bag = nn.Embedding(c.bag_buckets, BAG_DIM) if c.bag else None
        self.bag_classifier = nn.Linear(BAG_DIM, num_classes) if c.bag else None
        if self.bag is not None:
            nn.init.uniform_(self.bag.weight, -1 / BAG_DIM, 1 / BAG_DIM)

    def inputs(self, x: Tensor) -> Tensor:
        """(B, T) bytes -> (B, T, width) input vectors."""
        x = x.long()
        if self.byte_embedding is None:
            return F.one_hot(x, VOCAB).float()  # (B, T, 256)
        e = self.byte_embedding(x)  # (B, T, E)
        ids = []
        if self.config.ngrams > 1:
            ids.append(ngram_ids(x, self.config.ngrams, self.config.buckets))
        if self.config.words:
            ids.append(word_ids(x, self.config.buckets, pairs=self.config.word_pairs))
        if ids:
            assert self.ngram_embedding is not None  # made whenever n-grams or words are on
            features = self.ngram_embedding(torch.cat(ids, dim=2))  # (B, T, F, E)
            p = self.config.feature_dropout
            if self.training and p > 0:  # whole vectors: a dropped feature is absent at that byte
                keep = torch.rand(features.shape[:3], device=x.device) >= p
                features = features * (keep.unsqueeze(3).to(features.dtype) / (1 - p))
            e = e + features.sum(dim=2)
        return e

    def forward(self, x: Tensor, lengths: Tensor, targets: Tensor | None = None):
        logits, bag = self.parts(x, lengths)
        if bag is None:
            return logits, F.cross_entropy(logits, targets) if targets is not None else None
        # two models trained side by side, each on its own loss, their log-probabilities added
        loss = F.cross_entropy(logits, targets) + F.cross_entropy(bag, targets) if targets is not None else None
        return self.combine(logits, bag), loss

    @staticmethod
    def combine(logits: Tensor, bag: Tensor) -> Tensor:
        """The prediction of the two models: their log-probabilities added."""
        return logits.log_softmax(dim=1) + bag.log_softmax(dim=1)

    def parts(self, x: Tensor, lengths: Tensor) -> tuple[Tensor, Tensor | None]:
        """The recurrent model's logits (B, K) and the bag-of-words model's (None without --bag)."""
        B, T = x.shape
        k = self.config.patch
        e = self.inputs(x)
        e = e * (torch.arange(T, device=x.device)[None, :] < lengths[:, None]).unsqueeze(2)  # no padding in patches
        e = self.dropout(e)
        if T % k:
            e = F.pad(e, (0, 0, 0, k - T % k))
        steps = e.reshape(B, -1, k * e.shape[2])  # (B, S, k*width), S = ceil(T / k)
        step_lengths = (lengths + k - 1) // k
        out, _ = self.rnn(steps, lengths=step_lengths)  # (B, S, 2H)
        H = self.config.hidden
        if self.config.pooling == "ends":
            forward = out[torch.arange(B, device=x.device), step_lengths - 1, :H]  # each text's own last step
            backward = out[:, 0, H:]  # the backward direction ends at step 0
        else:
            forward = masked_pool(out[:, :, :H], step_lengths, self.config.pooling)
            backward = masked_pool(out[:, :, H:], step_lengths, self.config.pooling)
        e_sum = self.project_forward(forward) + self.project_backward(backward)  # (B, e_dim)
        logits = self.classifier(self.dropout(e_sum))  # (B, K)
        return logits, None if self.bag is None else self.bag_logits(x, lengths)

    def bag_logits(self, x: Tensor, lengths: Tensor) -> Tensor:
        """(B, T) bytes -> (B, K): the mean of the bag table's rows of each word and word pair of the text."""
        assert self.bag is not None and self.bag_classifier is not None  # made together, with --bag
        x = x.long()
        T = x.shape[1]
        ids = word_ids(x, self.config.bag_buckets, pairs=True)  # (B, T, 2): word so far, (previous, word)
        is_word = word_bytes(x)
        is_end = is_word & ~F.pad(is_word, (0, 1))[:, 1:]
        valid = is_end & (torch.arange(T, device=x.device)[None, :] < lengths[:, None])
        has_previous = is_end.long().cumsum(dim=1) > 1
        mask = torch.stack([valid, valid & has_previous], dim=2)  # (B, T, 2)
        weights = mask.to(self.bag.weight.dtype)
        total = (self.bag(ids) * weights.unsqueeze(3)).sum(dim=(1, 2))
        return self.bag_classifier(total / weights.sum(dim=(1, 2)).clamp(min=1).unsqueeze(1))


def word_bytes(x: Tensor) -> Tensor:
    """Where (B, T) bytes are ASCII letters or digits."""
    return ((x >= 48) & (x <= 57)) | ((x >= 65) & (x <= 90)) | ((x >= 97) & (x <= 122))


def ngram_ids(x: Tensor, n_max: int, buckets: int) -> Tensor:
    """Hash bucket of the n bytes ending at each position, n = 2..n_max: (B, T) -> (B, T, n_max - 1).
    Positions before the text's start read as symbol 256, so a 3-gram at position 1 differs from one
    in the middle. A polynomial hash modulo a prime, in int64 without overflow."""
    prime = 2_147_483_647
    h = x.long() + 1
    ids = []
    for k in range(1, n_max):
        previous = F.pad(x.long(), (k, 0), value=VOCAB)[:, : x.shape[1]]
        h = (h * 263 + previous + 1) % prime
        ids.append((h * 2654435761 + k) % prime % buckets)
    return torch.stack(ids, dim=2)


def word_ids(x: Tensor, buckets: int, longest: int = 20, pairs: bool = False) -> Tensor:
    """Hash bucket of the word so far at each position (B, T) -> (B, T, 1): the run of ASCII letters and
    digits ending there, up to `longest` bytes; a byte outside words gets its own bucket. With `pairs`,
    a second column (B, T, 2) hashes (previous word, word so far) inside words."""
    x = x.long()
    B, T = x.shape
    prime = 2_147_483_647
    is_word = word_bytes(x)
    h = x + 1 + 1000 * is_word
    alive = is_word
    for k in range(1, longest):
        previous = F.pad(x, (k, 0))[:, :T]
        alive = alive & F.pad(is_word, (k, 0))[:, :T]
        h = torch.where(alive, (h * 263 + previous + 1) % prime, h)
    ids = [(h * 2654435761 + 97) % prime % buckets]
    if pairs:
        # each word's hash in its own slot (slot T takes the bytes that end none), then, at each byte, the
        # slot of the last word that ended before it: cumsum, scatter and gather, which ONNX has too
        is_end = is_word & ~F.pad(is_word, (0, 1))[:, 1:]  # last byte of a word
        ended = is_end.long().cumsum(dim=1)  # (B, T) words ended at or before t
        words = torch.zeros(B, T + 1, dtype=h.dtype, device=x.device).scatter(1, torch.where(is_end, ended - 1, T), h)
        before = ended - is_end.long()  # words ended strictly before t
        previous_word = words.gather(1, (before - 1).clamp(min=0))
        pair = (previous_word * 1_000_003 + h) % prime
        ok = is_word & (before > 0)
        ids.append(torch.where(ok, (pair * 2654435761 + 389) % prime % buckets, torch.zeros_like(h)))
    return torch.stack(ids, dim=2)
