"""PyTorch layers for the rest of the family: transposed and one-dimensional, shared and unshared.

Reached as ``gpuconv.torch.<name>``; built on the operators of :mod:`gpuconv.torch.layers`,
with no operators of their own:

- :func:`conv_transpose2d` and :func:`local_conv_transpose2d` are the input-gradient
  operators ``gpuconv::conv2d_input`` / ``gpuconv::local_conv2d_input`` with the layer's input
  as ``grad_output``; their backward is those operators' registered autograd, i.e. the forward
  operators ``conv2d`` / ``local_conv2d`` (input gradient) and ``conv2d_weight`` /
  ``local_conv2d_weight`` (weight gradient), and double backward works as for them. The bias
  is PyTorch's addition.
- :func:`conv1d` and :func:`local_conv1d` are :func:`gpuconv.torch.conv2d` /
  :func:`gpuconv.torch.local_conv2d` on unit-height views (``unsqueeze``, no copies).
- Modules: :class:`ConvTranspose2d` and :class:`Conv1d` (subclasses of ``torch.nn.ConvTranspose2d``
  / ``torch.nn.Conv1d``, so their ``state_dict`` loads into either),
  :class:`LocallyConnectedTranspose2d` and :class:`LocallyConnected1d`.

All of them trace under ``torch.compile`` as the 2-D layers do.
"""

import math
from typing import Optional

import torch
from torch import Tensor, nn

from ..geometry import _is_int, pair
from ..one_dimensional import _check_bias as _check_bias_1d
from ..one_dimensional import _single, geometry_1d
from ..ops import register_autograd
from .layers import (_apply, _autocast, _check_padding_mode, _check_tensors,
                     _conv2d_input_op, _conv2d_op, _local_conv2d_input_op, _local_conv2d_op,
                     _repr_options)
from ..transpose import _check_bias, transpose_geometry

__all__ = ["conv_transpose2d", "local_conv_transpose2d", "conv1d", "local_conv1d",
           "ConvTranspose2d", "LocallyConnectedTranspose2d", "Conv1d", "LocallyConnected1d"]


# --------------------------------------------------------------------------------------------
# functional
# --------------------------------------------------------------------------------------------

def _transpose(fn, op, local, x, weight, bias, stride, padding, output_padding, groups,
               dilation):
    x, weight, bias = _autocast(x, weight, bias)
    _check_tensors(fn, x, weight, bias)
    geom = transpose_geometry(tuple(x.shape), tuple(weight.shape), local, stride, padding,
                              output_padding, groups, dilation)
    _check_bias(bias, geom, local)
    unbatched = x.dim() == 3
    if unbatched:
        x = x.unsqueeze(0)
    if geom.reaches_output:
        y = op(list(geom.reached_shape), weight, x, list(geom.stride), geom.forward_padding_flat,
               list(geom.dilation), geom.groups)
        extra_h, extra_w = geom.extra
        if extra_h or extra_w:  # rows no input pixel reaches
            y = nn.functional.pad(y, (0, extra_w, 0, extra_h))
    else:  # the padding crops every pixel any input reaches
        y = x.new_zeros(geom.output_shape)
    if bias is not None:
        y = y + (bias.reshape(-1, 1, 1) if bias.dim() == 1 else bias)
    return y.squeeze(0) if unbatched else y


def conv_transpose2d(x: Tensor, weight: Tensor, bias: Optional[Tensor] = None, stride=1,
                     padding=0, output_padding=0, groups=1, dilation=1) -> Tensor:
    """Transposed 2-D convolution, differentiable (``torch.nn.functional.conv_transpose2d``'s
    arguments and semantics; see :func:`gpuconv.conv_transpose2d`).

    Args:
        x: ``(N, C_in, H_in, W_in)`` or ``(C_in, H_in, W_in)``, dtypes as
            :func:`gpuconv.torch.conv2d`.
        weight: ``(C_in, C_out/groups, kH, kW)``.
        bias: ``None`` or ``(C_out,)``.
        stride, padding, output_padding, dilation: int or ``(h, w)``; ``output_padding``
            smaller than the stride or the dilation.
        groups: divides ``C_in``.

    Returns:
        ``(N, C_out, H_out, W_out)``, ``H_out = (H_in - 1) * s_h - 2 * p_h + d_h * (kH - 1)
        + output_padding_h + 1``.

    >>> import torch, gpuconv.torch
    >>> x = torch.ones(1, 1, 2, 2, requires_grad=True)
    >>> gpuconv.torch.conv_transpose2d(x, torch.ones(1, 1, 2, 2), stride=2).shape
    torch.Size([1, 1, 4, 4])
    """
    return _transpose("conv_transpose2d", _conv2d_input_op, False, x, weight, bias, stride,
                      padding, output_padding, groups, dilation)


