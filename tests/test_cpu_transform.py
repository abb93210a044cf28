"""attention_gates.cpu: the explicit CPU inference transform (oneDNN routing, channels-last, the folded
multi-head block) against the untransformed modules, and the plain modules staying plain."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.profiler import ProfilerActivity, profile

from attention_gates import AttentionUNet2D, AttentionUNet3D, MultiAttentionGate, UNet2D, UNet3D, deploy
from attention_gates.cpu import FoldedMultiAttentionGate, FusedAway, FusedConv, OneDNNConv3d, optimize_for_inference
from attention_gates.functional import GateWeights
from attention_gates.ops import measured, onednn
from attention_gates.ops.cpu_gate import multi_gate_inference_cpu
from gate_cases import (
    assert_close_nonfinite, functional_args, gate_shapes, inputs, nonfinite_spots, random_gate, randomise, reference, with_nonfinite,
)

needs_onednn = pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="this torch build has no oneDNN")


def _ops(fn) -> set[str]:
    """The aten ops that ``fn()`` ran."""
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    return {e.key for e in prof.key_averages()}


# ---------------------------------------------------------------------------------------------
# the plain modules are plain
# ---------------------------------------------------------------------------------------------


def test_plain_networks_hold_plain_torch_convolutions():
    for net in (UNet3D(filters=[4, 8, 16]), AttentionUNet3D(filters=[4, 8, 16]), UNet2D(filters=[4, 8])):
        convs = [m for m in net.modules() if isinstance(m, nn.modules.conv._ConvNd)]
        assert convs and all(type(m) in (nn.Conv1d, nn.Conv2d, nn.Conv3d) for m in convs)
        assert not any(isinstance(m, FoldedMultiAttentionGate) for m in net.modules())


# ---------------------------------------------------------------------------------------------
# OneDNNConv3d
# ---------------------------------------------------------------------------------------------


def _conv_case(c_in=16, c_out=8, size=(16, 16, 16), batch=1, **kwargs):
    torch.manual_seed(0)
    conv = OneDNNConv3d.from_conv(nn.Conv3d(c_in, c_out, **{"kernel_size": 3, "padding": 1, **kwargs}))
    x = torch.randn(batch, c_in, *size, requires_grad=True)
    return conv, x


@pytest.mark.parametrize("bias", [True, False])
def test_from_conv_keeps_the_parameters_and_settings(bias):
    conv = nn.Conv3d(4, 6, (3, 1, 2), stride=(1, 2, 1), padding=(1, 0, 1), dilation=(2, 1, 1), bias=bias, padding_mode="reflect").eval()
    new = OneDNNConv3d.from_conv(conv)
    assert type(new) is OneDNNConv3d and new.weight is conv.weight and new.bias is conv.bias and not new.training
    assert new.extra_repr() == conv.extra_repr() and list(new.state_dict()) == list(conv.state_dict())
    x = torch.randn(1, 4, 7, 6, 5)
    torch.testing.assert_close(new(x), conv(x), rtol=1e-5, atol=1e-5)


def _matches_nn_conv3d_in_float64(conv: OneDNNConv3d, x: torch.Tensor, grad_atol: float = 1e-4) -> torch.Tensor:
    """``conv(x)`` with its gradients (input and parameters) against ``nn.Conv3d`` with the same
    parameters in float64; returns ``conv(x)``."""
    ref = nn.Conv3d(
        conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding, conv.dilation, conv.groups, conv.bias is not None
    ).double()
    ref.load_state_dict(conv.state_dict())
    x64 = x.detach().double().requires_grad_()
    y, y64 = conv(x), ref(x64)
    assert y.shape == y64.shape and y.dtype == torch.float32
    torch.testing.assert_close(y.double(), y64, rtol=1e-5, atol=1e-5)
    dy = torch.randn_like(y)
    grads = torch.autograd.grad(y, [x, *conv.parameters()], dy)
    grads64 = torch.autograd.grad(y64, [x64, *ref.parameters()], dy.double())
    for got, want in zip(grads, grads64):
        torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=grad_atol)
    return y


@needs_onednn
@pytest.mark.parametrize(
    "kwargs",
    [{}, {"stride": 2}, {"dilation": 2, "padding": 2}, {"groups": 4}],
    ids=["3x3x3", "stride2", "dilated", "groups"],
)
def test_single_volume_goes_to_onednn_with_nn_conv3d_results(kwargs):
    conv, x = _conv_case(size=(9, 10, 7), **kwargs)
    assert "aten::mkldnn_convolution" in _ops(lambda: conv(x))
    _matches_nn_conv3d_in_float64(conv, x)


@needs_onednn
@pytest.mark.parametrize("batch", [1, 2])
@pytest.mark.parametrize("size, channels_last", [((9, 10, 7), False), ((9, 10, 7), True), ((32, 32, 16), True), ((40, 32, 32), False)])
def test_pointwise_conv_is_a_product_except_on_large_channels_last_inputs(batch, size, channels_last):
    """1x1x1 convolutions: oneDNN only for channels-last inputs of at least this CPU's
    ``onednn_min_rows`` voxels, else a matrix product; values and gradients as nn.Conv3d's in
    float64, output in the input's layout."""
    conv, x = _conv_case(batch=batch, size=size, kernel_size=1, padding=0)
    if channels_last:
        x = x.detach().contiguous(memory_format=torch.channels_last_3d).requires_grad_()
    onednn = channels_last and batch * math.prod(size) >= measured.cpu_thresholds().onednn_min_rows
    ops = _ops(lambda: conv(x))
    assert ("aten::mkldnn_convolution" in ops) == onednn, ops
    assert onednn or {"aten::mm", "aten::addmm", "aten::bmm"} & ops, ops
    y = _matches_nn_conv3d_in_float64(conv, x, grad_atol=2e-3)  # (weight gradients: sums over up to 81920 voxels)
    assert y.is_contiguous(memory_format=torch.channels_last_3d if channels_last else torch.contiguous_format)


