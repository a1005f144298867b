"""conv_transpose2d and local_conv_transpose2d, and their gradients, against float64 references.

The shared transpose is compared with ``torch.nn.functional.conv_transpose2d`` in float64 (an
independent implementation); the unshared one with ``reference.local_conv_transpose2d_ref``
(a scatter over a canvas, written from the definition) and by the adjoint identity with
``local_conv2d``. Cases with the ``device`` fixture run on the CUDA simulator too (tiny sizes).
"""

import itertools

import numpy as np
import pytest

import gpuconv
from gpuconv.device import cuda_available
from reference import local_conv2d_ref, local_conv_transpose2d_ref

torch = pytest.importorskip("torch")
F = torch.nn.functional

TOL = 1e-12  # float64, relative to the magnitude bound


def _torch_ref(x, w, b, stride, padding, output_padding, groups, dilation):
    t = (lambda a: None if a is None else torch.from_numpy(np.asarray(a, dtype=np.float64)))
    return F.conv_transpose2d(t(x), t(w), t(b), stride, padding, output_padding, groups,
                              dilation).numpy()


def _close(result, ref, bound):
    result = np.asarray(result)
    assert result.shape == ref.shape
    scale = max(float(np.max(np.abs(bound))), 1e-300)
    assert float(np.max(np.abs(result - ref))) <= TOL * scale


def _case(rng, groups, c_in_g=2, c_out_g=3, h=3, w=4, k=(2, 3), batch=2):
    x = rng.standard_normal((batch, c_in_g * groups, h, w))
    weight = rng.standard_normal((c_in_g * groups, c_out_g, *k))
    bias = rng.standard_normal(c_out_g * groups)
    return x, weight, bias


def _geometries():
    """(stride, padding, output_padding, groups, dilation) PyTorch accepts, incl. an
    output_padding past the reached rows (dilation > stride) and asymmetric pairs."""
    for s, p, op, d, g in itertools.product((1, 2, 3), (0, 1, 2), (0, 1, 2), (1, 2, 3), (1, 2)):
        if op < max(s, d):
            yield s, p, op, g, d
    yield (2, 1), (1, 0), (1, 0), 1, (1, 2)
    yield (1, 3), (0, 2), (0, 2), 2, (2, 1)


def test_conv_transpose2d_matches_torch_across_the_geometry():
    rng = np.random.default_rng(0)
    checked = 0
    for s, p, op, g, d in _geometries():
        x, w, b = _case(rng, g)
        try:
            ref = _torch_ref(x, w, b, s, p, op, g, d)
        except RuntimeError:  # PyTorch finds the output empty: so must gpuconv
            with pytest.raises(ValueError, match="output would be"):
                gpuconv.conv_transpose2d(x, w, b, s, p, op, g, d, device="cpu")
            continue
        y = gpuconv.conv_transpose2d(x, w, b, s, p, op, g, d, device="cpu")
        _close(y, ref, _torch_ref(abs(x), abs(w), abs(b), s, p, op, g, d))
        checked += 1
    assert checked > 100


# a few geometries on every device (the simulator runs these at tiny sizes)
DEVICE_CASES = [
    # stride, padding, output_padding, groups, dilation
    (1, 0, 0, 1, 1),
    (2, 1, 1, 1, 1),
    (3, 2, 2, 2, 1),
    (1, 0, 1, 1, 2),   # output_padding past the last reached row: zeros + bias
    ((2, 1), (0, 1), (1, 0), 2, (1, 2)),
]


@pytest.mark.parametrize("geometry", DEVICE_CASES)
def test_conv_transpose2d_on_each_device(device, geometry):
    s, p, op, g, d = geometry
    x, w, b = _case(np.random.default_rng(1), g, batch=1)
    y = gpuconv.conv_transpose2d(x, w, b, s, p, op, g, d, device=device)
    _close(y, _torch_ref(x, w, b, s, p, op, g, d),
           _torch_ref(abs(x), abs(w), abs(b), s, p, op, g, d))


def _local_case(rng, groups, stride, padding, output_padding, dilation, h=3, w=3, k=(2, 3),
                c_in_g=2, c_out_g=2, batch=2):
    x = rng.standard_normal((batch, c_in_g * groups, h, w))
    weight = rng.standard_normal((c_in_g * groups, h, w, c_out_g, *k))
    return x, weight


