"""CPU gradient kernels of the unshared (locally connected) convolution.

Notation of :mod:`gpuconv.geometry`; ``w[o, oy, ox, c, u, v]`` is the kernel of output
position ``(oy, ox)``; ``r_len = c_I/g * k_H * k_W`` weights per (channel, position).

* **Input gradient** (:func:`local_conv2d_input_grad`), a gather: input pixel
  ``(b, c, iy, ix)`` sums ``w[o, oy, ox, c', u, v] * gy[b, o, oy, ox]`` over the outputs whose
  windows cover it, each with its own kernel. A job owns a band of input rows of one group
  and all their pixels: it walks the output rows that reach the band, in order, and for each
  position and block of four output channels reads those channels' kernels once, in order
  (four streams through the weights, as the forward does), adding ``weight * gy`` to the
  band's accumulators (batch innermost: one vector of batch elements per pixel; the ``gy``
  vectors of the block stay in registers, each weight is broadcast). Every pixel therefore
  receives its terms in one fixed order, (output row, channel block, output column,
  channel), whatever the bands: the result does not depend on the number of threads. The
  weights of the few output rows that reach two bands are read by both (the bands are at
  least ``2 * (k_H - 1) * d_H + 1`` rows where the image allows, so this stays small).
* **Weight gradient** (:func:`local_conv2d_weight_grad`): each position owns its gradient,
  ``gw[o, oy, ox, c, u, v] = sum_b gy[b, o, oy, ox] * x_pad[b, c', ...]``, a sum over the
  batch only. It is memory-bound on writing the weight-sized output, so the output is written
  once, in order: a job takes a run of positions of one output row, copies their input
  windows once into a per-thread buffer laid out exactly like the output run
  (``[b][position][c, u, v]``), then, for blocks of four output channels (four streams), writes
  each channel's contiguous run ``gw[o, oy, ox0:ox1, :]`` vector by vector, summing the batch
  in order (``gy`` broadcast, window vectors shared by the four channels). Run tails use
  masked stores, so nothing outside an output element's own store is touched.

Extra memory: per thread, one band of accumulators (input grad) or one run of windows
(weight grad), both bounded (see the scratch functions); far below the weight's size on
the benchmark layers. Every multiply-add is one fused multiply-add; nothing is relaxed.
"""

from __future__ import annotations

import functools

from typing import NamedTuple

import numpy as np
from numba import njit, prange

from . import threads as _threads

from .simd import VECTOR_BYTES as _VECTOR_BYTES
from .simd import prefer_wide_vectors as _prefer_wide_vectors
from .simd import vfma as _vfma, vload as _vload, vstore as _vstore, vzero as _vzero
from .simd_ext import vload_bytes as _vload_bytes, vstore_first as _vstore_first

__all__ = ["local_conv2d_input_grad", "local_conv2d_input_grad_scratch_bytes",
           "local_conv2d_weight_grad", "local_conv2d_weight_grad_scratch_bytes"]

_CO_BLOCK = 4            # output channels per block: four streams through the weights
_BAND_BYTES = 1 << 22    # input-gradient accumulators per thread, at most (if rows allow)
_WINDOW_BYTES = 1 << 18  # weight-gradient windows per thread, at most (at least one position)
_SMALL_SCRATCH = 1 << 16


# --------------------------------------------------------------------------------------
# Input gradient
# --------------------------------------------------------------------------------------

