"""The run-folder convention shared by the three stages: records, metrics logs, atomic writes.

    checkpoints/
      primed-maml-adapter-s0/        meta_pretrain.py --out: an ordinary transformers checkpoint
        config.json, model.safetensors, tokenizer.json ...   (the primed body theta)
        run.json                     every flag, the seed, the code version, the input model
        metrics.jsonl                one JSON line per logged step
        resume.pt                    the latest resumable state (model, optimizer, data streams, RNGs)
      ft-adapter-en-s0/              finetune_peft.py --out: PEFT tensors + head only (megabytes)
        peft.safetensors, peft_config.json, run.json (its "init" points to the body), metrics.jsonl
        eval-test.json               evaluate_ner.py's scores for that checkpoint

So every number in a results table traces back: eval-*.json -> its fine-tuning folder's run.json
-> "init" (a primed folder's run.json, or a model name) -> that priming run's flags.
Every file is written to a temporary name and renamed into place, so an interrupted run never
leaves a half-written file that a later stage would take.
"""

import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

RECORD = "run.json"
METRICS = "metrics.jsonl"


def set_seed(seed):
    """Seed every RNG the stages use (python, torch CPU and CUDA)."""
    random.seed(seed)
    torch.manual_seed(seed)
    torch.cuda.manual_seed_all(seed)


def code_version():
    """The git commit of this code (with -dirty when it has local changes), else 'unknown'."""
    try:
        out = subprocess.run(["git", "describe", "--always", "--dirty"], cwd=Path(__file__).parent,
                             capture_output=True, text=True, timeout=10)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def write_atomic(path, write):
    """Call write(tmp_path), then rename tmp_path to path (atomic on one file system)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".tmp-", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json(path, obj):
    """Write JSON atomically."""
    write_atomic(path, lambda tmp: Path(tmp).write_text(json.dumps(obj, indent=1, default=str)))


def torch_save(path, obj):
    """torch.save atomically (resumable states)."""
    write_atomic(path, lambda tmp: torch.save(obj, tmp))


def write_record(folder, stage, args, **extra):
    """run.json: the stage, every flag, the code version and anything the stage adds."""
    record = {"stage": stage, "args": vars(args), "code_version": code_version(),
              "command": " ".join(sys.argv), "time": time.strftime("%Y-%m-%d %H:%M:%S"), **extra}
    write_json(Path(folder) / RECORD, record)
    return record


def read_record(folder):
    """A run folder's run.json, or None where the folder has none (e.g. a hub model)."""
    path = Path(folder) / RECORD
    return json.loads(path.read_text()) if path.is_file() else None


def save_model_atomic(model, tokenizer, folder):
    """Save a transformers model and tokenizer into folder so that it is never half-written:
    config.json (what from_pretrained and resolve_model look for) is removed first and moved in
    last, and every file goes through a temporary folder and a rename."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").unlink(missing_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".save-tmp-", dir=folder))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        files = sorted(tmp.iterdir(), key=lambda p: p.name == "config.json")  # config.json last
        for f in files:
            os.replace(f, folder / f.name)
    finally:
        for f in tmp.iterdir():
            f.unlink()
        tmp.rmdir()


class MetricsLog:
    """Append-only JSON-lines metrics file in a run folder (one line per logged step)."""

    def __init__(self, folder, fresh=True):
        Path(folder).mkdir(parents=True, exist_ok=True)
        self.path = Path(folder) / METRICS
        if fresh:
            self.path.unlink(missing_ok=True)

    def write(self, **metrics):
        with open(self.path, "a") as f:
            f.write(json.dumps(metrics) + "\n")

    def truncate_after(self, step):
        """On resume, drop lines logged after the checkpoint's step (they will be redone)."""
        if self.path.is_file():
            lines = [l for l in self.path.read_text().splitlines() if json.loads(l).get("step", 0) <= step]
            write_atomic(self.path, lambda tmp: Path(tmp).write_text("".join(l + "\n" for l in lines)))


USER_ERRORS = (ValueError, FileNotFoundError, ImportError)


def run_cli(main):
    """Run a stage's main(); a user error (bad flag, missing folder, unknown language, ...) is
    one line on stderr and exit status 2, never a traceback (PRIMING_DEBUG=1 shows it)."""
    try:
        main()
    except USER_ERRORS as e:
        if os.environ.get("PRIMING_DEBUG"):
            raise  # the full traceback, for developers
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2)
    except KeyboardInterrupt:
        print("interrupted: the last complete checkpoint is kept (continue with --resume)", file=sys.stderr)
        raise SystemExit(130)
