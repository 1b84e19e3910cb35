"""The shipping table (docs/shipping.md, README.md), generated from the tests that check it.

    python docs/gen_shipping.py            # rewrite the tables between <!-- shipping:NAME --> markers
    python docs/gen_shipping.py --check    # exit 1 if a committed table differs

Every cell of the tables is one test of tests/test_export_compile.py, named by the same
parametrization (``LAYERS``, ``OPTIONS``, ``ONNX_LAYERS``); the suite runs those tests and this
check, so a table on main says only what the suite verified on it.
"""

from __future__ import annotations

import importlib.util
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TESTS = ROOT / "tests" / "test_export_compile.py"
TARGETS = {ROOT / "docs" / "shipping.md": ("matrix", "export"), ROOT / "README.md": ("export",)}
YES = "yes"


def _tests():
    spec = importlib.util.spec_from_file_location("test_export_compile", TESTS)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


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
    again = f"{YES}, traced again at a new length"
    rows.append(f"| a user's cell | plain | {again} | {again} |")
    matrix = "\n".join(rows)
    rows = ["| layer | `torch.export` (dynamic B and T, lengths, state in and out) | ONNX through onnxruntime |",
            "|---|---|---|"]
    for name in t.LAYERS:
        onnx = f"{YES}: ONNX `{name}` node ({_options(t.ONNX_LAYERS[name])})" if name in t.ONNX_LAYERS else "no"
        rows.append(f"| {name} (2 layers, bidirectional) | {YES} | {onnx} |")
    rows.append("| a user's cell | no (its loop is unrolled per length) | no |")
    return {"matrix": matrix, "export": "\n".join(rows)}


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
