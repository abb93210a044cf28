"""Launchers: the passes of the fused gate over plain tensors (no autograd here).

Forward (``gate_forward``):
  1. ``_coarse_fwd``: alpha_c on theta's grid (reads x, g once).
  2. The fine kernels resample alpha_c onto x's grid themselves, as ``F.interpolate`` does.
  3. training with batch norm only: ``_fine_stats`` (reads x) and ``_stats_combine`` (float64):
     the statistics of ``alpha * W0 x``, which need a grid-wide reduction before the output.
  4. ``_fine_out``: out = alpha * (W0 x) * scale + shift, W's conv and the norm folded into a
     per-channel affine map (reads x, writes out and alpha).
Backward (``gate_backward``), recomputing from x, g, alpha_c and the norm statistics:
  1. batch norm only: ``_fine_bwd_sums`` (reads x, dout) and ``_sum_blocks``: the norm's gradient sums.
  2. ``_fine_bwd`` (reads x, dout; writes dx, d alpha on x's grid): W path and d alpha.
  3. d alpha_c = adjoint of the resampling (aten's ``upsample_*_backward``).
  4. ``_coarse_bwd`` (reads x, g; adds the theta path into dx; writes dg).
"""

from __future__ import annotations

import math
import os
from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from . import kernels as K

__all__ = ["gate_forward", "gate_backward"]


def _p2(n: int) -> int:
    return max(16, triton.next_power_of_2(int(n)))


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _as_3d(shape) -> tuple[int, int, int]:
    shape = tuple(int(s) for s in shape)
    return (1,) * (3 - len(shape)) + shape


def flat_strides(t: Tensor) -> Tensor:
    """``t`` itself if its spatial dims flatten to one stride (contiguous, channels-last), else a contiguous copy."""
    sizes, strides = t.shape[2:], t.stride()[2:]
    expect = strides[-1] if len(strides) else 1
    for size, stride in zip(reversed(sizes), reversed(strides)):
        if size != 1 and stride != expect:
            return t.contiguous()
        expect *= size
    return t


def _nsc(t: Tensor) -> tuple[int, int, int]:
    """(batch, channel, flat spatial) strides of a tensor that passed ``flat_strides``."""
    spatial = [st for s, st in zip(t.shape[2:], t.stride()[2:]) if s != 1]
    return t.stride(0), t.stride(1), (spatial[-1] if spatial else 1)


def _fine_blocks(C: int, S: int) -> int:
    if _interpreting():
        return min(256, max(16, triton.next_power_of_2(S)))
    return 64 if C <= 64 else 32


def _coarse_block(C: int, CI: int) -> int:
    if _interpreting():
        return 64
    return 32 if max(C, CI) <= 128 else 16


def _prec(x: Tensor) -> str:
    return "ieee" if x.dtype in (torch.float32, torch.float64) else "tf32"


def acc_dtype(x: Tensor) -> torch.dtype:
    """The compute dtype: float64 for float64 inputs (gradcheck), float32 otherwise."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _acc(x: Tensor):
    return tl.float64 if x.dtype == torch.float64 else tl.float32


def _warps(C: int) -> int:
    return 4 if C <= 64 else 8


def _fine_setup(x: Tensor, alpha_c: Tensor, align_corners: bool):
    """The grid (position blocks x batch) of the fine-grid kernels, their compile-time constants,
    and the geometry of alpha's resampling from theta's grid onto x's (sizes and per-axis scales
    as ``F.interpolate`` computes them)."""
    N, C = x.shape[:2]
    S = math.prod(x.shape[2:])
    BS = _fine_blocks(C, S)
    D, H, W = _as_3d(x.shape[2:])
    DC, HC, WC = _as_3d(alpha_c.shape[2:])

    def scale(i: int, o: int) -> float:
        return ((i - 1) / (o - 1) if o > 1 else 0.0) if align_corners else i / o

    geometry = dict(H=H, W=W, DC=DC, HC=HC, WC=WC, sd=scale(DC, D), sh=scale(HC, H), sw=scale(WC, W))
    meta = dict(BLOCK_S=BS, BLOCK_C=_p2(C), ALIGN=align_corners, PREC=_prec(x), ACC=_acc(x), num_warps=_warps(C))
    return (triton.cdiv(S, BS), N), {**geometry, **meta}


def _coarse_setup(x: Tensor, g: Tensor, theta_w: Tensor, psi_w: Tensor, softplus: bool):
    """What both coarse kernels take: their grid, the sizes and the compile-time constants
    (the weights go in as they are: contiguous, any float dtype)."""
    N, C = x.shape[:2]
    CI, CG = theta_w.shape[0], g.shape[1]
    D, H, W = _as_3d(x.shape[2:])
    KD, KH, KW = _as_3d(theta_w.shape[2:])
    HC, WC = H // KH, W // KW
    SC = (D // KD) * HC * WC
    BP = _coarse_block(C, CI)
    meta = dict(
        KD=KD, KH=KH, KW=KW, BLOCK_P=BP, BLOCK_C=_p2(C), BLOCK_CG=_p2(CG), BLOCK_CI=_p2(CI),
        SOFTPLUS=softplus, PREC=_prec(x), ACC=_acc(x), num_warps=_warps(max(C, CI)),
    )
    return (triton.cdiv(SC, BP), N), (C, CG, CI, H, W, HC, WC, SC), meta


def _weights(*ts: Optional[Tensor]) -> tuple:
    """The kernels' view of parameters: detached, contiguous (a no-op for parameters)."""
    return tuple(None if t is None else t.detach().contiguous() for t in ts)


