"""The device chooser: documented rules, each tested."""

import numpy as np
import pytest

import gpuconv
from gpuconv import device as _device
from gpuconv.device import CudaUnavailableError, select_device


class FakeGpuArray:
    """Anything exposing __cuda_array_interface__ counts as living on a GPU."""

    def __init__(self, shape=(1,)):
        self.__cuda_array_interface__ = {"shape": shape, "typestr": "<f4", "data": (0, False),
                                         "version": 3}


class FakeDLPackGpuArray:
    def __dlpack_device__(self):
        return (2, 0)  # kDLCUDA, device 0


@pytest.fixture
def no_cuda(monkeypatch):
    monkeypatch.setattr(_device, "_cuda_status", lambda: (False, "no GPU (test)"))


@pytest.fixture
def with_cuda(monkeypatch):
    monkeypatch.setattr(_device, "_cuda_status", lambda: (True, "a CUDA GPU is present (test)"))


def test_explicit_cpu(no_cuda):
    assert select_device(np.zeros(1), device="cpu") == "cpu"


def test_auto_without_gpu_is_cpu(no_cuda):
    assert select_device(np.zeros(1)) == "cpu"


def test_auto_with_gpu_is_cuda(with_cuda):
    assert select_device(np.zeros(1)) == "cuda"


def test_auto_follows_gpu_data(with_cuda):
    assert select_device(FakeGpuArray(), device="auto") == "cuda"
    assert select_device(FakeDLPackGpuArray(), device="auto") == "cuda"


def test_gpu_data_without_usable_cuda_is_an_error(no_cuda):
    with pytest.raises(CudaUnavailableError, match="inputs live on a GPU"):
        select_device(FakeGpuArray())


def test_cuda_without_gpu_says_how_to_get_the_cpu_path(no_cuda):
    with pytest.raises(CudaUnavailableError) as info:
        select_device(np.zeros(1), device="cuda")
    assert "device='cpu'" in str(info.value) and "GPUCONV_DEVICE=cpu" in str(info.value)
    assert isinstance(info.value, ValueError) and isinstance(info.value, RuntimeError)


def test_public_functions_raise_it_too(no_cuda):
    with pytest.raises(CudaUnavailableError):
        gpuconv.conv2d(np.zeros((1, 1, 3, 3)), np.zeros((1, 1, 1, 1)), device="cuda")


def test_cpu_with_gpu_data_is_refused(with_cuda):
    with pytest.raises(ValueError, match="some inputs live on a GPU"):
        select_device(FakeGpuArray(), device="cpu")


@pytest.mark.parametrize("value, expected", [("cpu", "cpu"), ("CUDA", "cuda"), ("auto", "cpu"), ("", "cpu")])
def test_environment_overrides_auto(monkeypatch, value, expected, with_cuda):
    monkeypatch.setenv("GPUCONV_DEVICE", value)
    if expected == "cpu" and value in ("auto", ""):
        expected = "cuda"  # 'auto' (or unset) in the environment leaves the choice to the data/GPU
    assert select_device(np.zeros(1)) == expected


def test_environment_does_not_override_an_explicit_device(monkeypatch, with_cuda):
    monkeypatch.setenv("GPUCONV_DEVICE", "cuda")
    assert select_device(np.zeros(1), device="cpu") == "cpu"


def test_environment_cuda_without_gpu_names_the_variable(monkeypatch, no_cuda):
    monkeypatch.setenv("GPUCONV_DEVICE", "cuda")
    with pytest.raises(CudaUnavailableError, match="GPUCONV_DEVICE='cuda'"):
        select_device(np.zeros(1))


@pytest.mark.parametrize("bad", ["gpu", "CPU", 0, None, "cuda:0"])
def test_unknown_device_lists_the_accepted_values(bad):
    with pytest.raises(ValueError, match="device must be one of 'auto', 'cpu', 'cuda'"):
        select_device(device=bad)


def test_mixed_host_and_gpu_operands_are_refused(with_cuda):
    with pytest.raises(ValueError, match="all live on the host or all on the GPU"):
        gpuconv.conv2d(np.zeros((1, 1, 3, 3), np.float32), FakeGpuArray((1, 1, 1, 1)))


def test_explain_auto_mentions_the_reason(monkeypatch, no_cuda):
    assert _device.explain_auto().startswith("cpu (no GPU (test))")
    monkeypatch.setenv("GPUCONV_DEVICE", "cpu")
    assert "GPUCONV_DEVICE" in _device.explain_auto()


# --- the numba-cuda / NumPy pair -------------------------------------------------------------

