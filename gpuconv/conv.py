"""The public layer: argument checks, device choice, output allocation, dispatch.

Every public function, forward (:func:`conv2d`, :func:`local_conv2d`, :func:`tiled_conv2d`)
or gradient (:mod:`gpuconv.grad`), goes through :func:`call`: its arguments are checked once
against the operation's row in :mod:`gpuconv.ops`, a device is chosen, and the row's kernel
runs. This is the only module that knows about both devices; the kernels behind it
(:mod:`gpuconv.cpu`, :mod:`gpuconv.cuda.launch`) trust what it hands them.
"""

from __future__ import annotations

import collections
import math
import os
import sys
import threading

import numpy as np

from .device import (ENV_VAR, FreeMemory, host_memory_available, is_device_array,
                     numba_device_view, select_device, simulator_enabled)
from .geometry import TILINGS, TiledGeometry, conv_geometry, shape_in, tiled_geometry
from .ops import FORWARD, OPS, WEIGHT_GRAD, autograd

__all__ = ["conv2d", "local_conv2d", "tiled_conv2d", "clear_call_cache"]

_FLOAT_DTYPES = (np.dtype(np.float16), np.dtype(np.float32), np.dtype(np.float64))
_HALF = np.dtype(np.float16)
# float16 is stored in half precision and computed in float32: on the CPU the operands are
# converted once into the float32 kernels' inputs (a pass over them, and float32 copies); the
# CUDA kernels load the half values themselves (no copies).
_COMPUTE_DTYPE = {_HALF: np.dtype(np.float32)}


class _Operand:
    """An argument as the public layer sees it: the caller's object, its shape and dtype."""

    __slots__ = ("obj", "shape", "dtype", "on_gpu", "origin", "cai")

    def __init__(self, obj, shape, dtype, on_gpu, origin="", cai=None):
        self.obj, self.shape, self.dtype, self.on_gpu = obj, shape, dtype, on_gpu
        self.origin = origin  # how a non-array argument became this array, for messages
        self.cai = cai  # a device array's __cuda_array_interface__, read once per call

    @property
    def ndim(self):
        return len(self.shape)


def _grad_mode_on():
    torch = sys.modules.get("torch")
    return torch is None or torch.is_grad_enabled()


def _records_autograd(arrays):
    """Whether a call would have to record PyTorch's autograd graph."""
    for v in arrays.values():
        if getattr(v, "requires_grad", False):
            return _grad_mode_on()
    return False


def _is_torch_tensor(value):
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(value, torch.Tensor)


class _Torch:
    """PyTorch's tensor type, bfloat16 and from_numpy, once PyTorch has been imported (by
    anyone: gpuconv never imports it on its own); until then ``tensor`` is None, which no
    argument's type is."""

    tensor = bfloat16 = from_numpy = strided = None
    dtypes = {}  # PyTorch's float dtypes -> NumPy's

    @classmethod
    def seen(cls):
        torch = sys.modules.get("torch")
        if cls.tensor is None and torch is not None and hasattr(torch, "from_numpy"):
            cls.dtypes = {getattr(torch, d.name): d for d in _FLOAT_DTYPES}
            cls.strided = torch.strided
            cls.tensor, cls.bfloat16, cls.from_numpy = torch.Tensor, torch.bfloat16, torch.from_numpy


class _BFloat16(Exception):
    """An operand is a bfloat16 PyTorch tensor: the call goes to :func:`_bfloat16_call`."""


def torch_cuda_interface(tensor, dtype):
    """The ``__cuda_array_interface__`` PyTorch gives of the dense CUDA tensor ``tensor`` of
    NumPy dtype ``dtype`` (version 2: no stream; strides only when not C-contiguous), made
    from the tensor's attributes. PyTorch's own property does the same work behind checks
    this module has already made, and the generic path below reads it twice."""
    strides = None
    if not tensor.is_contiguous():
        itemsize = dtype.itemsize
        strides = tuple(s * itemsize for s in tensor.stride())
    return {"typestr": dtype.str, "shape": tuple(tensor.shape), "strides": strides,
            "data": (tensor.data_ptr() if tensor.numel() else 0, False), "version": 2}


def _torch_resolved(value):
    """``(tensor, host)`` for the PyTorch tensor ``value``: the tensor with a negative bit
    resolved (``x.conj().imag`` is a view whose memory holds the values negated; NumPy and
    the array interfaces would drop the sign), and the operand of a NumPy view of its memory
    if it is on the CPU and NumPy can view it (else None). bfloat16 raises :class:`_BFloat16`
    (NumPy has none)."""
    if value.is_neg():
        value = value.resolve_neg()
    if value.dtype is _Torch.bfloat16:
        raise _BFloat16
    if value.is_cpu:
        try:  # a view of the tensor's memory, as np.from_dlpack gives, but cheaper
            host = value.numpy()
        except (TypeError, RuntimeError):  # conjugate views and such: the generic path
            return value, None
        return value, _Operand(host, host.shape, host.dtype, False)
    return value, None


