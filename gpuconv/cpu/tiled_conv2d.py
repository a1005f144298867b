"""CPU kernels of the tiled (partly shared) convolution and its gradients.

A tiled convolution has ``T_h x T_w`` kernel slots ``w[o, sy, sx, c, u, v]``; output row
``oy`` uses slot row ``rows[oy]`` and column ``ox`` slot column ``cols[ox]``
(:meth:`gpuconv.geometry.TiledGeometry.row_slots`). The two ends of the dial run the
kernels of the operations they are:

* ``T = (1, 1)``: :mod:`.conv2d` and :mod:`.conv2d_grad` on the weight viewed as
  ``(C_out, C_in/groups, kH, kW)``;
* ``T = (H_out, W_out)`` (the slots are the positions, in both tilings): :mod:`.local_conv2d`
  and :mod:`.local_conv2d_grad` on the weight as it is.

Between them:

* a few slots (at most :data:`FEW_SLOTS`), where the unshared kernel would be slower (see
  :func:`_few_slot_problems`): one conv2d per slot, whose outputs are a strided (periodic
  tiles) or cropped (blocks) convolution of the input, placed on the slot's rows and
  columns; the input gradient likewise, one conv2d input gradient per slot added to the
  input rows and columns its windows read, slot after slot (deterministic);
* else the forward runs the unshared kernel with the slot maps (:func:`.local_conv2d.
  slotted_local_conv2d_forward`): the weight of a position is read at its slot's offset,
  nothing else changes (the same order of terms, so the result has the bits of
  ``local_conv2d`` on the expanded weight);
* and the input gradient the unshared input gradient with the slot maps
  (:func:`.local_conv2d_grad.slotted_local_conv2d_input_grad`): each position's kernel read
  at its slot's offset, the same order of terms;
* weight gradient: for a few slots (:data:`FEW_SLOTS`) one conv2d weight gradient per slot
  (its positions are a strided convolution of the input for periodic tiles, a cropped one
  for blocks); else the unshared weight gradient into a scratch of the local weight's size
  (``C_out * H_out * W_out * C_in/groups * kH * kW`` elements), then each slot
  sums its positions' gradients in a fixed order (output row, then column, ascending):
  deterministic, the same bits for every thread count.
"""

from __future__ import annotations

import functools
import math

import numpy as np
from numba import njit, prange

from ..geometry import conv_geometry
from .conv2d import conv2d_forward, conv2d_scratch_bytes
from .simd import VECTOR_BYTES as _VECTOR_BYTES
from .conv2d_grad import (conv2d_input_grad, conv2d_input_grad_scratch_bytes,
                          conv2d_weight_grad, conv2d_weight_grad_scratch_bytes)
from .local_conv2d import (local_conv2d_forward, local_conv2d_scratch_bytes,
                           slotted_local_conv2d_forward, slotted_scratch_bytes)
from .local_conv2d_grad import (local_conv2d_input_grad, local_conv2d_input_grad_scratch_bytes,
                                local_conv2d_weight_grad,
                                local_conv2d_weight_grad_scratch_bytes,
                                slotted_local_conv2d_input_grad)

__all__ = ["tiled_conv2d_forward", "tiled_conv2d_scratch_bytes", "tiled_conv2d_input_grad",
           "tiled_conv2d_input_grad_scratch_bytes", "tiled_conv2d_weight_grad",
           "tiled_conv2d_weight_grad_scratch_bytes", "slot_maps"]


@functools.lru_cache(maxsize=256)
def slot_maps(geom):
    """``(rows, cols)``: the slot of each output row and column, int64 arrays."""
    return (np.asarray(geom.row_slots(), dtype=np.int64),
            np.asarray(geom.col_slots(), dtype=np.int64))


def _shared_shape(geom):
    return (geom.out_channels, geom.in_channels_per_group, geom.kernel_height,
            geom.kernel_width)


def _local_bytes(geom, itemsize):
    return math.prod(geom.local_weight_shape()) * itemsize


def tiled_conv2d_scratch_bytes(geom, itemsize):
    """Bytes of scratch :func:`tiled_conv2d_forward` allocates beyond its output: those of
    the kernel it runs (a few slots: the largest slot's copies and conv2d scratch)."""
    if geom.shared:
        return conv2d_scratch_bytes(geom.untiled, itemsize)
    if geom.unshared:
        return local_conv2d_scratch_bytes(geom.untiled, itemsize)
    problems = _few_slot_problems(geom, itemsize)
    if problems is not None:
        return _by_slot_bytes(problems, itemsize, conv2d_scratch_bytes)
    return slotted_scratch_bytes(geom.untiled, itemsize)


