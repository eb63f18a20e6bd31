"""The verdict as a reviewer reads it: the p values beside the report's intervals and Holm's adjustment
within a family of comparisons (against values computed by hand), row means that subtract to the paired
differences, and table columns named for what they hold."""
import math
import random

import pytest

from experiments import compare_report, stats
from experiments.compare_conditions import baselines_of


def test_holm_by_hand():
    # m = 4, ranked 0.005 < 0.01 < 0.03 < 0.04: 4 x 0.005, 3 x 0.01, 2 x 0.03, then max(0.06, 1 x 0.04)
    adjusted = stats.holm({"a": 0.01, "b": 0.04, "c": 0.03, "d": 0.005, "no test": None})
    assert adjusted == pytest.approx({"d": 0.02, "a": 0.03, "c": 0.06, "b": 0.06})
    assert stats.holm({"x": 0.6, "y": 0.7}) == {"x": 1.0, "y": 1.0}        # capped at 1, never decreasing
    assert stats.holm({"alone": 0.024}) == {"alone": 0.024}                 # a family of one: unchanged
    # the prefix family: 0.024 ranked 5th of 6 is doubled
    family = {"1": 1e-4, "2": 2e-4, "3": 3e-4, "4": 4e-4, "MAML vs MTL": 0.024, "6": 0.1}
    assert stats.holm(family)["MAML vs MTL"] == pytest.approx(0.048)
    assert stats.holm({}) == {}


def test_t_test_p_by_hand():
    # closed forms: df 1 (Cauchy) P(|T| >= t) = 1 - 2 atan(t) / pi; df 2: 1 - t / sqrt(2 + t^2)
    for t in (0.3, 1.0, 4.303, 12.0):
        assert stats.t_test_p(t, 1.0, 1) == pytest.approx(1 - 2 * math.atan(t) / math.pi, abs=1e-7)
        assert stats.t_test_p(-2 * t, 2.0, 2) == pytest.approx(1 - t / math.sqrt(2 + t * t), abs=1e-7)
    assert stats.t_test_p(2.776445, 1.0, 4) == pytest.approx(0.05, abs=1e-5)  # the printed t(0.975, 4)
    assert stats.t_test_p(0.0, 0.0, 3) == 1.0 and stats.t_test_p(0.5, 0.0, 3) == 0.0


def test_every_interval_excludes_zero_exactly_when_its_p_is_below_005():
    rng = random.Random(0)
    for _ in range(60):
        shift = rng.uniform(-2, 2)
        primed = {(p, f): shift + rng.gauss(0, 1) for p in range(3) for f in range(2)}
        other = {(p, f): rng.gauss(0, 1) for p in range(3) for f in range(2)}
        unprimed = {(None, f): rng.gauss(0, 1) for f in range(5)}
        one = {(0, f): shift + rng.gauss(0, 1) for f in range(4)}
        for d in (stats.two_level_difference(primed, other), stats.two_level_difference(primed, unprimed),
                  stats.two_level_difference(one, {(0, f): 0.0 for f in range(4)})):
            low, high = d["ci95"]
            assert (low > 0 or high < 0) == (d["p"] < 0.05), d


def test_the_p_of_each_design_by_hand():
    # primed vs primed over 3 priming runs: D_p = 1, 2, 3: mean 2, sd 1, t = 2 / (1 / sqrt 3), df 2
    runs = {(p, f): 1.0 + p for p in range(3) for f in range(2)}
    d = stats.two_level_difference(runs, {(p, f): 0.0 for p in range(3) for f in range(2)})
    t = 2 * math.sqrt(3)
    assert d["df"] == 2 and d["p"] == pytest.approx(1 - t / math.sqrt(2 + t * t), abs=1e-7)
    # one priming run, 2 fine-tuning seeds: differences 1, 3: mean 2, sd sqrt 2, t = 2, df 1
    one = stats.two_level_difference({(0, 0): 1.0, (0, 1): 3.0}, {(0, 0): 0.0, (0, 1): 0.0})
    assert one["df"] == 1 and one["p"] == pytest.approx(1 - 2 * math.atan(2.0) / math.pi, abs=1e-7)
    # Welch: the se is the one the half-width was made of
    welch = stats.two_level_difference(runs, {(None, f): 0.5 * f for f in range(4)})
    se = welch["half_width"] / stats.t_quantile(0.975, welch["df"])
    assert welch["p"] == pytest.approx(stats.t_test_p(welch["mean"], se, welch["df"]))
    assert welch["baseline_sd"] == pytest.approx(stats.mean_std([0, 0.5, 1.0, 1.5])[1])
    # no interval, no p
    assert stats.two_level_difference(runs, {(None, 0): 1.0})["p"] is None


def run(priming_seed, finetune_seed, score):
    """A finished run as compare_report.read_run gives it (fr alone, so fr is the average)."""
    results = {lang: {"f1_default": score, "sentences": 100} for lang in ("fr", "average")}
    return {"results": results, "priming_seed": priming_seed, "finetune_seed": finetune_seed, "versions": ["abc"],
            "primed": None, "priming_seconds": None, "exposure": None}


def row(scores):
    """collect() of {(priming seed, fine-tuning seed): score}."""
    return compare_report.collect([run(p, f, x) for (p, f), x in scores.items()], ["fr"])


