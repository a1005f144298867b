"""How ``gpuconv bench`` reports: the table, the speedups, the summary and the header."""

from __future__ import annotations

import textwrap

from .stats import PASSES, geomean, paired_ratios
from .suite import OPS, PASS_TITLES, series_label

def _overload_warning(machine):
    """A warning line for a run whose load exceeded the cores, or None."""
    if not machine.get("overloaded"):
        return None
    # (--one-core times CPU threads: no help to a GPU run, whose host path waited)
    rerun = ("rerun on an idle machine, or with --one-core (process CPU time)"
             if machine.get("device", "cpu") == "cpu" else "rerun on an idle machine")
    return (f"WARNING: the load average reached {machine['load_average_max']} on "
            f"{machine['cores']} cores: other work competed for the cores, and these times "
            f"include waits for one (scheduler stalls), not only the kernels; {rerun}")


def _plural(count, noun):
    return f"{count} {noun}" + ("" if count == 1 else "s")


def _ms(seconds):
    return "-" if seconds is None else f"{seconds * 1e3:.4g}"


def _num(value, fmt):
    return "-" if value is None else format(value, fmt)


def _pct(value):
    return "-" if value is None else f"{value * 100:.1f}%"


def _times(value):
    return "-" if value is None else f"{value:.3g}x"


def _count(value):
    """Parameters in a short readable form: 750, 62.7M, 1.85G."""
    if value < 10_000:
        return str(value)
    for divisor, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if value >= divisor:
            return f"{value / divisor:.3g}{suffix}"
    return str(value)  # pragma: no cover


def _mb(nbytes):
    return "-" if nbytes is None else f"{nbytes / 1e6:.1f}"


TABLE_COLUMNS = ("layer", "op", "impl", "N", "median ms", "q1-q3 ms", "GFLOP/s", "GB/s",
                 "%cmp", "%bw", "1st call ms", "params", "extra MB")


#: What the table's less obvious columns mean (printed under it, wrapped).
TABLE_LEGEND = (
    "%cmp = GFLOP/s as a share of the compute reference measured in this run (see Ceilings "
    "below). The reference is a fast library call on one shape, not the hardware peak, so a "
    "kernel that beats it on its own shape shows more than 100 %; it is not an error.",
    "%bw = GB/s (the fewest bytes a call must move / its median time) as a share of the "
    "measured copy bandwidth; above 100 % when the data stays in the caches.",
    "1st call ms = the first call on this layer, not in the medians; * = the first in this "
    "process (JIT compilation, a load from Numba's disk cache, or PyTorch's set-up).",
    "extra MB = peak memory one call allocates, output included (local_conv2d only).",
)


#: The legend of the dial's rows (printed when the records have some).
DIAL_LEGEND = (
    "tiled_conv2d TILING TxT = gpuconv.tiled_conv2d with T x T kernel slots per map "
    "(periodic: slot (i mod T_h, j mod T_w); blocks: T x T contiguous regions): points on the "
    "dial between conv2d (1 x 1) and local_conv2d (one kernel per position); no framework "
    "offers it, so it has no peer.",
)


#: The legend of the ``kernel ms`` column (printed when the records have kernel times).
KERNEL_LEGEND = (
    "kernel ms (CUDA) = the device time of the kernels and copies one call queues (PyTorch's "
    "profiler, the mean of as many calls as a burst); median ms - kernel ms is what the host "
    "adds to a call (checks, allocation, launch) when the GPU waits for it.",
)


