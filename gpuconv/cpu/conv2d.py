"""CPU kernel of the shared-weight convolution (design: :mod:`gpuconv.cpu`)."""


from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import numba
import numpy as np
from numba import njit, prange

from .simd import VECTOR_BYTES as _VECTOR_BYTES
from .simd import prefer_wide_vectors as _prefer_wide_vectors
from .simd import vfma as _vfma, vload as _vload, vstore as _vstore, vzero as _vzero

__all__ = ["conv2d_forward", "choose_cpu_kernel", "conv2d_scratch_bytes", "CpuKernel",
           "CPU_KERNELS"]

# Output channels per register block of the pixel-vector shared kernel (at most; a group's
# channels are split into even blocks).
_PVEC_CHANNELS = 6
# The channel-vector kernels fill vectors with output channels: with at most this many per
# group the pixel-vector kernel (blocks of _PVEC_CHANNELS) wastes fewer lanes.
_PVEC_MAX_CHANNELS = 12

# The kernel's variant numbers: 0 pixel-vector, 1 or 2 channel-vector with that many
# vectors of output channels.
_VECTORS = ("pvec", "cvec1", "cvec2")
_RUNS = ("merged", "rows")


@dataclass(frozen=True)
class CpuKernel:
    """A CPU kernel variant of :func:`conv2d_forward` (see :func:`choose_cpu_kernel`);
    ``str()`` gives its name, ``"<vector>-<runs>"``.

    >>> k = CpuKernel("cvec2", "merged")
    >>> str(k), k.merged
    ('cvec2-merged', True)
    """

    vector: str  # "pvec", "cvec1" or "cvec2"
    runs: str    # "merged" or "rows"

    def __post_init__(self):
        if self.vector not in _VECTORS or self.runs not in _RUNS:
            raise ValueError(f"no CPU kernel {self.vector!r}-{self.runs!r}")

    def __str__(self):
        return f"{self.vector}-{self.runs}"

    @property
    def merged(self):
        """Whether all output rows of all images form one run of virtual pixels."""
        return self.runs == "merged"


# Every variant, in the order of the kernel's variant numbers.
CPU_KERNELS = tuple(CpuKernel(vector, runs) for vector in _VECTORS for runs in _RUNS)


def choose_cpu_kernel(geom):
    """The CPU kernel variant (a :class:`CpuKernel`) that :func:`conv2d_forward` uses for a
    geometry; ``str()`` of it names it ``"<vector>-<runs>"``:

    - vector: ``"cvec2"`` (more than one float32 vector, 16, of output channels per group)
      or ``"cvec1"`` (13 to 16): two or one vectors of output channels times a block of 12
      or 24 output pixels; ``"pvec"`` (at most ``_PVEC_MAX_CHANNELS``, where channel vectors
      would be mostly empty): blocks of ``_PVEC_CHANNELS`` output channels times four
      vectors of consecutive output pixels. All three keep 24 vector accumulators in
      registers for a whole chunk of the reduction;
    - runs ``"merged"`` when ``stride == (1, 1)``: all output rows of all images form one run
      of virtual pixels on the padded grid (long runs even for 7 x 7 maps, at the price of
      computing the pixels that fall in the padding columns and rows, which are dropped);
      ``"rows"`` otherwise: one run per output row.

    >>> from gpuconv.geometry import conv_geometry
    >>> choose_cpu_kernel(conv_geometry((1, 3, 8, 8), (3, 3), 4))
    CpuKernel(vector='pvec', runs='merged')
    >>> str(choose_cpu_kernel(conv_geometry((1, 3, 8, 8), (3, 3), 16)))
    'cvec1-merged'
    >>> str(choose_cpu_kernel(conv_geometry((1, 3, 8, 8), (3, 3), 64, stride=2)))
    'cvec2-rows'
    """
    lanes = _VECTOR_BYTES // 4  # float32 lanes per vector
    c_Og = geom.out_channels_per_group
    if c_Og <= _PVEC_MAX_CHANNELS:
        vector = "pvec"
    else:
        vector = "cvec1" if c_Og <= lanes else "cvec2"
    runs = "merged" if geom.stride_h == 1 and geom.stride_w == 1 else "rows"
    return CpuKernel(vector, runs)


# --------------------------------------------------------------------------------------
# Shared weights
# --------------------------------------------------------------------------------------

