"""Choosing the gate's implementation: precedence, "auto", explicit requests and their errors."""

import pytest
import torch

from attention_gates import GridAttentionGate2D
from attention_gates.functional import grid_attention, grid_attention_reference
from attention_gates.ops import BackendUnavailableError, get_backend, use_backend
from attention_gates.ops import dispatch


@pytest.fixture
def gate_case():
    torch.manual_seed(0)
    gate = GridAttentionGate2D(4, 6).eval()
    x, g = torch.randn(2, 4, 8, 6), torch.randn(2, 6, 4, 3)
    return gate, x, g


def _case(gate, **kw):
    weights = (gate.theta.weight, gate.phi.weight, gate.phi.bias, gate.psi.weight, gate.psi.bias,
               gate.W[0].weight, gate.W[0].bias, gate.W[1].weight, gate.W[1].bias)  # fmt: skip
    return {**dict(W_weight=gate.W[0].weight, norm="batch", training=False, sigma1="relu", sigma2="sigmoid", weights=weights), **kw}


def test_precedence_call_over_module_over_context_over_env(monkeypatch, gate_case):
    gate, x, g = gate_case
    monkeypatch.setenv(dispatch.ENV_VAR, "compile")
    assert get_backend() == "compile"
    with use_backend("reference"):
        assert get_backend() == "reference"
        with use_backend("cpu"):
            assert get_backend() == "cpu"
        assert get_backend() == "reference"
    assert get_backend() == "compile"
    monkeypatch.delenv(dispatch.ENV_VAR)
    assert get_backend() == "auto"
    # a module's own backend beats the context; an explicit call argument beats both
    gate.backend = "triton"
    with use_backend("reference"), pytest.raises(BackendUnavailableError, match="backend 'triton'"):
        gate(x, g)
    gate.backend = None
    with use_backend("triton"), pytest.raises(BackendUnavailableError):
        gate(x, g)
    with use_backend("triton"):
        out, _ = grid_attention(x, g, gate.theta.weight, gate.phi.weight, gate.phi.bias, gate.psi.weight,
                                gate.psi.bias, backend="reference")  # fmt: skip
    assert out.shape == x.shape


def test_bad_names_are_errors(monkeypatch):
    with pytest.raises(ValueError, match="backend must be one of .* got 'fast'"):
        with use_backend("fast"):
            pass
    monkeypatch.setenv(dispatch.ENV_VAR, "fast")
    with pytest.raises(ValueError, match=r"\$ATTENTION_GATES_BACKEND: backend must be one of"):
        get_backend()
    with pytest.raises(ValueError, match="backend must be one of"):
        GridAttentionGate2D(4, 6, backend="fast")


def test_explicit_triton_on_the_cpu_lists_every_reason(monkeypatch, gate_case):
    """Without the interpreter, a CPU tensor cannot take the kernels; an explicit request says so
    (with every other reason) and never falls back."""
    gate, x, g = gate_case
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(BackendUnavailableError) as err:
        dispatch.select("triton", x, g, **_case(gate, sigma2="softmax"))
    msg = str(err.value)
    assert "backend 'triton' cannot run" in msg and "[2, 4, 8, 6]" in msg
    assert "Triton kernels need a CUDA tensor" in msg and "sigma2='softmax'" in msg
    monkeypatch.setattr(dispatch, "_HAS_TRITON", False)
    with pytest.raises(BackendUnavailableError, match="Triton is not installed"):
        dispatch.select("triton", x, g, **_case(gate))


def test_auto_falls_back_and_prefers_the_cpu_path_for_inference(monkeypatch, gate_case):
    gate, x, g = gate_case
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with torch.no_grad():
        assert dispatch.select("auto", x, g, **_case(gate)) is dispatch._cpu_impl
        # a case the fused paths refuse: the reference, silently (that is what "auto" means)
        assert dispatch.select("auto", x, g, **_case(gate, sigma2="softmax")) is grid_attention_reference
    # training needs gradients: the reference (the cpu path's backward is slower)
    assert dispatch.select("auto", x, g, **_case(gate)) is grid_attention_reference
    # float64: the reference
    with torch.no_grad():
        assert dispatch.select("auto", x.double(), g.double(), **_case(gate.double())) is grid_attention_reference


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_compile_backend_matches_the_reference(gate_case):
    gate, x, g = gate_case
    gate.train()
    outs = []
    for backend in ("reference", "compile"):
        gate.backend = backend
        xr = x.clone().requires_grad_()
        out, alpha = gate(xr, g)
        (out.square().sum() + alpha.sum()).backward()
        outs.append((out.detach(), alpha.detach(), xr.grad, gate.theta.weight.grad.clone()))
        gate.zero_grad()
    for a, b in zip(*outs):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