def _operand(value, name):
    if value is None:
        return None
    kind = type(value)
    if kind is np.ndarray:  # the common cases, first
        return _Operand(value, value.shape, value.dtype, False)
    if kind is _Torch.tensor and value.requires_grad and not _grad_mode_on():
        value = value.detach()  # the values alone: PyTorch gives no array interface of a
        # CUDA tensor that requires grad (a subclass such as a Parameter: below)
    if kind is _Torch.tensor and not value.requires_grad:
        value, host = _torch_resolved(value)
        if host is not None:
            return host
        if value.is_cuda and value.layout is _Torch.strided:
            dtype = _Torch.dtypes.get(value.dtype)
            if dtype is not None:  # (other dtypes: as below, which names them in the error)
                cai = torch_cuda_interface(value, dtype)
                return _Operand(value, cai["shape"], dtype, True, cai=cai)
    if getattr(value, "requires_grad", False) and _grad_mode_on():
        raise TypeError(
            f"{name} is a tensor that requires grad and grad mode is on; the gradient "
            f"functions do not record an autograd graph: pass {name}.detach(), or call inside "
            "torch.no_grad(); gpuconv.conv2d and gpuconv.local_conv2d do record it")
    if _is_torch_tensor(value):
        _Torch.seen()
        if value.requires_grad:  # grad mode is off (above): the values alone
            return _operand(value.detach(), name)
        value, host = _torch_resolved(value)
        if host is not None:
            return host
    if is_device_array(value):
        if simulator_enabled() and not hasattr(value, "__cuda_array_interface__"):
            # a device array of the CUDA simulator (it has no array interface)
            return _Operand(value, tuple(int(s) for s in value.shape), np.dtype(value.dtype), True)
        cai = getattr(value, "__cuda_array_interface__", None)
        if cai is None:
            raise TypeError(
                f"{name} lives on a GPU but does not expose __cuda_array_interface__; "
                "pass a CuPy array, a PyTorch CUDA tensor or a Numba device array")
        return _Operand(value, tuple(int(s) for s in cai["shape"]), np.dtype(cai["typestr"]), True,
                        cai=cai)
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
        if host.dtype == object:
            raise TypeError(f"{name} must be an array, got {type(value).__name__}")
        origin = f", which NumPy made of the {type(value).__name__} passed as {name}"
        return _Operand(host, host.shape, host.dtype, False, origin)
    return _Operand(host, host.shape, host.dtype, False)


def _check_dtypes(op, operands, names):
    """One float dtype for every operand; the message names the argument and how to cast."""
    first, first_name = operands[0], names[0]
    if first.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"{first_name} must be float16, float32 or float64 (or a bfloat16 "
                        f"PyTorch tensor), got dtype {first.dtype}{first.origin}")
    for name, o in zip(names[1:], operands[1:]):
        if o is not None and o.dtype != first.dtype:
            raise TypeError(
                f"{name} must have the dtype of {first_name} ({first.dtype}{first.origin}), "
                f"got {o.dtype}{o.origin}; cast one of them, e.g. "
                f"{name}.astype({first_name}.dtype) (NumPy/CuPy) or "
                f"{name}.to({first_name}.dtype) (PyTorch)")


def _shape_arg(value, name, rank, layout):
    """A shape given as a tuple of ints (``input_size``, ``weight_size``)."""
    try:
        shape = tuple(int(v) for v in value)
        ok = len(shape) == rank and all(int(v) == v and v >= 0 for v in value)
    except (TypeError, ValueError):
        ok = False
    if not ok or isinstance(value, (str, bytes)):
        raise TypeError(f"{name} must be a sequence of {rank} non-negative ints {layout}, "
                        f"got {value!r}")
    return shape


def _check_input_shape(shape, name):
    if len(shape) != 4:
        raise ValueError(f"{name} must be 4-D (N, C_in, H, W) or 3-D (C_in, H, W), got shape "
                         f"{tuple(shape)}")
    if min(shape[2:]) < 1:
        raise ValueError(f"{name} must have H and W >= 1, got shape {tuple(shape)}")


