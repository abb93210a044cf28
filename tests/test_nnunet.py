"""attention_gates.integrations.nnunet: the network nnU-Net builds from plans, the trainer it finds by
name, plans variants, pass-through from a trained PlainConvUNet, and one run of nnU-Net's own
commands (plan and preprocess, train, predict) on a small synthetic dataset.

Its own suite (``-m nnunet``, the ``nnunet`` step of scripts/test.sh); needs the ``nnunet`` extra.
"""

from __future__ import annotations

import importlib.abc
import json
import os
import re
import shutil
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("nnunetv2", reason="the nnunet extra: pip install -e '.[nnunet]'")

from dynamic_network_architectures.architectures.unet import PlainConvUNet
from nnunetv2.run.load_pretrained_weights import load_pretrained_weights
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
from nnunetv2.utilities.get_network_from_plans import get_network_from_plans
from nnunetv2.utilities.plans_handling.plans_handler import PlansManager
from torch import nn

from attention_gates.gates import GridAttentionGate, MultiAttentionGate
from attention_gates.integrations.nnunet import (
    GATE_DEFAULTS,
    AttentionPlainConvUNet,
    attention_plans,
    convert_checkpoint,
    nnUNetTrainerAttentionGates,
    trainer_dir,
    write_attention_plans,
)
from attention_gates.integrations.nnunet import trainer as trainer_module
from attention_gates.integrations.nnunet.__main__ import main as cli
from attention_gates.integrations.nnunet import export as export_module
from attention_gates.integrations.nnunet.export import export_onnx, size_multiples
from attention_gates.integrations.nnunet.network import CLASS_NAME, PLAIN_CLASS_NAME, resolve_arch_kwargs
from attention_gates.ops import use_backend

pytestmark = pytest.mark.nnunet

HERE = Path(__file__).resolve().parent
REQUIRES_IMPORT = ["conv_op", "norm_op", "dropout_op", "nonlin"]


def arch_kwargs(dims: int, strides, features=(4, 8, 16, 32)) -> dict:
    """A plans file's ``arch_kwargs`` (class names as strings), as nnU-Net's planner writes them."""
    n = len(strides)
    return {
        "n_stages": n,
        "features_per_stage": list(features[:n]),
        "conv_op": f"torch.nn.modules.conv.Conv{dims}d",
        "kernel_sizes": [[3] * dims] * n,
        "strides": [list(s) for s in strides],
        "n_conv_per_stage": [2] * n,
        "n_conv_per_stage_decoder": [2] * (n - 1),
        "conv_bias": True,
        "norm_op": f"torch.nn.modules.instancenorm.InstanceNorm{dims}d",
        "norm_op_kwargs": {"eps": 1e-05, "affine": True},
        "dropout_op": None,
        "dropout_op_kwargs": None,
        "nonlin": "torch.nn.LeakyReLU",
        "nonlin_kwargs": {"inplace": True},
    }


# nnU-Net's anisotropic 3D case: in-plane first ([1, 2, 2]), then isotropic; and a 2D one
CASES = {
    "3d": (3, [[1, 1, 1], [1, 2, 2], [2, 2, 2], [1, 2, 2]], (8, 32, 16)),
    "2d": (2, [[1, 1], [2, 2], [2, 2]], (24, 16)),
}


def build(cls, case: str, deep_supervision: bool = True, in_channels: int = 2, classes: int = 3, **gate_options):
    """``cls`` as nnU-Net builds it: ``get_network_from_plans`` with its initialisation."""
    dims, strides, _ = CASES[case]
    name = CLASS_NAME if cls is AttentionPlainConvUNet else PLAIN_CLASS_NAME
    return get_network_from_plans(name, {**arch_kwargs(dims, strides), **gate_options}, REQUIRES_IMPORT, in_channels, classes,
                                  allow_init=True, deep_supervision=deep_supervision)  # fmt: skip


def batch(case: str, n: int = 2, in_channels: int = 2) -> torch.Tensor:
    return torch.randn(n, in_channels, *CASES[case][2], generator=torch.Generator().manual_seed(3))


def as_trained(net: nn.Module, seed: int = 0) -> nn.Module:
    """Random, non-trivial norm affines and biases, as if trained (nnU-Net's init leaves them 1 and 0)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in net.named_parameters():
            if name.endswith("bias") or ".norm." in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.3 + (1.0 if name.endswith("norm.weight") else 0.0))
    return net


@pytest.fixture(autouse=True)
def _reference_backend():
    # about the integration, not the gate kernels: the eager implementation (the e2e run uses "auto")
    with use_backend("reference"):
        yield


# --------------------------------------------------------------------------- the network


@pytest.mark.parametrize("case", sorted(CASES))
def test_get_network_from_plans_builds_the_gated_network(case):
    dims, strides, _ = CASES[case]
    net = build(AttentionPlainConvUNet, case)
    assert type(net) is AttentionPlainConvUNet and net.decoder.deep_supervision
    n_skips = len(strides) - 1
    assert net.decoder.gated_skips == tuple(range(1, n_skips))  # all but the full-resolution skip
    for key, gate in net.decoder.gates.items():
        i = int(key)
        assert isinstance(gate, GridAttentionGate) and gate.W is None and gate.spatial_dims == dims
        assert gate.subsample_factor == tuple(strides[i + 1])  # theta: the stride to g's grid, per axis
        assert (gate.in_channels, gate.gating_channels, gate.inter_channels) == (4 * 2**i, 4 * 2 ** (i + 1), 4 * 2**i)
        assert gate.phi.bias.abs().sum() == 0  # nnU-Net's initialize (He, zero biases) reached the gates
    # everything but the gates is PlainConvUNet's, key for key and shape for shape
    plain = build(PlainConvUNet, case).state_dict()
    ours = {k: v.shape for k, v in net.state_dict().items() if not k.startswith("decoder.gates.")}
    assert ours == {k: v.shape for k, v in plain.items()}


@pytest.mark.parametrize("case", sorted(CASES))
def test_outputs_with_and_without_deep_supervision(case):
    dims, strides, size = CASES[case]
    x = batch(case)
    net, plain = build(AttentionPlainConvUNet, case).eval(), build(PlainConvUNet, case).eval()
    with torch.no_grad():
        out, ref = net(x), plain(x)
        assert isinstance(out, list) and len(out) == len(strides) - 1
        assert [o.shape for o in out] == [r.shape for r in ref]
        # nnU-Net's deep-supervision targets: 1 / cumprod(strides)[:-1], highest resolution first
        scales = 1 / np.cumprod(np.array(strides), axis=0)[:-1]
        assert [tuple(o.shape[2:]) for o in out] == [tuple(int(s * f) for s, f in zip(size, sc)) for sc in scales]
        assert all(o.shape[:2] == (2, 3) for o in out)
        net.decoder.deep_supervision = False  # what nnU-Net's set_deep_supervision_enabled does
        single = net(x)
    assert isinstance(single, torch.Tensor) and single.shape == (2, 3, *size)
    torch.testing.assert_close(single, out[0], rtol=0, atol=0)


@pytest.mark.parametrize("case", sorted(CASES))
def test_weights_saved_with_deep_supervision_load_without_it(case):
    trained = as_trained(build(AttentionPlainConvUNet, case, deep_supervision=True))
    inference = build(AttentionPlainConvUNet, case, deep_supervision=False)
    inference.load_state_dict(trained.state_dict())  # strict: the same keys
    x = batch(case)
    with torch.no_grad():
        torch.testing.assert_close(inference.eval()(x), trained.eval()(x)[0], rtol=0, atol=0)


def test_return_attention_gives_one_map_per_gated_skip_on_its_grid():
    net = build(AttentionPlainConvUNet, "3d", gated_skips=[0, 2], gate_heads=2).eval()
    with torch.no_grad():
        logits, attention = net(batch("3d"), return_attention=True)
    assert isinstance(logits, list) and len(attention) == 2
    assert attention[0].shape == (2, 2, 8, 32, 16) and attention[1].shape == (2, 2, 4, 8, 4)
    assert all(((a >= 0) & (a <= 1)).all() for a in attention)
    assert all(isinstance(g, MultiAttentionGate) for g in net.decoder.gates.values())


def test_gate_options_reach_the_gates():
    net = build(AttentionPlainConvUNet, "3d", gated_skips=[2, 0], gate_heads=1, gate_norm="group", gate_output_transform=True)
    assert net.decoder.gated_skips == (0, 2) and set(net.decoder.gates) == {"0", "2"}
    gate = net.decoder.gates["0"]
    assert gate.subsample_factor == (1, 2, 2) and isinstance(gate.W[1], nn.GroupNorm)
    assert net.gate_options == {"gated_skips": [0, 2], "gate_heads": 1, "gate_norm": "group", "gate_output_transform": True}
    assert AttentionPlainConvUNet(**_resolved("3d")).gate_options == {**GATE_DEFAULTS, "gated_skips": [1, 2]}


def _resolved(case: str, **extra) -> dict:
    """The constructor's arguments for ``case``, classes imported."""
    dims, strides, _ = CASES[case]
    return {"input_channels": 1, "num_classes": 2, **resolve_arch_kwargs(arch_kwargs(dims, strides)), **extra}


