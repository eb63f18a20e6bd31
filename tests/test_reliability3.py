"""Nothing of the user's touched, every message true (issue 38, the last cases): no run inside a run,
a write that fails names its cause, compare.py reads damaged files in one line and takes its running
stage down with it, the helpers' command lines, advice that keeps a run's flags, and a body whose
config.json names another architecture. One fault injected per test, on a tiny model."""
from pathlib import Path

import pytest
from test_compare import FakeStages
from test_provenance import contents, evaluate_argv
from test_robustness import error_of, prime_argv, tune_argv

import evaluate_ner
import finetune_peft
import meta_pretrain
from experiments import compare

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tuned_run(tiny_model_dir, data_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("tuned_run") / "ft"
    finetune_peft.main(tune_argv(tiny_model_dir, data_dir, out))
    return out


@pytest.fixture(scope="module")
def primed_run(tiny_model_dir, data_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("primed") / "p"
    meta_pretrain.main(prime_argv(tiny_model_dir, data_dir, out))
    return out


@pytest.fixture
def stages(monkeypatch):
    """compare.py's stages replaced by test_compare's fake, which writes what they would."""
    fake = FakeStages()
    monkeypatch.setattr(compare.subprocess, "run", fake)
    for name in ("plot_f1", "plot_paired", "plot_curves"):
        monkeypatch.setattr(f"experiments.compare_plots.{name}", lambda *a: None)
    monkeypatch.setattr(compare, "add_body_change", lambda *a: None)
    return fake

# ----------------------------------------------------------------------------- no run inside a run


@pytest.mark.parametrize("stage, inside", [("tune", "sub"), ("prime", "a/b")])
def test_a_run_inside_a_run_folder_is_refused(tiny_model_dir, data_dir, tuned_run, capsys, stage, inside):
    out = tuned_run / inside
    before = contents(tuned_run)
    main, argv = (finetune_peft.main, tune_argv) if stage == "tune" else (meta_pretrain.main, prime_argv)
    message = error_of(main, argv(tiny_model_dir, data_dir, out), capsys)
    assert f"--out {out} is inside the run folder {tuned_run} (a finetune_peft run)" in message
    assert "choose an --out outside it" in message and contents(tuned_run) == before


@pytest.mark.parametrize("flag, inside", [("--out", "sub/scores.json"), ("--predictions", "preds")])
def test_evaluation_writes_nothing_inside_a_run_folder_but_its_scores(tuned_run, data_dir, capsys, flag, inside):
    before = contents(tuned_run)
    argv = evaluate_argv(tuned_run, data_dir, flag, str(tuned_run / inside), "--overwrite")
    message = error_of(evaluate_ner.main, argv, capsys)
    assert f"{flag} {tuned_run / inside} is inside the run folder {tuned_run} (a finetune_peft run)" in message
    assert contents(tuned_run) == before
