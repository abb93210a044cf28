"""Choosing the gate's implementation: precedence, "auto" and the measured table, explicit requests and their errors."""

import json

import pytest
import torch

from attention_gates import GridAttentionGate2D
from attention_gates.functional import GateOptions, GateWeights, grid_attention, grid_attention_reference
from attention_gates.ops import BackendUnavailableError, dispatch, get_backend, measured, use_backend


@pytest.fixture
def gate_case():
    torch.manual_seed(0)
    gate = GridAttentionGate2D(4, 6).eval()
    x, g = torch.randn(2, 4, 8, 6), torch.randn(2, 6, 4, 3)
    return gate, x, g


def _weights(gate) -> GateWeights:
    W, bn = gate.W
    return GateWeights(gate.theta.weight, gate.phi.weight, gate.phi.bias, gate.psi.weight, gate.psi.bias,
                       W.weight, W.bias, bn.weight, bn.bias, bn.running_mean, bn.running_var)  # fmt: skip


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
        dispatch.select("triton", x, g, _weights(gate), GateOptions(sigma2="softmax"))
    msg = str(err.value)
    assert "backend 'triton' cannot run" in msg and "[2, 4, 8, 6]" in msg
    assert "Triton kernels need a CUDA tensor" in msg and "sigma2='softmax'" in msg
    monkeypatch.setattr(dispatch, "_HAS_TRITON", False)
    with pytest.raises(BackendUnavailableError, match="Triton is not installed"):
        dispatch.select("triton", x, g, _weights(gate), GateOptions())


def _with_winner(monkeypatch, key, backend):
    monkeypatch.setattr(measured, "_WINNERS", {key: backend})


def test_auto_takes_a_fused_backend_only_where_the_table_names_it(monkeypatch, gate_case):
    gate, x, g = gate_case
    w, opt = _weights(gate), GateOptions()
    with torch.no_grad():
        key = dispatch.measured_key(x, g, w)
        assert key == measured.Key("cpu", measured.host_capability(), "float32", "eval", "contiguous", "eager")
        _with_winner(monkeypatch, key, None)
        assert dispatch.chosen("auto", x, g, w, opt) == "reference"
        _with_winner(monkeypatch, key, "cpu")
        assert dispatch.select("auto", x, g, w, opt) is dispatch._cpu_impl
        # a call the winner cannot run: the reference, silently (that is what "auto" means)
        assert dispatch.select("auto", x, g, w, GateOptions(sigma2="softmax")) is grid_attention_reference
        # another row (channels-last, float64): no winner there
        x_cl = x.contiguous(memory_format=torch.channels_last)
        assert dispatch.measured_key(x_cl, g, w).layout == "channels_last"
        assert dispatch.chosen("auto", x_cl, g, w, opt) == "reference"
        assert dispatch.chosen("auto", x.double(), g.double(), w, opt) == "reference"
    # gradients wanted: the training row, which names no winner here
    assert dispatch.measured_key(x, g, w).mode == "train"
    assert dispatch.chosen("auto", x, g, w, opt) == "reference"


def test_inside_torch_compile_the_key_says_compiled(gate_case):
    gate, x, g = gate_case
    w = _weights(gate)
    seen = []

    def fn(x):
        seen.append(dispatch.measured_key(x, g, w).context)
        return x + 1

    with torch.no_grad():
        torch.compile(fn, backend="eager", fullgraph=True)(x)
    assert seen == ["compiled"]


@pytest.mark.parametrize(
    "ms, winner",
    [
        ({"reference": 1.0, "compile": 2.0, "cpu": 0.5}, "cpu"),
        ({"reference": 1.0, "compile": 0.6, "cpu": 0.7}, None),  # behind compile
        ({"reference": 1.0, "compile": 2.0, "cpu": 0.97}, None),  # ahead by less than the margin
        ({"reference": 1.0, "cpu": 0.1}, None),  # compile not measured: no claim
        ({"reference": 1.0, "compile": 1.0, "cpu": 0.5, "triton": 0.4}, "triton"),
        ({"reference": 1.0, "compile": 2.0, "triton": None}, None),  # failed or not measured: never a winner
        ({"reference": None, "compile": 2.0, "triton": 0.1}, None),
    ],
)
def test_a_row_names_a_winner_only_when_ahead_of_both_baselines(ms, winner):
    assert measured.row_winner({"ms": ms, "context": "eager"}) == winner


