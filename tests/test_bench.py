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

from gpuconv import bench
from gpuconv.bench import peers as _bench_impls
from gpuconv.bench import stats
from gpuconv.device import cuda_available
from gpuconv.geometry import conv_geometry

from reference import conv2d_ref, local_conv2d_ref

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
    monkeypatch.setattr(bench, "WARMUP_S", 0.0)
    layers = dict(bench.LAYERS, tiny=TINY, **{"tiny-grouped": TINY_GROUPED})
    monkeypatch.setattr(bench, "LAYERS", layers)
    monkeypatch.setattr(bench, "SUITES", {"default": ("tiny",), "full": ("tiny", "tiny-grouped")})
    monkeypatch.setattr(bench, "QUICK_LAYERS", ("tiny",))
    monkeypatch.setattr(bench, "SWEEP_LAYER", "tiny")
    monkeypatch.setattr(bench, "SWEEP_BATCHES", (1, 2))


def parser():
    p = argparse.ArgumentParser(prog="gpuconv bench")
    bench.add_arguments(p)
    return p


# ----------------------------------------------------------------------------- formulas

def test_seed_conv1_formulas_by_hand():
    geom = bench.LAYERS["seed-conv1"].geometry(1)
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
    geom = bench.LAYERS[name].geometry(8)
    assert (geom.out_height, geom.out_width) == (out, out)
    assert bench.param_count("local_conv2d", geom).weights == weights


def test_strided_padded_layer_by_hand():
    geom = bench.LAYERS["alexnet-conv1"].geometry(2)  # (227 - 11) // 4 + 1 = 55
    assert geom.out_height == 55
    assert geom.flops == 2 * 2 * 96 * 55 * 55 * 3 * 11 * 11
    geom = bench.LAYERS["resnet50-conv1"].geometry(1)  # (224 + 6 - 7) // 2 + 1 = 112
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
    (["--dtype", "float16"], "invalid choice"),
    (["--device", "tpu"], "invalid choice"),
    (["--suite", "huge"], "invalid choice"),
])
def test_bad_options_are_argparse_errors(argv, message, capsys):
    with pytest.raises(SystemExit) as exc:
        parser().parse_args(argv)
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


def test_plan_from_options():
    names, repeat, bursts, cap = bench._plan(parser().parse_args([]))
    assert names == list(bench.SUITES["default"]) and repeat == bench.DEFAULT_REPEAT
    assert cap is None and bursts == bench.DEFAULT_BURSTS
    names, repeat, bursts, cap = bench._plan(parser().parse_args(["--quick"]))
    assert names == list(bench.QUICK_LAYERS) and repeat == bench.QUICK_REPEAT
    assert cap == bench.QUICK_MAX_BATCH
    names, *_ = bench._plan(parser().parse_args(["--suite", "full"]))
    assert names == list(bench.LAYERS)
    args = parser().parse_args(["--layers", "DeepFace-L6", "deepface-l6", "seed-conv1",
                                "--repeat", "7"])
    names, repeat, *_ = bench._plan(args)
    assert names == ["deepface-l6", "seed-conv1"] and repeat == 7


def test_every_suite_layer_is_known():
    for names in bench.SUITES.values():
        assert set(names) <= set(bench.LAYERS)
    assert set(bench.QUICK_LAYERS) <= set(bench.LAYERS)
    assert bench.SWEEP_LAYER in bench.LAYERS


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

def _impls(torch_module, peers=True):
    """(op, impl) pairs the benchmark picks on the CPU: the tests follow the list, not a copy."""
    return {(i.op, i.name) for i in _bench_impls.implementations("cpu", torch_module, peers)}


def _check_run(result, impls, repeat=1, bursts=2):
    records = result["records"]
    assert {(r["op"], r["impl"]) for r in records} == impls
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
    assert {impl for _, impl in _impls(torch)} > {"gpuconv"}
    assert result["machine"]["torch"] == torch.__version__


