"""CLI specifications: flags come from the config dataclasses; user errors are one line, exit code 2."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import test_engine_toy
from rnnkit.cli import main as cli_main
from rnnkit.cli.command import Command, CommandSpec
from rnnkit.cli.flags import flag_name, show_default
from rnnkit.cli.main import main
from rnnkit.engine.trainer import RunConfig, TrainConfig
from rnnkit.tasks.base import TASKS

ROOT = Path(__file__).resolve().parents[1]
FAST = ["--threads", "1", "--device", "cpu", "--log-every", "1", "--warmup-steps", "2"]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("cli") / "run"
    assert main(["train", "toy", "--out", str(run), *FAST, "--steps", "4", "--eval-every", "2"]) == 0
    return run


def one_error_line(capsys) -> str:
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1, captured.err
    assert "Traceback" not in captured.err
    return lines[0]


def test_version(capsys):
    assert main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == "rnnkit 0.1.0"


def test_python_dash_m_rnnkit_is_the_cli():
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"), OMP_NUM_THREADS="1")
    out = subprocess.run(
        [sys.executable, "-m", "rnnkit", "eval", "/nonexistent/run"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert (out.returncode, out.stdout, out.stderr) == (
        2,
        "",
        "rnnkit: error: run directory /nonexistent/run does not exist\n",
    )


def flag_helps(text: str) -> dict[str, str]:
    """Each flag of an argparse --help text -> its help, with argparse's line wrapping undone."""
    helps: dict[str, str] = {}
    flag = None
    for line in text.splitlines():
        stripped = line.strip()
        if line.startswith("  -") and not line.startswith("   "):
            flag = stripped.split()[0].rstrip(",")
            helps[flag] = " ".join(stripped.split()[1:])
        elif flag and line.startswith("    ") and stripped:
            helps[flag] = f"{helps[flag]} {stripped}".strip()
        else:
            flag = None
    return helps


def test_every_config_field_is_a_flag_with_help_and_one_default(capsys):
    assert main(["train", "toy", "--help"]) == 0
    helps = flag_helps(capsys.readouterr().out)
    for cls in (test_engine_toy.ToyConfig, TrainConfig, RunConfig):
        for f in dataclasses.fields(cls):
            text = helps[flag_name(f.name)]
            assert " ".join(f.metadata["help"].split()) in text
            assert text.count("(default:") == 1, text  # stated once: by the help text, or appended
            if "(default:" not in f.metadata["help"]:
                assert text.endswith(f"(default: {show_default(f.default)})")


@pytest.mark.parametrize(
    "argv",
    [
        ["train", "lm"],
        ["train", "classify"],
        ["train", "sort"],
        ["demo"],
        ["generate", "RUN"],
        ["eval", "RUN"],
        ["predict", "RUN"],
    ],
)
def test_help_speaks_the_users_words(argv, capsys):
    assert main([*argv, "--help"]) == 0
    text = capsys.readouterr().out
    assert "None" not in text and "True" not in text and "False" not in text
    for flag, help_text in flag_helps(text).items():
        assert help_text.count("(default:") <= 1, (flag, help_text)
    lore = re.compile(r"session|stop [0-9]|the seed|the deck|seed deck|STATE_DIM|E_DIM|SEQ_LENGTH", re.I)
    assert not lore.search(text), lore.search(text)


def test_defaults_are_shown_as_a_user_types_them():
    assert [show_default(v) for v in (None, True, False, (5, 10), (), 0.5, "gru")] == [
        "none",
        "on",
        "off",
        "5 10",
        "none",
        "0.5",
        "gru",
    ]


def test_cell_choices_come_from_the_registry_on_every_task(capsys):
    import rnnkit

    for task in ("lm", "classify", "sort"):
        assert main(["train", task, "--help"]) == 0
        text = capsys.readouterr().out
        assert "--cell {" + ",".join([*rnnkit.CELLS, "MODULE:CLASS"]) + "}" in text


def test_demo_flags_come_from_the_training_configs(capsys):
    from rnnkit.tasks.lm import LMConfig

    assert main(["demo", "--help"]) == 0
    helps = flag_helps(capsys.readouterr().out)
    assert set(helps) == {"-h", "--time-budget", "--steps", "--threads", "--out", "--data"}
    fields = {f.name: f for cls in (TrainConfig, RunConfig, LMConfig) for f in dataclasses.fields(cls)}
    for flag, help_text in helps.items():
        if flag != "-h":
            declared = fields[flag[2:].replace("-", "_")].metadata["help"]
            assert " ".join(declared.split("(default")[0].split()) in help_text
    assert helps["--time-budget"].endswith("(default: 180.0)")


