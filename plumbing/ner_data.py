"""WikiANN NER data for all three stages: where it comes from, its formats, its provenance.
plumbing/batches.py turns its sentences into model inputs (sub-word labels, batches).

    WIKIANN_DIR=../shared/data/wikiann python -m plumbing.ner_data --lang en --split train   # summary of a split
    python -m plumbing.ner_data --data-format conll --data-dir conll2002 --lang es --split test --tag-map MISC=O

    from plumbing.ner_data import load_wikiann
    from plumbing.batches import encode_sentences, BatchStream
    train = load_wikiann("en", "train", data_dir="../shared/data/wikiann", max_sentences=2000)
    examples = encode_sentences(train, tokenizer, max_len=128)
    stream = BatchStream(examples, batch_size=16, seed=0, pad_id=tokenizer.pad_token_id)
    batch = stream.next_batch()     # dict of padded tensors: input_ids, attention_mask, labels

Where the data comes from (`load_wikiann`): a PAN-X folder `<dir>/<lang>/{train,dev,test}`
(XTREME's layout: one `lang:token<TAB>tag` per line, a blank line between sentences) given by
`--data-dir` or `$WIKIANN_DIR`; else the hub's `wikiann` dataset. Either way the result is a
`datasets.Dataset` with `tokens` and `ner_tags` (a ClassLabel in the hub's label order).

With `--data-format conll` (conll.py), `--data-dir` is a folder of CoNLL column files,
`<dir>/<lang>/<split>` (or `<split>.txt`, `<split>.conll`), e.g. CoNLL-2002's esp.testb saved
as `<dir>/es/test.txt`: whitespace-separated columns, the token in --token-column (default the
first), the NER tag in --tag-column (default the last), a blank line between sentences,
`-DOCSTART-` lines skipped. Tags are normalised to IOB2 (--tag-scheme auto: BIOES/BILOU when a
file has E-/S-/L-/U- tags, else IOB1, which leaves IOB2 unchanged), then renamed by --tag-map
(`MISC=O,GPE=LOC`); every remaining type must be one the model predicts (PER, ORG, LOC).
"""

import argparse
import hashlib
import os
import re
import warnings
from dataclasses import asdict
from pathlib import Path

from plumbing import conll
from plumbing.conll import LABELS  # the label set, defined beside the reader that maps tags onto it

SPLITS = ("train", "dev", "test")
HUB_DATASET = "unimelb-nlp/wikiann"  # the hub's wikiann; its "validation" is PAN-X's "dev"
HUB_WAYS_OUT = ("connect to huggingface.co for the hub route, or pass --data-dir (or set WIKIANN_DIR) "
                "to a local PAN-X folder (README: The data)")
DATA_FORMATS = ("panx", "conll")
CONLL_NAMES = ("{split}", "{split}.txt", "{split}.conll")  # file names of a split in <dir>/<lang>/


# ----------------------------------------------------------------------------------------
# Reading

def resolve_data_dir(data_dir=None):
    """--data-dir, else $WIKIANN_DIR, else None (meaning: the hub)."""
    data_dir = data_dir or os.environ.get("WIKIANN_DIR")
    if not data_dir:
        return None
    if not Path(data_dir).is_dir():
        raise FileNotFoundError(f"data folder {data_dir} does not exist: pass --data-dir with a PAN-X "
                                f"folder (<dir>/<lang>/train|dev|test) or set WIKIANN_DIR")
    return Path(data_dir)


def data_provenance(data_dir, files, fmt=None):
    """What a run read, for its record: the resolved data folder (absolute; None for the hub) and
    one sha256 over the bytes of every (lang, split) file it read, whole files (a few MB: ~10 ms
    each), so two runs that name one folder but read other bytes are told apart. fmt: the data
    format (data_format_from_flags; None: PAN-X), which names the files."""
    folder = Path(data_dir) if fmt is not None else resolve_data_dir(data_dir)
    if folder is None:
        names = sorted({f"{lang}/{split}" for lang, split in files})
        return {"dir": None, "hub": HUB_DATASET, "files": names, "sha256": None}
    names = sorted({split_file(folder, lang, split, fmt).relative_to(folder).as_posix() for lang, split in files})
    return {"dir": str(folder.resolve()), "files": names, "sha256": files_sha256(folder, names)}