#: What the tables of the other passes add to the legend (printed when they ran).
PASS_LEGEND = {
    "backward": "backward: gpuconv = gpuconv.grad's input gradient then weight gradient, two "
                "calls; torch and torch-unfold = PyTorch autograd's backward alone "
                "(torch.autograd.grad with retain_graph=True) of F.conv2d and of unfold + "
                "einsum: their forward ran once before the timing, and what it saved for the "
                "backward (unfold's columns) is not in extra MB. GFLOP/s count 2x the "
                "forward's FLOPs (each gradient takes the forward's multiply-adds); GB/s the "
                "fewest bytes of the two gradient calls (the input gradient reads the weights "
                "and dL/dy and writes dL/dx, the weight gradient reads x and dL/dy and writes "
                "dL/dw); extra MB includes the gradients returned.",
    "step": "step: y = layer(x), then torch.autograd.grad(y, (x, weight, bias), dL/dy), every "
            "call; 3x the forward's FLOPs; the local layers have one bias per output position. "
            "torch-unfold = a PyTorch-only layer computing unfold + einsum, weights in "
            "gpuconv's layout; torch-bmm = unfold, then one torch.bmm over the output "
            "positions, weights stored positions-major.",
}


def _has_kernel_times(records):
    return any(r.get("kernel_s") for r in records)


def table_columns(records):
    """The table's columns: :data:`TABLE_COLUMNS`, with ``kernel ms`` after the call's
    quartiles when the records have kernel times (CUDA, with PyTorch's profiler)."""
    if not _has_kernel_times(records):
        return TABLE_COLUMNS
    return TABLE_COLUMNS[:6] + ("kernel ms",) + TABLE_COLUMNS[6:]


def table_rows(records):
    """The table's cells, one tuple per record, formatted from the record's own numbers
    (the columns of :func:`table_columns`)."""
    kernel = _has_kernel_times(records)
    rows = []
    for r in records:
        if r["skipped"]:
            row = (r["layer"], series_label(r), r["impl"], str(r["N"]),
                   f"skipped: {r['skipped']}",
                   "", "", "", "", "", "", _count(r["params"]), "")
        else:
            row = (
                r["layer"], series_label(r), r["impl"], str(r["N"]), _ms(r["median_s"]),
                f"{_ms(r['q1_s'])}-{_ms(r['q3_s'])}", _num(r["gflops"], ".3g"),
                _num(r["gbs"], ".3g"), _pct(r["compute_fraction"]),
                _pct(r["bandwidth_fraction"]),
                _ms(r["first_call_s"]) + ("*" if r["first_call_in_process"] else ""),
                _count(r["params"]), _mb(r["peak_extra_bytes"]))
        if kernel:
            cell = "" if r["skipped"] else ("-" if not r.get("kernel_s") else _ms(r["kernel_s"]))
            row = row[:6] + (cell,) + row[6:]
        rows.append(row)
    return rows


#: Columns left out, in this order, when the table would be wider than its limit (the JSON
#: and ``--wide`` keep them all): the first call, the quartiles, the parameters, the memory,
#: the bytes per second.
NARROW_DROP = ("1st call ms", "q1-q3 ms", "params", "extra MB", "GB/s")


#: The text table's width on a pipe or in a log, and at least on a terminal.
TABLE_WIDTH = 100


def _table_width(columns, rows):
    widths = [len(c) for c in columns]
    for row in rows:
        if not row[4].startswith("skipped"):
            widths = [max(w, len(cell)) for w, cell in zip(widths, row)]
    return sum(widths) + 2 * (len(widths) - 1)


def fitted_columns(records, width=None):
    """``(columns kept, columns left out)`` so that the table of ``records`` fits ``width``
    characters (``None``: keep all), leaving out :data:`NARROW_DROP` in order."""
    columns = list(table_columns(records))
    rows = table_rows(records)
    dropped = []
    for name in NARROW_DROP:
        if width is None or _table_width(columns, [_pick(row, columns, table_columns(records))
                                                   for row in rows]) <= width:
            break
        if name in columns:
            columns.remove(name)
            dropped.append(name)
    return tuple(columns), tuple(dropped)


def _pick(row, columns, all_columns):
    index = {name: i for i, name in enumerate(all_columns)}
    return tuple(row[index[name]] for name in columns)


