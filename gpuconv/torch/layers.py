"""The 2-D PyTorch layers: the custom operators, their autograd, the functional ops
:func:`conv2d` and :func:`local_conv2d`, and the modules :class:`Conv2d` and
:class:`LocallyConnected2d` (see :mod:`gpuconv.torch`, which names them)."""

import math
from typing import Optional

import torch
from torch import Tensor, nn

from ..conv import call, typed_key
from ..geometry import conv_geometry, get_conv_outsize, pair, resolve_padding
from ..ops import register_autograd

__all__ = ["conv2d", "local_conv2d", "Conv2d", "LocallyConnected2d"]

#: The dtypes the layers and functional ops take: float16 and bfloat16 are stored in half
#: precision and accumulated in float32 (bfloat16 through a float32 copy, see
#: :func:`gpuconv.conv.call`), the result rounded once.
_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_GEOMETRY = "int[] stride, int[] padding, int[] dilation, int groups"


# --------------------------------------------------------------------------------------------
# custom operators
# --------------------------------------------------------------------------------------------

def _run(op_name, device, arrays, stride, padding, dilation, groups, sizes=None):
    """Run one of gpuconv's operations on ``device`` with tensors that record no graph.

    Gradients often arrive strided (``sum()``'s backward expands with zero strides): they are
    made contiguous here by PyTorch, on its current stream (a no-op for contiguous tensors).
    """
    arrays = {k: None if t is None else t.detach().contiguous() for k, t in arrays.items()}
    top, bottom, left, right = padding
    return call(op_name, arrays, tuple(stride), ((top, bottom), (left, right)), tuple(dilation),
                groups, device, sizes=sizes)


def _define(name, schema, run):
    """Define ``gpuconv::name`` with a CPU kernel and a CUDA kernel (``run(device, *args)``)."""
    op = torch.library.custom_op(f"gpuconv::{name}", mutates_args=(), device_types="cpu",
                                 schema=schema)(lambda *args: run("cpu", *args))
    op.register_kernel("cuda")(lambda *args: run("cuda", *args))
    return op


def _forward(op_name):
    def run(device, x, weight, bias, stride, padding, dilation, groups):
        return _run(op_name, device, {"x": x, "weight": weight, "bias": bias}, stride, padding,
                    dilation, groups)
    return run


def _input_grad(op_name):
    def run(device, input_size, weight, grad_output, stride, padding, dilation, groups):
        return _run(op_name, device, {"grad_output": grad_output, "weight": weight}, stride,
                    padding, dilation, groups, sizes={"input_size": tuple(input_size)})
    return run


def _weight_grad(op_name):
    def run(device, input, weight_size, grad_output, stride, padding, dilation, groups):
        return _run(op_name, device, {"input": input, "grad_output": grad_output}, stride,
                    padding, dilation, groups, sizes={"weight_size": tuple(weight_size)})
    return run


_FORWARD_SCHEMA = f"(Tensor x, Tensor weight, Tensor? bias, {_GEOMETRY}) -> Tensor"
_INPUT_GRAD_SCHEMA = (f"(SymInt[] input_size, Tensor weight, Tensor grad_output, {_GEOMETRY})"
                      " -> Tensor")
_WEIGHT_GRAD_SCHEMA = (f"(Tensor input, SymInt[] weight_size, Tensor grad_output, {_GEOMETRY})"
                       " -> Tensor")

_conv2d_op = _define("conv2d", _FORWARD_SCHEMA, _forward("conv2d"))
_local_conv2d_op = _define("local_conv2d", _FORWARD_SCHEMA, _forward("local_conv2d"))
_conv2d_input_op = _define("conv2d_input", _INPUT_GRAD_SCHEMA, _input_grad("conv2d_input"))
_conv2d_weight_op = _define("conv2d_weight", _WEIGHT_GRAD_SCHEMA, _weight_grad("conv2d_weight"))
_local_conv2d_input_op = _define("local_conv2d_input", _INPUT_GRAD_SCHEMA,
                                 _input_grad("local_conv2d_input"))
