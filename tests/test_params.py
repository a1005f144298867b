"""The parameter calculator against the note's numbers and hand-computed layer counts."""

import numpy as np
import pytest

from gpuconv import get_conv_outsize
from gpuconv.params import (
    ParamCount,
    conv2d_param_count,
    format_note_arithmetic,
    fully_connected_param_count,
    local_conv2d_param_count,
    note_arithmetic,
)


# ----------------------------------------------------------------------------- the note

def test_note_numbers_exactly():
    numbers = note_arithmetic()
    assert numbers["fully_connected"] == 25_000_000_000  # 2.5 x 10^10
    assert numbers["locally_connected"] == 10_000_000  # 10^7
    assert numbers["shared_per_filter"] == 100
    assert numbers["shared_total"] == 6400
    assert numbers["local_vs_full"] == 1 / 2500
    assert numbers["local_vs_full_fraction"] == "1/2500"
    assert numbers["sharing_reduction"] == 1e5


def test_note_counts_are_exact_ints_and_ratios_floats():
    numbers = note_arithmetic()
    for key in ("fully_connected", "locally_connected", "shared_per_filter", "shared_total"):
        assert type(numbers[key]) is int, key
    for key in ("local_vs_full", "sharing_reduction"):
        assert type(numbers[key]) is float, key


def test_note_inputs_are_echoed():
    numbers = note_arithmetic()
    assert numbers["height"] == 500 and numbers["width"] == 500
    assert numbers["pixels"] == 250_000  # 2.5 x 10^5
    assert numbers["neurons"] == 100_000
    assert numbers["field"] == [10, 10]
    assert numbers["filters"] == 64


def test_note_arithmetic_other_inputs():
    # 28 x 28 input, 300 neurons, a 3 x 5 field, 7 filters: all by hand.
    numbers = note_arithmetic(height=28, width=28, neurons=300, field=(3, 5), filters=7)
    assert numbers["fully_connected"] == 28 * 28 * 300 == 235_200
    assert numbers["locally_connected"] == 15 * 300 == 4500
    assert numbers["shared_per_filter"] == 15
    assert numbers["shared_total"] == 105
    assert numbers["local_vs_full_fraction"] == "15/784"
    assert numbers["local_vs_full"] == pytest.approx(15 / 784)
    assert numbers["sharing_reduction"] == 300.0


def test_note_arithmetic_square_field_and_numpy_ints():
    assert note_arithmetic(field=10) == note_arithmetic(field=(10, 10))
    assert note_arithmetic(height=np.int64(500))["fully_connected"] == 25_000_000_000


def test_huge_inputs_stay_exact():
    numbers = note_arithmetic(height=10**6, width=10**6, neurons=10**9)
    assert numbers["fully_connected"] == 10**21


@pytest.mark.parametrize("name, value, error", [
    ("height", 0, ValueError),
    ("width", -5, ValueError),
    ("neurons", 0, ValueError),
    ("filters", 0, ValueError),
    ("field", 0, ValueError),
    ("field", (10, 0), ValueError),
    ("height", 2.5, TypeError),
    ("width", "500", TypeError),
    ("neurons", True, TypeError),
    ("filters", None, TypeError),
    ("field", (1, 2, 3), TypeError),
])
def test_note_arithmetic_rejects_bad_inputs(name, value, error):
    with pytest.raises(error, match=name):
        note_arithmetic(**{name: value})


def test_table_uses_the_notes_wording_and_numbers():
    table = format_note_arithmetic()
    for text in ("fully connected", "25,000,000,000", "2.5 x 10^10",
                 "locally connected, 10 x 10 field", "10,000,000", "10^7",
                 "shared, per filter", "shared, with 64 filters", "6,400",
                 "local / full", "1/2500", "reduction by sharing", "100,000x", "10^5"):
        assert text in table, text
    assert format_note_arithmetic(note_arithmetic()) == table


# ----------------------------------------------------------------------------- ParamCount

def test_param_count_is_a_named_tuple_with_total():
    count = ParamCount(weights=750, biases=10)
    assert count == (750, 10)
    weights, biases = count
    assert (weights, biases, count.total) == (750, 10, 760)


# ----------------------------------------------------------------------------- conv2d

