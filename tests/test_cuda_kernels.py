"""The CUDA kernels and their launch layer, against the float64 reference.

Tests marked ``cuda`` need ``numba.cuda`` to launch kernels: a GPU, or the simulator
(``NUMBA_ENABLE_CUDASIM=1``, where sizes stay tiny; ``tests/test_cuda_sim.py`` runs them so).
The rest check the pure launch-shape logic and run everywhere.
"""

import numpy as np
import pytest

from gpuconv.conv import _Operand
from gpuconv.device import cuda_available
from gpuconv.geometry import conv_geometry
from reference import TOLERANCE, conv2d_ref, half_tolerance, local_conv2d_ref

needs_cuda = pytest.mark.skipif(not cuda_available(), reason="numba.cuda cannot launch kernels "
                                "(no GPU and the simulator is off; tests/test_cuda_sim.py runs "
                                "these in the simulator)")

DTYPES = [np.float32, np.float64]
DTYPE_IDS = ["f32", "f64"]


def _geometry(n, c_in, h, w, c_out, k, stride=1, padding=0, dilation=1, groups=1):
    kh, kw = (k, k) if isinstance(k, int) else k
    return conv_geometry((n, c_in, h, w), (kh, kw), c_out, stride, padding, dilation, groups)


def _operands(rng, geom, dtype, local, bias_kind):
    x = rng.uniform(-1, 1, (geom.batch, geom.in_channels, geom.in_height, geom.in_width))
    shape = geom.local_weight_shape() if local else geom.shared_weight_shape()
    w = rng.uniform(-1, 1, shape)
    if bias_kind is None:
        b = None
    elif bias_kind == "channel":
        b = rng.uniform(-1, 1, geom.out_channels)
    else:
        b = rng.uniform(-1, 1, (geom.out_channels, geom.out_height, geom.out_width))
    cast = (lambda a: None if a is None else a.astype(dtype))
    return cast(x), cast(w), cast(b)


def _kwargs(geom):
    return dict(stride=(geom.stride_h, geom.stride_w),
                padding=((geom.pad_top, geom.pad_left)),
                dilation=(geom.dilation_h, geom.dilation_w), groups=geom.groups)


def _reference(local, x, w, b, geom):
    """(expected, magnitude bound) in float64; padding here is symmetric by construction."""
    ref = local_conv2d_ref if local else conv2d_ref
    kwargs = _kwargs(geom)
    expected = ref(x, w, b, **kwargs)
    bound = ref(np.abs(x), np.abs(w), None if b is None else np.abs(b), **kwargs)
    return expected, bound


def _assert_matches(y, expected, bound, dtype, terms=None):
    """float16 needs ``terms``, the length of each output's sum (see half_tolerance)."""
    y = np.asarray(y, dtype=np.float64)
    assert y.shape == expected.shape
    assert np.all(np.isfinite(y)), "NaN/Inf in the output where the reference has none"
    scale = max(float(np.abs(bound).max()), np.finfo(np.float64).tiny)
    err = float(np.abs(y - expected).max())
    tol = half_tolerance(terms) if np.dtype(dtype) == np.float16 else TOLERANCE[np.dtype(dtype)]
    assert err <= tol * scale, f"error {err:.3e}, scale {scale:.3e}"


def _op(value):
    if value is None:
        return None
    if isinstance(value, np.ndarray):
        return _Operand(value, value.shape, value.dtype, False)
    return _Operand(value, tuple(value.shape), np.dtype(value.dtype), True)


def _run(local, x, w, b, geom):
    from gpuconv.cuda import launch as _cuda

    from gpuconv.ops import OPS

    return _cuda.run(OPS["local_conv2d" if local else "conv2d"], [_op(x), _op(w), _op(b)], geom)


