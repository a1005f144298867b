"""local_conv2d's gradients for many maps: one GEMM per output position.

The forward is, per output position ``p``, ``Y[:, :, p] = X_p . W_p^T``
(:mod:`gpuconv.cuda.local_gemm`). Its gradients are products of the same operands, and with
many maps a group (VGG-16 conv5_1: 512 maps, ``K = c_Ig * k_H * k_W`` = 4608) they are worth
doing as the dense, double-buffered GEMMs they are, where
:mod:`gpuconv.cuda.local_grad_gemm`'s batched GEMMs stage operands that serve only the batch
(input gradient) or a few positions (weight gradient) and do not overlap stage and multiply
(predicted 6-39 % of the roofline). Both read the output's gradient transposed:

- **transpose** ``dY (n, c_O, P)`` into ``dYt (P, c_O, n)`` (32 x 32 tiles through shared
  memory, both sides coalesced), so a position's ``dY`` is, per map, a run of consecutive
  images (13 MB on VGG-16 conv5_1 at batch 32, against 1.85 GB of weights).

**Input gradient**, ``dX_p = dY[:, :, p] . W_p`` (``M`` = images, ``N`` = the ``K`` terms,
reduced over the ``c_Og`` maps). Windows overlap, so the products go to columns, gathered
after:

1. **the per-position GEMM** (the forward's tiles and double buffering): a block owns one
   position, ``tile_m`` images and ``tile_n`` of the ``K`` terms of one group and walks the
   group's maps in chunks of ``tile_k``. A warp's weight loads are runs of 32 consecutive
   terms of one (map, position) row (the caller's layout ``(c_O, h_O, w_O, c_Ig, k_H,
   k_W)``, whole 128-byte lines), each weight read once per batch tile; its ``dYt`` loads
   are runs of 32 images. It writes the columns ``cols (images, P, c_I * k_H * k_W)`` (the
   compute type: float32 for float16), a warp's stores runs of consecutive terms;
2. **the gather** (col2im): one thread per element of ``dX``, lanes on consecutive input
   channels, sums in the fixed order (kernel row, kernel column) the columns that reach it.

The columns are at most :data:`COLS_BYTES`: a larger batch runs steps 1-2 a chunk of images
at a time on the same scratch. Traffic beyond the forward's: the columns written and read
once (``2 x n P K`` words, 0.23 GB on VGG-16 conv5_1, ~55 us at 4.3 TB/s, against 0.43 ms
of weights).

**Weight gradient**, ``dW_p = dY[:, :, p]^T . X_p`` (``M`` = maps, ``N`` = the ``K`` terms,
reduced over the images in chunks of ``tile_k``, in order): the same tiles, ``X_p`` the
forward's implicit im2col (each thread finds its term's (channel, ky, kx) once and steps
through the images); every weight-gradient element is one thread's sum, written once, a
warp's stores runs of consecutive terms.

Every sum has a fixed order (maps, or images, in chunk order; then taps): no atomics,
bitwise deterministic. :func:`use_positions` says which layers the dispatcher
(:func:`gpuconv.cuda.launch.local_conv2d_input_grad_config`,
:func:`~gpuconv.cuda.launch.local_conv2d_weight_grad_config`) gives these kernels.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import numpy as np
from numba import cuda, types, uint64

from ..device import simulator_enabled
from .spec import (_COMPUTE, _NUMPY, _SCALAR, KernelSpec, _array, _rename, check_grid,
                   compute_code, dtype_code, gemm_chunk, gemm_pitch)

__all__ = ["LocalInputGradColsConfig", "cols_gemm_kernel", "col2im_kernel",
           "transpose_kernel", "local_input_grad_cols_config", "local_input_grad_cols_launch",
           "use_positions", "scratch_shapes", "launch", "TILES", "POSITIONS_MIN_MAPS",
           "COLS_BYTES", "WGRAD_TILES", "LocalWeightGradPosConfig", "wgrad_gemm_kernel",
           "local_weight_grad_pos_config", "local_weight_grad_pos_launch", "launch_weight_grad"]

#: Tiles ``(tile_m, tile_n, tile_k, thread_m, thread_n, blocks_per_sm)``: ``tile_m`` images
#: x ``tile_n`` terms, ``tile_k`` maps a chunk; the forward's wide tiles
#: (:data:`gpuconv.cuda.local_gemm.TILES`): 64 threads of 8 x 4 outputs, 24 staged values a
#: thread, six blocks an SM (float64: 4 x 4, four). The simulator's are tiny.
TILES = {
    "f32": (32, 64, 16, 8, 4, 6),
    "f64": (32, 32, 16, 4, 4, 4),
    "sim": (8, 8, 4, 2, 2, 1),
}

#: The weight gradient's tiles (``tile_m`` maps x ``tile_n`` terms, ``tile_k`` images a
#: chunk): a wide one of 64 maps (128 threads of 8 x 4, four blocks an SM: 122 registers
#: sm_90, no spills), which reads the input under a position half as often as the 32-map
#: tile (:data:`TILES`' first, predicted 7-8 % faster and 4.4 GB of L2 reads instead of
#: 7.9 on VGG-16 conv5_1), and that one for groups whose maps the wide one would pad more
#: (AlexNet conv1's 96). float64 has the one tile.
WGRAD_TILES = {
    "f32": ((64, 64, 16, 8, 4, 4), TILES["f32"]),
    "f64": (TILES["f64"],),
    "sim": ((16, 8, 4, 4, 2, 1), TILES["sim"]),
}

#: The dispatcher gives these kernels the layers of at least this many maps a group (the
#: forward's :data:`gpuconv.cuda.local_gemm.LOCAL_GEMM_MIN_MAPS`): each column word, written
#: and read once, then stands for at least 64 FMAs; the model puts both gradients 1.8-7x
#: ahead of the batched GEMMs on the default suite's layers of 64-512 maps and behind on
#: DeepFace's 16 (``scripts/kernel_table.py``).
POSITIONS_MIN_MAPS = 64

#: Most bytes of columns one call holds; larger batches run in chunks of images.
COLS_BYTES = 256 * 1024 * 1024

# The transpose's and the gather's blocks: 32 lanes x 8 rows (in the simulator, whose
# threads are slow, 4 x 2: more blocks, the same code paths); the transpose's shared tile
# is padded by a column (conflict-free reads down a column).
_T, _ROWS = (4, 2) if simulator_enabled() else (32, 8)
_TILE_SHAPE = (_T, _T + 1)


@functools.lru_cache(maxsize=None)
def transpose_kernel(code):
    """``dst (P, c_O, n)`` = ``src (n, c_O, P)`` per map, through a 32 x 33 shared tile.

    Launch: ``grid = (ceil(P / 32), ceil(n / 32), c_O)``, ``block = (32, 8)``; arguments
    flat ``src``, ``dst`` (the same dtype), then ``n, c_O, P``."""
    store, scalar = _SCALAR[code], _COMPUTE[code]

    def kernel(src, dst, n, c_O, n_pos):
        tile = cuda.shared.array(_TILE_SHAPE, dtype=scalar)
        tx = cuda.threadIdx.x
        ty = cuda.threadIdx.y
        co = cuda.blockIdx.z
        p0 = cuda.blockIdx.x * _T
        b0 = cuda.blockIdx.y * _T
        for r in range(0, _T, _ROWS):  # read: lanes on consecutive positions
            b = b0 + ty + r
            p = p0 + tx
            if b < n and p < n_pos:
                tile[ty + r, tx] = scalar(src[uint64((b * c_O + co) * n_pos + p)])
        cuda.syncthreads()
        for r in range(0, _T, _ROWS):  # write: lanes on consecutive images
            p = p0 + ty + r
            b = b0 + tx
            if b < n and p < n_pos:
                dst[uint64((p * c_O + co) * n + b)] = store(tile[tx, ty + r])

    name = f"transpose_maps_{code}"
    signature = (_array(code, 1),) * 2 + (types.int64,) * 3
    return KernelSpec(name, _rename(kernel, name), signature, (_T * _ROWS, 1))


@functools.lru_cache(maxsize=None)
def cols_gemm_kernel(code, tile_m, tile_n, tile_k, thread_m, thread_n, blocks_per_sm):
    """``cols[b, p, g * K + k] = sum_co dYt[p, g * c_Og + co, b0 + b] * W[co, p, k]`` for the
    images ``b < nb`` of one chunk, double-buffered as :func:`gpuconv.cuda.local_gemm.
    local_gemm_kernel`.

    Launch: ``grid = (P * batch_tiles, groups * blocks_n)`` (``batch_tiles = ceil(nb /
    tile_m)`` neighbours in the grid, sharing a position's weights through L2; ``blocks_n =
    ceil(K / tile_n)``), ``block = (tile_m / thread_m * tile_n / thread_n,)``, static shared
    memory ``2 * tile_k * (tile_m + tile_n)`` words of the compute type. Arguments: flat
    ``dYt (P, c_O, n)``, ``weight (c_O, h_O, w_O, c_Ig, k_H, k_W)``, ``cols (nb, P, c_I *
    k_H * k_W)`` (compute type, written), then ``n, c_O, P, c_Og, K, c_I * k_H * k_W, b0,
    nb, batch_tiles, blocks_n``.
    """
    scalar = _COMPUTE[code]  # the columns are written in the compute type
    BM, BN, BK, TM, TN = tile_m, tile_n, tile_k, thread_m, thread_n
    MT = BM // TM          # threads along the images
    NSTEP = BN // TN       # distance between a thread's terms
    NT = MT * NSTEP        # threads per block
    if BK % 4:
        raise ValueError(f"tile_k must be a multiple of 4, got {BK}")
    if BM % TM or BN % TN or NT % BM or NT % BN or (BM * BK) % NT or (BN * BK) % NT:
        raise ValueError(f"tile {BM}x{BN}x{BK} with {TM}x{TN} outputs a thread does not "
                         "split evenly over its threads")
    AR = NT // BM          # maps one staging pass of dYt covers (lanes on images)
    BR = NT // BN          # maps one staging pass of the weights covers (lanes on terms)
    LA = BM * BK // NT     # dYt values a thread stages per chunk, AR maps apart
    LB = BN * BK // NT     # weights a thread stages per chunk, BR maps apart
    AP, BP = BM, BN        # shared pitches: a warp's stores are runs of consecutive words
    ABUF, BBUF = BK * AP, BK * BP
    ASMEM, BSMEM = 2 * ABUF, 2 * BBUF  # two buffers each (constants for shared.array)
    NACC = TM * TN
    multiply = gemm_chunk(TM, TN, MT, NSTEP, BK, AP, BP)

    def kernel(gyt, weight, cols, n, c_O, n_pos, c_Og, k_len, k_all, b0, nb, batch_tiles,
               blocks_n):
        # A tile kernel: every thread takes part in every stage and barrier, so the bounds
        # guards sit on the loads and the stores.
        tid = cuda.threadIdx.x
        tx = tid % MT                  # this thread's images: tx + i * MT
        ty = tid // MT                 # this thread's terms: ty + j * NSTEP
        pos = cuda.blockIdx.x // batch_tiles
        m0 = (cuda.blockIdx.x - pos * batch_tiles) * BM   # first image, in the chunk
        g = cuda.blockIdx.y // blocks_n
        n0 = (cuda.blockIdx.y - g * blocks_n) * BN        # first term, in the group
        n_k = min(BN, k_len - n0)                         # terms of the block

        a_s = cuda.shared.array(ASMEM, dtype=scalar)
        b_s = cuda.shared.array(BSMEM, dtype=scalar)

        # The image (term) this thread stages and its first map; + tile_k maps a chunk.
        ar = tid % BM
        ak = tid // BM
        br = tid % BN
        bk = tid // BN
        img_ok = m0 + ar < nb
        term_ok = br < n_k
        a_ofs = (pos * c_O + g * c_Og + ak) * n + b0 + m0 + ar
        a_step = AR * n
        b_ofs = ((g * c_Og + bk) * n_pos + pos) * k_len + n0 + br
        b_step = BR * n_pos * k_len

        a_reg = cuda.local.array(LA, dtype=scalar)
        b_reg = cuda.local.array(LB, dtype=scalar)
        acc = cuda.local.array(NACC, dtype=scalar)
        a_frag = cuda.local.array(TM, dtype=scalar)
        b_frag = cuda.local.array(TN, dtype=scalar)
        for a in range(NACC):
            acc[a] = scalar(0)  # keep the math in the compute type

        stages = (c_Og + BK - 1) // BK
        for st in range(stages + 1):
            if st < stages:
                # Global loads of chunk st into registers (their latency hides behind the
                # multiply of chunk st - 1); zeros past the group's maps, the chunk's
                # images and the group's terms.
                c0 = st * BK
                for j in range(LA):
                    v = scalar(0)
                    if img_ok and c0 + ak + j * AR < c_Og:
                        v = scalar(gyt[uint64(a_ofs + j * a_step)])
                    a_reg[j] = v
                for j in range(LB):
                    v = scalar(0)
                    if term_ok and c0 + bk + j * BR < c_Og:
                        v = scalar(weight[uint64(b_ofs + j * b_step)])
                    b_reg[j] = v
                a_ofs += BK * n
                b_ofs += BK * n_pos * k_len
            if st > 0:
                # Multiply chunk st - 1 from its buffer.
                multiply(a_s, b_s, ((st - 1) & 1) * ABUF + tx, ((st - 1) & 1) * BBUF + ty,
                         a_frag, b_frag, acc)
            if st < stages:
                # Store chunk st into the other buffer (its last reader, chunk st - 2,
                # finished before the previous barrier).
                a_buf = (st & 1) * ABUF + ak * AP + ar
                for j in range(LA):
                    a_s[uint64(a_buf + j * AR * AP)] = a_reg[j]
                b_buf = (st & 1) * BBUF + bk * BP + br
                for j in range(LB):
                    b_s[uint64(b_buf + j * BR * BP)] = b_reg[j]
            # Wait until chunk st is stored and chunk st - 1 is read by everyone.
            cuda.syncthreads()

        for i in range(TM):
            img = m0 + tx + i * MT
            if img < nb:
                ofs = (img * n_pos + pos) * k_all + g * k_len + n0 + ty
                for j in range(TN):
                    if ty + j * NSTEP < n_k:
                        cols[uint64(ofs + j * NSTEP)] = acc[i * TN + j]

    name = f"local_conv2d_igrad_cols_{code}_t{BM}x{BN}_k{BK}_r{TM}x{TN}_o{blocks_per_sm}"
    signature = (_array(code, 1), _array(code, 1), _array(compute_code(code), 1)) \
        + (types.int64,) * 10
    return KernelSpec(name, _rename(kernel, name), signature, (NT, blocks_per_sm))


@functools.lru_cache(maxsize=None)
def col2im_kernel(code):
    """``dX[b0 + b, c, iy, ix]`` = the sum, over the kernel taps ``(k_y, k_x)`` in that
    order, of ``cols[b, p, c * k_H * k_W + k_y * k_W + k_x]`` for the positions ``p`` whose
    tap reaches the pixel (stride, padding, dilation), zero where none does.

    Launch: ``grid = (nb * h * col_tiles, ceil(c_I / 32))``, ``block = (32, 8)``: lanes on
    consecutive channels (their columns' words ``k_H * k_W`` apart, the block's eight pixels
    sharing lines in L1), rows on consecutive columns of an input row. Arguments: flat
    ``cols`` (compute type), ``gx (n, c_I, h, w)`` (written), then ``c_I, h, w, h_O, w_O,
    k_H, k_W, s_H, s_W, p_top, p_left, d_H, d_W, b0, col_tiles``."""
    store, scalar = _SCALAR[code], _COMPUTE[code]

    def kernel(cols, gx, c_I, h, wd, h_O, w_O, k_H, k_W, s_H, s_W, pt, pl, d_H, d_W, b0,
               col_tiles):
        c = cuda.blockIdx.y * _T + cuda.threadIdx.x
        t = cuda.blockIdx.x
        ct = t % col_tiles
        t = t // col_tiles
        iy = t % h
        b = t // h
        ix = ct * _ROWS + cuda.threadIdx.y
        if c >= c_I or ix >= wd:  # no barrier below
            return
        khw = k_H * k_W
        k_all = c_I * khw
        base = b * (h_O * w_O) * k_all + c * khw
        s = scalar(0)
        for ky in range(k_H):
            ay = iy + pt - ky * d_H
            if ay < 0 or ay % s_H != 0 or ay // s_H >= h_O:
                continue
            row = base + (ay // s_H) * w_O * k_all + ky * k_W
            for kx in range(k_W):
                ax = ix + pl - kx * d_W
                if ax < 0 or ax % s_W != 0 or ax // s_W >= w_O:
                    continue
                s += cols[uint64(row + (ax // s_W) * k_all + kx)]
        gx[uint64(((b0 + b) * c_I + c) * (h * wd) + iy * wd + ix)] = store(s)

    name = f"local_conv2d_col2im_{code}"
    signature = (_array(compute_code(code), 1), _array(code, 1)) + (types.int64,) * 15
    return KernelSpec(name, _rename(kernel, name), signature, (_T * _ROWS, 1))


@functools.lru_cache(maxsize=None)
def wgrad_gemm_kernel(code, tile_m, tile_n, tile_k, thread_m, thread_n, blocks_per_sm):
    """``dW[g * c_Og + co, p, k] = sum_b dYt[p, g * c_Og + co, b] * X_p[b, k]``: the weight
    gradient, one GEMM per position (``M`` = maps, ``N`` = the ``K`` terms, reduced over the
    images in chunks of ``tile_k``, in order), double-buffered as
    :func:`cols_gemm_kernel`. ``X_p`` is the input under position ``p`` (the forward's
    implicit im2col): the thread that stages term ``k`` finds its (channel, ky, kx) once and
    steps through the images; zeros outside the image. Every weight-gradient element is one
    thread's sum, written once: no slices, no atomics.

    Launch: ``grid = (P * blocks_n, groups * blocks_m)`` (``blocks_n = ceil(K / tile_n)``
    term blocks of a position neighbours), ``block = (tile_m / thread_m * tile_n /
    thread_n,)``. Arguments: flat ``x (n, c_I, h, w)``, ``dYt (P, c_O, n)``, ``out (c_O,
    h_O, w_O, c_Ig, k_H, k_W)`` (written), then ``n, c_I, h, w, c_O, h_O, w_O, c_Ig, c_Og,
    k_H, k_W, s_H, s_W, p_top, p_left, d_H, d_W, blocks_m, blocks_n``.
    """
    store, scalar = _SCALAR[code], _COMPUTE[code]
    BM, BN, BK, TM, TN = tile_m, tile_n, tile_k, thread_m, thread_n
    MT = BM // TM          # threads along the maps
    NSTEP = BN // TN       # distance between a thread's terms
    NT = MT * NSTEP        # threads per block
    if BK % 4:
        raise ValueError(f"tile_k must be a multiple of 4, got {BK}")
    if BM % TM or BN % TN or NT % BK or NT % BN or (BM * BK) % NT or (BN * BK) % NT:
        raise ValueError(f"tile {BM}x{BN}x{BK} with {TM}x{TN} outputs a thread does not "
                         "split evenly over its threads")
    AR = NT // BK          # maps one staging pass of dYt covers (lanes on images)
    BR = NT // BN          # images one staging pass of the input covers (lanes on terms)
    LA = BM * BK // NT
    LB = BN * BK // NT
    AP, BP = gemm_pitch(BM, BK), BN  # a warp's stores: tile_k images x 32 / tile_k maps
    ABUF, BBUF = BK * AP, BK * BP
    ASMEM, BSMEM = 2 * ABUF, 2 * BBUF
    NACC = TM * TN
    multiply = gemm_chunk(TM, TN, MT, NSTEP, BK, AP, BP)

    def kernel(x, gyt, out, n, c_I, h, wd, c_O, h_O, w_O, c_Ig, c_Og, k_H, k_W, s_H, s_W,
               pt, pl, d_H, d_W, blocks_m, blocks_n):
        tid = cuda.threadIdx.x
        tx = tid % MT                  # this thread's maps: tx + i * MT
        ty = tid // MT                 # this thread's terms: ty + j * NSTEP
        n_pos = h_O * w_O
        khw = k_H * k_W
        k_len = c_Ig * khw
        hw = h * wd
        pos = cuda.blockIdx.x // blocks_n
        n0 = (cuda.blockIdx.x - pos * blocks_n) * BN     # first term, in the group
        g = cuda.blockIdx.y // blocks_m
        m0 = (cuda.blockIdx.y - g * blocks_m) * BM       # first map, in the group
        oy = pos // w_O
        ox = pos - oy * w_O

        a_s = cuda.shared.array(ASMEM, dtype=scalar)
        b_s = cuda.shared.array(BSMEM, dtype=scalar)

        # dYt: this thread's image ab (+ tile_k a chunk) and maps am + j * AR.
        ab = tid % BK
        am = tid // BK
        a_ofs = (pos * c_O + g * c_Og + m0 + am) * n + ab
        # Input: this thread's term (found once) and images bb + j * BR (+ tile_k a chunk).
        bt = tid % BN
        bb = tid // BN
        k = n0 + bt
        c = k // khw
        rem = k - c * khw
        ky = rem // k_W
        kx = rem - ky * k_W
        iy = oy * s_H - pt + ky * d_H
        ix = ox * s_W - pl + kx * d_W
        b_ok = k < k_len and iy >= 0 and iy < h and ix >= 0 and ix < wd
        b_ofs = ((bb * c_I + g * c_Ig + c) * h + iy) * wd + ix
        b_step = BR * c_I * hw

        a_reg = cuda.local.array(LA, dtype=scalar)
        b_reg = cuda.local.array(LB, dtype=scalar)
        acc = cuda.local.array(NACC, dtype=scalar)
        a_frag = cuda.local.array(TM, dtype=scalar)
        b_frag = cuda.local.array(TN, dtype=scalar)
        for a in range(NACC):
            acc[a] = scalar(0)  # keep the math in the compute type

        stages = (n + BK - 1) // BK
        for st in range(stages + 1):
            if st < stages:
                # Loads of image chunk st into registers, behind the multiply of st - 1;
                # zeros past the batch, the group's maps and terms, outside the image.
                b0 = st * BK
                a_img_ok = b0 + ab < n
                for j in range(LA):
                    v = scalar(0)
                    if a_img_ok and m0 + am + j * AR < c_Og:
                        v = scalar(gyt[uint64(a_ofs + j * AR * n)])
                    a_reg[j] = v
                for j in range(LB):
                    v = scalar(0)
                    if b_ok and b0 + bb + j * BR < n:
                        v = scalar(x[uint64(b_ofs + j * b_step)])
                    b_reg[j] = v
                a_ofs += BK
                b_ofs += BK * c_I * hw
            if st > 0:
                multiply(a_s, b_s, ((st - 1) & 1) * ABUF + tx, ((st - 1) & 1) * BBUF + ty,
                         a_frag, b_frag, acc)
            if st < stages:
                a_buf = (st & 1) * ABUF + ab * AP + am
                for j in range(LA):
                    a_s[uint64(a_buf + j * AR)] = a_reg[j]
                b_buf = (st & 1) * BBUF + bb * BP + bt
                for j in range(LB):
                    b_s[uint64(b_buf + j * BR * BP)] = b_reg[j]
            cuda.syncthreads()

        for i in range(TM):
            co = m0 + tx + i * MT
            if co < c_Og:
                ofs = ((g * c_Og + co) * n_pos + pos) * k_len + n0 + ty
                for j in range(TN):
                    if n0 + ty + j * NSTEP < k_len:
                        out[uint64(ofs + j * NSTEP)] = store(acc[i * TN + j])

    name = f"local_conv2d_wgrad_pos_{code}_t{BM}x{BN}_k{BK}_r{TM}x{TN}_o{blocks_per_sm}"
    signature = (_array(code, 1),) * 3 + (types.int64,) * 19
    return KernelSpec(name, _rename(kernel, name), signature, (NT, blocks_per_sm))


class LocalInputGradColsConfig(NamedTuple):
    """Kernels and launch shapes of one local_conv2d input gradient through columns."""

    kernel: KernelSpec      # the per-position GEMM
    col2im: KernelSpec
    transpose: KernelSpec
    block: tuple            # the GEMM's (threads,)
    grid: tuple             # the GEMM's grid for a whole chunk of images
    tile_m: int             # images of the GEMM's tile
    chunk: int              # images per chunk (a multiple of tile_m, or the batch)
    batch_tiles: int        # image tiles per position in a whole chunk
    blocks_n: int           # term blocks per group
    col_tiles: int          # the gather's tiles of 8 columns (simulator: 2) along a row
    cols_elements: int      # compute-type words of the columns scratch
    gyt_elements: int       # words of the transposed output gradient
    shared_bytes: int = 0   # dynamic shared memory: none (the stages are static)
    scratch_elements: int = 0  # device scratch in elements of the call's dtype


def use_positions(geom):
    """True where the dispatcher gives the local gradients these kernels: at least
    :data:`POSITIONS_MIN_MAPS` maps a group and a batch (an empty batch's weight gradient is
    zeros, written by the batched GEMM)."""
    return geom.batch > 0 and geom.out_channels_per_group >= POSITIONS_MIN_MAPS


def local_input_grad_cols_config(geom, dtype):
    """The tile (:data:`TILES`, the simulator's in the simulator) and launch shapes for
    ``geom`` (pure, no GPU)."""
    code = dtype_code(dtype)
    tile = TILES["sim"] if simulator_enabled() else TILES[compute_code(code)]
    return local_input_grad_cols_launch(geom, dtype, tile)


def local_input_grad_cols_launch(geom, dtype, tile, chunk=None):
    """The :class:`LocalInputGradColsConfig` of ``tile`` and ``chunk`` images at a time
    (default: as many whole image tiles as :data:`COLS_BYTES` of columns hold; tests force
    small ones)."""
    code = dtype_code(dtype)
    cs = _NUMPY[compute_code(code)].itemsize
    n_pos = geom.out_height * geom.out_width
    khw = geom.kernel_height * geom.kernel_width
    k_len = geom.in_channels_per_group * khw
    k_all = geom.in_channels * khw
    if geom.out_channels * n_pos * k_len >= 2**62:
        raise ValueError("local_conv2d's weights are too many to index")
    tile_m, tile_n = tile[0], tile[1]
    n = max(geom.batch, 1)
    if chunk is None:
        fit = COLS_BYTES // max(n_pos * k_all * cs, 1) // tile_m * tile_m
        chunk = min(n, max(tile_m, fit))
    chunk = min(chunk, n)
    batch_tiles = -(-chunk // tile_m)
    blocks_n = -(-k_len // tile_n)
    grid = check_grid((n_pos * batch_tiles, geom.groups * blocks_n),
                      "the local_conv2d input gradient")
    col_tiles = -(-geom.in_width // _ROWS)
    check_grid((chunk * geom.in_height * col_tiles, -(-geom.in_channels // _T)),
               "the local_conv2d input gradient's gather")
    check_grid((-(-n_pos // _T), -(-n // _T), geom.out_channels),
               "the local_conv2d input gradient's transpose")
    cols = chunk * n_pos * k_all
    gyt = geom.batch * geom.out_channels * n_pos
    scratch = gyt + -(-cols * cs // np.dtype(dtype).itemsize)
    threads = (tile_m // tile[3]) * (tile_n // tile[4])
    return LocalInputGradColsConfig(cols_gemm_kernel(code, *tile), col2im_kernel(code),
                                    transpose_kernel(code), (threads,), grid, tile_m, chunk,
                                    batch_tiles, blocks_n, col_tiles, cols, gyt,
                                    scratch_elements=scratch)


def scratch_shapes(config, dtype):
    """``[(shape, dtype)]`` of the two scratch arrays :func:`launch` takes: the transposed
    output gradient (the call's dtype) and the columns (the compute type)."""
    return [((config.gyt_elements,), np.dtype(dtype)),
            ((config.cols_elements,), _NUMPY[compute_code(dtype_code(dtype))])]


def launch(config, grad_output, weight, gyt, cols, out, geom, stream, compiled):
    """Queue the kernels of ``config`` on flat device arrays (called by
    :func:`gpuconv.cuda.launch.launch_local_conv2d_input_grad`; ``gyt`` and ``cols`` are
    scratch of :func:`scratch_shapes`, ``compiled(spec)`` gives a launchable kernel): the
    transpose, then per chunk of images the GEMM and the gather."""
    n, c_o = geom.batch, geom.out_channels
    n_pos = geom.out_height * geom.out_width
    khw = geom.kernel_height * geom.kernel_width
    compiled(config.transpose)[(-(-n_pos // _T), -(-n // _T), c_o), (_T, _ROWS), stream, 0](
        grad_output, gyt, n, c_o, n_pos)
    gemm = compiled(config.kernel)
    gather = compiled(config.col2im)
    for b0 in range(0, n, config.chunk):
        nb = min(config.chunk, n - b0)
        batch_tiles = -(-nb // config.tile_m)
        grid = config.grid if nb == config.chunk else (n_pos * batch_tiles, config.grid[1])
        gemm[grid, config.block, stream, 0](
            gyt,                        # (P, c_O, n)
            weight,                     # (c_O, h_O, w_O, c_Ig, k_H, k_W), the caller's layout
            cols,                       # (nb, P, c_I * k_H * k_W), written
            n, c_o, n_pos, geom.out_channels_per_group,
            geom.in_channels_per_group * khw, geom.in_channels * khw,
            b0, nb, batch_tiles, config.blocks_n)
        gather[(nb * geom.in_height * config.col_tiles, -(-geom.in_channels // _T)),
               (_T, _ROWS), stream, 0](
            cols,                       # (nb, P, c_I * k_H * k_W)
            out,                        # (n, c_I, h, w), written
            geom.in_channels, geom.in_height, geom.in_width,
            geom.out_height, geom.out_width, geom.kernel_height, geom.kernel_width,
            geom.stride_h, geom.stride_w, geom.pad_top, geom.pad_left,
            geom.dilation_h, geom.dilation_w, b0, config.col_tiles)


class LocalWeightGradPosConfig(NamedTuple):
    """Kernels and launch shape of one local_conv2d weight gradient, a GEMM a position."""

    kernel: KernelSpec      # the per-position GEMM
    transpose: KernelSpec
    block: tuple            # (threads,)
    grid: tuple             # (positions * term blocks, groups * map blocks)
    blocks_m: int           # map blocks per group
    blocks_n: int           # term blocks per position
    gyt_elements: int       # words of the transposed output gradient (the scratch)
    shared_bytes: int = 0   # dynamic shared memory: none (the stages are static)
    slices: int = 1         # the batch is never split: each element one thread's sum
    scratch_elements: int = 0  # device scratch in elements of the call's dtype


def local_weight_grad_pos_config(geom, dtype):
    """The tile (:data:`WGRAD_TILES`, the simulator's in the simulator) and launch shape of
    the weight gradient for ``geom`` (pure, no GPU): the widest whose map blocks pad the
    group's maps no more than the narrowest's."""
    code = dtype_code(dtype)
    tiles = WGRAD_TILES["sim"] if simulator_enabled() else WGRAD_TILES[compute_code(code)]
    c_og = geom.out_channels_per_group
    least = -(-c_og // tiles[-1][0]) * tiles[-1][0]
    tile = next(t for t in tiles if -(-c_og // t[0]) * t[0] <= least)
    return local_weight_grad_pos_launch(geom, dtype, tile)


def local_weight_grad_pos_launch(geom, dtype, tile):
    """The :class:`LocalWeightGradPosConfig` of ``tile`` (tests force the simulator's)."""
    code = dtype_code(dtype)
    n_pos = geom.out_height * geom.out_width
    k_len = geom.in_channels_per_group * geom.kernel_height * geom.kernel_width
    if geom.out_channels * n_pos * k_len >= 2**62:
        raise ValueError("local_conv2d's weights are too many to index")
    blocks_m = -(-geom.out_channels_per_group // tile[0])
    blocks_n = -(-k_len // tile[1])
    grid = check_grid((n_pos * blocks_n, geom.groups * blocks_m),
                      "the local_conv2d weight gradient")
    check_grid((-(-n_pos // _T), -(-max(geom.batch, 1) // _T), geom.out_channels),
               "the local_conv2d weight gradient's transpose")
    gyt = geom.batch * geom.out_channels * n_pos
    threads = (tile[0] // tile[3]) * (tile[1] // tile[4])
    return LocalWeightGradPosConfig(wgrad_gemm_kernel(code, *tile), transpose_kernel(code),
                                    (threads,), grid, blocks_m, blocks_n, gyt,
                                    scratch_elements=gyt)


def launch_weight_grad(config, x, grad_output, gyt, out, geom, stream, compiled):
    """Queue the transpose and the GEMM of ``config`` on flat device arrays (``gyt``: scratch
    of ``config.gyt_elements`` words of the call's dtype); called by
    :func:`gpuconv.cuda.launch.launch_local_conv2d_weight_grad`."""
    n, c_o = geom.batch, geom.out_channels
    n_pos = geom.out_height * geom.out_width
    compiled(config.transpose)[(-(-n_pos // _T), -(-n // _T), c_o), (_T, _ROWS), stream, 0](
        grad_output, gyt, n, c_o, n_pos)
    compiled(config.kernel)[config.grid, config.block, stream, 0](
        x,                          # (n, c_I, h, w)
        gyt,                        # (P, c_O, n)
        out,                        # (c_O, h_O, w_O, c_Ig, k_H, k_W), written
        n, geom.in_channels, geom.in_height, geom.in_width,
        c_o, geom.out_height, geom.out_width,
        geom.in_channels_per_group, geom.out_channels_per_group,
        geom.kernel_height, geom.kernel_width, geom.stride_h, geom.stride_w,
        geom.pad_top, geom.pad_left, geom.dilation_h, geom.dilation_w,
        config.blocks_m, config.blocks_n)
