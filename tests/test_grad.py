"""The gradient functions (gpuconv.grad) on every device present, against independent float64
references: the window-by-window references of tests/reference.py, PyTorch's own conv2d
gradients where PyTorch is installed, and the adjoint identities that define a gradient."""

import numpy as np
import pytest

import gpuconv
from gpuconv import grad
from reference import (assert_close, conv2d_input_grad_ref, conv2d_ref, conv2d_weight_grad_ref,
                       local_conv2d_input_grad_ref, local_conv2d_ref,
                       local_conv2d_weight_grad_ref)
from test_conv import GEOMETRIES, GRID_DTYPES, GRID_IDS, _case

OPS = {
    False: (gpuconv.conv2d, conv2d_ref, grad.conv2d_input, conv2d_input_grad_ref,
            grad.conv2d_weight, conv2d_weight_grad_ref),
    True: (gpuconv.local_conv2d, local_conv2d_ref, grad.local_conv2d_input,
           local_conv2d_input_grad_ref, grad.local_conv2d_weight, local_conv2d_weight_grad_ref),
}
IDS = {False: "conv2d", True: "local_conv2d"}


def _host(y):
    return y.copy_to_host() if hasattr(y, "copy_to_host") else np.asarray(y)


def _problem(geometry, dtype, local, seed):
    rng = np.random.default_rng(seed)
    x, w, _, kwargs = _case(rng, geometry, dtype, local, None)
    y_shape = conv2d_ref(x[:, :, :, :], np.zeros((w.shape[0], *w.shape[-3:])), **kwargs).shape
    gy = rng.uniform(-1, 1, y_shape).astype(dtype)
    return x, w, gy, kwargs


@pytest.mark.parametrize("dtype", GRID_DTYPES, ids=GRID_IDS)
@pytest.mark.parametrize("geometry", GEOMETRIES, ids=[g[0] for g in GEOMETRIES])
@pytest.mark.parametrize("local", [False, True], ids=["conv2d", "local_conv2d"])
def test_input_grad_matches_reference(local, geometry, dtype, device):
    x, w, gy, kwargs = _problem(geometry, dtype, local, 10)
    _, _, gin, gin_ref, _, _ = OPS[local]
    gx = gin(x.shape, w, gy, device=device, **kwargs)
    assert isinstance(gx, np.ndarray) and gx.dtype == np.dtype(dtype) and gx.shape == x.shape
    expected = gin_ref(x.shape, w, gy, **kwargs)
    bound = gin_ref(x.shape, np.abs(w), np.abs(gy), **kwargs)
    terms = w.shape[0] * w.shape[-2] * w.shape[-1]
    assert_close(gx, expected, bound, dtype, terms=terms)


@pytest.mark.parametrize("dtype", GRID_DTYPES, ids=GRID_IDS)
@pytest.mark.parametrize("geometry", GEOMETRIES, ids=[g[0] for g in GEOMETRIES])
@pytest.mark.parametrize("local", [False, True], ids=["conv2d", "local_conv2d"])
def test_weight_grad_matches_reference(local, geometry, dtype, device):
    x, w, gy, kwargs = _problem(geometry, dtype, local, 11)
    _, _, _, _, gwt, gwt_ref = OPS[local]
    gw = gwt(x, w.shape, gy, device=device, **kwargs)
    assert isinstance(gw, np.ndarray) and gw.dtype == np.dtype(dtype) and gw.shape == w.shape
    expected = gwt_ref(x, w.shape, gy, **kwargs)
    bound = gwt_ref(np.abs(x), w.shape, np.abs(gy), **kwargs)
    terms = x.shape[0] * gy.shape[2] * gy.shape[3]
    assert_close(gw, expected, bound, dtype, terms=terms)


@pytest.mark.parametrize("local", [False, True], ids=["conv2d", "local_conv2d"])
@pytest.mark.parametrize("geometry", GEOMETRIES[::3], ids=[g[0] for g in GEOMETRIES[::3]])
def test_adjoint_identities(geometry, local, device):
    """<f(x; w), gy> == <x, grad_input(gy)> == <w, grad_weight(x, gy)> in float64."""
    x, w, gy, kwargs = _problem(geometry, np.float64, local, 12)
    fwd, _, gin, _, gwt, _ = OPS[local]
    y = _host(fwd(x, w, device=device, **kwargs))
    lhs = float(np.sum(y * gy))
    via_x = float(np.sum(x * _host(gin(x.shape, w, gy, device=device, **kwargs))))
    via_w = float(np.sum(w * _host(gwt(x, w.shape, gy, device=device, **kwargs))))
    scale = float(np.sum(np.abs(_host(fwd(np.abs(x), np.abs(w), device=device, **kwargs)))
                         * np.abs(gy)))
    assert abs(lhs - via_x) <= 1e-12 * scale
    assert abs(lhs - via_w) <= 1e-12 * scale


@pytest.mark.parametrize("local", [False, True], ids=["conv2d", "local_conv2d"])
def test_two_calls_are_bitwise_identical(local, device):
    geometry = ("det", 3, 4, 9, 8, 6, 3, (2, 1), 1, (1, 2), 2)
    x, w, gy, kwargs = _problem(geometry, np.float32, local, 13)
    _, _, gin, _, gwt, _ = OPS[local]
    for call in (lambda: gin(x.shape, w, gy, device=device, **kwargs),
                 lambda: gwt(x, w.shape, gy, device=device, **kwargs)):
        first, second = _host(call()), _host(call())
        assert first.tobytes() == second.tobytes()


