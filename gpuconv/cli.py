"""The ``gpuconv`` command line.

Subcommands::

    gpuconv info [--json]       versions, CUDA availability, what device="auto" picks
    gpuconv params [...]        the lecture note's parameter arithmetic
    gpuconv bench [...]         benchmarks (see gpuconv.bench)
    gpuconv train [...]         train shared / unshared / dense networks (see gpuconv.train)

Without a subcommand the help is printed (exit status 2). Argument errors, whether argparse
finds them or a command does (an impossible layer, an unwritable output path, a device that
is not there), are one line on stderr and exit status 2; anything else is a bug and shows
its traceback.

The top floor: it imports the commands (:mod:`gpuconv.bench` only when it is asked for) and
nothing imports it. :func:`positive_int` and :func:`gpu_description` are
:mod:`gpuconv.appkit`'s, named here too.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import platform
import sys
from importlib import metadata

from .appkit import gpu_description, positive_int

__all__ = ["main", "build_parser", "collect_info", "positive_int", "gpu_description"]

PROG = "gpuconv"
PEERS = ("torch", "cupy", "matplotlib")
NOT_INSTALLED = "not installed"


# ----------------------------------------------------------------------------- info

def _distribution_version(name):
    """Version of an installed distribution, or ``None``."""
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def _module_version(module):
    """Version of the distribution that provides an importable top-level module, or ``None``.

    Handles modules shipped under another distribution name (``cupy`` comes as
    ``cupy-cuda12x`` or ``cupy-cuda13x``) without importing the module.
    """
    try:
        distributions = metadata.packages_distributions().get(module, [])
    except Exception:
        distributions = []
    for name in [module, *distributions]:
        version = _distribution_version(name)
        if version is not None:
            return version
    return None


def collect_info():
    """What ``gpuconv info`` reports, as a JSON-serialisable dict (missing versions: ``None``)."""
    from . import __version__
    from .device import ENV_VAR, cuda_available, explain_auto

    available = cuda_available()
    try:
        auto = explain_auto()
    except ValueError as exc:  # a bad GPUCONV_DEVICE: report it, do not fail
        auto = f"error: {exc}"
    return {
        "gpuconv": __version__,
        "python": f"{platform.python_implementation()} {platform.python_version()}",
        "numpy": _distribution_version("numpy"),
        "numba": _distribution_version("numba"),
        "numba_cuda": _distribution_version("numba-cuda"),
        "cuda_available": available,
        "gpu": gpu_description() if available else None,
        "device_auto": auto,
        "gpuconv_device_env": os.environ.get(ENV_VAR),
        "peers": {name: _module_version(name) for name in PEERS},
    }


def _format_info(info):
    def version(value):
        return NOT_INSTALLED if value is None else value

    rows = [
        ("gpuconv", info["gpuconv"]),
        ("Python", info["python"]),
        ("NumPy", version(info["numpy"])),
        ("Numba", version(info["numba"])),
        ("numba-cuda", version(info["numba_cuda"])),
        ("CUDA available", "yes" if info["cuda_available"] else "no"),
    ]
    if info["gpu"] is not None:
        rows.append(("GPU", info["gpu"]))
    rows += [
        ('device="auto"', info["device_auto"]),
        ("GPUCONV_DEVICE", "(not set)" if info["gpuconv_device_env"] is None
         else repr(info["gpuconv_device_env"])),
    ]
    rows += [(f"{name} (optional)", version(value)) for name, value in info["peers"].items()]
    width = max(len(label) for label, _ in rows)
    return "\n".join(f"{label + ':':<{width + 1}} {value}" for label, value in rows)


def _run_info(args):
    info = collect_info()
    if args.json:
        print(json.dumps(info, indent=2))
    else:
        print(_format_info(info))
    return 0


def _add_info(subparsers):
    parser = subparsers.add_parser(
        "info", help="versions, CUDA availability and what device='auto' picks",
        description="Report the gpuconv, Python, NumPy, Numba and numba-cuda versions, whether "
                    "a CUDA GPU is usable, what device='auto' resolves to and why, the "
                    "GPUCONV_DEVICE setting, and the optional packages present.")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.set_defaults(func=_run_info)


# ----------------------------------------------------------------------------- params




def _run_params(args):
    from .params import format_note_arithmetic, format_note_dial, note_arithmetic, note_dial

    field = args.field
    if len(field) not in (1, 2):
        args.parser.error(f"argument --field: expected KH or KH KW, got {len(field)} values")
    try:
        numbers = note_arithmetic(height=args.height, width=args.width, neurons=args.neurons,
                                  field=(field[0], field[-1]), filters=args.filters)
    except ValueError as exc:  # a field larger than the image
        args.parser.error(str(exc))
    if args.json:
        print(json.dumps(dict(numbers, dial=note_dial(numbers)), indent=2))
    else:
        print(format_note_arithmetic(numbers))
        print()
        print(format_note_dial(numbers))
    return 0


def _add_params(subparsers):
    parser = subparsers.add_parser(
        "params", help="the note's parameter arithmetic (fully vs locally connected vs shared)",
        description="Weights of one layer fed by an H x W input with M neurons: fully "
                    "connected (H*W*M), locally connected with a KH x KW field (KH*KW*M), "
                    "shared per filter (KH*KW) and with F filters (KH*KW*F); then the dial "
                    "between shared and locally connected: KH*KW*T*T weights for T x T kernel "
                    "slots shared by the neurons (tiled_conv2d). Defaults are the "
                    "note's example: 500 x 500 image, 10^5 neurons, 10 x 10 field, 64 filters.")
    parser.add_argument("--height", type=positive_int, default=500, metavar="H",
                        help="input height in pixels (default: 500)")
    parser.add_argument("--width", type=positive_int, default=500, metavar="W",
                        help="input width in pixels (default: 500)")
    parser.add_argument("--neurons", type=positive_int, default=100_000, metavar="M",
                        help="neurons in the next layer (default: 100000)")
    parser.add_argument("--field", type=positive_int, nargs="+", default=[10, 10],
                        metavar="K", help="receptive field: KH [KW] (default: 10 10)")
    parser.add_argument("--filters", type=positive_int, default=64, metavar="F",
                        help="number of shared kernels (default: 64)")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.set_defaults(func=_run_params, parser=parser)


# ----------------------------------------------------------------------------- bench

def _import_bench():
    """``gpuconv.bench``, or ``None`` when the module is not there."""
    name = f"{__package__}.bench"
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as exc:
        if exc.name != name:
            raise  # bench itself needs something missing: let that show
        return None


def _bench_missing(args):
    print(f"{PROG} bench: error: unavailable, gpuconv.bench is not installed", file=sys.stderr)
    return 2


def _add_bench(subparsers, load):
    """Register ``bench``; import :mod:`gpuconv.bench` only when ``load`` (it is selected)."""
    bench = _import_bench() if load else None
    description = "Benchmark conv2d and local_conv2d (see gpuconv.bench)."
    if load and bench is None:
        description += " Unavailable: gpuconv.bench is not installed."
    parser = subparsers.add_parser(
        "bench", help="benchmark conv2d and local_conv2d on the devices present",
        description=description)
    if bench is not None:
        bench.add_arguments(parser)
        parser.set_defaults(func=bench.run)
    else:
        # Whatever options were meant for the missing module, say it is missing.
        parser.set_defaults(func=_bench_missing, accepts_extra=True)


# ----------------------------------------------------------------------------- train

def _add_train(subparsers):
    """Register ``train`` (:mod:`gpuconv.train`; it imports PyTorch only when it runs)."""
    from . import train

    parser = subparsers.add_parser(
        "train", help="train the note's network with shared, unshared or dense layers",
        description=train.DESCRIPTION)
    train.add_arguments(parser)
    parser.set_defaults(func=train.run)


# ----------------------------------------------------------------------------- main

def _selected_command(argv):
    """The first non-option word: the subcommand the user asked for (or ``None``)."""
    for word in argv:
        if word == "--":
            return None
        if not word.startswith("-"):
            return word
    return None


def build_parser(argv=()):
    """The argument parser. ``argv`` says which subcommand to load in full (``bench``)."""
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Shared (conv2d) and unshared (local_conv2d) 2-D convolutions on CPU "
                    "and CUDA.")
    from . import __version__

    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    _add_info(subparsers)
    _add_params(subparsers)
    _add_bench(subparsers, load=_selected_command(argv) == "bench")
    _add_train(subparsers)
    return parser


def main(argv=None):
    """Run the command line; returns the exit status (0 success, 2 argument error).

    Only argument errors are caught (argparse's, and those a command reports itself with
    exit status 2); any other exception is a bug and propagates with its traceback.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(argv)
    try:
        args, extra = parser.parse_known_args(argv)
        if args.command is None:
            parser.print_help(sys.stderr)
            return 2
        if extra and not getattr(args, "accepts_extra", False):
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        return int(args.func(args) or 0)
    except SystemExit as exc:  # argparse: --help, --version, usage errors
        code = exc.code
        if code is None:
            return 0
        if isinstance(code, int):
            return code
        print(code, file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # The reader went away (``gpuconv params | head -1``): stop quietly. Python would
        # report the pipe again when it flushes stdout at exit, so point stdout at /dev/null.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 141  # 128 + SIGPIPE, as a command killed by the closed pipe
