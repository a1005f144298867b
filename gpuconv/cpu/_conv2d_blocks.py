"""Register blocks of the shared-weight CPU kernel: generated from ``_ALL_BLOCKS`` in
:mod:`gpuconv.cpu.conv2d`, which documents them. Do not edit: change the generator there and
run ``python -c "from gpuconv.cpu import conv2d; conv2d._write_register_blocks()"``.
"""

import numpy as np
from numba import njit

from .simd import prefer_wide_vectors as _prefer_wide_vectors
from .simd import vfma as _vfma, vload as _vload, vstore as _vstore, vzero as _vzero


@njit(cache=True)
def pvec_block(xf, base, tap_off, t0, t1, wq, w_base, width, lanes, tile, tile_base,
               row_step, first):
    """width (1 to 6) output channels x 4 vectors of pixels.

    For k < width and p < 4 * lanes, with T the sum over taps t0 <= t < t1 of
    ``wq[w_base + t * width + k] * xf[base + tap_off[t] + p]``:
    ``tile[tile_base + k * row_step + p] = T`` if ``first``, else ``+= T``.
    Per tap, 4 input vectors are loaded and each weight is broadcast against them;
    the tests of ``width`` always go the same way and cost next to nothing.
    """
    _prefer_wide_vectors()
    if first:
        a0_0 = _vzero(xf)
        a0_1 = _vzero(xf)
        a0_2 = _vzero(xf)
        a0_3 = _vzero(xf)
        a1_0 = _vzero(xf)
        a1_1 = _vzero(xf)
        a1_2 = _vzero(xf)
        a1_3 = _vzero(xf)
        a2_0 = _vzero(xf)
        a2_1 = _vzero(xf)
        a2_2 = _vzero(xf)
        a2_3 = _vzero(xf)
        a3_0 = _vzero(xf)
        a3_1 = _vzero(xf)
        a3_2 = _vzero(xf)
        a3_3 = _vzero(xf)
        a4_0 = _vzero(xf)
        a4_1 = _vzero(xf)
        a4_2 = _vzero(xf)
        a4_3 = _vzero(xf)
        a5_0 = _vzero(xf)
        a5_1 = _vzero(xf)
        a5_2 = _vzero(xf)
        a5_3 = _vzero(xf)
    else:
        a0_0 = _vload(tile, tile_base)
        a0_1 = _vload(tile, tile_base + lanes)
        a0_2 = _vload(tile, tile_base + 2 * lanes)
        a0_3 = _vload(tile, tile_base + 3 * lanes)
        a1_0 = _vload(tile, tile_base + row_step)
        a1_1 = _vload(tile, tile_base + row_step + lanes)
        a1_2 = _vload(tile, tile_base + row_step + 2 * lanes)
        a1_3 = _vload(tile, tile_base + row_step + 3 * lanes)
        a2_0 = _vload(tile, tile_base + 2 * row_step)
        a2_1 = _vload(tile, tile_base + 2 * row_step + lanes)
        a2_2 = _vload(tile, tile_base + 2 * row_step + 2 * lanes)
        a2_3 = _vload(tile, tile_base + 2 * row_step + 3 * lanes)
        a3_0 = _vload(tile, tile_base + 3 * row_step)
        a3_1 = _vload(tile, tile_base + 3 * row_step + lanes)
        a3_2 = _vload(tile, tile_base + 3 * row_step + 2 * lanes)
        a3_3 = _vload(tile, tile_base + 3 * row_step + 3 * lanes)
        a4_0 = _vload(tile, tile_base + 4 * row_step)
        a4_1 = _vload(tile, tile_base + 4 * row_step + lanes)
        a4_2 = _vload(tile, tile_base + 4 * row_step + 2 * lanes)
        a4_3 = _vload(tile, tile_base + 4 * row_step + 3 * lanes)
        a5_0 = _vload(tile, tile_base + 5 * row_step)
        a5_1 = _vload(tile, tile_base + 5 * row_step + lanes)
        a5_2 = _vload(tile, tile_base + 5 * row_step + 2 * lanes)
        a5_3 = _vload(tile, tile_base + 5 * row_step + 3 * lanes)
    for t in range(t0, t1):
        vo = base + tap_off[t]
        so = np.uint64(w_base + t * width)
        v0 = _vload(xf, vo)
        v1 = _vload(xf, vo + lanes)
        v2 = _vload(xf, vo + 2 * lanes)
        v3 = _vload(xf, vo + 3 * lanes)
        s = wq[so]
        a0_0 = _vfma(a0_0, v0, s)
        a0_1 = _vfma(a0_1, v1, s)
        a0_2 = _vfma(a0_2, v2, s)
        a0_3 = _vfma(a0_3, v3, s)
        if width > 1:
            s = wq[so + np.uint64(1)]
            a1_0 = _vfma(a1_0, v0, s)
            a1_1 = _vfma(a1_1, v1, s)
            a1_2 = _vfma(a1_2, v2, s)
            a1_3 = _vfma(a1_3, v3, s)
        if width > 2:
            s = wq[so + np.uint64(2)]
            a2_0 = _vfma(a2_0, v0, s)
            a2_1 = _vfma(a2_1, v1, s)
            a2_2 = _vfma(a2_2, v2, s)
            a2_3 = _vfma(a2_3, v3, s)
        if width > 3:
            s = wq[so + np.uint64(3)]
            a3_0 = _vfma(a3_0, v0, s)
            a3_1 = _vfma(a3_1, v1, s)
            a3_2 = _vfma(a3_2, v2, s)
            a3_3 = _vfma(a3_3, v3, s)
        if width > 4:
            s = wq[so + np.uint64(4)]
            a4_0 = _vfma(a4_0, v0, s)
            a4_1 = _vfma(a4_1, v1, s)
            a4_2 = _vfma(a4_2, v2, s)
            a4_3 = _vfma(a4_3, v3, s)
        if width > 5:
            s = wq[so + np.uint64(5)]
            a5_0 = _vfma(a5_0, v0, s)
            a5_1 = _vfma(a5_1, v1, s)
            a5_2 = _vfma(a5_2, v2, s)
            a5_3 = _vfma(a5_3, v3, s)
    _vstore(tile, tile_base, a0_0)
    _vstore(tile, tile_base + lanes, a0_1)
    _vstore(tile, tile_base + 2 * lanes, a0_2)
    _vstore(tile, tile_base + 3 * lanes, a0_3)
    _vstore(tile, tile_base + row_step, a1_0)
    _vstore(tile, tile_base + row_step + lanes, a1_1)
    _vstore(tile, tile_base + row_step + 2 * lanes, a1_2)
    _vstore(tile, tile_base + row_step + 3 * lanes, a1_3)
    _vstore(tile, tile_base + 2 * row_step, a2_0)
    _vstore(tile, tile_base + 2 * row_step + lanes, a2_1)
    _vstore(tile, tile_base + 2 * row_step + 2 * lanes, a2_2)
    _vstore(tile, tile_base + 2 * row_step + 3 * lanes, a2_3)
    _vstore(tile, tile_base + 3 * row_step, a3_0)
    _vstore(tile, tile_base + 3 * row_step + lanes, a3_1)
    _vstore(tile, tile_base + 3 * row_step + 2 * lanes, a3_2)
    _vstore(tile, tile_base + 3 * row_step + 3 * lanes, a3_3)
    _vstore(tile, tile_base + 4 * row_step, a4_0)
    _vstore(tile, tile_base + 4 * row_step + lanes, a4_1)
    _vstore(tile, tile_base + 4 * row_step + 2 * lanes, a4_2)
    _vstore(tile, tile_base + 4 * row_step + 3 * lanes, a4_3)
    _vstore(tile, tile_base + 5 * row_step, a5_0)
    _vstore(tile, tile_base + 5 * row_step + lanes, a5_1)
    _vstore(tile, tile_base + 5 * row_step + 2 * lanes, a5_2)
    _vstore(tile, tile_base + 5 * row_step + 3 * lanes, a5_3)