# Tiny geometries covering the features; several give outputs that are not multiples of a
# thread block's tile (W_out 68 spans two 64-wide float32 tiles and three 32-wide float64
# ones; H_out 18 two 16-high tiles) and a channel count that leaves a partial channel
# block (C_out 11: 6 + 5 in float32, 4 + 4 + 3 in float64).
FEATURES = {
    "plain": dict(n=2, c_in=2, h=5, w=6, c_out=3, k=3),
    "wide_two_tiles": dict(n=1, c_in=1, h=4, w=70, c_out=2, k=3),
    "tall_two_tiles": dict(n=1, c_in=2, h=20, w=5, c_out=3, k=3),
    "partial_channel_block": dict(n=1, c_in=2, h=4, w=4, c_out=11, k=2),
    "stride": dict(n=2, c_in=2, h=7, w=8, c_out=2, k=3, stride=(2, 3)),
    "stride_gt_kernel": dict(n=1, c_in=1, h=9, w=9, c_out=2, k=2, stride=3),
    "padding": dict(n=1, c_in=2, h=4, w=5, c_out=2, k=3, padding=(2, 1)),
    "asymmetric_same": dict(n=1, c_in=1, h=5, w=6, c_out=2, k=(2, 4), padding="same"),
    "dilation": dict(n=1, c_in=2, h=8, w=7, c_out=2, k=3, dilation=(2, 1), padding=1),
    "groups": dict(n=2, c_in=4, h=5, w=5, c_out=6, k=3, groups=2, padding=1),
    "depthwise": dict(n=1, c_in=3, h=4, w=5, c_out=3, k=3, groups=3),
    "kernel_1x1": dict(n=3, c_in=5, h=3, w=4, c_out=4, k=1),
    "output_1x1": dict(n=1, c_in=2, h=5, w=5, c_out=1, k=5),
}


# Which bias each feature case carries (local_conv2d; conv2d takes "channel" wherever this
# is not None): both kinds and none are each covered by several geometries.
BIAS_KIND = {name: kind for names, kind in (
    (("plain", "kernel_1x1"), None),
    (("wide_two_tiles", "partial_channel_block", "stride_gt_kernel", "asymmetric_same",
      "groups", "output_1x1"), "position"),
    (("tall_two_tiles", "stride", "padding", "dilation", "depthwise"), "channel"),
) for name in names}
assert set(BIAS_KIND) == set(FEATURES)


def _feature_geometry(name):
    spec = dict(FEATURES[name])
    padding = spec.pop("padding", 0)
    g = spec
    kernel = g["k"]
    geom = _geometry(g["n"], g["c_in"], g["h"], g["w"], g["c_out"], kernel,
                     g.get("stride", 1), padding, g.get("dilation", 1), g.get("groups", 1))
    return geom, padding


def _reference_public(local, x, w, b, geom, padding):
    ref = local_conv2d_ref if local else conv2d_ref
    kwargs = dict(stride=(geom.stride_h, geom.stride_w), padding=padding,
                  dilation=(geom.dilation_h, geom.dilation_w), groups=geom.groups)
    expected = ref(x, w, b, **kwargs)
    bound = ref(np.abs(x), np.abs(w), None if b is None else np.abs(b), **kwargs)
    return expected, bound


@pytest.mark.cuda
@needs_cuda
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("name", list(FEATURES))
@pytest.mark.parametrize("local", [False, True], ids=["conv2d", "local_conv2d"])
def test_feature_grid_host_inputs(local, name, dtype):
    rng = np.random.default_rng(sum(map(ord, name)))
    geom, padding = _feature_geometry(name)
    bias_kind = BIAS_KIND[name] if local else (None if BIAS_KIND[name] is None else "channel")
    x, w, b = _operands(rng, geom, dtype, local, bias_kind)
    y = _run(local, x, w, b, geom)
    assert isinstance(y, np.ndarray) and y.dtype == np.dtype(dtype)
    _assert_matches(y, *_reference_public(local, x, w, b, geom, padding), dtype)


def _device_arrays(*arrays):
    from numba import cuda

    return [None if a is None else cuda.to_device(a) for a in arrays]


@pytest.mark.cuda
@needs_cuda
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("local", [False, True], ids=["conv2d", "local_conv2d"])
def test_numba_device_arrays_in_device_array_out(local, dtype):
    rng = np.random.default_rng(11)
    geom, padding = _feature_geometry("groups")
    x, w, b = _operands(rng, geom, dtype, local, "channel")
    d_x, d_w, d_b = _device_arrays(x, w, b)
    y = _run(local, d_x, d_w, d_b, geom)
    assert not isinstance(y, np.ndarray) and hasattr(y, "copy_to_host")
    assert tuple(y.shape) == geom.output_shape and np.dtype(y.dtype) == np.dtype(dtype)
    _assert_matches(y.copy_to_host(), *_reference_public(local, x, w, b, geom, padding), dtype)


