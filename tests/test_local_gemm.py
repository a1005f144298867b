"""The double-buffered per-position GEMM local_conv2d forward (gpuconv.cuda.local_gemm)
against the float64 reference.

Tests marked ``cuda`` launch it (a GPU, or the simulator, whose tiles are 8 images x 8 maps
(16 threads, one image and one map staged a pass) and 16 images x 4 maps (8 threads, eight
images a pass), 4 terms a chunk; every case runs on both): the geometries are tiny but leave
partial tiles along the images (several batch tiles, the last partial), the maps and ``K``
(a last chunk of 1 to 3 terms), with padding, strides, dilation, groups and both kinds of
bias. The rest check the dispatch, the launch shape and the factory and run everywhere.
"""

import numpy as np
import pytest

from gpuconv.device import cuda_available
from gpuconv.geometry import conv_geometry
from reference import TOLERANCE, half_tolerance, local_conv2d_ref

needs_cuda = pytest.mark.skipif(not cuda_available(), reason="numba.cuda cannot launch kernels "
                                "(no GPU and the simulator is off; tests/test_cuda_sim.py runs "
                                "these in the simulator)")

DTYPES = [np.float16, np.float32, np.float64]
DTYPE_IDS = ["f16", "f32", "f64"]

# (n, c_in, h, w, c_out, kernel, stride, padding, dilation, groups, bias); the comments count
# the simulator's tiles (8 images x 8 maps x 4 terms).
CASES = {
    # 10 images (8 + 2), 11 maps (8 + 3), K = 5 * 9 = 45 (11 chunks + 1 term), bias per map.
    "partial_m_n_k": (10, 5, 5, 6, 11, 3, 1, 1, 1, 1, "channel"),
    # 17 images (three batch tiles), stride (2, 3), dilation (2, 1), asymmetric padding,
    # a 2 x 3 kernel: K = 3 * 6 = 18 (4 chunks + 2), bias per position.
    "stride_dilation_asym_padding": (17, 3, 7, 8, 9, (2, 3), (2, 3), ((2, 0), (1, 2)), (2, 1),
                                     1, "position"),
    # Two groups of 5 channels and 3 maps each (a map block past the group's maps), K = 20.
    "groups": (9, 10, 4, 4, 6, 2, 1, 0, 1, 2, None),
    # 1 x 1 kernel: K = 7 channels (1 chunk + 3), the (channel, ky, kx) walk all channels.
    "kernel_1x1": (3, 7, 3, 2, 5, 1, 1, 0, 1, 1, "channel"),
    # A chunk longer than the kernel's taps in the real tiles (16 > 3 * 3), here 4 > 1 x 3:
    # the carry from kx into ky into the channel within one step.
    "row_kernel": (8, 4, 3, 6, 8, (1, 3), 1, (0, 1), 1, 1, None),
}


def _case(name, dtype, seed=7):
    n, c_in, h, w, c_out, k, stride, padding, dilation, groups, bias = CASES[name]
    k = (k, k) if isinstance(k, int) else k
    geom = conv_geometry((n, c_in, h, w), k, c_out, stride, padding, dilation, groups)
    rng = np.random.default_rng(seed)
    x = rng.uniform(-1, 1, (n, c_in, h, w)).astype(dtype)
    wt = rng.uniform(-1, 1, geom.local_weight_shape()).astype(dtype)
    b = {None: None, "channel": (c_out,),
         "position": (c_out, geom.out_height, geom.out_width)}[bias]
    b = None if b is None else rng.uniform(-1, 1, b).astype(dtype)
    return geom, x, wt, b


def _config(geom, dtype):
    from gpuconv.cuda import local_gemm

    return local_gemm.local_gemm_config(geom, dtype)


def _launch(geom, x, wt, b, config=None):
    from numba import cuda

    from gpuconv.cuda import launch

    config = config or _config(geom, x.dtype)
    d_x, d_w = cuda.to_device(x), cuda.to_device(wt)
    d_b = None if b is None else cuda.to_device(b)
    d_out = cuda.to_device(np.full(geom.output_shape, np.nan, x.dtype))
    launch.launch_local_conv2d(d_x, d_w, d_b, d_out, geom, cuda.default_stream(), config)
    return d_out.copy_to_host()


