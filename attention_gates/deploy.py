"""A trained network or gate, out of Python: TorchScript, ``torch.export`` programs, ONNX; and the check of each against eager PyTorch.

Three formats, each written by one function and checked by another (see :doc:`/deploy` for
which to choose):

=====================  ===========================  =============================================
format                 written by                   what it is
=====================  ===========================  =============================================
``"torchscript"``      :func:`export_torchscript`   :func:`torch.jit.trace` of the model,
                                                    saved with :func:`torch.jit.save` (``.pt``)
``"program"``          :func:`export_program`       :func:`torch.export.export` with dynamic batch
                                                    and spatial sizes, :func:`torch.export.save`
                                                    (``.pt2``); AOTInductor compiles it
``"onnx"``             :func:`export_onnx`          ``torch.onnx.export(..., dynamo=True)``, with
                                                    dynamic batch and spatial sizes (``.onnx``)
=====================  ===========================  =============================================

Every model is exported as built, in eval mode (batch norm with its running statistics), with
the gates' reference math: under tracing and export the default backend ``"auto"`` takes it
(:mod:`attention_gates.ops.dispatch`). The exported graph takes the same inputs as the model:

- a network (:class:`~attention_gates.nets.UNet`, :class:`~attention_gates.nets.AttentionUNet`,
  any face, or another network of one image input): input ``image``, ``Tensor[N, C, *S]``;
  output ``logits``, ``Tensor[N, classes, *S]``; with ``attention=True`` (an Attention U-Net)
  also ``attention_level<l>``, ``Tensor[N, heads, *S_l]`` for each gated level ``l``, ascending
  (the maps of ``forward(x, return_attention=True)``);
- a gate (:class:`~attention_gates.gates.GridAttentionGate`,
  :class:`~attention_gates.gates.MultiAttentionGate`): inputs ``x``, ``g``; outputs ``out``,
  ``alpha``.

ONNX needs the ``export`` extra (``pip install 'attention-gates[export]'``: onnx, onnxscript,
onnxruntime).
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Sequence, Union

import torch
from torch import Tensor, nn

from . import __version__
from .files import atomic_write
from .gates import GridAttentionGate, MultiAttentionGate
from .nets import AttentionUNet, UNet

__all__ = [
    "FORMATS",
    "AXES",
    "INPUT_NAME",
    "OUTPUT_NAME",
    "DEFAULT_OPSET",
    "TOLERANCE",
    "ExportCheckError",
    "require_export_packages",
    "check_output",
    "check_opset",
    "input_names",
    "output_names",
    "dynamic_shapes",
    "export_torchscript",
    "export_program",
    "export_onnx",
    "onnx_model",
    "check_torchscript",
    "check_program",
    "check_onnx",
    "allowed_difference",
]

#: The formats, each with its usual file suffix.
FORMATS = {"torchscript": ".pt", "program": ".pt2", "onnx": ".onnx"}
#: The names of the spatial axes by number of spatial dims (the ONNX model's axis names).
AXES = {1: ("width",), 2: ("height", "width"), 3: ("depth", "height", "width")}
#: A network's input, ``Tensor[N, C, *S]``.
INPUT_NAME = "image"
#: A network's output, the logits ``Tensor[N, classes, *S]``.
OUTPUT_NAME = "logits"
#: The ONNX opset written by default, the one torch's exporter translates to (no version conversion).
DEFAULT_OPSET = 18
#: An exported model's outputs may differ from eager PyTorch's by this fraction of the largest
#: absolute output (taken as at least 1).
TOLERANCE = 1e-3
_ONNX_PACKAGES = ("onnx", "onnxscript", "onnxruntime")
_KIND = {"torchscript": "TorchScript", "program": "torch.export program", "onnx": "ONNX"}

PathLike = Union[str, os.PathLike]
Inputs = Union[Tensor, Sequence[Tensor]]


class ExportCheckError(RuntimeError):
    """An exported model fixed a size that must be symbolic, its runtime could not run it, or its
    outputs differ from the eager model's."""


def require_export_packages() -> None:
    """Raise an ``ImportError`` naming the missing packages when onnx, onnxscript or onnxruntime is not installed."""
    missing = [m for m in _ONNX_PACKAGES if importlib.util.find_spec(m) is None]
    if missing:
        raise ImportError(f"the ONNX export needs {', '.join(_ONNX_PACKAGES)} ({', '.join(missing)} not installed): "
                          "pip install 'attention-gates[export]'")  # fmt: skip


