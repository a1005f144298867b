"""Transposed convolutions: :func:`conv_transpose2d` and :func:`local_conv_transpose2d`.

A transposed convolution is the adjoint of a convolution: it sends each input pixel back
through the windows of the convolution it transposes, which is what that convolution's input
gradient computes. Both functions here are one call of the input-gradient operations
(``conv2d_input`` and ``local_conv2d_input`` in :mod:`gpuconv.ops`), with the transposed
layer's input as the ``grad_output``; they add no kernels. Their own gradients are the
forward operations (:func:`conv_transpose2d_input` is a :func:`gpuconv.conv2d`,
:func:`conv_transpose2d_weight` a :func:`gpuconv.grad.conv2d_weight`, and the same for the
unshared pair); :mod:`gpuconv.grad` lists them beside the other gradients.

Notation, in the transposed layer's own terms: its input ``x`` is ``(N, C_in, H_in, W_in)``
(the output of the convolution it transposes), its output ``(N, C_out, H_out, W_out)`` (that
convolution's input), with :func:`gpuconv.geometry.get_conv_transpose_outsize`::

    H_out = (H_in - 1) * s_h - 2 * p_h + d_h * (kH - 1) + output_padding_h + 1

``output_padding`` lengthens the output at the bottom and right (the lengths a strided
convolution maps to one ``H_in``); PyTorch's rule: it must be smaller than the stride or the
dilation. Rows it adds past the last one any input pixel reaches (possible only when the
dilation exceeds the stride) hold zeros, plus the bias.

The bias, and those zero rows, come from one more call of the existing forward kernels: a
depthwise 1 x 1 convolution with unit weights, the bias, and zero padding at the bottom and
right (PyTorch tensors use PyTorch's own addition and padding instead).
"""

from __future__ import annotations

import dataclasses
import sys
from dataclasses import dataclass

import numpy as np

from .conv import _FLOAT_DTYPES, _records_autograd, _shape_arg, call, conv2d, local_conv2d
from .device import is_device_array
from .geometry import get_conv_transpose_outsize, pair, shape_in
from .ops import autograd

__all__ = ["conv_transpose2d", "local_conv_transpose2d", "conv_transpose2d_input",
           "conv_transpose2d_weight", "local_conv_transpose2d_input",
           "local_conv_transpose2d_weight", "TransposeGeometry", "transpose_geometry"]

_SHARED_LAYOUT = "(C_in, C_out/groups, kH, kW)"
_LOCAL_LAYOUT = "(C_in, H_in, W_in, C_out/groups, kH, kW)"


@dataclass(frozen=True)
class TransposeGeometry:
    """One transposed convolution's shapes, and the convolution whose input gradient it is.

    ``input_shape`` ``(N, C_in, H_in, W_in)`` and ``output_shape`` ``(N, C_out, H_out,
    W_out)`` are the transposed layer's (always batched here). The input gradient computes
    the first ``reached_shape`` rows and columns of the output, for a convolution with
    ``stride``, ``dilation``, ``groups`` and ``forward_padding`` ``((top, bottom), (left,
    right))`` over an input of that shape; ``extra`` rows and columns (bottom, right) follow,
    which no input pixel reaches.
    """

    input_shape: tuple
    output_shape: tuple
    stride: tuple
    padding: tuple
    output_padding: tuple
    dilation: tuple
    groups: int
    extra: tuple
    forward_padding: tuple

    @property
    def reached_shape(self):
        n, c, h, w = self.output_shape
        return (n, c, h - self.extra[0], w - self.extra[1])

    @property
    def reaches_output(self):
        """Whether any output pixel receives an input pixel (else the output is the bias)."""
        return min(self.reached_shape[2:]) >= 1

    @property
    def forward_padding_flat(self):
        """``[top, bottom, left, right]``, as gpuconv's PyTorch operators take padding."""
        (top, bottom), (left, right) = self.forward_padding
        return [top, bottom, left, right]


