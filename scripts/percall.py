"""Per-call cost of gpuconv on the CPU: tiny shapes beside PyTorch, and the thread crossover.

    python scripts/percall.py                 # per-call table (gpuconv.bench.percall)
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

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import gpuconv  # noqa: E402
from gpuconv import conv as _conv  # noqa: E402
from gpuconv.geometry import conv_geometry  # noqa: E402
from gpuconv.ops import OPS  # noqa: E402

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


def table(quick):
    from gpuconv.bench import peers
    from gpuconv.bench.percall import format_section, measure

    torch = peers.load_torch()
    print(format_section(measure("cpu", torch, quick=quick)))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--crossover", action="store_true")
    parser.add_argument("--steps", action="store_true")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--calls", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--ops", nargs="+", default=list(OPS), choices=list(OPS))
    args = parser.parse_args(argv)
    if args.crossover:
        crossover(args.calls, args.rounds, args.ops)
    elif args.steps:
        steps()
    else:
        table(args.quick)
    return 0


if __name__ == "__main__":
    sys.exit(main())
