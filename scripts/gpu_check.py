"""The GPU acceptance run: one command that checks and times gpuconv's CUDA path.

    PYTHONPATH=. python scripts/gpu_check.py [--budget-s 450] [--quick] [--only PHASE ...]
                                             [--skip PHASE ...] [--plan] [--dry-run]

Run from the source tree on a machine with an NVIDIA GPU, PyTorch (a CUDA build), numba,
numba-cuda and, where present, CuPy and compute-sanitizer. A GPU is lent to the project rarely
and briefly, so the run is planned: the phases below run in this order (correctness first),
each with an estimate of its time from the kernels it compiles and the calls it makes
(:func:`plan`); a phase that would not fit the rest of ``--budget-s`` is skipped with a line,
and a phase stops between items when the budget runs out. The default budget fits 8 minutes
on an H200 with JIT compilation included.

1. ``env`` -- versions of Python, NumPy, numba, numba-cuda, NVVM, nvJitLink, the driver, the
   CUDA runtime, PyTorch, cuDNN, CuPy; the GPU, its clocks; the commit. Printed first. A
   numba-cuda / NumPy pair known not to compile stops the run here with the fix.
2. ``suite`` -- every kernel the benchmark times: each default-suite layer's own forward
   specialisation of both operations, at the smallest batch that selects the same kernels as
   the layer's GPU batch, in float32 and float16, against float64 PyTorch
   (``F.conv2d``; ``unfold`` + ``einsum`` for the unshared layer); and the unshared
   forward's weight-streaming kernels of small batches (:func:`small_batch_items`).
3. ``suite-gradients`` -- the four gradient functions on every default-suite layer likewise,
   against PyTorch autograd in float64.
4. ``multipass`` -- paths that only real sizes reach: a batch beyond one block's share and not
   a multiple of it, input channels that leave a partial chunk, the conv2d weight gradient's
   slices.
5. ``determinism`` -- the six functions called twice give bitwise equal results; a batch of
   more than 65,535 images (the grid's limit along y and z) through all six.
6. ``memcheck`` -- ``compute-sanitizer --tool memcheck`` on tiny calls of every forward and
   gradient kernel, float32 and float16.
7. ``time-forward`` -- ``gpuconv bench`` on the default suite at the GPU batch: gpuconv beside
   the PyTorch peers, call time (CUDA events) and kernel time (PyTorch's profiler), the share of
   the roofline, what the host adds. A result outside the tolerance of its peer fails.
8. ``overhead`` -- the per-call cost of tiny calls on CUDA tensors beside ``F.conv2d``, the
   steps of one call's host path with launches on the fast path and through Numba's
   dispatcher (:mod:`gpuconv.cuda.fastlaunch`; the two paths' results must be bitwise
   equal), how CUDA tensors are read (shape, strides, pointer and current stream must equal
   what PyTorch's own property and ``torch.cuda.current_stream`` say, also on a side
   stream; a difference fails) and what that reading costs beside PyTorch's property, the
   host time of each gradient call beside ``torch.nn.grad``'s, and a profile of where
   gpuconv's host time goes. The last lines of every run say whether
   any kernel left the fast path, and why.
9. ``time-backward``, ``time-step`` -- the gradients and a training step of the PyTorch layers.
10. ``candidates`` -- every forward kernel the dispatcher weighs
    (:func:`gpuconv.cuda.kernels.forward_candidates`: conv2d's direct kernel and its implicit
    GEMM on each tile, local_conv2d's batched and per-position GEMMs on each tile), launched
    directly on each default-suite layer at its GPU batch: checked against float64 PyTorch,
    timed back to back, each beside the model's prediction; on ResNet-50 res2 (64 maps, the
    edge of the rule) also the local input gradient through columns against the gather. A
    line per layer says whether the dispatcher picked the fastest; the table calibrates the
    model. The staging rounds' loads in flight, raised on the model's word alone, are timed
    at both counts (:data:`EARLIER_LOADS`): the local forward's batched GEMM where it is the
    pick, and the local input gradient's gather on :data:`LOADS_LAYERS`; a line each gives
    the measured ratio beside the predicted one. The small batches' weight-streaming kernel
    on every layer at batches 8 and 1, each launch timed alone with L2 emptied first, as a
    share of a device copy's rate measured in the same run (the target: 70 %), beside the
    model's share; on a few layers also storing the outputs a position at a time instead of
    in runs (:data:`STREAM_RUN_CASES`), the model's fastest launch where it is far ahead of
    the pick (:func:`searched_stream_config`) and under the earlier map rule
    (:func:`earlier_stream_config`). Then
    ``gpuconv.set_autotune(True)`` as a user turns it on, on the last layer: the choice it
    makes, checked against the reference.
11. ``array-kinds`` -- torch, CuPy, Numba and NumPy arrays in and out, a side stream,
    non-contiguous inputs (an unbatched conv2d and a conv1d on strided Numba arrays too), an
    operand written on a PyTorch side stream beside a Numba one, an empty batch, NaN
    propagation.
12. ``grid`` -- awkward geometries (:func:`geometry_grid`): every feature of the forward in
    float64, float32 and float16, and of the gradients.
13. ``time-float16`` -- the forward in float16 on the default suite.
14. ``racecheck``, ``synccheck`` -- compute-sanitizer's race and barrier checks on the tiny
    calls of ``memcheck``.

``--dry-run`` needs no GPU: it turns on Numba's CUDA simulator itself (before Numba is
imported), runs every phase's logic at tiny sizes (tiny layers stand in for the suite, a
batch of 3 for the 65,535 limit), skips with a line what the machine lacks (CuPy,
compute-sanitizer, a CUDA build of PyTorch), and makes no timing claims; the simulator's
seconds are not the GPU's, so the budget stops a dry run only when ``--budget-s`` is given. A
test runs it, so the script cannot rot between GPU runs. ``--plan`` prints the phases, their
counts and estimates, and exits.

Everything is printed; the JSON and a short text summary go to ``$OUT/gpu_check.json`` and
``$OUT/gpu_check_summary.txt`` when ``OUT`` is set (or ``--json``). Exit status 0 when every
check that ran passed, 1 when one failed, 2 when the run could not start.
"""

from __future__ import annotations

import os
import sys

if __name__ == "__main__" and "--dry-run" in sys.argv[1:]:
    # The simulator must be chosen before Numba is first imported (by gpuconv below).
    os.environ["NUMBA_ENABLE_CUDASIM"] = "1"
    # Its GPU threads are Python threads meeting at barriers: a short switch interval
    # hands the interpreter round faster (about twice as fast with barriers).
    sys.setswitchinterval(5e-4)

import argparse  # noqa: E402
import cProfile  # noqa: E402
import functools  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import platform  # noqa: E402
import pstats  # noqa: E402
import re  # noqa: E402
import shutil  # noqa: E402
import subprocess  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402
from typing import NamedTuple  # noqa: E402

import numpy as np  # noqa: E402

from gpuconv import bench, workloads  # noqa: E402
from gpuconv.bench import peers  # noqa: E402
from gpuconv.bench.stats import (min_bytes, reduction_terms, tolerance,  # noqa: E402
                                  within_tolerance)
from gpuconv.geometry import conv_geometry  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# --------------------------------------------------------------------------------------------
# what is checked (CPU-side, importable without a GPU)
# --------------------------------------------------------------------------------------------

#: The forward operations and the gradient functions of each (input, weight).
FORWARD_OPS = ("conv2d", "local_conv2d")
GRAD_FUNCTIONS = {"conv2d": ("conv2d_input", "conv2d_weight"),
                  "local_conv2d": ("local_conv2d_input", "local_conv2d_weight")}
ALL_FUNCTIONS = FORWARD_OPS + tuple(f for pair in GRAD_FUNCTIONS.values() for f in pair)

#: The dtypes of the correctness checks, as torch dtype names; the suite's kernels are
#: checked in the two the benchmark times.
DTYPES = ("float64", "float32", "float16")
SUITE_DTYPES = ("float32", "float16")

#: A batch beyond the grid's limit of 65,535 blocks along y and z.
BIG_BATCH = 70_000


class Case(NamedTuple):
    """One correctness geometry (public argument forms)."""

    name: str
    n: int
    c_in: int
    h: int
    w: int
    c_out: int
    kernel: tuple       # (kH, kW)
    stride: tuple
    padding: tuple      # (pad_h, pad_w), both sides, or "same"
    dilation: tuple
    groups: int
    bias: str | None    # None, "channel", "position" (local only)


def geometry_grid(quick=False):
    """Awkward geometries on purpose (not multiples of any tile, odd kernels, stride >
    kernel, batch 1, one channel, outputs of size 1, partial channel blocks, uneven
    padding)."""
    cases = [
        Case("basic", 2, 3, 17, 19, 5, (3, 3), (1, 1), (0, 0), (1, 1), 1, None),
        Case("pad_bias", 3, 4, 33, 35, 10, (3, 3), (1, 1), (1, 1), (1, 1), 1, "channel"),
        Case("stride2", 2, 3, 31, 29, 7, (5, 5), (2, 2), (2, 2), (1, 1), 1, "channel"),
        Case("stride4_k11", 2, 3, 67, 67, 12, (11, 11), (4, 4), (0, 0), (1, 1), 1, "channel"),
        Case("stride_gt_kernel", 3, 2, 20, 21, 3, (2, 2), (3, 3), (0, 0), (1, 1), 1, None),
        Case("rect", 2, 5, 23, 41, 9, (3, 5), (1, 2), (1, 2), (1, 1), 1, "channel"),
        Case("dilation", 2, 4, 30, 27, 6, (3, 3), (1, 1), (2, 3), (2, 3), 1, "channel"),
        Case("groups", 2, 8, 19, 18, 12, (3, 3), (1, 1), (1, 1), (1, 1), 4, "channel"),
        Case("depthwise", 2, 16, 15, 14, 16, (3, 3), (1, 1), (1, 1), (1, 1), 16, None),
        Case("k1", 4, 64, 14, 14, 40, (1, 1), (1, 1), (0, 0), (1, 1), 1, "channel"),
        Case("k7_s2", 2, 3, 45, 45, 17, (7, 7), (2, 2), (3, 3), (1, 1), 1, "channel"),
        Case("many_channels", 2, 70, 9, 9, 33, (3, 3), (1, 1), (1, 1), (1, 1), 1, "channel"),
        Case("batch1_one_channel", 1, 1, 40, 70, 1, (5, 5), (1, 1), (0, 0), (1, 1), 1, None),
        Case("output_1x1", 3, 2, 7, 7, 3, (7, 7), (1, 1), (0, 0), (1, 1), 1, "channel"),
        Case("local_position_bias", 5, 3, 12, 13, 6, (3, 3), (1, 1), (1, 1), (1, 1), 1,
             "position"),
        Case("big_batch", 37, 4, 11, 12, 5, (3, 3), (1, 2), (1, 0), (1, 1), 1, "channel"),
        Case("same_even_kernel", 2, 4, 16, 15, 6, (2, 4), (1, 1), "same", (1, 2), 2,
             "channel"),
    ]
    return cases[:6] if quick else cases


#: The gradient checks' cases (names in :func:`geometry_grid`).
GRAD_CASES = ("basic", "pad_bias", "stride2", "stride_gt_kernel", "rect", "dilation", "groups",
              "output_1x1", "big_batch", "same_even_kernel")

#: Tiny cases that stand in for the grid in a dry run (the simulator runs every GPU thread as
#: a Python thread): stride, padding, dilation, groups and both bias kinds between them.
DRY_GRID = (
    Case("dry_stride_pad", 2, 2, 7, 6, 3, (3, 3), (2, 1), (1, 1), (1, 1), 1, "channel"),
    Case("dry_groups_dilation", 1, 4, 7, 7, 2, (2, 2), (1, 1), (1, 0), (2, 1), 2, "position"),
)


def grad_grid(quick=False):
    """The cases the gradient functions are checked on: :data:`GRAD_CASES` (quick: the first
    four)."""
    by_name = {case.name: case for case in geometry_grid()}
    names = GRAD_CASES[:4] if quick else GRAD_CASES
    return [by_name[name] for name in names]


def case_geometry(case):
    """The :class:`~gpuconv.geometry.ConvGeometry` of a :class:`Case`."""
    return conv_geometry((case.n, case.c_in, case.h, case.w), case.kernel, case.c_out,
                         case.stride, case.padding, case.dilation, case.groups)


def layer_case(layer, batch, bias="channel"):
    """A :class:`Case` for a benchmark layer (:class:`~gpuconv.workloads.Layer`) at ``batch``."""
    k, s, p = layer.kernel, layer.stride, layer.padding
    return Case(f"{layer.name}@{batch}", batch, layer.in_channels, layer.size, layer.size,
                layer.out_channels, (k, k), (s, s), (p, p), (1, 1), layer.groups, bias)


def terms(name, geom):
    """The most products one value of the result of ``name`` sums on ``geom``: a forward
    operation (bias included), or a gradient function (the input gradient ``(C_out/g) kH
    kW``; the weight gradient ``N H_out W_out`` for conv2d, ``N`` for local_conv2d).
    float16's tolerance grows with it."""
    if name in FORWARD_OPS:
        return reduction_terms(name, geom, "forward")
    window = geom.kernel_height * geom.kernel_width
    if name.endswith("_input"):
        return geom.out_channels_per_group * window
    positions = geom.out_height * geom.out_width
    return geom.batch * (positions if name == "conv2d_weight" else 1)


