"""The implicit-GEMM conv2d kernel (gpuconv.cuda.conv2d_gemm) against the float64 reference.

Tests marked ``cuda`` launch it (a GPU, or the simulator with ``NUMBA_ENABLE_CUDASIM=1``,
where the tiles are 8 positions x 8 maps, one position staged a thread, and 32 positions x
4 maps, two positions staged a thread, both 4 channels a chunk and 16 threads): the
geometries are tiny but leave partial tiles along the positions (M), the maps (N) and the
channel chunks (K), and every case runs on both tiles. The rest check the dispatch and the
factory and run everywhere.
"""

import numpy as np
import pytest

from gpuconv.device import cuda_available
from gpuconv.geometry import conv_geometry
from reference import TOLERANCE, conv2d_ref, half_tolerance

needs_cuda = pytest.mark.skipif(not cuda_available(), reason="numba.cuda cannot launch kernels "
                                "(no GPU and the simulator is off)")

DTYPES = [np.float16, np.float32, np.float64]
DTYPE_IDS = ["f16", "f32", "f64"]

# (n, c_in, h, w, c_out, kernel, stride, padding, dilation, groups, bias); the comments count
# the simulator's tiles (8 positions x 8 maps x 4 channels).
CASES = {
    # M = 2*3*3 = 18 (8 + 8 + 2), 11 maps (8 + 3), 6 channels (4 + 2), bias.
    "partial_m_n_k": (2, 6, 5, 5, 11, 3, 1, 0, 1, 1, True),
    # Two groups of 5 channels (4 + 1) and 3 maps each, padding 1, no bias.
    "groups": (1, 10, 4, 4, 6, 3, 1, 1, 1, 2, False),
    # Stride (2, 3), dilation (2, 1), asymmetric explicit padding, a 2 x 3 kernel.
    "stride_dilation_asym_padding": (2, 5, 7, 8, 9, (2, 3), (2, 3), ((2, 0), (1, 2)), (2, 1),
                                     1, True),
    # "same" with an even kernel: the extra row and column at the bottom and right.
    "same_even_kernel": (1, 3, 4, 5, 4, (2, 4), 1, "same", 1, 1, True),
    # 1 x 1 kernel: a matrix product over channels; 9 channels (4 + 4 + 1).
    "kernel_1x1": (3, 9, 2, 3, 5, 1, 1, 0, 1, 1, False),
    # 3 maps of 7 channels, M = 3*6*5 = 90 (the 32-position tile: 32 + 32 + 26, the last
    # thread's second position past the end), stride 1, padding 1, bias.
    "few_maps_two_positions": (3, 7, 6, 5, 3, 3, 1, 1, 1, 1, True),
}


def _case(name, dtype, seed=7):
    n, c_in, h, w, c_out, k, stride, padding, dilation, groups, bias = CASES[name]
    k = (k, k) if isinstance(k, int) else k
    geom = conv_geometry((n, c_in, h, w), k, c_out, stride, padding, dilation, groups)
    rng = np.random.default_rng(seed)
    x = rng.uniform(-1, 1, (n, c_in, h, w)).astype(dtype)
    wt = rng.uniform(-1, 1, geom.shared_weight_shape()).astype(dtype)
    b = rng.uniform(-1, 1, c_out).astype(dtype) if bias else None
    kwargs = dict(stride=stride, padding=padding, dilation=dilation, groups=groups)
    return geom, x, wt, b, kwargs


def _launch(geom, x, wt, b, config=None):
    from numba import cuda

    from gpuconv.cuda import conv2d_gemm, launch

    config = config or conv2d_gemm.conv2d_gemm_config(geom, x.dtype)
    d_x, d_w = cuda.to_device(x), cuda.to_device(wt)
    d_b = None if b is None else cuda.to_device(b)
    d_out = cuda.to_device(np.full(geom.output_shape, np.nan, x.dtype))
    launch.launch_conv2d(d_x, d_w, d_b, d_out, geom, cuda.default_stream(), config)
    return d_out.copy_to_host()


