"""The local_conv2d gradients as batched GEMMs (gpuconv.cuda.local_grad_gemm), against the
float64 references.

Tests marked ``cuda`` launch kernels on Numba device arrays: a GPU, or the simulator
(``NUMBA_ENABLE_CUDASIM=1``, sizes tiny; ``tests/test_cuda_sim.py`` runs them so). Outputs
start as NaN, so an element a kernel forgets to write fails the comparison. The default
launch shapes of tiny layers have one lane per dimension, so the multi-lane, multi-tile,
multi-stage and multi-slice paths are forced through the ``*_launch`` functions. The rest
check the pure launch-shape logic and run everywhere.
"""

import numpy as np
import pytest

from gpuconv.device import cuda_available
from test_cuda_grad_kernels import (FEATURES, _assert_matches, _feature_geometry, _geometry,
                                    _launch, _operands, _reference, _terms)

needs_cuda = pytest.mark.skipif(not cuda_available(), reason="numba.cuda cannot launch kernels "
                                "(no GPU and the simulator is off; tests/test_cuda_sim.py runs "
                                "these in the simulator)")

OPS = ["local_input", "local_weight"]


def _gemm():
    from gpuconv.cuda import local_grad_gemm

    return local_grad_gemm


def _default_config(op, geom, dtype):
    gemm = _gemm()
    if op == "local_input":
        return gemm.local_input_grad_gemm_config(geom, dtype)
    return gemm.local_weight_grad_gemm_config(geom, dtype)


def _check(op, geom, dtype, seed, config=None):
    rng = np.random.default_rng(seed)
    x, w, gy = _operands(rng, op, geom, dtype)
    config = config or _default_config(op, geom, dtype)
    result = _launch(op, geom, x, w, gy, config)
    assert result.dtype == np.dtype(dtype)
    _assert_matches(result, *_reference(op, geom, x, w, gy), dtype, _terms(op, geom))
    return result


# float64 on every feature, float32 and float16 on those with the most index arithmetic.
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


# Random small layers: strides, padding, dilation, groups, batch 1..9 (seeded, so a failure
# reproduces), each in one of the three dtypes.
def _random_geometry(seed):
    rng = np.random.default_rng(seed)
    groups = int(rng.choice([1, 1, 2, 3]))
    c_in = groups * int(rng.integers(1, 4))
    c_out = groups * int(rng.integers(1, 4))
    k = (int(rng.integers(1, 4)), int(rng.integers(1, 5)))
    stride = (int(rng.integers(1, 4)), int(rng.integers(1, 4)))
    dilation = (int(rng.integers(1, 3)), int(rng.integers(1, 3)))
    pad = tuple(int(v) for v in rng.integers(0, 3, 4))
    span = [(k[i] - 1) * dilation[i] + 1 for i in range(2)]
    h = max(1, span[0] - pad[0] - pad[1]) + int(rng.integers(0, 6))
    w = max(1, span[1] - pad[2] - pad[3]) + int(rng.integers(0, 9))
    return _geometry(int(rng.integers(1, 10)), c_in, h, w, c_out, k, stride=stride, pad=pad,
                     dilation=dilation, groups=groups)


RANDOM = [pytest.param(seed, dtype, id=f"seed{seed}-{np.dtype(dtype).name}")
          for seed, dtype in zip(range(9), [np.float64, np.float32, np.float16] * 3)]


@pytest.mark.cuda
@needs_cuda
@pytest.mark.parametrize("seed, dtype", RANDOM)
@pytest.mark.parametrize("op", OPS)
def test_random_layers(op, seed, dtype):
    _check(op, _random_geometry(seed), dtype, 100 + seed)


@pytest.mark.cuda
@needs_cuda
@pytest.mark.parametrize("dtype", [np.float64, np.float32, np.float16], ids=["f64", "f32", "f16"])
def test_input_grad_lanes_tiles_and_stages(dtype):
    """2 x 2 lanes of 2 x 2 tiles over a batch of 5 and 5 channels (partial batch and
    channel tiles), 3 columns a block on a phase sub-grid of 4 (a partial column tile),
    one map a stage (three stages per kernel row), stride 2 x 2 with dilation 3 (every
    phase takes a different set of taps), asymmetric padding."""
    geom = _geometry(5, 5, 7, 8, 3, (3, 3), stride=2, pad=(1, 2, 2, 0), dilation=(1, 3))
    config = _gemm().local_input_grad_gemm_launch(geom, dtype, 2, 2, layout=(2, 2, 3),
                                                  chunk=1)
    assert config.batch_tiles == 2 and config.v_tiles == 2 and config.grid[1] == 2
    _check("local_input", geom, dtype, 31, config)


