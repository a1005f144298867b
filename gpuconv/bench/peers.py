"""What ``gpuconv bench`` times, and how: implementations, timers, memory probes, ceilings.

Every implementation computes the same thing on the same arrays: ``y = op(x, weight) + bias``
with one bias per output channel. Nothing here imports PyTorch at module import; the torch
implementations exist only when :func:`load_torch` finds it.

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

__all__ = ["Impl", "load_torch", "torch_problem", "implementations", "describe_peers",
           "Backend", "available_memory", "measure_ceilings", "peak_extra_bytes",
           "torch_conv2d", "torch_unfold_einsum"]

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
    def to_device(self, array):
        """``array`` (NumPy) where gpuconv should read it."""
        if self.kind == "cpu":
            return array
        if self.torch_cuda:
            return self.torch.from_numpy(array).cuda()
        from numba import cuda
        return cuda.to_device(array)

    def to_torch(self, array):
        """``array`` (NumPy) as a tensor on this device, sharing memory on the host."""
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

    def time_first_call(self, fn):
        """Seconds of one call, synchronised (wall clock: it may include compilation)."""
        self.synchronize()
        start = time.perf_counter()
        out = fn()
        self.synchronize()
        return time.perf_counter() - start, out

    def to_host(self, out):
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
                return int(backend.torch.cuda.mem_get_info()[0])
            from numba import cuda
            return int(cuda.current_context().get_memory_info().free)
        except Exception:
            return None
    return host_memory_available()


# ----------------------------------------------------------------------------- implementations

class Impl:
    """One implementation of one operation.

    Attributes:
        op: ``"conv2d"`` or ``"local_conv2d"``.
        name: short label used in records (``"gpuconv"``, ``"torch"``, ...).
        description: one line saying exactly what is timed.
        make: ``make(arrays, geom) -> fn``; ``fn()`` runs one forward pass and returns ``y``.
            ``arrays`` has ``x``, ``weight``, ``bias`` as this implementation reads them.
        array_kind: ``"gpuconv"``, ``"torch"`` or ``"numpy"``: what ``make`` expects.
        workspace: ``workspace(geom, itemsize) -> bytes``, an upper estimate of what one call
            allocates beyond its inputs (output included); used to skip what will not fit.
        memory_probe: ``"tracemalloc"``, ``"torch-cpu"``, ``"torch-cuda"`` or ``None``.
    """

    def __init__(self, op, name, description, make, array_kind, workspace, memory_probe):
        self.op, self.name, self.description = op, name, description
        self.make, self.array_kind = make, array_kind
        self.workspace, self.memory_probe = workspace, memory_probe

    def __repr__(self):
        return f"Impl({self.op!r}, {self.name!r})"


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


def _gpuconv_make(op, device):
    import gpuconv

    function = gpuconv.conv2d if op == "conv2d" else gpuconv.local_conv2d

    def make(arrays, geom):
        x, weight, bias = arrays["x"], arrays["weight"], arrays["bias"]
        stride, padding, dilation = _pairs(geom)
        if not _symmetric(geom):
            padding = "same"  # uneven padding comes only from "same" (stride 1)
        groups = geom.groups

        def call():
            return function(x, weight, bias, stride, padding, dilation, groups, device=device)
        return call
    return make


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
    n, g = geom.batch, geom.groups
    positions = geom.out_height * geom.out_width
    k = geom.in_channels_per_group * geom.kernel_height * geom.kernel_width
    # (C_out, H_out, W_out, C_in/g, kH, kW) -> (g, C_out/g, L, K): a view, no copy.
    weight_view = weight.view(g, geom.out_channels_per_group, positions, k)
    if bias is not None:
        bias = bias.view(1, geom.out_channels, 1, 1) if bias.dim() == 1 else bias.unsqueeze(0)
    kernel = (geom.kernel_height, geom.kernel_width)
    stride, _, dilation = _pairs(geom)
    prepare = _torch_input(torch, geom)
    out_shape = geom.output_shape

    def call(x):
        x, padding = prepare(x)
        cols = functional.unfold(x, kernel, dilation, padding, stride)  # (N, g*K, L)
        y = torch.einsum("ngkl,golk->ngol", cols.view(n, g, k, positions), weight_view)
        y = y.reshape(out_shape)
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
    ``(N, C_out/g, H_out*W_out)``, then the bias."""
    x, weight, bias = arrays["x"], arrays["weight"], arrays["bias"]
    c_ig, c_og = geom.in_channels_per_group, geom.out_channels_per_group
    positions = geom.out_height * geom.out_width

    def call():
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


