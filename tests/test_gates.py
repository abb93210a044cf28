"""GridAttentionGate and MultiAttentionGate: parameters, defaults, normalisation state, errors."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

import attention_gates
from attention_gates import GridAttentionGate, GridAttentionGate2D, GridAttentionGate3D, MultiAttentionGate
from attention_gates import functional as AF
from attention_gates.functional import GateWeights
from gate_cases import DT, functional_args, inputs, randomise, reference



def close(a, b, tol=1e-10):
    torch.testing.assert_close(a, b, rtol=tol, atol=tol)


# ---------------------------------------------------------------------------------------------
# module = functional
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("training", [False, True])
@pytest.mark.parametrize(
    "kw",
    [
        {},
        dict(subsample_factor=(2, 1, 3), sigma1="softplus", sigma2="softmax"),
        dict(inter_channels=5, align_corners=True),
    ],
)
def test_module_equals_functional(training, kw):
    gate = randomise(GridAttentionGate(3, 4, 6, **kw).to(DT)).train(training)
    x, g = inputs()
    args = functional_args(gate)
    out, alpha = gate(x, g)
    want, want_alpha = reference(
        x, g, *args, training=training, momentum=0.1,
        sigma1=gate.sigma1, sigma2=gate.sigma2, align_corners=gate.align_corners,
    )  # fmt: skip
    close(out, want)
    close(alpha, want_alpha)
    close(gate.W[1].running_mean, args[9])
    close(gate.W[1].running_var, args[10])


@pytest.mark.parametrize("cls,d", [(GridAttentionGate2D, 2), (GridAttentionGate3D, 3)])
def test_2d_3d_faces(cls, d):
    gate = cls(4, 6, subsample_factor=2).to(DT).eval()
    assert isinstance(gate, GridAttentionGate) and gate.spatial_dims == d
    assert gate.theta.weight.shape == (2, 4) + (2,) * d
    generic = GridAttentionGate(d, 4, 6).to(DT).eval()
    generic.load_state_dict(gate.state_dict())
    x, g = inputs(d=d)
    out, alpha = gate(x, g)
    close(out, generic(x, g)[0])
    assert out.shape == x.shape and alpha.shape == (2, 1) + x.shape[2:]


def test_1d_gate():
    gate = GridAttentionGate(1, 3, 2, subsample_factor=3).to(DT)
    x, g = inputs(d=1, c_l=3, c_g=2, size=(11,), g_size=(4,))
    out, alpha = gate(x, g)
    assert out.shape == (2, 3, 11) and alpha.shape == (2, 1, 11)


# ---------------------------------------------------------------------------------------------
# defaults, names, shapes, initialisation
# ---------------------------------------------------------------------------------------------


def test_defaults():
    gate = GridAttentionGate(3, 10, 7)
    assert gate.inter_channels == 5
    assert GridAttentionGate(3, 1, 7).inter_channels == 1  # at least one channel
    assert gate.subsample_factor == (2, 2, 2)
    assert (gate.sigma1, gate.sigma2, gate.norm, gate.align_corners, gate.backend) == (
        "relu", "sigmoid", "batch", False, None,
    )  # fmt: skip
    assert isinstance(gate.W[1], nn.BatchNorm3d)


def test_parameter_names_and_shapes():
    gate = GridAttentionGate(3, 4, 6, inter_channels=3, subsample_factor=(2, 1, 3))
    params = {n: tuple(p.shape) for n, p in gate.named_parameters()}
    assert params == {
        "theta.weight": (3, 4, 2, 1, 3),
        "phi.weight": (3, 6, 1, 1, 1),
        "phi.bias": (3,),
        "psi.weight": (1, 3, 1, 1, 1),
        "psi.bias": (1,),
        "W.0.weight": (4, 4, 1, 1, 1),
        "W.0.bias": (4,),
        "W.1.weight": (4,),
        "W.1.bias": (4,),
    }
    assert {n for n, _ in gate.named_buffers()} == {"W.1.running_mean", "W.1.running_var", "W.1.num_batches_tracked"}
    assert gate.theta.stride == (2, 1, 3) and gate.theta.bias is None


def test_kaiming_init():
    torch.manual_seed(0)
    gate = GridAttentionGate(3, 64, 64)
    for conv, rel in ((gate.theta, 0.05), (gate.phi, 0.08), (gate.W[0], 0.06)):
        w = conv.weight
        fan_in = w[0].numel()
        assert abs(w.std().item() / math.sqrt(2.0 / fan_in) - 1) < rel, conv
        assert abs(w.mean().item()) < 3 * math.sqrt(2.0 / fan_in / w.numel())
    for b in (gate.phi.bias, gate.psi.bias, gate.W[0].bias, gate.W[1].bias):
        assert torch.count_nonzero(b) == 0
    assert torch.all(gate.W[1].weight == 1)


def test_alpha_on_x_grid_odd_sizes():
    gate = GridAttentionGate(2, 3, 5, subsample_factor=(3, 2)).to(DT)
    x, g = inputs(d=2, c_l=3, c_g=5, size=(11, 7), g_size=(2, 5))
    out, alpha = gate(x, g)
    assert out.shape == (2, 3, 11, 7) and alpha.shape == (2, 1, 11, 7)
    assert torch.all((alpha > 0) & (alpha < 1))


def test_output_transform_false():
    gate = GridAttentionGate(3, 4, 6, output_transform=False).to(DT)
    assert gate.W is None
    assert {n for n, _ in gate.named_parameters()} == {"theta.weight", "phi.weight", "phi.bias", "psi.weight", "psi.bias"}
    x, g = inputs()
    out, alpha = gate(x, g)
    close(out, alpha * x, 0)


def test_repr():
    text = repr(GridAttentionGate(3, 4, 6, subsample_factor=(2, 2, 1), backend="reference"))
    assert text.startswith(
        "GridAttentionGate(\n  spatial_dims=3, in_channels=4, gating_channels=6, inter_channels=2, subsample_factor=(2, 2, 1), "
        "sigma1='relu', sigma2='sigmoid', output_transform=True, norm='batch', num_groups=8, align_corners=False, "
        "backend='reference'\n"
    )
    for part in ("(theta): Conv3d(4, 2, kernel_size=(2, 2, 1), stride=(2, 2, 1), bias=False)", "(W): Sequential("):
        assert part in text


REBUILT = {  # id: a gate built with every argument away from its default
    "GridAttentionGate": lambda: GridAttentionGate(
        1, 3, 5, inter_channels=4, subsample_factor=3, sigma1="softplus", sigma2="softmax", output_transform=False,
        norm="group", num_groups=2, align_corners=True, backend="reference",
    ),
    "GridAttentionGate2D": lambda: GridAttentionGate2D(4, 6, 3, (2, 1), norm="instance"),
    "GridAttentionGate3D": lambda: GridAttentionGate3D(4, 6, norm="none", backend="cpu"),
    "MultiAttentionGate": lambda: MultiAttentionGate(
        2, 4, 6, inter_channels=5, subsample_factor=(1, 2), heads=3, norm="group", num_groups=2, sigma1="softplus",
        output_transform=False, align_corners=True, backend="reference",
    ),
}  # fmt: skip


@pytest.mark.parametrize("make", REBUILT.values(), ids=REBUILT.keys())
def test_repr_builds_the_gate_again(make):
    """``eval`` of the class name and ``extra_repr`` gives a gate of the same arguments and state."""
    gate = make()
    again = eval(f"{type(gate).__name__}({gate.extra_repr()})", vars(attention_gates))
    assert type(again) is type(gate) and repr(again) == repr(gate)
    assert {k: v.shape for k, v in again.state_dict().items()} == {k: v.shape for k, v in gate.state_dict().items()}
    assert "spatial_dims=" in gate.extra_repr() or type(gate) in (GridAttentionGate2D, GridAttentionGate3D)


def test_module_passes_its_tensors_by_field_name(monkeypatch):
    """The module names each tensor (GateWeights' fields) in its call of functional.grid_attention."""
    calls = []
    real = AF.grid_attention

    def spy(*args, **kwargs):
        calls.append((args, kwargs))
        return real(*args, **kwargs)

    monkeypatch.setattr(AF, "grid_attention", spy)
    gate = randomise(GridAttentionGate(3, 4, 6).to(DT)).train()
    x, g = inputs()
    gate(x, g)
    (args, kwargs), = calls
    assert len(args) == 2 and args[0] is x and args[1] is g
    conv, bn = gate.W
    named = {
        "theta_weight": gate.theta.weight, "phi_weight": gate.phi.weight, "phi_bias": gate.phi.bias,
        "psi_weight": gate.psi.weight, "psi_bias": gate.psi.bias, "W_weight": conv.weight, "W_bias": conv.bias,
        "norm_weight": bn.weight, "norm_bias": bn.bias, "running_mean": bn.running_mean, "running_var": bn.running_var,
    }  # fmt: skip
    assert set(named) == set(GateWeights._fields)
    assert all(kwargs[k] is v for k, v in named.items())
    assert (kwargs["norm"], kwargs["training"], kwargs["momentum"], kwargs["eps"]) == ("batch", True, 0.1, bn.eps)


# ---------------------------------------------------------------------------------------------
# normalisation in W: exactly as the torch.nn layers
# ---------------------------------------------------------------------------------------------


def manual_twin(gate):
    """The same gate with W run by hand: a gate without W, then nn.ConvNd and the norm module."""
    bare = GridAttentionGate(
        gate.spatial_dims, gate.in_channels, gate.gating_channels, gate.inter_channels, gate.subsample_factor,
        output_transform=False,
    ).to(DT)  # fmt: skip
    for name in ("theta", "phi", "psi"):
        getattr(bare, name).load_state_dict(getattr(gate, name).state_dict())
    conv, nrm = copy.deepcopy(gate.W[0]), copy.deepcopy(gate.W[1])
    return lambda x, g: nrm(conv(bare(x, g)[0])), nrm


@pytest.mark.parametrize("momentum", [0.1, 0.37, None])
def test_batch_norm_state_as_nn_batchnorm(momentum):
    gate = randomise(GridAttentionGate(3, 4, 6).to(DT))
    gate.W[1].momentum = momentum
    twin, bn = manual_twin(gate)
    gate.train(), bn.train()
    for step in range(3):
        x, g = inputs(seed=10 + step)
        close(gate(x, g)[0], twin(x, g))
        mine = gate.W[1]
        close(mine.running_mean, bn.running_mean)
        close(mine.running_var, bn.running_var)
        assert mine.num_batches_tracked.item() == bn.num_batches_tracked.item() == step + 1
    gate.eval(), bn.eval()
    x, g = inputs(seed=99)
    close(gate(x, g)[0], twin(x, g))
    assert gate.W[1].num_batches_tracked.item() == 3  # eval does not count


def test_batch_norm_without_running_stats():
    gate = randomise(GridAttentionGate(2, 4, 6).to(DT))
    gate.W[1] = nn.BatchNorm2d(4, track_running_stats=False).to(DT)
    twin, bn = manual_twin(gate)
    x, g = inputs(d=2)
    for mode in (True, False):  # batch statistics in both modes
        gate.train(mode), bn.train(mode)
        close(gate(x, g)[0], twin(x, g))


@pytest.mark.parametrize("norm,cls", [("instance", nn.InstanceNorm3d), ("group", nn.GroupNorm), ("none", nn.Identity)])
def test_other_norms_as_nn_layers(norm, cls):
    gate = randomise(GridAttentionGate(3, 6, 4, norm=norm, num_groups=3).to(DT))
    assert isinstance(gate.W[1], cls)
    assert gate.num_groups == 3  # the argument, kept whatever the norm
    twin, _ = manual_twin(gate)
    x, g = inputs(c_l=6, c_g=4)
    for mode in (True, False):
        gate.train(mode)
        close(gate(x, g)[0], twin(x, g))


def test_group_norm_groups_divide_channels():
    gate = GridAttentionGate(2, 6, 4, norm="group", num_groups=4)
    assert gate.W[1].num_groups == 3 and gate.num_groups == 4  # the norm got the largest divisor of 6 up to 4
    x, g = inputs(d=2, c_l=6, c_g=4)
    twin, _ = manual_twin(gate.to(DT))
    close(gate(x, g)[0], twin(x, g))  # and the gate normalises with the groups the norm got


# ---------------------------------------------------------------------------------------------
# MultiAttentionGate
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("heads", [1, 2])
@pytest.mark.parametrize("training", [False, True])
def test_multi_gate_is_cat_of_heads_and_combine(heads, training):
    block = randomise(MultiAttentionGate(3, 4, 6, inter_channels=3, heads=heads).to(DT)).train(training)
    assert len(block.gates) == heads and block.heads == heads
    assert block.combine[0].weight.shape == (4, 4 * heads, 1, 1, 1)
    assert isinstance(block.combine[1], nn.BatchNorm3d) and isinstance(block.combine[2], nn.ReLU)
    assert all(gate.inter_channels == 3 for gate in block.gates)
    ref = copy.deepcopy(block)
    x, g = inputs()
    out, alpha = block(x, g)
    outs, alphas = zip(*(gate(x, g) for gate in ref.gates))
    close(out, ref.combine(torch.cat(outs, dim=1)))
    close(alpha, torch.cat(alphas, dim=1))
    assert out.shape == x.shape and alpha.shape == (2, heads) + x.shape[2:]
    if heads == 2:  # the heads are independent gates
        assert not torch.allclose(alpha[:, 0], alpha[:, 1])


def test_multi_gate_parameter_names():
    names = {n for n, _ in MultiAttentionGate(2, 4, 6, heads=2).named_parameters()}
    assert {"gates.0.theta.weight", "gates.1.W.1.bias", "combine.0.weight", "combine.1.weight"} <= names
    assert len(names) == 2 * 9 + 4


# ---------------------------------------------------------------------------------------------
# errors
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "args,kw,match",
    [
        ((4, 4, 6), {}, r"spatial_dims must be 1, 2 or 3, got 4"),
        ((3, 0, 6), {}, r"in_channels must be a positive int, got 0"),
        ((3, 4, 2.5), {}, r"gating_channels must be a positive int, got 2\.5"),
        ((3, 4, 6, 0), {}, r"inter_channels must be a positive int or None, got 0"),
        ((3, 4, 6), dict(subsample_factor=(2, 2)), r"subsample_factor must be a positive int or 3 positive ints, got \(2, 2\)"),
        ((3, 4, 6), dict(subsample_factor=0), r"subsample_factor must be a positive int or 3 positive ints"),
        ((3, 4, 6), dict(sigma1="tanh"), r"sigma1 must be one of \('relu', 'softplus'\), got 'tanh'"),
        ((3, 4, 6), dict(sigma2="relu"), r"sigma2 must be one of \('sigmoid', 'softmax'\), got 'relu'"),
        ((3, 4, 6), dict(norm="layer"), r"norm must be one of .*got 'layer'"),
        ((3, 4, 6), dict(norm="layer", output_transform=False), r"norm must be one of .*got 'layer'"),
        ((3, 4, 6), dict(backend="fast"), r"backend must be one of .*got 'fast'"),
    ],
)
def test_constructor_errors(args, kw, match):
    with pytest.raises(ValueError, match=match):
        GridAttentionGate(*args, **kw)


def test_multi_gate_heads_error():
    with pytest.raises(ValueError, match=r"heads must be a positive int, got 0"):
        MultiAttentionGate(3, 4, 6, heads=0)


def test_forward_dims_error():
    gate = GridAttentionGate2D(4, 6)
    x, g = inputs(d=3, n=1)
    with pytest.raises(ValueError, match=r"GridAttentionGate2D expects x as Tensor\[N, C, \*S\] with 2 spatial dims, got 5 dims"):
        gate(x.float(), g.float())


def test_forward_channel_error_names_argument():
    gate = GridAttentionGate(3, 4, 6)
    x, g = inputs(c_g=5)
    with pytest.raises(ValueError, match=r"phi_weight must have shape \[2, 5, 1, 1, 1\]"):
        gate.double()(x, g)
