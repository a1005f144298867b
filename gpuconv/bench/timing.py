"""How ``gpuconv bench`` times: random operands, warm-up, alternating bursts, the run.

See :mod:`gpuconv.bench` for the method. :func:`run_benchmark` turns layer names into
records (:func:`.suite.make_record`); the layers come from :data:`.suite.LAYERS`.
"""

from __future__ import annotations

import gc
import math
import os
import time

import numpy as np

from . import peers as impls_mod
from . import suite
from ..appkit import Progress, load_average, machine_info, set_threads
from .report import _ms, _num, _plural
from .stats import PASSES, format_bytes
from .suite import (DEFAULT_BURSTS, DEFAULT_REPEAT, OPS, STEP_FLOAT16, _bias_kind,
                    make_record, series_key, series_label)

#: Untimed warm-up before each burst: calls for at least this many seconds (at least one).
#: OpenBLAS's threads keep spinning for about 0.1 s after a NumPy matmul; with 50 ms of
#: warm-up, gpuconv's bursts after the NumPy peers ran 2-5x slow with wide quartiles
#: (deepface-l5/l6, measured side by side), with 250 ms they match their solo times.
WARMUP_S = 0.25


#: Skip what needs more than this fraction of the memory available when a layer starts.
MEMORY_FRACTION = 0.7


def _load_flag(samples):
    """``load_average_max`` (the largest 1-minute load average sampled: at the start, after
    each layer, at the end) and ``overloaded``: whether it exceeded the core count, when
    the timings include waits for a core (scheduler stalls), not only the kernels' time."""
    values = [v for v in samples if v is not None]
    most = max(values) if values else None
    return {"load_average_max": most,
            "overloaded": most is not None and most > (os.cpu_count() or 1)}


def _layer_news(records, done, total):
    """``"[2/4] alexnet-conv1 N=2: conv2d gpuconv 11.3 ms, torch 36 ms; ..."`` (the pass
    after ``N=2`` unless it is the forward; ``tiled_conv2d`` once per point of the dial)."""
    first = records[0]
    pass_name = first.get("pass", "forward")
    cells = []
    for op in OPS:
        labels = {}
        for r in records:
            if r["op"] == op:
                labels.setdefault(series_label(r), []).append(
                    f"{r['impl']} {_ms(r['median_s'])} ms" if r["median_s"]
                    else f"{r['impl']} skipped")
        cells += [f"{label} " + ", ".join(parts) for label, parts in labels.items()]
    label = "" if pass_name == "forward" else f" {pass_name}"
    return f"[{done}/{total}] {first['layer']} N={first['N']}{label}: " + "; ".join(cells)


_CALLED = set()  # (op, impl, tiling, tiles, device, dtype, pass) called in this process


def _numba_cache_stats():
    """(hits, misses) of gpuconv's CPU kernels' Numba disk cache so far in this process."""
    try:
        from numba.core.dispatcher import Dispatcher

        from .. import cpu as _cpu
    except Exception:
        return None
    hits = misses = 0
    for value in _cpu.jit_functions():
        if isinstance(value, Dispatcher):
            hits += sum(value.stats.cache_hits.values())
            misses += sum(value.stats.cache_misses.values())
    return hits, misses


def _normal(rng, shape, dtype):
    """Standard normal values of ``dtype``: float16 ones are drawn in float32, then rounded
    (NumPy draws float32 and float64 only)."""
    dtype = np.dtype(dtype)
    if dtype == np.float16:
        return rng.standard_normal(shape, dtype=np.float32).astype(np.float16)
    return rng.standard_normal(shape, dtype=dtype)


def _random_arrays(rng, geom, dtype):
    """x, shared weight, bias (NumPy), scaled so outputs stay O(1)."""
    fan_in = geom.in_channels_per_group * geom.kernel_height * geom.kernel_width
    scale = np.asarray(1.0 / np.sqrt(fan_in), dtype=dtype)
    x = _normal(rng, (geom.batch, geom.in_channels, geom.in_height, geom.in_width), dtype)
    shared = _normal(rng, geom.shared_weight_shape(), dtype)
    shared *= scale
    bias = _normal(rng, (geom.out_channels,), dtype)
    return x, shared, bias


def _tiled_shape(geom, tiles):
    return (geom.out_channels, *tiles, geom.in_channels_per_group, geom.kernel_height,
            geom.kernel_width)


