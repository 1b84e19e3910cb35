"""The cells page's benchmark tables, generated from the cells benchmark's JSON (never typed by hand).

    python -m rnnkit.bench.cells --steps 256 --json docs/data/cells.json    # measure (each run adds its rows)
    python docs/gen_cells.py                                                # rewrite the tables in docs/cells.md
    python docs/gen_cells.py --check                                        # exit 1 if the committed tables differ

The tables live between ``<!-- cells:rows -->`` and ``<!-- /cells:rows -->`` in docs/cells.md: one
table per thread count and input size, each row a cell at one length against its peer, then the
commands that measured them. The test suite runs the check.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CELLS_JSON = ROOT / "docs" / "data" / "cells.json"
PAGE = ROOT / "docs" / "cells.md"
MARK = "cells:rows"
PEERS = {"lstm": "LSTM", "gru": "GRU"}


def load(path: Path = CELLS_JSON) -> list[dict]:
    return json.loads(path.read_text())


def _target(row: dict) -> str:
    t = row["target"]
    if t is None:
        return "none (a comparison)"
    return f"{t:.0f}x" if t >= 1 else f"{t:.2f}x ({1 / t:.3g}x slower)"


def _met(row: dict) -> str:
    return "" if row["met"] is None else "met" if row["met"] else "missed"


def tables(rows: list[dict]) -> str:
    """Markdown: a table per (threads, input size), then the commands behind its rows."""
    parts = []
    for threads, size in sorted({(r["threads"], r["input"]) for r in rows}):
        group = [r for r in rows if r["threads"] == threads and r["input"] == size]
        first = group[0]
        parts.append(
            f"B={first['batch']}, H={first['hidden']}, input {size}, {threads} thread(s), training "
            "(speedup = the peer's time / the cell's):\n"
        )
        lines = [
            "| cell | peer | T | peer ms | cell ms | speedup | middle half | repeats | target | |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        for r in group:
            lines.append(
                f"| {r['cell']} | {PEERS.get(r['peer'], r['peer'])} | {r['steps']} | {r['peer_ms']:.0f} | "
                f"{r['cell_ms']:.0f} | {r['speedup']:.2f}x | {r['speedup_q1']:.2f}-{r['speedup_q3']:.2f} | "
                f"{r['repeats']} | {_target(r)} | {_met(r)} |"
            )
        parts.append("\n".join(lines) + "\n")
        routes = sorted(
            {f"{r['peer']}: `{r['peer_route']}`" for r in group} | {f"{r['cell']}: `{r['cell_route']}`" for r in group}
        )
        parts.append("Routes: " + ", ".join(routes) + ". Measured by:\n")
        parts.append("\n".join(f"    {c}" for c in dict.fromkeys(r["command"] for r in group)) + "\n")
    return "\n".join(parts)


def render(text: str, rows: list[dict]) -> str:
    pattern = re.compile(rf"(<!-- {MARK} -->\n).*?(<!-- /{MARK} -->)", re.S)
    if not pattern.search(text):
        raise ValueError(f"no <!-- {MARK} --> markers in the page")
    return pattern.sub(lambda m: m.group(1) + "\n" + tables(rows) + "\n" + m.group(2), text)


def stale(rows: list[dict], page: Path = PAGE) -> bool:
    """Whether the committed page's tables differ from what ``rows`` make."""
    text = page.read_text()
    return render(text, rows) != text


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if docs/cells.md's tables are stale")
    args = parser.parse_args(argv)
    rows = load()
    if args.check:
        if stale(rows):
            print("docs/cells.md's benchmark tables are stale: run python docs/gen_cells.py", file=sys.stderr)
            return 1
        return 0
    PAGE.write_text(render(PAGE.read_text(), rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
