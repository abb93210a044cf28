"""The cpu backend's native kernel (attention_gates.ops.native): its product against float64
arithmetic, its input checks, its use by the gates, the build, its cache and the fallback."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch

from attention_gates import GridAttentionGate3D, MultiAttentionGate
from attention_gates.functional import grid_attention_reference
from attention_gates.ops import cpu, native

needs_kernel = pytest.mark.skipif(not native.available(), reason=f"native kernel unavailable: {native.unavailable_reason()}")


def expected(x, A, alpha, bias, relu):
    """``act(bias + sum_h alpha_h * (A_h @ x))`` per row, in float64: ``x = Tensor[N, *S, C]``."""
    heads = 1 if alpha is None else alpha.shape[1]
    P = torch.einsum("hoc,n...c->nh...o", A.double().view(heads, -1, A.shape[1]), x.double())  # [N, H, *S, Co]
    if alpha is not None:
        P = P * alpha.double().unsqueeze(-1)
    out = P.sum(1) + (0 if bias is None else bias.double())
    return out.relu() if relu else out


def _products(heads: int, n: int, spatial: tuple, c: int, co: int, seed: int):
    """Random ``x = Tensor[n, *spatial, c]`` (rows) and ``A``, and the keyword sets to try: with and
    without alpha, bias and ReLU (no alpha: one head only)."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, *spatial, c, generator=gen)
    A = torch.randn(heads * co, c, generator=gen)
    alpha = torch.rand(n, heads, *spatial, generator=gen)
    bias = torch.randn(co, generator=gen)
    cases = [dict(alpha=alpha, bias=bias, relu=True), dict(alpha=alpha, bias=None, relu=False)]
    if heads == 1:
        cases.append(dict(alpha=None, bias=bias, relu=False))
    return x, A, cases


@needs_kernel
@pytest.mark.parametrize("heads", [1, 2, 3])
@pytest.mark.parametrize("spatial", [(5, 7, 3), (9, 11), (1,)])
@pytest.mark.parametrize("n, c, co_vectors", [(1, 16, 2), (2, 3, 1), (2, 37, 3)])
def test_rows_product_matches_float64(heads, spatial, n, c, co_vectors):
    """Row counts that are not a multiple of the tile, one and several heads, an output width that
    ends in half a tile (3 vectors), batches, with and without alpha, bias and ReLU."""
    co = co_vectors * native.vector_width()
    x, A, cases = _products(heads, n, spatial, c, co, seed=heads * 100 + c)
    for kw in cases:
        got = native.rows_product(x, A, **kw)
        want = expected(x, A, kw["alpha"], kw["bias"], kw["relu"])
        assert got.shape == (n, *spatial, co) and got.dtype == torch.float32
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5 * want.abs().max().item())


@needs_kernel
def test_rows_product_reads_strided_batches():
    """The rows of a channels-last tensor permuted (a view): as its contiguous copy gives."""
    x5 = torch.randn(3, 8, 4, 5, 6).contiguous(memory_format=torch.channels_last_3d)
    co = native.vector_width()
    A, alpha = torch.randn(co, 8), torch.rand(3, 1, 4, 5, 6)
    got = native.rows_product(x5.movedim(1, -1), A, alpha=alpha)
    torch.testing.assert_close(got, native.rows_product(x5.movedim(1, -1).contiguous(), A, alpha=alpha))
    torch.testing.assert_close(got.double(), expected(x5.movedim(1, -1), A, alpha, None, False), rtol=1e-5, atol=1e-5)


