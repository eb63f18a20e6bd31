"""Assignment `meta_gradient` (course/meta_gradient.md): maml.meta_step, the averaged meta-gradient
of a meta-batch of tasks, back-propagated into theta task by task.

A toy task with a closed form (as in test_inner_loop.py): loss 0.5 ||theta * phi - y||^2. The inner
loop is replaced here by that closed form (`toy_inner_loop`), so this assignment is graded on its
own, whatever the state of the `inner_loop` assignment; the expected meta-gradient comes from
torch.func.grad of the whole meta-objective written out.
"""

import pytest
import torch
from torch.func import grad

import maml

THETA = torch.tensor([1.5, -0.7, 0.4], dtype=torch.float64)
TASKS = [  # (support target, query target, phi_0) of each task
    (torch.tensor([1.0, 2.0, -1.0]), torch.tensor([0.5, -1.0, 2.0]), torch.tensor([0.3, 0.2, -0.1])),
    (torch.tensor([-2.0, 0.5, 1.0]), torch.tensor([1.0, 1.0, -0.5]), torch.tensor([-0.4, 0.1, 0.6])),
    (torch.tensor([0.0, 1.0, 3.0]), torch.tensor([2.0, 0.0, 1.0]), torch.tensor([0.2, -0.3, 0.0])),
]
TASKS = [tuple(t.double() for t in task) for task in TASKS]
STEPS, LR = 2, 0.3


def toy_loss(fast, batch):
    return 0.5 * ((batch["theta"] * fast["phi"] - batch["y"]) ** 2).sum()


def closed_form(theta, phi, y, steps):
    for _ in range(steps):
        phi = phi - LR * theta * (theta * phi - y)
    return phi


def toy_inner_loop(loss_fn, fast, support_batch, steps, lr, first_order=False, clip=None, rates=None, losses=None,
                   optimizer="sgd"):
    """maml.inner_loop for the toy loss, by its closed form (calls are recorded in CALLS: theta's .grad
    when the call began; the settings in SETTINGS). Always SGD, whatever `optimizer` says."""
    theta, y, phi = support_batch["theta"], support_batch["y"], fast["phi"]
    CALLS.append(theta.grad.clone() if theta.grad is not None else None)
    SETTINGS.append({"first_order": first_order, "clip": clip, "rates": rates, "optimizer": optimizer})
    for _ in range(steps):
        if losses is not None:
            losses.append(loss_fn({"phi": phi}, support_batch).detach())
        step = lr * theta * (theta * phi - y)
        phi = phi - (step.detach() if first_order else step)
    return {"phi": phi}


CALLS, SETTINGS = [], []


@pytest.fixture(autouse=True)
def closed_form_inner_loop(monkeypatch):
    monkeypatch.setattr(maml, "inner_loop", toy_inner_loop)
    CALLS.clear()
    SETTINGS.clear()


def toy_tasks(theta, n=len(TASKS)):
    return [({"theta": theta, "y": s}, {"theta": theta, "y": q}) for s, q, _ in TASKS[:n]]


def meta_objective(theta, n=len(TASKS), steps=STEPS):
    """mean over tasks of L_Q(theta, phi_k(theta)), everything written out."""
    return sum(0.5 * ((theta * closed_form(theta, phi_0, s, steps) - q) ** 2).sum()
               for s, q, phi_0 in TASKS[:n]) / n


def run(n=len(TASKS), first_order=False, measure_after=True, steps=STEPS, grad_before=None):
    theta = THETA.clone().requires_grad_(True)
    theta.grad = grad_before.clone() if grad_before is not None else None
    out = maml.meta_step(toy_loss, toy_tasks(theta, n), lambda i: {"phi": TASKS[i][2]}, steps, LR,
                         first_order=first_order, measure_after=measure_after)
    return theta, out


@pytest.mark.parametrize("n", [1, 3])
def test_theta_gets_the_average_meta_gradient(n):
    theta, _ = run(n)
    assert torch.allclose(theta.grad, grad(meta_objective)(THETA, n))


def test_the_gradient_accumulates_into_grad_the_caller_zeroes_it():
    ones = torch.ones(3, dtype=torch.float64)
    theta, _ = run(grad_before=ones)
    assert torch.allclose(theta.grad, ones + grad(meta_objective)(THETA))