@pytest.mark.parametrize(
    "batch, dtype, padding_mode",
    [(2, torch.float32, "zeros"), (1, torch.float64, "zeros"), (1, torch.float32, "reflect")],
    ids=["batch2", "float64", "reflect"],
)
def test_other_inputs_take_nn_conv3d(batch, dtype, padding_mode, monkeypatch):
    """A batch of several volumes, float64 or another padding mode: nn.Conv3d's own forward."""
    conv, x = _conv_case(batch=batch, padding_mode=padding_mode)
    conv.to(dtype)
    x = x.detach().to(dtype)
    calls = []
    monkeypatch.setattr("attention_gates.cpu.conv", lambda *a, **k: calls.append(1))
    monkeypatch.setattr("attention_gates.cpu.conv1x1", lambda *a, **k: calls.append(1))
    torch.testing.assert_close(conv(x), nn.Conv3d._conv_forward(conv, x, conv.weight, conv.bias))
    assert not calls


@needs_onednn
def test_the_onednn_flag_turns_it_off():
    conv, x = _conv_case()
    with torch.backends.mkldnn.flags(enabled=False):
        assert "aten::mkldnn_convolution" not in _ops(lambda: conv(x))


def test_compile_flop_counter_and_export_see_aten_convolution():
    from torch.utils.flop_counter import FlopCounterMode

    conv, x = _conv_case()
    counter = FlopCounterMode(display=False)
    with counter:
        conv(x)
    assert counter.get_total_flops() == 2 * x[0, 0].numel() * 8 * 16 * 27
    graph = torch.export.export(conv, (x.detach(),)).graph_module.code
    assert "aten.conv3d" in graph and "mkldnn" not in graph
    with torch.no_grad():
        torch.testing.assert_close(torch.compile(conv, fullgraph=True, backend="aot_eager")(x), conv(x))


# ---------------------------------------------------------------------------------------------
# FusedConv: convolution + batch norm + ReLU
# ---------------------------------------------------------------------------------------------

needs_fused_ops = pytest.mark.skipif(not onednn.fused_ops_available(), reason="this torch build has no oneDNN fused convolution")


def _conv_norm_relu(dims, c_in=6, c_out=8, norm="batch", relu=True, **conv_kwargs):
    """``Sequential(conv, norm, ReLU)`` (``norm``: "batch", "none" (an Identity), "instance"), random
    parameters and statistics, eval mode."""
    Conv = (nn.Conv2d, nn.Conv3d)[dims - 2]
    Norm = {"batch": (nn.BatchNorm2d, nn.BatchNorm3d)[dims - 2], "instance": (nn.InstanceNorm2d, nn.InstanceNorm3d)[dims - 2]}
    layers = [Conv(c_in, c_out, **{"kernel_size": 3, "padding": 1, **conv_kwargs})]
    layers.append(nn.Identity() if norm == "none" else Norm[norm](c_out, affine=True))
    if relu:
        layers.append(nn.ReLU(inplace=True))
    return randomise(nn.Sequential(*layers)).eval()


