"""The foundation's data path: PAN-X parsing, label alignment, bucketed batching."""
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import plumbing.ner_data as ner_data
from plumbing.batches import (
    IGNORE,
    BatchStream,
    bucketed_batches,
    collate,
    encode_sentences,
    padding_efficiency,
    word_predictions,
)
from plumbing.ner_data import LABELS, from_hub_rows, load_wikiann, parse_languages, read_panx_file

ROOT = Path(__file__).resolve().parents[1]


def write_panx(root, lang="xx", split="train", text="xx:Ada\tB-PER\nxx:Lovelace\tI-PER\n\nxx:Paris\tB-LOC\n"):
    (root / lang).mkdir(parents=True, exist_ok=True)
    (root / lang / split).write_text(text, encoding="utf-8")
    return root


class WordPieceStub:
    """A tokenizer stand-in with known splits: 'long' -> 3 pieces, 'zwsp' -> no piece."""
    pieces = {"long": 3, "zwsp": 0}

    def __call__(self, sentences, is_split_into_words, truncation, max_length):
        ids, words = [], []
        for words_of in sentences:
            w_ids = [None] + [w for w, word in enumerate(words_of) for _ in range(self.pieces.get(word, 1))] + [None]
            w_ids = w_ids[:max_length - 1] + [None] if len(w_ids) > max_length else w_ids
            ids.append([5] * len(w_ids))
            words.append(w_ids)
        return _Enc(ids, words)


class _Enc(dict):
    def __init__(self, ids, words):
        super().__init__(input_ids=ids)
        self._words = words

    def word_ids(self, i):
        return self._words[i]


def test_parse_well_formed(tmp_path):
    write_panx(tmp_path)
    sentences = read_panx_file(tmp_path / "xx" / "train")
    assert sentences == [(["Ada", "Lovelace"], [1, 2]), (["Paris"], [5])]
    ds = load_wikiann("xx", "train", data_dir=tmp_path)
    assert ds.features["ner_tags"].feature.names == LABELS
    assert ds[1]["tokens"] == ["Paris"]
    assert len(load_wikiann("xx", "train", data_dir=tmp_path, max_sentences=1)) == 1


def test_token_with_colon_and_tab_kept(tmp_path):
    write_panx(tmp_path, text="xx:12:30\tO\nxx:a:b\tB-ORG\n")
    assert read_panx_file(tmp_path / "xx" / "train") == [(["12:30", "a:b"], [0, 3])]


@pytest.mark.parametrize("line,message", [("xx:Ada B-PER", "malformed line"), ("Ada\tB-PER", "malformed line"),
                                          ("xx:Ada\tB-MISC", "unknown tag")])
def test_malformed_line_names_file_and_line(tmp_path, line, message):
    write_panx(tmp_path, text=f"xx:ok\tO\n{line}\n")
    with pytest.raises(ValueError, match=rf"train:2: {message}"):
        read_panx_file(tmp_path / "xx" / "train")


def test_unknown_language_lists_the_found_ones(tmp_path):
    write_panx(tmp_path, "de")
    write_panx(tmp_path, "en")
    with pytest.raises(ValueError, match="unknown language 'zz'.*de, en"):
        load_wikiann("zz", "train", data_dir=tmp_path)


def test_missing_data_folder_says_what_to_pass(tmp_path):
    with pytest.raises(FileNotFoundError, match="--data-dir.*WIKIANN_DIR"):
        load_wikiann("en", "train", data_dir=tmp_path / "nope")
    with pytest.raises(ValueError, match="unknown split"):
        load_wikiann("en", "validation", data_dir=tmp_path)
    with pytest.raises(ValueError, match="de,es"):
        parse_languages("de,,es")


def test_the_tests_own_corpus_reads_in_every_language_and_tag(data_dir):
    for lang in ("en", "de", "es", "fr", "nl", "pt"):
        ds = load_wikiann(lang, "dev", data_dir=data_dir, max_sentences=50)
        assert len(ds) == 50 and all(len(t) == len(g) for t, g in zip(ds["tokens"], ds["ner_tags"]))
    assert {tag for tags in load_wikiann("en", "train", data_dir=data_dir)["ner_tags"] for tag in tags} == set(range(7))


def test_the_tests_own_corpus_is_what_its_generator_writes(tmp_path, data_dir):
    """The committed fixture is reproducible: regenerating it changes no byte."""
    script = (ROOT / "tests" / "data" / "make_wikiann_fixture.py").read_text()
    (tmp_path / "make.py").write_text(script)                      # writes beside itself: tmp_path/wikiann
    subprocess.run([sys.executable, str(tmp_path / "make.py")], check=True, capture_output=True)
    committed = sorted(p.relative_to(data_dir) for p in Path(data_dir).rglob("*") if p.is_file())
    made = tmp_path / "wikiann"
    assert committed == sorted(p.relative_to(made) for p in made.rglob("*") if p.is_file())
    assert all((Path(data_dir) / f).read_bytes() == (tmp_path / "wikiann" / f).read_bytes() for f in committed)


