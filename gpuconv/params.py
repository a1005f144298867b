"""Parameter counts: the lecture note's arithmetic, and counters for real layers.

Two things live here:

- :func:`note_arithmetic` reproduces the worked example of the note on local perception and
  weight sharing (a 500 x 500 image, 10^5 neurons, a 10 x 10 receptive field, 64 filters) and
  :func:`format_note_arithmetic` prints it as a table;
- :func:`note_dial` and :func:`format_note_dial` put the ground between shared and
  locally connected on the same example: ``T x T`` kernel slots shared by the neurons (a
  tiled convolution, :func:`gpuconv.tiled_conv2d`), from one slot to one per neuron;
- :func:`conv2d_param_count`, :func:`local_conv2d_param_count`,
  :func:`tiled_conv2d_param_count` and :func:`fully_connected_param_count` count the
  learnable numbers of one layer of each kind.

Notation (as in :mod:`gpuconv.geometry`)::

    c_I, c_O   input, output channels       g          groups
    k_H, k_W   kernel height, width         h_O, w_O   output height, width

    shared (conv2d):          weights = c_O * (c_I / g) * k_H * k_W
    unshared (local_conv2d):  weights = c_O * h_O * w_O * (c_I / g) * k_H * k_W
    tiled (tiled_conv2d):     weights = c_O * T_h * T_w * (c_I / g) * k_H * k_W
    fully connected:          weights = in_features * out_features

The output size of a layer comes from :func:`gpuconv.get_conv_outsize`.
"""

from __future__ import annotations

from fractions import Fraction
from typing import NamedTuple

from .geometry import _is_int, pair

__all__ = ["ParamCount", "note_arithmetic", "format_note_arithmetic", "note_dial",
           "format_note_dial", "conv2d_param_count", "local_conv2d_param_count",
           "tiled_conv2d_param_count", "fully_connected_param_count", "LOCAL_BIAS_MODES",
           "TILED_BIAS_MODES"]

#: Accepted values of ``bias`` in :func:`local_conv2d_param_count`.
LOCAL_BIAS_MODES = (None, "channel", "position")

#: Accepted values of ``bias`` in :func:`tiled_conv2d_param_count`.
TILED_BIAS_MODES = (None, "channel", "slot")


class ParamCount(NamedTuple):
    """Learnable numbers of one layer: ``weights`` and ``biases`` (Python ints).

    >>> count = ParamCount(weights=750, biases=10)
    >>> count.total
    760
    """

    weights: int
    biases: int

    @property
    def total(self):
        """``weights + biases``."""
        return self.weights + self.biases


def _positive_int(value, name):
    if not _is_int(value):
        raise TypeError(f"{name} must be a positive int, got {value!r}")
    value = int(value)
    if value < 1:
        raise ValueError(f"{name} must be >= 1, got {value}")
    return value


def _check_bool(value, name):
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be True or False, got {value!r}")
    return value


def _channels_per_group(in_channels, out_channels, groups):
    in_channels = _positive_int(in_channels, "in_channels")
    out_channels = _positive_int(out_channels, "out_channels")
    groups = _positive_int(groups, "groups")
    if in_channels % groups:
        raise ValueError(f"groups={groups} must divide in_channels={in_channels}")
    if out_channels % groups:
        raise ValueError(f"groups={groups} must divide out_channels={out_channels}")
    return in_channels // groups, out_channels


