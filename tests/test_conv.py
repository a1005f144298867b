"""Both operations on every device present, against the float64 reference.

Sizes stay tiny so the same bodies also run in the CUDA simulator.
"""

import numpy as np
import pytest

import gpuconv
from gpuconv import conv2d, local_conv2d
from reference import assert_close, conv2d_ref, local_conv2d_ref, output_size

DTYPES = [np.float32, np.float64]
# float16 (stored in half precision, accumulated in float32) runs the same feature grid.
GRID_DTYPES = [np.float16, np.float32, np.float64]
GRID_IDS = ["f16", "f32", "f64"]

# (name, N, C_in, H, W, C_out, kernel, stride, padding, dilation, groups): awkward on purpose.
GEOMETRIES = [
    ("basic", 2, 3, 7, 6, 4, 3, 1, 0, 1, 1),
    ("pad1", 2, 3, 6, 7, 2, 3, 1, 1, 1, 1),
    ("stride2", 1, 2, 9, 8, 3, 3, 2, 1, 1, 1),
    ("stride_gt_kernel", 2, 2, 9, 9, 2, 2, 3, 0, 1, 1),
    ("rect_kernel", 1, 2, 7, 8, 3, (2, 4), (1, 2), (1, 0), 1, 1),
    ("dilation", 1, 2, 9, 9, 2, 3, 1, 2, (2, 3), 1),
    ("groups", 2, 4, 6, 6, 6, 3, 1, 1, 1, 2),
    ("depthwise", 1, 3, 6, 5, 3, 3, 1, 1, 1, 3),
    ("same_odd", 1, 2, 6, 7, 2, 3, 1, "same", 1, 1),
    ("same_even", 2, 2, 6, 5, 3, (2, 4), 1, "same", 1, 1),
    ("same_dilated", 1, 1, 7, 7, 2, 3, 1, "same", 2, 1),
    ("valid", 1, 3, 5, 6, 2, 3, 1, "valid", 1, 1),
    ("kernel_1x1", 2, 5, 4, 3, 3, 1, 1, 0, 1, 1),
    ("kernel_eq_input", 2, 3, 4, 5, 2, (4, 5), 1, 0, 1, 1),
    ("kernel_eq_padded", 1, 2, 3, 3, 2, 5, 1, 1, 1, 1),
    ("output_1x1_strided", 1, 1, 5, 5, 1, 3, 4, 0, 1, 1),
    ("one_channel_batch1", 1, 1, 5, 9, 1, 3, 1, 0, 1, 1),
    ("big_padding", 1, 1, 3, 3, 2, 2, 1, 3, 1, 1),
]


