"""The ``gpuconv bench`` command: its arguments, the checks before any timing, the run and
the report."""

from __future__ import annotations

import argparse
import os
import sys
import time

from . import percall as _percall
from . import peers as impls_mod
from . import suite, timing
from ..appkit import check_output_path, command_line, positive_int, write_json
from ..device import CudaUnavailableError, select_device, set_autotune
from .report import TABLE_WIDTH, format_report
from .suite import (DEFAULT_BURSTS, DEFAULT_REPEAT, DTYPES, PASS_CHOICES, QUICK_BURSTS,
                    QUICK_MAX_BATCH, QUICK_REPEAT, STEP_FLOAT16, resolve_passes)
from .timing import one_core

DESCRIPTION = "Benchmark conv2d and local_conv2d (see gpuconv.bench)."

def _layer_name(text):
    key = text.strip().lower()
    if key not in suite.LAYERS:
        raise argparse.ArgumentTypeError(
            f"unknown layer {text!r}; accepted: {', '.join(suite.LAYERS)}")
    return key


def add_arguments(parser):
    """Add the ``bench`` options to ``parser`` (an ``argparse.ArgumentParser``)."""
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                        help="where to run (default: auto, as gpuconv.select_device)")
    parser.add_argument("--suite", choices=tuple(suite.SUITES), default="default",
                        help="default: a few layers of each kind; full: every layer")
    parser.add_argument("--quick", action="store_true",
                        help=f"reduced run: layers {', '.join(suite.QUICK_LAYERS)}, batch <= "
                             f"{QUICK_MAX_BATCH}, fewer repeats (the forward: well under a "
                             "minute on a CPU)")
    parser.add_argument("--layers", nargs="+", type=_layer_name, metavar="NAME",
                        help="run these layers instead of the suite; one of: "
                             f"{', '.join(suite.LAYERS)}")
    parser.add_argument("--batch", type=positive_int, metavar="N",
                        help="batch size for every layer (default: each layer's own, per device)")
    parser.add_argument("--dtype", choices=DTYPES, default="float32",
                        help="float32 (default), float64, or float16 (stored in half "
                             "precision, accumulated in float32; bytes counted at 2 per value; "
                             "no training step: it is timed in float32 and float64)")
    parser.add_argument("--repeat", type=positive_int, metavar="R",
                        help=f"timed calls per burst (default {DEFAULT_REPEAT}, "
                             f"--quick {QUICK_REPEAT}); each implementation runs "
                             f"{DEFAULT_BURSTS} bursts ({QUICK_BURSTS} with --quick)")
    parser.add_argument("--pass", dest="passes", nargs="+", choices=tuple(PASS_CHOICES),
                        default=["forward"], metavar="PASS",
                        help="what to time (default: forward): forward (y = op(x, w) + b); "
                             "backward (dL/dx and dL/dw: gpuconv.grad against PyTorch's "
                             "autograd backward of conv2d and through unfold + einsum, the "
                             "backward alone, their forward run once untimed with the graph "
                             "retained); step (one training step, forward + backward of a "
                             "layer: gpuconv.torch.Conv2d vs torch.nn.Conv2d, "
                             "gpuconv.torch.LocallyConnected2d vs PyTorch-only unfold + einsum "
                             "and unfold + bmm layers; needs PyTorch); both (forward and "
                             "backward); all (the three). Several may be given")
    parser.add_argument("--one-core", action="store_true",
                        help="CPU only: one thread for gpuconv and PyTorch, timed in process "
                             "CPU time (compares the kernels per core; robust on a busy "
                             "machine)")
    parser.add_argument("--autotune", action="store_true",
                        help="CUDA only: gpuconv's forward kernels chosen by measurement "
                             "(gpuconv.set_autotune; the tuning is in each layer's first "
                             "call, not in its timed calls)")
    parser.add_argument("--no-dial", dest="dial", action="store_false",
                        help="leave out the sharing dial: tiled_conv2d at "
                             + " and ".join(f"{tiling} {t[0]}x{t[1]}" for tiling, t in suite.DIAL)
                             + " (--quick: " + ", ".join(f"{tiling} {t[0]}x{t[1]}"
                                                         for tiling, t in suite.QUICK_DIAL)
                             + "), timed in the forward beside conv2d and local_conv2d")
    parser.add_argument("--no-peers", dest="peers", action="store_false",
                        help="time gpuconv only (no PyTorch / NumPy comparison)")
    parser.add_argument("--wide", action="store_true",
                        help=f"print every column of the table (default: at most "
                             f"{TABLE_WIDTH} characters, or the terminal's width, leaving out "
                             "the first call, the quartiles, the parameters, the memory and "
                             "GB/s as needed; the JSON always has them)")
    parser.add_argument("--no-per-call", dest="per_call", action="store_false",
                        help="skip the per-call section (tiny shapes, gpuconv beside "
                             "PyTorch's conv2d, a few seconds)")
    parser.add_argument("--json", metavar="PATH", help="write machine and records as JSON")
    parser.add_argument("--plot", metavar="PATH",
                        help="write a PNG (needs matplotlib: pip install 'gpuconv[bench]'); "
                             f"adds a batch sweep {suite.SWEEP_BATCHES} on {suite.SWEEP_LAYER} "
                             "(in the first pass asked for)")
    return parser


