"""The Markdown report of a run (``report.md``), the results table, and the paired comparison
of two models (table and sentences) from :mod:`examples.pancreas.stats`."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence, Union

from attention_gates.files import atomic_write

from .evaluate import METRICS

__all__ = [
    "LABELS",
    "format_metric",
    "results_table",
    "comparison_table",
    "comparison_sentence",
    "spread_sentence",
    "plain_table",
    "write_report",
]

#: Row labels of the metrics in the tables and sentences.
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


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" + ("" if n == 1 else "s")


def _difference(x: float) -> str:
    """Signed, 3 decimals; 2 significant digits for a non-zero value that would round to 0."""
    return "nan" if math.isnan(x) else f"{x:+.2g}" if 0 < abs(x) < 5e-4 else f"{x:+.3f}"


def comparison_table(
    comparison: Mapping[str, Mapping[str, Any]],
    a: str,
    b: str,
    spread: Optional[Mapping[str, Mapping[str, Any]]] = None,
) -> list[list[str]]:
    """Rows of the paired-comparison table (header first), one row per metric.

    Args:
        comparison: metric -> :func:`~examples.pancreas.stats.paired_comparison` of model A
            (named ``a``) against model B (``b``).
        a, b: the two models' names.
        spread: metric -> :func:`~examples.pancreas.stats.seed_spread`, for the columns of the
            standard deviations across training seeds; ``None`` for one seed.
    """
    verdicts = {"a": f"{a} better", "b": f"{b} better", "none": "no difference shown", "mixed": "mixed evidence",
                "undecidable": "n too small to decide"}  # fmt: skip
    level = next(iter(comparison.values()))["level"]
    header = ["", "n", a, b, "A − B", f"{level:.0%} CI", "p", "smallest p", "A / B better / tied", "shows"]
    if spread is not None:
        header += ["seed sd A", "seed sd B", "seed sd A − B"]
    rows = [header]
    for m, c in comparison.items():
        n = f"{c['n']}" + (f" (+{c['n_left_out']} inf)" if c["n_left_out"] else "")
        row = [LABELS[m], n, f"{c['mean_a']:.3f}", f"{c['mean_b']:.3f}", _difference(c["mean_difference"]),
               f"{_difference(c['ci'][0])} to {_difference(c['ci'][1])}", f"{c['p_value']:.2g}", f"{c['smallest_p']:.2g}",
               f"{c['wins_a']} / {c['wins_b']} / {c['ties']}", verdicts[c["verdict"]]]  # fmt: skip
        if spread is not None:
            row += [f"{spread[m][k]:.3f}" for k in ("sd_a", "sd_b", "sd_difference")]
        rows.append(row)
    return rows


def comparison_sentence(c: Mapping[str, Any], a: str, b: str, metric: str) -> str:
    """One sentence of what a :func:`~examples.pancreas.stats.paired_comparison` ``c`` of model
    ``a`` against model ``b`` on ``metric`` supports: the difference, its interval, the test,
    the wins, and the conclusion its ``verdict`` allows (with the smallest attainable p when
    the cases are too few for the test to decide)."""
    n, lo, hi = c["n"], *c["ci"]
    left = f" (and {c['n_left_out']} left out: an infinite distance)" if c["n_left_out"] else ""
    if n == 0:
        return f"No case has a finite {metric} for both the {a} and the {b}{left}: there is nothing to compare."
    if c["n_nonzero"] == 0:
        return f"The {a} and the {b} score the same {metric} on every one of the n = {n} held-out cases{left}: there is no difference to test."
    text = (
        f"{metric}, {a} − {b} on n = {n} held-out {'case' if n == 1 else 'cases'}{left}: mean difference "
        f"{_difference(c['mean_difference'])} ({c['level']:.0%} CI {_difference(lo)} to {_difference(hi)}), Wilcoxon signed-rank "
        f"p = {c['p_value']:.2g}, the {a} better on {_count(c['wins_a'], 'case')}, the {b} on {c['wins_b']}, {c['ties']} tied"
    )
    verdict, alpha = c["verdict"], c["alpha"]
    if verdict == "undecidable":
        return text + (
            f"; but with {_count(c['n_nonzero'], 'non-zero difference')} the smallest p this test can give is {c['smallest_p']:.2g}, "
            f"not below {alpha:g}, so these cases cannot show a difference whatever the models do "
            f"(it takes at least {c['cases_needed']} pairs without ties or zero differences)."
        )
    if verdict in ("a", "b"):
        return text + f": the numbers support the {a if verdict == 'a' else b} being better in {metric}."
    if verdict == "none":
        return text + f": the numbers do not show a difference in {metric}; they leave room for one from {_difference(lo)} to {_difference(hi)}."
    found = "finds a difference" if c["p_value"] < alpha else "finds none"
    interval = "excludes 0" if lo > 0 or hi < 0 else "includes 0"
    if c["p_value"] < alpha and interval == "excludes 0":  # both find a difference, in opposite directions

        def favoured(sign: float) -> str:
            return a if (sign > 0) == c["higher_is_better"] else b

        found, interval = f"favours the {favoured(c['rank_direction'])}", f"favours the {favoured(lo)}"
    return text + f": the evidence is mixed (the signed-rank test {found}, the interval of the mean {interval}), too weak to call either model better in {metric}."


ONE_SEED = (
    "Each model was trained once: the test speaks of these two trained models on these cases. How far the "
    "training seed alone moves either model is not measured here; on small data it can exceed the gates' "
    "effect (`--seeds N` trains both with N seeds and reports the spread beside the difference)."
)


def spread_sentence(s: Mapping[str, Any], c: Mapping[str, Any], a: str, b: str, metric: str) -> str:
    """One sentence comparing the spread across training seeds (a
    :func:`~examples.pancreas.stats.seed_spread` ``s``) with the models' mean difference in
    the paired comparison ``c``."""
    low, high = min(s["difference"]), max(s["difference"])
    text = (
        f"Across {s['seeds']} training seeds the mean {metric} has a standard deviation of {s['sd_a']:.3f} ({a}) and "
        f"{s['sd_b']:.3f} ({b}); the difference per seed runs from {_difference(low)} to {_difference(high)} (sd {s['sd_difference']:.3f})"
    )
    largest, gap = max(s["sd_a"], s["sd_b"]), abs(c["mean_difference"])
    if largest > gap:
        return text + f": the training seed moves a model's mean (sd up to {largest:.3f}) more than the {gap:.3f} between the models."
    return text + f": the {gap:.3f} between the models is larger than the seed's effect on either (sd up to {largest:.3f})."


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
    comparisons: Sequence[Mapping[str, Any]] = (),
    seeds: Sequence[int] = (),
    figures: Sequence[tuple[str, str]] = (),
    notes: Sequence[str] = (),
) -> Path:
    """Write a Markdown report (atomically).

    Args:
        path: the ``report.md`` to write.
        title: its heading.
        config: the run's ``Config.to_dict()``.
        results: run name -> result (see :func:`results_table`), plus ``"test_cases"``.
        baseline: the phantom's threshold baseline (``threshold_baseline``'s dict), if any.
        comparisons: paired comparisons, each ``{"a": name, "b": name, "metrics": {metric:
            paired_comparison}, "spread": {metric: seed_spread} or None}``
            (:mod:`examples.pancreas.stats`); ``"dice"`` among the metrics, the one the
            conclusion is drawn on.
        seeds: the training seeds the comparisons average over, when more than one.
        figures: ``(caption, relative path)`` of the PNGs to show.
        notes: extra lines (timings, machine load).
    """
    c = config
    if c["data"] is not None:
        data = f"`{c['data']}` ({c['layout']})"
    elif c.get("phantom_test_cases"):
        data = f"the built-in phantom ({c['phantom_cases']} cases to train and validate on, {c['phantom_test_cases']} more held out for the test)"
    else:
        data = f"the built-in phantom ({c['phantom_cases']} cases)"
    test_cases = next(iter(results.values())).get("test_cases", [])
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
        f"{c['warmup_steps']} warm-up steps), weight decay {c['weight_decay']:g}, "
        + (f"seeds {', '.join(map(str, seeds))}" if len(seeds) > 1 else f"seed {c['seed']}"),
        f"- evaluation: whole volumes, sliding window {tuple(c['patch_size'])} with overlap {c['sw_overlap']}, "
        f"on the {len(test_cases)} held-out test cases: " + ", ".join(test_cases),
        "",
        "## Held-out results",
        "",
        ("" if len(seeds) < 2 else f"Training seed {seeds[0]}. ")
        + "Mean ± std over the test cases. Every metric in each case's original geometry (the prediction resampled onto the label's grid), distances in mm; S2S is the "
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
    if comparisons:
        lines += _comparison_lines(comparisons, seeds)
    if figures:
        lines += ["## Figures", ""]
        for caption, rel in figures:
            lines += [f"![{caption}]({rel})", "", f"*{caption}*", ""]
    if notes:
        lines += ["## Notes", "", *(f"- {n}" for n in notes), ""]
    return atomic_write(path, "\n".join(lines))


def _comparison_lines(comparisons: Sequence[Mapping[str, Any]], seeds: Sequence[int]) -> list[str]:
    first = next(iter(comparisons[0]["metrics"].values()))
    method = (
        "Each pair of models is compared on the same test cases: A − B per case (for the distances a negative "
        f"difference favours A), its mean with a {first['level']:.0%} percentile-bootstrap interval "
        f"({first['resamples']:,} resamples of the cases, seed {first['seed']}), and the two-sided Wilcoxon "
        "signed-rank p (scipy's: zero differences dropped; the exact distribution without ties, else the "
        "permutation distribution up to 13 pairs and the normal approximation above). Smallest p: the p of the "
        f"most extreme outcome these cases allow; unless it is below {first['alpha']:g} the test cannot decide. "
        "Pairs with an infinite distance are left out. The conclusion is drawn on DSC, the paper's metric; the "
        "other rows are secondary, each tested at the same level without a correction for testing several."
    )
    if len(seeds) > 1:
        method += (
            f" Per-case values are the means over the {len(seeds)} training seeds; seed sd: the standard deviation "
            "across seeds of each model's mean and of the mean difference."
        )
    lines = ["## Paired comparison", "", method, ""]
    for comp in comparisons:
        a, b, metrics, spread = comp["a"], comp["b"], comp["metrics"], comp.get("spread")
        lines += [f"### A = {a}, B = {b}", "", _markdown(comparison_table(metrics, a, b, spread)), ""]
        lines += [comparison_sentence(metrics["dice"], a, b, LABELS["dice"]), ""]
        if spread is not None:
            lines += [spread_sentence(spread["dice"], metrics["dice"], a, b, LABELS["dice"]), ""]
        else:
            lines += [ONE_SEED, ""]
    return lines
