"""CPU gradient kernels of the shared-weight convolution (notation: :mod:`gpuconv.geometry`).

With ``y = conv2d(x, w)`` and ``gy`` the gradient of a scalar loss with respect to ``y``:

* **Input gradient** (:func:`conv2d_input_grad`), a gather: input pixel ``(b, c, iy, ix)``
  receives ``w[o, c', u, v] * gy[b, o, oy, ox]`` from every output ``(oy, ox)`` whose window
  covers it (``oy * s_H + u * d_H - p_top = iy``, likewise for columns). Along an axis, the
  input rows with one value of ``(iy + p_top) mod s_H`` (a *phase*) are all reached by the
  same kernel taps ``u``, which step through ``gy`` every ``d_H / gcd(s_H, d_H)`` rows; so each
  of the ``s_H * s_W`` phases is a stride-1 convolution of ``gy`` with the channel-transposed,
  flipped sub-kernel of those taps (dilated, with its own padding). Each phase runs the
  forward kernel (:func:`gpuconv.cpu.conv2d_forward`, a black box here) and its result is
  copied to every ``s_H``-th row and ``s_W``-th column of the output; with stride 1 there is
  one phase, written in place. Phases without taps are zero. All phases' sub-kernels are
  built in one pass (at most the weight's size). As in any forward convolution, the zero
  padding of ``gy`` meets the taps (all of them in the merged runs; by rows, those of the
  kernel rows that reach into ``gy``): an infinite weight can give ``0 * inf = NaN`` at
  border pixels whose window sums, by the definition above, would not include it (finite
  weights are exact).
* **Weight gradient** (:func:`conv2d_weight_grad`): ``gw[o, c, u, v]`` is the dot product, over
  every output pixel of every image, of ``gy[:, o]`` and the input seen by tap ``(c, u, v)``.
  Two kernels; :func:`_wg_choice` takes the one that computes fewer multiply-adds. *Channel
  vectors* (see "Weight gradient, channel vectors" below): a vector of output channels x 24
  taps, looping over the real output pixels only (nothing computed and dropped; the choice
  wherever the output channels fill the vectors, e.g. DeepFace L6 and VGG, ResNet and
  AlexNet layers). *Pixel vectors* (few output channels, e.g. the seed's 5 or 10), described
  here: the input is repacked zero-padded and phase-split by columns, as the forward does,
  so that every tap reads a contiguous run of input for a run of consecutive output pixels,
  and ``gy`` is repacked onto the same runs. Register block: 4 output channels x 6 taps = 24
  vector accumulators, each a vector of consecutive pixels (per step: 4 ``gy`` vectors and 6
  input vectors loaded, 24 fused multiply-adds). The runs (:func:`_wg_layout`): with stride 1,
  each image's output rows form runs on the padded grid (``"images"``), or all rows of all
  images do (``"merged"``: 7 x 7 maps still give full vectors), whichever computes fewer
  pixels; with strides, one run per output row (``"rows"``), its tail past ``w_O`` junk.
  The pixels that fall in the padding ("junk") have ``gy = 0``; the input they read is
  another pixel's, so when the input holds an Inf or NaN (checked while packing) the input
  loads are masked at the junk pixels, which then contribute exactly nothing (``0 * inf`` is
  never formed); with a finite input the loads are plain and a junk pixel adds ``0 * x = 0``.

  Parallelism without atomics: the pixels are split into ``P`` parts, a number that depends
  on the geometry only (never on the thread count or timing). A job is (part, block of 4
  output channels, group of taps); it owns its outputs, accumulates the part's pixels in
  L1-sized passes, sums each vector's lanes (a fixed tree) and writes its results to the part's
  private slice of a partial-sum buffer (or straight to ``out`` when ``P == 1``). A second
  pass adds the parts in order ``0, 1, ..., P - 1``. The partial buffers are at most
  ``_PARTIAL_BYTES`` (or one weight's size when the weight alone is larger: then ``P = 1``).
  The result is bitwise the same on every call and for every thread count.

Every multiply-add is one fused multiply-add; nothing is relaxed, so NaN and Inf propagate.
"""

from __future__ import annotations

import functools

from math import gcd
from typing import NamedTuple

import numpy as np
from numba import njit, prange

from . import threads as _threads

from ..geometry import ConvGeometry
from .conv2d import conv2d_forward, conv2d_scratch_bytes
from .simd import VECTOR_BYTES as _VECTOR_BYTES
from .simd import prefer_wide_vectors as _prefer_wide_vectors
from .simd import vfma as _vfma, vload as _vload, vstore as _vstore, vzero as _vzero
from .simd_ext import vfmav as _vfmav, vload_first as _vload_first
from .simd_ext import vload_masked as _vload_masked, vstore_first as _vstore_first
from .simd_ext import vsum_lanes as _vsum_lanes, vtranspose as _vtranspose

__all__ = ["conv2d_input_grad", "conv2d_input_grad_scratch_bytes", "conv2d_weight_grad",
           "conv2d_weight_grad_scratch_bytes"]

_SMALL_SCRATCH = 1 << 16  # array headers, index temporaries


# --------------------------------------------------------------------------------------
# Input gradient: one stride-1 forward convolution of gy per phase
# --------------------------------------------------------------------------------------

class _AxisPhase(NamedTuple):
    """One phase of one axis: the input positions ``first, first + s, ...`` (``count`` of
    them) and the stride-1 convolution over ``gy[lo:hi]`` that gives their gradient."""

    first: int
    count: int
    taps: tuple         # kernel taps of the phase, in the order the sub-kernel applies them
    dilation: int
    lo: int             # gy rows (columns) [lo, hi) that the phase reads
    hi: int
    pad_before: int
    pad_after: int


