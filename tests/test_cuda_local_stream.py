"""The weight-streaming local_conv2d forward (small batches), against the float64 reference.

Tests marked ``cuda`` launch kernels: on a GPU, or in the simulator at tiny sizes
(``tests/test_cuda_sim.py`` runs them so). Forced small configurations reach every
remainder path: a partial map block, a partial slab (``K`` not a multiple of the slab),
several warps splitting ``K``, a partial last group of positions. The rest check the
launch choices and the ptxas resources (no GPU needed).
"""

import math
import os

import numpy as np
import pytest

from gpuconv.device import cuda_available
from gpuconv.geometry import conv_geometry
from reference import TOLERANCE, half_tolerance, local_conv2d_ref

needs_cuda = pytest.mark.skipif(not cuda_available(), reason="numba.cuda cannot launch kernels "
                                "(no GPU and the simulator is off; tests/test_cuda_sim.py runs "
                                "these in the simulator)")
SIMULATOR = os.environ.get("NUMBA_ENABLE_CUDASIM") == "1"

DTYPES = [np.float16, np.float32, np.float64]
DTYPE_IDS = ["f16", "f32", "f64"]


def _geometry(n, c_in=4, h=5, w=6, c_out=6, k=(3, 2), stride=(1, 2), padding=(1, 1),
              dilation=(2, 1), groups=2):
    """Default: c_Og 3, K = 2 * 3 * 2 = 12 taps, P = 3 * 4 = 12 positions."""
    return conv_geometry((n, c_in, h, w), k, c_out, stride, padding, dilation, groups)


def _operands(rng, geom, dtype, bias_kind):
    x = rng.uniform(-1, 1, (geom.batch, geom.in_channels, geom.in_height, geom.in_width))
    w = rng.uniform(-1, 1, geom.local_weight_shape())
    b = {None: None, "channel": lambda: rng.uniform(-1, 1, geom.out_channels),
         "position": lambda: rng.uniform(-1, 1, (geom.out_channels, geom.out_height,
                                                 geom.out_width))}[bias_kind]
    b = b() if b else None
    cast = (lambda a: None if a is None else a.astype(dtype))
    return cast(x), cast(w), cast(b)


def _expected(x, w, b, geom):
    kwargs = dict(stride=(geom.stride_h, geom.stride_w), padding=(geom.pad_top, geom.pad_left),
                  dilation=(geom.dilation_h, geom.dilation_w), groups=geom.groups)
    exact = local_conv2d_ref(x, w, b, **kwargs)
    bound = local_conv2d_ref(np.abs(x), np.abs(w), None if b is None else np.abs(b), **kwargs)
    return exact, bound


def _assert_matches(y, x, w, b, geom, dtype):
    exact, bound = _expected(x, w, b, geom)
    y = np.asarray(y, np.float64)
    assert y.shape == exact.shape and np.all(np.isfinite(y))
    terms = geom.in_channels_per_group * geom.kernel_height * geom.kernel_width + 1
    tol = half_tolerance(terms) if np.dtype(dtype) == np.float16 else TOLERANCE[np.dtype(dtype)]
    scale = max(float(np.abs(bound).max()), np.finfo(np.float64).tiny)
    err = float(np.abs(y - exact).max())
    assert err <= tol * scale, f"error {err:.3e}, scale {scale:.3e}"


def _launch(config, x, w, b, geom, dtype):
    from numba import cuda

    from gpuconv.cuda import launch as _cuda

    d_x, d_w = cuda.to_device(x), cuda.to_device(w)
    d_b = None if b is None else cuda.to_device(b)
    d_out = cuda.to_device(np.full(geom.output_shape, np.nan, dtype))
    _cuda.launch_local_conv2d(d_x, d_w, d_b, d_out, geom, cuda.default_stream(), config)
    return d_out.copy_to_host()


def _forced(geom, dtype, warps=2, pos_per_block=5):
    """2 maps per block (c_Og 3: a partial map block), 1 tap per lane (slabs of 32 over
    K = 12 ... 48: partial slabs), 2 maps per round, ``warps`` warps, positions in groups of
    ``pos_per_block`` (12 positions: the last group partial)."""
    from gpuconv.cuda import local_stream

    config = local_stream.local_stream_launch(geom, dtype, 2, 1, 2, warps, pos_per_block)
    assert config.map_blocks == 2 and config.grid[1] == 2 * geom.groups
    return config