def check_output(path: PathLike, overwrite: bool = False, format: str = "onnx") -> Path:
    """``path`` as the file to write a ``format`` model to: not a folder, and not an existing file unless ``overwrite``.

    Raises:
        ValueError: ``path`` is a folder, or ``format`` is not one of :data:`FORMATS`.
        FileExistsError: ``path`` exists and ``overwrite`` is false.
    """
    path = Path(path)
    if format not in FORMATS:
        raise ValueError(f"format must be one of {tuple(FORMATS)}, got {format!r}")
    if path.is_dir():
        raise ValueError(f"output {path} is a folder; expected the {_KIND[format]} file to write")
    if path.exists() and not overwrite:
        raise FileExistsError(f"output {path} exists: pass overwrite=True (--overwrite) to replace it")
    return path


def check_opset(opset: int) -> int:
    """``opset`` if torch's ONNX exporter writes it without a version conversion (18 or later), else a ``ValueError``."""
    if opset < DEFAULT_OPSET:
        raise ValueError(f"opset must be {DEFAULT_OPSET} or later (torch's ONNX exporter), got {opset}")
    return opset


# ----------------------------------------------------------------------------- what is exported


def _is_gate(model: nn.Module) -> bool:
    return isinstance(model, (GridAttentionGate, MultiAttentionGate))


def _spatial_dims(model: nn.Module) -> Optional[int]:
    """The model's spatial dims where the library's module says them (``None`` for another network)."""
    if isinstance(model, MultiAttentionGate):
        return model.gates[0].spatial_dims
    return getattr(model, "spatial_dims", None) if isinstance(model, (UNet, GridAttentionGate)) else None


def input_names(model: nn.Module) -> tuple[str, ...]:
    """The exported model's inputs: ``("x", "g")`` for a gate, ``("image",)`` for a network."""
    return ("x", "g") if _is_gate(model) else (INPUT_NAME,)


def output_names(model: nn.Module, attention: bool = False) -> tuple[str, ...]:
    """The exported model's outputs: ``("out", "alpha")`` for a gate; ``("logits",)`` for a network,
    with ``attention`` followed by ``attention_level<l>`` for each of an Attention U-Net's gated levels.

    Raises:
        ValueError: ``attention`` for a model with no attention maps to add (a gate returns its
            ``alpha`` always).
    """
    if attention and not isinstance(model, AttentionUNet):
        has = "returns its attention map alpha always" if _is_gate(model) else "has no attention maps"
        raise ValueError(f"attention=True needs an AttentionUNet; {type(model).__name__} {has}")
    if _is_gate(model):
        return ("out", "alpha")
    levels = model.attention_levels if attention else ()
    return (OUTPUT_NAME, *(f"attention_level{lv}" for lv in levels))


class _WithAttention(nn.Module):
    """An Attention U-Net returning ``(logits, *attention maps)``: one flat tuple of tensors, as the formats take outputs."""

    def __init__(self, net: AttentionUNet) -> None:
        super().__init__()
        self.net = net

    def forward(self, image: Tensor) -> tuple[Tensor, ...]:
        logits, maps = self.net(image, return_attention=True)
        return (logits, *maps)


def _recorded(model: nn.Module, attention: bool) -> nn.Module:
    """What is recorded: the model, or with ``attention`` the model returning its maps too."""
    output_names(model, attention)  # raises for attention without maps
    return _WithAttention(model).eval() if attention else model


def _as_inputs(example: Inputs, name: str = "example") -> tuple[Tensor, ...]:
    inputs = (example,) if isinstance(example, Tensor) else tuple(example) if isinstance(example, (tuple, list)) else None
    if not inputs or not all(isinstance(t, Tensor) for t in inputs):
        raise TypeError(f"{name} must be a Tensor or a tuple of Tensors (one per input), got {type(example).__name__}")
    return inputs


def _check_model(model: nn.Module) -> None:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    training = next((name or type(model).__name__ for name, m in model.named_modules() if m.training), None)
    if training is not None:
        raise ValueError(
            f"model must be in eval mode (model.eval()): an exported model computes batch norm with the running "
            f"statistics, got {training} in training mode"
        )