def _random_on_host(rng, geom, dtype, need_local, pass_name, tiled=()):
    """The arrays of one geometry and pass, drawn by NumPy: x, the shared and (when
    ``need_local``) the unshared weights, the bias (per position too, for the step), dL/dy
    (not for the forward), and the tiled weights of each ``(T_h, T_w)`` in ``tiled``
    (under ``("tiled_conv2d", tiles)``)."""
    x, shared, bias = _random_arrays(rng, geom, dtype)
    local = None
    if need_local:
        local = np.empty(geom.local_weight_shape(), dtype=dtype)
        # Each position its own random kernel, drawn one output channel at a time so the
        # temporary stays small.
        flat = local.reshape(geom.out_channels, -1)
        for row in flat:
            row[:] = _normal(rng, row.shape[0], dtype)
        flat *= np.asarray(1.0 / np.sqrt(geom.in_channels_per_group * geom.kernel_height
                                         * geom.kernel_width), dtype=dtype)
    host = {"x": x, "bias": bias, "conv2d": shared, "local_conv2d": local}
    for tiles in tiled:
        weight = _normal(rng, _tiled_shape(geom, tiles), dtype)
        weight *= np.asarray(1.0 / np.sqrt(geom.in_channels_per_group * geom.kernel_height
                                           * geom.kernel_width), dtype=dtype)
        host[("tiled_conv2d", tiles)] = weight
    if pass_name != "forward":
        host["gy"] = _normal(rng, geom.output_shape, dtype)
    if pass_name == "step" and local is not None:
        host["bias_position"] = _normal(
            rng, (geom.out_channels, geom.out_height, geom.out_width), dtype)
    return host


def _random_on_gpu(torch, rng, geom, dtype, need_local, pass_name, tiled=()):
    """The arrays of :func:`_random_on_host`, drawn on the GPU by PyTorch (seeded from
    ``rng``): the unshared weights of the large layers are gigabytes, which the host would
    take seconds to draw and copy."""
    generator = torch.Generator(device="cuda").manual_seed(int(rng.integers(2**62)))
    target = getattr(torch, np.dtype(dtype).name)
    scale = 1.0 / math.sqrt(geom.in_channels_per_group * geom.kernel_height * geom.kernel_width)

    def normal(shape, factor=1.0):
        # drawn in float32 (or float64) and rounded, as on the host
        draw = torch.float64 if target == torch.float64 else torch.float32
        values = torch.randn(tuple(shape), generator=generator, device="cuda", dtype=draw)
        return (values.mul_(factor) if factor != 1.0 else values).to(target)

    arrays = {"x": normal((geom.batch, geom.in_channels, geom.in_height, geom.in_width)),
              "conv2d": normal(geom.shared_weight_shape(), scale),
              "bias": normal((geom.out_channels,)),
              "local_conv2d": normal(geom.local_weight_shape(), scale) if need_local else None}
    for tiles in tiled:
        arrays[("tiled_conv2d", tiles)] = normal(_tiled_shape(geom, tiles), scale)
    if pass_name != "forward":
        arrays["gy"] = normal(geom.output_shape)
    if pass_name == "step" and need_local:
        arrays["bias_position"] = normal((geom.out_channels, geom.out_height, geom.out_width))
    return arrays


class _Unit:
    """One implementation on one geometry, ready to be timed."""

    def __init__(self, impl, fn, geom, layer_name, part, extra):
        self.impl, self.fn, self.geom = impl, fn, geom
        self.layer_name, self.part, self.extra = layer_name, part, extra
        self.samples = []


def _bench_geometries(layer_name, geoms, part, backend, impl_list, dtype, repeat, bursts,
                      ceilings, progress, rng, on_error="raise"):
    """Records for ``geoms`` (one layer's geometries): every implementation in
    ``impl_list`` on each. All (geometry, implementation) pairs take turns in one rotation of
    bursts, so that in a batch sweep a slow spell of the machine does not land on one batch
    size only."""
    skipped, units, keep = [], [], []
    for geom in geoms:
        s, u, k = _prepare(layer_name, geom, backend, impl_list, dtype, part, progress, rng,
                           bursts, on_error)
        skipped += s
        units += u
        keep.append(k)
    _time_units(units, backend, repeat, bursts, progress)
    records = _records(skipped, units, impl_list, backend.kind, dtype, ceilings)
    del units, keep
    gc.collect()
    return records


