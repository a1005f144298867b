"""CPU kernel of the shared-weight convolution (design: :mod:`gpuconv.cpu`)."""


from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
from numba import njit, prange

from . import threads as _threads

from . import _conv2d_blocks as _blocks
from .simd import VECTOR_BYTES as _VECTOR_BYTES
from .simd import vload as _vload, vstore as _vstore, vzero as _vzero
from .simd_ext import vadd_scalar as _vadd_scalar, vstore_first as _vstore_first
from .simd_ext import vtranspose as _vtranspose

__all__ = ["conv2d_forward", "choose_cpu_kernel", "conv2d_scratch_bytes", "CpuKernel",
           "CPU_KERNELS"]


class _RegisterBlock(NamedTuple):
    """Shape of a register block: ``rows`` x ``cols`` vector accumulators that stay in
    registers for a whole chunk of the reduction. Per tap it loads ``cols`` vectors of
    consecutive elements and broadcasts ``rows`` scalars against them, one fused multiply-add
    per accumulator. ``vectors_of`` says what the vectors hold:

    - ``"channels"``: the weights of ``cols * lanes`` output channels; the scalars are the
      input values of ``rows`` consecutive pixels (which may run past the end of a run: the
      extra pixels are computed and dropped). The tile is pixel-major:
      ``tile[pixel * block + channel]``;
    - ``"pixels"``: the input values of ``cols * lanes`` consecutive pixels; the scalars are
      the weights of up to ``rows`` output channels (fewer in the last block of a group: the
      rows past ``width`` are skipped). The tile is channel-major over the whole run:
      ``tile[channel * run_len + pixel]``.

    The functions themselves are generated from this table (:func:`_register_blocks_source`)
    into ``_conv2d_blocks.py``.
    """

    name: str
    vectors_of: str  # "channels" or "pixels"
    rows: int
    cols: int

    def pixels(self, lanes):
        """Output pixels per block."""
        return self.rows if self.vectors_of == "channels" else self.cols * lanes

    def channels(self, lanes):
        """Output channels per block (at most, for ``"pixels"``)."""
        return self.cols * lanes if self.vectors_of == "channels" else self.rows


# Each block has 24 accumulators, which leave registers for the operands of one tap (two
# weight vectors and one input value, or four input vectors and one weight) on a
# 32-register machine. These three name the kernel variants (:data:`CPU_KERNELS`).
_REGISTER_BLOCKS = (
    _RegisterBlock("pvec", "pixels", rows=6, cols=4),
    _RegisterBlock("cvec1", "channels", rows=24, cols=1),
    _RegisterBlock("cvec2", "channels", rows=12, cols=2),
)
# One vector of output channels by other pixel counts, for ``cvec1`` by rows: each output
# row is cut into blocks of the count (24 or one of these) that computes the fewest pixels,
# so that rows of 21, 25 or 55 = 2 x 28 pixels (DeepFace L6, L5, L4) compute no dropped
# pixels. At most 28 accumulators and the weight vector of the tap: 29 of 32 registers.
_ROW_FITTED_PIXELS = (21, 25, 28)
_ALL_BLOCKS = _REGISTER_BLOCKS + tuple(
    _RegisterBlock(f"cvec1x{p}", "channels", rows=p, cols=1) for p in _ROW_FITTED_PIXELS)
_BLOCK_BY_NAME = {blk.name: blk for blk in _ALL_BLOCKS}
# The index of a block in _ALL_BLOCKS is its variant number in the kernel.
_VARIANT = {blk.name: variant for variant, blk in enumerate(_ALL_BLOCKS)}
_RUNS = ("merged", "rows")

# The channel-vector kernels fill vectors with output channels: with at most this many per
# group the pixel-vector kernel (blocks of at most 6 channels) wastes fewer lanes.
_PVEC_MAX_CHANNELS = 12


@dataclass(frozen=True)
class CpuKernel:
    """A CPU kernel variant of :func:`conv2d_forward` (see :func:`choose_cpu_kernel`);
    ``str()`` gives its name, ``"<vector>-<runs>"``.

    >>> k = CpuKernel("cvec2", "merged")
    >>> str(k), k.merged
    ('cvec2-merged', True)
    """

    vector: str  # "pvec", "cvec1" or "cvec2"
    runs: str    # "merged" or "rows"

    def __post_init__(self):
        if self.vector not in _BLOCK_BY_NAME or self.runs not in _RUNS:
            raise ValueError(f"no CPU kernel {self.vector!r}-{self.runs!r}")

    def __str__(self):
        return f"{self.vector}-{self.runs}"

    @property
    def merged(self):
        """Whether all output rows of all images form one run of virtual pixels."""
        return self.runs == "merged"


