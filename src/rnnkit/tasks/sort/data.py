"""Sorting data, synthetic and seeded: integer tokens in [0, V) or floats uniform in [0, 1].

A batch holds the sequences to sort, their sorted values and the stable sorting permutation:

    inputs  (B, N)  long tokens in [0, V), or float32 in [0, 1) ("Order Matters", Vinyals et al. 2016)
    targets (B, N)  inputs sorted ascending: targets[b, t] = inputs[b, order[b, t]]
    order   (B, N)  long, the stable argsort: the input position the t-th output comes from

Training batches come from `step_generator(seed, step)`, so each step's data is a pure function of
the step. Held-out test sets are fixed per (N, setting) and independent of the training seed, so every
run of every decoder is scored on the same sequences.

>>> from rnnkit.tasks.sort.data import test_set
>>> batch = test_set(n=5, size=2, vocab=128, floats=False)
>>> tuple(batch.inputs.shape), bool((batch.targets == batch.inputs.sort(dim=1).values).all())
((2, 5), True)
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from rnnkit.tasks.base import step_generator

TEST_SEED = 20170827  # a fixed constant, so test sets never depend on a run's --seed


class SortBatch(NamedTuple):
    """Sequences to sort and their answers; see the module docstring for shapes."""

    inputs: Tensor
    targets: Tensor
    order: Tensor


def make_batch(inputs: Tensor) -> SortBatch:
    """Attach the sorted targets and the stable sorting permutation to `inputs` (B, N)."""
    targets, order = torch.sort(inputs, dim=1, stable=True)
    return SortBatch(inputs, targets, order)


def sample(generator: torch.Generator, size: int, n: int, vocab: int, floats: bool) -> SortBatch:
    """`size` random sequences of length `n` drawn from `generator`."""
    if floats:
        inputs = torch.rand(size, n, generator=generator)  # (B, N)
    else:
        inputs = torch.randint(0, vocab, (size, n), generator=generator)  # (B, N)
    return make_batch(inputs)


def draw_length(generator: torch.Generator, n_min: int, n_max: int) -> int:
    """One training length, uniform in [n_min, n_max]."""
    return int(torch.randint(n_min, n_max + 1, (1,), generator=generator))


def test_set(n: int, size: int, vocab: int, floats: bool) -> SortBatch:
    """The fixed held-out set for length `n` in this setting (same sequences for every run)."""
    setting = "floats" if floats else f"int{vocab}"
    return sample(step_generator(TEST_SEED, n, 0, stream=f"test/{setting}"), size, n, vocab, floats)