def _axis(size, kernel, stride, pad, dilation, output_padding):
    """(output length, extra rows, (top, bottom) padding of the transposed convolution)."""
    out = get_conv_transpose_outsize(size, kernel, stride, pad, dilation, output_padding)
    # The convolution over ``out - extra`` rows with padding (pad, bottom) must give ``size``
    # rows: 0 <= output_padding - extra + bottom - pad < stride, with bottom >= 0.
    extra = max(0, output_padding - pad - (stride - 1))
    bottom = max(0, pad - (output_padding - extra))
    return out, extra, (pad, bottom)


def transpose_geometry(x_shape, weight_shape, local, stride=1, padding=0, output_padding=0,
                       groups=1, dilation=1, x_name="x", weight_name="weight"):
    """Check a transposed convolution's shapes and arguments; its :class:`TransposeGeometry`.

    ``x_shape`` is ``(N, C_in, H_in, W_in)`` or ``(C_in, H_in, W_in)``; ``weight_shape``
    ``(C_in, C_out/groups, kH, kW)``, or for ``local`` ``(C_in, H_in, W_in, C_out/groups, kH,
    kW)``. Raises ``ValueError``/``TypeError`` naming the argument.
    """
    layout = _LOCAL_LAYOUT if local else _SHARED_LAYOUT
    x_shape, weight_shape = tuple(x_shape), tuple(weight_shape)
    if len(x_shape) not in (3, 4):
        raise ValueError(f"{x_name} must be 4-D (N, C_in, H_in, W_in) or 3-D (C_in, H_in, W_in), "
                         f"got shape {x_shape}")
    if len(x_shape) == 3:
        x_shape = (1,) + x_shape
    if min(x_shape[2:]) < 1:
        raise ValueError(f"{x_name} must have H_in and W_in >= 1, got shape {x_shape}")
    rank = 6 if local else 4
    if len(weight_shape) != rank:
        raise ValueError(f"{weight_name} must be {rank}-D {layout}, got shape {weight_shape}")
    if min(weight_shape[-2:]) < 1:
        raise ValueError(f"{weight_name} must have kH and kW >= 1 {layout}, got shape "
                         f"{weight_shape}")
    if isinstance(groups, bool) or not isinstance(groups, (int, np.integer)):
        raise TypeError(f"groups must be an int, got {groups!r}")
    groups = int(groups)
    if groups < 1:
        raise ValueError(f"groups must be >= 1, got {groups}")
    n, c_in, h_in, w_in = (int(v) for v in x_shape)
    if weight_shape[0] != c_in:
        raise ValueError(f"{weight_name} has C_in={weight_shape[0]} but {x_name} has "
                         f"C_in={c_in} ({weight_name} must be {layout}), got {weight_name} "
                         f"shape {weight_shape}")
    if c_in % groups:
        raise ValueError(f"groups={groups} must divide the input channels C_in={c_in}")
    if local and weight_shape[1:3] != (h_in, w_in):
        raise ValueError(
            f"{weight_name} holds kernels for a {weight_shape[1]}x{weight_shape[2]} input but "
            f"{x_name} is {h_in}x{w_in} ({weight_name} must be {layout}), got {weight_name} "
            f"shape {weight_shape}")
    stride = pair(stride, "stride", 1)
    dilation = pair(dilation, "dilation", 1)
    padding = pair(padding, "padding", 0)
    output_padding = pair(output_padding, "output_padding", 0)
    for axis in (0, 1):
        if output_padding[axis] >= max(stride[axis], dilation[axis]):
            raise ValueError(
                f"output_padding must be smaller than either stride or dilation, got "
                f"output_padding={output_padding} with stride={stride} and dilation={dilation}")
    kernel = weight_shape[-2:]
    c_out = int(weight_shape[-3]) * groups
    out_h, extra_h, pad_h = _axis(h_in, kernel[0], stride[0], padding[0], dilation[0],
                                  output_padding[0])
    out_w, extra_w, pad_w = _axis(w_in, kernel[1], stride[1], padding[1], dilation[1],
                                  output_padding[1])
    if out_h < 1 or out_w < 1:
        raise ValueError(
            f"the output would be {out_h}x{out_w}: the padding {padding} crops more than the "
            f"{x_name} {h_in}x{w_in} spreads to with kernel {kernel[0]}x{kernel[1]}, stride "
            f"{stride} and dilation {dilation}; H_out = (H_in - 1) * stride - 2 * padding + "
            "dilation * (kH - 1) + output_padding + 1 must be >= 1")
    return TransposeGeometry((n, c_in, h_in, w_in), (n, c_out, out_h, out_w), stride, padding,
                             output_padding, dilation, groups, (extra_h, extra_w),
                             (pad_h, pad_w))


