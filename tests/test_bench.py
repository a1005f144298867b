"""gpuconv bench: formulas, record schema, options, a tiny run with and without PyTorch.

Sizes are tiny and the ceilings are stubbed, so the whole file runs in seconds; the real
suites are run by hand (see BENCHMARKS.md).
"""

import argparse
import json
import re
import subprocess
import sys

import numpy as np
import pytest

from gpuconv import appkit, bench
from gpuconv.bench import command, report, timing
from gpuconv.bench import peers as _bench_impls
from gpuconv.bench import stats
from gpuconv.device import cuda_available
from gpuconv.geometry import conv_geometry

from reference import (conv2d_input_grad_ref, conv2d_ref, conv2d_weight_grad_ref,
                       half_tolerance, local_conv2d_input_grad_ref, local_conv2d_ref,
                       local_conv2d_weight_grad_ref)

TINY = bench.Layer("tiny", "tiny test layer", 2, 2, 3, 9, 4, 3, 2, 1, "the tests")
TINY_GROUPED = bench.Layer("tiny-grouped", "grouped", 2, 2, 4, 8, 6, 3, 1, 1, "the tests",
                           groups=2)
CEILINGS = {"bandwidth_gbs": 20.0, "bandwidth_method": "stub", "compute_gflops": 100.0,
            "compute_method": "stub"}

try:
    import torch
except ImportError:  # pragma: no cover - torch is optional
    torch = None

needs_torch = pytest.mark.skipif(torch is None, reason="PyTorch is not installed")


@pytest.fixture
def fast(monkeypatch):
    """Stub ceilings; tiny layers registered as a suite, quick list and sweep."""
    monkeypatch.setattr(_bench_impls, "measure_ceilings", lambda *a, **k: dict(CEILINGS))
    monkeypatch.setattr(bench.timing, "WARMUP_S", 0.0)
    layers = dict(bench.suite.LAYERS, tiny=TINY, **{"tiny-grouped": TINY_GROUPED})
    monkeypatch.setattr(bench.suite, "LAYERS", layers)
    monkeypatch.setattr(bench.suite, "SUITES",
                        {"default": ("tiny",), "full": ("tiny", "tiny-grouped")})
    monkeypatch.setattr(bench.suite, "QUICK_LAYERS", ("tiny",))
    monkeypatch.setattr(bench.suite, "SWEEP_LAYER", "tiny")
    monkeypatch.setattr(bench.suite, "SWEEP_BATCHES", (1, 2))


def parser():
    p = argparse.ArgumentParser(prog="gpuconv bench")
    bench.add_arguments(p)
    return p


# ----------------------------------------------------------------------------- formulas

def test_seed_conv1_formulas_by_hand():
    geom = bench.suite.LAYERS["seed-conv1"].geometry(1)
    assert (geom.out_height, geom.out_width) == (496, 496)
    # 2 * N * C_out * H_out * W_out * C_in * kH * kW
    assert geom.flops == 2 * 1 * 10 * 496 * 496 * 3 * 5 * 5 == 369_024_000
    assert bench.param_count("conv2d", geom).total == 750 + 10
    local = bench.param_count("local_conv2d", geom)
    assert local.weights == 184_512_000 and local.biases == 10  # the seed's 184 M, 738 MB
    # input 3*500*500 + weights and biases 760 + output 10*496*496, float32
    assert bench.min_bytes("conv2d", geom, 4) == (750_000 + 760 + 2_460_160) * 4 == 12_843_680
    assert bench.min_bytes("local_conv2d", geom, 8) == (750_000 + 184_512_010 + 2_460_160) * 8


@pytest.mark.parametrize("name, weights, out", [
    ("deepface-l4", 62_726_400, 55), ("deepface-l5", 7_840_000, 25),
    ("deepface-l6", 2_822_400, 21)])
def test_deepface_weights_match_the_paper(name, weights, out):
    geom = bench.suite.LAYERS[name].geometry(8)
    assert (geom.out_height, geom.out_width) == (out, out)
    assert bench.param_count("local_conv2d", geom).weights == weights


def test_strided_padded_layer_by_hand():
    geom = bench.suite.LAYERS["alexnet-conv1"].geometry(2)  # (227 - 11) // 4 + 1 = 55
    assert geom.out_height == 55
    assert geom.flops == 2 * 2 * 96 * 55 * 55 * 3 * 11 * 11
    geom = bench.suite.LAYERS["resnet50-conv1"].geometry(1)  # (224 + 6 - 7) // 2 + 1 = 112
    assert geom.out_height == 112


def test_make_record_statistics_and_ceilings():
    geom = TINY.geometry(2)  # 9x9, k3, s2, p1 -> 5x5
    assert geom.out_height == 5
    r = bench.make_record("conv2d", "gpuconv", "tiny", "cpu", "float32", geom,
                          [5e-3, 1e-3, 4e-3, 2e-3, 3e-3], CEILINGS)
    flops = 2 * 2 * 4 * 5 * 5 * 3 * 3 * 3
    nbytes = (2 * 3 * 9 * 9 + 4 * 3 * 3 * 3 + 4 + 2 * 4 * 5 * 5) * 4
    assert r["flops"] == flops and r["bytes"] == nbytes
    assert r["median_s"] == pytest.approx(3e-3)
    assert (r["q1_s"], r["q3_s"]) == pytest.approx((2e-3, 4e-3))
    assert (r["min_s"], r["max_s"], r["samples"]) == (1e-3, 5e-3, 5)
    assert r["times_s"] == [5e-3, 1e-3, 4e-3, 2e-3, 3e-3]  # in the order they were timed
    assert r["gflops"] == pytest.approx(flops / 3e-3 / 1e9)
    assert r["gbs"] == pytest.approx(nbytes / 3e-3 / 1e9)
    assert r["compute_fraction"] == pytest.approx(r["gflops"] / 100.0)
    assert r["bandwidth_fraction"] == pytest.approx(r["gbs"] / 20.0)
    assert r["params"] == 4 * 27 + 4 and r["params_weights"] == 108
    for key in ("N", "C_in", "H", "W", "C_out", "kH", "kW", "stride", "padding", "dilation",
                "groups", "H_out", "W_out"):
        assert key in r
    assert r["stride"] == [2, 2] and r["padding"] == [1, 1, 1, 1]


def test_kernel_time_column_beside_the_call_time():
    """On CUDA a record carries its kernel time: the table shows it after the call's
    quartiles, and the record what the host added; without kernel times no such column."""
    geom = TINY.geometry(2)
    timed = bench.make_record("conv2d", "gpuconv", "tiny", "cuda", "float32", geom,
                              [5e-3, 3e-3, 4e-3], CEILINGS, kernel_s=1e-3)
    untimed = bench.make_record("conv2d", "torch", "tiny", "cuda", "float32", geom,
                                [2e-3], CEILINGS, kernel_note="no profiler")
    assert timed["call_minus_kernel_s"] == pytest.approx(3e-3)
    assert untimed["kernel_s"] is None and untimed["call_minus_kernel_s"] is None
    header, _, first, second = bench.format_table([timed, untimed]).splitlines()
    columns = header.split()
    assert columns[columns.index("kernel") - 2:columns.index("kernel") + 2] == [
        "q1-q3", "ms", "kernel", "ms"]
    assert first.split()[6] == report._ms(1e-3) and second.split()[6] == "-"
    assert "kernel" not in bench.format_table([untimed])
    assert len(report.table_rows([timed])[0]) == len(report.table_columns([timed]))


def test_skipped_record_has_no_numbers():
    r = bench.make_record("local_conv2d", "gpuconv", "tiny", "cpu", "float32",
                          TINY.geometry(1), skipped="too big")
    assert r["median_s"] is None and r["gflops"] is None and r["skipped"] == "too big"
    assert r["times_s"] == [] and r["samples"] == 0


# ----------------------------------------------------------------------------- options

@pytest.mark.parametrize("argv, message", [
    (["--layers", "lenet"], "accepted: seed-conv1"),
    (["--repeat", "0"], "must be >= 1"),
    (["--batch", "-3"], "must be >= 1"),
    (["--batch", "two"], "expected a positive integer"),
    (["--dtype", "float8"], "invalid choice"),
    (["--device", "tpu"], "invalid choice"),
    (["--suite", "huge"], "invalid choice"),
])
def test_bad_options_are_argparse_errors(argv, message, capsys):
    with pytest.raises(SystemExit) as exc:
        parser().parse_args(argv)
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


def test_plan_from_options():
    names, repeat, bursts, cap = command._plan(parser().parse_args([]))
    assert names == list(bench.suite.SUITES["default"]) and repeat == bench.suite.DEFAULT_REPEAT
    assert cap is None and bursts == bench.suite.DEFAULT_BURSTS
    names, repeat, bursts, cap = command._plan(parser().parse_args(["--quick"]))
    assert names == list(bench.suite.QUICK_LAYERS) and repeat == bench.suite.QUICK_REPEAT
    assert cap == bench.suite.QUICK_MAX_BATCH
    names, *_ = command._plan(parser().parse_args(["--suite", "full"]))
    assert names == list(bench.suite.LAYERS)
    args = parser().parse_args(["--layers", "DeepFace-L6", "deepface-l6", "seed-conv1",
                                "--repeat", "7"])
    names, repeat, *_ = command._plan(args)
    assert names == ["deepface-l6", "seed-conv1"] and repeat == 7


