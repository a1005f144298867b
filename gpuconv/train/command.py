"""The ``gpuconv train`` command: its arguments and the run."""

from __future__ import annotations

import argparse
import sys

from ..appkit import check_output_path, command_line, nonnegative_int, positive_int
from .loop import DEFAULT_CPU_THREADS, PLANS, _resolve_device, train
from .models import DATASETS, DIAL, VARIANTS
from .report import format_tables

#: The command's one-paragraph description.
DESCRIPTION = ("Train the lecture note's network (conv 5x5x3x10 -> conv 3x3x10x5 -> fully "
               "connected) with shared weights (gpuconv Conv2d), tiled ones (TiledConv2d: "
               "points on the sharing dial), unshared ones (LocallyConnected2d) and a fully "
               "connected first layer, on data shipped with scikit-learn, and report "
               "parameters, seconds per epoch and test accuracy.")


def add_arguments(parser):
    """Add the ``train`` options to ``parser``."""
    parser.add_argument("--variant", choices=VARIANTS + ("all",), default="all",
                        help="shared (gpuconv Conv2d), "
                             + ", ".join(f"{name} (TiledConv2d, {tiling} {t[0]}x{t[1]})"
                                         for name, (tiling, t) in DIAL.items())
                             + ", unshared (LocallyConnected2d), dense (first layer fully "
                             "connected) or all (default)")
    parser.add_argument("--dataset", choices=DATASETS + ("all",), default="all",
                        help="digits (8x8, 10 labels), sample-images (20x20 crops of two "
                             "photos, 2 labels) or all (default)")
    parser.add_argument("--epochs", type=positive_int, metavar="N",
                        help="epochs (default per dataset: digits "
                             f"{PLANS['digits'][0].epochs}, sample-images "
                             f"{PLANS['sample-images'][0].epochs}; fewer with --quick)")
    parser.add_argument("--batch", type=positive_int, metavar="N",
                        help=f"minibatch size (default {PLANS['digits'][0].batch})")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                        help="where to train (default: auto, as gpuconv.select_device)")
    parser.add_argument("--seed", type=nonnegative_int, default=0,
                        help="first seed: fixes the split, the initial weights and the batch "
                             "order (default 0)")
    parser.add_argument("--seeds", type=positive_int, default=1, metavar="N",
                        help="run N seeds (seed, seed+1, ...) and report mean ± spread "
                             "(default 1)")
    parser.add_argument("--json", metavar="PATH", help="write the machine and the records")
    parser.add_argument("--plot", metavar="PATH",
                        help="write a PNG of the learning curves (needs matplotlib)")
    parser.add_argument("--threads", type=positive_int, metavar="N",
                        help=f"CPU threads for PyTorch and the kernels (default "
                             f"{DEFAULT_CPU_THREADS}: these networks are too small to gain "
                             "from more, and lose much on a busy machine)")
    parser.add_argument("--quick", action="store_true",
                        help="fewer epochs and crops: about a minute on a 2-core CPU")
    return parser


def _command_of(args):
    """The options as given (for the record)."""
    return command_line("gpuconv train", [
        ("--dataset", args.dataset), ("--variant", args.variant), ("--epochs", args.epochs),
        ("--batch", args.batch), ("--device", args.device), ("--seed", args.seed),
        ("--seeds", args.seeds if args.seeds != 1 else None), ("--threads", args.threads),
        ("--quick", args.quick)])


def run(args):
    """The ``train`` command. Returns the exit status (2: the options cannot work)."""
    try:  # unwritable outputs are argument errors, reported before any training
        check_output_path(args.json, "--json")
        check_output_path(args.plot, "--plot")
    except ValueError as exc:
        print(f"gpuconv train: error: {exc}", file=sys.stderr)
        return 2
    try:  # a device that is not there is an argument error too (one line, exit 2)
        _resolve_device(args.device)
    except ImportError:
        pass  # PyTorch missing: reported below, with the extra to install
    except ValueError as exc:
        print(f"gpuconv train: error: {exc}", file=sys.stderr)
        return 2
    try:
        result = train(args.dataset, args.variant, epochs=args.epochs, batch=args.batch,
                       device=args.device, seed=args.seed, seeds=args.seeds, quick=args.quick,
                       json_path=args.json, plot_path=args.plot, threads=args.threads,
                       command=_command_of(args))
    except ImportError as exc:
        print(f"gpuconv: error: {exc}", file=sys.stderr)
        return 2
    print(format_tables(result))
    machine = result["machine"]
    print(f"{len(result['records'])} runs in {machine['wall_s']:.0f} s on {machine['device']} "
          f"(load average {machine['load_average_start']} -> {machine['load_average_end']})")
    for flag, path in (("json", args.json), ("plot", args.plot)):
        if path:
            print(f"wrote {path}")
    return 0


def main(argv=None):
    parser = argparse.ArgumentParser(prog="gpuconv train", description=DESCRIPTION)
    add_arguments(parser)
    return run(parser.parse_args(argv))
