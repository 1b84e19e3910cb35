"""The classify task: data reading and its errors, encoding, the model's length contract, training to
100% on a small generated set, save/load of label names, eval, predict from stdin, the download cache."""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import io
import json
import random
import sys
import warnings
from pathlib import Path

import pytest
import torch

from rnnkit.cli.main import main
from rnnkit.common.errors import UsageError
from rnnkit.tasks.classify import (
    AG_NEWS_CLASSES,
    ByteClassifier,
    ClassifyConfig,
    ClassifyTask,
    ag_news,
    class_names_for,
    data_files,
    encode,
    in_validation,
    read_rows,
    to_split,
)
from rnnkit.tasks.download import RemoteFile

KEYWORDS = {"alpha": "volcano", "beta": "harbour", "gamma": "quartet"}
# the default model at toy size
TINY = [
    "--input",
    "embedding",
    "--ngrams",
    "4",
    "--words",
    "--cell",
    "gru",
    "--layers",
    "1",
    "--pooling",
    "mean",
    "--seq-len",
    "32",
    "--hidden",
    "16",
    "--embed",
    "16",
    "--e-dim",
    "16",
    "--buckets",
    "512",
    "--bag-buckets",
    "512",
    "--patch",
    "4",
    "--dropout",
    "0",
    "--batch-size",
    "24",
    "--val-fraction",
    "0",
]


def write_csv(path: Path, rows: list[list[str]]) -> Path:
    with open(path, "w", newline="", encoding="utf-8") as f:
        csv.writer(f, quoting=csv.QUOTE_ALL, lineterminator="\n").writerows(rows)
    return path


