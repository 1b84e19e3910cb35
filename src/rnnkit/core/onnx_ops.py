"""rnnkit's operators in ONNX: each loop over time as ONNX's own ``LSTM``, ``GRU`` or ``RNN`` node.

``torch.onnx.export(model, args, dynamo=True, custom_translation_table=TRANSLATIONS)`` (or
``rnnkit.core.onnx_ops.export``) writes a model whose recurrent layers run onnxruntime's own
kernels, at any batch size and length. The inference operators take the layer's input and
``W_ih`` (core/ops.py), as ONNX's nodes do: each node gets ``X = x``, ``W = W_ih`` and ``R = W_hh``
in ONNX's gate order, ``B = [b_ih, b_hh]``, and ``sequence_lens`` counted from the mask. Gate
orders: torch's LSTM ``i, f, g, o`` is ONNX's ``i, o, f, c``; torch's GRU ``r, z, n`` is ONNX's
``z, r, h`` with ``linear_before_reset=1`` (torch's ``n = tanh(x_n + r * (h W_hn + b_hn))``).
ONNX's outputs at padded steps are zero and its final state is each sequence's own last valid
step's, as rnnkit's.

Requires ``onnxscript`` (the ``export`` extra).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

# ONNX's gate blocks, each taken from torch's block at this position
_ORDER = {"lstm": [0, 3, 1, 2], "gru": [1, 0, 2], "rnn": [0]}


def _rows(kind: str, H: int) -> np.ndarray:
    return np.concatenate([np.arange(H) + block * H for block in _ORDER[kind]]).astype(np.int64)


def _translation(kind: str):
    from onnxscript import ir, opset18

    # opset18's signatures type each input by ONNX element type (FLOAT, INT64, ...); a translation
    # function receives untyped graph values, which those signatures cannot describe
    op: Any = opset18

    def translate(x, w_ih, b_ih, w_hh, b_hh, *rest):
        *state, mask, relu = rest
        GH, H = (int(d) for d in w_hh.shape)
        index = op.Constant(value=ir.tensor(_rows(kind, H)))
        W = op.Unsqueeze(op.Gather(w_ih, index, axis=0), op.Constant(value_ints=[0]))
        R = op.Unsqueeze(op.Gather(w_hh, index, axis=0), op.Constant(value_ints=[0]))
        zeros = op.CastLike(op.Constant(value=ir.tensor(np.zeros(GH, dtype=np.float32))), w_hh)
        Wb, Rb = (zeros if b is None else op.Gather(b, index, axis=0) for b in (b_ih, b_hh))
        B = op.Unsqueeze(op.Concat(Wb, Rb, axis=0), op.Constant(value_ints=[0]))
        X = op.Transpose(x, perm=[1, 0, 2])  # (T, B, I)
        lens = (
            None
            if mask is None
            else op.ReduceSum(op.Cast(mask, to=ir.DataType.INT32), op.Constant(value_ints=[1]), keepdims=0)
        )
        initial = [op.Unsqueeze(s, op.Constant(value_ints=[0])) for s in state]
        if kind == "lstm":
            Y, Y_h, Y_c = op.LSTM(X, W, R, B, lens, initial[0], initial[1], hidden_size=H)
            finals = [Y_h, Y_c]
        elif kind == "gru":
            Y, Y_h = op.GRU(X, W, R, B, lens, initial[0], hidden_size=H, linear_before_reset=1)
            finals = [Y_h]
        else:
            activation = "Relu" if relu else "Tanh"
            Y, Y_h = op.RNN(X, W, R, B, lens, initial[0], hidden_size=H, activations=[activation])
            finals = [Y_h]
        out = op.Transpose(op.Squeeze(Y, op.Constant(value_ints=[1])), perm=[1, 0, 2])  # (B, T, H)
        return (out, *(op.Squeeze(f, op.Constant(value_ints=[0])) for f in finals))

    return translate


def translations() -> dict:
    """``custom_translation_table`` for ``torch.onnx.export(dynamo=True)``: rnnkit's inference
    operators as ONNX's LSTM, GRU and RNN nodes."""
    from rnnkit.core import ops  # noqa: F401 - defines torch.ops.rnnkit

    return {getattr(torch.ops.rnnkit, f"{kind}_scan").default: _translation(kind) for kind in _ORDER}


def export(model: torch.nn.Module, args: tuple, path, *, dynamic_shapes=None, **kwargs):
    """``torch.onnx.export(model, args, path, dynamo=True)`` with rnnkit's translations; returns the
    ONNXProgram. ``dynamic_shapes`` as for ``torch.export.export``."""
    table = {**translations(), **kwargs.pop("custom_translation_table", {})}
    # without gradients: the exporter's passes run the program, and a loop's (``scan``'s) body
    # would otherwise be traced again with its backward, for nothing (an ONNX model is inference)
    with torch.no_grad():
        return torch.onnx.export(
            model, args, str(path), dynamo=True, dynamic_shapes=dynamic_shapes, custom_translation_table=table, **kwargs
        )
