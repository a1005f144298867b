"""The public operations: argument checks, device choice, output allocation, launch.

This is the only module that knows about both devices. The kernels behind it
(:mod:`gpuconv.cpu`, :mod:`gpuconv.cuda.launch`) trust what it hands them.
"""

from __future__ import annotations

import math
import sys
import threading

import numpy as np

from .device import check_memory, host_memory_available, is_device_array, select_device
from .geometry import conv_geometry

__all__ = ["conv2d", "local_conv2d"]

_FLOAT_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))


class _Operand:
    """An argument as the public layer sees it: the caller's object, its shape and dtype."""

    __slots__ = ("obj", "shape", "dtype", "on_gpu")

    def __init__(self, obj, shape, dtype, on_gpu):
        self.obj, self.shape, self.dtype, self.on_gpu = obj, shape, dtype, on_gpu

    @property
    def ndim(self):
        return len(self.shape)


def _operand(value, name):
    if value is None:
        return None
    if getattr(value, "requires_grad", False):
        raise TypeError(
            f"{name} is a tensor that requires grad; gpuconv computes forward passes only: "
            f"pass {name}.detach()")
    if is_device_array(value):
        if getattr(value, "__cuda_ndarray__", False) and not hasattr(value, "__cuda_array_interface__"):
            # a device array of the CUDA simulator
            return _Operand(value, tuple(int(s) for s in value.shape), np.dtype(value.dtype), True)
        cai = getattr(value, "__cuda_array_interface__", None)
        if cai is None:
            raise TypeError(
                f"{name} lives on a GPU but does not expose __cuda_array_interface__; "
                "pass a CuPy array, a PyTorch CUDA tensor or a Numba device array")
        return _Operand(value, tuple(int(s) for s in cai["shape"]), np.dtype(cai["typestr"]), True)
    if isinstance(value, np.ndarray):
        host = value
    elif hasattr(value, "__dlpack__"):
        try:
            host = np.from_dlpack(value)
        except Exception:
            host = np.asarray(value)
    else:
        try:
            host = np.asarray(value)
        except Exception as exc:
            raise TypeError(f"{name} must be an array, got {type(value).__name__}") from exc
    return _Operand(host, host.shape, host.dtype, False)


def _check_dtypes(x, weight, bias):
    if x.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"x must be float32 or float64, got dtype {x.dtype}")
    for name, op in (("weight", weight), ("bias", bias)):
        if op is not None and op.dtype != x.dtype:
            raise TypeError(f"{name} must have the dtype of x ({x.dtype}), got {op.dtype}")


def _check_x(x):
    if x.ndim != 4:
        raise ValueError(f"x must be 4-D (N, C_in, H, W), got shape {x.shape}")
    if min(x.shape[1:]) < 1:
        raise ValueError(f"x must have C_in, H and W >= 1, got shape {x.shape}")


