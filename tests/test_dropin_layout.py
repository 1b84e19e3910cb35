"""torch.nn's default layout, time-major (T, B, I) input, runs as fast as batch-first: the C++ loops
read and write each step's rows in the input's layout, so no operation copies a whole sequence
from one layout to the other, and the results are the batch-first layer's."""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import rnnkit
from rnnkit.core import native

COPIES = {torch.ops.aten.copy_.default, torch.ops.aten.clone.default, torch.ops.aten._to_copy.default}


class SequenceCopies(TorchDispatchMode):
    """Records every copy of at least ``numel`` numbers (a whole sequence; a state is smaller)."""

    def __init__(self, numel: int):
        super().__init__()
        self.numel, self.seen = numel, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func in COPIES and isinstance(out, torch.Tensor) and out.numel() >= self.numel:
            self.seen.append((str(func), tuple(out.shape)))
        return out


@pytest.mark.parametrize("kind", ["LSTM", "GRU", "RNN"])
def test_time_major_input_runs_without_layout_copies_and_equals_batch_first(kind):
    if native.ops() is None:
        pytest.skip("the C++ loops are not built here")
    T, B, I, H = 5, 3, 4, 6
    torch.manual_seed(0)
    time_major = getattr(rnnkit, kind)(I, H, num_layers=2)  # torch.nn's defaults
    batch_first = getattr(rnnkit, kind)(I, H, num_layers=2, batch_first=True)
    batch_first.load_state_dict(time_major.state_dict())
    x = torch.randn(T, B, I, requires_grad=True)
    g = torch.randn(T, B, H)
    params = list(time_major.parameters())
    for training in (False, True):
        copies = SequenceCopies(T * B * min(I, H))
        with torch.set_grad_enabled(training), copies:
            out, _ = time_major(x)
            grads = torch.autograd.grad(out, [x, *params], g) if training else ()
        assert copies.seen == [], f"{kind}, training={training}: layout copies {copies.seen}"
        assert out.shape == (T, B, H) and out.is_contiguous()
        with torch.set_grad_enabled(training):
            ref, _ = batch_first(x.transpose(0, 1))
            ref_grads = torch.autograd.grad(ref, [x, *batch_first.parameters()], g.transpose(0, 1)) if training else ()
        torch.testing.assert_close(out, ref.transpose(0, 1), rtol=1e-5, atol=1e-6)
        for a, b in zip(grads, ref_grads):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