@pytest.mark.parametrize(
    "options, match",
    [
        ({"gated_skips": [3]}, r"gated_skips must be distinct encoder stages in 0\.\.2 .* got \[3\]"),
        ({"gated_skips": [1, 1]}, r"got \[1, 1\]"),
        ({"gated_skips": [True]}, r"got \[True\]"),
        ({"gate_heads": 0}, "gate_heads must be a positive int, got 0"),
        ({"gate_norm": "layer"}, r"gate_norm must be one of \('batch', 'instance', 'group', 'none'\), got 'layer'"),
        ({"gate_output_transform": "yes"}, "gate_output_transform must be a bool, got 'yes'"),
    ],
)
def test_bad_gate_options_are_errors(options, match):
    with pytest.raises(ValueError, match=match):
        AttentionPlainConvUNet(**_resolved("3d", **options))


def test_two_stages_have_no_default_gated_skip():
    kwargs = _resolved("2d")
    kwargs.update(n_stages=2, features_per_stage=[4, 8], kernel_sizes=[[3, 3]] * 2, strides=[[1, 1], [2, 2]],
                  n_conv_per_stage=[2, 2], n_conv_per_stage_decoder=[2])  # fmt: skip
    with pytest.raises(ValueError, match=r"only the full-resolution skip, which is not gated by default: pass gated_skips=\[0\]"):
        AttentionPlainConvUNet(**kwargs)
    assert AttentionPlainConvUNet(**kwargs, gated_skips=[0]).decoder.gated_skips == (0,)


def test_compute_conv_feature_map_size_adds_the_gates():
    """Two gated skips of the 3D case (input 8x32x16): the plain count plus, per gate, theta, phi
    (F_int each) and psi (1) on the coarse grid, alpha (1) and alpha * x (C) on the skip's grid."""
    size = (8, 32, 16)
    net, plain = build(AttentionPlainConvUNet, "3d"), build(PlainConvUNet, "3d")
    # stages: 8x32x16, 8x16x8 (8 ch), 4x8x4 (16 ch), 4x4x2; skips 1 and 2 gated, F_int = C
    skip1 = (2 * 8 + 1) * (4 * 8 * 4) + (1 + 8) * (8 * 16 * 8)
    skip2 = (2 * 16 + 1) * (4 * 4 * 2) + (1 + 16) * (4 * 8 * 4)
    extra = skip1 + skip2
    assert net.compute_conv_feature_map_size(size) == plain.compute_conv_feature_map_size(size) + extra


def test_torch_compile_matches_eager():
    """nnU-Net compiles the network on CUDA by default; here the CPU inductor on a small 2D net."""
    kwargs = {**arch_kwargs(2, CASES["2d"][1]), "n_conv_per_stage": 1, "n_conv_per_stage_decoder": 1}
    net = get_network_from_plans(CLASS_NAME, kwargs, REQUIRES_IMPORT, 2, 3, deep_supervision=True).eval()
    x = batch("2d", n=1)
    with torch.no_grad():
        eager = net(x)
        compiled = torch.compile(net)(x)
    assert len(compiled) == len(eager)
    for c, e in zip(compiled, eager):
        torch.testing.assert_close(c, e, rtol=1e-4, atol=1e-4)


# --------------------------------------------------------------------------- from a trained PlainConvUNet


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("deep_supervision", [True, False])
def test_passthrough_from_plain_gives_its_logits(case, deep_supervision):
    plain = as_trained(build(PlainConvUNet, case, deep_supervision=deep_supervision)).eval()
    dims, strides, _ = CASES[case]
    net = AttentionPlainConvUNet.from_plain(plain, {**arch_kwargs(dims, strides), "deep_supervision": deep_supervision}).eval()
    exact = AttentionPlainConvUNet.from_plain(plain, arch_kwargs(dims, strides), psi_bias=40.0, deep_supervision=deep_supervision).eval()
    x = batch(case)
    with torch.no_grad():
        ref, (out, attention), same = plain(x), net(x, return_attention=True), exact(x)
    refs, outs, sames = (ref, out, same) if deep_supervision else ([ref], [out], [same])
    assert len(outs) == len(refs)
    for r, o, s in zip(refs, outs, sames):
        assert (o - r).abs().max() <= 2e-5 * r.abs().max()  # alpha = sigmoid(12) = 1 - 6e-6
        assert torch.equal(s, r)  # alpha rounds to 1 in float32
    expected = torch.sigmoid(torch.tensor(12.0))
    assert all(torch.allclose(a, expected) for a in attention)


