"""The documentation covers the public API: every public module is listed in ``docs/source/api.rst``
and every public name gets its own page there (cheap checks, no Sphinx build)."""

from __future__ import annotations

import importlib
import importlib.util
import json
import os
import pkgutil
import sys
from pathlib import Path

import pytest

import attention_gates

DOCS = Path(__file__).resolve().parents[1] / "docs" / "source"
sys.path.insert(0, str(DOCS / "_ext"))
ag_docs = pytest.importorskip("ag_docs", reason="the docs extension needs sphinx (the docs extra)")

API_RST = (DOCS / "api.rst").read_text(encoding="utf-8")


def public_modules() -> list[str]:
    """Modules of the package with an ``__all__`` and no private (``_``) part in their name."""
    names = ["attention_gates"]
    for info in pkgutil.walk_packages(attention_gates.__path__, "attention_gates."):
        if not any(part.startswith("_") for part in info.name.split(".")):
            names.append(info.name)
    return sorted(n for n in names if hasattr(importlib.import_module(n), "__all__"))


def test_api_rst_lists_every_public_module():
    listed = ag_docs.api_modules(API_RST)
    assert len(listed) == len(set(listed)), f"api.rst lists a module twice: {listed}"
    missing = sorted(set(public_modules()) - set(listed))
    assert not missing, f"add these modules to docs/source/api.rst: {missing}"
    for name in listed:
        importlib.import_module(name)  # a listed module that no longer exists fails here


@pytest.mark.parametrize("name", attention_gates.__all__)
def test_every_public_name_has_its_own_page(name):
    """The module template gives a page to each name whose canonical home is the module
    documenting it; the home must be a listed module that exports the very same object."""
    canonical = ag_docs.canonical_names(API_RST)
    home = canonical[f"attention_gates.{name}"]
    module, _, short = home.rpartition(".")
    assert short == name
    assert module in ag_docs.api_modules(API_RST)
    mod = importlib.import_module(module)
    assert name in mod.__all__ and getattr(mod, name) is getattr(attention_gates, name)
    assert canonical[home] == home  # the page is generated there, not linked elsewhere
    obj = getattr(attention_gates, name)
    if hasattr(obj, "__qualname__") and hasattr(obj, "__module__"):
        assert module == obj.__module__, f"{name} is documented in {module}, defined in {obj.__module__}"


def test_module_template_generates_pages_for_canonical_names_only():
    template = (DOCS / "_templates" / "autosummary" / "module.rst").read_text(encoding="utf-8")
    assert ":toctree:" in template and "canonical.get(full) == full" in template


def test_api_modules_parser():
    text = "Title\n=====\n\n.. autosummary::\n   :toctree: x\n\n   attention_gates\n   attention_gates.ops.cpu\n\nattention_gates.not_listed\n"
    assert ag_docs.api_modules(text) == ["attention_gates", "attention_gates.ops.cpu"]


# ---------------------------------------------------------------- the benchmarks page
def machine(cpu: str, commit: str = "0123456789abcdef") -> dict:
    return {"commit": commit, "device": "cpu", "cpu_model": cpu, "cpu_count": 2, "torch_threads": 2, "torch": "2.13.0+cpu", "gpu": None}


def write_result(root: Path, folder: str, name: str, data: dict) -> Path:
    path = root / folder / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data), encoding="utf-8")
    return path


def overhead(cpu: str, inference_paired: float) -> dict:
    def ratio(size, numerator, denominator="unet", **times):
        return {"dims": 3, "size": size, "numerator": numerator, "denominator": denominator, "params": 1.1,
                "forward_flops": 1.02, "inference": 9.0, "train_step": 1.06, "saved_plus_output_bytes": 1.09, **times}

    return {"machine": machine(cpu), "settings": {"plan": [{"dims": 3, "batch": 1}]},
            "ratios": [ratio([32] * 3, "attention_unet[cpu]", inference_paired=7.77),
                       ratio([64] * 3, "attention_unet[cpu]", inference_paired=inference_paired),
                       ratio([64] * 3, "attention_unet[cpu]", "monai_attention_unet", inference_paired=5.55)]}


def tables(rst: str) -> list[str]:
    """Each ``list-table`` of ``rst`` (its caption line and its indented rows)."""
    out = []
    for chunk in rst.split(".. list-table:: ")[1:]:
        lines = chunk.split("\n")
        body = [lines[0]]
        for line in lines[1:]:
            if line and not line.startswith("   "):
                break
            body.append(line)
        out.append("\n".join(body))
    return out


