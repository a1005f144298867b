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
from numba import cuda, float32, float64, int64, types, uint64
from numba.types import float16

from .. import workloads
from ..device import simulator_enabled

__all__ = ["KernelSpec", "Conv2dConfig", "LocalConv2dConfig", "conv2d_kernel",
           "local_conv2d_kernel", "transpose_kernel", "copy_kernel", "compiled",
           "conv2d_config", "local_conv2d_config", "workload_specialisations", "dtype_code",
           "compute_code", "CODES",
           "workload_kernel_names", "workload_geometries", "SHARED_BUDGET_BYTES",
           "GRID_YZ_LIMIT", "check_grid",
           "SHARED_LIMIT_BYTES", "LOCAL_STAGE_BYTES", "local_stage_rows", "local_stage_bytes"]

# Dynamic shared memory one conv2d block may use: small enough that several blocks share an
# SM (an H100/H200 SM has 228 KiB), and under the 48 KiB that needs no opt-in.
SHARED_BUDGET_BYTES = 24 * 1024


# conv2d blocks have at most 128 threads. Up to 32 accumulators a thread, asking for three
# blocks per SM (170 registers a thread, 64K / 384) costs no spills; with 64 accumulators
# sm_80 would spill at that cap, so those ask for two (255 registers). ptxas checks both in
# the tests.
def _conv2d_launch_bounds(accumulators):
    return (128, 3) if accumulators <= 32 else (128, 2)


# Shared memory a block may use without opting in (every GPU since Kepler).
SHARED_LIMIT_BYTES = 48 * 1024

#: The dtype codes the factories take.
CODES = ("f16", "f32", "f64")
# Element type of the arrays a kernel reads and writes ...
_SCALAR = {"f16": float16, "f32": float32, "f64": float64}
# ... and the type it computes in: registers, accumulators, shared-memory stages.
_COMPUTE = {"f16": float32, "f32": float32, "f64": float64}
_NUMPY = {"f16": np.dtype(np.float16), "f32": np.dtype(np.float32),
          "f64": np.dtype(np.float64)}


def dtype_code(dtype):
    """``"f16"``, ``"f32"`` or ``"f64"`` for a NumPy dtype."""
    return {np.dtype(np.float16): "f16", np.dtype(np.float32): "f32",
            np.dtype(np.float64): "f64"}[np.dtype(dtype)]


def compute_code(code):
    """The code of the type kernels of ``code`` compute in: ``"f32"`` for ``"f16"``.

    float16 kernels stage float32 in shared memory (each value converted once, as it is
    staged) rather than float16: the inner loops then read and multiply exactly as the
    float32 kernels do, with no conversion per shared-memory read, and the odd row strides
    that keep a warp's reads on 32 different banks stay in 4-byte words. So a float16
    kernel has the float32 kernel's shared-memory budget, register block and launch shape;
    only its global loads and stores are half as wide.
    """
    return "f32" if code == "f16" else code


def _stage_itemsize(code):
    """Bytes of one shared-memory word of the kernels of ``code`` (the compute type)."""
    return _NUMPY[compute_code(code)].itemsize


class KernelSpec(NamedTuple):
    """A kernel before compilation: what :func:`numba.cuda.compile_ptx` needs."""

    name: str            # encodes the specialisation, e.g. conv2d_f32_k3x3_r2x2_c8
    pyfunc: object       # the bare Python function
    signature: tuple     # Numba argument types
    launch_bounds: tuple | None = None  # (max threads per block, min blocks per SM)


def _array(code, ndim):
    return types.Array(_SCALAR[code], ndim, "C")


def _rename(func, name):
    func.__name__ = name
    func.__qualname__ = name
    return func


@functools.lru_cache(maxsize=None)
def compiled(spec):
    """The launchable kernel of ``spec`` (compiled on first launch for the current GPU)."""
    if spec.launch_bounds is None or simulator_enabled():  # the simulator has none
        return cuda.jit(spec.signature)(spec.pyfunc)
    try:
        return cuda.jit(spec.signature, launch_bounds=spec.launch_bounds)(spec.pyfunc)
    except TypeError:  # a numba-cuda without launch bounds: same code, registers uncapped
        return cuda.jit(spec.signature)(spec.pyfunc)


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
    ``weight (c_O, c_Ig, k_H, k_W)``, ``bias (c_O,)`` (or a dummy) and ``out (n, c_O, h_O, w_O)``,
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


