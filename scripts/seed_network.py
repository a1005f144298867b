"""The lecture note's example network, built twice: with shared and with unshared conv layers.

    RGB input -> conv 5 x 5 x 3 x 10 -> ReLU -> conv 3 x 3 x 10 x 5 -> ReLU -> flatten
              -> fully connected to 2 labels

Both versions have the same geometry; the shared one uses :func:`gpuconv.conv2d` (one kernel
per output map), the unshared one :func:`gpuconv.local_conv2d` (a kernel per output position,
one bias per output map). The script prints the parameters of every layer for both, and
times a forward pass of each on every device present.

The input size. The note assumes the flatten gives ``H2 x W2 x 5 = 1024`` values; with 5 maps
that cannot be a square (1024 / 5 is not an integer), so the 1024 is illustrative. Here the
input is ``size x size`` (default 20): 20 -> 16 (5 x 5, no padding) -> 14 (3 x 3), and the
flatten has 14 x 14 x 5 = 980 values; the fully connected layer takes exactly what the flatten
gives (980 -> 2), not the note's 1024. The ReLUs are ours (the note does not mention any);
they add no parameters.

Run: ``python scripts/seed_network.py [--size 20] [--batch 8] [--repeat 20]``.
"""

from __future__ import annotations

import argparse
import sys

import numpy as np

import gpuconv
from gpuconv import get_conv_outsize
from gpuconv.bench import peers
from gpuconv.bench.stats import summarize
from gpuconv.appkit import positive_int
from gpuconv.device import cuda_available
from gpuconv.params import (conv2d_param_count, fully_connected_param_count,
                            local_conv2d_param_count)

#: (name, kernel size, input channels, output channels) of the two conv layers, as the note.
CONV_LAYERS = (("conv1", 5, 3, 10), ("conv2", 3, 10, 5))
LABELS = 2
DEFAULT_SIZE = 20


def layer_shapes(size=DEFAULT_SIZE):
    """Per conv layer: name, k, c_in, c_out, input size, output size; and the flatten size."""
    shapes = []
    for name, k, c_in, c_out in CONV_LAYERS:
        out = get_conv_outsize(size, k, 1, 0)
        if out < 1:
            raise ValueError(f"input size too small: {name} ({k}x{k}) gives output {out}")
        shapes.append({"name": name, "k": k, "c_in": c_in, "c_out": c_out,
                       "in_size": size, "out_size": out})
        size = out
    flatten = size * size * CONV_LAYERS[-1][3]
    return shapes, flatten


def param_counts(size=DEFAULT_SIZE):
    """Rows ``(layer, description, shared ParamCount, unshared ParamCount)`` and the totals."""
    shapes, flatten = layer_shapes(size)
    rows = []
    for s in shapes:
        shared = conv2d_param_count(s["c_in"], s["c_out"], s["k"])
        unshared = local_conv2d_param_count(s["c_in"], s["c_out"], s["k"],
                                            (s["out_size"], s["out_size"]), bias="channel")
        description = (f"{s['k']}x{s['k']}x{s['c_in']}x{s['c_out']}, "
                       f"{s['in_size']}x{s['in_size']} -> {s['out_size']}x{s['out_size']}")
        rows.append((s["name"], description, shared, unshared))
    fc = fully_connected_param_count(flatten, LABELS)
    rows.append(("fc", f"{flatten} -> {LABELS}", fc, fc))
    total_shared = sum(r[2].total for r in rows)
    total_unshared = sum(r[3].total for r in rows)
    return rows, total_shared, total_unshared


def build_network(shared, size=DEFAULT_SIZE, dtype=np.float32, seed=0):
    """Random weights: a list of conv layers ``(weight, bias)`` and ``(fc_weight, fc_bias)``."""
    rng = np.random.default_rng(seed)
    shapes, flatten = layer_shapes(size)
    convs = []
    for s in shapes:
        fan_in = s["c_in"] * s["k"] ** 2
        if shared:
            shape = (s["c_out"], s["c_in"], s["k"], s["k"])
        else:
            shape = (s["c_out"], s["out_size"], s["out_size"], s["c_in"], s["k"], s["k"])
        weight = (rng.standard_normal(shape) / np.sqrt(fan_in)).astype(dtype)
        convs.append((weight, np.zeros(s["c_out"], dtype=dtype)))
    fc_weight = (rng.standard_normal((LABELS, flatten)) / np.sqrt(flatten)).astype(dtype)
    return {"shared": shared, "convs": convs, "fc": (fc_weight, np.zeros(LABELS, dtype=dtype))}