def coarse_alpha(x: Tensor, g: Tensor, theta_w: Tensor, phi_w: Tensor, phi_b: Tensor, psi_w: Tensor, psi_b: Tensor, softplus: bool) -> Tensor:
    """alpha on theta's grid, ``Tensor[N, 1, *Sc]`` in the compute dtype; ``g`` already on that grid."""
    grid, sizes, meta = _coarse_setup(x, g, theta_w, psi_w, softplus)
    ac = torch.empty((x.shape[0], 1) + tuple(g.shape[2:]), device=x.device, dtype=acc_dtype(x))
    K._coarse_fwd[grid](x, g, *_weights(theta_w, phi_w, phi_b, psi_w, psi_b), ac, *sizes, *_nsc(x), *_nsc(g), **meta)
    return ac


def _reduce_setup(C: int, nb: int):
    """Grid and block sizes of the per-block reductions (``_stats_combine``, ``_sum_blocks``)."""
    BC = min(_p2(C), 64)
    return (triton.cdiv(C, BC),), dict(BLOCK_B=min(256, _p2(nb)), BLOCK_C=BC)


def gate_forward(
    x: Tensor, g: Tensor, theta_w: Tensor, phi_w: Tensor, phi_b: Tensor, psi_w: Tensor, psi_b: Tensor,
    W_w: Optional[Tensor], W_b: Tensor, gamma: Optional[Tensor], beta: Optional[Tensor],
    mean_in: Optional[Tensor], var_in: Optional[Tensor], use_batch_stats: bool, eps: float,
    softplus: bool, align_corners: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """``(out, alpha, alpha_c, mean, var)``; mean/var are W's batch statistics when
    ``use_batch_stats`` (float32, ``Tensor[F_l]``), empty otherwise (then ``mean_in``/``var_in``
    apply, and the backward takes them). ``x``, ``g`` pass ``flat_strides``."""
    N, C = x.shape[:2]
    S = math.prod(x.shape[2:])
    f32 = acc_dtype(x)
    ac = coarse_alpha(x, g, theta_w, phi_w, phi_b, psi_w, psi_b, softplus)
    has_w, has_norm = W_w is not None, gamma is not None
    w0, wb, gamma, beta = _weights(W_w, W_b, gamma, beta)
    grid, common = _fine_setup(x, ac, align_corners)
    # W's batch-norm statistics are outputs only when computed here (else the running ones apply)
    mean, var = x.new_empty(0, dtype=f32), x.new_empty(0, dtype=f32)
    if has_norm and use_batch_stats:
        nb = grid[0] * N
        mean_b = torch.empty((nb, C), device=x.device, dtype=f32)
        m2_b = torch.empty_like(mean_b)
        cnt_b = torch.empty(nb, device=x.device, dtype=f32)
        K._fine_stats[grid](x, ac, w0, mean_b, m2_b, cnt_b, C, S, *_nsc(x), HAS_W=True, **common)
        mean, var = torch.empty(C, device=x.device, dtype=f32), torch.empty(C, device=x.device, dtype=f32)
        rgrid, rmeta = _reduce_setup(C, nb)
        K._stats_combine[rgrid](mean_b, m2_b, cnt_b, wb, mean, var, nb, C, **rmeta)  # mean of alpha * W0 x + b
    norm_stats = (mean, var) if use_batch_stats else _weights(mean_in, var_in)
    out = torch.empty_like(x)
    alpha = torch.empty((N, 1) + tuple(x.shape[2:]), device=x.device, dtype=x.dtype)
    absent = ac  # a placeholder pointer for tensors the kernel does not read
    K._fine_out[grid](
        x, ac, w0 if has_w else absent, wb if has_w else absent, gamma if has_norm else absent,
        beta if has_norm else absent, *(t if has_norm else absent for t in norm_stats), float(eps), out, alpha,
        C, S, *_nsc(x), *_nsc(out), HAS_W=has_w, HAS_NORM=has_norm, **common,
    )  # fmt: skip
    return out, alpha, ac, mean, var


_UPSAMPLE_BACKWARD = {
    1: lambda g, out, inp, ac: torch.ops.aten.upsample_linear1d_backward(g, out, inp, ac, None),
    2: lambda g, out, inp, ac: torch.ops.aten.upsample_bilinear2d_backward(g, out, inp, ac, None, None),
    3: lambda g, out, inp, ac: torch.ops.aten.upsample_trilinear3d_backward(g, out, inp, ac, None, None, None),
}


def gate_backward(
    dout: Tensor, dalpha: Optional[Tensor], x: Tensor, g: Tensor, theta_w: Tensor, phi_w: Tensor, phi_b: Tensor,
    psi_w: Tensor, psi_b: Tensor, W_w: Optional[Tensor], W_b: Tensor, gamma: Optional[Tensor],
    alpha_c: Tensor, mean: Tensor, var: Tensor, use_batch_stats: bool, eps: float, softplus: bool,
    align_corners: bool,
) -> tuple[Tensor, ...]:
    """Gradients ``(dx, dg, dtheta, dphi_w, dphi_b, dpsi_w, dpsi_b, dW_w, dW_b, dgamma, dbeta)``
    (float32 weights' gradients; ``dW_*``/``dgamma``/``dbeta`` empty where absent)."""
    N, C = x.shape[:2]
    CI = theta_w.shape[0]
    S = math.prod(x.shape[2:])
    dev, f32 = x.device, acc_dtype(x)
    dout = flat_strides(dout)
    has_w = W_w is not None
    w0 = _weights(W_w)[0] if has_w else alpha_c  # alpha_c: a placeholder pointer where W is absent
    grid, common = _fine_setup(x, alpha_c, align_corners)
    def empty() -> Tensor:  # a distinct tensor each time: custom-op outputs may not alias
        return x.new_empty(0, dtype=f32)

    has_norm = gamma is not None
    wb, gamma, mean, var = _weights(W_b, gamma, mean, var)
    dgamma, dbeta = empty(), empty()
    if has_norm:
        nb = grid[0] * N
        s_do = torch.empty((nb, C), device=dev, dtype=f32)
        s_doz = torch.empty_like(s_do)
        K._fine_bwd_sums[grid](
            x, alpha_c, w0, dout, wb, mean, var, float(eps), s_do, s_doz, C, S, *_nsc(x), *_nsc(dout), **common,
        )  # fmt: skip
        dbeta, dgamma = torch.empty(C, device=dev, dtype=f32), torch.empty(C, device=dev, dtype=f32)
        rgrid, rmeta = _reduce_setup(C, nb)
        K._sum_blocks[rgrid](s_do, s_doz, dbeta, dgamma, nb, C, **rmeta)
    dx = torch.empty((N, C) + tuple(x.shape[2:]), device=dev, dtype=f32)
    daf = torch.empty((N, 1) + tuple(x.shape[2:]), device=dev, dtype=f32)
    dW_w = torch.zeros((C, C), device=dev, dtype=f32) if has_w else empty()
    dW_b = torch.zeros(C, device=dev, dtype=f32) if has_w else empty()
    has_dalpha = dalpha is not None
    absent = alpha_c  # a placeholder pointer for tensors the kernel does not read
    dal = dalpha.contiguous() if has_dalpha else absent
    norm_args = (wb, gamma, mean, var, dbeta, dgamma) if has_norm else (absent,) * 6
    K._fine_bwd[grid](
        x, alpha_c, w0, dout, dal, *norm_args, float(eps), 1.0 / (N * S), dx, daf, dW_w if has_w else absent, dW_b if has_w else absent,
        C, S, *_nsc(x), *_nsc(dout), *_nsc(dx), HAS_W=has_w, HAS_NORM=has_norm, BATCH_STATS=has_norm and use_batch_stats,
        HAS_DALPHA=has_dalpha, **common,
    )  # fmt: skip
    if gamma is not None and use_batch_stats:
        dW_b.zero_()  # exactly zero: batch normalisation removes any constant added before it
    # the adjoint of alpha's resampling onto x's grid
    if tuple(alpha_c.shape[2:]) == tuple(x.shape[2:]):
        dac = daf
    else:
        dac = _UPSAMPLE_BACKWARD[x.dim() - 2](daf, list(x.shape[2:]), list(alpha_c.shape), align_corners).contiguous()
    grid, sizes, meta = _coarse_setup(x, g, theta_w, psi_w, softplus)
    weights = _weights(theta_w, phi_w, phi_b, psi_w)
    dtheta = torch.zeros(theta_w.shape, device=dev, dtype=f32)  # weight gradients in the weights' layouts
    dphi_w = torch.zeros(phi_w.shape, device=dev, dtype=f32)
    dbp = torch.zeros(CI, device=dev, dtype=f32)
    dwpsi = torch.zeros(psi_w.shape, device=dev, dtype=f32)
    dbpsi = torch.zeros(1, device=dev, dtype=f32)
    dg = torch.empty(g.shape, device=dev, dtype=g.dtype)
    K._coarse_bwd[grid](
        x, g, *weights, alpha_c, dac, dx, dg, dtheta, dphi_w, dbp, dwpsi, dbpsi,
        *sizes, *_nsc(x), *_nsc(g), *_nsc(dx), *_nsc(dg), **meta,
    )  # fmt: skip
    dW = dW_w.reshape(W_w.shape) if has_w else dW_w
    return (dx.to(x.dtype), dg, dtheta, dphi_w, dbp, dwpsi, dbpsi, dW, dW_b, dgamma, dbeta)
