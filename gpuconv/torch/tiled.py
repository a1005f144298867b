"""PyTorch layer of the tiled convolution: :func:`tiled_conv2d` and :class:`TiledConv2d`.

Reached as ``gpuconv.torch.<name>``; built on :mod:`.layers`' machinery, with three custom
operators of its own, each with a fake kernel for ``torch.compile`` and the autograd formula
of the other operators (:func:`.layers._register_autograd`)::

    gpuconv::tiled_conv2d(Tensor x, Tensor weight, Tensor? bias, int[] stride, int[] padding,
                          int[] dilation, int groups, str tiling) -> Tensor
    gpuconv::tiled_conv2d_input(SymInt[] input_size, Tensor weight, Tensor grad_output, ...,
                                str tiling) -> Tensor
    gpuconv::tiled_conv2d_weight(Tensor input, SymInt[] weight_size, Tensor grad_output, ...,
                                 str tiling) -> Tensor

Calls always go through the operators (the dispatcher's few microseconds per call; the
shared and unshared layers' eager shortcut is not taken).
"""

import math
from typing import Optional

import torch
from torch import Tensor, nn

from ..geometry import TILINGS, get_conv_outsize, pair
from ..ops import register_autograd
from .layers import (_GEOMETRY, _autocast, _check_fake, _check_padding_mode, _check_tensors,
                     _define, _explicit_geometry, _geometry_args, _pad_input,
                     _register_autograd, _repr_options, _run, check_autograd_call)

__all__ = ["tiled_conv2d", "TiledConv2d"]


def _forward(device, x, weight, bias, stride, padding, dilation, groups, tiling):
    return _run("tiled_conv2d", device, {"x": x, "weight": weight, "bias": bias}, stride,
                padding, dilation, groups, sizes={"tiling": tiling})


def _input_grad(device, input_size, weight, grad_output, stride, padding, dilation, groups,
                tiling):
    return _run("tiled_conv2d_input", device, {"grad_output": grad_output, "weight": weight},
                stride, padding, dilation, groups,
                sizes={"input_size": tuple(input_size), "tiling": tiling})


def _weight_grad(device, input, weight_size, grad_output, stride, padding, dilation, groups,
                 tiling):
    return _run("tiled_conv2d_weight", device, {"input": input, "grad_output": grad_output},
                stride, padding, dilation, groups,
                sizes={"weight_size": tuple(weight_size), "tiling": tiling})


_tiled_conv2d_op = _define(
    "tiled_conv2d", f"(Tensor x, Tensor weight, Tensor? bias, {_GEOMETRY}, str tiling) -> Tensor",
    _forward)
_tiled_conv2d_input_op = _define(
    "tiled_conv2d_input",
    f"(SymInt[] input_size, Tensor weight, Tensor grad_output, {_GEOMETRY}, str tiling) -> Tensor",
    _input_grad)
_tiled_conv2d_weight_op = _define(
    "tiled_conv2d_weight",
    f"(Tensor input, SymInt[] weight_size, Tensor grad_output, {_GEOMETRY}, str tiling) -> Tensor",
    _weight_grad)


@_tiled_conv2d_op.register_fake
def _(x, weight, bias, stride, padding, dilation, groups, tiling):
    _check_fake("x", x, "weight", weight, 6)
    out_h = get_conv_outsize(x.shape[2], weight.shape[4], stride[0], padding[0] + padding[1],
                             dilation[0])
    out_w = get_conv_outsize(x.shape[3], weight.shape[5], stride[1], padding[2] + padding[3],
                             dilation[1])
    return x.new_empty((x.shape[0], weight.shape[0], out_h, out_w))


@_tiled_conv2d_input_op.register_fake
def _(input_size, weight, grad_output, stride, padding, dilation, groups, tiling):
    _check_fake("grad_output", grad_output, "weight", weight, 6)
    return grad_output.new_empty(input_size)


@_tiled_conv2d_weight_op.register_fake
def _(input, weight_size, grad_output, stride, padding, dilation, groups, tiling):
    _check_fake("input", input, "grad_output", grad_output, 4)
    torch._check(len(weight_size) == 6, lambda: "weight_size must have 6 entries")
    return input.new_empty(weight_size)


def _slot_matrix(size, tiles, tiling, like):
    """``(tiles, size)``: 1 where output row (column) ``i`` uses slot ``s``, else 0."""
    index = torch.arange(size, device=like.device)
    slots = index % tiles if tiling == "periodic" else index * tiles // size
    return (slots[None, :] == torch.arange(tiles, device=like.device)[:, None]).to(like.dtype)