def format_table(records, width=None):
    """A plain-text table of ``records`` (the same numbers as the JSON, formatted), at most
    ``width`` characters wide where leaving out :data:`NARROW_DROP` allows (``None``: every
    column)."""
    all_columns = table_columns(records)
    columns, _ = fitted_columns(records, width)
    rows = [_pick(row, columns, all_columns) for row in table_rows(records)]
    widths = [len(c) for c in columns]
    for row in rows:
        if row[4].startswith("skipped"):
            continue
        widths = [max(w, len(cell)) for w, cell in zip(widths, row)]
    right = set(range(3, len(columns)))

    def line(cells):
        out = []
        for i, (cell, width) in enumerate(zip(cells, widths)):
            out.append(cell.rjust(width) if i in right else cell.ljust(width))
        return "  ".join(out).rstrip()

    lines = [line(columns), line(["-" * w for w in widths])]
    previous = None
    for row in rows:
        if previous is not None and row[0] != previous:
            lines.append("")
        previous = row[0]
        if row[4].startswith("skipped"):
            head = line(list(row[:4]) + [""] * (len(columns) - 4))
            lines.append(f"{head}  {row[4]}")
        else:
            lines.append(line(row))
    return "\n".join(lines)


def _pass_of(record):
    """The record's pass (records written before passes existed are forward)."""
    return record.get("pass", "forward")


def _passes(records):
    """The passes present in ``records``, in :data:`PASSES` order."""
    present = {_pass_of(r) for r in records}
    return [p for p in PASSES if p in present]


def _find(records, layer, op, impl, part, n=None, pass_name="forward"):
    """The timed record of ``op`` (``conv2d`` or ``local_conv2d``: a ``tiled_conv2d``
    record is one point of several) by ``impl`` on ``layer``."""
    for r in records:
        if (r["layer"], r["op"], r["impl"], r["part"]) == (layer, op, impl, part) \
                and _pass_of(r) == pass_name and (n is None or r["N"] == n) and r["median_s"]:
            return r
    return None


def _speedup(slower, faster):
    """``slower``'s median time / ``faster``'s, or ``None`` unless both ran."""
    return None if slower is None or faster is None else slower["median_s"] / faster["median_s"]


def _comparison(op, pass_name, peer):
    """``"conv2d vs torch"`` (forward), ``"conv2d backward vs torch"``."""
    return f"{op} vs {peer}" if pass_name == "forward" else f"{op} {pass_name} vs {peer}"


def peer_speedups(records):
    """Geometric mean, over the layers where both ran, of peer time / gpuconv time, per op,
    pass and peer.

    Returns ``{"conv2d vs torch": {"layers": k, "geomean_speedup": x, "op", "pass",
    "peer"}, "conv2d backward vs torch": ..., ...}`` (the forward's keys without the pass):
    ``x`` above 1 means gpuconv is faster (higher throughput) than that peer on this suite.
    """
    records = [r for r in records if r["part"] == "suite" and r["median_s"]]
    ratios = {}
    for r in records:
        if r["impl"] == "gpuconv":
            continue
        pass_name = _pass_of(r)
        mine = _find(records, r["layer"], r["op"], "gpuconv", "suite", r["N"], pass_name)
        if mine:
            entry = ratios.setdefault(_comparison(r["op"], pass_name, r["impl"]), {
                "op": r["op"], "pass": pass_name, "peer": r["impl"], "values": []})
            entry["values"].append(_speedup(r, mine))
    return {key: {"layers": len(entry["values"]), "geomean_speedup": geomean(entry["values"]),
                  "op": entry["op"], "pass": entry["pass"], "peer": entry["peer"]}
            for key, entry in ratios.items()}


