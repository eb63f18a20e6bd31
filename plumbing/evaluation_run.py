"""The output side of evaluate_ner.py: where scores may be written, that the body and the data
scored are the ones recorded, and the scores file itself. Nothing here scores; evaluate_ner.py does.
"""

import json
from pathlib import Path

from plumbing import files, ner_data, runs

LOCK_WAIT = 10.0  # seconds to wait for the checkpoint's lock: another evaluation holds it for a moment, a run for hours
# files of a run folder that --out must never replace, even with --overwrite: the run would be lost
RUN_FILES = (runs.RECORD, "metrics.jsonl", "peft_config.json", "config.json", "resume.pt", "tokenizer.json",
             "tokenizer_config.json", runs.LOCK)


def check_output_paths(args, langs):
    """--ckpt, --out and --predictions, before the model is loaded or anything is scored; returns --out."""
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
    runs.check_not_inside_a_run(out, "--out", out.parent, own=out.parent)  # out.parent a run: check_output_belongs
    writable_folder(out.parent, "--out")
    if args.predictions:
        runs.check_not_inside_a_run(args.predictions, "--predictions", args.predictions)
        writable_folder(args.predictions, "--predictions")
        existing = [str(Path(args.predictions) / f"{lang}.conll") for lang in langs
                    if (Path(args.predictions) / f"{lang}.conll").exists()]
        if existing and not args.overwrite:
            raise ValueError(f"--predictions: {', '.join(existing)} exists already: choose another --predictions "
                             f"folder (or --overwrite to replace it)")
    return out


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
    if (out.parent / runs.RECORD).is_file():
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
    if saved_config_sha256 is not None:  # None: a hub body (no folder to hash)
        now = files.config_sha256(body)
        if now != saved_config_sha256:
            raise ValueError(f"{Path(body) / 'config.json'} changed since {ckpt} was fine-tuned on it (sha256 "
                             f"{str(now)[:12]}, then {saved_config_sha256[:12]}): restore it, or fine-tune the body "
                             f"as it is now into a new --out")
    if saved_sha256 is None:
        return None  # a hub body (no folder to hash)
    now = files.weights_sha256(body)
    if now != saved_sha256:
        raise ValueError(f"the body {body} changed since {ckpt} was fine-tuned on it (weights sha256 {now[:12]}, "
                         f"then {saved_sha256[:12]}): fine-tune the new body into a new --out, or restore the old one")
    return now


def unfinished_advice(ckpt, record):
    """The error for an unfinished run as --ckpt, with a fix that keeps what can be kept: an
    interrupted priming run resumes (its resume.pt), only an interrupted fine-tuning run starts over."""
    stage = record.get("stage")
    if stage == "meta_pretrain":
        return (f"{ckpt} holds an unfinished meta_pretrain run (a body, not a fine-tuned checkpoint): finish it with "
                f"meta_pretrain.py --resume --out {ckpt}, then fine-tune it with finetune_peft.py --init {ckpt}")
    return (f"{ckpt} holds an unfinished {stage} run (interrupted?): run finetune_peft.py again with "
            f"--overwrite --out {ckpt}")


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
    path = Path(ckpt) / runs.RECORD
    return path.read_bytes() if path.is_file() else None


def write_scores(ckpt, record_bytes, out, scores):
    """Write the scores under the checkpoint folder's lock, and only if the folder still holds
    the run that was scored (a finetune_peft.py --overwrite may have replaced it meanwhile)."""
    lock = runs.lock_briefly(Path(ckpt) / runs.LOCK, LOCK_WAIT)
    if lock is None:
        raise ValueError(f"{ckpt} is being written by a fine-tuning run that started during this evaluation: "
                         f"scores not written; evaluate it again when that run has finished")
    with lock:
        if record_snapshot(ckpt) != record_bytes:
            raise ValueError(f"{ckpt} was replaced by another run while it was evaluated: these scores belong to the "
                             f"old run and were not written; evaluate it again")
        if Path(out).parent.resolve() == Path(ckpt).resolve():  # the run's folder, whose writers all hold its lock
            files.remove_stale_temporaries(Path(out).parent, [Path(out).name])
        files.write_json(out, scores)


def read_data(args, langs, fmt):
    """The target languages' data and its provenance for the record, hashed before and after reading
    (not after scoring): the hash recorded is that of the bytes scored, and a file replaced while
    it was read is refused."""
    files = [(lang, args.split) for lang in langs]
    before = ner_data.data_provenance(args.data_dir, files, fmt)
    datasets = {lang: ner_data.load_wikiann(lang, args.split, args.data_dir, args.max_sentences, fmt) for lang in langs}
    if ner_data.data_provenance(args.data_dir, files, fmt) != before:
        raise ValueError(f"the data in {before['dir']} changed while it was read ({', '.join(before['files'])}): "
                         f"nothing was scored; evaluate again once the files are complete")
    return datasets, before | (ner_data.data_description(fmt) if fmt else {})


def markdown_table(results):
    rows = ["| language | precision (default) | recall (default) | F1 (seqeval default) | F1 (strict IOB2) |",
            "|---|---:|---:|---:|---:|"]
    rows += [f"| {lang} | {r['precision_default']:.2f} | {r['recall_default']:.2f} | {r['f1_default']:.2f} "
             f"| {r['f1_strict']:.2f} |" for lang, r in results.items()]
    return "\n".join(rows)