# Every variant, in the order of _REGISTER_BLOCKS.
CPU_KERNELS = tuple(CpuKernel(blk.name, runs) for blk in _REGISTER_BLOCKS for runs in _RUNS)
_CPU_KERNEL = {(k.vector, k.runs): k for k in CPU_KERNELS}  # built once: a call is cheaper


def choose_cpu_kernel(geom):
    """The CPU kernel variant (a :class:`CpuKernel`) that :func:`conv2d_forward` uses for a
    geometry; ``str()`` of it names it ``"<vector>-<runs>"``:

    - vector: ``"cvec2"`` (more than one float32 vector, 16, of output channels per group)
      or ``"cvec1"`` (13 to 16): two or one vectors of output channels times a block of 12
      or 24 output pixels; ``"pvec"`` (at most ``_PVEC_MAX_CHANNELS``, where channel vectors
      would be mostly empty): blocks of at most 6 output channels times four vectors of
      consecutive output pixels. All three keep 24 vector accumulators in registers for a
      whole chunk of the reduction (``_REGISTER_BLOCKS``); ``"cvec1"`` by rows cuts each
      output row into blocks of 21, 24, 25 or 28 pixels, whichever computes the fewest
      (``_ROW_FITTED_PIXELS``: rows of 21, 25 and 55 pixels end with their last block);
    - runs ``"merged"`` when ``stride == (1, 1)``: all output rows of all images form one run
      of virtual pixels on the padded grid (long runs even for 7 x 7 maps, at the price of
      computing the pixels that fall in the padding columns and rows, which are dropped),
      unless one run per output row computes at most 90 % as many multiply-adds (a wide
      kernel without padding on a small map, such as DeepFace L6's, or a wide kernel with
      wide padding, such as its input gradient's: by rows, an output row skips the kernel
      rows that read only the zero padding above or below the input); ``"rows"`` otherwise:
      one run per output row.

    >>> from gpuconv.geometry import conv_geometry
    >>> choose_cpu_kernel(conv_geometry((1, 3, 8, 8), (3, 3), 4))
    CpuKernel(vector='pvec', runs='merged')
    >>> str(choose_cpu_kernel(conv_geometry((1, 3, 8, 8), (3, 3), 16)))
    'cvec1-merged'
    >>> str(choose_cpu_kernel(conv_geometry((1, 3, 8, 8), (3, 3), 64, stride=2)))
    'cvec2-rows'

    DeepFace L6 (16 -> 16 channels, 25 x 25, 5 x 5) and its input gradient (the forward
    convolution of the 21 x 21 output gradient, padding 4) run by rows:

    >>> str(choose_cpu_kernel(conv_geometry((8, 16, 25, 25), (5, 5), 16)))
    'cvec1-rows'
    >>> str(choose_cpu_kernel(conv_geometry((8, 16, 21, 21), (5, 5), 16, padding=4)))
    'cvec1-rows'
    """
    lanes = _VECTOR_BYTES // 4  # float32 lanes per vector
    c_Og = geom.out_channels_per_group
    if c_Og <= _PVEC_MAX_CHANNELS:
        vector = "pvec"
    else:
        vector = "cvec1" if c_Og <= lanes else "cvec2"
    runs = "rows"
    if geom.stride_h == 1 and geom.stride_w == 1:
        merged = _computed_taps(geom, True, _BLOCK_BY_NAME[vector].pixels(lanes))
        rows = _computed_taps(geom, False, _row_block(geom, vector).pixels(lanes))
        if merged * _MERGED_WASTE < rows:
            runs = "merged"
    return _CPU_KERNEL[vector, runs]


# The merged runs are chosen unless the rows compute at most this share of their
# multiply-adds (their runs are shorter, so each costs a little more).
_MERGED_WASTE = 0.9