@pytest.mark.cuda
@needs_cuda
@pytest.mark.parametrize("batch", [1, 2, 3, 8])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_forced_remainders_every_batch_and_dtype(batch, dtype):
    geom = _geometry(batch, c_in=8)  # K = 4 * 6 = 24 taps: one partial slab of 32
    rng = np.random.default_rng(40 + batch)
    x, w, b = _operands(rng, geom, dtype, "position")
    y = _launch(_forced(geom, dtype, warps=1), x, w, b, geom, dtype)
    _assert_matches(y, x, w, b, geom, dtype)


@pytest.mark.cuda
@needs_cuda
@pytest.mark.parametrize("batch", [2, 8])
@pytest.mark.parametrize("maps, map_round", [(5, 5), (6, 3)])
def test_map_counts_that_are_not_powers_of_two(batch, maps, map_round):
    """5 maps a group (as the seed's conv2): one round of 5, or two of 3 whose last holds a
    map past the group (its weights loaded from a valid row, its sums never stored)."""
    from gpuconv.cuda import local_stream

    geom = _geometry(batch, c_out=10)  # c_Og 5, K = 12 taps
    config = local_stream.local_stream_launch(geom, np.float32, maps, 1, map_round, 1)
    assert config.map_blocks == 1 and config.kernel.name.endswith(f"_m{maps}_v1_u{map_round}_w1")
    rng = np.random.default_rng(60 + batch + maps)
    x, w, b = _operands(rng, geom, np.float32, "channel")
    y = _launch(config, x, w, b, geom, np.float32)
    _assert_matches(y, x, w, b, geom, np.float32)


@pytest.mark.cuda
@needs_cuda
@pytest.mark.parametrize("batch, bias_kind", [(2, None), (5, "channel"), (5, "position")])
def test_several_warps_split_k_and_both_bias_kinds(batch, bias_kind):
    """K = 8 * 6 = 48 taps: two slabs of 32 (the second partial) on two warps."""
    geom = _geometry(batch, c_in=16)
    rng = np.random.default_rng(50 + batch)
    x, w, b = _operands(rng, geom, np.float32, bias_kind)
    y = _launch(_forced(geom, np.float32, warps=2), x, w, b, geom, np.float32)
    _assert_matches(y, x, w, b, geom, np.float32)


@pytest.mark.cuda
@needs_cuda
@pytest.mark.parametrize("positions, batch, warps, pos_per_block", [
    (2, 8, 1, 5),   # 16 lanes a position, 8 images: a partial group at each block's end
    (4, 8, 2, 6),   # 8 lanes a position (the butterfly all transposing), K on two warps
    (4, 3, 1, 12),  # 3 images padded to 4, whole groups, the last block partial
    (2, 1, 2, 4),   # 1 image
])
def test_positions_side_by_side_in_a_warp(positions, batch, warps, pos_per_block):
    """Several positions a warp, each on its own lanes: taps, butterfly and stores per
    position, with groups cut short by the block's end (no loads, no stores past it). K =
    24 taps: several slabs of 8 or 16 lanes; 2 maps a round of 2 (the partial sums kept
    across the slabs), c_Og 3 (a partial map block)."""
    from gpuconv.cuda import local_stream

    geom = _geometry(batch, c_in=8)
    config = local_stream.local_stream_launch(geom, np.float32, 2, 1, 2, warps, pos_per_block,
                                              positions)
    assert config.warp_positions == positions
    assert f"_w{warps}_p{positions}" in config.kernel.name
    rng = np.random.default_rng(80 + positions + batch)
    x, w, b = _operands(rng, geom, np.float32, "position")
    _assert_matches(_launch(config, x, w, b, geom, np.float32), x, w, b, geom, np.float32)