def sharing_speedups(records, part="suite", pass_name="forward"):
    """What sharing buys in time, per layer: gpuconv's local_conv2d time / conv2d time.

    Returns ``{layer: {"N", "speedup", "median", "q1", "q3", "count", "params"}}``:
    ``speedup`` is the ratio of the medians (the table's numbers); ``median``, ``q1`` and
    ``q3`` summarise the ratios of paired calls (call ``i`` of each, timed in the same round
    of bursts; ``None`` for records without ``times_s``); ``params`` is the ratio of the
    parameter counts. Layers where either did not run are left out.
    """
    out = {}
    for r in records:
        if (r["part"], r["op"], r["impl"], _pass_of(r)) != (part, "local_conv2d", "gpuconv",
                                                            pass_name):
            continue
        unshared = _find(records, r["layer"], "local_conv2d", "gpuconv", part, r["N"], pass_name)
        shared = _find(records, r["layer"], "conv2d", "gpuconv", part, r["N"], pass_name)
        if unshared is None or shared is None:
            continue
        paired = paired_ratios(unshared.get("times_s") or [], shared.get("times_s") or [])
        out[r["layer"]] = {"N": r["N"], "speedup": _speedup(unshared, shared),
                           "median": paired and paired["median"],
                           "q1": paired and paired["q1"], "q3": paired and paired["q3"],
                           "count": paired["count"] if paired else 0,
                           "params": unshared["params"] / shared["params"]}
    return out


def dial_speedups(records, part="suite", pass_name="forward"):
    """Where the tiled points sit between the ends, per layer: each gpuconv ``tiled_conv2d``
    record against gpuconv's ``conv2d`` on the same layer.

    Returns ``{layer: {point: {"N", "tiles", "tiling", "time", "median", "q1", "q3",
    "count", "params"}}}`` with ``point`` the record's label (``"periodic 2x2"``):
    ``time`` = tiled time / conv2d time (ratio of the medians), ``median``, ``q1``, ``q3``
    the ratios of paired calls (as :func:`sharing_speedups`), ``params`` = tiled parameters /
    conv2d parameters. Points whose record or conv2d's did not run are left out.
    """
    out = {}
    for r in records:
        if (r["part"], r["op"], r["impl"], _pass_of(r)) != (part, "tiled_conv2d", "gpuconv",
                                                            pass_name) or not r["median_s"]:
            continue
        shared = _find(records, r["layer"], "conv2d", "gpuconv", part, r["N"], pass_name)
        if shared is None:
            continue
        paired = paired_ratios(r.get("times_s") or [], shared.get("times_s") or [])
        point = series_label(r)[len("tiled_conv2d "):]
        out.setdefault(r["layer"], {})[point] = {
            "N": r["N"], "tiles": r["tiles"], "tiling": r["tiling"],
            "time": _speedup(r, shared), "median": paired and paired["median"],
            "q1": paired and paired["q1"], "q3": paired and paired["q3"],
            "count": paired["count"] if paired else 0, "params": r["params"] / shared["params"]}
    return out


def _dial_lines(records, layers, width):
    """The forward's dial: per layer, each tiled point's parameters and time as multiples
    of conv2d's (the local_conv2d end is in the lines above)."""
    dial = dial_speedups(records)
    if not dial:
        return []
    points = list(dict.fromkeys(point for name in layers for point in dial.get(name, {})))
    lines = textwrap.wrap(
        "The sharing dial (gpuconv tiled_conv2d, same geometry): parameters and time as "
        "multiples of conv2d's (time: the median of the ratios of paired calls; the "
        "local_conv2d end is above)", 100)
    cell_width = 24
    lines.append(f"  {'layer':<{width}}" + "".join(f"  {p:>{cell_width}}" for p in points))
    for name in layers:
        if name not in dial:
            continue
        cells = []
        for point in points:
            value = dial[name].get(point)
            if value is None:
                cells.append("-")
                continue
            ratio = value["median"] if value["median"] is not None else value["time"]
            params = value["params"]
            params = f"{params:.3g}" if params < 100 else f"{params:,.0f}"
            cells.append(f"params {params}x  time {_times(ratio)}")
        lines.append(f"  {name:<{width}}" + "".join(f"  {c:>{cell_width}}" for c in cells))
    return lines


