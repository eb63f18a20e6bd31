"""Assignment `head` (course/head.md), an extension: episodes.INNER_PARAMS["head"], an ablation whose
inner loop adapts the NER head only while the PEFT tensors are fresh-but-frozen (drawn fresh for every
task, never adapted), which `meta_pretrain.py --inner-params head` then offers. It fails on the
reference until done (the solution: course/solutions/head.patch); marked `assignment`, so `-m "not assignment"`
leaves it out.

Seen from outside, through the command line: meta_pretrain.main runs 2 meta-steps of 2 tasks on a
tiny model with maml.inner_loop, maml.meta_step and the loss wrapped to record what they were given
and what the forward passes saw. The expected draws are those of an --inner-params peft run (the
paper's phi_0: PEFT tensors and head, drawn together for each task in order).
"""

import pytest
import torch

import adapters
import maml
import meta_pretrain
from tests.conftest import prime_argv

pytestmark = pytest.mark.assignment

STEPS, TASKS = 2, 2


@pytest.fixture
def record(monkeypatch):
    """Per inner loop: the names it adapts, its phi_0, and the PEFT tensors each support forward saw
    (the fast tensor of that name if any, else the model's own Parameter). Per meta-step: which
    gradients the outer loop got."""
    seen = {"fast": [], "phi_0": [], "forward_peft": [], "after_peft": [], "body_grad": [], "peft_grad": []}
    real_inner, real_step, real_loss = maml.inner_loop, maml.meta_step, maml.functional_loss
    inside = []

    def functional_loss(model):
        seen["model"] = model
        loss_fn = real_loss(model)

        def recording(fast, batch):
            if inside:
                own = adapters.peft_parameters(model, include_head=False)
                inside[-1].append({n: fast.get(n, p).detach().clone() for n, p in own.items()})
            return loss_fn(fast, batch)
        return recording

    def inner_loop(loss_fn, fast, *args, **kwargs):
        seen["fast"].append(sorted(fast))
        seen["phi_0"].append({n: t.detach().clone() for n, t in fast.items()})
        inside.append([])
        try:
            return real_inner(loss_fn, fast, *args, **kwargs)
        finally:
            seen["forward_peft"].append(inside.pop())
            own = adapters.peft_parameters(seen["model"], include_head=False)
            seen["after_peft"].append({n: p.detach().clone() for n, p in own.items()})

    def meta_step(*args, **kwargs):
        result = real_step(*args, **kwargs)
        model = seen["model"]
        seen["body_grad"].append(max(p.grad.abs().max().item() for p in adapters.body_parameters(model).values()
                                     if p.grad is not None))
        seen["peft_grad"].append([n for n, p in adapters.peft_parameters(model).items() if p.grad is not None])
        return result
    monkeypatch.setattr(maml, "functional_loss", functional_loss)
    monkeypatch.setattr(maml, "inner_loop", inner_loop)
    monkeypatch.setattr(maml, "meta_step", meta_step)
    return seen


def prime(tiny_model_dir, data_dir, out, inner_params, inner_steps=2):
    meta_pretrain.main(prime_argv(tiny_model_dir, data_dir, out, "--steps", str(STEPS), "--tasks-per-step",
                                  str(TASKS), "--inner-steps", str(inner_steps), "--eval-every", "0",
                                  "--inner-params", inner_params))


def same(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[n], b[n]) for n in a)


def test_the_inner_loop_adapts_the_head_only_with_fresh_frozen_peft_tensors(tiny_model_dir, data_dir, tmp_path,
                                                                            record, monkeypatch):
    prime(tiny_model_dir, data_dir, tmp_path / "head", "head")
    head = ["classifier.bias", "classifier.weight"]
    assert record["fast"] == [head] * (STEPS * TASKS)                      # one inner loop per task, the head only
    for forwards, after in zip(record["forward_peft"], record["after_peft"]):
        assert len(forwards) == 2                                          # --inner-steps 2: two support forwards
        assert all(same(f, forwards[0]) for f in forwards) and same(after, forwards[0])   # never adapted
    frozen = [forwards[0] for forwards in record["forward_peft"]]
    assert all(not same(frozen[i], frozen[j]) for i in range(len(frozen)) for j in range(i))   # fresh per task
    assert all(g > 0 for g in record["body_grad"])                         # the body still gets a meta-gradient
    assert record["peft_grad"] == [[]] * STEPS                             # the PEFT tensors and head: no outer update

    # The draws are the paper's phi_0 of each task: what an --inner-params peft run adapts.
    head_phi_0, head_frozen = list(record["phi_0"]), frozen
    for key in ("fast", "phi_0", "forward_peft", "after_peft"):
        record[key].clear()
    prime(tiny_model_dir, data_dir, tmp_path / "peft", "peft", inner_steps=1)
    assert len(record["phi_0"]) == STEPS * TASKS
    for task, paper in enumerate(record["phi_0"]):
        assert same({n: paper[n] for n in head}, head_phi_0[task]), f"task {task}: the head"
        assert same({n: t for n, t in paper.items() if n not in head}, head_frozen[task]), f"task {task}: PEFT"


def test_the_command_line_offers_head():
    args = meta_pretrain.build_parser().parse_args(["--inner-params", "head"])
    assert args.inner_params == "head"
    assert meta_pretrain.build_parser().parse_args([]).inner_params == "peft"
