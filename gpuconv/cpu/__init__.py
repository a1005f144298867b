"""The CPU kernels (Numba ``@njit``): one module per operation, one entry point each.

The kernels are bare: they trust their caller (:mod:`gpuconv.conv`) for shapes, dtypes
and contiguity. Arguments use the notation of :mod:`gpuconv.geometry`; ``bias`` is always
a 3-D array ``(c_O, bh, bw)`` with ``(bh, bw)`` either ``(1, 1)`` (one bias per output map)
or ``(h_O, w_O)`` (one per output position), and ``has_bias`` says whether to add it.

Design (direct convolution, after Zhang, Franchetti & Low, ICML 2018, and Georganas et al.,
SC18): no im2col matrix is built.

* ``conv2d`` (:mod:`.conv2d`): the input is repacked once per call into a zero-padded, channel-major buffer
  ``(c_I, n, h_P, s_W, w_Q)`` whose last axis holds every ``s_W``-th column (one "phase" per
  column offset), so that every kernel tap ``(c, u, v)`` reads a *contiguous* run of input
  for a run of consecutive output pixels, whatever the stride, padding or dilation; the
  weights are repacked into blocks of output channels, tap-major. Output pixels are
  numbered along that padded grid ("virtual" pixels; with stride 1 the rows of all images
  form one run, so 7 x 7 maps still give long runs, and the few pixels that fall in the
  padding are computed and dropped; with one run per output row instead, a row skips the
  kernel rows that read only padding above or below). A job is (run of pixel blocks, block
  of output channels); the reduction runs in chunks of taps whose weights fit in L1, and the
  register block keeps 24 vector accumulators for the whole chunk:

  - ``cvec2`` / ``cvec1``: two (one) vectors of output channels x 12 (24) pixels; per tap,
    two (one) weight vectors are loaded and each input value is broadcast against them;
    ``cvec1`` by rows takes blocks of 21, 24, 25 or 28 pixels, whichever fits the row best;
  - ``pvec`` (few output channels, e.g. the seed's 5 or 10): 6 output channels x 4 vectors
    of consecutive pixels; per tap, four input vectors are loaded and each weight broadcast.

  :func:`choose_cpu_kernel` names the variant. Fused multiply-adds on explicit vectors
  (:mod:`gpuconv.cpu.simd`) keep the accumulators in registers, which Numba's loop
  vectoriser cannot do across a reduction loop; the output dimension is the vector
  dimension, so the summation order over taps is the plain sequential one.
* ``local_conv2d`` (:mod:`.local_conv2d`): each output position is a small matrix product over the batch; the
  kernel walks the (huge) weight array exactly once, in its natural order (four output
  channels, i.e. four streams, at a time), and applies each weight to a vector of batch
  elements of a small per-thread window of the input (batch innermost). It runs at the speed
  of streaming the weights from memory.

* ``tiled_conv2d`` (:mod:`.tiled_conv2d`): kernel slots shared by the output positions; at
  one slot the conv2d kernels, at one per position the local_conv2d kernels, between them
  the local_conv2d forward and input gradient reading each position's slot (slot maps, a
  Numba specialisation of their own); the weight gradient one conv2d weight gradient per
  slot (a few slots) or the local one summed into slots.

Gradients (:mod:`.conv2d_grad`, :mod:`.local_conv2d_grad`; designs in their docstrings), same
rules, no float atomics, the same bits on every call and for every thread count:

* ``conv2d`` input gradient: one stride-1 forward convolution (:func:`conv2d_forward`) of the
  output gradient per stride phase, with the flipped, channel-transposed sub-kernel of the
  taps that reach that phase; weight gradient: pixel-vector dot products (4 output channels x
  6 taps of vector accumulators) over the forward's padded, phase-split input, in runs of
  one image or of all images (stride 1: whichever computes fewer pixels) or of one output
  row (strides), junk pixels zero in the output gradient and, where the input holds an Inf or
  NaN, masked off the input loads, per-part partial sums (the parts fixed by the geometry)
  added in order;
* ``local_conv2d`` input gradient: a gather over bands of input rows, the weights read in
  order, batch innermost; weight gradient: per-position batch sums written once, in order.

Parallelism: ``prange`` over one chunk per thread, jobs dealt cyclically, so both cores are
busy at batch 1; calls below a measured amount of work run on the caller's thread alone
(:mod:`.threads`); per-thread scratch is allocated by the caller (visible to ``tracemalloc``).
Compilation is cached on disk (``cache=True``): a later process reuses it.

Floating point: every multiply-add is one fused multiply-add (``llvm.fma``: one rounding
instead of two, never less accurate); nothing else is relaxed (no ``nnan``/``ninf``/
``reassoc``): NaN and Inf propagate exactly as IEEE arithmetic says, and the summation order
over taps is fixed. Vectors are 64 bytes (one AVX-512 register); on processors with narrower
registers LLVM splits them, so the same code is correct everywhere, only slower there.
"""

from .conv2d import choose_cpu_kernel, conv2d_forward, conv2d_scratch_bytes
from .conv2d_grad import (conv2d_input_grad, conv2d_input_grad_scratch_bytes,
                          conv2d_weight_grad, conv2d_weight_grad_scratch_bytes)
from .local_conv2d import local_conv2d_forward, local_conv2d_scratch_bytes
from .threads import SERIAL_FLOPS, on_caller_thread, runs_on_caller_thread
from .local_conv2d_grad import (local_conv2d_input_grad,
                                local_conv2d_input_grad_scratch_bytes,
                                local_conv2d_weight_grad,
                                local_conv2d_weight_grad_scratch_bytes)

from .jit import jit_functions

__all__ = ["SERIAL_FLOPS", "on_caller_thread", "runs_on_caller_thread", "jit_functions", "choose_cpu_kernel", "conv2d_forward", "conv2d_scratch_bytes", "local_conv2d_forward",
           "local_conv2d_scratch_bytes",
           "conv2d_input_grad", "conv2d_input_grad_scratch_bytes", "conv2d_weight_grad",
           "conv2d_weight_grad_scratch_bytes", "local_conv2d_input_grad",
           "local_conv2d_input_grad_scratch_bytes", "local_conv2d_weight_grad",
           "local_conv2d_weight_grad_scratch_bytes"]
