"""gpuconv bench's per-call section and its load flag; the host-path step timer."""

import argparse
import json

import numpy as np
import pytest

from gpuconv import bench
from gpuconv.bench import report, timing
from gpuconv.bench import peers as _bench_impls
from gpuconv.bench import percall

try:
    import torch
except ImportError:  # pragma: no cover - torch is optional
    torch = None

TINY = bench.Layer("tiny", "tiny test layer", 2, 2, 3, 9, 4, 3, 2, 1, "the tests")
CEILINGS = {"bandwidth_gbs": 20.0, "bandwidth_method": "stub", "compute_gflops": 100.0,
            "compute_method": "stub"}
SMALL = (("1x2x6x6, 2 maps 3x3", (1, 2, 6, 6), 2, 3),)


@pytest.fixture
def fast(monkeypatch):
    monkeypatch.setattr(_bench_impls, "measure_ceilings", lambda *a, **k: dict(CEILINGS))
    monkeypatch.setattr(bench.timing, "WARMUP_S", 0.0)
    monkeypatch.setattr(bench.suite, "LAYERS", dict(bench.suite.LAYERS, tiny=TINY))
    monkeypatch.setattr(bench.suite, "SUITES", {"default": ("tiny",), "full": ("tiny",)})
    monkeypatch.setattr(bench.suite, "QUICK_LAYERS", ("tiny",))
    monkeypatch.setattr(percall, "SHAPES", SMALL)
    monkeypatch.setattr(percall, "QUICK_CALLS", 3)
    monkeypatch.setattr(percall, "QUICK_BURSTS", 2)
    monkeypatch.setattr(percall, "WARMUP", 1)


def test_load_flag_by_hand(monkeypatch):
    monkeypatch.setattr("os.cpu_count", lambda: 2)
    assert timing._load_flag([0.5, None, 1.9]) == {"load_average_max": 1.9, "overloaded": False}
    assert timing._load_flag([0.5, 2.01]) == {"load_average_max": 2.01, "overloaded": True}
    assert timing._load_flag([None]) == {"load_average_max": None, "overloaded": False}


@pytest.mark.parametrize("loads, warned", [((0.1, 0.2, 0.3), False), ((0.1, 9.5, 0.3), True)])
def test_a_run_above_the_core_count_is_flagged(fast, monkeypatch, loads, warned):
    samples = iter(loads * 10)
    monkeypatch.setattr(bench.timing, "load_average", lambda: next(samples))
    monkeypatch.setattr("os.cpu_count", lambda: 2)
    result = bench.run_benchmark([TINY], repeat=1, bursts=1, progress=False, torch=None)
    machine = result["machine"]
    assert machine["overloaded"] is warned
    assert machine["load_average_max"] == max(loads)
    header = report.format_header(result)
    assert ("WARNING: the load average reached 9.5 on 2 cores" in header) is warned
    before = header.split("\nWARNING")[0]  # the header as before, then the warning
    assert before.splitlines()[-1].startswith("median of ") and before == report.format_header(
        dict(result, machine=dict(machine, overloaded=False, load_average_max=0.3)))


def test_per_call_section_in_the_report_and_the_json(fast, monkeypatch, capsys, tmp_path):
    monkeypatch.setattr(_bench_impls, "load_torch", lambda: torch)
    parser = argparse.ArgumentParser()
    bench.add_arguments(parser)
    path = tmp_path / "bench.json"
    code = bench.run(parser.parse_args(["--device", "cpu", "--quick", "--repeat", "1",
                                        "--json", str(path)]))
    out = capsys.readouterr().out
    assert code == 0
    result = json.loads(path.read_text())
    assert set(result) == {"machine", "records"}
    per_call = result["machine"]["per_call"]
    impls = {"gpuconv conv2d", "gpuconv local_conv2d"} | ({"torch conv2d"} if torch else set())
    assert {r["impl"] for r in per_call["records"]} == impls
    for r in per_call["records"]:
        assert r["calls"] == 6 and 0 < r["q1_us"] <= r["median_us"] <= r["q3_us"]
        assert (r["ratio_to_torch"] is None) == (torch is None)
        assert f"{r['median_us']:.1f}" in out
    assert "Per-call cost on tiny shapes (cpu;" in out
    assert set(per_call["load"]) == {"cores", "load_average_max", "overloaded"}
    code = bench.run(parser.parse_args(["--device", "cpu", "--quick", "--repeat", "1",
                                        "--no-per-call", "--json", str(path)]))
    assert code == 0 and "per_call" not in json.loads(path.read_text())["machine"]
    assert "Per-call cost" not in capsys.readouterr().out


def test_call_steps_on_host_arrays():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((1, 3, 8, 8)).astype(np.float32)
    w = rng.standard_normal((4, 3, 3, 3)).astype(np.float32)
    result = percall.call_steps("conv2d", x, w, device="cpu", repeat=5, warmup=1)
    assert set(result["steps_us"]) == {"operands", "lookup", "allocate", "kernel"}
    assert all(v > 0 for v in result["steps_us"].values()) and result["total_us"] > 0
    with pytest.raises(TypeError, match="takes 3 arrays"):
        percall.call_steps("conv2d", x, device="cpu")


def test_overload_advice_offers_one_core_only_on_the_cpu():
    machine = {"overloaded": True, "load_average_max": 20.0, "cores": 16, "device": "cpu"}
    assert report._overload_warning(machine).endswith("--one-core (process CPU time)")
    assert report._overload_warning(dict(machine, device="cuda")).endswith(
        "rerun on an idle machine")


def test_per_call_runs_gpuconv_on_the_benchmarked_device(monkeypatch):
    """The per-call section times gpuconv on the device the run benchmarks: with "auto" a
    GPU machine's ``--device cpu`` run would have timed CUDA calls on host arrays."""
    import gpuconv

    seen = []
    for name in ("conv2d", "local_conv2d"):
        real = getattr(gpuconv, name)
        monkeypatch.setattr(gpuconv, name, lambda *a, _real=real, **k: (
            seen.append(k.get("device", "auto")), _real(*a, **k))[1])
    monkeypatch.setattr(percall, "QUICK_CALLS", 1)
    monkeypatch.setattr(percall, "QUICK_BURSTS", 1)
    monkeypatch.setattr(percall, "WARMUP", 0)
    percall.measure("cpu", None, quick=True, shapes=(("t", (1, 1, 4, 4), 1, 3),))
    assert seen and set(seen) == {"cpu"}, seen


def test_warm_up_leaves_nothing_queued_on_a_gpu():
    """On CUDA a call returns once queued: a 250 ms loop of them would queue about a
    launch queue's depth of calls, run after the loop (each warm-up as long as a thousand
    calls of a slow kernel). The warm-up waits for each call."""
    class Queue:
        kind = "cuda"
        pending = most = 0

        def synchronize(self):
            self.most = max(self.most, self.pending)
            self.pending = 0

    backend = Queue()

    def call():
        backend.pending += 1

    timing._warm_up(call, backend)
    assert backend.most == 1


def test_memory_budget_counts_what_pytorchs_allocator_holds_unused():
    from types import SimpleNamespace

    gb = 10**9
    cuda = SimpleNamespace(mem_get_info=lambda *a: (40 * gb, 80 * gb),
                           memory_reserved=lambda *a: 30 * gb,
                           memory_allocated=lambda *a: 2 * gb)
    backend = SimpleNamespace(kind="cuda", torch_cuda=True, torch=SimpleNamespace(cuda=cuda))
    assert _bench_impls.available_memory(backend) == 68 * gb