def headline(results: Path, name: str) -> str:
    return "\n".join(ag_docs.render_headline(ag_docs.load_results(results), ag_docs.HEADLINES[name]))


def test_overhead_headline_has_the_ratio_of_the_largest_input(tmp_path):
    write_result(tmp_path, "cpu-x", "overhead.json", overhead("Xeon Test", inference_paired=1.25))
    rst = headline(tmp_path, "bench_overhead")
    (table,) = tables(rst)
    assert "Xeon Test, commit 0123456789" in table.splitlines()[0]
    row = "   * - 3D 64^3, batch 1\n     - cpu\n     - 1.10x\n     - 1.02x\n     - 1.25x\n     - 1.06x\n     - 1.09x"
    assert row in table  # the paired inference ratio, not the ratio of medians (9.0)
    assert "32^3" not in table and "5.55" not in rst and "7.77" not in rst  # the largest input, U-Net as denominator
    assert "it takes 1.25x the U-Net's inference time" in rst
    assert "*Xeon Test (2 cores), 2 torch threads, torch 2.13.0+cpu*, commit ``0123456789``" in rst
    assert ":download:`overhead.json </" in rst  # a link to the raw file (shown by name: outside the repository)


def test_backend_headline_has_each_speed_up(tmp_path):
    gate = [{"mode": "eval", "layout": "contiguous", "dtype": "float32", "ms": {"reference": 30.0, "cpu": 10.0, "compile": 60.0}},
            {"mode": "train", "layout": "contiguous", "dtype": "float32", "ms": {"reference": 50.0, "cpu": 40.0}}]
    write_result(tmp_path, "cpu-x", "cpu_backends.json", {"machine": machine("Xeon Test"), "gate": gate,
                                                          "gate_shapes": {"x": [1, 32, 48, 48, 48], "g": [1, 64, 24, 24, 24]}})
    rst = headline(tmp_path, "bench_backends")
    (table,) = tables(rst)
    assert "   * - inference\n     - contiguous\n     - float32\n     - 30\n     - 3.00x\n     - 0.50x" in table
    assert "   * - training step\n     - contiguous\n     - float32\n     - 50\n     - 1.25x\n     - -" in table
    assert "``cpu`` 1.25x to 3.00x; ``compile`` 0.50x." in rst
    assert "(x 1x32x48x48x48, g 1x64x24x24x24)" in rst


def test_a_missing_result_gives_a_note(tmp_path):
    rst = headline(tmp_path, "bench_onnx")
    assert rst.startswith(".. note:: Not measured in this build: no ``onnx_cpu.json`` under ``benchmarks/results/``.")
    assert "python -m benchmarks.onnx_cpu" in rst and "list-table" not in rst
    write_result(tmp_path, "cpu-x", "onnx_cpu.json", {"machine": machine("Xeon Test"), "results": [{"size": 64}]})
    rst = headline(tmp_path, "bench_onnx")  # present, but without the numbers the page reads: says so, links the file
    assert rst.startswith(".. note:: Not measured in this build: :download:`onnx_cpu.json </")
    assert "hold none of the numbers this part reads" in rst
    assert "Not measured" in headline(tmp_path, "bench_overhead")


def test_onnx_headline_divides_by_onnx_runtime(tmp_path):
    results = [{"size": 64, "ms": {"optimize_for_inference": 90.0, "onnxruntime": 100.0}, "max_abs_diff": 3e-6},
               {"size": [96, 96, 96], "ms": {"optimize_for_inference": 330.0, "onnxruntime": 300.0}, "max_abs_diff": 4e-6}]
    write_result(tmp_path, "cpu-x", "onnx_cpu.json", {"machine": machine("Xeon Test"), "results": results})
    rst = headline(tmp_path, "bench_onnx")
    (table,) = tables(rst)
    assert "   * - 64^3\n     - 100\n     - 0.90x\n     - 3e-06" in table
    assert "   * - 96^3\n     - 300\n     - 1.10x\n     - 4e-06" in table
    assert "``optimize_for_inference`` 0.90x to 1.10x" in rst