_local_conv2d_weight_op = _define("local_conv2d_weight", _WEIGHT_GRAD_SCHEMA,
                                  _weight_grad("local_conv2d_weight"))

# Shared and unshared operators, by role: forward, input gradient, weight gradient.
_SHARED = (_conv2d_op, _conv2d_input_op, _conv2d_weight_op)
_LOCAL = (_local_conv2d_op, _local_conv2d_input_op, _local_conv2d_weight_op)


def _check_fake(x_name, x, w_name, weight, weight_rank):
    torch._check(x.dim() == 4, lambda: f"{x_name} must be 4-D (N, C_in, H, W), got {x.dim()}-D")
    torch._check(weight.dim() == weight_rank,
                 lambda: f"{w_name} must be {weight_rank}-D, got {weight.dim()}-D")
    torch._check(x.dtype == weight.dtype and x.dtype in _DTYPES,
                 lambda: f"{x_name} and {w_name} must share one of float16, bfloat16, float32 "
                         f"or float64, got {x.dtype} and {w_name} {weight.dtype}")


@_conv2d_op.register_fake
def _(x, weight, bias, stride, padding, dilation, groups):
    _check_fake("x", x, "weight", weight, 4)
    out_h = get_conv_outsize(x.shape[2], weight.shape[2], stride[0], padding[0] + padding[1],
                             dilation[0])
    out_w = get_conv_outsize(x.shape[3], weight.shape[3], stride[1], padding[2] + padding[3],
                             dilation[1])
    return x.new_empty((x.shape[0], weight.shape[0], out_h, out_w))


@_local_conv2d_op.register_fake
def _(x, weight, bias, stride, padding, dilation, groups):
    _check_fake("x", x, "weight", weight, 6)
    return x.new_empty((x.shape[0], weight.shape[0], weight.shape[1], weight.shape[2]))


def _fake_input_grad(rank):
    def fake(input_size, weight, grad_output, stride, padding, dilation, groups):
        _check_fake("grad_output", grad_output, "weight", weight, rank)
        return grad_output.new_empty(input_size)
    return fake


def _fake_weight_grad(rank):
    def fake(input, weight_size, grad_output, stride, padding, dilation, groups):
        _check_fake("input", input, "grad_output", grad_output, 4)
        torch._check(len(weight_size) == rank, lambda: f"weight_size must have {rank} entries")
        return input.new_empty(weight_size)
    return fake


for _ops, _rank in ((_SHARED, 4), (_LOCAL, 6)):
    _ops[1].register_fake(_fake_input_grad(_rank))
    _ops[2].register_fake(_fake_weight_grad(_rank))


# Autograd. With y = A_w x (A_w linear in both w and x) and L = <y, gy>:
#   dL/dx = A_w^T gy           (the input-gradient operator)
#   dL/dw = B(x, gy)           (the weight-gradient operator)
# and the gradient operators are linear in each argument, so their backward is again made of
# the three operators (double backward): for gx = A_w^T gy and an upstream ggx,
#   d<ggx, gx>/dgy = A_w ggx = forward(ggx, w),  d<ggx, gx>/dw = B(ggx, gy);
# for gw = B(x, gy) and an upstream ggw,
#   d<ggw, gw>/dx = A_ggw^T gy = input_grad(ggw, gy),  d<ggw, gw>/dgy = forward(x, ggw).

def _save_geometry(ctx, stride, padding, dilation, groups, *rest):
    # (rest: the arguments after the geometry, such as the tiled operators' tiling)
    ctx.geometry = (list(stride), list(padding), list(dilation), groups, *rest)