# --------------------------------------------------------------------------------------------
# arguments
# --------------------------------------------------------------------------------------------

def _is_torch_tensor(value):
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(value, torch.Tensor)


def _array(value, name):
    """``value`` itself if it has a shape and a dtype (any array kind), else as NumPy."""
    if hasattr(value, "shape") and hasattr(value, "dtype"):
        return value
    try:
        array = np.asarray(value)
    except Exception as exc:
        raise TypeError(f"{name} must be an array, got {type(value).__name__}") from exc
    if array.dtype == object:
        raise TypeError(f"{name} must be an array, got {type(value).__name__}")
    return array


def _dtype_name(array):
    return str(array.dtype).replace("torch.", "")


_FLOAT_NAMES = tuple(d.name for d in _FLOAT_DTYPES)


def _check_arrays(arrays):
    """The checks the public layer makes on the arrays themselves, naming each argument:
    arrays, one float dtype, one location, no graph to record. ``arrays`` maps names to
    values (None allowed after the first two); returns them as arrays."""
    out = {}
    for name, value in arrays.items():
        if value is None:
            if name == "bias":
                out[name] = None
                continue
            raise TypeError(f"{name} must be an array, got None")
        out[name] = _array(value, name)
    names = [n for n, a in out.items() if a is not None]
    first = names[0]
    first_dtype = _dtype_name(out[first])
    if first_dtype not in _FLOAT_NAMES and not (first_dtype == "bfloat16"
                                                and _is_torch_tensor(out[first])):
        raise TypeError(f"{first} must be float16, float32 or float64 (or a bfloat16 PyTorch "
                        f"tensor), got dtype {first_dtype}")
    for name in names[1:]:
        if _dtype_name(out[name]) != first_dtype:
            raise TypeError(
                f"{name} must have the dtype of {first} ({first_dtype}), got "
                f"{_dtype_name(out[name])}; cast one of them, e.g. {name}.astype({first}.dtype) "
                f"(NumPy/CuPy) or {name}.to({first}.dtype) (PyTorch)")
    where = {name: is_device_array(out[name]) for name in names}
    if len(set(where.values())) > 1:
        said = ", ".join(f"{n} on {'GPU' if g else 'host'}" for n, g in where.items())
        raise ValueError(f"inputs must all live on the host or all on the GPU, got {said}; "
                         "gpuconv does not copy between devices implicitly")
    return out


def _check_bias(bias, geom, local):
    """``(C_out,)``, or for ``local`` also ``(C_out, H_out, W_out)``."""
    if bias is None:
        return
    _, c_out, out_h, out_w = geom.output_shape
    allowed = [(c_out,)] + ([(c_out, out_h, out_w)] if local else [])
    if not shape_in(tuple(bias.shape), allowed):
        kinds = " or ".join(str(a) for a in allowed)
        raise ValueError(f"bias must have shape {kinds}, got {tuple(bias.shape)}")


def _check_device(device, x):
    """A call that records the graph runs where its tensors are (a non-tensor ``x`` is
    refused by the PyTorch layer, naming it)."""
    where = getattr(getattr(x, "device", None), "type", None)
    if where is not None and device not in ("auto", where):
        raise ValueError(
            f"device={device!r} was requested but x lives on {x.device}; a call that records "
            "the autograd graph runs where its tensors are: move them with .to(device)")