@njit(cache=True)
def cvec1_block(xf, base, tap_off, t0, t1, wq, w_base, lanes, tile, tile_base, first):
    """1 vector of output channels x 24 pixels.

    For p < 24 and k < step = 1 * lanes, with T the sum over taps
    t0 <= t < t1 of ``wq[w_base + t * step + k] * xf[base + tap_off[t] + p]``:
    ``tile[tile_base + p * step + k] = T`` if ``first``, else ``+= T``.
    Per tap, 1 weight vector is loaded and each input value is broadcast against it.
    """
    _prefer_wide_vectors()
    step = 1 * lanes
    if first:
        a0_0 = _vzero(xf)
        a1_0 = _vzero(xf)
        a2_0 = _vzero(xf)
        a3_0 = _vzero(xf)
        a4_0 = _vzero(xf)
        a5_0 = _vzero(xf)
        a6_0 = _vzero(xf)
        a7_0 = _vzero(xf)
        a8_0 = _vzero(xf)
        a9_0 = _vzero(xf)
        a10_0 = _vzero(xf)
        a11_0 = _vzero(xf)
        a12_0 = _vzero(xf)
        a13_0 = _vzero(xf)
        a14_0 = _vzero(xf)
        a15_0 = _vzero(xf)
        a16_0 = _vzero(xf)
        a17_0 = _vzero(xf)
        a18_0 = _vzero(xf)
        a19_0 = _vzero(xf)
        a20_0 = _vzero(xf)
        a21_0 = _vzero(xf)
        a22_0 = _vzero(xf)
        a23_0 = _vzero(xf)
    else:
        a0_0 = _vload(tile, tile_base)
        a1_0 = _vload(tile, tile_base + step)
        a2_0 = _vload(tile, tile_base + 2 * step)
        a3_0 = _vload(tile, tile_base + 3 * step)
        a4_0 = _vload(tile, tile_base + 4 * step)
        a5_0 = _vload(tile, tile_base + 5 * step)
        a6_0 = _vload(tile, tile_base + 6 * step)
        a7_0 = _vload(tile, tile_base + 7 * step)
        a8_0 = _vload(tile, tile_base + 8 * step)
        a9_0 = _vload(tile, tile_base + 9 * step)
        a10_0 = _vload(tile, tile_base + 10 * step)
        a11_0 = _vload(tile, tile_base + 11 * step)
        a12_0 = _vload(tile, tile_base + 12 * step)
        a13_0 = _vload(tile, tile_base + 13 * step)
        a14_0 = _vload(tile, tile_base + 14 * step)
        a15_0 = _vload(tile, tile_base + 15 * step)
        a16_0 = _vload(tile, tile_base + 16 * step)
        a17_0 = _vload(tile, tile_base + 17 * step)
        a18_0 = _vload(tile, tile_base + 18 * step)
        a19_0 = _vload(tile, tile_base + 19 * step)
        a20_0 = _vload(tile, tile_base + 20 * step)
        a21_0 = _vload(tile, tile_base + 21 * step)
        a22_0 = _vload(tile, tile_base + 22 * step)
        a23_0 = _vload(tile, tile_base + 23 * step)
    for t in range(t0, t1):
        vo = w_base + t * step
        so = np.uint64(base + tap_off[t])
        v0 = _vload(wq, vo)
        s = xf[so]
        a0_0 = _vfma(a0_0, v0, s)
        s = xf[so + np.uint64(1)]
        a1_0 = _vfma(a1_0, v0, s)
        s = xf[so + np.uint64(2)]
        a2_0 = _vfma(a2_0, v0, s)
        s = xf[so + np.uint64(3)]
        a3_0 = _vfma(a3_0, v0, s)
        s = xf[so + np.uint64(4)]
        a4_0 = _vfma(a4_0, v0, s)
        s = xf[so + np.uint64(5)]
        a5_0 = _vfma(a5_0, v0, s)
        s = xf[so + np.uint64(6)]
        a6_0 = _vfma(a6_0, v0, s)
        s = xf[so + np.uint64(7)]
        a7_0 = _vfma(a7_0, v0, s)
        s = xf[so + np.uint64(8)]
        a8_0 = _vfma(a8_0, v0, s)
        s = xf[so + np.uint64(9)]
        a9_0 = _vfma(a9_0, v0, s)
        s = xf[so + np.uint64(10)]
        a10_0 = _vfma(a10_0, v0, s)
        s = xf[so + np.uint64(11)]
        a11_0 = _vfma(a11_0, v0, s)
        s = xf[so + np.uint64(12)]
        a12_0 = _vfma(a12_0, v0, s)
        s = xf[so + np.uint64(13)]
        a13_0 = _vfma(a13_0, v0, s)
        s = xf[so + np.uint64(14)]
        a14_0 = _vfma(a14_0, v0, s)
        s = xf[so + np.uint64(15)]
        a15_0 = _vfma(a15_0, v0, s)
        s = xf[so + np.uint64(16)]
        a16_0 = _vfma(a16_0, v0, s)
        s = xf[so + np.uint64(17)]
        a17_0 = _vfma(a17_0, v0, s)
        s = xf[so + np.uint64(18)]
        a18_0 = _vfma(a18_0, v0, s)
        s = xf[so + np.uint64(19)]
        a19_0 = _vfma(a19_0, v0, s)
        s = xf[so + np.uint64(20)]
        a20_0 = _vfma(a20_0, v0, s)
        s = xf[so + np.uint64(21)]
        a21_0 = _vfma(a21_0, v0, s)
        s = xf[so + np.uint64(22)]
        a22_0 = _vfma(a22_0, v0, s)
        s = xf[so + np.uint64(23)]
        a23_0 = _vfma(a23_0, v0, s)
    _vstore(tile, tile_base, a0_0)
    _vstore(tile, tile_base + step, a1_0)
    _vstore(tile, tile_base + 2 * step, a2_0)
    _vstore(tile, tile_base + 3 * step, a3_0)
    _vstore(tile, tile_base + 4 * step, a4_0)
    _vstore(tile, tile_base + 5 * step, a5_0)
    _vstore(tile, tile_base + 6 * step, a6_0)
    _vstore(tile, tile_base + 7 * step, a7_0)
    _vstore(tile, tile_base + 8 * step, a8_0)
    _vstore(tile, tile_base + 9 * step, a9_0)
    _vstore(tile, tile_base + 10 * step, a10_0)
    _vstore(tile, tile_base + 11 * step, a11_0)
    _vstore(tile, tile_base + 12 * step, a12_0)
    _vstore(tile, tile_base + 13 * step, a13_0)
    _vstore(tile, tile_base + 14 * step, a14_0)
    _vstore(tile, tile_base + 15 * step, a15_0)
    _vstore(tile, tile_base + 16 * step, a16_0)
    _vstore(tile, tile_base + 17 * step, a17_0)
    _vstore(tile, tile_base + 18 * step, a18_0)
    _vstore(tile, tile_base + 19 * step, a19_0)
    _vstore(tile, tile_base + 20 * step, a20_0)
    _vstore(tile, tile_base + 21 * step, a21_0)
    _vstore(tile, tile_base + 22 * step, a22_0)
    _vstore(tile, tile_base + 23 * step, a23_0)


