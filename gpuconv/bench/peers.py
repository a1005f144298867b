"""What ``gpuconv bench`` times, and how: implementations, timers, memory probes, ceilings.

Every implementation of one pass computes the same thing on the same arrays:

- ``"forward"``: ``y = op(x, weight) + bias`` with one bias per output channel;
- ``"backward"``: ``(dL/dx, dL/dweight)`` for an upstream gradient ``gy = dL/dy`` (no bias);
- ``"step"``: one training step of a layer, forward then backward:
  ``(dL/dx, dL/dweight, dL/dbias)`` (``local_conv2d`` layers have one bias per position, as
  ``gpuconv.torch.LocallyConnected2d``).

Nothing here imports PyTorch at module import; the torch implementations, and the
PyTorch-only locally connected layers (:func:`locally_connected_layers`), exist only when
:func:`load_torch` finds it.

Notation as in :mod:`gpuconv.geometry`: ``K = (C_in / groups) * kH * kW`` values per
receptive field, ``L = H_out * W_out`` output positions.
"""

from __future__ import annotations

import contextlib
import math
import os
import time
import tracemalloc

import numpy as np

from ..device import host_memory_available
from .stats import PASSES

__all__ = ["Impl", "PASSES", "load_torch", "torch_problem", "implementations",
           "dial_implementations",
           "describe_peers", "describe_peers_by_pass", "Backend", "available_memory",
           "measure_ceilings", "measure_bandwidth", "peak_extra_bytes", "torch_conv2d",
           "torch_unfold_einsum", "torch_unfold_bmm", "bmm_weight_layout",
           "from_bmm_weight_layout", "locally_connected_layers", "torch_autograd_backward"]

_torch_problem = None  # why the last load_torch() found no torch


def load_torch():
    """The ``torch`` module, or ``None`` when it is not installed (or fails to import:
    :func:`torch_problem` says which)."""
    global _torch_problem
    try:
        import torch
    except ImportError as exc:
        _torch_problem = ("not installed" if getattr(exc, "name", None) == "torch"
                          else f"failed to import ({exc})")
        return None
    except Exception as exc:  # a broken install must not stop the benchmark
        _torch_problem = f"failed to import ({type(exc).__name__}: {exc})"
        return None
    _torch_problem = None
    return torch


def torch_problem():
    """Why the last :func:`load_torch` returned ``None`` (``None`` if it did not)."""
    return _torch_problem


# ----------------------------------------------------------------------------- backends

class Backend:
    """Where the arrays live and how a call is timed: host NumPy, or CUDA.

    ``kind`` is ``"cpu"`` or ``"cuda"``. On CUDA the arrays are PyTorch tensors when PyTorch
    with CUDA is installed (gpuconv takes them through ``__cuda_array_interface__``), else
    Numba device arrays; calls are timed with CUDA events and the device is synchronised.
    On the host calls are timed with ``clock`` (``time.process_time`` compares single-threaded
    kernels per core on a busy machine).
    """

    def __init__(self, kind, torch=None, clock=time.perf_counter):
        self.kind = kind
        self.torch = torch
        self.clock = clock  # on the host; CUDA events time the GPU
        self.torch_cuda = bool(kind == "cuda" and torch is not None and torch.cuda.is_available())
        # The Numba CUDA simulator's events do not time anything: use the wall clock there.
        self.simulator = kind == "cuda" and os.environ.get("NUMBA_ENABLE_CUDASIM") == "1"

    # arrays
    def _is_tensor(self, array):
        return self.torch is not None and isinstance(array, self.torch.Tensor)

    def to_device(self, array):
        """``array`` (NumPy, or a tensor drawn on the GPU) where gpuconv should read it."""
        if self.kind == "cpu" or self._is_tensor(array):
            return array
        if self.torch_cuda:
            return self.torch.from_numpy(array).cuda()
        from numba import cuda
        return cuda.to_device(array)

    def to_torch(self, array):
        """``array`` (NumPy, or a tensor drawn on the GPU) as a tensor on this device,
        sharing memory on the host."""
        if self._is_tensor(array):
            return array
        tensor = self.torch.from_numpy(array)
        return tensor.cuda() if self.kind == "cuda" else tensor

    def synchronize(self):
        if self.kind != "cuda":
            return
        if self.torch_cuda:
            self.torch.cuda.synchronize()
        else:
            from numba import cuda
            cuda.synchronize()

    def time_calls(self, fn, count):
        """Seconds of ``count`` back-to-back calls of ``fn``, one sample per call."""
        samples = []
        if self.kind == "cpu" or (self.simulator and not self.torch_cuda):
            for _ in range(count):
                start = self.clock()
                fn()
                self.synchronize()
                samples.append(self.clock() - start)
            return samples
        self.synchronize()
        if self.torch_cuda:
            events = [(self.torch.cuda.Event(enable_timing=True),
                       self.torch.cuda.Event(enable_timing=True)) for _ in range(count)]
        else:
            from numba import cuda
            events = [(cuda.event(), cuda.event()) for _ in range(count)]
        for start, stop in events:
            start.record()
            fn()
            stop.record()
        self.synchronize()
        # torch.cuda.Event and numba.cuda.Event both give milliseconds
        return [start.elapsed_time(stop) / 1e3 for start, stop in events]

    def kernel_seconds(self, fn, count):
        """``(seconds, None)``: the device time of the kernels and copies one call of ``fn``
        queues (the mean of ``count`` calls), from PyTorch's profiler (CUPTI sees every
        kernel of the process, gpuconv's Numba kernels included); ``(None, reason)`` where
        it cannot tell. Beside a call's time (CUDA events around it), the difference is what
        the host adds: argument checks, allocation, launch."""
        if self.kind != "cuda":
            return None, "kernel time is measured on CUDA only"
        if not self.torch_cuda or self.simulator:
            return None, "kernel time needs PyTorch's profiler on a CUDA GPU"
        try:
            profiler = self.torch.profiler
            device_type = self.torch.autograd.DeviceType.CUDA
            self.synchronize()
            with profiler.profile(activities=[profiler.ProfilerActivity.CUDA]) as prof:
                for _ in range(count):
                    fn()
                self.synchronize()
            total_us = sum(event.time_range.elapsed_us() for event in prof.events()
                           if event.device_type == device_type)
        except Exception as exc:  # no CUPTI, a profiler already running, ...
            return None, f"PyTorch's profiler failed: {type(exc).__name__}: {exc}"[:200]
        if total_us <= 0:
            return None, "PyTorch's profiler saw no kernel"
        return total_us / 1e6 / count, None

    def time_first_call(self, fn):
        """Seconds of one call, synchronised (wall clock: it may include compilation)."""
        self.synchronize()
        start = time.perf_counter()
        out = fn()
        self.synchronize()
        return time.perf_counter() - start, out

    def to_host(self, out):
        if hasattr(out, "detach"):
            out = out.detach()
        if self.kind == "cpu":
            return np.asarray(out.numpy() if hasattr(out, "numpy") and not isinstance(
                out, np.ndarray) else out)
        if hasattr(out, "copy_to_host"):
            return out.copy_to_host()
        if hasattr(out, "cpu"):
            return out.cpu().numpy()
        if hasattr(out, "get"):
            return out.get()
        return np.asarray(out)


