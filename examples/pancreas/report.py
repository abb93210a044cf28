"""The Markdown report of a run (``report.md``) and the results table of a comparison."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence, Union

from .evaluate import METRICS

__all__ = ["format_metric", "results_table", "write_report"]

LABELS = {
    "dice": "DSC",
    "precision": "precision",
    "recall": "recall",
    "assd": "ASSD (mm)",
    "hd95": "HD95 (mm)",
    "surface_distance": "S2S (mm)",
}


def format_metric(stat: Mapping[str, Any]) -> str:
    """``mean +- std`` of a :func:`~examples.pancreas.evaluate.summarize` entry, with the
    count of infinite (left-out) cases when there are any."""
    if stat["n"] == 0:
        return f"inf ({stat['n_inf']} cases)"
    text = f"{stat['mean']:.3f} ± {stat['std']:.3f}"
    return text + (f" ({stat['n_inf']} inf left out)" if stat["n_inf"] else "")


def results_table(results: Mapping[str, Mapping[str, Any]]) -> list[list[str]]:
    """Rows of the comparison table (header first): one column per run name in ``results``.

    Each result holds ``"summary"`` (from ``summarize``), ``"params"``, ``"seconds_per_step"``
    and ``"peak_memory_mb"``.
    """
    names = list(results)
    rows = [["", *names]]
    for m in METRICS:
        rows.append([LABELS[m], *(format_metric(results[n]["summary"][m]) for n in names)])
    rows.append(["empty predictions", *(str(results[n]["summary"]["empty_pred"]) for n in names)])
    rows.append(["parameters", *(f"{results[n]['params']:,}" for n in names)])
    rows.append(["time per step (s)", *(f"{results[n]['seconds_per_step']:.3f}" for n in names)])
    rows.append(["peak memory (MiB)", *(f"{results[n]['peak_memory_mb']:.0f}" for n in names)])
    return rows


def _markdown(rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(rows[0]) + " |", "|" + "---|" * len(rows[0])]
    lines += ["| " + " | ".join(r) + " |" for r in rows[1:]]
    return "\n".join(lines)


def plain_table(rows: Sequence[Sequence[str]]) -> str:
    """The table as aligned text for the terminal."""
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in rows)


def write_report(
    path: Union[str, Path],
    title: str,
    config: Mapping[str, Any],
    results: Mapping[str, Mapping[str, Any]],
    *,
    baseline: Optional[Mapping[str, Any]] = None,
    test: Optional[Mapping[str, Any]] = None,
    figures: Sequence[tuple[str, str]] = (),
    notes: Sequence[str] = (),
) -> Path:
    """Write a Markdown report.

    Args:
        path: the ``report.md`` to write.
        title: its heading.
        config: the run's ``Config.to_dict()``.
        results: run name -> result (see :func:`results_table`), plus ``"test_cases"``.
        baseline: the phantom's threshold baseline (``threshold_baseline``'s dict), if any.
        test: the paired test (``compare.paired_test``'s dict), if any.
        figures: ``(caption, relative path)`` of the PNGs to show.
        notes: extra lines (timings, machine load).
    """
    c = config
    data = "the built-in phantom" + f" ({c['phantom_cases']} cases)" if c["data"] is None else f"`{c['data']}` ({c['layout']})"
    lines = [f"# {title}", ""]
    lines += [
        "## Setup",
        "",
        f"- data: {data}; resampled to {tuple(c['spacing'])} mm, HU window {tuple(c['hu_window'])}",
        f"- training: {c['steps']} steps of batch {c['batch_size']}, patches {tuple(c['patch_size'])}, "
        f"pancreas:background patch ratio {c['pos_neg_ratio']}, augmentation {'on' if c['augment'] else 'off'}",
        f"- model: filters {list(c['filters'])}, {c['norm']} norm, deep supervision `{c['deep_supervision']}`"
        + (f", {c['heads']} gate heads" if "attention" in results else ""),
        f"- loss `{c['loss']}`, optimizer `{c['optimizer']}` lr {c['lr']:g} ({c['schedule']} schedule, "
        f"{c['warmup_steps']} warm-up steps), weight decay {c['weight_decay']:g}, seed {c['seed']}",
        f"- evaluation: whole volumes, sliding window {tuple(c['patch_size'])} with overlap {c['sw_overlap']}, "
        "on the held-out test cases: " + ", ".join(next(iter(results.values())).get("test_cases", [])),
        "",
        "## Held-out results",
        "",
        "Mean ± std over the test cases. Distances in mm on the evaluation grid; S2S is the "
        "authors' surface distance (per axial slice, symmetric mean contour distance). An empty "
        "prediction has no surface: its distances are infinite, left out of the means and counted. "
        "Time per step excludes the first step; peak memory is PyTorch's peak allocation on a GPU, "
        "the training process's peak resident set on the CPU.",
        "",
        _markdown(results_table(results)),
        "",
    ]
    if baseline is not None:
        a, b = baseline["interval"]
        lines += [
            f"Threshold baseline (the best single HU interval, [{a:g}, {b:g}) HU, chosen on these same "
            f"test cases, so optimistic): Dice {baseline['dice']:.3f}. The pancreas fills "
            f"{100 * baseline['pancreas_fraction']:.2f}% of the volume.",
            "",
        ]
    if test is not None:
        lines += [f"Paired test on per-case Dice ({test['test']}, n = {test['n']}): " + _test_text(test), ""]
    if figures:
        lines += ["## Figures", ""]
        for caption, rel in figures:
            lines += [f"![{caption}]({rel})", "", f"*{caption}*", ""]
    if notes:
        lines += ["## Notes", "", *(f"- {n}" for n in notes), ""]
    path = Path(path)
    path.write_text("\n".join(lines))
    return path


def _test_text(test: Mapping[str, Any]) -> str:
    p = test["p_value"]
    text = f"mean difference {test['mean_difference']:+.3f}, " + ("p not defined" if math.isnan(p) else f"p = {p:.3g}")
    return text + (f". {test['note']}" if test.get("note") else ".")