@njit(cache=True)
def cvec2_block(xf, base, tap_off, t0, t1, wq, w_base, lanes, tile, tile_base, first):
    """2 vectors of output channels x 12 pixels.

    For p < 12 and k < step = 2 * lanes, with T the sum over taps
    t0 <= t < t1 of ``wq[w_base + t * step + k] * xf[base + tap_off[t] + p]``:
    ``tile[tile_base + p * step + k] = T`` if ``first``, else ``+= T``.
    Per tap, 2 weight vectors are loaded and each input value is broadcast against them.
    """
    _prefer_wide_vectors()
    step = 2 * lanes
    if first:
        a0_0 = _vzero(xf)
        a0_1 = _vzero(xf)
        a1_0 = _vzero(xf)
        a1_1 = _vzero(xf)
        a2_0 = _vzero(xf)
        a2_1 = _vzero(xf)
        a3_0 = _vzero(xf)
        a3_1 = _vzero(xf)
        a4_0 = _vzero(xf)
        a4_1 = _vzero(xf)
        a5_0 = _vzero(xf)
        a5_1 = _vzero(xf)
        a6_0 = _vzero(xf)
        a6_1 = _vzero(xf)
        a7_0 = _vzero(xf)
        a7_1 = _vzero(xf)
        a8_0 = _vzero(xf)
        a8_1 = _vzero(xf)
        a9_0 = _vzero(xf)
        a9_1 = _vzero(xf)
        a10_0 = _vzero(xf)
        a10_1 = _vzero(xf)
        a11_0 = _vzero(xf)
        a11_1 = _vzero(xf)
    else:
        a0_0 = _vload(tile, tile_base)
        a0_1 = _vload(tile, tile_base + lanes)
        a1_0 = _vload(tile, tile_base + step)
        a1_1 = _vload(tile, tile_base + step + lanes)
        a2_0 = _vload(tile, tile_base + 2 * step)
        a2_1 = _vload(tile, tile_base + 2 * step + lanes)
        a3_0 = _vload(tile, tile_base + 3 * step)
        a3_1 = _vload(tile, tile_base + 3 * step + lanes)
        a4_0 = _vload(tile, tile_base + 4 * step)
        a4_1 = _vload(tile, tile_base + 4 * step + lanes)
        a5_0 = _vload(tile, tile_base + 5 * step)
        a5_1 = _vload(tile, tile_base + 5 * step + lanes)
        a6_0 = _vload(tile, tile_base + 6 * step)
        a6_1 = _vload(tile, tile_base + 6 * step + lanes)
        a7_0 = _vload(tile, tile_base + 7 * step)
        a7_1 = _vload(tile, tile_base + 7 * step + lanes)
        a8_0 = _vload(tile, tile_base + 8 * step)
        a8_1 = _vload(tile, tile_base + 8 * step + lanes)
        a9_0 = _vload(tile, tile_base + 9 * step)
        a9_1 = _vload(tile, tile_base + 9 * step + lanes)
        a10_0 = _vload(tile, tile_base + 10 * step)
        a10_1 = _vload(tile, tile_base + 10 * step + lanes)
        a11_0 = _vload(tile, tile_base + 11 * step)
        a11_1 = _vload(tile, tile_base + 11 * step + lanes)
    for t in range(t0, t1):
        vo = w_base + t * step
        so = np.uint64(base + tap_off[t])
        v0 = _vload(wq, vo)
        v1 = _vload(wq, vo + lanes)
        s = xf[so]
        a0_0 = _vfma(a0_0, v0, s)
        a0_1 = _vfma(a0_1, v1, s)
        s = xf[so + np.uint64(1)]
        a1_0 = _vfma(a1_0, v0, s)
        a1_1 = _vfma(a1_1, v1, s)
        s = xf[so + np.uint64(2)]
        a2_0 = _vfma(a2_0, v0, s)
        a2_1 = _vfma(a2_1, v1, s)
        s = xf[so + np.uint64(3)]
        a3_0 = _vfma(a3_0, v0, s)
        a3_1 = _vfma(a3_1, v1, s)
        s = xf[so + np.uint64(4)]
        a4_0 = _vfma(a4_0, v0, s)
        a4_1 = _vfma(a4_1, v1, s)
        s = xf[so + np.uint64(5)]
        a5_0 = _vfma(a5_0, v0, s)
        a5_1 = _vfma(a5_1, v1, s)
        s = xf[so + np.uint64(6)]
        a6_0 = _vfma(a6_0, v0, s)
        a6_1 = _vfma(a6_1, v1, s)
        s = xf[so + np.uint64(7)]
        a7_0 = _vfma(a7_0, v0, s)
        a7_1 = _vfma(a7_1, v1, s)
        s = xf[so + np.uint64(8)]
        a8_0 = _vfma(a8_0, v0, s)
        a8_1 = _vfma(a8_1, v1, s)
        s = xf[so + np.uint64(9)]
        a9_0 = _vfma(a9_0, v0, s)
        a9_1 = _vfma(a9_1, v1, s)
        s = xf[so + np.uint64(10)]
        a10_0 = _vfma(a10_0, v0, s)
        a10_1 = _vfma(a10_1, v1, s)
        s = xf[so + np.uint64(11)]
        a11_0 = _vfma(a11_0, v0, s)
        a11_1 = _vfma(a11_1, v1, s)
    _vstore(tile, tile_base, a0_0)
    _vstore(tile, tile_base + lanes, a0_1)
    _vstore(tile, tile_base + step, a1_0)
    _vstore(tile, tile_base + step + lanes, a1_1)
    _vstore(tile, tile_base + 2 * step, a2_0)
    _vstore(tile, tile_base + 2 * step + lanes, a2_1)
    _vstore(tile, tile_base + 3 * step, a3_0)
    _vstore(tile, tile_base + 3 * step + lanes, a3_1)
    _vstore(tile, tile_base + 4 * step, a4_0)
    _vstore(tile, tile_base + 4 * step + lanes, a4_1)
    _vstore(tile, tile_base + 5 * step, a5_0)
    _vstore(tile, tile_base + 5 * step + lanes, a5_1)
    _vstore(tile, tile_base + 6 * step, a6_0)
    _vstore(tile, tile_base + 6 * step + lanes, a6_1)
    _vstore(tile, tile_base + 7 * step, a7_0)
    _vstore(tile, tile_base + 7 * step + lanes, a7_1)
    _vstore(tile, tile_base + 8 * step, a8_0)
    _vstore(tile, tile_base + 8 * step + lanes, a8_1)
    _vstore(tile, tile_base + 9 * step, a9_0)
    _vstore(tile, tile_base + 9 * step + lanes, a9_1)
    _vstore(tile, tile_base + 10 * step, a10_0)
    _vstore(tile, tile_base + 10 * step + lanes, a10_1)
    _vstore(tile, tile_base + 11 * step, a11_0)
    _vstore(tile, tile_base + 11 * step + lanes, a11_1)


