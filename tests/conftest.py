"""Shared test fixtures: seeded randomness on one thread, the shared data folder."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def pytest_sessionstart(session):
    """Build rnnkit's C++ step loops once, before any test starts a subprocess that would need them
    (each process would otherwise build its own copy of a fresh cache, about 15 s apiece)."""
    from rnnkit.core import native

    native.ops()


@pytest.fixture(autouse=True)
def _seed_and_threads():
    """Seeded, on one thread: the tests' tensors are tiny, and on a busy 2-core machine OpenMP threads
    only wait on each other (measured many times slower with two)."""
    torch.manual_seed(0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def shared_data() -> Path:
    """../shared/data, or a clean skip on a machine without it."""
    if not SHARED_DATA.is_dir():
        pytest.skip("../shared/data is absent on this machine")
    return SHARED_DATA
