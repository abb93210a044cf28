"""Triton kernels of the fused grid attention gate.

Tensors are seen as ``x: [N, C, S]`` with one stride per axis (contiguous and channels-last
layouts both qualify), spatial positions flattened; 1D and 2D inputs are 3D with unit leading
sizes. Weights are read in their own (contiguous) layouts and dtypes: theta ``[F_int, F_l, KD, KH, KW]``,
phi ``[F_int, F_g]``, psi ``[F_int]``, W0 ``[F_l, F_l]`` (W's conv without its bias).

Every kernel is persistent: a grid of a few programs per multiprocessor, each looping over
tiles ``pid, pid + P, pid + 2P, ...`` (``P`` programs), so that the batch size is bounded by
nothing but memory, and each program's sums have a fixed order.

Coarse tiles (theta's grid, ``Sc = S // k``) are ``BLOCK_P`` coarse positions of one sample.
Their subsample patches are read as ``KD * KH`` patch rows: per coarse position the ``KW``
consecutive fine positions of the row (``Tensor[BLOCK_P * BKW, BLOCK_C]``, consecutive rows
consecutive in memory, no per-lane division), viewed as ``[BLOCK_P, BKW * BLOCK_C]`` for theta's
dot. Fine tiles (x's grid) are ``BLOCK_S`` consecutive positions of one sample.

Forward:
    ``coarse_fwd``     alpha_c = sigmoid(psi . sigma1(theta(x) + phi(g)) + b_psi)
    ``fine_stats``     per-program (mean, M2) of ``alpha * u`` (u = W0 x), merged over its tiles (Chan)
    ``stats_combine``  their combination in row order (float64): W's batch mean and variance
    ``fine_out``       out = alpha * u * scale + shift (bias and norm folded per channel), and alpha
Backward (recomputing from x, g, alpha_c and the norm statistics):
    ``fine_bwd_sums``  per-program sums of dout and dout * zhat (the norm's gradients)
    ``fine_bwd``       d alpha on x's grid, per-program partials of dW0 and db, and dx at the
                        positions no subsample patch covers
    ``alpha_adjoint_kernel``  d alpha_c, the adjoint of alpha's resampling: a gather over the
                        fine positions whose gradient each coarse position takes
    ``coarse_bwd``     df = d(theta x + phi g) per coarse position (written), dg, and
                        per-program partials of dphi, dbp, dpsi, db_psi
    ``patch_bwd``      per patch row: dx (theta path + recomputed W path, written once in x's
                        dtype) and per-program partials of dtheta
    ``sum_rows``       the column sums of per-program partial rows, in row order (float64)
The fine kernels resample alpha_c onto x's grid themselves (``_alpha_at``, as ``F.interpolate``).
A program accumulates its partial sums in registers over its tiles and writes them once; no
kernel uses atomics, so gradients are bitwise reproducible run to run on one device.

Arithmetic is float32 (``ACC``; float64 for float64 inputs). Dot products take their operands
in ``DOT`` (x's dtype: 16-bit inputs are dotted in their own dtype) and accumulate in ``ACC``,
with ``PREC`` (``"tf32"``, ``"tf32x3"`` or ``"ieee"``) for float32 operands. ``I64``: offsets
within a sample in 64 bits (a sample of 2^31 elements or more).

NaN and infinities go where the reference's go: sigma1 keeps NaN (as torch's relu and
softplus), the relu's gradient is a select (0 where ``t <= 0`` whatever comes, as torch's),
padded channels stay out of every sum that reaches an output, an axis that is not resampled
reads no neighbour (``F.interpolate`` copies it), the resampling's adjoint adds the terms of
weight 0 that ``F.interpolate``'s backward adds, the backward's dz leaves the normalised
output out where it does not depend on it (no batch statistics), and the per-program means of
the batch statistics are weighted sums (an infinite value keeps them infinite).
"""

import triton
import triton.language as tl


@triton.jit
def _sigma1(t, SOFTPLUS: tl.constexpr):
    """relu or softplus, NaN in NaN out (as torch's; ``tl.maximum``'s default would drop NaN)."""
    if SOFTPLUS:
        return tl.where(t > 20.0, t, tl.log(1.0 + tl.exp(tl.minimum(t, 20.0, propagate_nan=tl.PropagateNan.ALL))))
    else:
        return tl.maximum(t, 0.0, propagate_nan=tl.PropagateNan.ALL)


@triton.jit
def _sigma1_backward(t, grad, SOFTPLUS: tl.constexpr):
    """The gradient through sigma1 at ``t``, as torch's: relu passes ``grad`` where ``t > 0`` or
    NaN and gives 0 elsewhere, whatever ``grad`` is; softplus scales it by sigmoid(t)."""
    if SOFTPLUS:
        return grad * (1.0 / (1.0 + tl.exp(-t)))
    else:
        return tl.where(t <= 0.0, 0.0, grad)


# ---------------------------------------------------------------- geometry


@triton.jit
def _coarse_tile(t, TPS, BLOCK_P: tl.constexpr):
    """Tile ``t``'s sample ``n`` (int64) and coarse positions ``p`` (flat, within the sample)."""
    n = t // TPS
    return n.to(tl.int64), (t - n * TPS) * BLOCK_P + tl.arange(0, BLOCK_P)


@triton.jit
def _coarse_coords(p, HC, WC, I64: tl.constexpr):
    """Coarse grid coordinates ``(dc, hc, wc)`` of flat coarse positions ``p``."""
    r = p // WC
    wc = p - r * WC
    dc = r // HC
    hc = r - dc * HC
    if I64:
        dc, hc, wc = dc.to(tl.int64), hc.to(tl.int64), wc.to(tl.int64)
    return dc, hc, wc


@triton.jit
def _patch_rows(t, TPS, SC, H, W, HC, WC, KD: tl.constexpr, KH: tl.constexpr, KW: tl.constexpr,
                BKW: tl.constexpr, BLOCK_P: tl.constexpr, I64: tl.constexpr):
    """The tile's fine positions as ``BLOCK_P * BKW`` rows, row ``m`` = (coarse position
    ``m // BKW``, offset ``ow = m % BKW`` along W): each row's fine grid coordinates at patch
    row 0 (``d0, h0, w``), its flat fine position there (``s0``; consecutive rows of a coarse
    position are consecutive positions) and its mask."""
    m = tl.arange(0, BLOCK_P * BKW)
    n = t // TPS
    p = (t - n * TPS) * BLOCK_P + m // BKW
    ow = m % BKW
    dc, hc, wc = _coarse_coords(p, HC, WC, I64)
    d0, h0, w = dc * KD, hc * KH, wc * KW + ow
    return d0, h0, w, (d0 * H + h0) * W + w, (p < SC) & (ow < KW)


