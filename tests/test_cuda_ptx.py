"""The CUDA kernels compile to real PTX and assemble without spills (no GPU needed).

Every specialisation the benchmark layers launch is compiled once per session with Numba
for compute capabilities 9.0 and 8.0, in float16, float32 and float64; ``ptxas -v`` reports
registers, spills and shared memory for sm_90 and sm_80. float16 and float32 kernels must
keep their register blocks in registers: no spills and no stack frame. float16 kernels must
load and store 16-bit words, convert them to and from float32 in registers, and never touch
float64. The table is printed at the end of the run (and by ``scripts/ptx_report.py``).

Skipped under the CUDA simulator, or when numba-cuda's compiler (NVVM) is not installed.
"""

import os
import re

import pytest

SIMULATOR = os.environ.get("NUMBA_ENABLE_CUDASIM") == "1"
CCS = ((9, 0), (8, 0))
CODES = ("f16", "f32", "f64")


def _nvvm_missing():
    if SIMULATOR:
        return "the CUDA simulator is on (it cannot compile PTX)"
    try:
        from numba import cuda

        def probe(a):
            a[0] = 1.0

        cuda.compile_ptx(probe, "void(float32[:])", cc=(8, 0))
    except Exception as exc:  # numba-cuda or NVVM missing
        return f"numba-cuda cannot compile PTX here ({type(exc).__name__}: {exc})"
    return None


_SKIP = _nvvm_missing()
pytestmark = pytest.mark.skipif(_SKIP is not None, reason=str(_SKIP))


@pytest.fixture(scope="module")
def report():
    """(rows, ptx by (kernel, cc)): every benchmark specialisation compiled once."""
    from gpuconv.cuda import ptx as _cuda_ptx

    ptx = {}
    codes = CODES if _cuda_ptx.find_ptxas() else ()
    rows = _cuda_ptx.ptx_report(codes=CODES, ccs=CCS, ptxas_codes=codes, ptx_cache=ptx)
    return rows, ptx


@pytest.fixture(scope="module")
def ptxas_rows(report):
    from gpuconv.cuda import ptx as _cuda_ptx

    if _cuda_ptx.find_ptxas() is None:
        pytest.skip("ptxas not found (pip install nvidia-cuda-nvcc)")
    return report[0]


def test_every_specialisation_compiles_for_each_cc(report):
    from gpuconv.cuda import kernels as kernels

    _, ptx = report
    for spec in kernels.workload_specialisations():
        for cc in CCS:
            text = ptx[(spec.name, cc)]
            assert f".target sm_{cc[0]}{cc[1]}" in text
            assert spec.name in text, "kernel name should carry the specialisation"


def test_float16_and_float32_kernels_do_not_spill(ptxas_rows, capsys):
    rows = [r for r in ptxas_rows if "_f32" in r.kernel or "_f16" in r.kernel]
    assert {r.arch for r in rows} == {"sm_90", "sm_80"}
    assert any("_f16" in r.kernel for r in rows)
    spilling = [r for r in rows if r.spill_stores or r.spill_loads or r.stack_frame]
    from gpuconv.cuda import ptx as _cuda_ptx

    with capsys.disabled():  # always shown, not only with -s
        print("\n\nCUDA kernels: ptxas resource usage (benchmark specialisations)\n"
              + _cuda_ptx.format_report(ptxas_rows))
    assert not spilling, ("float16/float32 kernels use local memory:\n"
                          + _cuda_ptx.format_report(spilling))


# Global-memory accesses of the float16 kernels, by the PTX type they move: 16-bit words
# everywhere, except the conv2d weight gradient's float32 partial sums (written by the
# gradient kernel, read by the slice sum).
_GLOBAL_LD = re.compile(r"\bld\.global(?:\.nc)?\.(\w+)")
_GLOBAL_ST = re.compile(r"\bst\.global\.(\w+)")
_FLOAT32_PARTIALS = {"conv2d_wgrad_f16": ("st", "f32"), "conv2d_wgemm_f16": ("st", "f32"),
                     "sum_slices_f16": ("ld", "f32"),
                     # the local input gradient's float32 columns: written, then gathered
                     "local_conv2d_igrad_cols_f16": ("st", "f32"),
                     "local_conv2d_col2im_f16": ("ld", "f32")}
