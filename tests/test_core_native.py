"""The C++ sources: every one is compiled, in the cache key and shipped in the wheel."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from rnnkit.core import native

CORE = Path(native.__file__).parent
PYPROJECT = CORE.parents[2] / "pyproject.toml"


def test_every_cpp_file_is_a_source_or_a_header():
    on_disk = {p.name for p in CORE.iterdir() if p.suffix in (".cpp", ".h")}
    assert on_disk == {p.name for p in (*native.SOURCES, *native.HEADERS)}
    assert all(p.suffix == ".cpp" for p in native.SOURCES) and all(p.suffix == ".h" for p in native.HEADERS)


@pytest.mark.skipif(not PYPROJECT.is_file(), reason="pyproject.toml is not beside the package")
def test_the_wheel_ships_every_source():
    text = PYPROJECT.read_text()
    listed = re.search(r"\[tool\.setuptools\.package-data\]\s*rnnkit\s*=\s*\[([^\]]*)\]", text)
    assert listed is not None
    shipped = set(re.findall(r'"([^"]+)"', listed.group(1)))
    assert {f"core/{p.name}" for p in (*native.SOURCES, *native.HEADERS)} <= shipped
