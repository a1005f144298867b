"""The transposed and 1-D PyTorch layers: drop-ins for torch.nn's, gradcheck through each,
the unshared transpose as the adjoint of LocallyConnected2d, torch.compile."""

import pytest

torch = pytest.importorskip("torch")

import gpuconv  # noqa: E402
import gpuconv.torch as gt  # noqa: E402

F64 = torch.float64
nn = torch.nn


def _randn(*shape, grad=True):
    return torch.randn(*shape, dtype=F64, requires_grad=grad)


def _gradcheck(layer, x):
    params = [p for p in layer.parameters()]

    def fn(x, *values):
        return torch.func.functional_call(layer, dict(zip([n for n, _ in layer.named_parameters()],
                                                          values)), (x,))
    assert torch.autograd.gradcheck(fn, (x, *params))


@pytest.mark.parametrize("kwargs", [
    {"stride": 1},
    {"stride": 2, "padding": 1, "output_padding": 1, "groups": 2},
    {"stride": (2, 1), "padding": (0, 1), "dilation": (1, 2), "output_padding": (1, 1)},
])
def test_conv_transpose2d_gradcheck_and_drop_in(kwargs):
    torch.manual_seed(0)
    layer = gt.ConvTranspose2d(4, 2, 3, dtype=F64, **kwargs)
    reference = nn.ConvTranspose2d(4, 2, 3, dtype=F64, **kwargs)
    reference.load_state_dict(layer.state_dict())
    x = _randn(2, 4, 3, 3)
    torch.testing.assert_close(layer(x), reference(x), rtol=1e-12, atol=1e-12)
    _gradcheck(layer, x)
    assert torch.autograd.gradgradcheck(
        lambda x, w: gt.conv_transpose2d(x, w, None, layer.stride, layer.padding,
                                         layer.output_padding, layer.groups, layer.dilation),
        (x, layer.weight))