# --------------------------------------------------------------------------------------------
# the computation
# --------------------------------------------------------------------------------------------

def _unbatched_shape(shape, unbatched):
    return tuple(shape[1:]) if unbatched else tuple(shape)


def _zeros_like_kind(template, shape, dtype):
    """Zeros of ``shape`` of the kind and on the device of ``template`` (an output no input
    pixel reaches)."""
    if _is_torch_tensor(template):
        return template.new_zeros(shape)
    host = np.zeros(shape, dtype=np.dtype(dtype))
    if is_device_array(template):
        from .cuda import launch

        return launch.from_host_like(template, host)
    from .conv import _wrap_like

    return _wrap_like(template, host)


def _finish(y, bias, geom, unbatched):
    """``y`` (the reached part of the output) with the extra rows and columns appended and
    the bias added."""
    extra_h, extra_w = geom.extra
    if bias is None and not (extra_h or extra_w):
        return y
    c_out = geom.output_shape[1]
    if _is_torch_tensor(y):
        torch = sys.modules["torch"]
        if extra_h or extra_w:
            y = torch.nn.functional.pad(y, (0, extra_w, 0, extra_h))
        if bias is not None:
            bias = torch.as_tensor(bias, device=y.device)
            y += bias.reshape((c_out, 1, 1) if bias.dim() == 1 else tuple(bias.shape))
        return y
    # a depthwise 1 x 1 convolution with unit weights: y * 1 + bias, zero rows appended
    per_position = bias is not None and len(bias.shape) == 3
    out_h, out_w = geom.output_shape[2:]
    ones = np.ones((c_out, out_h, out_w, 1, 1, 1) if per_position else (c_out, 1, 1, 1),
                   dtype=np.dtype(y.dtype))
    on_gpu = is_device_array(y)
    if on_gpu:
        from .cuda import launch

        ones = launch.from_host_like(y, ones)
    depthwise = local_conv2d if per_position else conv2d
    return depthwise(y, ones, bias, 1, ((0, extra_h), (0, extra_w)), 1, c_out,
                     device="cuda" if on_gpu else "cpu")


def _transpose(op_name, local, x, weight, bias, stride, padding, output_padding, groups,
               dilation, device):
    arrays = _check_arrays({"x": x, "weight": weight, "bias": bias})
    x, weight, bias = arrays["x"], arrays["weight"], arrays["bias"]
    geom = transpose_geometry(x.shape, weight.shape, local, stride, padding, output_padding,
                              groups, dilation)
    _check_bias(bias, geom, local)
    unbatched = len(x.shape) == 3
    if geom.reaches_output:
        y = call(op_name, {"grad_output": x, "weight": weight}, geom.stride,
                 geom.forward_padding, geom.dilation, geom.groups, device,
                 sizes={"input_size": _unbatched_shape(geom.reached_shape, unbatched)})
    else:  # the padding crops every pixel any input reaches: the output is the bias
        y = _zeros_like_kind(x, _unbatched_shape(geom.output_shape, unbatched), x.dtype)
        geom = dataclasses.replace(geom, extra=(0, 0))  # (the bias alone remains to add)
    return _finish(y, bias, geom, unbatched)


