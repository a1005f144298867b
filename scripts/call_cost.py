"""Host work of a whole public call on PyTorch CUDA tensors, without a GPU.

    python scripts/call_cost.py                        # medians of 7 rounds of 2000 calls
    PYTHONPATH=<checkout> python scripts/call_cost.py  # the same, of another checkout

``gpuconv.conv2d`` and ``gpuconv.local_conv2d`` on x 8x16x16x16 with 16 maps 3x3 (with and
without a bias), and their four gradients (``gpuconv.grad``) at the same shapes, run their
whole CUDA path as on a GPU, from the operands to the kernels'
argument lists, with what needs a GPU stood in for:

- the tensors are stand-ins over CPU tensors that say they are on a GPU (``is_cuda``),
  with PyTorch's own ``__cuda_array_interface__`` property run on the CPU tensor (its body
  without its test that the tensor is on a GPU, see ``launch_cost.torch_property_body``);
- the device is taken to be the GPU (``select_device``), the current GPU and free memory
  are fixed answers, the stream look-up returns the default stream;
- the output and scratch are CPU tensors (``torch.empty`` on the stand-in's device);
- each kernel launch packs its argument list as the fast launch path does
  (``FastKernel._pack``) and stops before the driver.

Not included, because they need a GPU: the driver's launch, PyTorch's CUDA allocator and
current-stream query, and a free-memory query (asked once here; on a GPU only when a call
needs a noticeable share of the last reading). What is included is the Python work of a
call, on this CPU; a GPU machine's host runs it at its own speed. The calls are
interleaved by round, after a warm-up, and the load average is printed before and after:
measure on an idle machine. Run against another checkout with ``PYTHONPATH`` (its public
functions and launch path are patched the same way).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from launch_cost import torch_property_body  # noqa: E402

from gpuconv.appkit import positive_int  # noqa: E402


def stand_in_class(torch):
    """The stand-in for a PyTorch CUDA tensor (over a CPU tensor's memory)."""
    body = torch_property_body()
    if body is None:
        raise RuntimeError("PyTorch's __cuda_array_interface__ source was not found")

    class CudaTensor:
        is_cuda, is_cpu, requires_grad = True, False, False

        def __init__(self, tensor):
            self.tensor = tensor
            self.dtype, self.layout, self.shape = tensor.dtype, tensor.layout, tensor.shape
            self.device = tensor.device

        @property
        def __cuda_array_interface__(self):
            return body(self.tensor)

        def is_neg(self):
            return self.tensor.is_neg()

        def resolve_neg(self):
            return type(self)(self.tensor.resolve_neg())

        def is_contiguous(self):
            return self.tensor.is_contiguous()

        def stride(self):
            return self.tensor.stride()

        def data_ptr(self):
            return self.tensor.data_ptr()

        def numel(self):
            return self.tensor.numel()

        def dim(self):
            return self.tensor.dim()

    CudaTensor.__module__ = "torch.stand_in"  # gpuconv tells libraries apart by module
    return CudaTensor


class _Packer:
    """A compiled kernel that packs each launch's arguments as the fast path does."""

    def __init__(self, spec):
        from gpuconv.cuda.fastlaunch import FastKernel

        self.fast = FastKernel(None, spec.signature, spec.name)

    def __getitem__(self, launch):
        return lambda *args: self.fast._pack(args)


@contextlib.contextmanager
def stand_ins(torch):
    """The public layer and the CUDA path patched as the module docstring says, inside the
    block (restored after it); yields the stand-in tensor class."""
    from gpuconv import conv
    from gpuconv.cuda import fastlaunch, kernels, launch, spec, tiled

    tensor_class = stand_in_class(torch)
    packer = functools.lru_cache(maxsize=None)(_Packer)  # keyed by the spec, as compiled()
    patches = [(conv, "select_device", lambda *arrays, device="auto": "cuda"),
               (launch, "_current_device_id", lambda: 0),
               (launch, "_device_id", lambda obj: 0),
               (launch, "_free_bytes", lambda template=None: 80 << 30),
               (launch, "_stream_of", lambda *args, **kwargs: 0),
               (launch, "_FLAT_VIEWS_NEEDED", [False]),
               (fastlaunch, "_STATE", [True])]
    patches += [(module, "compiled", packer) for module in (kernels, spec, tiled)]
    saved = [(owner, name, getattr(owner, name)) for owner, name, _ in patches]
    saved.append((conv._Torch, "tensor", conv._Torch.tensor))
    try:
        conv._Torch.tensor = None
        conv._Torch.seen()
        conv._Torch.tensor = tensor_class
        for owner, name, value in patches:
            setattr(owner, name, value)
        conv.clear_call_cache()
        yield tensor_class
    finally:
        for owner, name, value in saved:
            setattr(owner, name, value)
        conv.clear_call_cache()


def cases(torch, tensor_class):
    """``{label: (function, args)}`` on x 8x16x16x16, 16 maps 3x3, padding 1: the forwards
    and the gradients (a training step's calls)."""
    import gpuconv

    def t(*shape):
        return tensor_class(torch.zeros(shape))

    x, w, wl, b = t(8, 16, 16, 16), t(16, 16, 3, 3), t(16, 16, 16, 16, 3, 3), t(16)
    gy = t(8, 16, 16, 16)  # the gradient of an output (padding 1 keeps 16 x 16)
    grad = gpuconv.grad
    return {"conv2d, bias": (gpuconv.conv2d, (x, w, b)),
            "conv2d, no bias": (gpuconv.conv2d, (x, w)),
            "local_conv2d, bias": (gpuconv.local_conv2d, (x, wl, b)),
            "local_conv2d, no bias": (gpuconv.local_conv2d, (x, wl)),
            "conv2d_input": (grad.conv2d_input, (tuple(x.shape), w, gy)),
            "conv2d_weight": (grad.conv2d_weight, (x, tuple(w.shape), gy)),
            "local_conv2d_input": (grad.local_conv2d_input, (tuple(x.shape), wl, gy)),
            "local_conv2d_weight": (grad.local_conv2d_weight, (x, tuple(wl.shape), gy))}


def measure(rounds=7, calls=2000, warmup=200):
    """``{label: (median, fastest round) us per call}``, the cases interleaved by round."""
    import torch

    with stand_ins(torch) as tensor_class:
        by_label = cases(torch, tensor_class)
        for function, args in by_label.values():
            for _ in range(warmup):
                function(*args, padding=1)
        times = {label: [] for label in by_label}
        for _ in range(rounds):
            for label, (function, args) in by_label.items():
                start = time.perf_counter_ns()
                for _ in range(calls):
                    function(*args, padding=1)
                times[label].append((time.perf_counter_ns() - start) / calls / 1e3)
    return {label: (float(np.median(t)), float(np.min(t))) for label, t in times.items()}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=positive_int, default=7)
    parser.add_argument("--calls", type=positive_int, default=2000)
    args = parser.parse_args(argv)
    import gpuconv

    print(f"gpuconv from {os.path.dirname(gpuconv.__file__)}")
    print(f"load average before: {os.getloadavg()[0]:.2f} (cores: {os.cpu_count()}); "
          f"medians of {args.rounds} interleaved rounds of {args.calls} calls")
    print(f"{'call':<24} {'median us':>10} {'fastest round us':>17}  (host work before the driver)")
    for label, (median, fastest) in measure(args.rounds, args.calls).items():
        print(f"{label:<24} {median:10.1f} {fastest:17.1f}")
    print(f"load average after: {os.getloadavg()[0]:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