@pytest.mark.cuda
@needs_cuda
@pytest.mark.parametrize("local", [False, True], ids=["conv2d", "local_conv2d"])
def test_non_contiguous_device_inputs_are_copied_on_the_device(local):
    rng = np.random.default_rng(12)
    geom, padding = _feature_geometry("stride")
    x, w, b = _operands(rng, geom, np.float64, local, "channel")
    # Strided views: every other element of a larger array, and a reversed axis.
    big_x = np.zeros((geom.batch, geom.in_channels, geom.in_height, 2 * geom.in_width))
    big_x[..., ::2] = x
    d_x = _device_arrays(big_x)[0][..., ::2]
    d_w = _device_arrays(np.ascontiguousarray(w[::-1]))[0][::-1]
    assert not d_x.is_c_contiguous() and not d_w.is_c_contiguous()
    d_b = _device_arrays(b)[0]
    y = _run(local, d_x, d_w, d_b, geom)
    _assert_matches(y.copy_to_host(),
                    *_reference_public(local, x, w, b, geom, padding), np.float64)


@pytest.mark.cuda
@needs_cuda
@pytest.mark.parametrize("on_gpu", [False, True], ids=["host", "device"])
@pytest.mark.parametrize("local", [False, True], ids=["conv2d", "local_conv2d"])
def test_empty_batch_returns_empty_output_of_the_right_kind(local, on_gpu):
    import gpuconv

    geom = _geometry(0, 2, 5, 5, 3, 3)
    x = np.zeros((0, 2, 5, 5), np.float32)
    w = np.ones(geom.local_weight_shape() if local else geom.shared_weight_shape(), np.float32)
    if on_gpu:
        x, w = _device_arrays(x, w)
    y = (gpuconv.local_conv2d if local else gpuconv.conv2d)(x, w, device="cuda")
    assert tuple(y.shape) == (0, 3, 3, 3) and np.dtype(y.dtype) == np.float32
    assert isinstance(y, np.ndarray) != on_gpu


@pytest.mark.cuda
@needs_cuda
@pytest.mark.parametrize("local", [False, True], ids=["conv2d", "local_conv2d"])
def test_every_output_written_over_a_nan_poisoned_buffer(local):
    """The launch layer fills a NaN-filled output completely (no element left unwritten)."""
    from numba import cuda

    from gpuconv.cuda import launch as _cuda

    rng = np.random.default_rng(13)
    geom, padding = _feature_geometry("wide_two_tiles")
    x, w, b = _operands(rng, geom, np.float32, local, "channel")
    d_x, d_w, d_b = _device_arrays(x, w, b)
    d_out = cuda.to_device(np.full(geom.output_shape, np.nan, np.float32))
    launch = _cuda.launch_local_conv2d if local else _cuda.launch_conv2d
    launch(d_x, d_w, d_b, d_out, geom, cuda.default_stream())
    _assert_matches(d_out.copy_to_host(),
                    *_reference_public(local, x, w, b, geom, padding), np.float32)