def generated_rows(n: int, seed: int = 0) -> list[list[str]]:
    """Label names (no classes.txt): each text holds its class keyword among random letters."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        label = list(KEYWORDS)[i % 3]
        noise = "".join(rng.choice("abcdefghij ") for _ in range(rng.randint(3, 15)))
        rows.append([label, f"{noise} {KEYWORDS[label]}", rng.choice(["", "naïve", "x y"])])
    return rows


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """A tiny classifier trained on 24 generated rows; shared by the tests that need a run."""
    folder = tmp_path_factory.mktemp("classify")
    data = write_csv(folder / "train.csv", generated_rows(24))
    run = folder / "run"
    torch.manual_seed(0)
    code = main(
        [
            "train",
            "classify",
            "--data",
            str(data),
            "--out",
            str(run),
            *TINY,
            "--steps",
            "30",
            "--lr",
            "1e-2",
            "--warmup-steps",
            "5",
            "--eval-every",
            "30",
            "--progress",
            "lines",
            "--no-plot",
        ]
    )
    assert code == 0
    assert not (run / "confusion.png").exists() and not (run / "confusion.txt").exists()  # training draws nothing
    return run


# ---- training, save / load, eval, predict -------------------------------------------------------------
def test_overfits_a_small_set_to_100_percent(trained, capsys):
    capsys.readouterr()
    assert main(["eval", str(trained), "--data", str(trained.parent / "train.csv"), "--json"]) == 0
    metrics = json.loads(capsys.readouterr().out)
    assert metrics["accuracy"] == 1.0
    assert metrics["rows"] == 24 and metrics["skipped_rows"] == 0
    for name in KEYWORDS:
        assert metrics[f"precision[{name}]"] == metrics[f"recall[{name}]"] == metrics[f"f1[{name}]"] == 1.0
    assert (trained / "confusion.png").stat().st_size > 0
    text = (trained / "confusion.txt").read_text()
    assert "accuracy 1.0000 on 24 rows" in text and all(name in text for name in KEYWORDS)


def test_eval_without_data_writes_the_confusion_matrix_unless_told_not_to(tmp_path, trained, capsys):
    import shutil

    run = tmp_path / "copy"
    shutil.copytree(trained, run)
    for name in ("confusion.txt", "confusion.png"):
        (run / name).unlink(missing_ok=True)
    assert main(["eval", str(run), "--no-confusion", "--json"]) == 0
    assert not (run / "confusion.txt").exists() and not (run / "confusion.png").exists()
    assert main(["eval", str(run), "--json"]) == 0
    assert (run / "confusion.png").stat().st_size > 0
    assert (
        (run / "confusion.txt").read_text().startswith("training rows (--val-fraction 0): accuracy 1.0000 on 24 rows\n")
    )  # the fixture holds out no rows


def test_label_names_survive_save_and_load(trained):
    assert json.loads((trained / "labels.json").read_text()) == {"labels": ["alpha", "beta", "gamma"]}
    config = ClassifyConfig(**json.loads((trained / "config.json").read_text())["task_config"])
    assert ClassifyTask.from_run_dir(config, trained).names == ["alpha", "beta", "gamma"]


def test_predict_reads_stdin_one_line_per_text(trained, capsys, monkeypatch):
    lines = ["abc volcano", "harbour de", "quartet ij naïve"]
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO("\n".join(lines).encode() + b"\n")))
    capsys.readouterr()
    assert main(["predict", str(trained)]) == 0
    assert capsys.readouterr().out.splitlines() == ["alpha", "beta", "gamma"]

    assert main(["predict", str(trained), "hello volcano", "quartet", "--json"]) == 0
    out = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [o["label"] for o in out] == ["alpha", "gamma"]
    for o in out:
        assert set(o["probabilities"]) == set(KEYWORDS)
        assert abs(sum(o["probabilities"].values()) - 1) < 1e-5


def test_predict_refuses_an_empty_line(trained, capsys, monkeypatch):
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(b"volcano\n\n")))
    assert main(["predict", str(trained)]) == 2
    assert capsys.readouterr().err.strip() == "rnnkit: error: stdin, line 2: empty text"


# ---- bad input: each gets a message naming the file and the line ---------------------------------------
BAD_ROWS = {
    "wrong field count": (b'"alpha","a","b"\n"beta","only one text"\n', "line 2: expected 3 fields"),
    "empty text": (b'"alpha","a","b"\n"beta"," ",""\n', "line 2: empty text"),
    "invalid utf-8": (b'"alpha","a","b"\n"beta","caf\xe9","b"\n', "line 2: invalid UTF-8 at byte 11"),
    "unknown label": (b'"alpha","a","b"\n"delta","x","y"\n', "line 2: unknown label 'delta'"),
}


@pytest.mark.parametrize("case", sorted(BAD_ROWS))
def test_bad_rows_are_named_by_file_and_line(tmp_path, case):
    content, message = BAD_ROWS[case]
    path = tmp_path / "bad.csv"
    path.write_bytes(content)
    config = ClassifyConfig()
    with pytest.raises(UsageError, match=rf"{path}, line 2") as info:
        to_split(read_rows(path, False), ["alpha", "beta"], path, config)
    assert message in str(info.value) and "--skip-bad-rows" in str(info.value)

    split, rows = to_split(read_rows(path, True), ["alpha", "beta"], path, ClassifyConfig(skip_bad_rows=True))
    assert rows.skipped == 1 and split.y.tolist() == [0]


def test_training_stops_at_a_bad_row_unless_skipped(tmp_path, capsys):
    rows = generated_rows(12)
    data = write_csv(tmp_path / "train.csv", [*rows[:5], ["beta"], *rows[5:]])
    assert main(["train", "classify", "--data", str(data), "--out", str(tmp_path / "r1"), *TINY, "--steps", "1"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"rnnkit: error: {data}, line 6: expected 3 fields") and "\n" not in err
    assert (
        main(
            [
                "train",
                "classify",
                "--data",
                str(data),
                "--out",
                str(tmp_path / "r2"),
                *TINY,
                "--steps",
                "1",
                "--skip-bad-rows",
                "--progress",
                "lines",
                "--no-plot",
            ]
        )
        == 0
    )
    assert f"skipped 1 bad rows of {data}" in capsys.readouterr().err


def test_unknown_label_against_classes_txt(tmp_path):
    (tmp_path / "classes.txt").write_text("World\nSports\n")
    data = tmp_path / "train.csv"
    data.write_text('"1","a"\n"2","b"\n"3","c"\n')
    files = data_files(str(tmp_path))
    names = class_names_for(read_rows(files.train, False), files.classes)
    assert names == ["World", "Sports"]
    with pytest.raises(UsageError, match=rf"{data}, line 3: unknown label '3'"):
        to_split(read_rows(data, False), names, data, ClassifyConfig())


@pytest.mark.parametrize("content,message", [(None, "does not exist"), (b"", "is empty"), (b"\n \n", "is empty")])
def test_missing_or_empty_file_is_a_one_line_error(tmp_path, capsys, content, message):
    path = tmp_path / "data.csv"
    if content is not None:
        path.write_bytes(content)
    assert main(["train", "classify", "--data", str(path), "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert err == f"rnnkit: error: {path} {message}\n"


# ---- data: labels, encoding, split ---------------------------------------------------------------------
def test_labels_names_or_numbers(tmp_path):
    numbers = write_csv(tmp_path / "n.csv", [["10", "a"], ["2", "b"], ["1", "c"]])
    assert class_names_for(read_rows(numbers, False), None) == ["1", "2", "10"]
    split, _ = to_split(read_rows(numbers, False), ["1", "2", "10"], numbers, ClassifyConfig())
    assert split.y.tolist() == [2, 1, 0]  # numbers that are names are never read as 1-based indices

    (tmp_path / "classes.txt").write_text("World\nSports\nBusiness\n")
    mixed = write_csv(tmp_path / "m.csv", [["3", "a", "b"], ["Sports", "c", "d"]])
    files = data_files(str(mixed))
    assert files.classes == tmp_path / "classes.txt"
    names = class_names_for(read_rows(mixed, False), files.classes)
    split, rows = to_split(read_rows(mixed, False), names, mixed, ClassifyConfig())
    assert split.y.tolist() == [2, 1]
    assert rows.texts == [b"a b", b"c d"]  # text fields joined by one space


def test_encoding_keeps_every_byte_and_true_lengths():
    texts = ["naïve café".encode(), b"abc", bytes(range(250, 256)) * 10]
    x, lengths = encode(texts, 16)
    assert lengths.tolist() == [12, 3, 16]
    assert x.dtype == torch.uint8 and x.shape == (3, 16)
    assert bytes(x[0, :12].tolist()) == texts[0]  # bytes >= 128 kept as their own symbols
    assert x[1, 3:].eq(0).all()
    assert bytes(x[2].tolist()) == texts[2][:16]


def test_validation_split_is_a_stable_hash_of_the_text():
    texts = [f"text {i}".encode() for i in range(2000)]
    chosen = [t for t in texts if in_validation(t, 0.1)]
    assert 150 < len(chosen) < 250
    expected = int.from_bytes(hashlib.sha256(b"text 0").digest()[:8], "big") / 2**64 < 0.1
    assert in_validation(b"text 0", 0.1) == expected
    assert not any(in_validation(t, 0.0) for t in texts)


# ---- model -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "pooling,patch,cell,pairs", [("ends", 1, "lstm", False), ("max", 3, "gru", True), ("mean", 2, "lstm", True)]
)
def test_padding_is_never_read(pooling, patch, cell, pairs):
    """A text's logits are the same alone and in a batch padded for a longer text (random bytes)."""
    config = ClassifyConfig(
        input="embedding",
        ngrams=4,
        words=True,
        pooling=pooling,
        patch=patch,
        cell=cell,
        hidden=8,
        embed=8,
        e_dim=8,
        buckets=64,
        layers=2,
        word_pairs=pairs,
        bag_buckets=101,
    )
    model = ByteClassifier(config, num_classes=3).eval()
    x = torch.randint(0, 256, (2, 11))
    x[:, ::3] = 32  # spaces, so there are words and word pairs
    lengths = torch.tensor([11, 7])
    batched, _ = model(x, lengths)
    alone, _ = model(x[1:, :7], lengths[1:])
    torch.testing.assert_close(batched[1:], alone)


