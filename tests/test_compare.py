"""compare.py's bookkeeping, with the three stages replaced by a fake that writes their outputs:
run identity, seeds and pairing, the paired statistics, commits, bad flags."""
import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from experiments import compare, compare_conditions, compare_report, compare_runs, stats

SEED_EFFECT = {0: 0.0, 1: -3.0, 2: 2.0, 3: -1.0, 4: 1.5}        # shared by every row: the pairing cancels it
CONDITION_EFFECT = {"none": 0.0, "MTL_priming": 0.5, "MAML_priming": 1.0}


def flag(command, name, default=None):
    return command[command.index(name) + 1] if name in command else default


def stage_args(script, command):
    """The flags as the stage would record them (its own parser, its defaults)."""
    if script not in ("meta_pretrain.py", "finetune_peft.py"):
        return {"seed": int(flag(command, "--seed", 0))}
    stage = __import__(script[:-3])
    return vars(stage.build_parser().parse_args(command[2:]))


class FakeStages:
    """Stands in for compare_runs.run_child: records each stage command and writes what the stage would."""

    def __init__(self, version="abc1234"):
        self.commands, self.version = [], version

    def __call__(self, command, *a, **k):
        script, out = Path(command[1]).name, Path(flag(command, "--out"))
        self.commands.append(command)
        record = {"args": stage_args(script, command), "code_version": self.version}
        if script == "meta_pretrain.py":
            out.mkdir(parents=True, exist_ok="--resume" in command or "--overwrite" in command)
            (out / "metrics.jsonl").write_text(json.dumps({"step": 1, "held_out_query_loss": 1.5}) + "\n")
            (out / "run.json").write_text(json.dumps(record | {"stage": "meta_pretrain", "status": "finished"}))
            (out / "config.json").write_text("{}")
        elif script == "finetune_peft.py":
            init = flag(command, "--init")
            out.mkdir(parents=True, exist_ok="--overwrite" in command)
            init_record = json.loads((Path(init) / "run.json").read_text()) if Path(init).is_dir() else None
            (out / "metrics.jsonl").write_text(json.dumps({"step": 1, "dev_f1_default": 50.0}) + "\n")
            (out / "peft.safetensors").write_text("tensors")
            (out / "peft_config.json").write_text("{}")
            (out / "run.json").write_text(json.dumps(record | {"init_path": init, "init_record": init_record,
                                                               "status": "finished"}))
        else:
            tuned = Path(flag(command, "--ckpt"))
            if not (tuned / "peft_config.json").is_file():     # as evaluate_ner.py: no weights, no scores
                return subprocess.CompletedProcess(command, 2)
            f = json.loads((tuned / "run.json").read_text())["args"]["seed"]
            name = tuned.name
            effect = next((v for k, v in CONDITION_EFFECT.items() if k in name), 0.0)
            langs = flag(command, "--langs").split(",")
            n = int(flag(command, "--max-sentences", 10000))
            results = {lang: {"f1_default": 70.0 + SEED_EFFECT[f] + effect + i, "f1_strict": 0.0, "sentences": n}
                       for i, lang in enumerate(langs)}
            results["average"] = {"f1_default": sum(r["f1_default"] for r in results.values()) / len(langs)}
            out.write_text(json.dumps({"results": results, "code_version": self.version}))
        return subprocess.CompletedProcess(command, 0)


def base_argv(tmp_path, *extra):
    return ["--out", str(tmp_path / "out"), "--runs", str(tmp_path / "runs"), "--pefts", "adapter",
            "--conditions", "no priming,MTL priming,MAML priming", "--finetune-seeds", "3", "--no-full",
            "--data-dir", str(tmp_path), "--budget", "smoke", *extra]


def scripts(commands):
    return [Path(c[1]).name for c in commands]


def test_every_primed_body_is_fine_tuned_with_every_fine_tuning_seed(tmp_path, fake):
    compare.main(base_argv(tmp_path, "--priming-seeds", "2"))
    primes = [c for c in fake.commands if "meta_pretrain.py" in c[1]]
    assert sorted((flag(c, "--method", "maml"), flag(c, "--seed")) for c in primes) == \
        [("maml", "0"), ("maml", "1"), ("mtl", "0"), ("mtl", "1")]
    tunes = [c for c in fake.commands if "finetune_peft.py" in c[1]]
    assert len(tunes) == 3 + 2 * 2 * 3                  # no priming: 3 seeds; MTL and MAML: 2 bodies x 3 seeds
    for primed in {flag(c, "--init") for c in tunes if "primed-" in flag(c, "--init")}:
        assert sorted(flag(c, "--seed") for c in tunes if flag(c, "--init") == primed) == ["0", "1", "2"]
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert results["rows"]["adapter | MAML priming"]["runs"] == 6


def test_a_second_identical_comparison_runs_nothing(tmp_path, fake):
    compare.main(base_argv(tmp_path))
    first = len(fake.commands)
    compare.main(base_argv(tmp_path))
    assert len(fake.commands) == first


