"""Layer factories for N-d networks: convolutions, normalisations, initialisation, per-axis sizes,
and the constructor echo of the library's modules' ``extra_repr``.

As MONAI's factories, these pick the 1D/2D/3D PyTorch layer for ``spatial_dims``, so that the
gates, blocks and networks above are written once for every dimensionality.
"""

from __future__ import annotations

import inspect
from typing import Any, Mapping, Sequence, Union

from torch import nn

from .ops.reference import NORMS

__all__ = [
    "Factor",
    "NORMS",
    "check_spatial_dims",
    "conv_nd",
    "norm_nd",
    "group_count",
    "as_tuple",
    "init_kaiming",
    "constructor_repr",
]

Factor = Union[int, Sequence[int]]


def check_spatial_dims(spatial_dims: int) -> int:
    """``spatial_dims`` if it is 1, 2 or 3, else a ``ValueError``."""
    if spatial_dims not in (1, 2, 3):
        raise ValueError(f"spatial_dims must be 1, 2 or 3, got {spatial_dims!r}")
    return spatial_dims


def conv_nd(spatial_dims: int) -> type[nn.Module]:
    """``nn.Conv1d``, ``nn.Conv2d`` or ``nn.Conv3d`` for ``spatial_dims`` 1, 2 or 3."""
    return (nn.Conv1d, nn.Conv2d, nn.Conv3d)[check_spatial_dims(spatial_dims) - 1]


def group_count(num_groups: int, channels: int) -> int:
    """The groups a group norm of ``channels`` gets for ``num_groups``: its largest divisor up to ``num_groups``."""
    return max(d for d in range(1, min(num_groups, channels) + 1) if channels % d == 0)


def norm_nd(norm: str, spatial_dims: int, channels: int, num_groups: int = 8) -> nn.Module:
    """A normalisation layer: ``"batch"``, ``"instance"`` (affine), ``"group"`` (:func:`group_count`
    groups) or ``"none"`` (``nn.Identity``)."""
    check_spatial_dims(spatial_dims)
    if norm == "batch":
        return (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)[spatial_dims - 1](channels)
    if norm == "instance":
        return (nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d)[spatial_dims - 1](channels, affine=True)
    if norm == "group":
        if not isinstance(num_groups, int) or isinstance(num_groups, bool) or num_groups < 1:
            raise ValueError(f"num_groups must be a positive int, got {num_groups!r}")
        return nn.GroupNorm(group_count(num_groups, channels), channels)
    if norm == "none":
        return nn.Identity()
    raise ValueError(f"norm must be one of {NORMS}, got {norm!r}")


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


def constructor_repr(module: nn.Module, arguments: Mapping[str, Any]) -> str:
    """``name=value, ...`` of ``module``'s constructor ``arguments``, for its ``extra_repr``.

    A printed module then says how to build it again (``eval`` of the class name and this text
    gives an equal module), as einops' layers do. ``spatial_dims`` is left out for a class whose
    constructor does not take it (a 2D or 3D face, which fixes it).

    Example:
        >>> from attention_gates import GridAttentionGate2D
        >>> GridAttentionGate2D(4, 6).extra_repr()[:60]
        'in_channels=4, gating_channels=6, inter_channels=2, subsampl'
    """
    takes = inspect.signature(type(module)).parameters
    return ", ".join(f"{k}={v!r}" for k, v in arguments.items() if k != "spatial_dims" or k in takes)
