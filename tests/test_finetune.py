"""Starting an Attention U-Net from a trained U-Net: weight transfer, pass-through gates, freezing."""

import copy
from pathlib import Path

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

from attention_gates import (
    AttentionUNet,
    AttentionUNet2D,
    AttentionUNet3D,
    TransferReport,
    UNet,
    UNet2D,
    UNet3D,
    attention_unet_from_unet,
    checkpoint_config,
    freeze_backbone,
    gate_parameters,
    init_passthrough,
    unfreeze,
)
from attention_gates.ops import use_backend

FILTERS = [4, 8, 16, 32]  # depth 4: levels 2 and 3 gated, level 3 by the gating signal
SHAPES = {2: (2, 1, 20, 24), 3: (2, 1, 8, 12, 10)}  # not multiples of 8: the padding path too


@pytest.fixture(autouse=True)
def _reference_backend():
    # these tests are about the transfer, not the gate kernels: pin the eager implementation
    with use_backend("reference"):
        yield


def trained_unet(dims: int, seed: int = 0, dtype=torch.float32, **kwargs) -> UNet:
    """A U-Net with random weights and random, non-trivial batch-norm statistics, as if trained."""
    torch.manual_seed(seed)
    net = UNet(dims, filters=kwargs.pop("filters", FILTERS), **kwargs).to(dtype)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.3, 0.3)
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
                m.num_batches_tracked.fill_(100)
            elif isinstance(m, (nn.Conv2d, nn.Conv3d)):
                m.bias.uniform_(-0.1, 0.1)
    return net.eval()


def gate_keys(net: nn.Module) -> list[str]:
    return [k for k in net.state_dict() if k.startswith(("gates.", "gating."))]


def backbone_snapshot(net: nn.Module) -> dict:
    return {k: v.clone() for k, v in net.state_dict().items() if not k.startswith(("gates.", "gating."))}


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


# ---------------------------------------------------------------- transfer


@pytest.mark.parametrize("dims", [2, 3])
def test_copies_every_unet_entry_exactly(dims):
    unet = trained_unet(dims)
    net, report = AttentionUNet.from_unet(unet)
    assert type(net) is AttentionUNet and net.spatial_dims == dims
    got = net.state_dict()
    for key, value in unet.state_dict().items():
        assert torch.equal(got[key], value), key
    assert isinstance(report, TransferReport) and not hasattr(net, "transfer_report")  # beside the model, not on it
    assert report.copied == list(unet.state_dict())
    assert report.initialised == gate_keys(net) and report.initialised
    assert report.skipped == []
    # copies, not shared storage: training the new network leaves the U-Net alone
    assert got["encoders.0.conv1.0.weight"].data_ptr() != unet.state_dict()["encoders.0.conv1.0.weight"].data_ptr()


@pytest.mark.parametrize("face, unet_face", [(AttentionUNet2D, UNet2D), (AttentionUNet3D, UNet3D)])
def test_faces_build_their_class(face, unet_face):
    unet = unet_face(in_channels=2, out_channels=3, filters=[4, 8, 16], deep_supervision="per_scale", align_corners=True)
    net, _ = face.from_unet(unet, heads=1)
    assert type(net) is face
    assert (net.in_channels, net.out_channels, net.filters, net.deep_supervision, net.align_corners, net.heads) == (
        2, 3, (4, 8, 16), "per_scale", True, 1,
    )  # fmt: skip


def test_gates_left_as_constructed_without_passthrough():
    unet = trained_unet(2)
    torch.manual_seed(7)
    fresh = AttentionUNet(2, filters=FILTERS)
    torch.manual_seed(7)
    net, _ = attention_unet_from_unet(unet, passthrough=False)
    fresh_state = fresh.state_dict()
    for key in gate_keys(net):
        assert torch.equal(net.state_dict()[key], fresh_state[key]), key
    # and they are not the pass-through values
    assert net.gates["2"].gates[0].psi.weight.abs().sum() > 0


