"""Launchers: the passes of the fused gate over plain tensors (no autograd here).

Forward (``gate_forward``); the fine kernels resample alpha_c onto x's grid themselves, as
``F.interpolate`` does:

1. ``_coarse_fwd``: alpha_c on theta's grid (reads x, g once).
2. training with batch norm only: ``_fine_stats`` (reads x) and ``_stats_combine`` (float64),
   the statistics of ``alpha * W0 x``, which need a grid-wide reduction before the output.
3. ``_fine_out``: out = alpha * (W0 x) * scale + shift, W's conv and the norm folded into a
   per-channel affine map (reads x, writes out and alpha).

Backward (``gate_backward``), recomputing from x, g, alpha_c and the norm statistics:

1. with a norm: ``_fine_bwd_sums`` (reads x, dout) and ``_sum_rows``, the norm's gradients
   (sums over the grid, which dz needs under batch statistics).
2. ``_fine_bwd`` (reads x, dout; writes d alpha on x's grid, and dx where no patch reaches).
3. ``_alpha_adjoint_kernel``: d alpha_c, the adjoint of the resampling, as a gather.
4. ``_coarse_bwd`` (reads x, g; writes df on theta's grid and dg).
5. ``_patch_bwd`` (reads x, dout, df; writes dx once: the theta path and the W path together).
6. ``_sum_rows``: the weight gradients from the per-program partial rows of 2, 4 and 5.

No atomics and no zero-fills: every buffer is written once, and every sum has a fixed order
(given the device's multiprocessor count), so two runs give bitwise-equal gradients.

Tiles and grids come from ``tiles.TABLE`` (per architecture); the dot products' precision from
PyTorch's flags (``dot_precision``). ``PASSES`` lists, per kernel, the big tensors a launch
streams through memory (read or written in full, once), which is what the traffic model in
``benchmarks/gate_memory.py`` adds up over the launches a call really makes (and what an
interpreter test checks against the kernels' recorded loads and stores).
"""

from __future__ import annotations

import contextlib
import functools
from typing import Iterator, Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from . import kernels as K
from . import tiles
from .support import interpreting

__all__ = ["gate_forward", "gate_backward", "dot_precision", "plan_for", "weight_grad_sizes"]

INT32_LIMIT = 2**31  # a sample with this many elements or more takes 64-bit offsets

# per kernel: (argument names the launch streams in full, those it writes in full); the
# coarse-grid tensors (alpha_c, g on theta's grid) count as streamed where they are read per tile
PASSES: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "_coarse_fwd": (("x_ptr", "g_ptr"), ("ac_ptr",)),
    "_fine_stats": (("x_ptr", "ac_ptr"), ()),
    "_stats_combine": ((), ()),
    "_fine_out": (("x_ptr", "ac_ptr"), ("out_ptr", "alpha_ptr")),
    "_fine_bwd_sums": (("x_ptr", "ac_ptr", "do_ptr"), ()),
    "_fine_bwd": (("x_ptr", "ac_ptr", "do_ptr", "dalpha_ptr"), ("daf_ptr", "part_ptr")),
    "_alpha_adjoint_kernel": (("daf_ptr",), ("dac_ptr",)),
    "_coarse_bwd": (("x_ptr", "g_ptr", "ac_ptr", "dac_ptr"), ("df_ptr", "dg_ptr", "part_ptr")),
    "_patch_bwd": (("x_ptr", "do_ptr", "df_ptr", "ac_ptr"), ("dx_ptr", "part_ptr")),
    "_sum_rows": (("p1_ptr", "p2_ptr", "p3_ptr"), ("out_ptr",)),
}


def _p2(n: int) -> int:
    return max(16, triton.next_power_of_2(int(n)))


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
    on_gpu = bool(_TARGET) or (x.device.type == "cuda" and not interpreting())
    if x.dtype != torch.float32 or not on_gpu:
        return "ieee"
    return "tf32" if cudnn_conv_tf32() else "tf32x3"


_TARGET: list[tuple[str, int]] = []