def local_bandwidth(records, pass_name="backward", ceilings=None):
    """How close gpuconv's local_conv2d comes to streaming its data at the copy bandwidth:
    ``{"layers": {layer: fraction}, "geomean_fraction": x, "count": k, "layers_new": {...},
    "geomean_fraction_new": y}`` over the suite records of ``pass_name``: fraction = fewest
    bytes / median time / measured copy bandwidth (the table's %bw); ``..._new`` the same
    against a copy into a newly allocated array (``ceilings["bandwidth_new_gbs"]``, which a
    call returning a new weight-sized gradient pays too; empty without it). The geometric
    means are ``None`` when nothing was measured."""
    rows = [r for r in records
            if (r["part"], r["op"], r["impl"]) == ("suite", "local_conv2d", "gpuconv")
            and _pass_of(r) == pass_name and r["bandwidth_fraction"]]
    shares = {r["layer"]: r["bandwidth_fraction"] for r in rows}
    new = (ceilings or {}).get("bandwidth_new_gbs")
    shares_new = {r["layer"]: r["gbs"] / new for r in rows} if new else {}
    return {"layers": shares, "geomean_fraction": geomean(shares.values()),
            "count": len(shares), "layers_new": shares_new,
            "geomean_fraction_new": geomean(shares_new.values())}


def backward_memory(records, pass_name="backward"):
    """gpuconv's local_conv2d memory per layer in ``pass_name``: ``{layer: {"peak_extra_bytes"
    (one call's peak allocation, its results included), "peak_scratch_bytes" (beyond the
    results it returns), "grad_weight_bytes" (the weight gradient's size)}}``, the layers
    where the peak was measured."""
    return {r["layer"]: {key: r[key] for key in ("peak_extra_bytes", "peak_scratch_bytes",
                                                 "grad_weight_bytes")}
            for r in records
            if (r["part"], r["op"], r["impl"]) == ("suite", "local_conv2d", "gpuconv")
            and _pass_of(r) == pass_name and r.get("peak_scratch_bytes") is not None}


def _peer_lines(records, layers, width, pass_name):
    """One line per layer: each op against each peer, in ``pass_name``."""
    lines = []
    for name in layers:
        cells = []
        for op in OPS:
            for r in records:
                if r["layer"] != name or r["op"] != op or r["impl"] == "gpuconv" \
                        or _pass_of(r) != pass_name:
                    continue
                mine = _find(records, name, op, "gpuconv", "suite", r["N"], pass_name)
                if not (r["median_s"] and mine):
                    continue
                cell = f"{op} vs {r['impl']} {_times(_speedup(r, mine))}"
                if mine["peak_extra_bytes"] is not None and r["peak_extra_bytes"] is not None:
                    cell += (f" (memory {_mb(mine['peak_extra_bytes'])} vs "
                             f"{_mb(r['peak_extra_bytes'])} MB)")
                cells.append(cell)
        if cells:
            line = f"  {name:<{width}}  " + "   ".join(cells)
            if len(line) > TABLE_WIDTH:  # one cell a line, under the layer's name
                line = f"  {name:<{width}}  " + ("\n" + " " * (width + 4)).join(cells)
            lines.append(line)
    return lines


def _geomean_lines(records, pass_name):
    lines = []
    values = [(key, value) for key, value in peer_speedups(records).items()
              if value["pass"] == pass_name]
    width = 32 if pass_name == "forward" else 38
    for key, value in values:
        lines.append(f"  {key:<{width}} {_times(value['geomean_speedup'])} "
                     f"over {value['layers']} layers")
    return lines


