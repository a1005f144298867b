"""Inputs the frameworks accept: one image without a batch axis, asymmetric explicit padding,
zero input or output channels. Every device present, against the float64 reference."""

import numpy as np
import pytest

import gpuconv
from reference import assert_close, conv2d_ref, local_conv2d_ref, output_size

DTYPES = [np.float32, np.float64]


def _weights(rng, local, c_out, c_in_g, k, out_hw, dtype):
    shape = (c_out, *out_hw, c_in_g, *k) if local else (c_out, c_in_g, *k)
    return rng.uniform(-1, 1, shape).astype(dtype)


def _host(y):
    return y.copy_to_host() if hasattr(y, "copy_to_host") else np.asarray(y)


@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
@pytest.mark.parametrize("local", [False, True], ids=["conv2d", "local_conv2d"])
@pytest.mark.parametrize("geometry", [
    dict(c_in=2, h=5, w=6, c_out=3, k=(3, 3)),
    dict(c_in=4, h=6, w=5, c_out=2, k=(2, 3), stride=(2, 1), padding=1, groups=2),
    dict(c_in=1, h=7, w=7, c_out=2, k=(3, 3), padding="same", dilation=2),
], ids=["plain", "strided_groups", "same_dilated"])
def test_unbatched_input_gives_unbatched_output(device, geometry, local, dtype):
    rng = np.random.default_rng(1)
    g = dict(geometry)
    c_in, h, w, c_out, k = (g.pop(key) for key in ("c_in", "h", "w", "c_out", "k"))
    x = rng.uniform(-1, 1, (c_in, h, w)).astype(dtype)
    out_hw = output_size((h, w), k, g.get("stride", 1), g.get("padding", 0), g.get("dilation", 1))
    wt = _weights(rng, local, c_out, c_in // g.get("groups", 1), k, out_hw, dtype)
    op, ref = (gpuconv.local_conv2d, local_conv2d_ref) if local else (gpuconv.conv2d, conv2d_ref)
    y = op(x, wt, device=device, **g)
    assert y.shape == (c_out, *out_hw)
    expected = ref(x[None], wt, **g)[0]
    bound = ref(np.abs(x)[None], np.abs(wt), **g)[0]
    assert_close(y, expected, bound, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
@pytest.mark.parametrize("local", [False, True], ids=["conv2d", "local_conv2d"])
@pytest.mark.parametrize("padding, stride, dilation", [
    (((0, 2), (1, 0)), 1, 1),
    (((3, 1), (0, 4)), (2, 3), 1),
    (((1, 0), (2, 2)), 1, (2, 1)),
    (((0, 0), (0, 1)), 2, 1),
])
def test_asymmetric_explicit_padding(device, padding, stride, dilation, local, dtype):
    rng = np.random.default_rng(2)
    n, c_in, h, w, c_out, k = 2, 3, 6, 7, 2, (3, 2)
    x = rng.uniform(-1, 1, (n, c_in, h, w)).astype(dtype)
    out_hw = output_size((h, w), k, stride, padding, dilation)
    assert gpuconv.get_conv_outsize(h, k[0], np.broadcast_to(stride, 2)[0],
                                    sum(padding[0]), np.broadcast_to(dilation, 2)[0]) == out_hw[0]
    wt = _weights(rng, local, c_out, c_in, k, out_hw, dtype)
    op, ref = (gpuconv.local_conv2d, local_conv2d_ref) if local else (gpuconv.conv2d, conv2d_ref)
    kwargs = dict(stride=stride, padding=padding, dilation=dilation)
    y = op(x, wt, device=device, **kwargs)
    assert_close(_host(y), ref(x, wt, **kwargs), ref(np.abs(x), np.abs(wt), **kwargs), dtype)


@pytest.mark.parametrize("with_bias", [False, True], ids=["no_bias", "bias"])
@pytest.mark.parametrize("local", [False, True], ids=["conv2d", "local_conv2d"])
def test_zero_input_channels_give_the_bias(device, local, with_bias):
    rng = np.random.default_rng(3)
    x = np.zeros((2, 0, 5, 5), np.float32)
    wt = np.zeros((4, 3, 3, 0, 3, 3) if local else (4, 0, 3, 3), np.float32)
    b = rng.uniform(-1, 1, 4).astype(np.float32) if with_bias else None
    op = gpuconv.local_conv2d if local else gpuconv.conv2d
    y = op(x, wt, b, device=device)
    expected = np.zeros((2, 4, 3, 3), np.float32) + (0 if b is None else b[:, None, None])
    np.testing.assert_array_equal(y, expected)


def test_zero_input_channels_with_groups(device):
    y = gpuconv.conv2d(np.zeros((1, 0, 4, 4)), np.zeros((6, 0, 2, 2)), groups=3, device=device)
    np.testing.assert_array_equal(y, np.zeros((1, 6, 3, 3)))


@pytest.mark.parametrize("local", [False, True], ids=["conv2d", "local_conv2d"])
def test_zero_output_channels_give_an_empty_output(device, local):
    x = np.ones((2, 3, 5, 5))
    wt = np.zeros((0, 3, 3, 3, 3, 3) if local else (0, 3, 3, 3))
    y = (gpuconv.local_conv2d if local else gpuconv.conv2d)(x, wt, device=device)
    assert y.shape == (2, 0, 3, 3) and y.dtype == np.float64


def test_zero_channels_launch_no_kernel(monkeypatch):
    from gpuconv import conv as _conv

    monkeypatch.setattr(_conv, "_run_cpu", lambda *a: pytest.fail("a kernel was run"))
    assert gpuconv.conv2d(np.zeros((1, 0, 4, 4)), np.zeros((2, 0, 3, 3)), device="cpu").shape \
        == (1, 2, 2, 2)
    assert gpuconv.conv2d(np.zeros((1, 2, 4, 4)), np.zeros((0, 2, 3, 3)), device="cpu").shape \
        == (1, 0, 2, 2)


def test_unbatched_torch_tensor_comes_back_as_a_tensor():
    torch = pytest.importorskip("torch")
    x = torch.ones(2, 4, 4, dtype=torch.float64)
    y = gpuconv.conv2d(x, torch.ones(3, 2, 3, 3, dtype=torch.float64), device="cpu")
    assert isinstance(y, torch.Tensor) and tuple(y.shape) == (3, 2, 2)
    np.testing.assert_array_equal(y.numpy(), np.full((3, 2, 2), 18.0))


def test_torch_cpu_tensor_on_cuda_comes_back_as_a_tensor(monkeypatch):
    """A host tensor run with device="cuda" is copied in and out, and returned as a tensor."""
    torch = pytest.importorskip("torch")
    from gpuconv.cuda import launch

    monkeypatch.setattr("gpuconv.conv.select_device", lambda *a, device: "cuda")
    monkeypatch.setattr(launch, "run",
                        lambda op, operands, geom, *plan: np.ones(op.output_shape(geom)))
    y = gpuconv.conv2d(torch.zeros(1, 1, 3, 3, dtype=torch.float64),
                       torch.zeros(1, 1, 2, 2, dtype=torch.float64), device="cuda")
    assert isinstance(y, torch.Tensor) and tuple(y.shape) == (1, 1, 2, 2)