@njit(cache=True)
def _lig_position(wf, gyt, acc, p0, p1, p2, p3, q0, q1, q2, q3, width, r_len, nb, acc_base,
                  c_Ig, k_H, k_W, u0, u1, acc_channel, acc_row, acc_tap, n_V, vbytes):
    """One position and block of ``width`` (1 to 4) channels, ``p_k`` the (channel, position)
    index of channel ``k`` and ``q_k`` that of its kernel (the same for the unshared layer,
    the kernel slot's for the tiled one; channels past ``width`` are not used): for each
    batch vector ``bv`` and tap ``(c, u, v)`` with ``u0 <= u < u1``, in channel order,
    ``acc[a] += wf[q_k * r_len + t] * gyt[p_k * nb + bv * lanes ...]`` with
    ``t = (c * k_H + u) * k_W + v`` and
    ``a = acc_base + c * acc_channel + (u - u0) * acc_row + v * acc_tap + bv * lanes``;
    vectors of ``vbytes`` bytes (a constant)."""
    _prefer_wide_vectors()
    lanes = vbytes // wf.itemsize
    w0 = q0 * r_len
    w1 = q1 * r_len
    w2 = q2 * r_len
    w3 = q3 * r_len
    for bv in range(n_V):
        gb = bv * lanes
        gv0 = _vload_bytes(gyt, p0 * nb + gb, vbytes)
        gv1 = _vload_bytes(gyt, p1 * nb + gb, vbytes)
        gv2 = _vload_bytes(gyt, p2 * nb + gb, vbytes)
        gv3 = _vload_bytes(gyt, p3 * nb + gb, vbytes)
        for c in range(c_Ig):
            for u in range(u0, u1):
                a_row = acc_base + c * acc_channel + (u - u0) * acc_row + gb
                t_row = (c * k_H + u) * k_W
                for v in range(k_W):
                    a_i = a_row + v * acc_tap
                    t = t_row + v
                    a = _vload_bytes(acc, a_i, vbytes)
                    a = _vfma(a, gv0, wf[np.uint64(w0 + t)])
                    if width > 1:
                        a = _vfma(a, gv1, wf[np.uint64(w1 + t)])
                    if width > 2:
                        a = _vfma(a, gv2, wf[np.uint64(w2 + t)])
                    if width > 3:
                        a = _vfma(a, gv3, wf[np.uint64(w3 + t)])
                    _vstore(acc, a_i, a)


@njit(cache=True)
def _pack_gy(gy, gyt):
    """gyt[o, oy, ox, b] = gy[b, o, oy, ox], zero for the padded batch lanes."""
    n, c_O, h_O, w_O = gy.shape
    nb = gyt.shape[3]
    for o in range(c_O):
        for oy in range(h_O):
            for ox in range(w_O):
                for b in range(n):
                    gyt[o, oy, ox, b] = gy[b, o, oy, ox]
                for b in range(n, nb):
                    gyt[o, oy, ox, b] = 0