@pytest.mark.cuda
@needs_cuda
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("c_in, chunk", [(3, 1), (5, 2)], ids=["stages_1x3", "stages_2_2_1"])
def test_conv2d_several_channel_stages_and_batch_grid_stride(c_in, chunk, dtype):
    """Force few input channels per shared-memory stage (the last one partial) and one
    block along z for the whole batch."""
    from numba import cuda

    from gpuconv.cuda import kernels as _cuda_kernels, launch as _cuda

    rng = np.random.default_rng(14)
    geom = _geometry(3, c_in, 5, 4, 5, 3, padding=1)
    x, w, b = _operands(rng, geom, dtype, False, "channel")
    config = _cuda_kernels.conv2d_config(geom, dtype)
    assert config.chunk == c_in
    config = config._replace(chunk=chunk, grid=config.grid[:2] + (1,),
                             shared_bytes=config.shared_bytes // c_in * chunk)
    d_x, d_w, d_b = _device_arrays(x, w, b)
    d_out = cuda.to_device(np.full(geom.output_shape, np.nan, dtype))
    _cuda.launch_conv2d(d_x, d_w, d_b, d_out, geom, cuda.default_stream(), config)
    _assert_matches(d_out.copy_to_host(), *_reference(False, x, w, b, geom), dtype)


# local_conv2d with forced small tiles: every remainder path of the batched-GEMM kernel at
# simulator sizes. Geometry: batch 5 in tiles of 2 x 2 images (a full and a partial batch
# tile), c_Og 3 in blocks of 2 maps (a partial map block), two groups, W_out 5 in blocks
# of 3 positions (a partial position tile), c_Ig * k_H = 6 kernel rows in stages of 2 or 4
# (the last one partial), stride, padding and dilation; one or two split-K slices.
_LOCAL_FORCED = dict(n=5, c_in=4, h=6, w=9, c_out=6, k=(3, 2), stride=(1, 2),
                     padding=(1, 1), dilation=(2, 1), groups=2)


def _forced_local_geometry():
    g = _LOCAL_FORCED
    return _geometry(g["n"], g["c_in"], g["h"], g["w"], g["c_out"], g["k"], g["stride"],
                     g["padding"], g["dilation"], g["groups"])


def _forced_local_config(geom, dtype, stage_rows, slices):
    from gpuconv.cuda import kernels as _cuda_kernels

    config = _cuda_kernels.local_conv2d_launch(geom, dtype, 2, 2, (2, 1, 3),
                                               stage_rows=stage_rows, slices=slices)
    assert config.batch_tiles == 2 and config.tiles_x == 2 and config.grid[1] == 4
    assert config.slices == slices and config.stage_rows == stage_rows
    return config


def _launch_local(config, x, w, b, geom, dtype):
    from numba import cuda

    from gpuconv.cuda import launch as _cuda

    d_x, d_w, d_b = _device_arrays(x, w, b)
    d_out = cuda.to_device(np.full(geom.output_shape, np.nan, dtype))
    _cuda.launch_local_conv2d(d_x, d_w, d_b, d_out, geom, cuda.default_stream(), config)
    return d_out.copy_to_host()


@pytest.mark.cuda
@needs_cuda
@pytest.mark.parametrize("stage_rows, slices", [(2, 1), (4, 1), (2, 2)],
                         ids=["stages_2x3", "stages_4_2", "two_slices"])
@pytest.mark.parametrize("bias_kind", [None, "channel", "position"])
@pytest.mark.parametrize("dtype", DTYPES + [np.float16], ids=DTYPE_IDS + ["f16"])
def test_local_conv2d_remainders_stages_and_slices(dtype, bias_kind, stage_rows, slices):
    geom = _forced_local_geometry()
    assert (geom.out_width, geom.in_channels_per_group * geom.kernel_height) == (5, 6)
    rng = np.random.default_rng(15)
    x, w, b = _operands(rng, geom, dtype, True, bias_kind)
    config = _forced_local_config(geom, dtype, stage_rows, slices)
    y = _launch_local(config, x, w, b, geom, dtype)
    _assert_matches(y, *_reference(True, x, w, b, geom), dtype, _terms(geom, b))


@pytest.mark.cuda
@needs_cuda
@pytest.mark.parametrize("dtype", [np.float32, np.float16], ids=["f32", "f16"])
def test_local_conv2d_is_bitwise_deterministic(dtype):
    """The same call twice gives the same bits, split-K partial sums included (added in a
    fixed order, no atomics)."""
    geom = _forced_local_geometry()
    rng = np.random.default_rng(18)
    x, w, b = _operands(rng, geom, dtype, True, "position")
    config = _forced_local_config(geom, dtype, 2, 2)
    first = _launch_local(config, x, w, b, geom, dtype)
    second = _launch_local(config, x, w, b, geom, dtype)
    np.testing.assert_array_equal(first.view(np.uint8), second.view(np.uint8))


@pytest.mark.cuda
@needs_cuda
@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["f32", "f64"])
def test_local_conv2d_input_loads_per_round_change_no_bit(dtype):
    """The input walk at 1 load a round and at the most the registers take (the acceptance
    run times other counts beside the default): each agrees with the float64 reference and
    gives the default count's bits (the same sums in the same order), over two stages of a
    partial last round."""
    from gpuconv.cuda import kernels as _cuda_kernels

    geom = _forced_local_geometry()
    rng = np.random.default_rng(21)
    x, w, b = _operands(rng, geom, dtype, True, "channel")
    code = _cuda_kernels.compute_code(_cuda_kernels.dtype_code(dtype))
    default = _launch_local(_forced_local_config(geom, dtype, 2, 1), x, w, b, geom, dtype)
    for loads in (1, _cuda_kernels.LOCAL_WEIGHT_LOADS[code]):
        config = _cuda_kernels.local_conv2d_launch(geom, dtype, 2, 2, (2, 1, 3), stage_rows=2,
                                                   input_loads=loads)
        assert config.input_loads == loads and config.kernel.name.endswith(f"_x{loads}")
        y = _launch_local(config, x, w, b, geom, dtype)
        _assert_matches(y, *_reference(True, x, w, b, geom), dtype, _terms(geom, b))
        np.testing.assert_array_equal(y.view(np.uint8), default.view(np.uint8))


