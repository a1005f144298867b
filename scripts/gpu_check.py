"""One-command check of the CUDA path on a real NVIDIA GPU (PyTorch, CuPy, numba-cuda, no network).

    PYTHONPATH=. python scripts/gpu_check.py [--quick] [--skip-bench] [--skip-sanitizer]
                                             [--pass PASS...]

1. correctness: both operations against PyTorch on the GPU, in float64, float32 and float16
   (:data:`DTYPES`), over a grid of geometries (stride, padding, dilation, groups, bias kinds,
   odd sizes); cuDNN with TF32 off; the references are the benchmark's PyTorch peers
   (``torch.nn.functional.conv2d``, and ``unfold`` + ``einsum`` for local_conv2d) in float64
   on the same (rounded) inputs, the tolerances :func:`gpuconv.bench.stats.tolerance`
   (float16: from its epsilon and the length of each result's sum, :func:`terms`). The four
   gradient functions (``gpuconv.grad``) likewise, on a smaller grid (:func:`grad_grid`),
   against PyTorch autograd through the same peers in float64
   (:func:`gpuconv.bench.peers.torch_autograd_backward`). Also the array kinds (torch in ->
   torch out, CuPy, Numba device arrays, NumPy), a side stream, non-contiguous inputs, an
   empty batch and NaN propagation;
2. speed: ``gpuconv bench`` on the GPU (:func:`gpuconv.bench.run_benchmark`, alternating
   bursts timed with CUDA events, ceilings measured once): the forward of both operations on
   every benchmark layer at its GPU batch size beside the PyTorch peers, with the name of the
   kernel each gpuconv record launched and the registers and memory of those kernels; then
   (``--pass``, default all) the backward and the training step on the default suite with
   few timed calls (:data:`GRADIENT_REPEAT` x :data:`GRADIENT_BURSTS`), which keeps the GPU
   work bounded; and the forward in float16 on the default suite, as few timed calls
   (:func:`half_speed`: float16 halves the bytes the unshared layer streams);
3. ``compute-sanitizer --tool memcheck`` on a small case, where the tool exists.

Everything is printed and, when ``OUT`` is set, written to ``$OUT/gpu_check.json`` (its
``bench``, ``bench_gradients`` and ``bench_float16`` entries have the schema of
``gpuconv bench --json``).
Exit status 1 if a correctness check fails or an implementation fails in the benchmark.
The CPU-side logic (arguments, geometry grids, layer lists, kernel names, the references,
the gradient checks and the speed sections on the CPU) imports without a GPU;
``tests/test_gpu_check.py`` covers it.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
import traceback
from typing import NamedTuple

from gpuconv import bench, workloads
from gpuconv.bench import peers
from gpuconv.bench.stats import reduction_terms, tolerance, within_tolerance
from gpuconv.cli import positive_int
from gpuconv.geometry import conv_geometry

# --------------------------------------------------------------------------------------------
# CPU-side logic (importable without a GPU)
# --------------------------------------------------------------------------------------------


class Case(NamedTuple):
    """One correctness geometry (public argument forms)."""

    name: str
    n: int
    c_in: int
    h: int
    w: int
    c_out: int
    kernel: tuple       # (kH, kW)
    stride: tuple
    padding: tuple      # (pad_h, pad_w), both sides, or "same"
    dilation: tuple
    groups: int
    bias: str | None    # None, "channel", "position" (local only)


def geometry_grid(quick=False):
    """Correctness cases: awkward sizes on purpose (not multiples of any tile, odd kernels,
    stride > kernel, batch 1, one channel, outputs of size 1, partial channel blocks, uneven
    padding)."""
    cases = [
        Case("basic", 2, 3, 17, 19, 5, (3, 3), (1, 1), (0, 0), (1, 1), 1, None),
        Case("pad_bias", 3, 4, 33, 35, 10, (3, 3), (1, 1), (1, 1), (1, 1), 1, "channel"),
        Case("stride2", 2, 3, 31, 29, 7, (5, 5), (2, 2), (2, 2), (1, 1), 1, "channel"),
        Case("stride4_k11", 2, 3, 67, 67, 12, (11, 11), (4, 4), (0, 0), (1, 1), 1, "channel"),
        Case("stride_gt_kernel", 3, 2, 20, 21, 3, (2, 2), (3, 3), (0, 0), (1, 1), 1, None),
        Case("rect", 2, 5, 23, 41, 9, (3, 5), (1, 2), (1, 2), (1, 1), 1, "channel"),
        Case("dilation", 2, 4, 30, 27, 6, (3, 3), (1, 1), (2, 3), (2, 3), 1, "channel"),
        Case("groups", 2, 8, 19, 18, 12, (3, 3), (1, 1), (1, 1), (1, 1), 4, "channel"),
        Case("depthwise", 2, 16, 15, 14, 16, (3, 3), (1, 1), (1, 1), (1, 1), 16, None),
        Case("k1", 4, 64, 14, 14, 40, (1, 1), (1, 1), (0, 0), (1, 1), 1, "channel"),
        Case("k7_s2", 2, 3, 45, 45, 17, (7, 7), (2, 2), (3, 3), (1, 1), 1, "channel"),
        Case("many_channels", 2, 70, 9, 9, 33, (3, 3), (1, 1), (1, 1), (1, 1), 1, "channel"),
        Case("batch1_one_channel", 1, 1, 40, 70, 1, (5, 5), (1, 1), (0, 0), (1, 1), 1, None),
        Case("output_1x1", 3, 2, 7, 7, 3, (7, 7), (1, 1), (0, 0), (1, 1), 1, "channel"),
        Case("local_position_bias", 5, 3, 12, 13, 6, (3, 3), (1, 1), (1, 1), (1, 1), 1,
             "position"),
        Case("big_batch", 37, 4, 11, 12, 5, (3, 3), (1, 2), (1, 0), (1, 1), 1, "channel"),
        Case("same_even_kernel", 2, 4, 16, 15, 6, (2, 4), (1, 1), "same", (1, 2), 2,
             "channel"),
    ]
    return cases[:6] if quick else cases


#: The gradient checks' cases (names in :func:`geometry_grid`): every kind of geometry, fewer
#: sizes (each gradient function compiles its own kernels).
GRAD_CASES = ("basic", "pad_bias", "stride2", "stride_gt_kernel", "rect", "dilation", "groups",
              "output_1x1", "big_batch", "same_even_kernel")

#: The four gradient functions of gpuconv.grad, by operation: (input gradient, weight gradient).
GRAD_FUNCTIONS = {"conv2d": ("conv2d_input", "conv2d_weight"),
                  "local_conv2d": ("local_conv2d_input", "local_conv2d_weight")}

#: Timed calls per burst and bursts, for the backward and the training step, and for the
#: float16 forward.
GRADIENT_REPEAT, GRADIENT_BURSTS = 2, 2

#: The dtypes of the correctness checks, as torch dtype names.
DTYPES = ("float64", "float32", "float16")


def terms(name, geom):
    """The most products one value of the result of ``name`` sums on ``geom``: ``"conv2d"``
    or ``"local_conv2d"`` (the forward, bias included), or a gradient function of
    :data:`GRAD_FUNCTIONS` (the input gradient ``(C_out/g) kH kW``; the weight gradient
    ``N H_out W_out`` for conv2d, ``N`` for local_conv2d). float16's tolerance grows with it."""
    if name in GRAD_FUNCTIONS:
        return reduction_terms(name, geom, "forward")
    window = geom.kernel_height * geom.kernel_width
    if name.endswith("_input"):
        return geom.out_channels_per_group * window
    positions = geom.out_height * geom.out_width
    return geom.batch * (positions if name == "conv2d_weight" else 1)