def available_memory(backend):
    """Bytes that can be allocated now on ``backend``'s device (``None`` if unknown)."""
    if backend.kind == "cuda":
        try:
            if backend.torch_cuda:
                cuda = backend.torch.cuda
                # the driver's free memory, plus what PyTorch's allocator holds unused
                return int(cuda.mem_get_info()[0] + cuda.memory_reserved()
                           - cuda.memory_allocated())
            from numba import cuda
            return int(cuda.current_context().get_memory_info().free)
        except Exception:
            return None
    return host_memory_available()


# ----------------------------------------------------------------------------- implementations

class Impl:
    """One implementation of one operation in one pass.

    Attributes:
        op: ``"conv2d"``, ``"local_conv2d"`` or ``"tiled_conv2d"``.
        name: short label used in records (``"gpuconv"``, ``"torch"``, ...); the same peer
            keeps its name across passes (the record's ``pass`` tells them apart).
        description: one line saying exactly what is timed.
        make: ``make(arrays, geom) -> fn``; ``fn()`` runs one pass. ``arrays`` has ``x``,
            ``weight``, ``bias`` and (backward, step) ``gy`` as this implementation reads
            them. The forward returns ``y``; the backward ``(gx, gw)``; the step
            ``(gx, gw, gb)``.
        array_kind: ``"gpuconv"``, ``"torch"`` or ``"numpy"``: what ``make`` expects.
        workspace: ``workspace(geom, itemsize) -> bytes``, an upper estimate of what one call
            allocates beyond its inputs (results included); used to skip what will not fit.
        memory_probe: ``"tracemalloc"``, ``"torch-cpu"``, ``"torch-cuda"`` or ``None``.
        pass_name: one of :data:`PASSES`.
        canonical: ``canonical(result, geom) -> tuple``: the result as gpuconv lays it out
            (weights ``(C_out, H_out, W_out, C_in/g, kH, kW)`` for ``local_conv2d``), for the
            agreement check only, never timed; ``None``: the result as it is.
        tiles, tiling: ``tiled_conv2d``'s point on the dial, ``(T_h, T_w)`` and
            ``"periodic"`` or ``"blocks"`` (``None`` for the other operations).
    """

    def __init__(self, op, name, description, make, array_kind, workspace, memory_probe,
                 pass_name="forward", canonical=None, tiles=None, tiling=None):
        self.op, self.name, self.description = op, name, description
        self.make, self.array_kind = make, array_kind
        self.workspace, self.memory_probe = workspace, memory_probe
        self.pass_name, self.canonical = pass_name, canonical
        self.tiles, self.tiling = (None if tiles is None else tuple(tiles)), tiling

    @property
    def key(self):
        """``(op, name, tiling, tiles)``: what tells implementations of one pass apart (the
        record's :func:`gpuconv.bench.suite.series_key`)."""
        return (self.op, self.name, self.tiling, self.tiles)

    @property
    def weight_name(self):
        """Which of the layer's random weights this implementation reads: its operation's,
        or for ``tiled_conv2d`` those of its tiles (the same for either tiling)."""
        return self.op if self.tiles is None else (self.op, self.tiles)

    def weight_shape(self, geom):
        """The shape of those weights on ``geom``."""
        if self.op == "conv2d":
            return geom.shared_weight_shape()
        if self.op == "tiled_conv2d":
            return (geom.out_channels, *self.tiles, geom.in_channels_per_group,
                    geom.kernel_height, geom.kernel_width)
        return geom.local_weight_shape()

    def __repr__(self):
        dial = "" if self.tiles is None else f", tiles={self.tiles!r}, tiling={self.tiling!r}"
        if self.pass_name == "forward":
            return f"Impl({self.op!r}, {self.name!r}{dial})"
        return f"Impl({self.op!r}, {self.name!r}, {self.pass_name!r}{dial})"


def _out_bytes(geom, itemsize):
    return geom.batch * geom.out_channels * geom.out_height * geom.out_width * itemsize


def _cols_bytes(geom, itemsize):
    k = geom.in_channels_per_group * geom.kernel_height * geom.kernel_width
    return geom.batch * geom.groups * k * geom.out_height * geom.out_width * itemsize


def _pairs(geom):
    """``(stride, padding, dilation)`` as (height, width) pairs, the way both gpuconv and
    PyTorch take them (padding: the top and left sides; see :func:`_symmetric`)."""
    return ((geom.stride_h, geom.stride_w), (geom.pad_top, geom.pad_left),
            (geom.dilation_h, geom.dilation_w))


def _symmetric(geom):
    """Whether each axis has the same padding on both sides, the only padding PyTorch's
    conv2d and unfold take."""
    return geom.pad_top == geom.pad_bottom and geom.pad_left == geom.pad_right


def _gpuconv_geometry(geom):
    """``(stride, padding, dilation)`` as gpuconv's functions and layers take them."""
    stride, padding, dilation = _pairs(geom)
    if not _symmetric(geom):
        padding = "same"  # uneven padding comes only from "same" (stride 1)
    return stride, padding, dilation


def _gpuconv_make(op, device):
    import gpuconv

    function = gpuconv.conv2d if op == "conv2d" else gpuconv.local_conv2d

    def make(arrays, geom):
        x, weight, bias = arrays["x"], arrays["weight"], arrays["bias"]
        stride, padding, dilation = _gpuconv_geometry(geom)
        groups = geom.groups

        def call():
            return function(x, weight, bias, stride, padding, dilation, groups, device=device)
        return call
    return make


def _gpuconv_tiled_make(device, tiling):
    import gpuconv

    def make(arrays, geom):
        x, weight, bias = arrays["x"], arrays["weight"], arrays["bias"]
        stride, padding, dilation = _gpuconv_geometry(geom)
        groups = geom.groups

        def call():
            return gpuconv.tiled_conv2d(x, weight, bias, stride, padding, dilation, groups,
                                        tiling=tiling, device=device)
        return call
    return make


def dial_implementations(device, dial):
    """The forward of :func:`gpuconv.tiled_conv2d` at each ``(tiling, (T_h, T_w))`` of
    ``dial`` (:data:`gpuconv.bench.suite.DIAL`): no framework has the operation, so there is
    no peer beside it; the reports compare it with gpuconv's own conv2d and local_conv2d."""
    return [Impl("tiled_conv2d", "gpuconv",
                 f"gpuconv.tiled_conv2d(tiling={tiling!r}, tiles {tiles[0]}x{tiles[1]}, "
                 f"device={device!r})",
                 _gpuconv_tiled_make(device, tiling), "gpuconv",
                 lambda geom, itemsize: _out_bytes(geom, itemsize), "tracemalloc",
                 tiles=tiles, tiling=tiling)
            for tiling, tiles in dial]


