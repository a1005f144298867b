"""One-command check of the CUDA path on a real NVIDIA GPU (PyTorch, CuPy, numba-cuda, no network).

    PYTHONPATH=. python scripts/gpu_check.py [--quick] [--skip-bench] [--skip-sanitizer]

1. correctness: both operations against PyTorch on the GPU, in float64 and float32, over a
   grid of geometries (stride, padding, dilation, groups, bias kinds, odd sizes); cuDNN with
   TF32 off; the local_conv2d reference is ``unfold`` + ``einsum`` in float64. Also the array
   kinds (torch in -> torch out, CuPy, Numba device arrays, NumPy), a side stream,
   non-contiguous inputs, an empty batch and NaN propagation;
2. speed: both operations on the benchmark layers (gpuconv.workloads) at their GPU batch sizes, against
   ``torch.nn.functional.conv2d`` and the ``unfold`` + ``einsum`` recipe, timed with CUDA
   events (median and quartiles after warm-up), as TFLOP/s and GB/s next to a measured
   device-to-device copy bandwidth; peers that run out of memory are recorded so;
3. ``compute-sanitizer --tool memcheck`` on a small case, where the tool exists.

Everything is printed and, when ``OUT`` is set, written to ``$OUT/gpu_check.json``. Exit
status 1 if a correctness check fails. The CPU-side logic (arguments, geometry grid, layer
list, FLOP and byte counts) imports without a GPU; ``tests/test_gpu_check.py`` covers it.
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

from gpuconv import workloads

# --------------------------------------------------------------------------------------------
# CPU-side logic (importable without a GPU)
# --------------------------------------------------------------------------------------------

#: Tolerances relative to the magnitude bound ``max(ref(|x|, |w|, |b|))``.
TOLERANCE = {"float32": 1e-5, "float64": 1e-12}


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
    padding: tuple      # (pad_h, pad_w), both sides
    dilation: tuple
    groups: int
    bias: str | None    # None, "channel", "position" (local only)


def geometry_grid(quick=False):
    """Correctness cases: awkward sizes on purpose (not multiples of any tile, odd kernels,
    stride > kernel, batch 1, one channel, outputs of size 1, partial channel blocks)."""
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
    ]
    return cases[:6] if quick else cases


def layer_row(layer):
    """A :class:`gpuconv.workloads.Layer` at its GPU batch size as this script's row:
    ``(name, op, N_gpu, C_in, H, W, C_out, k, stride, pad)``, ``op`` the operation the network
    uses there (both are timed)."""
    return (layer.short_title, layer.network_op, layer.batch_gpu, layer.in_channels, layer.size,
            layer.size, layer.out_channels, layer.kernel, layer.stride, layer.padding)


#: The benchmark layers (:data:`gpuconv.workloads.LAYERS`) as rows.
LAYERS = tuple(layer_row(layer) for layer in workloads.LAYERS.values())


def out_size(size, kernel, stride, pad_total, dilation=1):
    """``(size + pad_total - dilation * (kernel - 1) - 1) // stride + 1``."""
    return (size + pad_total - dilation * (kernel - 1) - 1) // stride + 1


def case_out_hw(case):
    return (out_size(case.h, case.kernel[0], case.stride[0], 2 * case.padding[0], case.dilation[0]),
            out_size(case.w, case.kernel[1], case.stride[1], 2 * case.padding[1], case.dilation[1]))


def layer_dims(layer):
    """dict of the layer's dimensions, output size included."""
    name, op, n, c_in, h, w, c_out, k, s, p = layer
    return dict(name=name, op=op, n=n, c_in=c_in, h=h, w=w, c_out=c_out, k=k, stride=s, pad=p,
                h_out=out_size(h, k, s, 2 * p), w_out=out_size(w, k, s, 2 * p), groups=1)


