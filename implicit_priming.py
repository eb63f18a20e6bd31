"""The implicit inner loop of priming (meta_pretrain.py --inner-loop implicit): its flags and
defaults, its meta-gradient, its meta-validation. The algorithm itself is implicit.py.

    python meta_pretrain.py --inner-loop implicit                         # the defaults below
    python meta_pretrain.py --inner-loop implicit --first-order           # only dL_Q/dtheta at phi_hat, no CG
    python meta_pretrain.py --inner-loop implicit --fresh-every 1         # no warm start: 100 steps every meta-step
    python meta_pretrain.py --inner-loop implicit --cg-damping 1.0        # a damped CG system (implicit.py)
    python meta_pretrain.py --inner-loop implicit --curvature hessian     # the exact Hessian (indefinite: see below)

One meta-step: the inner loop is a fine-tuning of phi (the PEFT tensors and head) on its own
stream of source-language batches, Adam by default as in finetune_peft.py, dropout on, on
G = L_S + (damping/2) ||phi - phi_0||^2. phi_0 is drawn fresh every --fresh-every meta-steps
(--implicit-steps of fine-tuning then); in between, the previous meta-step's fine-tuning
continues (phi and Adam's moments, --implicit-warm-steps each: a warm start as in AmIGO /
stocBiO). Then, dropout off, each task's hypergradient (implicit.hypergradient on its support
and query batch) is averaged into theta's .grad, and meta_pretrain.py's AdamW steps theta.

Logged per meta-step (metrics.jsonl): query_loss and support_loss_after (at phi_hat, dropout
off), fine_tune_loss_first / _last (G on the first and last fine-tuning batch), inner_grad_norm
(||grad_phi G(phi_hat)|| on the support batch: the hypergradient's bias grows with it),
cg_iterations, cg_residual (the largest over tasks), negative_curvature (tasks whose CG met it),
cg_min_curvature, and per task, averaged over the step's tasks: cg_converged_share (tasks whose CG
reached --cg-tol), correction_ratio (||second-order term|| / ||dL_Q/dtheta||) and cosine_to_first_order
(of the hypergradient with dL_Q/dtheta); a warning when CG fails in most tasks; fine_tune_steps,
phi_age (meta-steps served by this phi_0), phi_distance (||phi_hat - phi_0||);
at each evaluation, the inner-loop strength of phi_hat (`implicit_held_out_losses`).
"""

import warnings

import torch

import episodes
import implicit
import maml
from adapters import body_parameters, fresh_peft_tensors
from plumbing.cli import check_at_least, check_positive
from plumbing.pretrained import evaluation_mode

# --------------------------------------------------------------------- defaults -----
# The Gauss-Newton system's defaults, measured on e5-small (RESULTS.md, "The implicit hypergradient, honestly
# second order"): with 5 CG iterations, lambda_cg 1e-3 and 1e-2 never lowered the residual (u = 0), 0.1 left it at
# 0.26-1.0, 1.0 converged in 70% of tasks; 1.0 with 10 iterations converged in every task (5.1 iterations on average).
CG_DAMPING = 1.0
CG_STEPS = 10
# --curvature hessian keeps the settings its committed rows ran with: lambda_cg = --damping, 5 iterations.
HESSIAN_CG_STEPS = 5
# (strength: of phi_hat at the first meta-step, held-out de/es dev, the default fine-tuning as reference; RESULTS.md)
IMPLICIT = {
    "implicit_optimizer": "adam",  # what finetune_peft.py fine-tunes with (AdamW; no weight decay on phi here)
    "implicit_lr": 3e-3,           # 100 steps reach strength 0.84 (1e-3, finetune_peft.py's peak rate: 0.80)
    "implicit_batch_size": 16,     # finetune_peft.py's batch size
    "implicit_steps": 100,         # from a fresh phi_0: strength 0.84 at the first meta-step (50 steps: 0.76);
                                   # 79 s on a 4-5x oversubscribed core, fine-tuning ~1.7 s a step there
    "implicit_warm_steps": 10,     # per carried meta-step: 19 fine-tuning steps per meta-step on average
    "fresh_every": 10,             # theta moves ~0.05% per meta-step (body_change), so a carried phi stays near
                                   # phi*(theta) while 10 more steps refine it; 6 phi_0 draws in 60 meta-steps
    "damping": 1e-3,               # lambda/2 ||phi - phi_0||^2 ~ 0.1 at the distances reached (||.|| 11-18):
                                   # the fine-tuning stays nearly free
    "cg_steps": CG_STEPS,          # (5 with --curvature hessian, as iMAML); each costs about two backwards
    "cg_tol": 1e-2,                # the hypergradient needs no more than the inner solve's own accuracy
    "curvature": "ggn",            # the exact Hessian of L_S in phi is indefinite at phi_hat on e5-small (smallest
                                   # eigenvalue ~ -5): CG stopped at u = 0 in 80 of 80 tasks, i.e. first order.
                                   # The Gauss-Newton matrix is PSD (implicit.py); "hessian" keeps the exact one
    "cg_damping": CG_DAMPING,      # of the Gauss-Newton system (measured: RESULTS.md, the Gauss-Newton curvature)
}


