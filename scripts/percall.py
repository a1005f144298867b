"""Per-call cost of gpuconv on the CPU: tiny shapes beside PyTorch, and the thread crossover.

    python scripts/percall.py                 # per-call table, tiny shapes, torch tensors
    python scripts/percall.py --crossover     # one thread against all, by work size
    python scripts/percall.py --steps         # the steps of one tiny call's host path

``--crossover`` times each operation (forward and both gradients) on a ladder of growing
geometries twice, interleaved: run on the caller's thread alone, and with all of Numba's
threads (the plan of the public layer with its thread choice forced each way; the checks
are not timed). It prints the medians and the ratio by FLOPs; the smallest work where all
threads win from there on is the crossover that :data:`gpuconv.cpu.threads.SERIAL_FLOPS`
holds. The machine's load average is printed before and after: measure on an idle machine.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

import gpuconv
from gpuconv.geometry import conv_geometry
from gpuconv.ops import OPS

# (N, C_in, H, W, C_out, k): growing work, shapes as small layers have them.
LADDER = (
    (1, 3, 8, 8, 4, 3), (1, 3, 16, 16, 4, 3), (1, 8, 16, 16, 8, 3), (2, 8, 16, 16, 16, 3),
    (1, 16, 16, 16, 16, 3), (4, 16, 16, 16, 16, 3), (8, 16, 16, 16, 16, 3),
    (2, 32, 16, 16, 32, 3), (8, 32, 16, 16, 32, 3), (8, 32, 32, 32, 32, 3),
)


def _median_us(samples):
    return float(np.median(samples)) / 1e3


def _arrays(op, geom, rng):
    x = rng.standard_normal(geom.input_shape, dtype=np.float32)
    w = rng.standard_normal(op.weight_shape(geom), dtype=np.float32)
    gy = rng.standard_normal(geom.output_shape, dtype=np.float32)
    kind = op.kind
    if kind == "forward":
        return {"x": x, "weight": w, "bias": None}, {}
    if kind == "input_grad":
        return {"grad_output": gy, "weight": w}, {"input_size": geom.input_shape}
    return {"input": x, "grad_output": gy}, {"weight_size": op.weight_shape(geom)}


def crossover(calls, rounds, ops):
    from gpuconv import conv as _conv

    rng = np.random.default_rng(0)
    print(f"load average before: {os.getloadavg()[0]:.2f} (cores: {os.cpu_count()})")
    print("medians (lower quartiles) of the calls' times: on a busy machine the parallel\n"
          "calls wait for a core (milliseconds); their lower quartile is then closer to the\n"
          "time on an idle machine, and the last column compares the lower quartiles")
    print(f"{'op':<20} {'N C H W -> C_out k':<22} {'MFLOP':>8} {'1 thread us':>16} "
          f"{'all us':>16} {'1 / all':>8} {'(q1)':>6}")
    for name in ops:
        op = OPS[name]
        for n, c, h, w, co, k in LADDER:
            geom = conv_geometry((n, c, h, w), (k, k), co)
            arrays, sizes = _arrays(op, geom, rng)
            operands = [_conv._operand(v, key) for key, v in arrays.items()]
            plan = _conv._plan_for(op, arrays, operands, sizes, 1, 0, 1, 1, "cpu")
            serial = _conv._CpuPlan(op, operands, plan.geom)
            parallel = _conv._CpuPlan(op, operands, plan.geom)
            serial.serial, parallel.serial = True, False
            times = {True: [], False: []}
            for _ in range(rounds):
                for which, p in ((True, serial), (False, parallel)):
                    for _ in range(max(3, calls // 10)):
                        _conv._run_cpu(op, operands, plan.geom, p)
                    for _ in range(calls):
                        t = time.perf_counter_ns()
                        _conv._run_cpu(op, operands, plan.geom, p)
                        times[which].append(time.perf_counter_ns() - t)
            one, every = _median_us(times[True]), _median_us(times[False])
            q_one, q_every = (float(np.percentile(times[w], 25)) / 1e3 for w in (True, False))
            print(f"{name:<20} {f'{n} {c} {h} {w} -> {co} {k}':<22} {geom.flops / 1e6:>8.3f} "
                  f"{one:>8.1f} ({q_one:>5.1f}) {every:>8.1f} ({q_every:>5.1f}) "
                  f"{one / every:>8.2f} {q_one / q_every:>6.2f}")
    print(f"load average after: {os.getloadavg()[0]:.2f}")


def steps():
    from gpuconv.bench.percall import call_steps

    rng = np.random.default_rng(0)
    x = rng.standard_normal((1, 3, 16, 16), dtype=np.float32)
    w = rng.standard_normal((4, 3, 3, 3), dtype=np.float32)
    wl = rng.standard_normal((4, 14, 14, 3, 3, 3), dtype=np.float32)
    for label, result in (("conv2d", call_steps("conv2d", x, w, device="cpu", repeat=2000)),
                          ("local_conv2d", call_steps("local_conv2d", x, wl, device="cpu",
                                                      repeat=2000))):
        parts = ", ".join(f"{k} {v:.1f}" for k, v in result["steps_us"].items())
        print(f"{label}: {parts}; whole call {result['total_us']:.1f} us")


def table(calls, rounds):
    """Per-call medians on the tiny shapes, public functions only (so that the same command
    times an older checkout too: ``PYTHONPATH=<checkout> python scripts/percall.py``)."""
    import torch

    conv = torch.nn.functional.conv2d
    rng = np.random.default_rng(0)
    print(f"gpuconv {gpuconv.__version__} from {os.path.dirname(gpuconv.__file__)}; load average "
          f"{os.getloadavg()[0]:.2f} (cores: {os.cpu_count()})")
    print(f"{'shape':<26} {'implementation':<22} {'median us':>10} {'/ torch conv2d':>15}")
    for (n, c, h, w), maps in (((1, 3, 16, 16), 4), ((8, 16, 16, 16), 16)):
        x = torch.from_numpy(rng.standard_normal((n, c, h, w), dtype=np.float32))
        wt = torch.from_numpy(rng.standard_normal((maps, c, 3, 3), dtype=np.float32))
        wl = torch.from_numpy(rng.standard_normal((maps, h - 2, w - 2, c, 3, 3),
                                                  dtype=np.float32))
        impls = (("gpuconv conv2d", lambda: gpuconv.conv2d(x, wt)),
                 ("gpuconv local_conv2d", lambda: gpuconv.local_conv2d(x, wl)),
                 ("torch conv2d", lambda: conv(x, wt)))
        times = {label: [] for label, _ in impls}
        for _ in range(rounds):
            for label, fn in impls:
                for _ in range(20):
                    fn()
                for _ in range(calls):
                    t = time.perf_counter_ns()
                    fn()
                    times[label].append(time.perf_counter_ns() - t)
        base = _median_us(times["torch conv2d"])
        for label, _ in impls:
            m = _median_us(times[label])
            print(f"{f'{n}x{c}x{h}x{w}, {maps} maps 3x3':<26} {label:<22} {m:>10.1f} "
                  f"{m / base:>14.2f}x")
    print(f"load average after: {os.getloadavg()[0]:.2f}")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--crossover", action="store_true")
    parser.add_argument("--steps", action="store_true")
    parser.add_argument("--calls", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--ops", nargs="+", default=list(OPS), choices=list(OPS))
    args = parser.parse_args(argv)
    if args.crossover:
        crossover(args.calls, args.rounds, args.ops)
    elif args.steps:
        steps()
    else:
        table(args.calls, args.rounds)
    return 0


if __name__ == "__main__":
    sys.exit(main())