def test_conv2d_the_notes_first_layer():
    # 5 x 5 x 3 x 10 kernel bank: 5*5*3 = 75 weights per kernel, 10 kernels.
    assert conv2d_param_count(3, 10, 5) == ParamCount(750, 10)
    assert conv2d_param_count(3, 10, (5, 5), bias=False) == ParamCount(750, 0)


def test_conv2d_the_notes_second_layer():
    # 3 x 3 x 10 x 5: 3*3*10 = 90 per kernel, 5 kernels.
    assert conv2d_param_count(10, 5, 3) == ParamCount(450, 5)


def test_conv2d_real_geometries():
    # AlexNet conv1: 96 kernels of 11 x 11 x 3 -> 34,848 weights + 96 biases.
    assert conv2d_param_count(3, 96, 11) == ParamCount(34_848, 96)
    # VGG-16 conv3_1: 256 kernels of 3 x 3 x 128 -> 294,912 + 256.
    assert conv2d_param_count(128, 256, 3).total == 295_168
    # ResNet-50 first 1 x 1 of a bottleneck: 64 -> 256.
    assert conv2d_param_count(64, 256, 1, bias=False) == ParamCount(16_384, 0)


def test_conv2d_rectangular_kernel_and_groups():
    # 6 -> 4 channels, 3 x 2 kernel, groups=2: each kernel sees 3 channels.
    assert conv2d_param_count(6, 4, (3, 2), groups=2) == ParamCount(4 * 3 * 3 * 2, 4)
    # Depthwise 3 x 3 on 32 channels (MobileNet): 32 * 1 * 9 = 288.
    assert conv2d_param_count(32, 32, 3, groups=32) == ParamCount(288, 32)


def test_conv2d_does_not_depend_on_input_size_unlike_local():
    # Sharing: the same count whatever the output; the local layer scales with h_O * w_O.
    shared = conv2d_param_count(3, 10, 5, bias=False).weights
    assert local_conv2d_param_count(3, 10, 5, (1, 1), bias=None).weights == shared
    assert local_conv2d_param_count(3, 10, 5, (7, 9), bias=None).weights == shared * 63


# ----------------------------------------------------------------------------- local_conv2d

def test_local_conv2d_deepface_l4():
    # DeepFace L4: 63 x 63 x 16 input, 16 unshared 9 x 9 kernels -> 55 x 55 output.
    out = get_conv_outsize(63, 9, 1, 0)
    assert out == 55
    count = local_conv2d_param_count(16, 16, 9, (out, out), bias=None)
    assert count == ParamCount(62_726_400, 0)  # 55*55*16*16*81, ~62.7 M in the paper


def test_local_conv2d_bias_modes():
    assert local_conv2d_param_count(16, 16, 9, (55, 55)).biases == 16  # "channel" default
    assert local_conv2d_param_count(16, 16, 9, (55, 55), bias="channel").biases == 16
    assert local_conv2d_param_count(16, 16, 9, (55, 55), bias="position").biases == 48_400
    assert local_conv2d_param_count(16, 16, 9, (55, 55), bias=None).biases == 0


def test_local_conv2d_rectangular_and_groups():
    # 4 -> 6 channels, groups=2 (2 in-channels per kernel), 3 x 5 kernel, 7 x 2 output.
    count = local_conv2d_param_count(4, 6, (3, 5), (7, 2), groups=2, bias="position")
    assert count == ParamCount(6 * 7 * 2 * 2 * 3 * 5, 6 * 7 * 2)
    assert count == ParamCount(2520, 84)
    assert local_conv2d_param_count(4, 6, 3, 7) == local_conv2d_param_count(4, 6, 3, (7, 7))


def test_local_conv2d_matches_the_notes_locally_connected_count():
    # 10^5 neurons as one 1-channel 250 x 400 map, each with a 10 x 10 field on 1 channel.
    count = local_conv2d_param_count(1, 1, 10, (250, 400), bias=None)
    assert count.weights == note_arithmetic()["locally_connected"] == 10**7


# ----------------------------------------------------------------------------- fully connected

def test_fully_connected_the_notes_classifier():
    assert fully_connected_param_count(1024, 2) == ParamCount(2048, 2)
    assert fully_connected_param_count(1024, 2, bias=False).total == 2048