def conv_transpose2d(x, weight, bias=None, stride=1, padding=0, output_padding=0, groups=1,
                     dilation=1, *, device="auto"):
    """Transposed 2-D convolution with shared weights (``torch.nn.functional.conv_transpose2d``).

    The adjoint of :func:`gpuconv.conv2d` with the same weight, stride, padding, dilation and
    groups: each input pixel is spread through its kernel over the output::

        y[n, g * C_out/groups + o, i * s_h - p_h + u * d_h, j * s_w - p_w + v * d_w]
            += weight[g * C_in/groups + c, o, u, v] * x[n, g * C_in/groups + c, i, j]

    plus ``bias[o]``; computed by the ``conv2d_input`` kernels.

    Args:
        x: ``(N, C_in, H_in, W_in)`` or ``(C_in, H_in, W_in)``; dtypes, array kinds and
            devices as :func:`gpuconv.conv2d`.
        weight: ``(C_in, C_out/groups, kH, kW)`` (PyTorch's layout), same dtype as ``x``.
        bias: ``None`` or ``(C_out,)``.
        stride, dilation: int or ``(h, w)``, >= 1.
        padding: int or ``(p_h, p_w)`` >= 0: rows and columns cropped from each side of the
            full output (the padding of the convolution this transposes).
        output_padding: int or ``(h, w)`` >= 0, smaller than the stride or the dilation:
            rows and columns added at the bottom and right.
        groups: divides ``C_in`` (and ``C_out = weight.shape[1] * groups``).
        device: ``"auto"``, ``"cpu"`` or ``"cuda"``.

    Returns:
        ``(N, C_out, H_out, W_out)`` of the kind and dtype of ``x``, ``H_out = (H_in - 1) *
        s_h - 2 * p_h + d_h * (kH - 1) + output_padding_h + 1`` (same for W). PyTorch tensors
        that require grad go through :func:`gpuconv.torch.conv_transpose2d` and record the
        graph.

    >>> import numpy as np, gpuconv
    >>> x = np.array([[[[1.0, 2.0]]]])
    >>> gpuconv.conv_transpose2d(x, np.ones((1, 1, 1, 2)), stride=2, device="cpu")[0, 0]
    array([[1., 1., 2., 2.]])
    """
    if _records_autograd({"x": x, "weight": weight, "bias": bias}):
        _check_device(device, x)
        return autograd("conv_transpose2d")(x, weight, bias, stride, padding,
                                                          output_padding, groups, dilation)
    return _transpose("conv2d_input", False, x, weight, bias, stride, padding, output_padding,
                      groups, dilation, device)


def local_conv_transpose2d(x, weight, bias=None, stride=1, padding=0, output_padding=0,
                           groups=1, dilation=1, *, device="auto"):
    """Transposed locally connected 2-D convolution: the adjoint of :func:`gpuconv.local_conv2d`.

    Takes the forward's weight unchanged (no flip, no transpose): for ``y =
    local_conv2d(a, w)`` and any ``b`` of ``y``'s shape, ``<y, b> == <a,
    local_conv_transpose2d(b, w)>`` (with the forward's stride, padding, dilation and groups,
    and ``output_padding`` giving ``a``'s size where a strided convolution maps several
    sizes to one). Each input pixel ``(i, j)`` spreads through its own kernel::

        y[n, g * C_out/groups + o, i * s_h - p_h + u * d_h, j * s_w - p_w + v * d_w]
            += weight[g * C_in/groups + c, i, j, o, u, v] * x[n, g * C_in/groups + c, i, j]

    plus the bias; computed by the ``local_conv2d_input`` kernels.

    Args:
        x: ``(N, C_in, H_in, W_in)`` or ``(C_in, H_in, W_in)`` (the forward's output).
        weight: ``(C_in, H_in, W_in, C_out/groups, kH, kW)``: :func:`gpuconv.local_conv2d`'s
            ``(C_out, H_out, W_out, C_in/groups, kH, kW)`` in the transposed layer's terms.
        bias: ``None``, ``(C_out,)`` (one per map) or ``(C_out, H_out, W_out)`` (one per
            output position).
        stride, padding, output_padding, groups, dilation, device: as
            :func:`conv_transpose2d`.

    Returns:
        ``(N, C_out, H_out, W_out)``, ``H_out`` as :func:`conv_transpose2d`.

    >>> import numpy as np, gpuconv
    >>> w = np.zeros((1, 1, 2, 1, 1, 2)); w[0, 0, 0, 0, 0] = [1.0, 1.0]; w[0, 0, 1, 0, 0] = [3.0, 0.0]
    >>> gpuconv.local_conv_transpose2d(np.ones((1, 1, 1, 2)), w, stride=2, device="cpu")[0, 0]
    array([[1., 1., 3., 0.]])
    """
    if _records_autograd({"x": x, "weight": weight, "bias": bias}):
        _check_device(device, x)
        return autograd("local_conv_transpose2d")(
            x, weight, bias, stride, padding, output_padding, groups, dilation)
    return _transpose("local_conv2d_input", True, x, weight, bias, stride, padding,
                      output_padding, groups, dilation, device)


