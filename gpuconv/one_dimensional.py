"""One-dimensional convolutions on ``(N, C, L)``: :func:`conv1d` and :func:`local_conv1d`.

A 1-D convolution is a 2-D one whose input, kernel and output have a height of one: both
functions view their arrays with a unit height axis (views, never copies: NumPy, CuPy and
PyTorch index with ``None``, Numba device arrays reshape) and make one call of
:func:`gpuconv.conv2d` / :func:`gpuconv.local_conv2d`, so they run the 2-D kernels with the
2-D call's geometry. The arguments take PyTorch's 1-D forms (an int or a 1-tuple; padding
also ``"valid"`` or ``"same"``) and are checked here, in 1-D terms, before the 2-D call::

    L_out = (L + 2 * p - d * (k - 1) - 1) // s + 1
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from .conv import conv2d, local_conv2d
from .device import numba_device_view
from .geometry import _is_int, get_conv_outsize, shape_in

__all__ = ["conv1d", "local_conv1d", "geometry_1d", "Geometry1d"]

_SHARED_LAYOUT = "(C_out, C_in/groups, k)"
_LOCAL_LAYOUT = "(C_out, L_out, C_in/groups, k)"


def _single(value, name, minimum):
    """An int or a 1-tuple of one int, ``>= minimum``."""
    if type(value) is int and value >= minimum:  # the common case, first
        return value
    if isinstance(value, (tuple, list)) and len(value) == 1:
        value = value[0]
    if not _is_int(value):
        raise TypeError(f"{name} must be an int or a 1-tuple of an int, got {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value!r}")
    return int(value)


class Geometry1d(NamedTuple):
    """A checked 1-D call: the 2-D call's ``stride``, ``padding`` and ``dilation``, the output
    length, and the zeros at the two ``ends`` ``(left, right)``."""

    stride: tuple
    padding: object
    dilation: tuple
    out_length: int
    ends: tuple


def geometry_1d(x_shape, weight_shape, local, stride=1, padding=0, dilation=1, groups=1):
    """Check a 1-D call's shapes and arguments in 1-D terms.

    ``x_shape`` is ``(N, C_in, L)`` or ``(C_in, L)``; ``weight_shape`` ``(C_out, C_in/groups,
    k)``, or for ``local`` ``(C_out, L_out, C_in/groups, k)``. Returns a :class:`Geometry1d`
    whose 2-D arguments are ``(1, s)``, ``(0, p)`` / ``"valid"`` / ``"same"`` (which the 2-D
    call resolves to the same zeros at the ends) and ``(1, d)``. Raises
    ``ValueError``/``TypeError`` naming the argument.
    """
    x_shape, weight_shape = tuple(x_shape), tuple(weight_shape)
    if len(x_shape) not in (2, 3):
        raise ValueError(f"x must be 3-D (N, C_in, L) or 2-D (C_in, L), got shape {x_shape}")
    layout = _LOCAL_LAYOUT if local else _SHARED_LAYOUT
    rank = 4 if local else 3
    if len(weight_shape) != rank:
        raise ValueError(f"weight must be {rank}-D {layout}, got shape {weight_shape}")
    c_in, length = x_shape[-2:]
    kernel = weight_shape[-1]
    if length < 1:
        raise ValueError(f"x must have L >= 1, got shape {x_shape}")
    if kernel < 1:
        raise ValueError(f"weight must have k >= 1 {layout}, got shape {weight_shape}")
    stride = _single(stride, "stride", 1)
    dilation = _single(dilation, "dilation", 1)
    if type(groups) is not int and (isinstance(groups, bool) or not _is_int(groups)):
        raise TypeError(f"groups must be an int, got {groups!r}")
    if groups < 1:
        raise ValueError(f"groups must be >= 1, got {groups}")
    c_out = weight_shape[0]
    if c_in % groups:
        raise ValueError(f"groups={groups} must divide the input channels C_in={c_in}")
    if c_out % groups:
        raise ValueError(f"groups={groups} must divide the output channels C_out={c_out}")
    if weight_shape[-2] * groups != c_in:
        raise ValueError(
            f"weight has C_in/groups={weight_shape[-2]} but x has C_in={c_in} with "
            f"groups={groups} (weight must be {layout} with C_in/groups={c_in // groups}), got "
            f"weight shape {weight_shape}")
    if isinstance(padding, str):
        word = padding = padding.lower()
        if word == "valid":
            left = right = 0
        elif word == "same":
            if stride != 1:
                raise ValueError(f"padding='same' requires stride 1, got stride={stride}; give "
                                 "explicit padding for strided convolutions")
            total = dilation * (kernel - 1)
            left, right = total // 2, total - total // 2  # the odd one at the end, as PyTorch
        else:
            raise ValueError(f"padding must be an int, a 1-tuple, 'valid' or 'same', got "
                             f"{padding!r}")
    else:
        try:
            left = right = _single(padding, "padding", 0)
        except TypeError:
            raise TypeError(f"padding must be an int, a 1-tuple, 'valid' or 'same', got "
                            f"{padding!r}") from None
        padding = (0, left)
    out_length = get_conv_outsize(length, kernel, stride, left + right, dilation)
    if out_length < 1:
        raise ValueError(
            f"kernel does not fit in the padded input: L={length}, padding (left, right)="
            f"{(left, right)}, kernel {kernel}, dilation {dilation} gives L_out={out_length}")
    if local and weight_shape[1] != out_length:
        raise ValueError(
            f"weight holds kernels for L_out={weight_shape[1]} but x of L={length} with this "
            f"stride/padding/dilation gives L_out={out_length} (weight must be {layout} = "
            f"{(c_out, out_length) + weight_shape[2:]})")
    return Geometry1d((1, stride), padding, (1, dilation), out_length, (left, right))


# geometry_1d's results for calls that passed it, keyed by shapes and plain int / str
# arguments (``True`` equals ``1`` as a key, so other types are checked every time).
_CHECKED = {}


def _checked(x_shape, weight_shape, local, stride, padding, dilation, groups):
    plain = (type(stride) is int and type(dilation) is int and type(groups) is int
             and type(padding) in (int, str))
    key = (x_shape, weight_shape, local, stride, padding, dilation, groups) if plain else None
    geom = _CHECKED.get(key) if plain else None
    if geom is None:
        geom = geometry_1d(x_shape, weight_shape, local, stride, padding, dilation, groups)
        if plain:
            if len(_CHECKED) > 512:
                _CHECKED.clear()
            _CHECKED[key] = geom
    return geom


def _array(value, name):
    if hasattr(value, "shape"):
        return value
    try:
        array = np.asarray(value)
    except Exception as exc:
        raise TypeError(f"{name} must be an array, got {type(value).__name__}") from exc
    if array.dtype == object:
        raise TypeError(f"{name} must be an array, got {type(value).__name__}")
    return array


def _view(array, index, shape):
    """``array[index]`` (a view), or for Numba device arrays, which do not index with None,
    a view as ``shape`` (:func:`gpuconv.device.numba_device_view`, strided ones too)."""
    if type(array) is np.ndarray:
        return array[index]
    if getattr(array, "__cuda_ndarray__", False):
        return numba_device_view(array, shape)
    if not hasattr(array, "__getitem__"):
        return array.reshape(shape)
    try:
        return array[index]
    except (TypeError, IndexError, ValueError, NotImplementedError):  # other array kinds
        return array.reshape(shape)


def _unit_height(array):
    """``(..., L)`` viewed as ``(..., 1, L)``."""
    if type(array) is np.ndarray:  # the common case, first
        return array[..., None, :]
    shape = tuple(array.shape)
    return _view(array, (Ellipsis, None, slice(None)), shape[:-1] + (1,) + shape[-1:])


def _drop_height(array):
    """``(..., 1, L)`` viewed as ``(..., L)``."""
    if type(array) is np.ndarray:
        return array[..., 0, :]
    shape = tuple(array.shape)
    return _view(array, (Ellipsis, 0, slice(None)), shape[:-2] + shape[-1:])


def _check_bias(bias, c_out, out_length, local):
    if bias is None:
        return
    allowed = [(c_out,)] + ([(c_out, out_length)] if local else [])
    if not shape_in(tuple(bias.shape), allowed):
        kinds = " or ".join(str(a) for a in allowed)
        raise ValueError(f"bias must have shape {kinds}, got {tuple(bias.shape)}")


def conv1d(x, weight, bias=None, stride=1, padding=0, dilation=1, groups=1, *, device="auto"):
    """1-D convolution with shared weights (``torch.nn.functional.conv1d``).

    ::

        y[n, o, i] = bias[o] + sum_{c, u} weight[o, c, u] * x_padded[n, g(o) * C_in/groups + c, i * s + u * d]

    Args:
        x: ``(N, C_in, L)`` or ``(C_in, L)``; dtypes, array kinds and devices as
            :func:`gpuconv.conv2d`.
        weight: ``(C_out, C_in/groups, k)``, same dtype as ``x``.
        bias: ``None`` or ``(C_out,)``.
        stride, dilation: int or 1-tuple, >= 1.
        padding: int or 1-tuple >= 0 (zeros at both ends), ``"valid"`` or ``"same"`` (stride
            1; an odd total puts the extra zero at the end).
        groups: divides ``C_in`` and ``C_out``.
        device: ``"auto"``, ``"cpu"`` or ``"cuda"``.

    Returns:
        ``(N, C_out, L_out)`` (``(C_out, L_out)`` for 2-D ``x``) of the kind and dtype of
        ``x``, ``L_out = (L + 2 * p - d * (k - 1) - 1) // s + 1``. Tensors that require grad
        record the autograd graph, as in :func:`gpuconv.conv2d`.

    >>> import numpy as np, gpuconv
    >>> x = np.arange(5, dtype=np.float64).reshape(1, 1, 5)
    >>> gpuconv.conv1d(x, np.ones((1, 1, 2)), device="cpu")
    array([[[1., 3., 5., 7.]]])
    """
    x, weight = _array(x, "x"), _array(weight, "weight")
    stride, padding, dilation, out_length, _ = _checked(tuple(x.shape), tuple(weight.shape),
                                                        False, stride, padding, dilation, groups)
    if bias is not None:
        bias = _array(bias, "bias")
        _check_bias(bias, weight.shape[0], out_length, False)
    y = conv2d(_unit_height(x), _unit_height(weight), bias, stride, padding, dilation, groups,
               device=device)
    return _drop_height(y)


def local_conv1d(x, weight, bias=None, stride=1, padding=0, dilation=1, groups=1, *,
                 device="auto"):
    """Locally connected (unshared) 1-D convolution: a different kernel at every output
    position (Keras' ``LocallyConnected1D``).

    ::

        y[n, o, i] = bias[o(, i)] + sum_{c, u} weight[o, i, c, u] * x_padded[n, g(o) * C_in/groups + c, i * s + u * d]

    Args:
        x: ``(N, C_in, L)`` or ``(C_in, L)``.
        weight: ``(C_out, L_out, C_in/groups, k)``, same dtype as ``x``.
        bias: ``None``, ``(C_out,)`` (one per map) or ``(C_out, L_out)`` (one per position).
        stride, padding, dilation, groups, device: as :func:`conv1d`.

    Returns:
        ``(N, C_out, L_out)`` (``(C_out, L_out)`` for 2-D ``x``), ``L_out`` as
        :func:`conv1d`.

    >>> import numpy as np, gpuconv
    >>> x = np.arange(4, dtype=np.float64).reshape(1, 1, 4)
    >>> w = np.array([1.0, 10.0, 100.0]).reshape(1, 3, 1, 1) * np.ones((1, 3, 1, 2))
    >>> gpuconv.local_conv1d(x, w, device="cpu")
    array([[[  1.,  30., 500.]]])
    """
    x, weight = _array(x, "x"), _array(weight, "weight")
    stride, padding, dilation, out_length, _ = _checked(tuple(x.shape), tuple(weight.shape),
                                                        True, stride, padding, dilation, groups)
    if bias is not None:
        bias = _array(bias, "bias")
        _check_bias(bias, weight.shape[0], out_length, True)
        if len(bias.shape) == 2:
            bias = _unit_height(bias)
    c_out, _, c_in_group, kernel = weight.shape
    weight = _view(weight, (slice(None), None, slice(None), slice(None), None, slice(None)),
                   (c_out, 1, out_length, c_in_group, 1, kernel))
    y = local_conv2d(_unit_height(x), weight, bias, stride, padding, dilation, groups,
                     device=device)
    return _drop_height(y)
