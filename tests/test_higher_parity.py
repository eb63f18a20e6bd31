"""Our meta-gradient against the `higher` library's (Grefenstette et al. 2019), the check that
experiments/benchmarks/bench_maml.py times. Skipped where higher is not installed (pip install higher==0.2.1;
a benchmark-only dependency, not in requirements.txt)."""
import pytest
import torch
from conftest import tiny_classifier

import adapters
import maml

higher = pytest.importorskip("higher", reason="higher is not installed (pip install higher==0.2.1)")


def copy_hooks(model, fmodel):
    """higher.patch drops forward hooks, and our adapters act through hooks: copy them over."""
    for original, patched in zip(model.modules(), fmodel.modules()):
        patched._forward_hooks.update(original._forward_hooks)
        patched._forward_pre_hooks.update(original._forward_pre_hooks)


@pytest.mark.parametrize("placement", ["houlsby", "pfeiffer"])
def test_second_order_meta_gradient_equals_highers(placement):
    model = tiny_classifier("bert", dtype=torch.float64, dropout=0.0)
    adapters.add_peft(model, adapters.PeftConfig("adapter", placement=placement, adapter_init="bert"), seed=0)
    g = torch.Generator().manual_seed(1)
    support, query = ({"input_ids": torch.randint(1, 120, (3, 8), generator=g),
                       "labels": torch.randint(0, 7, (3, 8), generator=g)} for _ in range(2))
    phi = {n: t.double() for n, t in adapters.fresh_peft_tensors(model, torch.Generator().manual_seed(2)).items()}
    body = {n: p for n, p in adapters.body_parameters(model).items()}
    for p in body.values():
        p.requires_grad_(True)
    steps, lr = 2, 0.3

    maml.meta_step(maml.functional_loss(model), [(support, query)], lambda i: {n: t.detach().clone().requires_grad_()
                                                                               for n, t in phi.items()}, steps, lr)
    ours = {n: p.grad.clone() for n, p in body.items()}

    model.zero_grad(set_to_none=True)
    peft = adapters.peft_parameters(model)
    with torch.no_grad():
        for n, p in peft.items():
            p.copy_(phi[n])
            p.requires_grad_(True)
    inner = torch.optim.SGD(peft.values(), lr=lr)
    with higher.innerloop_ctx(model, inner, copy_initial_weights=False) as (fmodel, diffopt):
        copy_hooks(model, fmodel)
        for _ in range(steps):
            diffopt.step(fmodel(**support).loss)
        fmodel(**query).loss.backward()
    for n, p in body.items():
        assert torch.allclose(p.grad, ours[n], rtol=1e-7, atol=1e-10), n
