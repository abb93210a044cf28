"""What the Triton kernels support, decided without importing Triton."""

from __future__ import annotations

import os

from torch import Tensor

MAX_CHANNELS = 256  # x's channels (F_l) and F_int: one register tile per program (tiles.TABLE's largest bucket)
MAX_GATING_CHANNELS = 512


def interpreting() -> bool:
    """Whether Triton runs its kernels through its interpreter (``TRITON_INTERPRET=1``), on CPU tensors."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def shape_reasons(x: Tensor, g: Tensor, theta_weight: Tensor) -> list[str]:
    """Why the kernels cannot take these shapes (an empty list when they can)."""
    reasons = []
    if x.shape[1] > MAX_CHANNELS:
        reasons.append(f"x has {x.shape[1]} channels: the kernels take at most {MAX_CHANNELS}")
    if theta_weight.shape[0] > MAX_CHANNELS:
        reasons.append(f"inter_channels {theta_weight.shape[0]}: the kernels take at most {MAX_CHANNELS}")
    if g.shape[1] > MAX_GATING_CHANNELS:
        reasons.append(f"g has {g.shape[1]} channels: the kernels take at most {MAX_GATING_CHANNELS}")
    return reasons