def conv_flops(n, c_in, c_out, h_out, w_out, kh, kw, groups=1):
    """``2 * N * C_out * H_out * W_out * (C_in / groups) * kH * kW`` (both operations)."""
    return 2 * n * c_out * h_out * w_out * (c_in // groups) * kh * kw


def weight_count(op, c_in, c_out, h_out, w_out, kh, kw, groups=1):
    """Shared ``C_out * C_in/g * kH * kW``; unshared that times ``H_out * W_out``."""
    shared = c_out * (c_in // groups) * kh * kw
    return shared * h_out * w_out if op == "local_conv2d" else shared


def min_bytes(op, n, c_in, h, w, c_out, h_out, w_out, kh, kw, itemsize=4, groups=1, bias=0):
    """Fewest bytes moved: input read once, weights read once, output written once."""
    elements = (n * c_in * h * w + weight_count(op, c_in, c_out, h_out, w_out, kh, kw, groups)
                + n * c_out * h_out * w_out + bias)
    return elements * itemsize


def layer_counts(layer, itemsize=4):
    """(flops, minimum bytes) of one layer's operation."""
    d = layer_dims(layer)
    flops = conv_flops(d["n"], d["c_in"], d["c_out"], d["h_out"], d["w_out"], d["k"], d["k"])
    nbytes = min_bytes(d["op"], d["n"], d["c_in"], d["h"], d["w"], d["c_out"], d["h_out"],
                       d["w_out"], d["k"], d["k"], itemsize)
    return flops, nbytes


def rate(amount, seconds, unit=1e12):
    """``amount / seconds / unit`` (TFLOP/s with the default unit), None without a time."""
    if not seconds or seconds <= 0:
        return None
    return amount / seconds / unit


def summarize(times_s):
    """Median and quartiles (seconds) of a list of timings."""
    ordered = sorted(times_s)
    if not ordered:
        return None

    def q(p):
        k = (len(ordered) - 1) * p
        lo, hi = int(k), min(int(k) + 1, len(ordered) - 1)
        return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)

    return {"median": q(0.5), "q25": q(0.25), "q75": q(0.75), "min": ordered[0],
            "count": len(ordered)}


def within_tolerance(err, bound, dtype_name):
    """``err <= tol(dtype) * bound`` with the per-dtype tolerance."""
    return err <= TOLERANCE[dtype_name] * max(bound, sys.float_info.min)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description="Check gpuconv's CUDA path on this GPU.")
    parser.add_argument("--quick", action="store_true",
                        help="fewer geometries and repetitions (a smoke test)")
    parser.add_argument("--skip-bench", action="store_true", help="no timings")
    parser.add_argument("--skip-sanitizer", action="store_true", help="no compute-sanitizer")
    parser.add_argument("--repeats", type=int, default=None,
                        help="timed calls per implementation and layer (default 10, quick 3)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed calls first (default 2)")
    parser.add_argument("--json", default=None,
                        help="where to write the JSON (default: $OUT/gpu_check.json if OUT is set)")
    args = parser.parse_args(argv)
    if args.repeats is None:
        args.repeats = 3 if args.quick else 10
    if args.repeats < 1 or args.warmup < 0:
        parser.error("--repeats must be >= 1 and --warmup >= 0")
    if args.json is None and os.environ.get("OUT"):
        args.json = os.path.join(os.environ["OUT"], "gpu_check.json")
    return args


# --------------------------------------------------------------------------------------------
# references (PyTorch; work on any device, float64 in, float64 out)
# --------------------------------------------------------------------------------------------

def torch_conv2d_ref(torch, x, w, b, stride, padding, dilation, groups):
    """Shared convolution with PyTorch (cuDNN on a GPU)."""
    return torch.nn.functional.conv2d(x, w, b, stride=stride, padding=padding,
                                      dilation=dilation, groups=groups)


