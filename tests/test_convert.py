"""Loading the authors' checkpoints: their layout is built here from its description, and run by an
independent forward pass (torch.nn.functional on their key names) that our converted model must match."""

from __future__ import annotations

import functools
import math

import pytest
import torch
import torch.nn.functional as F

from attention_gates import AttentionUNet2D, AttentionUNet3D, UNet3D, load_oktay_state_dict
from attention_gates.convert import IncompatibleKeys, OktayCheckpointError, convert_oktay_state_dict

DT = torch.float64
FILTERS = [16, 32, 64, 128, 256]  # [64, 128, 256, 512, 1024] / feature_scale 4
ENCODERS = ["conv1", "conv2", "conv3", "conv4", "center"]


# ---------------------------------------------------------------------------------------------
# the authors' state dicts, from the layout of unet_CT_{multi_att,single_att,}_dsv_3D
# ---------------------------------------------------------------------------------------------


def their_state_dict(heads: int, in_channels=1, n_classes=2, filters=FILTERS, counters=True):
    """A fresh dict (the tests edit it) of shared random tensors (which they do not edit)."""
    return dict(_their_state_dict(heads, in_channels, n_classes, tuple(filters), counters))


@functools.lru_cache(maxsize=None)
def _their_state_dict(heads, in_channels, n_classes, filters, counters):
    gen = torch.Generator().manual_seed(heads)
    sd = {}

    def conv(name, cout, cin, k, bias=True):
        sd[f"{name}.weight"] = torch.randn(cout, cin, k, k, k, generator=gen, dtype=DT) * math.sqrt(2 / (cin * k**3))
        if bias:
            sd[f"{name}.bias"] = 0.1 * torch.randn(cout, generator=gen, dtype=DT)

    def bn(name, c):
        sd[f"{name}.weight"] = 0.5 + torch.rand(c, generator=gen, dtype=DT)
        sd[f"{name}.bias"] = 0.1 * torch.randn(c, generator=gen, dtype=DT)
        sd[f"{name}.running_mean"] = 0.1 * torch.randn(c, generator=gen, dtype=DT)
        sd[f"{name}.running_var"] = 0.5 + torch.rand(c, generator=gen, dtype=DT)
        if counters:
            sd[f"{name}.num_batches_tracked"] = torch.tensor(1234)

    def unet_conv3(name, cin, cout):
        for i, c in ((1, cin), (2, cout)):
            conv(f"{name}.conv{i}.0", cout, c, 3)
            bn(f"{name}.conv{i}.1", cout)

    f = filters
    for i, name in enumerate(ENCODERS):
        unet_conv3(name, in_channels if i == 0 else f[i - 1], f[i])
    if heads:
        conv("gating.conv1.0", f[4], f[4], 1)
        bn("gating.conv1.1", f[4])
        for k in (2, 3, 4):  # skip of level k: f[k-1] channels, gated by f[k] channels, inter = f[k-1]
            c, cg = f[k - 1], f[k]
            for h in range(1, heads + 1):
                p = f"attentionblock{k}.gate_block_{h}"
                sd[f"{p}.theta.weight"] = torch.randn(c, c, 2, 2, 2, generator=gen, dtype=DT) * math.sqrt(2 / (8 * c))
                conv(f"{p}.phi", c, cg, 1)
                conv(f"{p}.psi", 1, c, 1)
                conv(f"{p}.W.0", c, c, 1)
                bn(f"{p}.W.1", c)
            conv(f"attentionblock{k}.combine_gates.0", c, heads * c, 1)
            bn(f"attentionblock{k}.combine_gates.1", c)
    for k in (4, 3, 2, 1):  # UnetUp3_CT(f[k], f[k-1]): UnetConv3(f[k] + f[k-1] -> f[k-1])
        unet_conv3(f"up_concat{k}.conv", f[k] + f[k - 1], f[k - 1])
    for k in (4, 3, 2):
        conv(f"dsv{k}.dsv.0", n_classes, f[k - 1], 1)
    conv("dsv1", n_classes, f[0], 1)
    conv("final", n_classes, 4 * n_classes, 1)
    return sd


