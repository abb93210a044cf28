"""Triton kernels of the fused grid attention gate.

Tensors are seen as ``x: [N, C, S]`` with one stride per axis (contiguous and channels-last
layouts both qualify), spatial positions flattened; 1D and 2D inputs are 3D with unit leading
sizes. Weights are read in their own (contiguous) layouts and dtypes, and weight gradients
written in them: theta ``[F_int, F_l, *k]``, phi ``[F_int, F_g]``, psi ``[F_int]``, W0 ``[F_l, F_l]``. Everything is computed in float32 (``ACC``; float64 for float64 inputs) whatever the storage dtype.

Coarse side (theta's grid ``Sc = S // k``), one program per ``BLOCK_P`` coarse positions:
    ``_coarse_fwd``   alpha_c = sigmoid(psi . sigma1(theta(x) + phi(g)) + b_psi)
    ``_coarse_bwd``   gradients of x (added to dx), g, theta, phi, psi from d alpha_c
Fine side (x's grid), one program per ``BLOCK_S`` positions; ``u = W0 x`` (W0: W's conv without bias):
    ``_fine_stats``   per-block mean and M2 of ``alpha * u`` (batch-norm statistics)
    ``_stats_combine`` their combination (float64): the batch mean and variance
    ``_fine_out``     out = alpha * (x @ W0^T) * scale + shift  (bias and norm folded per channel), and alpha
The fine kernels resample alpha_c onto x's grid themselves (``_alpha_fine``, as ``F.interpolate``).
    ``_fine_bwd_sums`` per-block sums of dout and dout * zhat (norm gradients); ``_sum_blocks`` adds them up
    ``_fine_bwd``     dz, d alpha (fine), dx from the W path, dW0 and db (atomics)
The norm's per-channel maps (scale and shift forward, the coefficients backward) are computed
in the kernels from the weights and statistics, not on the host.
Weight gradients are accumulated in float32 with atomic adds (their order, hence the last bits,
varies between runs); per-channel statistics go through per-block partials combined in float64.
"""

import triton
import triton.language as tl


@triton.jit
def _sigma1(t, SOFTPLUS: tl.constexpr):
    if SOFTPLUS:
        return tl.where(t > 20.0, t, tl.log(1.0 + tl.exp(tl.minimum(t, 20.0))))
    else:
        return tl.maximum(t, 0.0)


@triton.jit
def _sigma1_grad(t, SOFTPLUS: tl.constexpr):
    if SOFTPLUS:
        return 1.0 / (1.0 + tl.exp(-t))
    else:
        return tl.where(t > 0.0, 1.0, 0.0).to(t.dtype)


@triton.jit
def _coarse_ids(
    C, CG, CI, SC, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_CG: tl.constexpr, BLOCK_CI: tl.constexpr,
):
    """This program's batch index and block of coarse positions, the channel ranges of x, g and
    theta's output, and their masks."""
    n = tl.program_id(1).to(tl.int64)
    p = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)
    c = tl.arange(0, BLOCK_C)
    cg = tl.arange(0, BLOCK_CG)
    ci = tl.arange(0, BLOCK_CI)
    return n, p, p < SC, c, c < C, cg, cg < CG, ci, ci < CI


