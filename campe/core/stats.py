"""Seed statistics of the ablation: mean ± std with a t confidence interval, and paired differences.

    from campe.core.stats import mean_ci, paired_difference
    mean_ci([71.2, 69.8, 72.5])                           # {"mean", "std", "n", "half", "low", "high"}
    paired_difference({0: 71.2, 1: 69.8}, {0: 70.1, 1: 69.9})   # method - reference over their common seeds

A 95 % interval is mean ± t(0.975, n-1) · std / sqrt(n) (std: the sample standard deviation, n - 1). A paired
difference takes, per seed both runs have, method - reference (same seed = same initialisation and data order), and
gives the same statistics of those differences: the interval of the paired mean difference, which is narrower than
comparing two independent means whenever seeds move both methods alike. n = 1: std and the interval are NaN.
"""
from __future__ import annotations

import math
import statistics
from typing import Mapping, Sequence


def t_quantile(p: float, df: int) -> float:
    """The p quantile of Student's t with df degrees of freedom."""
    from scipy.stats import t
    return float(t.ppf(p, df))


def mean_ci(values: Sequence[float], level: float = 0.95) -> dict[str, float]:
    """{"mean", "std", "n", "half" (the interval's half-width), "low", "high"} of `values`."""
    vals = [float(v) for v in values]
    n = len(vals)
    if n == 0:
        raise ValueError("mean_ci of no values")
    mean = statistics.fmean(vals)
    if n == 1:
        return {"mean": mean, "std": math.nan, "n": 1, "half": math.nan, "low": math.nan, "high": math.nan}
    std = statistics.stdev(vals)
    half = t_quantile(0.5 + level / 2, n - 1) * std / math.sqrt(n)
    return {"mean": mean, "std": std, "n": n, "half": half, "low": mean - half, "high": mean + half}


def paired_difference(method: Mapping[int, float], reference: Mapping[int, float],
                      level: float = 0.95) -> dict[str, float] | None:
    """mean_ci of method[s] - reference[s] over the seeds s both have (None when they share none), plus "seeds"."""
    seeds = sorted(set(method) & set(reference))
    if not seeds:
        return None
    out = mean_ci([method[s] - reference[s] for s in seeds], level)
    out["seeds"] = seeds
    return out