def _plan(args):
    """``(layer names, repeat, bursts, batch_cap)`` from parsed arguments."""
    if args.layers:
        names = list(dict.fromkeys(args.layers))
    elif args.quick and args.suite == "default":
        names = list(suite.QUICK_LAYERS)
    else:
        names = list(suite.SUITES[args.suite])
    repeat = args.repeat or (QUICK_REPEAT if args.quick else DEFAULT_REPEAT)
    bursts = QUICK_BURSTS if args.quick else DEFAULT_BURSTS
    batch_cap = QUICK_MAX_BATCH if args.quick else None
    return names, repeat, bursts, batch_cap


def _argument_problem(args):
    """Why the options cannot work, checked before anything is timed (``None`` if they can)."""
    if args.plot:
        try:
            from . import plot as _bench_plot
            _bench_plot.require_matplotlib()
        except ImportError as exc:
            return (f"--plot needs matplotlib ({exc}); install it with: "
                    "pip install 'gpuconv[bench]'")
    for flag, path in (("--json", args.json), ("--plot", args.plot)):
        if path:
            try:
                check_output_path(path, flag)
            except ValueError as exc:
                return str(exc)
    if args.json and args.plot and os.path.abspath(args.json) == os.path.abspath(args.plot):
        return f"--json and --plot name the same file ({args.json})"
    return None


def run(args):
    """The ``bench`` command. Returns the exit code (2: the options cannot work)."""
    problem = _argument_problem(args)
    if problem is None:
        try:
            device = select_device(device=args.device)
        except (CudaUnavailableError, ValueError) as exc:
            problem = str(exc)
    if problem is not None:
        print(f"gpuconv bench: error: {problem}", file=sys.stderr)
        return 2
    names, repeat, bursts, batch_cap = _plan(args)
    passes = resolve_passes(getattr(args, "passes", None))
    if passes == ("step",) and args.dtype == "float16":
        print(f"gpuconv bench: error: --pass step is {STEP_FLOAT16}", file=sys.stderr)
        return 2
    torch = "auto"
    if "step" in passes or getattr(args, "one_core", False):
        torch = impls_mod.load_torch()
        if passes == ("step",) and (torch is None or (device == "cuda"
                                                      and not torch.cuda.is_available())):
            why = impls_mod.torch_problem() or "built without CUDA"
            print(f"gpuconv bench: error: --pass step times gpuconv.torch layers, which need "
                  f"PyTorch (PyTorch {why}); pip install torch", file=sys.stderr)
            return 2
        if torch is None:
            torch = "auto"  # run_benchmark loads it again and says why it is missing
    clock = None
    if getattr(args, "one_core", False):
        if device != "cpu":
            print("gpuconv bench: error: --one-core times CPU threads; the device is "
                  f"{device}", file=sys.stderr)
            return 2
        clock = one_core(None if torch == "auto" else torch)
    autotune = getattr(args, "autotune", False)
    if autotune and device != "cuda":
        print("gpuconv bench: error: --autotune chooses among CUDA kernels; the device is "
              f"{device}", file=sys.stderr)
        return 2
    sweep = (suite.SWEEP_LAYER, suite.SWEEP_BATCHES) if args.plot else None
    expected = _expected_duration(device, names, args, passes, sweep)
    if expected:
        print(f"gpuconv bench: {expected}", file=sys.stderr, flush=True)
    start = time.perf_counter()
    before = set_autotune(True) if autotune else None
    try:
        result = timing.run_benchmark(names, device=device, dtype=args.dtype, repeat=repeat,
                                      bursts=bursts, batch=args.batch, batch_cap=batch_cap,
                                      peers=getattr(args, "peers", True), sweep=sweep,
                                      quick=args.quick, passes=passes, torch=torch,
                                      clock=clock, dial=_dial(args))
    finally:
        if autotune:
            set_autotune(before)
    result["machine"]["command"] = _command_of(args)
    result["machine"]["autotune"] = autotune
    per_call = None
    if getattr(args, "per_call", True):
        per_call = _per_call(device, torch, args.quick)
        result["machine"]["per_call"] = per_call
    result["machine"]["wall_s"] = round(time.perf_counter() - start, 1)
    print(format_report(result, None if getattr(args, "wide", False) else _report_width()))
    if per_call is not None:
        print("\n" + _percall.format_section(per_call))
    print(f"\n{len(result['records'])} records in {result['machine']['wall_s']:.0f} s")
    if args.json:
        write_json(result, args.json)
        print(f"wrote {args.json}")
    if args.plot:
        from . import plot as _bench_plot
        _bench_plot.plot(result, args.plot)
        print(f"wrote {args.plot}")
    return 0


