"""CUDA kernels (Numba) for the local_conv2d gradients as batched GEMMs over output positions.

The forward (:func:`gpuconv.cuda.kernels.local_conv2d_kernel`) is, per output position ``p``,
``Y[:, :, p] = X_p . W_p^T`` (``M = n``, ``N = c_Og``, ``K = c_Ig * k_H * k_W``). Its two
gradients are products of the same operands:

- **input gradient**, the transposed product per position, ``dX_p = dY[:, :, p] . W_p``
  (``M = n``, ``N = K``, reduced over ``c_Og``), each window ``dX_p`` added into ``dX``.
  Windows overlap, so the sum is a *gather*: a block owns a tile of input pixels (one stride
  phase, one row of its sub-grid, consecutive columns, a tile of images and of input
  channels) and walks the (output row, kernel row) pairs that reach them, then the output
  maps, then the kernel columns, always in that order: every element of ``dX`` is one
  thread's fixed-order sum, no atomics, no scratch. On one stride phase the kernel taps that
  apply are the same for the whole block (no divergence), and their positions are a
  contiguous run of the output row (staged once, read by every tap);
- **weight gradient**, ``dW_p = dY[:, :, p]^T . X_p`` (``M = c_Og``, ``N = K``, reduced over
  the batch): a block owns a tile of (positions of one output row) x (maps) x (kernel rows)
  and sums over its images in order; where the grid needs more blocks the batch is split
  into slices whose partial sums go to scratch and are added in slice order by
  :func:`gpuconv.cuda.grad_kernels.sum_slices_kernel`, launched after it by
  :mod:`gpuconv.cuda.launch` (bitwise deterministic).

Both stage their operands in shared memory from the caller's layouts (``x (n, c_I, h, w)``,
``weight (c_O, h_O, w_O, c_Ig, k_H, k_W)``, ``gy (n, c_O, h_O, w_O)``), consecutive threads
on consecutive words of the innermost axis they walk (no per-call transpose). The staging
walks advance with carries from steps computed once per block (no division per element
beyond a multiplication by the compile-time kernel height); offsets inside a block's weights
are 32-bit (the configs refuse layers whose group weights reach 2**31 elements). Register
tiles as the forward's: ``TM x TC`` (images x input channels) and ``TO x TK`` (maps x taps)
accumulators, float32 for float16 (half in memory, converted once on load, rounded once on
store), float64 in float64. Every ``*_config`` is a pure function of the geometry (no GPU).

Notation as in :mod:`gpuconv.geometry`; ``gy`` is the gradient of the output.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import numpy as np
from numba import cuda, int32, types, uint64

from .spec import (BLOCK_Z_LIMIT, _COMPUTE, _NUMPY, _SCALAR, KernelSpec, _array,
                   _bank_wavefronts, _even_split, _rename, _stage_itemsize, check_grid,
                   compute_code, dtype_code)

__all__ = ["local_input_grad_gemm_kernel", "local_input_grad_gemm_config",
           "LocalInputGradGemmConfig", "local_input_grad_gemm_launch",
           "local_weight_grad_gemm_kernel", "local_weight_grad_gemm_config",
           "LocalWeightGradGemmConfig", "local_weight_grad_gemm_launch",
           "local_weight_grad_gemm_scratch_elements", "gemm_grad_specialisations",
           "GRAD_STAGE_BYTES", "STAGE_LOADS", "WEIGHT_STAGE_LOADS", "WEIGHT_GRAD_STAGE_LOADS"]

#: Shared memory of one gradient block's stage (both operands): 32 KiB keeps two blocks of
#: 256 threads (and more) on an SM, as the forward's.
GRAD_STAGE_BYTES = 32 * 1024

#: Loads each thread issues before storing them, per staging round, by compute type, as many
#: as fit the 128 registers without spills (ptxas sm_90, sm_80): the input gradient's gy walk
#: (whose loads hit L2: the rounds of one stage are its latency, so as many as fit), its
#: weight walk (whose loads miss L2) ...
STAGE_LOADS = {"f32": 8, "f64": 4}
WEIGHT_STAGE_LOADS = {"f32": 4, "f64": 2}
#: ... and the weight gradient's walks (gy and input), by compute type.
WEIGHT_GRAD_STAGE_LOADS = {"f32": 4, "f64": 2}

# Blocks of at most 256 threads, two per SM: at most 128 registers a thread (ptxas keeps
# the 8 x 4 float32 / 4 x 4 float64 tiles, the staging rounds and the pointers in them; the
# PTX tests check every specialisation the benchmark layers launch).
_MAX_THREADS = 256
_LAUNCH_BOUNDS = (_MAX_THREADS, 2)
# Threads the weight gradient's grid aims for: two waves of 512 resident threads on each of
# 132 SMs (its blocks are short: batch slices are cheap next to them).
_TARGET_THREADS = 2 * 132 * 512
# Threads below which the input gradient shrinks its register tile: one block of 256 on each
# SM. Above that the predicted time (gpuconv.cuda.predict) favours the larger tile's reuse
# over more waves (VGG-16 conv5_1: 8 x 4 on 1.7 waves 3.4 ms, 4 x 4 on 3.4 waves 4.2 ms).
_INPUT_MIN_THREADS = 132 * _MAX_THREADS
# Register tile caps by compute type.
_TILE = {"f32": 8, "f64": 4}


def _pitch(minimum, cost):
    """The pitch in ``[minimum, minimum + 32)`` of least ``cost(pitch)``, smallest first."""
    return min(range(minimum, minimum + 32), key=lambda p: (cost(p), p))


def _walk_steps(threads, *sizes):
    """Steps of a carry walk over axes of ``sizes`` (fastest first) and one unbounded
    outermost axis, advanced by ``threads`` elements at a time: one step per axis, fastest
    first (the host computes them once)."""
    steps = []
    rest = threads
    for size in sizes:
        rest, step = divmod(rest, size)
        steps.append(step)
    steps.append(rest)
    return tuple(steps)


# --------------------------------------------------------------------------------------------
# input gradient: dX_p = dY[:, :, p] . W_p, gathered per input pixel in a fixed order
# --------------------------------------------------------------------------------------------

@functools.lru_cache(maxsize=None)
def local_input_grad_gemm_kernel(code, kernel_h, kernel_w, batch_tile, channel_tile,
                                 batch_lanes, channel_lanes, gy_loads=None):
    """Input gradient of local_conv2d as the transposed per-position product, gathered.

    A block owns stride phase ``(r_y, r_x)``, row ``u`` of its sub-grid (input row ``iy =
    r_y + s_H * u``), ``blockDim.z`` consecutive sub-grid columns ``v`` (``ix = r_x + s_W *
    v``), ``BM = batch_lanes * batch_tile`` images and ``BC = channel_lanes *
    channel_tile`` input channels of one group. Thread ``(tb, tc, j)`` owns column ``j``,
    images ``tb + i * batch_lanes`` and channels ``tc + q * channel_lanes``: a ``TM x TC``
    register tile; each (map, tap) step reads ``TM`` values of ``gy`` and ``TC`` weights from
    shared memory for ``TM * TC`` FMAs.

    For each kernel row ``k_y`` the phase uses (output row ``oy``, the same for the block),
    ``chunk`` maps at a time, the block stages (1) ``gy[b, co, oy, ox]`` of its images over
    the ``sj`` output columns its pixels read, walked (map, image, column) columns fastest
    (coalesced), stored column-major with the images innermost; (2) the weights ``w[co, oy,
    ox, c, k_y, k_x]`` of those columns, its channels and the phase's kernel columns ``k_x =
    kx0 + m * kstep`` (``m < nkx``), walked (map, column, channel, tap) taps fastest (runs of
    ``k_W`` words at stride 1 for stride-1 layers), stored with the channels innermost.
    Then every thread sums, in the order (k_y, map, k_x), the products of its pixels.

    Launch (see :func:`local_input_grad_gemm_config`): ``block = (batch_lanes,
    channel_lanes, columns)``, ``grid = (ceil(h / s_H) * v_tiles * s_H * s_W * batch_tiles,
    groups * channel blocks)`` (the batch tiles vary fastest, then the phase: blocks that
    read the same weights run together), dynamic shared memory ``chunk * (g_co + w_co)``
    words of the compute type. Kernel arguments: flat ``gy (n, c_O, h_O, w_O)``, ``weight
    (c_O, h_O, w_O, c_Ig, k_H, k_W)``, ``gx (n, c_I, h, w)`` (written), then ``n, c_I, h,
    w, c_O, h_O, w_O, c_Ig, c_Og, s_H, s_W, p_top, p_left, d_H, d_W, v_tiles, batch_tiles,
    chunk, sj, g_pitch, g_co, w_pitch, w_kv, w_co, kstep, dcol, nkw`` (``kstep = s_W /
    gcd(s_W, d_W)`` the kernel columns between two of a phase, ``dcol = kstep * d_W / s_W``
    the output columns between what they read, ``nkw`` the most kernel columns a phase
    takes) and the walks' steps ``gsc, gsb, gsm`` (gy: column, image, map) and ``wsk,
    wsc, wsj, wsm`` (weights: tap, channel, column, map) for all the block's threads.

    ``gy_loads`` (default :data:`STAGE_LOADS` of the compute type) sets the gy walk's loads
    per staging round: the acceptance run times other counts beside the default (the name
    then ends in ``_g<count>``); the sums and their order do not depend on it.
    """
    store, scalar = _SCALAR[code], _COMPUTE[code]
    KH, KW, TM, TC, LB, LC = kernel_h, kernel_w, batch_tile, channel_tile, batch_lanes, \
        channel_lanes
    KHW = KH * KW
    BM, BC = LB * TM, LC * TC
    NACC = TM * TC
    UDEFAULT = STAGE_LOADS[compute_code(code)]
    U = UDEFAULT if gy_loads is None else int(gy_loads)
    if not 1 <= U <= 16:
        raise ValueError(f"gy_loads must be 1 to 16, got {gy_loads!r}")
    UW = WEIGHT_STAGE_LOADS[compute_code(code)]
    UL = max(U, UW)

    def kernel(gy, weight, gx, n, c_I, h, wd, c_O, h_O, w_O, c_Ig, c_Og, s_H, s_W, pt, pl,
               d_H, d_W, v_tiles, batch_tiles, chunk, sj, g_pitch, g_co, w_pitch, w_kv, w_co,
               kstep, dcol, nkw, gsc, gsb, gsm, wsk, wsc, wsj, wsm):
        # Every thread takes part in the stages, so the bounds guards sit on the stores.
        tb = cuda.threadIdx.x
        tc = cuda.threadIdx.y
        j = cuda.threadIdx.z
        ptw = cuda.blockDim.z
        tid = int32((j * LC + tc) * LB + tb)

        phases = s_H * s_W
        bt = cuda.blockIdx.x % batch_tiles
        t = cuda.blockIdx.x // batch_tiles
        phase = t % phases
        t = t // phases
        vt = t % v_tiles
        u = t // v_tiles
        ry = phase // s_W
        rx = phase - ry * s_W
        iy = ry + s_H * u
        if iy >= h:  # the same for the whole block: no barrier is left waiting
            return
        blocks_per_group = (c_Ig + BC - 1) // BC
        g = cuda.blockIdx.y // blocks_per_group
        cl0 = (cuda.blockIdx.y - g * blocks_per_group) * BC  # first channel, in the group
        n0 = bt * BM
        n_b = int32(min(BM, n - n0))
        n_c = int32(min(BC, c_Ig - cl0))
        # Kernel columns of this phase: kx0 + m * kstep, m < nkx; each reads the output
        # column v + (r_x + p_left - kx * d_W) / s_W, staged at tcol0 - m * dcol + j.
        kx0 = int32(-1)
        for kx in range(KW):
            if kx0 < 0 and (rx + pl - kx * d_W) % s_W == 0:
                kx0 = int32(kx)
        nkx = int32(0)
        if kx0 >= 0:
            nkx = int32((KW - 1 - kx0) // kstep + 1)
        f_lo = (rx + pl - (KW - 1) * d_W) // s_W  # floor: first staged column, relative
        ox_lo = vt * ptw + f_lo                   # to the block's first column
        tcol0 = int32(0)
        if nkx > 0:
            tcol0 = int32((rx + pl - kx0 * d_W) // s_W - f_lo)
        n_pos = h_O * w_O
        k_len = c_Ig * KHW
        g_stage = chunk * g_co  # the weight stage follows the gy stage
        smem = cuda.shared.array(0, dtype=scalar)

        # gy walk (map, image, column), columns fastest; weight walk (map, column, channel,
        # tap) over the most taps a phase takes (``nkw``), taps fastest: starts once per
        # stage, steps from the host, carries per element.
        src = cuda.local.array(UL, dtype=int32)
        dst = cuda.local.array(UL, dtype=int32)
        val = cuda.local.array(UL, dtype=scalar)
        acc = cuda.local.array(NACC, dtype=scalar)
        gv = cuda.local.array(TM, dtype=scalar)
        wv = cuda.local.array(TC, dtype=scalar)
        for a in range(NACC):
            acc[a] = scalar(0)  # keep the math in the compute type
        # Flat offsets of the block's first gy element and first weight (64-bit bases).
        g_first = (n0 * c_O + g * c_Og) * n_pos
        w_first = (g * c_Og * n_pos) * k_len + (cl0 * KH) * KW

        for ky in range(KH):
            a = ry + pt - ky * d_H
            oy = u + a // s_H
            if a % s_H != 0 or oy < 0 or oy >= h_O or nkx == 0:  # the same for the block
                continue
            g_row = g_first + oy * w_O
            w_row = w_first + (oy * w_O) * k_len + ky * KW + kx0
            for c0 in range(0, c_Og, chunk):
                nc = int32(min(chunk, c_Og - c0))
                # Wait until everyone has read the previous stage before overwriting it.
                cuda.syncthreads()
                # gy: U elements per round, loads first; outside the output row zeros.
                col = int32(tid % sj)
                rest = tid // sj
                b = int32(rest % BM)
                m = int32(rest // BM)
                while m < nc:
                    for e in range(U):
                        s = int32(-1)
                        d = int32(-1)
                        if m < nc:
                            d = m * g_co + col * g_pitch + b
                            ox = ox_lo + col
                            if b < n_b and ox >= 0 and ox < w_O:
                                s = (b * c_O + c0 + m) * n_pos + ox
                        src[e] = s
                        dst[e] = d
                        col += gsc
                        b += gsb
                        m += gsm
                        if col >= sj:
                            col -= sj
                            b += 1
                        if b >= BM:
                            b -= BM
                            m += 1
                    for e in range(U):
                        v = scalar(0)
                        if src[e] >= 0:
                            v = scalar(gy[uint64(g_row + src[e])])
                        val[e] = v
                    for e in range(U):
                        if dst[e] >= 0:
                            smem[uint64(dst[e])] = val[e]
                # Weights of the phase's taps; outside the output row or the group zeros.
                kk = int32(tid % nkw)
                rest = tid // nkw
                cc = int32(rest % BC)
                rest = rest // BC
                jj = int32(rest % sj)
                m = int32(rest // sj)
                while m < nc:
                    for e in range(UW):
                        s = int32(-1)
                        d = int32(-1)
                        if m < nc and kk < nkx:
                            d = g_stage + m * w_co + kk * w_kv + jj * w_pitch + cc
                            ox = ox_lo + jj
                            if cc < n_c and ox >= 0 and ox < w_O:
                                s = ((c0 + m) * n_pos + ox) * k_len + cc * KHW + kk * kstep
                        src[e] = s
                        dst[e] = d
                        kk += wsk
                        cc += wsc
                        jj += wsj
                        m += wsm
                        if kk >= nkw:
                            kk -= nkw
                            cc += 1
                        if cc >= BC:
                            cc -= BC
                            jj += 1
                        if jj >= sj:
                            jj -= sj
                            m += 1
                    for e in range(UW):
                        v = scalar(0)
                        if src[e] >= 0:
                            v = scalar(weight[uint64(w_row + src[e])])
                        val[e] = v
                    for e in range(UW):
                        if dst[e] >= 0:
                            smem[uint64(dst[e])] = val[e]
                # Wait until both stages are complete before anyone reads them.
                cuda.syncthreads()
                go = int32((j + tcol0) * g_pitch + tb)
                wo = int32(g_stage + (j + tcol0) * w_pitch + tc)
                g_tap = int32(dcol * g_pitch)
                w_tap = int32(w_kv - dcol * w_pitch)
                for m in range(nc):
                    gp = go
                    wp = wo
                    for kk in range(nkx):
                        for i in range(TM):
                            gv[i] = smem[uint64(gp + i * LB)]
                        for q in range(TC):
                            wv[q] = smem[uint64(wp + q * LC)]
                        for i in range(TM):
                            for q in range(TC):
                                acc[i * TC + q] += gv[i] * wv[q]
                        gp -= g_tap
                        wp += w_tap
                    go += g_co
                    wo += w_co

        ix = rx + s_W * (vt * ptw + j)
        if ix < wd:
            plane = h * wd
            for i in range(TM):
                b = tb + i * LB
                if b < n_b:
                    ofs = ((n0 + b) * c_I + g * c_Ig + cl0 + tc) * plane + iy * wd + ix
                    for q in range(TC):
                        if tc + q * LC < n_c:
                            gx[uint64(ofs)] = store(acc[i * TC + q])
                        ofs += LC * plane

    name = f"local_conv2d_igrad_gemm_{code}_k{KH}x{KW}_t{TM}x{TC}_l{LB}x{LC}"
    if U != UDEFAULT:
        name += f"_g{U}"
    signature = (_array(code, 1),) * 3 + (types.int64,) * 34
    return KernelSpec(name, _rename(kernel, name), signature, _LAUNCH_BOUNDS)


class LocalInputGradGemmConfig(NamedTuple):
    """Compile-time constants and launch shape of one local_conv2d input-gradient call."""

    kernel: KernelSpec
    block: tuple         # (batch lanes, channel lanes, columns per block)
    grid: tuple          # (rows * column tiles * phases * batch tiles, groups * channel blocks)
    shared_bytes: int    # dynamic shared memory
    v_tiles: int         # column tiles of a phase's sub-grid
    batch_tiles: int
    chunk: int           # maps per shared-memory stage
    sj: int              # output columns staged per block
    g_pitch: int         # words between staged gy columns (>= images)
    g_co: int            # words of one map's gy stage
    w_pitch: int         # words between staged weight columns (>= channels)
    w_kv: int            # words between a phase's kernel columns in the weight stage
    w_co: int            # words of one map's weight stage
    kstep: int           # kernel columns between two taps of a phase
    dcol: int            # output columns between what two taps of a phase read
    nkw: int             # most kernel columns a phase takes
    walk: tuple          # steps of the staging walks (gsc, gsb, gsm, wsk, wsc, wsj, wsm)
    gy_loads: int        # the gy walk's loads per staging round


def _warps(lanes_x, lanes_y, lanes_z):
    threads = [(a, b, c) for c in range(lanes_z) for b in range(lanes_y) for a in range(lanes_x)]
    return [threads[w:w + 32] for w in range(0, len(threads), 32)]


def local_input_grad_gemm_launch(geom, dtype, batch_tile, channel_tile, layout=None,
                                 chunk=None, gy_loads=None):
    """The :class:`LocalInputGradGemmConfig` of given choices (:func:`local_input_grad_gemm_config`
    makes them; tests force small tiles and stages through this): register tile
    ``batch_tile x channel_tile``, ``layout = (batch lanes, channel lanes, columns)``
    (default: derived from the tile), maps per stage (default: as many as fit), the gy
    walk's loads per round (default :data:`STAGE_LOADS`)."""
    code = dtype_code(dtype)
    words = GRAD_STAGE_BYTES // _stage_itemsize(code)
    kw = geom.kernel_width
    s_w, d_w = geom.stride_w, geom.dilation_w
    kstep = s_w // math.gcd(s_w, d_w)
    dcol = kstep * d_w // s_w
    nkx = -(-kw // kstep)  # most kernel columns any phase takes
    wu = -(-geom.in_width // s_w)
    if layout is None:
        layout = _input_layout(geom, code, batch_tile, channel_tile)
    lanes_b, lanes_c, columns = layout
    bm, bc = lanes_b * batch_tile, lanes_c * channel_tile

    sj, g_pitch, g_co, w_pitch, w_kv, w_co = _input_stage(geom, layout, bm, bc)
    if g_co + w_co > words:
        stage_bytes = (g_co + w_co) * _stage_itemsize(code)
        raise ValueError(
            f"the local_conv2d input gradient on the GPU stages one map's gradient and "
            f"weights for {columns} columns in shared memory: {stage_bytes} "
            f"bytes for a kernel {kw} wide with stride {s_w} and dilation {d_w} exceeds "
            f"{GRAD_STAGE_BYTES}; use device='cpu'")
    chunk = chunk or max(1, min(geom.out_channels_per_group, words // (g_co + w_co)))
    n_pos = geom.out_height * geom.out_width
    k_len = geom.in_channels_per_group * geom.kernel_height * kw
    if geom.out_channels_per_group * n_pos * k_len >= 2**31 or \
            bm * geom.out_channels * n_pos >= 2**31:
        raise ValueError(
            "the local_conv2d input gradient on the GPU indexes a group's weights and a batch "
            "tile's gradient with 32-bit offsets: this layer has too many; use device='cpu'")
    v_tiles = -(-wu // columns)
    batch_tiles = -(-max(geom.batch, 1) // bm)
    hu = -(-geom.in_height // geom.stride_h)
    grid = check_grid((hu * v_tiles * geom.stride_h * s_w * batch_tiles,
                       geom.groups * -(-geom.in_channels_per_group // bc)),
                      "the local_conv2d input gradient")
    default_loads = STAGE_LOADS[compute_code(code)]
    if gy_loads == default_loads:
        gy_loads = None  # one specialisation for the default, however it is asked for
    spec = local_input_grad_gemm_kernel(code, geom.kernel_height, kw, batch_tile, channel_tile,
                                        lanes_b, lanes_c, gy_loads)
    return LocalInputGradGemmConfig(spec, (lanes_b, lanes_c, columns), grid,
                                    chunk * (g_co + w_co) * _stage_itemsize(code), v_tiles,
                                    batch_tiles, chunk, sj, g_pitch, g_co, w_pitch, w_kv,
                                    w_co, kstep, dcol, nkx,
                                    _walk_steps(lanes_b * lanes_c * columns, sj, bm)
                                    + _walk_steps(lanes_b * lanes_c * columns, nkx, bc, sj),
                                    default_loads if gy_loads is None else int(gy_loads))


def _input_layout(geom, code, batch_tile, channel_tile):
    """(batch lanes, channel lanes, columns) for a register tile: up to 16 (float32) or 8
    (float64) batch lanes, the channel lanes filling a warp, columns up to 256 threads (fewer
    where one map's stage would not fit)."""
    wide = compute_code(code) == "f32"
    lanes_b = min(-(-max(geom.batch, 1) // batch_tile), 16 if wide else 8)
    lanes_c = min(-(-geom.in_channels_per_group // channel_tile), max(1, 32 // lanes_b))
    wu = -(-geom.in_width // geom.stride_w)
    # (columns on the block's z axis: at most 64 threads there on every GPU)
    columns = _even_split(wu, max(1, min(BLOCK_Z_LIMIT, _MAX_THREADS // (lanes_b * lanes_c))))
    words = GRAD_STAGE_BYTES // _stage_itemsize(code)
    bm, bc = lanes_b * batch_tile, lanes_c * channel_tile
    while columns > 1 and sum(_input_stage(geom, (lanes_b, lanes_c, columns), bm, bc)[2::3]) \
            > words:
        columns = _even_split(wu, columns - 1)
    return lanes_b, lanes_c, columns


def _input_stage(geom, layout, bm, bc):
    """(sj, g_pitch, g_co, w_pitch, w_kv, w_co) of the input gradient's stage for one map:
    pitches chosen so the hot loop's reads of every warp are conflict-free where they can be
    (gy: images x columns, weights: channels x columns)."""
    lanes_b, lanes_c, columns = layout
    kw, s_w, d_w = geom.kernel_width, geom.stride_w, geom.dilation_w
    nkx = -(-kw // (s_w // math.gcd(s_w, d_w)))
    sj = columns + (kw - 1) * d_w // s_w + 1
    lanes = _warps(lanes_b, lanes_c, columns)
    g_pitch = _pitch(bm, lambda p: max(_bank_wavefronts([z * p + a for a, _, z in w])
                                       for w in lanes))
    w_pitch = _pitch(bc, lambda p: max(_bank_wavefronts([z * p + b for _, b, z in w])
                                       for w in lanes))
    return sj, g_pitch, sj * g_pitch, w_pitch, sj * w_pitch, nkx * sj * w_pitch


def local_input_grad_gemm_config(geom, dtype, gy_loads=None):
    """Specialisation and launch shape of the local_conv2d input gradient (pure, no GPU).

    Register tile up to 8 images x 4 input channels (float16, float32; float64 4 x 4), each
    split evenly; a block holds up to 128 images (64 in float64) and spans up to 256 threads,
    the columns of a phase row split evenly. Where the grid would not fill one block of 256
    threads on each of 132 SMs, the tile shrinks to 4 images (batches over 8), then to 2
    channels. As many maps per stage as fit :data:`GRAD_STAGE_BYTES`. ``gy_loads``: the gy
    walk's loads per round (default :data:`STAGE_LOADS`).
    """
    code = dtype_code(dtype)
    cap = _TILE[compute_code(code)]
    batch_tile = _even_split(max(geom.batch, 1), cap)
    channel_tile = _even_split(geom.in_channels_per_group, 4)

    def threads(batch_tile, channel_tile):
        lanes_b, lanes_c, columns = _input_layout(geom, code, batch_tile, channel_tile)
        bm, bc = lanes_b * batch_tile, lanes_c * channel_tile
        wu = -(-geom.in_width // geom.stride_w)
        hu = -(-geom.in_height // geom.stride_h)
        return (hu * geom.stride_h * -(-wu // columns) * geom.stride_w
                * -(-max(geom.batch, 1) // bm) * geom.groups
                * -(-geom.in_channels_per_group // bc) * lanes_b * lanes_c * columns)

    if threads(batch_tile, channel_tile) < _INPUT_MIN_THREADS and batch_tile > 4 and \
            geom.batch > 8:
        batch_tile = _even_split(geom.batch, 4)
    if threads(batch_tile, channel_tile) < _INPUT_MIN_THREADS and channel_tile > 2:
        channel_tile = _even_split(geom.in_channels_per_group, 2)
    return local_input_grad_gemm_launch(geom, dtype, batch_tile, channel_tile,
                                        gy_loads=gy_loads)


# --------------------------------------------------------------------------------------------
# weight gradient: dW_p = dY[:, :, p]^T . X_p, summed over the batch in a fixed order
# --------------------------------------------------------------------------------------------

@functools.lru_cache(maxsize=None)
def local_weight_grad_gemm_kernel(code, kernel_h, kernel_w, map_tile, tap_tile, map_lanes,
                                  tap_lanes, partial=False):
    """Weight gradient of local_conv2d as per-position products summed over the batch.

    A block owns ``blockDim.z`` consecutive positions of one output row, ``BO = map_lanes *
    map_tile`` maps of one group, ``stage_rows`` kernel rows (``kc = stage_rows * k_W``
    taps, at most ``tap_lanes * tap_tile``) and one slice of the batch. Thread ``(tk, to,
    j)`` owns position ``j``, maps ``to + q * map_lanes`` and taps ``tk + i * tap_lanes``: a
    ``TO x TK`` register tile; each image costs ``TO + TK`` shared-memory reads for ``TO *
    TK`` FMAs. ``chunk`` images at a time the block stages (1) ``gy[b, co, oy, ox]`` of its
    maps and positions, walked (image, map, position) positions fastest (coalesced), and
    (2) the input rows under its positions' windows, walked (image, kernel row, column)
    columns fastest (coalesced), zeros outside the image; then every thread adds the
    images' products in image order. The result is written once, consecutive threads on
    consecutive taps of a (map, position) row of the caller's layout (coalesced).

    ``partial`` builds float16's split-batch kernel: it writes float32 partial sums (name
    ending in ``_partial``); float32 and float64 partial sums have the output's type.

    Launch (see :func:`local_weight_grad_gemm_config`): ``block = (tap_lanes, map_lanes,
    positions)``, ``grid = (h_O * tiles_x, groups * map blocks, slices * k_tiles)`` (the
    kernel-row tiles vary fastest in z), dynamic shared memory ``chunk * (g_img + x_img)``
    words. Kernel arguments: flat ``x (n, c_I, h, w)``, ``gy (n, c_O, h_O, w_O)``, ``out
    (slices, c_O, h_O, w_O, c_Ig, k_H, k_W)`` (written), then ``n, c_I, h, w, c_O, h_O,
    w_O, c_Ig, c_Og, s_H, s_W, p_top, p_left, d_H, d_W, tiles_x, k_tiles, stage_rows,
    chunk, slice_n, o_pitch, g_img, x_img, win, slice_size`` and the walks' steps ``gsj,
    gso, gsb`` (gy: position, map, image) and ``xsc, xsr, xsb`` (input: column, kernel row,
    image) for all the block's threads: slice ``z`` sums images ``[z * slice_n, (z + 1) *
    slice_n)`` into ``out[z]`` (``slice_size`` elements apart).
    """
    scalar = _COMPUTE[code]
    store = scalar if partial else _SCALAR[code]
    KH, KW, TO, TK, LO, LK = kernel_h, kernel_w, map_tile, tap_tile, map_lanes, tap_lanes
    BO = LO * TO
    NACC = TO * TK
    U = WEIGHT_GRAD_STAGE_LOADS[compute_code(code)]

    def kernel(x, gy, out, n, c_I, h, wd, c_O, h_O, w_O, c_Ig, c_Og, s_H, s_W, pt, pl, d_H,
               d_W, tiles_x, k_tiles, stage_rows, chunk, slice_n, o_pitch, g_img, x_img, win,
               slice_size, gsj, gso, gsb, xsc, xsr, xsb):
        # Every thread takes part in the stages, so the bounds guards sit on the stores.
        tk = cuda.threadIdx.x
        to = cuda.threadIdx.y
        j = cuda.threadIdx.z
        ptw = cuda.blockDim.z
        tid = int32((j * LO + to) * LK + tk)

        oy = cuda.blockIdx.x // tiles_x
        ox0 = (cuda.blockIdx.x - oy * tiles_x) * ptw
        blocks_per_group = (c_Og + BO - 1) // BO
        g = cuda.blockIdx.y // blocks_per_group
        co0 = g * c_Og + (cuda.blockIdx.y - g * blocks_per_group) * BO
        sl = cuda.blockIdx.z // k_tiles
        kt = cuda.blockIdx.z - sl * k_tiles
        r0 = kt * stage_rows
        nr = int32(min(stage_rows, c_Ig * KH - r0))
        kc = nr * KW
        n_co = int32(min(BO, (g + 1) * c_Og - co0))
        n_j = int32(min(ptw, w_O - ox0))
        b_lo = sl * slice_n
        b_hi = min(n, b_lo + slice_n)
        n_pos = h_O * w_O
        iy0 = oy * s_H - pt
        ix0 = ox0 * s_W - pl
        x_stage = chunk * g_img  # the input stage follows the gy stage
        smem = cuda.shared.array(0, dtype=scalar)

        # Staged offset of each of the thread's taps in one image's input stage (taps past
        # the tile read a valid word and are never stored).
        xoff = cuda.local.array(TK, dtype=int32)
        for i in range(TK):
            t = tk + i * LK
            rr = t // KW
            kx = t - rr * KW
            o = 0
            if t < kc:
                o = rr * win + j * s_W + kx * d_W
            xoff[i] = o

        # gy walk (image, map, position) and input walk (image, kernel row, column), the
        # innermost fastest: starts once per stage, steps from the host, carries per element.
        src = cuda.local.array(U, dtype=int32)
        dst = cuda.local.array(U, dtype=int32)
        val = cuda.local.array(U, dtype=scalar)
        acc = cuda.local.array(NACC, dtype=scalar)
        gv = cuda.local.array(TO, dtype=scalar)
        xv = cuda.local.array(TK, dtype=scalar)
        for a in range(NACC):
            acc[a] = scalar(0)  # keep the math in the compute type
        g_img_len = c_O * n_pos
        x_img_len = c_I * h * wd

        for n0 in range(b_lo, b_hi, chunk):
            nb = int32(min(chunk, b_hi - n0))
            g_first = (n0 * c_O + co0) * n_pos + oy * w_O + ox0
            x_first = (n0 * c_I + g * c_Ig) * h * wd
            # Wait until everyone has read the previous stage before overwriting it.
            cuda.syncthreads()
            jj = int32(tid % ptw)
            rest = tid // ptw
            o = int32(rest % BO)
            b = int32(rest // BO)
            while b < nb:
                for e in range(U):
                    s = int32(-1)
                    d = int32(-1)
                    if b < nb:
                        d = b * g_img + o * o_pitch + jj
                        if o < n_co and jj < n_j:
                            s = b * g_img_len + o * n_pos + jj
                    src[e] = s
                    dst[e] = d
                    jj += gsj
                    o += gso
                    b += gsb
                    if jj >= ptw:
                        jj -= ptw
                        o += 1
                    if o >= BO:
                        o -= BO
                        b += 1
                for e in range(U):
                    v = scalar(0)
                    if src[e] >= 0:
                        v = scalar(gy[uint64(g_first + src[e])])
                    val[e] = v
                for e in range(U):
                    if dst[e] >= 0:
                        smem[uint64(dst[e])] = val[e]
            col = int32(tid % win)
            rest = tid // win
            rr = int32(rest % stage_rows)
            b = int32(rest // stage_rows)
            while b < nb:
                for e in range(U):
                    s = int32(-1)
                    d = int32(-1)
                    if b < nb:
                        d = x_stage + b * x_img + rr * win + col
                        if rr < nr:
                            c = (r0 + rr) // KH
                            iy = iy0 + (r0 + rr - c * KH) * d_H
                            ix = ix0 + col
                            if iy >= 0 and iy < h and ix >= 0 and ix < wd:
                                s = b * x_img_len + (c * h + iy) * wd + ix
                    src[e] = s
                    dst[e] = d
                    col += xsc
                    rr += xsr
                    b += xsb
                    if col >= win:
                        col -= win
                        rr += 1
                    if rr >= stage_rows:
                        rr -= stage_rows
                        b += 1
                for e in range(U):
                    v = scalar(0)
                    if src[e] >= 0:
                        v = scalar(x[uint64(x_first + src[e])])
                    val[e] = v
                for e in range(U):
                    if dst[e] >= 0:
                        smem[uint64(dst[e])] = val[e]
            # Wait until both stages are complete before anyone reads them.
            cuda.syncthreads()
            gp = int32(to * o_pitch + j)
            xp = int32(x_stage)
            for bb in range(nb):
                for q in range(TO):
                    gv[q] = smem[uint64(gp + q * LO * o_pitch)]
                for i in range(TK):
                    xv[i] = smem[uint64(xp + xoff[i])]
                for q in range(TO):
                    for i in range(TK):
                        acc[q * TK + i] += gv[q] * xv[i]
                gp += g_img
                xp += x_img

        if j < n_j:
            k_len = c_Ig * KH * KW
            first = sl * slice_size + ((co0 + to) * n_pos + oy * w_O + ox0 + j) * k_len \
                + r0 * KW + tk
            for q in range(TO):
                if to + q * LO < n_co:
                    for i in range(TK):
                        if tk + i * LK < kc:
                            out[uint64(first + i * LK)] = store(acc[q * TK + i])
                first += LO * n_pos * k_len

    name = f"local_conv2d_wgrad_gemm_{code}_k{KH}x{KW}_t{TO}x{TK}_l{LO}x{LK}"
    if partial and store is not _SCALAR[code]:
        name += "_partial"
    signature = ((_array(code, 1),) * 2 + (types.Array(store, 1, "C"),)
                 + (types.int64,) * 31)
    return KernelSpec(name, _rename(kernel, name), signature, _LAUNCH_BOUNDS)


class LocalWeightGradGemmConfig(NamedTuple):
    """Compile-time constants and launch shape of one local_conv2d weight-gradient call."""

    kernel: KernelSpec
    block: tuple         # (tap lanes, map lanes, positions per block)
    grid: tuple          # (position tiles, groups * map blocks, slices * k tiles)
    shared_bytes: int    # dynamic shared memory
    tiles_x: int         # position tiles along an output row
    k_tiles: int         # tiles of stage_rows kernel rows
    stage_rows: int      # kernel rows (k_W taps each) per block
    chunk: int           # images per shared-memory stage
    slices: int          # batch slices: > 1 sums partials in scratch, in a fixed order
    slice_n: int         # images per slice
    o_pitch: int         # words between maps in the gy stage (>= positions)
    g_img: int           # words of one image's gy stage
    x_img: int           # words of one image's input stage
    win: int             # input columns under the block's positions
    scratch_elements: int  # partial sums, of the compute type (0: straight into the output)
    walk: tuple          # steps of the staging walks (gsj, gso, gsb, xsc, xsr, xsb)


#: Bytes of split-batch partial sums the local weight gradient may allocate.
PARTIAL_BUDGET_BYTES = 64 * 1024 * 1024
# Images one batch slice sums at least.
_MIN_SLICE_IMAGES = 16


def local_weight_grad_gemm_launch(geom, dtype, map_tile, tap_tile, stage_rows, layout=None,
                                  slices=1, chunk=None):
    """The :class:`LocalWeightGradGemmConfig` of given choices
    (:func:`local_weight_grad_gemm_config` makes them; tests force small tiles, stages and
    slices through this): register tile ``map_tile x tap_tile``, kernel rows per block,
    ``layout = (tap lanes, map lanes, positions)`` (default: derived from the tile), batch
    slices, images per stage (default: as many as fit)."""
    code = dtype_code(dtype)
    words = GRAD_STAGE_BYTES // _stage_itemsize(code)
    kw = geom.kernel_width
    n_rows = geom.in_channels_per_group * geom.kernel_height
    stage_rows = max(1, min(stage_rows, n_rows))
    kc = stage_rows * kw
    if layout is None:
        layout = _weight_layout(geom, code, map_tile, tap_tile, stage_rows)
    lanes_k, lanes_o, positions = layout
    if lanes_k * tap_tile < kc:
        raise ValueError(f"{lanes_k} x {tap_tile} taps do not cover {kc}")
    bo = lanes_o * map_tile
    win = (positions - 1) * geom.stride_w + (kw - 1) * geom.dilation_w + 1
    lanes = _warps(lanes_k, lanes_o, positions)
    o_pitch = _pitch(positions, lambda p: max(_bank_wavefronts([b * p + c for _, b, c in w])
                                              for w in lanes))
    g_img = bo * o_pitch
    x_img = stage_rows * win
    if g_img + x_img > words:
        raise ValueError(
            f"the local_conv2d weight gradient on the GPU stages one image's gradient and "
            f"input rows for {positions} positions in shared memory: "
            f"{(g_img + x_img) * _stage_itemsize(code)} bytes for a kernel {kw} wide with "
            f"stride {geom.stride_w} and dilation {geom.dilation_w} exceeds "
            f"{GRAD_STAGE_BYTES}; use device='cpu'")
    batch = max(geom.batch, 1)
    slices = max(1, min(slices, batch))
    slice_n = -(-batch // slices)
    slices = -(-batch // slice_n)
    n_pos = geom.out_height * geom.out_width
    image_in = geom.in_channels * geom.in_height * geom.in_width
    most = min(words // (g_img + x_img), (2**31 - 1) // max(geom.out_channels * n_pos,
                                                           image_in, 1))
    if most < 1:
        raise ValueError(
            "the local_conv2d weight gradient on the GPU indexes an image with 32-bit "
            "offsets: this layer's images are too large; use device='cpu'")
    chunk = max(1, min(chunk or most, most, slice_n))
    tiles_x = -(-geom.out_width // positions)
    k_tiles = -(-n_rows // stage_rows)
    grid = check_grid((geom.out_height * tiles_x,
                       geom.groups * -(-geom.out_channels_per_group // bo),
                       slices * k_tiles), "the local_conv2d weight gradient")
    partial = slices > 1 and code != compute_code(code)
    scratch = 0
    if slices > 1:
        scratch = slices * math.prod(geom.local_weight_shape())
    spec = local_weight_grad_gemm_kernel(code, geom.kernel_height, kw, map_tile, tap_tile,
                                         lanes_o, lanes_k, partial)
    return LocalWeightGradGemmConfig(spec, (lanes_k, lanes_o, positions), grid,
                                     chunk * (g_img + x_img) * _stage_itemsize(code), tiles_x,
                                     k_tiles, stage_rows, chunk, slices, slice_n, o_pitch,
                                     g_img, x_img, win, scratch,
                                     _walk_steps(lanes_k * lanes_o * positions, positions, bo)
                                     + _walk_steps(lanes_k * lanes_o * positions, win,
                                                   stage_rows))


def _weight_layout(geom, code, map_tile, tap_tile, stage_rows):
    """(tap lanes, map lanes, positions): tap lanes cover the block's taps, map lanes fill a
    warp, positions up to 256 threads (fewer where one image's stage would not fit)."""
    kc = stage_rows * geom.kernel_width
    lanes_k = -(-kc // tap_tile)
    lanes_o = min(-(-geom.out_channels_per_group // map_tile), max(1, 32 // lanes_k))
    # (positions on the block's z axis: at most 64 threads there on every GPU)
    positions = _even_split(geom.out_width,
                            max(1, min(BLOCK_Z_LIMIT, _MAX_THREADS // (lanes_k * lanes_o))))
    words = GRAD_STAGE_BYTES // _stage_itemsize(code)
    bo = lanes_o * map_tile

    def per_image(p):
        return bo * (p + 31) + stage_rows * ((p - 1) * geom.stride_w
                                             + (geom.kernel_width - 1) * geom.dilation_w + 1)

    while positions > 1 and per_image(positions) > words:
        positions = _even_split(geom.out_width, positions - 1)
    return lanes_k, lanes_o, positions


def local_weight_grad_gemm_config(geom, dtype):
    """Specialisation, launch shape and batch slicing of the local_conv2d weight gradient
    (pure, no GPU).

    Register tile up to 4 maps x 8 taps (float16, float32; float64 4 x 4), each split evenly;
    a block takes whole kernel rows, about 64 taps (32 in float64: the rows split evenly),
    its tap lanes covering them, map lanes filling a warp, positions of an output row up to
    256 threads. Where the grid would give fewer than two waves of 512 threads on 132 SMs, the
    batch is split into slices of at least 16 images (at most 8, their float32/float64
    partial sums within :data:`PARTIAL_BUDGET_BYTES`), added in slice order by a second
    kernel.
    """
    code = dtype_code(dtype)
    cap = _TILE[compute_code(code)]
    kw = geom.kernel_width
    n_rows = geom.in_channels_per_group * geom.kernel_height
    stage_rows = _even_split(n_rows, max(1, (8 * cap) // kw))
    kc = stage_rows * kw
    tap_tile = _even_split(kc, cap)
    if -(-kc // tap_tile) > _MAX_THREADS:
        tap_tile = -(-kc // _MAX_THREADS)
    map_tile = _even_split(geom.out_channels_per_group, 4)
    lanes_k, lanes_o, positions = _weight_layout(geom, code, map_tile, tap_tile, stage_rows)
    threads = (geom.out_height * -(-geom.out_width // positions) * geom.groups
               * -(-geom.out_channels_per_group // (lanes_o * map_tile))
               * -(-n_rows // stage_rows) * lanes_k * lanes_o * positions)
    slices = 1
    if threads < _TARGET_THREADS:
        partial = _NUMPY[compute_code(code)].itemsize
        weights = math.prod(geom.local_weight_shape())
        affordable = PARTIAL_BUDGET_BYTES // max(weights * partial, 1)
        slices = max(1, min(8, affordable, geom.batch // _MIN_SLICE_IMAGES,
                            -(-_TARGET_THREADS // threads)))
    return local_weight_grad_gemm_launch(geom, dtype, map_tile, tap_tile, stage_rows,
                                         slices=slices)


def local_weight_grad_gemm_scratch_elements(geom, dtype):
    """Device scratch of the local_conv2d weight gradient, in elements of ``dtype``: the
    batch slices' partial sums (float16's float32 partial sums count two each)."""
    config = local_weight_grad_gemm_config(geom, dtype)
    return (config.scratch_elements * _NUMPY[compute_code(dtype_code(dtype))].itemsize
            // np.dtype(dtype).itemsize)


def gemm_grad_specialisations(geom, dtype):
    """``[(KernelSpec, dynamic shared bytes)]``: the two local gradient kernels a layer
    launches (the weight gradient's slice sum, where it splits the batch, is
    :func:`gpuconv.cuda.grad_kernels.sum_slices_kernel`, listed with that module's kernels)."""
    igrad = local_input_grad_gemm_config(geom, dtype)
    wgrad = local_weight_grad_gemm_config(geom, dtype)
    return [(igrad.kernel, igrad.shared_bytes), (wgrad.kernel, wgrad.shared_bytes)]