def grad_grid(quick=False):
    """The cases the gradient functions are checked on: :data:`GRAD_CASES` (quick: the first
    four)."""
    by_name = {case.name: case for case in geometry_grid()}
    names = GRAD_CASES[:4] if quick else GRAD_CASES
    return [by_name[name] for name in names]


def case_geometry(case):
    """The :class:`~gpuconv.geometry.ConvGeometry` of a :class:`Case`."""
    return conv_geometry((case.n, case.c_in, case.h, case.w), case.kernel, case.c_out,
                         case.stride, case.padding, case.dilation, case.groups)


def bench_layer_list(quick):
    """Names of the layers timed: all of them, or (quick) every third plus the locally
    connected ones."""
    names = list(workloads.LAYERS)
    if not quick:
        return names
    local = [name for name, layer in workloads.LAYERS.items()
             if layer.network_op == "local_conv2d"]
    return list(dict.fromkeys(names[::3] + local))


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description="Check gpuconv's CUDA path on this GPU.")
    parser.add_argument("--pass", dest="passes", nargs="+", choices=tuple(bench.PASS_CHOICES),
                        default=["all"], metavar="PASS",
                        help="what the speed section times, as gpuconv bench --pass "
                             "(default: all = forward, backward and the training step)")
    parser.add_argument("--quick", action="store_true",
                        help="fewer geometries, layers and timed calls (a smoke test)")
    parser.add_argument("--skip-bench", action="store_true", help="no timings")
    parser.add_argument("--skip-sanitizer", action="store_true", help="no compute-sanitizer")
    parser.add_argument("--repeat", "--repeats", dest="repeat", type=positive_int,
                        help=f"timed calls per burst (default {bench.DEFAULT_REPEAT}, "
                             f"--quick {bench.QUICK_REPEAT}), as gpuconv bench --repeat")
    parser.add_argument("--json", default=None,
                        help="where to write the JSON (default: $OUT/gpu_check.json if OUT is set)")
    args = parser.parse_args(argv)
    if args.repeat is None:
        args.repeat = bench.QUICK_REPEAT if args.quick else bench.DEFAULT_REPEAT
    args.bursts = bench.QUICK_BURSTS if args.quick else bench.DEFAULT_BURSTS
    if args.json is None and os.environ.get("OUT"):
        args.json = os.path.join(os.environ["OUT"], "gpu_check.json")
    args.passes = bench.resolve_passes(args.passes)
    return args


