"""Small statistics toolkit for record claims, written without SciPy.

Why it exists: a record claim is a one-sided t-test on a handful of runs, and
comparing two variants is a Welch test. Both need the Student-t distribution,
which we get from the regularized incomplete beta function. Keeping it in pure
Python (``math`` only) means the records tools install nothing heavy.
"""

import math

# Continued-fraction settings. The Lentz iteration converges in about
# sqrt(max(a, b)) steps, so a generous cap covers degrees of freedom in the
# millions while the tolerance stays near double precision.
_CF_MAX_ITER = 20000
_CF_EPS = 1e-16
_CF_TINY = 1e-300


def _lentz_step(coef, c, d):
    """One term of Lentz's method: the new (c, d) and the factor the fraction is multiplied by."""
    d = 1.0 + coef * d
    if abs(d) < _CF_TINY:
        d = _CF_TINY
    c = 1.0 + coef / c
    if abs(c) < _CF_TINY:
        c = _CF_TINY
    d = 1.0 / d
    return c, d, d * c


def _beta_continued_fraction(a, b, x):
    """Evaluate the continued fraction of I_x(a, b) with the modified Lentz method.

    Why: the fraction converges quickly for x < (a + 1) / (a + b + 2); the
    caller uses the symmetry I_x(a, b) = 1 - I_{1-x}(b, a) for the rest.
    """
    qab = a + b
    qap = a + 1.0
    qam = a - 1.0
    c = 1.0
    d = 1.0 - qab * x / qap
    if abs(d) < _CF_TINY:
        d = _CF_TINY
    d = 1.0 / d
    frac = d
    for m in range(1, _CF_MAX_ITER + 1):
        m2 = 2 * m
        # Even step of the fraction.
        c, d, delta = _lentz_step(m * (b - m) * x / ((qam + m2) * (a + m2)), c, d)
        frac *= delta
        # Odd step of the fraction.
        c, d, delta = _lentz_step(-(a + m) * (qab + m) * x / ((a + m2) * (qap + m2)), c, d)
        frac *= delta
        if abs(delta - 1.0) < _CF_EPS:
            return frac
    raise ArithmeticError(f"incomplete beta continued fraction did not converge (a={a}, b={b}, x={x})")


def regularized_incomplete_beta(a, b, x):
    """Return I_x(a, b), the CDF of a Beta(a, b) variable at x.

    Why: the Student-t CDF is a regularized incomplete beta, and math.lgamma
    gives the prefactor without overflow for large a and b.
    """
    if a <= 0 or b <= 0:
        raise ValueError("incomplete beta needs a > 0 and b > 0")
    if not 0.0 <= x <= 1.0:
        raise ValueError("incomplete beta needs 0 <= x <= 1")
    if x == 0.0 or x == 1.0:
        return x
    log_front = (math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b)
                 + a * math.log(x) + b * math.log1p(-x))
    if x < (a + 1.0) / (a + b + 2.0):
        return math.exp(log_front) * _beta_continued_fraction(a, b, x) / a
    return 1.0 - math.exp(log_front) * _beta_continued_fraction(b, a, 1.0 - x) / b


def t_cdf(t, df):
    """Return P(T <= t) for Student's t with df degrees of freedom (df may be fractional).

    Why: p-values of one-sample and Welch tests. The tail is computed directly
    (not as 1 - cdf) so small p-values keep their relative precision.
    """
    if df <= 0:
        raise ValueError("t distribution needs df > 0")
    if math.isnan(t):
        return math.nan
    if math.isinf(t):
        return 1.0 if t > 0 else 0.0
    tail = 0.5 * regularized_incomplete_beta(df / 2.0, 0.5, df / (df + t * t))
    return 1.0 - tail if t > 0 else tail


def t_sf(t, df):
    """Return P(T > t); the mirror of t_cdf, precise in the upper tail."""
    return t_cdf(-t, df)