def _assert_matches(y, x, wt, b, geom, dtype):
    kwargs = dict(stride=(geom.stride_h, geom.stride_w),
                  padding=((geom.pad_top, geom.pad_bottom), (geom.pad_left, geom.pad_right)),
                  dilation=(geom.dilation_h, geom.dilation_w), groups=geom.groups)
    f64 = (lambda a: None if a is None else a.astype(np.float64))
    expected = local_conv2d_ref(f64(x), f64(wt), f64(b), **kwargs)
    bound = local_conv2d_ref(np.abs(f64(x)), np.abs(f64(wt)),
                             None if b is None else np.abs(f64(b)), **kwargs)
    y = np.asarray(y, dtype=np.float64)
    assert y.shape == expected.shape
    assert np.all(np.isfinite(y)), "an output was never written (NaN from the prefill)"
    terms = wt.shape[3] * wt.shape[4] * wt.shape[5] + 1
    tol = half_tolerance(terms) if dtype == np.float16 else TOLERANCE[np.dtype(dtype)]
    err = float(np.abs(y - expected).max())
    assert err <= tol * float(np.abs(bound).max()), f"error {err:.3e}"


@pytest.mark.cuda
@needs_cuda
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("name", list(CASES))
def test_local_gemm_matches_the_reference(name, dtype):
    """Each case on the tile the configuration picks and, in the simulator, forced onto
    each of its tiles."""
    from gpuconv.cuda import local_gemm

    geom, x, wt, b = _case(name, dtype)
    _assert_matches(_launch(geom, x, wt, b), x, wt, b, geom, dtype)
    if local_gemm.simulator_enabled():
        forced = ([(tile, False) for tile in local_gemm.TILES["sim"]]
                  + [(tile, True) for tile in local_gemm.RUN_TILES["sim"]])
        for tile, runs in forced:
            config = local_gemm.local_gemm_launch(geom, dtype, tile, runs=runs)
            _assert_matches(_launch(geom, x, wt, b, config), x, wt, b, geom, dtype)


@pytest.mark.cuda
@needs_cuda
def test_local_gemm_is_deterministic_and_nan_stays_in_its_outputs():
    """Two launches give the same bits (fixed order, no atomics); a NaN weight of one
    (map, position) reaches exactly that map and position, for every image."""
    geom, x, wt, b = _case("partial_m_n_k", np.float32, seed=3)
    first = _launch(geom, x, wt, b)
    assert np.array_equal(first.view(np.uint32), _launch(geom, x, wt, b).view(np.uint32))
    wt[9, 1, 2, 4, 2, 0] = np.nan
    y = _launch(geom, x, wt, b)
    assert np.isnan(y[:, 9, 1, 2]).all() and np.isnan(y).sum() == geom.batch


@pytest.mark.cuda
@needs_cuda
def test_public_local_conv2d_takes_it_for_64_maps():
    """Through gpuconv.local_conv2d on the device: 64 maps (8 map blocks in the simulator),
    9 images (above the streaming kernel's 8), padding 1, a bias per map."""
    from gpuconv import local_conv2d
    from gpuconv.cuda import launch, local_gemm

    rng = np.random.default_rng(5)
    geom = conv_geometry((9, 2, 3, 3), (2, 2), 64, padding=1)
    assert isinstance(launch.local_conv2d_forward_config(geom, np.float32),
                      local_gemm.LocalGemmConfig)
    x = rng.uniform(-1, 1, (9, 2, 3, 3)).astype(np.float32)
    wt = rng.uniform(-1, 1, geom.local_weight_shape()).astype(np.float32)
    b = rng.uniform(-1, 1, 64).astype(np.float32)
    y = local_conv2d(x, wt, b, padding=1, device="cuda")
    _assert_matches(y, x, wt, b, geom, np.float32)