def test_default_configuration_and_the_one_hot_model_of_earlier_versions():
    from rnnkit.engine.config import from_saved

    assert ClassifyConfig() == ClassifyConfig(
        input="embedding",
        ngrams=4,
        words=True,
        patch=8,
        pooling="mean",
        cell="gru",
        hidden=128,
        layers=1,
        dropout=0.2,
        feature_dropout=0.6,
        bag=True,
        max_epochs=8.0,
    )  # the defaults
    config = from_saved(ClassifyConfig, {"hidden": 8, "e_dim": 8})  # a config.json from before those defaults
    assert config == ClassifyConfig(
        input="onehot",
        ngrams=1,
        words=False,
        patch=1,
        pooling="ends",
        cell="lstm",
        hidden=8,
        layers=3,
        e_dim=8,
        dropout=0.0,
        feature_dropout=0.0,
        bag=False,
        max_epochs=None,
    )
    model = ByteClassifier(config, num_classes=4)
    assert model.rnn.input_size == 256 and model.rnn.num_layers == 3 and model.rnn.bidirectional
    logits, loss = model(torch.randint(0, 256, (3, 9)), torch.tensor([9, 4, 1]))
    assert logits.shape == (3, 4) and loss is None
    with pytest.raises(UsageError, match="--ngrams > 1 and --words need --input embedding"):
        ClassifyConfig(input="onehot", ngrams=3)