@pytest.mark.parametrize("changed, new_stages", [
    (["--model", "other-model"], {"meta_pretrain.py", "finetune_peft.py", "evaluate_ner.py"}),
    (["--budget", "cpu"], {"meta_pretrain.py", "finetune_peft.py", "evaluate_ner.py"}),
    (["--inner-lr", "0.3"], {"meta_pretrain.py", "finetune_peft.py", "evaluate_ner.py"}),
    (["--inner-steps", "7"], {"meta_pretrain.py", "finetune_peft.py", "evaluate_ner.py"}),
    (["--priming-langs", "de"], {"meta_pretrain.py", "finetune_peft.py", "evaluate_ner.py"}),
    (["--langs", "fr,pt"], {"evaluate_ner.py"}),
    (["--eval-sentences", "16"], {"evaluate_ner.py"}),
    (["--finetune-seeds", "4"], {"finetune_peft.py", "evaluate_ner.py"}),
    (["--priming-seeds", "2"], {"meta_pretrain.py", "finetune_peft.py", "evaluate_ner.py"}),
    (["--pefts", "prefix"], {"meta_pretrain.py", "finetune_peft.py", "evaluate_ner.py"}),
    (["--data-dir", "OTHER"], {"meta_pretrain.py", "finetune_peft.py", "evaluate_ner.py"}),
])
def test_a_changed_flag_makes_new_runs(tmp_path, fake, changed, new_stages):
    compare.main(base_argv(tmp_path))
    first = len(fake.commands)
    if changed[0] == "--data-dir":
        (tmp_path / "other").mkdir()
        changed = ["--data-dir", str(tmp_path / "other")]
    argv = base_argv(tmp_path)
    at = argv.index(changed[0]) if changed[0] in argv else None
    argv = argv[:at] + changed + argv[at + 2:] if at is not None else argv + changed
    compare.main(argv)
    assert set(scripts(fake.commands[first:])) == new_stages
    out = json.loads((tmp_path / "out" / "results.json").read_text())
    if changed[0] == "--langs":  # re-evaluation with other target languages: a table of those
        assert "pt" in out["rows"]["adapter | no priming"] and "nl" not in out["rows"]["adapter | no priming"]


def test_gpu_flag_does_not_change_run_identity(tmp_path, fake):
    compare.main(base_argv(tmp_path))
    first = len(fake.commands)
    compare.main(base_argv(tmp_path, "--gpu", "0"))   # the real run_stage: a new identity would start a stage
    assert len(fake.commands) == first


def test_paired_differences_cancel_the_shared_seed_noise(tmp_path, fake):
    compare.main(base_argv(tmp_path, "--finetune-seeds", "5"))
    paired = json.loads((tmp_path / "out" / "results.json").read_text())["paired"]
    maml_vs_none = paired["adapter | MAML priming vs no priming"]
    assert maml_vs_none["n"] == 5 and math.isclose(maml_vs_none["mean"], 1.0) and maml_vs_none["favour"] == 5
    assert maml_vs_none["half_width"] == pytest.approx(0.0, abs=1e-9)     # identical differences: sd 0
    assert math.isclose(paired["adapter | MAML priming vs MTL priming"]["mean"], 0.5)
    assert set(paired) == {"adapter | MTL priming vs no priming", "adapter | MAML priming vs no priming",
                           "adapter | MAML priming vs MTL priming"}
    table = (tmp_path / "out" / "table.md").read_text()
    assert "| adapter | MAML priming vs no priming | 1 x 5 | +1.00 |" in table
    assert "seqeval default" in table and "10000 (the full test sets)" in table
    assert_tables_rectangular(table)


def assert_tables_rectangular(text):
    """Every markdown table in `text`: each row has as many cells as its header (else it renders shifted)."""
    tables, current = [], []
    for line in text.splitlines() + [""]:
        if line.startswith("|"):
            current.append(line.count("|") - 1)
        elif current:
            tables, current = tables + [current], []
    assert tables and all(set(t) == {t[0]} for t in tables), tables


def test_paired_difference_by_hand():
    condition = {0: 71.2, 1: 69.8, 2: 70.5, 3: 72.0}
    baseline = {0: 70.1, 1: 70.0, 2: 69.2, 3: 70.4, 9: 99.0}  # seed 9 has no partner: left out
    d = stats.paired_difference(condition, baseline)
    diffs = [1.1, -0.2, 1.3, 1.6]                      # by hand
    mean = sum(diffs) / 4                               # 0.95
    sd = math.sqrt(sum((x - mean) ** 2 for x in diffs) / 3)
    half = 3.182446 * sd / 2                            # t(0.975, 3) from a printed table
    assert d["n"] == 4 and d["favour"] == 3 and d["seeds"] == [0, 1, 2, 3]
    assert d["mean"] == pytest.approx(mean) and d["sd"] == pytest.approx(sd)
    assert d["half_width"] == pytest.approx(half, rel=1e-5)
    assert d["ci95"] == pytest.approx((mean - half, mean + half), rel=1e-5)


@pytest.mark.parametrize("df, expected", [(1, 12.7062), (2, 4.3027), (4, 2.7764), (9, 2.2622), (30, 2.0423)])
def test_t_quantiles_match_a_printed_table(df, expected):
    assert stats.t_quantile(0.975, df) == pytest.approx(expected, abs=1e-4)


def test_seeds_needed_for_a_half_width():
    n = stats.seeds_for_half_width(1.5, 0.7)
    assert stats.t_quantile(0.975, n - 1) * 1.5 / math.sqrt(n) <= 0.7
    assert stats.t_quantile(0.975, n - 2) * 1.5 / math.sqrt(n - 1) > 0.7


def test_rows_from_different_commits_are_flagged(tmp_path, fake):
    compare.main(base_argv(tmp_path))
    assert "different commits" not in (tmp_path / "out" / "table.md").read_text()
    fake.version = "def5678"
    compare.main(base_argv(tmp_path, "--finetune-seeds", "4"))   # seed 3 comes from another commit
    table = (tmp_path / "out" / "table.md").read_text()
    assert "different commits: abc1234, def5678" in table