def tiled_conv2d_forward(x, weight, bias, has_bias, out, geom):
    """Tiled convolution into ``out``: ``x (n, c_I, h, w)``, ``weight (c_O, T_h, T_w, c_Ig,
    k_H, k_W)``, ``bias (c_O, 1, 1)`` or ``(c_O, T_h, T_w)``; C-contiguous, one dtype."""
    plain = geom.untiled
    if geom.shared:
        return conv2d_forward(x, weight.reshape(_shared_shape(geom)), bias, has_bias, out,
                              plain)
    if geom.unshared:
        return local_conv2d_forward(x, weight, bias, has_bias, out, plain)
    problems = _few_slot_problems(geom, x.dtype.itemsize)
    if problems is not None:
        return _forward_by_slot(x, weight, bias, has_bias, out, problems)
    rows, cols = slot_maps(geom)
    return slotted_local_conv2d_forward(x, weight, bias, has_bias, out, plain, rows, cols)


@njit(parallel=True, cache=True)
def _sum_slots(local, rows, cols, out):
    """``out[o, sy, sx] = sum of local[o, oy, ox]`` over the positions of slot ``(sy, sx)``,
    added in order of ``oy``, then ``ox`` (each output channel by one thread: the same bits
    for every thread count)."""
    c_O, h_O, w_O, r_len = local.shape
    t_H, t_W = out.shape[1], out.shape[2]
    for o in prange(c_O):
        for sy in range(t_H):
            for sx in range(t_W):
                for r in range(r_len):
                    out[o, sy, sx, r] = 0
        for oy in range(h_O):
            sy = rows[oy]
            for ox in range(w_O):
                sx = cols[ox]
                for r in range(r_len):  # (contiguous runs: vectorised)
                    out[o, sy, sx, r] += local[o, oy, ox, r]


def _flat_taps(array):
    return array.reshape(array.shape[0], array.shape[1], array.shape[2], -1)


def tiled_conv2d_input_grad_scratch_bytes(geom, itemsize):
    """Bytes of scratch :func:`tiled_conv2d_input_grad` allocates beyond ``out``."""
    plain = geom.untiled
    if geom.shared:
        return conv2d_input_grad_scratch_bytes(plain, itemsize)
    problems = None if geom.unshared else _few_slot_problems(geom, itemsize, gradient=True)
    if problems is not None:
        return _by_slot_bytes(problems, itemsize, conv2d_input_grad_scratch_bytes)
    return local_conv2d_input_grad_scratch_bytes(plain, itemsize)


def tiled_conv2d_input_grad(grad_output, weight, out, geom):
    """``out = d(sum(tiled_conv2d(x, weight) * grad_output)) / dx`` (every element written)."""
    plain = geom.untiled
    if geom.shared:
        return conv2d_input_grad(grad_output, weight.reshape(_shared_shape(geom)), out, plain)
    if geom.unshared:
        return local_conv2d_input_grad(grad_output, weight, out, plain)
    problems = _few_slot_problems(geom, out.dtype.itemsize, gradient=True)
    if problems is not None:
        return _input_grad_by_slot(grad_output, weight, out, problems)
    rows, cols = slot_maps(geom)
    return slotted_local_conv2d_input_grad(grad_output, weight, out, plain, rows, cols)


#: Slots up to which the weight gradient runs one conv2d weight gradient per slot (see
#: :func:`_slot_problems`) rather than the unshared one and a slot sum. Each slot costs a
#: call and copies of its input and gradient: ``python scripts/tiled_speed.py --gradients
#: --between 2 4 --only deepface-l5 deepface-l6`` (one core) timed 4 slots at 0.87-1.08x
#: local_conv2d's weight gradient, where the unshared gradient and slot sum took 1.4-1.5x,
#: and 16 slots at 2.5-2.9x.
FEW_SLOTS = 4