def plans_dict(features=(4, 8, 16, 32)) -> dict:
    """A plans file as nnU-Net writes it: 2d, an anisotropic 3d_fullres and a cascade stage that inherits."""
    conf = {"data_identifier": "nnUNetPlans_3d_fullres", "batch_size": 2, "patch_size": [8, 32, 16], "spacing": [4.0, 1.0, 1.0]}
    return {
        "dataset_name": "Dataset901_Tiny",
        "plans_name": "nnUNetPlans",
        "configurations": {
            "2d": {**conf, "data_identifier": "nnUNetPlans_2d", "patch_size": [24, 16], "spacing": [1.0, 1.0],
                   "architecture": {"network_class_name": PLAIN_CLASS_NAME, "arch_kwargs": arch_kwargs(2, CASES["2d"][1], features),
                                    "_kw_requires_import": REQUIRES_IMPORT}},
            "3d_fullres": {**conf, "architecture": {"network_class_name": PLAIN_CLASS_NAME,
                                                    "arch_kwargs": arch_kwargs(3, CASES["3d"][1], features),
                                                    "_kw_requires_import": REQUIRES_IMPORT}},
            "3d_cascade_fullres": {"inherits_from": "3d_fullres", "previous_stage": "3d_lowres"},
        },
    }  # fmt: skip


def nnunet_checkpoint(plain: nn.Module, plans: dict, configuration: str = "3d_fullres", trainer: str = "nnUNetTrainer") -> dict:
    """What nnU-Net's save_checkpoint writes (the entries read here)."""
    return {
        "network_weights": plain.state_dict(),
        "optimizer_state": {"state": {}, "param_groups": []},
        "grad_scaler_state": None,
        "init_args": {"plans": plans, "configuration": configuration, "fold": 0, "dataset_json": {}},
        "trainer_name": trainer,
        "inference_allowed_mirroring_axes": (0, 1, 2),
    }


def test_from_plain_reads_an_nnunet_checkpoint_and_a_state_dict(tmp_path):
    plain = as_trained(build(PlainConvUNet, "3d")).eval()
    x = batch("3d")
    with torch.no_grad():
        ref = plain(x)[0]
    path = tmp_path / "checkpoint_final.pth"
    torch.save(nnunet_checkpoint(plain, plans_dict()), path)
    from_path = AttentionPlainConvUNet.from_plain(path, psi_bias=40.0)
    from_state = AttentionPlainConvUNet.from_plain(plain.state_dict(), arch_kwargs(3, CASES["3d"][1]), psi_bias=40.0)
    compiled = AttentionPlainConvUNet.from_plain(torch.compile(plain), arch_kwargs(3, CASES["3d"][1]), psi_bias=40.0)
    for net in (from_path, from_state, compiled):
        assert not net.decoder.deep_supervision  # nnU-Net's arch_kwargs do not hold it: the constructor's default
        with torch.no_grad():
            assert torch.equal(net.eval()(x), ref)


def test_from_plain_errors(tmp_path):
    plain = build(PlainConvUNet, "3d")
    kwargs = arch_kwargs(3, CASES["3d"][1])
    with pytest.raises(ValueError, match=r"'encoder\.stages\.0\.0\.convs\.0\.conv\.weight' is shape \[4, 2, 3, 3, 3\] in the source but \[8, 2, 3, 3, 3\] in the model \(and \d+ more\)"):
        AttentionPlainConvUNet.from_plain(plain, {**kwargs, "features_per_stage": [8, 16, 32, 64]})
    with pytest.raises(TypeError, match="source must be a PlainConvUNet, got AttentionPlainConvUNet"):
        AttentionPlainConvUNet.from_plain(build(AttentionPlainConvUNet, "3d"), kwargs)
    with pytest.raises(TypeError, match="source must be a PlainConvUNet, a state dict, .* got int"):
        AttentionPlainConvUNet.from_plain(3, kwargs)
    with pytest.raises(ValueError, match="arch_kwargs are needed: the source holds no plans"):
        AttentionPlainConvUNet.from_plain(plain.state_dict())
    with pytest.raises(ValueError, match=r"'decoder\.gates\.1\.theta\.weight' is a gate's: the source is not a plain network"):
        AttentionPlainConvUNet.from_plain(build(AttentionPlainConvUNet, "3d").state_dict(), kwargs)
    with pytest.raises(ValueError, match="the source has no 'decoder.seg_layers.0.weight'"):
        AttentionPlainConvUNet.from_plain({"encoder.stages.0.0.convs.0.conv.weight": torch.zeros(4, 1, 3, 3, 3)}, kwargs)
    with pytest.raises(ValueError, match=r"arch_kwargs\['nonlin'\] = 'torch.nn.NoSuchThing' does not name an importable class"):
        AttentionPlainConvUNet.from_plain(plain, {**kwargs, "nonlin": "torch.nn.NoSuchThing"})
    with pytest.raises(TypeError, match=r"unknown gate options \['heads'\]"):
        AttentionPlainConvUNet.from_plain(plain, kwargs, heads=2)
    with pytest.raises(ValueError, match=r"pass-through needs gates that return alpha \* x .* got gate_heads=2"):
        AttentionPlainConvUNet.from_plain(plain, kwargs, gate_heads=2)
    assert AttentionPlainConvUNet.from_plain(plain, kwargs, gate_heads=2, passthrough=False).decoder.heads == 2
    other = plans_dict()
    other["configurations"]["3d_fullres"]["architecture"]["network_class_name"] = "dynamic_network_architectures.architectures.unet.ResidualEncoderUNet"
    with pytest.raises(ValueError, match="the checkpoint's plans name '.*ResidualEncoderUNet', not '.*PlainConvUNet'"):
        AttentionPlainConvUNet.from_plain(nnunet_checkpoint(plain, other))
    bad = tmp_path / "not_a_checkpoint.pth"
    torch.save({"model": plain.state_dict()}, bad)
    with pytest.raises(ValueError, match="is not an nnU-Net checkpoint: it has no 'network_weights' dict"):
        AttentionPlainConvUNet.from_plain(bad)


def test_init_passthrough_errors():
    with pytest.raises(ValueError, match="gate_output_transform=True"):
        build(AttentionPlainConvUNet, "2d", gate_output_transform=True).init_passthrough()


