"""The lm task: data, vocabulary, stateful training, generation, the generate command."""

from __future__ import annotations

import hashlib
import json
import math
import re

import pytest
import torch

from rnnkit.cli.main import main
from rnnkit.common.errors import UsageError
from rnnkit.tasks import lm
from rnnkit.tasks.download import RemoteFile
from rnnkit.tasks.lm import CharRNN, LMConfig, LMTask, Sampler, Vocab, generate, generate_batch

TEXT = "the quick brown fox jumps over the lazy dog. " * 8


def tiny_task(tmp_path, text=TEXT, **overrides) -> LMTask:
    path = tmp_path / "corpus.txt"
    path.write_text(text, encoding="utf-8")
    fields = (
        dict(data=str(path), hidden=32, layers=1, embed=16, seq_len=16, batch_size=4, dropout=0.0, sample_chars=20)
        | overrides
    )
    return LMTask.create(LMConfig(**fields), tmp_path / "run")


def random_model(vocab_size: int, cell: str = "lstm", layers: int = 2) -> CharRNN:
    torch.manual_seed(1)
    return CharRNN(vocab_size, LMConfig(hidden=24, layers=layers, embed=8, cell=cell)).eval()


# ---- learning -------------------------------------------------------------------------------------
def test_overfits_a_tiny_text(tmp_path):
    task = tiny_task(tmp_path, text="abcdefghij" * 40, hidden=32, seq_len=10, batch_size=4)
    torch.manual_seed(0)
    model = task.build_model()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-2)
    for step in range(60):
        loss, n = task.loss(model, task.train_batch(step, 0, 1))
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert n == 4 * 10
    assert loss.item() < 0.05
    model.eval()
    assert task.evaluate(model)["loss"] < 0.1
    assert "".join(generate(model, task.vocab, prompt="cde", length=12, temperature=0)) == "fghijabcdefg"


def test_stateful_rows_read_on_contiguously_and_carry_state(tmp_path):
    task = tiny_task(tmp_path, text="".join(chr(ord("a") + i % 26) for i in range(2000)), cell="lstm")
    b0, b1 = task.train_batch(0, 0, 1), task.train_batch(1, 0, 1)
    assert b0.reset and not b1.reset
    assert torch.equal(b0.y[:, -1], b1.x[:, 0])  # each row continues where the previous step stopped
    assert torch.equal(b0.y[:, :-1], b0.x[:, 1:])  # targets are the inputs shifted by one
    model = task.build_model()
    task.loss(model, b0)
    carried = task.tensor_state()
    assert set(carried) == {"h", "c"} and carried["h"].shape == (1, 4, 32) and not carried["h"].requires_grad
    # the second step starts from the first step's final state: same loss as running both chunks as one
    loss1, _ = task.loss(model, b1)
    x, y = torch.cat([b0.x, b1.x], 1), torch.cat([b0.y, b1.y], 1)
    whole = torch.nn.functional.cross_entropy(
        model(x).logits[:, 16:].reshape(-1, len(task.vocab)), y[:, 16:].reshape(-1)
    )
    assert torch.allclose(loss1, whole, atol=1e-5)


def test_checkpointed_state_resumes_exactly(tmp_path):
    task = tiny_task(tmp_path, text="".join(chr(ord("a") + i % 26) for i in range(2000)), cell="gru")
    model = task.build_model()
    task.loss(model, task.train_batch(0, 0, 1))
    saved = {k: v.clone() for k, v in task.tensor_state().items()}
    expected, _ = task.loss(model, task.train_batch(1, 0, 1))
    other = tiny_task(tmp_path, text="".join(chr(ord("a") + i % 26) for i in range(2000)), cell="gru")
    other.load_tensor_state(saved)
    again, _ = other.loss(model, other.train_batch(1, 0, 1))
    assert torch.equal(expected, again)


