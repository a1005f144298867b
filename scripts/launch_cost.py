"""Host work of a kernel launch, without a GPU: Numba's dispatcher against the fast path.

    python scripts/launch_cost.py                       # tiny call + DeepFace L6, float32
    python scripts/launch_cost.py --layers vgg16-conv5_1 --rounds 9 --calls 2000

For every kernel launch the CUDA path makes for conv2d, local_conv2d and their gradients on
the tiny per-call shape (x 8x16x16x16, 16 maps 3x3) and on the given benchmark layers (GPU
batch), this times on the CPU, interleaved, the median of ``--rounds`` rounds of
``--calls`` repetitions:

- ``dispatcher``: the host work numba-cuda's dispatcher does for that launch before the
  driver call: a flat view of each array (the reshape ``gpuconv.cuda.launch._flat`` made),
  the type of each array argument (its overload look-up types every non-NumPy argument in
  Python), ``_Kernel._prepare_args`` for every argument and the ``cuda.core`` launch
  configuration;
- ``fast``: :mod:`gpuconv.cuda.fastlaunch` packing the same arguments (N-D arrays for the
  flat parameters, no views).

and, once, what viewing a caller's array costs: the Numba device array the CUDA path made
of each operand, the output and each scratch array (its object only: the driver query and
memory-pointer object ``numba.cuda.from_cuda_array_interface`` adds need a GPU), against
the fast path's :class:`~gpuconv.cuda.fastlaunch.DeviceView`; and, with PyTorch installed,
what reading a CUDA tensor's shape, strides, dtype and pointer costs: PyTorch's
``__cuda_array_interface__`` property (read twice per operand by the public layer's generic
path) against :func:`gpuconv.conv.torch_cuda_interface` (once), both on a CPU tensor (the
property's body without its test that the tensor is on a GPU).

Both lists are compared before timing. Not included, because it is the same for both: the
call into the driver (``cuda.core.launch``, which copies the list into the launch), and the
integer arguments' typing in numba-cuda's C dispatcher. The arrays are Numba device arrays
over a stand-in allocation (a pointer and nothing behind it), so no GPU is needed; what a
whole call costs on a GPU is measured by ``scripts/gpu_check.py`` (phase ``overhead``).
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import functools
import os
import sys
import time

import numpy as np

from gpuconv.appkit import positive_int
from gpuconv.geometry import conv_geometry

OPS = ("conv2d", "local_conv2d", "conv2d_input", "conv2d_weight", "local_conv2d_input",
       "local_conv2d_weight")


class StandInMemory:
    """A device allocation's stand-in: a pointer, nothing behind it."""

    def __init__(self, ptr):
        self.device_ctypes_pointer = ctypes.c_void_p(ptr)
        self.handle = self.device_ctypes_pointer


_NEXT_PTR = [0x7f0000000000]


def device_array(shape, dtype, strides=None):
    """A Numba ``DeviceNDArray`` of ``shape`` over a stand-in allocation."""
    from numba.cuda.cudadrv.devicearray import DeviceNDArray

    from gpuconv.device import c_strides

    dtype = np.dtype(dtype)
    _NEXT_PTR[0] += 1 << 24
    return DeviceNDArray(tuple(shape), strides or c_strides(tuple(shape), dtype.itemsize),
                         dtype, gpu_data=StandInMemory(_NEXT_PTR[0]))


def operands(op, geom, dtype):
    """Stand-in device operands of ``op`` (a :class:`gpuconv.ops.Op`) on ``geom``, in the
    order of its kind; the forward with a bias."""
    x = device_array(geom.input_shape, dtype)
    gy = device_array(geom.output_shape, dtype)
    w = device_array(op.weight_shape(geom), dtype)
    if op.kind == "forward":
        return (x, w, device_array(op.bias_shapes(geom)[-1], dtype))
    if op.kind == "input_grad":
        return (gy, w)
    return (x, gy)


class _Recorder:
    def __init__(self, spec, log):
        self.spec, self.log = spec, log

    def __getitem__(self, launch):
        return lambda *args: self.log.append((self.spec, launch, args))


@contextlib.contextmanager
def recording(log, flat_views=False):
    """Compiled kernels replaced by recorders (none is compiled), ``_flat`` as on a GPU
    with the fast path on (``flat_views=False``) or as in the simulator."""
    from gpuconv.cuda import fastlaunch, kernels, launch, spec, tiled

    record = functools.partial(_Recorder, log=log)
    saved = [(module, "compiled", module.compiled) for module in (kernels, spec, tiled)]
    saved += [(launch, "_FLAT_VIEWS_NEEDED", launch._FLAT_VIEWS_NEEDED),
              (fastlaunch, "_STATE", fastlaunch._STATE)]
    try:
        for module in (kernels, spec, tiled):
            module.compiled = record
        launch._FLAT_VIEWS_NEEDED = [flat_views]
        fastlaunch._STATE = [True]
        yield
    finally:
        for module, name, value in saved:
            setattr(module, name, value)