def _bias_grad(grad, bias_shape, geometry):
    """The gradient of a bias per slot ``(C_out, T_h, T_w)``: each slot sums its positions
    (a product with 0/1 matrices, deterministic on either device). The batch is summed
    first, and the products taken, in float64: on CUDA the products are matrix products,
    which TF32 (``torch.set_float32_matmul_precision("high")``) or half-precision
    reductions would otherwise round."""
    tiling = geometry[-1]
    summed = grad.sum(0, dtype=torch.float64)
    rows = _slot_matrix(grad.shape[2], bias_shape[1], tiling, summed)
    cols = _slot_matrix(grad.shape[3], bias_shape[2], tiling, summed)
    return torch.einsum("oij,si,tj->ost", summed, rows, cols).to(grad.dtype)


_register_autograd((_tiled_conv2d_op, _tiled_conv2d_input_op, _tiled_conv2d_weight_op),
                   _bias_grad)


def _check_tiling(tiling):
    if not isinstance(tiling, str) or tiling not in TILINGS:
        raise ValueError(f"tiling must be one of {', '.join(map(repr, TILINGS))}, got "
                         f"{tiling!r}")


def tiled_conv2d(x: Tensor, weight: Tensor, bias: Optional[Tensor] = None, stride=1, padding=0,
                 dilation=1, groups=1, *, tiling="periodic") -> Tensor:
    """Tiled (partly shared) 2-D convolution, differentiable; see :func:`gpuconv.tiled_conv2d`.

    Args:
        x: ``(N, C_in, H, W)`` or ``(C_in, H, W)``, dtypes as :func:`gpuconv.torch.conv2d`.
        weight: ``(C_out, T_h, T_w, C_in/groups, kH, kW)``: ``T_h x T_w`` kernel slots.
        bias: ``None``, ``(C_out,)`` or ``(C_out, T_h, T_w)`` (one per slot).
        stride, padding, dilation, groups: as :func:`gpuconv.torch.conv2d`.
        tiling: ``"periodic"`` (slot ``(i mod T_h, j mod T_w)``) or ``"blocks"`` (slot
            ``(floor(i T_h / H_out), floor(j T_w / W_out))``).

    Returns:
        ``(N, C_out, H_out, W_out)`` (``(C_out, H_out, W_out)`` for 3-D ``x``).
    """
    x, weight, bias = _autocast(x, weight, bias)
    _check_tensors("tiled_conv2d", x, weight, bias)
    _check_tiling(tiling)
    geometry = _geometry_args(weight, stride, padding, dilation, groups)
    unbatched = x.dim() == 3
    if unbatched:
        x = x.unsqueeze(0)
    y = _tiled_conv2d_op(x, weight, bias, *geometry, tiling)
    return y.squeeze(0) if unbatched else y


