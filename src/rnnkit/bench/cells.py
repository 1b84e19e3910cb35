"""The cells' benchmark rows: minGRU, minLSTM, the layer-normalised LSTM and the regularised LSTM against
the LSTM, training.

``python -m rnnkit.bench.cells`` times forward and backward (the input's gradient included, as for
a layer inside a model) of one layer of each cell at B=32, H=512, input 512, T in {256, 1024, 4096},
float32, in one process. Every repeat runs each cell once, the order rotated from repeat to repeat
so a shared machine's drift hits all of them; a row gives the median time of each and its ratio to
the LSTM's, with the middle half (first to third quartile) of the per-repeat ratios (the LSTM's
and the cell's calls of the same repeat). Targets: minGRU and minLSTM at least 4x faster than the
LSTM at T=1024; the LayerNorm LSTM within 1.5x of its time (at T=256 only: it trains on the
reference loop); the LSTM with variational dropout and weight-drop (``Regularised``) within 1.15x of
it (at T=256). ``--cells slstm`` runs the sLSTM (xLSTM, 4 heads) against the LSTM, a comparison row
without a target; ``lstm+zoneout`` and ``lstm+recurrent-dropout`` the LSTM with zoneout 0.1 or
recurrent dropout 0.25 inside its loop (``Regularised``), within 1.15x of it. ``--json PATH`` writes the rows.

The LSTM is ``rnnkit.LSTM`` on whatever route it takes (``rnnkit.explain`` names it in each row).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

import rnnkit
from rnnkit.bench.run import _quartiles, _train
from rnnkit.core.cells import LayerNormLSTMCell, MinGRUCell, MinLSTMCell, SLSTMCell
from rnnkit.core.regularise import Regularised

# each row's layer, built from (input size, hidden size)
CELLS = {
    "mingru": lambda I, H: rnnkit.Recurrent(MinGRUCell, I, H, batch_first=True),
    "minlstm": lambda I, H: rnnkit.Recurrent(MinLSTMCell, I, H, batch_first=True),
    "ln-lstm": lambda I, H: rnnkit.Recurrent(LayerNormLSTMCell, I, H, batch_first=True),
    # the LSTM with AWD-LSTM's variational dropout (input and output) and weight-drop
    "lstm+regularised": lambda I, H: Regularised(
        rnnkit.LSTM(I, H, batch_first=True),
        input_dropout=0.25,
        output_dropout=0.25,
        weight_drop=0.5,
        generator=torch.Generator().manual_seed(0),
    ),
}
# speedup over the LSTM the row must reach (LSTM time / cell time): at least 4x for the scan cells
# (at T=1024, the stated target; the other lengths are reported against the same line), at most
# 1.5x slower for the LayerNorm LSTM
TARGETS = {"mingru": 4.0, "minlstm": 4.0, "ln-lstm": 1 / 1.5, "lstm+regularised": 1 / 1.15}
SHORT_ONLY = {"ln-lstm", "lstm+regularised"}  # rows up to SHORT_MAX_STEPS only
SHORT_MAX_STEPS = 256


def rotated(fns: dict, repeats: int) -> dict[str, list[float]]:
    """Seconds of each of ``fns`` per repeat, after one warm-up call each, the order rotated every repeat."""
    names = list(fns)
    for name in names:
        fns[name]()
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(repeats):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            start = time.perf_counter()
            fns[name]()
            times[name].append(time.perf_counter() - start)
    return times


# -- rows outside the default set: the sLSTM against the LSTM (a comparison, no target), zoneout and
# recurrent dropout against the LSTM without them (within 1.15x, at T=256) ------------------------------

EXTRA = {
    "slstm": lambda I, H: rnnkit.Recurrent(SLSTMCell, I, H, batch_first=True),  # xLSTM's 4 heads
    # zoneout and recurrent dropout inside the LSTM's own loop, against the same LSTM without them
    "lstm+zoneout": lambda I, H: Regularised(
        rnnkit.LSTM(I, H, batch_first=True), zoneout=0.1, generator=torch.Generator().manual_seed(0)
    ),
    "lstm+recurrent-dropout": lambda I, H: Regularised(
        rnnkit.LSTM(I, H, batch_first=True), recurrent_dropout=0.25, generator=torch.Generator().manual_seed(0)
    ),
}
TARGETS.update({"lstm+zoneout": 1 / 1.15, "lstm+recurrent-dropout": 1 / 1.15})


def _layer(name: str, I: int, H: int):
    return CELLS[name](I, H) if name in CELLS else EXTRA[name](I, H)


def rows_at(T: int, cells: list[str], B: int, H: int, I: int, repeats: int) -> list[dict]:
    """One row per cell at sequence length ``T``, each against the LSTM timed in the same repeats."""
    torch.manual_seed(0)
    x = torch.randn(B, T, I, requires_grad=True)
    lstm = rnnkit.LSTM(I, H, batch_first=True)
    layers = {name: _layer(name, I, H) for name in cells}
    times = rotated({"lstm": _train(lstm, x), **{name: _train(layer, x) for name, layer in layers.items()}}, repeats)
    lstm_s = statistics.median(times["lstm"])
    rows = []
    for name, layer in layers.items():
        cell_s = statistics.median(times[name])
        q1, q3 = _quartiles([a / b for a, b in zip(times["lstm"], times[name])])
        speedup = lstm_s / cell_s
        rows.append(
            {
                "cell": name,
                "batch": B,
                "hidden": H,
                "input": I,
                "steps": T,
                "lstm_ms": lstm_s * 1e3,
                "cell_ms": cell_s * 1e3,
                "speedup": speedup,
                "speedup_q1": q1,
                "speedup_q3": q3,  # LSTM time / cell time
                "target": TARGETS.get(name),  # None: a comparison row
                "met": None if TARGETS.get(name) is None else speedup >= TARGETS[name],
                "lstm_route": rnnkit.explain(lstm, x).name,
                "cell_route": rnnkit.explain(getattr(layer, "layer", layer), x).name,
            }
        )
    return rows


def run_cells_benchmark(
    steps=(256, 1024, 4096),
    repeats: int = 3,
    threads: int = 2,
    B: int = 32,
    H: int = 512,
    I: int = 512,
    long_repeats: int = 1,
    names=tuple(CELLS),
    log=print,
) -> list[dict]:
    """The rows for every ``T`` in ``steps``; the LayerNorm LSTM (it trains on the reference loop, minutes a
    call beyond) and the regularised LSTM up to ``SHORT_MAX_STEPS`` only, and from T=4096 on
    ``long_repeats`` repeats."""
    torch.set_num_threads(threads)
    rows = []
    for T in steps:
        cells = [name for name in names if name not in SHORT_ONLY or T <= SHORT_MAX_STEPS]
        for row in rows_at(T, cells, B, H, I, long_repeats if T >= 4096 else repeats):
            log(format_row(row))
            rows.append(row)
    return rows


def format_row(row: dict) -> str:
    target = "" if row["target"] is None else f"  target {row['target']:.2f}x {'met' if row['met'] else 'MISSED'}"
    return (
        f"{row['cell']:>16} T={row['steps']:<5} lstm {row['lstm_ms']:9.1f} ms  cell {row['cell_ms']:9.1f} ms"
        f"  speedup {row['speedup']:5.2f}x [{row['speedup_q1']:.2f}-{row['speedup_q3']:.2f}]{target}"
        f"  (routes: {row['lstm_route']}, {row['cell_route']})"
    )


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m rnnkit.bench.cells", description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    parser.add_argument("--steps", type=int, nargs="+", default=[256, 1024, 4096], help="sequence lengths")
    parser.add_argument("--repeats", type=int, default=3, help="repeats below T=4096 (default 3)")
    parser.add_argument("--long-repeats", type=int, default=1, help="repeats from T=4096 on (default 1)")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--input", type=int, default=512)
    parser.add_argument(
        "--cells",
        nargs="+",
        choices=[*CELLS, *EXTRA],
        default=list(CELLS),
        help=f"rows to run (besides: {', '.join(EXTRA)})",
    )
    parser.add_argument("--json", help="write the rows to this JSON file")
    args = parser.parse_args(argv)
    rows = run_cells_benchmark(
        tuple(args.steps),
        args.repeats,
        args.threads,
        args.batch,
        args.hidden,
        args.input,
        args.long_repeats,
        tuple(args.cells),
    )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
