"""How the public layer reads PyTorch tensors: the array interface of a CUDA tensor built
from the tensor's attributes (checked here against NumPy's view of the same memory, on CPU
tensors; on a GPU the acceptance script checks it against PyTorch's own property), the
choice of that path, and views whose memory holds the values negated."""

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import gpuconv  # noqa: E402
from gpuconv import conv as _conv  # noqa: E402
from reference import conv2d_ref, local_conv2d_ref  # noqa: E402


def _layouts():
    base = torch.arange(2 * 3 * 4 * 6, dtype=torch.float32).reshape(2, 3, 4, 6)
    return {"contiguous": base, "transposed": base.transpose(2, 3),
            "strided": base[:, :, ::2, 1::3], "size-1 axes": base[:1, 1:2],
            "one channel of two images": base[:, :1], "expanded": base[:1].expand(3, 3, 4, 6),
            "half": base.half(), "double": base.double().transpose(0, 1)}


@pytest.mark.parametrize("name", sorted(_layouts()))
def test_cuda_interface_is_numpys_view_of_the_same_memory(name):
    """The interface the public layer builds of a CUDA tensor, built here of a CPU tensor,
    against NumPy's array interface of that tensor's memory (an independent reading)."""
    tensor = _layouts()[name]
    dtype = np.dtype(str(tensor.dtype).removeprefix("torch."))
    ours = _conv.torch_cuda_interface(tensor, dtype)
    numpys = tensor.numpy().__array_interface__
    assert ours == {"typestr": numpys["typestr"], "shape": numpys["shape"],
                    "strides": numpys["strides"], "data": numpys["data"], "version": 2}
    assert type(ours["shape"]) is tuple and all(type(s) is int for s in ours["shape"])


def test_cuda_interface_of_an_empty_tensor_points_nowhere():
    empty = torch.zeros((0, 3, 4, 4))
    assert _conv.torch_cuda_interface(empty, np.dtype(np.float32)) == {
        "typestr": "<f4", "shape": (0, 3, 4, 4), "strides": None, "data": (0, False),
        "version": 2}


class _TorchCudaStandIn:
    """A PyTorch CUDA tensor as the public layer reads one, over a CPU tensor's memory."""

    is_cuda, is_cpu = True, False

    def __init__(self, tensor, requires_grad=False):
        self.tensor, self.requires_grad = tensor, requires_grad
        self.dtype, self.layout, self.shape = tensor.dtype, tensor.layout, tensor.shape
        self.device = tensor.device

    def is_neg(self):
        return self.tensor.is_neg()

    def resolve_neg(self):
        return type(self)(self.tensor.resolve_neg())

    def is_contiguous(self):
        return self.tensor.is_contiguous()

    def stride(self):
        return self.tensor.stride()

    def data_ptr(self):
        return self.tensor.data_ptr()

    def numel(self):
        return self.tensor.numel()

    def detach(self):
        return type(self)(self.tensor)

    @property
    def __cuda_array_interface__(self):  # as PyTorch's property reads a tensor that requires
        if self.requires_grad:           # grad; the public layer builds its own otherwise
            raise RuntimeError("Can't get __cuda_array_interface__ on Variable that requires "
                               "grad. If gradients aren't required, use var.detach() to get "
                               "Variable that doesn't require gradient.")
        raise AttributeError("the stand-in has none: the public layer builds its own")


_TorchCudaStandIn.__module__ = "torch.stand_in"  # gpuconv tells libraries apart by module


@pytest.fixture
def cuda_tensors(monkeypatch):
    """The public layer taking :class:`_TorchCudaStandIn` for PyTorch's tensor type."""
    monkeypatch.setattr(_conv._Torch, "tensor", None)
    _conv._Torch.seen()
    monkeypatch.setattr(_conv._Torch, "tensor", _TorchCudaStandIn)
    return _TorchCudaStandIn


