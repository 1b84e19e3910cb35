"""The benchmark itself: grid, timing loop, table and JSON (see the package docstring)."""

from __future__ import annotations

import argparse
import contextlib
import copy
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


def compare_all(fns: list, repeats: int) -> tuple[list[float], list[tuple[float, float]]]:
    """``compare`` for several callables: the median seconds of each, called in turn after a
    warm-up, and for each the quartiles of the repeats' ratios ``fns[0] / fns[i]`` (calls that ran
    next to each other). The order turns by one every repeat and runs backwards every other turn,
    so each callable follows each of the others equally often (one that always ran right after a
    large torch.nn call would pay for the caches that call left cold)."""
    for fn in fns:
        fn()
    once = sum(_timed(fn) for fn in fns)
    if repeats > 1:
        repeats = max(repeats, min(MAX_REPEATS, math.ceil(MIN_SECONDS / max(once, 1e-9))))
    times: list[list[float]] = [[] for _ in fns]
    n = len(fns)
    for r in range(repeats):
        order = [(i + r) % n for i in range(n)]
        for i in order if (r // n) % 2 == 0 else reversed(order):
            times[i].append(_timed(fns[i]))
    medians = [statistics.median(t) for t in times]
    return medians, [_quartiles([a / b for a, b in zip(times[0], t)]) for t in times]


# How a torch.nn user meets the layers (``layout_point``): the rnnkit class at torch.nn's defaults
# (time-major input, batch_first=False) and a torch.nn model through rnnkit.convert, against the
# batch-first layer of the grid; all three against torch.nn's layer at its defaults.
LAYOUTS = ("batch-first", "time-major", "convert")


def layout_point(kind, mode, B, H, T, repeats) -> dict:
    """One grid point four ways, alternated in one process: torch.nn's layer at its defaults
    (time-major), rnnkit's batch-first, rnnkit's class at torch.nn's defaults (the same weights under
    the same seed) and ``rnnkit.convert`` of a torch.nn model holding the layer. ``slowdown``: each
    rnnkit way's time over the batch-first one's (1.0: no cost for the layout)."""
    torch.manual_seed(0)
    theirs = TORCH[kind](INPUT, H)
    torch.manual_seed(0)
    defaults = getattr(rnnkit, TORCH[kind].__name__)(INPUT, H)  # time-major, torch.nn's initial weights
    batch_first = rnnkit.from_torch(TORCH[kind](INPUT, H, batch_first=True))
    batch_first.load_state_dict(theirs.state_dict())
    converted = rnnkit.convert(torch.nn.Sequential(copy.deepcopy(theirs)))
    assert all(torch.equal(a, b) for a, b in zip(theirs.parameters(), defaults.parameters()))
    x = torch.randn(T, B, INPUT, requires_grad=mode == "train")  # (T, B, I), as torch.nn's default
    x_bf = x.detach().transpose(0, 1).contiguous().requires_grad_(mode == "train")  # (B, T, I)
    make = _train if mode == "train" else _infer
    fns = [make(theirs, x), make(batch_first, x_bf), make(defaults, x), make(converted, x)]
    (t_torch, *t_ours), quartiles = compare_all(fns, repeats)
    with torch.set_grad_enabled(mode == "train"):
        route = rnnkit.explain(defaults, x).name
    row: dict = {"kind": kind, "mode": mode, "batch": B, "hidden": H, "steps": T, "torch_ms": t_torch * 1e3}
    for layout, t, (q1, q3) in zip(LAYOUTS, t_ours, quartiles[1:]):
        row[layout] = {"rnnkit_ms": t * 1e3, "ratio": t_torch / t, "ratio_q1": q1, "ratio_q3": q3}
    for layout in LAYOUTS[1:]:
        row[layout]["slowdown"] = row[layout]["rnnkit_ms"] / row["batch-first"]["rnnkit_ms"]
    row["route"] = route
    return row


def _format_layout(r: dict) -> str:
    ways = ", ".join(f"{layout} {r[layout]['rnnkit_ms']:.2f} ms ({r[layout]['ratio']:.2f}x)" for layout in LAYOUTS)
    costs = ", ".join(f"{layout} {r[layout]['slowdown']:.3f}" for layout in LAYOUTS[1:])
    return (
        f"{r['kind']:5} {r['mode']:5} {r['batch']:3d} {r['hidden']:4d} {r['steps']:4d}: torch.nn (time-major) "
        f"{r['torch_ms']:.2f} ms; rnnkit {ways}; time over batch-first: {costs}  {r['route']}"
    )


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


def run_benchmark(
    preset: str = "full",
    threads: int = 2,
    log=print,
    layouts_only: bool = False,
    only_kinds: list[str] | None = None,
    points: list[tuple[int, int, int]] | None = None,
) -> dict:
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
    if only_kinds:
        kinds = [k for k in kinds if k in only_kinds] or list(only_kinds)
    if points:
        grid = list(points)
    layout_grid = [p for p in grid if p[2] == 64] or grid  # the layouts at the grid's T = 64 points
    layout_kinds = kinds[:1] if preset == "smoke" and not only_kinds else kinds
    if layouts_only:
        return {
            "machine": {"torch": torch.__version__, "threads": threads},
            "preset": preset,
            "layouts": _layouts(layout_kinds, layout_grid, repeats, log),
        }
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
    layouts = _layouts(layout_kinds, layout_grid, repeats, log)
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
        "layouts": layouts,
        "stepping": steps,
        "custom_cell": custom_rows,
        "summary": _summary(rows),
    }
    return report