def note_arithmetic(height=500, width=500, neurons=100_000, field=(10, 10), filters=64):
    """The note's worked example: weights of one layer, fully vs locally connected vs shared.

    A ``height x width`` input feeds a layer of ``neurons`` neurons. Fully connected, each
    neuron has one weight per input pixel; locally connected, one weight per pixel of its
    ``field`` (its receptive field, ``KH x KW``); with weight sharing, one ``KH x KW`` kernel
    serves every position, and ``filters`` kernels detect ``filters`` different features.
    Biases are the same in every case and are left out, as in the note.

    Args:
        height, width: input size in pixels (``H``, ``W``).
        neurons: neurons in the next layer (``M``).
        field: receptive field, an int or a pair ``(KH, KW)``.
        filters: number of shared kernels (``F``).

    Returns:
        A dict. Counts are exact Python ints:

        - ``fully_connected`` = ``H * W * M``
        - ``locally_connected`` = ``KH * KW * M``
        - ``shared_per_filter`` = ``KH * KW``
        - ``shared_total`` = ``KH * KW * F``

        ratios are floats, with the exact fraction as a string:

        - ``local_vs_full`` = ``locally_connected / fully_connected``
          (and ``local_vs_full_fraction``, e.g. ``"1/2500"``)
        - ``sharing_reduction`` = ``locally_connected / shared_per_filter``

        and the inputs: ``height``, ``width``, ``pixels`` (``H * W``), ``neurons``,
        ``field`` (``[KH, KW]``), ``filters``.

    Raises:
        TypeError: an argument is not an int (or ``field`` not an int or a pair of ints).
        ValueError: an argument is below 1, or the field is larger than the image (a
            neuron cannot see more pixels than there are).

    >>> numbers = note_arithmetic()
    >>> numbers["fully_connected"], numbers["locally_connected"]
    (25000000000, 10000000)
    >>> numbers["shared_per_filter"], numbers["shared_total"]
    (100, 6400)
    >>> numbers["local_vs_full"], numbers["local_vs_full_fraction"], numbers["sharing_reduction"]
    (0.0004, '1/2500', 100000.0)
    >>> note_arithmetic(height=28, width=28, field=(29, 3))
    Traceback (most recent call last):
    ...
    ValueError: the receptive field (29 x 3) is larger than the image (28 x 28); a field covers at most the whole image
    """
    height = _positive_int(height, "height")
    width = _positive_int(width, "width")
    neurons = _positive_int(neurons, "neurons")
    field_height, field_width = pair(field, "field", 1)
    filters = _positive_int(filters, "filters")
    if field_height > height or field_width > width:
        raise ValueError(
            f"the receptive field ({field_height} x {field_width}) is larger than the image "
            f"({height} x {width}); a field covers at most the whole image")

    pixels = height * width
    fully_connected = pixels * neurons
    locally_connected = field_height * field_width * neurons
    shared_per_filter = field_height * field_width
    shared_total = shared_per_filter * filters
    local_vs_full = Fraction(locally_connected, fully_connected)
    return {
        "height": height,
        "width": width,
        "pixels": pixels,
        "neurons": neurons,
        "field": [field_height, field_width],
        "filters": filters,
        "fully_connected": fully_connected,
        "locally_connected": locally_connected,
        "shared_per_filter": shared_per_filter,
        "shared_total": shared_total,
        "local_vs_full": float(local_vs_full),
        "local_vs_full_fraction": f"{local_vs_full.numerator}/{local_vs_full.denominator}",
        "sharing_reduction": locally_connected / shared_per_filter,
    }


def _sci(value):
    """``2.5e+10`` written as ``2.5 x 10^10``; small numbers as they are."""
    if value < 10_000:
        return ""
    mantissa, exponent = f"{value:.6e}".split("e")
    mantissa = mantissa.rstrip("0").rstrip(".")
    exponent = int(exponent)
    return f"10^{exponent}" if mantissa == "1" else f"{mantissa} x 10^{exponent}"


def format_note_arithmetic(numbers=None):
    """The note's arithmetic as a readable table.

    Args:
        numbers: a dict from :func:`note_arithmetic`; ``None`` uses the note's example.

    >>> print(format_note_arithmetic())
    Weights of one layer: 500 x 500 input (250,000 pixels) -> 100,000 neurons
      fully connected                                   25,000,000,000   2.5 x 10^10
      locally connected, 10 x 10 field                      10,000,000   10^7
      shared, per filter (10 x 10)                                 100
      shared, with 64 filters                                    6,400
      local / full                                              1/2500   0.0004
      reduction by sharing (local / shared per filter)         100,000x  10^5
    Biases are the same in every case and are left out of the comparison.
    """
    if numbers is None:
        numbers = note_arithmetic()
    field_height, field_width = numbers["field"]
    field = f"{field_height} x {field_width}"
    reduction = numbers["sharing_reduction"]
    reduction_text = (f"{int(reduction):,}x" if float(reduction).is_integer()
                      else f"{reduction:,.6g}x")
    rows = [
        ("fully connected", f"{numbers['fully_connected']:,}",
         _sci(numbers["fully_connected"])),
        (f"locally connected, {field} field", f"{numbers['locally_connected']:,}",
         _sci(numbers["locally_connected"])),
        (f"shared, per filter ({field})", f"{numbers['shared_per_filter']:,}",
         _sci(numbers["shared_per_filter"])),
        (f"shared, with {numbers['filters']} filters", f"{numbers['shared_total']:,}",
         _sci(numbers["shared_total"])),
        ("local / full", numbers["local_vs_full_fraction"], f"{numbers['local_vs_full']:.6g}"),
        ("reduction by sharing (local / shared per filter)", reduction_text,
         _sci(reduction)),
    ]
    label_width = max(len(label) for label, _, _ in rows)
    # Right-align the numbers; a trailing "x" hangs past the column.
    value_width = max(len(value.rstrip("x")) for _, value, _ in rows)
    lines = [
        f"Weights of one layer: {numbers['height']} x {numbers['width']} input "
        f"({numbers['pixels']:,} pixels) -> {numbers['neurons']:,} neurons"
    ]
    for label, value, note in rows:
        hang = "x" if value.endswith("x") else " "
        line = f"  {label:<{label_width}}  {value.rstrip('x'):>{value_width}}{hang}"
        if note:
            line += f"  {note}"
        lines.append(line.rstrip())
    lines.append("Biases are the same in every case and are left out of the comparison.")
    return "\n".join(lines)


