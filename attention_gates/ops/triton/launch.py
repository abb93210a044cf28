"""Launchers: the passes of the fused gate over plain tensors (no autograd here).

Forward (``gate_forward``); the fine kernels resample alpha_c onto x's grid themselves, as
``F.interpolate`` does:

1. ``coarse_fwd``: alpha_c on theta's grid (reads x, g once).
2. training with batch norm only: ``fine_stats`` (reads x) and ``stats_combine`` (float64),
   the statistics of ``alpha * W0 x``, which need a grid-wide reduction before the output.
3. ``fine_out``: out = alpha * (W0 x) * scale + shift, W's conv and the norm folded into a
   per-channel affine map (reads x, writes out and alpha).

Backward (``gate_backward``), recomputing from x, g, alpha_c and the norm statistics:

1. with a norm: ``fine_bwd_sums`` (reads x, dout) and ``sum_rows``, the norm's gradients
   (sums over the grid, which dz needs under batch statistics).
2. ``fine_bwd`` (reads x, dout; writes d alpha on x's grid, and dx where no patch reaches).
3. ``alpha_adjoint_kernel``: d alpha_c, the adjoint of the resampling, as a gather.
4. ``coarse_bwd`` (reads x, g; writes df on theta's grid and dg).
5. ``patch_bwd`` (reads x, dout, df; writes dx once: the theta path and the W path together).
6. ``sum_rows``: the weight gradients from the per-program partial rows of 2, 4 and 5.

No atomics and no zero-fills: every buffer is written once, and every sum has a fixed order
(given the device's multiprocessor count), so two runs give bitwise-equal gradients. Every grid
has at least one program: an empty batch launches programs that loop over no tile (and write
zero partial sums), never a zero grid.

The launchers take the gate's tensors in named groups (:class:`CoarseWeights`,
:class:`OutputTransform`, :class:`NormStats`, :class:`GateFlags`); one call's sizes, tiles and
compile-time constants are a :class:`Plan` (``make_plan``), and each kernel is launched by its
own function with its arguments spelled out. Tiles and grids come from ``tiles.TABLE`` (per
architecture); the dot products' precision from PyTorch's flags (``dot_precision``).
``PASSES`` lists, per kernel, the big tensors a launch streams through memory (read or written
in full, once), which is what the traffic model in ``benchmarks/gate_memory.py`` adds up over
the launches a call really makes (and what an interpreter test checks against the kernels'
recorded loads and stores).
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import functools
import math
from typing import Iterator, NamedTuple, Optional, TypeVar

import torch
import triton
import triton.language as tl
from torch import Tensor

from . import kernels as K
from . import tiles
from .support import interpreting

__all__ = [
    "CoarseWeights", "OutputTransform", "NormStats", "GateFlags", "Plan", "Tiling",
    "gate_forward", "gate_backward", "make_plan", "plan_for", "dot_precision", "block_size", "weight_grad_columns",
]  # fmt: skip

INT32_LIMIT = 2**31  # a sample with this many elements or more takes 64-bit offsets

# per kernel: (argument names the launch streams in full, those it writes in full); the
# coarse-grid tensors (alpha_c, g on theta's grid) count as streamed where they are read per tile
PASSES: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "coarse_fwd": (("x_ptr", "g_ptr"), ("ac_ptr",)),
    "fine_stats": (("x_ptr", "ac_ptr"), ()),
    "stats_combine": ((), ()),
    "fine_out": (("x_ptr", "ac_ptr"), ("out_ptr", "alpha_ptr")),
    "fine_bwd_sums": (("x_ptr", "ac_ptr", "do_ptr"), ()),
    "fine_bwd": (("x_ptr", "ac_ptr", "do_ptr", "dalpha_ptr"), ("daf_ptr", "part_ptr")),
    "alpha_adjoint_kernel": (("daf_ptr",), ("dac_ptr",)),
    "coarse_bwd": (("x_ptr", "g_ptr", "ac_ptr", "dac_ptr"), ("df_ptr", "dg_ptr", "part_ptr")),
    "patch_bwd": (("x_ptr", "do_ptr", "df_ptr", "ac_ptr"), ("dx_ptr", "part_ptr")),
    "sum_rows": (("p1_ptr", "p2_ptr", "p3_ptr"), ("out_ptr",)),
}


# ---------------------------------------------------------------- the launchers' inputs, by name
# Field names are the custom ops' argument names (``autograd.gate_fwd``/``gate_bwd``).


class CoarseWeights(NamedTuple):
    """The weights of alpha on theta's grid (``d`` spatial dims, ``k`` the subsample factor)."""

    theta_w: Tensor  #: ``Tensor[F_int, F_l, *k]``
    phi_w: Tensor  #: ``Tensor[F_int, F_g, 1, ...]``
    phi_b: Tensor  #: ``Tensor[F_int]`` (zeros for a gate without the bias)
    psi_w: Tensor  #: ``Tensor[1, F_int, 1, ...]``
    psi_b: Tensor  #: ``Tensor[1]`` (zeros for a gate without the bias)


