"""The CPU gradient kernels, called directly, against the float64 references.

Entry points of gpuconv.cpu: conv2d_input_grad / conv2d_weight_grad and their local_conv2d
counterparts. Checked: a grid of geometries (strides, asymmetric "same" padding with even
kernels, padding wider than the dilated kernel, dilation, groups, phases without taps,
1 x 1 images, batch 1 and batches spanning several vectors) in float32 and float64 with
tolerances relative to the magnitude bound; outputs prefilled with NaN (every element must
be written); bitwise determinism, also across thread counts; the adjoint identities with
the package's own forward kernels; NaN and Inf where the padded grid's junk pixels could
have turned them into spurious NaN; the scratch functions against traced allocations.
"""

import tracemalloc

import numba
import numpy as np
import pytest

from gpuconv.cpu import (conv2d_forward, conv2d_input_grad, conv2d_input_grad_scratch_bytes,
                         conv2d_weight_grad, conv2d_weight_grad_scratch_bytes,
                         local_conv2d_forward, local_conv2d_input_grad,
                         local_conv2d_input_grad_scratch_bytes, local_conv2d_weight_grad,
                         local_conv2d_weight_grad_scratch_bytes)
from gpuconv.cpu.conv2d_grad import (_weight_grad, _weight_grad_channels, _wg_choice,
                                     _wg_layout, _wgc_layout)
from gpuconv.geometry import conv_geometry
from reference import (assert_close, conv2d_input_grad_ref, conv2d_weight_grad_ref,
                       local_conv2d_input_grad_ref, local_conv2d_weight_grad_ref)

DTYPES = [np.float32, np.float64]

# (name, N, C_in, H, W, C_out, kernel, stride, padding, dilation, groups)
CASES = [
    ("plain", 2, 5, 9, 11, 7, 3, 1, 1, 1, 1),
    ("stride_rect_kernel", 1, 3, 13, 12, 6, (3, 5), (2, 3), (1, 2), 1, 1),
    ("same_even_dilated", 1, 4, 10, 9, 6, (2, 4), 1, "same", (2, 1), 1),
    ("groups", 2, 6, 7, 8, 9, 3, 1, 1, 1, 3),
    ("image_1x1", 1, 3, 1, 1, 5, 1, 1, 0, 1, 1),
    ("image_1x1_padded", 1, 3, 1, 1, 5, 3, 1, 1, 1, 1),
    ("pad_wider_than_kernel", 2, 4, 11, 13, 5, 3, (2, 2), (4, 3), (2, 3), 1),
    ("pad_wider_than_kernel_stride1", 1, 2, 5, 4, 3, 2, 1, 3, 1, 1),
    ("stride_equals_dilation", 1, 2, 9, 9, 3, 3, 2, 0, 2, 1),
    ("stride_beyond_kernel", 1, 2, 7, 6, 3, 2, 4, 0, 1, 1),
    ("odd_batch_strides", 3, 3, 17, 15, 6, 5, (3, 2), (2, 1), 1, 1),
    ("many_channels", 2, 20, 6, 7, 37, 3, 1, 1, 1, 1),
    ("long_runs", 1, 2, 40, 37, 3, 3, 1, 1, 1, 1),
    ("batch_19_groups", 19, 4, 7, 6, 6, 3, (1, 2), (1, 0), (1, 2), 2),
    # DeepFace L6 and L5 in small: input gradients by rows with 25- and 28-pixel blocks that
    # skip the kernel rows over gy's zero padding (see test_input_grad_by_cropped_rows)
    ("deepface_l6_like", 1, 16, 25, 25, 3, 5, 1, 0, 1, 1),
    ("deepface_l5_like_stride2", 1, 16, 55, 55, 3, 7, 2, 0, 1, 1),
]
IDS = [c[0] for c in CASES]


def _setup(case, dtype, local, seed=0):
    _, n, c_in, h, w, c_out, k, stride, padding, dilation, groups = case
    kernel = (k, k) if isinstance(k, int) else k
    geom = conv_geometry((n, c_in, h, w), kernel, c_out, stride, padding, dilation, groups)
    rng = np.random.default_rng(seed)
    x = rng.uniform(-1, 1, (n, c_in, h, w)).astype(dtype)
    shape = geom.local_weight_shape() if local else geom.shared_weight_shape()
    wt = rng.uniform(-1, 1, shape).astype(dtype)
    gy = rng.uniform(-1, 1, geom.output_shape).astype(dtype)
    kwargs = dict(stride=stride, padding=padding, dilation=dilation, groups=groups)
    return geom, x, wt, gy, kwargs