def files_sha256(folder, names):
    """One sha256 over the named files of a data folder (name and bytes of each, in order): the
    "sha256" of data_provenance, which compare.py recomputes to check that a reused run read this folder."""
    from plumbing.files import file_sha256
    digest = hashlib.sha256()
    for name in names:
        digest.update(f"{name}\0{file_sha256(Path(folder) / name)}\0".encode())
    return digest.hexdigest()


def available_languages(data_dir):
    """Languages of a data folder: its sub-folders that hold a train, dev or test file."""
    return sorted(p.name for p in Path(data_dir).iterdir()
                  if p.is_dir() and any((p / n.format(split=s)).is_file() for s in SPLITS for n in CONLL_NAMES))


LANGUAGE_CODE = re.compile(r"^[a-z]{2,3}(-[a-z0-9]+)*$")  # en, fr, nds-nl, be-x-old: never a path ("fr/../en")


def check_language(code, flag="--langs"):
    """A language code is a code (it becomes a path under the data folder), else a clear error."""
    if not LANGUAGE_CODE.match(code):
        raise ValueError(f"{flag}: {code!r} is not a language code (2-3 lower-case letters, optionally -suffix, "
                         f"e.g. fr or nds-nl)")
    return code


def parse_languages(text, flag="--langs"):
    """'de,es' -> ['de', 'es'] (a flag value; empty items, non-codes and a code given twice are clear
    errors: a repeated language would be scored, averaged or sampled twice)."""
    langs = [lang.strip() for lang in text.split(",")]
    if not all(langs):
        raise ValueError(f"bad language list {text!r}: give codes separated by commas, e.g. de,es")
    for i, lang in enumerate(langs):
        check_language(lang, flag)
        if lang in langs[:i]:
            raise ValueError(f"{flag} {text}: {lang} is given twice: list each once")
    return langs


def first_undecodable_line(path):
    """The number of the first line of a file that is not UTF-8 (for the error that names it)."""
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            try:
                raw.decode("utf-8")
            except UnicodeDecodeError:
                return lineno
    return 1


def read_panx_file(path, max_sentences=None, expected_lang=None):
    """Sentences of one PAN-X file as (tokens, tags) lists; a malformed or non-UTF-8 line names
    file:line; tokens marked with another language than `expected_lang` are counted in a warning."""
    try:
        return _read_panx_lines(path, max_sentences, expected_lang)
    except UnicodeDecodeError:
        raise ValueError(f"{path}:{first_undecodable_line(path)}: not UTF-8 text: re-encode the file as UTF-8 "
                         f"(PAN-X files are UTF-8)") from None


def _read_panx_lines(path, max_sentences, expected_lang):
    """read_panx_file's parser (text mode, as before: the same lines and sentences)."""
    sentences, tokens, tags, foreign = [], [], [], {}
    with open(path, encoding="utf-8-sig") as f:  # -sig: a byte-order mark at the start is dropped
        for lineno, line in enumerate(f, 1):
            line = line.rstrip("\n").rstrip("\r")
            if not line.strip():
                if tokens:
                    sentences.append((tokens, tags))
                    tokens, tags = [], []
                    if max_sentences is not None and len(sentences) >= max_sentences:
                        break
                continue
            word, sep, tag = line.rpartition("\t")
            lang, colon, token = word.partition(":")
            if not sep or not colon or not token or not lang:
                raise ValueError(f"{path}:{lineno}: malformed line {line[:60]!r}: "
                                 f"expected 'lang:token<TAB>tag' (a CoNLL column file? pass --data-format conll)")
            if tag not in LABELS:
                raise ValueError(f"{path}:{lineno}: unknown tag {tag!r}: expected one of {', '.join(LABELS)}")
            if expected_lang is not None and lang != expected_lang:
                foreign.setdefault(lang, lineno)
            tokens.append(token)
            tags.append(LABELS.index(tag))
    if tokens:
        sentences.append((tokens, tags))
    if foreign:
        marked = ", ".join(f"{lang}: (first at line {n})" for lang, n in foreign.items())
        warnings.warn(f"{path}: tokens marked {marked} "
                      f"in a {expected_lang} file: they are read as {expected_lang}", stacklevel=3)
    return sentences


