"""gpuconv.torch in plain eager mode runs its kernels without the operator dispatcher: the
same results, gradients and second gradients as through the custom operators, and the
operators whenever something else is watching (dispatch modes, compilation)."""

import pytest

torch = pytest.importorskip("torch")

import torch.nn.functional as F  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

import gpuconv.torch as gt  # noqa: E402

F64 = torch.float64


class _Recorder(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func))
        return func(*args, **(kwargs or {}))


def _case(local, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 3, 7, 7, dtype=F64, generator=g, requires_grad=True)
    shape = (4, 5, 5, 3, 3, 3) if local else (4, 3, 3, 3)
    w = torch.randn(shape, dtype=F64, generator=g, requires_grad=True)
    b = torch.randn((4, 5, 5) if local else (4,), dtype=F64, generator=g, requires_grad=True)
    return x, w, b


def _through_operators(fn, x, w, b):
    """The same call through the custom operators (a dispatch mode forces that path)."""
    recorder = _Recorder()
    with recorder:
        y = fn(x, w, b)
    assert any("gpuconv." in op for op in recorder.ops)
    return y


@pytest.mark.parametrize("local", [False, True])
def test_eager_path_equals_the_operators_bitwise(local):
    fn = gt.local_conv2d if local else gt.conv2d
    x, w, b = _case(local)
    y = fn(x, w, b)
    assert type(y.grad_fn).__name__ == "_EagerForwardBackward"
    y_op = _through_operators(fn, x, w, b)
    assert type(y_op.grad_fn).__name__ != "_EagerForwardBackward"
    torch.testing.assert_close(y, y_op, rtol=0, atol=0)
    gy = torch.randn_like(y)
    grads = torch.autograd.grad(y, (x, w, b), gy)
    grads_op = torch.autograd.grad(y_op, (x, w, b), gy)
    for a, c in zip(grads, grads_op):
        torch.testing.assert_close(a, c, rtol=0, atol=0)
    if not local:  # against PyTorch's own convolution
        torch.testing.assert_close(y, F.conv2d(x, w, b), rtol=1e-12, atol=1e-12)
        for a, c in zip(grads, torch.autograd.grad(F.conv2d(x, w, b), (x, w, b), gy)):
            torch.testing.assert_close(a, c, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("local", [False, True])
def test_eager_second_derivatives_equal_the_operators(local):
    fn = gt.local_conv2d if local else gt.conv2d
    x, w, b = _case(local, seed=1)
    results = []
    for y in (fn(x, w, b), _through_operators(fn, x, w, b)):
        gx, gw = torch.autograd.grad(y.square().sum(), (x, w), create_graph=True)
        results.append(torch.autograd.grad((gx.square().sum() + gw.square().sum()), (x, w, b),
                                           allow_unused=True))
    for a, c in zip(*results):
        if a is None or c is None:
            assert a is None and c is None
        else:
            torch.testing.assert_close(a, c, rtol=0, atol=0)
    assert torch.autograd.gradgradcheck(lambda x_, w_: fn(x_, w_, None), (x[:1], w))


def test_inference_and_unbatched_calls_take_the_eager_path():
    x, w, b = _case(False)
    with torch.no_grad():
        y = gt.conv2d(x, w, b)
    assert y.grad_fn is None
    torch.testing.assert_close(y, F.conv2d(x.detach(), w.detach(), b.detach()), rtol=1e-12,
                               atol=1e-12)
    y3 = gt.conv2d(x[0], w, b)
    assert y3.shape == (4, 5, 5) and y3.grad_fn is not None
    torch.testing.assert_close(y3, F.conv2d(x[0], w, b), rtol=1e-12, atol=1e-12)


def test_mixed_devices_and_meta_tensors_go_through_the_operators():
    x, w, b = _case(False)
    meta = gt.conv2d(x.detach().to("meta"), w.detach().to("meta"), b.detach().to("meta"))
    assert meta.device.type == "meta" and meta.shape == (2, 4, 5, 5)


@pytest.mark.parametrize("local", [False, True], ids=["conv2d", "local"])
def test_jit_trace_records_the_operator_not_the_result(local):
    """Traced (as for inference, under no_grad) the layers go through the custom operators:
    the trace then computes each new input's output, instead of returning the tracing
    input's output baked in as a constant."""
    layer = (gt.LocallyConnected2d(3, 4, 3, input_size=8) if local
             else gt.Conv2d(3, 4, 3)).eval()
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        traced = torch.jit.trace(layer, torch.randn(1, 3, 8, 8, generator=g))
        x = torch.randn(1, 3, 8, 8, generator=g)
        torch.testing.assert_close(traced(x), layer(x))
    assert "gpuconv::" in str(traced.graph)
