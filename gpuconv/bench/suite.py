"""What ``gpuconv bench`` computes: the suites of layers, the passes, and one record per
(layer, operation, implementation, pass).

The layers themselves (:data:`LAYERS`, :class:`Layer`) are :mod:`gpuconv.workloads`'; the
numbers a record carries (FLOPs, bytes, quantiles, tolerances) are :mod:`.stats`'.
"""

from __future__ import annotations

import numpy as np

from ..workloads import LAYERS, Layer  # noqa: F401  (Layer: re-exported)
from .stats import (PASSES, min_bytes, param_count, pass_flops, reduction_terms, summarize,
                    tolerance)

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


#: The operations, in the order they are reported: the shared end of the dial, the tiled
#: points on it, the unshared end.
OPS = ("conv2d", "tiled_conv2d", "local_conv2d")


#: The points of the sharing dial that ``gpuconv bench`` times in the forward pass beside the
#: two ends: ``(tiling, (T_h, T_w))`` for :func:`gpuconv.tiled_conv2d`; ``--quick`` times
#: :data:`QUICK_DIAL`. On the CPU a tiled call with a few slots costs about what a
#: local_conv2d call does (measured: ``gpuconv bench --quick``), so each point adds about
#: one local_conv2d call per timed call of a layer.
DIAL = (("periodic", (2, 2)), ("blocks", (4, 4)))


QUICK_DIAL = (("blocks", (4, 4)),)


def dial_label(tiling, tiles):
    """``"periodic 2x2"``: a point of the dial as the reports name it."""
    return f"{tiling} {tiles[0]}x{tiles[1]}"


def series_label(record):
    """The operation of a record as the reports name it: ``conv2d``, ``local_conv2d``, or
    ``tiled_conv2d`` with its point on the dial (``tiled_conv2d periodic 2x2``)."""
    if record.get("tiles"):
        return f"{record['op']} {dial_label(record['tiling'], record['tiles'])}"
    return record["op"]


def series_key(record):
    """What tells a record's implementation apart from the others on the same layer: the
    operation, the implementation and, for ``tiled_conv2d``, its tiling and tiles."""
    tiles = record.get("tiles")
    return (record["op"], record["impl"], record.get("tiling"),
            None if tiles is None else tuple(tiles))


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
                description="", part="suite", pass_name="forward", tiles=None, tiling=None,
                **extra):
    """One JSON record. ``samples`` (seconds, in the order they were timed) is ``None`` for a
    skipped implementation. ``pass_name``: what was timed (:data:`PASSES`); FLOPs and bytes
    are that pass's (:func:`gpuconv.bench.stats.pass_flops`,
    :func:`~gpuconv.bench.stats.min_bytes`). ``tiled_conv2d`` records carry ``"tiles":
    [T_h, T_w]`` and ``"tiling"`` (the others have neither key), and their parameters and
    bytes count ``T_h T_w`` kernels."""
    itemsize = np.dtype(dtype).itemsize
    bias = _bias_kind(op, pass_name)
    count = param_count(op, geom, bias, tiles)
    flops = pass_flops(geom, pass_name)
    nbytes = min_bytes(op, geom, itemsize, pass_name, bias, tiles)
    dial = {} if tiles is None else {"tiles": list(tiles), "tiling": tiling}
    record = {
        "part": part, "pass": pass_name, "op": op, "impl": impl, **dial,
        "description": description,
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
                                                     reduction_terms(op, geom, pass_name,
                                                                     tiles)),
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


def resolve_passes(names):
    """The passes ``--pass NAME...`` asks for (:data:`PASS_CHOICES`), in :data:`PASSES`
    order; ``("forward",)`` for none."""
    wanted = set()
    for name in names or ["forward"]:
        wanted.update(PASS_CHOICES[name])
    return tuple(p for p in PASSES if p in wanted)
