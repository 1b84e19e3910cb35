"""Linear recurrences over time: ``h_t = a_t * h_{t-1} + b_t``, all steps at once.

The cells of Feng et al. 2024 ("Were RNNs All We Needed?", minGRU and minLSTM) compute their
coefficients from the input alone, ``a_t = a(x_t)`` in (0, 1) and ``b_t = b(x_t) > 0``, so the
recurrence needs no step's output to compute the next step's gates and the whole sequence is one
scan. Both scans take the initial state ``h0`` (B, H) of any sign and return every step's state
(B, T, H):

- ``scan_log_space``: from the coefficients in log space, ``log_a`` and ``log_b`` (B, T, H), the
  parallel scan of the paper's appendix (Heinsen 2023), no loop over steps. With ``A_t = sum_{s<=t} log a_s``,

      h_t = exp(A_t) * h0 + exp(A_t + logcumsumexp_{s<=t}(log b_s - A_s))

  The first term carries ``h0`` by linearity, so ``h0`` may be negative (the log of a state is only
  ever taken of the positive ``b``'s). ``log b_s - A_s`` grows with ``s`` (``A`` falls), and in
  float32 its rounding error grows with it; the scan therefore runs in chunks of
  ``LOG_SCAN_CHUNK`` steps, each scanned from zero with ``A`` counted from its own start, and the
  chunks' last states are carried into the next chunk by the same linearity (one multiply-add per
  chunk). Plain torch ops, differentiated by autograd.
- ``scan_stepped``: the cells' recurrence ``h_t = (1 - z_t) h_{t-1} + z_t g(v_t)`` stepped, one
  ``lerp`` per step, with a hand-written backward (one reverse recurrence for the adjoint, the
  rest a few passes over all steps at once). On the CPU this is much the faster (see ``scan``).
  For minGRU and minLSTM themselves, where the C++ loops are built, the same recurrence runs in C++
  (``_NativeScan``, core/parallel_scan.cpp) straight from the input projection, the gates' mix
  included: one pass over a step's values forward and one back, no op per step.

Masks: ``mask`` (B, T), True at valid steps; at a padded step the state is carried unchanged
(``a = 1``, ``b = 0``) and the output is zero, exactly as ``rnnkit.core.scan.scan_reference``.

Zoneout (``keep`` (B, T, H) bool, True where a unit keeps its previous state at step t;
``rnnkit.Regularised``, core/kernels/state_noise.py): ``h_t = h_{t-1}`` there, which is the same
linear recurrence with that unit's coefficients ``a = 1, b = 0``, i.e. ``z_t = 0``:

    h_t = (1 - z'_t) h_{t-1} + z'_t g(v_t),    z'_t = z_t (1 - keep_t)

so every form folds the mask into its coefficients before the scan and runs as without it. The
state of these cells is ``h`` alone, and their output is the state, so a kept unit's output is the
kept ``h``, as the reference loop's. The coefficient 0 is selected, never multiplied or logged: in
log space ``log b = log 0`` is the same very negative finite value as at a padded step (``-inf``
would make ``logcumsumexp``'s gradient NaN), and no gradient reaches a kept unit's ``k`` or ``v``.

>>> import torch
>>> log_a, log_b = torch.log(torch.full((1, 3, 1), 0.5)), torch.zeros(1, 3, 1)   # a = 0.5, b = 1
>>> [round(h, 4) for h in scan_log_space(log_a, log_b, torch.zeros(1, 1)).flatten().tolist()]
[1.0, 1.5, 1.75]
"""

from __future__ import annotations

from typing import NamedTuple, cast

import torch
from torch import Tensor
from torch.nn import functional as F

from rnnkit.core import native
from rnnkit.core.cells.mingru import MinGRUCell
from rnnkit.core.cells.minlstm import MinLSTMCell
from rnnkit.core.cells.scan_cell import candidate, log_candidate
from rnnkit.core.gates import GatedCell, HiddenState
from rnnkit.core.kernels.base import transformed
from rnnkit.core.kernels.state_noise import noise_for

LOG_SCAN_CHUNK = 64  # steps per chunk of the log-space scan (its float32 error grows with the chunk)


