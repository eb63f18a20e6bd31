"""The resumable state of a priming run (meta_pretrain.py --resume): what is saved, how it is restored.

    save(out, step, model, optimizer, source, rngs)      # every --save-every meta-steps, atomically
    step = load(out, model, optimizer, source, rngs)     # --resume: the same run continues from `step`

Saved into <out>/resume.pt: the meta-step; what priming changes in the model (the trainable
body and the PEFT tensors and head; the frozen word embeddings are the input model's and need
no copy); the outer optimizer's state (AdamW moments, and Meta-SGD's learned inner rates when
they are in it); the position of every batch stream (support and query, per language); the
task-sampling and fresh-phi generators; each process's torch RNG (dropout); and, for the implicit
inner loop with a warm start, the carried fine-tuning (its phi_0, phi and optimizer state). A resumed
run therefore draws the same batches, tasks, phi and dropout masks as an uninterrupted one.
It also names the run it belongs to ("run": the flags that shape it, --seed and --peft among them), so a
resume.pt copied in from another run is refused instead of continuing that run under this one's record.
It holds tensors and plain data only (RNG states are tensors) and is read with weights_only=True, so a
received resume.pt can carry no code that loading it would run; its identity is checked before any of it is applied.
"""

import pickle
from pathlib import Path

import torch

from plumbing.files import torch_save

FILE = "resume.pt"


def trained_state(model, also):
    """What priming changes: the parameters that train, and those named in `also` (the PEFT tensors and head)."""
    keep = {n for n, p in model.named_parameters() if p.requires_grad} | set(also)
    return {n: t for n, t in model.state_dict().items() if n in keep}


def save(out, step, model, optimizer, source, rngs, extra=None, carried=None, run=None, also=()):
    """also: names of tensors kept even when frozen (the PEFT tensors and head);
    rngs: {"task_rng": Generator, "phi_rng": Generator, "processes": distributed.rng_states()};
    extra: more tensors to keep (a dict of name -> tensor); carried: a dict of anything torch.save
    takes (the implicit inner loop's warm start); run: the run's identity ({flag: value}), which
    `load` compares."""
    torch_save(Path(out) / FILE, {
        "step": step, "run": run or {}, "model": trained_state(model, also), "optimizer": optimizer.state_dict(),
        "streams": source.stream_states(), "task_rng": rngs["task_rng"].get_state(),
        "phi_rng": rngs["phi_rng"].get_state(),
        "rank_rngs": rngs["processes"], "extra": {k: v.detach().cpu() for k, v in (extra or {}).items()},
        **({"carried": carried} if carried is not None else {})})


def load(out, model, optimizer, source, rngs, rank=0, extra=None, carried=None, run=None):
    """Restore what `save` wrote (extra: the same dict of tensors, filled in place; carried: a dict,
    updated with the saved one, on the CPU; run: this run's identity, which the saved one must
    match); returns the step."""
    path = Path(out) / FILE
    if not path.is_file():
        raise FileNotFoundError(f"--resume: {path} does not exist (no checkpoint saved yet, or removed by "
                                f"--no-keep-resume), so the run in {out} cannot continue: prime into a new --out "
                                f"(nothing in {out} was changed)")
    try:  # weights_only: a received resume.pt is data, never code that unpickling would run
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if "Weights only load failed" not in str(e):
            raise ValueError(f"{path} is unreadable (UnpicklingError), so the run in {out} cannot continue: "
                             f"prime into a new --out (nothing in {out} was changed)") from None
        raise ValueError(f"{path} holds more than tensors and plain data (Python objects that loading would run), "
                         f"so this project did not write it: restore the run's own resume.pt, or prime into a new "
                         f"--out (it was not loaded; nothing in {out} was changed)") from None
    except Exception as e:  # truncated or not a torch file
        raise ValueError(f"{path} is unreadable ({type(e).__name__}), so the run in {out} cannot continue: "
                         f"prime into a new --out (nothing in {out} was changed)") from None
    if not isinstance(state, dict) or not isinstance(state.get("run", {}), dict):
        raise ValueError(f"{path} is not a resume state of this project: restore the run's own resume.pt, or prime "
                         f"into a new --out (nothing in {out} was changed)")
    check_same_run(path, state.get("run", {}), run or {}, out)
    model.load_state_dict(state["model"], strict=False)  # the frozen rest is the input model's
    optimizer.load_state_dict(state["optimizer"])
    source.load_stream_states(state["streams"])
    rngs["task_rng"].set_state(state["task_rng"])
    rngs["phi_rng"].set_state(state["phi_rng"])
    with torch.no_grad():
        for name, tensor in (extra or {}).items():
            tensor.copy_(state["extra"][name])
    if carried is not None:
        carried.update(state.get("carried", {}))
    saved = state["rank_rngs"]
    if rank < len(saved):  # else a process new to the run keeps its own seed (resumed on more processes)
        torch.set_rng_state(saved[rank]["torch_rng"])
        if saved[rank]["cuda_rng"] is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(saved[rank]["cuda_rng"])
    return state["step"]


def check_same_run(path, saved, now, out):
    """A resume.pt continues only the run that wrote it: every flag both identities name must agree
    (a resume.pt older than the identity names none and is taken as the folder's own)."""
    differ = [flag for flag in saved if flag in now and saved[flag] != now[flag]]
    if differ:
        flag = differ[0]
        raise ValueError(f"{path} belongs to another run (--{flag.replace('_', '-')} {saved[flag]} there, {now[flag]} "
                         f"in the run in {out}{f', and {len(differ) - 1} more flag(s)' if len(differ) > 1 else ''}): "
                         f"restore this run's own resume.pt, or start over with --overwrite (nothing in {out} "
                         f"was changed)")