class OutputTransform(NamedTuple):
    """W, the output transform: ``out = norm(W_w (alpha x) + W_b)``; ``W_w=None``: ``out = alpha x``."""

    W_w: Optional[Tensor]  #: ``Tensor[F_l, F_l, 1, ...]``, or ``None``
    W_b: Tensor  #: ``Tensor[F_l]`` (zeros without W or its bias)
    gamma: Optional[Tensor] = None  #: batch norm's scale ``Tensor[F_l]``; ``None``: no norm
    beta: Optional[Tensor] = None  #: batch norm's shift ``Tensor[F_l]`` (not needed by the backward)


class NormStats(NamedTuple):
    """Batch norm's per-channel statistics: ``Tensor[F_l]`` each (the variance biased)."""

    mean: Tensor
    var: Tensor


class GateFlags(NamedTuple):
    """What a call computes besides its tensors."""

    use_batch_stats: bool  #: normalise with the batch's statistics (training), not the running ones
    eps: float  #: batch norm's epsilon
    softplus: bool  #: sigma1 is softplus (else relu)
    align_corners: bool  #: of alpha's resampling, as ``F.interpolate``


_Group = TypeVar("_Group", CoarseWeights, OutputTransform, NormStats)


def _operands(group: _Group) -> _Group:
    """The kernels' view of a group of parameters: each detached and contiguous (a no-op for
    parameters), ``None`` kept."""
    return type(group)(*(None if t is None else t.detach().contiguous() for t in group))


def weight_grad_columns(C: int, CG: int, CI: int, K: int, has_w: bool) -> dict[str, int]:
    """Per weight (by its field name), its column count in the flat weight gradient
    ``gate_backward`` returns, in that vector's order: theta, phi, psi, then (with W) W's."""
    columns = dict(theta_w=CI * C * K, phi_w=CI * CG, phi_b=CI, psi_w=CI, psi_b=1)
    return {**columns, **(dict(W_w=C * C, W_b=C) if has_w else {})}


# ---------------------------------------------------------------- layouts and precision


def flat_strides(t: Tensor) -> Tensor:
    """``t`` itself if its spatial dims flatten to one stride (contiguous, channels-last), else a contiguous copy."""
    sizes, strides = t.shape[2:], t.stride()[2:]
    expect = strides[-1] if len(strides) else 1
    for size, stride in zip(reversed(sizes), reversed(strides)):
        if size != 1 and stride != expect:
            return t.contiguous()
        expect *= size
    return t


def _strides(prefix: str, t: Tensor) -> dict[str, int]:
    """``{prefix + "n", prefix + "c", prefix + "s"}``: the batch, channel and flat spatial strides
    of a tensor that passed ``flat_strides`` (the kernels' names for them, e.g. ``sxn, sxc, sxs``)."""
    spatial = [st for s, st in zip(t.shape[2:], t.stride()[2:]) if s != 1]
    return {prefix + "n": t.stride(0), prefix + "c": t.stride(1), prefix + "s": spatial[-1] if spatial else 1}