def _in_float64(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return copy.deepcopy(model).double()(x.double())


@pytest.mark.parametrize("channels_last", [False, True], ids=["contiguous", "channels-last"])
@pytest.mark.parametrize("batch", [1, 2])
@pytest.mark.parametrize("dims", [2, 3])
@pytest.mark.parametrize(
    "conv_kwargs",
    [{}, {"stride": 2}, {"kernel_size": 1, "padding": 0}, {"groups": 2, "dilation": 2, "padding": 2}, {"bias": False}],
    ids=["3x3", "stride2", "1x1", "groups-dilated", "no-bias"],
)
@pytest.mark.parametrize("relu_epilogue", [False, True], ids=["relu-after", "relu-epilogue"])
def test_fused_conv_equals_the_plain_eval_layers(conv_kwargs, dims, batch, channels_last, relu_epilogue):
    """conv -> batch norm -> ReLU as one FusedConv: the plain eval layers' values (float64 truth),
    in the input's layout; the norm and the ReLU stay as FusedAway, keeping their state-dict keys."""
    seq = _conv_norm_relu(dims, **conv_kwargs)
    fast = optimize_for_inference(seq, channels_last=channels_last, relu_epilogue=relu_epilogue)
    assert [type(m) for m in fast] == [FusedConv, FusedAway, FusedAway]
    assert list(fast.state_dict()) == list(seq.state_dict())
    x = torch.randn(batch, 6, *(9, 10, 7)[:dims])
    fmt = (torch.channels_last, torch.channels_last_3d)[dims - 2]
    x = x.contiguous(memory_format=fmt) if channels_last else x
    with torch.inference_mode():
        got, want32 = fast(x), seq(x)
    want = _in_float64(seq, x)
    assert got.shape == want.shape and got.dtype == torch.float32
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5 * want.abs().max().item())
    torch.testing.assert_close(got, want32, rtol=1e-4, atol=1e-5 * want.abs().max().item())
    assert got.is_contiguous(memory_format=fmt if channels_last else torch.contiguous_format)


@pytest.mark.parametrize("dims", [2, 3])
@pytest.mark.parametrize("norm, relu", [("batch", False), ("none", True)], ids=["norm-only", "relu-only"])
def test_fused_conv_of_a_norm_alone_or_a_relu_alone(dims, norm, relu):
    seq = _conv_norm_relu(dims, norm=norm, relu=relu)
    fast = optimize_for_inference(seq)
    assert type(fast[0]) is FusedConv and (fast[0].norm is not None) == (norm == "batch") and fast[0].relu is relu
    assert type(fast[1]) is (FusedAway if norm == "batch" else nn.Identity)
    x = torch.randn(1, 6, *(8, 9, 6)[:dims])
    want = _in_float64(seq, x)
    with torch.inference_mode():
        torch.testing.assert_close(fast(x).double(), want, rtol=1e-5, atol=1e-5 * want.abs().max().item())


@needs_fused_ops
@pytest.mark.parametrize("relu_epilogue", [False, True], ids=["relu-after", "relu-epilogue"])
@pytest.mark.parametrize("dims", [2, 3])
def test_fused_conv_is_one_onednn_call_with_a_packed_weight(dims, relu_epilogue):
    """No batch-norm kernel runs, and no ReLU kernel with relu_epilogue (an in-place one without);
    for channels-last inputs the weight is packed once per input shape (oneDNN's own layout,
    outside the state dict), the oldest shape dropped beyond PACKED_SHAPES; a contiguous input
    reads the weight as it is."""
    fast = optimize_for_inference(_conv_norm_relu(dims), relu_epilogue=relu_epilogue)
    conv = fast[0]
    assert conv.relu_epilogue is relu_epilogue
    fmt = (torch.channels_last, torch.channels_last_3d)[dims - 2]
    x = torch.randn(1, 6, *(8, 9, 6)[:dims]).contiguous(memory_format=fmt)
    with torch.inference_mode():
        ops = _ops(lambda: fast(x))
    assert "mkldnn::_convolution_pointwise" in ops, ops
    relus = {"aten::relu", "aten::relu_", "aten::clamp_min_"} & ops
    assert not {"aten::batch_norm", "aten::native_batch_norm"} & ops, ops
    assert not relus if relu_epilogue else "aten::relu_" in relus, ops
    assert list(conv._packed) == [tuple(x.shape)] and conv._packed[tuple(x.shape)].layout == torch._mkldnn
    sizes = [(8 + i, 9, 6)[:dims] for i in range(1, FusedConv.PACKED_SHAPES + 1)]
    for size in sizes:
        xi = torch.randn(1, 6, *size).contiguous(memory_format=fmt)
        with torch.inference_mode():
            torch.testing.assert_close(conv(xi).double(), _in_float64(fast, xi), rtol=1e-5, atol=1e-4)
    assert list(conv._packed) == [(1, 6, *s) for s in sizes]  # the first shape was dropped
    with torch.inference_mode():
        torch.testing.assert_close(conv(x.contiguous()).double(), _in_float64(fast, x), rtol=1e-5, atol=1e-4)
    assert tuple(x.shape) not in conv._packed
    assert all(not k.startswith("_") and "packed" not in k for k in fast.state_dict())