def _smallest_sizes(model: nn.Module, inputs: Sequence[Tensor]) -> list[tuple[int, ...]]:
    """Per input, the smallest spatial sizes of an example that export does not fix in the graph:
    2 (sizes of 0 and 1 are specialised), a gate's ``x`` twice its subsample factor (theta's grid
    of at least 2), a network's image above ``2^(depth - 1)`` (a bottleneck of more than one voxel)."""
    smallest = [(2,) * (t.dim() - 2) for t in inputs]
    if isinstance(model, UNet):
        smallest[0] = (2 ** (model.depth - 1) + 1,) * (inputs[0].dim() - 2)
    elif _is_gate(model):
        gate = model.gates[0] if isinstance(model, MultiAttentionGate) else model
        smallest[0] = tuple(2 * k for k in gate.subsample_factor)
    return smallest


def _check_example(model: nn.Module, example: Inputs, dynamic: bool) -> tuple[Tensor, ...]:
    """``example`` as the tuple of ``model``'s inputs, checked: their number and dims; with ``dynamic``
    (export) sizes that export does not fix in the graph (:func:`_smallest_sizes`, a batch of at least 2)."""
    _check_model(model)
    inputs = _as_inputs(example)
    names = input_names(model)
    if len(inputs) != len(names):
        raise ValueError(f"example must hold {len(names)} tensor(s), {', '.join(names)}, for {type(model).__name__}; got {len(inputs)}")
    dims = _spatial_dims(model)
    for name, t in zip(names, inputs):
        if t.dim() < 3 or (dims is not None and t.dim() != dims + 2):
            want = f"{dims} spatial dims" if dims is not None else "1 to 3 spatial dims"
            raise ValueError(f"example {name} must be Tensor[N, C, *S] with {want} for {type(model).__name__}, got {list(t.shape)}")
    if not dynamic:
        return inputs
    for name, t, smallest in zip(names, inputs, _smallest_sizes(model, inputs)):
        if t.shape[0] < 2 or any(s < m for s, m in zip(t.shape[2:], smallest)):
            raise ValueError(
                f"example {name} must have a batch of at least 2 and spatial sizes of at least {list(smallest)} for "
                f"{type(model).__name__}: torch.export fixes smaller sizes in the graph (see the Deploy docs), got {list(t.shape)}"
            )
    return inputs


def dynamic_shapes(example: Inputs, multiples: Optional[Sequence[int]] = None) -> tuple[dict[int, Any], ...]:
    """:func:`torch.export.export`'s ``dynamic_shapes`` for ``example``: the batch and every spatial axis dynamic.

    Args:
        example: the inputs, ``Tensor[N, C, *S]`` or a tuple of them (a gate's ``(x, g)``).
        multiples: for a network of one input that takes only multiples of a size per spatial axis
            (nnU-Net's ``PlainConvUNet``), those sizes: the axes are then ``m * Dim("<axis>_blocks")``.

    Returns:
        One ``{axis: Dim}`` per input; axis 1 (channels) stays fixed. ``Dim.DYNAMIC`` lets the
        export find the sizes the model takes (see :doc:`/deploy` for the range of the library's).

    Example:
        >>> dynamic_shapes(torch.zeros(2, 1, 8, 8, 8), multiples=(2, 4, 4))[0][4]
        4*width_blocks
    """
    from torch.export import Dim

    inputs = _as_inputs(example)
    if multiples is None:
        return tuple({0: Dim.DYNAMIC, **{axis: Dim.DYNAMIC for axis in range(2, t.dim())}} for t in inputs)
    spatial = inputs[0].dim() - 2
    if len(inputs) != 1 or spatial not in AXES or len(multiples) != spatial:
        raise ValueError(f"multiples need one Tensor[N, C, *S] with 1 to 3 spatial dims and one multiple per spatial axis, "
                         f"got {[list(t.shape) for t in inputs]} and {list(multiples)}")  # fmt: skip
    axes = {
        2 + i: Dim(axis, min=1) if m == 1 else m * Dim(f"{axis}_blocks", min=1)
        for i, (axis, m) in enumerate(zip(AXES[spatial], multiples))
    }
    return ({0: Dim("batch", min=1), **axes},)


def _axis_names(model: nn.Module, inputs: Sequence[Tensor]) -> tuple[dict[int, Any], ...]:
    """``torch.onnx.export``'s ``dynamic_shapes`` naming the dynamic axes: ``batch`` and ``depth``,
    ``height``, ``width`` (``x_height``, ``g_height``, ... for a gate's two inputs, whose batch is one axis)."""
    from torch.export import Dim

    names = input_names(model)
    prefix = [f"{n}_" for n in names] if len(names) > 1 else [""]
    return tuple(
        {0: "batch" if i == 0 else Dim.DYNAMIC, **{2 + k: p + a for k, a in enumerate(AXES[t.dim() - 2])}}
        for i, (p, t) in enumerate(zip(prefix, inputs))
    )


