"""Choosing the gate's implementation: precedence, "auto" and the measured table, explicit requests and their errors."""

import json
import re
import threading
import warnings

import pytest
import torch

from attention_gates import GridAttentionGate2D, GridAttentionGate3D
from attention_gates.functional import GateOptions, GateWeights, grid_attention, grid_attention_reference
from attention_gates.ops import BackendUnavailableError, cpu_gate, dispatch, get_backend, measured, use_backend


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
        assert dispatch.select("auto", x, g, w, opt) is cpu_gate.grid_attention_cpu
        # another kind of CPU (vendor, instruction set or core count): not measured, so the reference
        other = key._replace(capability="SomeVendor AVX512 33-64 cores")
        assert measured.winner(other) is None
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


def test_use_backend_is_per_thread(monkeypatch):
    """Two threads, each in its own use_backend, see their own; a thread without one sees the
    environment's (else "auto"), whatever the others do meanwhile."""
    monkeypatch.setenv(dispatch.ENV_VAR, "compile")
    inside, leave = threading.Barrier(3), threading.Event()
    seen: dict[str, list[str]] = {}

    def worker(name, backend):
        try:
            if backend is None:
                inside.wait(timeout=30)
                seen[name] = [get_backend()]
                return
            with use_backend(backend):
                inside.wait(timeout=30)  # all three threads are inside their blocks (or have none) now
                seen[name] = [get_backend()]
                leave.wait(timeout=30)
            seen[name].append(get_backend())
        except Exception as e:  # noqa: BLE001 - reported by the assertion below
            seen[name] = [repr(e)]

    threads = [threading.Thread(target=worker, args=a) for a in (("a", "reference"), ("b", "cpu"), ("none", None))]
    with use_backend("triton"):  # the main thread's own block reaches none of them
        for t in threads:
            t.start()
        threads[2].join(timeout=30)
        leave.set()
        for t in threads[:2]:
            t.join(timeout=30)
        assert get_backend() == "triton"
    assert seen == {"a": ["reference", "compile"], "b": ["cpu", "compile"], "none": ["compile"]}
    assert get_backend() == "compile"


def test_use_backend_restores_on_errors_and_nests():
    with pytest.raises(KeyError):
        with use_backend("reference"), use_backend("cpu"):
            assert get_backend() == "cpu"
            raise KeyError
    assert get_backend() == "auto"


def test_registry_entries_are_records_read_by_name():
    registry = dispatch.registry()
    assert set(registry) == set(dispatch.BACKENDS) - {"auto"}
    for name, backend in registry.items():
        assert isinstance(backend, dispatch.Backend) and backend.name == name
        with pytest.raises(AttributeError):
            backend.name = "other"  # frozen
    assert registry["cpu"].impl is cpu_gate.grid_attention_cpu and registry["reference"].impl is grid_attention_reference
    assert registry["reference"].recorders == {"torch.jit.trace", "torch.jit.script", "torch.export"}
    assert not registry["cpu"].recorders


def test_host_capability_names_vendor_instruction_set_and_cores():
    info = measured.cpu_info()
    key = measured.host_capability()
    assert key.startswith(f"{info.vendor} {info.isa} ") and re.fullmatch(r"\d+-\d+ cores", key.split(" ", 2)[2])
    assert info.isa == torch.backends.cpu.get_cpu_capability() and info.cores >= 1
    assert [measured._core_class(n) for n in (1, 2, 3, 4, 5, 16, 17, 64, 65)] == [
        "1-2 cores", "1-2 cores", "3-4 cores", "3-4 cores", "5-8 cores", "9-16 cores", "17-32 cores", "33-64 cores", "65-128 cores",
    ]  # fmt: skip


def test_cpu_thresholds_per_cpu_else_the_defaults(tmp_path):
    rows, entries = measured._read(measured.PATH)
    for entry in entries:
        assert measured.cpu_thresholds(entry["capability"]) == tuple(entry[f] for f in measured.CpuThresholds._fields)
    assert measured.cpu_thresholds("SomeVendor AVX512 33-64 cores") == measured.DEFAULT_CPU_THRESHOLDS
    path = tmp_path / "measured.json"
    path.write_text(json.dumps({"rows": [], "cpu_thresholds": [{"capability": "x", "onednn_min_rows": 1, "patch_max_rows": "2"}]}))
    with pytest.raises(ValueError, match=r"cpu_thresholds entry 0 has no 'patch_max_rows' of the right type"):
        measured._read(path)


