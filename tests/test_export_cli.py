"""`rnnkit export RUN_DIR --format onnx|pt2 --out FILE` writes a file that reproduces the run's metrics."""
from __future__ import annotations

import pytest
import torch

from rnnkit.cli.main import main
from test_classify import TINY, generated_rows, write_csv


@pytest.fixture(scope="module")
def classifier_run(tmp_path_factory):
    folder = tmp_path_factory.mktemp("export")
    data = write_csv(folder / "train.csv", generated_rows(24))
    torch.manual_seed(0)
    run = folder / "run"
    assert main(["train", "classify", "--data", str(data), "--out", str(run), *TINY, "--steps", "10",
                 "--lr", "1e-2", "--warmup-steps", "2", "--eval-every", "10", "--progress", "lines", "--no-plot"]) == 0
    return run


@pytest.mark.parametrize("fmt", ["onnx", "pt2"])
def test_export_reproduces_the_classifiers_metrics(classifier_run, fmt, tmp_path, capsys):
    if fmt == "onnx":
        pytest.importorskip("onnxruntime")
        pytest.importorskip("onnxscript")
    out = tmp_path / f"model.{fmt}"
    assert main(["export", str(classifier_run), "--format", fmt, "--out", str(out)]) == 0
    assert out.is_file() and out.stat().st_size > 0
    lines = [line.split() for line in capsys.readouterr().out.splitlines() if line.startswith("  ")]
    metrics = {words[0]: (float(words[2]), float(words[4])) for words in lines}
    assert "accuracy" in metrics and "loss" in metrics
    for eager, shipped in metrics.values():
        assert abs(eager - shipped) <= 1e-4


def test_export_names_the_tasks_it_handles(tmp_path, capsys):
    assert main(["export", str(tmp_path), "--format", "onnx", "--out", str(tmp_path / "m.onnx")]) == 2
