"""Bad arguments get a clear ValueError/TypeError from the public layer, naming the argument."""

import numpy as np
import pytest

import gpuconv
from gpuconv import conv2d
from gpuconv.geometry import get_conv_outsize, resolve_padding

X = np.zeros((2, 4, 8, 8), dtype=np.float32)
W = np.zeros((6, 4, 3, 3), dtype=np.float32)
WL = np.zeros((6, 6, 6, 4, 3, 3), dtype=np.float32)

# Inputs other frameworks accept, with the shape and dtype of what they give:
# (operation, kwargs overriding a valid call, result shape, result dtype).
ACCEPTED = [
    ("conv2d", dict(x=X[0]), (6, 6, 6), np.float32),
    ("local_conv2d", dict(x=X[0]), (6, 6, 6), np.float32),
    ("conv2d", dict(padding=((0, 2), (1, 0))), (2, 6, 8, 7), np.float32),
    ("conv2d", dict(x=np.zeros((2, 0, 8, 8), np.float32), weight=np.zeros((6, 0, 3, 3), np.float32),
                    bias=np.ones(6, np.float32)), (2, 6, 6, 6), np.float32),
    ("conv2d", dict(weight=np.zeros((0, 4, 3, 3), np.float32)), (2, 0, 6, 6), np.float32),
    ("conv2d", dict(x=X.astype(np.float16), weight=W.astype(np.float16)), (2, 6, 6, 6), np.float16),
    ("local_conv2d", dict(x=X.astype(np.float16), weight=WL.astype(np.float16)), (2, 6, 6, 6),
     np.float16),
]


@pytest.mark.parametrize("op, override, shape, dtype", ACCEPTED,
                         ids=[f"{a[0]}-{i}" for i, a in enumerate(ACCEPTED)])
def test_accepted_inputs(op, override, shape, dtype):
    args = dict(x=X, weight=WL if op == "local_conv2d" else W, bias=None)
    args.update(override)
    y = getattr(gpuconv, op)(**args, device="cpu")
    assert y.shape == shape and y.dtype == dtype


# (operation, kwargs overriding a valid call, expected error, text the message must contain)
BAD = [
    ("conv2d", dict(x=X[0, 0]), ValueError, "x must be 4-D (N, C_in, H, W) or 3-D"),
    ("conv2d", dict(x=None), TypeError, "x must be an array, got None"),
    ("local_conv2d", dict(weight=None), TypeError, "weight must be an array, got None"),
    ("conv2d", dict(x=np.zeros((2, 8, 8, 4), np.float32)), ValueError, "looks channels-last"),
    ("conv2d", dict(x=X[0].tolist()), TypeError, "which NumPy made of the list passed as x"),
    ("conv2d", dict(padding=((1, -1), (0, 0))), ValueError, "padding[0] (top, bottom) must be >= 0"),
    ("conv2d", dict(weight=W[0]), ValueError, "weight must be 4-D"),
    ("local_conv2d", dict(weight=W), ValueError, "weight must be 6-D"),
    ("conv2d", dict(weight=np.zeros((6, 3, 3, 3), np.float32)), ValueError, "C_in/groups=3"),
    ("conv2d", dict(groups=3), ValueError, "groups=3 must divide the input channels"),
    ("conv2d", dict(weight=np.zeros((5, 2, 3, 3), np.float32), groups=2), ValueError,
     "groups=2 must divide the output channels"),
    ("conv2d", dict(groups=0), ValueError, "groups must be >= 1"),
    ("conv2d", dict(groups=1.0), TypeError, "groups must be an int"),
    ("conv2d", dict(stride=0), ValueError, "stride must be >= 1"),
    ("conv2d", dict(stride=(1, 0)), ValueError, "stride must be >= 1"),
    ("conv2d", dict(stride=1.5), TypeError, "stride must be an int or a pair"),
    ("conv2d", dict(stride=(1, 1, 1)), TypeError, "stride must be an int or a pair"),
    ("conv2d", dict(dilation=0), ValueError, "dilation must be >= 1"),
    ("conv2d", dict(dilation=True), TypeError, "dilation must be an int or a pair"),
    ("conv2d", dict(padding=-1), ValueError, "padding must be >= 0"),
    ("conv2d", dict(padding="full"), ValueError, "'valid' or 'same'"),
    ("conv2d", dict(padding="same", stride=2), ValueError, "padding='same' requires stride 1"),
    ("conv2d", dict(weight=np.zeros((6, 4, 9, 3), np.float32)), ValueError,
     "kernel does not fit in the padded input"),
    ("conv2d", dict(x=X.astype(np.int32)), TypeError, "x must be float16, float32 or float64"),
    ("conv2d", dict(x=X.astype(np.complex64)), TypeError, "x must be float16, float32 or float64"),
    ("conv2d", dict(x=X.astype(bool)), TypeError, "x must be float16, float32 or float64"),
    ("conv2d", dict(x=X.astype(object)), TypeError, "x must be float16, float32 or float64"),
    ("conv2d", dict(x=X.astype(np.float16)), TypeError, "weight must have the dtype of x (float16)"),
    ("conv2d", dict(weight=W.astype(np.float64)), TypeError, "weight must have the dtype of x"),
    ("conv2d", dict(bias=np.zeros(6, np.float64)), TypeError, "bias must have the dtype of x"),
    ("conv2d", dict(bias=np.zeros(5, np.float32)), ValueError, "bias must have shape (6,)"),
    ("conv2d", dict(bias=np.zeros((6, 6, 6), np.float32)), ValueError, "bias must have shape (6,)"),
    ("local_conv2d", dict(bias=np.zeros((6, 5, 6), np.float32)), ValueError,
     "bias must have shape (6,) or (6, 6, 6)"),
    ("local_conv2d", dict(weight=np.zeros((6, 7, 6, 4, 3, 3), np.float32)), ValueError,
     "gives a 6x6 output"),
    ("local_conv2d", dict(stride=2), ValueError, "gives a 3x3 output"),
    ("conv2d", dict(x=np.zeros((2, 4, 0, 8), np.float32)), ValueError, "H and W >= 1"),
    ("conv2d", dict(weight=np.zeros((6, 4, 0, 3), np.float32)), ValueError, "kH and kW >= 1"),
    ("conv2d", dict(device="gpu"), ValueError, "device must be one of 'auto', 'cpu', 'cuda'"),
    ("conv2d", dict(device=None), ValueError, "device must be one of"),
]