# --------------------------------------------------------------------------------------------
# gradients: the forward operations
# --------------------------------------------------------------------------------------------

def _reached(grad_output, geom):
    """The rows and columns of ``grad_output`` an input pixel reaches (a view)."""
    if not (geom.extra[0] or geom.extra[1]):
        return grad_output
    _, _, h, w = geom.reached_shape
    index = (slice(None),) * (len(grad_output.shape) - 2) + (slice(0, h), slice(0, w))
    return grad_output[index]


def _check_grad_output(grad_output, geom, unbatched):
    expected = _unbatched_shape(geom.output_shape, unbatched)
    if tuple(grad_output.shape) != expected:
        raise ValueError(
            f"grad_output must have the transposed convolution's output shape {expected} for "
            f"this input, weight and stride/padding/output_padding/dilation, got "
            f"{tuple(grad_output.shape)}")


def _refuse_graph(arrays):
    if _records_autograd(arrays):
        name = next(n for n, v in arrays.items() if getattr(v, "requires_grad", False))
        raise TypeError(
            f"{name} is a tensor that requires grad and grad mode is on; the gradient functions "
            f"do not record an autograd graph: pass {name}.detach(), or call inside "
            "torch.no_grad()")


def _input_grad(forward, local, input_size, weight, grad_output, stride, padding,
                output_padding, groups, dilation, device):
    _refuse_graph({"grad_output": grad_output, "weight": weight})
    arrays = _check_arrays({"grad_output": grad_output, "weight": weight})
    grad_output, weight = arrays["grad_output"], arrays["weight"]
    rank = 3 if hasattr(input_size, "__len__") and len(input_size) == 3 else 4
    input_size = _shape_arg(input_size, "input_size", rank,
                            "(N, C_in, H_in, W_in) or (C_in, H_in, W_in)")
    geom = transpose_geometry(input_size, weight.shape, local, stride, padding, output_padding,
                              groups, dilation, x_name="input_size")
    unbatched = rank == 3
    _check_grad_output(grad_output, geom, unbatched)
    if not geom.reaches_output:
        return _zeros_like_kind(grad_output, input_size, grad_output.dtype)
    return forward(_reached(grad_output, geom), weight, None, geom.stride, geom.forward_padding,
                   geom.dilation, geom.groups, device=device)


def _weight_grad(op_name, local, input, weight_size, grad_output, stride, padding,
                 output_padding, groups, dilation, device):
    _refuse_graph({"input": input, "grad_output": grad_output})
    arrays = _check_arrays({"input": input, "grad_output": grad_output})
    input, grad_output = arrays["input"], arrays["grad_output"]
    weight_size = _shape_arg(weight_size, "weight_size", 6 if local else 4,
                             _LOCAL_LAYOUT if local else _SHARED_LAYOUT)
    geom = transpose_geometry(input.shape, weight_size, local, stride, padding, output_padding,
                              groups, dilation, x_name="input", weight_name="weight_size")
    unbatched = len(input.shape) == 3
    _check_grad_output(grad_output, geom, unbatched)
    if not geom.reaches_output:
        return _zeros_like_kind(grad_output, weight_size, grad_output.dtype)
    # the convolution's weight gradient: its input is grad_output, its output gradient input
    return call(op_name, {"input": _reached(grad_output, geom), "grad_output": input},
                geom.stride, geom.forward_padding, geom.dilation, geom.groups, device,
                sizes={"weight_size": weight_size})


