"""How ``gpuconv train`` trains: the plans per dataset, the epochs, the timing and the runs."""

from __future__ import annotations

import math
import statistics
import sys
import time
from dataclasses import dataclass

import numpy as np

from .. import appkit
from ..appkit import Progress, bar, check_output_path, require_matplotlib, write_json
from .data import INSTALL_HINT, _need, load_data
from .models import (DATASETS, VARIANTS, _check_choice, build_model, checked_params,
                     dense_requirement, dense_skip_reason, dial_point, expected_params,
                     network)
from .report import plot

@dataclass(frozen=True)
class Plan:
    """Hyper-parameters of one dataset's runs (chosen on validation accuracy)."""

    epochs: int
    batch: int
    lr: float


#: Defaults per dataset: (full run, ``--quick``).
PLANS = {
    "digits": (Plan(epochs=30, batch=32, lr=1e-2), Plan(epochs=8, batch=32, lr=1e-2)),
    "sample-images": (Plan(epochs=15, batch=32, lr=1e-3), Plan(epochs=5, batch=32, lr=1e-3)),
}


EVAL_BATCH = 512


def _evaluate(model, x, y, device):
    """Accuracy (0-1) and mean loss of ``model`` on ``(x, y)`` tensors, in batches."""
    import torch
    import torch.nn.functional as F

    correct, loss = 0, 0.0
    model.eval()
    with torch.no_grad():
        for start in range(0, len(y), EVAL_BATCH):
            xb = x[start:start + EVAL_BATCH].to(device)
            yb = y[start:start + EVAL_BATCH].to(device)
            logits = model(xb)
            loss += float(F.cross_entropy(logits, yb, reduction="sum"))
            correct += int((logits.argmax(1) == yb).sum())
    model.train()
    return correct / len(y), loss / len(y)


def _sync(device):
    if device == "cuda":
        import torch
        torch.cuda.synchronize()


def _warm_up(model, x, y, batch, device):
    """One untimed forward and backward at each batch size an epoch uses (the full batch and
    the last, shorter one): the first call of a layer compiles (or loads) its kernels, which
    would otherwise land in the first epoch's time. The gradients are dropped and no step is
    taken, so training is unchanged. Returns the seconds it took."""
    import torch.nn.functional as F

    start = time.perf_counter()
    sizes = {min(batch, len(y)), len(y) % batch} - {0}
    for size in sorted(sizes):
        F.cross_entropy(model(x[:size]), y[:size]).backward()
    model.zero_grad(set_to_none=True)
    _sync(device)
    return time.perf_counter() - start


def _train_one(net, variant, data, plan, seed, device, progress):
    """Train one network; return its record."""
    import torch
    import torch.nn.functional as F

    model = build_model(net, variant, seed=seed, device=device)
    params, rows = checked_params(model, net, variant)
    tensors = {part: (torch.from_numpy(data.x[part]), torch.from_numpy(data.y[part]))
               for part in data.x}
    x_train, y_train = (t.to(device) for t in tensors["train"])
    optimizer = torch.optim.Adam(model.parameters(), lr=plan.lr)
    order_rng = np.random.default_rng(seed)
    n = len(y_train)
    steps = math.ceil(n / plan.batch)
    label = f"{data.dataset} {variant} seed {seed}:"
    warmup_seconds = _warm_up(model, x_train, y_train, plan.batch, device)
    curve, losses, elapsed = [], [], 0.0
    for epoch in range(1, plan.epochs + 1):
        order = torch.from_numpy(order_rng.permutation(n)).to(device)
        _sync(device)
        start = time.perf_counter()
        total = torch.zeros((), dtype=torch.float64, device=device)
        for step in range(steps):
            rows_b = order[step * plan.batch:(step + 1) * plan.batch]
            optimizer.zero_grad(set_to_none=True)
            loss = F.cross_entropy(model(x_train[rows_b]), y_train[rows_b])
            loss.backward()
            optimizer.step()
            total += loss.detach().double() * len(rows_b)
            if progress.mode == "bar":  # a terminal: redraw the bar (at most ten times a second)
                progress.draw(f"{label} epoch {epoch}/{plan.epochs} {bar(step + 1, steps, 24)} "
                              f"{step + 1}/{steps}", final=step + 1 >= steps)
        _sync(device)
        seconds = time.perf_counter() - start
        elapsed += seconds
        train_loss = float(total) / n
        losses.append(train_loss)
        val_acc, _ = _evaluate(model, *tensors["val"], device)
        test_acc, _ = _evaluate(model, *tensors["test"], device)
        curve.append({"epoch": epoch, "seconds": round(elapsed, 4),
                      "epoch_seconds": round(seconds, 4), "train_loss": train_loss,
                      "val_accuracy": val_acc, "test_accuracy": test_acc})
        progress.line(f"{label} epoch {epoch}/{plan.epochs}  loss {train_loss:.4f}  "
                      f"val {val_acc:.3f}  test {test_acc:.3f}  {seconds:.2f} s")
    epoch_times = [c["epoch_seconds"] for c in curve]
    return {
        "params": params,
        "params_by_layer": [{"layer": name, "kind": kind, "shape": description,
                             "weights": count.weights, "biases": count.biases}
                            for name, kind, description, count in rows],
        "test_accuracy": curve[-1]["test_accuracy"],
        "val_accuracy": curve[-1]["val_accuracy"],
        "epoch_seconds": statistics.median(epoch_times),
        "train_seconds": round(elapsed, 4),
        "warmup_seconds": round(warmup_seconds, 4),
        "train_loss": losses,
        "curve": curve,
    }


