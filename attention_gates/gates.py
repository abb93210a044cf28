"""Grid attention gates: the modules that hold the parameters of :func:`~attention_gates.functional.grid_attention`."""

from __future__ import annotations

from typing import Optional, Sequence, Union

import torch
from torch import Tensor, nn

from . import functional as AF
from .ops.cpu import conv, conv1x1, multi_gate_inference_cpu, onednn_applies
from .ops.dispatch import _check_name, chosen

__all__ = [
    "GridAttentionGate",
    "GridAttentionGate2D",
    "GridAttentionGate3D",
    "MultiAttentionGate",
    "conv_nd",
    "Conv3d",
    "norm_nd",
    "as_tuple",
]

Factor = Union[int, Sequence[int]]


def conv_nd(spatial_dims: int) -> type[nn.Module]:
    """``nn.Conv1d``/``nn.Conv2d``/:class:`Conv3d` for ``spatial_dims`` 1, 2 or 3."""
    _check_dims(spatial_dims)
    return (nn.Conv1d, nn.Conv2d, Conv3d)[spatial_dims - 1]


class Conv3d(nn.Conv3d):
    """:class:`torch.nn.Conv3d` that takes oneDNN on the CPU for a single volume.

    PyTorch picks its CPU convolution by a rule written for 2D: with batch 1 and kernels of
    at most 3 it takes oneDNN only when ``N * C * D * H > 20480``, which leaves many layers
    of a 3D U-Net at batch 1 (for example ``Tensor[1, 16, 32, 32, 32]`` with a 3x3x3 kernel)
    on its slow reference loop, 3-5x slower than oneDNN on 2 cores. For inputs of batch 1
    this subclass calls :func:`attention_gates.ops.cpu.conv`, which takes oneDNN for float32 CPU
    tensors when it is available and enabled (``torch.backends.mkldnn.enabled``, so it can be
    turned off). 1x1x1 convolutions (stride 1, one group) of such inputs of any batch, as in
    segmentation heads and the gating signal, are :func:`attention_gates.ops.cpu.conv1x1`: a
    matrix product, or oneDNN for large channels-last inputs (oneDNN reorders a contiguous input:
    ``Tensor[1, 16, 64, 64, 64]`` to 2 channels took 6-9x longer). Otherwise it is
    :class:`nn.Conv3d`: same parameters, state dict and results up to float32 rounding. Under
    :func:`torch.compile` and dispatch modes (``FlopCounterMode``, fake tensors,
    :func:`torch.export.export`) it is plain :class:`nn.Conv3d` too: they see ``aten.convolution``.
    """

    def _conv_forward(self, input: Tensor, weight: Tensor, bias: Optional[Tensor]) -> Tensor:
        if input.dim() == 5 and self.padding_mode == "zeros" and not isinstance(self.padding, str):
            if self._pointwise and onednn_applies(input) and weight.dtype == torch.float32:
                return conv1x1(input, weight, bias)
            if input.shape[0] == 1:
                return conv(input, weight, bias, self.stride, self.padding, self.dilation, self.groups)
        return super()._conv_forward(input, weight, bias)

    @property
    def _pointwise(self) -> bool:
        return self.kernel_size == self.stride == self.dilation == (1, 1, 1) and self.padding == (0, 0, 0) and self.groups == 1


def norm_nd(norm: str, spatial_dims: int, channels: int, num_groups: int = 8) -> nn.Module:
    """A normalisation layer: ``"batch"``, ``"instance"`` (affine), ``"group"`` or ``"none"``."""
    _check_dims(spatial_dims)
    if norm == "batch":
        return (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)[spatial_dims - 1](channels)
    if norm == "instance":
        return (nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d)[spatial_dims - 1](channels, affine=True)
    if norm == "group":
        return nn.GroupNorm(_groups(num_groups, channels), channels)
    if norm == "none":
        return nn.Identity()
    raise ValueError(f"norm must be one of {AF.NORMS}, got {norm!r}")


def _groups(num_groups: int, channels: int) -> int:
    """The largest divisor of ``channels`` that is at most ``num_groups``."""
    return max(d for d in range(1, min(num_groups, channels) + 1) if channels % d == 0)


def _check_dims(spatial_dims: int) -> None:
    if spatial_dims not in (1, 2, 3):
        raise ValueError(f"spatial_dims must be 1, 2 or 3, got {spatial_dims!r}")


