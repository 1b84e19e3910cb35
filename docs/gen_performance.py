"""Performance tables and plot, generated from a benchmark's JSON output (never typed by hand).

    python -m rnnkit.bench --json docs/data/bench.json     # measure (the full grid, a few minutes)
    python docs/gen_performance.py                         # rewrite the tables in README.md and docs/performance.md
    python docs/gen_performance.py --check                 # exit 1 if the committed tables differ

Each table lives between two markers, ``<!-- bench:NAME -->`` and ``<!-- /bench:NAME -->``, in
README.md (``summary``) and docs/performance.md (``machine``, ``summary``, ``grid``, ``stepping``,
``custom``); everything outside the markers is left alone. The test suite runs the check, so a
committed table always equals what this script makes from the committed JSON. The plot
(``performance.svg``) is drawn at ``mkdocs build`` time by docs/hooks.py with :func:`ratio_plot`.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BENCH_JSON = ROOT / "docs" / "data" / "bench.json"
TARGETS = {
    ROOT / "README.md": ("summary",),
    ROOT / "docs" / "performance.md": ("machine", "summary", "grid", "stepping", "custom"),
}
KINDS = {"lstm": "LSTM", "gru": "GRU", "rnn": "RNN"}
MODES = {"train": "training (forward + backward)", "infer": "inference (forward)"}


def _name(kind: str) -> str:
    """A layer kind as the docs write it: LSTM for lstm; a kind this script does not know, as it is."""
    return KINDS.get(kind, kind)


def load(path: Path = BENCH_JSON) -> dict:
    return json.loads(path.read_text())


def command(report: dict) -> str:
    """The command line that produced ``report`` (its preset and thread count are in the JSON)."""
    flag = {"full": "", "quick": " --quick", "smoke": " --smoke"}[report["preset"]]
    return f"python -m rnnkit.bench{flag} --threads {report['machine']['threads']} --json docs/data/bench.json"


def machine(report: dict) -> str:
    m = report["machine"]
    cpu = m.get("cpu") or m.get("processor") or "unknown CPU"
    return (
        f"{cpu}, {m['threads']} thread(s), torch {m['torch']}, Python {m['python']}, "
        f"step loops: {m['step_loops']}; matmul peak {m['matmul_peak_gflops']:.0f} GFLOP/s"
    )


def _span(values: list[float]) -> str:
    if not values:
        return "-"
    lo, hi = min(values), max(values)
    return f"{lo:.2f}" if f"{lo:.2f}" == f"{hi:.2f}" else f"{lo:.2f}-{hi:.2f}"


def _geomean(values: list[float]) -> float:
    return math.exp(sum(math.log(v) for v in values) / len(values))


def summary_table(report: dict) -> str:
    """Ratios torch.nn time / rnnkit time per layer kind, batch 1 and batch >= 32, as min-max spans."""
    rows = report["rows"]
    kinds = list(dict.fromkeys(r["kind"] for r in rows))  # in the order the benchmark ran them
    out = [
        "| layer | training, batch 1 | training, batch >= 32 | inference, batch 1 | inference, batch >= 32 |",
        "| --- | --- | --- | --- | --- |",
    ]
    for kind in kinds:
        cells = []
        for mode in ("train", "infer"):
            for small in (True, False):
                cells.append(
                    _span(
                        [
                            r["ratio"]
                            for r in rows
                            if r["kind"] == kind
                            and r["mode"] == mode
                            and (r["batch"] == 1) == small
                            and (small or r["batch"] >= 32)
                        ]
                    )
                )
        out.append(f"| {_name(kind)} | " + " | ".join(cells) + " |")
    return "\n".join(out)


def grid_table(report: dict) -> str:
    out = [
        "| layer | mode | batch | hidden | steps | torch.nn ms | rnnkit ms | ratio | pairs' middle half "
        "| rnnkit GFLOP/s | of peak |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | --- | ---: | ---: |",
    ]
    for r in report["rows"]:
        out.append(
            f"| {_name(r['kind'])} | {r['mode']} | {r['batch']} | {r['hidden']} | {r['steps']} | "
            f"{r['torch_ms']:.2f} | {r['rnnkit_ms']:.2f} | {r['ratio']:.2f} | "
            f"{r['ratio_q1']:.2f}-{r['ratio_q3']:.2f} | {r['gflops']:.1f} | {100 * r['peak_frac']:.0f}% |"
        )
    return "\n".join(out)


def stepping_table(report: dict) -> str:
    out = [
        "| layer (3 layers of 512) | batch | torch.nn ms/token | rnnkit ms/token | ratio | pairs' middle half |",
        "| --- | ---: | ---: | ---: | ---: | --- |",
    ]
    for st in report.get("stepping", []):
        out.append(
            f"| {_name(st['kind'])} | {st['batch']} | {st['torch_ms_per_token']:.3f} | "
            f"{st['rnnkit_ms_per_token']:.3f} | {st['ratio']:.2f} | {st['ratio_q1']:.2f}-{st['ratio_q3']:.2f} |"
        )
    return "\n".join(out)


def custom_table(report: dict) -> str:
    out = ["| what | user-written LSTM cell | built-in LSTM | user / built-in time |", "| --- | ---: | ---: | ---: |"]
    for c in report.get("custom_cell", []):
        where = (
            f"stepping 3 x {c['hidden']}, batch 1, ms/token"
            if c["mode"] == "step"
            else f"{c['mode']}, batch {c['batch']}, hidden {c['hidden']}, {c['steps']} steps, ms"
        )
        out.append(f"| {where} | {c['user_cell_ms']:.2f} | {c['builtin_ms']:.2f} | {c['slowdown']:.2f}x |")
    return "\n".join(out)


def machine_block(report: dict) -> str:
    return f"Command: `{command(report)}`\n\nMachine: {machine(report)}."


def overall(report: dict) -> str:
    """One sentence: the grid's geometric mean and minimum ratio per mode, and the stepping ratios at batch 1."""
    parts = []
    for mode in ("train", "infer"):
        ratios = [r["ratio"] for r in report["rows"] if r["mode"] == mode]
        if ratios:
            parts.append(
                f"{mode.replace('infer', 'inference').replace('train', 'training')} geometric mean "
                f"{_geomean(ratios):.2f} (minimum {min(ratios):.2f}, {len(ratios)} points)"
            )
    text = "Over the whole grid: " + "; ".join(parts) + "."
    steps = [f"{_name(st['kind'])} {st['ratio']:.2f}" for st in report.get("stepping", []) if st["batch"] == 1]
    if steps:
        text += " Stepping one token at a time through 3 layers of 512 at batch 1: " + ", ".join(steps) + "."
    return text


