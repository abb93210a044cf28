"""Paired statistics of two models scored on the same test cases.

Pure functions of per-case values (numpy in, floats and dicts out): the mean paired
difference with a seeded percentile-bootstrap confidence interval (:func:`bootstrap_ci`), the
two-sided Wilcoxon signed-rank test as ``scipy.stats.wilcoxon`` computes it by default, the
smallest p-value that test can reach with the cases at hand (:func:`smallest_p_value`), the
number of cases each model wins, and what the numbers support (:func:`paired_comparison`);
with several training seeds, the spread of both models across seeds (:func:`seed_spread`).

The signed-rank test rather than the paired t-test: per-case Dice is bounded and skewed (a
few failures pull the mean), and with the few test cases of a pancreas study normality cannot
be checked; the signed-rank test assumes only differences distributed symmetrically about
their centre. The bootstrap interval speaks of the mean difference, the test of the typical
one: when they disagree the report says so.

How scipy's signed-rank test (``zero_method="wilcox"``, ``method="auto"``) treats zeros and
ties, which this module follows: zero differences are dropped (Wilcoxon's rule), so ``n``
below counts the non-zero ones. Without zeros or tied magnitudes (and up to 50 pairs) the
p-value comes from the exact null distribution; with zeros or ties, from the exact
permutation distribution up to 13 pairs and from the tie-corrected normal approximation with a
continuity correction above. The exact test's smallest two-sided p is ``2 / 2^n`` (every
difference of the same sign), so below 6 non-zero differences no ``p < 0.05`` is possible.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np

__all__ = ["ALPHA", "LEVEL", "RESAMPLES", "bootstrap_ci", "smallest_p_value", "cases_needed", "paired_comparison", "seed_spread"]

#: Significance level of the signed-rank test.
ALPHA = 0.05
#: Coverage of the bootstrap interval.
LEVEL = 0.95
#: Bootstrap resamples.
RESAMPLES = 10_000


def _vector(x: Sequence[float], name: str) -> np.ndarray:
    x = np.asarray(x, dtype=float)
    if x.ndim != 1:
        raise ValueError(f"{name} must be a 1-D sequence of per-case values, got shape {x.shape}")
    return x


def bootstrap_ci(differences: Sequence[float], level: float = LEVEL, resamples: int = RESAMPLES, seed: int = 0) -> tuple[float, float]:
    """Percentile-bootstrap confidence interval of the mean of ``differences``.

    The cases are resampled with replacement ``resamples`` times (a numpy ``Generator``
    seeded with ``seed``: the same input gives the same interval), and the interval runs from
    the ``(1 - level) / 2`` to the ``(1 + level) / 2`` quantile of the resampled means (numpy's
    linear interpolation). Percentile rather than BCa: it is defined for every sample, a
    constant one included (a zero-width interval, where BCa's acceleration is 0 / 0), and for
    a mean over 20 or more cases its coverage is close to the nominal one.

    Args:
        differences: per-case paired differences, ``float[n]``, finite, ``n >= 1``.
        level: the interval's coverage, in ``(0, 1)``.
        resamples: number of bootstrap resamples, ``>= 1``.
        seed: the resampling seed.

    Returns:
        ``(low, high)``.

    Raises:
        ValueError: no differences, a non-finite one, or ``level``/``resamples`` out of range.
    """
    d = _vector(differences, "differences")
    if d.size == 0 or not np.all(np.isfinite(d)):
        raise ValueError(f"differences must be finite and at least one, got {d.tolist()}")
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must be in (0, 1), got {level!r}")
    if isinstance(resamples, bool) or not isinstance(resamples, (int, np.integer)) or resamples < 1:
        raise ValueError(f"resamples must be an int >= 1, got {resamples!r}")
    rng = np.random.default_rng(seed)
    chunk = max(1, 2**20 // d.size)  # resamples per draw: the index array stays below 8 MiB
    means = np.concatenate(
        [d[rng.integers(0, d.size, size=(min(chunk, resamples - i), d.size))].mean(axis=1) for i in range(0, resamples, chunk)]
    )
    low, high = np.quantile(means, [(1.0 - level) / 2.0, (1.0 + level) / 2.0])
    return float(low), float(high)


def smallest_p_value(differences: Sequence[float]) -> float:
    """The smallest two-sided p-value scipy's signed-rank test can give for pairs with these
    differences' magnitudes: its p-value when every non-zero difference has the same sign, the
    most extreme outcome.

    Without zeros or ties that is the exact ``2 / 2^n`` (``n`` pairs, up to 50); zero
    differences are dropped, so ``n`` counts the non-zero ones; with ties the permutation or
    normal-approximation p of the module docstring. 1 when no difference is non-zero.

    Args:
        differences: per-case paired differences, ``float[n]``, finite.
    """
    from scipy.stats import wilcoxon

    d = np.abs(_vector(differences, "differences"))
    if not np.all(np.isfinite(d)):
        raise ValueError(f"differences must be finite, got {d.tolist()}")
    return float(wilcoxon(d).pvalue) if np.any(d) else 1.0


def cases_needed(alpha: float = ALPHA) -> int:
    """The fewest pairs (without zeros or ties) for which the exact two-sided signed-rank test
    can give ``p < alpha``: the smallest ``n`` with ``2 / 2^n < alpha`` (6 for 0.05)."""
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha must be in (0, 1), got {alpha!r}")
    return math.floor(math.log2(2.0 / alpha)) + 1


def paired_comparison(
    a: Sequence[float],
    b: Sequence[float],
    higher_is_better: bool = True,
    alpha: float = ALPHA,
    level: float = LEVEL,
    resamples: int = RESAMPLES,
    seed: int = 0,
) -> dict[str, Any]:
    """Compare model A with model B on the per-case values of one metric.

    Pairs where either value is infinite (a distance of an empty prediction) are left out
    and counted. On the ``n`` remaining pairs, ``d = a - b``:

    - ``mean_difference`` and its ``level`` percentile-bootstrap interval ``ci``
      (:func:`bootstrap_ci` with ``resamples`` and ``seed``);
    - ``p_value``: two-sided Wilcoxon signed-rank test of ``d`` (scipy's defaults, see the
      module docstring); 1 when every difference is zero;
    - ``smallest_p`` (:func:`smallest_p_value`) and ``decidable``: ``smallest_p < alpha``,
      whether any outcome of these cases could show a difference;
    - ``wins_a``/``wins_b``: cases where A/B is better (higher, or lower for a distance with
      ``higher_is_better=False``), ``ties``: equal values;
    - ``rank_direction``: the sign of the signed-rank sum of ``d`` (+1: the larger
      differences are mostly positive), the direction the test points in;
    - ``verdict``: ``"undecidable"`` (not ``decidable``), ``"a"`` or ``"b"`` (the better
      model: ``p < alpha`` and ``ci`` excludes 0 on the side ``rank_direction`` points to),
      ``"none"`` (``p >= alpha`` and ``ci`` includes 0: no difference shown) or ``"mixed"``
      (the test and the interval disagree).

    Args:
        a, b: ``float[n]`` per-case values of the two models, in the same case order.
        higher_is_better: True for Dice, precision, recall; False for distances.
        alpha: the test's significance level.
        level, resamples, seed: of the bootstrap interval.

    Returns:
        The dict above, plus ``n``, ``n_left_out``, ``n_nonzero``, ``mean_a``, ``mean_b``,
        ``statistic`` (scipy's, the smaller signed-rank sum), ``alpha``, ``level``,
        ``resamples``, ``seed``, ``bootstrap`` (``"percentile"``), ``cases_needed``
        (:func:`cases_needed`) and ``higher_is_better``. The numbers are NaN when no pair is
        left.

    Raises:
        ValueError: ``a`` and ``b`` are not 1-D of the same length, or hold a NaN.
    """
    from scipy.stats import rankdata, wilcoxon

    a, b = _vector(a, "a"), _vector(b, "b")
    if a.shape != b.shape:
        raise ValueError(f"a and b must hold the same cases, got {a.size} and {b.size} values")
    if np.isnan(a).any() or np.isnan(b).any():
        raise ValueError(f"per-case values must not be NaN, got a={a.tolist()} and b={b.tolist()}")
    keep = np.isfinite(a) & np.isfinite(b)
    d = a[keep] - b[keep]
    n = int(d.size)
    better = np.sign(d) if higher_is_better else -np.sign(d)
    result: dict[str, Any] = {
        "n": n, "n_left_out": int((~keep).sum()), "n_nonzero": int(np.count_nonzero(d)),
        "mean_a": float(a[keep].mean()) if n else math.nan, "mean_b": float(b[keep].mean()) if n else math.nan,
        "mean_difference": float(d.mean()) if n else math.nan,
        "wins_a": int((better > 0).sum()), "wins_b": int((better < 0).sum()), "ties": int((d == 0).sum()),
        "higher_is_better": bool(higher_is_better), "alpha": alpha, "level": level, "resamples": resamples, "seed": seed,
        "bootstrap": "percentile", "cases_needed": cases_needed(alpha),
        "rank_direction": int(np.sign(np.sum(np.sign(d[d != 0]) * rankdata(np.abs(d[d != 0]))))),  # zeros dropped, as scipy's
    }  # fmt: skip
    if n == 0:
        result.update(ci=[math.nan, math.nan], statistic=math.nan, p_value=math.nan, smallest_p=1.0, decidable=False, verdict="undecidable")
        return result
    result["ci"] = list(bootstrap_ci(d, level, resamples, seed))
    if result["n_nonzero"]:
        test = wilcoxon(d)
        result.update(statistic=float(test.statistic), p_value=float(test.pvalue))
    else:  # scipy gives p = 1 here too, with a warning
        result.update(statistic=0.0, p_value=1.0)
    result["smallest_p"] = smallest_p_value(d)
    result["decidable"] = result["smallest_p"] < alpha
    low, high = result["ci"]
    shown, excludes_zero = result["p_value"] < alpha, low > 0 or high < 0
    if not result["decidable"]:
        verdict = "undecidable"
    elif shown and excludes_zero and np.sign(low) == result["rank_direction"]:
        verdict = "a" if (low > 0) == higher_is_better else "b"
    else:
        verdict = "none" if not (shown or excludes_zero) else "mixed"
    result["verdict"] = verdict
    return result


def seed_spread(a: Sequence[Sequence[float]], b: Sequence[Sequence[float]]) -> dict[str, Any]:
    """How much each model's mean, and the difference, move with the training seed.

    Args:
        a, b: ``float[seeds, cases]`` per-case values of the two models, one row per training
            seed, the same cases in every row. A case with an infinite value in any row of
            ``a`` or ``b`` is left out of every row.

    Returns:
        ``{"seeds", "mean_a": [per seed], "mean_b": [...], "difference": [per-seed mean of
        a - b], "sd_a", "sd_b", "sd_difference"}``: the sample standard deviations (``ddof=1``)
        across seeds; NaN with one seed or when every case is left out.

    Raises:
        ValueError: ``a`` and ``b`` are not 2-D of the same shape, or hold a NaN.
    """
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if a.ndim != 2 or a.shape != b.shape:
        raise ValueError(f"a and b must be float[seeds, cases] of the same shape, got {a.shape} and {b.shape}")
    if np.isnan(a).any() or np.isnan(b).any():
        raise ValueError("per-case values must not be NaN")
    keep = np.isfinite(a).all(axis=0) & np.isfinite(b).all(axis=0)
    a, b = a[:, keep], b[:, keep]
    means = {k: (x.mean(axis=1) if keep.any() else np.full(len(x), math.nan)) for k, x in (("a", a), ("b", b), ("d", a - b))}

    def sd(x: np.ndarray) -> float:
        return float(x.std(ddof=1)) if x.size > 1 else math.nan

    return {
        "seeds": int(a.shape[0]), "mean_a": means["a"].tolist(), "mean_b": means["b"].tolist(), "difference": means["d"].tolist(),
        "sd_a": sd(means["a"]), "sd_b": sd(means["b"]), "sd_difference": sd(means["d"]),
    }  # fmt: skip
