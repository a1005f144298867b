"""``gpuconv bench``: shared against unshared convolution, and both against their peers.

For each layer of a suite, both operations run on the same geometry — :func:`gpuconv.conv2d`
(shared weights) and :func:`gpuconv.local_conv2d` (a kernel per output position) — beside
what a user would pick instead: ``torch.nn.functional.conv2d`` and the ``unfold`` +
``einsum`` recipe when PyTorch is installed, NumPy im2col baselines otherwise (the report
says which ran, and why).

How the timing is done (the machines this runs on are noisy):

- the arrays are random, generated once per layer outside the timing; every implementation
  reads the same ones (bias: one per output channel);
- the first call of each implementation on each layer is timed on its own and reported as
  ``first_call_s``; ``first_call_in_process`` says whether it was the first call of that
  implementation in the process (so it includes JIT compilation, or loading it from Numba's
  disk cache — ``jit`` says which for gpuconv on the CPU);
- then implementations run in alternating bursts — untimed calls for at least
  :data:`.timing.WARMUP_S` (at least one), then ``repeat`` timed calls back to back — ``bursts``
  times round (A A A A, B B B B, ..., A A A A, ...);
- the median of all timed calls is reported with the quartiles, min and max, and every
  timed call in order (``times_s``); on a GPU each call is timed with CUDA events;
- GFLOP/s and GB/s (fewest bytes: inputs, weights and biases read once, output written once)
  are compared with ceilings measured in the same run.

The forward also times the dial between the two, :func:`gpuconv.tiled_conv2d` at a few tile
sizes (:data:`.suite.DIAL`: periodic 2 x 2 and blocks 4 x 4; ``--quick``: blocks 4 x 4):
records with ``"op": "tiled_conv2d"``, ``"tiles": [T_h, T_w]`` and ``"tiling"`` (``--no-dial``
leaves them out). No framework offers that operation: it has no peer, and the summary compares
each point with gpuconv's conv2d (parameters and paired times).

Three passes can be timed (``--pass``; :data:`gpuconv.bench.stats.PASSES`), each with its
own records (field ``pass``), table and summary:

- ``forward`` (the default): ``y = op(x, w) + b``;
- ``backward``: both gradients, ``dL/dx`` and ``dL/dw`` for a given ``dL/dy``
  (:mod:`gpuconv.grad`), against PyTorch's autograd backward of ``conv2d`` (oneDNN / cuDNN)
  and through ``unfold`` + ``einsum``: their forward runs once before the timing with its
  graph retained, and only the backward is timed;
- ``step``: one training step of a layer, forward and backward through autograd:
  ``gpuconv.torch.Conv2d`` against ``torch.nn.Conv2d``, ``gpuconv.torch.LocallyConnected2d``
  against PyTorch-only locally connected layers (``unfold`` + ``einsum``, ``unfold`` +
  ``bmm`` over the positions). It needs PyTorch.

The command also reports what a call costs beyond its kernel on tiny shapes, gpuconv beside
PyTorch's conv2d (:mod:`gpuconv.bench.percall`; ``machine["per_call"]`` in the JSON), and
flags a run whose load average exceeded the core count (``machine["overloaded"]`` and a
warning line): its times then include waits for a core, not only the kernels.

Every comparison is printed as a speedup, one implementation's time over the time of the
one it is compared with: ``peer time / gpuconv time`` (above 1: gpuconv is faster), and,
for what sharing buys, ``local_conv2d time / conv2d time`` (above 1: the shared layer is
faster), the latter as the median and quartiles of the ratios of paired calls (call ``i``
of each, which ran in the same round of bursts).

The modules: :mod:`.suite` (what is computed: the suites, the passes, the records; the layers
are :mod:`gpuconv.workloads`'), :mod:`.timing` (how: the operands, the bursts,
:func:`run_benchmark`), :mod:`.report` (the table, the speedups, the summary),
:mod:`.command` (the arguments and :func:`run`, the command); the numbers in :mod:`.stats`,
the implementations and timers in :mod:`.peers`, the per-call costs in :mod:`.percall`, the
PNG in :mod:`.plot`. This package names the public pieces of them; importing it imports
neither PyTorch nor matplotlib.
"""

from . import peers, percall, stats  # noqa: F401  (the implementations, per call, numbers)
from .command import add_arguments, run
from .report import (backward_memory, dial_speedups, format_report, format_summary,
                     format_table, local_bandwidth, peer_speedups, sharing_speedups)
from .stats import PASSES, min_bytes, param_count
from .suite import (DIAL, DTYPES, LAYERS, PASS_CHOICES, QUICK_LAYERS, SUITES, Layer,
                    layer_names, make_record, resolve_passes)
from .timing import one_core, run_benchmark

__all__ = ["Layer", "LAYERS", "SUITES", "QUICK_LAYERS", "PASSES", "PASS_CHOICES",
           "add_arguments", "run", "run_benchmark", "make_record", "format_report",
           "format_table", "format_summary", "peer_speedups", "sharing_speedups",
           "dial_speedups", "DIAL",
           "local_bandwidth", "backward_memory", "param_count", "min_bytes", "layer_names",
           "one_core", "resolve_passes", "DTYPES"]
