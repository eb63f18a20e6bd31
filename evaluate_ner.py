"""Zero-shot cross-lingual evaluation of a fine-tuned checkpoint (entity-level F1, seqeval).

    python evaluate_ner.py --ckpt checkpoints/ft-primed-e5-small-maml-adapter-s0-adapter-en-s0     # fr,nl,pt test
    python evaluate_ner.py --ckpt checkpoints/ft-e5-small-adapter-en-s0 --langs fr,nl,pt --split dev
    python evaluate_ner.py --ckpt ... --predictions preds/    # also preds/fr.conll ...: token gold predicted
    python evaluate_ner.py --ckpt ... --gpu 0 --max-sentences 1000
    python evaluate_ner.py --ckpt ... --data-format conll --data-dir conll2002 --langs es,nl --tag-map MISC=O

--ckpt is a folder of finetune_peft.py: PEFT tensors + head (its run.json names the body they
were trained on) or a full model (--peft full). Prints a markdown table of precision, recall
and F1 per language and their average, and writes the same as JSON (default:
<ckpt>/eval-<split>.json). The headline F1 is seqeval's default (conlleval-like) mode, the one
XTREME reports (JSON keys *_default); strict IOB2 is beside it (*_strict); see scoring.py.
A target language that was used in priming or in fine-tuning gets a warning and is left out of
the average: its score would not be zero-shot.
"""

import argparse
import hashlib
import time
import warnings
from pathlib import Path

import peft_checkpoint
from plumbing import batches, cli, evaluation_run, files, ner_data, pretrained, runs
from plumbing.scoring import entity_scores, predict_words, write_conll

LANGS = "fr,nl,pt"  # target languages: never used in the default priming (de,es) or training (en)


# ============================================================================ the evaluation

def evaluate(model, tokenizer, datasets, args, device):
    """Entity-level scores of `model` on each language's sentences (PAPER.md, the protocol): per-word
    predictions (a word's first sub-word), seqeval's default and strict modes (scoring.py).
    Returns ({lang: scores}, {lang: seconds}); with --predictions, one CoNLL file per language."""
    results, seconds = {}, {}
    for lang, data in datasets.items():
        t0 = time.perf_counter()
        examples = batches.encode_sentences(data, tokenizer, args.max_len)
        with pretrained.precision_context(device, args.precision):
            predicted = predict_words(model, examples, args.batch_size, device, tokenizer.pad_token_id)
        results[lang] = entity_scores(list(data["ner_tags"]), predicted) | {"sentences": len(data)}
        if args.predictions:
            write_conll(Path(args.predictions) / f"{lang}.conll", data, predicted)
        seconds[lang] = round(time.perf_counter() - t0, 1)
    return results, seconds


def zero_shot_average(results, langs, seen):
    """The mean of every score over the zero-shot languages (all of `langs` when none is zero-shot);
    returns (the average, the languages averaged)."""
    keys = [k for k in results[langs[0]] if k != "sentences"]
    averaged = [lang for lang in langs if lang not in seen] or langs
    return {k: sum(results[lang][k] for lang in averaged) / len(averaged) for k in keys}, averaged


def load_finetuned(ckpt, device):
    """The fine-tuned model of a finetune_peft.py folder, and that folder's run.json."""
    ckpt = Path(ckpt)
    record = runs.read_record(ckpt)
    if record is not None and not runs.is_finished(record):
        raise ValueError(evaluation_run.unfinished_advice(ckpt, record))
    if (ckpt / "peft_config.json").is_file():
        saved = files.read_json_object(ckpt / "peft_config.json", f"run finetune_peft.py again with --overwrite --out "
                                                            f"{ckpt}").get("extra", {})
        body = saved.get("body_path")
        if body is None:
            raise ValueError(f"{ckpt}/peft_config.json does not say which body it was trained on")
        if saved.get("labels", ner_data.LABELS) != ner_data.LABELS:
            raise ValueError(f"{ckpt} predicts labels {saved['labels']}, but the data uses {ner_data.LABELS}")
        evaluation_run.check_body_unchanged(ckpt, body, saved.get("body_sha256"), saved.get("body_config_sha256"))
        labels = ner_data.LABELS
        model = pretrained.load_token_classifier(body, num_labels=len(labels), id2label=labels, device=device)
        peft_checkpoint.load_peft(model, ckpt)
        return model, pretrained.load_tokenizer(body), record
    if (ckpt / "config.json").is_file() and (record or {}).get("stage") == "finetune_peft":  # --peft full
        model = pretrained.load_token_classifier(str(ckpt), device=device)
        labels = [model.config.id2label[i] for i in range(model.config.num_labels)]
        if labels != ner_data.LABELS:
            raise ValueError(f"{ckpt} predicts labels {labels}, but the data uses {ner_data.LABELS}")
        return model, pretrained.load_tokenizer(str(ckpt)), record
    hint = " (a pretrained or primed body: fine-tune it first with finetune_peft.py --init)" \
        if (ckpt / "config.json").is_file() else ""
    raise FileNotFoundError(f"{ckpt} is not a fine-tuned checkpoint: no peft_config.json or config.json{hint}")


