"""conv2d's implicit-GEMM gradients (gpuconv.cuda.conv2d_gemm_grad) against the float64
references.

Tests marked ``cuda`` launch them (a GPU, or the simulator with ``NUMBA_ENABLE_CUDASIM=1``,
where the tile is 8 x 8 with 4 a chunk, 16 threads): the geometries are tiny but leave partial
tiles along M, N and K, stride phases with and without taps, and several slices of the weight
gradient's K. Outputs start as NaN, so an element a kernel forgets fails the comparison. The
rest check the dispatch and the launch shapes and run everywhere.
"""

import numpy as np
import pytest

from gpuconv.device import cuda_available
from gpuconv.geometry import ConvGeometry, get_conv_outsize
from reference import (TOLERANCE, conv2d_input_grad_ref, conv2d_weight_grad_ref,
                       half_tolerance)

needs_cuda = pytest.mark.skipif(not cuda_available(), reason="numba.cuda cannot launch kernels "
                                "(no GPU and the simulator is off)")

DTYPES = [np.float16, np.float32, np.float64]
DTYPE_IDS = ["f16", "f32", "f64"]


def _geometry(n, c_in, h, w, c_out, k, stride=1, pad=0, dilation=1, groups=1):
    """A geometry with explicit (top, bottom, left, right) padding (an int: all four)."""
    kh, kw = (k, k) if isinstance(k, int) else k
    sh, sw = (stride, stride) if isinstance(stride, int) else stride
    dh, dw = (dilation, dilation) if isinstance(dilation, int) else dilation
    top, bottom, left, right = (pad,) * 4 if isinstance(pad, int) else pad
    return ConvGeometry(n, c_in, h, w, c_out, kh, kw, sh, sw, top, bottom, left, right, dh, dw,
                        groups, get_conv_outsize(h, kh, sh, top + bottom, dh),
                        get_conv_outsize(w, kw, sw, left + right, dw))


# The comments count the simulator's tiles (8 x 8, 4 a chunk).
CASES = {
    # 10 input channels (8 + 2), 6 output channels (4 + 2 a chunk), padding 1.
    "partial_tiles": dict(n=2, c_in=10, h=5, w=5, c_out=6, k=3, pad=1),
    # Stride (2, 3) with a 3 x 3 kernel: phases with 2 or 1 taps a row, 1 a column.
    "stride": dict(n=2, c_in=5, h=7, w=8, c_out=9, k=3, stride=(2, 3), pad=(1, 0, 0, 2)),
    # Stride 3 over a 2 x 2 kernel: phases no tap reaches (zeros there).
    "stride_gt_kernel": dict(n=1, c_in=3, h=9, w=8, c_out=5, k=2, stride=3),
    # Stride 2 and dilation 2 (taps step by one), a 2 x 3 kernel, asymmetric padding.
    "stride_dilation": dict(n=2, c_in=4, h=9, w=9, c_out=3, k=(2, 3), stride=2, dilation=2,
                            pad=(2, 1, 0, 2)),
    # Three groups of 4 input and 2 output channels.
    "groups": dict(n=1, c_in=12, h=4, w=4, c_out=6, k=3, groups=3, pad=1),
    # Dilation (2, 1) alone, an even kernel width.
    "dilation": dict(n=1, c_in=3, h=8, w=7, c_out=4, k=(3, 2), dilation=(2, 1),
                     pad=(1, 2, 1, 0)),
    # 1 x 1: a matrix product over channels; 9 positions (8 + 1).
    "kernel_1x1": dict(n=3, c_in=9, h=1, w=3, c_out=5, k=1),
}


def _reference(op, geom, x, w, gy):
    """(expected, magnitude bound) in float64 (the references see an explicitly padded
    input and no padding)."""
    top, bottom, left, right = geom.pad_top, geom.pad_bottom, geom.pad_left, geom.pad_right
    kwargs = dict(stride=(geom.stride_h, geom.stride_w), padding=0,
                  dilation=(geom.dilation_h, geom.dilation_w), groups=geom.groups)
    f64 = lambda a: np.asarray(a, np.float64)  # noqa: E731
    x, w, gy = f64(x), f64(w), f64(gy)
    if op == "input":
        padded = (geom.batch, geom.in_channels, geom.in_height + top + bottom,
                  geom.in_width + left + right)

        def crop(a):
            return a[:, :, top:top + geom.in_height, left:left + geom.in_width]

        return (crop(conv2d_input_grad_ref(padded, w, gy, **kwargs)),
                crop(conv2d_input_grad_ref(padded, np.abs(w), np.abs(gy), **kwargs)))

    def pad(a):
        return np.pad(a, ((0, 0), (0, 0), (top, bottom), (left, right)))

    shape = geom.shared_weight_shape()
    return (conv2d_weight_grad_ref(pad(x), shape, gy, **kwargs),
            conv2d_weight_grad_ref(pad(np.abs(x)), shape, np.abs(gy), **kwargs))


