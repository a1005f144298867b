"""CPU kernel variants against the float64 reference, and the CPU kernel chooser.

tests/test_conv.py keeps its sizes tiny (they also run in the CUDA simulator), so they only
reach the pixel-vector kernel. These cases are sized to reach every variant that
``choose_cpu_kernel`` can return (``CPU_KERNELS``; checked below), with channel counts that
leave partly filled blocks, pixel runs that end mid-block, strides, dilation, groups and
asymmetric ("same" with an even kernel) padding.
"""

import numpy as np
import pytest

from gpuconv import conv2d, local_conv2d
from gpuconv.cpu import choose_cpu_kernel
from gpuconv.cpu import conv2d as cpu_conv2d
from gpuconv.cpu.conv2d import CPU_KERNELS, CpuKernel
from gpuconv.geometry import conv_geometry
from reference import assert_close, conv2d_ref, local_conv2d_ref

DTYPES = [np.float32, np.float64]

K = CpuKernel
# (name, N, C_in, H, W, C_out, kernel, stride, padding, dilation, groups, expected variant,
#  also run unshared)
CASES = [
    ("cvec_merged", 2, 5, 12, 11, 37, 3, 1, 1, 1, 1, K("cvec2", "merged"), True),
    ("cvec_rows_stride", 1, 3, 13, 12, 33, (3, 5), (2, 3), (1, 2), 1, 1, K("cvec2", "rows"), True),
    ("cvec_dilated_same_even", 1, 4, 10, 9, 40, (2, 4), 1, "same", (2, 1), 1,
     K("cvec2", "merged"), True),
    ("cvec_groups", 2, 6, 7, 8, 66, 3, 1, 1, 1, 2, K("cvec2", "merged"), True),
    ("cvec_1x1", 3, 17, 5, 4, 64, 1, 1, 0, 1, 1, K("cvec2", "merged"), False),
    ("cvec_out_1x1", 1, 3, 5, 5, 32, 5, 1, 0, 1, 1, K("cvec2", "merged"), False),
    ("cvec_wide_row", 1, 2, 3, 700, 32, 3, (1, 2), 1, 1, 1, K("cvec2", "rows"), False),
    ("cvec1_merged", 1, 3, 40, 37, 14, 5, 1, 0, 1, 1, K("cvec1", "merged"), True),
    ("cvec1_rows", 2, 3, 23, 29, 16, 3, (2, 1), (0, 1), 1, 1, K("cvec1", "rows"), True),
    ("cvec1_groups", 1, 4, 9, 8, 32, 3, 1, 1, 1, 2, K("cvec1", "merged"), False),
    # stride 1, but by rows: a wide unpadded kernel on a small map (DeepFace L6's shape)
    ("cvec1_rows_small_map", 2, 3, 25, 25, 16, 5, 1, 0, 1, 1, K("cvec1", "rows"), True),
    ("cvec1_wide_row", 1, 2, 3, 900, 13, 3, (1, 3), 1, 1, 1, K("cvec1", "rows"), False),
    ("pvec_merged", 1, 3, 40, 37, 10, 5, 1, 0, 1, 1, K("pvec", "merged"), True),
    ("pvec_rows", 2, 3, 23, 29, 5, 3, (2, 1), (0, 1), 1, 1, K("pvec", "rows"), True),
    ("pvec_groups_partial_blocks", 1, 6, 8, 9, 21, 2, 1, 1, 1, 3, K("pvec", "merged"), False),
    ("pvec_long_row", 1, 1, 2, 1100, 3, (1, 3), 1, 0, 1, 1, K("pvec", "merged"), False),
    ("pvec_dilated_rows", 2, 3, 13, 19, 12, 3, (1, 2), (2, 0), (2, 3), 1, K("pvec", "rows"),
     False),
]
LOCAL_CASES = [case for case in CASES if case[-1]]


def _geometry(case):
    _, n, c_in, h, w, c_out, k, stride, padding, dilation, groups, _, _ = case
    kh, kw = (k, k) if isinstance(k, int) else k
    return conv_geometry((n, c_in, h, w), (kh, kw), c_out, stride, padding, dilation, groups)


