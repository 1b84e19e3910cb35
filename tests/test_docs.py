"""The documentation cannot drift from the code: every docstring example, every Python block of the
README and the docs site runs; the site builds with ``mkdocs build --strict``; and the performance
tables equal what ``docs/gen_performance.py`` makes from the committed benchmark JSON.

Python blocks: each ```` ```python ```` block of a file runs, in order, in one namespace per file,
in a temporary working directory (a block may write files, such as a run directory). A block that
must not run is fenced ```` ```python-norun ```` (see CONTRIBUTING.md).
"""

from __future__ import annotations

import argparse
import contextlib
import doctest
import functools
import importlib
import importlib.util
import io
import json
import os
import pkgutil
import re
import shlex
import subprocess
import sys
import tempfile
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


@pytest.mark.parametrize("path", MARKDOWN, ids=[str(p.relative_to(ROOT)) for p in MARKDOWN])
def test_markdown_norun_blocks_compile(path):
    """A ```python-norun block is not run, but it is still Python: it must compile."""
    for lang, line, code in fences(path.read_text()):
        if lang == "python-norun":
            compile("\n" * (line - 1) + code, str(path), "exec")


@pytest.mark.parametrize("path", [p for p in (README, ROOT / "CONTRIBUTING.md") if p.is_file()], ids=lambda p: p.name)
def test_relative_links_resolve(path):
    """The README and CONTRIBUTING link into the repository (docs pages are checked by mkdocs --strict)."""
    links = re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", path.read_text())
    missing = [link for link in links if "://" not in link and not (path.parent / link).exists()]
    assert not missing, f"{path.name} links to files that do not exist: {missing}"


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


# ---- the command lines the docs show use flags that exist --------------------------------------------
# flags of other programs the docs mention (pip, torchrun, mkdocs, pytest, ruff)
OTHER_TOOLS = {"--nproc-per-node", "--strict", "--site-dir", "--fix", "--check", "--unsafe-fixes"}


def _command_lines(text: str) -> list[list[str]]:
    """The argv after `rnnkit` of every command in the docs' shell blocks, e.g. ["train", "lm", "--data", "X"]."""
    lines = []
    for block in (code for lang, _, code in fences(text) if lang in ("bash", "sh", "console", "")):
        for command in re.split(r"\|\||&&|\||;", block.replace("\\\n", " ")):
            for line in command.splitlines():
                try:
                    tokens = shlex.split(line, comments=True)
                except ValueError:  # an unbalanced quote in a line that is not a command
                    continue
                if "rnnkit" in tokens:
                    lines.append(tokens[tokens.index("rnnkit") + 1 :])
    return lines


def _parser_options(argv: list[str]) -> set[str]:
    """Every option string the parser accepts for `rnnkit ARGV...`, walking into subcommands."""
    from rnnkit.cli.main import build_parser

    parser, rest, known = build_parser(argv), list(argv), set()
    while parser is not None:
        child = None
        for action in parser._actions:
            if action.help != argparse.SUPPRESS:  # old spellings, hidden from the help, are not to be documented
                known.update(action.option_strings)
            if isinstance(action, argparse._SubParsersAction):
                word = next((a for a in rest if not a.startswith("-")), None)
                if word in action.choices:
                    child, rest = action.choices[word], rest[rest.index(word) + 1 :]
        parser = child
    return known


@functools.cache
def _run_dirs() -> dict[str, str]:
    """A minimal run directory per task (config.json only): commands such as `eval` and `predict` add
    the flags of the run's task, which they read from RUN_DIR/config.json."""
    from rnnkit.tasks.base import TASKS

    root = Path(tempfile.mkdtemp(prefix="rnnkit-docs-runs-"))
    dirs = {}
    for name in TASKS:
        (root / name).mkdir()
        (root / name / "config.json").write_text(json.dumps({"task": name, "task_config": {}, "train": {}}))
        dirs[name] = str(root / name)
    return dirs


def _options(argv: list[str]) -> set[str]:
    """The flags of `rnnkit ARGV...`; for a command that takes a run directory, with any task's run there."""
    known = _parser_options(argv)
    if argv[0] not in ("train", "demo"):
        for run_dir in _run_dirs().values():
            known |= _parser_options([argv[0], run_dir])
    return known


DOCUMENTED = [p for p in MARKDOWN if p.is_file()] + [p for p in (ROOT / "CONTRIBUTING.md",) if p.is_file()]


@pytest.mark.parametrize("path", DOCUMENTED, ids=[str(p.relative_to(ROOT)) for p in DOCUMENTED])
def test_documented_commands_use_existing_flags(path):
    unknown = []
    for argv in _command_lines(path.read_text()):
        if not argv or argv[0].startswith("-") or argv[0] not in _commands():
            continue
        known = _options(argv)
        unknown += [
            f"rnnkit {' '.join(argv)}: {flag}"
            for a in argv
            if a.startswith("--") and (flag := a.split("=")[0]) not in known
        ]
    assert not unknown, "flags that rnnkit does not have:\n" + "\n".join(unknown)


def _commands() -> set[str]:
    from rnnkit.cli.main import COMMANDS

    return set(COMMANDS)


def test_the_flag_check_catches_a_flag_that_does_not_exist():
    lines = _command_lines("```bash\nrnnkit train lm --steps 5 --no-such-flag 1 | rnnkit eval R --json\n```\n")
    assert lines == [["train", "lm", "--steps", "5", "--no-such-flag", "1"], ["eval", "R", "--json"]]
    assert "--steps" in _options(lines[0]) and "--no-such-flag" not in _options(lines[0])


def _benchmark_flags() -> set[str]:
    from rnnkit.bench import cells, main

    flags = set()
    for bench in (main, cells.main):  # python -m rnnkit.bench, python -m rnnkit.bench.cells
        with pytest.raises(SystemExit), contextlib.redirect_stdout(io.StringIO()) as out:
            bench(["--help"])
        flags |= set(re.findall(r"--[a-z][a-z0-9-]*", out.getvalue()))
    return flags


def test_every_flag_the_docs_mention_exists():
    """Any `--flag` written anywhere in the README, CONTRIBUTING or the docs (prose included) is a flag of
    some rnnkit command, of the benchmark, or of another tool the docs name."""
    from rnnkit.tasks.base import TASKS

    known = OTHER_TOOLS | _benchmark_flags()
    for argv in [[name, "RUN_DIR"] for name in _commands()] + [["train", task] for task in TASKS]:
        known |= _options(argv)
    unknown = {
        f"{path.relative_to(ROOT)}: {flag}"
        for path in DOCUMENTED
        for flag in re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*", path.read_text())
        if flag not in known
    }
    assert not unknown, "flags that do not exist:\n" + "\n".join(sorted(unknown))
