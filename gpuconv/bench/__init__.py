"""``gpuconv bench``: shared against unshared convolution, and both against their peers.

For each layer of a suite, both operations run on the same geometry — :func:`gpuconv.conv2d`
(shared weights) and :func:`gpuconv.local_conv2d` (a kernel per output position) — beside
what a user would pick instead: ``torch.nn.functional.conv2d`` and the ``unfold`` +
``einsum`` recipe when PyTorch is installed, NumPy im2col baselines otherwise (the report
says which ran, and why).

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
- the median of all timed calls is reported with the quartiles, min and max, and every
  timed call in order (``times_s``); on a GPU each call is timed with CUDA events;
- GFLOP/s and GB/s (fewest bytes: inputs, weights and biases read once, output written once)
  are compared with ceilings measured in the same run.

Three passes can be timed (``--pass``; :data:`gpuconv.bench.stats.PASSES`), each with its
own records (field ``pass``), table and summary:

- ``forward`` (the default): ``y = op(x, w) + b``;
- ``backward``: both gradients, ``dL/dx`` and ``dL/dw`` for a given ``dL/dy``
  (:mod:`gpuconv.grad`), against PyTorch's autograd backward of ``conv2d`` (oneDNN / cuDNN)
  and through ``unfold`` + ``einsum``: their forward runs once before the timing with its
  graph retained, and only the backward is timed;
- ``step``: one training step of a layer, forward and backward through autograd:
  ``gpuconv.torch.Conv2d`` against ``torch.nn.Conv2d``, ``gpuconv.torch.LocallyConnected2d``
  against PyTorch-only locally connected layers (``unfold`` + ``einsum``, ``unfold`` +
  ``bmm`` over the positions). It needs PyTorch.

The command also reports what a call costs beyond its kernel on tiny shapes, gpuconv beside
PyTorch's conv2d (:mod:`gpuconv.bench.percall`; ``machine["per_call"]`` in the JSON), and
flags a run whose load average exceeded the core count (``machine["overloaded"]`` and a
warning line): its times then include waits for a core, not only the kernels.

Every comparison is printed as a speedup, one implementation's time over the time of the
one it is compared with: ``peer time / gpuconv time`` (above 1: gpuconv is faster), and,
for what sharing buys, ``local_conv2d time / conv2d time`` (above 1: the shared layer is
faster), the latter as the median and quartiles of the ratios of paired calls (call ``i``
of each, which ran in the same round of bursts).

Public pieces: :data:`LAYERS` and :class:`Layer` (defined in :mod:`gpuconv.workloads`),
:data:`SUITES`, :func:`add_arguments`, :func:`run` (the command), :func:`run_benchmark` (the
records), :func:`format_report`, :func:`format_table`, :func:`format_summary`,
:func:`peer_speedups`, :func:`sharing_speedups`; the numbers in :mod:`gpuconv.bench.stats`,
the implementations and timers in :mod:`gpuconv.bench.peers`.
Importing this module imports neither PyTorch nor matplotlib.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import sys
import textwrap
import time

import numpy as np

from . import percall as _percall
from . import peers as impls_mod
from .stats import (PASSES, format_bytes, geomean, min_bytes, paired_ratios, param_count,
                    pass_flops, reduction_terms, summarize, tolerance)
from ..appkit import machine_info, positive_int
from ..appkit import load_average as _load_average
from ..device import CudaUnavailableError, select_device
from ..workloads import LAYERS, Layer

__all__ = ["Layer", "LAYERS", "SUITES", "QUICK_LAYERS", "PASSES", "PASS_CHOICES",
           "add_arguments", "run", "run_benchmark", "make_record", "format_report",
           "format_table", "format_summary", "peer_speedups", "sharing_speedups",
           "local_bandwidth", "backward_memory", "param_count", "min_bytes", "layer_names",
           "one_core", "resolve_passes", "DTYPES"]


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
DEFAULT_BURSTS, QUICK_BURSTS = 2, 2

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

#: The operations, in the order they are reported.
OPS = ("conv2d", "local_conv2d")

#: ``--dtype`` values. float16 is stored in half precision and accumulated in float32 by
#: gpuconv: its bytes (GB/s, %bw) count 2 per value.
DTYPES = ("float16", "float32", "float64")

#: Why the training step is not timed in float16: gpuconv.torch's layers take float32 and
#: float64 only (gpuconv.conv2d, local_conv2d and gpuconv.grad take float16).
STEP_FLOAT16 = ("not run in float16: the training step is timed in float32 and float64 "
                "(in float16 the peers' own training steps are not what users run: mixed "
                "precision keeps float32 parameters); the forward and the backward take float16")

#: ``--pass`` values: a pass of :data:`PASSES`, or several at once.
PASS_CHOICES = {"forward": ("forward",), "backward": ("backward",), "step": ("step",),
                "both": ("forward", "backward"), "all": PASSES}

#: What each pass times, as the report says it.
PASS_TITLES = {
    "forward": "Forward pass: y = op(x, w) + b",
    "backward": "Backward pass: dL/dx and dL/dw for a given dL/dy (no bias)",
    "step": "Training step of one layer: forward + backward (dL/dx, dL/dw, dL/db) "
            "through autograd",
}


def layer_names():
    return list(LAYERS)


# ----------------------------------------------------------------------------- arguments

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
                             f"{QUICK_MAX_BATCH}, fewer repeats (the forward: well under a minute on "
                             "a CPU)")
    parser.add_argument("--layers", nargs="+", type=_layer_name, metavar="NAME",
                        help=f"run these layers instead of the suite; one of: {', '.join(LAYERS)}")
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
                             f"adds a batch sweep {SWEEP_BATCHES} on {SWEEP_LAYER} (in the "
                             "first pass asked for)")
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


def _unwritable(path):
    """Why ``path`` cannot be written (a short phrase), or ``None`` when it can.

    Opens it for appending, which changes nothing in an existing file, and removes it again
    if it did not exist, so that a bad ``--json`` or ``--plot`` is found before the timing.
    """
    existed = os.path.lexists(path)
    try:
        with open(path, "ab"):
            pass
    except OSError as exc:
        return exc.strerror or str(exc)
    if not existed:
        os.remove(path)
    return None


# ----------------------------------------------------------------------------- machine

def _load_flag(samples):
    """``load_average_max`` (the largest 1-minute load average sampled: at the start, after
    each layer, at the end) and ``overloaded``: whether it exceeded the core count, when
    the timings include waits for a core (scheduler stalls), not only the kernels' time."""
    values = [v for v in samples if v is not None]
    most = max(values) if values else None
    return {"load_average_max": most,
            "overloaded": most is not None and most > (os.cpu_count() or 1)}


def _overload_warning(machine):
    """A warning line for a run whose load exceeded the cores, or None."""
    if not machine.get("overloaded"):
        return None
    return (f"WARNING: the load average reached {machine['load_average_max']} on "
            f"{machine['cores']} cores: other work competed for the cores, and these times "
            "include waits for one (scheduler stalls), not only the kernels; rerun on an idle "
            "machine, or with --one-core (process CPU time)")


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


def _bias_kind(op, pass_name):
    """The bias the timed layer has: one per position for ``local_conv2d`` layers in a
    training step (as ``gpuconv.torch.LocallyConnected2d``), else one per output channel."""
    return "position" if (op, pass_name) == ("local_conv2d", "step") else "channel"