@needs_kernel
def test_rows_product_rejects_what_it_cannot_compute():
    vl = native.vector_width()
    x = torch.randn(2, 5, 8)
    with pytest.raises(ValueError, match=f"multiple of {vl}"):
        native.rows_product(x, torch.randn(vl + 1, 8))
    with pytest.raises(ValueError, match="do not fit"):
        native.rows_product(x, torch.randn(vl, 8), bias=torch.randn(vl + 1))
    with pytest.raises(ValueError, match="do not fit"):
        native.rows_product(x, torch.randn(2 * vl, 8), alpha=torch.rand(2, 2, 4))
    with pytest.raises(ValueError, match="do not fit"):
        native.rows_product(x, torch.randn(vl, 7))
    with pytest.raises(ValueError, match="float32 CPU tensors, got torch.float64"):
        native.rows_product(x.double(), torch.randn(vl, 8, dtype=torch.float64))


@needs_kernel
@pytest.mark.parametrize("heads", [1, 2, 3])
@pytest.mark.parametrize("spatial", [(5, 7, 3), (9, 11), (4, 16)])
@pytest.mark.parametrize("n, c, co", [(1, 16, 32), (2, 3, 5), (2, 37, 13)])
def test_planes_product_matches_float64(heads, spatial, n, c, co):
    """The planar kernel on contiguous tensors: voxel counts that end in a whole tile, a single
    vector or a scalar tail, output counts that end in a partial channel tile, one and several
    heads, batches, with and without alpha, bias and ReLU."""
    rows, A, cases = _products(heads, n, spatial, c, co, seed=heads * 100 + c + co)
    x = rows.movedim(-1, 1).contiguous()
    for kw in cases:
        got = native.planes_product(x, A, **kw)
        want = expected(rows, A, kw["alpha"], kw["bias"], kw["relu"]).movedim(-1, 1)
        assert got.shape == (n, co, *spatial) and got.is_contiguous() and got.dtype == torch.float32
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5 * want.abs().max().item())


@needs_kernel
def test_planes_product_rejects_what_it_cannot_compute():
    x = torch.randn(2, 8, 4, 5)
    with pytest.raises(ValueError, match="do not fit"):
        native.planes_product(x, torch.randn(6, 8), bias=torch.randn(5))
    with pytest.raises(ValueError, match="do not fit"):
        native.planes_product(x, torch.randn(6, 8), alpha=torch.rand(2, 2, 4, 4))
    with pytest.raises(ValueError, match="do not fit"):
        native.planes_product(x, torch.randn(7, 8), alpha=torch.rand(2, 2, 4, 5))
    with pytest.raises(ValueError, match="do not fit"):
        native.planes_product(x, torch.randn(6, 7))
    with pytest.raises(ValueError, match="float32 CPU tensors, got torch.float64"):
        native.planes_product(x.double(), torch.randn(6, 8, dtype=torch.float64))


def _count_native_calls(monkeypatch, name: str = "rows_product") -> list:
    calls = []
    original = getattr(native, name)

    def spy(*args, **kwargs):
        calls.append(tuple(args[0].shape))
        return original(*args, **kwargs)

    monkeypatch.setattr(native, name, spy)
    return calls


def _without_kernel(monkeypatch):
    monkeypatch.setattr(native, "_state", {"lib": None, "reason": "switched off by the test"})