def _expand(value, choices, what):
    values = [value] if isinstance(value, str) else list(value)
    out = []
    for item in values:
        if item == "all":
            out += [c for c in choices if c not in out]
        else:
            _check_choice(item, choices, what)
            if item not in out:
                out.append(item)
    if not out:
        raise ValueError(f"no {what} given; choose from: {', '.join(choices)}")
    return out


def _positive(value, name, allow_none=True):
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be a positive int, got {value!r}")
    if value < 1:
        raise ValueError(f"{name} must be >= 1, got {value}")
    return int(value)


#: CPU threads for PyTorch and for gpuconv's Numba kernels while training on the CPU. These
#: networks are small (a step is a few milliseconds of work): on a busy 2-core machine two
#: threads in each runtime made a step 6-37x slower than one thread (the threads wait for
#: each other at every parallel region), so one thread is the default.
DEFAULT_CPU_THREADS = 1


def _resolve_device(device):
    from ..device import select_device

    resolved = select_device(device=device)
    import torch
    if resolved == "cuda" and not torch.cuda.is_available():
        if device == "cuda":
            raise ValueError("device='cuda' was requested but this PyTorch build sees no CUDA "
                             "GPU; install a CUDA build of PyTorch or use --device cpu")
        resolved = "cpu"
    return resolved


