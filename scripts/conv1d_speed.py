"""The 1-D operations against the 2-D call of the same shape, on the CPU.

``gpuconv.conv1d`` and ``gpuconv.local_conv1d`` run the 2-D kernels with a height of one;
this script checks that the 1-D wrapper adds nothing a user would notice: each shape is
timed as ``conv1d(x, w)`` and as ``conv2d(x[:, :, None], w[:, :, None])`` (the same for the
local pair), the two alternating in bursts after a warm-up, and the ratio of the medians is
printed (``1d / 2d``: above 1, the 1-D call is slower).

Usage::

    python scripts/conv1d_speed.py                    # the default shapes, all cores
    python scripts/conv1d_speed.py --one-core         # one thread, process CPU time
    python scripts/conv1d_speed.py --rounds 9 --burst 20

``--one-core`` is robust to a busy machine (time spent waiting for a core is not counted).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import numpy as np

import gpuconv
from gpuconv import bench
from gpuconv.appkit import positive_int

#: (name, N, C_in, C_out, L, k, stride, padding): a speech front end (wide, many maps), a
#: text convolution (short sequence, many channels) and a small call (dispatch dominates).
SHAPES = [
    ("speech", 8, 40, 64, 1000, 5, 1, "same"),
    ("text", 32, 128, 128, 64, 3, 1, 1),
    ("small", 1, 4, 8, 32, 3, 1, 0),
]


def _operands(shape, local, rng):
    _, n, c_in, c_out, length, k, stride, padding = shape
    x = rng.standard_normal((n, c_in, length), dtype=np.float32)
    if padding == "same":
        out_length = length
    else:
        out_length = (length + 2 * padding - k) // stride + 1
    if local:
        w = rng.standard_normal((c_out, out_length, c_in, k), dtype=np.float32)
        calls = (
            lambda: gpuconv.local_conv1d(x, w, None, stride, padding, device="cpu"),
            lambda x2=x[:, :, None], w2=w[:, None, :, :, None, :]:
                gpuconv.local_conv2d(x2, w2, None, (1, stride),
                                     _padding_2d(padding, k), device="cpu"))
    else:
        w = rng.standard_normal((c_out, c_in, k), dtype=np.float32)
        calls = (
            lambda: gpuconv.conv1d(x, w, None, stride, padding, device="cpu"),
            lambda x2=x[:, :, None], w2=w[:, :, None]:
                gpuconv.conv2d(x2, w2, None, (1, stride), _padding_2d(padding, k),
                               device="cpu"))
    return calls


def _padding_2d(padding, k):
    if padding == "same":
        return ((0, 0), ((k - 1) // 2, k - 1 - (k - 1) // 2))
    return (0, padding)


def _time(call, clock, burst):
    start = clock()
    for _ in range(burst):
        call()
    return (clock() - start) / burst


def measure(shapes=SHAPES, rounds=7, burst=10, one_core=False, ops=("conv1d", "local_conv1d")):
    """``[{"shape", "op", "median_1d_s", "median_2d_s", "ratio"}]``, the pair of each shape
    alternating in bursts after one warm-up burst each."""
    clock = time.perf_counter
    if one_core:
        clock = bench.one_core()
    rng = np.random.default_rng(0)
    results = []
    for shape in shapes:
        for op in ops:
            one_d, two_d = _operands(shape, op == "local_conv1d", rng)
            np.testing.assert_allclose(one_d(), two_d()[:, :, 0], rtol=1e-6, atol=1e-5)
            _time(one_d, clock, burst), _time(two_d, clock, burst)
            times_1d, times_2d = [], []
            for _ in range(rounds):
                times_1d.append(_time(one_d, clock, burst))
                times_2d.append(_time(two_d, clock, burst))
            m1, m2 = statistics.median(times_1d), statistics.median(times_2d)
            results.append({"shape": shape[0], "op": op, "median_1d_s": m1,
                            "median_2d_s": m2, "ratio": m1 / m2})
    return results


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=positive_int, default=7,
                        help="alternations of the bursts (default 7)")
    parser.add_argument("--burst", type=positive_int, default=10,
                        help="timed calls per burst (default 10)")
    parser.add_argument("--one-core", action="store_true",
                        help="one thread, timed in process CPU time")
    args = parser.parse_args(argv)
    results = measure(rounds=args.rounds, burst=args.burst, one_core=args.one_core)
    load = " ".join(open("/proc/loadavg").read().split()[:3]) if sys.platform == "linux" else "-"
    print(f"clock: {'process CPU time, one thread' if args.one_core else 'wall clock'}; "
          f"load average {load}")
    print("| shape | op | 1-D ms | 2-D ms | 1-D / 2-D |")
    print("|---|---|---|---|---|")
    for r in results:
        print(f"| {r['shape']} | {r['op']} | {r['median_1d_s'] * 1e3:.3f} "
              f"| {r['median_2d_s'] * 1e3:.3f} | {r['ratio']:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