def test_every_suite_layer_is_known():
    for names in bench.suite.SUITES.values():
        assert set(names) <= set(bench.suite.LAYERS)
    assert set(bench.suite.QUICK_LAYERS) <= set(bench.suite.LAYERS)
    assert bench.suite.SWEEP_LAYER in bench.suite.LAYERS


def test_import_is_light():
    code = ("import sys, gpuconv.bench; "
            "print('torch' in sys.modules, 'matplotlib' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout.split()
    assert out == ["False", "False"]


# ----------------------------------------------------------------------------- stats

def test_quantiles_and_summaries_by_hand():
    assert stats.quantile([1.0, 2.0, 3.0, 4.0], 0.25) == pytest.approx(1.75)
    assert stats.quantile([7.0], 0.9) == 7.0
    summary = stats.summarize([4.0, 1.0, 3.0, 2.0, 5.0])
    assert summary == {"median": 3.0, "q1": 2.0, "q3": 4.0, "min": 1.0, "max": 5.0, "count": 5}
    assert stats.summarize([]) is None
    assert stats.summarize([2.0, 1.0])["median"] == pytest.approx(1.5)


def test_paired_ratios_pair_call_i_with_call_i():
    # A slow spell hits both calls of a pair: the ratios stay put, the medians' ratio would not.
    slow = [2.0, 20.0, 2.0, 2.0]
    fast = [1.0, 10.0, 1.0, 1.0]
    assert stats.paired_ratios(slow, fast) == stats.summarize([2.0, 2.0, 2.0, 2.0])
    summary = stats.paired_ratios([6.0, 3.0, 12.0], [2.0, 1.0, 2.0, 5.0])  # 3 pairs
    assert summary["count"] == 3 and summary["median"] == 3.0 and summary["q3"] == 4.5
    assert stats.paired_ratios([], [1.0]) is None


def test_geomean_rate_and_bytes():
    assert stats.geomean([4.0, 0.25, 8.0]) == pytest.approx(2.0)
    assert stats.geomean([]) is None
    assert stats.rate(2e12, 0.5, 1e12) == pytest.approx(4.0)
    assert stats.rate(1e9, 0.5) == pytest.approx(2.0)
    assert stats.rate(1, 0) is None and stats.rate(1, None) is None
    assert stats.format_bytes(2.5e9) == "2.50 GB" and stats.format_bytes(4.5e6) == "4.5 MB"


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_tolerance_is_relative_to_the_bound(dtype):
    tol = stats.TOLERANCE[dtype]
    assert stats.within_tolerance(0.5 * tol * 8.0, 8.0, dtype)
    assert not stats.within_tolerance(2.0 * tol * 8.0, 8.0, dtype)
    assert stats.within_tolerance(0.0, 0.0, dtype) and not stats.within_tolerance(1e-300, 0.0, dtype)
    assert stats.TOLERANCE["float32"] > stats.TOLERANCE["float64"]


# ----------------------------------------------------------------------------- peers

#: (x shape, kernel, C_out, stride, padding, dilation, groups): strided, grouped, uneven
#: padding ("same" with an even kernel puts the extra column on the right), dilated.
PEER_GEOMETRIES = [
    ((2, 3, 9, 9), (3, 3), 4, 2, 1, 1, 1),
    ((2, 4, 8, 8), (3, 3), 6, 1, 1, 1, 2),
    ((2, 4, 9, 8), (2, 4), 6, 1, "same", (2, 1), 2),
    ((1, 2, 11, 10), (3, 2), 4, (2, 3), (1, 2), (2, 2), 1),
]


def _peer_case(spec, rng, bias="channel"):
    x_shape, kernel, c_out, stride, padding, dilation, groups = spec
    geom = conv_geometry(x_shape, kernel, c_out, stride, padding, dilation, groups)
    x = rng.standard_normal(x_shape)
    w = rng.standard_normal(geom.shared_weight_shape())
    wl = rng.standard_normal(geom.local_weight_shape())
    b = {None: None, "channel": rng.standard_normal(c_out),
         "position": rng.standard_normal((c_out, geom.out_height, geom.out_width))}[bias]
    kw = dict(stride=stride, padding=padding, dilation=dilation, groups=groups)
    return geom, x, w, wl, b, kw


@pytest.mark.parametrize("spec", PEER_GEOMETRIES)
def test_numpy_baselines_match_the_reference(spec):
    geom, x, w, wl, b, kw = _peer_case(spec, np.random.default_rng(3))
    assert (geom.pad_left != geom.pad_right) == (kw["padding"] == "same")
    y = _bench_impls._numpy_conv2d_make({"x": x, "weight": w, "bias": b}, geom)()
    np.testing.assert_allclose(y, conv2d_ref(x, w, b, **kw), rtol=1e-10, atol=1e-10)
    y = _bench_impls._numpy_local_make({"x": x, "weight": wl, "bias": b}, geom)()
    np.testing.assert_allclose(y, local_conv2d_ref(x, wl, b, **kw), rtol=1e-10, atol=1e-10)


@needs_torch
@pytest.mark.parametrize("bias", [None, "channel", "position"])
@pytest.mark.parametrize("spec", PEER_GEOMETRIES)
def test_torch_peers_match_the_reference(spec, bias):
    geom, x, w, wl, b, kw = _peer_case(spec, np.random.default_rng(4), bias)
    t = (lambda a: None if a is None else torch.from_numpy(a))
    xt = t(x)
    y = _bench_impls.torch_unfold_einsum(torch, geom, t(wl), t(b))(xt).numpy()
    np.testing.assert_allclose(y, local_conv2d_ref(x, wl, b, **kw), rtol=1e-10, atol=1e-10)
    if bias != "position":
        y = _bench_impls.torch_conv2d(torch, geom, t(w), t(b))(xt).numpy()
        np.testing.assert_allclose(y, conv2d_ref(x, w, b, **kw), rtol=1e-10, atol=1e-10)


@needs_torch
@pytest.mark.parametrize("spec", PEER_GEOMETRIES[2:])
def test_timed_implementations_agree_on_uneven_padding(spec):
    """What the benchmark times (gpuconv, and the PyTorch peers under no_grad) on a
    geometry gpuconv reaches only through padding='same'."""
    geom, x, w, wl, b, kw = _peer_case(spec, np.random.default_rng(5))
    x, w, wl, b = (a.astype(np.float32) for a in (x, w, wl, b))
    refs = {"conv2d": conv2d_ref(x, w, b, **kw), "local_conv2d": local_conv2d_ref(x, wl, b, **kw)}
    for impl in _bench_impls.implementations("cpu", torch):
        weight = w if impl.op == "conv2d" else wl
        arrays = {"x": x, "weight": weight, "bias": b}
        if impl.array_kind == "torch":
            arrays = {k: torch.from_numpy(v) for k, v in arrays.items()}
        y = np.asarray(impl.make(arrays, geom)())
        np.testing.assert_allclose(y, refs[impl.op], rtol=1e-4, atol=1e-4, err_msg=repr(impl))


@pytest.mark.parametrize("device, torch_present, peers, expected", [
    ("cpu", True, True, "PyTorch"),
    ("cpu", False, True, "NumPy im2col baselines instead"),
    ("cuda", False, True, "none: PyTorch not installed"),
    ("cpu", True, False, "none asked for"),
])
def test_the_report_says_which_peers_ran_and_why(device, torch_present, peers, expected):
    fake = type("torch", (), {"__version__": "9.9", "cuda": type("cuda", (), {
        "is_available": staticmethod(lambda: False)})})
    text = _bench_impls.describe_peers(device, fake if torch_present else None, peers,
                                       None if torch_present else "not installed")
    assert expected in text
    names = {i.name for i in _bench_impls.implementations(
        device, fake if torch_present else None, peers)} - {"gpuconv"}
    for name in names:  # each peer that runs is named (the torch ones by what they call)
        assert {"torch": "conv2d", "torch-unfold": "unfold + einsum"}.get(name, name) in text


# ----------------------------------------------------------------------------- runs

def _impls(torch_module, peers=True, dial=()):
    """(op, impl, tiling, tiles) of what the benchmark picks on the CPU: the tests follow the
    list, not a copy."""
    return {i.key for i in _bench_impls.implementations("cpu", torch_module, peers,
                                                         dial=dial)}


def _check_run(result, impls, repeat=1, bursts=2):
    records = result["records"]
    assert {bench.suite.series_key(r) for r in records} == impls
    for r in records:
        assert r["median_s"] > 0 and r["samples"] == repeat * bursts and r["gflops"] > 0
        assert len(r["times_s"]) == r["samples"] and r["min_s"] == min(r["times_s"])
        assert r["first_call_s"] > 0 and r["max_rel_diff"] < stats.TOLERANCE["float32"]
        if r["op"] == "local_conv2d":
            assert r["peak_extra_bytes"] is not None and r["peak_extra_method"]
    machine = result["machine"]
    for key in ("cpu", "cores", "os", "python", "numpy", "numba", "torch", "device", "date",
                "ceilings", "peers_reason"):
        assert key in machine


@needs_torch
def test_tiny_run_with_torch(fast):
    result = bench.run_benchmark([TINY], repeat=1, bursts=2, progress=False)
    _check_run(result, _impls(torch))
    assert {key[1] for key in _impls(torch)} > {"gpuconv"}
    assert result["machine"]["torch"] == torch.__version__


def test_tiny_run_without_torch(fast):
    result = bench.run_benchmark([TINY_GROUPED], repeat=1, bursts=2, progress=False,
                                 torch=None)
    _check_run(result, _impls(None))
    assert {key[1] for key in _impls(None)} > {"gpuconv"}
    assert result["machine"]["torch"] is None
    assert "NumPy" in result["machine"]["peers_reason"]


def test_one_op_given_ceilings_and_clock(fast, monkeypatch):
    """What scripts/cpu_speed.py asks for: one operation, no ceiling measurement, CPU time."""
    import time

    def measured(*args, **kwargs):
        raise AssertionError("ceilings were given")
    monkeypatch.setattr(_bench_impls, "measure_ceilings", measured)
    result = bench.run_benchmark([TINY], repeat=1, bursts=1, progress=False, torch=None,
                                 ops=("local_conv2d",), ceilings={}, clock=time.process_time)
    assert {r["op"] for r in result["records"]} == {"local_conv2d"}
    assert result["machine"]["timing"]["clock"] == "process_time"
    assert all(r["compute_fraction"] is None for r in result["records"])


def test_what_does_not_fit_is_skipped_with_a_reason(fast, monkeypatch):
    geom = TINY.geometry(2)
    x_and_shared = (2 * 3 * 9 * 9 + 4 * 27) * 4
    local = int(np.prod(geom.local_weight_shape())) * 4
    # room for the shared op, not for the local weights
    monkeypatch.setattr(_bench_impls, "available_memory", lambda backend: int(
        (x_and_shared + 2000 + local / 2) / timing.MEMORY_FRACTION))
    result = bench.run_benchmark([TINY], repeat=1, bursts=1, progress=False, torch=None)
    by = {(r["op"], r["impl"]): r for r in result["records"]}
    assert by[("conv2d", "gpuconv")]["median_s"] > 0
    skipped = by[("local_conv2d", "gpuconv")]
    assert skipped["median_s"] is None and "available" in skipped["skipped"]
    assert "skipped: needs about" in bench.format_table(result["records"])


# ----------------------------------------------------------------------------- the dial

def _slots(size, tiles, tiling):
    """The kernel slot of each output row (column), as issue 21 defines it."""
    if tiling == "periodic":
        return np.arange(size) % tiles
    return np.floor(np.arange(size) * tiles / size).astype(int)


def _expand_tiled(w, out_hw, tiling):
    """Tiled weights ``(C_out, T_h, T_w, ...)`` -> one kernel per output position."""
    rows = _slots(out_hw[0], w.shape[1], tiling)
    cols = _slots(out_hw[1], w.shape[2], tiling)
    return np.asarray(w, dtype=np.float64)[:, rows][:, :, cols]


@pytest.mark.parametrize("spec", [PEER_GEOMETRIES[0], PEER_GEOMETRIES[2], PEER_GEOMETRIES[3]])
@pytest.mark.parametrize("tiling, tiles", [("periodic", (2, 2)), ("blocks", (4, 3))])
def test_the_timed_tiled_call_matches_the_reference(spec, tiling, tiles):
    """What the dial times is gpuconv.tiled_conv2d on the layer's geometry (uneven padding
    included), checked against a local convolution of the expanded weights."""
    geom, x, _, _, b, kw = _peer_case(spec, np.random.default_rng(6))
    w = np.random.default_rng(7).standard_normal(
        (geom.out_channels, *tiles, geom.in_channels_per_group, *spec[1]))
    (impl,) = _bench_impls.dial_implementations("cpu", [(tiling, tiles)])
    assert impl.weight_shape(geom) == w.shape and impl.key[2:] == (tiling, tiles)
    y = impl.make({"x": x, "weight": w, "bias": b}, geom)()
    ref = local_conv2d_ref(x, _expand_tiled(w, (geom.out_height, geom.out_width), tiling), b,
                           **kw)
    np.testing.assert_allclose(y, ref, rtol=1e-10, atol=1e-10)


def test_dial_records_carry_tiles_tiling_and_the_tiled_weight_size(fast):
    dial = (("periodic", (2, 2)), ("blocks", (4, 4)), ("blocks", (6, 6)))
    result = bench.run_benchmark([TINY], repeat=1, bursts=2, progress=False, torch=None,
                                 dial=dial)
    records = result["records"]
    tiled = [r for r in records if r["op"] == "tiled_conv2d"]
    assert [(r["tiling"], tuple(r["tiles"])) for r in tiled] == list(dial)
    assert result["machine"]["dial"] == [[tiling, list(tiles)] for tiling, tiles in dial]
    # burst and report order: conv2d, the dial, local_conv2d
    assert [r["op"] for r in records if r["impl"] == "gpuconv"] == \
        ["conv2d", "tiled_conv2d", "tiled_conv2d", "tiled_conv2d", "local_conv2d"]
    # the records of the ends are as before: no tiles, no tiling
    assert all("tiles" not in r and "tiling" not in r for r in records
               if r["op"] != "tiled_conv2d")
    n = records[0]["N"]
    for r in tiled[:2]:
        slots = r["tiles"][0] * r["tiles"][1]
        # by hand: 4 maps x slots x (3 channels x 3 x 3) weights, one bias per map
        assert (r["params_weights"], r["params_biases"]) == (4 * slots * 27, 4)
        # x (N x 3 x 9 x 9) + weights + biases + y (N x 4 x 5 x 5), float32
        assert r["bytes"] == (n * 243 + 4 * slots * 27 + 4 + n * 100) * 4
        assert r["flops"] == records[0]["flops"]  # the same multiply-adds as conv2d
        assert r["median_s"] > 0 and r["samples"] == 2
        assert r["max_rel_diff"] is None and r["compared_with"] is None  # no peer
    assert tiled[2]["median_s"] is None
    assert tiled[2]["skipped"] == "tiles 6x6 exceed the output 5x5"
    dial_ratios = bench.dial_speedups(records)["tiny"]
    assert set(dial_ratios) == {"periodic 2x2", "blocks 4x4"}
    assert dial_ratios["blocks 4x4"]["params"] == pytest.approx((16 * 108 + 4) / (108 + 4))
    assert dial_ratios["periodic 2x2"]["count"] == 2
    table = bench.format_table(records)
    for label in ("tiled_conv2d periodic 2x2", "tiled_conv2d blocks 4x4",
                  "tiled_conv2d blocks 6x6"):
        assert label in table
    assert "skipped: tiles 6x6 exceed the output 5x5" in table
    text = bench.format_report(result)
    assert "The sharing dial" in text and "params 15.5x" in text  # (16 x 108 + 4) / 112
    # the ends' sharing summary still compares local_conv2d with conv2d only
    local, shared = (next(r for r in records if (r["op"], r["impl"]) == (op, "gpuconv"))
                     for op in ("local_conv2d", "conv2d"))
    assert re.search(rf"tiny\s+params\s+{local['params'] / shared['params']:,.0f}x", text)
    assert "tiled_conv2d: no peer" in result["machine"]["peers_reason"]


def test_the_dial_is_off_by_default_and_with_no_dial(fast, monkeypatch, capsys):
    result = bench.run_benchmark([TINY], repeat=1, bursts=1, progress=False, torch=None)
    assert not any(r["op"] == "tiled_conv2d" for r in result["records"])
    assert "dial" not in result["machine"]
    code, out = _cli(["--device", "cpu", "--quick", "--repeat", "1", "--no-per-call",
                      "--no-dial"], monkeypatch, capsys, torch_available=False)
    assert code == 0 and "tiled_conv2d" not in out.out


def test_plot_draws_the_dial(fast, tmp_path):
    pytest.importorskip("matplotlib")
    from gpuconv.bench import plot as _bench_plot

    result = bench.run_benchmark([TINY], repeat=1, bursts=1, progress=False, torch=None,
                                 dial=bench.DIAL, sweep=("tiny", (1, 2)))
    path = tmp_path / "dial.png"
    _bench_plot.plot(result, str(path))
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def _table_cells(stdout):
    """Data rows of the first table in the report, split on runs of 2+ spaces."""
    lines = stdout.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("layer")) + 2
    rows = []
    for line in lines[start:]:
        if line.startswith(("%cmp", "Batch sweep", "What sharing")):
            break
        if line.strip():
            rows.append(re.split(r"\s{2,}", line.strip()))
    return rows


