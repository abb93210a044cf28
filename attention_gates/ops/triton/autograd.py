"""The fused gate as ``torch.library`` custom ops with registered autograd and fake kernels.

``attention_gates::gate_fwd`` and ``attention_gates::gate_bwd`` wrap the launchers, so that
``torch.compile(fullgraph=True)`` traces a model that uses them and autograd saves only
``x``, ``g``, the weights, alpha on theta's grid and W's norm statistics (all through
``ctx.save_for_backward``). A custom op's schema takes flat tensors; its arguments are named as
the fields of the launchers' groups (``launch.CoarseWeights``, ``launch.OutputTransform``,
``launch.GateFlags``), and the code around the ops passes and reads them by those names.

Numerics: loads in the storage dtype (float32, float16, bfloat16), arithmetic in float32;
dot products take 16-bit operands in their own dtype and float32 ones in TF32 where cuDNN
would (``torch.backends.cudnn`` flags), else in ``tf32x3`` (see ``launch.dot_precision``), all
accumulating in float32; outputs and dx, dg in the inputs' dtypes and memory formats. float64
inputs compute in float64 (for gradcheck, under the interpreter).
Under :func:`torch.autocast` the op runs at the dtype its inputs arrive in (it is not on
autocast's lists); it computes in float32 regardless.
"""

from __future__ import annotations

import inspect
import math
from typing import Optional

import torch
from torch import Tensor

from ..reference import GateOptions, GateWeights, resample, update_running_stats
from . import launch
from .launch import CoarseWeights, GateFlags, NormStats, OutputTransform

__all__ = ["grid_attention_triton"]