def add_flags(p):
    """The --inner-loop implicit flags. Their parser default is None (unset): an unrolled run records
    them as None, and check_implicit_flags fills in IMPLICIT for an implicit run."""
    when = "(with --inner-loop implicit; default %s)%%(default).0s"  # (argparse's own "default: None" hidden)
    p.add_argument("--implicit-optimizer", choices=sorted(implicit.OPTIMIZERS), default=None,
                   help="optimizer of the inner fine-tuning " + when % IMPLICIT["implicit_optimizer"])
    p.add_argument("--implicit-lr", type=float, default=None,
                   help="learning rate of the inner fine-tuning " + when % IMPLICIT["implicit_lr"])
    p.add_argument("--implicit-batch-size", type=int, default=None,
                   help="sentences per inner fine-tuning batch " + when % IMPLICIT["implicit_batch_size"])
    p.add_argument("--implicit-steps", type=int, default=None,
                   help="inner fine-tuning steps from a freshly drawn phi_0 " + when % IMPLICIT["implicit_steps"])
    p.add_argument("--implicit-warm-steps", type=int, default=None,
                   help="inner fine-tuning steps at a meta-step that continues the previous one's phi "
                        + when % IMPLICIT["implicit_warm_steps"])
    p.add_argument("--fresh-every", type=int, default=None,
                   help="draw a fresh phi_0 every R meta-steps and carry phi (and the optimizer state) between "
                        "them, a warm start; 1: fresh every meta-step " + when % IMPLICIT["fresh_every"])
    p.add_argument("--damping", type=float, default=None,
                   help="lambda of the proximal term (lambda/2)||phi - phi_0||^2 of the inner problem and of the CG "
                        "system; > 0 unless --first-order " + when % IMPLICIT["damping"])
    p.add_argument("--cg-steps", type=int, default=None,
                   help="most conjugate-gradient iterations for the hypergradient "
                        + when % f"{CG_STEPS} with ggn, {HESSIAN_CG_STEPS} with hessian")
    p.add_argument("--cg-tol", type=float, default=None,
                   help="CG stops at this relative residual " + when % IMPLICIT["cg_tol"])
    p.add_argument("--curvature", choices=implicit.CURVATURES, default=None,
                   help="the CG system's matrix: ggn, the generalized Gauss-Newton J^T H_out J "
                        "(positive semi-definite), or hessian, the exact Hessian of the support loss "
                        "(indefinite on a real encoder: CG then stops at u = 0, first order) "
                        + when % IMPLICIT["curvature"])
    p.add_argument("--cg-damping", type=float, default=None,
                   help="lambda of the CG system only, (H + lambda I) u = dL_Q/dphi: a larger one than --damping "
                        "when H + damping I is indefinite (CG then stops at once; see cg_min_curvature in "
                        "metrics.jsonl) " + when % f"{CG_DAMPING} with ggn, --damping with hessian")