def local_conv_transpose2d(x: Tensor, weight: Tensor, bias: Optional[Tensor] = None, stride=1,
                           padding=0, output_padding=0, groups=1, dilation=1) -> Tensor:
    """Transposed locally connected 2-D convolution, differentiable: the adjoint of
    :func:`gpuconv.torch.local_conv2d` with the same weight (see
    :func:`gpuconv.local_conv_transpose2d`).

    Args:
        x: ``(N, C_in, H_in, W_in)`` or ``(C_in, H_in, W_in)``.
        weight: ``(C_in, H_in, W_in, C_out/groups, kH, kW)``.
        bias: ``None``, ``(C_out,)`` or ``(C_out, H_out, W_out)``.
        stride, padding, output_padding, groups, dilation: as :func:`conv_transpose2d`.
    """
    return _transpose("local_conv_transpose2d", _local_conv2d_input_op, True, x, weight, bias,
                      stride, padding, output_padding, groups, dilation)


def _check_types(fn, x, weight, bias):
    for name, value in (("x", x), ("weight", weight), ("bias", bias)):
        if not isinstance(value, Tensor) and not (name == "bias" and value is None):
            raise TypeError(f"{fn}: {name} must be a torch.Tensor, got {type(value).__name__}")


def _apply_1d(fn, fn_2d, op, x, weight, bias, stride, padding, dilation, groups):
    """The 2-D functional op on unit-height views, its dtype errors named for ``fn``."""
    x, weight, bias = _autocast(x, weight, bias)
    _check_tensors(fn, x, weight, bias)
    return _apply(fn_2d, op, x, weight, bias, stride, padding, dilation, groups).squeeze(-2)


def conv1d(x: Tensor, weight: Tensor, bias: Optional[Tensor] = None, stride=1, padding=0,
           dilation=1, groups=1) -> Tensor:
    """1-D convolution with shared weights, differentiable (``torch.nn.functional.conv1d``'s
    arguments; see :func:`gpuconv.conv1d`).

    Args:
        x: ``(N, C_in, L)`` or ``(C_in, L)``.
        weight: ``(C_out, C_in/groups, k)``.
        bias: ``None`` or ``(C_out,)``.
        stride, dilation: int or 1-tuple. padding: int, 1-tuple, ``"valid"`` or ``"same"``.
        groups: divides ``C_in`` and ``C_out``.

    Returns:
        ``(N, C_out, L_out)`` (``(C_out, L_out)`` for 2-D ``x``).
    """
    _check_types("conv1d", x, weight, bias)
    stride, padding, dilation, out_length, _ = geometry_1d(x.shape, weight.shape, False,
                                                           stride, padding, dilation, groups)
    _check_bias_1d(bias, weight.shape[0], out_length, False)
    return _apply_1d("conv1d", "conv2d", _conv2d_op, x.unsqueeze(-2), weight.unsqueeze(-2),
                     bias, stride, padding, dilation, groups)


def local_conv1d(x: Tensor, weight: Tensor, bias: Optional[Tensor] = None, stride=1,
                 padding=0, dilation=1, groups=1) -> Tensor:
    """Locally connected (unshared) 1-D convolution, differentiable (see
    :func:`gpuconv.local_conv1d`).

    Args:
        x: ``(N, C_in, L)`` or ``(C_in, L)``.
        weight: ``(C_out, L_out, C_in/groups, k)``.
        bias: ``None``, ``(C_out,)`` or ``(C_out, L_out)``.
        stride, padding, dilation, groups: as :func:`conv1d`.
    """
    _check_types("local_conv1d", x, weight, bias)
    stride, padding, dilation, out_length, _ = geometry_1d(x.shape, weight.shape, True,
                                                           stride, padding, dilation, groups)
    _check_bias_1d(bias, weight.shape[0], out_length, True)
    if bias is not None and bias.dim() == 2:
        bias = bias.unsqueeze(1)
    return _apply_1d("local_conv1d", "local_conv2d", _local_conv2d_op, x.unsqueeze(-2),
                     weight[:, None, :, :, None, :], bias, stride, padding, dilation, groups)


# --------------------------------------------------------------------------------------------
# modules
# --------------------------------------------------------------------------------------------