def test_fused_conv_without_the_fused_operators_or_with_onednn_off(monkeypatch):
    """A torch without oneDNN's fused operators (or with oneDNN disabled) gets the plain convolution
    with the folded weights and an in-place ReLU: the same values."""
    seq = _conv_norm_relu(3)
    fast = optimize_for_inference(seq)
    x = torch.randn(1, 6, 8, 9, 6)
    want = _in_float64(seq, x)
    with torch.inference_mode(), torch.backends.mkldnn.flags(enabled=False):
        ops = _ops(lambda: fast(x))
        torch.testing.assert_close(fast(x).double(), want, rtol=1e-5, atol=1e-5 * want.abs().max().item())
    assert "mkldnn::_convolution_pointwise" not in ops and not fast[0]._packed
    monkeypatch.setattr(onednn, "_CONV_POINTWISE", None)
    monkeypatch.setattr(onednn, "_REORDER_WEIGHT", None)
    assert not onednn.fused_ops_available() and onednn.pack_weight(fast[0].fused_weight, x.shape) is None
    with torch.inference_mode():
        ops = _ops(lambda: fast(x))
        torch.testing.assert_close(fast(x).double(), want, rtol=1e-5, atol=1e-5 * want.abs().max().item())
    assert "mkldnn::_convolution_pointwise" not in ops and not fast[0]._packed


@pytest.mark.parametrize("kernel_size", [1, 3])
def test_fused_conv_keeps_nan_local(kernel_size):
    """A NaN voxel reaches only the outputs whose kernel covers it, as in the layers as built."""
    seq = _conv_norm_relu(3, kernel_size=kernel_size, padding=kernel_size // 2)
    fast = optimize_for_inference(seq)
    x = torch.randn(1, 6, 9, 10, 7).contiguous(memory_format=torch.channels_last_3d)
    x[0, 3, 4, 5, 2] = float("nan")
    with torch.inference_mode():
        got, want = fast(x), seq(x)
    assert_close_nonfinite(got, want, rtol=1e-4, atol=1e-4, what="fused conv")
    assert (~torch.isfinite(got)).sum() == 8 * kernel_size**3


@needs_fused_ops
def test_relu_epilogue_turns_nan_into_zero():
    """What relu_epilogue's docs say: oneDNN's ReLU gives 0 for a NaN (torch.relu keeps it); the
    finite values are the layers' own. A 1x1 convolution keeps its in-place ReLU and so its NaN."""
    seq = _conv_norm_relu(3)
    fast = optimize_for_inference(seq, relu_epilogue=True)
    x = torch.randn(1, 6, 9, 10, 7).contiguous(memory_format=torch.channels_last_3d)
    x[0, 3, 4, 5, 2] = float("nan")
    with torch.inference_mode():
        got, want = fast(x), seq(x)
    assert want.isnan().sum() == 8 * 27 and not got.isnan().any()
    assert (got[want.isnan()] == 0).all()
    torch.testing.assert_close(got[~want.isnan()], want[~want.isnan()], rtol=1e-4, atol=1e-4)
    one = optimize_for_inference(_conv_norm_relu(3, kernel_size=1, padding=0), relu_epilogue=True)
    with torch.inference_mode():
        assert one(x).isnan().sum() == 8


def test_fused_conv_refuses_training_and_gradients():
    fast = optimize_for_inference(_conv_norm_relu(3))
    x = torch.randn(1, 6, 5, 5, 5, requires_grad=True)
    with pytest.raises(RuntimeError, match="FusedConv has no backward"):
        fast(x)
    fast.train()
    with torch.no_grad(), pytest.raises(RuntimeError, match="FusedConv is for inference"):
        fast(x)


def test_fused_conv_takes_only_what_it_folds():
    conv = nn.Conv3d(2, 4, 3)
    with pytest.raises(TypeError, match="nn.Conv2d or nn.Conv3d with zero padding"):
        FusedConv(nn.Conv1d(2, 4, 3))
    with pytest.raises(TypeError, match="zero padding"):
        FusedConv(nn.Conv3d(2, 4, 3, padding=1, padding_mode="reflect"))
    for norm in (nn.BatchNorm3d(4), nn.BatchNorm3d(5).eval(), nn.BatchNorm2d(4).eval(), nn.BatchNorm3d(4, track_running_stats=False).eval()):
        with pytest.raises(ValueError, match="folds a BatchNorm3d of 4 channels with running statistics"):
            FusedConv(conv, norm)


@pytest.mark.parametrize("dims", [2, 3])
def test_networks_with_instance_norm_keep_their_norms(dims):
    """Instance norm has no evaluation-mode affine form: nothing folds; the ReLU after it stays too."""
    net = randomise((AttentionUNet2D, AttentionUNet3D)[dims - 2](filters=[4, 8, 16], norm="instance")).eval()
    fast = optimize_for_inference(net)
    assert not any(isinstance(m, (FusedConv, FusedAway)) for m in fast.modules())
    x = torch.randn(2, 1, *(20, 24, 16)[:dims])
    with torch.inference_mode():
        want, got = net(x), fast(x)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4 * want.abs().max().item())