def _as_dataset(sentences):
    from datasets import ClassLabel, Dataset, Features, Sequence, Value
    features = Features({"tokens": Sequence(Value("string")), "ner_tags": Sequence(ClassLabel(names=LABELS))})
    return Dataset.from_dict({"tokens": [s[0] for s in sentences], "ner_tags": [s[1] for s in sentences]},
                             features=features)


def load_wikiann(lang, split, data_dir=None, max_sentences=None, fmt=None):
    """One split of one language as a datasets.Dataset (tokens, ner_tags); the first
    max_sentences sentences only, when given (for small budgets). fmt: None for PAN-X (or the
    hub), a ConllFormat for a folder of CoNLL column files (`data_format_from_flags`)."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}: use one of {', '.join(SPLITS)}")
    if max_sentences is not None and max_sentences < 1:
        raise ValueError(f"--max-sentences {max_sentences}: give a positive number")
    check_language(lang, "language")
    if fmt is not None and not data_dir:
        raise ValueError("--data-format conll needs --data-dir: the folder of <lang>/<split> CoNLL files")
    folder = resolve_data_dir(data_dir)
    if folder is None:
        return _load_from_hub(lang, split, max_sentences)
    path = split_file(folder, lang, split, fmt)
    sentences = (read_panx_file(path, max_sentences, expected_lang=lang) if fmt is None
                 else conll.read_conll_file(path, fmt, max_sentences))
    if not sentences:
        layout = "PAN-X layout, one 'lang:token<TAB>tag' per line" if fmt is None else "CoNLL columns"
        raise ValueError(f"{path} holds no sentences: restore the file ({layout}) or point --data-dir at a "
                         f"complete copy")
    return _as_dataset(sentences)


def split_file(folder, lang, split, fmt=None):
    """The file of one split: <dir>/<lang>/<split> (CoNLL also <split>.txt or <split>.conll)."""
    names = [n.format(split=split) for n in (CONLL_NAMES if fmt is not None else CONLL_NAMES[:1])]
    for name in names:
        if (folder / lang / name).is_file():
            return folder / lang / name
    if not (folder / lang).is_dir():
        raise ValueError(f"unknown language {lang!r}: {folder} has {', '.join(available_languages(folder))}")
    layout = "a PAN-X folder holds <lang>/train, dev and test" if fmt is None else \
        f"a CoNLL folder holds <lang>/<split> files named {', '.join(n.format(split='<split>') for n in CONLL_NAMES)}"
    raise FileNotFoundError(f"{folder / lang / names[0]} is missing: {layout}")


def _load_from_hub(lang, split, max_sentences):
    from datasets import load_dataset

    from plumbing.pretrained import hub_reachable
    if not hub_reachable():  # fail at once, not after the datasets library's retries
        raise ValueError(f"could not load {HUB_DATASET} ({lang}, {split}): the hub is unreachable from here; "
                         f"{HUB_WAYS_OUT}")
    hub_split = {"dev": "validation"}.get(split, split)
    if max_sentences is not None:
        hub_split += f"[:{max_sentences}]"
    try:
        ds = load_dataset(HUB_DATASET, lang, split=hub_split)
    except Exception as e:  # offline, unknown config, ...: one clear line, not a hub traceback
        raise ValueError(f"could not load {HUB_DATASET} ({lang}, {split}) from the hub ({type(e).__name__}); "
                         f"{HUB_WAYS_OUT}") from None
    return from_hub_rows(ds)


def from_hub_rows(ds):
    """The hub's wikiann rows (`tokens`, `ner_tags` as a ClassLabel, `langs`, `spans`) as this
    project's sentences: `tokens` and `ner_tags` with ids in LABELS' order. The ids are mapped by
    the ClassLabel's names, so a hub release that ordered its labels otherwise is still read right."""
    missing = [c for c in ("tokens", "ner_tags") if c not in ds.column_names]
    if missing:
        raise ValueError(f"{HUB_DATASET}: the rows have no {', '.join(missing)} column (columns: "
                         f"{', '.join(ds.column_names)}); pass --data-dir with a PAN-X folder instead")
    names = getattr(ds.features["ner_tags"].feature, "names", None)
    if names is None or not set(names) <= set(LABELS):
        raise ValueError(f"{HUB_DATASET}: ner_tags name {names}, not IOB2 over PER/ORG/LOC ({', '.join(LABELS)}); "
                         f"pass --data-dir with a PAN-X folder instead")
    to_ours = [LABELS.index(name) for name in names]
    return _as_dataset([(tokens, [to_ours[t] for t in tags]) for tokens, tags in zip(ds["tokens"], ds["ner_tags"])])