def kernel_names(name, geom, dtype="float32"):
    """The CUDA kernel specialisations one call of ``name`` (a function of
    :data:`ALL_FUNCTIONS`) launches on ``geom``, from the same configuration functions the
    launches use (the dispatcher's choice of each gradient's kernel: direct, or implicit or
    batched GEMM). Compiles nothing."""
    from gpuconv.cuda import kernels, launch

    configs = {"conv2d": kernels.conv2d_config,
               "local_conv2d": launch.local_conv2d_forward_config,  # streaming at N <= 8
               "conv2d_input": launch.conv2d_input_grad_config,    # direct or implicit GEMM
               "conv2d_weight": launch.conv2d_weight_grad_config,
               "local_conv2d_input": launch.local_conv2d_input_grad_config,
               "local_conv2d_weight": launch.local_conv2d_weight_grad_config}
    config = configs[name](geom, np.dtype(dtype).type)
    names = [config.kernel.name]
    if name == "conv2d_weight" and not (config.slices == 1 and config.scratch_elements == 0):
        names.append(f"sum_slices_{np.dtype(dtype).name}")
    if name == "local_conv2d" and config.slices > 1:  # split-K partial sums, added in order
        names.append(f"sum_slices_{np.dtype(dtype).name}")
    if name == "local_conv2d_weight" and getattr(config, "slices", 1) > 1:  # batch slices
        names.append(f"sum_slices_{np.dtype(dtype).name}")
    if name == "local_conv2d_weight" and hasattr(config, "blocks_m"):  # a GEMM a position
        names.append(config.transpose.name)
    if name == "local_conv2d_input" and hasattr(config, "col2im"):  # many maps: columns
        names += [config.transpose.name, config.col2im.name]
    return tuple(names)


def reduced_batch(layer, functions, dtype="float32"):
    """The smallest batch (a power of two, or the GPU batch itself) at which every function
    of ``functions`` launches the same kernels on ``layer`` as at the layer's GPU batch: the
    correctness check then runs the benchmark's own kernels at a fraction of the cost."""
    full = layer.batch_gpu
    target = [kernel_names(f, layer.geometry(full), dtype) for f in functions]
    batch = 1
    while batch < full:
        if [kernel_names(f, layer.geometry(batch), dtype) for f in functions] == target:
            return batch
        batch *= 2
    return full


#: Tiny layers that stand in for the default suite in a dry run.
DRY_LAYERS = (
    workloads.Layer("dry-a", "Dry A", 2, 2, 2, 6, 3, 3, 1, 0, "tiny stand-in"),
    workloads.Layer("dry-b", "Dry B", 2, 2, 4, 6, 2, 3, 2, 1, "tiny stand-in", groups=2),
)


#: Batches at which the local forward streams the weights (a kernel per batch): every
#: suite layer at the largest, the first layer at the others listed too.
SMALL_BATCHES = (8, 1, 3)


def small_batch_items(layers, dry_run=False):
    """``[(layer, function, geometry, dtype)]``: the local forward's weight-streaming
    kernels, which the dispatcher picks for batches of at most 8 (the suite's GPU batches
    are larger): each layer at batch 8 in float32 and float16, the first layer at batches 1
    and 3 in float32 (a dry run: batch 1 only, its layers' batches being small already)."""
    if dry_run:
        return [(layers[0], "local_conv2d", layers[0].geometry(1), "float32")]
    items = [(layer, "local_conv2d", layer.geometry(SMALL_BATCHES[0]), dtype)
             for layer in layers for dtype in SUITE_DTYPES]
    return items + [(layers[0], "local_conv2d", layers[0].geometry(b), "float32")
                    for b in SMALL_BATCHES[1:]]


def suite_items(layers, dry_run=False):
    """``[(layer, function, geometry, dtype)]`` of the ``suite`` phase, which the plan counts
    and the run checks: each forward on each layer in each dtype of :data:`SUITE_DTYPES`
    at its reduced batch (:func:`reduced_batch`; a dry run: the layer's own batch), then
    :func:`small_batch_items`."""
    items = []
    for layer in layers:
        for op in FORWARD_OPS:
            for dtype in SUITE_DTYPES:
                batch = layer.batch_gpu if dry_run else reduced_batch(layer, (op,), dtype)
                items.append((layer, op, layer.geometry(batch), dtype))
    return items + small_batch_items(layers, dry_run)


#: Loads per thread of a staging round before the counts of today
#: (:data:`gpuconv.cuda.kernels.LOCAL_INPUT_LOADS`,
#: :data:`gpuconv.cuda.local_grad_gemm.STAGE_LOADS`), which were raised on the model's
#: word alone (it charges one round trip per round): the ``candidates`` phase times both.
EARLIER_LOADS = 2
# the names of the kernels at the earlier count end so
_EARLIER_SUFFIXES = (f"_x{EARLIER_LOADS}", f"_g{EARLIER_LOADS}")
#: Layers whose local input gradient is timed at both counts where the gather is picked (a
#: few-map layer and a DeepFace one: the model predicts 1.40x and 1.50x from the count).
LOADS_LAYERS = ("seed-conv2", "deepface-l4")

#: Batches at which the ``candidates`` phase times the weight-streaming local forward on
#: every layer, against the device-to-device copy rate measured in the same run (the
#: target: at least 70 % of it at batches up to 8).
STREAM_TIMED_BATCHES = (8, 1)
#: ``(layer, batch)`` where the streaming kernel is also timed under the map rule before
#: exact map counts and rounds of up to 8 maps (:func:`earlier_stream_config`): the seed's
#: layers (5 and 10 maps), where the rule changed most (seed conv1 at 8 images, predicted
#: 1.04x, left to the budget).
STREAM_RULE_CASES = (("seed-conv2", 8), ("seed-conv1", 1), ("seed-conv2", 1))
#: ``(layer, batch)`` where the pick, whose blocks store their outputs in runs of
#: consecutive positions (:data:`gpuconv.cuda.local_stream.OUT_RUN`), is also timed storing
#: each position's outputs at once: the seed's layers at 8 images, where the stores are the
#: largest share of the L1 data path's work (predicted 1.25x and 1.15x).
STREAM_RUN_CASES = (("seed-conv1", 8), ("seed-conv2", 8))
#: At 8 images, where the model's own search over the streaming kernel's launches
#: (:func:`gpuconv.cuda.predict.stream_search`) puts one this many times ahead of the pick
#: (both with registers from the launch bounds), that launch is timed beside the pick:
#: DeepFace L5 and L6 (3.96x and 1.86x so; 1.64x and 1.11x with ptxas's registers, which
#: the run's own predictions use), the layers furthest below the target on paper. A GPU
#: then says whether the model ranks launches as well as it prices them.
STREAM_SEARCH_GAIN = 1.5


def searched_stream_config(geom, pick, gain=STREAM_SEARCH_GAIN):
    """The model's fastest streaming launch on ``geom`` (float32) where it is predicted
    ``gain`` times ahead of ``pick`` or more, else None."""
    from gpuconv.cuda import predict

    found = _stream_search(geom)
    if not found or found[0][1] == pick:
        return None
    pick_s = predict.forward_row("", geom, np.float32, pick).time_s
    return found[0][1] if pick_s >= gain * found[0][0] else None


