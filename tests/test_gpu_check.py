"""scripts/gpu_check.py, the GPU acceptance run, without a GPU: its plan (phases, the kernels
each compiles, the budget), its references and checks (on PyTorch's CPU against
tests/reference.py), its verdicts, and the whole script in its dry run (Numba's CUDA
simulator, every phase at tiny sizes) so that it cannot rot between GPU runs."""

import importlib.util
import json
import os
import pathlib
import subprocess
import sys
import time

import numpy as np
import pytest

from gpuconv import bench, workloads
from reference import conv2d_ref, half_tolerance, local_conv2d_ref, output_size
from conftest import numba_cuda_importable

ROOT = pathlib.Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "gpu_check.py"
SIMULATOR = os.environ.get("NUMBA_ENABLE_CUDASIM") == "1"


@pytest.fixture(scope="module")
def gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_arguments_and_json_destination(gpu_check, monkeypatch, tmp_path):
    monkeypatch.delenv("OUT", raising=False)
    args = gpu_check.parse_args([])
    assert args.budget_s == gpu_check.DEFAULT_BUDGET_S <= 8 * 60
    assert (args.repeat, args.bursts, args.json, args.dry_run) == (5, 2, None, False)
    assert gpu_check.parse_args(["--dry-run"]).repeat == 1
    monkeypatch.setenv("OUT", str(tmp_path))
    assert gpu_check.parse_args([]).json == str(tmp_path / "gpu_check.json")
    assert gpu_check.parse_args(["--json", "x.json"]).json == "x.json"
    for bad in (["--budget-s", "0"], ["--repeat", "0"], ["--only", "nonsense"]):
        with pytest.raises(SystemExit) as exc:
            gpu_check.parse_args(bad)
        assert exc.value.code == 2


@pytest.mark.parametrize("quick", [False, True])
def test_geometry_grid_is_valid_and_awkward(gpu_check, quick):
    cases = gpu_check.geometry_grid(quick)
    assert len({c.name for c in cases}) == len(cases)
    for c in cases + list(gpu_check.DRY_GRID):
        geom = gpu_check.case_geometry(c)  # raises on an impossible case
        assert (geom.out_height, geom.out_width) == output_size(
            (c.h, c.w), c.kernel, c.stride, c.padding, c.dilation)
    if not quick:
        names = {c.name for c in cases}
        assert {"stride_gt_kernel", "groups", "depthwise", "output_1x1", "dilation"} <= names
        assert any(c.bias == "position" for c in cases)
        geoms = [gpu_check.case_geometry(c) for c in cases]
        assert any(g.pad_left != g.pad_right or g.pad_top != g.pad_bottom for g in geoms)


# --- the kernels each phase reaches --------------------------------------------------------

@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_the_suite_is_checked_on_the_benchmarks_own_kernels(gpu_check, dtype):
    """For every default-suite layer and function, the reduced batch launches exactly the
    kernels the benchmark times at the GPU batch, and is never larger."""
    reduced_somewhere = False
    for layer in gpu_check.suite_layers():
        for functions in [(op,) for op in gpu_check.FORWARD_OPS] + list(
                gpu_check.GRAD_FUNCTIONS.values()):
            batch = gpu_check.reduced_batch(layer, functions, dtype)
            assert 1 <= batch <= layer.batch_gpu
            reduced_somewhere |= batch < layer.batch_gpu
            for f in functions:
                assert (gpu_check.kernel_names(f, layer.geometry(batch), dtype)
                        == gpu_check.kernel_names(f, layer.geometry(layer.batch_gpu), dtype))
    assert reduced_somewhere


def test_kernel_names_name_the_specialisation(gpu_check):
    geom = workloads.gpu_geometry("resnet50-res2-3x3")
    for f in gpu_check.ALL_FUNCTIONS:
        f32 = gpu_check.kernel_names(f, geom, "float32")
        assert f32 and f32 != gpu_check.kernel_names(f, geom, "float16")
    # the conv2d weight gradient of a long batch x positions sum adds the slice sum
    assert len(gpu_check.kernel_names("conv2d_weight", geom, "float32")) == 2


def test_local_gradients_are_checked_and_timed_on_the_batched_gemms(gpu_check):
    """The local gradients reach the batched-GEMM kernels on the default suite (the
    dispatcher's choice), with the slice sum where the weight gradient splits the batch
    (DeepFace L6 at its GPU batch), and the multipass case runs them over two batch tiles.
    With 64 or more maps a group the input gradient goes through columns (transpose, GEMM,
    gather) and the weight gradient is a GEMM a position (transpose, GEMM)."""
    for layer in gpu_check.suite_layers():
        geom = layer.geometry(layer.batch_gpu)
        names = gpu_check.kernel_names("local_conv2d_input", geom)
        weight = gpu_check.kernel_names("local_conv2d_weight", geom)
        if geom.out_channels_per_group >= 64:
            assert names[0].startswith("local_conv2d_igrad_cols_f32_t32x64_")
            assert names[1:] == ("transpose_maps_f32", "local_conv2d_col2im_f32")
            assert weight[0].startswith(("local_conv2d_wgrad_pos_f32_t64x64_",
                                         "local_conv2d_wgrad_pos_f32_t32x64_"))
            assert weight[1:] == ("transpose_maps_f32",)
        else:
            assert names == (names[0],) and names[0].startswith("local_conv2d_igrad_gemm_f32_")
            assert weight[0].startswith("local_conv2d_wgrad_gemm_f32_")
    l6 = workloads.gpu_geometry("deepface-l6")
    assert gpu_check.kernel_names("local_conv2d_weight", l6)[1:] == ("sum_slices_float32",)
    cases = dict((c.name, f) for c, f in gpu_check.multipass_cases())
    assert any("local_conv2d_input" in f and "local_conv2d_weight" in f for f in cases.values())