def test_cases_reach_every_kernel_variant():
    """Each variant (and so each register block, merged and by rows) is some case's choice."""
    assert {case[-2] for case in CASES} == set(CPU_KERNELS)
    for case in CASES:
        assert choose_cpu_kernel(_geometry(case)) == case[-2], case[0]


def _arrays(rng, case, dtype, local):
    _, n, c_in, h, w, c_out, k, stride, padding, dilation, groups, _, _ = case
    geom = _geometry(case)
    x = rng.uniform(-1, 1, (n, c_in, h, w)).astype(dtype)
    shape = geom.local_weight_shape() if local else geom.shared_weight_shape()
    wt = rng.uniform(-1, 1, shape).astype(dtype)
    b = rng.uniform(-1, 1, c_out).astype(dtype)
    kwargs = dict(stride=stride, padding=padding, dilation=dilation, groups=groups)
    return geom, x, wt, b, kwargs


def _check(op, ref, x, wt, b, kwargs, dtype):
    y = op(x, wt, b, device="cpu", **kwargs)
    assert y.dtype == np.dtype(dtype)
    expected = ref(x, wt, b, **kwargs)
    bound = ref(np.abs(x), np.abs(wt), None if b is None else np.abs(b), **kwargs)
    assert_close(y, expected, bound, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_conv2d_kernel_variants_match_reference(case, dtype):
    rng = np.random.default_rng(10)
    geom, x, wt, b, kwargs = _arrays(rng, case, dtype, local=False)
    assert choose_cpu_kernel(geom) == case[-2]
    _check(conv2d, conv2d_ref, x, wt, b, kwargs, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
@pytest.mark.parametrize("case", LOCAL_CASES, ids=[c[0] for c in LOCAL_CASES])
def test_local_conv2d_larger_cases_match_reference(case, dtype):
    rng = np.random.default_rng(11)
    _, x, wt, b, kwargs = _arrays(rng, case, dtype, local=True)
    _check(local_conv2d, local_conv2d_ref, x, wt, b, kwargs, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
def test_nan_and_inf_propagate_through_the_channel_vector_kernel(dtype):
    """One NaN, one +Inf in x: exactly the outputs whose windows hold them are NaN / Inf."""
    x = np.zeros((1, 2, 8, 8), dtype)
    x[0, 0, 1, 1] = np.nan
    x[0, 1, 6, 6] = np.inf
    w = np.ones((32, 2, 3, 3), dtype)
    y = conv2d(x, w, padding=1, device="cpu")
    nan_expected = np.zeros((8, 8), bool)
    nan_expected[0:3, 0:3] = True
    inf_expected = np.zeros((8, 8), bool)
    inf_expected[5:8, 5:8] = True
    for co in (0, 17, 31):
        np.testing.assert_array_equal(np.isnan(y[0, co]), nan_expected)
        np.testing.assert_array_equal(np.isposinf(y[0, co]), inf_expected)
    assert np.all(y[0][:, ~(nan_expected | inf_expected)] == 0)


def test_tied_filters_make_the_local_kernel_the_shared_one():
    rng = np.random.default_rng(12)
    x = rng.uniform(-1, 1, (3, 4, 12, 11)).astype(np.float32)
    w = rng.uniform(-1, 1, (36, 4, 3, 3)).astype(np.float32)
    y = conv2d(x, w, stride=(1, 2), padding=1, device="cpu")
    wl = np.broadcast_to(w[:, None, None], (36, *y.shape[2:], 4, 3, 3)).copy()
    yl = local_conv2d(x, wl, stride=(1, 2), padding=1, device="cpu")
    np.testing.assert_allclose(yl, y, rtol=0, atol=1e-5)


def test_choose_cpu_kernel_names_the_variant():
    g = conv_geometry((1, 64, 56, 56), (3, 3), 64, 1, 1)
    assert choose_cpu_kernel(g) == CpuKernel("cvec2", "merged")
    g = conv_geometry((1, 3, 224, 224), (7, 7), 64, 2, 3)
    assert choose_cpu_kernel(g) == CpuKernel("cvec2", "rows")
    g = conv_geometry((1, 10, 496, 496), (3, 3), 5)
    assert choose_cpu_kernel(g) == CpuKernel("pvec", "merged")
    g = conv_geometry((1, 10, 496, 496), (3, 3), 13)
    assert choose_cpu_kernel(g) == CpuKernel("cvec1", "merged")
    # groups: what counts is the output channels of one group
    g = conv_geometry((1, 64, 8, 8), (3, 3), 64, groups=4)
    assert choose_cpu_kernel(g) == CpuKernel("cvec1", "merged")
    g = conv_geometry((1, 64, 8, 8), (3, 3), 64, groups=8)
    assert choose_cpu_kernel(g) == CpuKernel("pvec", "merged")


def test_cpu_kernel_str_is_its_name():
    """Benchmarks and docs print the chosen variant: ``str()`` keeps the "<vector>-<runs>"
    names."""
    assert [str(k) for k in CPU_KERNELS] == ["pvec-merged", "pvec-rows", "cvec1-merged",
                                             "cvec1-rows", "cvec2-merged", "cvec2-rows"]
    assert f"{CpuKernel('cvec1', 'rows')}" == "cvec1-rows"
    assert CpuKernel("pvec", "merged").merged and not CpuKernel("pvec", "rows").merged
    with pytest.raises(ValueError):
        CpuKernel("cvec3", "merged")
    with pytest.raises(ValueError):
        CpuKernel("pvec", "columns")


def test_generated_register_blocks_are_current():
    """_conv2d_blocks.py is generated from conv2d.py (the register blocks' one source) and
    checked in; regenerate it after changing the generator or its table."""
    assert cpu_conv2d._BLOCKS_FILE.read_text() == cpu_conv2d._register_blocks_source(), (
        "gpuconv/cpu/_conv2d_blocks.py is stale: run "
        "python -c \"from gpuconv.cpu import conv2d; conv2d._write_register_blocks()\"")


# Runs by rows of cvec1 with a block fitted to the row (21, 25 or 28 pixels: every row ends
# mid-block or exactly at its end), and runs that skip the kernel rows reading only the
# zero padding above or below the input (taps kernel row first): (name, N, C_in, H, W,
# C_out, kernel, stride, padding, dilation, groups, pixels per block, rows cropped)
ROW_FITTED = [
    ("fit21_l6", 2, 3, 25, 25, 16, 5, 1, 0, 1, 1, 21, False),
    ("fit25_crop_l6_input_grad", 2, 5, 21, 21, 16, 5, 1, 4, 1, 1, 25, True),
    ("fit28_two_blocks_last_partial", 1, 3, 13, 59, 16, 5, (2, 1), 0, 1, 1, 28, False),
    ("fit21_crop_rows_of_padding_only", 1, 3, 8, 30, 16, 3, (2, 1), (5, 1), 1, 1, 21, True),
    ("fit21_crop_dilated_groups", 1, 4, 10, 27, 32, 3, 2, (4, 1), (2, 1), 2, 21, True),
    ("cvec1_24_crop_even_kernel", 2, 3, 11, 23, 14, 4, 1, (3, 1), 1, 1, 24, True),
    # 720 taps of 240 per kernel row: the cropped ranges start and end inside tap chunks
    ("fit21_crop_chunked", 1, 80, 9, 10, 16, 3, 2, 2, 1, 1, 21, True),
]


@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
@pytest.mark.parametrize("case", ROW_FITTED, ids=[c[0] for c in ROW_FITTED])
def test_row_fitted_blocks_and_cropped_kernel_rows(case, dtype):
    name, n, c_in, h, w, c_out, k, stride, padding, dilation, groups, pixels, crop = case
    geom = conv_geometry((n, c_in, h, w), (k, k), c_out, stride, padding, dilation, groups)
    assert choose_cpu_kernel(geom) == CpuKernel("cvec1", "rows")
    layout = cpu_conv2d._conv2d_layout(geom, np.dtype(dtype).itemsize)
    assert (layout.pixels, layout.crop) == (pixels, crop)
    if name.endswith("chunked"):
        assert layout.n_taps > layout.tap_chunk
    rng = np.random.default_rng(len(name))
    x = rng.uniform(-1, 1, (n, c_in, h, w)).astype(dtype)
    wt = rng.uniform(-1, 1, geom.shared_weight_shape()).astype(dtype)
    b = rng.uniform(-1, 1, c_out).astype(dtype)
    kwargs = dict(stride=stride, padding=padding, dilation=dilation, groups=groups)
    _check(conv2d, conv2d_ref, x, wt, b, kwargs, dtype)


def test_row_fitted_and_cropped_runs_give_the_same_bits_on_any_thread_count():
    import numba

    rng = np.random.default_rng(7)
    x = rng.uniform(-1, 1, (3, 5, 21, 21)).astype(np.float32)
    w = rng.uniform(-1, 1, (16, 5, 5, 5)).astype(np.float32)
    assert cpu_conv2d._conv2d_layout(conv_geometry(x.shape, (5, 5), 16, padding=4), 4).crop
    before = numba.get_num_threads()
    try:
        numba.set_num_threads(1)
        one = conv2d(x, w, padding=4, device="cpu")
        numba.set_num_threads(numba.config.NUMBA_NUM_THREADS)
        every = conv2d(x, w, padding=4, device="cpu")
    finally:
        numba.set_num_threads(before)
    assert np.array_equal(one, every)


def test_kernel_rows_read_inside_the_input():
    """The kernel rows an output row reads inside the input, by brute force."""
    for h, k, s, p, d in [(8, 3, 2, 5, 1), (10, 3, 2, 4, 2), (21, 5, 1, 4, 1), (5, 4, 1, 3, 3)]:
        geom = conv_geometry((1, 1, h, 4), (k, 1), 1, (s, 1), (p, 0), (d, 1))
        for oy in range(geom.out_height):
            inside = [u for u in range(k) if 0 <= oy * s + u * d - p < h]
            lo, hi = cpu_conv2d._kernel_rows(geom, oy)
            assert list(range(lo, hi)) == inside, (h, k, s, p, d, oy)


# Input shape and (output channels, stride) of the chunked-reduction cases: 80 input
# channels x 3 x 3 = 720 taps.
CHUNKED_INPUT = (3, 80, 9, 10)
CHUNKED = [(c_out, stride) for c_out in (6, 16, 40) for stride in (1, 2)]


def _chunked_geometry(c_out, stride):
    return conv_geometry(CHUNKED_INPUT, (3, 3), c_out, stride=stride, padding=1)


def test_chunked_cases_reach_every_kernel_variant():
    assert {choose_cpu_kernel(_chunked_geometry(*c)) for c in CHUNKED} == set(CPU_KERNELS)


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("c_out, stride", CHUNKED,
                         ids=[str(choose_cpu_kernel(_chunked_geometry(*c))) for c in CHUNKED])
def test_reduction_split_into_several_tap_chunks(c_out, stride, dtype):
    """More taps than one L1-sized chunk of the reduction holds, so partial sums are carried
    over from chunk to chunk."""
    geom = _chunked_geometry(c_out, stride)
    layout = cpu_conv2d._conv2d_layout(geom, np.dtype(dtype).itemsize)
    assert layout.n_taps > layout.tap_chunk
    rng = np.random.default_rng(c_out + stride)
    x = rng.uniform(-1, 1, CHUNKED_INPUT).astype(dtype)
    w = rng.uniform(-1, 1, geom.shared_weight_shape()).astype(dtype)
    b = rng.uniform(-1, 1, c_out).astype(dtype)
    kwargs = dict(stride=stride, padding=1)
    y = conv2d(x, w, b, device="cpu", **kwargs)
    bound = conv2d_ref(np.abs(x), np.abs(w), np.abs(b), **kwargs)
    assert_close(y, conv2d_ref(x, w, b, **kwargs), bound, dtype)


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("batch", [17, 33])
def test_local_batch_spanning_several_vectors(batch, dtype):
    """Batches of more than one vector (16 float32 / 8 float64 lanes), not a multiple of it."""
    rng = np.random.default_rng(batch)
    x = rng.uniform(-1, 1, (batch, 4, 7, 8)).astype(dtype)
    w = rng.uniform(-1, 1, (6, 4, 4, 2, 3, 3)).astype(dtype)
    b = rng.uniform(-1, 1, (6, 4, 4)).astype(dtype)
    kwargs = dict(stride=(2, 1), padding=(1, 0), dilation=(1, 2), groups=2)
    y = local_conv2d(x, w, b, device="cpu", **kwargs)
    bound = local_conv2d_ref(np.abs(x), np.abs(w), np.abs(b), **kwargs)
    assert_close(y, local_conv2d_ref(x, w, b, **kwargs), bound, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
@pytest.mark.parametrize("shape, kwargs", [
    # a row of 37 outputs: two full vectors of float32 columns and a tail; 5 x 3 taps per
    # channel, 45 in all: the taps' last vector is partial
    ((1, 3, 9, 39), dict(stride=1, padding=(1, 0), dilation=1, groups=1)),
    # strided, dilated, grouped, asymmetric "same" (stride 1)
    ((1, 4, 10, 9), dict(stride=1, padding="same", dilation=(2, 1), groups=2)),
    ((1, 6, 11, 12), dict(stride=(2, 3), padding=(2, 1), dilation=(1, 2), groups=3)),
    # two input columns, padding 2: every window reaches into the padding (no interior)
    ((1, 2, 6, 2), dict(stride=1, padding=2, dilation=1, groups=1)),
])
def test_one_image_runs_the_tap_vector_kernel(shape, kwargs, dtype):
    """A batch of one takes the kernel whose vectors run over the taps (the batched kernel's
    run over the images: 15 of 16 lanes idle); its weights are followed in memory by NaN,
    which the masked load of each weight row's last vector must never read."""
    from gpuconv.cpu import local_conv2d as kernels

    rng = np.random.default_rng(sum(shape))
    x = rng.uniform(-1, 1, shape).astype(dtype)
    kh, kw = 5, 3
    geom = conv_geometry(shape, (kh, kw), 6, **kwargs)
    assert kernels._few_images(geom)
    w_shape = geom.local_weight_shape()
    size = int(np.prod(w_shape))
    buffer = np.full(size + 64, np.nan, dtype=dtype)
    w = buffer[:size].reshape(w_shape)
    w[...] = rng.uniform(-1, 1, w_shape)
    b = rng.uniform(-1, 1, w_shape[:3]).astype(dtype)
    y = local_conv2d(x, w, b, device="cpu", **kwargs)
    assert np.isfinite(y).all()
    bound = local_conv2d_ref(np.abs(x), np.abs(w), np.abs(b), **kwargs)
    assert_close(y, local_conv2d_ref(x, w, b, **kwargs), bound, dtype)
    two = np.concatenate([x, x])
    assert not kernels._few_images(conv_geometry(two.shape, (kh, kw), 6, **kwargs))
    y2 = local_conv2d(two, w, b, device="cpu", **kwargs)
    assert_close(y2[1], local_conv2d_ref(x, w, b, **kwargs)[0], bound[0], dtype)


def test_one_image_kernel_gives_the_same_bits_on_any_thread_count():
    import numba

    rng = np.random.default_rng(5)
    x = rng.uniform(-1, 1, (1, 3, 12, 40)).astype(np.float32)
    w = rng.uniform(-1, 1, (4, 10, 38, 3, 3, 3)).astype(np.float32)
    before = numba.get_num_threads()
    try:
        numba.set_num_threads(1)
        one = local_conv2d(x, w, device="cpu")
        numba.set_num_threads(numba.config.NUMBA_NUM_THREADS)
        every = local_conv2d(x, w, device="cpu")
    finally:
        numba.set_num_threads(before)
    assert np.array_equal(one, every)


@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
def test_vector_transpose_moves_every_element(dtype):
    """The scatter's in-register transpose: a lanes x lanes block at an offset and a row
    stride, against numpy's transpose."""
    from numba import njit

    from gpuconv.cpu.simd_ext import vtranspose

    @njit
    def transpose(src, index, stride, dst, dst_index):
        vtranspose(src, index, stride, dst, dst_index)

    lanes = 64 // np.dtype(dtype).itemsize
    src = np.arange(50 * 40, dtype=dtype)
    dst = np.full(lanes * lanes + 3, -1, dtype)
    transpose(src, 7, 40, dst, 3)
    block = src[7:7 + 40 * lanes].reshape(lanes, 40)[:, :lanes]
    np.testing.assert_array_equal(dst[3:].reshape(lanes, lanes), block.T)
    assert np.all(dst[:3] == -1)