def _geometry(op, x_shape, x_name, weight_shape, weight_name, stride, padding, dilation,
              groups, tiling=None):
    """Check the input and weight shapes against ``op``'s rules; the validated geometry
    (for a tiled op a :class:`~gpuconv.geometry.TiledGeometry` with ``tiling``)."""
    _check_input_shape(x_shape, x_name)
    expected = op.weight_layout
    if len(weight_shape) != op.weight_rank:
        raise ValueError(f"{weight_name} must be {op.weight_rank}-D {expected}, got shape "
                         f"{tuple(weight_shape)}")
    if min(weight_shape[-2:]) < 1:
        raise ValueError(f"{weight_name} must have kH and kW >= 1 {expected}, got shape "
                         f"{tuple(weight_shape)}")
    geom = conv_geometry(x_shape, weight_shape[-2:], weight_shape[0], stride, padding,
                         dilation, groups)
    c_ig = weight_shape[-3]
    if c_ig != geom.in_channels_per_group:
        hint = ""
        if x_shape[3] == c_ig * geom.groups and x_shape[1] != x_shape[3]:
            hint = (f"; {x_name} looks channels-last (N, H, W, C): gpuconv takes (N, C, H, W), "
                    f"e.g. {x_name}.transpose(0, 3, 1, 2) (NumPy) or "
                    f"{x_name}.permute(0, 3, 1, 2) (PyTorch)")
        raise ValueError(
            f"{weight_name} has C_in/groups={c_ig} but {x_name} has C_in={geom.in_channels} "
            f"with groups={geom.groups} (expected {weight_name} shape {expected} with "
            f"C_in/groups={geom.in_channels_per_group}), got {weight_name} shape "
            f"{tuple(weight_shape)}{hint}")
    if op.local and tuple(weight_shape[1:3]) != (geom.out_height, geom.out_width):
        raise ValueError(
            f"{weight_name} holds kernels for a {weight_shape[1]}x{weight_shape[2]} output, but "
            f"{x_name} {x_shape[2]}x{x_shape[3]} with this stride/padding/dilation gives a "
            f"{geom.out_height}x{geom.out_width} output ({weight_name} must be {expected} = "
            f"{op.weight_shape(geom)})")
    if op.tiled:
        return _tiled_geometry(geom, x_name, x_shape, weight_shape, weight_name, tiling)
    return geom


def _tiled_geometry(geom, x_name, x_shape, weight_shape, weight_name, tiling):
    if not isinstance(tiling, str) or tiling not in TILINGS:
        raise ValueError(f"tiling must be one of {', '.join(map(repr, TILINGS))}, got "
                         f"{tiling!r}")
    t_h, t_w = weight_shape[1:3]
    if not (1 <= t_h <= geom.out_height and 1 <= t_w <= geom.out_width):
        raise ValueError(
            f"{weight_name} holds {t_h}x{t_w} kernel slots (C_out, T_h, T_w, C_in/groups, kH, "
            f"kW), but {x_name} {x_shape[2]}x{x_shape[3]} with this stride/padding/dilation "
            f"gives a {geom.out_height}x{geom.out_width} output: T_h and T_w must be between 1 "
            f"and the output size ({geom.out_height}, {geom.out_width}), got shape "
            f"{tuple(weight_shape)}")
    return tiled_geometry(geom, (t_h, t_w), tiling)


def _same_location(names, operands):
    present = [(n, o) for n, o in zip(names, operands) if o is not None]
    if any(o.on_gpu for _, o in present) and not all(o.on_gpu for _, o in present):
        where = ", ".join(f"{n} on {'GPU' if o.on_gpu else 'host'}" for n, o in present)
        raise ValueError(
            f"inputs must all live on the host or all on the GPU, got {where}; "
            "gpuconv does not copy between devices implicitly")


def _check_call(op, arrays, sizes, stride, padding, dilation, groups, device):
    """Check one call of ``op`` once: operands, shapes against the op's rules, dtypes,
    location, device. ``arrays`` maps argument names to the caller's arrays in kernel order
    (the forward's bias may be None); ``sizes`` maps ``input_size``/``weight_size`` to shapes
    given instead of arrays, and for the tiled operations ``tiling`` to the slot rule. Returns
    (operands, geometry, device, unbatched)."""
    operands = [_operand(value, name) for name, value in arrays.items()]
    return _check_operands(op, list(arrays), operands, sizes, stride, padding, dilation, groups,
                           device)


def _check_operands(op, names, operands, sizes, stride, padding, dilation, groups, device):
    """:func:`_check_call` on operands already made by :func:`_operand`."""
    by_name = dict(zip(names, operands))
    for name, o in by_name.items():
        if o is None and name != "bias":
            raise TypeError(f"{name} must be an array, got None")
    if "input_size" in sizes:
        value = sizes["input_size"]
        rank = 3 if _sized(value) and len(value) == 3 else 4
        x_name, x_shape = "input_size", _shape_arg(value, "input_size", rank,
                                                    "(N, C_in, H, W) or (C_in, H, W)")
    else:
        x_name = "x" if "x" in by_name else "input"
        x_shape = by_name[x_name].shape
    unbatched = len(x_shape) == 3
    if unbatched:  # (C_in, H, W), as torch.nn.functional.conv2d takes it: a batch of one
        x_shape = (1,) + tuple(x_shape)
        for name in _BATCHED:
            o = by_name.get(name)
            if o is not None and name != x_name:
                if o.ndim != 3:
                    raise ValueError(f"{name} must be 3-D (C, H, W) like the unbatched "
                                     f"{x_name}, got shape {tuple(o.shape)}")
        operands = [_with_batch_axis(o) if name in _BATCHED else o
                    for name, o in zip(names, operands)]
        by_name = dict(zip(names, operands))
    if "weight_size" in sizes:
        w_name = "weight_size"
        w_shape = _shape_arg(sizes["weight_size"], "weight_size", op.weight_rank,
                             op.weight_layout)
    else:
        w_name, w_shape = "weight", by_name["weight"].shape
    geom = _geometry(op, x_shape, x_name, w_shape, w_name, stride, padding, dilation, groups,
                     sizes.get("tiling"))
    _check_dtypes(op, operands, names)
    bias = by_name.get("bias")
    if bias is not None:
        allowed = op.bias_shapes(geom)
        if not shape_in(tuple(bias.shape), allowed):
            kinds = " or ".join(str(a) for a in allowed)
            raise ValueError(f"bias must have shape {kinds}, got {tuple(bias.shape)}")
    grad_output = by_name.get("grad_output")
    if grad_output is not None and tuple(grad_output.shape) != geom.output_shape:
        raise ValueError(
            f"grad_output must have the forward's output shape (N, C_out, H_out, W_out) = "
            f"{geom.output_shape} for this input, weight and stride/padding/dilation, got "
            f"{tuple(grad_output.shape)}")
    _same_location(names, operands)
    target = select_device(*(o.obj for o in operands if o is not None), device=device)
    return operands, geom, target, unbatched