@pytest.mark.cuda
@needs_cuda
@pytest.mark.parametrize("dtype", [np.float64, np.float32], ids=["f64", "f32"])
def test_input_grad_gy_loads_per_round_change_no_bit(dtype):
    """The gy walk at 1 and 3 loads a round (the acceptance run times other counts beside
    the default) on the layer of :func:`test_input_grad_lanes_tiles_and_stages`: each agrees
    with the float64 reference and gives the default count's bits."""
    gemm = _gemm()
    geom = _geometry(5, 5, 7, 8, 3, (3, 3), stride=2, pad=(1, 2, 2, 0), dilation=(1, 3))
    default = _check("local_input", geom, dtype, 34, gemm.local_input_grad_gemm_launch(
        geom, dtype, 2, 2, layout=(2, 2, 3), chunk=1))
    for loads in (1, 3):
        config = gemm.local_input_grad_gemm_launch(geom, dtype, 2, 2, layout=(2, 2, 3),
                                                   chunk=1, gy_loads=loads)
        assert config.gy_loads == loads and config.kernel.name.endswith(f"_g{loads}")
        result = _check("local_input", geom, dtype, 34, config)
        np.testing.assert_array_equal(result.view(np.uint8), default.view(np.uint8))


@pytest.mark.cuda
@needs_cuda
@pytest.mark.parametrize("dtype", [np.float64, np.float32, np.float16], ids=["f64", "f32", "f16"])
def test_weight_grad_lanes_tiles_slices_and_stages(dtype):
    """Taps 2 per thread over 7 lanes (4 kernel rows of 3 = 12 taps: 14 slots), 2 x 2 maps
    of a group of 3 (a partial map tile), groups, 3 positions a block over 7 (a partial
    tile), 6 kernel rows in tiles of 4 (a partial last tile), dilation, a batch of 7 in 3
    slices of 3 (the last shorter) staged 2 images at a time (a partial last stage)."""
    geom = _geometry(7, 4, 6, 7, 6, 3, stride=(1, 1), pad=(1, 0, 0, 0), groups=2,
                     dilation=(2, 1))
    assert geom.in_channels_per_group * geom.kernel_height == 6
    config = _gemm().local_weight_grad_gemm_launch(geom, dtype, 2, 2, 4, layout=(7, 2, 3),
                                                   slices=3, chunk=2)
    assert config.slices == 3 and config.slice_n == 3 and config.k_tiles == 2
    assert config.kernel.name.endswith("_partial") == (np.dtype(dtype) == np.float16)
    _check("local_weight", geom, dtype, 32, config)


@pytest.mark.cuda
@needs_cuda
@pytest.mark.parametrize("op", OPS)
def test_two_calls_are_bitwise_equal(op):
    """No atomics, fixed summation orders: the same inputs give the same bits (the weight
    gradient through its partial sums over batch slices)."""
    geom = _geometry(9, 4, 6, 6, 4, 3, pad=1, groups=2)
    rng = np.random.default_rng(33)
    x, w, gy = _operands(rng, op, geom, np.float32)
    gemm = _gemm()
    if op == "local_input":
        config = gemm.local_input_grad_gemm_launch(geom, np.float32, 2, 2, layout=(2, 1, 4),
                                                   chunk=1)
    else:
        config = gemm.local_weight_grad_gemm_launch(geom, np.float32, 2, 4, 2, slices=3,
                                                    chunk=2)
        assert config.slices == 3
    first = _launch(op, geom, x, w, gy, config)
    second = _launch(op, geom, x, w, gy, config)
    assert first.tobytes() == second.tobytes()
    _assert_matches(first, *_reference(op, geom, x, w, gy), np.float32)


