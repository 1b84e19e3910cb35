"""A user's cell whose ``combine`` compiles (core/pointwise.py), run over time in C++ (``pointwise_scan``).

The generic kernel's work without autograd: per step the blocked recurrent matmul and one pass of
the compiled ``combine``; back through time one pass of its derivative and ``dh += dz W_hh``. The
states of every step are kept (the derivative recomputes the gates from them and ``hz``). CPU,
float32 and float64, where the C++ loops are built.
"""

from __future__ import annotations

from torch import Tensor

from rnnkit.core import native, pointwise
from rnnkit.core.gates import GatedCell
from rnnkit.core.kernels.base import (
    Kernel,
    backward_noise,
    grad_in,
    grad_rows,
    native_loop,
    native_weight_grads,
    noise_args,
    states_rows,
    weight_grads,
)


def program_gates(cell: GatedCell) -> int:
    """The gate count ``pointwise_scan`` takes a user's cell's weights packed for: the cell's own where
    the blocked matmul has a register tile for it (3 or 4 gates: more rows' products share each load
    of ``x``), else 1. The (B, G*H) products come out the same either way."""
    return cell.num_gates if cell.num_gates in (3, 4) else 1


def compiled_loop(
    compiled, x: Tensor, w_ih_packed, b_ih, w_hh, b_hh, state, mask, training: bool, *, packed_hh, noise=None
):
    """A cell's ``compiled`` combine over T steps in C++ (``pointwise_scan``): ``x`` is xz (B, T, G*H),
    or with ``w_ih_packed`` the input (B, T, I), projected per step; ``packed_hh``: ``w_hh`` (G*H, H)
    packed, both weights for ``program_gates(cell)`` gates. Returns the outputs (B, T, H), the final
    state's parts and, in training, what backward needs. ``noise``: zoneout and recurrent dropout
    (kernels/state_noise.py), applied by the loop around the program."""
    B, T = x.shape[0], x.shape[1]
    GH, H = w_hh.shape
    hs = [states_rows(s, T, training) for s in state]  # inference: step t's state in row t % 2
    out = native.buffer((B, T, H), x)
    hz = native.buffer((T, B, GH), x) if training else None
    masked = mask is not None
    m = mask.to(x.dtype).contiguous() if masked else None  # the programs' mask: a number per row
    fold = compiled.shared[masked]  # hz_t keeps xz_t + hz_t, and xz need not be kept
    extra = noise_args(noise, hs[0][0])
    native_loop(
        "pointwise_scan",
        *compiled.forward[masked],
        x.contiguous(),
        w_ih_packed,
        b_ih,
        packed_hh,
        b_hh,
        GH,
        hs,
        out,
        hz,
        m,
        fold,
        noise=extra,
    )
    final = tuple(h[T % h.shape[0]] for h in hs)
    return out, final, ((None if fold else x, hz, hs, m, *backward_noise(extra)) if training else None)


class CompiledKernel(Kernel):
    """The generic kernel's twin for one cell's compiled programs (``pointwise.compiled``)."""

    def __init__(self, compiled: pointwise.Compiled):
        self.compiled = compiled

    def forward(self, cell, xz, w_hh, b_hh, state, mask, training, noise=None):
        packed_hh = native.ops().pack_linear(w_hh, program_gates(cell))
        return compiled_loop(
            self.compiled, xz, None, None, w_hh, b_hh, state, mask, training, packed_hh=packed_hh, noise=noise
        )

    def backward(self, cell, saved, w_hh, mask, grad_out, grad_state, needs):
        xz, hz, hs, m, *noise = saved  # xz None: hz holds xz + hz (folded)
        extra = noise[0] if noise else {}
        ops, masked, compiled = native.ops(), mask is not None, self.compiled  # the forward's programs
        T, B, GH = hz.shape
        dxz = native.buffer((B, T, GH), hz)
        dhz = None if compiled.shared[masked] else native.buffer(hz.shape, hz)  # else d hz = d xz
        d = [grad_in(g, h[0]) for g, h in zip(grad_state, hs)]  # updated in place: the initial state's
        native_loop(
            "pointwise_scan_backward",
            *compiled.backward[masked],
            xz,
            hz,
            hs,
            m,
            grad_rows(grad_out),
            ops.pack_linear(w_hh.t()),
            d,
            dxz,
            dhz,
            noise=extra,
        )
        r = extra.get("r")
        if dhz is None:
            dw, db = native_weight_grads(dxz, hs[0], needs, r)
        else:
            h_prev = hs[0][:-1] if r is None else hs[0][:-1] * r
            dw, db = weight_grads(dhz, h_prev, needs["w"], needs["b"])
        return dxz, dw, db, tuple(d)
