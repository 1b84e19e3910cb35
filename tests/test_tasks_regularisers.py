"""The recurrent regularisers as task options (`--input-dropout`, `--output-dropout`, `--weight-drop`,
`--zoneout`, `--recurrent-dropout`): parsed and checked, off by default with the model exactly as
without them, on in training, recorded in the run, rebuilt by every later command, resumed exactly."""

from __future__ import annotations

import json
import os
import signal

import pytest
import torch

import rnnkit
from rnnkit.cli.main import main
from rnnkit.core import Regularised
from rnnkit.engine.rundir import load_run
from rnnkit.tasks.classify.model import ByteClassifier
from rnnkit.tasks.classify.task import ClassifyConfig
from rnnkit.tasks.forecast.model import ForecastNet
from rnnkit.tasks.lm import CharRNN, LMConfig, LMTask
from rnnkit.tasks.regularisers import RegulariserOptions, without_regularisers
from rnnkit.tasks.sort.model import SortModel
from rnnkit.tasks.sort.task import SortConfig
from test_lm import TEXT

ON = {"input_dropout": 0.1, "output_dropout": 0.2, "weight_drop": 0.25, "zoneout": 0.1, "recurrent_dropout": 0.1}
FLAGS = [f"--{name.replace('_', '-')}" for name in ON]
LM = ["--hidden", "16", "--layers", "2", "--embed", "8", "--seq-len", "8", "--batch-size", "4", "--sample-chars", "0"]
QUIET = ["--threads", "1", "--no-plot", "--progress", "lines", "--log-every", "1", "--warmup-steps", "2"]


def on_flags(**values: float) -> list[str]:
    return [text for name, p in (ON | values).items() for text in (f"--{name.replace('_', '-')}", str(p))]


def train_losses(run) -> list[tuple[int, float]]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["train_loss"]) for r in rows if "train_loss" in r]


# ---- flags ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("task", ["lm", "classify", "sort", "forecast"])
def test_every_task_with_a_recurrent_layer_has_the_five_flags(task, capsys):
    assert main(["train", task, "--help"]) == 0
    out = capsys.readouterr().out
    assert f"{task} task: recurrent regularisers:" in out
    assert all(flag in out for flag in FLAGS)