# --------------------------------------------------------------------------------------------
# dispatch, launch shape and factory (no device needed)
# --------------------------------------------------------------------------------------------

def test_dispatch_many_maps_above_the_streaming_batches():
    from gpuconv import workloads
    from gpuconv.cuda import kernels, launch, local_gemm, local_stream

    assert local_gemm.LOCAL_GEMM_MIN_MAPS == 64
    assert local_gemm.LOCAL_GEMM_NARROW_MIN_BATCH == 48

    def config(c_out, n=16, groups=1):
        geom = conv_geometry((n, 8 * groups, 6, 6), (3, 3), c_out * groups, groups=groups)
        return launch.local_conv2d_forward_config(geom, np.float32)

    gemm, batched = local_gemm.LocalGemmConfig, kernels.LocalConv2dConfig
    assert isinstance(config(64), gemm)
    assert isinstance(config(63), batched)                  # the narrow tile needs 48 images
    assert isinstance(config(63, n=48), gemm) and isinstance(config(16, n=48), gemm)
    assert isinstance(config(15, n=128), batched)           # fewer than 16 maps
    assert isinstance(config(16, n=47), batched)
    assert isinstance(config(64, groups=2), gemm)           # 64 a group
    assert isinstance(config(32, groups=2), batched)        # 32 a group, 16 images
    assert isinstance(config(64, n=8), local_stream.LocalStreamConfig)    # small batch
    if not local_gemm.simulator_enabled():
        assert config(64).kernel.name.startswith("local_conv2d_gemm_f32_t32x64_")
        assert config(63, n=48).kernel.name.startswith("local_conv2d_gemm_f32_t64x16_")
    names = kernels.workload_kernel_names()
    seen = set()
    for layer, geom in kernels.workload_geometries():
        chosen = launch.local_conv2d_forward_config(geom, np.float32)
        maps = geom.out_channels_per_group
        takes = maps >= 64 or (maps >= 16 and geom.batch >= 48)  # DeepFace: 16 maps, N = 128
        assert isinstance(chosen, gemm) == takes, layer.short_title
        assert names[layer.short_title][1] == chosen.kernel.name
        seen.add(takes)
    assert seen == {True, False}
    # the scratch a call reserves: none (no split-K partial sums, no bias placeholder)
    geom = workloads.gpu_geometry("vgg16-conv5_1")
    assert launch.local_conv2d_scratch_elements(geom, np.float32) == 0


def test_launch_shape_and_carries():
    from gpuconv.cuda import local_gemm

    if local_gemm.simulator_enabled():
        pytest.skip("the simulator has its own tile")
    from gpuconv import workloads

    vgg = workloads.gpu_geometry("vgg16-conv5_1")  # N = 32, 512 maps, 14 x 14, K = 512 * 9
    config = local_gemm.local_gemm_config(vgg, np.float32)
    assert config.kernel.name == "local_conv2d_gemm_f32_t32x64_k16_r8x4_o6"
    assert config.block == (64,) and config.grid == (196, 8) and config.batch_tiles == 1
    assert config.steps == (1, 2, 1)  # 16 terms = 1 channel, 2 kernel rows, 1 column
    assert config.slices == 1 and config.shared_bytes == 0
    big = conv_geometry((100, 64, 8, 8), (1, 1), 96)
    config = local_gemm.local_gemm_config(big, np.float32)
    assert config.batch_tiles == 4 and config.grid == (64 * 4, 2)
    assert config.steps == (16, 0, 0)
    assert local_gemm.local_gemm_config(vgg, np.float16).kernel.name == (
        "local_conv2d_gemm_f16_t32x64_k16_r8x4_o6")
    assert local_gemm.local_gemm_config(vgg, np.float64).kernel.name == (
        "local_conv2d_gemm_f64_t32x32_k16_r4x4_o4")
    l5 = workloads.gpu_geometry("deepface-l5")  # N = 128, 16 maps, 25 x 25, K = 16 * 49
    config = local_gemm.local_gemm_config(l5, np.float32)
    assert config.kernel.name == "local_conv2d_gemm_f32_t64x16_k16_r4x4_o8"
    assert config.block == (64,) and config.grid == (625 * 2, 1) and config.batch_tiles == 2
    assert config.steps == (0, 2, 2)  # 16 terms = 2 kernel rows and 2 columns of 7 x 7
    assert local_gemm.local_gemm_config(l5, np.float64).kernel.name == (
        "local_conv2d_gemm_f64_t64x16_k16_r4x4_o4")


