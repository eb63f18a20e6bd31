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
import json
import time
import warnings
from pathlib import Path

from plumbing import peft_state
from plumbing.ner_data import (
    LABELS,
    SPLITS,
    add_data_flags,
    data_description,
    data_format_from_flags,
    data_provenance,
    encode_sentences,
    load_wikiann,
    parse_languages,
)
from plumbing.pretrained import (
    PRECISIONS,
    check_max_len,
    load_token_classifier,
    load_tokenizer,
    pick_device,
    precision_context,
)
from plumbing.runs import (
    LOCK,
    RECORD,
    check_at_least,
    check_not_inside_a_run,
    code_version,
    config_sha256,
    is_finished,
    lock_briefly,
    parser_taking_negative_numbers,
    read_json_object,
    read_record,
    remove_stale_temporaries,
    run_cli,
    weights_sha256,
    write_json,
)
from plumbing.scoring import entity_scores, predict_words, write_conll

LANGS = "fr,nl,pt"  # target languages: never used in the default priming (de,es) or training (en)
LOCK_WAIT = 10.0  # seconds to wait for the checkpoint's lock: another evaluation holds it for a moment, a run for hours
# files of a run folder that --out must never replace, even with --overwrite: the run would be lost
RUN_FILES = (RECORD, "metrics.jsonl", "peft_config.json", "config.json", "resume.pt", "tokenizer.json",
             "tokenizer_config.json", LOCK)


def build_parser():
    p = argparse.ArgumentParser(description="Evaluate a fine-tuned NER checkpoint zero-shot on other languages.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--ckpt", required=True, help="a folder written by finetune_peft.py")
    p.add_argument("--langs", default=LANGS, help="comma-separated target languages")
    p.add_argument("--split", choices=SPLITS, default="test", help="which split to score")
    p.add_argument("--max-sentences", type=int, default=None, help="score only the first N sentences per language")
    p.add_argument("--batch-size", type=int, default=64, help="sentences per forward pass")
    p.add_argument("--precision", choices=PRECISIONS, default="fp32", help="fp32, or bf16 autocast for the forward passes")
    p.add_argument("--max-len", type=int, default=128, help="sub-word truncation length (cut words count as O)")
    add_data_flags(p)
    p.add_argument("--gpu", type=int, default=None, help="CUDA device index; leave out for the CPU")
    p.add_argument("--out", default=None, help="JSON output (default: <ckpt>/eval-<split>.json)")
    p.add_argument("--overwrite", action="store_true",
                   help="let --out replace an existing file that is not this checkpoint's scores or write into "
                        "another run's folder, and --predictions replace its <lang>.conll files")
    p.add_argument("--predictions", default=None,
                   help="folder for one <lang>.conll per language (token gold predicted; conlleval/seqeval re-score it)")
    return parser_taking_negative_numbers(p)


def check_args(args):
    """Flag ranges and the output paths, before the model is loaded or anything is scored."""
    check_at_least(args, 1, "max_sentences", "batch_size", "max_len")
    ckpt = Path(args.ckpt)
    if not ckpt.exists():
        raise FileNotFoundError(f"--ckpt {ckpt} does not exist")
    if not ckpt.is_dir():
        raise ValueError(f"--ckpt {ckpt} is a file: give the folder that finetune_peft.py wrote")
    out = Path(args.out) if args.out else ckpt / f"eval-{args.split}.json"
    if out.is_dir():
        raise ValueError(f"--out {out} is a folder: give a file name, e.g. {out / f'eval-{args.split}.json'}")
    check_output_file(out, args.overwrite)
    check_output_belongs(out, ckpt, args.overwrite)
    check_not_inside_a_run(out, "--out", out.parent, own=out.parent)  # out.parent a run: check_output_belongs
    writable_folder(out.parent, "--out")
    langs = parse_languages(args.langs)
    if args.predictions:
        check_not_inside_a_run(args.predictions, "--predictions", args.predictions)
        writable_folder(args.predictions, "--predictions")
        existing = [str(Path(args.predictions) / f"{lang}.conll") for lang in langs
                    if (Path(args.predictions) / f"{lang}.conll").exists()]
        if existing and not args.overwrite:
            raise ValueError(f"--predictions: {', '.join(existing)} exists already: choose another --predictions "
                             f"folder (or --overwrite to replace it)")
    return langs, out, data_format_from_flags(args)


def is_evaluation(path):
    """Whether `path` holds scores this script wrote (those it may replace without --overwrite)."""
    try:
        saved = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(saved, dict) and {"ckpt", "results", "f1_mode"} <= set(saved)


def check_output_file(out, overwrite):
    """--out never replaces a run's own files, nor (without --overwrite) a file it did not write."""
    if out.name in RUN_FILES or out.suffix in (".safetensors", ".bin"):
        raise ValueError(f"--out {out} would replace a run's own file: give a new file name, "
                         f"e.g. {out.parent / 'eval-test.json'}")
    if out.exists() and not overwrite and not is_evaluation(out):
        raise ValueError(f"--out {out} exists and holds no scores of evaluate_ner.py: give a new file name "
                         f"(or --overwrite to replace it)")


