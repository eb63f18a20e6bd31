"""Tests for maml.py on tiny random BERT token classifiers (learn2learn-style checks).

Fast tensors (phi) here: the NER head plus layer 0's attention output projection (below layer 1's
attention, so the inner gradient goes through an attention backward, as with adapters); the
rest of the model is the body (theta). No dependency on adapters.py.
"""

from collections import OrderedDict

import pytest
import torch
from conftest import tiny_classifier

import maml  # the project root is on sys.path via tests/conftest.py

FAST_NAMES = ["classifier.weight", "classifier.bias",
              "bert.encoder.layer.0.attention.output.dense.weight",
              "bert.encoder.layer.0.attention.output.dense.bias"]
BODY_NAME = "bert.encoder.layer.0.attention.self.query.weight"


def tiny_model(attn="eager", dtype=torch.float32, hidden=16, seed=0):
    return tiny_classifier("bert", attn, seed=seed, dtype=dtype, hidden=hidden, heads=2, dropout=0.0)


def random_batch(seed, batch=3, length=9):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 120, (batch, length), generator=g)
    mask = torch.ones(batch, length, dtype=torch.long)
    mask[0, length - 3:] = 0  # one padded sentence
    labels = torch.randint(0, 7, (batch, length), generator=g)
    labels[:, 0] = -100  # [CLS] and padding are ignored, as in NER
    labels[mask == 0] = -100
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def fresh_fast(model, seed):
    """New phi drawn independently of the model's own values (like a fresh PEFT init)."""
    g = torch.Generator().manual_seed(1000 + seed)
    params = dict(model.named_parameters())
    return OrderedDict((n, 0.3 * torch.randn(params[n].shape, generator=g, dtype=params[n].dtype))
                       for n in FAST_NAMES)


def body(model):
    return dict(model.named_parameters())[BODY_NAME]


def adapted_query_loss(model, fast, support, query, steps, lr, first_order=False):
    loss_fn = maml.functional_loss(model)
    adapted = maml.inner_loop(loss_fn, fast, support, steps, lr, first_order=first_order)
    return loss_fn(adapted, query)


def meta_gradient(model, fast, support, query, steps, lr, first_order=False):
    loss = adapted_query_loss(model, fast, support, query, steps, lr, first_order)
    return torch.autograd.grad(loss, body(model))[0]


def test_second_order_matches_finite_differences():
    model = tiny_model(dtype=torch.float64)
    support, query = random_batch(1), random_batch(2)
    fast = {n: t.double() for n, t in fresh_fast(model, 0).items()}
    steps, lr = 2, 0.5
    grad = meta_gradient(model, fast, support, query, steps, lr)

    theta, eps = body(model), 1e-6
    entries = [(0, 0), (3, 7), (15, 2), (8, 8)]
    with torch.no_grad():
        original = theta.clone()
    for i, j in entries:
        values = []
        for sign in (+1, -1):
            with torch.no_grad():
                theta.copy_(original)
                theta[i, j] += sign * eps
            values.append(adapted_query_loss(model, fast, support, query, steps, lr).item())
        fd = (values[0] - values[1]) / (2 * eps)
        assert abs(grad[i, j].item() - fd) <= 1e-4 * abs(fd) + 1e-10, (i, j, grad[i, j].item(), fd)
    with torch.no_grad():
        theta.copy_(original)
    # The second-order term is not negligible here, so this test can tell the two apart.
    first = meta_gradient(model, fast, support, query, steps, lr, first_order=True)
    assert not torch.allclose(first, grad, rtol=1e-3)


def test_first_order_equals_gradient_at_adapted_tensors():
    model = tiny_model()
    support, query = random_batch(1), random_batch(2)
    fast, loss_fn = fresh_fast(model, 0), maml.functional_loss(model)
    grad = meta_gradient(model, fast, support, query, steps=3, lr=0.5, first_order=True)

    adapted = maml.inner_loop(loss_fn, fast, support, 3, 0.5)  # second order, then detached
    frozen = {n: t.detach() for n, t in adapted.items()}
    expected = torch.autograd.grad(loss_fn(frozen, query), body(model))[0]
    torch.testing.assert_close(grad, expected)