# Arguments with a leading batch axis (dropped, with the result's, for unbatched calls).
_BATCHED = ("x", "input", "grad_output")


def _sized(value):
    return hasattr(value, "__len__") and not isinstance(value, (str, bytes))


def _with_batch_axis(o):
    """``o`` viewed with a leading axis of length 1 (no copy)."""
    obj = o.obj
    if hasattr(obj, "unsqueeze"):  # PyTorch
        view = obj.unsqueeze(0)
    else:
        try:
            view = obj[None]
        except (TypeError, IndexError, ValueError):  # Numba device arrays
            view = numba_device_view(obj, (1,) + tuple(o.shape))
    return _Operand(view, (1,) + tuple(o.shape), o.dtype, o.on_gpu, o.origin)  # (no cai: a new view)


def _trivial_result(op, operands, geom):
    """The result of a call that needs no kernel (an empty batch, zero input or output
    channels), as a NumPy array, or None. With no input channels the forward's output is
    its bias (PyTorch's rule); every other such result is zeros or empty."""
    if geom.batch and geom.in_channels and geom.out_channels:
        return None
    out = np.zeros(op.output_shape(geom), dtype=operands[0].dtype)
    bias = operands[2] if op.kind == FORWARD else None
    if bias is not None and out.size:
        b = np.asarray(_to_host(bias))
        if isinstance(geom, TiledGeometry) and b.ndim == 3:  # one bias per kernel slot
            b = b[:, list(geom.row_slots())][:, :, list(geom.col_slots())]
        out += b.reshape(geom.out_channels, *(b.shape[1:] or (1, 1)))
    return out


def _to_host(o):
    if not o.on_gpu:
        return o.obj
    if hasattr(o.obj, "copy_to_host"):
        return o.obj.copy_to_host()
    if hasattr(o.obj, "get"):
        return o.obj.get()
    return o.obj.cpu().numpy()


def _wrap_like(template, result):
    """Return ``result`` (a NumPy array) as the same kind of host array as ``template``."""
    if type(template) is _Torch.tensor:
        return _Torch.from_numpy(result)
    if isinstance(template, np.ndarray) or not hasattr(template, "__dlpack__"):
        return result
    if _is_torch_tensor(template):
        return sys.modules["torch"].from_numpy(result)  # (torch.from_dlpack, cheaper)
    module = sys.modules.get(type(template).__module__.split(".")[0])
    from_dlpack = getattr(module, "from_dlpack", None)
    return from_dlpack(result) if from_dlpack is not None else result


# Numba's "workqueue" threading layer (used when neither OpenMP nor TBB is available) must
# not run two parallel kernels at once; calls from several threads are then serialised.
_WORKQUEUE_LOCK = threading.Lock()


def _empty_output(shape, dtype):
    """Allocate a host output; every element is written by the kernel (tests poison it)."""
    return np.empty(shape, dtype=dtype)


def _host_bytes_needed(op, operands, geom):
    """Output, contiguous (or float32) copies of the inputs and the kernel's scratch."""
    dtype = operands[0].dtype
    compute = _COMPUTE_DTYPE.get(dtype, dtype)
    out = math.prod(op.output_shape(geom)) * (dtype.itemsize + (compute != dtype) * compute.itemsize)
    copies = sum(math.prod(o.shape) * compute.itemsize for o in operands
                 if o is not None and (compute != dtype or not o.obj.flags.c_contiguous))
    return out + copies + op.scratch("cpu")(geom, compute.itemsize)


class _CpuPlan:
    """What a CPU call derives from its operands' shapes, dtypes and layout (cached)."""

    __slots__ = ("kernel", "dtype", "compute", "out_shape", "bias_shape", "no_bias", "needed",
                 "serial", "ready", "on_caller_thread")

    def __init__(self, op, operands, geom):
        dtype = operands[0].dtype
        self.kernel = op.kernel("cpu")
        self.dtype, self.compute = dtype, _COMPUTE_DTYPE.get(dtype, dtype)
        self.out_shape = op.output_shape(geom)
        self.bias_shape = self.no_bias = None  # the forward's bias as the kernel takes it (3-D)
        if op.kind == FORWARD:
            bias = operands[2]
            self.bias_shape = (geom.out_channels,) + (
                (1, 1) if bias is None or len(bias.shape) == 1 else tuple(bias.shape[1:]))

        self.needed = _host_bytes_needed(op, operands, geom)
        # operands the kernel can take as they are: C-contiguous NumPy arrays of its dtype
        self.ready = tuple(o is not None and type(o.obj) is np.ndarray
                           and o.dtype == self.compute and o.obj.flags.c_contiguous
                           for o in operands)
        from . import cpu

        self.serial = cpu.runs_on_caller_thread(op.name, geom)
        self.on_caller_thread = cpu.on_caller_thread