def _torch_input(torch, geom):
    """``x -> (x as the PyTorch function reads it, its padding pair)``: uneven padding is
    added by ``torch.nn.functional.pad`` first (a copy), even padding left to the function."""
    if _symmetric(geom):
        padding = (geom.pad_top, geom.pad_left)
        return lambda x: (x, padding)
    sides = (geom.pad_left, geom.pad_right, geom.pad_top, geom.pad_bottom)
    return lambda x: (torch.nn.functional.pad(x, sides), (0, 0))


def torch_conv2d(torch, geom, weight, bias=None):
    """``x -> torch.nn.functional.conv2d(x, weight, bias)`` on ``geom`` (any stride,
    padding, dilation and groups). ``weight`` is ``(C_out, C_in/g, kH, kW)``, ``bias``
    ``None`` or ``(C_out,)``."""
    functional = torch.nn.functional
    stride, _, dilation = _pairs(geom)
    prepare = _torch_input(torch, geom)

    def call(x):
        x, padding = prepare(x)
        return functional.conv2d(x, weight, bias, stride, padding, dilation, geom.groups)
    return call


def torch_unfold_einsum(torch, geom, weight, bias=None):
    """``x -> y``: the usual PyTorch recipe for a locally connected layer on ``geom``,
    ``torch.nn.functional.unfold`` then ``torch.einsum`` (any stride, padding, dilation and
    groups).

    ``weight`` is ``(C_out, H_out, W_out, C_in/g, kH, kW)`` (gpuconv's layout, viewed, not
    copied); ``bias`` ``None``, ``(C_out,)`` or ``(C_out, H_out, W_out)``.
    """
    functional = torch.nn.functional
    g = geom.groups
    positions = geom.out_height * geom.out_width
    k = geom.in_channels_per_group * geom.kernel_height * geom.kernel_width
    # (C_out, H_out, W_out, C_in/g, kH, kW) -> (g, C_out/g, L, K): a view, no copy.
    weight_view = weight.view(g, geom.out_channels_per_group, positions, k)
    bias = _torch_bias(bias, geom)
    kernel = (geom.kernel_height, geom.kernel_width)
    stride, _, dilation = _pairs(geom)
    prepare = _torch_input(torch, geom)
    out_shape = geom.output_shape[1:]

    def call(x):
        n = x.shape[0]
        x, padding = prepare(x)
        cols = functional.unfold(x, kernel, dilation, padding, stride)  # (N, g*K, L)
        y = torch.einsum("ngkl,golk->ngol", cols.view(n, g, k, positions), weight_view)
        y = y.reshape((n,) + out_shape)
        return y if bias is None else y + bias
    return call


def _torch_bias(bias, geom):
    """``None``, ``(C_out,)`` or ``(C_out, H_out, W_out)`` -> broadcastable to the output."""
    if bias is None:
        return None
    return bias.view(1, geom.out_channels, 1, 1) if bias.dim() == 1 else bias.unsqueeze(0)


def bmm_weight_layout(weight, geom):
    """gpuconv's local weights ``(C_out, H_out, W_out, C_in/g, kH, kW)`` as
    :func:`torch_unfold_bmm` reads them: ``(g * L, K, C_out/g)``, positions outermost (a
    copy). :func:`from_bmm_weight_layout` is its inverse."""
    g, og = geom.groups, geom.out_channels_per_group
    positions = geom.out_height * geom.out_width
    k = geom.in_channels_per_group * geom.kernel_height * geom.kernel_width
    return weight.reshape(g, og, positions, k).permute(0, 2, 3, 1).reshape(
        g * positions, k, og)


def from_bmm_weight_layout(weight, geom):
    """The inverse of :func:`bmm_weight_layout` (a copy)."""
    g, og = geom.groups, geom.out_channels_per_group
    positions = geom.out_height * geom.out_width
    k = geom.in_channels_per_group * geom.kernel_height * geom.kernel_width
    return weight.reshape(g, positions, k, og).permute(0, 3, 1, 2).reshape(
        geom.local_weight_shape())


def torch_unfold_bmm(torch, geom, weight, bias=None):
    """``x -> y``: a locally connected layer as one batched matrix product over the output
    positions: ``unfold``, the columns copied positions-major ``(g * L, N, K)``, then
    ``torch.bmm`` with the weights stored positions-major ``(g * L, K, C_out/g)``
    (:func:`bmm_weight_layout`, so that ``bmm`` reads them in place, without the copy
    ``einsum`` may make of gpuconv's layout), then the result back to ``(N, C_out, H_out,
    W_out)`` (a copy). Any stride, padding, dilation and groups.
    """
    functional = torch.nn.functional
    g, og = geom.groups, geom.out_channels_per_group
    positions = geom.out_height * geom.out_width
    k = geom.in_channels_per_group * geom.kernel_height * geom.kernel_width
    bias = _torch_bias(bias, geom)
    kernel = (geom.kernel_height, geom.kernel_width)
    stride, _, dilation = _pairs(geom)
    prepare = _torch_input(torch, geom)
    out_shape = geom.output_shape[1:]

    def call(x):
        n = x.shape[0]
        x, padding = prepare(x)
        cols = functional.unfold(x, kernel, dilation, padding, stride)  # (N, g*K, L)
        cols = cols.view(n, g, k, positions).permute(1, 3, 0, 2).reshape(g * positions, n, k)
        y = torch.bmm(cols, weight)  # (g*L, N, C_out/g)
        y = y.view(g, positions, n, og).permute(2, 0, 3, 1).reshape((n,) + out_shape)
        return y if bias is None else y + bias
    return call


def _torch_make(peer):
    """``make`` of a PyTorch peer: ``peer(torch, geom, weight, bias)`` called under
    ``torch.no_grad``."""
    def with_torch(torch):
        def make(arrays, geom):
            x = arrays["x"]
            fn = peer(torch, geom, arrays["weight"], arrays["bias"])

            def call():
                with torch.no_grad():
                    return fn(x)
            return call
        return make
    return with_torch


_torch_conv2d_make = _torch_make(torch_conv2d)
_torch_unfold_make = _torch_make(torch_unfold_einsum)


def _windows(x, geom):
    """``(N, C_in, H_out, W_out, kH, kW)`` strided view of the receptive fields of ``x``."""
    if geom.pad_top or geom.pad_bottom or geom.pad_left or geom.pad_right:
        x = np.pad(x, ((0, 0), (0, 0), (geom.pad_top, geom.pad_bottom),
                       (geom.pad_left, geom.pad_right)))
    span_h = geom.dilation_h * (geom.kernel_height - 1) + 1
    span_w = geom.dilation_w * (geom.kernel_width - 1) + 1
    win = np.lib.stride_tricks.sliding_window_view(x, (span_h, span_w), axis=(2, 3))
    win = win[:, :, ::geom.stride_h, ::geom.stride_w, ::geom.dilation_h, ::geom.dilation_w]
    return win[:, :, :geom.out_height, :geom.out_width]


