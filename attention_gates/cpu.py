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
from .ops.cpu import conv, conv1x1, multi_gate_inference_cpu, onednn_applies

__all__ = ["optimize_for_inference", "OneDNNConv3d", "FoldedMultiAttentionGate"]

_CHANNELS_LAST = {4: torch.channels_last, 5: torch.channels_last_3d}


class OneDNNConv3d(nn.Conv3d):
    """:class:`torch.nn.Conv3d` that takes oneDNN for single CPU volumes and matrix products for 1x1x1 kernels.

    For float32 CPU inputs (oneDNN available and enabled, ``torch.backends.mkldnn``; outside
    :func:`torch.compile` and dispatch modes, which see ``aten.convolution``): a 1x1x1
    convolution (stride 1, one group) of any batch is :func:`attention_gates.ops.cpu.conv1x1`; any
    other convolution of one volume is oneDNN's (:func:`attention_gates.ops.cpu.conv`). Everything
    else is :class:`nn.Conv3d`'s. Same parameters, state dict and results up to float32 rounding.
    """

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


class FoldedMultiAttentionGate(MultiAttentionGate):
    """A :class:`~attention_gates.gates.MultiAttentionGate` whose output side was folded once into one affine map.

    ``forward`` computes ``relu(c + sum_i alpha_i * (A_i x))`` per voxel
    (:meth:`~attention_gates.gates.MultiAttentionGate.folded_output_map`, kept as the buffers ``A``
    and ``c``, which are not part of the state dict) with
    :func:`~attention_gates.ops.cpu.multi_gate_inference_cpu`: one product over the skip instead of
    one per head, a concatenation and a product over it. Made by :func:`optimize_for_inference`;
    float32 CPU tensors, evaluation mode, no gradients.

    Shapes: as :class:`~attention_gates.gates.MultiAttentionGate`.
    """

    A: Tensor
    c: Tensor

    @classmethod
    def fold(cls, block: MultiAttentionGate) -> Optional["FoldedMultiAttentionGate"]:
        """``block`` itself, turned into this class with its map folded, or ``None`` (left as it
        was) when its output side has no evaluation-mode affine form."""
        folded = block.folded_output_map()
        if folded is None or any(gate.sigma2 != "sigmoid" for gate in block.gates):
            return None
        block.__class__ = cls
        block.register_buffer("A", folded[0].detach(), persistent=False)
        block.register_buffer("c", folded[1].detach(), persistent=False)
        return block

    def forward(self, x: Tensor, g: Tensor) -> tuple[Tensor, Tensor]:
        if self.training:
            raise RuntimeError(
                "FoldedMultiAttentionGate is for inference (made by attention_gates.cpu.optimize_for_inference): "
                "its output map was folded from the weights once; train the original model instead"
            )
        if torch.is_grad_enabled() and any(t.requires_grad for t in (x, g)):
            raise RuntimeError("FoldedMultiAttentionGate has no backward: call it under torch.no_grad() or torch.inference_mode()")
        for name, t in (("x", x), ("g", g)):
            if t.device.type != "cpu" or t.dtype != torch.float32:
                raise ValueError(f"FoldedMultiAttentionGate runs float32 CPU tensors, got {name} {t.dtype} on {t.device}")
        heads = [(gt.theta.weight, gt.phi.weight, gt.phi.bias, gt.psi.weight, gt.psi.bias) for gt in self.gates]
        gate = self.gates[0]
        with torch.no_grad():
            return multi_gate_inference_cpu(x, g, heads, self.A, self.c, sigma1=gate.sigma1, align_corners=gate.align_corners)


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
    for m in model.modules():
        if onednn and type(m) is nn.Conv3d:
            m.__class__ = OneDNNConv3d
        if fold and type(m) is MultiAttentionGate:
            FoldedMultiAttentionGate.fold(m)
    if channels_last:
        for t in [*model.parameters(), *model.buffers()]:
            if t.dim() in _CHANNELS_LAST:
                t.data = t.data.contiguous(memory_format=_CHANNELS_LAST[t.dim()])
    return model