@pytest.mark.parametrize("op, override, error, message", BAD, ids=[b[3][:40] for b in BAD])
def test_bad_arguments(op, override, error, message):
    args = dict(x=X, weight=WL if op == "local_conv2d" else W, bias=None)
    args.update(override)
    with pytest.raises(error) as info:
        getattr(gpuconv, op)(**args)
    assert message in str(info.value)
    assert not isinstance(info.value, AssertionError)


def test_invalid_environment_variable_is_named(monkeypatch):
    monkeypatch.setenv("GPUCONV_DEVICE", "tpu")
    with pytest.raises(ValueError, match="environment variable GPUCONV_DEVICE must be one of"):
        conv2d(X, W)


def test_output_size_formula():
    # H_out = (H + pad_total - d * (k - 1) - 1) // s + 1
    assert get_conv_outsize(500, 5, 1, 0) == 496
    assert get_conv_outsize(227, 11, 4, 0) == 55
    assert get_conv_outsize(224, 7, 2, 6) == 112
    assert get_conv_outsize(9, 3, 1, 0, dilation=3) == 3
    assert get_conv_outsize(3, 5, 1, 0) == -1


def test_same_padding_split():
    assert resolve_padding("same", (3, 3), (1, 1), (1, 1)) == (1, 1, 1, 1)
    assert resolve_padding("same", (2, 4), (1, 1), (1, 1)) == (0, 1, 1, 2)
    assert resolve_padding("same", (3, 3), (1, 1), (2, 1)) == (2, 2, 1, 1)
    assert resolve_padding("valid", (3, 3), (2, 2), (1, 1)) == (0, 0, 0, 0)
    assert resolve_padding((1, 2), (3, 3), (2, 2), (1, 1)) == (1, 1, 2, 2)


@pytest.mark.parametrize("word", ["SAME", "Same", "VALID", "Valid"])
def test_padding_words_in_any_case(word):
    """TensorFlow and Keras write "SAME" and "VALID"."""
    assert resolve_padding(word, (2, 4), (1, 1), (1, 1)) == resolve_padding(
        word.lower(), (2, 4), (1, 1), (1, 1))
    y = conv2d(X[:1], W, padding=word, device="cpu")
    assert y.shape[-2:] == ((8, 8) if word.lower() == "same" else (6, 6))
    with pytest.raises(ValueError, match="'valid' or 'same'"):
        resolve_padding("full", (3, 3), (1, 1), (1, 1))


def test_array_likes_and_result_kind():
    x = X[:1].astype(np.float64).tolist()
    y = conv2d(x, W.astype(np.float64), device="cpu")
    assert isinstance(y, np.ndarray) and y.shape == (1, 6, 6, 6)


def test_torch_cpu_tensors_round_trip():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(0)
    x = rng.standard_normal((1, 4, 8, 8)).astype(np.float32)
    w = rng.standard_normal((6, 4, 3, 3)).astype(np.float32)
    y = conv2d(torch.from_numpy(x), torch.from_numpy(w), device="cpu")
    assert isinstance(y, torch.Tensor) and y.dtype == torch.float32
    expected = torch.nn.functional.conv2d(torch.from_numpy(x).double(), torch.from_numpy(w).double())
    np.testing.assert_allclose(y.numpy(), expected.numpy(), rtol=0, atol=1e-4)


def test_tensor_requiring_grad_records_the_graph_and_gradient_functions_refuse_it():
    torch = pytest.importorskip("torch")
    x = torch.zeros((1, 4, 8, 8), requires_grad=True)
    y = conv2d(x, torch.from_numpy(W), device="cpu")
    assert y.grad_fn is not None and y.shape == (1, 6, 6, 6)
    gy = torch.zeros((1, 6, 6, 6), requires_grad=True)
    with pytest.raises(TypeError, match=r"grad_output is a tensor that requires grad.*detach\(\)"):
        gpuconv.grad.conv2d_input((1, 4, 8, 8), torch.from_numpy(W), gy, device="cpu")