def _warm_up(fn, backend):
    """Untimed calls, at least one and for at least :data:`WARMUP_S`: long enough for the
    previous library's spinning threads to let go of the cores and this one's to wake."""
    start = time.perf_counter()
    fn()
    backend.synchronize()  # on CUDA: one call at a time, nothing left queued
    while time.perf_counter() - start < WARMUP_S:
        fn()
        backend.synchronize()


def _time_units(units, backend, repeat, bursts, progress):
    """Alternating bursts: each unit warms up untimed, then ``repeat`` timed calls; round
    again ``bursts`` times. On CUDA, then the kernel time of ``repeat`` more calls of each
    (:meth:`~gpuconv.bench.peers.Backend.kernel_seconds`), recorded beside the call time."""
    for _ in range(bursts):
        for unit in units:
            _warm_up(unit.fn, backend)
            unit.samples.extend(backend.time_calls(unit.fn, repeat))
            progress.step(f"{unit.layer_name}: {unit.impl.op} {unit.impl.name}")
    if backend.kind == "cuda":
        for unit in units:
            seconds, reason = backend.kernel_seconds(unit.fn, repeat)
            unit.extra["kernel_s"] = seconds
            unit.extra["kernel_note"] = reason


def _records(skipped, units, impl_list, device, dtype, ceilings):
    records = list(skipped)
    for unit in units:
        impl = unit.impl
        records.append(make_record(impl.op, impl.name, unit.layer_name, device, dtype,
                                   unit.geom, unit.samples, ceilings, impl.description,
                                   unit.part, impl.pass_name, impl.tiles, impl.tiling,
                                   **unit.extra))
    order = {i.key: n for n, i in enumerate(impl_list)}
    records.sort(key=lambda r: (r["N"], order[series_key(r)]))
    return records


def _as_tuple(out):
    return out if isinstance(out, tuple) else (out,)