@pytest.mark.parametrize("flag", FLAGS)
@pytest.mark.parametrize("value", ["1", "-0.1"])
def test_a_value_outside_0_1_is_one_line_naming_the_flag(flag, value, tmp_path, capsys):
    assert main(["train", "lm", flag, value, "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert err == f"rnnkit: error: {flag} must be in [0, 1), got {float(value)}\n"
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    "cell, flag, message",
    [
        ("mingru", "--weight-drop", "--weight-drop: the MinGRUCell cell has no recurrent weights"),
        ("minlstm", "--recurrent-dropout", "--recurrent-dropout: the MinLSTMCell cell reads no previous output"),
    ],
)
def test_a_regulariser_the_cell_has_nothing_for_is_refused(cell, flag, message, tmp_path, capsys):
    assert main(["train", "lm", "--cell", cell, flag, "0.2", "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err and "Traceback" not in err
    # what does apply to them is accepted: zoneout and the variational dropouts
    LMConfig(cell=cell, zoneout=0.1, input_dropout=0.1, output_dropout=0.1)


def test_a_value_that_is_not_a_number_is_an_argparse_error(tmp_path, capsys):
    assert main(["train", "classify", "--zoneout", "lots", "--out", str(tmp_path / "run")]) == 2
    assert "--zoneout" in capsys.readouterr().err


# ---- the model ----------------------------------------------------------------------------------------
def test_all_zero_builds_the_model_as_without_the_options_and_any_wraps_the_layer_only():
    torch.manual_seed(0)
    plain = CharRNN(12, LMConfig(hidden=8, layers=1, embed=4))
    assert type(plain.rnn) is rnnkit.GRU and not any(isinstance(m, Regularised) for m in plain.modules())
    weights = ("weight_ih", "weight_hh", "bias_ih", "bias_hh")
    assert list(plain.state_dict()) == [  # the keys of every checkpoint written before these options
        "embed.weight",
        *(f"rnn.{w}_l0" for w in weights),
        "head.weight",
        "head.bias",
    ]
    torch.manual_seed(0)
    wrapped = CharRNN(12, LMConfig(hidden=8, layers=1, embed=4, **ON))
    assert isinstance(wrapped.rnn, Regularised) and type(wrapped.rnn.layer) is rnnkit.GRU
    assert (wrapped.rnn.weight_drop, wrapped.rnn.zoneout, wrapped.rnn.recurrent_dropout) == (0.25, 0.1, 0.1)
    assert list(wrapped.state_dict()) == [k.replace("rnn.", "rnn.layer.") for k in plain.state_dict()]
    # the wrapper draws nothing when it is made: the same seed, the same initial weights
    stripped = without_regularisers(wrapped)
    assert all(torch.equal(a, b) for a, b in zip(stripped.state_dict().values(), plain.state_dict().values()))
    assert list(stripped.state_dict()) == list(plain.state_dict())

    for model in (
        ByteClassifier(ClassifyConfig(hidden=8, e_dim=8, layers=1, embed=8, buckets=16, dropout=0.0), num_classes=3),
        ForecastNet(8, 2, 4, hidden=8),
    ):
        assert type(model.rnn) is rnnkit.GRU  # all 0: the layer itself
    classifier = ByteClassifier(
        ClassifyConfig(hidden=8, e_dim=8, layers=1, embed=8, buckets=16, dropout=0.0, zoneout=0.1), 3
    )
    assert isinstance(classifier.rnn, Regularised) and classifier.rnn.layer.bidirectional
    assert isinstance(ForecastNet(8, 2, 4, hidden=8, regularisers=RegulariserOptions(weight_drop=0.3)).rnn, Regularised)


def test_weight_drop_reaches_the_built_in_layers_recurrent_weights():
    """`--cell lstm` builds rnnkit.LSTM, whose parameters carry torch.nn's names (weight_hh_l0, ...
    _reverse): each is dropped, as if the masked weights were the layer's own."""
    torch.manual_seed(0)
    layer = rnnkit.LSTM(4, 8, num_layers=2, bidirectional=True, batch_first=True)
    regularised = Regularised(layer, weight_drop=0.5).train()
    x = torch.randn(3, 5, 4)
    masks = regularised.sample_masks(x)
    assert set(masks.weights) == {f"weight_hh_l{k}{d}" for k in (0, 1) for d in ("", "_reverse")}
    out, _ = regularised(x, masks=masks)
    dropped = rnnkit.LSTM(4, 8, num_layers=2, bidirectional=True, batch_first=True)
    dropped.load_state_dict(layer.state_dict())
    with torch.no_grad():
        for name, mask in masks.weights.items():
            getattr(dropped, name).mul_(mask)
    torch.testing.assert_close(out, dropped(x)[0], rtol=0, atol=1e-6)


def test_the_sorter_regularises_its_encoder_only_and_evaluates_as_the_plain_model():
    """The decoder runs one step at a time, where a mask meant for a whole sequence would be drawn again at
    every step: the encoder alone is wrapped, and in evaluation the model computes what it computes
    without the wrapper."""
    config = SortConfig(vocab=10, embed=8, hidden=8, attn=8, zoneout=0.2, output_dropout=0.2, weight_drop=0.3)
    model = SortModel("pointer", 10, False, embed=8, hidden=8, num_layers=1, attn=8, cell="lstm", regularisers=config)
    assert isinstance(model.encoder, Regularised)
    assert not any(isinstance(m, Regularised) for m in model.decoder.modules())
    x = torch.randint(0, 10, (3, 5))
    order = x.argsort(dim=1, stable=True)
    torch.manual_seed(1)
    _, first = model.train()(x, order)
    torch.manual_seed(1)
    _, again = model(x, order)
    torch.manual_seed(2)
    _, other = model(x, order)
    assert torch.equal(first, again) and not torch.equal(first, other)  # masks from the global generator
    model.eval()
    with torch.no_grad():
        logits, loss = model(x, order)
        plain_logits, plain_loss = without_regularisers(model)(x, order)
    assert torch.equal(logits, plain_logits) and torch.equal(loss, plain_loss)


def test_a_carried_state_of_several_parts_survives_the_checkpoint():
    """The stateful lm saves its carried state by field name; an LSTM's (h, c) comes back as the
    cell's State, not dropped (which would make --resume of a stateful LSTM start from a zero state)."""
    from rnnkit.tasks.lm.model import state_from_dict, state_to_dict

    h, c = torch.randn(2, 3, 4), torch.randn(2, 3, 4)
    back = state_from_dict(state_to_dict(rnnkit.LSTMState(h, c)), "lstm")
    assert type(back) is rnnkit.LSTMState and torch.equal(back.h, h) and torch.equal(back.c, c)
    assert torch.equal(state_from_dict(state_to_dict(h), "gru"), h)


# ---- runs -------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def lm_run(tmp_path_factory):
    folder = tmp_path_factory.mktemp("regularised")
    (folder / "corpus.txt").write_text(TEXT)
    run = folder / "run"
    flags = ["--data", str(folder / "corpus.txt"), "--cell", "lstm", *LM, *QUIET, *on_flags()]
    assert main(["train", "lm", *flags, "--steps", "6", "--eval-every", "3", "--out", str(run)]) == 0
    return run


def test_a_regularised_run_records_its_values_and_every_command_rebuilds_it(lm_run, tmp_path, capsys):
    saved = json.loads((lm_run / "config.json").read_text())["task_config"]
    assert {name: saved[name] for name in ON} == ON
    loaded = load_run(lm_run)
    assert isinstance(loaded.model.rnn, Regularised) and loaded.model.rnn.zoneout == 0.1
    capsys.readouterr()
    assert main(["eval", str(lm_run), "--json"]) == 0
    metrics = json.loads(capsys.readouterr().out)
    last = [json.loads(line) for line in (lm_run / "metrics.jsonl").read_text().splitlines() if "val_loss" in line]
    assert metrics["loss"] == pytest.approx(last[-1]["val_loss"], abs=1e-6)  # evaluation without the masks
    assert main(["generate", str(lm_run), "--prompt", "the ", "--length", "12", "--seed", "0"]) == 0
    assert capsys.readouterr().out.startswith("the ")
    assert main(["train", "lm", "--resume", str(lm_run), "--zoneout", "0.3"]) == 2
    assert "--zoneout cannot change on --resume (the run has 0.1)" in capsys.readouterr().err
    out = tmp_path / "model.pt2"
    assert main(["export", str(lm_run), "--format", "pt2", "--out", str(out)]) == 0
    assert out.is_file() and f"wrote {out} (pt2)" in capsys.readouterr().out


def test_a_regularised_run_stopped_and_resumed_equals_an_uninterrupted_one(lm_run, tmp_path, monkeypatch):
    """The masks come from torch's global generator, which every checkpoint saves: the same seed gives the
    same run, and a run stopped by SIGTERM and resumed logs the same losses as one never stopped."""
    data = lm_run.parent / "corpus.txt"
    flags = ["--data", str(data), "--cell", "lstm", *LM, *QUIET, *on_flags(), "--steps", "6", "--eval-every", "3"]
    calls = [0]
    loss = LMTask.loss

    def stopping_loss(self, model, batch):
        calls[0] += 1
        if calls[0] == 4:  # the trainer finishes step index 3, saves and returns 128 + 15
            os.kill(os.getpid(), signal.SIGTERM)
        return loss(self, model, batch)

    monkeypatch.setattr(LMTask, "loss", stopping_loss)
    assert main(["train", "lm", *flags, "--out", str(tmp_path / "cut")]) == 143
    monkeypatch.setattr(LMTask, "loss", loss)
    torch.manual_seed(99)  # the resumed run must not depend on the global generator it starts with
    assert main(["train", "lm", "--resume", str(tmp_path / "cut"), "--threads", "1"]) == 0
    whole = train_losses(lm_run)
    assert [s for s, _ in whole] == list(range(1, 7))
    assert train_losses(tmp_path / "cut") == whole  # identical floats, step for step
    # and the regularisers act: the same seed without them trains differently
    plain = ["--data", str(data), "--cell", "lstm", *LM, *QUIET, "--steps", "2", "--eval-every", "2"]
    assert main(["train", "lm", *plain, "--out", str(tmp_path / "plain")]) == 0
    assert train_losses(tmp_path / "plain")[1] != whole[1]


def test_a_regularised_classifier_trains_from_python_and_evaluates(tmp_path, capsys):
    texts = [f"good {i} fine great" if i % 2 else f"bad {i} awful poor" for i in range(40)]
    labels = ["pos" if i % 2 else "neg" for i in range(40)]
    _, summary = rnnkit.train(
        "classify",
        data=(texts, labels),
        hidden=8,
        layers=1,
        e_dim=8,
        dropout=0.0,
        seq_len=24,
        batch_size=8,
        steps=3,
        eval_every=3,
        val_fraction=0.2,
        out=tmp_path / "c",
        threads=1,
        device="cpu",
        plot=False,
        progress="lines",
        warmup_steps=0,
        **ON,
    )
    assert summary["step"] == 3
    assert isinstance(rnnkit.load_run(tmp_path / "c").model.rnn, Regularised)
    capsys.readouterr()
    assert main(["eval", str(tmp_path / "c"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["loss"] == pytest.approx(summary["val"]["loss"], abs=1e-6)