def check_implicit_flags(args, world, unrolled_defaults):
    """--inner-loop: refuse the other loop's flags, then fill in the implicit defaults.
    unrolled_defaults: meta_pretrain's {"inner_steps": .., "inner_lr": ..} (a changed one is refused)."""
    given = [f"--{f.replace('_', '-')}" for f in IMPLICIT if getattr(args, f) is not None]
    if args.inner_loop == "unrolled":
        if given:
            raise ValueError(f"{given[0]} is an --inner-loop implicit option: add --inner-loop implicit, "
                             f"or leave it out")
        return
    if args.method == "mtl":
        raise ValueError("--inner-loop implicit is a MAML option; it has no meaning with --method mtl")
    for flag, bad in [("--inner-steps", args.inner_steps != unrolled_defaults["inner_steps"]),
                      ("--inner-lr", args.inner_lr != unrolled_defaults["inner_lr"]),
                      ("--inner-clip", args.inner_clip is not None), ("--meta-sgd", args.meta_sgd),
                      ("--outer-peft", args.outer_peft), ("--inner-params all", args.inner_params == "all")]:
        if bad:
            raise ValueError(f"{flag} is an --inner-loop unrolled option; with --inner-loop implicit leave it out "
                             f"(the inner fine-tuning takes the --implicit-* flags)")
    if args.first_order and any(v is not None for v in (args.cg_steps, args.cg_tol, args.cg_damping, args.curvature)):
        raise ValueError("--cg-steps / --cg-tol / --cg-damping / --curvature have no meaning with --first-order (no "
                         "linear system is solved): leave them out")
    if world > 1:
        raise ValueError("--inner-loop implicit runs in one process only (its fine-tuning is not shared across "
                         "torchrun processes)")
    for flag, default in IMPLICIT.items():  # (first order solves no linear system: the CG flags stay None)
        if getattr(args, flag) is None and not (args.first_order and (flag.startswith("cg_") or flag == "curvature")):
            setattr(args, flag, default)
    if args.curvature == "hessian":   # the exact formula (*): the system's lambda is the inner problem's
        args.cg_damping = args.damping if "--cg-damping" not in given else args.cg_damping
        args.cg_steps = HESSIAN_CG_STEPS if "--cg-steps" not in given else args.cg_steps
    check_at_least(args, 1, "implicit_batch_size", "implicit_steps", "implicit_warm_steps", "fresh_every", "cg_steps")
    check_positive(args, "implicit_lr")
    if "--implicit-warm-steps" in given and args.fresh_every == 1:
        raise ValueError("--implicit-warm-steps needs --fresh-every above 1 (with 1 every meta-step starts from a "
                         "fresh phi_0)")
    if not (args.damping > 0 or (args.first_order and args.damping == 0)):
        raise ValueError(f"--damping must be positive (got {args.damping}): it keeps the CG system positive "
                         f"definite; 0 is allowed with --first-order only")
    if not args.first_order:
        check_positive(args, "cg_damping")
        if not 0 <= args.cg_tol < 1:
            raise ValueError(f"--cg-tol must be in [0, 1) (got {args.cg_tol})")


