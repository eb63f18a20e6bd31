"""Priming on several processes (torchrun): who runs which task, and averaging the meta-gradient.

    torchrun --nproc_per_node 4 meta_pretrain.py --model xlm-roberta-base --tasks-per-step 8

torchrun starts one process per GPU and sets WORLD_SIZE, RANK and LOCAL_RANK. Every process
draws the same global meta-batch from the shared seed and runs its share of it; the
meta-gradients are averaged before every optimizer step, so the processes stay identical
and the run equals a one-process run with the same --tasks-per-step (up to float rounding,
and dropout masks, which each process draws for itself). A plain run is world 1, rank 0, and
touches no torch.distributed call.
"""

import os

import torch
import torch.distributed as dist


def torchrun_world():
    """(world size, rank, local rank) from torchrun's environment; (1, 0, 0) for a plain run."""
    env = os.environ
    return int(env.get("WORLD_SIZE", 1)), int(env.get("RANK", 0)), int(env.get("LOCAL_RANK", 0))


def join_process_group(device, world):
    """Join torchrun's processes: NCCL between GPUs, gloo on the CPU. One process joins nothing."""
    if world == 1:
        return
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")


def wait_for_all(world):
    """A barrier: e.g. the others wait until rank 0 has written a checkpoint."""
    if world > 1:
        dist.barrier()


def my_tasks(n_tasks, world, rank):
    """The indices of this process's tasks in the global meta-batch: rank, rank + world, ..."""
    return range(rank, n_tasks, world)


def average_across_processes(model, metrics, world):
    """Average .grad and the logged losses over the processes (all_reduce SUM / world).

    meta_step and mtl_gradient divide by the number of tasks they ran, so each process holds the
    mean over its share; with equal shares the mean of those means is the global mean."""
    if world == 1:
        return
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    flat = torch.cat([g.reshape(-1) for g in grads])  # one collective, not one per tensor
    dist.all_reduce(flat)
    flat /= world
    for g, mean in zip(grads, flat.split([g.numel() for g in grads])):
        g.copy_(mean.view_as(g))
    names = [k for k in metrics if "loss" in k]
    losses = torch.tensor([metrics[k] for k in names], dtype=torch.float64, device=flat.device)
    dist.all_reduce(losses)
    metrics.update(zip(names, (losses / world).tolist()))


def rng_states(world):
    """Every process's torch RNG state (dropout), gathered for rank 0's resume.pt; a collective."""
    own = {"torch_rng": torch.get_rng_state(),
           "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}
    if world == 1:
        return [own]
    states = [None] * world
    dist.all_gather_object(states, own)
    return states


def leave_process_group():
    """Close torchrun's process group at the end of a run."""
    dist.destroy_process_group()