@pytest.mark.parametrize("norm", ["batch", "none"])
@pytest.mark.parametrize("batch", [1, 2])
@pytest.mark.parametrize("dims", [2, 3])
def test_fused_networks_compute_the_original(dims, batch, norm):
    """Every conv block and the gating signal fused (the gates' own layers left to the fold);
    channels-last and contiguous inputs alike."""
    net = randomise((AttentionUNet2D, AttentionUNet3D)[dims - 2](filters=[4, 8, 16, 32], norm=norm)).eval()
    fast = optimize_for_inference(net)
    fused = [m for m in fast.modules() if isinstance(m, FusedConv)]
    assert len(fused) == 2 * (4 + 3) + 1 and all(m.relu and (m.norm is not None) == (norm == "batch") for m in fused)
    assert not any(isinstance(m, (FusedConv, FusedAway)) for m in fast.gates.modules())
    x = torch.randn(batch, 1, *(20, 24, 16)[:dims])
    fmt = (torch.channels_last, torch.channels_last_3d)[dims - 2]
    with torch.inference_mode():
        want = net(x)
        for xx in (x, x.contiguous(memory_format=fmt)):
            torch.testing.assert_close(fast(xx), want, rtol=1e-4, atol=1e-4 * want.abs().max().item())


def test_fusion_finds_every_run_of_a_sequential_and_copies():
    """Runs anywhere in a Sequential (one ReLU module used twice, identities between), nothing else
    touched; a deep copy of a used model drops its packed weights and computes the same."""
    relu = nn.ReLU()
    seq = randomise(nn.Sequential(
        nn.Conv3d(2, 4, 3, padding=1), nn.BatchNorm3d(4), relu, nn.MaxPool3d(2),
        nn.Conv3d(4, 4, 3, padding=1), nn.Identity(), nn.BatchNorm3d(4), nn.Identity(), relu,
        nn.Conv3d(4, 3, 1), nn.Sigmoid(),
    )).eval()  # fmt: skip
    fast = optimize_for_inference(seq)
    assert [type(m).__name__ for m in fast] == [
        "FusedConv", "FusedAway", "FusedAway", "MaxPool3d", "FusedConv", "Identity", "FusedAway", "Identity", "FusedAway",
        "OneDNNConv3d", "Sigmoid",
    ]  # fmt: skip
    assert type(seq[0]) is nn.Conv3d and seq[2] is seq[8]  # the original is untouched
    fast.load_state_dict(seq.state_dict())
    x = torch.randn(1, 2, 10, 8, 6).contiguous(memory_format=torch.channels_last_3d)  # channels-last: packed weights
    want = _in_float64(seq, x)
    with torch.inference_mode():
        torch.testing.assert_close(fast(x).double(), want, rtol=1e-5, atol=1e-5)
        again = copy.deepcopy(fast)
        assert fast[0]._packed or not onednn.fused_ops_available()
        assert not again[0]._packed
        torch.testing.assert_close(again(x).double(), want, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# the transformed model under tracing and export
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dims", [2, 3])
def test_transformed_network_traces_and_exports(dims, tmp_path):
    """attention_gates.deploy's TorchScript, torch.export and ONNX exports of the transformed network
    (dynamic sizes) record standard operators (the folded convolution weights, the gated blocks as
    built; no oneDNN-private op, no packed weight), and equal eager at the export's and two other
    sizes, odd ones included; the eager transformed model equals the original."""
    net = randomise((AttentionUNet2D, AttentionUNet3D)[dims - 2](filters=[4, 8, 16])).eval()
    fast = optimize_for_inference(net)
    x = torch.randn(2, 1, *(32, 16, 16)[:dims])  # export fixes a batch of 1 in the graph
    others = [torch.randn(3, 1, *(24, 21, 19)[:dims]), torch.randn(1, 1, *(17, 33, 16)[:dims])]
    with torch.inference_mode():
        for xx in [x, *others]:
            want = net(xx)
            torch.testing.assert_close(fast(xx), want, rtol=1e-4, atol=1e-4 * want.abs().max().item())
    script = deploy.export_torchscript(fast, x, tmp_path / "fast.ts")
    program = deploy.export_program(fast, x, tmp_path / "fast.pt2")
    onnx_path = deploy.export_onnx(fast, x, tmp_path / "fast.onnx")
    assert "mkldnn" not in str(torch.jit.load(str(script)).inlined_graph)
    assert "mkldnn" not in torch.export.load(str(program)).graph_module.code
    assert "mkldnn" not in onnx_path.read_bytes().decode("latin-1")
    calls = [x, *others]  # each check raises ExportCheckError beyond its tolerance (1e-4 of the largest output)
    for check, path in ((deploy.check_torchscript, script), (deploy.check_program, program), (deploy.check_onnx, onnx_path)):
        assert check(path, fast, calls) >= 0


# ---------------------------------------------------------------------------------------------
# FoldedMultiAttentionGate
# ---------------------------------------------------------------------------------------------


def _unfolded(block, x, g):
    """The block computed head by head on the reference, then concatenated and combined."""
    outs, alphas = [], []
    for gate in block.gates:
        if isinstance(gate.W[1], nn.Identity):
            args, kw = [
                gate.theta.weight, gate.phi.weight, gate.phi.bias, gate.psi.weight, gate.psi.bias, gate.W[0].weight, gate.W[0].bias,
            ], {"norm": "none"}  # fmt: skip
        else:
            args, kw = functional_args(gate), {}
        out, alpha = reference(x, g, *args, **kw, sigma1=gate.sigma1, sigma2=gate.sigma2, align_corners=gate.align_corners)
        outs.append(out)
        alphas.append(alpha)
    return block.combine(torch.cat(outs, dim=1)), torch.cat(alphas, dim=1)


def _folded(block):
    return FoldedMultiAttentionGate.fold(copy.deepcopy(block))


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("norm", ["batch", "none"])
@pytest.mark.parametrize("dims, heads", [(3, 2), (2, 1), (2, 3)])
def test_folded_block_equals_head_by_head(dims, heads, norm, channels_last):
    """In float32 CPU inference the block is relu(c + sum_i alpha_i * (A_i x)): one product over x."""
    block = randomise(MultiAttentionGate(dims, 8, 12, inter_channels=6, heads=heads, norm=norm)).eval()
    x, g = inputs(d=dims, c_l=8, c_g=12, size=(12, 10, 6), g_size=(6, 5, 3))
    x, g = x.float(), g.float()
    if channels_last:
        fmt = torch.channels_last if dims == 2 else torch.channels_last_3d
        x, g = x.contiguous(memory_format=fmt), g.contiguous(memory_format=fmt)
    folded = _folded(block)
    with torch.no_grad():
        want32 = _unfolded(block, x, g)
        truth = _unfolded(copy.deepcopy(block).double(), x.double(), g.double())
        out, alpha = folded(x, g)
    assert folded.A.shape == (heads * 8, 8) and folded.c.shape == (8,)
    # exact algebra: the folded computation in float64 equals the head-by-head one to rounding
    block64 = copy.deepcopy(block).double()
    heads_params = [GateWeights(gt.theta.weight, gt.phi.weight, gt.phi.bias, gt.psi.weight, gt.psi.bias) for gt in block64.gates]
    with torch.no_grad():
        out64, _ = multi_gate_inference_cpu(x.double(), g.double(), heads_params, *block64.folded_output_map())
    assert (out64 - truth[0]).abs().max().item() <= 1e-12 * truth[0].abs().max().item()
    # float32: each entry of A is a sum of products of three float32 factors (combine's conv, W's
    # conv, the norms' scales) that may cancel, so the fold's rounding is tens of float32 ulps of
    # the output here, against a few for the head-by-head computation; 1e-5 relative catches any
    # wrong term (those are O(1))
    scale = truth[0].abs().max().item()
    assert (out.double() - truth[0]).abs().max().item() <= 1e-5 * scale
    assert (want32[0].double() - truth[0]).abs().max().item() <= 1e-5 * scale
    assert (alpha.double() - truth[1]).abs().max().item() <= 1e-6
    assert out.stride() == x.stride()  # x's layout


def test_folded_output_has_x_strides_for_one_channels_last_sample():
    """With N = 1 a layout inferred from sliced operands can put the batch stride anywhere (still
    'channels-last'), and torch.cat then takes a slow copy: the output takes x's strides."""
    folded = _folded(MultiAttentionGate(3, 8, 12, inter_channels=6).eval())
    x = torch.randn(1, 8, 8, 8, 8).contiguous(memory_format=torch.channels_last_3d)
    g = torch.randn(1, 12, 4, 4, 4).contiguous(memory_format=torch.channels_last_3d)
    with torch.no_grad():
        out, _ = folded(x, g)
    assert out.stride() == x.stride() == (8**4, 1, 8 * 8 * 8, 8 * 8, 8)


@pytest.mark.parametrize(
    "kwargs, g_size",
    [
        ({"sigma1": "softplus"}, (4, 5, 3)),
        ({"subsample_factor": (2, 2, 1)}, (4, 5, 6)),
        ({"align_corners": True}, (3, 4, 2)),  # g on another grid than theta's: phi(g) resampled
        ({"heads": 3, "inter_channels": 5}, (4, 5, 3)),
    ],
    ids=["softplus", "factor221", "align_corners-g-resized", "3heads-Fint5"],
)
def test_folded_block_variants(kwargs, g_size):
    block = randomise(MultiAttentionGate(3, 8, 12, **{"inter_channels": 6, **kwargs})).eval()
    gen = torch.Generator().manual_seed(3)
    x, g = torch.randn(2, 8, 9, 10, 6, generator=gen), torch.randn(2, 12, *g_size, generator=gen)
    with torch.no_grad():
        out, alpha = _folded(block)(x, g)
        truth = _unfolded(copy.deepcopy(block).double(), x.double(), g.double())
    assert (out.double() - truth[0]).abs().max().item() <= 1e-5 * truth[0].abs().max().item()
    assert (alpha.double() - truth[1]).abs().max().item() <= 1e-6


def test_blocks_without_an_affine_output_side_are_not_folded():
    for block in (
        MultiAttentionGate(3, 8, 12, inter_channels=6, norm="instance").eval(),
        MultiAttentionGate(3, 8, 12, inter_channels=6).train(),  # batch statistics
        MultiAttentionGate(3, 8, 12, inter_channels=6, output_transform=False).eval(),
        MultiAttentionGate(3, 8, 12, inter_channels=6, sigma2="softmax").eval(),
    ):
        assert FoldedMultiAttentionGate.fold(block) is None and type(block) is MultiAttentionGate


def test_folded_block_refuses_training_gradients_and_other_tensors():
    folded = _folded(MultiAttentionGate(3, 8, 12, inter_channels=6).eval())
    x, g = torch.randn(1, 8, 8, 8, 8), torch.randn(1, 12, 4, 4, 4)
    with pytest.raises(RuntimeError, match="has no backward"):
        folded(x.requires_grad_(), g)
    x = x.detach()
    with torch.no_grad():
        with pytest.raises(TypeError, match=r"runs float32 tensors, got x of dtype torch.float64"):
            folded(x.double(), g.double())
        with pytest.raises(TypeError, match=r"runs float32 tensors, got g of dtype torch.float16"):
            folded(x, g.half())
        with pytest.raises(ValueError, match=r"runs CPU tensors, got x on meta"):
            folded(x.to("meta"), g)
        folded.train()
        with pytest.raises(RuntimeError, match="is for inference"):
            folded(x, g)


# ---------------------------------------------------------------------------------------------
# optimize_for_inference
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "options",
    [{}, {"fold": False}, {"channels_last": False}, {"onednn": False}, {"fuse": False}],
    ids=["all", "no-fold", "contiguous", "no-onednn", "no-fuse"],
)
def test_transformed_network_computes_the_original(options):
    torch.manual_seed(0)
    net = randomise(AttentionUNet3D(filters=[4, 8, 16, 32])).eval()
    before = copy.deepcopy(net.state_dict())
    fast = optimize_for_inference(net, **options)
    x = torch.randn(1, 1, 20, 24, 16)
    with torch.inference_mode():
        want, got = net(x), fast(x)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4 * want.abs().max().item())
    # the original is untouched: its modules, layout and values
    assert all(torch.equal(v, before[k]) for k, v in net.state_dict().items())
    assert type(net.gates["2"]) is MultiAttentionGate and type(net.encoders[0].conv1[0]) is nn.Conv3d
    assert net.encoders[1].conv1[0].weight.is_contiguous()
    # the copy: what was asked for, the original's state-dict keys, frozen
    assert set(fast.state_dict()) == set(net.state_dict()) and not fast.training
    assert not any(p.requires_grad for p in fast.parameters())
    assert (type(fast.gates["2"]) is FoldedMultiAttentionGate) == options.get("fold", True)
    fuse, onednn = options.get("fuse", True), options.get("onednn", True)
    assert type(fast.encoders[0].conv1[0]) is (FusedConv if fuse else OneDNNConv3d if onednn else nn.Conv3d)
    assert [type(m) for m in fast.encoders[0].conv1] == ([FusedConv, FusedAway, FusedAway] if fuse else [type(fast.encoders[0].conv1[0]), nn.BatchNorm3d, nn.ReLU])
    assert (type(fast.head.convs[0]) is OneDNNConv3d) == onednn  # no norm or ReLU after it: not fused
    assert fast.encoders[1].conv1[0].weight.is_contiguous(memory_format=torch.channels_last_3d) == options.get("channels_last", True)
    # weights of the original load into the transformed model (frozen copy: the fold was made before)
    fast.load_state_dict(net.state_dict())


