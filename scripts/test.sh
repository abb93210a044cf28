#!/usr/bin/env bash
# The test suites, each with its own time budget (pytest-timeout per test, `timeout` per suite),
# then one closing line with the totals.
EXTRAS=test,examples,docs,triton,nnunet,export source "$(dirname "$0")/_venv.sh"
export HYPOTHESIS_PROFILE="${HYPOTHESIS_PROFILE:-ci}" PYTHONHASHSEED=0
LOGS=$(mktemp -d)
run() {  # run BUDGET_SECONDS NAME CMD...
  local budget=$1 name=$2; shift 2
  echo "=== $name (budget ${budget}s) ==="
  timeout --signal=INT "$budget" "$@" 2>&1 | tee "$LOGS/$name.log"
}
# 1. library, examples and benchmark smoke tests (CPU; reference and cpu backends)
run 1200 unit "$PY" -m pytest -q -p no:cacheprovider -m "not cuda and not interpret and not nnunet" --timeout=300 tests
# 1b. the nnU-Net integration (the nnunet extra): its network, trainer and plans, and one run of nnU-Net's
#     plan-and-preprocess, train and predict commands on a small synthetic dataset, and the ONNX export of the
#     trained model checked in ONNX Runtime (about 4-5 minutes on 2 shared cores)
run 600 nnunet "$PY" -m pytest -q -p no:cacheprovider -m nnunet --timeout=400 tests/test_nnunet.py
# 2. the documentation, warnings as errors, and the doctests of its pages
run 600 docs bash scripts/docs.sh
# 3. docstring examples
run 300 doctests "$PY" -m pytest -q -p no:cacheprovider --timeout=120 --doctest-modules attention_gates
# 4. Triton kernels through the interpreter: its own process (the interpreter is fixed at first compile)
TRITON_INTERPRET=1 run 900 triton-interpreter "$PY" -m pytest -q -p no:cacheprovider -m interpret --timeout=300 tests
# totals of the pytest runs (their summary lines: "N passed, M skipped, K deselected in T s")
count() { grep -hoE "[0-9]+ $1" "$LOGS"/{unit,nnunet,doctests,triton-interpreter}.log | awk '{s += $1} END {print s + 0}'; }
echo "Total: $(count passed) passed, $(count failed) failed, $(count skipped) skipped"
