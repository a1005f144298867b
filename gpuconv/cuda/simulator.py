"""Numba's CUDA simulator made safe for gpuconv's kernels (installed by :mod:`.spec`, which
every kernel module imports).

The simulator runs each thread of a block as a Python thread. Its ``cuda.shared.array``
looks up the block's array for the calling line and creates it when missing, in two steps
without a lock (numba-cuda 0.30.4): a thread switch between the look-up and the store lets
two threads of one block each create an array, and the one whose array is overwritten in the
table then works on a private copy of "shared" memory. Its partners read what it never
wrote, so a correct kernel returns wrong numbers, now and then (seen once in a dry run of the
GPU acceptance script: a streaming local_conv2d 0.8 off on a scale of 7; a thread switch
forced between the two steps makes every launch of a shared-memory kernel fail so).

:func:`install` replaces the method with one that does the look-up and the creation under a
lock, with the same semantics otherwise (one array per calling line and launch, whose
blocks the simulator runs one after another; dynamic shared memory unchanged). It does
nothing outside the simulator, and leaves numba-cuda's method in place if its internals are
not the ones described here.
"""

from __future__ import annotations

import sys
import threading

import numpy
from numba.core import types
from numba.np import numpy_support

from ..device import simulator_enabled

__all__ = ["install", "installed"]

_LOCK = threading.Lock()
_ORIGINAL = []


def installed():
    """True once :func:`install` has replaced the simulator's shared-array allocation."""
    return bool(_ORIGINAL)


def install():
    """Make the simulator's ``cuda.shared.array`` allocate atomically (idempotent; a no-op
    on a GPU and where numba-cuda's simulator has another shape). Returns :func:`installed`."""
    if _ORIGINAL or not simulator_enabled():
        return installed()
    try:
        from numba.cuda.simulator.kernelapi import FakeCUDAShared
    except ImportError:
        return False
    original = getattr(FakeCUDAShared, "array", None)
    if original is None:
        return False
    with _LOCK:
        if not _ORIGINAL:
            _ORIGINAL.append(original)
            FakeCUDAShared.array = _shared_array
    return True


def _shared_array(self, shape, dtype, alignment=None):
    allocations = getattr(self, "_allocations", None)
    if shape == 0 or alignment is not None or not isinstance(allocations, dict):
        # dynamic shared memory, the unsupported alignment, or another simulator: as before
        return _ORIGINAL[0](self, shape, dtype, alignment)
    if isinstance(dtype, types.Type):
        dtype = numpy_support.as_dtype(dtype)
    caller = sys._getframe(1)
    key = (caller.f_code.co_filename, caller.f_lineno)  # one array per calling line
    with _LOCK:
        array = allocations.get(key)
        if array is None:
            array = allocations[key] = numpy.empty(shape, dtype)
    return array
