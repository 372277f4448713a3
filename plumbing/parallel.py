"""
Data parallelism with torchrun: the same script runs in N processes (one per GPU, or several on a
CPU), each takes every N-th batch of the work, and the results are shared in batch order, so the N
processes together produce what one process produces alone.

    torchrun --nproc-per-node 8 train_value.py --device cuda ...       # the 8 GPUs of one node
    # two nodes (K = 0 and 1), one shared disk:
    torchrun --nnodes 2 --nproc-per-node 8 --node-rank K --rdzv-backend c10d \\
        --rdzv-endpoint HOST:29500 train_value.py --device cuda ...

Why whole batches, and not prompts, are dealt out: a batch that runs in another process is the same
batch (the same rows, the same padding), so its numbers are the same to the last bit on the same
kind of device and thread count; and every response draws its random numbers from its own seed
(generate.row_seeds), never from its batch's or its process's. Without torchrun (no WORLD_SIZE)
every function here is the one-process identity.
"""

import atexit
import math
import os
import sys

import torch
import torch.distributed as dist


def start(device):
    """Join torchrun's process group when torchrun launched the script (WORLD_SIZE > 1): gloo
    between processes on CPUs, nccl between GPUs, each process on the GPU of its LOCAL_RANK. Only
    rank 0 prints; every rank reports its errors. Returns the device this process computes on."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or dist.is_initialized():
        return device
    on_gpu = device is not None and torch.device(device).type == "cuda"  # None: the default, cpu
    if on_gpu:
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        if local_rank >= torch.cuda.device_count():
            raise ValueError(f"torchrun started process {local_rank} of this node, but torch sees "
                             f"{torch.cuda.device_count()} CUDA devices here; use --nproc-per-node "
                             f"{torch.cuda.device_count()} (one process per GPU)")
        device = f"cuda:{local_rank}"  # whatever --device named: one GPU per process
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if on_gpu else "gloo")
    atexit.register(dist.destroy_process_group)
    if dist.get_rank() != 0:
        sys.stdout = open(os.devnull, "w")  # one copy of the logs and tables, rank 0's
    return device


def rank():
    return dist.get_rank() if dist.is_initialized() else 0


def world_size():
    return dist.get_world_size() if dist.is_initialized() else 1


def is_main():
    """Rank 0: the process that writes the outputs every process computed together."""
    return rank() == 0


def barrier():
    """Wait until every process gets here (e.g. every rollout shard is on disk before training reads
    them)."""
    if dist.is_initialized():
        dist.barrier()


def my_share(n):
    """Which of the items 0 ... n-1 this process takes: every world_size()-th, from its rank on."""
    return range(rank(), n, world_size())


def my_batches(n_jobs, batch_size):
    """The batches [start, end) of n_jobs jobs that this process runs."""
    return [(b * batch_size,
             min((b + 1) * batch_size, n_jobs)) for b in my_share(math.ceil(n_jobs / batch_size))]


def map_batches(n_jobs, batch_size, run):
    """run(start, end) on this process's batches; returns the results of every batch, in batch
    order, to every process. The results travel pickled: keep them small and on the CPU (lists,
    floats, strings)."""
    mine = [run(start, end) for start, end in my_batches(n_jobs, batch_size)]
    if world_size() == 1:
        return mine
    everyone = [None] * world_size()
    dist.all_gather_object(everyone, mine)
    n = world_size()
    return [everyone[b % n][b // n] for b in range(math.ceil(n_jobs / batch_size))]


def total(x):
    """The sum of a number over every process."""
    if not dist.is_initialized():
        return x
    summed = torch.tensor([float(x)], dtype=torch.float64)
    if dist.get_backend() == "nccl":
        summed = summed.cuda()
    dist.all_reduce(summed)
    return summed.item()


def split_loss(module, loss_fn, states, mask, rewards, terms):
    """loss_fn(module, states, mask, rewards) on this process's rows of the batch (every N-th),
    weighted by their share of the batch's terms(mask) (what the loss averages over) times N: the
    mean of the N processes' losses, and of their gradients (what DistributedDataParallel averages),
    is the loss of the whole batch. In one process, the loss of the whole batch."""
    part = slice(rank(), None, world_size())
    share = terms(mask[part]) / terms(mask)
    # no row of this (short, last) batch here: the process still joins the average, with zeros
    if not share:
        return module(states[:1]).sum() * 0
    return loss_fn(module, states[part], mask[part], rewards[part]) * (share * world_size())


def data_parallel(module):
    """The module wrapped in DistributedDataParallel when there are several processes: backward()
    then averages the gradients over the processes before the optimizer steps, so every copy stays
    the same."""
    if world_size() == 1:
        return module
    device = next(module.parameters()).device
    ids = [device] if device.type == "cuda" else None
    return torch.nn.parallel.DistributedDataParallel(module, device_ids=ids)