def _numpy_im2col_make(arrays, geom, group_out):
    """A NumPy im2col peer: the receptive fields of ``x`` (a strided view), then per group
    ``group_out(fields of the group's input channels, the group's weights)`` ->
    ``(N, C_out/g, H_out*W_out)``, then the bias.

    float16 (which NumPy multiplies without BLAS, one value at a time) is cast to float32
    inside each call, computed in float32, and the result cast back to float16: the same
    conversions gpuconv's CPU path makes, timed alike."""
    x, weight, bias = arrays["x"], arrays["weight"], arrays["bias"]
    c_ig, c_og = geom.in_channels_per_group, geom.out_channels_per_group
    positions = geom.out_height * geom.out_width
    half = x.dtype == np.float16

    def call():
        if half:
            return compute(x.astype(np.float32), weight.astype(np.float32),
                           None if bias is None else bias.astype(np.float32)
                           ).astype(np.float16)
        return compute(x, weight, bias)

    def compute(x, weight, bias):
        win = _windows(x, geom)
        out = np.empty((geom.batch, geom.out_channels, positions), dtype=x.dtype)
        for gi in range(geom.groups):
            out[:, gi * c_og:(gi + 1) * c_og] = group_out(
                win[:, gi * c_ig:(gi + 1) * c_ig], weight[gi * c_og:(gi + 1) * c_og])
        if bias is not None:
            out += bias[None, :, None]
        return out.reshape(geom.output_shape)
    return call


def _numpy_conv2d_make(arrays, geom):
    """NumPy im2col (a copy of every receptive field) and one BLAS matmul per group."""
    n, c_og = geom.batch, geom.out_channels_per_group
    positions = geom.out_height * geom.out_width
    k = geom.in_channels_per_group * geom.kernel_height * geom.kernel_width

    def group_out(win, weight):
        # (N, H_out, W_out, C_in/g, kH, kW) -> (N*L, K): the im2col copy.
        cols = win.transpose(0, 2, 3, 1, 4, 5).reshape(n * positions, k)
        w = weight.reshape(c_og, k)
        return (cols @ w.T).reshape(n, positions, c_og).transpose(0, 2, 1)
    return _numpy_im2col_make(arrays, geom, group_out)


def _numpy_local_make(arrays, geom):
    """NumPy im2col and a batched matmul over output positions (one small GEMM each)."""
    n, c_og = geom.batch, geom.out_channels_per_group
    positions = geom.out_height * geom.out_width
    k = geom.in_channels_per_group * geom.kernel_height * geom.kernel_width

    def group_out(win, weight):
        # (L, N, K): the im2col copy, positions outermost.
        cols = win.transpose(2, 3, 0, 1, 4, 5).reshape(positions, n, k)
        # (C_out/g, L, K) -> (L, K, C_out/g): a strided view of the weights, no copy.
        w = weight.reshape(c_og, positions, k).transpose(1, 2, 0)
        return np.matmul(cols, w).transpose(1, 2, 0)
    return _numpy_im2col_make(arrays, geom, group_out)


# ----------------------------------------------------------------------------- backward

def _gpuconv_backward_make(op, device):
    """``make`` of gpuconv's backward: ``gpuconv.grad.<op>_input`` then ``<op>_weight``."""
    from .. import grad

    input_fn, weight_fn = ((grad.conv2d_input, grad.conv2d_weight) if op == "conv2d"
                           else (grad.local_conv2d_input, grad.local_conv2d_weight))

    def make(arrays, geom):
        x, weight, gy = arrays["x"], arrays["weight"], arrays["gy"]
        stride, padding, dilation = _gpuconv_geometry(geom)
        input_size = tuple(geom.input_shape)
        weight_size = tuple(geom.shared_weight_shape() if op == "conv2d"
                            else geom.local_weight_shape())
        groups = geom.groups

        def call():
            gx = input_fn(input_size, weight, gy, stride, padding, dilation, groups,
                          device=device)
            gw = weight_fn(x, weight_size, gy, stride, padding, dilation, groups, device=device)
            return gx, gw
        return call
    return make


def torch_autograd_backward(torch, peer, geom, x, weight, gy):
    """``fn() -> (gx, gw)``: PyTorch's backward of ``y = peer(torch, geom, weight)(x)``
    (:func:`torch_conv2d` or :func:`torch_unfold_einsum`, no bias) for the upstream gradient
    ``gy``, through autograd.

    The forward runs once, here, with its graph kept (``retain_graph=True``); each call of
    ``fn`` runs the backward alone: ``torch.autograd.grad(y, (x, weight), gy)``. For
    ``torch_conv2d`` that is one ``convolution_backward`` (oneDNN on the CPU, cuDNN on a GPU)
    computing both gradients; for the unfold recipe, einsum's backward (two batched matrix
    products) and unfold's (a fold).
    """
    x = x.detach().requires_grad_(True)
    weight = weight.detach().requires_grad_(True)
    with torch.enable_grad():
        y = peer(torch, geom, weight)(x)

    def call():
        return torch.autograd.grad(y, (x, weight), gy, retain_graph=True)
    return call


def _torch_backward_make(peer):
    def with_torch(torch):
        def make(arrays, geom):
            return torch_autograd_backward(torch, peer, geom, arrays["x"], arrays["weight"],
                                           arrays["gy"])
        return make
    return with_torch


# ----------------------------------------------------------------------------- training step

_LAYER_CLASSES = {}


def locally_connected_layers(torch):
    """The PyTorch-only locally connected layers the training step is compared with:
    ``{"einsum": UnfoldEinsumLocal2d, "bmm": UnfoldBmmLocal2d}``, ``torch.nn.Module``
    classes built as ``cls(geom, weight, bias=None)`` (``geom``: a
    :class:`~gpuconv.geometry.ConvGeometry`, any batch size is accepted; ``weight`` in
    gpuconv's layout ``(C_out, H_out, W_out, C_in/g, kH, kW)``, copied into the layer's own;
    ``bias`` ``(C_out, H_out, W_out)`` or ``(C_out,)``). Their ``weight_in_gpuconv_layout()``
    gives the weight (or, with an argument, its gradient) in gpuconv's layout.

    - ``UnfoldEinsumLocal2d``: the usual recipe, :func:`torch_unfold_einsum`, its weight
      stored in gpuconv's layout;
    - ``UnfoldBmmLocal2d``: :func:`torch_unfold_bmm`, its weight stored positions-major so
      that one ``torch.bmm`` over the positions reads it in place.
    """
    key = id(torch)
    if key in _LAYER_CLASSES:
        return _LAYER_CLASSES[key]
    nn = torch.nn

    class _Local(nn.Module):
        forward_of = None  # torch_unfold_einsum or torch_unfold_bmm

        def __init__(self, geom, weight, bias=None):
            super().__init__()
            self.geom = geom
            self.weight = nn.Parameter(self.from_gpuconv_layout(weight.detach()).clone())
            self.bias = None if bias is None else nn.Parameter(bias.detach().clone())

        def from_gpuconv_layout(self, weight):
            return weight

        def weight_in_gpuconv_layout(self, weight=None):
            return self.weight if weight is None else weight

        def forward(self, x):
            return type(self).forward_of(torch, self.geom, self.weight, self.bias)(x)

    class UnfoldEinsumLocal2d(_Local):
        """Locally connected layer: ``unfold`` + ``einsum``, weight in gpuconv's layout."""

        forward_of = staticmethod(torch_unfold_einsum)

    class UnfoldBmmLocal2d(_Local):
        """Locally connected layer: ``unfold`` + ``bmm`` over output positions, weight
        ``(g * H_out * W_out, C_in/g * kH * kW, C_out/g)``."""

        forward_of = staticmethod(torch_unfold_bmm)

        def from_gpuconv_layout(self, weight):
            return bmm_weight_layout(weight, self.geom)

        def weight_in_gpuconv_layout(self, weight=None):
            return from_bmm_weight_layout(self.weight if weight is None else weight, self.geom)

    _LAYER_CLASSES[key] = {"einsum": UnfoldEinsumLocal2d, "bmm": UnfoldBmmLocal2d}
    return _LAYER_CLASSES[key]


