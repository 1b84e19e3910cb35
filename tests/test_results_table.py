"""tools/results_table.py: the task pages' results tables equal what it makes from the committed run
directories, and the command it writes for a run trains that run's configuration again."""

from __future__ import annotations

import importlib.util
import json
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def tool():
    spec = importlib.util.spec_from_file_location("results_table", ROOT / "tools" / "results_table.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["results_table"] = module  # its dataclass looks its module up
    spec.loader.exec_module(module)
    return module


def test_the_committed_results_tables_are_current():
    assert tool().stale() == [], "run: python tools/results_table.py"


def test_a_table_row_and_its_command_come_from_the_run_directory(tmp_path):
    rt = tool()
    run = tmp_path / "lm-shakespeare-x"
    run.mkdir()
    train = {"steps": None, "time_budget": 600.0, "eval_every": None, "lr": 6e-3, "threads": 2, "warmup_steps": 30}
    task = {"data": "/somewhere/input.txt", "cell": "lstm", "layers": 2, "hidden": 256, "dropout": 0.1}
    task |= {"seq_len": 32, "batch_size": 64, "zoneout": 0.05, "weight_drop": 0.0}
    (run / "config.json").write_text(json.dumps({"task": "lm", "task_config": task, "train": train}))
    rows = [{"step": 50, "time": 9.0, "train_loss": 2.5}, {"step": 60, "time": 600.5, "val_loss": 1.4567}]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    doc = {"command": ["rnnkit", "eval", str(run), "--window", "64", "--json"], "run_dir": str(run)}
    (run / "eval-window64.json").write_text(json.dumps(doc | {"metrics": {"loss": 1.6}}))
    page = "x\n<!-- results:lm-shakespeare -->\nold\n<!-- /results:lm-shakespeare -->\ny\n"
    out = rt.render(page, root=tmp_path)
    model = "LSTM 2x256, dropout 0.1, zoneout 0.05, 64x32 chars/step, lr 0.006"
    assert f"| `lm-shakespeare-x` | {model} | 600 s, 2 threads | 60 |" in out
    assert "| 2.500 | **1.457** | 1.600 | - |" in out
    command = "rnnkit train lm --data input.txt --cell lstm --zoneout 0.05 --time-budget 600 --lr 0.006 --threads 2"
    assert command in out
    assert "rnnkit eval runs/lm-shakespeare-x --window 64 --json" in out
    assert out.startswith("x\n") and out.endswith("<!-- /results:lm-shakespeare -->\ny\n") and "old" not in out
    shutil.rmtree(run)
    assert "(no runs yet)" in rt.render(page, root=tmp_path)


def test_collect_names_the_run_as_runs_name_however_the_eval_was_given_it(tmp_path):
    """An eval run on a relative path (`rnnkit eval my-run`) and collected by its absolute path shows
    `runs/NAME` in the docs' commands, as one run from an absolute path does; data paths keep their names."""
    rt = tool()
    run = tmp_path / "work" / "my-run"
    run.mkdir(parents=True)
    (run / "config.json").write_text(json.dumps({"task": "sort", "task_config": {"data": None}, "train": {}}))
    (run / "metrics.jsonl").write_text("")
    for name, given in (("rel", "my-run"), ("abs", str(run))):
        command = ["rnnkit", "eval", given, "--data", "/data/test.csv", "--json"]
        (run / f"eval-{name}.json").write_text(json.dumps({"command": command, "run_dir": given, "metrics": {}}))
    dest = rt.collect(run, "sort-x", root=tmp_path / "docs")
    for name in ("rel", "abs"):
        doc = json.loads((dest / f"eval-{name}.json").read_text())
        assert doc["command"] == ["rnnkit", "eval", "runs/sort-x", "--data", "test.csv", "--json"]
        assert doc["run_dir"] == "runs/sort-x"


def test_a_setting_an_earlier_version_lacked_is_read_as_its_value_then(tmp_path):
    """A classify run saved before --feature-dropout, --bag and --max-epochs existed trained without
    them: its table row says 0 and no bag, and its command passes --no-bag, --feature-dropout 0 and
    --max-epochs none, since today's defaults differ."""
    rt = tool()
    run = tmp_path / "classify-agnews-old"
    run.mkdir()
    task = {"data": "/x/train.csv", "input": "embedding", "ngrams": 4, "words": True, "patch": 8, "cell": "gru"}
    task |= {"hidden": 128, "layers": 1, "pooling": "mean", "dropout": 0.2}
    train = {"steps": None, "time_budget": 600.0, "threads": 1}
    (run / "config.json").write_text(json.dumps({"task": "classify", "task_config": task, "train": train}))
    (run / "metrics.jsonl").write_text(json.dumps({"step": 10, "time": 600.0, "val_accuracy": 0.5}) + "\n")
    out = rt.render("<!-- results:classify-agnews -->\n<!-- /results:classify-agnews -->\n", root=tmp_path)
    assert "| `classify-agnews-old` | 0 | no | 600 s, 1 thread | 10 |" in out
    flags = "--feature-dropout 0 --no-bag --max-epochs none --time-budget 600 --threads 1"
    assert f"rnnkit train classify --data train.csv {flags}" in out
