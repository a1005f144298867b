"""Property-based tests over the whole geometry space, against the float64 reference.

Profiles (tests/conftest.py): ``ci`` (default, 40 examples per property), ``sim`` (under the
CUDA simulator, 8, tiny sizes), ``long`` (2000; run on demand with ``HYPOTHESIS_PROFILE=long``).
Outside the simulator the output channels per group (1 to 33) and batch (1 to 20) reach
every CPU kernel variant; the reductions that span several L1 chunks are in
tests/test_cpu_kernels.py.
"""

import os

import numpy as np
import pytest

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import given, strategies as st  # noqa: E402

import gpuconv  # noqa: E402
from reference import (assert_close, conv2d_input_grad_ref, conv2d_ref,  # noqa: E402
                       conv2d_weight_grad_ref, local_conv2d_input_grad_ref, local_conv2d_ref,
                       local_conv2d_weight_grad_ref, output_size, padding_totals)

small = st.integers(1, 3)
SIMULATOR = os.environ.get("NUMBA_ENABLE_CUDASIM") == "1"
# Output channels per group and batch sizes that reach every CPU kernel variant (pixel
# vectors up to 12 channels, one channel vector to 16, two beyond) and batches of several
# vectors in the unshared kernel; the simulator keeps to tiny ones.
channels_per_group = small if SIMULATOR else st.sampled_from([1, 2, 3, 5, 7, 12, 13, 16, 17, 33])
batches = st.integers(1, 3) if SIMULATOR else st.integers(1, 20)


def _int_or_pair(values):
    return st.one_of(values, st.tuples(values, values))


@st.composite
def geometries(draw, local):
    groups = draw(st.integers(1, 3))
    c_in = groups * draw(small)
    c_out = groups * draw(channels_per_group)
    kh, kw = draw(small), draw(small)
    dilation = draw(_int_or_pair(st.integers(1, 2)))
    d = (dilation, dilation) if isinstance(dilation, int) else dilation
    padding = draw(st.one_of(st.just("valid"), st.just("same"), _int_or_pair(st.integers(0, 2))))
    stride = 1 if padding == "same" else draw(_int_or_pair(st.integers(1, 3)))
    totals = padding_totals(padding, (kh, kw), stride, dilation)
    # an input at least as large as the dilated kernel minus the padding
    h = max(1, d[0] * (kh - 1) + 1 - totals[0]) + draw(st.integers(0, 4))
    w = max(1, d[1] * (kw - 1) + 1 - totals[1]) + draw(st.integers(0, 4))
    out = output_size((h, w), (kh, kw), stride, padding, dilation)
    batch = draw(batches)
    dtype = draw(st.sampled_from([np.float32, np.float64]))
    bias_kind = draw(st.sampled_from([None, "channel", "position"] if local else [None, "channel"]))
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    x = rng.uniform(-1, 1, (batch, c_in, h, w)).astype(dtype)
    wshape = (c_out, *out, c_in // groups, kh, kw) if local else (c_out, c_in // groups, kh, kw)
    weight = rng.uniform(-1, 1, wshape).astype(dtype)
    bias = None if bias_kind is None else rng.uniform(
        -1, 1, (c_out,) if bias_kind == "channel" else (c_out, *out)).astype(dtype)
    return x, weight, bias, dict(stride=stride, padding=padding, dilation=dilation, groups=groups)


def _check(op, ref, case, device):
    x, w, b, kwargs = case
    y = op(x, w, b, device=device, **kwargs)
    assert y.dtype == x.dtype
    bound = ref(np.abs(x), np.abs(w), None if b is None else np.abs(b), **kwargs)
    assert_close(y, ref(x, w, b, **kwargs), bound, x.dtype)


@given(case=geometries(local=False))
def test_conv2d_property(case, device, poisoned_outputs):
    _check(gpuconv.conv2d, conv2d_ref, case, device)


@given(case=geometries(local=True))
def test_local_conv2d_property(case, device, poisoned_outputs):
    _check(gpuconv.local_conv2d, local_conv2d_ref, case, device)


@given(case=geometries(local=False), a=st.floats(-2, 2), c=st.floats(-2, 2))
def test_conv2d_is_linear_in_x(case, a, c, device):
    x, w, _, kwargs = case
    x = x.astype(np.float64); w = w.astype(np.float64)
    x2 = np.random.default_rng(0).uniform(-1, 1, x.shape)
    lhs = gpuconv.conv2d(a * x + c * x2, w, device=device, **kwargs)
    rhs = a * gpuconv.conv2d(x, w, device=device, **kwargs) + c * gpuconv.conv2d(x2, w, device=device, **kwargs)
    np.testing.assert_allclose(lhs, rhs, rtol=1e-10, atol=1e-10)


@given(case=geometries(local=False))
def test_tied_kernels_identity(case, device):
    x, w, b, kwargs = case
    shared = gpuconv.conv2d(x, w, b, device=device, **kwargs)
    tied = np.ascontiguousarray(np.broadcast_to(w[:, None, None], (w.shape[0], *shared.shape[2:], *w.shape[1:])))
    local = gpuconv.local_conv2d(x, tied, b, device=device, **kwargs)
    tol = 1e-5 if x.dtype == np.float32 else 1e-12
    scale = max(1.0, float(np.abs(shared).max()))
    np.testing.assert_allclose(local, shared, rtol=0, atol=tol * scale * 10)


def _check_gradients(case, device, local):
    x, w, _, kwargs = case
    if local:
        gin, gin_ref = gpuconv.grad.local_conv2d_input, local_conv2d_input_grad_ref
        gwt, gwt_ref = gpuconv.grad.local_conv2d_weight, local_conv2d_weight_grad_ref
        out_hw = w.shape[1:3]
    else:
        gin, gin_ref = gpuconv.grad.conv2d_input, conv2d_input_grad_ref
        gwt, gwt_ref = gpuconv.grad.conv2d_weight, conv2d_weight_grad_ref
        out_hw = output_size(x.shape[2:], w.shape[2:], kwargs["stride"], kwargs["padding"],
                             kwargs["dilation"])
    gy = np.random.default_rng(x.size).uniform(-1, 1, (x.shape[0], w.shape[0], *out_hw))
    gy = gy.astype(x.dtype)
    gx = gin(x.shape, w, gy, device=device, **kwargs)
    assert gx.dtype == x.dtype
    assert_close(gx, gin_ref(x.shape, w, gy, **kwargs),
                 gin_ref(x.shape, np.abs(w), np.abs(gy), **kwargs), x.dtype)
    gw = gwt(x, w.shape, gy, device=device, **kwargs)
    assert gw.dtype == x.dtype
    assert_close(gw, gwt_ref(x, w.shape, gy, **kwargs),
                 gwt_ref(np.abs(x), w.shape, np.abs(gy), **kwargs), x.dtype)


@given(case=geometries(local=False))
def test_conv2d_gradients_property(case, device, poisoned_outputs):
    _check_gradients(case, device, local=False)


@given(case=geometries(local=True))
def test_local_conv2d_gradients_property(case, device, poisoned_outputs):
    _check_gradients(case, device, local=True)