def test_random_windows_are_a_pure_function_of_the_step(tmp_path):
    task = tiny_task(tmp_path, windows="random")
    a, b = task.train_batch(5, 0, 1), task.train_batch(5, 0, 1)
    assert a.reset and torch.equal(a.x, b.x) and not torch.equal(a.x, task.train_batch(6, 0, 1).x)
    halves = [task.train_batch(5, r, 2).x for r in (0, 1)]  # two processes split the same global batch
    assert torch.equal(torch.cat(halves), a.x)


def test_text_too_short_for_the_batch_is_a_clear_error(tmp_path):
    task = tiny_task(tmp_path, text="short text, still short", batch_size=4, seq_len=16)
    with pytest.raises(UsageError, match="too short for --batch-size 4 x --seq-len 16"):
        task.train_batch(0, 0, 1)


# ---- generation -----------------------------------------------------------------------------------
def test_same_seed_same_sample_and_batch_matches_single(tmp_path):
    vocab = Vocab.from_text(TEXT)
    model = random_model(len(vocab))
    one = "".join(generate(model, vocab, "the ", 40, temperature=1.0, seed=7))
    assert one == "".join(generate(model, vocab, "the ", 40, temperature=1.0, seed=7))
    assert one != "".join(generate(model, vocab, "the ", 40, temperature=1.0, seed=8))
    batch = ["".join(s) for s in zip(*generate_batch(model, vocab, "the ", 40, seed=7, num_samples=3))]
    assert len(batch) == 3 and len(set(batch)) == 3 and all(len(s) == 40 for s in batch)
    greedy = "".join(generate(model, vocab, "the ", 30, temperature=0))
    assert greedy == "".join(generate(model, vocab, "the ", 30, temperature=1.0, top_k=1, seed=3))


@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_carried_state_gives_the_same_distribution_as_the_whole_sequence(cell):
    vocab = Vocab.from_text(TEXT)
    model = random_model(len(vocab), cell)
    prompt = "the lazy "
    sampler = Sampler(model, temperature=1.0, seed=0)
    sampler.feed(torch.tensor(vocab.encode(prompt)))
    ids, step_probs = vocab.encode(prompt), []
    for _ in range(25):  # one step per generated character, state carried
        step_probs.append(sampler.probs()[0])
        nxt = sampler.draw()
        ids.append(int(nxt))
        sampler.feed(nxt[:, None])
    with torch.no_grad():
        whole = torch.softmax(model(torch.tensor([ids])).logits[0], -1)  # prompt + generated, one pass
    for i, p in enumerate(step_probs):
        torch.testing.assert_close(p, whole[len(prompt) - 1 + i], atol=1e-5, rtol=1e-4)


def test_top_k_and_top_p_restrict_the_distribution():
    vocab = Vocab.from_text(TEXT)
    sampler = Sampler(random_model(len(vocab)), temperature=1.0, top_k=3)
    sampler.feed(torch.tensor(vocab.encode("the")))
    assert int((sampler.probs() > 0).sum()) == 3
    full = torch.softmax(sampler.logits, -1)[0]
    sampler.top_k, sampler.top_p = None, 0.5
    p = sampler.probs()[0]
    kept = p > 0
    assert full[kept].sum() >= 0.5 and full[kept].sum() - full[kept].min() < 0.5  # smallest set reaching p
    assert math.isclose(float(p.sum()), 1.0, rel_tol=1e-5)


def test_prompt_character_outside_the_vocabulary_is_named():
    vocab = Vocab.from_text(TEXT)
    with pytest.raises(UsageError, match=r"'Z' \(U\+005A\)"):
        list(generate(random_model(len(vocab)), vocab, prompt="the Zoo", length=3))


def test_bytes_vocabulary_streams_whole_utf8_characters():
    vocab = Vocab.of_bytes()
    assert vocab.decode(vocab.encode("héllo ✓")) == "héllo ✓"
    pieces = [p for (p,) in generate_batch(random_model(256, layers=1), vocab, "é", 30, seed=1)]
    assert len(pieces) in (30, 31)  # one piece per byte, and the flushed tail of an unfinished character
    text = "".join(pieces)
    assert 30 / 4 <= len(text) <= 30  # a UTF-8 character is 1 to 4 bytes; an invalid byte is one U+FFFD
    assert vocab.decode(vocab.encode(text)) == text


