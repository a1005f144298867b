"""The networks of ``gpuconv train``: their geometry per dataset, the variants as PyTorch
modules, and their parameter counts (checked against :mod:`gpuconv.params`)."""

from __future__ import annotations

import math
from dataclasses import dataclass

from ..params import (conv2d_param_count, fully_connected_param_count,
                      local_conv2d_param_count, tiled_conv2d_param_count)

DATASETS = ("digits", "sample-images")


#: The points of the sharing dial between ``shared`` and ``unshared``: variant name ->
#: ``(tiling, (T_h, T_w))``; both conv layers are :class:`gpuconv.torch.TiledConv2d` with
#: those tiles (a kernel and a bias per map and slot).
DIAL = {
    "blocks-2x2": ("blocks", (2, 2)),
    "periodic-2x2": ("periodic", (2, 2)),
    "blocks-4x4": ("blocks", (4, 4)),
}


#: The networks, from the most shared to the least: the dial's points sit between the shared
#: and the unshared network; dense has no sharing and no locality in its first layer.
VARIANTS = ("shared",) + tuple(DIAL) + ("unshared", "dense")


def dial_point(variant):
    """``{"tiles": [T_h, T_w], "tiling": ...}`` of a variant's conv layers: ``[1, 1]`` (and
    no tiling: either is a convolution) for ``shared``, the :data:`DIAL` point of a tiled
    variant, ``None`` for ``unshared`` (one slot per output position, a different count in
    each layer) and ``dense``."""
    _check_choice(variant, VARIANTS, "variant")
    if variant == "shared":
        return {"tiles": [1, 1], "tiling": None}
    if variant in DIAL:
        tiling, tiles = DIAL[variant]
        return {"tiles": list(tiles), "tiling": tiling}
    return {"tiles": None, "tiling": None}


#: Bytes per weight of the dense first layer while training (float32 weight, its gradient and
#: Adam's two moments).
BYTES_PER_TRAINED_WEIGHT = 4 * 4


#: Train ``dense`` only when its first layer needs at most this fraction of the free memory.
MEMORY_FRACTION = 0.5


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
    from ..geometry import get_conv_outsize

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
        elif variant in DIAL:
            tiling, tiles = DIAL[variant]
            rows.append((layer.name, f"tiled conv ({tiling} {tiles[0]}x{tiles[1]})",
                         layer.description,
                         tiled_conv2d_param_count(layer.c_in, layer.c_out, layer.kernel, tiles,
                                                  bias="slot")))
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
    from ..device import host_memory_available
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

    from .. import torch as gt

    _check_choice(variant, VARIANTS, "variant")
    torch.manual_seed(seed)
    layers = []
    for index, layer in enumerate(net.convs):
        if variant == "dense" and index == 0:
            layers += [nn.Flatten(), nn.Linear(net.input_features, net.first_neurons),
                       nn.Unflatten(1, (layer.c_out,) + layer.out_size)]
        elif variant == "shared":
            layers.append(gt.Conv2d(layer.c_in, layer.c_out, layer.kernel))
        elif variant in DIAL:
            tiling, tiles = DIAL[variant]
            layers.append(gt.TiledConv2d(layer.c_in, layer.c_out, layer.kernel, tiles,
                                         tiling=tiling))
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
