"""The CUDA gradient kernels and their launch functions, against the float64 references.

Tests marked ``cuda`` launch kernels on Numba device arrays: a GPU, or the simulator
(``NUMBA_ENABLE_CUDASIM=1``, sizes tiny; ``tests/test_cuda_sim.py`` runs them so). Outputs
start as NaN, so an element a kernel forgets to write fails the comparison. The rest check
the pure launch-shape logic and run everywhere.
"""

import numpy as np
import pytest

from gpuconv.device import cuda_available
from gpuconv.geometry import ConvGeometry, get_conv_outsize
from reference import (TOLERANCE, conv2d_input_grad_ref, conv2d_weight_grad_ref, half_tolerance,
                       local_conv2d_input_grad_ref, local_conv2d_weight_grad_ref)

needs_cuda = pytest.mark.skipif(not cuda_available(), reason="numba.cuda cannot launch kernels "
                                "(no GPU and the simulator is off; tests/test_cuda_sim.py runs "
                                "these in the simulator)")

DTYPES = [np.float32, np.float64]
DTYPE_IDS = ["f32", "f64"]
OPS = ["conv2d_input", "conv2d_weight", "local_input", "local_weight"]


def _geometry(n, c_in, h, w, c_out, k, stride=1, pad=0, dilation=1, groups=1):
    """A geometry with explicit (top, bottom, left, right) padding (an int: all four)."""
    kh, kw = (k, k) if isinstance(k, int) else k
    sh, sw = (stride, stride) if isinstance(stride, int) else stride
    dh, dw = (dilation, dilation) if isinstance(dilation, int) else dilation
    top, bottom, left, right = (pad,) * 4 if isinstance(pad, int) else pad
    return ConvGeometry(n, c_in, h, w, c_out, kh, kw, sh, sw, top, bottom, left, right, dh, dw,
                        groups, get_conv_outsize(h, kh, sh, top + bottom, dh),
                        get_conv_outsize(w, kw, sw, left + right, dw))


# Tiny geometries covering the features. "wide" spans two 32-column tiles of the local input
# gradient and two position blocks of the local weight gradient; padding is asymmetric
# wherever it is not zero.
FEATURES = {
    "plain": dict(n=2, c_in=2, h=5, w=6, c_out=3, k=3),
    "stride": dict(n=2, c_in=2, h=7, w=8, c_out=2, k=3, stride=(2, 3), pad=(1, 0, 0, 2)),
    "stride_gt_kernel": dict(n=1, c_in=1, h=9, w=8, c_out=2, k=2, stride=3),
    "asymmetric_padding": dict(n=1, c_in=2, h=4, w=5, c_out=2, k=(2, 4), pad=(2, 0, 1, 3)),
    "dilation": dict(n=1, c_in=2, h=8, w=7, c_out=2, k=3, dilation=(2, 1), pad=(1, 2, 1, 0)),
    "stride_dilation": dict(n=2, c_in=1, h=9, w=9, c_out=2, k=3, stride=2, dilation=2,
                            pad=(2, 1, 0, 2)),
    "groups": dict(n=2, c_in=4, h=5, w=5, c_out=6, k=3, groups=2, pad=1),
    "depthwise": dict(n=1, c_in=3, h=4, w=5, c_out=3, k=3, groups=3, pad=(0, 1, 1, 0)),
    "kernel_1x1": dict(n=3, c_in=5, h=3, w=4, c_out=4, k=1),
    "wide": dict(n=1, c_in=1, h=3, w=37, c_out=2, k=3, pad=(0, 0, 1, 1)),
}


def _feature_geometry(name):
    return _geometry(**FEATURES[name])


def _reference(op, geom, x, w, gy):
    """(expected, magnitude bound) in float64, for any (top, bottom, left, right) padding:
    the references see an explicitly zero-padded input and no padding."""
    top, bottom, left, right = geom.pad_top, geom.pad_bottom, geom.pad_left, geom.pad_right
    kwargs = dict(stride=(geom.stride_h, geom.stride_w), padding=0,
                  dilation=(geom.dilation_h, geom.dilation_w), groups=geom.groups)
    padded = (geom.batch, geom.in_channels, geom.in_height + top + bottom,
              geom.in_width + left + right)
    if op in ("conv2d_input", "local_input"):
        ref = conv2d_input_grad_ref if op == "conv2d_input" else local_conv2d_input_grad_ref

        def crop(a):
            return a[:, :, top:top + geom.in_height, left:left + geom.in_width]

        return (crop(ref(padded, w, gy, **kwargs)),
                crop(ref(padded, np.abs(w), np.abs(gy), **kwargs)))
    ref = conv2d_weight_grad_ref if op == "conv2d_weight" else local_conv2d_weight_grad_ref
    shape = (geom.shared_weight_shape() if op == "conv2d_weight"
             else geom.local_weight_shape())

    def pad(a):
        return np.pad(a, ((0, 0), (0, 0), (top, bottom), (left, right)))

    return ref(pad(x), shape, gy, **kwargs), ref(pad(np.abs(x)), shape, np.abs(gy), **kwargs)