@pytest.mark.cuda
@needs_cuda
def test_weight_grad_of_an_empty_batch_is_zeros():
    geom = _geometry(0, 2, 5, 5, 2, 3)
    x = np.zeros((0, 2, 5, 5), np.float32)
    gy = np.zeros(geom.output_shape, np.float32)
    w = np.ones(geom.local_weight_shape(), np.float32)
    config = _gemm().local_weight_grad_gemm_config(geom, np.float32)
    np.testing.assert_array_equal(_launch("local_weight", geom, x, w, gy, config), 0)


@pytest.mark.cuda
@needs_cuda
def test_float16_partial_sums_pass_the_half_range():
    """Per position 60000 + 60000 - 60000 over three images: the float32 partial sums pass
    65504 (float16's largest value) and come back exact, in one slice and in three."""
    geom = _geometry(3, 1, 1, 2, 1, 1)
    x = np.ones((3, 1, 1, 2), np.float16)
    gy = np.array([60000, 60000, -60000], np.float16).reshape(3, 1, 1, 1) * np.ones(
        (1, 1, 1, 2), np.float16)
    w = np.ones(geom.local_weight_shape(), np.float16)
    gemm = _gemm()
    for slices in (1, 3):
        config = gemm.local_weight_grad_gemm_launch(geom, np.float16, 1, 1, 1, slices=slices)
        np.testing.assert_array_equal(_launch("local_weight", geom, x, w, gy, config), 60000)


# ----------------------------------------------------------------------------------------
# pure launch-shape logic (no GPU needed)
# ----------------------------------------------------------------------------------------

def test_factories_are_memoised_and_named_by_their_constants():
    gemm = _gemm()
    spec = gemm.local_input_grad_gemm_kernel("f32", 3, 3, 8, 4, 4, 8)
    assert spec is gemm.local_input_grad_gemm_kernel("f32", 3, 3, 8, 4, 4, 8)
    assert spec.name == "local_conv2d_igrad_gemm_f32_k3x3_t8x4_l4x8" == spec.pyfunc.__name__
    # the gy walk's loads a round: named where not the default; the default asked for by
    # its count is the same specialisation
    assert gemm.local_input_grad_gemm_kernel("f32", 3, 3, 8, 4, 4, 8, 2).name == \
        "local_conv2d_igrad_gemm_f32_k3x3_t8x4_l4x8_g2"
    geom = _geometry(5, 5, 7, 8, 3, (3, 3), stride=2, pad=(1, 2, 2, 0), dilation=(1, 3))
    default = gemm.local_input_grad_gemm_config(geom, np.float32)
    asked = gemm.local_input_grad_gemm_config(geom, np.float32,
                                              gy_loads=gemm.STAGE_LOADS["f32"])
    assert asked == default and asked.kernel is default.kernel
    assert default.gy_loads == gemm.STAGE_LOADS["f32"]
    for loads in (0, 17):
        with pytest.raises(ValueError, match="gy_loads must be 1 to 16"):
            gemm.local_input_grad_gemm_config(geom, np.float32, gy_loads=loads)
    assert gemm.local_weight_grad_gemm_kernel("f64", 5, 5, 4, 4, 4, 8).name == \
        "local_conv2d_wgrad_gemm_f64_k5x5_t4x4_l4x8"
    assert gemm.local_weight_grad_gemm_kernel("f16", 3, 3, 4, 8, 4, 8, True).name == \
        "local_conv2d_wgrad_gemm_f16_k3x3_t4x8_l4x8_partial"
    # float32 partial sums have the output's type: the same kernel.
    assert gemm.local_weight_grad_gemm_kernel("f32", 3, 3, 4, 8, 4, 8, True).name == \
        "local_conv2d_wgrad_gemm_f32_k3x3_t4x8_l4x8"


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64],
                         ids=["f16", "f32", "f64"])
