"""The forward kernel chosen by measurement, on request (:func:`gpuconv.set_autotune`).

The dispatcher picks conv2d's and local_conv2d's forward kernel from the geometry alone
(:func:`gpuconv.cuda.kernels.conv2d_config`, :func:`~gpuconv.cuda.kernels.local_conv2d_forward_config`),
by rules drawn from a performance model that a GPU run calibrates. With autotuning on, the
first call of each key ``(operation, geometry, dtype, GPU)`` on device arrays runs every
kernel the dispatcher weighs (:func:`~gpuconv.cuda.kernels.forward_candidates`) on the
call's own arrays and stream, times each (CUDA events; the median of a few launches after
one untimed launch that compiles it), and that call and every later one with the key run
the fastest. The same idea as cuDNN's benchmark mode, with the same costs:

- the first call of a key synchronises its stream and pays the candidates' compilation
  (seconds) and a few launches of each; later calls pay one dictionary look-up;
- two processes may pick different kernels for one key, and different kernels round
  differently (each within the dtype's tolerance of the exact result): with autotuning on,
  the forward is bitwise reproducible within a process, not across processes. The
  gradients are never tuned;
- a candidate that needs more device scratch than the dispatcher's pick is not tried, so
  the call's memory check (made for the pick) still bounds what it allocates; a candidate
  that fails to compile or launch is left out, and the pick's own failure is raised.

Calls on host (NumPy) arrays, whose copies dominate, are not tuned. :func:`choices` lists
what was picked, :func:`forget` clears it.
"""

from __future__ import annotations

import statistics
import threading
import time

from numba import cuda

from ..device import simulator_enabled
from . import kernels

__all__ = ["TUNED_OPS", "tuned_config", "choices", "forget", "generation", "eligible"]

#: The operations whose forward kernel is chosen by measurement when autotuning is on.
TUNED_OPS = ("conv2d", "local_conv2d")
#: Timed launches per candidate (after one untimed launch), their median taken.
REPEATS = 3

# (op name, geometry, dtype name, GPU ordinal) -> the configuration that won
_CHOICES = {}
_LOCK = threading.Lock()
# bumped by forget(): the calls' cached plans keep a choice only of the current generation
_GENERATION = [0]


def choices():
    """``{(op name, geometry, dtype name, GPU ordinal): kernel name}``: what was picked."""
    with _LOCK:
        return {key: config.kernel.name for key, config in _CHOICES.items()}


def forget():
    """Forget every choice: the next call of each key measures again."""
    with _LOCK:
        _CHOICES.clear()
        _GENERATION[0] += 1


def generation():
    """A number that :func:`forget` changes: what a caller kept of a choice is stale once
    it differs."""
    return _GENERATION[0]


def eligible(configs, picked, geom, dtype, scratch):
    """The ``configs`` worth timing: those that need no more device scratch
    (``scratch(config, geom, dtype)``, in elements) than the dispatcher's ``picked``."""
    budget = scratch(picked, geom, dtype)
    return [c for c in configs if c == picked or scratch(c, geom, dtype) <= budget]


def _elapsed_ms(run, stream):
    """Milliseconds of the work ``run()`` queues on ``stream``: CUDA events on a GPU, the
    host's clock in the simulator (which runs a launch to its end before returning)."""
    if simulator_enabled():
        start = time.perf_counter()
        run()
        return 1e3 * (time.perf_counter() - start)
    start, end = cuda.event(), cuda.event()
    start.record(stream)
    run()
    end.record(stream)
    end.synchronize()
    return cuda.event_elapsed_time(start, end)


def _measure(run, stream):
    """The median time of :data:`REPEATS` launches of ``run`` after an untimed one."""
    run()  # compiles the kernel and warms its caches
    return statistics.median(_elapsed_ms(run, stream) for _ in range(REPEATS))


def tuned_config(op_name, launch, arrays, out, geom, stream, empty, device, picked,
                 scratch, measure=None):
    """The forward configuration of ``op_name`` for this key: the one measured fastest
    before, else measured now on these arrays (``launch(*arrays, out, geom, stream,
    empty=..., config=...)`` writes ``out``; the caller then launches the winner again).

    ``picked`` is the dispatcher's configuration, ``scratch(config, geom, dtype)`` the
    device scratch a configuration allocates, ``measure(run, stream)`` the timer (milliseconds;
    tests replace it)."""
    dtype = out.dtype
    key = (op_name, geom, dtype.name, device)
    with _LOCK:
        config = _CHOICES.get(key)
    if config is not None:
        return config
    measure = measure or _measure
    candidates = eligible(kernels.forward_candidates(op_name, geom, dtype), picked, geom,
                          dtype, scratch)
    if picked not in candidates:  # the dispatcher's choice is always tried
        candidates.insert(0, picked)
    timed = []
    for config in candidates:
        def run(config=config):
            launch(*arrays, out, geom, stream, empty=empty, config=config)
        try:
            timed.append((measure(run, stream), config))
        except Exception:
            if config == picked:  # the dispatcher's own choice must work
                raise
    best = min(timed, key=lambda t: t[0])[1]
    with _LOCK:
        return _CHOICES.setdefault(key, best)
