"""Conv3d: oneDNN for single CPU volumes, the same results as nn.Conv3d, nn.Conv3d everywhere else."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.profiler import ProfilerActivity, profile

from attention_gates import UNet3D
from attention_gates.gates import Conv3d, conv_nd

needs_onednn = pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="this torch build has no oneDNN")


def _ops(fn) -> set[str]:
    """The aten ops that ``fn()`` ran."""
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    return {e.key for e in prof.key_averages()}


def _case(c_in=16, c_out=8, size=(16, 16, 16), batch=1, **kwargs):
    torch.manual_seed(0)
    conv = Conv3d(c_in, c_out, **{"kernel_size": 3, "padding": 1, **kwargs})
    x = torch.randn(batch, c_in, *size, requires_grad=True)
    return conv, x


def test_conv_nd_3_is_an_nn_conv3d():
    assert conv_nd(3) is Conv3d and issubclass(Conv3d, nn.Conv3d)
    assert set(Conv3d(2, 3, 3).state_dict()) == set(nn.Conv3d(2, 3, 3).state_dict())


@needs_onednn
def test_single_volume_takes_onednn_where_torch_takes_its_slow_loop():
    conv, x = _case()  # 1 * 16 * 16 * 16 = 4096 <= 20480: torch's own rule picks slow_conv3d
    assert "aten::slow_conv3d_forward" in _ops(lambda: F.conv3d(x, conv.weight, conv.bias, padding=1))
    ops = _ops(lambda: conv(x))
    assert "aten::mkldnn_convolution" in ops and "aten::slow_conv3d_forward" not in ops


@needs_onednn
@pytest.mark.parametrize(
    "kwargs",
    [{}, {"stride": 2}, {"kernel_size": 1, "padding": 0, "bias": False}, {"dilation": 2, "padding": 2}, {"groups": 4}],
    ids=["3x3x3", "stride2", "1x1x1-nobias", "dilated", "groups"],
)
def test_forward_and_gradients_match_nn_conv3d(kwargs):
    conv, x = _case(size=(9, 10, 7), **kwargs)
    y = _matches_nn_conv3d_in_float64(conv, x)
    assert y.dtype == torch.float32


def _matches_nn_conv3d_in_float64(conv: Conv3d, x: torch.Tensor, grad_atol: float = 1e-4) -> torch.Tensor:
    """``conv(x)`` with its gradients (input and parameters) against ``nn.Conv3d`` with the same
    parameters in float64; returns ``conv(x)``."""
    ref = nn.Conv3d(
        conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding, conv.dilation, conv.groups, conv.bias is not None
    ).double()
    ref.load_state_dict(conv.state_dict())
    x64 = x.detach().double().requires_grad_()
    y, y64 = conv(x), ref(x64)
    assert y.shape == y64.shape
    torch.testing.assert_close(y.double(), y64, rtol=1e-5, atol=1e-5)
    dy = torch.randn_like(y)
    grads = torch.autograd.grad(y, [x, *conv.parameters()], dy)
    grads64 = torch.autograd.grad(y64, [x64, *ref.parameters()], dy.double())
    for got, want in zip(grads, grads64):
        torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=grad_atol)
    return y


@needs_onednn
@pytest.mark.parametrize("batch", [1, 2])
@pytest.mark.parametrize("size, channels_last, onednn", [((9, 10, 7), False, False), ((9, 10, 7), True, False), ((32, 32, 16), True, True)])
def test_pointwise_conv_is_a_product_except_on_large_channels_last_inputs(batch, size, channels_last, onednn):
    """1x1x1 convolutions: oneDNN only for channels-last inputs of at least 16384 voxels, else a
    matrix product; values and gradients as nn.Conv3d's in float64."""
    conv, x = _case(batch=batch, size=size, kernel_size=1, padding=0)
    if channels_last:
        x = x.detach().contiguous(memory_format=torch.channels_last_3d).requires_grad_()
    ops = _ops(lambda: conv(x))
    assert ("aten::mkldnn_convolution" in ops) == onednn, ops
    assert onednn or {"aten::mm", "aten::addmm", "aten::bmm"} & ops, ops
    y = _matches_nn_conv3d_in_float64(conv, x, grad_atol=1e-3)  # (weight gradients: sums over up to 32768 voxels)
    assert y.is_contiguous(memory_format=torch.channels_last_3d if channels_last else torch.contiguous_format)


@pytest.mark.parametrize(
    "batch, dtype, padding_mode",
    [(2, torch.float32, "zeros"), (1, torch.float64, "zeros"), (1, torch.float32, "reflect")],
    ids=["batch2", "float64", "reflect"],
)
def test_other_inputs_take_nn_conv3d(batch, dtype, padding_mode):
    conv, x = _case(batch=batch, padding_mode=padding_mode)
    conv.to(dtype)
    x = x.detach().to(dtype)
    ops = _ops(lambda: conv(x))
    assert "aten::mkldnn_convolution" not in ops or batch > 1  # batch 2: torch itself picks oneDNN
    torch.testing.assert_close(conv(x), nn.Conv3d._conv_forward(conv, x, conv.weight, conv.bias))


@needs_onednn
def test_the_onednn_flag_turns_it_off():
    conv, x = _case()
    with torch.backends.mkldnn.flags(enabled=False):
        assert "aten::mkldnn_convolution" not in _ops(lambda: conv(x))


def test_unet3d_uses_it_and_compiles():
    net = UNet3D(1, 2, feature_scale=16).eval()
    convs = [m for m in net.modules() if isinstance(m, nn.Conv3d)]
    assert convs and all(type(m) is Conv3d for m in convs)
    x = torch.randn(1, 1, 16, 16, 16)
    with torch.no_grad():
        want = net(x)
        got = torch.compile(net, fullgraph=True, backend="aot_eager")(x)
    torch.testing.assert_close(got, want)


def test_flop_counter_and_export_see_aten_convolution():
    from torch.utils.flop_counter import FlopCounterMode

    conv, x = _case()
    counter = FlopCounterMode(display=False)
    with counter:
        conv(x)
    assert counter.get_total_flops() == 2 * x[0, 0].numel() * 8 * 16 * 27
    graph = torch.export.export(conv, (x.detach(),)).graph_module.code
    assert "aten.conv3d" in graph and "mkldnn" not in graph