# ----------------------------------------------------------------------------------------
# The data flags (the CoNLL reader itself: conll.py)

def add_data_flags(parser):
    """--data-dir and the flags of the data format, the same on every stage."""
    parser.add_argument("--data-dir", default=None,
                        help="data folder <dir>/<lang>/<split> (default: $WIKIANN_DIR, else the hub's wikiann; "
                             "--data-format conll needs it)%(default).0s")
    parser.add_argument("--data-format", choices=DATA_FORMATS, default="panx",
                        help="panx: 'lang:token<TAB>tag' lines (WikiANN/XTREME); conll: whitespace-separated "
                             "columns, <lang>/<split>[.txt|.conll] files (CoNLL-2002/2003 style)")
    parser.add_argument("--token-column", type=int, default=0, help="conll: column of the tokens (0: the first)")
    parser.add_argument("--tag-column", type=int, default=-1, help="conll: column of the NER tags (-1: the last)")
    parser.add_argument("--tag-scheme", choices=conll.TAG_SCHEMES, default="auto",
                        help="conll: the files' tag scheme, normalised to IOB2 (auto: bioes when a file has "
                             "E-/S- tags, else iob1, which leaves IOB2 tags unchanged)")
    parser.add_argument("--tag-map", default=None,
                        help="conll: rename entity types the model does not predict, comma-separated TYPE=TYPE "
                             "or TYPE=O, e.g. MISC=O,GPE=LOC")
    return parser


def data_format_from_flags(args):
    """None for --data-format panx, else the ConllFormat of the flags (bad flags: one line each)."""
    if args.data_format == "panx":
        if args.tag_map:
            raise ValueError("--tag-map applies to --data-format conll only (PAN-X has PER, ORG and LOC only)")
        return None
    if not args.data_dir:
        raise ValueError("--data-format conll needs --data-dir: the folder of <lang>/<split> CoNLL files")
    return conll.ConllFormat(args.token_column, args.tag_column, args.tag_scheme, conll.parse_tag_map(args.tag_map))


def data_description(fmt):
    """The data format as a JSON-ready dict (for records and scores)."""
    return {"format": "panx"} if fmt is None else {"format": "conll", **asdict(fmt)}


def main(argv=None):
    parser = argparse.ArgumentParser(description="Print a summary of one WikiANN split.")
    parser.add_argument("--lang", default="en", help="language code, e.g. en, de")
    parser.add_argument("--split", default="train", choices=SPLITS, help="which split")
    add_data_flags(parser)
    args = parser.parse_args(argv)
    ds = load_wikiann(args.lang, args.split, args.data_dir, fmt=data_format_from_flags(args))
    n_tokens = sum(len(t) for t in ds["tokens"])
    print(f"{args.lang}/{args.split}: {len(ds)} sentences, {n_tokens} words; first: {' '.join(ds[0]['tokens'])}")


if __name__ == "__main__":
    from plumbing.cli import run_cli
    run_cli(main)  # bad input: one line, exit status 2, as the stages
