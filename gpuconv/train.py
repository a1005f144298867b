"""``gpuconv train``: what weight sharing and local connections do to *learning*.

The lecture note the project started from counts parameters: a fully connected layer on a
500 x 500 image with 10^5 neurons has 2.5 x 10^10 weights, a locally connected one 10^7, a
shared convolution 100 per feature. ``gpuconv params`` prints those numbers and ``gpuconv
bench`` times the layers; this module trains the note's network three ways on real data that
ships with scikit-learn and reports parameters, time per epoch and test accuracy:

- ``shared``: the note's network with :class:`gpuconv.torch.Conv2d`::

      input -> conv k1 x k1 x C x 10 -> ReLU -> conv k2 x k2 x 10 x 5 -> ReLU -> flatten
            -> fully connected to the labels

- ``unshared``: the same geometry with :class:`gpuconv.torch.LocallyConnected2d` (a kernel
  and a bias at every output position, in both conv layers);
- ``dense``: the first layer fully connected (every one of its neurons sees the whole image;
  it still produces 10 maps of the first conv layer's size, one neuron each), then the
  unshared second layer: the network with neither idea in its first layer and no sharing
  anywhere. When its first layer would not fit in memory, the run says what it would need
  (the note's arithmetic: inputs x neurons weights) instead of training it.

The ReLUs are ours (the note names none; they add no parameters). The last layer has one
output per label of the dataset.

Datasets (scikit-learn's bundled data; nothing is downloaded):

- ``sample-images``: :func:`sklearn.datasets.load_sample_images` (two 427 x 640 RGB photos).
  2 labels: which photo a random 20 x 20 crop comes from. Each photo is cut into a 4 x 5 grid
  of tiles; per seed the tiles are dealt to train, validation and test, and every crop lies
  inside one tile, so no test pixel is ever seen in training. Crops sit at random positions:
  the same texture appears anywhere in the crop, the situation weight sharing is made for.
  The note's network exactly (5 x 5 x 3 x 10, then 3 x 3 x 10 x 5): 20 -> 16 -> 14, a flatten
  of 14 x 14 x 5 = 980 values (the note's illustrative 1024 is not a multiple of 5 maps).
- ``digits``: :func:`sklearn.datasets.load_digits` (1,797 aligned 8 x 8 grey digits,
  10 labels): every digit is centred and size-normalised, the situation locally connected
  layers were made for (DeepFace). A 5 x 5 kernel would cover most of an 8 x 8 image, so both
  kernels are 3 x 3: 8 -> 6 -> 4, a flatten of 4 x 4 x 5 = 80 values; one input channel.

Per seed the data are split once (stratified): test, validation (carved from the training
part) and training. The hyper-parameters (Adam, learning rate, epochs, batch) were chosen on
the validation accuracy; the test set only reports. Test accuracy is also recorded after
every epoch for the learning curves; nothing reads it to decide anything.

The parameter count of every network is computed twice, from the built PyTorch modules and
from :mod:`gpuconv.params` (:class:`~gpuconv.params.ParamCount` of each layer for the same
geometry), and the two must agree.

Public pieces: :func:`train` (the runs, as a dict ``{"machine": ..., "records": [...]}``),
:func:`network`, :func:`build_model`, :func:`load_data`, :func:`format_tables`,
:func:`plot`, :func:`add_arguments` and :func:`run` (the command). Importing this module
imports neither PyTorch nor scikit-learn nor matplotlib.
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import time
from dataclasses import dataclass, field

import numpy as np

from .appkit import positive_int
from .params import conv2d_param_count, fully_connected_param_count, local_conv2d_param_count

__all__ = ["DATASETS", "VARIANTS", "Network", "network", "expected_params", "build_model",
           "load_data", "dense_requirement", "train", "format_tables", "plot",
           "add_arguments", "run"]

DATASETS = ("digits", "sample-images")
VARIANTS = ("shared", "unshared", "dense")

#: The command's one-paragraph description.
DESCRIPTION = ("Train the lecture note's network (conv 5x5x3x10 -> conv 3x3x10x5 -> fully "
               "connected) with shared weights (gpuconv Conv2d), unshared ones "
               "(LocallyConnected2d) and a fully connected first layer, on data shipped with "
               "scikit-learn, and report parameters, seconds per epoch and test accuracy.")

#: What ``pip install`` brings the optional packages this module needs.
INSTALL_HINT = "pip install 'gpuconv[train]'"

#: Bytes per weight of the dense first layer while training (float32 weight, its gradient and
#: Adam's two moments).
BYTES_PER_TRAINED_WEIGHT = 4 * 4
#: Train ``dense`` only when its first layer needs at most this fraction of the free memory.
MEMORY_FRACTION = 0.5


# ----------------------------------------------------------------------------- the networks

@dataclass(frozen=True)
class ConvLayer:
    """One conv layer of the note's network: ``k x k x c_in x c_out``, no padding, stride 1."""

    name: str
    kernel: int
    c_in: int
    c_out: int
    in_size: tuple
    out_size: tuple

    @property
    def description(self):
        return (f"{self.kernel}x{self.kernel}x{self.c_in}x{self.c_out}, "
                f"{self.in_size[0]}x{self.in_size[1]} -> {self.out_size[0]}x{self.out_size[1]}")