def _conv_layer(cls, geom, weight, bias):
    """A ``torch.nn.Conv2d``-like ``cls`` on ``geom`` holding copies of ``weight``, ``bias``."""
    import torch

    stride, padding, dilation = _gpuconv_geometry(geom)
    layer = cls(geom.in_channels, geom.out_channels, (geom.kernel_height, geom.kernel_width),
                stride, padding, dilation, geom.groups, bias=bias is not None,
                device=weight.device, dtype=weight.dtype)
    with torch.no_grad():
        layer.weight.copy_(weight)
        if bias is not None:
            layer.bias.copy_(bias)
    return layer


def _gpuconv_local_layer(geom, weight, bias):
    """``gpuconv.torch.LocallyConnected2d`` on ``geom`` holding copies of ``weight``, ``bias``."""
    import torch

    from ..torch import LocallyConnected2d

    padding = ((geom.pad_top, geom.pad_bottom), (geom.pad_left, geom.pad_right))
    layer = LocallyConnected2d(geom.in_channels, geom.out_channels,
                               (geom.kernel_height, geom.kernel_width),
                               (geom.in_height, geom.in_width), (geom.stride_h, geom.stride_w),
                               padding, (geom.dilation_h, geom.dilation_w), geom.groups,
                               bias=bias is not None, device=weight.device, dtype=weight.dtype)
    with torch.no_grad():
        layer.weight.copy_(weight)
        if bias is not None:
            layer.bias.copy_(bias)
    return layer


def _step_make(build):
    """``make`` of a training step: ``layer = build(torch, geom, weight, bias)`` once, then
    each call ``y = layer(x)`` and ``torch.autograd.grad(y, (x, weight, bias), gy)``."""
    def make(arrays, geom):
        import torch

        layer = build(torch, geom, arrays["weight"], arrays["bias"])
        x = arrays["x"].detach().requires_grad_(True)
        inputs = (x, layer.weight) + (() if layer.bias is None else (layer.bias,))
        gy = arrays["gy"]

        def call():
            with torch.enable_grad():
                return torch.autograd.grad(layer(x), inputs, gy)
        return call
    return make


def _bmm_canonical(result, geom):
    gx, gw, *rest = result
    return (gx, from_bmm_weight_layout(gw, geom), *rest)


def _step_impls(device, torch_ok, torch):
    """The training-step implementations (they all need PyTorch)."""
    if not torch_ok:
        return []
    from .. import torch as gpuconv_torch

    # Memory is not probed in the step: gpuconv.torch allocates through both NumPy and
    # PyTorch, and neither probe sees the other's allocations.
    probe = None
    local = locally_connected_layers(torch)

    def work(op, recipe=False):
        """``workspace``: the layer's own copy of the weights, their gradient, the output,
        the input gradient; for the PyTorch recipes also their columns (kept for the
        backward, and their gradient) and the copies of the weights einsum or bmm make."""
        def workspace(geom, itemsize):
            x = geom.batch * geom.in_channels * geom.in_height * geom.in_width * itemsize
            weights = (math.prod(geom.shared_weight_shape()) * itemsize if op == "conv2d"
                       else _local_weight_bytes(geom, itemsize))
            total = 2 * weights + 2 * _out_bytes(geom, itemsize) + 2 * x
            if recipe:
                total += 3 * _cols_bytes(geom, itemsize) + 2 * weights
            return total
        return workspace

    return [
        Impl("conv2d", "gpuconv", "gpuconv.torch.Conv2d: forward + backward (autograd)",
             _step_make(lambda t, geom, w, b: _conv_layer(gpuconv_torch.Conv2d, geom, w, b)),
             "torch", work("conv2d"), probe, "step"),
        Impl("conv2d", "torch", "torch.nn.Conv2d: forward + backward (autograd)",
             _step_make(lambda t, geom, w, b: _conv_layer(t.nn.Conv2d, geom, w, b)),
             "torch", work("conv2d"), probe, "step"),
        Impl("local_conv2d", "gpuconv",
             "gpuconv.torch.LocallyConnected2d: forward + backward (autograd)",
             _step_make(lambda t, geom, w, b: _gpuconv_local_layer(geom, w, b)),
             "torch", work("local_conv2d"), probe, "step"),
        Impl("local_conv2d", "torch-unfold",
             "PyTorch-only layer, unfold + einsum: forward + backward (autograd)",
             _step_make(lambda t, geom, w, b: local["einsum"](geom, w, b)),
             "torch", work("local_conv2d", True), probe, "step"),
        Impl("local_conv2d", "torch-bmm",
             "PyTorch-only layer, unfold + bmm over positions: forward + backward (autograd)",
             _step_make(lambda t, geom, w, b: local["bmm"](geom, w, b)),
             "torch", work("local_conv2d", True), probe, "step", canonical=_bmm_canonical),
    ]


def _gpuconv_grad_scratch(name, device, geom, itemsize):
    """Bytes of scratch the gradient kernel ``name`` allocates beyond its result, from its
    own estimate (:mod:`gpuconv.ops`); the result's size again where there is none."""
    from ..ops import OPS

    op = OPS[name]
    try:
        estimate = op.scratch(device)
        if device == "cpu":
            return int(estimate(geom, itemsize))
        # the CUDA estimates count elements of the operands' dtype
        return int(estimate(geom, np.dtype(f"f{itemsize}"))) * itemsize
    except (ImportError, AttributeError):
        return math.prod(op.output_shape(geom)) * itemsize