@triton.jit
def _row_offsets(s0, q, sc, ss, H, W, KH: tl.constexpr, BKW: tl.constexpr, BLOCK_C: tl.constexpr):
    """Offsets ``Tensor[BLOCK_P * BKW, BLOCK_C]`` of the rows' patch row ``q`` (``q = od * KH + oh``),
    every channel."""
    pos = tl.max_contiguous(s0 + ((q // KH) * H + (q % KH)) * W, BKW)
    c = tl.arange(0, BLOCK_C)
    return pos[:, None] * ss + c[None, :] * sc


@triton.jit
def _theta_offsets(q, C, CI, K: tl.constexpr, KW: tl.constexpr, BKW: tl.constexpr,
                   BLOCK_C: tl.constexpr, BLOCK_CI: tl.constexpr):
    """Offsets and mask ``[BKW * BLOCK_C, BLOCK_CI]`` of theta's weights (layout ``[F_int, F_l, K]``)
    for patch row q, row ``j = ow * BLOCK_C + c``: the rows of a ``[BLOCK_P, BKW * BLOCK_C]`` view
    of the x rows."""
    j = tl.arange(0, BKW * BLOCK_C)
    ow = j // BLOCK_C
    c = j % BLOCK_C
    ci = tl.arange(0, BLOCK_CI)
    mask = ((ow < KW) & (c < C))[:, None] & (ci < CI)[None, :]
    return ci[None, :] * (C * K) + (c * K + q * KW + ow)[:, None], mask


@triton.jit
def _linear_src(dst, IN, scale, SAME: tl.constexpr, ALIGN: tl.constexpr, ACC: tl.constexpr):
    """``F.interpolate``'s linear source along one axis for output indices ``dst``: the two input
    indices and the weight of the second (``scale``: input / output size, or (input - 1) /
    (output - 1) with ``align_corners``). ``SAME``: the axis keeps its size, which
    ``F.interpolate`` copies (both indices ``dst``: no neighbour read, not even with weight 0)."""
    if SAME:
        return dst, dst, tl.zeros(dst.shape, ACC)
    d = dst.to(ACC)
    if ALIGN:
        src = d * scale
    else:
        src = tl.maximum((d + 0.5) * scale - 0.5, 0.0)
    i0 = tl.minimum(src.to(tl.int32), IN - 1)
    lam = tl.minimum(tl.maximum(src - i0.to(ACC), 0.0), 1.0)
    return i0, tl.minimum(i0 + 1, IN - 1), lam


@triton.jit
def _alpha_at(ac_ptr, n, d, h, w, mask, DC, HC, WC, sd, sh, sw, WD: tl.constexpr, WH: tl.constexpr, WW: tl.constexpr,
              ALIGN: tl.constexpr, ACC: tl.constexpr):
    """alpha at x's grid coordinates ``(d, h, w)``: alpha_c (``[N, DC, HC, WC]``, contiguous)
    resampled (tri)linearly as ``F.interpolate`` does (1D and 2D: unit leading axes; ``WD``,
    ``WH``, ``WW``: the adjoint's windows, 1 where an axis is not resampled)."""
    d0, d1, ld = _linear_src(d, DC, sd, WD == 1, ALIGN, ACC)
    h0, h1, lh = _linear_src(h, HC, sh, WH == 1, ALIGN, ACC)
    w0, w1, lw = _linear_src(w, WC, sw, WW == 1, ALIGN, ACC)
    base = ac_ptr + n * DC * HC * WC
    r00, r01, r10, r11 = (d0 * HC + h0) * WC, (d0 * HC + h1) * WC, (d1 * HC + h0) * WC, (d1 * HC + h1) * WC
    a00 = (1.0 - lw) * tl.load(base + r00 + w0, mask=mask, other=0.0) + lw * tl.load(base + r00 + w1, mask=mask, other=0.0)
    a01 = (1.0 - lw) * tl.load(base + r01 + w0, mask=mask, other=0.0) + lw * tl.load(base + r01 + w1, mask=mask, other=0.0)
    a10 = (1.0 - lw) * tl.load(base + r10 + w0, mask=mask, other=0.0) + lw * tl.load(base + r10 + w1, mask=mask, other=0.0)
    a11 = (1.0 - lw) * tl.load(base + r11 + w0, mask=mask, other=0.0) + lw * tl.load(base + r11 + w1, mask=mask, other=0.0)
    return (1.0 - ld) * ((1.0 - lh) * a00 + lh * a01) + ld * ((1.0 - lh) * a10 + lh * a11)


@triton.jit
def _adjoint_axis(c, i: tl.constexpr, OUT, IN, scale, WIN: tl.constexpr, ALIGN: tl.constexpr, ACC: tl.constexpr):
    """Candidate ``i`` of the fine indices (``OUT`` of them) whose gradient ``F.interpolate``'s
    backward adds into coarse index ``c`` (of ``IN``) along one axis: the index, its resampling
    weight, and whether it is added at all (its weight may be 0 and still is: at ``lam = 0``,
    and, without ``align_corners``, for the fine indices whose source clamps to 0, which index 1
    takes with weight 0; a NaN gradient there reaches ``c`` as in the reference).

    Those fine indices are the ones whose source index ``i0`` is ``c - 1`` or ``c`` (for ``c = 1``
    also the clamped ones before them): one range, at most ``WIN`` long (``launch._window``); its
    start is computed exactly in integers, the weights with ``_linear_src`` itself. ``WIN == 1``:
    the axis is not resampled."""
    if WIN == 1:
        return c, tl.full(c.shape, 1.0, ACC), c == c
    else:
        if ALIGN:  # i0(f) = floor(f (IN - 1) / (OUT - 1)) >= c - 1
            num = (c - 1) * (OUT - 1)
            den = tl.maximum(IN - 1, 1)
        else:  # i0(f) = floor(((2 f + 1) IN - OUT) / (2 OUT)) >= c - 1
            num = (2 * c - 1) * OUT - IN
            den = 2 * IN
        lo = (tl.maximum(num, 0) + den - 1) // den
        if not ALIGN:  # index 1 starts at 0: the sources that clamp to 0 add into it with weight 0
            lo = tl.where(c == 1, 0, lo)
        f = tl.minimum(lo, OUT - WIN) + i
        i0, i1, lam = _linear_src(f, IN, scale, False, ALIGN, ACC)
        return f, tl.where(i0 == c, 1.0 - lam, 0.0) + tl.where(i1 == c, lam, 0.0), (i0 == c) | (i1 == c)


@triton.jit
def _alpha_adjoint(daf_ptr, n, dc, hc, wc, pmask, D, H, W, DC, HC, WC, sd, sh, sw,
                   WD: tl.constexpr, WH: tl.constexpr, WW: tl.constexpr, ALIGN: tl.constexpr, ACC: tl.constexpr):
    """d alpha_c at coarse coordinates ``(dc, hc, wc)``: the adjoint of ``_alpha_at``, gathered
    from d alpha on x's grid (``[N, D, H, W]``, contiguous) over the fine positions whose
    gradient ``F.interpolate``'s backward adds into each coarse position (``WD x WH x WW``
    candidates; weights, 0 included, times the loaded gradients), in a fixed order."""
    acc = tl.zeros(dc.shape, dtype=ACC)
    base = daf_ptr + n * D * H * W
    for i in tl.static_range(WD):
        fd, wd, md = _adjoint_axis(dc, i, D, DC, sd, WD, ALIGN, ACC)
        for j in tl.static_range(WH):
            fh, wh, mh = _adjoint_axis(hc, j, H, HC, sh, WH, ALIGN, ACC)
            for k in tl.static_range(WW):
                fw, ww, mw = _adjoint_axis(wc, k, W, WC, sw, WW, ALIGN, ACC)
                v = tl.load(base + (fd * H + fh) * W + fw, mask=pmask & md & mh & mw, other=0.0)
                acc += wd * wh * ww * v
    return acc


@triton.jit
def alpha_adjoint_kernel(daf_ptr, dac_ptr, D, H, W, DC, HC, WC, SC, TPS, NT, sd, sh, sw,
                          BLOCK_P: tl.constexpr, WD: tl.constexpr, WH: tl.constexpr, WW: tl.constexpr,
                          ALIGN: tl.constexpr, I64: tl.constexpr, ACC: tl.constexpr):
    """d alpha_c (``[N, Sc]``) from d alpha on x's grid: ``_alpha_adjoint`` per coarse tile."""
    for t in range(tl.program_id(0), NT, tl.num_programs(0)):
        n, p = _coarse_tile(t, TPS, BLOCK_P)
        pmask = p < SC
        dc, hc, wc = _coarse_coords(p, HC, WC, I64)
        dac = _alpha_adjoint(daf_ptr, n, dc, hc, wc, pmask, D, H, W, DC, HC, WC, sd, sh, sw, WD, WH, WW, ALIGN, ACC)
        tl.store(dac_ptr + n * SC + p, dac, mask=pmask)


@triton.jit
def _fine_tile(t, TPS, S, H, W, BLOCK_S: tl.constexpr, I64: tl.constexpr):
    """Tile ``t``'s sample ``n`` (int64), flat positions, their mask and grid coordinates."""
    n = t // TPS
    s = (t - n * TPS) * BLOCK_S + tl.arange(0, BLOCK_S)
    if I64:
        s = s.to(tl.int64)
    smask = s < S
    w = s % W
    r = s // W
    h = r % H
    d = r // H
    return n.to(tl.int64), s, smask, d, h, w


@triton.jit
def _fine_load(ptr, n, s, smask, C, sn, sc, ss, BLOCK_C: tl.constexpr, ACC: tl.constexpr):
    c = tl.arange(0, BLOCK_C)
    m = smask[:, None] & (c < C)[None, :]
    return tl.load(ptr + n * sn + s[:, None] * ss + c[None, :] * sc, mask=m, other=0.0).to(ACC)


@triton.jit
def _w0_tiles(w0_ptr, C, BLOCK_C: tl.constexpr, DOT: tl.constexpr):
    """W0^T (``[c_in, c_out]``) and W0 (``[c_out, c_in]``) as ``[BLOCK_C, BLOCK_C]`` dot operands."""
    c = tl.arange(0, BLOCK_C)
    m = (c < C)[:, None] & (c < C)[None, :]
    w0t = tl.load(w0_ptr + c[None, :] * C + c[:, None], mask=m, other=0.0).to(DOT)
    w0 = tl.load(w0_ptr + c[:, None] * C + c[None, :], mask=m, other=0.0).to(DOT)
    return w0t, w0


# ---------------------------------------------------------------- coarse side


@triton.jit
def _coarse_pre(
    x_ptr, g_ptr, wt_ptr, wp_ptr, bp_ptr, t, TPS, C, CG, CI, H, W, HC, WC, SC, sxn, sxc, sxs, sgn, sgc, sgs,
    KD: tl.constexpr, KH: tl.constexpr, KW: tl.constexpr, BKW: tl.constexpr, BLOCK_P: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_CG: tl.constexpr, BLOCK_CI: tl.constexpr,
    I64: tl.constexpr, PREC: tl.constexpr, ACC: tl.constexpr, DOT: tl.constexpr,
):
    """Coarse tile ``t``: its sample ``n``, positions ``p`` and their mask, and theta(x) + phi(g)
    there, ``Tensor[BLOCK_P, BLOCK_CI]``. Per patch row, the x rows ``[BLOCK_P * BKW, BLOCK_C]``
    are viewed as ``[BLOCK_P, BKW * BLOCK_C]`` for one dot."""
    K: tl.constexpr = KD * KH * KW
    n, p = _coarse_tile(t, TPS, BLOCK_P)
    pmask = p < SC
    d0, h0, w, s0, rmask = _patch_rows(t, TPS, SC, H, W, HC, WC, KD, KH, KW, BKW, BLOCK_P, I64)
    c = tl.arange(0, BLOCK_C)
    cg = tl.arange(0, BLOCK_CG)
    ci = tl.arange(0, BLOCK_CI)
    gt = tl.load(g_ptr + n * sgn + p[:, None] * sgs + cg[None, :] * sgc, mask=pmask[:, None] & (cg < CG)[None, :], other=0.0).to(DOT)
    wp = tl.load(wp_ptr + ci[None, :] * CG + cg[:, None], mask=(cg < CG)[:, None] & (ci < CI)[None, :], other=0.0).to(DOT)
    acc = tl.dot(gt, wp, input_precision=PREC, out_dtype=ACC)
    acc += tl.load(bp_ptr + ci, mask=ci < CI, other=0.0).to(ACC)[None, :]
    xmask = rmask[:, None] & (c < C)[None, :]
    for q in range(KD * KH):
        xq = tl.load(x_ptr + n * sxn + _row_offsets(s0, q, sxc, sxs, H, W, KH, BKW, BLOCK_C), mask=xmask, other=0.0).to(DOT)
        woff, wmask = _theta_offsets(q, C, CI, K, KW, BKW, BLOCK_C, BLOCK_CI)
        wq = tl.load(wt_ptr + woff, mask=wmask, other=0.0).to(DOT)
        acc = tl.dot(tl.reshape(xq, [BLOCK_P, BKW * BLOCK_C]), wq, acc, input_precision=PREC)
    return n, p, pmask, acc


@triton.jit
def coarse_fwd(
    x_ptr, g_ptr, wt_ptr, wp_ptr, bp_ptr, wpsi_ptr, bpsi_ptr, ac_ptr,
    C, CG, CI, H, W, HC, WC, SC, TPS, NT, sxn, sxc, sxs, sgn, sgc, sgs,
    KD: tl.constexpr, KH: tl.constexpr, KW: tl.constexpr, BKW: tl.constexpr, BLOCK_P: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_CG: tl.constexpr, BLOCK_CI: tl.constexpr, SOFTPLUS: tl.constexpr,
    I64: tl.constexpr, PREC: tl.constexpr, ACC: tl.constexpr, DOT: tl.constexpr,
):
    ci = tl.arange(0, BLOCK_CI)
    wpsi = tl.load(wpsi_ptr + ci, mask=ci < CI, other=0.0).to(ACC)
    bpsi = tl.load(bpsi_ptr).to(ACC)
    for t in range(tl.program_id(0), NT, tl.num_programs(0)):
        n, p, pmask, pre = _coarse_pre(
            x_ptr, g_ptr, wt_ptr, wp_ptr, bp_ptr, t, TPS, C, CG, CI, H, W, HC, WC, SC, sxn, sxc, sxs, sgn, sgc, sgs,
            KD, KH, KW, BKW, BLOCK_P, BLOCK_C, BLOCK_CG, BLOCK_CI, I64, PREC, ACC, DOT,
        )
        q = tl.sum(tl.where((ci < CI)[None, :], _sigma1(pre, SOFTPLUS) * wpsi[None, :], 0.0), axis=1) + bpsi
        tl.store(ac_ptr + n * SC + p, 1.0 / (1.0 + tl.exp(-q)), mask=pmask)


@triton.jit
def _norm_coefs(
    wb_ptr, gamma_ptr, mean_ptr, var_ptr, sums_ptr, eps, inv_n, C, BLOCK_C: tl.constexpr,
    HAS_NORM: tl.constexpr, BATCH_STATS: tl.constexpr, ACC: tl.constexpr,
):
    """Per channel, for the backward through W's norm: r = 1/sqrt(var + eps) and h = (b - mean) r
    (so zhat = alpha u r + h), and A, B, E of dz = A dout + B + E zhat (B = E = 0 without batch
    statistics; A = 1, the rest 0, without a norm). ``sums``: (sum dout, sum dout zhat) per channel."""
    c = tl.arange(0, BLOCK_C)
    cmask = c < C
    zero = tl.zeros([BLOCK_C], dtype=ACC)
    if HAS_NORM:
        r = 1.0 / tl.sqrt(tl.load(var_ptr + c, mask=cmask, other=1.0).to(ACC) + eps)
        h = (tl.load(wb_ptr + c, mask=cmask, other=0.0).to(ACC) - tl.load(mean_ptr + c, mask=cmask, other=0.0).to(ACC)) * r
        A = tl.load(gamma_ptr + c, mask=cmask, other=0.0).to(ACC) * r
        if BATCH_STATS:
            B = -A * tl.load(sums_ptr + c, mask=cmask, other=0.0).to(ACC) * inv_n
            E = -A * tl.load(sums_ptr + C + c, mask=cmask, other=0.0).to(ACC) * inv_n
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
def _dz(do, a, u, r, h, A, B, E, BATCH_STATS: tl.constexpr):
    """dz = A dout + B + E zhat (zhat = alpha u r + h), the gradient at W's conv output, for
    rows of positions. Without batch statistics B = E = 0 and zhat is left out: a NaN in alpha or
    x then stays out of dz, as out of the reference's."""
    if BATCH_STATS:
        return A[None, :] * do + B[None, :] + E[None, :] * (a[:, None] * u * r[None, :] + h[None, :])
    else:
        return A[None, :] * do


@triton.jit
def coarse_bwd(
    x_ptr, g_ptr, wt_ptr, wp_ptr, bp_ptr, wpsi_ptr, ac_ptr, dac_ptr, df_ptr, dg_ptr, part_ptr,
    C, CG, CI, H, W, HC, WC, SC, TPS, NT, sxn, sxc, sxs, sgn, sgc, sgs, sdgn, sdgc, sdgs,
    KD: tl.constexpr, KH: tl.constexpr, KW: tl.constexpr, BKW: tl.constexpr, BLOCK_P: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_CG: tl.constexpr, BLOCK_CI: tl.constexpr,
    SOFTPLUS: tl.constexpr, I64: tl.constexpr, PREC: tl.constexpr, ACC: tl.constexpr, DOT: tl.constexpr,
):
    """Per coarse tile, from d alpha_c: df = d(theta x + phi g) (written, ``[N, Sc, F_int]`` in
    ``DOT``) and dg. This program's
    partial row of ``part`` (``[dphi (CI CG) | dbp (CI) | dpsi (CI) | db_psi]``)."""
    pid = tl.program_id(0)
    row = part_ptr + pid.to(tl.int64) * (CI * CG + 2 * CI + 1)
    o_bp = CI * CG
    o_psi = o_bp + CI
    o_bpsi = o_psi + CI
    cg = tl.arange(0, BLOCK_CG)
    ci = tl.arange(0, BLOCK_CI)
    cgmask, cimask = cg < CG, ci < CI
    wpsi = tl.load(wpsi_ptr + ci, mask=cimask, other=0.0).to(ACC)
    phi_mask = cgmask[:, None] & cimask[None, :]
    acc_bp = tl.zeros([BLOCK_CI], dtype=ACC)
    acc_psi = tl.zeros([BLOCK_CI], dtype=ACC)
    acc_bpsi = tl.zeros([BLOCK_P], dtype=ACC)
    acc_phi = tl.zeros([BLOCK_CG, BLOCK_CI], dtype=ACC)
    for t in range(pid, NT, tl.num_programs(0)):
        n, p, pmask, pre = _coarse_pre(
            x_ptr, g_ptr, wt_ptr, wp_ptr, bp_ptr, t, TPS, C, CG, CI, H, W, HC, WC, SC, sxn, sxc, sxs, sgn, sgc, sgs,
            KD, KH, KW, BKW, BLOCK_P, BLOCK_C, BLOCK_CG, BLOCK_CI, I64, PREC, ACC, DOT,
        )
        a = tl.load(ac_ptr + n * SC + p, mask=pmask, other=0.0)
        dac = tl.load(dac_ptr + n * SC + p, mask=pmask, other=0.0)
        dq = tl.where(pmask, dac * a * (1.0 - a), 0.0)  # sigmoid'
        acc_bpsi += dq
        acc_psi += tl.sum(dq[:, None] * _sigma1(pre, SOFTPLUS), axis=0)
        df = tl.where(pmask[:, None] & cimask[None, :], _sigma1_backward(pre, dq[:, None] * wpsi[None, :], SOFTPLUS), 0.0)
        acc_bp += tl.sum(df, axis=0)
        dfd = df.to(DOT)
        tl.store(df_ptr + (n * SC + p)[:, None] * CI + ci[None, :], dfd, mask=pmask[:, None] & cimask[None, :])
        # the phi path: dg = df phi, dphi += g^T df
        wpt = tl.load(wp_ptr + ci[:, None] * CG + cg[None, :], mask=cimask[:, None] & cgmask[None, :], other=0.0).to(DOT)
        gmask = pmask[:, None] & cgmask[None, :]
        tl.store(dg_ptr + n * sdgn + p[:, None] * sdgs + cg[None, :] * sdgc,
                 tl.dot(dfd, wpt, input_precision=PREC, out_dtype=ACC).to(dg_ptr.dtype.element_ty), mask=gmask)
        gt = tl.load(g_ptr + n * sgn + p[:, None] * sgs + cg[None, :] * sgc, mask=gmask, other=0.0).to(DOT)
        acc_phi = tl.dot(tl.trans(gt), dfd, acc_phi, input_precision=PREC)
    tl.store(row + ci[None, :] * CG + cg[:, None], acc_phi, mask=phi_mask)
    tl.store(row + o_bp + ci, acc_bp, mask=cimask)
    tl.store(row + o_psi + ci, acc_psi, mask=cimask)
    tl.store(row + o_bpsi, tl.sum(acc_bpsi, axis=0))


@triton.jit
def patch_bwd(
    x_ptr, do_ptr, df_ptr, wt_ptr, w0_ptr, ac_ptr, wb_ptr, gamma_ptr, mean_ptr, var_ptr, sums_ptr, eps, inv_n,
    dx_ptr, part_ptr, C, CI, H, W, DC, HC, WC, SC, TPS, NT, sd, sh, sw, sxn, sxc, sxs, son, soc, sos, sdn, sdc, sds,
    KD: tl.constexpr, KH: tl.constexpr, KW: tl.constexpr, BKW: tl.constexpr, BLOCK_P: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_CI: tl.constexpr, HAS_W: tl.constexpr, HAS_NORM: tl.constexpr,
    BATCH_STATS: tl.constexpr, WD: tl.constexpr, WH: tl.constexpr, WW: tl.constexpr, ALIGN: tl.constexpr,
    I64: tl.constexpr, PREC: tl.constexpr, ACC: tl.constexpr, DOT: tl.constexpr,
):
    """Per patch row ``q`` (outer loop) and coarse tile: dtheta_q += x_q^T df, summed over this
    program's tiles in registers and written once into its partial row of ``part`` (theta's
    layout ``[CI, C, K]``), and the whole dx at the row's fine positions, df theta_q^T +
    alpha W0^T dz (the theta path and the recomputed W path), written once."""
    K: tl.constexpr = KD * KH * KW
    pid = tl.program_id(0)
    row = part_ptr + pid.to(tl.int64) * (CI * C * K)
    c = tl.arange(0, BLOCK_C)
    ci = tl.arange(0, BLOCK_CI)
    cmask = c < C
    r, h, A, B, E = _norm_coefs(wb_ptr, gamma_ptr, mean_ptr, var_ptr, sums_ptr, eps, inv_n, C, BLOCK_C, HAS_NORM, BATCH_STATS, ACC)
    for q in range(KD * KH):
        woff, wmask = _theta_offsets(q, C, CI, K, KW, BKW, BLOCK_C, BLOCK_CI)
        acc = tl.zeros([BKW * BLOCK_C, BLOCK_CI], dtype=ACC)
        for t in range(pid, NT, tl.num_programs(0)):
            n, p = _coarse_tile(t, TPS, BLOCK_P)
            d0, h0, w, s0, rmask = _patch_rows(t, TPS, SC, H, W, HC, WC, KD, KH, KW, BKW, BLOCK_P, I64)
            dfd = tl.load(df_ptr + (n * SC + p)[:, None] * CI + ci[None, :], mask=(p < SC)[:, None] & (ci < CI)[None, :], other=0.0)
            xmask = rmask[:, None] & cmask[None, :]
            xq = tl.load(x_ptr + n * sxn + _row_offsets(s0, q, sxc, sxs, H, W, KH, BKW, BLOCK_C), mask=xmask, other=0.0)
            acc = tl.dot(tl.trans(tl.reshape(xq.to(DOT), [BLOCK_P, BKW * BLOCK_C])), dfd, acc, input_precision=PREC)
            wq = tl.load(wt_ptr + woff, mask=wmask, other=0.0).to(DOT)
            dxq = tl.reshape(tl.dot(dfd, tl.trans(wq), input_precision=PREC, out_dtype=ACC), [BLOCK_P * BKW, BLOCK_C])
            af = _alpha_at(ac_ptr, n, d0 + q // KH, h0 + q % KH, w, rmask, DC, HC, WC, sd, sh, sw, WD, WH, WW, ALIGN, ACC)
            do = tl.load(do_ptr + n * son + _row_offsets(s0, q, soc, sos, H, W, KH, BKW, BLOCK_C), mask=xmask, other=0.0).to(ACC)
            if HAS_W:
                w0t, w0 = _w0_tiles(w0_ptr, C, BLOCK_C, DOT)
                u = tl.dot(xq.to(DOT), w0t, input_precision=PREC, out_dtype=ACC)
            else:
                u = xq.to(ACC)
            dz = _dz(do, af, u, r, h, A, B, E, BATCH_STATS)
            adz = af[:, None] * dz
            if HAS_W:
                dxq += tl.dot(adz.to(DOT), w0, input_precision=PREC, out_dtype=ACC)
            else:
                dxq += adz
            tl.store(dx_ptr + n * sdn + _row_offsets(s0, q, sdc, sds, H, W, KH, BKW, BLOCK_C), dxq.to(dx_ptr.dtype.element_ty), mask=xmask)
        tl.store(row + woff, acc, mask=wmask)


# ---------------------------------------------------------------- fine side


@triton.jit
def _fine_u(x_ptr, ac_ptr, w0_ptr, t, TPS, C, S, H, W, DC, HC, WC, sd, sh, sw, sxn, sxc, sxs,
            BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr, HAS_W: tl.constexpr,
            WD: tl.constexpr, WH: tl.constexpr, WW: tl.constexpr, ALIGN: tl.constexpr,
            I64: tl.constexpr, PREC: tl.constexpr, ACC: tl.constexpr, DOT: tl.constexpr):
    """Fine tile ``t``: ``_fine_tile``'s values, then u = x W0^T (x itself without W),
    ``Tensor[BLOCK_S, BLOCK_C]`` in ``ACC``, and alpha there, ``Tensor[BLOCK_S]``."""
    n, s, smask, d, h, w = _fine_tile(t, TPS, S, H, W, BLOCK_S, I64)
    xt = _fine_load(x_ptr, n, s, smask, C, sxn, sxc, sxs, BLOCK_C, ACC)
    if HAS_W:
        c = tl.arange(0, BLOCK_C)
        w0t = tl.load(w0_ptr + c[None, :] * C + c[:, None], mask=(c < C)[:, None] & (c < C)[None, :], other=0.0).to(DOT)
        u = tl.dot(xt.to(DOT), w0t, input_precision=PREC, out_dtype=ACC)
    else:
        u = xt
    return n, s, smask, u, _alpha_at(ac_ptr, n, d, h, w, smask, DC, HC, WC, sd, sh, sw, WD, WH, WW, ALIGN, ACC)


@triton.jit
def fine_stats(
    x_ptr, ac_ptr, w0_ptr, part_ptr, C, S, H, W, DC, HC, WC, sd, sh, sw, TPS, NT, sxn, sxc, sxs,
    BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr, WD: tl.constexpr, WH: tl.constexpr, WW: tl.constexpr,
    ALIGN: tl.constexpr, I64: tl.constexpr, PREC: tl.constexpr, ACC: tl.constexpr, DOT: tl.constexpr,
):
    """This program's (mean, M2, count) of z = alpha * u over its tiles (Chan's merge per tile),
    as one row ``[mean (C) | M2 (C) | count]`` of ``part``."""
    pid = tl.program_id(0)
    c = tl.arange(0, BLOCK_C)
    cmask = c < C
    cnt = tl.sum(tl.zeros([BLOCK_S], dtype=ACC), axis=0)
    mean = tl.zeros([BLOCK_C], dtype=ACC)
    m2 = tl.zeros([BLOCK_C], dtype=ACC)
    for t in range(pid, NT, tl.num_programs(0)):
        n, s, smask, u, a = _fine_u(x_ptr, ac_ptr, w0_ptr, t, TPS, C, S, H, W, DC, HC, WC, sd, sh, sw, sxn, sxc, sxs,
                                    BLOCK_S, BLOCK_C, True, WD, WH, WW, ALIGN, I64, PREC, ACC, DOT)
        z = a[:, None] * u
        nt = tl.sum(smask.to(ACC), axis=0)
        mt = tl.sum(z, axis=0) / nt
        dev = tl.where(smask[:, None], z - mt[None, :], 0.0)
        tot = cnt + nt
        delta = mt - mean
        m2 += tl.sum(dev * dev, axis=0) + delta * delta * (cnt * nt / tot)
        mean = (mean * cnt + mt * nt) / tot  # weighted, not mean + delta nt / tot: an infinite z keeps it infinite
        cnt = tot
    row = part_ptr + pid * (2 * C + 1)
    tl.store(row + c, mean, mask=cmask)
    tl.store(row + C + c, m2, mask=cmask)
    tl.store(row + 2 * C, cnt)


@triton.jit
def stats_combine(part_ptr, wb_ptr, mean_ptr, var_ptr, R, C, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    """Chan's combination of ``fine_stats``' rows in float64, in row order, for BLOCK_C
    channels: the mean of alpha * u + b (b: W's bias) and the biased variance."""
    c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = c < C
    n = tl.zeros([BLOCK_C], dtype=tl.float64)
    total = tl.zeros([BLOCK_C], dtype=tl.float64)
    for r0 in range(0, R, BLOCK_R):
        rr = r0 + tl.arange(0, BLOCK_R)
        rm = (rr < R)[:, None] & cmask[None, :]
        cnt = tl.load(part_ptr + rr[:, None] * (2 * C + 1) + 2 * C + c[None, :] * 0, mask=rm, other=0.0).to(tl.float64)
        mb = tl.load(part_ptr + rr[:, None] * (2 * C + 1) + c[None, :], mask=rm, other=0.0).to(tl.float64)
        n += tl.sum(cnt, axis=0)
        total += tl.sum(cnt * mb, axis=0)
    n = tl.maximum(n, 1.0)  # channels past C: no rows
    mean = total / n
    m2 = tl.zeros([BLOCK_C], dtype=tl.float64)
    for r0 in range(0, R, BLOCK_R):
        rr = r0 + tl.arange(0, BLOCK_R)
        rm = (rr < R)[:, None] & cmask[None, :]
        cnt = tl.load(part_ptr + rr[:, None] * (2 * C + 1) + 2 * C + c[None, :] * 0, mask=rm, other=0.0).to(tl.float64)
        mb = tl.load(part_ptr + rr[:, None] * (2 * C + 1) + c[None, :], mask=rm, other=0.0).to(tl.float64)
        m2b = tl.load(part_ptr + rr[:, None] * (2 * C + 1) + C + c[None, :], mask=rm, other=0.0).to(tl.float64)
        dev = mb - mean[None, :]
        m2 += tl.sum(m2b + cnt * dev * dev, axis=0)
    wb = tl.load(wb_ptr + c, mask=cmask, other=0.0).to(tl.float64)
    tl.store(mean_ptr + c, (mean + wb).to(mean_ptr.dtype.element_ty), mask=cmask)
    tl.store(var_ptr + c, (m2 / n).to(var_ptr.dtype.element_ty), mask=cmask)


@triton.jit
def _column_sums(part_ptr, out_ptr, j0, R, T, BLOCK_R: tl.constexpr, BLOCK_T: tl.constexpr):
    j = j0 + tl.arange(0, BLOCK_T)
    jmask = j < T
    acc = tl.zeros([BLOCK_T], dtype=tl.float64)
    for r0 in range(0, R, BLOCK_R):
        rr = r0 + tl.arange(0, BLOCK_R)
        v = tl.load(part_ptr + rr[:, None].to(tl.int64) * T + j[None, :], mask=(rr < R)[:, None] & jmask[None, :], other=0.0)
        acc += tl.sum(v.to(tl.float64), axis=0)
    tl.store(out_ptr + j, acc.to(out_ptr.dtype.element_ty), mask=jmask)


@triton.jit
def sum_rows(p1_ptr, p2_ptr, p3_ptr, out_ptr, R1, T1, R2, T2, R3, T3, BLOCK_R: tl.constexpr, BLOCK_T: tl.constexpr):
    """``out = [p1.sum(0) | p2.sum(0) | p3.sum(0)]`` (``pi: [Ri, Ti]``, a ``Ti`` may be 0), in
    float64, rows in order: per-program partial rows reduced the same way every run."""
    pid = tl.program_id(0)
    nb1 = tl.cdiv(T1, BLOCK_T)
    nb2 = tl.cdiv(T2, BLOCK_T)
    if pid < nb1:
        _column_sums(p1_ptr, out_ptr, pid * BLOCK_T, R1, T1, BLOCK_R, BLOCK_T)
    elif pid < nb1 + nb2:
        _column_sums(p2_ptr, out_ptr + T1, (pid - nb1) * BLOCK_T, R2, T2, BLOCK_R, BLOCK_T)
    else:
        _column_sums(p3_ptr, out_ptr + T1 + T2, (pid - nb1 - nb2) * BLOCK_T, R3, T3, BLOCK_R, BLOCK_T)


@triton.jit
def fine_out(
    x_ptr, ac_ptr, w0_ptr, wb_ptr, gamma_ptr, beta_ptr, mean_ptr, var_ptr, eps, out_ptr, alpha_ptr,
    C, S, H, W, DC, HC, WC, sd, sh, sw, TPS, NT, sxn, sxc, sxs, son, soc, sos,
    BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr, HAS_W: tl.constexpr, HAS_NORM: tl.constexpr,
    WD: tl.constexpr, WH: tl.constexpr, WW: tl.constexpr, ALIGN: tl.constexpr, I64: tl.constexpr,
    PREC: tl.constexpr, ACC: tl.constexpr, DOT: tl.constexpr,
):
    """out = alpha * u * scale + shift, W's bias and norm folded per channel here:
    scale = gamma / sqrt(var + eps), shift = (b - mean) * scale + beta (mean: of alpha u + b);
    and alpha on x's grid, an output too."""
    c = tl.arange(0, BLOCK_C)
    cmask = c < C
    scale = tl.zeros([BLOCK_C], dtype=ACC) + 1.0
    shift = tl.zeros([BLOCK_C], dtype=ACC)
    if HAS_W:
        shift = tl.load(wb_ptr + c, mask=cmask, other=0.0).to(ACC)
        if HAS_NORM:
            var = tl.load(var_ptr + c, mask=cmask, other=1.0).to(ACC)
            scale = tl.load(gamma_ptr + c, mask=cmask, other=0.0).to(ACC) / tl.sqrt(var + eps)
            shift = (shift - tl.load(mean_ptr + c, mask=cmask, other=0.0).to(ACC)) * scale
            shift += tl.load(beta_ptr + c, mask=cmask, other=0.0).to(ACC)
    for t in range(tl.program_id(0), NT, tl.num_programs(0)):
        n, s, smask, u, a = _fine_u(x_ptr, ac_ptr, w0_ptr, t, TPS, C, S, H, W, DC, HC, WC, sd, sh, sw, sxn, sxc, sxs,
                                    BLOCK_S, BLOCK_C, HAS_W, WD, WH, WW, ALIGN, I64, PREC, ACC, DOT)
        tl.store(alpha_ptr + n * S + s, a.to(alpha_ptr.dtype.element_ty), mask=smask)
        out = a[:, None] * u * scale[None, :] + shift[None, :]
        tl.store(out_ptr + n * son + s[:, None] * sos + c[None, :] * soc, out.to(out_ptr.dtype.element_ty),
                 mask=smask[:, None] & cmask[None, :])


@triton.jit
def fine_bwd_sums(
    x_ptr, ac_ptr, w0_ptr, do_ptr, wb_ptr, mean_ptr, var_ptr, eps, part_ptr,
    C, S, H, W, DC, HC, WC, sd, sh, sw, TPS, NT, sxn, sxc, sxs, son, soc, sos,
    BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr, WD: tl.constexpr, WH: tl.constexpr, WW: tl.constexpr,
    ALIGN: tl.constexpr, I64: tl.constexpr, PREC: tl.constexpr, ACC: tl.constexpr, DOT: tl.constexpr,
):
    """This program's sums of dout and dout * zhat (zhat = alpha * u * r + h) over its tiles,
    as one row ``[sum dout (C) | sum dout zhat (C)]`` of ``part``."""
    pid = tl.program_id(0)
    c = tl.arange(0, BLOCK_C)
    cmask = c < C
    r, h, _, _, _ = _norm_coefs(wb_ptr, var_ptr, mean_ptr, var_ptr, var_ptr, eps, 0.0, C, BLOCK_C, True, False, ACC)
    s_do = tl.zeros([BLOCK_C], dtype=ACC)
    s_doz = tl.zeros([BLOCK_C], dtype=ACC)
    for t in range(pid, NT, tl.num_programs(0)):
        n, s, smask, u, a = _fine_u(x_ptr, ac_ptr, w0_ptr, t, TPS, C, S, H, W, DC, HC, WC, sd, sh, sw, sxn, sxc, sxs,
                                    BLOCK_S, BLOCK_C, True, WD, WH, WW, ALIGN, I64, PREC, ACC, DOT)
        do = _fine_load(do_ptr, n, s, smask, C, son, soc, sos, BLOCK_C, ACC)
        zhat = a[:, None] * u * r[None, :] + h[None, :]
        s_do += tl.sum(do, axis=0)
        s_doz += tl.sum(tl.where(smask[:, None], do * zhat, 0.0), axis=0)
    tl.store(part_ptr + pid * (2 * C) + c, s_do, mask=cmask)
    tl.store(part_ptr + pid * (2 * C) + C + c, s_doz, mask=cmask)


@triton.jit
def fine_bwd(
    x_ptr, ac_ptr, w0_ptr, do_ptr, dalpha_ptr, wb_ptr, gamma_ptr, mean_ptr, var_ptr, sums_ptr, eps, inv_n,
    dx_ptr, daf_ptr, part_ptr,
    C, S, H, W, DC, HC, WC, sd, sh, sw, DP, HP, WP, TPS, NT, sxn, sxc, sxs, son, soc, sos, sdn, sdc, sds,
    BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr, HAS_W: tl.constexpr, HAS_NORM: tl.constexpr,
    BATCH_STATS: tl.constexpr, HAS_DALPHA: tl.constexpr, HAS_REST: tl.constexpr,
    WD: tl.constexpr, WH: tl.constexpr, WW: tl.constexpr, ALIGN: tl.constexpr,
    I64: tl.constexpr, PREC: tl.constexpr, ACC: tl.constexpr, DOT: tl.constexpr,
):
    """dz = A dout + B + E zhat (see ``_norm_coefs``); d alpha = sum_c dz u (+ the alpha output's
    gradient) on x's grid; this program's partials of dW0 = dz^T (alpha x) and db = sum dz
    (its row of ``part``: ``[dW0 (C C) | db (C)]``; db is 0 under batch statistics, where it
    vanishes); and, with ``HAS_REST``, dx = alpha W0^T dz at the positions
    outside every subsample patch (``d >= DP`` or ``h >= HP`` or ``w >= WP``)."""
    pid = tl.program_id(0)
    row = part_ptr + pid.to(tl.int64) * (C * C + C)
    c = tl.arange(0, BLOCK_C)
    cmask = c < C
    wmask = cmask[:, None] & cmask[None, :]
    r, h, A, B, E = _norm_coefs(wb_ptr, gamma_ptr, mean_ptr, var_ptr, sums_ptr, eps, inv_n, C, BLOCK_C, HAS_NORM, BATCH_STATS, ACC)
    if HAS_W:
        w0t, w0 = _w0_tiles(w0_ptr, C, BLOCK_C, DOT)
    acc_db = tl.zeros([BLOCK_C], dtype=ACC)
    acc_w = tl.zeros([BLOCK_C, BLOCK_C], dtype=ACC)
    for t in range(pid, NT, tl.num_programs(0)):
        n, s, smask, d, hh, w = _fine_tile(t, TPS, S, H, W, BLOCK_S, I64)
        m2 = smask[:, None] & cmask[None, :]
        xt = _fine_load(x_ptr, n, s, smask, C, sxn, sxc, sxs, BLOCK_C, ACC)
        if HAS_W:
            u = tl.dot(xt.to(DOT), w0t, input_precision=PREC, out_dtype=ACC)
        else:
            u = xt
        a = _alpha_at(ac_ptr, n, d, hh, w, smask, DC, HC, WC, sd, sh, sw, WD, WH, WW, ALIGN, ACC)
        do = _fine_load(do_ptr, n, s, smask, C, son, soc, sos, BLOCK_C, ACC)
        dz = _dz(do, a, u, r, h, A, B, E, BATCH_STATS)
        dz = tl.where(m2, dz, 0.0)
        da = tl.sum(dz * u, axis=1)
        if HAS_DALPHA:
            da += tl.load(dalpha_ptr + n * S + s, mask=smask, other=0.0).to(ACC)
        tl.store(daf_ptr + n * S + s, da, mask=smask)
        adz = a[:, None] * dz
        if HAS_W:
            acc_w = tl.dot(tl.trans(dz.to(DOT)), (a[:, None] * xt).to(DOT), acc_w, input_precision=PREC)
            acc_db += tl.sum(dz, axis=0)
        if HAS_REST:
            rest = smask & ((d >= DP) | (hh >= HP) | (w >= WP))
            if HAS_W:
                dxt = tl.dot(adz.to(DOT), w0, input_precision=PREC, out_dtype=ACC)
            else:
                dxt = adz
            tl.store(dx_ptr + n * sdn + s[:, None] * sds + c[None, :] * sdc, dxt.to(dx_ptr.dtype.element_ty),
                     mask=rest[:, None] & cmask[None, :])
    if HAS_W:
        if BATCH_STATS:
            acc_db = acc_db * 0.0
        tl.store(row + c[:, None] * C + c[None, :], acc_w, mask=wmask)
        tl.store(row + C * C + c, acc_db, mask=cmask)
