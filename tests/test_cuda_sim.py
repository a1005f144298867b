"""Run every ``cuda``-marked test once more under the Numba CUDA simulator.

Without a GPU the normal run has no ``cuda`` device; a second pytest runs with
``NUMBA_ENABLE_CUDASIM=1`` (which must be set before Numba is imported, hence the
subprocess), where the ``device`` fixture then yields ``"cuda"`` and the CUDA kernels run on
the simulator at the tests' tiny sizes. ``tests/conftest.py`` starts that run when collection
has finished, so it runs beside the rest of the suite, and moves this test to the end, where it
waits for the result. Skipped when already under the simulator, and on a real GPU (where the
``cuda`` tests run in the normal run anyway).
"""

import pytest


@pytest.mark.simulator_run
def test_cuda_tests_pass_under_the_simulator(simulator_run):
    run = simulator_run
    print(run.output)
    print(f"simulator run: {run.seconds:.0f} s")
    assert run.code is not None, (f"simulator run still going after {run.timeout_s} s, stopped "
                                  f"({run.command}):\n{run.output}")
    assert run.code == 0, f"simulator run failed ({run.command}):\n{run.output}"
    assert " passed" in run.output and "no tests ran" not in run.output


# --------------------------------------------------------------------------------------------
# The background run itself (tests/conftest.py): order, failures and the timeout reported
# --------------------------------------------------------------------------------------------

def test_the_simulator_run_is_collected_last():
    import pathlib
    import subprocess
    import sys

    root = pathlib.Path(__file__).resolve().parent.parent
    done = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider",
                           "tests/test_cuda_sim.py", "tests/test_params.py"],
                          cwd=root, capture_output=True, text=True, timeout=300)
    ids = [line for line in done.stdout.splitlines() if "::" in line]
    assert done.returncode == 0, done.stdout + done.stderr
    assert len(ids) > 3 and any("test_params.py" in i for i in ids)
    assert ids[-1] == "tests/test_cuda_sim.py::test_cuda_tests_pass_under_the_simulator", ids[-3:]


def test_a_failing_run_gives_its_code_and_output():
    import sys

    import conftest

    run = conftest._SimulatorRun(
        command=(sys.executable, "-c", "import os, sys; print('sim', os.environ['NUMBA_ENABLE_CUDASIM']); sys.exit(3)"))
    result = run.result()
    assert (result.code, result.output) == (3, "sim 1\n")
    assert result.command.endswith("sys.exit(3)") and result.seconds < result.timeout_s


def test_a_run_past_its_timeout_is_stopped():
    import sys
    import time

    import conftest

    run = conftest._SimulatorRun(command=(sys.executable, "-c", "import time; print('started', flush=True); time.sleep(600)"),
                                 timeout_s=3.0)
    start = time.monotonic()
    result = run.result()
    assert result.code is None and result.output == "started\n"
    assert time.monotonic() - start < 60 and run.process.poll() is not None