@pytest.mark.slow
def test_the_full_corpus_reads(full_data_dir):
    ds = load_wikiann("de", "dev", data_dir=full_data_dir)
    assert len(ds) == 10000 and all(len(t) == len(g) for t, g in zip(ds["tokens"], ds["ner_tags"]))


def test_label_alignment_multi_piece_and_empty_words():
    ds = {"tokens": [["Ada", "long", "zwsp", "x"]], "ner_tags": [[1, 5, 6, 0]]}
    (ex,) = encode_sentences(ds, WordPieceStub(), max_len=64)
    # <s> Ada long long long x </s>: the first piece of a word carries its label.
    assert ex["labels"] == [IGNORE, 1, 5, IGNORE, IGNORE, 0, IGNORE]
    assert ex["word_ids"] == [None, 0, 1, None, None, 3, None]
    # Back to words: the word with no piece (and any cut word) is predicted O.
    assert word_predictions([9, 1, 5, 9, 9, 0, 9], ex["word_ids"], ex["n_words"]) == [1, 5, 0, 0]


def test_truncation_keeps_special_and_predicts_o_for_cut_words():
    ds = {"tokens": [["a", "b", "c", "d", "e"]], "ner_tags": [[1, 2, 2, 2, 2]]}
    (ex,) = encode_sentences(ds, WordPieceStub(), max_len=4)
    assert len(ex["input_ids"]) == 4 and ex["labels"][-1] == IGNORE
    assert word_predictions([0, 1, 2, 0], ex["word_ids"], ex["n_words"]) == [1, 2, 0, 0, 0]


def test_real_tokenizer_alignment(default_tokenizer):
    ds = {"tokens": [["Barack", "Obama", "visited", "\u200b", "Xi’an"]], "ner_tags": [[1, 2, 0, 0, 5]]}
    (ex,) = encode_sentences(ds, default_tokenizer, max_len=32)
    firsts = [w for w in ex["word_ids"] if w is not None]
    assert firsts == [0, 1, 2, 4]  # the zero-width space gives no sub-word
    assert [label for label in ex["labels"] if label != IGNORE] == [1, 2, 0, 5]


@pytest.mark.parametrize("batch_size,max_tokens", [(7, None), (32, None), (None, 300)])
def test_bucketed_batches_cover_each_example_once(batch_size, max_tokens):
    lengths = torch.randint(3, 60, (1000,), generator=torch.Generator().manual_seed(1)).tolist()
    g = torch.Generator().manual_seed(0)
    batches = bucketed_batches(lengths, batch_size, max_tokens, g, pool_batches=10)
    assert sorted(i for b in batches for i in b) == list(range(1000))
    if max_tokens:
        assert all(len(b) * max(lengths[i] for i in b) <= max_tokens for b in batches)
    else:
        assert all(len(b) <= batch_size for b in batches)
    # Deterministic for a seed, different for another.
    assert bucketed_batches(lengths, batch_size, max_tokens, torch.Generator().manual_seed(0), 10) == batches
    assert bucketed_batches(lengths, batch_size, max_tokens, torch.Generator().manual_seed(1), 10) != batches


def test_bucketing_pads_less_than_random():
    lengths = torch.randint(3, 100, (3200,), generator=torch.Generator().manual_seed(2)).tolist()
    bucketed = bucketed_batches(lengths, 32, None, torch.Generator().manual_seed(0))
    unsorted = [list(range(i, i + 32)) for i in range(0, 3200, 32)]
    assert padding_efficiency(bucketed, lengths) > 0.9 > padding_efficiency(unsorted, lengths)


def test_collate_padding_accounting():
    examples = [{"input_ids": [0, 5, 2], "labels": [IGNORE, 3, IGNORE]},
                {"input_ids": [0, 2], "labels": [IGNORE, IGNORE]}]
    batch = collate(examples, pad_id=1)
    assert batch["input_ids"].tolist() == [[0, 5, 2], [0, 2, 1]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 1, 0]]
    assert batch["labels"].tolist() == [[IGNORE, 3, IGNORE], [IGNORE, IGNORE, IGNORE]]
    assert batch["attention_mask"].sum() == sum(len(e["input_ids"]) for e in examples)


def test_batch_stream_resumes_to_the_same_batches():
    examples = [{"input_ids": [n] * n, "labels": [n % 7] * n} for n in range(2, 40)]  # each sentence recognisable
    a = BatchStream(examples, batch_size=5, seed=3)
    seen = [a.next_batch()["input_ids"].tolist() for _ in range(11)]  # crosses an epoch (8 batches)
    b = BatchStream(examples, batch_size=5, seed=3)
    [b.next_batch() for _ in range(6)]
    c = BatchStream(examples, batch_size=5, seed=3)
    c.load_state(b.state())
    assert [c.next_batch()["input_ids"].tolist() for _ in range(5)] == seen[6:]