def make_record(op, impl, layer, device, dtype, geom, samples=None, ceilings=None,
                description="", part="suite", pass_name="forward", **extra):
    """One JSON record. ``samples`` (seconds, in the order they were timed) is ``None`` for a
    skipped implementation. ``pass_name``: what was timed (:data:`PASSES`); FLOPs and bytes
    are that pass's (:func:`gpuconv.bench.stats.pass_flops`,
    :func:`~gpuconv.bench.stats.min_bytes`)."""
    itemsize = np.dtype(dtype).itemsize
    bias = _bias_kind(op, pass_name)
    count = param_count(op, geom, bias)
    flops = pass_flops(geom, pass_name)
    nbytes = min_bytes(op, geom, itemsize, pass_name, bias)
    record = {
        "part": part, "pass": pass_name, "op": op, "impl": impl, "description": description,
        "layer": layer, "device": device, "dtype": dtype, **_geometry_fields(geom),
        "params": count.total, "params_weights": count.weights, "params_biases": count.biases,
        "flops": flops, "bytes": nbytes, "flop_per_byte": flops / nbytes,
        "median_s": None, "q1_s": None, "q3_s": None, "min_s": None, "max_s": None,
        "samples": 0, "times_s": [], "gflops": None, "gbs": None,
        "compute_fraction": None, "bandwidth_fraction": None,
        "first_call_s": None, "first_call_in_process": None, "jit": None,
        "peak_extra_bytes": None, "peak_extra_method": None, "result_bytes": None,
        "peak_scratch_bytes": None,
        "grad_weight_bytes": (count.weights * itemsize if pass_name != "forward" else None),
        "kernel_s": None, "kernel_note": None, "call_minus_kernel_s": None,
        "max_rel_diff": None, "tolerance": tolerance(np.dtype(dtype).name,
                                                     reduction_terms(op, geom, pass_name)),
        "skipped": None,
    }
    if samples:
        summary = summarize(samples)
        median = summary["median"]
        record.update(median_s=median, q1_s=summary["q1"], q3_s=summary["q3"],
                      min_s=summary["min"], max_s=summary["max"], samples=summary["count"],
                      times_s=list(samples), gflops=flops / median / 1e9,
                      gbs=nbytes / median / 1e9)
        ceilings = ceilings or {}
        if ceilings.get("compute_gflops"):
            record["compute_fraction"] = record["gflops"] / ceilings["compute_gflops"]
        if ceilings.get("bandwidth_gbs"):
            record["bandwidth_fraction"] = record["gbs"] / ceilings["bandwidth_gbs"]
    record.update(extra)
    if record.get("kernel_s") and record["median_s"]:
        # what the host adds to a call beyond its kernels (checks, allocation, launch)
        record["call_minus_kernel_s"] = record["median_s"] - record["kernel_s"]
    if record["peak_extra_bytes"] is not None and record["result_bytes"] is not None:
        record["peak_scratch_bytes"] = max(0, record["peak_extra_bytes"] - record["result_bytes"])
    return record


# ----------------------------------------------------------------------------- running

class _Progress:
    """What the run says while it runs, on stderr.

    ``mode``: ``"bar"`` (a one-line bar redrawn in place, for a terminal), ``"lines"`` (one
    line when the run starts and one per finished layer, for a log or a pipe) or ``None``
    (nothing). Lines are written in ``"bar"`` mode too, above the bar.
    """

    def __init__(self, total, stream=None, mode="bar"):
        self.stream = stream or sys.stderr
        self.mode = mode if total > 0 else None
        self.total, self.done = total, 0
        self.started = time.perf_counter()

    @classmethod
    def choose(cls, total, progress, stream=None):
        """``progress``: ``None`` (a bar on a terminal, else lines), ``False`` (nothing),
        ``True`` (a bar), or a mode name."""
        stream = stream or sys.stderr
        if progress is None:
            mode = "bar" if stream.isatty() else "lines"
        elif progress is True:
            mode = "bar"
        else:
            mode = progress or None
        return cls(total, stream, mode)

    def _draw(self, label):
        width = 30
        filled = int(width * self.done / self.total)
        self.stream.write(f"\r[{'#' * filled}{'.' * (width - filled)}] "
                          f"{self.done}/{self.total} {label[:40]:<40}")
        self.stream.flush()

    def step(self, label):
        self.done += 1
        if self.mode == "bar":
            self._draw(label)

    def line(self, text):
        """One line of news (both modes), with the seconds since the start."""
        if self.mode is None:
            return
        if self.mode == "bar":
            self.stream.write("\r" + " " * 80 + "\r")
        self.stream.write(f"[{time.perf_counter() - self.started:5.0f} s] {text}\n")
        self.stream.flush()

    def close(self):
        if self.mode == "bar":
            self.stream.write("\r" + " " * 80 + "\r")
            self.stream.flush()


def _plural(count, noun):
    return f"{count} {noun}" + ("" if count == 1 else "s")


def _layer_news(records, done, total):
    """``"[2/4] alexnet-conv1 N=2: conv2d gpuconv 11.3 ms, torch 36 ms; ..."`` (the pass
    after ``N=2`` unless it is the forward)."""
    first = records[0]
    pass_name = first.get("pass", "forward")
    cells = []
    for op in OPS:
        parts = []
        for r in records:
            if r["op"] == op:
                parts.append(f"{r['impl']} {_ms(r['median_s'])} ms" if r["median_s"]
                             else f"{r['impl']} skipped")
        if parts:
            cells.append(f"{op} " + ", ".join(parts))
    label = "" if pass_name == "forward" else f" {pass_name}"
    return f"[{done}/{total}] {first['layer']} N={first['N']}{label}: " + "; ".join(cells)


_CALLED = set()  # (op, impl, device, dtype, pass) called at least once in this process


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


def _normal(rng, shape, dtype):
    """Standard normal values of ``dtype``: float16 ones are drawn in float32, then rounded
    (NumPy draws float32 and float64 only)."""
    dtype = np.dtype(dtype)
    if dtype == np.float16:
        return rng.standard_normal(shape, dtype=np.float32).astype(np.float16)
    return rng.standard_normal(shape, dtype=dtype)


def _random_arrays(rng, geom, dtype):
    """x, shared weight, bias (NumPy), scaled so outputs stay O(1)."""
    fan_in = geom.in_channels_per_group * geom.kernel_height * geom.kernel_width
    scale = np.asarray(1.0 / np.sqrt(fan_in), dtype=dtype)
    x = _normal(rng, (geom.batch, geom.in_channels, geom.in_height, geom.in_width), dtype)
    shared = _normal(rng, geom.shared_weight_shape(), dtype)
    shared *= scale
    bias = _normal(rng, (geom.out_channels,), dtype)
    return x, shared, bias


def _random_on_host(rng, geom, dtype, need_local, pass_name):
    """The arrays of one geometry and pass, drawn by NumPy: x, the shared and (when
    ``need_local``) the unshared weights, the bias (per position too, for the step), dL/dy
    (not for the forward)."""
    x, shared, bias = _random_arrays(rng, geom, dtype)
    local = None
    if need_local:
        local = np.empty(geom.local_weight_shape(), dtype=dtype)
        # Each position its own random kernel, drawn one output channel at a time so the
        # temporary stays small.
        flat = local.reshape(geom.out_channels, -1)
        for row in flat:
            row[:] = _normal(rng, row.shape[0], dtype)
        flat *= np.asarray(1.0 / np.sqrt(geom.in_channels_per_group * geom.kernel_height
                                         * geom.kernel_width), dtype=dtype)
    host = {"x": x, "bias": bias, "conv2d": shared, "local_conv2d": local}
    if pass_name != "forward":
        host["gy"] = _normal(rng, geom.output_shape, dtype)
    if pass_name == "step" and local is not None:
        host["bias_position"] = _normal(
            rng, (geom.out_channels, geom.out_height, geom.out_width), dtype)
    return host


