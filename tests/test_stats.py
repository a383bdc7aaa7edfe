"""Student's t quantiles and paired differences (``dpd compare``), against independent references."""

from __future__ import annotations

import math
import statistics

import pytest

from dpd_cli.stats import paired, t_cdf, t_quantile


def _t_cdf_by_integration(t: float, df: float, n: int = 20_000) -> float:
    """P(T <= t) for t >= 0: 1/2 plus Simpson's rule on the t density over [0, t] (float64)."""
    log_c = math.lgamma((df + 1) / 2) - math.lgamma(df / 2) - 0.5 * math.log(df * math.pi)
    pdf = lambda x: math.exp(log_c - (df + 1) / 2 * math.log1p(x * x / df))  # noqa: E731
    h = t / n
    s = pdf(0.0) + pdf(t) + sum((4 if k % 2 else 2) * pdf(k * h) for k in range(1, n))
    return 0.5 + s * h / 3


# Two-sided 95 % quantiles as printed in statistics tables (e.g. NIST/SEMATECH e-Handbook, table 1.3.6.7.2).
TABLE_975 = {
    1: 12.706,
    2: 4.303,
    3: 3.182,
    4: 2.776,
    5: 2.571,
    9: 2.262,
    10: 2.228,
    20: 2.086,
    29: 2.045,
    30: 2.042,
    60: 2.000,
    100: 1.984,
}


@pytest.mark.parametrize("df", sorted(TABLE_975))
def test_t_quantile_matches_the_printed_table(df):
    assert t_quantile(0.975, df) == pytest.approx(TABLE_975[df], abs=6e-4)


@pytest.mark.parametrize("df", [1, 2, 3, 7, 15, 40])
@pytest.mark.parametrize("p", [0.6, 0.9, 0.975, 0.995])
def test_t_quantile_inverts_the_integrated_density(df, p):
    q = t_quantile(p, df)
    assert _t_cdf_by_integration(q, df) == pytest.approx(p, abs=1e-9)
    assert t_cdf(q, df) == pytest.approx(p, abs=1e-12)
    assert t_quantile(1 - p, df) == pytest.approx(-q, rel=1e-12)  # symmetry


def test_t_quantile_tends_to_the_normal():
    assert t_quantile(0.975, 10**7) == pytest.approx(1.959964, abs=1e-5)  # the normal's 97.5 % point
    with pytest.raises(ValueError):
        t_quantile(1.0, 3)


def test_paired_is_the_textbook_interval():
    diffs = [0.031, -0.004, 0.018, 0.027, 0.009]
    d = paired(diffs)
    mean, sd = statistics.fmean(diffs), statistics.stdev(diffs)
    half = 2.776445 * sd / math.sqrt(5)  # t(0.975, 4) to 7 digits
    assert (d["n"], d["level"]) == (5, 0.95)
    assert d["mean"] == pytest.approx(mean, rel=1e-12) and d["sd"] == pytest.approx(sd, rel=1e-12)
    assert d["ci"] == pytest.approx([mean - half, mean + half], rel=1e-6)
    assert d["half_width"] == pytest.approx(half, rel=1e-6)


def test_paired_single_difference_has_no_interval():
    assert paired([0.02]) == {"n": 1, "mean": 0.02, "sd": None, "ci": None, "half_width": None, "level": 0.95}
