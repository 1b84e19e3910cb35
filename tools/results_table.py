"""The task pages' results tables and figures, generated from run directories (never typed by hand).

    python tools/results_table.py evaluate RUN_DIR NAME -- --data test.csv   # rnnkit eval RUN_DIR ... --json,
                                                         # kept with its command as RUN_DIR/eval-NAME.json
    python tools/results_table.py collect RUN_DIR AS     # copy RUN_DIR's config.json, metrics.jsonl and
                                                         # eval-*.json to docs/data/task-runs/AS (no checkpoints)
    python tools/results_table.py                        # rewrite the tables and draw the figures
    python tools/results_table.py --check                # exit 1 if a committed table differs

A run's table row comes from its config.json (the command that trains it again, the model, the
budget), its metrics.jsonl (steps, training time, the last validation loss, the curves) and its
eval-*.json (held-out scores, each with the `rnnkit eval` command that produced it). Each table lives
between `<!-- results:NAME -->` and `<!-- /results:NAME -->` in docs/tasks/*.md; the run
directories a table shows are those of docs/data/task-runs whose name starts with the table's prefix.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import re
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
RUNS = ROOT / "docs" / "data" / "task-runs"
FIGURES = ROOT / "docs" / "tasks" / "img"
SKIPPED_FLAGS = {"progress", "plot", "device", "sample_chars", "log_every"}


# ---- reading a run --------------------------------------------------------------------------------
@dataclasses.dataclass
class Run:
    name: str
    config: dict[str, Any]
    rows: list[dict[str, Any]]
    evals: dict[str, dict[str, Any]]  # NAME -> {"command": [...], "metrics": {...}}

    @property
    def task(self) -> str:
        return self.config["task"]

    @property
    def task_class(self) -> type:
        if str(ROOT / "src") not in sys.path:
            sys.path.insert(0, str(ROOT / "src"))
        from rnnkit.tasks.base import load_task_class

        return load_task_class(self.task, self.config.get("task_class"))

    @functools.cached_property
    def tc(self) -> dict[str, Any]:
        """The task's settings read as `rnnkit` loads the run: through the task's `upgrade_saved`, which
        gives a setting the run's version had not its value then and an old name its new one (the
        saved order kept), and a setting it does not name today's default."""
        saved, config = self.config["task_config"], self.task_class.Config
        upgrade = getattr(config, "upgrade_saved", None)
        upgraded = upgrade(dict(saved)) if upgrade else dict(saved)
        defaults = {f.name: f.default for f in dataclasses.fields(config) if f.default is not dataclasses.MISSING}
        return (
            {k: upgraded[k] for k in saved if k in upgraded}
            | upgraded
            | {k: v for k, v in defaults.items() if k not in upgraded}
        )

    @property
    def train(self) -> dict[str, Any]:
        return self.config["train"]

    def last(self, key: str) -> Any:
        values = [r[key] for r in self.rows if key in r]
        return values[-1] if values else None

    @property
    def steps(self) -> int:
        return max((r["step"] for r in self.rows), default=0)

    @property
    def seconds(self) -> float:
        return max((r["time"] for r in self.rows), default=0.0)

    def metric(self, eval_name: str, key: str) -> float | None:
        e = self.evals.get(eval_name)
        return None if e is None else e["metrics"].get(key)


def read_run(path: Path) -> Run:
    config = json.loads((path / "config.json").read_text())
    rows = [json.loads(line) for line in (path / "metrics.jsonl").read_text().splitlines() if line.strip()]
    evals = {p.stem[len("eval-") :]: json.loads(p.read_text()) for p in sorted(path.glob("eval-*.json"))}
    return Run(path.name, config, rows, evals)


def runs(prefix: str, root: Path = RUNS) -> list[Run]:
    return [read_run(p) for p in sorted(root.glob(f"{prefix}*")) if (p / "config.json").is_file()]


# ---- the command that trains a run again ---------------------------------------------------------
def _flag(name: str, value: Any) -> str:
    flag = "--" + name.replace("_", "-")
    if isinstance(value, bool):
        return flag if value else "--no-" + name.replace("_", "-")
    if isinstance(value, (list, tuple)):
        return flag + " " + " ".join(str(v) for v in value)
    return f"{flag} {'none' if value is None else _num(value)}"


