"""rnnkit's operators in ONNX: each loop over time as ONNX's own ``LSTM``, ``GRU`` or ``RNN`` node.

``torch.onnx.export(model, args, dynamo=True, custom_translation_table=TRANSLATIONS)`` (or
``rnnkit.core.onnx_ops.export``) writes a model whose recurrent layers run onnxruntime's own
kernels, at any batch size and length. The operators take the input projection ``xz`` (B, T, G*H)
(core/ops.py); ONNX's nodes project their input themselves, so each node gets ``X = xz`` and
``W`` a (G*H, G*H) permutation matrix that also reorders the gates (exact: each product is one term
times 1), ``R = W_hh`` in ONNX's gate order, ``B = [0, b_hh]``, and ``sequence_lens`` counted
from the mask. Gate orders: torch's LSTM ``i, f, g, o`` is ONNX's ``i, o, f, c``; torch's GRU
``r, z, n`` is ONNX's ``z, r, h`` with ``linear_before_reset=1`` (torch's ``n = tanh(x_n + r *
(h W_hn + b_hn))``). ONNX's outputs at padded steps are zero and its final state is each
sequence's own last valid step's, as rnnkit's.

Requires ``onnxscript`` (the ``export`` extra).
"""
from __future__ import annotations

import numpy as np
import torch

# ONNX's gate blocks, each taken from torch's block at this position
_ORDER = {"lstm": [0, 3, 1, 2], "gru": [1, 0, 2], "rnn": [0]}


def _rows(kind: str, H: int) -> np.ndarray:
    return np.concatenate([np.arange(H) + block * H for block in _ORDER[kind]]).astype(np.int64)


def _translation(kind: str):
    from onnxscript import ir
    from onnxscript import opset18 as op

    def translate(xz, w_hh, b_hh, *rest):
        *state, mask, relu = rest
        GH, H = (int(d) for d in w_hh.shape)
        rows = _rows(kind, H)
        perm = np.zeros((1, GH, GH), dtype=np.float32)
        perm[0, np.arange(GH), rows] = 1.0  # W[j, rows[j]] = 1: X W^T picks torch's gate row rows[j]
        W = op.CastLike(op.Constant(value=ir.tensor(perm)), w_hh)
        index = op.Constant(value=ir.tensor(rows))
        R = op.Unsqueeze(op.Gather(w_hh, index, axis=0), op.Constant(value_ints=[0]))
        zeros = op.CastLike(op.Constant(value=ir.tensor(np.zeros(GH, dtype=np.float32))), w_hh)
        Rb = zeros if b_hh is None else op.Gather(b_hh, index, axis=0)
        B = op.Unsqueeze(op.Concat(zeros, Rb, axis=0), op.Constant(value_ints=[0]))
        X = op.Transpose(xz, perm=[1, 0, 2])  # (T, B, G*H)
        lens = None if mask is None else op.ReduceSum(op.Cast(mask, to=ir.DataType.INT32), op.Constant(value_ints=[1]),
                                                      keepdims=0)
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
    return torch.onnx.export(model, args, str(path), dynamo=True, dynamic_shapes=dynamic_shapes,
                             custom_translation_table=table, **kwargs)