@njit(cache=True)
def cvec1x21_block(xf, base, tap_off, t0, t1, wq, w_base, lanes, tile, tile_base, first):
    """1 vector of output channels x 21 pixels.

    For p < 21 and k < step = 1 * lanes, with T the sum over taps
    t0 <= t < t1 of ``wq[w_base + t * step + k] * xf[base + tap_off[t] + p]``:
    ``tile[tile_base + p * step + k] = T`` if ``first``, else ``+= T``.
    Per tap, 1 weight vector is loaded and each input value is broadcast against it.
    """
    _prefer_wide_vectors()
    step = 1 * lanes
    if first:
        a0_0 = _vzero(xf)
        a1_0 = _vzero(xf)
        a2_0 = _vzero(xf)
        a3_0 = _vzero(xf)
        a4_0 = _vzero(xf)
        a5_0 = _vzero(xf)
        a6_0 = _vzero(xf)
        a7_0 = _vzero(xf)
        a8_0 = _vzero(xf)
        a9_0 = _vzero(xf)
        a10_0 = _vzero(xf)
        a11_0 = _vzero(xf)
        a12_0 = _vzero(xf)
        a13_0 = _vzero(xf)
        a14_0 = _vzero(xf)
        a15_0 = _vzero(xf)
        a16_0 = _vzero(xf)
        a17_0 = _vzero(xf)
        a18_0 = _vzero(xf)
        a19_0 = _vzero(xf)
        a20_0 = _vzero(xf)
    else:
        a0_0 = _vload(tile, tile_base)
        a1_0 = _vload(tile, tile_base + step)
        a2_0 = _vload(tile, tile_base + 2 * step)
        a3_0 = _vload(tile, tile_base + 3 * step)
        a4_0 = _vload(tile, tile_base + 4 * step)
        a5_0 = _vload(tile, tile_base + 5 * step)
        a6_0 = _vload(tile, tile_base + 6 * step)
        a7_0 = _vload(tile, tile_base + 7 * step)
        a8_0 = _vload(tile, tile_base + 8 * step)
        a9_0 = _vload(tile, tile_base + 9 * step)
        a10_0 = _vload(tile, tile_base + 10 * step)
        a11_0 = _vload(tile, tile_base + 11 * step)
        a12_0 = _vload(tile, tile_base + 12 * step)
        a13_0 = _vload(tile, tile_base + 13 * step)
        a14_0 = _vload(tile, tile_base + 14 * step)
        a15_0 = _vload(tile, tile_base + 15 * step)
        a16_0 = _vload(tile, tile_base + 16 * step)
        a17_0 = _vload(tile, tile_base + 17 * step)
        a18_0 = _vload(tile, tile_base + 18 * step)
        a19_0 = _vload(tile, tile_base + 19 * step)
        a20_0 = _vload(tile, tile_base + 20 * step)
    for t in range(t0, t1):
        vo = w_base + t * step
        so = np.uint64(base + tap_off[t])
        v0 = _vload(wq, vo)
        s = xf[so]
        a0_0 = _vfma(a0_0, v0, s)
        s = xf[so + np.uint64(1)]
        a1_0 = _vfma(a1_0, v0, s)
        s = xf[so + np.uint64(2)]
        a2_0 = _vfma(a2_0, v0, s)
        s = xf[so + np.uint64(3)]
        a3_0 = _vfma(a3_0, v0, s)
        s = xf[so + np.uint64(4)]
        a4_0 = _vfma(a4_0, v0, s)
        s = xf[so + np.uint64(5)]
        a5_0 = _vfma(a5_0, v0, s)
        s = xf[so + np.uint64(6)]
        a6_0 = _vfma(a6_0, v0, s)
        s = xf[so + np.uint64(7)]
        a7_0 = _vfma(a7_0, v0, s)
        s = xf[so + np.uint64(8)]
        a8_0 = _vfma(a8_0, v0, s)
        s = xf[so + np.uint64(9)]
        a9_0 = _vfma(a9_0, v0, s)
        s = xf[so + np.uint64(10)]
        a10_0 = _vfma(a10_0, v0, s)
        s = xf[so + np.uint64(11)]
        a11_0 = _vfma(a11_0, v0, s)
        s = xf[so + np.uint64(12)]
        a12_0 = _vfma(a12_0, v0, s)
        s = xf[so + np.uint64(13)]
        a13_0 = _vfma(a13_0, v0, s)
        s = xf[so + np.uint64(14)]
        a14_0 = _vfma(a14_0, v0, s)
        s = xf[so + np.uint64(15)]
        a15_0 = _vfma(a15_0, v0, s)
        s = xf[so + np.uint64(16)]
        a16_0 = _vfma(a16_0, v0, s)
        s = xf[so + np.uint64(17)]
        a17_0 = _vfma(a17_0, v0, s)
        s = xf[so + np.uint64(18)]
        a18_0 = _vfma(a18_0, v0, s)
        s = xf[so + np.uint64(19)]
        a19_0 = _vfma(a19_0, v0, s)
        s = xf[so + np.uint64(20)]
        a20_0 = _vfma(a20_0, v0, s)
    _vstore(tile, tile_base, a0_0)
    _vstore(tile, tile_base + step, a1_0)
    _vstore(tile, tile_base + 2 * step, a2_0)
    _vstore(tile, tile_base + 3 * step, a3_0)
    _vstore(tile, tile_base + 4 * step, a4_0)
    _vstore(tile, tile_base + 5 * step, a5_0)
    _vstore(tile, tile_base + 6 * step, a6_0)
    _vstore(tile, tile_base + 7 * step, a7_0)
    _vstore(tile, tile_base + 8 * step, a8_0)
    _vstore(tile, tile_base + 9 * step, a9_0)
    _vstore(tile, tile_base + 10 * step, a10_0)
    _vstore(tile, tile_base + 11 * step, a11_0)
    _vstore(tile, tile_base + 12 * step, a12_0)
    _vstore(tile, tile_base + 13 * step, a13_0)
    _vstore(tile, tile_base + 14 * step, a14_0)
    _vstore(tile, tile_base + 15 * step, a15_0)
    _vstore(tile, tile_base + 16 * step, a16_0)
    _vstore(tile, tile_base + 17 * step, a17_0)
    _vstore(tile, tile_base + 18 * step, a18_0)
    _vstore(tile, tile_base + 19 * step, a19_0)
    _vstore(tile, tile_base + 20 * step, a20_0)


