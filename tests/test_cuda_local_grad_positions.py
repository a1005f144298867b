"""local_conv2d's gradients as a GEMM a position (gpuconv.cuda.local_grad_positions): the
input gradient through columns (transpose, GEMM, gather) and the weight gradient (transpose,
GEMM), against the float64 reference.

Tests marked ``cuda`` launch the kernels on Numba device arrays (a GPU, or the simulator:
``tests/test_cuda_sim.py`` runs them there). Outputs start as NaN, so an element a kernel
forgets fails the comparison; the scratch starts uninitialised. The simulator's tiles are
8 x 8 (16 threads, 4 maps or images a chunk) and 4 x 8 (8 threads): the tiny layers leave
partial tiles along the images, the maps and the terms (a last chunk of 1-3 maps or
images), and ``chunk`` forces the input gradient through several chunks of images, the last
partial. The rest check the dispatch, the scratch and the launch shape and run everywhere.
"""

import math

import numpy as np
import pytest

from gpuconv.device import cuda_available, simulator_enabled
from gpuconv.geometry import conv_geometry
from test_cuda_grad_kernels import (FEATURES, _assert_matches, _feature_geometry, _geometry,
                                    _launch, _operands, _reference, _terms)

needs_cuda = pytest.mark.skipif(not cuda_available(), reason="numba.cuda cannot launch kernels "
                                "(no GPU and the simulator is off; tests/test_cuda_sim.py runs "
                                "these in the simulator)")

SIM_TILES = [(8, 8, 4, 2, 2, 1), (4, 8, 4, 2, 2, 1)]
# The weight gradient's: its wide simulator tile (16 maps, 8 terms, 16 threads) and 4 x 8.
WGRAD_SIM_TILES = [(16, 8, 4, 4, 2, 1), (4, 8, 4, 2, 2, 1)]


def _cols():
    from gpuconv.cuda import local_grad_positions

    return local_grad_positions


OPS = ["local_input", "local_weight"]


def _config(op, geom, dtype, tile=SIM_TILES[0], chunk=None):
    if op == "local_input":
        return _cols().local_input_grad_cols_launch(geom, dtype, tile, chunk)
    return _cols().local_weight_grad_pos_launch(geom, dtype, tile)


def _check(geom, dtype, seed, tile=SIM_TILES[0], chunk=None, op="local_input"):
    rng = np.random.default_rng(seed)
    x, w, gy = _operands(rng, op, geom, dtype)
    result = _launch(op, geom, x, w, gy, _config(op, geom, dtype, tile, chunk))
    assert result.dtype == np.dtype(dtype)
    _assert_matches(result, *_reference(op, geom, x, w, gy), dtype, _terms(op, geom))
    return result


GRID = ([pytest.param(name, np.float64, id=f"{name}-f64") for name in FEATURES]
        + [pytest.param(name, np.float32, id=f"{name}-f32")
           for name in ("stride", "asymmetric_padding", "groups")]
        + [pytest.param(name, np.float16, id=f"{name}-f16")
           for name in ("stride_dilation", "groups")])


@pytest.mark.cuda
@needs_cuda
@pytest.mark.parametrize("name, dtype", GRID)
@pytest.mark.parametrize("op", OPS)
def test_feature_grid(op, name, dtype):
    _check(_feature_geometry(name), dtype, sum(map(ord, name)), op=op)


# (n, c_in, h, w, c_out, kernel, stride, padding (t, b, l, r), dilation, groups, chunk); the
# comments count the simulator's first tile (8 images x 8 terms, 4 maps a chunk).
CASES = {
    # 10 images (8 + 2), 11 maps (two chunks + 3), K = 2 * 9 = 18 (8 + 8 + 2 terms).
    "partial_m_n_k": (10, 2, 5, 6, 11, 3, 1, (1, 1, 1, 1), 1, 1, None),
    # 17 images in chunks of 8 (8 + 8 + 1), stride (2, 3), dilation (2, 1), a 2 x 3 kernel.
    "chunks_stride_dilation": (17, 3, 7, 8, 9, (2, 3), (2, 3), (2, 0, 1, 2), (2, 1), 1, 8),
    # Two groups of 3 channels and 5 maps: a term block past the group's K = 27.
    "groups": (9, 6, 4, 4, 10, 3, 1, (1, 0, 0, 1), 1, 2, None),
    # A kernel wider than the stride: the gather sums taps of several positions per pixel.
    "stride_lt_kernel": (3, 2, 9, 9, 5, 4, 2, (1, 2, 2, 1), 1, 1, 2),
}


@pytest.mark.cuda
@needs_cuda
@pytest.mark.parametrize("tile, dtype", [(SIM_TILES[0], np.float64), (SIM_TILES[1], np.float32)],
                         ids=["t8x8-f64", "t4x8-f32"])