def _row_block(geom, vector):
    """The register block of the runs by rows: ``vector``'s own, or for ``"cvec1"`` the one
    of ``_ROW_FITTED_PIXELS`` (or 24) pixels whose whole blocks cover an output row with the
    fewest pixels (the most pixels among equals)."""
    if vector != "cvec1":
        return _BLOCK_BY_NAME[vector]
    w_O = geom.out_width
    candidates = (_BLOCK_BY_NAME["cvec1"],) + tuple(
        _BLOCK_BY_NAME[f"cvec1x{p}"] for p in _ROW_FITTED_PIXELS)
    return min(candidates, key=lambda blk: (-(-w_O // blk.rows) * blk.rows, -blk.rows))


def _crops_rows(geom, merged):
    """Whether the runs by rows skip the kernel rows that read only the zero padding above
    or below the input (then the taps are ordered kernel row first: see
    :func:`_tap_offsets`)."""
    return not merged and geom.kernel_height > 1 and (geom.pad_top > 0 or geom.pad_bottom > 0)


def _kernel_rows(geom, oy):
    """The kernel rows ``[u_lo, u_hi)`` that output row ``oy`` reads inside the input (none:
    ``u_lo == u_hi``); the rows before and after read only its zero padding."""
    iy = oy * geom.stride_h - geom.pad_top
    d_H = geom.dilation_h
    u_lo = min(geom.kernel_height, -(iy // d_H) if iy < 0 else 0)
    u_hi = min(geom.kernel_height, (geom.in_height - 1 - iy) // d_H + 1)
    return u_lo, max(u_lo, u_hi)


def _computed_taps(geom, merged, pixels):
    """Multiply-adds the kernel computes per output channel and input channel, in whole
    register blocks of ``pixels``: the merged runs cover the padded grid (see
    :func:`_conv2d_layout`) with every tap, the rows each output row with the kernel rows
    it reads inside the input (see :func:`_crops_rows`).

    DeepFace L6 (25 x 25 input, 5 x 5 kernel, no padding) computes 25 x 25 virtual pixels
    per image merged, 21 rows of 21 by rows; its input gradient (21 x 21, padding 4) 25 x 25
    merged with every tap, 25 rows of 25 by rows with 21 of their 25 kernel rows."""
    taps = geom.kernel_height * geom.kernel_width
    if merged:
        h_P = max(geom.in_height + max(geom.pad_top, geom.pad_bottom), geom.out_height)
        w_Q = max(geom.in_width + max(geom.pad_left, geom.pad_right), geom.out_width)
        total = ((geom.batch - 1) * h_P + geom.out_height - 1) * w_Q + geom.out_width
        return -(-total // pixels) * pixels * taps
    if _crops_rows(geom, False):
        kernel_rows = sum(hi - lo for lo, hi in map(functools.partial(_kernel_rows, geom),
                                                    range(geom.out_height)))
    else:
        kernel_rows = geom.out_height * geom.kernel_height
    row = -(-geom.out_width // pixels) * pixels
    return geom.batch * kernel_rows * geom.kernel_width * row


# --------------------------------------------------------------------------------------
# Shared weights
# --------------------------------------------------------------------------------------

@njit(cache=True)
def _pack_input(x, xp, pt, pl, s_W):
    """Zero-padded, channel-major, column-phase-split copy: xp[c, b, y, ph, j] =
    x_padded[b, c, y, j * s_W + ph]."""
    n, c_I, h, wd = x.shape
    h_P = xp.shape[2]
    w_Q = xp.shape[4]
    x_flat = x.reshape(-1)
    xp_flat = xp.reshape(-1)
    lanes = _VECTOR_BYTES // x.itemsize
    # Serial: a copy at memory speed, and one parallel region fewer per call (on a busy
    # machine each region waits for every thread to get a core).
    if s_W == 1 and w_Q >= lanes:
        _pack_rows(x_flat, xp_flat, n, c_I, h, wd, h_P, w_Q, pt, pl, lanes)
        return
    for c in range(c_I):
        for b in range(n):
            for y in range(h_P):
                iy = y - pt
                for ph in range(s_W):
                    dst = (((c * n + b) * h_P + y) * s_W + ph) * w_Q
                    # columns j with 0 <= j * s_W + ph - pl < wd
                    j_lo = min(w_Q, max(0, (pl - ph + s_W - 1) // s_W))
                    j_hi = min(w_Q, max(j_lo, (wd + pl - ph + s_W - 1) // s_W))
                    if iy < 0 or iy >= h:
                        j_hi = j_lo
                    for j in range(j_lo):
                        xp_flat[np.uint64(dst + j)] = 0
                    src = ((b * c_I + c) * h + iy) * wd + ph - pl
                    if s_W == 1:
                        for j in range(j_lo, j_hi):
                            xp_flat[np.uint64(dst + j)] = x_flat[np.uint64(src + j)]
                    else:
                        for j in range(j_lo, j_hi):
                            xp_flat[np.uint64(dst + j)] = x_flat[np.uint64(src + j * s_W)]
                    for j in range(j_hi, w_Q):
                        xp_flat[np.uint64(dst + j)] = 0


@njit(cache=True)
def _pack_rows(x_flat, xp_flat, n, c_I, h, wd, h_P, w_Q, pt, pl, lanes):
    """:func:`_pack_input` with stride 1 and rows of at least one vector. Rows are short (21
    to 29 columns for DeepFace L6 and its input gradient): whole vectors, the last of a
    stretch overlapping the one before it, cost less than a scalar tail, and the column
    range is computed once, not per row."""
    zero = _vzero(xp_flat)
    j_lo = min(w_Q, pl)
    j_hi = min(w_Q, max(j_lo, wd + pl))
    for c in range(c_I):
        for b in range(n):
            for y in range(h_P):
                iy = y - pt
                dst = ((c * n + b) * h_P + y) * w_Q
                src = ((b * c_I + c) * h + iy) * wd - pl
                lo, hi = (j_lo, j_hi) if 0 <= iy < h else (w_Q, w_Q)
                # The zeros first: where their vectors reach into the copied columns, the
                # copy overwrites them.
                j = 0
                while j < lo:
                    _vstore(xp_flat, dst + min(j, w_Q - lanes), zero)
                    j += lanes
                j = hi
                while j < w_Q:
                    _vstore(xp_flat, dst + min(j, w_Q - lanes), zero)
                    j += lanes
                if hi - lo >= lanes:
                    j = lo
                    while j < hi - lanes:
                        _vstore(xp_flat, dst + j, _vload(x_flat, src + j))
                        j += lanes
                    _vstore(xp_flat, dst + hi - lanes, _vload(x_flat, src + hi - lanes))
                else:
                    for j in range(lo, hi):
                        xp_flat[np.uint64(dst + j)] = x_flat[np.uint64(src + j)]


@njit(cache=True)
def _pack_weights(w, wp, c_Og, rows_first):
    """wp[block, tap, k] = w[co, c, u, v] with co = the k-th channel of the block and
    tap = (c * k_H + u) * k_W + v, or (u * c_Ig + c) * k_W + v if ``rows_first``; channels
    past the end of a group are zero."""
    c_O, c_Ig, k_H, k_W = w.shape
    block = wp.shape[2]
    blocks_per_group = wp.shape[0] // (c_O // c_Og)
    for blk in range(wp.shape[0]):
        g = blk // blocks_per_group
        co0 = g * c_Og + (blk % blocks_per_group) * block
        co1 = min(co0 + block, (g + 1) * c_Og)
        for c in range(c_Ig):
            for u in range(k_H):
                for v in range(k_W):
                    t = (u * c_Ig + c) * k_W + v if rows_first else (c * k_H + u) * k_W + v
                    for k in range(block):
                        co = co0 + k
                        wp[blk, t, k] = w[co, c, u, v] if co < co1 else 0



# Taps per pass over a run of pixel blocks: the pass's weights (at most 16 KiB) stay in L1
# while they are applied to every block of the run.
_TAP_CHUNK_BYTES = 16384
# Pixel blocks per job (one run).
_RUN_BLOCKS = 8


# --------------------------------------------------------------------------------------
# Register blocks: generated from _ALL_BLOCKS into _conv2d_blocks.py
# --------------------------------------------------------------------------------------
#
# Numba keeps values in registers only if they are separate local variables, so each block
# is written out in full: 24 accumulators, each loaded, updated once per tap and stored by
# its own statement. The generated module is checked in (Numba caches compiled code only
# for functions whose source is in a real file) and tests/test_cpu_kernels.py checks that it
# is current.

_BLOCKS_FILE = Path(__file__).with_name("_conv2d_blocks.py")
# Arguments of register_block; a block of channel vectors takes all but width and row_step
# (its own step, cols * lanes, is both).
_BLOCK_ARGS = ("xf", "base", "tap_off", "t0", "t1", "wq", "w_base", "width", "lanes", "tile",
               "tile_base", "row_step", "first")


def _block_args(blk):
    """The arguments of one register block function."""
    if blk.vectors_of == "channels":
        return tuple(arg for arg in _BLOCK_ARGS if arg not in ("width", "row_step"))
    return _BLOCK_ARGS


_BLOCKS_HEADER = '''\
"""Register blocks of the shared-weight CPU kernel: generated from ``_ALL_BLOCKS`` in
:mod:`gpuconv.cpu.conv2d`, which documents them. Do not edit: change the generator there and
run ``python -c "from gpuconv.cpu import conv2d; conv2d._write_register_blocks()"``.
"""

import numpy as np
from numba import njit

from .simd import prefer_wide_vectors as _prefer_wide_vectors
from .simd import vfma as _vfma, vload as _vload, vstore as _vstore, vzero as _vzero'''


def _wrapped(head, args, tail):
    """``head`` + the comma-separated ``args`` + ``tail``, wrapped at 92 columns under the
    first argument."""
    lines = [head]
    for i, arg in enumerate(args):
        piece = arg + (tail if i == len(args) - 1 else ", ")
        if len(lines[-1]) + len(piece.rstrip()) > 92:
            lines[-1] = lines[-1].rstrip()
            lines.append(" " * len(head))
        lines[-1] += piece
    return lines


def _sum(*terms):
    """``a + 2 * b`` from ``("a", 1), ("b", 2)``: terms with a zero factor left out."""
    parts = [n if k == 1 else f"{k} * {n}" for n, k in terms if k]
    return " + ".join(parts) or "0"


def _register_block_source(blk):
    """Source of one register block function: see :class:`_RegisterBlock`."""
    rows, cols = blk.rows, blk.cols
    grid = [(i, j) for i in range(rows) for j in range(cols)]

    if blk.vectors_of == "channels":
        # Pixel-major tile, rows ``step = cols * lanes`` apart, as the weights of one tap:
        # derived from ``lanes``, so that LLVM folds the offsets of the weights and the tile.
        def tile_at(i, j):
            return _sum(("tile_base", 1), ("step", i), ("lanes", j))

        vec, vec_off, sca, sca_off = "wq", "w_base + t * step", "xf", "base + tap_off[t]"
        doc = [
            f'"""{cols} vector{"s" * (cols > 1)} of output channels x {rows} pixels.',
            "",
            f"For p < {rows} and k < step = {cols} * lanes, with T the sum over taps",
            "t0 <= t < t1 of ``wq[w_base + t * step + k] * xf[base + tap_off[t] + p]``:",
            "``tile[tile_base + p * step + k] = T`` if ``first``, else ``+= T``.",
            f"Per tap, {cols} weight vector{'s are' if cols > 1 else ' is'} loaded and each "
            f"input value is broadcast against {'them' if cols > 1 else 'it'}.",
            '"""',
        ]
    else:
        def tile_at(i, j):
            return _sum(("tile_base", 1), ("row_step", i), ("lanes", j))

        vec, vec_off, sca, sca_off = "xf", "base + tap_off[t]", "wq", "w_base + t * width"
        doc = [
            f'"""width (1 to {rows}) output channels x {cols} vectors of pixels.',
            "",
            f"For k < width and p < {cols} * lanes, with T the sum over taps t0 <= t < t1 of",
            "``wq[w_base + t * width + k] * xf[base + tap_off[t] + p]``:",
            "``tile[tile_base + k * row_step + p] = T`` if ``first``, else ``+= T``.",
            f"Per tap, {cols} input vectors are loaded and each weight is broadcast against "
            "them;",
            "the tests of ``width`` always go the same way and cost next to nothing.",
            '"""',
        ]
    out = ["@njit(cache=True)", *_wrapped(f"def {blk.name}_block(", _block_args(blk), "):")]
    out += ["    " + line if line else "" for line in doc]
    out += ["    _prefer_wide_vectors()"]
    if blk.vectors_of == "channels":
        out += [f"    step = {cols} * lanes"]
    out += ["    if first:"]
    out += [f"        a{i}_{j} = _vzero(xf)" for i, j in grid]
    out += ["    else:"]
    out += [f"        a{i}_{j} = _vload(tile, {tile_at(i, j)})" for i, j in grid]
    out += ["    for t in range(t0, t1):",
            f"        vo = {vec_off}",
            f"        so = np.uint64({sca_off})"]
    out += [f"        v{j} = _vload({vec}, {_sum(('vo', 1), ('lanes', j))})"
            for j in range(cols)]
    for i in range(rows):
        pad = "        "
        if blk.vectors_of == "pixels" and i > 0:
            out.append(f"        if width > {i}:")
            pad += "    "
        out.append(f"{pad}s = {sca}[so]" if i == 0 else f"{pad}s = {sca}[so + np.uint64({i})]")
        out += [f"{pad}a{i}_{j} = _vfma(a{i}_{j}, v{j}, s)" for j in range(cols)]
    out += [f"    _vstore(tile, {tile_at(i, j)}, a{i}_{j})" for i, j in grid]
    return "\n".join(out)


def _register_blocks_source():
    """Source of ``_conv2d_blocks.py``: one function per entry of ``_ALL_BLOCKS``,
    ``register_block`` that calls one of them by its index (the kernel's ``variant``), and
    ``tile_is_channel_major``."""
    parts = [_BLOCKS_HEADER]
    parts += [_register_block_source(blk) for blk in _ALL_BLOCKS]
    # Inlined by Numba into the caller, which then calls the blocks directly.
    dispatch = ['@njit(inline="always", cache=True)',
                *_wrapped("def register_block(", ("variant",) + _BLOCK_ARGS, "):"),
                '    """Register block number ``variant`` of ``_ALL_BLOCKS``."""']
    for v, blk in enumerate(_ALL_BLOCKS):
        if v == 0:
            dispatch.append(f"    if variant == {v}:")
        elif v < len(_ALL_BLOCKS) - 1:
            dispatch.append(f"    elif variant == {v}:")
        else:
            dispatch.append("    else:")
        dispatch += _wrapped(f"        {blk.name}_block(", _block_args(blk), ")")
    parts.append("\n".join(dispatch))
    channel_major = " or ".join(f"variant == {v}" for v, blk in enumerate(_ALL_BLOCKS)
                                if blk.vectors_of == "pixels") or "False"
    parts.append("\n".join([
        '@njit(inline="always", cache=True)',
        "def tile_is_channel_major(variant):",
        '    """Whether register block number ``variant`` keeps a channel-major tile."""',
        f"    return {channel_major}"]))
    return "\n\n\n".join(parts) + "\n"


def _write_register_blocks():
    """Regenerate ``_conv2d_blocks.py`` (after a change of ``_ALL_BLOCKS`` or of the
    generator)."""
    _BLOCKS_FILE.write_text(_register_blocks_source())


@njit(parallel=True, cache=True)
def _conv2d_kernel(xf, tap_off, wq, variant, px, block, block_step, row_step, tap_chunk, bias,
                   has_bias, out, tiles, groups, c_Ig, h_P, s_H, s_W, w_Q, merged, crop,
                   k_H, d_H, pad_top, in_h):
    """The shared-weight kernel around register block number ``variant`` of
    ``_ALL_BLOCKS`` (``px`` pixels by ``block`` output channels, ``block_step`` apart in
    the tile, rows ``row_step`` apart: see :class:`_Conv2dLayout`). Jobs are (run of pixel
    blocks, block of output channels); each job runs the reduction in chunks of ``tap_chunk``
    taps (whose weights fit in L1) over all the pixel blocks of its run, then scatters its
    tiles to the output. With ``crop`` (by rows; taps ordered kernel row first) a run takes
    only the taps of the kernel rows that read inside the input (see :func:`_kernel_rows`)."""
    n, c_O, h_O, w_O = out.shape
    c_Og = c_O // groups
    n_taps = tap_off.shape[0]
    lanes = _VECTOR_BYTES // wq.itemsize
    blocks_per_group = -(-c_Og // block)
    n_blocks = blocks_per_group * groups
    channel_stride = n * h_P * s_W * w_Q
    run_len = _RUN_BLOCKS * px
    if merged:
        total = ((n - 1) * h_P + h_O - 1) * w_Q + w_O
        runs = (total + run_len - 1) // run_len
        runs_per_row = 1
    else:
        runs_per_row = (w_O + run_len - 1) // run_len
        runs = n * h_O * runs_per_row
        total = 0
    n_jobs = runs * n_blocks
    row_taps = n_taps // k_H  # taps of one kernel row (crop: they are consecutive)
    n_threads = tiles.shape[0]
    transposed = tiles.shape[1] - lanes * lanes  # scratch of the pixel-major scatter
    out_flat = out.reshape(-1)
    for thread in prange(n_threads):
        tile = tiles[thread]
        for job in range(thread, n_jobs, n_threads):
            blk = job % n_blocks
            run = job // n_blocks
            g = blk // blocks_per_group
            co0 = g * c_Og + (blk % blocks_per_group) * block
            co1 = min(co0 + block, (g + 1) * c_Og)
            group_base = g * c_Ig * channel_stride
            w_base = blk * n_taps * block
            if merged:
                v_start = run * run_len
                v_end = min(v_start + run_len, total)
                row_base = group_base
                r = v_start // w_Q
                ox = v_start - r * w_Q
                b = r // h_P
                oy = r - b * h_P
            else:
                row = run // runs_per_row
                b = row // h_O
                oy = row - b * h_O
                v_start = (run % runs_per_row) * run_len
                v_end = min(v_start + run_len, w_O)
                row_base = group_base + ((b * h_P + oy * s_H) * s_W) * w_Q
                ox = v_start
            n_px_blocks = (v_end - v_start + px - 1) // px
            t_lo = 0
            t_hi = n_taps
            if crop:
                iy = oy * s_H - pad_top
                u_lo = min(k_H, -(iy // d_H) if iy < 0 else 0)
                u_hi = max(u_lo, min(k_H, (in_h - 1 - iy) // d_H + 1))
                t_lo = u_lo * row_taps
                t_hi = u_hi * row_taps
            # at least one pass: with no taps, the first one zeroes the tiles
            t0 = t_lo
            while True:
                t1 = min(t0 + tap_chunk, t_hi)
                for j in range(n_px_blocks):
                    base = row_base + v_start + j * px
                    _blocks.register_block(variant, xf, base, tap_off, t0, t1, wq, w_base,
                                           block, lanes, tile, j * block_step, row_step,
                                           t0 == t_lo)
                t0 = t1
                if t0 >= t_hi:
                    break
            # Scatter the run's tiles to the output, one stretch of an output row at a time.
            i0 = 0
            while i0 < v_end - v_start:
                stretch = v_end - v_start - i0
                if merged:
                    stretch = min(stretch, w_Q - ox)
                valid = min(stretch, w_O - ox) if oy < h_O else 0
                # Tested here, inside the parallel loop, on the variant number, which LLVM
                # relates to the branches of register_block. (A flag computed outside prange
                # reaches the loop body as a separate argument, and LLVM then compiles
                # slower loops.)
                if _blocks.tile_is_channel_major(variant):
                    for co in range(co0, co1):
                        k = co - co0
                        o = ((b * c_O + co) * h_O + oy) * w_O + ox
                        add = bias[co, 0, 0] if has_bias else 0
                        t = k * run_len + i0
                        for q in range(valid):
                            out_flat[np.uint64(o + q)] = tile[np.uint64(t + q)] + add
                else:
                    # Pixel-major: blocks of lanes pixels x lanes channels transposed in
                    # registers into the scratch after the tile, then stored channel by
                    # channel (the pixels past ``valid`` and the channels past ``co1`` that
                    # the block reads are dropped).
                    for q0 in range(0, valid, lanes):
                        count = min(lanes, valid - q0)
                        for k0 in range(0, co1 - co0, lanes):
                            _vtranspose(tile, (i0 + q0) * block + k0, block, tile, transposed)
                            for k in range(k0, min(k0 + lanes, co1 - co0)):
                                co = co0 + k
                                o = ((b * c_O + co) * h_O + oy) * w_O + ox + q0
                                add = bias[co, 0, 0] if has_bias else 0
                                row = _vload(tile, transposed + (k - k0) * lanes)
                                _vstore_first(out_flat, o, _vadd_scalar(row, add), count)
                i0 += stretch
                ox += stretch
                if merged and ox == w_Q:
                    ox = 0
                    oy += 1
                    if oy == h_P:
                        oy = 0
                        b += 1


@functools.lru_cache(maxsize=256)  # per geometry: computed once, not per call
def _tap_offsets(geom, h_P, w_Q, rows_first):
    """Offset in the packed input of each tap (c, u, v) of one group, in the order of
    :func:`_pack_weights`: (c, u, v), or (u, c, v) if ``rows_first``."""
    s_W = geom.stride_w
    channel_stride = geom.batch * h_P * s_W * w_Q
    c = np.arange(geom.in_channels_per_group).reshape(-1, 1, 1)
    u = np.arange(geom.kernel_height).reshape(1, -1, 1)
    v = np.arange(geom.kernel_width).reshape(1, 1, -1)
    col = v * geom.dilation_w
    offsets = (c * channel_stride + (u * geom.dilation_h) * s_W * w_Q
               + (col % s_W) * w_Q + col // s_W)
    if rows_first:
        offsets = offsets.transpose(1, 0, 2)
    return np.ascontiguousarray(offsets.reshape(-1), dtype=np.int64)


class _Conv2dLayout(NamedTuple):
    """Sizes of the shared kernel's repacked buffers for one geometry (see conv2d_forward)."""

    variant: int          # index of the register block in _ALL_BLOCKS
    pixels: int           # output pixels per register block
    block_step: int       # tile elements between consecutive pixel blocks of a run
    row_step: int         # tile elements between the rows of a register block
    merged: bool          # stride-1 layout whose rows and images share their padding
    crop: bool            # by rows, taps kernel row first, each row's in-input rows only
    h_P: int
    w_Q: int
    packed_size: int      # elements of the padded, phase-split input
    slack: int            # zero elements after it
    block: int            # output channels per register block
    tap_chunk: int        # taps per pass over a run (their weights fit in L1)
    blocks_per_group: int
    n_taps: int
    tile: int             # per-thread scratch elements


@functools.lru_cache(maxsize=None)
def _largest_blocks(lanes):
    """Most pixels of any register block, and the elements of a thread's tile: the most of
    any block's tile of a run, then the rows that the scatter's last transposed block reads
    past a pixel-major run (``lanes`` rows of at most ``2 * lanes`` channels), then the
    ``lanes x lanes`` transposed block itself."""
    return (max(blk.pixels(lanes) for blk in _ALL_BLOCKS),
            _RUN_BLOCKS * max(blk.pixels(lanes) * blk.channels(lanes)
                              for blk in _ALL_BLOCKS)
            + lanes * max(blk.channels(lanes) for blk in _ALL_BLOCKS) + lanes * lanes)


@functools.lru_cache(maxsize=256)  # per geometry: computed once, not per call
def _conv2d_layout(geom, itemsize):
    s_H, s_W = geom.stride_h, geom.stride_w
    kernel = choose_cpu_kernel(geom)
    merged = kernel.merged
    reg = _BLOCK_BY_NAME[kernel.vector] if merged else _row_block(geom, kernel.vector)
    lanes = _VECTOR_BYTES // itemsize
    pixel_block, tile = _largest_blocks(lanes)
    if merged:
        # Stride 1: one zero column between neighbouring rows serves as the right padding of
        # one and the left padding of the next (likewise rows between images), so fewer
        # virtual pixels fall in the padding: 8 x 8 instead of 9 x 9 for a 7 x 7 map.
        # Reads past the end of a row (image) land in the next one's left (top) padding.
        h_P = max(geom.in_height + max(geom.pad_top, geom.pad_bottom), geom.out_height)
        w_Q = max(geom.in_width + max(geom.pad_left, geom.pad_right), geom.out_width)
        slack = (max(geom.pad_top, geom.pad_bottom) + 1) * w_Q + pixel_block
    else:
        # Padded rows and phase columns that any output pixel reads.
        h_P = (geom.out_height - 1) * s_H + (geom.kernel_height - 1) * geom.dilation_h + 1
        w_needed = (geom.out_width - 1) * s_W + (geom.kernel_width - 1) * geom.dilation_w + 1
        w_Q = -(-w_needed // s_W)
        # The kernels compute whole pixel blocks: past the last pixel they read (and drop)
        # less than a pixel block beyond the packed input.
        slack = pixel_block
    packed_size = geom.in_channels * geom.batch * h_P * s_W * w_Q
    n_taps = geom.in_channels_per_group * geom.kernel_height * geom.kernel_width
    if reg.vectors_of == "pixels":
        # Even blocks of at most reg.rows channels: 10 channels as 2 x 5, not 6 + 4.
        c_Og = geom.out_channels_per_group
        block = -(-c_Og // -(-c_Og // reg.channels(lanes)))
    else:
        block = reg.channels(lanes)
    blocks_per_group = -(-geom.out_channels_per_group // block)
    px = reg.pixels(lanes)
    if reg.vectors_of == "pixels":
        # channel-major over the whole run: tile[k * run_len + i], rows are channels
        block_step, row_step = px, _RUN_BLOCKS * px
    else:
        # pixel-major: tile[i * block + k], rows are pixels
        block_step, row_step = px * block, block
    tap_chunk = max(1, _TAP_CHUNK_BYTES // (block * itemsize))
    return _Conv2dLayout(_VARIANT[reg.name], px, block_step, row_step, merged,
                         _crops_rows(geom, merged), h_P, w_Q,
                         packed_size, slack, block, tap_chunk, blocks_per_group, n_taps, tile)


_SMALL_SCRATCH = 1 << 16  # array headers, the bias placeholder, index temporaries


def conv2d_scratch_bytes(geom, itemsize):
    """Bytes of scratch :func:`conv2d_forward` allocates beyond its output (the public layer
    checks them against free memory before the call): the padded input, the repacked
    weights and one tile of accumulators per thread."""
    layout = _conv2d_layout(geom, itemsize)
    weights = layout.blocks_per_group * geom.groups * layout.n_taps * layout.block
    tap_offsets = 4 * layout.n_taps * 8  # the int64 offsets and their temporaries
    return ((layout.packed_size + layout.slack + weights
             + _threads.count() * layout.tile) * itemsize + tap_offsets + _SMALL_SCRATCH)


def conv2d_forward(x, weight, bias, has_bias, out, geom):
    """Shared-weight convolution into ``out`` (all arrays C-contiguous, one dtype).

    Repacks the input (zero-padded, phase-split, plus a little zero slack) and the weights
    (blocks of output channels) inside the call; :func:`scratch_bytes` says how much memory
    that takes (about the padded input's size).
    """
    layout = _conv2d_layout(geom, x.dtype.itemsize)
    merged, block = layout.merged, layout.block
    h_P, w_Q, s_H, s_W = layout.h_P, layout.w_Q, geom.stride_h, geom.stride_w
    packed_size = layout.packed_size
    xf = np.empty(packed_size + layout.slack, dtype=x.dtype)
    xf[packed_size:] = 0
    xp = xf[:packed_size].reshape(geom.in_channels, geom.batch, h_P, s_W, w_Q)
    _pack_input(x, xp, geom.pad_top, geom.pad_left, s_W)
    tap_off = _tap_offsets(geom, h_P, w_Q, layout.crop)
    wq = np.empty((layout.blocks_per_group * geom.groups, layout.n_taps, block), dtype=x.dtype)
    _pack_weights(weight, wq, geom.out_channels_per_group, layout.crop)
    tiles = np.empty((_threads.count(), layout.tile), dtype=x.dtype)
    _conv2d_kernel(xf, tap_off, wq.reshape(-1), layout.variant, layout.pixels, block,
                   layout.block_step, layout.row_step, layout.tap_chunk, bias, has_bias, out,
                   tiles, geom.groups, geom.in_channels_per_group, h_P, s_H, s_W, w_Q, merged,
                   layout.crop, geom.kernel_height, geom.dilation_h, geom.pad_top,
                   geom.in_height)
    return out