def _case(rng, geometry, dtype, local, bias_kind):
    _, n, c_in, h, w, c_out, k, stride, padding, dilation, groups = geometry
    kh, kw = (k, k) if isinstance(k, int) else k
    x = rng.uniform(-1, 1, (n, c_in, h, w)).astype(dtype)
    if local:
        out_hw = output_size((h, w), (kh, kw), stride, padding, dilation)
        wt = rng.uniform(-1, 1, (c_out, *out_hw, c_in // groups, kh, kw)).astype(dtype)
    else:
        out_hw = None
        wt = rng.uniform(-1, 1, (c_out, c_in // groups, kh, kw)).astype(dtype)
    if bias_kind is None:
        b = None
    elif bias_kind == "channel":
        b = rng.uniform(-1, 1, c_out).astype(dtype)
    else:
        b = rng.uniform(-1, 1, (c_out, *out_hw)).astype(dtype)
    kwargs = dict(stride=stride, padding=padding, dilation=dilation, groups=groups)
    return x, wt, b, kwargs


def _check(op, ref, x, wt, b, kwargs, device, dtype):
    y = op(x, wt, b, device=device, **kwargs)
    assert isinstance(y, np.ndarray) and y.dtype == np.dtype(dtype)
    expected = ref(x, wt, b, **kwargs)
    bound = ref(np.abs(x), np.abs(wt), None if b is None else np.abs(b), **kwargs)
    terms = int(np.prod(wt.shape[-3:])) + (b is not None)
    assert_close(y, expected, bound, dtype, terms=terms)
    return y


@pytest.mark.parametrize("dtype", GRID_DTYPES, ids=GRID_IDS)
@pytest.mark.parametrize("geometry", GEOMETRIES, ids=[g[0] for g in GEOMETRIES])
def test_conv2d_matches_reference(geometry, dtype, device):
    rng = np.random.default_rng(0)
    bias_kind = "channel" if geometry[0] != "basic" else None
    x, wt, b, kwargs = _case(rng, geometry, dtype, False, bias_kind)
    _check(conv2d, conv2d_ref, x, wt, b, kwargs, device, dtype)


@pytest.mark.parametrize("dtype", GRID_DTYPES, ids=GRID_IDS)
@pytest.mark.parametrize("geometry", GEOMETRIES, ids=[g[0] for g in GEOMETRIES])
def test_local_conv2d_matches_reference(geometry, dtype, device):
    rng = np.random.default_rng(1)
    # every bias kind on a third of the geometries, taken in turn
    bias_kind = ["channel", "position", None][GEOMETRIES.index(geometry) % 3]
    x, wt, b, kwargs = _case(rng, geometry, dtype, True, bias_kind)
    _check(local_conv2d, local_conv2d_ref, x, wt, b, kwargs, device, dtype)


@pytest.mark.parametrize("bias_kind", [None, "channel", "position"])
def test_local_conv2d_bias_kinds(bias_kind, device):
    rng = np.random.default_rng(2)
    x, wt, b, kwargs = _case(rng, GEOMETRIES[1], np.float64, True, bias_kind)
    _check(local_conv2d, local_conv2d_ref, x, wt, b, kwargs, device, np.float64)


def test_cpu_row_blocks_and_batch1_parallel_grain():
    """Output larger than one parallel job's block of rows, at batch 1 (CPU only: size)."""
    rng = np.random.default_rng(3)
    geometry = ("large", 1, 2, 70, 66, 3, 3, 1, 1, 1, 1)
    for dtype in DTYPES:
        x, wt, b, kwargs = _case(rng, geometry, dtype, False, "channel")
        _check(conv2d, conv2d_ref, x, wt, b, kwargs, "cpu", dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
def test_tied_kernels_make_local_conv_a_conv(dtype, device):
    """A locally connected layer whose kernels are all equal is a convolution."""
    rng = np.random.default_rng(4)
    x = rng.standard_normal((2, 4, 7, 6)).astype(dtype)
    w = rng.standard_normal((6, 2, 3, 2)).astype(dtype)
    b = rng.standard_normal(6).astype(dtype)
    kwargs = dict(stride=(2, 1), padding=(1, 2), dilation=(1, 2), groups=2)
    shared = conv2d(x, w, b, device=device, **kwargs)
    out_h, out_w = shared.shape[2:]
    tied = np.ascontiguousarray(np.broadcast_to(w[:, None, None], (6, out_h, out_w, 2, 3, 2)))
    local = local_conv2d(x, tied, b, device=device, **kwargs)
    tol = 1e-5 if dtype == np.float32 else 1e-12
    np.testing.assert_allclose(local, shared, rtol=tol, atol=tol * np.abs(shared).max())
    # and both are right, not merely equal to each other
    expected = conv2d_ref(x, w, b, **kwargs)
    np.testing.assert_allclose(shared, expected, rtol=0, atol=10 * tol * np.abs(expected).max())


def test_1x1_kernel_is_a_matrix_product_over_channels(device):
    rng = np.random.default_rng(5)
    x = rng.standard_normal((2, 5, 3, 4))
    w = rng.standard_normal((3, 5, 1, 1))
    y = conv2d(x, w, device=device)
    expected = np.einsum("oc,nchw->nohw", w[:, :, 0, 0], x)
    np.testing.assert_allclose(y, expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("op", ["conv2d", "local_conv2d"])
def test_linear_in_x_and_in_weight(op, device):
    rng = np.random.default_rng(6)
    fn = getattr(gpuconv, op)
    x1, x2 = rng.standard_normal((2, 2, 2, 6, 5))
    shape = (3, 4, 3, 2, 3, 3) if op == "local_conv2d" else (3, 2, 3, 3)
    w1, w2 = rng.standard_normal((2, *shape))
    a, c = 0.75, -1.5
    lhs = fn(a * x1 + c * x2, w1, device=device)
    rhs = a * fn(x1, w1, device=device) + c * fn(x2, w1, device=device)
    np.testing.assert_allclose(lhs, rhs, rtol=1e-12, atol=1e-12)
    lhs = fn(x1, a * w1 + c * w2, device=device)
    rhs = a * fn(x1, w1, device=device) + c * fn(x1, w2, device=device)
    np.testing.assert_allclose(lhs, rhs, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("op", ["conv2d", "local_conv2d"])
@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
def test_empty_batch(op, dtype, device):
    x = np.zeros((0, 2, 5, 5), dtype=dtype)
    shape = (3, 3, 3, 2, 3, 3) if op == "local_conv2d" else (3, 2, 3, 3)
    y = getattr(gpuconv, op)(x, np.ones(shape, dtype=dtype), device=device)
    assert y.shape == (0, 3, 3, 3) and y.dtype == dtype


@pytest.mark.parametrize("layout", ["fortran", "transposed", "negative_strides", "sliced", "readonly"])
@pytest.mark.parametrize("op", ["conv2d", "local_conv2d"])
def test_any_input_strides(layout, op, device):
    rng = np.random.default_rng(7)
    x = rng.standard_normal((2, 3, 6, 7))
    shape = (2, 4, 5, 3, 3, 3) if op == "local_conv2d" else (2, 3, 3, 3)
    w = rng.standard_normal(shape)
    b = rng.standard_normal(2)
    if layout == "fortran":
        xv, wv = np.asfortranarray(x), np.asfortranarray(w)
    elif layout == "transposed":
        xv = np.ascontiguousarray(x.transpose(3, 2, 1, 0)).transpose(3, 2, 1, 0)
        wv = np.ascontiguousarray(w.T).T
    elif layout == "negative_strides":
        xv = np.ascontiguousarray(x[:, :, ::-1, ::-1])[:, :, ::-1, ::-1]
        wv = np.ascontiguousarray(w[::-1])[::-1]
    elif layout == "sliced":
        big = np.zeros((4, 3, 12, 14)); big[::2, :, ::2, ::2] = x
        xv, wv = big[::2, :, ::2, ::2], w
    else:
        xv, wv = x.copy(), w.copy()
        xv.setflags(write=False); wv.setflags(write=False)
    fn, ref = (local_conv2d, local_conv2d_ref) if op == "local_conv2d" else (conv2d, conv2d_ref)
    y = fn(xv, wv, b, padding=(0, 0), device=device)
    np.testing.assert_allclose(y, ref(x, w, b), rtol=1e-12, atol=1e-12)
    assert not np.shares_memory(y, xv)


@pytest.mark.parametrize("op", ["conv2d", "local_conv2d"])
def test_nan_reaches_exactly_the_windows_that_hold_it(op, device):
    x = np.ones((1, 1, 7, 7), dtype=np.float32)
    x[0, 0, 3, 3] = np.nan
    x[0, 0, 0, 6] = np.inf
    shape = (1, 5, 5, 1, 3, 3) if op == "local_conv2d" else (1, 1, 3, 3)
    y = getattr(gpuconv, op)(x, np.ones(shape, dtype=np.float32), device=device)
    nan_expected = np.zeros((5, 5), bool); nan_expected[1:4, 1:4] = True
    np.testing.assert_array_equal(np.isnan(y[0, 0]), nan_expected)
    inf_expected = np.zeros((5, 5), bool); inf_expected[0, 4] = True
    np.testing.assert_array_equal(np.isposinf(y[0, 0]), inf_expected)


def test_same_padding_keeps_size_and_splits_odd_total_like_pytorch():
    x = np.zeros((1, 1, 5, 5)); x[0, 0, 0, 0] = 1.0
    w = np.zeros((1, 1, 2, 2)); w[0, 0, 0, 0] = 1.0
    y = conv2d(x, w, padding="same", device="cpu")
    # total padding 1: none on top/left, one row/column at the bottom/right
    assert y.shape == (1, 1, 5, 5) and y[0, 0, 0, 0] == 1.0


def test_per_position_bias_of_a_single_row_output(device, poisoned_outputs):
    """Regression (found by the property tests): a (C_out, 1, W_out) bias is per position."""
    x = np.ones((1, 1, 1, 2), dtype=np.float32)
    w = np.ones((1, 1, 2, 1, 1, 1), dtype=np.float32)
    b = np.array([[[10.0, 20.0]]], dtype=np.float32)
    y = local_conv2d(x, w, b, device=device)
    np.testing.assert_array_equal(y, [[[[11.0, 21.0]]]])