def _kernel_arguments(op, operands, geom, plan=None):
    """The CPU kernel's operands: C-contiguous arrays; the forward's bias as a 3-D array
    ``(C_out, 1, 1)`` or ``(C_out, H_out, W_out)`` plus a has-bias flag."""
    plan = plan or _CpuPlan(op, operands, geom)
    compute = plan.compute
    arrays = [None if o is None else o.obj if ready else np.ascontiguousarray(o.obj, dtype=compute)
              for o, ready in zip(operands, plan.ready)]
    if op.kind != FORWARD:
        return arrays
    x, weight, bias = arrays
    if bias is None:
        if plan.no_bias is None:  # made on first use (after the memory check), then kept:
            plan.no_bias = np.zeros(plan.bias_shape, dtype=x.dtype)  # never read nor written
        return [x, weight, plan.no_bias, False]
    return [x, weight, bias.reshape(plan.bias_shape), True]


# Free host memory as last read; read again only for a call that needs a noticeable share of
# it, or when the reading is old (see :class:`gpuconv.device.FreeMemory`).
_HOST_MEMORY = FreeMemory(lambda: host_memory_available(), "host")


def _run_cpu(op, operands, geom, plan=None):
    plan = plan or _CpuPlan(op, operands, geom)
    _HOST_MEMORY.check(plan.needed)
    out = _empty_output(plan.out_shape, plan.compute)
    arguments = _kernel_arguments(op, operands, geom, plan)
    if _threading_layer() == "workqueue":
        with _WORKQUEUE_LOCK:
            _run_kernel(plan, arguments, out, geom)
    else:
        _run_kernel(plan, arguments, out, geom)
    return out if out.dtype == plan.dtype else out.astype(plan.dtype)


def _run_kernel(plan, arguments, out, geom):
    if plan.serial:
        plan.on_caller_thread(plan.kernel, *arguments, out, geom)
    else:
        plan.kernel(*arguments, out, geom)


_LAYER = []  # Numba's threading layer, once one has been chosen


def _threading_layer():
    """Numba's threading layer once one has been chosen (by the first parallel launch)."""
    if _LAYER:
        return _LAYER[0]
    import numba

    try:
        _LAYER.append(numba.threading_layer())
    except ValueError:  # no parallel kernel has run yet: be safe for this first call
        return "workqueue"
    return _LAYER[0]


# --------------------------------------------------------------------------------------------
# the call cache: what a call checks and derives from its arguments, once per key
# --------------------------------------------------------------------------------------------

class _Plan:
    """What :func:`call` derived from one key's arguments: the checked geometry, where the
    call runs, and the device's own plan (kernel, output shape, scratch, launch configuration)."""

    __slots__ = ("geom", "target", "unbatched", "batched", "trivial", "device_plan")

    def __init__(self, op, names, operands, sizes, stride, padding, dilation, groups, device):
        checked, geom, target, unbatched = _check_operands(
            op, names, operands, sizes, stride, padding, dilation, groups, device)
        self.geom, self.target, self.unbatched = geom, target, unbatched
        self.batched = tuple(i for i, name in enumerate(names) if name in _BATCHED
                             and operands[i] is not None) if unbatched else ()
        self.trivial = not (geom.batch and geom.in_channels and geom.out_channels)
        self.device_plan = None
        if not self.trivial:
            if target == "cuda":
                from .cuda import launch

                self.device_plan = launch.plan(op, checked, geom)
            else:
                self.device_plan = _CpuPlan(op, checked, geom)


#: Most keys the call cache holds (least recently used first out).
CALL_CACHE_SIZE = 512
_PLANS = collections.OrderedDict()
_PLANS_LOCK = threading.Lock()  # (insertions and evictions; look-ups are atomic)


def clear_call_cache():
    """Forget every cached call plan and memory reading (the next calls check from scratch)."""
    with _PLANS_LOCK:
        _PLANS.clear()
    _HOST_MEMORY.clear()
    launch = sys.modules.get(__package__ + ".cuda.launch")
    if launch is not None:
        launch.clear_caches()


class _Uncacheable(Exception):
    pass


_SCALARS = (bool, float, type(None), np.integer, np.floating, np.bool_)
_JUST_INT = {int}


