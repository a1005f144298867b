"""CPU speed of the gradient kernels against PyTorch, on the benchmark layers of gpuconv.workloads.

- ``conv2d``: input gradient and weight gradient (``gpuconv.cpu.conv2d_input_grad`` /
  ``conv2d_weight_grad``) against ``torch.nn.grad.conv2d_input`` / ``conv2d_weight``
  (oneDNN), on the layers whose network op is conv2d;
- ``local_conv2d``: both gradients (``local_conv2d_input_grad`` + ``local_conv2d_weight_grad``)
  against the backward pass of autograd through the usual recipe, ``unfold`` then
  ``einsum`` (the forward is run once, outside the timing, with the graph retained), on the
  locally connected layers and the seed's second layer made local.

Every layer at its CPU batch size, float32 (``--dtype float64`` for the other), NCHW. Timing:
one untimed call, then a burst of timed calls of one implementation, then a burst of the
next, alternated for ``--rounds`` rounds; medians per implementation. The ratio is peer time
/ gpuconv time (above 1: gpuconv is faster); the summary gives its geometric mean per op.
For the local layers it also reports gpuconv's peak extra memory (``tracemalloc`` around
both calls, the two gradients excluded) beside the weight gradient's size.

Usage::

    python scripts/cpu_grad_speed.py                     # both ops, two threads, wall time
    python scripts/cpu_grad_speed.py --one-core          # one thread each, process CPU time
    python scripts/cpu_grad_speed.py --op conv2d --only vgg16-conv3_2 --rounds 7

On a busy machine wall-clock times of two-thread runs include waits for a core; ``--one-core``
is the robust comparison there.
"""

from __future__ import annotations

import argparse
import math
import statistics
import time
import tracemalloc

import numba
import numpy as np
import torch

from gpuconv.cpu import (conv2d_input_grad, conv2d_weight_grad, local_conv2d_input_grad,
                         local_conv2d_weight_grad)
from gpuconv.workloads import LAYERS


def _layers(op):
    if op == "conv2d":
        return [(layer.name, layer) for layer in LAYERS.values() if layer.network_op == "conv2d"]
    rows = [(layer.name, layer) for layer in LAYERS.values()
            if layer.network_op == "local_conv2d"]
    rows.append(("seed-conv2 (local)", LAYERS["seed-conv2"]))
    return rows


def _medians(impls, rounds, burst, clock):
    """Alternate bursts of each implementation; the median time of each."""
    times = {name: [] for name in impls}
    for _ in range(rounds):
        for name, fn in impls.items():
            fn()  # untimed: warms caches and the thread pool
            for _ in range(burst):
                t0 = clock()
                fn()
                times[name].append(clock() - t0)
    return {name: statistics.median(ts) for name, ts in times.items()}


def _rel_err(ours, peer):
    peer = np.asarray(peer, dtype=np.float64)
    return float(np.max(np.abs(np.asarray(ours, np.float64) - peer))
                 / max(1e-30, float(np.max(np.abs(peer)))))


def _conv2d_row(name, layer, dtype, rounds, burst, clock, rng):
    geom = layer.geometry(layer.batch_cpu)
    x = rng.standard_normal((geom.batch, geom.in_channels, geom.in_height, geom.in_width)
                            ).astype(dtype)
    w = rng.standard_normal(geom.shared_weight_shape()).astype(dtype)
    gy = rng.standard_normal(geom.output_shape).astype(dtype)
    gx = np.empty_like(x)
    gw = np.empty_like(w)
    xt, wt, gyt = (torch.from_numpy(a) for a in (x, w, gy))
    kw = dict(stride=layer.stride, padding=layer.padding)
    impls = {
        "ours_in": lambda: conv2d_input_grad(gy, w, gx, geom),
        "ours_w": lambda: conv2d_weight_grad(x, gy, gw, geom),
        "peer_in": lambda: torch.nn.grad.conv2d_input(xt.shape, wt, gyt, **kw),
        "peer_w": lambda: torch.nn.grad.conv2d_weight(xt, wt.shape, gyt, **kw),
    }
    impls["ours_in"]()
    impls["ours_w"]()
    err = max(_rel_err(gx, impls["peer_in"]()), _rel_err(gw, impls["peer_w"]()))
    med = _medians(impls, rounds, burst, clock)
    ours = med["ours_in"] + med["ours_w"]
    peer = med["peer_in"] + med["peer_w"]
    return dict(layer=name, op="conv2d", ours_ms=ours * 1e3, peer_ms=peer * 1e3,
                ratio=peer / ours, in_ratio=med["peer_in"] / med["ours_in"],
                w_ratio=med["peer_w"] / med["ours_w"], err=err,
                detail=(f"in {med['ours_in'] * 1e3:.2f}/{med['peer_in'] * 1e3:.2f} ms, "
                        f"w {med['ours_w'] * 1e3:.2f}/{med['peer_w'] * 1e3:.2f} ms"))