def _register_autograd(ops, bias_grad=None):
    """Register the autograd formulas of ``ops`` (forward, input gradient, weight gradient);
    ``bias_grad(grad, bias_shape, geometry)`` is the gradient of a bias of more than one
    dimension (default: per position, ``grad.sum(0)``)."""
    forward_op, input_op, weight_op = ops

    def setup_forward(ctx, inputs, output):
        x, weight, bias, *geometry = inputs
        ctx.save_for_backward(x, weight)
        ctx.bias_per_position = bias is not None and bias.dim() == 3
        ctx.bias_shape = None if bias is None else tuple(bias.shape)
        _save_geometry(ctx, *geometry)

    def backward_forward(ctx, grad):
        x, weight = ctx.saved_tensors
        g_x = g_w = g_b = None
        if ctx.needs_input_grad[0]:
            g_x = input_op(list(x.shape), weight, grad, *ctx.geometry)
        if ctx.needs_input_grad[1]:
            g_w = weight_op(x, list(weight.shape), grad, *ctx.geometry)
        if ctx.needs_input_grad[2]:
            if not ctx.bias_per_position:
                g_b = grad.sum((0, 2, 3))
            else:
                g_b = (grad.sum(0) if bias_grad is None
                       else bias_grad(grad, ctx.bias_shape, ctx.geometry))
        return (g_x, g_w, g_b) + (None,) * len(ctx.geometry)

    def setup_input_grad(ctx, inputs, output):
        _, weight, grad_output, *geometry = inputs
        ctx.save_for_backward(weight, grad_output)
        _save_geometry(ctx, *geometry)

    def backward_input_grad(ctx, grad):
        weight, grad_output = ctx.saved_tensors
        g_w = g_gy = None
        if ctx.needs_input_grad[1]:
            g_w = weight_op(grad, list(weight.shape), grad_output, *ctx.geometry)
        if ctx.needs_input_grad[2]:
            g_gy = forward_op(grad, weight, None, *ctx.geometry)
        return (None, g_w, g_gy) + (None,) * len(ctx.geometry)

    def setup_weight_grad(ctx, inputs, output):
        x, _, grad_output, *geometry = inputs
        ctx.save_for_backward(x, grad_output)
        _save_geometry(ctx, *geometry)

    def backward_weight_grad(ctx, grad):
        x, grad_output = ctx.saved_tensors
        g_x = g_gy = None
        if ctx.needs_input_grad[0]:
            g_x = input_op(list(x.shape), grad, grad_output, *ctx.geometry)
        if ctx.needs_input_grad[2]:
            g_gy = forward_op(x, grad, None, *ctx.geometry)
        return (g_x, None, g_gy) + (None,) * len(ctx.geometry)

    forward_op.register_autograd(backward_forward, setup_context=setup_forward)
    input_op.register_autograd(backward_input_grad, setup_context=setup_input_grad)
    weight_op.register_autograd(backward_weight_grad, setup_context=setup_weight_grad)


_register_autograd(_SHARED)
_register_autograd(_LOCAL)


# --------------------------------------------------------------------------------------------
# functional
# --------------------------------------------------------------------------------------------

def _check_tensors(fn, x, weight, bias):
    for name, value in (("x", x), ("weight", weight), ("bias", bias)):
        if not isinstance(value, Tensor) and not (name == "bias" and value is None):
            raise TypeError(f"{fn}: {name} must be a torch.Tensor, got {type(value).__name__}")
    if x.dtype not in _DTYPES:
        raise TypeError(f"{fn}: x must be float16, bfloat16, float32 or float64, got "
                        f"{x.dtype}; convert it, e.g. x.float()")
    for name, value in (("weight", weight), ("bias", bias)):
        if value is not None and value.dtype != x.dtype:
            raise TypeError(f"{fn}: {name} must have the dtype of x ({x.dtype}), got "
                            f"{value.dtype}; cast one of them, e.g. {name}.to(x.dtype)")
    if x.dim() not in (3, 4):
        raise ValueError(f"{fn}: x must be 4-D (N, C_in, H, W) or 3-D (C_in, H, W), got shape "
                         f"{tuple(x.shape)}")


_GEOMETRY_ARGS = {}  # (kernel, typed arguments) -> their explicit form (layers repeat them)


