"""CPU speed of gpuconv against what a user would pick instead (the benchmark layers of gpuconv.workloads).

- ``conv2d`` against ``torch.nn.functional.conv2d`` (oneDNN);
- ``local_conv2d`` against the usual PyTorch recipe: ``unfold`` then ``einsum``.

Every layer of gpuconv.workloads at its CPU batch size, float32, NCHW. Timing follows
the project's timing rules (BENCHMARKS.md): one untimed call, then a burst of timed calls of one implementation, then a
burst of the other, alternated; medians per implementation; GFLOP/s from
``2 * N * C_out * H_out * W_out * (C_in / groups) * kH * kW``. Also reported: first-call time
of each operation in this process (compile, or load from Numba's cache), and the peak extra
host memory of ``local_conv2d`` (``tracemalloc`` around the call, the output excluded)
beside the size of the peer's unfolded input.

Usage::

    python scripts/cpu_speed.py                 # conv2d and local layers
    python scripts/cpu_speed.py --op conv2d --rounds 7 --burst 4
    python scripts/cpu_speed.py --only "ResNet-50 res2 3x3"
    python scripts/cpu_speed.py --one-core      # both on one thread, timed in CPU time

``--one-core`` compares the kernels per core and is robust to a busy machine (time spent
waiting for a core is not counted); the default compares them as a user runs them, on two
threads and in wall-clock time, and on a busy machine both sides then show waits of whole
scheduler time slices (several milliseconds).
"""

from __future__ import annotations

import argparse
import math
import statistics
import time
import tracemalloc

import numpy as np
import torch

import gpuconv
from gpuconv.geometry import conv_geometry

from gpuconv.workloads import LAYERS


def _row(layer, title=None):
    """name, N (CPU), C_in, H, W, C_out, k, stride, padding of a benchmark layer."""
    return (title or layer.title, layer.batch_cpu, layer.in_channels, layer.size, layer.size,
            layer.out_channels, layer.kernel, layer.stride, layer.padding)


SHARED_LAYERS = [_row(layer) for layer in LAYERS.values() if layer.network_op == "conv2d"]
LOCAL_LAYERS = [_row(layer) for layer in LAYERS.values() if layer.network_op == "local_conv2d"]
# The seed's second layer, unshared: 5 x 494 x 494 x 10 x 9 weights (439 MB).
LOCAL_LAYERS.append(_row(LAYERS["seed-conv2"], "seed conv2 (local)"))


def _median_burst_times(impls, rounds, burst, clock=time.perf_counter):
    """Alternate bursts A A A A, B B B B, ...; return the median time of each impl."""
    times = {name: [] for name in impls}
    for _ in range(rounds):
        for name, fn in impls.items():
            fn()  # untimed: wakes this library's thread pool
            for _ in range(burst):
                t0 = clock()
                fn()
                times[name].append(clock() - t0)
    return {name: statistics.median(ts) for name, ts in times.items()}


def _first_call(fn):
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def _unfold_einsum(xt, wt, k, stride, padding, out_hw):
    """The usual PyTorch locally connected layer: unfold, then one einsum per call."""
    n = xt.shape[0]
    cols = torch.nn.functional.unfold(xt, k, padding=padding, stride=stride)  # (N, C*k*k, L)
    cols = cols.view(n, cols.shape[1], out_hw[0], out_hw[1])
    return torch.einsum("nrhw,ohwr->nohw", cols, wt)


