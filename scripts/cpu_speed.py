"""CPU speed of gpuconv against what a user would pick instead, each layer with its own op.

``gpuconv bench`` (:func:`gpuconv.bench.run_benchmark`) with another selection: every layer
of :mod:`gpuconv.workloads` at its CPU batch size, float32, timed with the operation the
network uses there (``conv2d`` against PyTorch; ``local_conv2d`` on the DeepFace layers, and
on the seed's second layer, against ``unfold`` + ``einsum``; NumPy im2col baselines for the
forward without PyTorch), in the passes ``--pass`` asks for, as ``gpuconv bench --pass``:

- ``forward``: ``gpuconv.conv2d`` / ``local_conv2d`` against ``torch.nn.functional.conv2d``
  / unfold + einsum;
- ``backward``: both gradients (``gpuconv.grad``) against PyTorch autograd's backward of
  ``conv2d`` (oneDNN) / through unfold + einsum, the backward alone (their forward runs once,
  untimed, with its graph retained);
- ``step``: forward + backward of a layer, ``gpuconv.torch`` against ``torch.nn.Conv2d`` and
  the PyTorch-only locally connected layers (unfold + einsum, unfold + bmm).

Same timing rules as the benchmark (BENCHMARKS.md): warm-up, then alternating bursts,
medians. The copy bandwidth is measured first, with the same clock (the local layers' %bw);
no compute ceiling.

Usage::

    python scripts/cpu_speed.py                          # conv2d and local layers, forward
    python scripts/cpu_speed.py --pass backward --one-core
    python scripts/cpu_speed.py --op conv2d --pass both --rounds 7 --burst 4
    python scripts/cpu_speed.py --only resnet50-res2-3x3
    python scripts/cpu_speed.py --one-core               # one thread each, CPU time

``--one-core`` compares the kernels per core and is robust to a busy machine (time spent
waiting for a core is not counted); the default compares them as a user runs them, with
each library's own threads and in wall-clock time, and on a busy machine both sides then
show waits of whole scheduler time slices (several milliseconds).

speedup = peer time / gpuconv time (above 1: gpuconv is faster), as in ``gpuconv bench``.
"""

from __future__ import annotations

import argparse
import sys
import time

from gpuconv import bench
from gpuconv.bench import peers
from gpuconv.appkit import positive_int
from gpuconv.workloads import LAYERS

#: Each layer with the operation its network uses, and the seed's second layer unshared
#: (5 x 494 x 494 x 10 x 9 weights, 439 MB).
SELECTION = {
    "conv2d": [name for name, layer in LAYERS.items() if layer.network_op == "conv2d"],
    "local_conv2d": [name for name, layer in LAYERS.items()
                     if layer.network_op == "local_conv2d"] + ["seed-conv2"],
}


def _layer(text):
    """A layer by name (``deepface-l5``) or title (``"DeepFace L5 (local)"``)."""
    for name, layer in LAYERS.items():
        if text.strip().lower() in (name, layer.title.lower(), layer.short_title.lower()):
            return name
    raise argparse.ArgumentTypeError(f"unknown layer {text!r}; accepted: {', '.join(LAYERS)}")


def run(ops, rounds, burst, only=None, one_core=False, torch="auto", progress=None,
        passes=("forward",), ceilings=None):
    """The benchmark's result for ``ops`` on :data:`SELECTION` (or the layers in ``only``),
    in ``passes``. ``ceilings``: ``None`` measures the copy bandwidth first."""
    clock = time.perf_counter
    if torch == "auto":
        torch = peers.load_torch()
    if one_core:
        clock = bench.one_core(torch)
    if ceilings is None:
        ceilings = peers.measure_bandwidth("float32", quick=True, clock=clock)
    records, machine = [], None
    for op in ops:
        layers = [name for name in SELECTION[op] if not only or name in only]
        if not layers:
            continue
        result = bench.run_benchmark(layers, device="cpu", repeat=burst, bursts=rounds,
                                     ops=(op,), ceilings=ceilings, clock=clock, torch=torch,
                                     progress=progress, passes=passes)
        records += result["records"]
        machine = machine or result["machine"]
    return {"machine": machine, "records": records}


def rows(records):
    """One row per (layer, op, pass, peer): gpuconv and that peer side by side (one row
    with ``peer`` ``None`` where no peer ran)."""
    out = []
    for mine in records:
        if mine["impl"] != "gpuconv":
            continue
        key = (mine["layer"], mine["op"], mine.get("pass", "forward"))
        theirs = [r for r in records if r["impl"] != "gpuconv"
                  and (r["layer"], r["op"], r.get("pass", "forward")) == key]
        for peer in theirs or [None]:
            row = {"layer": mine["layer"], "op": mine["op"], "pass": key[2], "gpuconv": mine,
                   "peer": peer, "speedup": None}
            if peer and mine["median_s"] and peer["median_s"]:
                row["speedup"] = peer["median_s"] / mine["median_s"]
            out.append(row)
    return out


