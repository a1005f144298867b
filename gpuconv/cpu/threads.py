"""How many threads a CPU call uses: all of Numba's, or only the caller's for small work.

Opening a parallel region costs little on an idle machine (a few microseconds), but the
calling thread then waits for every thread of the region: on a busy machine, where another
process holds a core, that wait is a scheduler time slice (milliseconds) for work that takes
microseconds. A call whose work is below the measured crossover (:data:`SERIAL_FLOPS`, see
``BENCHMARKS.md``, "Threads by work size") therefore runs its kernels with one thread, on
the caller's thread: Numba's thread count is set to 1 around the call (it is per calling
thread), the kernels size their per-thread scratch by it, and the parallel regions open
with a team of one, which starts no other thread. The kernels give the same bits for every
thread count, so this changes only the time.
"""

from __future__ import annotations

import numba

__all__ = ["SERIAL_FLOPS", "runs_on_caller_thread", "on_caller_thread", "count"]

#: Work (FLOPs of the forward, which every gradient matches) below which a call runs on the
#: caller's thread alone, per family (an operation and its two gradients).
#: ``python scripts/percall.py --crossover`` measures where two threads start to beat one:
#: on the 2-core benchmark machine about 4-7 MFLOP for conv2d (its kernels are fast per FLOP,
#: so a parallel region pays off late) and about 20-40 kFLOP for local_conv2d (BENCHMARKS.md,
#: "Threads by work size").
SERIAL_FLOPS = {"conv2d": 5_000_000, "local_conv2d": 20_000}


def runs_on_caller_thread(op_name, geom):
    """Whether a call of ``op_name`` (any of its gradients too) on ``geom`` is small enough to
    run on the caller's thread alone."""
    family = "local_conv2d" if op_name.startswith("local_conv2d") else "conv2d"
    if op_name.startswith("tiled_conv2d") and not geom.shared:  # on the unshared kernels
        family = "local_conv2d"
    return geom.flops < SERIAL_FLOPS[family]


def _fast_calls():
    """Numba's getter and setter of the calling thread's thread count. The public
    ``numba.get_num_threads``/``set_num_threads`` check that the threads were launched (a
    lock) and the value on every call; after one public call, which launches the threads,
    Numba's own functions behind them are used directly when this Numba has them."""
    numba.get_num_threads()
    from numba.np.ufunc import parallel

    get, put = getattr(parallel, "_get_num_threads", None), getattr(parallel, "_set_num_threads", None)
    if callable(get) and callable(put):
        return get, put
    return numba.get_num_threads, numba.set_num_threads  # pragma: no cover


_CALLS = []


def count():
    """Numba's thread count for the calling thread (``numba.get_num_threads()``, cheaper)."""
    if not _CALLS:
        _CALLS.extend(_fast_calls())
    return _CALLS[0]()


def on_caller_thread(kernel, *args):
    """``kernel(*args)`` with Numba's thread count set to 1 for the calling thread."""
    if not _CALLS:
        _CALLS.extend(_fast_calls())
    get, put = _CALLS
    threads = get()
    if threads == 1:
        return kernel(*args)
    put(1)
    try:
        return kernel(*args)
    finally:
        put(threads)
