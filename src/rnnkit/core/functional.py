"""Length helpers shared by the layers: validation, masks and length-aware reversal.

Variable length follows flax's ``flip_sequences``: sequence b owns steps ``0 .. lengths[b]-1``
of a batch-first tensor; the rest is padding. Reversing a padded batch reverses each
sequence inside its own length and leaves its padding where it is, so a backward-direction
RNN starts at each sequence's own last valid step.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor


def as_lengths(lengths: Tensor | Sequence[int], batch_size: int, max_len: int, device: torch.device) -> Tensor:
    """Validate ``lengths`` and return it as an int64 tensor (B,) on ``device``."""
    if isinstance(lengths, Tensor):
        if lengths.dtype.is_floating_point or lengths.dtype.is_complex or lengths.dtype == torch.bool:
            raise TypeError(f"lengths must hold integers, got dtype {lengths.dtype}")
        if lengths.dim() != 1:
            raise ValueError(f"lengths must have shape (B={batch_size},), got {tuple(lengths.shape)}")
        values = lengths.to(device=device, dtype=torch.int64)
    else:
        try:
            items = list(lengths)
        except TypeError:
            raise TypeError(f"lengths must be a tensor or a list of ints, got {type(lengths).__name__}") from None
        if not all(isinstance(v, int) and not isinstance(v, bool) for v in items):
            raise TypeError(f"lengths must be a list of ints, got {items!r}")
        values = torch.tensor(items, dtype=torch.int64, device=device)
    if values.shape[0] != batch_size:
        raise ValueError(f"lengths must have shape (B={batch_size},), got {tuple(values.shape)}")
    if torch.compiler.is_compiling():
        # a traced program (torch.compile, torch.export) cannot branch on values it has not seen:
        # the range is checked where the call runs eagerly
        return values
    low, high = int(values.min()), int(values.max())
    if low < 0 or high > max_len:  # 0 is an empty sequence: zero outputs, the initial state
        bad = int(values.argmin()) if low < 0 else int(values.argmax())
        raise ValueError(f"lengths must be in [0, T={max_len}], got {int(values[bad])} at batch index {bad}")
    return values


def length_mask(lengths: Tensor, max_len: int) -> Tensor:
    """(B,) lengths -> (B, T) bool, True at valid steps."""
    return torch.arange(max_len, device=lengths.device)[None, :] < lengths[:, None]


def reverse_padded(x: Tensor, lengths: Tensor | None) -> Tensor:
    """Reverse each sequence of ``x`` (B, T, ...) within its own length; padding stays put.

    >>> x = torch.tensor([[1, 2, 3], [4, 5, 0]])
    >>> reverse_padded(x, torch.tensor([3, 2])).tolist()
    [[3, 2, 1], [5, 4, 0]]
    """
    if lengths is None:
        return x.flip(1)
    B, T = x.shape[:2]
    steps = torch.arange(T, device=x.device)
    mirrored = lengths[:, None] - 1 - steps[None, :]  # (B, T)
    index = torch.where(mirrored >= 0, mirrored, steps[None, :])
    index = index.view(B, T, *([1] * (x.dim() - 2))).expand_as(x)
    return x.gather(1, index)
