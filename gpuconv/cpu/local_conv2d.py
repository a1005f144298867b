"""CPU kernel of the unshared (locally connected) convolution; see :mod:`gpuconv.cpu`."""

from __future__ import annotations

import functools

from typing import NamedTuple

import numpy as np
from numba import njit, prange

from . import threads as _threads

from .simd import VECTOR_BYTES as _VECTOR_BYTES
from .simd import prefer_wide_vectors as _prefer_wide_vectors
from .simd import vfma as _vfma, vload as _vload, vstore as _vstore, vzero as _vzero
from .simd_ext import vfmav as _vfmav, vload_masked as _vload_masked, vsum_lanes as _vsum_lanes

__all__ = ["local_conv2d_forward", "local_conv2d_scratch_bytes"]

# Output channels per block of the unshared kernel (weights of one block and position are
# _LOCAL_CO_BLOCK independent streams through memory).
_LOCAL_CO_BLOCK = 4

# --------------------------------------------------------------------------------------
# Unshared weights
# --------------------------------------------------------------------------------------

@njit(cache=True)
def _local_conv2d_position(wf, w0, w1, w2, w3, xr, x_base, c_Ig, k_H, k_W, x_channel, x_row,
                           x_tap, tile, tile_base, lanes):
    """For one output position and the _LOCAL_CO_BLOCK channels of a block, whose weights
    for this position start at ``wf[w0]``, ..., ``wf[w3]`` (``c_Ig * k_H * k_W`` each, in
    order): ``tile[tile_base + k * lanes + l] = sum over (c, u, v) of
    wf[w_k + (c * k_H + u) * k_W + v] * xr[x_base + c * x_channel + u * x_row + v * x_tap + l]``.

    Each input vector (``lanes`` batch elements of one tap) is loaded once and used for the
    four output channels; each weight is loaded once, in order, and broadcast.
    """
    _prefer_wide_vectors()
    a0 = _vzero(tile)
    a1 = _vzero(tile)
    a2 = _vzero(tile)
    a3 = _vzero(tile)
    t = 0
    for c in range(c_Ig):
        for u in range(k_H):
            row = x_base + c * x_channel + u * x_row
            for v in range(k_W):
                xv = _vload(xr, row + v * x_tap)
                a0 = _vfma(a0, xv, wf[np.uint64(w0 + t)])
                a1 = _vfma(a1, xv, wf[np.uint64(w1 + t)])
                a2 = _vfma(a2, xv, wf[np.uint64(w2 + t)])
                a3 = _vfma(a3, xv, wf[np.uint64(w3 + t)])
                t += 1
    _vstore(tile, tile_base, a0)
    _vstore(tile, tile_base + lanes, a1)
    _vstore(tile, tile_base + 2 * lanes, a2)
    _vstore(tile, tile_base + 3 * lanes, a3)


@njit(cache=True)
def _local_conv2d_position_flat(wf, w0, w1, w2, w3, xr, x_base, tap_off, tile, tile_base,
                                lanes):
    """:func:`_local_conv2d_position` with the taps in one loop, ``t = (c * k_H + u) * k_W +
    v``, whose input vector is ``tap_off[t]`` after ``x_base``: for narrow kernels (3 x 3),
    whose innermost loop of three taps spends as much time in its own control as in the
    arithmetic. (For wide ones the extra load of the offset costs more than it saves.) The
    terms are added in the same order: the same bits."""
    _prefer_wide_vectors()
    a0 = _vzero(tile)
    a1 = _vzero(tile)
    a2 = _vzero(tile)
    a3 = _vzero(tile)
    for t in range(tap_off.shape[0]):
        xv = _vload(xr, x_base + tap_off[t])
        a0 = _vfma(a0, xv, wf[np.uint64(w0 + t)])
        a1 = _vfma(a1, xv, wf[np.uint64(w1 + t)])
        a2 = _vfma(a2, xv, wf[np.uint64(w2 + t)])
        a3 = _vfma(a3, xv, wf[np.uint64(w3 + t)])
    _vstore(tile, tile_base, a0)
    _vstore(tile, tile_base + lanes, a1)
    _vstore(tile, tile_base + 2 * lanes, a2)
    _vstore(tile, tile_base + 3 * lanes, a3)