@pytest.fixture
def gate3d():
    torch.manual_seed(0)
    gate = GridAttentionGate3D(4, 6).eval()
    return gate, torch.randn(2, 4, 8, 6, 10), torch.randn(2, 6, 4, 3, 5)


def test_jit_trace_records_the_reference_and_equals_eager(gate3d, monkeypatch, tmp_path):
    """The default backend under torch.jit.trace: the reference (even where the table names the cpu
    backend for this call), traced, saved, loaded back, equal to eager at other batch and spatial sizes."""
    gate, x, g = gate3d
    with torch.no_grad():
        monkeypatch.setattr(measured, "_WINNERS", {dispatch.measured_key(x, g, dispatch_weights(gate)): "cpu"})
        assert dispatch.chosen(None, x, g, dispatch_weights(gate), GateOptions()) == "cpu"  # eager
        traced = torch.jit.trace(gate, (x, g), check_trace=False)
    kinds = {n.kind() for n in traced.inlined_graph.nodes()}
    assert "aten::_convolution" in kinds and not any("PythonOp" in k for k in kinds), kinds
    path = tmp_path / "gate.pt"
    traced.save(str(path))
    loaded = torch.jit.load(str(path))
    for n, size in ((3, (8, 6, 10)), (1, (12, 10, 6))):  # another batch, another size
        x2, g2 = torch.randn(n, 4, *size), torch.randn(n, 6, *(s // 2 for s in size))
        with torch.no_grad():
            for got, want in zip(loaded(x2, g2), gate(x2, g2)):
                torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", ["cpu", "compile"])
def test_jit_trace_of_a_backend_it_cannot_record_is_refused(gate3d, backend):
    gate, x, g = gate3d
    gate.backend = backend
    with pytest.raises(BackendUnavailableError, match=rf"torch.jit.trace is recording this call, and cannot record the '{backend}' backend"):
        torch.jit.trace(gate, (x, g))


def test_torch_export_records_the_reference(gate3d):
    """torch.export with dynamic batch and spatial sizes: the reference's operations, equal to eager at other sizes."""
    from torch.export import Dim

    gate, x, g = gate3d
    n, d, h, w = Dim("n", min=1, max=8), Dim("d", min=1, max=32), Dim("h", min=1, max=32), Dim("w", min=1, max=32)
    shapes = ({0: n, 2: 2 * d, 3: 2 * h, 4: 2 * w}, {0: n, 2: d, 3: h, 4: w})
    program = torch.export.export(gate, (x, g), dynamic_shapes=shapes)
    targets = {str(node.target) for node in program.graph.nodes if node.op == "call_function"}
    assert "aten.conv3d.default" in targets and not any("mkldnn" in t or "higher_order" in t for t in targets), targets
    for size in ((8, 6, 10), (14, 4, 6)):
        x2, g2 = torch.randn(3, 4, *size), torch.randn(3, 6, *(s // 2 for s in size))
        for got, want in zip(program.module()(x2, g2), gate(x2, g2)):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    gate.backend = "cpu"
    with pytest.raises(BackendUnavailableError, match=r"torch.export is recording this call, and cannot record the 'cpu' backend"):
        torch.export.export(gate, (x, g))


def test_not_supported_reasons_name_the_recorder(gate3d):
    gate, x, g = gate3d
    seen = []

    def fn(x):
        seen.append(dispatch.not_supported_reasons("cpu", x, g, dispatch_weights(gate), GateOptions()))
        return x + 1

    torch.jit.trace(fn, (x,), check_trace=False)
    assert len(seen) == 1 and any("torch.jit.trace is recording" in r for r in seen[0])
    assert not dispatch.not_supported_reasons("cpu", x, g, dispatch_weights(gate), GateOptions())  # eager: nothing


def dispatch_weights(gate) -> GateWeights:
    W, bn = gate.W
    return GateWeights(gate.theta.weight, gate.phi.weight, gate.phi.bias, gate.psi.weight, gate.psi.bias,
                       W.weight, W.bias, bn.weight, bn.bias, bn.running_mean, bn.running_var)  # fmt: skip


def test_triton_on_an_unmeasured_gpu_warns_once_per_process():
    """The warning itself (a CUDA call cannot be made here): once per kind of GPU."""
    capability = "test-0.0"
    assert not measured.has_rows("cuda", capability)
    with pytest.warns(UserWarning, match=r"backend 'triton' on a cuda device of capability test-0.0: no measurement"):
        dispatch._warn_unmeasured("triton", "cuda", capability)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        dispatch._warn_unmeasured("triton", "cuda", capability)  # the second time: nothing
