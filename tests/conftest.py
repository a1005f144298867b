"""Shared fixtures: one test body runs on every device that is present.

- ``cpu`` always;
- ``cuda`` when ``numba.cuda`` can launch kernels: on a real GPU, or in the CUDA simulator
  (``NUMBA_ENABLE_CUDASIM=1`` set before the test process starts), where sizes must stay
  tiny. ``cuda`` cases carry the ``cuda`` marker so ``-m cuda`` selects exactly them.
"""

import os
import sys

import pytest

from gpuconv.device import cuda_available

SIMULATOR = os.environ.get("NUMBA_ENABLE_CUDASIM") == "1"
if SIMULATOR:
    # The simulator runs each GPU thread as a Python thread and its barriers wait for all
    # of them to take the interpreter in turn: a shorter switch interval than the default
    # 5 ms halves the time of a kernel with barriers (tests only; results are the same).
    sys.setswitchinterval(5e-4)


def _devices():
    params = [pytest.param("cpu", id="cpu")]
    if cuda_available():
        params.append(pytest.param("cuda", id="cuda", marks=pytest.mark.cuda))
    return params


@pytest.fixture(params=_devices())
def device(request):
    """Each device present: ``"cpu"`` always, ``"cuda"`` on a GPU or in the simulator."""
    return request.param


@pytest.fixture(autouse=True)
def _no_device_env(monkeypatch):
    """Tests choose the device explicitly; a GPUCONV_DEVICE in the caller's shell must not leak in."""
    monkeypatch.delenv("GPUCONV_DEVICE", raising=False)


# Property-test profiles: "ci" (default) keeps the suite fast; "long" is the on-demand fuzzing
# run: HYPOTHESIS_PROFILE=long python -m pytest tests/test_properties.py
try:
    from hypothesis import HealthCheck, settings

    settings.register_profile("ci", max_examples=40, deadline=None,
                              suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
    settings.register_profile("long", max_examples=2000, deadline=None,
                              suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
    settings.register_profile("sim", max_examples=8, deadline=None,
                              suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
    settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "sim" if SIMULATOR else "ci"))
except ImportError:  # hypothesis is in the test extra; without it the property tests skip
    pass


@pytest.fixture
def poisoned_outputs(monkeypatch):
    """Host outputs start as NaN, so an element the kernel forgets to write shows up."""
    import numpy as np

    from gpuconv import conv as _conv

    monkeypatch.setattr(_conv, "_empty_output", lambda shape, dtype: np.full(shape, np.nan, dtype))