def _even_split(count, cap):
    """Block size ``<= cap`` that splits ``count`` into the fewest, most equal blocks
    (10 channels with cap 8: two blocks of 5, not 8 + 2 of 16 computed)."""
    return -(-count // -(-count // cap))


def _pow2_at_least(value, cap):
    result = 1
    while result < value and result < cap:
        result *= 2
    return result


#: CUDA's limit on grid dimensions y and z (x allows 2**31 - 1).
GRID_YZ_LIMIT = 65535


def check_grid(grid, what):
    """Refuse a launch whose grid exceeds CUDA's limits, with a clear error."""
    if grid[0] > 2**31 - 1 or any(g > GRID_YZ_LIMIT for g in grid[1:]):
        raise ValueError(
            f"{what} would need a CUDA grid of {tuple(grid)} blocks, beyond CUDA's limits "
            f"(x < 2**31, y and z <= {GRID_YZ_LIMIT}); use device='cpu' or split the layer "
            "(e.g. over its output channels)")
    return grid


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
    from . import conv2d_gemm  # it builds on this module

    if conv2d_gemm.use_gemm(geom):
        return conv2d_gemm.conv2d_gemm_config(geom, dtype)
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
# local_conv2d: one kernel per output position; batch reuse in registers, weights staged in
# shared memory from the caller's layout
# --------------------------------------------------------------------------------------------

@functools.lru_cache(maxsize=None)
def local_conv2d_kernel(code, kernel_h, kernel_w, batch_block, channels, stage_rows=None):
    """Locally connected convolution kernel, specialised on dtype, kernel size and register block.

    Reads the weights in the caller's layout ``(c_O, h_O, w_O, c_Ig, k_H, k_W)``. For one
    output channel, the kernels of 32 consecutive output positions are one contiguous block
    of ``32 * c_Ig * k_H * k_W`` values; the block stages it through shared memory a few
    kernel rows at a time (:func:`local_stage_rows` rows of ``k_W`` values per position and
    channel), with consecutive threads loading consecutive words. Each thread then reads its
    own position's row from shared memory, the rows padded to an odd stride so the 32
    threads of a warp hit 32 different banks. ``stage_rows`` overrides the rows per stage
    (tests use it to cross stage boundaries at tiny sizes; the name then ends in
    ``_s<rows>``).

    The input is read with the batch innermost, ``(c_I, h, w, n_pad)``, made on the device
    by :func:`transpose_kernel` (``n_pad`` rounds ``n`` up to ``batch_block``, the padding
    zero): a thread's ``batch_block`` images of one input value are consecutive words.

    Each thread owns one output position, ``channels`` output channels and ``batch_block``
    batch elements at a time: every weight it reads from shared memory serves
    ``batch_block`` images, every input value ``channels`` output channels. The threads of
    a block along y take other batch slices of the same positions and channels and share
    the staged weights, so a weight comes from DRAM once per pass over ``32 * by * batch_block``
    images (one pass for the benchmark batches).

    Launch: ``grid = (ceil(P / 32), groups * ceil(c_Og / channels))``,
    ``block = (32, by)`` with ``by = min(16 (float16, float32) or 8 (float64),
    ceil(n / batch_block))``; static shared memory ``channels * 32 * stride * itemsize``
    bytes (``itemsize`` of the compute type), ``stride`` the odd number at least
    ``local_stage_rows(...) * k_W``.

    Kernel arguments: flat ``x_t (c_I, h, w, n_pad)``, ``weight (c_O, h_O, w_O, c_Ig, k_H, k_W)``,
    ``bias (c_O, bias_len)`` (``bias_len`` 1 or ``P``; or a dummy) and
    ``out (n, c_O, h_O, w_O)``, then ``has_bias, bias_len, n, n_pad, h, w, c_O, h_O, w_O,
    c_Ig, c_Og, s_H, s_W, p_top, p_left, d_H, d_W``.
    """
    store, scalar = _SCALAR[code], _COMPUTE[code]
    KH, KW, NB, CB = kernel_h, kernel_w, batch_block, channels
    KHW = KH * KW
    NACC = NB * CB
    RS = stage_rows or local_stage_rows(code, KW, CB)  # kernel rows per shared-memory stage
    STAGE = RS * KW                      # weights per position and channel in one stage
    ROW = STAGE | 1                      # odd row stride: conflict-free reads across a warp
    SLAB = 32 * ROW                      # one output channel's stage
    STAGE_ALL = CB * 32 * STAGE
    SMEM = CB * SLAB

    def kernel(x_t, weight, bias, out, has_bias, bias_len, n, n_pad, h, wd, c_O, h_O, w_O,
               c_Ig, c_Og, s_H, s_W, pt, pl, d_H, d_W):
        # Every thread takes part in the shared-memory stages, so the bounds guards sit on
        # the compute and the stores, not at the top.
        tx = cuda.threadIdx.x
        ty = cuda.threadIdx.y
        by = cuda.blockDim.y
        tid = ty * 32 + tx
        nthreads = 32 * by
        n_pos = h_O * w_O
        pos0 = cuda.blockIdx.x * 32
        pos = pos0 + tx
        block_pos = min(32, n_pos - pos0)  # positions of this block
        oy = pos // w_O
        ox = pos - oy * w_O
        iy0 = oy * s_H - pt
        ix0 = ox * s_W - pl
        blocks_per_group = (c_Og + CB - 1) // CB
        g = cuda.blockIdx.y // blocks_per_group
        co0 = g * c_Og + (cuda.blockIdx.y % blocks_per_group) * CB
        n_co = min(CB, (g + 1) * c_Og - co0)
        k_len = c_Ig * KHW   # weights of one position and output channel
        n_rows = c_Ig * KH   # kernel rows of one position and output channel

        wsm = cuda.shared.array(SMEM, dtype=scalar)
        acc = cuda.local.array(NACC, dtype=scalar)
        wreg = cuda.local.array(CB, dtype=scalar)
        xreg = cuda.local.array(NB, dtype=scalar)
        for pass0 in range(0, n, by * NB):  # the same trip count in every thread
            b0 = pass0 + ty * NB
            active = pos < n_pos and b0 < n  # b0 < n: the images up to b0 + NB are in n_pad
            for a in range(NACC):
                acc[a] = scalar(0)  # keep the math in the compute type
            for r0 in range(0, n_rows, RS):
                k0 = r0 * KW
                kc = min(RS, n_rows - r0) * KW
                # Wait until the previous stage has been read before overwriting it.
                cuda.syncthreads()
                # Consecutive threads load consecutive words: runs of kc values, one per
                # position (the whole 32-position block when one stage holds a kernel).
                for e in range(tid, STAGE_ALL, nthreads):
                    q = e // (32 * STAGE)
                    rest = e - q * (32 * STAGE)
                    j = rest // STAGE
                    kk = rest - j * STAGE
                    if q < n_co and j < block_pos and kk < kc:
                        src = ((co0 + q) * n_pos + pos0 + j) * k_len + k0 + kk
                        wsm[q * SLAB + j * ROW + kk] = scalar(weight[uint64(src)])
                cuda.syncthreads()
                if active:
                    for rr in range(RS):
                        r = r0 + rr
                        if r < n_rows:
                            ci = r // KH
                            ky = r - ci * KH
                            iy = iy0 + ky * d_H
                            if iy >= 0 and iy < h:
                                x_row = ((g * c_Ig + ci) * h + iy) * wd
                                for kx in range(KW):
                                    ix = ix0 + kx * d_W
                                    if ix >= 0 and ix < wd:
                                        xofs = (x_row + ix) * n_pad + b0
                                        for bb in range(NB):
                                            xreg[bb] = scalar(x_t[uint64(xofs + bb)])
                                        # Channels past the group's end read stale words;
                                        # their sums are never stored.
                                        sofs = tx * ROW + rr * KW + kx
                                        for q in range(CB):
                                            wreg[q] = wsm[q * SLAB + sofs]
                                        for bb in range(NB):
                                            for q in range(CB):
                                                acc[bb * CB + q] += xreg[bb] * wreg[q]
            if active:
                bias_pos = pos if bias_len > 1 else 0
                for bb in range(NB):
                    if b0 + bb < n:
                        ofs = ((b0 + bb) * c_O + co0) * n_pos + pos
                        for q in range(CB):
                            if q < n_co:
                                v = acc[bb * CB + q]
                                if has_bias:
                                    v += scalar(bias[uint64((co0 + q) * bias_len + bias_pos)])
                                out[uint64(ofs)] = store(v)
                            ofs += n_pos

    name = f"local_conv2d_{code}_k{KH}x{KW}_b{NB}_c{CB}"
    if RS != local_stage_rows(code, KW, CB):
        name += f"_s{RS}"
    signature = (_array(code, 1),) * 4 + (types.int64,) * 17
    return KernelSpec(name, _rename(kernel, name), signature,
                      (32 * _LOCAL_MAX_ROWS[compute_code(code)], 1))


# Weights one local_conv2d block stages at a time: 16 KiB leaves room for several blocks
# on an SM, and is far more than the few rows a warp needs to load whole 128-byte lines.
LOCAL_STAGE_BYTES = 16 * 1024


def local_stage_rows(code, kernel_w, channels):
    """Kernel rows (``k_W`` weights each) per position and channel that local_conv2d stages
    in shared memory at a time: as many as fit :data:`LOCAL_STAGE_BYTES` for the block's
    32 positions and ``channels`` output channels, at least one (words of the compute
    type: float16 stages float32)."""
    itemsize = _stage_itemsize(code)
    rows = 1
    while channels * 32 * (((rows + 1) * kernel_w) | 1) * itemsize <= LOCAL_STAGE_BYTES:
        rows += 1
    return rows


def local_stage_bytes(code, kernel_w, channels):
    """Static shared memory of :func:`local_conv2d_kernel` (bytes)."""
    return (channels * 32 * ((local_stage_rows(code, kernel_w, channels) * kernel_w) | 1)
            * _stage_itemsize(code))


# Rows of 32 threads in a local_conv2d block (by compute type): enough for a batch of 128
# (float32) in one pass, so each weight comes from DRAM once; 512 threads x <= 128
# registers fit an SM.
_LOCAL_MAX_ROWS = {"f32": 16, "f64": 8}


class LocalConv2dConfig(NamedTuple):
    """Compile-time constants and launch shape of one local_conv2d call."""

    kernel: KernelSpec
    block: tuple
    grid: tuple
    batch_block: int   # the kernel's batch_block: the input's batch is padded to a multiple


def local_conv2d_config(geom, dtype):
    """Pick the specialisation and launch shape of local_conv2d (a pure function, no GPU).

    Register block: up to 8 (float16, float32) or 4 (float64) batch elements x up to 4
    output channels per thread, each split evenly (a batch of 10 runs as two blocks of 5);
    fewer channels only where one kernel row of 32 positions would not fit the
    shared-memory limit (very wide kernels), refused when even one channel would not.
    """
    code = dtype_code(dtype)
    batch_block = _even_split(max(geom.batch, 1), 8 if compute_code(code) == "f32" else 4)
    channels = _even_split(geom.out_channels_per_group, 4)
    while channels > 1 and local_stage_bytes(code, geom.kernel_width, channels) > SHARED_LIMIT_BYTES:
        channels = _even_split(geom.out_channels_per_group, channels - 1)
    if local_stage_bytes(code, geom.kernel_width, channels) > SHARED_LIMIT_BYTES:
        raise ValueError(
            f"local_conv2d on the GPU stages one kernel row of 32 output positions in shared "
            f"memory: a kernel {geom.kernel_width} wide needs "
            f"{local_stage_bytes(code, geom.kernel_width, channels)} bytes, more than "
            f"{SHARED_LIMIT_BYTES}; use device='cpu'")
    n_pos = geom.out_height * geom.out_width
    by = max(1, min(_LOCAL_MAX_ROWS[compute_code(code)], -(-geom.batch // batch_block)))
    grid = check_grid((-(-n_pos // 32), geom.groups * -(-geom.out_channels_per_group // channels)),
                      "local_conv2d")
    spec = local_conv2d_kernel(code, geom.kernel_height, geom.kernel_width, batch_block, channels)
    return LocalConv2dConfig(spec, (32, by), grid, batch_block)


# --------------------------------------------------------------------------------------------
# helpers: batch-innermost transpose for local_conv2d, strided-to-contiguous copy
# --------------------------------------------------------------------------------------------

@functools.lru_cache(maxsize=None)
def transpose_kernel(code, tile=32):
    """Batched transpose ``src (B, R, C) -> dst (B, C, R_pad)`` through a ``tile x (tile + 1)``
    shared tile (the spare column puts the transposed reads in different banks); the
    ``R_pad - R >= 0`` extra entries of each ``dst`` row are zeros.

    Used for local_conv2d's input, ``(1, n, c_I*h*w) -> (1, c_I*h*w, n_pad)`` (batch
    innermost). Reads and writes are coalesced. Launch:
    ``grid = (ceil(C / tile), min(ceil(R_pad / tile), 65535), min(B, 65535))``,
    ``block = (tile, rows)`` for any ``rows``: blocks loop over the row tiles and batches
    beyond the grid (CUDA caps grid y and z at 65535).

    A pure copy: the tile holds the arrays' own dtype (float16 moves as float16, bits
    unchanged, and its tile is half the size).
    """
    scalar, compute = _SCALAR[code], _COMPUTE[code]
    TILE = tile
    TILE_PADDED = tile + 1

    def kernel(src, dst):
        buf = cuda.shared.array((TILE, TILE_PADDED), dtype=scalar)
        zero = scalar(compute(0))  # float16's zero from float32's: no float64 constant
        rows = src.shape[1]
        cols = src.shape[2]
        rows_padded = dst.shape[2]
        row_tiles = (rows_padded + TILE - 1) // TILE
        c0 = cuda.blockIdx.x * TILE
        tx = cuda.threadIdx.x
        # The loop bounds depend on the block only, so every thread reaches each barrier.
        for bt in range(cuda.blockIdx.z, src.shape[0], cuda.gridDim.z):
            for rt in range(cuda.blockIdx.y, row_tiles, cuda.gridDim.y):
                r0 = rt * TILE
                for k in range(cuda.threadIdx.y, TILE, cuda.blockDim.y):
                    r = r0 + k
                    v = zero  # rows past the end become the zero padding
                    if r < rows and c0 + tx < cols:
                        v = src[bt, r, c0 + tx]
                    buf[k, tx] = v
                # Wait for the whole tile before reading it transposed.
                cuda.syncthreads()
                for k in range(cuda.threadIdx.y, TILE, cuda.blockDim.y):
                    c = c0 + k
                    if c < cols and r0 + tx < rows_padded:
                        dst[bt, c, r0 + tx] = buf[tx, k]
                # Wait until the tile has been read before the next one overwrites it.
                cuda.syncthreads()

    name = f"transpose_{code}_t{TILE}"
    signature = (_array(code, 3), _array(code, 3))
    return KernelSpec(name, _rename(kernel, name), signature)


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


def workload_kernel_names(dtype=np.float32):
    """``{layer name: (conv2d kernel name, local_conv2d kernel name)}`` for the benchmark
    layers, so tables of timings and of ptxas resources can be joined."""
    names = {}
    for layer, geom in workload_geometries():
        names[layer.short_title] = (conv2d_config(geom, dtype).kernel.name,
                                    local_conv2d_config(geom, dtype).kernel.name)
    return names


def workload_specialisations(codes=CODES):
    """Every kernel the benchmark layers launch (each op on each layer), deduplicated, for
    each dtype code of ``codes`` (default: float16, float32 and float64).

    Both ops run on every layer (the shared and the unshared operation can be timed on the
    same geometry), with the four gradient kernels of each (see
    :mod:`gpuconv.cuda.grad_kernels`), plus the helper kernels. Returns a list of
    :class:`KernelSpec`.
    """
    from . import grad_kernels  # it builds on this module

    specs = {}
    for code in codes:
        dtype = _NUMPY[code]
        for _, geom in workload_geometries():
            for spec in (conv2d_config(geom, dtype).kernel, local_conv2d_config(geom, dtype).kernel):
                specs.setdefault(spec.name, spec)
            for spec, _ in grad_kernels.grad_specialisations(geom, dtype):
                specs.setdefault(spec.name, spec)
        for spec in (transpose_kernel(code), copy_kernel(code)):
            specs.setdefault(spec.name, spec)
    return list(specs.values())