def _nan(shape, dtype):
    return np.full(shape, np.nan, dtype)


_OPS = {
    False: (conv2d_input_grad, conv2d_weight_grad, conv2d_input_grad_ref,
            conv2d_weight_grad_ref),
    True: (local_conv2d_input_grad, local_conv2d_weight_grad, local_conv2d_input_grad_ref,
           local_conv2d_weight_grad_ref),
}


@pytest.mark.parametrize("local", [False, True], ids=["conv2d", "local"])
@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_gradients_match_reference(case, dtype, local):
    input_grad, weight_grad, input_ref, weight_ref = _OPS[local]
    geom, x, wt, gy, kwargs = _setup(case, dtype, local)
    gx = input_grad(gy, wt, _nan(x.shape, dtype), geom)
    assert gx.dtype == np.dtype(dtype)
    assert_close(gx, input_ref(x.shape, wt, gy, **kwargs),
                 input_ref(x.shape, np.abs(wt), np.abs(gy), **kwargs), dtype)
    gw = weight_grad(x, gy, _nan(wt.shape, dtype), geom)
    assert_close(gw, weight_ref(x, wt.shape, gy, **kwargs),
                 weight_ref(np.abs(x), wt.shape, np.abs(gy), **kwargs), dtype)


def test_weight_grad_partitions_are_reached():
    """The grid reaches one part (written straight to the output) and several parts (the
    ordered reduction of partial sums), and the three run layouts."""
    layouts = [_wg_layout(_setup(c, np.float32, False)[0], 4) for c in CASES]
    assert {lay.n_parts > 1 for lay in layouts} == {False, True}
    assert {lay.runs for lay in layouts} == {"merged", "images", "rows"}
    assert any(lay.n_rows > lay.part_rows > 1 for lay in layouts)


def test_input_grad_by_cropped_rows():
    """The DeepFace-like cases run phases by rows with cropped kernel rows and row-fitted
    blocks of 25 and 28 pixels."""
    from gpuconv.cpu.conv2d import _conv2d_layout
    from gpuconv.cpu.conv2d_grad import _calls

    layouts = [_conv2d_layout(call.geom, 4) for case in CASES[-2:]
               for call in _calls(_setup(case, np.float32, False)[0])[0]]
    assert {(lay.pixels, lay.crop) for lay in layouts if not lay.merged} == {(25, True),
                                                                            (28, True)}


_DETERMINISM_CASES = [CASES[0], CASES[10], CASES[12], CASES[13], CASES[14]]


@pytest.mark.parametrize("local", [False, True], ids=["conv2d", "local"])
@pytest.mark.parametrize("case", _DETERMINISM_CASES, ids=[c[0] for c in _DETERMINISM_CASES])
def test_bitwise_deterministic_across_calls_and_thread_counts(case, local):
    input_grad, weight_grad, _, _ = _OPS[local]
    geom, x, wt, gy, _ = _setup(case, np.float32, local, seed=3)

    def both():
        return (input_grad(gy, wt, _nan(x.shape, np.float32), geom),
                weight_grad(x, gy, _nan(wt.shape, np.float32), geom))

    first = both()
    second = both()
    threads = numba.get_num_threads()
    numba.set_num_threads(1)
    try:
        single = both()
    finally:
        numba.set_num_threads(threads)
    for a, b, c in zip(first, second, single):
        assert a.tobytes() == b.tobytes()
        assert a.tobytes() == c.tobytes()


def _forward(local, x, wt, geom):
    out = _nan(geom.output_shape, x.dtype)
    bias = np.zeros((geom.out_channels, 1, 1), x.dtype)
    (local_conv2d_forward if local else conv2d_forward)(x, wt, bias, False, out, geom)
    return out