@njit(cache=True)
def cvec1x25_block(xf, base, tap_off, t0, t1, wq, w_base, lanes, tile, tile_base, first):
    """1 vector of output channels x 25 pixels.

    For p < 25 and k < step = 1 * lanes, with T the sum over taps
    t0 <= t < t1 of ``wq[w_base + t * step + k] * xf[base + tap_off[t] + p]``:
    ``tile[tile_base + p * step + k] = T`` if ``first``, else ``+= T``.
    Per tap, 1 weight vector is loaded and each input value is broadcast against it.
    """
    _prefer_wide_vectors()
    step = 1 * lanes
    if first:
        a0_0 = _vzero(xf)
        a1_0 = _vzero(xf)
        a2_0 = _vzero(xf)
        a3_0 = _vzero(xf)
        a4_0 = _vzero(xf)
        a5_0 = _vzero(xf)
        a6_0 = _vzero(xf)
        a7_0 = _vzero(xf)
        a8_0 = _vzero(xf)
        a9_0 = _vzero(xf)
        a10_0 = _vzero(xf)
        a11_0 = _vzero(xf)
        a12_0 = _vzero(xf)
        a13_0 = _vzero(xf)
        a14_0 = _vzero(xf)
        a15_0 = _vzero(xf)
        a16_0 = _vzero(xf)
        a17_0 = _vzero(xf)
        a18_0 = _vzero(xf)
        a19_0 = _vzero(xf)
        a20_0 = _vzero(xf)
        a21_0 = _vzero(xf)
        a22_0 = _vzero(xf)
        a23_0 = _vzero(xf)
        a24_0 = _vzero(xf)
    else:
        a0_0 = _vload(tile, tile_base)
        a1_0 = _vload(tile, tile_base + step)
        a2_0 = _vload(tile, tile_base + 2 * step)
        a3_0 = _vload(tile, tile_base + 3 * step)
        a4_0 = _vload(tile, tile_base + 4 * step)
        a5_0 = _vload(tile, tile_base + 5 * step)
        a6_0 = _vload(tile, tile_base + 6 * step)
        a7_0 = _vload(tile, tile_base + 7 * step)
        a8_0 = _vload(tile, tile_base + 8 * step)
        a9_0 = _vload(tile, tile_base + 9 * step)
        a10_0 = _vload(tile, tile_base + 10 * step)
        a11_0 = _vload(tile, tile_base + 11 * step)
        a12_0 = _vload(tile, tile_base + 12 * step)
        a13_0 = _vload(tile, tile_base + 13 * step)
        a14_0 = _vload(tile, tile_base + 14 * step)
        a15_0 = _vload(tile, tile_base + 15 * step)
        a16_0 = _vload(tile, tile_base + 16 * step)
        a17_0 = _vload(tile, tile_base + 17 * step)
        a18_0 = _vload(tile, tile_base + 18 * step)
        a19_0 = _vload(tile, tile_base + 19 * step)
        a20_0 = _vload(tile, tile_base + 20 * step)
        a21_0 = _vload(tile, tile_base + 21 * step)
        a22_0 = _vload(tile, tile_base + 22 * step)
        a23_0 = _vload(tile, tile_base + 23 * step)
        a24_0 = _vload(tile, tile_base + 24 * step)
    for t in range(t0, t1):
        vo = w_base + t * step
        so = np.uint64(base + tap_off[t])
        v0 = _vload(wq, vo)
        s = xf[so]
        a0_0 = _vfma(a0_0, v0, s)
        s = xf[so + np.uint64(1)]
        a1_0 = _vfma(a1_0, v0, s)
        s = xf[so + np.uint64(2)]
        a2_0 = _vfma(a2_0, v0, s)
        s = xf[so + np.uint64(3)]
        a3_0 = _vfma(a3_0, v0, s)
        s = xf[so + np.uint64(4)]
        a4_0 = _vfma(a4_0, v0, s)
        s = xf[so + np.uint64(5)]
        a5_0 = _vfma(a5_0, v0, s)
        s = xf[so + np.uint64(6)]
        a6_0 = _vfma(a6_0, v0, s)
        s = xf[so + np.uint64(7)]
        a7_0 = _vfma(a7_0, v0, s)
        s = xf[so + np.uint64(8)]
        a8_0 = _vfma(a8_0, v0, s)
        s = xf[so + np.uint64(9)]
        a9_0 = _vfma(a9_0, v0, s)
        s = xf[so + np.uint64(10)]
        a10_0 = _vfma(a10_0, v0, s)
        s = xf[so + np.uint64(11)]
        a11_0 = _vfma(a11_0, v0, s)
        s = xf[so + np.uint64(12)]
        a12_0 = _vfma(a12_0, v0, s)
        s = xf[so + np.uint64(13)]
        a13_0 = _vfma(a13_0, v0, s)
        s = xf[so + np.uint64(14)]
        a14_0 = _vfma(a14_0, v0, s)
        s = xf[so + np.uint64(15)]
        a15_0 = _vfma(a15_0, v0, s)
        s = xf[so + np.uint64(16)]
        a16_0 = _vfma(a16_0, v0, s)
        s = xf[so + np.uint64(17)]
        a17_0 = _vfma(a17_0, v0, s)
        s = xf[so + np.uint64(18)]
        a18_0 = _vfma(a18_0, v0, s)
        s = xf[so + np.uint64(19)]
        a19_0 = _vfma(a19_0, v0, s)
        s = xf[so + np.uint64(20)]
        a20_0 = _vfma(a20_0, v0, s)
        s = xf[so + np.uint64(21)]
        a21_0 = _vfma(a21_0, v0, s)
        s = xf[so + np.uint64(22)]
        a22_0 = _vfma(a22_0, v0, s)
        s = xf[so + np.uint64(23)]
        a23_0 = _vfma(a23_0, v0, s)
        s = xf[so + np.uint64(24)]
        a24_0 = _vfma(a24_0, v0, s)
    _vstore(tile, tile_base, a0_0)
    _vstore(tile, tile_base + step, a1_0)
    _vstore(tile, tile_base + 2 * step, a2_0)
    _vstore(tile, tile_base + 3 * step, a3_0)
    _vstore(tile, tile_base + 4 * step, a4_0)
    _vstore(tile, tile_base + 5 * step, a5_0)
    _vstore(tile, tile_base + 6 * step, a6_0)
    _vstore(tile, tile_base + 7 * step, a7_0)
    _vstore(tile, tile_base + 8 * step, a8_0)
    _vstore(tile, tile_base + 9 * step, a9_0)
    _vstore(tile, tile_base + 10 * step, a10_0)
    _vstore(tile, tile_base + 11 * step, a11_0)
    _vstore(tile, tile_base + 12 * step, a12_0)
    _vstore(tile, tile_base + 13 * step, a13_0)
    _vstore(tile, tile_base + 14 * step, a14_0)
    _vstore(tile, tile_base + 15 * step, a15_0)
    _vstore(tile, tile_base + 16 * step, a16_0)
    _vstore(tile, tile_base + 17 * step, a17_0)
    _vstore(tile, tile_base + 18 * step, a18_0)
    _vstore(tile, tile_base + 19 * step, a19_0)
    _vstore(tile, tile_base + 20 * step, a20_0)
    _vstore(tile, tile_base + 21 * step, a21_0)
    _vstore(tile, tile_base + 22 * step, a22_0)
    _vstore(tile, tile_base + 23 * step, a23_0)
    _vstore(tile, tile_base + 24 * step, a24_0)


