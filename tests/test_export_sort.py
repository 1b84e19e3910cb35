"""`rnnkit export` of a sorter run: its encoder and one decoder step, two files that greedy and beam
decoding drive step by step, reproduce the run's validation metrics, for the attention decoder and
for the pointer decoder (the default), at batch sizes and lengths other than the example's."""

from __future__ import annotations

import pytest
import torch

from rnnkit.cli.export import EXPORTERS
from rnnkit.cli.main import main
from rnnkit.engine.rundir import load_run
from rnnkit.tasks.sort.search import choose
from test_sort_cli import TINY


def _train(out, *decoder: str):
    args = ["train", "sort", "--min-len", "3", "--max-len", "4", "--vocab", "10", "--beam", "2", *TINY]
    assert main([*args, *decoder, "--out", str(out)]) == 0
    return out


@pytest.fixture(scope="module")
def pointer_run(tmp_path_factory):
    """The default decoder, the pointer."""
    return _train(tmp_path_factory.mktemp("sort") / "pointer")


@pytest.fixture(scope="module")
def attention_run(tmp_path_factory):
    return _train(tmp_path_factory.mktemp("sort") / "attention", "--decoder", "attention")


@pytest.fixture(params=["attention", "pointer"])
def sort_run(request):
    return request.getfixturevalue(f"{request.param}_run")


def _formats():
    return [pytest.param("onnx", id="onnx"), pytest.param("pt2", id="pt2")]


def _needs(fmt: str) -> None:
    if fmt == "onnx":
        pytest.importorskip("onnxruntime")
        pytest.importorskip("onnxscript")


@pytest.mark.parametrize("fmt", _formats())
def test_export_reproduces_the_sorters_metrics(sort_run, fmt, tmp_path, capsys):
    _needs(fmt)
    capsys.readouterr()
    out = tmp_path / f"sorter.{fmt}"
    assert main(["export", str(sort_run), "--format", fmt, "--out", str(out)]) == 0
    assert out.is_file() and (tmp_path / f"sorter-step.{fmt}").is_file()
    lines = [line.split() for line in capsys.readouterr().out.splitlines() if line.startswith("  ")]
    metrics = {words[0]: (float(words[2]), float(words[4])) for words in lines}
    assert {"loss", "accuracy", "exact", "accuracy@3", "accuracy@4"} <= set(metrics)
    for eager, shipped in metrics.values():
        assert abs(eager - shipped) <= 1e-4


@pytest.mark.parametrize("fmt", _formats())
def test_exported_pointer_decoder_takes_any_batch_and_length(pointer_run, tmp_path, fmt):
    """The pointer decoder's step file is written at one example length; greedy and beam decoding through
    it choose exactly what the eager model chooses at other lengths (1 to 9) and batch sizes, and its
    teacher-forced logits match."""
    _needs(fmt)
    loaded = load_run(pointer_run)
    model = loaded.model.eval()
    assert model.decoder_name == "pointer"
    exported = EXPORTERS["sort"](loaded, fmt, tmp_path / f"sorter.{fmt}")
    generator = torch.Generator().manual_seed(0)
    for B, N in ((1, 1), (4, 2), (2, 4), (5, 9)):
        x = torch.randint(0, 10, (B, N), generator=generator)
        for beam in (1, 2):
            assert torch.equal(choose(exported, x, beam), choose(model, x, beam)), (B, N, beam)
        order = x.argsort(dim=1, stable=True)
        with torch.no_grad():
            eager_logits, eager_loss = model(x, order)
            shipped_logits, shipped_loss = exported(x, order)
        finite = eager_logits.isfinite()
        assert torch.equal(finite, shipped_logits.isfinite())  # the same positions masked as chosen
        torch.testing.assert_close(shipped_logits[finite], eager_logits[finite], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(shipped_loss, eager_loss, atol=1e-5, rtol=1e-5)