def _operands(rng, op, geom, dtype):
    x = rng.uniform(-1, 1, (geom.batch, geom.in_channels, geom.in_height, geom.in_width))
    local = op.startswith("local")
    w = rng.uniform(-1, 1, geom.local_weight_shape() if local else geom.shared_weight_shape())
    gy = rng.uniform(-1, 1, geom.output_shape)
    return x.astype(dtype), w.astype(dtype), gy.astype(dtype)


def _out_shape(op, geom):
    if op in ("conv2d_input", "local_input"):
        return (geom.batch, geom.in_channels, geom.in_height, geom.in_width)
    return geom.shared_weight_shape() if op == "conv2d_weight" else geom.local_weight_shape()


def _launch(op, geom, x, w, gy, config=None, out=None):
    """Run one gradient launch on device copies; returns the result on the host."""
    from numba import cuda

    from gpuconv.cuda import launch as _cuda

    dtype = gy.dtype
    if out is None:
        out = cuda.to_device(np.full(_out_shape(op, geom), np.nan, dtype))
    stream = cuda.default_stream()
    d_gy = cuda.to_device(gy)
    if op == "conv2d_input":
        _cuda.launch_conv2d_input_grad(d_gy, cuda.to_device(w), out, geom, stream, config=config)
    elif op == "local_input":
        _cuda.launch_local_conv2d_input_grad(d_gy, cuda.to_device(w), out, geom, stream,
                                             config=config)
    elif op == "conv2d_weight":
        _cuda.launch_conv2d_weight_grad(cuda.to_device(x), d_gy, out, geom, stream,
                                        config=config)
    else:
        _cuda.launch_local_conv2d_weight_grad(cuda.to_device(x), d_gy, out, geom, stream,
                                              config=config)
    return out.copy_to_host()


def _terms(op, geom):
    """Length of each output's sum: taps x channels (input gradients) or images x
    positions (weight gradients; one position for the local one)."""
    if op in ("conv2d_input", "local_input"):
        return geom.out_channels_per_group * geom.kernel_height * geom.kernel_width
    if op == "conv2d_weight":
        return geom.batch * geom.out_height * geom.out_width
    return geom.batch


def _assert_matches(result, expected, bound, dtype, terms=None):
    """float16 needs ``terms``, the length of each output's sum (see half_tolerance)."""
    result = np.asarray(result, dtype=np.float64)
    assert result.shape == expected.shape
    assert np.all(np.isfinite(result)), "NaN left in the output (an element not written?)"
    scale = max(float(np.abs(bound).max()) if bound.size else 0.0, np.finfo(np.float64).tiny)
    err = float(np.abs(result - expected).max()) if expected.size else 0.0
    tol = half_tolerance(terms) if np.dtype(dtype) == np.float16 else TOLERANCE[np.dtype(dtype)]
    assert err <= tol * scale, f"error {err:.3e}, scale {scale:.3e}"


def _check(op, geom, dtype, seed, config=None):
    rng = np.random.default_rng(seed)
    x, w, gy = _operands(rng, op, geom, dtype)
    result = _launch(op, geom, x, w, gy, config)
    assert result.dtype == np.dtype(dtype)
    _assert_matches(result, *_reference(op, geom, x, w, gy), dtype, _terms(op, geom))
    return result


# float64 on every feature, float32 on those that exercise the most index arithmetic, float16
# on two of them: the simulator runs every thread as a Python thread.
GRID = ([pytest.param(name, np.float64, id=f"{name}-f64") for name in FEATURES]
        + [pytest.param(name, np.float32, id=f"{name}-f32")
           for name in ("stride", "asymmetric_padding", "stride_dilation", "groups")]
        + [pytest.param(name, np.float16, id=f"{name}-f16")
           for name in ("stride_dilation", "groups")])


@pytest.mark.cuda
@needs_cuda
@pytest.mark.parametrize("name, dtype", GRID)
@pytest.mark.parametrize("op", OPS)
def test_feature_grid(op, name, dtype):
    _check(op, _feature_geometry(name), dtype, sum(map(ord, name + op)))


