"""Grid attention gates: the modules that hold the gate's parameters and call :func:`attention_gates.functional.grid_attention`."""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from . import functional as AF
from .layers import Factor, as_tuple, check_spatial_dims, constructor_repr, conv_nd, init_kaiming, norm_nd
from .ops import GateWeights, check_name

__all__ = ["GridAttentionGate", "GridAttentionGate2D", "GridAttentionGate3D", "MultiAttentionGate", "scripting_refused"]


def scripting_refused(module: nn.Module) -> NotImplementedError:
    """The error :func:`torch.jit.script` raises (from ``__prepare_scriptable__``) for the library's
    gates and networks, pointing to the paths that record them.

    Scripting compiles the Python source of ``forward``; the gates choose their implementation in
    Python at every call (:mod:`attention_gates.ops.dispatch`) and the networks pad and crop any
    input size, which TorchScript's compiler cannot type (and PyTorch 2.13 marks ``torch.jit.script``
    deprecated). Tracing, :func:`torch.export.export` and the ONNX exporter record the
    reference math instead.

    Example:
        >>> torch.jit.script(GridAttentionGate(2, 4, 8))
        Traceback (most recent call last):
        ...
        NotImplementedError: torch.jit.script cannot compile GridAttentionGate...
    """
    return NotImplementedError(
        f"torch.jit.script cannot compile {type(module).__name__}: its forward chooses the gates' implementation and "
        "pads to any input size in Python, which TorchScript's scripting cannot type. Record it instead, in eval mode: "
        "torch.jit.trace(model, example) for TorchScript (MONAI Deploy; MONAI bundles: ckpt_export --use_trace), "
        "torch.export.export or torch.onnx.export(..., dynamo=True) for a graph with dynamic sizes; "
        "attention_gates.deploy does each (docs: Deploy)"
    )


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
        check_spatial_dims(spatial_dims)
        for name, v in (("in_channels", in_channels), ("gating_channels", gating_channels)):
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        if inter_channels is None:
            inter_channels = max(in_channels // 2, 1)
        if not isinstance(inter_channels, int) or inter_channels < 1:
            raise ValueError(f"inter_channels must be a positive int or None, got {inter_channels!r}")
        AF.GateOptions(norm=norm, sigma1=sigma1, sigma2=sigma2)  # raises for a name it does not know
        self.spatial_dims = spatial_dims
        self.in_channels = in_channels
        self.gating_channels = gating_channels
        self.inter_channels = inter_channels
        self.subsample_factor = as_tuple(subsample_factor, spatial_dims)
        self.sigma1, self.sigma2 = sigma1, sigma2
        self.norm = norm
        self.num_groups = num_groups
        self.output_transform = output_transform
        self.align_corners = align_corners
        self.backend = None if backend is None else check_name(backend)
        Conv = conv_nd(spatial_dims)
        k = self.subsample_factor
        self.theta = Conv(in_channels, inter_channels, kernel_size=k, stride=k, bias=False)
        self.phi = Conv(gating_channels, inter_channels, kernel_size=1)
        self.psi = Conv(inter_channels, 1, kernel_size=1)
        self.W: Optional[nn.Sequential] = None
        if output_transform:
            self.W = nn.Sequential(Conv(in_channels, in_channels, kernel_size=1), norm_nd(norm, spatial_dims, in_channels, num_groups))
        init_kaiming(self)

    def forward(self, x: Tensor, g: Tensor) -> tuple[Tensor, Tensor]:
        if isinstance(x, Tensor) and x.dim() != self.spatial_dims + 2:
            raise ValueError(
                f"{type(self).__name__} expects x as Tensor[N, C, *S] with {self.spatial_dims} spatial dims, "
                f"got {x.dim()} dims: {list(x.shape)}"
            )
        # under SyncBatchNorm the gate gives alpha * x and the modules apply W, so that W's
        # statistics are synchronised across processes
        sync = self.W is not None and isinstance(self.W[1], nn.SyncBatchNorm)
        weights = self._weights(with_output_transform=not sync)
        out, alpha = AF.grid_attention(
            x, g, **weights._asdict(), **self._norm_options(weights),
            sigma1=self.sigma1, sigma2=self.sigma2, align_corners=self.align_corners, backend=self.backend,
        )  # fmt: skip
        return (self.W(out) if sync else out), alpha

    def __prepare_scriptable__(self):
        raise scripting_refused(self)

    def _weights(self, with_output_transform: bool) -> GateWeights:
        """The gate's tensors by field; ``W``'s (and its norm's) only ``with_output_transform``."""
        fields = dict(
            theta_weight=self.theta.weight, phi_weight=self.phi.weight, phi_bias=self.phi.bias,
            psi_weight=self.psi.weight, psi_bias=self.psi.bias,
        )  # fmt: skip
        if self.W is None or not with_output_transform:
            return GateWeights(**fields)
        conv, norm = self.W[0], self.W[1]
        fields.update(W_weight=conv.weight, W_bias=conv.bias)
        if not isinstance(norm, nn.Identity):
            fields.update(norm_weight=norm.weight, norm_bias=norm.bias)
        if isinstance(norm, nn.modules.batchnorm._BatchNorm):
            fields.update(running_mean=norm.running_mean, running_var=norm.running_var)  # None without track_running_stats
        return GateWeights(**fields)

    def _norm_options(self, weights: GateWeights) -> dict[str, object]:
        """The output norm's options of :func:`~attention_gates.functional.grid_attention` for
        ``weights``; counts the batch as :class:`torch.nn.BatchNorm3d` does when it updates its statistics."""
        training = self.training or weights.running_mean is None  # no running statistics: the batch's
        options: dict[str, object] = dict(norm=self.norm, num_groups=1, training=training, momentum=0.0, eps=1e-5)
        if weights.W_weight is None:
            return options
        norm = self.W[1]
        if isinstance(norm, nn.GroupNorm):
            options["num_groups"] = norm.num_groups  # the groups it got: the largest divisor of F_l up to num_groups
        if not isinstance(norm, nn.Identity):
            options["eps"] = norm.eps
        if isinstance(norm, nn.modules.batchnorm._BatchNorm):
            options["momentum"] = _bn_momentum(norm, self.training)
        return options

    def extra_repr(self) -> str:
        return constructor_repr(
            self,
            dict(
                spatial_dims=self.spatial_dims, in_channels=self.in_channels, gating_channels=self.gating_channels,
                inter_channels=self.inter_channels, subsample_factor=self.subsample_factor, sigma1=self.sigma1,
                sigma2=self.sigma2, output_transform=self.output_transform, norm=self.norm,
                num_groups=self.num_groups, align_corners=self.align_corners, backend=self.backend,
            ),
        )  # fmt: skip


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
        self.norm = norm
        self.num_groups = num_groups
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

    def forward(self, x: Tensor, g: Tensor) -> tuple[Tensor, Tensor]:
        outs, alphas = zip(*(gate(x, g) for gate in self.gates))
        return self.combine(torch.cat(outs, dim=1)), torch.cat(alphas, dim=1)

    def __prepare_scriptable__(self):
        raise scripting_refused(self)

    def extra_repr(self) -> str:
        # the heads' arguments are the heads' own (set_backend may change their backend): read there
        head = self.gates[0]
        return constructor_repr(
            self,
            dict(
                spatial_dims=head.spatial_dims, in_channels=head.in_channels, gating_channels=head.gating_channels,
                inter_channels=head.inter_channels, subsample_factor=head.subsample_factor, heads=self.heads,
                norm=self.norm, num_groups=self.num_groups, sigma1=head.sigma1, sigma2=head.sigma2,
                output_transform=head.output_transform, align_corners=head.align_corners, backend=head.backend,
            ),
        )  # fmt: skip

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
