"""The C++ step loops, compiled on first use and cached; ``None`` where they can't be.

Sources, compiled into one library: ``native.cpp`` (the built-in cells' loops, the workspace, the
matmul ops), ``pointwise.cpp`` (a user's compiled cell, core/pointwise.py), ``ops.cpp``
(``torch.ops.rnnkit``, the operators PyTorch's tracers record: core/ops.py) and ``native.h`` (what
they share).

The kernels in ``core/kernels/`` prepare their buffers with torch ops and then run a loop over
time; on the CPU, ``ops()`` gives the same loops in C++ (``torch.ops.rnnkit_native``), which take
about a microsecond per step where the Python loop takes tens. They are built with the system's
C++ compiler against the installed torch the first time rnnkit is imported (core/ops.py defines
its operators from them; about 15 seconds, said once on stderr), into ``$RNNKIT_CACHE`` or
``~/.cache/rnnkit``, keyed by the sources, the torch version and the flags, so a later process
only loads the library. A machine without a
compiler, or ``RNNKIT_NATIVE=0``, keeps the Python loops: same results, slower.
"""

from __future__ import annotations

import hashlib
import math
import os
import platform
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import threading
from pathlib import Path

import torch

HERE = Path(__file__).parent
SOURCES = (
    HERE / "native.cpp",
    HERE / "pointwise.cpp",
    HERE / "ops.cpp",
)  # the translation units, compiled into one library
HEADERS = (HERE / "native.h",)  # what they share: in the cache key too
_state: dict = {}  # "ops": the loaded namespace or None, once decided
_lock = threading.Lock()


FLOATS = (torch.float32, torch.float64)  # the dtypes the C++ loops are compiled for


def ops_for(x: torch.Tensor):
    """``ops()`` where the C++ loops can run on ``x``'s device and dtype (the CPU, float32 or
    float64), else ``None``: the one test of where they run, used by the routing table and the
    kernels' own matmul choices."""
    if x.device.type != "cpu" or x.dtype not in FLOATS:
        return None
    return ops()


def enabled() -> bool:
    return os.environ.get("RNNKIT_NATIVE", "1") != "0"


def _cache_dir() -> Path:
    root = os.environ.get("RNNKIT_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "rnnkit")
    return Path(root) / "native"


def _flags() -> list[str]:
    from torch.utils import cpp_extension

    flags = [
        "-O3",
        "-std=c++20",
        "-shared",
        "-fPIC",
        "-ffp-contract=off",
        f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}",
    ]
    capability = torch.backends.cpu.get_cpu_capability()
    # ATen's SIMD types at the width torch's own kernels use on this CPU, with the same Sleef exp/tanh
    x86 = platform.machine() in ("x86_64", "AMD64")
    if x86 and capability == "AVX512":
        flags += [
            "-mavx512f",
            "-mavx512bw",
            "-mavx512vl",
            "-mavx512dq",
            "-mavx2",
            "-mfma",
            "-DCPU_CAPABILITY=AVX512",
            "-DCPU_CAPABILITY_AVX512",
        ]
    elif x86 and capability == "AVX2":
        flags += ["-mavx2", "-mfma", "-DCPU_CAPABILITY=AVX2", "-DCPU_CAPABILITY_AVX2"]
    else:
        flags += ["-DCPU_CAPABILITY=DEFAULT"]
    if "parallel backend: OpenMP" in torch.__config__.parallel_info():
        # at::parallel_for is inline code: without -fopenmp it runs on one thread. The library then
        # binds to the OpenMP runtime torch has loaded (the same soname), so one thread pool serves both.
        flags += ["-fopenmp"]
    flags += [f"-I{p}" for p in cpp_extension.include_paths()]
    libs = cpp_extension.library_paths()
    flags += [f"-L{p}" for p in libs] + [f"-Wl,-rpath,{p}" for p in libs] + ["-lc10", "-ltorch_cpu", "-ltorch"]
    return flags