def test_convert_checkpoint_feeds_nnunets_pretrained_weights(tmp_path):
    """The converted file loads through nnU-Net's ``-pretrained_weights`` into the network the
    trainer builds from the plain plans: every weight but the segmentation layers (nnU-Net's rule)."""
    plain = as_trained(build(PlainConvUNet, "3d"))
    src, dst = tmp_path / "checkpoint_final.pth", tmp_path / "gated.pth"
    torch.save(nnunet_checkpoint(plain, plans_dict()), src)
    assert convert_checkpoint(src, dst) == dst
    out = torch.load(dst, weights_only=False)
    assert "optimizer_state" not in out and out["trainer_name"] == "nnUNetTrainerAttentionGates"
    arch = out["init_args"]["plans"]["configurations"]["3d_fullres"]["architecture"]
    assert arch["network_class_name"] == CLASS_NAME and arch["arch_kwargs"]["gated_skips"] == [1, 2]
    pm = PlansManager(plans_dict())
    net = nnUNetTrainerAttentionGates.build_network_architecture(pm, pm.get_configuration("3d_fullres"), 2, 3, True)
    load_pretrained_weights(net, str(dst))
    state, ref = net.state_dict(), plain.state_dict()
    assert all(torch.equal(state[k], ref[k]) for k in ref if ".seg_layers." not in k)
    assert all(g.psi.bias.item() == 12.0 and g.psi.weight.abs().sum() == 0 for g in net.decoder.gates.values())
    with pytest.raises(ValueError, match="is the input checkpoint"):
        convert_checkpoint(src, src)
    assert cli(["convert", str(src), str(tmp_path / "cli.pth"), "--psi-bias", "4"]) is None
    assert torch.load(tmp_path / "cli.pth", weights_only=False)["network_weights"]["decoder.gates.1.psi.bias"].item() == 4.0


# --------------------------------------------------------------------------- plans and trainer


def test_attention_plans_names_the_class_with_the_same_arch_kwargs():
    plans = plans_dict()
    variant, converted = attention_plans(plans, "nnUNetAttentionPlans", gate_heads=2)
    assert converted == ["2d", "3d_fullres", "3d_cascade_fullres"]
    assert variant["plans_name"] == "nnUNetAttentionPlans" and plans["plans_name"] == "nnUNetPlans"  # the source is untouched
    for name in converted:
        arch = variant["configurations"][name]["architecture"]
        source = PlansManager(plans).get_configuration(name).network_arch_init_kwargs
        assert arch["network_class_name"] == CLASS_NAME and arch["_kw_requires_import"] == REQUIRES_IMPORT
        assert {k: v for k, v in arch["arch_kwargs"].items() if k not in GATE_DEFAULTS} == source
        assert arch["arch_kwargs"]["gate_heads"] == 2 and arch["arch_kwargs"]["gated_skips"] == list(range(1, source["n_stages"] - 1))
    assert variant["configurations"]["3d_fullres"]["data_identifier"] == "nnUNetPlans_3d_fullres"  # reuses the preprocessed data
    # nnU-Net's own trainer builds it from the variant
    pm = PlansManager(variant)
    net = nnUNetTrainer.build_network_architecture(pm, pm.get_configuration("3d_fullres"), 2, 3, True)
    assert type(net) is AttentionPlainConvUNet and net.decoder.heads == 2
    again, _ = attention_plans(variant, "x", gate_norm="batch")  # a variant's options are kept, new ones added
    assert again["configurations"]["2d"]["architecture"]["arch_kwargs"]["gate_heads"] == 2


def test_attention_plans_errors():
    plans = plans_dict()
    plans["configurations"]["2d"]["architecture"]["network_class_name"] = "dynamic_network_architectures.architectures.unet.ResidualEncoderUNet"
    variant, converted = attention_plans(plans)  # by default other networks are left as they are
    assert converted == ["3d_fullres", "3d_cascade_fullres"]
    assert variant["configurations"]["2d"] == plans["configurations"]["2d"]
    with pytest.raises(ValueError, match="configuration '2d' names '.*ResidualEncoderUNet': only PlainConvUNet's configurations can be gated"):
        attention_plans(plans, configurations=["2d"])
    with pytest.raises(ValueError, match=r"the plans have no configuration '3d_lowres'; they have \['2d', '3d_cascade_fullres', '3d_fullres'\]"):
        attention_plans(plans, configurations=["3d_lowres"])
    with pytest.raises(ValueError, match=r"gated_skips must be distinct encoder stages in 0\.\.2"):
        attention_plans(plans, gated_skips=[5])
    with pytest.raises(TypeError, match=r"unknown gate options \['heads'\]"):
        attention_plans(plans, heads=2)
    plans["configurations"]["3d_fullres"]["architecture"]["network_class_name"] = plans["configurations"]["2d"]["architecture"]["network_class_name"]
    with pytest.raises(ValueError, match="no configuration of these plans names PlainConvUNet"):
        attention_plans(plans)


def test_write_attention_plans_and_its_command_line(tmp_path, monkeypatch, capsys):
    folder = tmp_path / "Dataset901_Tiny"
    folder.mkdir()
    source = folder / "nnUNetPlans.json"
    source.write_text(json.dumps(plans_dict()))
    path = write_attention_plans(source, configurations=["3d_fullres"], gated_skips=[0, 1, 2])
    assert path == folder / "nnUNetAttentionPlans.json"
    written = json.loads(path.read_text())
    assert written["configurations"]["3d_fullres"]["architecture"]["arch_kwargs"]["gated_skips"] == [0, 1, 2]
    assert written["configurations"]["2d"] == plans_dict()["configurations"]["2d"]
    assert sorted(p.name for p in folder.iterdir()) == ["nnUNetAttentionPlans.json", "nnUNetPlans.json"]  # no temporary left
    with pytest.raises(ValueError, match="would overwrite the source plans"):
        write_attention_plans(source, "nnUNetPlans")
    with pytest.raises(FileNotFoundError, match="no plans file"):
        write_attention_plans(folder / "missing.json")
    monkeypatch.setenv("nnUNet_preprocessed", str(tmp_path))
    monkeypatch.setenv("nnUNet_raw", str(tmp_path / "raw"))
    cli(["plans", "Dataset901_Tiny", "-o", "nnUNetAttentionPlans2", "--heads", "2", "--gate-norm", "group"])
    assert capsys.readouterr().out.strip() == str(folder / "nnUNetAttentionPlans2.json")
    arch = json.loads((folder / "nnUNetAttentionPlans2.json").read_text())["configurations"]["3d_fullres"]["architecture"]
    assert arch["arch_kwargs"]["gate_heads"] == 2 and arch["arch_kwargs"]["gate_norm"] == "group"
    with pytest.raises(SystemExit):
        cli(["plans", "Dataset901_Tiny", "--gated-skips", "7"])
    assert "error: gated_skips must be distinct encoder stages" in capsys.readouterr().err
    cli(["trainer-dir"])
    assert capsys.readouterr().out.strip() == str(trainer_dir())