def _layouts(kinds, grid, repeats, log) -> list[dict]:
    log("torch.nn's defaults (time-major) and rnnkit.convert against the batch-first layer:")
    rows = []
    for kind in kinds:
        for B, H, T in grid:
            for mode in ("train", "infer"):
                rows.append(layout_point(kind, mode, B, H, T, repeats))
                log(_format_layout(rows[-1]))
    return rows


def layouts_summary(rows: list[dict]) -> str:
    """The layouts' cost over batch-first: geometric mean and largest time ratio, per layout."""
    parts = []
    for layout in LAYOUTS[1:]:
        costs = [r[layout]["slowdown"] for r in rows]
        if costs:
            parts.append(f"{layout} {_geomean(costs):.3f} (max {max(costs):.3f})")
    return "rnnkit's time over batch-first, geometric mean: " + ", ".join(parts)


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
    layouts = report.get("layouts", [])
    layout_lines = [_format_layout(r) for r in layouts] + ([layouts_summary(layouts)] if layouts else [])
    if "rows" not in report:  # --layouts-only
        return "\n".join(layout_lines)
    lines = [HEADER] + [_format_row(Row(**r)) for r in report["rows"]]
    s = report["summary"]
    iqr = {m: "-".join(f"{v:.2f}" for v in s[f"{m}_min_ratio_pairs_iqr"]) for m in ("train", "infer")}
    lines.append(
        f"training ratio: geomean {s['train_geomean_ratio']:.2f}, min {s['train_min_ratio']:.2f} "
        f"(pairs {iqr['train']}); inference ratio: geomean {s['infer_geomean_ratio']:.2f}, "
        f"min {s['infer_min_ratio']:.2f} (pairs {iqr['infer']}); "
        f"training at H=512, B>=32: min {100 * s['train_peak_frac_h512_b32plus_min']:.0f}% of peak"
    )
    lines += layout_lines
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


def _points(text: str) -> list[tuple[int, int, int]]:
    """``"32x128x64,64x512x64"`` -> [(32, 128, 64), (64, 512, 64)] (batch, hidden, steps)."""
    try:
        points = [tuple(int(n) for n in p.split("x")) for p in text.split(",") if p]
    except ValueError:
        points = []
    if not points or any(len(p) != 3 or min(p) < 1 for p in points):
        raise argparse.ArgumentTypeError(f"expected BxHxT[,BxHxT...] with positive sizes, got {text!r}")
    return points  # type: ignore[return-value]


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
        "--layouts-only",
        action="store_true",
        help="only the rows of torch.nn's defaults (time-major input) and rnnkit.convert against the batch-first layer",
    )
    parser.add_argument(
        "--kind",
        action="append",
        choices=list(TORCH),
        help="only this cell kind (repeat for several; default: all)",
    )
    parser.add_argument(
        "--points",
        type=_points,
        metavar="BxHxT,...",
        help="these grid points instead of the preset's, e.g. 32x128x64,64x512x64",
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
        report = run_benchmark(
            preset,
            args.threads,
            log=lambda line: print(line, flush=True),
            layouts_only=args.layouts_only,
            only_kinds=args.kind,
            points=args.points,
        )
    report["forced_route"] = args.route
    print()
    print(format_report(report))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)