def test_row_means_weight_priming_runs_equally_and_subtract_to_the_differences():
    # priming run 0 has 5 fine-tuning seeds, runs 1-2 have 2 (the verdict's design); run 0 scores high on seeds 2-4
    primed = {(0, f): [70.0, 71.0, 90.0, 90.0, 90.0][f] for f in range(5)} | {(p, f): 60.0 + p + f
                                                                              for p in (1, 2) for f in range(2)}
    unprimed = {(None, f): 50.0 + f for f in range(5)}
    a, b = row(primed), row(unprimed)
    x_p = [70.5, 61.5, 62.5]                          # each run's mean over seeds 0-1, the seeds every run has
    assert a["average"][0] == pytest.approx(sum(x_p) / 3) and (a["runs"], a["runs_in_means"]) == (9, 6)
    assert b["average"][0] == 52.0 and b["runs_in_means"] == 5          # an unprimed row: all its seeds
    welch = stats.two_level_difference(a["scores"], b["scores"])
    assert a["average"][0] - b["average"][0] == pytest.approx(welch["mean"])
    other = row({(p, f): 65.0 for p in range(3) for f in range(2)})
    assert a["average"][0] - other["average"][0] == pytest.approx(
        stats.two_level_difference(a["scores"], other["scores"])["mean"])
    line = compare_report.markdown({("adapter", "A"): a, ("adapter", "B"): b}, ["fr"]).splitlines()
    assert line[0].split("|")[3].strip() == "runs (in the means)"
    assert line[2].split("|")[3].strip() == "9 (6)" and line[3].split("|")[3].strip() == "5"


def verdict_table(pick):
    """A table of adapter rows, 5 priming runs x 2 seeds (no priming: 5 seeds), with MAML below MTL."""
    rng = random.Random(1)
    level = {"no priming": 73.0, "MTL priming": 78.0, "MAML priming": 76.0, "implicit MAML priming": 77.0}
    table = {}
    for condition in pick:
        keys = ([(None, f) for f in range(5)] if condition == "no priming"
                else [(p, f) for p in range(5) for f in range(2)])
        table[("adapter", condition)] = row({k: level[condition] + rng.gauss(0, 0.5) for k in keys})
    return table


def test_each_comparison_is_holm_adjusted_within_its_family():
    table = verdict_table(["no priming", "MTL priming", "MAML priming", "implicit MAML priming"])
    paired = compare_report.paired_rows(table, baselines_of)
    families = {name: d["family"] for name, d in paired.items()}
    assert families == {
        "adapter | MTL priming vs no priming": "adapter: primed vs unprimed",
        "adapter | MAML priming vs no priming": "adapter: primed vs unprimed",
        "adapter | MAML priming vs MTL priming": "adapter: primed vs primed",
        "adapter | implicit MAML priming vs no priming": "adapter: implicit rows",
        "adapter | implicit MAML priming vs MTL priming": "adapter: implicit rows",
        "adapter | implicit MAML priming vs MAML priming": "adapter: implicit rows"}
    for family in set(families.values()):
        members = {name: paired[name]["p"] for name in families if families[name] == family}
        assert {name: paired[name]["holm_p"] for name in members} == stats.holm(members)
        assert {paired[name]["family_size"] for name in members} == {len(members)}
    alone = paired["adapter | MAML priming vs MTL priming"]     # a family of one
    assert alone["holm_p"] == alone["p"]
    text = compare_report.paired_markdown(paired)
    line = next(entry for entry in text.splitlines() if "| MAML priming vs no priming |" in entry).split("|")
    d = paired["adapter | MAML priming vs no priming"]
    assert line[-3].strip() == compare_report.p_cell(d["p"])
    assert line[-2].strip() == f"{compare_report.p_cell(d['holm_p'])} (primed vs unprimed, 2)"


def test_the_sd_column_names_what_it_holds_and_small_sign_counts_are_not_shown():
    three = {(p, f): 1.0 + p + 0.1 * f for p in range(3) for f in range(2)}
    five = {(p, f): 1.0 + p + 0.1 * f for p in range(5) for f in range(2)}
    zeros = {(p, f): 0.0 for p in range(5) for f in range(2)}
    paired = {"adapter | A vs B": stats.two_level_difference(three, zeros),
              "adapter | C vs B": stats.two_level_difference(five, zeros),
              "adapter | A vs none": stats.two_level_difference(five, {(None, f): 0.5 * f for f in range(3)}),
              "adapter | D vs none": stats.two_level_difference({(0, f): 1.0 + f for f in range(3)},
                                                                {(None, f): 0.0 for f in range(3)})}
    for d in paired.values():
        d.update(family="adapter: primed vs primed", family_size=4, holm_p=min(1.0, 4 * d["p"]))
    lines = compare_report.paired_markdown(paired).splitlines()
    assert "| sd of the interval's inputs |" in lines[0]
    cells = [[c.strip() for c in line.split("|")[7:9]] for line in lines[2:]]
    d = paired["adapter | A vs none"]
    assert cells == [["-", f"{paired['adapter | A vs B']['sd']:.2f} (D_p)"],
                     ["5 of 5 priming runs", f"{paired['adapter | C vs B']['sd']:.2f} (D_p)"],
                     ["5 of 5 priming runs", f"X_p {d['sd']:.2f}, y {d['baseline_sd']:.2f}"],
                     ["-", f"{paired['adapter | D vs none']['sd']:.2f} (d_f)"]]


def test_the_report_says_which_claims_survive_holm():
    paired = {"adapter | A vs B": {"p": 0.01, "holm_p": 0.02}, "adapter | C vs B": {"p": 0.03, "holm_p": 0.06},
              "adapter | D vs B": {"p": 0.4, "holm_p": 0.4}, "adapter | E vs B": {"p": None, "holm_p": None}}
    survive, fall = compare_report.survival_lines(paired)
    assert survive == "Intervals that exclude 0 and survive Holm within their family: adapter | A vs B."
    assert fall == "Intervals that exclude 0 but do not survive it: adapter | C vs B (p 0.030, Holm 0.060)."
