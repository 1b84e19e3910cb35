"""A cell's loop over time on CUDA: the recurrent matmul in torch, the pointwise step as one Triton kernel.

Per step ``t``, forward::

    hz_t = h_{t-1} W_hh^T + b_hh                     one matmul (cuBLAS), in the compute dtype
    out_t, state_t = program(xz_t, hz_t, state_{t-1})  one Triton launch (triton_pointwise.py)

and back through time one launch of the program's derivative and ``dh_{t-1} += dhz_t W_hh``; the
weight gradients are one matmul over all steps. ``program`` is the cell's ``combine`` compiled by
core/pointwise.py, the program the CPU's ``cpp-compiled`` route runs: a user's cell, and the
built-in LSTM and GRU, whose ``combine`` compiles too.

Precision: the compute dtype is ``xz``'s (under CUDA autocast bf16 or fp16, the projection's
output; else the weights' dtype). The matmuls run in it (accumulating in float32, as cuBLAS does
for half precision); the pointwise math runs in float32 (float64 for float64), and the state
carried from step to step is float32, so a bf16 recurrence does not round its cell state at every
step. Outputs and the returned state come back in the compute dtype, as torch.nn's LSTM under
autocast returns them.

Masks (B, T) follow ``scan_reference``: the compiled program's masked variant keeps a padded
row's state and writes a zero output.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from rnnkit.core import pointwise
from rnnkit.core.gates import GatedCell
from rnnkit.core.kernels import triton_pointwise as tp
from rnnkit.core.kernels.base import Kernel
from rnnkit.core.kernels.dispatch import FusedScan


def _acc(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


class TritonLoop(Kernel):
    """One cell's compiled programs (``pointwise.compiled``) run over time, one Triton launch a step."""

    dense_inputs = False  # rows are read through their strides

    def __init__(self, compiled: pointwise.Compiled):
        self.compiled = compiled

    def _step(self, masked: bool, S: int, dtype: torch.dtype, backward: bool):
        acc = tp.acc_name(dtype)
        if not backward:
            return tp.kernel(self.compiled.forward[masked], 2 + S + masked, 1 + S, acc)
        # outputs d xz, d hz, d state: where ``shared`` the program writes no d hz, its slot stays
        return tp.kernel(self.compiled.backward[masked], 2 + S + masked + 1 + S, 2 + S, acc)

    def forward(self, cell, xz, w_hh, b_hh, state, mask, training):
        B, T, GH = xz.shape
        H = w_hh.shape[1]
        dtype, acc = xz.dtype, _acc(xz.dtype)
        if xz.stride(-1) != 1:
            xz = xz.contiguous()
        w = w_hh.to(dtype).t()  # (H, G*H)
        b = b_hh.to(dtype) if b_hh is not None else None
        masked = mask is not None
        step = self._step(masked, len(state), dtype, backward=False)
        rows = T + 1 if training else 2  # inference: step t's state in row t % 2
        hs = [torch.empty(rows, B, H, dtype=acc, device=xz.device) for _ in state]
        for h, s in zip(hs, state):
            h[0] = s
        out = torch.empty(B, T, H, dtype=dtype, device=xz.device)
        hz = torch.empty(T if training else 1, B, GH, dtype=dtype, device=xz.device)
        m = mask.to(acc) if masked else None  # (B, T): the programs' mask, a number per row
        for t in range(T):
            now, nxt = t % rows, (t + 1) % rows
            hz_t = hz[t if training else 0]
            h_prev = hs[0][now] if dtype == acc else hs[0][now].to(dtype)
            if b is None:
                torch.mm(h_prev, w, out=hz_t)
            else:
                torch.addmm(b, h_prev, w, out=hz_t)
            column = [m[:, t : t + 1]] if m is not None else []
            tp.launch(step, [xz[:, t], hz_t, *(h[now] for h in hs), *column], [out[:, t], *(h[nxt] for h in hs)], H)
        final = tuple(h[T % rows] for h in hs)
        return out, final, ((xz, hz, hs, m) if training else None)

    def backward(self, cell, saved, w_hh, mask, grad_out, grad_state, needs):
        xz, hz, hs, m = saved
        T, B, GH = hz.shape
        H, S = hs[0].shape[-1], len(hs)
        dtype, acc = hz.dtype, hs[0].dtype
        masked = m is not None
        shared = self.compiled.shared[masked]  # d hz_t = d xz_t: not written
        step = self._step(masked, S, dtype, backward=True)
        w = w_hh.to(dtype)  # (G*H, H)
        dxz = torch.empty(B, T, GH, dtype=dtype, device=hz.device)
        dhz = None if shared else torch.empty(T, B, GH, dtype=dtype, device=hz.device)
        d = [
            torch.zeros(B, H, dtype=acc, device=hz.device)
            if g is None
            else g.to(acc, memory_format=torch.contiguous_format).clone()
            for g in grad_state
        ]  # updated in place, step by step: at the end the initial state's gradients
        if grad_out is None:
            no_grad_out = torch.zeros(B, H, dtype=dtype, device=hz.device)
        elif grad_out.stride(-1) != 1:
            grad_out = grad_out.contiguous()
        for t in range(T - 1, -1, -1):
            g_t = no_grad_out if grad_out is None else grad_out[:, t]
            column = [m[:, t : t + 1]] if m is not None else []
            dz_t = dxz[:, t]
            written = [dz_t, dz_t if dhz is None else dhz[t]]  # shared: the second slot is not written
            tp.launch(step, [xz[:, t], hz[t], *(h[t] for h in hs), *column, g_t, *d], [*written, *d], H)
            dh_z = dz_t if dhz is None else dhz[t]
            if dtype == acc:
                d[0].addmm_(dh_z, w)
            else:
                d[0].add_(torch.mm(dh_z, w))
        dw = db = None
        if needs["w"] or needs["b"]:
            wd = w_hh.dtype
            if dhz is None:  # batch-major d xz (B, T, G*H) against h_0 .. h_{T-1} batch-major
                flat = dxz.reshape(B * T, GH).to(wd)
                h_prev = hs[0][:-1].transpose(0, 1).reshape(B * T, H)
            else:
                flat = dhz.reshape(T * B, GH).to(wd)
                h_prev = hs[0][:-1].reshape(T * B, H)
            dw = flat.t().mm(h_prev.to(wd)) if needs["w"] else None
            db = flat.sum(0) if needs["b"] else None
        return dxz, dw, db, tuple(d)