def check_output_belongs(out, ckpt, overwrite):
    """Without --overwrite, --out never lands in another run's folder (scores there are taken for that
    run's: compare.py reads them so) nor replaces the scores of another checkpoint."""
    if overwrite or out.parent.resolve() == ckpt.resolve():
        return
    if (out.parent / RECORD).is_file():
        raise ValueError(f"--out {out} is in another run's folder ({out.parent}), where scores are taken for that "
                         f"run's: give a file outside it, e.g. {ckpt / out.name} (or --overwrite)")
    scored = json.loads(out.read_text())["ckpt"] if out.exists() else None  # an evaluation's (check_output_file)
    if scored is not None and scored != str(ckpt.resolve()):
        raise ValueError(f"--out {out} holds the scores of another checkpoint ({scored}): give a new file name "
                         f"(or --overwrite to replace them)")


def check_body_unchanged(ckpt, body, saved_sha256, saved_config_sha256=None):
    """The body's weights and config.json are those the PEFT tensors were trained on (a re-primed or
    replaced body, or an edited config, would be scored with adapters that do not belong to it)."""
    if (saved_sha256 or saved_config_sha256) is not None and not Path(body).is_dir():  # it was a folder then
        raise ValueError(f"the body {ckpt} was fine-tuned on is not at {body} any more (looked for "
                         f"{Path(body).expanduser().resolve()}): move it back there, or fine-tune the body where it "
                         f"is now into a new --out (finetune_peft.py --init <its folder>)")
    if saved_config_sha256 is not None:  # None: a checkpoint older than the config hash, or a hub body
        now = config_sha256(body)
        if now != saved_config_sha256:
            raise ValueError(f"{Path(body) / 'config.json'} changed since {ckpt} was fine-tuned on it (sha256 "
                             f"{str(now)[:12]}, then {saved_config_sha256[:12]}): restore it, or fine-tune the body "
                             f"as it is now into a new --out")
    if saved_sha256 is None:
        return None  # a checkpoint older than the body hash, or a hub body
    now = weights_sha256(body)
    if now != saved_sha256:
        raise ValueError(f"the body {body} changed since {ckpt} was fine-tuned on it (weights sha256 {now[:12]}, "
                         f"then {saved_sha256[:12]}): fine-tune the new body into a new --out, or restore the old one")
    return now


def load_finetuned(ckpt, device):
    """The fine-tuned model of a finetune_peft.py folder, and that folder's run.json."""
    ckpt = Path(ckpt)
    record = read_record(ckpt)
    if record is not None and not is_finished(record):
        raise ValueError(unfinished_advice(ckpt, record))
    if (ckpt / "peft_config.json").is_file():
        saved = read_json_object(ckpt / "peft_config.json", f"run finetune_peft.py again with --overwrite --out "
                                                            f"{ckpt}").get("extra", {})
        body = saved.get("body_path") or saved.get("body")
        if body is None:
            raise ValueError(f"{ckpt}/peft_config.json does not say which body it was trained on")
        if saved.get("labels", LABELS) != LABELS:
            raise ValueError(f"{ckpt} predicts labels {saved['labels']}, but the data uses {LABELS}")
        check_body_unchanged(ckpt, body, saved.get("body_sha256"), saved.get("body_config_sha256"))
        model = load_token_classifier(body, num_labels=len(LABELS), id2label=LABELS, device=device)
        peft_state.load_peft(model, ckpt)
        return model, load_tokenizer(body), record
    if (ckpt / "config.json").is_file() and (record or {}).get("stage") == "finetune_peft":  # --peft full
        model = load_token_classifier(str(ckpt), device=device)
        labels = [model.config.id2label[i] for i in range(model.config.num_labels)]
        if labels != LABELS:
            raise ValueError(f"{ckpt} predicts labels {labels}, but the data uses {LABELS}")
        return model, load_tokenizer(str(ckpt)), record
    hint = " (a pretrained or primed body: fine-tune it first with finetune_peft.py --init)" \
        if (ckpt / "config.json").is_file() else ""
    raise FileNotFoundError(f"{ckpt} is not a fine-tuned checkpoint: no peft_config.json or config.json{hint}")


def unfinished_advice(ckpt, record):
    """The error for an unfinished run as --ckpt, with a fix that keeps what can be kept: an
    interrupted priming run resumes (its resume.pt), only an interrupted fine-tuning run starts over."""
    stage = record.get("stage")
    if stage == "meta_pretrain":
        return (f"{ckpt} holds an unfinished meta_pretrain run (a body, not a fine-tuned checkpoint): finish it with "
                f"meta_pretrain.py --resume --out {ckpt}, then fine-tune it with finetune_peft.py --init {ckpt}")
    return (f"{ckpt} holds an unfinished {stage} run (interrupted?): run finetune_peft.py again with "
            f"--overwrite --out {ckpt}")


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