def test_a_run_locked_by_another_process_is_left_to_it(tmp_path, fake):
    from plumbing.runs import try_lock
    compare.main(base_argv(tmp_path, "--conditions", "no priming"))
    first = len(fake.commands)
    tuned = next((tmp_path / "runs").glob("ft-adapter-no_priming-f0-*"))
    result = next(tuned.glob("eval-test-*.json"))
    result.unlink()
    held = try_lock(tmp_path / "runs" / compare_runs.LOCKS / f"{tuned.name}-{result.stem}.lock")  # another compare.py
    compare.main(base_argv(tmp_path, "--conditions", "no priming"))
    assert len(fake.commands) == first                 # left to the lock's holder
    held.close()                                       # that process ended (or was killed): the lock is free
    compare.main(base_argv(tmp_path, "--conditions", "no priming"))
    assert scripts(fake.commands[first:]) == ["evaluate_ner.py"]


def test_primed_rows_wait_for_their_reference_and_log_strength_against_it(tmp_path, fake):
    compare.main(base_argv(tmp_path, "--conditions", "MAML priming", "--finetune-seeds", "1"))
    ran = scripts(fake.commands)
    assert ran[:2] == ["finetune_peft.py", "meta_pretrain.py"]          # the no-priming seed-0 run comes first
    prime = fake.commands[1]
    assert Path(flag(prime, "--reference-ft")).name.startswith("ft-adapter-no_priming-f0-")


def test_an_interrupted_stage_is_started_again_with_overwrite(tmp_path, fake, monkeypatch):
    compare.main(base_argv(tmp_path, "--conditions", "no priming", "--finetune-seeds", "1"))
    tuned = next((tmp_path / "runs").glob("ft-adapter-no_priming-f0-*"))
    (tuned / "run.json").unlink()                      # as if killed before it finished
    for f in tuned.glob("eval-*"):
        f.unlink()
    first = len(fake.commands)
    fake.overwrites = []
    import shutil
    real = fake.__call__

    def clean_then_run(command, *a, **k):              # the stage's --overwrite empties the folder
        if "--overwrite" in command:
            shutil.rmtree(flag(command, "--out"))
            fake.overwrites.append(Path(command[1]).name)
        return real(command, *a, **k)
    monkeypatch.setattr(compare_runs, "run_child", clean_then_run)
    compare.main(base_argv(tmp_path, "--conditions", "no priming", "--finetune-seeds", "1"))
    assert scripts(fake.commands[first:]) == ["finetune_peft.py", "evaluate_ner.py"]
    assert fake.overwrites == ["finetune_peft.py"]


def test_an_unfinished_fine_tuning_record_is_run_again(tmp_path, fake):
    compare.main(base_argv(tmp_path, "--conditions", "no priming", "--finetune-seeds", "1"))
    tuned = next((tmp_path / "runs").glob("ft-adapter-no_priming-f0-*"))
    record = json.loads((tuned / "run.json").read_text())
    (tuned / "run.json").write_text(json.dumps(record | {"status": "running"}))  # killed while fine-tuning
    for f in tuned.glob("eval-*"):
        f.unlink()
    first = len(fake.commands)
    compare.main(base_argv(tmp_path, "--conditions", "no priming", "--finetune-seeds", "1"))
    assert scripts(fake.commands[first:]) == ["finetune_peft.py", "evaluate_ner.py"]
    assert "--overwrite" in fake.commands[first]


def test_a_fresh_checkout_continues_from_the_records(tmp_path, fake, monkeypatch):
    import shutil
    compare.main(base_argv(tmp_path))
    table = (tmp_path / "out" / "table.md").read_text()
    records = tmp_path / "out" / "records"
    reference = next(records.glob("ft-adapter-no_priming-f0-*"))
    assert (reference / "peft.safetensors").is_file()                         # the strength reference's tensors
    assert not list(records.glob("ft-adapter-no_priming-f1-*/peft.safetensors"))  # no other weights
    assert not list(records.glob("primed-*/config.json"))                     # no primed body
    shutil.rmtree(tmp_path / "runs")                                          # a fresh checkout: records only
    first = len(fake.commands)
    compare.main(base_argv(tmp_path))
    assert fake.commands[first:] == [] and (tmp_path / "out" / "table.md").read_text() == table
    compare.main(base_argv(tmp_path, "--finetune-seeds", "4"))                 # a row needs a primed body again
    new = fake.commands[first:]
    assert sorted(scripts(new)) == sorted(["meta_pretrain.py"] * 2 + ["finetune_peft.py", "evaluate_ner.py"] * 3)
    assert {flag(c, "--seed") for c in new if "finetune_peft.py" in c[1]} == {"3"}
    assert all("--overwrite" in c for c in new if "meta_pretrain.py" in c[1])   # its records are replaced


def test_the_main_rows_run_first_and_the_table_keeps_the_papers_order(tmp_path, fake):
    compare.main(["--out", str(tmp_path / "out"), "--runs", str(tmp_path / "runs"), "--finetune-seeds", "2",
                  "--ablation-finetune-seeds", "1", "--data-dir", str(tmp_path), "--budget", "smoke"])
    rows = [(Path(flag(c, "--ckpt")).name.split("-")[1], Path(flag(c, "--ckpt")).name.split("-")[2])
            for c in fake.commands if "evaluate_ner.py" in c[1]]
    main = {"no_priming", "MTL_priming", "MAML_priming", "dose_MAML_priming_for_1_4_of_the_meta_steps",
            "multi_source_fine_tuning_en_priming_languages", "MTL_priming_at_MAML_s_compute"}
    assert main == {compare.slug(c) for c in compare_conditions.FIRST}
    first_ablation = next(i for i, r in enumerate(rows) if r[1] not in main)
    assert all(r[1] in main for r in rows[:first_ablation]) and len(rows[:first_ablation]) == 2 * 6 * 2
    assert rows[-1][0] == "full"
    lines = [line for line in (tmp_path / "out" / "table.md").read_text().splitlines() if line.startswith("| adapter |")
             or line.startswith("| prefix |") or line.startswith("| full |")]
    expected = [f"| {p} | {c} |" for p in ("adapter", "prefix") for c in compare_conditions.CONDITIONS
                if c not in compare_conditions.OPT_IN] + ["| full | full"]   # the implicit rows: only when named
    assert [line[:len(e)] for line, e in zip(lines, expected)] == expected


