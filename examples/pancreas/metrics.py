"""Segmentation metrics of one case: overlap, and surface distances in mm.

All functions take binary masks as arrays ``[X, Y, Z]`` (z = the axial axis, as MONAI's RAS
arrays are laid out) and the voxel spacing in mm.

- Dice, precision, recall: voxel counts.
- ASSD (average symmetric surface distance) and HD95 (95th-percentile Hausdorff distance):
  MONAI's ``compute_average_surface_distance`` and ``compute_hausdorff_distance`` with the
  spacing.
- The authors' surface distance (:func:`slicewise_surface_distance`): per axial slice, the
  symmetric mean distance between the two 2D contours, averaged over the slices where both
  masks are present.

Distances are ``inf`` when the prediction is empty and the ground truth is not (there is no
surface to measure from); :func:`examples.pancreas.evaluate.summarize` counts such cases apart
instead of averaging them.
"""

from __future__ import annotations

import math
import warnings
from typing import Sequence

import numpy as np
import torch
from scipy import ndimage

__all__ = ["overlap_metrics", "surface_metrics", "slicewise_surface_distance", "case_metrics"]


def _as_bool(mask, name: str) -> np.ndarray:
    if isinstance(mask, torch.Tensor):
        mask = mask.detach().cpu().numpy()
    mask = np.asarray(mask)
    if mask.ndim != 3:
        raise ValueError(f"{name} must be a 3D mask [X, Y, Z], got shape {mask.shape}")
    return mask.astype(bool)


def _check_pair(pred, gt, spacing: Sequence[float]) -> tuple[np.ndarray, np.ndarray, tuple[float, float, float]]:
    p, g = _as_bool(pred, "pred"), _as_bool(gt, "gt")
    if p.shape != g.shape:
        raise ValueError(f"pred and gt must have the same shape, got {p.shape} and {g.shape}")
    spacing = tuple(float(s) for s in spacing)
    if len(spacing) != 3 or not all(s > 0 for s in spacing):
        raise ValueError(f"spacing must be 3 positive numbers (mm), got {spacing}")
    return p, g, spacing


def overlap_metrics(pred, gt) -> dict[str, float]:
    """Dice, precision and recall of binary masks ``[X, Y, Z]``.

    Both masks empty gives 1 for all three (nothing to find, nothing found); an empty
    prediction of a non-empty truth gives precision 0.
    """
    p, g = _as_bool(pred, "pred"), _as_bool(gt, "gt")
    if p.shape != g.shape:
        raise ValueError(f"pred and gt must have the same shape, got {p.shape} and {g.shape}")
    tp = float(np.logical_and(p, g).sum())
    np_, ng = float(p.sum()), float(g.sum())
    return {
        "dice": 1.0 if np_ + ng == 0 else 2 * tp / (np_ + ng),
        "precision": (1.0 if ng == 0 else 0.0) if np_ == 0 else tp / np_,
        "recall": 1.0 if ng == 0 else tp / ng,
    }


def surface_metrics(pred, gt, spacing: Sequence[float]) -> dict[str, float]:
    """ASSD and HD95 (mm) of binary masks ``[X, Y, Z]`` with MONAI, ``spacing`` in mm per axis.

    Returns ``{"assd": ..., "hd95": ...}``: 0 when both masks are empty, ``inf`` when exactly
    one is.
    """
    p, g, spacing = _check_pair(pred, gt, spacing)
    if not p.any() and not g.any():
        return {"assd": 0.0, "hd95": 0.0}
    if not p.any() or not g.any():
        return {"assd": math.inf, "hd95": math.inf}
    from monai.metrics import compute_average_surface_distance, compute_hausdorff_distance

    yp = torch.from_numpy(p)[None, None]
    yg = torch.from_numpy(g)[None, None]
    with warnings.catch_warnings():  # MONAI 1.5+ warns about its own internal use of a deprecated argument
        warnings.simplefilter("ignore", FutureWarning)
        assd = compute_average_surface_distance(yp, yg, include_background=True, symmetric=True, spacing=spacing)
        hd95 = compute_hausdorff_distance(yp, yg, include_background=True, percentile=95, spacing=spacing)
    return {"assd": float(assd.item()), "hd95": float(hd95.item())}


def _contour(mask2d: np.ndarray) -> np.ndarray:
    """Boundary pixels of a 2D mask: the mask minus its erosion (4-connected structuring element)."""
    return mask2d & ~ndimage.binary_erosion(mask2d, border_value=0)


def slicewise_surface_distance(pred, gt, spacing: Sequence[float]) -> float:
    """The authors' surface distance (mm): per axial slice, symmetric mean contour distance.

    On every axial slice ``[:, :, z]`` where both masks are present, each contour pixel of
    one mask gets its in-plane Euclidean distance (``spacing[0]``, ``spacing[1]`` mm) to the
    nearest contour pixel of the other; the slice's value is the mean over the contour
    pixels of both masks. The result averages the slices. ``inf`` when no slice has both
    masks but the truth is present (e.g. an empty prediction); 0 when both masks are empty.
    """
    p, g, spacing = _check_pair(pred, gt, spacing)
    if not p.any() and not g.any():
        return 0.0
    sampling = spacing[:2]
    values = []
    for z in range(p.shape[2]):
        a, b = p[:, :, z], g[:, :, z]
        if not a.any() or not b.any():
            continue
        ca, cb = _contour(a), _contour(b)
        # distance of every pixel to the nearest contour pixel of the other mask
        to_b = ndimage.distance_transform_edt(~cb, sampling=sampling)
        to_a = ndimage.distance_transform_edt(~ca, sampling=sampling)
        d = np.concatenate([to_b[ca], to_a[cb]])
        values.append(float(d.mean()))
    return float(np.mean(values)) if values else math.inf


def case_metrics(pred, gt, spacing: Sequence[float]) -> dict[str, float]:
    """All metrics of one case: ``dice``, ``precision``, ``recall``, ``assd``, ``hd95``,
    ``surface_distance`` (the authors', :func:`slicewise_surface_distance`), the volumes
    ``pred_ml`` and ``gt_ml``, and ``empty_pred`` (1.0 when the prediction is empty)."""
    p, g, spacing = _check_pair(pred, gt, spacing)
    voxel_ml = spacing[0] * spacing[1] * spacing[2] / 1000.0
    out = overlap_metrics(p, g)
    out.update(surface_metrics(p, g, spacing))
    out["surface_distance"] = slicewise_surface_distance(p, g, spacing)
    out["pred_ml"] = float(p.sum()) * voxel_ml
    out["gt_ml"] = float(g.sum()) * voxel_ml
    out["empty_pred"] = float(not p.any())
    return out