@njit(cache=True)
def cvec1x28_block(xf, base, tap_off, t0, t1, wq, w_base, lanes, tile, tile_base, first):
    """1 vector of output channels x 28 pixels.

    For p < 28 and k < step = 1 * lanes, with T the sum over taps
    t0 <= t < t1 of ``wq[w_base + t * step + k] * xf[base + tap_off[t] + p]``:
    ``tile[tile_base + p * step + k] = T`` if ``first``, else ``+= T``.
    Per tap, 1 weight vector is loaded and each input value is broadcast against it.
    """
    _prefer_wide_vectors()
    step = 1 * lanes
    if first:
        a0_0 = _vzero(xf)
        a1_0 = _vzero(xf)
        a2_0 = _vzero(xf)
        a3_0 = _vzero(xf)
        a4_0 = _vzero(xf)
        a5_0 = _vzero(xf)
        a6_0 = _vzero(xf)
        a7_0 = _vzero(xf)
        a8_0 = _vzero(xf)
        a9_0 = _vzero(xf)
        a10_0 = _vzero(xf)
        a11_0 = _vzero(xf)
        a12_0 = _vzero(xf)
        a13_0 = _vzero(xf)
        a14_0 = _vzero(xf)
        a15_0 = _vzero(xf)
        a16_0 = _vzero(xf)
        a17_0 = _vzero(xf)
        a18_0 = _vzero(xf)
        a19_0 = _vzero(xf)
        a20_0 = _vzero(xf)
        a21_0 = _vzero(xf)
        a22_0 = _vzero(xf)
        a23_0 = _vzero(xf)
        a24_0 = _vzero(xf)
        a25_0 = _vzero(xf)
        a26_0 = _vzero(xf)
        a27_0 = _vzero(xf)
    else:
        a0_0 = _vload(tile, tile_base)
        a1_0 = _vload(tile, tile_base + step)
        a2_0 = _vload(tile, tile_base + 2 * step)
        a3_0 = _vload(tile, tile_base + 3 * step)
        a4_0 = _vload(tile, tile_base + 4 * step)
        a5_0 = _vload(tile, tile_base + 5 * step)
        a6_0 = _vload(tile, tile_base + 6 * step)
        a7_0 = _vload(tile, tile_base + 7 * step)
        a8_0 = _vload(tile, tile_base + 8 * step)
        a9_0 = _vload(tile, tile_base + 9 * step)
        a10_0 = _vload(tile, tile_base + 10 * step)
        a11_0 = _vload(tile, tile_base + 11 * step)
        a12_0 = _vload(tile, tile_base + 12 * step)
        a13_0 = _vload(tile, tile_base + 13 * step)
        a14_0 = _vload(tile, tile_base + 14 * step)
        a15_0 = _vload(tile, tile_base + 15 * step)
        a16_0 = _vload(tile, tile_base + 16 * step)
        a17_0 = _vload(tile, tile_base + 17 * step)
        a18_0 = _vload(tile, tile_base + 18 * step)
        a19_0 = _vload(tile, tile_base + 19 * step)
        a20_0 = _vload(tile, tile_base + 20 * step)
        a21_0 = _vload(tile, tile_base + 21 * step)
        a22_0 = _vload(tile, tile_base + 22 * step)
        a23_0 = _vload(tile, tile_base + 23 * step)
        a24_0 = _vload(tile, tile_base + 24 * step)
        a25_0 = _vload(tile, tile_base + 25 * step)
        a26_0 = _vload(tile, tile_base + 26 * step)
        a27_0 = _vload(tile, tile_base + 27 * step)
    for t in range(t0, t1):
        vo = w_base + t * step
        so = np.uint64(base + tap_off[t])
        v0 = _vload(wq, vo)
        s = xf[so]
        a0_0 = _vfma(a0_0, v0, s)
        s = xf[so + np.uint64(1)]
        a1_0 = _vfma(a1_0, v0, s)
        s = xf[so + np.uint64(2)]
        a2_0 = _vfma(a2_0, v0, s)
        s = xf[so + np.uint64(3)]
        a3_0 = _vfma(a3_0, v0, s)
        s = xf[so + np.uint64(4)]
        a4_0 = _vfma(a4_0, v0, s)
        s = xf[so + np.uint64(5)]
        a5_0 = _vfma(a5_0, v0, s)
        s = xf[so + np.uint64(6)]
        a6_0 = _vfma(a6_0, v0, s)
        s = xf[so + np.uint64(7)]
        a7_0 = _vfma(a7_0, v0, s)
        s = xf[so + np.uint64(8)]
        a8_0 = _vfma(a8_0, v0, s)
        s = xf[so + np.uint64(9)]
        a9_0 = _vfma(a9_0, v0, s)
        s = xf[so + np.uint64(10)]
        a10_0 = _vfma(a10_0, v0, s)
        s = xf[so + np.uint64(11)]
        a11_0 = _vfma(a11_0, v0, s)
        s = xf[so + np.uint64(12)]
        a12_0 = _vfma(a12_0, v0, s)
        s = xf[so + np.uint64(13)]
        a13_0 = _vfma(a13_0, v0, s)
        s = xf[so + np.uint64(14)]
        a14_0 = _vfma(a14_0, v0, s)
        s = xf[so + np.uint64(15)]
        a15_0 = _vfma(a15_0, v0, s)
        s = xf[so + np.uint64(16)]
        a16_0 = _vfma(a16_0, v0, s)
        s = xf[so + np.uint64(17)]
        a17_0 = _vfma(a17_0, v0, s)
        s = xf[so + np.uint64(18)]
        a18_0 = _vfma(a18_0, v0, s)
        s = xf[so + np.uint64(19)]
        a19_0 = _vfma(a19_0, v0, s)
        s = xf[so + np.uint64(20)]
        a20_0 = _vfma(a20_0, v0, s)
        s = xf[so + np.uint64(21)]
        a21_0 = _vfma(a21_0, v0, s)
        s = xf[so + np.uint64(22)]
        a22_0 = _vfma(a22_0, v0, s)
        s = xf[so + np.uint64(23)]
        a23_0 = _vfma(a23_0, v0, s)
        s = xf[so + np.uint64(24)]
        a24_0 = _vfma(a24_0, v0, s)
        s = xf[so + np.uint64(25)]
        a25_0 = _vfma(a25_0, v0, s)
        s = xf[so + np.uint64(26)]
        a26_0 = _vfma(a26_0, v0, s)
        s = xf[so + np.uint64(27)]
        a27_0 = _vfma(a27_0, v0, s)
    _vstore(tile, tile_base, a0_0)
    _vstore(tile, tile_base + step, a1_0)
    _vstore(tile, tile_base + 2 * step, a2_0)
    _vstore(tile, tile_base + 3 * step, a3_0)
    _vstore(tile, tile_base + 4 * step, a4_0)
    _vstore(tile, tile_base + 5 * step, a5_0)
    _vstore(tile, tile_base + 6 * step, a6_0)
    _vstore(tile, tile_base + 7 * step, a7_0)
    _vstore(tile, tile_base + 8 * step, a8_0)
    _vstore(tile, tile_base + 9 * step, a9_0)
    _vstore(tile, tile_base + 10 * step, a10_0)
    _vstore(tile, tile_base + 11 * step, a11_0)
    _vstore(tile, tile_base + 12 * step, a12_0)
    _vstore(tile, tile_base + 13 * step, a13_0)
    _vstore(tile, tile_base + 14 * step, a14_0)
    _vstore(tile, tile_base + 15 * step, a15_0)
    _vstore(tile, tile_base + 16 * step, a16_0)
    _vstore(tile, tile_base + 17 * step, a17_0)
    _vstore(tile, tile_base + 18 * step, a18_0)
    _vstore(tile, tile_base + 19 * step, a19_0)
    _vstore(tile, tile_base + 20 * step, a20_0)
    _vstore(tile, tile_base + 21 * step, a21_0)
    _vstore(tile, tile_base + 22 * step, a22_0)
    _vstore(tile, tile_base + 23 * step, a23_0)
    _vstore(tile, tile_base + 24 * step, a24_0)
    _vstore(tile, tile_base + 25 * step, a25_0)
    _vstore(tile, tile_base + 26 * step, a26_0)
    _vstore(tile, tile_base + 27 * step, a27_0)


@njit(inline="always", cache=True)
def register_block(variant, xf, base, tap_off, t0, t1, wq, w_base, width, lanes, tile,
                   tile_base, row_step, first):
    """Register block number ``variant`` of ``_ALL_BLOCKS``."""
    if variant == 0:
        pvec_block(xf, base, tap_off, t0, t1, wq, w_base, width, lanes, tile, tile_base,
                   row_step, first)
    elif variant == 1:
        cvec1_block(xf, base, tap_off, t0, t1, wq, w_base, lanes, tile, tile_base, first)
    elif variant == 2:
        cvec2_block(xf, base, tap_off, t0, t1, wq, w_base, lanes, tile, tile_base, first)
    elif variant == 3:
        cvec1x21_block(xf, base, tap_off, t0, t1, wq, w_base, lanes, tile, tile_base, first)
    elif variant == 4:
        cvec1x25_block(xf, base, tap_off, t0, t1, wq, w_base, lanes, tile, tile_base, first)
    else:
        cvec1x28_block(xf, base, tap_off, t0, t1, wq, w_base, lanes, tile, tile_base, first)


@njit(inline="always", cache=True)
def tile_is_channel_major(variant):
    """Whether register block number ``variant`` keeps a channel-major tile."""
    return variant == 0