def _fixed_axes(shape: Sequence[Any]) -> list[int]:
    """The axes of an exported ``Tensor[N, C, *S]`` (but the channels) whose size the export fixed."""
    return [i for i, d in enumerate(shape) if i != 1 and isinstance(d, int)]


def _check_symbolic(program, names: Sequence[str]) -> None:
    """Raise unless every batch and spatial size of the program's inputs is symbolic with no upper bound."""
    placeholders = {n.name: n for n in program.graph.nodes if n.op == "placeholder"}
    for name, user in zip(names, program.graph_signature.user_inputs):
        shape = placeholders[user].meta["val"].shape
        symbols = {s for d in shape[2:] + shape[:1] if isinstance(d, torch.SymInt) for s in d.node.expr.free_symbols}
        bounded = [s for s in symbols if s in program.range_constraints and float(program.range_constraints[s].upper) != math.inf]
        if _fixed_axes(shape) or bounded:
            raise ExportCheckError(
                f"the exported graph fixed or bounded the batch or spatial sizes of input {name!r} ({list(shape)}, ranges "
                f"{ {str(s): str(program.range_constraints[s]) for s in bounded} }): the example's sizes fix them (a larger "
                "example lifts that), or a module computes a size in Python (int() or math.ceil on a tensor's size, a "
                "branch on a size), which the export records as a constant"
            )


# ----------------------------------------------------------------------------- writing


def export_torchscript(model: nn.Module, example: Inputs, path: PathLike, *, attention: bool = False,
                       overwrite: bool = False) -> Path:  # fmt: skip
    """Trace ``model`` on ``example`` (:func:`torch.jit.trace`) and save the TorchScript module to ``path``.

    The traced module records the sizes as operations on the input's sizes, so it runs at other
    batch and spatial sizes (:func:`check_torchscript` checks that on inputs you give);
    ``torch.jit.load`` reads it without this library (MONAI Deploy, ``monai.bundle``).

    Args:
        model: the network or gate, in eval mode.
        example: its inputs, ``Tensor[N, C, *S]`` (a gate's ``(x, g)``).
        path: the file to write (atomically).
        attention: also return an Attention U-Net's maps (:func:`output_names`).
        overwrite: replace an existing ``path``.

    Returns:
        ``path``.

    Raises:
        TypeError, ValueError: a model in training mode, an example of the wrong type or dims.
        FileExistsError: ``path`` exists and ``overwrite`` is false.
    """
    path = check_output(path, overwrite, "torchscript")
    inputs = _check_example(model, example, dynamic=False)
    with torch.no_grad():
        traced = torch.jit.trace(_recorded(model, attention), inputs, check_trace=False)
    return atomic_write(path, lambda f: torch.jit.save(traced, f))


def _program(model: nn.Module, example: Inputs, attention: bool, multiples: Optional[Sequence[int]]):
    """:func:`torch.export.export` of ``model`` with dynamic sizes, checked: no batch or spatial size fixed."""
    inputs = _check_example(model, example, dynamic=True)
    with torch.no_grad():
        program = torch.export.export(_recorded(model, attention), inputs, dynamic_shapes=dynamic_shapes(inputs, multiples))
    _check_symbolic(program, input_names(model))
    return program


def export_program(model: nn.Module, example: Inputs, path: PathLike, *, attention: bool = False,
                   multiples: Optional[Sequence[int]] = None, overwrite: bool = False) -> Path:  # fmt: skip
    """Export ``model`` with :func:`torch.export.export`, dynamic batch and spatial sizes, and save the program to ``path``.

    ``torch.export.load(path).module()`` runs it; ``torch._inductor.aoti_compile_and_package``
    compiles it into an AOTInductor package (:doc:`/deploy`).

    Args:
        model, example, attention: as :func:`export_torchscript`; the example's batch and sizes
            must be at least 2 (and a network's above ``2^(depth - 1)``): export fixes sizes of 0
            and 1 (and a one-voxel bottleneck) in the program.
        multiples: see :func:`dynamic_shapes`.
        path, overwrite: the ``.pt2`` file to write (atomically), and whether to replace it.

    Raises:
        TypeError, ValueError: see :func:`export_torchscript`; also an example whose sizes the export would fix.
        ExportCheckError: the program fixed a batch or spatial size.
        FileExistsError: ``path`` exists and ``overwrite`` is false.
    """
    path = check_output(path, overwrite, "program")
    program = _program(model, example, attention, multiples)
    return atomic_write(path, lambda f: torch.export.save(program, f))


