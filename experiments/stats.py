"""The statistics of the comparison: mean and spread over seeds, and paired differences with
a 95% confidence interval (Student's t), written out so that a reader can check them by hand.

    from experiments.stats import paired_difference
    paired_difference({0: 71.2, 1: 69.8, 2: 70.5}, {0: 70.1, 1: 70.0, 2: 69.2})
    # {'n': 3, 'mean': 0.733, 'sd': 0.814, 'ci95': (-1.290, 2.757), 'half_width': 2.023, 'favour': 2, ...}

Paired: condition and baseline are fine-tuned with the same fine-tuning seeds (the same fresh
PEFT draw and the same data order), so seed-to-seed noise shared by both cancels in
d_s = F1(condition, s) - F1(baseline, s). The CI is mean(d) +- t(0.975, n-1) * sd(d) / sqrt(n).

That interval holds fine-tuning variance only: every fine-tuning seed of a primed row sits on
the same primed body, so the luck of that one priming run is in every d_s and cancels out of
sd(d). With several priming runs per condition, two_level_difference tests over priming runs,
and priming_sd measures how far priming runs of one condition differ (sigma_p).

Every interval's two-sided p (t_test_p) is beside it, and holm adjusts the p of a family of
comparisons (compare_report: primed vs primed, vs an unprimed row, the implicit rows) for their number.
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


def t_cdf(x, df, intervals=400):
    """P(T <= x): 1/2 + the integral of the density from 0 to |x| (Simpson's rule on
    u = atan(t), which maps the heavy tail onto a finite interval; 400 intervals: quantiles
    within 1e-7 of a printed table for df >= 1)."""
    upper = math.atan(abs(x))
    h = upper / intervals
    f = [t_pdf(math.tan(i * h), df) / math.cos(i * h) ** 2 for i in range(intervals + 1)]  # dt = du / cos^2 u
    area = h / 3 * (f[0] + f[-1] + 4 * sum(f[1:-1:2]) + 2 * sum(f[2:-1:2]))
    return 0.5 + math.copysign(area, x)


@functools.lru_cache(maxsize=4096)  # a pure function; a comparison asks for the same df many times
def t_quantile(p, df):
    """The x with t_cdf(x, df) = p, for p > 0.5 (t_quantile(0.975, 4) = 2.776), by Newton's method
    from 0: the cdf is concave for x > 0, so the steps rise monotonically to the root."""
    # BEGIN ASSIGNMENT paired_interval
    x = 0.0
    for _ in range(200):
        step = (p - t_cdf(x, df)) / t_pdf(x, df)
        x += step
        if step < 1e-12 * max(1.0, x):
            break
    return x
    # END ASSIGNMENT paired_interval


def t_test_p(mean, se, df):
    """Two-sided p of the t test that a difference is 0: P(|T| >= |mean| / se) with df degrees of
    freedom (the interval excludes 0 exactly when p < 0.05). se 0: p is 0, or 1 for a mean of 0."""
    if se == 0:
        return 1.0 if mean == 0 else 0.0
    return max(0.0, 2 * (1 - t_cdf(abs(mean) / se, df)))


def holm(pvalues):
    """Holm's step-down adjustment of a family of p values ({name: p}; None: no test, left out): the
    i-th smallest of m becomes max over j <= i of min(1, (m - j + 1) p_(j)). A claim whose adjusted p
    is below 0.05 keeps the family-wise error rate at 5% however many of the m nulls are true."""
    ranked = sorted((p, name) for name, p in pvalues.items() if p is not None)
    adjusted, running = {}, 0.0
    for i, (p, name) in enumerate(ranked):
        running = max(running, min(1.0, (len(ranked) - i) * p))
        adjusted[name] = running
    return adjusted


def paired_difference(condition, baseline):
    """condition, baseline: {fine-tuning seed: score}. The mean paired difference over the
    seeds both have, its 95% CI and half-width (both None when n < 2: no degrees of freedom), the sample std of the
    differences, and how many seeds favour the condition (difference > 0)."""
    # BEGIN ASSIGNMENT paired_interval
    seeds = sorted(set(condition) & set(baseline))
    if not seeds:
        return None
    diffs = [condition[s] - baseline[s] for s in seeds]
    mean, sd = mean_std(diffs)
    half = t_quantile(0.975, len(diffs) - 1) * sd / math.sqrt(len(diffs)) if len(diffs) > 1 else None
    ci = (mean - half, mean + half) if half is not None else None
    return {"n": len(diffs), "mean": mean, "sd": sd, "ci95": ci, "half_width": half,
            "favour": sum(d > 0 for d in diffs), "seeds": seeds}
    # END ASSIGNMENT paired_interval


def seeds_for_half_width(sd, target, max_seeds=1000):
    """The fewest seeds n whose 95% CI half-width t(0.975, n-1) * sd / sqrt(n) is at most target."""
    for n in range(2, max_seeds + 1):
        if t_quantile(0.975, n - 1) * sd / math.sqrt(n) <= target:
            return n
    return None


# ------------------------------------------------------------------ two levels: priming runs

def two_level_difference(condition, baseline):
    """The difference between two rows when the condition (and maybe the baseline) was primed
    more than once. condition: {(priming seed, fine-tuning seed): score}; baseline: the same,
    or {(None, fine-tuning seed): score} for an unprimed row (no priming seed).

    Primed vs primed: priming seed p and fine-tuning seed f of both rows are paired, d_pf = x_pf -
    y_pf, over the fine-tuning seeds every priming run has in both rows (a balanced design), and
        D_p = mean_f d_pf   (one value per priming run)
    are independent draws (priming seed p of both rows draws the same data stream, so what they
    share cancels): the CI is mean(D) +- t(0.975, P-1) sd(D)/sqrt(P).
    Primed vs unprimed: against_unprimed (the priming-run means against the unprimed row's mean
    over all its seeds, Welch). With one priming run either falls back to paired_difference over
    the fine-tuning seeds, whose interval holds no priming variance ("design" says which)."""
    if all(p is None for p, _ in baseline):
        return against_unprimed(condition, baseline)
    pairs = {}
    for (p, f), x in condition.items():
        if (p, f) in baseline:
            pairs.setdefault(p, {})[f] = x - baseline[(p, f)]
    if not pairs:
        return None
    common = sorted(set.intersection(*(set(d) for d in pairs.values())))
    if len(pairs) == 1 or not common:
        return one_priming_run(pairs)
    seeds_p = sorted(pairs)
    by_p = [statistics.mean(pairs[p][f] for f in common) for p in seeds_p]
    P, F = len(by_p), len(common)
    mean, sd = mean_std(by_p)
    half = t_quantile(0.975, P - 1) * sd / math.sqrt(P) if sd > 0 else 0.0
    return {"n": P * F, "priming_seeds": P, "finetune_seeds": F, "mean": mean, "sd": sd, "df": P - 1,
            "ci95": (mean - half, mean + half), "half_width": half, "p": t_test_p(mean, sd / math.sqrt(P), P - 1),
            "favour": sum(d > 0 for d in by_p), "favour_of": P, "seeds": common, "priming_seed_list": seeds_p,
            "design": f"{P} priming runs x {F} fine-tuning seeds: interval over priming runs"}


def one_priming_run(pairs):
    """pairs: {priming seed: {fine-tuning seed: difference}} with one priming run (or none balanced):
    the paired interval over that run's fine-tuning seeds, which holds no priming variance."""
    diffs = pairs[max(pairs, key=lambda p: len(pairs[p]))]
    one = paired_difference(diffs, dict.fromkeys(diffs, 0.0))
    one.update(priming_seeds=1, finetune_seeds=one["n"], df=one["n"] - 1 if one["n"] > 1 else None,
               p=t_test_p(one["mean"], one["sd"] / math.sqrt(one["n"]), one["n"] - 1) if one["n"] > 1 else None,
               design="1 priming run x fine-tuning seeds: "
               "the interval holds fine-tuning variance only, not priming variance")
    return one