def _prepare(op_name, x, weight, bias, stride, padding, dilation, groups, device):
    """Shared front half of both operations: operands, checks, geometry, device."""
    x, weight, bias = _operand(x, "x"), _operand(weight, "weight"), _operand(bias, "bias")
    _check_x(x)
    local = op_name == "local_conv2d"
    if local:
        expected = "(C_out, H_out, W_out, C_in/groups, kH, kW)"
        if weight.ndim != 6:
            raise ValueError(f"weight must be 6-D {expected}, got shape {weight.shape}")
    else:
        expected = "(C_out, C_in/groups, kH, kW)"
        if weight.ndim != 4:
            raise ValueError(f"weight must be 4-D {expected}, got shape {weight.shape}")
    if min(weight.shape) < 1:
        raise ValueError(f"weight must have no empty dimension {expected}, got shape {weight.shape}")
    _check_dtypes(x, weight, bias)
    kernel_size = weight.shape[-2:]
    geom = conv_geometry(x.shape, kernel_size, weight.shape[0], stride, padding, dilation, groups)
    c_ig = weight.shape[3] if local else weight.shape[1]
    if c_ig != geom.in_channels_per_group:
        raise ValueError(
            f"weight has C_in/groups={c_ig} but x has C_in={geom.in_channels} with "
            f"groups={geom.groups} (expected weight shape {expected} with C_in/groups="
            f"{geom.in_channels_per_group}), got weight shape {weight.shape}")
    if local and tuple(weight.shape[1:3]) != (geom.out_height, geom.out_width):
        raise ValueError(
            f"weight holds kernels for a {weight.shape[1]}x{weight.shape[2]} output, but x "
            f"{x.shape[2]}x{x.shape[3]} with this stride/padding/dilation gives a "
            f"{geom.out_height}x{geom.out_width} output (weight must be {expected} = "
            f"{geom.local_weight_shape()})")
    if bias is not None:
        allowed = [(geom.out_channels,)]
        if local:
            allowed.append((geom.out_channels, geom.out_height, geom.out_width))
        if tuple(bias.shape) not in allowed:
            kinds = " or ".join(str(a) for a in allowed)
            raise ValueError(f"bias must have shape {kinds}, got {tuple(bias.shape)}")
    operands = [op for op in (x, weight, bias) if op is not None]
    if any(op.on_gpu for op in operands) and not all(op.on_gpu for op in operands):
        where = ", ".join(f"{name} on {'GPU' if op.on_gpu else 'host'}"
                          for name, op in zip(("x", "weight", "bias"), (x, weight, bias))
                          if op is not None)
        raise ValueError(
            f"inputs must all live on the host or all on the GPU, got {where}; "
            "gpuconv does not copy between devices implicitly")
    target = select_device(*(op.obj for op in operands), device=device)
    return x, weight, bias, geom, target


def _wrap_like(template, result):
    """Return ``result`` (a NumPy array) as the same kind of host array as ``template``."""
    if isinstance(template, np.ndarray) or not hasattr(template, "__dlpack__"):
        return result
    module = sys.modules.get(type(template).__module__.split(".")[0])
    from_dlpack = getattr(module, "from_dlpack", None)
    return from_dlpack(result) if from_dlpack is not None else result


# Numba's "workqueue" threading layer (used when neither OpenMP nor TBB is available) must
# not run two parallel kernels at once; calls from several threads are then serialised.
_WORKQUEUE_LOCK = threading.Lock()


def _empty_output(shape, dtype):
    """Allocate a host output; every element is written by the kernel (tests poison it)."""
    return np.empty(shape, dtype=dtype)


def _host_bytes_needed(op_name, x, weight, geom):
    """Output, contiguous copies of the inputs and the kernels' scratch (Python ints)."""
    from . import cpu as _cpu

    itemsize = x.dtype.itemsize
    out = math.prod(geom.output_shape) * itemsize
    copies = sum(math.prod(op.shape) * itemsize for op in (x, weight)
                 if not op.obj.flags.c_contiguous)
    scratch = (_cpu.local_conv2d_scratch_bytes if op_name == "local_conv2d"
               else _cpu.conv2d_scratch_bytes)
    return out + copies + scratch(geom, itemsize)


def _run_cpu(op_name, x, weight, bias, geom, x_original):
    from . import cpu as _cpu

    dtype = x.dtype
    check_memory(_host_bytes_needed(op_name, x, weight, geom), host_memory_available(), "host")
    out = _empty_output(geom.output_shape, dtype)
    if geom.batch == 0:
        return _wrap_like(x_original, out)
    xs = np.ascontiguousarray(x.obj)
    ws = np.ascontiguousarray(weight.obj)
    if bias is None:
        b3, has_bias = np.zeros((geom.out_channels, 1, 1), dtype=dtype), False
    else:
        b3 = np.ascontiguousarray(bias.obj).reshape(geom.out_channels, *(bias.shape[1:] or (1, 1)))
        has_bias = True
    forward = _cpu.local_conv2d_forward if op_name == "local_conv2d" else _cpu.conv2d_forward
    if _threading_layer() == "workqueue":
        with _WORKQUEUE_LOCK:
            forward(xs, ws, b3, has_bias, out, geom)
    else:
        forward(xs, ws, b3, has_bias, out, geom)
    return _wrap_like(x_original, out)


def _threading_layer():
    """Numba's threading layer once one has been chosen (by the first parallel launch)."""
    import numba

    try:
        return numba.threading_layer()
    except ValueError:  # no parallel kernel has run yet: be safe for this first call
        return "workqueue"


