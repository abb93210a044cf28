"""Tests of the paired statistics of the pancreas comparison (examples/pancreas/stats.py) and
of the report's table and sentences built on them (report.py).

Known answers: scipy's signed-rank test on fixed pairs and hand-counted exact p-values, the
exact bootstrap distribution of two cases, scipy's percentile bootstrap, and the coverage of
the interval on simulated data (fixed seed).
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest

scipy_stats = pytest.importorskip("scipy.stats")
pytest.importorskip("monai")  # report.py imports the evaluation module

from examples.pancreas.report import comparison_sentence, comparison_table, spread_sentence, write_report  # noqa: E402
from examples.pancreas.stats import bootstrap_ci, cases_needed, paired_comparison, seed_spread, smallest_p_value  # noqa: E402

A, B = "Attention U-Net", "U-Net"


# ----------------------------------------------------------------------------- bootstrap


def test_bootstrap_ci_of_a_constant_difference_has_zero_width():
    low, high = bootstrap_ci([0.03] * 24)
    assert low == high == pytest.approx(0.03)


def test_bootstrap_ci_of_two_cases_is_their_range():
    """With two cases the resampled means are x1, (x1 + x2) / 2 and x2 with chances 1/4, 1/2,
    1/4: the 2.5% and 97.5% quantiles are exactly x1 and x2."""
    assert bootstrap_ci([-0.2, 0.5], resamples=4000, seed=3) == (-0.2, 0.5)


def test_bootstrap_ci_is_seeded_and_agrees_with_scipys_percentile_bootstrap():
    d = np.random.default_rng(0).normal(0.02, 0.05, size=25)
    ours = bootstrap_ci(d, resamples=20_000, seed=1)
    assert ours == bootstrap_ci(d, resamples=20_000, seed=1)
    assert ours != bootstrap_ci(d, resamples=20_000, seed=2)
    theirs = scipy_stats.bootstrap((d,), np.mean, n_resamples=20_000, method="percentile", rng=np.random.default_rng(5)).confidence_interval
    se = d.std(ddof=1) / math.sqrt(d.size)
    # both are Monte-Carlo estimates of the same quantiles: about 0.03 standard errors apart
    assert ours[0] == pytest.approx(theirs.low, abs=0.15 * se) and ours[1] == pytest.approx(theirs.high, abs=0.15 * se)
    assert ours[0] < d.mean() < ours[1]


def test_bootstrap_ci_covers_the_true_mean_about_95_percent_of_the_time():
    rng = np.random.default_rng(11)
    trials = 200
    covered = sum(lo <= 0.3 <= hi for lo, hi in (bootstrap_ci(rng.normal(0.3, 1.0, 24), resamples=2000, seed=k) for k in range(trials)))
    assert 0.88 <= covered / trials <= 0.99  # percentile intervals run slightly narrow at n = 24


def test_bootstrap_ci_level_widens_the_interval():
    d = np.random.default_rng(2).normal(size=30)
    (lo90, hi90), (lo99, hi99) = bootstrap_ci(d, level=0.9), bootstrap_ci(d, level=0.99)
    assert lo99 < lo90 < hi90 < hi99


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(differences=[]), "at least one"),
        (dict(differences=[0.1, math.inf]), "finite"),
        (dict(differences=[[0.1, 0.2]]), "1-D"),
        (dict(differences=[0.1, 0.2], level=1.0), "level"),
        (dict(differences=[0.1, 0.2], resamples=0), "resamples"),
    ],
)
def test_bootstrap_ci_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        bootstrap_ci(**kwargs)


# ----------------------------------------------------------------------------- signed-rank test


def test_p_value_is_scipys_on_fixed_pairs():
    rng = np.random.default_rng(4)
    a = rng.uniform(0.7, 0.9, 24)
    b = a - rng.normal(0.01, 0.02, 24)
    c = paired_comparison(a, b)
    want = scipy_stats.wilcoxon(a, b)
    assert c["p_value"] == want.pvalue and c["statistic"] == want.statistic
    assert c["mean_difference"] == pytest.approx(np.mean(a - b))
    assert (c["mean_a"], c["mean_b"]) == (pytest.approx(a.mean()), pytest.approx(b.mean()))


def test_p_value_known_exact_answers():
    # differences 1..5 and -6: the negative rank sum is 6; 14 of the 64 sign patterns give a
    # rank sum <= 6 (subsets of {1..6} summing to at most 6), so p = 2 * 14 / 64
    base = np.full(6, 0.5)
    assert paired_comparison(base + [1, 2, 3, 4, 5, -6], base)["p_value"] == pytest.approx(2 * 14 / 64)
    # every difference positive: the exact two-sided p is 2 / 2^n
    a = [0.8, 0.82, 0.85, 0.79, 0.9, 0.88, 0.84, 0.86]
    c = paired_comparison(a, [x - 0.01 * (i + 1) for i, x in enumerate(a)])
    assert c["p_value"] == pytest.approx(2 / 2**8) and c["wins_a"] == 8 and c["wins_b"] == c["ties"] == 0


def test_zero_differences_are_dropped_as_scipy_does():
    a = np.array([0.5, 0.5, 1.5, 2.5, 3.5, 4.5, 5.5, 6.5])
    b = np.array([0.5, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5])  # two zeros, six positive differences
    c = paired_comparison(a, b)
    assert c["p_value"] == pytest.approx(2 / 2**6) == scipy_stats.wilcoxon(a, b).pvalue
    assert (c["n"], c["n_nonzero"], c["ties"], c["wins_a"]) == (8, 6, 2, 6)
    assert c["smallest_p"] == pytest.approx(2 / 2**6)


def test_all_equal_values_give_p_one_without_a_warning():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        c = paired_comparison([0.8] * 10, [0.8] * 10)
    assert c["p_value"] == 1.0 and c["ci"] == [0.0, 0.0] and c["verdict"] == "undecidable" and c["ties"] == 10


# ----------------------------------------------------------------------------- too few cases


@pytest.mark.parametrize("n", range(1, 21))
def test_smallest_p_without_ties_is_two_over_two_to_the_n(n):
    d = np.linspace(0.01, 0.2, n) * np.where(np.arange(n) % 2, 1, -1)  # signs do not matter
    assert smallest_p_value(d) == pytest.approx(min(1.0, 2 / 2**n))


def test_the_test_can_decide_from_six_cases_not_five():
    """With 5 pairs even 5 wins out of 5 give p = 0.0625; with 6 they give 0.03125."""
    five, six = paired_comparison(np.arange(5) + 1.0, np.zeros(5)), paired_comparison(np.arange(6) + 1.0, np.zeros(6))
    assert five["smallest_p"] == five["p_value"] == pytest.approx(0.0625) and not five["decidable"]
    assert five["verdict"] == "undecidable" and five["cases_needed"] == 6
    assert six["smallest_p"] == six["p_value"] == pytest.approx(0.03125) and six["decidable"] and six["verdict"] == "a"
    # zero differences do not count: 8 pairs with 3 zeros are 5 pairs
    assert not paired_comparison([0, 0, 0, 1, 2, 3, 4, 5], np.zeros(8))["decidable"]


@pytest.mark.parametrize("alpha", [0.1, 0.05, 0.01, 0.001])
def test_cases_needed_is_where_the_smallest_p_drops_below_alpha(alpha):
    n = cases_needed(alpha)
    assert smallest_p_value(np.arange(1.0, n + 1)) < alpha <= smallest_p_value(np.arange(1.0, n))
    assert cases_needed(0.05) == 6


def test_smallest_p_with_ties_is_scipys_p_of_the_most_extreme_outcome():
    # 15 pairs, 10 zero differences and 5 tied ones: scipy uses the normal approximation here,
    # which goes below the exact 2 / 2^5; the smallest p follows scipy, as the p-values do
    d = np.r_[np.zeros(10), np.ones(5)]
    assert smallest_p_value(-d) == scipy_stats.wilcoxon(d).pvalue < 2 / 2**5
    assert smallest_p_value(np.zeros(4)) == 1.0


# ----------------------------------------------------------------------------- wins, infinities, errors


def test_distances_lower_is_better_and_infinities_are_left_out():
    a = [1.0, 2.0, math.inf, 3.0, 4.0]
    b = [2.0, 2.0, 5.0, 1.0, math.inf]
    c = paired_comparison(a, b, higher_is_better=False)
    assert (c["n"], c["n_left_out"], c["wins_a"], c["wins_b"], c["ties"]) == (3, 2, 1, 1, 1)
    assert c["mean_difference"] == pytest.approx((-1 + 0 + 2) / 3)
    higher = paired_comparison(a, b)
    assert (higher["wins_a"], higher["wins_b"]) == (1, 1) and higher["mean_difference"] == c["mean_difference"]
    empty = paired_comparison([math.inf], [1.0])
    assert empty["n"] == 0 and math.isnan(empty["p_value"]) and empty["verdict"] == "undecidable"


@pytest.mark.parametrize(
    "a, b, match",
    [([0.1, 0.2], [0.1], "same cases"), ([0.1, math.nan], [0.1, 0.2], "NaN"), ([[0.1]], [[0.2]], "1-D")],
)
def test_paired_comparison_errors(a, b, match):
    with pytest.raises(ValueError, match=match):
        paired_comparison(a, b)


def test_cases_needed_error():
    with pytest.raises(ValueError, match="alpha"):
        cases_needed(0.0)


# ----------------------------------------------------------------------------- verdicts and sentences


def _clear(n=24, shift=0.03, seed=0):
    rng = np.random.default_rng(seed)
    b = rng.uniform(0.75, 0.9, n)
    return b + shift + rng.normal(0, 0.01, n), b


def test_clear_win_sentence():
    c = paired_comparison(*_clear())
    assert c["verdict"] == "a" and c["p_value"] < 0.001 and c["ci"][0] > 0
    s = comparison_sentence(c, A, B, "DSC")
    assert s.startswith(f"DSC, {A} − {B} on n = 24 held-out cases: mean difference +0.03")
    assert f"p = {c['p_value']:.2g}" in s and f"the {A} better on {c['wins_a']} cases, the {B} on {c['wins_b']}" in s
    assert s.endswith(f"the numbers support the {A} being better in DSC.")


def test_clear_loss_sentence_and_a_distance():
    c = paired_comparison(*_clear(shift=-0.03))
    assert c["verdict"] == "b" and c["ci"][1] < 0
    assert comparison_sentence(c, A, B, "DSC").endswith(f"the numbers support the {B} being better in DSC.")
    a, b = _clear(shift=-0.5)  # a lower distance is a win for A
    d = paired_comparison(a, b, higher_is_better=False)
    assert d["verdict"] == "a" and d["wins_a"] > d["wins_b"]


def test_no_difference_and_mixed_sentences():
    rng = np.random.default_rng(8)
    b = rng.uniform(0.75, 0.9, 24)
    c = paired_comparison(b + rng.normal(0, 0.02, 24), b)
    assert c["verdict"] == "none"
    lo, hi = c["ci"]
    assert comparison_sentence(c, A, B, "DSC").endswith(f"do not show a difference in DSC; they leave room for one from {lo:+.3f} to {hi:+.3f}.")
    # 20 small wins and one large loss: the ranks favour A (p < 0.05), the mean's interval spans 0
    m = paired_comparison(np.r_[np.full(20, 0.81), 0.0], np.r_[np.full(20, 0.8), 1.0])
    assert m["p_value"] < 0.05 and m["ci"][0] < 0 < m["ci"][1] and m["verdict"] == "mixed"
    assert "the evidence is mixed (the signed-rank test finds a difference, the interval of the mean includes 0)" in comparison_sentence(m, A, B, "DSC")


def test_mixed_sentence_when_the_ranks_and_the_mean_point_opposite_ways():
    # 28 small losses and 4 large wins: the signed-rank sum favours B (p < 0.01), the mean A
    c = paired_comparison(np.r_[np.full(28, -0.01), np.full(4, 1.0)], np.zeros(32))
    assert c["p_value"] < 0.01 and c["rank_direction"] == -1 and c["ci"][0] > 0 and c["verdict"] == "mixed"
    s = comparison_sentence(c, A, B, "DSC")
    assert f"the evidence is mixed (the signed-rank test favours the {B}, the interval of the mean favours the {A})" in s
    d = paired_comparison(np.r_[np.full(28, -0.01), np.full(4, 1.0)], np.zeros(32), higher_is_better=False)
    assert f"the signed-rank test favours the {A}, the interval of the mean favours the {B}" in comparison_sentence(d, A, B, "HD95 (mm)")


@pytest.mark.parametrize("n", range(1, 6))
def test_undecidable_sentence_computes_the_smallest_p_from_n(n):
    a, b = _clear(n=n)
    c = paired_comparison(a, b)
    s = comparison_sentence(c, A, B, "DSC")
    assert c["verdict"] == "undecidable"
    differences = "1 non-zero difference" if n == 1 else f"{n} non-zero differences"
    assert f"with {differences} the smallest p this test can give is {2 / 2**n:.2g}, not below 0.05" in s
    assert "cannot show a difference whatever the models do (it takes at least 6 pairs" in s


def test_sentences_without_pairs_or_differences():
    assert "nothing to compare" in comparison_sentence(paired_comparison([math.inf], [1.0]), A, B, "HD95 (mm)")
    assert "no difference to test" in comparison_sentence(paired_comparison([0.8] * 4, [0.8] * 4), A, B, "DSC")


def test_comparison_table_rows():
    c = {"dice": paired_comparison(*_clear()), "hd95": paired_comparison([1.0, math.inf, 3.0], [2.0, 2.0, 2.0], higher_is_better=False)}
    rows = comparison_table(c, A, B)
    assert rows[0][:5] == ["", "n", A, B, "A − B"] and len(rows) == 3
    assert rows[1][0] == "DSC" and rows[1][-1] == f"{A} better"
    assert rows[2][:2] == ["HD95 (mm)", "2 (+1 inf)"] and rows[2][-1] == "n too small to decide"
    near_zero = {"dice": {**c["dice"], "ci": [0.0002, 0.0131]}}  # a bound that would print as +0.000
    assert comparison_table(near_zero, A, B)[1][5] == "+0.0002 to +0.013"
    spread = {k: seed_spread([[1.0, 2.0], [2.0, 3.0]], [[1.0, 1.0], [1.0, 1.0]]) for k in c}
    assert comparison_table(c, A, B, spread)[1][-3:] == [f"{math.sqrt(0.5):.3f}", "0.000", f"{math.sqrt(0.5):.3f}"]


# ----------------------------------------------------------------------------- seeds


def test_seed_spread_known_answer():
    s = seed_spread([[1.0, 1.0, math.inf], [3.0, 3.0, 1.0]], [[0.0, 0.0, 0.0], [1.0, 1.0, 0.0]])
    assert s["seeds"] == 2 and s["mean_a"] == [1.0, 3.0] and s["mean_b"] == [0.0, 1.0] and s["difference"] == [1.0, 2.0]
    assert s["sd_a"] == pytest.approx(math.sqrt(2)) and s["sd_b"] == pytest.approx(math.sqrt(0.5))
    assert s["sd_difference"] == pytest.approx(math.sqrt(0.5))
    assert math.isnan(seed_spread([[1.0, 2.0]], [[0.0, 1.0]])["sd_a"])
    with pytest.raises(ValueError, match="same shape"):
        seed_spread([[1.0, 2.0]], [[1.0]])
    with pytest.raises(ValueError, match="NaN"):
        seed_spread([[math.nan]], [[1.0]])


def test_spread_sentence_says_whether_the_seed_or_the_models_matter_more():
    c = paired_comparison(*_clear(shift=0.01))
    big = seed_spread([[0.80], [0.90], [0.85]], [[0.80], [0.85], [0.90]])
    assert big["sd_a"] > abs(c["mean_difference"])
    gap = f"{abs(c['mean_difference']):.3f}"
    assert f"the training seed moves a model's mean (sd up to 0.050) more than the {gap} between the models" in spread_sentence(big, c, A, B, "DSC")
    small = seed_spread([[0.800], [0.801]], [[0.790], [0.792]])
    assert "is larger than the seed's effect on either" in spread_sentence(small, c, A, B, "DSC")


def test_write_report_gives_the_comparison_table_and_sentence(tmp_path):
    from examples.pancreas.config import preset
    from examples.pancreas.evaluate import METRICS

    a, b = _clear()
    metrics = {m: paired_comparison(a, b, higher_is_better=m in ("dice", "precision", "recall")) for m in METRICS}
    row = {"mean": 0.8, "std": 0.1, "n": 24, "n_inf": 0}
    result = {"summary": {**{m: row for m in METRICS}, "empty_pred": 0}, "params": 10, "seconds_per_step": 0.1, "peak_memory_mb": 1.0,
              "test_cases": [f"phantom_{100_000 + i}" for i in range(24)]}  # fmt: skip
    path = write_report(tmp_path / "report.md", "t", preset("demo").to_dict(), {A: result, B: result},
                        comparisons=[{"a": A, "b": B, "metrics": metrics, "spread": None}])  # fmt: skip
    text = path.read_text()
    assert "16 cases to train and validate on, 24 more held out for the test" in text
    assert "on the 24 held-out test cases: phantom_100000" in text
    assert "95% percentile-bootstrap interval (10,000 resamples of the cases, seed 0)" in text
    assert "| DSC | 24 |" in text and comparison_sentence(metrics["dice"], A, B, "DSC") in text
    assert "Each model was trained once" in text  # one seed: the report says what it cannot tell
    assert not list(tmp_path.glob(".*tmp"))  # written through a temporary file, which is gone
