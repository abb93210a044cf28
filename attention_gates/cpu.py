"""CPU inference made faster by explicit transforms of a trained model.

Nothing in the library's modules does CPU-specific work on its own: a plain
:class:`~attention_gates.nets.AttentionUNet3D` is plain ``nn.Conv3d`` layers and gates that
choose their implementation by measurement (``"auto"``). :func:`optimize_for_inference` returns
a copy of a trained model rewritten for CPU inference with frozen weights, in three steps that
can be turned off one by one (see the documentation's CPU guide for what each gains):

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

The transformed model is for inference: it refuses training mode and gradients (fold) and keeps
the state-dict keys of the original, so that weights load into either. Change weights on the
original model and transform it again.
"""

from __future__ import annotations

import copy
from typing import Optional

import torch
from torch import Tensor, nn

from .gates import MultiAttentionGate
from .ops.cpu_gate import multi_gate_inference_cpu
from .ops.layout import CHANNELS_LAST
from .ops.onednn import conv, conv1x1, onednn_applies
from .ops.reference import GateWeights

__all__ = ["optimize_for_inference", "OneDNNConv3d", "FoldedMultiAttentionGate"]


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
        if self.training:
            raise RuntimeError(
                "FoldedMultiAttentionGate is for inference (made by attention_gates.cpu.optimize_for_inference): "
                "its output map was folded from the weights once; train the original model instead"
            )
        if torch.is_grad_enabled() and any(t.requires_grad for t in (x, g)):
            raise RuntimeError("FoldedMultiAttentionGate has no backward: call it under torch.no_grad() or torch.inference_mode()")
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


def optimize_for_inference(model: nn.Module, *, onednn: bool = True, channels_last: bool = True, fold: bool = True) -> nn.Module:
    """A copy of ``model``, in evaluation mode with frozen weights, rewritten for CPU inference.

    Args:
        model: any module holding the library's layers (a :class:`~attention_gates.nets.UNet`, an
            :class:`~attention_gates.nets.AttentionUNet`, a block, or your own network).
        onednn: ``nn.Conv3d`` -> :class:`OneDNNConv3d`.
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
    if onednn:
        model = _replaced(model, lambda m: OneDNNConv3d.from_conv(m) if type(m) is nn.Conv3d else None)
    if channels_last:
        for t in [*model.parameters(), *model.buffers()]:
            if t.dim() in CHANNELS_LAST:
                t.data = t.data.contiguous(memory_format=CHANNELS_LAST[t.dim()])
    return model
