"""Helpers shared by the test modules."""

import torch
from torch import nn

from attention_gates.functional import GateOptions, GateWeights, grid_attention_reference


def flat(impl):
    """``impl(x, g, GateWeights, GateOptions)`` called with :func:`~attention_gates.functional.grid_attention`'s
    flat arguments: the weights in :class:`GateWeights`' order or by name, the options by name."""

    def call(x, g, *weights, **kw):
        named = {k: kw.pop(k) for k in list(kw) if k in GateWeights._fields}
        return impl(x, g, GateWeights(*weights, **named), GateOptions(**kw))

    return call


reference = flat(grid_attention_reference)


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