def _geometry_args(weight, stride, padding, dilation, groups):
    """Explicit ``[h, w]`` stride and dilation, ``[top, bottom, left, right]`` padding (the
    lists are shared between calls with the same arguments: never modify them)."""
    kernel = (int(weight.shape[-2]), int(weight.shape[-1]))
    key = typed_key((kernel, stride, padding, dilation, groups))
    if key is not None:
        found = _GEOMETRY_ARGS.get(key)
        if found is not None:
            return found
    found = _explicit_geometry(kernel, stride, padding, dilation, groups)
    if key is not None and len(_GEOMETRY_ARGS) < 1024:
        _GEOMETRY_ARGS[key] = found
    return found


def _explicit_geometry(kernel, stride, padding, dilation, groups):
    stride = pair(stride, "stride", 1)
    dilation = pair(dilation, "dilation", 1)
    padding = resolve_padding(padding, kernel, stride, dilation)
    if isinstance(groups, bool) or not isinstance(groups, int):
        raise TypeError(f"groups must be an int, got {groups!r}")
    return list(stride), list(padding), list(dilation), groups


def _autocast(x, weight, bias):
    """Under ``torch.autocast`` on the tensors' device, the floating-point operands cast to
    the autocast dtype, as PyTorch's own convolution does (bfloat16 on the CPU, float16 or
    bfloat16 on CUDA): half-precision storage, float32 accumulation inside the kernels.
    float64 operands stay float64, as PyTorch's autocast leaves them. The casts are
    recorded by autograd, so gradients reach the parameters in their own dtype."""
    device_type = x.device.type if isinstance(x, Tensor) else None
    if device_type not in ("cpu", "cuda") or not torch.is_autocast_enabled(device_type):
        return x, weight, bias
    dtype = torch.get_autocast_dtype(device_type)

    def cast(t):
        if (not isinstance(t, Tensor) or not t.is_floating_point() or t.dtype == dtype
                or t.dtype == torch.float64):  # as PyTorch's autocast: float64 left alone
            return t
        return t.to(dtype)
    return cast(x), cast(weight), cast(bias)


def _apply(fn, op, x, weight, bias, stride, padding, dilation, groups):
    x, weight, bias = _autocast(x, weight, bias)
    _check_tensors(fn, x, weight, bias)
    geometry = _geometry_args(weight, stride, padding, dilation, groups)
    unbatched = x.dim() == 3
    if unbatched:
        x = x.unsqueeze(0)
    if _plain_eager(x, weight, bias):
        y = _eager(fn, x, weight, bias, geometry)
    else:
        y = op(x, weight, bias, *geometry)
    return y.squeeze(0) if unbatched else y


# --------------------------------------------------------------------------------------------
# eager calls: the same computation without the operator dispatcher
# --------------------------------------------------------------------------------------------
# A call through a custom operator pays PyTorch's dispatch and its Python autograd wrapper
# (about 15-25 us on the CPU). In plain eager mode (not compiling or tracing, no torch-function
# or dispatch mode, no functorch transform, plain tensors on one CPU or CUDA device) the
# functional ops run the same kernels directly, recording the graph with a small
# ``torch.autograd.Function`` whose backward runs the gradient kernels directly too, or, when
# the graph of the backward is itself recorded (``create_graph=True``), the differentiable
# gradient operators: the results are the same, bit for bit.

_PLAIN = (Tensor, nn.Parameter)


def _plain_eager(x, weight, bias):
    # compiled or traced (torch.jit.trace, the TorchScript ONNX export): the operators,
    # which a graph records (the eager path's output would be baked in as a constant)
    if torch.compiler.is_compiling() or torch._C._get_tracing_state() is not None:
        return False
    if type(x) is not Tensor or type(weight) not in _PLAIN or (
            bias is not None and type(bias) not in _PLAIN):
        return False
    device = x.device
    if device.type not in ("cpu", "cuda") or weight.device != device or (
            bias is not None and bias.device != device):
        return False
    if torch._C._is_torch_function_mode_enabled() or _dispatch_mode() is not None:
        return False
    return _functorch_level() is None


def _dispatch_mode():
    from torch.utils._python_dispatch import _get_current_dispatch_mode

    return _get_current_dispatch_mode()