def conv_transpose2d_input(input_size, weight, grad_output, stride=1, padding=0,
                           output_padding=0, groups=1, dilation=1, *, device="auto"):
    """Gradient of :func:`conv_transpose2d` with respect to its input: the convolution
    :func:`gpuconv.conv2d` of ``grad_output`` with the same weight and geometry.

    Args:
        input_size: the transposed layer's input shape ``(N, C_in, H_in, W_in)`` or
            ``(C_in, H_in, W_in)``.
        weight: ``(C_in, C_out/groups, kH, kW)``.
        grad_output: ``(N, C_out, H_out, W_out)`` (no batch axis for a 3-D ``input_size``).
        stride, padding, output_padding, groups, dilation, device: as
            :func:`conv_transpose2d`.

    Returns:
        ``input_size``-shaped, the kind of array ``grad_output`` is.

    >>> import numpy as np, gpuconv
    >>> gy = np.array([[[[1.0, 2.0, 3.0, 4.0]]]])
    >>> gpuconv.grad.conv_transpose2d_input((1, 1, 1, 2), np.ones((1, 1, 1, 2)), gy, stride=2,
    ...                                     device="cpu")[0, 0]
    array([[3., 7.]])
    """
    return _input_grad(conv2d, False, input_size, weight, grad_output, stride, padding,
                       output_padding, groups, dilation, device)


def conv_transpose2d_weight(input, weight_size, grad_output, stride=1, padding=0,
                            output_padding=0, groups=1, dilation=1, *, device="auto"):
    """Gradient of :func:`conv_transpose2d` with respect to its weight:
    :func:`gpuconv.grad.conv2d_weight` with ``grad_output`` as the convolution's input and
    ``input`` as its output gradient.

    Args:
        input: the transposed layer's input ``(N, C_in, H_in, W_in)`` or ``(C_in, H_in,
            W_in)``.
        weight_size: ``(C_in, C_out/groups, kH, kW)``.
        grad_output: ``(N, C_out, H_out, W_out)``, same dtype as ``input``.
        stride, padding, output_padding, groups, dilation, device: as
            :func:`conv_transpose2d`.

    Returns:
        ``weight_size``-shaped, the kind of array ``grad_output`` is.

    >>> import numpy as np, gpuconv
    >>> x = np.array([[[[1.0, 2.0]]]]); gy = np.array([[[[1.0, 2.0, 3.0, 4.0]]]])
    >>> gpuconv.grad.conv_transpose2d_weight(x, (1, 1, 1, 2), gy, stride=2, device="cpu")[0, 0]
    array([[ 7., 10.]])
    """
    return _weight_grad("conv2d_weight", False, input, weight_size, grad_output, stride, padding,
                        output_padding, groups, dilation, device)


def local_conv_transpose2d_input(input_size, weight, grad_output, stride=1, padding=0,
                                 output_padding=0, groups=1, dilation=1, *, device="auto"):
    """Gradient of :func:`local_conv_transpose2d` with respect to its input: the
    :func:`gpuconv.local_conv2d` of ``grad_output`` with the same weight and geometry.

    Arguments as :func:`conv_transpose2d_input`, with ``weight`` ``(C_in, H_in, W_in,
    C_out/groups, kH, kW)``.
    """
    return _input_grad(local_conv2d, True, input_size, weight, grad_output, stride, padding,
                       output_padding, groups, dilation, device)


def local_conv_transpose2d_weight(input, weight_size, grad_output, stride=1, padding=0,
                                  output_padding=0, groups=1, dilation=1, *, device="auto"):
    """Gradient of :func:`local_conv_transpose2d` with respect to its weight:
    :func:`gpuconv.grad.local_conv2d_weight` with ``grad_output`` as the convolution's input
    and ``input`` as its output gradient.

    Arguments as :func:`conv_transpose2d_weight`, with ``weight_size`` ``(C_in, H_in, W_in,
    C_out/groups, kH, kW)``.
    """
    return _weight_grad("local_conv2d_weight", True, input, weight_size, grad_output, stride,
                        padding, output_padding, groups, dilation, device)