def test_tiny_run_without_torch(fast):
    result = bench.run_benchmark([TINY_GROUPED], repeat=1, bursts=2, progress=False,
                                 torch=None)
    _check_run(result, _impls(None))
    assert {impl for _, impl in _impls(None)} > {"gpuconv"}
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
        (x_and_shared + 2000 + local / 2) / bench.MEMORY_FRACTION))
    result = bench.run_benchmark([TINY], repeat=1, bursts=1, progress=False, torch=None)
    by = {(r["op"], r["impl"]): r for r in result["records"]}
    assert by[("conv2d", "gpuconv")]["median_s"] > 0
    skipped = by[("local_conv2d", "gpuconv")]
    assert skipped["median_s"] is None and "available" in skipped["skipped"]
    assert "skipped: needs about" in bench.format_table(result["records"])


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
                      "--plot", str(png_path)], monkeypatch, capsys, torch_available)
    assert code == 0
    assert png_path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    result = json.loads(json_path.read_text())
    assert set(result) == {"machine", "records"}
    suite = [r for r in result["records"] if r["part"] == "suite"]
    sweep = [r for r in result["records"] if r["part"] == "batch-sweep"]
    impls = _impls(torch if torch_available else None)
    assert len(suite) == len(bench.QUICK_LAYERS) * len(impls)
    assert sorted({r["N"] for r in sweep}) == sorted(bench.SWEEP_BATCHES)
    assert (result["machine"]["torch"] is not None) == torch_available
    rows = _table_cells(out.out)
    assert len(rows) == len(suite)
    for row, r in zip(rows, suite):
        assert row[:4] == [r["layer"], r["op"], r["impl"], str(r["N"])]
        assert row[4] == f"{r['median_s'] * 1e3:.4g}"
        assert float(row[4]) == pytest.approx(r["median_s"] * 1e3, rel=1e-3)
        assert float(row[6]) == pytest.approx(r["gflops"], rel=5e-3)
        assert row[10].rstrip("*") == f"{r['first_call_s'] * 1e3:.4g}"
    # Which peers ran, and why, in the report.
    why = "PyTorch" if torch_available else "PyTorch not installed, so NumPy im2col"
    assert f"peers: {result['machine']['peers_reason']}" in out.out and why in out.out
    assert "%cmp = " in out.out and "more than 100 %" in out.out
    assert "What sharing buys" in out.out and "gpuconv vs peers: speedup = peer time" in out.out
    # Not a terminal: a line when it starts and with the ceilings, then one per finished
    # layer and sweep batch.
    news = out.err.splitlines()
    assert len(news) == 2 + len(bench.QUICK_LAYERS) + len(bench.SWEEP_BATCHES)
    assert "peers:" in news[0] and "ceilings:" in news[1] and "[1/1] tiny N=" in news[2]
    assert all(line.startswith("[") for line in news)


@pytest.mark.parametrize("flag", ["--json", "--plot"])
@pytest.mark.parametrize("where", ["missing-dir/out", "a-directory"])
def test_unwritable_outputs_are_refused_before_timing(fast, monkeypatch, capsys, tmp_path,
                                                      flag, where):
    if flag == "--plot":
        pytest.importorskip("matplotlib")
    (tmp_path / "a-directory").mkdir()
    monkeypatch.setattr(bench, "run_benchmark", lambda *a, **k: pytest.fail("timed anyway"))
    code, out = _cli(["--device", "cpu", flag, str(tmp_path / where)], monkeypatch, capsys)
    assert code == 2 and out.out == ""
    assert out.err.startswith(f"gpuconv bench: error: {flag} ") and out.err.count("\n") == 1


def test_writable_check_leaves_no_file_and_keeps_an_existing_one(tmp_path):
    path = tmp_path / "new.json"
    assert bench._unwritable(str(path)) is None and not path.exists()
    path.write_text("old")
    assert bench._unwritable(str(path)) is None and path.read_text() == "old"


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

    assert bench._Progress.choose(3, None, io.StringIO()).mode == "lines"
    assert bench._Progress.choose(3, None, Terminal()).mode == "bar"
    assert bench._Progress.choose(3, False, Terminal()).mode is None
    stream = io.StringIO()
    quiet = bench._Progress(3, stream, None)
    quiet.step("a")
    quiet.line("news")
    assert stream.getvalue() == ""
    lines = bench._Progress(3, stream, "lines")
    lines.step("a")
    assert stream.getvalue() == ""  # steps draw nothing without a terminal
    lines.line("layer done")
    assert stream.getvalue().endswith("s] layer done\n")
    stream = io.StringIO()
    bar = bench._Progress(2, stream, "bar")
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
    monkeypatch.setattr(bench._Progress, "close", lambda self: seen.append(
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
        assert names and all(name in bench.LAYERS for name in names)
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