@pytest.mark.parametrize("local", [False, True], ids=["conv2d", "local"])
@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_adjoint_identities_with_the_forward_kernels(case, local):
    """<f(x, w), gy> == <x, grad_x> == <w, grad_w> (f is linear in x and in w), float64,
    with the package's own forward kernels; tolerance relative to the sum of |terms|."""
    input_grad, weight_grad, _, _ = _OPS[local]
    geom, x, wt, gy, _ = _setup(case, np.float64, local, seed=5)
    lhs = float(np.sum(_forward(local, x, wt, geom) * gy))
    scale = float(np.sum(_forward(local, np.abs(x), np.abs(wt), geom) * np.abs(gy)))
    gx = input_grad(gy, wt, _nan(x.shape, np.float64), geom)
    gw = weight_grad(x, gy, _nan(wt.shape, np.float64), geom)
    assert abs(lhs - float(np.sum(x * gx))) <= 1e-12 * scale
    assert abs(lhs - float(np.sum(wt * gw))) <= 1e-12 * scale


def _same_specials(result, expected):
    np.testing.assert_array_equal(np.isnan(result), np.isnan(expected))
    np.testing.assert_array_equal(np.isposinf(result), np.isposinf(expected))
    np.testing.assert_array_equal(np.isneginf(result), np.isneginf(expected))


@pytest.mark.parametrize("local", [False, True], ids=["conv2d", "local"])
@pytest.mark.parametrize("stride", [1, 2], ids=["stride1", "stride2"])
def test_inf_and_nan_reach_exactly_the_gradients_they_are_in(stride, local):
    """Inf in the last input column and row (which junk pixels of the padded grid and the
    masked tails read in the weight gradient), a NaN and an Inf in grad_output: the
    NaN/Inf pattern of every gradient is the reference's, nothing more."""
    input_grad, weight_grad, input_ref, weight_ref = _OPS[local]
    case = ("specials", 2, 3, 9, 10, 5, 3, stride, 1, 1, 1)
    geom, x, wt, gy, kwargs = _setup(case, np.float64, local, seed=7)
    x[0, 1, :, -1] = np.inf
    x[1, 2, -1, :] = -np.inf
    gw = weight_grad(x, gy, _nan(wt.shape, np.float64), geom)
    with np.errstate(invalid="ignore"):  # inf - inf in the reference's sums
        _same_specials(gw, weight_ref(x, wt.shape, gy, **kwargs))
    gy[1, 3, 2, 2] = np.nan
    gy[0, 1, -1, 0] = np.inf
    gx = input_grad(gy, wt, _nan(x.shape, np.float64), geom)
    _same_specials(gx, input_ref(x.shape, wt, gy, **kwargs))


@pytest.mark.parametrize("local", [False, True], ids=["conv2d", "local"])
def test_inf_weight_in_the_input_gradient(local):
    """An Inf weight: every input pixel its tap reaches is non-finite. The local kernel adds
    only the terms of covering windows, so its pattern is exactly the reference's; the
    conv2d input gradient runs the forward convolution of grad_output, whose zero padding
    meets the Inf tap too (0 * inf = NaN, as in a forward convolution with that weight),
    so near the border it may hold NaN where the reference's scatter has none."""
    input_grad, _, input_ref, _ = _OPS[local]
    case = ("inf_weight", 2, 3, 9, 10, 5, 3, 1, 1, 1, 1)
    geom, x, wt, gy, kwargs = _setup(case, np.float64, local, seed=8)
    wt.reshape(-1)[7] = np.inf
    gx = input_grad(gy, wt, _nan(x.shape, np.float64), geom)
    expected = input_ref(x.shape, wt, gy, **kwargs)
    if local:
        _same_specials(gx, expected)
    else:
        assert np.all(~np.isfinite(gx)[~np.isfinite(expected)])
        finite = np.isfinite(gx)
        np.testing.assert_allclose(gx[finite], expected[finite], rtol=1e-12, atol=1e-12)


_SCRATCH = {
    (False, "input"): conv2d_input_grad_scratch_bytes,
    (False, "weight"): conv2d_weight_grad_scratch_bytes,
    (True, "input"): local_conv2d_input_grad_scratch_bytes,
    (True, "weight"): local_conv2d_weight_grad_scratch_bytes,
}


