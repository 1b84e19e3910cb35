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
    assert (
        main(
            [
                "train",
                "classify",
                "--data",
                str(data),
                "--out",
                str(run),
                *TINY,
                "--steps",
                "10",
                "--lr",
                "1e-2",
                "--warmup-steps",
                "2",
                "--eval-every",
                "10",
                "--progress",
                "lines",
                "--no-plot",
            ]
        )
        == 0
    )
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


def test_export_reproduces_the_language_models_metrics(tmp_path, capsys):
    """The language model as a step function (tokens and state in, logits and state out), run over
    the validation text chunk by chunk through onnxruntime: the run's loss and bits per character."""
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    from test_lm import TEXT

    data = tmp_path / "corpus.txt"
    data.write_text(TEXT)
    run = tmp_path / "run"
    assert (
        main(
            [
                "train",
                "lm",
                "--data",
                str(data),
                "--hidden",
                "16",
                "--layers",
                "2",
                "--embed",
                "8",
                "--seq-len",
                "8",
                "--batch-size",
                "4",
                "--steps",
                "4",
                "--eval-every",
                "4",
                "--no-plot",
                "--progress",
                "lines",
                "--threads",
                "1",
                "--out",
                str(run),
            ]
        )
        == 0
    )
    capsys.readouterr()
    assert main(["export", str(run), "--format", "onnx", "--out", str(tmp_path / "lm.onnx")]) == 0
    lines = [line.split() for line in capsys.readouterr().out.splitlines() if line.startswith("  ")]
    metrics = {words[0]: (float(words[2]), float(words[4])) for words in lines}
    assert set(metrics) >= {"loss", "bpc"}
    for eager, shipped in metrics.values():
        assert abs(eager - shipped) <= 1e-4


def test_onnx_inputs_whose_dynamic_dimension_came_out_fixed_are_named(tmp_path):
    """The check behind `--format onnx`: an axis marked dynamic that the file gives a fixed size is
    reported (torch.onnx falls back to the example's size where a model fixes it); named axes and
    inputs the file dropped pass."""
    onnx = pytest.importorskip("onnx")
    from onnx import TensorProto, helper

    from rnnkit.cli.export import fixed_axes

    inputs = [
        helper.make_tensor_value_info("tokens", TensorProto.INT64, ["batch", "length"]),
        helper.make_tensor_value_info("mask", TensorProto.BOOL, ["batch", 5]),
    ]
    output = helper.make_tensor_value_info("out", TensorProto.INT64, ["batch", "length"])
    graph = helper.make_graph([helper.make_node("Identity", ["tokens"], ["out"])], "g", inputs, [output])
    path = tmp_path / "model.onnx"
    onnx.save(helper.make_model(graph), str(path))
    dynamic = {"tokens": {0, 1}, "mask": {0, 1}, "dropped": {0}}
    assert fixed_axes(path, dynamic) == ["mask[1]=5"]
    assert fixed_axes(path, {"tokens": {0, 1}, "mask": {0}}) == []