def recorded_launches(op_name, geom, dtype, flat_views=False):
    """``[(spec, launch shape, args)]``: every kernel launch the CUDA path makes for
    ``op_name`` on ``geom`` with stand-in device arrays, in order (nothing runs)."""
    from gpuconv import ops

    op = ops.OPS[op_name]
    log = []
    with recording(log, flat_views):
        out = device_array(op.output_shape(geom), dtype)
        op.kernel("cuda")(*operands(op, geom, dtype), out, geom, 0,
                          empty=lambda shape, dt: device_array(shape, dt))
    return log


class NumbaKernel:
    """What numba-cuda's compiled kernel (``_Kernel``) gives the marshalling: its argument
    types and its own ``_prepare_args``."""

    def __init__(self, signature):
        from numba.cuda import dispatcher

        self.argument_types = tuple(signature)
        self.extensions = []
        self.debug = self.cooperative = False
        self._prepare_args = functools.partial(dispatcher._Kernel._prepare_args, self)


def dispatcher_work(kernel, launch, args):
    """The dispatcher's host work for one launch of ``kernel`` (a :class:`NumbaKernel`;
    see the module docstring); returns its argument list."""
    from cuda.core import LaunchConfig
    from numba.cuda.errors import normalize_kernel_dimensions
    from numba.cuda.typing.typeof import Purpose, typeof

    flat = []
    for ty, a in zip(kernel.argument_types, args):
        if getattr(ty, "ndim", 0) == 1 and getattr(a, "ndim", 1) != 1:
            a = a.reshape(a.size)  # the view gpuconv.cuda.launch._flat made
        flat.append(a)
    for a in flat:
        if hasattr(a, "gpu_data"):
            typeof(a, Purpose.argument)
    packed = []
    for ty, value in zip(kernel.argument_types, flat):
        kernel._prepare_args(ty, value, 0, [], packed)
    grid, block = normalize_kernel_dimensions(launch[0], launch[1])
    LaunchConfig(grid=grid, block=block, shmem_size=launch[3] if len(launch) > 3 else 0,
                 is_cooperative=False)
    return packed


def _values(packed):
    return [getattr(a, "value", a) for a in packed]


def measure(geometries, dtype=np.float32, rounds=7, calls=1000):
    """Rows ``(label, op, kernel, arguments, dispatcher us, fast us)``, medians of
    ``rounds`` interleaved rounds of ``calls`` launches each."""
    from gpuconv.cuda.fastlaunch import FastKernel

    rows = []
    for label, geom in geometries:
        for op_name in OPS:
            for spec, launch, args in recorded_launches(op_name, geom, dtype):
                fast = FastKernel(None, spec.signature, spec.name)
                kernel = NumbaKernel(spec.signature)
                packed = fast._pack(args)
                reference = dispatcher_work(kernel, launch, args)
                if _values(packed) != _values(reference):
                    raise AssertionError(f"{spec.name}: the fast path's arguments differ "
                                         "from numba-cuda's")
                times = {"dispatcher": [], "fast": []}
                for _ in range(rounds):
                    for name in ("dispatcher", "fast"):
                        start = time.perf_counter_ns()
                        if name == "fast":
                            for _ in range(calls):
                                fast._pack(args)
                        else:
                            for _ in range(calls):
                                dispatcher_work(kernel, launch, args)
                        times[name].append((time.perf_counter_ns() - start) / calls / 1e3)
                rows.append((label, op_name, spec.name, len(packed),
                             float(np.median(times["dispatcher"])),
                             float(np.median(times["fast"]))))
    return rows


def view_cost(shape=(128, 16, 25, 25), dtype=np.float32, rounds=7, calls=1000):
    """``(Numba us, view us)``: what viewing a caller's array costs each way, medians of
    interleaved rounds. Numba's side is the device array object that
    ``numba.cuda.from_cuda_array_interface`` builds, without the driver's query of the
    pointer and the memory-pointer object it also makes (they need a GPU): a lower bound."""
    from numba.cuda.cudadrv.devicearray import DeviceNDArray

    from gpuconv.cuda.fastlaunch import DeviceView
    from gpuconv.device import c_strides

    template = device_array(shape, dtype)
    cai = {"shape": tuple(shape), "strides": None, "typestr": np.dtype(dtype).str,
           "data": (template.device_ctypes_pointer.value, False), "version": 3,
           "stream": None}
    memory = template.gpu_data

    def numba_view():
        desc_dtype = np.dtype(cai["typestr"])
        return DeviceNDArray(cai["shape"], c_strides(cai["shape"], desc_dtype.itemsize),
                             desc_dtype, gpu_data=memory)

    def fast_view():
        return DeviceView.from_interface(cai, None)

    times = {numba_view: [], fast_view: []}
    for _ in range(rounds):
        for make in (numba_view, fast_view):
            start = time.perf_counter_ns()
            for _ in range(calls):
                make()
            times[make].append((time.perf_counter_ns() - start) / calls / 1e3)
    return float(np.median(times[numba_view])), float(np.median(times[fast_view]))


