"""The cells' benchmark rows: minGRU, minLSTM, the layer-normalised LSTM and GRU, the sLSTM and the
regularised LSTM against their peers, training.

``python -m rnnkit.bench.cells`` times forward and backward (the input's gradient included, as for
a layer inside a model) of one layer of each cell at B=32, H=512, input 512, T in {256, 1024, 4096},
float32, in one process. Each cell's peer is the LSTM, but the layer-normalised GRU's, which is the
GRU. Every repeat runs each layer once, the order rotated from repeat to repeat so a shared
machine's drift hits all of them; a row gives the median time of the cell and of its peer, and
their ratio (peer time / cell time, the speedup), with the middle half (first to third quartile)
of the per-repeat ratios (the peer's and the cell's calls of the same repeat). Targets: minGRU and
minLSTM at least 4x faster than the LSTM at T=1024; the layer-normalised LSTM and GRU within 1.5x
of their peer's time; the LSTM with a regulariser within 1.15x of it: AWD-LSTM's variational
dropout and weight-drop (``lstm+regularised``), variational dropout of input, output and recurrent
state (``lstm+variational``), zoneout 0.1 (``lstm+zoneout``) or recurrent dropout 0.25
(``lstm+recurrent-dropout``) inside its loop; and zoneout 0.1 on minGRU's scan and the
layer-normalised LSTM's loop (``mingru+zoneout``, ``ln-lstm+zoneout``), each against the same cell
without it. The sLSTM (xLSTM, 4 heads) is a comparison row
without a target. From T=4096 on each layer runs ``--long-repeats`` times (default 1) after its
warm-up. ``--json PATH`` writes the rows into PATH, replacing rows of the same cell, sizes and
threads already there and keeping the others (so runs of one length each build one file;
docs/gen_cells.py makes the docs' table from it).

The peers are ``rnnkit.LSTM`` and ``rnnkit.GRU`` on whatever route they take (``rnnkit.explain``
names it in each row).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

import rnnkit
from rnnkit.bench.run import _quartiles, _train
from rnnkit.core.cells import LayerNormGRUCell, LayerNormLSTMCell, MinGRUCell, MinLSTMCell, SLSTMCell
from rnnkit.core.regularise import Regularised

# each row's layer, built from (input size, hidden size)
CELLS = {
    "mingru": lambda I, H: rnnkit.Recurrent(MinGRUCell, I, H, batch_first=True),
    "minlstm": lambda I, H: rnnkit.Recurrent(MinLSTMCell, I, H, batch_first=True),
    "ln-lstm": lambda I, H: rnnkit.Recurrent(LayerNormLSTMCell, I, H, batch_first=True),
    "ln-gru": lambda I, H: rnnkit.Recurrent(LayerNormGRUCell, I, H, batch_first=True),
    "slstm": lambda I, H: rnnkit.Recurrent(SLSTMCell, I, H, batch_first=True),  # xLSTM's 4 heads
    # the LSTM with AWD-LSTM's variational dropout (input and output) and weight-drop
    "lstm+regularised": lambda I, H: _regularised(I, H, input_dropout=0.25, output_dropout=0.25, weight_drop=0.5),
    # Gal & Ghahramani's variational dropout: one mask per sequence on input, output and recurrent state
    "lstm+variational": lambda I, H: _regularised(
        I, H, input_dropout=0.25, output_dropout=0.25, recurrent_dropout=0.25
    ),
    # zoneout and recurrent dropout inside the LSTM's own loop
    "lstm+zoneout": lambda I, H: _regularised(I, H, zoneout=0.1),
    "lstm+recurrent-dropout": lambda I, H: _regularised(I, H, recurrent_dropout=0.25),
    # zoneout on the other fast routes: minGRU's scan and the layer-normalised LSTM's loop
    "mingru+zoneout": lambda I, H: _regularised(I, H, "mingru", zoneout=0.1),
    "ln-lstm+zoneout": lambda I, H: _regularised(I, H, "ln-lstm", zoneout=0.1),
}
PEERS = {"lstm": rnnkit.LSTM, "gru": rnnkit.GRU}  # what a row is timed against, besides the rows' own cells
# a cell's peer: the LSTM unless named here; a regularised cell's is the same cell without it
PEER = {"ln-gru": "gru", "mingru+zoneout": "mingru", "ln-lstm+zoneout": "ln-lstm"}
# speedup over the peer the row must reach (peer time / cell time): at least 4x for the scan cells
# (at T=1024, the stated target; the other lengths are reported against the same line), at most
# 1.5x slower for the layer-normalised cells, 1.15x for the regularised LSTMs; None: no target
TARGETS: dict[str, float | None] = {
    "mingru": 4.0,
    "minlstm": 4.0,
    "ln-lstm": 1 / 1.5,
    "ln-gru": 1 / 1.5,
    "slstm": None,
    "lstm+regularised": 1 / 1.15,
    "lstm+variational": 1 / 1.15,
    "lstm+zoneout": 1 / 1.15,
    "lstm+recurrent-dropout": 1 / 1.15,
    "mingru+zoneout": 1 / 1.15,
    "ln-lstm+zoneout": 1 / 1.15,
}


def _regularised(I: int, H: int, cell: str = "lstm", **p) -> Regularised:
    layer = rnnkit.LSTM(I, H, batch_first=True) if cell == "lstm" else CELLS[cell](I, H)
    return Regularised(layer, generator=torch.Generator().manual_seed(0), **p)


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


def rows_at(T: int, cells: list[str], B: int, H: int, I: int, repeats: int) -> list[dict]:
    """One row per cell at sequence length ``T``, each against its peer timed in the same repeats."""
    torch.manual_seed(0)
    x = torch.randn(B, T, I, requires_grad=True)
    wanted = dict.fromkeys(PEER.get(c, "lstm") for c in cells)
    peers = {name: PEERS[name](I, H, batch_first=True) if name in PEERS else CELLS[name](I, H) for name in wanted}
    layers = {name: CELLS[name](I, H) for name in cells if name not in peers}
    fns = {
        **{name: _train(peer, x) for name, peer in peers.items()},
        **{n: _train(layer, x) for n, layer in layers.items()},
    }
    times = rotated(fns, repeats)
    rows = []
    for name in cells:
        layer = layers.get(name, peers.get(name))
        peer = PEER.get(name, "lstm")
        peer_s, cell_s = statistics.median(times[peer]), statistics.median(times[name])
        q1, q3 = _quartiles([a / b for a, b in zip(times[peer], times[name])])
        speedup, target = peer_s / cell_s, TARGETS[name]
        rows.append(
            {
                "cell": name,
                "peer": peer,
                "batch": B,
                "hidden": H,
                "input": I,
                "steps": T,
                "threads": torch.get_num_threads(),
                "repeats": repeats,
                "peer_ms": peer_s * 1e3,
                "cell_ms": cell_s * 1e3,
                "speedup": speedup,
                "speedup_q1": q1,
                "speedup_q3": q3,  # peer time / cell time
                "target": target,
                "met": None if target is None else speedup >= target,
                "peer_route": rnnkit.explain(peers[peer], x).name,
                "cell_route": rnnkit.explain(getattr(layer, "layer", layer), x).name,
            }
        )
    return rows


def merge_rows(path: str | Path, rows: list[dict]) -> list[dict]:
    """``rows`` written into the JSON file ``path`` over its rows of the same cell, sizes and threads."""
    key = ("cell", "batch", "hidden", "input", "steps", "threads")
    file = Path(path)
    old = json.loads(file.read_text()) if file.is_file() else []
    new = {tuple(r[k] for k in key) for r in rows}
    merged = [r for r in old if tuple(r.get(k) for k in key) not in new] + rows
    merged.sort(key=lambda r: (r["threads"], r["input"], r["steps"], list(CELLS).index(r["cell"])))
    file.write_text(json.dumps(merged, indent=1) + "\n")
    return merged


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
    """The rows for every ``T`` in ``steps``; from T=4096 on ``long_repeats`` repeats."""
    torch.set_num_threads(threads)
    rows = []
    for T in steps:
        for row in rows_at(T, list(names), B, H, I, long_repeats if T >= 4096 else repeats):
            log(format_row(row))
            rows.append(row)
    return rows


def _against(row: dict) -> str:
    if row["target"] is None:
        return "  (no target)"
    return f"  target {row['target']:.2f}x {'met' if row['met'] else 'MISSED'}"


def format_row(row: dict) -> str:
    return (
        f"{row['cell']:>22} T={row['steps']:<5} {row['peer']} {row['peer_ms']:9.1f} ms  cell {row['cell_ms']:9.1f} ms"
        f"  speedup {row['speedup']:5.2f}x [{row['speedup_q1']:.2f}-{row['speedup_q3']:.2f}]"
        f"{_against(row)}  (routes: {row['peer_route']}, {row['cell_route']})"
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
    parser.add_argument("--cells", nargs="+", choices=list(CELLS), default=list(CELLS), help="rows to run")
    parser.add_argument("--json", help="write the rows into this JSON file (over its rows of the same cell and sizes)")
    args = parser.parse_args(argv)
    command = " ".join(["python -m rnnkit.bench.cells", *(sys.argv[1:] if argv is None else argv)])
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
        merge_rows(args.json, [{**row, "command": command} for row in rows])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