def test_hub_unreachable_is_a_clear_error(monkeypatch):
    """Fast whatever ran before (the hub is probed once, not retried by the datasets library)."""
    monkeypatch.delenv("WIKIANN_DIR", raising=False)
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ValueError, match="could not load .*wikiann.*connect to huggingface.co.*pass --data-dir "
                                         r"\(or set WIKIANN_DIR\)") as raised:
        load_wikiann("en", "dev", max_sentences=5)
    assert "\n" not in str(raised.value)


def test_hub_unreachable_from_a_stage_is_one_line_naming_both_ways_out(tmp_path, monkeypatch, capsys):
    """A newcomer with neither the hub nor a folder: exit 2, one line, both routes named."""
    import finetune_peft
    from plumbing.cli import run_cli
    monkeypatch.delenv("WIKIANN_DIR", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    with pytest.raises(SystemExit) as exited:
        run_cli(finetune_peft.main, ["--out", str(tmp_path / "ft"), "--steps", "1"])
    lines = capsys.readouterr().err.strip().splitlines()
    assert exited.value.code == 2 and len(lines) == 1
    assert lines[0].startswith("error: could not load unimelb-nlp/wikiann")
    assert "connect to huggingface.co" in lines[0] and "--data-dir" in lines[0] and "WIKIANN_DIR" in lines[0]


def hub_rows(names=tuple(LABELS)):
    """Rows as the hub's wikiann serves them: tokens, ner_tags (a ClassLabel with the hub's names), langs, spans."""
    from datasets import ClassLabel, Dataset, Features, Sequence, Value
    features = Features({"tokens": Sequence(Value("string")), "ner_tags": Sequence(ClassLabel(names=list(names))),
                         "langs": Sequence(Value("string")), "spans": Sequence(Value("string"))})
    tags = [["B-PER", "I-PER", "O", "B-LOC"], ["B-ORG", "I-ORG", "O"], []]
    return Dataset.from_dict({"tokens": [["Ada", "Lovelace", "in", "London"], ["Banco", "Santander", "."], []],
                              "ner_tags": [[names.index(t) for t in row] for row in tags],
                              "langs": [["en"] * 4, ["en"] * 3, []],
                              "spans": [["PER: Ada Lovelace", "LOC: London"], ["ORG: Banco Santander"], []]},
                             features=features)


def test_hub_rows_become_sentences_with_our_label_ids():
    ds = from_hub_rows(hub_rows())
    assert ds.column_names == ["tokens", "ner_tags"]
    assert ds.features["ner_tags"].feature.names == LABELS
    assert ds["tokens"][0] == ["Ada", "Lovelace", "in", "London"]
    assert [[LABELS[i] for i in row] for row in ds["ner_tags"]] == [["B-PER", "I-PER", "O", "B-LOC"],
                                                                    ["B-ORG", "I-ORG", "O"], []]


def test_hub_rows_in_another_label_order_are_mapped_by_name():
    shuffled = ["B-LOC", "O", "I-ORG", "B-PER", "I-LOC", "B-ORG", "I-PER"]
    ds = from_hub_rows(hub_rows(shuffled))
    assert [[LABELS[i] for i in row] for row in ds["ner_tags"]][:2] == [["B-PER", "I-PER", "O", "B-LOC"],
                                                                         ["B-ORG", "I-ORG", "O"]]


def test_hub_rows_with_other_labels_or_columns_are_a_clear_error():
    with pytest.raises(ValueError, match="not IOB2 over PER/ORG/LOC.*--data-dir"):
        from_hub_rows(hub_rows(["O", "B-PER", "I-PER", "B-ORG", "I-ORG", "B-LOC", "I-LOC", "B-MISC"]))
    with pytest.raises(ValueError, match="no ner_tags column.*--data-dir"):
        from_hub_rows(hub_rows().remove_columns("ner_tags"))


def test_the_hub_route_asks_for_the_right_split_and_converts_its_rows(monkeypatch):
    """load_wikiann without a folder: the hub's name, language and split ('dev' is the hub's
    'validation', max_sentences a slice), then the rows converted; offline up to the download."""
    import datasets
    asked = []
    monkeypatch.delenv("WIKIANN_DIR", raising=False)
    monkeypatch.setattr("plumbing.pretrained.hub_reachable", lambda *a, **k: True)
    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: asked.append((a, k)) or hub_rows())
    ds = load_wikiann("nl", "dev", max_sentences=3)
    assert asked == [((ner_data.HUB_DATASET, "nl"), {"split": "validation[:3]"})]
    assert ds["tokens"][1] == ["Banco", "Santander", "."] and ds.features["ner_tags"].feature.names == LABELS
    load_wikiann("nl", "test")
    assert asked[-1][1] == {"split": "test"}