@pytest.mark.parametrize("argv, message", [
    (["--finetune-seeds", "0"], "--finetune-seeds must be at least 1"),
    (["--priming-seeds", "0"], "--priming-seeds must be at least 1"),
    (["--langs", "fr,de"], "de is both a priming or source language and a target language"),
    (["--langs", "en,fr"], "en is both a priming or source language and a target language"),
    (["--conditions", "MAML"], "unknown condition(s) ['MAML']"),
    (["--eval-sentences", "0"], "--eval-sentences must be at least 1"),
])
def test_bad_flags_are_one_line(tmp_path, argv, message):
    run = subprocess.run([sys.executable, str(Path(compare.__file__)), "--out", str(tmp_path), *argv],
                         capture_output=True, text=True)
    assert run.returncode == 2 and message in run.stderr and len(run.stderr.strip().splitlines()) == 1
    assert not list(tmp_path.iterdir())                 # nothing written


def test_body_change_is_the_relative_change_of_non_embedding_weights(tmp_path):
    import torch
    from safetensors.torch import save_file
    before, after = tmp_path / "before", tmp_path / "primed-x"
    for folder in (before, after):
        folder.mkdir()
        (folder / "config.json").write_text("{}")
    weights = {"embeddings.word_embeddings.weight": torch.ones(10, 4), "encoder.layer.0.w": torch.full((3, 4), 2.0)}
    save_file(weights, str(before / "model.safetensors"))
    assert compare_report.primed_body_change(before, str(before)) == 0.0
    moved = dict(weights, **{"embeddings.word_embeddings.weight": torch.zeros(10, 4),   # embeddings: ignored
                             "encoder.layer.0.w": torch.full((3, 4), 2.2)})
    save_file(moved, str(after / "model.safetensors"))
    assert abs(compare_report.primed_body_change(after, str(before)) - 0.1) < 1e-6   # 0.2 / 2.0 in every entry
    table = {("adapter", "MAML priming"): {}, ("adapter", "no priming"): {}, ("adapter", "MTL priming"): {}}
    compare_report.add_body_change(table, {("adapter", "MAML priming"): [{"primed": after, "body_change": None}],
                                           ("adapter", "no priming"): [{"primed": None, "body_change": None}],
                                           ("adapter", "MTL priming"): [{"primed": tmp_path / "weights-gone",
                                                                         "body_change": 0.05}]}, str(before))
    assert abs(table[("adapter", "MAML priming")]["body_change"] - 0.1) < 1e-6   # measured from the weights
    assert table[("adapter", "MTL priming")]["body_change"] == 0.05                # as the priming run recorded it
    assert "body_change" not in table[("adapter", "no priming")]


def test_a_new_training_code_version_makes_new_runs(tmp_path, fake, monkeypatch):
    compare.main(base_argv(tmp_path, "--conditions", "no priming", "--finetune-seeds", "1"))
    first = len(fake.commands)
    monkeypatch.setattr(compare_runs, "TRAINING_CODE", "999")
    compare.main(base_argv(tmp_path, "--conditions", "no priming", "--finetune-seeds", "1"))
    assert scripts(fake.commands[first:]) == ["finetune_peft.py", "evaluate_ner.py"]


def test_an_interrupted_priming_run_is_resumed(tmp_path, fake):
    compare.main(base_argv(tmp_path, "--conditions", "MAML priming", "--finetune-seeds", "1"))
    primed = next((tmp_path / "runs").glob("primed-adapter-MAML_priming-p0-*"))
    (primed / "config.json").unlink()                  # killed after a resumable checkpoint
    (primed / "resume.pt").write_bytes(b"state")
    import shutil
    for where in (tmp_path / "runs", tmp_path / "out" / "records"):
        for tuned in where.glob(f"ft-{primed.name[len('primed-'):]}-*"):
            shutil.rmtree(tuned)                       # so nothing was fine-tuned on it yet
    first = len(fake.commands)
    compare.main(base_argv(tmp_path, "--conditions", "MAML priming", "--finetune-seeds", "1"))
    prime = [c for c in fake.commands[first:] if "meta_pretrain.py" in c[1]]
    assert len(prime) == 1 and "--resume" in prime[0] and "--overwrite" not in prime[0]