def summary_block(report: dict) -> str:
    return (
        summary_table(report) + "\n\n" + overall(report) + "\n"
        f"Ratio = torch.nn time / rnnkit time, float32 on the CPU; above 1, rnnkit is faster. "
        f"Measured with `{command(report)}` on {machine(report)}."
    )


SECTIONS = {
    "machine": machine_block,
    "summary": summary_block,
    "grid": grid_table,
    "stepping": stepping_table,
    "custom": custom_table,
}


def render(text: str, names: tuple[str, ...], report: dict, source: str) -> str:
    """``text`` with the region between each ``<!-- bench:NAME -->`` and ``<!-- /bench:NAME -->`` regenerated."""
    for name in names:
        pattern = re.compile(rf"(<!-- bench:{name} -->\n).*?(<!-- /bench:{name} -->)", re.S)
        if not pattern.search(text):
            raise ValueError(f"{source} has no <!-- bench:{name} --> ... <!-- /bench:{name} --> region")
        body = SECTIONS[name](report)
        text = pattern.sub(lambda m, body=body: m.group(1) + body + "\n" + m.group(2), text)
    return text


def stale(report: dict) -> list[Path]:
    """The target files whose committed tables differ from what ``report`` generates."""
    return [
        path
        for path, names in TARGETS.items()
        if render(path.read_text(), names, report, str(path)) != path.read_text()
    ]


def ratio_plot(report: dict) -> str:
    """An SVG bar chart of every grid point's ratio (torch.nn / rnnkit), training and inference side by side."""
    import io

    import matplotlib
    import matplotlib.ticker

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = report["rows"]
    fig, axes = plt.subplots(1, 2, figsize=(11, 0.28 * len(rows) / 2 + 1.5), sharey=True)
    for ax, mode in zip(axes, ("train", "infer")):
        part = [r for r in rows if r["mode"] == mode]
        labels = [f"{_name(r['kind'])} {r['batch']} x {r['hidden']} x {r['steps']}" for r in part]
        ratios = [r["ratio"] for r in part]
        # the whiskers: the middle half of the alternated pairs' ratios
        errors = [[r["ratio"] - r["ratio_q1"] for r in part], [r["ratio_q3"] - r["ratio"] for r in part]]
        errors = [[max(e, 0.0) for e in side] for side in errors]
        colours = ["tab:green" if x >= 1 else "tab:red" for x in ratios]
        # bars grow from 1 (a draw): right of it rnnkit is faster, left of it torch.nn is
        ax.barh(range(len(part)), [x - 1 for x in ratios], left=1, xerr=errors, color=colours, alpha=0.8, ecolor="0.3")
        ax.axvline(1.0, color="black", linewidth=0.8)
        ax.set_xscale("log")
        ax.xaxis.set_major_locator(matplotlib.ticker.LogLocator(base=2))
        ax.xaxis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%g"))
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.set_yticks(range(len(part)), labels, fontsize=8)
        ax.set_title(MODES[mode])
        ax.set_xlabel("torch.nn time / rnnkit time (batch x hidden x steps)")
    axes[0].invert_yaxis()  # the axes share y: once for both, the first row on top
    fig.tight_layout()
    buffer = io.StringIO()
    fig.savefig(buffer, format="svg", metadata={"Date": None})
    plt.close(fig)
    return buffer.getvalue()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path, default=BENCH_JSON, help="benchmark output to read")
    parser.add_argument("--check", action="store_true", help="only check that the committed tables are current")
    args = parser.parse_args(argv)
    report = load(args.json)
    if args.check:
        files = stale(report)
        for path in files:
            print(
                f"{path.relative_to(ROOT)}: tables differ from {args.json}; run python docs/gen_performance.py",
                file=sys.stderr,
            )
        return 1 if files else 0
    for path, names in TARGETS.items():
        path.write_text(render(path.read_text(), names, report, str(path)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