def note_dial(numbers=None):
    """Sharing as a dial on the note's example: weights of one filter when ``T x T`` kernel
    slots are shared by the neurons (a tiled convolution), for ``T = 1, 2, 4, ...`` while
    ``T * T`` is below the number of neurons, then one slot per neuron.

    ``T = 1`` is the shared filter (``KH * KW`` weights), one slot per neuron the locally
    connected layer (``KH * KW * M``); each step between multiplies the weights by the
    number of slots. Returns a list of dicts: ``tiles`` (``[T, T]``, or None for one slot per
    neuron), ``slots`` and ``weights``.

    Args:
        numbers: a dict from :func:`note_arithmetic`; ``None`` uses the note's example.

    >>> dial = note_dial()
    >>> [(row["slots"], row["weights"]) for row in dial[:3]]
    [(1, 100), (4, 400), (16, 1600)]
    >>> dial[-1]
    {'tiles': None, 'slots': 100000, 'weights': 10000000}
    """
    if numbers is None:
        numbers = note_arithmetic()
    field = numbers["shared_per_filter"]
    rows = []
    tiles = 1
    while tiles * tiles < numbers["neurons"]:
        rows.append({"tiles": [tiles, tiles], "slots": tiles * tiles,
                     "weights": tiles * tiles * field})
        tiles *= 2
    rows.append({"tiles": None, "slots": numbers["neurons"],
                 "weights": numbers["locally_connected"]})
    return rows


def format_note_dial(numbers=None):
    """:func:`note_dial` as a table.

    >>> print(format_note_dial())
    Sharing as a dial: weights of one 10 x 10 filter shared by T x T kernel slots (tiled_conv2d)
      tiles 1 x 1 (shared)                       100
      tiles 2 x 2                                400
      tiles 4 x 4                              1,600
      tiles 8 x 8                              6,400
      tiles 16 x 16                           25,600   2.56 x 10^4
      tiles 32 x 32                          102,400   1.024 x 10^5
      tiles 64 x 64                          409,600   4.096 x 10^5
      tiles 128 x 128                      1,638,400   1.6384 x 10^6
      tiles 256 x 256                      6,553,600   6.5536 x 10^6
      one per neuron (locally connected)  10,000,000   10^7
    """
    if numbers is None:
        numbers = note_arithmetic()
    field_height, field_width = numbers["field"]
    rows = []
    for row in note_dial(numbers):
        if row["tiles"] is None:
            label = "one per neuron (locally connected)"
        else:
            label = "tiles {0} x {1}".format(*row["tiles"])
            if row["slots"] == 1:
                label += " (shared)"
        rows.append((label, f"{row['weights']:,}", _sci(row["weights"])))
    label_width = max(len(label) for label, _, _ in rows)
    value_width = max(len(value) for _, value, _ in rows)
    lines = [f"Sharing as a dial: weights of one {field_height} x {field_width} filter shared "
             "by T x T kernel slots (tiled_conv2d)"]
    for label, value, note in rows:
        lines.append(f"  {label:<{label_width}}  {value:>{value_width}}   {note}".rstrip())
    return "\n".join(lines)


def tiled_conv2d_param_count(in_channels, out_channels, kernel_size, tiles, groups=1,
                             bias="slot"):
    """Learnable numbers of a tiled convolution (:func:`gpuconv.tiled_conv2d`).

    ``T_h x T_w`` kernel slots, each shared by its output positions:
    ``weights = c_O * T_h * T_w * (c_I / g) * k_H * k_W``, whatever the input size.

    Args:
        in_channels, out_channels, kernel_size, groups: as :func:`conv2d_param_count`.
        tiles: ``(T_h, T_w)`` (or one int).
        bias: ``None``, ``"channel"`` (``c_O``) or ``"slot"`` (one per map and slot, as
            :class:`gpuconv.torch.TiledConv2d` has them: ``c_O * T_h * T_w``).

    >>> tiled_conv2d_param_count(3, 10, 5, (2, 2))
    ParamCount(weights=3000, biases=40)
    >>> tiled_conv2d_param_count(3, 10, 5, 1, bias="channel") == conv2d_param_count(3, 10, 5)
    True
    """
    in_per_group, out_channels = _channels_per_group(in_channels, out_channels, groups)
    kernel_height, kernel_width = pair(kernel_size, "kernel_size", 1)
    tile_height, tile_width = pair(tiles, "tiles", 1)
    if not (bias is None or (isinstance(bias, str) and bias in TILED_BIAS_MODES)):
        raise ValueError(
            f"bias must be one of {', '.join(map(repr, TILED_BIAS_MODES))}, got {bias!r}")
    slots = tile_height * tile_width
    weights = out_channels * slots * in_per_group * kernel_height * kernel_width
    biases = {None: 0, "channel": out_channels, "slot": out_channels * slots}[bias]
    return ParamCount(weights, biases)