def masked_coefficients(
    log_a: Tensor, log_b: Tensor, mask: Tensor | None, keep: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """``log_a`` and ``log_b`` (B, T, H) with padded steps (``mask`` (B, T) False) and the units zoneout
    keeps (``keep`` (B, T, H) True) made ``a = 1, b = 0``.

    ``b = 0`` is a very negative finite log rather than ``-inf``: ``logcumsumexp``'s gradient at a
    run of ``-inf`` is NaN, which would reach the valid steps through the chunk's sums."""
    still = _still(mask, keep)
    if still is None:
        return log_a, log_b
    nothing = torch.finfo(log_b.dtype).min / 4  # exp() of it is 0, and sums of a few stay finite
    return log_a.masked_fill(still, 0.0), log_b.masked_fill(still, nothing)


def _still(mask: Tensor | None, keep: Tensor | None) -> Tensor | None:
    """Where the state is carried unchanged (``z = 0``): padded steps (``mask`` (B, T) False) and
    units zoneout keeps (``keep`` (B, T, H) True); (B, T, 1) or (B, T, H) bool, or ``None``."""
    padded = ~mask[:, :, None] if mask is not None else None
    if keep is None:
        return padded
    return keep if padded is None else keep | padded


def scan_log_space(log_a: Tensor, log_b: Tensor, h0: Tensor) -> Tensor:
    """Every ``h_t`` of ``h_t = a_t h_{t-1} + b_t`` (B, T, H) by the chunked log-space scan above."""
    B, T, H = log_a.shape
    C = min(LOG_SCAN_CHUNK, T)
    n = -(-T // C)  # chunks
    pad = n * C - T
    if pad:  # the last chunk filled with steps that change nothing (a = 1, b = 0)
        log_a = F.pad(log_a, (0, 0, 0, pad), value=0.0)
        log_b = F.pad(log_b, (0, 0, 0, pad), value=torch.finfo(log_b.dtype).min / 4)
    log_a = log_a.view(B, n, C, H)
    A = log_a.cumsum(2)  # (B, n, C, H), log of the product of a within the chunk up to each step
    from_zero = torch.exp(A + torch.logcumsumexp(log_b.view(B, n, C, H) - A, dim=2))  # each chunk from h = 0
    decay = torch.exp(A)  # what a chunk's first state becomes by each of its steps
    chunks = []
    h = h0[:, None, :]  # (B, 1, H), the state entering chunk j
    for j in range(n):  # the carry: one multiply-add per chunk
        chunk = torch.addcmul(from_zero[:, j], decay[:, j], h)  # (B, C, H)
        chunks.append(chunk)
        h = chunk[:, -1:]
    return torch.cat(chunks, dim=1)[:, :T]  # (B, T, H)


def log_coefficients(k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
    """``log a = log(1 - z)`` and ``log b = log(z g(v))`` of a ``ParallelScanCell`` from its ``k`` and ``v``."""
    return -F.softplus(k), -F.softplus(-k) + log_candidate(v)


class _StepScan(torch.autograd.Function):
    """``h_t = (1 - z_t) h_{t-1} + z_t g(v_t)``, ``z_t = sigmoid(k_t)``, stepped; the backward by hand.

    The adjoint ``lambda_t = dL/dh_t`` through every path obeys ``lambda_t = grad_t + a_{t+1}
    lambda_{t+1}`` (``a = 1 - z``), one reverse recurrence; with it ``dk_t = lambda_t z_t (g_t - h_t)``
    (``dh_t/dk = z (1 - z) (g - h_{t-1})`` rewritten with ``h_t``), ``dv_t = lambda_t z_t g'(v_t)`` and
    ``dh_0 = a_1 lambda_1``. A padded step, and a unit zoneout keeps, has ``z = 0``: its state is
    carried and its ``k`` and ``v`` get no gradient.

    Every op works on one step's (B, H) slice, inside the loop over time: a step's values are still
    in the cache when the next op reads them, where passes over all (B, T, H) steps at once would
    each stream them from memory (measured 1.4-1.6x faster at B=32, T=1024, H=512)."""

    @staticmethod
    def forward(ctx, k: Tensor, v: Tensor, h0: Tensor, still: Tensor | None) -> Tensor:
        B, T, H = k.shape
        z, g, hs = (torch.empty(B, T, H, dtype=k.dtype, device=k.device) for _ in range(3))
        # still (B, T, 1 or H): where z is 0 (padded, or kept by zoneout)
        valid = (~still).to(k.dtype).unbind(1) if still is not None else [None] * T
        h = h0
        steps = zip(k.unbind(1), v.unbind(1), valid, z.unbind(1), g.unbind(1), hs.unbind(1))
        for k_t, v_t, m_t, z_t, g_t, h_t in steps:
            torch.sigmoid(k_t, out=z_t)
            if m_t is not None:
                z_t.mul_(m_t)  # padded or kept: z = 0 (sigmoid is finite, so 0 exactly), the state carried
            torch.clamp(v_t, max=0, out=g_t).sigmoid_().add_(torch.relu(v_t))  # g(v): sigmoid below 0, v + 1/2 above
            h = torch.lerp(h, g_t, z_t, out=h_t)
        ctx.save_for_backward(z, g, v, hs)
        return hs

    @staticmethod
    def backward(ctx, grad: Tensor):
        z, g, v, hs = ctx.saved_tensors
        T = z.shape[1]
        dk, dv = torch.empty_like(z), torch.empty_like(z)
        lam = grad[:, T - 1].clone()  # (B, H)
        lz = torch.empty_like(lam)
        zl, gl, vl, hl, gradl, dkl, dvl = (t.unbind(1) for t in (z, g, v, hs, grad, dk, dv))
        for t in range(T - 1, -1, -1):
            if t < T - 1:  # lambda_t = grad_t + (1 - z_{t+1}) lambda_{t+1}
                lam.sub_(torch.mul(zl[t + 1], lam, out=lz)).add_(gradl[t])
            torch.mul(lam, zl[t], out=lz)
            torch.sub(gl[t], hl[t], out=dkl[t]).mul_(lz)
            # g'(v) = 1 (v >= 0), sigmoid'(v) = g (1 - g) (v < 0)
            torch.where(vl[t] >= 0, lz, torch.rsub(gl[t], 1).mul_(gl[t]).mul_(lz), out=dvl[t])
        grad_h0 = lam - zl[0] * lam if ctx.needs_input_grad[2] else None
        return dk, dv, grad_h0, None


class _NativeScan(torch.autograd.Function):
    """``_StepScan``'s recurrence for minGRU and minLSTM in C++ (core/parallel_scan.cpp), read from the
    input projection ``xz`` (B, T, G*H) itself: the gates' mix (minLSTM's ``k``), the candidate and the
    recurrence in one pass a step, forward and back, the gradient written straight into ``d xz``.

    A backward that must itself be differentiable (``create_graph``) or that runs under vmap goes
    through the recurrence in torch ops with autograd instead (the same gradients, with a graph)."""

    @staticmethod
    def forward(
        ctx, cell, xz: Tensor, bias: Tensor | None, h0: Tensor, mask: Tensor | None, keep: Tensor | None
    ) -> Tensor:
        B, T, _ = xz.shape
        hs = native.buffer((B, T, h0.shape[1]), xz)
        lstm = type(cell).mix_inputs is MinLSTMCell.mix_inputs
        native.ops().gate_scan_forward(xz, bias, h0, hs, mask, lstm, keep)
        ctx.cell, ctx.mask, ctx.keep, ctx.lstm = cell, mask, keep, lstm
        ctx.save_for_backward(xz, bias, h0, hs)
        return hs

    @staticmethod
    def backward(ctx, grad: Tensor):
        xz, bias, h0, hs = ctx.saved_tensors
        needs = ctx.needs_input_grad[1:4]  # xz, bias, h0
        if torch.is_grad_enabled() or transformed(grad):
            with torch.enable_grad():
                k, v = ctx.cell.mix_inputs(ctx.cell.split(xz if bias is None else xz + bias))
                z, g = torch.sigmoid(k), candidate(v)
                still = _still(ctx.mask, ctx.keep)
                if still is not None:
                    z = z.masked_fill(still, 0.0)  # padded or kept by zoneout: z = 0, the state carried
                h, steps = h0, []
                for z_t, g_t in zip(z.unbind(1), g.unbind(1)):
                    h = torch.lerp(h, g_t, z_t)
                    steps.append(h)
                out = torch.stack(steps, dim=1)
            wanted = [t for t, need in zip((xz, bias, h0), needs) if need]
            got = iter(torch.autograd.grad(out, wanted, grad, create_graph=torch.is_grad_enabled()))
            return None, *(next(got) if need else None for need in needs), None, None
        if grad.stride(-1) not in (0, 1):  # the C++ loop reads rows (or one value a row, as out.sum()'s)
            grad = grad.contiguous()
        dxz, dh0 = native.buffer(xz.shape, xz), torch.empty_like(h0)
        native.ops().gate_scan_backward(xz, bias, h0, hs, grad, dxz, dh0, ctx.mask, ctx.lstm, ctx.keep)
        dbias = dxz.view(-1, dxz.shape[-1]).sum(0) if needs[1] else None
        return None, dxz, dbias, dh0, None, None


def native_scan_runs(cell, xz: Tensor) -> bool:
    """Whether ``_NativeScan`` computes ``cell``'s scan over ``xz``: minGRU or minLSTM (their own
    ``mix_inputs`` and ``split``) where the C++ loops run on ``xz``."""
    mix, split = type(cell).mix_inputs, type(cell).split
    return (
        mix in (MinGRUCell.mix_inputs, MinLSTMCell.mix_inputs)
        and split is GatedCell.split
        and native.ops_for(xz) is not None
        and not _functorch_active()
    )


def _functorch_active() -> bool:
    active = getattr(torch._C, "_are_functorch_transforms_active", None)
    return bool(active and active())


def scan_stepped(k: Tensor, v: Tensor, h0: Tensor, mask: Tensor | None, keep: Tensor | None = None) -> Tensor:
    """Every ``h_t`` of ``h_t = (1 - z_t) h_{t-1} + z_t g(v_t)``, ``z_t = sigmoid(k_t)`` (B, T, H), stepped:
    one ``lerp`` a step, the backward by hand (``_StepScan``). ``k``, ``v`` (B, T, H), ``h0`` (B, H);
    ``mask`` (B, T) and zoneout's ``keep`` (B, T, H) or ``None``."""
    return _StepScan.apply(k, v, h0, _still(mask, keep))


def scan(
    cell,
    xz: Tensor,
    state: HiddenState,
    mask: Tensor | None,
    *,
    log_space: bool | None = None,
    keep: Tensor | None = None,
):
    """``scan_reference(cell, xz, state, mask)`` for a ``ParallelScanCell``, all steps at once.

    ``xz`` (B, T, G*H) is the input projection, ``state`` the cell's ``HiddenState`` (B, H), ``mask``
    (B, T) or ``None``; returns the outputs (B, T, H), zero at padded steps, and the final state
    (each sequence's at its own last valid step). ``keep`` (B, T, H) bool, zoneout's mask in the scan's
    order of steps (True: the unit keeps its previous state), is folded into the coefficients: the
    reference loop with the same zoneout masks.

    ``log_space=None`` picks by device: on the CPU the recurrence is stepped (``scan_stepped``): at
    B=32, T=1024, H=512 (1 thread) its forward and backward took about 1 s against 8.8 s for the
    log-space scan's (``logcumsumexp`` alone takes 1.4 s forward there); elsewhere (CUDA),
    ``scan_log_space``, the parallel form. ``True`` or ``False`` asks for one of them (the tests hold
    both to the reference loop). Stepped, minGRU and minLSTM run in C++ where it is built
    (``native_scan_runs``); a user's ``ParallelScanCell``, or no C++ loops, in torch ops.
    """
    if log_space is None:
        log_space = xz.device.type != "cpu"
    if not log_space and native_scan_runs(cell, xz):
        return scan_native(cell, xz, None, state, mask, keep)
    k, v = cell.mix_inputs(cell.split(xz))
    h0 = state.h.to(k.dtype)
    if log_space:
        hs = scan_log_space(*masked_coefficients(*log_coefficients(k, v), mask, keep), h0)
    else:
        hs = scan_stepped(k, v, h0, mask, keep)  # (B, T, H)
    return _outputs(hs, mask)


def scan_native(
    cell, xz: Tensor, bias: Tensor | None, state: HiddenState, mask: Tensor | None, keep: Tensor | None = None
):
    """``scan``'s stepped form in C++ (``native_scan_runs``); ``xz`` projected without ``bias`` if one is
    given (the loop adds it as it reads)."""
    h0 = state.h.to(xz.dtype).contiguous()
    hs = _NativeScan.apply(cell, xz.contiguous(), bias, h0, _dense(mask), _dense(keep))
    return _outputs(hs, mask)


def _dense(mask: Tensor | None) -> Tensor | None:
    return mask.contiguous() if mask is not None else None


def _outputs(hs: Tensor, mask: Tensor | None) -> tuple[Tensor, HiddenState]:
    """Every step's state (B, T, H) -> the outputs, zero at padded steps, and the final state."""
    final = hs[:, -1]  # a padded step carries the state, so the last step holds each sequence's own
    out = hs * mask[:, :, None] if mask is not None else hs
    return out, HiddenState(final)


def scan_layer(cell, x: Tensor, state: NamedTuple, mask: Tensor | None) -> tuple[Tensor, NamedTuple]:
    """The ``parallel-scan`` route's scan of one (layer, direction): ``x`` (B, T, I) projected in one
    matmul, then ``scan``, with the zoneout mask ``rnnkit.Regularised`` makes current for the cell
    (``noise_for``; the routing table passes a call with recurrent dropout on: these cells' gates read
    no previous output). Under autocast the projection may come back in half precision: the scan
    runs in the weights' dtype."""
    w = cell.weight_ih
    noise = noise_for(cell)
    keep = noise.zoneout.to(torch.bool) if noise is not None and noise.zoneout is not None else None
    if native_scan_runs(cell, x) and type(cell).project_input is GatedCell.project_input:
        # projected without the bias, which the loop adds as it reads: addmm would first copy it
        # into every row of the (B, T, G*H) result, a pass over it as long as the loop's own
        xz = F.linear(x, w).to(w.dtype)
        return scan_native(cell, xz, cell.bias_ih, cast(HiddenState, state), mask, keep)
    xz = cell.project_input(x)  # (B, T, G*H)
    # the route's cells (scan_cell.ScanCell) carry a HiddenState
    return scan(cell, xz.to(w.dtype), cast(HiddenState, state), mask, keep=keep)
