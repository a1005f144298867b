"""The CPU-side logic of scripts/gpu_check.py: arguments, geometry grid, layers, counts,
and its PyTorch references (checked on the CPU against tests/reference.py)."""

import importlib.util
import pathlib

import numpy as np
import pytest

from gpuconv import get_conv_outsize
from gpuconv.geometry import conv_geometry
from reference import conv2d_ref, local_conv2d_ref

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
    assert args.repeats == 10 and args.warmup == 2 and args.json is None
    assert gpu_check.parse_args(["--quick"]).repeats == 3
    monkeypatch.setenv("OUT", str(tmp_path))
    assert gpu_check.parse_args([]).json == str(tmp_path / "gpu_check.json")
    assert gpu_check.parse_args(["--json", "x.json"]).json == "x.json"
    with pytest.raises(SystemExit):
        gpu_check.parse_args(["--repeats", "0"])


@pytest.mark.parametrize("quick", [False, True])
def test_geometry_grid_is_valid_and_awkward(gpu_check, quick):
    cases = gpu_check.geometry_grid(quick)
    assert len({c.name for c in cases}) == len(cases)
    for c in cases:
        geom = conv_geometry((c.n, c.c_in, c.h, c.w), c.kernel, c.c_out, c.stride, c.padding,
                             c.dilation, c.groups)
        assert gpu_check.case_out_hw(c) == (geom.out_height, geom.out_width)
    if not quick:
        names = {c.name for c in cases}
        assert {"stride_gt_kernel", "groups", "depthwise", "output_1x1", "dilation"} <= names
        assert any(c.bias == "position" for c in cases)
        assert any(gpu_check.case_out_hw(c)[1] % 32 not in (0,) for c in cases)


def test_layers_are_the_workloads_table(gpu_check):
    from gpuconv import workloads

    assert gpu_check.LAYERS == tuple(map(gpu_check.layer_row, workloads.LAYERS.values()))
    dims = {layer[0]: gpu_check.layer_dims(layer) for layer in gpu_check.LAYERS}
    # Output sizes and unshared weight counts quoted in the DeepFace paper and the seed note.
    for name, hw, weights in (("DeepFace L4", 55, 62.7e6), ("DeepFace L5", 25, 7.84e6),
                              ("DeepFace L6", 21, 2.82e6)):
        d = dims[name]
        assert (d["h_out"], d["w_out"]) == (hw, hw)
        count = gpu_check.weight_count("local_conv2d", d["c_in"], d["c_out"], d["h_out"],
                                       d["w_out"], d["k"], d["k"])
        assert abs(count - weights) / weights < 0.005
    d = dims["seed conv1"]
    assert gpu_check.weight_count("local_conv2d", d["c_in"], d["c_out"], d["h_out"], d["w_out"],
                                  d["k"], d["k"]) == 10 * 496 * 496 * 3 * 25
    for layer in gpu_check.LAYERS:
        d = gpu_check.layer_dims(layer)
        assert d["h_out"] == get_conv_outsize(d["h"], d["k"], d["stride"], 2 * d["pad"])


def test_flop_and_byte_counts(gpu_check):
    # 2 * N * C_out * H_out * W_out * C_in/g * kH * kW, by hand
    assert gpu_check.conv_flops(2, 4, 6, 5, 7, 3, 3, groups=2) == 2 * 2 * 6 * 5 * 7 * 2 * 3 * 3
    geom = conv_geometry((2, 4, 9, 11), (3, 3), 6, 1, 0, 1, 2)
    assert gpu_check.conv_flops(2, 4, 6, geom.out_height, geom.out_width, 3, 3, 2) == geom.flops
    shared = gpu_check.min_bytes("conv2d", 1, 3, 10, 10, 2, 8, 8, 3, 3)
    assert shared == 4 * (300 + 2 * 3 * 9 + 2 * 64)
    local = gpu_check.min_bytes("local_conv2d", 1, 3, 10, 10, 2, 8, 8, 3, 3, itemsize=8)
    assert local == 8 * (300 + 2 * 3 * 9 * 64 + 2 * 64)
    flops, nbytes = gpu_check.layer_counts(gpu_check.LAYERS[-3])
    assert flops == 2 * 128 * 16 * 55 * 55 * 16 * 81
    # weights dominate an unshared layer: intensity about N / 2 FLOP per byte (float32)
    assert 0.3 * 128 / 2 < flops / nbytes < 128 / 2