def test_default_suite_launch_shapes_fit_the_hardware_and_cover_the_layer(dtype):
    """Every default-suite layer at its GPU batch: at most 256 threads a block, stages
    within 32 KiB, grids within CUDA's limits, every input pixel / weight covered once,
    and at least 1.5 waves of 512 threads on 132 SMs (the weight gradient through batch
    slices where needed)."""
    from gpuconv import bench, workloads

    gemm = _gemm()
    for name in bench.SUITES["default"]:
        geom = workloads.gpu_geometry(workloads.LAYERS[name])
        igrad = gemm.local_input_grad_gemm_config(geom, dtype)
        wgrad = gemm.local_weight_grad_gemm_config(geom, dtype)
        for config in (igrad, wgrad):
            assert int(np.prod(config.block)) <= 256, name
            assert config.shared_bytes <= gemm.GRAD_STAGE_BYTES, name
            assert config.grid[0] < 2**31 and max(config.grid[1:]) <= 65535, name
        lanes_b, lanes_c, columns = igrad.block
        tm, tc = (int(v) for v in igrad.kernel.name.split("_t")[1].split("_")[0].split("x"))
        assert igrad.batch_tiles * lanes_b * tm >= geom.batch
        assert igrad.v_tiles * columns * geom.stride_w >= geom.in_width
        assert igrad.grid[1] * lanes_c * tc >= geom.in_channels
        lanes_k, lanes_o, positions = wgrad.block
        to, tk = (int(v) for v in wgrad.kernel.name.split("_t")[1].split("_")[0].split("x"))
        assert lanes_k * tk >= wgrad.stage_rows * geom.kernel_width
        assert wgrad.k_tiles * wgrad.stage_rows >= geom.in_channels_per_group * \
            geom.kernel_height
        assert wgrad.tiles_x * positions >= geom.out_width
        assert wgrad.slices * wgrad.slice_n >= geom.batch
        threads = int(np.prod(wgrad.grid)) * int(np.prod(wgrad.block))
        assert threads >= 1.5 * 132 * 512 or wgrad.slices == 8 or \
            wgrad.slices * 16 > geom.batch - 16, name


def test_the_dispatcher_picks_the_gemm_kernels_and_falls_back_where_the_stage_cannot_fit():
    from gpuconv import ops
    from gpuconv.cuda import grad_kernels, launch

    gemm = _gemm()
    geom = _geometry(4, 2, 8, 8, 3, 3)
    assert isinstance(launch.local_conv2d_input_grad_config(geom, np.float32),
                      gemm.LocalInputGradGemmConfig)
    assert isinstance(launch.local_conv2d_weight_grad_config(geom, np.float32),
                      gemm.LocalWeightGradGemmConfig)
    # A 1 x 60 kernel over 4 channels: one map's staged weights (60 taps x 61 columns x 4
    # channels) exceed the GEMM's stage; the direct kernel stages fewer channels.
    wide = _geometry(2, 4, 1, 70, 1, (1, 60))
    with pytest.raises(ValueError, match="use device='cpu'"):
        gemm.local_input_grad_gemm_config(wide, np.float32)
    assert isinstance(launch.local_conv2d_input_grad_config(wide, np.float32),
                      grad_kernels.LocalInputGradConfig)
    # The registry's scratch estimate follows the weight gradient's slices.
    deep = _geometry(128, 16, 25, 25, 16, 5)
    config = gemm.local_weight_grad_gemm_config(deep, np.float16)
    scratch = ops.OPS["local_conv2d_weight"].scratch("cuda")(deep, np.float16)
    assert config.slices > 1
    assert scratch == 2 * config.slices * int(np.prod(deep.local_weight_shape()))


def test_weight_grad_config_refuses_lanes_that_miss_taps():
    geom = _geometry(2, 2, 6, 6, 2, 3)
    with pytest.raises(ValueError, match="do not cover"):
        _gemm().local_weight_grad_gemm_launch(geom, np.float32, 1, 2, 2, layout=(2, 1, 4))


def test_weight_grad_slices_are_never_empty():
    geom = _geometry(5, 2, 6, 6, 2, 3)
    config = _gemm().local_weight_grad_gemm_launch(geom, np.float32, 1, 8, 1, slices=4)
    # 5 images in 4 slices: slices of 2, so 3 of them (no empty slice).
    assert (config.slices, config.slice_n) == (3, 2)
    assert config.grid[2] == config.slices * config.k_tiles


def test_walk_steps_by_hand():
    """256 threads over (columns 10, images 8, maps ...): 256 = 3 * 80 + 1 * 10 + 6."""
    assert _gemm()._walk_steps(256, 10, 8) == (6, 1, 3)
    assert _gemm()._walk_steps(7, 3, 2, 5) == (1, 0, 1, 0)
