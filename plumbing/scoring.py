"""Entity-level scoring of NER predictions (seqeval), and CoNLL prediction files to re-score.

    from plumbing.scoring import score_model, write_conll
    scores = score_model(model, dataset, examples)   # {"f1_default": .., "f1_strict": .., ...} in percent
    write_conll("preds/fr.conll", dataset, predict_words(model, examples))

Two F1 modes, both reported:
  default  seqeval's default mode (conlleval-like: an I- tag that starts a span opens an
           entity). XTREME and the transformers NER examples report this one: the headline.
  strict   seqeval's strict IOB2 mode (an entity must begin with B-; a span opened by a
           stray I- tag is no entity). The two differ by a few F1 on our predictions (the
           README's tables give both), so only the default mode compares with published numbers.
A prediction file has one `token gold predicted` line per word and a blank line between
sentences, the format conlleval and seqeval read.
"""

import re
from pathlib import Path

import torch

from plumbing.batches import bucketed_batches, collate, word_predictions
from plumbing.files import write_atomic
from plumbing.ner_data import LABELS
from plumbing.pretrained import evaluation_mode

MODES = ("default", "strict")
SPACES = re.compile(r"\s+")


@torch.inference_mode()
def predict_words(model, examples, batch_size=64, device="cpu", pad_id=1):
    """Per-word label ids for every example (batched by length for speed; order kept)."""
    with evaluation_mode(model):
        return _predict_words(model, examples, batch_size, device, pad_id)


def _predict_words(model, examples, batch_size, device, pad_id):
    lengths = [len(e["input_ids"]) for e in examples]
    predictions = [None] * len(examples)
    for batch in bucketed_batches(lengths, batch_size):
        inputs = collate([examples[i] for i in batch], pad_id, device)
        inputs.pop("labels")
        best = model(**inputs).logits.argmax(-1).tolist()
        for row, i in enumerate(batch):
            predictions[i] = word_predictions(best[row], examples[i]["word_ids"], examples[i]["n_words"])
    return predictions


def tag_scores(gold_tags, pred_tags):
    """Precision, recall and F1 in percent, in both modes, of tag-string sequences:
    {"precision_default", "recall_default", "f1_default", "precision_strict", ...}."""
    from seqeval.metrics import f1_score, precision_score, recall_score
    from seqeval.scheme import IOB2
    if not gold_tags:
        raise ValueError("no sentences to score: the split is empty")
    scores = {}
    for mode, kwargs in [("default", {}), ("strict", {"mode": "strict", "scheme": IOB2})]:
        for name, metric in [("precision", precision_score), ("recall", recall_score), ("f1", f1_score)]:
            scores[f"{name}_{mode}"] = 100 * metric(gold_tags, pred_tags, zero_division=0, **kwargs)
    return scores


def entity_scores(gold, predicted, labels=LABELS):
    """tag_scores of label-id sequences."""
    return tag_scores([[labels[t] for t in s] for s in gold], [[labels[t] for t in s] for s in predicted])


def score_model(model, dataset, examples, batch_size=64, device="cpu", pad_id=1):
    """Entity scores of a token classifier on an encoded dataset."""
    return entity_scores(list(dataset["ner_tags"]), predict_words(model, examples, batch_size, device, pad_id))


def write_conll(path, dataset, predicted, labels=LABELS):
    """`token gold predicted` per word, a blank line between sentences (conlleval's input).
    Whitespace inside a token becomes '_' so that every line keeps three columns."""
    lines = []
    for tokens, gold, pred in zip(dataset["tokens"], dataset["ner_tags"], predicted):
        lines += [f"{SPACES.sub('_', tok)} {labels[g]} {labels[p]}" for tok, g, p in zip(tokens, gold, pred)]
        lines.append("")
    write_atomic(path, lambda tmp: Path(tmp).write_text("\n".join(lines) + "\n", encoding="utf-8"))


def read_conll(path):
    """(gold tag sequences, predicted tag sequences) of a prediction file of write_conll."""
    gold, pred, g, p = [], [], [], []
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        if not line.strip():
            if g:
                gold.append(g), pred.append(p)
                g, p = [], []
            continue
        _, gold_tag, pred_tag = line.split()
        g.append(gold_tag), p.append(pred_tag)
    if g:
        gold.append(g), pred.append(p)
    return gold, pred
