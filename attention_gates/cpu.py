"""CPU inference made faster by explicit transforms of a trained model.

Nothing in the library's modules does CPU-specific work on its own: a plain
:class:`~attention_gates.nets.AttentionUNet3D` is plain ``nn.Conv3d`` layers and gates that
choose their implementation by measurement (``"auto"``). :func:`optimize_for_inference` returns
a copy of a trained model rewritten for CPU inference with frozen weights, in four steps that
can be turned off one by one (see the documentation's CPU guide for what each gains):

- ``fuse``: every convolution followed, in an ``nn.Sequential``, by a batch norm with running
  statistics and/or a ReLU becomes a :class:`FusedConv`: the norm folded into the convolution's
  weight and bias once, at transform time, the ReLU done in place on its output (or, with
  ``relu_epilogue``, by oneDNN as the convolution's epilogue, which turns NaN into 0), and the
  weight packed into oneDNN's own layout once per input shape instead of on every call (what ONNX
  Runtime does to the same graph); the norm and the ReLU stay in their places as
  :class:`FusedAway` layers that keep their state-dict entries;
- ``onednn``: every ``nn.Conv3d`` becomes a :class:`OneDNNConv3d`, which sends single volumes to
  oneDNN (PyTorch's rule for choosing its CPU convolution was written for 2D batches and leaves
  many 3D layers of batch 1 on a slow loop) and 1x1x1 convolutions to matrix products;
- ``channels_last``: the parameters in the channels-last memory format, so that the activations
  follow (3D: ``torch.channels_last_3d``);
- ``fold``: every :class:`~attention_gates.gates.MultiAttentionGate` whose output side is affine
  in evaluation (``W``'s and ``combine``'s norms batch norms with running statistics, or none)
  becomes a :class:`FoldedMultiAttentionGate`: the heads' output transforms, the fusing 1x1
  convolution and its norm folded once, at transform time, into one map applied in one pass over
  the skip.

The transformed model is for inference: it refuses training mode and gradients (fuse, fold) and
keeps the state-dict keys of the original, so that weights load into either. Change weights on the
original model and transform it again. Its fast paths are eager PyTorch: under
:func:`torch.jit.trace`, :func:`torch.export.export` (and so ONNX's exporter) and
:func:`torch.compile` every module computes the same values with standard operators (the folded
weights, the gated blocks as built), which those record, so :mod:`attention_gates.deploy` exports
it with dynamic sizes as it exports the original; the exported graph gains nothing from the
transform (ONNX Runtime and AOTInductor fold and fuse on their own), so export the original.
"""

from __future__ import annotations

import copy
from collections import Counter
from typing import Optional

import torch
from torch import Tensor, nn

from .gates import GridAttentionGate, MultiAttentionGate
from .ops.cpu_gate import multi_gate_inference_cpu
from .ops.layout import CHANNELS_LAST
from .ops.onednn import conv, conv1x1, conv_relu, fused_ops_available, is_recording, onednn_applies, pack_weight
from .ops.reference import GateWeights

__all__ = ["optimize_for_inference", "FusedConv", "FusedAway", "OneDNNConv3d", "FoldedMultiAttentionGate"]

_NORM_AFTER = {nn.Conv2d: nn.BatchNorm2d, nn.Conv3d: nn.BatchNorm3d}  # the batch norm FusedConv folds after each conv


def _check_inference(module: nn.Module, *inputs: Tensor) -> None:
    """The refusals of a module whose weights were folded at transform time: training mode and gradients."""
    name = type(module).__name__
    if module.training:
        raise RuntimeError(
            f"{name} is for inference (made by attention_gates.cpu.optimize_for_inference): "
            "its weights were folded once at transform time; train the original model instead"
        )
    if torch.is_grad_enabled() and any(t.requires_grad for t in inputs):
        raise RuntimeError(f"{name} has no backward: call it under torch.no_grad() or torch.inference_mode()")


