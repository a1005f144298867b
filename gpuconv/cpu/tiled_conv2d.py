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

* forward: the unshared kernel with the slot maps (:func:`.local_conv2d.
  slotted_local_conv2d_forward`): the weight of a position is read at its slot's offset,
  nothing else changes (the same order of terms, so the result has the bits of
  ``local_conv2d`` on the expanded weight);
* input gradient: the unshared input gradient with the slot maps
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
    the kernel it runs."""
    if geom.shared:
        return conv2d_scratch_bytes(geom.untiled, itemsize)
    if geom.unshared:
        return local_conv2d_scratch_bytes(geom.untiled, itemsize)
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
    return local_conv2d_input_grad_scratch_bytes(plain, itemsize)


def tiled_conv2d_input_grad(grad_output, weight, out, geom):
    """``out = d(sum(tiled_conv2d(x, weight) * grad_output)) / dx`` (every element written)."""
    plain = geom.untiled
    if geom.shared:
        return conv2d_input_grad(grad_output, weight.reshape(_shared_shape(geom)), out, plain)
    if geom.unshared:
        return local_conv2d_input_grad(grad_output, weight, out, plain)
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
