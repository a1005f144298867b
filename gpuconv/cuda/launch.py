"""The CUDA path: array handling and kernel launches (the kernels live in
:mod:`gpuconv.cuda.kernels`).

Contract of :func:`run` (its caller, the public layer :mod:`gpuconv.conv`, has validated
everything; :mod:`gpuconv.ops` names the launch function of each operation):

- host inputs (NumPy, any strides or order, read-only) are copied to the current GPU, the
  result is copied back and returned as a NumPy array of the input dtype;
- GPU inputs (anything with ``__cuda_array_interface__``: CuPy arrays, PyTorch CUDA tensors,
  Numba device arrays) are never copied through the host. The result is the same kind of
  array (CuPy in, CuPy out; torch in, torch out; otherwise a Numba device array) on the
  same GPU, and the work is queued on the stream ``x`` belongs to (PyTorch's or CuPy's
  current stream, else the CAI v3 ``stream`` field, or a Numba device array's own stream),
  without blocking the host. Operands that name another stream are synchronised first, as
  the interface asks. Inputs on different GPUs raise
  ``ValueError``; non-contiguous ones get a contiguous copy made on the GPU;
- calls that need no kernel (an empty batch, zero channels) never reach this module: the
  public layer makes their result and :func:`from_host_like` puts it on the GPU.

The output is always freshly allocated (it never aliases an input) and C-contiguous.
"""

from __future__ import annotations

import contextlib
import functools
import math
import sys
import threading

import numpy as np
from numba import cuda

from . import (autotune, conv2d_gemm, conv2d_gemm_grad, fastlaunch, grad_kernels, kernels,
               local_gemm, local_grad_gemm, local_grad_positions, local_stream)
from ..device import (DLPACK_CUDA_DEVICES, FreeMemory, autotune_enabled,
                      is_c_contiguous, simulator_enabled, unit_axes_interface)

__all__ = ["run", "from_host_like"]


# --------------------------------------------------------------------------------------------
# operands
# --------------------------------------------------------------------------------------------

def _is_numba_device_array(obj):
    return bool(getattr(obj, "__cuda_ndarray__", False))


def _library(obj):
    """``"torch"``, ``"cupy"`` or ``"numba"``: which library the result should come from.
    By type, subclasses included (torchvision's image tensors, a user's tensor subclass):
    such a tensor is PyTorch's, on PyTorch's current stream, and comes back a tensor."""
    root = type(obj).__module__.split(".")[0]
    if root in ("torch", "cupy"):
        return root
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(obj, torch.Tensor):
        return "torch"
    cupy = sys.modules.get("cupy")
    if cupy is not None and isinstance(obj, cupy.ndarray):
        return "cupy"
    return "numba"


def _device_id(obj):
    """Ordinal of the GPU holding ``obj``, or None when it cannot tell (host arrays, and
    producers that say nothing of their device)."""
    library = _library(obj)
    if library == "torch":
        return obj.device.index
    if library == "cupy":
        return obj.device.id
    if _is_numba_device_array(obj):  # the context its memory belongs to (no dlpack device)
        try:
            return int(obj.gpu_data.context.device.id)
        except (AttributeError, TypeError, ValueError):
            return None
    dlpack_device = getattr(obj, "__dlpack_device__", None)
    if dlpack_device is not None:
        try:
            kind, index = dlpack_device()
            if int(kind) in DLPACK_CUDA_DEVICES:
                return int(index)
        except Exception:
            pass
    return None


def _stream_of(obj, device=None, cai=None):
    """The Numba stream the producer of ``obj`` asked consumers to order work on
    (``device``: the GPU ordinal of ``obj`` when known, ``cai``: its array interface).

    PyTorch exports no stream in its array interface, so its current stream on the tensor's
    device is asked directly; CuPy's current stream likewise; other producers say it in the
    interface's ``stream`` field (v3), where 1 and 2 mean the legacy and per-thread default
    streams and no value means no ordering is needed (the default stream).
    """
    if _is_numba_device_array(obj):
        stream = getattr(obj, "stream", 0)
        return stream if stream else _default_stream()
    library = _library(obj)
    if library == "torch":
        handle = _torch_stream(obj, device)
    elif library == "cupy":
        with obj.device:
            handle = sys.modules["cupy"].cuda.get_current_stream().ptr
    else:
        handle = (cai or obj.__cuda_array_interface__).get("stream")
    return _numba_stream(handle, device)


# How PyTorch's current stream is read: [the raw reader, or None for torch.cuda.current_stream],
# decided by the first call on a CUDA tensor (see _torch_raw_stream).
_TORCH_STREAM_READER = []
_TORCH_STREAM_NOTE = []  # why the raw reader is not used, if it is not


def _torch_stream(obj, device):
    """The handle of PyTorch's current stream on the GPU ``device`` holding the tensor ``obj``."""
    torch = sys.modules["torch"]
    if device is not None:
        if not _TORCH_STREAM_READER:
            _TORCH_STREAM_READER.append(_torch_raw_stream(torch, obj.device, device))
        raw = _TORCH_STREAM_READER[0]
        if raw is not None:
            return raw(device)
    return torch.cuda.current_stream(obj.device).cuda_stream


def _torch_raw_stream(torch, torch_device, device):
    """PyTorch's ``torch._C._cuda_getCurrentRawStream`` (the handle of the current stream on a
    GPU ordinal, as PyTorch's compiled code reads it: no Stream object per call) if it gives
    what ``torch.cuda.current_stream`` gives, on the current stream and on a new one made
    current; else None (and ``_TORCH_STREAM_NOTE`` says why)."""
    raw = getattr(getattr(torch, "_C", None), "_cuda_getCurrentRawStream", None)
    if raw is None:
        _TORCH_STREAM_NOTE.append("torch._C._cuda_getCurrentRawStream is missing")
        return None
    try:
        same = int(raw(device)) == int(torch.cuda.current_stream(torch_device).cuda_stream)
        side = torch.cuda.Stream(device=torch_device)
        with torch.cuda.stream(side):
            same_side = int(raw(device)) == int(side.cuda_stream) != 0
    except Exception as exc:  # another PyTorch
        _TORCH_STREAM_NOTE.append(f"reading the raw stream failed ({type(exc).__name__}: {exc})")
        return None
    if not (same and same_side):
        _TORCH_STREAM_NOTE.append("the raw stream differs from torch.cuda.current_stream")
        return None
    return raw