class FusedConv(nn.Module):
    """A convolution with the batch norm and the ReLU after it in one oneDNN call, for CPU inference.

    Made from an ``nn.Conv2d``/``nn.Conv3d`` (zero padding), optionally the
    ``nn.BatchNorm2d``/``nn.BatchNorm3d`` after it (evaluation mode, running statistics) and
    optionally an ``nn.ReLU`` after that:

    - the norm is folded into the weight and bias once (in float64, stored in the weight's dtype as
      the buffers ``fused_weight`` and ``fused_bias``, which are not in the state dict);
    - the ReLU is an in-place ``relu_`` on the convolution's output, or, with ``relu_epilogue``,
      oneDNN's epilogue of the convolution (:func:`attention_gates.ops.onednn.conv_relu`): one pass
      over the output less, but oneDNN's ReLU turns a NaN into 0 where ``torch.relu`` (and ONNX
      Runtime) keep it, so a NaN in the input no longer shows in the output;
    - for channels-last inputs, the weight is reordered into oneDNN's own layout once per input
      shape (:func:`attention_gates.ops.onednn.pack_weight`; the last ``PACKED_SHAPES`` (4) shapes
      are kept, outside the state dict) instead of on every call.

    1x1 convolutions (stride 1, one group) are :func:`~attention_gates.ops.onednn.conv1x1` and an
    in-place ReLU. Inputs that oneDNN does not take, and code being recorded (tracing, export,
    :func:`torch.compile`), get ``F.conv2d/3d`` with the folded weights and ``relu_``. It holds the
    convolution's own ``weight`` and ``bias`` (its state-dict entries); the norm's stay with a
    :class:`FusedAway` in the norm's place. Evaluation mode, no gradients.

    Shapes: ``Tensor[N, in_channels, *S]`` -> ``Tensor[N, out_channels, *S_out]``, the convolution's.
    """

    PACKED_SHAPES = 4
    fused_weight: Tensor
    fused_bias: Tensor

    def __init__(self, conv: nn.Module, norm: Optional[nn.Module] = None, relu: bool = False, relu_epilogue: bool = False) -> None:
        super().__init__()
        if type(conv) not in _NORM_AFTER or conv.padding_mode != "zeros" or isinstance(conv.padding, str):
            raise TypeError(f"FusedConv takes an nn.Conv2d or nn.Conv3d with zero padding of ints, got {conv!r}")
        if norm is not None and not _folds_into(norm, conv):
            raise ValueError(f"FusedConv folds a {_NORM_AFTER[type(conv)].__name__} of {conv.out_channels} channels "
                             f"with running statistics, in evaluation mode, got {norm!r}")  # fmt: skip
        self.spatial_dims = conv.weight.dim() - 2
        self.in_channels, self.out_channels, self.kernel_size = conv.in_channels, conv.out_channels, conv.kernel_size
        self.stride, self.padding, self.dilation, self.groups = conv.stride, conv.padding, conv.dilation, conv.groups
        self.weight = conv.weight
        self.register_parameter("bias", conv.bias)
        self.norm = None if norm is None else type(norm).__name__
        self.relu, self.relu_epilogue = relu, relu and relu_epilogue
        w, b = conv.weight.detach(), conv.bias.detach() if conv.bias is not None else None
        if norm is not None:
            w, b = nn.utils.fuse_conv_bn_weights(
                w.double(), None if b is None else b.double(), norm.running_mean.double(), norm.running_var.double(), norm.eps,
                None if norm.weight is None else norm.weight.double(), None if norm.bias is None else norm.bias.double(),
            )  # fmt: skip
        dtype = conv.weight.dtype
        self.register_buffer("fused_weight", w.detach().to(dtype).contiguous(memory_format=_layout_of(conv.weight)), persistent=False)
        self.register_buffer("fused_bias", None if b is None else b.detach().to(dtype), persistent=False)
        self._packed: dict[tuple[int, ...], Tensor] = {}
        self.train(conv.training)

    def forward(self, x: Tensor) -> Tensor:
        _check_inference(self, x)
        if self.kernel_size == self.stride == self.dilation == (1,) * self.spatial_dims and self.groups == 1:
            y, relu_done = conv1x1(x, self.fused_weight, self.fused_bias), False
        else:
            y = conv_relu(
                x, self.fused_weight, self.fused_bias, self.stride, self.padding, self.dilation, self.groups,
                relu=self.relu_epilogue, packed=self._packed_weight(x),
            )  # fmt: skip
            relu_done = self.relu_epilogue
        return y.relu_() if self.relu and not relu_done else y

    def _packed_weight(self, x: Tensor) -> Optional[Tensor]:
        """``fused_weight`` in oneDNN's layout for ``x``'s shape, made on the first call with that
        shape; ``None`` where oneDNN does not take ``x``, or ``x`` is not stored channels-last (a
        packed weight gives a channels-last output; a contiguous input keeps torch's rule)."""
        if not (onednn_applies(x) and fused_ops_available()) or self.fused_weight.dtype != x.dtype:
            return None
        if not x.is_contiguous(memory_format=CHANNELS_LAST[x.dim()]):
            return None
        key = tuple(x.shape)
        packed = self._packed.get(key)
        if packed is None:
            packed = pack_weight(self.fused_weight, key, self.stride, self.padding, self.dilation, self.groups)
            while len(self._packed) >= self.PACKED_SHAPES:
                self._packed.pop(next(iter(self._packed)), None)  # the oldest shape
            self._packed[key] = packed
        return packed

    def __deepcopy__(self, memo: dict) -> "FusedConv":
        """A copy without the packed weights (oneDNN's opaque tensors do not copy; they are remade on use)."""
        new = self.__class__.__new__(self.__class__)
        memo[id(self)] = new
        for k, v in self.__dict__.items():
            new.__dict__[k] = {} if k == "_packed" else copy.deepcopy(v, memo)
        return new

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
                f"padding={self.padding}, dilation={self.dilation}, groups={self.groups}, bias={self.bias is not None}, "
                f"norm={self.norm}, relu={self.relu}, relu_epilogue={self.relu_epilogue}")  # fmt: skip


