"""How ``gpuconv train`` reports: the tables of parameters, times and accuracies, the
learning curves, and what sharing buys as a curve (test accuracy against parameters)."""

from __future__ import annotations

import statistics

import numpy as np

from ..appkit import require_matplotlib
from .models import VARIANTS, network

def summarize(records):
    """Per (dataset, variant): params, epoch seconds, test accuracy mean / spread / n."""
    groups = {}
    for record in records:
        groups.setdefault((record["dataset"], record["variant"]), []).append(record)
    rows = []
    for (dataset, variant), group in groups.items():
        trained = [r for r in group if r["test_accuracy"] is not None]
        accuracies = [r["test_accuracy"] for r in trained]
        rows.append({
            "dataset": dataset, "variant": variant, "params": group[0]["params"],
            "tiles": group[0].get("tiles"), "tiling": group[0].get("tiling"),
            "seeds": len(trained),
            "epoch_seconds": (statistics.median(r["epoch_seconds"] for r in trained)
                              if trained else None),
            "test_accuracy": statistics.fmean(accuracies) if accuracies else None,
            "test_accuracy_std": statistics.stdev(accuracies) if len(accuracies) > 1 else None,
            "test_accuracy_min": min(accuracies) if accuracies else None,
            "test_accuracy_max": max(accuracies) if accuracies else None,
            "skipped": group[0].get("skipped"),
        })
    return rows


def format_tables(result):
    """One table per dataset: variant, parameters, seconds per epoch, test accuracy."""
    rows = summarize(result["records"])
    lines = []
    for dataset in dict.fromkeys(r["dataset"] for r in rows):
        net = network(dataset)
        group = [r for r in rows if r["dataset"] == dataset]
        first = next((r for r in result["records"] if r["dataset"] == dataset), {})
        shape = "x".join(map(str, net.input_shape[1:]))
        lines.append(f"{dataset}: {shape} input, {net.input_shape[0]} channel(s), "
                     f"{net.labels} labels; {first.get('sizes', {}).get('train', '?')} train / "
                     f"{first.get('sizes', {}).get('test', '?')} test; "
                     f"{first.get('epochs')} epochs, batch {first.get('batch')}")
        header = ("variant", "params", "s/epoch", "test accuracy", "min-max")
        table = []
        for r in group:
            if r["skipped"]:
                table.append((r["variant"], f"{r['params']:,}", "-", "not trained", ""))
                continue
            spread = ("" if r["test_accuracy_std"] is None
                      else f" ± {100 * r['test_accuracy_std']:.1f}")
            table.append((r["variant"], f"{r['params']:,}", f"{r['epoch_seconds']:.2f}",
                          f"{100 * r['test_accuracy']:.1f}%{spread} (n={r['seeds']})",
                          f"{100 * r['test_accuracy_min']:.1f}-"
                          f"{100 * r['test_accuracy_max']:.1f}%"))
        widths = [max(len(str(row[i])) for row in [header] + table) for i in range(5)]
        align = ("<", ">", ">", ">", ">")
        for row in [header] + table:
            lines.append("  " + "  ".join(f"{cell:{a}{w}}" for cell, a, w
                                          in zip(row, align, widths)).rstrip())
        for r in group:
            if r["skipped"]:
                lines.append(f"  {r['variant']}: {r['skipped']}")
        lines.append("")
    if lines:
        lines.append("test accuracy: mean ± standard deviation over seeds (n = seeds), after "
                     "the last epoch; s/epoch: median training time of an epoch")
    return "\n".join(lines)


_COLORS = {"shared": "#1f77b4", "blocks-2x2": "#9467bd", "periodic-2x2": "#8c564b",
           "blocks-4x4": "#e377c2", "unshared": "#ff7f0e", "dense": "#2ca02c"}


_DATASET_COLORS = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd")


def sharing_curve(records):
    """What sharing buys, as a curve: per dataset, the trained variants from the most shared
    to the least, ``[{"variant", "tiles", "tiling", "params", "test_accuracy",
    "test_accuracy_min", "test_accuracy_max", "seeds"}]`` in increasing parameters (dense,
    which drops locality as well as sharing, included: it is the last point)."""
    curves = {}
    for row in summarize(records):
        if row["test_accuracy"] is None:
            continue
        curves.setdefault(row["dataset"], []).append(
            {key: row[key] for key in ("variant", "tiles", "tiling", "params", "test_accuracy",
                                       "test_accuracy_min", "test_accuracy_max", "seeds")})
    return {dataset: sorted(points, key=lambda p: p["params"])
            for dataset, points in curves.items()}


