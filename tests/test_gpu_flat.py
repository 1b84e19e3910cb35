"""Flat weights for cuDNN: the torch.nn-contract layers hand cuDNN torch.nn's own flat buffer.

``rnnkit.LSTM``, ``GRU`` and ``RNN`` subclass ``torch.nn.RNNBase``, whose ``.to()``/``.cuda()``
(and construction on a device) lays every weight of the stack out in one cuDNN buffer and makes
the parameters views of it (``flatten_parameters``). The torch-kernel route passes cuDNN those
same tensors in the same order, so cuDNN finds them already in one block and copies nothing."""

from __future__ import annotations

import pytest
import torch

import rnnkit
from rnnkit.core.kernels.vendor import _TORCH_ORDER


@pytest.mark.parametrize("make", [rnnkit.LSTM, rnnkit.GRU, rnnkit.RNN])
def test_the_torch_kernel_gets_the_layers_own_weights_in_torchs_order(make):
    layer = make(3, 4, num_layers=2, bidirectional=True)
    params = [c._parameters for c in layer.cells]
    passed = [p[name] for p in params for name in _TORCH_ORDER if p.get(name) is not None]
    assert len(passed) == len(layer._flat_weights)
    assert all(a is b for a, b in zip(passed, layer._flat_weights))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_on_cuda_the_weights_are_one_buffer_and_checkpoints_still_save(tmp_path):
    from rnnkit.engine.checkpoint import load_checkpoint, save_checkpoint

    layer = rnnkit.LSTM(16, 32, num_layers=2, bidirectional=True).cuda()
    assert len({p.untyped_storage().data_ptr() for p in layer.parameters()}) == 1
    x = torch.randn(4, 7, 16, device="cuda")
    out, _ = layer(x)
    out.sum().backward()  # the optimizer's in-place steps keep the views
    with torch.no_grad():
        for p in layer.parameters():
            p.sub_(0.1 * p.grad)
    assert len({p.untyped_storage().data_ptr() for p in layer.parameters()}) == 1
    save_checkpoint(tmp_path / "c.safetensors", dict(layer.state_dict()), {})
    tensors, _ = load_checkpoint(tmp_path / "c.safetensors")
    fresh = rnnkit.LSTM(16, 32, num_layers=2, bidirectional=True).cuda()
    fresh.load_state_dict(tensors)
    torch.testing.assert_close(fresh(x)[0], layer(x)[0])