def test_trainer_builds_the_gated_network_from_default_plans():
    pm = PlansManager(plans_dict())
    for name, dims in (("3d_fullres", 3), ("2d", 2)):
        net = nnUNetTrainerAttentionGates.build_network_architecture(pm, pm.get_configuration(name), 2, 3, False)
        assert type(net) is AttentionPlainConvUNet and not net.decoder.deep_supervision
        assert net.gate_options["gate_heads"] == 1 and net.decoder.gates["1"].spatial_dims == dims
    other = plans_dict()
    other["configurations"]["2d"]["architecture"]["network_class_name"] = "dynamic_network_architectures.architectures.unet.ResidualEncoderUNet"
    pm = PlansManager(other)
    with pytest.raises(ValueError, match="these plans name '.*ResidualEncoderUNet', whose arch_kwargs it cannot take"):
        nnUNetTrainerAttentionGates.build_network_architecture(pm, pm.get_configuration("2d"), 2, 3, True)


def nnunet_can_look_up_trainers(monkeypatch, ext_trainer: str | None) -> None:
    """Set ``nnUNet_extTrainer`` (unset for None) for nnU-Net's trainer lookup in this process, and where
    ``import torchvision`` fails, stand in an empty module for nnU-Net's Primus trainers (tests/nnunet_cli.py says why)."""
    monkeypatch.syspath_prepend(str(HERE))
    import nnunet_cli

    if nnunet_cli.torchvision_is_broken():
        monkeypatch.setitem(sys.modules, nnunet_cli.PRIMUS, types.ModuleType(nnunet_cli.PRIMUS))
    if ext_trainer is None:
        monkeypatch.delenv("nnUNet_extTrainer", raising=False)
    else:
        monkeypatch.setenv("nnUNet_extTrainer", ext_trainer)


def test_nnunet_finds_the_trainer_by_name_through_nnUNet_extTrainer(monkeypatch):
    """nnU-Net's own lookup (as ``-tr`` at training and prediction): not found without the variable,
    the library's class itself with it."""
    from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name

    nnunet_can_look_up_trainers(monkeypatch, None)
    with pytest.raises(RuntimeError, match="Could not find requested nnunet trainer nnUNetTrainerAttentionGates"):
        recursive_find_trainer_class_by_name("nnUNetTrainerAttentionGates")
    nnunet_can_look_up_trainers(monkeypatch, os.pathsep.join(["/no/such/folder", str(trainer_dir())]))
    assert recursive_find_trainer_class_by_name("nnUNetTrainerAttentionGates") is nnUNetTrainerAttentionGates


# nnU-Net's own epoch variants (nnunetv2/training/nnUNetTrainer/variants/training_length), each with ours
EPOCH_VARIANTS = {"1epoch": 1, **{f"{n}epochs": n for n in (5, 10, 20, 50, 100, 250, 500, 750, 2000, 4000, 8000)}}
DATASET_JSON = {"channel_names": {"0": "MR", "1": "CT"}, "labels": {"background": 0, "a": 1, "b": 2}, "numTraining": 1,
                "file_ending": ".nii.gz"}  # fmt: skip


def test_short_variants_are_found_by_name_and_train_their_epochs(tmp_path, monkeypatch):
    """Every ``nnUNetTrainerAttentionGates_<n>epochs`` through nnU-Net's lookup with ``nnUNet_extTrainer``
    (the library's class itself), constructed as nnUNetv2_train constructs it: ``num_epochs`` is n,
    the constructor's arguments are recorded by name (nnU-Net stores them in its checkpoints), and
    the network built from a plans variant is the gated one with the variant's gate options."""
    from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name

    nnunet_can_look_up_trainers(monkeypatch, str(trainer_dir()))
    monkeypatch.setenv("nnUNet_preprocessed", str(tmp_path / "preprocessed"))
    monkeypatch.setenv("nnUNet_results", str(tmp_path / "results"))
    variant, _ = attention_plans(plans_dict(), gate_heads=2)
    for suffix, epochs in EPOCH_VARIANTS.items():
        name = f"nnUNetTrainerAttentionGates_{suffix}"
        cls = recursive_find_trainer_class_by_name(name)
        assert cls is getattr(trainer_module, name) and issubclass(cls, nnUNetTrainerAttentionGates)
        trainer = cls({**plans_dict(), "continue_training": False}, "3d_fullres", 0, DATASET_JSON, torch.device("cpu"))
        assert trainer.num_epochs == epochs
        assert trainer.my_init_kwargs["configuration"] == "3d_fullres" and trainer.my_init_kwargs["fold"] == 0
        pm = PlansManager(variant)
        net = cls.build_network_architecture(pm, pm.get_configuration("3d_fullres"), 2, 3, True)
        assert type(net) is AttentionPlainConvUNet and net.decoder.heads == 2
    assert trainer_module.__all__ == ["nnUNetTrainerAttentionGates"] + [f"nnUNetTrainerAttentionGates_{s}" for s in EPOCH_VARIANTS]
    default = nnUNetTrainerAttentionGates({**plans_dict(), "continue_training": False}, "3d_fullres", 0, DATASET_JSON, torch.device("cpu"))
    assert default.num_epochs == nnUNetTrainer({**plans_dict(), "continue_training": False}, "3d_fullres", 0, DATASET_JSON,
                                               torch.device("cpu")).num_epochs == 1000  # fmt: skip


def test_nnunets_own_short_variants_train_the_gated_network_of_a_plans_variant(monkeypatch):
    """The plans-variant route needs no trainer of ours: nnU-Net's own ``nnUNetTrainer_<n>epochs``, found
    by nnU-Net in its own package, builds the gated network the variant names."""
    from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name

    nnunet_can_look_up_trainers(monkeypatch, None)
    pm = PlansManager(attention_plans(plans_dict(), gate_heads=2)[0])
    for suffix in ("1epoch", "5epochs", "10epochs"):
        cls = recursive_find_trainer_class_by_name(f"nnUNetTrainer_{suffix}")
        assert cls.__module__ == "nnunetv2.training.nnUNetTrainer.variants.training_length.nnUNetTrainer_Xepochs"
        net = cls.build_network_architecture(pm, pm.get_configuration("3d_fullres"), 2, 3, True)
        assert type(net) is AttentionPlainConvUNet and net.decoder.heads == 2


# --------------------------------------------------------------------------- nnU-Net's commands, end to end