@contextlib.contextmanager
def plan_for(arch: str, multiprocessors: int) -> Iterator[None]:
    """Inside: calls are planned as on a GPU of ``arch`` (a key of ``tiles.TABLE``) with
    ``multiprocessors`` (tiles, grid sizes, dot precision), whatever the tensors' device: for
    recording the launches of a GPU call and compiling its kernels without a GPU."""
    if arch not in tiles.TABLE:
        raise ValueError(f"arch must be one of {sorted(tiles.TABLE)}, got {arch!r}")
    _TARGET.append((arch, int(multiprocessors)))
    try:
        yield
    finally:
        _TARGET.pop()


@functools.lru_cache(maxsize=None)
def _device_programs(index: int) -> tuple[str, int]:
    props = torch.cuda.get_device_properties(index)
    return tiles.arch_key((props.major, props.minor)), props.multi_processor_count


def _tiles(x: Tensor, channels: int) -> tuple[tiles.Tiles, int, int]:
    """The tile row for ``channels`` on x's device, and the most programs a persistent grid of
    the coarse and of the fine kernels takes."""
    if _TARGET:
        arch, sms = _TARGET[-1]
    elif interpreting() or x.device.type != "cuda":
        return tiles.INTERPRETER, tiles.INTERPRETER_PROGRAMS, tiles.INTERPRETER_PROGRAMS
    else:
        arch, sms = _device_programs(x.device.index if x.device.index is not None else torch.cuda.current_device())
    row = tiles.lookup(arch, channels)
    return row, sms * row.coarse_per_sm, sms * row.fine_per_sm