def _uniform_(parameters, fan_in):
    """Uniform in ``±1/sqrt(fan_in)``: ``torch.nn``'s default for convolutions
    (``kaiming_uniform_(a=sqrt(5))`` gives that bound)."""
    if fan_in == 0:
        return
    bound = 1 / math.sqrt(fan_in)
    for p in parameters:
        if p is not None:
            nn.init.uniform_(p, -bound, bound)


def _check_channels(in_channels, out_channels):
    for name, value in (("in_channels", in_channels), ("out_channels", out_channels)):
        if not _is_int(value):
            raise TypeError(f"{name} must be an int, got {value!r}")
        if value < 1:
            raise ValueError(f"{name} must be >= 1, got {value!r}")


def _per_group(channels, groups):
    """``channels // groups`` for a valid ``groups`` (a bad one is reported by the geometry
    check that follows)."""
    return channels // groups if _is_int(groups) and groups >= 1 else channels


class ConvTranspose2d(nn.ConvTranspose2d):
    """``torch.nn.ConvTranspose2d`` computed by gpuconv's kernels.

    Same arguments, parameter names, shapes (weight ``(C_in, C_out/groups, kH, kW)``) and
    initialisation as ``torch.nn.ConvTranspose2d`` (it is a subclass), so a ``state_dict``
    loads into either; ``forward(input, output_size=None)`` picks the output padding from
    ``output_size`` as it does. ``padding_mode`` is ``"zeros"`` only, as there.

    >>> import torch, gpuconv.torch
    >>> _ = torch.manual_seed(0); a = gpuconv.torch.ConvTranspose2d(4, 3, 3, stride=2)
    >>> _ = torch.manual_seed(0); b = torch.nn.ConvTranspose2d(4, 3, 3, stride=2)
    >>> x = torch.randn(2, 4, 5, 5)
    >>> torch.allclose(a(x, output_size=(12, 12)), b(x, output_size=(12, 12)), atol=1e-5)
    True
    """

    def _get_name(self):
        return "gpuconv.torch.ConvTranspose2d"

    def forward(self, input: Tensor, output_size: Optional[list] = None) -> Tensor:
        output_padding = self._output_padding(input, output_size, self.stride, self.padding,
                                              self.kernel_size, 2, self.dilation)
        return conv_transpose2d(input, self.weight, self.bias, self.stride, self.padding,
                                output_padding, self.groups, self.dilation)


class Conv1d(nn.Conv1d):
    """``torch.nn.Conv1d`` computed by gpuconv's kernels (on unit-height views).

    Same arguments, parameter names, shapes and initialisation as ``torch.nn.Conv1d`` (a
    subclass: ``state_dict`` loads into either); ``padding`` also ``"SAME"``/``"VALID"`` in any
    case; ``padding_mode`` one of :data:`gpuconv.torch.PADDING_MODES`, as in
    ``torch.nn.Conv1d``.

    >>> import torch, gpuconv.torch
    >>> _ = torch.manual_seed(0); a = gpuconv.torch.Conv1d(3, 8, 5, padding="same")
    >>> _ = torch.manual_seed(0); b = torch.nn.Conv1d(3, 8, 5, padding="same")
    >>> x = torch.randn(2, 3, 40)
    >>> torch.allclose(a(x), b(x), atol=1e-5)
    True
    """

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0, dilation=1,
                 groups=1, bias=True, padding_mode="zeros", device=None, dtype=None):
        _check_padding_mode(padding_mode)
        if isinstance(padding, str):
            padding = padding.lower()
        super().__init__(in_channels, out_channels, kernel_size, stride=stride, padding=padding,
                         dilation=dilation, groups=groups, bias=bias,
                         padding_mode=padding_mode, device=device, dtype=dtype)

    def _get_name(self):
        return "gpuconv.torch.Conv1d"

    def _conv_forward(self, input, weight, bias):
        padding = self.padding
        if self.padding_mode != "zeros":
            input = nn.functional.pad(input, self._reversed_padding_repeated_twice,
                                      mode=self.padding_mode)
            padding = 0
        return conv1d(input, weight, bias, self.stride, padding, self.dilation, self.groups)