def test_fully_connected_matches_the_notes_full_count():
    count = fully_connected_param_count(500 * 500, 100_000, bias=False)
    assert count.weights == note_arithmetic()["fully_connected"] == 25 * 10**9


def test_fully_connected_real_geometry():
    # AlexNet fc6: 9216 -> 4096.
    assert fully_connected_param_count(9216, 4096) == ParamCount(37_748_736, 4096)


# ----------------------------------------------------------------------------- argument errors

@pytest.mark.parametrize("call, error, match", [
    (lambda: conv2d_param_count(0, 10, 5), ValueError, "in_channels"),
    (lambda: conv2d_param_count(3, 0, 5), ValueError, "out_channels"),
    (lambda: conv2d_param_count(3, 10, 0), ValueError, "kernel_size"),
    (lambda: conv2d_param_count(3, 10, (5, 5, 5)), TypeError, "kernel_size"),
    (lambda: conv2d_param_count(3.0, 10, 5), TypeError, "in_channels"),
    (lambda: conv2d_param_count(3, 10, 5, groups=0), ValueError, "groups"),
    (lambda: conv2d_param_count(3, 10, 5, groups=2), ValueError, "in_channels=3"),
    (lambda: conv2d_param_count(4, 10, 5, groups=4), ValueError, "out_channels=10"),
    (lambda: conv2d_param_count(3, 10, 5, bias="yes"), TypeError, "bias"),
    (lambda: local_conv2d_param_count(16, 16, 9, (0, 55)), ValueError, "out_size"),
    (lambda: local_conv2d_param_count(16, 16, 9, "55"), TypeError, "out_size"),
    (lambda: local_conv2d_param_count(16, 16, 9, 55, bias="pixel"), ValueError, "'position'"),
    (lambda: local_conv2d_param_count(16, 16, 9, 55, bias=True), ValueError, "bias"),
    (lambda: local_conv2d_param_count(16, 16, 9, 55, groups=3), ValueError, "groups=3"),
    (lambda: fully_connected_param_count(0, 2), ValueError, "in_features"),
    (lambda: fully_connected_param_count(1024, -2), ValueError, "out_features"),
    (lambda: fully_connected_param_count(1024, 2, bias=1), TypeError, "bias"),
])
def test_counters_reject_bad_arguments(call, error, match):
    with pytest.raises(error, match=match):
        call()


# ----------------------------------------------------------------------------- the dial

def test_the_dial_runs_from_the_shared_filter_to_one_kernel_per_neuron():
    from gpuconv.params import note_dial

    numbers = note_arithmetic()
    dial = note_dial(numbers)
    assert dial[0] == {"tiles": [1, 1], "slots": 1, "weights": numbers["shared_per_filter"]}
    assert dial[-1] == {"tiles": None, "slots": 100_000,
                        "weights": numbers["locally_connected"]}
    assert [row["tiles"][0] for row in dial[:-1]] == [1, 2, 4, 8, 16, 32, 64, 128, 256]
    for row in dial[:-1]:
        assert row["weights"] == row["tiles"][0] ** 2 * 10 * 10  # by hand: T^2 * KH * KW
    weights = [row["weights"] for row in dial]
    assert weights == sorted(weights)


def test_the_dial_on_other_inputs():
    from gpuconv.params import note_dial

    dial = note_dial(note_arithmetic(height=28, width=28, neurons=300, field=(3, 5)))
    assert [(row["slots"], row["weights"]) for row in dial] == [
        (1, 15), (4, 60), (16, 240), (64, 960), (256, 3840), (300, 4500)]


def test_tiled_param_count_by_hand():
    from gpuconv.params import tiled_conv2d_param_count

    assert tiled_conv2d_param_count(4, 6, (3, 2), (2, 5), groups=2) == ParamCount(
        6 * 2 * 5 * 2 * 3 * 2, 6 * 10)
    assert tiled_conv2d_param_count(3, 8, 3, 1, bias=None) == ParamCount(216, 0)
    # the ends: conv2d and local_conv2d's counts
    assert tiled_conv2d_param_count(16, 16, 9, (55, 55), bias=None) == \
        local_conv2d_param_count(16, 16, 9, (55, 55), bias=None)
    with pytest.raises(ValueError, match="bias must be one of None, 'channel', 'slot'"):
        tiled_conv2d_param_count(3, 8, 3, 2, bias="position")