def torch_local_conv2d_ref(torch, x, w, b, stride, padding, dilation, groups):
    """Locally connected layer with the usual recipe: ``unfold`` then ``einsum``.

    ``w`` is ``(C_out, H_out, W_out, C_in/g, kH, kW)``; ``b`` ``None``, ``(C_out,)`` or
    ``(C_out, H_out, W_out)``.
    """
    n = x.shape[0]
    c_out, h_out, w_out, c_ig, kh, kw = w.shape
    cols = torch.nn.functional.unfold(x, (kh, kw), dilation=dilation, padding=padding,
                                      stride=stride)                      # (N, C_in*kh*kw, L)
    cols = cols.reshape(n, groups, c_ig * kh * kw, h_out * w_out)
    wg = w.reshape(groups, c_out // groups, h_out * w_out, c_ig * kh * kw)
    y = torch.einsum("ngkl,golk->ngol", cols, wg).reshape(n, c_out, h_out, w_out)
    if b is not None:
        y = y + (b.reshape(1, c_out, 1, 1) if b.dim() == 1 else b.unsqueeze(0))
    return y


# --------------------------------------------------------------------------------------------
# GPU parts
# --------------------------------------------------------------------------------------------

def _case_tensors(torch, case, op, dtype, device, generator):
    kh, kw = case.kernel
    h_out, w_out = case_out_hw(case)
    x = torch.rand((case.n, case.c_in, case.h, case.w), generator=generator, dtype=torch.float64,
                   device=device) * 2 - 1
    if op == "local_conv2d":
        wshape = (case.c_out, h_out, w_out, case.c_in // case.groups, kh, kw)
    else:
        wshape = (case.c_out, case.c_in // case.groups, kh, kw)
    w = torch.rand(wshape, generator=generator, dtype=torch.float64, device=device) * 2 - 1
    b = None
    if case.bias == "channel" or (case.bias == "position" and op == "conv2d"):
        b = torch.rand((case.c_out,), generator=generator, dtype=torch.float64, device=device) * 2 - 1
    elif case.bias == "position":
        b = torch.rand((case.c_out, h_out, w_out), generator=generator, dtype=torch.float64,
                       device=device) * 2 - 1
    cast = (lambda t: None if t is None else t.to(dtype))
    return cast(x), cast(w), cast(b)


def check_case(torch, gpuconv, case, op, dtype, device="cuda"):
    """Run one case through gpuconv (torch tensors on ``device``) and compare with the
    float64 PyTorch peer. The result must be a torch tensor on the same device."""
    seed = sum(map(ord, case.name + op))  # stable across runs (str hashes are not)
    generator = torch.Generator(device=device).manual_seed(seed)
    x, w, b = _case_tensors(torch, case, op, dtype, device, generator)
    kwargs = dict(stride=case.stride, padding=case.padding, dilation=case.dilation,
                  groups=case.groups)
    fn = getattr(gpuconv, op)
    y = fn(x, w, b, **kwargs)
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()
    ref_fn = torch_local_conv2d_ref if op == "local_conv2d" else torch_conv2d_ref
    d = (lambda t: None if t is None else t.double())
    ref = ref_fn(torch, d(x), d(w), d(b), **kwargs)
    bound = ref_fn(torch, d(x).abs(), d(w).abs(), None if b is None else d(b).abs(), **kwargs)
    ok_type = (isinstance(y, torch.Tensor) and y.device.type == torch.device(device).type
               and y.dtype == dtype)
    err = float((y.double() - ref).abs().max()) if ref.numel() else 0.0
    scale = float(bound.abs().max()) if bound.numel() else 0.0
    dtype_name = str(dtype).replace("torch.", "")
    finite = bool(torch.isfinite(y).all())
    return {"case": case.name, "op": op, "dtype": dtype_name, "max_abs_error": err,
            "scale": scale, "tolerance": TOLERANCE[dtype_name],
            "result_kind_ok": ok_type, "finite": finite,
            "ok": ok_type and finite and within_tolerance(err, scale, dtype_name)}


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
    ref = torch_conv2d_ref(torch, torch.from_numpy(x_np), torch.from_numpy(w_np),
                           torch.from_numpy(b_np), 1, 0, 1, 2).numpy()
    ref_local = torch_local_conv2d_ref(torch, torch.from_numpy(x_np), torch.from_numpy(wl_np),
                                       torch.from_numpy(b_np), 1, 0, 1, 2).numpy()

    def close(y, r):
        return float(np.abs(np.asarray(y) - r).max()) <= 1e-12 * float(np.abs(r).max()) * 100

    def numpy_in():
        y = gpuconv.conv2d(x_np, w_np, b_np, groups=2, device="cuda")
        return isinstance(y, np.ndarray) and close(y, ref), type(y).__name__

    def torch_in():
        t = lambda a: torch.from_numpy(a).cuda()  # noqa: E731
        y = gpuconv.conv2d(t(x_np), t(w_np), t(b_np), groups=2)
        yl = gpuconv.local_conv2d(t(x_np), t(wl_np), t(b_np), groups=2)
        return (isinstance(y, torch.Tensor) and y.is_cuda and close(y.cpu().numpy(), ref)
                and close(yl.cpu().numpy(), ref_local)), type(y).__name__

    def numba_in():
        y = gpuconv.conv2d(cuda.to_device(x_np), cuda.to_device(w_np), cuda.to_device(b_np),
                           groups=2)
        return hasattr(y, "copy_to_host") and close(y.copy_to_host(), ref), type(y).__name__

    def cupy_in():
        try:
            import cupy
        except ImportError:
            return True, "CuPy not installed (skipped)"
        y = gpuconv.conv2d(cupy.asarray(x_np), cupy.asarray(w_np), cupy.asarray(b_np), groups=2)
        yl = gpuconv.local_conv2d(cupy.asarray(x_np), cupy.asarray(wl_np), cupy.asarray(b_np),
                                  groups=2)
        return (isinstance(y, cupy.ndarray) and close(cupy.asnumpy(y), ref)
                and close(cupy.asnumpy(yl), ref_local)), type(y).__name__

    def side_stream():
        stream = torch.cuda.Stream()
        with torch.cuda.stream(stream):
            xs = torch.from_numpy(x_np).cuda()
            ws = torch.from_numpy(w_np).cuda()
            bs = torch.from_numpy(b_np).cuda()
            y = gpuconv.conv2d(xs, ws, bs, groups=2)
            y2 = y * 1.0  # queued on the same stream after our kernel
        stream.synchronize()
        return close(y2.cpu().numpy(), ref), "torch side stream"

    def non_contiguous():
        xt = torch.from_numpy(np.ascontiguousarray(x_np.transpose(0, 1, 3, 2))).cuda().transpose(2, 3)
        wt = torch.from_numpy(np.ascontiguousarray(w_np[:, :, ::-1])).cuda().flip(2)
        big = torch.zeros((6, 2, 3, 6), dtype=torch.float64, device="cuda")
        big[..., ::2] = torch.from_numpy(w_np).cuda()
        y1 = gpuconv.conv2d(xt, big[..., ::2], torch.from_numpy(b_np).cuda(), groups=2)
        y2 = gpuconv.conv2d(xt, wt.contiguous(), torch.from_numpy(b_np).cuda(), groups=2)
        return (not xt.is_contiguous() and close(y1.cpu().numpy(), ref)
                and close(y2.cpu().numpy(), ref)), "transposed and strided views"

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


def time_gpu(torch, fn, warmup, repeats):
    """Seconds per call of ``fn`` (CUDA events on the current stream), after ``warmup`` calls."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return summarize(times)


def copy_bandwidth(torch, nbytes=1 << 30, repeats=10):
    """Device-to-device copy bandwidth in bytes/s (read + write counted)."""
    src = torch.empty(nbytes // 4, dtype=torch.float32, device="cuda").uniform_()
    dst = torch.empty_like(src)
    stats = time_gpu(torch, lambda: dst.copy_(src), 2, repeats)
    del src, dst
    torch.cuda.empty_cache()
    return 2 * nbytes / stats["median"]


def _measure(torch, fn, warmup, repeats):
    """Timing summary, or ``{"status": "out of memory"}`` / ``{"status": "error: ..."}``."""
    try:
        return {"status": "ok", **time_gpu(torch, fn, warmup, repeats)}
    except torch.cuda.OutOfMemoryError:
        torch.cuda.empty_cache()
        return {"status": "out of memory"}
    except Exception as exc:  # CUDA errors from Numba are not RuntimeErrors
        torch.cuda.empty_cache()
        if "out of memory" in str(exc).lower() or "OUT_OF_MEMORY" in str(exc):
            return {"status": "out of memory"}
        return {"status": f"error: {type(exc).__name__}: {exc}"}


def bench_layers(torch, gpuconv, layers, warmup, repeats, copy_bps):
    """Time gpuconv against PyTorch's peer for both ops on every layer."""
    rows = []
    for layer in layers:
        d = layer_dims(layer)
        for op in ("conv2d", "local_conv2d"):
            if op == "local_conv2d" and d["op"] == "conv2d" and d["n"] * d["c_out"] * d["h_out"] \
                    * d["w_out"] * d["c_in"] * d["k"] * d["k"] > 4e11:
                continue  # unshared weights of the biggest images: skip, they add minutes
            row = {"layer": d["name"], "op": op, **{k: d[k] for k in ("n", "c_in", "h", "w", "c_out", "k", "stride", "pad", "h_out", "w_out")}}
            flops, nbytes = layer_counts(tuple([layer[0], op] + list(layer[2:])))
            row.update(flops=flops, min_bytes=nbytes, kernel=_kernel_name(op, d))
            try:
                x = torch.randn((d["n"], d["c_in"], d["h"], d["w"]), device="cuda")
                if op == "conv2d":
                    w = torch.randn((d["c_out"], d["c_in"], d["k"], d["k"]), device="cuda")
                    ours = lambda: gpuconv.conv2d(x, w, None, d["stride"], d["pad"])  # noqa: E731
                    peer = lambda: torch.nn.functional.conv2d(x, w, None, d["stride"], d["pad"])  # noqa: E731
                    peer_name = "torch.nn.functional.conv2d (cuDNN, TF32 off)"
                else:
                    w = torch.randn((d["c_out"], d["h_out"], d["w_out"], d["c_in"], d["k"], d["k"]),
                                    device="cuda")
                    ours = lambda: gpuconv.local_conv2d(x, w, None, d["stride"], d["pad"])  # noqa: E731
                    peer = lambda: torch_local_conv2d_ref(torch, x, w, None, d["stride"], d["pad"], 1, 1)  # noqa: E731
                    peer_name = "unfold + einsum"
            except torch.cuda.OutOfMemoryError:
                torch.cuda.empty_cache()
                row["status"] = "out of memory (inputs)"
                rows.append(row)
                continue
            row["gpuconv"] = _measure(torch, ours, warmup, repeats)
            row["peer_name"] = peer_name
            row["peer"] = _measure(torch, peer, warmup, repeats)
            for key in ("gpuconv", "peer"):
                med = row[key].get("median")
                row[key]["tflops"] = rate(flops, med)
                row[key]["gbps"] = rate(nbytes, med, 1e9)
                row[key]["fraction_of_copy_bandwidth"] = (
                    None if med is None or not copy_bps else nbytes / med / copy_bps)
            del x, w
            torch.cuda.empty_cache()
            rows.append(row)
            print(_format_bench_row(row), flush=True)
    return rows


def _geometry(d):
    """The ConvGeometry of a :func:`layer_dims` dict."""
    from gpuconv.geometry import conv_geometry

    return conv_geometry((d["n"], d["c_in"], d["h"], d["w"]), (d["k"], d["k"]), d["c_out"],
                         d["stride"], d["pad"])


def _kernel_name(op, d):
    """Name of the gpuconv kernel (specialisation) this layer launches in float32."""
    import numpy as np

    from gpuconv.cuda import kernels as _cuda_kernels

    geom = _geometry(d)
    config = (_cuda_kernels.local_conv2d_config if op == "local_conv2d"
              else _cuda_kernels.conv2d_config)(geom, np.float32)
    return config.kernel.name


def bench_layer_list(quick):
    """The layers timed: all of them, or (quick) every third plus the unshared ones."""
    if not quick:
        return LAYERS
    chosen = LAYERS[::3] + tuple(layer for layer in LAYERS if layer[1] == "local_conv2d")
    return tuple(dict.fromkeys(chosen))


def _format_bench_row(row):
    def cell(m):
        if m.get("status") != "ok":
            return f"{m.get('status'):>28}"
        return f"{m['median'] * 1e3:9.3f} ms {m['tflops']:6.2f} TF {m['gbps']:7.0f} GB/s"
    return f"{row['layer']:<20} {row['op']:<13} ours {cell(row['gpuconv'])} | peer {cell(row['peer'])}"


def kernel_resources(kernels, layers):
    """Registers, local and shared memory of the benchmark layers' kernels as compiled here."""
    import numpy as np

    info = {}
    for layer in layers:
        geom = _geometry(layer_dims(layer))
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
    for dtype in (torch.float64, torch.float32):
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
    kinds = check_array_kinds(torch, gpuconv)
    report["array_kinds"] = kinds
    for k in kinds:
        print(f"{'ok  ' if k['ok'] else 'FAIL'} {k['check']}: {k['detail']}")
        failures += 0 if k["ok"] else 1

    # 2. speed
    if not args.skip_bench:
        try:
            copy_bps = copy_bandwidth(torch)
        except Exception as exc:
            copy_bps = None
            print(f"copy bandwidth failed: {exc}")
        report["copy_bandwidth_GBps"] = None if copy_bps is None else copy_bps / 1e9
        if copy_bps:
            print(f"device-to-device copy: {copy_bps / 1e9:.0f} GB/s")
        layers = bench_layer_list(args.quick)
        start = time.perf_counter()
        report["bench"] = bench_layers(torch, gpuconv, layers, args.warmup, args.repeats, copy_bps)
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