def test_transform_of_a_non_module_is_an_error():
    with pytest.raises(TypeError, match="model must be a torch.nn.Module, got dict"):
        optimize_for_inference({})


def test_transform_builds_new_modules_and_keeps_shared_ones_shared():
    """The transform installs new modules (OneDNNConv3d, FoldedMultiAttentionGate) in a copy, made
    from the old ones' own parameters; a module reached by two names stays one module (so a shared
    convolution is not fused with the ReLU after one of its uses)."""
    shared = nn.Conv3d(2, 2, 3, padding=1)
    model = nn.Sequential(shared, nn.ReLU(), shared).eval()
    fast = optimize_for_inference(model, channels_last=False)
    assert type(fast[0]) is OneDNNConv3d and fast[0] is fast[2] and type(model[0]) is nn.Conv3d
    assert type(fast[1]) is nn.ReLU
    torch.testing.assert_close(fast[0].weight, model[0].weight)
    x = torch.randn(1, 2, 5, 6, 7)
    with torch.inference_mode():
        torch.testing.assert_close(fast(x), model(x), rtol=1e-5, atol=1e-5)
    assert type(optimize_for_inference(nn.Conv3d(2, 3, 1).eval())) is OneDNNConv3d  # the model itself replaced


# ---------------------------------------------------------------------------------------------
# empty batches and non-finite inputs
# ---------------------------------------------------------------------------------------------