# ---- the AG News download: through a file:// source, never the network --------------------------------
def test_download_verifies_the_checksum(tmp_path, monkeypatch):
    monkeypatch.setenv("RNNKIT_CACHE", str(tmp_path / "cache"))
    source = write_csv(tmp_path / "test_source.csv", [["1", "title", "body"], ["2", "t", "b"]])
    digest = hashlib.sha256(source.read_bytes()).hexdigest()
    md5 = hashlib.md5(source.read_bytes()).hexdigest()
    good = (
        RemoteFile("train", source.as_uri(), "sha256", digest, "ag_news/train.csv"),
        RemoteFile("test", source.as_uri(), "md5", md5, "ag_news/test.csv"),
    )
    folder = ag_news(good)
    assert folder == tmp_path / "cache" / "ag_news"
    assert (folder / "train.csv").read_bytes() == source.read_bytes()
    assert (folder / "classes.txt").read_text().split("\n")[:4] == AG_NEWS_CLASSES
    source.write_text("changed\n")  # cached files are not downloaded again
    assert ag_news(good) == folder

    bad = RemoteFile("train.csv", source.as_uri(), "sha256", digest, "other/train.csv")
    with pytest.raises(UsageError, match="checksum mismatch for train.csv .* the download was discarded"):
        bad.fetch()
    assert list((tmp_path / "cache" / "other").iterdir()) == []
    absent = RemoteFile("x.csv", (tmp_path / "absent.csv").as_uri(), "sha256", digest, "x.csv")
    with pytest.raises(UsageError, match=r"could not download x.csv from file://\S*absent.csv .*--data PATH"):
        absent.fetch()
    assert not (tmp_path / "cache" / "x.csv").exists()


# ---- the real AG News files, when this machine has them --------------------------------------------------
def shared_file(shared_data: Path, *parts: str) -> Path:
    """A file of the shared data folder, or a clean skip when this machine's copy lacks it."""
    path = shared_data.joinpath(*parts)
    if not path.is_file():
        pytest.skip(f"{path} is absent on this machine")
    return path


def test_ag_news_test_set(shared_data):
    files = data_files(str(shared_file(shared_data, "ag_news", "test.csv")))
    rows = read_rows(files.train, False)
    names = class_names_for(rows, files.classes)
    assert names == AG_NEWS_CLASSES
    split, _ = to_split(rows, names, files.train, ClassifyConfig())
    assert len(split.y) == 7600 and torch.bincount(split.y).tolist() == [1900] * 4


def test_eval_skip_bad_rows_flag(trained, tmp_path, capsys):
    data = tmp_path / "test.csv"
    data.write_bytes(b'"alpha","x volcano","y"\n"omega","a","b"\n"beta","harbour",""\n')
    assert main(["eval", str(trained), "--data", str(data)]) == 2
    assert f"{data}, line 2: unknown label 'omega'" in capsys.readouterr().err
    assert main(["eval", str(trained), "--data", str(data), "--skip-bad-rows", "--json"]) == 0
    metrics = json.loads(capsys.readouterr().out)
    assert metrics["rows"] == 2 and metrics["skipped_rows"] == 1


def test_byte_order_mark_and_blank_lines_are_ignored(tmp_path):
    path = tmp_path / "bom.csv"
    path.write_bytes(b'\xef\xbb\xbf"spam","buy now"\n\n"ham","see you"\n')
    rows = read_rows(path, False)
    assert rows.labels == ["spam", "ham"] and rows.lines == [1, 3]