def _local_lines(records, layers, width, pass_name, ceilings=None):
    """gpuconv's local_conv2d in ``pass_name``: share of the copy bandwidth, memory beyond
    its results beside the weight gradient."""
    shares = local_bandwidth(records, pass_name, ceilings)
    memory = backward_memory(records, pass_name)
    if not shares["count"] and not memory:
        return []
    title = (f"gpuconv local_conv2d, {pass_name}: fewest bytes / median time as a share of the "
             "copy bandwidth (it streams weight-sized data)")
    if shares["layers_new"]:
        title += (", and of a copy into a new array (which pays the first touch of a new "
                  "result's pages, as a new weight gradient does)")
    if memory:
        title += ("; peak memory one call allocates beyond the gradients it returns, beside the "
                  "weight gradient's size")
    lines = textwrap.wrap(title, 100)
    columns = [("%copy", lambda name: _pct(shares["layers"].get(name)))]
    if shares["layers_new"]:
        columns.append(("%copy new", lambda name: _pct(shares["layers_new"].get(name))))
    if memory:
        columns += [("beyond gradients MB",
                     lambda name: _mb(memory.get(name, {}).get("peak_scratch_bytes"))),
                    ("weight gradient MB",
                     lambda name: _mb(memory.get(name, {}).get("grad_weight_bytes")))]
    lines.append(f"  {'layer':<{width}}" + "".join(f"  {head:>9}" for head, _ in columns))
    for name in layers:
        if name not in shares["layers"] and name not in memory:
            continue
        lines.append(f"  {name:<{width}}" + "".join(f"  {cell(name):>{max(9, len(head))}}"
                                                   for head, cell in columns))
    summary = []
    if shares["count"]:
        new = ""
        if shares["geomean_fraction_new"] is not None:
            new = f" ({_pct(shares['geomean_fraction_new'])} of a copy into a new array)"
        summary.append(f"geometric mean {_pct(shares['geomean_fraction'])} of copy bandwidth"
                       f"{new} over {_plural(shares['count'], 'layer')}")
    if memory:
        below = sum(m["peak_scratch_bytes"] < m["grad_weight_bytes"] for m in memory.values())
        summary.append(f"extra memory below the weight gradient's size on {below} of "
                       f"{_plural(len(memory), 'layer')}")
    lines.extend(textwrap.wrap("; ".join(summary), 100, initial_indent="  ",
                               subsequent_indent="    "))
    return lines


def format_summary(result):
    """What sharing buys per layer, and gpuconv against its peers (speedups), per pass; for
    the gradients also gpuconv's local_conv2d against the copy bandwidth and its memory."""
    records = [r for r in result["records"] if r["part"] == "suite"]
    layers = list(dict.fromkeys(r["layer"] for r in records))
    width = max([len(name) for name in layers] + [5])
    passes = _passes(records) or ["forward"]
    lines = []
    if "forward" in passes:
        lines += _forward_summary(result, records, layers, width)
    for pass_name in passes:
        if pass_name == "forward":
            continue
        if lines:
            lines.append("")
        lines.append(f"{PASS_TITLES[pass_name]}")
        peer_lines = _peer_lines(records, layers, width, pass_name)
        if peer_lines:
            lines.append("gpuconv vs peers: speedup = peer time / gpuconv time "
                         "(above 1: gpuconv is faster)")
            lines.extend(peer_lines)
            lines.append("")
            lines.append("Geometric mean of the speedups over the layers:")
            lines.extend(_geomean_lines(result["records"], pass_name))
        else:
            lines.append("gpuconv vs peers: no peer ran in this pass (see peers: above)")
        local = _local_lines(records, layers, width, pass_name,
                             result["machine"].get("ceilings"))
        if local:
            lines.append("")
            lines.extend(local)
    firsts = [r for r in result["records"] if r["first_call_in_process"] and r["median_s"]]
    if firsts:
        label_width = max([12 if passes == ["forward"] else 21]
                          + [len(series_label(r)) for r in firsts if _pass_of(r) == "forward"])
        lines.append("")
        lines.append("First call in this process (* in the table; not in the medians):")
        for r in firsts:
            how = f", {r['jit']}" if r["jit"] else ""
            label = (series_label(r) if _pass_of(r) == "forward"
                     else f"{series_label(r)} {_pass_of(r)}")
            lines.append(f"  {label:<{label_width}}  {r['impl']:<13} "
                         f"{_ms(r['first_call_s']):>8} ms "
                         f"(then {_ms(r['median_s'])} ms{how})")
    agreement = _agreement_line(result["records"], result["machine"].get("dtype"))
    if agreement:
        lines.append("")
        lines.extend(textwrap.wrap(agreement, 100, subsequent_indent="  "))
    ceilings = result["machine"]["ceilings"]
    new = ""
    if passes != ["forward"] and ceilings.get("bandwidth_new_gbs"):
        how = ceilings.get("bandwidth_new_method")
        new = (f"; into a new array {_num(ceilings['bandwidth_new_gbs'], '.4g')} GB/s"
               + (f" ({how})" if how else ""))
    lines.append("")
    lines.append(textwrap.fill(
        f"Ceilings measured in this run: compute "
        f"{_num(ceilings.get('compute_gflops'), '.4g')} GFLOP/s "
        f"({ceilings.get('compute_method', 'not measured')}); bandwidth "
        f"{_num(ceilings.get('bandwidth_gbs'), '.4g')} GB/s "
        f"({ceilings.get('bandwidth_method', 'not measured')}){new}.", 100,
        subsequent_indent="  "))
    return "\n".join(lines)


