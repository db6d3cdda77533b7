"""The mini-study's statistics: paired differences, 95% intervals, equivalence, verdicts.

Every comparison of the study is paired: the two arms of a pair share a seed (the same data
order and, for random-init arms, the same initial weights where the arms allow), so the unit
of evidence is the per-seed difference `b - a` (e.g. pretrained minus random, in nats/token).

Intervals:
- `t_interval`: the mean per-seed difference with a Student-t 95% interval over seeds. It
  covers seed-to-seed variation (initialisation, data order), the variation a reviewer asks
  about; with n seeds it has n - 1 degrees of freedom, so with 2 seeds it is wide (t = 12.7).
- `bootstrap_interval`: a paired percentile bootstrap over evaluation items (held-out
  documents, multiple-choice questions) of the per-item differences averaged over seeds. It
  covers which items were drawn, not which seed trained the model, so it is narrower; the
  study uses it only where an arm has fewer than `MIN_SEEDS_FOR_T` seeds and per-item values
  exist, and every `Estimate` names the method it came from.

Equivalence ("no difference") is never read off a non-significant test: it is the two
one-sided tests (TOST) procedure against a stated margin, i.e. the 90% interval lies inside
(-margin, +margin). The verdict of each finding is computed from its `Claim` by `verdict`.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from typing import Literal

import numpy as np
from scipy import stats as _scipy_stats

MARGIN_NATS = 0.02  # nats/token: differences of losses inside +-0.02 count as "the same"
MIN_SEEDS_FOR_T = 3  # below this a per-item bootstrap is used where per-item values exist
Verdict = Literal["reproduced", "contradicted", "inconclusive"]
VERDICTS: tuple[str, ...] = ("reproduced", "contradicted", "inconclusive")


@dataclasses.dataclass(frozen=True)
class Estimate:
    """A difference b - a with its 95% and 90% intervals and where they came from."""
    difference: float
    ci_low: float  # 95%
    ci_high: float
    ci90_low: float  # 90%: the TOST interval
    ci90_high: float
    method: str  # "t over N seeds" or "bootstrap over N items (M seeds)"
    n: int  # seeds (t) or items (bootstrap)
    per_seed: tuple[float, ...] = ()

    def to_dict(self) -> dict:
        return {k: (list(v) if isinstance(v, tuple) else v)
                for k, v in dataclasses.asdict(self).items()}


@dataclasses.dataclass(frozen=True)
class Claim:
    """What the paper says about the difference b - a (e.g. pretrained - random loss).

    kind "equivalent": |b - a| < margin (the curves track each other);
    kind "less": b - a < 0 (b lower); kind "greater": b - a > 0;
    kind "not_less": b - a > -margin (b is not lower than a by more than the margin);
    kind "not_greater": b - a < margin (b is not higher than a by more than the margin).
    """
    kind: Literal["equivalent", "less", "greater", "not_less", "not_greater"]
    margin: float = MARGIN_NATS
    text: str = ""


def paired_differences(a: Mapping[int, float], b: Mapping[int, float]) -> dict[int, float]:
    """b - a for every seed both arms have (a seed only one arm finished is left out)."""
    seeds = sorted(set(a) & set(b))
    if not seeds:
        raise ValueError(f"no seed in common between the arms ({sorted(a)} vs {sorted(b)})")
    return {s: float(b[s]) - float(a[s]) for s in seeds}


def t_interval(differences: Sequence[float], level: float = 0.95) -> tuple[float, float, float]:
    """Mean and the two-sided Student-t interval over the differences. With one value the
    interval is unbounded (one seed says nothing about seed variation)."""
    d = np.asarray(differences, dtype=np.float64)
    if d.size == 0:
        raise ValueError("t_interval of no differences")
    mean = float(d.mean())
    if d.size == 1:
        return mean, -math.inf, math.inf
    half = _scipy_stats.t.ppf(0.5 + level / 2, d.size - 1) * d.std(ddof=1) / math.sqrt(d.size)
    return mean, mean - float(half), mean + float(half)


def bootstrap_interval(per_item_differences: Sequence[float], level: float = 0.95,
                       resamples: int = 4000, seed: int = 0) -> tuple[float, float, float]:
    """Mean and the percentile bootstrap interval of the mean over items."""
    d = np.asarray(per_item_differences, dtype=np.float64)
    if d.size < 2:
        raise ValueError(f"a bootstrap over items needs at least 2 items, got {d.size}")
    rng = np.random.default_rng(seed)
    means = d[rng.integers(0, d.size, size=(resamples, d.size))].mean(axis=1)
    tail = (1 - level) / 2 * 100
    low, high = np.percentile(means, [tail, 100 - tail])
    return float(d.mean()), float(low), float(high)


def estimate(a: Mapping[int, float], b: Mapping[int, float],
             items_a: Mapping[int, Sequence[float]] | None = None,
             items_b: Mapping[int, Sequence[float]] | None = None) -> Estimate:
    """The paired difference b - a over seeds. With fewer than MIN_SEEDS_FOR_T seeds and
    per-item values (seed -> one value per evaluation item, same items in both arms), the
    intervals come from a bootstrap over items of the seed-averaged per-item differences."""
    per_seed = paired_differences(a, b)
    seeds = sorted(per_seed)
    values = [per_seed[s] for s in seeds]
    if len(seeds) < MIN_SEEDS_FOR_T and items_a and items_b:
        items = _per_item(items_a, items_b, seeds)
        mean, lo, hi = bootstrap_interval(items, 0.95)
        _, lo90, hi90 = bootstrap_interval(items, 0.90)
        method, n = f"bootstrap over {len(items)} items ({len(seeds)} seeds)", len(items)
        mean = float(np.mean(values))
    else:
        mean, lo, hi = t_interval(values, 0.95)
        _, lo90, hi90 = t_interval(values, 0.90)
        method, n = f"t over {len(seeds)} seeds", len(seeds)
    return Estimate(mean, lo, hi, lo90, hi90, method, n, tuple(values))


def _per_item(items_a: Mapping[int, Sequence[float]], items_b: Mapping[int, Sequence[float]],
              seeds: list[int]) -> np.ndarray:
    rows = []
    for s in seeds:
        ia, ib = np.asarray(items_a[s], float), np.asarray(items_b[s], float)
        if ia.shape != ib.shape:
            raise ValueError(f"seed {s}: {ia.size} items in one arm, {ib.size} in the other")
        rows.append(ib - ia)
    return np.mean(rows, axis=0)


def tost_equivalent(est: Estimate, margin: float) -> bool:
    """Two one-sided tests at 5% each: the 90% interval lies inside (-margin, +margin)."""
    return -margin < est.ci90_low and est.ci90_high < margin


def verdict(claim: Claim, est: Estimate) -> Verdict:
    """reproduced / contradicted / inconclusive for one claim and one estimate.

    equivalent: reproduced when TOST shows equivalence within the margin; contradicted when
        the 95% interval lies entirely outside [-margin, +margin] (a difference larger than
        the margin, shown at 5%); otherwise inconclusive.
    less / greater: reproduced when the 95% interval lies entirely on the claimed side of 0,
        contradicted when entirely on the other side.
    not_less: reproduced when the 95% interval lies above -margin; contradicted when it lies
        entirely below -margin (b lower than a by more than the margin); not_greater mirrors it.
    """
    m, lo, hi = claim.margin, est.ci_low, est.ci_high
    if claim.kind == "equivalent":
        if tost_equivalent(est, m):
            return "reproduced"
        return "contradicted" if hi < -m or lo > m else "inconclusive"
    if claim.kind == "less":
        return "reproduced" if hi < 0 else "contradicted" if lo > 0 else "inconclusive"
    if claim.kind == "greater":
        return "reproduced" if lo > 0 else "contradicted" if hi < 0 else "inconclusive"
    if claim.kind == "not_less":
        return "reproduced" if lo > -m else "contradicted" if hi < -m else "inconclusive"
    if claim.kind == "not_greater":
        return "reproduced" if hi < m else "contradicted" if lo > m else "inconclusive"
    raise ValueError(f"unknown claim kind {claim.kind!r}")


def combine(verdicts: Sequence[Verdict]) -> Verdict:
    """A finding made of several claims: contradicted if any part is, reproduced if all are."""
    if "contradicted" in verdicts:
        return "contradicted"
    return "reproduced" if verdicts and all(v == "reproduced" for v in verdicts) \
        else "inconclusive"


# The paper's findings, each as claims about paired differences (b - a). What each
# difference is (which arms, which evaluation point) is set where the study computes it
# (report.py); the claims are the paper's words made testable.
CLAIMS: dict[str, list[tuple[str, Claim]]] = {
    "fig3": [("final", Claim("equivalent", MARGIN_NATS,
              "Fig. 3: pretrained and random init reach the same final loss "
              "(validation loss over all target tokens, pretrained - random)"))],
    "fig4_image": [("curve", Claim("equivalent", MARGIN_NATS,
                    "Fig. 4 left: image-token loss of pretrained and random init is the same "
                    "at every point of training (mean over the evaluation points after step "
                    "0, pretrained - random)"))],
    "fig4_text": [
        ("start", Claim("less", MARGIN_NATS,
                        "Fig. 4 right: the pretrained model starts with a lower caption loss "
                        "(step 0, pretrained - random < 0)")),
        ("final", Claim("equivalent", MARGIN_NATS,
                        "Fig. 4 right: the caption advantage vanishes (final evaluation, "
                        "pretrained - random within the margin)")),
    ],
    "table1": [("final", Claim("greater", MARGIN_NATS,
                "Table 1: text-to-image training degrades the LM's English (held-out English "
                "loss after 100% of T2I training - before, > 0)"))],
    "fig6": [("final", Claim("not_less", MARGIN_NATS,
              "Fig. 6: unconditional image generation from the pretrained LM is no better "
              "than from random init (final image loss, pretrained - random > -margin)"))],
    "fig7": [("final", Claim("not_less", MARGIN_NATS,
              "Fig. 7: contrastive alignment to the LM's text table finds no meaning: it does "
              "no better than alignment to a random embedding table (final contrastive loss, "
              "LM table - random table > -margin)"))],
}