# Numba wrappers of the callers' streams, per (GPU, handle): made once, not on every call.
_STREAMS = {}


_DEFAULT_STREAM = []


def _default_stream():
    """Numba's default stream, one object for every call: numba-cuda makes a new one per
    ``cuda.default_stream()``, and streams compare by identity, so the fast launch's cache
    (keyed on the stream) would miss on every call. Its handle, 0, names the default stream
    in any context. (The simulator's streams are made afresh.)"""
    if _DEFAULT_STREAM:
        return _DEFAULT_STREAM[0]
    stream = cuda.default_stream()
    if not simulator_enabled():
        _DEFAULT_STREAM.append(stream)
    return stream


def _numba_stream(handle, device=None):
    """The Numba stream object for a stream handle (0/None: the default stream; 1, 2: the
    legacy and per-thread default streams) on GPU ``device`` (None: the current one)."""
    key = (device, handle)
    stream = _STREAMS.get(key)
    if stream is None:
        if not handle:
            stream = _default_stream()
        elif handle == 1:
            stream = cuda.legacy_default_stream()
        elif handle == 2:
            stream = cuda.per_thread_default_stream()
        else:
            stream = cuda.external_stream(handle)
        if device is not None:  # (the simulator's streams are not cached: no device ids)
            if len(_STREAMS) > 256:
                _STREAMS.clear()
            _STREAMS[key] = stream
    return stream


def _same_stream(a, b):
    try:
        return int(a) == int(b)
    except TypeError:  # the simulator's streams have no handle
        return a is b


def _as_device_array(obj, sync, cai=None):
    """A device array viewing ``obj`` (no copy); with ``sync``, first wait for the stream
    that produced it. ``cai``: ``obj``'s array interface, if already read. With the fast
    launch path on, an unmasked array that needs no wait is viewed as a
    :class:`~gpuconv.cuda.fastlaunch.DeviceView` (no Numba object, no driver query), else as
    a Numba device array."""
    if _is_numba_device_array(obj):
        if sync and getattr(obj, "stream", 0):
            obj.stream.synchronize()
        return obj
    if cai is None:
        cai = obj.__cuda_array_interface__
    if _views() and (not sync or cai.get("stream") is None) and cai.get("mask") is None:
        return fastlaunch.DeviceView.from_interface(cai, obj)
    if not sync and cai.get("stream") is not None:
        # nothing to wait for: no need for a Numba wrapper of the producer's stream
        cai = dict(cai, stream=None)
    return cuda.from_cuda_array_interface(cai, owner=obj, sync=sync)


class _View6:
    """A 6-D ``__cuda_array_interface__`` over the same memory (leading length-1 axes)."""

    def __init__(self, array):
        cai = array.__cuda_array_interface__
        shape = (1,) * (6 - len(cai["shape"])) + tuple(cai["shape"])
        self.__cuda_array_interface__ = dict(unit_axes_interface(cai, shape), version=3,
                                             stream=None)
        self._keep = array


def _is_contiguous(array):
    return bool(array.is_c_contiguous())


def _numba_empty(stream):
    """Allocator of uninitialised Numba device arrays ordered on ``stream``."""
    return lambda shape, dtype: cuda.device_array(shape, dtype=dtype, stream=stream)


