"""The CPU-side logic of scripts/gpu_check.py: arguments, geometry grids, layer lists, kernel
names, its references for the forward and the gradients (checked on the CPU against
tests/reference.py), the gradient checks and its speed sections (gpuconv bench, every pass,
run here on the CPU)."""

import importlib.util
import pathlib

import numpy as np
import pytest

from gpuconv import bench, workloads
from gpuconv import grad as gpuconv_grad
from gpuconv.bench import peers as _bench_impls
from gpuconv.cuda import kernels as _cuda_kernels
from reference import (conv2d_input_grad_ref, conv2d_ref, conv2d_weight_grad_ref,
                       half_tolerance, local_conv2d_input_grad_ref, local_conv2d_ref,
                       local_conv2d_weight_grad_ref, output_size)

SCRIPT = pathlib.Path(__file__).resolve().parent.parent / "scripts" / "gpu_check.py"


@pytest.fixture(scope="module")
def gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_arguments_and_json_destination(gpu_check, monkeypatch, tmp_path):
    monkeypatch.delenv("OUT", raising=False)
    args = gpu_check.parse_args([])
    assert (args.quick, args.skip_bench, args.skip_sanitizer) == (False, False, False)
    assert (args.repeat, args.bursts) == (bench.DEFAULT_REPEAT, bench.DEFAULT_BURSTS)
    assert args.json is None
    args = gpu_check.parse_args(["--quick"])
    assert (args.repeat, args.bursts) == (bench.QUICK_REPEAT, bench.QUICK_BURSTS)
    assert gpu_check.parse_args(["--repeats", "7"]).repeat == 7  # the old spelling
    assert args.passes == ("forward", "backward", "step")  # --pass both and the step
    assert gpu_check.parse_args(["--pass", "both"]).passes == ("forward", "backward")
    monkeypatch.setenv("OUT", str(tmp_path))
    assert gpu_check.parse_args([]).json == str(tmp_path / "gpu_check.json")
    assert gpu_check.parse_args(["--json", "x.json"]).json == "x.json"
    with pytest.raises(SystemExit) as exc:
        gpu_check.parse_args(["--repeat", "0"])
    assert exc.value.code == 2


@pytest.mark.parametrize("quick", [False, True])
def test_geometry_grid_is_valid_and_awkward(gpu_check, quick):
    cases = gpu_check.geometry_grid(quick)
    assert len({c.name for c in cases}) == len(cases)
    for c in cases:
        geom = gpu_check.case_geometry(c)  # raises on an impossible case
        # the output size as the independent reference computes it
        assert (geom.out_height, geom.out_width) == output_size(
            (c.h, c.w), c.kernel, c.stride, c.padding, c.dilation)
    if not quick:
        names = {c.name for c in cases}
        assert {"stride_gt_kernel", "groups", "depthwise", "output_1x1", "dilation"} <= names
        assert any(c.bias == "position" for c in cases)
        assert any(gpu_check.case_geometry(c).out_width % 32 for c in cases)
        geoms = [gpu_check.case_geometry(c) for c in cases]
        assert any(g.pad_left != g.pad_right or g.pad_top != g.pad_bottom for g in geoms)