def _local_row(name, layer, dtype, rounds, burst, clock, rng):
    geom = layer.geometry(layer.batch_cpu)
    k, s, p = layer.kernel, layer.stride, layer.padding
    x = rng.standard_normal((geom.batch, geom.in_channels, geom.in_height, geom.in_width)
                            ).astype(dtype)
    w = rng.standard_normal(geom.local_weight_shape()).astype(dtype)
    gy = rng.standard_normal(geom.output_shape).astype(dtype)
    gx = np.empty_like(x)
    gw = np.empty_like(w)

    def ours():
        local_conv2d_input_grad(gy, w, gx, geom)
        local_conv2d_weight_grad(x, gy, gw, geom)

    xt = torch.from_numpy(x).requires_grad_(True)
    wt = torch.from_numpy(w.reshape(geom.out_channels, geom.out_height, geom.out_width, -1)
                          ).requires_grad_(True)
    gyt = torch.from_numpy(gy)
    cols = torch.nn.functional.unfold(xt, k, padding=p, stride=s)
    cols = cols.view(geom.batch, cols.shape[1], geom.out_height, geom.out_width)
    yt = torch.einsum("nrhw,ohwr->nohw", cols, wt)

    def peer():
        return torch.autograd.grad(yt, (xt, wt), gyt, retain_graph=True)

    ours()
    tgx, tgw = peer()
    err = max(_rel_err(gx, tgx.numpy()), _rel_err(gw.reshape(tgw.shape), tgw.numpy()))
    tracemalloc.start()
    ours()
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    del tgx, tgw
    med = _medians({"ours": ours, "peer": peer}, rounds, burst, clock)
    return dict(layer=name, op="local_conv2d", ours_ms=med["ours"] * 1e3,
                peer_ms=med["peer"] * 1e3, ratio=med["peer"] / med["ours"], err=err,
                detail=f"extra {peak / 1e6:.2f} MB (weight grad {gw.nbytes / 1e6:.1f} MB)")


def _print_row(row):
    extra = ""
    if "in_ratio" in row:
        extra = f" | {row['in_ratio']:6.2f} | {row['w_ratio']:6.2f}"
    else:
        extra = " |        |       "
    print(f"| {row['layer']:<20} | {row['op']:<12} | {row['ours_ms']:9.2f} | "
          f"{row['peer_ms']:9.2f} | {row['ratio']:6.2f}{extra} | {row['err']:.1e} | "
          f"{row['detail']} |", flush=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--op", choices=["conv2d", "local_conv2d", "both"], default="both")
    parser.add_argument("--rounds", type=int, default=5, help="alternations of the bursts")
    parser.add_argument("--burst", type=int, default=3, help="timed calls per burst")
    parser.add_argument("--only", action="append", help="run only this layer (repeatable)")
    parser.add_argument("--dtype", choices=["float32", "float64"], default="float32")
    parser.add_argument("--one-core", action="store_true",
                        help="one thread each, timed in process CPU time")
    args = parser.parse_args()
    clock = time.perf_counter
    if args.one_core:
        numba.set_num_threads(1)
        torch.set_num_threads(1)
        clock = time.process_time
    else:
        torch.set_num_threads(numba.get_num_threads())
    dtype = np.dtype(args.dtype)
    ops = ("conv2d", "local_conv2d") if args.op == "both" else (args.op,)
    timing = "process CPU time" if args.one_core else "wall time"
    print(f"threads: {numba.get_num_threads()} ({timing}), {args.dtype}, "
          f"{args.rounds} rounds x {args.burst} calls, medians")
    print("| layer | op | gpuconv ms | peer ms | ratio | in ratio | w ratio | rel. diff | detail |")
    print("|---|---|---|---|---|---|---|---|---|")
    rng = np.random.default_rng(0)
    rows = []
    for op in ops:
        for name, layer in _layers(op):
            if args.only and name not in args.only and layer.name not in args.only:
                continue
            make = _conv2d_row if op == "conv2d" else _local_row
            row = make(name, layer, dtype, args.rounds, args.burst, clock, rng)
            rows.append(row)
            _print_row(row)
    print()
    for op in ops:
        sel = [r for r in rows if r["op"] == op]
        if sel:
            geo = math.exp(sum(math.log(r["ratio"]) for r in sel) / len(sel))
            print(f"{op} backward: geometric-mean ratio peer time / gpuconv time = {geo:.2f}"
                  f" over {len(sel)} layers")


if __name__ == "__main__":
    main()
