"""CoNLL column files (`--data-format conll`): CoNLL-2002/2003-style NER data read into the same
sentences as the PAN-X reader gives (ner_data.load_wikiann), tags normalised to IOB2 and renamed
to the types the models predict.

    fmt = ConllFormat(token_column=0, tag_column=-1, tag_scheme="auto", tag_map={"MISC": "O"})
    sentences = read_conll_file("conll2002/es/test.txt", fmt)   # [(tokens, label ids)]

Whitespace-separated columns, the token in --token-column, the NER tag in --tag-column, a blank
line between sentences, `-DOCSTART-` lines skipped. --tag-scheme auto: BIOES/BILOU when a file has
E-/S-/L-/U- tags, else IOB1, which leaves IOB2 tags unchanged.
"""

import re
from dataclasses import dataclass

LABELS = ["O", "B-PER", "I-PER", "B-ORG", "I-ORG", "B-LOC", "I-LOC"]  # the hub's wikiann order (ner_data.LABELS)
TYPES = sorted({label[2:] for label in LABELS if label != "O"})  # entity types the models predict
TAG_SCHEMES = ("auto", "iob2", "iob1", "bioes")
DOCSTART = "-DOCSTART-"  # CoNLL-2003's document separator line
TO_IOB2 = {"B": "B", "I": "I", "E": "I", "S": "B", "L": "I", "U": "B"}  # BIOES and BILOU prefixes -> IOB2


@dataclass(frozen=True)
class ConllFormat:
    """How to read CoNLL column files: the token and tag columns, the tag scheme, and the
    renamed entity types ((type, new type or "O"), ...)."""
    token_column: int = 0
    tag_column: int = -1
    tag_scheme: str = "auto"
    tag_map: tuple = ()


def parse_tag_map(text):
    """'MISC=O,GPE=LOC' -> (("GPE", "LOC"), ("MISC", "O")); a target must be O or a known type."""
    pairs = {}
    for item in text.split(",") if text else []:
        old, eq, new = (part.strip() for part in item.partition("="))
        if not eq or not old or not new:
            raise ValueError(f"bad --tag-map item {item!r}: give TYPE=TYPE or TYPE=O, comma-separated, e.g. MISC=O")
        if new != "O" and new not in TYPES:
            raise ValueError(f"--tag-map {old}={new}: {new} is not a type the model predicts "
                             f"({', '.join(TYPES)}) nor O")
        if old in pairs:  # else the last one would win silently
            raise ValueError(f"--tag-map {text}: {old} is mapped twice ({old}={pairs[old]} and {old}={new}): "
                             f"give each type once")
        pairs[old] = new
    return tuple(sorted(pairs.items()))


def read_conll_file(path, fmt, max_sentences=None):
    """Sentences of one CoNLL column file as (tokens, tag ids), tags in IOB2 over ner_data.LABELS."""
    sentences = read_conll_columns(path, fmt, max_sentences)
    check_not_panx(sentences, path)
    scheme = detect_tag_scheme(sentences) if fmt.tag_scheme == "auto" else fmt.tag_scheme
    tag_map = dict(fmt.tag_map)
    result = []
    for sentence in sentences:
        check_tag_scheme(sentence, scheme, path)
        tags = to_iob2([(prefix, kind) for _, prefix, kind, _ in sentence], scheme)
        ids = [label_id(prefix, kind, tag_map, f"{path}:{lineno}")
               for (prefix, kind), (_, _, _, lineno) in zip(tags, sentence)]
        result.append(([token for token, *_ in sentence], ids))
    return result


PANX_TOKEN = re.compile(r"^[a-z]{2,3}(-[a-z0-9]+)*:.")  # PAN-X's `lang:token`, e.g. nl:Word


def check_not_panx(sentences, path):
    """A PAN-X file read as CoNLL columns: every token keeps its `lang:` prefix, none is in the
    vocabulary and the scores are silently near 0; refused when every token carries one."""
    tokens = [token for sentence in sentences for token, *_ in sentence]
    if tokens and all(PANX_TOKEN.match(token) for token in tokens):
        raise ValueError(f"{path}: every token starts with a language code ({tokens[0]!r}): a PAN-X file; "
                         f"read it with --data-format panx")