def _operands(geom, dtype, seed=7):
    rng = np.random.default_rng(seed)
    x = rng.uniform(-1, 1, (geom.batch, geom.in_channels, geom.in_height, geom.in_width))
    w = rng.uniform(-1, 1, geom.shared_weight_shape())
    gy = rng.uniform(-1, 1, geom.output_shape)
    return x.astype(dtype), w.astype(dtype), gy.astype(dtype)


def _config(op, geom, dtype):
    from gpuconv.cuda import conv2d_gemm_grad as gg

    if op == "input":
        return gg.input_grad_gemm_config(geom, dtype)
    return gg.weight_grad_gemm_config(geom, dtype)


def _launch(op, geom, x, w, gy, config=None):
    """One launch through the dispatcher's launch function (``config`` None: its choice)."""
    from numba import cuda

    from gpuconv.cuda import launch

    dtype = gy.dtype
    stream = cuda.default_stream()
    if op == "input":
        out = cuda.to_device(np.full(x.shape, np.nan, dtype))
        launch.launch_conv2d_input_grad(cuda.to_device(gy), cuda.to_device(w), out, geom,
                                        stream, config=config)
    else:
        out = cuda.to_device(np.full(w.shape, np.nan, dtype))
        launch.launch_conv2d_weight_grad(cuda.to_device(x), cuda.to_device(gy), out, geom,
                                         stream, config=config)
    return out.copy_to_host()


def _assert_matches(result, expected, bound, dtype, terms):
    result = np.asarray(result, np.float64)
    assert result.shape == expected.shape
    assert np.all(np.isfinite(result)), "an output was never written (NaN from the prefill)"
    tol = half_tolerance(terms) if dtype == np.float16 else TOLERANCE[np.dtype(dtype)]
    err = float(np.abs(result - expected).max())
    assert err <= tol * max(float(np.abs(bound).max()), 1e-300), f"error {err:.3e}"


def _terms(op, geom):
    if op == "input":
        return geom.out_channels_per_group * geom.kernel_height * geom.kernel_width
    return geom.batch * geom.out_height * geom.out_width