@triton.jit
def _patch_pos(p, o, H, W, HC, WC, KD: tl.constexpr, KH: tl.constexpr, KW: tl.constexpr):
    """x's flat position of offset ``o`` (of the ``KD x KH x KW`` subsample patch) of coarse positions ``p``."""
    wc = p % WC
    hc = (p // WC) % HC
    dc = p // (WC * HC)
    return ((dc * KD + o // (KH * KW)) * H + (hc * KH + (o // KW) % KH)) * W + (wc * KW + o % KW)


@triton.jit
def _coarse_pre(
    x_ptr, g_ptr, wt_ptr, wp_ptr, bp_ptr, n, p, pmask, c, cmask, cg, cgmask, ci, cimask,
    C, CG, CI, H, W, HC, WC, sxn, sxc, sxs, sgn, sgc, sgs,
    KD: tl.constexpr, KH: tl.constexpr, KW: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_CI: tl.constexpr,
    PREC: tl.constexpr, ACC: tl.constexpr,
):
    """theta(x) + phi(g) on BLOCK_P coarse positions: Tensor[BLOCK_P, BLOCK_CI], and the g tile."""
    K: tl.constexpr = KD * KH * KW
    acc = tl.zeros([BLOCK_P, BLOCK_CI], dtype=ACC)
    xmask = pmask[:, None] & cmask[None, :]
    wmask = cmask[:, None] & cimask[None, :]
    for o in tl.static_range(K):
        s = _patch_pos(p, o, H, W, HC, WC, KD, KH, KW)
        xo = tl.load(x_ptr + n * sxn + s[:, None] * sxs + c[None, :] * sxc, mask=xmask, other=0.0).to(ACC)
        wo = tl.load(wt_ptr + ci[None, :] * (C * K) + c[:, None] * K + o, mask=wmask, other=0.0).to(ACC)
        acc += tl.dot(xo, wo, input_precision=PREC)
    gt = tl.load(g_ptr + n * sgn + p[:, None] * sgs + cg[None, :] * sgc, mask=pmask[:, None] & cgmask[None, :], other=0.0).to(ACC)
    wp = tl.load(wp_ptr + ci[None, :] * CG + cg[:, None], mask=cgmask[:, None] & cimask[None, :], other=0.0).to(ACC)
    bp = tl.load(bp_ptr + ci, mask=cimask, other=0.0).to(ACC)
    acc += tl.dot(gt, wp, input_precision=PREC) + bp[None, :]
    return acc, gt


@triton.jit
def _coarse_fwd(
    x_ptr, g_ptr, wt_ptr, wp_ptr, bp_ptr, wpsi_ptr, bpsi_ptr, ac_ptr,
    C, CG, CI, H, W, HC, WC, SC, sxn, sxc, sxs, sgn, sgc, sgs,
    KD: tl.constexpr, KH: tl.constexpr, KW: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
    BLOCK_CG: tl.constexpr, BLOCK_CI: tl.constexpr, SOFTPLUS: tl.constexpr, PREC: tl.constexpr, ACC: tl.constexpr,
):
    n, p, pmask, c, cmask, cg, cgmask, ci, cimask = _coarse_ids(C, CG, CI, SC, BLOCK_P, BLOCK_C, BLOCK_CG, BLOCK_CI)
    pre, gt = _coarse_pre(
        x_ptr, g_ptr, wt_ptr, wp_ptr, bp_ptr, n, p, pmask, c, cmask, cg, cgmask, ci, cimask,
        C, CG, CI, H, W, HC, WC, sxn, sxc, sxs, sgn, sgc, sgs, KD, KH, KW, BLOCK_P, BLOCK_CI, PREC, ACC,
    )
    f = _sigma1(pre, SOFTPLUS)
    wpsi = tl.load(wpsi_ptr + ci, mask=cimask, other=0.0).to(ACC)
    q = tl.sum(f * wpsi[None, :], axis=1) + tl.load(bpsi_ptr).to(ACC)
    alpha = 1.0 / (1.0 + tl.exp(-q))
    tl.store(ac_ptr + n * SC + p, alpha, mask=pmask)


@triton.jit
def _coarse_bwd(
    x_ptr, g_ptr, wt_ptr, wp_ptr, bp_ptr, wpsi_ptr, ac_ptr, dac_ptr,
    dx_ptr, dg_ptr, dwt_ptr, dwp_ptr, dbp_ptr, dwpsi_ptr, dbpsi_ptr,
    C, CG, CI, H, W, HC, WC, SC, sxn, sxc, sxs, sgn, sgc, sgs, sdn, sdc, sds, sdgn, sdgc, sdgs,
    KD: tl.constexpr, KH: tl.constexpr, KW: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
    BLOCK_CG: tl.constexpr, BLOCK_CI: tl.constexpr, SOFTPLUS: tl.constexpr, PREC: tl.constexpr, ACC: tl.constexpr,
):
    n, p, pmask, c, cmask, cg, cgmask, ci, cimask = _coarse_ids(C, CG, CI, SC, BLOCK_P, BLOCK_C, BLOCK_CG, BLOCK_CI)
    pre, gt = _coarse_pre(
        x_ptr, g_ptr, wt_ptr, wp_ptr, bp_ptr, n, p, pmask, c, cmask, cg, cgmask, ci, cimask,
        C, CG, CI, H, W, HC, WC, sxn, sxc, sxs, sgn, sgc, sgs, KD, KH, KW, BLOCK_P, BLOCK_CI, PREC, ACC,
    )
    f = _sigma1(pre, SOFTPLUS)
    a = tl.load(ac_ptr + n * SC + p, mask=pmask, other=0.0)
    dq = tl.load(dac_ptr + n * SC + p, mask=pmask, other=0.0) * a * (1.0 - a)  # sigmoid'
    wpsi = tl.load(wpsi_ptr + ci, mask=cimask, other=0.0).to(ACC)
    tl.atomic_add(dwpsi_ptr + ci, tl.sum(dq[:, None] * f, axis=0), mask=cimask)
    tl.atomic_add(dbpsi_ptr, tl.sum(dq, axis=0))
    df = dq[:, None] * wpsi[None, :] * _sigma1_grad(pre, SOFTPLUS)  # d(theta x + phi g)
    df = tl.where(pmask[:, None], df, 0.0)
    tl.atomic_add(dbp_ptr + ci, tl.sum(df, axis=0), mask=cimask)
    tl.atomic_add(
        dwp_ptr + ci[None, :] * CG + cg[:, None], tl.dot(tl.trans(gt), df, input_precision=PREC),
        mask=cgmask[:, None] & cimask[None, :],
    )
    wpt = tl.load(wp_ptr + ci[:, None] * CG + cg[None, :], mask=cimask[:, None] & cgmask[None, :], other=0.0).to(ACC)
    tl.store(
        dg_ptr + n * sdgn + p[:, None] * sdgs + cg[None, :] * sdgc,
        tl.dot(df, wpt, input_precision=PREC).to(dg_ptr.dtype.element_ty),
        mask=pmask[:, None] & cgmask[None, :],
    )
    K: tl.constexpr = KD * KH * KW
    xmask = pmask[:, None] & cmask[None, :]
    for o in tl.static_range(K):
        s = _patch_pos(p, o, H, W, HC, WC, KD, KH, KW)
        xo = tl.load(x_ptr + n * sxn + s[:, None] * sxs + c[None, :] * sxc, mask=xmask, other=0.0).to(ACC)
        tl.atomic_add(
            dwt_ptr + ci[None, :] * (C * K) + c[:, None] * K + o, tl.dot(tl.trans(xo), df, input_precision=PREC),
            mask=cmask[:, None] & cimask[None, :],
        )
        wot = tl.load(wt_ptr + ci[:, None] * (C * K) + c[None, :] * K + o, mask=cimask[:, None] & cmask[None, :], other=0.0).to(ACC)
        dptr = dx_ptr + n * sdn + s[:, None] * sds + c[None, :] * sdc
        dxo = tl.load(dptr, mask=xmask, other=0.0) + tl.dot(df, wot, input_precision=PREC)
        tl.store(dptr, dxo, mask=xmask)


@triton.jit
def _linear_src(dst, IN, scale, ALIGN: tl.constexpr, ACC: tl.constexpr):
    """``F.interpolate``'s linear source along one axis for output indices ``dst``: the two input
    indices and the weight of the second (``scale``: input / output size, or (input - 1) /
    (output - 1) with ``align_corners``)."""
    d = dst.to(ACC)
    if ALIGN:
        src = d * scale
    else:
        src = tl.maximum((d + 0.5) * scale - 0.5, 0.0)
    i0 = tl.minimum(src.to(tl.int32), IN - 1)
    lam = tl.minimum(tl.maximum(src - i0.to(ACC), 0.0), 1.0)
    return i0, tl.minimum(i0 + 1, IN - 1), lam


@triton.jit
def _alpha_fine(ac_ptr, n, s, smask, H, W, DC, HC, WC, sd, sh, sw, ALIGN: tl.constexpr, ACC: tl.constexpr):
    """alpha on x's grid at flat positions ``s``: alpha_c (``Tensor[N, 1, DC, HC, WC]``, contiguous)
    resampled (tri)linearly as ``F.interpolate`` does (1D and 2D: unit leading axes)."""
    d0, d1, ld = _linear_src(s // (W * H), DC, sd, ALIGN, ACC)
    h0, h1, lh = _linear_src((s // W) % H, HC, sh, ALIGN, ACC)
    w0, w1, lw = _linear_src(s % W, WC, sw, ALIGN, ACC)
    base = ac_ptr + n * DC * HC * WC
    r0, r1 = d0 * HC, d1 * HC
    a00 = (1.0 - lw) * tl.load(base + (r0 + h0) * WC + w0, mask=smask, other=0.0).to(ACC) + lw * tl.load(base + (r0 + h0) * WC + w1, mask=smask, other=0.0).to(ACC)
    a01 = (1.0 - lw) * tl.load(base + (r0 + h1) * WC + w0, mask=smask, other=0.0).to(ACC) + lw * tl.load(base + (r0 + h1) * WC + w1, mask=smask, other=0.0).to(ACC)
    a10 = (1.0 - lw) * tl.load(base + (r1 + h0) * WC + w0, mask=smask, other=0.0).to(ACC) + lw * tl.load(base + (r1 + h0) * WC + w1, mask=smask, other=0.0).to(ACC)
    a11 = (1.0 - lw) * tl.load(base + (r1 + h1) * WC + w0, mask=smask, other=0.0).to(ACC) + lw * tl.load(base + (r1 + h1) * WC + w1, mask=smask, other=0.0).to(ACC)
    return (1.0 - ld) * ((1.0 - lh) * a00 + lh * a01) + ld * ((1.0 - lh) * a10 + lh * a11)


@triton.jit
def _fine_tile(
    x_ptr, ac_ptr, w0_ptr, C, S, H, W, DC, HC, WC, sd, sh, sw, sxn, sxc, sxs,
    BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr, HAS_W: tl.constexpr, ALIGN: tl.constexpr,
    PREC: tl.constexpr, ACC: tl.constexpr,
):
    """This program's block of x's grid: batch index, positions, channels, their masks, the x tile
    Tensor[BLOCK_S, BLOCK_C], u = x @ W0^T (x itself without W) and alpha Tensor[BLOCK_S]
    (resampled here from alpha_c)."""
    n = tl.program_id(1).to(tl.int64)
    s = tl.program_id(0) * BLOCK_S + tl.arange(0, BLOCK_S)
    smask = s < S
    c = tl.arange(0, BLOCK_C)
    cmask = c < C
    xt = tl.load(x_ptr + n * sxn + s[:, None] * sxs + c[None, :] * sxc, mask=smask[:, None] & cmask[None, :], other=0.0).to(ACC)
    if HAS_W:
        w0t = tl.load(w0_ptr + c[None, :] * C + c[:, None], mask=cmask[:, None] & cmask[None, :], other=0.0).to(ACC)
        u = tl.dot(xt, w0t, input_precision=PREC)
    else:
        u = xt
    a = _alpha_fine(ac_ptr, n, s, smask, H, W, DC, HC, WC, sd, sh, sw, ALIGN, ACC)
    return n, s, smask, c, cmask, xt, u, a


@triton.jit
def _fine_stats(
    x_ptr, ac_ptr, w0_ptr, mean_ptr, m2_ptr, cnt_ptr, C, S, sxn, sxc, sxs, H, W, DC, HC, WC, sd, sh, sw,
    BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr, HAS_W: tl.constexpr, ALIGN: tl.constexpr, PREC: tl.constexpr, ACC: tl.constexpr,
):
    n, s, smask, c, cmask, xt, u, a = _fine_tile(
        x_ptr, ac_ptr, w0_ptr, C, S, H, W, DC, HC, WC, sd, sh, sw, sxn, sxc, sxs, BLOCK_S, BLOCK_C, HAS_W, ALIGN, PREC, ACC
    )
    blk = tl.program_id(1) * tl.num_programs(0) + tl.program_id(0)
    z = a[:, None] * u
    cnt = tl.sum(smask.to(ACC), axis=0)
    mean = tl.sum(z, axis=0) / cnt
    dev = tl.where(smask[:, None], z - mean[None, :], 0.0)
    tl.store(mean_ptr + blk * C + c, mean, mask=cmask)
    tl.store(m2_ptr + blk * C + c, tl.sum(dev * dev, axis=0), mask=cmask)
    tl.store(cnt_ptr + blk, cnt)


@triton.jit
def _rows(ptr, b0, NB, c, cmask, C, BLOCK_B: tl.constexpr):
    """Rows ``b0 .. b0 + BLOCK_B`` and columns ``c`` of a ``[NB, C]`` array, in float64 (0 outside)."""
    b = b0 + tl.arange(0, BLOCK_B)
    return tl.load(ptr + b[:, None] * C + c[None, :], mask=(b < NB)[:, None] & cmask[None, :], other=0.0).to(tl.float64)


@triton.jit
def _stats_combine(
    mean_b_ptr, m2_b_ptr, cnt_b_ptr, wb_ptr, mean_ptr, var_ptr, NB, C,
    BLOCK_B: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """Chan's combination of ``_fine_stats``' per-block (mean, M2, count), in float64, for
    BLOCK_C channels: the mean of alpha * u + b (b: W's bias) and the biased variance."""
    c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = c < C
    n = tl.zeros([BLOCK_C], dtype=tl.float64)
    total = tl.zeros([BLOCK_C], dtype=tl.float64)
    for b0 in range(0, NB, BLOCK_B):
        cnt = _rows(cnt_b_ptr, b0, NB, c * 0, c >= 0, 1, BLOCK_B)  # the block's count in every column
        n += tl.sum(cnt, axis=0)
        total += tl.sum(cnt * _rows(mean_b_ptr, b0, NB, c, cmask, C, BLOCK_B), axis=0)
    mean = total / n
    m2 = tl.zeros([BLOCK_C], dtype=tl.float64)
    for b0 in range(0, NB, BLOCK_B):
        cnt = _rows(cnt_b_ptr, b0, NB, c * 0, c >= 0, 1, BLOCK_B)
        dev = _rows(mean_b_ptr, b0, NB, c, cmask, C, BLOCK_B) - mean[None, :]
        m2 += tl.sum(_rows(m2_b_ptr, b0, NB, c, cmask, C, BLOCK_B) + cnt * dev * dev, axis=0)
    wb = tl.load(wb_ptr + c, mask=cmask, other=0.0).to(tl.float64)
    tl.store(mean_ptr + c, (mean + wb).to(mean_ptr.dtype.element_ty), mask=cmask)
    tl.store(var_ptr + c, (m2 / n).to(var_ptr.dtype.element_ty), mask=cmask)


@triton.jit
def _sum_blocks(a_ptr, b_ptr, sa_ptr, sb_ptr, NB, C, BLOCK_B: tl.constexpr, BLOCK_C: tl.constexpr):
    """Column sums, in float64, of two ``[NB, C]`` arrays of per-block partial sums."""
    c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = c < C
    sa = tl.zeros([BLOCK_C], dtype=tl.float64)
    sb = tl.zeros([BLOCK_C], dtype=tl.float64)
    for b0 in range(0, NB, BLOCK_B):
        sa += tl.sum(_rows(a_ptr, b0, NB, c, cmask, C, BLOCK_B), axis=0)
        sb += tl.sum(_rows(b_ptr, b0, NB, c, cmask, C, BLOCK_B), axis=0)
    tl.store(sa_ptr + c, sa.to(sa_ptr.dtype.element_ty), mask=cmask)
    tl.store(sb_ptr + c, sb.to(sb_ptr.dtype.element_ty), mask=cmask)


@triton.jit
def _fine_out(
    x_ptr, ac_ptr, w0_ptr, wb_ptr, gamma_ptr, beta_ptr, mean_ptr, var_ptr, eps, out_ptr, alpha_ptr,
    C, S, sxn, sxc, sxs, son, soc, sos, H, W, DC, HC, WC, sd, sh, sw,
    BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr, HAS_W: tl.constexpr, HAS_NORM: tl.constexpr, ALIGN: tl.constexpr,
    PREC: tl.constexpr, ACC: tl.constexpr,
):
    """out = alpha * u * scale + shift, W's bias and norm folded per channel here:
    scale = gamma / sqrt(var + eps), shift = (b - mean) * scale + beta (mean: of alpha u + b);
    and alpha on x's grid, an output too."""
    n, s, smask, c, cmask, xt, u, a = _fine_tile(
        x_ptr, ac_ptr, w0_ptr, C, S, H, W, DC, HC, WC, sd, sh, sw, sxn, sxc, sxs, BLOCK_S, BLOCK_C, HAS_W, ALIGN, PREC, ACC
    )
    tl.store(alpha_ptr + n * S + s, a.to(alpha_ptr.dtype.element_ty), mask=smask)
    out = a[:, None] * u
    if HAS_W:
        shift = tl.load(wb_ptr + c, mask=cmask, other=0.0).to(ACC)
        if HAS_NORM:
            var = tl.load(var_ptr + c, mask=cmask, other=1.0).to(ACC)
            scale = tl.load(gamma_ptr + c, mask=cmask, other=0.0).to(ACC) / tl.sqrt(var + eps)
            shift = (shift - tl.load(mean_ptr + c, mask=cmask, other=0.0).to(ACC)) * scale
            shift += tl.load(beta_ptr + c, mask=cmask, other=0.0).to(ACC)
            out = out * scale[None, :]
        out += shift[None, :]
    tl.store(
        out_ptr + n * son + s[:, None] * sos + c[None, :] * soc, out.to(out_ptr.dtype.element_ty),
        mask=smask[:, None] & cmask[None, :],
    )


@triton.jit
def _norm_coefs(
    wb_ptr, gamma_ptr, mean_ptr, var_ptr, dbeta_ptr, dgamma_ptr, eps, inv_n, c, cmask,
    HAS_NORM: tl.constexpr, BATCH_STATS: tl.constexpr, ACC: tl.constexpr,
):
    """Per channel, for the backward through W's norm: r = 1/sqrt(var + eps) and h = (b - mean) r
    (so zhat = alpha u r + h), and A, B, E of dz = A dout + B + E zhat (B = E = 0 without batch
    statistics; A = 1, the rest 0, without a norm)."""
    zero = (c * 0).to(ACC)
    if HAS_NORM:
        r = 1.0 / tl.sqrt(tl.load(var_ptr + c, mask=cmask, other=1.0).to(ACC) + eps)
        h = (tl.load(wb_ptr + c, mask=cmask, other=0.0).to(ACC) - tl.load(mean_ptr + c, mask=cmask, other=0.0).to(ACC)) * r
        A = tl.load(gamma_ptr + c, mask=cmask, other=0.0).to(ACC) * r
        if BATCH_STATS:
            B = -A * tl.load(dbeta_ptr + c, mask=cmask, other=0.0) * inv_n
            E = -A * tl.load(dgamma_ptr + c, mask=cmask, other=0.0) * inv_n
        else:
            B = zero
            E = zero
    else:
        r = zero + 1.0
        h = zero
        A = zero + 1.0
        B = zero
        E = zero
    return r, h, A, B, E


@triton.jit
def _fine_bwd_sums(
    x_ptr, ac_ptr, w0_ptr, do_ptr, wb_ptr, mean_ptr, var_ptr, eps, sdo_ptr, sdoz_ptr,
    C, S, sxn, sxc, sxs, son, soc, sos, H, W, DC, HC, WC, sd, sh, sw,
    BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr, ALIGN: tl.constexpr, PREC: tl.constexpr, ACC: tl.constexpr,
):
    """Per-block sums of dout and dout * zhat, zhat = alpha * u * r + h."""
    n, s, smask, c, cmask, xt, u, a = _fine_tile(
        x_ptr, ac_ptr, w0_ptr, C, S, H, W, DC, HC, WC, sd, sh, sw, sxn, sxc, sxs, BLOCK_S, BLOCK_C, True, ALIGN, PREC, ACC
    )
    blk = tl.program_id(1) * tl.num_programs(0) + tl.program_id(0)
    m2 = smask[:, None] & cmask[None, :]
    r, h, _, _, _ = _norm_coefs(wb_ptr, var_ptr, mean_ptr, var_ptr, var_ptr, var_ptr, eps, 0.0, c, cmask, True, False, ACC)
    do = tl.load(do_ptr + n * son + s[:, None] * sos + c[None, :] * soc, mask=m2, other=0.0).to(ACC)
    zhat = a[:, None] * u * r[None, :] + h[None, :]
    tl.store(sdo_ptr + blk * C + c, tl.sum(do, axis=0), mask=cmask)
    tl.store(sdoz_ptr + blk * C + c, tl.sum(tl.where(m2, do * zhat, 0.0), axis=0), mask=cmask)


@triton.jit
def _fine_bwd(
    x_ptr, ac_ptr, w0_ptr, do_ptr, dalpha_ptr, wb_ptr, gamma_ptr, mean_ptr, var_ptr, dbeta_ptr, dgamma_ptr, eps, inv_n,
    dx_ptr, daf_ptr, dw0_ptr, db_ptr, C, S, sxn, sxc, sxs, son, soc, sos, sdn, sdc, sds, H, W, DC, HC, WC, sd, sh, sw,
    BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr, HAS_W: tl.constexpr, HAS_NORM: tl.constexpr,
    BATCH_STATS: tl.constexpr, HAS_DALPHA: tl.constexpr, ALIGN: tl.constexpr, PREC: tl.constexpr, ACC: tl.constexpr,
):
    """dz = A dout + B + E zhat (zhat = alpha u r + h, see ``_norm_coefs``); then
    d alpha = sum_c dz u (+ the alpha output's gradient), dx = alpha W0^T dz, dW0 += dz^T (alpha x), db += sum dz."""
    n, s, smask, c, cmask, xt, u, a = _fine_tile(
        x_ptr, ac_ptr, w0_ptr, C, S, H, W, DC, HC, WC, sd, sh, sw, sxn, sxc, sxs, BLOCK_S, BLOCK_C, HAS_W, ALIGN, PREC, ACC
    )
    m2 = smask[:, None] & cmask[None, :]
    r, h, A, B, E = _norm_coefs(
        wb_ptr, gamma_ptr, mean_ptr, var_ptr, dbeta_ptr, dgamma_ptr, eps, inv_n, c, cmask, HAS_NORM, BATCH_STATS, ACC
    )
    do = tl.load(do_ptr + n * son + s[:, None] * sos + c[None, :] * soc, mask=m2, other=0.0).to(ACC)
    dz = A[None, :] * do + B[None, :] + E[None, :] * (a[:, None] * u * r[None, :] + h[None, :])
    dz = tl.where(m2, dz, 0.0)
    da = tl.sum(dz * u, axis=1)
    if HAS_DALPHA:
        da += tl.load(dalpha_ptr + n * S + s, mask=smask, other=0.0).to(ACC)
    tl.store(daf_ptr + n * S + s, da, mask=smask)
    adz = a[:, None] * dz
    if HAS_W:
        w0 = tl.load(w0_ptr + c[:, None] * C + c[None, :], mask=cmask[:, None] & cmask[None, :], other=0.0).to(ACC)
        dxt = tl.dot(adz, w0, input_precision=PREC)
        tl.atomic_add(
            dw0_ptr + c[:, None] * C + c[None, :], tl.dot(tl.trans(dz), a[:, None] * xt, input_precision=PREC),
            mask=cmask[:, None] & cmask[None, :],
        )
        tl.atomic_add(db_ptr + c, tl.sum(dz, axis=0), mask=cmask)
    else:
        dxt = adz
    tl.store(dx_ptr + n * sdn + s[:, None] * sds + c[None, :] * sdc, dxt, mask=m2)