@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("op", OPS)
def test_partial_tiles_chunks_and_index_arithmetic(op, case, tile, dtype):
    n, c_in, h, w, c_out, k, stride, pad, dilation, groups, chunk = CASES[case]
    geom = _geometry(n, c_in, h, w, c_out, k, stride=stride, pad=pad, dilation=dilation,
                     groups=groups)
    if op == "local_weight":
        tile = WGRAD_SIM_TILES[SIM_TILES.index(tile)]
    _check(geom, dtype, len(case), tile, chunk, op)


@pytest.mark.cuda
@needs_cuda
def test_two_calls_are_bitwise_equal_and_a_nan_weight_stays_in_its_window():
    geom = _geometry(3, 2, 5, 5, 6, 3, pad=(1, 1, 1, 1))
    rng = np.random.default_rng(3)
    x, w, gy = _operands(rng, "local_input", geom, np.float32)
    config = _cols().local_input_grad_cols_launch(geom, np.float32, SIM_TILES[0], 2)
    first = _launch("local_input", geom, x, w, gy, config)
    again = _launch("local_input", geom, x, w, gy, config)
    assert np.array_equal(first.view(np.uint32), again.view(np.uint32))
    # weight (c_O, h_O, w_O, c_Ig, k_H, k_W): map 4 at output (2, 3), channel 1, tap (0, 2)
    # reaches input pixel (2 - 1 + 0, 3 - 1 + 2) = (1, 4) of channel 1, in every image.
    w[4, 2, 3, 1, 0, 2] = np.nan
    result = _launch("local_input", geom, x, w, gy, config)
    assert np.isnan(result[:, 1, 1, 4]).all()
    assert np.isnan(result).sum() == geom.batch


@pytest.mark.cuda
@needs_cuda
def test_weight_gradient_is_bitwise_repeatable_and_a_nan_gradient_stays_in_its_row():
    geom = _geometry(5, 2, 5, 5, 6, 3, pad=(1, 1, 1, 1))
    rng = np.random.default_rng(4)
    x, w, gy = _operands(rng, "local_weight", geom, np.float32)
    config = _cols().local_weight_grad_pos_launch(geom, np.float32, SIM_TILES[1])
    first = _launch("local_weight", geom, x, w, gy, config)
    again = _launch("local_weight", geom, x, w, gy, config)
    assert np.array_equal(first.view(np.uint32), again.view(np.uint32))
    # gy of image 3, map 4 at output (0, 2) reaches only that (map, position)'s weights,
    # the padding's taps included (NaN times a staged zero).
    gy[3, 4, 0, 2] = np.nan
    result = _launch("local_weight", geom, x, w, gy, config)
    assert np.isnan(result[4, 0, 2]).all()
    assert np.isnan(result).sum() == result[4, 0, 2].size


@pytest.mark.cuda
@needs_cuda
def test_public_gradients_take_them_for_64_maps():
    """Through gpuconv.grad on the device: 64 maps, so the dispatcher picks the columns path
    and the weight gradient's GEMM a position (their scratch from the call's allocator)."""
    from gpuconv import grad
    from gpuconv.cuda import launch

    geom = _geometry(3, 2, 4, 4, 64, 3, pad=(1, 1, 1, 1))
    assert isinstance(launch.local_conv2d_input_grad_config(geom, np.float32),
                      _cols().LocalInputGradColsConfig)
    rng = np.random.default_rng(11)
    x, w, gy = _operands(rng, "local_input", geom, np.float32)
    result = grad.local_conv2d_input(x.shape, w, gy, padding=1, device="cuda")
    _assert_matches(np.asarray(result), *_reference("local_input", geom, x, w, gy),
                    np.float32, _terms("local_input", geom))
    # ... and the weight gradient, a GEMM a position
    assert isinstance(launch.local_conv2d_weight_grad_config(geom, np.float32),
                      _cols().LocalWeightGradPosConfig)
    result = grad.local_conv2d_weight(x, w.shape, gy, padding=1, device="cuda")
    _assert_matches(np.asarray(result), *_reference("local_weight", geom, x, w, gy),
                    np.float32, _terms("local_weight", geom))


# --------------------------------------------------------------------------------------------
# dispatch, scratch and launch shape (no device needed)
# --------------------------------------------------------------------------------------------

