"""GridAttentionGate and MultiAttentionGate: parameters, defaults, normalisation state, errors."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

from attention_gates import GridAttentionGate, GridAttentionGate2D, GridAttentionGate3D, MultiAttentionGate
from attention_gates.functional import grid_attention_reference
from attention_gates.ops.cpu import multi_gate_inference_cpu

DT = torch.float64


def inputs(d=3, n=2, c_l=4, c_g=6, size=(6, 5, 7), g_size=(3, 2, 4), seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, c_l, *size[:d], generator=gen, dtype=DT)
    g = torch.randn(n, c_g, *g_size[:d], generator=gen, dtype=DT)
    return x, g


def randomise(module, seed=1):
    """Random values for every parameter and normalisation buffer (so that no test passes on an identity)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * 0.5 + (1.0 if name.endswith("1.weight") else 0.0))
        for m in module.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.running_mean is not None:
                m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=gen, dtype=m.running_mean.dtype))
                m.running_var.uniform_(0.5, 1.5, generator=gen)
    return module


def functional_args(gate):
    """The gate's parameters in grid_attention's argument order (running statistics cloned)."""
    conv, nrm = gate.W[0], gate.W[1]
    return [
        gate.theta.weight, gate.phi.weight, gate.phi.bias, gate.psi.weight, gate.psi.bias,
        conv.weight, conv.bias, nrm.weight, nrm.bias, nrm.running_mean.clone(), nrm.running_var.clone(),
    ]  # fmt: skip


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
    want, want_alpha = grid_attention_reference(
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
    assert text.startswith("GridAttentionGate(")
    for part in (
        "spatial_dims=3, in_channels=4, gating_channels=6, inter_channels=2, subsample_factor=(2, 2, 1)",
        "sigma1='relu', sigma2='sigmoid', norm='batch', backend='reference'",
        "(theta): Conv3d(4, 2, kernel_size=(2, 2, 1), stride=(2, 2, 1), bias=False)",
        "(W): Sequential(",
    ):
        assert part in text


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
    assert gate.num_groups == (3 if norm == "group" else 1)
    twin, _ = manual_twin(gate)
    x, g = inputs(c_l=6, c_g=4)
    for mode in (True, False):
        gate.train(mode)
        close(gate(x, g)[0], twin(x, g))


def test_group_norm_groups_divide_channels():
    gate = GridAttentionGate(2, 6, 4, norm="group", num_groups=4)
    assert gate.W[1].num_groups == gate.num_groups == 3


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


# The folded inference path of MultiAttentionGate (cpu backend)
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
        out, alpha = grid_attention_reference(
            x, g, *args, **kw, sigma1=gate.sigma1, sigma2=gate.sigma2, align_corners=gate.align_corners
        )
        outs.append(out)
        alphas.append(alpha)
    return block.combine(torch.cat(outs, dim=1)), torch.cat(alphas, dim=1)


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("norm", ["batch", "none"])
@pytest.mark.parametrize("dims, heads", [(3, 2), (2, 1), (2, 3)])
def test_multi_gate_folded_inference_equals_head_by_head(dims, heads, norm, channels_last):
    """In float32 CPU inference the block is relu(c + sum_i alpha_i * (A_i x)): one product over x."""
    block = randomise(MultiAttentionGate(dims, 8, 12, inter_channels=6, heads=heads, norm=norm)).eval()
    x, g = inputs(d=dims, c_l=8, c_g=12, size=(12, 10, 6), g_size=(6, 5, 3))
    x, g = x.float(), g.float()
    if channels_last:
        fmt = torch.channels_last if dims == 2 else torch.channels_last_3d
        x, g = x.contiguous(memory_format=fmt), g.contiguous(memory_format=fmt)
    with torch.no_grad():
        want32 = _unfolded(block, x, g)
        truth = _unfolded(copy.deepcopy(block).double(), x.double(), g.double())
    with torch.no_grad():
        assert block._folded(x, g) is not None
        out, alpha = block(x, g)
    A, c = block.folded_output_map()
    assert A.shape == (heads * 8, 8) and c.shape == (8,)
    # exact algebra: the folded computation in float64 equals the head-by-head one to rounding
    block64 = copy.deepcopy(block).double()
    heads_params = [(gt.theta.weight, gt.phi.weight, gt.phi.bias, gt.psi.weight, gt.psi.bias) for gt in block64.gates]
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


def test_multi_gate_folded_output_has_x_strides_for_one_channels_last_sample():
    """With N = 1 a layout inferred from sliced operands can put the batch stride anywhere (still
    'channels-last'), and torch.cat then takes a slow copy: the output takes x's strides."""
    block = MultiAttentionGate(3, 8, 12, inter_channels=6).eval()
    x = torch.randn(1, 8, 8, 8, 8).contiguous(memory_format=torch.channels_last_3d)
    g = torch.randn(1, 12, 4, 4, 4).contiguous(memory_format=torch.channels_last_3d)
    with torch.no_grad():
        out, _ = block(x, g)
    assert out.stride() == x.stride() == (8**4, 1, 8 * 8 * 8, 8 * 8, 8)


def test_multi_gate_folds_only_for_cpu_backend_inference():
    block = randomise(MultiAttentionGate(3, 8, 12, inter_channels=6)).eval()
    x, g = (t.float() for t in inputs(c_l=8, c_g=12))
    with torch.no_grad():
        assert block._folded(x, g) is not None
        assert block._folded(x.double(), g.double()) is None  # auto: float64 runs on the reference
        block.train()
        assert block._folded(x, g) is None  # batch statistics do not fold
        block.eval()
        for gate in block.gates:
            gate.backend = "reference"
        assert block._folded(x, g) is None  # an explicit backend is honoured
        block.gates[0].backend = "cpu"
        assert block._folded(x, g) is None  # heads on different backends
    for gate in block.gates:
        gate.backend = "auto"
    assert block._folded(x, g) is None  # gradients wanted: auto takes the reference
    instance = randomise(MultiAttentionGate(3, 8, 12, inter_channels=6, norm="instance")).eval()
    with torch.no_grad():
        assert instance.folded_output_map() is None and instance._folded(x, g) is None


def _counting_folds(block):
    """Count the block's calls of ``folded_output_map`` (the cache's rebuilds)."""
    calls = []
    fold = block.folded_output_map

    def counted():
        calls.append(1)
        return fold()

    block.folded_output_map = counted
    return calls


@pytest.mark.parametrize(
    "change",
    [
        lambda b: b.gates[0].W[0].weight.data.mul_(1.5),  # .data: no version bump
        lambda b: b.gates[1].W[1].running_var.data.add_(0.5),
        lambda b: b.combine[0].bias.data.sub_(0.25),
        lambda b: setattr(b.combine[1], "eps", 0.5),
        lambda b: b.load_state_dict({k: v * 1.1 if v.is_floating_point() else v for k, v in b.state_dict().items()}),
    ],
    ids=["W-weight-data", "running-var-data", "combine-bias-data", "eps", "load_state_dict"],
)
def test_multi_gate_fold_cache_follows_every_change(change):
    """The folded map is reused while what it was folded from is unchanged, value for value, and
    rebuilt after any change, including ones that bump no version counter (``p.data``)."""
    block = randomise(MultiAttentionGate(3, 8, 12, inter_channels=6)).eval()
    x, g = (t.float() for t in inputs(c_l=8, c_g=12))
    calls = _counting_folds(block)
    with torch.no_grad():
        first, _ = block(x, g)
        again, _ = block(x, g)
        assert len(calls) == 1 and torch.equal(first, again)
        change(block)
        out, _ = block(x, g)
        assert len(calls) == 2
        truth = _unfolded(copy.deepcopy(block).double(), x.double(), g.double())[0]
    assert (out.double() - truth).abs().max().item() <= 1e-5 * truth.abs().max().item()
    assert (out - first).abs().max().item() > 1e-3  # the change mattered


def test_multi_gate_folds_without_autograd_only_and_caches_only_foldable_norms():
    block = randomise(MultiAttentionGate(3, 8, 12, inter_channels=6, backend="cpu")).eval()
    x, g = (t.float() for t in inputs(c_l=8, c_g=12))
    calls = _counting_folds(block)
    out, _ = block(x, g)  # gradients wanted (an explicit "cpu"): the gates' own calls, which have a backward
    assert not calls
    out.sum().backward()
    assert block.gates[0].W[0].weight.grad is not None and block.combine[0].weight.grad is not None
    with torch.inference_mode():
        block(x, g)
        block(x, g)
    assert len(calls) == 1
    block.gates[0].W[1].train()  # one gate's norm on batch statistics: nothing folds, nothing stale
    with torch.no_grad():
        out, _ = block(x, g)
        truth = _unfolded(block, x, g)[0]
    assert len(calls) == 2 and block._output_map_cache is None
    assert torch.allclose(out, truth, rtol=1e-5, atol=1e-5)


def test_multi_gate_folded_path_checks_its_inputs():
    block = MultiAttentionGate(3, 8, 12, inter_channels=6).eval()
    x, g = torch.randn(1, 8, 8, 8, 8), torch.randn(1, 12, 4, 4, 4)
    with torch.no_grad(), pytest.raises(ValueError, match="g"):
        block(x, g[:, :5])
    with torch.no_grad(), pytest.raises(ValueError, match="spatial"):
        block(x[0], g)


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
def test_multi_gate_folded_inference_variants(kwargs, g_size):
    block = randomise(MultiAttentionGate(3, 8, 12, **{"inter_channels": 6, **kwargs})).eval()
    gen = torch.Generator().manual_seed(3)
    x, g = torch.randn(2, 8, 9, 10, 6, generator=gen), torch.randn(2, 12, *g_size, generator=gen)
    with torch.no_grad():
        assert block._folded(x, g) is not None
        out, alpha = block(x, g)
        truth = _unfolded(copy.deepcopy(block).double(), x.double(), g.double())
    assert (out.double() - truth[0]).abs().max().item() <= 1e-5 * truth[0].abs().max().item()
    assert (alpha.double() - truth[1]).abs().max().item() <= 1e-6
