"""`rnnkit train sort`, `rnnkit eval RUN --lengths ...` and `rnnkit predict RUN`: text in, text out, user errors."""

from __future__ import annotations

import dataclasses
import io
import json

import pytest

from rnnkit.cli.main import main

TINY = [
    "--embed",
    "8",
    "--hidden",
    "8",
    "--attn",
    "8",
    "--eval-size",
    "8",
    "--steps",
    "2",
    "--eval-every",
    "2",
    "--threads",
    "1",
    "--no-plot",
    "--progress",
    "lines",
]


@pytest.fixture(scope="module")
def int_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("sort") / "ints"
    assert main(["train", "sort", "--min-len", "4", "--max-len", "4", "--vocab", "10", *TINY, "--out", str(out)]) == 0
    return str(out)


@pytest.fixture(scope="module")
def float_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("sort") / "floats"
    assert (
        main(
            [
                "train",
                "sort",
                "--floats",
                "--min-len",
                "3",
                "--max-len",
                "3",
                "--max-input-len",
                "6",
                *TINY,
                "--out",
                str(out),
            ]
        )
        == 0
    )
    return str(out)


def run_sort(capsys, monkeypatch, args, stdin: str | bytes = ""):
    capsys.readouterr()
    raw = stdin.encode() if isinstance(stdin, str) else stdin
    monkeypatch.setattr("sys.stdin", io.TextIOWrapper(io.BytesIO(raw), encoding="latin-1"))  # a non-UTF-8 locale
    code = main(["predict", *args])
    out, err = capsys.readouterr()
    return code, out, err


def test_numbers_on_the_command_line_give_one_line_that_is_a_permutation(int_run, capsys, monkeypatch):
    code, out, _ = run_sort(capsys, monkeypatch, [int_run, "7", "3", "9", "3"])
    assert code == 0 and out.endswith("\n") and out.count("\n") == 1
    assert sorted(out.split()) == sorted(["7", "3", "9", "3"])  # the default decoder points: a permutation


def test_stdin_gives_one_output_line_per_input_line(int_run, float_run, capsys, monkeypatch):
    code, out, _ = run_sort(capsys, monkeypatch, [int_run], "5 1 2\n9,8, 7 6\n0\n")
    lines = out.splitlines()
    assert code == 0 and [len(line.split(" ")) for line in lines] == [3, 4, 1]
    assert all("  " not in line and "," not in line for line in lines)
    # the default decoder points, so each line is a permutation of its input
    assert [sorted(line.split()) for line in lines] == [["1", "2", "5"], ["6", "7", "8", "9"], ["0"]]
    code, out, _ = run_sort(capsys, monkeypatch, [float_run, "--beam", "2"], "0.5, 0.25 0.125\n0.9 0.1\n")
    assert code == 0 and [sorted(line.split(" ")) for line in out.splitlines()] == [
        ["0.125", "0.25", "0.5"],
        ["0.1", "0.9"],
    ]  # the input tokens, exactly as written


@pytest.mark.parametrize(
    "stdin, message",
    [
        ("1 2\n3 x 4\n", "line 2: 'x' (number 2) is not a number"),
        ("1 2\n3 10\n", "line 2: '10' (number 2) is not an integer in [0, 10)"),
        ("1 2\n-1\n", "line 2: '-1' (number 1) is not an integer in [0, 10)"),
        ("1.5\n", "line 1: '1.5' (number 1) is not an integer in [0, 10)"),
        ("1 2\n\n3\n", "line 2: empty"),
        (
            "1\n" + " ".join(["1"] * 257) + "\n",
            "line 2: 257 numbers, longer than this model supports (at most 256, its --max-input-len)",
        ),
    ],
)
def test_bad_lines_are_named_and_exit_with_code_2(int_run, capsys, monkeypatch, stdin, message):
    code, out, err = run_sort(capsys, monkeypatch, [int_run], stdin)
    assert code == 2 and message in err and err.count("\n") == 1
    assert len(out.splitlines()) == int(message.split(":")[0].split()[1]) - 1  # the lines before it were sorted


def test_invalid_utf8_on_stdin_names_the_line(int_run, capsys, monkeypatch):
    code, out, err = run_sort(capsys, monkeypatch, [int_run], b"1 2\n3 \xff 4\n")
    assert code == 2 and err == "rnnkit: error: stdin, line 2: invalid UTF-8 at byte 2 of the line\n"
    assert len(out.splitlines()) == 1  # the line before it was sorted


def test_blank_lines_at_the_end_are_ignored_not_in_the_middle(int_run, capsys, monkeypatch):
    code, out, err = run_sort(capsys, monkeypatch, [int_run], "1 2\n3\n\n \n")
    assert code == 0 and err == "" and [sorted(line.split()) for line in out.splitlines()] == [["1", "2"], ["3"]]
    code, out, err = run_sort(capsys, monkeypatch, [int_run], "1 2\n\n\n3\n")
    assert code == 2 and "line 2: empty" in err and len(out.splitlines()) == 1