def test_inner_loop_equals_hand_unrolled_loop():
    model = tiny_model()
    support, query = random_batch(1), random_batch(2)
    loss_fn, lr = maml.functional_loss(model), 0.3
    adapted = maml.inner_loop(loss_fn, fresh_fast(model, 0), support, steps=3, lr=lr)

    w = {n: t.requires_grad_() for n, t in fresh_fast(model, 0).items()}
    for _ in range(3):
        g = torch.autograd.grad(loss_fn(w, support), list(w.values()), create_graph=True)
        w = {n: t - lr * gi for (n, t), gi in zip(w.items(), g)}
    for n in FAST_NAMES:
        torch.testing.assert_close(adapted[n], w[n], rtol=0, atol=0)
    grad_a = torch.autograd.grad(loss_fn(adapted, query), body(model))[0]
    grad_w = torch.autograd.grad(loss_fn(w, query), body(model))[0]
    torch.testing.assert_close(grad_a, grad_w, rtol=0, atol=0)


def test_inner_loop_lowers_support_loss_and_leaves_model_unchanged():
    model = tiny_model()
    support = random_batch(1)
    loss_fn = maml.functional_loss(model)
    own = dict(model.named_parameters())
    fast = {n: own[n] for n in FAST_NAMES}  # the model's own Parameters as phi_0
    before = {n: t.detach().clone() for n, t in model.state_dict().items()}
    losses = []
    adapted = maml.inner_loop(loss_fn, fast, support, steps=5, lr=0.5, losses=losses)
    assert len(losses) == 5
    assert loss_fn(adapted, support).item() < losses[0].item()
    for n, t in model.state_dict().items():
        assert torch.equal(t, before[n]), n
    with pytest.raises(KeyError):
        loss_fn({"classifier.weigth": own["classifier.weight"]}, support)


@pytest.mark.parametrize("first_order", [False, True])
def test_meta_step_averages_per_task_meta_gradients(first_order):
    model = tiny_model()
    loss_fn = maml.functional_loss(model)
    tasks = [(random_batch(10 + i), random_batch(20 + i)) for i in range(3)]

    def init(i):
        return fresh_fast(model, i)
    per_task = [meta_gradient(model, init(i), s, q, 2, 0.5, first_order)
                for i, (s, q) in enumerate(tasks)]
    model.zero_grad(set_to_none=True)
    metrics = maml.meta_step(loss_fn, tasks, init, steps=2, lr=0.5, first_order=first_order)
    torch.testing.assert_close(body(model).grad, torch.stack(per_task).mean(0))
    assert metrics["support_loss_after"] < metrics["support_loss_before"]
    assert set(metrics) == {"support_loss_before", "support_loss_after", "query_loss"}


def second_order_by_hand(model, support, query):
    """Second-order MAML without maml.inner_loop (so without its attention switch)."""
    loss_fn = maml.functional_loss(model)
    w = {n: t.requires_grad_() for n, t in fresh_fast(model, 0).items()}
    g = torch.autograd.grad(loss_fn(w, support), list(w.values()), create_graph=True)
    w = {n: t - 0.5 * gi for (n, t), gi in zip(w.items(), g)}
    return torch.autograd.grad(loss_fn(w, query), body(model))[0]


@pytest.mark.parametrize("mode", ["eval", "train"])
def test_second_order_with_sdpa_attention(mode):
    sdpa, eager = tiny_model(attn="sdpa"), tiny_model(attn="eager")  # same seed, same weights
    getattr(sdpa, mode)(), getattr(eager, mode)()
    support, query = random_batch(1), random_batch(2)
    # Measured (torch 2.13, CPU): the fused SDPA kernel has no double backward.
    with pytest.raises(RuntimeError, match="derivative for .*scaled_dot_product"):
        second_order_by_hand(sdpa, support, query)
    with maml.double_backward_attention():
        by_hand = second_order_by_hand(sdpa, support, query)
    reference = second_order_by_hand(eager, support, query)
    torch.testing.assert_close(by_hand, reference, rtol=1e-4, atol=1e-7)
    # inner_loop enters the context itself, so plain calls work with sdpa too.
    torch.testing.assert_close(meta_gradient(sdpa, fresh_fast(sdpa, 0), support, query, 1, 0.5),
                               reference, rtol=1e-4, atol=1e-7)