def _sliced(config, slices_wanted, geom):
    """``config`` with K cut into at least ``slices_wanted`` slices of whole chunks."""
    tile_k = int(config.kernel.name.split("_k")[1].split("_")[0])
    m_total = geom.batch * geom.out_height * geom.out_width
    chunks = -(-m_total // tile_k)
    k_slice = max(1, chunks // slices_wanted) * tile_k
    slices = -(-m_total // k_slice)
    elements = slices * geom.out_channels * geom.in_channels_per_group * (
        geom.kernel_height * geom.kernel_width)
    return config._replace(grid=config.grid[:2] + (slices,), slices=slices, k_slice=k_slice,
                           scratch_elements=elements)


# Every case in float32; float16 and float64 on the cases with stride phases and groups
# (the dtype changes loads, stores and the compute type, not the index arithmetic).
_DTYPE_CASES = ([pytest.param(np.float32, name, id=f"f32-{name}") for name in CASES]
                + [pytest.param(dtype, name, id=f"{code}-{name}")
                   for dtype, code in ((np.float16, "f16"), (np.float64, "f64"))
                   for name in ("stride", "stride_gt_kernel", "stride_dilation", "groups")])


@pytest.mark.cuda
@needs_cuda
@pytest.mark.parametrize("dtype, name", _DTYPE_CASES)
@pytest.mark.parametrize("op", ["input", "weight"])
def test_gemm_gradient_matches_the_reference(op, name, dtype):
    geom = _geometry(**CASES[name])
    x, w, gy = _operands(geom, dtype)
    result = _launch(op, geom, x, w, gy, _config(op, geom, dtype))
    _assert_matches(result, *_reference(op, geom, x, w, gy), dtype, _terms(op, geom))


@pytest.mark.cuda
@needs_cuda
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_weight_gradient_in_several_slices(dtype):
    """K (2 * 5 * 5 = 50 positions, 13 chunks) cut into slices summed in order; a slice
    boundary falls inside an image's rows."""
    geom = _geometry(**CASES["partial_tiles"])
    x, w, gy = _operands(geom, dtype, seed=11)
    config = _sliced(_config("weight", geom, dtype), 4, geom)
    assert config.slices >= 4
    result = _launch("weight", geom, x, w, gy, config)
    _assert_matches(result, *_reference("weight", geom, x, w, gy), dtype,
                    _terms("weight", geom))


@pytest.mark.cuda
@needs_cuda
@pytest.mark.parametrize("op", ["input", "weight"])
def test_two_calls_are_bitwise_equal(op):
    """No atomics, fixed summation orders (the weight gradient through three slices)."""
    geom = _geometry(**CASES["stride"])
    x, w, gy = _operands(geom, np.float32, seed=3)
    config = _config(op, geom, np.float32)
    if op == "weight":
        config = _sliced(config, 3, geom)
        assert config.slices >= 3
    first = _launch(op, geom, x, w, gy, config)
    second = _launch(op, geom, x, w, gy, config)
    assert first.tobytes() == second.tobytes()


@pytest.mark.cuda
@needs_cuda
def test_public_gradients_take_the_gemm_for_16_channels():
    """Through gpuconv.grad on the device: 16 input channels (the threshold), stride 2."""
    from gpuconv import grad
    from gpuconv.cuda import launch

    geom = _geometry(1, 16, 5, 5, 3, 3, stride=2, pad=1)
    x, w, gy = _operands(geom, np.float32, seed=5)
    assert "conv2d_igemm_" in launch.conv2d_input_grad_config(geom, np.float32).kernel.name
    assert "conv2d_wgemm_" in launch.conv2d_weight_grad_config(geom, np.float32).kernel.name
    kw = dict(stride=2, padding=1)
    gx = grad.conv2d_input(x.shape, w, gy, device="cuda", **kw)
    _assert_matches(gx, *_reference("input", geom, x, w, gy), np.float32, _terms("input", geom))
    gw = grad.conv2d_weight(x, w.shape, gy, device="cuda", **kw)
    _assert_matches(gw, *_reference("weight", geom, x, w, gy), np.float32,
                    _terms("weight", geom))


# --------------------------------------------------------------------------------------------
# dispatch and launch shapes (no device needed)
# --------------------------------------------------------------------------------------------

def test_channel_heavy_layers_take_the_gemms_and_the_others_keep_the_direct_kernels():
    from gpuconv.cuda import conv2d_gemm_grad as gg
    from gpuconv.cuda import grad_kernels, launch

    heavy = [_geometry(32, 64, 56, 56, 64, 3, pad=1),     # ResNet-50 res2 3x3
             _geometry(128, 16, 25, 25, 16, 5),           # DeepFace L6
             _geometry(2, 32, 9, 9, 8, 3, groups=2)]      # 16 channels a group
    light = [_geometry(32, 3, 227, 227, 96, 11, stride=4),  # AlexNet conv1
             _geometry(32, 10, 496, 496, 5, 3),             # seed conv2
             _geometry(2, 32, 9, 9, 8, 3, groups=4)]        # 8 channels a group
    for geom in heavy:
        assert gg.use_gemm_grad(geom)
        assert isinstance(launch.conv2d_input_grad_config(geom, np.float32),
                          gg.InputGradGemmConfig)
        assert isinstance(launch.conv2d_weight_grad_config(geom, np.float16),
                          gg.WeightGradGemmConfig)
    for geom in light:
        assert not gg.use_gemm_grad(geom)
        assert isinstance(launch.conv2d_input_grad_config(geom, np.float32),
                          grad_kernels.Conv2dInputGradConfig)
        assert isinstance(launch.conv2d_weight_grad_config(geom, np.float64),
                          grad_kernels.Conv2dWeightGradConfig)
    assert gg.GRAD_GEMM_MIN_CHANNELS == 16


def test_the_operation_table_and_the_plans_use_the_dispatcher():
    from gpuconv import ops
    from gpuconv.cuda import launch

    assert launch._CONFIG["conv2d_input"] is launch.conv2d_input_grad_config
    assert launch._CONFIG["conv2d_weight"] is launch.conv2d_weight_grad_config
    geom = _geometry(32, 64, 56, 56, 64, 3, pad=1)
    scratch = ops.OPS["conv2d_weight"].scratch("cuda")
    assert scratch(geom, np.float32) == launch.conv2d_weight_grad_scratch_elements(
        geom, np.float32) > 0


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64], ids=DTYPE_IDS)
def test_launch_shapes_on_the_default_suite(dtype, monkeypatch):
    """Real tiles (the simulator off): several waves on 132 SMs for the weight gradient,
    partial sums within the budget, tiles no wider than the channels need."""
    from gpuconv.cuda import conv2d_gemm_grad as gg

    monkeypatch.setattr(gg, "simulator_enabled", lambda: False)
    for geom in (_geometry(32, 64, 56, 56, 64, 3, pad=1),
                 _geometry(128, 16, 63, 63, 16, 9),
                 _geometry(128, 16, 25, 25, 16, 5),
                 _geometry(32, 512, 14, 14, 512, 3, pad=1),
                 _geometry(32, 96, 27, 27, 256, 5, pad=2)):
        igrad = gg.input_grad_gemm_config(geom, dtype)
        assert igrad.kernel.name.startswith("conv2d_igemm_")
        tile_n = int(igrad.kernel.name.split("_t")[1].split("x")[1].split("_")[0])
        assert tile_n >= min(geom.in_channels_per_group, 64)
        assert tile_n <= max(16, 2 * geom.in_channels_per_group)
        wgrad = gg.weight_grad_gemm_config(geom, dtype)
        blocks = wgrad.grid[0] * wgrad.grid[1] * wgrad.grid[2]
        assert blocks >= 132 * 2, (geom, wgrad.grid)
        assert wgrad.scratch_elements * 4 <= gg.PARTIAL_BUDGET_BYTES * 2
        tile_k = int(wgrad.kernel.name.split("_k")[1].split("_")[0])
        assert wgrad.k_slice % tile_k == 0
        assert wgrad.steps == (tile_k // geom.out_width, tile_k % geom.out_width)
        if dtype == np.float16:
            assert wgrad.scratch_elements > 0  # float32 partial sums, rounded by the sum


def test_input_gradient_phases_and_steps():
    from gpuconv.cuda import conv2d_gemm_grad as gg

    geom = _geometry(2, 16, 9, 9, 3, (2, 3), stride=2, dilation=2, pad=(2, 1, 0, 2))
    config = gg.input_grad_gemm_config(geom, np.float32)
    assert config.steps == (1, 1, 1, 1)  # gcd(2, 2) = 2: every tap, offsets step by one
    assert config.grid[0] == 4 * config.tiles_m
    geom = _geometry(2, 16, 9, 9, 3, 3, stride=(2, 3))
    assert gg.input_grad_gemm_config(geom, np.float32).steps == (2, 3, 1, 1)


def test_empty_batch_weight_gradient_is_zero_without_a_launch():
    from gpuconv.cuda import conv2d_gemm_grad as gg

    geom = _geometry(0, 16, 5, 5, 4, 3)
    config = gg.weight_grad_gemm_config(geom, np.float32)
    assert config.slices == 0 and config.grid is None and config.scratch_elements == 0


def test_factory_rejects_tiles_that_do_not_split():
    from gpuconv.cuda import conv2d_gemm_grad as gg

    with pytest.raises(ValueError, match="tile_k"):
        gg.input_grad_gemm_kernel("f32", 64, 64, 6, 4, 4, 2)
    with pytest.raises(ValueError, match="split evenly"):
        gg.weight_grad_gemm_kernel("f32", 64, 60, 8, 4, 8, 2)
    spec = gg.weight_grad_gemm_kernel("f16", 128, 16, 8, 8, 2, 4)
    assert spec.name == "conv2d_wgemm_f16_t128x16_k8_r8x2_o4"
    assert spec.launch_bounds == (128, 4)


@pytest.mark.cuda
@needs_cuda
@pytest.mark.parametrize("dtype", [np.float32, np.float16], ids=["f32", "f16"])
def test_the_gpu_16_wide_weight_tile_matches_the_reference(dtype, monkeypatch):
    """The GPU's 16-wide weight-gradient tile (64 columns, 16 positions a chunk, 128
    threads), forced where the simulator would take its own: 144 columns (two full tiles and
    a partial one), 10 output channels of 16, 50 positions (three full chunks and a partial
    one) cut into two slices; float16 through its float32 partial sums."""
    from gpuconv.cuda import conv2d_gemm_grad as gg

    tile = gg.WGRAD_TILES["f32"][-1]
    assert tile[1] == 16 and tile[2] == 16
    monkeypatch.setitem(gg.WGRAD_TILES, "sim", (tile,))
    monkeypatch.setitem(gg.WGRAD_TILES, "f32", (tile,))
    geom = _geometry(n=2, c_in=16, h=5, w=5, c_out=10, k=3, pad=1)
    x, w, gy = _operands(geom, dtype, seed=13)
    config = _sliced(gg.weight_grad_gemm_config(geom, dtype), 2, geom)
    assert config.kernel.name.startswith(f"conv2d_wgemm_{'f16' if dtype == np.float16 else 'f32'}"
                                         "_t64x16_k16_")
    assert config.slices == 2 and config.grid[0] == 3
    result = _launch("weight", geom, x, w, gy, config)
    _assert_matches(result, *_reference("weight", geom, x, w, gy), dtype,
                    _terms("weight", geom))