class FusedAway(nn.Module):
    """A layer whose computation the :class:`FusedConv` before it does: returns its input.

    It keeps the layer's parameters and buffers under their own names, so that the transformed
    model's state dict has the original's keys (and the original's state dict loads into it), and
    prints the layer it stands for. Shapes: ``Tensor[N, C, *S]`` -> the same tensor.
    """

    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        kept = layer.state_dict(keep_vars=True)
        for name, p in layer.named_parameters(recurse=False):
            self.register_parameter(name, p)
        for name, b in layer.named_buffers(recurse=False):
            self.register_buffer(name, b, persistent=name in kept)
        self.layer = repr(layer)
        self.train(layer.training)

    def forward(self, x: Tensor) -> Tensor:
        return x

    def extra_repr(self) -> str:
        return f"{self.layer}, done by the FusedConv before it"


class OneDNNConv3d(nn.Conv3d):
    """:class:`torch.nn.Conv3d` that takes oneDNN for single CPU volumes and matrix products for 1x1x1 kernels.

    For float32 CPU inputs (oneDNN available and enabled, ``torch.backends.mkldnn``; outside
    :func:`torch.compile` and dispatch modes, which see ``aten.convolution``): a 1x1x1
    convolution (stride 1, one group) of any batch is :func:`attention_gates.ops.onednn.conv1x1`; any
    other convolution of one volume is oneDNN's (:func:`attention_gates.ops.onednn.conv`). Everything
    else is :class:`nn.Conv3d`'s. Same parameters, state dict and results up to float32 rounding.
    """

    @classmethod
    def from_conv(cls, conv: nn.Conv3d) -> "OneDNNConv3d":
        """A :class:`OneDNNConv3d` holding ``conv``'s own parameters (the same tensors, so the same
        state-dict entries) and settings."""
        new = cls(
            conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding, conv.dilation, conv.groups,
            conv.bias is not None, conv.padding_mode, device="meta",
        )  # fmt: skip
        new.weight, new.bias = conv.weight, conv.bias
        return new.train(conv.training)

    def _conv_forward(self, input: Tensor, weight: Tensor, bias: Optional[Tensor]) -> Tensor:
        if input.dim() == 5 and self.padding_mode == "zeros" and not isinstance(self.padding, str) and onednn_applies(input):
            if self._pointwise and weight.dtype == torch.float32:
                return conv1x1(input, weight, bias)
            if input.shape[0] == 1:
                return conv(input, weight, bias, self.stride, self.padding, self.dilation, self.groups)
        return super()._conv_forward(input, weight, bias)

    @property
    def _pointwise(self) -> bool:
        return self.kernel_size == self.stride == self.dilation == (1, 1, 1) and self.padding == (0, 0, 0) and self.groups == 1


