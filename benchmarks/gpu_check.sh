#!/usr/bin/env bash
# GPU check: runs on the lent GPU machine with its own Python (no network, nothing installed
# there except pure-Python wheels carried in .whl/). Stages in priority order, each with its own
# timeout; results are written to $OUT as they come; a short table is printed last.
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
  timeout "$t" "$@" 2>&1 | tee "$OUT/$name.log" | tail -n 25
}
stage "${T_TESTS:-240}" cuda_tests python3 -m pytest -v -rfE --tb=short -m cuda -p no:cacheprovider --timeout=120 tests/test_triton.py
stage "${T_GATES:-180}" gate_bench python3 benchmarks/gpu_quick.py "$OUT/gate_quick.json"
stage "${T_MODELS:-150}" model_bench python3 benchmarks/gpu_models.py "$OUT/models_quick.json"
echo "=== summary ==="
tail -n 20 "$OUT/gate_bench.log" 2>/dev/null | grep -E "^(level|l[234]) " || true
tail -n 12 "$OUT/model_bench.log" 2>/dev/null | grep -E "^(model|UNet3D|Attention|MONAI)" || true
grep -E "passed|failed" "$OUT/cuda_tests.log" | tail -n 1 || true
