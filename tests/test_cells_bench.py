"""The cells' benchmark rows run end to end (tiny sizes: no meaningful numbers) and say what they measured."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from rnnkit.bench import cells

DOCS = Path(__file__).resolve().parents[1] / "docs"


def test_rows_compare_every_cell_with_its_peer_and_write_json(tmp_path):
    out = tmp_path / "rows.json"
    args = [
        "--threads",
        "1",
        "--steps",
        "4",
        "300",
        "4096",
        "--repeats",
        "2",
        "--batch",
        "2",
        "--hidden",
        "8",
        "--input",
        "3",
        "--json",
        str(out),
    ]
    assert cells.main(args) == 0
    rows = json.loads(out.read_text())
    # every cell at every length, T=4096 included
    assert [(r["cell"], r["steps"]) for r in rows] == [(c, T) for T in (4, 300, 4096) for c in cells.CELLS]
    for row in rows:
        assert row["peer_ms"] > 0 and row["cell_ms"] > 0
        assert row["peer"] == {"ln-gru": "gru", "mingru+zoneout": "mingru", "ln-lstm+zoneout": "ln-lstm"}.get(
            row["cell"], "lstm"
        )
        assert abs(row["speedup"] - row["peer_ms"] / row["cell_ms"]) < 1e-9
        assert row["speedup_q1"] <= row["speedup_q3"]
        assert row["met"] == (None if row["target"] is None else row["speedup"] >= row["target"])
        assert row["command"] == "python -m rnnkit.bench.cells " + " ".join(args)
    assert {r["cell_route"] for r in rows if r["cell"].startswith("min")} == {"parallel-scan"}
    # the regularised LSTMs keep the LSTM's own loop, the masks applied inside it
    assert {r["cell_route"] for r in rows if r["cell"].startswith("lstm+")} == {"cpp-loops"}
    assert {r["cell_route"] for r in rows if r["cell"].startswith("ln-")} == {"cpp-layernorm"}
    # a cell that is both a row and another row's peer is one layer, timed once a repeat
    minimal = [r for r in rows if r["cell"] == "mingru" or r["peer"] == "mingru"]
    assert {r["cell_ms"] for r in minimal if r["cell"] == "mingru"} <= {r["peer_ms"] for r in minimal}
    # a second run of one length replaces that length's rows and keeps the others
    assert cells.main([*args[:2], "--steps", "4", *args[6:], "--cells", "mingru"]) == 0
    again = json.loads(out.read_text())
    assert [(r["cell"], r["steps"]) for r in again] == [(r["cell"], r["steps"]) for r in rows]
    assert again[0]["cell_ms"] != rows[0]["cell_ms"] and again[1:] == rows[1:]


def test_rotation_runs_each_function_once_per_repeat_in_a_rotated_order():
    calls = []
    times = cells.rotated({name: (lambda n=name: calls.append(n)) for name in "abc"}, repeats=3)
    assert calls == list("abc") + list("abc") + list("bca") + list("cab")
    assert {k: len(v) for k, v in times.items()} == {"a": 3, "b": 3, "c": 3}


def _generator():
    spec = importlib.util.spec_from_file_location("gen_cells", DOCS / "gen_cells.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.skipif(not (DOCS / "data" / "cells.json").is_file(), reason="no committed cells benchmark JSON")
def test_cells_page_tables_match_the_json():
    gen = _generator()
    rows = gen.load()
    assert not gen.stale(rows), "run: python docs/gen_cells.py"
    rows[0]["speedup"] = 123.0  # the generator reads the numbers
    assert "123.00x" in gen.tables(rows)