def untie(network, size=DEFAULT_SIZE):
    """The unshared network whose every position uses the shared network's kernel."""
    shapes, _ = layer_shapes(size)
    convs = []
    for (weight, bias), s in zip(network["convs"], shapes):
        out = s["out_size"]
        local = np.broadcast_to(weight[:, None, None], (weight.shape[0], out, out)
                                + weight.shape[1:])
        convs.append((np.ascontiguousarray(local), bias))
    return {"shared": False, "convs": convs, "fc": network["fc"]}


def _ops(device):
    """relu, fully connected and array-transfer functions for ``device`` (None if missing)."""
    if device == "cpu":
        return {"relu": lambda a: np.maximum(a, 0),
                "fc": lambda flat, w, b: flat @ w.T + b,
                "put": lambda a: a, "sync": lambda: None}
    try:
        import torch
    except ImportError:
        return None
    if not torch.cuda.is_available():
        return None
    return {"relu": lambda a: torch.relu(torch.as_tensor(a, device="cuda")),
            "fc": lambda flat, w, b: flat @ w.T + b,
            "put": lambda a: torch.from_numpy(np.ascontiguousarray(a)).cuda(),
            "sync": torch.cuda.synchronize}


def forward(network, x, device="cpu", ops=None):
    """Logits ``(N, 2)`` of ``x`` ``(N, 3, size, size)`` through ``network`` on ``device``."""
    ops = ops or _ops(device)
    conv = gpuconv.conv2d if network["shared"] else gpuconv.local_conv2d
    h = x
    for weight, bias in network["convs"]:
        h = ops["relu"](conv(h, weight, bias, device=device))
    flat = h.reshape(h.shape[0], -1)
    fc_weight, fc_bias = network["fc"]
    return ops["fc"](flat, fc_weight, fc_bias)


def time_forward(network, x, device, repeat=20):
    """(median seconds, first-call seconds) of a forward pass, or ``None`` if unavailable.

    Timed as ``gpuconv bench`` times a call (:class:`gpuconv.bench.peers.Backend`: the wall
    clock on the CPU, CUDA events on a GPU), after one untimed pass.
    """
    ops = _ops(device)
    if ops is None:
        return None
    backend = peers.Backend(device, peers.load_torch() if device == "cuda" else None)
    net = {"shared": network["shared"], "fc": tuple(ops["put"](a) for a in network["fc"]),
           "convs": [tuple(ops["put"](a) for a in layer) for layer in network["convs"]]}
    x = ops["put"](x)

    def call():
        return forward(net, x, device, ops)
    first, _ = backend.time_first_call(call)
    call()
    return summarize(backend.time_calls(call, repeat))["median"], first


def format_params(size=DEFAULT_SIZE):
    rows, total_shared, total_unshared = param_counts(size)
    _, flatten = layer_shapes(size)
    lines = [f"The note's network on a {size}x{size} RGB input "
             f"(flatten: {flatten} values; the note's 1024 is illustrative)",
             f"  {'layer':<6} {'geometry':<28} {'shared':>12} {'unshared':>12} {'ratio':>9}"]
    for name, description, shared, unshared in rows:
        ratio = unshared.total / shared.total
        lines.append(f"  {name:<6} {description:<28} {shared.total:>12,} {unshared.total:>12,} "
                     f"{ratio:>8,.0f}x")
    lines.append(f"  {'total':<6} {'':<28} {total_shared:>12,} {total_unshared:>12,} "
                 f"{total_unshared / total_shared:>8,.0f}x")
    lines.append("  (weights + biases; one bias per output map in both versions; ReLU after "
                 "each conv adds none)")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", type=positive_int, default=DEFAULT_SIZE,
                        help="input height = width")
    parser.add_argument("--batch", type=positive_int, default=8)
    parser.add_argument("--repeat", type=positive_int, default=20)
    args = parser.parse_args(argv)
    try:
        layer_shapes(args.size)
    except ValueError as exc:
        parser.error(str(exc))
    print(format_params(args.size))
    x = np.random.default_rng(1).standard_normal((args.batch, 3, args.size, args.size)).astype(
        np.float32)
    devices = ["cpu"] + (["cuda"] if cuda_available() else [])
    print(f"\nForward pass, batch {args.batch}, float32 (median of {args.repeat}; "
          "first call includes JIT compilation or loading it):")
    for device in devices:
        for shared in (True, False):
            network = build_network(shared, args.size)
            timing = time_forward(network, x, device, args.repeat)
            kind = "shared  " if shared else "unshared"
            if timing is None:
                print(f"  {device:<4} {kind}  skipped: the CUDA forward pass needs PyTorch "
                      "with CUDA for ReLU and the fully connected layer")
                continue
            median, first = timing
            print(f"  {device:<4} {kind}  {median * 1e3:9.3f} ms   (first call "
                  f"{first * 1e3:.1f} ms)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
