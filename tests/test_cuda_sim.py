"""Run every ``cuda``-marked test once more under the Numba CUDA simulator.

Without a GPU the normal run has no ``cuda`` device; this test starts a second pytest with
``NUMBA_ENABLE_CUDASIM=1`` (which must be set before Numba is imported, hence the
subprocess), where the ``device`` fixture then yields ``"cuda"`` and the CUDA kernels run on
the simulator at the tests' tiny sizes. Skipped when already under the simulator, and on a
real GPU (where the ``cuda`` tests run in the normal run anyway).
"""

import os
import pathlib
import subprocess
import sys

import pytest

from gpuconv.device import cuda_available

ROOT = pathlib.Path(__file__).resolve().parent.parent
SIMULATOR = os.environ.get("NUMBA_ENABLE_CUDASIM") == "1"


def _numba_cuda_importable():
    try:
        import numba.cuda  # noqa: F401
    except Exception:
        return False
    return True


@pytest.mark.skipif(SIMULATOR, reason="already running under the CUDA simulator")
@pytest.mark.skipif(not SIMULATOR and cuda_available(),
                    reason="a real GPU is present: the cuda tests run in this session")
@pytest.mark.skipif(not _numba_cuda_importable(), reason="numba.cuda is not installed")
def test_cuda_tests_pass_under_the_simulator():
    env = dict(os.environ, NUMBA_ENABLE_CUDASIM="1")
    env.pop("GPUCONV_DEVICE", None)
    command = [sys.executable, "-m", "pytest", "-q", "-m", "cuda", "-p", "no:cacheprovider",
               str(ROOT / "tests")]
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True,
                            timeout=1800)  # about 11 minutes on an idle 2-core machine
    output = result.stdout + result.stderr
    print(output)
    assert result.returncode == 0, f"simulator run failed ({' '.join(command)}):\n{output}"
    assert " passed" in output and "no tests ran" not in output