@pytest.mark.cuda
@needs_cuda
def test_local_conv2d_small_batch_streams_the_weights():
    """A batch of 3 (<= 8): the register tile holds every image, so each weight is read
    by one thread; 13 maps on 4 map lanes of up to 4 maps (the last tile partial)."""
    from gpuconv.cuda import kernels as _cuda_kernels

    geom = _geometry(3, 2, 5, 12, 13, 3, padding=1)
    config = _cuda_kernels.local_conv2d_config(geom, np.float32)
    assert config.block[0] == 1 and "_t3x" in config.kernel.name
    rng = np.random.default_rng(19)
    x, w, b = _operands(rng, geom, np.float32, True, "channel")
    y = _launch_local(config, x, w, b, geom, np.float32)
    _assert_matches(y, *_reference(True, x, w, b, geom), np.float32)


@pytest.mark.cuda
@needs_cuda
@pytest.mark.parametrize("local", [False, True], ids=["conv2d", "local_conv2d"])
def test_nan_input_reaches_exactly_the_outputs_whose_window_holds_it(local):
    rng = np.random.default_rng(16)
    # stride > kernel: some inputs are in no window at all; padding puts windows on the edge.
    geom = _geometry(2, 2, 8, 9, 3, 2, stride=3, padding=1)
    x, w, b = _operands(rng, geom, np.float32, local, "channel")
    x[0, 1, 0, 0] = np.nan      # in the corner window (with padding)
    x[1, 0, 2, 4] = np.nan      # between windows: reaches nothing
    x[1, 1, 4, 5] = np.inf      # one window
    y = _run(local, x, w, b, geom)
    expected, _ = _reference(local, x, w, b, geom)
    np.testing.assert_array_equal(np.isnan(y), np.isnan(expected))
    np.testing.assert_array_equal(np.isinf(y), np.isinf(expected))
    assert np.isnan(y).any()


@pytest.mark.cuda
@needs_cuda
def test_inputs_on_different_gpus_are_refused(monkeypatch):
    from gpuconv.cuda import launch as _cuda

    geom = _geometry(1, 1, 3, 3, 1, 3)
    x, w = _device_arrays(np.ones((1, 1, 3, 3)), np.ones((1, 1, 3, 3)))
    ids = iter([0, 1])
    monkeypatch.setattr(_cuda, "simulator_enabled", lambda: False)
    monkeypatch.setattr(_cuda, "_device_id", lambda obj: next(ids))
    with pytest.raises(ValueError, match="same GPU"):
        _run(False, x, w, None, geom)


# ----------------------------------------------------------------------------------------
# float16: stored in half precision, computed in float32 (the public tests run the feature
# grid; these cover the launch paths and what float32 accumulation buys)
# ----------------------------------------------------------------------------------------

def _terms(geom, bias):
    return geom.in_channels_per_group * geom.kernel_height * geom.kernel_width + (bias is not None)