def _cli(argv, monkeypatch, capsys, torch_available=True):
    if not torch_available:
        monkeypatch.setattr(_bench_impls, "load_torch", lambda: None)
        monkeypatch.setattr(_bench_impls, "torch_problem", lambda: "not installed")
    args = parser().parse_args(argv)
    code = bench.run(args)
    return code, capsys.readouterr()


@pytest.mark.parametrize("torch_available", [
    pytest.param(True, marks=needs_torch), False])
def test_cli_quick_run_writes_json_and_png_that_agree_with_the_table(
        fast, monkeypatch, capsys, tmp_path, torch_available):
    pytest.importorskip("matplotlib")
    json_path, png_path = tmp_path / "bench.json", tmp_path / "bench.png"
    code, out = _cli(["--device", "cpu", "--quick", "--repeat", "1", "--json", str(json_path),
                      "--plot", str(png_path), "--wide"], monkeypatch, capsys, torch_available)
    assert code == 0
    assert png_path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    result = json.loads(json_path.read_text())
    assert set(result) == {"machine", "records"}
    suite = [r for r in result["records"] if r["part"] == "suite"]
    sweep = [r for r in result["records"] if r["part"] == "batch-sweep"]
    impls = _impls(torch if torch_available else None, dial=bench.suite.QUICK_DIAL)
    assert len(suite) == len(bench.suite.QUICK_LAYERS) * len(impls)
    tiled = [r for r in suite if r["op"] == "tiled_conv2d"]
    assert [(r["tiling"], tuple(r["tiles"])) for r in tiled] == list(bench.suite.QUICK_DIAL)
    assert not any(r["op"] == "tiled_conv2d" for r in sweep)  # the sweep times the ends
    assert sorted({r["N"] for r in sweep}) == sorted(bench.suite.SWEEP_BATCHES)
    assert (result["machine"]["torch"] is not None) == torch_available
    rows = _table_cells(out.out)
    assert len(rows) == len(suite)
    for row, r in zip(rows, suite):
        assert row[:4] == [r["layer"], bench.suite.series_label(r), r["impl"], str(r["N"])]
        assert row[4] == f"{r['median_s'] * 1e3:.4g}"
        assert float(row[4]) == pytest.approx(r["median_s"] * 1e3, rel=1e-3)
        assert float(row[6]) == pytest.approx(r["gflops"], rel=5e-3)
        assert row[10].rstrip("*") == f"{r['first_call_s'] * 1e3:.4g}"
    # Which peers ran, and why, in the report.
    why = "PyTorch" if torch_available else "PyTorch not installed, so NumPy im2col"
    flat = " ".join(out.out.split())  # the header is wrapped at 100 columns
    assert f"peers: {result['machine']['peers_reason']}" in flat and why in flat
    assert "%cmp = " in out.out and "more than 100 %" in out.out
    assert "What sharing buys" in out.out and "gpuconv vs peers: speedup = peer time" in out.out
    assert "The sharing dial" in out.out and "no framework offers it" in flat
    # Not a terminal: a line when it starts and with the ceilings, then one per finished
    # layer and sweep batch.
    news = out.err.splitlines()
    assert len(news) == 2 + len(bench.suite.QUICK_LAYERS) + len(bench.suite.SWEEP_BATCHES)
    assert "peers:" in news[0] and "ceilings:" in news[1] and "[1/1] tiny N=" in news[2]
    assert all(line.startswith("[") for line in news)


