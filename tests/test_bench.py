"""gpuconv bench: formulas, record schema, options, a tiny run with and without PyTorch.

Sizes are tiny and the ceilings are stubbed, so the whole file runs in seconds; the real
suites are run by hand (see BENCHMARKS.md).
"""

import argparse
import json
import subprocess
import sys

import numpy as np
import pytest

from gpuconv import bench
from gpuconv.bench import peers as _bench_impls
from gpuconv.device import cuda_available

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


# ----------------------------------------------------------------------------- baselines

@pytest.mark.parametrize("layer", [TINY, TINY_GROUPED])
def test_numpy_baselines_match_the_reference(layer):
    geom = layer.geometry(2)
    rng = np.random.default_rng(3)
    x = rng.standard_normal((2, layer.in_channels, layer.size, layer.size))
    w = rng.standard_normal(geom.shared_weight_shape())
    wl = rng.standard_normal(geom.local_weight_shape())
    b = rng.standard_normal(layer.out_channels)
    kw = dict(stride=layer.stride, padding=layer.padding, groups=layer.groups)
    y = _bench_impls._numpy_conv2d_make({"x": x, "weight": w, "bias": b}, geom)()
    np.testing.assert_allclose(y, conv2d_ref(x, w, b, **kw), rtol=1e-10, atol=1e-10)
    y = _bench_impls._numpy_local_make({"x": x, "weight": wl, "bias": b}, geom)()
    np.testing.assert_allclose(y, local_conv2d_ref(x, wl, b, **kw), rtol=1e-10, atol=1e-10)


@needs_torch
def test_torch_unfold_recipe_matches_the_reference():
    geom = TINY_GROUPED.geometry(2)
    rng = np.random.default_rng(4)
    x = rng.standard_normal((2, 4, 8, 8))
    wl = rng.standard_normal(geom.local_weight_shape())
    b = rng.standard_normal(6)
    arrays = {k: torch.from_numpy(v) for k, v in (("x", x), ("weight", wl), ("bias", b))}
    y = _bench_impls._torch_unfold_make(torch)(arrays, geom)().numpy()
    np.testing.assert_allclose(y, local_conv2d_ref(x, wl, b, stride=1, padding=1, groups=2),
                               rtol=1e-10, atol=1e-10)


# ----------------------------------------------------------------------------- runs

def _check_run(result, impls):
    records = result["records"]
    assert {(r["op"], r["impl"]) for r in records} == impls
    for r in records:
        assert r["median_s"] > 0 and r["samples"] == 2 and r["gflops"] > 0
        assert r["first_call_s"] > 0 and r["max_rel_diff"] < 1e-5
        if r["op"] == "local_conv2d":
            assert r["peak_extra_bytes"] is not None and r["peak_extra_method"]
    machine = result["machine"]
    for key in ("cpu", "cores", "os", "python", "numpy", "numba", "torch", "device", "date",
                "ceilings"):
        assert key in machine


@needs_torch
def test_tiny_run_with_torch(fast):
    result = bench.run_benchmark([TINY], repeat=1, bursts=2, progress=False)
    _check_run(result, {("conv2d", "gpuconv"), ("conv2d", "torch"),
                        ("local_conv2d", "gpuconv"), ("local_conv2d", "torch-unfold")})
    assert result["machine"]["torch"] == torch.__version__


def test_tiny_run_without_torch(fast):
    result = bench.run_benchmark([TINY_GROUPED], repeat=1, bursts=2, progress=False,
                                 torch=None)
    _check_run(result, {("conv2d", "gpuconv"), ("conv2d", "numpy-im2col"),
                        ("local_conv2d", "gpuconv"), ("local_conv2d", "numpy-im2col-matmul")})
    assert result["machine"]["torch"] is None


def test_what_does_not_fit_is_skipped_with_a_reason(fast, monkeypatch):
    geom = TINY.geometry(2)
    x_and_shared = (2 * 3 * 9 * 9 + 4 * 27) * 4
    local = int(np.prod(geom.local_weight_shape())) * 4
    # room for the shared op, not for the local weights
    monkeypatch.setattr(_bench_impls, "available_memory",
                        lambda backend: int((x_and_shared + 2000 + local / 2) / 0.7))
    result = bench.run_benchmark([TINY], repeat=1, bursts=1, progress=False, torch=None)
    by = {(r["op"], r["impl"]): r for r in result["records"]}
    assert by[("conv2d", "gpuconv")]["median_s"] > 0
    skipped = by[("local_conv2d", "gpuconv")]
    assert skipped["median_s"] is None and "available" in skipped["skipped"]
    assert "skipped: needs about" in bench.format_table(result["records"])


def _table_cells(stdout):
    """Data rows of the first table in the report, split on runs of 2+ spaces."""
    import re

    lines = stdout.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("layer")) + 2
    rows = []
    for line in lines[start:]:
        if line.startswith(("Batch sweep", "What sharing")):
            break
        if line.strip():
            rows.append(re.split(r"\s{2,}", line.strip()))
    return rows


