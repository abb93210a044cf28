#!/usr/bin/env bash
# The test suites, each with its own time budget (pytest-timeout per test, `timeout` per suite).
EXTRAS=test,examples,docs,triton source "$(dirname "$0")/_venv.sh"
export HYPOTHESIS_PROFILE="${HYPOTHESIS_PROFILE:-ci}" PYTHONHASHSEED=0
run() {  # run BUDGET_SECONDS NAME CMD...
  local budget=$1 name=$2; shift 2
  echo "=== $name (budget ${budget}s) ==="
  timeout --signal=INT "$budget" "$@"
}
# 1. library, examples and benchmark smoke tests (CPU, reference kernels)
run 1200 "unit tests" "$PY" -m pytest -q -m "not cuda and not interpret" --timeout=300 tests
# 2. docstring examples
run 300 "doctests" "$PY" -m pytest -q --timeout=120 --doctest-modules attention_gates
# 3. Triton kernels through the interpreter: its own process (the interpreter is fixed at first compile)
TRITON_INTERPRET=1 run 900 "triton kernels (TRITON_INTERPRET=1)" "$PY" -m pytest -q -m interpret --timeout=300 tests
# 4. the documentation, warnings as errors
if [ -f scripts/docs.sh ]; then run 600 "docs" bash scripts/docs.sh; fi