TINY_TRAINER = '''
import torch
from attention_gates.integrations.nnunet.trainer import nnUNetTrainerAttentionGates_1epoch


class nnUNetTrainerAttentionGatesTiny(nnUNetTrainerAttentionGates_1epoch):
    """The one-epoch variant with two iterations, no test-time mirroring."""

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict, device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.num_iterations_per_epoch, self.num_val_iterations_per_epoch = 2, 1

    def configure_rotation_dummyDA_mirroring_and_inital_patch_size(self):
        rotation, dummy_2d, patch_size, _ = super().configure_rotation_dummyDA_mirroring_and_inital_patch_size()
        self.inference_allowed_mirroring_axes = None
        return rotation, dummy_2d, patch_size, None
'''
SPACING_XYZ = (1.0, 1.0, 4.0)  # anisotropic: nnU-Net plans [1, 2, 2] strides first


def write_raw_dataset(raw: Path) -> Path:
    """Dataset901_Tiny in nnU-Net's raw format: five 16x48x48 volumes with an ellipsoid, one test volume."""
    import SimpleITK as sitk

    folder = raw / "Dataset901_Tiny"
    for sub in ("imagesTr", "labelsTr", "imagesTs"):
        (folder / sub).mkdir(parents=True)
    rng = np.random.default_rng(0)
    z, y, x = np.mgrid[:16, :48, :48]

    def case():
        c = rng.uniform([6, 16, 16], [10, 32, 32])
        label = ((((z - c[0]) / 3) ** 2 + ((y - c[1]) / 10) ** 2 + ((x - c[2]) / 10) ** 2) < 1).astype(np.uint8)
        return (rng.normal(0, 1, label.shape) + 3 * label).astype(np.float32), label

    def write(array, path):
        image = sitk.GetImageFromArray(array)
        image.SetSpacing(SPACING_XYZ)
        sitk.WriteImage(image, str(path))

    for i in range(5):
        image, label = case()
        write(image, folder / "imagesTr" / f"tiny_{i:03d}_0000.nii.gz")
        write(label, folder / "labelsTr" / f"tiny_{i:03d}.nii.gz")
    write(case()[0], folder / "imagesTs" / "tiny_900_0000.nii.gz")
    dataset = {"channel_names": {"0": "MR"}, "labels": {"background": 0, "blob": 1}, "numTraining": 5, "file_ending": ".nii.gz"}
    (folder / "dataset.json").write_text(json.dumps(dataset))
    return folder


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> types.SimpleNamespace:
    """Dataset901_Tiny through nnUNetv2_plan_and_preprocess and nnUNetv2_train -tr <a subclass of
    nnUNetTrainerAttentionGates_1epoch>, each in its own process through nnU-Net's entry points
    (tests/nnunet_cli.py), on the CPU, without data-augmentation workers: the folders, the
    environment, the architecture trained, the training's output and a runner of nnU-Net's commands."""
    tmp = tmp_path_factory.mktemp("nnunet_e2e")
    raw = write_raw_dataset(tmp / "raw")
    ext = tmp / "ext_trainers"
    ext.mkdir()
    (ext / "tiny_trainers.py").write_text(TINY_TRAINER)
    env = {
        **os.environ,
        "nnUNet_raw": str(tmp / "raw"),
        "nnUNet_preprocessed": str(tmp / "preprocessed"),
        "nnUNet_results": str(tmp / "results"),
        "nnUNet_extTrainer": os.pathsep.join([str(trainer_dir()), str(ext)]),
        "nnUNet_def_n_proc": "1",
        "nnUNet_compile": "f",
    }

    def nnunet(*args: str, **extra_env: str) -> str:
        proc = subprocess.run([sys.executable, str(HERE / "nnunet_cli.py"), *args], env={**env, **extra_env},
                              capture_output=True, text=True, timeout=240)  # fmt: skip
        assert proc.returncode == 0, f"{args[0]} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
        return proc.stdout

    nnunet("nnUNetv2_plan_and_preprocess", "-d", "901", "-c", "3d_fullres", "-np", "1", nnUNet_n_proc_DA="1")
    plans_file = tmp / "preprocessed" / "Dataset901_Tiny" / "nnUNetPlans.json"
    plans = json.loads(plans_file.read_text())
    arch = plans["configurations"]["3d_fullres"]["architecture"]
    arch["arch_kwargs"]["features_per_stage"] = [8, 16, 32, 64][: arch["arch_kwargs"]["n_stages"]]  # nnU-Net's 32.. is slow on a CPU
    plans_file.write_text(json.dumps(plans))
    log = nnunet("nnUNetv2_train", "901", "3d_fullres", "0", "-tr", "nnUNetTrainerAttentionGatesTiny", "-device", "cpu",
                 nnUNet_n_proc_DA="0")  # fmt: skip
    model = tmp / "results" / "Dataset901_Tiny" / "nnUNetTrainerAttentionGatesTiny__nnUNetPlans__3d_fullres"
    return types.SimpleNamespace(raw=raw, env=env, arch=arch, log=log, model=model, fold=model / "fold_0", nnunet=nnunet)


@pytest.mark.slow
def test_nnunet_plans_trains_and_predicts_with_the_trainer(trained, tmp_path):
    """The training (one epoch: the 1-epoch variant's), nnU-Net's validation and nnUNetv2_predict, with the gated network."""
    arch = trained.arch
    assert arch["network_class_name"] == PLAIN_CLASS_NAME and [1, 2, 2] in arch["arch_kwargs"]["strides"]
    assert "Training done." in trained.log and "Epoch 0" in trained.log and "Epoch 1" not in trained.log
    checkpoint = torch.load(trained.fold / "checkpoint_final.pth", map_location="cpu", weights_only=False)
    assert checkpoint["trainer_name"] == "nnUNetTrainerAttentionGatesTiny"
    gated = {k.split(".")[2] for k in checkpoint["network_weights"] if k.startswith("decoder.gates.")}
    assert gated == {str(i) for i in range(1, arch["arch_kwargs"]["n_stages"] - 1)}
    assert (trained.fold / "validation" / "summary.json").is_file()  # nnU-Net's validation ran with the gated network

    out = tmp_path / "predictions"
    trained.nnunet("nnUNetv2_predict", "-i", str(trained.raw / "imagesTs"), "-o", str(out), "-d", "901", "-c", "3d_fullres",
                   "-f", "0", "-tr", "nnUNetTrainerAttentionGatesTiny", "-device", "cpu", "-npp", "1", "-nps", "1",
                   "--disable_progress_bar")  # fmt: skip
    import SimpleITK as sitk

    prediction = sitk.ReadImage(str(out / "tiny_900.nii.gz"))
    image = sitk.ReadImage(str(trained.raw / "imagesTs" / "tiny_900_0000.nii.gz"))
    assert prediction.GetSize() == image.GetSize() and prediction.GetSpacing() == pytest.approx(SPACING_XYZ)
    assert set(np.unique(sitk.GetArrayFromImage(prediction))) <= {0, 1}


