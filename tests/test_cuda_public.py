"""The public functions on device arrays: same kind out, no host round trip (real GPU or simulator)."""

import numpy as np
import pytest

import gpuconv
from gpuconv.ops import OPS
from gpuconv.device import cuda_available
from reference import conv2d_ref, local_conv2d_ref

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not cuda_available(), reason="needs CUDA (a GPU or the simulator); "
                                 "tests/test_cuda_sim.py runs these in the simulator")]


@pytest.mark.parametrize("op", ["conv2d", "local_conv2d"])
def test_numba_device_arrays_in_device_array_out(op):
    from numba import cuda

    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 2, 5, 5))
    w = rng.standard_normal((3, 3, 3, 2, 3, 3) if op == "local_conv2d" else (3, 2, 3, 3))
    b = rng.standard_normal(3)
    y = getattr(gpuconv, op)(cuda.to_device(x), cuda.to_device(w), cuda.to_device(b))
    assert getattr(y, "__cuda_ndarray__", False) or hasattr(y, "__cuda_array_interface__")
    ref = (local_conv2d_ref if op == "local_conv2d" else conv2d_ref)(x, w, b)
    np.testing.assert_allclose(y.copy_to_host(), ref, rtol=1e-12, atol=1e-12)


def test_device_arrays_with_device_cpu_are_refused():
    from numba import cuda

    x = cuda.to_device(np.zeros((1, 1, 3, 3)))
    w = cuda.to_device(np.zeros((1, 1, 1, 1)))
    with pytest.raises(ValueError, match="some inputs live on a GPU"):
        gpuconv.conv2d(x, w, device="cpu")


@pytest.mark.parametrize("on_device", [False, True])
def test_launch_that_would_not_fit_is_refused_before_allocating(monkeypatch, on_device):
    from numba import cuda

    from gpuconv.cuda import launch as _cuda

    monkeypatch.setattr(_cuda, "_free_bytes", lambda template=None: 100)
    x = np.zeros((2, 2, 5, 5))
    w = np.zeros((3, 2, 3, 3))
    if on_device:
        x, w = cuda.to_device(x), cuda.to_device(w)
    with pytest.raises(gpuconv.InsufficientMemoryError, match=r"needs about .* of GPU memory but only 100 B is free"):
        gpuconv.conv2d(x, w, device="cuda")


def test_bytes_needed_counts_output_copies_and_local_scratch():
    from gpuconv import conv as _conv
    from gpuconv.cuda import launch as _cuda
    from gpuconv.geometry import conv_geometry

    x = _conv._operand(np.zeros((2, 3, 6, 6), np.float32), "x")
    w = _conv._operand(np.zeros((4, 4, 4, 3, 3, 3), np.float32), "weight")
    geom = conv_geometry(x.shape, (3, 3), 4)
    out, xs, ws = 2 * 4 * 4 * 4, 2 * 3 * 6 * 6, 4 * 4 * 4 * 3 * 3 * 3
    expected = out + xs + ws  # no split-K here, no bias placeholder, no copy of x
    assert _cuda.local_conv2d_scratch_elements(geom, np.float32) == 0
    assert _cuda._bytes_needed(OPS["local_conv2d"], [x, w, None], geom, True) == 4 * expected


def test_bytes_needed_counts_device_inputs_only_when_strided():
    from numba import cuda

    from gpuconv import conv as _conv
    from gpuconv.cuda import launch as _cuda
    from gpuconv.geometry import conv_geometry

    x = _conv._operand(cuda.to_device(np.zeros((2, 3, 6, 6), np.float32)), "x")
    w_host = np.zeros((4, 3, 3, 3), np.float32)
    w = _conv._operand(cuda.to_device(w_host), "weight")
    geom = conv_geometry(x.shape, (3, 3), 4)
    out = 2 * 4 * 4 * 4  # (no scratch: without a bias the output stands in for it)
    assert _cuda._bytes_needed(OPS["conv2d"], [x, w, None], geom, False) == 4 * out
    assert _cuda._bytes_needed(OPS["conv2d"], [x, w, None], geom, True) == 4 * (
        out + 2 * 3 * 36 + 4 * 27)


def test_grids_beyond_cuda_limits_are_refused_clearly():
    from gpuconv.cuda import kernels as kernels

    with pytest.raises(ValueError, match="beyond CUDA's limits.*device='cpu'"):
        kernels.check_grid((1, 70000, 1), "local_conv2d")
    assert kernels.check_grid((2**31 - 1, 65535, 65535), "conv2d") == (2**31 - 1, 65535, 65535)


@pytest.mark.parametrize("op", ["conv2d", "local_conv2d"])
def test_without_a_bias_every_forward_kernel_leaves_the_stand_in_unread(op):
    """Without a bias the output array stands in for it (``has_bias`` 0; no allocation):
    every forward kernel the dispatcher weighs, launched with its own configuration on an
    output filled with NaN, must write every element without reading that stand-in. A
    kernel that read it, or left an element unwritten, would leave a NaN."""
    from numba import cuda

    from gpuconv.cuda import kernels, launch
    from gpuconv.geometry import conv_geometry

    rng = np.random.default_rng(1)
    geom = conv_geometry((3, 4, 7, 6), (3, 3), 6, padding=1, groups=2)
    x = rng.standard_normal(geom.input_shape).astype(np.float32)
    shape = geom.local_weight_shape() if op == "local_conv2d" else geom.shared_weight_shape()
    w = rng.standard_normal(shape).astype(np.float32)
    ref = (local_conv2d_ref if op == "local_conv2d" else conv2d_ref)(
        x, w, padding=1, groups=2)
    run = launch.launch_local_conv2d if op == "local_conv2d" else launch.launch_conv2d
    configs = kernels.forward_candidates(op, geom, np.float32)
    assert len(configs) >= 2
    for config in configs:
        out = cuda.to_device(np.full(geom.output_shape, np.nan, np.float32))
        run(cuda.to_device(x), cuda.to_device(w), None, out, geom, 0, config=config)
        np.testing.assert_allclose(out.copy_to_host(), ref, rtol=1e-5, atol=1e-5,
                                   err_msg=config.kernel.name)