def _functorch_level():
    peek = getattr(getattr(torch._C, "_functorch", None), "peek_interpreter_stack", None)
    return None if peek is None else peek()


_OPS_BY_FN = {"conv2d": ("conv2d", "conv2d_input", "conv2d_weight", _SHARED),
              "local_conv2d": ("local_conv2d", "local_conv2d_input", "local_conv2d_weight",
                               _LOCAL)}


def _eager(fn, x, weight, bias, geometry):
    if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad or (
            bias is not None and bias.requires_grad)):
        return _EagerForward.apply(fn, x, weight, bias, *geometry)
    return _run(fn, x.device.type, {"x": x, "weight": weight, "bias": bias}, *geometry)


class _EagerForward(torch.autograd.Function):
    """The forward operator's computation and gradient formula (see ``_register_autograd``)
    without the dispatcher."""

    @staticmethod
    def forward(ctx, fn, x, weight, bias, stride, padding, dilation, groups):
        ctx.fn = fn
        ctx.geometry = (stride, padding, dilation, groups)
        ctx.bias_per_position = bias is not None and bias.dim() == 3
        ctx.save_for_backward(x, weight)
        return _run(fn, x.device.type, {"x": x, "weight": weight, "bias": bias}, stride,
                    padding, dilation, groups)

    @staticmethod
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        _, input_name, weight_name, (_, input_op, weight_op) = _OPS_BY_FN[ctx.fn]
        needs = ctx.needs_input_grad
        g_x = g_w = g_b = None
        if torch.is_grad_enabled():  # create_graph: differentiable gradient operators
            if needs[1]:
                g_x = input_op(list(x.shape), weight, grad, *ctx.geometry)
            if needs[2]:
                g_w = weight_op(x, list(weight.shape), grad, *ctx.geometry)
        else:
            device = x.device.type
            if needs[1]:
                g_x = _run(input_name, device, {"grad_output": grad, "weight": weight},
                           *ctx.geometry, sizes={"input_size": tuple(x.shape)})
            if needs[2]:
                g_w = _run(weight_name, device, {"input": x, "grad_output": grad},
                           *ctx.geometry, sizes={"weight_size": tuple(weight.shape)})
        if needs[3]:
            g_b = grad.sum(0) if ctx.bias_per_position else grad.sum((0, 2, 3))
        return None, g_x, g_w, g_b, None, None, None, None


def conv2d(x: Tensor, weight: Tensor, bias: Optional[Tensor] = None, stride=1, padding=0,
           dilation=1, groups=1) -> Tensor:
    """2-D convolution with shared weights, differentiable (``torch.nn.functional.conv2d``'s
    arguments, plus asymmetric padding).

    Args:
        x: ``(N, C_in, H, W)`` or ``(C_in, H, W)``, float16, bfloat16, float32 or float64
            (the half types stored in half precision and accumulated in float32), on the CPU
            or a GPU. Under ``torch.autocast`` the operands are cast to its dtype first, as
            PyTorch's convolution does.
        weight: ``(C_out, C_in/groups, kH, kW)``, same dtype and device.
        bias: ``None`` or ``(C_out,)``.
        stride, dilation: int or ``(h, w)``.
        padding: int, ``(p_h, p_w)``, ``((top, bottom), (left, right))``, ``"valid"`` or
            ``"same"`` (stride 1).
        groups: divides ``C_in`` and ``C_out``.

    Returns:
        ``(N, C_out, H_out, W_out)`` (``(C_out, H_out, W_out)`` for 3-D ``x``), recording the
        autograd graph when an argument requires grad.

    >>> import torch, gpuconv.torch
    >>> x = torch.ones(1, 1, 3, 3, requires_grad=True)
    >>> y = gpuconv.torch.conv2d(x, torch.ones(1, 1, 2, 2))
    >>> y.sum().backward()
    >>> x.grad[0, 0]
    tensor([[1., 2., 1.],
            [2., 4., 2.],
            [1., 2., 1.]])
    """
    return _apply("conv2d", _conv2d_op, x, weight, bias, stride, padding, dilation, groups)