# --------------------------------------------------------------------------- ONNX export


def predictor_network(model: Path, fold: str) -> nn.Module:
    """The network nnU-Net's predictor runs, with the fold's weights (what the export must match)."""
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

    predictor = nnUNetPredictor(perform_everything_on_device=False, device=torch.device("cpu"), allow_tqdm=False)
    predictor.initialize_from_trained_model_folder(str(model), (fold,))
    return predictor.network.eval()


def onnx_runtime_difference(path: Path, net: nn.Module, shape: tuple[int, ...]) -> float:
    """max |ONNX Runtime - net| on a random ``Tensor[shape]``, over the largest |logit| (at least 1)."""
    import onnxruntime as ort

    x = torch.randn(shape, generator=torch.Generator().manual_seed(sum(shape)))
    (out,) = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(["logits"], {"image": x.numpy()})
    with torch.no_grad():
        ref = net(x)
    assert out.shape == tuple(ref.shape) and ref.shape[2:] == shape[2:]
    return float(np.abs(out - ref.numpy()).max() / max(1.0, ref.abs().max().item()))


def onnx_input_dims(path: Path) -> list:
    import onnx

    return [d.dim_param or d.dim_value for d in onnx.load(str(path)).graph.input[0].type.tensor_type.shape.dim]


@pytest.mark.slow
def test_export_of_the_trained_folder_runs_in_onnx_runtime_at_other_sizes(trained, monkeypatch, capsys):
    """attention-gates-nnunet export on the trained folder: the gated network of the checkpoint's trainer,
    dynamic batch and sizes, equal to nnU-Net's predictor network in ONNX Runtime at two sizes (odd
    multiples of the strides' products) other than the export's and its own check's."""
    import onnx

    nnunet_can_look_up_trainers(monkeypatch, trained.env["nnUNet_extTrainer"])
    cli(["export", str(trained.model)])
    out = capsys.readouterr().out
    path = trained.fold / "checkpoint_final.onnx"
    multiples = size_multiples(trained.arch["arch_kwargs"]["strides"], 3)
    assert multiples[0] < multiples[1] == multiples[2]  # the anisotropic plan: fewer strides along z
    assert f"wrote {path} (" in out and "AttentionPlainConvUNet of nnUNetTrainerAttentionGatesTiny, fold 0, checkpoint_final.pth" in out
    assert f"input 'image': Tensor[N, 1, D, H, W] float32, D, H, W multiples of {multiples[0]}, {multiples[1]}, {multiples[2]} (" in out
    checked = re.search(r"on a random Tensor\[1, 1, (\d+), (\d+), (\d+)\]: max \|difference\| (\S+) \(tolerance (\S+)\)", out)
    assert tuple(int(checked.group(i)) for i in (1, 2, 3)) == tuple(3 * m for m in multiples)
    assert float(checked.group(4)) <= float(checked.group(5))
    assert onnx_input_dims(path) == ["batch", 1, *[f"{m}*{a}_blocks" for m, a in zip(multiples, ("depth", "height", "width"))]]
    meta = {p.key: json.loads(p.value) for p in onnx.load(str(path)).metadata_props}
    assert meta["nnunet.trainer"] == "nnUNetTrainerAttentionGatesTiny" and meta["nnunet.size_multiples"] == list(multiples)
    assert meta["nnunet.model_folder"] == "nnUNetTrainerAttentionGatesTiny__nnUNetPlans__3d_fullres" and meta["nnunet.fold"] == "0"

    net = predictor_network(trained.model, "0")
    assert type(net) is AttentionPlainConvUNet and not net.decoder.deep_supervision
    for blocks, n in (((5, 1, 3), 2), ((1, 5, 7), 1)):
        assert onnx_runtime_difference(path, net, (n, 1, *(b * m for b, m in zip(blocks, multiples)))) < 1e-4

    written = path.stat().st_mtime_ns
    with pytest.raises(SystemExit) as exit_:
        cli(["export", str(trained.model)])
    assert exit_.value.code == 2 and path.stat().st_mtime_ns == written
    assert capsys.readouterr().err.strip() == f"error: output {path} exists: pass overwrite=True (--overwrite) to replace it"


def model_folder(root: Path, net: nn.Module, configuration: str, fold: str, trainer: str = "nnUNetTrainer") -> Path:
    """A trained model folder as nnU-Net writes it, holding ``net``'s weights in ``fold_<fold>``."""
    folder = root / f"{trainer}__nnUNetPlans__{configuration}"
    (folder / f"fold_{fold}").mkdir(parents=True)
    (folder / "plans.json").write_text(json.dumps(plans_dict()))
    (folder / "dataset.json").write_text(json.dumps(DATASET_JSON))
    torch.save(nnunet_checkpoint(net, plans_dict(), configuration, trainer), folder / f"fold_{fold}" / "checkpoint_final.pth")
    return folder


@pytest.mark.slow
def test_export_of_a_plain_2d_network_from_fold_all(tmp_path, monkeypatch, capsys):
    """nnU-Net's own PlainConvUNet (2D, trained with deep supervision) from the folder's only fold, 'all':
    the model computes the saved weights' logits at other sizes; a check that fails writes nothing."""
    plain = as_trained(build(PlainConvUNet, "2d", deep_supervision=True))
    folder = model_folder(tmp_path, plain, "2d", fold="all")
    result = export_onnx(folder, output=tmp_path / "out" / "plain.onnx", opset=20)
    assert result.path == tmp_path / "out" / "plain.onnx" and result.fold == "all" and result.network == "PlainConvUNet"
    assert (result.multiples, result.checked_shape, result.opset, result.classes) == ((4, 4), (1, 2, 12, 12), 20, 3)
    assert 0 < result.max_difference <= result.tolerance
    assert onnx_input_dims(result.path) == ["batch", 2, "4*height_blocks", "4*width_blocks"]
    plain.eval().decoder.deep_supervision = False
    for shape in ((3, 2, 20, 4), (1, 2, 28, 36)):
        assert onnx_runtime_difference(result.path, plain, shape) < 1e-4
    # a check that fails (no difference tolerated) is exit status 1 and writes nothing
    monkeypatch.setattr(export_module, "TOLERANCE", 0.0)
    with pytest.raises(SystemExit) as exit_:
        cli(["export", str(folder), "-o", str(tmp_path / "out" / "strict.onnx")])
    assert exit_.value.code == 1 and sorted(p.name for p in (tmp_path / "out").iterdir()) == ["plain.onnx"]
    assert re.fullmatch(r"error: ONNX Runtime's logits differ from the PyTorch model's by up to \S+ on Tensor\[1, 2, 12, 12\] "
                        r"\(tolerance 0\); nothing written\n", capsys.readouterr().err)  # fmt: skip