class FoldedMultiAttentionGate(nn.Module):
    """A :class:`~attention_gates.gates.MultiAttentionGate` whose output side was folded once into one affine map.

    ``forward`` computes ``relu(c + sum_i alpha_i * (A_i x))`` per voxel
    (:meth:`~attention_gates.gates.MultiAttentionGate.folded_output_map`, kept as the buffers ``A``
    and ``c``, which are not part of the state dict) with
    :func:`~attention_gates.ops.cpu_gate.multi_gate_inference_cpu`: one product over the skip instead of
    one per head, a concatenation and a product over it. Made by :meth:`fold` (which
    :func:`optimize_for_inference` calls); float32 CPU tensors, evaluation mode, no gradients. It
    holds the block's ``gates`` and ``combine``, so its state dict is the block's. A skip holding
    an infinity (or NaN) is computed as the block computes it (head by head, then ``combine``):
    there a sum of infinities of both signs, which the fold may not form, is NaN.

    Shapes: as :class:`~attention_gates.gates.MultiAttentionGate`.
    """

    A: Tensor
    c: Tensor

    def __init__(self, block: MultiAttentionGate, A: Tensor, c: Tensor) -> None:
        super().__init__()
        self.heads = block.heads
        self.gates = block.gates
        self.combine = block.combine
        self.register_buffer("A", A.detach(), persistent=False)
        self.register_buffer("c", c.detach(), persistent=False)
        self.train(block.training)

    @classmethod
    def fold(cls, block: MultiAttentionGate) -> Optional["FoldedMultiAttentionGate"]:
        """``block`` with its output map folded (sharing its modules and parameters), or ``None``
        when its output side has no evaluation-mode affine form."""
        folded = block.folded_output_map()
        if folded is None or any(gate.sigma2 != "sigmoid" for gate in block.gates):
            return None
        return cls(block, *folded)

    def forward(self, x: Tensor, g: Tensor) -> tuple[Tensor, Tensor]:
        _check_inference(self, x, g)
        if is_recording():  # tracing or export: the block as built, which they can record (its gates' "auto" takes the reference)
            return MultiAttentionGate.forward(self, x, g)
        for name, t in (("x", x), ("g", g)):
            if t.device.type != "cpu":
                raise ValueError(f"FoldedMultiAttentionGate runs CPU tensors, got {name} on {t.device}")
            if t.dtype != torch.float32:
                raise TypeError(f"FoldedMultiAttentionGate runs float32 tensors, got {name} of dtype {t.dtype}")
        with torch.no_grad():
            if not torch.isfinite(x.sum()):  # an infinity (or NaN) in x: the fold sums in one step what the block
                # sums in two, and inf - inf is NaN only there (the sum: 25x faster than isinf(x).any() here)
                return MultiAttentionGate.forward(self, x, g)  # the block's own computation: it reads only gates and combine
            heads = [GateWeights(gt.theta.weight, gt.phi.weight, gt.phi.bias, gt.psi.weight, gt.psi.bias) for gt in self.gates]
            gate = self.gates[0]
            return multi_gate_inference_cpu(x, g, heads, self.A, self.c, sigma1=gate.sigma1, align_corners=gate.align_corners)


_GATES = (GridAttentionGate, MultiAttentionGate, FoldedMultiAttentionGate)  # modules that _fuse leaves as they are


def _replaced(model: nn.Module, make) -> nn.Module:
    """``model`` with every submodule ``m`` for which ``make(m)`` returns a module replaced by it,
    installed with :meth:`torch.nn.Module.set_submodule` (a module reached by several names is
    made once); ``model`` itself when ``make`` takes it."""
    made: dict[int, Optional[nn.Module]] = {}
    for name, m in list(model.named_modules(remove_duplicate=False)):
        if id(m) not in made:
            made[id(m)] = make(m)
        if made[id(m)] is None:
            continue
        if not name:
            return made[id(m)]
        model.set_submodule(name, made[id(m)])
    return model


def _layout_of(t: Tensor) -> torch.memory_format:
    """The memory format ``t`` is stored in: channels-last (4 or 5 dims) or contiguous."""
    fmt = CHANNELS_LAST.get(t.dim())
    return fmt if fmt is not None and not t.is_contiguous() and t.is_contiguous(memory_format=fmt) else torch.contiguous_format


def _folds_into(norm: nn.Module, conv: nn.Module) -> bool:
    """Whether ``norm`` is a batch norm that :class:`FusedConv` folds into ``conv``: the kind for
    ``conv``'s dims, ``conv``'s output channels, running statistics, evaluation mode."""
    return (
        type(norm) is _NORM_AFTER.get(type(conv))
        and not norm.training
        and norm.running_mean is not None
        and norm.num_features == conv.out_channels
    )