def local_conv2d(x: Tensor, weight: Tensor, bias: Optional[Tensor] = None, stride=1,
                 padding=0, dilation=1, groups=1) -> Tensor:
    """Locally connected (unshared) 2-D convolution, differentiable.

    Args:
        x: ``(N, C_in, H, W)`` or ``(C_in, H, W)``, float16, bfloat16, float32 or float64
            (autocast as :func:`conv2d`).
        weight: ``(C_out, H_out, W_out, C_in/groups, kH, kW)``: one kernel per output position.
        bias: ``None``, ``(C_out,)`` (one per map) or ``(C_out, H_out, W_out)`` (one per
            position).
        stride, padding, dilation, groups: as :func:`conv2d`.

    Returns:
        ``(N, C_out, H_out, W_out)`` (``(C_out, H_out, W_out)`` for 3-D ``x``).
    """
    return _apply("local_conv2d", _local_conv2d_op, x, weight, bias, stride, padding, dilation,
                  groups)


def check_autograd_call(arrays, device):
    """The checks of a public call on tensors that require grad: every array a tensor, and
    ``device`` ``"auto"`` or the tensors' own."""
    x = arrays["x"]
    for name, value in arrays.items():
        if value is not None and not isinstance(value, Tensor):
            raise TypeError(
                f"{name} must be a torch.Tensor when another argument is a tensor that requires "
                f"grad (got {type(value).__name__}); convert it with torch.as_tensor")
    if device not in ("auto", x.device.type):
        raise ValueError(
            f"device={device!r} was requested but x lives on {x.device}; a call that records "
            "the autograd graph runs where its tensors are: move them with .to(device)")


def autograd_forward(op_name, arrays, stride, padding, dilation, groups, device):
    """:func:`gpuconv.conv2d` / :func:`gpuconv.local_conv2d` on tensors that require grad:
    the same call through the differentiable operators. The tensors' device decides where it
    runs; ``device`` may be ``"auto"`` or that device."""
    check_autograd_call(arrays, device)
    fn = conv2d if op_name == "conv2d" else local_conv2d
    return fn(arrays["x"], arrays["weight"], arrays["bias"], stride, padding, dilation, groups)


# --------------------------------------------------------------------------------------------
# modules
# --------------------------------------------------------------------------------------------

#: ``padding_mode`` values, with ``torch.nn.Conv2d``'s meaning: zeros, or the input padded by
#: ``torch.nn.functional.pad`` in that mode before an unpadded convolution.
PADDING_MODES = ("zeros", "reflect", "replicate", "circular")


def _check_padding_mode(mode):
    if mode not in PADDING_MODES:
        raise ValueError(f"padding_mode must be one of {', '.join(map(repr, PADDING_MODES))}, "
                         f"got {mode!r}")


def _pad_input(input, padding, kernel_size, stride, dilation, mode):
    """``input`` padded in ``mode`` (not zeros) by ``padding``'s amounts, as
    ``torch.nn.Conv2d`` does before convolving without padding."""
    top, bottom, left, right = resolve_padding(padding, kernel_size, stride, dilation)
    return nn.functional.pad(input, (left, right, top, bottom), mode=mode)


