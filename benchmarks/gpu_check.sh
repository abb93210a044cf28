#!/usr/bin/env bash
# GPU check: one call on the lent GPU machine, with its own Python (3.12, torch 2.11, Triton 3.6;
# no network: MONAI, nibabel and pydicom travel as pure-Python wheels in .whl/). Stages in
# priority order, each with its own timeout (T_<STAGE> seconds); every stage writes its log (and
# JSON where it has one) to $OUT as it goes; a short table is printed last.
#   run:  OUT=$OUT bash benchmarks/gpu_check.sh         (device tool: carry .whl)
set -u
cd "$(dirname "$0")/.."
OUT="${OUT:-benchmarks/results/gpu}"
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH="$PYTHONPATH:/tmp/site"
fi
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$OUT/gpu.txt"
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a "$OUT/gpu.txt"
stage() {  # stage SECONDS NAME CMD...
  local t=$1 name=$2; shift 2
  echo "=== $name (timeout ${t}s) ==="
  timeout "$t" "$@" > "$OUT/$name.log" 2>&1
  echo "rc=$?" >> "$OUT/$name.log"
  tail -n 8 "$OUT/$name.log"
}
# 1. correctness: fused vs reference on CUDA (all dtypes, the paper's gate shapes), then memcheck
stage "${T_TESTS:-200}" cuda_tests python3 -m pytest -v -rfE --tb=short -m cuda -p no:cacheprovider --timeout=120 tests/test_triton.py
if command -v compute-sanitizer >/dev/null; then
  stage "${T_SANITIZE:-90}" sanitizer compute-sanitizer --tool memcheck --error-exitcode 3 python3 benchmarks/gpu_sanitize.py
fi
# 2. the gate at the paper model's shapes: eval and train, GB/s against the floor and a copy
stage "${T_GATES:-120}" gate_quick python3 benchmarks/gpu_quick.py "$OUT/gate_quick.json"
stage "${T_GATES2:-120}" gates python3 -m benchmarks.gates --out "$OUT"
# 3. the models: training step time and max_memory_allocated, fp32 and bf16 autocast
stage "${T_MODELS:-150}" models python3 benchmarks/gpu_models.py "$OUT/models_quick.json"
# 4. the pancreas example at the paper's patch size on the phantom: steps per second, peak memory
stage "${T_PANCREAS:-120}" pancreas python3 -m examples.pancreas train --preset demo --spacing 2 2 2 \
  --patch-size 160 160 96 --filters 16 32 64 128 256 --steps 30 --amp --device cuda --no-progress \
  --out /tmp/pancreas_gpu
cp /tmp/pancreas_gpu/results.json "$OUT/pancreas_results.json" 2>/dev/null
echo "=== summary ($(head -n 1 "$OUT/gpu.txt")) ==="
grep -E "passed|failed" "$OUT/cuda_tests.log" | tail -n 1
[ -f "$OUT/sanitizer.log" ] && grep -E "ERROR SUMMARY|rc=" "$OUT/sanitizer.log" | tail -n 2
grep -A 20 "^level" "$OUT/gate_quick.log" | head -n 20
grep -A 12 "^model" "$OUT/models.log" | head -n 12
grep -iE "steps? per second|s/step|seconds_per_step|peak" "$OUT/pancreas.log" | tail -n 3
