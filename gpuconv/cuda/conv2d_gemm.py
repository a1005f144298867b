"""conv2d as an implicit GEMM: the CUDA path for channel-heavy layers.

A convolution read as a matrix product (the vocabulary of CUTLASS's implicit GEMM):

- ``M = n * h_O * w_O`` rows, one per output position of every image;
- ``N = c_Og`` columns, one per output channel (map) of a group;
- ``K = c_Ig * k_H * k_W`` terms of each dot product, one per (input channel, tap).

The ``M x K`` operand is the input seen through im2col; it is never built. A block owns a
``tile_m x tile_n`` tile of the product (output positions x maps) and walks ``K`` in chunks of
``tile_k`` input channels at one tap (taps outer, channels inner), so the position
arithmetic of a chunk is one bounds check and one offset per thread: each loading thread
owns one output position of the tile for the whole loop (its image, row and column are found
once per tile, the only divisions in the kernel), and a chunk's ``tile_k`` channels of it are
``h * w`` apart. Loads of the input run along the positions: consecutive threads read
consecutive output columns, consecutive addresses at stride 1. The weights are staged
transposed (``[k][map]``), read with the channel fastest so a warp touches few lines.

Both operands go through shared memory, double-buffered: while the block multiplies one
chunk, each thread holds the next chunk's few global values in registers and stores them
into the other buffer afterwards, so one barrier per chunk suffices. Row pitches are padded
by four words: a warp's stores of the transposed weights (8 channels x 4 maps) land on 32
different banks. Each thread accumulates ``thread_m x thread_n`` outputs in registers, its
positions in runs of 4 consecutive ones (2 for a register tile of 2), the runs ``4 * tile_m /
thread_m`` apart, and its maps likewise (:func:`~gpuconv.cuda.spec.fragment_row`): the
tiles are 16-byte aligned and their pitches a multiple of 4 words, so each run is one 128-bit
shared load (3 loads for the 32 FMAs of a k step of the 8 x 4 register tile, where word
reads took 12), a warp's 16 runs 256 consecutive bytes (two wavefronts, no conflicts). The
64-register tile, which spills with runs, reads words, ``tile_m / thread_m`` apart.

The factory is memoised on the dtype code, the tile shape and the blocks per SM its launch
bounds ask for, the only compile-time constants; the kernel is named by them
(``conv2d_gemm_f32_t128x64_k8_r8x4_o2``). Kernel size, stride, padding and dilation are
run-time arguments: the tap loop is the outer loop of the ``K`` walk, so it costs a few
integer operations per chunk, not per element. The multiply loop indexes shared memory at
offsets fixed per chunk plus constants; the staging adds 64-bit offsets (Numba widens integer
arithmetic to 64 bits), so flat offsets past 2**31 elements are safe, as in the other kernels.

:func:`conv2d_gemm_config` picks the tile for a geometry; :func:`use_gemm` says which
layers take this path (:func:`gpuconv.cuda.kernels.conv2d_config` asks it first).
"""

from __future__ import annotations

import functools
from typing import NamedTuple

from numba import cuda, types, uint64

from ..device import simulator_enabled
from .spec import (_COMPUTE, _SCALAR, SHARED_VECTOR_ALIGN, KernelSpec, _array, _rename,
                   check_grid, compute_code, dtype_code, gemm_chunk, gemm_fragment,
                   gemm_runs, pick_gemm_tile)

__all__ = ["GEMM_MIN_CHANNELS", "Conv2dGemmConfig", "conv2d_gemm_kernel", "conv2d_gemm_config",
           "conv2d_gemm_launch",
           "use_gemm", "launch", "TILES"]