def _backward_impls(device, torch_ok, torch, peers):
    def gpuconv_work(op):
        def workspace(geom, itemsize):
            x = geom.batch * geom.in_channels * geom.in_height * geom.in_width * itemsize
            w = (_local_weight_bytes(geom, itemsize) if op == "local_conv2d"
                 else math.prod(geom.shared_weight_shape()) * itemsize)
            return x + w + max(_gpuconv_grad_scratch(f"{op}_input", device, geom, itemsize),
                               _gpuconv_grad_scratch(f"{op}_weight", device, geom, itemsize))
        return workspace

    impls = [
        Impl("conv2d", "gpuconv",
             f"gpuconv.grad.conv2d_input + conv2d_weight (device={device!r})",
             _gpuconv_backward_make("conv2d", device), "gpuconv", gpuconv_work("conv2d"),
             "tracemalloc", "backward"),
        Impl("local_conv2d", "gpuconv",
             f"gpuconv.grad.local_conv2d_input + local_conv2d_weight (device={device!r})",
             _gpuconv_backward_make("local_conv2d", device), "gpuconv",
             gpuconv_work("local_conv2d"), "tracemalloc", "backward"),
    ]
    if not (peers and torch_ok):
        return impls
    probe = "torch-cuda" if device == "cuda" else "torch-cpu"
    library = "cuDNN" if device == "cuda" else "oneDNN"
    impls.insert(1, Impl(
        "conv2d", "torch",
        f"torch.autograd.grad of torch.nn.functional.conv2d w.r.t. (x, weight), {library}: "
        "the backward alone (forward once, untimed, graph retained)",
        _torch_backward_make(torch_conv2d)(torch), "torch",
        lambda geom, itemsize: (2 * _out_bytes(geom, itemsize)
                                + 2 * geom.batch * geom.in_channels * geom.in_height
                                * geom.in_width * itemsize), probe, "backward"))
    impls.append(Impl(
        "local_conv2d", "torch-unfold",
        "torch.autograd.grad through unfold + einsum w.r.t. (x, weight): the backward alone "
        "(forward once, untimed, graph retained)",
        _torch_backward_make(torch_unfold_einsum)(torch), "torch",
        # retained graph (columns, output) + the gradients + einsum's copies
        lambda geom, itemsize: (3 * _cols_bytes(geom, itemsize) + 2 * _out_bytes(geom, itemsize)
                                + 3 * _local_weight_bytes(geom, itemsize)
                                + geom.batch * geom.in_channels * geom.in_height
                                * geom.in_width * itemsize),
        probe, "backward"))
    return impls


def implementations(device, torch=None, peers=True, passes=("forward",), dial=()):
    """The implementations to time on ``device`` (``"cpu"`` or ``"cuda"``), in burst order,
    for each pass in ``passes`` (:data:`PASSES`), forward first.

    - forward: gpuconv's two operations always; with ``peers``, PyTorch's ``conv2d`` and the
      unfold + einsum recipe when PyTorch is installed (and, on ``"cuda"``, built with CUDA),
      else (on the CPU only) NumPy im2col baselines; between the two operations,
      ``gpuconv.tiled_conv2d`` at each point of ``dial`` (:func:`dial_implementations`);
    - backward: ``gpuconv.grad``'s two gradients of each operation; with ``peers`` and
      PyTorch, autograd's backward through ``conv2d`` and through unfold + einsum
      (:func:`torch_autograd_backward`); no NumPy baselines;
    - step (needs PyTorch: nothing without it): ``gpuconv.torch.Conv2d`` and
      ``LocallyConnected2d``; with ``peers``, ``torch.nn.Conv2d`` and the PyTorch-only
      locally connected layers (:func:`locally_connected_layers`).
    """
    torch_ok = torch is not None and (device == "cpu" or torch.cuda.is_available())
    impls = []
    if "forward" in passes:
        forward = _forward_impls(device, torch_ok, torch, peers)
        first_local = next(n for n, i in enumerate(forward) if i.op == "local_conv2d")
        impls += (forward[:first_local] + dial_implementations(device, dial)
                  + forward[first_local:])
    if "backward" in passes:
        impls += _backward_impls(device, torch_ok, torch, peers)
    if "step" in passes:
        impls += [i for i in _step_impls(device, torch_ok, torch)
                  if peers or i.name == "gpuconv"]
    return impls


def _forward_impls(device, torch_ok, torch, peers):
    impls = [
        Impl("conv2d", "gpuconv", f"gpuconv.conv2d(device={device!r})",
             _gpuconv_make("conv2d", device), "gpuconv",
             lambda geom, itemsize: _out_bytes(geom, itemsize), "tracemalloc"),
        Impl("local_conv2d", "gpuconv", f"gpuconv.local_conv2d(device={device!r})",
             _gpuconv_make("local_conv2d", device), "gpuconv",
             lambda geom, itemsize: _out_bytes(geom, itemsize), "tracemalloc"),
    ]
    if not peers:
        return impls
    if torch_ok:
        probe = "torch-cuda" if device == "cuda" else "torch-cpu"
        impls.insert(1, Impl(
            "conv2d", "torch", f"torch.nn.functional.conv2d ({device})",
            _torch_conv2d_make(torch), "torch",
            lambda geom, itemsize: _out_bytes(geom, itemsize), probe))
        impls.append(Impl(
            "local_conv2d", "torch-unfold",
            f"torch.nn.functional.unfold + torch.einsum ({device})",
            _torch_unfold_make(torch), "torch",
            # unfold buffer + output + einsum's possible copies of cols and weights
            lambda geom, itemsize: (2 * _cols_bytes(geom, itemsize) + 2 * _out_bytes(geom, itemsize)
                                    + _local_weight_bytes(geom, itemsize)),
            probe))
    elif device == "cpu":
        impls.insert(1, Impl(
            "conv2d", "numpy-im2col", "NumPy im2col copy + BLAS matmul (no framework "
            "installed; float16: cast to float32 and back in each call)",
            lambda arrays, geom: _numpy_conv2d_make(arrays, geom), "numpy",
            lambda geom, itemsize: _cols_bytes(geom, itemsize) + 2 * _out_bytes(geom, itemsize)
            + _padded_bytes(geom, itemsize), "tracemalloc"))
        impls.append(Impl(
            "local_conv2d", "numpy-im2col-matmul",
            "NumPy im2col copy + batched matmul per output position (no framework "
            "installed; float16: cast to float32 and back in each call)",
            lambda arrays, geom: _numpy_local_make(arrays, geom), "numpy",
            lambda geom, itemsize: _cols_bytes(geom, itemsize) + 2 * _out_bytes(geom, itemsize)
            + _padded_bytes(geom, itemsize), "tracemalloc"))
    return impls


def describe_peers(device, torch=None, peers=True, problem=None, passes=("forward",)):
    """One line: which peers :func:`implementations` picks for these arguments, and why;
    for the backward and the step (``"backward: ..."``, ``"step: ..."``), which are missing
    without PyTorch.

    ``problem`` says why ``torch`` is ``None`` (:func:`torch_problem`); without one, PyTorch
    was not asked for.
    """
    texts = describe_peers_by_pass(device, torch, peers, problem, passes)
    return "; ".join(text if name == "forward" else f"{name}: {text}"
                     for name, text in texts.items())