@pytest.mark.parametrize("flag", ["--json", "--plot"])
@pytest.mark.parametrize("where", ["missing-dir/out", "a-directory"])
def test_unwritable_outputs_are_refused_before_timing(fast, monkeypatch, capsys, tmp_path,
                                                      flag, where):
    if flag == "--plot":
        pytest.importorskip("matplotlib")
    (tmp_path / "a-directory").mkdir()
    monkeypatch.setattr(bench.timing, "run_benchmark", lambda *a, **k: pytest.fail("timed anyway"))
    code, out = _cli(["--device", "cpu", flag, str(tmp_path / where)], monkeypatch, capsys)
    assert code == 2 and out.out == ""
    assert out.err.startswith(f"gpuconv bench: error: {flag} ") and out.err.count("\n") == 1


def test_writable_check_leaves_no_file_and_keeps_an_existing_one(tmp_path):
    path = tmp_path / "new.json"
    assert appkit.unwritable(str(path)) is None and not path.exists()
    path.write_text("old")
    assert appkit.unwritable(str(path)) is None and path.read_text() == "old"


def test_plot_without_matplotlib_is_a_clear_error(fast, monkeypatch, capsys, tmp_path):
    from gpuconv.bench import plot as _bench_plot

    def missing():
        raise ImportError("No module named 'matplotlib'")
    monkeypatch.setattr(_bench_plot, "require_matplotlib", missing)
    code, out = _cli(["--device", "cpu", "--plot", str(tmp_path / "x.png")], monkeypatch, capsys)
    assert code == 2 and "pip install 'gpuconv[bench]'" in out.err
    assert not (tmp_path / "x.png").exists()


@pytest.mark.skipif(cuda_available(), reason="a CUDA device is present")
def test_cuda_without_a_gpu_is_a_clear_error(fast, monkeypatch, capsys):
    code, out = _cli(["--device", "cuda", "--quick"], monkeypatch, capsys)
    assert code == 2 and "device='cpu'" in out.err


def test_progress_modes():
    import io

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    assert appkit.Progress.choose(3, None, io.StringIO()).mode == "lines"
    assert appkit.Progress.choose(3, None, Terminal()).mode == "bar"
    assert appkit.Progress.choose(3, False, Terminal()).mode is None
    stream = io.StringIO()
    quiet = appkit.Progress(3, stream, None)
    quiet.step("a")
    quiet.line("news")
    assert stream.getvalue() == ""
    lines = appkit.Progress(3, stream, "lines")
    lines.step("a")
    assert stream.getvalue() == ""  # steps draw nothing without a terminal
    lines.line("layer done")
    assert stream.getvalue().endswith("s] layer done\n")
    stream = io.StringIO()
    bar = appkit.Progress(2, stream, "bar")
    bar.step("layer")
    bar.close()
    assert "[###############" in stream.getvalue() and "1/2" in stream.getvalue()


def _timed(op, impl, times, layer="tiny"):
    return bench.make_record(op, impl, layer, "cpu", "float32", TINY.geometry(2), times)


def test_summary_speaks_in_speedups():
    records = [
        _timed("conv2d", "gpuconv", [2e-3]),
        _timed("conv2d", "torch", [1e-3]),
        _timed("local_conv2d", "gpuconv", [6e-3]),
        _timed("local_conv2d", "torch-unfold", [12e-3]),
    ]
    text = bench.format_summary({"machine": {"ceilings": CEILINGS}, "records": records})
    geom = TINY.geometry(2)
    ratio = bench.param_count("local_conv2d", geom).total / bench.param_count("conv2d", geom).total
    assert re.search(rf"params +{ratio:,.0f}x +speedup 3x \[3-3\] over 1 pairs", text)
    # peer time / gpuconv time everywhere: torch is twice as fast, unfold + einsum half
    assert "conv2d vs torch 0.5x" in text and "local_conv2d vs torch-unfold 2x" in text
    assert "gpuconv / time of the peer" not in text


def test_sharing_speedup_has_the_spread_of_paired_calls():
    shared = [1.0, 1.0, 4.0, 1.0, 1.0, 1.0]       # the third call hit a slow spell...
    unshared = [3.0, 2.0, 12.0, 4.0, 3.0, 3.0]   # ...and so did its pair
    records = [_timed("conv2d", "gpuconv", [t * 1e-3 for t in shared]),
               _timed("local_conv2d", "gpuconv", [t * 1e-3 for t in unshared])]
    cell = bench.sharing_speedups(records)["tiny"]
    assert cell["count"] == 6
    assert (cell["q1"], cell["median"], cell["q3"]) == pytest.approx((3.0, 3.0, 3.0))
    assert cell["speedup"] == pytest.approx(3.0 / 1.0)  # the medians' ratio, as the table
    assert "speedup 3x [3-3] over 6 pairs" in bench.format_summary(
        {"machine": {"ceilings": {}}, "records": records})
    # Records written before times_s existed: the medians' ratio, no spread.
    for r in records:
        r.pop("times_s")
    cell = bench.sharing_speedups(records)["tiny"]
    assert cell["median"] is None and cell["speedup"] == pytest.approx(3.0)


def test_peer_speedups_are_geometric_means_of_peer_over_gpuconv_time():
    records = []
    for layer, mine, peer in (("a", 1e-3, 4e-3), ("b", 4e-3, 1e-3), ("c", 1e-3, 8e-3)):
        records.append(_timed("local_conv2d", "gpuconv", [mine], layer))
        records.append(_timed("local_conv2d", "torch-unfold", [peer], layer))
    speedups = bench.peer_speedups(records)
    assert speedups["local_conv2d vs torch-unfold"]["layers"] == 3
    # (4 * 1/4 * 8) ** (1/3)
    assert speedups["local_conv2d vs torch-unfold"]["geomean_speedup"] == pytest.approx(2.0)