def _gate_fwd(
    x: Tensor, g: Tensor, theta_w: Tensor, phi_w: Tensor, phi_b: Tensor, psi_w: Tensor, psi_b: Tensor,
    W_w: Optional[Tensor], W_b: Tensor, gamma: Optional[Tensor], beta: Optional[Tensor],
    mean_in: Optional[Tensor], var_in: Optional[Tensor], use_batch_stats: bool, eps: float,
    softplus: bool, align_corners: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:  # fmt: skip
    """``(out, alpha, alpha_c, mean, var)``: :func:`launch.gate_forward`, its groups given field by
    field; ``mean_in``, ``var_in``: the running statistics where they apply, else ``None``."""
    return launch.gate_forward(
        x, g, CoarseWeights(theta_w, phi_w, phi_b, psi_w, psi_b), OutputTransform(W_w, W_b, gamma, beta),
        GateFlags(use_batch_stats, eps, softplus, align_corners),
        running=None if mean_in is None else NormStats(mean_in, var_in),
    )  # fmt: skip


def _gate_bwd(
    dout: Tensor, dalpha: Optional[Tensor], x: Tensor, g: Tensor, theta_w: Tensor, phi_w: Tensor, phi_b: Tensor,
    psi_w: Tensor, psi_b: Tensor, W_w: Optional[Tensor], W_b: Tensor, gamma: Optional[Tensor],
    alpha_c: Tensor, mean: Tensor, var: Tensor, use_batch_stats: bool, eps: float, softplus: bool,
    align_corners: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:  # fmt: skip
    """``(dx, dg, dweights, dnorm)``: :func:`launch.gate_backward`, its groups given field by field."""
    return launch.gate_backward(
        dout, dalpha, x, g, CoarseWeights(theta_w, phi_w, phi_b, psi_w, psi_b), OutputTransform(W_w, W_b, gamma),
        alpha_c, NormStats(mean, var), GateFlags(use_batch_stats, eps, softplus, align_corners),
    )  # fmt: skip


gate_fwd = torch.library.custom_op("attention_gates::gate_fwd", _gate_fwd, mutates_args=())
gate_bwd = torch.library.custom_op("attention_gates::gate_bwd", _gate_bwd, mutates_args=())
_FWD_ARGS = tuple(inspect.signature(_gate_fwd).parameters)  # the ops' argument names, in schema order
_BWD_ARGS = tuple(inspect.signature(_gate_bwd).parameters)
# what the forward saves for the backward: gate_bwd's tensors, but the incoming gradients
_SAVED = tuple(n for n in _BWD_ARGS if n not in ("dout", "dalpha") and n not in GateFlags._fields)


@gate_fwd.register_fake
def _(x, g, theta_w, phi_w, phi_b, psi_w, psi_b, W_w, W_b, gamma, beta, mean_in, var_in, use_batch_stats, eps, softplus, align_corners):
    N, C = x.shape[:2]
    stats = (C,) if use_batch_stats else (0,)
    return (
        torch.empty_like(x),
        x.new_empty((N, 1) + tuple(x.shape[2:])),
        x.new_empty((N, 1) + tuple(g.shape[2:]), dtype=launch.acc_dtype(x)),
        x.new_empty(stats, dtype=launch.acc_dtype(x)),
        x.new_empty(stats, dtype=launch.acc_dtype(x)),
    )


def _weight_grad_columns(x: Tensor, g: Tensor, theta_w: Tensor, W_w: Optional[Tensor]) -> dict[str, int]:
    return launch.weight_grad_columns(x.shape[1], g.shape[1], theta_w.shape[0], math.prod(theta_w.shape[2:]), W_w is not None)


@gate_bwd.register_fake
def _(dout, dalpha, x, g, theta_w, phi_w, phi_b, psi_w, psi_b, W_w, W_b, gamma, alpha_c, mean, var, use_batch_stats, eps, softplus, align_corners):
    f32 = launch.acc_dtype(x)
    return (
        torch.empty_like(x),
        torch.empty_like(g),
        x.new_empty(sum(_weight_grad_columns(x, g, theta_w, W_w).values()), dtype=f32),
        x.new_empty(2 * x.shape[1] if gamma is not None else 0, dtype=f32),
    )


def _setup_context(ctx, inputs, output) -> None:
    args = dict(zip(_FWD_ARGS, inputs))
    _, _, alpha_c, mean, var = output
    if args["gamma"] is not None and not args["use_batch_stats"]:  # the running statistics that were applied
        mean, var = args["mean_in"], args["var_in"]
    saved = {**args, "alpha_c": alpha_c, "mean": mean, "var": var}
    ctx.save_for_backward(*(saved[name] for name in _SAVED))
    ctx.flags = GateFlags(*(args[name] for name in GateFlags._fields))
    # the weights' dtypes, which their gradients take (beta's too, which is not saved)
    ctx.param_dtypes = {name: t.dtype for name, t in args.items() if name not in ("x", "g") and isinstance(t, Tensor)}


def _backward(ctx, dout, dalpha, _dac, _dmean, _dvar):
    saved = dict(zip(_SAVED, ctx.saved_tensors))
    x, gamma = saved["x"], saved["gamma"]
    if dout is None:
        dout = torch.zeros_like(x)
    dx, dg, dweights, dnorm = gate_bwd(dout=dout, dalpha=dalpha, **saved, **ctx.flags._asdict())
    columns = _weight_grad_columns(x, saved["g"], saved["theta_w"], saved["W_w"])
    grads = {name: d.view(saved[name].shape) for name, d in zip(columns, dweights.split(list(columns.values())))}
    if gamma is not None:
        C = x.shape[1]
        grads.update(gamma=dnorm[C:], beta=dnorm[:C])  # dnorm = [dbeta | dgamma]
    grads = {name: d.to(ctx.param_dtypes[name]) for name, d in grads.items()}
    return tuple({"x": dx, "g": dg, **grads}.get(name) for name in _FWD_ARGS)


gate_fwd.register_autograd(_backward, setup_context=_setup_context)


def _coarse_weights(w: GateWeights) -> CoarseWeights:
    """The gate's weights of alpha, a missing bias as zeros."""

    def zeros(n: int, like: Tensor) -> Tensor:
        return torch.zeros(n, device=like.device, dtype=like.dtype)

    return CoarseWeights(
        theta_w=w.theta_weight,
        phi_w=w.phi_weight,
        phi_b=w.phi_bias if w.phi_bias is not None else zeros(w.theta_weight.shape[0], w.phi_weight),
        psi_w=w.psi_weight,
        psi_b=w.psi_bias if w.psi_bias is not None else zeros(1, w.psi_weight),
    )


def _output_transform(x: Tensor, w: GateWeights, opt: GateOptions) -> OutputTransform:
    """The gate's W (``None`` without one: out = alpha x) and, with ``opt.norm="batch"``, its
    norm's affine parameters (ones and zeros where it has none); missing biases as zeros."""
    C = x.shape[1]
    if w.W_weight is None:
        return OutputTransform(W_w=None, W_b=torch.zeros(C, device=x.device, dtype=x.dtype))
    W_b = w.W_bias if w.W_bias is not None else torch.zeros(C, device=x.device, dtype=w.W_weight.dtype)
    if opt.norm != "batch":
        return OutputTransform(W_w=w.W_weight, W_b=W_b)
    return OutputTransform(
        W_w=w.W_weight,
        W_b=W_b,
        gamma=w.norm_weight if w.norm_weight is not None else torch.ones(C, device=x.device),
        beta=w.norm_bias if w.norm_bias is not None else torch.zeros(C, device=x.device),
    )


def grid_attention_triton(x: Tensor, g: Tensor, w: GateWeights, opt: GateOptions) -> tuple[Tensor, Tensor]:
    """The fused gate: ``(out, alpha)`` of :func:`~attention_gates.ops.reference.grid_attention_reference`."""
    # phi is a 1x1 conv and linear resampling weights sum to one: resampling g equals resampling phi(g)
    coarse_size = tuple(s // k for s, k in zip(x.shape[2:], w.theta_weight.shape[2:]))
    g = launch.flat_strides(resample(g, coarse_size, opt.align_corners))
    x = launch.flat_strides(x)
    transform = _output_transform(x, w, opt)
    use_batch_stats = transform.gamma is not None and (opt.training or w.running_mean is None)
    running = transform.gamma is not None and not use_batch_stats  # the running statistics apply
    flags = GateFlags(use_batch_stats, float(opt.eps), opt.sigma1 == "softplus", bool(opt.align_corners))
    out, alpha, _, mean, var = gate_fwd(
        x=x, g=g, **_coarse_weights(w)._asdict(), **transform._asdict(),
        mean_in=w.running_mean if running else None, var_in=w.running_var if running else None, **flags._asdict(),
    )  # fmt: skip
    if use_batch_stats and opt.training:
        update_running_stats(w, mean, var, x.numel() // x.shape[1], opt.momentum)
    return out, alpha
