#!/usr/bin/env bash
# The test suites, each with its own time budget (pytest-timeout per test, `timeout` per suite), in
# two lanes side by side: each suite is mostly one busy thread, so two lanes keep two cores busy.
# Then every suite's output in order, a line per suite, and one closing line with the totals; the
# exit status is 1 if any suite failed or ran out of its budget.
EXTRAS=test,examples,docs,triton,nnunet,export source "$(dirname "$0")/_venv.sh"
export HYPOTHESIS_PROFILE="${HYPOTHESIS_PROFILE:-ci}" PYTHONHASHSEED=0
# one compute thread per process (tests that measure threads set their own): two lanes on two cores,
# and no thread pool spinning on a core the other lane needs
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
LOGS=$(mktemp -d)
run() {  # run BUDGET_SECONDS NAME CMD...: output to NAME.log; exit status, seconds and budget to NAME.rc
  local budget=$1 name=$2 start=$SECONDS status=0; shift 2
  timeout --signal=INT "$budget" "$@" > "$LOGS/$name.log" 2>&1 || status=$?
  echo "$status $((SECONDS - start)) $budget" > "$LOGS/$name.rc"
  echo "... $name done: exit $status after $((SECONDS - start)) s"
}
lane1() {
  # 1. library, examples and benchmark smoke tests (CPU; reference and cpu backends)
  run 1200 unit "$PY" -m pytest -q -p no:cacheprovider -m "not cuda and not interpret and not nnunet and not export" --timeout=300 tests
  # 2. the nnU-Net integration (the nnunet extra): its network, trainer and plans, one run of nnU-Net's
  #    plan-and-preprocess, train and predict commands on a small synthetic dataset, and the ONNX export of the
  #    trained model checked in ONNX Runtime
  run 600 nnunet "$PY" -m pytest -q -p no:cacheprovider -m nnunet --timeout=400 tests/test_nnunet.py
  # 3. the documentation, warnings as errors, and the doctests of its pages
  run 600 docs bash scripts/docs.sh
}
lane2() {
  # 4. Triton kernels through the interpreter: its own process (the interpreter is fixed at first compile)
  TRITON_INTERPRET=1 run 900 triton-interpreter "$PY" -m pytest -q -p no:cacheprovider -m interpret --timeout=300 tests
  # 5. deployment (the export extra): every public network traced, exported with torch.export and to ONNX with
  #    dynamic sizes and run in ONNX Runtime at other sizes, one AOTInductor package, the example's export command
  run 600 export "$PY" -m pytest -q -p no:cacheprovider -m export --timeout=300 tests
  # 6. docstring examples
  run 300 doctests "$PY" -m pytest -q -p no:cacheprovider --timeout=120 --doctest-modules attention_gates
}
lane1 & lane2 & wait
SUITES=(unit nnunet docs triton-interpreter export doctests)
failed=0
for name in "${SUITES[@]}"; do
  echo "=== $name ==="
  cat "$LOGS/$name.log"
done
echo "=== suites (exit status, seconds / budget) ==="
for name in "${SUITES[@]}"; do
  read -r status seconds budget < "$LOGS/$name.rc"
  printf '%-20s exit %-3s %4s s / %s s%s\n' "$name" "$status" "$seconds" "$budget" "$([ "$status" = 124 ] && echo '  (out of budget)')"
  [ "$status" = 0 ] || failed=1
done
# totals of the pytest runs (their summary lines: "N passed, M skipped, K deselected in T s")
count() { grep -hoE "[0-9]+ $1" "$LOGS"/{unit,export,doctests,triton-interpreter,nnunet}.log | awk '{s += $1} END {print s + 0}'; }
echo "Total: $(count passed) passed, $(count failed) failed, $(count skipped) skipped in $SECONDS s"
exit "$failed"