def _kernel_name(op, geom, dtype="float32"):
    """Name of the gpuconv kernel (specialisation) ``op`` launches on ``geom``."""
    import numpy as np

    from gpuconv.cuda import kernels as _cuda_kernels

    config = (_cuda_kernels.local_conv2d_config if op == "local_conv2d"
              else _cuda_kernels.conv2d_config)(geom, np.dtype(dtype).type)
    return config.kernel.name


def gradient_layers(quick=False):
    """The layers the backward and the training step are timed on: the default suite of
    ``gpuconv bench`` (quick: its quick layers)."""
    return list(bench.QUICK_LAYERS if quick else bench.SUITES["default"])


def speed(layers, repeat, bursts, quick=False, device="cuda", torch="auto", progress=None,
          ceilings=None, dtype="float32"):
    """``gpuconv bench`` (the forward) on ``layers`` (names or
    :class:`~gpuconv.workloads.Layer`) at their batch sizes for ``device``, in ``dtype``;
    each gpuconv record also names the CUDA kernel that geometry launches (``kernel``). An
    implementation that fails is recorded as skipped (``failed: ...``), not raised."""
    result = bench.run_benchmark(layers, device=device, dtype=dtype, repeat=repeat,
                                 bursts=bursts, quick=quick, torch=torch, progress=progress,
                                 ceilings=ceilings, on_error="record")
    by_name = {layer.name: layer for layer in
               (workloads.LAYERS[x] if isinstance(x, str) else x for x in layers)}
    for r in result["records"]:
        if r["impl"] == "gpuconv":
            geom = by_name[r["layer"]].geometry(r["N"])
            r["kernel"] = _kernel_name(r["op"], geom, r["dtype"])
    return result


def half_speed(layers, quick=False, device="cuda", torch="auto", progress=None):
    """The forward in float16 on ``layers`` (:func:`gradient_layers`: the default suite),
    :data:`GRADIENT_REPEAT` x :data:`GRADIENT_BURSTS` timed calls, float16's own ceilings
    (half-precision matmul and copy): :func:`speed` with ``dtype="float16"``."""
    return speed(layers, GRADIENT_REPEAT, GRADIENT_BURSTS, quick, device, torch, progress,
                 dtype="float16")


