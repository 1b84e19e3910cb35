"""The benchmark itself: grid, timing loop, table and JSON (see the package docstring)."""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import platform
import statistics
import time
from dataclasses import asdict, dataclass, replace

import torch

import rnnkit
from rnnkit.core import native, routing
from rnnkit.core.cells.lstm import LSTMCell, LSTMState
from rnnkit.core.kernels.generic import onednn_matmul_works

INPUT = 128
TORCH = {"lstm": torch.nn.LSTM, "gru": torch.nn.GRU, "rnn": torch.nn.RNN}
GATES = {"lstm": 4, "gru": 3, "rnn": 1}


class UserLSTMCell(LSTMCell):
    """The LSTM as a user would write it from gates: its own ``combine``, so the generic fused kernel."""

    def combine(self, x, h, state):
        i, f, o = (torch.sigmoid(a + b) for a, b in ((x.i, h.i), (x.f, h.f), (x.o, h.o)))
        c = f * state.c + i * torch.tanh(x.g + h.g)
        h_new = o * torch.tanh(c)
        return h_new, LSTMState(h_new, c)


@dataclass
class Row:
    kind: str  # lstm, gru, rnn
    mode: str  # train (forward+backward) or infer (forward under no_grad)
    batch: int
    hidden: int
    steps: int
    torch_ms: float  # median over repeats
    rnnkit_ms: float
    ratio: float  # torch_ms / rnnkit_ms: above 1 means rnnkit is faster
    ratio_q1: float  # the middle half of the alternated pairs' ratios (torch / rnnkit, call by
    ratio_q3: float  # call): how far the machine's noise moved this point
    gflops: float  # rnnkit's matmul GFLOP/s
    peak_frac: float  # gflops / measured matmul peak
    route: str = ""  # the route rnnkit's call took (rnnkit.explain; core/routing.py)


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


# A point's repeats cover at least this many seconds of calls (both sides together), up to
# MAX_REPEATS: the median of five calls of a millisecond moved by 2-3x with the machine's noise.
MIN_SECONDS = 0.5
MAX_REPEATS = 100


def compare(fn_a, fn_b, repeats: int) -> tuple[float, float, tuple[float, float]]:
    """Median seconds of ``fn_a`` and ``fn_b``, alternated (order swapped each repeat) after a warm-up:
    ``repeats`` of each, or more where a call is short (``MIN_SECONDS``). Also the first and third
    quartiles of the pairs' ratios a/b (a repeat's two calls ran next to each other, so the spread
    of their ratio is the noise that did not cancel)."""
    fn_a(), fn_b()
    once = _timed(fn_a) + _timed(fn_b)
    if repeats > 1:
        repeats = max(repeats, min(MAX_REPEATS, math.ceil(MIN_SECONDS / max(once, 1e-9))))
    a, b = [], []
    for r in range(repeats):
        if r % 2:
            b.append(_timed(fn_b))
            a.append(_timed(fn_a))
        else:
            a.append(_timed(fn_a))
            b.append(_timed(fn_b))
    return statistics.median(a), statistics.median(b), _quartiles([x / y for x, y in zip(a, b)])


def _quartiles(values: list[float]) -> tuple[float, float]:
    if len(values) < 2:
        return values[0], values[0]
    q1, _, q3 = statistics.quantiles(values, n=4, method="inclusive")
    return q1, q3


