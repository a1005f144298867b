"""Geometry of a 2-D convolution: argument normalisation and output sizes.

Notation used across the package, stated here once (:class:`ConvGeometry` spells the names
out; the short names appear only inside kernels, CPU and CUDA alike)::

    n         batch size                   c_I, c_O    input, output channels
    h, w      input height, width          c_Ig, c_Og  input, output channels per group
    k_H, k_W  kernel height, width         g           groups
    h_O, w_O  output height, width         P           h_O * w_O output positions
    s_H, s_W  stride (stride_h, stride_w)  d_H, d_W    dilation (dilation_h, dilation_w)
    pt, pl    top and left padding (pad_top, pad_left; the bottom and right padding only
              bound the output size)

Every piece of the package that needs an output size calls :func:`get_conv_outsize`.
"""

from __future__ import annotations

import functools
import numbers
from dataclasses import dataclass

__all__ = ["ConvGeometry", "TiledGeometry", "TILINGS", "get_conv_outsize",
           "get_conv_transpose_outsize", "pair", "resolve_padding", "conv_geometry",
           "tile_slots", "tiled_geometry"]


def get_conv_outsize(size, kernel, stride, pad_total, dilation=1):
    """Output length of a convolution along one axis.

    ``out = (size + pad_total - dilation * (kernel - 1) - 1) // stride + 1``

    ``pad_total`` is the sum of the padding on both sides. The result may be zero or
    negative when the dilated kernel does not fit in the padded input; callers decide
    whether that is an error.
    """
    return (size + pad_total - dilation * (kernel - 1) - 1) // stride + 1


def get_conv_transpose_outsize(size, kernel, stride, pad, dilation=1, output_padding=0):
    """Output length of a transposed convolution along one axis (PyTorch's formula).

    ``out = (size - 1) * stride - 2 * pad + dilation * (kernel - 1) + output_padding + 1``

    ``pad`` is the padding on each side of the convolution it transposes (the rows it crops
    from each end of the full output), ``output_padding`` the rows added at the end. For
    ``output_padding < stride`` this is the longest input whose convolution with ``kernel``,
    ``stride``, ``pad`` and ``dilation`` has length ``size``: ``get_conv_outsize(out, kernel,
    stride, 2 * pad, dilation) == size``.
    """
    return (size - 1) * stride - 2 * pad + dilation * (kernel - 1) + output_padding + 1


def shape_in(shape, allowed):
    """Whether ``shape`` equals one of the tuples in ``allowed``, compared size by size.

    Written out (not ``tuple(shape) in allowed``) so that ``torch.compile`` traces it with
    symbolic sizes: each ``==`` becomes a guard, where a tuple's membership test cannot.
    """
    for candidate in allowed:
        if len(shape) == len(candidate) and all(a == b for a, b in zip(shape, candidate)):
            return True
    return False


def _is_int(value):
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def pair(value, name, minimum):
    """Normalise an int or a pair of ints to a tuple, checking ``>= minimum``.

    Raises ``TypeError`` for non-integers and ``ValueError`` for values out of range,
    naming the argument.
    """
    if _is_int(value):
        items = (int(value), int(value))
    elif isinstance(value, (tuple, list)) and len(value) == 2 and all(_is_int(v) for v in value):
        items = (int(value[0]), int(value[1]))
    else:
        raise TypeError(f"{name} must be an int or a pair of ints, got {value!r}")
    if items[0] < minimum or items[1] < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value!r}")
    return items