def run(ops, rounds, burst, only=None, seed=0, one_core=False):
    clock = time.perf_counter
    if one_core:
        import numba

        numba.set_num_threads(1)
        torch.set_num_threads(1)
        clock = time.process_time
    else:
        torch.set_num_threads(2)
    rng = np.random.default_rng(seed)
    rows = []
    first_calls = {}
    for op, layers in (("conv2d", SHARED_LAYERS), ("local_conv2d", LOCAL_LAYERS)):
        if op not in ops:
            continue
        for name, n, c_in, h, w, c_out, k, stride, pad in layers:
            if only and name not in only:
                continue
            geom = conv_geometry((n, c_in, h, w), (k, k), c_out, stride, pad)
            x = rng.standard_normal((n, c_in, h, w), dtype=np.float32)
            xt = torch.from_numpy(x)
            if op == "conv2d":
                weight = rng.standard_normal((c_out, c_in, k, k), dtype=np.float32)
                wt = torch.from_numpy(weight)

                def ours():
                    return gpuconv.conv2d(x, weight, stride=stride, padding=pad, device="cpu")

                def peer():
                    return torch.nn.functional.conv2d(xt, wt, stride=stride, padding=pad)
            else:
                weight = rng.standard_normal(geom.local_weight_shape(), dtype=np.float32)
                # the peer's weights in its einsum layout (C_out, H_out, W_out, C_in*k*k)
                wt = torch.from_numpy(weight.reshape(c_out, geom.out_height, geom.out_width, -1))
                out_hw = (geom.out_height, geom.out_width)

                def ours():
                    return gpuconv.local_conv2d(x, weight, stride=stride, padding=pad,
                                                device="cpu")

                def peer():
                    return _unfold_einsum(xt, wt, k, stride, pad, out_hw)
            if op not in first_calls:
                first_calls[op] = _first_call(ours)
            y = ours()
            ref = peer().numpy()
            err = float(np.max(np.abs(y - ref)) / max(1e-30, np.max(np.abs(ref))))
            extra = None
            if op == "local_conv2d":
                tracemalloc.start()
                y = ours()
                _, peak = tracemalloc.get_traced_memory()
                tracemalloc.stop()
                extra = peak - y.nbytes
                unfold_bytes = n * c_in * k * k * geom.out_height * geom.out_width * 4
            del y
            med = _median_burst_times({"gpuconv": ours, "peer": peer}, rounds, burst, clock)
            flops = geom.flops
            row = dict(layer=name, op=op, ours=flops / med["gpuconv"] / 1e9,
                       peer=flops / med["peer"] / 1e9, ms=med["gpuconv"] * 1e3,
                       peer_ms=med["peer"] * 1e3, err=err)
            row["ratio"] = row["ours"] / row["peer"]
            if extra is not None:
                row["extra_mb"] = extra / 1e6
                row["out_mb"] = geom.batch * c_out * geom.out_height * geom.out_width * 4 / 1e6
                row["unfold_mb"] = unfold_bytes / 1e6
            rows.append(row)
            _print_row(row)
    return rows, first_calls


def _print_row(row):
    line = (f"| {row['layer']:<26} | {row['op']:<12} | {row['ours']:8.1f} | {row['peer']:8.1f} "
            f"| {row['ratio']:6.2f} | {row['ms']:9.2f} | {row['peer_ms']:9.2f} | {row['err']:.1e} |")
    if "extra_mb" in row:
        line += (f" extra {row['extra_mb']:.2f} MB (output {row['out_mb']:.2f} MB;"
                 f" peer unfold {row['unfold_mb']:.1f} MB)")
    print(line, flush=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--op", choices=["conv2d", "local_conv2d", "both"], default="both")
    parser.add_argument("--rounds", type=int, default=5, help="alternations of the bursts")
    parser.add_argument("--burst", type=int, default=4, help="timed calls per burst")
    parser.add_argument("--only", action="append", help="run only this layer (repeatable)")
    parser.add_argument("--one-core", action="store_true",
                        help="one thread each, timed in process CPU time")
    args = parser.parse_args()
    ops = ("conv2d", "local_conv2d") if args.op == "both" else (args.op,)
    print("| layer | op | gpuconv GFLOP/s | peer GFLOP/s | ratio | gpuconv ms | peer ms "
          "| rel. diff |")
    print("|---|---|---|---|---|---|---|---|")
    rows, first_calls = run(ops, args.rounds, args.burst, args.only, one_core=args.one_core)
    print()
    for op in ops:
        sel = [r for r in rows if r["op"] == op]
        if sel:
            geo = math.exp(sum(math.log(r["ratio"]) for r in sel) / len(sel))
            print(f"{op}: geometric-mean ratio gpuconv / peer = {geo:.2f} over {len(sel)} layers")
    for op, t in first_calls.items():
        print(f"{op}: first call in this process {t:.2f} s (compile or cache load + one run)")


if __name__ == "__main__":
    main()