def test_copies_into_a_given_model_and_keeps_its_dtype():
    unet = trained_unet(2, dtype=torch.float64)
    target = AttentionUNet(2, filters=FILTERS, heads=3)
    net, report = attention_unet_from_unet(unet, model=target)
    assert net is target and net.heads == 3
    assert report.copied == list(unet.state_dict()) and report.initialised == gate_keys(target)
    assert next(net.parameters()).dtype == torch.float32
    assert torch.equal(net.encoders[1].conv2[0].weight, unet.encoders[1].conv2[0].weight.float())


def test_built_model_follows_the_source_dtype():
    net, _ = AttentionUNet.from_unet(trained_unet(3, dtype=torch.float64))
    assert {p.dtype for p in net.parameters()} == {torch.float64}


# ---------------------------------------------------------------- pass-through


@pytest.mark.parametrize("dims", [2, 3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_passthrough_reproduces_the_unet(dims, dtype):
    unet = trained_unet(dims, dtype=dtype)
    net = AttentionUNet.from_unet(unet)[0].eval()
    x = torch.randn(SHAPES[dims], dtype=dtype)
    with torch.no_grad():
        expected = unet(x)
        got, alphas = net(x, return_attention=True)
    # measured <= 9e-6 (the factor alpha = sigmoid(12) = 1 - 6.1e-6 on each gated skip)
    assert relative_error(got, expected) <= 2e-5
    assert len(alphas) == 2 and all(a.min() >= 0.99999 for a in alphas)


@pytest.mark.parametrize("dims", [2, 3])
def test_passthrough_is_the_identity_when_alpha_rounds_to_one(dims):
    unet = trained_unet(dims, dtype=torch.float64)
    net = init_passthrough(AttentionUNet.from_unet(unet, passthrough=False)[0], psi_bias=40.0).eval()
    x = torch.randn(SHAPES[dims], dtype=torch.float64)
    with torch.no_grad():
        assert relative_error(net(x), unet(x)) <= 1e-12


@given(
    dims=st.sampled_from([2, 3]),
    depth=st.integers(3, 4),
    heads=st.integers(1, 3),
    deep_supervision=st.sampled_from(["fused", "per_scale", "none"]),
    norm=st.sampled_from(["batch", "none"]),
    gate_output_transform=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_passthrough_reproduces_any_configuration(dims, depth, heads, deep_supervision, norm, gate_output_transform, seed):
    unet = trained_unet(dims, seed, filters=FILTERS[:depth], deep_supervision=deep_supervision, norm=norm)
    net = AttentionUNet.from_unet(unet, heads=heads, gate_output_transform=gate_output_transform)[0].eval()
    x = torch.randn(SHAPES[dims])
    with torch.no_grad():
        assert relative_error(net(x), unet(x)) <= 2e-5


def test_passthrough_holds_in_eval_only():
    unet = trained_unet(2)
    net = freeze_backbone(AttentionUNet.from_unet(unet)[0]).train()
    x = torch.randn(SHAPES[2])
    with torch.no_grad():
        # the backbone runs as in eval, but the gates' batch norms use the batch's statistics
        assert relative_error(net(x), unet(x)) > 1e-3


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"sigma2": "softmax"}, "sigma2='sigmoid'"),
        ({"norm": "instance"}, "norm 'batch' or 'none'"),
        ({"norm": "group"}, "norm 'batch' or 'none'"),
    ],
)
def test_passthrough_refuses_gates_that_cannot_pass_through(kwargs, message):
    unet = UNet(2, filters=[4, 8, 16], norm=kwargs.get("norm", "batch"))
    gate_kwargs = {k: v for k, v in kwargs.items() if k != "norm"}
    with pytest.raises(ValueError, match=message):
        AttentionUNet.from_unet(unet, **gate_kwargs)
    with pytest.raises(ValueError, match=message):
        init_passthrough(AttentionUNet(2, filters=[4, 8, 16], **kwargs))
    net, _ = AttentionUNet.from_unet(unet, passthrough=False, **gate_kwargs)
    assert torch.equal(net.encoders[0].conv1[0].weight, unet.encoders[0].conv1[0].weight)


# ---------------------------------------------------------------- mismatches