def gradient_speed(layers, passes, ceilings, quick=False, device="cuda", torch="auto",
                   progress=None):
    """``gpuconv bench --pass`` for the passes of ``passes`` other than the forward, on
    ``layers``, :data:`GRADIENT_REPEAT` x :data:`GRADIENT_BURSTS` timed calls, with the
    ceilings already measured; ``None`` when there is no such pass."""
    passes = tuple(p for p in passes if p != "forward")
    if not passes:
        return None
    return bench.run_benchmark(layers, device=device, repeat=GRADIENT_REPEAT,
                               bursts=GRADIENT_BURSTS, quick=quick, torch=torch,
                               progress=progress, ceilings=ceilings, passes=passes,
                               on_error="record")


def failed_records(result):
    """The records of implementations that raised (``skipped: "failed: ..."``)."""
    return [r for r in (result or {}).get("records", ())
            if (r.get("skipped") or "").startswith("failed")]


# --------------------------------------------------------------------------------------------
# GPU parts
# --------------------------------------------------------------------------------------------

def _case_tensors(torch, case, op, dtype, device, generator):
    geom = case_geometry(case)
    x = torch.rand((case.n, case.c_in, case.h, case.w), generator=generator, dtype=torch.float64,
                   device=device) * 2 - 1
    wshape = geom.local_weight_shape() if op == "local_conv2d" else geom.shared_weight_shape()
    w = torch.rand(wshape, generator=generator, dtype=torch.float64, device=device) * 2 - 1
    b = None
    if case.bias == "channel" or (case.bias == "position" and op == "conv2d"):
        b = torch.rand((case.c_out,), generator=generator, dtype=torch.float64, device=device) * 2 - 1
    elif case.bias == "position":
        b = torch.rand((case.c_out, geom.out_height, geom.out_width), generator=generator,
                       dtype=torch.float64, device=device) * 2 - 1
    cast = (lambda t: None if t is None else t.to(dtype))
    return geom, cast(x), cast(w), cast(b)


def _reference(torch, op, geom, x, w, b):
    """``(reference, magnitude bound)`` in float64: the benchmark's PyTorch peer of ``op`` on
    the inputs, and on their absolute values."""
    peer = peers.torch_unfold_einsum if op == "local_conv2d" else peers.torch_conv2d
    d = (lambda t: None if t is None else t.double())
    a = (lambda t: None if t is None else t.double().abs())
    return peer(torch, geom, d(w), d(b))(d(x)), peer(torch, geom, a(w), a(b))(a(x))


def check_case(torch, gpuconv, case, op, dtype, device="cuda"):
    """Run one case through gpuconv (torch tensors on ``device``) and compare with the
    float64 PyTorch peer. The result must be a torch tensor on the same device."""
    seed = sum(map(ord, case.name + op))  # stable across runs (str hashes are not)
    generator = torch.Generator(device=device).manual_seed(seed)
    geom, x, w, b = _case_tensors(torch, case, op, dtype, device, generator)
    kwargs = dict(stride=case.stride, padding=case.padding, dilation=case.dilation,
                  groups=case.groups)
    fn = getattr(gpuconv, op)
    y = fn(x, w, b, **kwargs)
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()
    ref, bound = _reference(torch, op, geom, x, w, b)
    ok_type = (isinstance(y, torch.Tensor) and y.device.type == torch.device(device).type
               and y.dtype == dtype)
    err = float((y.double() - ref).abs().max()) if ref.numel() else 0.0
    scale = float(bound.abs().max()) if bound.numel() else 0.0
    dtype_name = str(dtype).replace("torch.", "")
    finite = bool(torch.isfinite(y).all())
    count = terms(op, geom)
    return {"case": case.name, "op": op, "dtype": dtype_name, "max_abs_error": err,
            "scale": scale, "tolerance": tolerance(dtype_name, count), "terms": count,
            "result_kind_ok": ok_type, "finite": finite,
            "ok": ok_type and finite and within_tolerance(err, scale, dtype_name, count)}