def test_multipass_runs_the_per_position_gemm_over_two_batch_tiles(gpu_check):
    """The local forward of VGG-16 conv5_1 with 500 input channels at batch 40: the
    per-position GEMM, two batch tiles (the second partial), a partial last chunk of K; its
    input gradient through columns, two image tiles and a partial last block of terms; its
    weight gradient a GEMM a position, a partial last chunk of images and block of terms."""
    from gpuconv.cuda import launch, local_gemm, local_grad_positions

    cases = dict((c.name, (c, f)) for c, f in gpu_check.multipass_cases())
    case, functions = cases["vgg16-conv5_1-cin500@40"]
    assert functions == ("local_conv2d", "local_conv2d_input", "local_conv2d_weight")
    geom = gpu_check.case_geometry(case)
    config = launch.local_conv2d_forward_config(geom, np.float32)
    assert isinstance(config, local_gemm.LocalGemmConfig) and config.batch_tiles == 2
    k_len = geom.in_channels_per_group * geom.kernel_height * geom.kernel_width
    assert geom.batch % 32 and k_len % 16 and k_len % 64
    assert gpu_check.kernel_names("local_conv2d", geom) == (config.kernel.name,)
    igrad = launch.local_conv2d_input_grad_config(geom, np.float32)
    assert isinstance(igrad, local_grad_positions.LocalInputGradColsConfig)
    assert igrad.batch_tiles == 2 and igrad.chunk == geom.batch
    wgrad = launch.local_conv2d_weight_grad_config(geom, np.float32)
    assert isinstance(wgrad, local_grad_positions.LocalWeightGradPosConfig)
    assert geom.batch % 16 and wgrad.blocks_n == -(-k_len // 64)  # a partial image chunk


def test_plan_puts_correctness_first_and_fits_the_budget(gpu_check):
    phases = gpu_check.plan()
    names = [p.name for p in phases]
    assert names == list(gpu_check.PHASES)
    assert names.index("suite") < names.index("determinism") < names.index("time-forward")
    assert all(p.estimate_s > 0 for p in phases)
    # the correctness phases and the main timings fit the default budget on their own
    core = ("env", "suite", "suite-gradients", "multipass", "determinism", "memcheck",
            "time-forward", "overhead", "time-backward")
    assert sum(p.estimate_s for p in phases if p.name in core) < gpu_check.DEFAULT_BUDGET_S
    assert {p.name: p for p in phases}["suite"].kernels > 0
    # a kernel compiled by an earlier phase is not counted again
    assert sum(p.kernels for p in phases if p.name != "array-kinds") == len({
        (n, d) for p in gpu_check.PHASES
        for f, g, d in (gpu_check._phase_items(p, False, False) or [])
        for n in gpu_check.kernel_names(f, g, d)} | {
        (c.kernel.name, "float32") for *_, configs in gpu_check.candidate_items(
            gpu_check.suite_layers()) for c in configs})
    text = gpu_check.format_plan(phases, 100)
    assert "skipped (budget)" in text and text.splitlines()[1].startswith("env")
    admitted = [p.name for p, runs in gpu_check.scheduled(phases, gpu_check.DEFAULT_BUDGET_S)
                if runs]
    assert set(core) <= set(admitted)
    assert sum(p.estimate_s for p in phases if p.name in admitted) <= gpu_check.DEFAULT_BUDGET_S


def test_candidates_are_every_forward_choice_with_the_pick_among_them(gpu_check):
    """The ``candidates`` phase times, on each suite layer at its GPU batch, every forward
    kernel the dispatcher weighs: conv2d's direct kernel and its implicit GEMM on each tile,
    local_conv2d's batched GEMM and its per-position GEMM on each tile, reading words and
    runs (the streaming kernel where the batch is small), the dispatcher's pick exactly once
    among them; where the pick is the batched GEMM, also the same launch at the earlier
    input loads a round; and the local input gradient where it weighs two kernels."""
    from gpuconv.cuda import (conv2d_gemm, kernels, local_gemm, local_grad_gemm,
                              local_grad_positions, local_stream)

    code = "sim" if SIMULATOR else "f32"
    layers = gpu_check.suite_layers()
    items = gpu_check.candidate_items(layers)
    # (the small batches' streaming kernels come last: test_stream_items_...)
    streams = gpu_check.stream_items(layers)
    assert items[-len(streams):] == streams
    items = items[:-len(streams)]
    # ... the local input gradient on the layer at the edge of the columns rule, and on the
    # layers whose gather is timed at both load counts
    edge = [lay for lay in layers if lay.out_channels == 64]
    assert [lay.name for lay in edge] == ["resnet50-res2-3x3"]
    grads = {lay.name for lay in edge} | set(gpu_check.LOADS_LAYERS)
    assert [(i[0], i[1]) for i in items] == [
        (lay, op) for lay in layers
        for op in gpu_check.FORWARD_OPS + (("local_conv2d_input",) if lay.name in grads
                                           else ())]
    earlier = gpu_check.EARLIER_LOADS
    for layer, op, geom, configs in items:
        if op == "local_conv2d_input":
            first, other = configs
            if layer in edge:  # the columns (the pick) against the gather
                assert type(first) is local_grad_positions.LocalInputGradColsConfig
                assert type(other) is local_grad_gemm.LocalInputGradGemmConfig
            else:  # the gather (the pick) at both counts, the same launch otherwise
                assert first == launch_input_grad_config(geom)
                assert other == first._replace(kernel=other.kernel, gy_loads=earlier)
                assert other.kernel.name == first.kernel.name + f"_g{earlier}"
            continue
        assert geom.batch == layer.batch_gpu > local_stream.STREAM_MAX_BATCH
        names = [c.kernel.name for c in configs]
        assert len(set(names)) == len(names), names
        picked = (kernels.conv2d_config if op == "conv2d"
                  else kernels.local_conv2d_forward_config)(geom, np.float32)
        assert sum(c == picked for c in configs) == 1, (layer.name, op)
        kinds = [type(c) for c in configs]
        if op == "conv2d":
            assert kinds == [kernels.Conv2dConfig] + [conv2d_gemm.Conv2dGemmConfig] * len(
                conv2d_gemm.TILES[code])
            continue
        gemms = [local_gemm.LocalGemmConfig] * (len(local_gemm.TILES[code])
                                                 + len(local_gemm.RUN_TILES[code]))
        if isinstance(picked, kernels.LocalConv2dConfig):  # the seed's layers
            assert kinds == [kernels.LocalConv2dConfig] + gemms + [kernels.LocalConv2dConfig]
            assert configs[-1] == picked._replace(kernel=configs[-1].kernel,
                                                  input_loads=earlier)
            assert names[-1] == picked.kernel.name + f"_x{earlier}"
        else:
            assert kinds == [kernels.LocalConv2dConfig] + gemms
    assert {lay.name for lay, op, geom, _ in items if op == "local_conv2d" and isinstance(
        kernels.local_conv2d_forward_config(geom, np.float32), kernels.LocalConv2dConfig)} \
        == {"seed-conv1", "seed-conv2"}
    # a small batch adds the streaming kernel, which the dispatcher then picks
    small = workloads.LAYERS["deepface-l6"].geometry(4)
    configs = kernels.forward_candidates("local_conv2d", small, np.float32)
    assert configs[0] == kernels.local_conv2d_forward_config(small, np.float32)
    assert isinstance(configs[0], local_stream.LocalStreamConfig)
    with pytest.raises(ValueError, match="op must be"):
        kernels.forward_candidates("conv3d", small, np.float32)


def test_stream_items_time_every_layer_at_both_ends_and_the_earlier_rule(gpu_check):
    """The streaming kernel on every suite layer at batches 8 and 1, the dispatcher's pick
    first; under the earlier map rule beside it on the cases named, where it differs (and
    there it does: the seed's 5 and 10 maps ran as 8 and 16, in rounds of 4)."""
    from gpuconv.cuda import kernels, local_stream

    layers = gpu_check.suite_layers()
    items = gpu_check.stream_items(layers)
    assert [(i[0].name, i[2].batch) for i in items] == [
        (lay.name, b) for b in gpu_check.STREAM_TIMED_BATCHES for lay in layers]
    for layer, op, geom, configs in items:
        assert op == "local_conv2d"
        assert configs[0] == kernels.local_conv2d_forward_config(geom, np.float32)
        assert all(isinstance(c, local_stream.LocalStreamConfig) for c in configs)
        side = [c for c in configs[1:] if c.warp_positions == 1 and c.maps == configs[0].maps]
        if configs[0].warp_positions > 1:  # one position a warp beside the pick
            assert side and side[0] == configs[1]
        rule = (layer.name, geom.batch) in gpu_check.STREAM_RULE_CASES
        runs = (layer.name, geom.batch) in gpu_check.STREAM_RUN_CASES
        at_once = [c for c in configs[1:] if c == configs[0]._replace(
            kernel=c.kernel, out_run=1)]
        assert len(at_once) == runs  # the pick storing each position's outputs at once
        if runs:
            assert configs[0].out_run == local_stream.OUT_RUN
            assert at_once[0].kernel.name + f"_r{local_stream.OUT_RUN}" == \
                configs[0].kernel.name
        searched = (gpu_check.searched_stream_config(geom, configs[0])
                    if geom.batch == 8 else None)
        if searched is not None:  # the model's fastest launch, far ahead of the pick
            assert searched in configs[1:]
        assert len(configs) == (1 + (configs[0].warp_positions > 1) + runs
                                + (searched is not None) + rule)
        assert len(set(configs)) == len(configs)
    earlier = {(lay.name, g.batch): c[-1] for lay, _, g, c in items}
    assert (earlier["seed-conv2", 8].maps, earlier["seed-conv2", 8].map_round) == (8, 4)
    assert (earlier["seed-conv1", 1].maps, earlier["seed-conv1", 1].map_round) == (16, 4)
    assert earlier["seed-conv1", 1].kernel.name.endswith("_n1_m16_v4_u4_w1")  # as it was
    # (at the pick's positions a warp and output runs: the map rule's ratio alone)
    assert earlier["seed-conv2", 8].kernel.name.endswith("_n8_m8_v3_u4_w1_p4_r8")
    pick = {(lay.name, g.batch): c[0] for lay, _, g, c in items}
    assert (pick["seed-conv2", 8].maps, pick["seed-conv2", 8].map_round) == (5, 5)
    assert (pick["seed-conv1", 8].maps, pick["seed-conv1", 8].map_round) == (10, 5)
    assert (pick["deepface-l5", 1].maps, pick["deepface-l5", 1].map_round) == (16, 8)
    assert (pick["seed-conv2", 1].maps, pick["seed-conv2", 1].lane_taps) == (5, 3)
    (seed8,) = [c for lay, _, g, c in items if (lay.name, g.batch) == ("seed-conv2", 8)]
    # the pick, one position a warp, the pick storing at once, the earlier rule
    assert [(c.warp_positions, c.out_run) for c in seed8] == [(4, 8), (1, 1), (4, 1), (4, 8)]
    # where the rules agree (16 maps at batch 8) the earlier one gives the same launch
    vgg = workloads.LAYERS["vgg16-conv5_1"].geometry(8)
    assert gpu_check.earlier_stream_config(vgg, np.float32) == \
        local_stream.local_stream_config(vgg, np.float32)
    # the model's fastest launches far ahead of the picks: DeepFace L5 and L6 at 8 images
    assert {case for case, _ in gpu_check.searched_kernels(items)} == {
        "deepface-l5@8", "deepface-l6@8"}
    (dry,) = gpu_check.stream_items(gpu_check.suite_layers(dry_run=True), dry_run=True)
    # the pick, one position a warp, the model's fastest launch, the earlier rule
    assert dry[2].batch == 1 and len(dry[3]) == 4
    assert [c.warp_positions for c in dry[3]] == [4, 1, 1, 4]
    assert dry[3][2] == gpu_check.searched_stream_config(dry[2], dry[3][0], 1.0)


def test_stream_lines_give_the_share_of_the_copy_rate(gpu_check):
    from gpuconv.cuda import predict

    def row(kernel, picked, predicted, measured, case="l@8", ok=True):
        return {"case": case, "function": "local_conv2d", "kernel": kernel, "ok": ok,
                "picked": picked, "predicted_ms": predicted, "measured_ms": measured,
                "min_bytes": 3e9}

    rate = 4e12  # bytes a second: 3 GB in 1 ms is 75 % of it
    results = [row("local_conv2d_stream_a", True, 0.9, 1.0),
               row("local_conv2d_stream_b", False, 1.8, 1.5),
               row("local_gemm_c", False, 0.5, 0.4),  # not a streaming kernel: not here
               row("local_conv2d_stream_a", True, 1.0, 2.0, case="l@1"),
               row("local_conv2d_stream_a", True, 1.0, None, case="m@1")]
    lines = gpu_check.stream_lines(results, rate, predict.H200)
    share = 3e9 / 0.9e-3 / predict.H200.copy_bytes_per_s
    assert lines == [
        "small batch l@8: `local_conv2d_stream_a` 1.000 ms (cold L2), 75% of the copy rate "
        f"measured here (4.00 TB/s); predicted 0.900 ms, {share:.0%} of the H200's",
        "map rule l@8: `local_conv2d_stream_a` 1.000 ms, earlier rule `local_conv2d_stream_b` "
        "1.500 ms: measured 1.50x, predicted 2.00x",
        "small batch l@1: `local_conv2d_stream_a` 2.000 ms (cold L2), 38% of the copy rate "
        "measured here (4.00 TB/s); predicted 1.000 ms, "
        f"{3e9 / 1e-3 / predict.H200.copy_bytes_per_s:.0%} of the H200's",
        "small batch m@1: the streaming kernel was not checked and timed",
        "small batches: 1 of 2 layer-batches at 70 % or more of the copy rate (the target: "
        "all)"]


def test_stream_lines_name_one_position_a_warp_beside_the_pick(gpu_check):
    from gpuconv.cuda import predict

    def row(kernel, picked, measured):
        return {"case": "s@8", "function": "local_conv2d", "kernel": kernel, "ok": True,
                "picked": picked, "predicted_ms": 1.0, "measured_ms": measured,
                "min_bytes": 3e9}

    stem = "local_conv2d_stream_f32_k3x3_n8"
    results = [row(f"{stem}_m5_v3_u5_w1_p4", True, 1.0), row(f"{stem}_m5_v3_u5_w1", False, 2.0),
               row(f"{stem}_m8_v3_u4_w1", False, 3.0)]
    lines = gpu_check.stream_lines(results, 4e12, predict.H200)
    assert lines[1].startswith(f"positions s@8: `{stem}_m5_v3_u5_w1_p4` 1.000 ms, one position "
                               f"a warp `{stem}_m5_v3_u5_w1` 2.000 ms: measured 2.00x")
    assert lines[2].startswith("map rule s@8:") and "earlier rule" in lines[2]
    # output runs (an ``_r`` suffix): beside the same kernel storing each position at once
    results = [row(f"{stem}_m5_v3_u5_w1_p4_r8", True, 1.0),
               row(f"{stem}_m5_v3_u5_w1_r8", False, 2.0),
               row(f"{stem}_m5_v3_u5_w1_p4", False, 1.5)]
    lines = gpu_check.stream_lines(results, 4e12, predict.H200)
    assert lines[1].startswith("positions s@8:") and "one position a warp" in lines[1]
    assert lines[2] == (f"output runs s@8: `{stem}_m5_v3_u5_w1_p4_r8` 1.000 ms, stored at "
                        f"once `{stem}_m5_v3_u5_w1_p4` 1.500 ms: measured 1.50x, predicted "
                        "1.00x")
    # the model's fastest launch, named as such whatever its name says
    results.append(row(f"{stem}_m8_v4_u8_w2_p2", False, 0.5))
    lines = gpu_check.stream_lines(results, 4e12, predict.H200,
                                   {("s@8", f"{stem}_m8_v4_u8_w2_p2")})
    assert lines[3].startswith(f"model's best s@8: `{stem}_m5_v3_u5_w1_p4_r8` 1.000 ms, the "
                               f"model's fastest launch `{stem}_m8_v4_u8_w2_p2` 0.500 ms: "
                               "measured 0.50x")


def launch_input_grad_config(geom):
    from gpuconv.cuda import launch

    return launch.local_conv2d_input_grad_config(geom, np.float32)


def test_loads_lines_give_the_measured_ratio_beside_the_predicted(gpu_check):
    def row(kernel, predicted, measured, ok=True):
        return {"case": "l@32", "function": "local_conv2d_input", "kernel": kernel,
                "ok": ok, "predicted_ms": predicted, "measured_ms": measured}

    results = [row("g", 1.0, 2.0), row("g_g2", 1.5, 2.5), row("other_x2", 1.0, 1.0),
               dict(row("f", 1.0, 1.0), function="local_conv2d"),
               dict(row("f_x2", 1.25, None), function="local_conv2d")]
    assert gpu_check.loads_lines(results) == [
        "loads per round l@32 local_conv2d_input: `g` 2.000 ms, 2 loads a round 2.500 ms: "
        "measured 1.25x, predicted 1.50x",
        "loads per round l@32 local_conv2d: `f` against `f_x2`: not both checked and timed"]
    results[1]["ok"] = False  # a wrong result: no ratio
    assert "not both checked" in gpu_check.loads_lines(results)[0]


def test_candidate_lines_compare_the_pick_with_the_fastest(gpu_check):
    results = [
        {"case": "l@8", "function": "conv2d", "kernel": "a", "picked": True, "ok": True,
         "predicted_ms": 1.0, "measured_ms": 2.0, "registers": 100},
        {"case": "l@8", "function": "conv2d", "kernel": "b", "picked": False, "ok": True,
         "predicted_ms": 2.0, "measured_ms": 1.0},
        {"case": "l@8", "function": "conv2d", "kernel": "c", "picked": False, "ok": False,
         "predicted_ms": 2.0, "measured_ms": 0.5},  # wrong results: never the fastest
        {"case": "l@8", "function": "local_conv2d", "kernel": "d", "picked": True, "ok": True,
         "predicted_ms": None, "measured_ms": None},  # not timed: no verdict
        {"case": "l@8", "function": "conv2d", "kernel": "a_x2", "picked": False, "ok": True,
         "predicted_ms": 2.0, "measured_ms": 0.25},  # a load-count variant: not weighed
    ]
    lines, verdicts = gpu_check.candidate_lines(results)
    assert lines[2] == "| l@8 | conv2d | `a` | yes | 1.000 | 2.000 | 2.00 | 100 |"
    assert lines[5].endswith("| - | - | - | - |")
    assert verdicts == ["candidates l@8 conv2d: picked `a` 2.000 ms; fastest `b` 1.000 ms "
                        "(pick / fastest 2.00)"]


@pytest.mark.cuda
@pytest.mark.skipif(not SIMULATOR, reason="launches kernels in the CUDA simulator")
@pytest.mark.parametrize("op", ["conv2d", "local_conv2d"])
def test_check_candidates_passes_every_kernel_and_fails_a_wrong_one(gpu_check, op):
    """Each candidate of a tiny grouped layer, launched with its own configuration, agrees
    with the float64 reference and carries a prediction; a configuration made for fewer
    blocks (one block of its grid dropped, so part of the output is never written) fails."""
    torch = pytest.importorskip("torch")
    from gpuconv.cuda import kernels

    layer = workloads.Layer("tiny", "Tiny", 2, 3, 4, 7, 6, 3, 2, 1, "", groups=2)
    geom = layer.geometry(3)
    target = gpu_check.Target(torch, dry_run=True)
    configs = kernels.forward_candidates(op, geom, np.float32)
    results = gpu_check.check_candidates(target, layer, op, geom, configs)
    assert [r["kernel"] for r in results] == [c.kernel.name for c in configs]
    assert all(r["ok"] for r in results), results
    assert sum(r["picked"] for r in results) == 1
    assert all(r["predicted_ms"] > 0 and "measured_ms" not in r for r in results)
    for config in configs:
        axis = next(i for i, n in enumerate(config.grid) if n > 1)
        grid = tuple(n - (i == axis) for i, n in enumerate(config.grid))
        results = gpu_check.check_candidates(target, layer, op, geom,
                                             [config._replace(grid=grid)])
        assert len(results) == 1 and not results[0]["ok"], (config.kernel.name, results)


@pytest.mark.cuda
@pytest.mark.skipif(not SIMULATOR, reason="launches kernels in the CUDA simulator")
def test_check_candidates_weighs_the_local_input_gradient_columns_against_the_gather(gpu_check):
    """On a layer of 64 maps the local input gradient through columns (the pick) and the
    batched-GEMM gather both agree with the float64 reference and carry a prediction; the
    columns' GEMM on a grid short of a block fails."""
    torch = pytest.importorskip("torch")
    from gpuconv.cuda import local_grad_gemm, local_grad_positions

    layer = workloads.Layer("tiny64", "Tiny 64", 1, 3, 2, 4, 64, 3, 1, 0, "")
    (item,) = [i for i in gpu_check.candidate_items([layer])
               if i[1] == "local_conv2d_input"]
    _, op, geom, configs = item
    assert [type(c) for c in configs] == [local_grad_positions.LocalInputGradColsConfig,
                                          local_grad_gemm.LocalInputGradGemmConfig]
    target = gpu_check.Target(torch, dry_run=True)
    results = gpu_check.check_candidates(target, layer, op, geom, configs)
    assert all(r["ok"] for r in results), results
    assert [r["picked"] for r in results] == [True, False]
    assert all(r["predicted_ms"] > 0 for r in results)
    short = configs[0]._replace(grid=(configs[0].grid[0] - 1, configs[0].grid[1]))
    (result,) = gpu_check.check_candidates(target, layer, op, geom, [short])
    assert not result["ok"], result


@pytest.mark.cuda
@pytest.mark.skipif(not SIMULATOR, reason="launches kernels in the CUDA simulator")
def test_check_candidates_runs_both_load_counts(gpu_check):
    """The local forward's batched GEMM and the input gradient's gather at the earlier
    loads a round, launched with their own configurations as the ``candidates`` phase does:
    both agree with the float64 reference and carry a prediction of their own count."""
    torch = pytest.importorskip("torch")
    from gpuconv.cuda import kernels, local_grad_gemm

    layer = workloads.Layer("tiny", "Tiny", 2, 3, 4, 7, 6, 3, 2, 1, "", groups=2)
    geom = layer.geometry(3)
    target = gpu_check.Target(torch, dry_run=True)
    earlier = gpu_check.EARLIER_LOADS
    for op, configs in (
            ("local_conv2d", [kernels.local_conv2d_config(geom, np.float32, input_loads=n)
                              for n in (None, earlier)]),
            ("local_conv2d_input", [local_grad_gemm.local_input_grad_gemm_config(
                geom, np.float32, gy_loads=n) for n in (None, earlier)])):
        results = gpu_check.check_candidates(target, layer, op, geom, configs)
        assert all(r["ok"] and r["predicted_ms"] > 0 for r in results), results
        assert results[1]["kernel"].endswith(("_x2", "_g2")) and not results[1]["picked"]


@pytest.mark.cuda
@pytest.mark.skipif(not SIMULATOR, reason="launches kernels in the CUDA simulator")
@pytest.mark.parametrize("op", ["conv2d", "local_conv2d"])
def test_check_autotune_agrees_with_the_reference_and_restores_the_setting(gpu_check, op):
    torch = pytest.importorskip("torch")
    import gpuconv
    from gpuconv import device
    from gpuconv.cuda import autotune, kernels

    layer = workloads.Layer("tiny", "Tiny", 2, 3, 4, 7, 6, 3, 2, 1, "", groups=2)
    geom = layer.geometry(3)
    target = gpu_check.Target(torch, dry_run=True)
    assert device.autotune_enabled() is False
    (result,) = gpu_check.check_autotune(target, gpuconv, layer, op, geom)
    assert result["ok"], result
    assert result["kernel"] in [c.kernel.name
                                for c in kernels.forward_candidates(op, geom, np.float32)]
    assert device.autotune_enabled() is False and autotune.choices() == {}


def test_plan_option_prints_and_exits(gpu_check, capsys):
    assert gpu_check.main(["--plan", "--quick"]) == 0
    out = capsys.readouterr().out
    assert "suite-gradients" in out and "budget 450 s" in out


def test_items_stop_when_the_budget_runs_out(gpu_check):
    run = gpu_check.Run(gpu_check.parse_args(["--budget-s", "1"]))
    run.deadline = time.perf_counter() - 1
    gpu_check._items_loop(run, "suite", [1, 2, 3], lambda item: [{"ok": True}])
    assert run.report["phases"]["suite"]["stopped"] == "budget ran out after 0 of 3 items"
    assert run.failures == 0
    run.deadline = time.perf_counter() + 60
    gpu_check._items_loop(run, "grid", [1, 2], lambda item: [{"ok": item == 1}])
    assert run.failures == 1 and run.summary[-1].startswith("grid: 1/2 ok")



def test_a_dry_run_is_held_to_the_budget_only_when_asked(gpu_check):
    # the budget counts GPU seconds: the simulator's wall clock must not skip phases
    dry = gpu_check.Run(gpu_check.parse_args(["--dry-run"]))
    assert dry.args.budget_s == gpu_check.DEFAULT_BUDGET_S and dry.left_s() == float("inf")
    asked = gpu_check.Run(gpu_check.parse_args(["--dry-run", "--budget-s", "5"]))
    assert 0 < asked.left_s() <= 5
    gpu = gpu_check.Run(gpu_check.parse_args([]))
    assert 0 < gpu.left_s() <= gpu_check.DEFAULT_BUDGET_S

# --- references and checks, on PyTorch's CPU -------------------------------------------------

class CpuTarget:
    """gpu_check's Target with the operands left as CPU tensors: gpuconv takes its CPU path,
    which tests the checking logic (references, tolerances, verdicts) without a GPU."""

    def __init__(self, torch):
        self.torch, self.dry_run, self.device = torch, True, "cpu"

    def generator(self, seed):
        return self.torch.Generator().manual_seed(seed)

    def uniform(self, shape, generator):
        return self.torch.rand(tuple(shape), generator=generator, dtype=self.torch.float64) * 2 - 1

    def to_gpuconv(self, tensor):
        return tensor

    def from_gpuconv(self, result):
        return result

    def kind_ok(self, result, dtype):
        return isinstance(result, self.torch.Tensor) and result.dtype == dtype

    def synchronize(self):
        pass


@pytest.mark.parametrize("case_index", [2, 6, 7, -1])
@pytest.mark.parametrize("op", ["conv2d", "local_conv2d"])
def test_references_match_the_float64_reference(gpu_check, op, case_index):
    """The script's reference (the benchmark's PyTorch peers) and its magnitude bound."""
    torch = pytest.importorskip("torch")
    case = gpu_check.geometry_grid()[case_index]
    geom = gpu_check.case_geometry(case)
    x, w, b, _ = gpu_check._inputs(CpuTarget(torch), geom, op, case.bias, 0)
    ref, bound = gpu_check._reference(torch, op, geom, x, w, b)
    kwargs = dict(stride=case.stride, padding=case.padding, dilation=case.dilation,
                  groups=case.groups)
    expected = (local_conv2d_ref if op == "local_conv2d" else conv2d_ref)(
        x.numpy(), w.numpy(), None if b is None else b.numpy(), **kwargs)
    np.testing.assert_allclose(ref.numpy(), expected, rtol=1e-12, atol=1e-12)
    assert float(bound.min()) >= 0 and bool((bound >= ref.abs() - 1e-12).all())


@pytest.mark.parametrize("dtype_name", ["float64", "float32", "float16"])
def test_check_functions_passes_right_results(gpu_check, dtype_name):
    torch = pytest.importorskip("torch")
    import gpuconv

    case = gpu_check.geometry_grid()[7]  # groups
    results = gpu_check.check_functions(CpuTarget(torch), gpuconv, case.name,
                                        gpu_check.case_geometry(case), gpu_check.ALL_FUNCTIONS,
                                        getattr(torch, dtype_name), bias="position")
    assert sorted(r["function"] for r in results) == sorted(gpu_check.ALL_FUNCTIONS)
    assert all(r["ok"] for r in results), results
    forward = next(r for r in results if r["function"] == "conv2d")
    if dtype_name == "float16":  # C_in/groups = 2, a 3x3 kernel, plus the bias
        assert forward["terms"] == 2 * 9 + 1 and forward["tolerance"] == half_tolerance(19)


@pytest.mark.parametrize("function", ["conv2d", "local_conv2d_input", "conv2d_weight"])
def test_check_functions_fails_wrong_results(gpu_check, function):
    torch = pytest.importorskip("torch")
    import gpuconv
    from gpuconv import grad

    module = gpuconv if function in gpu_check.FORWARD_OPS else grad
    real = getattr(module, function)
    wrong = type("wrong", (), {function: staticmethod(lambda *a, **k: real(*a, **k) * 1.001)})
    case = gpu_check.geometry_grid()[2]
    target = CpuTarget(torch)
    geom = gpu_check.case_geometry(case)
    if module is grad:
        original = getattr(grad, function)
        setattr(grad, function, getattr(wrong, function))
        try:
            results = gpu_check.check_functions(target, gpuconv, "x", geom, (function,),
                                                torch.float32)
        finally:
            setattr(grad, function, original)
    else:
        results = gpu_check.check_functions(target, wrong, "x", geom, (function,),
                                            torch.float32)
    assert len(results) == 1 and not results[0]["ok"] and results[0]["result_kind_ok"]


def test_repeatability_check_sees_a_difference(gpu_check):
    torch = pytest.importorskip("torch")
    import gpuconv

    geom = gpu_check.case_geometry(gpu_check.DRY_GRID[0])
    target = CpuTarget(torch)
    same = gpu_check.check_repeatable(target, gpuconv, "x", geom, gpu_check.ALL_FUNCTIONS,
                                      torch.float32)
    assert len(same) == 6 and all(r["ok"] for r in same), same
    calls = iter(range(100))
    noisy = type("noisy", (), {"conv2d": staticmethod(
        lambda *a, **k: gpuconv.conv2d(*a, **k) + next(calls))})
    assert not gpu_check.check_repeatable(target, noisy, "x", geom, ("conv2d",),
                                          torch.float32)[0]["ok"]


# --- verdicts on the benchmark's records -----------------------------------------------------

def _record(impl, median, kernel=None, diff=0.0, skipped=None, pass_name="forward"):
    geom = workloads.gpu_geometry("deepface-l6", 4)
    extra = {"max_rel_diff": diff} if not skipped else {}
    return bench.make_record("local_conv2d", impl, "deepface-l6", "cuda", "float32", geom,
                             None if skipped else [median], {"compute_gflops": 1e4,
                                                             "bandwidth_gbs": 1e3},
                             pass_name=pass_name, skipped=skipped, kernel_s=kernel, **extra)


def test_disagreement_beyond_the_tolerance_fails(gpu_check):
    good, peer = _record("gpuconv", 2e-3, 1e-3), _record("torch-unfold", 4e-3, 3e-3)
    assert gpu_check.disagreements([good, peer]) == []
    bad = _record("gpuconv", 2e-3, 1e-3, diff=1.0)
    failed = _record("gpuconv", None, skipped="failed: TypeError: boom")
    found = gpu_check.disagreements([bad, failed, peer])
    assert len(found) == 2 and "1 >" in found[0] and "boom" in found[1]


def test_timing_lines_give_kernel_host_roofline_and_speedup(gpu_check):
    good, peer = _record("gpuconv", 2e-3, 1e-3), _record("torch-unfold", 4e-3, 3e-3)
    (line,) = gpu_check.timing_lines([good, peer], {"compute_gflops": 1e4,
                                                    "bandwidth_gbs": 1e3})
    assert "kernel    1.000 ms" in line and "host   1.000 ms" in line
    assert "3.00x torch-unfold" in line  # kernel time against kernel time
    roof = max(good["flops"] / 1e13, good["bytes"] / 1e12)
    assert f"{100 * roof / 1e-3:.1f} %" in line


RACECHECK_CLEAN = "========= RACECHECK SUMMARY: 0 hazards displayed (0 errors, 0 warnings)"


def test_sanitizer_summaries_are_read_per_tool(gpu_check):
    """racecheck prints its own summary (no ERROR SUMMARY line); the other tools print
    ERROR SUMMARY. Any count above zero, or no summary at all, is not clean."""
    clean = gpu_check.sanitizer_clean
    assert clean("racecheck", "sanitizer calls done\n" + RACECHECK_CLEAN)
    assert not clean("racecheck", "========= RACECHECK SUMMARY: 1 hazard displayed "
                                  "(1 error, 0 warnings)")
    assert not clean("racecheck", "========= RACECHECK SUMMARY: 2 hazards displayed "
                                  "(0 errors, 2 warnings)")
    assert not clean("racecheck", "========= ERROR SUMMARY: 0 errors")
    for tool in ("memcheck", "synccheck"):
        assert clean(tool, "========= ERROR SUMMARY: 0 errors")
        assert not clean(tool, "========= ERROR SUMMARY: 3 errors")
        assert not clean(tool, "========= ERROR SUMMARY: 1 error")
        assert not clean(tool, RACECHECK_CLEAN)


def test_sanitizer_run_reads_the_tools_own_summary(gpu_check, monkeypatch, tmp_path):
    """A stand-in compute-sanitizer that prints racecheck's clean summary: racecheck is
    clean, memcheck (which must print ERROR SUMMARY) is not."""
    fake = tmp_path / "compute-sanitizer"
    fake.write_text(f"#!/bin/sh\necho 'sanitizer calls done'\necho '{RACECHECK_CLEAN}'\n")
    fake.chmod(0o755)
    monkeypatch.setattr(gpu_check, "find_compute_sanitizer", lambda: str(fake))
    assert gpu_check.run_sanitizer("racecheck", timeout=30)["status"] == "ok"
    assert gpu_check.run_sanitizer("memcheck", timeout=30)["status"] == "errors"


def test_sanitizer_is_optional(gpu_check, monkeypatch):
    monkeypatch.setattr(gpu_check, "find_compute_sanitizer", lambda: None)
    assert gpu_check.run_sanitizer("racecheck")["status"].startswith("skipped")
    for name in ("conv2d(", "local_conv2d(", "conv2d_input(", "conv2d_weight(",
                 "local_conv2d_input(", "local_conv2d_weight(", "float16"):
        assert name in gpu_check.SANITIZER_SNIPPET


# --- the whole script, in its dry run --------------------------------------------------------

@pytest.mark.skipif(SIMULATOR, reason="the dry run starts its own simulator process")
@pytest.mark.skipif(not numba_cuda_importable(), reason="numba.cuda is not installed")
def test_dry_run_runs_every_phase(gpu_check, tmp_path):
    pytest.importorskip("torch")
    env = dict(os.environ, OUT=str(tmp_path), PYTHONPATH=str(ROOT))
    env.pop("NUMBA_ENABLE_CUDASIM", None)
    result = subprocess.run([sys.executable, str(SCRIPT), "--dry-run"], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=1500)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-6000:]
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    summary = (tmp_path / "gpu_check_summary.txt").read_text()
    assert report["failures"] == 0 and summary.splitlines()[-1].startswith("PASS")
    assert report["environment"]["packages"]["numba-cuda"]
    phases = report["phases"]
    assert set(phases) == set(PHASES_AFTER_ENV)
    assert not any(phase.get("skipped") or phase.get("error") for phase in phases.values())
    # every check of the correctness phases ran and passed
    for name in ("suite", "suite-gradients", "multipass", "determinism", "grid",
                 "candidates"):
        results = phases[name]["results"]
        assert results and all(r["ok"] for r in results), name
    # the suite phase checked what the plan counted, the small batch's streaming kernel too
    planned = gpu_check.suite_items(gpu_check.suite_layers(dry_run=True), dry_run=True)
    assert [(r["case"], r["function"]) for r in phases["suite"]["results"]] == [
        (f"{layer.name}@{geom.batch}", op) for layer, op, geom, _ in planned]
    assert planned[-1][2].batch == 1
    # every forward kernel the dispatcher weighs ran on each tiny layer, the pick once
    candidates = phases["candidates"]["results"]
    assert {r["kernel"].split("_f32")[0] for r in candidates} == {
        "conv2d", "conv2d_gemm", "local_conv2d", "local_conv2d_gemm", "local_conv2d_stream"}
    # (and the first layer's streaming kernel at batch 1: the pick, four positions a warp,
    # beside one position a warp, the model's fastest launch and the earlier map rule)
    assert sum(r["picked"] for r in candidates) == 2 * len(DRY_LAYER_NAMES) + 1
    streams = [r for r in candidates if r["case"] == "dry-a@1"]
    assert [r["picked"] for r in streams] == [True, False, False, False]
    assert all(r["ok"] for r in streams) and streams[0]["kernel"].endswith("_p4")
    assert all(r["min_bytes"] > 0 for r in streams)
    # and autotuning, turned on as a user does, chose among them
    tuned = phases["candidates"]["autotune"]
    assert [r["function"] for r in tuned] == ["conv2d", "local_conv2d"]
    assert all(r["ok"] for r in tuned) and "candidates autotune" in summary
    # the bench's CUDA backward ran (the crash of the first GPU run), the step says why not
    backward = phases["time-backward"]["bench"]["records"]
    assert {r["op"] for r in backward if r["impl"] == "gpuconv" and r["samples"]} == {
        "conv2d", "local_conv2d"}
    assert "time-step: " in summary
    # the host time of each gradient call was taken (no claim made of it in a dry run)
    assert set(phases["overhead"]["result"]["gradient_call_us"]) == {
        "conv2d_input", "conv2d_weight", "local_conv2d_input", "local_conv2d_weight"}
    assert "no timing claim" in output and " us" not in summary