@pytest.mark.cuda
@needs_cuda
def test_conv2d_input_grad_several_stages_and_batch_grid_stride():
    """One output channel per shared-memory stage (three stages) and one block along z for
    a batch of three."""
    from gpuconv.cuda import grad_kernels as gk

    geom = _geometry(3, 4, 6, 5, 6, 3, stride=(2, 1), pad=(1, 0, 1, 1), groups=2)
    config = gk.conv2d_input_grad_config(geom, np.float64)
    assert config.chunk == geom.out_channels_per_group == 3
    per_channel = config.shared_bytes // config.chunk
    config = config._replace(chunk=1, grid=config.grid[:2] + (1,), shared_bytes=per_channel)
    _check("conv2d_input", geom, np.float64, 21, config)


@pytest.mark.cuda
@needs_cuda
@pytest.mark.parametrize("dtype", DTYPES + [np.float16], ids=DTYPE_IDS + ["f16"])
def test_conv2d_weight_grad_partial_sums_over_slices(dtype):
    """Three slices of three chunks of 4 (the last slice shorter, its last chunk partial),
    summed by the second kernel into a NaN-filled output; a k tile and a channel tile
    smaller than the layer, so tiles end inside it."""
    from gpuconv.cuda import grad_kernels as gk

    geom = _geometry(2, 4, 5, 5, 6, 3, stride=(1, 2), pad=(1, 1, 0, 2), groups=2)
    m_total = geom.batch * geom.out_height * geom.out_width
    assert m_total == 2 * 5 * 3  # slices of 12, 12 and 6
    spec = gk.conv2d_weight_grad_kernel(
        {np.float16: "f16", np.float32: "f32", np.float64: "f64"}[dtype], 2, 8, 1, 2, 4)
    assert spec.name.endswith("_t2x8_r1x2_m4")
    k_total = geom.in_channels_per_group * 9
    config = gk.Conv2dWeightGradConfig(
        spec, (4, 2), (-(-k_total // 8), geom.groups * 2, 3), 3, 12, 3 * 6 * k_total)
    _check("conv2d_weight", geom, dtype, 22, config)


@pytest.mark.cuda
@needs_cuda
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_local_input_grad_stages_and_batch_passes(dtype):
    """One output channel per stage (two stages per tap row), a partial input-channel block,
    and a batch of five in three passes of two images (one row of threads)."""
    from gpuconv.cuda import grad_kernels as gk

    geom = _geometry(5, 3, 4, 7, 2, 3, stride=(1, 2), pad=(1, 0, 2, 1))
    code = "f32" if dtype == np.float32 else "f64"
    config = gk.local_conv2d_input_grad_config(geom, dtype)
    spec = gk.local_conv2d_input_grad_kernel(code, 3, 3, 2, 2)
    per_channel = config.shared_bytes // config.chunk // 3 * 2  # two input channels
    config = config._replace(kernel=spec, block=(32, 1), chunk=1, shared_bytes=per_channel,
                             grid=(config.grid[0] * 2,))  # the grid had one channel block
    _check("local_input", geom, dtype, 23, config)


@pytest.mark.cuda
@needs_cuda
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_local_weight_grad_row_blocks_and_position_blocks(dtype):
    """Kernel rows split over grid z (one row per thread, two rows of threads: the last
    block partial), 49 positions (a full and a partial block of 32) and a partial channel
    block."""
    from gpuconv.cuda import grad_kernels as gk

    geom = _geometry(2, 3, 8, 8, 3, 3, pad=(0, 1, 0, 1))
    assert geom.out_height * geom.out_width == 49
    code = "f32" if dtype == np.float32 else "f64"
    spec = gk.local_conv2d_weight_grad_kernel(code, 3, 3, 1, 2)
    config = gk.LocalWeightGradConfig(spec, (32, 2), (2 * 2 * 5,), 5)  # 9 rows: 2+2+2+2+1
    _check("local_weight", geom, dtype, 24, config)


@pytest.mark.cuda
@needs_cuda
@pytest.mark.parametrize("op", OPS)
def test_two_calls_are_bitwise_equal(op):
    """No atomics, fixed summation orders: the same inputs give the same bits (the conv2d
    weight gradient through its partial sums)."""
    from gpuconv.cuda import grad_kernels as gk

    geom = _feature_geometry("groups")
    rng = np.random.default_rng(25)
    x, w, gy = _operands(rng, op, geom, np.float32)
    config = None
    if op == "conv2d_weight":
        config = gk.conv2d_weight_grad_config(geom, np.float32)
        config = config._replace(grid=config.grid[:2] + (2,), slices=2, m_slice=32)
    first = _launch(op, geom, x, w, gy, config)
    second = _launch(op, geom, x, w, gy, config)
    assert first.tobytes() == second.tobytes()
    _assert_matches(first, *_reference(op, geom, x, w, gy), np.float32)


@pytest.mark.cuda
@needs_cuda
@pytest.mark.parametrize("op", OPS)
def test_empty_batch(op):
    """Weight gradients of an empty batch are zeros (written over NaN); input gradients
    have nothing to write."""
    geom = _geometry(0, 2, 5, 5, 2, 3)
    x = np.zeros((0, 2, 5, 5), np.float32)
    gy = np.zeros(geom.output_shape, np.float32)
    local = op.startswith("local")
    w = np.ones(geom.local_weight_shape() if local else geom.shared_weight_shape(), np.float32)
    result = _launch(op, geom, x, w, gy)
    assert result.shape == _out_shape(op, geom)
    if op.endswith("weight"):
        np.testing.assert_array_equal(result, 0)


@pytest.mark.cuda
@needs_cuda
def test_float16_weight_grad_sums_beyond_the_half_range():
    """A weight gradient of 2 * 60000 - 60000 over three positions: its float32 partial sum
    passes 65504 (float16's largest value) on the way and comes back exact, through one
    slice (float32 scratch, then the rounding slice sum) and through three."""
    from gpuconv.cuda import grad_kernels as gk

    geom = _geometry(1, 1, 1, 3, 1, 1)
    x = np.ones((1, 1, 1, 3), np.float16)
    gy = np.array([[[[60000, 60000, -60000]]]], np.float16)
    w = np.ones(geom.shared_weight_shape(), np.float16)
    config = gk.conv2d_weight_grad_config(geom, np.float16)
    assert config.slices == 1 and config.scratch_elements == 1  # float32, one slice
    np.testing.assert_array_equal(_launch("conv2d_weight", geom, x, w, gy, config), 60000)
    np.testing.assert_array_equal(_launch("local_weight", geom, x, w, gy).ravel(),
                                  [60000, 60000, -60000])
    spec = gk.conv2d_weight_grad_kernel("f16", 1, 1, 1, 1, 1)
    sliced = gk.Conv2dWeightGradConfig(spec, (1, 1), (1, 1, 3), 3, 1, 3)
    np.testing.assert_array_equal(_launch("conv2d_weight", geom, x, w, gy, sliced), 60000)


# ----------------------------------------------------------------------------------------
# pure launch-shape logic (no GPU needed)
# ----------------------------------------------------------------------------------------

def test_factories_are_memoised_and_named_by_their_constants():
    from gpuconv.cuda import grad_kernels as gk

    spec = gk.conv2d_input_grad_kernel("f32", 3, 5, 2, 4, 8)
    assert spec is gk.conv2d_input_grad_kernel("f32", 3, 5, 2, 4, 8)
    assert spec.name == "conv2d_igrad_f32_k3x5_r2x4_c8" == spec.pyfunc.__name__
    assert gk.conv2d_weight_grad_kernel("f64", 64, 64, 4, 4, 16).name == \
        "conv2d_wgrad_f64_t64x64_r4x4_m16"
    assert gk.local_conv2d_input_grad_kernel("f32", 9, 9, 8, 4).name == \
        "local_conv2d_igrad_f32_k9x9_b8_c4"
    assert gk.local_conv2d_weight_grad_kernel("f64", 3, 3, 3, 4).name == \
        "local_conv2d_wgrad_f64_k3x3_r3_c4"
    assert gk.sum_slices_kernel("f32").name == "sum_slices_f32"


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("layer", range(13))
def test_launch_shapes_of_the_workload_layers_fit_the_hardware(layer, dtype):
    from gpuconv.cuda import grad_kernels as gk, kernels as k

    _, geom = k.workload_geometries()[layer]
    itemsize = np.dtype(dtype).itemsize
    igrad = gk.conv2d_input_grad_config(geom, dtype)
    assert igrad.shared_bytes <= k.SHARED_LIMIT_BYTES
    assert 32 <= igrad.block[0] * igrad.block[1] <= 128
    rows, cols = (int(v) for v in igrad.kernel.name.split("_r")[1].split("_")[0].split("x"))
    phases = geom.stride_h * geom.stride_w
    sub_h, sub_w = -(-geom.in_height // geom.stride_h), -(-geom.in_width // geom.stride_w)
    assert igrad.grid[0] * igrad.block[0] * igrad.block[1] * rows * cols >= \
        phases * sub_h * sub_w
    wgrad = gk.conv2d_weight_grad_config(geom, dtype)
    assert wgrad.scratch_elements * itemsize <= gk.PARTIAL_BUDGET_BYTES
    m_total = geom.batch * geom.out_height * geom.out_width
    assert (wgrad.slices - 1) * wgrad.m_slice < m_total <= wgrad.slices * wgrad.m_slice
    assert wgrad.grid[2] == wgrad.slices <= k.GRID_YZ_LIMIT
    assert 16 <= wgrad.block[0] * wgrad.block[1] <= 256
    local_i = gk.local_conv2d_input_grad_config(geom, dtype)
    assert local_i.shared_bytes <= k.SHARED_LIMIT_BYTES
    channels = int(local_i.kernel.name.split("_c")[-1])
    assert local_i.grid[0] == (phases * sub_h * local_i.v_tiles * geom.groups
                               * -(-geom.in_channels_per_group // channels))
    assert local_i.v_tiles * 32 >= sub_w
    local_w = gk.local_conv2d_weight_grad_config(geom, dtype)
    rows = int(local_w.kernel.name.split("_r")[1].split("_")[0])
    channels = int(local_w.kernel.name.split("_c")[-1])
    n_rows = geom.in_channels_per_group * geom.kernel_height
    assert local_w.row_blocks * local_w.block[1] * rows >= n_rows
    assert local_w.grid[0] == (-(-geom.out_height * geom.out_width // 32) * local_w.row_blocks
                               * geom.groups * -(-geom.out_channels_per_group // channels))
    for grid in (igrad.grid, wgrad.grid, local_i.grid, local_w.grid):
        assert k.check_grid(grid, "test") == grid


def test_weight_grad_slices_are_bounded_by_the_partial_budget(monkeypatch):
    from gpuconv.cuda import grad_kernels as gk

    geom = _geometry(64, 64, 32, 32, 64, 3, pad=1)
    config = gk.conv2d_weight_grad_config(geom, np.float32)
    assert config.slices > 1 and config.scratch_elements == config.slices * 64 * 64 * 9
    monkeypatch.setattr(gk, "PARTIAL_BUDGET_BYTES", 3 * 64 * 64 * 9 * 4)
    assert gk.conv2d_weight_grad_config(geom, np.float32).slices == 3
    monkeypatch.setattr(gk, "PARTIAL_BUDGET_BYTES", 0)
    config = gk.conv2d_weight_grad_config(geom, np.float32)
    assert config.slices == 1 and config.scratch_elements == 0
    assert gk.conv2d_weight_grad_scratch_elements(geom, np.float32) == 0


def test_workload_specialisations_include_the_gradient_kernels():
    from gpuconv.cuda import kernels as k

    names = [spec.name for spec in k.workload_specialisations()]
    assert len(names) == len(set(names))
    for prefix in ("conv2d_igrad_f32_k11x11", "conv2d_wgrad_f64_", "sum_slices_f32",
                   "local_conv2d_igrad_f32_k9x9", "local_conv2d_wgrad_f64_k7x7"):
        assert any(name.startswith(prefix) for name in names), prefix


def test_float16_gradients_take_the_float32_launch_shapes():
    """float16 stages float32 in shared memory: float32's shapes under f16 names; its
    conv2d weight gradient always sums through float32 scratch, counted in float16 elements."""
    from gpuconv.cuda import grad_kernels as gk, kernels as k

    for _, geom in k.workload_geometries():
        for config_of in (gk.conv2d_input_grad_config, gk.local_conv2d_input_grad_config,
                          gk.local_conv2d_weight_grad_config):
            half, single = config_of(geom, np.float16), config_of(geom, np.float32)
            assert half.kernel.name == single.kernel.name.replace("_f32_", "_f16_")
            assert half._replace(kernel=None) == single._replace(kernel=None)
        half = gk.conv2d_weight_grad_config(geom, np.float16)
        single = gk.conv2d_weight_grad_config(geom, np.float32)
        assert half.kernel.name == single.kernel.name.replace("_f32_", "_f16_")
        assert (half.grid, half.slices, half.m_slice) == (single.grid, single.slices,
                                                          single.m_slice)
        weights = geom.out_channels * geom.in_channels_per_group * geom.kernel_height \
            * geom.kernel_width
        assert half.scratch_elements == half.slices * weights
        assert gk.conv2d_weight_grad_scratch_elements(geom, np.float16) == 2 * half.slices * weights
    assert gk.partial_dtype(np.float16) == np.float32
    assert gk.partial_dtype(np.float64) == np.float64
    assert gk.sum_slices_kernel("f16").name == "sum_slices_f16"