def test_generated_text_has_the_asked_length_and_only_vocabulary_characters():
    vocab = Vocab.from_text(TEXT)
    text = "".join(generate(random_model(len(vocab)), vocab, "the", 50, temperature=1.5, seed=3))
    assert len(text) == 50 and set(text) <= set(vocab.tokens)
    assert text == "".join(generate(random_model(len(vocab)), vocab, "the", 50, temperature=1.5, seed=3))


# ---- vocabulary and data --------------------------------------------------------------------------
def test_vocab_survives_save_and_load(tmp_path):
    task = tiny_task(tmp_path, text="Ünïcødé\ttabs\nand 'quotes' \"x\" ✓ " * 20)
    task.save_artifacts(tmp_path)
    again = LMTask.from_run_dir(task.config, tmp_path)
    assert again.vocab.tokens == task.vocab.tokens and len(again.vocab) == len(set(task.vocab.tokens))
    assert again.corpus_sha256 == task.corpus_sha256
    text = "Ünïcødé ✓\n"
    assert again.vocab.decode(again.vocab.encode(text)) == text
    assert json.loads((tmp_path / "vocab.json").read_text())["kind"] == "chars"


def test_non_utf8_file_is_a_clear_error_or_bytes(tmp_path):
    bad = tmp_path / "latin1.txt"
    bad.write_bytes("café au lait, ".encode("latin-1") * 50)
    with pytest.raises(UsageError, match=r"latin1\.txt is not UTF-8.*--bytes"):
        LMTask.create(LMConfig(data=str(bad)), tmp_path / "run")
    task = LMTask.create(LMConfig(data=str(bad), bytes=True, seq_len=8, batch_size=2), tmp_path / "run")
    assert len(task.vocab) == 256 and task.train_batch(0, 0, 1).x.max() < 256


def test_folder_is_read_in_sorted_order_and_split_90_10(tmp_path):
    folder = tmp_path / "texts"
    (folder / "sub").mkdir(parents=True)
    (folder / "b.txt").write_text("B" * 50)
    (folder / "a.txt").write_text("A" * 40)
    (folder / "sub" / "c.txt").write_text("C" * 10)
    (folder / ".hidden").write_text("never")
    corpus = lm.read_corpus(LMConfig(data=str(folder)))
    assert corpus == "A" * 40 + "B" * 50 + "C" * 10
    train, val = lm.split(corpus, 0.1)
    assert (len(train), len(val)) == (90, 10)


def test_download_is_cached_and_checksum_verified(tmp_path, monkeypatch):
    source = tmp_path / "source.txt"
    source.write_text("to be or not to be\n" * 20)
    digest = hashlib.sha256(source.read_bytes()).hexdigest()
    monkeypatch.setenv("RNNKIT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setitem(
        lm.DATASETS, "fakebard", RemoteFile("fakebard", source.as_uri(), "sha256", digest, "fakebard.txt")
    )
    assert lm.read_corpus(LMConfig(data="fakebard")) == source.read_text()
    assert (tmp_path / "cache" / "fakebard.txt").is_file()
    source.unlink()  # the second use reads the cache, never the source
    assert lm.read_corpus(LMConfig(data="fakebard")).startswith("to be")

    other = tmp_path / "tampered.txt"
    other.write_text("something else")
    monkeypatch.setitem(
        lm.DATASETS, "tampered", RemoteFile("tampered", other.as_uri(), "sha256", digest, "tampered.txt")
    )
    with pytest.raises(UsageError, match=f"expected {digest}; refusing"):
        lm.read_corpus(LMConfig(data="tampered"))
    assert not (tmp_path / "cache" / "tampered.txt").exists()