def test_the_dose_row_primes_a_quarter_of_the_steps_with_the_main_rows_seeds(tmp_path, fake, monkeypatch):
    prime = list(compare_conditions.BUDGETS["smoke"]["prime"])
    prime[prime.index("--steps") + 1] = "8"
    budget = {**compare_conditions.BUDGETS["smoke"], "prime": prime}
    monkeypatch.setitem(compare_conditions.BUDGETS, "smoke", budget)
    dose = "dose: MAML priming for 1/4 of the meta-steps"
    compare.main(base_argv(tmp_path, "--conditions", f"no priming,MAML priming,{dose}",
                           "--ablation-finetune-seeds", "1"))
    primes = [c for c in fake.commands if "meta_pretrain.py" in c[1]]
    steps = sorted(int(c[len(c) - 1 - c[::-1].index("--steps") + 1]) for c in primes)  # the last --steps wins
    assert steps == [2, 8]
    tuned = [Path(flag(c, "--out")).name for c in fake.commands if "finetune_peft.py" in c[1]]
    assert sum("dose_MAML_priming" in t for t in tuned) == 3  # the main rows' 3 fine-tuning seeds, not 1
    table = (tmp_path / "out" / "table.md").read_text()
    ladder = [line.split("|")[2].strip() for line in table.split("Dose-response")[1].splitlines()
              if line.startswith("| adapter")]
    assert ladder == ["0", "2", "8"]


def test_priming_curve_averages_adaptation_between_its_rows(tmp_path):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "experiments" / "benchmarks"))
    import priming_curve
    lines = [{"step": s, "support_loss_before": 2.0, "support_loss_after": a}
             for s, a in [(1, 1.0), (2, 0.6), (3, 0.2), (4, 0.4)]]
    lines[1] |= {"held_out_query_loss": 1.5, "body_change": 0.01}
    lines[3] |= {"held_out_query_loss": 1.2, "body_change": 0.02, "inner_loop_strength": 0.4}
    (tmp_path / "metrics.jsonl").write_text("\n".join(json.dumps(line) for line in lines) + "\n")
    rows = priming_curve.rows_of(tmp_path, every=1)
    assert [r[0] for r in rows] == [2, 4] and [r[1] for r in rows] == [1.5, 1.2]
    assert rows[0][2] == pytest.approx(0.4) and rows[1][2] == pytest.approx(0.15)  # (0.5+0.3)/2, (0.1+0.2)/2
    assert rows[1][3:] == (0.02, 0.4) and rows[0][4] is None
    assert [r[0] for r in priming_curve.rows_of(tmp_path, every=4)] == [4]
    assert priming_curve.rows_of(tmp_path, every=4)[0][2] == pytest.approx((0.5 + 0.3 + 0.1 + 0.2) / 4)


def test_each_ablation_is_paired_with_maml_priming_on_the_ablation_seeds(tmp_path, fake):
    compare.main(base_argv(tmp_path, "--conditions", "no priming,MAML priming,ablation: first-order",
                           "--ablation-finetune-seeds", "2"))
    paired = json.loads((tmp_path / "out" / "results.json").read_text())["paired"]
    ablation = paired["adapter | ablation: first-order vs MAML priming"]
    assert ablation["n"] == 2 and math.isclose(ablation["mean"], -1.0)  # the fake gives MAML +1, ablations 0
    assert paired["adapter | ablation: first-order vs no priming"]["n"] == 2
    table = (tmp_path / "out" / "table.md").read_text()
    assert "| adapter | ablation: first-order vs MAML priming | 1 x 2 | -1.00 |" in table
    assert_tables_rectangular(table)


def test_report_only_runs_nothing_and_tables_what_finished(tmp_path, fake):
    compare.main(base_argv(tmp_path, "--conditions", "no priming", "--finetune-seeds", "2"))
    first = len(fake.commands)
    compare.main(base_argv(tmp_path, "--finetune-seeds", "3", "--report-only"))
    assert fake.commands[first:] == []
    rows = json.loads((tmp_path / "out" / "results.json").read_text())["rows"]
    assert list(rows) == ["adapter | no priming"] and rows["adapter | no priming"]["runs"] == 2


def test_rows_without_a_common_seed_have_no_paired_difference():
    table = {("adapter", "no priming"): {"scores": {(None, 0): 70.0, (None, 2): 71.0}},  # what one of two processes
             ("adapter", "MTL priming"): {"scores": {(0, 1): 72.0, (0, 3): 73.0}},       # has seen when it writes
             ("adapter", "MAML priming"): {"scores": {(0, 0): 71.0, (0, 1): 74.0}}}
    paired = compare_report.paired_rows(table, compare_conditions.baselines_of)
    assert list(paired) == ["adapter | MAML priming vs no priming", "adapter | MAML priming vs MTL priming"]
    assert paired["adapter | MAML priming vs no priming"]["n"] == 1
    compare_report.paired_markdown(paired)  # one seed: no CI, no error


def test_full_fine_tuning_gets_the_full_rate_and_peft_runs_keep_their_identity(tmp_path):
    import finetune_peft
    args = compare.build_parser().parse_args(["--data-dir", "/elsewhere/wikiann"])
    for budget in ("cpu", "gpu", "smoke"):
        args.budget = budget
        full, _ = compare.finetune_plan(args, tmp_path, "e5-small", "full", 0, "full-no_priming")
        adapter, _ = compare.finetune_plan(args, tmp_path, "e5-small", "adapter", 0, "adapter-no_priming")
        assert finetune_peft.build_parser().parse_args(full).lr == finetune_peft.LR_FULL   # the last --lr wins
        assert finetune_peft.build_parser().parse_args(adapter).lr in (None, 1e-3)          # None: the PEFT default
    args.budget = "cpu"   # changing a PEFT run's flags would orphan the committed verdict's records
    _, folder = compare.finetune_plan(args, tmp_path, "e5-small", "adapter", 0, "adapter-no_priming")
    assert folder.name == "ft-adapter-no_priming-f0-cf9396b36f"               # location free: any .../wikiann
    records = compare.ROOT / "experiments" / "results" / "verdict-cpu" / "records"
    _, folder = compare.finetune_plan(args, records, "e5-small", "adapter", 0, "adapter-no_priming")
    assert folder.name == "ft-adapter-no_priming-f0-2de6f7c344"               # the verdict's, by its recorded flags