@pytest.mark.cuda
@needs_cuda
@pytest.mark.parametrize("name", ["wide_two_tiles", "partial_channel_block"])
@pytest.mark.parametrize("local", [False, True], ids=["conv2d", "local_conv2d"])
def test_float16_numba_device_arrays(local, name):
    """Device arrays in, a float16 device array out: two tiles of the wide register block,
    a partial channel block."""
    rng = np.random.default_rng(31)
    geom, padding = _feature_geometry(name)
    x, w, b = _operands(rng, geom, np.float16, local, "position" if local else "channel")
    y = _run(local, *_device_arrays(x, w, b), geom)
    assert np.dtype(y.dtype) == np.float16 and tuple(y.shape) == geom.output_shape
    _assert_matches(y.copy_to_host(), *_reference_public(local, x, w, b, geom, padding),
                    np.float16, _terms(geom, b))


@pytest.mark.cuda
@needs_cuda
@pytest.mark.parametrize("local", [False, True], ids=["conv2d", "local_conv2d"])
def test_float16_non_contiguous_device_inputs_are_copied_as_half(local):
    """Strided float16 device inputs get contiguous float16 copies (copy6d_f16)."""
    rng = np.random.default_rng(32)
    geom, padding = _feature_geometry("stride")
    x, w, b = _operands(rng, geom, np.float16, local, "channel")
    big_x = np.zeros((geom.batch, geom.in_channels, geom.in_height, 2 * geom.in_width),
                     np.float16)
    big_x[..., ::2] = x
    d_x = _device_arrays(big_x)[0][..., ::2]
    d_w = _device_arrays(np.ascontiguousarray(w[::-1]))[0][::-1]
    assert not d_x.is_c_contiguous() and not d_w.is_c_contiguous()
    y = _run(local, d_x, d_w, _device_arrays(b)[0], geom)
    _assert_matches(y.copy_to_host(), *_reference_public(local, x, w, b, geom, padding),
                    np.float16, _terms(geom, b))


@pytest.mark.cuda
@needs_cuda
@pytest.mark.parametrize("local", [False, True], ids=["conv2d", "local_conv2d"])
def test_float16_sums_beyond_the_half_range_come_back_in_range(local):
    """Partial sums of 2 * 60000 exceed float16's largest value (65504); accumulated in
    float32 they do not overflow, and the result, 60000, is exact. NaN and Inf in the
    input reach exactly their windows."""
    geom = _geometry(1, 3, 3, 3, 2, 1)
    x = np.empty((1, 3, 3, 3), np.float16)
    x[0, 0], x[0, 1], x[0, 2] = 60000, 60000, -60000
    x[0, 1, 2, 2] = np.nan
    x[0, 0, 0, 2] = np.inf
    shape = geom.local_weight_shape() if local else geom.shared_weight_shape()
    w = np.ones(shape, np.float16)
    y = _run(local, x, w, None, geom)
    assert y.dtype == np.float16
    expected = np.full((1, 2, 3, 3), 60000.0)
    expected[0, :, 2, 2] = np.nan
    expected[0, :, 0, 2] = np.inf
    np.testing.assert_array_equal(y, expected)


# ----------------------------------------------------------------------------------------
# pure launch-shape logic (no GPU needed)
# ----------------------------------------------------------------------------------------

def test_factories_are_memoised_and_named_by_their_constants():
    from gpuconv.cuda import kernels as k

    spec = k.conv2d_kernel("f32", 3, 5, 2, 2, 8)
    assert spec is k.conv2d_kernel("f32", 3, 5, 2, 2, 8)
    assert spec.name == "conv2d_f32_k3x5_r2x2_c8" == spec.pyfunc.__name__
    local = k.local_conv2d_kernel("f64", 7, 7, 4, 3, 8, 2)
    assert local is k.local_conv2d_kernel("f64", 7, 7, 4, 3, 8, 2)
    assert local.name == "local_conv2d_f64_k7x7_t4x3_l8x2" == local.pyfunc.__name__
    assert k.local_conv2d_kernel("f16", 3, 3, 8, 4, 4, 8, True).name == \
        "local_conv2d_f16_k3x3_t8x4_l4x8_partial"
    # the input walk's loads a round: named where not the default, bounded by the registers
    assert k.local_conv2d_kernel("f32", 3, 3, 8, 4, 4, 8, input_loads=2).name == \
        "local_conv2d_f32_k3x3_t8x4_l4x8_x2"
    geom = _forced_local_geometry()
    default = k.local_conv2d_launch(geom, np.float32, 2, 2, (2, 1, 3))
    asked = k.local_conv2d_launch(geom, np.float32, 2, 2, (2, 1, 3),
                                  input_loads=k.LOCAL_INPUT_LOADS["f32"])
    assert asked.kernel is default.kernel and asked == default
    assert default.input_loads == k.LOCAL_INPUT_LOADS["f32"]
    for loads in (0, k.LOCAL_WEIGHT_LOADS["f64"] + 1):
        with pytest.raises(ValueError, match="input_loads must be 1 to"):
            k.local_conv2d_launch(geom, np.float64, 2, 2, (2, 1, 3), input_loads=loads)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("layer", range(13))