def train(dataset="all", variant="all", *, epochs=None, batch=None, device="auto", seed=0,
          seeds=1, quick=False, json_path=None, plot_path=None, lr=None, threads=None,
          progress=sys.stderr, command=None):
    """Train the note's network, shared / unshared / dense, on real data; return the records.

    Args:
        dataset: ``"digits"``, ``"sample-images"``, ``"all"`` or a list of them.
        variant: ``"shared"``, ``"unshared"``, ``"dense"``, ``"all"`` or a list of them.
        epochs, batch, lr: override the per-dataset defaults (:data:`PLANS`).
        device: ``"auto"``, ``"cpu"`` or ``"cuda"`` (as :func:`gpuconv.select_device`).
        seed: the first seed; ``seeds`` seeds are run: ``seed, seed + 1, ...``. A seed fixes
            the data split, the initial weights and the batch order.
        quick: fewer epochs (and fewer training crops of the photos): a minute on a 2-core
            CPU once Numba's disk cache holds the kernels.
        threads: CPU threads for PyTorch and Numba while training on the CPU (default
            :data:`DEFAULT_CPU_THREADS`); restored afterwards. Ignored on a GPU.
        json_path, plot_path: where to write the JSON and the PNG; checked before training.
        progress: a stream for progress (a bar on a terminal, a line per epoch otherwise), or
            ``None`` for silence.
        command: the command line, for the record.

    Returns:
        ``{"machine": {...}, "records": [...]}``: the machine block of ``gpuconv bench`` and
        one record per (dataset, variant, seed) with ``dataset``, ``variant``, ``tiles``
        and ``tiling`` (the variant's point on the sharing dial,
        :func:`~gpuconv.train.models.dial_point`), ``seed``,
        ``device``, ``params`` (checked against :mod:`gpuconv.params`), ``params_by_layer``,
        ``test_accuracy`` and ``val_accuracy`` (0-1, after the last epoch),
        ``epoch_seconds`` (median training time of an epoch), ``train_seconds``,
        ``warmup_seconds`` (the untimed first calls before training, which compile the
        kernels), ``train_loss`` (per epoch), ``curve`` (per epoch: seconds, loss, accuracies) and
        ``epochs``, ``batch``, ``lr``, ``sizes``. A dense network that does not fit has
        ``skipped`` (the reason), ``dense_needs`` and ``None`` accuracies and times.

    Raises:
        ValueError: an unknown dataset or variant, a bad device, an output path that cannot
            be written (all before any training).
        TypeError: a non-integer count.
        ImportError: PyTorch, scikit-learn (or, for ``plot_path``, matplotlib) missing.
    """
    datasets = _expand(dataset, DATASETS, "dataset")
    variants = _expand(variant, VARIANTS, "variant")
    epochs = _positive(epochs, "epochs")
    batch = _positive(batch, "batch")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
        raise TypeError(f"seed must be an int >= 0, got {seed!r}")
    if seed < 0:
        raise ValueError(f"seed must be >= 0, got {seed}")
    seed = int(seed)
    seeds = _positive(seeds, "seeds", allow_none=False)
    threads = _positive(threads, "threads")
    if lr is not None and not (isinstance(lr, (int, float)) and lr > 0):
        raise ValueError(f"lr must be a positive number, got {lr!r}")
    check_output_path(json_path, "json_path")
    check_output_path(plot_path, "plot_path")
    if plot_path is not None:
        try:
            require_matplotlib()
        except ImportError as exc:
            raise ImportError(f"--plot needs matplotlib ({exc}); install it with: "
                              f"{INSTALL_HINT}") from exc
    _need("torch", "PyTorch")
    _need("sklearn", "scikit-learn")
    device = _resolve_device(device)

    if device == "cpu" and threads is None:
        threads = DEFAULT_CPU_THREADS
    import torch

    with appkit.threads(threads if device == "cpu" else None, torch):
        result = _run_all(datasets, variants, epochs, batch, lr, device, seed, seeds, quick,
                          progress, command)
    if json_path is not None:
        write_json(result, json_path)
    if plot_path is not None:
        plot(result, plot_path)
    return result


def _run_all(datasets, variants, epochs, batch, lr, device, seed, seeds, quick, progress,
             command):
    import numba
    import torch

    from ..appkit import load_average, machine_info

    machine = machine_info(device, torch, None, "float32")
    machine["load_average_start"] = load_average()
    machine["torch_threads"] = torch.get_num_threads()
    machine["numba_threads"] = numba.get_num_threads()
    machine["command"] = command
    machine["quick"] = bool(quick)
    reporter = Progress.choose(0, None if progress is not None else False, progress,
                               elapsed=False, interval=0.1)
    start = time.perf_counter()
    records = []
    for name in datasets:
        net = network(name)
        default = PLANS[name][1 if quick else 0]
        plan = Plan(epochs or default.epochs, batch or default.batch, lr or default.lr)
        for run_seed in range(seed, seed + seeds):
            data = load_data(name, seed=run_seed, quick=quick)
            for var in variants:
                base = {"dataset": name, "variant": var, **dial_point(var), "seed": run_seed,
                        "device": device, "epochs": plan.epochs, "batch": plan.batch,
                        "lr": plan.lr, "sizes": data.sizes()}
                reason = dense_skip_reason(net, device) if var == "dense" else None
                if reason is not None:
                    reporter.line(f"{name} {var} seed {run_seed}: {reason}")
                    base.update(params=sum(c.total for *_, c in expected_params(net, var)),
                                skipped=reason, dense_needs=dense_requirement(net),
                                test_accuracy=None, val_accuracy=None, epoch_seconds=None,
                                train_seconds=None, train_loss=[], curve=[])
                else:
                    base.update(_train_one(net, var, data, plan, run_seed, device, reporter))
                records.append(base)
    machine["wall_s"] = round(time.perf_counter() - start, 1)
    machine["load_average_end"] = load_average()
    return {"machine": machine, "records": records}
