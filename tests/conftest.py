"""Shared fixtures: one test body runs on every device that is present.

- ``cpu`` always;
- ``cuda`` when ``numba.cuda`` can launch kernels: on a real GPU, or in the CUDA simulator
  (``NUMBA_ENABLE_CUDASIM=1`` set before the test process starts), where sizes must stay
  tiny. ``cuda`` cases carry the ``cuda`` marker so ``-m cuda`` selects exactly them.
"""

import collections
import os
import pathlib
import signal
import subprocess
import sys
import tempfile
import time

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


# --------------------------------------------------------------------------------------------
# The simulator run in the background
# --------------------------------------------------------------------------------------------
# Without a GPU, tests/test_cuda_sim.py runs every ``cuda`` test once more in a second pytest
# under Numba's CUDA simulator (which must be switched on before Numba is imported, hence a
# subprocess). It is the suite's longest test, about 20 minutes on a 2-core machine, and one
# Python process busy on one core. So it starts as soon as collection has finished and runs
# beside the rest of the suite; its test is moved to the end, where it waits for the result.
# It is started only when its test is selected and would not be skipped.

ROOT = pathlib.Path(__file__).resolve().parent.parent
SIMULATOR_RUN_TIMEOUT_S = 3600  # the whole CI job has 90 minutes
SIMULATOR_RUN_COMMAND = (sys.executable, "-m", "pytest", "-q", "-m", "cuda", "-p", "no:cacheprovider",
                         "--durations=15", str(ROOT / "tests"))


def numba_cuda_importable():
    try:
        import numba.cuda  # noqa: F401
    except Exception:
        return False
    return True


def simulator_run_skip_reason():
    """Why the simulator run cannot or need not run here, or None."""
    if SIMULATOR:
        return "already running under the CUDA simulator"
    if cuda_available():
        return "a real GPU is present: the cuda tests run in this session"
    if not numba_cuda_importable():
        return "numba.cuda is not installed"
    return None


SimulatorRunResult = collections.namedtuple("SimulatorRunResult", "code output seconds command timeout_s")
SimulatorRunResult.__doc__ = ("A finished simulator run: return code (None: stopped at the timeout), "
                              "output, seconds, the command and its timeout.")


class _SimulatorRun:
    """``command`` with the simulator on, in its own process group, its output in a temporary
    file; :meth:`result` waits for it (``timeout_s`` from its start at most)."""

    def __init__(self, command=SIMULATOR_RUN_COMMAND, timeout_s=SIMULATOR_RUN_TIMEOUT_S):
        env = dict(os.environ, NUMBA_ENABLE_CUDASIM="1")
        env.pop("GPUCONV_DEVICE", None)
        self.command, self.timeout_s = tuple(command), timeout_s
        self.output = tempfile.TemporaryFile(mode="w+", prefix="gpuconv-simulator-run-")
        self.started = time.monotonic()
        self.process = subprocess.Popen(self.command, cwd=ROOT, env=env, text=True,
                                        stdout=self.output, stderr=subprocess.STDOUT,
                                        stdin=subprocess.DEVNULL, start_new_session=True)

    def result(self):
        remaining = self.timeout_s - (time.monotonic() - self.started)
        try:
            code = self.process.wait(timeout=max(remaining, 0))
        except subprocess.TimeoutExpired:
            self.stop()
            code = None
        self.output.seek(0)
        return SimulatorRunResult(code, self.output.read(), time.monotonic() - self.started,
                                  " ".join(self.command), self.timeout_s)

    def stop(self):
        """Kill the run and whatever it started, if it is still going."""
        if self.process.poll() is None:
            try:
                os.killpg(self.process.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.process.wait()


_simulator_runs = []


def _start_simulator_run():
    run = _SimulatorRun()
    _simulator_runs.append(run)
    return run


def _stop_simulator_runs():
    for run in _simulator_runs:
        run.stop()


def _is_simulator_run(item):
    return item.get_closest_marker("simulator_run") is not None


def pytest_configure(config):
    config.addinivalue_line("markers", "simulator_run: waits for the background simulator run "
                                       "(tests/conftest.py starts it; it runs last)")


def pytest_collection_modifyitems(config, items):
    items.sort(key=_is_simulator_run)  # stable: everything else keeps its order


def pytest_collection_finish(session):
    if session.config.option.collectonly or _simulator_runs:
        return
    if any(map(_is_simulator_run, session.items)) and simulator_run_skip_reason() is None:
        _start_simulator_run()


def pytest_sessionfinish(session):
    _stop_simulator_runs()


@pytest.fixture
def simulator_run():
    """The background simulator run, waited for: a :class:`SimulatorRunResult`."""
    reason = simulator_run_skip_reason()
    if reason is not None:
        pytest.skip(reason)
    run = _simulator_runs[0] if _simulator_runs else _start_simulator_run()
    return run.result()