def _plot_sharing_curve(ax, records):
    """Test accuracy against parameters (log scale), one curve per dataset through shared,
    the ``blocks`` points and unshared (a block per output position is the unshared
    layer); ``periodic`` points as triangles and dense as a hollow square beside it;
    whiskers from the lowest to the highest seed."""
    for index, (dataset, points) in enumerate(sharing_curve(records).items()):
        color = _DATASET_COLORS[index % len(_DATASET_COLORS)]
        curve = [p for p in points if p["variant"] != "dense" and p["tiling"] != "periodic"]
        ax.plot([p["params"] for p in curve], [100 * p["test_accuracy"] for p in curve],
                color=color, label=f"{dataset}: shared -> blocks -> unshared")
        for p in points:
            low = 100 * (p["test_accuracy"] - p["test_accuracy_min"])
            high = 100 * (p["test_accuracy_max"] - p["test_accuracy"])
            marker = {"dense": "s", "periodic": "^"}.get(
                "dense" if p["variant"] == "dense" else p["tiling"], "o")
            ax.errorbar([p["params"]], [100 * p["test_accuracy"]], yerr=[[low], [high]],
                        fmt=marker, color=color, capsize=2,
                        markerfacecolor="white" if marker == "s" else color)
            ax.annotate(p["variant"], (p["params"], 100 * p["test_accuracy"]),
                        textcoords="offset points", xytext=(5, -3), fontsize=7, color=color)
        for marker, name, face in (("^", "periodic", color), ("s", "dense first layer", "white")):
            if any(p["variant"] == "dense" if marker == "s" else p["tiling"] == "periodic"
                   for p in points):
                ax.plot([], [], marker, color=color, markerfacecolor=face,
                        label=f"{dataset}: {name}")
    ax.set_xscale("log")
    ax.set_xlabel("parameters (log scale)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title("What sharing buys, as a curve: test accuracy against parameters\n"
                 "(mean over seeds; whiskers: lowest to highest seed)", fontsize=10)
    ax.grid(which="both", alpha=0.3)
    low, high = ax.get_xlim()
    ax.set_xlim(low, high * 4)  # room for the labels of the largest networks
    ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.12), ncol=2)


def plot(result, path):
    """Learning curves: test accuracy against epoch and against training time, per dataset
    (mean over seeds, the band from the lowest to the highest seed); and, in a third
    column, test accuracy against parameters, one curve per dataset
    (:func:`sharing_curve`)."""
    require_matplotlib()
    import matplotlib.pyplot as plt

    records = [r for r in result["records"] if r["curve"]]
    datasets = list(dict.fromkeys(r["dataset"] for r in records))
    rows = max(1, len(datasets))
    fig = plt.figure(figsize=(18, 4.2 * rows))
    grid = fig.add_gridspec(rows, 3)
    axes = [[fig.add_subplot(grid[row, col]) for col in range(2)] for row in range(rows)]
    _plot_sharing_curve(fig.add_subplot(grid[:, 2]), records)
    for row, dataset in enumerate(datasets):
        for variant in VARIANTS:
            group = [r for r in records if (r["dataset"], r["variant"]) == (dataset, variant)]
            if not group:
                continue
            epochs = min(len(r["curve"]) for r in group)
            acc = np.array([[c["test_accuracy"] for c in r["curve"][:epochs]] for r in group])
            secs = np.array([[c["seconds"] for c in r["curve"][:epochs]] for r in group])
            mean = 100 * acc.mean(0)
            style = dict(color=_COLORS[variant], marker="o", markersize=3)
            label = f"{variant} ({group[0]['params']:,} params)"
            xs = np.arange(1, epochs + 1)
            for col, x in ((0, xs), (1, secs.mean(0))):
                ax = axes[row][col]
                ax.plot(x, mean, label=label, **style)
                if len(group) > 1:
                    ax.fill_between(x, 100 * acc.min(0), 100 * acc.max(0),
                                    color=_COLORS[variant], alpha=0.15, linewidth=0)
        net = network(dataset)
        for col, xlabel in ((0, "epoch"),
                            (1, "training time (s), after an untimed warm-up that compiles")):
            ax = axes[row][col]
            ax.set_xlabel(xlabel)
            ax.set_ylabel("test accuracy (%)")
            ax.set_title(f"{dataset} ({net.labels} labels)")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8, loc="lower right")
    machine = result["machine"]
    fig.suptitle(f"gpuconv train: {machine.get('command') or ''} — {machine.get('device')}, "
                 f"{machine.get('cpu')}, {machine.get('date')}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