def _contiguous(array, stream, empty=None):
    """``array`` itself if C-contiguous, else a contiguous copy made by a kernel on the GPU."""
    if _is_contiguous(array):
        return array
    dst = (empty or _numba_empty(stream))(array.shape, array.dtype)
    if array.size == 0:
        return dst
    if simulator_enabled():
        src6 = cuda.devicearray.FakeCUDAArray(
            np.asarray(array._ary)[(None,) * (6 - array.ndim)])
        dst6 = cuda.devicearray.FakeCUDAArray(dst._ary.reshape((1,) * (6 - array.ndim) + array.shape))
    else:
        src6 = cuda.as_cuda_array(_View6(array), sync=False)
        dst6 = dst.reshape((1,) * (6 - array.ndim) + array.shape)
    copy = kernels.compiled(kernels.copy_kernel(kernels.dtype_code(array.dtype)))
    threads = 256
    blocks = max(1, min(-(-array.size // threads), 65535))
    copy[blocks, threads, stream](src6, dst6)
    return dst


# --------------------------------------------------------------------------------------------
# launches (all arrays Numba device arrays, C-contiguous, one dtype)
# --------------------------------------------------------------------------------------------

def _flat(array):
    """The 1-D view of a C-contiguous device array (the kernels index flat memory). When
    launches take the fast path, the array itself: :class:`~gpuconv.cuda.fastlaunch.FastKernel`
    passes a C-contiguous array to a 1-D parameter as its flat view without making one
    (a Numba reshape builds a new device array object on every call)."""
    if _views():
        return array
    return array.reshape(array.size)


def _views():
    """Whether launches take the fast path (:mod:`gpuconv.cuda.fastlaunch`: on, and not in
    the simulator, whose dispatcher takes Numba arrays of the kernels' own ranks only)."""
    if _FLAT_VIEWS_NEEDED[0] is None:
        _FLAT_VIEWS_NEEDED[0] = simulator_enabled()
    return not _FLAT_VIEWS_NEEDED[0] and fastlaunch.enabled()


_FLAT_VIEWS_NEEDED = [None]  # in the simulator (decided when Numba is imported)


def launch_conv2d(x, weight, bias, out, geom, stream, config=None, empty=None):
    """Write conv2d into ``out``; ``config`` overrides :func:`~gpuconv.cuda.kernels.conv2d_config`,
    ``empty(shape, dtype)`` allocates scratch (default: Numba device arrays)."""
    config = config or kernels.conv2d_config(geom, x.dtype)
    if bias is None:  # the kernels read the bias only with has_bias: the output stands in
        bias, has_bias = out, 0  # (an allocation per call saved)
    else:
        has_bias = 1
    kernel = kernels.compiled(config.kernel)
    if isinstance(config, conv2d_gemm.Conv2dGemmConfig):  # channel-heavy layers
        return conv2d_gemm.launch(kernel, config, _flat(x), _flat(weight), _flat(bias),
                                  _flat(out), has_bias, geom, stream)
    kernel[config.grid, config.block, stream, config.shared_bytes](
        _flat(x),                   # (n, c_I, h, w)
        _flat(weight),              # (c_O, c_Ig, k_H, k_W)
        _flat(bias),                # (c_O,), or the output unread
        _flat(out),                 # (n, c_O, h_O, w_O), written
        has_bias,                   # 0 or 1
        geom.batch, geom.in_channels, geom.in_height, geom.in_width,
        geom.out_channels, geom.out_height, geom.out_width,
        geom.in_channels_per_group, geom.out_channels_per_group,
        geom.stride_h, geom.stride_w,
        geom.pad_top, geom.pad_left,
        geom.dilation_h, geom.dilation_w,
        config.tiles_x,             # output tiles along W
        config.tile_h, config.tile_w,  # input tile with halo
        config.chunk,               # input channels per shared-memory stage
    )


#: The local_conv2d forward's launch choice (made with the other forward choices, in
#: :func:`gpuconv.cuda.kernels.local_conv2d_forward_config`).
local_conv2d_forward_config = kernels.local_conv2d_forward_config


def launch_local_conv2d(x, weight, bias, out, geom, stream, config=None, empty=None,
                        tiles=None):
    """Write local_conv2d into ``out``; ``config`` overrides
    :func:`local_conv2d_forward_config`, ``empty(shape, dtype)`` allocates
    scratch (default: Numba device arrays). The operands are read in the caller's layouts
    (no transposed copy); with more than one split-K slice the partial sums go to a scratch
    array of :func:`~gpuconv.cuda.kernels.local_conv2d_partial_dtype`, then a second kernel
    adds them in order. ``tiles = (T_h, T_w)``: the weights are kernel slots, for a
    ``config`` of the tiled kernel (:mod:`gpuconv.cuda.tiled`)."""
    config = config or local_conv2d_forward_config(geom, x.dtype)
    new = empty or _numba_empty(stream)
    if bias is None:  # the kernels read the bias only with has_bias: the output stands in
        bias, has_bias, bias_len = out, 0, 1
    else:
        has_bias, bias_len = 1, (bias.shape[1] * bias.shape[2] if bias.ndim == 3 else 1)
    if isinstance(config, local_stream.LocalStreamConfig):  # small batches
        return local_stream.launch(kernels.compiled(config.kernel), config, _flat(x),
                                   _flat(weight), _flat(bias), _flat(out), has_bias,
                                   bias_len, geom, stream)
    if isinstance(config, local_gemm.LocalGemmConfig):  # long products of many maps
        return local_gemm.launch(kernels.compiled(config.kernel), config, _flat(x),
                                 _flat(weight), _flat(bias), _flat(out), has_bias, bias_len,
                                 geom, stream)
    if config.slices > 1:
        part = new((config.slices * out.size,), kernels.local_conv2d_partial_dtype(out.dtype))
    else:
        part = out
    kernel = kernels.compiled(config.kernel)
    kernel[config.grid, config.block, stream, config.shared_bytes](
        _flat(x),                   # (n, c_I, h, w)
        _flat(weight),              # (c_O, h_O, w_O, c_Ig, k_H, k_W), the caller's layout
        _flat(bias),                # (c_O, 1 or P), or the output unread
        _flat(part),                # (slices, n, c_O, h_O, w_O), written
        has_bias,                   # 0 or 1
        bias_len,                   # 1 (per map) or P (per position)
        geom.batch, geom.in_channels, geom.in_height, geom.in_width,
        geom.out_channels, geom.out_height, geom.out_width,
        geom.in_channels_per_group, geom.out_channels_per_group,
        geom.stride_h, geom.stride_w,
        geom.pad_top, geom.pad_left,
        geom.dilation_h, geom.dilation_w,
        config.tiles_x,             # position tiles along an output row
        config.batch_tiles,         # batch tiles (neighbours along grid x)
        config.stage_rows,          # kernel rows per shared-memory stage
        config.slice_rows,          # kernel rows per split-K slice
        config.w_pitch, config.pos_pitch, config.x_pitch,  # shared-memory pitches
        out.size if config.slices > 1 else 0,  # elements between slices
        *config.walk,               # staging walks: columns, walkers, steps
        *(tiles or (geom.out_height, geom.out_width)),  # kernel slots (tiled kernel only)
    )
    if config.slices > 1:
        total = kernels.compiled(grad_kernels.sum_slices_kernel(kernels.dtype_code(out.dtype)))
        threads = 256
        blocks = kernels.check_grid((max(1, min(-(-out.size // threads), 65535)),),
                                    "a slice sum")
        total[blocks, threads, stream](_flat(part), _flat(out), config.slices, out.size)


def no_scratch_elements(geom, dtype):
    """Device scratch of a launch that writes only its output: none."""
    return 0


def local_conv2d_scratch_elements(geom, dtype):
    """Device scratch of :func:`launch_local_conv2d`, in elements of ``dtype``: the split-K
    partial sums (float16's float32 partial sums count two each), if it splits ``K``."""
    return _local_scratch_elements(local_conv2d_forward_config(geom, dtype), geom, dtype)


def _conv2d_scratch_elements(config, geom, dtype):
    """The scratch of :func:`launch_conv2d` with ``config``: none, whatever the kernel
    (without a bias the output stands in for it)."""
    return 0


def _local_scratch_elements(config, geom, dtype):
    """The scratch of :func:`launch_local_conv2d` with ``config`` (any of its kinds)."""
    partial = 0
    if config.slices > 1:
        partial = (config.slices * math.prod(geom.output_shape)
                   * kernels.local_conv2d_partial_dtype(dtype).itemsize
                   // np.dtype(dtype).itemsize)
    return partial


# --------------------------------------------------------------------------------------------
# gradient launches (all arrays Numba device arrays, C-contiguous, one dtype; the kernels
# live in :mod:`gpuconv.cuda.grad_kernels` and, for the local gradients,
# :mod:`gpuconv.cuda.local_grad_gemm`). Each fills every element of ``out``, queues its
# work on ``stream`` without waiting for it, and gives bitwise equal results for equal
# inputs. ``config`` overrides the ``*_config`` choice (tests use it); ``empty(shape,
# dtype)`` allocates scratch (default: Numba device arrays).
# --------------------------------------------------------------------------------------------

def conv2d_input_grad_config(geom, dtype):
    """The conv2d input gradient's kernel for ``geom``: the implicit GEMM of
    :mod:`~gpuconv.cuda.conv2d_gemm_grad` for channel-heavy layers
    (:func:`~gpuconv.cuda.conv2d_gemm_grad.use_gemm_grad`), else the direct kernel."""
    if conv2d_gemm_grad.use_gemm_grad(geom):
        return conv2d_gemm_grad.input_grad_gemm_config(geom, dtype)
    return grad_kernels.conv2d_input_grad_config(geom, dtype)


def conv2d_weight_grad_config(geom, dtype):
    """The conv2d weight gradient's kernel for ``geom``, chosen as the input gradient's."""
    if conv2d_gemm_grad.use_gemm_grad(geom):
        return conv2d_gemm_grad.weight_grad_gemm_config(geom, dtype)
    return grad_kernels.conv2d_weight_grad_config(geom, dtype)


def conv2d_weight_grad_scratch_elements(geom, dtype):
    """Device scratch of :func:`launch_conv2d_weight_grad` (the chosen kernel's partial sums),
    in elements of ``dtype``."""
    if conv2d_gemm_grad.use_gemm_grad(geom):
        return conv2d_gemm_grad.weight_grad_gemm_scratch(geom, dtype)
    return grad_kernels.conv2d_weight_grad_scratch_elements(geom, dtype)


def launch_conv2d_input_grad(grad_output, weight, out, geom, stream, empty=None, config=None):
    """``out (n, c_I, h, w)`` = the gradient of conv2d's input, from ``grad_output
    (n, c_O, h_O, w_O)`` and ``weight (c_O, c_Ig, k_H, k_W)``. No scratch."""
    if geom.batch == 0:
        return
    config = config or conv2d_input_grad_config(geom, out.dtype)
    kernel = kernels.compiled(config.kernel)
    if isinstance(config, conv2d_gemm_grad.InputGradGemmConfig):  # channel-heavy layers
        return conv2d_gemm_grad.launch_input_grad(kernel, config, _flat(grad_output),
                                                  _flat(weight), _flat(out), geom, stream)
    kernel[config.grid, config.block, stream, config.shared_bytes](
        _flat(grad_output),         # (n, c_O, h_O, w_O)
        _flat(weight),              # (c_O, c_Ig, k_H, k_W)
        _flat(out),                 # (n, c_I, h, w), written
        geom.batch, geom.in_channels, geom.in_height, geom.in_width,
        geom.out_channels, geom.out_height, geom.out_width,
        geom.in_channels_per_group, geom.out_channels_per_group,
        geom.stride_h, geom.stride_w,
        geom.pad_top, geom.pad_left,
        geom.dilation_h, geom.dilation_w,
        config.tiles_x,             # tiles along a phase's sub-grid width
        config.gt_h, config.gt_w,   # grad_output tile
        config.chunk,               # output channels per shared-memory stage
    )


def launch_conv2d_weight_grad(x, grad_output, out, geom, stream, empty=None, config=None):
    """``out (c_O, c_Ig, k_H, k_W)`` = the gradient of conv2d's weights, from ``x
    (n, c_I, h, w)`` and ``grad_output (n, c_O, h_O, w_O)`` (zeros for an empty batch).

    With more than one slice of the batch x positions (or any for float16, whose partial
    sums stay float32), the partial sums go to a scratch array of
    :func:`~gpuconv.cuda.grad_kernels.partial_dtype` from ``empty``, then a second kernel
    adds them in order."""
    config = config or conv2d_weight_grad_config(geom, out.dtype)
    size = out.size
    new = empty or _numba_empty(stream)
    direct = config.slices == 1 and config.scratch_elements == 0
    part = out if direct else new((max(config.slices, 1) * size,),
                                  grad_kernels.partial_dtype(out.dtype))
    if config.slices > 0 and isinstance(config, conv2d_gemm_grad.WeightGradGemmConfig):
        conv2d_gemm_grad.launch_weight_grad(kernels.compiled(config.kernel), config, _flat(x),
                                            _flat(grad_output), _flat(part), geom, stream)
    elif config.slices > 0:
        kernel = kernels.compiled(config.kernel)
        kernel[config.grid, config.block, stream](
            _flat(x),                   # (n, c_I, h, w)
            _flat(grad_output),         # (n, c_O, h_O, w_O)
            _flat(part),                # (slices, c_O, c_Ig, k_H, k_W), written
            geom.in_channels, geom.in_height, geom.in_width,
            geom.out_channels, geom.out_height, geom.out_width,
            geom.in_channels_per_group, geom.out_channels_per_group,
            geom.stride_h, geom.stride_w,
            geom.pad_top, geom.pad_left,
            geom.dilation_h, geom.dilation_w,
            geom.kernel_height, geom.kernel_width,
            geom.batch * geom.out_height * geom.out_width,  # m: (image, position) pairs
            config.m_slice,             # m per slice
        )
    if not direct:
        total = kernels.compiled(grad_kernels.sum_slices_kernel(kernels.dtype_code(out.dtype)))
        threads = 256
        blocks = kernels.check_grid((max(1, min(-(-size // threads), 65535)),), "a slice sum")
        total[blocks, threads, stream](_flat(part), _flat(out), config.slices, size)


def launch_local_conv2d_input_grad(grad_output, weight, out, geom, stream, empty=None,
                                   config=None):
    """``out (n, c_I, h, w)`` = the gradient of local_conv2d's input, from ``grad_output
    (n, c_O, h_O, w_O)`` and ``weight (c_O, h_O, w_O, c_Ig, k_H, k_W)`` (the caller's
    layout, read as is). Many maps a group: the per-position GEMM into columns and their
    gather (:mod:`gpuconv.cuda.local_grad_positions`, scratch from ``empty``); else no scratch:
    the batched-GEMM gather of :mod:`gpuconv.cuda.local_grad_gemm` where its stage fits,
    else the direct kernel."""
    if geom.batch == 0:
        return
    config = config or local_conv2d_input_grad_config(geom, out.dtype)
    if isinstance(config, local_grad_positions.LocalInputGradColsConfig):
        new = empty or _numba_empty(stream)
        gyt, cols = (new(shape, dtype) for shape, dtype in
                     local_grad_positions.scratch_shapes(config, out.dtype))
        return local_grad_positions.launch(config, _flat(grad_output), _flat(weight), _flat(gyt),
                                       _flat(cols), _flat(out), geom, stream, kernels.compiled)
    if isinstance(config, local_grad_gemm.LocalInputGradGemmConfig):
        return _launch_local_input_grad_gemm(grad_output, weight, out, geom, stream, config)
    kernel = kernels.compiled(config.kernel)
    kernel[config.grid, config.block, stream, config.shared_bytes](
        _flat(grad_output),         # (n, c_O, h_O, w_O)
        _flat(weight),              # (c_O, h_O, w_O, c_Ig, k_H, k_W)
        _flat(out),                 # (n, c_I, h, w), written
        geom.batch, geom.in_channels, geom.in_height, geom.in_width,
        geom.out_channels, geom.out_height, geom.out_width,
        geom.in_channels_per_group, geom.out_channels_per_group,
        geom.stride_h, geom.stride_w,
        geom.pad_top, geom.pad_left,
        geom.dilation_h, geom.dilation_w,
        config.v_tiles,             # tiles of 32 columns of a phase's sub-grid
        config.slab_j,              # positions staged per kernel row
        config.chunk,               # output channels per shared-memory stage
    )


def launch_local_conv2d_weight_grad(x, grad_output, out, geom, stream, empty=None,
                                    config=None):
    """``out (c_O, h_O, w_O, c_Ig, k_H, k_W)`` = the gradient of local_conv2d's weights in
    the caller's layout, from ``x (n, c_I, h, w)`` and ``grad_output (n, c_O, h_O, w_O)``
    (zeros for an empty batch). Many maps a group: a GEMM a position
    (:mod:`gpuconv.cuda.local_grad_positions`, the transposed gradient in scratch from
    ``empty``). Else the batched GEMM, whose batch slices, if it splits the batch, sum into
    scratch from ``empty`` (the compute type), then a second kernel adds them in order."""
    config = config or local_conv2d_weight_grad_config(geom, out.dtype)
    if isinstance(config, local_grad_positions.LocalWeightGradPosConfig):
        gyt = (empty or _numba_empty(stream))((config.gyt_elements,), grad_output.dtype)
        return local_grad_positions.launch_weight_grad(config, _flat(x), _flat(grad_output),
                                                   _flat(gyt), _flat(out), geom, stream,
                                                   kernels.compiled)
    if isinstance(config, local_grad_gemm.LocalWeightGradGemmConfig):
        return _launch_local_weight_grad_gemm(x, grad_output, out, geom, stream, empty,
                                              config)
    kernel = kernels.compiled(config.kernel)
    kernel[config.grid, config.block, stream](
        _flat(x),                   # (n, c_I, h, w)
        _flat(grad_output),         # (n, c_O, h_O, w_O)
        _flat(out),                 # (c_O, h_O, w_O, c_Ig, k_H, k_W), written
        geom.batch, geom.in_channels, geom.in_height, geom.in_width,
        geom.out_channels, geom.out_height, geom.out_width,
        geom.in_channels_per_group, geom.out_channels_per_group,
        geom.stride_h, geom.stride_w,
        geom.pad_top, geom.pad_left,
        geom.dilation_h, geom.dilation_w,
        config.row_blocks,          # blocks of kernel rows
    )


def local_conv2d_input_grad_config(geom, dtype):
    """The local input gradient's launch choice: for many maps a group
    (:func:`gpuconv.cuda.local_grad_positions.use_positions`) the per-position GEMM into columns;
    else the batched-GEMM gather of :mod:`gpuconv.cuda.local_grad_gemm`, or the direct
    kernel of :mod:`gpuconv.cuda.grad_kernels` for a layer the GEMM's stage cannot hold (one
    map's staged gradient and weights over 32 KiB: very wide, strided or dilated kernels)."""
    if local_grad_positions.use_positions(geom):
        try:
            return local_grad_positions.local_input_grad_cols_config(geom, dtype)
        except ValueError:  # a grid beyond CUDA's limits (over 65535 maps): the gathers
            pass
    try:
        return local_grad_gemm.local_input_grad_gemm_config(geom, dtype)
    except ValueError:
        return grad_kernels.local_conv2d_input_grad_config(geom, dtype)


def local_conv2d_weight_grad_config(geom, dtype):
    """The local weight gradient's launch choice: for many maps a group
    (:func:`gpuconv.cuda.local_grad_positions.use_positions`) a GEMM a position; else the batched
    GEMM of :mod:`gpuconv.cuda.local_grad_gemm`, or the direct kernel of
    :mod:`gpuconv.cuda.grad_kernels` for a layer the GEMM's stage cannot hold."""
    if local_grad_positions.use_positions(geom):
        try:
            return local_grad_positions.local_weight_grad_pos_config(geom, dtype)
        except ValueError:  # a grid beyond CUDA's limits: the batched GEMM
            pass
    try:
        return local_grad_gemm.local_weight_grad_gemm_config(geom, dtype)
    except ValueError:
        return grad_kernels.local_conv2d_weight_grad_config(geom, dtype)


def local_conv2d_input_grad_scratch_elements(geom, dtype):
    """Device scratch of :func:`launch_local_conv2d_input_grad`, in elements of ``dtype``:
    the columns path's transposed gradient and columns (none for the gathers)."""
    config = local_conv2d_input_grad_config(geom, dtype)
    if isinstance(config, local_grad_positions.LocalInputGradColsConfig):
        return config.scratch_elements
    return 0


def local_conv2d_weight_grad_scratch_elements(geom, dtype):
    """Device scratch of :func:`launch_local_conv2d_weight_grad`, in elements of ``dtype``:
    the transposed gradient of the GEMM a position, the batch slices' partial sums of the
    batched GEMM (none for the direct kernel)."""
    config = local_conv2d_weight_grad_config(geom, dtype)
    if isinstance(config, local_grad_positions.LocalWeightGradPosConfig):
        return config.scratch_elements
    if isinstance(config, local_grad_gemm.LocalWeightGradGemmConfig):
        return local_grad_gemm.local_weight_grad_gemm_scratch_elements(geom, dtype)
    return 0


def _launch_local_input_grad_gemm(grad_output, weight, out, geom, stream, config):
    kernel = kernels.compiled(config.kernel)
    kernel[config.grid, config.block, stream, config.shared_bytes](
        _flat(grad_output),         # (n, c_O, h_O, w_O)
        _flat(weight),              # (c_O, h_O, w_O, c_Ig, k_H, k_W), the caller's layout
        _flat(out),                 # (n, c_I, h, w), written
        geom.batch, geom.in_channels, geom.in_height, geom.in_width,
        geom.out_channels, geom.out_height, geom.out_width,
        geom.in_channels_per_group, geom.out_channels_per_group,
        geom.stride_h, geom.stride_w,
        geom.pad_top, geom.pad_left,
        geom.dilation_h, geom.dilation_w,
        config.v_tiles,             # column tiles of a phase's sub-grid
        config.batch_tiles,         # batch tiles (fastest along grid x)
        config.chunk,               # maps per shared-memory stage
        config.sj,                  # output columns staged per block
        config.g_pitch, config.g_co,  # gy stage: column pitch, words per map
        config.w_pitch, config.w_kv, config.w_co,  # weight stage: column, tap, map
        config.kstep, config.dcol,  # a phase's kernel columns and what they read
        config.nkw,                 # the most kernel columns a phase takes
        *config.walk,               # staging walks' steps
    )


def _launch_local_weight_grad_gemm(x, grad_output, out, geom, stream, empty, config):
    new = empty or _numba_empty(stream)
    if config.slices > 1:
        part = new((config.scratch_elements,),
                   grad_kernels.partial_dtype(out.dtype))
    else:
        part = out
    kernel = kernels.compiled(config.kernel)
    kernel[config.grid, config.block, stream, config.shared_bytes](
        _flat(x),                   # (n, c_I, h, w)
        _flat(grad_output),         # (n, c_O, h_O, w_O)
        _flat(part),                # (slices, c_O, h_O, w_O, c_Ig, k_H, k_W), written
        geom.batch, geom.in_channels, geom.in_height, geom.in_width,
        geom.out_channels, geom.out_height, geom.out_width,
        geom.in_channels_per_group, geom.out_channels_per_group,
        geom.stride_h, geom.stride_w,
        geom.pad_top, geom.pad_left,
        geom.dilation_h, geom.dilation_w,
        config.tiles_x,             # position tiles along an output row
        config.k_tiles,             # kernel-row tiles (fastest along grid z)
        config.stage_rows,          # kernel rows per block
        config.chunk,               # images per shared-memory stage
        config.slice_n,             # images per batch slice
        config.o_pitch, config.g_img, config.x_img,  # stage pitches
        config.win,                 # input columns under the block's positions
        out.size if config.slices > 1 else 0,  # elements between slices
        *config.walk,               # staging walks' steps
    )
    if config.slices > 1:
        total = kernels.compiled(grad_kernels.sum_slices_kernel(kernels.dtype_code(out.dtype)))
        threads = 256
        blocks = kernels.check_grid((max(1, min(-(-out.size // threads), 65535)),),
                                    "a slice sum")
        total[blocks, threads, stream](_flat(part), _flat(out), config.slices, out.size)


# --------------------------------------------------------------------------------------------
# entry point
# --------------------------------------------------------------------------------------------

def _bytes_needed(op, operands, geom, host):
    """Device memory one call allocates, at most: output, the launch's scratch, copies."""
    itemsize = operands[0].dtype.itemsize
    present = [o for o in operands if o is not None]
    total = math.prod(op.output_shape(geom)) + op.scratch("cuda")(geom, operands[0].dtype)
    # device copies: host inputs are always copied; device inputs only when strided
    total += sum(math.prod(o.shape) for o in present
                 if host or not _operand_is_contiguous(o, itemsize))
    return total * itemsize


def _operand_is_contiguous(op, itemsize):
    """Whether a device operand is C-contiguous (from its array interface's strides)."""
    cai = op.cai if getattr(op, "cai", None) is not None else getattr(
        op.obj, "__cuda_array_interface__", None)
    if cai is None:  # a simulator device array
        return bool(op.obj.is_c_contiguous())
    return is_c_contiguous(op.shape, cai.get("strides"), itemsize)


def _free_bytes(template=None):
    """Free device memory, counting what the caller's library holds cached but unused."""
    if simulator_enabled():
        return None
    try:
        free = int(cuda.current_context().get_memory_info()[0])
    except Exception:
        return None
    library = None if template is None else _library(template)
    try:
        if library == "torch":
            torch = sys.modules["torch"]
            free += (torch.cuda.memory_reserved(template.device)
                     - torch.cuda.memory_allocated(template.device))
        elif library == "cupy":
            free += int(sys.modules["cupy"].get_default_memory_pool().free_bytes())
    except Exception:
        pass
    return free


# Free device memory as last asked of the driver (and the caller's library), per (library,
# GPU): asked again only for a call that needs more than an eighth of it, or when the
# reading is more than a second old (:class:`gpuconv.device.FreeMemory`).
_FREE = {}


def _check_device_memory(op, operands, geom, template=None, device=None, needed=None):
    if needed is None:
        needed = _bytes_needed(op, operands, geom, template is None)
    key = (None if template is None else _library(template), device)
    gauge = _FREE.get(key)
    if gauge is None:
        gauge = _FREE[key] = FreeMemory(lambda t=None: _free_bytes(t), "GPU")
    gauge.check(needed, template)


#: Libraries whose arrays carry no stream: the producer's stream is the library's current
#: stream on the array's GPU.
_STREAM_PER_DEVICE = ("torch", "cupy")


class _Plan:
    """What a CUDA call derives from its operands' shapes, dtypes, layout and library,
    computed once per key by the public layer's call cache (:func:`plan`)."""

    __slots__ = ("launch", "config", "out_shape", "dtype", "library", "alloc_dtype", "needed",
                 "contiguous", "configs", "tuned", "scratch", "own_stream")

    def __init__(self, op, operands, geom):
        first = operands[0]
        self.launch = op.kernel("cuda")
        self.config = _CONFIG[op.name]
        self.configs = {}  # launch configuration per GPU ordinal
        self.tuned = {}    # (generation, measured choice) per GPU ordinal (autotuning)
        self.scratch = _TUNED_SCRATCH.get(op.name)
        self.out_shape = op.output_shape(geom)
        self.dtype = first.dtype
        host = not first.on_gpu
        self.library = None if host else _library(first.obj)
        self.alloc_dtype = self.dtype
        if self.library == "torch":
            self.alloc_dtype = getattr(sys.modules["torch"], self.dtype.name)
        self.needed = _bytes_needed(op, operands, geom, host)
        itemsize = first.dtype.itemsize
        self.contiguous = tuple(True if o is None or host else _operand_is_contiguous(o, itemsize)
                                for o in operands)
        # Operands whose producer's stream is the first operand's without asking: PyTorch's
        # and CuPy's current stream belongs to the GPU (and thread), not to the array, and
        # every operand of a call is on the first one's GPU (checked on every call).
        self.own_stream = tuple(
            o is not None and not host and self.library in _STREAM_PER_DEVICE
            and _library(o.obj) == self.library for o in operands)

    def config_for(self, geom, device):
        config = self.configs.get(device)
        if config is None:
            config = self.configs[device] = self.config(geom, self.dtype)
        return config

    def tuned_for(self, op, arrays, out, geom, stream, empty, device):
        """The measured choice (:mod:`gpuconv.cuda.autotune`) when autotuning is on and the
        operation is tuned, else the dispatcher's."""
        if self.scratch is None or not autotune_enabled():
            return self.config_for(geom, device)
        kept = self.tuned.get(device)
        generation = autotune.generation()
        if kept is None or kept[0] != generation:  # (autotune.forget() makes it stale)
            config = autotune.tuned_config(
                op.name, self.launch, arrays, out, geom, stream, empty, device,
                self.config_for(geom, device), self.scratch)
            self.tuned[device] = kept = (generation, config)
        return kept[1]


_CONFIG = {
    "conv2d": kernels.conv2d_config,
    "local_conv2d": local_conv2d_forward_config,
    "conv2d_input": conv2d_input_grad_config,
    "conv2d_weight": conv2d_weight_grad_config,
    "local_conv2d_input": local_conv2d_input_grad_config,
    "local_conv2d_weight": local_conv2d_weight_grad_config,
}


def tiled_conv2d_config(geom, dtype):
    """The configuration of what :func:`gpuconv.cuda.tiled.launch_tiled_conv2d` launches:
    conv2d's kernel at ``T = (1, 1)``, local_conv2d's at ``T = (H_out, W_out)``, else
    local_conv2d's tiled specialisation (``geom`` a :class:`~gpuconv.geometry.TiledGeometry`)."""
    if geom.shared:
        return kernels.conv2d_config(geom.untiled, dtype)
    if geom.unshared:  # local_conv2d's own choice (the streaming kernel at small batches)
        return local_conv2d_forward_config(geom.untiled, dtype)
    return kernels.local_conv2d_config(geom.untiled, dtype, geom.tiling)


def tiled_conv2d_scratch_elements(geom, dtype):
    """Device scratch of :func:`gpuconv.cuda.tiled.launch_tiled_conv2d`: that of the kernel
    :func:`tiled_conv2d_config` picks."""
    if geom.shared:
        return 0
    return _local_scratch_elements(tiled_conv2d_config(geom, dtype), geom.untiled, dtype)


def tiled_conv2d_input_grad_config(geom, dtype):
    """conv2d's input-gradient configuration at ``T = (1, 1)``, else local_conv2d's."""
    if geom.shared:
        return conv2d_input_grad_config(geom.untiled, dtype)
    return local_conv2d_input_grad_config(geom.untiled, dtype)


def tiled_conv2d_weight_grad_config(geom, dtype):
    """conv2d's weight-gradient configuration at ``T = (1, 1)``, else local_conv2d's."""
    if geom.shared:
        return conv2d_weight_grad_config(geom.untiled, dtype)
    return local_conv2d_weight_grad_config(geom.untiled, dtype)


# How much scratch each configuration of a tuned forward allocates (autotuning leaves out
# the candidates that need more than the dispatcher's pick).
_TUNED_SCRATCH = {"conv2d": _conv2d_scratch_elements, "local_conv2d": _local_scratch_elements}
assert set(_TUNED_SCRATCH) == set(autotune.TUNED_OPS)

_CONFIG.update({
    "tiled_conv2d": tiled_conv2d_config,
    "tiled_conv2d_input": tiled_conv2d_input_grad_config,
    "tiled_conv2d_weight": tiled_conv2d_weight_grad_config,
})


def plan(op, operands, geom):
    """What :func:`run` needs beyond the arrays themselves, for operands of these shapes,
    dtypes, layouts and library (the public layer caches it per call key)."""
    return _Plan(op, operands, geom)


def clear_caches():
    """Forget the memory readings and stream wrappers (tests; a new process starts empty)."""
    _FREE.clear()
    _STREAMS.clear()


_HOST_STREAMS = threading.local()


def _host_stream():
    """The stream of calls on host arrays: one per thread and GPU, reused (each such call
    waits for it before returning). A new stream per call would cost a driver call and
    make every call a new launch of the fast path's cache, keeping its stream alive."""
    streams = getattr(_HOST_STREAMS, "streams", None)
    if streams is None:
        streams = _HOST_STREAMS.streams = {}
    device = None if simulator_enabled() else _current_device_id()
    stream = streams.get(device)
    if stream is None:
        stream = streams[device] = cuda.stream()
    return stream


def _run_host(op, operands, geom, plan):
    dtype = operands[0].dtype
    _check_device_memory(op, operands, geom, needed=plan.needed)
    stream = _host_stream()
    arrays = [None if o is None else cuda.to_device(np.ascontiguousarray(o.obj), stream=stream)
              for o in operands]
    d_out = cuda.device_array(plan.out_shape, dtype=dtype, stream=stream)
    plan.launch(*arrays, d_out, geom, stream, config=plan.config_for(geom, None))
    result = d_out.copy_to_host(stream=stream)
    stream.synchronize()
    return result


def from_host_like(template, host):
    """A GPU copy of the NumPy array ``host``, of the library and on the GPU of ``template``
    (results that need no kernel: empty batches, zero channels)."""
    library = _library(template)
    if library == "torch":
        return sys.modules["torch"].as_tensor(host, device=template.device)
    if library == "cupy":
        with template.device:
            return sys.modules["cupy"].asarray(host)
    return cuda.to_device(host)


def _allocate_like(template, shape, dtype, stream):
    """An uninitialised C-contiguous array of the same library and GPU as ``template``.

    PyTorch and CuPy allocate from their own stream-ordered memory pools (cheap, and safe to
    release once the work is queued on the same stream); anything else gets a Numba array.
    """
    library = _library(template)
    if library == "torch":
        # scratch may differ from the operands' dtype (float16's float32 partial sums)
        return sys.modules["torch"].empty(shape, dtype=_torch_dtype(dtype),
                                          device=template.device)
    if library == "cupy":
        cupy = sys.modules["cupy"]
        with template.device:
            return cupy.empty(shape, dtype=dtype)
    return cuda.device_array(shape, dtype=dtype, stream=stream)


@functools.lru_cache(maxsize=None)
def _torch_dtype(dtype):
    """PyTorch's dtype of the NumPy ``dtype`` (looked up by name once per dtype)."""
    return getattr(sys.modules["torch"], np.dtype(dtype).name)


def _new_view(obj, shape, dtype):
    """A device array over ``obj``, a C-contiguous array of ``shape`` and ``dtype`` that
    :func:`_allocate_like` has just made: on the fast launch path a
    :class:`~gpuconv.cuda.fastlaunch.DeviceView` from the library's own pointer (PyTorch's
    and CuPy's array interfaces build a dictionary on every read), else a Numba array."""
    if _views():
        library = _library(obj)
        if library == "torch":
            return fastlaunch.DeviceView(obj.data_ptr(), shape, np.dtype(dtype), None, obj)
        if library == "cupy":
            return fastlaunch.DeviceView(obj.data.ptr, shape, np.dtype(dtype), None, obj)
    return _as_device_array(obj, sync=False)


def _current_device_id():
    return cuda.get_current_device().id


def _run_gpu(op, operands, geom, plan, timer=None):
    present = [o for o in operands if o is not None]
    if simulator_enabled():
        return _run_gpu_on_device(op, operands, geom, plan, None, timer)
    ids = {_device_id(o.obj) for o in present}
    current = None
    if None in ids:
        ids.discard(None)
        current = _current_device_id()
        ids.add(current)
    if len(ids) > 1:
        raise ValueError(
            f"the operands of {op.name} must live on the same GPU, got devices {sorted(ids)}")
    device = ids.pop()
    if current is None:
        current = _current_device_id()
    if device == current:
        return _run_gpu_on_device(op, operands, geom, plan, device, timer)
    with cuda.gpus[device]:
        return _run_gpu_on_device(op, operands, geom, plan, device, timer)


def _operand_arrays(operands, own_stream, template, stream, device):
    """The operands as device arrays (None stays None), the call's work on ``stream`` ordered
    after each operand's producer: an operand whose producer's stream is not ``stream``
    (another library's current stream, a Numba array's stream, the interface's ``stream``
    field) is waited for as the interface asks, and ``stream`` waits for an event recorded
    on the producer's stream (PyTorch and CuPy export no stream in the interface, so
    nothing else would order a tensor written on a side stream before the kernel reads
    it). ``own_stream``: the operands known to share the template's stream."""
    arrays = []
    for o, own in zip(operands, own_stream):
        if o is None:
            arrays.append(None)
            continue
        producer = None
        if o is not template and not own:
            producer = _stream_of(o.obj, device, o.cai)
            if _same_stream(producer, stream):
                producer = None
        arrays.append(_as_device_array(o.obj, producer is not None, o.cai))
        if producer is not None:
            _order_after(stream, producer)
    return arrays


def _order_after(stream, producer):
    """Work queued on ``stream`` from now on waits for what ``producer`` has queued (an event
    recorded on one and waited for on the other; the host does not wait). The simulator
    runs each launch to its end: nothing to order."""
    if simulator_enabled():
        return
    event = cuda.event(timing=False)
    event.record(producer)
    event.wait(stream)


def _run_gpu_on_device(op, operands, geom, plan, device, timer=None):
    template = operands[0]
    obj = template.obj
    _check_device_memory(op, operands, geom, template=obj, device=device, needed=plan.needed)
    stream = _stream_of(obj, device, template.cai)
    if timer:
        timer("check")
    if plan.library == "torch":
        out_obj = sys.modules["torch"].empty(plan.out_shape, dtype=plan.alloc_dtype,
                                             device=obj.device)
    else:
        out_obj = _allocate_like(obj, plan.out_shape, plan.dtype, stream)
    arrays = _operand_arrays(operands, plan.own_stream, template, stream, device)

    def empty(shape, dtype):  # scratch from the caller's library, on its stream
        return _new_view(_allocate_like(obj, shape, dtype, stream), shape, dtype)

    arrays = [a if a is None or contiguous else _contiguous(a, stream, empty)
              for a, contiguous in zip(arrays, plan.contiguous)]
    d_out = _new_view(out_obj, plan.out_shape, plan.dtype)
    if timer:
        timer("allocate")
    plan.launch(*arrays, d_out, geom, stream, empty=empty,
                config=plan.tuned_for(op, arrays, d_out, geom, stream, empty, device))
    if timer:
        timer("launch")
    return out_obj


def run(op, operands, geom, plan=None, timer=None):
    """Run the :class:`~gpuconv.ops.Op` ``op`` on the GPU; see the module docstring.

    ``operands`` are the public layer's operands (``.obj``, ``.shape``, ``.dtype``,
    ``.on_gpu``, ``.cai``) in the order of the op's kind; the forward's bias may be None. The
    first operand decides the kind of array returned and the stream. ``geom`` is the
    validated :class:`~gpuconv.geometry.ConvGeometry`; ``plan`` what :func:`plan` made of
    them (made here if None). ``timer(step)``, if given, is called after the memory check
    and stream look-up (``"check"``), the allocations and views (``"allocate"``) and the
    launch (``"launch"``) of a call on device arrays.
    """
    plan = plan or _Plan(op, operands, geom)
    with _SIMULATOR_LOCK if simulator_enabled() else contextlib.nullcontext():
        if operands[0].on_gpu:
            return _run_gpu(op, operands, geom, plan, timer)
        return _run_host(op, operands, geom, plan)


# The simulator runs one kernel at a time per process; calls from several threads take turns
# there (on a GPU they run concurrently, each host call on its own stream).
_SIMULATOR_LOCK = threading.Lock()
