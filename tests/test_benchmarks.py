"""The benchmark scripts run (``--quick``), write well-formed JSON and plots, and compute what they claim.

No test asserts a timing: timings only have to be positive and the derived numbers (ratios,
GB/s) have to follow from the per-model numbers in the same file.
"""

from __future__ import annotations

import importlib.util
import json
import math

import pytest
import torch

from benchmarks import common, gates, overhead

HAS_MONAI = importlib.util.find_spec("monai") is not None


def _positive_stats(stats: dict) -> None:
    assert 0 < stats["q1"] <= stats["median"] <= stats["q3"]
    assert stats["iqr"] == pytest.approx(stats["q3"] - stats["q1"])


@pytest.fixture(scope="module", autouse=True)
def restore_threads():
    """The scripts run on 1 thread here (``--threads 1``: quick and steady on a busy 2-core runner)."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def overhead_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("overhead")
    result = overhead.main(["--quick", "--device", "cpu", "--rss", "none", "--threads", "1", "--out", str(out)])
    return out, result


def test_overhead_quick_writes_well_formed_results(overhead_run):
    out, returned = overhead_run
    data = json.loads((out / "overhead.json").read_text())
    assert data["benchmark"] == "overhead"
    for key in ("machine", "load_average", "settings", "monai", "backends", "models", "notes", "results", "ratios", "targets"):
        assert key in data, key
    machine = data["machine"]
    assert machine["device"] == "cpu" and machine["torch"] == torch.__version__
    assert machine["torch_threads"] >= 1 and isinstance(machine["malloc_env"], dict)
    assert len(data["load_average"]["start"]) == 3 and len(data["load_average"]["end"]) == 3
    assert "reference" in data["backends"]["used"]
    assert data["monai"]["available"] is HAS_MONAI

    expected_models = {"unet", *(f"attention_unet[{b}]" for b in data["backends"]["used"])}
    if HAS_MONAI:
        expected_models |= {"monai_unet", "monai_attention_unet"}
    assert set(data["models"]) == expected_models
    assert {(r["dims"], r["model"]) for r in data["results"]} == {(d, m) for d in (2, 3) for m in expected_models}
    for r in data["results"]:
        assert r["params"] > 0 and r["forward_flops"] > 0
        assert r["saved_bytes"] > 0 and r["output_bytes"] == 4 * r["batch"] * 2 * math.prod(r["size"])
        assert r["saved_plus_output_bytes"] == r["saved_bytes"] + r["output_bytes"]
        _positive_stats(r["inference_s"])
        _positive_stats(r["train_step_s"])
        assert len(r["train_step_s"]["samples"]) == data["settings"]["repeats"]
    by = {(r["dims"], r["model"]): r for r in data["results"]}
    assert by[(3, "unet")]["params"] == 5887466
    assert by[(3, "attention_unet[reference]")]["params"] == 6472784
    assert data == json.loads(json.dumps(returned))  # the JSON is what main returned


def test_overhead_ratios_follow_from_the_rows(overhead_run):
    out, _ = overhead_run
    data = json.loads((out / "overhead.json").read_text())
    by = {(r["dims"], r["model"]): r for r in data["results"]}
    pairs = {(r["dims"], r["numerator"], r["denominator"]) for r in data["ratios"]}
    for dims in (2, 3):
        assert (dims, "attention_unet[reference]", "unet") in pairs
        if HAS_MONAI:
            assert (dims, "attention_unet[reference]", "monai_attention_unet") in pairs
            assert (dims, "unet", "monai_unet") in pairs
    for r in data["ratios"]:
        num, den = by[(r["dims"], r["numerator"])], by[(r["dims"], r["denominator"])]
        assert r["inference"] == pytest.approx(num["inference_s"]["median"] / den["inference_s"]["median"])
        assert r["train_step"] == pytest.approx(num["train_step_s"]["median"] / den["train_step_s"]["median"])
        per_round = sorted(a / b for a, b in zip(num["train_step_s"]["samples"], den["train_step_s"]["samples"]))
        assert r["train_step_paired"] == pytest.approx(sum(per_round) / 2)  # the median of the 2 quick rounds
        assert r["forward_flops"] == pytest.approx(num["forward_flops"] / den["forward_flops"])
        assert r["saved_plus_output_bytes"] == pytest.approx(num["saved_plus_output_bytes"] / den["saved_plus_output_bytes"])
        assert "peak_rss" not in r and "cuda_step_bytes" not in r  # not measured: --rss none, CPU
    names = [t["name"] for t in data["targets"]]
    assert any("inference time" in n for n in names) and any("train_step time" in n for n in names)
    for t in data["targets"]:
        if t["measured"] is not None and t["target"] is not None:
            assert t["met"] is (t["measured"] <= t["target"])
    triton = next(t for t in data["targets"] if "(triton)" in t["name"])
    assert triton["measured"] is None and "CUDA" in triton["note"]


def test_overhead_plots_exist(overhead_run):
    out, _ = overhead_run
    data = json.loads((out / "overhead.json").read_text())
    assert sorted(data["plots"]) == ["overhead_memory_cpu.png", "overhead_time_cpu.png"]
    for name in data["plots"]:
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_overhead_without_monai_notes_the_skip(tmp_path, monkeypatch):
    monkeypatch.setattr(common, "monai_nets", lambda: None)
    data = overhead.main(["--quick", "--device", "cpu", "--rss", "none", "--threads", "1", "--dims", "2", "--out", str(tmp_path)])
    assert data["monai"] == {"available": False, "note": "skipped: monai not installed"}
    assert "MONAI: skipped: monai not installed" in data["notes"]
    assert not any(r["family"] == "monai" for r in data["results"])


def test_peak_rss_of_a_fresh_process():
    rss = overhead.measure_rss(overhead.Model("unet", "ours", "unet"), 2, (32, 16), 1)
    assert 0 < rss["step_rss_bytes"] < rss["peak_rss_bytes"]


def test_model_descriptions_and_bad_sizes():
    assert overhead.parse_size("160x160x96", 3) == (160, 160, 96)
    assert overhead.parse_size("48", 2) == (48, 48)
    with pytest.raises(ValueError, match="multiple of 16"):
        overhead.parse_size("40", 3)
    with pytest.raises(ValueError, match="3 ints"):
        overhead.parse_size("64x64", 3)
    with pytest.raises(SystemExit):
        overhead.parse_args(["--repeats", "0"])


def test_gate_shapes_are_the_paper_models():
    shapes = {lv: gates.level_shapes((160, 160, 96), 2, lv) for lv in gates.LEVELS}
    assert shapes[2] == ((2, 32, 80, 80, 48), (2, 64, 40, 40, 24))
    assert shapes[3] == ((2, 64, 40, 40, 24), (2, 128, 20, 20, 12))
    assert shapes[4] == ((2, 128, 20, 20, 12), (2, 256, 10, 10, 6))


def test_gate_byte_floor_counts_each_tensor_once():
    case = gates.GateCase("reference", 2, (2, 4, 8, 8, 8), (2, 6, 4, 4, 4), torch.device("cpu"))
    x_bytes, g_bytes, alpha_bytes = 2 * 4 * 512 * 4, 2 * 6 * 64 * 4, 2 * 512 * 4
    # theta 4*4*8 (no bias), phi 4*6 + 4, psi 4 + 1, W 4*4 + 4, BN weight + bias 4 + 4
    params = 4 * (128 + 28 + 5 + 20 + 8)
    buffers = 4 * (4 + 4)  # running mean and var
    ev = gates.byte_floor(case.gate, case.x, case.g, "eval")
    assert ev["total"] == x_bytes + g_bytes + x_bytes + alpha_bytes + params + buffers
    tr = gates.byte_floor(case.gate, case.x, case.g, "train")
    assert tr["total"] == ev["total"] + 2 * x_bytes + g_bytes + params + buffers


def test_gates_quick_writes_well_formed_results(tmp_path):
    data = gates.main(["--quick", "--device", "cpu", "--threads", "1", "--out", str(tmp_path)])
    assert json.loads((tmp_path / "gates.json").read_text()) == json.loads(json.dumps(data))
    assert data["benchmark"] == "gates" and data["copy"]["GBps"] > 0
    used = data["backends"]["used"]
    assert "reference" in used
    assert {(r["level"], r["mode"], r["backend"]) for r in data["results"]} == {
        (lv, m, b) for lv in gates.LEVELS for m in ("eval", "train") for b in used
    }
    for r in data["results"]:
        _positive_stats(r["time_s"])
        assert r["GBps"] == pytest.approx(r["floor_bytes"]["total"] / r["time_s"]["median"] / 1e9)
        assert r["pct_of_copy"] == pytest.approx(100 * r["GBps"] / data["copy"]["GBps"])
    assert data["plots"] == ["gates_bandwidth_cpu.png"]
    assert (tmp_path / "gates_bandwidth_cpu.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_summarize_and_interleaving():
    s = common.summarize([4.0, 1.0, 3.0, 2.0, 5.0])
    assert (s["median"], s["q1"], s["q3"], s["iqr"], s["min"], s["n"]) == (3.0, 2.0, 4.0, 2.0, 1.0, 5)
    calls = []
    times = common.time_interleaved(
        {"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}, warmup=1, repeats=2, device=torch.device("cpu")
    )
    assert calls == ["a", "b", "a", "b", "b", "a"]  # warm-up, then round-robin, alternating order
    assert [len(v) for v in times.values()] == [2, 2] and all(t >= 0 for v in times.values() for t in v)


def test_cpu_backends_quick_writes_every_section(tmp_path):
    from attention_gates.ops import measured
    from benchmarks import cpu_backends

    path = tmp_path / "cpu_backends.json"
    data = cpu_backends.main(["--quick", "--threads", "1", "--out", str(path)])
    assert json.loads(path.read_text()) == json.loads(json.dumps(data))
    assert data["machine"]["commit"] == common.commit() and data["machine"]["torch_threads"] == 1
    rows = data["gate"]  # the rows of the table behind "auto": one per mode and layout, every CPU backend timed
    assert [(r["mode"], r["layout"]) for r in rows] == [(m, lay) for m in ("eval", "train") for lay in ("contiguous", "channels_last")]
    for r in rows:
        assert measured.Key(*(r[f] for f in measured.Key._fields)).device == "cpu" and r["commit"] == data["machine"]["commit"]
        assert set(r["ms"]) == set(cpu_backends.BACKENDS) and all(v > 0 for v in r["ms"].values())
    assert [(r["size"], r["mode"]) for r in data["network"]] == [(24, "eval"), (24, "train")]
    assert all(set(r["ms"]) == {*cpu_backends.BACKENDS, "UNet3D"} for r in data["network"])
    (transform,) = data["transform"]
    assert set(transform["ms"]) == {f"{a}|{t}" for a in ("AttentionUNet3D", "UNet3D") for t in cpu_backends.TRANSFORMS}
    (alloc,) = data["allocator"]
    assert set(alloc["ms"]) == {"default", "MALLOC_MMAP_MAX_=0"} and all(v > 0 for v in alloc["ms"].values())
    thresholds = data["thresholds"]  # where the CPU paths cross over, measured in the same run
    assert thresholds["capability"] == measured.host_capability() == rows[0]["capability"]
    assert set(data["crossovers"]) == set(measured.CpuThresholds._fields)
    for name, sweep in data["crossovers"].items():
        sizes = cpu_backends.SWEEPS[name][1][:2]
        assert sweep["sizes"] == sizes and len(sweep["above_over_below"]) == 2 and all(v > 0 for v in sweep["ms"].values())
        assert thresholds[name] == sweep["threshold"] == cpu_backends.crossing(sizes, sweep["above_over_below"], maximum=name == "patch_max_rows")
    assert data["gate_thresholds"] == measured.cpu_thresholds()._asdict()
    table = cpu_backends.tables(data)
    assert "auto takes" in table and "MALLOC_MMAP_MAX_=0" in table and "onednn_min_rows = " in table


def test_cpu_backends_measures_only_the_sections_asked_for(tmp_path):
    from benchmarks import cpu_backends

    data = cpu_backends.main(["--quick", "--threads", "1", "--sections", "crossovers", "--out", str(tmp_path / "c.json")])
    assert set(cpu_backends.SECTIONS) & set(data) == {"crossovers"} and "thresholds" in data
    assert "onednn_min_rows = " in cpu_backends.tables(data) and "level-2 gate" not in cpu_backends.tables(data)


@pytest.mark.parametrize(
    "ratios, minimum, maximum",
    [
        ([2.0, 1.5, 0.9, 0.5], 4, 2),  # the path above wins from the third size on
        ([0.95, 1.2, 0.8, 0.7], 4, 2),  # a small win below a larger loss: switching after the loss gains more
        ([0.5, 0.6, 0.7, 0.8], 1, 0),  # the path above everywhere
        ([1.2, 1.1, 1.02, 1.08], None, None),  # no switch gains: never
        ([2.0, 0.8, 0.8, 1.2], 2, 1),  # one slow size at the end does not undo two wins before it
        ([2.0, 0.9, 1.0, 1.5], None, None),  # a loss larger than the wins before it does
    ],
)
def test_crossing_is_the_switch_that_makes_the_sweep_fastest(ratios, minimum, maximum):
    from attention_gates.ops import measured
    from benchmarks.cpu_backends import crossing

    sizes = [1, 2, 4, 8]
    assert crossing(sizes, ratios, maximum=False) == (measured.NEVER if minimum is None else minimum)
    assert crossing(sizes, ratios, maximum=True) == (measured.NEVER if maximum is None else maximum)


def _row(**kw):
    row = dict(device="cpu", capability="x86_64", dtype="float32", mode="eval", layout="contiguous", context="eager",
               ms={"reference": 2.0, "compile": 3.0, "cpu": 1.0}, commit="abc", source="here")  # fmt: skip
    return {**row, **kw}


def test_measured_rows_are_added_and_replaced_by_key(tmp_path):
    from benchmarks import measured_table as table

    path = tmp_path / "measured.json"
    path.write_text(json.dumps({"about": "test", "rows": [_row(), _row(mode="train")]}))
    table.add_rows([_row(ms={"reference": 1.0, "compile": 1.0, "cpu": 2.0}), _row(device="cuda", capability="9.0")], path)
    rows = json.loads(path.read_text())["rows"]
    assert len(rows) == 3 and json.loads(path.read_text())["about"] == "test"
    replaced = [r for r in rows if r["device"] == "cpu" and r["mode"] == "eval"]
    assert len(replaced) == 1 and replaced[0]["ms"]["cpu"] == 2.0
    with pytest.raises(ValueError, match=r"row 0 lacks \['commit'\]"):
        table.add_rows([{k: v for k, v in _row().items() if k != "commit"}], path)
    with pytest.raises(ValueError, match=r"must time both 'reference' and 'compile'"):
        table.add_rows([_row(ms={"reference": 1.0, "cpu": 0.5})], path)
    assert "auto takes" in table.show(path)
    # CPU thresholds: written beside the rows, replaced per CPU, refused without their fields
    entry = {"capability": "V ISA 1-2 cores", "onednn_min_rows": 10, "patch_max_rows": 20, "transposed_min_numel": 30,
             "commit": "abc", "source": "here", "machine": "m"}  # fmt: skip
    table.add_rows([], path, thresholds=[entry])
    table.add_rows([], path, thresholds=[{**entry, "onednn_min_rows": 11}, {**entry, "capability": "W ISA 3-4 cores"}])
    written = json.loads(path.read_text())["cpu_thresholds"]
    assert [(t["capability"], t["onednn_min_rows"]) for t in written] == [("V ISA 1-2 cores", 11), ("W ISA 3-4 cores", 10)]
    with pytest.raises(ValueError, match=r"thresholds entry 0 lacks \['transposed_min_numel'\]"):
        table.add_rows([], path, thresholds=[{k: v for k, v in entry.items() if k != "transposed_min_numel"}])
    results = tmp_path / "cpu_backends.json"
    results.write_text(json.dumps({"gate": [_row()], "thresholds": entry}))
    assert table.results_of(results) == ([_row()], [entry])
    assert "CPU thresholds" in table.show(path) and "V ISA 1-2 cores" in table.show(path)


def test_committed_results_record_the_commit_they_measured():
    """Every JSON under ``benchmarks/results/`` names a commit of this repository (in its ``machine``
    record, or at the top level for the raw GPU run): a number nobody can trace to code is not kept."""
    import re
    import subprocess
    from pathlib import Path

    root = Path(common.__file__).resolve().parents[1]
    files = sorted((root / "benchmarks" / "results").rglob("*.json"))
    assert files, "benchmarks/results holds no JSON"
    shallow = subprocess.run(["git", "-C", str(root), "rev-parse", "--is-shallow-repository"], capture_output=True, text=True)
    full_history = shallow.returncode == 0 and shallow.stdout.strip() == "false"
    for path in files:
        data = json.loads(path.read_text())
        machine = data.get("machine")
        sha = machine.get("commit") if isinstance(machine, dict) else data.get("commit")
        assert isinstance(sha, str) and re.fullmatch(r"[0-9a-f]{40}", sha), f"{path.relative_to(root)}: commit {sha!r}"
        if full_history:  # a source archive or a shallow clone has no history to look the commit up in
            known = subprocess.run(["git", "-C", str(root), "cat-file", "-e", f"{sha}^{{commit}}"], capture_output=True)
            assert known.returncode == 0, f"{path.relative_to(root)}: commit {sha} is not in this repository's history"


def test_onnx_cpu_quick_writes_the_comparison(tmp_path):
    """``benchmarks.onnx_cpu --quick``: every path timed in each round, ms the docs read as
    ``{path: median}``, paired ratios that follow from the samples, outputs equal to eager."""
    pytest.importorskip("onnxruntime")
    from benchmarks import onnx_cpu

    out = tmp_path / "onnx_cpu.json"
    data = onnx_cpu.main(["--quick", "--threads", "1", "--out", str(out)])
    assert json.loads(out.read_text()) == json.loads(json.dumps(data))
    assert data["benchmark"] == "onnx_cpu" and data["machine"]["commit"] and data["machine"]["torch_threads"] == 1
    assert data["settings"]["ort_graph_optimization"] == "ORT_ENABLE_ALL" and data["settings"]["ort_intra_op_threads"] == 1
    paths = {onnx_cpu.EAGER, *onnx_cpu.TRANSFORMS, onnx_cpu.ORT}
    assert [r["size"] for r in data["results"]] == [16]
    for r in data["results"]:
        assert set(r["ms"]) == set(r["samples_ms"]) == paths
        for name, ms in r["ms"].items():
            samples = r["samples_ms"][name]
            assert len(samples) == data["settings"]["rounds"] and ms == pytest.approx(common.summarize(samples)["median"])
            assert r["quartiles_ms"][name][0] <= ms <= r["quartiles_ms"][name][1]
        for name, ratio in r["ratio_to_onnxruntime"].items():
            paired = [a / b for a, b in zip(r["samples_ms"][name], r["samples_ms"][onnx_cpu.ORT])]
            assert ratio["median"] == pytest.approx(common.summarize(paired)["median"])
        assert set(r["max_abs_diff"]) == paths - {onnx_cpu.EAGER}
        assert r["outputs_match"] and all(0 <= d <= r["tolerance"] for d in r["max_abs_diff"].values())
    assert data["outputs_match"]