def _cell(value, fmt):
    return "-" if value is None else format(value, fmt)


def _memory(mine, peer):
    """``"0.31 vs 125.5"``; in the gradients also what gpuconv allocates beyond them beside
    the weight gradient's size."""
    if mine["peak_extra_bytes"] is None:
        return "-"
    text = f"{mine['peak_extra_bytes'] / 1e6:.2f}"
    if peer.get("peak_extra_bytes") is not None:
        text += f" vs {peer['peak_extra_bytes'] / 1e6:.1f}"
    if mine.get("grad_weight_bytes") and mine.get("peak_scratch_bytes") is not None:
        text += (f" (beyond the gradients {mine['peak_scratch_bytes'] / 1e6:.2f}; "
                 f"weight gradient {mine['grad_weight_bytes'] / 1e6:.1f})")
    return text


def format_rows(result):
    records = result["records"]
    lines = ["| layer | op | pass | gpuconv GFLOP/s | peer | peer GFLOP/s | speedup "
             "| gpuconv ms | peer ms | gpuconv %bw | rel. diff | extra MB, gpuconv vs peer |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for row in rows(records):
        mine, peer = row["gpuconv"], row["peer"] or {}
        ms = (lambda r: None if not r.get("median_s") else r["median_s"] * 1e3)
        share = mine.get("bandwidth_fraction")
        lines.append(
            f"| {row['layer']:<18} | {row['op']:<12} | {row['pass']:<8} "
            f"| {_cell(mine['gflops'], '8.1f')} | {peer.get('impl', '-'):<12} "
            f"| {_cell(peer.get('gflops'), '8.1f')} | {_cell(row['speedup'], '6.2f')} "
            f"| {_cell(ms(mine), '9.2f')} | {_cell(ms(peer), '9.2f')} "
            f"| {_cell(None if share is None else share * 100, '5.1f')} "
            f"| {_cell(mine['max_rel_diff'], '.1e')} | {_memory(mine, peer)} |")
    lines.append("")
    for key, value in bench.peer_speedups(records).items():
        lines.append(f"{key}: geometric-mean speedup (peer time / gpuconv time) = "
                     f"{value['geomean_speedup']:.2f} over {value['layers']} layers")
    for pass_name in bench.PASSES:
        shares = bench.local_bandwidth(records, pass_name)
        if shares["count"]:
            lines.append(f"local_conv2d {pass_name}: geometric mean "
                         f"{shares['geomean_fraction'] * 100:.1f} % of the copy bandwidth over "
                         f"{shares['count']} layers")
    for r in records:
        if r["first_call_in_process"] and r["impl"] == "gpuconv":
            lines.append(f"{r['op']} {r.get('pass', 'forward')}: first call in this process "
                         f"{r['first_call_s']:.2f} s (compile or cache load + one run)")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--op", choices=["conv2d", "local_conv2d", "both"], default="both")
    parser.add_argument("--pass", dest="passes", nargs="+", choices=tuple(bench.PASS_CHOICES),
                        default=["forward"], metavar="PASS",
                        help="forward, backward, step, both (forward and backward) or all, "
                             "as gpuconv bench --pass (default: forward)")
    parser.add_argument("--rounds", type=positive_int, default=5,
                        help="alternations of the bursts")
    parser.add_argument("--burst", type=positive_int, default=4, help="timed calls per burst")
    parser.add_argument("--only", action="append", type=_layer,
                        help="run only this layer (repeatable)")
    parser.add_argument("--one-core", action="store_true",
                        help="one thread each, timed in process CPU time")
    args = parser.parse_args(argv)
    ops = ("conv2d", "local_conv2d") if args.op == "both" else (args.op,)
    passes = bench.resolve_passes(args.passes)
    result = run(ops, args.rounds, args.burst, args.only, one_core=args.one_core,
                 passes=passes)
    if not result["records"]:
        parser.error(f"--only: none of {args.only} is timed with {' or '.join(ops)}")
    print(f"peers: {result['machine']['peers_reason']}; clock: "
          f"{result['machine']['timing']['clock']}; load average "
          f"{result['machine']['load_average_start']} at start, "
          f"{result['machine']['load_average_end']} at end")
    print(format_rows(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