def test_conv_transpose2d_output_size_and_state_dict_into_torch():
    torch.manual_seed(1)
    layer = gt.ConvTranspose2d(3, 5, 3, stride=2, padding=1, bias=False, dtype=F64)
    reference = nn.ConvTranspose2d(3, 5, 3, stride=2, padding=1, bias=False, dtype=F64)
    reference.load_state_dict(layer.state_dict())
    x = _randn(1, 3, 4, 4, grad=False)
    for size in ((7, 7), (8, 8), (7, 8)):
        y = layer(x, output_size=size)
        assert tuple(y.shape[-2:]) == size
        torch.testing.assert_close(y, reference(x, output_size=size), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(layer(x[0]), reference(x[0]), rtol=1e-12, atol=1e-12)
    assert "gpuconv.torch.ConvTranspose2d" in repr(layer)


@pytest.mark.parametrize("kwargs", [
    {"padding": "same", "dilation": 2},
    {"stride": 2, "padding": 1, "groups": 2},
    {"padding": 2, "padding_mode": "reflect"},
    {"padding": "same", "padding_mode": "circular"},
])
def test_conv1d_gradcheck_and_drop_in(kwargs):
    torch.manual_seed(2)
    layer = gt.Conv1d(4, 6, 3, dtype=F64, **kwargs)
    reference = nn.Conv1d(4, 6, 3, dtype=F64, **kwargs)
    reference.load_state_dict(layer.state_dict())
    x = _randn(2, 4, 9)
    torch.testing.assert_close(layer(x), reference(x), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(layer(x[0]), reference(x[0]), rtol=1e-12, atol=1e-12)
    _gradcheck(layer, x)


def test_locally_connected_transpose2d_shapes_and_gradcheck():
    layer = gt.LocallyConnectedTranspose2d(4, 3, 3, input_size=(5, 5), dtype=F64)
    assert layer.output_size == (7, 7)
    assert tuple(layer.weight.shape) == (4, 5, 5, 3, 3, 3)
    assert tuple(layer.bias.shape) == (3, 7, 7)
    small = gt.LocallyConnectedTranspose2d(2, 2, 2, input_size=(3, 3), stride=2, padding=1,
                                           output_padding=1, dtype=F64)
    assert small.output_size == (5, 5)  # (3 - 1) * 2 - 2 + (2 - 1) + 1 + 1
    _gradcheck(small, _randn(2, 2, 3, 3))
    _gradcheck(gt.LocallyConnectedTranspose2d(2, 4, (2, 1), input_size=(2, 3), groups=2,
                                              dilation=(2, 1), dtype=F64), _randn(1, 2, 2, 3))
    with pytest.raises(ValueError, match=r"built for inputs of H_in x W_in = 5 x 5"):
        layer(torch.zeros(1, 4, 6, 6, dtype=F64))


def test_locally_connected_transpose2d_is_the_adjoint_of_locally_connected2d():
    forward = gt.LocallyConnected2d(3, 4, 3, input_size=(8, 8), stride=2, padding=1, bias=False,
                                    dtype=F64)
    transposed = gt.LocallyConnectedTranspose2d(4, 3, 3, input_size=forward.output_size,
                                                stride=2, padding=1, output_padding=1,
                                                bias=False, dtype=F64)
    assert transposed.output_size == (8, 8)
    with torch.no_grad():
        transposed.weight.copy_(forward.weight)  # the same layout, unchanged
        a, b = torch.randn(2, 3, 8, 8, dtype=F64), torch.randn(2, 4, 4, 4, dtype=F64)
        left, right = (forward(a) * b).sum(), (a * transposed(b)).sum()
    torch.testing.assert_close(left, right, rtol=1e-12, atol=1e-12)


def test_locally_connected1d_shapes_gradcheck_and_padding():
    layer = gt.LocallyConnected1d(3, 4, 5, input_size=20, stride=2, dtype=F64)
    assert layer.output_size == 8
    assert tuple(layer.weight.shape) == (4, 8, 3, 5) and tuple(layer.bias.shape) == (4, 8)
    same = gt.LocallyConnected1d(2, 2, 3, input_size=6, padding="SAME", dtype=F64)
    assert same.output_size == 6
    _gradcheck(same, _randn(2, 2, 6))
    _gradcheck(gt.LocallyConnected1d(2, 4, 2, input_size=5, padding=1, groups=2,
                                     padding_mode="replicate", dtype=F64), _randn(1, 2, 5))
    with pytest.raises(ValueError, match="built for inputs of length L = 20"):
        layer(torch.zeros(1, 3, 21, dtype=F64))
    with pytest.raises(ValueError, match="padding='same' requires stride 1"):
        gt.LocallyConnected1d(3, 4, 5, input_size=20, stride=2, padding="same")
    with pytest.raises(ValueError, match="padding_mode must be one of"):
        gt.LocallyConnected1d(3, 4, 5, input_size=20, padding_mode="mirror")


def test_bad_layer_arguments_name_the_argument():
    with pytest.raises(ValueError, match="output_padding must be smaller than either stride"):
        gt.LocallyConnectedTranspose2d(4, 3, 3, input_size=(5, 5), output_padding=1)
    with pytest.raises(ValueError, match="groups=2 must divide the output channels C_out=3"):
        gt.LocallyConnectedTranspose2d(4, 3, 3, input_size=(5, 5), groups=2)
    with pytest.raises(TypeError, match="conv_transpose2d: weight must have the dtype of x"):
        gt.conv_transpose2d(torch.zeros(1, 2, 3, 3), torch.zeros(2, 2, 2, 2, dtype=F64))
    with pytest.raises(TypeError, match="conv1d: weight must have the dtype of x"):
        gt.conv1d(torch.zeros(1, 2, 3), torch.zeros(2, 2, 2, dtype=F64))
    with pytest.raises(TypeError, match="local_conv1d: x must be a torch.Tensor"):
        gt.local_conv1d([0.0], torch.zeros(2, 2, 2, 2))


def test_public_transposes_record_the_graph_through_the_layer():
    x = _randn(1, 2, 3, 3)
    w = _randn(2, 3, 2, 2)
    y = gpuconv.conv_transpose2d(x, w, stride=2)
    assert y.grad_fn is not None
    y.sum().backward()
    xr, wr = x.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    torch.nn.functional.conv_transpose2d(xr, wr, stride=2).sum().backward()
    torch.testing.assert_close(x.grad, xr.grad, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(w.grad, wr.grad, rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="device='cuda' was requested but x lives on cpu"):
        gpuconv.local_conv_transpose2d(x, torch.zeros(2, 3, 3, 3, 2, 2, dtype=F64), device="cuda")


def test_torch_compile_fullgraph_equals_eager():
    torch.manual_seed(3)
    model = nn.Sequential(
        gt.Conv1d(2, 3, 3, padding=1, dtype=F64),
        gt.LocallyConnected1d(3, 2, 3, input_size=8, padding="same", dtype=F64),
        nn.Unflatten(2, (2, 4)),
        gt.ConvTranspose2d(2, 3, 2, stride=2, dtype=F64),
        gt.LocallyConnectedTranspose2d(3, 2, 3, input_size=(4, 8), stride=2, padding=1,
                                       output_padding=1, dtype=F64))
    x = _randn(2, 2, 8)
    y_eager = model(x)
    grads_eager = torch.autograd.grad(y_eager.square().sum(), (x, *model.parameters()))
    compiled = torch.compile(model, fullgraph=True)
    y = compiled(x)
    grads = torch.autograd.grad(y.square().sum(), (x, *model.parameters()))
    torch.testing.assert_close(y, y_eager, rtol=1e-12, atol=1e-12)
    for a, b in zip(grads, grads_eager):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_torch_compile_with_symbolic_sizes_equals_eager():
    # dynamic=True traces every size as a symbol (as a recompile for a new batch size does):
    # the layers' shape checks must compare sizes one by one, not tuples.
    torch.manual_seed(4)
    model = nn.Sequential(
        gt.LocallyConnected1d(3, 2, 3, input_size=8, padding="same", dtype=F64),
        nn.Unflatten(2, (2, 4)),
        gt.LocallyConnectedTranspose2d(2, 2, 3, input_size=(2, 4), stride=2, padding=1,
                                       output_padding=1, dtype=F64))
    compiled = torch.compile(model, fullgraph=True, dynamic=True)
    for batch in (2, 3):
        x = _randn(batch, 3, 8)
        torch.testing.assert_close(compiled(x), model(x), rtol=1e-12, atol=1e-12)