def _agreement_line(records, dtype):
    """How the results agree with their references (``max_rel_diff`` against the record's
    ``tolerance``): the records outside it, or, in float16 (whose tolerance depends on the
    reduction length), that all are within; ``None`` otherwise."""
    checked = [r for r in records if r.get("max_rel_diff") is not None
               and r.get("tolerance") is not None]
    outside = [r for r in checked if r["max_rel_diff"] > r["tolerance"]]
    if outside:
        return ("Agreement: outside the tolerance (max_rel_diff > tolerance): " + "; ".join(
            f"{r['layer']} {series_label(r)}"
            f"{'' if _pass_of(r) == 'forward' else ' ' + _pass_of(r)} "
            f"{r['impl']} vs {r.get('compared_with', '?')} {r['max_rel_diff']:.2g} > "
            f"{r['tolerance']:.2g}" for r in outside))
    if checked and dtype == "float16":
        worst = max(checked, key=lambda r: r["max_rel_diff"] / r["tolerance"])
        return (f"Agreement: all {len(checked)} results within the float16 tolerance of their "
                f"reference (2**-10 + terms * 2**-23, terms = the longest sum behind a value; "
                f"closest: {worst['layer']} {worst['op']} {worst['impl']} "
                f"{worst['max_rel_diff']:.2g} of {worst['tolerance']:.2g}).")
    return None


def _forward_summary(result, records, layers, width):
    """The forward's summary: what sharing buys, gpuconv vs peers, their geometric means."""
    records = [r for r in records if _pass_of(r) == "forward"]
    sharing = sharing_speedups(records)
    lines = ["What sharing buys (gpuconv, same geometry): parameters of local_conv2d / conv2d,",
             "and speedup of conv2d = local_conv2d time / conv2d time (above 1: the shared layer",
             "is faster), the median [quartiles] of the ratios of paired calls (call i of each,",
             "timed in the same round of bursts)"]
    for name in layers:
        params = {r["op"]: r["params"] for r in records if r["layer"] == name
                  and r["op"] in ("conv2d", "local_conv2d")}
        cell = sharing.get(name)
        if cell is None:
            time_text = "time: not measured"
        elif cell["median"] is None:
            time_text = f"speedup {_times(cell['speedup'])} (ratio of medians)"
        else:
            time_text = (f"speedup {_times(cell['median'])} [{cell['q1']:.3g}-"
                         f"{cell['q3']:.3g}] over {cell['count']} pairs")
        param_ratio = params["local_conv2d"] / params["conv2d"] if len(params) == 2 else None
        param_text = "-" if param_ratio is None else f"{param_ratio:,.0f}x"
        lines.append(f"  {name:<{width}}  params {param_text:>9}   {time_text}")
    dial_lines = _dial_lines(records, layers, width)
    if dial_lines:
        lines.append("")
        lines.extend(dial_lines)
    peer_lines = _peer_lines(records, layers, width, "forward")
    if peer_lines:
        lines.append("")
        lines.append("gpuconv vs peers: speedup = peer time / gpuconv time "
                     "(above 1: gpuconv is faster)")
        lines.extend(peer_lines)
        lines.append("")
        lines.append("Geometric mean of the speedups over the layers:")
        lines.extend(_geomean_lines(result["records"], "forward"))
    return lines