def _slot_runs(out_size, tiles, tiling):
    """Per slot along one axis, its output rows as ``(first, step, count)``."""
    if tiling == "periodic":
        return [(a, tiles, -(-(out_size - a) // tiles)) for a in range(tiles)]
    return [(-(-a * out_size // tiles), 1, -(-(a + 1) * out_size // tiles) - -(-a * out_size // tiles))
            for a in range(tiles)]


def _axis_problem(run, size, kernel, stride, dilation, pad_before):
    """A slot's rows (or columns) as a convolution of its own: the input rows it reads
    ``[lo, hi)``, its padding ``(before, after)`` and stride."""
    first, step, count = run
    start = first * stride - pad_before               # input row of the first window
    span = (count - 1) * step * stride + (kernel - 1) * dilation + 1
    lo, hi = max(0, start), min(size, start + span)
    return lo, hi, (lo - start, start + span - hi), step * stride


@functools.lru_cache(maxsize=64)
def _slot_problems(geom):
    """Each slot ``(a, b)``'s share of the weight gradient as a conv2d weight gradient:
    ``(a, b, row slice of x, column slice of x, its geometry, gy's row run, column run)``, or
    None where a slot's windows lie wholly in the padding."""
    rows = _slot_runs(geom.out_height, geom.tile_height, geom.tiling)
    cols = _slot_runs(geom.out_width, geom.tile_width, geom.tiling)
    problems = []
    for a, row_run in enumerate(rows):
        y0, y1, pad_h, s_h = _axis_problem(row_run, geom.in_height, geom.kernel_height,
                                           geom.stride_h, geom.dilation_h, geom.pad_top)
        for b, col_run in enumerate(cols):
            x0, x1, pad_w, s_w = _axis_problem(col_run, geom.in_width, geom.kernel_width,
                                               geom.stride_w, geom.dilation_w, geom.pad_left)
            if y1 <= y0 or x1 <= x0:
                return None
            sub = conv_geometry((geom.batch, geom.in_channels, y1 - y0, x1 - x0),
                                (geom.kernel_height, geom.kernel_width), geom.out_channels,
                                (s_h, s_w), (pad_h, pad_w), (geom.dilation_h, geom.dilation_w),
                                geom.groups)
            problems.append((a, b, slice(y0, y1), slice(x0, x1), sub, row_run, col_run))
    return problems


def _weight_grad_by_slot(x, grad_output, out, problems):
    """One conv2d weight gradient per slot: slot ``(a, b)``'s positions form a strided
    (periodic) or cropped (blocks) convolution of ``x``; deterministic."""
    shared = np.empty(out.shape[:1] + out.shape[3:], dtype=out.dtype)
    for a, b, rows, cols, sub, (r0, r_step, r_count), (c0, c_step, c_count) in problems:
        x_slot = np.ascontiguousarray(x[:, :, rows, cols])
        gy_slot = np.ascontiguousarray(
            grad_output[:, :, r0:r0 + r_step * r_count:r_step, c0:c0 + c_step * c_count:c_step])
        conv2d_weight_grad(x_slot, gy_slot, shared, sub)
        out[:, a, b] = shared
    return out


#: Output columns per slot from which a few slots run as convolutions whatever the batch:
#: the conv2d kernel's widest register block (see :func:`_few_slot_problems`).
WIDE_SLOT = 24

#: Largest stride (the layer's times the period) of a slot's convolution whose input
#: gradient runs by slot: beyond it most phases of each slot's input gradient are empty.
BY_SLOT_MAX_STRIDE = 4


def _few_slot_problems(geom, itemsize, gradient=False):
    """The forward (and input gradient, ``gradient``) of a tiling strictly between the ends
    with at most :data:`FEW_SLOTS` slots run as one convolution per slot
    (:func:`_slot_problems`) where the unshared kernel with slot maps would be slower:
    when its vectors, which run over the batch, are mostly idle (a batch of at most a quarter
    of a vector's lanes, 4 images in float32), or when every slot's outputs are at least
    :data:`WIDE_SLOT` columns wide, and, for the input gradient, the slots' convolutions
    have a stride of at most :data:`BY_SLOT_MAX_STRIDE`. Else None (the slot maps).

    Measured on one core (``python scripts/tiled_speed.py``; BENCHMARKS.md, "Tiled
    convolution"): 2 x 2 or 1 x 4 slots as convolutions take 0.05-0.48x the time of the slot
    maps on the default suite's layers of batch 1-4 and on DeepFace L4, but 0.54-1.45x
    (forward) and 1.14-2.9x (input gradient) on DeepFace L5/L6, whose batch of 8 fills half
    the lanes and whose slots are 10-13 columns wide."""
    if geom.shared or geom.unshared or geom.tile_height * geom.tile_width > FEW_SLOTS:
        return None
    problems = _slot_problems(geom)
    if problems is None:
        return None
    lanes = _VECTOR_BYTES // itemsize
    narrowest = min(sub.out_width for *_, sub, _, _ in problems)
    if 4 * geom.batch > lanes and narrowest < WIDE_SLOT:
        return None
    if gradient and max(max(sub.stride_h, sub.stride_w) for *_, sub, _, _ in problems) > \
            BY_SLOT_MAX_STRIDE:
        return None
    return problems


def _by_slot_bytes(problems, itemsize, kernel_scratch_bytes):
    """Scratch of a by-slot pass: the largest slot's input, output and weight copies, plus
    the most scratch its conv2d kernel takes."""
    copies = max(math.prod(sub.input_shape) + math.prod(sub.output_shape)
                 + math.prod(sub.shared_weight_shape()) + sub.out_channels
                 for *_, sub, _, _ in problems)
    return copies * itemsize + max(kernel_scratch_bytes(sub, itemsize)
                                   for *_, sub, _, _ in problems)


def _forward_by_slot(x, weight, bias, has_bias, out, problems):
    """One conv2d per slot: slot ``(a, b)``'s outputs are a strided (periodic) or cropped
    (blocks) convolution of ``x`` with its kernel, written to their rows and columns of
    ``out`` (every output belongs to one slot: every element written)."""
    per_slot_bias = bias.shape[1] * bias.shape[2] > 1
    for a, b, rows, cols, sub, (r0, r_step, r_count), (c0, c_step, c_count) in problems:
        x_slot = np.ascontiguousarray(x[:, :, rows, cols])
        w_slot = np.ascontiguousarray(weight[:, a, b])
        b_slot = np.ascontiguousarray(bias[:, a:a + 1, b:b + 1]) if per_slot_bias else bias
        part = np.empty(sub.output_shape, dtype=out.dtype)
        conv2d_forward(x_slot, w_slot, b_slot, has_bias, part, sub)
        out[:, :, r0:r0 + r_step * r_count:r_step, c0:c0 + c_step * c_count:c_step] = part
    return out


def _input_grad_by_slot(grad_output, weight, out, problems):
    """One conv2d input gradient per slot, each added to the input rows and columns its
    windows read, slot after slot in order (deterministic)."""
    out[...] = 0
    for a, b, rows, cols, sub, (r0, r_step, r_count), (c0, c_step, c_count) in problems:
        gy_slot = np.ascontiguousarray(
            grad_output[:, :, r0:r0 + r_step * r_count:r_step, c0:c0 + c_step * c_count:c_step])
        w_slot = np.ascontiguousarray(weight[:, a, b])
        part = np.empty(sub.input_shape, dtype=out.dtype)
        conv2d_input_grad(gy_slot, w_slot, part, sub)
        out[:, :, rows, cols] += part
    return out


def tiled_conv2d_weight_grad_scratch_bytes(geom, itemsize):
    """Bytes of scratch :func:`tiled_conv2d_weight_grad` allocates beyond ``out``."""
    plain = geom.untiled
    if geom.shared:
        return conv2d_weight_grad_scratch_bytes(plain, itemsize)
    problems = _slot_problems(geom) if geom.tile_height * geom.tile_width <= FEW_SLOTS else None
    if problems is not None and not geom.unshared:  # the largest slot's copies and scratch
        return max(math.prod(sub.input_shape) + math.prod(sub.output_shape)
                   + math.prod(sub.shared_weight_shape())
                   for *_, sub, _, _ in problems) * itemsize + max(
            conv2d_weight_grad_scratch_bytes(sub, itemsize) for *_, sub, _, _ in problems)
    extra = 0 if geom.unshared else _local_bytes(geom, itemsize)
    return local_conv2d_weight_grad_scratch_bytes(plain, itemsize) + extra


def tiled_conv2d_weight_grad(x, grad_output, out, geom):
    """``out = d(sum(tiled_conv2d(x, w) * grad_output)) / dw``, ``(c_O, T_h, T_w, c_Ig, k_H,
    k_W)``; deterministic (see the module docstring)."""
    plain = geom.untiled
    if geom.shared:
        conv2d_weight_grad(x, grad_output, out.reshape(_shared_shape(geom)), plain)
        return out
    if geom.unshared:
        return local_conv2d_weight_grad(x, grad_output, out, plain)
    problems = _slot_problems(geom) if geom.tile_height * geom.tile_width <= FEW_SLOTS else None
    if problems is not None:
        return _weight_grad_by_slot(x, grad_output, out, problems)
    local = np.empty(geom.local_weight_shape(), dtype=out.dtype)
    local_conv2d_weight_grad(x, grad_output, local, plain)
    rows, cols = slot_maps(geom)
    _sum_slots(_flat_taps(local), rows, cols, _flat_taps(out))
    return out
