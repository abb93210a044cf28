"""Every public network and gate, as built, in eval mode and with the default backend, leaves PyTorch
through :mod:`attention_gates.deploy`: traced to TorchScript (saved, loaded back, run at other
sizes), refused by ``torch.jit.script`` with a pointer to the paths that work, exported with
``torch.export`` and to ONNX with dynamic batch and spatial sizes and run at two other sizes (one
odd), with the attention maps as named outputs; one program packaged with AOTInductor; and the
errors of the deploy functions."""

from __future__ import annotations

import importlib.util
import warnings
from pathlib import Path

import pytest
import torch

from attention_gates import (
    AttentionUNet2D,
    AttentionUNet3D,
    GridAttentionGate2D,
    GridAttentionGate3D,
    MultiAttentionGate,
    UNet2D,
    UNet3D,
    deploy,
)
from attention_gates.deploy import ExportCheckError
from attention_gates.functional import GateOptions, GateWeights
from attention_gates.ops import dispatch, measured

pytestmark = pytest.mark.export

#: float32: the runtimes reorder sums (ONNX Runtime, oneDNN in the program), eager's own rounding is ~1e-7
CLOSE = 1e-4


def randn(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


# name -> (model, its export example, inputs at other sizes: one odd, another batch; "tiny": a one-voxel
# bottleneck of a network, a gate's x below twice the subsample factor, which TorchScript and ONNX take
# and a torch.export program refuses)
NETS_2D = dict(example=randn(2, 1, 12, 10), others=[randn(1, 1, 21, 19, seed=1), randn(3, 1, 16, 8, seed=2)],
               tiny=[randn(1, 1, 3, 4, seed=3), randn(2, 1, 1, 1, seed=4)])  # fmt: skip
NETS_3D = dict(example=randn(2, 1, 6, 5, 7), others=[randn(1, 1, 9, 7, 5, seed=1), randn(3, 1, 8, 12, 6, seed=2)],
               tiny=[randn(1, 1, 4, 3, 1, seed=3)])  # fmt: skip
CASES = {
    "AttentionUNet2D-fused": (lambda: AttentionUNet2D(1, 2, (4, 8, 16)), NETS_2D),
    "AttentionUNet2D-per_scale": (lambda: AttentionUNet2D(1, 3, (4, 8, 16), deep_supervision="per_scale", heads=1), NETS_2D),
    "UNet2D-fused": (lambda: UNet2D(1, 2, (4, 8, 16)), NETS_2D),
    "AttentionUNet3D-fused": (lambda: AttentionUNet3D(1, 2, (2, 4, 8), heads=1), NETS_3D),
    "UNet3D-per_scale": (lambda: UNet3D(1, 2, (2, 4, 8), deep_supervision="per_scale"), NETS_3D),
    # gates: g at another size than theta's grid too (resampled inside)
    "GridAttentionGate2D": (
        lambda: GridAttentionGate2D(4, 6),
        dict(example=(randn(2, 4, 8, 6), randn(2, 6, 4, 3)),
             others=[(randn(1, 4, 13, 7, seed=1), randn(1, 6, 5, 4, seed=2)), (randn(3, 4, 6, 10, seed=3), randn(3, 6, 3, 5, seed=4)),
                     (randn(1, 4, 4, 4, seed=5), randn(1, 6, 1, 1, seed=6))],
             tiny=[(randn(1, 4, 3, 5, seed=7), randn(1, 6, 2, 2, seed=8))]),
    ),
    "GridAttentionGate3D": (
        lambda: GridAttentionGate3D(4, 6, subsample_factor=(2, 2, 1)),
        dict(example=(randn(2, 4, 6, 4, 5), randn(2, 6, 3, 2, 5)),
             others=[(randn(1, 4, 7, 5, 3, seed=1), randn(1, 6, 2, 3, 3, seed=2)),
                     (randn(3, 4, 8, 4, 2, seed=3), randn(3, 6, 4, 2, 2, seed=4))]),
    ),
    "MultiAttentionGate": (
        lambda: MultiAttentionGate(2, 4, 6, heads=2),
        dict(example=(randn(2, 4, 8, 6), randn(2, 6, 4, 3)),
             others=[(randn(1, 4, 11, 9, seed=1), randn(1, 6, 5, 4, seed=2)), (randn(3, 4, 6, 4, seed=3), randn(3, 6, 3, 2, seed=4))]),
    ),
}  # fmt: skip


@pytest.fixture(autouse=True)
def auto_names_the_cpu_backend(monkeypatch):
    """The table behind "auto" names the cpu backend (a Python autograd function, which no recorder
    can record) for every eager call: tracing and export must still take the reference, and the
    eager model the exports are compared with runs the cpu backend."""
    monkeypatch.setattr(measured, "winner", lambda key: "cpu")


def built(name: str):
    """The case's model, as built (random weights, the batch norms' running statistics moved off
    the identity so that a wrong statistic shows), in eval mode; its example and other inputs."""
    make, data = CASES[name]
    torch.manual_seed(0)
    model = make()
    for m in model.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    return model.eval(), data["example"], data["others"], data.get("tiny", [])


@pytest.mark.parametrize("name", CASES)
def test_torchscript_trace_saves_loads_back_and_runs_at_other_sizes(name, tmp_path):
    """Tracing records the reference math and the padding as operations on the input's sizes: the
    loaded module is not specialised to the traced size."""
    model, example, others, tiny = built(name)
    path = deploy.export_torchscript(model, example, tmp_path / "model.pt")
    kinds = {n.kind() for n in torch.jit.load(str(path)).inlined_graph.nodes()}
    assert "aten::_convolution" in kinds and not any("PythonOp" in k for k in kinds), kinds
    assert deploy.check_torchscript(path, model, others + tiny) <= CLOSE


@pytest.mark.parametrize("name", ["AttentionUNet3D-fused", "MultiAttentionGate"])
def test_plain_torch_jit_trace_warns_nothing(name):
    """``torch.jit.trace`` called directly (MONAI's converter, a user's script): the input checks, which
    compare sizes in Python, raise no ``TracerWarning``, and the trace runs at another size."""
    model, example, others, _ = built(name)
    with warnings.catch_warnings():
        warnings.simplefilter("error", torch.jit.TracerWarning)
        traced = torch.jit.trace(model, example, check_trace=False)
    inputs = others[0] if isinstance(others[0], tuple) else (others[0],)
    torch.testing.assert_close(traced(*inputs), model(*inputs), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", CASES)
def test_torch_jit_script_is_refused_with_the_paths_that_work(name):
    model, *_ = built(name)
    with pytest.raises(NotImplementedError, match=rf"torch.jit.script cannot compile {type(model).__name__}: .* torch.jit.trace"):
        torch.jit.script(model)


@pytest.mark.parametrize("name", CASES)
def test_torch_export_program_runs_at_other_sizes(name, tmp_path):
    """Batch 1 included; a network's program refuses a one-voxel bottleneck (its guards: sizes above 2^(depth - 1))."""
    model, example, others, tiny = built(name)
    path = deploy.export_program(model, example, tmp_path / "model.pt2")
    program = torch.export.load(str(path))
    targets = {str(n.target) for n in program.graph.nodes if n.op == "call_function"}
    assert any(t.startswith("aten.conv") for t in targets) and not any("higher_order" in t or "mkldnn" in t for t in targets), targets
    assert deploy.check_program(path, model, others) <= CLOSE
    for x in tiny:
        with pytest.raises(ExportCheckError, match=r"the torch.export program could not run the exported model on Tensor\[.*Guard failed"):
            deploy.check_program(path, model, x)


@pytest.mark.parametrize("name", CASES)
def test_onnx_runs_in_onnx_runtime_at_other_sizes(name, tmp_path):
    import onnx

    model, example, others, tiny = built(name)
    path = deploy.export_onnx(model, example, tmp_path / "model.onnx")
    assert deploy.check_onnx(path, model, others + tiny) <= CLOSE
    proto = onnx.load(str(path))
    dims = {v.name: [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim] for v in proto.graph.input}
    spatial = ("depth", "height", "width")[-(example[0] if isinstance(example, tuple) else example).dim() + 2 :]
    if isinstance(example, tuple):  # a gate
        assert dims == {"x": ["batch", 4, *(f"x_{a}" for a in spatial)], "g": ["batch", 6, *(f"g_{a}" for a in spatial)]}
        assert [o.name for o in proto.graph.output] == ["out", "alpha"]
    else:
        assert dims == {"image": ["batch", 1, *spatial]} and [o.name for o in proto.graph.output] == ["logits"]
    assert {p.key for p in proto.metadata_props} == {"attention_gates.version"}


def test_attention_maps_are_named_outputs(tmp_path):
    """``attention=True``: the logits and one map per gated level, ascending; ONNX names them (its
    export runs torch.export on the same module as :func:`~attention_gates.deploy.export_program`)."""
    import onnx

    torch.manual_seed(0)
    model = AttentionUNet2D(1, 2, (4, 8, 16), attention_levels=(1, 2)).eval()
    example, others = randn(2, 1, 10, 9), [randn(1, 1, 23, 9, seed=1), randn(2, 1, 16, 12, seed=2)]
    assert deploy.output_names(model, attention=True) == ("logits", "attention_level1", "attention_level2")
    path = deploy.export_onnx(model, example, tmp_path / "att.onnx", attention=True)
    outputs = {v.name: [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim] for v in onnx.load(str(path)).graph.output}
    assert list(outputs) == ["logits", "attention_level1", "attention_level2"]
    assert outputs["logits"] == ["batch", 2, "height", "width"] and outputs["attention_level1"] == ["batch", 2, "height", "width"]
    assert outputs["attention_level2"] == ["batch", 2, "((height + 1)//2)", "((width + 1)//2)"]
    assert deploy.check_onnx(path, model, others, attention=True) <= CLOSE
    with pytest.raises(ExportCheckError, match=r"the ONNX model's outputs are \['logits', 'attention_level1', 'attention_level2'\]"):
        deploy.check_onnx(path, model, others)
    ts = deploy.export_torchscript(model, example, tmp_path / "att.pt", attention=True)
    assert deploy.check_torchscript(ts, model, others, attention=True) <= CLOSE
    logits, level1, level2 = torch.jit.load(str(ts))(others[0])
    assert level1.shape == (1, 2, 23, 9) and level2.shape == (1, 2, 12, 5)  # ceil(S / 2^(level - 1))


def test_eager_takes_the_cpu_backend_that_no_recorder_can_record():
    """What :func:`auto_names_the_cpu_backend` makes of eager calls, so that every export above shows
    "auto" taking the reference under tracing and export."""
    gate = GridAttentionGate2D(4, 8).eval()
    W, bn = gate.W
    weights = GateWeights(gate.theta.weight, gate.phi.weight, gate.phi.bias, gate.psi.weight, gate.psi.bias,
                          W.weight, W.bias, bn.weight, bn.bias, bn.running_mean, bn.running_var)  # fmt: skip
    with torch.no_grad():
        assert dispatch.chosen(None, randn(1, 4, 8, 8), randn(1, 8, 4, 4), weights, GateOptions()) == "cpu"


def test_aotinductor_package_of_the_program_runs_at_other_sizes(tmp_path):
    """The smallest gated network (about a minute on 2 CPU cores: Inductor's code generation for
    symbolic sizes, then the C++ compiler)."""
    torch.manual_seed(0)
    model = AttentionUNet2D(1, 2, (4, 8), attention_levels=(1,)).eval()
    path = deploy.export_program(model, randn(2, 1, 6, 5), tmp_path / "model.pt2")
    package = torch._inductor.aoti_compile_and_package(torch.export.load(str(path)), package_path=str(tmp_path / "model_aoti.pt2"))
    compiled = torch._inductor.aoti_load_package(package)
    for x in (randn(1, 1, 9, 7, seed=1), randn(3, 1, 4, 12, seed=2)):
        with torch.no_grad():
            torch.testing.assert_close(compiled(x), model(x), rtol=1e-4, atol=1e-5)


# --------------------------------------------------------------------------- errors


def test_export_errors_name_what_was_expected(tmp_path):
    model, example, *_ = built("AttentionUNet2D-fused")
    with pytest.raises(ValueError, match=r"model must be in eval mode \(model.eval\(\)\): .* got AttentionUNet2D in training mode"):
        deploy.export_torchscript(model.train(), example, tmp_path / "a.pt")
    model.eval().gates.train()
    with pytest.raises(ValueError, match=r"got gates in training mode"):
        deploy.export_onnx(model, example, tmp_path / "a.onnx")
    model.eval()
    with pytest.raises(TypeError, match=r"model must be a torch.nn.Module, got function"):
        deploy.export_program(lambda x: x, example, tmp_path / "a.pt2")
    with pytest.raises(TypeError, match=r"example must be a Tensor or a tuple of Tensors \(one per input\), got str"):
        deploy.export_torchscript(model, "x", tmp_path / "a.pt")
    with pytest.raises(ValueError, match=r"example image must be Tensor\[N, C, \*S\] with 2 spatial dims for AttentionUNet2D, got \[2, 1, 1"):
        deploy.export_torchscript(model, randn(2, 1, 12), tmp_path / "a.pt")
    with pytest.raises(ValueError, match=r"example must hold 2 tensor\(s\), x, g, for GridAttentionGate2D; got 1"):
        deploy.export_torchscript(GridAttentionGate2D(4, 6).eval(), randn(2, 4, 8, 8), tmp_path / "a.pt")
    with pytest.raises(ValueError, match=r"example image must have a batch of at least 2 and spatial sizes of at least \[5, 5\] "
                                         r"for AttentionUNet2D: .* got \[1, 1, 12, 10\]"):  # fmt: skip
        deploy.export_program(model, randn(1, 1, 12, 10), tmp_path / "a.pt2")
    with pytest.raises(ValueError, match=r"spatial sizes of at least \[5, 5\] for AttentionUNet2D: .* got \[2, 1, 12, 4\]"):
        deploy.export_onnx(model, randn(2, 1, 12, 4), tmp_path / "a.onnx")
    with pytest.raises(ValueError, match=r"example x must have a batch of at least 2 and spatial sizes of at least \[4, 4\]"):
        deploy.export_program(GridAttentionGate2D(4, 6).eval(), (randn(2, 4, 3, 8), randn(2, 6, 2, 4)), tmp_path / "a.pt2")
    with pytest.raises(ValueError, match=r"attention=True needs an AttentionUNet; UNet2D has no attention maps"):
        deploy.export_torchscript(UNet2D(1, 2, (4, 8)).eval(), example, tmp_path / "a.pt", attention=True)
    with pytest.raises(ValueError, match=r"needs an AttentionUNet; GridAttentionGate2D returns its attention map alpha always"):
        deploy.output_names(GridAttentionGate2D(4, 6), attention=True)
    with pytest.raises(ValueError, match=r"opset must be 18 or later \(torch's ONNX exporter\), got 17"):
        deploy.export_onnx(model, example, tmp_path / "a.onnx", opset=17)
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # nothing written


def test_outputs_are_never_replaced_unasked(tmp_path):
    model, example, others, tiny = built("UNet2D-fused")
    taken = tmp_path / "taken.pt"
    taken.write_bytes(b"mine")
    with pytest.raises(FileExistsError, match=rf"output {taken} exists: pass overwrite=True \(--overwrite\) to replace it"):
        deploy.export_torchscript(model, example, taken)
    assert taken.read_bytes() == b"mine"
    with pytest.raises(ValueError, match=rf"output {tmp_path} is a folder; expected the TorchScript file to write"):
        deploy.export_torchscript(model, example, tmp_path)
    with pytest.raises(ValueError, match=r"format must be one of \('torchscript', 'program', 'onnx'\), got 'tflite'"):
        deploy.check_output(tmp_path / "a.tflite", format="tflite")
    deploy.export_torchscript(model, example, taken, overwrite=True)
    assert deploy.check_torchscript(taken, model, others[0]) <= CLOSE


def test_a_check_that_differs_or_cannot_run_raises(tmp_path):
    model, example, others, tiny = built("UNet2D-fused")
    path = deploy.export_torchscript(model, example, tmp_path / "model.pt")
    changed, *_ = built("UNet2D-fused")
    with torch.no_grad():
        changed.head.fuse.bias.add_(1.0)
    message = r"TorchScript's logits differ from the PyTorch model's by up to 1 on Tensor\[1, 1, 21, 19\] \(tolerance (\S+)\)"
    with pytest.raises(ExportCheckError, match=message):
        deploy.check_torchscript(path, changed, others)
    assert deploy.check_torchscript(path, changed, others, tolerance=2.0) == pytest.approx(1.0)
    with pytest.raises(TypeError, match=r"inputs must be a Tensor or a tuple of Tensors \(one per input\), got int"):
        deploy.check_torchscript(path, model, [3])


def test_onnx_needs_the_export_extra(monkeypatch, tmp_path):
    model, example, *_ = built("UNet2D-fused")
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "onnxruntime" else real(name, *a))
    message = r"the ONNX export needs onnx, onnxscript, onnxruntime \(onnxruntime not installed\): pip install 'attention-gates\[export\]'"
    with pytest.raises(ImportError, match=message):
        deploy.export_onnx(model, example, tmp_path / "a.onnx")
    with pytest.raises(ImportError, match=message):
        deploy.check_onnx(Path(tmp_path / "a.onnx"), model, example)


def test_dynamic_shapes():
    from torch.export import Dim

    shapes = deploy.dynamic_shapes((randn(2, 4, 8, 8), randn(2, 6, 4, 4)))
    assert shapes == ({0: Dim.DYNAMIC, 2: Dim.DYNAMIC, 3: Dim.DYNAMIC},) * 2
    (named,) = deploy.dynamic_shapes(randn(2, 1, 4, 8, 8), multiples=(1, 4, 4))
    assert [named[a].__name__ for a in (0, 2, 3, 4)] == ["batch", "depth", "4*height_blocks", "4*width_blocks"]
    with pytest.raises(ValueError, match=r"multiples need one Tensor\[N, C, \*S\] with 1 to 3 spatial dims and one multiple per"):
        deploy.dynamic_shapes(randn(2, 1, 4, 8, 8), multiples=(4, 4))


def test_monai_bundles_trace_the_network_as_ckpt_export_use_trace_does(tmp_path):
    """``python -m monai.bundle ckpt_export ... --use_trace True`` converts with this function (eval
    mode, no grad, torch.jit.trace); the saved module runs at other sizes than the traced one."""
    utils = pytest.importorskip("monai.networks.utils")
    model, example, others, tiny = built("AttentionUNet3D-fused")
    path = tmp_path / "model.ts"
    utils.convert_to_torchscript(model.train(), path, verify=True, inputs=[example], use_trace=True, device="cpu")
    assert not model.training  # the converter puts it in eval mode itself
    assert deploy.check_torchscript(path, model, others + tiny) <= CLOSE