# Kernels that read no half words (only float32 partial sums) and write no half words.
_READS_FLOAT32 = ("sum_slices_f16", "local_conv2d_col2im_f16")
_WRITES_FLOAT32 = ("conv2d_wgrad_f16", "conv2d_wgemm_f16", "local_conv2d_igrad_cols_f16")


def _float32_partials(name, family):
    """The float32 access a float16 kernel may make: its partial sums (the split-K
    local_conv2d forward's ``_partial`` kernels store them)."""
    if name.endswith("_partial"):
        return ("st", "f32")
    return _FLOAT32_PARTIALS.get(family, ("st", "u16"))


def test_float16_kernels_move_half_words_and_compute_in_float32(report):
    """Loads are 16-bit words converted with ``cvt.f32.f16``, results are rounded with
    ``cvt.rn.f16.f32`` and stored as 16-bit words, and no float64 register, constant or
    conversion appears (a Python float or a mixed-type expression would bring one)."""
    from gpuconv.cuda import kernels as kernels

    _, ptx = report
    specs = kernels.workload_specialisations(("f16",))
    assert specs
    for spec in specs:
        family = spec.name[:spec.name.index("_f16") + 4]  # e.g. conv2d_wgrad_f16
        # pure copies, no conversion: strided to contiguous, tiled kernel slots to positions
        mover = family.startswith(("copy6d_", "tiled_expand_slots_"))
        for cc in CCS:
            text = ptx[(spec.name, cc)]
            assert ".f64" not in text, f"{spec.name} ({cc}) uses float64"
            kinds = {("ld", t) for t in _GLOBAL_LD.findall(text)}
            kinds |= {("st", t) for t in _GLOBAL_ST.findall(text)}
            allowed = {("ld", "u16"), ("ld", "b16"), ("st", "u16"), ("st", "b16")}
            allowed.add(_float32_partials(spec.name, family))
            assert kinds and kinds <= allowed, (spec.name, cc, kinds)
            if not mover:
                if family not in _READS_FLOAT32:
                    assert "cvt.f32.f16" in text, spec.name
                if family not in _WRITES_FLOAT32 and not spec.name.endswith("_partial"):
                    assert "cvt.rn.f16.f32" in text, spec.name


def test_kernels_fit_the_register_file_and_shared_memory(ptxas_rows):
    from gpuconv.cuda import kernels as kernels

    specs = {spec.name: spec for spec in kernels.workload_specialisations()}
    for r in ptxas_rows:
        # The blocks a kernel's launch bounds promise per SM must fit its 64K registers
        # (kernels without bounds launch at most 256 threads).
        threads, blocks = specs[r.kernel].launch_bounds or (256, 1)
        assert r.registers * threads * blocks <= 65536, r
        assert r.static_smem + r.dynamic_smem <= kernels.SHARED_LIMIT_BYTES, r


