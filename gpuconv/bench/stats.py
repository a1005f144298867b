"""The numbers of ``gpuconv bench`` and its scripts, each written once.

- what one layer costs: :func:`param_count`, :func:`min_bytes` (its FLOPs are
  :attr:`gpuconv.geometry.ConvGeometry.flops`);
- summaries of timings: :func:`quantile`, :func:`summarize`, :func:`paired_ratios`,
  :func:`geomean`, :func:`rate`;
- how close two outputs must be: :data:`TOLERANCE`, :func:`within_tolerance`;
- :func:`format_bytes` for what is printed.

Importing this module imports nothing beyond the standard library and gpuconv's own
parameter counts.
"""

from __future__ import annotations

import math
import sys

from ..params import conv2d_param_count, local_conv2d_param_count

__all__ = ["TOLERANCE", "within_tolerance", "param_count", "min_bytes", "quantile",
           "summarize", "paired_ratios", "geomean", "rate", "format_bytes"]

#: Largest accepted ``max|result - reference|`` relative to the magnitude bound
#: ``max(reference(|x|, |w|, |b|))`` (the error of a floating-point sum is bounded by its
#: terms' absolute values), per dtype name.
TOLERANCE = {"float32": 1e-5, "float64": 1e-12}


def within_tolerance(err, bound, dtype_name):
    """``err <= TOLERANCE[dtype_name] * bound`` (a zero bound accepts only a zero error)."""
    return err <= TOLERANCE[dtype_name] * max(bound, sys.float_info.min)


# ----------------------------------------------------------------------------- counts

def param_count(op, geom):
    """Learnable numbers of the layer as the benchmark times it: ``conv2d`` or
    ``local_conv2d`` on ``geom`` (a :class:`~gpuconv.geometry.ConvGeometry`), one bias per
    output channel. A :class:`gpuconv.params.ParamCount`."""
    kernel = (geom.kernel_height, geom.kernel_width)
    if op == "conv2d":
        return conv2d_param_count(geom.in_channels, geom.out_channels, kernel, geom.groups, True)
    return local_conv2d_param_count(geom.in_channels, geom.out_channels, kernel,
                                    (geom.out_height, geom.out_width), geom.groups, "channel")


def min_bytes(op, geom, itemsize):
    """Fewest bytes one call moves: input, weights and biases read once, output written once."""
    inputs = geom.batch * geom.in_channels * geom.in_height * geom.in_width
    outputs = geom.batch * geom.out_channels * geom.out_height * geom.out_width
    return (inputs + param_count(op, geom).total + outputs) * itemsize


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
