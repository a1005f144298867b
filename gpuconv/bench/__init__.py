"""``gpuconv bench``: shared against unshared convolution, and both against their peers.

For each layer of a suite, both operations run on the same geometry — :func:`gpuconv.conv2d`
(shared weights) and :func:`gpuconv.local_conv2d` (a kernel per output position) — beside
what a user would pick instead: ``torch.nn.functional.conv2d`` and the ``unfold`` +
``einsum`` recipe when PyTorch is installed, NumPy im2col baselines otherwise.

How the timing is done (the machines this runs on are noisy):

- the arrays are random, generated once per layer outside the timing; every implementation
  reads the same ones (bias: one per output channel);
- the first call of each implementation on each layer is timed on its own and reported as
  ``first_call_s``; ``first_call_in_process`` says whether it was the first call of that
  implementation in the process (so it includes JIT compilation, or loading it from Numba's
  disk cache — ``jit`` says which for gpuconv on the CPU);
- then implementations run in alternating bursts — untimed calls for at least
  :data:`WARMUP_S` (at least one), then ``repeat`` timed calls back to back — ``bursts``
  times round (A A A A, B B B B, ..., A A A A, ...);
- the median of all timed calls is reported with the quartiles, min and max; on a GPU each
  call is timed with CUDA events;
- GFLOP/s and GB/s (fewest bytes: inputs, weights and bias read once, output written once)
  are compared with ceilings measured in the same run.

Public pieces: :data:`LAYERS` and :class:`Layer` (defined in :mod:`gpuconv.workloads`),
:data:`SUITES`, :func:`add_arguments`, :func:`run` (the command), :func:`run_benchmark` (the
records), :func:`format_table`, :func:`format_summary`.
Importing this module imports neither PyTorch nor matplotlib.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import math
import os
import platform
import statistics
import sys
import time

import numpy as np

from . import peers as impls_mod
from ..device import CudaUnavailableError, select_device
from ..params import conv2d_param_count, local_conv2d_param_count
from ..workloads import LAYERS, Layer

__all__ = ["Layer", "LAYERS", "SUITES", "QUICK_LAYERS", "add_arguments", "run",
           "run_benchmark", "make_record", "format_table", "format_summary", "layer_names"]


#: Named suites: layer names in the order they run.
SUITES = {
    "default": ("seed-conv1", "seed-conv2", "alexnet-conv1", "resnet50-res2-3x3",
                "vgg16-conv5_1", "deepface-l4", "deepface-l5", "deepface-l6"),
    "full": tuple(LAYERS),
}
#: ``--quick``: these layers (unless ``--layers`` or ``--suite full``), batch at most
#: :data:`QUICK_MAX_BATCH`, fewer timed calls.
QUICK_LAYERS = ("seed-conv2", "alexnet-conv1", "deepface-l5", "deepface-l6")
QUICK_MAX_BATCH = 2

#: Timed calls per burst, and bursts per implementation.
DEFAULT_REPEAT, QUICK_REPEAT = 5, 2
DEFAULT_BURSTS, QUICK_BURSTS = 3, 2

#: ``--plot``: the batch sweep that makes the cost model visible.
SWEEP_LAYER = "deepface-l5"
SWEEP_BATCHES = (1, 2, 4, 8)

#: Untimed warm-up before each burst: calls for at least this many seconds (at least one).
#: OpenBLAS's threads keep spinning for about 0.1 s after a NumPy matmul; with 50 ms of
#: warm-up, gpuconv's bursts after the NumPy peers ran 2-5x slow with wide quartiles
#: (deepface-l5/l6, measured side by side), with 250 ms they match their solo times.
WARMUP_S = 0.25

#: Skip what needs more than this fraction of the memory available when a layer starts.
MEMORY_FRACTION = 0.7


def layer_names():
    return list(LAYERS)


# ----------------------------------------------------------------------------- arguments

def _positive_int(text):
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _layer_name(text):
    key = text.strip().lower()
    if key not in LAYERS:
        raise argparse.ArgumentTypeError(
            f"unknown layer {text!r}; accepted: {', '.join(LAYERS)}")
    return key


def add_arguments(parser):
    """Add the ``bench`` options to ``parser`` (an ``argparse.ArgumentParser``)."""
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                        help="where to run (default: auto, as gpuconv.select_device)")
    parser.add_argument("--suite", choices=tuple(SUITES), default="default",
                        help="default: a few layers of each kind; full: every layer")
    parser.add_argument("--quick", action="store_true",
                        help=f"reduced run: layers {', '.join(QUICK_LAYERS)}, batch <= "
                             f"{QUICK_MAX_BATCH}, fewer repeats (well under a minute on a CPU)")
    parser.add_argument("--layers", nargs="+", type=_layer_name, metavar="NAME",
                        help=f"run these layers instead of the suite; one of: {', '.join(LAYERS)}")
    parser.add_argument("--batch", type=_positive_int, metavar="N",
                        help="batch size for every layer (default: each layer's own, per device)")
    parser.add_argument("--dtype", choices=("float32", "float64"), default="float32")
    parser.add_argument("--repeat", type=_positive_int, metavar="R",
                        help=f"timed calls per burst (default {DEFAULT_REPEAT}, "
                             f"--quick {QUICK_REPEAT}); each implementation runs "
                             f"{DEFAULT_BURSTS} bursts ({QUICK_BURSTS} with --quick)")
    parser.add_argument("--no-peers", dest="peers", action="store_false",
                        help="time gpuconv only (no PyTorch / NumPy comparison)")
    parser.add_argument("--json", metavar="PATH", help="write machine and records as JSON")
    parser.add_argument("--plot", metavar="PATH",
                        help="write a PNG (needs matplotlib: pip install 'gpuconv[bench]'); "
                             f"adds a batch sweep {SWEEP_BATCHES} on {SWEEP_LAYER}")
    return parser


def _plan(args):
    """``(layer names, repeat, bursts, batch_cap)`` from parsed arguments."""
    if args.layers:
        names = list(dict.fromkeys(args.layers))
    elif args.quick and args.suite == "default":
        names = list(QUICK_LAYERS)
    else:
        names = list(SUITES[args.suite])
    repeat = args.repeat or (QUICK_REPEAT if args.quick else DEFAULT_REPEAT)
    bursts = QUICK_BURSTS if args.quick else DEFAULT_BURSTS
    batch_cap = QUICK_MAX_BATCH if args.quick else None
    return names, repeat, bursts, batch_cap


# ----------------------------------------------------------------------------- machine

def _cpu_model():
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info(device, torch, ceilings, dtype):
    import numba

    info = {
        "cpu": _cpu_model(),
        "cores": os.cpu_count(),
        "os": platform.platform(),
        "python": platform.python_version(),
        "numpy": np.__version__,
        "numba": numba.__version__,
        "torch": getattr(torch, "__version__", None),
        "gpuconv": _gpuconv_version(),
        "device": device,
        "gpu": None,
        "dtype": dtype,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "ceilings": ceilings,
    }
    info["git_commit"], info["git_modified"] = _git_state()
    if device == "cuda":
        try:
            from numba import cuda
            info["gpu"] = cuda.get_current_device().name
            if isinstance(info["gpu"], bytes):
                info["gpu"] = info["gpu"].decode()
        except Exception:
            pass
    return info


def _git_state():
    """``(commit, modified package files)`` when gpuconv runs from a git checkout."""
    import subprocess

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        commit = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=root,
                                capture_output=True, text=True, timeout=5)
        if commit.returncode != 0:
            return None, None
        status = subprocess.run(["git", "status", "--porcelain", "--", "gpuconv"], cwd=root,
                                capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None, None
    modified = sorted(line[3:] for line in status.stdout.splitlines() if line.strip())
    return commit.stdout.strip(), modified


def _load_average():
    """1-minute load average (other work on the machine skews the timings), or None."""
    try:
        return round(os.getloadavg()[0], 2)
    except (OSError, AttributeError):
        return None


def _gpuconv_version():
    from .. import __version__
    return __version__


# ----------------------------------------------------------------------------- records

def _geometry_fields(geom):
    return {
        "N": geom.batch, "C_in": geom.in_channels, "H": geom.in_height, "W": geom.in_width,
        "C_out": geom.out_channels, "kH": geom.kernel_height, "kW": geom.kernel_width,
        "stride": [geom.stride_h, geom.stride_w],
        "padding": [geom.pad_top, geom.pad_bottom, geom.pad_left, geom.pad_right],
        "dilation": [geom.dilation_h, geom.dilation_w], "groups": geom.groups,
        "H_out": geom.out_height, "W_out": geom.out_width,
    }


def param_count(op, geom):
    """Learnable numbers of the layer as timed (bias: one per output channel)."""
    kernel = (geom.kernel_height, geom.kernel_width)
    if op == "conv2d":
        return conv2d_param_count(geom.in_channels, geom.out_channels, kernel, geom.groups, True)
    return local_conv2d_param_count(geom.in_channels, geom.out_channels, kernel,
                                    (geom.out_height, geom.out_width), geom.groups, "channel")


def min_bytes(op, geom, itemsize):
    """Fewest bytes moved: input, weights and biases read once, output written once."""
    count = param_count(op, geom)
    inputs = geom.batch * geom.in_channels * geom.in_height * geom.in_width
    outputs = geom.batch * geom.out_channels * geom.out_height * geom.out_width
    return (inputs + count.total + outputs) * itemsize


def _quantile(sorted_samples, q):
    """Linear-interpolated quantile of sorted samples."""
    if len(sorted_samples) == 1:
        return sorted_samples[0]
    position = q * (len(sorted_samples) - 1)
    low = int(position)
    high = min(low + 1, len(sorted_samples) - 1)
    return sorted_samples[low] + (sorted_samples[high] - sorted_samples[low]) * (position - low)


def make_record(op, impl, layer, device, dtype, geom, samples=None, ceilings=None,
                description="", part="suite", **extra):
    """One JSON record. ``samples`` (seconds) is ``None`` for a skipped implementation."""
    itemsize = np.dtype(dtype).itemsize
    count = param_count(op, geom)
    flops = geom.flops
    nbytes = min_bytes(op, geom, itemsize)
    record = {
        "part": part, "op": op, "impl": impl, "description": description, "layer": layer,
        "device": device, "dtype": dtype, **_geometry_fields(geom),
        "params": count.total, "params_weights": count.weights, "params_biases": count.biases,
        "flops": flops, "bytes": nbytes, "flop_per_byte": flops / nbytes,
        "median_s": None, "q1_s": None, "q3_s": None, "min_s": None, "max_s": None,
        "samples": 0, "gflops": None, "gbs": None,
        "compute_fraction": None, "bandwidth_fraction": None,
        "first_call_s": None, "first_call_in_process": None, "jit": None,
        "peak_extra_bytes": None, "peak_extra_method": None,
        "max_rel_diff": None, "skipped": None,
    }
    if samples:
        ordered = sorted(samples)
        median = statistics.median(ordered)
        record.update(median_s=median, q1_s=_quantile(ordered, 0.25),
                      q3_s=_quantile(ordered, 0.75), min_s=ordered[0], max_s=ordered[-1],
                      samples=len(ordered), gflops=flops / median / 1e9,
                      gbs=nbytes / median / 1e9)
        ceilings = ceilings or {}
        if ceilings.get("compute_gflops"):
            record["compute_fraction"] = record["gflops"] / ceilings["compute_gflops"]
        if ceilings.get("bandwidth_gbs"):
            record["bandwidth_fraction"] = record["gbs"] / ceilings["bandwidth_gbs"]
    record.update(extra)
    return record


# ----------------------------------------------------------------------------- running

class _Progress:
    """A one-line progress bar on stderr, drawn only when stderr is a terminal."""

    def __init__(self, total, stream=None, enabled=None):
        self.stream = stream or sys.stderr
        self.enabled = (self.stream.isatty() if enabled is None else enabled) and total > 0
        self.total, self.done = total, 0

    def step(self, label):
        self.done += 1
        if not self.enabled:
            return
        width = 30
        filled = int(width * self.done / self.total)
        self.stream.write(f"\r[{'#' * filled}{'.' * (width - filled)}] "
                          f"{self.done}/{self.total} {label[:40]:<40}")
        self.stream.flush()

    def close(self):
        if self.enabled:
            self.stream.write("\r" + " " * 80 + "\r")
            self.stream.flush()


_CALLED = set()  # (op, impl, device, dtype) called at least once in this process


def _numba_cache_stats():
    """(hits, misses) of gpuconv's CPU kernels' Numba disk cache so far in this process."""
    try:
        from numba.core.dispatcher import Dispatcher

        from .. import cpu as _cpu
    except Exception:
        return None
    hits = misses = 0
    for value in _cpu.jit_functions():
        if isinstance(value, Dispatcher):
            hits += sum(value.stats.cache_hits.values())
            misses += sum(value.stats.cache_misses.values())
    return hits, misses


def _random_arrays(rng, geom, dtype):
    """x, shared weight, local weight, bias (NumPy), scaled so outputs stay O(1)."""
    fan_in = geom.in_channels_per_group * geom.kernel_height * geom.kernel_width
    scale = np.asarray(1.0 / np.sqrt(fan_in), dtype=dtype)
    x = rng.standard_normal((geom.batch, geom.in_channels, geom.in_height, geom.in_width),
                            dtype=dtype)
    shared = rng.standard_normal(geom.shared_weight_shape(), dtype=dtype)
    shared *= scale
    bias = rng.standard_normal((geom.out_channels,), dtype=dtype)
    return x, shared, bias


def _nbytes(shape, itemsize):
    size = 1
    for dim in shape:
        size *= dim
    return size * itemsize


def _fmt_bytes(nbytes):
    return f"{nbytes / 1e9:.2f} GB" if nbytes >= 1e8 else f"{nbytes / 1e6:.1f} MB"


class _Unit:
    """One implementation on one geometry, ready to be timed."""

    def __init__(self, impl, fn, geom, layer_name, part, extra):
        self.impl, self.fn, self.geom = impl, fn, geom
        self.layer_name, self.part, self.extra = layer_name, part, extra
        self.samples = []


def _bench_layer(layer_name, geom, backend, impl_list, dtype, repeat, bursts, ceilings,
                 part, progress, rng):
    """Records for one geometry: every implementation in ``impl_list`` (both ops)."""
    skipped, units, keep = _prepare(layer_name, geom, backend, impl_list, dtype, part,
                                    progress, rng, bursts)
    _time_units(units, backend, repeat, bursts, progress)
    records = _records(skipped, units, impl_list, backend.kind, dtype, ceilings)
    del units, keep
    gc.collect()
    return records


def _bench_sweep(layer, batches, backend, impl_list, dtype, repeat, bursts, ceilings,
                 progress, rng):
    """The batch sweep: every (batch, implementation) in one rotation of bursts, so that
    a slow spell of the machine does not land on one batch size only."""
    skipped, units, keep = [], [], []
    for n in batches:
        s, u, k = _prepare(layer.name, layer.geometry(n), backend, impl_list, dtype,
                           "batch-sweep", progress, rng, bursts)
        skipped += s
        units += u
        keep.append(k)
    _time_units(units, backend, repeat, bursts, progress)
    records = _records(skipped, units, impl_list, backend.kind, dtype, ceilings)
    del units, keep
    gc.collect()
    return records


def _warm_up(fn, backend):
    """Untimed calls, at least one and for at least :data:`WARMUP_S`: long enough for the
    previous library's spinning threads to let go of the cores and this one's to wake."""
    start = time.perf_counter()
    fn()
    while time.perf_counter() - start < WARMUP_S:
        fn()
    backend.synchronize()


def _time_units(units, backend, repeat, bursts, progress):
    """Alternating bursts: each unit warms up untimed, then ``repeat`` timed calls; round
    again ``bursts`` times."""
    for _ in range(bursts):
        for unit in units:
            _warm_up(unit.fn, backend)
            unit.samples.extend(backend.time_calls(unit.fn, repeat))
            progress.step(f"{unit.layer_name}: {unit.impl.op} {unit.impl.name}")


def _records(skipped, units, impl_list, device, dtype, ceilings):
    records = list(skipped)
    for unit in units:
        impl = unit.impl
        records.append(make_record(impl.op, impl.name, unit.layer_name, device, dtype,
                                   unit.geom, unit.samples, ceilings, impl.description,
                                   unit.part, **unit.extra))
    order = {(i.op, i.name): n for n, i in enumerate(impl_list)}
    records.sort(key=lambda r: (r["N"], order[(r["op"], r["impl"])]))
    return records


def _prepare(layer_name, geom, backend, impl_list, dtype, part, progress, rng, bursts):
    """Arrays, first calls, agreement and memory checks for one geometry.

    Returns ``(skipped records, units to time, arrays to keep alive)``.
    """
    device = backend.kind
    itemsize = np.dtype(dtype).itemsize
    records = []
    descriptions = {(i.op, i.name): i.description for i in impl_list}

    def skipped(impl, reason):
        records.append(make_record(impl.op, impl.name, layer_name, device, dtype, geom,
                                   description=impl.description, part=part, skipped=reason))

    # Check memory before allocating anything for this layer.
    available = impls_mod.available_memory(backend)
    budget = None if available is None else int(available * MEMORY_FRACTION)
    x_bytes = _nbytes((geom.batch, geom.in_channels, geom.in_height, geom.in_width), itemsize)
    weight_bytes = {"conv2d": _nbytes(geom.shared_weight_shape(), itemsize),
                    "local_conv2d": _nbytes(geom.local_weight_shape(), itemsize)}
    runnable = []
    for impl in impl_list:
        need = (x_bytes + weight_bytes["conv2d"] + weight_bytes[impl.op]
                + impl.workspace(geom, itemsize))
        if budget is not None and need > budget:
            skipped(impl, f"needs about {_fmt_bytes(need)}; {_fmt_bytes(available)} available "
                          f"(limit {MEMORY_FRACTION:.0%} of it)")
        else:
            runnable.append(impl)
    for _ in range((len(impl_list) - len(runnable)) * (1 + bursts)):
        progress.step(f"{layer_name}: skipped")
    if not runnable:
        return records, [], None

    x, shared, bias = _random_arrays(rng, geom, dtype)
    local = None
    if any(impl.op == "local_conv2d" for impl in runnable):
        local = np.empty(geom.local_weight_shape(), dtype=dtype)
        # Each position its own random kernel, drawn one output channel at a time so the
        # temporary stays small.
        flat = local.reshape(geom.out_channels, -1)
        for row in flat:
            row[:] = rng.standard_normal(row.shape[0], dtype=dtype)
        flat *= np.asarray(1.0 / np.sqrt(geom.in_channels_per_group * geom.kernel_height
                                         * geom.kernel_width), dtype=dtype)
    host = {"x": x, "bias": bias, "conv2d": shared, "local_conv2d": local}

    converted = {}  # (array kind, array name) -> that array as the implementation reads it
    arrays = {}  # (array kind, op) -> {"x", "weight", "bias"}

    def arrays_for(impl):
        key = (impl.array_kind, impl.op)
        if key not in arrays:
            if impl.array_kind == "numpy":
                convert = np.asarray
            elif impl.array_kind == "torch":
                convert = backend.to_torch
            else:
                convert = backend.to_device

            def once(name):
                cache_key = (impl.array_kind, name)
                if cache_key not in converted:
                    converted[cache_key] = convert(host[name])
                return converted[cache_key]
            arrays[key] = {"x": once("x"), "bias": once("bias"), "weight": once(impl.op)}
        return arrays[key]

    calls = {}
    extra = {}
    reference = {}
    outputs = {}
    for impl in runnable:
        fn = impl.make(arrays_for(impl), geom)
        calls[impl] = fn
        key = (impl.op, impl.name, device, dtype)
        first_in_process = key not in _CALLED
        stats_before = _numba_cache_stats() if impl.name == "gpuconv" and device == "cpu" else None
        seconds, out = backend.time_first_call(fn)
        _CALLED.add(key)
        jit = None
        if stats_before is not None and first_in_process:
            stats_after = _numba_cache_stats()
            if stats_after is not None:
                if stats_after[1] > stats_before[1]:
                    jit = "compiled"
                elif stats_after[0] > stats_before[0]:
                    jit = "loaded from Numba's disk cache"
        extra[impl] = {"first_call_s": seconds, "first_call_in_process": first_in_process,
                       "jit": jit}
        outputs[impl] = backend.to_host(out)
        del out
        progress.step(f"{layer_name}: first call {impl.op} {impl.name}")
    # Agreement: every implementation against the first peer of its op (or gpuconv).
    for impl in runnable:
        peers = [i for i in runnable if i.op == impl.op and i.name != "gpuconv"]
        ref = peers[0] if peers else next(i for i in runnable if i.op == impl.op)
        reference[impl] = ref
        ref_out = outputs[ref].astype(np.float64)
        scale = float(np.max(np.abs(ref_out))) or 1.0
        diff = float(np.max(np.abs(outputs[impl].astype(np.float64) - ref_out))) / scale
        extra[impl]["max_rel_diff"] = diff
        extra[impl]["compared_with"] = ref.name
    outputs.clear()
    gc.collect()
    # Peak memory of the unshared implementations (one extra call each, not timed).
    for impl in runnable:
        if impl.op == "local_conv2d":
            peak, method = impls_mod.peak_extra_bytes(
                impl, calls[impl], backend, geom.out_height * geom.out_width * geom.groups)
            extra[impl].update(peak_extra_bytes=peak, peak_extra_method=method)
    units = [_Unit(impl, calls[impl], geom, layer_name, part, extra[impl])
             for impl in runnable]
    return records, units, (host, converted, arrays)


def run_benchmark(layers, device="cpu", dtype="float32", repeat=DEFAULT_REPEAT,
                  bursts=DEFAULT_BURSTS, batch=None, batch_cap=None, peers=True,
                  sweep=None, torch="auto", progress=None, quick=False, seed=0):
    """Run the benchmark; return ``{"machine": {...}, "records": [...]}``.

    Args:
        layers: layer names (keys of :data:`LAYERS`) or :class:`Layer` objects.
        device: ``"cpu"`` or ``"cuda"`` (already resolved).
        dtype: ``"float32"`` or ``"float64"``.
        repeat: timed calls per burst; bursts: bursts per implementation.
        batch: batch size for every layer (``None``: each layer's, for ``device``);
            ``batch_cap`` limits it.
        peers: also time PyTorch (or NumPy) peers.
        sweep: ``None`` or ``(layer name, batches)`` for a batch sweep (records with
            ``part="batch-sweep"``).
        torch: ``"auto"`` (import it if installed), ``None`` (do not use it), or a module.
        progress: ``None`` (a bar when stderr is a terminal), ``False`` or ``True``.
        quick: smaller ceiling measurements.
    """
    if torch == "auto":
        torch = impls_mod.load_torch()
    backend = impls_mod.Backend(device, torch)
    layer_objs = [LAYERS[name] if isinstance(name, str) else name for name in layers]
    impl_list = impls_mod.implementations(device, torch, peers)
    tf32 = None
    if device == "cuda" and backend.torch_cuda:
        tf32 = (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32)
        torch.backends.cudnn.allow_tf32 = False
        torch.backends.cuda.matmul.allow_tf32 = False
    try:
        ceilings = impls_mod.measure_ceilings(backend, dtype, quick=quick)
        load_start = _load_average()
        machine = machine_info(device, torch, ceilings, dtype)
        machine["load_average_start"] = load_start
        machine["peers"] = sorted({f"{i.op}: {i.name}" for i in impl_list if i.name != "gpuconv"})
        if torch is not None and device == "cpu":
            machine["torch_threads"] = torch.get_num_threads()
        machine["timing"] = {"repeat": repeat, "bursts": bursts,
                             "memory_fraction": MEMORY_FRACTION}
        sweep_batches = ()
        if sweep is not None:
            sweep_layer, sweep_batches = sweep
            sweep_layer = LAYERS[sweep_layer] if isinstance(sweep_layer, str) else sweep_layer
        per_geom = len(impl_list) * (1 + bursts)
        bar = _Progress(per_geom * (len(layer_objs) + len(sweep_batches)),
                        enabled=progress)
        rng = np.random.default_rng(seed)
        records = []
        for layer in layer_objs:
            n = batch or layer.batch(device)
            if batch_cap:
                n = min(n, batch_cap)
            records.extend(_bench_layer(layer.name, layer.geometry(n), backend, impl_list,
                                        dtype, repeat, bursts, ceilings, "suite", bar, rng))
        if sweep_batches:
            records.extend(_bench_sweep(sweep_layer, sweep_batches, backend, impl_list, dtype,
                                        repeat, bursts, ceilings, bar, rng))
        bar.close()
        machine["load_average_end"] = _load_average()
    finally:
        if tf32 is not None:
            torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = tf32
    return {"machine": machine, "records": records}


# ----------------------------------------------------------------------------- output

def _ms(seconds):
    return "-" if seconds is None else f"{seconds * 1e3:.4g}"


def _num(value, fmt):
    return "-" if value is None else format(value, fmt)


def _pct(value):
    return "-" if value is None else f"{value * 100:.1f}%"


def _count(value):
    """Parameters in a short readable form: 750, 62.7M, 1.85G."""
    if value < 10_000:
        return str(value)
    for divisor, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if value >= divisor:
            return f"{value / divisor:.3g}{suffix}"
    return str(value)  # pragma: no cover


def _mb(nbytes):
    return "-" if nbytes is None else f"{nbytes / 1e6:.1f}"


TABLE_COLUMNS = ("layer", "op", "impl", "N", "median ms", "q1-q3 ms", "GFLOP/s", "GB/s",
                 "%cmp", "%bw", "1st call ms", "params", "extra MB")


def table_rows(records):
    """The table's cells, one tuple per record, formatted from the record's own numbers."""
    rows = []
    for r in records:
        if r["skipped"]:
            rows.append((r["layer"], r["op"], r["impl"], str(r["N"]),
                         f"skipped: {r['skipped']}", "", "", "", "", "", "",
                         _count(r["params"]), ""))
            continue
        rows.append((
            r["layer"], r["op"], r["impl"], str(r["N"]), _ms(r["median_s"]),
            f"{_ms(r['q1_s'])}-{_ms(r['q3_s'])}", _num(r["gflops"], ".3g"),
            _num(r["gbs"], ".3g"), _pct(r["compute_fraction"]),
            _pct(r["bandwidth_fraction"]),
            _ms(r["first_call_s"]) + ("*" if r["first_call_in_process"] else ""),
            _count(r["params"]), _mb(r["peak_extra_bytes"])))
    return rows


def format_table(records):
    """A plain-text table of ``records`` (the same numbers as the JSON, formatted)."""
    rows = table_rows(records)
    widths = [len(c) for c in TABLE_COLUMNS]
    for row in rows:
        if row[4].startswith("skipped"):
            continue
        widths = [max(w, len(cell)) for w, cell in zip(widths, row)]
    right = {3, 4, 5, 6, 7, 8, 9, 10, 11, 12}

    def line(cells):
        out = []
        for i, (cell, width) in enumerate(zip(cells, widths)):
            out.append(cell.rjust(width) if i in right else cell.ljust(width))
        return "  ".join(out).rstrip()

    lines = [line(TABLE_COLUMNS), line(["-" * w for w in widths])]
    previous = None
    for row in rows:
        if previous is not None and row[0] != previous:
            lines.append("")
        previous = row[0]
        if row[4].startswith("skipped"):
            head = line(list(row[:4]) + [""] * 9)
            lines.append(f"{head}  {row[4]}")
        else:
            lines.append(line(row))
    return "\n".join(lines)


def _find(records, layer, op, impl, part, n=None):
    for r in records:
        if (r["layer"], r["op"], r["impl"], r["part"]) == (layer, op, impl, part) \
                and (n is None or r["N"] == n) and r["median_s"]:
            return r
    return None


def _ratio(a, b):
    return None if a is None or b is None else a["median_s"] / b["median_s"]


def peer_speedups(records):
    """Geometric mean, over the layers where both ran, of peer time / gpuconv time.

    Returns ``{"conv2d vs torch": {"layers": k, "geomean_speedup": x}, ...}``: ``x`` above 1
    means gpuconv is faster (higher throughput) than that peer on this suite.
    """
    records = [r for r in records if r["part"] == "suite" and r["median_s"]]
    ratios = {}
    for r in records:
        if r["impl"] == "gpuconv":
            continue
        mine = _find(records, r["layer"], r["op"], "gpuconv", "suite")
        if mine:
            ratios.setdefault(f"{r['op']} vs {r['impl']}", []).append(r["median_s"] / mine["median_s"])
    return {key: {"layers": len(values),
                  "geomean_speedup": math.exp(sum(map(math.log, values)) / len(values))}
            for key, values in ratios.items()}


def format_summary(result):
    """What sharing buys per layer, and gpuconv against its peers (ratios of medians)."""
    records = [r for r in result["records"] if r["part"] == "suite"]
    layers = list(dict.fromkeys(r["layer"] for r in records))
    lines = ["What sharing buys (gpuconv, same geometry): parameters and time of "
             "local_conv2d / conv2d"]
    width = max([len(name) for name in layers] + [5])
    for name in layers:
        params = {r["op"]: r["params"] for r in records if r["layer"] == name}
        shared = _find(records, name, "conv2d", "gpuconv", "suite")
        unshared = _find(records, name, "local_conv2d", "gpuconv", "suite")
        ratio = _ratio(unshared, shared)
        param_ratio = params["local_conv2d"] / params["conv2d"]
        time_text = "time: not measured" if ratio is None else f"time {ratio:.3g}x"
        lines.append(f"  {name:<{width}}  params {param_ratio:,.0f}x   {time_text}")
    peer_lines = []
    for name in layers:
        cells = []
        for op in ("conv2d", "local_conv2d"):
            mine = _find(records, name, op, "gpuconv", "suite")
            for r in records:
                if r["layer"] == name and r["op"] == op and r["impl"] != "gpuconv" \
                        and r["median_s"] and mine:
                    cell = f"{op} vs {r['impl']} {mine['median_s'] / r['median_s']:.3g}x"
                    if mine["peak_extra_bytes"] is not None and r["peak_extra_bytes"] is not None:
                        cell += (f" (extra memory {_mb(mine['peak_extra_bytes'])} vs "
                                 f"{_mb(r['peak_extra_bytes'])} MB)")
                    cells.append(cell)
        if cells:
            peer_lines.append(f"  {name:<{width}}  " + "   ".join(cells))
    if peer_lines:
        lines.append("")
        lines.append("gpuconv vs peers: time of gpuconv / time of the peer "
                     "(above 1: gpuconv is slower)")
        lines.extend(peer_lines)
        lines.append("")
        lines.append("Geometric mean over the layers of peer time / gpuconv time "
                     "(above 1: gpuconv is faster):")
        for key, value in peer_speedups(result["records"]).items():
            lines.append(f"  {key:<32} {value['geomean_speedup']:.3g}x "
                         f"over {value['layers']} layers")
    firsts = [r for r in result["records"] if r["first_call_in_process"] and r["median_s"]]
    if firsts:
        lines.append("")
        lines.append("First call in this process (* in the table; not in the medians):")
        for r in firsts:
            how = f", {r['jit']}" if r["jit"] else ""
            lines.append(f"  {r['op']:<12}  {r['impl']:<13} {_ms(r['first_call_s']):>8} ms "
                         f"(median afterwards {_ms(r['median_s'])} ms{how})")
    ceilings = result["machine"]["ceilings"]
    lines.append("")
    lines.append(f"Ceilings measured in this run: compute "
                 f"{_num(ceilings.get('compute_gflops'), '.4g')} GFLOP/s "
                 f"({ceilings.get('compute_method', 'not measured')}); bandwidth "
                 f"{_num(ceilings.get('bandwidth_gbs'), '.4g')} GB/s "
                 f"({ceilings.get('bandwidth_method', 'not measured')}).")
    return "\n".join(lines)


def format_header(result):
    m = result["machine"]
    timing = m["timing"]
    where = m["gpu"] if m["device"] == "cuda" and m["gpu"] else m["cpu"]
    load = ""
    if m.get("load_average_start") is not None:
        load = (f", load average {m['load_average_start']} at start, "
                f"{m.get('load_average_end')} at end")
    return (f"gpuconv bench on {m['device']} ({where}, {m['cores']} cores), {m['dtype']}, "
            f"{m['date']}{load}\nmedian of {timing['bursts']} alternating bursts x "
            f"{timing['repeat']} timed calls; extra MB = peak memory one call allocates, "
            f"output included (local_conv2d only)")


def format_report(result):
    parts = [format_header(result), "", format_table(
        [r for r in result["records"] if r["part"] == "suite"])]
    sweep = [r for r in result["records"] if r["part"] == "batch-sweep"]
    if sweep:
        parts += ["", f"Batch sweep ({sweep[0]['layer']}):", format_table(sweep)]
    parts += ["", format_summary(result)]
    return "\n".join(parts)


def write_json(result, path):
    with open(path, "w") as handle:
        json.dump(result, handle, indent=1)
        handle.write("\n")


def run(args):
    """The ``bench`` command. Returns the exit code."""
    if args.plot:
        try:
            from . import plot as _bench_plot
            _bench_plot.require_matplotlib()
        except ImportError as exc:
            print(f"gpuconv bench: --plot needs matplotlib ({exc}); "
                  "install it with: pip install 'gpuconv[bench]'", file=sys.stderr)
            return 2
    try:
        device = select_device(device=args.device)
    except (CudaUnavailableError, ValueError) as exc:
        print(f"gpuconv bench: {exc}", file=sys.stderr)
        return 2
    names, repeat, bursts, batch_cap = _plan(args)
    sweep = (SWEEP_LAYER, SWEEP_BATCHES) if args.plot else None
    start = time.perf_counter()
    result = run_benchmark(names, device=device, dtype=args.dtype, repeat=repeat,
                           bursts=bursts, batch=args.batch, batch_cap=batch_cap,
                           peers=getattr(args, "peers", True), sweep=sweep,
                           quick=args.quick)
    result["machine"]["command"] = "gpuconv bench " + " ".join(_argv_of(args))
    result["machine"]["wall_s"] = round(time.perf_counter() - start, 1)
    print(format_report(result))
    print(f"\n{len(result['records'])} records in {result['machine']['wall_s']:.0f} s")
    if args.json:
        write_json(result, args.json)
        print(f"wrote {args.json}")
    if args.plot:
        from . import plot as _bench_plot
        _bench_plot.plot(result, args.plot)
        print(f"wrote {args.plot}")
    return 0


def _argv_of(args):
    """The options as given (for the record)."""
    out = [f"--device {args.device}"]
    if args.layers:
        out.append("--layers " + " ".join(args.layers))
    else:
        out.append(f"--suite {args.suite}")
    for flag, value in (("--quick", args.quick), ("--no-peers", not getattr(args, "peers", True))):
        if value:
            out.append(flag)
    for flag, value in (("--batch", args.batch), ("--repeat", args.repeat)):
        if value:
            out.append(f"{flag} {value}")
    if args.dtype != "float32":
        out.append(f"--dtype {args.dtype}")
    return out


def main(argv=None):
    parser = argparse.ArgumentParser(prog="gpuconv bench", description=__doc__.split("\n")[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