def their_forward(sd, x, heads, align_corners):
    """unet_CT_*_dsv_3D.forward in eval mode, from their key names and torch.nn.functional only."""

    def conv(name, h, padding=0):
        return F.conv3d(h, sd[f"{name}.weight"], sd[f"{name}.bias"], padding=padding)

    def bn(name, h):
        return F.batch_norm(
            h, sd[f"{name}.running_mean"], sd[f"{name}.running_var"], sd[f"{name}.weight"], sd[f"{name}.bias"],
            training=False, eps=1e-5,
        )  # fmt: skip

    def conv_bn_relu(name, h, padding):
        return F.relu(bn(f"{name}.1", conv(f"{name}.0", h, padding)))

    def unet_conv3(name, h):
        return conv_bn_relu(f"{name}.conv2", conv_bn_relu(f"{name}.conv1", h, 1), 1)

    def upsample(h, scale=None, size=None):
        return F.interpolate(h, size=size, scale_factor=scale, mode="trilinear", align_corners=align_corners)

    def grid_attention_block(name, x, g):
        theta = sd[f"{name}.theta.weight"]
        theta_x = F.conv3d(x, theta, stride=theta.shape[2:])
        phi_g = upsample(conv(f"{name}.phi", g), size=theta_x.shape[2:])
        sigm_psi_f = torch.sigmoid(conv(f"{name}.psi", F.relu(theta_x + phi_g)))
        sigm_psi_f = upsample(sigm_psi_f, size=x.shape[2:])
        y = sigm_psi_f.expand_as(x) * x
        return bn(f"{name}.W.1", conv(f"{name}.W.0", y)), sigm_psi_f

    def attention_block(k, x, g):
        gated, att = zip(*(grid_attention_block(f"attentionblock{k}.gate_block_{h}", x, g) for h in range(1, heads + 1)))
        return conv_bn_relu(f"attentionblock{k}.combine_gates", torch.cat(gated, dim=1), 0), torch.cat(att, dim=1)

    def up_concat(k, skip, below):
        return unet_conv3(f"up_concat{k}.conv", torch.cat([skip, upsample(below, scale=2)], dim=1))

    conv1 = unet_conv3("conv1", x)
    conv2 = unet_conv3("conv2", F.max_pool3d(conv1, 2))
    conv3 = unet_conv3("conv3", F.max_pool3d(conv2, 2))
    conv4 = unet_conv3("conv4", F.max_pool3d(conv3, 2))
    center = unet_conv3("center", F.max_pool3d(conv4, 2))
    attention = ()
    if heads:
        gating = conv_bn_relu("gating.conv1", center, 0)
        g_conv4, att4 = attention_block(4, conv4, gating)
        up4 = up_concat(4, g_conv4, center)
        g_conv3, att3 = attention_block(3, conv3, up4)
        up3 = up_concat(3, g_conv3, up4)
        g_conv2, att2 = attention_block(2, conv2, up3)
        up2 = up_concat(2, g_conv2, up3)
        attention = (att2, att3, att4)
    else:
        up4 = up_concat(4, conv4, center)
        up3 = up_concat(3, conv3, up4)
        up2 = up_concat(2, conv2, up3)
    up1 = up_concat(1, conv1, up2)
    dsv4 = upsample(conv("dsv4.dsv.0", up4), scale=8)
    dsv3 = upsample(conv("dsv3.dsv.0", up3), scale=4)
    dsv2 = upsample(conv("dsv2.dsv.0", up2), scale=2)
    dsv1 = conv("dsv1", up1)
    return conv("final", torch.cat([dsv1, dsv2, dsv3, dsv4], dim=1)), attention


def ours(heads, **kw):
    return (AttentionUNet3D(1, 2, heads=heads, **kw) if heads else UNet3D(1, 2, **kw)).to(DT).eval()


ENTRIES = {2: 236, 1: 200, 0: 136}


# ---------------------------------------------------------------------------------------------
# same logits as their forward pass
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "heads,align_corners", [(2, False), (2, True), (1, False), (1, True), (0, False), (0, True)]
)
def test_converted_model_matches_their_forward(heads, align_corners):
    sd = their_state_dict(heads)
    assert len(sd) == ENTRIES[heads]
    model = ours(heads, align_corners=align_corners)
    assert load_oktay_state_dict(model, sd) == IncompatibleKeys([], [])
    x = torch.randn(1, 1, 32, 16, 16, generator=torch.Generator().manual_seed(3), dtype=DT)
    with torch.no_grad():
        want, want_att = their_forward(sd, x, heads, align_corners)
        got, got_att = model(x, return_attention=True)
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9)
    assert len(got_att) == len(want_att)
    for a, b in zip(got_att, want_att):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)
    assert want.abs().max() > 1e-2  # not a trivial (all-zero) network
    if heads == 2:  # the other resampling convention gives other logits: the flag matters
        other = ours(heads, align_corners=not align_corners)
        load_oktay_state_dict(other, sd)
        with torch.no_grad():
            assert not torch.allclose(other(x), want, rtol=1e-3, atol=1e-3)