def acc_dtype(x: Tensor) -> torch.dtype:
    """The compute dtype: float64 for float64 inputs (gradcheck), float32 otherwise."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


_TL = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32, torch.float64: tl.float64}


def cudnn_conv_tf32() -> bool:
    """Whether cuDNN's float32 convolutions (the reference's) may use TF32, by PyTorch's flags:
    ``torch.backends.cudnn.conv.fp32_precision`` (and its parents) where it exists, else
    ``torch.backends.cudnn.allow_tf32``."""
    conv = getattr(torch.backends.cudnn, "conv", None)
    if conv is None or not hasattr(conv, "fp32_precision"):
        return bool(torch.backends.cudnn.allow_tf32)
    for precision in (conv.fp32_precision, torch.backends.cudnn.fp32_precision, torch.backends.fp32_precision):
        if precision != "none":
            return precision == "tf32"
    return False


def dot_precision(x: Tensor) -> str:
    """``tl.dot``'s ``input_precision`` for float32 operands: ``"tf32"`` where cuDNN would use
    TF32 for the reference's convolutions, ``"tf32x3"`` (float32 accuracy on the tensor cores)
    where the user turned TF32 off, ``"ieee"`` in the interpreter and for other dtypes (16-bit
    operands are dotted in their own dtype; float64 in float64)."""
    on_gpu = _TARGET.get() is not None or (x.device.type == "cuda" and not interpreting())
    if x.dtype != torch.float32 or not on_gpu:
        return "ieee"
    return "tf32" if cudnn_conv_tf32() else "tf32x3"


# ---------------------------------------------------------------- tiles and grids

# the GPU that ``plan_for`` plans for, (arch, multiprocessors): per thread and task, as a
# ``with`` block sets it (None: the tensors' own device)
_TARGET: contextvars.ContextVar[Optional[tuple[str, int]]] = contextvars.ContextVar("attention_gates_triton_target", default=None)


@contextlib.contextmanager
def plan_for(arch: str, multiprocessors: int) -> Iterator[None]:
    """Inside: this thread's (or task's) calls are planned as on a GPU of ``arch`` (a key of
    ``tiles.TABLE``) with ``multiprocessors`` (tiles, grid sizes, dot precision), whatever the
    tensors' device: for recording the launches of a GPU call and compiling its kernels without
    a GPU. Other threads are not affected."""
    if arch not in tiles.TABLE:
        raise ValueError(f"arch must be one of {sorted(tiles.TABLE)}, got {arch!r}")
    token = _TARGET.set((arch, int(multiprocessors)))
    try:
        yield
    finally:
        _TARGET.reset(token)


@functools.lru_cache(maxsize=None)
def _device_programs(index: int) -> tuple[str, int]:
    props = torch.cuda.get_device_properties(index)
    return tiles.arch_key((props.major, props.minor)), props.multi_processor_count


def block_size(n: int) -> int:
    """A register tile's size for ``n`` channels or rows: the next power of two, at least 16 (``tl.dot``'s smallest)."""
    return max(16, triton.next_power_of_2(int(n)))


def _tiles(x: Tensor, channels: int) -> tuple[tiles.Tiles, int, int]:
    """The tile row for ``channels`` on x's device, and the most programs a persistent grid of
    the coarse and of the fine kernels takes."""
    target = _TARGET.get()
    if target is not None:
        arch, sms = target
    elif interpreting() or x.device.type != "cuda":
        return tiles.INTERPRETER, tiles.INTERPRETER_PROGRAMS, tiles.INTERPRETER_PROGRAMS
    else:
        arch, sms = _device_programs(x.device.index if x.device.index is not None else torch.cuda.current_device())
    row = tiles.lookup(arch, channels)
    return row, sms * row.coarse_per_sm, sms * row.fine_per_sm


def _as_3d(shape) -> tuple[int, int, int]:
    """A 1D, 2D or 3D spatial shape as 3D, unit axes in front."""
    shape = tuple(int(s) for s in shape)
    return (1,) * (3 - len(shape)) + shape


def _window(out: int, inp: int, align_corners: bool) -> int:
    """How many fine indices along one axis add their gradient into one coarse index in
    ``F.interpolate``'s backward (the candidates ``kernels._adjoint_axis`` gathers): those whose
    source index is the coarse one or the one before it, at most ``ceil(2 out / inp)``, and
    without ``align_corners`` those whose source clamps to 0 (with weight 0, into index 1).
    1: the axis is not resampled."""
    if out == inp:
        return 1
    if inp == 1:
        return out
    if align_corners:
        return min(out, -(-2 * (out - 1) // (inp - 1)))
    clamped = -(-(out - inp) // (2 * inp))  # f with (f + 1/2) inp / out - 1/2 < 0
    return min(out, -(-2 * out // inp) + clamped)


def _scale(inp: int, out: int, align_corners: bool) -> float:
    """``F.interpolate``'s source scale along one axis (input size over output size)."""
    if align_corners:
        return (inp - 1) / (out - 1) if out > 1 else 0.0
    return inp / out


class Tiling(NamedTuple):
    """How the kernels of one family walk a call: tiles of ``block`` positions of one sample
    (``per_sample`` tiles a sample, ``tiles`` in all), looped over by a persistent grid of
    ``programs`` programs (at least one) of ``warps`` warps."""

    block: int
    per_sample: int
    tiles: int
    programs: int
    warps: int

    @property
    def grid(self) -> tuple[int]:
        return (self.programs,)

    @classmethod
    def of(cls, N: int, positions: int, block: int, cap: int, warps: int) -> Tiling:
        """``positions`` per sample in tiles of ``block``, on at most ``cap`` programs."""
        per_sample = triton.cdiv(positions, block)
        return cls(block, per_sample, N * per_sample, max(1, min(N * per_sample, cap)), warps)