def test_shared_pitches_spread_a_warps_stores_over_32_banks():
    from gpuconv.cuda import local_gemm

    for rows, tile_k in ((32, 16), (64, 16), (8, 4), (32, 8), (64, 32)):
        pitch = local_gemm._pitch(rows, tile_k)
        assert rows <= pitch < rows + 32
        # a warp's 32 threads: term t % tile_k, row t // tile_k
        banks = {((t % tile_k) * pitch + t // tile_k) % 32 for t in range(32)}
        assert len(banks) == 32, (rows, tile_k, pitch)
        # read in runs of 4: the pitch a multiple of 4 words, the stores of up to 16 terms
        # two-way at worst (32 terms: four-way; no run-reading tile has them)
        pitch = local_gemm._pitch(rows, tile_k, 4)
        assert rows <= pitch < rows + 32 and pitch % 4 == 0
        banks = [((t % tile_k) * pitch + t // tile_k) % 32 for t in range(32)]
        worst = max(banks.count(bank) for bank in banks)
        assert worst <= (2 if tile_k <= 16 else 4), (rows, tile_k, pitch)
    assert all(tile[2] <= 16 for tiles in local_gemm.RUN_TILES.values() for tile in tiles)


def test_factory_is_memoised_named_and_checks_its_tile():
    from gpuconv.cuda import local_gemm

    spec = local_gemm.local_gemm_kernel("f32", 32, 64, 16, 8, 4, 6)
    assert spec is local_gemm.local_gemm_kernel("f32", 32, 64, 16, 8, 4, 6)
    assert spec.name == "local_conv2d_gemm_f32_t32x64_k16_r8x4_o6"
    assert spec.launch_bounds == (64, 6) and spec.shared_vectors == (1, 1)
    runs = local_gemm.local_gemm_kernel("f32", 32, 64, 16, 8, 4, 4, runs=True)
    assert runs.name == "local_conv2d_gemm_f32_t32x64_k16_r8x4_o4_v4x4"
    assert runs.shared_vectors == (4, 4)
    with pytest.raises(ValueError, match="split evenly"):
        local_gemm.local_gemm_kernel("f32", 32, 64, 16, 3, 4, 2)
    with pytest.raises(ValueError, match="multiple of 4"):
        local_gemm.local_gemm_kernel("f32", 32, 64, 6, 8, 4, 2)


def test_resources_without_spills():
    """ptxas: the float32, float16 and float64 tiles and the simulator's, word-reading and
    run-reading, fit their launch bounds on sm_80 and sm_90 without spilling or a stack."""
    from gpuconv.cuda import local_gemm
    from gpuconv.cuda import ptx as _cuda_ptx

    if local_gemm.simulator_enabled():
        pytest.skip("the simulator compiles no PTX")
    if _cuda_ptx.find_ptxas() is None:
        pytest.skip("ptxas not found")
    for code, key in (("f32", "f32"), ("f16", "f32"), ("f64", "f64"), ("f32", "sim"),
                      ("f64", "sim")):
        for tile, runs in ([(t, False) for t in local_gemm.TILES[key]]
                           + [(t, True) for t in local_gemm.RUN_TILES[key]]):
            spec = local_gemm.local_gemm_kernel(code, *tile, runs=runs)
            for cc, text in _cuda_ptx.compile_ptx_multi(spec, ((8, 0), (9, 0))).items():
                info = _cuda_ptx.ptxas_info(text, f"sm_{cc[0]}{cc[1]}", spec.name)
                assert info.spill_stores == info.spill_loads == info.stack_frame == 0, info
                threads, blocks = spec.launch_bounds
                assert info.registers * threads * blocks <= 65536, info