def earlier_stream_config(geom, dtype, warp_positions=1):
    """The streaming kernel's configuration under the earlier map rule: maps per block the
    group's padded to a power of two (at most 16; float64 8), loaded 4 maps a round (so 5
    maps ran as 8, 10 as 12), halved while the grid is short of warps; 4 taps a lane up to
    4 images wherever ``K > 64`` (the seed's 75 and 90 too). At ``warp_positions``
    positions a warp and with the output runs today's rule gives (the pick's), so that
    beside the pick the ratio is the map rule's alone."""
    from gpuconv.cuda import local_stream
    from gpuconv.cuda.spec import _pow2_at_least, compute_code, dtype_code

    wide = compute_code(dtype_code(dtype)) == "f32"
    k_len = geom.in_channels_per_group * geom.kernel_height * geom.kernel_width
    taps = 4 if geom.batch <= 4 and (wide or geom.batch <= 2) else 3 if wide else 2
    lane_taps = taps if k_len > 64 else max(1, min(taps, -(-k_len // 32)))
    maps = _pow2_at_least(geom.out_channels_per_group, 16 if wide else 8)
    earlier = None
    while earlier is None or (earlier.maps > 4 and local_stream._warps(earlier)
                              < local_stream.STREAM_TARGET_WARPS):
        maps = maps if earlier is None else earlier.maps // 2
        earlier = local_stream.local_stream_launch(geom, dtype, maps, lane_taps,
                                                   min(maps, 4),
                                                   warp_positions=warp_positions)
    return local_stream.with_output_run(geom, dtype, earlier)


def stream_items(layers, dry_run=False):
    """``[(layer, op, geometry, configs)]`` of the streaming kernels the ``candidates``
    phase times: each layer at each of :data:`STREAM_TIMED_BATCHES` (a dry run: the first
    layer at batch 1), the dispatcher's pick; where the pick has several positions side by
    side in a warp, the one-position configuration beside it (a dry run: the most
    positions the layer allows, so the simulator checks them); on :data:`STREAM_RUN_CASES`
    (a dry run: always), where the pick stores its outputs in runs, the pick storing them at
    once; at 8 images the model's fastest launch where it is far ahead
    (:func:`searched_stream_config`; a dry run: wherever it differs from the pick); and on
    :data:`STREAM_RULE_CASES` (a dry run: always) the earlier map rule's configuration
    beside it where it differs."""
    from gpuconv.cuda import local_stream

    cases = ([(layers[0], 1)] if dry_run else
             [(layer, b) for b in STREAM_TIMED_BATCHES for layer in layers])
    items = []
    for layer, batch in cases:
        geom = layer.geometry(batch)
        pick = _picked("local_conv2d", geom)
        configs = [pick]
        if pick.warp_positions > 1:
            side = [1]
        else:
            side = [max(local_stream.warp_position_choices(geom, np.float32))] if dry_run else []
        at_once = []
        if pick.out_run > 1 and (dry_run or (layer.name, batch) in STREAM_RUN_CASES):
            at_once = [local_stream.local_stream_launch(
                geom, np.float32, pick.maps, pick.lane_taps, pick.map_round, pick.warps,
                pick.pos_per_block, pick.warp_positions, out_run=1)]
        searched = []
        if dry_run or batch == 8:
            searched = [searched_stream_config(geom, pick, 1.0 if dry_run
                                               else STREAM_SEARCH_GAIN)]
        earlier = []
        if dry_run or (layer.name, batch) in STREAM_RULE_CASES:
            earlier = [earlier_stream_config(geom, np.float32, pick.warp_positions)]
        for config in [local_stream.positions_config(geom, np.float32, g)
                       for g in side] + at_once + [c for c in searched if c] + earlier:
            if config not in configs:
                configs.append(config)
        items.append((layer, "local_conv2d", geom, configs))
    return items


def candidate_items(layers, dry_run=False):
    """``[(layer, op, geometry, configs)]``: each layer at its GPU batch, each forward
    operation with every kernel the dispatcher weighs for it
    (:func:`gpuconv.cuda.kernels.forward_candidates`), the picked one among them, and where
    the pick is local_conv2d's batched GEMM, the same launch with :data:`EARLIER_LOADS`
    input loads a round; on the layers at the edge of the rule that gives the local input
    gradient columns (64 maps a group: ResNet-50 res2), the columns path (the pick) beside
    the batched-GEMM gather (``local_conv2d_input``; the budget holds one such layer); on
    :data:`LOADS_LAYERS` where the gather is the pick, the gather beside the same launch
    with :data:`EARLIER_LOADS` gy loads a round; then :func:`stream_items`."""
    from gpuconv.cuda import kernels

    from gpuconv.cuda import local_grad_gemm, local_grad_positions

    items = []
    for layer in layers:
        geom = layer.geometry(layer.batch_gpu)
        for op in FORWARD_OPS:
            configs = kernels.forward_candidates(op, geom, np.float32)
            if op == "local_conv2d" and isinstance(_picked(op, geom), kernels.LocalConv2dConfig):
                configs.append(kernels.local_conv2d_config(geom, np.float32,
                                                           input_loads=EARLIER_LOADS))
            items.append((layer, op, geom, configs))
        picked = _picked("local_conv2d_input", geom)
        if isinstance(picked, local_grad_gemm.LocalInputGradGemmConfig):
            if layer.name in LOADS_LAYERS:  # the gather at both counts
                items.append((layer, "local_conv2d_input", geom, [
                    picked, local_grad_gemm.local_input_grad_gemm_config(
                        geom, np.float32, gy_loads=EARLIER_LOADS)]))
            continue
        edge = geom.out_channels_per_group == local_grad_positions.POSITIONS_MIN_MAPS
        if edge and isinstance(picked, local_grad_positions.LocalInputGradColsConfig):
            try:  # the columns (the pick) against the gather
                gather = local_grad_gemm.local_input_grad_gemm_config(geom, np.float32)
            except ValueError:  # a stage the gather cannot hold: nothing to weigh
                continue
            items.append((layer, "local_conv2d_input", geom, [picked, gather]))
    return items + stream_items(layers, dry_run)


def suite_layers(dry_run=False, quick=False):
    """The layers whose kernels are checked and timed: the benchmark's default suite
    (quick: its quick layers), or :data:`DRY_LAYERS`."""
    if dry_run:
        return list(DRY_LAYERS)
    names = bench.QUICK_LAYERS if quick else bench.SUITES["default"]
    return [workloads.LAYERS[name] for name in names]


def multipass_cases(dry_run=False):
    """``(case, functions)`` that only real sizes reach: a local batch beyond one block's
    share and not a multiple of it, input channels that leave a partial channel chunk (also
    under the per-position GEMM, over two batch tiles), the conv2d weight gradient summed
    over several slices."""
    if dry_run:
        return [(Case("dry_batch_9", 9, 2, 6, 6, 3, (3, 3), (1, 1), (0, 0), (1, 1), 1,
                      "position"), ("local_conv2d", "local_conv2d_input",
                                    "local_conv2d_weight")),
                (Case("dry_channels_5", 2, 5, 6, 6, 2, (3, 3), (1, 1), (1, 1), (1, 1), 1,
                      "channel"), ("conv2d", "local_conv2d", "conv2d_weight"))]
    l6, vgg, res2 = (workloads.LAYERS[n] for n in ("deepface-l6", "vgg16-conv5_1",
                                                   "resnet50-res2-3x3"))
    partial = layer_case(vgg, 4)._replace(name="vgg16-conv5_1-cin500@4", c_in=500)
    # the per-position GEMMs: two batch tiles (the second partial), a partial last K chunk
    # (the forward) or term block (the input gradient's columns)
    tiles = layer_case(vgg, 40)._replace(name="vgg16-conv5_1-cin500@40", c_in=500)
    return [(layer_case(l6, 136, "position"), ("local_conv2d",) + GRAD_FUNCTIONS["local_conv2d"]),
            (partial, ("conv2d", "local_conv2d")),
            (tiles, ("local_conv2d", "local_conv2d_input", "local_conv2d_weight")),
            (layer_case(res2, res2.batch_gpu), GRAD_FUNCTIONS["conv2d"])]


def determinism_cases(dry_run=False):
    """Geometries on which the six functions must repeat bitwise, and the big-batch case."""
    if dry_run:
        big = Case("batch_3", 3, 1, 5, 5, 2, (3, 3), (1, 1), (0, 0), (1, 1), 1, "channel")
        return [layer_case(DRY_LAYERS[0], 2)], big
    cases = [layer_case(workloads.LAYERS[n], b) for n, b in
             (("deepface-l6", 16), ("deepface-l5", 16), ("resnet50-res2-3x3", 4))]
    big = Case(f"batch_{BIG_BATCH}", BIG_BATCH, 1, 6, 6, 2, (3, 3), (1, 1), (0, 0), (1, 1),
               1, "channel")
    return cases, big


# --------------------------------------------------------------------------------------------
# the plan: phases, their order, their estimated time
# --------------------------------------------------------------------------------------------

#: Seconds one new kernel specialisation takes to compile and first run on the H200 machine,
#: and one correctness check on kernels already compiled (references included), from the first
#: GPU run: 34 forward specialisations checked in 39 s, 24 gradient checks in 35 s.
COMPILE_S, CHECK_S = 1.1, 0.3
#: Seconds per layer of the timing phases (warm-up 0.25 s per implementation and burst, the
#: timed calls, the first calls, the agreement check, the profiler), and of one
#: compute-sanitizer run over the tiny calls (its own process and compilations).
TIME_LAYER_S = {"time-forward": 5.0, "time-backward": 6.0, "time-step": 7.0,
                "time-float16": 4.0}
SANITIZER_S = {"memcheck": 45.0, "racecheck": 75.0, "synccheck": 50.0}
#: Start-up: imports, the CUDA context, PyTorch's CUDA initialisation.
STARTUP_S = 15.0

PHASES = ("env", "suite", "suite-gradients", "multipass", "determinism", "memcheck",
          "time-forward", "overhead", "time-backward", "time-step", "candidates",
          "array-kinds", "grid", "time-float16", "racecheck", "synccheck")

#: Seconds per forward candidate of the ``candidates`` phase once compiled (its check and
#: timed launches), and per layer and operation (the inputs and the float64 reference).
CANDIDATE_S, CANDIDATE_LAYER_S = 0.1, 0.3
#: Seconds of the phase's autotuning check (two calls of each forward on one layer, the
#: first timing its candidates, all compiled by then).
AUTOTUNE_CHECK_S = 2.0

#: The default budget: 8 minutes on an H200 less a margin for the interpreter's start and
#: the JSON.
DEFAULT_BUDGET_S = 450


class Phase(NamedTuple):
    name: str
    checks: int          # correctness checks or timed layers
    kernels: int         # kernel specialisations it compiles that earlier phases did not
    estimate_s: float


def _phase_items(name, dry_run, quick):
    """``(checks, [(function, geometry, dtype), ...])`` of one correctness phase, or None."""
    layers = suite_layers(dry_run, quick)
    if name == "suite":
        return [(op, geom, dtype) for _, op, geom, dtype in suite_items(layers, dry_run)]
    if name == "suite-gradients":
        items = []
        for layer in layers:
            for op, functions in GRAD_FUNCTIONS.items():
                for dtype in SUITE_DTYPES:
                    batch = (layer.batch_gpu if dry_run
                             else reduced_batch(layer, functions, dtype))
                    items += [(f, layer.geometry(batch), dtype) for f in functions]
        return items
    if name == "multipass":
        return [(f, case_geometry(case), "float32") for case, functions
                in multipass_cases(dry_run) for f in functions]
    if name == "determinism":
        cases, big = determinism_cases(dry_run)
        return ([(f, case_geometry(c), "float32") for c in cases for f in ALL_FUNCTIONS]
                + [(f, case_geometry(big), "float32") for f in ALL_FUNCTIONS])
    if name == "grid":
        grid = list(DRY_GRID) if dry_run else geometry_grid(quick)
        grads = list(DRY_GRID) if dry_run else grad_grid(quick)
        return ([(op, case_geometry(c), d) for d in DTYPES for c in grid for op in FORWARD_OPS]
                + [(f, case_geometry(c), d) for d in DTYPES for c in grads
                   for op in FORWARD_OPS for f in GRAD_FUNCTIONS[op]])
    return None


def plan(dry_run=False, quick=False):
    """The phases in the order they run, each with its checks, the kernels it compiles that
    earlier phases did not, and its estimated seconds on an H200 (:data:`COMPILE_S`,
    :data:`CHECK_S`, :data:`TIME_LAYER_S`, :data:`SANITIZER_S`)."""
    seen = set()
    phases = []
    layers = len(suite_layers(dry_run, quick))
    for name in PHASES:
        items = _phase_items(name, dry_run, quick)
        if items is not None:
            new = set()
            for function, geom, dtype in items:
                new.update((n, dtype) for n in kernel_names(function, geom, dtype))
            new -= seen
            seen |= new
            checks = len(items) * (2 if name == "determinism" else 1)
            phases.append(Phase(name, checks, len(new), len(new) * COMPILE_S + checks * CHECK_S))
        elif name == "candidates":
            items = candidate_items(suite_layers(dry_run, quick), dry_run)
            new = {(c.kernel.name, "float32") for *_, configs in items for c in configs}
            new -= seen
            seen |= new
            count = sum(len(configs) for *_, configs in items)
            phases.append(Phase(name, count, len(new), len(new) * COMPILE_S
                                + count * CANDIDATE_S + len(items) * CANDIDATE_LAYER_S
                                + AUTOTUNE_CHECK_S))
        elif name in TIME_LAYER_S:
            phases.append(Phase(name, layers, 0, layers * TIME_LAYER_S[name]))
        elif name in SANITIZER_S:
            phases.append(Phase(name, 2 * len(ALL_FUNCTIONS), 0, SANITIZER_S[name]))
        elif name == "env":
            phases.append(Phase(name, 0, 0, STARTUP_S))
        elif name == "overhead":
            phases.append(Phase(name, 3, 0, 10.0))
        else:  # array-kinds
            phases.append(Phase(name, 10, 8, 8 * COMPILE_S + 10 * CHECK_S))
    return phases


def scheduled(phases, budget_s):
    """``[(phase, runs)]``: which phases the budget admits if each takes its estimate (a
    phase runs when its estimate fits what the phases before it left of the budget)."""
    used, out = 0.0, []
    for p in phases:
        runs = used + p.estimate_s <= budget_s
        used += p.estimate_s if runs else 0.0
        out.append((p, runs))
    return out


def format_plan(phases, budget_s):
    lines = [f"{'phase':16s} {'checks':>6s} {'new kernels':>11s} {'estimate s':>10s} "
             f"{'cumulative s':>12s}"]
    total = 0.0
    for p, runs in scheduled(phases, budget_s):
        total += p.estimate_s if runs else 0.0
        lines.append(f"{p.name:16s} {p.checks:6d} {p.kernels:11d} {p.estimate_s:10.0f} "
                     + (f"{total:12.0f}" if runs else f"{'skipped':>12s} (budget)"))
    lines.append(f"budget {budget_s:.0f} s; estimates for an H200 from the first GPU run "
                 f"({COMPILE_S} s per new kernel, {CHECK_S} s per check)")
    return "\n".join(lines)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description="The GPU acceptance run: check and time gpuconv's CUDA path on this GPU.")
    parser.add_argument("--budget-s", type=float, default=None,
                        help=f"seconds the whole run may take (default {DEFAULT_BUDGET_S}: "
                             "8 minutes on an H200 with compilation); phases that would not "
                             "fit are skipped, lowest priority first. A dry run plans with "
                             "it but is not stopped by it unless it is given: the "
                             "simulator's seconds are not the GPU's")
    parser.add_argument("--quick", action="store_true",
                        help="the benchmark's quick layers and the smaller grids")
    parser.add_argument("--only", nargs="+", choices=PHASES, metavar="PHASE",
                        help=f"run only these phases (of: {', '.join(PHASES)})")
    parser.add_argument("--skip", nargs="+", choices=PHASES, default=[], metavar="PHASE",
                        help="phases not to run")
    parser.add_argument("--repeat", type=int, default=5,
                        help="timed calls per burst in the timing phases (default 5)")
    parser.add_argument("--bursts", type=int, default=2,
                        help="bursts per implementation in the timing phases (default 2)")
    parser.add_argument("--plan", action="store_true",
                        help="print the phases with their counts and estimates, and exit")
    parser.add_argument("--dry-run", action="store_true",
                        help="no GPU: Numba's CUDA simulator, tiny sizes, every phase's logic, "
                             "no timing claims")
    parser.add_argument("--json", default=None,
                        help="where to write the JSON (default: $OUT/gpu_check.json if OUT "
                             "is set)")
    args = parser.parse_args(argv)
    if args.repeat < 1 or args.bursts < 1:
        parser.error("--repeat and --bursts must be >= 1")
    # the wall clock holds a run to its budget on a GPU, or in a dry run asked for one
    args.wall_budget = args.budget_s is not None or not args.dry_run
    if args.budget_s is None:
        args.budget_s = DEFAULT_BUDGET_S
    if args.budget_s <= 0:
        parser.error("--budget-s must be > 0")
    if args.json is None and os.environ.get("OUT"):
        args.json = os.path.join(os.environ["OUT"], "gpu_check.json")
    if args.dry_run:  # the simulator's calls take a second each: the logic once is enough
        args.repeat = args.bursts = 1
    return args


# --------------------------------------------------------------------------------------------
# the environment
# --------------------------------------------------------------------------------------------

_DISTRIBUTIONS = ("numpy", "numba", "numba-cuda", "llvmlite", "cuda-bindings", "cuda-python",
                  "cuda-core", "nvidia-nvjitlink", "nvidia-nvjitlink-cu12", "nvidia-nvvm",
                  "nvidia-cuda-nvcc", "nvidia-cuda-nvcc-cu12", "nvidia-cuda-runtime",
                  "nvidia-cuda-runtime-cu12", "torch", "cupy-cuda12x", "cupy-cuda13x")


def _try(fn):
    try:
        return fn()
    except Exception as exc:
        return f"unknown ({type(exc).__name__}: {exc})"[:200]


def environment(torch=None, dry_run=False):
    """What ran: package versions, NVVM, the driver and runtime, the GPU and its clocks, the
    commit; and the numba-cuda / NumPy pair's known problem, if any."""
    from importlib import metadata

    from gpuconv.appkit import git_state
    from gpuconv.device import cuda_toolchain_problem

    commit, modified = git_state()  # the package files modified in the checkout, if any
    packages = {}
    for name in _DISTRIBUTIONS:
        try:
            packages[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    info = {"python": platform.python_version(), "packages": packages,
            "commit": commit, "modified": modified,
            "toolchain_problem": cuda_toolchain_problem(), "dry_run": dry_run}
    if torch is not None:
        info["torch"] = torch.__version__
        info["torch_cuda"] = torch.version.cuda
        info["cudnn"] = _try(lambda: torch.backends.cudnn.version())
    if dry_run:
        info["gpu"] = "none: Numba's CUDA simulator"
        return info
    from numba import cuda

    def nvvm_version():
        from numba.cuda.cudadrv import nvvm
        return ".".join(map(str, nvvm.NVVM().get_version()))

    info["nvvm"] = _try(nvvm_version)
    info["driver_cuda"] = _try(lambda: ".".join(
        map(str, cuda.cudadrv.driver.driver.get_version())))
    info["runtime_cuda"] = _try(lambda: ".".join(map(str, cuda.runtime.get_version())))
    # (numba-cuda links through cuda-python's bindings)
    info["nvjitlink"] = _try(lambda: ".".join(
        map(str, __import__("cuda.bindings.nvjitlink", fromlist=["x"]).version())))
    if torch is not None and torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info["gpu"] = {"name": props.name, "capability": [props.major, props.minor],
                       "sms": props.multi_processor_count,
                       "memory_gib": round(props.total_memory / 2**30, 1)}
    smi = shutil.which("nvidia-smi")
    if smi:
        info["nvidia_smi"] = _try(lambda: subprocess.run(
            [smi, "--query-gpu=name,driver_version,clocks.sm,clocks.max.sm,clocks.mem,"
                  "power.draw,temperature.gpu,utilization.gpu", "--format=csv,noheader"],
            capture_output=True, text=True, timeout=20).stdout.strip())
    return info


# --------------------------------------------------------------------------------------------
# where the arrays live
# --------------------------------------------------------------------------------------------

class Target:
    """Where gpuconv's operands live. On a GPU: PyTorch CUDA tensors (drawn on the GPU), and
    the float64 references computed there too. In a dry run: the references on PyTorch's CPU,
    gpuconv's operands copied into the simulator's device arrays."""

    def __init__(self, torch, dry_run):
        self.torch, self.dry_run = torch, dry_run
        self.device = "cpu" if dry_run else "cuda"

    def generator(self, seed):
        return self.torch.Generator(device=self.device).manual_seed(seed)

    def uniform(self, shape, generator):
        """Values in [-1, 1), float64, where the references run."""
        return self.torch.rand(tuple(shape), generator=generator, dtype=self.torch.float64,
                               device=self.device) * 2 - 1

    def to_gpuconv(self, tensor):
        if tensor is None or not self.dry_run:
            return tensor
        from numba import cuda
        return cuda.to_device(np.ascontiguousarray(tensor.numpy()))

    def from_gpuconv(self, result):
        if not self.dry_run:
            return result
        return self.torch.from_numpy(np.asarray(result.copy_to_host()))

    def kind_ok(self, result, dtype):
        """The result is the caller's kind of array on the GPU, in ``dtype``."""
        if self.dry_run:
            return (hasattr(result, "copy_to_host")
                    and np.dtype(result.dtype) == np.dtype(str(dtype).replace("torch.", "")))
        return (isinstance(result, self.torch.Tensor) and result.is_cuda
                and result.dtype == dtype)

    def synchronize(self):
        if self.dry_run:
            from numba import cuda
            cuda.synchronize()
        else:
            self.torch.cuda.synchronize()


def _public_kwargs(geom):
    return dict(stride=(geom.stride_h, geom.stride_w),
                padding=((geom.pad_top, geom.pad_bottom), (geom.pad_left, geom.pad_right)),
                dilation=(geom.dilation_h, geom.dilation_w), groups=geom.groups)


def _inputs(target, geom, op, bias, seed):
    """float64 x, weight, bias (None, "channel" or "position") and dL/dy, where the
    references run."""
    generator = target.generator(seed)
    x = target.uniform(geom.input_shape, generator)
    w = target.uniform(geom.local_weight_shape() if op == "local_conv2d"
                       else geom.shared_weight_shape(), generator)
    b = None
    if bias == "channel" or (bias == "position" and op == "conv2d"):
        b = target.uniform((geom.out_channels,), generator)
    elif bias == "position":
        b = target.uniform((geom.out_channels, geom.out_height, geom.out_width), generator)
    gy = target.uniform(geom.output_shape, generator)
    return x, w, b, gy


def _peer(op):
    return peers.torch_unfold_einsum if op == "local_conv2d" else peers.torch_conv2d


def _reference(torch, op, geom, x, w, b):
    """``(reference, magnitude bound)`` in float64: the benchmark's PyTorch peer of ``op`` on
    the inputs, and on their absolute values."""
    d = (lambda t: None if t is None else t.double())
    a = (lambda t: None if t is None else t.double().abs())
    return _peer(op)(torch, geom, d(w), d(b))(d(x)), _peer(op)(torch, geom, a(w), a(b))(a(x))


def _grad_reference(torch, op, geom, x, w, gy):
    """``((gx, gw), (gx bound, gw bound))`` in float64: PyTorch autograd's backward of the
    peer of ``op`` (no bias) for ``gy``, and the same on the absolute values."""
    d = (lambda t: t.double())
    a = (lambda t: t.double().abs())
    ref = peers.torch_autograd_backward(torch, _peer(op), geom, d(x), d(w), d(gy))()
    bound = peers.torch_autograd_backward(torch, _peer(op), geom, a(x), a(w), a(gy))()
    return ref, bound


def _compare(target, label, name, geom, dtype, result, ref, bound):
    torch = target.torch
    dtype_name = str(dtype).replace("torch.", "")
    ok_kind = target.kind_ok(result, dtype)
    got = target.from_gpuconv(result) if ok_kind else None
    ok_shape = got is not None and tuple(got.shape) == tuple(ref.shape)
    err = float((got.double().to(ref.device) - ref).abs().max()) \
        if ok_shape and ref.numel() else 0.0
    scale = float(bound.abs().max()) if bound.numel() else 0.0
    finite = bool(torch.isfinite(got).all()) if ok_shape else False
    count = terms(name, geom)
    return {"case": label, "function": name, "dtype": dtype_name,
            "kernels": list(kernel_names(name, geom, dtype_name)),
            "max_abs_error": err, "scale": scale, "tolerance": tolerance(dtype_name, count),
            "terms": count, "result_kind_ok": ok_kind and ok_shape, "finite": finite,
            "ok": bool(ok_kind and ok_shape and finite
                       and within_tolerance(err, scale, dtype_name, count))}


def _op_of(name):
    """The forward operation of a function of :data:`ALL_FUNCTIONS`."""
    return name if name in FORWARD_OPS else name.rsplit("_", 1)[0]


def _call(target, gpuconv, name, geom, x, w, b, gy):
    """One call of the gpuconv function ``name`` on the reference's tensors ``x, w, b, gy``,
    given to gpuconv as ``target`` places them."""
    from gpuconv import grad as gpuconv_grad

    put = target.to_gpuconv
    kwargs = _public_kwargs(geom)
    if name in FORWARD_OPS:
        return getattr(gpuconv, name)(put(x), put(w), put(b), **kwargs)
    if name.endswith("_input"):
        return getattr(gpuconv_grad, name)(tuple(x.shape), put(w), put(gy), **kwargs)
    return getattr(gpuconv_grad, name)(put(x), tuple(w.shape), put(gy), **kwargs)


def _failure(label, name, dtype, exc):
    return {"case": label, "function": name, "dtype": str(dtype).replace("torch.", ""),
            "ok": False, "error": f"{type(exc).__name__}: {exc}"[:500],
            "traceback": traceback.format_exc()[-2000:]}


def check_functions(target, gpuconv, label, geom, functions, dtype, bias="channel", seed=0):
    """Each gpuconv function of ``functions`` (of :data:`ALL_FUNCTIONS`, sharing one
    geometry) on random inputs in ``dtype`` (a torch dtype) against the float64 PyTorch
    reference: one result dict per function."""
    torch = target.torch
    results = []
    for op in sorted({_op_of(f) for f in functions}):
        x, w, b, gy = (None if t is None else t.to(dtype)
                       for t in _inputs(target, geom, op, bias, seed + sum(map(ord, op))))
        grad_refs = {}
        for name in (op,) + GRAD_FUNCTIONS[op]:
            if name not in functions:
                continue
            try:
                result = _call(target, gpuconv, name, geom, x, w, b, gy)
                target.synchronize()
                if name == op:
                    ref, bound = _reference(torch, op, geom, x, w, b)
                else:  # one autograd backward gives both gradients
                    if not grad_refs:
                        grad_refs["value"] = _grad_reference(torch, op, geom, x, w, gy)
                    (gx, gw), (bx, bw) = grad_refs["value"]
                    ref, bound = (gx, bx) if name.endswith("_input") else (gw, bw)
                results.append(_compare(target, label, name, geom, dtype, result, ref, bound))
            except Exception as exc:
                results.append(_failure(label, name, dtype, exc))
    return results


def check_repeatable(target, gpuconv, label, geom, functions, dtype):
    """Each function twice on the same inputs: bitwise equal results (no atomics, a fixed
    order of every sum)."""
    results = []
    for name in functions:
        x, w, b, gy = (None if t is None else t.to(dtype)
                       for t in _inputs(target, geom, _op_of(name), "channel", 7))
        try:
            first = target.from_gpuconv(_call(target, gpuconv, name, geom, x, w, b, gy)).clone()
            second = target.from_gpuconv(_call(target, gpuconv, name, geom, x, w, b, gy))
            target.synchronize()
            same = bool(target.torch.equal(first, second))
            results.append({"case": label, "function": name, "ok": same,
                            "detail": "bitwise equal" if same else "results differ"})
        except Exception as exc:
            results.append(_failure(label, name, dtype, exc))
    return results


# --------------------------------------------------------------------------------------------
# array kinds (GPU only, but for the host and Numba arrays, which the simulator has)
# --------------------------------------------------------------------------------------------

def check_array_kinds(torch, gpuconv, dry_run=False):
    """torch in -> torch out, CuPy in -> CuPy out, Numba in -> Numba out, NumPy in -> NumPy
    out; a side stream; non-contiguous inputs; empty batch; NaN propagation. In a dry run,
    the host and Numba arrays only (the rest says what it needs)."""
    from numba import cuda

    results = []

    def record(name, fn):
        try:
            ok, detail = fn()
        except Exception as exc:
            ok, detail = False, f"{type(exc).__name__}: {exc}"
        results.append({"check": name, "ok": bool(ok), "detail": detail})

    rng = np.random.default_rng(0)
    x_np = rng.standard_normal((3, 4, 13, 11))
    w_np = rng.standard_normal((6, 2, 3, 3))
    wl_np = rng.standard_normal((6, 11, 9, 2, 3, 3))
    b_np = rng.standard_normal(6)
    geom = conv_geometry(x_np.shape, (3, 3), 6, groups=2)
    t = torch.from_numpy
    refs = {op: [r.numpy() for r in _reference(torch, op, geom, t(x_np), t(w), t(b_np))]
            for op, w in (("conv2d", w_np), ("local_conv2d", wl_np))}

    def close(y, op="conv2d"):
        ref, bound = refs[op]
        return within_tolerance(float(np.abs(np.asarray(y) - ref).max()), float(bound.max()),
                                "float64")

    def numpy_in():
        y = gpuconv.conv2d(x_np, w_np, b_np, groups=2, device="cuda")
        return isinstance(y, np.ndarray) and close(y), type(y).__name__

    def numba_in():
        y = gpuconv.conv2d(cuda.to_device(x_np), cuda.to_device(w_np), cuda.to_device(b_np),
                           groups=2)
        yl = gpuconv.local_conv2d(cuda.to_device(x_np), cuda.to_device(wl_np),
                                  cuda.to_device(b_np), groups=2)
        return (hasattr(y, "copy_to_host") and close(y.copy_to_host())
                and close(yl.copy_to_host(), "local_conv2d")), type(y).__name__

    def numba_strided():
        # Numba's reshape refuses strided arrays and its arrays do not index with None: an
        # unbatched 2-D call and a 1-D call view them through the array interface
        def strided(a):
            wide = np.zeros(a.shape[:-1] + (2 * a.shape[-1],))
            wide[..., ::2] = a
            return cuda.to_device(wide)[..., ::2]

        d_w, d_b = cuda.to_device(w_np), cuda.to_device(b_np)
        y = gpuconv.conv2d(strided(x_np[0]), d_w, d_b, groups=2)
        x1, w1 = x_np[:, :, 0, :], np.ascontiguousarray(w_np[:, :, 0, :])
        y1 = gpuconv.conv1d(strided(x1), cuda.to_device(w1), d_b, groups=2)
        ref1 = torch.nn.functional.conv1d(t(x1), t(w1), t(b_np), groups=2).numpy()
        bound1 = torch.nn.functional.conv1d(t(abs(x1)), t(abs(w1)), t(abs(b_np)),
                                            groups=2).numpy()
        ok1 = within_tolerance(float(np.abs(y1.copy_to_host() - ref1).max()),
                               float(bound1.max()), "float64")
        ref, bound = refs["conv2d"]
        ok = within_tolerance(float(np.abs(y.copy_to_host() - ref[0]).max()),
                              float(bound[0].max()), "float64")
        return ok and ok1, "an unbatched conv2d and a conv1d on strided Numba arrays"

    def torch_in():
        tc = lambda a: torch.from_numpy(a).cuda()  # noqa: E731
        y = gpuconv.conv2d(tc(x_np), tc(w_np), tc(b_np), groups=2)
        yl = gpuconv.local_conv2d(tc(x_np), tc(wl_np), tc(b_np), groups=2)
        return (isinstance(y, torch.Tensor) and y.is_cuda and close(y.cpu().numpy())
                and close(yl.cpu().numpy(), "local_conv2d")), type(y).__name__

    def side_stream_operand():
        # a weight written on a PyTorch side stream (after 0.1 s of sleep there), read by a
        # call whose first operand is a Numba array: its kernel runs on Numba's default
        # stream, which does not wait for PyTorch's (non-blocking) streams by itself
        side = torch.cuda.Stream()
        w_t = torch.zeros(w_np.shape, dtype=torch.float64, device="cuda")
        src = torch.from_numpy(w_np).cuda()
        torch.cuda.synchronize()
        with torch.cuda.stream(side):
            torch.cuda._sleep(200_000_000)
            w_t.copy_(src)
            y = gpuconv.conv2d(cuda.to_device(x_np), w_t, cuda.to_device(b_np), groups=2)
        torch.cuda.synchronize()
        return close(y.copy_to_host()), "a PyTorch side-stream weight beside a Numba input"

    def cupy_in():
        import cupy
        y = gpuconv.conv2d(cupy.asarray(x_np), cupy.asarray(w_np), cupy.asarray(b_np), groups=2)
        yl = gpuconv.local_conv2d(cupy.asarray(x_np), cupy.asarray(wl_np), cupy.asarray(b_np),
                                  groups=2)
        return (isinstance(y, cupy.ndarray) and close(cupy.asnumpy(y))
                and close(cupy.asnumpy(yl), "local_conv2d")), type(y).__name__

    def side_stream():
        stream = torch.cuda.Stream()
        with torch.cuda.stream(stream):
            xs, ws, bs = (torch.from_numpy(a).cuda() for a in (x_np, w_np, b_np))
            y = gpuconv.conv2d(xs, ws, bs, groups=2)
            y2 = y * 1.0  # queued on the same stream after gpuconv's kernel
        stream.synchronize()
        return close(y2.cpu().numpy()), "torch side stream"

    def non_contiguous():
        xt = torch.from_numpy(np.ascontiguousarray(x_np.transpose(0, 1, 3, 2))).cuda().transpose(2, 3)
        big = torch.zeros((6, 2, 3, 6), dtype=torch.float64, device="cuda")
        big[..., ::2] = torch.from_numpy(w_np).cuda()
        y = gpuconv.conv2d(xt, big[..., ::2], torch.from_numpy(b_np).cuda(), groups=2)
        return not xt.is_contiguous() and close(y.cpu().numpy()), "transposed and strided views"

    def empty_batch():
        x0 = torch.zeros((0, 4, 13, 11), dtype=torch.float32, device="cuda")
        y = gpuconv.conv2d(x0, torch.ones((6, 2, 3, 3), device="cuda"), groups=2)
        return tuple(y.shape) == (0, 6, 11, 9) and isinstance(y, torch.Tensor), str(tuple(y.shape))

    def nan_propagation():
        x = torch.ones((2, 1, 9, 9), dtype=torch.float32, device="cuda")
        x[0, 0, 4, 4] = float("nan")
        x[1, 0, 0, 8] = float("inf")
        y = gpuconv.conv2d(x, torch.ones((1, 1, 3, 3), device="cuda"), stride=2, padding=1)
        # expected from the windows themselves (a cuDNN algorithm may smear NaN further)
        cols = torch.nn.functional.unfold(x.double(), (3, 3), padding=1, stride=2)
        nan = cols.isnan().any(1).reshape(y.shape)
        inf = cols.isinf().any(1).reshape(y.shape) & ~nan
        same = bool((torch.isnan(y) == nan).all() and (torch.isinf(y) == inf).all())
        return same and bool(nan.any()), f"{int(torch.isnan(y).sum())} NaN outputs"

    checks = [("numpy in -> numpy out", numpy_in), ("numba in -> numba out", numba_in),
              ("numba strided, unbatched and 1-D", numba_strided)]
    torch_checks = [("torch in -> torch out", torch_in), ("torch side stream", side_stream),
                    ("operand from another stream", side_stream_operand),
                    ("non-contiguous inputs", non_contiguous), ("empty batch", empty_batch),
                    ("NaN propagation", nan_propagation)]
    skipped = []
    if dry_run or not torch.cuda.is_available():
        skipped += [(name, "needs a CUDA build of PyTorch") for name, _ in torch_checks]
    else:
        checks += torch_checks
    try:
        import cupy  # noqa: F401
        if dry_run:
            skipped.append(("cupy in -> cupy out", "CuPy needs a GPU (not the simulator)"))
        else:
            checks.append(("cupy in -> cupy out", cupy_in))
    except Exception:
        skipped.append(("cupy in -> cupy out", "CuPy is not installed"))
    for name, fn in checks:
        record(name, fn)
    for name, why in skipped:
        results.append({"check": name, "ok": True, "skipped": why, "detail": f"skipped: {why}"})
    return results


# --------------------------------------------------------------------------------------------
# compute-sanitizer
# --------------------------------------------------------------------------------------------

#: Tiny calls of every forward and gradient kernel, float32 and float16, for compute-sanitizer:
#: stride, padding, groups, both bias kinds, a strided device input, a channel-heavy conv2d
#: and its gradients (the implicit-GEMM kernels), a conv2d weight gradient summed in
#: several slices, and a local_conv2d of 64 maps (the per-position GEMM) and its gradients
#: (the input gradient through columns, the weight gradient a GEMM a position).
SANITIZER_SNIPPET = """
import numpy as np, gpuconv
from gpuconv import grad
from numba import cuda
rng = np.random.default_rng(0)
for dt in (np.float32, np.float16):
    r = lambda *s: rng.standard_normal(s).astype(dt)
    x, w, b = r(3, 4, 13, 17), r(10, 2, 3, 5), r(10)
    kw = dict(stride=(2, 1), padding=(1, 2), groups=2)
    y = gpuconv.conv2d(x, w, b, device="cuda", **kw)
    wl, bl = r(10, 7, 17, 2, 3, 5), r(10, 7, 17)
    gpuconv.local_conv2d(x, wl, bl, device="cuda", **kw)
    gy = r(*y.shape)
    grad.conv2d_input(x.shape, w, gy, device="cuda", **kw)
    grad.conv2d_weight(x, w.shape, gy, device="cuda", **kw)
    grad.local_conv2d_input(x.shape, wl, gy, device="cuda", **kw)
    grad.local_conv2d_weight(x, wl.shape, gy, device="cuda", **kw)
    xg, wg = r(2, 40, 9, 9), r(6, 40, 3, 3)  # channel-heavy: the implicit-GEMM path
    gpuconv.conv2d(xg, wg, r(6), padding=(1, 2), device="cuda")
    gg = r(2, 6, 5, 6)  # ... and its implicit-GEMM gradients, strided (phases)
    grad.conv2d_input(xg.shape, wg, gg, stride=2, padding=(1, 2), device="cuda")
    grad.conv2d_weight(xg, wg.shape, gg, stride=2, padding=(1, 2), device="cuda")
    xb, gb = r(64, 2, 33, 33), r(64, 3, 31, 31)
    grad.conv2d_weight(xb, (3, 2, 3, 3), gb, device="cuda")
    xm, wm = r(10, 6, 6, 7), r(64, 6, 7, 6, 3, 3)  # 64 maps: the per-position GEMM
    gpuconv.local_conv2d(xm, wm, r(64, 6, 7), padding=1, device="cuda")
    gm = r(10, 64, 6, 7)  # ... and its gradients: columns, and a GEMM a position
    grad.local_conv2d_input(xm.shape, wm, gm, padding=1, device="cuda")
    grad.local_conv2d_weight(xm, wm.shape, gm, padding=1, device="cuda")
    gpuconv.conv2d(cuda.to_device(x)[:, :, ::2], cuda.to_device(w), None, groups=2)
cuda.synchronize()
print("sanitizer calls done")
"""


def find_compute_sanitizer():
    found = shutil.which("compute-sanitizer")
    if found:
        return found
    for home in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if home:
            path = os.path.join(home, "bin", "compute-sanitizer")
            if os.path.exists(path):
                return path
    return None


def run_sanitizer(tool="memcheck", timeout=240):
    """``compute-sanitizer --tool TOOL`` over :data:`SANITIZER_SNIPPET`."""
    found = find_compute_sanitizer()
    if found is None:
        return {"status": "skipped: compute-sanitizer not found"}
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        p for p in (ROOT, os.environ.get("PYTHONPATH")) if p))
    env.pop("NUMBA_ENABLE_CUDASIM", None)
    try:
        result = subprocess.run([found, "--tool", tool, "--error-exitcode", "3",
                                 sys.executable, "-c", SANITIZER_SNIPPET],
                                capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return {"status": "timeout", "timeout_s": timeout}
    text = result.stdout + result.stderr
    ok = (result.returncode == 0 and sanitizer_clean(tool, text)
          and "sanitizer calls done" in text)
    return {"status": "ok" if ok else "errors", "returncode": result.returncode,
            "output_tail": text[-3000:]}


def sanitizer_clean(tool, text):
    """True when compute-sanitizer's summary says nothing was found: racecheck ends with
    ``RACECHECK SUMMARY: 0 hazards displayed (0 errors, 0 warnings)``, the other tools with
    ``ERROR SUMMARY: 0 errors``. A missing summary is not clean."""
    if tool == "racecheck":
        found = re.findall(r"RACECHECK SUMMARY: (\d+) hazards? displayed "
                           r"\((\d+) errors?, (\d+) warnings?\)", text)
        return bool(found) and all(int(n) == 0 for counts in found for n in counts)
    found = re.findall(r"ERROR SUMMARY: (\d+) errors?", text)
    return bool(found) and all(int(n) == 0 for n in found)


# --------------------------------------------------------------------------------------------
# timing
# --------------------------------------------------------------------------------------------

def _roofline(record, ceilings):
    """Seconds the record's pass takes at the measured ceilings (compute or bytes)."""
    compute, bandwidth = ceilings.get("compute_gflops"), ceilings.get("bandwidth_gbs")
    if not compute or not bandwidth:
        return None
    return max(record["flops"] / (compute * 1e9), record["bytes"] / (bandwidth * 1e9))


def timing_lines(records, ceilings):
    """One line per gpuconv record: call and kernel time, what the host adds, the share of
    the roofline (of the kernel time), and the speedup over each peer (peer / gpuconv)."""
    lines = []
    for r in records:
        if r["impl"] != "gpuconv" or r["skipped"]:
            continue
        roof = _roofline(r, ceilings or {})
        kernel = r.get("kernel_s")
        share = (roof / kernel if roof and kernel else None)
        speed = []
        for peer in records:
            if (peer["op"] == r["op"] and peer["layer"] == r["layer"] and peer["N"] == r["N"]
                    and peer["pass"] == r["pass"] and peer["impl"] != "gpuconv"
                    and not peer["skipped"]):
                mine = kernel if kernel and peer.get("kernel_s") else r["median_s"]
                theirs = peer.get("kernel_s") if kernel and peer.get("kernel_s") \
                    else peer["median_s"]
                speed.append(f"{theirs / mine:.2f}x {peer['impl']}")
        host = r.get("call_minus_kernel_s")
        cells = ("-" if not kernel else f"{kernel * 1e3:.3f}",
                 "-" if host is None else f"{host * 1e3:.3f}",
                 "-" if share is None else f"{100 * share:.1f} %")
        lines.append(
            f"{r['pass']:8s} {r['layer']:18s} {r['op']:13s} N={r['N']:<4d} call "
            f"{r['median_s'] * 1e3:8.3f} ms  kernel {cells[0]:>8s} ms  host {cells[1]:>7s} ms"
            f"  roofline {cells[2]:>7s}  " + ", ".join(speed))
    return lines


def disagreements(records):
    """Records whose result differs from their reference beyond the tolerance, and records
    of implementations that failed."""
    bad = []
    for r in records:
        if (r.get("skipped") or "").startswith("failed"):
            bad.append(f"{r['pass']} {r['layer']} {r['op']} {r['impl']}: {r['skipped']}")
        elif (r.get("max_rel_diff") is not None and r.get("tolerance") is not None
              and r["max_rel_diff"] > r["tolerance"]):
            bad.append(f"{r['pass']} {r['layer']} {r['op']} {r['impl']} vs "
                       f"{r.get('compared_with')}: {r['max_rel_diff']:.3g} > "
                       f"{r['tolerance']:.3g}")
    return bad


def time_pass(layers, pass_name, args, deadline, ceilings=None, dtype="float32",
              torch="auto"):
    """``gpuconv bench`` for one pass, one layer at a time (so the budget is checked between
    layers), with the ceilings measured once. Returns ``(result, layers not reached)``."""
    records, machine, left = [], None, []
    for index, layer in enumerate(layers):
        if time.perf_counter() > deadline:
            left = [lay.name for lay in layers[index:]]
            break
        result = bench.run_benchmark([layer], device="cuda", dtype=dtype, repeat=args.repeat,
                                     bursts=args.bursts, torch=torch, ceilings=ceilings,
                                     passes=(pass_name,), on_error="record",
                                     progress=False if args.dry_run else None)
        machine = machine or result["machine"]
        ceilings = ceilings or result["machine"].get("ceilings")
        records += result["records"]
    return {"machine": machine or {}, "records": records}, left


_BLOCKER = {}


def _blocker():
    """A kernel that sleeps about ``ms`` milliseconds on the GPU: queued before the timed
    launches, it keeps the GPU busy while the host queues them, so the events between them
    time the kernels back to back, not the host's launch rate."""
    if "kernel" not in _BLOCKER:
        from numba import cuda, uint32

        @cuda.jit
        def sleep(ms):
            for _ in range(ms):
                for _ in range(4):
                    cuda.nanosleep(uint32(250_000))

        _BLOCKER["kernel"] = sleep
    return _BLOCKER["kernel"]


def _cold_times(torch, stream, launch, launches=9):
    """GPU milliseconds of ``launches`` calls of ``launch()``, each alone between two events
    after a write of twice the L2 cache (so its operands come from DRAM, as a layer's
    weights do in a network), all queued behind :func:`_blocker` on ``stream`` (PyTorch's
    current stream, where the write goes too)."""
    from numba import cuda

    props = torch.cuda.get_device_properties(torch.cuda.current_device())
    l2 = int(getattr(props, "L2_cache_size", 0) or 64 << 20)
    flush = torch.empty(2 * l2 // 4, dtype=torch.float32, device="cuda")
    events = [(cuda.event(), cuda.event()) for _ in range(launches)]
    _blocker()[1, 1, stream](2 + launches // 4)
    for start, end in events:
        flush.fill_(1.0)
        start.record(stream)
        launch()
        end.record(stream)
    events[-1][1].synchronize()
    return [cuda.event_elapsed_time(start, end) for start, end in events]


def copy_rate(torch, size=512 << 20, rounds=5):
    """Bytes a second (read + write) of a device-to-device copy of ``size`` bytes, far
    beyond L2: the median of ``rounds`` copies timed by CUDA events, after one untimed."""
    src = torch.ones(size // 4, dtype=torch.float32, device="cuda")
    dst = torch.empty_like(src)
    dst.copy_(src)
    times = []
    for _ in range(rounds):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        dst.copy_(src)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return 2 * size / float(np.median(times))


def _torch_scratch(torch):
    """An ``empty(shape, dtype)`` for the launchers that takes scratch from PyTorch's pool, so
    a timed launch frees nothing (a cudaFree would synchronise the device)."""
    from numba import cuda

    def empty(shape, dtype):
        return cuda.as_cuda_array(torch.empty(
            tuple(shape), dtype=getattr(torch, np.dtype(dtype).name), device="cuda"))

    return empty


def _launch_forward(op, config, x, w, b, out, geom, stream, empty=None):
    from gpuconv.cuda import launch

    if op == "conv2d":
        launch.launch_conv2d(x, w, b, out, geom, stream, config=config, empty=empty)
    else:
        launch.launch_local_conv2d(x, w, b, out, geom, stream, config=config, empty=empty)


def _measured_registers(config):
    """``(registers, static shared bytes, local bytes)`` of the compiled kernel of
    ``config`` on this GPU (None in the simulator)."""
    from gpuconv.cuda import kernels

    kernel = kernels.compiled(config.kernel)
    try:
        return (kernel.get_regs_per_thread(), kernel.get_shared_mem_per_block(),
                kernel.get_local_mem_per_thread())
    except Exception:
        return None


def _picked(op, geom):
    """The dispatcher's configuration of ``op`` (a forward, or ``local_conv2d_input``)."""
    from gpuconv.cuda import kernels, launch

    if op == "conv2d":
        return kernels.conv2d_config(geom, np.float32)
    if op == "local_conv2d":
        return kernels.local_conv2d_forward_config(geom, np.float32)
    return launch.local_conv2d_input_grad_config(geom, np.float32)


def _launch_candidate(op, config, args, out, geom, stream, empty=None):
    from gpuconv.cuda import launch

    if op == "local_conv2d_input":  # args: (gy, w)
        launch.launch_local_conv2d_input_grad(*args, out, geom, stream, empty, config)
    else:                           # args: (x, w, b)
        _launch_forward(op, config, *args, out, geom, stream, empty)


def check_candidates(target, layer, op, geom, configs, timed=True, rounds=3, device=None):
    """Each kernel of ``configs`` on ``geom`` (the layer's GPU batch, float32) launched
    directly with its own configuration: a forward (a bias per map), or the local input
    gradient (``op`` ``local_conv2d_input``: the columns path and the gather). Its first and
    last image against the float64 PyTorch reference, and, when ``timed``, its GPU time back
    to back (CUDA events around ``reps`` launches queued behind :func:`_blocker`, the median
    of ``rounds``) beside the model's prediction (:func:`gpuconv.cuda.predict.forward_rows`,
    :func:`gpuconv.cuda.predict.local_input_grad_rows`, registers as compiled here). The
    weight-streaming kernels (small batches, which read each weight once per call) are
    timed instead one launch at a time with L2 emptied before each (:func:`_cold_times`):
    back to back, a layer whose weights fit in L2 would be timed at L2's rate. One result
    per configuration, with the fewest bytes a forward moves (``min_bytes``)."""
    from numba import cuda

    from gpuconv.cuda import predict
    from gpuconv.cuda.ptx import PtxasInfo

    from gpuconv.cuda import local_stream

    torch = target.torch
    device = device or predict.H200
    picked = _picked(op, geom)
    grad = op == "local_conv2d_input"
    cold = any(isinstance(c, local_stream.LocalStreamConfig) for c in configs)
    forward = "local_conv2d" if grad else op
    x, w, b, gy = _inputs(target, geom, forward, "channel", seed=geom.batch + len(op))
    ends = [0, geom.batch - 1] if geom.batch > 1 else [0]
    pair = layer.geometry(len(ends))
    if grad:
        (ref, _), (bound, _) = _grad_reference(torch, forward, pair, x[ends], w, gy[ends])
        operands, out_shape = (gy, w), geom.input_shape
    else:
        ref, bound = _reference(torch, op, pair, x[ends], w, b)
        operands, out_shape = (x, w, b), geom.output_shape
    count = terms(op, geom)
    operands = [t.to(torch.float32).contiguous() for t in operands]
    if target.dry_run:
        args = [target.to_gpuconv(t) for t in operands]
        stream = cuda.default_stream()

        def scratch(shape, dtype):  # NaN: a kernel reading what none wrote fails
            return cuda.to_device(np.full(shape, np.nan, dtype))
    else:
        from gpuconv.cuda.launch import _numba_stream

        args = [cuda.as_cuda_array(t) for t in operands]
        stream = _numba_stream(torch.cuda.current_stream().cuda_stream)
        scratch = _torch_scratch(torch)
    results = []
    for config in configs:
        name = config.kernel.name
        entry = {"case": f"{layer.name}@{geom.batch}", "function": op, "kernel": name,
                 "picked": config == picked}
        try:
            # the output starts as NaN, so a kernel that leaves part of it unwritten fails
            if target.dry_run:
                out = cuda.to_device(np.full(out_shape, np.nan, np.float32))
                _launch_candidate(op, config, args, out, geom, stream, scratch)
                got = torch.from_numpy(out.copy_to_host())
            else:
                out_t = torch.full(out_shape, float("nan"), dtype=torch.float32,
                                   device="cuda")
                out = cuda.as_cuda_array(out_t)
                _launch_candidate(op, config, args, out, geom, stream, scratch)
                stream.synchronize()
                got = out_t
            err = float((got[ends].double().to(ref.device) - ref).abs().max())
            scale = float(bound.abs().max())
            entry.update(max_abs_error=err, scale=scale,
                         ok=bool(torch.isfinite(got).all()) and within_tolerance(
                             err, scale, "float32", count))
            resources = None if target.dry_run else _measured_registers(config)
            info = None
            if resources:
                entry["registers"], entry["static_smem"], entry["local_bytes"] = resources
                info = PtxasInfo(name, "device", resources[0], 0, 0, resources[2],
                                 resources[1], getattr(config, "shared_bytes", 0))
            rows_of = predict.local_input_grad_rows if grad else predict.forward_rows
            rows = rows_of(layer.name, geom, np.float32, config,
                           (lambda spec, shared=0, i=info:
                            i if spec is config.kernel else None), device)
            predicted = [r.time_s for r in rows]
            entry["predicted_ms"] = (None if None in predicted
                                     else 1e3 * sum(predicted))
            entry["bound"] = rows[0].bound
            if not grad:
                entry["min_bytes"] = min_bytes(op, geom, 4)
            if timed and cold and not target.dry_run:
                times = _cold_times(torch, stream, lambda: _launch_candidate(
                    op, config, args, out, geom, stream, scratch))
                entry.update(measured_ms=float(np.median(times)), reps=len(times),
                             timing="cold L2")
            elif timed and not target.dry_run:
                guess = entry["predicted_ms"] or 1.0
                reps = max(3, min(30, int(3.0 / max(guess, 1e-3))))
                times = []
                for _ in range(rounds):
                    start, end = cuda.event(), cuda.event()
                    _blocker()[1, 1, stream](2 + reps * 3 // 100)
                    start.record(stream)
                    for _ in range(reps):
                        _launch_candidate(op, config, args, out, geom, stream, scratch)
                    end.record(stream)
                    end.synchronize()
                    times.append(cuda.event_elapsed_time(start, end) / reps)
                entry["measured_ms"] = float(np.median(times))
                entry["reps"] = reps
        except Exception as exc:
            entry.update(ok=False, error=f"{type(exc).__name__}: {exc}"[:500],
                         traceback=traceback.format_exc()[-2000:])
        results.append(entry)
    return results


def check_autotune(target, gpuconv, layer, op, geom):
    """``gpuconv.set_autotune`` on one layer's forward, as a user calls it: the first call
    times every candidate on the call's own arrays (CUDA events on a GPU) and keeps the
    fastest; both calls agree with the float64 reference; one choice is stored, among the
    candidates, and the second call measures nothing (it is much faster than the first).
    One result."""
    from gpuconv import conv as gpuconv_conv
    from gpuconv.cuda import autotune, kernels

    torch = target.torch
    label = f"{layer.name}@{geom.batch}"
    before = gpuconv.set_autotune(True)
    autotune.forget()
    gpuconv_conv.clear_call_cache()
    try:
        x, w, b, gy = (None if t is None else t.to(torch.float32)
                       for t in _inputs(target, geom, op, "channel", 5))
        ref, bound = _reference(torch, op, geom, x, w, b)
        seconds, results = [], []
        for _ in range(2):
            start = time.perf_counter()
            results.append(_call(target, gpuconv, op, geom, x, w, b, gy))
            target.synchronize()
            seconds.append(time.perf_counter() - start)
        entry = _compare(target, label, op, geom, torch.float32, results[1], ref, bound)
        first = _compare(target, label, op, geom, torch.float32, results[0], ref, bound)
        chosen = list(autotune.choices().values())
        names = [c.kernel.name for c in kernels.forward_candidates(op, geom, np.float32)]
        entry.update(kernel=chosen[0] if len(chosen) == 1 else chosen,
                     candidates=names, first_call_s=seconds[0], second_call_s=seconds[1],
                     ok=bool(entry["ok"] and first["ok"] and len(chosen) == 1
                             and chosen[0] in names and seconds[1] < seconds[0]))
        return [entry]
    except Exception as exc:
        return [_failure(label, op, torch.float32, exc)]
    finally:
        gpuconv.set_autotune(before)
        autotune.forget()
        gpuconv_conv.clear_call_cache()


def candidate_lines(results):
    """A table of the candidates' times (measured beside predicted) and, per layer and
    operation, whether the dispatcher's pick was the fastest measured."""
    lines = ["| layer | op | kernel | picked | predicted ms | measured ms | measured / "
             "predicted | registers |", "|---|---|---|---|---|---|---|---|"]
    verdicts = []
    by_case = {}
    for r in results:
        by_case.setdefault((r["case"], r["function"]), []).append(r)
        pred, meas = r.get("predicted_ms"), r.get("measured_ms")
        ratio = f"{meas / pred:.2f}" if pred and meas else "-"
        lines.append(f"| {r['case']} | {r['function']} | `{r['kernel']}` | "
                     f"{'yes' if r.get('picked') else ''} | "
                     f"{'-' if pred is None else format(pred, '.3f')} | "
                     f"{'-' if meas is None else format(meas, '.3f')} | {ratio} | "
                     f"{r.get('registers', '-')} |")
    for (case, op), rows in by_case.items():
        # (the kernels at the earlier load counts are not the dispatcher's to pick:
        # :func:`loads_lines` reports them)
        timed = [r for r in rows if r.get("measured_ms") and r.get("ok")
                 and not r["kernel"].endswith(_EARLIER_SUFFIXES)]
        pick = next((r for r in timed if r.get("picked")), None)
        if not timed or pick is None:
            continue
        best = min(timed, key=lambda r: r["measured_ms"])
        verdicts.append(f"candidates {case} {op}: picked `{pick['kernel']}` "
                        f"{pick['measured_ms']:.3f} ms; fastest `{best['kernel']}` "
                        f"{best['measured_ms']:.3f} ms (pick / fastest "
                        f"{pick['measured_ms'] / best['measured_ms']:.2f})")
    return lines, verdicts


def loads_lines(results):
    """A line per kernel timed at both load counts (:data:`EARLIER_LOADS` against today's):
    the measured ratio of their times beside the predicted one, which checks the model's
    one round trip per round of loads."""
    lines = []
    by_name = {(r["case"], r["function"], r["kernel"]): r for r in results}
    for (case, op, name), earlier in by_name.items():
        for suffix in _EARLIER_SUFFIXES:
            now = by_name.get((case, op, name.removesuffix(suffix)))
            if not name.endswith(suffix) or now is None:
                continue
            ratios = _timed_ratios(now, earlier)
            if ratios is None:
                lines.append(f"loads per round {case} {op}: `{now['kernel']}` against "
                             f"`{name}`: not both checked and timed")
                continue
            lines.append(f"loads per round {case} {op}: `{now['kernel']}` "
                         f"{now['measured_ms']:.3f} ms, {EARLIER_LOADS} loads a round "
                         f"{earlier['measured_ms']:.3f} ms: measured {ratios[0]}, predicted "
                         f"{ratios[1]}")
    return lines


def _positions_baseline(pick, other):
    """Whether streaming kernel ``other`` is ``pick`` (positions side by side in a warp)
    at one position a warp: the same maps and rounds (``_m.._v.._u..`` of the names; the
    taps a lane may differ), no ``_p`` suffix."""
    shape = re.compile(r"_n(\d+)_m(\d+)_v\d+_u(\d+)_w\d+(_p\d+)?(?:_r\d+)?$")
    a, b = shape.search(pick), shape.search(other)
    return bool(a and b and a.group(4) and not b.group(4)
                and a.group(1, 2, 3) == b.group(1, 2, 3))


def _runs_baseline(pick, other):
    """Whether streaming kernel ``other`` is ``pick`` (outputs stored in runs, an ``_r``
    suffix) storing each position's outputs at once: the same name without the suffix."""
    return bool(re.search(r"_r\d+$", pick)) and re.sub(r"_r\d+$", "", pick) == other


def _timed_ratios(now, earlier):
    """``(measured, predicted)``: ``earlier``'s time over ``now``'s as text (the predicted
    ``-`` where either lacks a prediction), or None unless both were checked and timed."""
    if not (now.get("ok") and earlier.get("ok") and now.get("measured_ms")
            and earlier.get("measured_ms")):
        return None
    predicted = "-"
    if now.get("predicted_ms") and earlier.get("predicted_ms"):
        predicted = f"{earlier['predicted_ms'] / now['predicted_ms']:.2f}x"
    return f"{earlier['measured_ms'] / now['measured_ms']:.2f}x", predicted


@functools.lru_cache(maxsize=None)
def _stream_search(geom):
    from gpuconv.cuda import predict

    return tuple(predict.stream_search(geom, np.float32))


def searched_kernels(items):
    """``{(case, kernel name)}`` of the model's fastest launches that :func:`stream_items`
    added to ``items`` (at 8 images, :data:`STREAM_SEARCH_GAIN` ahead of the pick), which
    :func:`stream_lines` labels as such."""
    found = set()
    for layer, _, geom, configs in items:
        searched = searched_stream_config(geom, configs[0]) if geom.batch == 8 else None
        if searched is not None and searched in configs[1:]:
            found.add((f"{layer.name}@{geom.batch}", searched.kernel.name))
    return found


def stream_lines(results, copy_bytes_per_s, device, searched=()):
    """The weight-streaming kernels' lines: per layer and batch the pick's time (cold L2)
    as a share of the copy rate measured in this run (the fewest bytes the forward moves
    over its time), beside the model's share of ``device``'s copy rate; beside it, measured
    and predicted ratios, one position a warp, the outputs stored at once
    (:data:`STREAM_RUN_CASES`), the model's fastest launch (``searched``: ``(case, kernel
    name)`` pairs, :func:`searched_kernels`) and the earlier map rule
    (:data:`STREAM_RULE_CASES`); and a count of the cases at 70 % or more."""
    lines, met, timed = [], 0, 0
    by_case = {}
    for r in results:
        if r["kernel"].startswith("local_conv2d_stream"):
            by_case.setdefault(r["case"], []).append(r)
    for case, rows in by_case.items():
        pick = next((r for r in rows if r.get("picked")), None)
        if pick is None or not (pick.get("ok") and pick.get("measured_ms")):
            lines.append(f"small batch {case}: the streaming kernel was not checked and timed")
            continue
        seconds = pick["measured_ms"] / 1e3
        share = pick["min_bytes"] / seconds / (copy_bytes_per_s or math.nan)
        timed += 1
        met += share >= 0.7
        predicted = "-"
        if pick.get("predicted_ms"):
            rate = pick["min_bytes"] / (pick["predicted_ms"] / 1e3)
            predicted = (f"{pick['predicted_ms']:.3f} ms, "
                         f"{rate / device.copy_bytes_per_s:.0%} of the {device.name}'s")
        measured = (f"{share:.0%} of the copy rate measured here "
                    f"({copy_bytes_per_s / 1e12:.2f} TB/s)" if copy_bytes_per_s
                    else "the copy rate not measured")
        lines.append(f"small batch {case}: `{pick['kernel']}` {pick['measured_ms']:.3f} ms "
                     f"(cold L2), {measured}; predicted {predicted}")
        for other in rows:
            if other is pick:
                continue
            # beside the pick: one position a warp (its maps and rounds, no ``_p`` suffix),
            # its outputs stored at once (no ``_r`` suffix), or the earlier map rule
            if (case, other["kernel"]) in searched:
                label, what = "model's best", "the model's fastest launch"
            elif _positions_baseline(pick["kernel"], other["kernel"]):
                label, what = "positions", "one position a warp"
            elif _runs_baseline(pick["kernel"], other["kernel"]):
                label, what = "output runs", "stored at once"
            else:
                label, what = "map rule", "earlier rule"
            ratios = _timed_ratios(pick, other)
            if ratios is None:
                lines.append(f"{label} {case}: `{other['kernel']}` ({what}) was not "
                             "checked and timed")
                continue
            lines.append(f"{label} {case}: `{pick['kernel']}` {pick['measured_ms']:.3f} ms, "
                         f"{what} `{other['kernel']}` {other['measured_ms']:.3f} ms: "
                         f"measured {ratios[0]}, predicted {ratios[1]}")
    if timed:
        lines.append(f"small batches: {met} of {timed} layer-batches at 70 % or more of the "
                     "copy rate (the target: all)")
    return lines


def torch_operand_problems(torch):
    """What the public layer reads of CUDA tensors without PyTorch's own properties, checked
    against them: the array interface (:func:`gpuconv.conv.torch_cuda_interface`) of
    contiguous, transposed, strided, size-1, empty and half tensors, and the current stream
    (raw, see ``gpuconv.cuda.launch._torch_stream``) on the default stream and on a side
    stream. A list of problems, empty when all agree; the last entry says how the stream
    was read."""
    from gpuconv import conv
    from gpuconv.cuda import launch

    problems = []
    base = torch.arange(2 * 3 * 4 * 6, dtype=torch.float32, device="cuda").reshape(2, 3, 4, 6)
    tensors = {"contiguous": base, "transposed": base.transpose(2, 3),
               "strided": base[:, :, ::2, 1::3], "size-1 axes": base[:1, 1:2],
               "empty": base[:0], "half": base.half(), "double": base.double()}
    for name, t in tensors.items():
        ours = conv._operand(t, "x").cai
        theirs = dict(t.__cuda_array_interface__)
        if ours != theirs:
            problems.append(f"{name}: {ours} != PyTorch's {theirs}")
    device = base.device.index
    side = torch.cuda.Stream()
    for where, stream in (("current stream", torch.cuda.current_stream()),
                          ("side stream", side)):
        with torch.cuda.stream(stream):
            handle = int(launch._stream_of(base, device))
        if handle != int(stream.cuda_stream):
            problems.append(f"{where}: gpuconv read stream {handle:#x}, PyTorch's is "
                            f"{int(stream.cuda_stream):#x}")
    raw = bool(launch._TORCH_STREAM_READER) and launch._TORCH_STREAM_READER[0] is not None
    problems.append("stream read " + ("raw" if raw else "through torch.cuda.current_stream: "
                                      + "; ".join(launch._TORCH_STREAM_NOTE)))
    return problems


def torch_read_us(torch, shape, rounds=7, calls=1000):
    """Reading one CUDA tensor of ``shape``: PyTorch's ``__cuda_array_interface__`` property
    (the public layer's generic path read it twice per operand) and
    :func:`gpuconv.conv.torch_cuda_interface` (read once), medians of interleaved rounds, µs."""
    from gpuconv.conv import torch_cuda_interface

    tensor = torch.zeros(shape, device="cuda")
    dtype = np.dtype(np.float32)
    reads = {"property": lambda: tensor.__cuda_array_interface__,
             "gpuconv": lambda: torch_cuda_interface(tensor, dtype)}
    times = {name: [] for name in reads}
    for _ in range(rounds):
        for name, read in reads.items():
            start = time.perf_counter_ns()
            for _ in range(calls):
                read()
            times[name].append((time.perf_counter_ns() - start) / calls / 1e3)
    return {name: float(np.median(t)) for name, t in times.items()}


def gradient_call_us(target, gpuconv, geom, x, w, wl, count, warmup):
    """The host time of one call of each gradient (a training step's other calls) on the
    GPU's arrays, beside ``torch.nn.grad``'s two for conv2d: each call timed alone without
    waiting for its kernels (the queue is drained after each function), medians in µs."""
    grad, torch = gpuconv.grad, target.torch
    gy = target.to_gpuconv(target.uniform(geom.output_shape, target.generator(2)).float())
    x_size, w_size, wl_size = (tuple(int(s) for s in a.shape) for a in (x, w, wl))
    calls = {"conv2d_input": lambda: grad.conv2d_input(x_size, w, gy, padding=1),
             "conv2d_weight": lambda: grad.conv2d_weight(x, w_size, gy, padding=1),
             "local_conv2d_input": lambda: grad.local_conv2d_input(x_size, wl, gy, padding=1),
             "local_conv2d_weight": lambda: grad.local_conv2d_weight(x, wl_size, gy, padding=1)}
    if not target.dry_run:
        tx, tw, tgy = (target.from_gpuconv(a) for a in (x, w, gy))
        calls["torch conv2d_input"] = lambda: torch.nn.grad.conv2d_input(
            x_size, tw, tgy, padding=1)
        calls["torch conv2d_weight"] = lambda: torch.nn.grad.conv2d_weight(
            tx, w_size, tgy, padding=1)
    result = {}
    for name, call in calls.items():
        for _ in range(warmup):
            call()
        target.synchronize()
        times = []
        for _ in range(count):
            start = time.perf_counter_ns()
            call()
            times.append((time.perf_counter_ns() - start) / 1e3)
        target.synchronize()
        result[name] = float(np.median(times))
    return result


def overhead(target, gpuconv, calls=100):
    """What a call costs beyond its kernels, on the GPU's own arrays: the per-call table of
    ``gpuconv bench`` (tiny shapes, gpuconv's conv2d and local_conv2d beside ``F.conv2d``,
    :func:`gpuconv.bench.percall.measure`), the steps of one call's host path
    (:func:`gpuconv.bench.percall.call_steps`: operands, call-cache look-up, memory check and
    stream, allocation, launch, sync) on x 8x16x16x16 with 16 maps 3x3, the host time of each
    gradient call at that shape (:func:`gradient_call_us`), and a profile of that call (the
    functions with the most cumulative time per call). In a dry run the table is
    left out (the simulator takes a second a call) and the rest runs a few calls on a tiny
    geometry."""
    from gpuconv.bench import percall

    torch = target.torch
    count = 2 if target.dry_run else calls
    result = {"calls": count}
    if not target.dry_run:
        result["per_call"] = percall.measure(device="cuda", torch=torch)
    geom = conv_geometry((1, 2, 5, 5) if target.dry_run else (8, 16, 16, 16), (3, 3),
                         2 if target.dry_run else 16, padding=1)
    generator = target.generator(1)
    x, w, wl = (target.to_gpuconv(target.uniform(shape, generator).float())
                for shape in (geom.input_shape, geom.shared_weight_shape(),
                              geom.local_weight_shape()))
    result["steps"] = {op: percall.call_steps(op, x, weight, padding=1, repeat=count,
                                              warmup=1 if target.dry_run else 10)
                       for op, weight in (("conv2d", w), ("local_conv2d", wl))}
    # The same steps with every launch through Numba's dispatcher (gpuconv.cuda.fastlaunch
    # off): what the fast path saves, measured in the same process.
    from gpuconv.cuda import fastlaunch

    before = fastlaunch.set_enabled(False)
    try:
        result["steps_dispatcher"] = {
            op: percall.call_steps(op, x, weight, padding=1, repeat=count,
                                   warmup=1 if target.dry_run else 10)
            for op, weight in (("conv2d", w), ("local_conv2d", wl))}
        # the same kernels on the same arrays: the two launch paths agree bit for bit
        by_dispatcher = [getattr(gpuconv, op)(x, weight, padding=1)
                         for op, weight in (("conv2d", w), ("local_conv2d", wl))]
    finally:
        fastlaunch.set_enabled(before)
    by_fast_path = [getattr(gpuconv, op)(x, weight, padding=1)
                    for op, weight in (("conv2d", w), ("local_conv2d", wl))]
    result["gradient_call_us"] = gradient_call_us(target, gpuconv, geom, x, w, wl, count,
                                                  1 if target.dry_run else 10)
    result["fast_equals_dispatcher"] = {
        op: bool(target.torch.equal(target.from_gpuconv(a), target.from_gpuconv(b)))
        for op, a, b in zip(("conv2d", "local_conv2d"), by_fast_path, by_dispatcher)}
    if not target.dry_run and torch.cuda.is_available():
        result["torch_operands"] = torch_operand_problems(torch)
        result["torch_read_us"] = torch_read_us(torch, geom.input_shape)
    profile = cProfile.Profile()
    profile.enable()
    for _ in range(count):
        gpuconv.conv2d(x, w, padding=1)
    target.synchronize()
    profile.disable()
    stats = pstats.Stats(profile)
    top = sorted(((value[3] / count, f"{func[0].rsplit(os.sep, 1)[-1]}:{func[1]}({func[2]})")
                  for func, value in stats.stats.items()), reverse=True)[:25]
    result["profile_top_cumulative"] = [{"function": name, "s_per_call": sec}
                                        for sec, name in top]
    return result


# --------------------------------------------------------------------------------------------
# the run
# --------------------------------------------------------------------------------------------

class Run:
    """The report, the failures, the budget, and what was printed (for the summary)."""

    def __init__(self, args):
        self.args = args
        self.start = time.perf_counter()
        self.deadline = self.start + (args.budget_s if getattr(args, "wall_budget", True)
                                      else math.inf)
        self.report = {"started": time.strftime("%Y-%m-%d %H:%M:%S"), "args": vars(args),
                       "phases": {}}
        self.failures = 0
        self.summary = []

    def say(self, text, summary=False):
        print(text, flush=True)
        if summary:
            self.summary.append(text)

    def left_s(self):
        return self.deadline - time.perf_counter()

    def results(self, phase, results, seconds, stopped=None):
        failed = [r for r in results if not r.get("ok")]
        self.failures += len(failed)
        for r in failed:
            self.say(f"FAIL {phase}: {json.dumps({k: v for k, v in r.items() if k != 'traceback'}, default=str)[:600]}")
        skipped = sum(1 for r in results if r.get("skipped"))
        line = (f"{phase}: {len(results) - len(failed) - skipped}/{len(results) - skipped} ok"
                + (f", {skipped} skipped" if skipped else "") + f" ({seconds:.1f} s)"
                + (f"; {stopped}" if stopped else ""))
        self.say(line, summary=True)
        self.report["phases"][phase] = {"results": results, "seconds": seconds,
                                        "stopped": stopped}


def _items_loop(run, phase, items, one):
    """Run ``one(item)`` (a list of results) for each item until the budget runs out."""
    start = time.perf_counter()
    results, stopped = [], None
    for index, item in enumerate(items):
        if time.perf_counter() > run.deadline:
            stopped = f"budget ran out after {index} of {len(items)} items"
            break
        results += one(item)
    run.results(phase, results, time.perf_counter() - start, stopped)


def main(argv=None):
    args = parse_args(argv)
    phases = plan(args.dry_run, args.quick)
    if args.plan:
        print(format_plan(phases, args.budget_s))
        return 0
    run = Run(args)
    try:
        import torch

        import gpuconv
        from gpuconv.device import cuda_toolchain_problem, simulator_enabled
    except Exception as exc:
        print(f"cannot start: {type(exc).__name__}: {exc}")
        return 2
    if args.dry_run and not simulator_enabled():
        print("cannot start: --dry-run needs NUMBA_ENABLE_CUDASIM=1 before Numba is imported "
              "(run the script itself: python scripts/gpu_check.py --dry-run)")
        return 2
    if not args.dry_run and not torch.cuda.is_available():
        print("cannot start: no CUDA GPU visible to PyTorch (use --dry-run to check the logic "
              "without one)")
        return 2
    if not args.dry_run:
        torch.backends.cudnn.allow_tf32 = False
        torch.backends.cuda.matmul.allow_tf32 = False
    target = Target(torch, args.dry_run)
    selected = [p for p in phases if (args.only is None or p.name in args.only or p.name == "env")
                and p.name not in args.skip]

    env = environment(torch, args.dry_run)
    run.report["environment"] = env
    run.say("environment: " + json.dumps(env, default=str), summary=True)
    problem = cuda_toolchain_problem()
    if problem and not args.dry_run:
        run.say(f"cannot start: {problem}", summary=True)
        _write(run, 2)
        return 2
    run.say(("dry run: Numba's CUDA simulator, tiny sizes; no timing claims\n" if args.dry_run
             else "") + format_plan(selected, args.budget_s))

    layers = suite_layers(args.dry_run, args.quick)
    for phase in selected:
        if phase.name == "env":
            continue
        if phase.estimate_s > run.left_s():
            run.say(f"{phase.name}: skipped, estimated {phase.estimate_s:.0f} s and "
                    f"{max(run.left_s(), 0):.0f} s of the budget left", summary=True)
            run.report["phases"][phase.name] = {"skipped": "budget"}
            continue
        try:
            _run_phase(run, phase.name, target, gpuconv, layers)
        except Exception as exc:
            run.failures += 1
            run.say(f"FAIL {phase.name}: {type(exc).__name__}: {exc}", summary=True)
            # (what the phase recorded before it failed is kept beside the error)
            run.report["phases"].setdefault(phase.name, {})["error"] = \
                traceback.format_exc()[-4000:]
            print(run.report["phases"][phase.name]["error"])
    status = 0 if run.failures == 0 else 1
    _write(run, status)
    return status


def _run_phase(run, name, target, gpuconv, layers):
    args, torch = run.args, target.torch
    if name == "suite":
        def one(item):
            layer, op, geom, dtype = item
            return check_functions(target, gpuconv, f"{layer.name}@{geom.batch}", geom,
                                   (op,), getattr(torch, dtype), seed=geom.batch)
        _items_loop(run, name, suite_items(layers, args.dry_run), one)
    elif name == "suite-gradients":
        def one(item):
            layer, op, dtype = item
            functions = GRAD_FUNCTIONS[op]
            batch = layer.batch_gpu if args.dry_run else reduced_batch(layer, functions, dtype)
            return check_functions(target, gpuconv, f"{layer.name}@{batch}",
                                   layer.geometry(batch), functions, getattr(torch, dtype),
                                   seed=batch + 1)
        _items_loop(run, name, [(lay, op, d) for lay in layers for op in FORWARD_OPS
                                for d in SUITE_DTYPES], one)
    elif name == "multipass":
        _items_loop(run, name, multipass_cases(args.dry_run), lambda item: check_functions(
            target, gpuconv, item[0].name, case_geometry(item[0]), item[1], torch.float32,
            bias=item[0].bias, seed=3))
    elif name == "determinism":
        cases, big = determinism_cases(args.dry_run)
        items = [("repeat", c) for c in cases] + [("big", big)]

        def one(item):
            kind, case = item
            if kind == "repeat":
                return check_repeatable(target, gpuconv, case.name, case_geometry(case),
                                        ALL_FUNCTIONS, torch.float32)
            return check_functions(target, gpuconv, case.name, case_geometry(case),
                                   ALL_FUNCTIONS, torch.float32, seed=5)
        _items_loop(run, name, items, one)
    elif name in ("memcheck", "racecheck", "synccheck"):
        start = time.perf_counter()
        if args.dry_run:
            result = {"status": "skipped: the simulator has no device code to check"}
        else:
            result = run_sanitizer(name, timeout=max(30, int(min(run.left_s(), 300))))
        ok = result["status"] == "ok" or result["status"].startswith("skipped")
        entry = {"check": name, "ok": ok, "detail": result["status"],
                 "output_tail": result.get("output_tail")}
        if result["status"].startswith("skipped"):
            entry["skipped"] = result["status"]
        run.results(name, [entry], time.perf_counter() - start)
    elif name.startswith("time-"):
        _timing_phase(run, name, target, layers)
    elif name == "overhead":
        start = time.perf_counter()
        result = overhead(target, gpuconv)
        run.report["phases"][name] = {"result": result,
                                      "seconds": time.perf_counter() - start}
        for op, same in result["fast_equals_dispatcher"].items():
            if not same:
                run.failures += 1
                run.say(f"FAIL overhead: {op} launched on the fast path differs from the same "
                        "kernel launched by Numba's dispatcher", summary=True)
        *problems, how = result.get("torch_operands", ["(no CUDA tensors)"])
        for problem in problems:
            run.failures += 1
            run.say(f"FAIL overhead: a CUDA tensor read differs from PyTorch's own: {problem}",
                    summary=True)
        if args.dry_run:
            run.say("overhead: ran (simulator: no timing claim)", summary=True)
            return
        read = result.get("torch_read_us", {})
        run.say(f"overhead: CUDA tensors read as PyTorch reads them ({len(problems)} "
                f"differences); {how}; one tensor: PyTorch's property "
                f"{read.get('property', math.nan):.1f} us, gpuconv's reading "
                f"{read.get('gpuconv', math.nan):.1f} us", summary=True)
        from gpuconv.bench import percall

        run.say(percall.format_section(result["per_call"]), summary=True)
        for key, how in (("steps", ""), ("steps_dispatcher", ", launched by the dispatcher")):
            for op, steps in result[key].items():
                run.say(f"overhead steps {op} (8x16x16x16, 16 maps 3x3{how}): " + ", ".join(
                    f"{k} {v:.1f} us" for k, v in steps["steps_us"].items())
                    + f"; whole call {steps['total_us']:.1f} us", summary=True)
        run.say("overhead gradients (8x16x16x16, 16 maps 3x3, host time per call): " + ", ".join(
            f"{k} {v:.1f} us" for k, v in result["gradient_call_us"].items()), summary=True)
        for entry in result["profile_top_cumulative"][:10]:
            run.say(f"  {entry['s_per_call'] * 1e6:9.1f} us/call  {entry['function']}")
    elif name == "candidates":
        from gpuconv.cuda import predict

        device = predict.H200
        if not args.dry_run:
            device = predict.device_named(torch.cuda.get_device_name())
        copy_bytes_per_s = None
        if not args.dry_run:
            try:
                copy_bytes_per_s = copy_rate(torch)
            except Exception as exc:  # the streaming kernels are then timed, not shared out
                run.say(f"candidates: the copy rate was not measured ({type(exc).__name__}: "
                        f"{exc})"[:300], summary=True)
        _items_loop(run, name, candidate_items(layers, args.dry_run),
                    lambda item: check_candidates(target, *item, device=device))
        run.report["phases"][name]["copy_bytes_per_s"] = copy_bytes_per_s
        lines, verdicts = candidate_lines(run.report["phases"][name]["results"])
        # autotuning, as a user turns it on, on the last layer (its candidates compiled)
        tuned = [r for op in FORWARD_OPS for r in check_autotune(
            target, gpuconv, layers[-1], op, layers[-1].geometry(layers[-1].batch_gpu))]
        run.report["phases"][name]["autotune"] = tuned
        for r in tuned:
            if not r.get("ok"):
                run.failures += 1
                run.say(f"FAIL candidates autotune: {json.dumps({k: v for k, v in r.items() if k != 'traceback'}, default=str)[:600]}")
            elif args.dry_run:
                run.say(f"candidates autotune {r['case']} {r['function']}: chose "
                        f"`{r['kernel']}` (simulator: no timing claim)", summary=True)
            else:
                run.say(f"candidates autotune {r['case']} {r['function']}: chose "
                        f"`{r['kernel']}`; first call {r['first_call_s']:.2f} s (tuning), "
                        f"second {1e3 * r['second_call_s']:.2f} ms", summary=True)
        if args.dry_run:
            run.say("candidates: checked (simulator: no timing claim)", summary=True)
            return
        run.say(f"candidates: predictions for the {device.name}")
        for line in lines:
            run.say(line)
        results = run.report["phases"][name]["results"]
        for line in (verdicts + loads_lines(results)
                     + stream_lines(results, copy_bytes_per_s, device,
                                    searched_kernels(stream_items(layers)))):
            run.say(line, summary=True)
    elif name == "array-kinds":
        start = time.perf_counter()
        results = check_array_kinds(torch, gpuconv, args.dry_run)
        for r in results:
            run.say(f"  {'ok  ' if r['ok'] else 'FAIL'} {r['check']}: {r['detail']}")
        run.results(name, results, time.perf_counter() - start)
    elif name == "grid":
        grid = list(DRY_GRID) if args.dry_run else geometry_grid(args.quick)
        grads = list(DRY_GRID) if args.dry_run else grad_grid(args.quick)
        items = ([(c, FORWARD_OPS, d) for d in DTYPES for c in grid]
                 + [(c, GRAD_FUNCTIONS[op], d) for d in DTYPES for c in grads
                    for op in FORWARD_OPS])
        _items_loop(run, name, items, lambda item: check_functions(
            target, gpuconv, item[0].name, case_geometry(item[0]), item[1],
            getattr(torch, item[2]), bias=item[0].bias, seed=11))


def _timing_phase(run, name, target, layers):
    args = run.args
    start = time.perf_counter()
    pass_name = {"time-forward": "forward", "time-backward": "backward",
                 "time-step": "step", "time-float16": "forward"}[name]
    dtype = "float16" if name == "time-float16" else "float32"
    ceilings = run.report.get("ceilings")
    result, left = time_pass(layers, pass_name, args, run.deadline, ceilings, dtype,
                             torch=target.torch)
    run.report["ceilings"] = ceilings or result["machine"].get("ceilings")
    records = result["records"]
    bad = disagreements(records)
    run.failures += len(bad)
    for line in bad:
        run.say(f"FAIL {name}: {line}", summary=True)
    not_run = (result["machine"].get("passes_not_run") or {}).get(pass_name)
    run.report["phases"][name] = {"bench": result, "layers_not_reached": left,
                                  "seconds": time.perf_counter() - start}
    stopped = f"; budget ran out before {', '.join(left)}" if left else ""
    if not_run:
        run.say(f"{name}: {not_run}", summary=True)
        return
    if args.dry_run:
        run.say(f"{name}: {len(records)} records, {len(bad)} disagreements "
                f"(simulator: no timing claim){stopped}", summary=True)
        return
    print(bench.format_report(result))
    for line in timing_lines(records, run.report["ceilings"] or {}):
        run.say(line, summary=True)
    run.say(f"{name}: {len(records)} records, {len(bad)} disagreements "
            f"({time.perf_counter() - start:.1f} s){stopped}", summary=True)


def _write(run, status):
    _fast_launch_report(run)
    run.report["failures"] = run.failures
    run.report["seconds"] = time.perf_counter() - run.start
    run.report["finished"] = time.strftime("%Y-%m-%d %H:%M:%S")
    verdict = "PASS" if status == 0 else ("CANNOT START" if status == 2
                                          else f"FAIL ({run.failures} failures)")
    run.say(f"{verdict} in {run.report['seconds']:.0f} s of a {run.args.budget_s:.0f} s budget",
            summary=True)
    if run.args.json:
        os.makedirs(os.path.dirname(os.path.abspath(run.args.json)), exist_ok=True)
        with open(run.args.json, "w") as handle:
            json.dump(run.report, handle, indent=1, default=str)
        summary = os.path.join(os.path.dirname(os.path.abspath(run.args.json)),
                               "gpu_check_summary.txt")
        with open(summary, "w") as handle:
            handle.write("\n".join(run.summary) + "\n")
        print(f"wrote {run.args.json} and {summary}")


def _fast_launch_report(run):
    """Whether the launches took the fast path (:mod:`gpuconv.cuda.fastlaunch`), and why
    any kernel did not: its first launch found numba-cuda marshalling its arguments
    differently, or numba-cuda's internals were not as the fast path reads them. Not a
    failure (those kernels ran through the dispatcher, checked like the rest), but a
    finding: the per-call cost of those kernels is the dispatcher's."""
    if "numba" not in sys.modules or "gpuconv.cuda.fastlaunch" not in sys.modules:
        return
    from gpuconv.cuda import fastlaunch

    reasons = fastlaunch.fallback_reasons()
    run.report["fast_launch"] = {"enabled": fastlaunch.enabled(), "dispatcher": reasons}
    if run.args.dry_run:
        return
    run.say(f"fast launch: {'on' if fastlaunch.enabled() else 'off'}, "
            f"{len(reasons)} kernels launched through the dispatcher instead", summary=True)
    for name, reason in sorted(reasons.items()):
        run.say(f"  fast launch: {name}: {reason}", summary=True)


if __name__ == "__main__":
    sys.exit(main())
