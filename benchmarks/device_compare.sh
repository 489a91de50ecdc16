#!/usr/bin/env bash
# One device call that times a baseline tree against the working tree, in the same run on
# the same card: both extensions build in parallel, then bench_unet runs the chosen
# variants for each tree (ROUNDS times, alternating, so drift hits both). Results: $OUT/unet_<tree>.json.
# Usage (on the GPU machine, repo root; the baseline is a tree copied into an ignored folder,
# e.g. `git archive REV | tar -x -C .baseline_tree`, carried with the call):
#   BASE=.baseline_tree CONFIGS=sd15,sdxl VARIANTS=stock+graph+cl,ours+graph+cl bash benchmarks/device_compare.sh
set -o pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
BASE=${BASE:-.baseline_tree}
export PYTHONUNBUFFERED=1 TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0a} MAX_JOBS=8 FORCE_CUDA=1
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site
fi
t0=$(date +%s)
(cd "$BASE" && python3 setup.py build_ext --inplace > "$OUT/build_base.log" 2>&1) & base_pid=$!
python3 setup.py build_ext --inplace > "$OUT/build_work.log" 2>&1 || { tail -30 "$OUT/build_work.log"; exit 1; }
wait $base_pid || { tail -30 "$OUT/build_base.log"; exit 1; }
echo "builds: $(( $(date +%s) - t0 )) s"
for round in $(seq 1 ${ROUNDS:-1}); do
  for tree in "$BASE" .; do
    name=$([ "$tree" = . ] && echo work || echo base)
    (cd "$tree" && PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} timeout ${BENCH_TIMEOUT:-200} python3 benchmarks/bench_unet.py \
        --configs "${CONFIGS:-sd15,sdxl}" --variants "${VARIANTS:-stock+graph+cl,ours+graph+cl}" \
        --iters "${ITERS:-20}" --out "/tmp/bench_${name}_$round" > "$OUT/unet_${name}_$round.log" 2>&1)
    echo "== $name (round $round), rc=$?"; grep -E "ms|VAE|error" "$OUT/unet_${name}_$round.log" | grep -v "^\s*$" | tail -${TAIL:-14}
    cp /tmp/bench_${name}_$round/results.json "$OUT/unet_${name}_$round.json" 2>/dev/null
  done
done