def against_unprimed(condition, baseline):
    """A primed row (P priming runs) minus an unprimed row (B fine-tuning seeds), one baseline for
    every row: the unprimed row's mean over all its seeds.
        X_p = mean_f x_pf over the fine-tuning seeds every priming run has (F of them)
        difference = mean_p X_p - mean_b y_b,   se^2 = var(X_p)/P + var(y_b)/B
    with Welch-Satterthwaite degrees of freedom from P - 1 and B - 1: the variance and degrees of
    freedom the design has (the baseline contributes its own B seeds, however many primed rows reuse
    them). The fine-tuning seed effect b_f shared by both rows is in var(y_b) but cancels out of
    var(X_p); in simulation (tests/test_two_level.py) the interval covers 0.95-0.96 both at the seed
    effect these data show (sd ~0.3) and at a large one (1.5). With one priming run: one_priming_run
    over the seeds both rows have; with one baseline seed: no interval."""
    runs = {}
    for (p, f), x in condition.items():
        runs.setdefault(p, {})[f] = x
    if len(runs) == 1:
        diffs = {p: {f: x - baseline[(None, f)] for f, x in by_f.items() if (None, f) in baseline}
                 for p, by_f in runs.items()}
        return one_priming_run(diffs) if any(diffs.values()) else None
    common = sorted(set.intersection(*(set(d) for d in runs.values())))
    if not common or not baseline:
        return None
    seeds_p = sorted(runs)
    by_p = [statistics.mean(runs[p][f] for f in common) for p in seeds_p]
    base_seeds = sorted(f for _, f in baseline)
    y = [baseline[(None, f)] for f in base_seeds]
    P, F, B = len(by_p), len(common), len(y)
    (x_mean, sd), (y_mean, y_sd) = mean_std(by_p), mean_std(y)
    mean = x_mean - y_mean
    out = {"n": P * F, "priming_seeds": P, "finetune_seeds": F, "mean": mean, "sd": sd, "df": None,
           "ci95": None, "half_width": None, "p": None, "favour": sum(x > y_mean for x in by_p), "favour_of": P,
           "seeds": common, "priming_seed_list": seeds_p, "baseline_seeds": B, "baseline_mean": y_mean,
           "baseline_sd": y_sd}
    if B < 2:
        return out | {"design": f"{P} priming runs x {F} fine-tuning seeds against 1 unprimed seed: no interval "
                                "(the baseline's spread needs 2 seeds)"}
    var_p, var_b = sd ** 2 / P, y_sd ** 2 / B
    df = ((var_p + var_b) ** 2 / (var_p ** 2 / (P - 1) + var_b ** 2 / (B - 1))) if var_p + var_b > 0 else P + B - 2
    df = math.floor(df * 100) / 100   # rounded down: a little conservative, and t_quantile computed once per value
    half = t_quantile(0.975, df) * math.sqrt(var_p + var_b) if var_p + var_b > 0 else 0.0
    return out | {"df": df, "ci95": (mean - half, mean + half), "half_width": half,
                  "p": t_test_p(mean, math.sqrt(var_p + var_b), df),
                  "design": f"{P} priming runs x {F} fine-tuning seeds against the unprimed row's {B} seeds "
                            "(Welch: priming-run means against the baseline's mean)"}