@pytest.mark.parametrize("local", [False, True], ids=["conv2d", "local"])
@pytest.mark.parametrize("which", ["input", "weight"])
@pytest.mark.parametrize("case", [CASES[0], CASES[1], CASES[6], CASES[12], CASES[13]],
                         ids=[CASES[i][0] for i in (0, 1, 6, 12, 13)])
def test_scratch_bytes_cover_the_allocations(case, which, local):
    input_grad, weight_grad, _, _ = _OPS[local]
    geom, x, wt, gy, _ = _setup(case, np.float32, local)
    out = _nan(x.shape if which == "input" else wt.shape, np.float32)
    call = ((lambda: input_grad(gy, wt, out, geom)) if which == "input"
            else (lambda: weight_grad(x, gy, out, geom)))
    call()  # compiled beforehand: only the call's own allocations are traced
    tracemalloc.start()
    try:
        call()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    estimate = _SCRATCH[(local, which)](geom, 4)
    assert 0 < peak <= estimate


# Stride-1 geometries for the two run layouts of the weight gradient, each forced: odd
# widths, padding on one side, dilation, groups, an image longer than one run, and a
# batch split into parts (with one run per image, parts end at image boundaries).
_RUNS_CASES = [
    CASES[0], CASES[2], CASES[3], CASES[7], CASES[11], CASES[12],
    ("deepface_l6_like", 3, 4, 25, 25, 5, 5, 1, 0, 1, 1),
    ("pad_right_only", 2, 3, 9, 13, 4, (2, 3), 1, ((0, 1), (0, 2)), 1, 1),
    ("batch_40_parts", 40, 1, 12, 11, 2, 3, 1, 0, 1, 1),
]


@pytest.mark.parametrize("runs", ["merged", "images"])
@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
@pytest.mark.parametrize("case", _RUNS_CASES, ids=[c[0] for c in _RUNS_CASES])
def test_weight_grad_run_layouts_match_reference(case, dtype, runs):
    geom, x, wt, gy, kwargs = _setup(case, dtype, False)
    gw = _weight_grad(x, gy, _nan(wt.shape, dtype), geom,
                      _wg_layout(geom, np.dtype(dtype).itemsize, runs))
    assert_close(gw, conv2d_weight_grad_ref(x, wt.shape, gy, **kwargs),
                 conv2d_weight_grad_ref(np.abs(x), wt.shape, np.abs(gy), **kwargs), dtype)


def test_weight_grad_run_layouts_are_reached():
    """The run-layout grid above has an image split into several runs and a batch split
    into several parts in the per-image layout, and the default picks the per-image runs
    where they compute fewer pixels (DeepFace L6: 8 x 528 instead of 4960)."""
    layouts = [_wg_layout(_setup(c, np.float32, False)[0], 4, "images") for c in _RUNS_CASES]
    assert any(lay.runs_per_image > 1 for lay in layouts)
    assert any(lay.n_parts > 1 and lay.part_rows > 1 for lay in layouts)
    l6 = conv_geometry((8, 16, 25, 25), (5, 5), 16)
    assert _wg_layout(l6, 4).runs == "images"
    assert _wg_layout(l6, 4).gy_len < _wg_layout(l6, 4, "merged").gy_len


@pytest.mark.parametrize("runs", ["merged", "images"])
def test_weight_grad_specials_in_both_run_layouts(runs):
    """An Inf in the input (read by junk pixels of the padded grid: the masked loads) and,
    separately, finite inputs (the plain loads) give the reference's pattern and values."""
    case = ("specials", 3, 3, 9, 10, 5, 3, 1, 1, 1, 1)
    geom, x, wt, gy, kwargs = _setup(case, np.float64, False, seed=9)
    layout = _wg_layout(geom, 8, runs)
    finite = _weight_grad(x, gy, _nan(wt.shape, np.float64), geom, layout)
    assert_close(finite, conv2d_weight_grad_ref(x, wt.shape, gy, **kwargs),
                 conv2d_weight_grad_ref(np.abs(x), wt.shape, np.abs(gy), **kwargs),
                 np.float64)
    x[1, 0, :, -1] = np.inf
    x[2, 2, 0, :] = -np.inf
    gw = _weight_grad(x, gy, _nan(wt.shape, np.float64), geom, layout)
    with np.errstate(invalid="ignore"):  # inf - inf in the reference's sums
        expected = conv2d_weight_grad_ref(x, wt.shape, gy, **kwargs)
    _same_specials(gw, expected)
    untouched = np.isfinite(expected)
    np.testing.assert_allclose(gw[untouched], finite[untouched], rtol=1e-12, atol=1e-12)


