"""CUDA kernels (Numba) and the factories that specialise them.

Kernel construction lives here; array handling and launches live in :mod:`gpuconv.cuda.launch`.
Each factory is memoised on exactly the compile-time constants that change the generated
code, and the kernel it builds is named by them (``conv2d_f32_k3x3_r2x2_c8``), so a profile
is readable. A factory returns a :class:`KernelSpec`: the bare Python function, its Numba
signature, its name and launch bounds. That is enough for :func:`numba.cuda.compile_ptx` on
a machine without a GPU (see :func:`workload_specialisations`, :mod:`gpuconv.cuda.ptx` and
``scripts/ptx_report.py``); :func:`compiled` turns a spec into a launchable kernel.

Kernels index flat (1-D) arrays with non-negative 64-bit offsets (cast to unsigned, so Numba
emits no negative-index wraparound): flat offsets past 2**31 elements are safe, and the
address arithmetic stays a few adds.

Names inside kernels follow the notation of :mod:`gpuconv.geometry`.

Each factory takes a dtype code: ``"f32"`` and ``"f64"`` compute in the input dtype;
``"f16"`` stores float16 and computes in float32. A float16 value is converted to float32
once, as it is loaded from global memory, and every result is rounded to float16 once, as
it is stored; accumulators, registers and shared-memory stages hold float32 (see
:func:`compute_code`). Accumulators are typed and kernels are compiled without fastmath,
so NaN and Inf reach exactly the outputs whose window holds them.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import numpy as np
from numba import cuda, int32, int64, types, uint64

from .. import workloads
from ..device import simulator_enabled
from . import (conv2d_gemm, conv2d_gemm_grad, grad_kernels, local_gemm, local_grad_gemm,
               local_grad_positions, local_stream, tiled_kernels)
from .spec import (BLOCK_Z_LIMIT, _COMPUTE, _NUMPY, _SCALAR, CODES, GRID_YZ_LIMIT,
                   LOCAL_STAGE_BYTES, SHARED_BUDGET_BYTES, SHARED_LIMIT_BYTES, KernelSpec, _array,
                   _bank_wavefronts, _conv2d_launch_bounds, _even_split, _pow2_at_least,
                   _rename,
                   _stage_itemsize, check_grid, compiled, compute_code, dtype_code)

__all__ = ["KernelSpec", "Conv2dConfig", "LocalConv2dConfig", "conv2d_kernel",
           "local_conv2d_kernel", "copy_kernel", "compiled",
           "conv2d_config", "conv2d_direct_config", "local_conv2d_config",
           "local_conv2d_forward_config", "forward_candidates",
           "workload_specialisations", "dtype_code",
           "compute_code", "CODES",
           "workload_kernel_names", "workload_geometries", "SHARED_BUDGET_BYTES",
           "GRID_YZ_LIMIT", "check_grid",
           "SHARED_LIMIT_BYTES", "LOCAL_STAGE_BYTES", "LOCAL_FORWARD_STAGE_BYTES",
           "TARGET_SMS", "local_read_wavefronts", "local_conv2d_partial_dtype",
           "local_conv2d_launch", "LOCAL_WEIGHT_LOADS", "LOCAL_INPUT_LOADS"]

# --------------------------------------------------------------------------------------------
# conv2d: direct convolution, shared-memory tiles, register blocking
# --------------------------------------------------------------------------------------------

@functools.lru_cache(maxsize=None)
def conv2d_kernel(code, kernel_h, kernel_w, rows, cols, channels):
    """Shared-weight convolution kernel, specialised on dtype, kernel size and register block.

    Args:
        code: ``"f16"``, ``"f32"`` or ``"f64"`` (the arrays' dtype).
        kernel_h, kernel_w: ``k_H, k_W``.
        rows, cols: outputs per thread along H and W (a thread owns outputs
            ``(ty + i * blockDim.y, tx + j * blockDim.x)`` of its block's tile, so neighbouring
            threads read neighbouring shared-memory words).
        channels: output channels per block (every thread computes all of them).

    Launch: ``grid = (tiles_y * tiles_x, groups * ceil(c_Og / channels), min(n, 65535))``,
    ``block = (bx, by)``, dynamic shared memory
    ``chunk * (tile_h * tile_w + k_H * k_W * channels) * itemsize`` bytes (``itemsize`` of
    the compute type: 4 for float16), where the output
    tile is ``(by * rows) x (bx * cols)`` and the input tile (with halo)
    ``tile_h = (by * rows - 1) * s_H + (k_H - 1) * d_H + 1`` (same for W).

    Kernel arguments: the flat (C-order, 1-D) ``x (n, c_I, h, w)``,
    ``weight (c_O, c_Ig, k_H, k_W)``, ``bias (c_O,)`` (or ``out``) and ``out (n, c_O, h_O, w_O)``,
    then ``has_bias, n, c_I, h, w, c_O, h_O, w_O, c_Ig, c_Og, s_H, s_W, p_top, p_left, d_H,
    d_W, tiles_x, tile_h, tile_w, chunk``. Flat arrays indexed with non-negative 64-bit
    offsets keep the address arithmetic to a few adds (no negative-index wraparound).
    """
    store, scalar = _SCALAR[code], _COMPUTE[code]
    KH, KW, RY, RX, CB = kernel_h, kernel_w, rows, cols, channels
    KHW = KH * KW
    NPOS = RY * RX
    NACC = NPOS * CB

    def kernel(x, weight, bias, out, has_bias, n, c_I, h, wd, c_O, h_O, w_O, c_Ig, c_Og,
               s_H, s_W, pt, pl, d_H, d_W, tiles_x, tile_h, tile_w, chunk):
        # A tile kernel: every thread takes part in the shared-memory stages, so the bounds
        # guard sits on the stores, not at the top.
        tx = cuda.threadIdx.x
        ty = cuda.threadIdx.y
        bx = cuda.blockDim.x
        by = cuda.blockDim.y
        tid = ty * bx + tx
        nthreads = bx * by
        tile_hw = tile_h * tile_w

        tile = cuda.blockIdx.x
        oy0 = (tile // tiles_x) * (by * RY)
        ox0 = (tile % tiles_x) * (bx * RX)
        blocks_per_group = (c_Og + CB - 1) // CB
        g = cuda.blockIdx.y // blocks_per_group
        co0 = g * c_Og + (cuda.blockIdx.y % blocks_per_group) * CB
        co_end = min(co0 + CB, (g + 1) * c_Og)
        iy0 = oy0 * s_H - pt
        ix0 = ox0 * s_W - pl

        smem = cuda.shared.array(0, dtype=scalar)
        w_base = chunk * tile_hw  # weights follow the input tiles in shared memory

        # Offsets of this thread's outputs inside the input tile.
        base = cuda.local.array(NPOS, dtype=int64)
        for i in range(RY):
            for j in range(RX):
                base[i * RX + j] = (ty + i * by) * s_H * tile_w + (tx + j * bx) * s_W

        acc = cuda.local.array(NACC, dtype=scalar)
        wreg = cuda.local.array(CB, dtype=scalar)

        for b in range(cuda.blockIdx.z, n, cuda.gridDim.z):
            for a in range(NACC):
                acc[a] = scalar(0)  # keep the math in the compute type
            for c0 in range(0, c_Ig, chunk):
                nc = min(chunk, c_Ig - c0)
                # Stage the input tiles of nc channels, zeros outside the image (padding).
                for c in range(nc):
                    plane = (b * c_I + g * c_Ig + c0 + c) * h
                    for r in range(ty, tile_h, by):
                        iy = iy0 + r
                        row = (plane + iy) * wd
                        srow = c * tile_hw + r * tile_w
                        for col in range(tx, tile_w, bx):
                            ix = ix0 + col
                            v = scalar(0)
                            if iy >= 0 and iy < h and ix >= 0 and ix < wd:
                                v = scalar(x[uint64(row + ix)])
                            smem[uint64(srow + col)] = v
                # Stage the weights as [c][ky][kx][channel], zeros past the group's end;
                # rest = c * k_H * k_W + ky * k_W + kx walks one output channel's weights.
                for idx in range(tid, nc * KHW * CB, nthreads):
                    q = idx % CB
                    rest = idx // CB
                    v = scalar(0)
                    if co0 + q < co_end:
                        v = scalar(weight[uint64(((co0 + q) * c_Ig + c0) * KHW + rest)])
                    smem[uint64(w_base + idx)] = v
                # Wait until both tiles are staged before anyone reads them.
                cuda.syncthreads()
                for c in range(nc):
                    for ky in range(KH):
                        for kx in range(KW):
                            wofs = w_base + ((c * KH + ky) * KW + kx) * CB
                            for q in range(CB):
                                wreg[q] = smem[uint64(wofs + q)]
                            xofs = c * tile_hw + ky * d_H * tile_w + kx * d_W
                            for p in range(NPOS):
                                xv = smem[uint64(xofs + base[p])]
                                for q in range(CB):
                                    acc[p * CB + q] += xv * wreg[q]
                # Wait until everyone is done with the tiles before the next stage overwrites them.
                cuda.syncthreads()
            # Flat output offsets, one channel plane apart.
            plane = h_O * w_O
            first = (b * c_O + co0) * plane
            for i in range(RY):
                oy = oy0 + ty + i * by
                for j in range(RX):
                    ox = ox0 + tx + j * bx
                    if oy < h_O and ox < w_O:
                        ofs = first + oy * w_O + ox
                        for q in range(CB):
                            if co0 + q < co_end:
                                v = acc[(i * RX + j) * CB + q]
                                if has_bias:
                                    v += scalar(bias[uint64(co0 + q)])
                                out[uint64(ofs)] = store(v)
                            ofs += plane

    name = f"conv2d_{code}_k{KH}x{KW}_r{RY}x{RX}_c{CB}"
    signature = (_array(code, 1),) * 4 + (types.int64,) * 20
    return KernelSpec(name, _rename(kernel, name), signature, _conv2d_launch_bounds(NACC))


class Conv2dConfig(NamedTuple):
    """Compile-time constants and launch shape of one conv2d call."""

    kernel: KernelSpec
    block: tuple       # (bx, by)
    grid: tuple        # (tiles, channel blocks, batch blocks)
    tiles_x: int
    tile_h: int
    tile_w: int
    chunk: int
    shared_bytes: int


def conv2d_config(geom, dtype):
    """Pick the specialisation and launch shape of conv2d for ``geom`` and ``dtype``.

    A pure function of the geometry (no GPU needed): register block ``2 x 4`` (float32, output
    wider than 32) or ``2 x 2`` outputs x up to 8 (float32) or 4 (float64) output channels
    per thread (the group's channels split evenly); a block of at most 16 x 8 threads,
    shrunk to the output and (down to one warp) to keep one input channel's tile (with halo)
    within half the shared-memory budget; as many input channels per stage as fit the budget
    (at least one, whose stage may take up to ``SHARED_LIMIT_BYTES``). float16 takes the
    float32 choices (:func:`compute_code`).

    Layers with many input channels a group (:func:`gpuconv.cuda.conv2d_gemm.use_gemm`) take
    the implicit GEMM instead: its :class:`~gpuconv.cuda.conv2d_gemm.Conv2dGemmConfig`.
    """

    if conv2d_gemm.use_gemm(geom):
        return conv2d_gemm.conv2d_gemm_config(geom, dtype)
    return conv2d_direct_config(geom, dtype)


def conv2d_direct_config(geom, dtype):
    """The direct kernel's :class:`Conv2dConfig` for ``geom``, whatever its channels (the
    dispatcher's choice for few channels a group, :func:`conv2d_config`; the acceptance
    run times it beside the implicit GEMM on every layer)."""
    code = dtype_code(dtype)
    fp32 = compute_code(code) == "f32"
    itemsize = _stage_itemsize(code)
    # float32: 2 x 4 outputs x 8 channels (16 shared-memory loads per 64 FMAs) where the
    # output is wide enough to fill the tiles, else 2 x 2; float64: 2 x 2 x 4.
    rows = 2
    cols = 4 if fp32 and geom.out_width > 32 else 2
    channels = _even_split(geom.out_channels_per_group, 8 if fp32 else 4)
    kh, kw = geom.kernel_height, geom.kernel_width
    # At most 16 x 8 threads: at ~150-170 registers a thread, three such blocks share an
    # SM's 64K registers (12 warps), where a single 256-thread block would leave 8.
    bx = _pow2_at_least(-(-geom.out_width // cols), 16)
    by = _pow2_at_least(-(-geom.out_height // rows), 8)
    while bx * by < 32 and (bx < 32 or by < 32):
        if bx <= by and bx < 32:
            bx *= 2
        else:
            by *= 2

    def tile_dims(bx, by):
        tile_h = (by * rows - 1) * geom.stride_h + (kh - 1) * geom.dilation_h + 1
        tile_w = (bx * cols - 1) * geom.stride_w + (kw - 1) * geom.dilation_w + 1
        return tile_h, tile_w

    def stage_bytes(bx, by):
        tile_h, tile_w = tile_dims(bx, by)
        return (tile_h * tile_w + kh * kw * channels) * itemsize

    # Shrink to one warp to bring a channel's stage within half the budget; below a warp
    # only if the stage would not fit at all (large strides x dilations).
    while (stage_bytes(bx, by) > SHARED_BUDGET_BYTES // 2 and bx * by > 32) or \
            (stage_bytes(bx, by) > SHARED_LIMIT_BYTES and bx * by > 1):
        if by >= bx:
            by //= 2
        else:
            bx //= 2
    if stage_bytes(bx, by) > SHARED_LIMIT_BYTES:
        raise ValueError(
            f"conv2d on the GPU needs one input channel's dilated window in shared memory: "
            f"{stage_bytes(bx, by)} bytes for this kernel size, stride and dilation exceeds "
            f"{SHARED_LIMIT_BYTES}; use device='cpu'")
    tile_h, tile_w = tile_dims(bx, by)
    per_channel = tile_h * tile_w + kh * kw * channels
    chunk = max(1, min(geom.in_channels_per_group, SHARED_BUDGET_BYTES // (per_channel * itemsize)))
    tiles_y = -(-geom.out_height // (by * rows))
    tiles_x = -(-geom.out_width // (bx * cols))
    grid = check_grid((tiles_y * tiles_x,
                       geom.groups * -(-geom.out_channels_per_group // channels),
                       max(1, min(geom.batch, GRID_YZ_LIMIT))), "conv2d")
    spec = conv2d_kernel(code, kh, kw, rows, cols, channels)
    return Conv2dConfig(spec, (bx, by), grid, tiles_x, tile_h, tile_w, chunk,
                        chunk * per_channel * itemsize)


# --------------------------------------------------------------------------------------------
# local_conv2d: a batched GEMM over output positions, Y[:, :, p] = X_p . W_p^T
# --------------------------------------------------------------------------------------------

@functools.lru_cache(maxsize=None)
def local_conv2d_kernel(code, kernel_h, kernel_w, batch_tile, map_tile, batch_lanes,
                        map_lanes, partial=False, tiling=None, input_loads=None):
    """Locally connected convolution as a batched GEMM, specialised on dtype, kernel size,
    register tile and thread layout.

    Per output position ``p`` the layer is the product ``Y[:, :, p] = X_p . W_p^T`` with
    ``M = n`` (images), ``N = c_Og`` (maps of a group) and ``K = c_Ig * k_H * k_W``: ``X_p``
    is the input window of ``p`` (an implicit im2col, never built) and ``W_p`` the weights
    of ``p`` in the caller's layout ``(c_O, h_O, w_O, c_Ig, k_H, k_W)``, ``K`` contiguous
    for each (map, position).

    A block computes ``BM = batch_lanes * batch_tile`` images x ``BO = map_lanes * map_tile``
    maps of one group for ``blockDim.z`` consecutive positions of one output row. Thread
    ``(tb, to, j)`` owns position ``j`` of the segment, images ``tb, tb + batch_lanes, ...``
    and maps ``to, to + map_lanes, ...``: ``batch_tile x map_tile`` accumulators, each step
    of ``K`` costs ``batch_tile + map_tile`` shared-memory reads for ``batch_tile *
    map_tile`` FMAs, and the lanes of a warp read consecutive words.

    ``K`` is walked a few kernel rows (``k_W`` values of one input channel) at a time.
    For each stage the block copies (1) the weights of its positions and maps, walked
    (position, map, tap) with the taps fastest, so consecutive threads load consecutive
    words of a (map, position) row (coalesced; every weight read from memory once per
    block), stored tap-major with the maps innermost at an odd pitch, and (2) the input rows
    those kernel rows touch, for its images, consecutive threads on consecutive columns
    (coalesced), zeros outside the image, stored column-major with the images innermost.
    The input window of the segment serves all ``BO`` maps and every position that overlaps
    it. Both walks advance with carries (no division per element) in rounds of
    :data:`LOCAL_WEIGHT_LOADS` / :data:`LOCAL_INPUT_LOADS` loads issued before their
    stores; the hot loop reads shared memory at immediate offsets from two pointers, one
    add each per kernel tap.

    ``partial`` builds the split-K variant's kernel for float16: it writes float32 partial
    sums (its name ends in ``_partial``); for float32 and float64 the partial sums have the
    output's type and the same kernel serves both.

    ``tiling`` (``"periodic"`` or ``"blocks"``, see :func:`gpuconv.geometry.tile_slots`)
    builds the tiled convolution's kernel (named ``tiled_conv2d_<tiling>_...``): the weights
    are ``(c_O, t_H, t_W, c_Ig, k_H, k_W)`` kernel slots and position ``(oy, ox)`` reads the
    slot of its row and column, computed where a weight is staged; a bias per position is
    one per slot (``bias_len = t_H * t_W``). Nothing else changes. Without it (the
    locally connected layer) the last two arguments ``t_H, t_W`` are not read.

    ``input_loads`` (default :data:`LOCAL_INPUT_LOADS` of the compute type, at most
    :data:`LOCAL_WEIGHT_LOADS`) sets the input walk's loads per round: the acceptance run
    times other counts beside the default (the name then ends in ``_x<count>``); the sums
    and their order do not depend on it.

    Launch (see :func:`local_conv2d_config`): ``block = (batch_lanes, map_lanes,
    positions)``, ``grid = (batch tiles * position tiles, groups * map blocks, slices)``
    (the batch tiles of one position tile are neighbours in the grid, so their shared weights
    come from L2), dynamic shared memory ``positions * pos_pitch + stage_rows * win *
    x_pitch`` words of the compute type (``win`` the input columns under the
    segment). Kernel arguments: the flat ``x (n, c_I, h, w)``,
    ``weight``, ``bias (c_O, bias_len)`` (or ``out``) and ``out (slices, n, c_O, h_O,
    w_O)``, then ``has_bias, bias_len, n, c_I, h, w, c_O, h_O, w_O, c_Ig, c_Og, s_H, s_W,
    p_top, p_left, d_H, d_W, tiles_x, batch_tiles, stage_rows, slice_rows, w_pitch,
    pos_pitch, x_pitch, slice_size`` and the walks' constants ``win, step_j, step_o,
    step_k, step_r, step_b, step_c`` (:func:`_local_walk`): slice ``z`` sums kernel rows
    ``[z * slice_rows, (z + 1) * slice_rows)`` into ``out[z]`` (``slice_size`` elements
    apart, 0 for one slice; the bias goes to slice 0).
    """
    scalar = _COMPUTE[code]
    store = scalar if partial else _SCALAR[code]
    KH, KW, TM, TO, LB, LO = kernel_h, kernel_w, batch_tile, map_tile, batch_lanes, map_lanes
    NACC = TM * TO
    BM = LB * TM
    BO = LO * TO
    UNROLL = LOCAL_WEIGHT_LOADS[compute_code(code)]  # weight loads in flight per thread
    XDEFAULT = LOCAL_INPUT_LOADS[compute_code(code)]
    XUNROLL = XDEFAULT if input_loads is None else int(input_loads)  # loads in flight
    if not 1 <= XUNROLL <= UNROLL:  # both walks hold their values in the same registers
        raise ValueError(f"input_loads must be 1 to {UNROLL}, got {input_loads!r}")
    SLOTS = {None: 0, "periodic": 1, "blocks": 2}[tiling]  # how positions pick weights
    MAXP = _LOCAL_MAX_THREADS if SLOTS else 1          # positions a block may hold

    def kernel(x, weight, bias, out, has_bias, bias_len, n, c_I, h, wd, c_O, h_O, w_O,
               c_Ig, c_Og, s_H, s_W, pt, pl, d_H, d_W, tiles_x, batch_tiles, stage_rows,
               slice_rows, w_pitch, pos_pitch, x_pitch, slice_size, win, step_j, step_o,
               step_k, step_r, step_b, step_c, t_H, t_W):
        # Every thread takes part in the stages, so the bounds guards sit on the stores.
        # Values that stay live across the loops are kept in 32 bits (they are small).
        tb = cuda.threadIdx.x
        to = cuda.threadIdx.y
        j = cuda.threadIdx.z
        ptw = cuda.blockDim.z
        tid = (j * LO + to) * LB + tb

        pos_tile = cuda.blockIdx.x // batch_tiles
        n0 = (cuda.blockIdx.x - pos_tile * batch_tiles) * BM
        oy = pos_tile // tiles_x
        ox0 = (pos_tile - oy * tiles_x) * ptw
        blocks_per_group = (c_Og + BO - 1) // BO
        g = cuda.blockIdx.y // blocks_per_group
        co0 = g * c_Og + (cuda.blockIdx.y - g * blocks_per_group) * BO
        n_co = int32(min(BO, (g + 1) * c_Og - co0))
        n_j = int32(min(ptw, w_O - ox0))
        n_b = int32(min(BM, n - n0))
        r_end = int32(min(c_Ig * KH, (cuda.blockIdx.z + 1) * slice_rows))
        iy0 = int32(oy * s_H - pt)
        ix0 = int32(ox0 * s_W - pl)
        x_stage = int32(ptw * pos_pitch)  # the input stage follows the weight stage
        # Flat offsets of the block's first weight row and first input row; a map's
        # weights are w_maps rows apart (one per position, or per kernel slot).
        # The tiled kernel reads position j's weights at row slot_row[j] of its maps, a
        # table the block fills once (the slot arithmetic stays out of the staging loop).
        slot_row = cuda.shared.array(MAXP, dtype=int32)
        if SLOTS == 0:
            w_first = (co0 * h_O + oy) * w_O + ox0
            w_maps = h_O * w_O
        else:
            w_first = co0 * t_H * t_W
            w_maps = t_H * t_W
            if tid < ptw:
                if SLOTS == 1:
                    slot_row[tid] = (oy % t_H) * t_W + (ox0 + tid) % t_W
                else:
                    slot_row[tid] = (oy * t_H // h_O) * t_W + (ox0 + tid) * t_W // w_O
            # (the first stage's barrier orders these stores before any read)
        x_first = (n0 * c_I + g * c_Ig) * h
        smem = cuda.shared.array(0, dtype=scalar)

        # Weight elements (position, map, tap) of the stage, taps fastest, in steps of the
        # block's threads: the walk advances with carries (steps from the host), no division.
        KC = stage_rows * KW
        first_k = int32(tid % KC)
        rest = tid // KC
        first_o = int32(rest % BO)
        first_j = int32(rest // BO)
        n_pos = h_O * w_O
        k_len = c_Ig * KH * KW
        w_block = w_first * k_len  # flat offset of the block's first weight
        # Input elements (kernel row, image, column) of the stage, columns fastest.
        per_row = BM * win
        first_r = int32(tid // per_row)
        rest = tid - first_r * per_row
        first_b = int32(rest // win)
        first_c = int32(rest - first_b * win)

        w_src = cuda.local.array(UNROLL, dtype=int32)
        w_dst = cuda.local.array(UNROLL, dtype=int32)
        w_val = cuda.local.array(UNROLL, dtype=scalar)
        x_src = cuda.local.array(XUNROLL, dtype=int64)
        acc = cuda.local.array(NACC, dtype=scalar)
        xv = cuda.local.array(TM, dtype=scalar)
        wv = cuda.local.array(TO, dtype=scalar)
        for a in range(NACC):
            acc[a] = scalar(0)  # keep the math in the compute type
        w_base = int32(j * pos_pitch + to)
        x_base = int32(x_stage + j * s_W * x_pitch + tb)
        x_tap = int32(d_W * x_pitch)                  # next kernel column
        x_skip = int32((win - KW * d_W) * x_pitch)    # from past the last column to the next row

        for r0 in range(cuda.blockIdx.z * slice_rows, r_end, stage_rows):
            nr = min(stage_rows, r_end - r0)
            kc = nr * KW
            # Wait until everyone has read the previous stage before overwriting it.
            cuda.syncthreads()
            # Weights: UNROLL elements of the stage per round, loads first, so that each
            # thread has UNROLL loads in flight; elements off the tile load a valid word
            # (the block's first) and are not stored.
            sj = first_j
            so = first_o
            kk = first_k
            while sj < ptw:
                for u in range(UNROLL):
                    src = 0
                    dst = -1
                    if sj < n_j and so < n_co and kk < kc:
                        wpos = sj if SLOTS == 0 else slot_row[sj]
                        src = (so * w_maps + wpos) * k_len + r0 * KW + kk
                        dst = sj * pos_pitch + kk * w_pitch + so
                    w_src[u] = src  # 32 bits: the config keeps a block's weights under 2**31
                    w_dst[u] = dst
                    kk += step_k
                    so += step_o
                    sj += step_j
                    if kk >= KC:
                        kk -= KC
                        so += 1
                    if so >= BO:
                        so -= BO
                        sj += 1
                for u in range(UNROLL):
                    w_val[u] = scalar(weight[uint64(w_block + w_src[u])])
                for u in range(UNROLL):
                    if w_dst[u] >= 0:
                        smem[uint64(w_dst[u])] = w_val[u]
            # Input: likewise XUNROLL elements per round; elements off the image are zeros,
            # those past the stage or the batch are not stored.
            rr = first_r
            b = first_b
            col = first_c
            while rr < nr:
                for u in range(XUNROLL):
                    src = -1
                    dst = -1
                    if rr < nr and b < n_b:
                        c = (r0 + rr) // KH
                        iy = iy0 + (r0 + rr - c * KH) * d_H
                        ix = ix0 + col
                        dst = x_stage + rr * win * x_pitch + col * x_pitch + b
                        if iy >= 0 and iy < h and ix >= 0 and ix < wd:
                            src = ((x_first + (b * c_I + c) * h) + iy) * wd + ix
                    x_src[u] = src
                    w_dst[u] = dst
                    col += step_c
                    b += step_b
                    rr += step_r
                    if col >= win:
                        col -= win
                        b += 1
                    if b >= BM:
                        b -= BM
                        rr += 1
                for u in range(XUNROLL):
                    v = scalar(0)
                    if x_src[u] >= 0:
                        v = scalar(x[uint64(x_src[u])])
                    w_val[u] = v
                for u in range(XUNROLL):
                    if w_dst[u] >= 0:
                        smem[uint64(w_dst[u])] = w_val[u]
            # Wait until both stages are complete before anyone reads them.
            cuda.syncthreads()
            xo = x_base
            wo = w_base
            for rr in range(nr):
                for kx in range(KW):
                    for i in range(TM):
                        xv[i] = smem[uint64(xo + i * LB)]
                    for q in range(TO):
                        wv[q] = smem[uint64(wo + q * LO)]
                    for i in range(TM):
                        for q in range(TO):
                            acc[i * TO + q] += xv[i] * wv[q]
                    xo += x_tap
                    wo += w_pitch
                xo += x_skip

        if j < n_j:
            p = oy * w_O + ox0 + j
            if SLOTS == 0:
                bias_pos = p if bias_len > 1 else 0
            else:
                bias_pos = slot_row[j] if bias_len > 1 else 0
            first = cuda.blockIdx.z * slice_size
            for i in range(TM):
                b = tb + i * LB
                if b < n_b:
                    ofs = first + ((n0 + b) * c_O + co0 + to) * n_pos + p
                    for q in range(TO):
                        if to + q * LO < n_co:
                            v = acc[i * TO + q]
                            if has_bias != 0 and cuda.blockIdx.z == 0:
                                v += scalar(bias[uint64((co0 + to + q * LO) * bias_len
                                                        + bias_pos)])
                            out[uint64(ofs)] = store(v)
                        ofs += LO * n_pos

    op = "local_conv2d" if tiling is None else f"tiled_conv2d_{tiling}"
    name = f"{op}_{code}_k{KH}x{KW}_t{TM}x{TO}_l{LB}x{LO}"
    if XUNROLL != XDEFAULT:
        name += f"_x{XUNROLL}"
    if partial and store is not _SCALAR[code]:
        name += "_partial"
    signature = ((_array(code, 1),) * 3 + (types.Array(store, 1, "C"),)
                 + (types.int64,) * 34)
    return KernelSpec(name, _rename(kernel, name), signature, _LOCAL_LAUNCH_BOUNDS)


#: Loads in flight per thread in local_conv2d's staging rounds (weights and input, by
#: compute type): as many as fit the 128 registers beside the accumulators without spills
#: (ptxas, sm_90: 8 weight loads spill, and 6 in float64; 6 input loads beside 6 weight
#: loads spill in float32 and float16). The input's loads hit L2 and its rounds are most of
#: a stage's latency on few-map layers (the seed's: 4 instead of 2 is predicted 0.99 ->
#: 0.84 ms and 0.98 -> 0.71 ms at batch 32).
LOCAL_WEIGHT_LOADS = {"f32": 6, "f64": 4}
LOCAL_INPUT_LOADS = {"f32": 4, "f64": 2}

# Blocks of at most 256 threads, two per SM: at most 128 registers a thread. Within that
# cap ptxas keeps up to 40 float32 accumulators (8 x 5) or 16 float64 ones without spills
# (an 8 x 8 float32 tile spills 20-32 bytes on sm_90/sm_80); the tests check every
# specialisation the benchmark layers launch.
_LOCAL_MAX_ACCUMULATORS = {"f32": 40, "f64": 16}
_LOCAL_MAX_THREADS = 256
_LOCAL_LAUNCH_BOUNDS = (_LOCAL_MAX_THREADS, 2)

# Shared memory of one local_conv2d forward block: the weight stage of its positions and
# maps plus the input stage of its images. 32 KiB keeps two blocks (and more) on an SM.
LOCAL_FORWARD_STAGE_BYTES = 32 * 1024

#: The H200's SM count, the device the launch shapes are sized for (several waves).
TARGET_SMS = 132
# FLOP per byte where the H200's float32 arithmetic (66.9 TFLOP/s) meets its copy
# bandwidth (about 4.25 TB/s).
_RIDGE_FLOP_PER_BYTE = 16
# Threads the local_conv2d grid aims for: two waves of 512 resident threads on each SM.
_LOCAL_TARGET_THREADS = 2 * TARGET_SMS * 512


def _warps(batch_lanes, map_lanes, positions):
    """``[[(tb, to, j) of each lane]]`` of every warp of a block."""
    threads = [(tb, to, j) for j in range(positions) for to in range(map_lanes)
               for tb in range(batch_lanes)]
    return [threads[w:w + 32] for w in range(0, len(threads), 32)]


def local_read_wavefronts(layout, pos_pitch, x_pitch, stride_w):
    """(input, weight) wavefronts of the hot loop's shared-memory reads, worst warp
    (1 means conflict-free: every lane's word in its own bank or broadcast)."""
    batch_lanes, map_lanes, positions = layout
    warps = _warps(batch_lanes, map_lanes, positions)
    x = max(_bank_wavefronts([j * stride_w * x_pitch + tb for tb, _, j in w]) for w in warps)
    wt = max(_bank_wavefronts([j * pos_pitch + to for _, to, j in w]) for w in warps)
    return x, wt


def _pitch(minimum, cost):
    """The pitch in ``[minimum, minimum + 32)`` of least ``cost(pitch)``, smallest first."""
    return min(range(minimum, minimum + 32), key=lambda p: (cost(p), p))


class LocalConv2dConfig(NamedTuple):
    """Compile-time constants and launch shape of one local_conv2d call."""

    kernel: KernelSpec
    block: tuple         # (batch lanes, map lanes, positions per block)
    grid: tuple          # (batch tiles * position tiles, groups * map blocks, slices)
    shared_bytes: int    # dynamic shared memory
    tiles_x: int         # position tiles along an output row
    batch_tiles: int
    stage_rows: int      # kernel rows (k_W weights each) per shared-memory stage
    slice_rows: int      # kernel rows per split-K slice (all of them for one slice)
    w_pitch: int         # words between kernel taps in the weight stage (odd, >= maps)
    pos_pitch: int       # words between positions in the weight stage
    x_pitch: int         # words between input columns in the input stage (>= images)
    slices: int          # split-K slices: > 1 sums partials in scratch, in a fixed order
    walk: tuple          # (win, step_j, step_o, step_k, step_r, step_b, step_c)
    input_loads: int     # the input walk's loads per staging round


def _local_layout(geom, code, batch_tile, map_tile):
    """(batch lanes, map lanes, positions per block) for a register tile."""
    wide = compute_code(code) == "f32"
    batch_lanes = min(-(-max(geom.batch, 1) // batch_tile), 16 if wide else 8)
    map_lanes = min(-(-geom.out_channels_per_group // map_tile), max(1, 32 // batch_lanes))
    per_position = batch_lanes * map_lanes
    # (positions on the block's z axis: at most 64 threads there on every GPU)
    positions = _even_split(geom.out_width,
                            max(1, min(BLOCK_Z_LIMIT, _LOCAL_MAX_THREADS // per_position)))
    return batch_lanes, map_lanes, positions


def _local_stage(geom, code, layout, batch_tile, map_tile):
    """(stage rows, w_pitch, pos_pitch, x_pitch) within :data:`LOCAL_FORWARD_STAGE_BYTES`,
    or None if not even one kernel row fits."""
    batch_lanes, map_lanes, positions = layout
    words = LOCAL_FORWARD_STAGE_BYTES // _stage_itemsize(code)
    kw = geom.kernel_width
    bm, bo = batch_lanes * batch_tile, map_lanes * map_tile
    win = (positions - 1) * geom.stride_w + (kw - 1) * geom.dilation_w + 1
    w_pitch = bo | 1  # odd: a warp's 32 consecutive staged words go to 32 banks

    def x_cost(pitch):  # hot-loop reads first, then the staging stores of a warp
        reads = local_read_wavefronts(layout, 1, pitch, geom.stride_w)[0]
        stores = _bank_wavefronts([(e % win) * pitch + e // win for e in range(32)])
        return 8 * reads + stores

    x_pitch = _pitch(bm, x_cost)
    n_rows = geom.in_channels_per_group * geom.kernel_height
    best = None
    for rows in range(1, n_rows + 1):
        kc = rows * kw
        pos_pitch = _pitch(kc * w_pitch,
                           lambda p: local_read_wavefronts(layout, p, 1, 1)[1])
        if positions * pos_pitch + rows * win * x_pitch > words:
            break
        # Lanes busy in a warp's pass over a weight row, then the larger stage.
        use = kc / (32 * -(-kc // 32))
        if best is None or use >= 0.9 * best[0]:
            best = (max(use, best[0]) if best else use, (rows, w_pitch, pos_pitch, x_pitch))
    return None if best is None else best[1]


def local_conv2d_config(geom, dtype, tiling=None, input_loads=None):
    """Pick the specialisation and launch shape of local_conv2d (a pure function, no GPU).

    Register tile: up to 8 images x 5 maps per thread (float16, float32: 8 x 4 where the
    maps do not split into tiles of at most 5; float64 4 x 4), each split evenly (a batch
    of 10 runs as tiles of 5). The block holds the whole batch
    up to 128 images (32 in float64), so each weight comes from memory once; larger
    batches are split into batch tiles (neighbours in the grid, the weights re-read from
    L2). Batches of at most 8 get one batch lane: each weight is read by exactly one
    thread and serves all images, so the kernel streams the weights. The block spans up to
    256 threads, the positions of an output row split evenly. Where the grid would give
    fewer than two waves of 512 threads on each of :data:`TARGET_SMS` SMs, the sum over
    ``K`` is split into slices (partial sums in scratch, added in a fixed order, their
    traffic at most half the weights' bytes or what keeps the layer on the compute side of
    the ridge point), then the register tile shrinks to 4 images (batches over 8), then
    to 4 maps, then to 2.
    Refused when even one kernel row of the block's positions does not fit the
    shared-memory stage, or when one block's weights (its maps at every position) reach
    2**31 elements (offsets within a block are 32-bit). ``tiling`` picks the tiled
    convolution's kernel of the same launch (see :func:`local_conv2d_kernel`);
    ``input_loads`` the input walk's loads per round (default :data:`LOCAL_INPUT_LOADS`).
    """
    code = dtype_code(dtype)
    wide = compute_code(code) == "f32"
    tile_cap = 8 if wide else 4
    batch_tile = _even_split(max(geom.batch, 1), tile_cap)
    map_tile = _even_split(geom.out_channels_per_group, tile_cap)
    if batch_tile * map_tile > _LOCAL_MAX_ACCUMULATORS[compute_code(code)]:
        map_tile = _even_split(geom.out_channels_per_group, 4)
    n_rows = geom.in_channels_per_group * geom.kernel_height
    n_pos = geom.out_height * geom.out_width
    outputs = max(geom.batch, 1) * geom.out_channels * n_pos
    # (sized in the compute type: float16 takes float32's choices)
    partial_itemsize = _stage_itemsize(code)
    weight_bytes = geom.out_channels * n_pos * geom.in_channels_per_group * \
        geom.kernel_height * geom.kernel_width * partial_itemsize

    def plan(batch_tile, map_tile):
        layout = _local_layout(geom, code, batch_tile, map_tile)
        stage = _local_stage(geom, code, layout, batch_tile, map_tile)
        while stage is None and layout[2] > 1:
            layout = layout[:2] + (_even_split(geom.out_width, layout[2] - 1),)
            stage = _local_stage(geom, code, layout, batch_tile, map_tile)
        return layout, stage

    def threads(layout):
        batch_lanes, map_lanes, positions = layout
        return (-(-max(geom.batch, 1) // (batch_lanes * batch_tile)) * batch_lanes
                * -(-geom.out_width // positions) * positions * geom.out_height
                * geom.groups * -(-geom.out_channels_per_group // (map_lanes * map_tile))
                * map_lanes)

    layout, stage = plan(batch_tile, map_tile)
    if stage is None:  # refused with the reason
        return local_conv2d_launch(geom, dtype, batch_tile, map_tile, layout, tiling=tiling,
                                   input_loads=input_loads)
    slices = 1
    if threads(layout) < _LOCAL_TARGET_THREADS:
        # Partial sums are written and read once more: at most half the weights' bytes, or
        # what keeps the traffic under the arithmetic at the ridge point (16 FLOP/byte).
        flops = 2 * outputs * geom.in_channels_per_group * geom.kernel_height * \
            geom.kernel_width
        budget = max(weight_bytes // 2, flops // _RIDGE_FLOP_PER_BYTE - weight_bytes)
        affordable = budget // max(2 * outputs * partial_itemsize, 1)
        slices = max(1, min(8, affordable, n_rows // stage[0],
                            -(-_LOCAL_TARGET_THREADS // threads(layout))))
    for shrink in ("batch", 4, 2):
        if threads(layout) * slices >= _LOCAL_TARGET_THREADS:
            break
        if shrink == "batch" and batch_tile > 4 and geom.batch > 8:
            batch_tile = _even_split(geom.batch, 4)
        elif shrink != "batch" and map_tile > shrink:
            map_tile = _even_split(geom.out_channels_per_group, shrink)
        layout, stage = plan(batch_tile, map_tile)
    return local_conv2d_launch(geom, dtype, batch_tile, map_tile, layout, stage[0], slices,
                               tiling, input_loads)


def local_conv2d_launch(geom, dtype, batch_tile, map_tile, layout, stage_rows=None,
                        slices=1, tiling=None, input_loads=None):
    """The :class:`LocalConv2dConfig` of given choices (:func:`local_conv2d_config` makes
    them; tests force small tiles, stages and slices through this): register tile
    ``batch_tile x map_tile``, ``layout = (batch lanes, map lanes, positions per block)``,
    kernel rows per stage (default: as many as fit), split-K slices (whole stages each;
    fewer if there are not enough stages), the input walk's loads per round (default
    :data:`LOCAL_INPUT_LOADS`)."""
    code = dtype_code(dtype)
    batch_lanes, map_lanes, positions = layout
    best = _local_stage(geom, code, layout, batch_tile, map_tile)
    if best is None:
        raise ValueError(
            f"local_conv2d on the GPU stages at least one kernel row of its output positions "
            f"in shared memory: a kernel {geom.kernel_width} wide with stride "
            f"{geom.stride_w} and dilation {geom.dilation_w} needs more than "
            f"{LOCAL_FORWARD_STAGE_BYTES} bytes; use device='cpu'")
    _, w_pitch, _, x_pitch = best
    stage_rows = stage_rows or best[0]
    kc = stage_rows * geom.kernel_width
    pos_pitch = _pitch(kc * w_pitch, lambda p: local_read_wavefronts(layout, p, 1, 1)[1])
    n_rows = geom.in_channels_per_group * geom.kernel_height
    # Whole stages per slice, and no empty slice.
    slice_rows = -(-(-(-n_rows // slices)) // stage_rows) * stage_rows
    slices = -(-n_rows // slice_rows)
    bo = map_lanes * map_tile
    k_len = geom.in_channels_per_group * geom.kernel_height * geom.kernel_width
    if bo * geom.out_height * geom.out_width * k_len >= 2**31:
        raise ValueError(
            f"local_conv2d on the GPU indexes the weights of {bo} maps with 32-bit offsets: "
            f"{bo * geom.out_height * geom.out_width * k_len} weights is too many; use "
            "device='cpu'")
    tiles_x = -(-geom.out_width // positions)
    batch_tiles = -(-max(geom.batch, 1) // (batch_lanes * batch_tile))
    map_blocks = -(-geom.out_channels_per_group // bo)
    grid = check_grid((batch_tiles * tiles_x * geom.out_height, geom.groups * map_blocks,
                       slices), "local_conv2d")
    default_loads = LOCAL_INPUT_LOADS[compute_code(code)]
    if input_loads == default_loads:
        input_loads = None  # one specialisation for the default, however it is asked for
    spec = local_conv2d_kernel(code, geom.kernel_height, geom.kernel_width, batch_tile,
                               map_tile, batch_lanes, map_lanes,
                               slices > 1 and code != compute_code(code), tiling, input_loads)
    win = (positions - 1) * geom.stride_w + (geom.kernel_width - 1) * geom.dilation_w + 1
    shared = (positions * pos_pitch + stage_rows * win * x_pitch) * _stage_itemsize(code)
    return LocalConv2dConfig(spec, tuple(layout), grid, shared, tiles_x, batch_tiles,
                             stage_rows, slice_rows, w_pitch, pos_pitch, x_pitch, slices,
                             _local_walk(geom, layout, batch_tile, map_tile, stage_rows),
                             default_loads if input_loads is None else int(input_loads))


def _local_walk(geom, layout, batch_tile, map_tile, stage_rows):
    """The staging walks' constants (see :func:`local_conv2d_kernel`): the input columns
    under a block's positions and the steps of both walks (weights: position, map, tap;
    input: kernel row, image, column) in one pass of all the block's threads."""
    batch_lanes, map_lanes, positions = layout
    threads = batch_lanes * map_lanes * positions
    bm, bo = batch_lanes * batch_tile, map_lanes * map_tile
    kc = stage_rows * geom.kernel_width
    win = (positions - 1) * geom.stride_w + (geom.kernel_width - 1) * geom.dilation_w + 1
    step_rows, step_k = divmod(threads, kc)
    step_j, step_o = divmod(step_rows, bo)
    step_r, rest = divmod(threads, bm * win)
    step_b, step_c = divmod(rest, win)
    return (win, step_j, step_o, step_k, step_r, step_b, step_c)


def local_conv2d_partial_dtype(dtype):
    """dtype of local_conv2d's split-K partial sums: the compute type (float32 for
    float16)."""
    return _NUMPY[compute_code(dtype_code(dtype))]


# --------------------------------------------------------------------------------------------
# helpers: strided-to-contiguous copy
# --------------------------------------------------------------------------------------------

@functools.lru_cache(maxsize=None)
def copy_kernel(code):
    """Strided 6-D array to a C-contiguous one of the same shape (grid-stride over elements).

    Makes contiguous device copies of non-contiguous GPU inputs (lower-rank arrays are
    viewed as 6-D with leading length-1 axes), in their own dtype (no conversion). Launch:
    1-D, any size.
    """

    def kernel(src, dst):
        start = cuda.grid(1)
        step = cuda.gridsize(1)
        d1, d2, d3, d4, d5 = src.shape[1], src.shape[2], src.shape[3], src.shape[4], src.shape[5]
        total = dst.size
        for i in range(start, total, step):
            rest = i
            i5 = rest % d5
            rest //= d5
            i4 = rest % d4
            rest //= d4
            i3 = rest % d3
            rest //= d3
            i2 = rest % d2
            rest //= d2
            i1 = rest % d1
            i0 = rest // d1
            dst[i0, i1, i2, i3, i4, i5] = src[i0, i1, i2, i3, i4, i5]

    name = f"copy6d_{code}"
    signature = (types.Array(_SCALAR[code], 6, "A"), _array(code, 6))
    return KernelSpec(name, _rename(kernel, name), signature)


# --------------------------------------------------------------------------------------------
# the specialisations the benchmark layers launch (for PTX/ptxas reports)
# --------------------------------------------------------------------------------------------

def workload_geometries():
    """``[(layer, geometry)]``: every benchmark layer (:data:`gpuconv.workloads.LAYERS`) at its
    GPU batch size, where ``gpuconv bench --device cuda`` runs both operations on it."""
    return [(layer, workloads.gpu_geometry(layer)) for layer in workloads.LAYERS.values()]


def local_conv2d_forward_config(geom, dtype):
    """The local_conv2d forward's launch choice: the weight-streaming kernel of
    :mod:`gpuconv.cuda.local_stream` for batches of 1 to
    :data:`~gpuconv.cuda.local_stream.STREAM_MAX_BATCH` images (bound by reading the
    weights); above that, the double-buffered per-position GEMM of
    :mod:`gpuconv.cuda.local_gemm` where its tiles fill
    (:func:`~gpuconv.cuda.local_gemm.use_local_gemm`), else the batched GEMM of
    :func:`local_conv2d_config`."""
    if local_stream.use_local_stream(geom):
        return local_stream.local_stream_config(geom, dtype)
    if local_gemm.use_local_gemm(geom):
        return local_gemm.local_gemm_config(geom, dtype)
    return local_conv2d_config(geom, dtype)


def forward_candidates(op, geom, dtype):
    """``[config, ...]``: every forward kernel the dispatcher weighs for ``op``
    (``"conv2d"`` or ``"local_conv2d"``) on ``geom``, each with the launch shape it would
    have if picked, the dispatcher's own pick among them (:func:`conv2d_config`,
    :func:`local_conv2d_forward_config`). conv2d: the direct kernel (where one input
    channel's window fits shared memory) and the implicit GEMM on each tile of the compute
    type; local_conv2d: the streaming kernel (batches up to
    :data:`~gpuconv.cuda.local_stream.STREAM_MAX_BATCH`), the batched GEMM and the
    per-position GEMM on each of its tiles, word-reading and run-reading
    (:data:`~gpuconv.cuda.local_gemm.RUN_TILES`). The simulator's tiles in the simulator. The
    acceptance run times them side by side (and autotuning, :mod:`gpuconv.cuda.autotune`,
    on the caller's arrays), so a GPU run checks every choice the dispatcher makes, not only
    the kernel it made; nothing here compiles. A kernel that cannot take ``geom`` (one input
    channel's window beyond shared memory, a grid beyond the GPU's limits) is left out."""
    code = "sim" if simulator_enabled() else compute_code(dtype_code(dtype))
    if op == "conv2d":
        makers = [lambda: conv2d_direct_config(geom, dtype)]
        makers += [lambda t=tile: conv2d_gemm.conv2d_gemm_launch(geom, dtype, t)
                   for tile in conv2d_gemm.TILES[code]]
    elif op == "local_conv2d":
        makers = []
        if local_stream.use_local_stream(geom):
            makers.append(lambda: local_stream.local_stream_config(geom, dtype))
        makers.append(lambda: local_conv2d_config(geom, dtype))
        makers += [lambda t=tile: local_gemm.local_gemm_launch(geom, dtype, t)
                   for tile in local_gemm.TILES[code]]
        makers += [lambda t=tile: local_gemm.local_gemm_launch(geom, dtype, t, runs=True)
                   for tile in local_gemm.RUN_TILES[code]]
    else:
        raise ValueError(f"op must be 'conv2d' or 'local_conv2d', got {op!r}")
    configs = []
    for make in makers:
        try:
            configs.append(make())
        except ValueError:  # this kernel cannot take the geometry
            pass
    return configs


def workload_kernel_names(dtype=np.float32):
    """``{layer name: (conv2d kernel name, local_conv2d kernel name)}`` for the benchmark
    layers, so tables of timings and of ptxas resources can be joined."""
    names = {}
    for layer, geom in workload_geometries():
        names[layer.short_title] = (conv2d_config(geom, dtype).kernel.name,
                                    local_conv2d_forward_config(geom, dtype).kernel.name)
    return names


def workload_specialisations(codes=CODES):
    """Every kernel the benchmark layers launch (each op on each layer), deduplicated, for
    each dtype code of ``codes`` (default: float16, float32 and float64).

    Both ops run on every layer (the shared and the unshared operation can be timed on the
    same geometry), with the four gradient kernels of each (see
    :mod:`gpuconv.cuda.grad_kernels`) and the local gradients as batched GEMMs (see
    :mod:`gpuconv.cuda.local_grad_gemm`), plus the helper kernels; the tiled convolution's
    forward in both tilings (local_conv2d's launch with slots) and its slot helpers
    (:mod:`gpuconv.cuda.tiled`). Returns a list of :class:`KernelSpec`.
    """
    specs = {}
    for code in codes:
        dtype = _NUMPY[code]
        for _, geom in workload_geometries():
            local = local_conv2d_config(geom, dtype)
            for spec in (conv2d_config(geom, dtype).kernel, local.kernel):
                specs.setdefault(spec.name, spec)
            if local_gemm.use_local_gemm(geom):  # many maps: the per-position GEMM instead
                spec = local_gemm.local_gemm_config(geom, dtype).kernel
                specs.setdefault(spec.name, spec)
            for tiling in ("periodic", "blocks"):
                spec = local_conv2d_config(geom, dtype, tiling).kernel
                specs.setdefault(spec.name, spec)
            if local.slices > 1:
                spec = grad_kernels.sum_slices_kernel(code)
                specs.setdefault(spec.name, spec)
            for spec, _ in grad_kernels.grad_specialisations(geom, dtype):
                specs.setdefault(spec.name, spec)
            if conv2d_gemm_grad.use_gemm_grad(geom):  # channel-heavy conv2d gradients
                for config in (conv2d_gemm_grad.input_grad_gemm_config(geom, dtype),
                               conv2d_gemm_grad.weight_grad_gemm_config(geom, dtype)):
                    specs.setdefault(config.kernel.name, config.kernel)
            for spec, _ in local_grad_gemm.gemm_grad_specialisations(geom, dtype):
                specs.setdefault(spec.name, spec)
            if local_grad_positions.use_positions(geom):  # many maps: the input gradient by columns
                config = local_grad_positions.local_input_grad_cols_config(geom, dtype)
                for spec in (config.kernel, config.transpose, config.col2im,
                             local_grad_positions.local_weight_grad_pos_config(geom, dtype).kernel):
                    specs.setdefault(spec.name, spec)
        for spec in (copy_kernel(code), tiled_kernels.expand_slots_kernel(code),
                     tiled_kernels.sum_slots_kernel(code)):
            specs.setdefault(spec.name, spec)
    return list(specs.values())