def test_launch_shapes_of_the_workload_layers_fit_the_hardware(layer, dtype):
    from gpuconv.cuda import conv2d_gemm, kernels as k

    _, geom = k.workload_geometries()[layer]
    conv = k.conv2d_config(geom, dtype)
    if isinstance(conv, conv2d_gemm.Conv2dGemmConfig):  # channel-heavy: the implicit GEMM
        tile_m, tile_n = (int(v) for v in conv.kernel.name.split("_t")[1].split("_")[0].split("x"))
        assert conv.grid[0] * tile_m >= geom.batch * geom.out_height * geom.out_width
        assert conv.grid[1] == geom.groups * conv.blocks_n
        assert conv.blocks_n * tile_n >= geom.out_channels_per_group
        assert conv.block[0] == conv.kernel.launch_bounds[0] <= 1024
        assert conv.grid[1] <= 65535
    else:
        _check_direct_conv2d_launch(conv, geom, k)
    local = k.local_conv2d_config(geom, dtype)
    batch_lanes, map_lanes, positions = local.block
    tile, maps = (int(v) for v in local.kernel.name.split("_t")[1].split("_")[0].split("x"))
    assert local.grid[0] == local.batch_tiles * local.tiles_x * geom.out_height
    assert local.batch_tiles * batch_lanes * tile >= geom.batch
    assert local.tiles_x * positions >= geom.out_width
    assert local.grid[1] * map_lanes * maps >= geom.out_channels
    assert local.slices * local.slice_rows >= geom.in_channels_per_group * geom.kernel_height
    assert batch_lanes * map_lanes * positions <= local.kernel.launch_bounds[0]
    assert local.shared_bytes <= k.SHARED_LIMIT_BYTES


def _check_direct_conv2d_launch(conv, geom, k):
    per_channel = conv.shared_bytes // conv.chunk
    assert conv.shared_bytes <= max(k.SHARED_BUDGET_BYTES, per_channel) <= k.SHARED_LIMIT_BYTES
    assert 32 <= conv.block[0] * conv.block[1] <= 1024
    assert conv.grid[1] <= 65535 and conv.grid[2] <= 65535
    rows, cols = (int(v) for v in conv.kernel.name.split("_r")[1].split("_")[0].split("x"))
    assert conv.grid[0] * conv.block[0] * conv.block[1] * rows * cols >= \
        geom.out_height * geom.out_width
    assert conv.tile_h == (conv.block[1] * rows - 1) * geom.stride_h + geom.kernel_height


def test_wide_float32_outputs_use_the_larger_register_block():
    from gpuconv.cuda import kernels as k

    geom, _ = _feature_geometry("wide_two_tiles")  # exercised on the device above
    assert "_r2x4_" in k.conv2d_config(geom, np.float32).kernel.name
    assert "_r2x2_" in k.conv2d_config(geom, np.float64).kernel.name
    narrow, _ = _feature_geometry("plain")
    assert "_r2x2_" in k.conv2d_config(narrow, np.float32).kernel.name


def test_huge_dilated_windows_shrink_the_block_or_are_refused():
    from gpuconv.cuda import kernels as k

    geom = _geometry(1, 1, 80, 80, 1, 3, dilation=35)
    config = k.conv2d_config(geom, np.float64)
    assert config.shared_bytes <= k.SHARED_LIMIT_BYTES and config.block[0] * config.block[1] < 32
    with pytest.raises(ValueError, match="shared memory"):
        k.conv2d_config(_geometry(1, 1, 900, 900, 1, 9, dilation=100), np.float64)


