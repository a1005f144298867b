"""gpuconv.torch: custom operators, autograd, the functional ops and the modules.

Gradients are checked three ways in float64: numerically (``gradcheck``, ``gradgradcheck``),
against ``torch.nn.Conv2d``'s autograd for the shared layer, and against autograd through
``unfold`` + ``einsum`` for the unshared layer. CUDA cases run when PyTorch sees a GPU.
"""

import subprocess
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

import gpuconv  # noqa: E402
import gpuconv.torch as gt  # noqa: E402
from gpuconv.geometry import resolve_padding  # noqa: E402
from gpuconv.workloads import LAYERS  # noqa: E402

F64 = torch.float64
OPS = torch.ops.gpuconv

DEVICES = [pytest.param("cpu", id="cpu")]
if torch.cuda.is_available():
    DEVICES.append(pytest.param("cuda", id="cuda", marks=pytest.mark.cuda))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """These problems are tiny: one Numba and one PyTorch thread run them fastest (and the
    gradient checks call them thousands of times)."""
    import numba

    before = numba.get_num_threads(), torch.get_num_threads()
    numba.set_num_threads(1)
    torch.set_num_threads(1)
    yield
    numba.set_num_threads(before[0])
    torch.set_num_threads(before[1])


def _randn(*shape, device="cpu", dtype=F64, grad=True):
    return torch.randn(shape, dtype=dtype, device=device).requires_grad_(grad)