def test_a_priming_run_killed_after_its_body_was_saved_is_resumed(tmp_path, fake):
    compare.main(base_argv(tmp_path, "--conditions", "MAML priming", "--finetune-seeds", "1"))
    primed = next((tmp_path / "runs").glob("primed-adapter-MAML_priming-*"))
    record = json.loads((primed / "run.json").read_text())
    (primed / "run.json").write_text(json.dumps(record | {"status": "running"}))  # killed before the last record
    (primed / "resume.pt").write_text("state")
    for f in (tmp_path / "runs").glob("ft-adapter-MAML_priming-*/eval-*"):
        f.unlink()
    first = len(fake.commands)
    compare.main(base_argv(tmp_path, "--conditions", "MAML priming", "--finetune-seeds", "1"))
    new = fake.commands[first:]
    assert scripts(new)[0] == "meta_pretrain.py" and "--resume" in new[0]   # not taken as done (config.json exists)


def test_a_fresh_checkout_evaluates_new_languages_from_the_records(tmp_path, fake):
    import shutil
    compare.main(base_argv(tmp_path, "--finetune-seeds", "1"))
    shutil.rmtree(tmp_path / "runs")                                          # a fresh checkout: records only
    first = len(fake.commands)
    compare.main(base_argv(tmp_path, "--finetune-seeds", "1", "--langs", "fr,nl"))  # new languages: new scores
    new = fake.commands[first:]
    assert sorted(scripts(new)) == sorted(["meta_pretrain.py"] * 2 + ["finetune_peft.py"] * 2 + ["evaluate_ner.py"] * 3)
    assert all("--overwrite" in c for c in new if Path(c[1]).name != "evaluate_ner.py")  # weightless records replaced


def test_a_clone_elsewhere_with_the_data_elsewhere_continues_from_the_records(tmp_path, fake):
    here, there = tmp_path / "here", tmp_path / "there"
    for folder in (here / "wikiann", there / "data" / "wikiann"):
        folder.mkdir(parents=True)
    argv = ["--pefts", "adapter", "--conditions", "no priming,MTL priming", "--finetune-seeds", "2", "--no-full",
            "--budget", "smoke"]
    compare.main([*argv, "--data-dir", str(here / "wikiann"), "--out", str(here / "out"), "--runs", str(here / "runs")])
    ran = len(fake.commands)
    shutil.copytree(here / "out" / "records", there / "records")          # what a clone has: the committed records
    compare.main([*argv, "--data-dir", str(there / "data" / "wikiann"), "--out", str(there / "out"),
                  "--runs", str(there / "runs"), "--records", str(there / "records"), "--report-only"])
    assert len(fake.commands) == ran
    rows = json.loads((there / "out" / "results.json").read_text())["rows"]
    assert rows["adapter | MTL priming"]["runs"] == 2 and rows["adapter | no priming"]["runs"] == 2


def test_a_clone_elsewhere_reads_priming_time_and_curves_from_the_restored_records(tmp_path, fake):
    """The fine-tuning records name their primed body by the path of the machine that ran it; a clone
    elsewhere finds it by name in its own runs folder (cost column, priming curves)."""
    here, there = tmp_path / "here", tmp_path / "there"
    argv = ["--pefts", "adapter", "--conditions", "no priming,MTL priming", "--finetune-seeds", "2", "--no-full",
            "--budget", "smoke", "--data-dir", str(tmp_path)]
    compare.main([*argv, "--out", str(here / "out"), "--runs", str(here / "runs")])
    shutil.copytree(here / "out" / "records", there / "records")
    shutil.rmtree(here)                                                    # the machine that ran it is gone
    primed = next((there / "records").glob("primed-*"))                    # its log: 150 s of priming
    log = [{"step": 1, "seconds": 100.0, "held_out_query_loss": 1.5},
           {"step": 2, "seconds": 50.0, "held_out_query_loss": 1.0}]
    (primed / "metrics.jsonl").write_text("".join(json.dumps(line) + "\n" for line in log))
    compare.main([*argv, "--out", str(there / "out"), "--runs", str(there / "runs"), "--records",
                  str(there / "records"), "--report-only"])
    rows = json.loads((there / "out" / "results.json").read_text())["rows"]
    assert rows["adapter | MTL priming"]["priming_seconds"] == 150.0
    tuned = next((there / "runs").glob("ft-adapter-MTL_priming-*"))
    assert compare_report.read_run(next(tuned.glob("eval-*.json")))["primed"] == there / "runs" / primed.name


def test_a_curve_is_averaged_step_by_step_over_the_runs_that_logged_the_step(tmp_path):
    from experiments import compare_plots
    for name, points in {"a": [(1, 1.0), (2, 3.0)], "b": [(1, 2.0), (2, 5.0)], "running": []}.items():
        (tmp_path / name).mkdir()
        (tmp_path / name / "metrics.jsonl").write_text(
            "".join(json.dumps({"step": s, "loss": v}) + "\n" for s, v in points) + json.dumps({"step": 3}) + "\n")
    assert compare_plots.mean_curve([tmp_path / n for n in ("a", "b", "running")], "loss") == ([1, 2], [1.5, 4.0])
    (tmp_path / "b" / "metrics.jsonl").write_text(json.dumps({"step": 1, "loss": 2.0}) + "\n")   # b logged step 1 only
    assert compare_plots.mean_curve([tmp_path / "a", tmp_path / "b"], "loss") == ([1, 2], [1.5, 3.0])