def _assert_matches(y, x, wt, b, kwargs, dtype):
    f64 = (lambda a: None if a is None else a.astype(np.float64))
    expected = conv2d_ref(f64(x), f64(wt), f64(b), **kwargs)
    bound = conv2d_ref(np.abs(f64(x)), np.abs(f64(wt)), None if b is None else np.abs(f64(b)),
                       **kwargs)
    y = np.asarray(y, dtype=np.float64)
    assert y.shape == expected.shape
    assert np.all(np.isfinite(y)), "an output was never written (NaN from the prefill)"
    terms = wt.shape[1] * wt.shape[2] * wt.shape[3] + 1
    tol = half_tolerance(terms) if dtype == np.float16 else TOLERANCE[np.dtype(dtype)]
    err = float(np.abs(y - expected).max())
    assert err <= tol * float(np.abs(bound).max()), f"error {err:.3e}"


@pytest.mark.cuda
@needs_cuda
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("name", list(CASES))
def test_gemm_kernel_matches_the_reference(name, dtype):
    geom, x, wt, b, kwargs = _case(name, dtype)
    _assert_matches(_launch(geom, x, wt, b), x, wt, b, kwargs, dtype)


@pytest.mark.cuda
@needs_cuda
@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("name", list(CASES))
def test_every_simulator_tile_matches_the_reference(name, dtype):
    """Each case forced onto each of the simulator's tiles: one staged position a thread
    (8 x 8) and two, ``threads`` apart (32 x 4, maps split over several blocks where a
    group has more than 4)."""
    from gpuconv.cuda import conv2d_gemm
    from gpuconv.device import simulator_enabled

    if not simulator_enabled():
        pytest.skip("the simulator's tiles (a GPU runs its own)")
    geom, x, wt, b, kwargs = _case(name, dtype)
    m_total = geom.batch * geom.out_height * geom.out_width
    code = conv2d_gemm.dtype_code(dtype)
    for tile in conv2d_gemm.TILES["sim"]:
        blocks_n = -(-geom.out_channels_per_group // tile[1])
        config = conv2d_gemm.Conv2dGemmConfig(
            conv2d_gemm.conv2d_gemm_kernel(code, *tile),
            ((tile[0] // tile[3]) * (tile[1] // tile[4]),),
            (-(-m_total // tile[0]), geom.groups * blocks_n), blocks_n, 0)
        _assert_matches(_launch(geom, x, wt, b, config), x, wt, b, kwargs, dtype)


@pytest.mark.cuda
@needs_cuda
def test_gemm_kernel_is_deterministic():
    """Two launches give the same bits (fixed summation order, no atomics)."""
    geom, x, wt, b, _ = _case("partial_m_n_k", np.float32, seed=3)
    first = _launch(geom, x, wt, b)
    assert np.array_equal(first.view(np.uint32), _launch(geom, x, wt, b).view(np.uint32))


@pytest.mark.cuda
@needs_cuda
def test_public_conv2d_takes_the_gemm_for_32_channels():
    """Through gpuconv.conv2d on the device: 32 input channels (8 chunks in the simulator,
    one partial tile of 9 positions and 3 maps), padding 1."""
    from gpuconv import conv2d
    from gpuconv.cuda import kernels

    rng = np.random.default_rng(5)
    x = rng.uniform(-1, 1, (1, 32, 3, 3)).astype(np.float32)
    wt = rng.uniform(-1, 1, (3, 32, 3, 3)).astype(np.float32)
    b = rng.uniform(-1, 1, 3).astype(np.float32)
    geom = conv_geometry(x.shape, (3, 3), 3, padding=1)
    assert "conv2d_gemm_" in kernels.conv2d_config(geom, np.float32).kernel.name
    y = conv2d(x, wt, b, padding=1, device="cuda")
    _assert_matches(y, x, wt, b, dict(padding=1), np.float32)


# --------------------------------------------------------------------------------------------
# dispatch and factory (no device needed)
# --------------------------------------------------------------------------------------------

def test_channel_heavy_layers_take_the_gemm_and_the_others_keep_the_direct_kernel():
    from gpuconv.cuda import conv2d_gemm, kernels

    def name(c_in, groups=1, dtype=np.float32):
        geom = conv_geometry((2, c_in, 8, 8), (3, 3), 2 * groups, padding=1, groups=groups)
        return kernels.conv2d_config(geom, dtype).kernel.name

    assert conv2d_gemm.GEMM_MIN_CHANNELS == 16
    assert name(16).startswith("conv2d_gemm_f32_")
    assert name(16, dtype=np.float16).startswith("conv2d_gemm_f16_")
    assert name(48, dtype=np.float64).startswith("conv2d_gemm_f64_")
    assert name(15).startswith("conv2d_f32_k3x3_")
    assert name(32, groups=2).startswith("conv2d_gemm_")      # 16 channels a group
    assert name(30, groups=2).startswith("conv2d_f32_")       # 15 a group


def test_default_suite_dispatch():
    """The benchmark layers with 16 or more input channels a group (DeepFace's, ResNet's,
    VGG's) take the GEMM; the seed and AlexNet conv1 layers (3 and 10 channels) keep the
    direct kernel."""
    from gpuconv.cuda import kernels

    seen = set()
    for layer, geom in kernels.workload_geometries():
        kernel = kernels.conv2d_config(geom, np.float32).kernel.name
        gemm = geom.in_channels_per_group >= 16
        assert kernel.startswith("conv2d_gemm_") == gemm, (layer.short_title, kernel)
        seen.add(gemm)
    assert seen == {True, False}


def test_tile_choice_and_launch_shape():
    from gpuconv.cuda import conv2d_gemm, kernels

    if conv2d_gemm.simulator_enabled():
        pytest.skip("the simulator has its own tile")
    by_title = {layer.short_title: geom for layer, geom in kernels.workload_geometries()}
    res2 = conv2d_gemm.conv2d_gemm_config(by_title["ResNet-50 res2 3x3"], np.float32)
    assert res2.kernel.name == "conv2d_gemm_f32_t128x64_k8_r8x4_o2"
    assert res2.grid == (32 * 56 * 56 // 128, 1) and res2.block == (256,)
    vgg = conv2d_gemm.conv2d_gemm_config(by_title["VGG-16 conv5_1"], np.float32)
    assert vgg.kernel.name == "conv2d_gemm_f32_t128x64_k8_r8x4_o2"   # 392 blocks: a full wave
    assert vgg.grid == (32 * 14 * 14 // 128, 512 // 64)
    res5 = conv2d_gemm.conv2d_gemm_config(by_title["ResNet-50 res5 3x3"], np.float32)
    assert res5.kernel.name == "conv2d_gemm_f32_t64x64_k8_r4x4_o4"   # 104 large tiles: idle SMs
    assert res5.grid == (-(-32 * 7 * 7 // 64), 512 // 64)
    assert conv2d_gemm.conv2d_gemm_config(
        by_title["VGG-16 conv5_1"], np.float64).kernel.name == "conv2d_gemm_f64_t64x64_k8_r4x4_o2"
    grouped = conv_geometry((3, 64, 5, 5), (3, 3), 130, padding=1, groups=2)
    config = conv2d_gemm.conv2d_gemm_config(grouped, np.float32)
    assert config.blocks_n == 2 and config.grid == (-(-75 // 64), 4)
    # 16 maps: the 16-wide tiles. DeepFace L5 at batch 128 (625 blocks) fills more than
    # half the first wave of the 64-thread tile (6 an SM); at batch 64 (313) it does not,
    # and the 128-thread tile (4 an SM) is taken.
    l5 = by_title["DeepFace L5"]
    config = conv2d_gemm.conv2d_gemm_config(l5, np.float32)
    assert config.kernel.name == "conv2d_gemm_f32_t128x16_k8_r8x4_o6"
    assert config.block == (64,) and config.grid == (-(-128 * 25 * 25 // 128), 1)
    small = conv_geometry((64, 16, 55, 55), (7, 7), 16, stride=2)
    assert conv2d_gemm.conv2d_gemm_config(small, np.float32).kernel.name == (
        "conv2d_gemm_f32_t128x16_k8_r8x2_o4")
    assert conv2d_gemm.conv2d_gemm_config(l5, np.float64).kernel.name == (
        "conv2d_gemm_f64_t64x16_k8_r4x2_o4")
    # 32 maps: the 32-wide tile; 40 maps: two 32-wide blocks would waste 24, so 64.
    assert conv2d_gemm.conv2d_gemm_config(
        conv_geometry((32, 64, 28, 28), (3, 3), 32, padding=1), np.float32
    ).kernel.name == "conv2d_gemm_f32_t128x32_k8_r8x2_o2"


def test_factory_is_memoised_named_and_checks_its_tile():
    from gpuconv.cuda import conv2d_gemm

    spec = conv2d_gemm.conv2d_gemm_kernel("f16", 128, 64, 8, 8, 4, 2)
    assert spec is conv2d_gemm.conv2d_gemm_kernel("f16", 128, 64, 8, 8, 4, 2)
    assert spec.name == "conv2d_gemm_f16_t128x64_k8_r8x4_o2"
    assert spec.launch_bounds == (256, 2)
    assert conv2d_gemm.conv2d_gemm_kernel("f32", 64, 64, 8, 4, 4, 4).launch_bounds == (256, 4)
    assert conv2d_gemm.conv2d_gemm_kernel("f32", 128, 16, 8, 8, 4, 6).launch_bounds == (64, 6)
    with pytest.raises(ValueError, match="split evenly"):
        conv2d_gemm.conv2d_gemm_kernel("f32", 64, 64, 8, 3, 4, 2)
    with pytest.raises(ValueError, match="split evenly"):
        conv2d_gemm.conv2d_gemm_kernel("f32", 128, 12, 8, 8, 4, 2)  # 48 threads, 128 positions
    with pytest.raises(ValueError, match="multiple of 4"):
        conv2d_gemm.conv2d_gemm_kernel("f32", 64, 64, 2, 4, 4, 2)


@pytest.mark.parametrize("tile", [(128, 64, 8, 8, 4, 2), (64, 64, 8, 4, 4, 4),
                                  (128, 32, 8, 8, 2, 2), (128, 16, 8, 8, 4, 6),
                                  (8, 8, 4, 2, 2, 1), (32, 4, 4, 4, 2, 1)])
def test_each_output_of_a_tile_has_exactly_one_thread(tile):
    """The runs a thread reads and stores (``fragment_row``) cover the tile's positions and
    maps once: no output written twice, none left out. The 64-register tile reads words
    (runs of 1), the others runs of its register tile's 2 or 4."""
    from gpuconv.cuda import conv2d_gemm
    from gpuconv.cuda.spec import fragment_row

    bm, bn, _, tm, tn, _ = tile
    mt, nt = bm // tm, bn // tn
    va, vb = conv2d_gemm.conv2d_gemm_kernel("f32", *tile).shared_vectors
    assert (va, vb) == ((1, 1) if tile == (64, 64, 8, 4, 4, 4) else (min(tm, 4), min(tn, 4)))
    rows = sorted(fragment_row(t, i, mt, va) for t in range(mt) for i in range(tm))
    cols = sorted(fragment_row(t, j, nt, vb) for t in range(nt) for j in range(tn))
    assert rows == list(range(bm)) and cols == list(range(bn))


def test_the_multiply_reads_shared_memory_in_128_bit_loads():
    """A thread's positions and maps are runs of 4 consecutive words of 16-byte-aligned
    tiles: the float32 kernel's machine code reads shared memory only in 128-bit loads, 3
    for the 32 FMAs of a k step of the 8 x 4 register tile (12 scalar loads before). ptxas
    and nvdisasm (the test extra's wheels), no GPU."""
    pytest.importorskip("numba.cuda")
    from gpuconv.cuda import conv2d_gemm, ptx
    from gpuconv.device import simulator_enabled

    if simulator_enabled():
        pytest.skip("the simulator compiles nothing")
    if ptx.find_nvdisasm() is None:
        pytest.skip("nvdisasm not installed (pip install nvidia-cuda-nvdisasm)")
    spec = conv2d_gemm.conv2d_gemm_kernel("f32", 128, 64, 8, 8, 4, 2)
    assert spec.shared_vectors == (4, 4)
    ops = ptx.sass_opcodes(ptx.sass(ptx.compile_ptx(spec, (9, 0)), "sm_90", spec.name))
    loads = {op: n for op, n in ops.items() if op.startswith("LDS")}
    # the chunk loop runs its 8 k steps as two trips of 4: 4 x (2 + 1) loads, 4 x 32 FMAs
    assert loads == {"LDS.128": 12}, loads
    assert ops["FFMA"] == 128, ops