@pytest.mark.parametrize("spec_args", [
    ("conv2d", ("f32", 2, 4, 2, 2, 2)),      # the small specialisations the tests launch
    ("conv2d", ("f32", 1, 1, 2, 2, 1)),
    ("conv2d", ("f16", 2, 4, 2, 2, 2)),
    ("gemm", ("f32", 8, 8, 4, 2, 2, 1)),       # the implicit GEMM's simulator tile
    ("gemm", ("f16", 8, 8, 4, 2, 2, 1)),
    ("gemm", ("f64", 8, 8, 4, 2, 2, 1)),
    ("igemm", ("f32", 8, 8, 4, 2, 2, 1)),      # the implicit-GEMM gradients' simulator tile
    ("igemm", ("f16", 8, 8, 4, 2, 2, 1)),
    ("wgemm", ("f32", 8, 8, 4, 2, 2, 1)),
    ("wgemm", ("f16", 8, 8, 4, 2, 2, 1)),
    ("local", ("f32", 3, 2, 2, 2, 2, 1)),   # the forced remainder tests' kernels
    ("local", ("f64", 3, 2, 2, 2, 2, 1)),
    ("local", ("f16", 3, 2, 2, 2, 2, 1, True)),
    ("local", ("f32", 3, 3, 3, 4, 1, 4)),   # a small batch: one batch lane
    ("local", ("f32", 3, 2, 2, 2, 2, 1, False, "periodic")),  # tiled_conv2d's
    ("local", ("f16", 3, 2, 2, 2, 2, 1, True, "blocks")),
])
def test_small_test_specialisations_compile_without_spills(spec_args):
    from gpuconv.cuda import conv2d_gemm, conv2d_gemm_grad, kernels as kernels
    from gpuconv.cuda import ptx as _cuda_ptx

    family, args = spec_args
    factory = {"conv2d": kernels.conv2d_kernel, "local": kernels.local_conv2d_kernel,
               "gemm": conv2d_gemm.conv2d_gemm_kernel,
               "igemm": conv2d_gemm_grad.input_grad_gemm_kernel,
               "wgemm": conv2d_gemm_grad.weight_grad_gemm_kernel}[family]
    spec = factory(*args)
    ptx = _cuda_ptx.compile_ptx(spec, (9, 0))
    if _cuda_ptx.find_ptxas() is None:
        pytest.skip("ptxas not found")
    info = _cuda_ptx.ptxas_info(ptx, "sm_90", spec.name)
    assert info.spill_stores == info.spill_loads == info.stack_frame == 0, info


@pytest.mark.parametrize("layer", ["seed-conv2", "deepface-l4"])
def test_staging_rounds_keep_their_loads_in_flight(layer):
    """The batched GEMMs' staging rounds issue all of a round's global loads before storing
    any (what the model's load rounds assume): in the float32 machine code (sm_90) the local
    forward's weight and input rounds and the local input gradient's gy and weight rounds
    are runs of ``LOCAL_WEIGHT_LOADS`` / ``LOCAL_INPUT_LOADS`` and ``STAGE_LOADS`` /
    ``WEIGHT_STAGE_LOADS`` loads; and at the earlier count the acceptance run times beside
    them, runs of that many. ptxas and nvdisasm (the test extra's wheels), no GPU."""
    import numpy as np

    from gpuconv import workloads
    from gpuconv.cuda import kernels, local_grad_gemm
    from gpuconv.cuda import ptx as _cuda_ptx

    if _cuda_ptx.find_ptxas() is None or _cuda_ptx.find_nvdisasm() is None:
        pytest.skip("ptxas or nvdisasm not installed (pip install nvidia-cuda-nvcc "
                    "nvidia-cuda-nvdisasm)")
    geom = workloads.LAYERS[layer].geometry(workloads.LAYERS[layer].batch_gpu)
    cases = [
        (kernels.local_conv2d_config(geom, np.float32).kernel,
         [kernels.LOCAL_WEIGHT_LOADS["f32"], kernels.LOCAL_INPUT_LOADS["f32"]]),
        (local_grad_gemm.local_input_grad_gemm_config(geom, np.float32).kernel,
         [local_grad_gemm.STAGE_LOADS["f32"], local_grad_gemm.WEIGHT_STAGE_LOADS["f32"]]),
        (kernels.local_conv2d_config(geom, np.float32, input_loads=2).kernel,
         [kernels.LOCAL_WEIGHT_LOADS["f32"], 2]),
        (local_grad_gemm.local_input_grad_gemm_config(geom, np.float32, gy_loads=2).kernel,
         [2, local_grad_gemm.WEIGHT_STAGE_LOADS["f32"]]),
    ]
    for spec, rounds in cases:
        text = _cuda_ptx.sass(_cuda_ptx.compile_ptx(spec, (9, 0)), "sm_90", spec.name)
        assert _cuda_ptx.global_load_runs(text) == rounds, spec.name