def _grad_reference(torch, op, geom, x, w, gy):
    """``((gx, gw), (gx bound, gw bound))`` in float64: PyTorch autograd's backward of the
    benchmark's peer of ``op`` (no bias) for ``gy``, and the same on the absolute values
    (each gradient is a sum of products of ``w`` and ``gy``, or ``x`` and ``gy``)."""
    peer = peers.torch_unfold_einsum if op == "local_conv2d" else peers.torch_conv2d
    d = (lambda t: t.double())
    a = (lambda t: t.double().abs())
    ref = peers.torch_autograd_backward(torch, peer, geom, d(x), d(w), d(gy))()
    bound = peers.torch_autograd_backward(torch, peer, geom, a(x), a(w), a(gy))()
    return ref, bound


def check_grad_case(torch, gpuconv_grad, case, op, dtype, device="cuda"):
    """Both gradients of ``op`` on one case through ``gpuconv.grad`` (torch tensors on
    ``device``) against PyTorch autograd in float64: one result per gradient function."""
    seed = sum(map(ord, case.name + op + "grad"))
    generator = torch.Generator(device=device).manual_seed(seed)
    geom, x, w, _ = _case_tensors(torch, case, op, dtype, device, generator)
    gy = (torch.rand(geom.output_shape, generator=generator, dtype=torch.float64,
                     device=device) * 2 - 1).to(dtype)
    kwargs = dict(stride=case.stride, padding=case.padding, dilation=case.dilation,
                  groups=case.groups)
    input_name, weight_name = GRAD_FUNCTIONS[op]
    results = []
    (gx_ref, gw_ref), (gx_bound, gw_bound) = _grad_reference(torch, op, geom, x, w, gy)
    for name, call, ref, bound in (
            (input_name, lambda: getattr(gpuconv_grad, input_name)(tuple(x.shape), w, gy,
                                                                   **kwargs), gx_ref, gx_bound),
            (weight_name, lambda: getattr(gpuconv_grad, weight_name)(x, tuple(w.shape), gy,
                                                                     **kwargs), gw_ref, gw_bound)):
        dtype_name = str(dtype).replace("torch.", "")
        try:
            result = call()
            if torch.device(device).type == "cuda":
                torch.cuda.synchronize()
        except Exception as exc:
            results.append({"case": case.name, "op": name, "dtype": dtype_name, "ok": False,
                            "error": f"{type(exc).__name__}: {exc}",
                            "traceback": traceback.format_exc()[-2000:]})
            continue
        ok_type = (isinstance(result, torch.Tensor)
                   and result.device.type == torch.device(device).type
                   and result.dtype == dtype and result.shape == ref.shape)
        err = float((result.double() - ref).abs().max()) if ok_type and ref.numel() else 0.0
        scale = float(bound.abs().max()) if bound.numel() else 0.0
        finite = bool(torch.isfinite(result).all()) if ok_type else False
        count = terms(name, geom)
        results.append({"case": case.name, "op": name, "dtype": dtype_name,
                        "max_abs_error": err, "scale": scale,
                        "tolerance": tolerance(dtype_name, count), "terms": count,
                        "result_kind_ok": ok_type, "finite": finite,
                        "ok": ok_type and finite and within_tolerance(err, scale, dtype_name,
                                                                      count)})
    return results