def test_empty_batch_through_the_transformed_network():
    net = randomise(AttentionUNet3D(filters=[4, 8, 16, 32])).eval()
    fast = optimize_for_inference(net)
    x = torch.randn(0, 1, 16, 16, 16)
    with torch.inference_mode():
        got, want = fast(x.contiguous(memory_format=torch.channels_last_3d)), net(x)
    assert got.shape == want.shape == (0, 2, 16, 16, 16)


@pytest.mark.parametrize("dims", [2, 3])
def test_empty_batch_through_a_folded_block(dims):
    block = randomise(MultiAttentionGate(dims, 8, 12, inter_channels=6)).eval()
    x, g = torch.randn(0, 8, *(12, 10, 6)[:dims]), torch.randn(0, 12, *(6, 5, 3)[:dims])
    with torch.no_grad():
        (out, alpha), (want, want_alpha) = _folded(block)(x, g), block(x, g)
    assert out.shape == want.shape and alpha.shape == want_alpha.shape == (0, 2, *x.shape[2:])


@settings(max_examples=12, deadline=None)
@given(data=st.data(), s=gate_shapes(dims=(2, 3), c_l=(2, 6), c_int=(1, 4)), heads=st.integers(1, 3), channels_last=st.booleans())
def test_folded_block_with_nonfinite_inputs_as_head_by_head(data, s, heads, channels_last):
    """NaN and infinity in x or g: the folded block's out and alpha are non-finite exactly where the
    head-by-head computation's are (the resampling reaches only a point's neighbours), and agree elsewhere."""
    block = randomise(MultiAttentionGate(s.d, s.c_l, s.c_g, inter_channels=s.c_int, subsample_factor=s.k, heads=heads)).eval()
    x, g, _ = random_gate(s, dtype=torch.float32)
    spots = data.draw(nonfinite_spots(s))
    x, g = with_nonfinite(x, spots.get("x", [])), with_nonfinite(g, spots.get("g", []))
    if channels_last:
        fmt = torch.channels_last if s.d == 2 else torch.channels_last_3d
        x, g = x.contiguous(memory_format=fmt), g.contiguous(memory_format=fmt)
    with torch.no_grad():
        got = _folded(block)(x, g)
        want = _unfolded(copy.deepcopy(block).double(), x.double(), g.double())
    scale = max([t[torch.isfinite(t)].abs().max().item() for t in want if torch.isfinite(t).any()], default=1.0)
    for a, b, what in zip(got, want, ("out", "alpha")):
        assert_close_nonfinite(a.double(), b, rtol=1e-4, atol=1e-5 * scale, what=what)


@needs_onednn
@pytest.mark.parametrize("kernel_size", [1, 3])
def test_onednn_conv_keeps_nan_local(kernel_size):
    """A NaN voxel reaches only the outputs whose kernel covers it, as in nn.Conv3d."""
    conv, x = _conv_case(size=(9, 10, 7), kernel_size=kernel_size, padding=kernel_size // 2)
    x = x.detach().clone()
    x[0, 3, 4, 5, 2] = float("nan")
    with torch.no_grad():
        got, want = conv(x), nn.Conv3d._conv_forward(conv, x, conv.weight, conv.bias)
    assert_close_nonfinite(got, want, rtol=1e-4, atol=1e-4, what="conv")
    assert (~torch.isfinite(got)).sum() == 8 * kernel_size**3
