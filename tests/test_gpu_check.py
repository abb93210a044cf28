"""``benchmarks/gpu_check.sh`` and its stages (``benchmarks/gpu_gate.py``) without a GPU: the
dry run, the stage budget, and the level-2 gate stage's logic and output format on the CPU
(timers faked: only the bookkeeping is checked here, never a number)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from benchmarks import gpu_gate

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_check.sh"


def stage_budget() -> dict[str, int]:
    """The script's ``STAGES=(name:seconds ...)``, read from its text."""
    (line,) = [ln for ln in SCRIPT.read_text().splitlines() if ln.startswith("STAGES=(")]
    return {name: int(sec) for name, sec in re.findall(r"(\w+):(\d+)", line)}


def test_stage_timeouts_fit_a_7_minute_call():
    stages = stage_budget()
    assert sum(stages.values()) <= 420, stages
    assert list(stages)[:3] == ["env", "gate_float32", "gate_bfloat16"]  # the decisive numbers first
    assert list(stages)[-1] == "summary"


@pytest.mark.slow
def test_dry_run(tmp_path):
    """``--dry-run``: the script parses (bash -n), every stage has a command, the budget fits,
    and every stage's Python entry point parses its arguments and imports what it uses."""
    env = {"PYTHON": sys.executable, "PATH": "/usr/bin:/bin", "TMPDIR": str(tmp_path), "HOME": str(tmp_path)}
    done = subprocess.run(["bash", str(SCRIPT), "--dry-run"], capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    total = int(re.search(r"stage timeouts: (\d+)s", done.stdout).group(1))
    assert total == sum(stage_budget().values()) <= 420
    for name in stage_budget():
        assert re.search(rf"^{name}\s+\d+s\s+\S", done.stdout, flags=re.MULTILINE), name
    assert "stages parse" in done.stdout and "CUDA tests collected" in done.stdout


def test_dry_run_fails_on_a_broken_script(tmp_path):
    broken = tmp_path / "benchmarks" / "gpu_check.sh"
    broken.parent.mkdir()
    broken.write_text(SCRIPT.read_text().replace("esac", "esca", 1))
    done = subprocess.run(["bash", str(broken), "--dry-run"], capture_output=True, text=True, timeout=60)
    assert done.returncode != 0


def test_gate_stage_rows_on_the_cpu(tmp_path, monkeypatch):
    """The gate stage's rows: one per (dtype, mode, layout, context) with the three backends'
    milliseconds (``None`` where a backend did not run: triton has no CPU kernels outside the
    interpreter), written to ``auto_rows.json``, merged across dtypes, and summarised."""
    monkeypatch.setattr(gpu_gate, "DEVICE", "cpu")
    monkeypatch.setitem(gpu_gate.LEVELS, 2, ((2, 8, 8, 8, 4), (2, 16, 4, 4, 2)))
    monkeypatch.setattr(gpu_gate, "bench", lambda fn, grads=None: (fn(), 1.0)[1])
    monkeypatch.setattr(gpu_gate, "bench_graph", lambda fn: (fn(), 0.5)[1])
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: fn)  # inductor's CPU compile is slow; not what is tested
    monkeypatch.setenv("GIT_COMMIT", "abc123")
    for dtype in ("float32", "bfloat16"):
        assert gpu_gate.main(["gate", "--dtype", dtype, "--out", str(tmp_path)]) == 0
    rows = json.loads((tmp_path / "auto_rows.json").read_text())
    keys = {(r["dtype"], r["mode"], r["layout"], r["context"]) for r in rows}
    assert len(rows) == len(keys) == 16
    assert keys == {(d, m, ly, c) for d in ("float32", "bfloat16") for m in ("eval", "train")
                    for ly in ("contiguous", "channels_last") for c in ("eager", "compiled")}  # fmt: skip
    for r in rows:
        assert set(r) == {"device", "capability", "gpu", "dtype", "mode", "layout", "context", "ms", "commit", "machine", "source"}
        assert r["commit"] == "abc123" and set(r["ms"]) == {"reference", "compile", "triton"}
        assert r["ms"]["reference"] == 1.0 and r["ms"]["triton"] is None  # triton: not on the CPU here
        assert r["ms"]["compile"] == (1.0 if r["context"] == "eager" else None)
    detail = json.loads((tmp_path / "gate_float32.json").read_text())
    errors = [d for d in detail["results"] if d["backend"] == "triton"]
    assert errors and all("error" in d for d in errors)
    assert any(d.get("graph_ms") == 0.5 for d in detail["results"] if d["mode"] == "eval")
    table = "\n".join(gpu_gate.summary_lines(tmp_path))
    assert "float32" in table and "bfloat16" in table and "channels_last" in table
    # the rows go into the table "auto" follows as they are; none names a winner (triton did not run)
    from benchmarks import measured_table

    path = tmp_path / "measured.json"
    path.write_text(json.dumps({"rows": []}))
    rows, thresholds = measured_table.results_of(tmp_path / "auto_rows.json")
    assert thresholds == []  # GPU rows carry no CPU thresholds
    measured_table.add_rows(rows, path)
    assert len(json.loads(path.read_text())["rows"]) == 16 and "reference" in measured_table.show(path)


def test_stages_need_a_gpu(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")  # unavoidable: the refusal only exists without one
    assert gpu_gate.main(["env", "--out", str(tmp_path)]) == 2
    with pytest.raises(SystemExit):
        gpu_gate.main(["--out", str(tmp_path)])  # no stage