SOURCE, MODEL = r" in the source but ", r" in the model"
MISMATCHES = {  # id: (U-Net settings, Attention U-Net settings, the error message)
    "filters": (
        {}, {"filters": [8, 16, 32, 64]},
        r"'encoders\.0\.conv1\.0\.weight' is shape \[4, 1, 3, 3\]" + SOURCE + r"\[8, 1, 3, 3\]" + MODEL
        + r".*filters \[4, 8, 16, 32\] vs \[8, 16, 32, 64\]",
    ),
    "depth": (
        {}, {"filters": [4, 8, 16]},
        r"'head\.fuse\.weight' is shape \[2, 6, 1, 1\]" + SOURCE + r"\[2, 4, 1, 1\]" + MODEL
        + r" \(and \d+ more\)",
    ),
    "in_channels": (
        {}, {"in_channels": 2},
        r"shape \[4, 1, 3, 3\]" + SOURCE + r"\[4, 2, 3, 3\]" + MODEL + ".*in_channels 1 vs 2",
    ),
    "out_channels": (
        {}, {"out_channels": 3},
        r"'head\.convs\.0\.weight' is shape \[2, 4, 1, 1\]" + SOURCE + r"\[3, 4, 1, 1\]" + MODEL
        + ".*out_channels 2 vs 3",
    ),
    "norm-dropped": (
        {}, {"norm": "none"},
        r"'encoders\.0\.conv1\.1\.weight' is shape \[4\]" + SOURCE + "absent from the model.*norm 'batch' vs 'none'",
    ),
    "norm-added": (
        {"norm": "none"}, {"norm": "batch"},
        r"'encoders\.0\.conv1\.1\.weight' is absent from the source but shape \[4\]" + MODEL,
    ),
    "norm-kind": ({"norm": "group"}, {"norm": "instance"}, "settings differ, source vs model: norm 'group' vs 'instance'"),
    "num_groups": ({"norm": "group", "num_groups": 2}, {"num_groups": 4}, "num_groups 2 vs 4"),
    # 3 and 2 give the same groups to every level of [4, 8, 16, 32] (2 each): the same network
    "num_groups-same-groups": ({"norm": "group", "num_groups": 3}, {"num_groups": 2}, None),
    "deep_supervision-dropped": (
        {}, {"deep_supervision": "none"},
        r"'head\.convs\.1\.weight' is shape \[2, 8, 1, 1\]" + SOURCE + "absent.*deep_supervision 'fused' vs 'none'",
    ),
    "deep_supervision-added": (
        {"deep_supervision": "per_scale"}, {"deep_supervision": "fused"},
        r"'head\.fuse\.weight' is absent from the source but shape \[2, 6, 1, 1\]" + MODEL,
    ),
    "align_corners": ({}, {"align_corners": True}, "settings differ, source vs model: align_corners False vs True"),
}  # fmt: skip


@pytest.mark.parametrize("source_kwargs, model_kwargs, match", MISMATCHES.values(), ids=MISMATCHES.keys())
def test_mismatch_names_the_layer_and_both_shapes(source_kwargs, model_kwargs, match):
    unet = UNet(2, filters=FILTERS, **source_kwargs)
    if match is None:
        net, _ = AttentionUNet.from_unet(unet, passthrough=False, **model_kwargs)
        assert torch.equal(net.encoders[3].conv1[1].weight, unet.encoders[3].conv1[1].weight)
        return
    with pytest.raises(ValueError, match=match):
        AttentionUNet.from_unet(unet, passthrough=False, **model_kwargs)


def test_mismatch_in_spatial_dims():
    with pytest.raises(ValueError, match=r"shape \[4, 1, 3, 3\] in the source but \[4, 1, 3, 3, 3\].*spatial_dims 2 vs 3"):
        AttentionUNet3D.from_unet(UNet2D(filters=FILTERS))


def test_mismatch_with_a_bare_state_dict_names_the_layer():
    with pytest.raises(ValueError, match=r"shape \[4, 1, 3, 3\] in the source but \[8, 1, 3, 3\].*other settings"):
        AttentionUNet2D.from_unet(UNet2D(filters=FILTERS).state_dict(), filters=[8, 16, 32, 64])


def test_mismatch_with_a_given_model():
    with pytest.raises(ValueError, match="out_channels 2 vs 5"):
        attention_unet_from_unet(UNet2D(filters=FILTERS), model=AttentionUNet2D(out_channels=5, filters=FILTERS))