@pytest.mark.parametrize("channels_last", [True, False])
@pytest.mark.parametrize("kernel", [True, False])
def test_gate_inference(monkeypatch, kernel, channels_last):
    """A float32 gate in inference: the native kernel (rows for channels-last x, planes for
    contiguous x) computes alpha * (W0 x) + b (with the norm folded) when it is available, the
    same products in PyTorch otherwise; both give the float64 reference's output in x's layout."""
    if kernel and not native.available():
        pytest.skip(f"native kernel unavailable: {native.unavailable_reason()}")
    if not kernel:
        _without_kernel(monkeypatch)
    calls = _count_native_calls(monkeypatch, "rows_product" if channels_last else "planes_product")
    fmt = torch.channels_last_3d if channels_last else torch.contiguous_format
    c = 2 * 16  # a multiple of every vector width
    torch.manual_seed(0)
    gate = GridAttentionGate3D(c, 24, 16, backend="cpu")
    with torch.no_grad():
        gate.W[1].running_mean.normal_()
        gate.W[1].running_var.uniform_(0.5, 2.0)
    gate.eval()
    x = torch.randn(2, c, 11, 9, 7).contiguous(memory_format=fmt)
    g = torch.randn(2, 24, 5, 4, 3).contiguous(memory_format=fmt)
    with torch.inference_mode():
        out, alpha = gate(x, g)
    ref_gate = GridAttentionGate3D(c, 24, 16, backend="reference").double().eval()
    ref_gate.load_state_dict(gate.state_dict())
    want, want_alpha = ref_gate(x.double(), g.double())
    assert len(calls) == (1 if kernel else 0)
    assert out.is_contiguous(memory_format=fmt) and out.stride() == x.stride()
    torch.testing.assert_close(out.double(), want.detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(alpha.double(), want_alpha.detach(), rtol=1e-5, atol=1e-6)


@needs_kernel
@pytest.mark.parametrize("channels_last", [True, False])
@pytest.mark.parametrize("heads", [2, 3])
def test_multi_gate_block(monkeypatch, heads, channels_last):
    """The folded multi-head block: relu(c + sum_i alpha_i (A_i x)) in one pass of the kernel,
    equal to the block computed head by head in float64."""
    calls = _count_native_calls(monkeypatch, "rows_product" if channels_last else "planes_product")
    fmt = torch.channels_last_3d if channels_last else torch.contiguous_format
    torch.manual_seed(1)
    block = MultiAttentionGate(3, 16, 24, inter_channels=16, heads=heads)
    for m in block.modules():
        if isinstance(m, torch.nn.BatchNorm3d):
            with torch.no_grad():
                m.running_mean.normal_()
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
    block.eval()
    x = torch.randn(1, 16, 10, 12, 8).contiguous(memory_format=fmt)
    g = torch.randn(1, 24, 5, 6, 4).contiguous(memory_format=fmt)
    with torch.inference_mode():
        out, alpha = block(x, g)
    block64 = MultiAttentionGate(3, 16, 24, inter_channels=16, heads=heads, backend="reference").double().eval()
    block64.load_state_dict(block.state_dict())
    with torch.no_grad():
        want, want_alpha = block64(x.double(), g.double())
    assert calls == [(1, 10, 12, 8, 16) if channels_last else (1, 16, 10, 12, 8)]
    torch.testing.assert_close(out.double(), want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(alpha.double(), want_alpha, rtol=1e-5, atol=1e-6)


@needs_kernel
def test_rows_stats_matches_float64():
    """Per-channel sum and sum of squares of alpha * (W x): batches, row counts that end in a partial
    tile, widths ending in half a tile, a shift far from zero (the float64 sums keep the variance)."""
    gen = torch.Generator().manual_seed(6)
    vl = native.vector_width()
    for n, c, co, spatial in [(2, 16, 3 * vl, (5, 7, 3)), (1, 7, vl, (9, 11))]:
        x = torch.randn(n, *spatial, c, generator=gen) + 3.0
        W, alpha = torch.randn(co, c, generator=gen), torch.rand(n, 1, *spatial, generator=gen)
        s1, s2 = native.rows_stats(x, W, alpha)
        v = alpha.double().movedim(1, -1) * (x.double() @ W.double().t())
        assert s1.dtype == s2.dtype == torch.float64 and s1.shape == s2.shape == (co,)
        torch.testing.assert_close(s1, v.flatten(0, -2).sum(0), rtol=1e-5, atol=1e-6 * v.abs().sum().item())
        torch.testing.assert_close(s2, v.square().flatten(0, -2).sum(0), rtol=1e-5, atol=0.0)
    with pytest.raises(ValueError, match="do not fit"):
        native.rows_stats(x, W, alpha[..., :1])
    with pytest.raises(ValueError, match=f"multiple of {vl}"):
        native.rows_stats(x, W[:-1], alpha)


@needs_kernel
def test_backward_rows_matches_float64():
    """h = A1 dy + alpha (A2 x) + bias and h . x per row: batches, strided rows, widths ending in half a tile."""
    gen = torch.Generator().manual_seed(5)
    for n, c, spatial in [(2, 3 * native.vector_width(), (5, 7, 3)), (1, native.vector_width(), (9, 11))]:
        fmt = torch.channels_last_3d if len(spatial) == 3 else torch.channels_last
        x, dy = (torch.randn(n, c, *spatial, generator=gen).contiguous(memory_format=fmt) for _ in range(2))
        A1, A2, bias = torch.randn(c, c, generator=gen), torch.randn(c, c, generator=gen), torch.randn(c, generator=gen)
        alpha = torch.rand(n, 1, *spatial, generator=gen)
        h, hx = native.backward_rows(dy.movedim(1, -1), x.movedim(1, -1), A1, A2, alpha, bias)
        X, D = x.double().movedim(1, -1), dy.double().movedim(1, -1)
        want = D @ A1.double().t() + alpha.double().movedim(1, -1) * (X @ A2.double().t()) + bias.double()
        torch.testing.assert_close(h.double(), want, rtol=1e-5, atol=1e-5 * want.abs().max().item())
        want_hx = (want * X).sum(-1).unsqueeze(1)
        torch.testing.assert_close(hx.double(), want_hx, rtol=1e-5, atol=1e-5 * want_hx.abs().max().item())
    with pytest.raises(ValueError, match="do not fit"):
        native.backward_rows(dy.movedim(1, -1), x.movedim(1, -1), A1, A2, alpha[:, :, :1], bias)


@pytest.mark.parametrize("kernel", [True, False])
def test_gate_training_channels_last(monkeypatch, kernel):
    """Training a float32 channels-last gate with batch statistics: the native kernels compute the
    batch statistics and the normalised output in the forward, and the backward through W (h and
    its part of d alpha), when they are available; the output, every gradient and the running
    statistics match the float64 reference either way."""
    if kernel and not native.available():
        pytest.skip(f"native kernel unavailable: {native.unavailable_reason()}")
    if not kernel:
        _without_kernel(monkeypatch)
    calls = [_count_native_calls(monkeypatch, name) for name in ("rows_stats", "backward_rows")]
    c, fmt = 2 * 16, torch.channels_last_3d
    torch.manual_seed(2)
    gate = GridAttentionGate3D(c, 24, 16, backend="cpu").train()
    ref = GridAttentionGate3D(c, 24, 16, backend="reference").double().train()
    ref.load_state_dict(gate.state_dict())
    x = torch.randn(2, c, 10, 9, 8).contiguous(memory_format=fmt).requires_grad_()
    g = torch.randn(2, 24, 5, 4, 4).contiguous(memory_format=fmt).requires_grad_()
    x64, g64 = (t.detach().double().requires_grad_() for t in (x, g))
    w_out, w_alpha = torch.randn(2, c, 10, 9, 8).contiguous(memory_format=fmt), torch.randn(2, 1, 10, 9, 8)
    out, alpha = gate(x, g)
    ((out * w_out).sum() + (alpha * w_alpha).sum()).backward()
    out64, alpha64 = ref(x64, g64)
    ((out64 * w_out.double()).sum() + (alpha64 * w_alpha.double()).sum()).backward()
    assert [len(c) for c in calls] == ([1, 1] if kernel else [0, 0])  # the statistics (forward), the backward through W
    torch.testing.assert_close(out.double(), out64.detach(), rtol=1e-5, atol=1e-5)
    pairs = [(x.grad, x64.grad), (g.grad, g64.grad)] + [(p.grad, q.grad) for p, q in zip(gate.parameters(), ref.parameters())]
    for got, want in pairs:
        if want is None or want.abs().max() < 1e-9:  # (W's bias: zero through batch statistics)
            continue
        assert (got.double() - want).abs().max().item() <= 2e-4 * want.abs().max().item()
    torch.testing.assert_close(gate.W[1].running_var.double(), ref.W[1].running_var, rtol=1e-5, atol=1e-6)


@needs_kernel
def test_kernel_is_not_used_where_it_does_not_apply(monkeypatch):
    """Training (a gradient is needed), float64, a channels-last x with output channels that are
    not a multiple of the vector width, or inside native.disabled(): the PyTorch products.
    (A contiguous x takes the planar kernel, any output count.)"""
    calls = _count_native_calls(monkeypatch)
    planes = _count_native_calls(monkeypatch, "planes_product")
    vl = native.vector_width()
    fmt = torch.channels_last_3d
    x, A = torch.randn(1, 8, 4, 4, 4).contiguous(memory_format=fmt), torch.randn(vl, 8)
    alpha = torch.rand(1, 1, 4, 4, 4)
    assert not cpu._native(x.clone().requires_grad_(), A)
    assert not cpu._native(x, A.clone().requires_grad_())
    with torch.no_grad():
        assert cpu._native(x.clone().requires_grad_(), A)
        for args in [(x.double(), A.double()), (x, torch.randn(vl + 2, 8))]:
            assert not cpu._native(*args)
            cpu._scaled_product(*args, None, alpha.to(args[0].dtype))
        assert calls == [] and planes == []
        assert cpu._native(x.contiguous(), torch.randn(vl + 2, 8))
        cpu._scaled_product(x.contiguous(), torch.randn(vl + 2, 8), None, alpha)
        assert calls == [] and planes == [(1, 8, 4, 4, 4)]
        with native.disabled():
            assert not cpu._native(x, A)
            cpu._scaled_product(x, A, None, alpha)
        assert calls == []
        cpu._scaled_product(x, A, None, alpha)
    assert len(calls) == 1


def _python(code: str, **env) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=120,
        env={**os.environ, **env}, cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
    )  # fmt: skip


@needs_kernel
@pytest.mark.skipif(native.available() and native.vector_width() == 8, reason="this machine builds the 8-wide kernel already")
def test_eight_wide_build(tmp_path):
    """The kernels as machines without AVX-512 build them (8 floats per vector, 3-row tiles for
    rows, 4-channel tiles for planes), compiled here with -mno-avx512f, the training kernels
    included: the same results as float64 arithmetic."""
    code = """
        import torch
        from attention_gates.ops import native
        assert native.vector_width() == 8, native.vector_width()
        gen = torch.Generator().manual_seed(0)
        for heads, co, n, c in [(1, 8, 2, 5), (2, 24, 1, 19), (3, 16, 2, 8)]:
            x = torch.randn(n, 7, 5, c, generator=gen)
            A, alpha, bias = torch.randn(heads * co, c, generator=gen), torch.rand(n, heads, 7, 5, generator=gen), torch.randn(co, generator=gen)
            got = native.rows_product(x, A, alpha=alpha, bias=bias, relu=heads > 1).double()
            P = torch.einsum("hoc,nijc->nhijo", A.double().view(heads, co, c), x.double()) * alpha.double()[..., None]
            want = P.sum(1) + bias.double()
            want = want.relu() if heads > 1 else want
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * want.abs().max().item())
            planes = native.planes_product(x.movedim(-1, 1).contiguous(), A, alpha=alpha, bias=bias, relu=heads > 1).double()
            torch.testing.assert_close(planes, want.movedim(-1, 1), rtol=1e-5, atol=1e-5 * want.abs().max().item())
        for n, c in [(2, 8), (1, 24)]:  # the training kernels
            x, dy = torch.randn(n, 7, 5, c, generator=gen), torch.randn(n, 7, 5, c, generator=gen)
            A1, A2, b, a = torch.randn(c, c, generator=gen), torch.randn(c, c, generator=gen), torch.randn(c, generator=gen), torch.rand(n, 1, 7, 5, generator=gen)
            v = a.double().movedim(1, -1) * (x.double() @ A1.double().t())
            s1, s2 = native.rows_stats(x, A1, a)
            torch.testing.assert_close(s1, v.sum((0, 1, 2)), rtol=1e-5, atol=1e-5 * v.abs().sum().item())
            torch.testing.assert_close(s2, v.square().sum((0, 1, 2)), rtol=1e-5, atol=0.0)
            h, hx = native.backward_rows(dy, x, A1, A2, a, b)
            want = dy.double() @ A1.double().t() + a.double().movedim(1, -1) * (x.double() @ A2.double().t()) + b.double()
            torch.testing.assert_close(h.double(), want, rtol=1e-5, atol=1e-5 * want.abs().max().item())
            want_hx = (want * x.double()).sum(-1).unsqueeze(1)
            torch.testing.assert_close(hx.double(), want_hx, rtol=1e-5, atol=1e-5 * want_hx.abs().max().item())
    """
    result = _python(code, ATTENTION_GATES_CACHE=str(tmp_path), ATTENTION_GATES_NATIVE_CFLAGS="-mno-avx512f")
    assert result.returncode == 0, result.stderr


@needs_kernel
def test_build_is_cached(tmp_path):
    """The first process builds the library into the cache, the next one loads it as it is."""
    code = "from attention_gates.ops import native; assert native.available(), native.unavailable_reason()"
    first = _python(code, ATTENTION_GATES_CACHE=str(tmp_path))
    assert first.returncode == 0, first.stderr
    (built,) = tmp_path.glob("gate_cpu-*.so")
    stamp = built.stat().st_mtime_ns
    second = _python(code, ATTENTION_GATES_CACHE=str(tmp_path))
    assert second.returncode == 0, second.stderr
    assert [p.name for p in tmp_path.iterdir()] == [built.name] and built.stat().st_mtime_ns == stamp


@pytest.mark.parametrize(
    "env, reason",
    [
        ({"ATTENTION_GATES_NATIVE": "0"}, "disabled by ATTENTION_GATES_NATIVE=0"),
        ({"CC": "no-such-compiler-here"}, "no C compiler ('no-such-compiler-here' is not on PATH; set CC)"),
    ],
)
def test_unavailable_says_why_and_the_gate_still_runs(tmp_path, env, reason):
    code = f"""
        import torch
        from attention_gates import GridAttentionGate3D
        from attention_gates.ops import native
        assert not native.available()
        assert native.unavailable_reason() == {reason!r}, native.unavailable_reason()
        gate = GridAttentionGate3D(32, 16, 16, backend="cpu").eval()
        x = torch.randn(1, 32, 8, 8, 8).contiguous(memory_format=torch.channels_last_3d)
        with torch.inference_mode():
            out, _ = gate(x, torch.randn(1, 16, 4, 4, 4))
        assert out.shape == x.shape
    """
    result = _python(code, ATTENTION_GATES_CACHE=str(tmp_path), **env)
    assert result.returncode == 0, result.stderr
    assert not list(tmp_path.glob("*.so"))


def test_failed_build_warns_once_and_falls_back(tmp_path):
    """A compiler that fails: one RuntimeWarning with the reason, then the PyTorch products."""
    code = """
        import warnings
        from attention_gates.ops import native
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            assert not native.available() and not native.available()
        assert len(caught) == 1 and caught[0].category is RuntimeWarning, caught
        assert "native kernel is unavailable" in str(caught[0].message)
        assert native.unavailable_reason().startswith("building or loading gate_cpu.c failed")
    """
    result = _python(code, ATTENTION_GATES_CACHE=str(tmp_path), CC="false")
    assert result.returncode == 0, result.stderr
