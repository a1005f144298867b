"""The numbers of ``gpuconv bench`` and its scripts, each written once.

- what one layer costs, per pass (:data:`PASSES`: the forward, the backward = both
  gradients, a training step = both): :func:`param_count`, :func:`pass_flops`,
  :func:`min_bytes` and, per gradient, :func:`grad_bytes` (the forward's FLOPs are
  :attr:`gpuconv.geometry.ConvGeometry.flops`);
- summaries of timings: :func:`quantile`, :func:`summarize`, :func:`paired_ratios`,
  :func:`geomean`, :func:`rate`;
- how close two outputs must be: :data:`TOLERANCE`, :func:`half_tolerance`,
  :func:`tolerance`, :func:`within_tolerance`, and the length of the sums behind each
  result, :func:`reduction_terms`;
- :func:`format_bytes` for what is printed.

Importing this module imports nothing beyond the standard library and gpuconv's own
parameter counts.
"""

from __future__ import annotations

import math
import sys

from ..params import conv2d_param_count, local_conv2d_param_count, tiled_conv2d_param_count

__all__ = ["TOLERANCE", "half_tolerance", "tolerance", "reduction_terms",
           "within_tolerance", "PASSES", "PASS_FLOPS", "param_count",
           "pass_flops", "min_bytes", "grad_bytes", "quantile",
           "summarize", "paired_ratios", "geomean", "rate", "format_bytes"]

#: Largest accepted ``max|result - reference|`` relative to the magnitude bound
#: ``max(reference(|x|, |w|, |b|))`` (the error of a floating-point sum is bounded by its
#: terms' absolute values), per dtype name.
TOLERANCE = {"float32": 1e-5, "float64": 1e-12}



def half_tolerance(terms):
    """Relative tolerance of a float16 result accumulated in float32 over ``terms`` products:
    one rounding of the result to float16 (half an ulp, 2**-11, taken twice for margin) plus
    at most ``terms`` float32 roundings of partial sums (2**-24 each, taken twice), relative
    to the magnitude bound. float16 stores 11 significant bits, so no constant fits every
    reduction length."""
    return 2.0 ** -10 + terms * 2.0 ** -23


def tolerance(dtype_name, terms=None):
    """The relative tolerance of ``dtype_name`` results: :data:`TOLERANCE`, or for float16
    :func:`half_tolerance` of ``terms`` (required then)."""
    if dtype_name == "float16":
        if terms is None:
            raise ValueError("float16's tolerance depends on the reduction length: give terms")
        return half_tolerance(terms)
    return TOLERANCE[dtype_name]


def within_tolerance(err, bound, dtype_name, terms=None):
    """``err <= tolerance(dtype_name, terms) * bound`` (a zero bound accepts only a zero
    error); ``terms``, the length of the reduction behind each value, only matters for
    float16."""
    return err <= tolerance(dtype_name, terms) * max(bound, sys.float_info.min)