def test_first_order_is_passed_to_the_inner_loop():
    theta, _ = run(first_order=True)
    direct = sum(grad(lambda t: 0.5 * ((t * closed_form(THETA, phi_0, s, STEPS) - q) ** 2).sum())(THETA)
                 for s, q, phi_0 in TASKS) / len(TASKS)
    assert torch.allclose(theta.grad, direct)


def test_the_inner_loop_settings_are_passed_on():
    theta = THETA.clone().requires_grad_(True)
    rates = {"phi": torch.tensor(0.1)}
    maml.meta_step(toy_loss, toy_tasks(theta), lambda i: {"phi": TASKS[i][2]}, STEPS, LR, clip=2.0, rates=rates,
                   optimizer="adam")
    assert SETTINGS == [{"first_order": False, "clip": 2.0, "rates": rates, "optimizer": "adam"}] * len(TASKS)


def test_each_task_is_back_propagated_before_the_next_one_starts():
    """Memory: only one task's graph alive at a time. When the inner loop of task i starts, tasks 0 .. i-1
    are already in theta.grad, each divided by the number of tasks."""
    run()
    assert CALLS[0] is None and len(CALLS) == len(TASKS)
    for i in (1, 2):
        assert torch.allclose(CALLS[i], grad(meta_objective)(THETA, i) * i / len(TASKS))


def test_each_tasks_phi_0_is_asked_for_when_the_task_begins():
    """init_fast(i) may set the model up for task i (the `head` extension does): ask for it when task i
    begins, after task i-1 is back-propagated, not for every task up front."""
    theta = THETA.clone().requires_grad_(True)
    asked = []

    def init_fast(i):
        asked.append((i, theta.grad.clone() if theta.grad is not None else None, len(CALLS)))
        return {"phi": TASKS[i][2]}
    maml.meta_step(toy_loss, toy_tasks(theta), init_fast, STEPS, LR)
    assert [(i, calls) for i, _, calls in asked] == [(0, 0), (1, 1), (2, 2)]
    assert asked[0][1] is None and torch.allclose(asked[2][1], grad(meta_objective)(THETA, 2) * 2 / len(TASKS))


def test_the_returned_losses_are_means_over_tasks():
    _, out = run()
    before = sum(toy_loss({"phi": phi_0}, {"theta": THETA, "y": s}) for s, _, phi_0 in TASKS) / 3
    after = sum(toy_loss({"phi": closed_form(THETA, phi_0, s, STEPS)}, {"theta": THETA, "y": s})
                for s, _, phi_0 in TASKS) / 3
    assert set(out) == {"support_loss_before", "support_loss_after", "query_loss"}
    assert all(isinstance(v, float) for v in out.values())
    assert out["support_loss_before"] == pytest.approx(before.item())
    assert out["support_loss_after"] == pytest.approx(after.item())
    assert out["query_loss"] == pytest.approx(meta_objective(THETA).item())
    _, quick = run(measure_after=False)
    assert set(quick) == {"support_loss_before", "query_loss"} and quick["query_loss"] == out["query_loss"]


def test_with_no_inner_step_the_support_loss_before_is_measured_at_phi_0():
    _, out = run(steps=0, measure_after=False)
    before = sum(toy_loss({"phi": phi_0}, {"theta": THETA, "y": s}) for s, _, phi_0 in TASKS) / 3
    assert out["support_loss_before"] == pytest.approx(before.item())


def test_a_shared_leaf_phi_0_gets_the_average_gradient_too():
    """--outer-peft (plain MAML): init_fast returns the same leaf for every task."""
    theta = THETA.clone().requires_grad_(True)
    phi_0 = TASKS[0][2].clone().requires_grad_(True)
    maml.meta_step(toy_loss, toy_tasks(theta), lambda i: {"phi": phi_0}, STEPS, LR)

    def objective(phi):
        return sum(0.5 * ((THETA * closed_form(THETA, phi, s, STEPS) - q) ** 2).sum() for s, q, _ in TASKS) / 3
    assert torch.allclose(phi_0.grad, grad(objective)(TASKS[0][2]))