def test_loads_values_and_counters():
    sd = their_state_dict(2)
    model = ours(2)
    load_oktay_state_dict(model, sd)
    own = model.state_dict()
    assert torch.equal(own["gates.3.gates.1.theta.weight"], sd["attentionblock3.gate_block_2.theta.weight"])
    assert torch.equal(own["head.convs.2.bias"], sd["dsv3.dsv.0.bias"])
    assert torch.equal(own["encoders.4.conv2.1.running_var"], sd["center.conv2.1.running_var"])
    assert own["decoders.0.conv.conv1.1.num_batches_tracked"].item() == 1234


def test_checkpoint_without_batch_counters():  # saved by PyTorch < 0.4.1
    sd = their_state_dict(1, counters=False)
    assert len(sd) == 200 - 25  # 25 batch norms: 10 encoder, 8 decoder, gating, 3 x (gate W + combine)
    model = ours(1)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm3d):
                m.num_batches_tracked.fill_(5)
    assert load_oktay_state_dict(model, sd) == IncompatibleKeys([], [])
    counters = [v for k, v in model.state_dict().items() if k.endswith("num_batches_tracked")]
    assert len(counters) == 200 - len(sd) and all(c.item() == 0 for c in counters)


def test_float32_checkpoint_into_float64_model():
    sd = {k: v.float() if v.is_floating_point() else v for k, v in their_state_dict(0).items()}
    model = ours(0)
    load_oktay_state_dict(model, sd)
    assert model.head.fuse.weight.dtype == DT
    torch.testing.assert_close(model.head.fuse.weight, sd["final.weight"].double())


# ---------------------------------------------------------------------------------------------
# the pure renaming
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("heads", [2, 1, 0])
def test_convert_gives_our_names(heads):
    sd = their_state_dict(heads)
    before = dict(sd)
    converted = convert_oktay_state_dict(sd)
    assert set(converted) == set(ours(heads).state_dict())
    assert sd == before  # input untouched
    assert converted["gating.conv1.0.weight" if heads else "encoders.0.conv1.0.weight"] is (
        sd["gating.conv1.0.weight" if heads else "conv1.conv1.0.weight"]
    )
    assert converted["head.fuse.weight"] is sd["final.weight"]
    assert converted["head.convs.0.bias"] is sd["dsv1.bias"]
    assert converted["decoders.3.conv.conv2.1.running_mean"] is sd["up_concat4.conv.conv2.1.running_mean"]


def test_convert_rejects_foreign_keys():
    sd = their_state_dict(0)
    sd["classifier.weight"] = torch.zeros(2)
    sd["module.conv1.conv1.0.weight"] = torch.zeros(2)
    with pytest.raises(OktayCheckpointError, match=r"keys not of the authors' .*2: \['classifier\.weight', 'module\.conv1"):
        convert_oktay_state_dict(sd)


# ---------------------------------------------------------------------------------------------
# errors
# ---------------------------------------------------------------------------------------------


def test_missing_key():
    sd = their_state_dict(2)
    del sd["attentionblock3.gate_block_2.psi.bias"]
    with pytest.raises(OktayCheckpointError, match=r"missing 1: \['attentionblock3\.gate_block_2\.psi\.bias'\]"):
        load_oktay_state_dict(ours(2), sd)


def test_unexpected_keys():
    sd = their_state_dict(0)
    sd["conv1.conv1.0.extra"] = torch.zeros(1)
    sd["optimizer_step"] = torch.zeros(1)
    with pytest.raises(OktayCheckpointError, match=r"unexpected 2: \['optimizer_step', 'conv1\.conv1\.0\.extra'\]"):
        load_oktay_state_dict(ours(0), sd)


def test_not_strict_skips_and_reports():
    sd = their_state_dict(1)
    del sd["dsv2.dsv.0.weight"]
    sd["optimizer_step"] = torch.zeros(1)
    model = ours(1)
    before = model.head.convs[1].weight.clone()
    result = load_oktay_state_dict(model, sd, strict=False)
    assert result == IncompatibleKeys(["dsv2.dsv.0.weight"], ["optimizer_step"])
    assert torch.equal(model.head.convs[1].weight, before)  # left as it was
    assert torch.equal(model.head.fuse.weight, sd["final.weight"])


@pytest.mark.parametrize("strict", [True, False])
def test_misshaped_key(strict):
    sd = their_state_dict(2)
    sd["attentionblock2.combine_gates.0.weight"] = torch.zeros(32, 32, 1, 1, 1, dtype=DT)  # single-head shape
    with pytest.raises(
        OktayCheckpointError,
        match=r"attentionblock2\.combine_gates\.0\.weight \(our gates\.2\.combine\.0\.weight\) has shape "
        r"\[32, 32, 1, 1, 1\] in the checkpoint, but the model expects \[32, 64, 1, 1, 1\]",
    ):
        load_oktay_state_dict(ours(2), sd, strict=strict)