@pytest.mark.parametrize("case_index", [2, 6, 7, -1])
@pytest.mark.parametrize("op", ["conv2d", "local_conv2d"])
def test_references_match_the_float64_reference(gpu_check, op, case_index):
    """The script's reference (the benchmark's PyTorch peers) and its magnitude bound."""
    torch = pytest.importorskip("torch")
    case = gpu_check.geometry_grid()[case_index]
    generator = torch.Generator().manual_seed(0)
    geom, x, w, b = gpu_check._case_tensors(torch, case, op, torch.float64, "cpu", generator)
    ref, bound = gpu_check._reference(torch, op, geom, x, w, b)
    kwargs = dict(stride=case.stride, padding=case.padding, dilation=case.dilation,
                  groups=case.groups)
    expected = (local_conv2d_ref if op == "local_conv2d" else conv2d_ref)
    n = (lambda t: None if t is None else t.numpy())
    np.testing.assert_allclose(ref.numpy(), expected(n(x), n(w), n(b), **kwargs),
                               rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(bound.numpy(), expected(
        np.abs(n(x)), np.abs(n(w)), None if b is None else np.abs(n(b)), **kwargs),
        rtol=1e-12, atol=1e-12)
    assert float(bound.min()) >= 0 and bool((bound >= ref.abs() - 1e-12).all())


@pytest.mark.parametrize("op", ["conv2d", "local_conv2d"])
def test_check_case_end_to_end_on_the_cpu(gpu_check, op):
    """The correctness loop body, run with CPU tensors (gpuconv picks its CPU path)."""
    torch = pytest.importorskip("torch")
    import gpuconv

    case = gpu_check.geometry_grid()[2]
    for dtype in (torch.float64, torch.float32):
        result = gpu_check.check_case(torch, gpuconv, case, op, dtype, device="cpu")
        assert result["ok"], result
        assert result["tolerance"] == bench.stats.TOLERANCE[result["dtype"]]
    result = gpu_check.check_case(torch, gpuconv, case, op, torch.float16, device="cpu")
    assert result["ok"] and result["dtype"] == "float16", result
    # stride2: C_in=3, 5x5 kernel, plus the bias
    assert result["terms"] == 3 * 25 + 1 and result["tolerance"] == half_tolerance(76)


def test_check_case_fails_a_wrong_result(gpu_check, monkeypatch):
    torch = pytest.importorskip("torch")
    import gpuconv

    real = gpuconv.conv2d
    wrong = type("wrong", (), {"conv2d": staticmethod(lambda *a, **k: real(*a, **k) * 1.001)})
    case = gpu_check.geometry_grid()[2]
    result = gpu_check.check_case(torch, wrong, case, "conv2d", torch.float32, device="cpu")
    assert not result["ok"] and result["result_kind_ok"]


def test_sanitizer_is_optional(gpu_check, monkeypatch):
    monkeypatch.setattr(gpu_check, "find_compute_sanitizer", lambda: None)
    assert gpu_check.run_sanitizer()["status"].startswith("skipped")


def test_bench_layer_lists(gpu_check):
    assert gpu_check.bench_layer_list(False) == list(workloads.LAYERS)
    quick = gpu_check.bench_layer_list(True)
    assert len(quick) == len(set(quick)) < len(workloads.LAYERS)
    local = {name for name, layer in workloads.LAYERS.items()
             if layer.network_op == "local_conv2d"}
    assert local and local <= set(quick)


@pytest.mark.parametrize("name", list(workloads.LAYERS))
def test_kernel_names_are_those_the_layers_launch(gpu_check, name):
    """The script names, per record, the kernels that the CUDA module reports for the layer."""
    geom = workloads.gpu_geometry(name)
    names = (gpu_check._kernel_name("conv2d", geom), gpu_check._kernel_name("local_conv2d", geom))
    assert names == tuple(_cuda_kernels.workload_kernel_names()[workloads.LAYERS[name].short_title])


def test_speed_is_gpuconv_bench_with_kernel_names(gpu_check, monkeypatch):
    """The speed section on the CPU: the benchmark's records, each gpuconv one naming its
    kernel."""
    monkeypatch.setattr(_bench_impls, "measure_ceilings", lambda *a, **k: {})
    monkeypatch.setattr(bench, "WARMUP_S", 0.0)
    tiny = bench.Layer("tiny", "tiny test layer", 2, 2, 3, 9, 4, 3, 2, 1, "the tests")
    result = gpu_check.speed([tiny], repeat=1, bursts=1, device="cpu", torch=None,
                             progress=False)
    records = result["records"]
    assert {(r["op"], r["impl"]) for r in records} == {
        (i.op, i.name) for i in _bench_impls.implementations("cpu", None)}
    for r in records:
        if r["impl"] == "gpuconv":
            assert r["kernel"] == gpu_check._kernel_name(r["op"], tiny.geometry(r["N"]))
        else:
            assert "kernel" not in r
    assert "gpuconv bench on cpu" in bench.format_report(result)


@pytest.mark.parametrize("factor, ok", [(1.0, True), (1 + 1e-9, False)])
def test_array_kind_checks_judge_against_the_reference(gpu_check, factor, ok):
    """The NumPy-in check, with gpuconv's CPU path standing in for the GPU."""
    torch = pytest.importorskip("torch")
    import types

    import gpuconv

    def conv2d(*args, device=None, **kwargs):
        return gpuconv.conv2d(*args, device="cpu", **kwargs) * factor
    fake = types.SimpleNamespace(conv2d=conv2d, local_conv2d=gpuconv.local_conv2d)
    numpy_in = gpu_check.check_array_kinds(torch, fake)[0]
    assert numpy_in["check"] == "numpy in -> numpy out" and numpy_in["ok"] is ok


# ----------------------------------------------------------------------------- gradients

@pytest.mark.parametrize("quick", [False, True])
def test_grad_grid_is_part_of_the_geometry_grid(gpu_check, quick):
    cases = gpu_check.grad_grid(quick)
    assert cases and set(cases) <= set(gpu_check.geometry_grid())
    if not quick:
        geoms = [gpu_check.case_geometry(c) for c in cases]
        assert any(g.groups > 1 for g in geoms) and any(g.dilation_h > 1 for g in geoms)
        assert any(g.stride_h > g.kernel_height for g in geoms)
        assert any(g.pad_top != g.pad_bottom or g.pad_left != g.pad_right for g in geoms)
    names = [name for pair in gpu_check.GRAD_FUNCTIONS.values() for name in pair]
    assert sorted(names) == sorted(gpuconv_grad.__all__)

GRAD_REFS = {"conv2d": (conv2d_input_grad_ref, conv2d_weight_grad_ref),
             "local_conv2d": (local_conv2d_input_grad_ref, local_conv2d_weight_grad_ref)}


@pytest.mark.parametrize("case_index", [2, 6, -1])
@pytest.mark.parametrize("op", ["conv2d", "local_conv2d"])
def test_grad_references_match_the_float64_reference(gpu_check, op, case_index):
    """The script's gradient reference (autograd through the benchmark's peers) and its
    magnitude bound."""
    torch = pytest.importorskip("torch")
    case = gpu_check.grad_grid()[case_index]
    generator = torch.Generator().manual_seed(1)
    geom, x, w, _ = gpu_check._case_tensors(torch, case, op, torch.float64, "cpu", generator)
    gy = torch.rand(geom.output_shape, generator=generator, dtype=torch.float64) * 2 - 1
    (gx, gw), (gx_bound, gw_bound) = gpu_check._grad_reference(torch, op, geom, x, w, gy)
    kwargs = dict(stride=case.stride, padding=case.padding, dilation=case.dilation,
                  groups=case.groups)
    input_ref, weight_ref = GRAD_REFS[op]
    xn, wn, gyn = x.numpy(), w.numpy(), gy.numpy()
    np.testing.assert_allclose(gx.numpy(), input_ref(xn.shape, wn, gyn, **kwargs),
                               rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(gw.numpy(), weight_ref(xn, wn.shape, gyn, **kwargs),
                               rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(gx_bound.numpy(), input_ref(
        xn.shape, np.abs(wn), np.abs(gyn), **kwargs), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(gw_bound.numpy(), weight_ref(
        np.abs(xn), wn.shape, np.abs(gyn), **kwargs), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("op", ["conv2d", "local_conv2d"])
def test_check_grad_case_end_to_end_on_the_cpu(gpu_check, op):
    """The gradient loop body, run with CPU tensors (gpuconv.grad picks its CPU path): one
    result per gradient function, each within tolerance."""
    torch = pytest.importorskip("torch")
    case = gpu_check.grad_grid()[6]  # groups
    for dtype in (torch.float64, torch.float32):
        results = gpu_check.check_grad_case(torch, gpuconv_grad, case, op, dtype, device="cpu")
        assert [r["op"] for r in results] == list(gpu_check.GRAD_FUNCTIONS[op])
        for r in results:
            assert r["ok"], r
            assert r["tolerance"] == bench.stats.TOLERANCE[r["dtype"]] and r["scale"] > 0
    results = gpu_check.check_grad_case(torch, gpuconv_grad, case, op, torch.float16, "cpu")
    geom = gpu_check.case_geometry(case)  # groups: N=2, 8 -> 12 channels, 4 groups, 19x18
    input_terms = 3 * 9
    weight_terms = 2 * (geom.out_height * geom.out_width if op == "conv2d" else 1)
    assert [r["terms"] for r in results] == [input_terms, weight_terms]
    for r in results:
        assert r["ok"] and r["dtype"] == "float16", r
        assert r["tolerance"] == half_tolerance(r["terms"])


def test_check_grad_case_fails_a_wrong_or_missing_gradient(gpu_check):
    torch = pytest.importorskip("torch")
    import types

    def weight_grad(*args, **kwargs):
        return gpuconv_grad.conv2d_weight(*args, **kwargs) * 1.001

    def input_grad(*args, **kwargs):
        raise AttributeError("module 'gpuconv.cuda.launch' has no attribute 'launch'")
    wrong = types.SimpleNamespace(conv2d_input=input_grad, conv2d_weight=weight_grad)
    case = gpu_check.grad_grid()[0]
    results = gpu_check.check_grad_case(torch, wrong, case, "conv2d", torch.float32, "cpu")
    assert [r["ok"] for r in results] == [False, False]
    assert "AttributeError" in results[0]["error"] and results[1]["result_kind_ok"]


def test_gradient_speed_is_gpuconv_bench_with_the_other_passes(gpu_check, monkeypatch):
    """The backward and the step on the default suite, few timed calls, the forward's
    ceilings; failures are recorded, not raised."""
    monkeypatch.setattr(_bench_impls, "measure_ceilings",
                        lambda *a, **k: pytest.fail("ceilings measured twice"))
    monkeypatch.setattr(bench, "WARMUP_S", 0.0)
    assert gpu_check.gradient_layers() == list(bench.SUITES["default"])
    assert gpu_check.gradient_layers(True) == list(bench.QUICK_LAYERS)
    assert gpu_check.gradient_speed([], ("forward",), {}) is None
    tiny = bench.Layer("tiny", "tiny test layer", 2, 2, 3, 9, 4, 3, 2, 1, "the tests")
    ceilings = {"bandwidth_gbs": 10.0}
    result = gpu_check.gradient_speed([tiny], ("forward", "backward", "step"), ceilings,
                                      device="cpu", torch=None, progress=False)
    records = result["records"]
    assert {r["pass"] for r in records} == {"backward"}  # no step without PyTorch
    assert all(r["samples"] == gpu_check.GRADIENT_REPEAT * gpu_check.GRADIENT_BURSTS
               for r in records)
    assert result["machine"]["ceilings"] == ceilings
    assert "step" in result["machine"]["passes_not_run"]
    assert gpu_check.failed_records(result) == []
    records[0]["skipped"] = "failed: RuntimeError: boom"
    assert gpu_check.failed_records(result) == [records[0]]
    assert gpu_check.failed_records(None) == []


# ----------------------------------------------------------------------------- float16

def test_float16_is_checked(gpu_check):
    assert gpu_check.DTYPES == ("float64", "float32", "float16")


@pytest.mark.parametrize("factor, ok16, ok32", [(1 + 2e-4, True, False), (1.01, False, False)])
def test_float16_check_has_its_own_tolerance(gpu_check, factor, ok16, ok32):
    """An error of 2e-4 of the magnitude passes in float16 (eps 2**-10) and fails in float32;
    1 % fails both."""
    torch = pytest.importorskip("torch")
    import types

    import gpuconv

    def conv2d(*args, **kwargs):  # the error made in float64, then rounded once
        y = gpuconv.conv2d(*args, **kwargs)
        return (y.double() * factor).to(y.dtype) if y.dtype == torch.float16 else y * factor
    wrong = types.SimpleNamespace(conv2d=conv2d)
    case = gpu_check.geometry_grid()[9]  # k1: 64 terms, sums of many values, none tiny
    half = gpu_check.check_case(torch, wrong, case, "conv2d", torch.float16, device="cpu")
    single = gpu_check.check_case(torch, wrong, case, "conv2d", torch.float32, device="cpu")
    assert (half["ok"], single["ok"]) == (ok16, ok32), (half, single)


def test_half_speed_is_the_float16_forward_on_few_calls(gpu_check, monkeypatch):
    monkeypatch.setattr(_bench_impls, "measure_ceilings", lambda *a, **k: {})
    monkeypatch.setattr(bench, "WARMUP_S", 0.0)
    tiny = bench.Layer("tiny", "tiny test layer", 2, 2, 3, 9, 4, 3, 2, 1, "the tests")
    result = gpu_check.half_speed([tiny], device="cpu", torch=None, progress=False)
    records = result["records"]
    assert records and {r["pass"] for r in records} == {"forward"}
    for r in records:
        assert r["dtype"] == "float16" and r["max_rel_diff"] <= r["tolerance"]
        assert r["samples"] == gpu_check.GRADIENT_REPEAT * gpu_check.GRADIENT_BURSTS
        assert r["bytes"] == bench.stats.min_bytes(r["op"], tiny.geometry(r["N"]), 2)
        if r["impl"] == "gpuconv":
            assert r["kernel"] == gpu_check._kernel_name(r["op"], tiny.geometry(r["N"]),
                                                         "float16")
            assert "_f16_" in r["kernel"]
    assert gpu_check.failed_records(result) == []
