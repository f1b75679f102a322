"""Paired comparisons of two conditions on the same items."""
from __future__ import annotations

import math
import random
from typing import Sequence


def mcnemar_exact(a: Sequence[bool], b: Sequence[bool]) -> dict:
    """Exact two-sided McNemar test on paired correct/incorrect outcomes."""
    if len(a) != len(b):
        raise ValueError("paired outcomes must have the same length")
    only_a = sum(x and not y for x, y in zip(a, b))
    only_b = sum(y and not x for x, y in zip(a, b))
    n = only_a + only_b
    k = min(only_a, only_b)
    p = 1.0 if n == 0 else min(1.0, 2 * sum(math.comb(n, i) for i in range(k + 1)) / 2**n)
    return {"test": "mcnemar-exact", "diff": (sum(a) - sum(b)) / max(1, len(a)), "only_a": only_a, "only_b": only_b,
            "p": p}


def paired_bootstrap(a: Sequence[float], b: Sequence[float], n_boot: int = 2000, seed: int = 0) -> dict:
    """Mean difference a - b with a 95% percentile interval and a two-sided bootstrap p-value."""
    if len(a) != len(b) or not a:
        raise ValueError("paired values must have the same, non-zero length")
    d = [x - y for x, y in zip(a, b)]
    rng = random.Random(seed)
    means = sorted(sum(rng.choice(d) for _ in d) / len(d) for _ in range(n_boot))
    mean = sum(d) / len(d)
    # a resampled mean of exactly 0 counts on both sides: with few discordant 0/1 items most resamples
    # tie, and counting them on one side only gave p = 0 for a difference of two items in 400
    below, above = sum(m <= 0 for m in means) / n_boot, sum(m >= 0 for m in means) / n_boot
    return {"test": "paired-bootstrap", "diff": mean, "ci_low": means[int(0.025 * n_boot)],
            "ci_high": means[int(0.975 * n_boot) - 1], "p": min(1.0, 2 * min(below, above))}


# ---------------------------------------------------------------- across training seeds


def _betacf(a: float, b: float, x: float) -> float:
    """Continued fraction of the regularised incomplete beta function (modified Lentz)."""
    tiny, qab, qap, qam = 1e-300, a + b, a + 1.0, a - 1.0
    c, d = 1.0, 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 500):
        m2 = 2 * m
        for aa in (m * (b - m) * x / ((qam + m2) * (a + m2)), -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))):
            d = 1.0 + aa * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + aa / c
            c = c if abs(c) > tiny else tiny
            h *= d * c
        if abs(d * c - 1.0) < 1e-15:
            break
    return h


def betainc(a: float, b: float, x: float) -> float:
    """Regularised incomplete beta I_x(a, b)."""
    if x <= 0:
        return 0.0
    if x >= 1:
        return 1.0
    front = math.exp(math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x))
    if x < (a + 1) / (a + b + 2):
        return front * _betacf(a, b, x) / a
    return 1.0 - front * _betacf(b, a, 1.0 - x) / b


def t_two_sided_p(t: float, df: int) -> float:
    """Two-sided p-value of Student's t with `df` degrees of freedom."""
    if math.isnan(t):
        return float("nan")
    if math.isinf(t):
        return 0.0
    return betainc(df / 2.0, 0.5, df / (df + t * t))


def one_sample_t(d: Sequence[float]) -> dict:
    """One-sample t-test of mean(d) = 0 (d: one value per training seed, e.g. a per-seed mean difference).
    With 3 seeds it has 2 degrees of freedom: only a large, consistent effect reaches p < 0.05."""
    n = len(d)
    mean = sum(d) / n if n else float("nan")
    if n < 2:
        return {"test": "t-over-seeds", "n": n, "diff": mean, "sd": float("nan"), "t": float("nan"), "p": float("nan")}
    sd = math.sqrt(sum((x - mean) ** 2 for x in d) / (n - 1))
    if sd < 1e-12:
        # no spread across seeds (e.g. the same accuracy on every seed): t is undefined, not infinite - a
        # p of 0 here would claim certainty from two or three identical numbers
        return {"test": "t-over-seeds", "n": n, "diff": mean, "sd": sd, "t": float("nan"), "p": float("nan")}
    t = mean / (sd / math.sqrt(n))
    half = t_quantile(0.95, n - 1) * sd / math.sqrt(n)
    return {"test": "t-over-seeds", "n": n, "diff": mean, "sd": sd, "t": t, "p": t_two_sided_p(t, n - 1),
            "ci_low": mean - half, "ci_high": mean + half}


def t_quantile(level: float, df: int) -> float:
    """The t such that a two-sided interval +-t holds `level` of Student's t with df degrees of freedom
    (df = 2: 4.303 at 95%), by bisection on the two-sided p."""
    lo, hi = 0.0, 1e6
    for _ in range(200):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if t_two_sided_p(mid, df) > 1 - level else (lo, mid)
    return (lo + hi) / 2


def sign_test(d: Sequence[float]) -> dict:
    """Exact two-sided sign test over seeds (zeros dropped). With 3 seeds the smallest p is 0.25: it can
    only say that the direction is not consistent, never that it is significant."""
    pos, neg = sum(x > 0 for x in d), sum(x < 0 for x in d)
    n, k = pos + neg, min(pos, neg)
    p = 1.0 if n == 0 else min(1.0, 2 * sum(math.comb(n, i) for i in range(k + 1)) / 2**n)
    return {"test": "sign-over-seeds", "n": n, "positive": pos, "negative": neg, "p": p}


def holm(pvalues: Sequence[float]) -> list[float]:
    """Holm-Bonferroni adjusted p-values (same order as given; NaN stays NaN and is not counted).
    Controls the family-wise error rate over the whole family, with no assumption on dependence."""
    idx = sorted((i for i, p in enumerate(pvalues) if not math.isnan(p)), key=lambda i: pvalues[i])
    m = len(idx)
    out = [float("nan")] * len(pvalues)
    running = 0.0
    for rank, i in enumerate(idx):
        running = max(running, min(1.0, (m - rank) * pvalues[i]))
        out[i] = running
    return out


def detectable_difference(n: int, p: float = 0.5, alpha: float = 0.05, power: float = 0.8) -> float:
    """The smallest difference of two accuracies on n items each that a two-sided test at `alpha` finds
    with probability `power` (normal approximation, unpaired, at accuracy p; p = 0.5 is the worst case).
    Pairing on the same items only narrows it, so this is the conservative figure."""
    z = {0.05: 1.959964, 0.01: 2.575829}[alpha] + {0.8: 0.841621, 0.9: 1.281552}[power]
    return z * math.sqrt(2 * p * (1 - p) / n)