def meta_gradient(model, loss_fn, tasks, source, carried, phi_rng, args):
    """meta_pretrain.py's steps 2-4 with --inner-loop implicit (implicit.py). phi_0: drawn fresh every --fresh-every
    meta-steps; in between, the fine-tuning `carried` from the previous meta-step continues (phi
    and the optimizer state: a warm start, as in AmIGO / stocBiO, so that a meta-step needs only
    --implicit-warm-steps). The fine-tuning runs on its own source-language stream with dropout on,
    as downstream; then, dropout off, each task's hypergradient (on its support and query batch)
    is averaged into theta's .grad. One fine-tuning serves every task of the meta-step: the inner
    problem, fine-tuning on the source language, is the same whatever the task's query language."""
    if carried.get("age", 0) % args.fresh_every == 0:
        phi_0 = {n: t.detach() for n, t in fresh_peft_tensors(model, phi_rng).items()}
        carried.update(phi_0=phi_0, phi=phi_0, optimizer=None, age=0)
    steps = args.implicit_steps if carried["age"] == 0 else args.implicit_warm_steps
    losses = []
    phi_hat, state = implicit.inner_fine_tune(loss_fn, carried["phi_0"], source.fine_tune_batches(),
                                              args.implicit_optimizer, steps, args.implicit_lr, args.damping,
                                              start=carried["phi"], state=carried["optimizer"], losses=losses)
    carried.update(phi=phi_hat, optimizer=state, age=carried["age"] + 1)
    theta = [p for p in body_parameters(model).values() if p.requires_grad]
    logits_fn = maml.functional_logits(model)
    infos = []
    with evaluation_mode(model):   # CG needs one fixed linear operator: no dropout masks
        for support, query in tasks:
            grads, info = implicit.hypergradient(loss_fn, theta, phi_hat, carried["phi_0"], support, query,
                                                 args.damping, args.cg_steps, args.cg_tol, first_order=args.first_order,
                                                 cg_damping=args.cg_damping, curvature=args.curvature or "hessian",
                                                 logits_fn=logits_fn)
            for p, g in zip(theta, grads):
                if g is not None:
                    p.grad = g / len(tasks) if p.grad is None else p.grad + g / len(tasks)
            infos.append(info)
    return {"query_loss": mean(infos, "query_loss"), "support_loss_after": mean(infos, "support_loss"),
            "fine_tune_loss_first": losses[0].item(), "fine_tune_loss_last": losses[-1].item(),
            "inner_grad_norm": mean(infos, "inner_grad_norm"), "cg_iterations": mean(infos, "cg_iterations"),
            "cg_residual": max(i["cg_residual"] for i in infos),
            "negative_curvature": sum(i["negative_curvature"] for i in infos),
            **({} if args.first_order else correction_metrics(infos)),
            "fine_tune_steps": steps, "phi_age": carried["age"],
            "phi_distance": phi_distance(phi_hat, carried["phi_0"])}


def mean(infos, key):
    return sum(i[key] for i in infos) / len(infos)


def correction_metrics(infos):
    """Per-task accounting of the second-order term, averaged over the meta-step's tasks; a warning
    when CG failed in most of them (the hypergradient is then CG's best iterate, not the solution)."""
    converged = mean(infos, "cg_converged")
    if converged < 0.5:
        warnings.warn(f"CG reached --cg-tol in {converged:.0%} of this meta-step's tasks: raise --cg-damping or "
                      f"--cg-steps (metrics.jsonl: cg_converged_share, cg_residual)", stacklevel=3)
    return {"cg_min_curvature": min(i["cg_min_curvature"] for i in infos), "cg_converged_share": converged,
            "correction_ratio": sum(i["correction_norm"] / max(i["direct_norm"], 1e-30) for i in infos) / len(infos),
            "cosine_to_first_order": mean(infos, "cosine_to_first_order")}


def phi_distance(phi, phi_0):
    """||phi - phi_0||: how far the fine-tuning went, against which --damping pulls (lambda/2 times its square)."""
    return torch.sqrt(sum(((phi[n] - phi_0[n]) ** 2).sum() for n in phi)).item()


def implicit_held_out_losses(model, held_out, loss_fn, carried, reference_loss):
    """Meta-validation of the implicit loop (dropout off): the held-out query loss of the phi_hat
    the last hypergradient used (theta has since taken its outer step) and of the fresh phi_0 it was
    fine-tuned from, and so the inner-loop strength of phi_hat (episodes.adapted_losses)."""
    with evaluation_mode(model):
        return episodes.adapted_losses(held_out, loss_fn, carried["phi_0"], carried["phi"], reference_loss)