def _random_on_gpu(torch, rng, geom, dtype, need_local, pass_name):
    """The arrays of :func:`_random_on_host`, drawn on the GPU by PyTorch (seeded from
    ``rng``): the unshared weights of the large layers are gigabytes, which the host would
    take seconds to draw and copy."""
    generator = torch.Generator(device="cuda").manual_seed(int(rng.integers(2**62)))
    target = getattr(torch, np.dtype(dtype).name)
    scale = 1.0 / math.sqrt(geom.in_channels_per_group * geom.kernel_height * geom.kernel_width)

    def normal(shape, factor=1.0):
        # drawn in float32 (or float64) and rounded, as on the host
        draw = torch.float64 if target == torch.float64 else torch.float32
        values = torch.randn(tuple(shape), generator=generator, device="cuda", dtype=draw)
        return (values.mul_(factor) if factor != 1.0 else values).to(target)

    arrays = {"x": normal((geom.batch, geom.in_channels, geom.in_height, geom.in_width)),
              "conv2d": normal(geom.shared_weight_shape(), scale),
              "bias": normal((geom.out_channels,)),
              "local_conv2d": normal(geom.local_weight_shape(), scale) if need_local else None}
    if pass_name != "forward":
        arrays["gy"] = normal(geom.output_shape)
    if pass_name == "step" and need_local:
        arrays["bias_position"] = normal((geom.out_channels, geom.out_height, geom.out_width))
    return arrays


class _Unit:
    """One implementation on one geometry, ready to be timed."""

    def __init__(self, impl, fn, geom, layer_name, part, extra):
        self.impl, self.fn, self.geom = impl, fn, geom
        self.layer_name, self.part, self.extra = layer_name, part, extra
        self.samples = []