@pytest.mark.parametrize("text, val", [("ab", 1), ("abcdefghijklmnopqrs", 1)])
def test_validation_text_shorter_than_two_characters_is_refused(tmp_path, text, val):
    data = tmp_path / "short.txt"
    data.write_text(text)
    config = LMConfig(data=str(data), val_fraction=0.05)
    message = (
        f"--data {data}: the validation text (the last --val-fraction 0.05 of {len(text)} characters) "
        f"is {val} characters; it needs at least 2"
    )
    with pytest.raises(UsageError, match=re.escape(message)):
        LMTask.create(config, tmp_path)


@torch.no_grad()
def test_stream_loss_needs_two_tokens():
    model = random_model(5)
    assert math.isfinite(lm.stream_loss(model, torch.tensor([1, 2]), rows=4, chunk=8))
    with pytest.raises(UsageError, match="cannot evaluate on 1 token"):
        lm.stream_loss(model, torch.tensor([1]), rows=4, chunk=8)


def test_download_failure_says_what_to_do(tmp_path, monkeypatch):
    monkeypatch.setenv("RNNKIT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setitem(
        lm.DATASETS, "gone", RemoteFile("gone", (tmp_path / "absent").as_uri(), "sha256", "0" * 64, "gone.txt")
    )
    with pytest.raises(UsageError, match="could not download gone .*--data PATH"):
        lm.read_corpus(LMConfig(data="gone"))


def test_default_corpus_is_the_standard_library_deterministic_and_capped():
    a = lm.stdlib_corpus(200_000)
    assert a == lm.stdlib_corpus(200_000)
    assert 100_000 < len(a.encode()) <= 200_000
    assert "def " in a and "import " in a


def test_tiny_shakespeare_split_matches_nanogpt(shared_data):
    path = shared_data / "tinyshakespeare" / "input.txt"
    if not path.is_file():
        pytest.skip(f"{path} is absent on this machine")
    task = LMTask.create(LMConfig(data=str(path)), shared_data)
    assert len(task.vocab) == 65
    assert (len(task._train), len(task._val)) == (1_003_854, 111_540)


# ---- the command line -----------------------------------------------------------------------------
def test_train_then_generate_streams_from_the_run(tmp_path, capsys):
    data = tmp_path / "corpus.txt"
    data.write_text(TEXT)
    run = tmp_path / "run"
    code = main(
        [
            "train",
            "lm",
            "--data",
            str(data),
            "--hidden",
            "16",
            "--layers",
            "1",
            "--embed",
            "8",
            "--seq-len",
            "8",
            "--batch-size",
            "4",
            "--steps",
            "6",
            "--eval-every",
            "3",
            "--no-plot",
            "--progress",
            "lines",
            "--sample-chars",
            "10",
            "--threads",
            "1",
            "--out",
            str(run),
        ]
    )
    assert code == 0
    assert json.loads((run / "vocab.json").read_text())["kind"] == "chars"
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert any("val_bpc" in r for r in rows)
    assert "sample at step 3" in capsys.readouterr().err
    assert main(["generate", str(run), "--prompt", "the ", "--length", "25", "--seed", "3", "--num-samples", "2"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("the ") and "--- sample 2 ---\nthe " in out
    assert main(["generate", str(run), "--prompt", "the ", "--length", "25", "--seed", "3", "--num-samples", "2"]) == 0
    assert capsys.readouterr().out == out  # same seed, same text
    assert main(["generate", str(run), "--prompt", "XYZ"]) == 2
    assert "'X' (U+0058)" in capsys.readouterr().err
    assert main(["eval", str(run), "--json"]) == 0
    assert set(json.loads(capsys.readouterr().out)) == {"loss", "bpc"}


def test_demo_trains_leaves_curves_and_prints_the_next_commands(tmp_path, capsys):
    data = tmp_path / "corpus.txt"
    data.write_text(TEXT * 15)  # the demo reads 64 rows x 32 characters per step
    run = tmp_path / "demo"
    assert (
        main(["demo", "--data", str(data), "--time-budget", "30", "--steps", "2", "--threads", "1", "--out", str(run)])
        == 0
    )
    out = capsys.readouterr().out
    assert (run / "curves.png").is_file() and (run / "checkpoints" / "best.safetensors").is_file()
    for command in (
        f"rnnkit generate {run}",
        f"rnnkit train lm --resume {run}",
        "rnnkit train classify",
        "rnnkit train sort",
    ):
        assert command in out


def test_a_cell_of_your_own_by_module_and_class(tmp_path, capsys):
    """`--cell MODULE:CLASS` trains with a GatedCell subclass the user wrote (tests/user_cells.py), and the
    run's later commands import it again from config.json."""
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
                "--cell",
                "user_cells:MGUCell",
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
                "3",
                "--eval-every",
                "3",
                "--no-plot",
                "--progress",
                "lines",
                "--sample-chars",
                "5",
                "--threads",
                "1",
                "--out",
                str(run),
            ]
        )
        == 0
    )
    assert json.loads((run / "config.json").read_text())["task_config"]["cell"] == "user_cells:MGUCell"
    capsys.readouterr()
    assert main(["generate", str(run), "--prompt", "the ", "--length", "10", "--seed", "0"]) == 0
    assert capsys.readouterr().out.startswith("the ")
    from rnnkit.engine.rundir import load_run
    from user_cells import MGUCell

    cells = load_run(run).model.rnn.cells
    assert len(cells) == 2 and all(type(cell) is MGUCell for cell in cells)