def test_the_conditions_plotted_get_distinct_colours():
    from experiments import compare_plots
    rows = {("adapter", c): [] for c in ("no priming", "MTL priming", "MAML priming", compare_conditions.EQUAL_COMPUTE,
                                         "implicit MAML priming", "implicit MAML priming (first order)")}
    colors = compare_plots.condition_colors(rows, list(compare_conditions.CONDITIONS))
    assert set(colors) == {c for _, c in rows} and len(set(colors.values())) == len(rows)


def legacy_run(runs, prefix, flags, old_runs, status="finished"):
    """A run folder as compare.py named it before identities were location free: the hash of the raw
    flags (absolute paths of the machine that ran it); its run.json records the stage command."""
    folder = runs / f"{prefix}-{compare_runs.flags_hash(flags)}"
    folder.mkdir(parents=True)
    command = ["/old/clone/stage.py", *flags, "--out", f"{old_runs}/{folder.name}", "--overwrite"]
    (folder / "run.json").write_text(json.dumps({"command": " ".join(command), "status": status}))
    return folder


def test_runs_recorded_under_their_older_absolute_identity_are_found(tmp_path):
    (tmp_path / "wikiann").mkdir()
    args = compare.build_parser().parse_args(["--data-dir", str(tmp_path / "wikiann"), "--budget", "smoke"])
    compare.check_args(args)
    runs, old_runs, old_data = tmp_path / "runs", "/old/machine/runs", "/old/machine/data/wikiann"

    def old(flags):
        return [old_data if f == args.data_dir else f for f in flags]

    flags, _ = compare.prime_plan(args, runs, "adapter", "MTL priming", 1)
    primed = legacy_run(runs, "primed-adapter-MTL_priming-p1", old(flags), old_runs)
    assert compare.prime_plan(args, runs, "adapter", "MTL priming", 1)[1] == primed
    tag = primed.name[len("primed-"):]
    flags, new = compare.finetune_plan(args, runs, primed, "adapter", 0, tag)
    assert new.name != primed.name and not new.exists()
    raw = old(flags)
    raw[raw.index("--init") + 1] = f"{old_runs}/{primed.name}"
    tuned = legacy_run(runs, f"ft-{tag}-f0", raw, old_runs)
    legacy_run(runs, f"ft-{tag}-f1", [*raw[:-1], "0"], old_runs)               # named for seed 1, recorded seed 0
    assert compare.finetune_plan(args, runs, primed, "adapter", 0, tag)[1] == tuned
    assert not compare.finetune_plan(args, runs, primed, "adapter", 1, tag)[1].exists()   # flags differ: not taken
    flags, _ = compare.evaluate_plan(args, tuned, ["fr", "nl"], "test")
    evaluation = tuned / f"eval-test-{compare_runs.flags_hash(old(flags))}.json"
    evaluation.write_text("{}")
    assert compare.evaluate_plan(args, tuned, ["fr", "nl"], "test")[1] == evaluation
    assert compare.evaluate_plan(args, tuned, ["fr", "pt"], "test")[1] != evaluation


def test_the_implicit_rows_prime_with_the_implicit_loop_and_pair_with_mtl_and_maml(tmp_path, fake):
    import meta_pretrain
    conditions = "no priming,MTL priming,MAML priming,implicit MAML priming,implicit MAML priming (first order)"
    compare.main(base_argv(tmp_path, "--conditions", conditions, "--finetune-seeds", "2", "--priming-seeds", "2",
                           "--inner-lr", "0.1"))
    primes = {Path(flag(c, "--out")).name.rsplit("-", 1)[0]: c for c in fake.commands if "meta_pretrain.py" in c[1]}
    implicit = primes["primed-adapter-implicit_MAML_priming-p1"]
    first = primes["primed-adapter-implicit_MAML_priming_first_order-p1"]
    assert flag(implicit, "--inner-loop") == "implicit" and "--first-order" not in implicit
    assert flag(first, "--inner-loop") == "implicit" and "--first-order" in first
    def last(command, name):
        return [v for f, v in zip(command, command[1:]) if f == name][-1]
    assert last(primes["primed-adapter-MAML_priming-p1"], "--inner-lr") == "0.1"   # compare's --inner-lr: unrolled only
    assert last(implicit, "--inner-lr") == last(first, "--inner-lr") == "0.3"      # the budget's (the default)
    for command in (implicit, first):   # the stage accepts them (the budget's unrolled shape is its default)
        i = command.index("--reference-ft")       # (logging only; the fake's reference has no PEFT config)
        args = meta_pretrain.build_parser().parse_args(command[2:i] + command[i + 2:])
        meta_pretrain.check_args(args)
        assert args.inner_lr == meta_pretrain.INNER_LR
    paired = json.loads((tmp_path / "out" / "results.json").read_text())["paired"]
    assert {"adapter | implicit MAML priming vs MTL priming", "adapter | implicit MAML priming vs MAML priming",
            "adapter | implicit MAML priming (first order) vs implicit MAML priming"} <= set(paired)
    assert paired["adapter | implicit MAML priming vs MAML priming"]["priming_seeds"] == 2   # over priming runs
    args = compare.build_parser().parse_args(["--data-dir", str(tmp_path)])
    assert not set(compare_conditions.OPT_IN) & set(compare.check_args(args)[1])   # not in the default comparison


