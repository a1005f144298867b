"""local_conv2d forward for small batches (N <= 8): the weights streamed once, at copy speed.

At N <= 8 the locally connected layer is bound by reading its weights (4 / N bytes per FMA
in float32, the input and output a few per cent of the traffic), so this kernel is built
around one coalesced stream of the weights, each weight read by exactly one thread and
used for every image from registers.

Notation as in :mod:`gpuconv.geometry`; ``K = c_Ig * k_H * k_W`` and the weights are in the
caller's layout ``(c_O, h_O, w_O, c_Ig, k_H, k_W)``: the ``K`` weights of one (map,
position) are contiguous, and so are those of consecutive positions of one map.

A block works on ``warp_positions`` (1, 2 or 4) output positions at a time, side by side
in each warp on ``L = 32 / warp_positions`` lanes each (``pos_per_block`` consecutive
positions, so consecutive blocks stream consecutive memory), and on ``maps`` maps of one
group. Its ``warps`` warps split ``K`` into slabs of ``L * lane_taps`` taps (warp ``y``
takes slabs ``y, y + warps, ...``); lane ``l`` of a position's lanes holds taps
``l, l + L, ...`` of a slab (positions side by side share the rows of the input that their
windows cover: a load instruction touches fewer lines where the kernel is narrow):

1. the lane loads the input values of its taps for every image (``batch * lane_taps``
   registers, zeros outside the image), from L1/L2;
2. for each round of ``map_round`` maps it loads their weights of the slab
   (``map_round * lane_taps`` independent coalesced loads in flight), and accumulates
   ``batch`` partial dot products per map;
3. the position's lanes reduce each map's ``batch`` partial sums with shuffles in a fixed
   order (a transposing butterfly: at each of the first ``log2(batch)`` steps a lane keeps
   half of its values and receives the partner's half, so ``batch - 1 + log2(L) -
   log2(batch)`` shuffles instead of ``log2(L) * batch``); afterwards lane ``l`` holds
   image ``image_of_lane(l, batch, L)``'s sum, and one lane per image adds it to the
   warp's sum of that (map, image) in shared memory, slabs in order. With positions side
   by side, where one round holds all the block's maps, the partial sums stay in
   registers across the warp's slabs and are reduced once a position; otherwise once a
   slab;
4. at the end of the position the first warp adds the warps' sums in warp order, adds the
   bias and stores; where a block takes more than one group of positions it gathers its
   outputs in shared memory instead and stores them every ``out_run`` positions as runs of
   consecutive positions (a position's outputs lie ``h_O * w_O`` apart: stored at once,
   each value is a line of its own).

No atomics: every sum has a fixed order, so results repeat bitwise. float16 loads half
words and computes in float32 (one rounding at the store); float64 computes in float64.
Numba's CUDA simulator has no shuffles: there the kernel exchanges the same values through
shared memory, so the simulator checks the butterfly's data flow, and a GPU run the
shuffles themselves.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import numpy as np
from numba import cuda, int32, types, uint64

from ..device import simulator_enabled
from .spec import (_COMPUTE, _SCALAR, KernelSpec, _array, _bank_wavefronts_each,
                   _pow2_at_least, _rename, check_grid, compute_code, dtype_code)

__all__ = ["LocalStreamConfig", "local_stream_kernel", "local_stream_config",
           "local_stream_launch", "use_local_stream", "image_of_lane", "STREAM_MAX_BATCH",
           "STREAM_TARGET_WARPS", "launch", "round_maps", "warp_position_choices",
           "positions_config", "input_lines_per_load", "l1_lines_per_position",
           "epilogue_per_position", "output_run", "with_output_run", "OUT_RUN"]

#: Largest batch the streaming kernel takes (the dispatcher's bound: beyond it the images'
#: partial sums crowd out the loads in flight, and the batched GEMM keeps more images per
#: weight in its register tiles).
STREAM_MAX_BATCH = 8
#: Warps the grid aims for at least: 32 on each of the H200's 132 SMs (Little's law: 700 ns
#: x 4.3 TB/s / 132 is about 23 KB in flight per SM; 32 warps x 32 lanes x 16 loads x 4 B
#: is 64 KB).
STREAM_TARGET_WARPS = 132 * 32
# Blocks the grid aims for when positions are grouped: a few waves of 16 blocks per SM.
_TARGET_BLOCKS = 132 * 16 * 4
_FULL = 0xFFFFFFFF
#: Positions of an output run: a block's outputs stored 8 consecutive positions at a time
#: (32 bytes of float32 a (map, image): one line or two) instead of a line per value; its
#: shared memory, ``maps * batch * 9`` values of the compute type, is 4.6 KB at 16 maps and
#: 8 images.
OUT_RUN = 8
# L1 lines an H200 passes per byte it copies: 132 SMs x 1.98 GHz x one line a clock, over
# 4.3 TB/s (the positions-per-warp rule weighs L1's work against the weights' stream).
_L1_LINES_PER_DRAM_BYTE = 132 * 1.98e9 / 4.3e12


def _run_row(out_run):
    """Words of a (map, image) row of the output run in shared memory: ``out_run`` padded
    to an odd count."""
    return out_run + 1 - out_run % 2


def _log2(value):
    return value.bit_length() - 1


def image_of_lane(lane, batch, lanes=32):
    """The image whose sum lane ``lane`` (of a position's ``lanes``) holds after the
    transposing butterfly."""
    padded = _pow2_at_least(batch, STREAM_MAX_BATCH)
    image = 0
    for step in range(_log2(padded)):
        if lane & ((lanes >> 1) >> step):
            image += padded >> (step + 1)
    return image


@functools.lru_cache(maxsize=None)
def local_stream_kernel(code, kernel_h, kernel_w, batch, maps, lane_taps, map_round, warps,
                        warp_positions=1, out_run=1):
    """The streaming local_conv2d forward, specialised on dtype, kernel size, batch, maps
    per block, taps per lane, maps per load round, warps per block, positions per warp
    (``warp_positions`` consecutive positions side by side, each on ``32 / warp_positions``
    lanes: at least the batch padded to a power of two) and output run (``out_run``
    consecutive positions whose outputs the block gathers in shared memory and stores
    together, a multiple of ``warp_positions``; 1: each position's stored at once).

    Launch (see :func:`local_stream_config`): ``block = (32, warps)``, ``grid =
    (ceil(P / pos_per_block), groups * map_blocks)``, no dynamic shared memory. Kernel
    arguments: the flat ``x (n, c_I, h, w)``, ``weight (c_O, h_O, w_O, c_Ig, k_H, k_W)``,
    ``bias (c_O, bias_len)`` (or ``out``) and ``out (n, c_O, h_O, w_O)``, then ``has_bias,
    bias_len, c_I, h, w, c_O, h_O, w_O, c_Ig, c_Og, s_H, s_W, p_top, p_left, d_H, d_W,
    pos_per_block, map_blocks``.
    """
    scalar = _COMPUTE[code]
    store = _SCALAR[code]
    KH, KW = int(kernel_h), int(kernel_w)
    KHW = KH * KW
    NB, MAPS, V, U, S, G, QB = (int(v) for v in (batch, maps, lane_taps, map_round, warps,
                                                 warp_positions, out_run))
    NP = _pow2_at_least(NB, STREAM_MAX_BATCH)  # images padded to a power of two
    LB = _log2(NP)                              # transposing steps of the butterfly
    L = 32 // G                                 # lanes of one position
    LL = _log2(L)                               # steps of the butterfly
    if G not in (1, 2, 4, 8) or NP > L:
        raise ValueError(f"{G} positions a warp leave {L} lanes a position, fewer than "
                         f"the {NP} images (padded) the butterfly spreads over them")
    if QB < 1 or (QB > 1 and QB % G):
        raise ValueError(f"an output run of {QB} positions is not a whole number of the "
                         f"warp's {G} positions side by side")
    SLAB = L * V
    # Positions side by side, one load round holding every map of the block: the partial
    # sums are kept across the warp's slabs and reduced once a position, not once a slab
    # (one position a warp keeps the kernel it had: its registers and its bits).
    KEEP = MAPS == U and G > 1
    WRITER_MASK = (1 << (LL - LB)) - 1          # lanes with these bits zero write
    RED = S * G * MAPS * NP
    NXV, NWV, NPART = NB * V, U * V, U * NP  # register arrays' sizes
    # Numba's CUDA simulator has no warp shuffles: there the same exchanges go through
    # shared memory between two barriers (every thread of the block takes part).
    SIM = simulator_enabled()
    XCH = 32 * S * U * max(1, NP // 2) if SIM else 1
    # Output runs: the block's sums of QB consecutive positions, a row of QB per (map,
    # image), stored as runs of consecutive positions (a position's outputs lie h_O * w_O
    # apart, a line each). The rows are padded to an odd count of words, so the first
    # warp's writes (a column of consecutive rows) meet no bank conflict; the runs' reads
    # (4 rows of 8 a warp) then meet a 2-way one on 3 lanes of 32.
    QROW = _run_row(QB)
    QBUF = MAPS * NB * QROW if QB > 1 else 1

    def kernel(x, weight, bias, out, has_bias, bias_len, c_I, h, wd, c_O, h_O, w_O, c_Ig,
               c_Og, s_H, s_W, pt, pl, d_H, d_W, pos_per_block, map_blocks):
        # Every thread takes part in the shuffles and barriers: no early return.
        lane = int32(cuda.threadIdx.x)
        wy = int32(cuda.threadIdx.y)
        # the lane among its position's lanes, and its position among the warp's (one
        # position a warp: constants, so that the kernel is the one-position kernel)
        if G == 1:
            j = lane
            gl = int32(0)
        else:
            j = lane & (L - 1)
            gl = lane >> LL
        g = cuda.blockIdx.y // map_blocks
        co0 = g * c_Og + (cuda.blockIdx.y - g * map_blocks) * MAPS
        n_co = int32(min(MAPS, (g + 1) * c_Og - co0))
        n_pos = h_O * w_O
        k_len = int32(c_Ig * KHW)
        image = int32(c_I * h * wd)  # elements between images
        slabs = (k_len + SLAB - 1) // SLAB
        red = cuda.shared.array(RED, dtype=scalar)
        xch = cuda.shared.array(XCH, dtype=scalar)  # the simulator's shuffles
        runs = cuda.shared.array(QBUF, dtype=scalar)  # the output run (QB > 1)
        tid = wy * 32 + lane

        xv = cuda.local.array(NXV, dtype=scalar)
        wv = cuda.local.array(NWV, dtype=scalar)
        part = cuda.local.array(NPART, dtype=scalar)
        mine = 0  # the image whose sums this lane holds after the butterfly
        for st in range(LB):
            if j & ((L >> 1) >> st):
                mine += NP >> (st + 1)
        writer = (j & WRITER_MASK) == 0 and mine < NB

        p_first = cuda.blockIdx.x * pos_per_block
        p_end = min(p_first + pos_per_block, n_pos)
        slot = int32(0)  # the group's first column in the output run (QB > 1)
        for p0 in range(p_first, p_end, G):
            # This lane's position; past the block's last (a partial group): no loads, no
            # store, but every lane takes part in the shuffles and barriers.
            p = p0 + gl
            live = True if G == 1 else p < p_end
            oy = p // w_O
            iy0 = int32(oy * s_H - pt)
            ix0 = int32((p - oy * w_O) * s_W - pl)
            # Each warp sums its slabs into its own rows of ``red`` (a writer lane touches
            # only its image's words, so no barrier is needed until the warps meet).
            rows = (wy * G + gl) * MAPS
            if writer:
                for m in range(MAPS):
                    red[(rows + m) * NP + mine] = scalar(0)  # the compute type
            if KEEP:
                for a in range(U * NP):
                    part[a] = scalar(0)
            # Every warp runs the same number of slabs (past K: predicated off, adding
            # zeros), so that the whole block passes the same barriers in the simulator.
            for sl0 in range(0, slabs, S):
                k0 = int32((sl0 + wy) * SLAB + j)
                # The input under this lane's taps, every image (zeros off the image).
                for v in range(V):
                    k = k0 + v * L
                    src = -1
                    if live and k < k_len:
                        c = k // KHW
                        r = k - c * KHW
                        ky = r // KW
                        iy = iy0 + ky * d_H
                        ix = ix0 + (r - ky * KW) * d_W
                        if iy >= 0 and iy < h and ix >= 0 and ix < wd:
                            src = ((g * c_Ig + c) * h + iy) * wd + ix
                    for b in range(NB):
                        val = scalar(0)
                        if src >= 0:
                            val = scalar(x[uint64(src + b * image)])
                        xv[b * V + v] = val
                for c0 in range(0, MAPS, U):
                    if c0 < n_co:  # the same for the whole block
                        # Loads first: U * V independent coalesced loads in flight.
                        for u in range(U):
                            co = co0 + min(c0 + u, n_co - 1)  # past the maps: a valid row
                            # (64-bit from here: the taps become immediate offsets)
                            row = (co * n_pos + p) * k_len + k0
                            for v in range(V):
                                val = scalar(0)
                                if live and k0 + v * L < k_len:
                                    val = scalar(weight[uint64(row + v * L)])
                                wv[u * V + v] = val
                        if not KEEP:
                            for a in range(U * NP):
                                part[a] = scalar(0)
                        for u in range(U):
                            for v in range(V):
                                for b in range(NB):
                                    part[u * NP + b] += wv[u * V + v] * xv[b * V + v]
                        if KEEP and sl0 + S < slabs:
                            continue  # (the same for the whole block) more slabs to add
                        if SIM:
                            # The simulator has no shuffles: the same exchanges go through
                            # shared memory, every map of the round in one exchange per step
                            # (its barriers cost milliseconds each), in the same order.
                            for st in range(LL):
                                off = (L >> 1) >> st
                                half = NP >> (st + 1) if st < LB else 1
                                upper = (lane & off) != 0 and st < LB
                                for u in range(U):
                                    for i in range(half):
                                        lo = part[u * NP + i]
                                        hi = part[u * NP + i + half] if st < LB else lo
                                        xch[(u * half + i) * 32 * S + tid] = lo if upper else hi
                                # Wait until the partners' values are written ...
                                cuda.syncthreads()
                                for u in range(U):
                                    for i in range(half):
                                        lo = part[u * NP + i]
                                        hi = part[u * NP + i + half] if st < LB else lo
                                        recv = xch[(u * half + i) * 32 * S + (tid ^ off)]
                                        part[u * NP + i] = (hi if upper else lo) + recv
                                # ... and read before the next exchange.
                                cuda.syncthreads()
                            for u in range(U):
                                if writer:
                                    red[(rows + c0 + u) * NP + mine] += part[u * NP]
                            continue
                        # The transposing butterfly, then a plain one, in a fixed order.
                        for u in range(U):
                            for st in range(LB):
                                off = (L >> 1) >> st
                                half = NP >> (st + 1)
                                upper = (lane & off) != 0
                                for i in range(half):
                                    lo = part[u * NP + i]
                                    hi = part[u * NP + i + half]
                                    send = lo if upper else hi
                                    keep = hi if upper else lo
                                    recv = cuda.shfl_xor_sync(_FULL, send, off)
                                    part[u * NP + i] = keep + recv
                            for st in range(LB, LL):
                                off = (L >> 1) >> st
                                val = part[u * NP]
                                recv = cuda.shfl_xor_sync(_FULL, val, off)
                                part[u * NP] = val + recv
                            if writer:
                                red[(rows + c0 + u) * NP + mine] += part[u * NP]
            # The first warp adds the warps' sums in warp order.
            # Wait until every warp has written its sums before they are added.
            cuda.syncthreads()
            if wy == 0:
                for e in range(lane, G * MAPS * NB, 32):
                    g2 = 0 if G == 1 else e // (MAPS * NB)
                    m = (e - g2 * MAPS * NB) // NB
                    b = e - (g2 * MAPS + m) * NB
                    q = p0 + g2
                    if m < n_co and (G == 1 or q < p_end):
                        total = red[(g2 * MAPS + m) * NP + b]
                        for w in range(1, S):
                            total += red[((w * G + g2) * MAPS + m) * NP + b]
                        co = co0 + m
                        if has_bias != 0:
                            at = co * bias_len + (q if bias_len > 1 else 0)
                            total += scalar(bias[uint64(at)])
                        if QB == 1:
                            out[uint64((b * c_O + co) * n_pos + q)] = store(total)
                        else:
                            runs[(m * NB + b) * QROW + slot + g2] = total
            # Wait until the sums are read before the next position overwrites them (and
            # the run's values are written before they are stored).
            cuda.syncthreads()
            if QB > 1:
                slot = int32(slot + G)
                if slot == QB or p0 + G >= p_end:  # the run's last group: the same for the block
                    base = p0 + G - slot  # the run's first position
                    n_run = int32(min(slot, p_end - base))
                    slot = int32(0)
                    # consecutive threads on consecutive positions of a (map, image) row
                    for f in range(int32(tid), int32(MAPS * NB * QB), int32(32 * S)):
                        row = int32(f // QB)
                        col = int32(f - row * QB)
                        rm = int32(row // NB)  # the row's map and image
                        if col < n_run and rm < n_co:
                            rb = int32(row - rm * NB)
                            out[uint64((rb * c_O + co0 + rm) * n_pos + base + col)] = store(
                                runs[row * QROW + col])
                    # (the next write to the run follows the next position's first
                    # barrier, which every thread reaches after its stores)

    name = f"local_conv2d_stream_{code}_k{KH}x{KW}_n{NB}_m{MAPS}_v{V}_u{U}_w{S}"
    name += f"_p{G}" if G > 1 else ""
    name += f"_r{QB}" if QB > 1 else ""
    signature = (_array(code, 1),) * 4 + (types.int64,) * 18
    # 32 * warps threads, 15 warps per SM: at most 136 registers a thread (float64, whose
    # values take two registers each: 8 warps, at most 255). Positions side by side keep
    # their own window's addresses and the partial sums across more slabs: 12 warps, at
    # most 168 registers (ptxas spilled at 136 on the seed's layers).
    resident = (15 if G == 1 else 12) if compute_code(code) == "f32" else 8
    return KernelSpec(name, _rename(kernel, name), signature, (32 * S, max(1, resident // S)))


class LocalStreamConfig(NamedTuple):
    """Compile-time constants and launch shape of one streaming local_conv2d call."""

    kernel: KernelSpec
    block: tuple          # (32, warps)
    grid: tuple           # (position blocks, groups * map blocks)
    shared_bytes: int     # dynamic shared memory: none
    pos_per_block: int
    map_blocks: int
    maps: int             # maps per block
    lane_taps: int        # taps per lane per slab (slab = lanes a position * lane_taps)
    map_round: int        # maps whose weights are loaded per round
    warps: int            # warps per block, splitting K
    slices: int = 1       # (no split-K scratch; the launch layer reads this)
    warp_positions: int = 1  # consecutive positions side by side in a warp
    out_run: int = 1      # consecutive positions whose outputs are stored together


def use_local_stream(geom):
    """True where the dispatcher picks the streaming kernel: batches of 1 to
    :data:`STREAM_MAX_BATCH` images of fewer than ``2**31`` elements each (the kernel steps
    from image to image in 32 bits; the batched GEMM takes larger images)."""
    image = geom.in_channels * geom.in_height * geom.in_width
    return 1 <= geom.batch <= STREAM_MAX_BATCH and image < 2**31


def local_stream_config(geom, dtype):
    """Pick the specialisation and launch shape of the streaming kernel (pure, no GPU).

    Maps per block: the group's maps up to 16 (8 in float64), so each input value loaded
    serves that many weights, taken in the fewest load rounds of at most
    :func:`round_maps` maps, the rounds as even as they come (a block pads its maps to a
    whole number of rounds: at 8 images 5 maps are one round of 5 and 10 two, 16 four
    rounds of 4; at 1 or 2 images 5 maps are one round of 5, 10 and 16 two rounds of 8);
    4 taps per lane up to 4 images (float64: 2 images), else 3 (float64: 2), fewer where
    ``K`` is short: ``map_round * lane_taps`` loads in flight per thread, within the
    registers beside the ``batch * lane_taps`` input values and ``map_round * batch``
    partial sums (ptxas: no spills on sm_80 and sm_90). Warps per block split ``K`` until
    the grid holds :data:`STREAM_TARGET_WARPS` warps (at most 8, at most one per slab), and
    where that is not enough the maps per block halve (down to 4 or fewer); positions are
    grouped per block while the grid would exceed a few waves.

    Positions per warp: 1, 2 or 4 consecutive positions side by side (each on 32, 16 or 8
    lanes: no fewer than the images padded to a power of two, and a lane's weights of a
    load at least one 32-byte sector). A load of one position's input spans about
    ``32 / k_W`` rows of the image; beside it the next positions' windows cover the same
    rows, so where the kernel is narrow and the maps few (seed conv2 at 8 images: 11 lines
    a load of one position's input) sharing the rows cuts the input's lines by up to 4, at
    the cost of a line per position in a weight load and more registers (12 warps an SM
    instead of 15). The rule: the choice whose clocks a position, L1's
    (:func:`l1_lines_per_position`) or the weights' DRAM stream's, whichever is larger,
    are fewer by at least a fifth (where the stream bounds every choice: one position),
    and only where the grid keeps the maps per block that one position a warp has (a
    grid short of warps halves them, and then waits on its loads' latency instead).

    Output runs (:func:`output_run`): where a block takes more than one group of positions,
    its outputs are stored :data:`OUT_RUN` consecutive positions at a time (a sector of
    float32 a map and image) rather than a line a value. The L1 work counted for the rule
    includes a position's end (:func:`epilogue_per_position`).
    """
    if not use_local_stream(geom):
        raise ValueError(f"the streaming local_conv2d takes 1 to {STREAM_MAX_BATCH} images "
                         f"of fewer than 2**31 elements, got batch {geom.batch} of "
                         f"{geom.in_channels * geom.in_height * geom.in_width}")
    # The DRAM stream of a position (its weights, every map) in L1 clocks at the H200's
    # rates: 4.3 TB/s of copy against 132 SMs x 1.98 GHz lines through L1.
    k_len = geom.in_channels_per_group * geom.kernel_height * geom.kernel_width
    stream = geom.out_channels * k_len * np.dtype(dtype).itemsize * _L1_LINES_PER_DRAM_BYTE
    best, best_cost = None, None
    for positions in warp_position_choices(geom, dtype):
        config = positions_config(geom, dtype, positions)
        if best is not None and config.maps < best.maps:
            continue  # the grid too short for the maps: its latency would show
        cost = max(l1_lines_per_position(geom, dtype, config), stream)
        if best is None or cost < 0.8 * best_cost:
            best, best_cost = config, cost
    return best


def warp_position_choices(geom, dtype):
    """The positions per warp the streaming kernel may take on ``geom``: 1, and 2 or 4
    where a position's lanes (16 or 8) hold the batch padded to a power of two and a
    lane's weights of a load fill a 32-byte sector."""
    itemsize = np.dtype(dtype).itemsize
    padded = _pow2_at_least(geom.batch, STREAM_MAX_BATCH)
    return [g for g in (1, 2, 4) if 32 // g >= padded and 32 // g * itemsize >= 32]


def positions_config(geom, dtype, positions):
    """The configuration the map rule (see :func:`local_stream_config`) gives at
    ``positions`` positions a warp (one of :func:`warp_position_choices`)."""
    code = dtype_code(dtype)
    wide = compute_code(code) == "f32"
    lanes = 32 // positions
    k_len = geom.in_channels_per_group * geom.kernel_height * geom.kernel_width
    # Registers: batch * taps input values, map_round * taps weights and map_round * batch
    # partial sums beside the addresses, within the launch bounds without spills (ptxas).
    taps = 4 if geom.batch <= 4 and (wide or geom.batch <= 2) else 3 if wide else 2
    # (no more taps a lane than K fills: 3 for the seed's K of 75 and 90, whose fourth
    # would be predicated off in every lane and only hold registers)
    lane_taps = max(1, min(taps, -(-k_len // lanes)))
    per_round = round_maps(geom.batch, dtype)
    wanted = min(geom.out_channels_per_group, 16 if wide else 8)
    config = None
    while config is None or (config.maps > 4 and _warps(config) < STREAM_TARGET_WARPS):
        if config is not None:
            wanted = -(-config.maps // 2)
        rounds = -(-wanted // per_round)
        # rounds as even as they come, but in whole rounds of 8 at up to 2 images (ptxas
        # spilled 10 maps in two rounds of 5 there)
        map_round = per_round if rounds > 1 and per_round == 8 else -(-wanted // rounds)
        config = local_stream_launch(geom, dtype, map_round * rounds, lane_taps, map_round,
                                     warp_positions=positions)
    return with_output_run(geom, dtype, config)


def input_lines_per_load(geom, itemsize, lanes, positions=1):
    """128-byte lines one input load instruction of a warp touches, averaged over the loads
    of ``K``: taps ``k0 .. k0 + lanes - 1`` (channel, kernel row, column) of ``positions``
    consecutive positions from the middle of the output, the kernel's own addresses."""
    kh, kw = geom.kernel_height, geom.kernel_width
    k_len = geom.in_channels_per_group * kh * kw
    n_pos = geom.out_height * geom.out_width
    first = min(n_pos // 2, max(n_pos - positions, 0))
    # (arrays: the dispatcher's rule counts this for every choice, K up to thousands)
    c, r = np.divmod(np.arange(k_len), kh * kw)
    ky, kx = np.divmod(r, kw)
    oy, ox = np.divmod(np.arange(first, min(first + positions, n_pos))[:, None], geom.out_width)
    iy = oy * geom.stride_h - geom.pad_top + ky * geom.dilation_h
    ix = ox * geom.stride_w - geom.pad_left + kx * geom.dilation_w
    inside = (iy >= 0) & (iy < geom.in_height) & (ix >= 0) & (ix < geom.in_width)
    line = ((c * geom.in_height + iy) * geom.in_width + ix) * itemsize // 128
    load = np.broadcast_to(np.arange(k_len) // lanes, line.shape)
    return _distinct(load[inside], line[inside]) / -(-k_len // lanes)


def l1_lines_per_position(geom, dtype, config):
    """The L1 data path's work an output position (every group and map) costs under
    ``config``: the 128-byte lines of its input and weight loads, its shuffles and its
    shared-memory adds (a clock of an SM's L1 each), counted from the kernel's own loops
    and addresses."""
    itemsize = np.dtype(dtype).itemsize
    g = config.warp_positions
    lanes = 32 // g
    padded = _pow2_at_least(geom.batch, STREAM_MAX_BATCH)
    shuffles = padded - 1 + _log2(lanes) - _log2(padded)
    k_len = geom.in_channels_per_group * geom.kernel_height * geom.kernel_width
    slabs = -(-k_len // (lanes * config.lane_taps))
    c_og = geom.out_channels_per_group
    maps = sum(-(-min(config.maps, c_og - m) // config.map_round) * config.map_round
               for m in range(0, c_og, config.maps))  # maps loaded, padding included
    x_lines = input_lines_per_load(geom, itemsize, lanes, g)
    w_lines = g * max(1, lanes * itemsize // 128)
    # reductions: once a slab each warp runs (past K too: the warps run alike), or once a
    # warp where positions side by side keep their sums (one round holds the maps)
    keep = config.maps == config.map_round and g > 1
    reductions = config.warps * (1 if keep else -(-slabs // config.warps))
    per_group = (config.map_blocks * slabs * config.lane_taps * geom.batch * x_lines
                 + slabs * maps * config.lane_taps * w_lines
                 + reductions * maps * (shuffles + 2)
                 + g * config.map_blocks * epilogue_per_position(geom, itemsize, config))
    return per_group * geom.groups / g


def epilogue_per_position(geom, itemsize, config):
    """The L1 data path's work of a block's end of position, per position of one map
    block: each warp's zeroing of its sums in shared memory, the first warp's reads of
    every warp's sums, and the stores of the outputs (``(b, c_O, h_O, w_O)``: a position's
    values lie ``h_O * w_O`` apart, a line each), or with output runs their writes to
    shared memory and the coalesced stores of each run. Counted from the kernel's own
    loops and addresses on a block in the middle of the output, every map present (the
    bias loads left out); shared-memory accesses of the runs in wavefronts by bank."""
    g, maps, nb = config.warp_positions, config.maps, geom.batch
    words = 2 if itemsize == 8 else 1  # 32-bit words a value in shared memory
    n_pos = geom.out_height * geom.out_width
    ppb = config.pos_per_block
    first = min(n_pos // 2 // ppb * ppb, max(n_pos - ppb, 0))
    count = min(ppb, n_pos - first)
    run = config.out_run
    groups = -(-count // g)
    e_per_group = g * maps * nb
    shared = groups * (config.warps * maps                            # zeroing
                       + -(-e_per_group // 32) * config.warps)        # the sums' reads
    # (warp 0's elements e: position e // (maps * nb) of the group, then map, then image)
    e = np.arange(e_per_group)
    q_of, rest = np.divmod(e, maps * nb)
    m, b = np.divmod(rest, nb)
    if run == 1:
        q = first + np.arange(groups)[:, None] * g + q_of
        ok = q < first + count
        line = ((b * geom.out_channels + m) * n_pos + q) * itemsize // 128
        key = np.arange(groups)[:, None] * (e_per_group // 32 + 1) + e // 32
        stores = _distinct(key[ok], line[ok])
    else:
        qrow = _run_row(run)
        # writes to the runs: column slot + (position in the group) of each row
        group = np.arange(groups)[:, None]
        ok = first + group * g + q_of < first + count
        key = group * (e_per_group // 32 + 1) + e // 32
        shared += _bank_wavefronts_each(
            key[ok], ((m * nb + b) * qrow + group * g % run + q_of)[ok], words)
        stores = 0
        for base in range(first, first + count, run):
            n_run = min(run, first + count - base)
            f = np.arange(maps * nb * run)
            row, col = np.divmod(f, run)
            mm, bb = np.divmod(row, nb)
            live = col < n_run
            shared += _bank_wavefronts_each((f // 32)[live], (row * qrow + col)[live], words)
            line = ((bb * geom.out_channels + mm) * n_pos + base + col) * itemsize // 128
            stores += _distinct((f // 32)[live], line[live])
    return (shared + stores) / count


def _distinct(keys, lines):
    """Distinct (instruction, line) pairs."""
    keys, lines = np.asarray(keys, np.int64), np.asarray(lines, np.int64)
    if keys.size == 0:
        return 0
    return np.unique(keys * (int(lines.max()) + 1) + lines).size


def round_maps(batch, dtype):
    """The most maps whose weights one load round of the streaming kernel loads: 8 up to 2
    images, 4 at 3 and 4 (4 taps a lane), 5 beyond (3 taps a lane; float64: 4 always), the
    weights of a round being ``map_round * lane_taps`` loads in flight per thread beside its
    ``map_round * batch`` partial sums (ptxas: no spills on sm_80 and sm_90 across the
    default suite; 5 maps of 4 taps at 4 images spilled in float16)."""
    if compute_code(dtype_code(dtype)) != "f32":
        return 4
    return 8 if batch <= 2 else 4 if batch <= 4 else 5


def _warps(config):
    return config.grid[0] * config.grid[1] * config.warps


def local_stream_launch(geom, dtype, maps, lane_taps, map_round, warps=None,
                        pos_per_block=None, warp_positions=1, out_run=1):
    """The :class:`LocalStreamConfig` of given choices (tests force small ones)."""
    code = dtype_code(dtype)
    n_pos = geom.out_height * geom.out_width
    k_len = geom.in_channels_per_group * geom.kernel_height * geom.kernel_width
    slabs = -(-k_len // (32 // warp_positions * lane_taps))
    map_blocks = -(-geom.out_channels_per_group // maps)
    cells = -(-n_pos // warp_positions) * geom.groups * map_blocks  # a warp's work each
    if warps is None:
        warps = max(1, min(8, slabs, -(-STREAM_TARGET_WARPS // cells)))
    if pos_per_block is None:
        pos_per_block = warp_positions * max(1, cells // _TARGET_BLOCKS)
    if geom.out_channels * n_pos * k_len >= 2**62:
        raise ValueError("local_conv2d's weights are too many to index")
    grid = check_grid((-(-n_pos // pos_per_block), geom.groups * map_blocks),
                      "local_conv2d")
    spec = local_stream_kernel(code, geom.kernel_height, geom.kernel_width, geom.batch,
                               maps, lane_taps, map_round, warps, warp_positions, out_run)
    return LocalStreamConfig(spec, (32, warps), grid, 0, pos_per_block, map_blocks, maps,
                             lane_taps, map_round, warps, 1, warp_positions, out_run)


def with_output_run(geom, dtype, config):
    """``config`` storing its outputs as :func:`output_run` says (its other choices kept)."""
    run = output_run(geom, dtype, config)
    if run == config.out_run:
        return config
    return local_stream_launch(geom, dtype, config.maps, config.lane_taps, config.map_round,
                               config.warps, config.pos_per_block, config.warp_positions, run)


def output_run(geom, dtype, config):
    """Positions whose outputs a block of ``config`` (its runs aside) should
    gather in shared memory and store together: :data:`OUT_RUN` where the block takes more
    than one group of positions and that cuts a position's L1 work
    (:func:`l1_lines_per_position`) by a tenth or more, else 1. (The runs cost registers,
    up to 10 more a thread in ptxas, and with them resident blocks: where the stores are a
    small share of the work, and at 1 or 2 images, whose kernels wait on their loads'
    latency, the runs are not worth it.)"""
    if config.pos_per_block <= config.warp_positions or OUT_RUN % config.warp_positions:
        return 1
    at_once, runs = config._replace(out_run=1), config._replace(out_run=OUT_RUN)
    if l1_lines_per_position(geom, dtype, runs) < 0.9 * l1_lines_per_position(geom, dtype,
                                                                             at_once):
        return OUT_RUN
    return 1


def launch(kernel, config, x, weight, bias, out, has_bias, bias_len, geom, stream):
    """Queue the streaming kernel on flat device arrays."""
    kernel[config.grid, config.block, stream, 0](
        x,                          # (n, c_I, h, w)
        weight,                     # (c_O, h_O, w_O, c_Ig, k_H, k_W), the caller's layout
        bias,                       # (c_O, 1 or P), or the output unread
        out,                        # (n, c_O, h_O, w_O), written
        has_bias,                   # 0 or 1
        bias_len,                   # 1 (per map) or P (per position)
        geom.in_channels, geom.in_height, geom.in_width,
        geom.out_channels, geom.out_height, geom.out_width,
        geom.in_channels_per_group, geom.out_channels_per_group,
        geom.stride_h, geom.stride_w,
        geom.pad_top, geom.pad_left,
        geom.dilation_h, geom.dilation_w,
        config.pos_per_block,       # consecutive positions per block
        config.map_blocks,          # map blocks per group
    )
