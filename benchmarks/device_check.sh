#!/usr/bin/env bash
# One device call: build the extension and the C harnesses, run them, the sanitizers and
# the test suite. Logs go to $OUT (6 files). Usage (on the GPU machine, repo root):
#   bash benchmarks/device_check.sh [extra pytest args]
# Env: SANITIZE=0 skips compute-sanitizer; MAIN=1 also runs the main job; PYTEST_TIMEOUT (s).
set -o pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/build.log"
export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0a}" MAX_JOBS=16 FORCE_CUDA=1
t0=$(date +%s)
python3 setup.py build_ext --inplace >> "$OUT/build.log" 2>&1 || { tail -40 "$OUT/build.log"; exit 1; }
echo "extension build: $(( $(date +%s) - t0 )) s"
CU=/usr/local/cuda
NV="nvcc -std=c++17 -O2 -lineinfo -I csrc/include -gencode=arch=compute_90a,code=sm_90a"
CPU_SRC="csrc/cpu/check.c csrc/cpu/status.c"
$NV csrc/tests/attention_harness.cu csrc/cuda/attention_fwd*.cu csrc/cpu/attention_fwd.c $CPU_SRC -o /tmp/attn_harness 2>&1 | tail -5
$NV -I $CU/include csrc/tests/linear_harness.cu csrc/cuda/linear.cu csrc/cpu/linear.c $CPU_SRC -L $CU/lib64 -lcublasLt -o /tmp/lin_harness 2>&1 | tail -5
$NV csrc/tests/wgmma_probe.cu -o /tmp/wgmma_probe 2>&1 | tail -5
H="$OUT/harness.log"
echo "== wgmma probe"; /tmp/wgmma_probe | tail -3
echo "== attention harness"; /tmp/attn_harness --big > "$H" 2>&1; echo "rc=$?"; grep -v "^ok " "$H" | tail -14
echo "== attention harness, every eligible case on the sm_90a kernel (DDA_SM90=force)"
DDA_SM90=force /tmp/attn_harness --big >> "$H" 2>&1; echo "rc=$?"; tail -1 "$H"
echo "== linear harness"; /tmp/lin_harness >> "$H" 2>&1; echo "rc=$?"; tail -3 "$H"
if [ "${SANITIZE:-1}" = 1 ]; then
  S="$OUT/sanitizer.log"; : > "$S"
  for tool in memcheck racecheck; do
    for sm90 in auto force; do
      echo "== compute-sanitizer $tool (attention harness, small odd sizes, DDA_SM90=$sm90)" | tee -a "$S"
      DDA_SM90=$sm90 timeout ${SAN_TIMEOUT:-240} compute-sanitizer --tool $tool --error-exitcode 9 /tmp/attn_harness >> "$S" 2>&1; echo "rc=$?" | tee -a "$S"; tail -2 "$S"
    done
  done
  echo "== compute-sanitizer memcheck (linear harness)" | tee -a "$S"
  timeout ${SAN_TIMEOUT:-120} compute-sanitizer --tool memcheck --error-exitcode 9 /tmp/lin_harness --no-bench >> "$S" 2>&1; echo "rc=$?" | tee -a "$S"; tail -2 "$S"
fi
echo "== pytest"
timeout ${PYTEST_TIMEOUT:-300} python3 -m pytest -q -rs -p no:cacheprovider "$@" ${TESTS:-tests} > "$OUT/pytest.log" 2>&1
echo "pytest rc=$?"; grep -E "passed|failed|FAILED|Error|error" "$OUT/pytest.log" | tail -25
if [ "${MAIN:-0}" = 1 ]; then
  echo "== main job"; timeout 300 python3 -m deepspeed_diffusers_attn --out /tmp/main_out > "$OUT/main.log" 2>&1; echo "rc=$?"
  grep -v "it/s\]" "$OUT/main.log" | tail -8
fi