def read_conll_columns(path, fmt, max_sentences=None):
    """The raw sentences of a CoNLL file: lists of (token, tag prefix, entity type, line number)."""
    sentences, words = [], []
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            columns = decode_line(raw, path, lineno).split()
            if columns and columns[0] != DOCSTART:
                token, tag = column(columns, fmt.token_column, "--token-column", path, lineno), \
                    column(columns, fmt.tag_column, "--tag-column", path, lineno)
                words.append((token, *split_tag(tag, fmt.tag_column, f"{path}:{lineno}"), lineno))
            elif words:  # a blank line (or -DOCSTART-) ends the sentence
                sentences.append(words)
                words = []
                if max_sentences is not None and len(sentences) >= max_sentences:
                    return sentences
    return sentences + [words] if words else sentences


def decode_line(raw, path, lineno):
    """A line as text; a UTF-8 byte-order mark at the start of the file is dropped (editors on Windows
    write one: it would make "\ufeff-DOCSTART-" a token)."""
    try:
        text = raw.decode("utf-8")
        return text.removeprefix("\ufeff") if lineno == 1 else text
    except UnicodeDecodeError:
        raise ValueError(f"{path}:{lineno}: not UTF-8 text: convert the file, e.g. iconv -f latin1 -t utf-8 "
                         f"(CoNLL-2002's files are Latin-1)") from None


def column(columns, index, flag, path, lineno):
    if not -len(columns) <= index < len(columns):
        raise ValueError(f"{path}:{lineno}: {len(columns)} column(s), no column {index}: check {flag} "
                         f"(columns count from 0; -1 is the last)")
    return columns[index]


def split_tag(tag, tag_column, where):
    """'B-PER' -> ('B', 'PER'); 'O' -> ('O', None); anything else is not a NER tag."""
    prefix, dash, kind = tag.partition("-")
    if tag == "O":
        return "O", None
    if not dash or prefix not in TO_IOB2 or not kind:
        raise ValueError(f"{where}: {tag!r} in column {tag_column} is not a NER tag (O, B-TYPE, I-TYPE, E-TYPE, "
                         f"S-TYPE): set --tag-column to the column of the NER tags")
    return prefix, kind


def detect_tag_scheme(sentences):
    """bioes when any tag is E-/S- (or BILOU's L-/U-), else iob1 (which leaves IOB2 unchanged)."""
    prefixes = {prefix for sentence in sentences for _, prefix, _, _ in sentence}
    return "bioes" if prefixes & {"E", "S", "L", "U"} else "iob1"


def check_tag_scheme(sentence, scheme, path):
    """E-/S- (L-/U-) tags in a file read as IOB1 or IOB2: the --tag-scheme flag is wrong."""
    for _, prefix, kind, lineno in sentence if scheme != "bioes" else []:
        if prefix not in ("O", "B", "I"):
            raise ValueError(f"{path}:{lineno}: tag {prefix}-{kind} is BIOES, but --tag-scheme {scheme}: "
                             f"pass --tag-scheme bioes (or auto)")


def to_iob2(tags, scheme):
    """One sentence's (prefix, type) tags in IOB2. IOB1: an I- that starts an entity becomes
    B-; BIOES: S- -> B-, E- -> I-; IOB2 as it is."""
    if scheme == "bioes":
        return [(TO_IOB2.get(prefix, prefix), kind) for prefix, kind in tags]
    if scheme == "iob2":
        return list(tags)
    previous, result = None, []
    for prefix, kind in tags:
        starts = prefix == "I" and previous != kind
        result.append(("B" if starts else prefix, kind))
        previous = kind
    return result


def label_id(prefix, kind, tag_map, where):
    """The ner_data.LABELS index of an IOB2 tag after --tag-map; an unknown type names the flag that fixes it."""
    if prefix == "O":
        return 0
    kind = tag_map.get(kind, kind)
    if kind == "O":
        return 0
    if kind not in TYPES:
        raise ValueError(f"{where}: entity type {kind} is not one the model predicts ({', '.join(TYPES)}): "
                         f"map it with --tag-map {kind}=O (or {kind}=<type>)")
    return LABELS.index(f"{prefix}-{kind}")
