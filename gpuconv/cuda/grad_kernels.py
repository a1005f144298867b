"""CUDA kernels (Numba) for the gradients of conv2d and local_conv2d, and their launch shapes.

Same habits as :mod:`gpuconv.cuda.kernels`: each factory is memoised on exactly the
compile-time constants that change the generated code and names the kernel by them; flat
arrays indexed with non-negative 64-bit offsets; typed accumulators in the compute type
(float32 for ``"f16"``: float16 converted once on load, rounded once on store; shared
memory stages float32, so a float16 kernel has the float32 kernel's launch shape); no
fastmath; every ``*_config(geom, dtype)`` is a pure function of the geometry (no GPU).

No kernel here uses atomics: every output element is summed by one thread in a fixed order
(the conv2d weight gradient in two fixed-order steps, per slice of the batch x positions
and then over the slices), so two calls with the same inputs give bitwise equal results.

Notation as in :mod:`gpuconv.geometry`; ``gy`` is the gradient of the output
``(n, c_O, h_O, w_O)``, ``gx`` that of the input ``(n, c_I, h, w)``.

Strided input gradients are split into stride phases: the input rows ``iy = r_y + s_H * u``
(``0 <= r_y < s_H``) receive from tap ``k_y`` exactly when ``r_y + p_top - k_y * d_H`` is a
multiple of ``s_H``, and then from output row ``u + (r_y + p_top - k_y * d_H) / s_H``. On
the sub-grid of one phase the gather is a stride-1 correlation with a fixed set of taps, so
a block works on one phase: which taps apply is the same for all its threads (no divergence)
and neighbouring threads read neighbouring words.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import numpy as np

from numba import cuda, int64, types, uint64

from .spec import (_COMPUTE, _NUMPY, _SCALAR, GRID_YZ_LIMIT, LOCAL_STAGE_BYTES,
                   SHARED_BUDGET_BYTES, SHARED_LIMIT_BYTES, KernelSpec, _array,
                   _conv2d_launch_bounds, _even_split, _pow2_at_least, _rename,
                   _stage_itemsize, check_grid, compute_code, dtype_code)

__all__ = ["conv2d_input_grad_kernel", "conv2d_input_grad_config", "Conv2dInputGradConfig",
           "conv2d_weight_grad_kernel", "conv2d_weight_grad_config", "Conv2dWeightGradConfig",
           "conv2d_weight_grad_scratch_elements", "sum_slices_kernel",
           "local_conv2d_input_grad_kernel", "local_conv2d_input_grad_config",
           "LocalInputGradConfig", "local_conv2d_weight_grad_kernel",
           "local_conv2d_weight_grad_config", "LocalWeightGradConfig", "grad_specialisations",
           "PARTIAL_BUDGET_BYTES", "partial_dtype"]


def _odd(value):
    """``value`` or ``value + 1``, whichever is odd: a shared-memory row stride at which the
    32 threads of a warp reading one word per row hit 32 different banks."""
    return value | 1


def _phase_origin(r, p, k, d, s):
    """Lowest tile offset (floor) any tap reaches in phase ``r``: ``(r + p - (k-1)*d) // s``."""
    return (r + p - (k - 1) * d) // s


# --------------------------------------------------------------------------------------------
# conv2d input gradient: a gather over the stride phases, shared-memory tiles
# --------------------------------------------------------------------------------------------