def test_word_features_hash_whole_words_and_pairs():
    from rnnkit.tasks.classify import word_ids

    ids = word_ids(torch.tensor([list(b"the cat. the cat dog")]), 1000, pairs=True)[0]  # (T, 2)
    words, pairs = ids[:, 0], ids[:, 1]
    assert words[:3].tolist() == words[9:12].tolist() and words[4:7].tolist() == words[13:16].tolist()
    assert words[2] != words[6]  # "the" != "cat"
    assert pairs[4:7].tolist() == pairs[13:16].tolist()  # "cat" after "the", twice
    assert pairs[9:12].tolist() != pairs[:3].tolist()  # "the" after "cat" vs "the" at the start
    assert pairs[:3].eq(0).all() and pairs[3] == 0  # no previous word; not in a word


def test_predict_texts_may_come_before_and_after_flags(trained, capsys):
    capsys.readouterr()
    assert main(["predict", str(trained), "abc volcano", "--json", "quartet ij naive"]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [line["label"] for line in lines] == ["alpha", "gamma"]
    assert main(["predict", str(trained), "abc volcano", "--bogus"]) == 2


@pytest.mark.parametrize("cell", ["lstm", "gru", "rnn"])
def test_one_layer_classifier_builds_without_the_between_layer_dropout_warning(cell):
    """One layer has no dropout between layers: the default --dropout 0.2 goes to the inputs and the
    classifier only, torch.nn's layers do not warn, and a run saved when the layer got 0.2 loads the same."""
    from rnnkit.tasks.cell_spec import recurrent_layer

    config = ClassifyConfig(cell=cell, hidden=8, e_dim=8)
    assert config.layers == 1 and config.dropout == 0.2  # the defaults
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model = ByteClassifier(config, num_classes=3).eval()
    assert model.rnn.dropout == 0.0 and model.dropout.p == 0.2
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        before = recurrent_layer(cell, model.rnn.input_size, 8, 1, batch_first=True, dropout=0.2, bidirectional=True)
    model.rnn.load_state_dict(before.state_dict())  # strict: the same parameters as before
    two = ByteClassifier(dataclasses.replace(config, layers=2), num_classes=3)
    assert two.rnn.dropout == 0.2  # several layers: --dropout between them, as before


def test_feature_dropout_drops_whole_hashed_vectors_in_training_only():
    """--feature-dropout: in training each byte's input is its byte vector plus 1/(1-p) times the sum
    of a subset of its hashed n-gram and word vectors; in eval, all of them, as without it."""
    import itertools

    from rnnkit.tasks.classify import ngram_ids, word_ids

    p = 0.5
    config = ClassifyConfig(ngrams=4, words=True, hidden=8, embed=8, e_dim=8, buckets=97, feature_dropout=p)
    model = ByteClassifier(config, num_classes=3)
    x = torch.tensor([list(b"the cat sat on the mat, twice")])
    ids = torch.cat([ngram_ids(x, 4, 97), word_ids(x, 97)], dim=2)[0]  # (T, F)
    byte = model.byte_embedding(x)[0]
    table = model.ngram_embedding.weight
    plain = ByteClassifier(dataclasses.replace(config, feature_dropout=0.0), num_classes=3)
    plain.load_state_dict(model.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(model.eval().inputs(x), plain.eval().inputs(x))
        torch.manual_seed(0)
        dropped = (model.train().inputs(x)[0] - byte) * (1 - p)  # (T, E)
    kept_counts, kept_subsets = [], []
    for t in range(x.shape[1]):
        vectors = table[ids[t]].detach()  # (F, E)
        subsets = [s for r in range(5) for s in itertools.combinations(range(4), r)]
        sums = torch.stack([vectors[list(s)].sum(0) if s else torch.zeros(8) for s in subsets])
        errors = (sums - dropped[t]).abs().amax(dim=1)
        assert errors.min() < 1e-5, f"byte {t} is not a subset of its feature vectors"
        kept_counts.append(len(subsets[int(errors.argmin())]))
        kept_subsets.append(subsets[int(errors.argmin())])
    kept = sum(kept_counts) / (4 * len(kept_counts))
    assert 0.25 < kept < 0.75  # about half of 116 features kept
    assert len(set(kept_subsets)) > 4  # drawn per byte, not one mask for the text
    with pytest.raises(UsageError, match="--feature-dropout must be in"):
        ClassifyConfig(feature_dropout=1.0)
    # the one-hot model of earlier versions has no hashed features: the default drops nothing there
    onehot = ClassifyConfig(input="onehot", ngrams=1, words=False, patch=1, hidden=8, e_dim=8)
    assert onehot.feature_dropout == 0.6
    logits, _ = ByteClassifier(onehot, num_classes=3).train()(x, torch.tensor([x.shape[1]]))
    assert logits.shape == (1, 3)


def test_bag_model_is_the_mean_of_its_words_and_word_pairs_trained_on_its_own_loss():
    """--bag: a second model, the mean of the vectors of the text's words and word pairs (within its
    length), trained on its own cross-entropy beside the recurrent model's; the prediction adds the
    two models' log-probabilities."""
    from torch.nn import functional as F

    from rnnkit.tasks.classify import word_ids

    config = ClassifyConfig(hidden=8, embed=8, e_dim=8, buckets=97, bag_buckets=101)
    model = ByteClassifier(config, num_classes=3).eval()
    x = torch.tensor([list(b"ab cd, ef gh")])  # words end at bytes 1, 4, 8, 11
    ids = word_ids(x, 101, pairs=True)[0]
    table = model.bag.weight.detach()
    for length, ends in [(12, [1, 4, 8, 11]), (9, [1, 4, 8]), (2, [1])]:
        rows = [table[ids[t, 0]] for t in ends] + [table[ids[t, 1]] for t in ends[1:]]
        expected = model.bag_classifier(torch.stack(rows).mean(0))
        torch.testing.assert_close(model.bag_logits(x, torch.tensor([length]))[0], expected)
    lengths, y = torch.tensor([12]), torch.tensor([2])
    logits, loss = model(x, lengths, y)
    without = ByteClassifier(dataclasses.replace(config, bag=False), num_classes=3).eval()
    without.load_state_dict({k: v for k, v in model.state_dict().items() if not k.startswith("bag")})
    recurrent, _ = without(x, lengths)
    bag = model.bag_logits(x, lengths)
    torch.testing.assert_close(logits, recurrent.log_softmax(1) + bag.log_softmax(1))
    torch.testing.assert_close(loss, F.cross_entropy(recurrent, y) + F.cross_entropy(bag, y))
    assert ByteClassifier(dataclasses.replace(config, bag=False), num_classes=3).bag is None


def test_max_epochs_ends_a_time_budget_after_that_many_passes(tmp_path, capsys):
    """--max-epochs under a --time-budget: 24 training rows in batches of 24, 3 passes = 3 steps, long
    before the budget; the best checkpoint and the learning rate's decay come from those steps."""
    data = write_csv(tmp_path / "train.csv", generated_rows(24))
    args = ["train", "classify", "--data", str(data), *TINY, "--warmup-steps", "0", "--progress", "lines"]
    run = tmp_path / "run"
    assert main([*args, "--max-epochs", "3", "--time-budget", "600", "--out", str(run), "--no-plot"]) == 0
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert max(r["step"] for r in rows) == 3 and "done at step 3" in capsys.readouterr().err
    assert main([*args, "--max-epochs", "0", "--time-budget", "600", "--out", str(tmp_path / "bad")]) == 2
    assert "--max-epochs must be positive" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()


def test_eval_scores_each_of_the_two_models_alone(trained, tmp_path, capsys):
    """With --bag, `rnnkit eval` also reports the recurrent model's and the bag-of-words model's own
    accuracy: each text's argmax of ByteClassifier.parts, one text at a time, against its label."""
    from rnnkit.engine.rundir import load_run

    data = write_csv(tmp_path / "mixed.csv", generated_rows(30, seed=5))
    capsys.readouterr()
    assert main(["eval", str(trained), "--data", str(data), "--json", "--no-confusion"]) == 0
    metrics = json.loads(capsys.readouterr().out)
    run = load_run(trained)
    right = {"recurrent": 0, "bag": 0}
    for label, *fields in generated_rows(30, seed=5):
        x, lengths = encode([" ".join(fields).encode()], run.task.config.seq_len)
        with torch.no_grad():
            recurrent, bag = run.model.parts(x, lengths)
        right["recurrent"] += int(recurrent.argmax()) == run.task.names.index(label)
        right["bag"] += int(bag.argmax()) == run.task.names.index(label)
    assert metrics["recurrent_accuracy"] == pytest.approx(right["recurrent"] / 30)
    assert metrics["bag_accuracy"] == pytest.approx(right["bag"] / 30)