def format_header(result):
    m = result["machine"]
    timing = m["timing"]
    where = m["gpu"] if m["device"] == "cuda" and m["gpu"] else m["cpu"]
    load = ""
    if m.get("load_average_start") is not None:
        load = (f", load average {m['load_average_start']} at start, "
                f"{m.get('load_average_end')} at end")
    peers = " " + (m.get("peers_reason") or (", ".join(m.get("peers", ())) or "none"))
    if m.get("peers_reason_by_pass"):  # one line per pass
        peers = "".join("\n" + textwrap.fill(f"  {name}: {text}", 100, subsequent_indent="    ")
                        for name, text in m["peers_reason_by_pass"].items())
    clock = ""
    if timing.get("clock") == "process_time":
        threads = timing.get("numba_threads")
        clock = (f"; timed in process CPU time, {_plural(threads, 'Numba thread')}"
                 if threads else "; timed in process CPU time")
        if m.get("torch_threads"):
            clock += f", {_plural(m['torch_threads'], 'PyTorch thread')}"
    warning = _overload_warning(m)
    first = textwrap.fill(f"gpuconv bench on {m['device']} ({where}, {m['cores']} cores), "
                          f"{m['dtype']}, {m['date']}{load}", 100, subsequent_indent="  ")
    if not m.get("peers_reason_by_pass"):
        peers = textwrap.fill(f"peers:{peers}", 100, subsequent_indent="  ")[len("peers:"):]
    return (f"{first}\n"
            f"peers:{peers}\n"
            f"median of {timing['bursts']} alternating bursts x {timing['repeat']} timed calls"
            f"{clock}" + ("" if warning is None else "\n" + textwrap.fill(warning, 100)))


def format_report(result, width=None):
    """The whole text report: header, table(s) (one per pass) and the legend, batch sweep,
    summary; tables at most ``width`` characters wide where :func:`format_table` can (the
    columns it leaves out are named under them)."""
    suite = [r for r in result["records"] if r["part"] == "suite"]
    passes = _passes(result["records"])
    parts = [format_header(result)]
    dropped = set()

    def table(records):
        dropped.update(fitted_columns(records, width)[1])
        return format_table(records, width)
    if passes in ([], ["forward"]) and not result["machine"].get("passes_not_run"):
        parts += ["", table(suite)]
    else:
        for pass_name in passes:
            parts += ["", f"{PASS_TITLES[pass_name]}:",
                      table([r for r in suite if _pass_of(r) == pass_name])]
        for pass_name, why in result["machine"].get("passes_not_run", {}).items():
            parts += ["", f"{PASS_TITLES[pass_name]}: {why}"]
    legend = (TABLE_LEGEND + (KERNEL_LEGEND if _has_kernel_times(suite) else ())
              + (DIAL_LEGEND if any(r["op"] == "tiled_conv2d" for r in suite) else ())
              + tuple(PASS_LEGEND[p] for p in passes if p in PASS_LEGEND))
    sweep = [r for r in result["records"] if r["part"] == "batch-sweep"]
    sweep_table = table(sweep) if sweep else None
    legend = tuple(text for text in legend
                   if not any(text.startswith(name.split(" ")[0] + " ") or
                              text.startswith(name + " ") for name in dropped))
    if dropped:
        legend += (f"Left out to fit {width} columns (in the JSON, and shown by --wide): "
                   + ", ".join(name for name in NARROW_DROP if name in dropped) + ".",)
    parts += [""] + [textwrap.fill(text, 100, subsequent_indent="  ") for text in legend]
    if sweep:
        label = "" if _pass_of(sweep[0]) == "forward" else f", {_pass_of(sweep[0])}"
        parts += ["", f"Batch sweep ({sweep[0]['layer']}{label}):", sweep_table]
    parts += ["", format_summary(result)]
    return "\n".join(parts)
