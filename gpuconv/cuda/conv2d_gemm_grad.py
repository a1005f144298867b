"""conv2d's two gradients as implicit GEMMs: the CUDA path for channel-heavy layers.

The same reading as the forward's (:mod:`gpuconv.cuda.conv2d_gemm`), with the operands
swapped around:

- **input gradient** ``gx = gy * W`` gathered over the stride phases:
  ``M = n * ceil(h / s_H) * ceil(w / s_W)`` input pixels of one phase, ``N = c_Ig`` input
  channels, ``K = c_Og * (taps of the phase)``. Input rows ``iy = r_y + s_H * u`` receive
  from tap ``k_y`` exactly when ``r_y + p_top - k_y * d_H`` is a multiple of ``s_H``, then
  from output row ``u + (r_y + p_top - k_y * d_H) / s_H``; the taps that apply to a phase are
  every ``s_H / gcd(s_H, d_H)``-th from the first, and their output-row offsets fall by
  ``d_H / gcd(s_H, d_H)`` a tap. A block works on one phase, so its taps are the same for all
  its threads (no divergence); the offsets are found once per block and stepped per tap, and
  each ``gx`` element is written by one thread (a gather: no atomics, no zero fill).
- **weight gradient** ``gw^T = im2col(x)^T * gy``: ``M = c_Ig * k_H * k_W`` weight columns
  (input channel, tap), ``N = c_Og`` output channels, ``K = n * h_O * w_O`` (image,
  position) pairs. ``K`` is split into slices (grid z), each written to its own partial sum
  in the compute type; :func:`gpuconv.cuda.grad_kernels.sum_slices_kernel` then adds the
  slices in a fixed order (bitwise deterministic, no atomics). Each thread's weight columns
  are fixed for the whole walk, so their channel plane and tap offsets are found once per
  block; its (image, row, column) of ``K`` is found once per block and stepped by
  host-computed increments per chunk (no division in the loop).

Both kernels keep the forward's tile machinery: a block owns a ``tile_m x tile_n`` tile of
the product and walks ``K`` in chunks of ``tile_k``, both operands double-buffered in shared
memory (each thread holds the next chunk's values in registers while the block multiplies the
current one: one barrier a chunk), rows padded by four words, ``thread_m x thread_n``
accumulators a thread with positions ``tile_m / thread_m`` apart and the multiply loop written
out four ``k`` steps a trip. Global loads follow the caller's layouts: the input gradient reads
``gy`` along the pixels (consecutive threads, consecutive columns), the weight gradient reads
``x`` and ``gy`` along ``K`` (``tile_k``, 8 or 16, consecutive positions per column: whole
32-byte sectors at stride 1). Offsets are 64-bit; float16 loads and stores half words and
computes in float32 (the weight gradient's partial sums are float32 and rounded once by the
slice sum); float64 computes in float64.

The factories are memoised on the dtype code and the tile shape; kernels are named by them
(``conv2d_igemm_f32_t128x64_k8_r8x4_o2``, ``conv2d_wgemm_f32_t64x16_k16_r4x2_o4``).
:func:`use_gemm_grad` says which layers take this path; the dispatcher
(:func:`gpuconv.cuda.launch.conv2d_input_grad_config` and
:func:`~gpuconv.cuda.launch.conv2d_weight_grad_config`) asks it first.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

from numba import cuda, types, uint64

from ..device import simulator_enabled
from .spec import (_COMPUTE, _NUMPY, _SCALAR, GRID_YZ_LIMIT, KernelSpec, _array, _rename,
                   check_grid, compute_code, dtype_code, gemm_chunk, pick_gemm_tile)

__all__ = ["GRAD_GEMM_MIN_CHANNELS", "use_gemm_grad", "input_grad_gemm_kernel",
           "weight_grad_gemm_kernel", "InputGradGemmConfig", "WeightGradGemmConfig",
           "input_grad_gemm_config", "weight_grad_gemm_config", "weight_grad_gemm_scratch",
           "IGRAD_TILES", "WGRAD_TILES", "PARTIAL_BUDGET_BYTES"]

#: Input channels per group from which conv2d's gradients take the implicit GEMMs. The
#: predictions (``scripts/kernel_table.py``) put the GEMMs ahead of the direct gradient
#: kernels from 16 channels on (DeepFace's 16-channel layers); below, a ``K`` chunk or an
#: ``N`` tile would be mostly padding, and the direct kernels (the seed's 3 and 10 channels)
#: stay.
GRAD_GEMM_MIN_CHANNELS = 16

# Words added to each shared row (the forward's: a warp's stores land on 32 banks).
_PAD = 4

#: Tile shapes ``(tile_m, tile_n, tile_k, thread_m, thread_n, blocks_per_sm)`` of the input
#: gradient by compute type, largest first; ``N`` is the input channels, so narrow tiles
#: serve 16- and 32-channel groups. The ``128 x 16`` tile with ``8 x 4`` outputs a thread
#: has 64 threads, each staging two pixels (12 shared reads for 32 FMAs a k step instead of
#: 10 for 16); the simulator's ``32 x 4`` tile does the same with 16 threads.
IGRAD_TILES = {
    "f32": ((128, 64, 8, 8, 4, 2), (64, 64, 8, 4, 4, 2), (128, 32, 8, 8, 2, 2),
            (128, 16, 8, 8, 4, 6), (128, 16, 8, 8, 2, 4)),
    "f64": ((64, 64, 8, 4, 4, 2), (64, 32, 8, 4, 2, 2), (64, 16, 8, 4, 2, 4)),
    "sim": ((8, 8, 4, 2, 2, 1), (32, 4, 4, 4, 2, 1)),
}

#: Tile shapes of the weight gradient (``M``: weight columns, ``N``: output channels). The
#: 16-wide float32 tile walks ``K`` 16 positions a chunk on 64 columns with 4 x 2 outputs a
#: thread, four blocks of 128 threads an SM (128 registers, no spills): a chunk's loads come
#: from DRAM, and 8 positions a chunk (the 128 x 16 tile, three blocks at 168 registers) left
#: the FMAs of a chunk shorter than its loads' round trip (predicted 1.4x slower on DeepFace).
WGRAD_TILES = {
    "f32": ((128, 64, 8, 8, 4, 2), (128, 32, 8, 8, 2, 2), (64, 16, 16, 4, 2, 4)),
    "f64": ((64, 64, 8, 4, 4, 2), (64, 32, 8, 4, 2, 3), (64, 16, 8, 4, 2, 4)),
    "sim": ((8, 8, 4, 2, 2, 1),),
}

# Partial sums of the weight gradient: at most this many bytes of scratch.
PARTIAL_BUDGET_BYTES = 32 * 1024 * 1024

# Blocks the weight gradient aims for (several waves on 132 SMs at 2-4 blocks an SM) ...
_WGRAD_TARGET_BLOCKS = 2048
# ... with each slice at least this many chunks of K long.
_WGRAD_MIN_CHUNKS = 8


def use_gemm_grad(geom):
    """True when conv2d's gradients of ``geom`` take the implicit GEMMs
    (``c_Ig >= GRAD_GEMM_MIN_CHANNELS``)."""
    return geom.in_channels_per_group >= GRAD_GEMM_MIN_CHANNELS


def _check_tile(BM, BN, BK, TM, TN, NT):
    if BK % 4:
        raise ValueError(f"tile_k must be a multiple of 4, got {BK}")
    if BM % TM or BN % TN or NT % BK or (BM * BK) % NT or (BN * BK) % NT:
        raise ValueError(f"tile {BM}x{BN}x{BK} with {TM}x{TN} outputs a thread does not "
                         "split evenly over its threads")


# --------------------------------------------------------------------------------------------
# input gradient
# --------------------------------------------------------------------------------------------

@functools.lru_cache(maxsize=None)
def input_grad_gemm_kernel(code, tile_m, tile_n, tile_k, thread_m, thread_n, blocks_per_sm):
    """Implicit-GEMM input gradient of conv2d, specialised on dtype and tile shape.

    Launch: ``grid = (s_H * s_W * tiles_m, groups * blocks_n)`` with ``tiles_m =
    ceil(n * h_u * w_u / tile_m)`` (``h_u = ceil(h / s_H)``, ``w_u = ceil(w / s_W)``) and
    ``blocks_n = ceil(c_Ig / tile_n)``; ``block = (tile_m / thread_m * tile_n / thread_n,)``;
    static shared memory ``2 * tile_k * (tile_m + tile_n + 8)`` words of the compute type.

    Kernel arguments: flat ``gy (n, c_O, h_O, w_O)``, ``weight (c_O, c_Ig, k_H, k_W)``,
    ``gx (n, c_I, h, w)`` (written), then ``n, c_I, h, w, c_O, h_O, w_O, c_Ig, c_Og, k_H,
    k_W, s_H, s_W, p_top, p_left, d_H, d_W, h_u, w_u, tiles_m, blocks_n, tap_step_h,
    tap_step_w, row_step, col_step`` (the last four: ``s / gcd(s, d)`` and ``d / gcd(s, d)``
    along each axis, computed on the host).
    """
    store, scalar = _SCALAR[code], _COMPUTE[code]
    BM, BN, BK, TM, TN = tile_m, tile_n, tile_k, thread_m, thread_n
    MT = BM // TM          # threads along the pixels
    NSTEP = BN // TN       # distance between a thread's channels
    NT = MT * NSTEP        # threads per block
    _check_tile(BM, BN, BK, TM, TN, NT)
    if (NT % BM and BM % NT) or NT % BN:
        raise ValueError(f"tile {BM}x{BN} with {NT} threads: the pixels must split evenly "
                         "over the threads (or the threads over the pixels), the threads "
                         "over the channels")
    PA = max(1, BM // NT)  # pixels a thread stages, NT apart ...
    ASTEP = max(1, NT // BM)  # ... and for each, output channels this far apart ...
    AK = BK // ASTEP       # ... this many a chunk
    LA = PA * AK           # gy values a thread stages per chunk
    LB = BN * BK // NT     # weights a thread stages per chunk ...
    BSTEP = NT // BN       # ... output channels apart
    AP = BM + _PAD
    BP = BN + _PAD
    ABUF = BK * AP
    BBUF = BK * BP
    ASMEM = 2 * ABUF       # both buffers (a compile-time constant)
    BSMEM = 2 * BBUF
    NACC = TM * TN
    multiply = gemm_chunk(TM, TN, MT, NSTEP, BK, AP, BP)

    def kernel(gy, weight, gx, n, c_I, h, wd, c_O, h_O, w_O, c_Ig, c_Og, k_H, k_W, s_H, s_W,
               pt, pl, d_H, d_W, h_u, w_u, tiles_m, blocks_n, tap_step_h, tap_step_w,
               row_step, col_step):
        # A tile kernel: every thread takes part in every stage and barrier, so the bounds
        # guards sit on the loads and the stores.
        tid = cuda.threadIdx.x
        tx = tid % MT                  # this thread's pixels: tx + i * MT
        ty = tid // MT                 # this thread's channels: ty + j * NSTEP
        n_pq = h_O * w_O
        hw = h * wd
        khw = k_H * k_W
        n_uv = h_u * w_u
        m_total = n * n_uv
        phase = cuda.blockIdx.x // tiles_m
        m0 = (cuda.blockIdx.x - phase * tiles_m) * BM
        ry = phase // s_W
        rx = phase - ry * s_W
        g = cuda.blockIdx.y // blocks_n
        n0 = (cuda.blockIdx.y - g * blocks_n) * BN   # first input channel, in the group
        n_ci = min(BN, c_Ig - n0)

        # The taps of this phase: the first that applies along each axis, how many, and the
        # output row (column) offset of the first (exact divisions, once per block).
        ky0 = k_H
        for t in range(k_H):
            if ky0 == k_H and (ry + pt - t * d_H) % s_H == 0:
                ky0 = t
        kx0 = k_W
        for t in range(k_W):
            if kx0 == k_W and (rx + pl - t * d_W) % s_W == 0:
                kx0 = t
        n_ky = 0
        if ky0 < k_H:
            n_ky = (k_H - 1 - ky0) // tap_step_h + 1
        n_kx = 0
        if kx0 < k_W:
            n_kx = (k_W - 1 - kx0) // tap_step_w + 1
        oy_first = (ry + pt - ky0 * d_H) // s_H
        ox_first = (rx + pl - kx0 * d_W) // s_W

        a_s = cuda.shared.array(ASMEM, dtype=scalar)
        b_s = cuda.shared.array(BSMEM, dtype=scalar)

        # The pixels this thread stages for the whole K walk (their only divisions).
        am = tid % BM
        ak = tid // BM
        a_in = cuda.local.array(PA, dtype=types.boolean)
        a_u = cuda.local.array(PA, dtype=types.int64)
        a_v = cuda.local.array(PA, dtype=types.int64)
        a_first = cuda.local.array(PA, dtype=types.int64)
        for p in range(PA):
            m = m0 + am + p * NT
            img = m // n_uv
            uv = m - img * n_uv
            a_u[p] = uv // w_u
            a_v[p] = uv - a_u[p] * w_u
            a_in[p] = m < m_total
            a_first[p] = (img * c_O + g * c_Og + ak) * n_pq  # output channel ak of its group
        # The weights this thread stages: input channel bn of output channels bk + j * BSTEP.
        bn = tid % BN
        bk = tid // BN
        b_in = bn < n_ci
        b_first = ((g * c_Og + bk) * c_Ig + n0 + bn) * khw
        b_co_step = BSTEP * c_Ig * khw

        a_reg = cuda.local.array(LA, dtype=scalar)
        b_reg = cuda.local.array(LB, dtype=scalar)
        acc = cuda.local.array(NACC, dtype=scalar)
        a_frag = cuda.local.array(TM, dtype=scalar)
        b_frag = cuda.local.array(TN, dtype=scalar)
        for a in range(NACC):
            acc[a] = scalar(0)  # keep the math in the compute type

        stages = n_ky * n_kx * ((c_Og + BK - 1) // BK)
        # The chunk to load next: the jy-th and jx-th taps of the phase, channels c0 ...
        jy = 0
        jx = 0
        c0 = 0
        for st in range(stages + 1):
            if st < stages:
                # Global loads of chunk st into registers (their latency hides behind the
                # multiply of chunk st - 1). Zeros outside gy, past the group's channels and
                # past the tile.
                for p in range(PA):
                    oy = a_u[p] + oy_first - jy * row_step
                    ox = a_v[p] + ox_first - jx * col_step
                    a_ok = a_in[p] and oy >= 0 and oy < h_O and ox >= 0 and ox < w_O
                    a_ofs = a_first[p] + c0 * n_pq + oy * w_O + ox
                    for j in range(AK):
                        val = scalar(0)
                        if a_ok and c0 + ak + j * ASTEP < c_Og:
                            val = scalar(gy[uint64(a_ofs + j * ASTEP * n_pq)])
                        a_reg[p * AK + j] = val
                b_ofs = (b_first + c0 * c_Ig * khw + (ky0 + jy * tap_step_h) * k_W
                         + kx0 + jx * tap_step_w)
                for j in range(LB):
                    val = scalar(0)
                    if b_in and c0 + bk + j * BSTEP < c_Og:
                        val = scalar(weight[uint64(b_ofs + j * b_co_step)])
                    b_reg[j] = val
                c0 += BK
                if c0 >= c_Og:
                    c0 = 0
                    jx += 1
                    if jx == n_kx:
                        jx = 0
                        jy += 1
            if st > 0:
                # Multiply chunk st - 1 from its buffer, four k steps a trip.
                a_buf = ((st - 1) & 1) * ABUF + tx
                b_buf = ((st - 1) & 1) * BBUF + ty
                multiply(a_s, b_s, a_buf, b_buf, a_frag, b_frag, acc)
            if st < stages:
                # Store chunk st into the other buffer (its last reader, chunk st - 2,
                # finished before the previous barrier).
                a_buf = (st & 1) * ABUF + ak * AP + am
                for p in range(PA):
                    for j in range(AK):
                        a_s[uint64(a_buf + j * ASTEP * AP + p * NT)] = a_reg[p * AK + j]
                b_buf = (st & 1) * BBUF + bk * BP + bn
                for j in range(LB):
                    b_s[uint64(b_buf + j * BSTEP * BP)] = b_reg[j]
            # Wait until chunk st is stored and chunk st - 1 is read by everyone.
            cuda.syncthreads()

        # Every pixel of the phase inside the image gets its sum (zero where no tap applies).
        for i in range(TM):
            m = m0 + tx + i * MT
            if m < m_total:
                img = m // n_uv
                uv = m - img * n_uv
                u = uv // w_u
                v = uv - u * w_u
                iy = ry + u * s_H
                ix = rx + v * s_W
                if iy < h and ix < wd:
                    ofs = (img * c_I + g * c_Ig + n0 + ty) * hw + iy * wd + ix
                    for j in range(TN):
                        if ty + j * NSTEP < n_ci:
                            gx[uint64(ofs + j * NSTEP * hw)] = store(acc[i * TN + j])

    name = f"conv2d_igemm_{code}_t{BM}x{BN}_k{BK}_r{TM}x{TN}_o{blocks_per_sm}"
    signature = (_array(code, 1),) * 3 + (types.int64,) * 25
    return KernelSpec(name, _rename(kernel, name), signature, (NT, blocks_per_sm))


class InputGradGemmConfig(NamedTuple):
    """Specialisation and launch shape of one implicit-GEMM input-gradient call."""

    kernel: KernelSpec
    block: tuple       # (threads,)
    grid: tuple        # (phases * pixel tiles, groups * channel blocks)
    tiles_m: int       # pixel tiles per phase
    blocks_n: int      # channel blocks per group
    steps: tuple       # (tap_step_h, tap_step_w, row_step, col_step)
    shared_bytes: int  # dynamic shared memory: none (the stages are static)


def input_grad_gemm_config(geom, dtype):
    """Tile and launch shape of the implicit-GEMM input gradient (a pure function).

    The tile's ``N`` is the narrowest of 64, 32 or 16 input channels that covers the group
    (wider groups take 64); among the tiles of that width, in the order of
    :data:`IGRAD_TILES`, the first whose grid fills the GPU's first wave (132 SMs x its
    blocks per SM), else the first with the most blocks. float16 takes the float32 tiles.
    """
    code = dtype_code(dtype)
    tiles = IGRAD_TILES["sim"] if simulator_enabled() else IGRAD_TILES[compute_code(code)]
    s_H, s_W = geom.stride_h, geom.stride_w
    h_u, w_u = -(-geom.in_height // s_H), -(-geom.in_width // s_W)
    m_total = geom.batch * h_u * w_u
    c_ig = geom.in_channels_per_group
    choice = pick_gemm_tile(tiles, m_total, c_ig, geom.groups, s_H * s_W)
    tiles_m = max(1, -(-m_total // choice[0]))
    blocks_n = -(-c_ig // choice[1])
    grid = check_grid((s_H * s_W * tiles_m, geom.groups * blocks_n),
                      "the conv2d input gradient")
    gh, gw = math.gcd(s_H, geom.dilation_h), math.gcd(s_W, geom.dilation_w)
    steps = (s_H // gh, s_W // gw, geom.dilation_h // gh, geom.dilation_w // gw)
    spec = input_grad_gemm_kernel(code, *choice)
    threads = (choice[0] // choice[3]) * (choice[1] // choice[4])
    return InputGradGemmConfig(spec, (threads,), grid, tiles_m, blocks_n, steps, 0)


def launch_input_grad(kernel, config, grad_output, weight, out, geom, stream):
    """Launch the compiled ``kernel`` of ``config`` on flat device arrays (called by
    :func:`gpuconv.cuda.launch.launch_conv2d_input_grad`)."""
    kernel[config.grid, config.block, stream](
        grad_output,                # (n, c_O, h_O, w_O)
        weight,                     # (c_O, c_Ig, k_H, k_W)
        out,                        # (n, c_I, h, w), written
        geom.batch, geom.in_channels, geom.in_height, geom.in_width,
        geom.out_channels, geom.out_height, geom.out_width,
        geom.in_channels_per_group, geom.out_channels_per_group,
        geom.kernel_height, geom.kernel_width,
        geom.stride_h, geom.stride_w,
        geom.pad_top, geom.pad_left,
        geom.dilation_h, geom.dilation_w,
        -(-geom.in_height // geom.stride_h), -(-geom.in_width // geom.stride_w),  # phase grid
        config.tiles_m,             # pixel tiles per phase
        config.blocks_n,            # channel blocks per group
        *config.steps,              # tap steps and output-offset steps of the phases
    )


# --------------------------------------------------------------------------------------------
# weight gradient
# --------------------------------------------------------------------------------------------

@functools.lru_cache(maxsize=None)
def weight_grad_gemm_kernel(code, tile_m, tile_n, tile_k, thread_m, thread_n, blocks_per_sm):
    """Implicit-GEMM weight gradient of conv2d over slices of ``K``, specialised on dtype
    and tile shape.

    Block ``(x, y, z)`` sums ``K`` in ``[z * k_slice, (z + 1) * k_slice)`` in order for
    weight columns ``x * tile_m ...`` and output channels ``(y % blocks_n) * tile_n ...`` of
    group ``y // blocks_n``, and writes the partial sums to ``part[z]``, laid out as the
    weights ``(slices, c_O, c_Ig, k_H, k_W)``, in the compute type.

    Launch: ``grid = (ceil(c_Ig * k_H * k_W / tile_m), groups * blocks_n, slices)``,
    ``block = (tile_m / thread_m * tile_n / thread_n,)``, static shared memory.

    Kernel arguments: flat ``x (n, c_I, h, w)``, ``gy (n, c_O, h_O, w_O)``, ``part``
    (written, compute type), then ``c_I, h, w, c_O, h_O, w_O, c_Ig, c_Og, k_H, k_W, s_H,
    s_W, p_top, p_left, d_H, d_W, m_total, k_slice, blocks_n, step_row, step_col``
    (``m_total = n * h_O * w_O``; ``tile_k = step_row * w_O + step_col``, from the host).
    """
    scalar = _COMPUTE[code]
    BM, BN, BK, TM, TN = tile_m, tile_n, tile_k, thread_m, thread_n
    MT = BM // TM          # threads along the weight columns
    NSTEP = BN // TN       # distance between a thread's output channels
    NT = MT * NSTEP
    _check_tile(BM, BN, BK, TM, TN, NT)
    KT = NT // BK          # columns (channels) staged per step: a thread's K lane is tid % BK
    LA = BM * BK // NT     # input values a thread stages per chunk, KT columns apart
    LB = BN * BK // NT     # gy values a thread stages per chunk, KT channels apart
    AP = BM + _PAD
    BP = BN + _PAD
    ABUF = BK * AP
    BBUF = BK * BP
    ASMEM = 2 * ABUF       # both buffers (a compile-time constant)
    BSMEM = 2 * BBUF
    NACC = TM * TN
    multiply = gemm_chunk(TM, TN, MT, NSTEP, BK, AP, BP)

    def kernel(x, gy, part, c_I, h, wd, c_O, h_O, w_O, c_Ig, c_Og, k_H, k_W, s_H, s_W, pt, pl,
               d_H, d_W, m_total, k_slice, blocks_n, step_row, step_col):
        tid = cuda.threadIdx.x
        tx = tid % MT                  # this thread's columns: tx + i * MT
        ty = tid // MT                 # this thread's channels: ty + j * NSTEP
        n_pq = h_O * w_O
        hw = h * wd
        khw = k_H * k_W
        cols = c_Ig * khw
        m0 = cuda.blockIdx.x * BM
        g = cuda.blockIdx.y // blocks_n
        n0 = (cuda.blockIdx.y - g * blocks_n) * BN   # first output channel, in the group
        n_co = min(BN, c_Og - n0)
        s = cuda.blockIdx.z
        k_start = s * k_slice
        k_end = min(k_start + k_slice, m_total)

        a_s = cuda.shared.array(ASMEM, dtype=scalar)
        b_s = cuda.shared.array(BSMEM, dtype=scalar)

        # This thread's K lane and the weight columns and channels it stages: their channel
        # planes and tap offsets, found once (-1: past the columns).
        kl = tid % BK
        kc = tid // BK
        plane = cuda.local.array(LA, dtype=types.int64)
        tap_y = cuda.local.array(LA, dtype=types.int64)
        tap_x = cuda.local.array(LA, dtype=types.int64)
        for j in range(LA):
            col = m0 + kc + j * KT
            ci = col // khw
            t = col - ci * khw
            ky = t // k_W
            plane[j] = (g * c_Ig + ci) * hw if col < cols else -1
            tap_y[j] = ky * d_H - pt
            tap_x[j] = (t - ky * k_W) * d_W - pl
        b_first = (g * c_Og + n0 + kc) * n_pq

        # Its (image, row, column) of K, found once and stepped by tile_k a chunk.
        mk = k_start + kl
        img = mk // n_pq
        pq = mk - img * n_pq
        oy = pq // w_O
        ox = pq - oy * w_O

        a_reg = cuda.local.array(LA, dtype=scalar)
        b_reg = cuda.local.array(LB, dtype=scalar)
        acc = cuda.local.array(NACC, dtype=scalar)
        a_frag = cuda.local.array(TM, dtype=scalar)
        b_frag = cuda.local.array(TN, dtype=scalar)
        for a in range(NACC):
            acc[a] = scalar(0)  # keep the math in the compute type

        stages = (k_end - k_start + BK - 1) // BK
        for st in range(stages + 1):
            if st < stages:
                # Global loads of chunk st into registers; zeros in the padding and past
                # the slice, the columns or the channels.
                m_ok = mk < k_end
                x_base = img * c_I * hw
                iy0 = oy * s_H
                ix0 = ox * s_W
                for j in range(LA):
                    val = scalar(0)
                    iy = iy0 + tap_y[j]
                    ix = ix0 + tap_x[j]
                    if (m_ok and plane[j] >= 0 and iy >= 0 and iy < h and ix >= 0
                            and ix < wd):
                        val = scalar(x[uint64(x_base + plane[j] + iy * wd + ix)])
                    a_reg[j] = val
                b_ofs = img * c_O * n_pq + b_first + oy * w_O + ox
                for j in range(LB):
                    val = scalar(0)
                    if m_ok and kc + j * KT < n_co:
                        val = scalar(gy[uint64(b_ofs + j * KT * n_pq)])
                    b_reg[j] = val
                # Step the lane's position by tile_k (host-computed row and column steps).
                mk += BK
                ox += step_col
                oy += step_row
                if ox >= w_O:
                    ox -= w_O
                    oy += 1
                while oy >= h_O:
                    oy -= h_O
                    img += 1
            if st > 0:
                # Multiply chunk st - 1 from its buffer, four k steps a trip.
                a_buf = ((st - 1) & 1) * ABUF + tx
                b_buf = ((st - 1) & 1) * BBUF + ty
                multiply(a_s, b_s, a_buf, b_buf, a_frag, b_frag, acc)
            if st < stages:
                # Store chunk st into the other buffer (its last reader, chunk st - 2,
                # finished before the previous barrier).
                a_buf = (st & 1) * ABUF + kl * AP + kc
                for j in range(LA):
                    a_s[uint64(a_buf + j * KT)] = a_reg[j]
                b_buf = (st & 1) * BBUF + kl * BP + kc
                for j in range(LB):
                    b_s[uint64(b_buf + j * KT)] = b_reg[j]
            # Wait until chunk st is stored and chunk st - 1 is read by everyone.
            cuda.syncthreads()

        # Consecutive threads write consecutive weight columns.
        for j in range(TN):
            co = ty + j * NSTEP
            if co < n_co:
                row = (s * c_O + g * c_Og + n0 + co) * cols
                for i in range(TM):
                    col = m0 + tx + i * MT
                    if col < cols:
                        part[uint64(row + col)] = acc[i * TN + j]

    name = f"conv2d_wgemm_{code}_t{BM}x{BN}_k{BK}_r{TM}x{TN}_o{blocks_per_sm}"
    signature = ((_array(code, 1),) * 2 + (types.Array(scalar, 1, "C"),)
                 + (types.int64,) * 21)
    return KernelSpec(name, _rename(kernel, name), signature, (NT, blocks_per_sm))


class WeightGradGemmConfig(NamedTuple):
    """Specialisation, launch shape and slicing of one implicit-GEMM weight-gradient call."""

    kernel: KernelSpec
    block: tuple       # (threads,)
    grid: tuple        # (column tiles, groups * channel blocks, slices), None: empty batch
    blocks_n: int      # channel blocks per group
    slices: int        # slices of K (0 for an empty batch: the output is zeros)
    k_slice: int       # K per slice, a multiple of tile_k
    steps: tuple       # (step_row, step_col): tile_k positions as output rows and columns
    scratch_elements: int  # partial sums, of the compute type (0: one slice, into the output)


def weight_grad_gemm_config(geom, dtype):
    """Tile, launch shape and slicing of the implicit-GEMM weight gradient (pure).

    The tile's ``N`` is the narrowest of 64, 32 or 16 output channels that covers the group
    (wider groups take 64), its ``M`` 128 (float32; 64 for the 16-wide tile) or 64 (float64)
    weight columns. ``K`` is split into slices for about 2048 blocks (several waves on 132
    SMs), each slice at least 8 chunks long, the partial sums within
    :data:`PARTIAL_BUDGET_BYTES`. float16 (and any call with more than one slice) writes its
    partial sums to compute-type scratch, which the slice sum adds in order.
    """
    code = dtype_code(dtype)
    tiles = WGRAD_TILES["sim"] if simulator_enabled() else WGRAD_TILES[compute_code(code)]
    c_og = geom.out_channels_per_group
    cols = geom.in_channels_per_group * geom.kernel_height * geom.kernel_width
    choice = pick_gemm_tile(tiles, cols, c_og, geom.groups)
    tile_m, tile_n, tile_k = choice[0], choice[1], choice[2]
    spec = weight_grad_gemm_kernel(code, *choice)
    threads = (tile_m // choice[3]) * (tile_n // choice[4])
    blocks_n = -(-c_og // tile_n)
    w_o = geom.out_width
    steps = (tile_k // w_o, tile_k % w_o) if w_o else (0, 0)
    m_total = geom.batch * geom.out_height * geom.out_width
    if m_total == 0:
        return WeightGradGemmConfig(spec, (threads,), None, blocks_n, 0, tile_k, steps, 0)
    itemsize = _NUMPY[compute_code(code)].itemsize
    weight_elements = geom.out_channels * cols
    per_slice = -(-cols // tile_m) * geom.groups * blocks_n
    chunks = -(-m_total // tile_k)
    slices = -(-_WGRAD_TARGET_BLOCKS // per_slice)
    slices = min(slices, max(1, chunks // _WGRAD_MIN_CHUNKS),
                 max(1, PARTIAL_BUDGET_BYTES // (weight_elements * itemsize)), GRID_YZ_LIMIT)
    k_slice = -(-chunks // slices) * tile_k
    slices = -(-m_total // k_slice)  # no empty slice
    grid = check_grid((-(-cols // tile_m), geom.groups * blocks_n, slices),
                      "the conv2d weight gradient")
    direct = slices == 1 and code == compute_code(code)
    return WeightGradGemmConfig(spec, (threads,), grid, blocks_n, slices, k_slice, steps,
                                0 if direct else slices * weight_elements)


def weight_grad_gemm_scratch(geom, dtype):
    """Scratch of the implicit-GEMM weight gradient in elements of ``dtype`` (float16's
    float32 partial sums count two each)."""
    elements = weight_grad_gemm_config(geom, dtype).scratch_elements
    return elements * _NUMPY[compute_code(dtype_code(dtype))].itemsize // _NUMPY[
        dtype_code(dtype)].itemsize


def launch_weight_grad(kernel, config, x, grad_output, part, geom, stream):
    """Launch the compiled ``kernel`` of ``config`` on flat device arrays (called by
    :func:`gpuconv.cuda.launch.launch_conv2d_weight_grad`, which sums the slices)."""
    kernel[config.grid, config.block, stream](
        x,                          # (n, c_I, h, w)
        grad_output,                # (n, c_O, h_O, w_O)
        part,                       # (slices, c_O, c_Ig, k_H, k_W), written
        geom.in_channels, geom.in_height, geom.in_width,
        geom.out_channels, geom.out_height, geom.out_width,
        geom.in_channels_per_group, geom.out_channels_per_group,
        geom.kernel_height, geom.kernel_width,
        geom.stride_h, geom.stride_w,
        geom.pad_top, geom.pad_left,
        geom.dilation_h, geom.dilation_w,
        geom.batch * geom.out_height * geom.out_width,  # K: (image, position) pairs
        config.k_slice,             # K per slice
        config.blocks_n,            # channel blocks per group
        *config.steps,              # tile_k as output rows and columns
    )
