#!/usr/bin/env bash
# Rerun every CPU benchmark: each writes its one current result for this machine,
# benchmarks/results/<machine tag>/<script>.json (the commit measured inside), replacing the last.
#   bash benchmarks/run_all.sh            # about 50 minutes on 2 idle cores
# cpu_backends also writes its gate rows and its measured crossovers (the CPU paths' thresholds) into
# attention_gates/ops/measured.json (the table "auto" follows); commit that with the results. On a
# GPU use benchmarks/gpu_check.sh instead.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PY:-.venv/bin/python}"
"$PY" -m benchmarks.cpu_backends --write-table
"$PY" -m benchmarks.gates --device cpu
"$PY" -m benchmarks.overhead --device cpu
"$PY" -m benchmarks.gate_memory
if "$PY" -c "import onnxruntime, onnxscript" 2>/dev/null; then
  "$PY" -m benchmarks.onnx_cpu  # set OMP_WAIT_POLICY=PASSIVE for the whole script on a shared machine
else
  echo "onnx_cpu: skipped (ONNX Runtime is not installed: pip install 'attention-gates[export]')"
fi
if "$PY" -c "import nnunetv2" 2>/dev/null; then
  "$PY" -m benchmarks.nnunet_cost --device cpu
else
  echo "nnunet_cost: skipped (nnunetv2 is not installed: pip install 'attention-gates[nnunet]')"
fi
"$PY" -m benchmarks.measured_table --show