def torch_property_body():
    """PyTorch's ``Tensor.__cuda_array_interface__`` as a function that also runs on a CPU
    tensor: its source with the test that the tensor is on a GPU taken out (the rest of its
    work is the same for a CUDA tensor of the shape), or None if the source is not found."""
    import inspect
    import textwrap

    import torch._tensor

    try:
        source = textwrap.dedent(inspect.getsource(
            torch.Tensor.__cuda_array_interface__.fget))
    except (OSError, TypeError, AttributeError):
        return None
    test = "if not self.is_cuda:"
    if source.count(test) != 1 or not source.startswith("@property\n"):
        return None
    namespace = {}
    exec(source.removeprefix("@property\n").replace(test, "if False:"),  # noqa: S102
         dict(vars(torch._tensor)), namespace)
    return namespace["__cuda_array_interface__"]


def torch_read_cost(shape=(8, 16, 16, 16), rounds=7, calls=1000):
    """``(property us, gpuconv us)`` or None without PyTorch: reading a CUDA tensor's shape,
    dtype, strides and pointer, timed on a CPU tensor: PyTorch's array-interface property
    (:func:`torch_property_body`; the public layer's generic path read it twice per
    operand) against :func:`gpuconv.conv.torch_cuda_interface` with its dtype look-up
    (once per operand). Both results compared first."""
    try:
        import torch
    except ImportError:
        return None
    from gpuconv.conv import _FLOAT_DTYPES, torch_cuda_interface

    body = torch_property_body()
    if body is None:
        return None
    dtypes = {getattr(torch, d.name): d for d in _FLOAT_DTYPES}
    tensor = torch.zeros(shape)

    def property_read():
        return body(tensor)

    def ours():
        return torch_cuda_interface(tensor, dtypes[tensor.dtype])

    if property_read() != ours():
        raise AssertionError("gpuconv's reading of the tensor differs from PyTorch's")
    times = {property_read: [], ours: []}
    for _ in range(rounds):
        for read in times:
            start = time.perf_counter_ns()
            for _ in range(calls):
                read()
            times[read].append((time.perf_counter_ns() - start) / calls / 1e3)
    return float(np.median(times[property_read])), float(np.median(times[ours]))


def main(argv=None):
    from gpuconv import workloads

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", nargs="*", default=["deepface-l6"],
                        choices=sorted(workloads.LAYERS))
    parser.add_argument("--dtype", default="float32", choices=["float16", "float32", "float64"])
    parser.add_argument("--rounds", type=positive_int, default=7)
    parser.add_argument("--calls", type=positive_int, default=1000)
    args = parser.parse_args(argv)
    geometries = [("tiny 8x16x16x16", conv_geometry((8, 16, 16, 16), (3, 3), 16, padding=1))]
    geometries += [(name, workloads.gpu_geometry(name)) for name in args.layers]
    print(f"load average before: {os.getloadavg()[0]:.2f} (cores: {os.cpu_count()}); "
          f"{args.dtype}, medians of {args.rounds} interleaved rounds of {args.calls} launches")
    rows = measure(geometries, np.dtype(args.dtype), args.rounds, args.calls)
    print(f"{'shape':<16} {'op':<20} {'kernel':<48} {'args':>4} {'dispatcher us':>13} "
          f"{'fast us':>8} {'saved us':>8}")
    for label, op, name, count, slow, fast in rows:
        print(f"{label:<16} {op:<20} {name:<48} {count:>4} {slow:>13.1f} {fast:>8.1f} "
              f"{slow - fast:>8.1f}")
    slow, fast = view_cost(dtype=np.dtype(args.dtype), rounds=args.rounds, calls=args.calls)
    print(f"viewing one operand (128x16x25x25): Numba device array {slow:.1f} us (at least), "
          f"fast path's view {fast:.1f} us")
    read = torch_read_cost(rounds=args.rounds, calls=args.calls)
    if read is not None:
        print(f"reading one CUDA tensor (8x16x16x16, on a CPU tensor): PyTorch's "
              f"__cuda_array_interface__ {read[0]:.1f} us (read twice per operand before), "
              f"gpuconv's reading {read[1]:.1f} us (once)")
    print(f"load average after: {os.getloadavg()[0]:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