def t_ppf(p, df):
    """Return the t value whose CDF is p (the quantile), by bracketing and bisection.

    Why: confidence intervals need critical values such as t_{0.975, n-1};
    bisection on a monotone CDF is slow-ish but simple and always converges.
    """
    if not 0.0 < p < 1.0:
        raise ValueError("quantile needs 0 < p < 1")
    if p == 0.5:
        return 0.0
    if p < 0.5:
        return -t_ppf(1.0 - p, df)
    lo, hi = 0.0, 1.0
    while t_cdf(hi, df) < p:
        lo, hi = hi, hi * 2.0
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if t_cdf(mid, df) < p:
            lo = mid
        else:
            hi = mid
        if hi - lo <= 1e-13 * max(1.0, hi):
            break
    return 0.5 * (lo + hi)


def mean(values):
    """Arithmetic mean; None for an empty list (so callers print n/a).

    Computed around the first value so that identical values give exactly that
    value (and a std of exactly 0); a plain sum / n can be off by one ulp.
    """
    values = list(values)
    if not values:
        return None
    base = values[0]
    return base + math.fsum(v - base for v in values) / len(values)


def sample_std(values):
    """Sample standard deviation with n - 1 in the denominator; None when n < 2."""
    values = list(values)
    if len(values) < 2:
        return None
    m = mean(values)
    return math.sqrt(math.fsum((v - m) ** 2 for v in values) / (len(values) - 1))


def one_sided_p_below(values, target):
    """p-value of H0: mean >= target against H1: mean < target (one-sample t-test).

    Why: a record must show its mean val loss is below the target, so the
    p-value is P(T_{n-1} <= (mean - target) / (std / sqrt(n))). With n < 2 the
    test is undefined (None). With std = 0 the statistic is +-infinity, giving
    p = 0 or 1; when additionally mean == target it is 0/0 and we return None.
    """
    values = list(values)
    n = len(values)
    if n < 2:
        return None
    m, s = mean(values), sample_std(values)
    diff = m - target
    if s == 0.0:
        if diff == 0.0:
            return None
        return 0.0 if diff < 0 else 1.0
    return t_cdf(diff / (s / math.sqrt(n)), n - 1)


def t_interval(values, confidence=0.95):
    """Two-sided confidence interval of the mean: mean -+ t_{(1+c)/2, n-1} * s / sqrt(n).

    Returns (low, high), or None when n < 2 (no spread estimate).
    """
    values = list(values)
    n = len(values)
    if n < 2:
        return None
    m, s = mean(values), sample_std(values)
    half = t_ppf(0.5 + confidence / 2.0, n - 1) * s / math.sqrt(n)
    return (m - half, m + half)


def welch_test(first, second):
    """Welch's unequal-variance t-test for mean(second) - mean(first).

    Returns a dict with the difference, the statistic, the Welch-Satterthwaite
    degrees of freedom and the two-sided p-value. Entries are None where
    undefined: either group has n < 2, or both variances are 0 with equal means.
    Why Welch: repeated runs of two variants rarely have equal variances.
    """
    first, second = list(first), list(second)
    result = {"diff": None, "t": None, "df": None, "p_two_sided": None}
    if first and second:
        result["diff"] = mean(second) - mean(first)
    if len(first) < 2 or len(second) < 2:
        return result
    v1 = sample_std(first) ** 2 / len(first)
    v2 = sample_std(second) ** 2 / len(second)
    se2 = v1 + v2
    diff = result["diff"]
    if se2 == 0.0:
        if diff != 0.0:
            result["p_two_sided"] = 0.0
            result["t"] = math.copysign(math.inf, diff)
        return result
    df = se2 * se2 / (v1 * v1 / (len(first) - 1) + v2 * v2 / (len(second) - 1))
    t = diff / math.sqrt(se2)
    result.update(t=t, df=df, p_two_sided=min(1.0, 2.0 * t_cdf(-abs(t), df)))
    return result