def matmul_peak(n: int = 2048, repeats: int = 3) -> dict:
    """GFLOP/s of an n^3 float32 matmul, best of ``repeats``, through torch's BLAS (``a @ b``),
    oneDNN's matmul where torch has it, and rnnkit's own blocked matmul (native.cpp, the one its
    C++ loops run) where it is built; the peak is the fastest of them."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    ways = {"blas": lambda: a @ b}
    if onednn_matmul_works():
        packed = torch.ops.mkldnn._reorder_linear_weight(b.t().contiguous(), n)
        ways["onednn"] = lambda: torch.ops.mkldnn._linear_pointwise(a, packed, None, "none", [], "")
    if native.ops() is not None:
        b_t = b.t().contiguous()
        ways["rnnkit"] = lambda: native.ops().linear_blocks(a, b_t, None)
    result = {}
    for name, fn in ways.items():
        fn()
        result[name] = 2 * n**3 / min(_timed(fn) for _ in range(repeats)) / 1e9
    result["peak"] = max(result.values())
    return result


def _train(model, x):
    """Forward and backward, the input's gradient included where ``x`` requires one (the grid's does)."""

    def run():
        for p in model.parameters():
            p.grad = None
        x.grad = None
        out, _ = model(x)
        out.sum().backward()

    return run


def _infer(model, x):
    def run():
        with torch.no_grad():
            model(x)

    return run


def grid_point(kind, mode, B, H, T, repeats, peak) -> Row:
    theirs = TORCH[kind](INPUT, H, batch_first=True)
    ours = rnnkit.from_torch(theirs)
    # training takes the input's gradient too, as a layer inside a model does (an embedding or a
    # layer below): then both sides do the work the FLOP count below assumes. torch.nn's oneDNN LSTM
    # computes it whether or not it is needed; rnnkit skips it where it is not (7% of the time at
    # 32 x 512 x 64).
    x = torch.randn(B, T, INPUT, requires_grad=mode == "train")
    make = _train if mode == "train" else _infer
    t_torch, t_ours, (q1, q3) = compare(make(theirs, x), make(ours, x), repeats)
    flops = 2 * B * T * GATES[kind] * H * (INPUT + H) * (3 if mode == "train" else 1)
    gflops = flops / t_ours / 1e9
    with torch.set_grad_enabled(mode == "train"):
        route = rnnkit.explain(ours, x).name
    return Row(kind, mode, B, H, T, t_torch * 1e3, t_ours * 1e3, t_torch / t_ours, q1, q3, gflops, gflops / peak, route)


def _stepper(model, x, tokens):
    """Stepping ``model`` one token at a time from ``x`` (B, 1, I), state carried, under inference_mode."""

    def go():
        with torch.inference_mode():
            _, state = model(x)
            for _ in range(tokens):
                _, state = model(x, state)

    return go


def stepping(kind, tokens, repeats, batch: int = 1) -> dict:
    """ms per token of a 3-layer 512-wide model at ``batch`` (the target's is 1), state carried."""
    theirs = TORCH[kind](512, 512, num_layers=3, batch_first=True).eval()
    ours = rnnkit.from_torch(theirs)
    x = torch.randn(batch, 1, 512)
    t_torch, t_ours, (q1, q3) = compare(_stepper(theirs, x, tokens), _stepper(ours, x, tokens), repeats)
    with torch.inference_mode():
        route = rnnkit.explain(ours, x, ours(x)[1]).name
    return {
        "kind": kind,
        "batch": batch,
        "torch_ms_per_token": t_torch / tokens * 1e3,
        "rnnkit_ms_per_token": t_ours / tokens * 1e3,
        "ratio": t_torch / t_ours,
        "ratio_q1": q1,
        "ratio_q3": q3,
        "route": route,
    }


def custom_cell(B, H, T, repeats, tokens) -> list[dict]:
    """A user-written LSTM cell (its ``combine`` compiled, or the generic kernel where it cannot be)
    vs the built-in LSTM (hand-written kernel): training and inference at (B, H, T), and stepping
    ``tokens`` tokens at batch 1 through 3 layers of H, as ``stepping`` does. In the stepping row,
    ``steps`` is the number of tokens and the times are per token."""
    builtin = rnnkit.LSTM(INPUT, H, batch_first=True)
    user = rnnkit.Recurrent(UserLSTMCell, INPUT, H, batch_first=True)
    user.load_state_dict(builtin.state_dict())
    x = torch.randn(B, T, INPUT, requires_grad=True)  # as in the grid; inference runs under no_grad
    rows = []
    for mode, make in (("train", _train), ("infer", _infer)):
        t_builtin, t_user, _ = compare(make(builtin, x), make(user, x), repeats)
        rows.append(
            {
                "mode": mode,
                "batch": B,
                "hidden": H,
                "steps": T,
                "builtin_ms": t_builtin * 1e3,
                "user_cell_ms": t_user * 1e3,
                "slowdown": t_user / t_builtin,
            }
        )
    builtin = rnnkit.LSTM(H, H, num_layers=3, batch_first=True).eval()
    user = rnnkit.Recurrent(UserLSTMCell, H, H, num_layers=3, batch_first=True).eval()
    user.load_state_dict(builtin.state_dict())
    x = torch.randn(1, 1, H)
    t_builtin, t_user, _ = compare(_stepper(builtin, x, tokens), _stepper(user, x, tokens), repeats)
    rows.append(
        {
            "mode": "step",
            "batch": 1,
            "hidden": H,
            "steps": tokens,
            "builtin_ms": t_builtin / tokens * 1e3,
            "user_cell_ms": t_user / tokens * 1e3,
            "slowdown": t_user / t_builtin,
        }
    )
    return rows


def _peak_line(peaks: dict, n: int) -> str:
    return (
        f"matmul peak {peaks['peak']:.1f} GFLOP/s ({n}^3, best of "
        + ", ".join(f"{k} {v:.1f}" for k, v in peaks.items() if k != "peak")
        + ")"
    )


def run_benchmark(preset: str = "full", threads: int = 2, log=print) -> dict:
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    if preset == "smoke":  # a tiny end-to-end run for the test suite: no meaningful numbers
        kinds, grid, repeats, peak_n, tokens, custom = ["lstm", "gru"], [(2, 8, 4)], 1, 128, 2, (2, 8, 4)
        batches: tuple[int, ...] = (1, 2)
    elif preset == "quick":
        kinds, grid, repeats, peak_n, tokens, custom = (
            list(TORCH),
            [(1, 128, 64), (32, 128, 64), (32, 512, 64), (64, 512, 64)],
            3,
            2048,
            50,
            (32, 256, 64),
        )
        batches = (1,)
    else:
        grid = [(B, H, T) for B in (1, 32, 64) for H in (128, 512) for T in (64, 256)]
        kinds, repeats, peak_n, tokens, custom = list(TORCH), 5, 2048, 200, (32, 512, 64)
        batches = (1, 8, 64)  # the target is batch 1; 8 and 64 as sampling several sequences at once
    peaks = matmul_peak(peak_n)
    loops = "C++" if native.ops() is not None else "Python (the C++ loops could not be built)"
    log(f"torch {torch.__version__}, {threads} thread(s), rnnkit step loops: {loops}; " + _peak_line(peaks, peak_n))
    rows = []
    for kind in kinds:
        for B, H, T in grid:
            for mode in ("train", "infer"):
                row = grid_point(kind, mode, B, H, T, repeats, peaks["peak"])
                rows.append(row)
                log(_format_row(row))
    steps = [stepping(kind, tokens, repeats, batch) for kind in ("lstm", "gru") for batch in batches]
    custom_rows = custom_cell(*custom, repeats, tokens)
    # the peak again at the end: a start that the machine's other tenants slowed would otherwise
    # inflate every fraction; the table's fractions use the higher of the two
    peaks_end = matmul_peak(peak_n)
    log("at the end, " + _peak_line(peaks_end, peak_n) + " (the fractions of peak below use the higher)")
    peak = max(peaks["peak"], peaks_end["peak"])
    rows = [replace(r, peak_frac=r.gflops / peak) for r in rows]
    report = {
        "machine": {
            "torch": torch.__version__,
            "threads": threads,
            "python": platform.python_version(),
            "processor": platform.processor() or platform.machine(),
            "matmul_peak_gflops": peak,
            "matmul_gflops": peaks,
            "matmul_gflops_end": peaks_end,
            "step_loops": loops,
        },
        "preset": preset,
        "rows": [asdict(r) for r in rows],
        "stepping": steps,
        "custom_cell": custom_rows,
        "summary": _summary(rows),
    }
    return report


def _geomean(values):
    return math.exp(sum(math.log(v) for v in values) / len(values)) if values else float("nan")


def _summary(rows: list[Row]) -> dict:
    train = [r for r in rows if r.mode == "train"]
    infer = [r for r in rows if r.mode == "infer"]
    big = [r.peak_frac for r in train if r.hidden == 512 and r.batch >= 32]
    summary = {
        "train_geomean_ratio": _geomean([r.ratio for r in train]),
        "infer_geomean_ratio": _geomean([r.ratio for r in infer]),
        "train_peak_frac_h512_b32plus_min": min(big, default=float("nan")),
    }
    for mode, part in (("train", train), ("infer", infer)):
        low = min(part, key=lambda r: r.ratio, default=None)
        summary[f"{mode}_min_ratio"] = low.ratio if low else float("nan")
        summary[f"{mode}_min_ratio_pairs_iqr"] = (low.ratio_q1, low.ratio_q3) if low else (float("nan"),) * 2
    return summary


HEADER = (
    f"{'kind':5} {'mode':5} {'B':>3} {'H':>4} {'T':>4} {'torch ms':>10} {'rnnkit ms':>10} {'ratio':>6} "
    f"{'pairs IQR':>10} {'GFLOP/s':>8} {'%peak':>6}  route"
)


def _format_row(r: Row) -> str:
    return (
        f"{r.kind:5} {r.mode:5} {r.batch:3d} {r.hidden:4d} {r.steps:4d} {r.torch_ms:10.2f} {r.rnnkit_ms:10.2f} "
        f"{r.ratio:6.2f} {r.ratio_q1:5.2f}-{r.ratio_q3:4.2f} {r.gflops:8.1f} {100 * r.peak_frac:5.0f}%  {r.route}"
    )


def format_report(report: dict) -> str:
    lines = [HEADER] + [_format_row(Row(**r)) for r in report["rows"]]
    s = report["summary"]
    iqr = {m: "-".join(f"{v:.2f}" for v in s[f"{m}_min_ratio_pairs_iqr"]) for m in ("train", "infer")}
    lines.append(
        f"training ratio: geomean {s['train_geomean_ratio']:.2f}, min {s['train_min_ratio']:.2f} "
        f"(pairs {iqr['train']}); inference ratio: geomean {s['infer_geomean_ratio']:.2f}, "
        f"min {s['infer_min_ratio']:.2f} (pairs {iqr['infer']}); "
        f"training at H=512, B>=32: min {100 * s['train_peak_frac_h512_b32plus_min']:.0f}% of peak"
    )
    for st in report["stepping"]:
        lines.append(
            f"stepping 3x512 {st['kind']} batch {st['batch']}: torch {st['torch_ms_per_token']:.3f} ms/token, "
            f"rnnkit {st['rnnkit_ms_per_token']:.3f} ms/token, ratio {st['ratio']:.2f} "
            f"(pairs {st['ratio_q1']:.2f}-{st['ratio_q3']:.2f})" + (f", {st['route']}" if st.get("route") else "")
        )
    for c in report["custom_cell"]:
        where = (
            f"step 3x{c['hidden']} batch 1, ms/token"
            if c["mode"] == "step"
            else f"{c['mode']} B={c['batch']} H={c['hidden']} T={c['steps']}"
        )
        lines.append(
            f"user-written LSTM cell vs built-in, {where}: "
            f"{c['user_cell_ms']:.2f} ms vs {c['builtin_ms']:.2f} ms ({c['slowdown']:.2f}x)"
        )
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m rnnkit.bench", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="a reduced grid, about a minute")
    parser.add_argument("--smoke", action="store_true", help="a tiny run that only checks the benchmark works")
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON here")
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads (default 2)")
    parser.add_argument(
        "--route",
        choices=list(routing.ROUTE_NAMES),
        default=None,
        help="run rnnkit's side through this route (rnnkit.routing.force); a point the route cannot "
        "run stops the benchmark with the reason (default: the route each call would take)",
    )
    parser.add_argument(
        "--device",
        choices=["cpu", "cuda"],
        default="cpu",
        help="cuda: the GPU rows against torch.nn on the GPU (grid, bf16, a user's cell, stepping; "
        "rnnkit/bench/cuda.py); stops with a message where no CUDA device is available",
    )
    args = parser.parse_args(argv)
    preset = "smoke" if args.smoke else "quick" if args.quick else "full"
    if args.device == "cuda":
        from rnnkit.bench.cuda import main_cuda

        main_cuda(preset, args.json, args.route)
        return
    with routing.force(args.route) if args.route else contextlib.nullcontext():
        report = run_benchmark(preset, args.threads, log=lambda line: print(line, flush=True))
    report["forced_route"] = args.route
    print()
    print(format_report(report))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)