@pytest.mark.parametrize("numba_cuda, numpy_version, broken", [
    ("0.30.4", "2.5.2", True),       # the pair the first GPU run met
    ("0.30.4", "2.5.0rc1", True),
    ("0.20.0", "2.6.0", True),
    ("0.30.4", "2.4.6", False),
    ("0.30.5", "2.5.2", False),      # newer than any release known to be broken
    ("0.31.0.dev3", "2.5.2", False),
    ("0.30.4", "1.26.4", False),
])
def test_known_broken_toolchain_pairs(numba_cuda, numpy_version, broken):
    problem = _device.toolchain_problem(numba_cuda, numpy_version)
    assert (problem is not None) == broken
    if broken:
        assert f"numba-cuda {numba_cuda}" in problem and f"NumPy {numpy_version}" in problem
        assert 'pip install "numpy<2.5"' in problem


def test_a_broken_pair_makes_cuda_unusable_with_one_clear_error(monkeypatch):
    """A GPU is present but numba-cuda cannot compile with this NumPy: device='cuda' stops
    with the versions and the fix before any compilation, and 'auto' warns once and uses the
    CPU."""
    from numba import cuda

    message = _device.toolchain_problem("0.30.4", "2.5.2")
    monkeypatch.setattr(cuda, "is_available", lambda: True)
    monkeypatch.setattr(_device, "simulator_enabled", lambda: False)
    monkeypatch.setattr(_device, "cuda_toolchain_problem", lambda: message)
    status = _device._cuda_status.__wrapped__()
    assert status == (False, message)
    monkeypatch.setattr(_device, "_cuda_status", lambda: status)
    with pytest.raises(CudaUnavailableError, match=r"numba-cuda 0\.30\.4 does not work with "
                                                   r"NumPy 2\.5\.2"):
        select_device(np.zeros(3), device="cuda")
    _device._warn_if_toolchain_broken.cache_clear()
    with pytest.warns(RuntimeWarning, match="numpy<2.5"):
        assert select_device(np.zeros(3)) == "cpu"
    _device._warn_if_toolchain_broken.cache_clear()


def test_the_installed_pair_is_checked():
    from importlib import metadata

    try:
        version = metadata.version("numba-cuda")
    except metadata.PackageNotFoundError:
        pytest.skip("numba-cuda is not installed as a package")
    assert _device.cuda_toolchain_problem() == _device.toolchain_problem(version, np.__version__)


def test_unit_axes_interface_views_the_same_elements():
    """The interface of a strided array with a unit axis inserted or dropped, checked by
    viewing NumPy's memory through it (an independent reading) against NumPy's own view."""
    from numpy.lib.stride_tricks import as_strided

    from gpuconv.device import unit_axes_interface

    base = np.arange(2 * 3 * 8, dtype=np.float32).reshape(2, 3, 8)
    for array in (base[:, :, ::2], base[0], base[:, 1:2, 1::3], base):
        ai = array.__array_interface__
        cai = {"typestr": ai["typestr"], "shape": ai["shape"], "strides": ai["strides"],
               "data": ai["data"], "version": 3}
        for view in (array[None], array[..., None, :], array[:, None]):
            got = unit_axes_interface(cai, view.shape)
            assert got["shape"] == view.shape and got["data"] == cai["data"]
            np.testing.assert_array_equal(as_strided(array, view.shape, got["strides"]), view)
        if array.shape[1] == 1:  # a unit axis dropped
            got = unit_axes_interface(cai, array[:, 0].shape)
            np.testing.assert_array_equal(
                as_strided(array, array[:, 0].shape, got["strides"]), array[:, 0])
    with pytest.raises(ValueError, match="not .* with unit axes"):
        unit_axes_interface(cai, (4, 2 * 3 * 8))


def test_the_six_axis_copy_view_reads_the_same_elements():
    """The launch layer's 6-D view of a strided device array (the contiguous copy's source)
    is the array with leading unit axes, checked through NumPy's memory."""
    from numpy.lib.stride_tricks import as_strided

    from gpuconv.cuda.launch import _View6

    class Interface:
        def __init__(self, array):
            ai = array.__array_interface__
            self.__cuda_array_interface__ = {"typestr": ai["typestr"], "shape": ai["shape"],
                                             "strides": ai["strides"], "data": ai["data"],
                                             "version": 2}

    array = np.arange(3 * 10, dtype=np.float64).reshape(3, 10)[:, 1::3]
    view = _View6(Interface(array)).__cuda_array_interface__
    assert view["shape"] == (1, 1, 1, 1, 3, 3) and view["stream"] is None
    assert view["data"] == array.__array_interface__["data"] and view["version"] == 3
    np.testing.assert_array_equal(as_strided(array, view["shape"], view["strides"]),
                                  array[None, None, None, None])