def check_array_kinds(torch, gpuconv):
    """torch in -> torch out, CuPy in -> CuPy out, Numba in -> Numba out, NumPy in -> NumPy
    out; a side stream; non-contiguous inputs; empty batch; NaN propagation."""
    import numpy as np
    from numba import cuda

    results = []

    def record(name, fn):
        try:
            ok, detail = fn()
        except Exception as exc:
            ok, detail = False, f"{type(exc).__name__}: {exc}"
        results.append({"check": name, "ok": bool(ok), "detail": detail})

    rng = np.random.default_rng(0)
    x_np = rng.standard_normal((3, 4, 13, 11))
    w_np = rng.standard_normal((6, 2, 3, 3))
    wl_np = rng.standard_normal((6, 11, 9, 2, 3, 3))
    b_np = rng.standard_normal(6)
    geom = conv_geometry(x_np.shape, (3, 3), 6, groups=2)
    t = torch.from_numpy
    refs = {op: [r.numpy() for r in _reference(torch, op, geom, t(x_np), t(w), t(b_np))]
            for op, w in (("conv2d", w_np), ("local_conv2d", wl_np))}

    def close(y, op="conv2d"):
        """``y`` (float64) within tolerance of the PyTorch peer of ``op``."""
        ref, bound = refs[op]
        return within_tolerance(float(np.abs(np.asarray(y) - ref).max()), float(bound.max()),
                                "float64")

    def numpy_in():
        y = gpuconv.conv2d(x_np, w_np, b_np, groups=2, device="cuda")
        return isinstance(y, np.ndarray) and close(y), type(y).__name__

    def torch_in():
        t = lambda a: torch.from_numpy(a).cuda()  # noqa: E731
        y = gpuconv.conv2d(t(x_np), t(w_np), t(b_np), groups=2)
        yl = gpuconv.local_conv2d(t(x_np), t(wl_np), t(b_np), groups=2)
        return (isinstance(y, torch.Tensor) and y.is_cuda and close(y.cpu().numpy())
                and close(yl.cpu().numpy(), "local_conv2d")), type(y).__name__

    def numba_in():
        y = gpuconv.conv2d(cuda.to_device(x_np), cuda.to_device(w_np), cuda.to_device(b_np),
                           groups=2)
        return hasattr(y, "copy_to_host") and close(y.copy_to_host()), type(y).__name__

    def cupy_in():
        try:
            import cupy
        except ImportError:
            return True, "CuPy not installed (skipped)"
        y = gpuconv.conv2d(cupy.asarray(x_np), cupy.asarray(w_np), cupy.asarray(b_np), groups=2)
        yl = gpuconv.local_conv2d(cupy.asarray(x_np), cupy.asarray(wl_np), cupy.asarray(b_np),
                                  groups=2)
        return (isinstance(y, cupy.ndarray) and close(cupy.asnumpy(y))
                and close(cupy.asnumpy(yl), "local_conv2d")), type(y).__name__

    def side_stream():
        stream = torch.cuda.Stream()
        with torch.cuda.stream(stream):
            xs = torch.from_numpy(x_np).cuda()
            ws = torch.from_numpy(w_np).cuda()
            bs = torch.from_numpy(b_np).cuda()
            y = gpuconv.conv2d(xs, ws, bs, groups=2)
            y2 = y * 1.0  # queued on the same stream after our kernel
        stream.synchronize()
        return close(y2.cpu().numpy()), "torch side stream"

    def non_contiguous():
        xt = torch.from_numpy(np.ascontiguousarray(x_np.transpose(0, 1, 3, 2))).cuda().transpose(2, 3)
        wt = torch.from_numpy(np.ascontiguousarray(w_np[:, :, ::-1])).cuda().flip(2)
        big = torch.zeros((6, 2, 3, 6), dtype=torch.float64, device="cuda")
        big[..., ::2] = torch.from_numpy(w_np).cuda()
        y1 = gpuconv.conv2d(xt, big[..., ::2], torch.from_numpy(b_np).cuda(), groups=2)
        y2 = gpuconv.conv2d(xt, wt.contiguous(), torch.from_numpy(b_np).cuda(), groups=2)
        return (not xt.is_contiguous() and close(y1.cpu().numpy())
                and close(y2.cpu().numpy())), "transposed and strided views"

    def empty_batch():
        x0 = torch.zeros((0, 4, 13, 11), dtype=torch.float32, device="cuda")
        y = gpuconv.conv2d(x0, torch.ones((6, 2, 3, 3), device="cuda"), groups=2)
        return tuple(y.shape) == (0, 6, 11, 9) and isinstance(y, torch.Tensor), str(tuple(y.shape))

    def nan_propagation():
        x = torch.ones((2, 1, 9, 9), dtype=torch.float32, device="cuda")
        x[0, 0, 4, 4] = float("nan")
        x[1, 0, 0, 8] = float("inf")
        w = torch.ones((1, 1, 3, 3), device="cuda")
        y = gpuconv.conv2d(x, w, stride=2, padding=1)
        # Expected from the windows themselves (a cuDNN algorithm may smear NaN further).
        cols = torch.nn.functional.unfold(x.double(), (3, 3), padding=1, stride=2)
        nan = cols.isnan().any(1).reshape(y.shape)
        inf = cols.isinf().any(1).reshape(y.shape) & ~nan
        same = bool((torch.isnan(y) == nan).all() and (torch.isinf(y) == inf).all())
        return same and bool(nan.any()), f"{int(torch.isnan(y).sum())} NaN outputs"

    for name, fn in (("numpy in -> numpy out", numpy_in), ("torch in -> torch out", torch_in),
                     ("numba in -> numba out", numba_in), ("cupy in -> cupy out", cupy_in),
                     ("torch side stream", side_stream), ("non-contiguous inputs", non_contiguous),
                     ("empty batch", empty_batch), ("NaN propagation", nan_propagation)):
        record(name, fn)
    return results


