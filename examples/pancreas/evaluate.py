"""Whole-volume evaluation: sliding-window inference, per-case metrics, mean +- std.

Cases go through the data's evaluation transforms (resampled to the training spacing, whole
volumes, no cropping) and the model's softmax is computed with MONAI's
``sliding_window_inference`` over windows of the training patch size (Gaussian blending).
The prediction is then taken back to each case's own grid (MONAI's ``ResampleToMatch``, nearest
neighbour), where the metrics (:mod:`examples.pancreas.metrics`) are measured against the label
as it was stored, in mm, as the paper and the challenge leaderboards report them. The
validation Dice during training (:func:`validation_dice`) stays on the training grid: it only
ranks checkpoints, and it is cheaper there.
"""

from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import numpy as np
import torch
from torch import Tensor, nn

from attention_gates.files import atomic_write

from .config import Config
from .metrics import case_metrics

__all__ = ["inference_model", "infer", "preferred_layout", "validation_dice", "evaluate", "summarize", "write_results", "jsonable", "METRICS"]

#: Metric columns of the per-case rows, in table order.
METRICS = ("dice", "precision", "recall", "assd", "hd95", "surface_distance")
DISTANCES = ("assd", "hd95", "surface_distance")


def inference_model(model: nn.Module, device: Union[str, torch.device]) -> nn.Module:
    """The model to segment with on ``device``, in evaluation mode: on the CPU a copy made by
    :func:`attention_gates.cpu.optimize_for_inference` (oneDNN for single windows, channels-last,
    and the gated skips folded, unless a gate was given an explicit backend, which folded gates
    would not use; ``model`` itself is left as it was, trainable), elsewhere ``model``. Make it
    once per evaluation, not per volume."""
    if torch.device(device).type == "cpu":
        from attention_gates import GridAttentionGate
        from attention_gates.cpu import optimize_for_inference

        explicit = any(isinstance(m, GridAttentionGate) and m.backend not in (None, "auto") for m in model.modules())
        return optimize_for_inference(model, fold=not explicit)
    return model.eval()


@torch.inference_mode()
def infer(model: nn.Module, image: Tensor, cfg: Config, device: Union[str, torch.device] = "cpu") -> Tensor:
    """Class probabilities of one volume by sliding-window inference.

    ``model``: from :func:`inference_model`. ``image``: ``Tensor[1, X, Y, Z]`` (channel first,
    preprocessed); returns ``Tensor[out_channels, X, Y, Z]`` (softmax, float32, on the CPU). The
    windows go in :func:`preferred_layout`.
    """
    from monai.inferers import sliding_window_inference

    if image.dim() != 4 or image.shape[0] != 1:
        raise ValueError(f"image must be Tensor[1, X, Y, Z], got shape {list(image.shape)}")
    device = torch.device(device)
    x = image.as_tensor() if hasattr(image, "as_tensor") else image
    x = x[None].float().to(device)
    fmt = preferred_layout(device)
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.amp and device.type == "cuda"):
        logits = sliding_window_inference(
            x, cfg.patch_size, cfg.sw_batch_size, lambda w: model(w.contiguous(memory_format=fmt)),
            overlap=cfg.sw_overlap, mode="gaussian",
        )  # fmt: skip
    return torch.softmax(logits.float(), dim=1)[0].cpu()


def preferred_layout(device: torch.device) -> torch.memory_format:
    """The memory layout the 3D models run fastest in on ``device``: ``channels_last_3d`` on the
    CPU (oneDNN's convolutions work on ``NDHWC`` without reordering), else contiguous."""
    return torch.channels_last_3d if device.type == "cpu" else torch.contiguous_format


def _spacing(t: Any, fallback: Sequence[float]) -> tuple[float, ...]:
    pixdim = getattr(t, "pixdim", None)
    return tuple(float(s) for s in pixdim[:3]) if pixdim is not None else tuple(fallback)


def validation_dice(
    model: nn.Module, cases: Sequence[dict[str, Any]], cfg: Config, device: Union[str, torch.device] = "cpu", rank: int = 0, world: int = 1
) -> float:
    """Mean pancreas Dice of sliding-window segmentations of preprocessed ``cases`` (dicts with
    ``"image"`` and ``"label"``, ``Tensor[1, X, Y, Z]`` on the training grid), with MONAI's
    ``compute_dice`` and ``do_metric_reduction`` (an empty prediction of an empty truth scores 1).

    Under ``torch.distributed`` (``world`` > 1) rank ``r`` segments cases ``r, r + world, ...``
    and the sums are all-reduced, so every rank returns the same mean over all cases (a rank
    may have none: MONAI's ``DiceMetric`` would wait for it in its own gather). Segments with
    :func:`inference_model` (off the CPU that is ``model`` itself, left in eval mode).
    """
    import torch.distributed as dist
    from monai.metrics import compute_dice, do_metric_reduction

    total = torch.zeros(2, dtype=torch.float64)
    share = list(cases)[rank::world]
    if share:
        scores, net = [], inference_model(model, device)
        for case in share:
            pred = infer(net, case["image"], cfg, device).argmax(0)
            truth = torch.as_tensor(case["label"][0]).cpu() > 0
            onehot = [torch.stack([~m, m])[None].float() for m in (pred == 1, truth)]
            scores.append(compute_dice(onehot[0], onehot[1], include_background=False, ignore_empty=False))
        summed, counted = do_metric_reduction(torch.cat(scores), "sum")
        total[0], total[1] = float(summed), float(counted)
    if world > 1:
        total = total.to(device)
        dist.all_reduce(total)
        total = total.cpu()
    if total[1] == 0:
        raise ValueError("validation_dice needs at least one case, got none")
    return float(total[0] / total[1])