DRY_LAYER_NAMES = ("dry-a", "dry-b")
PHASES_AFTER_ENV = ("suite", "suite-gradients", "multipass", "determinism", "memcheck",
                    "time-forward", "overhead", "time-backward", "time-step", "candidates",
                    "array-kinds",
                    "grid", "time-float16", "racecheck", "synccheck")


def test_cold_times_empty_l2_before_each_launch_and_time_it_alone(gpu_check, monkeypatch):
    """The streaming kernels' timing (GPU only, so checked with stand-ins): behind the
    sleeping kernel, each launch follows a write of twice L2 and sits alone between its
    two events; one result per launch."""
    from types import SimpleNamespace

    from numba import cuda

    log = []

    class Event:
        def record(self, stream):
            log.append(("record", stream))

        def synchronize(self):
            log.append("wait")

    class Flush:
        def __init__(self, n):
            self.n = n

        def fill_(self, value):
            log.append(("flush", self.n))

    class Blocker:
        def __getitem__(self, launch):
            return lambda ms: log.append(("blocker", launch))

    monkeypatch.setattr(cuda, "event", lambda *a, **k: Event(), raising=False)
    monkeypatch.setattr(cuda, "event_elapsed_time", lambda start, end: 0.25, raising=False)
    monkeypatch.setattr(gpu_check, "_blocker", Blocker)
    torch = SimpleNamespace(
        float32="float32", empty=lambda n, dtype, device: Flush(n),
        cuda=SimpleNamespace(current_device=lambda: 0,
                             get_device_properties=lambda d: SimpleNamespace(L2_cache_size=4096)))
    times = gpu_check._cold_times(torch, "s", lambda: log.append("launch"), launches=2)
    assert times == [0.25, 0.25]
    each = [("flush", 2 * 4096 // 4), ("record", "s"), "launch", ("record", "s")]
    assert log == [("blocker", (1, 1, "s"))] + each * 2 + ["wait"]


def test_copy_rate_counts_the_read_and_the_write(gpu_check):
    from types import SimpleNamespace

    copies = []

    class Tensor:
        def copy_(self, other):
            copies.append(other)

    class Event:
        def __init__(self, enable_timing=False):
            assert enable_timing

        def record(self):
            pass

        def synchronize(self):
            pass

        def elapsed_time(self, end):
            return 2.0  # milliseconds

    torch = SimpleNamespace(float32="float32", ones=lambda n, dtype, device: Tensor(),
                            empty_like=lambda t: Tensor(), cuda=SimpleNamespace(Event=Event))
    assert gpu_check.copy_rate(torch, size=4 << 20, rounds=3) == 2 * (4 << 20) / 2e-3
    assert len(copies) == 4  # one untimed, three timed


def test_stream_lines_without_a_copy_rate(gpu_check):
    from gpuconv.cuda import predict

    row = {"case": "l@8", "function": "local_conv2d", "kernel": "local_conv2d_stream_a",
           "ok": True, "picked": True, "predicted_ms": None, "measured_ms": 1.0,
           "min_bytes": 3e9}
    assert gpu_check.stream_lines([row], None, predict.H200) == [
        "small batch l@8: `local_conv2d_stream_a` 1.000 ms (cold L2), the copy rate not "
        "measured; predicted -",
        "small batches: 0 of 1 layer-batches at 70 % or more of the copy rate (the target: "
        "all)"]