@pytest.mark.parametrize("geometry", DEVICE_CASES)
@pytest.mark.parametrize("bias_kind", ["none", "map", "position"])
def test_local_conv_transpose2d_matches_the_reference(device, geometry, bias_kind):
    s, p, op, g, d = geometry
    rng = np.random.default_rng(2)
    x, w = _local_case(rng, g, s, p, op, d, batch=1 if device == "cuda" else 2)
    ref_shape = local_conv_transpose2d_ref(x, w, None, s, p, op, g, d).shape
    b = {"none": None, "map": rng.standard_normal(ref_shape[1]),
         "position": rng.standard_normal(ref_shape[1:])}[bias_kind]
    y = gpuconv.local_conv_transpose2d(x, w, b, s, p, op, g, d, device=device)
    _close(y, local_conv_transpose2d_ref(x, w, b, s, p, op, g, d),
           local_conv_transpose2d_ref(abs(x), abs(w), None if b is None else abs(b), s, p, op,
                                      g, d))


def _pairs(v):
    return v if isinstance(v, tuple) else (v, v)


@pytest.mark.parametrize("geometry", [c for c in DEVICE_CASES
                                      if all(o < s for o, s in zip(_pairs(c[2]), _pairs(c[0])))])
def test_local_conv_transpose2d_is_the_adjoint_of_local_conv2d(device, geometry):
    """<local_conv2d(a, w), y> == <a, local_conv_transpose2d(y, w)> with the same weight
    (where output_padding < stride: then local_conv2d maps the transposed output's size back
    to the transposed input's)."""
    s, p, op, g, d = geometry
    rng = np.random.default_rng(3)
    y, w = _local_case(rng, g, s, p, op, d, batch=2)
    out_shape = local_conv_transpose2d_ref(y, w, None, s, p, op, g, d).shape
    a = rng.standard_normal(out_shape)
    forward = gpuconv.local_conv2d(a, w, None, s, p, d, g, device=device)
    transposed = gpuconv.local_conv_transpose2d(y, w, None, s, p, op, g, d, device=device)
    left, right = np.vdot(forward, y), np.vdot(a, transposed)
    bound = np.vdot(abs(local_conv2d_ref(abs(a), abs(w), None, s, p, d, g)), abs(y))
    assert abs(left - right) <= TOL * bound


@pytest.mark.parametrize("geometry", DEVICE_CASES[:3])
def test_tied_local_transpose_is_the_shared_transpose(geometry):
    s, p, op, g, d = geometry
    rng = np.random.default_rng(4)
    x, w, b = _case(rng, g, h=3, w=3)
    tied = np.ascontiguousarray(np.broadcast_to(w[:, None, None], (w.shape[0], 3, 3) + w.shape[1:]))
    y = gpuconv.local_conv_transpose2d(x, tied, b, s, p, op, g, d, device="cpu")
    _close(y, _torch_ref(x, w, b, s, p, op, g, d), _torch_ref(abs(x), abs(w), abs(b), s, p, op, g, d))


def test_an_output_the_padding_crops_entirely_is_the_bias():
    x, w, b = np.ones((1, 1, 1, 1)), np.ones((1, 2, 1, 1)), np.array([1.0, 2.0])
    # H_out = 0 - 2 + 0 + 2 + 1 = 1, and the one input pixel lands on the cropped row -1
    y = gpuconv.conv_transpose2d(x, w, b, 1, 1, 2, 1, 3, device="cpu")
    np.testing.assert_array_equal(y, _torch_ref(x, w, b, 1, 1, 2, 1, 3))
    yl = gpuconv.local_conv_transpose2d(x, w.reshape(1, 1, 1, 2, 1, 1), None, 1, 1, 2, 1, 3,
                                        device="cpu")
    np.testing.assert_array_equal(yl, np.zeros((1, 2, 1, 1)))


def test_unbatched_input_and_array_kinds():
    rng = np.random.default_rng(5)
    x, w, b = _case(rng, 1, batch=1)
    ref = _torch_ref(x, w, b, 2, 1, 1, 1, 1)
    y = gpuconv.conv_transpose2d(x[0], w, b, 2, 1, 1, device="cpu")
    assert y.shape == ref.shape[1:]
    _close(y, ref[0], abs(ref[0]) + 10)
    yt = gpuconv.conv_transpose2d(torch.from_numpy(x), torch.from_numpy(w), torch.from_numpy(b),
                                  2, 1, 1, device="cpu")
    assert isinstance(yt, torch.Tensor)
    _close(yt.numpy(), ref, abs(ref) + 10)
    yl = gpuconv.conv_transpose2d(x.tolist(), w.tolist(), b.tolist(), 2, 1, 1, device="cpu")
    _close(yl, ref, abs(ref) + 10)