def test_workload_specialisations_cover_both_ops_and_dtypes():
    from gpuconv.cuda import kernels as k

    names = [spec.name for spec in k.workload_specialisations()]
    assert len(names) == len(set(names))
    layers = k.workload_kernel_names()
    assert len(layers) == 13 and all(a in names and b in names for a, b in layers.values())
    for prefix in ("conv2d_f32_k11x11", "conv2d_gemm_f64_t64x64", "local_conv2d_f32_k9x9",
                   "local_conv2d_f64_k5x5", "copy6d_f64", "conv2d_f16_k3x3",
                   "conv2d_gemm_f16_t128x64", "local_conv2d_f16_k5x5",
                   "local_conv2d_f16_k3x3_t8x4_l4x8_partial", "sum_slices_f32", "copy6d_f16",
                   "local_conv2d_igrad_cols_f32_t32x64", "local_conv2d_igrad_cols_f64_t32x32",
                   "transpose_maps_f16", "local_conv2d_col2im_f16",
                   "local_conv2d_wgrad_pos_f32_t32x64", "local_conv2d_wgrad_pos_f16_t32x64"):
        assert any(name.startswith(prefix) for name in names), prefix


def test_float16_takes_the_float32_launch_shapes_under_its_own_names():
    """float16 stages float32 in shared memory, so its launch shapes are float32's."""
    from gpuconv.cuda import kernels as k

    for _, geom in k.workload_geometries():
        for config_of in (k.conv2d_config, k.local_conv2d_config):
            half, single = config_of(geom, np.float16), config_of(geom, np.float32)
            # (float16's split-K partial sums are float32: a kernel of its own)
            assert half.kernel.name.removesuffix("_partial") == \
                single.kernel.name.replace("_f32_", "_f16_")
            assert half._replace(kernel=None) == single._replace(kernel=None)
            assert half.kernel.launch_bounds == single.kernel.launch_bounds
    assert k.conv2d_kernel("f16", 3, 3, 2, 4, 8).name == "conv2d_f16_k3x3_r2x4_c8"
    assert k.dtype_code(np.float16) == "f16" and k.compute_code("f16") == "f32"


@pytest.mark.parametrize("dtype, per_partial", [(np.float32, 1), (np.float16, 2)],
                         ids=["f32", "f16"])
def test_local_scratch_counts_the_split_k_partial_sums(dtype, per_partial):
    """DeepFace L5 at batch 32 (the batched GEMM: at 128 the per-position GEMM takes it)
    splits K (its grid would be under two waves): the scratch is one partial sum per slice
    (float32 for float16: two elements each); no transposed copy of the input any more,
    and no bias placeholder (the output stands in)."""
    from gpuconv import workloads
    from gpuconv.cuda import kernels as k
    from gpuconv.cuda import launch as _cuda

    geom = workloads.gpu_geometry("deepface-l5", 32)
    config = k.local_conv2d_config(geom, dtype)
    assert _cuda.local_conv2d_forward_config(geom, dtype).kernel == config.kernel
    assert config.slices > 1 and config.grid[2] == config.slices
    out = geom.batch * geom.out_channels * geom.out_height * geom.out_width
    assert _cuda.local_conv2d_scratch_elements(geom, dtype) == \
        config.slices * out * per_partial


def test_local_reads_are_conflict_free_on_the_default_suite():
    """The config's pitches put every lane of a warp's hot-loop reads in its own bank (or a
    broadcast), and the grid gives at least one wave of 512 threads on 132 SMs."""
    from gpuconv import bench, workloads
    from gpuconv.cuda import kernels as k

    for name in bench.SUITES["default"]:
        geom = workloads.gpu_geometry(name)
        config = k.local_conv2d_config(geom, np.float32)
        assert k.local_read_wavefronts(config.block, config.pos_pitch, config.x_pitch,
                                       geom.stride_w) == (1, 1), name
        threads = config.block[0] * config.block[1] * config.block[2]
        assert threads * config.grid[0] * config.grid[1] * config.grid[2] >= 132 * 512, name