def test_dispatch_many_maps_and_the_scratch_the_call_counts():
    from gpuconv import workloads
    from gpuconv.cuda import launch, local_grad_gemm

    cols = _cols()
    assert cols.POSITIONS_MIN_MAPS == 64

    def config(c_out, groups=1, n=4):
        geom = conv_geometry((n, 8 * groups, 6, 6), (3, 3), c_out * groups, groups=groups)
        return geom, launch.local_conv2d_input_grad_config(geom, np.float32)

    for c_out, groups, kind in ((64, 1, cols.LocalInputGradColsConfig),
                                (96, 2, cols.LocalInputGradColsConfig),
                                (63, 1, local_grad_gemm.LocalInputGradGemmConfig),
                                (32, 4, local_grad_gemm.LocalInputGradGemmConfig)):
        geom, chosen = config(c_out, groups)
        assert isinstance(chosen, kind), (c_out, groups)
        scratch = launch.local_conv2d_input_grad_scratch_elements(geom, np.float32)
        if kind is cols.LocalInputGradColsConfig:
            n_pos = geom.out_height * geom.out_width
            assert chosen.gyt_elements == geom.batch * geom.out_channels * n_pos
            assert chosen.cols_elements == geom.batch * n_pos * geom.in_channels * 9
            assert scratch == chosen.gyt_elements + chosen.cols_elements
            # float16's columns are float32: two half elements each
            half = launch.local_conv2d_input_grad_scratch_elements(geom, np.float16)
            assert half == chosen.gyt_elements + 2 * chosen.cols_elements
        else:
            assert scratch == 0
        # The weight gradient: a GEMM a position with many maps, its scratch the transposed
        # gradient; else the batched GEMM.
        weight = launch.local_conv2d_weight_grad_config(geom, np.float32)
        many = kind is cols.LocalInputGradColsConfig
        assert isinstance(weight, cols.LocalWeightGradPosConfig) == many, (c_out, groups)
        if many:
            assert weight.slices == 1 and weight.scratch_elements == chosen.gyt_elements
            assert launch.local_conv2d_weight_grad_scratch_elements(geom, np.float16) == \
                chosen.gyt_elements
            tm, tn = (int(v) for v in weight.kernel.name.split("_t")[1].split("_")[0]
                      .split("x"))
            assert weight.grid == (geom.out_height * geom.out_width * -(-72 // tn),
                                   groups * -(-c_out // tm))  # K = 8 * 9 = 72
            if not simulator_enabled():  # 64 maps: the wide tile; 96: the 32-map one
                assert tm == {64: 64, 96: 32}[c_out]
    # The public layer counts it (the free-memory check sees it).
    from gpuconv.ops import OPS

    geom, chosen = config(64)
    assert OPS["local_conv2d_input"].scratch("cuda")(geom, np.float32) == \
        chosen.scratch_elements
    # Every default-suite layer with 64 or more maps a group takes it, the others do not.
    for layer in workloads.LAYERS.values():
        geom = workloads.gpu_geometry(layer)
        chosen = launch.local_conv2d_input_grad_config(geom, np.float32)
        assert isinstance(chosen, cols.LocalInputGradColsConfig) == \
            (geom.out_channels_per_group >= 64), layer.name
    # tiled_conv2d between the ends of the dial: the expanded weight and the columns; at
    # T = 1 x 1 conv2d's input gradient, no scratch.
    from gpuconv.cuda import tiled
    from gpuconv.geometry import tiled_geometry

    plain = conv_geometry((4, 8, 6, 6), (3, 3), 64)
    between = tiled_geometry(plain, (2, 2), "periodic")
    assert tiled.tiled_conv2d_input_grad_scratch_elements(between, np.float32) == \
        math.prod(between.local_weight_shape()) + \
        launch.local_conv2d_input_grad_scratch_elements(plain, np.float32) > 0
    assert tiled.tiled_conv2d_input_grad_scratch_elements(
        tiled_geometry(plain, (1, 1), "periodic"), np.float32) == 0
    # More maps than the transpose's grid holds (65535 along z): the gather instead.
    wide = conv_geometry((2, 1, 3, 3), (1, 1), 70000)
    with pytest.raises(ValueError, match="transpose"):
        cols.local_input_grad_cols_config(wide, np.float32)
    assert isinstance(launch.local_conv2d_input_grad_config(wide, np.float32),
                      local_grad_gemm.LocalInputGradGemmConfig)
    geom, chosen = config(64)
    assert OPS["local_conv2d_weight"].scratch("cuda")(geom, np.float32) == \
        chosen.gyt_elements
    # An empty batch launches nothing (its weight gradient, zeros, is the batched GEMM's).
    empty = conv_geometry((0, 8, 6, 6), (3, 3), 64)
    assert not cols.use_positions(empty)
    assert isinstance(launch.local_conv2d_weight_grad_config(empty, np.float32),
                      local_grad_gemm.LocalWeightGradGemmConfig)


def test_columns_are_bounded_by_chunks_of_whole_image_tiles():
    cols = _cols()
    tile = cols.TILES["f32"]
    # VGG-16 conv5_1 at batch 256: 196 positions x 4608 terms, 3.6 MB of columns an image.
    geom = conv_geometry((256, 512, 14, 14), (3, 3), 512, padding=1)
    config = cols.local_input_grad_cols_launch(geom, np.float32, tile)
    per_image = 196 * 4608 * 4
    assert config.chunk % tile[0] == 0 and config.chunk < 256
    assert config.chunk * per_image <= cols.COLS_BYTES < (config.chunk + tile[0]) * per_image
    assert config.cols_elements == config.chunk * 196 * 4608
    assert config.grid == (196 * config.chunk // tile[0], 4608 // tile[1])
    # A batch that fits is one chunk of the whole batch, the last image tile partial.
    small = conv_geometry((20, 512, 14, 14), (3, 3), 512, padding=1)
    config = cols.local_input_grad_cols_launch(small, np.float32, tile)
    assert (config.chunk, config.batch_tiles) == (20, 1)
    # One image tile over the budget still runs (one tile a chunk).
    huge = conv_geometry((64, 64, 120, 120), (5, 5), 64, padding=2)
    config = cols.local_input_grad_cols_launch(huge, np.float32, tile)
    assert config.chunk == tile[0]


def test_factories_are_memoised_named_and_refuse_uneven_tiles():
    cols = _cols()
    spec = cols.cols_gemm_kernel("f32", *cols.TILES["f32"])
    assert spec is cols.cols_gemm_kernel("f32", *cols.TILES["f32"])
    assert spec.name == "local_conv2d_igrad_cols_f32_t32x64_k16_r8x4_o6"
    assert spec.launch_bounds == (64, 6)
    assert cols.col2im_kernel("f16").name == "local_conv2d_col2im_f16"
    assert cols.transpose_kernel("f64").name == "transpose_maps_f64"
    with pytest.raises(ValueError, match="split evenly"):
        cols.cols_gemm_kernel("f32", 16, 4, 4, 4, 2, 1)  # 8 threads cannot stage 16 images
    with pytest.raises(ValueError, match="multiple of 4"):
        cols.cols_gemm_kernel("f32", 8, 8, 6, 2, 2, 1)
    wgrad = cols.wgrad_gemm_kernel("f64", *cols.TILES["f64"])
    assert wgrad is cols.wgrad_gemm_kernel("f64", *cols.TILES["f64"])
    assert wgrad.name == "local_conv2d_wgrad_pos_f64_t32x32_k16_r4x4_o4"
    with pytest.raises(ValueError, match="split evenly"):
        cols.wgrad_gemm_kernel("f32", 8, 8, 8, 4, 4, 1)  # 4 threads, 8 images a chunk


@pytest.mark.skipif(simulator_enabled(), reason="the model is of the GPU's tiles")
def test_the_model_puts_the_gemms_a_position_ahead_where_the_dispatcher_takes_them():
    """The rule's reason, on paper (``gpuconv.cuda.predict``; no GPU has timed it yet): on
    the default suite's layers of 64 or more maps the columns path (GEMM, transpose and
    gather together) is predicted at least twice as fast as the batched-GEMM gather it
    replaces, its GEMM coalesced (one line per warp load), and the weight gradient's GEMM a
    position (with its transpose) at least 1.5x the batched GEMM; on DeepFace's 16 maps
    the batched GEMM is ahead."""
    from gpuconv import workloads
    from gpuconv.cuda import local_grad_gemm, predict

    def weight_ms(name, geom, config):
        return sum(r.time_s for r in predict.local_weight_grad_rows(name, geom, np.float32,
                                                                    config))

    cols_ = _cols()
    for name in ("alexnet-conv1", "resnet50-res2-3x3", "vgg16-conv5_1", "deepface-l4"):
        geom = workloads.gpu_geometry(name)
        positions = weight_ms(name, geom, cols_.local_weight_grad_pos_config(geom, np.float32))
        batched = weight_ms(name, geom, local_grad_gemm.local_weight_grad_gemm_config(
            geom, np.float32))
        assert (batched > 1.5 * positions) == (name != "deepface-l4"), (name, batched,
                                                                         positions)
        assert (positions < batched) == cols_.use_positions(geom)

    for name in ("alexnet-conv1", "resnet50-res2-3x3", "vgg16-conv5_1"):
        layer = workloads.LAYERS[name]
        geom = workloads.gpu_geometry(layer)
        rows = predict.local_gradient_rows(layer)
        kinds = [r.kernel.split("_f32")[0] for r in rows]
        assert kinds[:3] == ["local_conv2d_igrad_cols", "transpose_maps",
                             "local_conv2d_col2im"], kinds
        cols = sum(r.time_s for r in rows[:3])
        assert rows[0].lines_per_load == pytest.approx(1.0, abs=0.7)
        config = local_grad_gemm.local_input_grad_gemm_config(geom, np.float32)
        assert config.kernel.name.startswith("local_conv2d_igrad_gemm_")
        gather = predict._local_igrad_gemm_row(name, geom, np.float32, None, predict.H200)
        assert gather.time_s > 2 * cols, (name, gather.time_s, cols)