def _run(op_name, x, weight, bias, stride, padding, dilation, groups, device):
    x_original = x
    x, weight, bias, geom, target = _prepare(
        op_name, x, weight, bias, stride, padding, dilation, groups, device)
    if target == "cuda":
        from .cuda import launch as _cuda

        return _cuda.run(op_name, x, weight, bias, geom)
    return _run_cpu(op_name, x, weight, bias, geom, x_original)


def conv2d(x, weight, bias=None, stride=1, padding=0, dilation=1, groups=1, *, device="auto"):
    """2-D convolution with shared weights (cross-correlation, as in deep learning).

    One kernel per output feature map, summed across the input channels of its group::

        y[n, o, i, j] = bias[o] + sum_{c, u, v} weight[o, c, u, v]
                        * x_padded[n, g(o) * C_in/groups + c, i * s_h + u * d_h, j * s_w + v * d_w]

    Args:
        x: input ``(N, C_in, H, W)``, float32 or float64. NumPy (or any host array), or a
            GPU array (CuPy, PyTorch CUDA tensor, Numba device array).
        weight: ``(C_out, C_in/groups, kH, kW)``, same dtype as ``x``.
        bias: ``None`` or ``(C_out,)``.
        stride: int or ``(s_h, s_w)``, >= 1.
        padding: int or ``(p_h, p_w)`` >= 0 (zeros on both sides), ``"valid"`` (none) or
            ``"same"`` (output size = input size; stride 1 only; an odd total puts the extra
            row/column at the bottom/right).
        dilation: int or ``(d_h, d_w)``, >= 1.
        groups: divides ``C_in`` and ``C_out``.
        device: ``"auto"``, ``"cpu"`` or ``"cuda"``; see :func:`gpuconv.select_device`.

    Returns:
        ``(N, C_out, H_out, W_out)`` array of the same kind and dtype as ``x``, with
        ``H_out = (H + pad_top + pad_bottom - d_h * (kH - 1) - 1) // s_h + 1`` (same for W).
        A new array: it never aliases an input.

    >>> import numpy as np, gpuconv
    >>> x = np.arange(16, dtype=np.float64).reshape(1, 1, 4, 4)
    >>> w = np.ones((1, 1, 2, 2))
    >>> gpuconv.conv2d(x, w, device="cpu")[0, 0]
    array([[10., 14., 18.],
           [26., 30., 34.],
           [42., 46., 50.]])
    """
    return _run("conv2d", x, weight, bias, stride, padding, dilation, groups, device)


def local_conv2d(x, weight, bias=None, stride=1, padding=0, dilation=1, groups=1, *,
                 device="auto"):
    """Locally connected (unshared) 2-D convolution: a different kernel at every output position.

    ::

        y[n, o, i, j] = bias[o(, i, j)] + sum_{c, u, v} weight[o, i, j, c, u, v]
                        * x_padded[n, g(o) * C_in/groups + c, i * s_h + u * d_h, j * s_w + v * d_w]

    Args:
        x: input ``(N, C_in, H, W)``, float32 or float64 (host or GPU array, as
            :func:`conv2d`).
        weight: ``(C_out, H_out, W_out, C_in/groups, kH, kW)`` (Chainer's and Theano's
            layout), same dtype as ``x``; ``H_out, W_out`` must match the geometry.
        bias: ``None``, ``(C_out,)`` (one per output map) or ``(C_out, H_out, W_out)``
            (one per output position).
        stride, padding, dilation, groups, device: as :func:`conv2d`.

    Returns:
        ``(N, C_out, H_out, W_out)`` array of the same kind and dtype as ``x``; ``H_out`` and
        ``W_out`` follow the formula of :func:`conv2d`. If every position's kernel is the
        same, the result equals :func:`conv2d` with that kernel.

    >>> import numpy as np, gpuconv
    >>> x = np.arange(9, dtype=np.float64).reshape(1, 1, 3, 3)
    >>> w = np.zeros((1, 2, 2, 1, 2, 2)); w[0, 0, 0] = 1.0; w[0, 1, 1, 0, 1, 1] = 2.0
    >>> gpuconv.local_conv2d(x, w, device="cpu")[0, 0]
    array([[ 8.,  0.],
           [ 0., 16.]])
    """
    return _run("local_conv2d", x, weight, bias, stride, padding, dilation, groups, device)