@dataclass(frozen=True)
class Network:
    """The geometry of a dataset's network: input ``(channels, H, W)``, two conv layers, labels."""

    dataset: str
    input_shape: tuple
    convs: tuple
    labels: int

    @property
    def flatten(self):
        last = self.convs[-1]
        return last.c_out * last.out_size[0] * last.out_size[1]

    @property
    def input_features(self):
        return math.prod(self.input_shape)

    @property
    def first_neurons(self):
        """Neurons of the first layer (its output values): what ``dense`` connects fully."""
        first = self.convs[0]
        return first.c_out * first.out_size[0] * first.out_size[1]


#: Per dataset: input ``(C, H, W)``, ``(kernel, output channels)`` of both conv layers, labels.
GEOMETRY = {
    # The note's network: 5 x 5 x 3 x 10, then 3 x 3 x 10 x 5, 2 labels, on 20 x 20 RGB crops.
    "sample-images": ((3, 20, 20), ((5, 10), (3, 5)), 2),
    # 8 x 8 grey digits: 3 x 3 kernels (a 5 x 5 one would see most of the image), 10 labels.
    "digits": ((1, 8, 8), ((3, 10), (3, 5)), 10),
}


def _check_choice(value, choices, what):
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"unknown {what} {value!r}; choose one of: {', '.join(choices)} "
                         "(or 'all')")
    return value


def network(dataset):
    """The :class:`Network` geometry used for ``dataset``.

    >>> net = network("sample-images")
    >>> [layer.description for layer in net.convs], net.flatten, net.labels
    (['5x5x3x10, 20x20 -> 16x16', '3x3x10x5, 16x16 -> 14x14'], 980, 2)
    >>> network("digits").flatten
    80
    """
    from .geometry import get_conv_outsize

    _check_choice(dataset, DATASETS, "dataset")
    (channels, height, width), kernels, labels = GEOMETRY[dataset]
    convs, size, c_in = [], (height, width), channels
    for index, (kernel, c_out) in enumerate(kernels, start=1):
        out = tuple(get_conv_outsize(s, kernel, 1, 0) for s in size)
        convs.append(ConvLayer(f"conv{index}", kernel, c_in, c_out, size, out))
        size, c_in = out, c_out
    return Network(dataset, (channels, height, width), tuple(convs), labels)


def expected_params(net, variant):
    """Per layer ``(name, kind, description, ParamCount)`` from :mod:`gpuconv.params`.

    >>> rows = expected_params(network("sample-images"), "shared")
    >>> [(name, count.total) for name, _, _, count in rows]
    [('conv1', 760), ('conv2', 455), ('fc', 1962)]
    >>> sum(c.total for *_, c in expected_params(network("sample-images"), "dense"))
    3165702
    """
    _check_choice(variant, VARIANTS, "variant")
    rows = []
    for index, layer in enumerate(net.convs):
        if variant == "dense" and index == 0:
            rows.append((layer.name, "fully connected",
                         f"{net.input_features} -> {net.first_neurons} "
                         f"(as {layer.c_out} maps of {layer.out_size[0]}x{layer.out_size[1]})",
                         fully_connected_param_count(net.input_features, net.first_neurons)))
        elif variant == "shared":
            rows.append((layer.name, "shared conv", layer.description,
                         conv2d_param_count(layer.c_in, layer.c_out, layer.kernel)))
        else:
            rows.append((layer.name, "locally connected", layer.description,
                         local_conv2d_param_count(layer.c_in, layer.c_out, layer.kernel,
                                                  layer.out_size, bias="position")))
    rows.append(("fc", "fully connected", f"{net.flatten} -> {net.labels}",
                 fully_connected_param_count(net.flatten, net.labels)))
    return rows