def onnx_model(model: nn.Module, example: Inputs, *, attention: bool = False, multiples: Optional[Sequence[int]] = None,
               opset: int = DEFAULT_OPSET, metadata: Optional[Mapping[str, Any]] = None):  # fmt: skip
    """``torch.onnx.export(..., dynamo=True)`` of ``model`` with dynamic batch and spatial sizes, in memory.

    The ONNX model's inputs and outputs are named by :func:`input_names` and :func:`output_names`,
    its dynamic axes ``batch``, ``depth``, ``height``, ``width`` (or ``<m>*<axis>_blocks`` with
    ``multiples``); its metadata properties hold ``metadata`` (JSON values) and
    ``attention_gates.version``.

    Returns:
        The ``onnx.ModelProto``.

    Raises:
        ImportError: onnx, onnxscript or onnxruntime is missing.
        ValueError: an opset before 18; see also :func:`export_program`.
        ExportCheckError: the exported graph fixed a batch or spatial size of an input or output.
    """
    check_opset(opset)
    inputs = _check_example(model, example, dynamic=True)
    require_export_packages()
    shapes = dynamic_shapes(inputs, multiples) if multiples is not None else _axis_names(model, inputs)
    with torch.no_grad():
        exported = torch.onnx.export(
            _recorded(model, attention), inputs, dynamo=True, dynamic_shapes=shapes, input_names=list(input_names(model)),
            output_names=list(output_names(model, attention)), opset_version=opset, verbose=False,
        )  # fmt: skip
    _check_symbolic(exported.exported_program, input_names(model))
    proto = exported.model_proto
    for value in proto.graph.output:
        dims = [d.dim_value if d.HasField("dim_value") else d.dim_param for d in value.type.tensor_type.shape.dim]
        if _fixed_axes(dims):
            raise ExportCheckError(f"the ONNX graph fixed the batch or spatial sizes of output {value.name!r} ({dims})")
    for key, value in {**(metadata or {}), "attention_gates.version": __version__}.items():
        proto.metadata_props.add(key=key, value=json.dumps(value))
    return proto


def export_onnx(model: nn.Module, example: Inputs, path: PathLike, *, attention: bool = False,
                multiples: Optional[Sequence[int]] = None, opset: int = DEFAULT_OPSET,
                metadata: Optional[Mapping[str, Any]] = None, overwrite: bool = False) -> Path:  # fmt: skip
    """Export ``model`` to ONNX with dynamic batch and spatial sizes (:func:`onnx_model`) and write it to ``path`` (atomically).

    ONNX Runtime runs it at other sizes, odd ones included (:func:`check_onnx` checks inputs you
    give); TensorRT and other ONNX runtimes take the same file.

    Raises:
        FileExistsError: ``path`` exists and ``overwrite`` is false; see also :func:`onnx_model`.
    """
    path = check_output(path, overwrite, "onnx")
    proto = onnx_model(model, example, attention=attention, multiples=multiples, opset=opset, metadata=metadata)
    return atomic_write(path, proto.SerializeToString())


# ----------------------------------------------------------------------------- checking


def _calls(inputs: Union[Inputs, Sequence[Inputs]]) -> list[tuple[Tensor, ...]]:
    """``inputs`` as a list of calls: a Tensor or a tuple of Tensors is one call, a list holds several."""
    if isinstance(inputs, list):
        return [_as_inputs(call, "inputs") for call in inputs]
    return [_as_inputs(inputs, "inputs")]


def allowed_difference(output: Tensor, tolerance: float = TOLERANCE) -> float:
    """The largest absolute difference from the eager ``output`` that a check accepts: ``tolerance``
    times its largest absolute value, taken as at least 1."""
    return tolerance * max(1.0, float(output.abs().max()) if output.numel() else 0.0)


