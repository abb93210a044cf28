"""attention_gates.transfer: the one state matcher, the shared gate pass-through, and the module layering."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch

import attention_gates
from attention_gates import AttentionUNet2D, GridAttentionGate, MultiAttentionGate, UNet2D, finetune, transfer
from attention_gates.transfer import StateMatch, init_gate_passthrough, match_state

PACKAGE = Path(attention_gates.__file__).resolve().parent


def t(*shape: int) -> torch.Tensor:
    return torch.zeros(shape)


# ---------------------------------------------------------------- match_state


def test_match_state_names_missing_unexpected_and_misshaped_entries():
    source = {"a": t(2, 3), "b": t(4), "extra": t(5, 1), "gates.0.psi": t(1)}
    target = {"a": t(2, 3), "b": t(8), "head": t(2), "gates.0.psi": t(3), "gating.w": t(1)}
    m = match_state(source, target, ("gates.", "gating."))
    assert isinstance(m, StateMatch)
    assert (m.matched, m.missing, m.misshaped, m.unexpected) == (["a"], ["head"], ["b"], ["extra"])
    assert m.source_gates == ["gates.0.psi"] and m.target_gates == ["gates.0.psi", "gating.w"]
    assert m.problems == [  # the target's entries in its order, then the source's unexpected ones
        "'b' is shape [4] in the source but [8] in the model",
        "'head' is absent from the source but shape [2] in the model",
        "'extra' is shape [5, 1] in the source but absent from the model",
    ]
    assert m.summary() == "'b' is shape [4] in the source but [8] in the model (and 2 more)"
    assert m.summary(["first of mine"]) == "first of mine (and 3 more)"


def test_match_state_of_fitting_states_has_no_problems():
    state = UNet2D(filters=[4, 8]).state_dict()
    target = AttentionUNet2D(filters=[4, 8], attention_levels=(1,)).state_dict()
    m = match_state(state, target, ("gates.", "gating."))
    assert m.problems == [] and m.summary() == ""
    assert m.matched == list(state) and m.target_gates and all(k.startswith(("gates.1.", "gating.")) for k in m.target_gates)
    assert m.source_gates == []


def test_match_state_gate_prefixes_are_prefixes_not_substrings():
    m = match_state({"decoder.gates.1.w": t(1), "gates_like": t(1)}, {"gates_like": t(1)}, ["decoder.gates."])
    assert m.source_gates == ["decoder.gates.1.w"] and m.matched == ["gates_like"] and m.problems == []


def test_the_nnunet_network_uses_the_one_matcher():
    pytest.importorskip("dynamic_network_architectures", reason="the nnunet extra")
    from attention_gates.integrations.nnunet import network

    assert network.match_state is match_state
    text = Path(network.__file__).read_text()
    assert "match_state(" in text and "in the source but" not in text  # no matcher of its own


# ---------------------------------------------------------------- pass-through


@pytest.mark.parametrize("psi_bias", [12.0, 3.0])
def test_init_gate_passthrough_makes_alpha_the_sigmoid_of_the_bias(psi_bias):
    torch.manual_seed(0)
    gate = GridAttentionGate(2, 4, 6, output_transform=False).double()
    theta = gate.theta.weight.clone()
    assert init_gate_passthrough(gate, psi_bias) is gate
    x, g = torch.randn(2, 4, 8, 6, dtype=torch.float64), torch.randn(2, 6, 4, 3, dtype=torch.float64)
    out, alpha = gate(x, g)
    expected = torch.sigmoid(torch.tensor(psi_bias, dtype=torch.float64))
    torch.testing.assert_close(alpha, expected.expand_as(alpha))
    torch.testing.assert_close(out, expected * x)
    assert torch.equal(gate.theta.weight, theta)  # theta and phi keep their values


def test_init_gate_passthrough_takes_a_gate():
    with pytest.raises(TypeError, match="gate must be a GridAttentionGate, got MultiAttentionGate"):
        init_gate_passthrough(MultiAttentionGate(2, 4, 6))


def test_init_passthrough_needs_an_attention_unet():
    with pytest.raises(TypeError, match="model must be an AttentionUNet, got UNet2D"):
        transfer.init_passthrough(UNet2D(filters=[4, 8]))


# ---------------------------------------------------------------- names and layering


@pytest.mark.parametrize("name", ["TransferReport", "attention_unet_from_unet", "checkpoint_config", "init_passthrough"])
def test_finetune_and_the_package_reexport_the_transfer_names(name):
    assert getattr(finetune, name) is getattr(transfer, name) is getattr(attention_gates, name)
    assert getattr(transfer, name).__module__ == "attention_gates.transfer"


def test_network_from_config_is_the_packages():
    assert attention_gates.network_from_config is transfer.network_from_config


LAYERS = ["layers", "gates", "blocks", "nets", "transfer", "finetune"]  # each imports only those before it


def module_level_imports(path: Path) -> list[ast.ImportFrom]:
    """The ``from ... import`` statements run when the module is imported (not under ``if TYPE_CHECKING``)."""
    return [node for node in ast.parse(path.read_text()).body if isinstance(node, ast.ImportFrom)]


@pytest.mark.parametrize("name", LAYERS)
def test_imports_go_down_the_layers(name):
    for node in module_level_imports(PACKAGE / f"{name}.py"):
        if node.level == 1 and node.module in LAYERS:
            assert LAYERS.index(node.module) < LAYERS.index(name), f"{name} imports {node.module}"


OWN_MODULES = [
    *(f"{m}.py" for m in LAYERS), "convert.py", "functional.py", "__init__.py",
    "integrations/nnunet/network.py", "integrations/nnunet/plans.py", "integrations/nnunet/__init__.py",
]  # fmt: skip


@pytest.mark.parametrize("path", OWN_MODULES)
def test_no_module_imports_another_modules_private_names(path):
    tree = ast.parse((PACKAGE / path).read_text())
    private = [
        f"{node.module}.{alias.name}"
        for node in ast.walk(tree)
        if isinstance(node, ast.ImportFrom) and node.level > 0
        for alias in node.names
        if alias.name.startswith("_")
    ]
    assert private == []
