"""Batches for `rnnkit.fit`: tensors, a DataLoader or any iterable, read as a resumable stream.

`Batches(data)` turns what a user has into one batch per optimizer step, and remembers where it is
(epoch, batch index) so a resumed run continues with the very batch the interrupted one would have
taken next:

    tensors      (x, y) or a single tensor: rnnkit cuts batches of `batch_size` rows itself, in a
                 fresh order each epoch (a permutation drawn from (seed, epoch) when `shuffle`)
    re-iterable  a DataLoader, a list of batches: iterated once per epoch; the epoch's own randomness
                 (a shuffling sampler, worker seeds) is drawn from (seed, epoch), not from the
                 training stream, and a resume re-reads the epoch up to its position
    iterator     a generator: read once, no epochs; a resume cannot replay it (a warning says so)

`stream_batches` lays one long sequence out for stateful truncated BPTT: row b of every batch
continues row b of the batch before it.
"""

from __future__ import annotations

import hashlib
import warnings
from collections.abc import Iterator
from typing import Any

import torch

from rnnkit.engine.errors import UsageError


def _epoch_seed(seed: int, epoch: int, stream: str) -> int:
    digest = hashlib.sha256(f"{seed}/{stream}/{epoch}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def as_tensors(data: Any) -> tuple[torch.Tensor, ...] | None:
    """`data` as a tuple of tensors with one row per sample, or None when it is something else."""
    if isinstance(data, torch.Tensor):
        return (data,)
    if isinstance(data, (tuple, list)) and data and all(isinstance(t, torch.Tensor) for t in data):
        rows = {t.shape[0] if t.dim() else None for t in data}
        if len(rows) != 1 or None in rows:
            shapes = ", ".join(str(tuple(t.shape)) for t in data)
            raise UsageError(f"tensors given as data must share their first (sample) dimension; got shapes {shapes}")
        return tuple(data)
    return None


class Batches:
    """One batch per call of `next()`, with a resumable position (see the module docstring)."""

    def __init__(
        self,
        data: Any,
        *,
        batch_size: int = 32,
        shuffle: bool = True,
        seed: int = 0,
        drop_last: bool = False,
        name: str = "train",
    ):
        self.name, self.seed, self.shuffle, self.batch_size, self.drop_last = name, seed, shuffle, batch_size, drop_last
        self.tensors = as_tensors(data)
        if self.tensors is None and not hasattr(data, "__iter__"):
            raise UsageError(
                f"{name} data must be tensors, a DataLoader or an iterable of batches; got {type(data).__name__}"
            )
        if batch_size < 1:
            raise UsageError(f"batch_size must be at least 1, got {batch_size}")
        self.data = data
        self.one_pass = self.tensors is None and iter(data) is data  # a generator or other iterator
        self.epoch, self.index = 0, 0
        self._it: Iterator | None = None
        if self.tensors is not None and self.tensors[0].shape[0] == 0:
            raise UsageError(f"{name} data is empty (0 samples)")
        if self.has_len() and len(self) == 0:
            raise UsageError(f"{name} data is empty (0 batches)")

    def __len__(self) -> int:
        """Batches per epoch; TypeError when the data cannot say (an iterator without len)."""
        if self.tensors is not None:
            n = self.tensors[0].shape[0]
            return n // self.batch_size if self.drop_last else -(-n // self.batch_size)
        return len(self.data)

    def has_len(self) -> bool:
        try:
            len(self)
            return True
        except TypeError:
            return False

    # ---- position, for checkpoints ---------------------------------------------------------------
    def state(self) -> dict[str, int]:
        return {"epoch": self.epoch, "index": self.index}

    def load_state(self, state: dict[str, int]) -> None:
        self.epoch, self.index = int(state["epoch"]), int(state["index"])
        self._it = None
        if self.one_pass and (self.epoch or self.index):
            warnings.warn(
                f"{self.name} data is an iterator, which cannot be replayed: the resumed run "
                f"continues from wherever it now stands, not from batch {self.index}",
                stacklevel=2,
            )

    # ---- reading ---------------------------------------------------------------------------------
    def next(self) -> tuple[Any, bool]:
        """(the next batch, whether it starts a new epoch)."""
        if self._it is None:
            self._it = self._open(self.epoch, skip=self.index)
        try:
            batch = next(self._it)
        except StopIteration:
            if self.index == 0:
                raise UsageError(f"{self.name} data is empty: it yielded no batch") from None
            if self.one_pass:
                raise UsageError(
                    f"{self.name} data ran out after {self.index} batches; give an iterable that "
                    f"can be read again (a list, a DataLoader) or fewer steps"
                ) from None
            self.epoch, self.index = self.epoch + 1, 0
            self._it = self._open(self.epoch, skip=0)
            try:
                batch = next(self._it)
            except StopIteration:
                raise UsageError(f"{self.name} data is empty: it yielded no batch in epoch {self.epoch}") from None
        new_epoch = self.index == 0
        self.index += 1
        return batch, new_epoch

    def epoch_batches(self) -> Iterator[Any]:
        """Every batch of one pass in order, unshuffled (for evaluation)."""
        if self.tensors is not None:
            n = self.tensors[0].shape[0]
            for start in range(0, n, self.batch_size):
                yield _unwrap(tuple(t[start : start + self.batch_size] for t in self.tensors))
        else:
            yield from self.data

    def _open(self, epoch: int, skip: int) -> Iterator[Any]:
        if self.tensors is not None:
            return self._tensor_epoch(epoch, skip)
        if self.one_pass:
            return self.data
        # the epoch's randomness (a shuffling sampler's permutation, worker seeds) comes from
        # (seed, epoch), drawn while the first batch is made; the training RNG stream is left as it was
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(_epoch_seed(self.seed, epoch, self.name))
            it = iter(self.data)
            first = next(it, _END)
        return self._resume(first, it, skip)

    @staticmethod
    def _resume(first: Any, it: Iterator, skip: int) -> Iterator[Any]:
        if first is _END:
            return
        if skip == 0:
            yield first
        for i, batch in enumerate(it, start=1):
            if i >= skip:
                yield batch

    def _tensor_epoch(self, epoch: int, skip: int) -> Iterator[Any]:
        tensors = self.tensors
        assert tensors is not None
        n = tensors[0].shape[0]
        if self.shuffle:
            gen = torch.Generator().manual_seed(_epoch_seed(self.seed, epoch, self.name))
            order = torch.randperm(n, generator=gen)
        else:
            order = torch.arange(n)
        for b in range(skip, len(self)):
            rows = order[b * self.batch_size : (b + 1) * self.batch_size]
            yield _unwrap(tuple(t[rows] for t in tensors))


_END = object()


def _unwrap(batch: tuple) -> Any:
    return batch[0] if len(batch) == 1 else batch


def shard(batch: Any, rank: int, world_size: int) -> Any:
    """Process `rank`'s rows of a global batch (every tensor cut along its first dimension)."""
    if world_size == 1:
        return batch
    if isinstance(batch, torch.Tensor):
        if batch.shape[0] % world_size:
            raise UsageError(f"a batch of {batch.shape[0]} rows cannot be split evenly over {world_size} processes")
        per = batch.shape[0] // world_size
        return batch[rank * per : (rank + 1) * per]
    if isinstance(batch, tuple) and hasattr(batch, "_fields"):
        return type(batch)(*(shard(x, rank, world_size) for x in batch))
    if isinstance(batch, (tuple, list)):
        return type(batch)(shard(x, rank, world_size) for x in batch)
    if isinstance(batch, dict):
        return {k: shard(v, rank, world_size) for k, v in batch.items()}
    return batch


def stream_batches(
    x: torch.Tensor, y: torch.Tensor, batch_size: int, length: int
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Cut one long sequence (`x` of shape (N, ...), `y` of shape (N, ...)) into `batch_size` parallel
    streams and chunks of `length` steps, for stateful truncated BPTT: batch k holds steps
    [k * length, (k + 1) * length) of every stream, so row b of batch k + 1 continues row b of batch k.

        batches = stream_batches(x, y, batch_size=16, length=50)   # [(x (16, 50, ...), y (16, 50, ...)), ...]
    """
    if x.shape[0] != y.shape[0]:
        raise UsageError(f"x and y must have the same length, got {x.shape[0]} and {y.shape[0]}")
    per_stream = x.shape[0] // batch_size
    chunks = per_stream // length
    if chunks == 0:
        raise UsageError(
            f"a sequence of {x.shape[0]} steps is too short for {batch_size} streams of at least {length} steps each"
        )
    used = batch_size * per_stream
    xs = x[:used].reshape(batch_size, per_stream, *x.shape[1:])  # (B, N/B, ...)
    ys = y[:used].reshape(batch_size, per_stream, *y.shape[1:])
    return [(xs[:, k * length : (k + 1) * length], ys[:, k * length : (k + 1) * length]) for k in range(chunks)]