# ---------------------------------------------------------------- sources


def test_state_dict_source():
    unet = trained_unet(3)
    state = unet.state_dict()
    net, _ = AttentionUNet3D.from_unet(state, filters=FILTERS)
    for key, value in state.items():
        assert torch.equal(net.state_dict()[key], value), key
    with pytest.raises(ValueError, match="spatial_dims is needed"):
        AttentionUNet.from_unet(state, filters=FILTERS)
    net, _ = AttentionUNet.from_unet(state, spatial_dims=3, filters=FILTERS)
    assert net.spatial_dims == 3


@pytest.mark.parametrize("prefix", ["module.", "_orig_mod."])
def test_state_dict_of_a_wrapped_unet(prefix):
    unet = trained_unet(2)
    state = {prefix + k: v for k, v in unet.state_dict().items()}
    net, _ = AttentionUNet2D.from_unet(state, filters=FILTERS)
    assert torch.equal(net.head.fuse.weight, unet.head.fuse.weight)


@pytest.mark.parametrize("as_path", [str, Path])
def test_checkpoint_file_with_config(tmp_path, as_path):
    unet = trained_unet(2, in_channels=1, out_channels=3, deep_supervision="none", align_corners=True)
    path = tmp_path / "unet.pt"
    torch.save({"model": unet.state_dict(), "config": checkpoint_config(unet), "epoch": 12}, path)
    net = AttentionUNet.from_unet(as_path(path))[0].eval()
    assert (net.spatial_dims, net.out_channels, net.deep_supervision, net.align_corners) == (2, 3, "none", True)
    for key, value in unet.state_dict().items():
        assert torch.equal(net.state_dict()[key], value), key
    x = torch.randn(SHAPES[2])
    with torch.no_grad():
        assert relative_error(net(x), unet(x)) <= 2e-5


def test_checkpoint_config_contents():
    unet = UNet3D(in_channels=2, filters=[4, 8, 16], norm="group", num_groups=3)
    assert checkpoint_config(unet) == {
        "arch": "UNet", "spatial_dims": 3, "in_channels": 2, "out_channels": 2, "filters": [4, 8, 16],
        "norm": "group", "num_groups": 3, "deep_supervision": "fused", "align_corners": False,
    }  # fmt: skip  (num_groups as given: the network keeps its argument)
    net = AttentionUNet2D(filters=[4, 8, 16], heads=1, subsample_factor=(2, 1), sigma1="softplus")
    config = checkpoint_config(net)
    assert config["arch"] == "AttentionUNet"
    assert {k: config[k] for k in ("attention_levels", "heads", "subsample_factor", "sigma1", "sigma2", "gate_output_transform")} == {
        "attention_levels": [2], "heads": 1, "subsample_factor": [2, 1], "sigma1": "softplus", "sigma2": "sigmoid",
        "gate_output_transform": True,
    }  # fmt: skip
    with pytest.raises(TypeError, match="net must be a UNet"):
        checkpoint_config(nn.Linear(2, 2))


def test_checkpoint_dict_with_state_dict_key_and_feature_scale_config(tmp_path):
    unet = UNet2D(feature_scale=16)
    path = tmp_path / "unet.pt"
    torch.save({"state_dict": unet.state_dict(), "config": {"arch": "UNet", "spatial_dims": 2, "feature_scale": 16}}, path)
    net, _ = AttentionUNet.from_unet(path)
    assert net.filters == (4, 8, 16, 32, 64)
    assert torch.equal(net.encoders[4].conv2[0].weight, unet.encoders[4].conv2[0].weight)
    # an in-memory checkpoint dict without config, settings given here
    net, _ = AttentionUNet2D.from_unet({"model": unet.state_dict(), "epoch": 3}, feature_scale=16)
    assert net.filters == (4, 8, 16, 32, 64)


def test_checkpoint_config_with_unknown_keys(tmp_path):
    path = tmp_path / "unet.pt"
    unet = UNet2D(filters=[4, 8])
    torch.save({"model": unet.state_dict(), "config": {"spatial_dims": 2, "filters": [4, 8], "patch": 96}}, path)
    with pytest.raises(ValueError, match=r"unknown keys \['patch'\]"):
        AttentionUNet.from_unet(path)


