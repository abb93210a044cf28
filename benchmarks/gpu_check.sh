#!/usr/bin/env bash
# The fused gate's GPU check in one call (a fresh H100: its own python3 with torch and Triton,
# no network; nothing is installed). Run from anywhere:
#   OUT=/some/dir GIT_COMMIT=<sha> bash benchmarks/gpu_check.sh        (OUT defaults to benchmarks/results/gpu)
#   bash benchmarks/gpu_check.sh --dry-run                             (no GPU: syntax, stage budget, imports)
# Stages, decisive numbers first, each a process under its own timeout (their sum stays under
# 420 s so that every stage's output survives a 7-minute call): the machine and copy bandwidth;
# the paper model's level-2 gate in float32, then bfloat16 (reference, compile, triton; eager,
# CUDA-graph and compiled contexts; contiguous and channels-last: benchmarks/gpu_gate.py); the
# CUDA tests in parallel processes; levels 3-4; a memcheck. Every stage writes its log and JSON
# into $OUT as it goes ($OUT/auto_rows.json: the rows for the dispatch table), the shell adds
# $OUT/stages.json after each stage, and a short table is printed last.
set -u
cd "$(dirname "$0")/.."
OUT="${OUT:-benchmarks/results/gpu}"
PY="${PYTHON:-python3}"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 OUT
# name:seconds (summary last); the dry run and tests/test_gpu_check.py check that they add up to <= 420
STAGES=(env:15 gate_float32:150 gate_bfloat16:115 tests:60 levels:25 memcheck:25 summary:10)
LIMIT=420

total=0
for s in "${STAGES[@]}"; do total=$((total + ${s#*:})); done

stage_cmd() {  # the command of a stage
  case "$1" in
    env) echo "$PY -m benchmarks.gpu_gate env --out $OUT" ;;
    gate_float32) echo "$PY -m benchmarks.gpu_gate gate --dtype float32 --out $OUT" ;;
    gate_bfloat16) echo "$PY -m benchmarks.gpu_gate gate --dtype bfloat16 --out $OUT" ;;
    tests) echo "$PY -m benchmarks.gpu_gate tests --budget $2 --out $OUT" ;;
    levels) echo "$PY -m benchmarks.gpu_gate levels --levels 3 4 --out $OUT" ;;
    memcheck)
      if command -v compute-sanitizer >/dev/null 2>&1; then
        echo "compute-sanitizer --tool memcheck --error-exitcode 3 $PY -m benchmarks.gpu_gate sanitize --out $OUT"
      else
        echo "echo compute-sanitizer: not found"
      fi ;;
    summary) echo "$PY -m benchmarks.gpu_gate summary --out $OUT" ;;
    *) echo "unknown stage $1" >&2; return 1 ;;
  esac
}

if [ "${1:-}" = "--dry-run" ]; then
  bash -n "$0" || exit 1
  for s in "${STAGES[@]}"; do
    cmd=$(stage_cmd "${s%%:*}" "${s#*:}") || exit 1  # an unknown stage fails the dry run
    printf '%-14s %4ss  %s\n' "${s%%:*}" "${s#*:}" "$cmd"
  done
  echo "stage timeouts: ${total}s (limit ${LIMIT}s)"
  [ "$total" -le "$LIMIT" ] || { echo "stage timeouts exceed ${LIMIT}s" >&2; exit 1; }
  "$PY" -m benchmarks.gpu_gate --check || exit 1
  "$PY" -m benchmarks.gpu_gate tests --collect-only --out "${TMPDIR:-/tmp}" || exit 1
  exit 0
fi

mkdir -p "$OUT"
records=""
for s in "${STAGES[@]}"; do
  name=${s%%:*} seconds=${s#*:}
  echo "=== $name (timeout ${seconds}s) ==="
  start=$(date +%s)
  timeout -k 5 "$seconds" bash -c "$(stage_cmd "$name" "$seconds")" > "$OUT/$name.log" 2>&1
  rc=$?
  elapsed=$(( $(date +%s) - start ))
  echo "rc=$rc (${elapsed}s)" >> "$OUT/$name.log"
  [ "$name" = summary ] || tail -n 4 "$OUT/$name.log"
  records="${records:+$records,}{\"stage\": \"$name\", \"timeout_s\": $seconds, \"rc\": $rc, \"seconds\": $elapsed}"
  printf '[%s]\n' "$records" > "$OUT/stages.json.tmp" && mv "$OUT/stages.json.tmp" "$OUT/stages.json"
done
echo "=== summary ==="
cat "$OUT/summary.log"
