"""The shipping table (docs/shipping.md, README.md), generated from the tests that check it.

    python docs/gen_shipping.py            # rewrite the tables between <!-- shipping:NAME --> markers
    python docs/gen_shipping.py --check    # exit 1 if a committed table differs

Every cell of the tables is one test, named by the same parametrization: the built-in layers'
rows from tests/test_export_compile.py (``LAYERS``, ``OPTIONS``, ``ONNX_LAYERS``), every other
cell's (a user's, the layer-normalised cells, minGRU, minLSTM, the LSTM with ``proj_size``) from
tests/test_export_cells.py (``LAYERS`` x ``COLUMNS``, each column named with its test:
``test_compile_training``, ``test_compile_inference``, ``test_export_and_onnx``); the suite runs
those tests and this check, so a table on main says only what the suite verified on it.
"""

from __future__ import annotations

import importlib.util
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TESTS = ROOT / "tests" / "test_export_compile.py"
CELL_TESTS = ROOT / "tests" / "test_export_cells.py"
TARGETS = {ROOT / "docs" / "shipping.md": ("matrix", "export"), ROOT / "README.md": ("compile", "export")}
YES = "yes"


def _tests(path: Path = TESTS):
    sys.path.insert(0, str(path.parent))  # the tests import their shared cells (tests/user_cells.py)
    try:
        spec = importlib.util.spec_from_file_location(path.stem, path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(path.parent))
    return module


def _cell_tests(module) -> dict[str, set[str]]:
    """Each column of tests/test_export_cells.py -> the layers its test is parametrized over."""
    return {
        column: set(module.LAYERS) if callable(getattr(module, test, None)) else set()
        for column, (test, _) in module.COLUMNS.items()
    }


def _options(kwargs: dict) -> str:
    words = []
    if kwargs.get("num_layers", 1) > 1:
        words.append(f"{kwargs['num_layers']} layers")
    if kwargs.get("bidirectional"):
        words.append("bidirectional")
    return ", ".join(words) or "1 layer"


def tables() -> dict[str, str]:
    t = _tests()
    rows = ["| layer | option | `torch.compile(fullgraph=True)` training | inference |", "|---|---|---|---|"]
    for name in t.LAYERS:
        for option in t.OPTIONS:
            train = YES
            infer = "(training only)" if option == "dropout" else YES
            rows.append(f"| {name} | {option} | {train} | {infer} |")
    for name in t.STEPPING:
        rows.append(f"| {name} | one step, state carried (generation) | - | {YES} |")
    cells = _tests(CELL_TESTS)
    tested = _cell_tests(cells)

    def mark(column: str, name: str, yes: str = YES) -> str:
        return yes if name in tested[column] else "not tested"

    for name in cells.LAYERS:
        option = "lengths (training); initial state (inference)"
        rows.append(f"| {name} | {option} | {mark('compile training', name)} | {mark('compile inference', name)} |")
    matrix = "\n".join(rows)
    rows = [
        "| layer | `torch.export` (dynamic B and T, lengths, state in and out) | ONNX through onnxruntime |",
        "|---|---|---|",
    ]
    for name in t.LAYERS:
        # one test exports each layer and runs that program through ONNX (test_export_and_onnx)
        options = _options(t.ONNX_LAYERS[name])
        rows.append(f"| {name} ({options}) | {YES} | {YES}: ONNX `{name}` node ({options}) |")
    for name in cells.LAYERS:
        onnx = mark("onnx", name, f"{YES}: ONNX `Scan` (bidirectional)")
        rows.append(f"| {name} (bidirectional) | {mark('export', name)} | {onnx} |")
    summary = ["| layer | `torch.compile(fullgraph=True)` training | inference |", "|---|---|---|"]
    for name in t.LAYERS:
        summary.append(f"| {name} ({', '.join(t.OPTIONS)}) | {YES} | {YES} |")
    for name in cells.LAYERS:
        summary.append(f"| {name} | {mark('compile training', name)} | {mark('compile inference', name)} |")
    return {"matrix": matrix, "export": "\n".join(rows), "compile": "\n".join(summary)}


def render(text: str, made: dict[str, str], names) -> str:
    for name in names:
        pattern = re.compile(rf"(<!-- shipping:{name} -->\n).*?(<!-- /shipping:{name} -->)", re.S)
        if not pattern.search(text):
            raise SystemExit(f"no <!-- shipping:{name} --> markers")
        table = made[name]
        text = pattern.sub(lambda m, table=table: m.group(1) + table + "\n" + m.group(2), text)
    return text


def stale() -> list[str]:
    made = tables()
    return [str(path) for path, names in TARGETS.items() if render(path.read_text(), made, names) != path.read_text()]


def main(argv=None) -> int:
    if "--check" in (argv or sys.argv[1:]):
        bad = stale()
        print("\n".join(bad) or "up to date")
        return 1 if bad else 0
    made = tables()
    for path, names in TARGETS.items():
        path.write_text(render(path.read_text(), made, names))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
