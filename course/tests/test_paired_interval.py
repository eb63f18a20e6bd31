"""Assignment `paired_interval` (course/paired_interval.md): Student's t quantile and the paired
95% interval of the verdict (METHOD.md, "The statistics"): mean(d) +- t(0.975, n-1) sd(d) / sqrt(n)
over the seeds both rows have. Expected values: a printed t table, a hand-computed case, and the
interval's coverage in simulation.
"""

import math
import random

import pytest

from experiments.stats import paired_difference, t_quantile

T_TABLE = [  # (p, df, t): a printed table of Student's t (three decimals)
    (0.975, 1, 12.706), (0.975, 2, 4.303), (0.975, 4, 2.776), (0.975, 9, 2.262), (0.975, 29, 2.045),
    (0.975, 100, 1.984), (0.95, 10, 1.812), (0.995, 5, 4.032), (0.9, 20, 1.325),
]


@pytest.mark.parametrize("p, df, t", T_TABLE)
def test_t_quantile_matches_the_table(p, df, t):
    assert t_quantile(p, df) == pytest.approx(t, abs=6e-4)


def test_t_quantile_for_fractional_degrees_of_freedom_and_the_normal_limit():
    """Welch's degrees of freedom are not whole numbers: the quantile falls smoothly between them."""
    assert t_quantile(0.975, 4) > t_quantile(0.975, 4.5) > t_quantile(0.975, 5)
    assert t_quantile(0.975, 1e6) == pytest.approx(1.95996, abs=1e-4)


def test_the_hand_computed_case():
    condition, baseline = {0: 71.2, 1: 69.8, 2: 70.5}, {0: 70.1, 1: 70.0, 2: 69.2}
    # differences 1.1, -0.2, 1.3: mean 0.7333, sd sqrt(((0.3667)^2 + (0.9333)^2 + (0.5667)^2) / 2) = 0.8145
    out = paired_difference(condition, baseline)
    assert out["n"] == 3 and out["seeds"] == [0, 1, 2] and out["favour"] == 2
    assert out["mean"] == pytest.approx(0.73333, abs=1e-4)
    assert out["sd"] == pytest.approx(0.81445, abs=1e-4)
    assert out["half_width"] == pytest.approx(4.3027 * 0.81445 / math.sqrt(3), abs=1e-3)
    assert out["ci95"] == pytest.approx((0.73333 - 2.0232, 0.73333 + 2.0232), abs=1e-3)


def test_only_the_seeds_both_rows_have_are_paired():
    out = paired_difference({0: 2.0, 1: 3.0, 5: 100.0}, {0: 1.0, 1: 1.0, 7: -100.0})
    assert out["seeds"] == [0, 1] and out["n"] == 2 and out["mean"] == pytest.approx(1.5)
    assert paired_difference({0: 1.0}, {1: 1.0}) is None


def test_one_seed_has_no_interval_and_ties_do_not_favour():
    out = paired_difference({3: 5.0}, {3: 4.0})
    assert out["n"] == 1 and out["mean"] == 1.0 and out["sd"] == 0.0
    assert out["ci95"] is None and out["half_width"] is None
    assert paired_difference({0: 1.0, 1: 2.0}, {0: 1.0, 1: 1.0})["favour"] == 1


def test_the_interval_covers_the_true_difference_95_percent_of_the_time():
    rng = random.Random(0)
    runs, covered = 2000, 0
    for _ in range(runs):
        seed_effect = {s: rng.gauss(70, 2) for s in range(5)}   # shared by both rows: cancels when paired
        baseline = {s: seed_effect[s] + rng.gauss(0, 1) for s in range(5)}
        condition = {s: seed_effect[s] + 1.0 + rng.gauss(0, 1) for s in range(5)}
        low, high = paired_difference(condition, baseline)["ci95"]
        covered += low <= 1.0 <= high
    assert 0.935 < covered / runs < 0.965


def test_runs_are_paired_by_seed_whatever_order_they_were_recorded_in():
    """Each row is {seed: score}; the rows of two conditions need not list their seeds in the same order
    (runs finish when they finish), nor hold the same seeds."""
    condition = {2: 70.5, 0: 71.2, 9: 50.0, 1: 69.8}
    baseline = {0: 70.1, 1: 70.0, 2: 69.2}
    out = paired_difference(condition, baseline)
    assert out["seeds"] == [0, 1, 2] and out["mean"] == pytest.approx(0.73333, abs=1e-4)
    assert out["sd"] == pytest.approx(0.81445, abs=1e-4) and out["favour"] == 2