@pytest.mark.parametrize("name", sorted(_layouts()))
def test_a_cuda_tensor_becomes_a_device_operand(cuda_tensors, name):
    tensor = _layouts()[name]
    operand = _conv._operand(cuda_tensors(tensor), "x")
    assert operand.on_gpu and operand.shape == tuple(tensor.shape)
    assert operand.dtype == np.dtype(str(tensor.dtype).removeprefix("torch."))
    numpys = tensor.numpy().__array_interface__
    assert operand.cai["data"][0] == numpys["data"][0] == tensor.data_ptr()
    assert operand.cai["strides"] == numpys["strides"]


def test_cuda_tensors_the_fast_reading_leaves_to_the_generic_path(cuda_tensors):
    """Tensors that require grad (in grad mode: a TypeError naming the argument) and
    dtypes the kernels do not take are not read by the CUDA tensor path."""
    with pytest.raises(TypeError, match="weight is a tensor that requires grad"):
        _conv._operand(cuda_tensors(torch.zeros(3), requires_grad=True), "weight")
    # an integer CUDA tensor goes on to the generic path, which reads the array interface;
    # the stand-in has none, so that path refuses it (a real one is refused for its dtype)
    with pytest.raises(TypeError, match="x must be an array"):
        _conv._operand(cuda_tensors(torch.zeros(3, dtype=torch.int32)), "x")
    assert _conv._operand(cuda_tensors(torch.zeros(3)), "x").on_gpu


def test_a_cuda_tensor_that_requires_grad_is_read_detached_outside_grad_mode(cuda_tensors):
    """A parameter passed under torch.no_grad() (what the gradient functions' TypeError
    advises): its values are read, as a device operand, not PyTorch's array interface
    (which refuses a tensor that requires grad); the transposed convolutions' location
    check asks the tensor where it lives for the same reason."""
    from gpuconv.device import is_device_array

    values = torch.arange(6.0).reshape(2, 3)
    weight = cuda_tensors(values, requires_grad=True)
    with torch.no_grad():
        operand = _conv._operand(weight, "weight")
    assert operand.on_gpu and operand.shape == (2, 3)
    assert operand.cai["data"][0] == values.data_ptr()
    assert not operand.obj.requires_grad
    real = torch.zeros(3, requires_grad=True)
    assert is_device_array(real) is False and is_device_array(real.detach()) is False


def test_negated_views_are_read_with_their_sign():
    """``z.conj().imag`` is a view whose memory holds the values negated (PyTorch's neg bit);
    NumPy and the array interfaces see the memory, so the public layer resolves it first.
    Checked against the float64 reference of the values PyTorch shows."""
    g = torch.Generator().manual_seed(0)
    z = torch.randn(2, 3, 7, 7, dtype=torch.complex128, generator=g)
    x = z.conj().imag
    wz = torch.randn(4, 3, 3, 3, dtype=torch.complex128, generator=g)
    w = wz.conj().imag
    assert x.is_neg() and w.is_neg()
    x_values, w_values = x.resolve_neg().numpy(), w.resolve_neg().numpy()
    y = gpuconv.conv2d(x, w, padding=1, device="cpu")
    np.testing.assert_allclose(y.numpy(), conv2d_ref(x_values, w_values, padding=1),
                               rtol=1e-12, atol=1e-12)
    wl = torch.randn(4, 5, 5, 3, 3, 3, dtype=torch.complex128, generator=g).conj().imag
    y = gpuconv.local_conv2d(x, wl, device="cpu")
    np.testing.assert_allclose(y.numpy(), local_conv2d_ref(x_values, wl.resolve_neg().numpy()),
                               rtol=1e-12, atol=1e-12)


def test_a_negated_cuda_tensor_is_resolved_before_its_memory_is_read(cuda_tensors):
    x = torch.randn(2, 3, 5, 5, dtype=torch.complex64).conj().imag
    operand = _conv._operand(cuda_tensors(x), "x")
    assert not operand.obj.is_neg()
    assert operand.cai["data"][0] == operand.obj.data_ptr() != x.data_ptr()