def resolve_padding(padding, kernel_size, stride, dilation):
    """Padding as ``(top, bottom, left, right)``.

    ``padding`` is an int, a pair ``(pad_h, pad_w)``, a pair of pairs
    ``((top, bottom), (left, right))`` (explicit asymmetric padding, as JAX's
    ``lax.conv_general_dilated``, Theano and TensorFlow take it), ``"valid"`` (no padding) or
    ``"same"`` (output size equals input size; stride 1 only), in any case. For ``"same"`` the total
    padding along an axis is ``dilation * (kernel - 1)``; an odd total puts the extra row
    (column) at the bottom (right), as PyTorch does.
    """
    if isinstance(padding, str):
        padding = padding.lower()  # "SAME" and "VALID", as TensorFlow and Keras spell them
        if padding == "valid":
            return (0, 0, 0, 0)
        if padding == "same":
            if stride != (1, 1):
                raise ValueError(
                    f"padding='same' requires stride 1, got stride={stride}; "
                    "give explicit padding for strided convolutions"
                )
            total_h = dilation[0] * (kernel_size[0] - 1)
            total_w = dilation[1] * (kernel_size[1] - 1)
            return (total_h // 2, total_h - total_h // 2, total_w // 2, total_w - total_w // 2)
        raise ValueError(
            f"padding must be an int, a pair of ints, 'valid' or 'same', got {padding!r}"
        )
    if (isinstance(padding, (tuple, list)) and len(padding) == 2
            and all(isinstance(p, (tuple, list)) for p in padding)):
        top, bottom = pair(padding[0], "padding[0] (top, bottom)", 0)
        left, right = pair(padding[1], "padding[1] (left, right)", 0)
        return (top, bottom, left, right)
    pad_h, pad_w = pair(padding, "padding", 0)
    return (pad_h, pad_h, pad_w, pad_w)


@dataclass(frozen=True)
class ConvGeometry:
    """Everything a kernel needs to know about one convolution's shapes."""

    batch: int
    in_channels: int
    in_height: int
    in_width: int
    out_channels: int
    kernel_height: int
    kernel_width: int
    stride_h: int
    stride_w: int
    pad_top: int
    pad_bottom: int
    pad_left: int
    pad_right: int
    dilation_h: int
    dilation_w: int
    groups: int
    out_height: int
    out_width: int

    @property
    def in_channels_per_group(self):
        return self.in_channels // self.groups

    @property
    def out_channels_per_group(self):
        return self.out_channels // self.groups

    @property
    def input_shape(self):
        return (self.batch, self.in_channels, self.in_height, self.in_width)

    @property
    def output_shape(self):
        return (self.batch, self.out_channels, self.out_height, self.out_width)

    @property
    def macs(self):
        """Multiply-adds of the forward pass (the same for shared and unshared layers)."""
        return (self.batch * self.out_channels * self.out_height * self.out_width
                * self.in_channels_per_group * self.kernel_height * self.kernel_width)

    @property
    def flops(self):
        """``2 * N * C_out * H_out * W_out * (C_in / groups) * kH * kW``."""
        return 2 * self.macs

    def shared_weight_shape(self):
        return (self.out_channels, self.in_channels_per_group,
                self.kernel_height, self.kernel_width)

    def local_weight_shape(self):
        return (self.out_channels, self.out_height, self.out_width,
                self.in_channels_per_group, self.kernel_height, self.kernel_width)


def conv_geometry(x_shape, kernel_size, out_channels, stride=1, padding=0, dilation=1,
                  groups=1):
    """Validate the geometry arguments and return a :class:`ConvGeometry`.

    ``x_shape`` is ``(N, C_in, H, W)``; ``kernel_size`` is ``(kH, kW)``. Raises
    ``ValueError``/``TypeError`` naming the offending argument.
    """
    batch, in_channels, in_height, in_width = (int(v) for v in x_shape)
    kernel_height, kernel_width = (int(v) for v in kernel_size)
    stride = pair(stride, "stride", 1)
    dilation = pair(dilation, "dilation", 1)
    if not _is_int(groups):
        raise TypeError(f"groups must be an int, got {groups!r}")
    groups = int(groups)
    if groups < 1:
        raise ValueError(f"groups must be >= 1, got {groups}")
    if in_channels % groups:
        raise ValueError(
            f"groups={groups} must divide the input channels C_in={in_channels}")
    if out_channels % groups:
        raise ValueError(
            f"groups={groups} must divide the output channels C_out={out_channels}")
    top, bottom, left, right = resolve_padding(
        padding, (kernel_height, kernel_width), stride, dilation)
    out_height = get_conv_outsize(in_height, kernel_height, stride[0], top + bottom, dilation[0])
    out_width = get_conv_outsize(in_width, kernel_width, stride[1], left + right, dilation[1])
    if out_height < 1 or out_width < 1:
        raise ValueError(
            "kernel does not fit in the padded input: input "
            f"{in_height}x{in_width}, padding (top, bottom, left, right)="
            f"{(top, bottom, left, right)}, kernel {kernel_height}x{kernel_width}, "
            f"dilation {dilation} gives output {out_height}x{out_width}")
    return ConvGeometry(
        batch, in_channels, in_height, in_width, int(out_channels),
        kernel_height, kernel_width, stride[0], stride[1], top, bottom, left, right,
        dilation[0], dilation[1], groups, out_height, out_width)


#: How a tiled convolution's output positions pick their kernel slot (see :func:`tile_slots`).
TILINGS = ("periodic", "blocks")


def tile_slots(out_size, tiles, tiling):
    """The kernel slot of each output row (or column) of a tiled convolution, a tuple.

    ``"periodic"``: position ``i`` uses slot ``i mod tiles`` (Le et al.'s tiled CNNs: units
    ``tiles`` apart share a kernel); ``"blocks"``: slot ``floor(i * tiles / out_size)``
    (``tiles`` near-equal contiguous regions, each sharing one kernel). ``tiles = 1`` is a
    convolution, ``tiles = out_size`` a locally connected layer, in both tilings.
    """
    if tiling == "periodic":
        return tuple(i % tiles for i in range(out_size))
    return tuple(i * tiles // out_size for i in range(out_size))


@dataclass(frozen=True)
class TiledGeometry(ConvGeometry):
    """A :class:`ConvGeometry` whose output positions share ``tile_height x tile_width``
    kernels (slots), assigned by ``tiling`` (one of :data:`TILINGS`; :func:`tile_slots`)."""

    tile_height: int
    tile_width: int
    tiling: str

    # (computed once per object: the kernels' wrappers read them on every call)
    @functools.cached_property
    def tiles(self):
        return (self.tile_height, self.tile_width)

    @functools.cached_property
    def shared(self):
        """One slot: the convolution of :attr:`untiled`."""
        return self.tiles == (1, 1)

    @functools.cached_property
    def unshared(self):
        """A slot per output position: the locally connected layer of :attr:`untiled`."""
        return self.tiles == (self.out_height, self.out_width)

    @functools.cached_property
    def untiled(self):
        """The plain :class:`ConvGeometry` of the same convolution."""
        return ConvGeometry(*(getattr(self, f) for f in ConvGeometry.__dataclass_fields__))

    def row_slots(self):
        return tile_slots(self.out_height, self.tile_height, self.tiling)

    def col_slots(self):
        return tile_slots(self.out_width, self.tile_width, self.tiling)

    def tiled_weight_shape(self):
        return (self.out_channels, self.tile_height, self.tile_width,
                self.in_channels_per_group, self.kernel_height, self.kernel_width)


def tiled_geometry(geom, tiles, tiling):
    """``geom`` with ``tiles = (T_h, T_w)`` kernel slots assigned by ``tiling``."""
    return TiledGeometry(*(getattr(geom, f) for f in ConvGeometry.__dataclass_fields__),
                         int(tiles[0]), int(tiles[1]), tiling)