class Conv2d(nn.Conv2d):
    """``torch.nn.Conv2d`` computed by gpuconv's kernels.

    Same arguments, parameter names, shapes and default initialisation as ``torch.nn.Conv2d``
    (it is a subclass), so a ``state_dict`` loads into either. ``padding`` also takes
    ``((top, bottom), (left, right))`` and ``"SAME"``/``"VALID"`` in any case;
    ``padding_mode`` is one of :data:`PADDING_MODES`, as in ``torch.nn.Conv2d``.

    >>> import torch, gpuconv.torch
    >>> _ = torch.manual_seed(0); a = gpuconv.torch.Conv2d(3, 8, 3, padding=1)
    >>> _ = torch.manual_seed(0); b = torch.nn.Conv2d(3, 8, 3, padding=1)
    >>> x = torch.randn(2, 3, 16, 16)
    >>> torch.allclose(a(x), b(x), atol=1e-5)
    True
    """

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0, dilation=1,
                 groups=1, bias=True, padding_mode="zeros", device=None, dtype=None):
        _check_padding_mode(padding_mode)
        if isinstance(padding, str):
            padding = padding.lower()  # "SAME" / "VALID", as gpuconv.conv2d takes them
        super().__init__(in_channels, out_channels, kernel_size, stride=stride, padding=padding,
                         dilation=dilation, groups=groups, bias=bias,
                         padding_mode=padding_mode, device=device, dtype=dtype)

    def _get_name(self):
        # print(model) tells this layer from torch.nn.Conv2d (same arguments otherwise)
        return "gpuconv.torch.Conv2d"

    def _conv_forward(self, input, weight, bias):
        padding = self.padding
        if self.padding_mode != "zeros":
            input = _pad_input(input, padding, self.kernel_size, self.stride, self.dilation,
                               self.padding_mode)
            padding = 0
        return conv2d(input, weight, bias, self.stride, padding, self.dilation, self.groups)