def not_zero_shot(record, langs):
    """The languages of `langs` seen in fine-tuning or priming (their scores are not zero-shot),
    each with a warning."""
    seen = languages_seen(record)
    for lang in langs:
        if lang in seen:
            warnings.warn(f"{lang} was used in fine-tuning or priming of this checkpoint: "
                          f"its score is not zero-shot (left out of the average)", stacklevel=2)
    return [lang for lang in langs if lang in seen]


def markdown_table(results):
    rows = ["| language | precision (default) | recall (default) | F1 (seqeval default) | F1 (strict IOB2) |",
            "|---|---:|---:|---:|---:|"]
    rows += [f"| {lang} | {r['precision_default']:.2f} | {r['recall_default']:.2f} | {r['f1_default']:.2f} "
             f"| {r['f1_strict']:.2f} |" for lang, r in results.items()]
    return "\n".join(rows)


def writable_folder(folder, flag):
    """Create folder and check that files can be written there, before any scoring."""
    try:
        Path(folder).mkdir(parents=True, exist_ok=True)
        probe = Path(folder) / ".write-test"
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise ValueError(f"{flag} {folder} is not a writable folder ({e.strerror}): choose another") from None


def record_snapshot(ckpt):
    """The bytes of a checkpoint's run.json (None without one): which run is being scored."""
    path = Path(ckpt) / RECORD
    return path.read_bytes() if path.is_file() else None


def write_scores(ckpt, record_bytes, out, scores):
    """Write the scores under the checkpoint folder's lock, and only if the folder still holds
    the run that was scored (a finetune_peft.py --overwrite may have replaced it meanwhile)."""
    lock = lock_briefly(Path(ckpt) / LOCK, LOCK_WAIT)
    if lock is None:
        raise ValueError(f"{ckpt} is being written by a fine-tuning run that started during this evaluation: "
                         f"scores not written; evaluate it again when that run has finished")
    with lock:
        if record_snapshot(ckpt) != record_bytes:
            raise ValueError(f"{ckpt} was replaced by another run while it was evaluated: these scores belong to the "
                             f"old run and were not written; evaluate it again")
        if Path(out).parent.resolve() == Path(ckpt).resolve():  # the run's folder, whose writers all hold its lock
            remove_stale_temporaries(Path(out).parent, [Path(out).name])
        write_json(out, scores)


def read_data(args, langs, fmt):
    """The target languages' data and its provenance for the record, hashed before and after reading
    (not after scoring): the hash recorded is that of the bytes scored, and a file replaced while
    it was read is refused."""
    files = [(lang, args.split) for lang in langs]
    before = data_provenance(args.data_dir, files, fmt)
    datasets = {lang: load_wikiann(lang, args.split, args.data_dir, args.max_sentences, fmt) for lang in langs}
    if data_provenance(args.data_dir, files, fmt) != before:
        raise ValueError(f"the data in {before['dir']} changed while it was read ({', '.join(before['files'])}): "
                         f"nothing was scored; evaluate again once the files are complete")
    return datasets, before | (data_description(fmt) if fmt else {})


def main(argv=None):
    args = build_parser().parse_args(argv)
    langs, out, fmt = check_args(args)
    version = code_version()  # the code that scores, read now
    device = pick_device(args.gpu)
    datasets, provenance = read_data(args, langs, fmt)
    record_bytes = record_snapshot(args.ckpt)  # the run these scores belong to (checked again when writing)
    model, tokenizer, record = load_finetuned(args.ckpt, device)
    check_max_len(args.max_len, model.config, tokenizer)
    seen = not_zero_shot(record, langs)
    results, seconds = {}, {}
    for lang, data in datasets.items():
        t0 = time.perf_counter()
        examples = encode_sentences(data, tokenizer, args.max_len)
        with precision_context(device, args.precision):
            predicted = predict_words(model, examples, args.batch_size, device, tokenizer.pad_token_id)
        results[lang] = entity_scores(list(data["ner_tags"]), predicted) | {"sentences": len(data)}
        if args.predictions:
            write_conll(Path(args.predictions) / f"{lang}.conll", data, predicted)
        seconds[lang] = round(time.perf_counter() - t0, 1)
    keys = [k for k in results[langs[0]] if k != "sentences"]
    averaged = [lang for lang in langs if lang not in seen] or langs  # zero-shot languages only, when there are any
    results["average"] = {k: sum(results[line][k] for line in averaged) / len(averaged) for k in keys}
    write_scores(args.ckpt, record_bytes, out, {
        "ckpt": str(Path(args.ckpt).resolve()), "split": args.split, "langs": langs, "results": results,
        "max_len": args.max_len, "precision": args.precision, "max_sentences": args.max_sentences,  # shape the scores
        "average_of": averaged, "not_zero_shot": seen, "seconds": seconds, "device": str(device),
        "f1_mode": "f1_default: seqeval default mode (conlleval-like, as XTREME); f1_strict: strict IOB2",
        "code_version": version, "predictions": args.predictions,
        "ckpt_record_sha256": hashlib.sha256(record_bytes or b"").hexdigest(),
        "data": provenance})
    print(markdown_table(results))
    print(f"scores written to {out} ({', '.join(f'{lang} {s}s' for lang, s in seconds.items())})")


if __name__ == "__main__":
    run_cli(main)