def as_tuple(value: Factor, spatial_dims: int, name: str = "subsample_factor") -> tuple[int, ...]:
    """``value`` as a tuple of ``spatial_dims`` positive ints (an int is repeated)."""
    if isinstance(value, int):
        value = (value,) * spatial_dims
    value = tuple(value)
    if len(value) != spatial_dims or not all(isinstance(v, int) and v >= 1 for v in value):
        raise ValueError(f"{name} must be a positive int or {spatial_dims} positive ints, got {value!r}")
    return value


def init_kaiming(module: nn.Module) -> None:
    """The authors' initialisation: Kaiming-normal (fan-in) conv weights, zero biases, norms at identity."""
    for m in module.modules():
        if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
            nn.init.kaiming_normal_(m.weight, a=0, mode="fan_in")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, (nn.modules.batchnorm._NormBase, nn.GroupNorm)) and m.weight is not None:
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


class GridAttentionGate(nn.Module):
    r"""Grid attention gate (Oktay et al., 2018), N-d.

    Parameters keep the authors' names; in the paper's symbols (eqs. 1-2)
    ``theta`` is :math:`W_x`, ``phi`` is :math:`W_g, b_g`, ``psi`` is :math:`\psi, b_\psi`,
    and ``W`` is the output transform (1x1 conv + norm) applied to :math:`\alpha x`.
    See :func:`attention_gates.functional.grid_attention` for the computation.

    Args:
        spatial_dims: 1, 2 or 3.
        in_channels: ``F_l``, channels of the skip connection ``x``.
        gating_channels: ``F_g``, channels of the gating signal ``g``.
        inter_channels: ``F_int``; default ``in_channels // 2`` (at least 1), as the authors.
        subsample_factor: theta's kernel and stride, an int or one per axis, e.g. ``(2, 2, 1)``.
        sigma1: ``"relu"`` (paper) or ``"softplus"``.
        sigma2: ``"sigmoid"`` (paper) or ``"softmax"``.
        output_transform: keep ``W`` (the authors' default); ``False`` returns ``alpha * x``.
        norm: normalisation in ``W``: ``"batch"``, ``"instance"``, ``"group"`` or ``"none"``.
        align_corners: for the linear resampling; ``True`` for checkpoints of PyTorch < 0.4.
        backend: implementation (see :mod:`attention_gates.ops.dispatch`); ``None`` follows the global default.

    Under :class:`torch.nn.SyncBatchNorm` (after ``convert_sync_batchnorm``) the gate computes
    ``alpha * x`` with the chosen backend and applies ``W`` as modules, so that the norm's
    statistics are synchronised across processes.

    Shapes:
        ``forward(x: Tensor[N, F_l, *S], g: Tensor[N, F_g, *S_g])`` returns
        ``(out: Tensor[N, F_l, *S], alpha: Tensor[N, 1, *S])``.

    Example:
        >>> gate = GridAttentionGate(3, in_channels=32, gating_channels=64)
        >>> out, alpha = gate(torch.randn(1, 32, 16, 16, 16), torch.randn(1, 64, 8, 8, 8))
        >>> out.shape, alpha.shape
        (torch.Size([1, 32, 16, 16, 16]), torch.Size([1, 1, 16, 16, 16]))
    """

    def __init__(
        self,
        spatial_dims: int,
        in_channels: int,
        gating_channels: int,
        inter_channels: Optional[int] = None,
        subsample_factor: Factor = 2,
        *,
        sigma1: str = "relu",
        sigma2: str = "sigmoid",
        output_transform: bool = True,
        norm: str = "batch",
        num_groups: int = 8,
        align_corners: bool = False,
        backend: Optional[str] = None,
    ) -> None:
        super().__init__()
        _check_dims(spatial_dims)
        for name, v in (("in_channels", in_channels), ("gating_channels", gating_channels)):
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        if inter_channels is None:
            inter_channels = max(in_channels // 2, 1)
        if not isinstance(inter_channels, int) or inter_channels < 1:
            raise ValueError(f"inter_channels must be a positive int or None, got {inter_channels!r}")
        if sigma1 not in AF.SIGMA1:
            raise ValueError(f"sigma1 must be one of {AF.SIGMA1}, got {sigma1!r}")
        if sigma2 not in AF.SIGMA2:
            raise ValueError(f"sigma2 must be one of {AF.SIGMA2}, got {sigma2!r}")
        if norm not in AF.NORMS:
            raise ValueError(f"norm must be one of {AF.NORMS}, got {norm!r}")
        self.spatial_dims = spatial_dims
        self.in_channels = in_channels
        self.gating_channels = gating_channels
        self.inter_channels = inter_channels
        self.subsample_factor = as_tuple(subsample_factor, spatial_dims)
        self.sigma1, self.sigma2 = sigma1, sigma2
        self.norm = norm
        self.align_corners = align_corners
        self.backend = None if backend is None else _check_name(backend)
        Conv = conv_nd(spatial_dims)
        k = self.subsample_factor
        self.theta = Conv(in_channels, inter_channels, kernel_size=k, stride=k, bias=False)
        self.phi = Conv(gating_channels, inter_channels, kernel_size=1)
        self.psi = Conv(inter_channels, 1, kernel_size=1)
        self.W: Optional[nn.Sequential] = None
        if output_transform:
            self.W = nn.Sequential(Conv(in_channels, in_channels, kernel_size=1), norm_nd(norm, spatial_dims, in_channels, num_groups))
        init_kaiming(self)

    @property
    def num_groups(self) -> int:
        return self.W[1].num_groups if self.W is not None and isinstance(self.W[1], nn.GroupNorm) else 1

    def forward(self, x: Tensor, g: Tensor) -> tuple[Tensor, Tensor]:
        if isinstance(x, Tensor) and x.dim() != self.spatial_dims + 2:
            raise ValueError(
                f"{type(self).__name__} expects x as Tensor[N, C, *S] with {self.spatial_dims} spatial dims, "
                f"got {x.dim()} dims: {list(x.shape)}"
            )
        # under SyncBatchNorm the gate gives alpha * x and the modules apply W, so that W's
        # statistics are synchronised across processes
        sync = self.W is not None and isinstance(self.W[1], nn.SyncBatchNorm)
        W_weight = W_bias = nw = nb = rm = rv = None
        momentum = 0.0
        eps = 1e-5
        if self.W is not None and not sync:
            conv, nrm = self.W[0], self.W[1]
            W_weight, W_bias = conv.weight, conv.bias
            if not isinstance(nrm, nn.Identity):
                nw, nb = nrm.weight, nrm.bias
                eps = nrm.eps
            if isinstance(nrm, nn.modules.batchnorm._BatchNorm):
                momentum = _bn_momentum(nrm, self.training)
                rm, rv = nrm.running_mean, nrm.running_var  # None without track_running_stats
        out, alpha = AF.grid_attention(
            x, g, self.theta.weight, self.phi.weight, self.phi.bias, self.psi.weight, self.psi.bias,
            W_weight, W_bias, nw, nb, rm, rv,
            norm=self.norm, num_groups=self.num_groups, training=self.training or rm is None,
            momentum=momentum, eps=eps, sigma1=self.sigma1, sigma2=self.sigma2,
            align_corners=self.align_corners, backend=self.backend,
        )  # fmt: skip
        return (self.W(out) if sync else out), alpha

    def extra_repr(self) -> str:
        return (
            f"spatial_dims={self.spatial_dims}, in_channels={self.in_channels}, gating_channels={self.gating_channels}, "
            f"inter_channels={self.inter_channels}, subsample_factor={self.subsample_factor}, sigma1={self.sigma1!r}, "
            f"sigma2={self.sigma2!r}, norm={self.norm!r}, backend={self.backend!r}"
        )


def _bn_momentum(bn: nn.modules.batchnorm._BatchNorm, training: bool) -> float:
    """The exponential-average factor :class:`torch.nn.BatchNorm3d` would use (and its counter update)."""
    if not (training and bn.track_running_stats):
        return 0.0 if bn.momentum is None else bn.momentum
    if bn.num_batches_tracked is not None:
        bn.num_batches_tracked.add_(1)
    if bn.momentum is None:
        return 1.0 / float(bn.num_batches_tracked)
    return bn.momentum


class GridAttentionGate2D(GridAttentionGate):
    """2D :class:`GridAttentionGate`: ``x`` is ``Tensor[N, F_l, H, W]``, ``g`` is ``Tensor[N, F_g, H_g, W_g]``."""

    def __init__(self, in_channels: int, gating_channels: int, inter_channels: Optional[int] = None, subsample_factor: Factor = 2, **kwargs) -> None:
        super().__init__(2, in_channels, gating_channels, inter_channels, subsample_factor, **kwargs)


class GridAttentionGate3D(GridAttentionGate):
    """3D :class:`GridAttentionGate`: ``x`` is ``Tensor[N, F_l, D, H, W]``, ``g`` is ``Tensor[N, F_g, D_g, H_g, W_g]``."""

    def __init__(self, in_channels: int, gating_channels: int, inter_channels: Optional[int] = None, subsample_factor: Factor = 2, **kwargs) -> None:
        super().__init__(3, in_channels, gating_channels, inter_channels, subsample_factor, **kwargs)


class MultiAttentionGate(nn.Module):
    """Several grid attention gates on one skip, concatenated and fused: the paper model's gated skip.

    ``heads`` gates run in parallel on ``(x, g)``; their outputs are concatenated and fused by
    ``combine`` = 1x1 conv (``heads * F_l -> F_l``) + norm + ReLU. With ``heads=1`` this is the
    authors' single-attention block (its ``combine`` is ``F_l -> F_l``).

    Shapes:
        ``forward(x: Tensor[N, F_l, *S], g: Tensor[N, F_g, *S_g])`` returns
        ``(out: Tensor[N, F_l, *S], alpha: Tensor[N, heads, *S])``.

    Example:
        >>> block = MultiAttentionGate(2, in_channels=16, gating_channels=32, inter_channels=16)
        >>> out, alpha = block(torch.randn(2, 16, 32, 32), torch.randn(2, 32, 16, 16))
        >>> out.shape, alpha.shape
        (torch.Size([2, 16, 32, 32]), torch.Size([2, 2, 32, 32]))
    """

    def __init__(
        self,
        spatial_dims: int,
        in_channels: int,
        gating_channels: int,
        inter_channels: Optional[int] = None,
        subsample_factor: Factor = 2,
        heads: int = 2,
        *,
        norm: str = "batch",
        num_groups: int = 8,
        **gate_kwargs,
    ) -> None:
        super().__init__()
        if not isinstance(heads, int) or heads < 1:
            raise ValueError(f"heads must be a positive int, got {heads!r}")
        self.heads = heads
        self.gates = nn.ModuleList(
            GridAttentionGate(
                spatial_dims, in_channels, gating_channels, inter_channels, subsample_factor,
                norm=norm, num_groups=num_groups, **gate_kwargs,
            )  # fmt: skip
            for _ in range(heads)
        )
        Conv = conv_nd(spatial_dims)
        self.combine = nn.Sequential(
            Conv(heads * in_channels, in_channels, kernel_size=1),
            norm_nd(norm, spatial_dims, in_channels, num_groups),
            nn.ReLU(inplace=True),
        )
        init_kaiming(self.combine)
        self._output_map_cache: Optional[tuple] = None  # (key, snapshot, (A, c)): see _cached_output_map

    def forward(self, x: Tensor, g: Tensor) -> tuple[Tensor, Tensor]:
        folded = self._folded(x, g)
        if folded is not None:
            A, c = folded
            heads = [(gate.theta.weight, gate.phi.weight, gate.phi.bias, gate.psi.weight, gate.psi.bias) for gate in self.gates]
            gate = self.gates[0]
            return multi_gate_inference_cpu(x, g, heads, A, c, sigma1=gate.sigma1, align_corners=gate.align_corners)
        outs, alphas = zip(*(gate(x, g) for gate in self.gates))
        return self.combine(torch.cat(outs, dim=1)), torch.cat(alphas, dim=1)

    def folded_output_map(self) -> Optional[tuple[Tensor, Tensor]]:
        """Everything after the gates' attention maps as one affine map, in evaluation mode.

        Each gate's output is ``alpha_i * (M_i x) + b_i`` per voxel (its ``W`` with the norm
        folded in), and ``combine`` is ``relu(S (Wc [out_1; ...] + bc) + t)``, so the block is
        ``relu(c + sum_i alpha_i * (A_i x))`` with ``A_i = S Wc_i M_i`` and
        ``c = S (bc + sum_i Wc_i b_i) + t``.

        Returns ``(A: Tensor[heads * F_l, F_l], c: Tensor[F_l])``, or ``None`` when a norm has
        no evaluation-mode affine form (instance or group norm, batch norm in training or
        without running statistics) or a gate has no ``W``.
        """
        combine = _eval_affine(self.combine[1], self.combine[0])
        if combine is None or any(gate.W is None for gate in self.gates):
            return None
        maps = [_eval_affine(gate.W[1], gate.W[0]) for gate in self.gates]
        if any(m is None for m in maps):
            return None
        conv_c = self.combine[0]
        sc, tc = combine
        c = conv_c.bias if conv_c.bias is not None else torch.zeros_like(sc)
        A = []
        for (s, t), gate, Wc_i in zip(maps, self.gates, conv_c.weight.flatten(1).split(self.gates[0].in_channels, dim=1)):
            conv = gate.W[0]
            M = s[:, None] * conv.weight.flatten(1)
            b = t if conv.bias is None else t + s * conv.bias
            A.append(sc[:, None] * (Wc_i @ M))
            c = c + Wc_i @ b
        return torch.cat(A), sc * c + tc

    def _folded(self, x: Tensor, g: Tensor) -> Optional[tuple[Tensor, Tensor]]:
        """:meth:`folded_output_map` when this call takes
        :func:`~attention_gates.ops.cpu.multi_gate_inference_cpu` (in evaluation mode without gradients,
        when the gates' calls would run on the ``cpu`` backend: ``"auto"`` takes it for float32 CPU
        inference), else ``None``. The map is cached (:meth:`_cached_output_map`)."""
        if self.training or not isinstance(x, Tensor) or x.device.type != "cpu" or x.dim() != self.gates[0].spatial_dims + 2:
            return None  # (not on the CPU: the gates' own calls check and dispatch, once)
        gate = self.gates[0]
        if gate.W is None or isinstance(gate.W[1], nn.SyncBatchNorm) or any(gt.backend != gate.backend for gt in self.gates):
            return None
        weights = tuple(self.parameters()) if torch.is_grad_enabled() else ()  # (for autograd's sake only)
        AF.check_gate_inputs(
            x, g, gate.theta.weight, gate.phi.weight, gate.phi.bias, gate.psi.weight, gate.psi.bias,
            norm=gate.norm, num_groups=gate.num_groups, training=False, sigma1=gate.sigma1, sigma2=gate.sigma2,
        )  # fmt: skip
        name = chosen(
            gate.backend, x, g, W_weight=gate.W[0].weight, norm=gate.norm, training=False,
            sigma1=gate.sigma1, sigma2=gate.sigma2, weights=weights,
        )  # fmt: skip
        if name != "cpu" or (torch.is_grad_enabled() and any(t.requires_grad for t in (x, g, *weights))):
            return None  # gradients wanted: the gates' own calls (the folded path has no backward)
        return self._cached_output_map()

    def _cached_output_map(self) -> Optional[tuple[Tensor, Tensor]]:
        """:meth:`folded_output_map`, rebuilt only when the tensors it reads have changed.

        The map is kept with a copy of everything it was folded from (the output transforms'
        and ``combine``'s weights, biases and running statistics, their types, modes and
        ``eps``), and used again while the module's tensors equal that copy, value for value.
        Version counters cannot decide this: ``p.data.copy_(...)`` changes a parameter without
        bumping them. The check took 45-88 us on the paper model's blocks, folding 200-284 us.
        """
        layers = [layer for gate in self.gates for layer in gate.W] + [self.combine[0], self.combine[1]]
        # (the modules' own dicts: nn.Module.__getattr__ took a third of this check's time)
        sources = [t for layer in layers for d in (layer._parameters, layer._buffers) for t in d.values() if t is not None]
        key = (
            tuple((t.shape, t.dtype, t.device) for t in sources),
            tuple((type(layer), layer.training, getattr(layer, "eps", None)) for layer in layers),
        )
        cached = getattr(self, "_output_map_cache", None)  # (absent from modules pickled before it existed)
        if cached is not None and cached[0] == key and all(torch.equal(a, b) for a, b in zip(cached[1], sources)):
            return cached[2]
        folded = self.folded_output_map()
        self._output_map_cache = None if folded is None else (key, [t.detach().clone() for t in sources], folded)
        return folded


def _eval_affine(norm: nn.Module, conv: nn.Module) -> Optional[tuple[Tensor, Tensor]]:
    """``(scale, shift)`` of the norm layer after ``conv`` in evaluation mode as a per-channel affine
    map, or ``None`` when it has none (instance/group norm, batch norm in training or without
    running statistics)."""
    if isinstance(norm, nn.Identity):
        ones = conv.weight.new_ones(conv.weight.shape[0])
        return ones, torch.zeros_like(ones)
    if isinstance(norm, nn.modules.batchnorm._BatchNorm):
        if norm.training or norm.running_mean is None:
            return None
        scale = torch.rsqrt(norm.running_var + norm.eps)
        if norm.weight is not None:
            scale = scale * norm.weight
        shift = -norm.running_mean * scale
        return scale, shift if norm.bias is None else shift + norm.bias
    return None