class LocallyConnected2d(nn.Module):
    """A locally connected (unshared) 2-D layer: a different kernel at every output position.

    Args:
        in_channels, out_channels, kernel_size, stride, padding, dilation, groups,
            padding_mode: as ``torch.nn.Conv2d`` (``padding`` also ``((top, bottom), (left,
            right))``; ``padding_mode`` one of :data:`PADDING_MODES`).
        input_size: ``(H, W)`` (or an int): the layer only takes inputs of this size.
        bias: one learnable bias per output position, ``(C_out, H_out, W_out)``.

    Attributes:
        output_size: ``(H_out, W_out)``.
        weight: ``(C_out, H_out, W_out, C_in/groups, kH, kW)``, initialised as
            ``torch.nn.Conv2d`` initialises its kernel (uniform in ``±1/sqrt(fan_in)``,
            ``fan_in = C_in/groups * kH * kW``), independently at every position.
        bias: ``(C_out, H_out, W_out)`` or ``None``, uniform in ``±1/sqrt(fan_in)``.

    Input ``(N, C_in, H, W)`` or ``(C_in, H, W)``; output ``(N, C_out, H_out, W_out)``.

    >>> import torch, gpuconv.torch
    >>> layer = gpuconv.torch.LocallyConnected2d(3, 8, 5, input_size=(32, 32))
    >>> layer  # doctest: +NORMALIZE_WHITESPACE
    LocallyConnected2d(3, 8, kernel_size=(5, 5), input_size=(32, 32), output_size=(28, 28),
                       stride=(1, 1), params=476,672)
    >>> layer(torch.randn(2, 3, 32, 32)).shape
    torch.Size([2, 8, 28, 28])
    """

    def __init__(self, in_channels, out_channels, kernel_size, input_size, stride=1, padding=0,
                 dilation=1, groups=1, bias=True, padding_mode="zeros", device=None,
                 dtype=None):
        super().__init__()
        _check_padding_mode(padding_mode)
        self.padding_mode = padding_mode
        kernel_size = pair(kernel_size, "kernel_size", 1)
        input_size = pair(input_size, "input_size", 1)
        stride = pair(stride, "stride", 1)
        dilation = pair(dilation, "dilation", 1)
        if isinstance(padding, int) and not isinstance(padding, bool):
            padding = (padding, padding)
        elif isinstance(padding, (tuple, list)):
            padding = tuple(tuple(p) if isinstance(p, (tuple, list)) else p for p in padding)
        elif isinstance(padding, str):
            padding = padding.lower()
        geom = conv_geometry((1, in_channels) + input_size, kernel_size, out_channels, stride,
                             padding, dilation, groups)
        self.in_channels, self.out_channels = in_channels, out_channels
        self.kernel_size, self.input_size = kernel_size, input_size
        self.stride, self.padding, self.dilation, self.groups = stride, padding, dilation, groups
        self.output_size = (geom.out_height, geom.out_width)
        factory = {"device": device, "dtype": dtype}
        self.weight = nn.Parameter(torch.empty(geom.local_weight_shape(), **factory))
        if bias:
            self.bias = nn.Parameter(torch.empty((out_channels,) + self.output_size, **factory))
        else:
            self.register_parameter("bias", None)
        self.reset_parameters()

    def reset_parameters(self):
        """Uniform in ``±1/sqrt(fan_in)``, weight and bias: ``torch.nn.Conv2d``'s default
        (``kaiming_uniform_(a=sqrt(5))`` gives that bound) with its fan-in."""
        fan_in = self.in_channels // self.groups * self.kernel_size[0] * self.kernel_size[1]
        if fan_in == 0:
            return
        bound = 1 / math.sqrt(fan_in)
        nn.init.uniform_(self.weight, -bound, bound)
        if self.bias is not None:
            nn.init.uniform_(self.bias, -bound, bound)

    def forward(self, input: Tensor) -> Tensor:
        if isinstance(input, Tensor) and tuple(input.shape[-2:]) != self.input_size:
            raise ValueError(
                f"LocallyConnected2d was built for inputs of H x W = {self.input_size[0]} x "
                f"{self.input_size[1]} (input_size), got shape {tuple(input.shape)}: its weights "
                "are tied to output positions, so the input size is fixed")
        padding = self.padding
        if self.padding_mode != "zeros":
            input = _pad_input(input, padding, self.kernel_size, self.stride, self.dilation,
                               self.padding_mode)
            padding = 0
        return local_conv2d(input, self.weight, self.bias, self.stride, padding,
                            self.dilation, self.groups)

    def extra_repr(self):
        s = (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
             f"input_size={self.input_size}, output_size={self.output_size}, "
             f"stride={self.stride}")
        return s + _repr_options(self, (0, 0), (1, 1))

    @classmethod
    def from_conv2d(cls, conv, input_size):
        """An unshared layer holding ``conv``'s kernel (and bias) at every output position.

        ``conv`` is a ``torch.nn.Conv2d`` (or :class:`Conv2d`), any ``padding_mode``; the new
        layer's output equals ``conv``'s on inputs of ``input_size`` until training unties
        the positions. Parameters are copies on ``conv``'s device, in its dtype.
        """
        if not isinstance(conv, nn.Conv2d):
            raise TypeError(f"conv must be a torch.nn.Conv2d, got {type(conv).__name__}")
        layer = cls(conv.in_channels, conv.out_channels, conv.kernel_size, input_size,
                    stride=conv.stride, padding=conv.padding, dilation=conv.dilation,
                    groups=conv.groups, bias=conv.bias is not None,
                    padding_mode=conv.padding_mode, device=conv.weight.device,
                    dtype=conv.weight.dtype)
        with torch.no_grad():
            layer.weight.copy_(conv.weight[:, None, None].expand(layer.weight.shape))
            if conv.bias is not None:
                layer.bias.copy_(conv.bias[:, None, None].expand(layer.bias.shape))
        return layer


# gpuconv.conv2d / gpuconv.local_conv2d send tensors that require grad here.
register_autograd("forward", autograd_forward)


def _repr_options(layer, no_padding, no_dilation):
    """The end of an unshared or tiled layer's ``extra_repr``: the arguments that differ from
    their defaults (``no_padding`` / ``no_dilation`` in the layer's own form), then the
    parameter count."""
    s = ""
    if layer.padding not in (no_padding, "valid"):
        s += f", padding={layer.padding!r}"
    if layer.dilation != no_dilation:
        s += f", dilation={layer.dilation}"
    if layer.padding_mode != "zeros":
        s += f", padding_mode={layer.padding_mode!r}"
    if layer.groups != 1:
        s += f", groups={layer.groups}"
    if layer.bias is None:
        s += ", bias=False"
    return s + f", params={sum(p.numel() for p in layer.parameters()):,}"