def kernel_resources(kernels, layers):
    """Registers, local and shared memory of the kernels ``layers`` (names) launch at their
    GPU batch sizes in float32, as compiled here."""
    import numpy as np

    info = {}
    for name in layers:
        geom = workloads.gpu_geometry(name)
        for config in (kernels.conv2d_config(geom, np.float32),
                       kernels.local_conv2d_config(geom, np.float32)):
            spec = config.kernel
            try:
                dispatcher = kernels.compiled(spec)
                info[spec.name] = {
                    "registers": dispatcher.get_regs_per_thread(),
                    "local_bytes_per_thread": dispatcher.get_local_mem_per_thread(),
                    "static_shared_bytes": dispatcher.get_shared_mem_per_block(),
                }
            except Exception as exc:
                info[spec.name] = {"error": f"{type(exc).__name__}: {exc}"}
    return info


SANITIZER_SNIPPET = """
import numpy as np, gpuconv
from numba import cuda
rng = np.random.default_rng(0)
for dt in (np.float32, np.float64):
    x = rng.standard_normal((3, 4, 13, 17)).astype(dt)
    w = rng.standard_normal((10, 2, 3, 5)).astype(dt)
    b = rng.standard_normal(10).astype(dt)
    gpuconv.conv2d(x, w, b, stride=(2, 1), padding=(1, 2), groups=2, device="cuda")
    wl = rng.standard_normal((10, 7, 17, 2, 3, 5)).astype(dt)
    gpuconv.local_conv2d(x, wl, b, stride=(2, 1), padding=(1, 2), groups=2, device="cuda")
    gpuconv.conv2d(cuda.to_device(x)[:, :, ::2], cuda.to_device(w), None, groups=2)
cuda.synchronize()
print("sanitizer case done")
"""


def find_compute_sanitizer():
    found = shutil.which("compute-sanitizer")
    if found:
        return found
    for home in (os.environ.get("CUDA_HOME"), "/usr/local/cuda"):
        if home:
            path = os.path.join(home, "bin", "compute-sanitizer")
            if os.path.exists(path):
                return path
    return None


