"""scripts/kernel_table.py and gpuconv.cuda.predict: the predicted H200 table (no GPU).

The model's inputs are checked against counts made by hand, and the script runs on one
layer (without ptxas: fast) so the table in BENCHMARKS.md can always be regenerated.
"""

import importlib.util
import os
import pathlib

import numpy as np
import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
SIMULATOR = os.environ.get("NUMBA_ENABLE_CUDASIM") == "1"
pytestmark = pytest.mark.skipif(SIMULATOR, reason="the model reads kernel specs, not launches")


def _script():
    spec = importlib.util.spec_from_file_location("kernel_table",
                                                  ROOT / "scripts" / "kernel_table.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_occupancy_by_hand():
    from gpuconv.cuda import predict

    # 256 threads x 128 registers: 8 warps x 4096 registers, 64K / 32K = 2 blocks.
    assert predict.occupancy(256, 128, 20000) == 2
    # 126 registers round up to 128 per thread (256 per warp granule).
    assert predict.occupancy(256, 126, 1000) == 2
    # shared memory limits: 227 KiB / (60000 + 1024) = 3.
    assert predict.occupancy(64, 32, 60000) == 3
    # warps limit: 64 / 32 = 2 blocks of 1024 threads.
    assert predict.occupancy(1024, 16, 0) == 2


def test_bank_wavefronts_by_hand():
    from gpuconv.cuda import kernels

    assert kernels._bank_wavefronts(list(range(32))) == 1         # 32 banks
    assert kernels._bank_wavefronts([0] * 32) == 1                # one broadcast word
    assert kernels._bank_wavefronts([2 * i for i in range(32)]) == 2   # stride 2: 2-way
    assert kernels._bank_wavefronts([32 * i for i in range(4)]) == 4   # one bank, 4 words


def test_weight_loads_of_a_full_warp_touch_whole_sectors():
    """A warp loading 32 consecutive float32 words from a 128-byte aligned start: 4
    sectors, 1 line; stride-2 words: 8 sectors, 2 lines."""
    from gpuconv.cuda import predict

    assert predict._warp_loads(32, 32, 1, lambda e: e, 4) == (1, 4, 1, 1)
    assert predict._warp_loads(32, 32, 1, lambda e: 2 * e, 4) == (1, 8, 2, 1)
    # 100 elements, 32 threads, 2 loads per round: 2 rounds of 2 loads = 4 instructions.
    instructions, _, _, rounds = predict._warp_loads(100, 32, 2, lambda e: e, 4)
    assert (instructions, rounds) == (4, 2)


def test_local_rows_follow_the_dispatcher():
    from gpuconv import workloads
    from gpuconv.cuda import kernels, predict

    layer = workloads.LAYERS["deepface-l6"]  # at batch 32 (16 maps): the batched GEMM
    rows = predict.layer_rows(layer, np.float32, gradients=False, batch=32)
    geom = workloads.gpu_geometry(layer, 32)
    config = kernels.local_conv2d_config(geom, np.float32)
    local = [r for r in rows if r.kernel == config.kernel.name]
    assert len(local) == 1
    row = local[0]
    assert row.blocks == config.grid[0] * config.grid[1] * config.grid[2]
    assert row.threads == config.block[0] * config.block[1] * config.block[2]
    # Each weight is read once: at least 4 bytes per (batch) FMAs on it, the input and
    # output on top.
    assert row.dram_bytes_per_fma >= 4 / geom.batch
    assert 0 < row.roofline_share <= row.hidden_share <= 1
    assert row.lds_wavefronts_per_fma > 0 and row.sectors_per_fma > 0


@pytest.mark.parametrize("batch", [1, 8])
def test_small_batch_rows_are_the_streaming_kernel(batch):
    """At N <= 8 the dispatcher streams the weights: the table shows that kernel, its
    grid, and traffic of at least the weights once (4 / N bytes per FMA)."""
    from gpuconv import workloads
    from gpuconv.cuda import launch, local_stream, predict

    layer = workloads.LAYERS["deepface-l6"]
    geom = workloads.gpu_geometry(layer, batch)
    config = launch.local_conv2d_forward_config(geom, np.float32)
    assert isinstance(config, local_stream.LocalStreamConfig)
    rows = predict.layer_rows(layer, np.float32, gradients=False, batch=batch)
    (row,) = [r for r in rows if r.kernel == config.kernel.name]
    assert row.blocks == config.grid[0] * config.grid[1]
    assert row.threads == 32 * config.warps
    assert row.dram_bytes_per_fma >= 4 / batch
    assert 0 < row.roofline_share <= row.hidden_share <= 1
    assert not any("sum_slices" in r.kernel for r in rows)


@pytest.mark.parametrize("name", ["seed-conv1", "deepface-l6"])
def test_stream_search_ranks_launches_the_rule_could_make(name):
    """The model's search over the streaming kernel's launches: fastest first by the
    model's own rows, every launch distinct, the rule's pick among them (its choices are
    in the space searched), nothing predicted slower than the pick ranked above it."""
    from gpuconv import workloads
    from gpuconv.cuda import local_stream, predict

    geom = workloads.gpu_geometry(name, 8)
    found = predict.stream_search(geom, np.float32)
    times = [t for t, _ in found]
    assert times == sorted(times) and len(found) > 50
    assert len({c.kernel.name + str(c.grid) for _, c in found}) == len(found)
    pick = local_stream.local_stream_config(geom, np.float32)
    ranked = [c for _, c in found]
    assert pick in ranked
    pick_s = predict.forward_row("", geom, np.float32, pick).time_s
    assert times[ranked.index(pick)] == pytest.approx(pick_s)
    assert all(t <= pick_s for t in times[:ranked.index(pick)])
    for t, config in found[:3]:  # each time is the model's row of that launch
        assert predict.forward_row("", geom, np.float32, config).time_s == pytest.approx(t)


def test_script_prints_the_stream_search(capsys):
    kernel_table = _script()
    assert kernel_table.main(["--stream-search", "--no-ptxas", "--layers", "deepface-l5"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("| layer (N = 8) | pick | predicted (bounds) |")
    assert out[2].startswith("| DeepFace L5 | `k7x7_n8_m16_v3_u4_w7` |")
    assert "`k7x7_n8_m8_v4_u8_w2_p2`" in out[2] and out[2].endswith("| 3.96x |")
    with pytest.raises(SystemExit):
        kernel_table.main(["--stream-search", "--batch", "9", "--no-ptxas"])


def test_many_map_rows_are_the_per_position_gemm():
    """VGG-16 conv5_1 (512 maps): the dispatcher's double-buffered per-position GEMM, its
    grid, the weights once (4 / N bytes per FMA), and a prediction above the batched GEMM's
    (the reason the dispatcher takes it)."""
    from gpuconv import workloads
    from gpuconv.cuda import launch, local_gemm, predict

    layer = workloads.LAYERS["vgg16-conv5_1"]
    geom = workloads.gpu_geometry(layer)
    config = launch.local_conv2d_forward_config(geom, np.float32)
    assert isinstance(config, local_gemm.LocalGemmConfig)
    rows = predict.layer_rows(layer, np.float32, gradients=False)
    (row,) = [r for r in rows if r.kernel == config.kernel.name]
    assert row.blocks == config.grid[0] * config.grid[1] and row.threads == 64
    assert row.dram_bytes_per_fma >= 4 / geom.batch
    assert 0 < row.roofline_share <= row.hidden_share <= 1
    old = predict._local_row(layer.name, geom, np.float32, None, predict.H200)
    assert row.time_s < old.time_s


def test_script_prints_the_table_for_one_layer(capsys):
    assert _script().main(["--layers", "deepface-l6", "--no-ptxas"]) == 0
    out = capsys.readouterr().out
    assert "Not measured" in out
    lines = [line for line in out.splitlines() if line.startswith("| deepface-l6")]
    names = [line.split("`")[1] for line in lines]
    assert any(n.startswith("local_conv2d_gemm_f32_t64x16") for n in names)  # 16 maps
    assert any(n.startswith("conv2d_gemm_f32_t128x16") for n in names)  # 16 channels
    assert any("igrad" in n for n in names) and any("wgrad" in n for n in names)


def test_script_reads_registers_from_ptxas(capsys):
    from gpuconv.cuda import ptx as _cuda_ptx

    if _cuda_ptx.find_ptxas() is None:
        pytest.skip("ptxas not found (pip install nvidia-cuda-nvcc)")
    try:
        assert _script().main(["--layers", "deepface-l6", "--no-gradients"]) == 0
    except Exception as exc:  # numba-cuda's NVVM missing
        pytest.skip(f"cannot compile PTX here ({type(exc).__name__}: {exc})")
    out = capsys.readouterr().out
    assert "ptxas sm_90" in out
    rows = [line.split("|") for line in out.splitlines() if line.startswith("| deepface-l6")]
    assert rows and all(0 < int(cells[3]) <= 255 for cells in rows)


def test_channel_heavy_layers_get_gemm_rows_that_follow_the_dispatcher():
    """ResNet-50 res2 (64 channels): the forward GEMM and both GEMM gradients are modelled
    (a predicted time each), the split-K weight gradient's slice sum too, and the row's
    blocks are the launch's."""
    from gpuconv import workloads
    from gpuconv.cuda import launch, predict

    layer = workloads.LAYERS["resnet50-res2-3x3"]
    geom = workloads.gpu_geometry(layer)
    rows = {r.kernel: r for r in predict.layer_rows(layer, np.float32)}
    igrad = launch.conv2d_input_grad_config(geom, np.float32)
    wgrad = launch.conv2d_weight_grad_config(geom, np.float32)
    for config in (igrad, wgrad):
        row = rows[config.kernel.name]
        assert row.blocks == int(np.prod(config.grid))
        assert row.time_s > 0 and 0 < row.roofline_share <= row.hidden_share <= 1
        assert row.sectors_per_fma > 0 and row.lds_wavefronts_per_fma > 0
        # every operand read once at least: (x + w + y) / FMA, bytes
        assert row.dram_bytes_per_fma >= 4 * (geom.batch * 64 * 56 * 56 * 2) / (
            geom.batch * 64 * 56 * 56 * 64 * 9)
    assert wgrad.slices > 1 and rows["sum_slices_f32"].time_s > 0
    forward = [r for r in rows.values() if r.kernel.startswith("conv2d_gemm_f32_")]
    assert len(forward) == 1 and forward[0].time_s > 0
    # The tile's shared reads: 8 + 4 words a k step for 32 FMAs a thread, one wavefront each.
    assert rows[igrad.kernel.name].lds_wavefronts_per_fma == pytest.approx(12 / (32 * 32))


def test_phase_taps_by_hand():
    from gpuconv.cuda import predict

    # stride 2, a 3-tap kernel, padding 1: phase 0 takes taps 1, phase 1 taps 0 and 2.
    assert predict._phase_taps(0, 1, 3, 1, 2) == 1
    assert predict._phase_taps(1, 1, 3, 1, 2) == 2
    # stride 3 over 2 taps, no padding: phase 2 gets none.
    assert [predict._phase_taps(r, 0, 2, 1, 3) for r in range(3)] == [1, 1, 0]


def test_every_default_suite_layer_gets_rows():
    """The model covers every kernel the dispatcher picks on the default suite (it once
    failed on the forward GEMM's one-dimensional block); the conv2d rows are modelled."""
    from gpuconv import bench, workloads
    from gpuconv.cuda import predict

    for name in bench.SUITES["default"]:
        rows = predict.layer_rows(workloads.LAYERS[name], np.float32)
        conv = [r for r in rows if r.kernel.startswith("conv2d_")]
        assert conv and all(r.time_s for r in conv if "grad_" not in r.kernel), name


def test_local_gradient_rows_follow_the_dispatcher():
    """The local gradient rows are the batched-GEMM kernels the dispatcher picks, modelled:
    every weight of the layer read (the weight gradient: written) once at least, and a
    predicted time within the roofline."""
    from gpuconv import workloads
    from gpuconv.cuda import launch, predict

    layer = workloads.LAYERS["deepface-l6"]
    geom = workloads.gpu_geometry(layer)
    rows = predict.local_gradient_rows(layer, np.float32)
    igrad = launch.local_conv2d_input_grad_config(geom, np.float32)
    wgrad = launch.local_conv2d_weight_grad_config(geom, np.float32)
    assert [r.kernel for r in rows[:2]] == [igrad.kernel.name, wgrad.kernel.name]
    assert rows[1].blocks == int(np.prod(wgrad.grid))
    assert rows[0].threads == int(np.prod(igrad.block))
    for row in rows[:2]:
        assert row.dram_bytes_per_fma >= 4 / geom.batch
        assert 0 < row.roofline_share <= row.hidden_share <= 1
        assert row.lds_wavefronts_per_fma > 0 and row.sectors_per_fma > 0
    if wgrad.slices > 1:
        assert rows[2].kernel == "sum_slices_f32" and rows[2].time_s > 0


def test_local_backward_is_set_against_the_measured_peer():
    from gpuconv import workloads
    from gpuconv.cuda import predict

    layers = [workloads.LAYERS[name] for name in ("deepface-l6", "seed-conv2")]
    rows = predict.local_backward_rows(layers)
    assert rows[0].peer_s == predict.LOCAL_BACKWARD_PEER_S["deepface-l6"]
    assert rows[0].speedup == rows[0].peer_s / rows[0].predicted_s
    assert rows[1].peer_s is None and rows[1].speedup is None
    table = predict.format_backward_rows(rows)
    assert "geometric mean" in table and "| seed-conv2 |" in table


def test_script_prints_the_local_gradients_view(capsys):
    assert _script().main(["--layers", "deepface-l6", "--local-gradients", "--no-ptxas"]) == 0
    out = capsys.readouterr().out
    names = [line.split("`")[1] for line in out.splitlines()
             if line.startswith("| deepface-l6") and "`" in line]
    assert any(n.startswith("local_conv2d_igrad_gemm_f32_") for n in names)
    assert any(n.startswith("local_conv2d_wgrad_gemm_f32_") for n in names)
    assert not any(n.startswith("conv2d_") for n in names)
    assert "unfold + einsum" in out and "x |" in out


def test_script_prints_every_forward_candidate_with_the_pick_marked(capsys):
    from gpuconv import workloads
    from gpuconv.cuda import kernels

    assert _script().main(["--layers", "deepface-l6", "alexnet-conv1", "--candidates",
                           "--no-ptxas"]) == 0
    out = capsys.readouterr().out
    for name in ("deepface-l6", "alexnet-conv1"):
        geom = workloads.gpu_geometry(workloads.LAYERS[name])
        for op in ("conv2d", "local_conv2d"):
            rows = [line.split("|") for line in out.splitlines()
                    if line.startswith(f"| {name} (N={geom.batch}) | {op} |")]
            configs = kernels.forward_candidates(op, geom, np.float32)
            assert [r[3].strip(" `") for r in rows] == [c.kernel.name for c in configs]
            picked = [r[3].strip(" `") for r in rows if r[4].strip() == "yes"]
            pick = (kernels.conv2d_config if op == "conv2d"
                    else kernels.local_conv2d_forward_config)(geom, np.float32)
            assert picked == [pick.kernel.name]
            assert all(float(r[8]) > 0 for r in rows)


def test_forward_rows_model_the_split_k_sum_of_the_batched_local_forward():
    """A batched local forward that splits K launches the slice sum too: its row is
    DRAM-bound, the partial sums read once and the output written once."""
    from gpuconv import workloads
    from gpuconv.cuda import kernels, predict

    geom = workloads.gpu_geometry(workloads.LAYERS["vgg16-conv5_1"])
    config = kernels.local_conv2d_config(geom, np.float32)
    assert config.slices > 1
    rows = predict.forward_rows("vgg", geom, np.float32, config)
    assert [r.kernel for r in rows] == [config.kernel.name, "sum_slices_f32"]
    size = geom.batch * geom.out_channels * geom.out_height * geom.out_width
    assert rows[1].bound == "DRAM"
    assert rows[1].time_s == pytest.approx(size * (config.slices * 4 + 4)
                                           / predict.H200.copy_bytes_per_s)
    with pytest.raises(TypeError, match="not a forward launch"):
        predict.forward_row("vgg", geom, np.float32, object())
    assert predict.device_named("NVIDIA H100 80GB HBM3") is predict.H100
    assert predict.device_named("NVIDIA H200") is predict.H200