def test_onnx_headline_takes_the_paired_ratio_where_the_file_has_it(tmp_path):
    """The paired per-round median (what the CPU guide quotes), not the ratio of the two medians."""
    results = [{"size": 96, "ms": {"optimize_for_inference": 200.0, "onnxruntime": 300.0},
                "ratio_to_onnxruntime": {"optimize_for_inference": {"median": 0.81, "q1": 0.74, "q3": 0.83}}}]
    write_result(tmp_path, "cpu-x", "onnx_cpu.json", {"machine": machine("Xeon Test"), "results": results})
    (table,) = tables(headline(tmp_path, "bench_onnx"))
    assert "   * - 96^3\n     - 300\n     - 0.81x" in table


def test_onnx_headline_shows_the_quartiles_and_the_conditions_of_the_run(tmp_path):
    """The CPU guide and the Deploy page show this block in place of a copy of its numbers: each cell
    carries the per-round quartiles, and the sentence says how the file was measured."""
    results = [{"size": 64, "ms": {"optimize_for_inference": 80.0, "fuse=False": 90.0, "onnxruntime": 100.0},
                "ratio_to_onnxruntime": {"optimize_for_inference": {"median": 0.79, "q1": 0.73, "q3": 0.82},
                                         "fuse=False": {"median": 0.89}}}]  # fmt: skip
    data = {"machine": machine("Xeon Test"), "results": results, "settings": {"rounds": 15, "threads_spin": True},
            "load_average": {"start": [0.22, 0.05, 0.02]}}  # fmt: skip
    write_result(tmp_path, "cpu-x", "onnx_cpu.json", data)
    rst = headline(tmp_path, "bench_onnx")
    (table,) = tables(rst)
    assert "   * - 64^3\n     - 100\n     - 0.79x [0.73, 0.82]\n     - 0.89x\n" in table  # no quartiles stored: none shown
    assert ("15 paired rounds per size, a ratio is the median of the per-round ratios [their quartiles], threads spinning "
            "while they wait (both runtimes' default), load average 0.2 at the start.") in " ".join(rst.split())  # fmt: skip
    data["settings"]["threads_spin"] = False
    write_result(tmp_path, "cpu-x", "onnx_cpu.json", data)
    assert "threads not spinning (``OMP_WAIT_POLICY=PASSIVE``)" in " ".join(headline(tmp_path, "bench_onnx").split())


def test_numbers_of_two_machines_never_share_a_table(tmp_path):
    write_result(tmp_path, "cpu-a", "overhead.json", overhead("Machine A", inference_paired=1.11))
    write_result(tmp_path, "cpu-b", "overhead.json", overhead("Machine B", inference_paired=1.33))
    for folder, cpu, ms in (("cpu-a", "Machine A", 20.0), ("cpu-b", "Machine B", 15.0)):
        gate = [{"mode": "eval", "layout": "contiguous", "dtype": "float32", "ms": {"reference": 30.0, "cpu": ms}}]
        write_result(tmp_path, folder, "cpu_backends.json", {"machine": machine(cpu), "gate": gate})
    rows = [{"mode": "eval", "layout": "contiguous", "dtype": "bfloat16", "ms": {"reference": 1.0, "triton": t}, "machine": gpu,
             "commit": "fedcba9876543210", "source": "benchmarks/results/gpu/auto_rows.json"}
            for gpu, t in (("GPU C", 0.5), ("GPU D", 0.25))]  # fmt: skip
    results = ag_docs.load_results(tmp_path)
    rst = "\n".join(ag_docs.render_headline(results, ag_docs.HEADLINES["bench_overhead"])
                    + ag_docs.render_headline(results, ag_docs.HEADLINES["bench_backends"])
                    + ag_docs.render_measured_rows(rows, results, ag_docs.ROOT / "attention_gates" / "ops" / "measured.json"))
    found = tables(rst)
    assert len(found) == 6
    expected = {"Machine A": ("1.11x", "1.50x"), "Machine B": ("1.33x", "2.00x"), "GPU C": ("2.00x",), "GPU D": ("4.00x",)}
    for table in found:
        named = [m for m in expected if m in table]
        assert len(named) == 1, f"a table names {named}: {table}"
        assert any(v in table for v in expected[named[0]])
        others = {v for m, vs in expected.items() if m != named[0] for v in vs} - set(expected[named[0]])
        assert not any(v in table for v in others), table
    assert "whose rows come from ``benchmarks/results/gpu/auto_rows.json``" in rst


