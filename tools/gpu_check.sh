#!/usr/bin/env bash
# The GPU check, in one call on a machine with a CUDA GPU (docs/gpu.md): the CUDA tests, then the
# benchmark's CUDA rows, each written as JSON into $OUT (default: gpu-check/).
#   tools/gpu_check.sh [--quick]      from the repository root, the test and gpu extras installed
set -u
cd "$(dirname "$0")/.."
OUT="${OUT:-gpu-check}"
mkdir -p "$OUT"
export PYTHONPATH="src${PYTHONPATH:+:$PYTHONPATH}"
QUICK="${1:-}"

python - <<'PY' > "$OUT/device.json"
import json, platform, torch
info = {"torch": torch.__version__, "python": platform.python_version(), "cuda": torch.cuda.is_available()}
if torch.cuda.is_available():
    info.update(device=torch.cuda.get_device_name(), cuda_version=torch.version.cuda,
                cudnn=torch.backends.cudnn.version())
try:
    import triton
    info["triton"] = triton.__version__
except ImportError:
    info["triton"] = None
print(json.dumps(info, indent=1))
PY
cat "$OUT/device.json"

# the CUDA tests, and the Triton kernels under the interpreter (the same checks as on the CPU)
python -m pytest -q -p no:cacheprovider tests/test_gpu_cuda.py tests/test_gpu_bench.py tests/test_gpu_graphs.py tests/test_gpu_triton.py \
    --junitxml="$OUT/tests.xml" 2>&1 | tail -n 30 | tee "$OUT/tests.txt"
tests_rc=${PIPESTATUS[0]}

bench_rc=0
if python -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    python -m rnnkit.bench --device cuda ${QUICK} --json "$OUT/bench_cuda.json" 2>&1 | tee "$OUT/bench.txt"
    bench_rc=${PIPESTATUS[0]}
fi
python - "$OUT" "$tests_rc" "$bench_rc" <<'PY'
import json, sys
out, tests_rc, bench_rc = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
json.dump({"tests_rc": tests_rc, "bench_rc": bench_rc}, open(f"{out}/summary.json", "w"))
print(f"tests: exit {tests_rc}; benchmark: exit {bench_rc}; results in {out}/")
PY
exit $(( tests_rc != 0 || bench_rc != 0 ))