def test_float32_and_float16_keep_their_dtype():
    rng = np.random.default_rng(6)
    x, w, b = _case(rng, 1)
    ref = _torch_ref(x, w, b, 2, 0, 1, 1, 1)
    for dtype, tol in ((np.float32, 1e-5), (np.float16, 3e-3)):
        y = gpuconv.conv_transpose2d(x.astype(dtype), w.astype(dtype), b.astype(dtype), 2, 0, 1,
                                     device="cpu")
        assert y.dtype == dtype
        bound = _torch_ref(abs(x), abs(w), abs(b), 2, 0, 1, 1, 1)
        assert np.max(np.abs(y - ref)) <= tol * np.max(bound)


# --------------------------------------------------------------------------------------------
# gradients
# --------------------------------------------------------------------------------------------

GRAD_CASES = [(1, 0, 0, 1, 1), (2, 1, 1, 2, 1), (1, 1, 1, 1, 2), ((2, 3), (1, 0), (1, 2), 1, 1)]


@pytest.mark.parametrize("geometry", GRAD_CASES)
def test_conv_transpose2d_gradients_equal_torch_autograd(device, geometry):
    s, p, op, g, d = geometry
    rng = np.random.default_rng(7)
    x, w, _ = _case(rng, g, batch=1 if device == "cuda" else 2)
    tx = torch.from_numpy(x).requires_grad_()
    tw = torch.from_numpy(w).requires_grad_()
    y = F.conv_transpose2d(tx, tw, None, s, p, op, g, d)
    gy = rng.standard_normal(tuple(y.shape))
    gx_ref, gw_ref = torch.autograd.grad(y, (tx, tw), torch.from_numpy(gy))
    gx = gpuconv.grad.conv_transpose2d_input(x.shape, w, gy, s, p, op, g, d, device=device)
    gw = gpuconv.grad.conv_transpose2d_weight(x, w.shape, gy, s, p, op, g, d, device=device)
    _close(gx, gx_ref.numpy(), np.max(np.abs(gy)) * np.sum(np.abs(w)))
    _close(gw, gw_ref.numpy(), np.max(np.abs(gy)) * np.sum(np.abs(x)))


def _basis_gradient(shape, value_at):
    """d<f(v), gy>/dv of a linear f, one basis vector at a time: value_at(e_k) = <f(e_k), gy>."""
    grad = np.zeros(shape)
    for index in np.ndindex(*shape):
        e = np.zeros(shape)
        e[index] = 1.0
        grad[index] = value_at(e)
    return grad


@pytest.mark.parametrize("geometry", [(1, 0, 0, 1, 1), (2, 1, 1, 2, 1), (1, 0, 1, 1, 2)])
def test_local_conv_transpose2d_gradients_equal_the_reference(device, geometry):
    s, p, op, g, d = geometry
    rng = np.random.default_rng(8)
    x, w = _local_case(rng, g, s, p, op, d, h=2, w=2, k=(2, 2), c_in_g=1, c_out_g=1, batch=1)
    gy = rng.standard_normal(local_conv_transpose2d_ref(x, w, None, s, p, op, g, d).shape)
    gx_ref = _basis_gradient(x.shape, lambda e: np.vdot(
        local_conv_transpose2d_ref(e, w, None, s, p, op, g, d), gy))
    gw_ref = _basis_gradient(w.shape, lambda e: np.vdot(
        local_conv_transpose2d_ref(x, e, None, s, p, op, g, d), gy))
    gx = gpuconv.grad.local_conv_transpose2d_input(x.shape, w, gy, s, p, op, g, d, device=device)
    gw = gpuconv.grad.local_conv_transpose2d_weight(x, w.shape, gy, s, p, op, g, d,
                                                    device=device)
    _close(gx, gx_ref, np.max(np.abs(gy)) * np.sum(np.abs(w)))
    _close(gw, gw_ref, np.max(np.abs(gy)) * np.sum(np.abs(x)))


def test_gradient_functions_take_unbatched_shapes_and_refuse_a_graph():
    rng = np.random.default_rng(9)
    x, w, _ = _case(rng, 1, batch=1)
    gy = rng.standard_normal(_torch_ref(x, w, None, 2, 0, 1, 1, 1).shape)
    gx = gpuconv.grad.conv_transpose2d_input(x.shape[1:], w, gy[0], 2, 0, 1, device="cpu")
    np.testing.assert_allclose(
        gx, gpuconv.grad.conv_transpose2d_input(x.shape, w, gy, 2, 0, 1, device="cpu")[0])
    with pytest.raises(ValueError, match=r"grad_output must have the transposed convolution's "
                                         r"output shape \(1, 3, 7, 10\)"):
        gpuconv.grad.conv_transpose2d_input(x.shape, w, gy[:, :, :-1], 2, 0, 1, device="cpu")
    with pytest.raises(TypeError, match="grad_output is a tensor that requires grad"):
        gpuconv.grad.conv_transpose2d_input(x.shape, torch.from_numpy(w),
                                            torch.from_numpy(gy).requires_grad_(), 2, 0, 1)


