"""The statistics of the comparison: mean and spread over seeds, and paired differences with
a 95% confidence interval (Student's t), written out so that a reader can check them by hand.

    from stats import paired_difference
    paired_difference({0: 71.2, 1: 69.8, 2: 70.5}, {0: 70.1, 1: 70.0, 2: 69.2})
    # {'n': 3, 'mean': 0.733, 'sd': 0.814, 'ci95': (-1.290, 2.757), 'half_width': 2.023, 'favour': 2, ...}

Paired: condition and baseline are fine-tuned with the same fine-tuning seeds (the same fresh
PEFT draw and the same data order), so seed-to-seed noise shared by both cancels in
d_s = F1(condition, s) - F1(baseline, s). The CI is mean(d) +- t(0.975, n-1) * sd(d) / sqrt(n).
"""

import functools
import math
import statistics


def mean_std(values):
    """(mean, sample standard deviation); the std of one value is 0."""
    values = list(values)
    return statistics.mean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def t_pdf(x, df):
    """Density of Student's t distribution with df degrees of freedom."""
    log_c = math.lgamma((df + 1) / 2) - math.lgamma(df / 2) - 0.5 * math.log(df * math.pi)
    return math.exp(log_c - (df + 1) / 2 * math.log1p(x * x / df))


def t_cdf(x, df, intervals=4000):
    """P(T <= x): 1/2 + the integral of the density from 0 to |x| (Simpson's rule on
    u = atan(t), which maps the heavy tail onto a finite interval)."""
    upper = math.atan(abs(x))
    h = upper / intervals
    f = [t_pdf(math.tan(i * h), df) / math.cos(i * h) ** 2 for i in range(intervals + 1)]  # dt = du / cos^2 u
    area = h / 3 * (f[0] + f[-1] + 4 * sum(f[1:-1:2]) + 2 * sum(f[2:-1:2]))
    return 0.5 + math.copysign(area, x)


@functools.lru_cache(maxsize=None)  # a pure function, ~65 integrations a call; a comparison asks for a few df often
def t_quantile(p, df):
    """The x with t_cdf(x, df) = p, for p > 0.5, by bisection (t_quantile(0.975, 4) = 2.776)."""
    low, high = 0.0, 1.0
    while t_cdf(high, df) < p:
        high *= 2
    for _ in range(60):
        mid = (low + high) / 2
        low, high = (mid, high) if t_cdf(mid, df) < p else (low, mid)
    return (low + high) / 2


def paired_difference(condition, baseline):
    """condition, baseline: {fine-tuning seed: score}. The mean paired difference over the
    seeds both have, its 95% CI and half-width (None with one seed), the sample std of the
    differences, and how many seeds favour the condition (difference > 0)."""
    seeds = sorted(set(condition) & set(baseline))
    if not seeds:
        return None
    diffs = [condition[s] - baseline[s] for s in seeds]
    mean, sd = mean_std(diffs)
    half = t_quantile(0.975, len(diffs) - 1) * sd / math.sqrt(len(diffs)) if len(diffs) > 1 else None
    ci = (mean - half, mean + half) if half is not None else None
    return {"n": len(diffs), "mean": mean, "sd": sd, "ci95": ci, "half_width": half,
            "favour": sum(d > 0 for d in diffs), "seeds": seeds}


def seeds_for_half_width(sd, target, max_seeds=1000):
    """The fewest seeds n whose 95% CI half-width t(0.975, n-1) * sd / sqrt(n) is at most target."""
    for n in range(2, max_seeds + 1):
        if t_quantile(0.975, n - 1) * sd / math.sqrt(n) <= target:
            return n
    return None