def _build(target: Path, flags: list[str]) -> None:
    """Compile to a temporary file and rename it into place, so concurrent builds never see half a library."""
    cxx = os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++")
    if cxx is None:
        raise RuntimeError("no C++ compiler (c++ or g++) on PATH")
    target.parent.mkdir(parents=True, exist_ok=True)
    print("rnnkit: compiling the C++ step loops for this machine (once, about 15 s)", file=sys.stderr, flush=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        built = Path(tmp) / target.name
        objects = [Path(tmp) / f"{source.stem}.o" for source in SOURCES]
        # each source compiled in its own process (they take about equally long), then linked
        compiles = [
            subprocess.Popen(
                [cxx, "-c", str(source), "-o", str(obj), *flags],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                text=True,
            )
            for source, obj in zip(SOURCES, objects)
        ]
        results = [(proc.returncode, err) for proc in compiles for _, err in [proc.communicate()]]
        if all(code == 0 for code, _ in results):
            link = subprocess.run([cxx, *map(str, objects), "-o", str(built), *flags], capture_output=True, text=True)
            results = [(link.returncode, link.stderr)]
        for code, err in results:
            if code != 0:
                lines = err.splitlines()
                first = next((line for line in lines if "error" in line), lines[-1] if lines else f"exit {code}")
                raise RuntimeError(f"{cxx} failed: {first.strip()}")
        os.replace(built, target)


def ops():
    """``torch.ops.rnnkit_native`` once loaded, or ``None`` (disabled, or the build failed; said once)."""
    if "ops" in _state:
        return _state["ops"]
    with _lock:  # another thread may be building: wait for its answer rather than take None meanwhile
        if "ops" not in _state:
            _state["ops"] = _load()
    return _state["ops"]


def library_path() -> Path | None:
    """The file of the loaded C++ library (built first if need be), or ``None`` where it is not built.

    It holds ``torch.ops.rnnkit`` (core/ops.py) too: a process that runs an AOTInductor package or
    a ``torch.export`` program of an rnnkit model without rnnkit's Python code loads it with
    ``torch.ops.load_library(path)`` (docs: shipping). It needs the same torch version."""
    return _state.get("path") if ops() is not None else None


def _load():
    if not enabled():
        return None
    try:
        flags = _flags()
        key = hashlib.sha256(
            "\0".join(
                [*(p.read_text() for p in (*SOURCES, *HEADERS)), torch.__version__, sysconfig.get_platform(), *flags]
            ).encode()
        ).hexdigest()[:16]
        target = _cache_dir() / f"rnnkit_native-{key}.so"
        if not target.exists():
            _build(target, flags)
        torch.ops.load_library(str(target))
        _state["path"] = target
        return torch.ops.rnnkit_native
    except Exception as exc:
        print(f"rnnkit: C++ step loops unavailable ({exc}); using the Python loops", file=sys.stderr)
        return None


# Buffers of at least this size come from the workspace (native.cpp), which keeps freed ones for the
# next call of the same size instead of handing them back to the operating system: a fresh large
# buffer costs a page fault and a zeroed page per 4 KiB touched.
WORKSPACE_MIN_BYTES = 1 << 20


def buffer(shape, like: torch.Tensor) -> torch.Tensor:
    """An uninitialised buffer of ``shape`` like ``like``: from the workspace if large, on the CPU
    where the C++ loops are built, else ``like.new_empty``."""
    if like.device.type == "cpu" and math.prod(shape) * like.element_size() >= WORKSPACE_MIN_BYTES:
        loaded = ops()
        if loaded is not None:
            return loaded.workspace(list(shape), like.dtype)
    return like.new_empty(shape)


def empty_cache() -> int:
    """Free the large CPU buffers the C++ loops keep for reuse; returns the bytes freed.

    Training and inference take their buffers of 1 MiB or more (states, gates, gradients, the
    input projection, the outputs) from a workspace that keeps them from call to call, as torch's
    CUDA allocator does on a GPU, rather than asking the system for fresh memory each time; up to
    2 GiB of freed buffers wait for the next call (the oldest go first). Call this when a model is
    done with, or before other work needs the memory. 0 where the C++ loops are not built.

    A layer's output from the workspace is an ordinary tensor, except that its storage cannot grow
    (``resize_`` to a larger size, or ``out=`` of a larger result): clone it first for that.

    >>> import torch, rnnkit
    >>> out, _ = rnnkit.GRU(4, 256)(torch.randn(8, 200, 4))
    >>> del out
    >>> rnnkit.empty_cache() >= 0
    True
    """
    loaded = _state.get("ops")
    return int(loaded.release_workspace()) if loaded is not None else 0
