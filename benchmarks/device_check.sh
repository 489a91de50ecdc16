#!/usr/bin/env bash
# One device call: build the extension and the C harnesses, run them, the sanitizers and
# the test suite. Logs go to $OUT. Usage (on the GPU machine, repo root): bash benchmarks/device_check.sh [pytest args]
set -o pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/card.txt"
export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0a}" MAX_JOBS=16 FORCE_CUDA=1
t0=$(date +%s)
python3 setup.py build_ext --inplace > "$OUT/build.log" 2>&1 || { tail -40 "$OUT/build.log"; exit 1; }
echo "extension build: $(( $(date +%s) - t0 )) s"
CU=/usr/local/cuda
NV="nvcc -std=c++17 -O2 -lineinfo -I csrc/include -gencode=arch=compute_90a,code=sm_90a"
$NV csrc/tests/attention_harness.cu csrc/cuda/attention_fwd.cu csrc/cpu/attention_fwd.c csrc/cpu/check.c csrc/cpu/status.c -o /tmp/attn_harness 2>&1 | tail -5
$NV -I $CU/include csrc/tests/linear_harness.cu csrc/cuda/linear.cu csrc/cpu/linear.c csrc/cpu/check.c csrc/cpu/status.c -L $CU/lib64 -lcublasLt -o /tmp/lin_harness 2>&1 | tail -5
echo "== attention harness"; /tmp/attn_harness --big > "$OUT/attn_harness.log" 2>&1; echo "rc=$?"; tail -15 "$OUT/attn_harness.log"
echo "== linear harness"; /tmp/lin_harness > "$OUT/lin_harness.log" 2>&1; echo "rc=$?"; tail -8 "$OUT/lin_harness.log"
if [ "${SANITIZE:-1}" = 1 ]; then
  for tool in memcheck racecheck; do
    echo "== compute-sanitizer $tool (attention, small odd sizes)"
    timeout 240 compute-sanitizer --tool $tool --error-exitcode 9 /tmp/attn_harness > "$OUT/san_attn_$tool.log" 2>&1; echo "rc=$?"; tail -3 "$OUT/san_attn_$tool.log"
  done
  echo "== compute-sanitizer memcheck (linear)"
  timeout 120 compute-sanitizer --tool memcheck --error-exitcode 9 /tmp/lin_harness --no-bench > "$OUT/san_lin.log" 2>&1; echo "rc=$?"; tail -3 "$OUT/san_lin.log"
fi
echo "== pytest"
timeout ${PYTEST_TIMEOUT:-300} python3 -m pytest -q -rs "$@" tests > "$OUT/pytest.log" 2>&1 || true
tail -25 "$OUT/pytest.log"