@pytest.mark.parametrize(
    "argv, message",
    [
        (["train", "toy", "--no-such-flag"], "unrecognized arguments: --no-such-flag"),
        (["train", "toy", "--steps", "many"], "argument --steps: expected int, got 'many'"),
        (["train", "toy", "--optimizer", "adam"], "argument --optimizer: invalid choice: 'adam'"),
        (["train", "toy", "--lr", "-1"], "--lr must be a positive number, got -1.0"),
        (["train", "nosuchtask"], "invalid choice: 'nosuchtask'"),
        (["frobnicate"], "invalid choice: 'frobnicate'"),
        (["eval", "/nonexistent/run"], "run directory /nonexistent/run does not exist"),
        (["train", "toy", "--resume", "/nonexistent/run"], "run directory /nonexistent/run does not exist"),
    ],
)
def test_user_errors_are_one_line_with_exit_code_2(argv, message, capsys):
    assert main(argv) == 2
    line = one_error_line(capsys)
    assert line.startswith("rnnkit") and "error: " in line and message in line


def test_foreign_run_directories_are_refused(tmp_path, capsys):
    assert main(["eval", str(tmp_path)]) == 2
    assert one_error_line(capsys) == f"rnnkit: error: {tmp_path} is not an rnnkit run directory (no config.json)"
    (tmp_path / "config.json").write_text('{"model": "something else"}')
    assert main(["eval", str(tmp_path)]) == 2
    assert f"{tmp_path / 'config.json'} is not an rnnkit run config" in one_error_line(capsys)


def test_run_dir_of_another_task_cannot_be_resumed_as_this_one(run_dir, monkeypatch, capsys):
    monkeypatch.setitem(TASKS, "toy2", TASKS["toy"])
    assert main(["train", "toy2", "--resume", str(run_dir)]) == 2
    assert f"is a 'toy' run; resume it with `rnnkit train toy --resume {run_dir}`" in one_error_line(capsys)


def test_unavailable_task_or_command_is_a_clean_error(monkeypatch, capsys):
    monkeypatch.setitem(TASKS, "lm", "rnnkit.tasks.not_written_yet:LMTask")
    assert main(["train", "lm", "--steps", "3"]) == 2
    assert one_error_line(capsys).startswith("rnnkit: error: task 'lm' is not available: No module named")
    monkeypatch.setitem(cli_main.COMMANDS, "generate", CommandSpec("rnnkit.cli.not_written_yet:GENERATE", "x"))
    assert main(["generate", "runs/x"]) == 2
    assert one_error_line(capsys).startswith("rnnkit: error: command 'generate' is not available")


def test_existing_run_dir_is_not_overwritten(run_dir, capsys):
    assert main(["train", "toy", "--out", str(run_dir), "--steps", "2"]) == 2
    assert f"{run_dir} already holds a run; continue it with --resume {run_dir}" in one_error_line(capsys)


def test_run_directory_describes_itself(run_dir):
    config = json.loads((run_dir / "config.json").read_text())
    assert config["task"] == "toy"
    assert config["task_config"] == dataclasses.asdict(test_engine_toy.ToyConfig())
    assert config["train"]["steps"] == 4 and config["train"]["threads"] == 1
    assert (run_dir / "toy.json").exists()  # the task's artifact
    assert (run_dir / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train_rows = [r for r in rows if "train_loss" in r]
    assert [r["step"] for r in train_rows] == [1, 2, 3, 4]
    assert {"step", "time", "train_loss", "lr", "tokens_per_s"} <= train_rows[0].keys()
    assert [r["step"] for r in rows if "val_loss" in r] == [2, 4]
    assert {"val_loss", "val_mae"} <= next(r for r in rows if "val_loss" in r).keys()


def test_eval_json_prints_exactly_one_json_object(run_dir, capsys):
    assert main(["eval", str(run_dir), "--json", "--device", "cpu"]) == 0  # where it trained: same numbers
    out = capsys.readouterr().out
    metrics = json.loads(out)
    assert out.count("\n") == 1 and set(metrics) == {"loss", "mae"}
    val = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert metrics["loss"] == pytest.approx(min(r["val_loss"] for r in val if "val_loss" in r))  # best checkpoint


def test_progress_lines_when_stderr_is_not_a_terminal_and_a_bar_on_request(tmp_path, capsys):
    assert main(["train", "toy", "--out", str(tmp_path / "a"), *FAST, "--steps", "3", "--no-plot"]) == 0
    err = capsys.readouterr().err
    assert "step 3/3 | loss " in err and "tokens/s" in err and "left" in err
    assert (
        main(["train", "toy", "--out", str(tmp_path / "b"), *FAST, "--steps", "3", "--no-plot", "--progress", "bar"])
        == 0
    )
    err = capsys.readouterr().err
    assert "3/3" in err and "step 3/3 | loss" not in err


def test_task_commands_plug_in_through_the_registry(monkeypatch, capsys):
    def add_arguments(parser, argv):
        parser.add_argument("--times", type=int, default=1, help="how many")

    def run(args):
        print("hello " * args.times)
        return 0

    sys.modules[__name__].HELLO = Command(add_arguments, run)
    monkeypatch.setitem(cli_main.COMMANDS, "hello", CommandSpec(f"{__name__}:HELLO", "say hello"))
    assert main(["hello", "--times", "2"]) == 0
    assert capsys.readouterr().out.strip() == "hello hello"


def test_an_unwritable_out_directory_is_one_line(tmp_path, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    assert main(["train", "toy", "--out", str(blocker / "run"), "--steps", "1", "--threads", "1"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "a_file" in err and "Traceback" not in err