def _window(out: int, inp: int, align_corners: bool) -> int:
    """How many fine indices along one axis one coarse index feeds (see ``kernels._adjoint_axis``)."""
    if out == inp:
        return 1
    if inp == 1:
        return out
    if align_corners:
        return min(out, -(-2 * (out - 1) // (inp - 1)))
    return min(out, -(-2 * out // inp))


def _scale(inp: int, out: int, align_corners: bool) -> float:
    """``F.interpolate``'s source scale along one axis (input size over output size)."""
    if align_corners:
        return (inp - 1) / (out - 1) if out > 1 else 0.0
    return inp / out


def _strides(prefix: str, t: Tensor) -> dict:
    """``{prefix + "n": .., prefix + "c": .., prefix + "s": ..}``: a flat-strided tensor's strides."""
    return dict(zip((prefix + "n", prefix + "c", prefix + "s"), _nsc(t)))


class _Plan:
    """Sizes, tiles, grids and compile-time constants of one call, shared by all its launches."""

    def __init__(self, x: Tensor, g: Tensor, theta_w: Tensor, softplus: bool, align_corners: bool) -> None:
        N, C = x.shape[:2]
        CI, CG = theta_w.shape[0], g.shape[1]
        D, H, W = _as_3d(x.shape[2:])
        KD, KH, KW = _as_3d(theta_w.shape[2:])
        DC, HC, WC = D // KD, H // KH, W // KW
        self.N, self.C, self.CI, self.CG = N, C, CI, CG
        self.S, self.SC, self.K = D * H * W, DC * HC * WC, KD * KH * KW
        bc, bci = _p2(C), _p2(CI)
        row, self.coarse_cap, self.fine_cap = _tiles(x, max(bc, bci))
        self.fine_tps, self.coarse_tps = triton.cdiv(self.S, row.fine_block), triton.cdiv(self.SC, row.coarse_block)
        self.tiles_fine, self.tiles_coarse = N * self.fine_tps, N * self.coarse_tps
        acc = tl.float64 if x.dtype == torch.float64 else tl.float32
        i64 = x[:1].numel() >= INT32_LIMIT or g[:1].numel() >= INT32_LIMIT
        # everything any kernel takes by keyword; ``launch`` passes each kernel its own
        self.args = dict(
            C=C, CG=CG, CI=CI, S=self.S, SC=self.SC, D=D, H=H, W=W, DC=DC, HC=HC, WC=WC,
            sd=_scale(DC, D, align_corners), sh=_scale(HC, H, align_corners), sw=_scale(WC, W, align_corners),
            DP=DC * KD, HP=HC * KH, WP=WC * KW, HAS_REST=(DC * KD, HC * KH, WC * KW) != (D, H, W),
            WD=_window(D, DC, align_corners), WH=_window(H, HC, align_corners), WW=_window(W, WC, align_corners),
            KD=KD, KH=KH, KW=KW, BKW=triton.next_power_of_2(KW), BLOCK_C=bc, BLOCK_CG=_p2(CG), BLOCK_CI=bci,
            SOFTPLUS=softplus, ALIGN=align_corners, I64=i64, PREC=dot_precision(x), ACC=acc, DOT=_TL[x.dtype],
            num_stages=row.stages,
        )  # fmt: skip
        self.fine_args = dict(TPS=self.fine_tps, NT=self.tiles_fine, BLOCK_S=row.fine_block, num_warps=row.fine_warps)
        self.coarse_args = dict(TPS=self.coarse_tps, NT=self.tiles_coarse, BLOCK_P=row.coarse_block, num_warps=row.coarse_warps)
        self.fine_grid = (max(1, min(self.tiles_fine, self.fine_cap)),)
        self.coarse_grid = (max(1, min(self.tiles_coarse, self.coarse_cap)),)
        patch_tps = triton.cdiv(self.SC, row.patch_block)
        self.patch_args = dict(TPS=patch_tps, NT=N * patch_tps, BLOCK_P=row.patch_block, num_warps=row.coarse_warps)
        self.patch_grid = (max(1, min(N * patch_tps, self.coarse_cap)),)
        self.x_bytes = x.numel() * x.element_size()

    def capped(self, grid: tuple[int], row: int) -> tuple[int]:
        """``grid`` for a kernel that writes one partial row of ``row`` floats per program: at most
        as many programs as keep those rows within x's bytes (small gates with big weights: a
        few programs, not one partial row per multiprocessor)."""
        return (max(1, min(grid[0], self.x_bytes // (4 * row))),)

    def fine(self, kernel, *args, grid=None, **kwargs) -> None:
        """Launch a fine kernel (x's grid) on this plan's persistent grid (or ``grid``)."""
        _launch(kernel, grid or self.fine_grid, args, {**self.args, **self.fine_args, **kwargs})

    def coarse(self, kernel, *args, grid=None, **kwargs) -> None:
        """Launch a coarse kernel (theta's grid) on this plan's persistent grid (or ``grid``)."""
        _launch(kernel, grid or self.coarse_grid, args, {**self.args, **self.coarse_args, **kwargs})

    def patch(self, kernel, *args, grid=None, **kwargs) -> None:
        """Launch ``_patch_bwd`` (theta's grid, its own tiles) on its persistent grid (or ``grid``)."""
        _launch(kernel, grid or self.patch_grid, args, {**self.args, **self.patch_args, **kwargs})


_OPTIONS = ("num_warps", "num_stages")


def _launch(kernel, grid: tuple, args: tuple, kwargs: dict) -> None:
    """``kernel[grid](*args, **kwargs)`` with only the keywords ``kernel`` takes (plus launch options)."""
    names = set(kernel.arg_names[len(args):])
    kernel[grid](*args, **{k: v for k, v in kwargs.items() if k in names or k in _OPTIONS})


def weight_grad_sizes(C: int, CG: int, CI: int, K: int, has_w: bool) -> list[int]:
    """Column counts of the flat weight gradient ``gate_backward`` returns: dtheta, dphi_w,
    dphi_b, dpsi_w, dpsi_b, then (with W) dW_w and dW_b."""
    return [CI * C * K, CI * CG, CI, CI, 1] + ([C * C, C] if has_w else [])


def _weights(*ts: Optional[Tensor]) -> tuple:
    """The kernels' view of parameters: detached, contiguous (a no-op for parameters)."""
    return tuple(None if t is None else t.detach().contiguous() for t in ts)


def _reduce_rows(out: Tensor, *parts: Tensor) -> None:
    """``out = [part.sum(0) for part in parts]`` concatenated (one to three ``[R, T]`` partial-row
    buffers; float64 accumulation, rows in order), by one ``_sum_rows`` launch."""
    padded = list(parts) + [parts[0]] * (3 - len(parts))
    shapes = [tuple(p.shape) for p in parts] + [(0, 0)] * (3 - len(parts))
    block_t = 128
    grid = (sum(triton.cdiv(T, block_t) for _, T in shapes),)
    K._sum_rows[grid](*padded, out, *(n for shape in shapes for n in shape), BLOCK_R=min(64, _p2(max(R for R, _ in shapes))), BLOCK_T=block_t)


def gate_forward(
    x: Tensor, g: Tensor, theta_w: Tensor, phi_w: Tensor, phi_b: Tensor, psi_w: Tensor, psi_b: Tensor,
    W_w: Optional[Tensor], W_b: Tensor, gamma: Optional[Tensor], beta: Optional[Tensor],
    mean_in: Optional[Tensor], var_in: Optional[Tensor], use_batch_stats: bool, eps: float,
    softplus: bool, align_corners: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """``(out, alpha, alpha_c, mean, var)``; mean/var are W's batch statistics when
    ``use_batch_stats`` (``Tensor[F_l]`` in the compute dtype), empty otherwise (then
    ``mean_in``/``var_in`` apply, and the backward takes them). ``x``, ``g`` pass
    ``flat_strides``; ``out`` has x's dtype and memory format."""
    plan = _Plan(x, g, theta_w, softplus, align_corners)
    N, C = x.shape[:2]
    dev, f32 = x.device, acc_dtype(x)
    ac = torch.empty((N, 1) + tuple(g.shape[2:]), device=dev, dtype=f32)
    sx = _strides("sx", x)
    plan.coarse(K._coarse_fwd, x, g, *_weights(theta_w, phi_w, phi_b, psi_w, psi_b), ac, **sx, **_strides("sg", g))
    has_w, has_norm = W_w is not None, gamma is not None
    absent = ac  # a placeholder pointer for tensors a kernel does not read
    w0, wb, gamma, beta = _weights(W_w, W_b, gamma, beta)
    # W's batch-norm statistics are outputs only when computed here (else the running ones apply)
    mean, var = x.new_empty(0, dtype=f32), x.new_empty(0, dtype=f32)
    if has_norm and use_batch_stats:
        part = torch.empty((plan.fine_grid[0], 2 * C + 1), device=dev, dtype=f32)
        plan.fine(K._fine_stats, x, ac, w0, part, **sx)
        mean, var = torch.empty(C, device=dev, dtype=f32), torch.empty(C, device=dev, dtype=f32)
        BC = min(_p2(C), 64)
        K._stats_combine[(triton.cdiv(C, BC),)](part, wb, mean, var, part.shape[0], C, BLOCK_R=min(64, _p2(part.shape[0])), BLOCK_C=BC)
    norm_stats = (mean, var) if use_batch_stats else _weights(mean_in, var_in)
    out = torch.empty_like(x)
    alpha = torch.empty((N, 1) + tuple(x.shape[2:]), device=dev, dtype=x.dtype)
    plan.fine(
        K._fine_out, x, ac, w0 if has_w else absent, wb if has_w else absent, gamma if has_norm else absent,
        beta if has_norm else absent, *(t if has_norm else absent for t in norm_stats), float(eps), out, alpha,
        **sx, **_strides("so", out), HAS_W=has_w, HAS_NORM=has_norm,
    )  # fmt: skip
    return out, alpha, ac, mean, var


def gate_backward(
    dout: Tensor, dalpha: Optional[Tensor], x: Tensor, g: Tensor, theta_w: Tensor, phi_w: Tensor, phi_b: Tensor,
    psi_w: Tensor, psi_b: Tensor, W_w: Optional[Tensor], W_b: Tensor, gamma: Optional[Tensor],
    alpha_c: Tensor, mean: Tensor, var: Tensor, use_batch_stats: bool, eps: float, softplus: bool,
    align_corners: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Gradients ``(dx, dg, dweights, dnorm)``: dx and dg in x's and g's dtypes and memory
    formats; ``dweights`` the weights' gradients flattened into one vector in the compute dtype
    (columns as ``weight_grad_sizes``, each in its weight's own layout); ``dnorm`` the norm's
    ``[dbeta | dgamma]`` (``Tensor[2 F_l]``, empty without a norm)."""
    plan = _Plan(x, g, theta_w, softplus, align_corners)
    N, C = x.shape[:2]
    dev, f32 = x.device, acc_dtype(x)
    dout = flat_strides(dout)
    has_w, has_norm = W_w is not None, gamma is not None
    absent = alpha_c  # a placeholder pointer for tensors a kernel does not read
    w0 = _weights(W_w)[0] if has_w else absent
    wb, gamma, mean, var = _weights(W_b, gamma, mean, var)
    sx, so = _strides("sx", x), _strides("so", dout)
    flags = dict(HAS_W=has_w, HAS_NORM=has_norm, BATCH_STATS=has_norm and use_batch_stats, eps=float(eps), inv_n=1.0 / (N * plan.S))
    # 1. the norm's gradients (dbeta, dgamma): sums over the grid, which dz needs under batch statistics
    dnorm = x.new_empty(0, dtype=f32)
    if has_norm:
        part = torch.empty((plan.fine_grid[0], 2 * C), device=dev, dtype=f32)
        plan.fine(K._fine_bwd_sums, x, alpha_c, w0, dout, wb, mean, var, float(eps), part, **sx, **so)
        dnorm = torch.empty(2 * C, device=dev, dtype=f32)
        _reduce_rows(dnorm, part)
    norm = dict(wb_ptr=wb, gamma_ptr=gamma, mean_ptr=mean, var_ptr=var, sums_ptr=dnorm) if has_norm else {}
    norm = {k: norm.get(k, absent) for k in ("wb_ptr", "gamma_ptr", "mean_ptr", "var_ptr", "sums_ptr")}
    # 2. d alpha on x's grid, W's partial sums, dx where no patch reaches
    sizes = weight_grad_sizes(C, plan.CG, plan.CI, plan.K, has_w)
    dx = torch.empty_like(x)
    daf = torch.empty((N, 1) + tuple(x.shape[2:]), device=dev, dtype=f32)
    grid = plan.capped(plan.fine_grid, C * C + C) if has_w else plan.fine_grid
    part_w = torch.empty((grid[0], C * C + C), device=dev, dtype=f32) if has_w else absent
    plan.fine(
        K._fine_bwd, x, alpha_c, w0, dout, dalpha.contiguous() if dalpha is not None else absent, **norm, grid=grid,
        dx_ptr=dx, daf_ptr=daf, part_ptr=part_w, **sx, **so, **_strides("sd", dx), HAS_DALPHA=dalpha is not None, **flags,
    )  # fmt: skip
    # 3. d alpha_c: the adjoint of alpha's resampling (a gather, no atomics)
    if plan.S == plan.SC:
        dac = daf
    else:
        dac = torch.empty_like(alpha_c)
        plan.coarse(K._alpha_adjoint_kernel, daf, dac, num_warps=4)
    # 4. df = d(theta x + phi g), dg, and the phi and psi gradients' partial sums
    dg = torch.empty_like(g)
    df = torch.empty((N, plan.SC, plan.CI), device=dev, dtype=f32 if x.dtype == torch.float32 else x.dtype)
    grid = plan.capped(plan.coarse_grid, sum(sizes[1:5]))
    part_coarse = torch.empty((grid[0], sum(sizes[1:5])), device=dev, dtype=f32)
    theta, phi_w, phi_b, psi_w = _weights(theta_w, phi_w, phi_b, psi_w)
    plan.coarse(
        K._coarse_bwd, x, g, theta, phi_w, phi_b, psi_w, alpha_c, dac, df, dg, part_coarse, grid=grid,
        **sx, **_strides("sg", g), **_strides("sdg", dg),
    )  # fmt: skip
    # 5. dtheta's partial sums and dx (theta path and W path), written once
    grid = plan.capped(plan.patch_grid, sizes[0])
    part_theta = torch.empty((grid[0], sizes[0]), device=dev, dtype=f32)
    plan.patch(
        K._patch_bwd, x, dout, df, theta, w0, alpha_c, **norm, dx_ptr=dx, part_ptr=part_theta, grid=grid,
        **sx, **so, **_strides("sd", dx), **flags,
    )  # fmt: skip
    # 6. the weight gradients: every partial row summed in a fixed order
    dweights = torch.empty(sum(sizes), device=dev, dtype=f32)
    _reduce_rows(dweights, part_theta, part_coarse, *((part_w,) if has_w else ()))
    return dx, dg, dweights, dnorm