# --------------------------------------------------------------------------------------------
# bad input: errors name the argument
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs, error, match", [
    ({"stride": 2, "output_padding": 2}, ValueError,
     r"output_padding must be smaller than either stride or dilation, got output_padding=\(2, 2\)"),
    ({"output_padding": 1}, ValueError, "output_padding must be smaller"),
    ({"padding": "same"}, TypeError, "padding must be an int or a pair of ints"),
    ({"stride": 0}, ValueError, "stride must be >= 1"),
    ({"groups": 3}, ValueError, "groups=3 must divide the input channels C_in=4"),
    ({"padding": 9}, ValueError, "the output would be"),
])
def test_bad_geometry_is_refused_naming_the_argument(kwargs, error, match):
    x, w = np.zeros((1, 4, 3, 3)), np.zeros((4, 2, 3, 3))
    with pytest.raises(error, match=match):
        gpuconv.conv_transpose2d(x, w, **kwargs)


def test_bad_arrays_are_refused_naming_the_argument():
    x, w = np.zeros((1, 4, 3, 3)), np.zeros((4, 2, 3, 3))
    with pytest.raises(ValueError, match=r"weight has C_in=3 but x has C_in=4"):
        gpuconv.conv_transpose2d(x, np.zeros((3, 2, 3, 3)))
    with pytest.raises(ValueError, match=r"weight must be 4-D \(C_in, C_out/groups, kH, kW\)"):
        gpuconv.conv_transpose2d(x, np.zeros((4, 2, 3)))
    with pytest.raises(ValueError, match=r"x must be 4-D \(N, C_in, H_in, W_in\)"):
        gpuconv.conv_transpose2d(np.zeros((4, 3)), w)
    with pytest.raises(TypeError, match=r"weight must have the dtype of x \(float64\), got float32"):
        gpuconv.conv_transpose2d(x, w.astype(np.float32))
    with pytest.raises(TypeError, match=r"bias must have the dtype of x"):
        gpuconv.conv_transpose2d(x, w, np.zeros(2, np.float32))
    with pytest.raises(ValueError, match=r"bias must have shape \(2,\), got \(4,\)"):
        gpuconv.conv_transpose2d(x, w, np.zeros(4))
    with pytest.raises(TypeError, match="x must be float16, float32 or float64"):
        gpuconv.conv_transpose2d(x.astype(np.int64), w)
    with pytest.raises(ValueError, match=r"weight holds kernels for a 2x2 input but x is 3x3"):
        gpuconv.local_conv_transpose2d(x, np.zeros((4, 2, 2, 2, 3, 3)))
    with pytest.raises(ValueError, match=r"bias must have shape \(2,\) or \(2, 5, 5\)"):
        gpuconv.local_conv_transpose2d(x, np.zeros((4, 3, 3, 2, 3, 3)), np.zeros((2, 3, 3)))


# --------------------------------------------------------------------------------------------
# device arrays (a GPU or the simulator)
# --------------------------------------------------------------------------------------------

@pytest.mark.cuda
@pytest.mark.skipif(not cuda_available(), reason="needs CUDA (a GPU or the simulator)")
@pytest.mark.parametrize("local", [False, True])
def test_numba_device_arrays_in_device_array_out(local):
    from numba import cuda

    rng = np.random.default_rng(10)
    s, p, op, g, d = 1, 0, 1, 1, 2  # an output row past the reached ones, and a bias
    if local:
        x, w = _local_case(rng, g, s, p, op, d, batch=1)
        out_shape = local_conv_transpose2d_ref(x, w, None, s, p, op, g, d).shape
        b = rng.standard_normal(out_shape[1:])
        ref = local_conv_transpose2d_ref(x, w, b, s, p, op, g, d)
        fn = gpuconv.local_conv_transpose2d
    else:
        x, w, b = _case(rng, g, batch=1)
        ref = _torch_ref(x, w, b, s, p, op, g, d)
        fn = gpuconv.conv_transpose2d
    y = fn(cuda.to_device(x), cuda.to_device(w), cuda.to_device(b), s, p, op, g, d)
    assert not isinstance(y, np.ndarray)
    np.testing.assert_allclose(y.copy_to_host(), ref, rtol=1e-12, atol=1e-12)