# The channel-vector weight gradient, forced on every geometry above (strides, dilation,
# groups, padding wider than the kernel, 1 x 1 images, channels not a multiple of the
# vector, taps not a multiple of the register block, one part and several).
_CHANNEL_CASES = CASES + _RUNS_CASES[6:]


@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
@pytest.mark.parametrize("case", _CHANNEL_CASES, ids=[c[0] for c in _CHANNEL_CASES])
def test_weight_grad_channel_vectors_match_reference(case, dtype):
    geom, x, wt, gy, kwargs = _setup(case, dtype, False)
    gw = _weight_grad_channels(x, gy, _nan(wt.shape, dtype), geom,
                               _wgc_layout(geom, np.dtype(dtype).itemsize))
    assert_close(gw, conv2d_weight_grad_ref(x, wt.shape, gy, **kwargs),
                 conv2d_weight_grad_ref(np.abs(x), wt.shape, np.abs(gy), **kwargs), dtype)


def test_weight_grad_channel_vectors_reach_their_paths_and_are_chosen():
    """The forced grid has one part and several, groups with several channel vectors and a
    partial last one, and taps that do not fill the last register block; by default each
    kernel is chosen somewhere on the grid, the channel vectors for DeepFace L6 (rows of 21
    on a grid of 25) and the pixel vectors for few output channels (a vector mostly
    empty)."""
    from gpuconv.cpu.conv2d_grad import _WGC_TAPS
    from gpuconv.cpu.simd import VECTOR_BYTES

    geoms = [_setup(c, np.float32, False)[0] for c in _CHANNEL_CASES]
    layouts = [_wgc_layout(g, 4) for g in geoms]
    assert {lay.n_parts > 1 for lay in layouts} == {False, True}
    assert any(lay.blocks_per_group > 1 and g.out_channels_per_group % (VECTOR_BYTES // 4)
               for g, lay in zip(geoms, layouts))
    assert any(lay.n_taps % _WGC_TAPS for lay in layouts)
    assert {_wg_choice(g, 4) for g in geoms} == {"channels", "pixels"}
    assert _wg_choice(conv_geometry((8, 16, 25, 25), (5, 5), 16), 4) == "channels"
    assert _wg_choice(conv_geometry((8, 16, 25, 25), (5, 5), 16), 8) == "channels"
    assert _wg_choice(conv_geometry((32, 3, 32, 32), (5, 5), 5), 4) == "pixels"


@pytest.mark.parametrize("stride", [1, 2], ids=["stride1", "stride2"])
def test_weight_grad_channel_vectors_specials(stride):
    """Inf in the input's last column and row and a NaN in grad_output: the channel-vector
    kernel's NaN/Inf pattern is the reference's, and its finite values are unchanged."""
    case = ("specials", 2, 3, 9, 10, 20, 3, stride, 1, 1, 1)
    geom, x, wt, gy, kwargs = _setup(case, np.float64, False, seed=7)
    layout = _wgc_layout(geom, 8)
    finite = _weight_grad_channels(x, gy, _nan(wt.shape, np.float64), geom, layout)
    x[0, 1, :, -1] = np.inf
    x[1, 2, -1, :] = -np.inf
    gy[1, 13, 2, 2] = np.nan
    gw = _weight_grad_channels(x, gy, _nan(wt.shape, np.float64), geom, layout)
    with np.errstate(invalid="ignore"):  # inf - inf in the reference's sums
        expected = conv2d_weight_grad_ref(x, wt.shape, gy, **kwargs)
    _same_specials(gw, expected)
    assert np.isnan(gw[13]).all()                     # grad_output's NaN: every tap
    assert not np.isfinite(gw[0, 1]).all()            # the input's Inf: some taps
    untouched = np.isfinite(expected)
    np.testing.assert_allclose(gw[untouched], finite[untouched], rtol=1e-12, atol=1e-12)
