"""mkdocs hook: the performance plot, drawn from docs/data/bench.json when the site is built.

The SVG is generated in memory and added to the site as ``performance.svg`` (no image is committed),
with :func:`gen_performance.ratio_plot`, the same data as the tables in performance.md.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from mkdocs.structure.files import File

HERE = Path(__file__).resolve().parent


def _generator():
    spec = importlib.util.spec_from_file_location("gen_performance", HERE / "gen_performance.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def on_files(files, config):
    gen = _generator()
    svg = gen.ratio_plot(gen.load())
    files.append(File.generated(config, "performance.svg", content=svg))
    return files
