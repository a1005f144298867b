"""What one call costs beyond its kernel: tiny shapes, gpuconv beside PyTorch, per call.

A layer is called thousands of times in training; on small layers what a call does around
its kernel (checks, allocation, dispatch) decides the time. :func:`measure` times calls on
tiny shapes (:data:`SHAPES`) of :func:`gpuconv.conv2d` and :func:`gpuconv.local_conv2d`
beside ``torch.nn.functional.conv2d`` (PyTorch has no local op: its conv2d is the yardstick
for dispatch) on whichever device runs: each call timed alone with
``time.perf_counter_ns``, the implementations in alternating bursts after a warm-up, the
median and quartiles reported. On a GPU each timed call is followed by a synchronisation
inside the timing (the kernels of these shapes take a few microseconds), so a figure is
what a call costs a caller that waits for it.

:func:`call_steps` times the steps of one call's host path (operands, call-cache look-up,
memory check and stream, allocation, launch or kernel) for one shape, on host or device
arrays: what the acceptance script runs on a GPU.
"""

from __future__ import annotations

import os
import time

import numpy as np

__all__ = ["SHAPES", "measure", "format_section", "call_steps", "load_report"]

#: ``(name, x shape, output maps, kernel size)``: the tiny shapes timed per call.
SHAPES = (
    ("1x3x16x16, 4 maps 3x3", (1, 3, 16, 16), 4, 3),
    ("8x16x16x16, 16 maps 3x3", (8, 16, 16, 16), 16, 3),
)

#: Timed calls per burst, bursts per implementation, warm-up calls before each burst.
CALLS, BURSTS, WARMUP = 200, 5, 20
QUICK_CALLS, QUICK_BURSTS = 50, 3


def load_report(samples=()):
    """``{"cores", "load_average_max", "overloaded"}``: the largest 1-minute load average of
    ``samples`` and now, and whether it exceeded the core count (then other work competed for
    the cores, and timings include waits for them)."""
    cores = os.cpu_count() or 1
    values = [s for s in samples if s is not None]
    try:
        values.append(round(os.getloadavg()[0], 2))
    except (OSError, AttributeError):
        pass
    most = max(values) if values else None
    return {"cores": cores, "load_average_max": most,
            "overloaded": most is not None and most > cores}


def _arrays(shape, maps, k, device, torch, rng):
    n, c, h, w = shape
    x = rng.standard_normal(shape, dtype=np.float32)
    weight = rng.standard_normal((maps, c, k, k), dtype=np.float32)
    local = rng.standard_normal((maps, h - k + 1, w - k + 1, c, k, k), dtype=np.float32)
    if torch is None:
        if device == "cuda":
            from numba import cuda

            return {"x": cuda.to_device(x), "weight": cuda.to_device(weight),
                    "local": cuda.to_device(local)}, None
        return {"x": x, "weight": weight, "local": local}, None
    dev = "cuda" if device == "cuda" else "cpu"
    tensors = {name: torch.from_numpy(a).to(dev) for name, a in
               (("x", x), ("weight", weight), ("local", local))}
    return tensors, dev


def _implementations(arrays, torch, device):
    import gpuconv

    x, weight, local = arrays["x"], arrays["weight"], arrays["local"]
    impls = [("gpuconv conv2d", lambda: gpuconv.conv2d(x, weight, device=device)),
             ("gpuconv local_conv2d", lambda: gpuconv.local_conv2d(x, local, device=device))]
    if torch is not None:
        conv = torch.nn.functional.conv2d
        impls.append(("torch conv2d", lambda: conv(x, weight)))
    return impls


def measure(device="cpu", torch=None, quick=False, shapes=SHAPES, seed=0):
    """Per-call times of the tiny shapes on ``device`` (``"cpu"`` or ``"cuda"``); ``torch``
    the module or None. Returns ``{"records": [...], "load": load_report(...), "method"}``,
    a record per (shape, implementation): ``median_us``, ``q1_us``, ``q3_us``, ``calls``
    and ``ratio_to_torch`` (median over torch conv2d's median)."""
    tf32 = None
    if device == "cuda" and torch is not None:  # float32 is float32, as in the main run
        tf32 = (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32)
        torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        return _measure(device, torch, quick, shapes, seed)
    finally:
        if tf32 is not None:
            torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = tf32


