"""Nothing of the user's touched, every score from what it names (issue 38): a stage never deletes
its own input, a language counts once, a mistaken data format or a body without its tokenizer is
named, scores land only where they belong and name the data and body that were scored. One fault
injected per test, on a tiny model."""
import json
import shutil

import pytest
from test_provenance import contents, evaluate_argv
from test_robustness import error_of, prime_argv, tune_argv

import evaluate_ner
import finetune_peft
import meta_pretrain
from plumbing import ner_data

# ----------------------------------------------------------------------------- deleting its own input

def test_priming_refuses_out_equal_to_its_model_even_with_overwrite(data_dir, primed, tmp_path, capsys):
    body = tmp_path / "p"
    shutil.copytree(primed, body)
    before = contents(body)
    message = error_of(meta_pretrain.main, prime_argv(body, data_dir, body, "--overwrite"), capsys)
    assert "is the body that --model names" in message and "choose another --out" in message
    assert contents(body) == before


def test_priming_refuses_out_equal_to_its_reference_even_with_overwrite(tiny_model_dir, data_dir, tuned, tmp_path,
                                                                        capsys):
    reference = tmp_path / "ft"
    shutil.copytree(tuned, reference)
    before = contents(reference)
    message = error_of(meta_pretrain.main, prime_argv(tiny_model_dir, data_dir, reference, "--reference-ft",
                                                      str(reference), "--overwrite"), capsys)
    assert "is the reference fine-tuning that --reference-ft names" in message
    assert contents(reference) == before


# ----------------------------------------------------------------------------- a language counts once

def test_a_language_given_twice_is_refused_by_evaluation(tuned, data_dir, tmp_path, capsys):
    out = tmp_path / "scores.json"
    message = error_of(evaluate_ner.main, evaluate_argv(tuned, data_dir, "--langs", "fr,fr,nl", "--out", str(out)),
                       capsys)
    assert "--langs fr,fr,nl: fr is given twice" in message and not out.exists()


def test_a_language_given_twice_is_refused_by_priming(tiny_model_dir, data_dir, tmp_path, capsys):
    message = error_of(meta_pretrain.main, prime_argv(tiny_model_dir, data_dir, tmp_path / "p", "--priming-langs",
                                                      "de,de,es"), capsys)
    assert "--priming-langs de,de,es: de is given twice" in message and not (tmp_path / "p").exists()


@pytest.mark.parametrize("flag, value, twice", [("--langs", "fr,fr", "fr"), ("--priming-langs", "de,de,es", "de")])
def test_a_language_given_twice_is_refused_by_compare(data_dir, flag, value, twice):
    from experiments import compare
    args = compare.build_parser().parse_args(["--data-dir", data_dir, flag, value])
    with pytest.raises(ValueError, match=f"{flag} {value}: {twice} is given twice"):
        compare.check_args(args)                                  # before anything runs


# ----------------------------------------------------------------------------- the data and the body named

def test_panx_files_read_as_conll_are_named(tuned, data_dir, tmp_path, capsys):
    out = tmp_path / "scores.json"
    message = error_of(evaluate_ner.main, evaluate_argv(tuned, data_dir, "--data-format", "conll", "--out", str(out)),
                       capsys)
    assert f"{data_dir}/fr/test" in message and "--data-format panx" in message and not out.exists()


def body_without_tokenizer(source, folder):
    shutil.copytree(source, folder)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (folder / name).unlink()
    return folder


def test_a_body_without_its_tokenizer_is_refused_by_fine_tuning(tiny_model_dir, data_dir, tmp_path, capsys):
    body = body_without_tokenizer(tiny_model_dir, tmp_path / "body")
    message = error_of(finetune_peft.main, tune_argv(body, data_dir, tmp_path / "ft"), capsys)
    assert f"{body}" in message and "tokenizer.json" in message and not (tmp_path / "ft").exists()


def test_a_body_that_lost_its_tokenizer_is_refused_by_evaluation(tiny_model_dir, data_dir, tmp_path, capsys):
    body, ft = tmp_path / "body", tmp_path / "ft"
    shutil.copytree(tiny_model_dir, body)
    finetune_peft.main(tune_argv(body, data_dir, ft))
    shutil.rmtree(body)
    body_without_tokenizer(tiny_model_dir, body)
    message = error_of(evaluate_ner.main, evaluate_argv(ft, data_dir), capsys)
    assert f"{body}" in message and "tokenizer.json" in message and not (ft / "eval-test.json").exists()


# ----------------------------------------------------------------------------- scores where they belong

