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
    below = sum(m <= 0 for m in means) / n_boot
    return {"test": "paired-bootstrap", "diff": mean, "ci_low": means[int(0.025 * n_boot)],
            "ci_high": means[int(0.975 * n_boot) - 1], "p": min(1.0, 2 * min(below, 1 - below))}
