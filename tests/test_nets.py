"""UNet and AttentionUNet: sizes, shapes, options, errors, autocast, torch.compile and torch.export."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import attention_gates
from attention_gates import (
    AttentionUNet,
    AttentionUNet2D,
    AttentionUNet3D,
    DeepSupervisionHead,
    GridAttentionGate,
    MultiAttentionGate,
    UNet,
    UNet2D,
    UNet3D,
    deep_supervision_weights,
)

SMALL = (4, 8, 16, 32)  # depth 4: skips 1..3, gated by default at levels 2 and 3


def n_params(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


def image(*shape, seed=0, dtype=torch.float32):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


# ---------------------------------------------------------------------------------------------
# the paper's model
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "make,params,entries",
    [
        (lambda: AttentionUNet3D(1, 2), 6_472_784, 236),
        (lambda: UNet3D(1, 2), 5_887_466, 136),
        (lambda: AttentionUNet3D(heads=1), 6_213_613, 200),
    ],
)
def test_parameter_and_state_dict_counts(make, params, entries):
    net = make()
    assert n_params(net) == params
    assert len(net.state_dict()) == entries


def test_paper_model_layout():
    net = AttentionUNet3D()
    assert net.filters == (16, 32, 64, 128, 256) and net.depth == 5
    assert net.attention_levels == (2, 3, 4) and net.heads == 2
    assert list(net.gates) == ["2", "3", "4"]
    for lv, block in net.gates.items():
        c, cg = net.filters[int(lv) - 1], net.filters[int(lv)]
        assert isinstance(block, MultiAttentionGate) and len(block.gates) == 2
        gate = block.gates[0]
        assert (gate.in_channels, gate.gating_channels, gate.inter_channels) == (c, cg, c)
    assert net.gating.conv1[0].weight.shape == (256, 256, 1, 1, 1)
    assert net.head.fuse.weight.shape == (2, 8, 1, 1, 1)


# ---------------------------------------------------------------------------------------------
# forward and backward
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "make,shape",
    [
        (lambda: AttentionUNet2D(1, 3, SMALL), (2, 1, 13, 11)),
        (lambda: UNet2D(2, 3, (4, 8, 16)), (2, 2, 9, 14)),
        (lambda: AttentionUNet3D(2, 2, (4, 8, 16), heads=1), (1, 2, 9, 6, 7)),
        (lambda: AttentionUNet(1, 1, 2, (4, 8, 16)), (2, 1, 19)),
    ],
)
def test_forward_backward_odd_sizes(make, shape):
    net = make()
    x = image(*shape)
    out = net(x)
    assert out.shape == (shape[0], net.out_channels) + shape[2:]
    (out.square().mean()).backward()
    for name, p in net.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        if name.endswith("weight"):  # (a conv bias followed by batch norm in training has zero gradient)
            assert p.grad.abs().sum() > 0, name


def test_padding_replicates_edges():
    # an odd-sized input gives the crop of the network's output on the edge-replicated input
    net = AttentionUNet2D(1, 2, SMALL).eval()
    x = image(1, 1, 13, 11)
    padded = F.pad(x, (0, 5, 0, 3), mode="replicate")  # to 16 x 16, a multiple of 2^(depth - 1)
    with torch.no_grad():
        out, att = net(x, return_attention=True)
        out_p, att_p = net(padded, return_attention=True)
    torch.testing.assert_close(out, out_p[..., :13, :11])
    torch.testing.assert_close(att[0], att_p[0][..., :7, :6])


@pytest.mark.parametrize("heads", [1, 2])
def test_return_attention_shapes(heads):
    net = AttentionUNet2D(1, 2, SMALL, heads=heads)
    logits, att = net(image(2, 1, 13, 11), return_attention=True)
    assert logits.shape == (2, 2, 13, 11)
    assert [tuple(a.shape) for a in att] == [(2, heads, 7, 6), (2, heads, 4, 3)]  # levels 2 and 3
    assert all(((a > 0) & (a < 1)).all() for a in att)


def test_unet_has_no_attention():
    net = UNet2D(1, 2, SMALL)
    logits, att = net(image(2, 1, 8, 8), return_attention=True)
    assert att == () and not hasattr(net, "gating") and not hasattr(net, "gates")
    assert logits.shape == (2, 2, 8, 8)
    skip, below = image(1, 4, 8, 8), image(1, 8, 4, 4, seed=1)
    assert net.skip_connection(1, skip, below) == (skip, None)  # the decoder's hook: the skip unchanged


def test_skip_connection_is_the_decoder_hook():
    """A subclass that overrides the hook changes what every decoder step takes from its skip."""

    class ZeroSkips(UNet):
        def skip_connection(self, level, skip, below):
            seen.append((level, tuple(skip.shape), tuple(below.shape)))
            return torch.zeros_like(skip), None

    seen = []
    torch.manual_seed(0)
    plain = UNet(2, 1, 2, (4, 8, 16)).eval()
    zeroed = ZeroSkips(2, 1, 2, (4, 8, 16)).eval()
    zeroed.load_state_dict(plain.state_dict())
    x = image(1, 1, 8, 8)
    with torch.no_grad():
        out = zeroed(x)
        assert not torch.allclose(out, plain(x))
    assert seen == [(2, (1, 8, 4, 4), (1, 16, 2, 2)), (1, (1, 4, 8, 8), (1, 8, 4, 4))]  # deepest first


def test_attention_skip_connection_gates_only_its_levels():
    net = AttentionUNet2D(1, 2, SMALL, attention_levels=(2,)).eval()
    skip, below = image(1, 8, 8, 8), image(1, 16, 4, 4, seed=1)
    with torch.no_grad():
        gated, alpha = net.skip_connection(2, skip, below)
        want, want_alpha = net.gates["2"](skip, below)
    torch.testing.assert_close(gated, want)
    torch.testing.assert_close(alpha, want_alpha)
    assert net.skip_connection(1, image(1, 4, 16, 16), skip)[1] is None  # level 1: not gated


# ---------------------------------------------------------------------------------------------
# options
# ---------------------------------------------------------------------------------------------


def test_deep_supervision_modes():
    x = image(2, 1, 13, 11)
    fused = AttentionUNet2D(1, 2, SMALL, deep_supervision="fused")
    assert len(fused.head.convs) == 3 and fused.head.fuse.weight.shape == (2, 6, 1, 1)
    assert fused(x).shape == (2, 2, 13, 11)

    per_scale = AttentionUNet2D(1, 2, SMALL, deep_supervision="per_scale")
    assert per_scale.head.fuse is None
    outs = per_scale.train()(x)
    assert isinstance(outs, list)
    assert [tuple(o.shape) for o in outs] == [(2, 2, 13, 11), (2, 2, 7, 6), (2, 2, 4, 3)]
    assert per_scale.eval()(x).shape == (2, 2, 13, 11)

    none = AttentionUNet2D(1, 2, SMALL, deep_supervision="none")
    assert len(none.head.convs) == 1 and none.head.fuse is None
    assert none(x).shape == (2, 2, 13, 11)
    assert n_params(none) == n_params(fused) - sum(n_params(m) for m in list(fused.head.convs)[1:]) - n_params(fused.head.fuse)


def test_per_scale_eval_is_the_full_resolution_logits():
    net = AttentionUNet2D(1, 2, SMALL, deep_supervision="per_scale").eval()
    features = []
    net.decoders[0].register_forward_hook(lambda m, i, o: features.append(o))
    out = net(image(1, 1, 16, 16))
    torch.testing.assert_close(out, net.head.convs[0](features[0]))


def test_deep_supervision_weights():
    assert deep_supervision_weights(1) == [1.0]
    w = deep_supervision_weights(4)
    assert math.isclose(sum(w), 1.0)
    assert all(math.isclose(a / b, 2.0) for a, b in zip(w, w[1:]))
    assert math.isclose(w[0], 8 / 15)


@pytest.mark.parametrize(
    "levels,keys,gating",
    [((1,), ["1"], False), ((3, 1), ["1", "3"], True), ((1, 2, 3), ["1", "2", "3"], True), ((), [], False)],
)
def test_attention_levels(levels, keys, gating):
    net = AttentionUNet2D(1, 2, SMALL, attention_levels=levels)
    assert list(net.gates) == keys and net.attention_levels == tuple(sorted(levels))
    assert (net.gating is not None) == gating
    logits, att = net(image(1, 1, 12, 10), return_attention=True)
    assert [a.shape[2:] for a in att] == [(math.ceil(12 / 2 ** (lv - 1)), math.ceil(10 / 2 ** (lv - 1))) for lv in sorted(levels)]


def test_deepest_skip_is_gated_by_the_gating_signal():
    net = AttentionUNet2D(1, 2, SMALL).eval()
    seen = {}
    net.gating.register_forward_hook(lambda m, i, o: seen.__setitem__("gating", o))
    net.decoders[2].register_forward_hook(lambda m, i, o: seen.__setitem__("level3", o))
    for lv in ("2", "3"):
        net.gates[lv].register_forward_hook(lambda m, i, o, lv=lv: seen.__setitem__(lv, i[1]))
    net(image(1, 1, 16, 16))
    assert seen["3"] is seen["gating"]  # level 3 = depth - 1: the gating signal
    assert seen["2"] is seen["level3"]  # level 2: the decoder output below it


@pytest.mark.parametrize(
    "levels,match",
    [((0,), r"attention_levels must be distinct ints in 1\.\.3 \(the skips\), got \(0,\)"),
     ((4,), r"in 1\.\.3 .*got \(4,\)"),
     ((2, 2), r"distinct .*got \(2, 2\)"),
     (("2",), r"got \('2',\)")],
)  # fmt: skip
def test_attention_levels_errors(levels, match):
    with pytest.raises(ValueError, match=match):
        AttentionUNet2D(1, 2, SMALL, attention_levels=levels)


def test_feature_scale_and_filters():
    assert UNet3D(feature_scale=8).filters == (8, 16, 32, 64, 128)
    assert UNet3D(feature_scale=1).filters == (64, 128, 256, 512, 1024)
    assert AttentionUNet2D(filters=[3, 5]).filters == (3, 5)
    net = AttentionUNet2D(1, 2, (6, 10, 14))
    assert net.encoders[2].conv2[0].weight.shape == (14, 14, 3, 3)
    assert net.decoders[1].conv.conv1[0].weight.shape == (10, 10 + 14, 3, 3)


@pytest.mark.parametrize(
    "kw,match",
    [
        (dict(filters=(4, 8), feature_scale=2), r"give filters or feature_scale, not both"),
        (dict(feature_scale=3), r"feature_scale must be a positive int dividing .*got 3"),
        (dict(feature_scale=0), r"feature_scale must be a positive int .*got 0"),
        (dict(filters=(4,)), r"filters must be at least 2 positive ints .*got \(4,\)"),
        (dict(filters=(4, 0)), r"filters must be at least 2 positive ints .*got \(4, 0\)"),
        (dict(in_channels=0), r"in_channels must be a positive int, got 0"),
        (dict(out_channels=1.5), r"out_channels must be a positive int, got 1\.5"),
        (dict(deep_supervision="deep"), r"deep_supervision must be one of \('fused', 'per_scale', 'none'\), got 'deep'"),
        (dict(norm="layer"), r"norm must be one of .*got 'layer'"),
        (dict(heads=0), r"heads must be a positive int, got 0"),
        (dict(backend="gpu"), r"backend must be one of .*got 'gpu'"),
        (dict(norm="group", num_groups=0), r"num_groups must be a positive int, got 0"),
        (dict(subsample_factor=(2, 2, 2)), r"subsample_factor must be a positive int or 2 positive ints, got \(2, 2, 2\)"),
    ],
)
def test_constructor_errors(kw, match):
    with pytest.raises(ValueError, match=match):
        AttentionUNet(2, **kw)


def test_deep_supervision_head_error_names_its_own_argument():
    with pytest.raises(ValueError, match=r"^mode must be one of \('fused', 'per_scale', 'none'\), got 'deep'$"):
        DeepSupervisionHead(2, [4, 8], 2, mode="deep")


@pytest.mark.parametrize("norm,cls", [("instance", nn.InstanceNorm2d), ("group", nn.GroupNorm), ("none", nn.Identity)])
def test_norms(norm, cls):
    net = AttentionUNet2D(1, 2, (4, 8, 16), norm=norm, num_groups=2)
    assert isinstance(net.encoders[0].conv1[1], cls)
    assert isinstance(net.gates["2"].gates[0].W[1], cls) and isinstance(net.gates["2"].combine[1], cls)
    if norm == "group":
        assert net.encoders[1].conv1[1].num_groups == 2
    out = net(image(2, 1, 10, 9))
    assert out.shape == (2, 2, 10, 9) and torch.isfinite(out).all()


def test_set_backend():
    net = AttentionUNet2D(1, 2, SMALL)
    assert net.set_backend("reference") is net
    assert {g.backend for b in net.gates.values() for g in b.gates} == {"reference"}
    assert net.backend == "reference" and "backend='reference'" in repr(net)
    net.set_backend(None)
    assert {g.backend for b in net.gates.values() for g in b.gates} == {None}
    assert net.backend is None
    with pytest.raises(ValueError, match=r"backend must be one of .*got 'fast'"):
        net.set_backend("fast")


def test_set_backend_finds_the_gates_by_type():
    class Recorder(nn.Module):  # an extra module of the user's that happens to have a `backend` attribute
        backend = "theirs"

    net = AttentionUNet2D(1, 2, SMALL)
    net.extra = Recorder()
    net.own_gate = GridAttentionGate(2, 4, 8)  # a gate the user added: a GridAttentionGate, so it follows
    net.set_backend("reference")
    assert net.extra.backend == "theirs"
    assert net.own_gate.backend == "reference"
    assert all(g.backend == "reference" for g in net.modules() if isinstance(g, GridAttentionGate))


@pytest.mark.parametrize(
    "x,exc,match",
    [
        ([0.0], TypeError, r"x must be a torch\.Tensor, got list"),
        (torch.zeros(1, 2, 8, 8), ValueError, r"AttentionUNet2D expects Tensor\[N, 1, \*S\] with 2 spatial dims, got \[1, 2, 8, 8\]"),
        (torch.zeros(1, 1, 8, 8, 8), ValueError, r"with 2 spatial dims, got \[1, 1, 8, 8, 8\]"),
        (torch.zeros(1, 1, 8, 8, dtype=torch.long), TypeError, r"x must be a floating-point tensor, got torch\.int64"),
        (
            torch.zeros(1, 1, 8, 8, dtype=torch.float64), TypeError,
            r"x must have the dtype of AttentionUNet2D's weights, torch\.float32, got torch\.float64",
        ),
    ],
)
def test_input_errors(x, exc, match):
    with pytest.raises(exc, match=match):
        AttentionUNet2D(1, 2, SMALL)(x)


def test_repr():
    text = repr(AttentionUNet(3))
    assert text.startswith(
        "AttentionUNet(\n  spatial_dims=3, in_channels=1, out_channels=2, filters=[16, 32, 64, 128, 256], norm='batch', "
        "num_groups=8, deep_supervision='fused', align_corners=False, attention_levels=(2, 3, 4), heads=2, "
        "subsample_factor=(2, 2, 2), sigma1='relu', sigma2='sigmoid', gate_output_transform=True, backend=None\n"
    )
    # a face fixes spatial_dims: its repr leaves it out (its constructor does not take it)
    assert repr(UNet3D(filters=[4, 8])).startswith("UNet3D(\n  in_channels=1, out_channels=2, filters=[4, 8], norm='batch'")


REBUILT = {  # id: a network built with every argument away from its default
    "UNet": lambda: UNet(1, 2, 3, [4, 6], norm="group", num_groups=3, deep_supervision="per_scale", align_corners=True),
    "UNet2D": lambda: UNet2D(2, 1, feature_scale=16, norm="instance", deep_supervision="none"),
    "AttentionUNet": lambda: AttentionUNet(
        2, 1, 3, (4, 8, 16), attention_levels=(1, 2), heads=3, subsample_factor=(2, 1), sigma1="softplus",
        sigma2="softmax", gate_output_transform=False, backend="reference", norm="none",
    ),
    "AttentionUNet3D": lambda: AttentionUNet3D(1, 2, (4, 8, 16), attention_levels=(), norm="group", num_groups=2),
}  # fmt: skip


@pytest.mark.parametrize("make", REBUILT.values(), ids=REBUILT.keys())
def test_repr_builds_the_network_again(make):
    """``eval`` of the class name and ``extra_repr`` gives a network of the same arguments and state."""
    net = make()
    again = eval(f"{type(net).__name__}({net.extra_repr()})", vars(attention_gates))
    assert type(again) is type(net) and again.arguments() == net.arguments()
    assert repr(again) == repr(net)
    assert {k: v.shape for k, v in again.state_dict().items()} == {k: v.shape for k, v in net.state_dict().items()}
    for name, value in net.arguments().items():  # every constructor argument is kept and shown
        assert getattr(net, name) == (tuple(value) if name == "filters" else value)
        assert name == "spatial_dims" or f"{name}={value!r}" in net.extra_repr()


def test_unet_keeps_num_groups_as_given():
    net = UNet2D(filters=[4, 6], norm="group", num_groups=3)
    assert net.num_groups == 3  # the argument; each norm got the largest divisor of its channels up to it
    assert [m.num_groups for m in net.encoders.modules() if isinstance(m, nn.GroupNorm)] == [2, 2, 3, 3]


# ---------------------------------------------------------------------------------------------
# autocast, compile, export
# ---------------------------------------------------------------------------------------------


def test_autocast_bfloat16_cpu():
    torch.manual_seed(0)
    net = AttentionUNet2D(1, 2, SMALL).eval()
    x = image(2, 1, 13, 11)
    with torch.no_grad():
        want = net(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out, att = net(x, return_attention=True)
    assert out.dtype == torch.bfloat16 and out.shape == want.shape
    assert torch.isfinite(out).all() and all(torch.isfinite(a).all() for a in att)
    torch.testing.assert_close(out.float(), want, rtol=0.1, atol=0.1 * want.abs().max().item())


def test_compile_fullgraph_training_step():
    # dynamo traces the whole network (gates, dispatch, running statistics) without a graph break;
    # aot_eager keeps it fast on CI: the slow test below runs the default (inductor) backend
    torch.manual_seed(0)
    net = AttentionUNet2D(1, 2, (4, 8, 16)).set_backend("reference").train()
    eager = copy.deepcopy(net)
    x = image(2, 1, 13, 11)
    out, att = torch.compile(net, fullgraph=True, backend="aot_eager")(x, return_attention=True)
    want, want_att = eager(x, return_attention=True)
    torch.testing.assert_close(out, want)
    torch.testing.assert_close(att[0], want_att[0])
    out.sum().backward()
    want.sum().backward()
    torch.testing.assert_close(net.gates["2"].gates[0].theta.weight.grad, eager.gates["2"].gates[0].theta.weight.grad)
    bn, bn_eager = net.gates["2"].gates[1].W[1], eager.gates["2"].gates[1].W[1]
    torch.testing.assert_close(bn.running_var, bn_eager.running_var)
    assert bn.num_batches_tracked.item() == bn_eager.num_batches_tracked.item() == 1


@pytest.mark.slow
def test_compile_inductor_fullgraph():  # about 1-3 minutes on 2 CPU cores (C++ code generation)
    torch.manual_seed(0)
    net = AttentionUNet2D(1, 2, (4, 8, 16)).set_backend("reference").eval()
    x = image(2, 1, 13, 11)
    with torch.no_grad():
        out, att = torch.compile(net, fullgraph=True)(x, return_attention=True)
        want, want_att = net(x, return_attention=True)
    torch.testing.assert_close(out, want, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(att[0], want_att[0], rtol=1e-4, atol=1e-5)


def test_export_with_attention():
    torch.manual_seed(0)
    net = AttentionUNet2D(1, 2, (4, 8, 16)).eval()
    x = image(2, 1, 13, 11)
    program = torch.export.export(net, (x,), kwargs={"return_attention": True})
    with torch.no_grad():
        out, att = program.module()(x, return_attention=True)
        want, want_att = net(x, return_attention=True)
    torch.testing.assert_close(out, want)
    assert len(att) == len(want_att) == 1
    torch.testing.assert_close(att[0], want_att[0])
    other = image(2, 1, 13, 11, seed=1)  # the program computes, it did not capture the example's values
    with torch.no_grad():
        torch.testing.assert_close(program.module()(other, return_attention=True)[0], net(other))