def _measure(device, torch, quick, shapes, seed):
    from .stats import summarize

    calls, bursts = (QUICK_CALLS, QUICK_BURSTS) if quick else (CALLS, BURSTS)
    rng = np.random.default_rng(seed)
    sync = _synchronizer(device, torch)
    loads = [load_report()["load_average_max"]]
    records = []
    for name, shape, maps, k in shapes:
        arrays, _ = _arrays(shape, maps, k, device, torch, rng)
        impls = _implementations(arrays, torch, device)
        times = {label: [] for label, _ in impls}
        for _ in range(bursts):
            for label, fn in impls:
                for _ in range(WARMUP):
                    fn()
                sync()
                samples = times[label]
                for _ in range(calls):
                    start = time.perf_counter_ns()
                    fn()
                    sync()
                    samples.append(time.perf_counter_ns() - start)
        torch_median = None
        for label, _ in impls:
            s = summarize([t * 1e-3 for t in times[label]])
            rec = {"shape": name, "x": list(shape), "maps": maps, "kernel": k,
                   "impl": label, "device": device, "calls": len(times[label]),
                   "median_us": s["median"], "q1_us": s["q1"], "q3_us": s["q3"]}
            if label == "torch conv2d":
                torch_median = rec["median_us"]
            records.append(rec)
        for rec in records[-len(impls):]:
            rec["ratio_to_torch"] = (None if torch_median is None
                                     else rec["median_us"] / torch_median)
        loads.append(load_report()["load_average_max"])
    threads = ""
    if device == "cpu":
        import numba

        threads = f", {numba.get_num_threads()} Numba thread(s)"
        if torch is not None:
            threads += f", {torch.get_num_threads()} PyTorch thread(s)"
    method = (f"{bursts} alternating bursts x {calls} calls, each timed alone "
              f"(perf_counter_ns){', synchronised' if device == 'cuda' else ''}, "
              f"after {WARMUP} untimed calls; float32{threads}")
    return {"records": records, "load": load_report(loads), "method": method}


def _synchronizer(device, torch):
    if device != "cuda":
        return lambda: None
    if torch is not None and torch.cuda.is_available():
        return torch.cuda.synchronize
    from numba import cuda

    return cuda.synchronize


def _device_synchronizer(arrays):
    """What waits for a device array's work (None for host arrays)."""
    import sys

    from ..device import is_device_array

    for a in arrays:
        if a is not None and is_device_array(a):
            torch = sys.modules.get("torch")
            if torch is not None and isinstance(a, torch.Tensor):
                return torch.cuda.synchronize
            from numba import cuda

            return cuda.synchronize
    return None


def format_section(result):
    """The report's per-call section: a line per (shape, implementation)."""
    records = result["records"]
    if not records:
        return ""
    import textwrap

    lines = [textwrap.fill(f"Per-call cost on tiny shapes ({records[0]['device']}; "
                           f"{result['method']}):", 100, subsequent_indent="  "),
             f"  {'shape':<26} {'implementation':<21} {'median us':>10} "
             f"{'quartiles us':>17} {'/ torch conv2d':>14}"]
    for r in records:
        ratio = "-" if r.get("ratio_to_torch") is None else f"{r['ratio_to_torch']:.2f}x"
        lines.append(f"  {r['shape']:<26} {r['impl']:<21} {r['median_us']:>10.1f} "
                     f"{r['q1_us']:>8.1f}-{r['q3_us']:<8.1f} {ratio:>14}")
    load = result["load"]
    if load["overloaded"]:
        lines.append(f"  WARNING: load average {load['load_average_max']} exceeded the "
                     f"{load['cores']} cores: these times include waits for a core")
    return "\n".join(lines)