#: Input channels per group from which conv2d takes the implicit GEMM (the gradients'
#: threshold too, :data:`gpuconv.cuda.conv2d_gemm_grad.GRAD_GEMM_MIN_CHANNELS`). Below it the
#: direct kernel stays: with few channels a ``K`` chunk of 8 would be mostly padding, and
#: the direct kernel's input tile serves every tap of a channel from one staging (the seed
#: layers, 3 and 10 channels, ran at 1.3-1.7x cuDNN with it on the first H200 run). From 16
#: on the GEMM's 16-wide tile is predicted 2.2-4.8x faster than the direct kernel measured
#: there (DeepFace L4 / L5 / L6 at batch 128: 0.52 / 0.078 / 0.040 ms against 1.115 /
#: 0.333 / 0.175 ms; ``scripts/kernel_table.py``).
GEMM_MIN_CHANNELS = 16

# Words added to each shared row (see the module docstring).
_PAD = 4

#: Tile shapes ``(tile_m, tile_n, tile_k, thread_m, thread_n, blocks_per_sm)`` by compute
#: type, largest first within each width along ``N`` (the maps); the narrowest width that
#: covers a group's maps is taken (see :func:`conv2d_gemm_config`). ``blocks_per_sm`` goes
#: into the launch bounds: ptxas keeps each thread within ``65536 / (threads *
#: blocks_per_sm)`` registers (115 -> 128 for the large float32 tile, 64 for the 64 x 64 one;
#: asking the large one for 3 blocks spills on sm_80). The ``128 x 16`` tile with ``8 x 4``
#: outputs a thread has 64 threads, each staging two positions (12 shared reads for 32 FMAs
#: a k step instead of 10 for 16); the simulator's ``32 x 4`` tile does the same with 16
#: threads, its ``8 x 8`` tile one position a thread.
TILES = {
    "f32": ((128, 64, 8, 8, 4, 2), (64, 64, 8, 4, 4, 4), (128, 32, 8, 8, 2, 2),
            (128, 16, 8, 8, 4, 6), (128, 16, 8, 8, 2, 4)),
    "f64": ((64, 64, 8, 4, 4, 2), (64, 32, 8, 4, 2, 2), (64, 16, 8, 4, 2, 4)),
    "sim": ((8, 8, 4, 2, 2, 1), (32, 4, 4, 4, 2, 1)),
}


# Share of the first wave a tile's grid must fill to be taken over the next of its width.
# Half: a grid of one partial wave of the 64-thread 16-wide tile beats the same blocks
# of the 128-thread tile run in more than one wave (predicted, DeepFace L5 at batch 128:
# 625 blocks, 0.078 ms in one wave of the first against 0.137 ms in 1.18 waves of the
# second; ``scripts/kernel_table.py``).
_FILL = 0.5


def use_gemm(geom):
    """True when conv2d of ``geom`` takes the implicit GEMM (``c_Ig >= GEMM_MIN_CHANNELS``)."""
    return geom.in_channels_per_group >= GEMM_MIN_CHANNELS