def describe_peers_by_pass(device, torch=None, peers=True, problem=None, passes=("forward",)):
    """``{pass: what its peers are, or why there are none}`` for each of ``passes``
    (:func:`describe_peers` says it in one line)."""
    missing = _torch_missing(device, torch, problem)
    texts = {}
    for name in (p for p in PASSES if p in passes):
        if name == "forward":
            texts[name] = ("none asked for: gpuconv only" if not peers
                           else _describe_forward(device, torch, problem))
        elif name == "step" and missing:
            texts[name] = f"not run, {missing} (gpuconv.torch and every peer need it)"
        elif not peers:
            texts[name] = "none asked for: gpuconv only"
        elif name == "backward" and missing:
            texts[name] = (f"none, {missing}: missing torch (autograd's backward of "
                           "torch.nn.functional.conv2d) and torch-unfold (autograd's backward "
                           "through unfold + einsum)")
        elif name == "backward":
            texts[name] = ("PyTorch autograd, the backward alone (forward once, untimed, graph "
                           "retained): through torch.nn.functional.conv2d beside conv2d, "
                           "through unfold + einsum beside local_conv2d")
        else:
            texts[name] = ("torch.nn.Conv2d beside gpuconv.torch.Conv2d; PyTorch-only unfold + "
                           "einsum (torch-unfold) and unfold + bmm (torch-bmm) layers beside "
                           "gpuconv.torch.LocallyConnected2d")
    return texts


def _torch_missing(device, torch, problem):
    """Why PyTorch cannot run here (a phrase), or ``None`` when it can."""
    if torch is not None and (device == "cpu" or torch.cuda.is_available()):
        return None
    if torch is not None:
        return f"PyTorch {torch.__version__} is built without CUDA"
    return f"PyTorch {problem}" if problem else "PyTorch not used"


def _describe_forward(device, torch, problem):
    missing = f"PyTorch {problem}" if problem else "PyTorch not used"
    if torch is not None and (device == "cpu" or torch.cuda.is_available()):
        return (f"PyTorch {torch.__version__} found: torch.nn.functional.conv2d beside conv2d, "
                f"unfold + einsum beside local_conv2d")
    if torch is not None:
        return (f"none: PyTorch {torch.__version__} is built without CUDA, and the NumPy "
                "baselines run on the CPU only")
    if device == "cpu":
        hint = "; pip install torch to compare with PyTorch" if problem == "not installed" else ""
        return (f"{missing}, so NumPy im2col baselines instead (numpy-im2col, "
                f"numpy-im2col-matmul){hint}")
    return f"none: {missing}, and the NumPy baselines run on the CPU only"


def _local_weight_bytes(geom, itemsize):
    return math.prod(geom.local_weight_shape()) * itemsize


def _padded_bytes(geom, itemsize):
    if not (geom.pad_top or geom.pad_bottom or geom.pad_left or geom.pad_right):
        return 0
    return (geom.batch * geom.in_channels * (geom.in_height + geom.pad_top + geom.pad_bottom)
            * (geom.in_width + geom.pad_left + geom.pad_right) * itemsize)


# ----------------------------------------------------------------------------- memory

@contextlib.contextmanager
def _quiet_fds():
    """Silence file descriptors 1 and 2 (the profiler's C++ side prints there)."""
    saved = []
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
    except OSError:
        yield
        return
    try:
        for fd in (1, 2):
            try:
                saved.append((fd, os.dup(fd)))
                os.dup2(devnull, fd)
            except OSError:
                pass
        yield
    finally:
        for fd, copy in saved:
            os.dup2(copy, fd)
            os.close(copy)
        os.close(devnull)


_PROBE_METHODS = {
    "tracemalloc": "tracemalloc peak of one call (NumPy allocations, output included; "
                   "Numba's in-kernel scratch of N values per parallel job is not traced)",
    "torch-cpu": "PyTorch profiler (profile_memory) peak of one call, output included",
    "rss": "peak resident set size sampled every 0.5 ms during one call, minus the size "
           "before it (PyTorch's CPU profiler is too slow with this many output positions; "
           "small temporaries served from already-resident heap are not seen)",
    "torch-cuda": "torch.cuda.max_memory_allocated over one call, output included",
}


#: Above this many output positions PyTorch's einsum records ~10 profiler events per
#: position (its CPU bmm clones each small matrix) and profiling one call takes minutes.
PROFILER_MAX_POSITIONS = 20_000


def _rss_bytes():
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _rss_peak(fn):
    """Peak RSS growth while ``fn()`` runs, sampled by a thread (None if unavailable)."""
    import threading

    try:
        base = _rss_bytes()
    except (OSError, ValueError, AttributeError):
        return None
    peak = [base]
    done = threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], _rss_bytes())
            time.sleep(0.0005)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    try:
        out = fn()
        peak[0] = max(peak[0], _rss_bytes())
        del out
    finally:
        done.set()
        thread.join()
    return max(0, peak[0] - base)


def peak_extra_bytes(impl, fn, backend, positions=0):
    """``(bytes, method)``: peak memory one call of ``fn`` allocates beyond its inputs.

    ``positions`` (output positions times groups) picks the method for PyTorch on the CPU.
    ``bytes`` is ``None`` (with the reason as ``method``) when this implementation's
    allocations cannot be observed on this device.
    """
    probe = impl.memory_probe
    if backend.kind == "cuda" and probe == "tracemalloc":
        if not backend.torch_cuda:
            return None, "not measured (Numba's GPU allocations are not observable here)"
        # gpuconv allocates its output (and any scratch) through the inputs' library.
        peak, method = peak_extra_bytes(Impl(impl.op, impl.name, "", None, "", None,
                                             "torch-cuda"), fn, backend)
        return peak, method + " (gpuconv allocates through PyTorch for PyTorch inputs; "\
            "anything Numba allocates itself is not seen)"
    if probe == "tracemalloc":
        was_tracing = tracemalloc.is_tracing()
        if not was_tracing:
            tracemalloc.start()
        tracemalloc.reset_peak()
        base, _ = tracemalloc.get_traced_memory()
        out = fn()
        _, peak = tracemalloc.get_traced_memory()
        del out
        if not was_tracing:
            tracemalloc.stop()
        return max(0, peak - base), _PROBE_METHODS[probe]
    torch = backend.torch
    if probe == "torch-cuda":
        backend.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        out = fn()
        backend.synchronize()
        peak = torch.cuda.max_memory_allocated() - base
        del out
        return max(0, int(peak)), _PROBE_METHODS[probe]
    if probe == "torch-cpu" and positions > PROFILER_MAX_POSITIONS:
        peak = _rss_peak(fn)
        return (peak, _PROBE_METHODS["rss"]) if peak is not None else (None, "not measured")
    if probe == "torch-cpu":
        try:
            from torch.profiler import ProfilerActivity, profile
            with _quiet_fds():
                with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
                    out = fn()
                del out
            events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
            current = peak = 0
            for event in sorted(events, key=lambda e: e.start_ns()):
                current += event.nbytes()
                peak = max(peak, current)
            return int(peak), _PROBE_METHODS[probe]
        except Exception as exc:  # profiler internals differ between versions
            return None, f"not measured (PyTorch profiler unavailable: {exc})"
    return None, "not measured"


# ----------------------------------------------------------------------------- ceilings

def _blas_name():
    try:
        return np.show_config(mode="dicts")["Build Dependencies"]["blas"]["name"]
    except Exception:
        return "unknown BLAS"


