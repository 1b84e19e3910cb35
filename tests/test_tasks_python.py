"""Each task from Python on data in memory, through rnnkit.train, then used: generate, predict, sort."""
from __future__ import annotations

import pytest
import torch

import rnnkit
from rnnkit.common.errors import UsageError

QUIET = dict(threads=1, device="cpu", plot=False, progress="lines", warmup_steps=0)


def test_a_language_model_from_strings_then_generates(tmp_path):
    from rnnkit.tasks.lm.generate import generate_batch

    text = "the cat sat on the mat. " * 40
    _, summary = rnnkit.train("lm", data=[text, text.upper()], hidden=16, layers=1, embed=8, seq_len=16,
                              batch_size=4, steps=6, eval_every=6, sample_chars=0, out=tmp_path / "lm", **QUIET)
    assert summary["step"] == 6 and (tmp_path / "lm" / "text.txt").is_file()
    run = rnnkit.load_run(tmp_path / "lm")
    sample = "".join(piece[0] for piece in generate_batch(run.model, run.task.vocab, "the ", 20, seed=0))
    assert len(sample) == 20 and set(sample) <= set(text + text.upper() + "\n")  # documents joined by blank lines


def test_a_classifier_from_lists_then_predicts(tmp_path):
    texts = [f"good {i} fine great" if i % 2 else f"bad {i} awful poor" for i in range(40)]
    labels = ["pos" if i % 2 else "neg" for i in range(40)]
    _, summary = rnnkit.train("classify", data=(texts, labels), hidden=8, layers=1, e_dim=8, seq_len=24,
                              batch_size=8, steps=4, eval_every=4, val_fraction=0.2, out=tmp_path / "c", **QUIET)
    assert summary["step"] == 4
    run = rnnkit.load_run(tmp_path / "c")
    probabilities = run.task.predict(run.model, ["good day", "bad day"])
    assert probabilities.shape == (2, 2) and torch.allclose(probabilities.sum(1), torch.ones(2))
    assert sorted(run.task.names) == ["neg", "pos"]


def test_a_sorter_from_python_then_sorts(tmp_path):
    rnnkit.train("sort", decoder="pointer", min_len=2, max_len=6, hidden=16, embed=8, attn=8, batch_size=16,
                 eval_size=20, steps=4, eval_every=4, out=tmp_path / "s", **QUIET)
    run = rnnkit.load_run(tmp_path / "s")
    out = run.task.sort_line(run.model, "5 3 9 1", "argument").split()
    assert sorted(out) == sorted(["5", "3", "9", "1"])  # a pointer permutes its inputs


def test_in_memory_data_a_task_cannot_take_is_refused(tmp_path):
    with pytest.raises(UsageError, match="a classifier's data= is a path, \\(texts, labels\\)"):
        rnnkit.train("classify", data=[1, 2, 3], out=tmp_path / "x")
    with pytest.raises(UsageError, match=r"rnnkit.train\('sort'\) got unknown option\(s\) data; the task's are attn"):
        rnnkit.train("sort", data=[1, 2], out=tmp_path / "y")  # the sorter makes its own sequences