class TiledConv2d(nn.Module):
    """A tiled convolution layer: ``tiles = (T_h, T_w)`` kernels, each shared by the output
    positions of its slot; ``tiles = 1`` is a convolution, ``tiles`` equal to the output size
    a locally connected layer. Unlike :class:`gpuconv.torch.LocallyConnected2d` it takes
    inputs of any size whose output is at least ``tiles`` (the parameters depend on the
    output size only through ``tiles``).

    Args:
        in_channels, out_channels, kernel_size, stride, padding, dilation, groups,
            padding_mode: as ``torch.nn.Conv2d``.
        tiles: ``(T_h, T_w)`` or an int.
        tiling: ``"periodic"`` or ``"blocks"`` (see :func:`gpuconv.tiled_conv2d`).
        bias: one learnable bias per output map and slot, ``(C_out, T_h, T_w)``.

    Attributes:
        weight: ``(C_out, T_h, T_w, C_in/groups, kH, kW)``, each slot initialised as
            ``torch.nn.Conv2d`` initialises its kernel (uniform in ``±1/sqrt(fan_in)``).
        bias: ``(C_out, T_h, T_w)`` or ``None``, uniform in ``±1/sqrt(fan_in)``.

    >>> import torch, gpuconv.torch
    >>> layer = gpuconv.torch.TiledConv2d(3, 8, 5, tiles=2)
    >>> layer  # doctest: +NORMALIZE_WHITESPACE
    TiledConv2d(3, 8, kernel_size=(5, 5), tiles=(2, 2), tiling='periodic', stride=(1, 1),
                params=2,432)
    >>> layer(torch.randn(2, 3, 32, 32)).shape
    torch.Size([2, 8, 28, 28])
    """

    def __init__(self, in_channels, out_channels, kernel_size, tiles, tiling="periodic",
                 stride=1, padding=0, dilation=1, groups=1, bias=True, padding_mode="zeros",
                 device=None, dtype=None):
        super().__init__()
        _check_padding_mode(padding_mode)
        _check_tiling(tiling)
        self.padding_mode = padding_mode
        kernel_size = pair(kernel_size, "kernel_size", 1)
        tiles = pair(tiles, "tiles", 1)
        stride = pair(stride, "stride", 1)
        dilation = pair(dilation, "dilation", 1)
        if isinstance(padding, int) and not isinstance(padding, bool):
            padding = (padding, padding)
        elif isinstance(padding, (tuple, list)):
            padding = tuple(tuple(p) if isinstance(p, (tuple, list)) else p for p in padding)
        elif isinstance(padding, str):
            padding = padding.lower()
        _explicit_geometry(kernel_size, stride, padding, dilation, groups)  # the checks
        for name, count in (("in_channels", in_channels), ("out_channels", out_channels)):
            if count % groups:
                raise ValueError(f"groups={groups} must divide {name}={count}")
        self.in_channels, self.out_channels = in_channels, out_channels
        self.kernel_size, self.tiles, self.tiling = kernel_size, tiles, tiling
        self.stride, self.padding, self.dilation, self.groups = stride, padding, dilation, groups
        factory = {"device": device, "dtype": dtype}
        self.weight = nn.Parameter(torch.empty(
            (out_channels, *tiles, in_channels // groups, *kernel_size), **factory))
        if bias:
            self.bias = nn.Parameter(torch.empty((out_channels, *tiles), **factory))
        else:
            self.register_parameter("bias", None)
        self.reset_parameters()

    def reset_parameters(self):
        """Uniform in ``±1/sqrt(fan_in)``, weight and bias: ``torch.nn.Conv2d``'s default
        with its fan-in."""
        fan_in = self.in_channels // self.groups * self.kernel_size[0] * self.kernel_size[1]
        if fan_in == 0:
            return
        bound = 1 / math.sqrt(fan_in)
        nn.init.uniform_(self.weight, -bound, bound)
        if self.bias is not None:
            nn.init.uniform_(self.bias, -bound, bound)

    def forward(self, input: Tensor) -> Tensor:
        padding = self.padding
        if self.padding_mode != "zeros":
            input = _pad_input(input, padding, self.kernel_size, self.stride, self.dilation,
                               self.padding_mode)
            padding = 0
        return tiled_conv2d(input, self.weight, self.bias, self.stride, padding, self.dilation,
                            self.groups, tiling=self.tiling)

    def extra_repr(self):
        s = (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
             f"tiles={self.tiles}, tiling={self.tiling!r}, stride={self.stride}")
        return s + _repr_options(self, (0, 0), (1, 1))

    @classmethod
    def from_conv2d(cls, conv, tiles, tiling="periodic"):
        """A tiled layer holding ``conv``'s kernel (and bias) in every slot: its output
        equals ``conv``'s until training unties the slots. ``conv`` is a
        ``torch.nn.Conv2d`` (or :class:`gpuconv.torch.Conv2d`), any ``padding_mode``;
        parameters are copies on ``conv``'s device, in its dtype."""
        if not isinstance(conv, nn.Conv2d):
            raise TypeError(f"conv must be a torch.nn.Conv2d, got {type(conv).__name__}")
        layer = cls(conv.in_channels, conv.out_channels, conv.kernel_size, tiles, tiling,
                    stride=conv.stride, padding=conv.padding, dilation=conv.dilation,
                    groups=conv.groups, bias=conv.bias is not None,
                    padding_mode=conv.padding_mode, device=conv.weight.device,
                    dtype=conv.weight.dtype)
        with torch.no_grad():
            layer.weight.copy_(conv.weight[:, None, None].expand(layer.weight.shape))
            if conv.bias is not None:
                layer.bias.copy_(conv.bias[:, None, None].expand(layer.bias.shape))
        return layer


def autograd_forward(op_name, arrays, stride, padding, dilation, groups, device, tiling):
    """:func:`gpuconv.tiled_conv2d` on tensors that require grad: the same call through the
    differentiable operators, on the tensors' device."""
    check_autograd_call(arrays, device)
    return tiled_conv2d(arrays["x"], arrays["weight"], arrays["bias"], stride, padding,
                        dilation, groups, tiling=tiling)


# gpuconv.tiled_conv2d sends tensors that require grad here.
register_autograd("tiled_forward", autograd_forward)