def dense_requirement(net):
    """What the dense first layer needs: the note's arithmetic for this input.

    Returns a dict: ``inputs`` (``C x H x W``), ``neurons``, ``weights`` (= inputs x neurons,
    the note's ``H x W x M``), ``bytes`` to train it (:data:`BYTES_PER_TRAINED_WEIGHT` each).
    """
    weights = net.input_features * net.first_neurons
    return {"inputs": net.input_features, "neurons": net.first_neurons, "weights": weights,
            "bytes": weights * BYTES_PER_TRAINED_WEIGHT}


def _free_memory(device):
    """Bytes free for a new allocation on ``device`` (``None`` if unknown)."""
    if device == "cuda":
        import torch
        return int(torch.cuda.mem_get_info()[0])
    from .device import host_memory_available
    return host_memory_available()


def _fmt_bytes(count):
    for unit in ("B", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB"):
        if count < 1024 or unit == "EiB":
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1024


def dense_skip_reason(net, device):
    """``None`` when the dense network fits on ``device``, else why it is not trained."""
    need = dense_requirement(net)
    free = _free_memory(device)
    if free is None or need["bytes"] <= MEMORY_FRACTION * free:
        return None
    return (f"dense first layer not trained: {need['inputs']:,} inputs x {need['neurons']:,} "
            f"neurons = {need['weights']:,} weights ({need['weights']:.2e}), "
            f"{_fmt_bytes(need['bytes'])} to train in float32 with gradients and Adam state, "
            f"but {_fmt_bytes(free)} is free on {device}")


def build_model(net, variant, seed=0, device="cpu"):
    """The ``variant`` network for ``net`` as a ``torch.nn.Sequential``, initialised from
    ``seed`` (PyTorch's default initialisation of each layer)."""
    import torch
    from torch import nn

    from . import torch as gt

    _check_choice(variant, VARIANTS, "variant")
    torch.manual_seed(seed)
    layers = []
    for index, layer in enumerate(net.convs):
        if variant == "dense" and index == 0:
            layers += [nn.Flatten(), nn.Linear(net.input_features, net.first_neurons),
                       nn.Unflatten(1, (layer.c_out,) + layer.out_size)]
        elif variant == "shared":
            layers.append(gt.Conv2d(layer.c_in, layer.c_out, layer.kernel))
        else:
            layers.append(gt.LocallyConnected2d(layer.c_in, layer.c_out, layer.kernel,
                                                input_size=layer.in_size))
        layers.append(nn.ReLU())
    layers += [nn.Flatten(), nn.Linear(net.flatten, net.labels)]
    return nn.Sequential(*layers).to(device)


def count_params(model):
    """Learnable numbers of a PyTorch module."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def checked_params(model, net, variant):
    """The model's parameter count, after checking it equals :func:`expected_params`'s."""
    rows = expected_params(net, variant)
    expected = sum(count.total for *_, count in rows)
    actual = count_params(model)
    if actual != expected:
        raise AssertionError(
            f"{net.dataset}/{variant}: the built network has {actual:,} parameters but "
            f"gpuconv.params counts {expected:,} for its geometry")
    return expected, rows


# ----------------------------------------------------------------------------- the data

#: Sample-images: tiles per photo (rows x columns) and how many go to validation and test.
TILE_GRID = (4, 5)
VAL_TILES, TEST_TILES = 3, 4
#: Crops per photo: (train, validation, test); ``--quick`` uses fewer training crops.
CROPS = (1500, 250, 500)
QUICK_CROPS = (400, 150, 300)
#: Digits: test fraction of the whole set, validation fraction of the rest.
DIGITS_TEST, DIGITS_VAL = 0.25, 0.15


@dataclass
class Data:
    """Float32 arrays ``(N, C, H, W)`` and int64 labels for train, validation and test."""

    dataset: str
    x: dict = field(default_factory=dict)
    y: dict = field(default_factory=dict)

    def sizes(self):
        return {part: int(len(labels)) for part, labels in self.y.items()}


def _need(module, what):
    import importlib
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise ImportError(f"gpuconv train needs {what} ({exc}); install it with: "
                          f"{INSTALL_HINT}") from exc


def _digits(seed):
    datasets = _need("sklearn.datasets", "scikit-learn")
    model_selection = _need("sklearn.model_selection", "scikit-learn")
    digits = datasets.load_digits()
    x = (digits.images / 16.0).astype(np.float32)[:, None]  # (N, 1, 8, 8) in [0, 1]
    y = digits.target.astype(np.int64)
    index = np.arange(len(y))
    rest, test = model_selection.train_test_split(index, test_size=DIGITS_TEST, stratify=y,
                                                  random_state=seed)
    train, val = model_selection.train_test_split(rest, test_size=DIGITS_VAL,
                                                  stratify=y[rest], random_state=seed)
    data = Data("digits")
    for part, rows in (("train", train), ("val", val), ("test", test)):
        data.x[part], data.y[part] = x[rows], y[rows]
    return data


def _tiles(shape, grid):
    """``(top, bottom, left, right)`` of each tile of a ``grid`` over an image of ``shape``."""
    rows = np.linspace(0, shape[0], grid[0] + 1).astype(int)
    cols = np.linspace(0, shape[1], grid[1] + 1).astype(int)
    return [(rows[i], rows[i + 1], cols[j], cols[j + 1])
            for i in range(grid[0]) for j in range(grid[1])]


def _sample_images(seed, quick, size):
    datasets = _need("sklearn.datasets", "scikit-learn")
    _need("PIL", "Pillow (scikit-learn reads the sample photos with it)")
    photos = [np.asarray(image, dtype=np.float32) / 255.0
              for image in datasets.load_sample_images().images]
    rng = np.random.default_rng(seed)
    counts = dict(zip(("train", "val", "test"), QUICK_CROPS if quick else CROPS))
    crops = {part: [] for part in counts}
    labels = {part: [] for part in counts}
    for label, photo in enumerate(photos):
        tiles = _tiles(photo.shape, TILE_GRID)
        order = rng.permutation(len(tiles))
        parts = {"test": order[:TEST_TILES], "val": order[TEST_TILES:TEST_TILES + VAL_TILES],
                 "train": order[TEST_TILES + VAL_TILES:]}
        for part, tile_ids in parts.items():
            chosen = rng.choice(tile_ids, size=counts[part])
            for tile_id in chosen:
                top, bottom, left, right = tiles[tile_id]
                i = rng.integers(top, bottom - size + 1)
                j = rng.integers(left, right - size + 1)
                crops[part].append(photo[i:i + size, j:j + size].transpose(2, 0, 1))
                labels[part].append(label)
    data = Data("sample-images")
    for part in counts:
        data.x[part] = np.stack(crops[part]).astype(np.float32)
        data.y[part] = np.asarray(labels[part], dtype=np.int64)
    # Standardise each channel with the training crops' statistics.
    mean = data.x["train"].mean(axis=(0, 2, 3), keepdims=True)
    std = data.x["train"].std(axis=(0, 2, 3), keepdims=True)
    for part in counts:
        data.x[part] = ((data.x[part] - mean) / std).astype(np.float32)
    return data


def load_data(dataset, seed=0, quick=False):
    """The ``dataset``'s train / validation / test split for ``seed`` (a :class:`Data`).

    The split depends on ``seed`` only (and, for ``sample-images``, on ``quick``, which
    takes fewer crops): the same seed gives the same arrays.
    """
    _check_choice(dataset, DATASETS, "dataset")
    if dataset == "digits":
        return _digits(seed)
    return _sample_images(seed, quick, GEOMETRY["sample-images"][0][1])


# ----------------------------------------------------------------------------- training

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


class _Progress:
    """A bar redrawn in place on a terminal; one line per epoch otherwise."""

    def __init__(self, stream, enabled=True):
        self.stream = stream
        self.enabled = enabled and stream is not None
        self.tty = self.enabled and hasattr(stream, "isatty") and stream.isatty()
        self.drawn = 0.0

    def step(self, label, epoch, epochs, done, total):
        if not self.tty:
            return
        now = time.perf_counter()
        if done < total and now - self.drawn < 0.1:  # at most ten redraws a second
            return
        self.drawn = now
        width = 24
        filled = int(width * done / max(total, 1))
        self.stream.write(f"\r{label} epoch {epoch}/{epochs} [{'#' * filled}"
                          f"{'.' * (width - filled)}] {done}/{total}")
        self.stream.flush()

    def epoch(self, label, line):
        if not self.enabled:
            return
        prefix = "\r\033[K" if self.tty else ""
        self.stream.write(f"{prefix}{label} {line}\n")
        self.stream.flush()

    def note(self, text):
        if self.enabled:
            self.stream.write(text + "\n")
            self.stream.flush()


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
            progress.step(label, epoch, plan.epochs, step + 1, steps)
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
        progress.epoch(label, f"epoch {epoch}/{plan.epochs}  loss {train_loss:.4f}  "
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


# ----------------------------------------------------------------------------- checks

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


def check_output_path(path, what):
    """Raise ``ValueError`` unless a file can be written at ``path`` (nothing is created)."""
    if path is None:
        return None
    path = os.fspath(path)
    if path == "" or os.path.isdir(path):
        raise ValueError(f"{what} {path!r} is a directory or empty, not a file path")
    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(parent):
        raise ValueError(f"cannot write {what} {path!r}: directory {parent!r} does not exist")
    if os.path.exists(path):
        writable = os.access(path, os.W_OK)
    else:
        writable = os.access(parent, os.W_OK | os.X_OK)
    if not writable:
        raise ValueError(f"cannot write {what} {path!r}: permission denied")
    return path


#: CPU threads for PyTorch and for gpuconv's Numba kernels while training on the CPU. These
#: networks are small (a step is a few milliseconds of work): on a busy 2-core machine two
#: threads in each runtime made a step 6-37x slower than one thread (the threads wait for
#: each other at every parallel region), so one thread is the default.
DEFAULT_CPU_THREADS = 1


class _Threads:
    """Set PyTorch's and Numba's thread counts for the CPU runs; restore them afterwards."""

    def __init__(self, threads):
        self.threads = threads

    def __enter__(self):
        import numba
        import torch

        self.saved = (torch.get_num_threads(), numba.get_num_threads())
        if self.threads is not None:
            torch.set_num_threads(self.threads)
            numba.set_num_threads(min(self.threads, numba.config.NUMBA_NUM_THREADS))
        return self

    def __exit__(self, *exc):
        import numba
        import torch

        torch.set_num_threads(self.saved[0])
        numba.set_num_threads(self.saved[1])
        return False


def _resolve_device(device):
    from .device import select_device

    resolved = select_device(device=device)
    import torch
    if resolved == "cuda" and not torch.cuda.is_available():
        if device == "cuda":
            raise ValueError("device='cuda' was requested but this PyTorch build sees no CUDA "
                             "GPU; install a CUDA build of PyTorch or use --device cpu")
        resolved = "cpu"
    return resolved


# ----------------------------------------------------------------------------- the runs

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
        one record per (dataset, variant, seed) with ``dataset``, ``variant``, ``seed``,
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
    check_output_path(json_path, "JSON output")
    check_output_path(plot_path, "plot")
    if plot_path is not None:
        from .bench import plot as bench_plot
        try:
            bench_plot.require_matplotlib()
        except ImportError as exc:
            raise ImportError(f"--plot needs matplotlib ({exc}); install it with: "
                              f"{INSTALL_HINT}") from exc
    _need("torch", "PyTorch")
    _need("sklearn", "scikit-learn")
    device = _resolve_device(device)

    if device == "cpu" and threads is None:
        threads = DEFAULT_CPU_THREADS
    with _Threads(threads if device == "cpu" else None):
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

    from .appkit import load_average, machine_info

    machine = machine_info(device, torch, None, "float32")
    machine["load_average_start"] = load_average()
    machine["torch_threads"] = torch.get_num_threads()
    machine["numba_threads"] = numba.get_num_threads()
    machine["command"] = command
    machine["quick"] = bool(quick)
    reporter = _Progress(progress, enabled=progress is not None)
    start = time.perf_counter()
    records = []
    for name in datasets:
        net = network(name)
        default = PLANS[name][1 if quick else 0]
        plan = Plan(epochs or default.epochs, batch or default.batch, lr or default.lr)
        for run_seed in range(seed, seed + seeds):
            data = load_data(name, seed=run_seed, quick=quick)
            for var in variants:
                base = {"dataset": name, "variant": var, "seed": run_seed, "device": device,
                        "epochs": plan.epochs, "batch": plan.batch, "lr": plan.lr,
                        "sizes": data.sizes()}
                reason = dense_skip_reason(net, device) if var == "dense" else None
                if reason is not None:
                    reporter.note(f"{name} {var} seed {run_seed}: {reason}")
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


def write_json(result, path):
    import json

    with open(path, "w") as handle:
        json.dump(result, handle, indent=1)
        handle.write("\n")


# ----------------------------------------------------------------------------- reporting

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


_COLORS = {"shared": "#1f77b4", "unshared": "#ff7f0e", "dense": "#2ca02c"}


def plot(result, path):
    """Learning curves: test accuracy against epoch and against training time, per dataset
    (mean over seeds, the band from the lowest to the highest seed)."""
    from .bench.plot import require_matplotlib

    require_matplotlib()
    import matplotlib.pyplot as plt

    records = [r for r in result["records"] if r["curve"]]
    datasets = list(dict.fromkeys(r["dataset"] for r in records))
    fig, axes = plt.subplots(max(1, len(datasets)), 2, figsize=(12, 4.2 * max(1, len(datasets))),
                             squeeze=False)
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


# ----------------------------------------------------------------------------- command

def _nonnegative_int(text):
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def add_arguments(parser):
    """Add the ``train`` options to ``parser``."""
    parser.add_argument("--variant", choices=VARIANTS + ("all",), default="all",
                        help="shared (gpuconv Conv2d), unshared (LocallyConnected2d), dense "
                             "(first layer fully connected) or all (default)")
    parser.add_argument("--dataset", choices=DATASETS + ("all",), default="all",
                        help="digits (8x8, 10 labels), sample-images (20x20 crops of two "
                             "photos, 2 labels) or all (default)")
    parser.add_argument("--epochs", type=positive_int, metavar="N",
                        help="epochs (default per dataset: digits "
                             f"{PLANS['digits'][0].epochs}, sample-images "
                             f"{PLANS['sample-images'][0].epochs}; fewer with --quick)")
    parser.add_argument("--batch", type=positive_int, metavar="N",
                        help=f"minibatch size (default {PLANS['digits'][0].batch})")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                        help="where to train (default: auto, as gpuconv.select_device)")
    parser.add_argument("--seed", type=_nonnegative_int, default=0,
                        help="first seed: fixes the split, the initial weights and the batch "
                             "order (default 0)")
    parser.add_argument("--seeds", type=positive_int, default=1, metavar="N",
                        help="run N seeds (seed, seed+1, ...) and report mean ± spread "
                             "(default 1)")
    parser.add_argument("--json", metavar="PATH", help="write the machine and the records")
    parser.add_argument("--plot", metavar="PATH",
                        help="write a PNG of the learning curves (needs matplotlib)")
    parser.add_argument("--threads", type=positive_int, metavar="N",
                        help=f"CPU threads for PyTorch and the kernels (default "
                             f"{DEFAULT_CPU_THREADS}: these networks are too small to gain "
                             "from more, and lose much on a busy machine)")
    parser.add_argument("--quick", action="store_true",
                        help="fewer epochs and crops: about a minute on a 2-core CPU")
    return parser


def _argv_of(args):
    words = ["gpuconv train", f"--dataset {args.dataset}", f"--variant {args.variant}"]
    for flag in ("epochs", "batch"):
        if getattr(args, flag):
            words.append(f"--{flag} {getattr(args, flag)}")
    words.append(f"--device {args.device}")
    if args.seed:
        words.append(f"--seed {args.seed}")
    if args.seeds != 1:
        words.append(f"--seeds {args.seeds}")
    if args.threads:
        words.append(f"--threads {args.threads}")
    if args.quick:
        words.append("--quick")
    return " ".join(words)


def run(args):
    """The ``train`` command. Returns the exit status (2: the options cannot work)."""
    try:  # unwritable outputs are argument errors, reported before any training
        check_output_path(args.json, "JSON output")
        check_output_path(args.plot, "plot")
    except ValueError as exc:
        print(f"gpuconv train: error: {exc}", file=sys.stderr)
        return 2
    try:  # a device that is not there is an argument error too (one line, exit 2)
        _resolve_device(args.device)
    except ImportError:
        pass  # PyTorch missing: reported below, with the extra to install
    except ValueError as exc:
        print(f"gpuconv train: error: {exc}", file=sys.stderr)
        return 2
    try:
        result = train(args.dataset, args.variant, epochs=args.epochs, batch=args.batch,
                       device=args.device, seed=args.seed, seeds=args.seeds, quick=args.quick,
                       json_path=args.json, plot_path=args.plot, threads=args.threads,
                       command=_argv_of(args))
    except ImportError as exc:
        print(f"gpuconv: error: {exc}", file=sys.stderr)
        return 2
    print(format_tables(result))
    machine = result["machine"]
    print(f"{len(result['records'])} runs in {machine['wall_s']:.0f} s on {machine['device']} "
          f"(load average {machine['load_average_start']} -> {machine['load_average_end']})")
    for flag, path in (("json", args.json), ("plot", args.plot)):
        if path:
            print(f"wrote {path}")
    return 0


def main(argv=None):
    parser = argparse.ArgumentParser(prog="gpuconv train", description=DESCRIPTION)
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
