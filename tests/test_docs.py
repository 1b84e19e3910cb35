"""The documentation cannot drift from the code: every docstring example, every Python block of the
README and the docs site runs; the site builds with ``mkdocs build --strict``; and the performance
tables equal what ``docs/gen_performance.py`` makes from the committed benchmark JSON.

Python blocks: each ```` ```python ```` block of a file runs, in order, in one namespace per file,
in a temporary working directory (a block may write files, such as a run directory). A block that
must not run is fenced ```` ```python-norun ```` (see CONTRIBUTING.md).
"""

from __future__ import annotations

import doctest
import importlib
import importlib.util
import os
import pkgutil
import re
import subprocess
import sys
from pathlib import Path

import pytest

import rnnkit

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = ROOT / "docs"

MODULES = sorted(
    info.name for info in pkgutil.walk_packages(rnnkit.__path__, prefix="rnnkit.") if not info.name.endswith("__main__")
)


@pytest.mark.parametrize("name", ["rnnkit", *MODULES])
def test_docstring_examples_run(name):
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.failed == 0, f"{result.failed} of {result.attempted} examples failed in {name}"


def fences(text: str) -> list[tuple[str, int, str]]:
    """(language, first line number, code) of every fenced block (```lang ... ```) at the start of a line."""
    blocks, lines, i = [], text.split("\n"), 0
    while i < len(lines):
        m = re.match(r"^(```+)\s*([\w-]*)", lines[i])
        if m:
            end = next((j for j in range(i + 1, len(lines)) if lines[j].strip() == m.group(1)), len(lines))
            blocks.append((m.group(2), i + 2, "".join(line + "\n" for line in lines[i + 1 : end])))
            i = end
        i += 1
    return blocks


def python_blocks(text: str) -> list[tuple[int, str]]:
    """(line number, code) of every ```python block; ```python-norun and other fences are left out."""
    return [(line, code) for lang, line, code in fences(text) if lang == "python"]


def test_python_blocks_are_found():
    text = "x\n```python\na = 1\n```\n```python-norun\nb = 2\n```\n```bash\nc\n```\n```python\nd = 3\n```\n"
    assert python_blocks(text) == [(3, "a = 1\n"), (12, "d = 3\n")]


MARKDOWN = sorted([README, *DOCS.rglob("*.md")]) if DOCS.is_dir() else [README]


@pytest.mark.skipif(not README.is_file(), reason="README.md is not beside the tests")
@pytest.mark.parametrize("path", MARKDOWN, ids=[str(p.relative_to(ROOT)) for p in MARKDOWN])
def test_markdown_python_blocks_run(path, tmp_path, monkeypatch):
    blocks = python_blocks(path.read_text())
    if not blocks:
        pytest.skip(f"{path.name} has no python blocks")
    monkeypatch.chdir(tmp_path)
    namespace: dict = {"__name__": "__docs__"}
    for line, code in blocks:
        # blank lines first, so a traceback's line numbers are the markdown file's
        exec(compile("\n" * (line - 1) + code, str(path), "exec"), namespace)


def test_readme_has_python_examples():
    assert len(python_blocks(README.read_text())) >= 3


def _generator():
    spec = importlib.util.spec_from_file_location("gen_performance", DOCS / "gen_performance.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.skipif(not (DOCS / "data" / "bench.json").is_file(), reason="no committed benchmark JSON")
def test_performance_tables_match_the_benchmark_json():
    gen = _generator()
    report = gen.load()
    assert gen.stale(report) == [], "run: python docs/gen_performance.py"
    # and the README's table names the command and the machine that produced it
    readme = README.read_text()
    assert gen.command(report) in readme and f"{report['machine']['threads']} thread" in readme


def test_performance_tables_follow_the_json(tmp_path):
    """The generator really reads the numbers: a changed ratio changes the table."""
    gen = _generator()
    report = gen.load()
    before = gen.summary_table(report)
    report["rows"][0]["ratio"] = 123.0
    assert "123.00" in gen.summary_table(report) and gen.summary_table(report) != before
    marked = "a\n<!-- bench:summary -->\nold\n<!-- /bench:summary -->\nb\n"
    out = gen.render(marked, ("summary",), report, "x.md")
    assert out.startswith("a\n<!-- bench:summary -->\n") and out.endswith("<!-- /bench:summary -->\nb\n")
    assert "old" not in out and "123.00" in out
    with pytest.raises(ValueError, match="no <!-- bench:grid -->"):
        gen.render(marked, ("grid",), report, "x.md")


@pytest.mark.skipif(importlib.util.find_spec("mkdocs") is None, reason="mkdocs is not installed (.[test] has it)")
@pytest.mark.skipif(not (ROOT / "mkdocs.yml").is_file(), reason="mkdocs.yml is not beside the tests")
def test_docs_site_builds_strict(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
    )
    assert result.returncode == 0, result.stderr[-4000:]
    assert (tmp_path / "site" / "performance.svg").stat().st_size > 1000
    api = (tmp_path / "site" / "api" / "index.html").read_text()
    assert "combine" in api and "initial_state" in api  # the reference is filled from the docstrings