@njit(cache=True)
def _lig_band(wf, gyt, out, acc, g, y0, y1, k_H, k_W, s_H, s_W, pt, pl, d_H, d_W, band_rows,
              w_P, c_Og, vbytes, slot_rows, slot_cols, t_H, t_W):
    """Input rows [y0, y1) of group g: every position whose window reaches them, in order,
    into the band's accumulators, then the band's real pixels to ``out``. ``vbytes`` (the
    vector size) must be a constant: one compiled variant per size. The weights are
    ``(c_O, t_H, t_W, ...)``: with ``slot_rows`` and ``slot_cols`` None (a specialisation of
    their own) one kernel per position, ``(t_H, t_W) = (h_O, w_O)``; else output row ``oy``
    and column ``ox`` read kernel slot ``(slot_rows[oy], slot_cols[ox])`` (the tiled layer)."""
    n, c_I, h, wd = out.shape
    h_O, w_O, nb = gyt.shape[1], gyt.shape[2], gyt.shape[3]
    c_Ig = c_I // (gyt.shape[0] // c_Og)
    lanes = vbytes // wf.itemsize
    n_V = nb // lanes
    r_len = c_Ig * k_H * k_W
    acc_tap = d_W * nb
    acc_col = nb
    acc_row = w_P * nb
    acc_channel = band_rows * acc_row
    blocks = -(-c_Og // _CO_BLOCK)
    for i in range(c_Ig * band_rows * acc_row):
        acc[i] = 0
    # output rows whose windows reach input rows [y0, y1)
    oy_lo = max(0, -((-(y0 + pt - (k_H - 1) * d_H)) // s_H))
    oy_hi = min(h_O - 1, (y1 - 1 + pt) // s_H)
    for oy in range(oy_lo, oy_hi + 1):
        top = oy * s_H - pt                   # input row of tap u = 0
        u0 = max(0, -((-(y0 - top)) // d_H))  # first tap row inside the band
        u1 = min(k_H, (y1 - 1 - top) // d_H + 1)
        if u1 <= u0:
            continue
        row_base = (top + u0 * d_H - y0) * acc_row
        sy = oy if slot_rows is None else slot_rows[oy]
        for blk in range(blocks):
            co0 = g * c_Og + blk * _CO_BLOCK
            width = min(_CO_BLOCK, (g + 1) * c_Og - co0)
            p0 = co0 * h_O * w_O + oy * w_O
            p1 = (co0 + min(1, width - 1)) * h_O * w_O + oy * w_O
            p2 = (co0 + min(2, width - 1)) * h_O * w_O + oy * w_O
            p3 = (co0 + min(3, width - 1)) * h_O * w_O + oy * w_O
            q0 = co0 * t_H * t_W + sy * t_W
            q1 = (co0 + min(1, width - 1)) * t_H * t_W + sy * t_W
            q2 = (co0 + min(2, width - 1)) * t_H * t_W + sy * t_W
            q3 = (co0 + min(3, width - 1)) * t_H * t_W + sy * t_W
            for ox in range(w_O):
                sx = ox if slot_cols is None else slot_cols[ox]
                _lig_position(wf, gyt, acc, p0 + ox, p1 + ox, p2 + ox, p3 + ox, q0 + sx,
                              q1 + sx, q2 + sx, q3 + sx, width, r_len, nb,
                              row_base + ox * s_W * acc_col, c_Ig, k_H, k_W, u0, u1,
                              acc_channel, d_H * acc_row, acc_tap, n_V, vbytes)
    # the band's real pixels to the output (columns no window reaches are zero)
    for b in range(n):
        for c in range(c_Ig):
            for y in range(y0, y1):
                base = c * acc_channel + (y - y0) * acc_row + b
                for ix in range(wd):
                    j = ix + pl
                    if j < w_P:
                        out[b, g * c_Ig + c, y, ix] = acc[base + j * acc_col]
                    else:
                        out[b, g * c_Ig + c, y, ix] = 0


# One parallel kernel per vector size (16, 32 or 64 bytes), each compiled when first used;
# jobs are (group, band of band_rows input rows), dealt to the threads in turn.

@njit(parallel=True, cache=True)
def _lig_kernel16(wf, gyt, out, accs, groups, k_H, k_W, s_H, s_W, pt, pl, d_H, d_W,
                  band_rows, w_P, slot_rows, slot_cols, t_H, t_W):
    bands = -(-out.shape[2] // band_rows)
    n_threads = accs.shape[0]
    for thread in prange(n_threads):
        for job in range(thread, groups * bands, n_threads):
            y0 = (job % bands) * band_rows
            _lig_band(wf, gyt, out, accs[thread], job // bands, y0,
                      min(y0 + band_rows, out.shape[2]), k_H, k_W, s_H, s_W, pt, pl, d_H, d_W,
                      band_rows, w_P, gyt.shape[0] // groups, 16, slot_rows, slot_cols,
                      t_H, t_W)


@njit(parallel=True, cache=True)
def _lig_kernel32(wf, gyt, out, accs, groups, k_H, k_W, s_H, s_W, pt, pl, d_H, d_W,
                  band_rows, w_P, slot_rows, slot_cols, t_H, t_W):
    bands = -(-out.shape[2] // band_rows)
    n_threads = accs.shape[0]
    for thread in prange(n_threads):
        for job in range(thread, groups * bands, n_threads):
            y0 = (job % bands) * band_rows
            _lig_band(wf, gyt, out, accs[thread], job // bands, y0,
                      min(y0 + band_rows, out.shape[2]), k_H, k_W, s_H, s_W, pt, pl, d_H, d_W,
                      band_rows, w_P, gyt.shape[0] // groups, 32, slot_rows, slot_cols,
                      t_H, t_W)


@njit(parallel=True, cache=True)
def _lig_kernel64(wf, gyt, out, accs, groups, k_H, k_W, s_H, s_W, pt, pl, d_H, d_W,
                  band_rows, w_P, slot_rows, slot_cols, t_H, t_W):
    bands = -(-out.shape[2] // band_rows)
    n_threads = accs.shape[0]
    for thread in prange(n_threads):
        for job in range(thread, groups * bands, n_threads):
            y0 = (job % bands) * band_rows
            _lig_band(wf, gyt, out, accs[thread], job // bands, y0,
                      min(y0 + band_rows, out.shape[2]), k_H, k_W, s_H, s_W, pt, pl, d_H, d_W,
                      band_rows, w_P, gyt.shape[0] // groups, 64, slot_rows, slot_cols,
                      t_H, t_W)


_LIG_KERNELS = {16: _lig_kernel16, 32: _lig_kernel32, 64: _lig_kernel64}


class _LigLayout(NamedTuple):
    lanes: int       # batch elements per vector
    nb: int          # batch padded to whole vectors
    w_P: int         # padded input columns the windows reach
    band_rows: int
    acc: int         # accumulator elements per thread


@functools.lru_cache(maxsize=256)  # per geometry: computed once, not per call
def _lig_layout(geom, itemsize, threads):
    # The narrowest vector of 16, 32 or 64 bytes that holds the batch (a batch of 8 float32
    # in 32 bytes: half the work and accumulators of a 64-byte vector); larger batches take
    # several 64-byte vectors.
    lanes = _VECTOR_BYTES // itemsize
    for vbytes in (16, 32):
        if geom.batch * itemsize <= vbytes:
            lanes = vbytes // itemsize
            break
    nb = -(-geom.batch // lanes) * lanes
    w_P = (geom.out_width - 1) * geom.stride_w + (geom.kernel_width - 1) * geom.dilation_w + 1
    row_bytes = geom.in_channels_per_group * w_P * nb * itemsize
    h = geom.in_height
    # One band per thread when that keeps the accumulators within _BAND_BYTES; at least
    # 2 (k_H - 1) d_H + 1 rows (if the image has them) so few weights are read twice.
    rows = -(-h // threads)
    rows = max(rows, min(h, 2 * (geom.kernel_height - 1) * geom.dilation_h + 1))
    rows = min(rows, max(1, _BAND_BYTES // row_bytes))
    return _LigLayout(lanes, nb, w_P, rows, geom.in_channels_per_group * rows * w_P * nb)


def local_conv2d_input_grad_scratch_bytes(geom, itemsize):
    """Bytes of scratch :func:`local_conv2d_input_grad` allocates beyond ``out``: the batch-
    innermost copy of ``grad_output`` and each thread's band of accumulators."""
    threads = _threads.count()
    layout = _lig_layout(geom, itemsize, threads)
    gyt = geom.out_channels * geom.out_height * geom.out_width * layout.nb
    return (gyt + threads * layout.acc) * itemsize + _SMALL_SCRATCH


def local_conv2d_input_grad(grad_output, weight, out, geom):
    """``out = d(sum(local_conv2d(x, weight) * grad_output)) / dx``, every element written.

    ``grad_output`` ``(n, c_O, h_O, w_O)``, ``weight`` ``(c_O, h_O, w_O, c_I/g, k_H, k_W)``,
    ``out`` ``(n, c_I, h, w)``: C-contiguous, one dtype. Deterministic, and the same for
    every thread count (see the module docstring).
    """
    return slotted_local_conv2d_input_grad(grad_output, weight, out, geom, None, None)


def slotted_local_conv2d_input_grad(grad_output, weight, out, geom, slot_rows, slot_cols):
    """:func:`local_conv2d_input_grad` with the weights ``(c_O, T_h, T_w, c_I/g, k_H, k_W)``
    of kernel slots: output row ``oy`` and column ``ox`` read slot ``(slot_rows[oy],
    slot_cols[ox])`` (int64 arrays); ``None`` for both is :func:`local_conv2d_input_grad`
    itself (its own specialisation)."""
    threads = _threads.count()
    dtype = out.dtype
    layout = _lig_layout(geom, dtype.itemsize, threads)
    gyt = np.empty((geom.out_channels, geom.out_height, geom.out_width, layout.nb), dtype)
    _pack_gy(grad_output, gyt)
    accs = np.empty((threads, layout.acc), dtype=dtype)
    kernel = _LIG_KERNELS[layout.lanes * dtype.itemsize]
    kernel(weight.reshape(-1), gyt, out, accs, geom.groups, geom.kernel_height,
           geom.kernel_width, geom.stride_h, geom.stride_w, geom.pad_top, geom.pad_left,
           geom.dilation_h, geom.dilation_w, layout.band_rows, layout.w_P, slot_rows,
           slot_cols, weight.shape[1], weight.shape[2])
    return out


# --------------------------------------------------------------------------------------
# Weight gradient
# --------------------------------------------------------------------------------------

@njit(cache=True)
def _lwg_segment(win, win_step, n, gy_b, gy_step, width, o0, o1, o2, o3, outf, q0, length,
                 lanes):
    """``outf[o_k + q] = sum_b gy_b[k + b * gy_step] * win[b * win_step + q]`` for
    ``q0 <= q < q0 + length`` and the channels ``k < width`` of a block of four (their runs
    start at ``o_k``; channels past ``width`` are computed, not stored), batch summed in
    order; two vectors per channel at a time, the tail masked."""
    _prefer_wide_vectors()
    q = q0
    end = q0 + length
    while q + 2 * lanes <= end:
        a0 = _vzero(win)
        a1 = _vzero(win)
        b0 = _vzero(win)
        b1 = _vzero(win)
        c0 = _vzero(win)
        c1 = _vzero(win)
        d0 = _vzero(win)
        d1 = _vzero(win)
        for b in range(n):
            x0 = _vload(win, b * win_step + q)
            x1 = _vload(win, b * win_step + q + lanes)
            gb = b * gy_step
            g = gy_b[gb]
            a0 = _vfma(a0, x0, g)
            a1 = _vfma(a1, x1, g)
            g = gy_b[gb + 1]
            b0 = _vfma(b0, x0, g)
            b1 = _vfma(b1, x1, g)
            g = gy_b[gb + 2]
            c0 = _vfma(c0, x0, g)
            c1 = _vfma(c1, x1, g)
            g = gy_b[gb + 3]
            d0 = _vfma(d0, x0, g)
            d1 = _vfma(d1, x1, g)
        _vstore(outf, np.uint64(o0 + q), a0)
        _vstore(outf, np.uint64(o0 + q + lanes), a1)
        if width > 1:
            _vstore(outf, np.uint64(o1 + q), b0)
            _vstore(outf, np.uint64(o1 + q + lanes), b1)
        if width > 2:
            _vstore(outf, np.uint64(o2 + q), c0)
            _vstore(outf, np.uint64(o2 + q + lanes), c1)
        if width > 3:
            _vstore(outf, np.uint64(o3 + q), d0)
            _vstore(outf, np.uint64(o3 + q + lanes), d1)
        q += 2 * lanes
    while q < end:
        a0 = _vzero(win)
        b0 = _vzero(win)
        c0 = _vzero(win)
        d0 = _vzero(win)
        for b in range(n):
            x0 = _vload(win, b * win_step + q)
            gb = b * gy_step
            a0 = _vfma(a0, x0, gy_b[gb])
            b0 = _vfma(b0, x0, gy_b[gb + 1])
            c0 = _vfma(c0, x0, gy_b[gb + 2])
            d0 = _vfma(d0, x0, gy_b[gb + 3])
        count = min(lanes, end - q)
        _vstore_first(outf, np.uint64(o0 + q), a0, count)
        if width > 1:
            _vstore_first(outf, np.uint64(o1 + q), b0, count)
        if width > 2:
            _vstore_first(outf, np.uint64(o2 + q), c0, count)
        if width > 3:
            _vstore_first(outf, np.uint64(o3 + q), d0, count)
        q += lanes


@njit(cache=True)
def _pad_input(x, xpf, h_pad, w_pad, pt, pl):
    """xpf[((b * c_I + c) * h_pad + y) * w_pad + j] = x_padded[b, c, y, j] (zero outside x),
    for the rows and columns the windows reach; zero slack after it."""
    n, c_I, h, wd = x.shape
    for b in range(n):
        for c in range(c_I):
            for y in range(h_pad):
                iy = y - pt
                base = ((b * c_I + c) * h_pad + y) * w_pad
                for j in range(w_pad):
                    ix = j - pl
                    if iy >= 0 and iy < h and ix >= 0 and ix < wd:
                        xpf[base + j] = x[b, c, iy, ix]
                    else:
                        xpf[base + j] = 0
    for i in range(n * c_I * h_pad * w_pad, xpf.shape[0]):
        xpf[i] = 0


@njit(cache=True)
def _lwg_windows(xpf, win, win_step, n, c_I, c_Ig, g, oy, ox0, ox1, k_H, k_W, s_H, s_W, d_H,
                 d_W, h_pad, w_pad, r_len):
    """win[b * win_step + (ox - ox0) * r_len + (c * k_H + u) * k_W + v] = the padded input
    under tap (c, u, v) of position (oy, ox), image b. With d_W == 1 each (c, u) row of a
    window is a contiguous run of the padded input: copied a vector at a time, in
    increasing addresses, so the lanes a vector writes past the run are overwritten by the
    next run (or land in the slack)."""
    _prefer_wide_vectors()
    lanes = _VECTOR_BYTES // xpf.itemsize
    for b in range(n):
        for ox in range(ox0, ox1):
            base = b * win_step + (ox - ox0) * r_len
            for c in range(c_Ig):
                plane = (b * c_I + g * c_Ig + c) * h_pad
                for u in range(k_H):
                    src = (plane + oy * s_H + u * d_H) * w_pad + ox * s_W
                    t = base + (c * k_H + u) * k_W
                    if d_W == 1:
                        for k in range(0, k_W, lanes):
                            _vstore(win, t + k, _vload(xpf, src + k))
                    else:
                        for v in range(k_W):
                            win[t + v] = xpf[src + v * d_W]


@njit(parallel=True, cache=True)
def _lwg_kernel(xpf, gy, outf, wins, gys, groups, c_I, k_H, k_W, s_H, s_W, d_H, d_W, h_pad,
                w_pad, chunk):
    n, c_O, h_O, w_O = gy.shape
    c_Og = c_O // groups
    c_Ig = c_I // groups
    r_len = c_Ig * k_H * k_W
    chunks = -(-w_O // chunk)
    n_jobs = groups * h_O * chunks
    blocks = -(-c_Og // _CO_BLOCK)
    n_threads = wins.shape[0]
    win_step = wins.shape[1] // n                # chunk * r_len, plus slack
    for thread in prange(n_threads):
        win = wins[thread]
        gy_b = gys[thread]
        for job in range(thread, n_jobs, n_threads):
            g = job % groups
            oy = job // groups // chunks
            ox0 = (job // groups % chunks) * chunk
            ox1 = min(ox0 + chunk, w_O)
            _lwg_windows(xpf, win, win_step, n, c_I, c_Ig, g, oy, ox0, ox1, k_H, k_W, s_H,
                         s_W, d_H, d_W, h_pad, w_pad, r_len)
            for blk in range(blocks):
                co0 = g * c_Og + blk * _CO_BLOCK
                co1 = min(co0 + _CO_BLOCK, (g + 1) * c_Og)
                # channels past the block's end repeat its last one (computed, not stored)
                co_a = min(co0 + 1, co1 - 1)
                co_b = min(co0 + 2, co1 - 1)
                co_c = min(co0 + 3, co1 - 1)
                for ox in range(ox0, ox1):
                    for b in range(n):
                        gb = (b * (ox1 - ox0) + ox - ox0) * _CO_BLOCK
                        gy_b[gb] = gy[b, co0, oy, ox]
                        gy_b[gb + 1] = gy[b, co_a, oy, ox]
                        gy_b[gb + 2] = gy[b, co_b, oy, ox]
                        gy_b[gb + 3] = gy[b, co_c, oy, ox]
                for ox in range(ox0, ox1):
                    q0 = (ox - ox0) * r_len
                    _lwg_segment(win, win_step, n, gy_b[(ox - ox0) * _CO_BLOCK:],
                                 (ox1 - ox0) * _CO_BLOCK, co1 - co0,
                                 ((co0 * h_O + oy) * w_O + ox0) * r_len,
                                 ((co_a * h_O + oy) * w_O + ox0) * r_len,
                                 ((co_b * h_O + oy) * w_O + ox0) * r_len,
                                 ((co_c * h_O + oy) * w_O + ox0) * r_len,
                                 outf, q0, r_len, _VECTOR_BYTES // outf.itemsize)


def _lwg_chunk(geom, itemsize):
    """Positions per job of the weight gradient: as many as keep one thread's windows
    within _WINDOW_BYTES (at least one), the row split into runs of (nearly) equal length
    so that jobs, dealt to the threads in turn, carry equal work."""
    per_position = geom.batch * geom.in_channels_per_group * geom.kernel_height \
        * geom.kernel_width * itemsize
    most = max(1, min(geom.out_width, _WINDOW_BYTES // max(1, per_position)))
    runs = -(-geom.out_width // most)
    return int(-(-geom.out_width // runs))


class _LwgLayout(NamedTuple):
    chunk: int       # positions per job
    window: int      # elements of one thread's windows
    gys: int         # elements of one thread's gy values
    h_pad: int       # padded input rows and columns the windows reach
    w_pad: int
    padded: int      # elements of the padded input, slack included


@functools.lru_cache(maxsize=256)  # per geometry: computed once, not per call
def _lwg_layout(geom, itemsize):
    lanes = _VECTOR_BYTES // itemsize
    chunk = _lwg_chunk(geom, itemsize)
    r_len = geom.in_channels_per_group * geom.kernel_height * geom.kernel_width
    win_step = chunk * r_len + 2 * lanes     # vectors may run past a window's end
    h_pad = (geom.out_height - 1) * geom.stride_h + (geom.kernel_height - 1) * geom.dilation_h + 1
    w_pad = (geom.out_width - 1) * geom.stride_w + (geom.kernel_width - 1) * geom.dilation_w + 1
    padded = geom.batch * geom.in_channels * h_pad * w_pad + geom.kernel_width + lanes
    return _LwgLayout(chunk, geom.batch * win_step, geom.batch * chunk * _CO_BLOCK, h_pad,
                      w_pad, padded)


def local_conv2d_weight_grad_scratch_bytes(geom, itemsize):
    """Bytes of scratch :func:`local_conv2d_weight_grad` allocates beyond ``out``: the
    zero-padded input, each thread's windows of one run of positions and their ``gy``."""
    layout = _lwg_layout(geom, itemsize)
    return ((layout.padded + _threads.count() * (layout.window + layout.gys))
            * itemsize + _SMALL_SCRATCH)


def local_conv2d_weight_grad(x, grad_output, out, geom):
    """``out = d(sum(local_conv2d(x, w) * grad_output)) / dw``, every element written once.

    ``x`` ``(n, c_I, h, w)``, ``grad_output`` ``(n, c_O, h_O, w_O)``, ``out``
    ``(c_O, h_O, w_O, c_I/g, k_H, k_W)``: C-contiguous, one dtype. Each element is the sum
    over the batch, in batch order (deterministic).
    """
    threads = _threads.count()
    dtype = out.dtype
    layout = _lwg_layout(geom, dtype.itemsize)
    xpf = np.empty(layout.padded, dtype=dtype)
    _pad_input(x, xpf, layout.h_pad, layout.w_pad, geom.pad_top, geom.pad_left)
    wins = np.zeros((threads, layout.window), dtype=dtype)
    gy_b = np.empty((threads, layout.gys), dtype=dtype)
    _lwg_kernel(xpf, grad_output, out.reshape(-1), wins, gy_b, geom.groups, geom.in_channels,
                geom.kernel_height, geom.kernel_width, geom.stride_h, geom.stride_w,
                geom.dilation_h, geom.dilation_w, layout.h_pad, layout.w_pad, layout.chunk)
    return out
