"""CoNLL column files (--data-format conll): tag schemes, -DOCSTART-, --tag-map, bad columns and
types as one-line errors; the same sentences in CoNLL and PAN-X layout train and score alike."""
import json
from pathlib import Path

import pytest
from conftest import prime_argv, tune_argv

import evaluate_ner
import finetune_peft
import meta_pretrain
from experiments import compare
from plumbing.cli import run_cli
from plumbing.conll import ConllFormat, read_conll_file
from plumbing.ner_data import LABELS, load_wikiann, read_panx_file

AUTO = ConllFormat()


def write_file(root, text, lang="xx", name="test.txt"):
    (root / lang).mkdir(parents=True, exist_ok=True)
    (root / lang / name).write_text(text, encoding="utf-8")
    return root / lang / name


def tags_of(path, fmt=AUTO):
    return [[LABELS[i] for i in ids] for _, ids in read_conll_file(path, fmt)]


def error_of(main, argv, capsys):
    """A stage's one-line error (exit status 2), as its command line prints it."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as stop:
        run_cli(main, argv)
    said = capsys.readouterr().err
    lines = [line for line in said.strip().splitlines() if "it/s]" not in line]
    assert stop.value.code == 2 and len(lines) == 1 and "Traceback" not in said, said
    return lines[0]


# ------------------------------------------------------------------ reading

def test_iob1_is_normalised_to_iob2(tmp_path):
    path = write_file(tmp_path, "Ada x I-PER\nLovelace x I-PER\nBabbage x B-PER\nmet x O\nin x O\n"
                                "London x I-LOC\nTown x I-LOC\nOxford x I-ORG\n")
    assert tags_of(path) == [["B-PER", "I-PER", "B-PER", "O", "O", "B-LOC", "I-LOC", "B-ORG"]]
    assert tags_of(path, ConllFormat(tag_scheme="iob1")) == tags_of(path)
    assert tags_of(path, ConllFormat(tag_scheme="iob2"))[0][0] == "I-PER"  # taken as it is


def test_bioes_and_bilou_are_normalised_to_iob2(tmp_path):
    path = write_file(tmp_path, "Ada S-PER\nvisited O\nNew B-LOC\nYork E-LOC\nBank B-ORG\nof I-ORG\nX E-ORG\n\n"
                                "Lyon U-LOC\nRio B-LOC\nGrande L-LOC\n")
    assert tags_of(path) == [["B-PER", "O", "B-LOC", "I-LOC", "B-ORG", "I-ORG", "I-ORG"], ["B-LOC", "B-LOC", "I-LOC"]]
    assert tags_of(path, ConllFormat(tag_scheme="bioes")) == tags_of(path)


def test_bioes_tags_under_an_iob_scheme_name_the_flag(tmp_path):
    path = write_file(tmp_path, "Ada B-PER\n\nParis S-LOC\n")
    with pytest.raises(ValueError, match=r"test.txt:3: tag S-LOC is BIOES, but --tag-scheme iob1: pass --tag-scheme"):
        read_conll_file(path, ConllFormat(tag_scheme="iob1"))


def test_docstart_lines_and_blank_lines(tmp_path):
    path = write_file(tmp_path, "-DOCSTART- -X- -X- O\n\nAda NNP B-PER\nsang VBD O\n\n\n-DOCSTART- -X- -X- O\n"
                                "Paris NNP B-LOC\n-DOCSTART- -X- -X- O\nRome NNP B-LOC\n")
    sentences = read_conll_file(path, AUTO)
    assert [tokens for tokens, _ in sentences] == [["Ada", "sang"], ["Paris"], ["Rome"]]
    assert len(read_conll_file(path, AUTO, max_sentences=2)) == 2


def test_columns_are_chosen_by_flag(tmp_path):
    path = write_file(tmp_path, "1 Ada B-PER NNP\n2 sang O VBD\n")
    assert read_conll_file(path, ConllFormat(token_column=1, tag_column=2)) == [(["Ada", "sang"], [1, 0])]
    assert read_conll_file(path, ConllFormat(token_column=-3, tag_column=-2)) == [(["Ada", "sang"], [1, 0])]


def test_misc_needs_a_tag_map(tmp_path):
    path = write_file(tmp_path, "EU I-MISC\nand O\nUN I-ORG\nGermany I-GPE\n")
    with pytest.raises(ValueError, match=r"test.txt:1: entity type MISC is not one the model predicts "
                                         r"\(LOC, ORG, PER\): map it with --tag-map MISC=O"):
        read_conll_file(path, AUTO)
    with pytest.raises(ValueError, match=r"test.txt:4: entity type GPE .* --tag-map GPE=O"):
        read_conll_file(path, ConllFormat(tag_map=(("MISC", "O"),)))
    mapped = ConllFormat(tag_map=(("GPE", "LOC"), ("MISC", "O")))
    assert tags_of(path, mapped) == [["O", "O", "B-ORG", "B-LOC"]]


def test_a_type_renamed_next_to_its_target_stays_two_entities(tmp_path):
    path = write_file(tmp_path, "Paris B-LOC\nFrance B-GPE\nwest I-GPE\n")
    assert tags_of(path, ConllFormat(tag_map=(("GPE", "LOC"),))) == [["B-LOC", "B-LOC", "I-LOC"]]


@pytest.mark.parametrize("text, fmt, message", [
    ("Ada NNP B-PER\nsang VBD O\n", ConllFormat(token_column=3),
     r"test.txt:1: 3 column\(s\), no column 3: check --token-column"),
    ("Ada NNP B-PER\nsang VBD O\n", ConllFormat(tag_column=4),
     r"test.txt:1: 3 column\(s\), no column 4: check --tag-column"),
    ("Ada NNP B-PER\nsang VBD O\n", ConllFormat(tag_column=1),
     r"test.txt:1: 'NNP' in column 1 is not a NER tag.*--tag-column"),
    ("Ada B-\n", AUTO, r"test.txt:1: 'B-' in column -1 is not a NER tag"),
])
def test_bad_columns_name_the_file_line_and_flag(tmp_path, text, fmt, message):
    with pytest.raises(ValueError, match=message):
        read_conll_file(write_file(tmp_path, text), fmt)


def test_a_one_column_line_is_an_error_not_a_tag(tmp_path):
    path = write_file(tmp_path, "Ada NNP B-PER\nsang\n")
    with pytest.raises(ValueError, match=r"test.txt:2: 'sang' in column -1 is not a NER tag"):
        read_conll_file(path, AUTO)   # one column: token and tag would be the same word


def test_latin1_files_are_an_error_with_the_fix(tmp_path):
    (tmp_path / "es").mkdir()
    (tmp_path / "es" / "test").write_bytes("Ada B-PER\nAragón B-LOC\n".encode("latin-1"))
    with pytest.raises(ValueError, match=r"test:2: not UTF-8 text: convert the file, e.g. iconv -f latin1"):
        load_wikiann("es", "test", tmp_path, fmt=AUTO)


def test_file_names_of_a_conll_folder(tmp_path):
    write_file(tmp_path, "Ada B-PER\n", lang="es", name="test.conll")
    write_file(tmp_path, "Rome B-LOC\n", lang="es", name="dev")
    assert load_wikiann("es", "test", tmp_path, fmt=AUTO)["tokens"] == [["Ada"]]
    assert load_wikiann("es", "dev", tmp_path, fmt=AUTO)["tokens"] == [["Rome"]]
    with pytest.raises(FileNotFoundError, match=r"es/train is missing: a CoNLL folder holds <lang>/<split> files"):
        load_wikiann("es", "train", tmp_path, fmt=AUTO)
    with pytest.raises(ValueError, match="needs --data-dir"):
        load_wikiann("es", "test", None, fmt=AUTO)


def test_a_conll_file_read_as_panx_suggests_the_flag(tmp_path):
    write_file(tmp_path, "Ada NNP B-PER\n", name="test")
    with pytest.raises(ValueError, match="pass --data-format conll"):
        load_wikiann("xx", "test", tmp_path)


# ------------------------------------------------------------------ the stages' flags

def test_unknown_type_is_one_line_from_evaluate_ner(tmp_path, capsys):
    write_file(tmp_path / "conll", "EU NNP I-MISC\nsaid VBD O\n", lang="nl")
    (tmp_path / "ckpt").mkdir()   # the data is read before the checkpoint: bad data fails first
    argv = ["--ckpt", str(tmp_path / "ckpt"), "--langs", "nl", "--data-format", "conll", "--data-dir",
            str(tmp_path / "conll")]
    message = error_of(evaluate_ner.main, argv, capsys)
    assert "nl/test.txt:1: entity type MISC is not one the model predicts" in message and "--tag-map MISC=O" in message
    assert "--tag-map applies to --data-format conll" in error_of(evaluate_ner.main, argv[:4] + ["--tag-map", "MISC=O"],
                                                                  capsys)
    assert "bad --tag-map item 'MISC'" in error_of(evaluate_ner.main, argv + ["--tag-map", "MISC"], capsys)
    assert "MISC=FOO: FOO is not a type" in error_of(evaluate_ner.main, argv + ["--tag-map", "MISC=FOO"], capsys)
    assert "needs --data-dir" in error_of(evaluate_ner.main, argv[:6], capsys)
    assert list((tmp_path / "ckpt").iterdir()) == []   # nothing written


def test_compare_passes_the_evaluation_data_and_keeps_existing_identities(tmp_path):
    base = ["--data-dir", "/work/shared/data/wikiann"]
    args = compare.build_parser().parse_args(base)
    compare.check_args(args)
    records = compare.ROOT / "experiments" / "results" / "verdict-cpu" / "records"
    verdict = records / "ft-adapter-no_priming-f0-2de6f7c344"
    flags, result = compare.evaluate_plan(args, verdict, ["fr", "nl", "pt"], "test")
    assert result.name == "eval-test-5ea17522d1.json"   # the committed verdict's evaluations are still found
    (tmp_path / "conll").mkdir()
    conll = compare.build_parser().parse_args(base + ["--eval-data-dir", str(tmp_path / "conll"),
                                                      "--eval-data-format", "conll", "--eval-tag-map", "MISC=O"])
    compare.check_args(conll)
    conll_flags, conll_result = compare.evaluate_plan(conll, tmp_path, ["nl"], "test")
    parsed = evaluate_ner.build_parser().parse_args([*conll_flags, "--ckpt", "x"])
    assert (parsed.data_dir, parsed.data_format, parsed.tag_map) == (str(tmp_path / "conll"), "conll", "MISC=O")
    assert conll_result.name != compare.evaluate_plan(args, tmp_path, ["nl"], "test")[1].name
    for plan in (compare.prime_plan, ):   # priming and fine-tuning still read --data-dir, unchanged
        assert plan(conll, tmp_path, "adapter", "MAML priming", 0) == plan(args, tmp_path, "adapter", "MAML priming", 0)
    assert compare.finetune_plan(conll, tmp_path, "e5-small", "adapter", 0, "t") == \
        compare.finetune_plan(args, tmp_path, "e5-small", "adapter", 0, "t")
    bad = compare.build_parser().parse_args(base + ["--eval-data-format", "conll"])
    with pytest.raises(ValueError, match="--eval-data-format conll needs --eval-data-dir"):
        compare.check_args(bad)


# ------------------------------------------------------------------ the same sentences, two layouts

def to_bioes(tags):
    """IOB2 -> BIOES (written independently of the reader)."""
    out = []
    for i, tag in enumerate(tags):
        continues = i + 1 < len(tags) and tags[i + 1] == "I-" + tag[2:]
        if tag.startswith("B-"):
            out.append(("B-" if continues else "S-") + tag[2:])
        elif tag.startswith("I-"):
            out.append(("I-" if continues else "E-") + tag[2:])
        else:
            out.append(tag)
    return out


def to_iob1(tags):
    """IOB2 -> IOB1: B- only where an entity follows one of the same type."""
    return [("B-" if t.startswith("B-") and i and tags[i - 1][2:] == t[2:] else "I-") + t[2:] if t != "O" else t
            for i, t in enumerate(tags)]


def with_misc(tags, scheme, k):
    """Every third sentence: its first O word becomes a one-word MISC entity (for --tag-map MISC=O)."""
    if k % 3 or "O" not in tags:
        return tags
    i = tags.index("O")
    return tags[:i] + [{"bioes": "S-MISC", "iob1": "I-MISC"}[scheme]] + tags[i + 1:]


def write_both(data_dir, root, lang, split, n, scheme):
    """The first n sentences of a shared WikiANN file, in PAN-X layout and as a CoNLL file
    (-DOCSTART-, a POS-like middle column, `scheme` tags, MISC entities)."""
    sentences = read_panx_file(Path(data_dir) / lang / split, n)
    panx, conll = [], ["-DOCSTART- -X- O", ""]
    for k, (tokens, ids) in enumerate(sentences):
        tags = [LABELS[i] for i in ids]
        panx += [f"{lang}:{t}\t{tag}" for t, tag in zip(tokens, tags)] + [""]
        converted = with_misc(to_bioes(tags) if scheme == "bioes" else to_iob1(tags), scheme, k)
        conll += [f"{t} X {tag}" for t, tag in zip(tokens, converted)] + [""]
    write_file(root / "panx", "\n".join(panx), lang, split)
    write_file(root / "conll", "\n".join(conll), lang, f"{split}.txt")
    return sum(tag != 0 for _, ids in sentences for tag in ids)


@pytest.fixture(scope="module")
def tuned(tmp_path_factory, tiny_model_dir, data_dir):
    """A tiny fine-tuned checkpoint (seconds)."""
    out = tmp_path_factory.mktemp("ft") / "tuned"
    finetune_peft.main(tune_argv(tiny_model_dir, data_dir, out, "--steps", "10", "--lr", "5e-3"))
    return out


@pytest.mark.parametrize("scheme", ["bioes", "iob1"])
def test_evaluating_a_conll_folder_equals_the_panx_layout(tuned, data_dir, tmp_path, scheme):
    entity_words = sum(write_both(data_dir, tmp_path, lang, "test", 25, scheme) for lang in ("fr", "nl"))
    assert entity_words > 20
    scores = {}
    for layout, extra in [("panx", []), ("conll", ["--data-format", "conll", "--tag-map", "MISC=O"])]:
        out = tmp_path / f"eval-{layout}.json"
        evaluate_ner.main(["--ckpt", str(tuned), "--langs", "fr,nl", "--data-dir", str(tmp_path / layout),
                           "--out", str(out), "--predictions", str(tmp_path / f"pred-{layout}"), *extra])
        scores[layout] = json.loads(out.read_text())
    assert scores["conll"]["results"] == scores["panx"]["results"]
    assert scores["conll"]["data"]["tag_map"] == [["MISC", "O"]] and "tag_map" not in scores["panx"]["data"]
    for lang in ("fr", "nl"):   # the same gold tags (after normalisation) and the same predictions, word by word
        assert (tmp_path / "pred-conll" / f"{lang}.conll").read_text() == \
            (tmp_path / "pred-panx" / f"{lang}.conll").read_text()
    assert scores["panx"]["results"]["fr"]["sentences"] == 25


def test_priming_and_fine_tuning_read_a_conll_folder_like_panx(tiny_model_dir, data_dir, tmp_path):
    for lang in ("en", "de", "es"):
        for split in ("train", "dev"):
            write_both(data_dir, tmp_path, lang, split, 40, "bioes")
    conll = ["--data-format", "conll", "--tag-map", "MISC=O"]
    runs = {}
    for layout, extra in [("panx", []), ("conll", conll)]:
        primed = tmp_path / f"primed-{layout}"
        meta_pretrain.main(prime_argv(tiny_model_dir, str(tmp_path / layout), primed, *extra))
        finetune_peft.main(tune_argv(primed, str(tmp_path / layout), tmp_path / f"ft-{layout}", *extra))
        runs[layout] = [{k: v for k, v in json.loads(line).items() if k != "seconds"}
                        for run in (primed, tmp_path / f"ft-{layout}")
                        for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert runs["conll"] == runs["panx"]   # the same batches: the same losses and dev F1, step by step
    assert any("held_out_query_loss" in line for line in runs["panx"])
    assert any("dev_f1_default" in line for line in runs["panx"])
