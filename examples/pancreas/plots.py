"""Figures of a run: training curves, predicted contours over CT, attention maps over CT.

Volumes are ``np.ndarray[X, Y, Z]`` in RAS order; axial slices are shown the radiological way
(patient's right on the left of the picture, anterior up).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Sequence, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["plot_training_curves", "plot_prediction", "plot_attention", "attention_maps"]


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _axial(vol: np.ndarray, z: int) -> np.ndarray:
    return vol[:, :, z].T[::-1, ::-1]


def _best_slice(label: np.ndarray) -> int:
    """The axial slice with the most labelled voxels (the middle one if there are none)."""
    area = label.reshape(-1, label.shape[2]).sum(0)
    return int(area.argmax()) if area.any() else label.shape[2] // 2


def plot_training_curves(logs: Mapping[str, Sequence[Mapping[str, float]]], path: Union[str, Path]) -> None:
    """Loss per step (raw and a moving average) of one or more runs, their validation Dice
    (where measured) and their learning rate.

    ``logs``: run name -> rows with ``"step"``, ``"loss"``, ``"lr"`` and optionally
    ``"val_dice"`` (NaN where not measured): a run's ``log.csv``. The validation panel is left
    out when no run validated; each run's best validation is marked.
    """
    plt = _plt()
    validated = any(np.isfinite(r.get("val_dice", np.nan)) for rows in logs.values() for r in rows)
    widths = [3, 2, 1.3] if validated else [3, 1.3]
    fig, axes = plt.subplots(1, len(widths), figsize=(10 + 3.5 * validated, 3.8), gridspec_kw={"width_ratios": widths})
    ax, ax_lr = axes[0], axes[-1]
    for i, (name, rows) in enumerate(logs.items()):
        if not rows:
            continue
        color = f"C{i}"
        step = np.array([r["step"] for r in rows])
        loss = np.array([r["loss"] for r in rows])
        k = max(1, min(25, len(loss) // 10))
        smooth = np.convolve(loss, np.ones(k) / k, mode="valid")
        ax.plot(step, loss, color=color, alpha=0.25, linewidth=0.8)
        ax.plot(step[k - 1 :], smooth, color=color, linewidth=1.8, label=f"{name} (mean of {k})")
        ax_lr.plot(step, [r["lr"] for r in rows], color=color, label=name)
        dice = np.array([r.get("val_dice", np.nan) for r in rows])
        if validated and np.isfinite(dice).any():
            seen = np.isfinite(dice)
            best = int(np.nanargmax(dice))
            axes[1].plot(step[seen], dice[seen], "o-", color=color, markersize=3, label=name)
            axes[1].plot(step[best], dice[best], "*", color=color, markersize=12, label=f"best: {dice[best]:.3f} at step {step[best]:g}")
    ax.set_xlabel("step")
    ax.set_ylabel("training loss")
    ax.set_title("Training loss")
    ax.grid(alpha=0.3)
    ax.legend()
    if validated:
        axes[1].set_xlabel("step")
        axes[1].set_title("Validation Dice (sliding window)")
        axes[1].grid(alpha=0.3)
        axes[1].legend(fontsize="small")
    ax_lr.set_xlabel("step")
    ax_lr.set_title("Learning rate")
    ax_lr.ticklabel_format(axis="y", style="sci", scilimits=(-2, 2))
    ax_lr.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_prediction(cases: Sequence[Mapping[str, Any]], path: Union[str, Path], title: str = "") -> None:
    """CT slices with the ground truth (green) and prediction (red) contours.

    ``cases``: dicts with ``"case_id"``, ``"image"``, ``"label"``, ``"pred"``
    (``np.ndarray[X, Y, Z]``), as kept by :func:`examples.pancreas.evaluate.evaluate`;
    one column per case, the axial slice with the largest pancreas area.
    """
    plt = _plt()
    fig, axes = plt.subplots(1, len(cases), figsize=(4 * len(cases), 4.4), squeeze=False)
    for ax, case in zip(axes[0], cases):
        z = _best_slice(case["label"])
        ax.imshow(_axial(case["image"], z), cmap="gray", interpolation="nearest")
        for key, color in (("label", "lime"), ("pred", "red")):
            mask = _axial(case[key], z)
            if mask.any():
                ax.contour(mask, levels=[0.5], colors=color, linewidths=1.2)
        ax.set_title(f"{case['case_id']}, z={z}")
        ax.axis("off")
    fig.suptitle((title + ": " if title else "") + "ground truth (green), prediction (red)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


@torch.no_grad()
def attention_maps(model: nn.Module, image: np.ndarray, label: np.ndarray, patch_size: Sequence[int],
                   device: Union[str, torch.device] = "cpu") -> dict[str, Any]:  # fmt: skip
    """The gates' attention coefficients on a patch around the pancreas.

    Crops ``patch_size`` (clamped to the volume) centred on the label's centroid from
    ``image``/``label`` (``np.ndarray[X, Y, Z]``), runs ``model(x, return_attention=True)`` and
    upsamples every gate's ``alpha`` (``Tensor[1, heads, *S_level]``) to the patch. Returns
    ``{"image", "label": np.ndarray[*patch], "alphas": [np.ndarray[heads, *patch] per gated
    level, ascending], "levels": the levels}``.
    """
    centre = np.argwhere(label > 0).mean(0) if label.any() else np.array(label.shape) / 2
    box = []
    for c, p, n in zip(centre, patch_size, label.shape):
        p = min(p, n)
        lo = int(np.clip(round(c - p / 2), 0, n - p))
        box.append(slice(lo, lo + p))
    box = tuple(box)
    img, lab = image[box], label[box]
    x = torch.from_numpy(np.ascontiguousarray(img, dtype=np.float32))[None, None].to(device)
    model.eval()
    _, alphas = model(x, return_attention=True)
    up = [F.interpolate(a.float(), size=img.shape, mode="trilinear", align_corners=False)[0].cpu().numpy() for a in alphas]
    return {"image": img, "label": lab, "alphas": up, "levels": list(getattr(model, "attention_levels", ()))}


def plot_attention(maps: Mapping[str, Any], path: Union[str, Path], title: str = "") -> None:
    """Attention coefficients of every gate head over the CT (the paper's Figure 3 kind).

    ``maps``: the output of :func:`attention_maps`; one row per gated level, one column per
    head, on the axial slice with the largest pancreas area, the label outlined in green.
    """
    plt = _plt()
    alphas, levels = maps["alphas"], maps["levels"]
    if not alphas:
        raise ValueError("plot_attention needs an attention model's maps, got none (a U-Net has no gates)")
    heads = alphas[0].shape[0]
    z = _best_slice(maps["label"])
    fig, axes = plt.subplots(len(alphas), heads + 1, figsize=(3.0 * (heads + 1) + 1.0, 3.0 * len(alphas) + 0.6), squeeze=False, layout="constrained")
    for row, (alpha, level) in enumerate(zip(alphas, levels)):
        ax = axes[row, 0]
        ax.imshow(_axial(maps["image"], z), cmap="gray", interpolation="nearest")
        if maps["label"].any():
            ax.contour(_axial(maps["label"], z), levels=[0.5], colors="lime", linewidths=1.0)
        ax.set_title(f"CT, level {level}")
        for h in range(heads):
            ax = axes[row, h + 1]
            ax.imshow(_axial(maps["image"], z), cmap="gray", interpolation="nearest")
            im = ax.imshow(_axial(alpha[h], z), cmap="jet", alpha=0.45, vmin=0.0, vmax=1.0, interpolation="bilinear")
            if maps["label"].any():
                ax.contour(_axial(maps["label"], z), levels=[0.5], colors="lime", linewidths=0.8)
            ax.set_title(f"gate level {level}, head {h + 1}")
        for ax in axes[row]:
            ax.axis("off")
    fig.colorbar(im, ax=axes.ravel().tolist(), shrink=0.6, label="attention coefficient")
    fig.suptitle((title + ": " if title else "") + "attention coefficients (pancreas outlined in green)")
    fig.savefig(path, dpi=110)
    plt.close(fig)
