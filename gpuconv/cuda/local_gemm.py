"""local_conv2d forward for wide layers: one GEMM per output position, double-buffered.

Per output position ``p`` the locally connected layer is ``Y[:, :, p] = X_p . W_p^T``, a
product with ``M`` = images, ``N`` = the maps of a group and ``K = c_Ig * k_H * k_W``
(input channel, tap). Where the maps are many (VGG-16 conv5_1: ``K`` = 4608, 512 maps, 196
positions), the layer is bound by streaming the weights: every weight serves ``batch``
FMAs, read once from DRAM; where they are 16 (DeepFace), by staging at a large batch. :func:`gpuconv.cuda.kernels.local_conv2d_kernel` stages
both operands and then multiplies, so its loads are not in flight while it computes. This
kernel keeps them in flight: it is the implicit GEMM of :mod:`gpuconv.cuda.conv2d_gemm`
with the operands of one position.

- A block owns one position ``p``, a tile of ``tile_m`` images and ``tile_n`` maps of one
  group (64 maps, or 16 for groups of fewer than 64), and walks ``K`` in chunks of ``tile_k`` consecutive terms in the weights' own
  order ``(channel, ky, kx)``.
- **Weights**: the ``K`` weights of a (map, position) are contiguous in the caller's layout
  ``(c_O, h_O, w_O, c_Ig, k_H, k_W)``, so a warp's weight loads are runs of ``tile_k``
  consecutive words of one map (64 bytes at ``tile_k = 16``, whole sectors): every weight
  is read once per batch tile, by one thread.
- **Input**: the thread that stages term ``k`` of the chunk keeps ``k``'s (channel, ky, kx)
  in registers and steps it by ``tile_k`` a chunk with host-computed carries (no division
  in the loop); zeros outside the image (padding) and past ``K``. The input under one
  position is small beside the weights and comes from L2.
- **Double-buffered**: each thread issues the next chunk's global loads into registers
  before the block multiplies the current chunk from shared memory, and stores them into
  the other buffer afterwards (one barrier a chunk), so DRAM latency hides behind the FMAs
  of the resident blocks. Shared rows ``[k][image]`` and ``[k][map]`` have pitches
  ``= 32 / tile_k`` (mod 32): a warp's stores (``tile_k`` terms x ``32 / tile_k`` rows)
  land on 32 banks; the multiply loop's reads are runs of consecutive words, broadcast.
- Each thread accumulates ``thread_m x thread_n`` outputs (images ``tile_m / thread_m``
  apart, maps ``tile_n / thread_n`` apart), adds the bias (per map or per position) and
  stores once: no split of ``K``, no atomics, bitwise deterministic.
- Batches larger than the tile take ``batch_tiles`` blocks per position, neighbours in the
  grid, so a position's weights are read from DRAM once and from L2 after.

float16 loads half words and computes in float32, float64 in float64; offsets are 64-bit.
The factory is memoised on the dtype code and the tile shape; kernels are named by them
(``local_conv2d_gemm_f32_t32x64_k16_r8x4_o6``). :func:`use_local_gemm` says which layers the
dispatcher (:func:`gpuconv.cuda.launch.local_conv2d_forward_config`) gives this kernel.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

from numba import cuda, types, uint64

from ..device import simulator_enabled
from .spec import (_COMPUTE, _SCALAR, SHARED_VECTOR_ALIGN, KernelSpec, _array, _rename,
                   check_grid, compute_code, dtype_code, gemm_chunk, gemm_fragment,
                   gemm_vector)
from .spec import gemm_pitch as _pitch  # the shared tiles' pitch rule

__all__ = ["LocalGemmConfig", "local_gemm_kernel", "local_gemm_config", "local_gemm_launch",
           "RUN_TILES",
           "use_local_gemm", "launch", "TILES", "LOCAL_GEMM_MIN_MAPS",
           "LOCAL_GEMM_NARROW_MIN_BATCH"]

#: Tile shapes ``(tile_m, tile_n, tile_k, thread_m, thread_n, blocks_per_sm)`` by compute
#: type, the wide one (64 maps a block) first: ``tile_m`` images x ``tile_n`` maps,
#: ``tile_k`` terms a chunk. float32 (and float16), wide: 64 threads of 8 x 4 outputs (32 FMAs
#: per 12 shared reads a k step), six blocks an SM (168 registers on sm_80 and sm_90, no
#: spills; eight blocks at 128 registers spill on sm_80), so 6 x 4 KiB of weights are in
#: flight an SM (Little's law at 4.3 TB/s and ~700 ns asks ~23 KiB). Narrow, for groups of
#: 16 to 63 maps: 64 images x 16 maps, 64 threads of 4 x 4, eight blocks an SM (127-128
#: registers, no spills). float64: 32 x 32 and 64 x 16, 4 x 4 a thread, four blocks an SM.
#: The simulator's tiles are 8 x 8 (one staged image a pass) and 16 x 4 (eight), 4 terms a
#: chunk.
TILES = {
    "f32": ((32, 64, 16, 8, 4, 6), (64, 16, 16, 4, 4, 8)),
    "f64": ((32, 32, 16, 4, 4, 4), (64, 16, 16, 4, 4, 4)),
    "sim": ((8, 8, 4, 2, 2, 1), (16, 4, 4, 4, 2, 1)),
}

#: The same two tiles reading their shared tiles in runs of 4 (``local_gemm_kernel(...,
#: runs=True)``: 3 loads of 128 bits for the 32 FMAs of a k step of the 8 x 4 register tile
#: where word reads take 12). The runs take aligned register groups: 186 and 158 registers
#: (ptxas sm_90, no spills), so four and six blocks an SM where the word-reading tiles hold
#: six and eight (at five and seven blocks they spill). Fewer loads
#: against fewer warps in flight: the model puts them 12-38 % ahead on AlexNet conv1, ResNet
#: res2 and DeepFace L4-L5 and 6-24 % behind on VGG conv5_1 and DeepFace L6, inside its
#: error, so they are candidates only (:func:`gpuconv.cuda.kernels.forward_candidates`:
#: the acceptance run times them beside the dispatcher's pick, autotuning may take them);
#: the dispatcher keeps :data:`TILES` until a GPU has measured both. float64 has none.
RUN_TILES = {
    "f32": ((32, 64, 16, 8, 4, 4), (64, 16, 16, 4, 4, 6)),
    "f64": (),
    "sim": ((8, 8, 4, 2, 2, 1),),
}

#: The dispatcher gives this kernel, above the streaming kernel's batches, every group of at
#: least this many maps (the wide tile) ...
LOCAL_GEMM_MIN_MAPS = 64
#: ... and groups of 16 to 63 maps from this batch on (the narrow tile, its 64 images at
#: least three quarters used). The predictions (``scripts/kernel_table.py``) put the wide
#: tile ahead of the batched GEMM of :func:`gpuconv.cuda.kernels.local_conv2d_config` on
#: every 64-or-more-map benchmark layer at batches 16-64 but one (ResNet-50 res5 at batch
#: 16, 784 blocks: 0.404 ms against 0.388), and the narrow one 1.1-3.9x ahead on 16-63
#: maps at batches 48 and 128 (DeepFace L4 / L5 / L6 at 128: 0.56 / 0.11 / 0.029 ms
#: against 0.85 / 0.25 / 0.077), but not at batch 32 or on fewer than 16 maps (the seed's
#: 5 and 10), which keep the batched GEMM.
LOCAL_GEMM_NARROW_MIN_BATCH = 48
_NARROW_MIN_MAPS = 16


@functools.lru_cache(maxsize=None)
def local_gemm_kernel(code, tile_m, tile_n, tile_k, thread_m, thread_n, blocks_per_sm,
                      runs=False):
    """The per-position GEMM local_conv2d forward, specialised on dtype and tile shape;
    ``runs``: a thread's images and maps in runs of consecutive rows, read in 128-bit
    shared loads (:func:`~gpuconv.cuda.spec.gemm_chunk`; named ``..._v4x4``), for the tiles
    of :data:`RUN_TILES`.

    Launch: ``grid = (h_O * w_O * batch_tiles, groups * blocks_n)`` (``batch_tiles =
    ceil(n / tile_m)``, ``blocks_n = ceil(c_Og / tile_n)``), ``block = (tile_m / thread_m *
    tile_n / thread_n,)``, static shared memory ``2 * tile_k * (pitch_m + pitch_n)`` words
    of the compute type.

    Kernel arguments: flat ``x (n, c_I, h, w)``, ``weight (c_O, h_O, w_O, c_Ig, k_H, k_W)``,
    ``bias (c_O, 1 or h_O * w_O)`` (or ``out``), ``out (n, c_O, h_O, w_O)`` (written), then
    ``has_bias, bias_len, n, c_I, h, w, c_O, h_O, w_O, c_Ig, c_Og, k_H, k_W, s_H, s_W,
    p_top, p_left, d_H, d_W, batch_tiles, blocks_n, step_c, step_ky, step_kx`` (the last
    three: ``tile_k`` terms as whole channels, kernel rows and columns).
    """
    store, scalar = _SCALAR[code], _COMPUTE[code]
    BM, BN, BK, TM, TN = tile_m, tile_n, tile_k, thread_m, thread_n
    MT = BM // TM          # threads along the images
    NSTEP = BN // TN       # distance between a thread's maps
    NT = MT * NSTEP        # threads per block
    if BK % 4:
        raise ValueError(f"tile_k must be a multiple of 4, got {BK}")
    if BM % TM or BN % TN or NT % BK or (BM * BK) % NT or (BN * BK) % NT:
        raise ValueError(f"tile {BM}x{BN}x{BK} with {TM}x{TN} outputs a thread does not "
                         "split evenly over its threads")
    KT = NT // BK          # rows (images, maps) one staging pass covers
    LA = BM * BK // NT     # input values a thread stages per chunk, KT images apart
    LB = BN * BK // NT     # weights a thread stages per chunk, KT maps apart
    VA, VB = (gemm_vector(TM), gemm_vector(TN)) if runs else (1, 1)
    ALIGN = SHARED_VECTOR_ALIGN
    AP = _pitch(BM, BK, VA)
    BP = _pitch(BN, BK, VB)
    ABUF = BK * AP
    BBUF = BK * BP
    ASMEM = 2 * ABUF
    BSMEM = 2 * BBUF
    NACC = TM * TN

    # A staged chunk: tile_k steps of thread_m + thread_n shared loads and
    # thread_m * thread_n FMAs.
    multiply = gemm_chunk(TM, TN, MT, NSTEP, BK, AP, BP, VA, VB)

    def kernel(x, weight, bias, out, has_bias, bias_len, n, c_I, h, wd, c_O, h_O, w_O, c_Ig,
               c_Og, k_H, k_W, s_H, s_W, pt, pl, d_H, d_W, batch_tiles, blocks_n, step_c,
               step_ky, step_kx):
        # A tile kernel: every thread takes part in every stage and barrier, so the bounds
        # guards sit on the loads and the stores.
        tid = cuda.threadIdx.x
        tx = tid % MT                  # this thread's images: tx + i * MT
        ty = tid // MT                 # this thread's maps: ty + j * NSTEP
        n_pq = h_O * w_O
        hw = h * wd
        khw = k_H * k_W
        k_len = c_Ig * khw
        pos = cuda.blockIdx.x // batch_tiles
        m0 = (cuda.blockIdx.x - pos * batch_tiles) * BM
        oy = pos // w_O
        ox = pos - oy * w_O
        g = cuda.blockIdx.y // blocks_n
        n0 = (cuda.blockIdx.y - g * blocks_n) * BN
        co0 = g * c_Og + n0            # first map of the block
        n_co = min(BN, c_Og - n0)      # maps of the block

        a_s = cuda.shared.array(ASMEM, dtype=scalar, alignment=ALIGN)
        b_s = cuda.shared.array(BSMEM, dtype=scalar, alignment=ALIGN)

        # The term this thread stages (k = bk, then + tile_k a chunk) and its rows r + j * KT.
        bk = tid % BK
        r = tid // BK
        c = bk // khw                  # its channel, kernel row and column (found once)
        rem = bk - c * khw
        ky = rem // k_W
        kx = rem - ky * k_W
        kk = bk
        iy0 = oy * s_H - pt
        ix0 = ox * s_W - pl
        a_base = ((m0 + r) * c_I + g * c_Ig) * hw
        a_img_step = KT * c_I * hw
        b_ofs = ((co0 + r) * n_pq + pos) * k_len + bk
        b_map_step = KT * n_pq * k_len

        a_reg = cuda.local.array(LA, dtype=scalar)
        b_reg = cuda.local.array(LB, dtype=scalar)
        acc = cuda.local.array(NACC, dtype=scalar)
        a_frag = cuda.local.array(TM, dtype=scalar)
        b_frag = cuda.local.array(TN, dtype=scalar)
        for a in range(NACC):
            acc[a] = scalar(0)  # keep the math in the compute type

        stages = (k_len + BK - 1) // BK
        for st in range(stages + 1):
            if st < stages:
                # Global loads of chunk st into registers (their latency hides behind the
                # multiply of chunk st - 1). Zeros outside the image, past K, past the batch
                # and past the group's maps.
                iy = iy0 + ky * d_H
                ix = ix0 + kx * d_W
                k_ok = kk < k_len
                a_ok = k_ok and iy >= 0 and iy < h and ix >= 0 and ix < wd
                a_ofs = a_base + c * hw + iy * wd + ix
                for j in range(LA):
                    v = scalar(0)
                    if a_ok and m0 + r + j * KT < n:
                        v = scalar(x[uint64(a_ofs + j * a_img_step)])
                    a_reg[j] = v
                for j in range(LB):
                    v = scalar(0)
                    if k_ok and r + j * KT < n_co:
                        v = scalar(weight[uint64(b_ofs + j * b_map_step)])
                    b_reg[j] = v
                # The next chunk's term: tile_k further, carried through (channel, ky, kx).
                kk += BK
                b_ofs += BK
                c += step_c
                ky += step_ky
                kx += step_kx
                if kx >= k_W:
                    kx -= k_W
                    ky += 1
                if ky >= k_H:
                    ky -= k_H
                    c += 1
            if st > 0:
                # Multiply chunk st - 1 from its buffer, four k steps a trip.
                a_buf = ((st - 1) & 1) * ABUF + tx * VA
                b_buf = ((st - 1) & 1) * BBUF + ty * VB
                multiply(a_s, b_s, a_buf, b_buf, a_frag, b_frag, acc)
            if st < stages:
                # Store chunk st into the other buffer (its last reader, chunk st - 2,
                # finished before the previous barrier).
                a_buf = (st & 1) * ABUF + bk * AP + r
                for j in range(LA):
                    a_s[uint64(a_buf + j * KT)] = a_reg[j]
                b_buf = (st & 1) * BBUF + bk * BP + r
                for j in range(LB):
                    b_s[uint64(b_buf + j * KT)] = b_reg[j]
            # Wait until chunk st is stored and chunk st - 1 is read by everyone.
            cuda.syncthreads()

        bias_pos = pos if bias_len > 1 else 0
        for i in range(TM):
            img = m0 + gemm_fragment(tx, i, MT, VA)
            if img < n:
                ofs = (img * c_O + co0 + ty * VB) * n_pq + pos
                for j in range(TN):
                    dj = (j % VB) + (j // VB) * NSTEP * VB  # gemm_fragment(ty, j, ...) - ty * VB
                    if ty * VB + dj < n_co:
                        v = acc[i * TN + j]
                        if has_bias:
                            v += scalar(bias[uint64((co0 + ty * VB + dj) * bias_len
                                                    + bias_pos)])
                        out[uint64(ofs + dj * n_pq)] = store(v)

    name = (f"local_conv2d_gemm_{code}_t{BM}x{BN}_k{BK}_r{TM}x{TN}_o{blocks_per_sm}"
            + (f"_v{VA}x{VB}" if runs else ""))
    signature = (_array(code, 1),) * 4 + (types.int64,) * 24
    return KernelSpec(name, _rename(kernel, name), signature, (NT, blocks_per_sm), (VA, VB))


class LocalGemmConfig(NamedTuple):
    """Specialisation and launch shape of one per-position GEMM local_conv2d call."""

    kernel: KernelSpec
    block: tuple          # (threads,)
    grid: tuple           # (positions * batch tiles, groups * map blocks)
    batch_tiles: int
    blocks_n: int         # map blocks per group
    steps: tuple          # (step_c, step_ky, step_kx): tile_k terms as channels, rows, columns
    shared_bytes: int = 0  # dynamic shared memory: none (the stages are static)
    slices: int = 1       # no split-K scratch (the launch layer reads this)


def use_local_gemm(geom):
    """True where the dispatcher picks this kernel for the local_conv2d forward (above the
    streaming kernel's batches): groups of at least :data:`LOCAL_GEMM_MIN_MAPS` maps, and
    groups of 16 or more from :data:`LOCAL_GEMM_NARROW_MIN_BATCH` images on."""
    c_og = geom.out_channels_per_group
    return geom.batch > 0 and (c_og >= LOCAL_GEMM_MIN_MAPS or (
        c_og >= _NARROW_MIN_MAPS and geom.batch >= LOCAL_GEMM_NARROW_MIN_BATCH))


def local_gemm_config(geom, dtype):
    """The tile and launch shape for ``geom`` (pure, no GPU): of the compute type's tiles
    (:data:`TILES`; the simulator's in the simulator), the wide one for groups of at least
    :data:`LOCAL_GEMM_MIN_MAPS` maps, else the narrow one."""
    code = dtype_code(dtype)
    tiles = TILES["sim"] if simulator_enabled() else TILES[compute_code(code)]
    wide = geom.out_channels_per_group >= LOCAL_GEMM_MIN_MAPS
    return local_gemm_launch(geom, dtype, tiles[0] if wide else tiles[1])


def local_gemm_launch(geom, dtype, tile, runs=False):
    """The :class:`LocalGemmConfig` of ``tile`` (tests force the simulator's); ``runs``: the
    kernel that reads its tiles in runs (:data:`RUN_TILES`)."""
    code = dtype_code(dtype)
    n_pos = geom.out_height * geom.out_width
    k_len = geom.in_channels_per_group * geom.kernel_height * geom.kernel_width
    if geom.out_channels * n_pos * k_len >= 2**62:
        raise ValueError("local_conv2d's weights are too many to index")
    tile_m, tile_n, tile_k = tile[0], tile[1], tile[2]
    batch_tiles = max(1, -(-geom.batch // tile_m))
    blocks_n = -(-geom.out_channels_per_group // tile_n)
    grid = check_grid((n_pos * batch_tiles, geom.groups * blocks_n), "local_conv2d")
    khw = geom.kernel_height * geom.kernel_width
    steps = (tile_k // khw, (tile_k % khw) // geom.kernel_width, tile_k % geom.kernel_width)
    spec = local_gemm_kernel(code, *tile, runs=runs)
    threads = (tile_m // tile[3]) * (tile_n // tile[4])
    return LocalGemmConfig(spec, (threads,), grid, batch_tiles, blocks_n, steps)


def launch(kernel, config, x, weight, bias, out, has_bias, bias_len, geom, stream):
    """Queue the compiled ``kernel`` of ``config`` on flat device arrays (called by
    :func:`gpuconv.cuda.launch.launch_local_conv2d`, which passes the output as the unread
    bias when there is none)."""
    kernel[config.grid, config.block, stream, 0](
        x,                          # (n, c_I, h, w)
        weight,                     # (c_O, h_O, w_O, c_Ig, k_H, k_W), the caller's layout
        bias,                       # (c_O, 1 or P), or the output unread
        out,                        # (n, c_O, h_O, w_O), written
        has_bias,                   # 0 or 1
        bias_len,                   # 1 (per map) or P (per position)
        geom.batch, geom.in_channels, geom.in_height, geom.in_width,
        geom.out_channels, geom.out_height, geom.out_width,
        geom.in_channels_per_group, geom.out_channels_per_group,
        geom.kernel_height, geom.kernel_width,
        geom.stride_h, geom.stride_w,
        geom.pad_top, geom.pad_left,
        geom.dilation_h, geom.dilation_w,
        config.batch_tiles,         # batch tiles per position (neighbours in the grid)
        config.blocks_n,            # map blocks per group
        *config.steps,              # tile_k terms as channels, kernel rows and columns
    )