def _typed(value):
    """``value`` as a key that equals another only for the same types and values (``1``,
    ``True`` and ``1.0`` are equal in Python, but not as arguments here)."""
    kind = type(value)
    if kind is int or kind is str:
        return value
    if kind is tuple or kind is list:
        if len(value) == 2:  # the usual pair of ints (or of pairs: padding), no generator
            first, second = value
            if type(first) is int and type(second) is int:
                return kind, (first, second)
            return kind, (_typed(first), _typed(second))
        if set(map(type, value)) == _JUST_INT:  # ints only (padding's four), in C loops
            return kind, tuple(value)
        return kind, tuple(_typed(v) for v in value)
    if isinstance(value, tuple):  # a tuple's subclass, such as torch.Size (a tensor's shape)
        return kind, tuple(_typed(v) for v in value)
    if isinstance(value, _SCALARS):
        return kind, value
    raise _Uncacheable


def typed_key(value):
    """``value`` (ints, strings, scalars, tuples and lists of them) as a dictionary key that
    equals another only for the same types and values, or None if it has anything else."""
    try:
        return _typed(value)
    except _Uncacheable:
        return None


def _call_key(op_name, arrays, operands, sizes, stride, padding, dilation, groups, device):
    """Everything :func:`_check_operands` and the plan depend on, or None (not cacheable)."""
    parts = [op_name]
    append = parts.append
    for (name, value), o in zip(arrays.items(), operands):
        if o is None:
            append((name, None))
        elif o.on_gpu:
            cai = o.cai
            strides = (cai.get("strides") if cai is not None
                       else getattr(o.obj, "strides", None))
            append((name, type(value), o.shape, o.dtype, True, strides))
        else:
            append((name, type(value), o.shape, o.dtype, False, o.obj.strides))
    try:
        append(_typed(stride))
        append(_typed(padding))
        append(_typed(dilation))
        append(_typed(groups))
        append(_typed(device))
        for name, value in sizes.items():
            append((name, _typed(value)))
    except _Uncacheable:
        return None
    if type(device) is str and device == "auto":
        append(_environment_device())
    if operands[0] is None or not operands[0].on_gpu:  # CPU scratch grows with the threads
        append(_cpu_threads())
    return tuple(parts)


# GPUCONV_DEVICE as os.environ's own mapping stores it (see _environment_device)
_ENV_KEY = os.environ.encodekey(ENV_VAR) if hasattr(os.environ, "encodekey") else None


def _environment_device():
    """The value of ``GPUCONV_DEVICE`` as the process environment holds it, read from
    ``os.environ``'s own mapping without encoding the name and decoding the value on every
    call (a third of the key's cost); the raw value is as good a key."""
    env = os.environ
    data = getattr(env, "_data", None)
    if _ENV_KEY is not None and type(data) is dict:
        return data.get(_ENV_KEY)
    return env.get(ENV_VAR)  # pragma: no cover (a replaced os.environ)


def _cpu_threads():
    """Numba's thread count for the calling thread (:func:`gpuconv.cpu.threads.count`)."""
    global _cpu_threads
    from .cpu.threads import count

    _cpu_threads = count  # the import once; then the counter itself
    return count()


def _plan_for(op, arrays, operands, sizes, stride, padding, dilation, groups, device):
    key = _call_key(op.name, arrays, operands, sizes, stride, padding, dilation, groups,
                    device)
    if key is not None:
        plan = _PLANS.get(key)
        if plan is not None:
            try:
                _PLANS.move_to_end(key)  # most recently used last
            except KeyError:  # evicted by another thread meanwhile
                pass
            return plan
    plan = _Plan(op, list(arrays), operands, sizes, stride, padding, dilation, groups, device)
    if key is not None:
        with _PLANS_LOCK:
            _PLANS[key] = plan
            while len(_PLANS) > CALL_CACHE_SIZE:
                _PLANS.popitem(last=False)
    return plan


def _bfloat16_call(op_name, arrays, stride, padding, dilation, groups, device, sizes):
    """A call on bfloat16 PyTorch tensors (NumPy, and so the kernels, have no bfloat16): every
    operand is converted to float32 by PyTorch on its own device (a pass over each, and a
    float32 copy), the call computes in float32, and its result is rounded once to bfloat16.
    As for every dtype, all operands must share it: the message names the argument."""
    torch = sys.modules["torch"]
    present = [(name, value) for name, value in arrays.items() if value is not None]
    first_name, first = present[0]
    for name, value in present[1:]:
        if getattr(value, "dtype", None) != getattr(first, "dtype", None):
            raise TypeError(
                f"{name} must have the dtype of {first_name} ({first.dtype}), got "
                f"{getattr(value, 'dtype', type(value).__name__)}; cast one of them, e.g. "
                f"{name}.to({first_name}.dtype)")
    if not isinstance(first, torch.Tensor):
        raise TypeError(f"{first_name} must be float16, float32 or float64, got bfloat16")
    converted = {name: None if value is None else value.float()
                 for name, value in arrays.items()}
    result = call(op_name, converted, stride, padding, dilation, groups, device, sizes)
    return result.to(torch.bfloat16)