def test_rows_of_measured_json_shown_above_are_not_repeated(tmp_path):
    gate = [{"mode": "eval", "layout": "contiguous", "dtype": "float32", "ms": {"reference": 30.0, "cpu": 10.0}}]
    path = write_result(tmp_path, "cpu-x", "cpu_backends.json", {"machine": machine("Xeon Test"), "gate": gate})
    rows = [{**gate[0], "machine": "Xeon Test", "commit": "0123456789abcdef", "source": str(path)}]
    rst = "\n".join(ag_docs.render_measured_rows(rows, ag_docs.load_results(tmp_path), path))
    assert not tables(rst) and f"whose rows come from ``{path}``" in rst


def test_plots_name_their_machine_and_missing_ones_give_a_note(tmp_path):
    write_result(tmp_path, "cpu-x", "gates.json", {"machine": machine("Xeon Test"), "plots": ["gates_bandwidth_cpu.png", "gone_cpu.png"]})
    (tmp_path / "cpu-x" / "gates_bandwidth_cpu.png").write_bytes(b"\x89PNG")
    sweep = {"swept": "voxels", "sizes": [1024, 2048, 4096], "above_over_below": [2.0, 1.0, 0.5], "threshold": 2048}
    write_result(tmp_path, "cpu-y", "cpu_backends.json", {"machine": machine("Epyc Test"), "crossovers": {"onednn_min_rows": sweep}})
    rst = "\n".join(ag_docs.render_plots(ag_docs.load_results(tmp_path), tmp_path / "plots"))
    figures = rst.split(".. figure:: ")[1:]
    bandwidth = next(f for f in figures if "gates_bandwidth_cpu.png" in f.splitlines()[0])
    assert "GB/s over the gate's byte floor" in bandwidth and "*Xeon Test (2 cores)" in bandwidth and "Epyc" not in bandwidth
    assert ".. note:: Plot not available in this build: ``gone_cpu.png`` does not exist" in rst
    if importlib.util.find_spec("matplotlib") is None:
        assert "matplotlib is not installed" in rst
    else:
        png = tmp_path / "plots" / "cpu-y-crossovers.png"
        assert png.read_bytes()[:4] == b"\x89PNG"
        crossovers = next(f for f in figures if png.name in f.splitlines()[0])
        assert "Where the CPU paths change strategy" in crossovers and "*Epyc Test (2 cores)" in crossovers


def test_result_files_are_one_link_away(tmp_path):
    a = write_result(tmp_path, "cpu-a", "overhead.json", overhead("Machine A", inference_paired=1.1))
    b = write_result(tmp_path, "gpu-b", "results.json", {"machine": "GPU B (driver 1), torch 2.11", "commit": "fedcba98765"})
    (tmp_path / "gpu-b" / "README.md").write_text("notes", encoding="utf-8")
    rst = "\n".join(ag_docs.render_result_files(ag_docs.load_results(tmp_path), tmp_path / "measured.json"))
    for path, who in ((a, "Machine A (2 cores)"), (b, "GPU B (driver 1), torch 2.11")):
        link = f":download:`{path.name} </{Path(os.path.relpath(path, ag_docs.SOURCE)).as_posix()}>`"
        assert f"   * - {link}\n     - {who}" in rst
    assert "Notes on a run: :download:`README.md" in rst and "``fedcba9876``" in rst


def test_stored_results_render_in_every_headline(caplog):
    results = ag_docs.load_results(ag_docs.RESULTS)
    for name in ("bench_overhead", "bench_backends"):
        rst = "\n".join(ag_docs.render_headline(results, ag_docs.HEADLINES[name]))
        assert tables(rst) and "Not measured" not in rst, name
    onnx = "\n".join(ag_docs.render_headline(results, ag_docs.HEADLINES["bench_onnx"]))
    assert "hold none of the numbers" not in onnx  # an onnx_cpu.json, when stored, is in the format the page reads
    assert not [r for r in caplog.records if r.levelname == "WARNING"]
    files = "\n".join(ag_docs.render_result_files(results, ag_docs.ROOT / "attention_gates" / "ops" / "measured.json"))
    for path in ag_docs.RESULTS.glob("**/*.json"):
        assert f":download:`{path.relative_to(ag_docs.ROOT).as_posix()} </" in files
