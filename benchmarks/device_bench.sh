#!/usr/bin/env bash
# One device call for the numbers: attention, module and UNet/VAE benchmarks and the main
# job, all in one process per script on the same card. Reuses the extension built by
# device_check.sh when the machine is still warm; builds it otherwise.
# Results: $OUT/*.json and main.log. Usage: bash benchmarks/device_bench.sh
set -o pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
fi
if ! python3 -c "import deepspeed_diffusers_attn" 2>/dev/null; then
  TORCH_CUDA_ARCH_LIST=9.0a MAX_JOBS=16 FORCE_CUDA=1 python3 setup.py build_ext --inplace > /tmp/build.log 2>&1 || { tail -30 /tmp/build.log; exit 1; }
fi
B=/tmp/bench; mkdir -p $B
python3 benchmarks/bench_attention.py --out $B 2>&1 | tail -${ATTN_TAIL:-20}
python3 benchmarks/bench_module.py --out $B 2>&1 | tail -${MODULE_TAIL:-12}
timeout 300 python3 benchmarks/bench_unet.py --out $B/unet 2>&1 | tail -${UNET_TAIL:-25}
timeout 150 python3 benchmarks/profile_unet.py --config sd15 --out $B/profile 2>&1 | tail -${PROFILE_TAIL:-30}; cp $B/profile/profile_sd15.json $B/profile/profile_sd15.md "$OUT/" 2>/dev/null
timeout 200 python3 -m deepspeed_diffusers_attn --out /tmp/main_out > "$OUT/main.log" 2>&1; echo "main job rc=$?"
grep -v "it/s\]" "$OUT/main.log" | tail -6
cp $B/*.json $OUT/ 2>/dev/null; cp $B/unet/*.json "$OUT/bench_unet.json" 2>/dev/null; ls $OUT
