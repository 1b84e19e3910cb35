"""`rnnkit export` of a sorter run: its encoder and one decoder step, two files that greedy and beam
decoding drive step by step, reproduce the run's validation metrics."""

from __future__ import annotations

import pytest

from rnnkit.cli.main import main
from test_sort_cli import TINY


@pytest.fixture(scope="module")
def sort_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("sort") / "run"
    args = ["train", "sort", "--min-len", "3", "--max-len", "4", "--vocab", "10", "--beam", "2", *TINY]
    assert main([*args, "--decoder", "attention", "--out", str(out)]) == 0
    return out


@pytest.mark.parametrize("fmt", ["onnx", "pt2"])
def test_export_reproduces_the_sorters_metrics(sort_run, fmt, tmp_path, capsys):
    if fmt == "onnx":
        pytest.importorskip("onnxruntime")
        pytest.importorskip("onnxscript")
    capsys.readouterr()
    out = tmp_path / f"sorter.{fmt}"
    assert main(["export", str(sort_run), "--format", fmt, "--out", str(out)]) == 0
    assert out.is_file() and (tmp_path / f"sorter-step.{fmt}").is_file()
    lines = [line.split() for line in capsys.readouterr().out.splitlines() if line.startswith("  ")]
    metrics = {words[0]: (float(words[2]), float(words[4])) for words in lines}
    assert {"loss", "accuracy", "exact", "accuracy@4"} <= set(metrics)
    for eager, shipped in metrics.values():
        assert abs(eager - shipped) <= 1e-4