def run_sanitizer(timeout=180):
    tool = find_compute_sanitizer()
    if tool is None:
        return {"status": "skipped: compute-sanitizer not found"}
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        p for p in (os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                    os.environ.get("PYTHONPATH")) if p))
    try:
        result = subprocess.run([tool, "--tool", "memcheck", "--error-exitcode", "3",
                                 sys.executable, "-c", SANITIZER_SNIPPET],
                                capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return {"status": "timeout", "timeout_s": timeout}
    text = result.stdout + result.stderr
    ok = result.returncode == 0 and "ERROR SUMMARY: 0 errors" in text
    return {"status": "ok" if ok else "errors", "returncode": result.returncode,
            "output_tail": text[-3000:]}


def main(argv=None):
    args = parse_args(argv)
    report = {"started": time.strftime("%Y-%m-%d %H:%M:%S"), "args": vars(args)}
    failures = 0
    try:
        import torch

        import gpuconv
        from gpuconv import grad as gpuconv_grad
        from gpuconv.cuda import kernels as _cuda_kernels
        from numba import cuda
    except Exception as exc:
        print(f"cannot start: {exc}")
        return 2
    if not torch.cuda.is_available():
        print("no CUDA GPU visible to PyTorch")
        return 2
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
    report["device"] = {"name": torch.cuda.get_device_name(),
                        "capability": list(torch.cuda.get_device_capability()),
                        "torch": torch.__version__, "numba_cuda_device": str(cuda.get_current_device().name)}
    print(f"device: {report['device']}")

    # 1. correctness
    start = time.perf_counter()
    checks = []
    for dtype in (getattr(torch, name) for name in DTYPES):
        for case in geometry_grid(args.quick):
            for op in ("conv2d", "local_conv2d"):
                try:
                    result = check_case(torch, gpuconv, case, op, dtype)
                except Exception as exc:
                    result = {"case": case.name, "op": op, "dtype": str(dtype), "ok": False,
                              "error": f"{type(exc).__name__}: {exc}",
                              "traceback": traceback.format_exc()[-2000:]}
                checks.append(result)
                if not result["ok"]:
                    failures += 1
                    print(f"FAIL {result}")
    report["correctness"] = checks
    print(f"correctness: {sum(c['ok'] for c in checks)}/{len(checks)} cases within tolerance "
          f"({time.perf_counter() - start:.1f} s)")
    start = time.perf_counter()
    grad_checks = []
    for dtype in (getattr(torch, name) for name in DTYPES):
        for case in grad_grid(args.quick):
            for op in ("conv2d", "local_conv2d"):
                try:
                    results = check_grad_case(torch, gpuconv_grad, case, op, dtype)
                except Exception as exc:
                    results = [{"case": case.name, "op": op, "dtype": str(dtype), "ok": False,
                                "error": f"{type(exc).__name__}: {exc}",
                                "traceback": traceback.format_exc()[-2000:]}]
                for result in results:
                    grad_checks.append(result)
                    if not result["ok"]:
                        failures += 1
                        print(f"FAIL {result}")
    report["gradients"] = grad_checks
    print(f"gradients: {sum(c['ok'] for c in grad_checks)}/{len(grad_checks)} within tolerance "
          f"(4 functions x {len(grad_grid(args.quick))} cases x {len(DTYPES)} dtypes; "
          f"{time.perf_counter() - start:.1f} s)")
    kinds = check_array_kinds(torch, gpuconv)
    report["array_kinds"] = kinds
    for k in kinds:
        print(f"{'ok  ' if k['ok'] else 'FAIL'} {k['check']}: {k['detail']}")
        failures += 0 if k["ok"] else 1

    # 2. speed: gpuconv bench on the GPU
    if not args.skip_bench:
        layers = bench_layer_list(args.quick)
        start = time.perf_counter()
        result = None
        try:
            if "forward" in args.passes:
                result = speed(layers, args.repeat, args.bursts, args.quick, torch=torch)
                report["bench"] = result
                print(bench.format_report(result))
            ceilings = result["machine"]["ceilings"] if result else None
            gradients = gradient_speed(gradient_layers(args.quick), args.passes, ceilings,
                                       args.quick, torch=torch)
            if gradients is not None:
                report["bench_gradients"] = gradients
                print(bench.format_report(gradients))
            if "forward" in args.passes:
                half = half_speed(gradient_layers(args.quick), args.quick, torch=torch)
                report["bench_float16"] = half
                print(bench.format_report(half))
        except Exception as exc:
            failures += 1
            report["bench_error"] = traceback.format_exc()[-4000:]
            print(f"FAIL benchmark: {type(exc).__name__}: {exc}\n{report['bench_error']}")
        for part in ("bench", "bench_gradients", "bench_float16"):
            for r in failed_records(report.get(part)):
                failures += 1
                print(f"FAIL benchmark {r.get('pass', 'forward')} {r['layer']} {r['op']} "
                      f"{r['impl']}: {r['skipped']}")
        print(f"benchmark: {time.perf_counter() - start:.1f} s")
        report["kernels"] = kernel_resources(_cuda_kernels, layers)

    # 3. sanitizer
    if not args.skip_sanitizer:
        report["sanitizer"] = run_sanitizer()
        print(f"compute-sanitizer memcheck: {report['sanitizer']['status']}")
        if report["sanitizer"]["status"] == "errors":
            failures += 1
            print(report["sanitizer"]["output_tail"])

    report["failures"] = failures
    report["finished"] = time.strftime("%Y-%m-%d %H:%M:%S")
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1, default=str)
        print(f"wrote {args.json}")
    print("PASS" if failures == 0 else f"FAIL ({failures} failures)")
    return 0 if failures == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
