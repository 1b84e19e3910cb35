"""What every kernel shares: the kernel contract, buffers, masks and the batched weight gradients.

A kernel runs one cell kind over time for one (layer, direction): a Python loop
(``python_loops.py``), a C++ loop (``cpp_loops.py``), a user's compiled cell (``compiled.py``) or
the generic autograd loop (``generic.py``). ``dispatch.py`` wraps any of them in one autograd
Function; ``table.py`` says which cell gets which. This floor imports none of them.
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor

from rnnkit.core import native

# -- buffers shared by the loops ---------------------------------------------------------------------------------


def time_major_rows(x: Tensor) -> bool:
    """Whether ``x`` (B, T, W) is the transpose of a contiguous (T, B, W) (and not also contiguous):
    what a layer fed torch.nn's default time-major input runs on. The C++ loops read and write such
    rows in place, and the buffers made for them (``rows_buffer``) keep the layout, so a time-major
    stack runs with no layout copies."""
    return not x.is_contiguous() and x.transpose(0, 1).is_contiguous()


def rows_buffer(like: Tensor, width: int) -> Tensor:
    """A (B, T, ``width``) workspace buffer (``native.buffer``) in ``like``'s layout: batch-major,
    or time-major where ``like`` is (``time_major_rows``)."""
    B, T = like.shape[0], like.shape[1]
    if time_major_rows(like):
        return native.buffer((T, B, width), like).transpose(0, 1)
    return native.buffer((B, T, width), like)


def flat_rows(x: Tensor) -> Tensor:
    """(B, T, W) -> (B*T, W) in memory order: a view for a batch-major or time-major ``x``
    (time-major rows come out ordered by step, then sequence)."""
    if time_major_rows(x):
        return x.transpose(0, 1).reshape(-1, x.shape[-1])
    return x.reshape(-1, x.shape[-1])


def prev_states_rows(hs: Tensor, like: Tensor) -> Tensor:
    """h_0 .. h_{T-1} of the time-major states ``hs`` (T+1, B, H) as (B*T, H), row for row with
    ``flat_rows(like)``: a view where ``like`` is time-major, else a batch-major copy."""
    if time_major_rows(like):
        return hs[:-1].reshape(-1, hs.shape[-1])
    return batch_major_states(hs)


def time_major(xz: Tensor, b_hh: Tensor | None) -> Tensor:
    """(B, T, G*H) -> a fresh contiguous (T, B, G*H), with ``b_hh`` added if given."""
    B, T, GH = xz.shape
    out = torch.empty(T, B, GH, dtype=xz.dtype, device=xz.device)
    if b_hh is None:
        out.copy_(xz.transpose(0, 1))
    else:
        torch.add(xz.transpose(0, 1), b_hh, out=out)
    return out


def mask_parts(mask: Tensor | None, dtype) -> tuple[Tensor | None, Tensor | None]:
    """(B, T) bool -> time-major (T, B, 1) bool and the same as ``dtype`` (or ``None, None``)."""
    if mask is None:
        return None, None
    m = mask.t().unsqueeze(-1).contiguous()  # (T, B, 1)
    return m, m.to(dtype)


def grad_out_time_major(grad_out: Tensor | None, like: Tensor, mf: Tensor | None) -> Tensor:
    """Output gradient (B, T, H) -> (T, B, H), zero at padded steps (outputs there are constant zero)."""
    if grad_out is None:
        return torch.zeros_like(like)
    g = grad_out.transpose(0, 1)
    return g * mf if mf is not None else g


def weight_grads(dz: Tensor, h_prev: Tensor | None, need_w: bool, need_b: bool):
    """``dW = dz^T h_prev`` and ``db = sum dz`` over all steps at once; dz (T, B, G*H) and h_prev (T, B, H),
    or both batch-major (``h_prev`` may be None when ``need_w`` is False)."""
    flat = dz.reshape(-1, dz.shape[-1])
    dw = None
    if need_w:
        assert h_prev is not None, "need_w asks for h_prev"
        dw = flat.t().mm(h_prev.reshape(-1, h_prev.shape[-1]))
    db = flat.sum(0) if need_b else None
    return dw, db


# -- the kernel contract --------------------------------------------------------------------


class Kernel:
    """One cell kind's loop over time, forward and backward, in a common signature.

    ``forward(cell, xz, w_hh, b_hh, state, mask, training)``: ``xz`` (B, T, G*H) the input
    projection of every step, ``state`` the cell's initial state of (B, H) parts, ``mask`` (B, T)
    bool or ``None``; returns the outputs (B, T, H), the final state's parts and what backward
    needs (``None`` in inference). ``backward(cell, saved, w_hh, mask, grad_out, grad_state,
    needs)`` returns ``d xz``, ``d W_hh``, ``d b_hh`` and the initial state's gradients.
    ``dense_inputs``: whether ``xz`` and ``mask`` must be contiguous (the loops read rows directly);
    ``time_major_ok``: whether a time-major ``xz`` (``time_major_rows``) may stay as it is (the
    kernel's buffers then follow its layout, ``rows_buffer``).
    """

    dense_inputs = True
    time_major_ok = False

    def forward(self, cell, xz, w_hh, b_hh, state, mask, training):
        raise NotImplementedError

    def backward(self, cell, saved, w_hh, mask, grad_out, grad_state, needs):
        raise NotImplementedError


def batch_major(result):
    """A Python loop's (T, B, H) outputs -> (B, T, H), contiguous as torch.nn returns them."""
    out, final, saved = result
    return out.transpose(0, 1).contiguous(), final, saved


def states_rows(first: Tensor, T: int, training: bool) -> Tensor:
    """(T+1, B, H) buffer for h_0 .. h_T (or c), h_0 filled in; in inference, where backward needs
    none of them, (2, B, H) with h_t in row t % 2 (the C++ loops' layout): less memory to touch."""
    hs = native.buffer((T + 1 if training else 2, *first.shape), first)
    hs[0] = first
    return hs


def grad_in(grad: Tensor | None, like: Tensor) -> Tensor:
    """An incoming state gradient as a fresh contiguous buffer the C++ loop may update in place."""
    return (
        torch.zeros_like(like, memory_format=torch.contiguous_format)
        if grad is None
        else grad.clone(memory_format=torch.contiguous_format)
    )


def grad_rows(grad_out: Tensor | None) -> Tensor | None:
    """The output gradient (B, T, H) with a contiguous last dimension (what the C++ loops read)."""
    if grad_out is None or grad_out.stride(-1) == 1:
        return grad_out
    return native.buffer(grad_out.shape, grad_out).copy_(grad_out)


def batch_major_states(hs: Tensor) -> Tensor:
    """h_0 .. h_{T-1} of the time-major states ``hs`` (T+1, B, H) as a batch-major (B*T, H) copy,
    row for row with a batch-major ``dxz``."""
    T, B, H = hs.shape[0] - 1, hs.shape[1], hs.shape[2]
    return native.buffer((B, T, H), hs).copy_(hs[:-1].transpose(0, 1)).view(B * T, H)


def native_weight_grads(dhz: Tensor, hs: Tensor, needs: dict, r: Tensor | None = None):
    """``weight_grads`` for ``dhz`` (B, T, G*H), batch-major or time-major, and the time-major states
    ``hs`` (T+1, B, H); with the recurrent dropout mask ``r`` (B, H) (batch-major ``dhz`` only), each
    h_{t-1} times it (what the recurrent product read)."""
    h_prev = None
    if needs["w"]:
        h_prev = prev_states_rows(hs, dhz) if r is None else dropped_states(hs, r)
    return weight_grads(flat_rows(dhz), h_prev, needs["w"], needs["b"])


def dropped_states(hs: Tensor, r: Tensor | None) -> Tensor:
    """``batch_major_states(hs)``, each row times its sequence's recurrent dropout mask ``r`` (B, H) if given."""
    rows = batch_major_states(hs)
    if r is not None:
        T, B, H = hs.shape[0] - 1, hs.shape[1], hs.shape[2]
        rows.view(B, T, H).mul_(r.unsqueeze(1))
    return rows


def noise_args(noise, h0: Tensor) -> dict:
    """The C++ loops' keywords for zoneout and recurrent dropout (kernels/state_noise.py's ``StateNoise``):
    ``r`` (B, H) and ``hd`` (2, B, H) with ``h_0 * r`` in row 0, ``keep`` (B, T, H) bool;
    empty without noise. The backward ops take ``r`` and ``keep``."""
    if noise is None:
        return {}
    args: dict[str, Tensor] = {}
    if noise.recurrent is not None:
        r = noise.recurrent.to(h0.dtype).contiguous()
        hd = native.buffer((2, *h0.shape), h0)
        torch.mul(h0, r, out=hd[0])
        args.update(r=r, hd=hd)
    if noise.zoneout is not None:
        args["keep"] = noise.zoneout.to(torch.bool).contiguous()  # as drawn: no copy
    return args


# -- backward by autograd (a differentiable backward, or one under vmap) ----------------------------------------


def transformed(*grads) -> bool:
    """Whether a backward runs under vmap (functorch's, or the legacy one gradcheck uses)."""
    active = getattr(torch._C, "_are_functorch_transforms_active", None)
    if active and active():
        return True
    fx = torch._C._functorch
    return any(g is not None and (fx.is_batchedtensor(g) or fx.is_legacy_batchedtensor(g)) for g in grads)


def grads_through(results, grad_results, inputs, needs) -> list[Tensor | None]:
    """The gradients of ``inputs`` (``None`` where ``needs`` says none is wanted or the input is
    ``None``) of ``results`` recomputed with a graph (an autograd Function's outputs) against
    their incoming gradients ``grad_results`` (``None`` where none reached), with a graph when grad
    mode is on: an autograd Function's backward by autograd."""
    pairs = [(r, g) for r, g in zip(results, grad_results) if g is not None]
    needed = [i for i, t in enumerate(inputs) if t is not None and needs[i]]
    grads: list[Tensor | None] = [None] * len(inputs)
    if pairs and needed:
        got = torch.autograd.grad(
            [r for r, _ in pairs],
            [inputs[i] for i in needed],
            [g for _, g in pairs],
            create_graph=torch.is_grad_enabled(),
            allow_unused=True,
        )
        for i, g in zip(needed, got):
            grads[i] = g
    return grads


# the C++ loops that apply zoneout and recurrent dropout (each the loop of the same name without
# ``_noisy`` and the masks r, hd, keep: native.h's Noise; the layer-normalised cells' in layernorm.cpp);
# CPU kernels only, their fakes below
NOISY_OPS = (
    *(
        f"{cell}_{way}_noisy"
        for cell in ("lstm", "gru", "rnn", "slstm", "ln_lstm", "ln_gru")
        for way in ("forward", "backward")
    ),
    "pointwise_scan_noisy",
    "pointwise_scan_backward_noisy",
)


@functools.cache
def noisy_ops():
    """``native.ops()`` with fake kernels for the ``NOISY_OPS`` (they write their buffers and return
    nothing), so that torch.library.opcheck and fake tensors see them as custom ops."""
    ops = native.ops()
    for name in NOISY_OPS:
        torch.library.register_fake(f"rnnkit_native::{name}")(_writes_only)
    return ops


def _writes_only(*args, **kwargs) -> None:
    return None


def native_loop(name: str, *args, noise: dict) -> None:
    """Call the C++ loop ``name`` (an op of native.cpp or pointwise.cpp) with ``args``, or, with
    ``noise`` (``noise_args`` or its ``backward_noise``), its ``name_noisy`` twin that applies it:
    the loops without the masks keep their schemas (core/ops.cpp calls them)."""
    if not noise:
        getattr(native.ops(), name)(*args)
        return
    ops = noisy_ops()
    keys = ("r", "keep") if name.endswith("backward") else ("r", "hd", "keep")
    getattr(ops, f"{name}_noisy")(*args, **{k: noise.get(k) for k in keys})


def backward_noise(args: dict) -> tuple:
    """What a kernel keeps for its backward of the forward's ``noise_args``: the backward ops' keywords,
    as one more item of its saved tuple, or nothing (the saved tuple as without noise, which core/ops.py
    reads)."""
    kept = {k: v for k, v in args.items() if k != "hd"}
    return (kept,) if kept else ()
