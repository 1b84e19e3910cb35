"""The cells' benchmark rows run end to end (tiny sizes: no meaningful numbers) and say what they measured."""

from __future__ import annotations

import json

from rnnkit.bench import cells


def test_rows_compare_every_cell_with_the_lstm_and_write_json(tmp_path):
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
    assert [(r["cell"], r["steps"]) for r in rows] == [
        ("mingru", 4),
        ("minlstm", 4),
        ("ln-lstm", 4),
        ("lstm+regularised", 4),
        ("mingru", 300),
        ("minlstm", 300),
        ("mingru", 4096),
        ("minlstm", 4096),
    ]
    for row in rows:
        assert row["lstm_ms"] > 0 and row["cell_ms"] > 0
        assert abs(row["speedup"] - row["lstm_ms"] / row["cell_ms"]) < 1e-9
        assert row["speedup_q1"] <= row["speedup_q3"]
        assert row["met"] == (row["speedup"] >= row["target"])
    assert {r["cell_route"] for r in rows if r["cell"].startswith("min")} == {"parallel-scan"}


def test_rotation_runs_each_function_once_per_repeat_in_a_rotated_order():
    calls = []
    times = cells.rotated({name: (lambda n=name: calls.append(n)) for name in "abc"}, repeats=3)
    assert calls == list("abc") + list("abc") + list("bca") + list("cab")
    assert {k: len(v) for k, v in times.items()} == {"a": 3, "b": 3, "c": 3}
