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


def test_cpu_gate_quick_writes_well_formed_results(tmp_path):
    from benchmarks import cpu_gate

    path = tmp_path / "cpu_gate.json"
    data = cpu_gate.main(["--quick", "--threads", "1", "--out", str(path)])
    assert json.loads(path.read_text())["config"]["quick"] is True
    from attention_gates.ops import native

    assert data["native_kernel"] == {"available": native.available(), "unavailable_reason": native.unavailable_reason()}
    gate = data["gate_level2"]
    for layout in cpu_gate.LAYOUTS:
        for mode in ("eval", "train"):
            assert set(gate[layout][mode]) == {"reference", "cpu"} | ({"cpu-torch"} if native.available() else set())
            assert all(s["n"] == 2 and s["median"] > 0 for s in gate[layout][mode].values())
    # x = 1x8x16^3, g = 1x16x8^3, F_int = 8: theta 8x(8*8) per coarse voxel, phi 8x16, psi 1x8, W 8x8 per voxel
    coarse, fine = 8**3, 16**3
    assert gate["eval_flops"] == 2 * (coarse * (8 * 64 + 8 * 16 + 8) + fine * 8 * 8)
    assert gate["flop_floor_s"] == pytest.approx(gate["eval_flops"] / (data["gemm"]["GFLOPps"] * 1e9))
    # training: every convolution again for its input's gradient (x and g need one) and its weight's
    assert gate["train_flops"] == 3 * gate["eval_flops"]
    assert gate["train_flop_floor_s"] == pytest.approx(gate["train_flops"] / (data["gemm"]["GFLOPps"] * 1e9))
    assert {n.split(",")[0] for n in data["model"]} == {"UNet3D", "AttentionUNet3D[reference]", "AttentionUNet3D[cpu]"}
    assert len(data["model"]) == 6
    for name, s in data["model"].items():  # the attention modules' share, measured within each call
        assert ("attention_share" in s) == name.startswith("AttentionUNet3D") and s.get("attention_share", 1) > 0
    assert set(data["allocator"]) == {"default", "no-mmap"} and data["allocator"]["no-mmap"]["env"]["MALLOC_MMAP_MAX_"] == "0"
    gate_rows = 4 * len(gate["contiguous"]["eval"])  # (2 layouts x 2 modes) per variant
    assert len(data["table"]) == gate_rows + 2 + 6 + 2 * 6  # gate rows, products rows, model rows, allocator rows
    alloc_att = [r for r in data["table"] if r["case"].startswith("alloc") and r["variant"].startswith("AttentionUNet3D")]
    assert len(alloc_att) == 8 and all("x UNet3D (same layout); in-call: 1 + " in r["vs floor / note"] for r in alloc_att)
    assert data["config"]["model_batch"] == 1 and any(r["case"] == "model 1x16^3 eval" for r in data["table"])
    advice = "\n".join(data["advice"])
    layout_speedup = data["model"]["UNet3D"]["median"] / data["model"]["UNet3D, channels_last"]["median"]
    assert f"channels_last_3d made UNet3D {layout_speedup:.2f}x" in advice
    assert "MALLOC_MMAP_MAX_=0" in advice and "torch used 1 of" in advice
    assert set(gate["products"]) == {"eval", "train"} and all(s["n"] == 2 for s in gate["products"].values())
    products = data["products"]  # one by one: the same multiply-adds the FLOP counter saw
    assert sum(p["flops"] for p in products if p["phase"] == "forward") == gate["eval_flops"]
    assert sum(p["flops"] for p in products) == gate["train_flops"]
    assert all(p["GFLOPps"] == pytest.approx(p["flops"] / p["median_s"] / 1e9) for p in products)
    eval_t, train_t, model_t = data["targets"]
    best = min(gate[lay]["eval"]["cpu"]["median"] for lay in cpu_gate.LAYOUTS)
    assert eval_t["met"] == (best <= 3 * gate["floor_s"]) and eval_t["products_s"] == gate["products"]["eval"]["median"]
    speed = max(gate[lay]["train"]["reference"]["median"] / gate[lay]["train"]["cpu"]["median"] for lay in cpu_gate.LAYOUTS)
    assert train_t["met"] == (speed >= 3) and f"{speed:.2f}x the reference" in train_t["line"]
    shares = [s["attention_share"] for n, s in data["model"].items() if n.startswith("AttentionUNet3D[cpu]")]
    assert model_t["met"] == (max(shares) <= 0.03) and len(model_t["ratio"]) == 2
    mp = data["model_products"]  # three gated skips (4 products each) and the gating signal
    assert len(mp["products"]) == 13 and mp["share"] > 0 and model_t["products_share"] == mp["share"]
    assert mp["flops"] == sum(2 * math.prod(p["mkn"]) for p in mp["products"])