@pytest.mark.parametrize("local", [False, True], ids=["conv2d", "local_conv2d"])
def test_empty_batch(local, device):
    x, w, gy, kwargs = _problem(GEOMETRIES[0], np.float64, local, 14)
    _, _, gin, _, gwt, _ = OPS[local]
    x0, gy0 = x[:0], gy[:0]
    assert _host(gin(x0.shape, w, gy0, device=device, **kwargs)).shape == x0.shape
    gw = _host(gwt(x0, w.shape, gy0, device=device, **kwargs))
    assert gw.shape == w.shape and not gw.any()


def test_unbatched_gradients():
    x, w, gy, kwargs = _problem(GEOMETRIES[1], np.float64, False, 15)
    x, gy = x[:1], gy[:1]
    gx = grad.conv2d_input(x.shape[1:], w, gy[0], device="cpu", **kwargs)
    np.testing.assert_allclose(gx, grad.conv2d_input(x.shape, w, gy, device="cpu", **kwargs)[0],
                               rtol=0, atol=0)
    gw = grad.conv2d_weight(x[0], w.shape, gy[0], device="cpu", **kwargs)
    np.testing.assert_allclose(gw, grad.conv2d_weight(x, w.shape, gy, device="cpu", **kwargs),
                               rtol=0, atol=0)


def test_conv2d_gradients_equal_pytorchs():
    torch = pytest.importorskip("torch")
    for geometry in GEOMETRIES:
        if geometry[8] == "same" and geometry[7] != 1:
            continue
        x, w, gy, kwargs = _problem(geometry, np.float64, False, 16)
        xt = torch.tensor(x, requires_grad=True)
        wt = torch.tensor(w, requires_grad=True)
        yt = torch.nn.functional.conv2d(xt, wt, None, **kwargs)
        yt.backward(torch.tensor(gy))
        np.testing.assert_allclose(grad.conv2d_input(x.shape, w, gy, device="cpu", **kwargs),
                                   xt.grad.numpy(), rtol=1e-12, atol=1e-12, err_msg=geometry[0])
        np.testing.assert_allclose(grad.conv2d_weight(x, w.shape, gy, device="cpu", **kwargs),
                                   wt.grad.numpy(), rtol=1e-12, atol=1e-11, err_msg=geometry[0])


# (what the call gets wrong, the call on a valid (x, w, gy), error, text of the message)
BAD = [
    ("conv2d_input, grad_output one column short",
     lambda x, w, gy: grad.conv2d_input(x.shape, w, gy[:, :, :-1]), ValueError,
     "grad_output must have the forward's output shape (N, C_out, H_out, W_out) = (2, 4, 5, 4)"),
    ("conv2d_weight, grad_output of another batch",
     lambda x, w, gy: grad.conv2d_weight(x, w.shape, gy[:1]), ValueError, "got (1, 4, 5, 4)"),
    ("conv2d_input, input_size a string",
     lambda x, w, gy: grad.conv2d_input("2x3x7x6", w, gy), TypeError, "input_size must be a sequence"),
    ("conv2d_input, unbatched input_size with a batched grad_output",
     lambda x, w, gy: grad.conv2d_input((2, 3, 7), w, gy), ValueError, "grad_output must be 3-D"),
    ("conv2d_weight, weight_size of 3 values",
     lambda x, w, gy: grad.conv2d_weight(x, w.shape[:3], gy), TypeError, "weight_size must be"),
    ("local_conv2d_weight, a 4-D weight_size",
     lambda x, w, gy: grad.local_conv2d_weight(x, w.shape, gy), TypeError, "weight_size must be"),
    ("conv2d_weight, weight_size with the wrong C_in/groups",
     lambda x, w, gy: grad.conv2d_weight(x, (4, 2, 3, 3), gy), ValueError, "C_in/groups=2"),
    ("conv2d_input, float32 grad_output with a float64 weight",
     lambda x, w, gy: grad.conv2d_input(x.shape, w, gy.astype(np.float32)), TypeError,
     "weight must have the dtype of grad_output (float32)"),
    ("conv2d_input, weight None",
     lambda x, w, gy: grad.conv2d_input(x.shape, None, gy), TypeError, "weight must be an array"),
    ("conv2d_weight, stride=0",
     lambda x, w, gy: grad.conv2d_weight(x, w.shape, gy, stride=0), ValueError, "stride must be >= 1"),
    ("conv2d_weight, device='gpu'",
     lambda x, w, gy: grad.conv2d_weight(x, w.shape, gy, device="gpu"), ValueError,
     "device must be one of"),
]


@pytest.mark.parametrize("what, call, error, message", BAD, ids=[b[0] for b in BAD])
def test_bad_gradient_arguments(what, call, error, message):
    x, w, gy, _ = _problem(GEOMETRIES[0], np.float64, False, 17)
    with pytest.raises(error) as info:
        call(x, w, gy)
    assert message in str(info.value)
