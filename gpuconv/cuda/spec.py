"""What every CUDA kernel module shares: the kernel spec, dtype codes, limits and helpers.

The kernel modules (:mod:`gpuconv.cuda.kernels`, the forward factories and the choice of
kernel per geometry; :mod:`gpuconv.cuda.grad_kernels`; :mod:`gpuconv.cuda.conv2d_gemm`;
:mod:`gpuconv.cuda.conv2d_gemm_grad`; :mod:`gpuconv.cuda.local_gemm`;
:mod:`gpuconv.cuda.local_grad_gemm`; :mod:`gpuconv.cuda.local_grad_positions`;
:mod:`gpuconv.cuda.local_stream`) build on this one
and on nothing of each other's below them: ``kernels`` chooses among them, so it imports the
others, never the other way round (the choice between the two kernels of each gradient is
made in :mod:`gpuconv.cuda.launch`).

A factory returns a :class:`KernelSpec`: the bare Python function, its Numba signature, its
name and launch bounds; :func:`compiled` turns a spec into a launchable kernel
(:mod:`gpuconv.cuda.fastlaunch` launches it).
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import numpy as np
from numba import cuda, float32, float64, types, uint64
from numba.types import float16

from ..device import simulator_enabled
from .fastlaunch import FastKernel
from .simulator import install as _install_simulator_fix

__all__ = ["KernelSpec", "compiled", "dtype_code", "compute_code", "CODES", "check_grid",
           "pick_gemm_tile", "gemm_chunk", "gemm_pitch", "GEMM_SMS", "GRID_YZ_LIMIT", "SHARED_BUDGET_BYTES", "SHARED_LIMIT_BYTES", "LOCAL_STAGE_BYTES"]

# Under Numba's CUDA simulator, its shared arrays allocated under a lock (every kernel
# module imports this one; nothing happens on a GPU): see :mod:`.simulator`.
_install_simulator_fix()

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


_CODE = {dtype: code for code, dtype in _NUMPY.items()}


def dtype_code(dtype):
    """``"f16"``, ``"f32"`` or ``"f64"`` for a NumPy dtype (KeyError for any other)."""
    return _CODE[np.dtype(dtype)]


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
    #: a tile GEMM's shared reads: words a thread reads at once along M and N (gemm_chunk)
    shared_vectors: tuple = (1, 1)

    def __hash__(self):
        # The name encodes the specialisation; hashing the signature's Numba types (a
        # Python method each) took microseconds on every launch's look-up of its kernel.
        # Equal specs have equal names, and equality still compares every field.
        return hash(self.name)


def _array(code, ndim):
    return types.Array(_SCALAR[code], ndim, "C")


def _rename(func, name):
    func.__name__ = name
    func.__qualname__ = name
    return func


@functools.lru_cache(maxsize=None)
def compiled(spec):
    """The launchable kernel of ``spec``, launched as Numba's ``kernel[grid, block, stream,
    shared](*args)``: on a GPU a :class:`~gpuconv.cuda.fastlaunch.FastKernel` (the
    dispatcher's argument marshalling done once per launch shape), in the simulator Numba's
    dispatcher itself. Compiled for the current GPU on first use."""
    if simulator_enabled():  # the simulator has no launch bounds and no driver to launch on
        return cuda.jit(spec.signature)(spec.pyfunc)
    if spec.launch_bounds is None:
        dispatcher = cuda.jit(spec.signature)(spec.pyfunc)
    else:
        try:
            dispatcher = cuda.jit(spec.signature, launch_bounds=spec.launch_bounds)(spec.pyfunc)
        except TypeError:  # a numba-cuda without launch bounds: same code, registers uncapped
            dispatcher = cuda.jit(spec.signature)(spec.pyfunc)
    return FastKernel(dispatcher, spec.signature, spec.name)


def _bank_wavefronts(addresses):
    """Shared-memory wavefronts of one warp's access to these word addresses: the most
    distinct words that fall in one of the 32 banks (equal words are one broadcast)."""
    return _bank_wavefronts_each(np.zeros(len(addresses), np.int64), addresses)


def _bank_wavefronts_each(instructions, addresses, words=1):
    """:func:`_bank_wavefronts` of many warp instructions at once, summed: the accesses
    (instruction, value address), ``words`` 32-bit words a value."""
    instructions = np.repeat(np.asarray(instructions, np.int64), words)
    if instructions.size == 0:
        return 0
    w = (np.asarray(addresses, np.int64)[:, None] * words + np.arange(words)).ravel()
    span = int(w.max()) + 1
    pairs = np.unique(instructions * span + w)  # distinct words of each instruction
    instr, word = np.divmod(pairs, span)
    banks, counts = np.unique(instr * 32 + word % 32, return_counts=True)
    most = np.zeros(int(instr.max()) + 1 - int(instr.min()), np.int64)
    np.maximum.at(most, banks // 32 - int(instr.min()), counts)
    return int(most.sum())


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
#: CUDA's limit on a block's z dimension (x and y allow 1024), every GPU.
BLOCK_Z_LIMIT = 64


def check_grid(grid, what):
    """Refuse a launch whose grid exceeds CUDA's limits, with a clear error."""
    if grid[0] > 2**31 - 1 or any(g > GRID_YZ_LIMIT for g in grid[1:]):
        raise ValueError(
            f"{what} would need a CUDA grid of {tuple(grid)} blocks, beyond CUDA's limits "
            f"(x < 2**31, y and z <= {GRID_YZ_LIMIT}); use device='cpu' or split the layer "
            "(e.g. over its output channels)")
    return grid


#: The GPU the implicit GEMMs' tile choice is tuned for: an H100/H200 has 132 SMs.
GEMM_SMS = 132


def pick_gemm_tile(tiles, m_total, n_total, groups, extra=1, fill=1.0):
    """The tile of an implicit GEMM (conv2d's forward and gradients) for a product of
    ``m_total x n_total`` per group (``extra``: further grid factors, the input gradient's
    phases). ``tiles`` are ``(tile_m, tile_n, tile_k, thread_m, thread_n, blocks_per_sm)``:
    the narrowest tile width along ``N`` that covers ``n_total`` (the widest if none does);
    among the tiles of that width, in their order (largest first), the first whose grid
    fills at least ``fill`` of the GPU's first wave (:data:`GEMM_SMS` x its blocks per SM),
    else the one with the most blocks."""
    widths = sorted({t[1] for t in tiles})
    width = next((w for w in widths if w >= n_total), widths[-1])
    best = None
    for tile in (t for t in tiles if t[1] == width):
        blocks = -(-m_total // tile[0]) * groups * -(-n_total // tile[1]) * extra
        if blocks >= fill * GEMM_SMS * tile[5]:
            return tile
        if best is None or blocks > best[0]:
            best = (blocks, tile)
    return best[1]


def gemm_pitch(rows, tile_k, vec=1):
    """Shared row pitch ``>= rows`` of a tile GEMM's staged chunk (the per-position GEMMs
    of :mod:`gpuconv.cuda.local_gemm` and :mod:`gpuconv.cuda.local_grad_positions`), with
    ``pitch = 32 / tile_k (mod 32)``: a warp's stores of ``tile_k`` consecutive terms x
    ``32 / tile_k`` rows hit 32 different banks. A tile read
    in runs (``vec > 1``) needs a pitch that is a multiple of 4 words: ``4 (mod 32)``, whose
    stores of up to 16 terms conflict two ways at worst (the terms 8 apart share a bank)."""
    want = 4 if vec > 1 else 32 // tile_k if tile_k <= 32 else 1
    return rows + (want - rows) % 32


#: Byte alignment of the shared tiles of the GEMMs that read vectors (:func:`gemm_chunk`):
#: LLVM merges a thread's consecutive shared words into one 64- or 128-bit load only where
#: it can prove the alignment. None in the simulator, which takes no alignment.
SHARED_VECTOR_ALIGN = None if simulator_enabled() else 16


def gemm_vector(count):
    """Words a thread reads at once from a shared tile when it holds ``count`` consecutive
    rows (or columns) in runs: 4 (a 128-bit load), 2 or 1."""
    return 4 if count % 4 == 0 else 2 if count % 2 == 0 else 1


def gemm_runs(thread_m, thread_n, threads, blocks_per_sm):
    """``(VA, VB)``: the runs (:func:`gemm_vector`) a tile GEMM's threads read their
    ``thread_m`` rows and ``thread_n`` columns in. A run lands in an aligned group of
    registers: a kernel held to 64 registers a thread by its launch bounds spills with runs
    of any width (ptxas, sm_80 and sm_90), so it reads words, ``(1, 1)``."""
    if 65536 // (threads * blocks_per_sm) <= 64:
        return 1, 1
    return gemm_vector(thread_m), gemm_vector(thread_n)


def fragment_row(thread, i, threads, vec):
    """The row (or column) of a block's tile that holds the ``i``-th of a thread's outputs
    along it: runs of ``vec`` consecutive rows, the thread's runs ``threads * vec`` apart
    (``vec = 1``: every row ``threads`` apart). :func:`gemm_chunk` reads the shared tiles
    and the kernels store their outputs by this one rule (:data:`gemm_fragment`, the same
    function compiled for the kernels)."""
    return thread * vec + (i % vec) + (i // vec) * threads * vec


gemm_fragment = cuda.jit(device=True, inline="always")(fragment_row)


def gemm_chunk(thread_m, thread_n, m_step, n_step, tile_k, a_pitch, b_pitch, a_vec=1,
               b_vec=1):
    """The multiply of one staged chunk in the implicit GEMMs (conv2d's forward and
    gradients, local_conv2d's per-position forward), as an inlined device function
    ``chunk(a_s, b_s, a_row, b_row, a_frag, b_frag, acc)``. Each of its ``tile_k`` k steps
    reads ``thread_m`` words of ``a_s`` from ``a_row + k * a_pitch`` and ``thread_n`` of
    ``b_s`` from ``b_row + k * b_pitch`` into registers, then makes ``thread_m * thread_n``
    FMAs into ``acc`` (row-major). The words are taken in runs of ``a_vec`` (``b_vec``)
    consecutive ones, the runs ``m_step * a_vec`` (``n_step * b_vec``) apart
    (:func:`gemm_fragment`; ``a_row`` is then the thread's first row of the k step, ``tile
    base + thread * a_vec``): with a run of 4 and a tile aligned to 16 bytes
    (:data:`SHARED_VECTOR_ALIGN`) and pitches a multiple of 4 words, each run is one
    128-bit shared load instead of four. The steps are written out four a trip (LLVM does
    not unroll a loop this long)."""
    TM, TN, MT, NSTEP, BK, AP, BP = (thread_m, thread_n, m_step, n_step, tile_k, a_pitch,
                                     b_pitch)
    VA, VB = a_vec, b_vec
    if BK % 4:
        raise ValueError(f"tile_k must be a multiple of 4, got {BK}")
    if TM % VA or TN % VB or (VA > 1 and AP % VA) or (VB > 1 and BP % VB):
        raise ValueError(f"runs of {VA} x {VB} words do not divide {TM} x {TN} outputs a "
                         f"thread, or pitches {AP} x {BP}")

    @cuda.jit(device=True, inline="always")
    def mac(a_s, b_s, a_row, b_row, a_frag, b_frag, acc):
        for i in range(TM):
            a_frag[i] = a_s[uint64(a_row + (i % VA) + (i // VA) * MT * VA)]
        for j in range(TN):
            b_frag[j] = b_s[uint64(b_row + (j % VB) + (j // VB) * NSTEP * VB)]
        for i in range(TM):
            for j in range(TN):
                acc[i * TN + j] += a_frag[i] * b_frag[j]

    @cuda.jit(device=True, inline="always")
    def chunk(a_s, b_s, a_row, b_row, a_frag, b_frag, acc):
        for k in range(0, BK, 4):
            mac(a_s, b_s, a_row + k * AP, b_row + k * BP, a_frag, b_frag, acc)
            mac(a_s, b_s, a_row + (k + 1) * AP, b_row + (k + 1) * BP, a_frag, b_frag, acc)
            mac(a_s, b_s, a_row + (k + 2) * AP, b_row + (k + 2) * BP, a_frag, b_frag, acc)
            mac(a_s, b_s, a_row + (k + 3) * AP, b_row + (k + 3) * BP, a_frag, b_frag, acc)
    return chunk


# Shared memory the local_conv2d gradient kernels stage at a time (see grad_kernels).
LOCAL_STAGE_BYTES = 16 * 1024
