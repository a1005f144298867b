"""CPU kernels (Numba ``@njit``), one per operation.

The kernels are bare: they trust their caller (:mod:`gpuconv._conv`) for shapes, dtypes
and contiguity. Arguments use the notation of :mod:`gpuconv._geometry`; ``bias`` is always
a 3-D array ``(c_O, bh, bw)`` with ``(bh, bw)`` either ``(1, 1)`` (one bias per output map)
or ``(h_O, w_O)`` (one per output position), and ``has_bias`` says whether to add it.

Parallelism: ``prange`` over independent blocks of output, so that both cores stay busy
even at batch 1. Compilation is cached on disk (``cache=True``): a later process reuses it.
No ``fastmath``: NaN and Inf propagate exactly as IEEE arithmetic says.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

__all__ = ["conv2d_forward", "local_conv2d_forward"]

# Output elements per parallel job of the shared kernel: a block of rows of one output
# map small enough to stay in L1/L2 while every (c_I, k_H, k_W) term is accumulated into it.
_ROW_BLOCK_ELEMENTS = 4096


@njit(cache=True)
def _valid_range(out_len, in_len, stride, offset):
    """Range [lo, hi) of output indices o with 0 <= o * stride + offset < in_len."""
    lo = 0
    if offset < 0:
        lo = (-offset + stride - 1) // stride
    hi = 0
    if in_len - 1 - offset >= 0:
        hi = (in_len - 1 - offset) // stride + 1
    if hi > out_len:
        hi = out_len
    if lo > hi:
        lo = hi
    return lo, hi


@njit(parallel=True, cache=True)
def _conv2d_kernel(x, w, bias, has_bias, out, sh, sw, pt, pl, dh, dw, groups, rows_per_job):
    n, c_I, h, wd = x.shape
    c_O, c_Ig, k_H, k_W = w.shape
    h_O = out.shape[2]
    w_O = out.shape[3]
    c_Og = c_O // groups
    per_position = bias.shape[1] * bias.shape[2] > 1
    row_blocks = (h_O + rows_per_job - 1) // rows_per_job
    for job in prange(n * c_O * row_blocks):
        rb = job % row_blocks
        t = job // row_blocks
        co = t % c_O
        b = t // c_O
        g = co // c_Og
        y0 = rb * rows_per_job
        y1 = min(h_O, y0 + rows_per_job)
        for oy in range(y0, y1):
            for ox in range(w_O):
                if has_bias:
                    out[b, co, oy, ox] = bias[co, oy if per_position else 0,
                                              ox if per_position else 0]
                else:
                    out[b, co, oy, ox] = 0
        for ci in range(c_Ig):
            cx = g * c_Ig + ci
            for ky in range(k_H):
                for kx in range(k_W):
                    wv = w[co, ci, ky, kx]
                    x_off = kx * dw - pl
                    ox0, ox1 = _valid_range(w_O, wd, sw, x_off)
                    for oy in range(y0, y1):
                        iy = oy * sh + ky * dh - pt
                        if iy >= 0 and iy < h:
                            for ox in range(ox0, ox1):
                                out[b, co, oy, ox] += wv * x[b, cx, iy, ox * sw + x_off]


@njit(parallel=True, cache=True)
def _local_conv2d_kernel(x, w, bias, has_bias, out, sh, sw, pt, pl, dh, dw, groups):
    n, c_I, h, wd = x.shape
    c_O, h_O, w_O, c_Ig, k_H, k_W = w.shape
    c_Og = c_O // groups
    per_position = bias.shape[1] * bias.shape[2] > 1
    # One job per (output channel, output row); each weight is loaded once and used for
    # the whole batch (the batch is the innermost loop).
    for job in prange(c_O * h_O):
        co = job // h_O
        oy = job % h_O
        g = co // c_Og
        acc = np.empty(n, dtype=out.dtype)
        for ox in range(w_O):
            for b in range(n):
                acc[b] = 0
            for ci in range(c_Ig):
                cx = g * c_Ig + ci
                for ky in range(k_H):
                    iy = oy * sh + ky * dh - pt
                    if iy < 0 or iy >= h:
                        continue
                    for kx in range(k_W):
                        ix = ox * sw + kx * dw - pl
                        if ix < 0 or ix >= wd:
                            continue
                        wv = w[co, oy, ox, ci, ky, kx]
                        for b in range(n):
                            acc[b] += wv * x[b, cx, iy, ix]
            for b in range(n):
                if has_bias:
                    out[b, co, oy, ox] = bias[co, oy if per_position else 0,
                                              ox if per_position else 0] + acc[b]
                else:
                    out[b, co, oy, ox] = acc[b]


def conv2d_forward(x, weight, bias, has_bias, out, geom):
    """Shared-weight convolution into ``out`` (all arrays C-contiguous, one dtype)."""
    rows = max(1, min(geom.out_height, _ROW_BLOCK_ELEMENTS // max(1, geom.out_width)))
    _conv2d_kernel(x, weight, bias, has_bias, out, geom.stride_h, geom.stride_w,
                   geom.pad_top, geom.pad_left, geom.dilation_h, geom.dilation_w,
                   geom.groups, rows)
    return out


def local_conv2d_forward(x, weight, bias, has_bias, out, geom):
    """Unshared (locally connected) convolution into ``out``."""
    _local_conv2d_kernel(x, weight, bias, has_bias, out, geom.stride_h, geom.stride_w,
                         geom.pad_top, geom.pad_left, geom.dilation_h, geom.dilation_w,
                         geom.groups)
    return out
