"""Quick shared-vs-unshared timing on the current device: ``gpuconv bench`` with gpuconv only.

A thin wrapper over :mod:`gpuconv.bench`: same options, same timing rules, but by default
``--quick`` and without the PyTorch / NumPy peers. ``--peers`` brings the peers back,
``--full-size`` drops ``--quick`` (each layer's own batch size, more repeats).

Run: ``python scripts/time_kernels.py [--layers deepface-l4 ...] [--device cuda] [--json PATH]``.
"""

from __future__ import annotations

import argparse
import sys

from gpuconv import bench


def build_parser():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    bench.add_arguments(parser)
    parser.add_argument("--peers", dest="peers", action="store_true",
                        help="also time the PyTorch (or NumPy) peers")
    parser.add_argument("--full-size", dest="quick", action="store_false",
                        help="not --quick: each layer's own batch size and more repeats")
    parser.set_defaults(quick=True, peers=False)
    return parser


def main(argv=None):
    return bench.run(build_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