#: Seconds the CPU forward takes on a quiet 2-core machine: the default suite and --quick.
#: Measured without the dial on the machine BENCHMARKS.md was measured on (load average
#: 0.9-1.5, PyTorch peers, the per-call section included; 64 s and 21 s on 2026-12-04), then
#: scaled by what the dial added side by side on a busier 2-core machine (2026-12-05, load
#: average 1.6-3.1, --no-per-call): the default suite 68.5 -> 81.8 s (x1.19), --quick 29.6 ->
#: 41.8 s and 32.8 -> 32.4 s (x1.19 over the two pairs). Other machines, passes and options
#: take other times.
EXPECTED_CPU_S = {"default": 78, "quick": 26}


def _expected_duration(device, names, args, passes, sweep):
    """A line saying about how long the run will take, before it starts (``None`` where no
    measurement says: other devices, passes, layers or options)."""
    if (device != "cpu" or passes != ("forward",) or sweep or args.batch
            or not getattr(args, "dial", True)):
        return None
    if args.quick and not getattr(args, "layers", None):
        kind = "quick"
    elif tuple(names) == suite.SUITES["default"] and args.repeat in (None, DEFAULT_REPEAT):
        kind = "default"
    else:
        return None
    seconds = EXPECTED_CPU_S[kind]
    what = "--quick" if kind == "quick" else "the default suite; --quick is the short run"
    return (f"about {seconds} s on a quiet 2-core CPU ({what}; longer on a busy machine, "
            "shorter on more cores)")


def _dial(args):
    """The points of the dial to time: :data:`.suite.DIAL` (``--quick``:
    :data:`.suite.QUICK_DIAL`), none with ``--no-dial``."""
    if not getattr(args, "dial", True):
        return ()
    return suite.QUICK_DIAL if args.quick else suite.DIAL


def _report_width():
    """:data:`TABLE_WIDTH`, or the terminal's width when standard output is a wider one."""
    if sys.stdout.isatty():
        import shutil

        return max(TABLE_WIDTH, shutil.get_terminal_size((TABLE_WIDTH, 24)).columns)
    return TABLE_WIDTH


def _per_call(device, torch, quick):
    """The per-call section (:mod:`gpuconv.bench.percall`): tiny shapes, gpuconv beside
    PyTorch's conv2d, on ``device``; with the threads the run used."""
    if torch == "auto":
        torch = impls_mod.load_torch()
    if device == "cuda" and torch is not None and not torch.cuda.is_available():
        torch = None
    return _percall.measure(device, torch, quick=quick)


def _command_of(args):
    """The options as given (for the record)."""
    passes = getattr(args, "passes", None) or ["forward"]
    return command_line("gpuconv bench", [
        ("--device", args.device),
        ("--layers", args.layers) if args.layers else ("--suite", args.suite),
        ("--pass", passes if passes != ["forward"] else None),
        ("--quick", args.quick), ("--no-peers", not getattr(args, "peers", True)),
        ("--no-dial", not getattr(args, "dial", True)),
        ("--one-core", getattr(args, "one_core", False)),
        ("--autotune", getattr(args, "autotune", False)),
        ("--no-per-call", not getattr(args, "per_call", True)),
        ("--batch", args.batch), ("--repeat", args.repeat),
        ("--dtype", args.dtype if args.dtype != "float32" else None)])


def main(argv=None):
    parser = argparse.ArgumentParser(prog="gpuconv bench", description=DESCRIPTION)
    add_arguments(parser)
    return run(parser.parse_args(argv))