def _prepare(layer_name, geom, backend, impl_list, dtype, part, progress, rng, bursts,
             on_error="raise"):
    """Arrays, first calls, agreement and memory checks for one geometry and one pass (the
    implementations in ``impl_list`` all time the same pass).

    ``on_error="record"``: an implementation whose set-up or first call raises is recorded
    as skipped (``"failed: <exception>"``) and the others run on; ``"raise"``: it raises.

    Returns ``(skipped records, units to time, arrays to keep alive)``.
    """
    device = backend.kind
    itemsize = np.dtype(dtype).itemsize
    pass_name = impl_list[0].pass_name if impl_list else "forward"
    records = []

    def skipped(impl, reason):
        records.append(make_record(impl.op, impl.name, layer_name, device, dtype, geom,
                                   description=impl.description, part=part,
                                   pass_name=impl.pass_name, tiles=impl.tiles,
                                   tiling=impl.tiling, skipped=reason))

    # Check memory before allocating anything for this layer.
    available = impls_mod.available_memory(backend)
    budget = None if available is None else int(available * MEMORY_FRACTION)
    x_bytes = geom.batch * geom.in_channels * geom.in_height * geom.in_width * itemsize
    gy_bytes = 0 if pass_name == "forward" else math.prod(geom.output_shape) * itemsize
    shared_bytes = math.prod(geom.shared_weight_shape()) * itemsize
    runnable = []
    for impl in impl_list:
        need = (x_bytes + gy_bytes + shared_bytes + math.prod(impl.weight_shape(geom)) * itemsize
                + impl.workspace(geom, itemsize))
        if impl.tiles is not None and (impl.tiles[0] > geom.out_height
                                       or impl.tiles[1] > geom.out_width):
            skipped(impl, f"tiles {impl.tiles[0]}x{impl.tiles[1]} exceed the output "
                          f"{geom.out_height}x{geom.out_width}")
        elif budget is not None and need > budget:
            skipped(impl, f"needs about {format_bytes(need)}; {format_bytes(available)} "
                          f"available (limit {MEMORY_FRACTION:.0%} of it)")
        else:
            runnable.append(impl)
    for _ in range((len(impl_list) - len(runnable)) * (1 + bursts)):
        progress.step(f"{layer_name}: skipped")
    if not runnable:
        return records, [], None

    need_local = any(impl.op == "local_conv2d" for impl in runnable)
    tiled = tuple(dict.fromkeys(impl.tiles for impl in runnable if impl.tiles is not None))
    if backend.torch_cuda and not backend.simulator:
        host = _random_on_gpu(backend.torch, rng, geom, dtype, need_local, pass_name, tiled)
    else:
        host = _random_on_host(rng, geom, dtype, need_local, pass_name, tiled)

    converted = {}  # (array kind, array name) -> that array as the implementation reads it
    arrays = {}  # (array kind, weights) -> {"x", "weight", "bias"[, "gy"]}

    def arrays_for(impl):
        key = (impl.array_kind, impl.weight_name)
        if key not in arrays:
            if impl.array_kind == "numpy":
                convert = backend.to_host
            elif impl.array_kind == "torch":
                convert = backend.to_torch
            else:
                convert = backend.to_device

            def once(name):
                cache_key = (impl.array_kind, name)
                if cache_key not in converted:
                    converted[cache_key] = convert(host[name])
                return converted[cache_key]
            bias_name = "bias_position" if _bias_kind(impl.op, pass_name) == "position" \
                else "bias"
            arrays[key] = {"x": once("x"), "bias": once(bias_name),
                           "weight": once(impl.weight_name)}
            if "gy" in host:
                arrays[key]["gy"] = once("gy")
        return arrays[key]

    calls = {}
    extra = {}
    reference = {}
    outputs = {}
    for impl in list(runnable):
        key = impl.key + (device, dtype, pass_name)
        first_in_process = key not in _CALLED
        stats_before = _numba_cache_stats() if impl.name == "gpuconv" and device == "cpu" else None
        try:
            fn = impl.make(arrays_for(impl), geom)
            seconds, out = backend.time_first_call(fn)
        except Exception as exc:
            if _half_unsupported(impl, dtype, exc):
                skipped(impl, f"float16 not supported by this peer on {device}: "
                              f"{type(exc).__name__}: {exc}"[:300])
            elif on_error != "record":
                raise
            else:
                skipped(impl, f"failed: {type(exc).__name__}: {exc}"[:300])
            runnable.remove(impl)
            for _ in range(1 + bursts):
                progress.step(f"{layer_name}: failed {impl.op} {impl.name}")
            continue
        calls[impl] = fn
        _CALLED.add(key)
        jit = None
        if stats_before is not None and first_in_process:
            stats_after = _numba_cache_stats()
            if stats_after is not None:
                if stats_after[1] > stats_before[1]:
                    jit = "compiled"
                elif stats_after[0] > stats_before[0]:
                    jit = "loaded from Numba's disk cache"
        extra[impl] = {"first_call_s": seconds, "first_call_in_process": first_in_process,
                       "jit": jit}
        out = _as_tuple(out)
        extra[impl]["result_bytes"] = sum(int(piece.nbytes) for piece in out)
        if impl.canonical is not None:
            out = impl.canonical(out, geom)
        outputs[impl] = tuple(backend.to_host(piece) for piece in out)
        del out
        progress.step(f"{layer_name}: first call {impl.op} {impl.name}")
    # Agreement: every implementation against the first peer of its op (or gpuconv); for
    # several results (gradients) the largest difference, each relative to its reference.
    # tiled_conv2d has no peer (and each point of the dial its own weights): not compared.
    for impl in runnable:
        if impl.tiles is not None:
            extra[impl]["max_rel_diff"] = extra[impl]["compared_with"] = None
            continue
        peers = [i for i in runnable if i.op == impl.op and i.name != "gpuconv"]
        ref = peers[0] if peers else next(i for i in runnable if i.op == impl.op)
        reference[impl] = ref
        diff = 0.0
        for mine, theirs in zip(outputs[impl], outputs[ref]):
            ref_out = theirs.astype(np.float64)
            scale = float(np.max(np.abs(ref_out))) if ref_out.size else 0.0
            if ref_out.size:
                diff = max(diff, float(np.max(np.abs(mine.astype(np.float64) - ref_out)))
                           / (scale or 1.0))
        extra[impl]["max_rel_diff"] = diff
        extra[impl]["compared_with"] = ref.name
    outputs.clear()
    gc.collect()
    # Peak memory of the unshared implementations (one extra call each, not timed).
    for impl in runnable:
        if impl.op == "local_conv2d":
            peak, method = impls_mod.peak_extra_bytes(
                impl, calls[impl], backend, geom.out_height * geom.out_width * geom.groups)
            extra[impl].update(peak_extra_bytes=peak, peak_extra_method=method)
    units = [_Unit(impl, calls[impl], geom, layer_name, part, extra[impl])
             for impl in runnable]
    return records, units, (host, converted, arrays)