def not_zero_shot(record, langs):
    """The languages of `langs` seen in fine-tuning or priming (their scores are not zero-shot),
    each with a warning."""
    seen = languages_seen(record)
    for lang in langs:
        if lang in seen:
            warnings.warn(f"{lang} was used in fine-tuning or priming of this checkpoint: "
                          f"its score is not zero-shot (left out of the average)", stacklevel=2)
    return [lang for lang in langs if lang in seen]


def languages_seen(record):
    """Every language a checkpoint's chain of runs trained on: its fine-tuning, the body's priming,
    and that body's own input when it was primed in turn (init_record / input_record, to the end)."""
    seen = set()
    while record:
        args = record.get("args", {})
        seen |= {args.get("lang"), args.get("source_lang")}
        seen |= set((args.get("extra_langs") or "").split(",")) | set((args.get("priming_langs") or "").split(","))
        record = record.get("init_record") or record.get("input_record")
    return seen - {None, ""}


# ============================================================================ the interface

def build_parser():
    p = argparse.ArgumentParser(description="Evaluate a fine-tuned NER checkpoint zero-shot on other languages.",
                                formatter_class=cli.HelpFormatter)
    p.add_argument("--ckpt", required=True, help="a folder written by finetune_peft.py")
    scoring = p.add_argument_group("what is scored")
    scoring.add_argument("--langs", default=LANGS, help="comma-separated target languages")
    scoring.add_argument("--split", choices=ner_data.SPLITS, default="test", help="which split to score")
    scoring.add_argument("--max-sentences", type=int, default=None,
                         help="score only the first N sentences per language")
    scoring.add_argument("--max-len", type=int, default=128, help="sub-word truncation length (cut words count as O)")
    ner_data.add_data_flags(p.add_argument_group("data"))
    output = p.add_argument_group("output")
    output.add_argument("--out", default=None, help="JSON output (default: <ckpt>/eval-<split>.json)")
    output.add_argument("--overwrite", action="store_true",
                        help="let --out replace an existing file that is not this checkpoint's scores or write into "
                             "another run's folder, and --predictions replace its <lang>.conll files")
    output.add_argument("--predictions", default=None,
                        help="folder for one <lang>.conll per language (token gold predicted; conlleval/seqeval "
                             "re-score it)")
    hardware = p.add_argument_group("hardware")
    hardware.add_argument("--gpu", type=int, default=None, help="CUDA device index; leave out for the CPU")
    hardware.add_argument("--batch-size", type=int, default=64, help="sentences per forward pass")
    hardware.add_argument("--precision", choices=pretrained.PRECISIONS, default="fp32",
                          help="fp32, or bf16 autocast for the forward passes")
    hardware.add_argument("--threads", type=int, default=None, help=cli.THREADS_HELP)
    return cli.parser_taking_negative_numbers(p)


def main(argv=None):
    args = build_parser().parse_args(argv)
    cli.check_at_least(args, 1, "max_sentences", "batch_size", "max_len")
    cli.set_threads(args)
    langs = ner_data.parse_languages(args.langs)
    out = evaluation_run.check_output_paths(args, langs)  # before the model is loaded or anything is scored
    fmt = ner_data.data_format_from_flags(args)
    version = runs.code_version()  # the code that scores, read now
    device = pretrained.pick_device(args.gpu)
    datasets, provenance = evaluation_run.read_data(args, langs, fmt)
    record_bytes = evaluation_run.record_snapshot(args.ckpt)  # the run scored (checked again when writing)
    model, tokenizer, record = load_finetuned(args.ckpt, device)
    pretrained.check_max_len(args.max_len, model.config, tokenizer)
    seen = not_zero_shot(record, langs)
    results, seconds = evaluate(model, tokenizer, datasets, args, device)
    results["average"], averaged = zero_shot_average(results, langs, seen)
    evaluation_run.write_scores(args.ckpt, record_bytes, out, {
        "ckpt": str(Path(args.ckpt).resolve()), "split": args.split, "langs": langs, "results": results,
        "max_len": args.max_len, "precision": args.precision, "max_sentences": args.max_sentences,  # shape the scores
        "average_of": averaged, "not_zero_shot": seen, "seconds": seconds, "device": str(device),
        "f1_mode": "f1_default: seqeval default mode (conlleval-like, as XTREME); f1_strict: strict IOB2",
        "code_version": version, "predictions": args.predictions,
        "ckpt_record_sha256": hashlib.sha256(record_bytes or b"").hexdigest(),
        "data": provenance})
    print(evaluation_run.markdown_table(results))
    print(f"scores written to {out} ({', '.join(f'{lang} {s}s' for lang, s in seconds.items())})")


if __name__ == "__main__":
    cli.run_cli(main)
