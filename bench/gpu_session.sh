#!/usr/bin/env bash
# Every check that needs a GPU, in one pass, for a machine with CUDA and PyTorch already on it
# (a Deep Learning VM, or a lent GPU machine): the GPU tests, exact resume on the GPU, and the
# GPU benchmark. Results go to $OUT (default bench/out). Wheels in .whl/ (e.g. structlog) are
# installed to /tmp/site first when the machine lacks them.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-bench/out}
mkdir -p "$OUT"
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site:$PWD
fi
export PYTHONUNBUFFERED=1
{ nvidia-smi -L; python3 -c 'import sys, torch; print("python", sys.version.split()[0], "torch", torch.__version__, "cuda", torch.version.cuda, torch.cuda.get_device_name(0))'; date -u; } \
  | tee "$OUT/gpu-machine.txt"
timeout 300 python3 -m pytest -q -p no:cacheprovider tests/test_gpu.py 2>&1 | tee "$OUT/gpu-tests.txt"
if [ "${SKIP_GPU_BENCH:-0}" != 1 ]; then
  timeout 200 python3 bench/gpu.py > "$OUT/gpu-bench.json" 2> "$OUT/gpu-bench.err"
fi
tail -c 2000 "$OUT/gpu-bench.json"