def _fuse_runs(seq: nn.Sequential, shared: set[int], relu_epilogue: bool) -> None:
    """In ``seq``, every convolution followed by a foldable batch norm and/or a ReLU (``nn.Identity``
    layers between them skipped) -> :class:`FusedConv`, the norm and the ReLU -> :class:`FusedAway`.
    Convolutions whose ``id`` is in ``shared`` (reached by several names) stay one module: not fused."""
    layers = list(seq)

    def after_identities(j: int) -> int:
        while j < len(layers) and type(layers[j]) is nn.Identity:
            j += 1
        return j

    i = 0
    while i < len(layers):
        conv, norm, relu = layers[i], None, None
        j = i + 1
        if type(conv) in _NORM_AFTER and id(conv) not in shared and conv.padding_mode == "zeros" and not isinstance(conv.padding, str):
            j = after_identities(j)
            if j < len(layers) and _folds_into(layers[j], conv):
                norm, j = j, after_identities(j + 1)
            if j < len(layers) and type(layers[j]) is nn.ReLU:
                relu, j = j, j + 1
        if norm is None and relu is None:
            i += 1
            continue
        seq[i] = FusedConv(conv, None if norm is None else layers[norm], relu=relu is not None, relu_epilogue=relu_epilogue)
        for k in (norm, relu):
            if k is not None:
                seq[k] = FusedAway(layers[k])
        i = j


def _fuse(model: nn.Module, relu_epilogue: bool) -> nn.Module:
    """:func:`_fuse_runs` on every ``nn.Sequential`` of ``model`` outside the gates (which read
    their own ``W``'s convolution and norm by position), leaving a convolution that several names
    reach as it is (fusing it at one place would split it in two)."""
    gated = {id(m) for gate in model.modules() if isinstance(gate, _GATES) for m in gate.modules()}
    reached = Counter(id(m) for _, m in model.named_modules(remove_duplicate=False))
    shared = {k for k, n in reached.items() if n > 1}
    for seq in list(model.modules()):
        if isinstance(seq, nn.Sequential) and id(seq) not in gated:
            _fuse_runs(seq, shared, relu_epilogue)
    return model


def optimize_for_inference(
    model: nn.Module,
    *,
    fuse: bool = True,
    relu_epilogue: bool = False,
    onednn: bool = True,
    channels_last: bool = True,
    fold: bool = True,
) -> nn.Module:
    """A copy of ``model``, in evaluation mode with frozen weights, rewritten for CPU inference.

    Args:
        model: any module holding the library's layers (a :class:`~attention_gates.nets.UNet`, an
            :class:`~attention_gates.nets.AttentionUNet`, a block, or your own network).
        fuse: convolution -> batch norm -> ReLU runs (either of the last two may be missing) of
            every ``nn.Sequential`` outside the gates -> :class:`FusedConv` and :class:`FusedAway`.
        relu_epilogue: with ``fuse``, the ReLU of each fused run done by oneDNN as the
            convolution's epilogue rather than in place after it (1x1 convolutions, which are
            matrix products, keep the in-place ReLU): one pass less per layer, but a NaN reaching such a
            ReLU becomes 0 (oneDNN's ReLU), where the model as built (``torch.relu``) and ONNX
            Runtime keep it, so a NaN in the input no longer shows in the output. Off by default.
        onednn: the remaining ``nn.Conv3d`` -> :class:`OneDNNConv3d`.
        channels_last: parameters of 4 or 5 dims in the channels-last memory format.
        fold: :class:`~attention_gates.gates.MultiAttentionGate` -> :class:`FoldedMultiAttentionGate`
            where its output side is affine in evaluation.

    Returns:
        The transformed copy (``model`` itself is left as it was). Feed it float32 CPU tensors,
        under :func:`torch.inference_mode`; its state dict has the original's keys.

    Example:
        >>> import torch
        >>> from attention_gates import AttentionUNet3D
        >>> from attention_gates.cpu import optimize_for_inference
        >>> net = AttentionUNet3D(filters=[4, 8, 16, 32]).eval()
        >>> fast = optimize_for_inference(net)
        >>> x = torch.randn(1, 1, 24, 24, 24)
        >>> with torch.inference_mode():
        ...     torch.allclose(fast(x), net(x), atol=1e-4)
        True
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    model = copy.deepcopy(model).eval().requires_grad_(False)
    if fold:  # first: the folded map is computed from the parameters in their own layout
        model = _replaced(model, lambda m: FoldedMultiAttentionGate.fold(m) if type(m) is MultiAttentionGate else None)
    if fuse:
        model = _fuse(model, relu_epilogue)
    if onednn:
        model = _replaced(model, lambda m: OneDNNConv3d.from_conv(m) if type(m) is nn.Conv3d else None)
    if channels_last:
        for t in [*model.parameters(), *model.buffers()]:
            if t.dim() in CHANNELS_LAST:
                t.data = t.data.contiguous(memory_format=CHANNELS_LAST[t.dim()])
    return model