def call_steps(op_name, *arrays, stride=1, padding=0, dilation=1, groups=1, device="auto",
               repeat=100, warmup=10):
    """Time the steps of one call's host path, ``repeat`` times; the medians in microseconds.

    ``op_name`` is ``"conv2d"`` or ``"local_conv2d"`` (``arrays``: ``x, weight[, bias]``),
    or a gradient of :data:`gpuconv.ops.OPS` (its arrays by name order: ``grad_output,
    weight`` / ``input, grad_output``; sizes are not taken here). Host or device arrays
    (NumPy, CuPy, PyTorch tensors, Numba device arrays). The steps, each timed with
    ``time.perf_counter_ns`` as the public call runs them:

    - ``operands``: reading each argument's shape, dtype and location;
    - ``lookup``: the call-cache key and look-up (the checks, on a miss);
    - ``check`` (device arrays): memory check, device and stream look-up;
    - ``allocate``: the output (and, on a GPU, the Numba views of the operands);
    - ``launch`` (GPU) or ``kernel`` (CPU): queuing the kernels / running them;
    - ``sync`` (GPU): waiting for the kernels (not part of the host path);
    - ``total``: the whole call as the public function runs it, timed separately (without
      the synchronisation on a GPU).

    Returns ``{"steps_us": {step: median}, "total_us": median, "repeat": repeat}``.
    """
    from .. import conv as _conv
    from ..ops import FORWARD, OPS

    op = OPS[op_name]
    names = (("x", "weight", "bias") if op.kind == FORWARD else
             ("grad_output", "weight") if op.kind == "input_grad" else ("input", "grad_output"))
    if op.kind == FORWARD and len(arrays) == 2:
        arrays = arrays + (None,)
    if len(arrays) != len(names):
        raise TypeError(f"{op_name} takes {len(names)} arrays ({', '.join(names)}), got "
                        f"{len(arrays)}")
    if op.kind != FORWARD:
        raise ValueError("call_steps times the forward operations (conv2d, local_conv2d)")
    by_name = dict(zip(names, arrays))
    args = (stride, padding, dilation, groups, device)
    steps = {}

    def record(name, start):
        now = time.perf_counter_ns()
        steps.setdefault(name, []).append(now - start)
        return now

    sync = _device_synchronizer(arrays)
    totals = []
    for i in range(warmup + repeat):
        timed = i >= warmup
        t = time.perf_counter_ns()
        operands = [_conv._operand(v, n) for n, v in by_name.items()]
        t1 = time.perf_counter_ns()
        plan = _conv._plan_for(op, by_name, operands, {}, *args)
        t2 = time.perf_counter_ns()
        if timed:
            steps.setdefault("operands", []).append(t1 - t)
            steps.setdefault("lookup", []).append(t2 - t1)
        if plan.unbatched:
            for j in plan.batched:
                operands[j] = _conv._with_batch_axis(operands[j])
        mark = [time.perf_counter_ns()]
        if plan.target == "cuda" and not plan.trivial and operands[0].on_gpu:
            from ..cuda import launch

            def timer(step):
                now = time.perf_counter_ns()
                if timed:
                    steps.setdefault(step, []).append(now - mark[0])
                mark[0] = now

            launch.run(op, operands, plan.geom, plan.device_plan, timer=timer)
        elif plan.target == "cpu" and not plan.trivial:
            cpu = plan.device_plan
            _conv._HOST_MEMORY.check(cpu.needed)
            out = _conv._empty_output(cpu.out_shape, cpu.compute)
            kernel_args = _conv._kernel_arguments(op, operands, plan.geom, cpu)
            t3 = time.perf_counter_ns()
            _conv._run_kernel(cpu, kernel_args, out, plan.geom)
            t4 = time.perf_counter_ns()
            if timed:
                steps.setdefault("allocate", []).append(t3 - mark[0])
                steps.setdefault("kernel", []).append(t4 - t3)
        else:  # host arrays on a GPU, or a call without a kernel: one step
            _conv.call(op_name, by_name, *args)
            if timed:
                steps.setdefault("call", []).append(time.perf_counter_ns() - mark[0])
        if sync is not None:
            t5 = time.perf_counter_ns()
            sync()
            if timed:
                steps.setdefault("sync", []).append(time.perf_counter_ns() - t5)
        t6 = time.perf_counter_ns()
        _conv.call(op_name, by_name, *args)
        t7 = time.perf_counter_ns()
        if sync is not None:
            sync()
        if timed:
            totals.append(t7 - t6)
    median = lambda v: float(np.median(v)) / 1e3  # noqa: E731
    return {"steps_us": {k: median(v) for k, v in steps.items()},
            "total_us": median(totals), "repeat": repeat}