def local_reference(x, weight, bias=None, stride=1, padding=0, dilation=1, groups=1):
    """local_conv2d written with PyTorch's own ops (unfold + einsum), differentiable."""
    stride, dilation = nn.modules.utils._pair(stride), nn.modules.utils._pair(dilation)
    c_out, h_out, w_out, c_in_g, kh, kw = weight.shape
    top, bottom, left, right = resolve_padding(padding, (kh, kw), stride, dilation)
    n = x.shape[0]
    cols = F.unfold(F.pad(x, (left, right, top, bottom)), (kh, kw), dilation=dilation,
                    stride=stride)  # (N, C_in * kH * kW, H_out * W_out)
    cols = cols.reshape(n, groups, c_in_g * kh * kw, h_out, w_out)
    w = weight.reshape(groups, c_out // groups, h_out, w_out, c_in_g * kh * kw)
    y = torch.einsum("ngkij,goijk->ngoij", cols, w).reshape(n, c_out, h_out, w_out)
    if bias is not None:
        y = y + (bias[:, None, None] if bias.dim() == 1 else bias)
    return y


def _local_weight(c_out, c_in_g, k, x_hw, stride=1, padding=0, dilation=1, device="cpu"):
    stride2, dil2 = nn.modules.utils._pair(stride), nn.modules.utils._pair(dilation)
    k2 = nn.modules.utils._pair(k)
    top, bottom, left, right = resolve_padding(padding, k2, stride2, dil2)
    out = [gpuconv.get_conv_outsize(size, kk, s, pt, d) for size, kk, s, pt, d in
           zip(x_hw, k2, stride2, (top + bottom, left + right), dil2)]
    return _randn(c_out, *out, c_in_g, *k2, device=device)


# ------------------------------------------------------------------------------------------
# numerical gradients, first and second order
# ------------------------------------------------------------------------------------------

GEOMETRIES = [
    pytest.param(dict(), id="plain"),
    pytest.param(dict(stride=2, padding=((1, 0), (2, 1)), dilation=(1, 2), groups=2),
                 id="strided-asym-dilated-grouped"),
    pytest.param(dict(padding="same", dilation=2), id="same"),
]


@pytest.mark.parametrize("geometry", GEOMETRIES)
@pytest.mark.parametrize("with_bias", [True, False], ids=["bias", "nobias"])
def test_gradcheck_conv2d(geometry, with_bias):
    x, w = _randn(2, 4, 7, 6), _randn(6, 4 // geometry.get("groups", 1), 3, 2)
    b = _randn(6) if with_bias else None
    inputs = (x, w, b) if with_bias else (x, w)
    assert torch.autograd.gradcheck(
        lambda x, w, b=None: gt.conv2d(x, w, b, **geometry), inputs)


@pytest.mark.parametrize("geometry", GEOMETRIES)
@pytest.mark.parametrize("bias_kind", ["position", "map", "none"])
def test_gradcheck_local_conv2d(geometry, bias_kind):
    x = _randn(2, 4, 7, 6)
    w = _local_weight(6, 4 // geometry.get("groups", 1), (3, 2), (7, 6), geometry.get("stride", 1),
                      geometry.get("padding", 0), geometry.get("dilation", 1))
    b = {"position": lambda: _randn(*w.shape[:3]), "map": lambda: _randn(6),
         "none": lambda: None}[bias_kind]()
    inputs = (x, w) if b is None else (x, w, b)
    # fast mode (random projections of the Jacobian): one kernel per output position makes
    # the full Jacobian thousands of calls; the exact gradients are checked below.
    assert torch.autograd.gradcheck(
        lambda x, w, b=None: gt.local_conv2d(x, w, b, **geometry), inputs, fast_mode=True)


@pytest.mark.parametrize("local", [False, True], ids=["conv2d", "local_conv2d"])
def test_double_backward(local):
    geometry = dict(stride=(2, 1), padding=((1, 0), (0, 1)), groups=2)
    x = _randn(2, 4, 5, 5)
    if local:
        w, b = _local_weight(4, 2, 3, (5, 5), (2, 1), geometry["padding"]), None
        w_b = (w,)
        fn = gt.local_conv2d
    else:
        w, b = _randn(4, 2, 3, 3), _randn(4)
        w_b = (w, b)
        fn = gt.conv2d
    assert torch.autograd.gradgradcheck(lambda x, *wb: fn(x, *wb, **geometry), (x, *w_b),
                                        fast_mode=True)


# ------------------------------------------------------------------------------------------
# the custom operators
# ------------------------------------------------------------------------------------------

def _opcheck_cases(device):
    geometry = ([2, 1], [1, 0, 2, 1], [1, 2], 2)
    x = _randn(2, 4, 7, 8, device=device)
    w = _randn(6, 2, 3, 2, device=device)
    y = OPS.conv2d(x, w, None, *geometry)
    gy = _randn(*y.shape, device=device)
    wl = _randn(6, *y.shape[2:], 2, 3, 2, device=device)
    return {
        "conv2d": (x, w, _randn(6, device=device), *geometry),
        "conv2d-nobias": (x, w, None, *geometry),
        "local_conv2d": (x, wl, _randn(6, *y.shape[2:], device=device), *geometry),
        "local_conv2d-mapbias": (x, wl, _randn(6, device=device), *geometry),
        "local_conv2d-nobias": (x, wl, None, *geometry),
        "conv2d_input": (list(x.shape), w, gy, *geometry),
        "conv2d_weight": (x, list(w.shape), gy, *geometry),
        "local_conv2d_input": (list(x.shape), wl, gy, *geometry),
        "local_conv2d_weight": (x, list(wl.shape), gy, *geometry),
    }


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck_every_operator(device):
    for name, args in _opcheck_cases(device).items():
        op = getattr(OPS, name.split("-")[0])
        result = torch.library.opcheck(op, args)
        assert set(result.values()) == {"SUCCESS"}, (name, result)


def test_operator_schemas():
    geometry = "SymInt[] stride, SymInt[] padding, SymInt[] dilation, SymInt groups"
    assert str(OPS.conv2d.default._schema) == (
        f"gpuconv::conv2d(Tensor x, Tensor weight, Tensor? bias, {geometry}) -> Tensor"
        .replace("SymInt", "int"))
    assert str(OPS.local_conv2d.default._schema).startswith(
        "gpuconv::local_conv2d(Tensor x, Tensor weight, Tensor? bias, int[] stride")
    assert str(OPS.conv2d_input.default._schema).startswith(
        "gpuconv::conv2d_input(SymInt[] input_size, Tensor weight, Tensor grad_output")
    assert str(OPS.local_conv2d_weight.default._schema).startswith(
        "gpuconv::local_conv2d_weight(Tensor input, SymInt[] weight_size, Tensor grad_output")


def test_other_dtypes_are_refused():
    x, w = torch.randn(1, 2, 5, 5), torch.randn(3, 2, 3, 3)
    with pytest.raises(TypeError, match="bfloat16, float32 or float64, got torch.int64"):
        gt.local_conv2d(x.long(), torch.zeros(3, 3, 3, 2, 3, 3, dtype=torch.long))
    with pytest.raises(TypeError, match=r"weight must have the dtype of x.*weight.to\(x.dtype\)"):
        gt.conv2d(x, w.double())
    with pytest.raises(TypeError, match="bias must be a torch.Tensor"):
        gt.conv2d(x, w, np.zeros(3, np.float32))


# ------------------------------------------------------------------------------------------
# gradients against PyTorch's own ops, on scaled-down benchmark layers
# ------------------------------------------------------------------------------------------

SHARED_LAYERS = ["alexnet-conv1", "resnet50-conv1", "vgg16-conv3_2", "resnet50-res4-1x1"]
LOCAL_LAYERS = ["deepface-l4", "deepface-l5", "alexnet-conv1", "vgg16-conv3_2"]


def _scaled(name):
    """A benchmark layer at batch 2 with at most 4 input / 6 output channels and a small
    input that still fits a few of its (strided) windows."""
    layer = LAYERS[name]
    size = max(layer.kernel + 2 * layer.stride, 6)
    return dict(batch=2, c_in=min(layer.in_channels, 4), c_out=min(layer.out_channels, 6),
                size=size, kernel=layer.kernel, stride=layer.stride, padding=layer.padding)


def _loss_grads(y, inputs, gy):
    return torch.autograd.grad((y * gy).sum(), inputs)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", SHARED_LAYERS)
def test_conv2d_gradients_equal_torch_conv2d(name, device):
    g = _scaled(name)
    ref = nn.Conv2d(g["c_in"], g["c_out"], g["kernel"], g["stride"], g["padding"], dtype=F64,
                    device=device)
    ours = gt.Conv2d(g["c_in"], g["c_out"], g["kernel"], g["stride"], g["padding"], dtype=F64,
                     device=device)
    ours.load_state_dict(ref.state_dict())
    x = _randn(g["batch"], g["c_in"], g["size"], g["size"], device=device)
    y_ref, y = ref(x), ours(x)
    torch.testing.assert_close(y, y_ref, rtol=1e-12, atol=1e-12)
    gy = torch.randn_like(y)
    expected = _loss_grads(y_ref, (x, ref.weight, ref.bias), gy)
    got = _loss_grads(y, (x, ours.weight, ours.bias), gy)
    for a, b, what in zip(got, expected, ("x", "weight", "bias")):
        torch.testing.assert_close(a, b, rtol=1e-11, atol=1e-11, msg=f"{name}: grad of {what}")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", LOCAL_LAYERS)
def test_local_conv2d_gradients_equal_unfold_einsum(name, device):
    g = _scaled(name)
    layer = gt.LocallyConnected2d(g["c_in"], g["c_out"], g["kernel"], g["size"], g["stride"],
                                  g["padding"], dtype=F64, device=device)
    x = _randn(g["batch"], g["c_in"], g["size"], g["size"], device=device)
    y = layer(x)
    y_ref = local_reference(x, layer.weight, layer.bias, g["stride"], g["padding"])
    torch.testing.assert_close(y, y_ref, rtol=1e-12, atol=1e-12)
    gy = torch.randn_like(y)
    expected = _loss_grads(y_ref, (x, layer.weight, layer.bias), gy)
    got = _loss_grads(y, (x, layer.weight, layer.bias), gy)
    for a, b, what in zip(got, expected, ("x", "weight", "bias")):
        torch.testing.assert_close(a, b, rtol=1e-11, atol=1e-11, msg=f"{name}: grad of {what}")


def test_padding_strings_asymmetric_padding_and_unbatched_input():
    x, w, b = _randn(2, 3, 7, 8), _randn(4, 3, 4, 3), _randn(4)
    torch.testing.assert_close(gt.conv2d(x, w, b, padding="same", dilation=2),
                               F.conv2d(x, w, b, padding="same", dilation=2))
    torch.testing.assert_close(gt.conv2d(x, w, b, padding="valid"), F.conv2d(x, w, b))
    torch.testing.assert_close(gt.conv2d(x, w, b, stride=2, padding=((2, 0), (1, 3))),
                               F.conv2d(F.pad(x, (1, 3, 2, 0)), w, b, stride=2))
    torch.testing.assert_close(gt.conv2d(x[0], w, b, padding=1), F.conv2d(x[0], w, b, padding=1))
    channels_last = x.to(memory_format=torch.channels_last)
    torch.testing.assert_close(gt.conv2d(channels_last, w, b), F.conv2d(x, w, b))
    wl = _local_weight(4, 3, (4, 3), (7, 8), padding="same")
    torch.testing.assert_close(gt.local_conv2d(x[1], wl, b, padding="same"),
                               local_reference(x[1:], wl, b, padding="same")[0])
    with pytest.raises(ValueError, match="padding='same' requires stride 1"):
        gt.conv2d(x, w, padding="same", stride=2)


def test_public_functions_record_the_graph():
    x, w, wl = _randn(2, 3, 6, 6), _randn(4, 3, 3, 3), _randn(4, 4, 4, 3, 3, 3)
    for fn, ours, weight in ((gpuconv.conv2d, gt.conv2d, w),
                             (gpuconv.local_conv2d, gt.local_conv2d, wl)):
        y = fn(x, weight, stride=1, padding="valid")
        assert y.grad_fn is not None
        got = torch.autograd.grad(y.square().sum(), (x, weight))
        expected = torch.autograd.grad(ours(x, weight).square().sum(), (x, weight))
        for a, b in zip(got, expected):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
    with pytest.raises(ValueError, match="device='cuda' was requested but x lives on cpu"):
        gpuconv.conv2d(x, w, device="cuda")
    with pytest.raises(TypeError, match="weight must be a torch.Tensor"):
        gpuconv.conv2d(x, w.detach().numpy())
    with torch.no_grad():
        assert gpuconv.conv2d(x, w, device="cpu").grad_fn is None


def test_importing_gpuconv_does_not_import_torch():
    code = ("import sys, numpy as np, gpuconv, gpuconv.grad, gpuconv.workloads; "
            "gpuconv.conv2d(np.ones((1, 1, 3, 3)), np.ones((1, 1, 2, 2)), device='cpu'); "
            "assert 'torch' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_a_tensor_that_requires_grad_reaches_autograd_before_gpuconv_torch_is_imported():
    # The public functions find the PyTorch layer through ops (gpuconv.torch registers itself
    # there; gpuconv.torch_hook loads it): in a process that never imported it, the call still
    # records the graph, and the gradients are torch.nn.functional's in float64.
    code = """
import sys, torch, torch.nn.functional as F, gpuconv
assert "gpuconv.torch" not in sys.modules
x = torch.randn(2, 3, 7, 6, dtype=torch.float64, requires_grad=True)
w = torch.randn(4, 3, 3, 2, dtype=torch.float64, requires_grad=True)
gy = torch.randn(2, 4, 5, 5, dtype=torch.float64)
got = torch.autograd.grad(gpuconv.conv2d(x, w, device="cpu"), (x, w), gy)
want = torch.autograd.grad(F.conv2d(x, w), (x, w), gy)
for a, b in zip(got, want):
    torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
t = torch.randn(3, 2, 3, 3, dtype=torch.float64, requires_grad=True)
gy = torch.randn(2, 2, 9, 8, dtype=torch.float64)
got = torch.autograd.grad(gpuconv.conv_transpose2d(x, t, device="cpu"), (x, t), gy)
want = torch.autograd.grad(F.conv_transpose2d(x, t), (x, t), gy)
for a, b in zip(got, want):
    torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
assert "gpuconv.torch" in sys.modules
"""
    subprocess.run([sys.executable, "-c", code], check=True, timeout=300)


# ------------------------------------------------------------------------------------------
# modules
# ------------------------------------------------------------------------------------------

def test_conv2d_is_a_drop_in_for_torch_conv2d():
    kwargs = dict(stride=(2, 1), padding=(1, 2), dilation=(1, 2), groups=2)
    torch.manual_seed(3)
    ref = nn.Conv2d(4, 6, (3, 2), **kwargs)
    torch.manual_seed(3)
    ours = gt.Conv2d(4, 6, (3, 2), **kwargs)
    assert isinstance(ours, nn.Conv2d)
    for (n1, p1), (n2, p2) in zip(ref.named_parameters(), ours.named_parameters()):
        assert n1 == n2 and torch.equal(p1, p2)  # the same default initialisation
    x = torch.randn(2, 4, 9, 9)
    torch.testing.assert_close(ours(x), ref(x), rtol=1e-5, atol=1e-5)
    again = nn.Conv2d(4, 6, (3, 2), **kwargs)
    again.load_state_dict(ours.state_dict())
    torch.testing.assert_close(again(x), ref(x))
    assert repr(ours).startswith("gpuconv.torch.Conv2d(4, 6, kernel_size=(3, 2), stride=(2, 1)")
    with pytest.raises(ValueError, match="padding_mode must be one of 'zeros', 'reflect'"):
        gt.Conv2d(4, 6, 3, padding_mode="mirror")
    no_bias = gt.Conv2d(4, 6, 3, bias=False, padding="same")
    torch.testing.assert_close(no_bias(x), F.conv2d(x, no_bias.weight, padding="same"),
                               rtol=1e-5, atol=1e-5)


def test_locally_connected2d_shapes_init_and_repr():
    layer = gt.LocallyConnected2d(4, 6, (3, 5), input_size=(20, 18), stride=(2, 1),
                                  padding=((1, 0), (2, 2)), groups=2)
    assert layer.output_size == (10, 18)
    assert layer.weight.shape == (6, 10, 18, 2, 3, 5)
    assert layer.bias.shape == (6, 10, 18)
    bound = 1 / (2 * 3 * 5) ** 0.5  # nn.Conv2d's default: fan_in = C_in/groups * kH * kW
    for p in (layer.weight, layer.bias):
        assert p.abs().max() <= bound and p.abs().max() > 0.95 * bound
        assert abs(p.std().item() - bound / 3 ** 0.5) < 0.05 * bound  # uniform's std
    text = repr(layer)
    for part in ("LocallyConnected2d(4, 6, kernel_size=(3, 5)", "input_size=(20, 18)",
                 "output_size=(10, 18)", "stride=(2, 1)", "padding=((1, 0), (2, 2))",
                 "groups=2", f"params={6 * 10 * 18 * (2 * 3 * 5 + 1):,}"):
        assert part in text, text
    assert "bias=False" in repr(gt.LocallyConnected2d(1, 1, 1, 4, bias=False))
    assert gt.LocallyConnected2d(1, 1, 1, 4, bias=False).bias is None
    assert layer(torch.randn(4, 20, 18)).shape == (6, 10, 18)  # unbatched
    with pytest.raises(ValueError, match=r"built for inputs of H x W = 20 x 18.*\(2, 4, 20, 17\)"):
        layer(torch.randn(2, 4, 20, 17))


@pytest.mark.parametrize("with_bias", [True, False], ids=["bias", "nobias"])
def test_from_conv2d_starts_equal_to_the_shared_layer(with_bias):
    conv = nn.Conv2d(4, 6, 3, stride=2, padding=1, dilation=(1, 2), groups=2, bias=with_bias,
                     dtype=F64)
    local = gt.LocallyConnected2d.from_conv2d(conv, (11, 12))
    assert (local.stride, local.padding, local.dilation, local.groups) == \
        (conv.stride, conv.padding, conv.dilation, conv.groups)
    assert local.weight.dtype == F64 and (local.bias is None) == (not with_bias)
    x = torch.randn(3, 4, 11, 12, dtype=F64)
    torch.testing.assert_close(local(x), conv(x), rtol=1e-12, atol=1e-12)
    local.weight.data[:, 0, 0] += 1  # the positions are now independent parameters
    assert not torch.allclose(local(x)[:, :, 0, 0], conv(x)[:, :, 0, 0])
    assert torch.allclose(local(x)[:, :, 1:], conv(x)[:, :, 1:])


def _model(dtype=torch.float32):
    return nn.Sequential(gt.Conv2d(3, 4, 3, padding=1), nn.ReLU(),
                         gt.LocallyConnected2d(4, 5, 3, (8, 8), stride=2, padding=1),
                         nn.Tanh()).to(dtype)


def test_state_dict_round_trip_and_to_float64():
    model = _model()
    x = torch.randn(2, 3, 8, 8)
    clone = _model()
    clone.load_state_dict(model.state_dict())
    torch.testing.assert_close(clone(x), model(x), rtol=0, atol=0)

    model.to(F64)
    assert all(p.dtype == F64 for p in model.parameters())
    y = model(x.double())
    assert y.dtype == F64
    conv, local = model[0], model[2]
    h = torch.relu(F.conv2d(x.double(), conv.weight, conv.bias, padding=1))
    expected = torch.tanh(local_reference(h, local.weight, local.bias, stride=2, padding=1))
    torch.testing.assert_close(y, expected, rtol=1e-12, atol=1e-12)
    y.sum().backward()
    assert all(p.grad is not None and p.grad.dtype == F64 for p in model.parameters())
    with pytest.raises(TypeError, match="weight must have the dtype of x"):
        model(x)  # float32 input into a float64 model


def test_torch_compile_fullgraph_equals_eager():
    model = _model(F64)
    compiled = torch.compile(model, fullgraph=True)
    x = _randn(2, 3, 8, 8)
    y_eager = model(x)
    grads_eager = torch.autograd.grad(y_eager.square().sum(), (x, *model.parameters()))
    y = compiled(x)
    grads = torch.autograd.grad(y.square().sum(), (x, *model.parameters()))
    torch.testing.assert_close(y, y_eager, rtol=1e-12, atol=1e-12)
    for a, b in zip(grads, grads_eager):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="PyTorch sees no CUDA GPU")
def test_cuda_training_step_matches_cpu():
    device = "cuda"
    model = _model(F64)
    clone = _model(F64).to(device)
    clone.load_state_dict(model.state_dict())
    x = torch.randn(4, 3, 8, 8, dtype=F64)
    for m, inp in ((model, x), (clone, x.to(device))):
        m(inp).square().sum().backward()
    for (name, p), q in zip(model.named_parameters(), clone.parameters()):
        assert q.grad.device.type == "cuda"
        torch.testing.assert_close(q.grad.cpu(), p.grad, rtol=1e-10, atol=1e-10, msg=name)


def test_layer_repr_says_it_is_gpuconvs_and_padding_words_in_any_case():
    layer = gt.Conv2d(3, 4, 3, padding="SAME")
    text = repr(nn.Sequential(nn.Conv2d(3, 3, 1), layer))
    assert "gpuconv.torch.Conv2d(3, 4, kernel_size=(3, 3)" in text
    assert "(0): Conv2d(3, 3" in text  # PyTorch's own keeps its name
    assert layer.padding == "same" and layer(torch.randn(1, 3, 5, 5)).shape == (1, 4, 5, 5)


@pytest.mark.parametrize("mode", ["reflect", "replicate", "circular"])
@pytest.mark.parametrize("padding", [1, (2, 1), "same"])
def test_padding_modes_as_torch_nn_conv2d(mode, padding):
    """padding_mode with nn.Conv2d's meaning, forward and gradients, in float64 against
    PyTorch's own layer; the unshared layer with tied kernels against the same."""
    torch.manual_seed(0)
    ref = nn.Conv2d(4, 6, 3, padding=padding, padding_mode=mode, groups=2,
                    dtype=torch.float64)
    ours = gt.Conv2d(4, 6, 3, padding=padding, padding_mode=mode, groups=2,
                     dtype=torch.float64)
    ours.load_state_dict(ref.state_dict())
    x = torch.randn(2, 4, 7, 8, dtype=torch.float64, requires_grad=True)
    y_ref = ref(x)
    grads_ref = torch.autograd.grad(y_ref.square().sum(), (x, ref.weight))
    y = ours(x)
    grads = torch.autograd.grad(y.square().sum(), (x, ours.weight))
    torch.testing.assert_close(y, y_ref)
    for g, g_ref in zip(grads, grads_ref):
        torch.testing.assert_close(g, g_ref)
    local = gt.LocallyConnected2d.from_conv2d(ref, (7, 8))
    assert local.padding_mode == mode and f"padding_mode='{mode}'" in repr(local)
    torch.testing.assert_close(local(x), y_ref)
    torch.testing.assert_close(local(x[0]), y_ref[0])  # unbatched


def test_locally_connected_padding_mode_is_checked():
    with pytest.raises(ValueError, match="padding_mode must be one of"):
        gt.LocallyConnected2d(3, 4, 3, (8, 8), padding=1, padding_mode="zero")


# --- half precision and autocast -------------------------------------------------------------

def _half_tolerance(dtype, terms):
    """A result stored in ``dtype`` after a float32 sum of ``terms`` products of O(1) values:
    one rounding to the storage type (relative 2**-8 for bfloat16, 2**-11 for float16) of a
    value up to ``terms`` in size, plus float32's sum error."""
    eps = {torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}[dtype]
    return terms * (eps + terms * 2.0**-24)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("local", [False, True])
def test_half_precision_layers_train(dtype, local):
    """float16 and bfloat16 through the layers with gradients: the result is the float64
    computation on the same (rounded) values, rounded once to the half type."""
    torch.manual_seed(0)
    layer = (gt.LocallyConnected2d(4, 3, 3, (6, 7), padding=1) if local
             else gt.Conv2d(4, 3, 3, padding=1)).to(dtype)
    ref = (gt.LocallyConnected2d(4, 3, 3, (6, 7), padding=1) if local
           else nn.Conv2d(4, 3, 3, padding=1)).double()
    ref.load_state_dict({k: v.double() for k, v in layer.state_dict().items()})
    x = torch.randn(2, 4, 6, 7).to(dtype).requires_grad_()
    x64 = x.detach().double().requires_grad_()
    y, y64 = layer(x), ref(x64)
    assert y.dtype == dtype
    tol = _half_tolerance(dtype, 4 * 9 + 1)
    assert float((y.detach().double() - y64.detach()).abs().max()) <= tol
    gy = torch.randn_like(y64)
    y.backward(gy.to(dtype))
    y64.backward(gy)
    assert x.grad.dtype == dtype and layer.weight.grad.dtype == dtype
    grad_tol = _half_tolerance(dtype, 3 * 9 if not local else 3 * 9) + 1e-6
    assert float((x.grad.double() - x64.grad).abs().max()) <= grad_tol
    terms = 2 * (1 if local else 6 * 7)
    scale = float(ref.weight.grad.abs().max())
    assert float((layer.weight.grad.double() - ref.weight.grad).abs().max()) <= (
        _half_tolerance(dtype, terms) * max(1.0, scale / terms) * 4)


def test_autocast_leaves_float64_operands_alone_as_nn_conv2d_does():
    ours = gt.Conv2d(3, 4, 3).double()
    ref = nn.Conv2d(3, 4, 3).double()
    ref.load_state_dict(ours.state_dict())
    x = torch.randn(1, 3, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected, got = ref(x), ours(x)
    assert expected.dtype == got.dtype == torch.float64
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)


def test_autocast_on_the_cpu_runs_a_mixed_stack():
    """The issue's example: after a layer that autocast converts, a gpuconv layer takes the
    bfloat16 activations; forward and backward match float32 within bfloat16's precision."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), gt.Conv2d(8, 8, 3, padding=1),
                          gt.LocallyConnected2d(8, 2, 3, (16, 16), padding=1))
    x = torch.randn(4, 3, 16, 16)
    y32 = model(x)
    grads32 = torch.autograd.grad(y32.square().sum(), list(model.parameters()))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = model(x)
        assert y.dtype == torch.bfloat16
        loss = y.float().square().sum()
    grads = torch.autograd.grad(loss, list(model.parameters()))
    assert all(g.dtype == torch.float32 for g in grads)  # the parameters' own dtype
    # bfloat16 keeps 8 bits: relative 2**-8 per rounding, three layers deep
    scale = float(y32.abs().max())
    assert float((y.float() - y32).abs().max()) <= 3 * 2.0**-8 * 4 * scale
    for g, g32 in zip(grads, grads32):
        assert float((g - g32).norm() / g32.norm()) < 0.05
    # outside the region, float32 again
    assert model(x).dtype == torch.float32


def test_bfloat16_in_the_core_api():
    import gpuconv

    x, w = torch.randn(2, 3, 6, 6), torch.randn(4, 3, 3, 3)
    y = gpuconv.conv2d(x.bfloat16(), w.bfloat16(), device="cpu")
    expected = F.conv2d(x.bfloat16().double(), w.bfloat16().double())
    assert y.dtype == torch.bfloat16
    assert float((y.double() - expected).abs().max()) <= _half_tolerance(torch.bfloat16, 27)
    with pytest.raises(TypeError, match=r"weight must have the dtype of x \(torch.bfloat16\)"):
        gpuconv.conv2d(x.bfloat16(), w, device="cpu")
    with pytest.raises(TypeError, match=r"weight must have the dtype of x \(torch.float32\)"):
        gpuconv.conv2d(x, w.bfloat16(), device="cpu")