def _half_unsupported(impl, dtype, exc):
    """Whether ``exc``, raised by ``impl``'s set-up or first call, is a peer saying it has no
    float16 kernel here (PyTorch raises ``RuntimeError: "..." not implemented for 'Half'``):
    that peer is skipped, with the reason, and the run goes on."""
    return (np.dtype(dtype) == np.float16 and impl.name != "gpuconv"
            and isinstance(exc, (RuntimeError, NotImplementedError, TypeError)))


def one_core(torch=None):
    """One thread for gpuconv's CPU kernels (Numba) and for PyTorch; returns the clock to
    time them with, ``time.process_time`` (CPU time of the process: time spent waiting for
    a core on a busy machine is not counted)."""
    set_threads(1, torch)
    return time.process_time


def run_benchmark(layers, device="cpu", dtype="float32", repeat=DEFAULT_REPEAT,
                  bursts=DEFAULT_BURSTS, batch=None, batch_cap=None, peers=True,
                  sweep=None, torch="auto", progress=None, quick=False, seed=0, ops=OPS,
                  ceilings=None, clock=None, passes=("forward",), on_error="raise", dial=()):
    """Run the benchmark; return ``{"machine": {...}, "records": [...]}``.

    Args:
        layers: layer names (keys of :data:`LAYERS`) or :class:`Layer` objects.
        device: ``"cpu"`` or ``"cuda"`` (already resolved).
        dtype: ``"float32"``, ``"float64"`` or ``"float16"`` (no ``"step"``:
            :data:`STEP_FLOAT16`).
        repeat: timed calls per burst; bursts: bursts per implementation.
        batch: batch size for every layer (``None``: each layer's, for ``device``);
            ``batch_cap`` limits it.
        peers: also time PyTorch (or NumPy) peers.
        sweep: ``None`` or ``(layer name, batches)`` for a batch sweep (records with
            ``part="batch-sweep"``), in the first of ``passes``.
        torch: ``"auto"`` (import it if installed), ``None`` (do not use it), or a module.
        progress: ``None`` (a bar when stderr is a terminal, else a line per layer),
            ``False`` (silent), ``True`` (a bar) or ``"lines"``.
        quick: smaller ceiling measurements.
        ops: the operations to time (both by default).
        ceilings: the ceilings to compare with (``None``: measure them first).
        clock: host timer (default ``time.perf_counter``; :func:`one_core` gives another).
        passes: what to time, of :data:`PASSES`; each layer runs them in that order, each
            pass's implementations in their own rotation of bursts. ``"step"`` without
            PyTorch has nothing to time (``machine["passes_not_run"]`` says why).
        on_error: ``"raise"`` (an implementation that raises stops the run) or ``"record"``
            (it is recorded as skipped, ``"failed: ..."``, and the run goes on).
        dial: ``(tiling, (T_h, T_w))`` points at which the forward also times
            :func:`gpuconv.tiled_conv2d` (``gpuconv bench`` gives :data:`.suite.DIAL`; none by
            default); not in the batch sweep.
    """
    problem = None
    if torch == "auto":
        torch = impls_mod.load_torch()
        problem = impls_mod.torch_problem()
    passes = tuple(p for p in PASSES if p in passes)
    backend = impls_mod.Backend(device, torch, clock or time.perf_counter)
    layer_objs = [suite.LAYERS[name] if isinstance(name, str) else name for name in layers]
    impl_list = [i for i in impls_mod.implementations(device, torch, peers, passes, dial)
                 if i.op in ops]
    by_pass = {p: [i for i in impl_list if i.pass_name == p] for p in passes}
    pass_peers = impls_mod.describe_peers_by_pass(device, torch, peers, problem, passes)
    if "forward" in pass_peers and any(i.tiles is not None for i in impl_list):
        pass_peers["forward"] += ("; tiled_conv2d: no peer (no framework offers it), "
                                  "compared with gpuconv's conv2d and local_conv2d")
    if np.dtype(dtype) == np.float16 and "step" in by_pass:
        by_pass["step"] = []
        pass_peers["step"] = STEP_FLOAT16
    not_run = {p: pass_peers[p] for p in passes if not by_pass[p]}
    by_pass = {p: impls for p, impls in by_pass.items() if impls}
    peers_note = "; ".join(text if name == "forward" else f"{name}: {text}"
                           for name, text in pass_peers.items())
    sweep_batches = ()
    if sweep is not None and by_pass:
        sweep_layer, sweep_batches = sweep
        sweep_layer = suite.LAYERS[sweep_layer] if isinstance(sweep_layer, str) else sweep_layer
        sweep_pass = next(iter(by_pass))
        sweep_impls = [i for i in by_pass[sweep_pass] if i.tiles is None]
    per_layer = sum(len(impls) for impls in by_pass.values()) * (1 + bursts)
    per_sweep = len(sweep_impls) * (1 + bursts) if sweep_batches else 0
    steps = per_layer * len(layer_objs) + per_sweep * len(sweep_batches)
    bar = Progress.choose(steps, progress if steps else False)
    bar.line(f"gpuconv bench on {device}: {_plural(len(layer_objs), 'layer')}"
             + (f" and a batch sweep of {len(sweep_batches)}" if sweep_batches else "")
             + ("" if passes == ("forward",) else
                f", {'pass' if len(by_pass) == 1 else 'passes'} {', '.join(by_pass) or 'none'}")
             + f"; peers: {peers_note}"
             + ("; measuring the ceilings first" if ceilings is None else ""))
    tf32 = None
    if device == "cuda" and backend.torch_cuda:
        tf32 = (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32)
        torch.backends.cudnn.allow_tf32 = False
        torch.backends.cuda.matmul.allow_tf32 = False
    try:
        if ceilings is None:
            ceilings = impls_mod.measure_ceilings(backend, dtype, quick=quick)
            bar.line(f"ceilings: compute {_num(ceilings.get('compute_gflops'), '.4g')} GFLOP/s, "
                     f"bandwidth {_num(ceilings.get('bandwidth_gbs'), '.4g')} GB/s")
        load_start = load_average()
        loads = [load_start]
        machine = machine_info(device, torch, ceilings, dtype)
        machine["load_average_start"] = load_start
        machine["peers"] = sorted({f"{i.op}: {i.name}" for i in impl_list
                                   if i.name != "gpuconv" and i.pass_name == "forward"})
        if passes != ("forward",):
            machine["passes"] = list(by_pass)
            machine["passes_not_run"] = not_run
            machine["peers_by_pass"] = {
                p: sorted({f"{i.op}: {i.name}" for i in impls if i.name != "gpuconv"})
                for p, impls in by_pass.items()}
            machine["peers_reason_by_pass"] = pass_peers
        machine["peers_reason"] = peers_note
        dial_run = [[i.tiling, list(i.tiles)] for i in impl_list if i.tiles is not None]
        if dial_run:
            machine["dial"] = dial_run
        if torch is not None and device == "cpu":
            machine["torch_threads"] = torch.get_num_threads()
        machine["timing"] = {"repeat": repeat, "bursts": bursts,
                             "memory_fraction": MEMORY_FRACTION, "warmup_s": WARMUP_S,
                             "clock": getattr(backend.clock, "__name__", str(backend.clock))}
        if device == "cpu":
            import numba

            machine["timing"]["numba_threads"] = numba.get_num_threads()
        rng = np.random.default_rng(seed)
        records = []
        for done, layer in enumerate(layer_objs, 1):
            n = batch or layer.batch(device)
            if batch_cap:
                n = min(n, batch_cap)
            for impls in by_pass.values():
                layer_records = _bench_geometries(layer.name, [layer.geometry(n)], "suite",
                                                  backend, impls, dtype, repeat, bursts,
                                                  ceilings, bar, rng, on_error)
                if layer_records:
                    bar.line(_layer_news(layer_records, done, len(layer_objs)))
                records.extend(layer_records)
            loads.append(load_average())
        if sweep_batches:
            sweep_records = _bench_geometries(
                sweep_layer.name, [sweep_layer.geometry(n) for n in sweep_batches],
                "batch-sweep", backend, sweep_impls, dtype, repeat, bursts, ceilings,
                bar, rng, on_error)
            for done, n in enumerate(sweep_batches, 1):
                bar.line("batch sweep " + _layer_news(
                    [r for r in sweep_records if r["N"] == n], done, len(sweep_batches)))
            records.extend(sweep_records)
        bar.close()
        machine["load_average_end"] = load_average()
        machine.update(_load_flag(loads + [machine["load_average_end"]]))
    finally:
        if tf32 is not None:
            torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = tf32
    return {"machine": machine, "records": records}