def _num(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def train_command(run: Run) -> str:
    """`rnnkit train TASK ...` with the flags whose values differ from today's defaults (the data by its
    file name), so it trains the same configuration again."""
    task_cls = run.task_class
    from rnnkit.engine.trainer import TrainConfig, budget_defaults

    task_defaults = {f.name: f.default for f in dataclasses.fields(task_cls.Config)}
    parts = [f"rnnkit train {run.task}"]
    for name, value in run.tc.items():
        if name == "data" and value:
            parts.append(f"--data {Path(value).name}")
        elif name not in SKIPPED_FLAGS and task_defaults.get(name, object()) != value:
            parts.append(_flag(name, tuple(value) if isinstance(value, list) else value))
    given = {"time_budget": run.train["time_budget"]} if run.train.get("time_budget") else {}
    if run.train.get("steps") is not None:
        given["steps"] = run.train["steps"]
    train_defaults = budget_defaults(
        {f.name: f.default for f in dataclasses.fields(TrainConfig)} | task_cls.train_defaults | given, given
    )
    for name, value in run.train.items():
        if name in given or (name not in SKIPPED_FLAGS and train_defaults.get(name) != value):
            parts.append(_flag(name, value))
    return " ".join(parts)


# ---- tables ---------------------------------------------------------------------------------------
def _f(value: float | None, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}"


def _budget(run: Run) -> str:
    budget = run.train.get("time_budget")
    if not budget:
        return "-"
    threads = run.train.get("threads")
    where = f", {threads} thread{'s' if threads != 1 else ''}" if threads else ""
    return f"{_num(budget)} s{' CPU' if run.train.get('clock') == 'cpu' else ''}{where}"


CELL_NAMES = {"ln-lstm": "LN-LSTM", "ln-gru": "LN-GRU", "mingru": "minGRU", "minlstm": "minLSTM", "slstm": "sLSTM"}
REGULARISERS = {  # task option -> how the model column names it
    "input_dropout": "input dropout",
    "output_dropout": "output dropout",
    "weight_drop": "weight-drop",
    "zoneout": "zoneout",
    "recurrent_dropout": "recurrent dropout",
}


def _model(run: Run) -> str:
    tc = run.tc
    extra = f", dropout {tc['dropout']:g}" if tc.get("dropout") else ""
    extra += "".join(f", {label} {tc[key]:g}" for key, label in REGULARISERS.items() if tc.get(key))
    if tc.get("seq_len") is not None:
        extra += f", {tc['batch_size']}x{tc['seq_len']} chars/step"
    if run.train.get("lr") is not None:
        extra += f", lr {run.train['lr']:g}"
    cell = tc["cell"] if ":" in tc["cell"] else CELL_NAMES.get(tc["cell"], tc["cell"].upper())
    return f"{cell} {tc['layers']}x{tc['hidden']}{extra}"


def _commands(rows: list[Run]) -> str:
    lines = []
    for run in rows:
        lines.append(f"# {run.name}")
        lines.append(train_command(run) + f" --out runs/{run.name}")
        for e in run.evals.values():
            lines.append(" ".join(e["command"]).replace(e["run_dir"], f"runs/{run.name}"))
    return "```bash\n" + "\n".join(lines) + "\n```"


def lm_table(rows: list[Run]) -> str:
    head = (
        "| run | model | budget | steps | training loss | validation nats/char (whole text) "
        "| 64-char windows, zero state | test nats/char |\n| --- | --- | --- | --- | --- | --- | --- | --- |"
    )
    body = []
    for run in rows:
        val = run.metric("val", "loss") or run.last("val_loss")
        body.append(
            f"| `{run.name}` | {_model(run)} | {_budget(run)} | {run.steps:,} "
            f"| {_f(run.last('train_loss'))} | **{_f(val)}** | {_f(run.metric('window64', 'loss'))} "
            f"| {_f(run.metric('test', 'loss'))} |"
        )
    return "\n".join([head, *body]) + "\n\n" + _commands(rows)


def sort_table(rows: list[Run]) -> str:
    """One row per `rnnkit eval` of each run (its decoder, checkpoint and decoding named), exact %
    (per-element %) per N."""
    lengths = sorted(
        {
            int(k.split("@")[1])
            for run in rows
            for e in run.evals.values()
            for k in e["metrics"]
            if k.startswith("exact@")
        }
    )
    head = (
        "| run | decoder | encoding | trained N | budget | steps | checkpoint | decoding | "
        + " | ".join(f"N={n}" for n in lengths)
        + " |"
    )
    body = []
    for run in rows:
        tc = run.tc
        enc = "floats" if tc["floats"] else ("integers + magnitude" if tc["int_value"] else "integer tokens only")
        for e in sorted(run.evals.values(), key=lambda e: "--beam" in e["command"]):  # greedy first
            m, command = e["metrics"], e["command"]
            checkpoint = command[command.index("--checkpoint") + 1] if "--checkpoint" in command else "best"
            beam = int(command[command.index("--beam") + 1]) if "--beam" in command else tc["beam"]
            cells = [
                f"{_pct(m[f'exact@{n}'])} ({_pct(m[f'accuracy@{n}'])})" if f"exact@{n}" in m else "-" for n in lengths
            ]
            body.append(
                f"| `{run.name}` | {tc['decoder']} | {enc} | {tc['min_len']}-{tc['max_len']} "
                f"| {_budget(run)} | {run.steps:,} | {checkpoint} | {'greedy' if beam == 1 else f'beam {beam}'} | "
                + " | ".join(cells)
                + " |"
            )
    sep = "| --- " * (8 + len(lengths)) + "|"
    return "\n".join([head, sep, *body]) + "\n\n" + _commands(rows)


def _parts(run: Run) -> str:
    """The test accuracy of each of a --bag run's two models alone (`rnnkit eval` reports them)."""
    recurrent, bag = run.metric("test", "recurrent_accuracy"), run.metric("test", "bag_accuracy")
    return "-" if recurrent is None or bag is None else f"{_pct(recurrent)}% / {_pct(bag)}%"


def classify_table(rows: list[Run]) -> str:
    head = (
        "| run | feature dropout | bag of words | budget | steps | training loss | best validation accuracy "
        "| test accuracy | test: recurrent model alone / bag alone |\n"
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"
    )
    body = []
    for run in rows:
        best = max((r["val_accuracy"] for r in run.rows if "val_accuracy" in r), default=None)
        body.append(
            f"| `{run.name}` | {run.tc['feature_dropout']:g} | {'yes' if run.tc['bag'] else 'no'} "
            f"| {_budget(run)} | {run.steps:,} "
            f"| {_f(run.last('train_loss'))} "
            f"| {_pct(best)}% | **{_pct(run.metric('test', 'accuracy'))}%** | {_parts(run)} |"
        )
    return "\n".join([head, *body]) + "\n\n" + _commands(rows)


TABLES: dict[str, tuple[str, Callable[[list[Run]], str]]] = {  # NAME -> (run-name prefix, table)
    "lm-shakespeare": ("lm-shakespeare", lm_table),
    "lm-sweep": ("lm-sweep", lm_table),
    "lm-cells": ("lm-cell-", lm_table),
    "lm-war-and-peace": ("lm-war-and-peace", lm_table),
    "sort": ("sort-default", sort_table),
    "sort-long": ("sort-long-", sort_table),
    "sort-decoders": ("sort-decoder-", sort_table),
    "classify-agnews": ("classify-agnews", classify_table),
    "classify-feature-dropout": ("classify-fd-", classify_table),
}
PAGES = {name: ROOT / "docs" / "tasks" / f"{name.split('-')[0]}.md" for name in TABLES}


def render(text: str, root: Path = RUNS) -> str:
    """`text` with every `<!-- results:NAME -->` block rewritten from the run directories under `root`."""
    for name, (prefix, table) in TABLES.items():
        pattern = re.compile(rf"(<!-- results:{name} -->\n).*?(<!-- /results:{name} -->)", re.S)
        if pattern.search(text):
            chosen = runs(prefix, root)
            body = table(chosen) if chosen else "(no runs yet)"
            text = pattern.sub(lambda m, body=body: m.group(1) + body + "\n" + m.group(2), text)
    return text


def stale(root: Path = RUNS) -> list[Path]:
    return [page for page in sorted(set(PAGES.values())) if render(page.read_text(), root) != page.read_text()]


# ---- figures --------------------------------------------------------------------------------------
def figures(root: Path = RUNS) -> list[Path]:
    """Validation curves against time (wall or CPU, as the runs' budgets counted it), one figure per table
    with runs."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    made = []
    FIGURES.mkdir(parents=True, exist_ok=True)
    for name, (prefix, _) in TABLES.items():
        chosen = runs(prefix, root)
        key = "val_accuracy" if name.startswith(("sort", "classify")) else "val_loss"
        if all(sum(key in row for row in r.rows) < 2 for r in chosen):
            key = "train_loss"  # evaluated only at the end: the training curve instead
        chosen = [r for r in chosen if any(key in row for row in r.rows)]
        if not chosen:
            continue
        many = len(chosen) > 10  # more runs than the default cycle has colours: the legend beside the axes
        fig, ax = plt.subplots(figsize=(8.8, 4.4) if many else (6.4, 3.6), dpi=100)
        if many:
            ax.set_prop_cycle(color=plt.get_cmap("tab20").colors)
        for run in chosen:
            pts = [(row["time"], row[key]) for row in run.rows if key in row]
            ax.plot([t for t, _ in pts], [v for _, v in pts], marker=".", label=run.name)
        labels = {"val_loss": "validation nats/char", "train_loss": "training loss (nats)"}
        ax.set_ylabel(labels.get(key, "validation accuracy"))
        clocks = {r.train.get("clock", "wall") for r in chosen}
        ax.set_xlabel({"cpu": "CPU time, s", "wall": "wall time, s"}[clocks.pop()] if len(clocks) == 1 else "time, s")
        ax.grid(alpha=0.3)
        if many:
            ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
        else:
            ax.legend(fontsize=7)
        fig.tight_layout()
        path = FIGURES / f"{name}.png"
        fig.savefig(path, metadata={"Software": None})
        plt.close(fig)
        made.append(path)
    return made


# ---- commands -------------------------------------------------------------------------------------
def evaluate(run_dir: Path, name: str, args: list[str]) -> Path:
    command = ["rnnkit", "eval", str(run_dir), *args, "--json"]
    env_python = [sys.executable, "-m", "rnnkit", *command[1:]]
    done = subprocess.run(env_python, capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"{' '.join(command)} failed:\n{done.stderr}")
    out = done.stdout
    metrics = json.loads(out.strip().splitlines()[-1])
    path = run_dir / f"eval-{name}.json"
    doc = {"command": command, "run_dir": str(run_dir), "metrics": metrics}
    path.write_text(json.dumps(doc, indent=1) + "\n")
    return path


def collect(run_dir: Path, name: str, root: Path = RUNS) -> Path:
    """Copy a run's config.json, metrics.jsonl and eval-*.json to `root`/`name`, with the paths of this
    machine written as what they name: a data file by its file name, the run as runs/NAME."""
    dest = root / name
    dest.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(run_dir / "metrics.jsonl", dest / "metrics.jsonl")
    config = json.loads((run_dir / "config.json").read_text())
    if config["task_config"].get("data"):
        config["task_config"]["data"] = Path(config["task_config"]["data"]).name
    (dest / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    for p in sorted(run_dir.glob("eval-*.json")):
        doc = json.loads(p.read_text())
        doc["command"] = [_local(arg, (str(run_dir), doc["run_dir"]), name) for arg in doc["command"]]
        doc["run_dir"] = f"runs/{name}"
        (dest / p.name).write_text(json.dumps(doc, indent=1) + "\n")
    return dest


def _local(arg: str, run_dirs: tuple[str, ...], name: str) -> str:
    """One argument of a command as the docs show it: the run (as given, or as the eval named it) as
    runs/NAME, an absolute path by its file name."""
    if arg in run_dirs:
        return f"runs/{name}"
    return Path(arg).name if arg.startswith("/") else arg


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["evaluate"]:
        rest = argv[1:]
        extra = rest[rest.index("--") + 1 :] if "--" in rest else []
        print(evaluate(Path(rest[0]), rest[1], extra))
        return 0
    if argv[:1] == ["collect"]:
        print(collect(Path(argv[1]), argv[2]))
        return 0
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only check that the committed tables are current")
    parser.add_argument("--no-figures", action="store_true", help="rewrite the tables only")
    args = parser.parse_args(argv)
    if args.check:
        for page in stale():
            print(
                f"{page.relative_to(ROOT)}: results tables are stale; run python tools/results_table.py",
                file=sys.stderr,
            )
        return 1 if stale() else 0
    for page in sorted(set(PAGES.values())):
        page.write_text(render(page.read_text()))
    if not args.no_figures:
        for path in figures():
            print(path.relative_to(ROOT))
    return 0


if __name__ == "__main__":
    sys.exit(main())