def test_inside_compile_the_reference_is_the_only_baseline():
    """There "compile" traces the reference with the same compiler: gpu_check writes it as null."""
    assert measured.row_winner({"ms": {"reference": 1.0, "compile": None, "triton": 0.5}, "context": "compiled"}) == "triton"
    assert measured.row_winner({"ms": {"reference": 1.0, "compile": None, "triton": 0.5}, "context": "eager"}) is None


def test_the_committed_table_is_well_formed():
    rows = json.loads(measured.PATH.read_text())["rows"]
    assert measured.rows() == tuple(rows)
    for r in rows:
        assert r["device"] in ("cpu", "cuda") and r["mode"] in ("eval", "train") and r["context"] in ("eager", "compiled")
        assert r["layout"] in ("contiguous", "channels_last") and r["dtype"] in ("float32", "float16", "bfloat16")
        assert {"reference", "compile"} <= set(r["ms"]) and r["commit"] and r["source"] and r["ms"]["reference"] is not None
        assert set(r["ms"]) <= set(dispatch.BACKENDS) - {"auto"}


def test_auto_follows_the_committed_rows_of_this_machine(gate_case):
    """Each committed row of this kind of CPU decides "auto" for a call it describes."""
    gate, x, g = gate_case
    gate = gate.float()
    w = _weights(gate)
    rows = [r for r in measured.rows() if r["device"] == "cpu" and r["capability"] == measured.host_capability() and r["dtype"] == "float32"]
    for r in rows:
        xr = x.contiguous(memory_format=torch.channels_last) if r["layout"] == "channels_last" else x
        xr = xr.detach().requires_grad_(r["mode"] == "train")
        with torch.set_grad_enabled(r["mode"] == "train"):
            assert dispatch.measured_key(xr, g, w) == measured.Key(*(r[f] for f in measured.Key._fields))
            assert dispatch.chosen("auto", xr, g, w, GateOptions(training=r["mode"] == "train")) == (measured.row_winner(r) or "reference")


def test_a_malformed_table_is_refused_naming_the_row(tmp_path):
    path = tmp_path / "measured.json"
    path.write_text(json.dumps({"rows": [{"device": "cpu", "ms": {}}]}))
    with pytest.raises(ValueError, match=r"row 0 has no 'capability'"):
        measured._read(path)


@pytest.fixture
def empty_table(monkeypatch):
    """No measured rows: "auto" decides with the reference as its only candidate."""
    monkeypatch.setattr(measured, "_WINNERS", {})


@pytest.fixture
def deterministic():
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(False)


def test_deterministic_algorithms_take_the_kernels_where_the_reference_is_not(monkeypatch, gate_case, empty_table, deterministic):
    """On CUDA the reference's backward through alpha's resampling adds with atomics; the kernels'
    does not, unless g itself is resampled. (CUDA is stood in for: the rule reads only the device type.)"""
    gate, x, g = gate_case
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    w, opt = _weights(gate), GateOptions(training=True)
    x = x.requires_grad_()
    assert dispatch._reference_deterministic(x, g, w, opt) and dispatch.chosen("auto", x, g, w, opt) == "reference"  # CPU
    monkeypatch.setattr(dispatch, "_cuda_backward", lambda x, g, w: True)
    assert not dispatch._reference_deterministic(x, g, w, opt) and dispatch._triton_deterministic(x, g, w, opt)
    assert dispatch.chosen("auto", x, g, w, opt) == "triton"
    g_off = torch.randn(2, 6, 3, 3)  # not theta's 4x3 grid: resampled by F.interpolate
    assert not dispatch._triton_deterministic(x, g_off, w, opt)
    with pytest.raises(BackendUnavailableError, match=r"g is resampled onto theta's grid by F.interpolate"):
        dispatch.chosen("triton", x, g_off, w, opt)
    assert dispatch.chosen("auto", x, g_off, w, opt) == "reference"  # nothing deterministic: PyTorch says so itself


def test_without_deterministic_algorithms_auto_follows_the_table_alone(monkeypatch, gate_case, empty_table):
    gate, x, g = gate_case
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setattr(dispatch, "_cuda_backward", lambda x, g, w: True)
    assert dispatch.chosen("auto", x.requires_grad_(), g, _weights(gate), GateOptions(training=True)) == "reference"


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