class LocallyConnectedTranspose2d(nn.Module):
    """A transposed locally connected 2-D layer: the adjoint of a :class:`LocallyConnected2d`
    (a decoder's upsampling layer with a different kernel at every input position).

    Args:
        in_channels, out_channels, kernel_size, stride, padding, output_padding, groups,
            dilation: as ``torch.nn.ConvTranspose2d``.
        input_size: ``(H_in, W_in)`` (or an int) of this layer's input: the layer only takes
            inputs of this size.
        bias: one learnable bias per output position, ``(C_out, H_out, W_out)``.

    Attributes:
        output_size: ``(H_out, W_out)``, ``H_out = (H_in - 1) * s_h - 2 * p_h + d_h * (kH - 1)
            + output_padding_h + 1``.
        weight: ``(C_in, H_in, W_in, C_out/groups, kH, kW)`` (the weight of the
            :class:`LocallyConnected2d` it transposes, unchanged), initialised as
            ``torch.nn.ConvTranspose2d`` initialises its kernel (uniform in
            ``±1/sqrt(fan_in)``, ``fan_in = C_out/groups * kH * kW``), independently at every
            position.
        bias: ``(C_out, H_out, W_out)`` or ``None``, uniform in ``±1/sqrt(fan_in)``.

    Input ``(N, C_in, H_in, W_in)`` or ``(C_in, H_in, W_in)``; output ``(N, C_out, H_out,
    W_out)``.

    >>> import torch, gpuconv.torch
    >>> layer = gpuconv.torch.LocallyConnectedTranspose2d(4, 3, 3, input_size=(5, 5))
    >>> layer.output_size, tuple(layer.weight.shape)
    ((7, 7), (4, 5, 5, 3, 3, 3))
    >>> layer(torch.randn(2, 4, 5, 5)).shape
    torch.Size([2, 3, 7, 7])
    """

    def __init__(self, in_channels, out_channels, kernel_size, input_size, stride=1, padding=0,
                 output_padding=0, groups=1, bias=True, dilation=1, device=None, dtype=None):
        super().__init__()
        _check_channels(in_channels, out_channels)
        if _is_int(groups) and groups >= 1 and out_channels % groups:
            raise ValueError(f"groups={groups} must divide the output channels "
                             f"C_out={out_channels}")
        kernel_size = pair(kernel_size, "kernel_size", 1)
        input_size = pair(input_size, "input_size", 1)
        per_group = _per_group(out_channels, groups)
        geom = transpose_geometry((1, in_channels) + input_size,
                                  (in_channels,) + input_size + (per_group,) + kernel_size,
                                  True, stride, padding, output_padding, groups, dilation)
        self.in_channels, self.out_channels = in_channels, out_channels
        self.kernel_size, self.input_size = kernel_size, input_size
        self.stride, self.padding = geom.stride, geom.padding
        self.output_padding, self.dilation, self.groups = (geom.output_padding, geom.dilation,
                                                           geom.groups)
        self.output_size = geom.output_shape[2:]
        factory = {"device": device, "dtype": dtype}
        self.weight = nn.Parameter(torch.empty(
            (in_channels,) + input_size + (out_channels // groups,) + kernel_size, **factory))
        if bias:
            self.bias = nn.Parameter(torch.empty((out_channels,) + self.output_size, **factory))
        else:
            self.register_parameter("bias", None)
        self.reset_parameters()

    def reset_parameters(self):
        """Uniform in ``±1/sqrt(fan_in)`` with ``torch.nn.ConvTranspose2d``'s fan-in,
        ``C_out/groups * kH * kW``."""
        fan_in = self.out_channels // self.groups * self.kernel_size[0] * self.kernel_size[1]
        _uniform_((self.weight, self.bias), fan_in)

    def forward(self, input: Tensor) -> Tensor:
        if isinstance(input, Tensor) and tuple(input.shape[-2:]) != self.input_size:
            raise ValueError(
                f"LocallyConnectedTranspose2d was built for inputs of H_in x W_in = "
                f"{self.input_size[0]} x {self.input_size[1]} (input_size), got shape "
                f"{tuple(input.shape)}: its weights are tied to input positions, so the input "
                "size is fixed")
        return local_conv_transpose2d(input, self.weight, self.bias, self.stride, self.padding,
                                      self.output_padding, self.groups, self.dilation)

    def extra_repr(self):
        s = (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
             f"input_size={self.input_size}, output_size={self.output_size}, "
             f"stride={self.stride}")
        if self.padding != (0, 0):
            s += f", padding={self.padding}"
        if self.output_padding != (0, 0):
            s += f", output_padding={self.output_padding}"
        if self.dilation != (1, 1):
            s += f", dilation={self.dilation}"
        if self.groups != 1:
            s += f", groups={self.groups}"
        if self.bias is None:
            s += ", bias=False"
        return s + f", params={sum(p.numel() for p in self.parameters()):,}"


class LocallyConnected1d(nn.Module):
    """A locally connected (unshared) 1-D layer: Keras' ``LocallyConnected1D`` in PyTorch.

    Args:
        in_channels, out_channels, kernel_size, stride, dilation, groups, padding_mode: as
            ``torch.nn.Conv1d`` (ints or 1-tuples; ``padding_mode`` one of
            :data:`gpuconv.torch.PADDING_MODES`).
        padding: int, 1-tuple, ``"valid"`` or ``"same"`` (stride 1), in any case.
        input_size: ``L`` (an int): the layer only takes inputs of this length.
        bias: one learnable bias per output position, ``(C_out, L_out)``.

    Attributes:
        output_size: ``L_out = (L + 2 * p - d * (k - 1) - 1) // s + 1``.
        weight: ``(C_out, L_out, C_in/groups, k)``, uniform in ``±1/sqrt(fan_in)``,
            ``fan_in = C_in/groups * k`` (``torch.nn.Conv1d``'s default), independently at
            every position.
        bias: ``(C_out, L_out)`` or ``None``, likewise.

    Input ``(N, C_in, L)`` or ``(C_in, L)``; output ``(N, C_out, L_out)``.

    >>> import torch, gpuconv.torch
    >>> layer = gpuconv.torch.LocallyConnected1d(4, 8, 5, input_size=100, stride=2)
    >>> layer.output_size, tuple(layer.weight.shape)
    (48, (8, 48, 4, 5))
    >>> layer(torch.randn(3, 4, 100)).shape
    torch.Size([3, 8, 48])
    """

    def __init__(self, in_channels, out_channels, kernel_size, input_size, stride=1, padding=0,
                 dilation=1, groups=1, bias=True, padding_mode="zeros", device=None,
                 dtype=None):
        super().__init__()
        _check_padding_mode(padding_mode)
        _check_channels(in_channels, out_channels)
        kernel_size = _single(kernel_size, "kernel_size", 1)
        input_size = _single(input_size, "input_size", 1)
        if isinstance(padding, str):
            padding = padding.lower()
        weight_shape = (out_channels, _per_group(in_channels, groups), kernel_size)
        geom = geometry_1d((1, in_channels, input_size), weight_shape, False, stride, padding,
                           dilation, groups)
        self.in_channels, self.out_channels = in_channels, out_channels
        self.kernel_size, self.input_size = kernel_size, input_size
        self.stride, self.dilation, self.groups = geom.stride[1], geom.dilation[1], groups
        self.padding, self.padding_mode = padding, padding_mode
        self._pad_ends = geom.ends  # (left, right), for the padding modes other than zeros
        self.output_size = out_length = geom.out_length
        factory = {"device": device, "dtype": dtype}
        self.weight = nn.Parameter(torch.empty(
            (out_channels, out_length, in_channels // groups, kernel_size), **factory))
        if bias:
            self.bias = nn.Parameter(torch.empty((out_channels, out_length), **factory))
        else:
            self.register_parameter("bias", None)
        self.reset_parameters()

    def reset_parameters(self):
        """Uniform in ``±1/sqrt(fan_in)``, ``fan_in = C_in/groups * k``."""
        _uniform_((self.weight, self.bias), self.in_channels // self.groups * self.kernel_size)

    def forward(self, input: Tensor) -> Tensor:
        if isinstance(input, Tensor) and input.shape[-1] != self.input_size:
            raise ValueError(
                f"LocallyConnected1d was built for inputs of length L = {self.input_size} "
                f"(input_size), got shape {tuple(input.shape)}: its weights are tied to output "
                "positions, so the input length is fixed")
        padding = self.padding
        if self.padding_mode != "zeros":
            input = nn.functional.pad(input, self._pad_ends, mode=self.padding_mode)
            padding = 0
        return local_conv1d(input, self.weight, self.bias, self.stride, padding, self.dilation,
                            self.groups)

    def extra_repr(self):
        s = (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
             f"input_size={self.input_size}, output_size={self.output_size}, "
             f"stride={self.stride}")
        return s + _repr_options(self, 0, 1)


# gpuconv.conv_transpose2d / gpuconv.local_conv_transpose2d send tensors that require grad here.
register_autograd("conv_transpose2d", conv_transpose2d)
register_autograd("local_conv_transpose2d", local_conv_transpose2d)
