"""Numba's CUDA simulator made safe for the kernels' threads (:mod:`gpuconv.cuda.simulator`).

The simulator creates a block's shared array on the first thread's call, in a look-up and a
store with no lock between them; a thread switch there gives one thread a private copy, and
a correct kernel wrong numbers. These tests force that switch (every allocation yields the
interpreter) and check that every thread of a block still sees one array: a small kernel of
their own, and gpuconv's streaming local_conv2d on the shape on which the race was seen,
against the float64 reference. Without the fix both fail on every run.

Only meaningful in the simulator (``tests/test_cuda_sim.py`` runs them there): on a GPU,
shared memory is the hardware's.
"""

import os
import time

import numpy as np
import pytest
from numba import cuda, float32

from gpuconv.device import cuda_available
from gpuconv.geometry import conv_geometry
from reference import TOLERANCE, local_conv2d_ref

SIMULATOR = os.environ.get("NUMBA_ENABLE_CUDASIM") == "1"
simulator_only = pytest.mark.skipif(not (SIMULATOR and cuda_available()),
                                    reason="the simulator's shared memory: run under "
                                    "NUMBA_ENABLE_CUDASIM=1 (tests/test_cuda_sim.py does)")


def _rotate(out):
    # (at module level: the simulator swaps the module's ``cuda`` for its own)
    tile = cuda.shared.array(32, float32)
    t = cuda.threadIdx.x
    tile[t] = float32(t + 1 + 100 * cuda.blockIdx.x)
    cuda.syncthreads()
    out[cuda.blockIdx.x * 32 + t] = tile[(t + 1) % 32]


@pytest.fixture
def switch_between_lookup_and_store(monkeypatch):
    """Every ``numpy.empty`` yields the interpreter to the other threads first: the thread
    switch the race needs, between the simulator's look-up and its store, on every call."""
    real = np.empty

    def yielding(*args, **kwargs):
        time.sleep(0.0005)
        return real(*args, **kwargs)

    monkeypatch.setattr(np, "empty", yielding)


def test_installed_by_the_kernel_modules_under_the_simulator_only():
    import importlib

    from gpuconv.cuda import simulator

    importlib.import_module("gpuconv.cuda.spec")  # every kernel module imports it
    assert simulator.installed() == (SIMULATOR and cuda_available())
    assert simulator.install() == simulator.installed()  # idempotent


@pytest.mark.cuda
@simulator_only
def test_every_thread_of_a_block_sees_one_shared_array(switch_between_lookup_and_store):
    import importlib

    from gpuconv.cuda import simulator

    importlib.import_module("gpuconv.cuda.spec")  # every kernel module imports it
    assert simulator.installed()
    rotate = cuda.jit(_rotate)
    out = cuda.to_device(np.zeros(64, np.float32))
    rotate[2, 32](out)
    got = out.copy_to_host().reshape(2, 32)
    expected = np.array([[(t + 1) % 32 + 1 + 100 * b for t in range(32)] for b in range(2)])
    np.testing.assert_array_equal(got, expected)


@pytest.mark.cuda
@simulator_only
def test_streaming_local_conv2d_with_a_switch_at_every_allocation(
        switch_between_lookup_and_store):
    """The acceptance script's dry-run shape on which the race was seen (2 images, groups
    of 2 channels and 1 map, stride 2): the butterfly's exchanges go through shared memory."""
    from gpuconv.cuda import launch, local_stream

    geom = conv_geometry((2, 4, 6, 6), (3, 3), 2, 2, 1, 1, 2)
    config = launch.local_conv2d_forward_config(geom, np.float32)
    assert isinstance(config, local_stream.LocalStreamConfig)
    rng = np.random.default_rng(7)
    x = rng.uniform(-1, 1, geom.input_shape)
    w = rng.uniform(-1, 1, geom.local_weight_shape())
    b = rng.uniform(-1, 1, geom.out_channels)
    out = cuda.to_device(np.full(geom.output_shape, np.nan, np.float32))
    launch.launch_local_conv2d(cuda.to_device(x.astype(np.float32)),
                               cuda.to_device(w.astype(np.float32)),
                               cuda.to_device(b.astype(np.float32)), out, geom,
                               cuda.default_stream(), config)
    kwargs = dict(stride=2, padding=1, groups=2)
    exact = local_conv2d_ref(x, w, b, **kwargs)
    scale = float(np.abs(local_conv2d_ref(abs(x), abs(w), abs(b), **kwargs)).max())
    err = float(np.abs(out.copy_to_host() - exact).max())
    assert err <= TOLERANCE[np.dtype(np.float32)] * scale, f"error {err:.3e} on {scale:.3e}"