def test_other_filters_are_described():
    sd = their_state_dict(0, in_channels=2, n_classes=3, filters=[8, 16, 32, 64, 128])
    with pytest.raises(
        OktayCheckpointError,
        match=r"conv1\.conv1\.0\.weight .* the checkpoint has in_channels=2, out_channels=3, filters=\[8, 16, 32, 64, 128\]",
    ):
        load_oktay_state_dict(ours(0), sd)
    model = UNet3D(2, 3, feature_scale=8)
    load_oktay_state_dict(model, sd)


@pytest.mark.parametrize(
    "heads,model,match",
    [
        (2, lambda: AttentionUNet3D(heads=1), r"unet_CT_multi_att_dsv_3D, which loads into AttentionUNet3D\(heads=2\), but the model is AttentionUNet3D with 1 attention head"),
        (1, lambda: AttentionUNet3D(heads=2), r"unet_CT_single_att_dsv_3D, which loads into AttentionUNet3D\(heads=1\), but the model is AttentionUNet3D with 2"),
        (0, lambda: AttentionUNet3D(), r"unet_CT_dsv_3D, which loads into UNet3D, but the model is AttentionUNet3D with 2"),
        (2, lambda: UNet3D(), r"unet_CT_multi_att_dsv_3D.*but the model is UNet3D with 0 attention head"),
        (2, lambda: AttentionUNet3D(deep_supervision="none", norm="instance"), r"the model differs: norm='instance' \(want 'batch'\), deep_supervision='none'"),
        (2, lambda: AttentionUNet3D(attention_levels=(3, 4)), r"the model differs: attention_levels=\(3, 4\)"),
        (1, lambda: AttentionUNet3D(heads=1, gate_output_transform=False), r"the model differs: gate_output_transform=False"),
        (0, lambda: UNet3D(filters=[8, 16, 32]), r"the model differs: 3 levels \(want 5\)"),
        (2, lambda: AttentionUNet2D(), r"the model differs: spatial_dims=2 \(want 3\)"),
    ],
)
def test_variant_or_model_mismatch(heads, model, match):
    with pytest.raises(OktayCheckpointError, match=match):
        load_oktay_state_dict(model(), their_state_dict(heads))


def test_not_a_unet():
    with pytest.raises(TypeError, match=r"model must be a UNet or AttentionUNet, got Linear"):
        load_oktay_state_dict(torch.nn.Linear(2, 2), their_state_dict(0))


def test_not_their_checkpoint():
    with pytest.raises(OktayCheckpointError, match=r"no key of the state dict is of the authors'.*'encoders\.0\.conv1\.0\.weight'"):
        load_oktay_state_dict(UNet3D(), UNet3D().state_dict())


# ---------------------------------------------------------------------------------------------
# what state_dict may be: the dict, or the path of the authors' file (a bare state dict)
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("as_path", [str, lambda p: p], ids=["str", "Path"])
def test_loads_the_authors_file_from_its_path(tmp_path, as_path):
    sd = their_state_dict(0)
    path = tmp_path / "300_net_S.pth"  # their save_network: torch.save(network.cpu().state_dict(), path)
    torch.save(sd, path)
    model = ours(0)
    assert load_oktay_state_dict(model, as_path(path)) == IncompatibleKeys([], [])
    assert torch.equal(model.head.fuse.weight, sd["final.weight"])
    assert set(convert_oktay_state_dict(as_path(path))) == set(model.state_dict())


@pytest.mark.parametrize(
    "state_dict,match",
    [
        ([("conv1.conv1.0.weight", torch.zeros(1))], r"state_dict must be the authors' state dict .* or the path .*got list"),
        (None, r"state_dict must be the authors' state dict .*got NoneType"),
        (3, r"got int"),
        ({"conv1.conv1.0.weight": 1.0, "epoch": 3}, r"state_dict must map names to tensors; got non-tensor entries \['conv1\.conv1\.0\.weight', 'epoch'\]"),
    ],
    ids=["list", "None", "int", "non-tensor values"],
)
def test_other_kinds_of_state_dict_are_a_type_error(state_dict, match):
    with pytest.raises(TypeError, match=match):
        load_oktay_state_dict(ours(0), state_dict)
    with pytest.raises(TypeError, match=match):
        convert_oktay_state_dict(state_dict)


def test_a_file_without_a_dict_is_a_type_error(tmp_path):
    path = tmp_path / "weights.pth"
    torch.save([torch.zeros(1)], path)
    with pytest.raises(TypeError, match=r"the file '.*weights\.pth' must hold the authors' state dict \(a dict\), got list"):
        load_oktay_state_dict(ours(0), path)


def test_a_missing_file_names_it(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothing.pth"):
        load_oktay_state_dict(ours(0), tmp_path / "nothing.pth")