_loops: dict[int, TritonLoop] = {}


def loop_for(compiled: pointwise.Compiled) -> TritonLoop:
    """The kernel for ``compiled`` (one per program object: the kernels inside are cached by source)."""
    loop = _loops.get(id(compiled))
    if loop is None or loop.compiled is not compiled:
        loop = _loops[id(compiled)] = TritonLoop(compiled)
        if len(_loops) > 2 * pointwise.CACHE_SIZE:
            _loops.pop(next(iter(_loops)))
    return loop


def scan_triton(cell: GatedCell, x: Tensor, state: NamedTuple, mask: Tensor | None):
    """The ``triton-loops`` route's scan: ``cell.project_input(x)`` (in autocast's dtype where it is on),
    then the loop over time (``TritonLoop``); outputs (B, T, H) and the final state."""
    compiled = pointwise.compiled(cell)
    if compiled is None:
        raise ValueError(f"{type(cell).__name__}'s combine does not compile (core/pointwise.py)")
    kernel = loop_for(compiled)
    xz = cell.project_input(x)  # (B, T, G*H)
    dtype = xz.dtype
    parts = tuple(s.to(_acc(dtype)) for s in state)
    w_hh, b_hh = cell.weight_hh, cell.bias_hh
    tensors = (xz, w_hh, b_hh, *parts)
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors):
        out, *final = FusedScan.apply(kernel, cell, mask, None, xz, w_hh, b_hh, *parts)  # None: no state noise
    else:
        with torch.no_grad(), torch.autocast(xz.device.type, enabled=False):
            out, final, _ = kernel.forward(cell, xz, w_hh, b_hh, cell.State(*parts), mask, False)
    return out, cell.State(*(s.to(dtype) if s.dtype != dtype else s.clone() for s in final))