def test_export_errors(tmp_path, monkeypatch, capsys):
    """A wrong argument or set-up is one line naming it and exit status 2, and nothing is written; the
    arguments are checked before anything is loaded."""
    folder = model_folder(tmp_path, build(PlainConvUNet, "3d"), "3d_fullres", fold="0", trainer="nnUNetTrainerNoSuchThing")
    (folder / "fold_1").mkdir()
    torch.save({}, folder / "fold_1" / "checkpoint_best.pth")
    (folder / "fold_0" / "taken.onnx").write_bytes(b"mine")

    def error(*args: str) -> str:
        with pytest.raises(SystemExit) as exit_:
            cli(["export", *args])
        assert exit_.value.code == 2
        return capsys.readouterr().err.strip()

    assert error(str(tmp_path / "missing")) == f"error: model folder {tmp_path / 'missing'} does not exist or is not a folder"
    assert error(str(tmp_path)).startswith(f"error: {tmp_path} is not a trained nnU-Net model folder: it has no plans.json and no dataset.json")
    assert error(str(folder), "-f", "1") == (
        f"error: fold_1 of {folder} has no checkpoint_final.pth; it has ['checkpoint_best.pth']. nnU-Net writes checkpoint_final.pth "
        "when a training ends; while it runs, checkpoint_best.pth (at each new best EMA pseudo Dice) and checkpoint_latest.pth "
        "(every 50 epochs): pass one of those as the checkpoint")  # fmt: skip
    assert error(str(folder), "-f", "3") == f"error: {folder} has no fold_3 (its folds: ['0', '1'])"
    assert error(str(folder), "-f", "first") == "error: fold must be a fold number or 'all', got 'first'"
    assert error(str(folder), "--opset", "17") == "error: opset must be 18 or later (torch's ONNX exporter), got 17"
    taken = folder / "fold_0" / "taken.onnx"
    assert error(str(folder), "-o", str(taken)) == f"error: output {taken} exists: pass overwrite=True (--overwrite) to replace it"
    assert error(str(folder), "-o", str(folder)) == f"error: output {folder} is a folder; expected the ONNX file to write"
    nnunet_can_look_up_trainers(monkeypatch, str(trainer_dir()))
    assert error(str(folder)).startswith(f"error: nnU-Net cannot find the trainer that {folder.name} was trained with: list the "
                                         "folder that defines it in nnUNet_extTrainer")  # fmt: skip
    assert taken.read_bytes() == b"mine" and sorted(p.name for p in (folder / "fold_0").iterdir()) == ["checkpoint_final.pth", "taken.onnx"]
    import nnunet_cli  # on sys.path: nnunet_can_look_up_trainers put it there

    class TorchvisionOfAnotherTorch(importlib.abc.MetaPathFinder):
        """Importing nnU-Net's Primus trainers fails as it does beside a torchvision built for another torch."""

        def find_spec(self, name, path=None, target=None):
            if name == nnunet_cli.PRIMUS:
                raise RuntimeError("operator torchvision::nms does not exist")
            return None

    monkeypatch.delitem(sys.modules, nnunet_cli.PRIMUS, raising=False)
    monkeypatch.setattr(sys, "meta_path", [TorchvisionOfAnotherTorch(), *sys.meta_path])
    assert error(str(folder)) == (
        "error: nnU-Net's trainer lookup imports torchvision (through timm), and that import failed: operator torchvision::nms "
        "does not exist. This is a torchvision built for another torch (a CUDA torchvision beside a CPU-only torch, or the "
        "reverse): install the torchvision build that matches your torch")  # fmt: skip
    shutil.rmtree(folder / "fold_0")
    assert error(str(folder)) == f"error: {folder} has no fold_0 and no fold_all (its folds: ['1']): pass the fold"


# --------------------------------------------------------------------------- the benchmark


def test_cost_benchmark_quick_writes_consistent_results(tmp_path):
    """benchmarks/nnunet_cost.py --quick: the JSON is what it returned, the parameter counts are those
    of the networks built from the plan it stores, the ratios follow from the rows (no timing asserted)."""
    import statistics

    from benchmarks import nnunet_cost

    threads = torch.get_num_threads()
    try:
        returned = nnunet_cost.main(["--quick", "--device", "cpu", "--no-rss", "--threads", "1", "--out", str(tmp_path)])
    finally:
        torch.set_num_threads(threads)
    data = json.loads((tmp_path / "nnunet_cost.json").read_text())
    assert data == json.loads(json.dumps(returned))
    rows = {r["model"]: r for r in data["results"]}
    assert set(rows) == {"PlainConvUNet", "AttentionPlainConvUNet"}
    for model, cls in (("PlainConvUNet", PlainConvUNet), ("AttentionPlainConvUNet", AttentionPlainConvUNet)):
        name = CLASS_NAME if cls is AttentionPlainConvUNet else PLAIN_CLASS_NAME
        net = get_network_from_plans(name, data["plan"]["arch_kwargs"], REQUIRES_IMPORT, 1, 3, deep_supervision=True)
        assert rows[model]["params"] == sum(p.numel() for p in net.parameters())
        assert rows[model]["feature_map_size"] == net.compute_conv_feature_map_size(data["plan"]["patch_size"])
        samples = data["samples"][model]
        assert len(samples["train_step_s"]) == data["settings"]["repeats"] == 2
        assert rows[model]["train_step_s"] == statistics.median(samples["train_step_s"]) > 0
        assert rows[model]["forward_s"] == statistics.median(samples["forward_s"]) > 0
        assert rows[model]["train_step_flops"] > 2 * rows[model]["forward_flops"] > 0
    plain, gated = rows["PlainConvUNet"], rows["AttentionPlainConvUNet"]
    assert gated["params"] > plain["params"] and gated["forward_flops"] > plain["forward_flops"]
    for r in data["ratios"]:
        if r["metric"] == "step_memory_bytes":
            assert r["gated_over_plain"] is None  # --no-rss on the CPU
        else:
            assert r["gated_over_plain"] == pytest.approx(gated[r["metric"]] / plain[r["metric"]])
        if r["metric"] in ("forward_s", "train_step_s"):
            per_round = [g / p for g, p in zip(data["samples"]["AttentionPlainConvUNet"][r["metric"]], data["samples"]["PlainConvUNet"][r["metric"]])]
            assert r["paired"] == pytest.approx(statistics.median(per_round))
        else:
            assert r["paired"] is None
    assert data["settings"]["gates"] == {**GATE_DEFAULTS, "gated_skips": list(range(1, data["plan"]["arch_kwargs"]["n_stages"] - 1))}
