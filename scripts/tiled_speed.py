"""CPU time of the tiled convolution at the two ends of the dial, beside the operations it
equals there: ``tiled_conv2d`` with one kernel slot against ``conv2d``, and with a slot per
output position against ``local_conv2d`` (float32, forward, each layer at its CPU batch
size). A few points between the ends (periodic tiles, or blocks with ``--tiling blocks``)
are timed too, against ``local_conv2d``, to show the cost moving from one end to the other.

The two sides of a pair run in alternating bursts (a burst of one, then of the other, round
after round); each burst gives one sample, the time per call. Reported: the median time of
each side, and the median over rounds of the paired ratio tiled / reference (above 1: the
tiled call is slower), with its quartiles.

Usage::

    python scripts/tiled_speed.py                     # DeepFace L5 and L6, one core
    python scripts/tiled_speed.py --only deepface-l4 --rounds 9 --burst 3
    python scripts/tiled_speed.py --all-cores         # Numba's threads, wall-clock time
    python scripts/tiled_speed.py --gradients         # and both gradients

``--one-core`` (the default) runs one thread and times CPU time of the process, robust to a
busy machine; ``--all-cores`` uses every thread and wall-clock time.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

import gpuconv
from gpuconv.bench import one_core
from gpuconv.bench.stats import paired_ratios, summarize
from gpuconv.appkit import positive_int
from gpuconv.workloads import LAYERS

DEFAULT_LAYERS = ("deepface-l5", "deepface-l6")


def _problem(layer, rng):
    geom = layer.geometry(layer.batch_cpu)
    x = rng.uniform(-1, 1, geom.input_shape).astype(np.float32)
    shared = rng.uniform(-1, 1, geom.shared_weight_shape()).astype(np.float32)
    local = rng.uniform(-1, 1, geom.local_weight_shape()).astype(np.float32)
    kwargs = dict(stride=layer.stride, padding=layer.padding, groups=layer.groups,
                  device="cpu")
    return geom, x, shared, local, kwargs


def _tiled_weight(rng, geom, tiles):
    return rng.uniform(-1, 1, (geom.out_channels, *tiles, geom.in_channels_per_group,
                               geom.kernel_height, geom.kernel_width)).astype(np.float32)


def _time_pair(first, second, rounds, burst, clock):
    """Alternating bursts of ``first`` and ``second`` (one warm-up call each first); the
    per-call time of every burst of each."""
    first(), second()
    samples = ([], [])
    for round_ in range(rounds):
        order = (0, 1) if round_ % 2 == 0 else (1, 0)
        for side in order:
            call = (first, second)[side]
            start = clock()
            for _ in range(burst):
                call()
            samples[side].append((clock() - start) / burst)
    return samples


def _gradient_pairs(geom, x, shared, local, one, between, kwargs, rng, tiling="periodic"):
    """Both gradients at the ends (against conv2d's and local_conv2d's) and between (against
    local_conv2d's)."""
    grad = gpuconv.grad
    gy = rng.uniform(-1, 1, geom.output_shape).astype(np.float32)
    full = (geom.out_height, geom.out_width)
    points = [((1, 1), one, "conv2d")] + [((t, t), None, "local_conv2d") for t in between]
    points.append((full, local, "local_conv2d"))
    pairs = []
    for tiles, weight, reference in points:
        tiles = (min(tiles[0], full[0]), min(tiles[1], full[1]))
        if weight is None:
            weight = _tiled_weight(rng, geom, tiles)
        if reference == "conv2d":
            ref_input = lambda: grad.conv2d_input(x.shape, shared, gy, **kwargs)  # noqa: E731
            ref_weight = lambda: grad.conv2d_weight(x, shared.shape, gy, **kwargs)  # noqa: E731
        else:
            ref_input = lambda: grad.local_conv2d_input(x.shape, local, gy, **kwargs)  # noqa: E731
            ref_weight = lambda: grad.local_conv2d_weight(x, local.shape, gy, **kwargs)  # noqa: E731
        label = f"T={tiles[0]}x{tiles[1]}"
        tiled = dict(kwargs, tiling=tiling)  # (at the ends both tilings are the same)
        pairs.append((f"{label} input grad vs {reference}",
                      lambda w=weight: grad.tiled_conv2d_input(x.shape, w, gy, **tiled),
                      ref_input))
        pairs.append((f"{label} weight grad vs {reference}",
                      lambda s=weight.shape: grad.tiled_conv2d_weight(x, s, gy, **tiled),
                      ref_weight))
    return pairs


def run(names, rounds, burst, clock, between, seed=0, gradients=False, tiling="periodic"):
    """Rows ``(layer, what, tiled median, reference median, ratio summary)``."""
    rng = np.random.default_rng(seed)
    rows = []
    for name in names:
        layer = LAYERS[name]
        geom, x, shared, local, kwargs = _problem(layer, rng)
        full = (geom.out_height, geom.out_width)
        one = shared.reshape(geom.out_channels, 1, 1, *shared.shape[1:])
        pairs = [
            ("T=1x1 vs conv2d", lambda: gpuconv.tiled_conv2d(x, one, **kwargs),
             lambda: gpuconv.conv2d(x, shared, **kwargs)),
            (f"T={full[0]}x{full[1]} vs local_conv2d",
             lambda: gpuconv.tiled_conv2d(x, local, **kwargs),
             lambda: gpuconv.local_conv2d(x, local, **kwargs)),
        ]
        for tiles in between:
            tiles = (min(tiles, full[0]), min(tiles, full[1]))
            weight = _tiled_weight(rng, geom, tiles)
            pairs.append((f"T={tiles[0]}x{tiles[1]} ({tiling}) vs local_conv2d",
                          lambda w=weight: gpuconv.tiled_conv2d(x, w, tiling=tiling, **kwargs),
                          lambda: gpuconv.local_conv2d(x, local, **kwargs)))
        if gradients:
            pairs += _gradient_pairs(geom, x, shared, local, one, between, kwargs, rng, tiling)
        for what, tiled, reference in pairs:
            tiled_times, reference_times = _time_pair(tiled, reference, rounds, burst, clock)
            rows.append((layer.short_title, what, summarize(tiled_times)["median"],
                         summarize(reference_times)["median"],
                         paired_ratios(tiled_times, reference_times)))
    return rows


def format_rows(rows):
    header = f"{'layer':<20} {'pair':<42} {'tiled ms':>9} {'ref ms':>9} {'ratio':>6}  (q1-q3)"
    lines = [header, "-" * len(header)]
    for layer, what, tiled, reference, ratio in rows:
        lines.append(f"{layer:<20} {what:<42} {tiled * 1e3:>9.2f} {reference * 1e3:>9.2f} "
                     f"{ratio['median']:>6.3f}  ({ratio['q1']:.3f}-{ratio['q3']:.3f})")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", nargs="+", choices=list(LAYERS), default=DEFAULT_LAYERS,
                        metavar="LAYER", help="layers to time (default: %(default)s)")
    parser.add_argument("--rounds", type=positive_int, default=9,
                        help="bursts of each side (default: 9)")
    parser.add_argument("--burst", type=positive_int, default=3,
                        help="calls per burst (default: 3)")
    parser.add_argument("--between", type=positive_int, nargs="*", default=[2, 8],
                        metavar="T", help="T x T tiles also timed against local_conv2d "
                        "(default: 2 8)")
    parser.add_argument("--tiling", choices=("periodic", "blocks"), default="periodic",
                        help="the tiling of the tiles between the ends (default: periodic)")
    parser.add_argument("--gradients", action="store_true",
                        help="also time both gradients (gpuconv.grad) at the same points")
    cores = parser.add_mutually_exclusive_group()
    cores.add_argument("--one-core", dest="one_core", action="store_true", default=True,
                       help="one thread, CPU time (default)")
    cores.add_argument("--all-cores", dest="one_core", action="store_false",
                       help="Numba's threads, wall-clock time")
    args = parser.parse_args(argv)
    clock = one_core() if args.one_core else time.perf_counter
    rows = run(args.only, args.rounds, args.burst, clock, args.between,
               gradients=args.gradients, tiling=args.tiling)
    print(format_rows(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