#: Compute-bound layers for the CPU compute reference: (N, C_in, H, C_out), 3 x 3, padding 1
#: (VGG-16 conv3_2 at N=1 and conv5_1 at N=2).
_CEILING_CONVS = ((1, 256, 56, 256), (2, 512, 14, 512))


def _best_of(fn, warmup, repeat, clock=time.perf_counter):
    for _ in range(warmup):
        fn()
    best = float("inf")
    for _ in range(repeat):
        start = clock()
        fn()
        best = min(best, clock() - start)
    return best


def _torch_conv_gflops(torch, dtype, repeat, clock=time.perf_counter):
    """Best GFLOP/s of PyTorch's conv2d (oneDNN) over :data:`_CEILING_CONVS`."""
    torch_dtype = getattr(torch, np.dtype(dtype).name)
    best = 0.0
    with torch.no_grad():
        for n, c_in, size, c_out in _CEILING_CONVS:
            x = torch.ones((n, c_in, size, size), dtype=torch_dtype)
            w = torch.ones((c_out, c_in, 3, 3), dtype=torch_dtype)
            flops = 2 * n * c_out * size * size * c_in * 9
            seconds = _best_of(lambda: torch.nn.functional.conv2d(x, w, padding=1), 3, repeat,
                               clock)
            best = max(best, flops / seconds / 1e9)
    return best


def measure_bandwidth(dtype, quick=False, clock=time.perf_counter):
    """The host's copy bandwidth, measured now with ``clock``, one thread:

    - ``bandwidth_gbs``: read + write bytes of a 256 MiB NumPy copy into an existing array,
      / its best time;
    - ``bandwidth_new_gbs``: the same copy into a newly allocated array (``src.copy()``): what
      a call that returns a new result of that size pays, the operating system's first
      touch of its pages included.
    """
    dtype = np.dtype(dtype)
    repeat = 3 if quick else 5
    copy_bytes = 256 * 2 ** 20
    src = np.ones(copy_bytes // dtype.itemsize, dtype=dtype)
    dst = np.ones_like(src)
    seconds = _best_of(lambda: np.copyto(dst, src), 1, repeat + 2, clock)
    seconds_new = _best_of(src.copy, 1, repeat + 2, clock)
    return {"bandwidth_gbs": 2 * src.nbytes / seconds / 1e9,
            "bandwidth_method": f"NumPy copy of {copy_bytes // 2 ** 20} MiB, "
                                f"(read + write bytes) / best of {repeat + 2}",
            "bandwidth_new_gbs": 2 * src.nbytes / seconds_new / 1e9,
            "bandwidth_new_method": f"the same copy into a newly allocated array, best of "
                                    f"{repeat + 2}"}


def measure_ceilings(backend, dtype, quick=False):
    """Measured in this run: memory bandwidth and a compute reference for ``dtype``
    (float16 on the CPU: float32's compute reference, which is what runs there).

    CPU, timed with ``backend.clock`` (process CPU time with ``--one-core``, like the
    kernels): bandwidth = read + write bytes of a large NumPy copy / its best time (also into
    a new array: :func:`measure_bandwidth`); compute = the better of a large NumPy matmul
    (BLAS) and, when PyTorch is installed, PyTorch's conv2d on VGG-16 conv3_2 (oneDNN), both
    reported. CUDA: a device-to-device copy and a PyTorch matmul with TF32 off (compute is
    not measured without PyTorch).
    """
    dtype = np.dtype(dtype)
    repeat = 3 if quick else 5
    copy_bytes = 256 * 2 ** 20
    matmul_n = 2048
    if backend.kind == "cpu" and dtype == np.float16:
        # gpuconv computes float16 in float32 on the CPU (one conversion pass, then the
        # float32 kernels), and NumPy's float16 matmul runs without BLAS (minutes at this
        # size): the compute reference is float32's. A copy moves bytes, whatever their dtype.
        result = measure_ceilings(backend, np.float32, quick)
        result["compute_method"] = ("float32, as gpuconv computes float16 on the CPU: "
                                    + result["compute_method"])
        return result
    if backend.kind == "cpu":
        candidates = {}
        # PyTorch first: after a NumPy/BLAS call its threads still hold the cores.
        if backend.torch is not None:
            try:
                candidates[f"PyTorch {dtype.name} conv2d (VGG-16 conv3_2 N=1, conv5_1 N=2)"] = \
                    _torch_conv_gflops(backend.torch, dtype, 2 * repeat, backend.clock)
            except Exception:  # pragma: no cover - a broken torch must not stop the run
                pass
        a = np.ones((matmul_n, matmul_n), dtype=dtype)
        matmul = 2 * matmul_n ** 3 / _best_of(lambda: a @ a, 2, 2 * repeat, backend.clock) / 1e9
        del a
        candidates[f"NumPy {dtype.name} {matmul_n}x{matmul_n} matmul ({_blas_name()})"] = matmul
        best_name = max(candidates, key=candidates.get)
        return {
            **measure_bandwidth(dtype, quick, backend.clock),
            "compute_gflops": candidates[best_name],
            "compute_method": "best of: " + "; ".join(
                f"{name} {value:.4g} GFLOP/s" for name, value in candidates.items())
                + f" (best of {2 * repeat} calls each, after warm-up)",
            "compute_candidates": candidates,
        }
    torch = backend.torch
    result = {"bandwidth_gbs": None, "bandwidth_method": "not measured",
              "compute_gflops": None, "compute_method": "not measured (needs PyTorch with CUDA)"}
    copy_bytes *= 4
    if backend.torch_cuda:
        src = torch.ones(copy_bytes // dtype.itemsize, dtype=getattr(torch, dtype.name),
                         device="cuda")
        dst = torch.empty_like(src)
        seconds = min(backend.time_calls(lambda: dst.copy_(src), repeat * 2))
        result["bandwidth_gbs"] = 2 * copy_bytes / seconds / 1e9
        result["bandwidth_method"] = (f"torch device-to-device copy of {copy_bytes // 2 ** 20} "
                                      f"MiB, (read + write bytes) / best of {repeat * 2}")
        del src, dst
        n = 8192
        a = torch.ones((n, n), dtype=getattr(torch, dtype.name), device="cuda")
        backend.time_calls(lambda: a @ a, 1)
        seconds = min(backend.time_calls(lambda: a @ a, repeat))
        result["compute_gflops"] = 2 * n ** 3 / seconds / 1e9
        result["compute_method"] = (f"torch {dtype.name} {n}x{n} matmul, TF32 off, "
                                    f"best of {repeat}")
        del a
    else:
        from numba import cuda
        src = cuda.to_device(np.ones(copy_bytes // dtype.itemsize, dtype=dtype))
        dst = cuda.device_array_like(src)
        seconds = min(backend.time_calls(lambda: dst.copy_to_device(src), repeat * 2))
        result["bandwidth_gbs"] = 2 * copy_bytes / seconds / 1e9
        result["bandwidth_method"] = (f"Numba device-to-device copy of "
                                      f"{copy_bytes // 2 ** 20} MiB, best of {repeat * 2}")
    return result