@dataclasses.dataclass(frozen=True)
class Plan:
    """One call's sizes, tilings and compile-time constants, shared by all its launches. Fields
    are named as the kernel arguments they become; 1D and 2D inputs are 3D with unit leading axes."""

    N: int  # the batch
    C: int  # x's channels (F_l)
    CG: int  # g's channels (F_g)
    CI: int  # theta's output channels (F_int)
    D: int  # x's grid, D x H x W
    H: int
    W: int
    DC: int  # theta's grid, DC x HC x WC (x's grid floor-divided by the factor)
    HC: int
    WC: int
    KD: int  # the subsample factor, KD x KH x KW
    KH: int
    KW: int
    sd: float  # alpha's resampling per axis: F.interpolate's source scale
    sh: float
    sw: float
    WD: int  # per axis: the resampling adjoint's candidates per coarse index (``_window``; 1: not resampled)
    WH: int
    WW: int
    BKW: int  # KW rounded up to a power of two: the register width of a patch row
    BLOCK_C: int  # channel register tiles (``block_size``)
    BLOCK_CG: int
    BLOCK_CI: int
    SOFTPLUS: bool  # sigma1 is softplus, else relu
    ALIGN: bool  # align_corners
    I64: bool  # 64-bit offsets within a sample
    PREC: str  # the dots' input precision for float32 operands (``dot_precision``)
    ACC: object  # the compute dtype (tl.float32, or tl.float64 for float64 inputs)
    DOT: object  # the dots' operand dtype: x's
    stages: int  # num_stages of the tile loops
    fine: Tiling  # x's grid
    coarse: Tiling  # theta's grid
    patch: Tiling  # theta's grid, ``patch_bwd``'s own tiles
    x_bytes: int

    @property
    def S(self) -> int:
        """Positions of x's grid."""
        return self.D * self.H * self.W

    @property
    def SC(self) -> int:
        """Positions of theta's grid."""
        return self.DC * self.HC * self.WC

    @property
    def K(self) -> int:
        """Positions of a subsample patch."""
        return self.KD * self.KH * self.KW

    @property
    def covered(self) -> tuple[int, int, int]:
        """``(DP, HP, WP)``: the extent of x's grid that subsample patches cover."""
        return self.DC * self.KD, self.HC * self.KH, self.WC * self.KW

    def capped(self, tiling: Tiling, row: int) -> tuple[int]:
        """The grid of a ``tiling`` kernel that writes one partial row of ``row`` floats per
        program: at most as many programs as keep those rows within x's bytes (small gates with
        big weights: a few programs, not one partial row per multiprocessor)."""
        return (max(1, min(tiling.programs, self.x_bytes // (4 * row))),)


def make_plan(x: Tensor, g: Tensor, theta_w: Tensor, softplus: bool, align_corners: bool) -> Plan:
    """The :class:`Plan` of a call on ``x: Tensor[N, F_l, *S]`` and ``g`` on theta's grid."""
    N, C = x.shape[:2]
    CI, CG = theta_w.shape[0], g.shape[1]
    D, H, W = _as_3d(x.shape[2:])
    KD, KH, KW = _as_3d(theta_w.shape[2:])
    DC, HC, WC = D // KD, H // KH, W // KW
    row, coarse_cap, fine_cap = _tiles(x, max(block_size(C), block_size(CI)))
    return Plan(
        N=N, C=C, CG=CG, CI=CI, D=D, H=H, W=W, DC=DC, HC=HC, WC=WC, KD=KD, KH=KH, KW=KW,
        sd=_scale(DC, D, align_corners), sh=_scale(HC, H, align_corners), sw=_scale(WC, W, align_corners),
        WD=_window(D, DC, align_corners), WH=_window(H, HC, align_corners), WW=_window(W, WC, align_corners),
        BKW=triton.next_power_of_2(KW), BLOCK_C=block_size(C), BLOCK_CG=block_size(CG), BLOCK_CI=block_size(CI),
        SOFTPLUS=softplus, ALIGN=align_corners,
        I64=math.prod(x.shape[1:]) >= INT32_LIMIT or math.prod(g.shape[1:]) >= INT32_LIMIT,
        PREC=dot_precision(x), ACC=_TL[acc_dtype(x)], DOT=_TL[x.dtype], stages=row.stages,
        fine=Tiling.of(N, D * H * W, row.fine_block, fine_cap, row.fine_warps),
        coarse=Tiling.of(N, DC * HC * WC, row.coarse_block, coarse_cap, row.coarse_warps),
        patch=Tiling.of(N, DC * HC * WC, row.patch_block, coarse_cap, row.coarse_warps),
        x_bytes=x.numel() * x.element_size(),
    )  # fmt: skip


# ---------------------------------------------------------------- forward


def gate_forward(
    x: Tensor, g: Tensor, coarse: CoarseWeights, transform: OutputTransform, flags: GateFlags,
    running: Optional[NormStats] = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:  # fmt: skip
    """``(out, alpha, alpha_c, mean, var)`` of the gate on ``x: Tensor[N, F_l, *S]`` and ``g``
    on theta's grid (``Tensor[N, F_g, *S_c]``), both passed through ``flat_strides``.

    ``out`` has x's dtype and memory format, ``alpha: Tensor[N, 1, *S]`` x's dtype,
    ``alpha_c: Tensor[N, 1, *S_c]`` the compute dtype. ``mean``, ``var`` are W's batch
    statistics (``Tensor[F_l]``, compute dtype) when ``flags.use_batch_stats``, empty otherwise:
    then ``running`` (the running statistics) applies, and the backward takes it.
    """
    p = make_plan(x, g, coarse.theta_w, flags.softplus, flags.align_corners)
    f32 = acc_dtype(x)
    coarse, transform = _operands(coarse), _operands(transform)
    ac = torch.empty((p.N, 1) + tuple(g.shape[2:]), device=x.device, dtype=f32)
    coarse_fwd(p, x, g, coarse, ac)
    # W's batch-norm statistics are outputs only when computed here (else the running ones apply)
    batch = NormStats(x.new_empty(0, dtype=f32), x.new_empty(0, dtype=f32))
    if transform.gamma is not None and flags.use_batch_stats:
        batch = _batch_stats(p, x, ac, transform)
    applied = batch if flags.use_batch_stats else (None if running is None else _operands(running))
    out = torch.empty_like(x)
    alpha = torch.empty((p.N, 1) + tuple(x.shape[2:]), device=x.device, dtype=x.dtype)
    fine_out(p, x, ac, transform, applied, float(flags.eps), out, alpha)
    return out, alpha, ac, batch.mean, batch.var


def coarse_fwd(p: Plan, x: Tensor, g: Tensor, w: CoarseWeights, ac: Tensor) -> None:
    """alpha_c = sigmoid(psi . sigma1(theta x + phi g) + b_psi) into ``ac: Tensor[N, 1, *S_c]``."""
    K.coarse_fwd[p.coarse.grid](
        x, g, w.theta_w, w.phi_w, w.phi_b, w.psi_w, w.psi_b, ac,
        C=p.C, CG=p.CG, CI=p.CI, H=p.H, W=p.W, HC=p.HC, WC=p.WC, SC=p.SC,
        TPS=p.coarse.per_sample, NT=p.coarse.tiles, **_strides("sx", x), **_strides("sg", g),
        KD=p.KD, KH=p.KH, KW=p.KW, BKW=p.BKW, BLOCK_P=p.coarse.block,
        BLOCK_C=p.BLOCK_C, BLOCK_CG=p.BLOCK_CG, BLOCK_CI=p.BLOCK_CI,
        SOFTPLUS=p.SOFTPLUS, I64=p.I64, PREC=p.PREC, ACC=p.ACC, DOT=p.DOT,
        num_warps=p.coarse.warps, num_stages=p.stages,
    )  # fmt: skip


def _batch_stats(p: Plan, x: Tensor, ac: Tensor, transform: OutputTransform) -> NormStats:
    """The batch statistics of ``alpha W0 x + W_b`` per channel: per-program (mean, M2, count)
    rows (``fine_stats``), combined in row order in float64 (``stats_combine``)."""
    f32 = acc_dtype(x)
    part = torch.empty((p.fine.programs, 2 * p.C + 1), device=x.device, dtype=f32)
    K.fine_stats[p.fine.grid](
        x, ac, transform.W_w, part,
        C=p.C, S=p.S, H=p.H, W=p.W, DC=p.DC, HC=p.HC, WC=p.WC, sd=p.sd, sh=p.sh, sw=p.sw,
        TPS=p.fine.per_sample, NT=p.fine.tiles, **_strides("sx", x),
        BLOCK_S=p.fine.block, BLOCK_C=p.BLOCK_C, WD=p.WD, WH=p.WH, WW=p.WW,
        ALIGN=p.ALIGN, I64=p.I64, PREC=p.PREC, ACC=p.ACC, DOT=p.DOT,
        num_warps=p.fine.warps, num_stages=p.stages,
    )  # fmt: skip
    stats = NormStats(torch.empty(p.C, device=x.device, dtype=f32), torch.empty(p.C, device=x.device, dtype=f32))
    block_c = min(block_size(p.C), 64)
    K.stats_combine[(triton.cdiv(p.C, block_c),)](
        part, transform.W_b, stats.mean, stats.var, R=part.shape[0], C=p.C,
        BLOCK_R=min(64, block_size(part.shape[0])), BLOCK_C=block_c,
    )  # fmt: skip
    return stats


def fine_out(
    p: Plan, x: Tensor, ac: Tensor, transform: OutputTransform, stats: Optional[NormStats], eps: float,
    out: Tensor, alpha: Tensor,
) -> None:  # fmt: skip
    """out = alpha * (W0 x) * scale + shift (W's bias and norm folded per channel) into ``out``,
    and alpha on x's grid into ``alpha``."""
    has_w, has_norm = transform.W_w is not None, transform.gamma is not None
    absent = ac  # a placeholder pointer for tensors the kernel does not read
    K.fine_out[p.fine.grid](
        x, ac,
        w0_ptr=transform.W_w if has_w else absent, wb_ptr=transform.W_b if has_w else absent,
        gamma_ptr=transform.gamma if has_norm else absent, beta_ptr=transform.beta if has_norm else absent,
        mean_ptr=stats.mean if has_norm else absent, var_ptr=stats.var if has_norm else absent,
        eps=eps, out_ptr=out, alpha_ptr=alpha,
        C=p.C, S=p.S, H=p.H, W=p.W, DC=p.DC, HC=p.HC, WC=p.WC, sd=p.sd, sh=p.sh, sw=p.sw,
        TPS=p.fine.per_sample, NT=p.fine.tiles, **_strides("sx", x), **_strides("so", out),
        BLOCK_S=p.fine.block, BLOCK_C=p.BLOCK_C, HAS_W=has_w, HAS_NORM=has_norm, WD=p.WD, WH=p.WH, WW=p.WW,
        ALIGN=p.ALIGN, I64=p.I64, PREC=p.PREC, ACC=p.ACC, DOT=p.DOT,
        num_warps=p.fine.warps, num_stages=p.stages,
    )  # fmt: skip


# ---------------------------------------------------------------- backward


class _NormOperands(NamedTuple):
    """What the backward kernels read of W's norm: its tensors, or a placeholder for each without a norm."""

    wb: Tensor  # W's bias
    gamma: Tensor
    mean: Tensor  # the statistics the forward applied
    var: Tensor
    sums: Tensor  # [sum dout | sum dout zhat] per channel (``_norm_sums``)


def gate_backward(
    dout: Tensor, dalpha: Optional[Tensor], x: Tensor, g: Tensor, coarse: CoarseWeights,
    transform: OutputTransform, alpha_c: Tensor, stats: NormStats, flags: GateFlags,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:  # fmt: skip
    """Gradients ``(dx, dg, dweights, dnorm)`` from ``dout`` (out's) and ``dalpha`` (alpha's, or
    ``None``), with ``x``, ``g``, ``alpha_c`` as ``gate_forward`` took and returned them and
    ``stats`` the norm statistics it applied (ignored without a norm).

    dx and dg have x's and g's dtypes and memory formats; ``dweights`` is the weights' gradients
    in one vector, in the compute dtype (columns as ``weight_grad_columns``, each in its weight's
    own layout); ``dnorm`` the norm's ``[dbeta | dgamma]`` (``Tensor[2 F_l]``, empty without one).
    """
    p = make_plan(x, g, coarse.theta_w, flags.softplus, flags.align_corners)
    f32 = acc_dtype(x)
    dout = flat_strides(dout)
    coarse, transform, stats = _operands(coarse), _operands(transform), _operands(stats)
    has_w = transform.W_w is not None
    columns = weight_grad_columns(p.C, p.CG, p.CI, p.K, has_w)
    # 1. the norm's gradients (dbeta, dgamma): sums over the grid, which dz needs under batch statistics
    if transform.gamma is not None:
        dnorm = _norm_sums(p, x, alpha_c, transform, stats, float(flags.eps), dout)
        norm = _NormOperands(transform.W_b, transform.gamma, stats.mean, stats.var, dnorm)
    else:
        dnorm = x.new_empty(0, dtype=f32)
        norm = _NormOperands(alpha_c, alpha_c, alpha_c, alpha_c, alpha_c)  # placeholders, not read
    # 2. d alpha on x's grid, W's partial sums, dx where no patch reaches
    dx = torch.empty_like(x)
    daf = torch.empty((p.N, 1) + tuple(x.shape[2:]), device=x.device, dtype=f32)
    if has_w:
        w_columns = columns["W_w"] + columns["W_b"]
        grid = p.capped(p.fine, w_columns)
        part_w = torch.empty((grid[0], w_columns), device=x.device, dtype=f32)
    else:
        grid, part_w = p.fine.grid, None
    fine_bwd(p, grid, x, alpha_c, dout, dalpha, transform, norm, flags, dx, daf, part_w)
    # 3. d alpha_c: the adjoint of alpha's resampling (a gather, no atomics)
    dac = daf if p.S == p.SC else _alpha_adjoint(p, daf, torch.empty_like(alpha_c))
    # 4. df = d(theta x + phi g), dg, and the phi and psi gradients' partial sums
    dg = torch.empty_like(g)
    df = torch.empty((p.N, p.SC, p.CI), device=x.device, dtype=f32 if x.dtype == torch.float32 else x.dtype)
    coarse_columns = columns["phi_w"] + columns["phi_b"] + columns["psi_w"] + columns["psi_b"]
    grid = p.capped(p.coarse, coarse_columns)
    part_coarse = torch.empty((grid[0], coarse_columns), device=x.device, dtype=f32)
    coarse_bwd(p, grid, x, g, coarse, alpha_c, dac, df, dg, part_coarse)
    # 5. dtheta's partial sums and dx (theta path and W path), written once
    grid = p.capped(p.patch, columns["theta_w"])
    part_theta = torch.empty((grid[0], columns["theta_w"]), device=x.device, dtype=f32)
    patch_bwd(p, grid, x, dout, df, coarse.theta_w, alpha_c, transform, norm, flags, dx, part_theta)
    # 6. the weight gradients: every partial row summed in a fixed order
    dweights = torch.empty(sum(columns.values()), device=x.device, dtype=f32)
    _reduce_rows(dweights, part_theta, part_coarse, *((part_w,) if part_w is not None else ()))
    return dx, dg, dweights, dnorm


def _batch_scale(p: Plan) -> float:
    """1 / (values per channel), the batch statistics' derivative scale (0 for an empty batch)."""
    return 1.0 / max(p.N * p.S, 1)


def _norm_sums(
    p: Plan, x: Tensor, alpha_c: Tensor, transform: OutputTransform, stats: NormStats, eps: float, dout: Tensor,
) -> Tensor:  # fmt: skip
    """``[sum dout | sum dout zhat]`` per channel (``Tensor[2 F_l]``; zhat the normalised W
    output before gamma and beta): the norm's gradients ``[dbeta | dgamma]``."""
    f32 = acc_dtype(x)
    part = torch.empty((p.fine.programs, 2 * p.C), device=x.device, dtype=f32)
    K.fine_bwd_sums[p.fine.grid](
        x, alpha_c, transform.W_w, dout, transform.W_b, stats.mean, stats.var, eps, part,
        C=p.C, S=p.S, H=p.H, W=p.W, DC=p.DC, HC=p.HC, WC=p.WC, sd=p.sd, sh=p.sh, sw=p.sw,
        TPS=p.fine.per_sample, NT=p.fine.tiles, **_strides("sx", x), **_strides("so", dout),
        BLOCK_S=p.fine.block, BLOCK_C=p.BLOCK_C, WD=p.WD, WH=p.WH, WW=p.WW,
        ALIGN=p.ALIGN, I64=p.I64, PREC=p.PREC, ACC=p.ACC, DOT=p.DOT,
        num_warps=p.fine.warps, num_stages=p.stages,
    )  # fmt: skip
    sums = torch.empty(2 * p.C, device=x.device, dtype=f32)
    _reduce_rows(sums, part)
    return sums


def fine_bwd(
    p: Plan, grid: tuple[int], x: Tensor, alpha_c: Tensor, dout: Tensor, dalpha: Optional[Tensor],
    transform: OutputTransform, norm: _NormOperands, flags: GateFlags, dx: Tensor, daf: Tensor, part: Optional[Tensor],
) -> None:  # fmt: skip
    """d alpha on x's grid into ``daf`` (plus ``dalpha``, alpha's own gradient, where given),
    this program's partial row ``[dW0 | dW_b]`` of ``part`` (with W), and dx at the positions
    no subsample patch covers."""
    has_w, has_norm = transform.W_w is not None, transform.gamma is not None
    absent = alpha_c  # a placeholder pointer for tensors the kernel does not read
    DP, HP, WP = p.covered
    K.fine_bwd[grid](
        x, alpha_c, transform.W_w if has_w else absent, dout, dalpha.contiguous() if dalpha is not None else absent,
        norm.wb, norm.gamma, norm.mean, norm.var, norm.sums, eps=float(flags.eps), inv_n=_batch_scale(p),
        dx_ptr=dx, daf_ptr=daf, part_ptr=part if has_w else absent,
        C=p.C, S=p.S, H=p.H, W=p.W, DC=p.DC, HC=p.HC, WC=p.WC, sd=p.sd, sh=p.sh, sw=p.sw, DP=DP, HP=HP, WP=WP,
        TPS=p.fine.per_sample, NT=p.fine.tiles, **_strides("sx", x), **_strides("so", dout), **_strides("sd", dx),
        BLOCK_S=p.fine.block, BLOCK_C=p.BLOCK_C, HAS_W=has_w, HAS_NORM=has_norm,
        BATCH_STATS=has_norm and flags.use_batch_stats, HAS_DALPHA=dalpha is not None,
        HAS_REST=(DP, HP, WP) != (p.D, p.H, p.W), WD=p.WD, WH=p.WH, WW=p.WW,
        ALIGN=p.ALIGN, I64=p.I64, PREC=p.PREC, ACC=p.ACC, DOT=p.DOT,
        num_warps=p.fine.warps, num_stages=p.stages,
    )  # fmt: skip


def _alpha_adjoint(p: Plan, daf: Tensor, dac: Tensor) -> Tensor:
    """d alpha_c into ``dac`` (``Tensor[N, 1, *S_c]``): the adjoint of alpha's resampling,
    gathered from d alpha on x's grid (``daf``)."""
    K.alpha_adjoint_kernel[p.coarse.grid](
        daf, dac, D=p.D, H=p.H, W=p.W, DC=p.DC, HC=p.HC, WC=p.WC, SC=p.SC,
        TPS=p.coarse.per_sample, NT=p.coarse.tiles, sd=p.sd, sh=p.sh, sw=p.sw,
        BLOCK_P=p.coarse.block, WD=p.WD, WH=p.WH, WW=p.WW, ALIGN=p.ALIGN, I64=p.I64, ACC=p.ACC,
        num_warps=4, num_stages=p.stages,
    )  # fmt: skip
    return dac


def coarse_bwd(
    p: Plan, grid: tuple[int], x: Tensor, g: Tensor, w: CoarseWeights, alpha_c: Tensor, dac: Tensor,
    df: Tensor, dg: Tensor, part: Tensor,
) -> None:  # fmt: skip
    """From d alpha_c: df = d(theta x + phi g) into ``df`` (``Tensor[N, S_c, F_int]``), dg, and
    this program's partial row ``[dphi_w | dphi_b | dpsi_w | dpsi_b]`` of ``part``."""
    K.coarse_bwd[grid](
        x, g, w.theta_w, w.phi_w, w.phi_b, w.psi_w, alpha_c, dac, df, dg, part,
        C=p.C, CG=p.CG, CI=p.CI, H=p.H, W=p.W, HC=p.HC, WC=p.WC, SC=p.SC,
        TPS=p.coarse.per_sample, NT=p.coarse.tiles, **_strides("sx", x), **_strides("sg", g), **_strides("sdg", dg),
        KD=p.KD, KH=p.KH, KW=p.KW, BKW=p.BKW, BLOCK_P=p.coarse.block,
        BLOCK_C=p.BLOCK_C, BLOCK_CG=p.BLOCK_CG, BLOCK_CI=p.BLOCK_CI,
        SOFTPLUS=p.SOFTPLUS, I64=p.I64, PREC=p.PREC, ACC=p.ACC, DOT=p.DOT,
        num_warps=p.coarse.warps, num_stages=p.stages,
    )  # fmt: skip


def patch_bwd(
    p: Plan, grid: tuple[int], x: Tensor, dout: Tensor, df: Tensor, theta_w: Tensor, alpha_c: Tensor,
    transform: OutputTransform, norm: _NormOperands, flags: GateFlags, dx: Tensor, part: Tensor,
) -> None:  # fmt: skip
    """Per patch row: dx (the theta path, df theta, and the recomputed W path), written once
    into ``dx``, and this program's partial row of dtheta (theta's layout) of ``part``."""
    has_w, has_norm = transform.W_w is not None, transform.gamma is not None
    K.patch_bwd[grid](
        x, dout, df, theta_w, transform.W_w if has_w else alpha_c, alpha_c,
        norm.wb, norm.gamma, norm.mean, norm.var, norm.sums, eps=float(flags.eps), inv_n=_batch_scale(p),
        dx_ptr=dx, part_ptr=part,
        C=p.C, CI=p.CI, H=p.H, W=p.W, DC=p.DC, HC=p.HC, WC=p.WC, SC=p.SC,
        TPS=p.patch.per_sample, NT=p.patch.tiles, sd=p.sd, sh=p.sh, sw=p.sw,
        **_strides("sx", x), **_strides("so", dout), **_strides("sd", dx),
        KD=p.KD, KH=p.KH, KW=p.KW, BKW=p.BKW, BLOCK_P=p.patch.block, BLOCK_C=p.BLOCK_C, BLOCK_CI=p.BLOCK_CI,
        HAS_W=has_w, HAS_NORM=has_norm, BATCH_STATS=has_norm and flags.use_batch_stats, WD=p.WD, WH=p.WH, WW=p.WW,
        ALIGN=p.ALIGN, I64=p.I64, PREC=p.PREC, ACC=p.ACC, DOT=p.DOT,
        num_warps=p.patch.warps, num_stages=p.stages,
    )  # fmt: skip


def _reduce_rows(out: Tensor, *parts: Tensor) -> None:
    """``out = [part.sum(0) for part in parts]`` concatenated (one to three ``[R, T]`` partial-row
    buffers; float64 accumulation, rows in order), by one ``sum_rows`` launch."""
    padded = list(parts) + [parts[0]] * (3 - len(parts))  # unused slots: rows of 0 columns
    (R1, T1), (R2, T2), (R3, T3) = [tuple(t.shape) for t in parts] + [(0, 0)] * (3 - len(parts))
    block_t = 128
    K.sum_rows[(triton.cdiv(T1, block_t) + triton.cdiv(T2, block_t) + triton.cdiv(T3, block_t),)](
        *padded, out, R1=R1, T1=T1, R2=R2, T2=T2, R3=R3, T3=T3,
        BLOCK_R=min(64, block_size(max(R1, R2, R3))), BLOCK_T=block_t,
    )  # fmt: skip
