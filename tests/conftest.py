"""Shared fixtures: one test body runs on every device that is present.

- ``cpu`` always;
- ``cuda`` when ``numba.cuda`` can launch kernels: on a real GPU, or in the CUDA simulator
  (``NUMBA_ENABLE_CUDASIM=1`` set before the test process starts), where sizes must stay
  tiny. ``cuda`` cases carry the ``cuda`` marker so ``-m cuda`` selects exactly them.
"""

import os

import pytest

from gpuconv._device import cuda_available

SIMULATOR = os.environ.get("NUMBA_ENABLE_CUDASIM") == "1"


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