def test_attention_unet_source_skips_its_gates(tmp_path):
    torch.manual_seed(3)
    trained = AttentionUNet2D(filters=FILTERS, heads=1)
    path = tmp_path / "att.pt"
    torch.save({"model": trained.state_dict(), "config": checkpoint_config(trained)}, path)
    net, report = AttentionUNet2D.from_unet(path)
    assert net.heads == 1
    assert report.skipped == gate_keys(trained) and report.initialised == gate_keys(net)
    assert report.copied == [k for k in trained.state_dict() if k not in gate_keys(trained)]


def test_argument_errors():
    unet = UNet2D(filters=[4, 8])
    with pytest.raises(TypeError, match="source must be a UNet, a state dict"):
        AttentionUNet.from_unet(3)
    with pytest.raises(TypeError, match="non-tensor entries"):
        AttentionUNet2D.from_unet({"epoch": 3, "weights": unet.state_dict()})
    with pytest.raises(TypeError, match="model_class must be AttentionUNet"):
        attention_unet_from_unet(unet, model_class=UNet)
    with pytest.raises(TypeError, match="model must be an AttentionUNet, got UNet2D"):
        attention_unet_from_unet(unet, model=UNet2D(filters=[4, 8]))
    with pytest.raises(ValueError, match="give model or config, not both"):
        attention_unet_from_unet(unet, model=AttentionUNet2D(filters=[4, 8]), heads=1)
    with pytest.raises(TypeError, match=r"unknown AttentionUNet2D arguments \['head'\]"):
        AttentionUNet2D.from_unet(unet, head=1)


# ---------------------------------------------------------------- freezing


def train_steps(net: nn.Module, optimizer: torch.optim.Optimizer, steps: int = 2) -> None:
    net.train()
    torch.manual_seed(11)
    for _ in range(steps):
        optimizer.zero_grad()
        out = net(torch.randn(SHAPES[2]))
        (out**2).mean().backward()
        optimizer.step()


def test_gate_parameters_are_the_gates_and_gating_signal():
    net = AttentionUNet2D(filters=FILTERS)
    expected = list(net.gates.parameters()) + list(net.gating.parameters())
    assert [id(p) for p in gate_parameters(net)] == [id(p) for p in expected]
    with pytest.raises(TypeError, match="model must be an AttentionUNet, got UNet2D"):
        gate_parameters(UNet2D())


@pytest.mark.parametrize(
    "make_optimizer",
    [
        lambda params: torch.optim.SGD(params, lr=0.1, momentum=0.9, weight_decay=1e-2),
        lambda params: torch.optim.Adam(params, lr=1e-2, weight_decay=1e-2),
    ],
    ids=["sgd", "adam"],
)
@pytest.mark.parametrize("over", ["all", "gates"])
def test_frozen_backbone_does_not_move(make_optimizer, over):
    net, _ = AttentionUNet.from_unet(trained_unet(2), passthrough=False)
    freeze_backbone(net)
    assert all(not p.requires_grad for p in net.encoders.parameters())
    assert all(p.requires_grad for p in gate_parameters(net))
    before = backbone_snapshot(net)
    gates_before = {id(p): p.detach().clone() for p in gate_parameters(net)}
    train_steps(net, make_optimizer(net.parameters() if over == "all" else gate_parameters(net)))
    after = backbone_snapshot(net)
    for key, value in before.items():  # weights, biases, running statistics and counters
        assert torch.equal(after[key], value), key
    moved = [not torch.equal(p, gates_before[id(p)]) for p in gate_parameters(net) if p.dim() > 1]
    assert moved and all(moved)  # every gate conv weight trained