def implementations(device, torch=None, peers=True):
    """The implementations to time on ``device`` (``"cpu"`` or ``"cuda"``), in burst order.

    gpuconv's two operations always; with ``peers``, PyTorch's ``conv2d`` and the
    unfold + einsum recipe when PyTorch is installed (and, on ``"cuda"``, built with CUDA),
    else (on the CPU only) NumPy im2col baselines.
    """
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
    torch_ok = torch is not None and (device == "cpu" or torch.cuda.is_available())
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
            "conv2d", "numpy-im2col", "NumPy im2col copy + BLAS matmul (no framework installed)",
            lambda arrays, geom: _numpy_conv2d_make(arrays, geom), "numpy",
            lambda geom, itemsize: _cols_bytes(geom, itemsize) + 2 * _out_bytes(geom, itemsize)
            + _padded_bytes(geom, itemsize), "tracemalloc"))
        impls.append(Impl(
            "local_conv2d", "numpy-im2col-matmul",
            "NumPy im2col copy + batched matmul per output position (no framework installed)",
            lambda arrays, geom: _numpy_local_make(arrays, geom), "numpy",
            lambda geom, itemsize: _cols_bytes(geom, itemsize) + 2 * _out_bytes(geom, itemsize)
            + _padded_bytes(geom, itemsize), "tracemalloc"))
    return impls


def describe_peers(device, torch=None, peers=True, problem=None):
    """One line: which peers :func:`implementations` picks for these arguments, and why.

    ``problem`` says why ``torch`` is ``None`` (:func:`torch_problem`); without one, PyTorch
    was not asked for.
    """
    if not peers:
        return "none asked for: gpuconv only"
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


def _best_of(fn, warmup, repeat):
    for _ in range(warmup):
        fn()
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def _torch_conv_gflops(torch, dtype, repeat):
    """Best GFLOP/s of PyTorch's conv2d (oneDNN) over :data:`_CEILING_CONVS`."""
    torch_dtype = getattr(torch, np.dtype(dtype).name)
    best = 0.0
    with torch.no_grad():
        for n, c_in, size, c_out in _CEILING_CONVS:
            x = torch.ones((n, c_in, size, size), dtype=torch_dtype)
            w = torch.ones((c_out, c_in, 3, 3), dtype=torch_dtype)
            flops = 2 * n * c_out * size * size * c_in * 9
            seconds = _best_of(lambda: torch.nn.functional.conv2d(x, w, padding=1), 3, repeat)
            best = max(best, flops / seconds / 1e9)
    return best


def measure_ceilings(backend, dtype, quick=False):
    """Measured in this run: memory bandwidth and a compute reference for ``dtype``.

    CPU: bandwidth = read + write bytes of a large NumPy copy / its best time; compute = the
    better of a large NumPy matmul (BLAS) and, when PyTorch is installed, PyTorch's conv2d on
    VGG-16 conv3_2 (oneDNN), both reported. CUDA: a device-to-device copy and a PyTorch
    matmul with TF32 off (compute is not measured without PyTorch).
    """
    dtype = np.dtype(dtype)
    repeat = 3 if quick else 5
    copy_bytes = 256 * 2 ** 20
    matmul_n = 2048
    if backend.kind == "cpu":
        candidates = {}
        # PyTorch first: after a NumPy/BLAS call its threads still hold the cores.
        if backend.torch is not None:
            try:
                candidates[f"PyTorch {dtype.name} conv2d (VGG-16 conv3_2 N=1, conv5_1 N=2)"] = \
                    _torch_conv_gflops(backend.torch, dtype, 2 * repeat)
            except Exception:  # pragma: no cover - a broken torch must not stop the run
                pass
        a = np.ones((matmul_n, matmul_n), dtype=dtype)
        matmul = 2 * matmul_n ** 3 / _best_of(lambda: a @ a, 2, 2 * repeat) / 1e9
        del a
        candidates[f"NumPy {dtype.name} {matmul_n}x{matmul_n} matmul ({_blas_name()})"] = matmul
        src = np.ones(copy_bytes // dtype.itemsize, dtype=dtype)
        dst = np.ones_like(src)
        seconds = _best_of(lambda: np.copyto(dst, src), 1, repeat + 2)
        bandwidth = 2 * src.nbytes / seconds
        del src, dst
        best_name = max(candidates, key=candidates.get)
        return {
            "bandwidth_gbs": bandwidth / 1e9,
            "bandwidth_method": f"NumPy copy of {copy_bytes // 2 ** 20} MiB, "
                                f"(read + write bytes) / best of {repeat + 2}",
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