@functools.lru_cache(maxsize=None)
def conv2d_gemm_kernel(code, tile_m, tile_n, tile_k, thread_m, thread_n, blocks_per_sm):
    """Implicit-GEMM conv2d kernel, specialised on dtype and tile shape.

    Args:
        code: ``"f16"``, ``"f32"`` or ``"f64"`` (the arrays' dtype; float16 loads and stores
            half words and computes in float32).
        tile_m, tile_n: output positions x output channels per block.
        tile_k: input channels per ``K`` chunk (one tap at a time).
        thread_m, thread_n: outputs per thread along positions and channels.
        blocks_per_sm: blocks an SM should hold at once (the launch bounds' minimum).

    Launch: ``grid = (ceil(n * h_O * w_O / tile_m), groups * ceil(c_Og / tile_n))``,
    ``block = (tile_m / thread_m * tile_n / thread_n,)``, static shared memory
    ``2 * tile_k * (tile_m + tile_n + 8) * itemsize`` bytes (itemsize of the compute type).

    Kernel arguments: the flat (C-order, 1-D) ``x (n, c_I, h, w)``,
    ``weight (c_O, c_Ig, k_H, k_W)``, ``bias (c_O,)`` (or ``out``) and
    ``out (n, c_O, h_O, w_O)``, then ``has_bias, n, c_I, h, w, c_O, h_O, w_O, c_Ig, c_Og,
    k_H, k_W, s_H, s_W, p_top, p_left, d_H, d_W, blocks_n`` (``blocks_n`` channel blocks per
    group).
    """
    store, scalar = _SCALAR[code], _COMPUTE[code]
    BM, BN, BK, TM, TN = tile_m, tile_n, tile_k, thread_m, thread_n
    MT = BM // TM          # threads along the positions
    NT = MT * (BN // TN)   # threads per block
    NSTEP = BN // TN       # distance between a thread's maps
    if BK % 4:
        raise ValueError(f"tile_k must be a multiple of 4, got {BK}")
    if (BM % TM or BN % TN or (NT % BM and BM % NT) or (BM * BK) % NT or NT % BK
            or (BN * BK) % NT):
        raise ValueError(f"tile {BM}x{BN}x{BK} with {TM}x{TN} outputs a thread does not "
                         "split evenly over its threads")
    PA = max(1, BM // NT)  # positions a thread stages, NT apart ...
    ASTEP = max(1, NT // BM)  # ... and for each, channels this far apart ...
    AK = BK // ASTEP       # ... this many a chunk
    LA = PA * AK           # input values a thread stages per chunk
    LB = BN * BK // NT     # weights a thread stages per chunk
    BSTEP = NT // BK       # maps between them
    AP = BM + _PAD         # shared row pitches (words)
    BP = BN + _PAD
    ABUF = BK * AP         # one buffer of the input stage
    BBUF = BK * BP
    ASMEM = 2 * ABUF       # both buffers
    BSMEM = 2 * BBUF
    NACC = TM * TN
    # A thread's positions in runs of VA (one shared load each), its maps in runs of VB.
    VA, VB = gemm_runs(TM, TN, NT, blocks_per_sm)
    ALIGN = SHARED_VECTOR_ALIGN

    # A staged chunk: tile_k steps of thread_m / VA + thread_n / VB shared loads and
    # thread_m * thread_n FMAs.
    multiply = gemm_chunk(TM, TN, MT, NSTEP, BK, AP, BP, VA, VB)

    def kernel(x, weight, bias, out, has_bias, n, c_I, h, wd, c_O, h_O, w_O, c_Ig, c_Og,
               k_H, k_W, s_H, s_W, pt, pl, d_H, d_W, blocks_n):
        # A tile kernel: every thread takes part in every stage and barrier, so the bounds
        # guards sit on the loads and the stores.
        tid = cuda.threadIdx.x
        tx = tid % MT                  # this thread's positions: gemm_fragment(tx, i, MT, VA)
        ty = tid // MT                 # this thread's maps: gemm_fragment(ty, j, NSTEP, VB)
        n_pq = h_O * w_O
        m_total = n * n_pq
        hw = h * wd
        khw = k_H * k_W
        m0 = cuda.blockIdx.x * BM
        g = cuda.blockIdx.y // blocks_n
        n0 = (cuda.blockIdx.y - g * blocks_n) * BN
        co0 = g * c_Og + n0            # first output channel of the block
        n_co = min(BN, c_Og - n0)      # channels of the block

        a_s = cuda.shared.array(ASMEM, dtype=scalar, alignment=ALIGN)
        b_s = cuda.shared.array(BSMEM, dtype=scalar, alignment=ALIGN)

        # The output positions this thread stages for the whole K walk: their image, row
        # and column, found once (the kernel's only divisions).
        am = tid % BM
        ak = tid // BM
        a_in = cuda.local.array(PA, dtype=types.boolean)
        a_iy = cuda.local.array(PA, dtype=types.int64)
        a_ix = cuda.local.array(PA, dtype=types.int64)
        a_first = cuda.local.array(PA, dtype=types.int64)
        for p in range(PA):
            m = m0 + am + p * NT
            img = m // n_pq
            pq = m - img * n_pq
            oy = pq // w_O
            a_in[p] = m < m_total
            a_iy[p] = oy * s_H - pt
            a_ix[p] = (pq - oy * w_O) * s_W - pl
            a_first[p] = (img * c_I + g * c_Ig + ak) * hw  # channel ak of its image's group
        # The weights this thread stages: channel bk of maps bn + j * BSTEP, [k][map] in shared.
        bk = tid % BK
        bn = tid // BK
        b_first = ((co0 + bn) * c_Ig + bk) * khw
        b_map_step = BSTEP * c_Ig * khw

        a_reg = cuda.local.array(LA, dtype=scalar)
        b_reg = cuda.local.array(LB, dtype=scalar)
        acc = cuda.local.array(NACC, dtype=scalar)
        a_frag = cuda.local.array(TM, dtype=scalar)
        b_frag = cuda.local.array(TN, dtype=scalar)
        for a in range(NACC):
            acc[a] = scalar(0)  # keep the math in the compute type

        stages = khw * ((c_Ig + BK - 1) // BK)
        # The chunk to load next: tap (ky, kx), channels c0 ...
        ky = 0
        kx = 0
        c0 = 0
        for st in range(stages + 1):
            if st < stages:
                # Global loads of chunk st into registers (before multiplying chunk st - 1,
                # so their latency hides behind it). Zeros outside the image (padding), past
                # the group's channels and past the tile's positions or maps.
                for p in range(PA):
                    iy = a_iy[p] + ky * d_H
                    ix = a_ix[p] + kx * d_W
                    a_ok = a_in[p] and iy >= 0 and iy < h and ix >= 0 and ix < wd
                    a_ofs = a_first[p] + c0 * hw + iy * wd + ix
                    for j in range(AK):
                        v = scalar(0)
                        if a_ok and c0 + ak + j * ASTEP < c_Ig:
                            v = scalar(x[uint64(a_ofs + j * ASTEP * hw)])
                        a_reg[p * AK + j] = v
                b_ok = c0 + bk < c_Ig
                b_ofs = b_first + c0 * khw + ky * k_W + kx
                for j in range(LB):
                    v = scalar(0)
                    if b_ok and bn + j * BSTEP < n_co:
                        v = scalar(weight[uint64(b_ofs + j * b_map_step)])
                    b_reg[j] = v
                c0 += BK
                if c0 >= c_Ig:
                    c0 = 0
                    kx += 1
                    if kx == k_W:
                        kx = 0
                        ky += 1
            if st > 0:
                # Multiply chunk st - 1 from its buffer.
                a_buf = ((st - 1) & 1) * ABUF + tx * VA
                b_buf = ((st - 1) & 1) * BBUF + ty * VB
                multiply(a_s, b_s, a_buf, b_buf, a_frag, b_frag, acc)
            if st < stages:
                # Store chunk st into the other buffer: nobody reads it now (its last reader,
                # chunk st - 2, finished before the previous barrier).
                a_buf = (st & 1) * ABUF + ak * AP + am
                for p in range(PA):
                    for j in range(AK):
                        a_s[uint64(a_buf + j * ASTEP * AP + p * NT)] = a_reg[p * AK + j]
                b_buf = (st & 1) * BBUF + bk * BP + bn
                for j in range(LB):
                    b_s[uint64(b_buf + j * BSTEP)] = b_reg[j]
            # Wait until chunk st is stored and chunk st - 1 is read by everyone.
            cuda.syncthreads()

        # Output offsets: one division per position of the thread, once per tile.
        for i in range(TM):
            m = m0 + gemm_fragment(tx, i, MT, VA)
            if m < m_total:
                img = m // n_pq
                pq = m - img * n_pq
                ofs = (img * c_O + co0) * n_pq + pq
                for j in range(TN):
                    mj = gemm_fragment(ty, j, NSTEP, VB)
                    if mj < n_co:
                        v = acc[i * TN + j]
                        if has_bias:
                            v += scalar(bias[uint64(co0 + mj)])
                        out[uint64(ofs + mj * n_pq)] = store(v)

    name = f"conv2d_gemm_{code}_t{BM}x{BN}_k{BK}_r{TM}x{TN}_o{blocks_per_sm}"
    signature = (_array(code, 1),) * 4 + (types.int64,) * 19
    return KernelSpec(name, _rename(kernel, name), signature, (NT, blocks_per_sm), (VA, VB))


class Conv2dGemmConfig(NamedTuple):
    """Specialisation and launch shape of one implicit-GEMM conv2d call."""

    kernel: KernelSpec
    block: tuple       # (threads,)
    grid: tuple        # (position blocks, channel blocks of all groups)
    blocks_n: int      # channel blocks per group
    shared_bytes: int  # dynamic shared memory: none (the stages are static)


def conv2d_gemm_config(geom, dtype):
    """Pick the tile and launch shape of the implicit GEMM for ``geom`` (a pure function).

    The tile's ``N`` is the narrowest of 64, 32 or 16 maps that covers a group's maps
    (wider groups take 64: DeepFace's 16 maps would leave three quarters of a 64-wide
    tile's FMAs on padding). Among the tiles of that width, in the order of :data:`TILES`,
    the first whose grid fills the GPU's first wave (132 SMs x its blocks per SM), else the
    one with the most blocks: float32 takes ``128 x 64`` (8 x 4 outputs a thread: 32 FMAs
    per 12 shared loads, two blocks an SM) where its grid fills the wave, else ``64 x 64``
    (4 x 4, four blocks an SM), which gives a small product more blocks and more warps
    (ResNet-50 res5 at batch 32: 104 large tiles would leave SMs idle; 200 small ones
    spread over all); 16 maps take ``128 x 16`` with 8 x 4 outputs for each of 64 threads
    (six blocks an SM), or 8 x 2 for each of 128 (four) where the first does not fill the
    wave. A partial last wave is cheaper than it looks: a block alone on its SM has the
    SM's shared-memory bandwidth to itself. float16 takes the float32 tiles, float64 its
    own 64-position ones. 8 input channels a chunk in every case; in the simulator 4.
    """
    code = dtype_code(dtype)
    tiles = TILES["sim"] if simulator_enabled() else TILES[compute_code(code)]
    m_total = geom.batch * geom.out_height * geom.out_width
    c_og = geom.out_channels_per_group
    return conv2d_gemm_launch(geom, dtype,
                              pick_gemm_tile(tiles, m_total, c_og, geom.groups, fill=_FILL))


def conv2d_gemm_launch(geom, dtype, tile):
    """The :class:`Conv2dGemmConfig` of ``tile`` (one of :data:`TILES`) for ``geom``."""
    code = dtype_code(dtype)
    m_total = geom.batch * geom.out_height * geom.out_width
    tile_m, tile_n = tile[0], tile[1]
    blocks_n = -(-geom.out_channels_per_group // tile_n)
    grid = check_grid((-(-m_total // tile_m), geom.groups * blocks_n), "conv2d")
    spec = conv2d_gemm_kernel(code, *tile)
    threads = (tile_m // tile[3]) * (tile_n // tile[4])
    return Conv2dGemmConfig(spec, (threads,), grid, blocks_n, 0)


def launch(kernel, config, x, weight, bias, out, has_bias, geom, stream):
    """Launch the compiled ``kernel`` of ``config`` on flat device arrays (called by
    :func:`gpuconv.cuda.launch.launch_conv2d`, which passes the output as the unread bias
    when there is none)."""
    kernel[config.grid, config.block, stream](
        x,                          # (n, c_I, h, w)
        weight,                     # (c_O, c_Ig, k_H, k_W)
        bias,                       # (c_O,), or the output unread
        out,                        # (n, c_O, h_O, w_O), written
        has_bias,                   # 0 or 1
        geom.batch, geom.in_channels, geom.in_height, geom.in_width,
        geom.out_channels, geom.out_height, geom.out_width,
        geom.in_channels_per_group, geom.out_channels_per_group,
        geom.kernel_height, geom.kernel_width,
        geom.stride_h, geom.stride_w,
        geom.pad_top, geom.pad_left,
        geom.dilation_h, geom.dilation_w,
        config.blocks_n,            # channel blocks per group
    )