def conv2d_param_count(in_channels, out_channels, kernel_size, groups=1, bias=True):
    """Learnable numbers of a shared convolution (:func:`gpuconv.conv2d`).

    ``weights = c_O * (c_I / g) * k_H * k_W``, ``biases = c_O`` (or 0 without bias). The
    count does not depend on the input size: the kernel is shared by every position.

    Args:
        in_channels: ``c_I``.
        out_channels: ``c_O``, the number of kernels (output feature maps).
        kernel_size: ``k`` or ``(k_H, k_W)``.
        groups: ``g``; must divide both channel counts.
        bias: whether each output channel has a bias.

    Returns:
        :class:`ParamCount`.

    The note's first layer, a 5 x 5 x 3 x 10 kernel bank on an RGB image:

    >>> conv2d_param_count(3, 10, 5)
    ParamCount(weights=750, biases=10)
    >>> conv2d_param_count(3, 10, (5, 5), bias=False).total
    750
    """
    in_per_group, out_channels = _channels_per_group(in_channels, out_channels, groups)
    kernel_height, kernel_width = pair(kernel_size, "kernel_size", 1)
    bias = _check_bool(bias, "bias")
    weights = out_channels * in_per_group * kernel_height * kernel_width
    return ParamCount(weights, out_channels if bias else 0)


def local_conv2d_param_count(in_channels, out_channels, kernel_size, out_size, groups=1,
                             bias="channel"):
    """Learnable numbers of an unshared, locally connected layer (:func:`gpuconv.local_conv2d`).

    Every output position has its own kernel:
    ``weights = c_O * h_O * w_O * (c_I / g) * k_H * k_W``. Get ``(h_O, w_O)`` from
    :func:`gpuconv.get_conv_outsize`.

    Args:
        in_channels: ``c_I``.
        out_channels: ``c_O``.
        kernel_size: ``k`` or ``(k_H, k_W)``.
        out_size: ``(h_O, w_O)`` (or one int for a square output).
        groups: ``g``; must divide both channel counts.
        bias: ``None`` (no bias), ``"channel"`` (one per output channel: ``c_O``) or
            ``"position"`` (one per output value: ``c_O * h_O * w_O``).

    Returns:
        :class:`ParamCount`.

    DeepFace's layer L4: 16 input channels, 16 kernels of 9 x 9 at each of 55 x 55
    positions (its input is 63 x 63):

    >>> from gpuconv import get_conv_outsize
    >>> get_conv_outsize(63, 9, 1, 0)
    55
    >>> local_conv2d_param_count(16, 16, 9, (55, 55), bias=None)
    ParamCount(weights=62726400, biases=0)
    >>> local_conv2d_param_count(16, 16, 9, (55, 55), bias="position").biases
    48400
    """
    in_per_group, out_channels = _channels_per_group(in_channels, out_channels, groups)
    kernel_height, kernel_width = pair(kernel_size, "kernel_size", 1)
    out_height, out_width = pair(out_size, "out_size", 1)
    if not (bias is None or (isinstance(bias, str) and bias in LOCAL_BIAS_MODES)):
        raise ValueError(
            f"bias must be one of {', '.join(map(repr, LOCAL_BIAS_MODES))}, got {bias!r}")
    weights = (out_channels * out_height * out_width
               * in_per_group * kernel_height * kernel_width)
    if bias is None:
        biases = 0
    elif bias == "channel":
        biases = out_channels
    else:
        biases = out_channels * out_height * out_width
    return ParamCount(weights, biases)


def fully_connected_param_count(in_features, out_features, bias=True):
    """Learnable numbers of a fully connected layer.

    ``weights = in_features * out_features``, ``biases = out_features`` (or 0).

    The note's classifier: 1024 neurons fully connected to 2 labels, each label with its own
    weights and bias:

    >>> fully_connected_param_count(1024, 2)
    ParamCount(weights=2048, biases=2)
    """
    in_features = _positive_int(in_features, "in_features")
    out_features = _positive_int(out_features, "out_features")
    bias = _check_bool(bias, "bias")
    return ParamCount(in_features * out_features, out_features if bias else 0)
