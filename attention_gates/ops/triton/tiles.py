"""Tile sizes and grid sizes of the fused gate's kernels, per GPU architecture.

A committed table instead of autotuning: the same shapes get the same tiles on every run (so
the same per-program partial sums, hence bitwise-equal gradients), and no call pays for a
search. Rows are keyed by the channel bucket ``max(next_pow2(F_l), next_pow2(F_int))`` (the
register tiles are ``[positions, channels]``) and give, for the coarse kernels (theta's grid;
``BLOCK_P`` coarse positions, each with its whole subsample patch), ``patch_bwd`` (its own
``BLOCK_P``) and the fine kernels (x's grid; ``BLOCK_S`` positions): the block, the warps and
the persistent programs per multiprocessor (a grid of ``multiprocessors * per_sm`` programs,
fewer when there are fewer tiles).

How the values were chosen: none has been timed on a GPU. They are the largest tiles whose
sm_90 code compiled, with Triton 3.9 and 3.6, without local-memory spills and within the
shared-memory limit at the paper model's level-2 gate (float32 and bfloat16, contiguous and
channels-last), and with Triton 3.9 at level 3; ``per_sm`` is what the kernels' registers and
shared memory let fit on a multiprocessor at once. ``tests/test_triton_codegen.py`` checks all
of that for the level-2 and level-3 rows. The 128- and 256-channel rows still spill (level 4:
its weights, ``[F_int, 2 F_l]`` per dot, are whole register tiles). A GPU run
(``benchmarks/gpu_check.sh``) is what should confirm or replace the values; architectures other
than sm_90 use the ``"default"`` rows (the same values) until measured.
"""

from __future__ import annotations

from typing import NamedTuple


class Tiles(NamedTuple):
    coarse_block: int  # BLOCK_P
    coarse_warps: int
    coarse_per_sm: int  # persistent programs per multiprocessor
    patch_block: int  # BLOCK_P of patch_bwd (the backward's heaviest kernel: x, dout, dx rows and two weights)
    fine_block: int  # BLOCK_S
    fine_warps: int
    fine_per_sm: int
    stages: int = 1  # Triton's software-pipelining depth (num_stages) of the tile loops


# channel bucket -> tiles; the first row whose bucket holds the channels applies
TABLE: dict[str, dict[int, Tiles]] = {
    "sm90": {
        32: Tiles(64, 8, 1, 32, 64, 8, 1),
        64: Tiles(16, 8, 1, 16, 16, 8, 1),
        128: Tiles(16, 8, 1, 16, 16, 8, 1),
        256: Tiles(16, 8, 1, 16, 16, 8, 1),
    },
    "default": {
        32: Tiles(64, 8, 1, 32, 64, 8, 1),
        64: Tiles(16, 8, 1, 16, 16, 8, 1),
        128: Tiles(16, 8, 1, 16, 16, 8, 1),
        256: Tiles(16, 8, 1, 16, 16, 8, 1),
    },
}
# the Triton interpreter (CPU): small tiles and a few programs, so that every program loops
# over several tiles, as on a GPU
INTERPRETER = Tiles(32, 4, 0, 16, 64, 4, 0)
INTERPRETER_PROGRAMS = 3


def arch_key(capability: tuple[int, int]) -> str:
    """The table's key for a CUDA compute capability: ``"sm90"`` for (9, 0), else ``"default"``."""
    key = f"sm{capability[0]}{capability[1]}"
    return key if key in TABLE else "default"


def lookup(arch: str, channels: int) -> Tiles:
    """The row of ``TABLE[arch]`` for ``channels`` (the larger of F_l and F_int, a power of two)."""
    rows = TABLE[arch]
    for bucket in sorted(rows):
        if channels <= bucket:
            return rows[bucket]
    raise ValueError(f"{channels} channels: the tile table ({arch}) goes up to {max(rows)}")