def test_cuda_path_in_the_simulator(tmp_path):
    """The CUDA branch (events or wall clock, device arrays, no peers) on a tiny layer, in a
    fresh process so that the simulator is on from the start."""
    import os
    import pathlib

    code = """
import json, sys
from gpuconv import bench
from gpuconv.bench import peers
peers.measure_ceilings = lambda *a, **k: {"bandwidth_gbs": 1.0, "compute_gflops": None}
tiny = bench.Layer("tiny", "t", 1, 1, 2, 6, 2, 3, 1, 0, "the tests")
result = bench.run_benchmark([tiny], device="cuda", repeat=1, bursts=1, progress=False,
                             torch=None)
json.dump({"file": bench.__file__, **result}, sys.stdout)
"""
    root = pathlib.Path(__file__).resolve().parents[1]
    env = dict(os.environ, NUMBA_ENABLE_CUDASIM="1")
    env["PYTHONPATH"] = os.pathsep.join([str(root)] + (
        [env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    env.pop("GPUCONV_DEVICE", None)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env=env, timeout=120, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert pathlib.Path(result["file"]).resolve() == pathlib.Path(bench.__file__).resolve()
    assert {(r["op"], r["impl"]) for r in result["records"]} == {
        ("conv2d", "gpuconv"), ("local_conv2d", "gpuconv")}
    assert result["machine"]["peers_reason"].startswith("none")
    for r in result["records"]:
        assert r["device"] == "cuda" and r["median_s"] > 0 and r["max_rel_diff"] < 1e-5


def test_progress_reaches_its_total(fast, monkeypatch):
    seen = []
    monkeypatch.setattr(appkit.Progress, "close", lambda self: seen.append(
        (self.done, self.total)))
    bursts, batches = 2, (1, 2)
    bench.run_benchmark([TINY, TINY_GROUPED], repeat=1, bursts=bursts, progress=False,
                        torch=None, sweep=(TINY, batches))
    steps = len(_impls(None)) * (1 + bursts) * (2 + len(batches))
    assert seen == [(steps, steps)]


def _script(name):
    import importlib.util
    import pathlib

    path = pathlib.Path(__file__).resolve().parents[1] / "scripts" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_cpu_speed_is_the_benchmark_with_each_layers_own_operation(fast, monkeypatch):
    cpu_speed = _script("cpu_speed")
    for op, names in cpu_speed.SELECTION.items():
        assert names and all(name in bench.suite.LAYERS for name in names)
    assert "deepface-l5" in cpu_speed.SELECTION["local_conv2d"]
    assert "deepface-l5" not in cpu_speed.SELECTION["conv2d"]
    assert cpu_speed._layer("DeepFace L5 (local)") == cpu_speed._layer("deepface-l5")
    monkeypatch.setattr(cpu_speed, "SELECTION", {"conv2d": ["tiny"], "local_conv2d": ["tiny"]})
    result = cpu_speed.run(("local_conv2d",), rounds=1, burst=2, torch=None, progress=False)
    assert {r["op"] for r in result["records"]} == {"local_conv2d"}
    (row,) = cpu_speed.rows(result["records"])
    assert row["speedup"] == pytest.approx(row["peer"]["median_s"] / row["gpuconv"]["median_s"])
    text = cpu_speed.format_rows(result)
    assert f"| {row['speedup']:6.2f} |" in text and "geometric-mean speedup" in text


def test_time_kernels_wrapper_defaults():
    module = _script("time_kernels")
    args = module.build_parser().parse_args([])
    assert args.quick and not args.peers and args.device == "auto"
    args = module.build_parser().parse_args(["--peers", "--full-size", "--layers", "deepface-l4"])
    assert args.peers and not args.quick and args.layers == ["deepface-l4"]


# ----------------------------------------------------------------------------- passes

def test_backward_and_step_flops_and_bytes_by_hand():
    """The backward is the input gradient and the weight gradient, each the forward's
    multiply-adds; its fewest bytes are those of the two calls, each reading its operands
    and writing its gradient once."""
    geom = TINY.geometry(2)  # x 2x3x9x9 = 486, y 2x4x5x5 = 200, kernel 3x3x3
    forward = 2 * 2 * 4 * 5 * 5 * 3 * 3 * 3
    assert geom.flops == forward == 10_800
    shared, local, x, y = 4 * 27, 4 * 5 * 5 * 27, 486, 200
    expected = {
        ("conv2d", "backward"): (2 * forward, ((shared + y + x) + (x + y + shared)) * 4),
        ("local_conv2d", "backward"): (2 * forward, ((local + y + x) + (x + y + local)) * 4),
        ("conv2d", "step"): (3 * forward, (x + shared + 4 + y) * 4
                             + ((shared + y + x) + (x + y + shared)) * 4 + 4 * 4),
        # the step's local layer has a bias per position (4 x 5 x 5)
        ("local_conv2d", "step"): (3 * forward, (x + local + 100 + y) * 4
                                   + ((local + y + x) + (x + y + local)) * 4 + 100 * 4),
    }
    for (op, pass_name), (flops, nbytes) in expected.items():
        r = bench.make_record(op, "gpuconv", "tiny", "cpu", "float32", geom, [1e-3], CEILINGS,
                              pass_name=pass_name)
        assert r["pass"] == pass_name and r["flops"] == flops and r["bytes"] == nbytes
        assert r["gflops"] == pytest.approx(flops / 1e-3 / 1e9)
        assert r["bandwidth_fraction"] == pytest.approx(nbytes / 1e-3 / 1e9 / 20.0)
        weights = shared if op == "conv2d" else local
        assert r["grad_weight_bytes"] == weights * 4
    assert stats.grad_bytes("local_conv2d", "input", geom, 4) == (local + y + x) * 4
    assert stats.grad_bytes("local_conv2d", "weight", geom, 8) == (x + y + local) * 8
    r = bench.make_record("conv2d", "gpuconv", "tiny", "cpu", "float32", geom, [1e-3])
    assert r["pass"] == "forward" and r["grad_weight_bytes"] is None and r["flops"] == forward
    r = bench.make_record("local_conv2d", "gpuconv", "tiny", "cpu", "float32", geom, [1e-3],
                          pass_name="backward", peak_extra_bytes=30_000, result_bytes=12_744)
    assert r["peak_scratch_bytes"] == 30_000 - 12_744


@pytest.mark.parametrize("argv, passes", [
    ([], ("forward",)), (["--pass", "backward"], ("backward",)),
    (["--pass", "both"], ("forward", "backward")), (["--pass", "step", "forward"],
                                                    ("forward", "step")),
    (["--pass", "all"], ("forward", "backward", "step"))])
def test_pass_option(argv, passes):
    assert bench.resolve_passes(parser().parse_args(argv).passes) == passes


def test_bad_pass_is_an_argparse_error(capsys):
    with pytest.raises(SystemExit) as exc:
        parser().parse_args(["--pass", "sideways"])
    assert exc.value.code == 2 and "invalid choice" in capsys.readouterr().err


def _grad_refs(x, w, wl, gy, kw):
    return {
        "conv2d": (conv2d_input_grad_ref(x.shape, w, gy, **kw),
                   conv2d_weight_grad_ref(x, w.shape, gy, **kw)),
        "local_conv2d": (local_conv2d_input_grad_ref(x.shape, wl, gy, **kw),
                         local_conv2d_weight_grad_ref(x, wl.shape, gy, **kw)),
    }


@needs_torch
@pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel:UserWarning")
@pytest.mark.parametrize("spec", PEER_GEOMETRIES)
def test_backward_and_step_implementations_match_the_reference(spec):
    """Every implementation the backward and the step time, on float64 arrays, against the
    float64 gradient references (the step's bias gradient: gy summed over the batch, and
    over the positions for a bias per channel)."""
    geom, x, w, wl, b, kw = _peer_case(spec, np.random.default_rng(6))
    gy = np.random.default_rng(7).standard_normal(geom.output_shape)
    b_position = np.random.default_rng(8).standard_normal(geom.output_shape[1:])
    refs = _grad_refs(x, w, wl, gy, kw)
    seen = set()
    for impl in _bench_impls.implementations("cpu", torch, passes=("backward", "step")):
        local = impl.op == "local_conv2d"
        bias = b_position if local and impl.pass_name == "step" else b
        arrays = {"x": x, "weight": wl if local else w, "bias": bias, "gy": gy}
        if impl.array_kind == "torch":
            arrays = {k: torch.from_numpy(v) for k, v in arrays.items()}
        result = impl.make(arrays, geom)()
        if impl.canonical is not None:
            result = impl.canonical(result, geom)
        result = [np.asarray(r.detach().numpy() if hasattr(r, "detach") else r) for r in result]
        expected = list(refs[impl.op])
        if impl.pass_name == "step":
            expected.append(gy.sum(0) if local else gy.sum((0, 2, 3)))
        assert len(result) == len(expected), impl
        for got, want in zip(result, expected):
            np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-10, err_msg=repr(impl))
        seen.add((impl.pass_name, impl.op, impl.name))
    assert {("backward", "conv2d", "torch"), ("backward", "local_conv2d", "torch-unfold"),
            ("step", "local_conv2d", "torch-bmm"), ("step", "conv2d", "gpuconv")} <= seen


@needs_torch
@pytest.mark.parametrize("spec", PEER_GEOMETRIES)
def test_pytorch_only_local_layers_are_locally_connected(spec):
    """The step's PyTorch-only layers: the forward of gpuconv.local_conv2d (any batch size),
    their weights given and returned in gpuconv's layout, and the bmm layout round trip."""
    geom, x, _, wl, b, kw = _peer_case(spec, np.random.default_rng(9), "position")
    for name, cls in _bench_impls.locally_connected_layers(torch).items():
        layer = cls(geom, torch.from_numpy(wl), torch.from_numpy(b))
        for xb in (x, x[:1]):
            y = layer(torch.from_numpy(xb)).detach().numpy()
            np.testing.assert_allclose(y, local_conv2d_ref(xb, wl, b, **kw), rtol=1e-10,
                                       atol=1e-10, err_msg=name)
        assert torch.equal(layer.weight_in_gpuconv_layout().detach(), torch.from_numpy(wl))
    t = torch.from_numpy(wl)
    assert torch.equal(_bench_impls.from_bmm_weight_layout(
        _bench_impls.bmm_weight_layout(t, geom), geom), t)


def test_describe_peers_says_what_the_gradients_miss_without_torch():
    text = _bench_impls.describe_peers("cpu", None, True, "not installed",
                                       ("forward", "backward", "step"))
    assert "NumPy im2col baselines instead" in text
    assert "backward: none, PyTorch not installed: missing torch" in text
    assert "torch-unfold (autograd's backward through unfold + einsum)" in text
    assert "step: not run, PyTorch not installed" in text
    assert _bench_impls.implementations("cpu", None, True, ("step",)) == []
    assert {(i.op, i.name) for i in _bench_impls.implementations(
        "cpu", None, True, ("backward",))} == {("conv2d", "gpuconv"), ("local_conv2d", "gpuconv")}


def _check_pass_run(result, passes, torch_module):
    records = result["records"]
    assert [p for p in bench.PASSES if p in {r["pass"] for r in records}] == list(passes)
    by = {(r["pass"], r["op"], r["impl"]): r for r in records}
    for (pass_name, op, impl), r in by.items():
        forward = by[("forward", op, "gpuconv")] if ("forward", op, "gpuconv") in by else None
        assert r["flops"] == stats.PASS_FLOPS[pass_name] * TINY.geometry(r["N"]).flops
        if forward is not None:
            assert r["flops"] == stats.PASS_FLOPS[pass_name] * forward["flops"]
        assert r["median_s"] > 0 and r["max_rel_diff"] < stats.TOLERANCE["float32"], r
        if pass_name != "forward":
            assert r["grad_weight_bytes"] > 0 and r["result_bytes"] > 0
    expected = {(i.pass_name, i.op, i.name)
                for i in _bench_impls.implementations("cpu", torch_module, True, passes)}
    assert set(by) == expected


@needs_torch
def test_tiny_run_of_every_pass(fast):
    passes = ("forward", "backward", "step")
    result = bench.run_benchmark([TINY], repeat=1, bursts=1, progress=False, passes=passes)
    _check_pass_run(result, passes, torch)
    machine = result["machine"]
    assert machine["passes"] == list(passes) and machine["passes_not_run"] == {}
    assert set(machine["peers_by_pass"]["step"]) == {
        "conv2d: torch", "local_conv2d: torch-unfold", "local_conv2d: torch-bmm"}
    local = [r for r in result["records"] if r["op"] == "local_conv2d"
             and r["pass"] == "backward"]
    for r in local:
        assert r["peak_extra_bytes"] >= r["result_bytes"] > 0
        assert r["peak_scratch_bytes"] == r["peak_extra_bytes"] - r["result_bytes"]
    text = bench.format_report(result)
    for title in bench.suite.PASS_TITLES.values():
        assert title in text
    assert "conv2d backward vs torch" in text and "local_conv2d step vs torch-bmm" in text
    assert "of copy bandwidth" in text and "weight gradient" in text


def test_backward_without_torch_runs_gpuconv_and_says_what_is_missing(fast):
    result = bench.run_benchmark([TINY_GROUPED], repeat=1, bursts=1, progress=False,
                                 torch=None, passes=("backward", "step"))
    assert {(r["pass"], r["impl"]) for r in result["records"]} == {("backward", "gpuconv")}
    for r in result["records"]:
        assert r["flops"] == 2 * TINY_GROUPED.geometry(r["N"]).flops and r["median_s"] > 0
    machine = result["machine"]
    assert "step" in machine["passes_not_run"]
    text = bench.format_report(result)
    assert "missing torch" in text and "autograd: not run, PyTorch not used" in text
    assert "no peer ran in this pass" in text


def test_a_failing_implementation_is_recorded_when_asked(fast, monkeypatch):
    real = _bench_impls.implementations

    def broken(*args, **kwargs):
        impls = real(*args, **kwargs)
        for impl in impls:
            if impl.op == "local_conv2d" and impl.name == "gpuconv":
                def make(arrays, geom):
                    def call():
                        raise RuntimeError("no kernel")
                    return call
                impl.make = make
        return impls
    monkeypatch.setattr(_bench_impls, "implementations", broken)
    with pytest.raises(RuntimeError, match="no kernel"):
        bench.run_benchmark([TINY], repeat=1, bursts=1, progress=False, torch=None)
    result = bench.run_benchmark([TINY], repeat=1, bursts=1, progress=False, torch=None,
                                 passes=("backward",), on_error="record")
    by = {(r["op"], r["impl"]): r for r in result["records"]}
    assert by[("local_conv2d", "gpuconv")]["skipped"] == "failed: RuntimeError: no kernel"
    assert by[("conv2d", "gpuconv")]["median_s"] > 0


def _grad_timed(op, impl, times, layer="tiny", pass_name="backward", **extra):
    return bench.make_record(op, impl, layer, "cpu", "float32", TINY.geometry(2), times,
                             CEILINGS, pass_name=pass_name, **extra)


def test_summary_per_pass_with_bandwidth_and_memory():
    geom = TINY.geometry(2)
    gw = bench.param_count("local_conv2d", geom).weights * 4
    records = [_timed("conv2d", "gpuconv", [1e-3]), _timed("conv2d", "torch", [3e-3])]
    for layer, mine, peer in (("a", 1e-3, 2e-3), ("b", 1e-3, 8e-3)):
        records += [_grad_timed("conv2d", "gpuconv", [mine], layer),
                    _grad_timed("conv2d", "torch", [peer / 4], layer),
                    _grad_timed("local_conv2d", "gpuconv", [mine], layer,
                                peak_extra_bytes=gw + 5000, result_bytes=gw + 1944),
                    _grad_timed("local_conv2d", "torch-unfold", [peer], layer)]
    speedups = bench.peer_speedups(records)
    assert speedups["conv2d vs torch"]["geomean_speedup"] == pytest.approx(3.0)
    assert speedups["conv2d backward vs torch"]["geomean_speedup"] == pytest.approx(1.0)
    assert speedups["local_conv2d backward vs torch-unfold"]["geomean_speedup"] == \
        pytest.approx(4.0)
    assert speedups["local_conv2d backward vs torch-unfold"]["pass"] == "backward"
    ceilings = dict(CEILINGS, bandwidth_new_gbs=8.0)
    share = bench.local_bandwidth(records, "backward", ceilings)
    gbs = stats.min_bytes("local_conv2d", geom, 4, "backward") / 1e-3 / 1e9
    assert share["count"] == 2 and share["geomean_fraction"] == pytest.approx(gbs / 20.0)
    assert share["geomean_fraction_new"] == pytest.approx(gbs / 8.0)
    assert bench.local_bandwidth(records, "backward")["layers_new"] == {}
    memory = bench.backward_memory(records)
    assert memory["a"]["peak_scratch_bytes"] == 5000 - 1944
    assert memory["a"]["grad_weight_bytes"] == gw
    text = bench.format_summary({"machine": {"ceilings": ceilings}, "records": records})
    assert "conv2d vs torch 3x" in text  # the forward, as before
    assert re.search(r"conv2d backward vs torch +1x over 2 layers", text)
    assert re.search(r"local_conv2d backward vs torch-unfold +4x over 2 layers", text)
    assert (f"geometric mean {gbs / 20.0 * 100:.1f}% of copy bandwidth "
            f"({gbs / 8.0 * 100:.1f}% of a copy into a new array)") in text
    row = [line.split() for line in text.splitlines() if line.startswith("  a ")][-1]
    assert row == ["a", f"{gbs / 20.0 * 100:.1f}%", f"{gbs / 8.0 * 100:.1f}%",
                   f"{(5000 - 1944) / 1e6:.1f}", f"{gw / 1e6:.1f}"]
    assert "below the weight gradient's size on 2 of 2 layers" in text
    assert "into a new array 8 GB/s" in " ".join(text.split())


@pytest.mark.parametrize("torch_available", [
    pytest.param(True, marks=needs_torch), False])
def test_cli_pass_both_writes_pass_fields(fast, monkeypatch, capsys, tmp_path, torch_available):
    json_path = tmp_path / "bench.json"
    code, out = _cli(["--device", "cpu", "--quick", "--repeat", "1", "--pass", "both",
                      "--json", str(json_path)], monkeypatch, capsys, torch_available)
    assert code == 0
    result = json.loads(json_path.read_text())
    records = result["records"]
    forward = [r for r in records if r["pass"] == "forward"]
    backward = [r for r in records if r["pass"] == "backward"]
    assert forward and backward and len(forward) + len(backward) == len(records)
    for r in backward:
        twin = next(f for f in forward if (f["layer"], f["op"]) == (r["layer"], r["op"]))
        assert r["flops"] == 2 * twin["flops"] and r["grad_weight_bytes"] > 0
        assert set(r) == set(twin)  # one schema; the forward's keys plus pass and its fields
    assert result["machine"]["passes"] == ["forward", "backward"]
    assert "--pass both" in result["machine"]["command"]
    assert "Backward pass: dL/dx and dL/dw" in out.out and "backward: " in out.out
    news = out.err.splitlines()
    assert any(" backward: conv2d gpuconv" in line for line in news)
    if not torch_available:
        assert "missing torch" in out.out


def test_cli_step_without_torch_is_a_clear_error(fast, monkeypatch, capsys):
    monkeypatch.setattr(bench.timing, "run_benchmark", lambda *a, **k: pytest.fail("timed anyway"))
    code, out = _cli(["--device", "cpu", "--pass", "step"], monkeypatch, capsys,
                     torch_available=False)
    assert code == 2 and "need PyTorch" in out.err and out.out == ""


def test_one_core_sets_threads_and_the_clock(fast, monkeypatch, capsys):
    import time

    import numba

    seen = {}

    def fake_run(names, **kwargs):
        seen.update(kwargs, threads=numba.get_num_threads())
        raise SystemExit(0)
    threads = numba.get_num_threads()
    monkeypatch.setattr(bench.timing, "run_benchmark", fake_run)
    try:
        with pytest.raises(SystemExit):
            _cli(["--device", "cpu", "--one-core", "--quick"], monkeypatch, capsys,
                 torch_available=False)
    finally:
        numba.set_num_threads(threads)
    assert seen["clock"] is time.process_time and seen["threads"] == 1


def test_autotune_is_on_for_the_timed_run_only_and_cuda_only(fast, monkeypatch, capsys):
    from gpuconv import device as _device

    monkeypatch.setattr(_device, "_AUTOTUNE", [False])
    monkeypatch.setattr(bench.timing, "run_benchmark",
                        lambda *a, **k: pytest.fail("timed anyway"))
    code, out = _cli(["--device", "cpu", "--autotune"], monkeypatch, capsys,
                     torch_available=False)
    assert code == 2 and "--autotune chooses among CUDA kernels" in out.err

    seen = {}

    def fake_run(names, **kwargs):
        seen["autotune"] = _device.autotune_enabled()
        raise SystemExit(0)

    monkeypatch.setattr(command, "select_device", lambda device: "cuda")
    monkeypatch.setattr(bench.timing, "run_benchmark", fake_run)
    monkeypatch.setattr(command, "_expected_duration", lambda *a: None)
    with pytest.raises(SystemExit):
        _cli(["--device", "cuda", "--autotune", "--no-per-call"], monkeypatch, capsys,
             torch_available=False)
    assert seen == {"autotune": True} and _device.autotune_enabled() is False
    args = parser().parse_args(["--device", "cuda", "--autotune"])
    assert "--autotune" in command._command_of(args)


def test_cpu_speed_times_the_gradients_too(fast, monkeypatch):
    cpu_speed = _script("cpu_speed")
    monkeypatch.setattr(cpu_speed, "SELECTION", {"conv2d": ["tiny"], "local_conv2d": ["tiny"]})
    result = cpu_speed.run(("conv2d", "local_conv2d"), rounds=1, burst=1, torch=None,
                           progress=False, passes=("forward", "backward"),
                           ceilings=dict(CEILINGS))
    rows = cpu_speed.rows(result["records"])
    assert {(row["op"], row["pass"]) for row in rows} == {
        (op, p) for op in ("conv2d", "local_conv2d") for p in ("forward", "backward")}
    for row in rows:
        if row["pass"] == "backward":
            assert row["peer"] is None  # no NumPy peer for the gradients
    text = cpu_speed.format_rows(result)
    assert "| backward |" in text and "local_conv2d backward: geometric mean" in text


def test_cli_backward_with_plot_sweeps_the_backward(fast, monkeypatch, capsys, tmp_path):
    pytest.importorskip("matplotlib")
    json_path, png_path = tmp_path / "bench.json", tmp_path / "bench.png"
    code, out = _cli(["--device", "cpu", "--quick", "--repeat", "1", "--pass", "backward",
                      "--json", str(json_path), "--plot", str(png_path)], monkeypatch, capsys,
                     torch_available=False)
    assert code == 0 and png_path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    records = json.loads(json_path.read_text())["records"]
    assert {r["pass"] for r in records} == {"backward"}
    sweep = [r for r in records if r["part"] == "batch-sweep"]
    assert sorted({r["N"] for r in sweep}) == sorted(bench.suite.SWEEP_BATCHES)
    assert "Batch sweep (tiny, backward):" in out.out


# ----------------------------------------------------------------------------- float16

def test_float16_tolerance_and_reduction_terms_by_hand():
    geom = TINY_GROUPED.geometry(2)  # N=2, C_in=4, 8x8, C_out=6, k=3, pad 1, groups=2: 8x8 out
    assert stats.reduction_terms("conv2d", geom) == 2 * 9 + 1
    assert stats.reduction_terms("local_conv2d", geom, "forward") == 19
    # input gradient 3 * 9 = 27; weight gradient 2 * 64 = 128 (conv2d), 2 (local_conv2d)
    assert stats.reduction_terms("conv2d", geom, "backward") == 128
    assert stats.reduction_terms("local_conv2d", geom, "backward") == 27
    assert stats.reduction_terms("local_conv2d", geom, "step") == 27
    for terms in (1, 19, 10_000):
        assert stats.tolerance("float16", terms) == half_tolerance(terms)  # the tests' own
    assert stats.tolerance("float32", 19) == stats.TOLERANCE["float32"]
    assert stats.within_tolerance(1e-3, 2.0, "float16", 19)
    assert not stats.within_tolerance(3e-3, 2.0, "float16", 19)
    with pytest.raises(ValueError, match="terms"):
        stats.tolerance("float16")


def test_float16_inputs_are_float32_draws_rounded():
    a = timing._normal(np.random.default_rng(3), (5, 7), "float16")
    b = np.random.default_rng(3).standard_normal((5, 7), dtype=np.float32)
    assert a.dtype == np.float16 and np.array_equal(a, b.astype(np.float16))
    x, shared, bias = timing._random_arrays(np.random.default_rng(0), TINY.geometry(2),
                                            "float16")
    assert {x.dtype, shared.dtype, bias.dtype} == {np.dtype(np.float16)}
    assert np.isfinite(x).all() and x.std() > 0.5


def _check_half_records(result, passes):
    records = result["records"]
    assert records and {r["pass"] for r in records} == set(passes)
    for r in records:
        geom = TINY.geometry(r["N"])
        bias = "position" if (r["op"], r["pass"]) == ("local_conv2d", "step") else "channel"
        nbytes = stats.min_bytes(r["op"], geom, 2, r["pass"], bias)
        assert r["dtype"] == "float16" and r["bytes"] == nbytes
        assert 2 * r["bytes"] == stats.min_bytes(r["op"], geom, 4, r["pass"], bias)
        assert r["gbs"] == pytest.approx(nbytes / r["median_s"] / 1e9)
        assert r["bandwidth_fraction"] == pytest.approx(r["gbs"] / CEILINGS["bandwidth_gbs"])
        assert r["tolerance"] == half_tolerance(stats.reduction_terms(r["op"], geom, r["pass"]))
        assert r["max_rel_diff"] <= r["tolerance"], r
        # the results are float16 too: 2 bytes per value
        out = geom.batch * geom.out_channels * geom.out_height * geom.out_width
        if r["pass"] == "forward":
            assert r["result_bytes"] == 2 * out
        else:
            assert r["grad_weight_bytes"] == 2 * r["params_weights"]


@needs_torch
def test_float16_run_with_torch_times_every_pass_it_can(fast):
    result = bench.run_benchmark([TINY], dtype="float16", repeat=1, bursts=1, progress=False,
                                 passes=bench.PASSES)
    _check_half_records(result, ("forward", "backward"))
    assert {r["impl"] for r in result["records"]} == {"gpuconv", "torch", "torch-unfold"}
    machine = result["machine"]
    assert machine["dtype"] == "float16"
    assert machine["passes_not_run"] == {"step": bench.suite.STEP_FLOAT16}
    text = bench.format_report(result)
    assert "float16" in text.splitlines()[0] and "timed in float32 and float64" in text
    assert "Agreement: all 8 results within the float16 tolerance" in text


def test_float16_run_without_torch_casts_the_numpy_baselines(fast):
    result = bench.run_benchmark([TINY], dtype="float16", repeat=1, bursts=1, progress=False,
                                 torch=None)
    _check_half_records(result, ("forward",))
    peers = [r for r in result["records"] if r["impl"] != "gpuconv"]
    assert {r["impl"] for r in peers} == {"numpy-im2col", "numpy-im2col-matmul"}
    assert all("cast to float32 and back" in r["description"] for r in peers)


def test_numpy_baselines_in_float16_match_the_reference():
    geom = conv_geometry((2, 4, 9, 8), (3, 3), 6, 2, 1, 1, 2)
    rng = np.random.default_rng(5)
    x = rng.standard_normal(geom.input_shape).astype(np.float16)
    w = rng.standard_normal(geom.shared_weight_shape()).astype(np.float16)
    wl = rng.standard_normal(geom.local_weight_shape()).astype(np.float16)
    b = rng.standard_normal(6).astype(np.float16)
    kw = dict(stride=2, padding=1, dilation=1, groups=2)
    tol = half_tolerance(stats.reduction_terms("conv2d", geom))
    for make, weight, ref in ((_bench_impls._numpy_conv2d_make, w, conv2d_ref),
                              (_bench_impls._numpy_local_make, wl, local_conv2d_ref)):
        y = make({"x": x, "weight": weight, "bias": b}, geom)()
        expected = ref(x, weight, b, **kw)
        bound = ref(np.abs(x), np.abs(weight), np.abs(b), **kw)
        assert y.dtype == np.float16
        assert np.abs(y - expected).max() <= tol * bound.max()


def test_a_peer_without_float16_is_skipped_with_the_reason(fast, monkeypatch):
    real = _bench_impls.implementations

    def no_half(*args, **kwargs):
        impls = real(*args, **kwargs)
        for impl in impls:
            if impl.name != "gpuconv":
                def make(arrays, geom):
                    def call():
                        raise RuntimeError('"slow_conv2d_cpu" not implemented for \'Half\'')
                    return call
                impl.make = make
        return impls
    monkeypatch.setattr(_bench_impls, "implementations", no_half)
    result = bench.run_benchmark([TINY], dtype="float16", repeat=1, bursts=1, progress=False,
                                 torch=None)  # the default on_error="raise" must not raise
    skipped = [r for r in result["records"] if r["skipped"]]
    assert skipped and {r["impl"] for r in skipped} == {"numpy-im2col", "numpy-im2col-matmul"}
    for r in skipped:
        assert r["skipped"].startswith("float16 not supported by this peer on cpu: RuntimeError")
    assert all(r["median_s"] > 0 for r in result["records"] if r["impl"] == "gpuconv")
    assert "float16 not supported by this peer" in bench.format_table(result["records"])
    with pytest.raises(RuntimeError):  # in float32 the same failure is an error
        bench.run_benchmark([TINY], repeat=1, bursts=1, progress=False, torch=None)


def test_float16_results_outside_the_tolerance_are_reported(fast, monkeypatch):
    """The agreement check can fail: gpuconv's float16 output off by 1 % (10x the tolerance)."""
    real = _bench_impls.implementations

    def off(*args, **kwargs):
        impls = real(*args, **kwargs)
        for impl in impls:
            if (impl.op, impl.name) == ("conv2d", "gpuconv"):
                make = impl.make
                impl.make = (lambda m: lambda arrays, geom: (
                    lambda fn: lambda: (fn() * np.float16(1.01)).astype(np.float16))(
                        m(arrays, geom)))(make)
        return impls
    monkeypatch.setattr(_bench_impls, "implementations", off)
    result = bench.run_benchmark([TINY], dtype="float16", repeat=1, bursts=1, progress=False,
                                 torch=None)
    wrong = [r for r in result["records"] if r["max_rel_diff"] > r["tolerance"]]
    assert [(r["op"], r["impl"]) for r in wrong] == [("conv2d", "gpuconv")]
    assert "Agreement: outside the tolerance" in bench.format_summary(result)


def test_cli_float16(fast, monkeypatch, capsys, tmp_path):
    json_path = tmp_path / "bench.json"
    code, out = _cli(["--device", "cpu", "--quick", "--repeat", "1", "--dtype", "float16",
                      "--json", str(json_path)], monkeypatch, capsys, torch_available=False)
    assert code == 0
    result = json.loads(json_path.read_text())
    assert "--dtype float16" in result["machine"]["command"]
    assert {r["dtype"] for r in result["records"]} == {"float16"}
    assert ", float16," in out.out.splitlines()[0]
    monkeypatch.setattr(bench.timing, "run_benchmark", lambda *a, **k: pytest.fail("timed anyway"))
    code, out = _cli(["--device", "cpu", "--pass", "step", "--dtype", "float16"], monkeypatch,
                     capsys)
    assert code == 2 and "timed in float32 and float64" in out.err


# --- the CUDA backward and step passes ------------------------------------------------------

@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
@pytest.mark.parametrize("name", ["conv2d_input", "conv2d_weight", "local_conv2d_input",
                                  "local_conv2d_weight"])
def test_gradient_workspace_asks_the_cuda_estimates_with_the_dtype(name, dtype):
    """The CUDA scratch estimates take (geometry, dtype) and count elements: the bench's
    backward pass on CUDA crashed calling them with the geometry alone."""
    from gpuconv.ops import OPS

    geom = conv_geometry((3, 4, 9, 9), (3, 3), 5, stride=2, padding=1)
    itemsize = np.dtype(dtype).itemsize
    expected = OPS[name].scratch("cuda")(geom, np.dtype(dtype)) * itemsize
    assert _bench_impls._gpuconv_grad_scratch(name, "cuda", geom, itemsize) == expected
    if name == "conv2d_weight" and dtype == np.float16:
        assert expected > 0  # float16's float32 partial sums: a real estimate, not zero


@pytest.mark.cuda
@pytest.mark.skipif(not cuda_available(), reason="numba.cuda cannot launch kernels here")
def test_cuda_backward_and_step_passes_run():
    """``gpuconv bench --device cuda --pass backward step`` on a tiny layer: every gpuconv
    gradient record is timed; the step runs where PyTorch has CUDA, else it says why."""
    from gpuconv.workloads import Layer

    layer = Layer("tiny", "Tiny", 2, 2, 2, 6, 3, 3, 1, 0, "test")
    result = bench.run_benchmark([layer], device="cuda", repeat=1, bursts=1, quick=True,
                                 passes=("backward", "step"), on_error="raise")
    backward = [r for r in result["records"] if r["pass"] == "backward"
                and r["impl"] == "gpuconv"]
    assert sorted(r["op"] for r in backward) == ["conv2d", "local_conv2d"]
    assert all(r["samples"] == 1 and not r["skipped"] for r in backward)
    step = [r for r in result["records"] if r["pass"] == "step"]
    not_run = result["machine"].get("passes_not_run") or {}
    if step:
        assert all(r["samples"] == 1 and not r["skipped"] for r in step
                   if r["impl"] == "gpuconv")
    else:
        assert "CUDA" in str(not_run.get("step")), not_run


def test_the_default_table_fits_100_columns(fast, monkeypatch, capsys):
    """Without --wide the report fits 100 columns (a pipe, a log, an 80-120 column
    terminal): the table leaves out its least needed columns and says which."""
    code, out = _cli(["--device", "cpu", "--quick", "--repeat", "1", "--no-per-call"],
                     monkeypatch, capsys, False)
    assert code == 0
    table = [line for line in out.out.splitlines() if line.startswith("layer ")]
    assert table and "median ms" in table[0] and "1st call ms" not in table[0]
    assert "Left out to fit 100 columns" in out.out and "1st call ms" in out.out
    assert max(len(line) for line in out.out.splitlines()) <= 100


def test_the_cpu_run_says_how_long_it_will_take_before_it_starts():
    args = argparse.Namespace(quick=False, layers=None, batch=None, repeat=None)
    line = command._expected_duration("cpu", list(bench.suite.SUITES["default"]), args,
                                      ("forward",), None)
    assert f"about {command.EXPECTED_CPU_S['default']} s" in line
    quick = argparse.Namespace(quick=True, layers=None, batch=None, repeat=None)
    assert "--quick" in command._expected_duration("cpu", list(bench.suite.QUICK_LAYERS), quick,
                                                ("forward",), None)
    # nothing measured says how long these take: no guess
    assert command._expected_duration("cuda", list(bench.suite.SUITES["default"]), args,
                                      ("forward",), None) is None
    assert command._expected_duration("cpu", list(bench.suite.SUITES["default"]), args,
                                      ("backward",), None) is None