def call(op_name, arrays, stride, padding, dilation, groups, device, sizes=None):
    """Check and run the operation ``op_name`` of :data:`gpuconv.ops.OPS`: the one path of
    every public function. ``arrays`` maps argument names to arrays in kernel order; the
    result is a new array of the kind of the first one. ``sizes``: ``input_size`` or
    ``weight_size`` where a gradient takes a shape instead of an array, and ``tiling`` for
    the tiled operations.

    What the checks derive from the arguments (geometry, device, kernel, output shape,
    scratch, launch configuration) is cached per key: the op, every operand's type, shape,
    dtype, location and layout, the geometry arguments, the device asked for (and
    ``GPUCONV_DEVICE``) and the sizes. Anything a check depends on is in the key, and only
    calls that passed every check are cached, so a cached call raises exactly what an
    uncached one would (:func:`clear_call_cache` empties the cache)."""
    op = OPS[op_name]
    if op.kind == FORWARD and _records_autograd(arrays):  # the differentiable operators
        name = "tiled_forward" if op.tiled else "forward"  # (the tiled one takes its tiling)
        return autograd(name)(op_name, arrays, stride, padding, dilation, groups, device,
                              **(sizes or {}))
    try:
        operands = [_operand(value, name) for name, value in arrays.items()]
    except _BFloat16:
        return _bfloat16_call(op_name, arrays, stride, padding, dilation, groups, device, sizes)
    plan = _plan_for(op, arrays, operands, sizes or {}, stride, padding, dilation, groups,
                     device)
    geom = plan.geom
    if plan.unbatched:
        operands = list(operands)
        for i in plan.batched:
            operands[i] = _with_batch_axis(operands[i])
    first = operands[0]
    if plan.trivial:
        result = _trivial_result(op, operands, geom)
        if plan.target == "cuda" and first.on_gpu:
            from .cuda import launch

            result = launch.from_host_like(first.obj, result)
    elif plan.target == "cuda":
        from .cuda import launch

        result = launch.run(op, operands, geom, plan.device_plan)
    else:
        result = _run_cpu(op, operands, geom, plan.device_plan)
    if not first.on_gpu:
        template = arrays[next(iter(arrays))]
        if type(template) is not np.ndarray:
            result = _wrap_like(template, result)
    return result[0] if plan.unbatched and op.kind != WEIGHT_GRAD else result


def conv2d(x, weight, bias=None, stride=1, padding=0, dilation=1, groups=1, *, device="auto"):
    """2-D convolution with shared weights (cross-correlation, as in deep learning).

    One kernel per output feature map, summed across the input channels of its group::

        y[n, o, i, j] = bias[o] + sum_{c, u, v} weight[o, c, u, v]
                        * x_padded[n, g(o) * C_in/groups + c, i * s_h + u * d_h, j * s_w + v * d_w]

    Args:
        x: input ``(N, C_in, H, W)``, or ``(C_in, H, W)`` for one image (the result is then
            ``(C_out, H_out, W_out)``); float16, float32 or float64 (float16 is stored in half
            precision and accumulated in float32), or bfloat16 for PyTorch tensors (converted
            to float32 by PyTorch, computed in float32, the result rounded once to bfloat16).
            NumPy (or any host array), or a
            GPU array (CuPy, PyTorch CUDA tensor, Numba device array). ``C_in`` may be 0: the
            result is then the bias (zeros without one), as in PyTorch.
        weight: ``(C_out, C_in/groups, kH, kW)``, same dtype as ``x``.
        bias: ``None`` or ``(C_out,)``.
        stride: int or ``(s_h, s_w)``, >= 1.
        padding: int or ``(p_h, p_w)`` >= 0 (zeros on both sides), ``((top, bottom),
            (left, right))`` (explicit, asymmetric), ``"valid"`` (none) or ``"same"`` (output
            size = input size; stride 1 only; an odd total puts the extra row/column at the
            bottom/right).
        dilation: int or ``(d_h, d_w)``, >= 1.
        groups: divides ``C_in`` and ``C_out``.
        device: ``"auto"``, ``"cpu"`` or ``"cuda"``; see :func:`gpuconv.select_device`.

    Returns:
        ``(N, C_out, H_out, W_out)`` array of the same kind and dtype as ``x``, with
        ``H_out = (H + pad_top + pad_bottom - d_h * (kH - 1) - 1) // s_h + 1`` (same for W);
        ``C_out`` may be 0 (an empty result). A new array: it never aliases an input.
        PyTorch tensors that require grad (with grad mode on) go through the differentiable
        operators of :mod:`gpuconv.torch`: the result then has a ``grad_fn``, and the call runs
        on the tensors' device.

    >>> import numpy as np, gpuconv
    >>> x = np.arange(16, dtype=np.float64).reshape(1, 1, 4, 4)
    >>> w = np.ones((1, 1, 2, 2))
    >>> gpuconv.conv2d(x, w, device="cpu")[0, 0]
    array([[10., 14., 18.],
           [26., 30., 34.],
           [42., 46., 50.]])
    """
    return call("conv2d", {"x": x, "weight": weight, "bias": bias}, stride, padding,
                dilation, groups, device)