@njit(cache=True)
def _pack_input(x, xp, pt, pl, s_W):
    """Zero-padded, channel-major, column-phase-split copy: xp[c, b, y, ph, j] =
    x_padded[b, c, y, j * s_W + ph]."""
    n, c_I, h, wd = x.shape
    h_P = xp.shape[2]
    w_Q = xp.shape[4]
    x_flat = x.reshape(-1)
    xp_flat = xp.reshape(-1)
    # Serial: a copy at memory speed, and one parallel region fewer per call (on a busy
    # machine each region waits for every thread to get a core).
    for c in range(c_I):
        for b in range(n):
            for y in range(h_P):
                iy = y - pt
                for ph in range(s_W):
                    dst = (((c * n + b) * h_P + y) * s_W + ph) * w_Q
                    # columns j with 0 <= j * s_W + ph - pl < wd
                    j_lo = min(w_Q, max(0, (pl - ph + s_W - 1) // s_W))
                    j_hi = min(w_Q, max(j_lo, (wd + pl - ph + s_W - 1) // s_W))
                    if iy < 0 or iy >= h:
                        j_hi = j_lo
                    for j in range(j_lo):
                        xp_flat[np.uint64(dst + j)] = 0
                    src = ((b * c_I + c) * h + iy) * wd + ph - pl
                    if s_W == 1:
                        for j in range(j_lo, j_hi):
                            xp_flat[np.uint64(dst + j)] = x_flat[np.uint64(src + j)]
                    else:
                        for j in range(j_lo, j_hi):
                            xp_flat[np.uint64(dst + j)] = x_flat[np.uint64(src + j * s_W)]
                    for j in range(j_hi, w_Q):
                        xp_flat[np.uint64(dst + j)] = 0


@njit(cache=True)
def _pack_weights(w, wp, c_Og):
    """wp[block, tap, k] = w[co, c, u, v] with co = the k-th channel of the block and
    tap = (c * k_H + u) * k_W + v; channels past the end of a group are zero."""
    c_O, c_Ig, k_H, k_W = w.shape
    block = wp.shape[2]
    blocks_per_group = wp.shape[0] // (c_O // c_Og)
    for blk in range(wp.shape[0]):
        g = blk // blocks_per_group
        co0 = g * c_Og + (blk % blocks_per_group) * block
        co1 = min(co0 + block, (g + 1) * c_Og)
        for c in range(c_Ig):
            for u in range(k_H):
                for v in range(k_W):
                    t = (c * k_H + u) * k_W + v
                    for k in range(block):
                        co = co0 + k
                        wp[blk, t, k] = w[co, c, u, v] if co < co1 else 0


# Pixels per register block of the channel-vector kernels: 24 accumulators (one or two
# vectors of output channels each) leave registers for the weights and one input value on a
# 32-register machine.
_PIXEL_BLOCK_1 = 24  # one vector of channels
_PIXEL_BLOCK_2 = 12  # two vectors of channels
# Taps per pass over a run of pixel blocks: the pass's weights (at most 16 KiB) stay in L1
# while they are applied to every block of the run.
_TAP_CHUNK_BYTES = 16384
# Pixel blocks per job (one run).
_RUN_BLOCKS = 8


@njit(cache=True)
def _conv2d_cvec2_block(xf, base, tap_off, t0, t1, wq, w_base, lanes, tile, tile_base, first):
    """Register block of the channel-vector kernel, two vectors of channels x 12 pixels.

    For p < 12 and k < 2 * lanes, with T the sum over taps t0 <= t < t1 of
    ``wq[w_base + t * 2 * lanes + k] * xf[base + tap_off[t] + p]``:
    ``tile[tile_base + p * 2 * lanes + k] = T`` if ``first``, else ``+= T``.
    Two weight vectors are loaded per tap and each input value is broadcast against them
    (the inner loop of Georganas et al.); the 24 accumulators stay in registers.
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
        a0_0 = _vload(tile, tile_base + 0 * step)
        a0_1 = _vload(tile, tile_base + 0 * step + 1 * lanes)
        a1_0 = _vload(tile, tile_base + 1 * step)
        a1_1 = _vload(tile, tile_base + 1 * step + 1 * lanes)
        a2_0 = _vload(tile, tile_base + 2 * step)
        a2_1 = _vload(tile, tile_base + 2 * step + 1 * lanes)
        a3_0 = _vload(tile, tile_base + 3 * step)
        a3_1 = _vload(tile, tile_base + 3 * step + 1 * lanes)
        a4_0 = _vload(tile, tile_base + 4 * step)
        a4_1 = _vload(tile, tile_base + 4 * step + 1 * lanes)
        a5_0 = _vload(tile, tile_base + 5 * step)
        a5_1 = _vload(tile, tile_base + 5 * step + 1 * lanes)
        a6_0 = _vload(tile, tile_base + 6 * step)
        a6_1 = _vload(tile, tile_base + 6 * step + 1 * lanes)
        a7_0 = _vload(tile, tile_base + 7 * step)
        a7_1 = _vload(tile, tile_base + 7 * step + 1 * lanes)
        a8_0 = _vload(tile, tile_base + 8 * step)
        a8_1 = _vload(tile, tile_base + 8 * step + 1 * lanes)
        a9_0 = _vload(tile, tile_base + 9 * step)
        a9_1 = _vload(tile, tile_base + 9 * step + 1 * lanes)
        a10_0 = _vload(tile, tile_base + 10 * step)
        a10_1 = _vload(tile, tile_base + 10 * step + 1 * lanes)
        a11_0 = _vload(tile, tile_base + 11 * step)
        a11_1 = _vload(tile, tile_base + 11 * step + 1 * lanes)
    for t in range(t0, t1):
        o = np.uint64(base + tap_off[t])
        wo = w_base + t * step
        w0 = _vload(wq, wo)
        w1 = _vload(wq, wo + 1 * lanes)
        x = xf[o]
        a0_0 = _vfma(a0_0, w0, x)
        a0_1 = _vfma(a0_1, w1, x)
        x = xf[o + np.uint64(1)]
        a1_0 = _vfma(a1_0, w0, x)
        a1_1 = _vfma(a1_1, w1, x)
        x = xf[o + np.uint64(2)]
        a2_0 = _vfma(a2_0, w0, x)
        a2_1 = _vfma(a2_1, w1, x)
        x = xf[o + np.uint64(3)]
        a3_0 = _vfma(a3_0, w0, x)
        a3_1 = _vfma(a3_1, w1, x)
        x = xf[o + np.uint64(4)]
        a4_0 = _vfma(a4_0, w0, x)
        a4_1 = _vfma(a4_1, w1, x)
        x = xf[o + np.uint64(5)]
        a5_0 = _vfma(a5_0, w0, x)
        a5_1 = _vfma(a5_1, w1, x)
        x = xf[o + np.uint64(6)]
        a6_0 = _vfma(a6_0, w0, x)
        a6_1 = _vfma(a6_1, w1, x)
        x = xf[o + np.uint64(7)]
        a7_0 = _vfma(a7_0, w0, x)
        a7_1 = _vfma(a7_1, w1, x)
        x = xf[o + np.uint64(8)]
        a8_0 = _vfma(a8_0, w0, x)
        a8_1 = _vfma(a8_1, w1, x)
        x = xf[o + np.uint64(9)]
        a9_0 = _vfma(a9_0, w0, x)
        a9_1 = _vfma(a9_1, w1, x)
        x = xf[o + np.uint64(10)]
        a10_0 = _vfma(a10_0, w0, x)
        a10_1 = _vfma(a10_1, w1, x)
        x = xf[o + np.uint64(11)]
        a11_0 = _vfma(a11_0, w0, x)
        a11_1 = _vfma(a11_1, w1, x)
    _vstore(tile, tile_base + 0 * step, a0_0)
    _vstore(tile, tile_base + 0 * step + 1 * lanes, a0_1)
    _vstore(tile, tile_base + 1 * step, a1_0)
    _vstore(tile, tile_base + 1 * step + 1 * lanes, a1_1)
    _vstore(tile, tile_base + 2 * step, a2_0)
    _vstore(tile, tile_base + 2 * step + 1 * lanes, a2_1)
    _vstore(tile, tile_base + 3 * step, a3_0)
    _vstore(tile, tile_base + 3 * step + 1 * lanes, a3_1)
    _vstore(tile, tile_base + 4 * step, a4_0)
    _vstore(tile, tile_base + 4 * step + 1 * lanes, a4_1)
    _vstore(tile, tile_base + 5 * step, a5_0)
    _vstore(tile, tile_base + 5 * step + 1 * lanes, a5_1)
    _vstore(tile, tile_base + 6 * step, a6_0)
    _vstore(tile, tile_base + 6 * step + 1 * lanes, a6_1)
    _vstore(tile, tile_base + 7 * step, a7_0)
    _vstore(tile, tile_base + 7 * step + 1 * lanes, a7_1)
    _vstore(tile, tile_base + 8 * step, a8_0)
    _vstore(tile, tile_base + 8 * step + 1 * lanes, a8_1)
    _vstore(tile, tile_base + 9 * step, a9_0)
    _vstore(tile, tile_base + 9 * step + 1 * lanes, a9_1)
    _vstore(tile, tile_base + 10 * step, a10_0)
    _vstore(tile, tile_base + 10 * step + 1 * lanes, a10_1)
    _vstore(tile, tile_base + 11 * step, a11_0)
    _vstore(tile, tile_base + 11 * step + 1 * lanes, a11_1)


@njit(cache=True)
def _conv2d_cvec1_block(xf, base, tap_off, t0, t1, wq, w_base, lanes, tile, tile_base, first):
    """Register block of the channel-vector kernel, one vector of channels x 24 pixels
    (for layers with at most one vector of output channels); as :func:`_conv2d_cvec2_block`.
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
        a0_0 = _vload(tile, tile_base + 0 * step)
        a1_0 = _vload(tile, tile_base + 1 * step)
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
        o = np.uint64(base + tap_off[t])
        wo = w_base + t * step
        w0 = _vload(wq, wo)
        x = xf[o]
        a0_0 = _vfma(a0_0, w0, x)
        x = xf[o + np.uint64(1)]
        a1_0 = _vfma(a1_0, w0, x)
        x = xf[o + np.uint64(2)]
        a2_0 = _vfma(a2_0, w0, x)
        x = xf[o + np.uint64(3)]
        a3_0 = _vfma(a3_0, w0, x)
        x = xf[o + np.uint64(4)]
        a4_0 = _vfma(a4_0, w0, x)
        x = xf[o + np.uint64(5)]
        a5_0 = _vfma(a5_0, w0, x)
        x = xf[o + np.uint64(6)]
        a6_0 = _vfma(a6_0, w0, x)
        x = xf[o + np.uint64(7)]
        a7_0 = _vfma(a7_0, w0, x)
        x = xf[o + np.uint64(8)]
        a8_0 = _vfma(a8_0, w0, x)
        x = xf[o + np.uint64(9)]
        a9_0 = _vfma(a9_0, w0, x)
        x = xf[o + np.uint64(10)]
        a10_0 = _vfma(a10_0, w0, x)
        x = xf[o + np.uint64(11)]
        a11_0 = _vfma(a11_0, w0, x)
        x = xf[o + np.uint64(12)]
        a12_0 = _vfma(a12_0, w0, x)
        x = xf[o + np.uint64(13)]
        a13_0 = _vfma(a13_0, w0, x)
        x = xf[o + np.uint64(14)]
        a14_0 = _vfma(a14_0, w0, x)
        x = xf[o + np.uint64(15)]
        a15_0 = _vfma(a15_0, w0, x)
        x = xf[o + np.uint64(16)]
        a16_0 = _vfma(a16_0, w0, x)
        x = xf[o + np.uint64(17)]
        a17_0 = _vfma(a17_0, w0, x)
        x = xf[o + np.uint64(18)]
        a18_0 = _vfma(a18_0, w0, x)
        x = xf[o + np.uint64(19)]
        a19_0 = _vfma(a19_0, w0, x)
        x = xf[o + np.uint64(20)]
        a20_0 = _vfma(a20_0, w0, x)
        x = xf[o + np.uint64(21)]
        a21_0 = _vfma(a21_0, w0, x)
        x = xf[o + np.uint64(22)]
        a22_0 = _vfma(a22_0, w0, x)
        x = xf[o + np.uint64(23)]
        a23_0 = _vfma(a23_0, w0, x)
    _vstore(tile, tile_base + 0 * step, a0_0)
    _vstore(tile, tile_base + 1 * step, a1_0)
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
def _conv2d_pvec_block(xf, base, tap_off, t0, t1, wq, w_base, width, lanes, tile,
                       tile_base, channel_step, first):
    """Register block of the pixel-vector kernel: ``width`` (1 to 6) output channels x 4
    vectors of pixels.

    For k < width and p < 4 * lanes, with T the sum over taps t0 <= t < t1 of
    ``wq[w_base + t * width + k] * xf[base + tap_off[t] + p]``:
    ``tile[tile_base + k * channel_step + p] = T`` if ``first``, else ``+= T``.
    Four input vectors (consecutive pixels) are loaded per tap and each weight is broadcast
    against them; the (up to) 24 accumulators stay in registers. The tests on ``width``
    inside the tap loop always go the same way and cost next to nothing. For layers with few output
    channels, which would leave most lanes of a channel vector empty.
    """
    _prefer_wide_vectors()
    step = channel_step
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
        a0_0 = _vload(tile, tile_base + 0 * step + 0 * lanes)
        a0_1 = _vload(tile, tile_base + 0 * step + 1 * lanes)
        a0_2 = _vload(tile, tile_base + 0 * step + 2 * lanes)
        a0_3 = _vload(tile, tile_base + 0 * step + 3 * lanes)
        a1_0 = _vload(tile, tile_base + 1 * step + 0 * lanes)
        a1_1 = _vload(tile, tile_base + 1 * step + 1 * lanes)
        a1_2 = _vload(tile, tile_base + 1 * step + 2 * lanes)
        a1_3 = _vload(tile, tile_base + 1 * step + 3 * lanes)
        a2_0 = _vload(tile, tile_base + 2 * step + 0 * lanes)
        a2_1 = _vload(tile, tile_base + 2 * step + 1 * lanes)
        a2_2 = _vload(tile, tile_base + 2 * step + 2 * lanes)
        a2_3 = _vload(tile, tile_base + 2 * step + 3 * lanes)
        a3_0 = _vload(tile, tile_base + 3 * step + 0 * lanes)
        a3_1 = _vload(tile, tile_base + 3 * step + 1 * lanes)
        a3_2 = _vload(tile, tile_base + 3 * step + 2 * lanes)
        a3_3 = _vload(tile, tile_base + 3 * step + 3 * lanes)
        a4_0 = _vload(tile, tile_base + 4 * step + 0 * lanes)
        a4_1 = _vload(tile, tile_base + 4 * step + 1 * lanes)
        a4_2 = _vload(tile, tile_base + 4 * step + 2 * lanes)
        a4_3 = _vload(tile, tile_base + 4 * step + 3 * lanes)
        a5_0 = _vload(tile, tile_base + 5 * step + 0 * lanes)
        a5_1 = _vload(tile, tile_base + 5 * step + 1 * lanes)
        a5_2 = _vload(tile, tile_base + 5 * step + 2 * lanes)
        a5_3 = _vload(tile, tile_base + 5 * step + 3 * lanes)
    for t in range(t0, t1):
        o = base + tap_off[t]
        x0 = _vload(xf, o + 0 * lanes)
        x1 = _vload(xf, o + 1 * lanes)
        x2 = _vload(xf, o + 2 * lanes)
        x3 = _vload(xf, o + 3 * lanes)
        wo = np.uint64(w_base + t * width)
        w = wq[wo]
        a0_0 = _vfma(a0_0, x0, w)
        a0_1 = _vfma(a0_1, x1, w)
        a0_2 = _vfma(a0_2, x2, w)
        a0_3 = _vfma(a0_3, x3, w)
        if width > 1:
            w = wq[wo + np.uint64(1)]
            a1_0 = _vfma(a1_0, x0, w)
            a1_1 = _vfma(a1_1, x1, w)
            a1_2 = _vfma(a1_2, x2, w)
            a1_3 = _vfma(a1_3, x3, w)
        if width > 2:
            w = wq[wo + np.uint64(2)]
            a2_0 = _vfma(a2_0, x0, w)
            a2_1 = _vfma(a2_1, x1, w)
            a2_2 = _vfma(a2_2, x2, w)
            a2_3 = _vfma(a2_3, x3, w)
        if width > 3:
            w = wq[wo + np.uint64(3)]
            a3_0 = _vfma(a3_0, x0, w)
            a3_1 = _vfma(a3_1, x1, w)
            a3_2 = _vfma(a3_2, x2, w)
            a3_3 = _vfma(a3_3, x3, w)
        if width > 4:
            w = wq[wo + np.uint64(4)]
            a4_0 = _vfma(a4_0, x0, w)
            a4_1 = _vfma(a4_1, x1, w)
            a4_2 = _vfma(a4_2, x2, w)
            a4_3 = _vfma(a4_3, x3, w)
        if width > 5:
            w = wq[wo + np.uint64(5)]
            a5_0 = _vfma(a5_0, x0, w)
            a5_1 = _vfma(a5_1, x1, w)
            a5_2 = _vfma(a5_2, x2, w)
            a5_3 = _vfma(a5_3, x3, w)
    _vstore(tile, tile_base + 0 * step + 0 * lanes, a0_0)
    _vstore(tile, tile_base + 0 * step + 1 * lanes, a0_1)
    _vstore(tile, tile_base + 0 * step + 2 * lanes, a0_2)
    _vstore(tile, tile_base + 0 * step + 3 * lanes, a0_3)
    _vstore(tile, tile_base + 1 * step + 0 * lanes, a1_0)
    _vstore(tile, tile_base + 1 * step + 1 * lanes, a1_1)
    _vstore(tile, tile_base + 1 * step + 2 * lanes, a1_2)
    _vstore(tile, tile_base + 1 * step + 3 * lanes, a1_3)
    _vstore(tile, tile_base + 2 * step + 0 * lanes, a2_0)
    _vstore(tile, tile_base + 2 * step + 1 * lanes, a2_1)
    _vstore(tile, tile_base + 2 * step + 2 * lanes, a2_2)
    _vstore(tile, tile_base + 2 * step + 3 * lanes, a2_3)
    _vstore(tile, tile_base + 3 * step + 0 * lanes, a3_0)
    _vstore(tile, tile_base + 3 * step + 1 * lanes, a3_1)
    _vstore(tile, tile_base + 3 * step + 2 * lanes, a3_2)
    _vstore(tile, tile_base + 3 * step + 3 * lanes, a3_3)
    _vstore(tile, tile_base + 4 * step + 0 * lanes, a4_0)
    _vstore(tile, tile_base + 4 * step + 1 * lanes, a4_1)
    _vstore(tile, tile_base + 4 * step + 2 * lanes, a4_2)
    _vstore(tile, tile_base + 4 * step + 3 * lanes, a4_3)
    _vstore(tile, tile_base + 5 * step + 0 * lanes, a5_0)
    _vstore(tile, tile_base + 5 * step + 1 * lanes, a5_1)
    _vstore(tile, tile_base + 5 * step + 2 * lanes, a5_2)
    _vstore(tile, tile_base + 5 * step + 3 * lanes, a5_3)


@njit(parallel=True, cache=True)
def _conv2d_kernel(xf, tap_off, wq, variant, block, bias, has_bias, out, tiles, groups, c_Ig,
                   h_P, s_H, s_W, w_Q, merged):
    """The shared-weight kernel around a register block ``variant`` (0: pixel-vector,
    1 or 2: channel-vector with that many vectors of channels). Jobs are (run of pixel
    blocks, block of output channels); each job runs the reduction in L1-sized chunks of
    taps over all the pixel blocks of its run, then scatters its tiles to the output."""
    n, c_O, h_O, w_O = out.shape
    c_Og = c_O // groups
    n_taps = tap_off.shape[0]
    lanes = _VECTOR_BYTES // wq.itemsize
    if variant == 0:
        px = 4 * lanes                          # pixels per block
    else:
        px = _PIXEL_BLOCK_1 if variant == 1 else _PIXEL_BLOCK_2
    tap_chunk = max(1, _TAP_CHUNK_BYTES // (block * wq.itemsize))
    blocks_per_group = -(-c_Og // block)
    n_blocks = blocks_per_group * groups
    channel_stride = n * h_P * s_W * w_Q
    run_len = _RUN_BLOCKS * px
    if merged:
        total = ((n - 1) * h_P + h_O - 1) * w_Q + w_O
        runs = (total + run_len - 1) // run_len
        runs_per_row = 1
    else:
        runs_per_row = (w_O + run_len - 1) // run_len
        runs = n * h_O * runs_per_row
        total = 0
    n_jobs = runs * n_blocks
    n_threads = tiles.shape[0]
    tile_step = px * block
    out_flat = out.reshape(-1)
    for thread in prange(n_threads):
        tile = tiles[thread]
        for job in range(thread, n_jobs, n_threads):
            blk = job % n_blocks
            run = job // n_blocks
            g = blk // blocks_per_group
            co0 = g * c_Og + (blk % blocks_per_group) * block
            co1 = min(co0 + block, (g + 1) * c_Og)
            group_base = g * c_Ig * channel_stride
            w_base = blk * n_taps * block
            if merged:
                v_start = run * run_len
                v_end = min(v_start + run_len, total)
                row_base = group_base
                r = v_start // w_Q
                ox = v_start - r * w_Q
                b = r // h_P
                oy = r - b * h_P
            else:
                row = run // runs_per_row
                b = row // h_O
                oy = row - b * h_O
                v_start = (run % runs_per_row) * run_len
                v_end = min(v_start + run_len, w_O)
                row_base = group_base + ((b * h_P + oy * s_H) * s_W) * w_Q
                ox = v_start
            n_px_blocks = (v_end - v_start + px - 1) // px
            for t0 in range(0, n_taps, tap_chunk):
                t1 = min(t0 + tap_chunk, n_taps)
                for j in range(n_px_blocks):
                    base = row_base + v_start + j * px
                    if variant == 0:
                        # channel-major over the whole run: tile[k * run_len + i]
                        _conv2d_pvec_block(xf, base, tap_off, t0, t1, wq, w_base, block,
                                           lanes, tile, j * px, run_len, t0 == 0)
                    elif variant == 1:
                        _conv2d_cvec1_block(xf, base, tap_off, t0, t1, wq, w_base, lanes,
                                            tile, j * tile_step, t0 == 0)
                    else:
                        _conv2d_cvec2_block(xf, base, tap_off, t0, t1, wq, w_base, lanes,
                                            tile, j * tile_step, t0 == 0)
            # Scatter the run's tiles to the output, one stretch of an output row at a time.
            i0 = 0
            while i0 < v_end - v_start:
                stretch = v_end - v_start - i0
                if merged:
                    stretch = min(stretch, w_Q - ox)
                valid = min(stretch, w_O - ox) if oy < h_O else 0
                for co in range(co0, co1):
                    k = co - co0
                    o = ((b * c_O + co) * h_O + oy) * w_O + ox
                    add = bias[co, 0, 0] if has_bias else 0
                    if variant == 0:
                        t = k * run_len + i0
                        for q in range(valid):
                            out_flat[np.uint64(o + q)] = tile[np.uint64(t + q)] + add
                    else:
                        t = i0 * block + k
                        for q in range(valid):
                            out_flat[np.uint64(o + q)] = tile[np.uint64(t + q * block)] + add
                i0 += stretch
                ox += stretch
                if merged and ox == w_Q:
                    ox = 0
                    oy += 1
                    if oy == h_P:
                        oy = 0
                        b += 1


def _tap_offsets(geom, h_P, w_Q):
    """Offset in the packed input of each tap (c, u, v) of one group, tap-major as in
    :func:`_pack_weights`."""
    s_W = geom.stride_w
    channel_stride = geom.batch * h_P * s_W * w_Q
    c = np.arange(geom.in_channels_per_group).reshape(-1, 1, 1)
    u = np.arange(geom.kernel_height).reshape(1, -1, 1)
    v = np.arange(geom.kernel_width).reshape(1, 1, -1)
    col = v * geom.dilation_w
    offsets = (c * channel_stride + (u * geom.dilation_h) * s_W * w_Q
               + (col % s_W) * w_Q + col // s_W)
    return np.ascontiguousarray(offsets.reshape(-1), dtype=np.int64)


class _Conv2dLayout(NamedTuple):
    """Sizes of the shared kernel's repacked buffers for one geometry (see conv2d_forward)."""

    variant: int          # 0: pvec, 1: cvec1, 2: cvec2
    merged: bool          # stride-1 layout whose rows and images share their padding
    h_P: int
    w_Q: int
    packed_size: int      # elements of the padded, phase-split input
    slack: int            # zero elements after it
    block: int            # output channels per register block
    blocks_per_group: int
    n_taps: int
    tile: int             # per-thread scratch elements


def _conv2d_layout(geom, itemsize):
    s_H, s_W = geom.stride_h, geom.stride_w
    kernel = choose_cpu_kernel(geom)
    variant = _VECTORS.index(kernel.vector)
    merged = kernel.merged
    lanes = _VECTOR_BYTES // itemsize
    pixel_block = max(_PIXEL_BLOCK_1, _PIXEL_BLOCK_2, 4 * lanes)
    if merged:
        # Stride 1: one zero column between neighbouring rows serves as the right padding of
        # one and the left padding of the next (likewise rows between images), so fewer
        # virtual pixels fall in the padding: 8 x 8 instead of 9 x 9 for a 7 x 7 map.
        # Reads past the end of a row (image) land in the next one's left (top) padding.
        h_P = max(geom.in_height + max(geom.pad_top, geom.pad_bottom), geom.out_height)
        w_Q = max(geom.in_width + max(geom.pad_left, geom.pad_right), geom.out_width)
        slack = (max(geom.pad_top, geom.pad_bottom) + 1) * w_Q + pixel_block
    else:
        # Padded rows and phase columns that any output pixel reads.
        h_P = (geom.out_height - 1) * s_H + (geom.kernel_height - 1) * geom.dilation_h + 1
        w_needed = (geom.out_width - 1) * s_W + (geom.kernel_width - 1) * geom.dilation_w + 1
        w_Q = -(-w_needed // s_W)
        # The kernels compute whole pixel blocks: past the last pixel they read (and drop)
        # less than a pixel block beyond the packed input.
        slack = pixel_block
    packed_size = geom.in_channels * geom.batch * h_P * s_W * w_Q
    n_taps = geom.in_channels_per_group * geom.kernel_height * geom.kernel_width
    if variant == 0:
        # Even blocks of at most _PVEC_CHANNELS: 10 channels as 2 x 5, not 6 + 4.
        c_Og = geom.out_channels_per_group
        block = -(-c_Og // -(-c_Og // _PVEC_CHANNELS))
    else:
        block = variant * lanes
    blocks_per_group = -(-geom.out_channels_per_group // block)
    tile = _RUN_BLOCKS * max(_PIXEL_BLOCK_1 * lanes, 2 * _PIXEL_BLOCK_2 * lanes,
                             4 * lanes * _PVEC_CHANNELS)
    return _Conv2dLayout(variant, merged, h_P, w_Q, packed_size, slack, block,
                         blocks_per_group, n_taps, tile)


_SMALL_SCRATCH = 1 << 16  # array headers, the bias placeholder, index temporaries


def conv2d_scratch_bytes(geom, itemsize):
    """Bytes of scratch :func:`conv2d_forward` allocates beyond its output (the public layer
    checks them against free memory before the call): the padded input, the repacked
    weights and one tile of accumulators per thread."""
    layout = _conv2d_layout(geom, itemsize)
    weights = layout.blocks_per_group * geom.groups * layout.n_taps * layout.block
    tap_offsets = 4 * layout.n_taps * 8  # the int64 offsets and their temporaries
    return ((layout.packed_size + layout.slack + weights
             + numba.get_num_threads() * layout.tile) * itemsize + tap_offsets + _SMALL_SCRATCH)


def conv2d_forward(x, weight, bias, has_bias, out, geom):
    """Shared-weight convolution into ``out`` (all arrays C-contiguous, one dtype).

    Repacks the input (zero-padded, phase-split, plus a little zero slack) and the weights
    (blocks of output channels) inside the call; :func:`scratch_bytes` says how much memory
    that takes (about the padded input's size).
    """
    layout = _conv2d_layout(geom, x.dtype.itemsize)
    variant, merged, block = layout.variant, layout.merged, layout.block
    h_P, w_Q, s_H, s_W = layout.h_P, layout.w_Q, geom.stride_h, geom.stride_w
    packed_size = layout.packed_size
    xf = np.empty(packed_size + layout.slack, dtype=x.dtype)
    xf[packed_size:] = 0
    xp = xf[:packed_size].reshape(geom.in_channels, geom.batch, h_P, s_W, w_Q)
    _pack_input(x, xp, geom.pad_top, geom.pad_left, s_W)
    tap_off = _tap_offsets(geom, h_P, w_Q)
    wq = np.empty((layout.blocks_per_group * geom.groups, layout.n_taps, block), dtype=x.dtype)
    _pack_weights(weight, wq, geom.out_channels_per_group)
    tiles = np.empty((numba.get_num_threads(), layout.tile), dtype=x.dtype)
    _conv2d_kernel(xf, tap_off, wq.reshape(-1), variant, block, bias, has_bias, out, tiles,
                   geom.groups, geom.in_channels_per_group, h_P, s_H, s_W, w_Q, merged)
    return out

