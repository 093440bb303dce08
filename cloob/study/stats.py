"""Statistics over seeds: mean and standard deviation, and the significance test of one method
against another on one dataset.

The test is Welch's two-sided t-test (unequal variances; the seeds of two methods are independent
runs, not pairs). Significant means p < ALPHA, the paper's 0.05. It needs at least two seeds of each
method, and a spread in at least one; otherwise there is no test and `reason` says why. The p-value
comes from the t distribution's CDF computed here (the regularized incomplete beta function by its
continued fraction), so no SciPy is needed at run time; tests check it against scipy.stats.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

ALPHA = 0.05
TEST_NAME = "Welch's two-sided t-test"


@dataclass(frozen=True)
class Summary:
    n: int
    mean: float
    std: float | None  # sample standard deviation (n - 1); None with one value


def summarize(values: list[float]) -> Summary:
    n = len(values)
    if n == 0:
        raise ValueError("no values")
    mean = sum(values) / n
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else None
    return Summary(n, mean, std)


@dataclass(frozen=True)
class Comparison:
    t: float | None
    df: float | None
    p: float | None
    reason: str | None = None  # why there is no test

    @property
    def significant(self) -> bool:
        return self.p is not None and self.p < ALPHA


def welch(a: list[float], b: list[float]) -> Comparison:
    """Welch's t-test of mean(a) != mean(b)."""
    if len(a) < 2 or len(b) < 2:
        return Comparison(None, None, None, f"too few seeds for a test ({len(a)} and {len(b)}; at least 2 each)")
    sa, sb = summarize(a), summarize(b)
    va, vb = sa.std ** 2 / sa.n, sb.std ** 2 / sb.n
    if va + vb == 0:
        return Comparison(None, None, None, "no spread over seeds in either method: no test")
    t = (sa.mean - sb.mean) / math.sqrt(va + vb)
    df = (va + vb) ** 2 / ((va ** 2 / (sa.n - 1) if va else 0.0) + (vb ** 2 / (sb.n - 1) if vb else 0.0))
    return Comparison(t, df, two_sided_p(t, df))


def two_sided_p(t: float, df: float) -> float:
    """P(|T| >= |t|) for T ~ Student's t with df degrees of freedom: I_x(df/2, 1/2), x = df/(df+t^2)."""
    return _betainc(df / 2.0, 0.5, df / (df + t * t))


def _betainc(a: float, b: float, x: float) -> float:
    """The regularized incomplete beta function I_x(a, b) (Numerical Recipes, 6.4)."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    front = math.exp(math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x))
    if x < (a + 1.0) / (a + b + 2.0):
        return front * _beta_fraction(a, b, x) / a
    return 1.0 - front * _beta_fraction(b, a, 1.0 - x) / b


def _beta_fraction(a: float, b: float, x: float, eps: float = 1e-15, max_terms: int = 500) -> float:
    tiny = 1e-300
    c, d = 1.0, 1.0 - (a + b) * x / (a + 1.0)
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, max_terms + 1):
        for num in (m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
                    -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))):
            d = 1.0 + num * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + num / c
            c = c if abs(c) > tiny else tiny
            h *= d * c
        if abs(d * c - 1.0) < eps:
            break
    return h