def test_evaluation_never_replaces_another_checkpoints_scores_without_overwrite(tiny_model_dir, data_dir, tuned,
                                                                                 tmp_path, capsys):
    other = tmp_path / "ft-other"
    finetune_peft.main(tune_argv(tiny_model_dir, data_dir, other, "--seed", "1"))
    evaluate_ner.main(evaluate_argv(tuned, data_dir))
    theirs = (tuned / "eval-test.json").read_bytes()
    message = error_of(evaluate_ner.main, evaluate_argv(other, data_dir, "--out", str(tuned / "eval-test.json")),
                       capsys)
    assert f"{tuned}" in message and "--overwrite" in message
    assert (tuned / "eval-test.json").read_bytes() == theirs
    message = error_of(evaluate_ner.main, evaluate_argv(other, data_dir, "--out", str(tuned / "eval-new.json")), capsys)
    assert "another run's folder" in message and not (tuned / "eval-new.json").exists()
    scores = tmp_path / "scores.json"                             # outside any run: another checkpoint's scores
    evaluate_ner.main(evaluate_argv(tuned, data_dir, "--out", str(scores)))
    message = error_of(evaluate_ner.main, evaluate_argv(other, data_dir, "--out", str(scores)), capsys)
    assert "holds the scores of another checkpoint" in message
    evaluate_ner.main(evaluate_argv(other, data_dir, "--out", str(scores), "--overwrite"))
    assert json.loads(scores.read_text())["ckpt"] == str(other.resolve())


def test_evaluation_records_the_hash_of_the_data_it_scored(tuned, data_dir, tmp_path, monkeypatch):
    from plumbing.ner_data import data_provenance
    copy = tmp_path / "data"
    shutil.copytree(data_dir, copy)
    scored = data_provenance(str(copy), [("fr", "test")])["sha256"]
    real = evaluate_ner.predict_words

    def replace_the_file(*args, **kwargs):                        # the test file replaced while it is scored
        (copy / "fr" / "test").write_text("fr:Paris\tB-LOC\n")
        return real(*args, **kwargs)
    monkeypatch.setattr(evaluate_ner, "predict_words", replace_the_file)
    out = tmp_path / "scores.json"
    evaluate_ner.main(evaluate_argv(tuned, str(copy), "--out", str(out)))
    assert json.loads(out.read_text())["data"]["sha256"] == scored


def test_data_that_changes_while_it_is_read_is_not_scored(tuned, data_dir, tmp_path, capsys, monkeypatch):
    copy = tmp_path / "data"
    shutil.copytree(data_dir, copy)
    real = ner_data.load_wikiann

    def replace_after_reading(*args, **kwargs):                   # replaced between its hash and its scores
        data = real(*args, **kwargs)
        (copy / "fr" / "test").write_text("fr:Paris\tB-LOC\n")
        return data
    monkeypatch.setattr(ner_data, "load_wikiann", replace_after_reading)
    out = tmp_path / "scores.json"
    message = error_of(evaluate_ner.main, evaluate_argv(tuned, str(copy), "--out", str(out)), capsys)
    assert "changed while it was read" in message and f"{copy}" in message and not out.exists()


def test_chained_priming_counts_every_levels_languages_as_not_zero_shot(tiny_model_dir, data_dir, tmp_path):
    first, second, ft = tmp_path / "p1", tmp_path / "p2", tmp_path / "ft"
    meta_pretrain.main(prime_argv(tiny_model_dir, data_dir, first, "--priming-langs", "fr"))
    meta_pretrain.main(prime_argv(first, data_dir, second))                # primed again on de,es
    finetune_peft.main(tune_argv(second, data_dir, ft))
    with pytest.warns(UserWarning, match="fr was used in fine-tuning or priming"):
        evaluate_ner.main(evaluate_argv(ft, data_dir, "--langs", "fr,nl"))
    saved = json.loads((ft / "eval-test.json").read_text())
    assert saved["not_zero_shot"] == ["fr"] and saved["average_of"] == ["nl"]


@pytest.mark.parametrize("errno_name", ["EROFS", "EACCES"])
def test_a_checkpoint_on_a_read_only_mount_is_evaluated(tuned, data_dir, tmp_path, monkeypatch, errno_name):
    import errno
    import os

    from plumbing import runs

    def read_only(path):                                          # the lock file cannot be created there
        raise OSError(getattr(errno, errno_name), os.strerror(getattr(errno, errno_name)), str(path))
    monkeypatch.setattr(runs, "try_lock", read_only)
    out = tmp_path / "scores.json"
    evaluate_ner.main(evaluate_argv(tuned, data_dir, "--out", str(out)))
    assert json.loads(out.read_text())["ckpt"] == str(tuned.resolve())


# ----------------------------------------------------------------------------- the body's identity

def test_evaluation_refuses_a_body_whose_config_changed_after_fine_tuning(data_dir, primed, tmp_path, capsys):
    body, ft = tmp_path / "p", tmp_path / "ft"
    shutil.copytree(primed, body)
    finetune_peft.main(tune_argv(body, data_dir, ft))
    config = json.loads((body / "config.json").read_text())
    (body / "config.json").write_text(json.dumps({**config, "hidden_act": "relu"}))  # weights unchanged
    message = error_of(evaluate_ner.main, evaluate_argv(ft, data_dir), capsys)
    assert f"{body.resolve() / 'config.json'} changed since {ft} was fine-tuned" in message
    assert not (ft / "eval-test.json").exists()


def test_a_checkpoint_older_than_the_config_hash_is_still_evaluated(data_dir, tuned, tmp_path):
    old = tmp_path / "ft"
    shutil.copytree(tuned, old)
    saved = json.loads((old / "peft_config.json").read_text())
    saved["extra"].pop("body_config_sha256", None)              # as written before the config hash existed
    (old / "peft_config.json").write_text(json.dumps(saved))
    evaluate_ner.main(evaluate_argv(old, data_dir))
    assert (old / "eval-test.json").is_file()