def test_eval_data_file(int_run, tmp_path, capsys):
    good = tmp_path / "good.txt"
    good.write_bytes(b"3 1 2\n0 9 4 4\n5 6\n\n")  # a blank last line is not a sequence
    capsys.readouterr()
    assert main(["eval", int_run, "--data", str(good), "--json"]) == 0
    metrics = json.loads(capsys.readouterr().out)
    assert {"accuracy@2", "accuracy@3", "accuracy@4"} <= set(metrics) and "accuracy@0" not in metrics
    middle = tmp_path / "middle.txt"
    middle.write_bytes(b"3 1 2\n\n5 6\n")
    assert main(["eval", int_run, "--data", str(middle)]) == 2
    assert f"{middle} line 2: empty" in capsys.readouterr().err
    binary = tmp_path / "binary.txt"
    binary.write_bytes(b"3 1 2\n\x89PNG\xff\n")
    assert main(["eval", int_run, "--data", str(binary)]) == 2
    err = capsys.readouterr().err
    assert err == f"rnnkit: error: cannot read --data {binary}: not UTF-8 text (byte 0x89 at offset 6)\n"


def test_bad_command_line_numbers_and_floats(int_run, float_run, capsys, monkeypatch):
    code, _, err = run_sort(capsys, monkeypatch, [int_run, "3", "abc"])
    assert code == 2 and "command line: 'abc' (number 2) is not a number" in err
    code, _, err = run_sort(capsys, monkeypatch, [float_run], "0.5 1.5\n")
    assert code == 2 and "line 1: '1.5' (number 2) is outside [0, 1]" in err
    code, _, err = run_sort(capsys, monkeypatch, [float_run], "0.1 0.2 0.3 0.4 0.5 0.6 0.7\n")
    assert code == 2 and "line 1: 7 numbers, longer than this model supports (at most 6, its --max-input-len)" in err


def test_eval_reports_each_n_including_longer_than_training(int_run, capsys):
    capsys.readouterr()
    assert main(["eval", int_run, "--lengths", "2", "4", "9", "--beam", "2", "--json"]) == 0
    metrics = json.loads(capsys.readouterr().out)
    for n in (2, 4, 9):
        assert 0 <= metrics[f"exact@{n}"] <= metrics[f"accuracy@{n}"] <= 1
    assert main(["eval", int_run, "--lengths", "300"]) == 2
    assert "--lengths 300 is outside the lengths this model accepts" in capsys.readouterr().err
    assert main(["eval", int_run, "--beam", "0"]) == 2
    assert "--beam must be at least 1, got 0" in capsys.readouterr().err


def test_floats_with_a_token_decoder_is_a_usage_error(tmp_path, capsys):
    assert main(["train", "sort", "--floats", "--decoder", "state-only", *TINY, "--out", str(tmp_path / "r")]) == 2
    assert "--floats needs --decoder pointer" in capsys.readouterr().err


def test_earlier_spellings_still_work_with_a_warning(int_run, tmp_path, capsys, monkeypatch):
    out = tmp_path / "old"
    capsys.readouterr()
    assert (
        main(
            [
                "train",
                "sort",
                "--n",
                "3",
                "--max-n",
                "8",
                "--decoder",
                "seed",
                "--vocab",
                "10",
                *TINY,
                "--out",
                str(out),
            ]
        )
        == 0
    )
    err = capsys.readouterr().err
    assert "rnnkit: warning: --n is now --min-len and --max-len" in err
    assert "rnnkit: warning: --max-n is now --max-input-len" in err
    assert "rnnkit: warning: --decoder seed is now called --decoder state-only" in err
    config = json.loads((out / "config.json").read_text())["task_config"]
    assert (config["min_len"], config["max_len"], config["max_input_len"], config["decoder"]) == (3, 3, 8, "state-only")
    assert main(["eval", int_run, "--n", "2", "--json"]) == 0
    assert set(json.loads(capsys.readouterr().out)) == {"loss", "accuracy", "exact", "loss@2", "accuracy@2", "exact@2"}
    code, out_text, err = run_sort(capsys, monkeypatch, [int_run, "3", "1"])
    assert code == 0 and sorted(out_text.split()) == ["1", "3"]


def test_old_sort_command_runs_predict_with_a_warning(int_run, capsys, monkeypatch):
    monkeypatch.setattr("sys.stdin", io.TextIOWrapper(io.BytesIO(b"")))
    capsys.readouterr()
    assert main(["sort", int_run, "2", "1"]) == 0
    out, err = capsys.readouterr()
    assert sorted(out.split()) == ["1", "2"] and "`rnnkit sort` is now `rnnkit predict`" in err


def test_predict_on_a_language_model_run_says_generate(tmp_path, capsys):
    (tmp_path / "config.json").write_text(json.dumps({"rnnkit": "0", "task": "lm", "task_config": {}, "train": {}}))
    (tmp_path / "checkpoints").mkdir()
    assert main(["predict", str(tmp_path), "hello"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "use rnnkit generate" not in err and "rnnkit generate RUN_DIR" in err


def test_eval_and_predict_take_the_runs_settings_from_its_config(int_run, capsys):
    """--beam is SortConfig's own field (help and type), its default the run's value; eval adds --lengths."""
    from rnnkit.tasks.sort import SortConfig

    beam_help = next(f for f in dataclasses.fields(SortConfig) if f.name == "beam").metadata["help"]
    for argv in (["eval", int_run, "--help"], ["predict", int_run, "--help"]):
        capsys.readouterr()
        assert main(argv) == 0
        text = " ".join(capsys.readouterr().out.split())
        assert f"--beam INT {beam_help} (default: the run's)" in text
        assert ("--lengths INT [INT ...]" in text) == (argv[0] == "eval")