@pytest.mark.cuda
@needs_cuda
@pytest.mark.parametrize("out_run, positions, pos_per_block, batch, dtype, warps", [
    (1, 1, 5, 3, np.float32, 1),    # each position's outputs stored at once
    (3, 1, 7, 3, np.float32, 1),    # an odd run (rows unpadded): runs of 3, 3, 1 a block
    (4, 2, 10, 8, np.float32, 1),   # runs of 4 (two groups of 2 positions), the last cut short
    (8, 4, 12, 5, np.float16, 1),   # a run of 8 and one of 4; the half store rounds once
    (8, 4, 10, 5, np.float32, 1),   # a run of 8, then a group of 4 with 2 past the block
    (8, 1, 9, 2, np.float64, 1),    # runs of 8 and 1, then 3, in double
    (8, 1, 6, 3, np.float32, 2),    # two warps share each run's stores (K on two warps)
])
def test_output_runs(out_run, positions, pos_per_block, batch, dtype, warps):
    """A block's outputs gathered in shared memory over ``out_run`` consecutive positions
    and stored as runs: runs cut short by the block's end and by the output's (12
    positions in blocks of ``pos_per_block``), c_Og 3 (a partial map block)."""
    from gpuconv.cuda import local_stream

    geom = _geometry(batch, c_in=8)
    config = local_stream.local_stream_launch(geom, dtype, 2, 1, 2, warps, pos_per_block,
                                              positions, out_run)
    assert config.out_run == out_run
    name = config.kernel.name
    assert name.endswith(f"_r{out_run}") if out_run > 1 else "_r" not in name
    rng = np.random.default_rng(100 + out_run + batch)
    x, w, b = _operands(rng, geom, dtype, "position")
    _assert_matches(_launch(config, x, w, b, geom, dtype), x, w, b, geom, dtype)


def test_output_runs_where_the_stores_weigh():
    """Runs where a block takes several groups of positions and the stores are a tenth of
    a position's L1 work or more (the seed's layers, K of 75 and 90, from 4 and 6 images);
    not where the weights' loads dwarf them (AlexNet conv1: 0.97 of the work at 8 images),
    nor at 1 or 2 images; never with one group a block; whole groups of positions."""
    from gpuconv import workloads
    from gpuconv.cuda import local_stream

    def pick(name, batch):
        return local_stream.local_stream_config(workloads.gpu_geometry(name, batch),
                                                np.float32)

    assert [pick("seed-conv1", n).out_run for n in (1, 2, 3, 4, 8)] == [1, 1, 1, 8, 8]
    assert [pick("seed-conv2", n).out_run for n in (1, 5, 6, 8)] == [1, 1, 8, 8]
    assert pick("alexnet-conv1", 8).out_run == 1 and pick("alexnet-conv1", 8).pos_per_block > 1
    geom = _geometry(8)
    one = local_stream.local_stream_launch(geom, np.float32, 2, 1, 2, 1, 4, 4)
    assert local_stream.output_run(geom, np.float32, one) == 1  # one group a block
    with pytest.raises(ValueError, match="output run of 6 positions"):
        local_stream.local_stream_launch(geom, np.float32, 2, 1, 2, 1, 8, 4, 6)


@pytest.mark.cuda
@needs_cuda
@pytest.mark.parametrize("dtype", [np.float16, np.float64], ids=["f16", "f64"])
def test_positions_side_by_side_in_half_and_double(dtype):
    """Two positions a warp, 2 images, two rounds of 2 maps (partial sums reduced per
    slab) over 3 taps a lane."""
    from gpuconv.cuda import local_stream

    geom = _geometry(2, c_in=16, c_out=8)  # c_Og 4, K = 48: two slabs of 16 x 3 taps
    config = local_stream.local_stream_launch(geom, dtype, 4, 3, 2, 1, 3, 2)
    rng = np.random.default_rng(90)
    x, w, b = _operands(rng, geom, dtype, "channel")
    _assert_matches(_launch(config, x, w, b, geom, dtype), x, w, b, geom, dtype)


@pytest.mark.cuda
@needs_cuda
def test_partial_sums_kept_across_slabs_of_several_warps():
    """One round holds the block's maps (3 maps, a round of 3): each warp adds its slabs
    in registers and reduces once; K = 8 * 6 = 48 taps in 6 slabs of 8 lanes on 4 warps
    (two slabs each: the last two warps' second slab is past K)."""
    from gpuconv.cuda import local_stream

    geom = _geometry(2, c_in=16)
    config = local_stream.local_stream_launch(geom, np.float32, 3, 1, 3, 4, 4, 4)
    assert config.maps == config.map_round and config.warps == 4
    rng = np.random.default_rng(91)
    x, w, b = _operands(rng, geom, np.float32, "position")
    _assert_matches(_launch(config, x, w, b, geom, np.float32), x, w, b, geom, np.float32)


