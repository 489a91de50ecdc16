#!/usr/bin/env bash
# One device call: build the extension and the C harnesses, run them, the sanitizers and
# the test suite. Logs go to $OUT (6 files). Usage (on the GPU machine, repo root):
#   bash benchmarks/device_check.sh [extra pytest args]
# Env: SANITIZE=0 skips compute-sanitizer, SANITIZE=only runs only the harnesses and the
# sanitizers; MAIN=1 also runs the main job; PYTEST_TIMEOUT, SAN_TIMEOUT (s).
set -o pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/build.log"
export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0a}" MAX_JOBS=16 FORCE_CUDA=1
CU=/usr/local/cuda
NV="nvcc -std=c++17 -O2 -lineinfo -I csrc/include -gencode=arch=compute_90a,code=sm_90a"
CPU_SRC="csrc/cpu/check.c csrc/cpu/status.c"
t0=$(date +%s)
# the C harnesses build in the background, beside the extension
( mkdir -p /tmp/ho && for f in csrc/cuda/attention_dispatch.cu csrc/cuda/attention_fwd*.cu csrc/tests/attention_harness.cu; do
    $NV -c $f -o /tmp/ho/$(basename $f).o > /tmp/ho/$(basename $f).log 2>&1 & done; wait
  $NV /tmp/ho/*.o csrc/cpu/attention_fwd.c $CPU_SRC -o /tmp/attn_harness; cat /tmp/ho/*.log ) > "$OUT/harness_build.log" 2>&1 &
$NV -I $CU/include csrc/tests/linear_harness.cu csrc/cuda/linear.cu csrc/cpu/linear.c $CPU_SRC -L $CU/lib64 -lcublasLt -o /tmp/lin_harness >> "$OUT/harness_build.log" 2>&1 &
$NV csrc/tests/wgmma_probe.cu -o /tmp/wgmma_probe >> "$OUT/harness_build.log" 2>&1 &
$NV -I $CU/include csrc/tests/low_rank_harness.cu csrc/cuda/low_rank.cu csrc/cuda/linear.cu csrc/cpu/low_rank.c \
    csrc/cpu/linear.c $CPU_SRC -L $CU/lib64 -lcublasLt -o /tmp/low_rank_harness >> "$OUT/harness_build.log" 2>&1 &
if [ "${SANITIZE:-1}" != only ]; then
  python3 setup.py build_ext --inplace >> "$OUT/build.log" 2>&1 || { tail -40 "$OUT/build.log"; exit 1; }
  echo "extension build: $(( $(date +%s) - t0 )) s"
fi
wait
echo "harnesses built: $(( $(date +%s) - t0 )) s"; grep -iE "warning|error" "$OUT/harness_build.log" | head -5
H="$OUT/harness.log"
echo "== wgmma probe"; /tmp/wgmma_probe | tail -3
echo "== attention harness"; /tmp/attn_harness --big > "$H" 2>&1; echo "rc=$?"; grep -v "^ok " "$H" | tail -14
for b in generic mma short d512 sm90 sm90_tma; do
  echo "== attention harness, every case the $b family takes (--backend $b)"
  /tmp/attn_harness --big --backend $b >> "$H" 2>&1; echo "rc=$?"; tail -1 "$H"
done
echo "== linear harness"; /tmp/lin_harness >> "$H" 2>&1; echo "rc=$?"; tail -3 "$H"
echo "== low-rank harness (LoRA B kernels)"; /tmp/low_rank_harness >> "$H" 2>&1; echo "rc=$?"; tail -3 "$H"
if [ "${SANITIZE:-1}" != 0 ]; then
  S="$OUT/sanitizer.log"; : > "$S"
  # backends: automatic dispatch (TMA kernel for the unmasked cases), the cp.async sm_90a kernel
  # forced (SAN_MODES="" skips these); then the TMA kernel on its own cases
  for tool in memcheck racecheck; do
    for mode in ${SAN_MODES-auto sm90}; do
      echo "== compute-sanitizer $tool (attention harness, small odd sizes, --backend $mode)" | tee -a "$S"
      timeout ${SAN_TIMEOUT:-240} compute-sanitizer --tool $tool --error-exitcode 9 /tmp/attn_harness --backend $mode >> "$S" 2>&1; echo "rc=$?" | tee -a "$S"; tail -2 "$S"
    done
  done
  for tool in memcheck racecheck synccheck; do
    echo "== compute-sanitizer $tool (attention harness --unmasked: every case on the TMA kernel)" | tee -a "$S"
    timeout ${SAN_TIMEOUT:-240} compute-sanitizer --tool $tool --error-exitcode 9 /tmp/attn_harness --unmasked --backend sm90_tma >> "$S" 2>&1; echo "rc=$?" | tee -a "$S"; tail -2 "$S"
  done
  for tool in memcheck racecheck; do
    echo "== compute-sanitizer $tool (GEGLU / GroupNorm CUDA tests)" | tee -a "$S"
    timeout ${SAN_TIMEOUT:-240} compute-sanitizer --tool $tool --error-exitcode 9 python3 -m pytest -q -x -p no:cacheprovider \
      tests/test_blocks.py -k "cuda and not unet" >> "$S" 2>&1; echo "rc=$?" | tee -a "$S"; tail -2 "$S"
  done
  for h in lin_harness low_rank_harness; do
    echo "== compute-sanitizer memcheck ($h)" | tee -a "$S"
    timeout ${SAN_TIMEOUT:-120} compute-sanitizer --tool memcheck --error-exitcode 9 /tmp/$h --no-bench >> "$S" 2>&1; echo "rc=$?" | tee -a "$S"; tail -2 "$S"
  done
fi
[ "${SANITIZE:-1}" = only ] && exit 0
echo "== pytest"
timeout ${PYTEST_TIMEOUT:-300} python3 -m pytest -q -rs -p no:cacheprovider "$@" ${TESTS:-tests} > "$OUT/pytest.log" 2>&1
echo "pytest rc=$?"; grep -E "passed|failed|FAILED|Error|error" "$OUT/pytest.log" | tail -25
if [ "${MAIN:-0}" = 1 ]; then
  echo "== main job"; timeout 300 python3 -m deepspeed_diffusers_attn --out /tmp/main_out > "$OUT/main.log" 2>&1; echo "rc=$?"
  grep -v "it/s\]" "$OUT/main.log" | tail -8
fi
