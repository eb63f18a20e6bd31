"""Assignment `phi_start` (course/phi_start.md): where the inner loop starts. episodes.peft_start (a fresh
draw of the PEFT tensors and head per task, or with --outer-peft the model's own) and
episodes.phi_0_of_tasks (every task of the meta-batch drawn in order, whichever process runs it).

Expected values: BERT's head init (weight ~ N(0, initializer_range), bias 0), the model's own
Parameters, and the draws of a generator seeded alike, counted in tasks.
"""

import pytest
import torch

import adapters
import episodes
import peft_config
from tests.conftest import tiny_classifier


@pytest.fixture
def model():
    model = tiny_classifier("bert", "eager", seed=0, hidden=64, num_labels=7)
    return adapters.add_peft(model, peft_config.PeftConfig("adapter"), seed=0)


def generator(seed=0):
    return torch.Generator().manual_seed(seed)


def same(a, b):
    return list(a) == list(b) and all(torch.equal(a[n], b[n]) for n in a)


def snapshot(model):
    return {n: t.detach().clone() for n, t in model.state_dict().items()}


def test_a_fresh_draw_of_the_peft_tensors_and_the_head(model):
    before = snapshot(model)
    own = adapters.peft_parameters(model)
    phi = episodes.peft_start(model, generator(1), outer_peft=False)   # (add_peft drew with seed 0)
    assert list(phi) == list(own)                                   # PEFT tensors and head, in the model's order
    assert all(phi[n] is not p and phi[n].shape == p.shape and phi[n].dtype == p.dtype for n, p in own.items())
    assert same(snapshot(model), before)                            # the model is not written to
    head_weight = phi["classifier.weight"]
    assert torch.equal(phi["classifier.bias"], torch.zeros(7))
    assert head_weight.std().item() == pytest.approx(model.config.initializer_range, rel=0.15)
    assert not torch.equal(head_weight, own["classifier.weight"])   # not the model's initial head


def test_the_draw_is_the_generators_and_new_at_every_call(model):
    g = generator()
    first, second = episodes.peft_start(model, g, False), episodes.peft_start(model, g, False)
    assert not same(first, second)
    assert same(episodes.peft_start(model, generator(), False), first)   # a generator seeded alike: the same draw
    assert same(first, adapters.fresh_peft_tensors(model, generator()))  # as downstream fine-tuning draws it
    state = torch.get_rng_state()
    episodes.peft_start(model, generator(), False)
    assert torch.equal(torch.get_rng_state(), state)                     # the global RNG is not used


def test_outer_peft_starts_from_the_models_own_parameters(model):
    """Plain MAML: phi_0 is the model's own Parameters (leaves the outer loop updates), for every task."""
    own = adapters.peft_parameters(model)
    for _ in range(2):
        phi = episodes.peft_start(model, generator(), outer_peft=True)
        assert list(phi) == list(own) and all(phi[n] is p for n, p in own.items())


@pytest.mark.parametrize("world, rank", [(1, 0), (2, 0), (2, 1), (3, 2)])
def test_every_task_is_drawn_in_order_whichever_process_runs_it(model, world, rank):
    n_tasks = 4
    mine = list(range(rank, n_tasks, world))
    g, alone = generator(), generator()
    phi_0 = episodes.phi_0_of_tasks(model, "peft", False, g, n_tasks, mine)
    paper = [episodes.peft_start(model, alone, False) for _ in range(n_tasks)]   # task j: the j-th draw
    assert all(same(phi_0(i), paper[j]) for i, j in enumerate(mine))
    assert same(episodes.peft_start(model, g, False), episodes.peft_start(model, alone, False))  # n_tasks draws made


def test_the_choice_of_inner_params_is_the_registry(model, monkeypatch):
    drawn = []

    def counting(model, generator, outer_peft):
        drawn.append(len(drawn))
        return {"phi": torch.tensor(float(drawn[-1]))}
    monkeypatch.setitem(episodes.INNER_PARAMS, "counting", counting)
    phi_0 = episodes.phi_0_of_tasks(model, "counting", False, generator(), 5, [1, 4])
    assert drawn == [0, 1, 2, 3, 4]                                   # all drawn at once, in order
    assert [phi_0(i)["phi"].item() for i in range(2)] == [1.0, 4.0]
    body = {n for n, p in adapters.body_parameters(model).items() if p.requires_grad}
    every = episodes.phi_0_of_tasks(model, "all", False, generator(), 1, [0])(0)
    assert set(every) == body | set(adapters.peft_parameters(model))


def test_a_start_that_returns_a_function_is_called_when_its_task_begins(model, monkeypatch):
    """An entry may need to set the model up for its task (the `head` extension does): it returns a
    function, called when that task's inner loop asks for phi_0, and only for this process's tasks."""
    begun = []

    def lazy(model, generator, outer_peft):
        task = torch.randint(1000, (1,), generator=generator).item()

        def begin():
            begun.append(task)
            return {"phi": torch.tensor(float(task))}
        return begin
    monkeypatch.setitem(episodes.INNER_PARAMS, "lazy", lazy)
    g, alone = generator(), generator()
    phi_0 = episodes.phi_0_of_tasks(model, "lazy", False, g, 4, [1, 3])
    tasks = [torch.randint(1000, (1,), generator=alone).item() for _ in range(4)]
    assert begun == []                                                # nothing begun before its task
    assert phi_0(0)["phi"].item() == tasks[1] and begun == [tasks[1]]
    assert phi_0(1)["phi"].item() == tasks[3] and begun == [tasks[1], tasks[3]]
