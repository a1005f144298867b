"""The PNG of ``gpuconv bench --plot`` (matplotlib, Agg backend; the ``bench`` extra)."""

from __future__ import annotations

from ..appkit import require_matplotlib
from .suite import OPS, series_key, series_label

__all__ = ["require_matplotlib", "plot"]

# Shared in blue, unshared in orange, the tiled points between them in greens; gpuconv
# solid, the peer lighter and hatched.
_TILED_COLORS = ("#2ca02c", "#98df8a", "#17becf", "#9edae5")
_STYLE = {
    ("conv2d", True): dict(color="#1f77b4"),
    ("conv2d", False): dict(color="#aec7e8", hatch="//", edgecolor="#1f77b4"),
    ("local_conv2d", True): dict(color="#ff7f0e"),
    ("local_conv2d", False): dict(color="#ffbb78", hatch="//", edgecolor="#ff7f0e"),
}


def _label(op, impl, record=None):
    if op == "tiled_conv2d":
        return f"gpuconv {series_label(record)}"
    name = "conv2d (shared)" if op == "conv2d" else "local_conv2d (unshared)"
    return f"gpuconv {name}" if impl == "gpuconv" else f"{impl} {op}"


def _style(key, tiled_keys):
    """The bar style of a series (:func:`.suite.series_key`)."""
    op, impl = key[:2]
    if op == "tiled_conv2d":
        return dict(color=_TILED_COLORS[tiled_keys.index(key) % len(_TILED_COLORS)])
    return _STYLE.get((op, impl == "gpuconv"), {})


def plot(result, path):
    """Two panels: time per layer of every implementation; time against batch size."""
    require_matplotlib()
    import matplotlib.pyplot as plt

    records = [r for r in result["records"] if r["median_s"]]
    sweep = [r for r in records if r["part"] == "batch-sweep"]
    # One pass per figure: the sweep's (the first the run timed), else the first present.
    passes = [r.get("pass", "forward") for r in sweep + records]
    shown = passes[0] if passes else "forward"
    suite = [r for r in records if r["part"] == "suite" and r.get("pass", "forward") == shown]
    machine = result["machine"]
    panels = 2 if sweep else 1
    fig, axes = plt.subplots(1, panels, figsize=(16 if sweep else 11, 5.8),
                             gridspec_kw={"width_ratios": [2.2, 1][:panels]}, squeeze=False)
    axes = axes[0]

    # Panel 1: per layer, median time of each implementation (log scale), IQR as error bars.
    ax = axes[0]
    layers = list(dict.fromkeys(r["layer"] for r in suite))
    first_of = {}
    for r in suite:
        first_of.setdefault(series_key(r), r)
    series = list(first_of)
    series.sort(key=lambda s: (OPS.index(s[0]) if s[0] in OPS else len(OPS), s[1] != "gpuconv"))
    tiled_keys = [key for key in series if key[0] == "tiled_conv2d"]
    width = 0.8 / max(1, len(series))
    for k, key in enumerate(series):
        op, impl = key[:2]
        xs, ys, low, high = [], [], [], []
        for i, layer in enumerate(layers):
            match = [r for r in suite if r["layer"] == layer and series_key(r) == key]
            if match:
                r = match[0]
                xs.append(i + (k - (len(series) - 1) / 2) * width)
                ys.append(r["median_s"] * 1e3)
                low.append((r["median_s"] - r["q1_s"]) * 1e3)
                high.append((r["q3_s"] - r["median_s"]) * 1e3)
        style = _style(key, tiled_keys)
        ax.bar(xs, ys, width * 0.95, yerr=[low, high], capsize=2,
               label=_label(op, impl, first_of[key]),
               error_kw={"elinewidth": 0.8, "ecolor": "#333333"}, linewidth=0.6, **style)
    ax.set_yscale("log")
    ax.set_xticks(range(len(layers)))
    ax.set_xticklabels([f"{layer}\nN={next(r['N'] for r in suite if r['layer'] == layer)}"
                        for layer in layers], fontsize=8)
    ax.set_ylabel("median time per call (ms, log scale)")
    title = "Shared vs unshared, and the peers (bars: median, whiskers: quartiles)"
    if tiled_keys:
        title = ("Shared, tiled (the dial) and unshared, and the peers (bars: median, "
                 "whiskers: quartiles)")
    if shown != "forward":
        title += f"\n{shown} pass"
    ax.set_title(title, fontsize=10)
    ax.grid(axis="y", which="both", alpha=0.25)
    ax.set_axisbelow(True)
    tallest = max((r["q3_s"] for r in suite), default=1.0) * 1e3
    lowest = min((r["median_s"] for r in suite), default=1.0) * 1e3
    ax.set_ylim(lowest / 3, tallest * 12)  # headroom for the legend
    ax.legend(fontsize=8, loc="upper center", ncol=4, framealpha=0.9)
    ax.set_xlim(-0.6, len(layers) - 0.4)

    # Panel 2: the cost model made visible: time against batch size on one layer.
    if sweep:
        ax = axes[1]
        layer = sweep[0]["layer"]
        for op, impl in dict.fromkeys((r["op"], r["impl"]) for r in sweep
                                      if r["op"] != "tiled_conv2d"):
            rows = sorted((r for r in sweep if (r["op"], r["impl"]) == (op, impl)),
                          key=lambda r: r["N"])
            color = _STYLE[(op, True)]["color"]
            ax.plot([r["N"] for r in rows], [r["median_s"] * 1e3 for r in rows],
                    marker="o" if impl == "gpuconv" else "s",
                    linestyle="-" if impl == "gpuconv" else "--", color=color,
                    alpha=1.0 if impl == "gpuconv" else 0.6, label=_label(op, impl))
        batches = sorted({r["N"] for r in sweep})
        first = [r for r in sweep if (r["op"], r["impl"]) == ("local_conv2d", "gpuconv")]
        if first and len(batches) > 1:
            start = min(first, key=lambda r: r["N"])
            ax.plot(batches, [start["median_s"] * 1e3 * b / start["N"] for b in batches],
                    linestyle=":", color="#777777", label="proportional to N (guide)")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xticks(batches)
        ax.set_xticklabels([str(b) for b in batches])
        ax.set_xlabel("batch size N")
        ax.set_ylabel("median time per call (ms, log scale)")
        ax.set_title(f"Time against batch size, {layer}\n"
                     "unshared: weights read once per call, shared by the batch",
                     fontsize=10)
        ax.grid(which="both", alpha=0.25)
        values = [r["median_s"] * 1e3 for r in sweep]
        ax.set_ylim(min(values) / 2, max(values) * 30)  # headroom for the legend
        ax.legend(fontsize=8, loc="upper left", ncol=2, framealpha=0.9)

    where = machine.get("gpu") if machine.get("device") == "cuda" else machine.get("cpu")
    load = ""
    if machine.get("load_average_start") is not None:
        load = (f", load average {machine['load_average_start']} -> "
                f"{machine.get('load_average_end')} (other work skews the times above "
                f"{machine.get('cores')})")
    fig.suptitle(f"gpuconv bench — {machine.get('device')} ({where}, {machine.get('cores')} "
                 f"cores), {machine.get('dtype')}, {str(machine.get('date', ''))[:10]}{load}",
                 fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