def priming_sd(scores):
    """sigma_p: the standard deviation of a row's F1 between priming runs, net of fine-tuning
    noise. scores: {(priming seed, fine-tuning seed): F1}. Two-way ANOVA without replication on
    the balanced part (fine-tuning seeds every priming seed has): x_pf = mu + a_p + b_f + e_pf,
    sigma_p^2 = (MS_priming - MS_residual) / F, floored at 0. None with fewer than 2 priming
    seeds or 2 common fine-tuning seeds."""
    by_p = {}
    for (p, f), x in scores.items():
        by_p.setdefault(p, {})[f] = x
    if len(by_p) < 2:
        return None
    common = sorted(set.intersection(*(set(d) for d in by_p.values())))
    P, F = len(by_p), len(common)
    if F < 2:
        return None
    x = [[by_p[p][f] for f in common] for p in sorted(by_p)]
    grand = statistics.mean(v for row in x for v in row)
    row_means = [statistics.mean(row) for row in x]
    col_means = [statistics.mean(x[i][j] for i in range(P)) for j in range(F)]
    ms_p = F * sum((m - grand) ** 2 for m in row_means) / (P - 1)
    ms_e = sum((x[i][j] - row_means[i] - col_means[j] + grand) ** 2
               for i in range(P) for j in range(F)) / ((P - 1) * (F - 1))
    return math.sqrt(max(0.0, (ms_p - ms_e) / F))