def _cli(argv, monkeypatch, capsys, torch_available=True):
    if not torch_available:
        monkeypatch.setattr(_bench_impls, "load_torch", lambda: None)
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
    assert len(suite) == 4 and sorted({r["N"] for r in sweep}) == [1, 2]
    assert (result["machine"]["torch"] is not None) == torch_available
    rows = _table_cells(out.out)
    assert len(rows) == len(suite)
    for row, r in zip(rows, suite):
        assert row[:4] == [r["layer"], r["op"], r["impl"], str(r["N"])]
        assert row[4] == f"{r['median_s'] * 1e3:.4g}"
        assert float(row[4]) == pytest.approx(r["median_s"] * 1e3, rel=1e-3)
        assert float(row[6]) == pytest.approx(r["gflops"], rel=5e-3)
        assert row[10].rstrip("*") == f"{r['first_call_s'] * 1e3:.4g}"
    assert "What sharing buys" in out.out and "gpuconv vs peers" in out.out
    assert out.err == ""  # no progress bar when stderr is not a terminal


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


def test_progress_bar_only_when_asked_or_on_a_terminal():
    import io

    stream = io.StringIO()
    bar = bench._Progress(3, stream=stream)
    bar.step("a")
    assert stream.getvalue() == ""
    bar = bench._Progress(2, stream=stream, enabled=True)
    bar.step("layer")
    bar.close()
    assert "[###############" in stream.getvalue() and "1/2" in stream.getvalue()


def test_summary_ratios():
    geom = TINY.geometry(2)
    records = [
        bench.make_record("conv2d", "gpuconv", "tiny", "cpu", "float32", geom, [2e-3]),
        bench.make_record("conv2d", "torch", "tiny", "cpu", "float32", geom, [1e-3]),
        bench.make_record("local_conv2d", "gpuconv", "tiny", "cpu", "float32", geom, [6e-3]),
        bench.make_record("local_conv2d", "torch-unfold", "tiny", "cpu", "float32", geom,
                          [12e-3]),
    ]
    text = bench.format_summary({"machine": {"ceilings": CEILINGS}, "records": records})
    ratio = bench.param_count("local_conv2d", geom).total / bench.param_count("conv2d", geom).total
    assert f"params {ratio:,.0f}x" in text and "time 3x" in text
    assert "conv2d vs torch 2x" in text and "local_conv2d vs torch-unfold 0.5x" in text


def test_peer_speedups_are_geometric_means_of_peer_over_gpuconv_time():
    records = []
    for layer, mine, peer in (("a", 1e-3, 4e-3), ("b", 4e-3, 1e-3), ("c", 1e-3, 8e-3)):
        geom = TINY.geometry(2)
        records.append(bench.make_record("local_conv2d", "gpuconv", layer, "cpu", "float32", geom, [mine]))
        records.append(bench.make_record("local_conv2d", "torch-unfold", layer, "cpu", "float32", geom, [peer]))
    speedups = bench.peer_speedups(records)
    assert speedups["local_conv2d vs torch-unfold"]["layers"] == 3
    assert abs(speedups["local_conv2d vs torch-unfold"]["geomean_speedup"] - 2.0) < 1e-12  # (4 * 1/4 * 8) ** (1/3)


def test_cuda_path_in_the_simulator(tmp_path):
    """The CUDA branch (events or wall clock, device arrays, no peers) on a tiny layer."""
    import os

    code = """
import json, sys
from gpuconv import bench, _bench_impls
_bench_impls.measure_ceilings = lambda *a, **k: {"bandwidth_gbs": 1.0, "compute_gflops": None}
tiny = bench.Layer("tiny", "t", 1, 1, 2, 6, 2, 3, 1, 0, "the tests")
result = bench.run_benchmark([tiny], device="cuda", repeat=1, bursts=1, progress=False,
                             torch=None)
json.dump(result, sys.stdout)
"""
    env = dict(os.environ, NUMBA_ENABLE_CUDASIM="1")
    env.pop("GPUCONV_DEVICE", None)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env=env, timeout=120)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert {(r["op"], r["impl"]) for r in result["records"]} == {
        ("conv2d", "gpuconv"), ("local_conv2d", "gpuconv")}
    for r in result["records"]:
        assert r["device"] == "cuda" and r["median_s"] > 0 and r["max_rel_diff"] < 1e-5


def test_progress_reaches_its_total(fast, monkeypatch):
    seen = []
    monkeypatch.setattr(bench._Progress, "close", lambda self: seen.append(
        (self.done, self.total)))
    bench.run_benchmark([TINY, TINY_GROUPED], repeat=1, bursts=2, progress=False, torch=None,
                        sweep=(TINY, (1, 2)))
    assert seen and seen[0][0] == seen[0][1] == 4 * 3 * 4


def test_time_kernels_wrapper_defaults():
    import importlib.util
    import pathlib

    path = pathlib.Path(__file__).resolve().parents[1] / "scripts" / "time_kernels.py"
    spec = importlib.util.spec_from_file_location("time_kernels", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    args = module.build_parser().parse_args([])
    assert args.quick and not args.peers and args.device == "auto"
    args = module.build_parser().parse_args(["--peers", "--full-size", "--layers", "deepface-l4"])
    assert args.peers and not args.quick and args.layers == ["deepface-l4"]