def _bench_geometries(layer_name, geoms, part, backend, impl_list, dtype, repeat, bursts,
                      ceilings, progress, rng, on_error="raise"):
    """Records for ``geoms`` (one layer's geometries): every implementation in
    ``impl_list`` on each. All (geometry, implementation) pairs take turns in one rotation of
    bursts, so that in a batch sweep a slow spell of the machine does not land on one batch
    size only."""
    skipped, units, keep = [], [], []
    for geom in geoms:
        s, u, k = _prepare(layer_name, geom, backend, impl_list, dtype, part, progress, rng,
                           bursts, on_error)
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
    again ``bursts`` times. On CUDA, then the kernel time of ``repeat`` more calls of each
    (:meth:`~gpuconv.bench.peers.Backend.kernel_seconds`), recorded beside the call time."""
    for _ in range(bursts):
        for unit in units:
            _warm_up(unit.fn, backend)
            unit.samples.extend(backend.time_calls(unit.fn, repeat))
            progress.step(f"{unit.layer_name}: {unit.impl.op} {unit.impl.name}")
    if backend.kind == "cuda":
        for unit in units:
            seconds, reason = backend.kernel_seconds(unit.fn, repeat)
            unit.extra["kernel_s"] = seconds
            unit.extra["kernel_note"] = reason


def _records(skipped, units, impl_list, device, dtype, ceilings):
    records = list(skipped)
    for unit in units:
        impl = unit.impl
        records.append(make_record(impl.op, impl.name, unit.layer_name, device, dtype,
                                   unit.geom, unit.samples, ceilings, impl.description,
                                   unit.part, impl.pass_name, **unit.extra))
    order = {(i.op, i.name): n for n, i in enumerate(impl_list)}
    records.sort(key=lambda r: (r["N"], order[(r["op"], r["impl"])]))
    return records


def _as_tuple(out):
    return out if isinstance(out, tuple) else (out,)


def _prepare(layer_name, geom, backend, impl_list, dtype, part, progress, rng, bursts,
             on_error="raise"):
    """Arrays, first calls, agreement and memory checks for one geometry and one pass (the
    implementations in ``impl_list`` all time the same pass).

    ``on_error="record"``: an implementation whose set-up or first call raises is recorded
    as skipped (``"failed: <exception>"``) and the others run on; ``"raise"``: it raises.

    Returns ``(skipped records, units to time, arrays to keep alive)``.
    """
    device = backend.kind
    itemsize = np.dtype(dtype).itemsize
    pass_name = impl_list[0].pass_name if impl_list else "forward"
    records = []

    def skipped(impl, reason):
        records.append(make_record(impl.op, impl.name, layer_name, device, dtype, geom,
                                   description=impl.description, part=part,
                                   pass_name=impl.pass_name, skipped=reason))

    # Check memory before allocating anything for this layer.
    available = impls_mod.available_memory(backend)
    budget = None if available is None else int(available * MEMORY_FRACTION)
    x_bytes = geom.batch * geom.in_channels * geom.in_height * geom.in_width * itemsize
    gy_bytes = 0 if pass_name == "forward" else math.prod(geom.output_shape) * itemsize
    weight_bytes = {"conv2d": math.prod(geom.shared_weight_shape()) * itemsize,
                    "local_conv2d": math.prod(geom.local_weight_shape()) * itemsize}
    runnable = []
    for impl in impl_list:
        need = (x_bytes + gy_bytes + weight_bytes["conv2d"] + weight_bytes[impl.op]
                + impl.workspace(geom, itemsize))
        if budget is not None and need > budget:
            skipped(impl, f"needs about {format_bytes(need)}; {format_bytes(available)} "
                          f"available (limit {MEMORY_FRACTION:.0%} of it)")
        else:
            runnable.append(impl)
    for _ in range((len(impl_list) - len(runnable)) * (1 + bursts)):
        progress.step(f"{layer_name}: skipped")
    if not runnable:
        return records, [], None

    need_local = any(impl.op == "local_conv2d" for impl in runnable)
    if backend.torch_cuda and not backend.simulator:
        host = _random_on_gpu(backend.torch, rng, geom, dtype, need_local, pass_name)
    else:
        host = _random_on_host(rng, geom, dtype, need_local, pass_name)

    converted = {}  # (array kind, array name) -> that array as the implementation reads it
    arrays = {}  # (array kind, op) -> {"x", "weight", "bias"[, "gy"]}

    def arrays_for(impl):
        key = (impl.array_kind, impl.op)
        if key not in arrays:
            if impl.array_kind == "numpy":
                convert = backend.to_host
            elif impl.array_kind == "torch":
                convert = backend.to_torch
            else:
                convert = backend.to_device

            def once(name):
                cache_key = (impl.array_kind, name)
                if cache_key not in converted:
                    converted[cache_key] = convert(host[name])
                return converted[cache_key]
            bias_name = "bias_position" if _bias_kind(impl.op, pass_name) == "position" \
                else "bias"
            arrays[key] = {"x": once("x"), "bias": once(bias_name), "weight": once(impl.op)}
            if "gy" in host:
                arrays[key]["gy"] = once("gy")
        return arrays[key]

    calls = {}
    extra = {}
    reference = {}
    outputs = {}
    for impl in list(runnable):
        key = (impl.op, impl.name, device, dtype, pass_name)
        first_in_process = key not in _CALLED
        stats_before = _numba_cache_stats() if impl.name == "gpuconv" and device == "cpu" else None
        try:
            fn = impl.make(arrays_for(impl), geom)
            seconds, out = backend.time_first_call(fn)
        except Exception as exc:
            if _half_unsupported(impl, dtype, exc):
                skipped(impl, f"float16 not supported by this peer on {device}: "
                              f"{type(exc).__name__}: {exc}"[:300])
            elif on_error != "record":
                raise
            else:
                skipped(impl, f"failed: {type(exc).__name__}: {exc}"[:300])
            runnable.remove(impl)
            for _ in range(1 + bursts):
                progress.step(f"{layer_name}: failed {impl.op} {impl.name}")
            continue
        calls[impl] = fn
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
        out = _as_tuple(out)
        extra[impl]["result_bytes"] = sum(int(piece.nbytes) for piece in out)
        if impl.canonical is not None:
            out = impl.canonical(out, geom)
        outputs[impl] = tuple(backend.to_host(piece) for piece in out)
        del out
        progress.step(f"{layer_name}: first call {impl.op} {impl.name}")
    # Agreement: every implementation against the first peer of its op (or gpuconv); for
    # several results (gradients) the largest difference, each relative to its reference.
    for impl in runnable:
        peers = [i for i in runnable if i.op == impl.op and i.name != "gpuconv"]
        ref = peers[0] if peers else next(i for i in runnable if i.op == impl.op)
        reference[impl] = ref
        diff = 0.0
        for mine, theirs in zip(outputs[impl], outputs[ref]):
            ref_out = theirs.astype(np.float64)
            scale = float(np.max(np.abs(ref_out))) if ref_out.size else 0.0
            if ref_out.size:
                diff = max(diff, float(np.max(np.abs(mine.astype(np.float64) - ref_out)))
                           / (scale or 1.0))
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


def _half_unsupported(impl, dtype, exc):
    """Whether ``exc``, raised by ``impl``'s set-up or first call, is a peer saying it has no
    float16 kernel here (PyTorch raises ``RuntimeError: "..." not implemented for 'Half'``):
    that peer is skipped, with the reason, and the run goes on."""
    return (np.dtype(dtype) == np.float16 and impl.name != "gpuconv"
            and isinstance(exc, (RuntimeError, NotImplementedError, TypeError)))


def one_core(torch=None):
    """One thread for gpuconv's CPU kernels (Numba) and for PyTorch; returns the clock to
    time them with, ``time.process_time`` (CPU time of the process: time spent waiting for
    a core on a busy machine is not counted)."""
    import numba

    numba.set_num_threads(1)
    if torch is not None:
        torch.set_num_threads(1)
    return time.process_time


def run_benchmark(layers, device="cpu", dtype="float32", repeat=DEFAULT_REPEAT,
                  bursts=DEFAULT_BURSTS, batch=None, batch_cap=None, peers=True,
                  sweep=None, torch="auto", progress=None, quick=False, seed=0, ops=OPS,
                  ceilings=None, clock=None, passes=("forward",), on_error="raise"):
    """Run the benchmark; return ``{"machine": {...}, "records": [...]}``.

    Args:
        layers: layer names (keys of :data:`LAYERS`) or :class:`Layer` objects.
        device: ``"cpu"`` or ``"cuda"`` (already resolved).
        dtype: ``"float32"``, ``"float64"`` or ``"float16"`` (no ``"step"``:
            :data:`STEP_FLOAT16`).
        repeat: timed calls per burst; bursts: bursts per implementation.
        batch: batch size for every layer (``None``: each layer's, for ``device``);
            ``batch_cap`` limits it.
        peers: also time PyTorch (or NumPy) peers.
        sweep: ``None`` or ``(layer name, batches)`` for a batch sweep (records with
            ``part="batch-sweep"``), in the first of ``passes``.
        torch: ``"auto"`` (import it if installed), ``None`` (do not use it), or a module.
        progress: ``None`` (a bar when stderr is a terminal, else a line per layer),
            ``False`` (silent), ``True`` (a bar) or ``"lines"``.
        quick: smaller ceiling measurements.
        ops: the operations to time (both by default).
        ceilings: the ceilings to compare with (``None``: measure them first).
        clock: host timer (default ``time.perf_counter``; :func:`one_core` gives another).
        passes: what to time, of :data:`PASSES`; each layer runs them in that order, each
            pass's implementations in their own rotation of bursts. ``"step"`` without
            PyTorch has nothing to time (``machine["passes_not_run"]`` says why).
        on_error: ``"raise"`` (an implementation that raises stops the run) or ``"record"``
            (it is recorded as skipped, ``"failed: ..."``, and the run goes on).
    """
    problem = None
    if torch == "auto":
        torch = impls_mod.load_torch()
        problem = impls_mod.torch_problem()
    passes = tuple(p for p in PASSES if p in passes)
    backend = impls_mod.Backend(device, torch, clock or time.perf_counter)
    layer_objs = [LAYERS[name] if isinstance(name, str) else name for name in layers]
    impl_list = [i for i in impls_mod.implementations(device, torch, peers, passes)
                 if i.op in ops]
    by_pass = {p: [i for i in impl_list if i.pass_name == p] for p in passes}
    pass_peers = impls_mod.describe_peers_by_pass(device, torch, peers, problem, passes)
    if np.dtype(dtype) == np.float16 and "step" in by_pass:
        by_pass["step"] = []
        pass_peers["step"] = STEP_FLOAT16
    not_run = {p: pass_peers[p] for p in passes if not by_pass[p]}
    by_pass = {p: impls for p, impls in by_pass.items() if impls}
    peers_note = "; ".join(text if name == "forward" else f"{name}: {text}"
                           for name, text in pass_peers.items())
    sweep_batches = ()
    if sweep is not None and by_pass:
        sweep_layer, sweep_batches = sweep
        sweep_layer = LAYERS[sweep_layer] if isinstance(sweep_layer, str) else sweep_layer
        sweep_pass = next(iter(by_pass))
    per_layer = sum(len(impls) for impls in by_pass.values()) * (1 + bursts)
    per_sweep = len(by_pass[sweep_pass]) * (1 + bursts) if sweep_batches else 0
    bar = _Progress.choose(per_layer * len(layer_objs) + per_sweep * len(sweep_batches),
                           progress)
    bar.line(f"gpuconv bench on {device}: {_plural(len(layer_objs), 'layer')}"
             + (f" and a batch sweep of {len(sweep_batches)}" if sweep_batches else "")
             + ("" if passes == ("forward",) else
                f", {'pass' if len(by_pass) == 1 else 'passes'} {', '.join(by_pass) or 'none'}")
             + f"; peers: {peers_note}"
             + ("; measuring the ceilings first" if ceilings is None else ""))
    tf32 = None
    if device == "cuda" and backend.torch_cuda:
        tf32 = (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32)
        torch.backends.cudnn.allow_tf32 = False
        torch.backends.cuda.matmul.allow_tf32 = False
    try:
        if ceilings is None:
            ceilings = impls_mod.measure_ceilings(backend, dtype, quick=quick)
            bar.line(f"ceilings: compute {_num(ceilings.get('compute_gflops'), '.4g')} GFLOP/s, "
                     f"bandwidth {_num(ceilings.get('bandwidth_gbs'), '.4g')} GB/s")
        load_start = _load_average()
        loads = [load_start]
        machine = machine_info(device, torch, ceilings, dtype)
        machine["load_average_start"] = load_start
        machine["peers"] = sorted({f"{i.op}: {i.name}" for i in impl_list
                                   if i.name != "gpuconv" and i.pass_name == "forward"})
        if passes != ("forward",):
            machine["passes"] = list(by_pass)
            machine["passes_not_run"] = not_run
            machine["peers_by_pass"] = {
                p: sorted({f"{i.op}: {i.name}" for i in impls if i.name != "gpuconv"})
                for p, impls in by_pass.items()}
            machine["peers_reason_by_pass"] = pass_peers
        machine["peers_reason"] = peers_note
        if torch is not None and device == "cpu":
            machine["torch_threads"] = torch.get_num_threads()
        machine["timing"] = {"repeat": repeat, "bursts": bursts,
                             "memory_fraction": MEMORY_FRACTION, "warmup_s": WARMUP_S,
                             "clock": getattr(backend.clock, "__name__", str(backend.clock))}
        if device == "cpu":
            import numba

            machine["timing"]["numba_threads"] = numba.get_num_threads()
        rng = np.random.default_rng(seed)
        records = []
        for done, layer in enumerate(layer_objs, 1):
            n = batch or layer.batch(device)
            if batch_cap:
                n = min(n, batch_cap)
            for impls in by_pass.values():
                layer_records = _bench_geometries(layer.name, [layer.geometry(n)], "suite",
                                                  backend, impls, dtype, repeat, bursts,
                                                  ceilings, bar, rng, on_error)
                if layer_records:
                    bar.line(_layer_news(layer_records, done, len(layer_objs)))
                records.extend(layer_records)
            loads.append(_load_average())
        if sweep_batches:
            sweep_records = _bench_geometries(
                sweep_layer.name, [sweep_layer.geometry(n) for n in sweep_batches],
                "batch-sweep", backend, by_pass[sweep_pass], dtype, repeat, bursts, ceilings,
                bar, rng, on_error)
            for done, n in enumerate(sweep_batches, 1):
                bar.line("batch sweep " + _layer_news(
                    [r for r in sweep_records if r["N"] == n], done, len(sweep_batches)))
            records.extend(sweep_records)
        bar.close()
        machine["load_average_end"] = _load_average()
        machine.update(_load_flag(loads + [machine["load_average_end"]]))
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


def _times(value):
    return "-" if value is None else f"{value:.3g}x"


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

#: What the table's less obvious columns mean (printed under it, wrapped).
TABLE_LEGEND = (
    "%cmp = GFLOP/s as a share of the compute reference measured in this run (see Ceilings "
    "below). The reference is a fast library call on one shape, not the hardware peak, so a "
    "kernel that beats it on its own shape shows more than 100 %; it is not an error.",
    "%bw = GB/s (the fewest bytes a call must move / its median time) as a share of the "
    "measured copy bandwidth; above 100 % when the data stays in the caches.",
    "1st call ms = the first call on this layer, not in the medians; * = the first in this "
    "process (JIT compilation, a load from Numba's disk cache, or PyTorch's set-up).",
    "extra MB = peak memory one call allocates, output included (local_conv2d only).",
)

#: The legend of the ``kernel ms`` column (printed when the records have kernel times).
KERNEL_LEGEND = (
    "kernel ms (CUDA) = the device time of the kernels and copies one call queues (PyTorch's "
    "profiler, the mean of as many calls as a burst); median ms - kernel ms is what the host "
    "adds to a call (checks, allocation, launch) when the GPU waits for it.",
)

#: What the tables of the other passes add to the legend (printed when they ran).
PASS_LEGEND = {
    "backward": "backward: gpuconv = gpuconv.grad's input gradient then weight gradient, two "
                "calls; torch and torch-unfold = PyTorch autograd's backward alone "
                "(torch.autograd.grad with retain_graph=True) of F.conv2d and of unfold + "
                "einsum: their forward ran once before the timing, and what it saved for the "
                "backward (unfold's columns) is not in extra MB. GFLOP/s count 2x the "
                "forward's FLOPs (each gradient takes the forward's multiply-adds); GB/s the "
                "fewest bytes of the two gradient calls (the input gradient reads the weights "
                "and dL/dy and writes dL/dx, the weight gradient reads x and dL/dy and writes "
                "dL/dw); extra MB includes the gradients returned.",
    "step": "step: y = layer(x), then torch.autograd.grad(y, (x, weight, bias), dL/dy), every "
            "call; 3x the forward's FLOPs; the local layers have one bias per output position. "
            "torch-unfold = a PyTorch-only layer computing unfold + einsum, weights in "
            "gpuconv's layout; torch-bmm = unfold, then one torch.bmm over the output "
            "positions, weights stored positions-major.",
}


def _has_kernel_times(records):
    return any(r.get("kernel_s") for r in records)


def table_columns(records):
    """The table's columns: :data:`TABLE_COLUMNS`, with ``kernel ms`` after the call's
    quartiles when the records have kernel times (CUDA, with PyTorch's profiler)."""
    if not _has_kernel_times(records):
        return TABLE_COLUMNS
    return TABLE_COLUMNS[:6] + ("kernel ms",) + TABLE_COLUMNS[6:]


def table_rows(records):
    """The table's cells, one tuple per record, formatted from the record's own numbers
    (the columns of :func:`table_columns`)."""
    kernel = _has_kernel_times(records)
    rows = []
    for r in records:
        if r["skipped"]:
            row = (r["layer"], r["op"], r["impl"], str(r["N"]), f"skipped: {r['skipped']}",
                   "", "", "", "", "", "", _count(r["params"]), "")
        else:
            row = (
                r["layer"], r["op"], r["impl"], str(r["N"]), _ms(r["median_s"]),
                f"{_ms(r['q1_s'])}-{_ms(r['q3_s'])}", _num(r["gflops"], ".3g"),
                _num(r["gbs"], ".3g"), _pct(r["compute_fraction"]),
                _pct(r["bandwidth_fraction"]),
                _ms(r["first_call_s"]) + ("*" if r["first_call_in_process"] else ""),
                _count(r["params"]), _mb(r["peak_extra_bytes"]))
        if kernel:
            cell = "" if r["skipped"] else ("-" if not r.get("kernel_s") else _ms(r["kernel_s"]))
            row = row[:6] + (cell,) + row[6:]
        rows.append(row)
    return rows


#: Columns left out, in this order, when the table would be wider than its limit (the JSON
#: and ``--wide`` keep them all): the first call, the quartiles, the parameters, the memory,
#: the bytes per second.
NARROW_DROP = ("1st call ms", "q1-q3 ms", "params", "extra MB", "GB/s")

#: The text table's width on a pipe or in a log, and at least on a terminal.
TABLE_WIDTH = 100


def _table_width(columns, rows):
    widths = [len(c) for c in columns]
    for row in rows:
        if not row[4].startswith("skipped"):
            widths = [max(w, len(cell)) for w, cell in zip(widths, row)]
    return sum(widths) + 2 * (len(widths) - 1)


def fitted_columns(records, width=None):
    """``(columns kept, columns left out)`` so that the table of ``records`` fits ``width``
    characters (``None``: keep all), leaving out :data:`NARROW_DROP` in order."""
    columns = list(table_columns(records))
    rows = table_rows(records)
    dropped = []
    for name in NARROW_DROP:
        if width is None or _table_width(columns, [_pick(row, columns, table_columns(records))
                                                   for row in rows]) <= width:
            break
        if name in columns:
            columns.remove(name)
            dropped.append(name)
    return tuple(columns), tuple(dropped)


def _pick(row, columns, all_columns):
    index = {name: i for i, name in enumerate(all_columns)}
    return tuple(row[index[name]] for name in columns)


def format_table(records, width=None):
    """A plain-text table of ``records`` (the same numbers as the JSON, formatted), at most
    ``width`` characters wide where leaving out :data:`NARROW_DROP` allows (``None``: every
    column)."""
    all_columns = table_columns(records)
    columns, _ = fitted_columns(records, width)
    rows = [_pick(row, columns, all_columns) for row in table_rows(records)]
    widths = [len(c) for c in columns]
    for row in rows:
        if row[4].startswith("skipped"):
            continue
        widths = [max(w, len(cell)) for w, cell in zip(widths, row)]
    right = set(range(3, len(columns)))

    def line(cells):
        out = []
        for i, (cell, width) in enumerate(zip(cells, widths)):
            out.append(cell.rjust(width) if i in right else cell.ljust(width))
        return "  ".join(out).rstrip()

    lines = [line(columns), line(["-" * w for w in widths])]
    previous = None
    for row in rows:
        if previous is not None and row[0] != previous:
            lines.append("")
        previous = row[0]
        if row[4].startswith("skipped"):
            head = line(list(row[:4]) + [""] * (len(columns) - 4))
            lines.append(f"{head}  {row[4]}")
        else:
            lines.append(line(row))
    return "\n".join(lines)


def _pass_of(record):
    """The record's pass (records written before passes existed are forward)."""
    return record.get("pass", "forward")


def _passes(records):
    """The passes present in ``records``, in :data:`PASSES` order."""
    present = {_pass_of(r) for r in records}
    return [p for p in PASSES if p in present]


def _find(records, layer, op, impl, part, n=None, pass_name="forward"):
    for r in records:
        if (r["layer"], r["op"], r["impl"], r["part"]) == (layer, op, impl, part) \
                and _pass_of(r) == pass_name and (n is None or r["N"] == n) and r["median_s"]:
            return r
    return None


def _speedup(slower, faster):
    """``slower``'s median time / ``faster``'s, or ``None`` unless both ran."""
    return None if slower is None or faster is None else slower["median_s"] / faster["median_s"]


def _comparison(op, pass_name, peer):
    """``"conv2d vs torch"`` (forward), ``"conv2d backward vs torch"``."""
    return f"{op} vs {peer}" if pass_name == "forward" else f"{op} {pass_name} vs {peer}"


def peer_speedups(records):
    """Geometric mean, over the layers where both ran, of peer time / gpuconv time, per op,
    pass and peer.

    Returns ``{"conv2d vs torch": {"layers": k, "geomean_speedup": x, "op", "pass",
    "peer"}, "conv2d backward vs torch": ..., ...}`` (the forward's keys without the pass):
    ``x`` above 1 means gpuconv is faster (higher throughput) than that peer on this suite.
    """
    records = [r for r in records if r["part"] == "suite" and r["median_s"]]
    ratios = {}
    for r in records:
        if r["impl"] == "gpuconv":
            continue
        pass_name = _pass_of(r)
        mine = _find(records, r["layer"], r["op"], "gpuconv", "suite", r["N"], pass_name)
        if mine:
            entry = ratios.setdefault(_comparison(r["op"], pass_name, r["impl"]), {
                "op": r["op"], "pass": pass_name, "peer": r["impl"], "values": []})
            entry["values"].append(_speedup(r, mine))
    return {key: {"layers": len(entry["values"]), "geomean_speedup": geomean(entry["values"]),
                  "op": entry["op"], "pass": entry["pass"], "peer": entry["peer"]}
            for key, entry in ratios.items()}


def sharing_speedups(records, part="suite", pass_name="forward"):
    """What sharing buys in time, per layer: gpuconv's local_conv2d time / conv2d time.

    Returns ``{layer: {"N", "speedup", "median", "q1", "q3", "count", "params"}}``:
    ``speedup`` is the ratio of the medians (the table's numbers); ``median``, ``q1`` and
    ``q3`` summarise the ratios of paired calls (call ``i`` of each, timed in the same round
    of bursts; ``None`` for records without ``times_s``); ``params`` is the ratio of the
    parameter counts. Layers where either did not run are left out.
    """
    out = {}
    for r in records:
        if (r["part"], r["op"], r["impl"], _pass_of(r)) != (part, "local_conv2d", "gpuconv",
                                                            pass_name):
            continue
        unshared = _find(records, r["layer"], "local_conv2d", "gpuconv", part, r["N"], pass_name)
        shared = _find(records, r["layer"], "conv2d", "gpuconv", part, r["N"], pass_name)
        if unshared is None or shared is None:
            continue
        paired = paired_ratios(unshared.get("times_s") or [], shared.get("times_s") or [])
        out[r["layer"]] = {"N": r["N"], "speedup": _speedup(unshared, shared),
                           "median": paired and paired["median"],
                           "q1": paired and paired["q1"], "q3": paired and paired["q3"],
                           "count": paired["count"] if paired else 0,
                           "params": unshared["params"] / shared["params"]}
    return out


def local_bandwidth(records, pass_name="backward", ceilings=None):
    """How close gpuconv's local_conv2d comes to streaming its data at the copy bandwidth:
    ``{"layers": {layer: fraction}, "geomean_fraction": x, "count": k, "layers_new": {...},
    "geomean_fraction_new": y}`` over the suite records of ``pass_name``: fraction = fewest
    bytes / median time / measured copy bandwidth (the table's %bw); ``..._new`` the same
    against a copy into a newly allocated array (``ceilings["bandwidth_new_gbs"]``, which a
    call returning a new weight-sized gradient pays too; empty without it). The geometric
    means are ``None`` when nothing was measured."""
    rows = [r for r in records
            if (r["part"], r["op"], r["impl"]) == ("suite", "local_conv2d", "gpuconv")
            and _pass_of(r) == pass_name and r["bandwidth_fraction"]]
    shares = {r["layer"]: r["bandwidth_fraction"] for r in rows}
    new = (ceilings or {}).get("bandwidth_new_gbs")
    shares_new = {r["layer"]: r["gbs"] / new for r in rows} if new else {}
    return {"layers": shares, "geomean_fraction": geomean(shares.values()),
            "count": len(shares), "layers_new": shares_new,
            "geomean_fraction_new": geomean(shares_new.values())}


def backward_memory(records, pass_name="backward"):
    """gpuconv's local_conv2d memory per layer in ``pass_name``: ``{layer: {"peak_extra_bytes"
    (one call's peak allocation, its results included), "peak_scratch_bytes" (beyond the
    results it returns), "grad_weight_bytes" (the weight gradient's size)}}``, the layers
    where the peak was measured."""
    return {r["layer"]: {key: r[key] for key in ("peak_extra_bytes", "peak_scratch_bytes",
                                                 "grad_weight_bytes")}
            for r in records
            if (r["part"], r["op"], r["impl"]) == ("suite", "local_conv2d", "gpuconv")
            and _pass_of(r) == pass_name and r.get("peak_scratch_bytes") is not None}


def _peer_lines(records, layers, width, pass_name):
    """One line per layer: each op against each peer, in ``pass_name``."""
    lines = []
    for name in layers:
        cells = []
        for op in OPS:
            for r in records:
                if r["layer"] != name or r["op"] != op or r["impl"] == "gpuconv" \
                        or _pass_of(r) != pass_name:
                    continue
                mine = _find(records, name, op, "gpuconv", "suite", r["N"], pass_name)
                if not (r["median_s"] and mine):
                    continue
                cell = f"{op} vs {r['impl']} {_times(_speedup(r, mine))}"
                if mine["peak_extra_bytes"] is not None and r["peak_extra_bytes"] is not None:
                    cell += (f" (memory {_mb(mine['peak_extra_bytes'])} vs "
                             f"{_mb(r['peak_extra_bytes'])} MB)")
                cells.append(cell)
        if cells:
            line = f"  {name:<{width}}  " + "   ".join(cells)
            if len(line) > TABLE_WIDTH:  # one cell a line, under the layer's name
                line = f"  {name:<{width}}  " + ("\n" + " " * (width + 4)).join(cells)
            lines.append(line)
    return lines


def _geomean_lines(records, pass_name):
    lines = []
    values = [(key, value) for key, value in peer_speedups(records).items()
              if value["pass"] == pass_name]
    width = 32 if pass_name == "forward" else 38
    for key, value in values:
        lines.append(f"  {key:<{width}} {_times(value['geomean_speedup'])} "
                     f"over {value['layers']} layers")
    return lines


def _local_lines(records, layers, width, pass_name, ceilings=None):
    """gpuconv's local_conv2d in ``pass_name``: share of the copy bandwidth, memory beyond
    its results beside the weight gradient."""
    shares = local_bandwidth(records, pass_name, ceilings)
    memory = backward_memory(records, pass_name)
    if not shares["count"] and not memory:
        return []
    title = (f"gpuconv local_conv2d, {pass_name}: fewest bytes / median time as a share of the "
             "copy bandwidth (it streams weight-sized data)")
    if shares["layers_new"]:
        title += (", and of a copy into a new array (which pays the first touch of a new "
                  "result's pages, as a new weight gradient does)")
    if memory:
        title += ("; peak memory one call allocates beyond the gradients it returns, beside the "
                  "weight gradient's size")
    lines = textwrap.wrap(title, 100)
    columns = [("%copy", lambda name: _pct(shares["layers"].get(name)))]
    if shares["layers_new"]:
        columns.append(("%copy new", lambda name: _pct(shares["layers_new"].get(name))))
    if memory:
        columns += [("beyond gradients MB",
                     lambda name: _mb(memory.get(name, {}).get("peak_scratch_bytes"))),
                    ("weight gradient MB",
                     lambda name: _mb(memory.get(name, {}).get("grad_weight_bytes")))]
    lines.append(f"  {'layer':<{width}}" + "".join(f"  {head:>9}" for head, _ in columns))
    for name in layers:
        if name not in shares["layers"] and name not in memory:
            continue
        lines.append(f"  {name:<{width}}" + "".join(f"  {cell(name):>{max(9, len(head))}}"
                                                   for head, cell in columns))
    summary = []
    if shares["count"]:
        new = ""
        if shares["geomean_fraction_new"] is not None:
            new = f" ({_pct(shares['geomean_fraction_new'])} of a copy into a new array)"
        summary.append(f"geometric mean {_pct(shares['geomean_fraction'])} of copy bandwidth"
                       f"{new} over {_plural(shares['count'], 'layer')}")
    if memory:
        below = sum(m["peak_scratch_bytes"] < m["grad_weight_bytes"] for m in memory.values())
        summary.append(f"extra memory below the weight gradient's size on {below} of "
                       f"{_plural(len(memory), 'layer')}")
    lines.extend(textwrap.wrap("; ".join(summary), 100, initial_indent="  ",
                               subsequent_indent="    "))
    return lines


def format_summary(result):
    """What sharing buys per layer, and gpuconv against its peers (speedups), per pass; for
    the gradients also gpuconv's local_conv2d against the copy bandwidth and its memory."""
    records = [r for r in result["records"] if r["part"] == "suite"]
    layers = list(dict.fromkeys(r["layer"] for r in records))
    width = max([len(name) for name in layers] + [5])
    passes = _passes(records) or ["forward"]
    lines = []
    if "forward" in passes:
        lines += _forward_summary(result, records, layers, width)
    for pass_name in passes:
        if pass_name == "forward":
            continue
        if lines:
            lines.append("")
        lines.append(f"{PASS_TITLES[pass_name]}")
        peer_lines = _peer_lines(records, layers, width, pass_name)
        if peer_lines:
            lines.append("gpuconv vs peers: speedup = peer time / gpuconv time "
                         "(above 1: gpuconv is faster)")
            lines.extend(peer_lines)
            lines.append("")
            lines.append("Geometric mean of the speedups over the layers:")
            lines.extend(_geomean_lines(result["records"], pass_name))
        else:
            lines.append("gpuconv vs peers: no peer ran in this pass (see peers: above)")
        local = _local_lines(records, layers, width, pass_name,
                             result["machine"].get("ceilings"))
        if local:
            lines.append("")
            lines.extend(local)
    firsts = [r for r in result["records"] if r["first_call_in_process"] and r["median_s"]]
    if firsts:
        label_width = 12 if passes == ["forward"] else 21
        lines.append("")
        lines.append("First call in this process (* in the table; not in the medians):")
        for r in firsts:
            how = f", {r['jit']}" if r["jit"] else ""
            label = r["op"] if _pass_of(r) == "forward" else f"{r['op']} {_pass_of(r)}"
            lines.append(f"  {label:<{label_width}}  {r['impl']:<13} "
                         f"{_ms(r['first_call_s']):>8} ms "
                         f"(then {_ms(r['median_s'])} ms{how})")
    agreement = _agreement_line(result["records"], result["machine"].get("dtype"))
    if agreement:
        lines.append("")
        lines.extend(textwrap.wrap(agreement, 100, subsequent_indent="  "))
    ceilings = result["machine"]["ceilings"]
    new = ""
    if passes != ["forward"] and ceilings.get("bandwidth_new_gbs"):
        how = ceilings.get("bandwidth_new_method")
        new = (f"; into a new array {_num(ceilings['bandwidth_new_gbs'], '.4g')} GB/s"
               + (f" ({how})" if how else ""))
    lines.append("")
    lines.append(textwrap.fill(
        f"Ceilings measured in this run: compute "
        f"{_num(ceilings.get('compute_gflops'), '.4g')} GFLOP/s "
        f"({ceilings.get('compute_method', 'not measured')}); bandwidth "
        f"{_num(ceilings.get('bandwidth_gbs'), '.4g')} GB/s "
        f"({ceilings.get('bandwidth_method', 'not measured')}){new}.", 100,
        subsequent_indent="  "))
    return "\n".join(lines)


def _agreement_line(records, dtype):
    """How the results agree with their references (``max_rel_diff`` against the record's
    ``tolerance``): the records outside it, or, in float16 (whose tolerance depends on the
    reduction length), that all are within; ``None`` otherwise."""
    checked = [r for r in records if r.get("max_rel_diff") is not None
               and r.get("tolerance") is not None]
    outside = [r for r in checked if r["max_rel_diff"] > r["tolerance"]]
    if outside:
        return ("Agreement: outside the tolerance (max_rel_diff > tolerance): " + "; ".join(
            f"{r['layer']} {r['op']}{'' if _pass_of(r) == 'forward' else ' ' + _pass_of(r)} "
            f"{r['impl']} vs {r.get('compared_with', '?')} {r['max_rel_diff']:.2g} > "
            f"{r['tolerance']:.2g}" for r in outside))
    if checked and dtype == "float16":
        worst = max(checked, key=lambda r: r["max_rel_diff"] / r["tolerance"])
        return (f"Agreement: all {len(checked)} results within the float16 tolerance of their "
                f"reference (2**-10 + terms * 2**-23, terms = the longest sum behind a value; "
                f"closest: {worst['layer']} {worst['op']} {worst['impl']} "
                f"{worst['max_rel_diff']:.2g} of {worst['tolerance']:.2g}).")
    return None


def _forward_summary(result, records, layers, width):
    """The forward's summary: what sharing buys, gpuconv vs peers, their geometric means."""
    records = [r for r in records if _pass_of(r) == "forward"]
    sharing = sharing_speedups(records)
    lines = ["What sharing buys (gpuconv, same geometry): parameters of local_conv2d / conv2d,",
             "and speedup of conv2d = local_conv2d time / conv2d time (above 1: the shared layer",
             "is faster), the median [quartiles] of the ratios of paired calls (call i of each,",
             "timed in the same round of bursts)"]
    for name in layers:
        params = {r["op"]: r["params"] for r in records if r["layer"] == name}
        cell = sharing.get(name)
        if cell is None:
            time_text = "time: not measured"
        elif cell["median"] is None:
            time_text = f"speedup {_times(cell['speedup'])} (ratio of medians)"
        else:
            time_text = (f"speedup {_times(cell['median'])} [{cell['q1']:.3g}-"
                         f"{cell['q3']:.3g}] over {cell['count']} pairs")
        param_ratio = params["local_conv2d"] / params["conv2d"] if len(params) == 2 else None
        param_text = "-" if param_ratio is None else f"{param_ratio:,.0f}x"
        lines.append(f"  {name:<{width}}  params {param_text:>9}   {time_text}")
    peer_lines = _peer_lines(records, layers, width, "forward")
    if peer_lines:
        lines.append("")
        lines.append("gpuconv vs peers: speedup = peer time / gpuconv time "
                     "(above 1: gpuconv is faster)")
        lines.extend(peer_lines)
        lines.append("")
        lines.append("Geometric mean of the speedups over the layers:")
        lines.extend(_geomean_lines(result["records"], "forward"))
    return lines


def format_header(result):
    m = result["machine"]
    timing = m["timing"]
    where = m["gpu"] if m["device"] == "cuda" and m["gpu"] else m["cpu"]
    load = ""
    if m.get("load_average_start") is not None:
        load = (f", load average {m['load_average_start']} at start, "
                f"{m.get('load_average_end')} at end")
    peers = " " + (m.get("peers_reason") or (", ".join(m.get("peers", ())) or "none"))
    if m.get("peers_reason_by_pass"):  # one line per pass
        peers = "".join("\n" + textwrap.fill(f"  {name}: {text}", 100, subsequent_indent="    ")
                        for name, text in m["peers_reason_by_pass"].items())
    clock = ""
    if timing.get("clock") == "process_time":
        threads = timing.get("numba_threads")
        clock = (f"; timed in process CPU time, {_plural(threads, 'Numba thread')}"
                 if threads else "; timed in process CPU time")
        if m.get("torch_threads"):
            clock += f", {_plural(m['torch_threads'], 'PyTorch thread')}"
    warning = _overload_warning(m)
    first = textwrap.fill(f"gpuconv bench on {m['device']} ({where}, {m['cores']} cores), "
                          f"{m['dtype']}, {m['date']}{load}", 100, subsequent_indent="  ")
    if not m.get("peers_reason_by_pass"):
        peers = textwrap.fill(f"peers:{peers}", 100, subsequent_indent="  ")[len("peers:"):]
    return (f"{first}\n"
            f"peers:{peers}\n"
            f"median of {timing['bursts']} alternating bursts x {timing['repeat']} timed calls"
            f"{clock}" + ("" if warning is None else "\n" + textwrap.fill(warning, 100)))


def format_report(result, width=None):
    """The whole text report: header, table(s) (one per pass) and the legend, batch sweep,
    summary; tables at most ``width`` characters wide where :func:`format_table` can (the
    columns it leaves out are named under them)."""
    suite = [r for r in result["records"] if r["part"] == "suite"]
    passes = _passes(result["records"])
    parts = [format_header(result)]
    dropped = set()

    def table(records):
        dropped.update(fitted_columns(records, width)[1])
        return format_table(records, width)
    if passes in ([], ["forward"]) and not result["machine"].get("passes_not_run"):
        parts += ["", table(suite)]
    else:
        for pass_name in passes:
            parts += ["", f"{PASS_TITLES[pass_name]}:",
                      table([r for r in suite if _pass_of(r) == pass_name])]
        for pass_name, why in result["machine"].get("passes_not_run", {}).items():
            parts += ["", f"{PASS_TITLES[pass_name]}: {why}"]
    legend = (TABLE_LEGEND + (KERNEL_LEGEND if _has_kernel_times(suite) else ())
              + tuple(PASS_LEGEND[p] for p in passes if p in PASS_LEGEND))
    sweep = [r for r in result["records"] if r["part"] == "batch-sweep"]
    sweep_table = table(sweep) if sweep else None
    legend = tuple(text for text in legend
                   if not any(text.startswith(name.split(" ")[0] + " ") or
                              text.startswith(name + " ") for name in dropped))
    if dropped:
        legend += (f"Left out to fit {width} columns (in the JSON, and shown by --wide): "
                   + ", ".join(name for name in NARROW_DROP if name in dropped) + ".",)
    parts += [""] + [textwrap.fill(text, 100, subsequent_indent="  ") for text in legend]
    if sweep:
        label = "" if _pass_of(sweep[0]) == "forward" else f", {_pass_of(sweep[0])}"
        parts += ["", f"Batch sweep ({sweep[0]['layer']}{label}):", sweep_table]
    parts += ["", format_summary(result)]
    return "\n".join(parts)


def write_json(result, path):
    with open(path, "w") as handle:
        json.dump(result, handle, indent=1)
        handle.write("\n")


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
            why = _unwritable(path)
            if why:
                return f"{flag} {path}: cannot write there ({why})"
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
    sweep = (SWEEP_LAYER, SWEEP_BATCHES) if args.plot else None
    expected = _expected_duration(device, names, args, passes, sweep)
    if expected:
        print(f"gpuconv bench: {expected}", file=sys.stderr, flush=True)
    start = time.perf_counter()
    result = run_benchmark(names, device=device, dtype=args.dtype, repeat=repeat,
                           bursts=bursts, batch=args.batch, batch_cap=batch_cap,
                           peers=getattr(args, "peers", True), sweep=sweep,
                           quick=args.quick, passes=passes, torch=torch, clock=clock)
    result["machine"]["command"] = "gpuconv bench " + " ".join(_argv_of(args))
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


#: Seconds the CPU forward took on a quiet 2-core machine (the one BENCHMARKS.md was measured
#: on, load average 0.9-1.5, PyTorch peers, the per-call section included; 64 s and 21 s on
#: 2026-12-04): the default suite and --quick. Other machines, passes and options take other
#: times.
EXPECTED_CPU_S = {"default": 65, "quick": 22}


def _expected_duration(device, names, args, passes, sweep):
    """A line saying about how long the run will take, before it starts (``None`` where no
    measurement says: other devices, passes, layers or options)."""
    if device != "cpu" or passes != ("forward",) or sweep or args.batch:
        return None
    if args.quick and not getattr(args, "layers", None):
        kind = "quick"
    elif tuple(names) == SUITES["default"] and args.repeat in (None, DEFAULT_REPEAT):
        kind = "default"
    else:
        return None
    seconds = EXPECTED_CPU_S[kind]
    what = "--quick" if kind == "quick" else "the default suite; --quick is the short run"
    return (f"about {seconds} s on a quiet 2-core CPU ({what}; longer on a busy machine, "
            "shorter on more cores)")


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


def resolve_passes(names):
    """The passes ``--pass NAME...`` asks for (:data:`PASS_CHOICES`), in :data:`PASSES`
    order; ``("forward",)`` for none."""
    wanted = set()
    for name in names or ["forward"]:
        wanted.update(PASS_CHOICES[name])
    return tuple(p for p in PASSES if p in wanted)


def _argv_of(args):
    """The options as given (for the record)."""
    out = [f"--device {args.device}"]
    if args.layers:
        out.append("--layers " + " ".join(args.layers))
    else:
        out.append(f"--suite {args.suite}")
    passes = getattr(args, "passes", None) or ["forward"]
    if passes != ["forward"]:
        out.append("--pass " + " ".join(passes))
    for flag, value in (("--quick", args.quick), ("--no-peers", not getattr(args, "peers", True)),
                        ("--one-core", getattr(args, "one_core", False)),
                        ("--no-per-call", not getattr(args, "per_call", True))):
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