def test_clip_bounds_the_inner_step():
    model = tiny_model()
    support, loss_fn = random_batch(1), maml.functional_loss(model)
    fast, lr, clip = fresh_fast(model, 0), 0.5, 0.01
    adapted = maml.inner_loop(loss_fn, fast, support, steps=1, lr=lr, clip=clip)
    step = torch.linalg.vector_norm(torch.cat([(adapted[n] - fast[n]).flatten() for n in fast]))
    assert step.item() <= lr * clip * (1 + 1e-5)
    assert step.item() > 0.5 * lr * clip  # the raw gradient is larger, so it was clipped
    adapted.popitem()[1].sum().backward()  # clipping stays differentiable
    assert body(model).grad is not None


@pytest.mark.parametrize("first_order", [False, True])
def test_meta_sgd_learning_rates_receive_gradients(first_order):
    model = tiny_model()
    loss_fn = maml.functional_loss(model)
    rates = {n: torch.tensor(0.3, requires_grad=True) for n in FAST_NAMES}
    tasks = [(random_batch(1), random_batch(2))]
    maml.meta_step(loss_fn, tasks, lambda i: fresh_fast(model, i), steps=2, lr=99.0,
                   first_order=first_order, rates=rates)
    for n in FAST_NAMES:
        assert rates[n].grad is not None and rates[n].grad.abs().item() > 0, n
    # rates replaced lr: a step with lr=99 would have blown the loss up.
    same = maml.inner_loop(loss_fn, fresh_fast(model, 0), tasks[0][0], 1, 0.3)
    other = maml.inner_loop(loss_fn, fresh_fast(model, 0), tasks[0][0], 1, 99.0, rates=rates)
    torch.testing.assert_close(same["classifier.weight"], other["classifier.weight"])


def test_outer_update_of_initial_phi():
    model = tiny_model()
    loss_fn = maml.functional_loss(model)
    own = dict(model.named_parameters())
    tasks = [(random_batch(1), random_batch(2)), (random_batch(3), random_batch(4))]

    maml.meta_step(loss_fn, tasks, lambda i: {n: own[n] for n in FAST_NAMES}, steps=2, lr=0.5)
    for n in FAST_NAMES:
        assert own[n].grad is not None and own[n].grad.abs().sum() > 0, n
    assert own[BODY_NAME].grad is not None

    model.zero_grad(set_to_none=True)
    before = {n: own[n].detach().clone() for n in FAST_NAMES}
    maml.meta_step(loss_fn, tasks, lambda i: fresh_fast(model, i), steps=2, lr=0.5)
    for n in FAST_NAMES:
        assert own[n].grad is None, n
        assert torch.equal(own[n], before[n]), n
    assert own[BODY_NAME].grad is not None


def test_bf16_autocast_meta_gradient_is_close_to_fp32():
    """--precision bf16: the second-order meta-gradient of every body tensor, under CPU autocast."""
    from plumbing.pretrained import precision_context
    model = tiny_model(hidden=32)
    support, query = random_batch(1, batch=4, length=12), random_batch(2, batch=4, length=12)
    body_params = [p for n, p in model.named_parameters() if n not in FAST_NAMES]
    grads = {}
    for precision in ("fp32", "bf16"):
        with precision_context("cpu", precision):
            loss = adapted_query_loss(model, fresh_fast(model, 0), support, query, steps=2, lr=0.5)
        grads[precision] = torch.cat([g.flatten() for g in torch.autograd.grad(loss, body_params)])
    cosine = torch.nn.functional.cosine_similarity(grads["fp32"], grads["bf16"], dim=0)
    assert cosine >= 0.99 and not torch.equal(grads["fp32"], grads["bf16"])  # bf16 really ran


def test_meta_step_without_the_after_forward_gives_the_same_gradient():
    model = tiny_model()
    support, query = random_batch(1), random_batch(2)
    loss_fn = maml.functional_loss(model)
    grads = []
    for measure_after in (True, False):
        model.zero_grad(set_to_none=True)
        out = maml.meta_step(loss_fn, [(support, query)], lambda i: fresh_fast(model, 0), 2, 0.5,
                             measure_after=measure_after)
        assert ("support_loss_after" in out) is measure_after
        grads.append(body(model).grad.clone())
    assert torch.equal(grads[0], grads[1])


def test_the_example_at_the_top_of_maml_runs():
    import textwrap
    doc = maml.__doc__
    example = doc[doc.index("Example"):].split("\n\n")[1]
    space = {}
    exec(textwrap.dedent(example), space)
    assert space["w"].grad is not None and space["w"].grad.abs().sum() > 0
    assert space["losses"]["support_loss_after"] < space["losses"]["support_loss_before"]