def test_rates_summaries_and_tolerances(gpu_check):
    assert gpu_check.rate(2e12, 0.5) == pytest.approx(4.0)
    assert gpu_check.rate(1e9, 0.5, 1e9) == pytest.approx(2.0)
    assert gpu_check.rate(1, 0) is None and gpu_check.rate(1, None) is None
    stats = gpu_check.summarize([4.0, 1.0, 3.0, 2.0, 5.0])
    assert (stats["median"], stats["q25"], stats["q75"], stats["min"], stats["count"]) == \
        (3.0, 2.0, 4.0, 1.0, 5)
    assert gpu_check.summarize([]) is None
    assert gpu_check.within_tolerance(1e-6, 1.0, "float32")
    assert not gpu_check.within_tolerance(1e-4, 1.0, "float32")
    assert not gpu_check.within_tolerance(1e-11, 1.0, "float64")


@pytest.mark.parametrize("bias", [None, "channel", "position"])
def test_torch_references_match_the_float64_reference(gpu_check, bias):
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 4, 9, 8))
    w = rng.standard_normal((6, 2, 3, 2))
    kwargs = dict(stride=(2, 1), padding=(1, 2), dilation=(1, 2), groups=2)
    b = None if bias is None else rng.standard_normal(6)
    t = (lambda a: None if a is None else torch.from_numpy(a))
    y = gpu_check.torch_conv2d_ref(torch, t(x), t(w), t(b), **kwargs).numpy()
    np.testing.assert_allclose(y, conv2d_ref(x, w, b, **kwargs), rtol=1e-12, atol=1e-12)
    h_out, w_out = y.shape[2:]
    wl = rng.standard_normal((6, h_out, w_out, 2, 3, 2))
    if bias == "position":
        b = rng.standard_normal((6, h_out, w_out))
    y = gpu_check.torch_local_conv2d_ref(torch, t(x), t(wl), t(b), **kwargs).numpy()
    np.testing.assert_allclose(y, local_conv2d_ref(x, wl, b, **kwargs), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("op", ["conv2d", "local_conv2d"])
def test_check_case_end_to_end_on_the_cpu(gpu_check, op):
    """The correctness loop body, run with CPU tensors (gpuconv picks its CPU path)."""
    torch = pytest.importorskip("torch")
    import gpuconv

    case = gpu_check.geometry_grid()[2]
    for dtype in (torch.float64, torch.float32):
        result = gpu_check.check_case(torch, gpuconv, case, op, dtype, device="cpu")
        assert result["ok"], result


def test_sanitizer_is_optional(gpu_check, monkeypatch):
    monkeypatch.setattr(gpu_check, "find_compute_sanitizer", lambda: None)
    assert gpu_check.run_sanitizer()["status"].startswith("skipped")


def test_out_of_memory_peers_are_recorded_not_raised(gpu_check):
    class OutOfMemoryError(RuntimeError):
        pass

    class FakeCuda:
        pass

    FakeCuda.OutOfMemoryError = OutOfMemoryError

    FakeCuda.empty_cache = staticmethod(lambda: None)
    FakeCuda.synchronize = staticmethod(lambda: None)

    class FakeTorch:
        cuda = FakeCuda

    def oom():
        raise OutOfMemoryError("CUDA out of memory. Tried to allocate 80 GiB")

    def other():
        raise RuntimeError("CUDA error: out of memory")

    assert gpu_check._measure(FakeTorch, oom, 1, 1) == {"status": "out of memory"}
    assert gpu_check._measure(FakeTorch, other, 1, 1) == {"status": "out of memory"}
    row = {"layer": "DeepFace L4", "op": "local_conv2d",
           "gpuconv": {"status": "ok", "median": 1e-3, "tflops": 16.0, "gbps": 250.0},
           "peer": {"status": "out of memory"}}
    line = gpu_check._format_bench_row(row)
    assert "out of memory" in line and "16.00 TF" in line


def test_bench_layer_lists_and_kernel_names(gpu_check):
    assert gpu_check.bench_layer_list(False) == gpu_check.LAYERS
    quick = gpu_check.bench_layer_list(True)
    assert len(quick) == len(set(quick)) < len(gpu_check.LAYERS)
    assert {layer[0] for layer in quick} >= {"DeepFace L4", "DeepFace L5", "DeepFace L6"}
    d = gpu_check.layer_dims(gpu_check.LAYERS[4])  # VGG-16 conv3_2
    assert gpu_check._kernel_name("conv2d", d).startswith("conv2d_f32_k3x3_")
    assert gpu_check._kernel_name("local_conv2d", d).startswith("local_conv2d_f32_k3x3_")
