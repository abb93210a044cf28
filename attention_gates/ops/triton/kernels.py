"""Triton kernels of the fused grid attention gate.

Tensors are seen as ``x: [N, C, S]`` with one stride per axis (contiguous and channels-last
layouts both qualify), spatial positions flattened; 1D and 2D inputs are 3D with unit leading
sizes. Everything is computed in float32 (``ACC``; float64 for float64 inputs) whatever the storage dtype.

Coarse side (theta's grid ``Sc = S // k``), one program per ``BLOCK_P`` coarse positions:
    ``_coarse_fwd``   alpha_c = sigmoid(psi . sigma1(theta(x) + phi(g)) + b_psi)
    ``_coarse_bwd``   gradients of x (added to dx), g, theta, phi, psi from d alpha_c
Fine side (x's grid), one program per ``BLOCK_S`` positions; ``u = W0 x`` (W0: W's conv without bias):
    ``_fine_stats``   per-block mean and M2 of ``alpha * u`` (batch-norm statistics)
    ``_fine_out``     out = alpha * (x @ W0s) + t          (W0s, t: conv and norm folded)
    ``_fine_bwd_sums`` per-block sums of dout and dout * zhat (norm gradients)
    ``_fine_bwd``     dz, d alpha (fine), dx from the W path, dW0 and db (atomics)
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
def _coarse_pre(
    x_ptr, g_ptr, wt_ptr, wp_ptr, bp_ptr, n, p, pmask, c, cmask, cg, cgmask, ci, cimask,
    C, CG, CI, H, W, HC, WC, sxn, sxc, sxs, sgn, sgc, sgs,
    KD: tl.constexpr, KH: tl.constexpr, KW: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_CI: tl.constexpr,
    PREC: tl.constexpr, ACC: tl.constexpr,
):
    """theta(x) + phi(g) on BLOCK_P coarse positions: Tensor[BLOCK_P, BLOCK_CI], and the g tile."""
    wc = p % WC
    hc = (p // WC) % HC
    dc = p // (WC * HC)
    K: tl.constexpr = KD * KH * KW
    acc = tl.zeros([BLOCK_P, BLOCK_CI], dtype=ACC)
    xmask = pmask[:, None] & cmask[None, :]
    wmask = cmask[:, None] & cimask[None, :]
    for o in tl.static_range(K):
        s = ((dc * KD + o // (KH * KW)) * H + (hc * KH + (o // KW) % KH)) * W + (wc * KW + o % KW)
        xo = tl.load(x_ptr + n * sxn + s[:, None] * sxs + c[None, :] * sxc, mask=xmask, other=0.0).to(ACC)
        wo = tl.load(wt_ptr + o * C * CI + c[:, None] * CI + ci[None, :], mask=wmask, other=0.0)
        acc += tl.dot(xo, wo, input_precision=PREC)
    gt = tl.load(g_ptr + n * sgn + p[:, None] * sgs + cg[None, :] * sgc, mask=pmask[:, None] & cgmask[None, :], other=0.0).to(ACC)
    wp = tl.load(wp_ptr + cg[:, None] * CI + ci[None, :], mask=cgmask[:, None] & cimask[None, :], other=0.0)
    bp = tl.load(bp_ptr + ci, mask=cimask, other=0.0)
    acc += tl.dot(gt, wp, input_precision=PREC) + bp[None, :]
    return acc, gt


@triton.jit
def _coarse_fwd(
    x_ptr, g_ptr, wt_ptr, wp_ptr, bp_ptr, wpsi_ptr, bpsi_ptr, ac_ptr,
    C, CG, CI, H, W, HC, WC, SC, sxn, sxc, sxs, sgn, sgc, sgs,
    KD: tl.constexpr, KH: tl.constexpr, KW: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
    BLOCK_CG: tl.constexpr, BLOCK_CI: tl.constexpr, SOFTPLUS: tl.constexpr, PREC: tl.constexpr, ACC: tl.constexpr,
):
    n = tl.program_id(1).to(tl.int64)
    p = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)
    pmask = p < SC
    c = tl.arange(0, BLOCK_C)
    cg = tl.arange(0, BLOCK_CG)
    ci = tl.arange(0, BLOCK_CI)
    cimask = ci < CI
    pre, gt = _coarse_pre(
        x_ptr, g_ptr, wt_ptr, wp_ptr, bp_ptr, n, p, pmask, c, c < C, cg, cg < CG, ci, cimask,
        C, CG, CI, H, W, HC, WC, sxn, sxc, sxs, sgn, sgc, sgs, KD, KH, KW, BLOCK_P, BLOCK_CI, PREC, ACC,
    )
    f = _sigma1(pre, SOFTPLUS)
    wpsi = tl.load(wpsi_ptr + ci, mask=cimask, other=0.0)
    q = tl.sum(f * wpsi[None, :], axis=1) + tl.load(bpsi_ptr)
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
    n = tl.program_id(1).to(tl.int64)
    p = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)
    pmask = p < SC
    c = tl.arange(0, BLOCK_C)
    cmask = c < C
    cg = tl.arange(0, BLOCK_CG)
    cgmask = cg < CG
    ci = tl.arange(0, BLOCK_CI)
    cimask = ci < CI
    pre, gt = _coarse_pre(
        x_ptr, g_ptr, wt_ptr, wp_ptr, bp_ptr, n, p, pmask, c, cmask, cg, cgmask, ci, cimask,
        C, CG, CI, H, W, HC, WC, sxn, sxc, sxs, sgn, sgc, sgs, KD, KH, KW, BLOCK_P, BLOCK_CI, PREC, ACC,
    )
    f = _sigma1(pre, SOFTPLUS)
    a = tl.load(ac_ptr + n * SC + p, mask=pmask, other=0.0)
    dq = tl.load(dac_ptr + n * SC + p, mask=pmask, other=0.0) * a * (1.0 - a)  # sigmoid'
    wpsi = tl.load(wpsi_ptr + ci, mask=cimask, other=0.0)
    tl.atomic_add(dwpsi_ptr + ci, tl.sum(dq[:, None] * f, axis=0), mask=cimask)
    tl.atomic_add(dbpsi_ptr, tl.sum(dq, axis=0))
    df = dq[:, None] * wpsi[None, :] * _sigma1_grad(pre, SOFTPLUS)  # d(theta x + phi g)
    df = tl.where(pmask[:, None], df, 0.0)
    tl.atomic_add(dbp_ptr + ci, tl.sum(df, axis=0), mask=cimask)
    tl.atomic_add(
        dwp_ptr + cg[:, None] * CI + ci[None, :], tl.dot(tl.trans(gt), df, input_precision=PREC),
        mask=cgmask[:, None] & cimask[None, :],
    )
    wpt = tl.load(wp_ptr + cg[None, :] * CI + ci[:, None], mask=cimask[:, None] & cgmask[None, :], other=0.0)
    tl.store(
        dg_ptr + n * sdgn + p[:, None] * sdgs + cg[None, :] * sdgc,
        tl.dot(df, wpt, input_precision=PREC).to(dg_ptr.dtype.element_ty),
        mask=pmask[:, None] & cgmask[None, :],
    )
    wc = p % WC
    hc = (p // WC) % HC
    dc = p // (WC * HC)
    K: tl.constexpr = KD * KH * KW
    xmask = pmask[:, None] & cmask[None, :]
    for o in tl.static_range(K):
        s = ((dc * KD + o // (KH * KW)) * H + (hc * KH + (o // KW) % KH)) * W + (wc * KW + o % KW)
        xo = tl.load(x_ptr + n * sxn + s[:, None] * sxs + c[None, :] * sxc, mask=xmask, other=0.0).to(ACC)
        tl.atomic_add(
            dwt_ptr + o * C * CI + c[:, None] * CI + ci[None, :], tl.dot(tl.trans(xo), df, input_precision=PREC),
            mask=cmask[:, None] & cimask[None, :],
        )
        wot = tl.load(wt_ptr + o * C * CI + c[None, :] * CI + ci[:, None], mask=cimask[:, None] & cmask[None, :], other=0.0)
        dptr = dx_ptr + n * sdn + s[:, None] * sds + c[None, :] * sdc
        dxo = tl.load(dptr, mask=xmask, other=0.0) + tl.dot(df, wot, input_precision=PREC)
        tl.store(dptr, dxo, mask=xmask)


@triton.jit
def _fine_tile(
    x_ptr, af_ptr, w0_ptr, C, S, sxn, sxc, sxs,
    BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr, HAS_W: tl.constexpr, PREC: tl.constexpr, ACC: tl.constexpr,
):
    """This program's block of x's grid: batch index, positions, channels, their masks, the x tile
    Tensor[BLOCK_S, BLOCK_C], u = x @ W0^T (x itself without W) and alpha Tensor[BLOCK_S]."""
    n = tl.program_id(1).to(tl.int64)
    s = tl.program_id(0) * BLOCK_S + tl.arange(0, BLOCK_S)
    smask = s < S
    c = tl.arange(0, BLOCK_C)
    cmask = c < C
    xt = tl.load(x_ptr + n * sxn + s[:, None] * sxs + c[None, :] * sxc, mask=smask[:, None] & cmask[None, :], other=0.0).to(ACC)
    if HAS_W:
        w0t = tl.load(w0_ptr + c[:, None] * C + c[None, :], mask=cmask[:, None] & cmask[None, :], other=0.0)
        u = tl.dot(xt, w0t, input_precision=PREC)
    else:
        u = xt
    a = tl.load(af_ptr + n * S + s, mask=smask, other=0.0)
    return n, s, smask, c, cmask, xt, u, a


@triton.jit
def _fine_stats(
    x_ptr, af_ptr, w0_ptr, mean_ptr, m2_ptr, cnt_ptr, C, S, sxn, sxc, sxs,
    BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr, HAS_W: tl.constexpr, PREC: tl.constexpr, ACC: tl.constexpr,
):
    n, s, smask, c, cmask, xt, u, a = _fine_tile(x_ptr, af_ptr, w0_ptr, C, S, sxn, sxc, sxs, BLOCK_S, BLOCK_C, HAS_W, PREC, ACC)
    blk = tl.program_id(1) * tl.num_programs(0) + tl.program_id(0)
    z = a[:, None] * u
    cnt = tl.sum(smask.to(ACC), axis=0)
    mean = tl.sum(z, axis=0) / cnt
    dev = tl.where(smask[:, None], z - mean[None, :], 0.0)
    tl.store(mean_ptr + blk * C + c, mean, mask=cmask)
    tl.store(m2_ptr + blk * C + c, tl.sum(dev * dev, axis=0), mask=cmask)
    tl.store(cnt_ptr + blk, cnt)


@triton.jit
def _fine_out(
    x_ptr, af_ptr, w0_ptr, scale_ptr, shift_ptr, out_ptr, C, S, sxn, sxc, sxs, son, soc, sos,
    BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr, HAS_W: tl.constexpr, PREC: tl.constexpr, ACC: tl.constexpr,
):
    n, s, smask, c, cmask, xt, u, a = _fine_tile(x_ptr, af_ptr, w0_ptr, C, S, sxn, sxc, sxs, BLOCK_S, BLOCK_C, HAS_W, PREC, ACC)
    scale = tl.load(scale_ptr + c, mask=cmask, other=0.0)
    shift = tl.load(shift_ptr + c, mask=cmask, other=0.0)
    out = a[:, None] * u * scale[None, :] + shift[None, :]
    tl.store(
        out_ptr + n * son + s[:, None] * sos + c[None, :] * soc, out.to(out_ptr.dtype.element_ty),
        mask=smask[:, None] & cmask[None, :],
    )


@triton.jit
def _fine_bwd_sums(
    x_ptr, af_ptr, w0_ptr, do_ptr, r_ptr, h_ptr, sdo_ptr, sdoz_ptr, C, S, sxn, sxc, sxs, son, soc, sos,
    BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr, PREC: tl.constexpr, ACC: tl.constexpr,
):
    """Per-block sums of dout and dout * zhat, zhat = alpha * u * r + h."""
    n, s, smask, c, cmask, xt, u, a = _fine_tile(x_ptr, af_ptr, w0_ptr, C, S, sxn, sxc, sxs, BLOCK_S, BLOCK_C, True, PREC, ACC)
    blk = tl.program_id(1) * tl.num_programs(0) + tl.program_id(0)
    m2 = smask[:, None] & cmask[None, :]
    r = tl.load(r_ptr + c, mask=cmask, other=0.0)
    h = tl.load(h_ptr + c, mask=cmask, other=0.0)
    do = tl.load(do_ptr + n * son + s[:, None] * sos + c[None, :] * soc, mask=m2, other=0.0).to(ACC)
    zhat = a[:, None] * u * r[None, :] + h[None, :]
    tl.store(sdo_ptr + blk * C + c, tl.sum(do, axis=0), mask=cmask)
    tl.store(sdoz_ptr + blk * C + c, tl.sum(tl.where(m2, do * zhat, 0.0), axis=0), mask=cmask)


@triton.jit
def _fine_bwd(
    x_ptr, af_ptr, w0_ptr, do_ptr, dalpha_ptr, coef_ptr, dx_ptr, daf_ptr, dw0_ptr, db_ptr,
    C, S, sxn, sxc, sxs, son, soc, sos, sdn, sdc, sds,
    BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr, HAS_W: tl.constexpr, HAS_DALPHA: tl.constexpr,
    PREC: tl.constexpr, ACC: tl.constexpr,
):
    """dz = A dout + B + E zhat (zhat = alpha u r + h; coef rows A, B, E, r, h); then
    d alpha = sum_c dz u (+ the alpha output's gradient), dx = alpha W0^T dz, dW0 += dz^T (alpha x), db += sum dz."""
    n, s, smask, c, cmask, xt, u, a = _fine_tile(x_ptr, af_ptr, w0_ptr, C, S, sxn, sxc, sxs, BLOCK_S, BLOCK_C, HAS_W, PREC, ACC)
    m2 = smask[:, None] & cmask[None, :]
    A = tl.load(coef_ptr + c, mask=cmask, other=0.0)
    B = tl.load(coef_ptr + BLOCK_C + c, mask=cmask, other=0.0)
    E = tl.load(coef_ptr + 2 * BLOCK_C + c, mask=cmask, other=0.0)
    r = tl.load(coef_ptr + 3 * BLOCK_C + c, mask=cmask, other=0.0)
    h = tl.load(coef_ptr + 4 * BLOCK_C + c, mask=cmask, other=0.0)
    do = tl.load(do_ptr + n * son + s[:, None] * sos + c[None, :] * soc, mask=m2, other=0.0).to(ACC)
    dz = A[None, :] * do + B[None, :] + E[None, :] * (a[:, None] * u * r[None, :] + h[None, :])
    dz = tl.where(m2, dz, 0.0)
    da = tl.sum(dz * u, axis=1)
    if HAS_DALPHA:
        da += tl.load(dalpha_ptr + n * S + s, mask=smask, other=0.0).to(ACC)
    tl.store(daf_ptr + n * S + s, da, mask=smask)
    adz = a[:, None] * dz
    if HAS_W:
        w0 = tl.load(w0_ptr + c[None, :] * C + c[:, None], mask=cmask[:, None] & cmask[None, :], other=0.0)
        dxt = tl.dot(adz, w0, input_precision=PREC)
        tl.atomic_add(
            dw0_ptr + c[:, None] * C + c[None, :], tl.dot(tl.trans(dz), a[:, None] * xt, input_precision=PREC),
            mask=cmask[:, None] & cmask[None, :],
        )
        tl.atomic_add(db_ptr + c, tl.sum(dz, axis=0), mask=cmask)
    else:
        dxt = adz
    tl.store(dx_ptr + n * sdn + s[:, None] * sds + c[None, :] * sdc, dxt, mask=m2)