def _compare(runtime: str, run: Callable[[tuple[Tensor, ...]], Sequence[Any]], model: nn.Module,
             inputs: Union[Inputs, Sequence[Inputs]], attention: bool, tolerance: float) -> float:  # fmt: skip
    """The largest ``|run(call) - model(call)|`` over every output and call; raises beyond the tolerance."""
    _check_model(model)
    names = output_names(model, attention)
    eager = _recorded(model, attention)
    worst = 0.0
    for call in _calls(inputs):
        shapes = ", ".join(f"Tensor{list(t.shape)}" for t in call)
        with torch.no_grad():
            want = eager(*call)
        want = (want,) if isinstance(want, Tensor) else tuple(want)
        try:
            got = run(call)
        except Exception as e:  # noqa: BLE001 -- the runtimes' errors share no base class
            raise ExportCheckError(f"{runtime} could not run the exported model on {shapes}: {e}") from None
        got = (got,) if isinstance(got, Tensor) else tuple(got)
        if len(got) != len(want):
            raise ExportCheckError(f"{runtime} gave {len(got)} outputs on {shapes}; the model gives {len(want)}, {', '.join(names)}")
        for name, g, w in zip(names, got, want):
            g = torch.as_tensor(g)
            if tuple(g.shape) != tuple(w.shape):
                raise ExportCheckError(f"{runtime} gave {name} of shape {list(g.shape)} on {shapes}; the model gives {list(w.shape)}")
            difference = float((g.to(w.dtype) - w).abs().max()) if w.numel() else 0.0
            allowed = allowed_difference(w, tolerance)
            if not difference <= allowed:
                raise ExportCheckError(f"{runtime}'s {name} differ from the PyTorch model's by up to {difference:.3g} on "
                                       f"{shapes} (tolerance {allowed:.3g})")  # fmt: skip
            worst = max(worst, difference)
    return worst


def check_torchscript(path: PathLike, model: nn.Module, inputs: Union[Inputs, Sequence[Inputs]], *,
                      attention: bool = False, tolerance: float = TOLERANCE) -> float:  # fmt: skip
    """Load a TorchScript file (``torch.jit.load``) and compare it with ``model`` on ``inputs``.

    Args:
        path: the file :func:`export_torchscript` wrote.
        model: the eager model it was exported from (eval mode).
        inputs: one call's inputs (a Tensor, or a tuple of Tensors for a gate), or a list of
            calls, e.g. at other sizes than the export's.
        attention: whether it was exported with ``attention``.
        tolerance: the largest difference accepted, as a fraction of the largest absolute output
            (taken as at least 1).

    Returns:
        The largest absolute difference over every output and call.

    Raises:
        ExportCheckError: the model cannot run an input, or an output differs in shape or beyond the tolerance.
    """
    loaded = torch.jit.load(str(path))
    with torch.no_grad():
        return _compare("TorchScript", lambda call: loaded(*call), model, inputs, attention, tolerance)


def check_program(path: PathLike, model: nn.Module, inputs: Union[Inputs, Sequence[Inputs]], *,
                  attention: bool = False, tolerance: float = TOLERANCE) -> float:  # fmt: skip
    """Load a ``torch.export`` program (``torch.export.load``) and compare it with ``model`` on ``inputs``
    (arguments, result and errors as :func:`check_torchscript`)."""
    module = torch.export.load(str(path)).module()
    with torch.no_grad():
        return _compare("the torch.export program", lambda call: module(*call), model, inputs, attention, tolerance)


def check_onnx(source: Any, model: nn.Module, inputs: Union[Inputs, Sequence[Inputs]], *,
               attention: bool = False, tolerance: float = TOLERANCE) -> float:  # fmt: skip
    """Run an ONNX model in ONNX Runtime (CPU, PyTorch's thread count) and compare it with ``model`` on ``inputs``.

    ``source`` is the ``.onnx`` file, its bytes or an ``onnx.ModelProto``; its outputs must be
    :func:`output_names`. Other arguments, result and errors as :func:`check_torchscript`; an
    ``ImportError`` names the ``export`` extra when onnxruntime is missing.
    """
    require_export_packages()
    import onnxruntime as ort

    if hasattr(source, "SerializeToString"):
        source = source.SerializeToString()
    options = ort.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    try:
        session = ort.InferenceSession(source if isinstance(source, bytes) else str(source), options,
                                       providers=["CPUExecutionProvider"])  # fmt: skip
    except Exception as e:  # noqa: BLE001 -- onnxruntime's errors share no base class
        raise ExportCheckError(f"ONNX Runtime could not load the exported model: {e}") from None
    names = output_names(model, attention)
    have = tuple(o.name for o in session.get_outputs())
    if have != names:
        raise ExportCheckError(
            f"the ONNX model's outputs are {list(have)}; {type(model).__name__} with attention={attention} gives {list(names)}"
        )
    feeds = [i.name for i in session.get_inputs()]

    def run(call: tuple[Tensor, ...]) -> list:
        return session.run(list(names), {name: t.detach().cpu().numpy() for name, t in zip(feeds, call)})

    return _compare("ONNX Runtime", run, model, inputs, attention, tolerance)
