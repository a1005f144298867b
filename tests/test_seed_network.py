"""scripts/seed_network.py: the note's network, shared and unshared."""

import importlib.util
import pathlib

import numpy as np
import pytest

_PATH = pathlib.Path(__file__).resolve().parents[1] / "scripts" / "seed_network.py"
_spec = importlib.util.spec_from_file_location("seed_network", _PATH)
seed_network = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(seed_network)


def test_shapes_and_flatten_for_the_default_input():
    shapes, flatten = seed_network.layer_shapes(20)
    assert [(s["in_size"], s["out_size"]) for s in shapes] == [(20, 16), (16, 14)]
    assert flatten == 14 * 14 * 5 == 980  # not the note's (illustrative) 1024


def test_parameter_counts_by_hand():
    rows, shared, unshared = seed_network.param_counts(20)
    counts = {name: (s, u) for name, _, s, u in rows}
    # conv1: 5*5*3*10 weights + 10 biases; unshared: that at each of 16*16 positions
    assert counts["conv1"][0].total == 750 + 10
    assert counts["conv1"][1].total == 16 * 16 * 750 + 10 == 192_010
    # conv2: 3*3*10*5 + 5; unshared at 14*14 positions
    assert counts["conv2"][0].total == 450 + 5
    assert counts["conv2"][1].total == 14 * 14 * 450 + 5 == 88_205
    # fully connected 980 -> 2 labels, each with its own weights and bias
    assert counts["fc"][0].total == counts["fc"][1].total == 980 * 2 + 2
    assert (shared, unshared) == (3_177, 282_177)


def test_too_small_input_is_rejected():
    with pytest.raises(ValueError, match="too small"):
        seed_network.layer_shapes(6)


def test_forward_shape_and_untied_equals_shared():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 3, 12, 12)).astype(np.float32)
    shared = seed_network.build_network(True, size=12)
    logits = seed_network.forward(shared, x)
    assert logits.shape == (2, 2)
    # a locally connected network whose every position uses the shared kernel is the same
    untied = seed_network.untie(shared, size=12)
    np.testing.assert_allclose(seed_network.forward(untied, x), logits, rtol=1e-4, atol=1e-5)
    unshared = seed_network.build_network(False, size=12)
    assert seed_network.forward(unshared, x).shape == (2, 2)


def test_main_prints_both_tables(capsys):
    assert seed_network.main(["--size", "12", "--batch", "1", "--repeat", "2"]) == 0
    out = capsys.readouterr().out
    assert "flatten: 180 values" in out and "cpu  shared" in out and "cpu  unshared" in out


@pytest.mark.parametrize("argv, message", [
    (["--size", "4"], "input size too small"),
    (["--batch", "0"], "--batch: must be >= 1"),
    (["--repeat", "two"], "--repeat: expected a positive integer"),
])
def test_main_rejects_bad_sizes(argv, message, capsys):
    with pytest.raises(SystemExit) as exc:
        seed_network.main(argv)
    assert exc.value.code == 2 and message in capsys.readouterr().err


def test_forward_is_timed_like_the_benchmark(monkeypatch):
    """One first call, then ``repeat`` timed calls; the median of those."""
    calls = []

    class Backend:
        def __init__(self, kind, torch=None):
            calls.append(("backend", kind))

        def time_first_call(self, fn):
            calls.append("first")
            return 0.5, fn()

        def time_calls(self, fn, count):
            calls.append(("timed", count))
            return [3.0, 1.0, 2.0][:count]

    monkeypatch.setattr(seed_network.peers, "Backend", Backend)
    network = seed_network.build_network(True, size=12)
    x = np.zeros((1, 3, 12, 12), dtype=np.float32)
    assert seed_network.time_forward(network, x, "cpu", repeat=3) == (2.0, 0.5)
    assert calls == [("backend", "cpu"), "first", ("timed", 3)]
