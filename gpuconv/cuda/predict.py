"""Predicted cost of the CUDA kernels on an H200, from their launch shapes and their own index
arithmetic, without a GPU.

For every kernel the dispatcher picks on a layer this gives occupancy (from the registers and
shared memory ``ptxas`` reports, or the launch bounds if none is given), waves on the GPU's
SMs, and for the two forward kernels and the local gradients' batched GEMMs
(:func:`local_gradient_rows`) a traffic and time model:

- global memory: the addresses of one full block's staging loads, computed exactly as the
  kernel computes them, grouped by warp instruction, give 32-byte sectors and 128-byte lines
  per instruction and per FMA;
- shared memory: the hot loop's reads of one warp, by bank, give wavefronts per FMA;
- DRAM bytes per FMA: each operand once (the weights once per call, split-K partial sums
  written and read once more);
- time: the largest of the FMA pipe (4 warp instructions a clock per SM), the shared-memory
  pipe (1 wavefront a clock), instruction issue (4 a clock), DRAM (the measured copy
  bandwidth) and the staging latency (per block and stage, one load round trip per round
  of loads in flight, then the stage's FMAs; nothing overlaps within a block), the last
  wave's idle SMs counted.

Every figure here is a prediction: nothing in this module has been measured on a GPU.
Used by ``scripts/kernel_table.py``; see BENCHMARKS.md for the table and its assumptions.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np

from . import conv2d_gemm, conv2d_gemm_grad, grad_kernels, kernels, local_gemm, local_stream

__all__ = ["H200", "H100", "Device", "device_named", "forward_row", "forward_rows", "occupancy", "KernelRow", "layer_rows", "format_rows",
           "local_gradient_rows", "local_input_grad_rows", "local_weight_grad_rows", "local_backward_rows", "format_backward_rows", "BackwardRow",
           "LOCAL_BACKWARD_PEER_S", "stream_search"]


class Device(NamedTuple):
    name: str
    sms: int
    clock_hz: float
    fp32_flops: float        # FMA = 2 FLOP, without tensor cores
    copy_bytes_per_s: float  # measured device-to-device copy (read + write)
    registers_per_sm: int
    shared_per_sm: int       # bytes usable by blocks
    shared_reserved: int     # bytes the driver reserves per block
    max_warps: int
    max_blocks: int
    dram_latency_s: float    # an assumed round trip of a global load that misses L2
    l2_latency_s: float      # ... and of one that hits L2


#: The H200 of the first GPU run (132 SMs; compute and copy figures from that run's notes).
H200 = Device("H200", 132, 1.98e9, 66.9e12, 4.25e12, 65536, 227 * 1024, 1024, 64, 32,
              700e-9, 300e-9)

#: An H100 SXM (132 SMs, the H200's core at 3.35 TB/s HBM3): its copy rate is assumed at the
#: H200's measured share of its peak (4.25 of 4.8 TB/s), not measured.
H100 = H200._replace(name="H100", copy_bytes_per_s=4.25e12 / 4.8e12 * 3.35e12)


def device_named(name):
    """The modelled :class:`Device` for a GPU's name (``torch.cuda.get_device_name``): the
    H100 for a name holding "H100", else the H200 (the model's reference)."""
    return H100 if "H100" in str(name).upper() else H200


# Warp instructions per staged element, read from the sm_90 SASS (nvdisasm) of
# local_conv2d_f32_k3x3_t8x4_l4x8 and conv2d_f32_k3x3_r2x4_c8, rounded: the carry walk,
# address, load, conversion and store.
_LOCAL_WEIGHT_INSTR = 14
_LOCAL_INPUT_INSTR = 24
_CONV_STAGE_INSTR = 16
# Integer and branch instructions per kernel tap of the hot loop (two pointer adds, the loop
# counter and branch), besides its loads and FMAs.
_TAP_OVERHEAD = 6


def occupancy(threads, registers, shared_bytes, device=H200):
    """Resident blocks per SM: the least of the register file (allocated per warp in units
    of 256), shared memory, warps and the block limit."""
    warps = -(-threads // 32)
    regs_per_warp = -(-registers * 32 // 256) * 256
    by_regs = device.registers_per_sm // max(regs_per_warp * warps, 1)
    by_smem = device.shared_per_sm // (shared_bytes + device.shared_reserved)
    return max(0, min(by_regs, by_smem, device.max_warps // warps, device.max_blocks))


class KernelRow(NamedTuple):
    """One kernel launch of one layer, predicted (None where not modelled)."""

    layer: str
    kernel: str
    registers: int | None
    shared_bytes: int        # static + dynamic per block
    threads: int             # per block
    blocks: int
    blocks_per_sm: int
    occupancy: float         # resident warps / 64
    waves: float
    sectors_per_fma: float | None      # 32-byte global sectors the staging loads touch
    lines_per_load: float | None       # 128-byte lines per warp load instruction
    lds_wavefronts_per_fma: float | None
    dram_bytes_per_fma: float | None
    bound: str | None                  # what limits the predicted time
    time_s: float | None
    roofline_share: float | None       # predicted FLOP rate / min(compute, AI x copy)
    hidden_share: float | None         # the same were the staging latency hidden


def _warp_loads(elements, threads, unroll, address, itemsize):
    """(warp load instructions, 32-byte sectors, 128-byte lines, rounds) of a staging walk
    over ``elements`` flat indices, thread ``t`` taking ``t, t + threads, ...`` in rounds
    of ``unroll`` loads; ``address(e)`` is the element's flat offset in its array, or None
    if it is not loaded (padding, past the tile)."""
    rounds = -(-elements // (threads * unroll)) if elements else 0
    instructions = sectors = lines = 0
    for m in range(rounds * unroll):
        for w0 in range(0, threads, 32):
            instructions += 1
            found = [a for e in range(m * threads + w0, m * threads + min(w0 + 32, threads))
                     if e < elements and (a := address(e)) is not None]
            sectors += len({a * itemsize // 32 for a in found})
            lines += len({a * itemsize // 128 for a in found})
    return instructions, sectors, lines, rounds


def _share(flops, seconds, roof):
    """The share of the roofline ``flops`` in ``seconds`` reach: at most 1 (a kernel bound
    by the fewest bytes is on the roofline, not a rounding error above it)."""
    share = flops / seconds / roof
    return 1.0 if 1.0 < share <= 1.0 + 1e-9 else share


def _roofline(geom, flops, itemsize, weight_elements, device):
    """The H200 roofline of a layer: min(compute, arithmetic intensity x copy bandwidth),
    with the fewest bytes (each operand once)."""
    x = geom.batch * geom.in_channels * geom.in_height * geom.in_width
    y = geom.batch * geom.out_channels * geom.out_height * geom.out_width
    least = (x + y + weight_elements) * itemsize
    return min(device.fp32_flops, flops / least * device.copy_bytes_per_s)


def _time(device, blocks, blocks_per_sm, ffma, lds, issue, dram_bytes, stage_ffma,
          stage_latency, stages):
    """(time, bound, time if the staging latency were hidden) of a launch.

    Pipes and DRAM over all SMs, the last wave's idle SMs counted; and the staging latency:
    a block's stage is its loads' round trips (one per round of loads in flight) followed by
    its FMAs (on at most 4 schedulers), nothing overlapped within the block, the SM's
    resident blocks side by side.
    """
    slots = device.sms * max(blocks_per_sm, 1)
    waves = math.ceil(blocks / slots)
    tail = blocks / (waves * slots)
    per_sm = device.sms * device.clock_hz * tail
    pipes = {"FMA": ffma / 4 / per_sm, "shared memory": lds / per_sm,
             "issue": issue / 4 / per_sm, "DRAM": dram_bytes / device.copy_bytes_per_s}
    bound = max(pipes, key=pipes.get)
    hidden = pipes[bound]
    stage = stage_latency + stage_ffma / 4 / device.clock_hz
    exposed = waves * stages * stage
    if exposed > hidden:
        return exposed, "load latency", hidden
    return hidden, bound, hidden


def _local_row(layer, geom, dtype, info, device, config=None):
    config = config or kernels.local_conv2d_config(geom, dtype)
    itemsize = np.dtype(dtype).itemsize
    lanes_b, lanes_o, ptw = config.block
    tm, to = (int(v) for v in config.kernel.name.split("_t")[1].split("_")[0].split("x"))
    threads = lanes_b * lanes_o * ptw
    bm, bo = lanes_b * tm, lanes_o * to
    kh, kw = geom.kernel_height, geom.kernel_width
    k_len = geom.in_channels_per_group * kh * kw
    n_pos = geom.out_height * geom.out_width
    win = config.walk[0]
    rows = config.stage_rows
    kc = rows * kw
    # One full stage of the first block (images, maps and positions from 0), the kernel's
    # own walks: weights (position, map, tap), input (kernel row, image, column).
    n_j, n_co, n_b = min(ptw, geom.out_width), min(bo, geom.out_channels_per_group), \
        min(bm, geom.batch)

    def weight_address(e):
        kk, rest = e % kc, e // kc
        o, j = rest % bo, rest // bo
        if j < n_j and o < n_co:
            return (o * n_pos + j) * k_len + kk
        return None

    def input_address(e):
        col, rest = e % win, e // win
        b, rr = rest % bm, rest // bm
        c, ky = divmod(rr, kh)
        iy = ky * geom.dilation_h - geom.pad_top
        ix = col - geom.pad_left
        if b < n_b and 0 <= iy < geom.in_height and 0 <= ix < geom.in_width:
            return ((b * geom.in_channels + c) * geom.in_height + iy) * geom.in_width + ix
        return None

    code = kernels.compute_code(kernels.dtype_code(dtype))
    w_instr, w_sectors, w_lines, w_rounds = _warp_loads(ptw * bo * kc, threads,
                                                        kernels.LOCAL_WEIGHT_LOADS[code],
                                                        weight_address, itemsize)
    x_instr, x_sectors, x_lines, x_rounds = _warp_loads(rows * bm * win, threads,
                                                        config.input_loads,
                                                        input_address, itemsize)
    stage_fma = threads * tm * to * kc
    sectors_per_fma = (w_sectors + x_sectors) / stage_fma
    lines_per_load = (w_lines + x_lines) / max(w_instr + x_instr, 1)
    wx, ww = kernels.local_read_wavefronts(config.block, config.pos_pitch, config.x_pitch,
                                           geom.stride_w)
    warps = -(-threads // 32)
    lds_per_tap = warps * (tm * wx + to * ww)
    lds_per_fma = lds_per_tap / (threads * tm * to)

    blocks = config.grid[0] * config.grid[1] * config.grid[2]
    registers = info.registers if info else config.kernel.launch_bounds and \
        65536 // (config.kernel.launch_bounds[0] * config.kernel.launch_bounds[1])
    smem = config.shared_bytes + (info.static_smem if info else 0)
    per_sm = occupancy(threads, registers, smem, device)
    waves = blocks / (device.sms * max(per_sm, 1))

    fma = geom.batch * geom.out_channels * n_pos * k_len
    flops = 2 * fma
    stages_per_block = -(-config.slice_rows // rows)
    taps = blocks * stages_per_block * kc  # kernel taps run by all blocks
    ffma = taps * warps * tm * to
    lds = taps * lds_per_tap
    staged = blocks * stages_per_block * (w_instr * _LOCAL_WEIGHT_INSTR
                                          + x_instr * _LOCAL_INPUT_INSTR)
    issue = ffma + taps * warps * (tm + to + _TAP_OVERHEAD) + staged
    weights = geom.out_channels * n_pos * k_len
    x_el = geom.batch * geom.in_channels * geom.in_height * geom.in_width
    y_el = geom.batch * geom.out_channels * n_pos
    dram = (weights + x_el + y_el) * itemsize
    if config.slices > 1:  # partial sums written, then read and summed by a second kernel
        partial = kernels.local_conv2d_partial_dtype(dtype).itemsize
        dram += 2 * config.slices * y_el * partial
    # Weights stream from DRAM; the input windows overlap their neighbours' (L2).
    latency = w_rounds * device.dram_latency_s + x_rounds * device.l2_latency_s
    time, bound, hidden = _time(device, blocks, per_sm, ffma, lds, issue, dram,
                                stage_fma / 32, latency, stages_per_block)
    roof = _roofline(geom, flops, itemsize, weights, device)
    return KernelRow(layer, config.kernel.name, registers, smem, threads, blocks, per_sm,
                     per_sm * warps / device.max_warps, waves, sectors_per_fma,
                     lines_per_load, lds_per_fma, dram / fma, bound, time,
                     flops / time / roof, flops / hidden / roof)


def _window_address(g, oy, ox, img, k):
    """Flat offset in ``x`` of term ``k`` (channel, ky, kx of group 0) of image ``img``'s
    window under output ``(oy, ox)``, or None (padding, past the batch or ``K``): what the
    per-position GEMMs stage as their implicit im2col."""
    khw = g.kernel_height * g.kernel_width
    c, rest = divmod(k, khw)
    ky, kx = divmod(rest, g.kernel_width)
    iy = oy * g.stride_h - g.pad_top + ky * g.dilation_h
    ix = ox * g.stride_w - g.pad_left + kx * g.dilation_w
    if (img < g.batch and k < g.in_channels_per_group * khw and 0 <= iy < g.in_height
            and 0 <= ix < g.in_width):
        return ((img * g.in_channels + c) * g.in_height + iy) * g.in_width + ix
    return None


def _local_gemm_row(layer, geom, dtype, info, device, config=None):
    """The double-buffered per-position GEMM forward (:mod:`gpuconv.cuda.local_gemm`).

    Modelled as the implicit GEMMs (:func:`_gemm_tile_row`), its staging loads walked at the
    kernel's own addresses for the first chunk of a position away from the padding, a chunk
    costing the larger of the DRAM round trip and the SM's FMAs for it. The weights cross
    DRAM once (the batch tiles of a position are neighbours in the grid and share them
    through L2); the input under each position comes from L2.
    """
    config = config or local_gemm.local_gemm_config(geom, dtype)
    itemsize = np.dtype(dtype).itemsize
    BM, BN, BK, TM, TN = _gemm_tile(config.kernel.name)
    threads = (BM // TM) * (BN // TN)
    KT = threads // BK
    LA, LB = BM * BK // threads, BN * BK // threads
    g = geom
    khw = g.kernel_height * g.kernel_width
    k_len = g.in_channels_per_group * khw
    n_pos = g.out_height * g.out_width
    blocks = math.prod(config.grid)
    chunks = -(-k_len // BK)
    block_chunks = blocks * chunks
    # Staging loads of one chunk (terms 0 .. BK-1 of a position in the middle of the output).
    oy, ox = g.out_height // 2, g.out_width // 2
    pos = oy * g.out_width + ox
    loads = [[_window_address(g, oy, ox, t // BK + j * KT, t % BK) for t in range(threads)]
             for j in range(LA)]
    for j in range(LB):
        loads.append([((t // BK + j * KT) * n_pos + pos) * k_len + t % BK
                      if t // BK + j * KT < g.out_channels_per_group and t % BK < k_len
                      else None for t in range(threads)])
    fma = g.batch * g.out_channels * n_pos * k_len
    weights = g.out_channels * n_pos * k_len
    x_el = g.batch * g.in_channels * g.in_height * g.in_width
    y_el = g.batch * g.out_channels * n_pos
    dram = (weights + x_el + y_el) * itemsize
    return _gemm_tile_row(layer, config, geom, dtype, loads, block_chunks, chunks, fma,
                          weights, dram, device.dram_latency_s, info, device)


# Warp instructions besides the loads, FMAs and shuffles, read from the kernel's source
# (not yet from SASS): per weight load its address, predicate and conversion; per input
# load of a slab its share of the tap's index arithmetic; per map and butterfly step the
# two selects; per map of a round the shared-memory add of the slab sum.
_STREAM_WEIGHT_INSTR = 3
_STREAM_INPUT_INSTR = 4
_STREAM_MAP_INSTR = 4


def _stream_row(layer, geom, dtype, info, device, config=None):
    """The weight-streaming forward (:mod:`gpuconv.cuda.local_stream`, batches <= 8).

    Pipes: FMA, issue, DRAM, and one for the L1/shared-memory data path (the shuffles,
    the shared-memory adds of the slab sums, the 128-byte lines of every load
    instruction, one a clock, and each position's end: the sums' zeroing and reads, and
    the lines of the output stores, a line a value unless stored in runs). Latency
    (Little's law): a warp's load rounds are one DRAM round trip each (its ``map_round * lane_taps`` weight loads in flight), each slab's
    input one L2 round trip first; nothing overlapped within a warp, the SM's resident
    warps side by side.
    """
    config = config or local_stream.local_stream_config(geom, dtype)
    itemsize = np.dtype(dtype).itemsize
    n = geom.batch
    warps, taps, rnd, maps = config.warps, config.lane_taps, config.map_round, config.maps
    g = config.warp_positions
    lanes = 32 // g
    padded = 1 << (n - 1).bit_length()
    shuffles = padded - 1 + (lanes.bit_length() - 1) - (padded.bit_length() - 1)
    kh, kw = geom.kernel_height, geom.kernel_width
    k_len = geom.in_channels_per_group * kh * kw
    n_pos = geom.out_height * geom.out_width
    c_og = geom.out_channels_per_group
    slab = lanes * taps
    slabs = -(-k_len // slab)
    slab_rounds = -(-slabs // warps)  # slabs each warp runs per position
    # Load rounds of one position over all map blocks of a group.
    rounds = sum(-(-min(maps, c_og - m) // rnd) for m in range(0, c_og, maps))
    cells = -(-n_pos // g) * geom.groups  # a warp's positions side by side, each group
    warp_slabs = cells * config.map_blocks * warps * slab_rounds
    warp_rounds = cells * warps * slab_rounds * rounds
    # reductions: once a slab, or once a warp where positions side by side keep their sums
    keep = maps == rnd and g > 1
    warp_reductions = cells * warps * rounds if keep else warp_rounds

    # Lines per load instruction from the kernel's own addresses (tap k of lane l: channel,
    # kernel row, column; the warp's positions side by side), the L1 data path's whole
    # work as the dispatcher's rule counts it (:func:`local_stream.l1_lines_per_position`).
    x_lines_per_load = local_stream.input_lines_per_load(geom, itemsize, lanes, g)
    w_lines_per_load = g * max(1, lanes * itemsize // 128)
    x_instr = warp_slabs * taps * n
    w_instr = warp_rounds * rnd * taps
    lines = x_instr * x_lines_per_load + w_instr * w_lines_per_load
    ffma = w_instr * n
    mio = local_stream.l1_lines_per_position(geom, dtype, config) * n_pos
    issue = (ffma + w_instr * _STREAM_WEIGHT_INSTR + x_instr * _STREAM_INPUT_INSTR
             + warp_reductions * rnd * (shuffles * 3 + _STREAM_MAP_INSTR))
    weights = geom.out_channels * n_pos * k_len
    x_el = n * geom.in_channels * geom.in_height * geom.in_width
    y_el = n * geom.out_channels * n_pos
    dram = (weights + x_el + y_el) * itemsize
    fma = n * geom.out_channels * n_pos * k_len

    blocks = config.grid[0] * config.grid[1]
    threads = 32 * warps
    bounds = config.kernel.launch_bounds
    registers = info.registers if info else 65536 // (bounds[0] * bounds[1])
    smem = info.static_smem if info else 0
    per_sm = occupancy(threads, registers, smem, device)
    slots = device.sms * max(per_sm, 1)
    waves = math.ceil(blocks / slots)
    per_clock = device.sms * device.clock_hz * blocks / (waves * slots)
    pipes = {"FMA": ffma / 4 / per_clock, "L1 / shuffle": mio / per_clock,
             "issue": issue / 4 / per_clock, "DRAM": dram / device.copy_bytes_per_s}
    bound = max(pipes, key=pipes.get)
    hidden = pipes[bound]
    block_rounds = -(-min(maps, c_og) // rnd)
    block_latency = -(-config.pos_per_block // g) * slab_rounds * (
        device.l2_latency_s + block_rounds * device.dram_latency_s)
    exposed = waves * block_latency
    time = max(hidden, exposed)
    if exposed > hidden:
        bound = "load latency"
    roof = _roofline(geom, 2 * fma, itemsize, weights, device)
    sectors = x_instr * x_lines_per_load * 4 + w_instr * max(1, 32 * itemsize // 32)
    return KernelRow(layer, config.kernel.name, registers, smem, threads, blocks, per_sm,
                     per_sm * warps / device.max_warps, blocks / slots, sectors / fma,
                     lines / (x_instr + w_instr), mio / fma, dram / fma, bound, time,
                     _share(2 * fma, time, roof), _share(2 * fma, hidden, roof))


def stream_search(geom, dtype, device=H200):
    """``[(predicted seconds, config), ...]``, fastest first: the streaming kernel's
    launches (:func:`gpuconv.cuda.local_stream.local_stream_launch`) over the kinds of
    choice its rule makes one at a time, searched together by this model, registers from
    the launch bounds (the whole register budget taken: no ptxas here). Positions a warp
    (the rule's choices), maps a block 4, 5, 8, 10 or 16 (no more than the group's, or 4),
    maps a load round 4, 5 or 8 (a block's maps in whole rounds), taps a lane 2, 3 or 4,
    warps a block 1 to 8 (at most one a slab); positions a block and output runs as the
    rule gives them. Not every value the rule reaches is searched (3, 6 or 12 maps, rounds
    of 3, one tap a lane are not). The rule keeps its own choices; the acceptance run times
    the fastest of this list beside them, so a GPU says whether the model ranks launches
    as well as it prices them."""
    k_len = geom.in_channels_per_group * geom.kernel_height * geom.kernel_width
    c_og = geom.out_channels_per_group
    found = []
    for g in local_stream.warp_position_choices(geom, dtype):
        for maps in (4, 5, 8, 10, 16):
            if maps > max(c_og, 4):
                continue
            for rnd in sorted({min(r, maps) for r in (4, 5, 8)}):
                if maps % rnd:
                    continue
                for taps in (2, 3, 4):
                    slabs = -(-k_len // (32 // g * taps))
                    for warps in range(1, min(8, slabs) + 1):
                        config = local_stream.with_output_run(
                            geom, dtype, local_stream.local_stream_launch(
                                geom, dtype, maps, taps, rnd, warps, warp_positions=g))
                        row = _stream_row("", geom, dtype, None, device, config)
                        found.append((row.time_s, config))
    found.sort(key=lambda item: (item[0], item[1].kernel.name))
    return found


def _conv2d_row(layer, geom, dtype, info, device, config=None):
    config = config or kernels.conv2d_direct_config(geom, dtype)
    itemsize = np.dtype(dtype).itemsize
    bx, by = config.block
    name = config.kernel.name
    ry, rx = (int(v) for v in name.split("_r")[1].split("_")[0].split("x"))
    cb = int(name.split("_c")[-1])
    threads = bx * by
    kh, kw = geom.kernel_height, geom.kernel_width
    c_ig = geom.in_channels_per_group
    chunk = config.chunk
    tile = config.tile_h * config.tile_w
    # Staging of one chunk: consecutive threads on consecutive columns of a tile row; the
    # weights [c][ky][kx][channel], consecutive threads on consecutive words.
    h, w = geom.in_height, geom.in_width

    def input_address(e):
        col, rest = e % config.tile_w, e // config.tile_w
        r, c = rest % config.tile_h, rest // config.tile_h
        iy, ix = r - geom.pad_top, col - geom.pad_left
        if 0 <= iy < h and 0 <= ix < w:
            return (c * h + iy) * w + ix
        return None

    def weight_address(e):
        q, rest = e % cb, e // cb
        if q < min(cb, geom.out_channels_per_group):
            return (q * c_ig) * kh * kw + rest
        return None

    # conv2d's staging loops issue one load at a time (a row of threads per tile row).
    x_instr, x_sectors, x_lines, x_rounds = _warp_loads(chunk * tile, threads, 1,
                                                        input_address, itemsize)
    w_instr, w_sectors, w_lines, w_rounds = _warp_loads(chunk * kh * kw * cb, threads, 1,
                                                        weight_address, itemsize)
    npos = ry * rx
    stage_fma = threads * npos * cb * chunk * kh * kw
    sectors_per_fma = (x_sectors + w_sectors) / stage_fma
    lines_per_load = (x_lines + w_lines) / max(x_instr + w_instr, 1)
    # Hot loop reads: lane (tx, ty) reads base (ty + i by) s_H tile_w + (tx + j bx) s_W;
    # the weights are a broadcast.
    warps_list = [[(t % bx, t // bx) for t in range(w0, min(w0 + 32, threads))]
                  for w0 in range(0, threads, 32)]
    wx = max(kernels._bank_wavefronts([ty * geom.stride_h * config.tile_w + tx * geom.stride_w
                                       for tx, ty in lanes]) for lanes in warps_list)
    warps = len(warps_list)
    lds_per_tap = warps * (npos * wx + cb)
    lds_per_fma = lds_per_tap / (threads * npos * cb)

    blocks = config.grid[0] * config.grid[1] * config.grid[2]
    batch_per_block = -(-geom.batch // config.grid[2])
    registers = info.registers if info else 65536 // (
        config.kernel.launch_bounds[0] * config.kernel.launch_bounds[1])
    smem = config.shared_bytes + (info.static_smem if info else 0)
    per_sm = occupancy(threads, registers, smem, device)
    waves = blocks / (device.sms * max(per_sm, 1))
    n_pos = geom.out_height * geom.out_width
    fma = geom.batch * geom.out_channels * n_pos * c_ig * kh * kw
    flops = 2 * fma
    chunks = -(-c_ig // chunk)
    taps = blocks * batch_per_block * c_ig * kh * kw
    ffma = taps * warps * npos * cb
    lds = taps * lds_per_tap
    staged = blocks * batch_per_block * chunks * (x_instr + w_instr) * _CONV_STAGE_INSTR
    issue = ffma + taps * warps * (npos + cb + _TAP_OVERHEAD) + staged
    weights = geom.out_channels * c_ig * kh * kw
    x_el = geom.batch * geom.in_channels * h * w
    y_el = geom.batch * geom.out_channels * n_pos
    dram = (weights + x_el + y_el) * itemsize
    # The input streams from DRAM; the shared weights stay in L2.
    latency = x_rounds * device.dram_latency_s + w_rounds * device.l2_latency_s
    time, bound, hidden = _time(device, blocks, per_sm, ffma, lds, issue, dram,
                                stage_fma / 32, latency, batch_per_block * chunks)
    roof = _roofline(geom, flops, itemsize, weights, device)
    return KernelRow(layer, name, registers, smem, threads, blocks, per_sm,
                     per_sm * warps / device.max_warps, waves, sectors_per_fma,
                     lines_per_load, lds_per_fma, dram / fma, bound, time,
                     flops / time / roof, flops / hidden / roof)


# Warp instructions per staged element of the implicit-GEMM kernels (guard, address, load,
# conversion, shared store), and per chunk and warp besides the k steps (barrier, buffer
# switch, chunk and tap counters): estimates from the kernels' source, not read from SASS.
_GEMM_STAGE_INSTR = 8
_GEMM_CHUNK_INSTR = 30


def _gemm_tile(name):
    """``(tile_m, tile_n, tile_k, thread_m, thread_n)`` from an implicit-GEMM kernel name
    (``..._t128x64_k8_r8x4_o2``)."""
    tm, tn = (int(v) for v in name.split("_t")[1].split("_")[0].split("x"))
    tk = int(name.split("_k")[-1].split("_")[0])
    rm, rn = (int(v) for v in name.split("_r")[-1].split("_")[0].split("x"))
    return tm, tn, tk, rm, rn


def _phase_taps(r, pad, k, d, s):
    """Taps of one kernel axis that reach input phase ``r`` (the input gradient's gather)."""
    return sum(1 for t in range(k) if (r + pad - t * d) % s == 0)


def _gemm_row(layer, geom, dtype, kind, config, info, device):
    """A row of an implicit-GEMM kernel: ``kind`` ``"forward"`` (:mod:`.conv2d_gemm`),
    ``"input"`` or ``"weight"`` (:mod:`.conv2d_gemm_grad`).

    The tile's work counts padding (whole chunks of whole tiles); shared reads are a warp's
    ``thread_m + thread_n`` words a k step (consecutive words: one wavefront each, two for
    float64); the staging loads of one chunk of the first block are walked at the kernel's
    own addresses (the first tap that applies, away from the padding) for sectors and lines;
    double buffering hides a chunk's load latency behind the previous chunk's FMAs, so a
    chunk costs the larger of the two.
    """
    itemsize = np.dtype(dtype).itemsize
    code = kernels.dtype_code(dtype)
    cs = np.dtype(kernels._NUMPY[kernels.compute_code(code)]).itemsize
    BM, BN, BK, TM, TN = _gemm_tile(config.kernel.name)
    threads = (BM // TM) * (BN // TN)
    blocks = math.prod(config.grid)
    g = geom
    khw = g.kernel_height * g.kernel_width
    n_pq = g.out_height * g.out_width
    hw = g.in_height * g.in_width
    c_ig, c_og = g.in_channels_per_group, g.out_channels_per_group
    chunks_of = lambda n: -(-n // BK)  # noqa: E731
    if kind == "forward":
        block_chunks = blocks * khw * chunks_of(c_ig)
    elif kind == "input":
        taps = sum(_phase_taps(ry, g.pad_top, g.kernel_height, g.dilation_h, g.stride_h)
                   * _phase_taps(rx, g.pad_left, g.kernel_width, g.dilation_w, g.stride_w)
                   for ry in range(g.stride_h) for rx in range(g.stride_w))
        block_chunks = config.tiles_m * config.grid[1] * taps * chunks_of(c_og)
    else:
        m_total = g.batch * n_pq
        per_slice = [min(config.k_slice, m_total - z * config.k_slice)
                     for z in range(config.slices)]
        block_chunks = config.grid[0] * config.grid[1] * sum(chunks_of(k) for k in per_slice)
    chunks_per_block = block_chunks / max(blocks, 1)

    # One chunk of the first block, each thread's loads at the kernel's addresses.
    def first_tap(r, pad, k, d, s):
        return next((t for t in range(k) if (r + pad - t * d) % s == 0), 0)

    def position(m, width, height):
        img, rest = divmod(m, width * height)
        return img, rest // width, rest % width

    loads = []  # (thread, flat address or None), grouped per staged register
    if kind == "forward":
        # a thread stages PA positions ``threads`` apart, AK channels AS apart for each
        PA, AS = max(1, BM // threads), max(1, threads // BM)
        LA, LB, BS = BM * BK // threads, BN * BK // threads, threads // BK
        ky, kx = g.kernel_height // 2, g.kernel_width // 2
        for p, j in ((p, j) for p in range(PA) for j in range(BK // AS)):
            group = []
            for t in range(threads):
                img, oy, ox = position(t % BM + p * threads, g.out_width, g.out_height)
                iy = oy * g.stride_h - g.pad_top + ky * g.dilation_h
                ix = ox * g.stride_w - g.pad_left + kx * g.dilation_w
                c = t // BM + j * AS
                ok = img < g.batch and 0 <= iy < g.in_height and 0 <= ix < g.in_width
                group.append(((img * g.in_channels + c) * g.in_height + iy) * g.in_width + ix
                             if ok and c < c_ig else None)
            loads.append(group)
        for j in range(LB):
            loads.append([((t // BK + j * BS) * c_ig + t % BK) * khw + ky * g.kernel_width + kx
                          if t // BK + j * BS < c_og and t % BK < c_ig else None
                          for t in range(threads)])
    elif kind == "input":
        # a thread stages PA pixels ``threads`` apart, AK channels AS apart for each
        PA, AS = max(1, BM // threads), max(1, threads // BM)
        LA, LB, BS = BM * BK // threads, BN * BK // threads, threads // BN
        ky = first_tap(0, g.pad_top, g.kernel_height, g.dilation_h, g.stride_h)
        kx = first_tap(0, g.pad_left, g.kernel_width, g.dilation_w, g.stride_w)
        h_u, w_u = -(-g.in_height // g.stride_h), -(-g.in_width // g.stride_w)
        for p, j in ((p, j) for p in range(PA) for j in range(BK // AS)):
            group = []
            for t in range(threads):
                img, u, v = position(t % BM + p * threads, w_u, h_u)
                c = t // BM + j * AS
                ok = img < g.batch and u < g.out_height and v < g.out_width and c < c_og
                group.append(((img * g.out_channels + c) * g.out_height + u) * g.out_width + v
                             if ok else None)
            loads.append(group)
        for j in range(LB):
            loads.append([((t // BN + j * BS) * c_ig + t % BN) * khw + ky * g.kernel_width + kx
                          if t // BN + j * BS < c_og and t % BN < c_ig else None
                          for t in range(threads)])
    else:
        KT = threads // BK
        LA, LB = BM * BK // threads, BN * BK // threads
        for j in range(LA):
            group = []
            for t in range(threads):
                col = t // BK + j * KT
                ci, tap = divmod(col, khw)
                ky, kx = divmod(tap, g.kernel_width)
                img, oy, ox = position(t % BK + n_pq // 2, g.out_width, g.out_height)
                iy = oy * g.stride_h - g.pad_top + ky * g.dilation_h
                ix = ox * g.stride_w - g.pad_left + kx * g.dilation_w
                ok = ci < c_ig and 0 <= iy < g.in_height and 0 <= ix < g.in_width
                group.append(((img * g.in_channels + ci) * g.in_height + iy) * g.in_width + ix
                             if ok else None)
            loads.append(group)
        for j in range(LB):
            group = []
            for t in range(threads):
                img, oy, ox = position(t % BK + n_pq // 2, g.out_width, g.out_height)
                co = t // BK + j * KT
                group.append(((img * g.out_channels + co) * g.out_height + oy) * g.out_width
                             + ox if co < c_og else None)
            loads.append(group)
    fma = g.batch * g.out_channels * n_pq * c_ig * khw
    weights = g.out_channels * c_ig * khw
    x_el = g.batch * g.in_channels * hw
    y_el = g.batch * g.out_channels * n_pq
    dram = (weights + x_el + y_el) * itemsize
    if kind == "weight" and config.scratch_elements:  # partial sums written, read, summed
        dram += 2 * config.scratch_elements * cs
    # The activations stream from DRAM, the weights stay in L2.
    latency = device.dram_latency_s if kind != "input" else device.l2_latency_s
    return _gemm_tile_row(layer, config, geom, dtype, loads, block_chunks, chunks_per_block,
                          fma, weights, dram, latency, info, device)


def _gemm_tile_row(layer, config, geom, dtype, loads, block_chunks, chunks_per_block, fma,
                   weights, dram, latency, info, device):
    """The :class:`KernelRow` of a double-buffered tile GEMM (:func:`_gemm_row`,
    :func:`_local_gemm_row`) from what differs between them: ``loads`` (one chunk's staging
    loads, a list per staged register of each thread's flat address or None),
    ``block_chunks`` (chunks run by all blocks), ``chunks_per_block``, the layer's ``fma``,
    ``weights`` and ``dram`` bytes, and a staging load's round trip ``latency``.

    A chunk's loads (all in flight at once) stand against the previous chunk's FMAs on the
    SM's 4 schedulers, shared with the other resident blocks, so a chunk costs the larger
    of the two; shared reads are a warp's ``thread_m / VA + thread_n / VB`` loads a k step,
    of runs of ``VA`` and ``VB`` words (the kernel's ``shared_vectors``; 128 bytes of a
    warp's distinct runs a wavefront).
    """
    itemsize = np.dtype(dtype).itemsize
    cs = np.dtype(kernels._NUMPY[kernels.compute_code(kernels.dtype_code(dtype))]).itemsize
    BM, BN, BK, TM, TN = _gemm_tile(config.kernel.name)
    MT = BM // TM
    threads = MT * (BN // TN)
    warps = -(-threads // 32)
    blocks = math.prod(config.grid)
    LA, LB = BM * BK // threads, BN * BK // threads
    instr = sectors = lines = 0
    for group in loads:
        for w0 in range(0, threads, 32):
            found = [a for a in group[w0:w0 + 32] if a is not None]
            instr += 1
            sectors += len({a * itemsize // 32 for a in found})
            lines += len({a * itemsize // 128 for a in found})
    chunk_fma = BM * BN * BK
    # A k step's shared reads: TM / VA loads of VA words along M (a warp's min(MT, 32)
    # threads read distinct runs, 128 bytes a wavefront), TN / VB along N (the warp's
    # 32 / MT threads along N read distinct runs, the others broadcast).
    VA, VB = config.kernel.shared_vectors
    wave_a = max(1, -(-min(MT, 32) * VA * cs // 128))
    wave_b = max(1, -(-max(1, 32 // MT) * VB * cs // 128))
    lds_per_chunk = warps * BK * (TM // VA * wave_a + TN // VB * wave_b)

    registers = info.registers if info else 65536 // math.prod(config.kernel.launch_bounds)
    smem = 2 * BK * (BM + BN + 8) * cs if info is None else info.static_smem
    per_sm = occupancy(threads, registers, smem, device)
    waves = blocks / (device.sms * max(per_sm, 1))
    ffma = block_chunks * warps * TM * TN * BK
    lds = block_chunks * lds_per_chunk
    issue = ffma + block_chunks * warps * (BK * (TM // VA + TN // VB)
                                           + (LA + LB) * _GEMM_STAGE_INSTR
                                           + _GEMM_CHUNK_INSTR)
    flops = 2 * fma
    chunk_compute = warps * TM * TN * BK / 4 / device.clock_hz * max(per_sm, 1)
    time, bound, hidden = _time(device, blocks, per_sm, ffma, lds, issue, dram, 0,
                                max(latency, chunk_compute), chunks_per_block)
    roof = _roofline(geom, flops, itemsize, weights, device)
    return KernelRow(layer, config.kernel.name, registers, smem, threads, blocks, per_sm,
                     per_sm * warps / device.max_warps, waves, sectors / chunk_fma,
                     lines / max(instr, 1), lds_per_chunk / chunk_fma, dram / fma, bound,
                     time, flops / time / roof, flops / hidden / roof)


def predicted_backward_s(rows, kernels_of_call):
    """Predicted time of a backward pass: the sum of the rows whose kernels it launches."""
    return sum(r.time_s for r in rows if r.kernel in kernels_of_call and r.time_s)


def _sum_row(layer, dtype, size, slices, info, device):
    """The slice sum of ``size`` results after a split-K kernel (conv2d's weight gradient,
    the batched local forward): DRAM-bound, the partial sums (compute type) read once and
    the results written once."""
    code = kernels.dtype_code(dtype)
    spec = grad_kernels.sum_slices_kernel(code)
    blocks = max(1, min(-(-size // 256), 65535))
    row = _plain_row(layer, spec, (blocks,), (256,), 0, info(spec), device)
    cs = np.dtype(kernels._NUMPY[kernels.compute_code(code)]).itemsize
    dram = slices * size * cs + size * np.dtype(dtype).itemsize
    return row._replace(dram_bytes_per_fma=None, bound="DRAM",
                        time_s=dram / device.copy_bytes_per_s)


def _plain_row(layer, spec, grid, block, shared_bytes, info, device):
    """A kernel whose traffic is not modelled yet: resources, occupancy and waves."""
    threads = math.prod(block) if isinstance(block, tuple) else block
    blocks = math.prod(grid) if isinstance(grid, tuple) else grid
    registers = info.registers if info else None
    smem = shared_bytes + (info.static_smem if info else 0)
    per_sm = occupancy(threads, registers or 64, smem, device)
    warps = -(-threads // 32)
    return KernelRow(layer, spec.name, registers, smem, threads, blocks, per_sm,
                     per_sm * warps / device.max_warps,
                     blocks / (device.sms * max(per_sm, 1)),
                     None, None, None, None, None, None, None, None)


def layer_rows(layer, dtype=np.float32, ptxas=None, device=H200, gradients=True, batch=None):
    """Predicted :class:`KernelRow` of every kernel the dispatcher picks on ``layer`` (a
    :class:`~gpuconv.workloads.Layer`) at its GPU batch (or ``batch``): both forwards
    (modelled), the
    split-K sum if the local forward uses one, and the gradient kernels (resources and
    waves). ``ptxas(spec, shared_bytes)`` returns the :class:`~gpuconv.cuda.ptx.PtxasInfo`
    of a kernel (None: registers from the launch bounds, or unknown)."""
    from .. import workloads

    geom = workloads.gpu_geometry(layer, batch)
    name = layer.name if batch is None else f"{layer.name} (N={batch})"

    def info(spec, shared=0):
        return ptxas(spec, shared) if ptxas else None

    rows = []
    for config in (kernels.conv2d_config(geom, dtype),
                   kernels.local_conv2d_forward_config(geom, dtype)):
        rows += forward_rows(name, geom, dtype, config, info, device)
    if gradients:
        from .launch import conv2d_input_grad_config, conv2d_weight_grad_config

        for kind, config in (("input", conv2d_input_grad_config(geom, dtype)),
                             ("weight", conv2d_weight_grad_config(geom, dtype))):
            shared = getattr(config, "shared_bytes", 0)
            if config.grid is None:
                continue
            if isinstance(config, (conv2d_gemm_grad.InputGradGemmConfig,
                                   conv2d_gemm_grad.WeightGradGemmConfig)):
                rows.append(_gemm_row(name, geom, dtype, kind, config, info(config.kernel),
                                      device))
                if kind == "weight" and config.scratch_elements:
                    size = geom.out_channels * geom.in_channels_per_group * (
                        geom.kernel_height * geom.kernel_width)
                    rows.append(_sum_row(name, dtype, size, config.slices, info, device))
                continue
            rows.append(_plain_row(name, config.kernel, tuple(config.grid),
                                   tuple(config.block), shared, info(config.kernel, shared),
                                   device))
        rows += local_gradient_rows(layer, dtype, ptxas, device, batch)
    return rows


def forward_row(layer, geom, dtype, config, info=None, device=H200):
    """The predicted :class:`KernelRow` of one forward launch ``config`` on ``geom`` (any of
    :func:`gpuconv.cuda.kernels.forward_candidates`, picked or not), registers from
    ``info`` (a :class:`~gpuconv.cuda.ptx.PtxasInfo`, or None: from the launch bounds)."""
    if isinstance(config, conv2d_gemm.Conv2dGemmConfig):
        return _gemm_row(layer, geom, dtype, "forward", config, info, device)
    if isinstance(config, kernels.Conv2dConfig):
        return _conv2d_row(layer, geom, dtype, info, device, config)
    if isinstance(config, local_stream.LocalStreamConfig):
        return _stream_row(layer, geom, dtype, info, device, config)
    if isinstance(config, local_gemm.LocalGemmConfig):
        return _local_gemm_row(layer, geom, dtype, info, device, config)
    if isinstance(config, kernels.LocalConv2dConfig):
        return _local_row(layer, geom, dtype, info, device, config)
    raise TypeError(f"not a forward launch configuration: {type(config).__name__}")


def forward_rows(layer, geom, dtype, config, info=None, device=H200):
    """:func:`forward_row` of ``config`` and, where the launch sums split-K slices, the
    row of that sum: the kernels one forward call of ``config`` launches. ``info(spec,
    shared_bytes)`` gives a kernel's :class:`~gpuconv.cuda.ptx.PtxasInfo` (None: registers
    from the launch bounds)."""
    info = info or (lambda spec, shared=0: None)
    rows = [forward_row(layer, geom, dtype, config,
                        info(config.kernel, getattr(config, "shared_bytes", 0)), device)]
    if getattr(config, "slices", 1) > 1:
        size = geom.batch * geom.out_channels * geom.out_height * geom.out_width
        rows.append(_sum_row(layer, dtype, size, config.slices, info, device))
    return rows


def _fmt(value, spec):
    return "-" if value is None else format(value, spec)


def format_rows(rows):
    """A Markdown table of predicted rows."""
    head = ("| layer | kernel | regs | smem B | threads | blocks | blocks/SM | occupancy | "
            "waves | sectors/FMA | lines/load | LDS wavefronts/FMA | DRAM B/FMA | bound | "
            "predicted time | % of roofline | % if staging hidden |")
    lines = [head, "|" + "---|" * 17]
    for r in rows:
        lines.append(
            f"| {r.layer} | `{r.kernel}` | {_fmt(r.registers, 'd')} | {r.shared_bytes} | "
            f"{r.threads} | {r.blocks} | {r.blocks_per_sm} | {r.occupancy:.0%} | "
            f"{r.waves:.2f} | {_fmt(r.sectors_per_fma, '.4f')} | "
            f"{_fmt(r.lines_per_load, '.2f')} | {_fmt(r.lds_wavefronts_per_fma, '.3f')} | "
            f"{_fmt(r.dram_bytes_per_fma, '.4f')} | {r.bound or '-'} | "
            f"{'-' if r.time_s is None else f'{r.time_s * 1e3:.3f} ms'} | "
            f"{'-' if r.roofline_share is None else f'{r.roofline_share:.0%}'} | "
            f"{'-' if r.hidden_share is None else f'{r.hidden_share:.0%}'} |")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# the local_conv2d gradients as batched GEMMs (gpuconv.cuda.local_grad_gemm)
# --------------------------------------------------------------------------------------------

#: Whole-call backward time (dL/dx and dL/dw) of PyTorch's unfold + einsum autograd on the
#: first H200 run (commit dc5a7fa, ``gpuconv bench --device cuda --pass backward``, float32,
#: GPU batches), in seconds: the peer the predicted local backward is set against.
LOCAL_BACKWARD_PEER_S = {"deepface-l4": 21.1e-3, "deepface-l6": 0.7969e-3,
                         "resnet50-res2-3x3": 2.263e-3}

# Warp instructions per staged element of the gradients' carry walks (address, carries,
# load, conversion, store), as the forward's input walk.
_GRAD_STAGE_INSTR = 24


def _tile_of(name):
    """The register tile ``(a, b)`` of a ``..._t{a}x{b}_...`` kernel name."""
    return tuple(int(v) for v in name.split("_t")[-1].split("_")[0].split("x"))


def _local_phase_taps(geom):
    """``[(blocks' rows, valid kernel rows, kernel columns)]`` per stride phase: for each
    phase ``(r_y, r_x)`` of the input gradient, the rows ``u`` of its sub-grid, how many
    (output row, kernel row) pairs each reaches, and how many kernel columns it takes."""
    s_h, s_w = geom.stride_h, geom.stride_w
    rows = []
    for ry in range(s_h):
        pairs = 0
        count = 0
        for u in range(-(-geom.in_height // s_h)):
            if ry + s_h * u >= geom.in_height:
                continue
            count += 1
            for ky in range(geom.kernel_height):
                a = ry + geom.pad_top - ky * geom.dilation_h
                if a % s_h == 0 and 0 <= u + a // s_h < geom.out_height:
                    pairs += 1
        for rx in range(s_w):
            nkx = sum(1 for kx in range(geom.kernel_width)
                      if (rx + geom.pad_left - kx * geom.dilation_w) % s_w == 0)
            rows.append((count, pairs, nkx))
    return rows


def _local_igrad_gemm_row(layer, geom, dtype, info, device, config=None):
    from . import local_grad_gemm as gemm

    config = config or gemm.local_input_grad_gemm_config(geom, dtype)
    itemsize = np.dtype(dtype).itemsize
    lanes_b, lanes_c, columns = config.block
    tm, tc = _tile_of(config.kernel.name)
    threads = lanes_b * lanes_c * columns
    warps = -(-threads // 32)
    bm, bc = lanes_b * tm, lanes_c * tc
    c_og = geom.out_channels_per_group
    n_pos = geom.out_height * geom.out_width
    k_len = geom.in_channels_per_group * geom.kernel_height * geom.kernel_width
    khw = geom.kernel_height * geom.kernel_width
    sj, chunk, nkw = config.sj, config.chunk, config.nkw
    # One full stage of an interior block (first images, maps and channels; output row 0,
    # first staged column 0): the kernel's own walks.

    def gy_address(e):
        col, rest = e % sj, e // sj
        b, m = rest % bm, rest // bm
        if b < min(bm, geom.batch) and col < geom.out_width:
            return (b * geom.out_channels + m) * n_pos + col
        return None

    def weight_address(e):
        kk, rest = e % nkw, e // nkw
        cc, rest = rest % bc, rest // bc
        jj, m = rest % sj, rest // sj
        if cc < min(bc, geom.in_channels_per_group) and jj < geom.out_width:
            return (m * n_pos + jj) * k_len + cc * khw + kk * config.kstep
        return None

    code = kernels.compute_code(kernels.dtype_code(dtype))
    g_instr, g_sectors, g_lines, g_rounds = _warp_loads(chunk * bm * sj, threads,
                                                        config.gy_loads,
                                                        gy_address, itemsize)
    w_instr, w_sectors, w_lines, w_rounds = _warp_loads(chunk * sj * bc * nkw, threads,
                                                        gemm.WEIGHT_STAGE_LOADS[code],
                                                        weight_address, itemsize)
    stage_fma = threads * tm * tc * chunk * nkw
    lanes = gemm._warps(lanes_b, lanes_c, columns)
    wg = max(gemm._bank_wavefronts([z * config.g_pitch + a for a, _, z in w]) for w in lanes)
    ww = max(gemm._bank_wavefronts([z * config.w_pitch + b for _, b, z in w]) for w in lanes)
    lds_per_tap = warps * (tm * wg + tc * ww)

    blocks = config.grid[0] * config.grid[1]
    registers = info.registers if info else 65536 // (
        config.kernel.launch_bounds[0] * config.kernel.launch_bounds[1])
    smem = config.shared_bytes + (info.static_smem if info else 0)
    per_sm = occupancy(threads, registers, smem, device)
    # Every block of a phase: its valid (output row, kernel row) pairs x maps x its taps;
    # per pair, ceil(c_Og / chunk) stages.
    per_block_tiles = config.v_tiles * config.batch_tiles * config.grid[1]
    taps = stages = 0
    for count, pairs, nkx in _local_phase_taps(geom):
        taps += pairs * per_block_tiles * c_og * nkx
        stages += pairs * per_block_tiles * -(-c_og // chunk)
    busy = sum(count for count, _, _ in _local_phase_taps(geom)) * per_block_tiles
    ffma = taps * warps * tm * tc
    lds = taps * lds_per_tap
    staged = stages * (g_instr + w_instr) * _GRAD_STAGE_INSTR
    issue = ffma + taps * warps * (tm + tc + _TAP_OVERHEAD) + staged
    fma = geom.batch * geom.out_channels * n_pos * k_len
    weights = geom.out_channels * n_pos * k_len
    x_el = geom.batch * geom.in_channels * geom.in_height * geom.in_width
    y_el = geom.batch * geom.out_channels * n_pos
    dram = (weights + x_el + y_el) * itemsize
    latency = w_rounds * device.dram_latency_s + g_rounds * device.l2_latency_s
    stages_per_block = stages / max(busy, 1)
    time, bound, hidden = _time(device, busy, per_sm, ffma, lds, issue, dram,
                                stage_fma / 32, latency, stages_per_block)
    roof = _roofline(geom, 2 * fma, itemsize, weights, device)
    return KernelRow(layer, config.kernel.name, registers, smem, threads, blocks, per_sm,
                     per_sm * warps / device.max_warps, blocks / (device.sms * max(per_sm, 1)),
                     (g_sectors + w_sectors) / stage_fma,
                     (g_lines + w_lines) / max(g_instr + w_instr, 1), lds_per_tap /
                     (threads * tm * tc), dram / fma, bound, time, 2 * fma / time / roof,
                     2 * fma / hidden / roof)


def _local_wgrad_gemm_row(layer, geom, dtype, info, device):
    from . import local_grad_gemm as gemm

    config = gemm.local_weight_grad_gemm_config(geom, dtype)
    itemsize = np.dtype(dtype).itemsize
    lanes_k, lanes_o, positions = config.block
    to, tk = _tile_of(config.kernel.name)
    threads = lanes_k * lanes_o * positions
    warps = -(-threads // 32)
    bo = lanes_o * to
    kw = geom.kernel_width
    n_pos = geom.out_height * geom.out_width
    k_len = geom.in_channels_per_group * geom.kernel_height * kw
    rows, chunk, win = config.stage_rows, config.chunk, config.win
    kc = rows * kw

    def gy_address(e):
        jj, rest = e % positions, e // positions
        o, b = rest % bo, rest // bo
        if o < min(bo, geom.out_channels_per_group) and jj < geom.out_width:
            return (b * geom.out_channels + o) * n_pos + jj
        return None

    def input_address(e):
        col, rest = e % win, e // win
        rr, b = rest % rows, rest // rows
        c, ky = divmod(rr, geom.kernel_height)
        iy = ky * geom.dilation_h - geom.pad_top
        ix = col - geom.pad_left
        if 0 <= iy < geom.in_height and 0 <= ix < geom.in_width:
            return ((b * geom.in_channels + c) * geom.in_height + iy) * geom.in_width + ix
        return None

    loads = gemm.WEIGHT_GRAD_STAGE_LOADS[kernels.compute_code(kernels.dtype_code(dtype))]
    g_instr, g_sectors, g_lines, g_rounds = _warp_loads(chunk * bo * positions, threads,
                                                        loads, gy_address, itemsize)
    x_instr, x_sectors, x_lines, x_rounds = _warp_loads(chunk * rows * win, threads,
                                                        loads, input_address, itemsize)
    stage_fma = threads * to * tk * chunk
    lanes = gemm._warps(lanes_k, lanes_o, positions)
    wg = max(gemm._bank_wavefronts([o * config.o_pitch + j for _, o, j in w]) for w in lanes)
    wx = 0
    for i in range(tk):
        def tap(t, j):
            return (t // kw) * win + j * geom.stride_w + (t % kw) * geom.dilation_w
        wx += max(gemm._bank_wavefronts([tap(k + i * lanes_k, j) for k, _, j in w
                                         if k + i * lanes_k < kc]) for w in lanes)
    lds_per_image = warps * (to * wg + wx)

    blocks = config.grid[0] * config.grid[1] * config.grid[2]
    registers = info.registers if info else 65536 // (
        config.kernel.launch_bounds[0] * config.kernel.launch_bounds[1])
    smem = config.shared_bytes + (info.static_smem if info else 0)
    per_sm = occupancy(threads, registers, smem, device)
    images = geom.batch * (blocks // config.slices)  # every block of a slice, its images
    stages = (blocks // config.slices) * -(-geom.batch // chunk)
    ffma = images * warps * to * tk
    lds = images * lds_per_image
    staged = stages * (g_instr + x_instr) * _GRAD_STAGE_INSTR
    issue = ffma + images * warps * (to + tk + _TAP_OVERHEAD) + staged
    fma = geom.batch * geom.out_channels * n_pos * k_len
    weights = geom.out_channels * n_pos * k_len
    x_el = geom.batch * geom.in_channels * geom.in_height * geom.in_width
    y_el = geom.batch * geom.out_channels * n_pos
    dram = (weights + x_el + y_el) * itemsize
    if config.slices > 1:  # partial sums written, then read and summed by a second kernel
        partial = grad_kernels.partial_dtype(dtype).itemsize
        dram += 2 * config.slices * weights * partial - weights * itemsize
    latency = g_rounds * device.l2_latency_s + x_rounds * device.l2_latency_s
    time, bound, hidden = _time(device, blocks, per_sm, ffma, lds, issue, dram,
                                stage_fma / 32, latency, stages / max(blocks, 1))
    roof = _roofline(geom, 2 * fma, itemsize, weights, device)
    return KernelRow(layer, config.kernel.name, registers, smem, threads, blocks, per_sm,
                     per_sm * warps / device.max_warps, blocks / (device.sms * max(per_sm, 1)),
                     (g_sectors + x_sectors) / stage_fma,
                     (g_lines + x_lines) / max(g_instr + x_instr, 1),
                     lds_per_image / (threads * to * tk), dram / fma, bound, time,
                     _share(2 * fma, time, roof), _share(2 * fma, hidden, roof))


def _local_grad_positions_rows(layer, geom, dtype, config, info, device):
    """The input gradient through columns (:mod:`gpuconv.cuda.local_grad_positions`): the
    per-position GEMM modelled as the forward's (:func:`_gemm_tile_row`, its staging loads
    walked at the kernel's own addresses for the first chunk of a middle position), the
    columns' bytes added to its DRAM traffic; the transpose and the gather by their DRAM
    traffic (each word read and written once; the gather's lines shared in L1). A batch
    run in chunks of images is modelled as one launch of the whole batch."""
    itemsize = np.dtype(dtype).itemsize
    cs = np.dtype(kernels._NUMPY[kernels.compute_code(kernels.dtype_code(dtype))]).itemsize
    BM, BN, BK, TM, TN = _gemm_tile(config.kernel.name)
    threads = (BM // TM) * (BN // TN)
    AR, BR = threads // BM, threads // BN
    LA, LB = BM * BK // threads, BN * BK // threads
    g = geom
    n_pos = g.out_height * g.out_width
    khw = g.kernel_height * g.kernel_width
    k_len = g.in_channels_per_group * khw
    pos = (g.out_height // 2) * g.out_width + g.out_width // 2
    loads = []
    for j in range(LA):
        loads.append([(pos * g.out_channels + t // BM + j * AR) * g.batch + t % BM
                      if t % BM < g.batch and t // BM + j * AR < g.out_channels_per_group
                      else None for t in range(threads)])
    for j in range(LB):
        loads.append([((t // BN + j * BR) * n_pos + pos) * k_len + t % BN
                      if t % BN < k_len and t // BN + j * BR < g.out_channels_per_group
                      else None for t in range(threads)])
    chunks = -(-g.out_channels_per_group // BK)
    batch_tiles = -(-g.batch // BM)
    blocks = n_pos * batch_tiles * g.groups * config.blocks_n
    fma = g.batch * g.out_channels * n_pos * k_len
    weights = g.out_channels * n_pos * k_len
    gy = g.batch * g.out_channels * n_pos
    col_words = g.batch * n_pos * g.in_channels * khw
    dx = g.batch * g.in_channels * g.in_height * g.in_width
    dram = (weights + gy) * itemsize + col_words * cs
    whole = config._replace(grid=(n_pos * batch_tiles, config.grid[1]))
    gemm = _gemm_tile_row(layer, whole, geom, dtype, loads, blocks * chunks, chunks, fma, weights, dram,
                          device.dram_latency_s, info(config.kernel), device)
    rows = [gemm]
    for spec, grid, words in (
            (config.transpose, (-(-n_pos // 32), -(-g.batch // 32), g.out_channels),
             2 * gy * itemsize),
            (config.col2im, (g.batch * g.in_height * -(-g.in_width // 8),
                             -(-g.in_channels // 32)), col_words * cs + dx * itemsize)):
        row = _plain_row(layer, spec, grid, (256,), 0, info(spec), device)
        rows.append(row._replace(dram_bytes_per_fma=None, bound="DRAM",
                                 time_s=words / device.copy_bytes_per_s))
    return rows


def _local_wgrad_pos_rows(layer, geom, dtype, config, info, device):
    """The weight gradient as a GEMM a position (:mod:`gpuconv.cuda.local_grad_positions`):
    modelled as the forward's tile GEMM (:func:`_gemm_tile_row`), its staging loads walked at
    the kernel's own addresses for the first image chunk of a middle position; the weights
    written once to DRAM, the input and the transposed gradient read once (both stay in L2:
    its loads' round trip is L2's); the transpose by its DRAM traffic."""
    itemsize = np.dtype(dtype).itemsize
    BM, BN, BK, TM, TN = _gemm_tile(config.kernel.name)
    threads = (BM // TM) * (BN // TN)
    AR, BR = threads // BK, threads // BN
    LA, LB = BM * BK // threads, BN * BK // threads
    g = geom
    n_pos = g.out_height * g.out_width
    khw = g.kernel_height * g.kernel_width
    k_len = g.in_channels_per_group * khw
    oy, ox = g.out_height // 2, g.out_width // 2
    pos = oy * g.out_width + ox
    loads = []
    for j in range(LA):
        loads.append([(pos * g.out_channels + t // BK + j * AR) * g.batch + t % BK
                      if t % BK < g.batch and t // BK + j * AR < g.out_channels_per_group
                      else None for t in range(threads)])
    loads += [[_window_address(g, oy, ox, t // BN + j * BR, t % BN) for t in range(threads)]
              for j in range(LB)]
    chunks = -(-g.batch // BK)
    blocks = math.prod(config.grid)
    fma = g.batch * g.out_channels * n_pos * k_len
    weights = g.out_channels * n_pos * k_len
    gy = g.batch * g.out_channels * n_pos
    x_el = g.batch * g.in_channels * g.in_height * g.in_width
    dram = (weights + gy + x_el) * itemsize
    rows = [_gemm_tile_row(layer, config, geom, dtype, loads, blocks * chunks, chunks, fma,
                           weights, dram, device.l2_latency_s, info(config.kernel), device)]
    row = _plain_row(layer, config.transpose, (-(-n_pos // 32), -(-g.batch // 32),
                                               g.out_channels), (256,), 0,
                     info(config.transpose), device)
    rows.append(row._replace(dram_bytes_per_fma=None, bound="DRAM",
                             time_s=2 * gy * itemsize / device.copy_bytes_per_s))
    return rows


def local_weight_grad_rows(layer, geom, dtype, config, info=None, device=H200):
    """The predicted :class:`KernelRow` of one local weight-gradient launch ``config``: the
    GEMM a position (and its transpose), or the batched GEMM (and its slice sum)."""
    from . import local_grad_gemm, local_grad_positions

    info = info or (lambda spec, shared=0: None)
    if isinstance(config, local_grad_positions.LocalWeightGradPosConfig):
        return _local_wgrad_pos_rows(layer, geom, dtype, config, info, device)
    rows = [_local_wgrad_gemm_row(layer, geom, dtype, info(config.kernel, config.shared_bytes),
                                  device)]
    if isinstance(config, local_grad_gemm.LocalWeightGradGemmConfig) and config.slices > 1:
        rows.append(_sum_row(layer, dtype, math.prod(geom.local_weight_shape()),
                             config.slices, info, device))
    return rows


def local_input_grad_rows(layer, geom, dtype, config, info=None, device=H200):
    """The predicted :class:`KernelRow` of one local input-gradient launch ``config``: the
    columns path (its GEMM, transpose and gather) or the batched-GEMM gather; ``info(spec,
    shared)`` gives a kernel's :class:`~gpuconv.cuda.ptx.PtxasInfo` (or None)."""
    from . import local_grad_positions

    info = info or (lambda spec, shared=0: None)
    if isinstance(config, local_grad_positions.LocalInputGradColsConfig):
        return _local_grad_positions_rows(layer, geom, dtype, config, info, device)
    return [_local_igrad_gemm_row(layer, geom, dtype, info(config.kernel, config.shared_bytes),
                                  device, config)]


def local_gradient_rows(layer, dtype=np.float32, ptxas=None, device=H200, batch=None):
    """Predicted :class:`KernelRow` of the local_conv2d gradient kernels the dispatcher picks
    on ``layer`` (:func:`local_input_grad_rows`, :func:`local_weight_grad_rows`): for many
    maps a group the GEMMs a position (input gradient through columns), else the batched
    GEMMs and the weight gradient's slice sum where it splits the batch."""
    from .. import workloads

    geom = workloads.gpu_geometry(layer, batch)
    name = layer.name if batch is None else f"{layer.name} (N={batch})"

    def info(spec, shared=0):
        return ptxas(spec, shared) if ptxas else None

    from .launch import local_conv2d_input_grad_config, local_conv2d_weight_grad_config

    return (local_input_grad_rows(name, geom, dtype, local_conv2d_input_grad_config(geom, dtype),
                                  info, device)
            + local_weight_grad_rows(name, geom, dtype,
                                     local_conv2d_weight_grad_config(geom, dtype), info, device))


class BackwardRow(NamedTuple):
    """A layer's predicted local backward (input and weight gradients) against the measured
    unfold + einsum autograd backward."""

    layer: str
    predicted_s: float
    peer_s: float | None
    speedup: float | None


def local_backward_rows(layers, dtype=np.float32, ptxas=None, device=H200):
    """:class:`BackwardRow` of each layer: the sum of :func:`local_gradient_rows`' predicted
    times beside :data:`LOCAL_BACKWARD_PEER_S` (None where the peer was not measured)."""
    out = []
    for layer in layers:
        total = sum(r.time_s for r in local_gradient_rows(layer, dtype, ptxas, device))
        peer = LOCAL_BACKWARD_PEER_S.get(layer.name)
        out.append(BackwardRow(layer.name, total, peer, None if peer is None else peer / total))
    return out


def format_backward_rows(rows):
    """A Markdown table of :class:`BackwardRow`, with the geometric mean of the speedups."""
    lines = ["| layer | predicted backward (kernels) | unfold+einsum autograd (measured, "
             "whole call) | predicted speedup |", "|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r.layer} | {r.predicted_s * 1e3:.3f} ms | "
                     f"{'-' if r.peer_s is None else f'{r.peer_s * 1e3:.3f} ms'} | "
                     f"{'-' if r.speedup is None else f'{r.speedup:.1f}x'} |")
    speedups = [r.speedup for r in rows if r.speedup]
    if speedups:
        mean = math.exp(sum(math.log(s) for s in speedups) / len(speedups))
        lines.append(f"| geometric mean | | | {mean:.1f}x |")
    return "\n".join(lines)
