"""The mini-study's statistics (megatron_t2i/experiments/study/stats.py): intervals and computed verdicts
on constructed inputs whose answer is known."""

from __future__ import annotations

import math

import numpy as np
import pytest

from megatron_t2i.experiments.study.stats import (
    CLAIMS,
    Claim,
    bootstrap_interval,
    combine,
    estimate,
    paired_differences,
    t_interval,
    tost_equivalent,
    verdict,
)

EQUIVALENT = Claim("equivalent", margin=0.02)
LOWER = Claim("less", margin=0.02)
NOT_BETTER = Claim("not_less", margin=0.02)


def _arms(diffs: list[float], base: float = 3.0) -> tuple[dict, dict]:
    a = {seed: base + 0.1 * seed for seed in range(len(diffs))}
    return a, {seed: a[seed] + d for seed, d in enumerate(diffs)}


def test_t_interval_matches_the_textbook_formula():
    d = [0.10, 0.14, 0.12]
    mean, lo, hi = t_interval(d)
    half = 4.302652729911275 * np.std(d, ddof=1) / math.sqrt(3)  # t(0.975, df=2)
    assert mean == pytest.approx(0.12) and lo == pytest.approx(0.12 - half)
    assert hi == pytest.approx(0.12 + half)
    assert t_interval([0.3]) == (0.3, -math.inf, math.inf)  # one seed: no interval


def test_pairs_only_seeds_both_arms_have():
    assert paired_differences({1: 2.0, 2: 3.0, 3: 1.0}, {2: 2.5, 3: 2.0, 4: 9.0}) == \
        {2: -0.5, 3: 1.0}
    with pytest.raises(ValueError, match="no seed in common"):
        paired_differences({1: 1.0}, {2: 1.0})


def test_a_clear_difference_contradicts_equivalence_and_reproduces_a_direction():
    a, b = _arms([-0.30, -0.32, -0.29])  # b clearly 0.3 nats lower, seed to seed consistent
    est = estimate(a, b)
    assert est.method == "t over 3 seeds" and est.difference == pytest.approx(-0.3033, abs=1e-3)
    assert est.ci_high < -0.02
    assert verdict(EQUIVALENT, est) == "contradicted"
    assert verdict(LOWER, est) == "reproduced"
    assert verdict(Claim("greater"), est) == "contradicted"
    assert verdict(NOT_BETTER, est) == "contradicted"
    assert verdict(Claim("not_greater"), est) == "reproduced"


def test_a_clear_equivalence_is_reproduced_by_tost():
    a, b = _arms([0.002, -0.001, 0.001, 0.0])
    est = estimate(a, b)
    assert tost_equivalent(est, 0.02)
    assert verdict(EQUIVALENT, est) == "reproduced"
    assert verdict(NOT_BETTER, est) == "reproduced"
    assert verdict(LOWER, est) == "inconclusive"  # no direction either way


def test_an_undecided_case_is_inconclusive():
    # the measured uncond difference: mean -0.085, seeds disagree in sign
    a, b = _arms([-0.15, -0.13, 0.025])
    est = estimate(a, b)
    assert est.ci_low < -0.02 < 0.02 < est.ci_high
    assert not tost_equivalent(est, 0.02)
    for claim in (EQUIVALENT, LOWER, NOT_BETTER):
        assert verdict(claim, est) == "inconclusive"


def test_not_significant_is_not_equivalent():
    """A non-significant difference with a wide interval never counts as 'the same'."""
    a, b = _arms([0.01, -0.01])  # two seeds, t(df=1) = 12.7: the interval is wide
    est = estimate(a, b)
    assert est.ci_low < 0 < est.ci_high
    assert verdict(EQUIVALENT, est) == "inconclusive"


def test_few_seeds_use_a_bootstrap_over_items_when_items_exist():
    rng = np.random.default_rng(0)
    base = rng.normal(3.0, 0.5, size=400)  # per-item losses, arm a
    items_a = {0: base, 1: base + rng.normal(0, 0.01, 400)}
    items_b = {s: v + 0.1 + rng.normal(0, 0.05, 400) for s, v in items_a.items()}
    a = {s: float(np.mean(v)) for s, v in items_a.items()}
    b = {s: float(np.mean(v)) for s, v in items_b.items()}
    est = estimate(a, b, items_a, items_b)
    assert est.method == "bootstrap over 400 items (2 seeds)" and est.n == 400
    assert 0.09 < est.ci_low < est.difference < est.ci_high < 0.11
    assert verdict(Claim("greater"), est) == "reproduced"
    assert estimate(a, b).method == "t over 2 seeds"  # without items: the t interval
    with pytest.raises(ValueError, match="items"):
        estimate(a, b, {0: [1.0], 1: [1.0]}, {0: [1.0, 2.0], 1: [1.0, 2.0]})


def test_bootstrap_interval_covers_the_mean_and_shrinks_with_items():
    rng = np.random.default_rng(1)
    small = bootstrap_interval(rng.normal(0.5, 1, 50))
    large = bootstrap_interval(rng.normal(0.5, 1, 5000))
    assert small[1] < small[0] < small[2] and large[1] < large[0] < large[2]
    assert large[2] - large[1] < (small[2] - small[1]) / 5


def test_combined_findings_and_every_paper_finding_has_claims():
    assert combine(["reproduced", "reproduced"]) == "reproduced"
    assert combine(["reproduced", "inconclusive"]) == "inconclusive"
    assert combine(["inconclusive", "contradicted"]) == "contradicted"
    assert set(CLAIMS) == {"fig3", "fig4_image", "fig4_text", "table1", "fig6", "fig7"}
    assert all(claim.text for parts in CLAIMS.values() for _, claim in parts)
