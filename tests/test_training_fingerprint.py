"""TRAINING_CODE is bumped when a stage trains differently for the same flags; this notices when nobody did.
It runs a tiny comparison's priming and fine-tuning (the smoke budget's flags, as compare.py passes them,
with a sharper outer loop: MAML and MTL priming for adapters, MAML priming for prefix tuning, fine-tuning on
the primed bodies, multi-source fine-tuning included) on a tiny random model and compares every loss they
log with compare_runs.TRAINING_FINGERPRINT, stored beside TRAINING_CODE. A changed default the flags do
not spell out, a changed seed derivation or a changed module changes the losses: the test fails until
TRAINING_CODE is bumped and the new losses (printed by `python tests/test_training_fingerprint.py`) are
stored with it. The tolerance (1e-3 relative) is far above float differences between machines
(~1e-6 after a few steps) and far below what a change of training does."""
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from conftest import FIXTURE_DATA  # noqa: E402

from experiments import compare_runs  # noqa: E402
from experiments.compare_conditions import BUDGETS, CONDITIONS, SOURCE_LANG  # noqa: E402

TOLERANCE = 1e-3


def losses_of(folder):
    """Every loss a run logged, step by step (metrics.jsonl; the seconds and other measures left out)."""
    lines = [json.loads(line) for line in (Path(folder) / "metrics.jsonl").read_text().splitlines()]
    return [{k: round(v, 6) for k, v in line.items() if "loss" in k} for line in lines]


def fingerprint_runs(model, out):
    """{run: its losses} of the tiny comparison: the flags compare.py builds for the smoke budget."""
    import finetune_peft
    import meta_pretrain
    data, budget = str(FIXTURE_DATA), BUDGETS["smoke"]
    # 3 meta-steps at a larger outer rate: at the budget's 5e-5 the body moves too little for a changed outer
    # update to show in the losses (1e-4 relative, below the tolerance)
    sharper = ["--steps", "3", "--outer-lr", "1e-3"]
    tune = ["--data-dir", data, *budget["finetune"], "--lang", SOURCE_LANG, "--seed", "0"]
    runs = {"adapter MAML priming": ("adapter", CONDITIONS["MAML priming"]),
            "adapter MTL priming": ("adapter", CONDITIONS["MTL priming"]),
            "prefix MAML priming": ("prefix", CONDITIONS["MAML priming"])}
    losses = {}
    for name, (peft, condition) in runs.items():
        primed = Path(out) / name.replace(" ", "-")
        meta_pretrain.main(["--model", str(model), "--data-dir", data, *budget["prime"], *sharper, "--peft", peft,
                            "--seed", "1", "--source-lang", SOURCE_LANG, "--priming-langs", "de,es", *condition,
                            "--out", str(primed)])
        losses[name] = losses_of(primed)
    for name, extra in {"adapter": [], "prefix": ["--extra-langs", "de,es", "--extra-sentences", "40"]}.items():
        tuned = Path(out) / f"ft-{name}"
        finetune_peft.main([*tune, "--init", str(Path(out) / f"{name}-MAML-priming"), "--peft", name, *extra,
                            "--out", str(tuned)])
        losses[f"{name} fine-tuning{' (multi-source)' if extra else ''} on MAML priming"] = losses_of(tuned)
    return losses


def differences(measured, stored):
    """'run, step, loss: measured vs stored' for every loss outside the tolerance (or missing)."""
    wrong = [] if measured.keys() == stored.keys() else [f"runs {sorted(measured)} vs {sorted(stored)}"]
    for run in measured.keys() & stored.keys():
        if len(measured[run]) != len(stored[run]):
            wrong.append(f"{run}: {len(measured[run])} logged steps vs {len(stored[run])}")
        for step, (a, b) in enumerate(zip(measured[run], stored[run]), 1):
            wrong += [f"{run}, step {step}, {k}: {a.get(k)} vs {b.get(k)}" for k in a.keys() | b.keys()
                      if a.get(k) is None or b.get(k) is None or abs(a[k] - b[k]) > TOLERANCE * max(abs(b[k]), 1e-3)]
    return wrong


def test_the_stored_fingerprint_is_training_codes():
    assert compare_runs.TRAINING_FINGERPRINT["training_code"] == compare_runs.TRAINING_CODE, \
        "TRAINING_CODE was bumped: store its fingerprint (python tests/test_training_fingerprint.py prints it)"


def test_training_is_what_training_code_says(tiny_model_dir, tmp_path):
    wrong = differences(fingerprint_runs(tiny_model_dir, tmp_path), compare_runs.TRAINING_FINGERPRINT["losses"])
    assert not wrong, ("the stages train differently from what TRAINING_CODE " + compare_runs.TRAINING_CODE
                       + " stored: if that is meant, bump TRAINING_CODE (compare.py then runs every run anew) and "
                       "store the losses `python tests/test_training_fingerprint.py` prints; else the change "
                       "alters training and must not. " + "; ".join(sorted(wrong)[:5]))


def test_a_change_of_one_loss_beyond_the_tolerance_is_noticed():
    stored = {"run": [{"loss": 2.0, "query_loss": 1.5}]}
    assert differences({"run": [{"loss": 2.0 * (1 + TOLERANCE / 2), "query_loss": 1.5}]}, stored) == []
    assert differences({"run": [{"loss": 2.0 * (1 + 2 * TOLERANCE), "query_loss": 1.5}]}, stored)
    assert differences({"run": [{"loss": 2.0}]}, stored) and differences({}, stored)


if __name__ == "__main__":   # print the fingerprint of the code as it is, to store beside a bumped TRAINING_CODE
    import contextlib
    import tempfile

    import torch
    from conftest import save_tiny_body

    from plumbing.pretrained import load_tokenizer
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        model = save_tiny_body(Path(tmp) / "tiny", load_tokenizer("e5-small"))
        with contextlib.redirect_stdout(sys.stderr):   # the stages' own lines
            losses = fingerprint_runs(model, Path(tmp) / "runs")
    print(json.dumps(losses))
