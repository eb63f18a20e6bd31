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
    x = 0.0
    for _ in range(200):
        step = (p - t_cdf(x, df)) / t_pdf(x, df)
        x += step
        if step < 1e-12 * max(1.0, x):
            break
    return x


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


# ------------------------------------------------------------------ two levels: priming runs

def two_level_difference(condition, baseline):
    """The difference between two rows when the condition (and maybe the baseline) was primed
    more than once. condition: {(priming seed, fine-tuning seed): score}; baseline: the same,
    or {(None, fine-tuning seed): score} for an unprimed row (no priming seed).

    Priming seed p and fine-tuning seed f of both rows are paired: d_pf = x_pf - y_pf (or
    - y_f). Fine-tuning seeds are restricted to those every priming seed has in both rows
    (a balanced design), then
        D_p = mean_f d_pf   (one value per priming run)
        c_f = mean_p d_pf   (one value per fine-tuning seed)
    Primed vs primed: the D_p are independent draws (priming seed p of both rows draws the same
    data stream, so what they share cancels); the CI is mean(D) +- t(0.975, P-1) sd(D)/sqrt(P).
    Primed vs unprimed: the baseline's own fine-tuning noise (mean_f e0_f, variance sigma_e0^2/F)
    is the same in every D_p, so sd(D) misses it. It is added from the within-run spread of the
    d_pf, pooled over the priming runs (every seed each run shares with the baseline, df =
    sum(n_p - 1)): d_pf = a_p + e_pf - e0_f varies within a run by sigma_e^2 + sigma_e0^2 >=
    sigma_e0^2, so the term is conservative, and far better determined than from F common seeds
    alone. se^2 = var(D)/P + pooled/F, Welch-Satterthwaite degrees of freedom. With one priming
    seed this falls back to paired_difference over the fine-tuning seeds, whose interval holds no
    priming variance
    ("design" says which)."""
    unprimed = all(p is None for p, _ in baseline)
    pairs = {}
    for (p, f), x in condition.items():
        y = baseline.get((None, f) if unprimed else (p, f))
        if y is not None:
            pairs.setdefault(p, {})[f] = x - y
    if not pairs:
        return None
    common = sorted(set.intersection(*(set(d) for d in pairs.values())))
    if len(pairs) == 1 or not common:
        diffs = pairs[max(pairs, key=lambda p: len(pairs[p]))]  # one priming run (or none balanced): its seeds
        one = paired_difference(diffs, dict.fromkeys(diffs, 0.0))
        one.update(priming_seeds=1, finetune_seeds=one["n"], design="1 priming run x fine-tuning seeds: "
                   "the interval holds fine-tuning variance only, not priming variance")
        return one
    seeds_p = sorted(pairs)
    by_p = [statistics.mean(pairs[p][f] for f in common) for p in seeds_p]
    P, F = len(by_p), len(common)
    mean, sd = mean_std(by_p)
    if unprimed and F == 1:  # the baseline's own fine-tuning noise is in every D_p and cannot be measured
        return {"n": P, "priming_seeds": P, "finetune_seeds": 1, "mean": mean, "sd": sd, "df": None, "ci95": None,
                "half_width": None, "favour": sum(d > 0 for d in by_p), "favour_of": P, "seeds": common,
                "priming_seed_list": seeds_p, "design": f"{P} priming runs x 1 fine-tuning seed: no interval "
                "(against an unprimed row it needs 2 fine-tuning seeds that every priming run has)"}
    var_p = sd ** 2 / P
    var_f, df_f = 0.0, None
    if unprimed:  # the baseline's noise: the d_pf's spread within each priming run, pooled
        df_f = sum(len(d) - 1 for d in pairs.values())
        var_f = sum((len(d) - 1) * statistics.variance(d.values()) for d in pairs.values() if len(d) > 1) / df_f / F
    se = math.sqrt(var_p + var_f)
    df = (P - 1) if var_f == 0 else (var_p + var_f) ** 2 / (var_p ** 2 / (P - 1) + var_f ** 2 / df_f)
    half = t_quantile(0.975, df) * se if se > 0 else 0.0
    design = (f"{P} priming runs x {F} fine-tuning seeds: interval over priming runs"
              + (f" + the baseline's fine-tuning noise ({df_f} df)" if unprimed else ""))
    return {"n": P * F, "priming_seeds": P, "finetune_seeds": F, "mean": mean, "sd": sd, "df": df,
            "ci95": (mean - half, mean + half), "half_width": half, "favour": sum(d > 0 for d in by_p),
            "favour_of": P, "seeds": common, "priming_seed_list": seeds_p, "design": design,
            "baseline_noise_df": df_f}   # not None: the width also holds the unprimed baseline's seeds


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