@pytest.mark.cuda
@needs_cuda
@pytest.mark.parametrize("batch", [1, 3])
def test_default_choice_plain_kernel(batch):
    """The dispatcher's own choice, no groups, a 1 x 1 output row at the edge."""
    from gpuconv.cuda import launch as _cuda, local_stream

    geom = conv_geometry((batch, 3, 4, 5), (3, 3), 5, 1, 0, 1, 1)
    config = _cuda.local_conv2d_forward_config(geom, np.float32)
    assert isinstance(config, local_stream.LocalStreamConfig)
    rng = np.random.default_rng(60 + batch)
    x, w, b = _operands(rng, geom, np.float32, "channel")
    _assert_matches(_launch(None, x, w, b, geom, np.float32), x, w, b, geom, np.float32)


@pytest.mark.cuda
@needs_cuda
@pytest.mark.parametrize("dtype", [np.float32, np.float16], ids=["f32", "f16"])
def test_same_bits_twice(dtype):
    """Shuffles and the warps' sums in a fixed order, no atomics: the same bits each call."""
    geom = _geometry(3, c_in=16)
    rng = np.random.default_rng(70)
    x, w, b = _operands(rng, geom, dtype, "channel")
    config = _forced(geom, dtype, warps=2)
    first = _launch(config, x, w, b, geom, dtype)
    second = _launch(config, x, w, b, geom, dtype)
    np.testing.assert_array_equal(first.view(np.uint8), second.view(np.uint8))


@pytest.mark.cuda
@needs_cuda
def test_nan_weight_reaches_only_its_outputs():
    """A NaN weight of one (map, position) and an Inf of another reach exactly the outputs
    of that map and position, every image; the taps past K load no weight."""
    geom = _geometry(2)
    rng = np.random.default_rng(71)
    x, w, b = _operands(rng, geom, np.float32, None)
    w[1, 2, 0, 0, 1, 1] = np.nan
    w[4, 0, 2, 1, 0, 0] = np.inf
    y = _launch(_forced(geom, np.float32), x, w, b, geom, np.float32)
    expected, _ = _expected(x, w, b, geom)
    np.testing.assert_array_equal(np.isnan(y), np.isnan(expected))
    np.testing.assert_array_equal(np.isinf(y), np.isinf(expected))
    assert np.isnan(y[:, 1, 2, 0]).all() and np.isnan(y).sum() >= geom.batch


# --------------------------------------------------------------------------------------------
# launch choices (no GPU)
# --------------------------------------------------------------------------------------------

def test_dispatcher_streams_small_batches_only():
    from gpuconv import workloads
    from gpuconv.cuda import kernels, launch as _cuda, local_stream

    for batch in (1, 2, 8):
        geom = workloads.gpu_geometry("deepface-l4", batch)
        assert isinstance(_cuda.local_conv2d_forward_config(geom, np.float32),
                          local_stream.LocalStreamConfig)
        assert _cuda.local_conv2d_scratch_elements(geom, np.float32) == 0
    geom = workloads.gpu_geometry("deepface-l4", 9)
    assert isinstance(_cuda.local_conv2d_forward_config(geom, np.float32),
                      kernels.LocalConv2dConfig)
    assert _cuda._CONFIG["local_conv2d"] is _cuda.local_conv2d_forward_config


def test_default_suite_grids_cover_every_output_and_fill_the_gpu():
    from gpuconv import bench, workloads
    from gpuconv.cuda import local_stream

    for name in bench.SUITES["default"]:
        for batch in (1, 2, 8):
            geom = workloads.gpu_geometry(name, batch)
            for dtype in (np.float16, np.float32, np.float64):
                c = local_stream.local_stream_config(geom, dtype)
                n_pos = geom.out_height * geom.out_width
                assert c.grid[0] * c.pos_per_block >= n_pos > (c.grid[0] - 1) * c.pos_per_block
                assert c.grid[1] == geom.groups * c.map_blocks
                assert c.map_blocks * c.maps >= geom.out_channels_per_group
                assert c.maps % c.map_round == 0 and c.block == (32, c.warps)
                warps = c.grid[0] * c.grid[1] * c.warps
                assert warps >= local_stream.STREAM_TARGET_WARPS // 2, (name, batch)


