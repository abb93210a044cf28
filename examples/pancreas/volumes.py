"""Checks of volume files and grids that do not need the MONAI transforms: a DICOM series that
would stack into a wrong volume, and whether two voxel grids are the same one."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Optional

import numpy as np

from .cases import visible_files

__all__ = ["check_series", "grid_disagreement", "AFFINE_TOL", "SLICE_STEP_TOL"]

#: Largest distance (mm) allowed between where the image and the label put the same voxel.
AFFINE_TOL = 0.1

#: Slice steps of a DICOM series may differ from their median by this share (a missing slice: 100%).
SLICE_STEP_TOL = 0.1


def check_series(folder: str | os.PathLike) -> None:
    """Refuse a DICOM series folder that MONAI's ``PydicomReader`` would stack into a wrong
    volume: mixed series, slices without position tags, or slices whose positions along the
    slice normal, in instance-number order (the reader's stacking order), are not evenly spaced
    (a missing or duplicated slice). Hidden and non-DICOM files are left out, as the reader does.
    Reads the slices' headers only.

    Raises:
        ValueError: naming the slices at fault and what is wrong with them.
    """
    import pydicom

    folder = Path(folder)
    visible = visible_files(folder)
    files = [p for p in visible if pydicom.misc.is_dicom(p)]
    fake = next((p for p in visible if p.suffix.lower() == ".dcm" and p not in files), None)
    if fake is not None:
        raise ValueError(f"{fake.name} is not a DICOM file (no DICM header)")
    if len(files) < 2:
        raise ValueError(f"expected a series folder of at least 2 slices, found {len(files)} DICOM file(s)")
    tags = ["SeriesInstanceUID", "InstanceNumber", "ImagePositionPatient", "ImageOrientationPatient"]
    heads = [pydicom.dcmread(p, stop_before_pixels=True, specific_tags=tags) for p in files]
    lacking = next(((p, t) for p, h in zip(files, heads) for t in tags if t not in h), None)
    if lacking is not None:
        raise ValueError(f"slice {lacking[0].name} has no {lacking[1]}")
    uids = sorted({str(h.SeriesInstanceUID) for h in heads})
    if len(uids) > 1:
        raise ValueError(f"the folder holds {len(uids)} series ({', '.join(uids)}); give each its own folder")
    order = sorted(range(len(files)), key=lambda i: int(heads[i].InstanceNumber))
    row_col = np.asarray(heads[0].ImageOrientationPatient, dtype=np.float64)
    normal = np.cross(row_col[:3], row_col[3:])
    z = np.array([float(normal @ np.asarray(heads[i].ImagePositionPatient, dtype=np.float64)) for i in order])
    steps = np.diff(z)
    names = [files[i].name for i in order]
    wrong = np.sign(steps) != np.sign(np.median(steps))
    if wrong.any() or not steps.any():
        k = int(np.flatnonzero(wrong)[0]) if wrong.any() else 0
        raise ValueError(
            f"slices {names[k]} and {names[k + 1]} lie at {z[k]:.2f} and {z[k + 1]:.2f} mm along the "
            "slice normal: the positions repeat or do not follow the instance numbers"
        )
    median = float(np.median(np.abs(steps)))
    k = int(np.argmax(np.abs(np.abs(steps) - median)))
    if abs(abs(steps[k]) - median) > SLICE_STEP_TOL * median:
        raise ValueError(
            f"slices {names[k]} and {names[k + 1]} are {abs(steps[k]):.3g} mm apart, the other slices "
            f"{median:.3g} mm: a slice is missing or the spacing is uneven"
        )


def grid_disagreement(
    shape: Sequence[int], affine: np.ndarray, other_shape: Sequence[int], other_affine: np.ndarray, tol: float = AFFINE_TOL
) -> Optional[str]:
    """How two voxel grids differ, or ``None`` when they are one grid: ``"different shapes"``, or
    ``"voxels D mm apart"`` when some voxel's world position (``affine``: voxel to mm, 4x4)
    differs by more than ``tol`` mm, measured at the grid's corners, where an affine difference
    is largest. Compare grids in the same axis order (e.g. both oriented to RAS)."""
    shape, other_shape = tuple(int(n) for n in shape), tuple(int(n) for n in other_shape)
    if shape != other_shape:
        return "different shapes"
    a, b = np.asarray(affine, dtype=np.float64), np.asarray(other_affine, dtype=np.float64)
    corners = np.array(np.meshgrid(*[(0, n - 1) for n in shape], [1], indexing="ij")).reshape(len(shape) + 1, -1)
    offset = float(np.abs((a - b) @ corners).max())
    return None if offset <= tol else f"voxels {offset:.3g} mm apart"