def evaluate(
    model: nn.Module,
    cases: Sequence[dict[str, Any]],
    cfg: Config,
    device: Union[str, torch.device] = "cpu",
    keep: int = 0,
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Segment and score ``cases`` (dicts with ``"image"``, ``"label"``, ``"case_id"``) in each
    case's original geometry: the prediction, made on the training grid, is resampled (nearest
    neighbour) onto the label's own grid, and the metrics use that grid's spacing.

    Returns ``(rows, kept)``: one row of :func:`~examples.pancreas.metrics.case_metrics`
    (plus ``"case_id"``) per case, and for the first ``keep`` cases the preprocessed arrays on
    the training grid ``{"case_id", "image": np.ndarray[X', Y', Z'], "label", "pred",
    "spacing"}`` for the figures (the model's view).
    """
    from monai.data import MetaTensor
    from monai.transforms import ResampleToMatch

    from .transforms import eval_transforms

    transform = eval_transforms(cfg)
    to_native = ResampleToMatch(mode="nearest")
    rows, kept, net = [], [], inference_model(model, device)
    for i, case in enumerate(cases):
        d = transform(dict(case))
        image, label, native = d["image"], d["label"], d["native_label"]
        pred = infer(net, image, cfg, device).argmax(0, keepdim=True)
        back = to_native(MetaTensor(pred.float(), affine=image.affine), img_dst=native)
        gt = (np.asarray(native[0]) > 0).astype(np.uint8)
        rows.append({"case_id": case["case_id"], **case_metrics(np.asarray(back[0]).round().astype(np.uint8), gt, _spacing(native, cfg.spacing))})
        if i < keep:
            kept.append({"case_id": case["case_id"], "image": np.asarray(image[0]), "label": (np.asarray(label[0]) > 0).astype(np.uint8),
                         "pred": pred[0].numpy().astype(np.uint8), "spacing": _spacing(image, cfg.spacing)})  # fmt: skip
    return rows, kept


def summarize(rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Mean, std, and counts of every metric over cases.

    Infinite distances (an empty prediction) are not averaged: each distance reports its mean
    and std over the finite cases and ``n_inf``, the number of cases left out; ``empty_pred``
    counts the cases with an empty prediction. Dice, precision and recall are averaged over
    all cases (an empty prediction scores 0).
    """
    if not rows:
        raise ValueError("summarize needs at least one case row, got none")
    out: dict[str, Any] = {"cases": len(rows), "empty_pred": int(sum(r["empty_pred"] for r in rows))}
    for m in METRICS:
        values = np.array([r[m] for r in rows], dtype=float)
        finite = values[np.isfinite(values)]
        out[m] = {
            "mean": float(finite.mean()) if finite.size else math.inf,
            "std": float(finite.std(ddof=1)) if finite.size > 1 else 0.0,
            "n": int(finite.size),
            "n_inf": int((~np.isfinite(values)).sum()),
        }
    return out


def write_results(rows: Sequence[dict[str, Any]], summary: dict[str, Any], out: Union[str, Path], name: str = "test",
                  extra: Optional[dict[str, Any]] = None) -> tuple[Path, Path]:  # fmt: skip
    """Write ``metrics_<name>.json`` (``{"summary", "cases", **extra}``) and
    ``metrics_<name>.csv`` (one row per case; ``inf`` written as ``inf``) in ``out``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    json_path, csv_path = out / f"metrics_{name}.json", out / f"metrics_{name}.csv"
    doc = {"summary": summary, "cases": list(rows), **(extra or {})}
    # JSON has no infinity: write it as the string "inf"
    atomic_write(json_path, json.dumps(jsonable(doc), indent=2))
    table = io.StringIO()
    w = csv.DictWriter(table, fieldnames=list(rows[0].keys()))
    w.writeheader()
    w.writerows(rows)
    atomic_write(csv_path, table.getvalue())
    return json_path, csv_path


def jsonable(x: Any) -> Any:
    """``x`` (nested dicts, lists, tuples, numbers, strings) with every non-finite float as the
    string ``"inf"``, ``"-inf"`` or ``"nan"`` (JSON has none of them) and tuples as lists."""
    if isinstance(x, float) and not math.isfinite(x):
        return "inf" if x > 0 else ("-inf" if x < 0 else "nan")
    if isinstance(x, dict):
        return {k: jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [jsonable(v) for v in x]
    return x