def test_attention_products_of_the_paper_model():
    """At 16^3 the paper model's gated skips see x = 32x8^3, 64x4^3, 128x2^3 with g = 64x4^3,
    128x2^3 and the 256x1^3 gating signal; two heads with F_int = F_l, factor 2."""
    from attention_gates import AttentionUNet3D
    from benchmarks import cpu_gate

    products = dict(cpu_gate.attention_products(AttentionUNet3D().eval(), torch.randn(1, 1, 16, 16, 16)))
    assert products == {
        "gating": (1, 256, 256),
        "level 4 theta": (1, 128 * 8, 2 * 128), "level 4 phi": (1, 256, 2 * 128),
        "level 4 psi": (1, 2 * 128, 2), "level 4 output": (8, 128, 2 * 128),
        "level 3 theta": (8, 64 * 8, 2 * 64), "level 3 phi": (8, 128, 2 * 64),
        "level 3 psi": (8, 2 * 64, 2), "level 3 output": (64, 64, 2 * 64),
        "level 2 theta": (64, 32 * 8, 2 * 32), "level 2 phi": (64, 64, 2 * 32),
        "level 2 psi": (64, 2 * 32, 2), "level 2 output": (512, 32, 2 * 32),
    }  # fmt: skip


@pytest.mark.parametrize("x_shape, g_shape", [((1, 8, 8, 8, 8), (1, 16, 4, 4, 4)), ((2, 4, 10, 6, 8), (2, 12, 3, 3, 4))])
def test_gate_products_are_the_flops_of_the_reference(x_shape, g_shape):
    """The product list times exactly the multiply-adds the FLOP counter finds in the reference
    gate's forward and its backward (x's and g's gradients, every weight's), g on its own grid too."""
    from torch.utils.flop_counter import FlopCounterMode

    from attention_gates import GridAttentionGate3D
    from benchmarks import cpu_gate

    gate = GridAttentionGate3D(x_shape[1], g_shape[1], 6, backend="reference")
    x, g = torch.randn(x_shape, requires_grad=True), torch.randn(g_shape, requires_grad=True)
    products = cpu_gate.gate_products(x_shape, g_shape, 6)
    flops = {phase: sum(2 * math.prod(p["mkn"]) for p in products if p["phase"] == phase) for phase in ("forward", "backward")}
    with FlopCounterMode(display=False) as forward:
        out, _ = gate(x, g)
    with FlopCounterMode(display=False) as backward:
        out.backward(torch.randn_like(out))
    assert (flops["forward"], flops["backward"]) == (forward.get_total_flops(), backward.get_total_flops())


def test_cpu_gate_model_bench_takes_a_batch():
    """``--batch N``: the networks get ``Tensor[N, 1, S, S, S]``."""
    from benchmarks import cpu_gate

    seen = []
    hook = torch.nn.modules.module.register_module_forward_pre_hook(
        lambda m, args: seen.append(args[0].shape[0]) if type(m).__name__ in ("UNet3D", "AttentionUNet3D") else None
    )
    try:
        out = cpu_gate.model_bench(16, 0, 1, batch=2)
    finally:
        hook.remove()
    assert len(out) == 6 and all(s["median"] > 0 for s in out.values())
    assert seen and set(seen) == {2}