@pytest.mark.parametrize(
    "spec, message",
    [
        ("no_such_module:Cell", "--cell no_such_module:Cell: cannot import no_such_module (No module named"),
        ("user_cells:NoSuchCell", "--cell user_cells:NoSuchCell: user_cells has no NoSuchCell"),
        ("user_cells:gate", "--cell user_cells:gate: user_cells.gate is not a GatedCell subclass"),
        ("not a cell", "argument --cell: invalid choice: 'not a cell' (choose from lstm, gru, rnn"),
    ],
)
def test_a_bad_cell_spec_is_one_line_naming_it(spec, message, tmp_path, capsys):
    assert main(["train", "lm", "--cell", spec, "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err and "Traceback" not in err
    assert not (tmp_path / "run").exists()


def test_test_text_is_held_out_after_validation_and_windows_score_from_a_zero_state(tmp_path):
    text = "".join(chr(ord("a") + i % 26) for i in range(1000))
    task = tiny_task(tmp_path, text=text, val_fraction=0.1, test_fraction=0.1)
    train, val, test = (task._ids(s) for s in ("train", "val", "test"))
    assert (len(train), len(val), len(test)) == (800, 100, 100)  # 80/10/10, in the text's order
    assert task.vocab.decode(test.tolist()) == text[900:]
    model = random_model(len(task.vocab), cell="gru")
    opts = lm.LMEvalOptions
    assert task.evaluate(model, options=opts(split="test"))["loss"] == pytest.approx(
        lm.stream_loss(model, test, task.config.eval_batch_size, 32)
    )
    one = task.evaluate(model, options=opts(window=8, window_count=3))
    assert one["window"] == 8.0 and one["loss"] == task.evaluate(model, options=opts(window=8, window_count=3))["loss"]
    # a window is scored from a zero state: the same as the stream loss of that window alone
    starts = torch.randint(0, 100 - 8, (1,), generator=torch.Generator().manual_seed(0))
    alone = lm.stream_loss(model, val[int(starts[0]) : int(starts[0]) + 9], 1, 64)
    assert lm.window_loss(model, val, 8, 1, rows=4) == pytest.approx(alone, rel=1e-5)
    with pytest.raises(UsageError, match="--test-fraction"):
        tiny_task(tmp_path, text=text).evaluate(model, options=opts(split="test"))