def _axis_phases(size, out_size, kernel, stride, pad, dilation):
    """The phases of one axis (input positions ``i`` with ``(i + pad) % stride == r``).

    Input position ``i = r + stride * m - pad`` receives tap ``u`` from output
    ``m - e_u`` where ``e_u = (u * dilation - r) / stride``, for the taps with
    ``u * dilation = r (mod stride)``; they step ``e`` by ``dilation / gcd(stride, dilation)``.
    Reversed, they are a forward convolution with that dilation and padding
    ``e_last - m_first`` before; ``gy`` is cropped where that padding would be negative.
    A phase without taps, or whose taps reach no output, has ``taps == ()`` (zeros).
    """
    phases = []
    for r in range(stride):
        m0 = -((r - pad) // stride)               # first m with r + stride * m - pad >= 0
        m1 = (size - 1 + pad - r) // stride
        count = m1 - m0 + 1
        if count <= 0:
            continue
        first = r + stride * m0 - pad
        taps = [u for u in range(kernel) if (u * dilation - r) % stride == 0]
        if not taps:
            phases.append(_AxisPhase(first, count, (), 1, 0, 0, 0, 0))
            continue
        e = [(u * dilation - r) // stride for u in taps]
        step = dilation // gcd(stride, dilation)
        span = (len(taps) - 1) * step
        before = e[-1] - m0                       # output i reads gy[i + j * step - before]
        lo = max(0, -before)
        hi = min(out_size, count + span - before)
        if hi <= lo:
            phases.append(_AxisPhase(first, count, (), 1, 0, 0, 0, 0))
            continue
        after = count - 1 + span - before - (hi - 1)
        phases.append(_AxisPhase(first, count, tuple(reversed(taps)), step, lo, hi,
                                 before + lo, after))
    return phases


def _phase_geometry(geom, ph, pw):
    """The forward convolution of one phase: gy (cropped) -> the phase's input gradient."""
    return ConvGeometry(
        geom.batch, geom.out_channels, ph.hi - ph.lo, pw.hi - pw.lo, geom.in_channels,
        len(ph.taps), len(pw.taps), 1, 1, ph.pad_before, ph.pad_after, pw.pad_before,
        pw.pad_after, ph.dilation, pw.dilation, geom.groups, ph.count, pw.count)


def _phases(geom):
    rows = _axis_phases(geom.in_height, geom.out_height, geom.kernel_height, geom.stride_h,
                        geom.pad_top, geom.dilation_h)
    cols = _axis_phases(geom.in_width, geom.out_width, geom.kernel_width, geom.stride_w,
                        geom.pad_left, geom.dilation_w)
    return rows, cols


def _in_place(geom, ph, pw):
    """Whether the phase's result is the whole output (stride 1): no copy needed."""
    return ph.count == geom.in_height and pw.count == geom.in_width


@njit(parallel=True, cache=True)
def _sub_kernels(weight, taps, starts, w_all, groups):
    """Every phase's sub-kernel, channels transposed within each group: phase ``p`` uses the
    flattened taps ``taps[starts[p]:starts[p + 1]]`` (``n_p`` of them) and its block of
    ``w_all``, from ``c_I * c_O/g * starts[p]`` on, is ``(c_I, c_O/g, n_p)`` with
    ``[g * c_Ig + c, o, t] = weight[g * c_Og + o, c, taps[starts[p] + t]]``. One pass for all
    phases, in blocks of 16 output channels so both sides move through memory in runs."""
    c_O, c_Ig = weight.shape[0], weight.shape[1]
    c_Og = c_O // groups
    c_I = c_Ig * groups
    blocks = -(-c_Og // 16)
    for job in prange(groups * blocks):
        g = job // blocks
        o0 = (job - g * blocks) * 16
        o1 = min(o0 + 16, c_Og)
        for p in range(starts.shape[0] - 1):
            t0 = starts[p]
            n_t = starts[p + 1] - t0
            block = c_I * c_Og * t0
            for c in range(c_Ig):
                for o in range(o0, o1):
                    src = weight[g * c_Og + o, c]
                    dst = block + ((g * c_Ig + c) * c_Og + o) * n_t
                    for t in range(n_t):
                        w_all[dst + t] = src[taps[t0 + t]]


@functools.lru_cache(maxsize=256)  # per geometry: computed once, not per call
def _plan(geom):
    """The phases that compute something, as (rows phase, columns phase), and all phases."""
    rows, cols = _phases(geom)
    active = [(ph, pw) for ph in rows for pw in cols if ph.taps and pw.taps]
    return active, rows, cols


class _PhaseCall(NamedTuple):
    """What :func:`conv2d_input_grad` does for one phase that computes something."""

    rows: _AxisPhase
    cols: _AxisPhase
    geom: ConvGeometry  # the phase's forward convolution
    cropped: bool       # it reads a part of gy only
    in_place: bool      # its result is the whole output


@functools.lru_cache(maxsize=256)  # per geometry: computed once, not per call
def _calls(geom):
    """The phase calls, the flattened taps of their sub-kernels and where each phase's
    start (see :func:`_sub_kernels`), and the (rows, columns) phases that receive nothing."""
    active, rows, cols = _plan(geom)
    calls = tuple(_PhaseCall(ph, pw, _phase_geometry(geom, ph, pw),
                             (ph.lo, ph.hi, pw.lo, pw.hi) != (0, geom.out_height, 0,
                                                             geom.out_width),
                             _in_place(geom, ph, pw)) for ph, pw in active)
    taps = [np.add.outer(np.array(ph.taps) * geom.kernel_width, np.array(pw.taps)).reshape(-1)
            for ph, pw in active]
    starts = np.cumsum([0] + [t.size for t in taps]).astype(np.int64)
    flat = np.concatenate(taps).astype(np.int64) if taps else np.zeros(0, np.int64)
    empty = tuple((ph, pw) for ph in rows for pw in cols if not ph.taps or not pw.taps)
    return calls, flat, starts, empty


def conv2d_input_grad_scratch_bytes(geom, itemsize):
    """Bytes of scratch :func:`conv2d_input_grad` allocates beyond ``out``: the transposed
    sub-kernels of all phases (at most the weight's size), plus the largest phase's cropped
    ``gy``, result (strided layers only) and forward scratch (phases run one at a time)."""
    active, _, _ = _plan(geom)
    n_sub = sum(len(ph.taps) * len(pw.taps) for ph, pw in active)
    most = 0
    for ph, pw in active:
        sub = _phase_geometry(geom, ph, pw)
        n_elem = 0
        if (ph.hi - ph.lo, pw.hi - pw.lo) != (geom.out_height, geom.out_width):
            n_elem += geom.batch * geom.out_channels * (ph.hi - ph.lo) * (pw.hi - pw.lo)
        if not _in_place(geom, ph, pw):
            n_elem += geom.batch * geom.in_channels * ph.count * pw.count
        most = max(most, n_elem * itemsize + conv2d_scratch_bytes(sub, itemsize))
    sub_kernels = geom.in_channels * geom.out_channels_per_group * n_sub * itemsize
    return sub_kernels + most + 8 * (n_sub + len(active) + 1) + _SMALL_SCRATCH


def conv2d_input_grad(grad_output, weight, out, geom):
    """``out = d(sum(conv2d(x, weight) * grad_output)) / dx``, every element written.

    ``grad_output`` ``(n, c_O, h_O, w_O)``, ``weight`` ``(c_O, c_I/g, k_H, k_W)``, ``out``
    ``(n, c_I, h, w)``: C-contiguous, one dtype. One forward convolution per phase (see the
    module docstring); the result is deterministic.
    """
    dtype = out.dtype
    c_I, c_O, groups = geom.in_channels, geom.out_channels, geom.groups
    c_Og = c_O // groups
    calls, taps, starts, empty = _calls(geom)
    for ph, pw in empty:  # phases that receive nothing
        out[:, :, ph.first::geom.stride_h, pw.first::geom.stride_w] = 0
    if not calls:
        return out
    w_all = np.empty(c_I * c_Og * int(starts[-1]), dtype=dtype)
    _sub_kernels(weight.reshape(c_O, c_I // groups, -1), taps, starts, w_all, groups)
    no_bias = np.zeros((c_I, 1, 1), dtype=dtype)
    for p, call in enumerate(calls):
        ph, pw = call.rows, call.cols
        w_sub = w_all[c_I * c_Og * starts[p]:c_I * c_Og * starts[p + 1]].reshape(
            c_I, c_Og, len(ph.taps), len(pw.taps))
        gy = grad_output
        if call.cropped:
            gy = np.ascontiguousarray(gy[:, :, ph.lo:ph.hi, pw.lo:pw.hi])
        if call.in_place:
            conv2d_forward(gy, w_sub, no_bias, False, out, call.geom)
        else:
            part = np.empty((geom.batch, c_I, ph.count, pw.count), dtype=dtype)
            conv2d_forward(gy, w_sub, no_bias, False, part, call.geom)
            out[:, :, ph.first::geom.stride_h, pw.first::geom.stride_w] = part
    return out


# --------------------------------------------------------------------------------------
# Weight gradient: pixel-vector dot products, 4 output channels x 6 taps per block
# --------------------------------------------------------------------------------------

_WG_CO = 4            # output channels per register block
_WG_TAPS = 6          # taps per register block
_WG_RUN_PIXELS = 1024  # pixels per run at most (merged and images runs)
_WG_PASS_PIXELS = 1024  # pixels per pass (the nearest whole number of runs): in L1/L2
_WG_TAP_BLOCKS = 16   # register blocks of taps per job (96 taps)
_WG_PART_PIXELS = 1 << 15  # pixels per part at most (accuracy: 2048 terms per lane)
_WG_MIN_JOBS = 16     # parts are added until there are this many jobs (if memory allows)
_PARTIAL_BYTES = 1 << 25  # partial-sum buffers at most (32 MiB; or one weight if larger)


@njit(cache=True)
def _pack_input(x, xp, pt, pl, s_W):
    """Zero-padded, channel-major, column-phase-split copy: xp[c, b, y, ph, j] =
    x_padded[b, c, y, j * s_W + ph] (the forward kernel's layout). With ``s_W == 1`` the
    rows move in vectors (masked at their ends: nothing past a row is read or written).
    Returns whether every copied value is finite (vectors: a sum of ``value * 0``, NaN
    otherwise)."""
    _prefer_wide_vectors()
    n, c_I, h, wd = x.shape
    h_P = xp.shape[2]
    w_Q = xp.shape[4]
    lanes = _VECTOR_BYTES // x.itemsize
    x_flat = x.reshape(-1)
    xp_flat = xp.reshape(-1)
    zero = _vzero(xp_flat)
    nonfinite = _vzero(xp_flat)      # stays zero while every value is finite
    finite = True
    inner = min(wd, w_Q - pl)        # input columns inside a packed row (s_W == 1)
    for c in range(c_I):
        for b in range(n):
            for y in range(h_P):
                iy = y - pt
                if s_W == 1:
                    dst = ((c * n + b) * h_P + y) * w_Q
                    if iy < 0 or iy >= h or pl > 0 or inner < w_Q:
                        for i in range(0, w_Q, lanes):
                            _vstore_first(xp_flat, dst + i, zero, min(lanes, w_Q - i))
                    if iy < 0 or iy >= h:
                        continue
                    src = ((b * c_I + c) * h + iy) * wd
                    for i in range(0, inner, lanes):
                        count = min(lanes, inner - i)
                        v = _vload_first(x_flat, src + i, count)
                        nonfinite = _vfmav(nonfinite, v, zero)
                        _vstore_first(xp_flat, dst + pl + i, v, count)
                    continue
                for ph in range(s_W):
                    for j in range(w_Q):
                        ix = j * s_W + ph - pl
                        if iy >= 0 and iy < h and ix >= 0 and ix < wd:
                            value = x[b, c, iy, ix]
                            if not np.isfinite(value):
                                finite = False
                            xp[c, b, y, ph, j] = value
                        else:
                            xp[c, b, y, ph, j] = 0
    lane_values = np.empty(lanes, dtype=x_flat.dtype)
    _vstore(lane_values, 0, nonfinite)
    for lane in range(lanes):
        if lane_values[lane] != 0:
            finite = False
    return finite


@njit(cache=True)
def _pack_grad_output(gy, gyp, image_stride, row_stride):
    """gy onto the runs of the weight-gradient kernel, zero elsewhere:
    gyp[o, b * image_stride + oy * row_stride + ox] = gy[b, o, oy, ox] (``row_stride >=
    w_O``). In vectors: each row is written whole (its tail zero), then the rest of the
    image's span; images in order, so a row that reaches into the next image's span is
    overwritten by it; nothing is written past a channel's end."""
    _prefer_wide_vectors()
    n, c_O, h_O, w_O = gy.shape
    length = gyp.shape[1]
    lanes = _VECTOR_BYTES // gy.itemsize
    gy_flat = gy.reshape(-1)
    gyp_flat = gyp.reshape(-1)
    zero = _vzero(gyp_flat)
    for o in range(c_O):
        end = (o + 1) * length
        for b in range(n):
            base = o * length + b * image_stride
            for oy in range(h_O):
                src = ((b * c_O + o) * h_O + oy) * w_O
                dst = base + oy * row_stride
                for i in range(0, min(row_stride, end - dst), lanes):
                    _vstore_first(gyp_flat, dst + i,
                                  _vload_first(gy_flat, src + i, max(0, min(lanes, w_O - i))),
                                  min(lanes, row_stride - i, end - dst - i))
            stop = end if b == n - 1 else base + image_stride
            for i in range(base + h_O * row_stride, stop, lanes):
                _vstore_first(gyp_flat, i, zero, min(lanes, stop - i))
        if n == 0:
            for i in range(o * length, end, lanes):
                _vstore_first(gyp_flat, i, zero, min(lanes, end - i))


@njit(cache=True)
def _wg_block(xf, x0, x1, x2, x3, x4, x5, gyp, g0, g1, g2, g3, mask, masked, r0, r1,
              rows_per_img, img_stride, row_stride, g_stride, m_stride, n_vec, lanes, tile,
              tile_base, first):
    """Register block of the weight gradient: 4 channels (gy runs at g0..g3) x 6 taps
    (input runs at x0..x5), over the runs ``r0 <= r < r1``. Run ``r`` (image ``b``, its run
    ``oy = r - b * rows_per_img`` there) has ``n_vec`` vectors of pixels starting at
    ``b * img_stride + oy * row_stride`` in the input, ``r * g_stride`` in gy and
    ``oy * m_stride`` in the mask (if ``masked``, input lanes with mask 0 load as zero; the
    branch goes the same way for a whole call). The 24 vector
    accumulators ``tile[tile_base + (k * 6 + t) * lanes ...]`` (k channel, t tap) start at
    zero if ``first``, else at the tile's values, and are stored back at the end."""
    _prefer_wide_vectors()
    if first:
        a00 = _vzero(xf)
        a01 = _vzero(xf)
        a02 = _vzero(xf)
        a03 = _vzero(xf)
        a04 = _vzero(xf)
        a05 = _vzero(xf)
        a10 = _vzero(xf)
        a11 = _vzero(xf)
        a12 = _vzero(xf)
        a13 = _vzero(xf)
        a14 = _vzero(xf)
        a15 = _vzero(xf)
        a20 = _vzero(xf)
        a21 = _vzero(xf)
        a22 = _vzero(xf)
        a23 = _vzero(xf)
        a24 = _vzero(xf)
        a25 = _vzero(xf)
        a30 = _vzero(xf)
        a31 = _vzero(xf)
        a32 = _vzero(xf)
        a33 = _vzero(xf)
        a34 = _vzero(xf)
        a35 = _vzero(xf)
    else:
        a00 = _vload(tile, tile_base + 0 * lanes)
        a01 = _vload(tile, tile_base + 1 * lanes)
        a02 = _vload(tile, tile_base + 2 * lanes)
        a03 = _vload(tile, tile_base + 3 * lanes)
        a04 = _vload(tile, tile_base + 4 * lanes)
        a05 = _vload(tile, tile_base + 5 * lanes)
        a10 = _vload(tile, tile_base + 6 * lanes)
        a11 = _vload(tile, tile_base + 7 * lanes)
        a12 = _vload(tile, tile_base + 8 * lanes)
        a13 = _vload(tile, tile_base + 9 * lanes)
        a14 = _vload(tile, tile_base + 10 * lanes)
        a15 = _vload(tile, tile_base + 11 * lanes)
        a20 = _vload(tile, tile_base + 12 * lanes)
        a21 = _vload(tile, tile_base + 13 * lanes)
        a22 = _vload(tile, tile_base + 14 * lanes)
        a23 = _vload(tile, tile_base + 15 * lanes)
        a24 = _vload(tile, tile_base + 16 * lanes)
        a25 = _vload(tile, tile_base + 17 * lanes)
        a30 = _vload(tile, tile_base + 18 * lanes)
        a31 = _vload(tile, tile_base + 19 * lanes)
        a32 = _vload(tile, tile_base + 20 * lanes)
        a33 = _vload(tile, tile_base + 21 * lanes)
        a34 = _vload(tile, tile_base + 22 * lanes)
        a35 = _vload(tile, tile_base + 23 * lanes)
    b = r0 // rows_per_img
    oy = r0 - b * rows_per_img
    for r in range(r0, r1):
        xb = b * img_stride + oy * row_stride
        gb = r * g_stride
        mb = oy * m_stride
        oy += 1
        if oy == rows_per_img:
            oy = 0
            b += 1
        for j in range(n_vec):
            p = j * lanes
            m = mb + p
            if masked:
                v0 = _vload_masked(xf, xb + x0 + p, mask, m)
                v1 = _vload_masked(xf, xb + x1 + p, mask, m)
                v2 = _vload_masked(xf, xb + x2 + p, mask, m)
                v3 = _vload_masked(xf, xb + x3 + p, mask, m)
                v4 = _vload_masked(xf, xb + x4 + p, mask, m)
                v5 = _vload_masked(xf, xb + x5 + p, mask, m)
            else:
                v0 = _vload(xf, xb + x0 + p)
                v1 = _vload(xf, xb + x1 + p)
                v2 = _vload(xf, xb + x2 + p)
                v3 = _vload(xf, xb + x3 + p)
                v4 = _vload(xf, xb + x4 + p)
                v5 = _vload(xf, xb + x5 + p)
            g = _vload(gyp, gb + g0 + p)
            a00 = _vfmav(a00, g, v0)
            a01 = _vfmav(a01, g, v1)
            a02 = _vfmav(a02, g, v2)
            a03 = _vfmav(a03, g, v3)
            a04 = _vfmav(a04, g, v4)
            a05 = _vfmav(a05, g, v5)
            g = _vload(gyp, gb + g1 + p)
            a10 = _vfmav(a10, g, v0)
            a11 = _vfmav(a11, g, v1)
            a12 = _vfmav(a12, g, v2)
            a13 = _vfmav(a13, g, v3)
            a14 = _vfmav(a14, g, v4)
            a15 = _vfmav(a15, g, v5)
            g = _vload(gyp, gb + g2 + p)
            a20 = _vfmav(a20, g, v0)
            a21 = _vfmav(a21, g, v1)
            a22 = _vfmav(a22, g, v2)
            a23 = _vfmav(a23, g, v3)
            a24 = _vfmav(a24, g, v4)
            a25 = _vfmav(a25, g, v5)
            g = _vload(gyp, gb + g3 + p)
            a30 = _vfmav(a30, g, v0)
            a31 = _vfmav(a31, g, v1)
            a32 = _vfmav(a32, g, v2)
            a33 = _vfmav(a33, g, v3)
            a34 = _vfmav(a34, g, v4)
            a35 = _vfmav(a35, g, v5)
    _vstore(tile, tile_base + 0 * lanes, a00)
    _vstore(tile, tile_base + 1 * lanes, a01)
    _vstore(tile, tile_base + 2 * lanes, a02)
    _vstore(tile, tile_base + 3 * lanes, a03)
    _vstore(tile, tile_base + 4 * lanes, a04)
    _vstore(tile, tile_base + 5 * lanes, a05)
    _vstore(tile, tile_base + 6 * lanes, a10)
    _vstore(tile, tile_base + 7 * lanes, a11)
    _vstore(tile, tile_base + 8 * lanes, a12)
    _vstore(tile, tile_base + 9 * lanes, a13)
    _vstore(tile, tile_base + 10 * lanes, a14)
    _vstore(tile, tile_base + 11 * lanes, a15)
    _vstore(tile, tile_base + 12 * lanes, a20)
    _vstore(tile, tile_base + 13 * lanes, a21)
    _vstore(tile, tile_base + 14 * lanes, a22)
    _vstore(tile, tile_base + 15 * lanes, a23)
    _vstore(tile, tile_base + 16 * lanes, a24)
    _vstore(tile, tile_base + 17 * lanes, a25)
    _vstore(tile, tile_base + 18 * lanes, a30)
    _vstore(tile, tile_base + 19 * lanes, a31)
    _vstore(tile, tile_base + 20 * lanes, a32)
    _vstore(tile, tile_base + 21 * lanes, a33)
    _vstore(tile, tile_base + 22 * lanes, a34)
    _vstore(tile, tile_base + 23 * lanes, a35)


@njit(parallel=True, cache=True)
def _wg_kernel(xf, tap_off, gyp, mask, masked, dest, tiles, groups, c_Og, n_taps,
               group_stride, n_rows, part_rows, pass_rows, rows_per_img, img_stride,
               row_stride, g_stride, m_stride, n_vec):
    """Jobs (part, group, block of 4 channels, group of tap blocks); dest[part, o, tap]
    (``dest.shape[0] == 1``: dest is the output itself, viewed as (1, c_O, taps))."""
    lanes = _VECTOR_BYTES // xf.itemsize
    # per thread: the accumulators of the job's register blocks, then their lane sums
    sums_base = (_WG_TAP_BLOCKS * _WG_CO * _WG_TAPS + lanes) * lanes
    co_blocks = -(-c_Og // _WG_CO)
    tap_blocks = tap_off.shape[0] // _WG_TAPS
    tap_groups = -(-tap_blocks // _WG_TAP_BLOCKS)
    n_parts = dest.shape[0]
    jobs_per_part = groups * co_blocks * tap_groups
    n_jobs = n_parts * jobs_per_part
    n_threads = tiles.shape[0]
    block_size = _WG_CO * _WG_TAPS * lanes
    for thread in prange(n_threads):
        tile = tiles[thread]
        for job in range(thread, n_jobs, n_threads):
            # channel blocks vary fastest: consecutive jobs share the tap group's input
            # (kept in cache) and stream the smaller gy rows
            part = job // jobs_per_part
            rest = job - part * jobs_per_part
            cb = rest % co_blocks
            rest = rest // co_blocks
            tg = rest % tap_groups
            g = rest // tap_groups
            r_lo = part * part_rows
            r_hi = min(r_lo + part_rows, n_rows)
            tb0 = tg * _WG_TAP_BLOCKS
            tb1 = min(tb0 + _WG_TAP_BLOCKS, tap_blocks)
            co0 = g * c_Og + cb * _WG_CO
            co1 = min(co0 + _WG_CO, (g + 1) * c_Og)
            # channels past the block's end repeat its last channel (computed, dropped)
            g0 = co0 * gyp.shape[1]
            g1 = min(co0 + 1, co1 - 1) * gyp.shape[1]
            g2 = min(co0 + 2, co1 - 1) * gyp.shape[1]
            g3 = min(co0 + 3, co1 - 1) * gyp.shape[1]
            x_group = g * group_stride
            for q in range(r_lo, r_hi, pass_rows):
                q1 = min(q + pass_rows, r_hi)
                for tb in range(tb0, tb1):
                    t = tb * _WG_TAPS
                    _wg_block(xf, x_group + tap_off[t], x_group + tap_off[t + 1],
                              x_group + tap_off[t + 2], x_group + tap_off[t + 3],
                              x_group + tap_off[t + 4], x_group + tap_off[t + 5],
                              gyp, g0, g1, g2, g3, mask, masked, q, q1, rows_per_img,
                              img_stride, row_stride, g_stride, m_stride, n_vec, lanes, tile,
                              (tb - tb0) * block_size, q == r_lo)
            # lane sums (a fixed tree), then the valid (channel, tap) pairs to dest
            n_vectors = (tb1 - tb0) * _WG_CO * _WG_TAPS
            for v in range(0, n_vectors, lanes):
                _vsum_lanes(tile, v * lanes, tile, sums_base + v)
            for tb in range(tb0, tb1):
                for k in range(co1 - co0):
                    for i in range(_WG_TAPS):
                        t = tb * _WG_TAPS + i
                        if t < n_taps:
                            dest[part, co0 + k, t] = tile[
                                sums_base + (tb - tb0) * _WG_CO * _WG_TAPS + k * _WG_TAPS + i]


@njit(parallel=True, cache=True)
def _sum_parts(partial, out):
    """out[i] = partial[0, i] + partial[1, i] + ... in part order."""
    n_parts = partial.shape[0]
    size = partial.shape[1]
    chunk = 4096
    for c in prange(-(-size // chunk)):
        for i in range(c * chunk, min(size, (c + 1) * chunk)):
            s = partial[0, i]
            for p in range(1, n_parts):
                s += partial[p, i]
            out[i] = s


class _WgLayout(NamedTuple):
    runs: str             # "merged", "images" or "rows" (see _wg_layout)
    h_P: int              # rows per image of the packed input
    w_Q: int              # columns per row of the packed input (per column phase)
    channel_stride: int   # elements per input channel in the packed input
    x_size: int           # elements of the packed input, slack included
    n_rows: int           # runs
    run_pixels: int       # pixels per run (a multiple of the vector length)
    runs_per_image: int   # runs of one image ("rows_per_img" of the kernel)
    image_stride: int     # elements from one image to the next in the packed input
    run_stride: int       # elements from one run of an image to the next, packed input
    gy_image_stride: int  # elements from one image to the next in the packed gy
    gy_row_stride: int    # elements from one output row to the next in the packed gy
    part_rows: int
    n_parts: int
    pass_rows: int
    gy_len: int           # elements per channel of the packed gy
    mask_len: int
    mask_stride: int      # mask elements from one run of an image to the next
    n_taps: int           # taps per group (c_I/g * k_H * k_W)
    padded_taps: int      # rounded up to whole register blocks
    tile: int             # per-thread tile elements


def _merged_pixels(geom, lanes):
    """Virtual pixels of the merged runs (stride 1) and the grid they lie on."""
    h_P = max(geom.in_height + max(geom.pad_top, geom.pad_bottom), geom.out_height)
    w_Q = max(geom.in_width + max(geom.pad_left, geom.pad_right), geom.out_width)
    used = ((geom.batch - 1) * h_P + geom.out_height - 1) * w_Q + geom.out_width
    n_rows = -(-used // _WG_RUN_PIXELS)
    run_pixels = -(-(-(-used // n_rows)) // lanes) * lanes
    return n_rows * run_pixels, h_P, w_Q, n_rows, run_pixels


def _image_runs(per_image, lanes):
    """Runs of one image's ``per_image`` pixels: as few as keep each within about
    ``_WG_RUN_PIXELS``, of equal length in whole vectors. Returns (runs, run_pixels)."""
    runs = -(-per_image // _WG_RUN_PIXELS)
    return runs, -(-(-(-per_image // runs)) // lanes) * lanes


def _parts(geom, itemsize, n_rows, pixels, part_pixels, jobs_per_part):
    """(rows per part, parts) of a weight gradient's ``n_rows`` runs: enough parts for
    accuracy (at most ``part_pixels`` of the ``pixels`` each) and for ``_WG_MIN_JOBS`` jobs,
    within the partial-sum memory bound; a function of the geometry only."""
    n_parts = max(-(-pixels // part_pixels), -(-_WG_MIN_JOBS // jobs_per_part))
    weight_bytes = geom.out_channels * geom.in_channels_per_group * (
        geom.kernel_height * geom.kernel_width) * itemsize
    n_parts = max(1, min(n_parts, n_rows, _PARTIAL_BYTES // weight_bytes))
    part_rows = -(-n_rows // n_parts)
    return part_rows, -(-n_rows // part_rows)


def _part_dest(out, geom, n_parts, n_taps):
    """Where a weight-gradient kernel writes part ``p``'s sums, ``dest[p, o, tap]``: the
    output itself (viewed as one part) when there is one part, else a partial-sum buffer
    that :func:`_sum_parts` adds into ``out``."""
    if n_parts == 1:
        return out.reshape(1, geom.out_channels, n_taps)
    return np.empty((n_parts, geom.out_channels, n_taps), dtype=out.dtype)


@functools.lru_cache(maxsize=256)  # per geometry: computed once, not per call
def _wg_layout(geom, itemsize, runs=None):
    """The weight gradient's runs (``runs`` forces ``"merged"`` or ``"images"`` on a
    stride-1 geometry, for the tests):

    - ``"merged"`` (stride 1): all output rows of all images form runs of about
      ``_WG_RUN_PIXELS`` virtual pixels on the padded grid ``h_P x w_Q`` (the pixels in the
      padding columns and rows are computed, with ``gy = 0``);
    - ``"images"`` (stride 1): the same grid, each image's rows its own runs, so no run
      crosses the padding rows between images; chosen when it computes fewer pixels than
      ``"merged"`` (DeepFace L6, 25 x 25 input, 5 x 5 kernel, no padding: 8 x 528 pixels
      instead of 4960, of which 8 x 441 are outputs; a 1 x 1 map keeps ``"merged"``);
    - ``"rows"`` (strides): one run per output row, rounded up to whole vectors.

    A pass is the nearest whole number of runs to ``_WG_PASS_PIXELS``.
    """
    lanes = _VECTOR_BYTES // itemsize
    n, s_H, s_W = geom.batch, geom.stride_h, geom.stride_w
    h_O, w_O = geom.out_height, geom.out_width
    d_H, d_W = geom.dilation_h, geom.dilation_w
    k_H, k_W = geom.kernel_height, geom.kernel_width
    if s_H == 1 and s_W == 1:
        merged_pixels, h_P, w_Q, n_rows, run_pixels = _merged_pixels(geom, lanes)
        image_runs, image_run = _image_runs((h_O - 1) * w_Q + w_O, lanes)
        pixels = {"merged": merged_pixels, "images": n * image_runs * image_run}
        if runs is None:
            runs = "images" if pixels["images"] < merged_pixels else "merged"
    else:
        pixels = {"rows": n * h_O * -(-w_O // lanes) * lanes}
        runs = "rows"
    if runs == "merged":
        # Rows and images share their padding (as the forward's merged layout): reads past
        # a row's end land in the next row's left padding.
        runs_per_image, image_stride, run_stride = n_rows, 0, run_pixels
        gy_image_stride, gy_row_stride = h_P * w_Q, w_Q
        channel_stride = n * h_P * w_Q
        max_tap = (k_H - 1) * d_H * w_Q + (k_W - 1) * d_W
        last_read = merged_pixels + max_tap
        mask_len, mask_stride = merged_pixels, run_pixels
    elif runs == "images":
        # The merged grid, one image at a time: no run crosses the padding rows between
        # images.
        runs_per_image, run_pixels = image_runs, image_run
        n_rows = n * runs_per_image
        image_stride, run_stride = h_P * w_Q, run_pixels
        gy_image_stride, gy_row_stride = runs_per_image * run_pixels, w_Q
        channel_stride = n * image_stride
        max_tap = (k_H - 1) * d_H * w_Q + (k_W - 1) * d_W
        last_read = (n - 1) * image_stride + runs_per_image * run_pixels + max_tap
        mask_len, mask_stride = runs_per_image * run_pixels, run_pixels
    elif runs == "rows":
        run_pixels = -(-w_O // lanes) * lanes
        n_rows = n * h_O
        h_P = (h_O - 1) * s_H + (k_H - 1) * d_H + 1
        w_needed = (w_O - 1) * s_W + (k_W - 1) * d_W + 1
        w_Q = -(-w_needed // s_W)
        runs_per_image = h_O
        image_stride = h_P * s_W * w_Q
        run_stride = s_H * s_W * w_Q
        gy_image_stride, gy_row_stride = h_O * run_pixels, run_pixels
        channel_stride = n * image_stride
        max_tap = (k_H - 1) * d_H * s_W * w_Q + max(
            (v * d_W) % s_W * w_Q + (v * d_W) // s_W for v in range(k_W))
        last_read = (n - 1) * image_stride + (h_O - 1) * run_stride + max_tap + run_pixels
        mask_len, mask_stride = run_pixels, 0
    x_size = max(geom.in_channels * channel_stride,
                 (geom.in_channels - 1) * channel_stride + last_read)
    pixels = pixels[runs]
    pass_rows = max(1, round(_WG_PASS_PIXELS / run_pixels))
    n_taps = geom.in_channels_per_group * k_H * k_W
    padded_taps = -(-n_taps // _WG_TAPS) * _WG_TAPS
    c_Og = geom.out_channels_per_group
    jobs_per_part = geom.groups * -(-c_Og // _WG_CO) * -(-(padded_taps // _WG_TAPS)
                                                         // _WG_TAP_BLOCKS)
    part_rows, n_parts = _parts(geom, itemsize, n_rows, pixels, _WG_PART_PIXELS,
                                jobs_per_part)
    vectors = _WG_TAP_BLOCKS * _WG_CO * _WG_TAPS + lanes   # whole groups of lane sums
    tile = vectors * lanes + vectors
    return _WgLayout(runs, h_P, w_Q, channel_stride, x_size, n_rows, run_pixels,
                     runs_per_image, image_stride, run_stride, gy_image_stride,
                     gy_row_stride, part_rows, n_parts, pass_rows, pixels, mask_len,
                     mask_stride, n_taps, padded_taps, tile)


@functools.lru_cache(maxsize=256)  # per geometry: computed once, not per call
def _wg_tap_offsets(geom, layout):
    """Offset in the packed input of each tap (c, u, v) of a group, padded to whole
    register blocks by repeating tap 0 (computed, dropped)."""
    s_W, w_Q = geom.stride_w, layout.w_Q
    c = np.arange(geom.in_channels_per_group).reshape(-1, 1, 1)
    u = np.arange(geom.kernel_height).reshape(1, -1, 1)
    v = np.arange(geom.kernel_width).reshape(1, 1, -1)
    row = u * geom.dilation_h
    col = v * geom.dilation_w
    offsets = (c * layout.channel_stride + row * s_W * w_Q
               + (col % s_W) * w_Q + col // s_W)
    offsets = offsets.reshape(-1)
    padded = np.full(layout.padded_taps, offsets[0], dtype=np.int64)
    padded[:offsets.size] = offsets
    return padded


@functools.lru_cache(maxsize=256)  # per geometry: computed once, not per call
def _wg_mask(geom, layout):
    p = np.arange(layout.mask_len)
    if layout.runs == "merged":
        col = p % layout.w_Q
        row = (p // layout.w_Q) % layout.h_P
        image = p // (layout.w_Q * layout.h_P)
        keep = (col < geom.out_width) & (row < geom.out_height) & (image < geom.batch)
    elif layout.runs == "images":
        keep = (p % layout.w_Q < geom.out_width) & (p // layout.w_Q < geom.out_height)
    else:
        keep = p < geom.out_width
    return keep.astype(np.uint8)


def conv2d_weight_grad_scratch_bytes(geom, itemsize):
    """Bytes of scratch :func:`conv2d_weight_grad` allocates beyond ``out``: the packed input
    and gy, the mask, per-thread tiles and the partial sums (none when ``P == 1``)."""
    if _wg_choice(geom, itemsize) == "channels":
        elements, padded_taps = _wgc_scratch_elements(geom, itemsize)
        return elements * itemsize + padded_taps * 8 * 4 + _SMALL_SCRATCH
    layout = _wg_layout(geom, itemsize)
    elements = (layout.x_size + geom.out_channels * layout.gy_len
                + _threads.count() * layout.tile)
    if layout.n_parts > 1:
        elements += layout.n_parts * geom.out_channels * layout.n_taps
    return (elements * itemsize + layout.mask_len + layout.padded_taps * 8 * 4
            + _SMALL_SCRATCH)


def _wg_pack_input(x, xf, geom, layout):
    packed = geom.in_channels * layout.channel_stride
    xf[packed:] = 0
    return _pack_input(x, xf[:packed].reshape(geom.in_channels, geom.batch, layout.h_P,
                                              geom.stride_w, layout.w_Q),
                       geom.pad_top, geom.pad_left, geom.stride_w)


def conv2d_weight_grad(x, grad_output, out, geom):
    """``out = d(sum(conv2d(x, w) * grad_output)) / dw``, every element written.

    ``x`` ``(n, c_I, h, w)``, ``grad_output`` ``(n, c_O, h_O, w_O)``, ``out``
    ``(c_O, c_I/g, k_H, k_W)``: C-contiguous, one dtype. Deterministic: the same bits on
    every call and for every thread count (see the module docstring).
    """
    itemsize = out.dtype.itemsize
    if _wg_choice(geom, itemsize) == "channels":
        return _weight_grad_channels(x, grad_output, out, geom, _wgc_layout(geom, itemsize))
    return _weight_grad(x, grad_output, out, geom, _wg_layout(geom, itemsize))


def _weight_grad(x, grad_output, out, geom, layout):
    """:func:`conv2d_weight_grad` on the runs of ``layout`` (a :func:`_wg_layout`)."""
    dtype = out.dtype
    xf = np.empty(layout.x_size, dtype=dtype)
    finite = _wg_pack_input(x, xf, geom, layout)
    gyp = np.empty((geom.out_channels, layout.gy_len), dtype=dtype)
    _pack_grad_output(grad_output, gyp, layout.gy_image_stride, layout.gy_row_stride)
    mask = _wg_mask(geom, layout)
    tap_off = _wg_tap_offsets(geom, layout)
    tiles = np.empty((_threads.count(), layout.tile), dtype=dtype)
    n_vec = layout.run_pixels // (_VECTOR_BYTES // dtype.itemsize)
    dest = _part_dest(out, geom, layout.n_parts, layout.n_taps)
    _wg_kernel(xf, tap_off, gyp, mask, not finite, dest, tiles, geom.groups,
               geom.out_channels_per_group, layout.n_taps,
               geom.in_channels_per_group * layout.channel_stride,
               layout.n_rows, layout.part_rows, layout.pass_rows, layout.runs_per_image,
               layout.image_stride, layout.run_stride, layout.run_pixels,
               layout.mask_stride, n_vec)
    if layout.n_parts > 1:
        _sum_parts(dest.reshape(layout.n_parts, -1), out.reshape(-1))
    return out


# --------------------------------------------------------------------------------------
# Weight gradient, channel vectors: 1 vector of output channels x 24 taps per block
# --------------------------------------------------------------------------------------
#
# The pixel-vector kernel above runs its vectors over the pixels of a padded grid: where an
# output row is short against that grid (DeepFace L6: rows of 21 on a grid of 25) or rounded
# up to whole vectors (strided layers: 7 of 16 lanes for a 7-pixel row) it computes pixels
# that are dropped. This kernel runs its vectors over the output channels instead and its
# loops over the real output pixels only: ``gw[o, t]`` for one vector of output channels
# ``o`` and a block of 24 taps ``t`` are 24 vector accumulators; per output pixel, one
# vector of ``dL/dy`` (transposed, pixel-major: ``gyt[block, pixel, lane]``) is loaded and
# the input value each tap reads there is broadcast against it. Nothing is computed for a
# pixel outside the output and no junk pixel reads the input, so there is nothing to mask:
# an Inf in the input reaches exactly the sums the definition puts it in (those of the
# padding taps read zero, as in the pixel-vector kernel). It is chosen where it computes
# fewer multiply-adds (:func:`_wg_choice`).
#
# Parallelism and order as above: the output rows are split into parts (a function of the
# geometry only); a job is (part, vector of output channels, block of taps) and adds its
# part's rows and pixels in order, one accumulator per (channel, tap): at most
# ``_WGC_PART_PIXELS`` terms each, as the pixel-vector kernel's lanes. Parts are added in
# order by :func:`_sum_parts`. The same bits on every call and for every thread count.

_WGC_TAPS = 24           # taps per register block
_WGC_PART_PIXELS = 2048  # output pixels per part at most (terms per accumulator)


class _WgcLayout(NamedTuple):
    h_P: int              # rows per image of the packed input
    w_Q: int              # columns per row of the packed input (per column phase)
    channel_stride: int   # elements per input channel in the packed input
    x_size: int           # elements of the packed input, slack included
    image_stride: int     # elements from one image to the next in the packed input
    run_stride: int       # elements from one output row to the next, packed input
    n_rows: int           # output rows of all images
    part_rows: int
    n_parts: int
    blocks_per_group: int  # vectors of output channels per group
    n_taps: int           # taps per group (c_I/g * k_H * k_W)
    padded_taps: int      # rounded up to whole register blocks


@functools.lru_cache(maxsize=256)  # per geometry: computed once, not per call
def _wgc_layout(geom, itemsize):
    """The channel-vector weight gradient's packed input (the pixel-vector kernel's
    ``"rows"`` layout: zero-padded, column-phase split, cropped to what the taps read) and
    its parts."""
    lanes = _VECTOR_BYTES // itemsize
    n, s_H, s_W = geom.batch, geom.stride_h, geom.stride_w
    h_O, w_O = geom.out_height, geom.out_width
    d_H, d_W = geom.dilation_h, geom.dilation_w
    k_H, k_W = geom.kernel_height, geom.kernel_width
    h_P = (h_O - 1) * s_H + (k_H - 1) * d_H + 1
    w_Q = -(-((w_O - 1) * s_W + (k_W - 1) * d_W + 1) // s_W)
    image_stride = h_P * s_W * w_Q
    run_stride = s_H * s_W * w_Q
    channel_stride = n * image_stride
    x_size = geom.in_channels * channel_stride
    n_rows = n * h_O
    n_taps = geom.in_channels_per_group * k_H * k_W
    padded_taps = -(-n_taps // _WGC_TAPS) * _WGC_TAPS
    blocks_per_group = -(-geom.out_channels_per_group // lanes)
    jobs_per_part = geom.groups * blocks_per_group * (padded_taps // _WGC_TAPS)
    part_rows, n_parts = _parts(geom, itemsize, n_rows, n_rows * w_O, _WGC_PART_PIXELS,
                                jobs_per_part)
    return _WgcLayout(h_P, w_Q, channel_stride, x_size, image_stride, run_stride, n_rows,
                      part_rows, n_parts, blocks_per_group, n_taps, padded_taps)


@functools.lru_cache(maxsize=256)  # per geometry: computed once, not per call
def _wg_choice(geom, itemsize):
    """``"channels"`` or ``"pixels"``: the weight-gradient kernel that computes fewer vector
    multiply-adds, counting the pixel-vector kernel's computed pixels (junk included) and
    blocks of 4 channels x 6 taps, and the channel-vector kernel's real pixels and blocks of
    one vector of channels x 24 taps; the pixel-vector kernel unless the other computes at
    most ``_WGC_SHARE`` of its count.

    >>> from gpuconv.geometry import conv_geometry
    >>> _wg_choice(conv_geometry((8, 16, 25, 25), (5, 5), 16), 4)  # DeepFace L6
    'channels'
    >>> _wg_choice(conv_geometry((8, 3, 32, 32), (3, 3), 4, padding=1), 4)
    'pixels'
    """
    lanes = _VECTOR_BYTES // itemsize
    pixels = _wg_layout(geom, itemsize)
    channels = _wgc_layout(geom, itemsize)
    c_Og = geom.out_channels_per_group
    pixel_cost = (-(-c_Og // _WG_CO) * _WG_CO * (pixels.gy_len // lanes)
                  * pixels.padded_taps)
    channel_cost = (channels.blocks_per_group * geom.batch * geom.out_height
                    * geom.out_width * channels.padded_taps)
    return "channels" if channel_cost <= _WGC_SHARE * pixel_cost else "pixels"


# The channel-vector kernel is chosen when it computes at most this share of the
# pixel-vector kernel's multiply-adds (measured: BENCHMARKS.md, "conv2d weight gradient:
# channel vectors").
_WGC_SHARE = 1.05


@njit(cache=True)
def _pack_grad_output_t(gy, gyt, c_Og, groups):
    """gyt[(g * bpg + j) * P + r * w_O + ox, k] = gy[b, g * c_Og + j * lanes + k, oy, ox]
    with ``r = b * h_O + oy``, ``P = n * h_O * w_O``, zero for ``j * lanes + k >= c_Og``:
    ``lanes x lanes`` blocks transposed in registers where a block is whole, element by
    element at the ends."""
    _prefer_wide_vectors()
    n, c_O, h_O, w_O = gy.shape
    lanes = _VECTOR_BYTES // gy.itemsize
    hw = h_O * w_O
    n_pix = n * hw
    bpg = -(-c_Og // lanes)
    gy_flat = gy.reshape(-1)
    gyt_flat = gyt.reshape(-1)
    for g in range(groups):
        for j in range(bpg):
            width = min(lanes, c_Og - j * lanes)
            o0 = g * c_Og + j * lanes
            blk = (g * bpg + j) * n_pix
            for b in range(n):
                src0 = (b * c_O + o0) * hw
                dst0 = (blk + b * hw) * lanes
                p = 0
                if width == lanes:
                    while p + lanes <= hw:
                        _vtranspose(gy_flat, src0 + p, hw, gyt_flat, dst0 + p * lanes)
                        p += lanes
                for q in range(p, hw):
                    for k in range(lanes):
                        gyt_flat[dst0 + q * lanes + k] = (gy_flat[src0 + k * hw + q]
                                                          if k < width else 0)


@njit(cache=True)
def _wgc_block(xf, tap_off, t0, x_group, gyt, g_base, r0, r1, h_O, w_O, image_stride,
               run_stride, lanes, buf):
    """Register block of the channel-vector weight gradient: one vector of output
    channels x 24 taps (``tap_off[t0:t0 + 24]``), over the output rows ``r0 <= r < r1``
    (image ``r // h_O``, its row ``r % h_O``) and each of their ``w_O`` pixels: per pixel
    one vector of dL/dy is loaded (``gyt[g_base + (r * w_O + ox) * lanes ...]``) and each
    tap's input value is broadcast against it (one fused multiply-add per tap). The
    24 accumulators start at zero, run over the rows and pixels in order, and are
    stored to ``buf[i * lanes ...]`` (tap ``t0 + i``)."""
    _prefer_wide_vectors()
    o0 = np.uint64(x_group + tap_off[t0 + 0])
    o1 = np.uint64(x_group + tap_off[t0 + 1])
    o2 = np.uint64(x_group + tap_off[t0 + 2])
    o3 = np.uint64(x_group + tap_off[t0 + 3])
    o4 = np.uint64(x_group + tap_off[t0 + 4])
    o5 = np.uint64(x_group + tap_off[t0 + 5])
    o6 = np.uint64(x_group + tap_off[t0 + 6])
    o7 = np.uint64(x_group + tap_off[t0 + 7])
    o8 = np.uint64(x_group + tap_off[t0 + 8])
    o9 = np.uint64(x_group + tap_off[t0 + 9])
    o10 = np.uint64(x_group + tap_off[t0 + 10])
    o11 = np.uint64(x_group + tap_off[t0 + 11])
    o12 = np.uint64(x_group + tap_off[t0 + 12])
    o13 = np.uint64(x_group + tap_off[t0 + 13])
    o14 = np.uint64(x_group + tap_off[t0 + 14])
    o15 = np.uint64(x_group + tap_off[t0 + 15])
    o16 = np.uint64(x_group + tap_off[t0 + 16])
    o17 = np.uint64(x_group + tap_off[t0 + 17])
    o18 = np.uint64(x_group + tap_off[t0 + 18])
    o19 = np.uint64(x_group + tap_off[t0 + 19])
    o20 = np.uint64(x_group + tap_off[t0 + 20])
    o21 = np.uint64(x_group + tap_off[t0 + 21])
    o22 = np.uint64(x_group + tap_off[t0 + 22])
    o23 = np.uint64(x_group + tap_off[t0 + 23])
    a0 = _vzero(xf)
    a1 = _vzero(xf)
    a2 = _vzero(xf)
    a3 = _vzero(xf)
    a4 = _vzero(xf)
    a5 = _vzero(xf)
    a6 = _vzero(xf)
    a7 = _vzero(xf)
    a8 = _vzero(xf)
    a9 = _vzero(xf)
    a10 = _vzero(xf)
    a11 = _vzero(xf)
    a12 = _vzero(xf)
    a13 = _vzero(xf)
    a14 = _vzero(xf)
    a15 = _vzero(xf)
    a16 = _vzero(xf)
    a17 = _vzero(xf)
    a18 = _vzero(xf)
    a19 = _vzero(xf)
    a20 = _vzero(xf)
    a21 = _vzero(xf)
    a22 = _vzero(xf)
    a23 = _vzero(xf)
    for r in range(r0, r1):
        b = r // h_O
        xb = b * image_stride + (r - b * h_O) * run_stride
        gb = g_base + r * w_O * lanes
        for ox in range(w_O):
            g = _vload(gyt, gb + ox * lanes)
            p = np.uint64(xb + ox)
            a0 = _vfma(a0, g, xf[p + o0])
            a1 = _vfma(a1, g, xf[p + o1])
            a2 = _vfma(a2, g, xf[p + o2])
            a3 = _vfma(a3, g, xf[p + o3])
            a4 = _vfma(a4, g, xf[p + o4])
            a5 = _vfma(a5, g, xf[p + o5])
            a6 = _vfma(a6, g, xf[p + o6])
            a7 = _vfma(a7, g, xf[p + o7])
            a8 = _vfma(a8, g, xf[p + o8])
            a9 = _vfma(a9, g, xf[p + o9])
            a10 = _vfma(a10, g, xf[p + o10])
            a11 = _vfma(a11, g, xf[p + o11])
            a12 = _vfma(a12, g, xf[p + o12])
            a13 = _vfma(a13, g, xf[p + o13])
            a14 = _vfma(a14, g, xf[p + o14])
            a15 = _vfma(a15, g, xf[p + o15])
            a16 = _vfma(a16, g, xf[p + o16])
            a17 = _vfma(a17, g, xf[p + o17])
            a18 = _vfma(a18, g, xf[p + o18])
            a19 = _vfma(a19, g, xf[p + o19])
            a20 = _vfma(a20, g, xf[p + o20])
            a21 = _vfma(a21, g, xf[p + o21])
            a22 = _vfma(a22, g, xf[p + o22])
            a23 = _vfma(a23, g, xf[p + o23])
    _vstore(buf, 0, a0)
    _vstore(buf, 1 * lanes, a1)
    _vstore(buf, 2 * lanes, a2)
    _vstore(buf, 3 * lanes, a3)
    _vstore(buf, 4 * lanes, a4)
    _vstore(buf, 5 * lanes, a5)
    _vstore(buf, 6 * lanes, a6)
    _vstore(buf, 7 * lanes, a7)
    _vstore(buf, 8 * lanes, a8)
    _vstore(buf, 9 * lanes, a9)
    _vstore(buf, 10 * lanes, a10)
    _vstore(buf, 11 * lanes, a11)
    _vstore(buf, 12 * lanes, a12)
    _vstore(buf, 13 * lanes, a13)
    _vstore(buf, 14 * lanes, a14)
    _vstore(buf, 15 * lanes, a15)
    _vstore(buf, 16 * lanes, a16)
    _vstore(buf, 17 * lanes, a17)
    _vstore(buf, 18 * lanes, a18)
    _vstore(buf, 19 * lanes, a19)
    _vstore(buf, 20 * lanes, a20)
    _vstore(buf, 21 * lanes, a21)
    _vstore(buf, 22 * lanes, a22)
    _vstore(buf, 23 * lanes, a23)


@njit(parallel=True, cache=True)
def _wgc_kernel(xf, tap_off, gyt, dest, bufs, groups, bpg, c_Og, n_taps, group_stride,
                n_rows, part_rows, h_O, w_O, image_stride, run_stride):
    """Jobs (part, group, vector of channels, block of taps); dest[part, o, tap]
    (``dest.shape[0] == 1``: dest is the output itself, viewed as (1, c_O, taps))."""
    lanes = _VECTOR_BYTES // xf.itemsize
    tap_blocks = tap_off.shape[0] // _WGC_TAPS
    n_parts = dest.shape[0]
    jobs_per_part = groups * bpg * tap_blocks
    n_jobs = n_parts * jobs_per_part
    n_threads = bufs.shape[0]
    n_pix = n_rows * w_O
    for thread in prange(n_threads):
        buf = bufs[thread]
        for job in range(thread, n_jobs, n_threads):
            # tap blocks vary fastest: consecutive jobs share the part's dL/dy
            part = job // jobs_per_part
            rest = job - part * jobs_per_part
            tb = rest % tap_blocks
            ob = rest // tap_blocks
            g = ob // bpg
            j = ob - g * bpg
            o0 = g * c_Og + j * lanes
            width = min(lanes, c_Og - j * lanes)
            r0 = part * part_rows
            r1 = min(r0 + part_rows, n_rows)
            t0 = tb * _WGC_TAPS
            _wgc_block(xf, tap_off, t0, g * group_stride, gyt, ob * n_pix * lanes, r0, r1,
                       h_O, w_O, image_stride, run_stride, lanes, buf)
            for i in range(min(_WGC_TAPS, n_taps - t0)):
                for k in range(width):
                    dest[part, o0 + k, t0 + i] = buf[i * lanes + k]


def _wgc_scratch_elements(geom, itemsize):
    layout = _wgc_layout(geom, itemsize)
    lanes = _VECTOR_BYTES // itemsize
    elements = (layout.x_size + geom.groups * layout.blocks_per_group * lanes * geom.batch
                * geom.out_height * geom.out_width + _threads.count() * _WGC_TAPS * lanes)
    if layout.n_parts > 1:
        elements += layout.n_parts * geom.out_channels * layout.n_taps
    return elements, layout.padded_taps


def _weight_grad_channels(x, grad_output, out, geom, layout):
    """:func:`conv2d_weight_grad` by the channel-vector kernel (``layout``: a
    :func:`_wgc_layout`)."""
    dtype = out.dtype
    lanes = _VECTOR_BYTES // dtype.itemsize
    xf = np.empty(layout.x_size, dtype=dtype)
    _pack_input(x, xf.reshape(geom.in_channels, geom.batch, layout.h_P, geom.stride_w,
                              layout.w_Q), geom.pad_top, geom.pad_left, geom.stride_w)
    c_Og = geom.out_channels_per_group
    n_pix = geom.batch * geom.out_height * geom.out_width
    gyt = np.empty((geom.groups * layout.blocks_per_group * n_pix, lanes), dtype=dtype)
    _pack_grad_output_t(grad_output, gyt, c_Og, geom.groups)
    tap_off = _wg_tap_offsets(geom, layout)
    bufs = np.empty((_threads.count(), _WGC_TAPS * lanes), dtype=dtype)
    dest = _part_dest(out, geom, layout.n_parts, layout.n_taps)
    _wgc_kernel(xf, tap_off, gyt, dest, bufs, geom.groups, layout.blocks_per_group, c_Og,
                layout.n_taps, geom.in_channels_per_group * layout.channel_stride,
                layout.n_rows, layout.part_rows, geom.out_height, geom.out_width,
                layout.image_stride, layout.run_stride)
    if layout.n_parts > 1:
        _sum_parts(dest.reshape(layout.n_parts, -1), out.reshape(-1))
    return out
