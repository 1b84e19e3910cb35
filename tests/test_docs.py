"""Every docstring example in the package runs, so the docs cannot drift from the code."""
from __future__ import annotations

import doctest
import importlib
import pkgutil
import re
from pathlib import Path

import pytest

import rnnkit

MODULES = sorted(
    info.name for info in pkgutil.walk_packages(rnnkit.__path__, prefix="rnnkit.")
    if not info.name.endswith("__main__")
)


@pytest.mark.parametrize("name", ["rnnkit", *MODULES])
def test_docstring_examples_run(name):
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.failed == 0, f"{result.failed} of {result.attempted} examples failed in {name}"


README = Path(__file__).resolve().parents[1] / "README.md"


@pytest.mark.skipif(not README.is_file(), reason="README.md is not beside the tests")
def test_readme_python_examples_run():
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)
    assert blocks, "README.md has no python examples"
    for block in blocks:
        exec(compile(block, "README.md", "exec"), {})