def _slot_positions(geom, tiles):
    """The most output positions one kernel slot of a ``tiles = (T_h, T_w)`` tiled
    convolution serves (either tiling): ``ceil(H_out / T_h) ceil(W_out / T_w)``."""
    return -(-geom.out_height // tiles[0]) * -(-geom.out_width // tiles[1])


def reduction_terms(op, geom, pass_name="forward", tiles=None):
    """The most products one result value of ``pass_name`` sums (at most; padding and stride
    leave fewer for some values), over every result of the pass:

    - forward: ``(C_in/g) kH kW`` per output value (the bias adds one);
    - input gradient: ``(C_out/g) kH kW``; weight gradient: ``N H_out W_out`` for ``conv2d``
      (a weight is used at every position), ``N`` for ``local_conv2d``, ``N`` times the
      positions of a slot for ``tiled_conv2d`` (``tiles = (T_h, T_w)``);
    - step: the forward, both gradients and the bias gradient (``N H_out W_out`` per
      channel, ``N`` per position for ``local_conv2d``: as many as its weight gradient).
    """
    window = geom.kernel_height * geom.kernel_width
    forward = geom.in_channels_per_group * window + 1
    if pass_name == "forward":
        return forward
    if op == "conv2d":
        uses = geom.batch * geom.out_height * geom.out_width
    elif op == "tiled_conv2d":
        uses = geom.batch * _slot_positions(geom, tiles)
    else:
        uses = geom.batch
    backward = max(geom.out_channels_per_group * window, uses)
    if pass_name == "backward":
        return backward
    if pass_name == "step":
        return max(forward, backward)  # the bias gradient sums as the weight gradient
    raise ValueError(f"pass_name must be one of {PASSES}, got {pass_name!r}")


# ----------------------------------------------------------------------------- counts

#: What a benchmark pass times: ``"forward"`` (``y`` from ``x``, the weights and the bias),
#: ``"backward"`` (the input gradient and the weight gradient from ``x``, the weights and
#: ``gy``) and ``"step"`` (one training step of a layer: the forward, then the input, weight
#: and bias gradients).
PASSES = ("forward", "backward", "step")

#: FLOPs of a pass in units of the forward's: the input gradient and the weight gradient
#: each take exactly the forward's multiply-adds (every product ``x * w`` of the forward is
#: once ``gy * w`` in the one and once ``gy * x`` in the other). Bias sums are not counted.
PASS_FLOPS = {"forward": 1, "backward": 2, "step": 3}


def param_count(op, geom, bias="channel", tiles=None):
    """Learnable numbers of the layer as the benchmark times it: ``conv2d``, ``local_conv2d``
    or ``tiled_conv2d`` (``tiles = (T_h, T_w)`` kernel slots) on ``geom`` (a
    :class:`~gpuconv.geometry.ConvGeometry`), one bias per output channel
    (``bias="position"``: one per output value, ``local_conv2d`` only, as
    ``gpuconv.torch.LocallyConnected2d`` has it). A :class:`gpuconv.params.ParamCount`."""
    kernel = (geom.kernel_height, geom.kernel_width)
    if op == "conv2d":
        return conv2d_param_count(geom.in_channels, geom.out_channels, kernel, geom.groups, True)
    if op == "tiled_conv2d":
        return tiled_conv2d_param_count(geom.in_channels, geom.out_channels, kernel, tiles,
                                        geom.groups, None if bias is None else "channel")
    return local_conv2d_param_count(geom.in_channels, geom.out_channels, kernel,
                                    (geom.out_height, geom.out_width), geom.groups, bias)


def pass_flops(geom, pass_name="forward"):
    """FLOPs of one ``pass_name`` (:data:`PASSES`) on ``geom``: :data:`PASS_FLOPS` times
    the forward's ``2 N C_out H_out W_out (C_in/groups) kH kW`` (the same for both ops)."""
    return PASS_FLOPS[pass_name] * geom.flops


def _sizes(op, geom, tiles=None):
    """Elements of ``(x, weights, y)``."""
    inputs = geom.batch * geom.in_channels * geom.in_height * geom.in_width
    outputs = geom.batch * geom.out_channels * geom.out_height * geom.out_width
    bias = None if op == "local_conv2d" else "channel"
    return inputs, param_count(op, geom, bias, tiles).weights, outputs


def grad_bytes(op, which, geom, itemsize, tiles=None):
    """Fewest bytes one gradient call moves, each array read or written once:

    - ``which="input"``: read the weights and ``gy``, write ``gx`` (input-sized);
    - ``which="weight"``: read ``x`` and ``gy``, write ``gw`` (weight-sized).

    For ``local_conv2d`` the weights (or their gradient) dominate: both calls stream
    weight-sized data once, which is why they are compared with the copy bandwidth.
    """
    inputs, weights, outputs = _sizes(op, geom, tiles)
    if which == "input":
        return (weights + outputs + inputs) * itemsize
    if which == "weight":
        return (inputs + outputs + weights) * itemsize
    raise ValueError(f"which must be 'input' or 'weight', got {which!r}")


def min_bytes(op, geom, itemsize, pass_name="forward", bias="channel", tiles=None):
    """Fewest bytes one ``pass_name`` moves (``tiles``: a ``tiled_conv2d``'s ``(T_h, T_w)``,
    whose weights are ``T_h T_w`` kernels).

    - ``"forward"``: input, weights and biases read once, output written once;
    - ``"backward"``: the two gradient calls, each as :func:`grad_bytes` (``gy`` is read by
      both: they are separate calls);
    - ``"step"``: the forward, the backward, and the bias gradient written.
    """
    inputs, _, outputs = _sizes(op, geom, tiles)
    params = param_count(op, geom, bias, tiles).total
    forward = (inputs + params + outputs) * itemsize
    if pass_name == "forward":
        return forward
    backward = (grad_bytes(op, "input", geom, itemsize, tiles)
                + grad_bytes(op, "weight", geom, itemsize, tiles))
    if pass_name == "backward":
        return backward
    if pass_name == "step":
        return forward + backward + param_count(op, geom, bias, tiles).biases * itemsize
    raise ValueError(f"pass_name must be one of {PASSES}, got {pass_name!r}")


# ----------------------------------------------------------------------------- summaries

def quantile(sorted_samples, q):
    """Linearly interpolated quantile ``q`` (0 to 1) of already sorted samples."""
    if len(sorted_samples) == 1:
        return sorted_samples[0]
    position = q * (len(sorted_samples) - 1)
    low = int(position)
    high = min(low + 1, len(sorted_samples) - 1)
    return sorted_samples[low] + (sorted_samples[high] - sorted_samples[low]) * (position - low)


def summarize(samples):
    """``{"median", "q1", "q3", "min", "max", "count"}`` of ``samples``, or ``None`` if empty."""
    ordered = sorted(samples)
    if not ordered:
        return None
    return {"median": quantile(ordered, 0.5), "q1": quantile(ordered, 0.25),
            "q3": quantile(ordered, 0.75), "min": ordered[0], "max": ordered[-1],
            "count": len(ordered)}


def paired_ratios(numerators, denominators):
    """:func:`summarize` of ``numerators[i] / denominators[i]``.

    For timings taken in alternating bursts, sample ``i`` of one implementation and sample
    ``i`` of the other ran in the same round, minutes apart at most: their ratio cancels
    what the machine was doing then, and the spread of the ratios is the spread of the
    comparison itself. Pairs stop at the shorter list; ``None`` without any pair.
    """
    return summarize([a / b for a, b in zip(numerators, denominators) if b > 0])


def geomean(values):
    """Geometric mean of positive numbers (``None`` for none)."""
    values = list(values)
    if not values:
        return None
    return math.exp(sum(map(math.log, values)) / len(values))


def rate(amount, seconds, unit=1e9):
    """``amount / seconds / unit`` (GFLOP/s or GB/s with the default unit); ``None`` without
    a positive time."""
    if not seconds or seconds <= 0:
        return None
    return amount / seconds / unit


# ----------------------------------------------------------------------------- formatting

def format_bytes(nbytes):
    """``"1.23 GB"`` from 100 MB up, else ``"4.5 MB"`` (decimal units, as the tables)."""
    return f"{nbytes / 1e9:.2f} GB" if nbytes >= 1e8 else f"{nbytes / 1e6:.1f} MB"