def test_lanes_hold_each_image_once_after_the_butterfly():
    from gpuconv.cuda.local_stream import image_of_lane

    for batch in range(1, 9):
        images = [image_of_lane(lane, batch) for lane in range(32)]
        padded = 1 << (batch - 1).bit_length()
        assert sorted(set(images)) == list(range(padded))
        assert all(images.count(i) == 32 // padded for i in range(padded))


def test_lanes_of_a_position_hold_each_image_once():
    from gpuconv.cuda.local_stream import image_of_lane

    for lanes in (8, 16):
        for batch in range(1, 9):
            images = [image_of_lane(lane, batch, lanes) for lane in range(lanes)]
            padded = 1 << (batch - 1).bit_length()
            assert all(images.count(i) == lanes // padded for i in range(padded))


def test_positions_a_warp_are_bounded_by_the_images_and_the_sectors():
    from gpuconv.cuda import local_stream

    choices = local_stream.warp_position_choices
    assert choices(_geometry(8), np.float32) == [1, 2, 4]    # 8 lanes hold 8 images
    assert choices(_geometry(8), np.float16) == [1, 2]       # 8 halves are half a sector
    assert choices(_geometry(2), np.float64) == [1, 2, 4]
    with pytest.raises(ValueError, match="fewer than the 8 images"):
        local_stream.local_stream_launch(_geometry(8), np.float32, 2, 1, 2, 1, 4, 8)


def test_input_lines_of_positions_side_by_side_by_hand():
    """2 channels of 8 x 64, a 3 x 3 kernel (K = 18): one position's 18 taps are 6 rows of
    3 values, 6 lines; 4 positions on 8 lanes each load taps 0-7 (3 rows), 8-15 (4 rows),
    16-17 (1 row), the 4 positions' windows (columns 0-5) in the same lines."""
    from gpuconv.cuda.local_stream import input_lines_per_load

    geom = conv_geometry((1, 2, 8, 64), (3, 3), 1)
    assert input_lines_per_load(geom, 4, 32, 1) == 6
    assert input_lines_per_load(geom, 4, 8, 4) == pytest.approx((3 + 4 + 1) / 3)


def test_epilogue_lines_counted_by_hand():
    """A position's end, per position (2 images, 4 maps, one warp, blocks of 8 positions on
    an output 32 wide: a row of 128 bytes, 1 KB between the rows of two maps or images):
    stored at once, 4 zeroings + 1 read of the sums + 8 values in 8 lines; in runs of 8, per
    position the same 5 and 1 write to the run (8 rows 9 words apart: 8 banks), then per run
    2 reads of 4 rows of 8 (words 0-7, 9-16, 18-25, 27-34: banks 0-2 twice, 2 wavefronts
    each) and 2 stores of 4 rows of 32 bytes (a line each): (8 * 6 + 4 + 8) / 8."""
    from gpuconv.cuda.local_stream import epilogue_per_position, local_stream_launch

    geom = conv_geometry((2, 1, 10, 34), (3, 3), 4, 1, 0, 1, 1)  # 8 x 32 positions
    for run, expected in ((1, 13), (8, 60 / 8)):
        config = local_stream_launch(geom, np.float32, 4, 1, 4, 1, 8, 1, run)
        assert epilogue_per_position(geom, 4, config) == pytest.approx(expected)


def test_positions_side_by_side_where_the_input_lines_bound():
    """Seed conv2 at 8 images (3 x 3 kernel, 5 maps: 11 lines a load of one position's
    input) takes 4 positions a warp; where the weights' stream bounds the kernel anyway
    (VGG-16 conv5_1, AlexNet conv1, a single image) one position a warp, the kernel of
    before."""
    from gpuconv import workloads
    from gpuconv.cuda import local_stream

    def pick(name, batch, dtype=np.float32):
        return local_stream.local_stream_config(workloads.gpu_geometry(name, batch), dtype)

    seed = pick("seed-conv2", 8)
    assert seed.warp_positions == 4 and "_p4" in seed.kernel.name
    assert pick("seed-conv2", 8, np.float16).warp_positions == 2
    for name, batch in (("vgg16-conv5_1", 8), ("alexnet-conv1", 8), ("seed-conv2", 1),
                        ("deepface-l4", 2)):
        config = pick(name, batch)
        assert config.warp_positions == 1 and "_p" not in config.kernel.name


def test_images_of_2_31_elements_go_to_the_batched_gemm():
    """The streaming kernel steps between images in 32 bits: a batch of images of 2**31
    elements or more goes to the batched GEMM (64-bit input offsets), or is refused with a
    clear error where that cannot index the weights either."""
    from gpuconv.cuda import kernels, launch as _cuda, local_stream

    big = 46341  # 46341**2 > 2**31 - 1
    geom = conv_geometry((2, 1, big, big), (1, 1), 1, stride=2)
    assert not local_stream.use_local_stream(geom)
    assert isinstance(_cuda.local_conv2d_forward_config(geom, np.float32),
                      kernels.LocalConv2dConfig)
    assert local_stream.use_local_stream(conv_geometry((2, 1, 46340, 46340), (1, 1), 1))
    with pytest.raises(ValueError, match="fewer than 2\\*\\*31 elements"):
        local_stream.local_stream_config(geom, np.float32)
    with pytest.raises(ValueError, match="32-bit offsets"):
        _cuda.local_conv2d_forward_config(conv_geometry((2, 1, big, big), (1, 1), 1),
                                          np.float32)


def test_streaming_refuses_large_batches():
    from gpuconv.cuda import local_stream

    with pytest.raises(ValueError, match="batch 9"):
        local_stream.local_stream_config(_geometry(9), np.float32)


# --------------------------------------------------------------------------------------------
# ptxas: registers in registers (no GPU)
# --------------------------------------------------------------------------------------------

def _ptxas_skip():
    if SIMULATOR:
        return "the CUDA simulator is on (it cannot compile PTX)"
    from gpuconv.cuda import ptx

    if ptx.find_ptxas() is None:
        return "ptxas not found (pip install nvidia-cuda-nvcc)"
    try:
        from numba import cuda

        def probe(a):
            a[0] = 1.0

        cuda.compile_ptx(probe, "void(float32[:])", cc=(8, 0))
    except Exception as exc:  # numba-cuda or NVVM missing
        return f"numba-cuda cannot compile PTX here ({type(exc).__name__}: {exc})"
    return None


@pytest.mark.skipif(_ptxas_skip() is not None, reason=str(_ptxas_skip()))
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_default_suite_kernels_do_not_spill(dtype):
    """Every streaming specialisation of the default suite at batches 1 to 8: no spills
    and no stack frame on sm_90 and sm_80 (positions side by side sit at their 168
    registers on seed conv2)."""
    from gpuconv import bench, workloads
    from gpuconv.cuda import local_stream, ptx

    specs = {}
    for name in bench.SUITES["default"]:
        for batch in range(1, 9):
            spec = local_stream.local_stream_config(workloads.gpu_geometry(name, batch),
                                                    dtype).kernel
            specs.setdefault(spec.name, spec)
    bad = []
    for spec in specs.values():
        for cc, text in ptx.compile_ptx_multi(spec, ((9, 0), (8, 0))).items():
            info = ptx.ptxas_info(text, f"sm_{cc[0]}{cc[1]}", spec.name)
            if info.spill_stores or info.spill_loads or info.stack_frame:
                bad.append(info)
    assert not bad, bad


def test_tiled_forward_runs_and_sizes_the_kernel_local_conv2d_would():
    """Tiled forward at batch <= 8: one slot per position is local_conv2d itself (the
    streaming kernel, same bits); between the ends the batched kernel's tiled
    specialisation, whose split-K partial sums the scratch must hold."""
    from gpuconv import workloads
    from gpuconv.cuda import launch, local_stream
    from gpuconv.geometry import tiled_geometry

    geom = workloads.gpu_geometry("alexnet-conv1", 4)
    unshared = tiled_geometry(geom, (geom.out_height, geom.out_width), "periodic")
    config = launch.tiled_conv2d_config(unshared, np.float32)
    assert config == launch.local_conv2d_forward_config(geom, np.float32)
    assert isinstance(config, local_stream.LocalStreamConfig)
    between = tiled_geometry(geom, (2, 2), "periodic")
    config = launch.tiled_conv2d_config(between, np.float32)
    assert not isinstance(config, local_stream.LocalStreamConfig) and config.slices > 1
    assert (launch.tiled_conv2d_scratch_elements(between, np.float32)
            == config.slices * math.prod(geom.output_shape))  # float32 partial sums