def test_train_does_not_reenable_frozen_batch_norm():
    net = freeze_backbone(AttentionUNet.from_unet(trained_unet(2), passthrough=False)[0])
    freeze_backbone(net)  # idempotent: one hook per layer, undone by one unfreeze (below)
    bn = net.encoders[0].conv1[1]
    assert not bn.training
    gate_bn = net.gates["2"].gates[0].W[1]
    before = backbone_snapshot(net)
    gate_mean = gate_bn.running_mean.clone()
    net.train()
    with torch.no_grad():
        net(torch.randn(SHAPES[2]))
    assert not bn.training and net.training and gate_bn.training
    for key, value in before.items():
        assert torch.equal(net.state_dict()[key], value), key
    assert not torch.equal(gate_bn.running_mean, gate_mean)  # the gates' own batch norms train

    unfreeze(net)
    assert bn.training
    assert all(p.requires_grad for p in net.parameters())
    with torch.no_grad():
        net(torch.randn(SHAPES[2]))  # in train mode: the hook is gone, the statistics update
    assert bn.training
    assert not torch.equal(bn.running_mean, before["encoders.0.conv1.1.running_mean"])
    net.eval()
    assert not bn.training


def test_unfreeze_removes_only_its_own_hooks():
    net = AttentionUNet.from_unet(trained_unet(2), passthrough=False)[0]
    bn = net.encoders[1].conv2[1]
    calls = []
    freeze_backbone(net).train()
    mine = bn.register_forward_pre_hook(lambda module, args: calls.append(module.training))  # runs after freeze's
    with torch.no_grad():
        net(torch.randn(SHAPES[2]))
    assert calls == [False]  # the user's hook ran after freeze_backbone's, which had put the layer in eval
    unfreeze(net.train())
    with torch.no_grad():
        net(torch.randn(SHAPES[2]))
    assert calls == [False, True]  # the user's hook is still there; freeze_backbone's is gone
    mine.remove()


def test_frozen_model_copies_keep_their_own_hooks():
    net = freeze_backbone(AttentionUNet.from_unet(trained_unet(2), passthrough=False)[0])
    twin = copy.deepcopy(net)
    unfreeze(twin.train())
    bn, bn_twin = net.encoders[0].conv1[1], twin.encoders[0].conv1[1]
    mean = bn.running_mean.clone()
    net.train()
    with torch.no_grad():
        net(torch.randn(SHAPES[2]))
        twin(torch.randn(SHAPES[2]))
    assert torch.equal(bn.running_mean, mean) and not bn.training  # still frozen: the copy's unfreeze left it
    assert not torch.equal(bn_twin.running_mean, mean) and bn_twin.training


def test_frozen_model_in_train_mode_runs_the_backbone_as_in_eval():
    unet = trained_unet(2)
    net = freeze_backbone(AttentionUNet.from_unet(unet)[0]).train()
    x = torch.randn(SHAPES[2])
    with torch.no_grad():
        skip = net.encoders[0](x)
        assert torch.equal(skip, unet.encoders[0](x))


def test_freeze_needs_an_attention_unet():
    with pytest.raises(TypeError, match="model must be an AttentionUNet, got UNet2D"):
        freeze_backbone(UNet2D())
    with pytest.raises(TypeError, match="model must be an AttentionUNet, got UNet2D"):
        unfreeze(UNet2D())


@pytest.mark.parametrize("arch", ["UNet", "AttentionUNet"])
def test_network_from_config_rebuilds_the_network_of_checkpoint_config(arch):
    from attention_gates import AttentionUNet, UNet, checkpoint_config, network_from_config

    cls = {"UNet": UNet, "AttentionUNet": AttentionUNet}[arch]
    extra = {"heads": 1, "attention_levels": (1, 2)} if arch == "AttentionUNet" else {}
    net = cls(2, 3, 4, filters=[4, 8, 16], norm="group", num_groups=2, **extra)
    again = network_from_config(checkpoint_config(net))
    assert type(again) is cls and again.load_state_dict(net.state_dict()) is not None
    assert checkpoint_config(again) == checkpoint_config(net)


def test_network_from_config_errors_name_the_problem():
    from attention_gates import network_from_config

    with pytest.raises(TypeError, match="must be a dict"):
        network_from_config(["UNet"])
    with pytest.raises(ValueError, match="config\\['arch'\\] must be one of"):
        network_from_config({"arch": "VNet"})
    with pytest.raises(ValueError, match="does not take \\['heads'\\]"):
        network_from_config({"arch": "UNet", "spatial_dims": 3, "heads": 2})