def local_conv2d(x, weight, bias=None, stride=1, padding=0, dilation=1, groups=1, *,
                 device="auto"):
    """Locally connected (unshared) 2-D convolution: a different kernel at every output position.

    ::

        y[n, o, i, j] = bias[o(, i, j)] + sum_{c, u, v} weight[o, i, j, c, u, v]
                        * x_padded[n, g(o) * C_in/groups + c, i * s_h + u * d_h, j * s_w + v * d_w]

    Args:
        x: input ``(N, C_in, H, W)`` or ``(C_in, H, W)``, float16, float32 or float64 (host or GPU
            array, as :func:`conv2d`).
        weight: ``(C_out, H_out, W_out, C_in/groups, kH, kW)`` (Chainer's and Theano's
            layout), same dtype as ``x``; ``H_out, W_out`` must match the geometry.
        bias: ``None``, ``(C_out,)`` (one per output map) or ``(C_out, H_out, W_out)``
            (one per output position).
        stride, padding, dilation, groups, device: as :func:`conv2d`.

    Returns:
        ``(N, C_out, H_out, W_out)`` array of the same kind and dtype as ``x``; ``H_out`` and
        ``W_out`` follow the formula of :func:`conv2d`. If every position's kernel is the
        same, the result equals :func:`conv2d` with that kernel. Tensors that require grad
        record the autograd graph, as in :func:`conv2d`.

    >>> import numpy as np, gpuconv
    >>> x = np.arange(9, dtype=np.float64).reshape(1, 1, 3, 3)
    >>> w = np.zeros((1, 2, 2, 1, 2, 2)); w[0, 0, 0] = 1.0; w[0, 1, 1, 0, 1, 1] = 2.0
    >>> gpuconv.local_conv2d(x, w, device="cpu")[0, 0]
    array([[ 8.,  0.],
           [ 0., 16.]])
    """
    return call("local_conv2d", {"x": x, "weight": weight, "bias": bias}, stride, padding,
                dilation, groups, device)


def tiled_conv2d(x, weight, bias=None, stride=1, padding=0, dilation=1, groups=1, *,
                 tiling="periodic", device="auto"):
    """Tiled (partly shared) 2-D convolution: ``T_h x T_w`` kernels, each shared by a set of
    output positions; between :func:`conv2d` (one kernel) and :func:`local_conv2d` (one per
    position).

    ::

        y[n, o, i, j] = bias[o(, r(i), c(j))] + sum_{c', u, v} weight[o, r(i), c(j), c', u, v]
                        * x_padded[n, g(o) * C_in/groups + c', i * s_h + u * d_h, j * s_w + v * d_w]

    with the kernel slot ``(r(i), c(j))`` of output position ``(i, j)``:

    - ``tiling="periodic"``: ``(i mod T_h, j mod T_w)``, the tiled convolution of Le et al.
      (NIPS 2010): positions ``T_h`` rows (``T_w`` columns) apart share a kernel, a tile of
      ``T_h x T_w`` kernels repeats over the map;
    - ``tiling="blocks"``: ``(floor(i * T_h / H_out), floor(j * T_w / W_out))``: the map is
      cut into ``T_h x T_w`` near-equal contiguous regions, each sharing one kernel
      (locally shared weights).

    ``T = (1, 1)`` is :func:`conv2d` (and runs its kernels); ``T = (H_out, W_out)`` is
    :func:`local_conv2d` (and runs its kernels), in both tilings.

    Args:
        x: input ``(N, C_in, H, W)`` or ``(C_in, H, W)``, as :func:`conv2d`.
        weight: ``(C_out, T_h, T_w, C_in/groups, kH, kW)``, same dtype as ``x``, with
            ``1 <= T_h <= H_out`` and ``1 <= T_w <= W_out``.
        bias: ``None``, ``(C_out,)`` (one per output map) or ``(C_out, T_h, T_w)`` (one per
            kernel slot).
        stride, padding, dilation, groups, device: as :func:`conv2d`.
        tiling: ``"periodic"`` or ``"blocks"``.

    Returns:
        ``(N, C_out, H_out, W_out)`` array of the same kind and dtype as ``x``, ``H_out`` and
        ``W_out`` by the formula of :func:`conv2d`. Tensors that require grad record the
        autograd graph, as in :func:`conv2d`.

    >>> import numpy as np, gpuconv
    >>> x = np.ones((1, 1, 4, 4))
    >>> w = np.zeros((1, 2, 2, 1, 1, 1)); w[0, 0, 0] = 1.0; w[0, 1, 1] = 2.0
    >>> gpuconv.tiled_conv2d(x, w, device="cpu")[0, 0]
    array([[1., 0., 1., 0.],
           [0., 2., 0., 2.],
           [1., 0., 1., 0.],
           [0., 2., 0., 2.]])
    >>> gpuconv.tiled_conv2d(x, w, tiling="blocks", device="cpu")[0, 0]
    array([[1., 1., 0., 0.],
           [1., 1., 0., 0.],
           [0., 0., 2., 2.],
           [0., 0., 2., 2.]])
    """
    return call("tiled_conv2d", {"x": x, "weight": weight, "bias": bias}, stride, padding,
                dilation, groups, device, sizes={"tiling": tiling})