@functools.lru_cache(maxsize=None)
def conv2d_input_grad_kernel(code, kernel_h, kernel_w, rows, cols, channels):
    """Input gradient of conv2d, specialised on dtype, kernel size and register block.

    A block takes one stride phase ``(r_y, r_x)`` and a tile of its sub-grid (see the module
    docstring); a thread owns ``rows x cols`` input pixels of the tile (spread by the block
    size, so neighbouring threads read neighbouring words) and ``channels`` input channels.
    For each stage of ``chunk`` output channels the block loads into shared memory the
    ``gy`` tile its pixels read (zeros outside the output) and the weights
    ``w[co, c, :, :]`` of its input channels; each tap the phase uses then costs
    ``channels`` broadcast reads and ``rows * cols`` conflict-free reads for
    ``rows * cols * channels`` multiply-adds.

    Launch: ``grid = (tiles * s_H * s_W, groups * ceil(c_Ig / channels), min(n, 65535))``
    (the phase varies fastest, so the phases of one tile run together and share its ``gy``
    in L2), ``block = (bx, by)``, dynamic shared memory
    ``chunk * (gt_h * gt_w + channels * k_H * k_W) * itemsize`` bytes (compute type) with
    the ``gy`` tile
    ``gt_h = by * rows + (k_H - 1) * d_H // s_H + 1`` (same for W).

    Kernel arguments: flat ``gy (n, c_O, h_O, w_O)``, ``weight (c_O, c_Ig, k_H, k_W)``,
    ``gx (n, c_I, h, w)`` (written), then ``n, c_I, h, w, c_O, h_O, w_O, c_Ig, c_Og, s_H,
    s_W, p_top, p_left, d_H, d_W, tiles_x, gt_h, gt_w, chunk``.
    """
    store, scalar = _SCALAR[code], _COMPUTE[code]
    KH, KW, RY, RX, CB = kernel_h, kernel_w, rows, cols, channels
    KHW = KH * KW
    WCH = CB * KHW   # weights of one output channel in a stage
    NPOS = RY * RX
    NACC = NPOS * CB

    def kernel(gy, weight, gx, n, c_I, h, wd, c_O, h_O, w_O, c_Ig, c_Og, s_H, s_W, pt, pl,
               d_H, d_W, tiles_x, gt_h, gt_w, chunk):
        # A tile kernel: every thread takes part in the shared-memory stages, so the bounds
        # guard sits on the stores, not at the top.
        tx = cuda.threadIdx.x
        ty = cuda.threadIdx.y
        bx = cuda.blockDim.x
        by = cuda.blockDim.y
        tid = ty * bx + tx
        nthreads = bx * by
        gt_hw = gt_h * gt_w

        phases = s_H * s_W
        phase = cuda.blockIdx.x % phases
        tile = cuda.blockIdx.x // phases
        ry = phase // s_W
        rx = phase - ry * s_W
        u0 = (tile // tiles_x) * (by * RY)
        v0 = (tile % tiles_x) * (bx * RX)
        blocks_per_group = (c_Ig + CB - 1) // CB
        g = cuda.blockIdx.y // blocks_per_group
        cl0 = (cuda.blockIdx.y % blocks_per_group) * CB  # first input channel, in the group
        n_cl = min(CB, c_Ig - cl0)
        ey_lo = (ry + pt - (KH - 1) * d_H) // s_H   # floor: the tile's first row and column
        ex_lo = (rx + pl - (KW - 1) * d_W) // s_W   # relative to the phase tile's origin
        oy_lo = u0 + ey_lo
        ox_lo = v0 + ex_lo

        # Column of the gy tile tap kx reads, -1 where the tap misses this phase: the same
        # for every thread of the block (so are the rows, found in the tap loop).
        tcol = cuda.local.array(KW, dtype=int64)
        for kx in range(KW):
            a = rx + pl - kx * d_W
            tcol[kx] = -1
            if a % s_W == 0:
                tcol[kx] = a // s_W - ex_lo
        base = cuda.local.array(NPOS, dtype=int64)
        for i in range(RY):
            for j in range(RX):
                base[i * RX + j] = (ty + i * by) * gt_w + tx + j * bx

        smem = cuda.shared.array(0, dtype=scalar)
        w_base = chunk * gt_hw  # weights follow the gy tiles in shared memory
        acc = cuda.local.array(NACC, dtype=scalar)
        wreg = cuda.local.array(CB, dtype=scalar)

        for b in range(cuda.blockIdx.z, n, cuda.gridDim.z):
            for a in range(NACC):
                acc[a] = scalar(0)  # keep the math in the compute type
            for c0 in range(0, c_Og, chunk):
                nc = min(chunk, c_Og - c0)
                # Stage the gy tiles of nc output channels, zeros outside the output.
                for c in range(nc):
                    plane = (b * c_O + g * c_Og + c0 + c) * h_O
                    for r in range(ty, gt_h, by):
                        oy = oy_lo + r
                        row = (plane + oy) * w_O
                        srow = c * gt_hw + r * gt_w
                        for col in range(tx, gt_w, bx):
                            ox = ox_lo + col
                            v = scalar(0)
                            if oy >= 0 and oy < h_O and ox >= 0 and ox < w_O:
                                v = scalar(gy[uint64(row + ox)])
                            smem[uint64(srow + col)] = v
                # ... and their weights for this block's input channels, [c][q][ky][kx].
                for e in range(tid, nc * WCH, nthreads):
                    c = e // WCH
                    rest = e - c * WCH
                    q = rest // KHW
                    t = rest - q * KHW
                    # Channels past the group's end reread the last one; their sums are
                    # never stored.
                    qq = min(q, n_cl - 1)
                    src = ((g * c_Og + c0 + c) * c_Ig + cl0 + qq) * KHW + t
                    smem[uint64(w_base + e)] = scalar(weight[uint64(src)])
                cuda.syncthreads()
                for c in range(nc):
                    for ky in range(KH):
                        a = ry + pt - ky * d_H
                        if a % s_H == 0:
                            ro = (a // s_H - ey_lo) * gt_w  # row offset in the gy tile
                            for kx in range(KW):
                                co = tcol[kx]
                                if co >= 0:
                                    wofs = w_base + c * WCH + ky * KW + kx
                                    for q in range(CB):
                                        wreg[q] = smem[uint64(wofs + q * KHW)]
                                    gofs = c * gt_hw + ro + co
                                    for p in range(NPOS):
                                        gv = smem[uint64(gofs + base[p])]
                                        for q in range(CB):
                                            acc[p * CB + q] += gv * wreg[q]
                # Wait until everyone is done with the stage before the next overwrites it.
                cuda.syncthreads()
            plane = h * wd
            first = (b * c_I + g * c_Ig + cl0) * plane
            for i in range(RY):
                iy = ry + s_H * (u0 + ty + i * by)
                for j in range(RX):
                    ix = rx + s_W * (v0 + tx + j * bx)
                    if iy < h and ix < wd:
                        ofs = first + iy * wd + ix
                        for q in range(CB):
                            if q < n_cl:
                                gx[uint64(ofs)] = store(acc[(i * RX + j) * CB + q])
                            ofs += plane

    name = f"conv2d_igrad_{code}_k{KH}x{KW}_r{RY}x{RX}_c{CB}"
    signature = (_array(code, 1),) * 3 + (types.int64,) * 19
    return KernelSpec(name, _rename(kernel, name), signature, _conv2d_launch_bounds(NACC))


class Conv2dInputGradConfig(NamedTuple):
    """Compile-time constants and launch shape of one conv2d input-gradient call."""

    kernel: KernelSpec
    block: tuple       # (bx, by)
    grid: tuple        # (tiles * phases, channel blocks, batch blocks)
    tiles_x: int
    gt_h: int
    gt_w: int
    chunk: int         # output channels per shared-memory stage
    shared_bytes: int


def conv2d_input_grad_config(geom, dtype):
    """Specialisation and launch shape of the conv2d input gradient (pure, no GPU).

    The forward's choices on the phase sub-grid (``ceil(h / s_H) x ceil(w / s_W)``): register
    block ``2 x 4`` (float32, sub-grid wider than 32) or ``2 x 2`` pixels x up to 8 (float32)
    or 4 (float64) input channels; at most 16 x 8 threads, shrunk to the sub-grid and (down
    to one warp) to keep one output channel's stage within half the shared-memory budget;
    as many output channels per stage as fit the budget. float16 takes the float32 choices.
    """
    code = dtype_code(dtype)
    fp32 = compute_code(code) == "f32"
    itemsize = _stage_itemsize(code)
    kh, kw = geom.kernel_height, geom.kernel_width
    s_H, s_W = geom.stride_h, geom.stride_w
    hu, wu = -(-geom.in_height // s_H), -(-geom.in_width // s_W)
    rows = 2
    cols = 4 if fp32 and wu > 32 else 2
    channels = _even_split(geom.in_channels_per_group, 8 if fp32 else 4)
    bx = _pow2_at_least(-(-wu // cols), 16)
    by = _pow2_at_least(-(-hu // rows), 8)
    while bx * by < 32 and (bx < 32 or by < 32):
        if bx <= by and bx < 32:
            bx *= 2
        else:
            by *= 2

    def tile_dims(bx, by):
        return (by * rows + (kh - 1) * geom.dilation_h // s_H + 1,
                bx * cols + (kw - 1) * geom.dilation_w // s_W + 1)

    def stage_bytes(bx, by):
        gt_h, gt_w = tile_dims(bx, by)
        return (gt_h * gt_w + kh * kw * channels) * itemsize

    while (stage_bytes(bx, by) > SHARED_BUDGET_BYTES // 2 and bx * by > 32) or \
            (stage_bytes(bx, by) > SHARED_LIMIT_BYTES and bx * by > 1):
        if by >= bx:
            by //= 2
        else:
            bx //= 2
    if stage_bytes(bx, by) > SHARED_LIMIT_BYTES:
        raise ValueError(
            f"the conv2d input gradient on the GPU needs one output channel's window in "
            f"shared memory: {stage_bytes(bx, by)} bytes for this kernel size, stride and "
            f"dilation exceeds {SHARED_LIMIT_BYTES}; use device='cpu'")
    gt_h, gt_w = tile_dims(bx, by)
    per_channel = gt_h * gt_w + kh * kw * channels
    chunk = max(1, min(geom.out_channels_per_group,
                       SHARED_BUDGET_BYTES // (per_channel * itemsize)))
    tiles_y = -(-hu // (by * rows))
    tiles_x = -(-wu // (bx * cols))
    grid = check_grid((tiles_y * tiles_x * s_H * s_W,
                       geom.groups * -(-geom.in_channels_per_group // channels),
                       max(1, min(geom.batch, GRID_YZ_LIMIT))), "the conv2d input gradient")
    spec = conv2d_input_grad_kernel(code, kh, kw, rows, cols, channels)
    return Conv2dInputGradConfig(spec, (bx, by), grid, tiles_x, gt_h, gt_w, chunk,
                                 chunk * per_channel * itemsize)


# --------------------------------------------------------------------------------------------
# conv2d weight gradient: implicit-im2col GEMM over slices of batch x positions, then a
# fixed-order sum of the slices
# --------------------------------------------------------------------------------------------

@functools.lru_cache(maxsize=None)
def conv2d_weight_grad_kernel(code, co_tile, k_tile, rows, cols, chunk):
    """Weight gradient of conv2d over one slice of the batch x positions, specialised on
    dtype and tile shape.

    The gradient is a product ``gw[co, k] = sum_m gy[co, m] * X[m, k]`` with ``m`` running
    over the ``n * P`` (image, position) pairs and ``k`` over ``(c, k_y, k_x)``; ``X`` is the
    input's im2col, never built: the block gathers its ``chunk x k_tile`` part into shared
    memory for each chunk of ``m`` (zeros in the padding), next to the ``chunk x co_tile``
    part of ``gy``, and each thread accumulates ``rows x cols`` entries (output channels
    ``ty + i * TY``, k ``tx + j * TX``). Consecutive threads load consecutive positions, so
    the ``gy`` loads and (at stride 1) the input loads are coalesced; the shared rows are
    padded to odd strides.

    The grid's z index is the slice: block ``z`` sums ``m`` in ``[z * m_slice,
    (z + 1) * m_slice)`` in order and writes its partial sum to ``part[z]``, laid out as
    the weights (``(slices, c_O, c_Ig, k_H, k_W)``), in the compute type; with one slice
    of float32 or float64, ``part`` is the output. :func:`sum_slices_kernel` then adds the
    slices in order (for float16 also a single one: it rounds the float32 sums once, as it
    stores them).

    Launch: ``grid = (ceil(K / k_tile), groups * ceil(c_Og / co_tile), slices)`` with
    ``K = c_Ig * k_H * k_W``, ``block = (k_tile // cols, co_tile // rows)``; static shared
    memory.

    Kernel arguments: flat ``x (n, c_I, h, w)``, ``gy (n, c_O, h_O, w_O)``, ``part``
    (written, of the compute type), then ``c_I, h, w, c_O, h_O, w_O, c_Ig, c_Og, s_H, s_W,
    p_top, p_left, d_H, d_W, k_H, k_W, m_total, m_slice``.
    """
    scalar = _COMPUTE[code]
    CO_T, K_T, RC, RK, MC = co_tile, k_tile, rows, cols, chunk
    TY, TX = CO_T // RC, K_T // RK
    NT = TX * TY
    assert TY * RC == CO_T and TX * RK == K_T and NT % MC == 0, (CO_T, K_T, RC, RK, MC)
    KSTEP = NT // MC      # a thread loads k (or co) = tid // MC, + KSTEP, ... of position tid % MC
    COP, KTP = _odd(CO_T), _odd(K_T)
    NACC = RC * RK

    def kernel(x, gy, part, c_I, h, wd, c_O, h_O, w_O, c_Ig, c_Og, s_H, s_W, pt, pl, d_H, d_W,
               kh, kw, m_total, m_slice):
        tx = cuda.threadIdx.x
        ty = cuda.threadIdx.y
        tid = ty * TX + tx
        n_pos = h_O * w_O
        khw = kh * kw
        k_total = c_Ig * khw
        k0 = cuda.blockIdx.x * K_T
        co_tiles = (c_Og + CO_T - 1) // CO_T
        g = cuda.blockIdx.y // co_tiles
        col0 = (cuda.blockIdx.y % co_tiles) * CO_T  # first output channel, in the group
        s = cuda.blockIdx.z
        m_start = s * m_slice
        m_end = min(m_start + m_slice, m_total)

        gys = cuda.shared.array((MC, COP), dtype=scalar)
        xs = cuda.shared.array((MC, KTP), dtype=scalar)
        # Per k of the tile: input plane offset (-1 past K), row and column offsets.
        ktab = cuda.shared.array((3, K_T), dtype=int64)
        for kl in range(tid, K_T, NT):
            k = k0 + kl
            plane = -1
            ky = 0
            kx = 0
            if k < k_total:
                c = k // khw
                t = k - c * khw
                ky = t // kw
                kx = t - ky * kw
                plane = c * h * wd
            ktab[0, kl] = plane
            ktab[1, kl] = ky * d_H
            ktab[2, kl] = kx * d_W

        ml = tid % MC
        kfirst = tid // MC
        acc = cuda.local.array(NACC, dtype=scalar)
        areg = cuda.local.array(RC, dtype=scalar)
        breg = cuda.local.array(RK, dtype=scalar)
        for a in range(NACC):
            acc[a] = scalar(0)  # keep the math in the compute type
        for m0 in range(m_start, m_end, MC):  # the same trip count in every thread
            # This thread's (image, position) of the chunk.
            m = m0 + ml
            m_ok = m < m_end
            b = m // n_pos
            p = m - b * n_pos
            oy = p // w_O
            ox = p - oy * w_O
            x_base = (b * c_I + g * c_Ig) * h * wd
            iy0 = oy * s_H - pt
            ix0 = ox * s_W - pl
            g_base = (b * c_O + g * c_Og + col0) * n_pos + p
            # Wait until the previous chunk has been read (and, the first time, the k table
            # has been written).
            cuda.syncthreads()
            for cl in range(kfirst, CO_T, KSTEP):
                v = scalar(0)
                if m_ok and col0 + cl < c_Og:
                    v = scalar(gy[uint64(g_base + cl * n_pos)])
                gys[ml, cl] = v
            for kl in range(kfirst, K_T, KSTEP):
                v = scalar(0)
                plane = ktab[0, kl]
                if m_ok and plane >= 0:
                    iy = iy0 + ktab[1, kl]
                    ix = ix0 + ktab[2, kl]
                    if iy >= 0 and iy < h and ix >= 0 and ix < wd:
                        v = scalar(x[uint64(x_base + plane + iy * wd + ix)])
                xs[ml, kl] = v
            cuda.syncthreads()
            for mm in range(MC):
                for i in range(RC):
                    areg[i] = gys[mm, ty + i * TY]
                for j in range(RK):
                    breg[j] = xs[mm, tx + j * TX]
                for i in range(RC):
                    for j in range(RK):
                        acc[i * RK + j] += areg[i] * breg[j]
        for i in range(RC):
            cl = col0 + ty + i * TY
            if cl < c_Og:
                row = (s * c_O + g * c_Og + cl) * k_total
                for j in range(RK):
                    k = k0 + tx + j * TX
                    if k < k_total:
                        part[uint64(row + k)] = acc[i * RK + j]

    name = f"conv2d_wgrad_{code}_t{CO_T}x{K_T}_r{RC}x{RK}_m{MC}"
    signature = (_array(code, 1),) * 2 + (types.Array(scalar, 1, "C"),) + (types.int64,) * 18
    return KernelSpec(name, _rename(kernel, name), signature, (NT, 2))


@functools.lru_cache(maxsize=None)
def sum_slices_kernel(code):
    """``out[e] = part[0, e] + part[1, e] + ...`` over ``slices`` slices, in that order
    (zeros for no slice), summed in the compute type and rounded once to ``out``'s dtype.
    Consecutive threads read consecutive words. Launch: 1-D, any size (grid-stride).
    Arguments: flat ``part (slices, size)`` (compute type: float32 for ``"f16"``),
    ``out (size,)``, ``slices, size``.
    """
    store, scalar = _SCALAR[code], _COMPUTE[code]

    def kernel(part, out, slices, size):
        for e in range(cuda.grid(1), size, cuda.gridsize(1)):
            v = scalar(0)
            for s in range(slices):
                v += part[uint64(s * size + e)]
            out[uint64(e)] = store(v)

    name = f"sum_slices_{code}"
    signature = (types.Array(scalar, 1, "C"), _array(code, 1)) + (types.int64,) * 2
    return KernelSpec(name, _rename(kernel, name), signature)


# Partial sums of the conv2d weight gradient: at most this many bytes of scratch (one slice,
# written straight into a float32 or float64 output, needs none; float16 always sums in a
# float32 scratch). 32 MiB leaves even the largest benchmark layer (VGG-16 conv5_1, 9.4 MB of
# float32 weights) three slices.
PARTIAL_BUDGET_BYTES = 32 * 1024 * 1024

# Blocks the weight gradient aims for: several waves on a 132-SM GPU.
_WGRAD_TARGET_BLOCKS = 1024

# Chunks of m one slice sums at least, so its partial sum is small next to what it reads.
_WGRAD_MIN_CHUNKS = 4


class Conv2dWeightGradConfig(NamedTuple):
    """Compile-time constants and launch shape of one conv2d weight-gradient call."""

    kernel: KernelSpec
    block: tuple       # (k_tile // cols, co_tile // rows)
    grid: tuple        # (k tiles, groups * co tiles, slices), or None for an empty batch
    slices: int        # slices of m (0 for an empty batch: the output is zeros)
    m_slice: int       # m per slice, a multiple of the kernel's chunk
    scratch_elements: int  # partial sums, of partial_dtype (0: one slice, into the output)


def partial_dtype(dtype):
    """dtype of the conv2d weight gradient's partial sums: the compute type (float32 for
    float16, whose partial sums must not be rounded to half precision before they are
    added)."""
    return _NUMPY[compute_code(dtype_code(dtype))]


def conv2d_weight_grad_config(geom, dtype):
    """Specialisation, launch shape and slicing of the conv2d weight gradient (pure).

    Tile: up to 64 output channels x 128 (float32) or 64 (float64) k, rounded up to powers of
    two no larger than needed; up to 8 x 8 (float32) or 4 x 4 (float64) entries per thread,
    fewer where that leaves under 64 threads (float16 as float32). Slices: enough for
    about 1024 blocks, each slice at least 4 chunks of m long, the partial sums within
    :data:`PARTIAL_BUDGET_BYTES`. float16 writes its partial sums to float32 scratch even
    with one slice, and the slice sum rounds them.
    """
    code = dtype_code(dtype)
    fp32 = compute_code(code) == "f32"
    itemsize = _stage_itemsize(code)  # of the shared tiles and the partial sums
    c_og = geom.out_channels_per_group
    k_total = geom.in_channels_per_group * geom.kernel_height * geom.kernel_width
    co_t = _pow2_at_least(c_og, 64)
    k_t = _pow2_at_least(k_total, 128 if fp32 else 64)
    reg = 8 if fp32 else 4
    rc, rk = min(reg, co_t), min(reg, k_t)
    while (co_t // rc) * (k_t // rk) < 64 and (rc > 1 or rk > 1):
        if rc >= rk:
            rc //= 2
        else:
            rk //= 2
    threads = (co_t // rc) * (k_t // rk)
    chunk = min(32 if fp32 else 16, threads)
    spec = conv2d_weight_grad_kernel(code, co_t, k_t, rc, rk, chunk)
    block = (k_t // rk, co_t // rc)

    m_total = geom.batch * geom.out_height * geom.out_width
    weight_elements = geom.out_channels * k_total
    per_slice = -(-k_total // k_t) * geom.groups * -(-c_og // co_t)
    if m_total == 0:
        return Conv2dWeightGradConfig(spec, block, None, 0, chunk, 0)
    chunks = -(-m_total // chunk)
    slices = -(-_WGRAD_TARGET_BLOCKS // per_slice)
    slices = min(slices, max(1, chunks // _WGRAD_MIN_CHUNKS),
                 max(1, PARTIAL_BUDGET_BYTES // (weight_elements * itemsize)), GRID_YZ_LIMIT)
    m_slice = -(-chunks // slices) * chunk
    slices = -(-m_total // m_slice)  # no empty slice
    grid = check_grid((-(-k_total // k_t), geom.groups * -(-c_og // co_t), slices),
                      "the conv2d weight gradient")
    direct = slices == 1 and code == compute_code(code)
    return Conv2dWeightGradConfig(spec, block, grid, slices, m_slice,
                                  0 if direct else slices * weight_elements)


def conv2d_weight_grad_scratch_elements(geom, dtype):
    """Scratch (partial sums) the conv2d weight gradient allocates, in elements of ``dtype``
    (float16's float32 partial sums count two each): 0 or at most
    :data:`PARTIAL_BUDGET_BYTES` worth (float16: at least one float32 copy of the weights)."""
    elements = conv2d_weight_grad_config(geom, dtype).scratch_elements
    return elements * partial_dtype(dtype).itemsize // np.dtype(dtype).itemsize


# --------------------------------------------------------------------------------------------
# local_conv2d input gradient: a gather over the stride phases, each covering output with its
# own kernel, staged from the caller's weight layout
# --------------------------------------------------------------------------------------------

@functools.lru_cache(maxsize=None)
def local_conv2d_input_grad_kernel(code, kernel_h, kernel_w, batch_block, channels):
    """Input gradient of local_conv2d, specialised on dtype, kernel size and register block.

    A block takes one stride phase, one row ``u`` of its sub-grid and 32 consecutive columns
    ``v`` (one per thread along x); its threads along y take ``batch_block`` images each, and
    every thread ``channels`` input channels. For each output channel and each tap row
    ``k_y`` the phase uses, the input row reads one output row ``oy``; the block stages from
    the weights ``(c_O, h_O, w_O, c_Ig, k_H, k_W)`` the runs ``w[co, oy, ox, c, k_y, :]`` of
    the ``32 + (k_W - 1) * d_W // s_W + 1`` positions ``ox`` its columns read (``k_W``
    consecutive words each, consecutive threads loading consecutive words), ``chunk``
    output channels at a time. A thread then reads the weight of each tap ``k_x`` of the
    phase from shared memory (runs padded to an odd stride: conflict-free) and multiplies it
    with ``gy`` of its ``batch_block`` images, read straight from ``(n, c_O, h_O, w_O)``:
    the 32 threads of a warp read 32 consecutive positions. Every weight loaded serves
    ``batch_block`` images, every ``gy`` value ``channels`` input channels.

    Launch: ``grid = ceil(h / s_H) * ceil(ceil(w / s_W) / 32) * s_H * s_W * groups *
    ceil(c_Ig / channels)`` (1-D; the channel block varies fastest, then the phase, so the
    blocks that read the same ``gy`` and neighbouring weight words run together and share
    them in L2), ``block = (32, by)`` with
    ``by = min(8, ceil(n / batch_block))``, dynamic shared memory
    ``chunk * channels * slab_j * k_W' * itemsize`` bytes (compute type; ``slab_j`` the
    staged positions, ``k_W'`` the odd number at least ``k_W``).

    Kernel arguments: flat ``gy (n, c_O, h_O, w_O)``, ``weight (c_O, h_O, w_O, c_Ig, k_H,
    k_W)``, ``gx (n, c_I, h, w)`` (written), then ``n, c_I, h, w, c_O, h_O, w_O, c_Ig,
    c_Og, s_H, s_W, p_top, p_left, d_H, d_W, v_tiles, slab_j, chunk``.
    """
    store, scalar = _SCALAR[code], _COMPUTE[code]
    KH, KW, NB, CB = kernel_h, kernel_w, batch_block, channels
    KHW = KH * KW
    KWP = _odd(KW)
    NACC = NB * CB

    def kernel(gy, weight, gx, n, c_I, h, wd, c_O, h_O, w_O, c_Ig, c_Og, s_H, s_W, pt, pl,
               d_H, d_W, v_tiles, slab_j, chunk):
        tx = cuda.threadIdx.x
        ty = cuda.threadIdx.y
        by = cuda.blockDim.y
        tid = ty * 32 + tx
        nthreads = 32 * by
        phases = s_H * s_W
        blocks_per_group = (c_Ig + CB - 1) // CB
        channel_blocks = (c_I // c_Ig) * blocks_per_group
        cb = cuda.blockIdx.x % channel_blocks
        t = cuda.blockIdx.x // channel_blocks
        phase = t % phases
        t = t // phases
        vt = t % v_tiles
        u = t // v_tiles
        ry = phase // s_W
        rx = phase - ry * s_W
        iy = ry + s_H * u
        if iy >= h:  # the same for the whole block: no barrier is left waiting
            return
        v = vt * 32 + tx
        ix = rx + s_W * v
        g = cb // blocks_per_group
        cl0 = (cb % blocks_per_group) * CB  # first input channel, in the group
        n_cl = min(CB, c_Ig - cl0)
        n_pos = h_O * w_O
        k_len = c_Ig * KHW
        img = c_O * n_pos
        f_lo = (rx + pl - (KW - 1) * d_W) // s_W  # floor: the first staged position, relative
        ox_lo = vt * 32 + f_lo                  # to the block's first column
        # Staged column tap kx reads, relative to the thread's column; -1 off this phase.
        tcol = cuda.local.array(KW, dtype=int64)
        for kx in range(KW):
            a = rx + pl - kx * d_W
            tcol[kx] = -1
            if a % s_W == 0:
                tcol[kx] = a // s_W - f_lo
        run = slab_j * KWP    # one (output channel, input channel) of the stage
        smem = cuda.shared.array(0, dtype=scalar)
        acc = cuda.local.array(NACC, dtype=scalar)
        wreg = cuda.local.array(CB, dtype=scalar)
        gv = cuda.local.array(NB, dtype=scalar)
        for pass0 in range(0, n, by * NB):  # the same trip count in every thread
            b0 = pass0 + ty * NB
            active = ix < wd and b0 < n
            for a in range(NACC):
                acc[a] = scalar(0)  # keep the math in the compute type
            for c0 in range(0, c_Og, chunk):
                nc = min(chunk, c_Og - c0)
                for ky in range(KH):
                    a = ry + pt - ky * d_H
                    oy = u + a // s_H
                    if a % s_H == 0 and oy >= 0 and oy < h_O:  # the same for the whole block
                        # Wait until the previous stage has been read.
                        cuda.syncthreads()
                        w_row = ky * KW
                        for e in range(tid, nc * CB * slab_j * KW, nthreads):
                            kx = e % KW
                            r = e // KW
                            q = r % CB
                            r = r // CB
                            j = r % slab_j
                            c = r // slab_j
                            ox = ox_lo + j
                            val = scalar(0)
                            if ox >= 0 and ox < w_O and q < n_cl:
                                src = ((((g * c_Og + c0 + c) * h_O + oy) * w_O + ox) * k_len
                                       + (cl0 + q) * KHW + w_row + kx)
                                val = scalar(weight[uint64(src)])
                            smem[uint64(((c * CB + q) * slab_j + j) * KWP + kx)] = val
                        cuda.syncthreads()
                        if active:
                            for c in range(nc):
                                g_row = (g * c_Og + c0 + c) * n_pos + oy * w_O
                                for kx in range(KW):
                                    jo = tcol[kx]
                                    if jo >= 0:
                                        ox = ox_lo + tx + jo
                                        if ox >= 0 and ox < w_O:
                                            for bb in range(NB):
                                                gv[bb] = scalar(0)
                                                if b0 + bb < n:
                                                    gv[bb] = scalar(
                                                        gy[uint64((b0 + bb) * img + g_row + ox)])
                                            sofs = (c * CB * slab_j + tx + jo) * KWP + kx
                                            for q in range(CB):
                                                wreg[q] = smem[uint64(sofs + q * run)]
                                            for bb in range(NB):
                                                for q in range(CB):
                                                    acc[bb * CB + q] += gv[bb] * wreg[q]
            if active:
                plane = h * wd
                for bb in range(NB):
                    if b0 + bb < n:
                        ofs = ((b0 + bb) * c_I + g * c_Ig + cl0) * plane + iy * wd + ix
                        for q in range(CB):
                            if q < n_cl:
                                gx[uint64(ofs)] = store(acc[bb * CB + q])
                            ofs += plane

    name = f"local_conv2d_igrad_{code}_k{KH}x{KW}_b{NB}_c{CB}"
    signature = (_array(code, 1),) * 3 + (types.int64,) * 18
    return KernelSpec(name, _rename(kernel, name), signature, (32 * _LOCAL_IGRAD_MAX_ROWS, 1))


# Rows of 32 threads in a local_conv2d input-gradient block: 256 threads leave each up to
# 255 registers (it needs about 170-200 to keep its accumulators, tap columns and in-flight
# loads without spilling; 512 threads would cap it at 128), so a pass covers 64 (float32)
# or 32 (float64) images.
_LOCAL_IGRAD_MAX_ROWS = 8


class LocalInputGradConfig(NamedTuple):
    """Compile-time constants and launch shape of one local_conv2d input-gradient call."""

    kernel: KernelSpec
    block: tuple       # (32, by)
    grid: tuple        # (rows * column tiles * phases * channel blocks,)
    v_tiles: int       # tiles of 32 columns of a phase's sub-grid
    slab_j: int        # positions staged per row
    chunk: int         # output channels per stage
    shared_bytes: int


def local_conv2d_input_grad_config(geom, dtype):
    """Specialisation and launch shape of the local_conv2d input gradient (pure, no GPU).

    Register block as the forward's: up to 8 (float16, float32) or 4 (float64) images x up
    to 4 input channels per thread, split evenly; as many output channels per stage as fit
    :data:`~gpuconv.cuda.kernels.LOCAL_STAGE_BYTES` (fewer input channels per thread only
    where one would not fit the shared-memory limit).
    """
    code = dtype_code(dtype)
    itemsize = _stage_itemsize(code)
    batch_block = _even_split(max(geom.batch, 1), 8 if compute_code(code) == "f32" else 4)
    c_ig = geom.in_channels_per_group
    kw = geom.kernel_width
    s_H, s_W = geom.stride_h, geom.stride_w
    hu, wu = -(-geom.in_height // s_H), -(-geom.in_width // s_W)
    slab_j = 32 + (kw - 1) * geom.dilation_w // s_W + 1
    channels = _even_split(c_ig, 4)

    def per_channel(channels):
        return channels * slab_j * _odd(kw) * itemsize

    while channels > 1 and per_channel(channels) > SHARED_LIMIT_BYTES:
        channels = _even_split(c_ig, channels - 1)
    if per_channel(channels) > SHARED_LIMIT_BYTES:
        raise ValueError(
            f"the local_conv2d input gradient on the GPU stages one kernel row of "
            f"{slab_j} positions in shared memory: {per_channel(channels)} bytes exceeds "
            f"{SHARED_LIMIT_BYTES}; use device='cpu'")
    chunk = max(1, min(geom.out_channels_per_group, LOCAL_STAGE_BYTES // per_channel(channels)))
    by = max(1, min(_LOCAL_IGRAD_MAX_ROWS, -(-geom.batch // batch_block)))
    v_tiles = -(-wu // 32)
    grid = check_grid((hu * v_tiles * s_H * s_W * geom.groups * -(-c_ig // channels),),
                      "the local_conv2d input gradient")
    spec = local_conv2d_input_grad_kernel(code, geom.kernel_height, kw, batch_block, channels)
    return LocalInputGradConfig(spec, (32, by), grid, v_tiles, slab_j, chunk,
                                chunk * per_channel(channels))


# --------------------------------------------------------------------------------------------
# local_conv2d weight gradient: a sum over the batch per weight, written once, coalesced
# --------------------------------------------------------------------------------------------

# Rows of 32 threads of a local_conv2d weight-gradient block at most.
_LOCAL_WGRAD_MAX_ROWS = 8


def _local_wgrad_tile_bytes(code, kernel_w, rows, channels, by):
    return channels * 32 * _odd(by * rows * kernel_w) * _stage_itemsize(code)


def local_wgrad_max_rows(code, kernel_w, rows, channels):
    """Rows of threads a local_conv2d weight-gradient block may have (at most 8): as many
    as keep its output tile ``channels x 32 x (by * rows * k_W)`` within the shared-memory
    budget (at least one)."""
    by = _LOCAL_WGRAD_MAX_ROWS
    while by > 1 and _local_wgrad_tile_bytes(code, kernel_w, rows, channels, by) > \
            SHARED_BUDGET_BYTES:
        by -= 1
    return by


@functools.lru_cache(maxsize=None)
def local_conv2d_weight_grad_kernel(code, kernel_h, kernel_w, rows, channels):
    """Weight gradient of local_conv2d, specialised on dtype, kernel size and register block.

    ``gw[co, oy, ox, c, k_y, k_x] = sum_b gy[b, co, oy, ox] * x[b, c, ...]``: no sum across
    positions, so every weight is one thread's fixed-order sum over the batch. A thread owns
    one output position (32 consecutive positions per block along x), ``channels`` output
    channels and ``rows`` consecutive kernel rows (``rows * k_W`` taps; rows run over
    ``(c, k_y)``, ``c_Ig * k_H`` of them); the block's ``by`` rows of threads take
    consecutive kernel rows. Per image it reads ``channels`` values of ``gy`` and
    ``rows * k_W`` of ``x``, both straight from the caller's layouts (the 32 threads of a
    warp read 32 consecutive positions, so at stride 1 each read is one coalesced line), for
    ``channels * rows * k_W`` multiply-adds.

    The result is written once, in the caller's layout ``(c_O, h_O, w_O, c_Ig, k_H, k_W)``:
    the block stages its ``channels x 32 x (by * rows * k_W)`` tile in shared memory (odd
    row stride, compute type: float16 is rounded as the tile is written out) and writes it
    with consecutive threads on consecutive words; per output
    channel one contiguous block of ``32 * c_Ig * k_H * k_W`` words when the block holds
    every kernel row.

    Launch: ``grid = ceil(P / 32) * groups * ceil(c_Og / channels) * row_blocks`` (1-D) with
    ``row_blocks = ceil(c_Ig * k_H / (by * rows))`` varying fastest, then the channel block:
    the blocks that read the same ``gy`` (all row blocks) and the same input windows (all
    channel blocks) of 32 positions run together and share them in L2;
    ``block = (32, by)`` with ``by <= local_wgrad_max_rows(...)``; static shared memory.

    Kernel arguments: flat ``x (n, c_I, h, w)``, ``gy (n, c_O, h_O, w_O)``, ``gw`` (written),
    then ``n, c_I, h, w, c_O, h_O, w_O, c_Ig, c_Og, s_H, s_W, p_top, p_left, d_H, d_W,
    row_blocks``.
    """
    store, scalar = _SCALAR[code], _COMPUTE[code]
    KH, KW, R, CB = kernel_h, kernel_w, rows, channels
    KHW = KH * KW
    RKW = R * KW          # taps per thread
    NACC = CB * RKW
    BYMAX = local_wgrad_max_rows(code, KW, R, CB)
    SP = _odd(BYMAX * RKW)  # row stride of the output tile in shared memory
    SQ = 32 * SP            # one output channel's tile
    SMEM = CB * SQ

    def kernel(x, gy, gw, n, c_I, h, wd, c_O, h_O, w_O, c_Ig, c_Og, s_H, s_W, pt, pl, d_H, d_W,
               row_blocks):
        # Every thread takes part in the output stages, so the bounds guards sit on the
        # loads and stores, not at the top.
        tx = cuda.threadIdx.x
        ty = cuda.threadIdx.y
        by = cuda.blockDim.y
        tid = ty * 32 + tx
        nthreads = 32 * by
        n_pos = h_O * w_O
        blocks_per_group = (c_Og + CB - 1) // CB
        channel_blocks = (c_O // c_Og) * blocks_per_group
        rb = cuda.blockIdx.x % row_blocks
        t = cuda.blockIdx.x // row_blocks
        cb = t % channel_blocks
        pos0 = (t // channel_blocks) * 32
        pos = pos0 + tx
        pos_ok = pos < n_pos
        block_pos = min(32, n_pos - pos0)
        oy = pos // w_O
        ox = pos - oy * w_O
        iy0 = oy * s_H - pt
        ix0 = ox * s_W - pl
        g = cb // blocks_per_group
        co0 = g * c_Og + (cb % blocks_per_group) * CB
        n_co = min(CB, (g + 1) * c_Og - co0)
        n_rows = c_Ig * KH
        k_len = c_Ig * KHW
        blk_row0 = rb * by * R
        blk_rows = min(by * R, n_rows - blk_row0)
        row0 = blk_row0 + ty * R

        # Offset of each tap in one image of x, -1 in the padding (or past the rows).
        xofs = cuda.local.array(RKW, dtype=int64)
        for rr in range(R):
            r = row0 + rr
            ci = r // KH
            ky = r - ci * KH
            iy = iy0 + ky * d_H
            for kx in range(KW):
                ix = ix0 + kx * d_W
                o = -1
                if pos_ok and r < n_rows and iy >= 0 and iy < h and ix >= 0 and ix < wd:
                    o = ((g * c_Ig + ci) * h + iy) * wd + ix
                xofs[rr * KW + kx] = o

        acc = cuda.local.array(NACC, dtype=scalar)
        gv = cuda.local.array(CB, dtype=scalar)
        for a in range(NACC):
            acc[a] = scalar(0)  # keep the math in the compute type
        if pos_ok:
            x_img = c_I * h * wd
            g_img = c_O * n_pos
            gofs = co0 * n_pos + pos
            for b in range(n):
                for q in range(CB):
                    # Channels past the group's end reread the last one; never stored.
                    gv[q] = scalar(gy[uint64(b * g_img + gofs + min(q, n_co - 1) * n_pos)])
                xb = b * x_img
                for t in range(RKW):
                    o = xofs[t]
                    xv = scalar(0)
                    if o >= 0:
                        xv = scalar(x[uint64(xb + o)])
                    for q in range(CB):
                        acc[q * RKW + t] += gv[q] * xv

        # All channels at once: the loops over acc stay unrolled, so acc stays in registers.
        tile = cuda.shared.array(SMEM, dtype=scalar)
        for q in range(CB):
            for t in range(RKW):
                tile[q * SQ + tx * SP + ty * RKW + t] = acc[q * RKW + t]
        cuda.syncthreads()
        klen = blk_rows * KW
        for q in range(n_co):
            dst0 = ((co0 + q) * n_pos + pos0) * k_len + blk_row0 * KW
            for e in range(tid, block_pos * klen, nthreads):
                j = e // klen
                kk = e - j * klen
                gw[uint64(dst0 + j * k_len + kk)] = store(tile[q * SQ + j * SP + kk])

    name = f"local_conv2d_wgrad_{code}_k{KH}x{KW}_r{R}_c{CB}"
    signature = (_array(code, 1),) * 3 + (types.int64,) * 16
    # At most 8 rows of threads, two blocks per SM: each thread may use 128 registers or more.
    return KernelSpec(name, _rename(kernel, name), signature, (32 * BYMAX, 2))


class LocalWeightGradConfig(NamedTuple):
    """Compile-time constants and launch shape of one local_conv2d weight-gradient call."""

    kernel: KernelSpec
    block: tuple       # (32, by)
    grid: tuple        # (position blocks * channel blocks * row blocks,)
    row_blocks: int    # blocks of by * rows kernel rows


def local_conv2d_weight_grad_config(geom, dtype):
    """Specialisation and launch shape of the local_conv2d weight gradient (pure, no GPU).

    About nine taps per thread (whole kernel rows: 9 rows of a 1-wide kernel, 3 of a 3-wide,
    one of a kernel 5 or more wide, never more rows than the kernel has) x up to 4 output
    channels (split evenly); up to 8 rows of threads on consecutive kernel rows.
    """
    code = dtype_code(dtype)
    kw = geom.kernel_width
    n_rows = geom.in_channels_per_group * geom.kernel_height
    rows = max(1, min(9 // kw, n_rows))
    channels = _even_split(geom.out_channels_per_group, 4)
    while channels > 1 and _local_wgrad_tile_bytes(code, kw, rows, channels, 1) > \
            SHARED_LIMIT_BYTES:
        channels = _even_split(geom.out_channels_per_group, channels - 1)
    if _local_wgrad_tile_bytes(code, kw, rows, channels, 1) > SHARED_LIMIT_BYTES:
        raise ValueError(
            f"the local_conv2d weight gradient on the GPU stages a kernel row of 32 output "
            f"positions in shared memory; a kernel {kw} wide does not fit {SHARED_LIMIT_BYTES} "
            "bytes; use device='cpu'")
    by_max = local_wgrad_max_rows(code, kw, rows, channels)
    by = max(1, min(by_max, -(-n_rows // rows)))
    n_pos = geom.out_height * geom.out_width
    row_blocks = -(-n_rows // (by * rows))
    grid = check_grid((-(-n_pos // 32) * geom.groups
                       * -(-geom.out_channels_per_group // channels) * row_blocks,),
                      "the local_conv2d weight gradient")
    spec = local_conv2d_weight_grad_kernel(code, geom.kernel_height, kw, rows, channels)
    return LocalWeightGradConfig(spec, (32, by), grid, row_blocks)


# --------------------------------------------------------------------------------------------
# the specialisations the benchmark layers launch
# --------------------------------------------------------------------------------------------

def grad_specialisations(geom, dtype):
    """``[(KernelSpec, dynamic shared bytes)]``: every gradient kernel a layer launches."""
    code = dtype_code(dtype)
    igrad = conv2d_input_grad_config(geom, dtype)
    local_igrad = local_conv2d_input_grad_config(geom, dtype)
    return [(igrad.kernel, igrad.shared_bytes),
            (conv2d_weight_grad_config(geom, dtype).kernel, 0),
            (sum_slices_kernel(code), 0),
            (local_igrad.kernel, local_igrad.shared_bytes),
            (local_conv2d_weight_grad_config(geom, dtype).kernel, 0)]