def test_an_older_name_is_taken_only_for_the_same_training_code_and_a_finished_run_first(tmp_path, monkeypatch):
    (tmp_path / "wikiann").mkdir()
    args = compare.build_parser().parse_args(["--data-dir", str(tmp_path / "wikiann"), "--budget", "smoke"])
    compare.check_args(args)
    runs = tmp_path / "runs"
    flags, _ = compare.finetune_plan(args, runs, "e5-small", "adapter", 0, "adapter-no_priming")
    elsewhere = [[f"/old/{where}/wikiann" if f == args.data_dir else f for f in flags] for where in ("a", "b")]
    first, second = sorted(legacy_run(runs, "ft-adapter-no_priming-f0", raw, f"/old/{w}/runs", status="running")
                           for raw, w in zip(elsewhere, "ab"))
    running, done = first, second                                  # the first found is running, the second finished
    record = json.loads((done / "run.json").read_text())
    (done / "run.json").write_text(json.dumps(record | {"status": "finished"}))
    assert compare.finetune_plan(args, runs, "e5-small", "adapter", 0, "adapter-no_priming")[1] == done
    (done / "run.json").unlink()                                   # only the running one left: shared, not re-run
    assert compare.finetune_plan(args, runs, "e5-small", "adapter", 0, "adapter-no_priming")[1] == running
    monkeypatch.setattr(compare_runs, "TRAINING_CODE", compare_runs.TRAINING_CODE + "-changed")
    new = compare.finetune_plan(args, runs, "e5-small", "adapter", 0, "adapter-no_priming")[1]
    assert new != running and not new.exists()                     # code that trains differently: a new run


def test_a_reused_run_must_have_read_the_same_data_bytes(tmp_path):
    from plumbing.ner_data import data_provenance
    for where, text in (("a", "EU\tB-ORG\n"), ("b", "EU\tB-LOC\n")):
        (tmp_path / where / "wikiann" / "en").mkdir(parents=True)
        (tmp_path / where / "wikiann" / "en" / "train").write_text(text)
    runs = tmp_path / "runs"

    def plan(where):
        args = compare.build_parser().parse_args(["--data-dir", str(tmp_path / where / "wikiann"), "--budget", "smoke"])
        compare.check_args(args)
        return compare.finetune_plan(args, runs, "e5-small", "adapter", 0, "adapter-no_priming")

    flags, folder = plan("a")
    folder.mkdir(parents=True)
    data = data_provenance(str(tmp_path / "a" / "wikiann"), [("en", "train")])
    (folder / "run.json").write_text(json.dumps({"status": "finished", "data": data}))
    assert plan("a")[1] == folder
    compare_runs.current_sha256.cache_clear()
    with pytest.raises(ValueError, match=r"made from other data than .*b/wikiann holds \(en/train differ"):
        plan("b")                                                   # same folder name, other bytes
    shutil.copy(tmp_path / "a" / "wikiann" / "en" / "train", tmp_path / "b" / "wikiann" / "en" / "train")
    compare_runs.current_sha256.cache_clear()
    assert plan("b")[1] == folder                                   # same bytes elsewhere: reused


def test_second_order_implicit_records_from_before_curvature_are_the_exact_hessian_row(tmp_path, monkeypatch):
    """Committed implicit runs ran the exact Hessian's system before --curvature existed: the row that
    says --curvature hessian finds them; the Gauss-Newton row (the new default) does not reuse them."""
    monkeypatch.setattr(compare_runs, "check_data", lambda *a: None)      # the data's bytes: not what this tests
    records = compare.ROOT / "experiments" / "results" / "verdict-cpu" / "records"
    args = compare.build_parser().parse_args(["--data-dir", str(tmp_path / "wikiann"), "--pefts", "adapter"])
    runs = tmp_path / "runs"
    runs.mkdir()
    compare_runs.restore_records(records, runs)
    _, exact = compare.prime_plan(args, runs, "adapter", "implicit MAML priming", 0)
    _, ggn = compare.prime_plan(args, runs, "adapter", "implicit MAML priming (Gauss-Newton)", 0)
    assert exact.name in {p.name for p in records.iterdir()}
    assert "--curvature" not in compare_runs.read_record(exact)["command"]
    assert ggn.name != exact.name                       # the Gauss-Newton row never reuses the exact Hessian's runs
    _, first = compare.prime_plan(args, runs, "adapter", "implicit MAML priming (first order)", 0)
    assert first.name in {p.name for p in records.iterdir()}                 # first order: untouched


def test_the_gauss_newton_row_is_paired_with_first_order_and_the_exact_hessian():
    """Its second-order term, measured: the same implicit loop without it, and with the exact Hessian."""
    bases = compare_conditions.baselines_of("implicit MAML priming (Gauss-Newton)")
    assert bases[-2:] == ["implicit MAML priming (first order)", "implicit MAML priming"]
    assert "implicit MAML priming (Gauss-Newton)" not in compare_conditions.baselines_of("implicit MAML priming")


def test_report_only_never_replaces_results_with_fewer(tmp_path, fake):
    compare.main(base_argv(tmp_path, "--finetune-seeds", "1"))
    out = tmp_path / "out"
    before = {name: (out / name).read_bytes() for name in ("table.md", "results.json")}
    (tmp_path / "elsewhere").mkdir()                                # other data: none of the runs match
    with pytest.raises(ValueError, match="--report-only: .* would replace .*results.json with fewer"):
        compare.main(base_argv(tmp_path, "--finetune-seeds", "1", "--report-only") + ["--data-dir",
                                                                                     str(tmp_path / "elsewhere")])
    assert {name: (out / name).read_bytes() for name in before} == before