# Kernels at most this wide run their taps in one loop (see _local_conv2d_position_flat):
# measured on one core, a 1 x 10 x 496 x 496 layer of 5 maps 3 x 3 takes 0.83x the time of
# the nested loops, DeepFace L5 (7 x 7) 1.13x and AlexNet conv1 (11 x 11) 1.07x.
_FLAT_TAPS_MAX_WIDTH = 4


@njit(parallel=True, cache=True)
def _local_conv2d_kernel(x, wf, bias, has_bias, out, tiles, windows, tap_off, s_H, s_W, pt,
                         pl, d_H, d_W, groups, k_H, k_W, chunk, slot_rows, slot_cols, t_H, t_W):
    # The weights (and a bias per position) are indexed by kernel slot (sy, sx) of a
    # (t_H, t_W) grid: with slot_rows and slot_cols None (a specialisation of their own,
    # the tests on them pruned when Numba compiles it) the slot is the position itself and
    # (t_H, t_W) = (h_O, w_O), the locally connected layer; else output row oy uses slot row
    # slot_rows[oy] and column ox slot column slot_cols[ox] (gpuconv.cpu.tiled_conv2d).
    n, c_I, h, wd = x.shape
    c_O, h_O, w_O = out.shape[1], out.shape[2], out.shape[3]
    c_Og = c_O // groups
    c_Ig = c_I // groups
    per_position = bias.shape[1] * bias.shape[2] > 1
    lanes = _VECTOR_BYTES // wf.itemsize
    cb = _LOCAL_CO_BLOCK
    n_V = -(-n // lanes)                           # batch vectors per position
    tile_step = n_V * cb * lanes                   # accumulators per output position
    w_C = (chunk - 1) * s_W + (k_W - 1) * d_W + 1  # input columns one chunk reads
    r_len = c_Ig * k_H * k_W                       # weights per (co, oy, ox)
    blocks_per_group = -(-c_Og // cb)
    chunks = -(-w_O // chunk)
    n_pos = h_O * chunks * groups
    n_threads = tiles.shape[0]
    for thread in prange(n_threads):
        tile = tiles[thread]
        xr = windows[thread]
        for pos in range(thread, n_pos, n_threads):
            g = pos % groups
            oy = pos // groups // chunks
            ox0 = (pos // groups % chunks) * chunk
            ox1 = min(ox0 + chunk, w_O)
            sy = oy if slot_rows is None else slot_rows[oy]
            # xr[c, u, j, b]: the zero-padded input this chunk of the row reads, batch
            # innermost and not padded: a vector starting at batch element 0 of a column runs
            # on into the next column; those lanes are computed and dropped (the buffer has
            # a vector of slack at the end).
            for c in range(c_Ig):
                cx = g * c_Ig + c
                for u in range(k_H):
                    iy = oy * s_H + u * d_H - pt
                    for j in range(w_C):
                        ix = ox0 * s_W + j - pl
                        base = ((c * k_H + u) * w_C + j) * n
                        if iy >= 0 and iy < h and ix >= 0 and ix < wd:
                            for b in range(n):
                                xr[base + b] = x[b, cx, iy, ix]
                        else:
                            for b in range(n):
                                xr[base + b] = 0
            for i in range(c_Ig * k_H * w_C * n, xr.shape[0]):
                xr[i] = 0
            for blk in range(blocks_per_group):
                co0 = g * c_Og + blk * cb
                co1 = min(co0 + cb, (g + 1) * c_Og)
                # Channels past the block's end repeat its last channel (computed, then
                # dropped), so the block always reads four valid weight streams.
                co_a = min(co0 + 1, co1 - 1)
                co_b = min(co0 + 2, co1 - 1)
                co_c = min(co0 + 3, co1 - 1)
                for ox in range(ox0, ox1):
                    sx = ox if slot_cols is None else slot_cols[ox]
                    w0 = ((co0 * t_H + sy) * t_W + sx) * r_len
                    w1 = ((co_a * t_H + sy) * t_W + sx) * r_len
                    w2 = ((co_b * t_H + sy) * t_W + sx) * r_len
                    w3 = ((co_c * t_H + sy) * t_W + sx) * r_len
                    for v in range(n_V):
                        if k_W <= _FLAT_TAPS_MAX_WIDTH:
                            _local_conv2d_position_flat(
                                wf, w0, w1, w2, w3, xr, (ox - ox0) * s_W * n + v * lanes,
                                tap_off, tile, (ox - ox0) * tile_step + v * cb * lanes, lanes)
                        else:
                            _local_conv2d_position(
                                wf, w0, w1, w2, w3, xr, (ox - ox0) * s_W * n + v * lanes,
                                c_Ig, k_H, k_W, k_H * w_C * n, w_C * n, d_W * n,
                                tile, (ox - ox0) * tile_step + v * cb * lanes, lanes)
                for k in range(co1 - co0):
                    co = co0 + k
                    for ox in range(ox0, ox1):
                        for b in range(n):
                            v = b // lanes
                            val = tile[(ox - ox0) * tile_step + (v * cb + k) * lanes
                                       + b - v * lanes]
                            if has_bias:
                                if per_position:
                                    bx = ox if slot_cols is None else slot_cols[ox]
                                    val = bias[co, sy, bx] + val
                                else:
                                    val = bias[co, 0, 0] + val
                            out[b, co, oy, ox] = val


# ----------------------------------------------------------------------------------
# Few images: the vector over the taps
# ----------------------------------------------------------------------------------

# Batches below this run _local_conv2d_few_images: the batched kernel's vectors run over the
# batch, so with one image 15 of 16 float32 lanes compute nothing. With two images the
# batched kernel is already ahead (the tap-vector kernel reads the weights once per image);
# BENCHMARKS.md, "Per-call cost", has the batch-1 timings.
_FEW_IMAGES = 2

# Output columns whose windows _local_conv2d_few_images copies tap by tap, columns
# innermost, for narrow kernels (at most _FLAT_TAPS_MAX_WIDTH wide; wider ones copy each
# column's taps in a run): a block of them is a few KiB of the patch, in L1 while each of
# its taps is written (over a whole row of 494 columns, 190 KB, the copy took 1.2x as long).
_PATCH_COLUMNS = 32


@njit(cache=True)
def _local_dot_columns(wf, w_base, r_len, scratch, p_base, r_pad, mask, count, t_base, s_base,
                       lanes, slot_cols, ox0):
    """``scratch[s_base + i] = sum_t wf[w_base + (ox0 + i) * r_len + t] * scratch[p_base + i *
    r_pad + t]`` for ``i < count <= lanes``: the dot products of ``count`` consecutive output
    columns' weight rows (``r_len`` each, the caller's layout; with ``slot_cols`` not None,
    column ``ox`` reads slot column ``slot_cols[ox]`` instead) with their input windows
    (``r_pad``, zero past ``r_len``). One vector accumulator per column, over the taps,
    stored at ``t_base``; the weights' last vector is a masked load (the weights after a row
    are never read, whatever they hold); the lane sums by a fixed tree
    (:func:`.simd_ext.vsum_lanes`): the same bits every call."""
    _prefer_wide_vectors()
    for i in range(count):
        acc = _vzero(scratch)
        if slot_cols is None:
            wb = w_base + (ox0 + i) * r_len
        else:
            wb = w_base + slot_cols[ox0 + i] * r_len
        pb = p_base + i * r_pad
        for t0 in range(0, r_pad, lanes):
            acc = _vfmav(acc, _vload_masked(wf, wb + t0, mask, t0), _vload(scratch, pb + t0))
        _vstore(scratch, t_base + i * lanes, acc)
    for i in range(count, lanes):
        _vstore(scratch, t_base + i * lanes, _vzero(scratch))
    _vsum_lanes(scratch, t_base, scratch, s_base)


@njit(parallel=True, cache=True)
def _local_conv2d_few_images(x, weight, bias, has_bias, out, scratch, mask, s_H, s_W, pt, pl,
                             d_H, d_W, groups, k_H, k_W, slot_rows, slot_cols, t_H, t_W):
    """The unshared convolution for a batch of one or two images: per job (image, group,
    output row) the row's input windows are copied into a patch (``W_out x r_pad``, the
    taps of each column contiguous, in the weights' order, zeros for padding), then each
    output is the dot product of its weight row with its window, the vector running over
    the taps. (The batched kernel's vectors run over the batch.) ``scratch``: one row per
    thread, the patch, then ``lanes`` accumulator vectors, then their ``lanes`` sums (one
    allocation a call: what the call costs counts at this size). The weights are indexed
    by kernel slot, as in :func:`_local_conv2d_kernel` (``slot_rows`` and ``slot_cols``
    None: the position itself, ``(t_H, t_W) = (h_O, w_O)``)."""
    xf = x.reshape(-1)
    wf = weight.reshape(-1)
    n, c_I, h, wd = x.shape
    c_O, h_O, w_O = out.shape[1], out.shape[2], out.shape[3]
    c_Og = c_O // groups
    c_Ig = c_I // groups
    lanes = _VECTOR_BYTES // scratch.itemsize
    r_len = c_Ig * k_H * k_W
    r_pad = mask.shape[0]
    t_base = w_O * r_pad            # the accumulators' place in a thread's scratch row
    s_base = t_base + lanes * lanes  # their sums'
    per_position = bias.shape[1] * bias.shape[2] > 1
    n_jobs = n * groups * h_O
    n_threads = scratch.shape[0]
    # output columns [lo, hi) read only columns inside the input
    lo = min(w_O, -(-pl // s_W))
    hi = max(lo, min(w_O, (wd - 1 - (k_W - 1) * d_W + pl) // s_W + 1))
    for thread in prange(n_threads):
        patch = scratch[thread]
        for ox in range(w_O):  # the taps past r_len stay zero
            for t in range(r_len, r_pad):
                patch[np.uint64(ox * r_pad + t)] = 0
        for job in range(thread, n_jobs, n_threads):
            oy = job % h_O
            g = job // h_O % groups
            b = job // h_O // groups
            for c in range(c_Ig):
                for u in range(k_H):
                    iy = oy * s_H + u * d_H - pt
                    t0 = (c * k_H + u) * k_W
                    if iy < 0 or iy >= h:
                        for ox in range(w_O):
                            for v in range(k_W):
                                patch[np.uint64(ox * r_pad + t0 + v)] = 0
                        continue
                    row = ((b * c_I + g * c_Ig + c) * h + iy) * wd
                    # windows inside the row: no checks
                    if k_W <= _FLAT_TAPS_MAX_WIDTH:  # a few taps: columns innermost,
                        # _PATCH_COLUMNS at a time (their lines stay in L1 across taps)
                        for c0 in range(lo, hi, _PATCH_COLUMNS):
                            c1 = min(hi, c0 + _PATCH_COLUMNS)
                            for v in range(k_W):
                                src = row - pl + v * d_W
                                for ox in range(c0, c1):
                                    patch[np.uint64(ox * r_pad + t0 + v)] = \
                                        xf[np.uint64(src + ox * s_W)]
                    else:
                        for ox in range(lo, hi):
                            base = ox * r_pad + t0
                            src = row + ox * s_W - pl
                            for v in range(k_W):
                                patch[np.uint64(base + v)] = xf[np.uint64(src + v * d_W)]
                    for e in range(w_O - (hi - lo)):  # the columns at the two edges
                        ox = e if e < lo else e + (hi - lo)
                        base = ox * r_pad + t0
                        ix0 = ox * s_W - pl
                        for v in range(k_W):
                            ix = ix0 + v * d_W
                            if ix >= 0 and ix < wd:
                                patch[np.uint64(base + v)] = xf[np.uint64(row + ix)]
                            else:
                                patch[np.uint64(base + v)] = 0
            sy = oy if slot_rows is None else slot_rows[oy]
            for co in range(g * c_Og, (g + 1) * c_Og):
                for ox0 in range(0, w_O, lanes):
                    count = min(lanes, w_O - ox0)
                    _local_dot_columns(wf, (co * t_H + sy) * t_W * r_len, r_len, patch,
                                       ox0 * r_pad, r_pad, mask, count, t_base, s_base, lanes,
                                       slot_cols, ox0)
                    for i in range(count):
                        val = patch[s_base + i]
                        if has_bias:
                            if per_position:
                                bx = ox0 + i if slot_cols is None else slot_cols[ox0 + i]
                                val = bias[co, sy, bx] + val
                            else:
                                val = bias[co, 0, 0] + val
                        out[b, co, oy, ox0 + i] = val


def _local_chunk(geom, itemsize, threads):
    """Output columns per job of the unshared kernel: as many as keep the per-thread input
    windows within half of the output's size over all threads (at least one column; at
    most the whole row)."""
    budget = geom.batch * geom.out_channels * geom.out_height * geom.out_width * itemsize
    budget = budget // (2 * threads)
    per_column = geom.in_channels_per_group * geom.kernel_height * geom.batch * itemsize
    fixed = (geom.kernel_width - 1) * geom.dilation_w + 1
    columns = budget // max(1, per_column)            # w_C = (chunk - 1) * s_W + fixed
    chunk = (columns - fixed) // geom.stride_w + 1
    return int(max(1, min(geom.out_width, chunk)))


class _LocalLayout(NamedTuple):
    """Per-thread scratch of the unshared kernel (see local_conv2d_forward)."""

    lanes: int
    chunk: int            # output columns per job
    window: int           # elements of one thread's input window
    tile: int             # elements of one thread's accumulators


@functools.lru_cache(maxsize=256)  # per geometry: computed once, not per call
def _local_layout(geom, itemsize, threads):
    lanes = _VECTOR_BYTES // itemsize
    n_V = -(-geom.batch // lanes)
    chunk = _local_chunk(geom, itemsize, threads)
    w_C = (chunk - 1) * geom.stride_w + (geom.kernel_width - 1) * geom.dilation_w + 1
    window = geom.in_channels_per_group * geom.kernel_height * w_C * geom.batch
    return _LocalLayout(lanes, chunk, window, chunk * n_V * _LOCAL_CO_BLOCK * lanes)


@functools.lru_cache(maxsize=256)  # per geometry: computed once, not per call
def _window_taps(geom, chunk):
    """Offset in a thread's input window (``xr[c, u, j, b]``, ``w_C`` columns of ``N``) of
    each tap ``(c, u, v)`` of the first output column, in the weights' order."""
    n = geom.batch
    w_C = (chunk - 1) * geom.stride_w + (geom.kernel_width - 1) * geom.dilation_w + 1
    c = np.arange(geom.in_channels_per_group).reshape(-1, 1, 1)
    u = np.arange(geom.kernel_height).reshape(1, -1, 1)
    v = np.arange(geom.kernel_width).reshape(1, 1, -1)
    offsets = (c * geom.kernel_height + u) * w_C * n + v * geom.dilation_w * n
    return np.ascontiguousarray(offsets.reshape(-1), dtype=np.int64)


@functools.lru_cache(maxsize=256)  # per geometry: computed once, not per call
def _few_images_layout(geom, itemsize):
    """``(lanes, r_pad, mask)`` of :func:`_local_conv2d_few_images`: the taps per output
    rounded up to whole vectors, and the mask of the real ones."""
    lanes = _VECTOR_BYTES // itemsize
    r_len = geom.in_channels_per_group * geom.kernel_height * geom.kernel_width
    r_pad = -(-r_len // lanes) * lanes
    mask = np.zeros(r_pad, dtype=np.uint8)
    mask[:r_len] = 1
    mask.setflags(write=False)
    return lanes, r_pad, mask


def _few_images(geom):
    return geom.batch < _FEW_IMAGES


def local_conv2d_scratch_bytes(geom, itemsize):
    """Bytes of scratch :func:`local_conv2d_forward` allocates beyond its output: each
    thread's input window and accumulators."""
    threads = _threads.count()
    if _few_images(geom):
        lanes, r_pad, _ = _few_images_layout(geom, itemsize)
        return threads * (geom.out_width * r_pad + lanes * lanes + lanes) * itemsize + (1 << 16)
    layout = _local_layout(geom, itemsize, threads)
    return threads * (layout.window + layout.lanes + layout.tile) * itemsize + (1 << 16)


def slotted_scratch_bytes(geom, itemsize):
    """Bytes of scratch :func:`slotted_local_conv2d_forward` allocates with slots (the same
    kernels as without: :func:`local_conv2d_scratch_bytes`)."""
    return local_conv2d_scratch_bytes(geom, itemsize)


def local_conv2d_forward(x, weight, bias, has_bias, out, geom):
    """Unshared (locally connected) convolution into ``out``.

    Extra memory, per thread: the zero-padded input window of one chunk of output columns
    (``C_in/groups x k_H x w_C x N``), sized by :func:`_local_chunk` to stay within half of
    the output over all threads, and that chunk's accumulators; the weights are read in
    place, once, in order. A batch of one image runs :func:`_local_conv2d_few_images`
    instead (per thread: one output row's input windows, ``W_out x r_pad``).
    """
    return slotted_local_conv2d_forward(x, weight, bias, has_bias, out, geom, None, None)


def slotted_local_conv2d_forward(x, weight, bias, has_bias, out, geom, slot_rows, slot_cols):
    """:func:`local_conv2d_forward` with the weights ``(C_out, T_h, T_w, C_in/groups, kH,
    kW)`` of kernel slots: output row ``oy`` takes slot row ``slot_rows[oy]``, column ``ox``
    slot column ``slot_cols[ox]`` (int64 arrays), and a bias per position is one per slot.
    ``None`` for both is :func:`local_conv2d_forward` itself (its own specialisation)."""
    threads = _threads.count()
    if _few_images(geom):
        lanes, r_pad, mask = _few_images_layout(geom, x.dtype.itemsize)
        scratch = np.empty((threads, geom.out_width * r_pad + lanes * lanes + lanes),
                           dtype=x.dtype)
        _local_conv2d_few_images(x, weight, bias, has_bias, out, scratch, mask, geom.stride_h,
                                 geom.stride_w, geom.pad_top, geom.pad_left, geom.dilation_h,
                                 geom.dilation_w, geom.groups, geom.kernel_height,
                                 geom.kernel_width, slot_rows, slot_cols, weight.shape[1],
                                 weight.shape[2])
        return out
    layout = _local_layout(geom, x.dtype.itemsize, threads)
    chunk = layout.chunk
    windows = np.empty((threads, layout.window + layout.lanes), dtype=x.dtype)
    tiles = np.empty((threads, layout.tile), dtype=x.dtype)
    _local_conv2d_kernel(x, weight.reshape(-1), bias, has_bias, out, tiles, windows,
                         _window_taps(geom, chunk), geom.stride_h, geom.stride_w, geom.pad_top, geom.pad_left,
                         geom.dilation_h, geom.dilation_w, geom.groups,
                         geom.kernel_height, geom.kernel_width, chunk, slot_rows, slot_cols,
                         weight.shape[1], weight.shape[2])
    return out
