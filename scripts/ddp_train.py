"""Train a small network with gpuconv's PyTorch layers under DistributedDataParallel.

    RGB 16 x 16 -> Conv2d 3 -> 8 (3 x 3, same) -> ReLU
                -> LocallyConnected2d 8 -> 8 (3 x 3, stride 2: a kernel at each of 8 x 8
                   positions) -> ReLU -> flatten -> Linear 512 -> 10

on synthetic data (a fixed random batch per step, split evenly across the processes).

On one machine's CPUs, with ``gloo`` (the script starts the processes itself, talking over
127.0.0.1 only)::

    python scripts/ddp_train.py --nproc 2 --steps 20

On GPUs, with ``nccl``, one process per GPU started by ``torchrun``::

    torchrun --standalone --nproc-per-node 4 scripts/ddp_train.py --backend nccl --steps 20

Options: ``--batch`` (global batch, divisible by the number of processes), ``--lr``,
``--dtype float32|float64``, ``--threads`` (CPU threads per process, for PyTorch and
Numba; default 1), ``--timeout`` (seconds the processes wait for each other), ``--save PATH``
(rank 0 writes the trained ``state_dict`` there).
"""

from __future__ import annotations

import argparse
import datetime
import os
import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel

import gpuconv.torch as gt
from gpuconv.appkit import set_threads

INPUT = (3, 16, 16)
CLASSES = 10


def build_model(dtype=torch.float32, seed=0):
    """The network, initialised from ``seed`` (every process builds the same one)."""
    torch.manual_seed(seed)
    return nn.Sequential(
        gt.Conv2d(3, 8, 3, padding=1),
        nn.ReLU(),
        gt.LocallyConnected2d(8, 8, 3, input_size=INPUT[1:], stride=2, padding=1),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(8 * 8 * 8, CLASSES),
    ).to(dtype)


def global_batch(step, batch, dtype=torch.float32):
    """The step's whole batch ``(x, labels)``, the same in every process."""
    generator = torch.Generator().manual_seed(1000 + step)
    x = torch.randn((batch,) + INPUT, generator=generator, dtype=dtype)
    labels = torch.randint(0, CLASSES, (batch,), generator=generator)
    return x, labels


def train_step(model, optimizer, x, labels):
    """One SGD step on the mean cross-entropy of ``(x, labels)``; returns the loss."""
    optimizer.zero_grad()
    loss = F.cross_entropy(model(x), labels)
    loss.backward()
    optimizer.step()
    return loss.detach()


def run(rank, world_size, args, init_method):
    """One process: join the group, train ``args.steps`` steps on its share of each batch."""
    dtype = getattr(torch, args.dtype)
    # processes this script spawns itself share one machine's CPUs (gloo); under torchrun
    # (LOCAL_RANK set) each takes a GPU where there are GPUs
    spawned = "LOCAL_RANK" not in os.environ
    backend = args.backend or ("nccl" if torch.cuda.is_available() and not spawned else "gloo")
    local_ranks = int(os.environ.get("LOCAL_WORLD_SIZE", world_size))
    if backend == "nccl" and local_ranks > torch.cuda.device_count():
        raise SystemExit(f"nccl needs a GPU per process: {local_ranks} processes on this "
                         f"machine, {torch.cuda.device_count()} GPUs (use --backend gloo)")
    if backend == "nccl":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", rank)))
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
        set_threads(args.threads, torch)
    dist.init_process_group(backend, init_method=init_method, rank=rank, world_size=world_size,
                            timeout=datetime.timedelta(seconds=args.timeout))
    try:
        model = build_model(dtype).to(device)
        ddp = DistributedDataParallel(model,
                                      device_ids=[device.index] if device.type == "cuda" else None)
        optimizer = torch.optim.SGD(ddp.parameters(), lr=args.lr)
        share = args.batch // world_size
        for step in range(args.steps):
            x, labels = global_batch(step, args.batch, dtype)
            mine = slice(rank * share, (rank + 1) * share)
            loss = train_step(ddp, optimizer, x[mine].to(device), labels[mine].to(device))
            if rank == 0:
                print(f"step {step}: loss {loss.item():.4f} (rank 0's share)", flush=True)
        if args.save and rank == 0:
            torch.save({k: v.cpu() for k, v in model.state_dict().items()}, args.save)
        # No rank tears the group down while another still works in it: gloo aborts a process
        # whose peer disappears under a pending operation.
        dist.barrier()
    finally:
        dist.destroy_process_group()


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--nproc", type=int, default=2,
                        help="processes to start when not run by torchrun (default 2)")
    parser.add_argument("--backend", choices=("gloo", "nccl"), default=None,
                        help="default: nccl under torchrun where CUDA GPUs are present, "
                             "else gloo (the processes --nproc spawns share the CPUs)")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--batch", type=int, default=16, help="global batch size")
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--dtype", choices=("float32", "float64"), default="float32")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads per process")
    parser.add_argument("--timeout", type=float, default=120.0)
    parser.add_argument("--save", default=None, help="rank 0 saves the state_dict here")
    args = parser.parse_args(argv)
    world = int(os.environ.get("WORLD_SIZE", args.nproc))
    if args.batch % world:
        parser.error(f"--batch {args.batch} must be divisible by the {world} processes")
    return args


def main(argv=None):
    args = parse_args(argv)
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:  # started by torchrun
        run(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), args, "env://")
        return
    # Start the processes here, on 127.0.0.1. Numba reads its thread count at import, in
    # each new process: set it before they start.
    os.environ.setdefault("NUMBA_NUM_THREADS", str(args.threads))
    mp.spawn(run, args=(args.nproc, args, f"tcp://127.0.0.1:{_free_port()}"),
             nprocs=args.nproc)


if __name__ == "__main__":
    main()
