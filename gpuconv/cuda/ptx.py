"""Compile the CUDA kernels to PTX and ask ``ptxas`` what they cost, without a GPU.

For every specialisation the benchmark layers launch (see
:func:`gpuconv.cuda.kernels.workload_specialisations`) this compiles PTX with
:func:`numba.cuda.compile_ptx` for a compute capability, assembles it with ``ptxas -v`` for
the matching architecture and reads back registers per thread, spill stores/loads, stack
frame and static shared memory. The dynamic shared memory of both forwards and of the input
gradients is chosen at launch; the table shows the largest the benchmark layers ask for.

Used by ``tests/test_cuda_ptx.py`` (which asserts no spills in float16 and float32, and
that float16 kernels load half values into float32 registers with no float64 on the way)
and by ``scripts/ptx_report.py`` (which prints the table for the benchmark documents).
"""

from __future__ import annotations

import concurrent.futures
import glob
import os
import re
import shutil
import subprocess
import tempfile
from typing import NamedTuple

__all__ = ["PtxasInfo", "find_ptxas", "find_nvdisasm", "compile_ptx", "compile_ptx_multi",
           "ptxas_info", "sass", "sass_opcodes", "global_load_runs", "ptx_report", "format_report"]


class PtxasInfo(NamedTuple):
    """One kernel at one architecture, as ``ptxas -v`` reports it."""

    kernel: str
    arch: str
    registers: int
    spill_stores: int      # bytes
    spill_loads: int       # bytes
    stack_frame: int       # bytes of local memory per thread
    static_smem: int       # bytes
    dynamic_smem: int      # bytes, largest launch among the benchmark layers (0 if none)


def find_ptxas():
    """Path of ``ptxas``: the NVIDIA CUDA wheels first (``nvidia-cuda-nvcc``), then
    ``$CUDA_HOME/bin``, then ``PATH``. None if there is none."""
    try:
        import nvidia

        for root in list(nvidia.__path__):
            found = sorted(glob.glob(os.path.join(root, "**", "bin", "ptxas"), recursive=True))
            if found:
                return found[-1]
    except ImportError:
        pass
    for home in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH")):
        if home and os.path.exists(os.path.join(home, "bin", "ptxas")):
            return os.path.join(home, "bin", "ptxas")
    return shutil.which("ptxas")


def find_nvdisasm():
    """Path of ``nvdisasm`` (the ``nvidia-cuda-nvdisasm`` wheel, of the CUDA version of
    ``ptxas``), found as :func:`find_ptxas` finds ``ptxas``. None if there is none."""
    ptxas = find_ptxas()
    if ptxas:
        beside = os.path.join(os.path.dirname(ptxas), "nvdisasm")
        if os.path.exists(beside):
            return beside
    return shutil.which("nvdisasm")


def sass(ptx, arch, kernel=""):
    """The machine code (SASS) ``ptxas -arch=<arch>`` makes of ``ptx``, as ``nvdisasm``
    prints it: what a kernel's hot loop issues, read without a GPU."""
    ptxas, nvdisasm = find_ptxas(), find_nvdisasm()
    if ptxas is None or nvdisasm is None:
        raise FileNotFoundError("ptxas or nvdisasm not found "
                                "(pip install nvidia-cuda-nvcc nvidia-cuda-nvdisasm)")
    with tempfile.TemporaryDirectory() as tmp:
        path, cubin = os.path.join(tmp, "kernel.ptx"), os.path.join(tmp, "kernel.cubin")
        with open(path, "w") as f:
            f.write(ptx)
        result = subprocess.run([ptxas, f"-arch={arch}", path, "-o", cubin],
                                capture_output=True, text=True)
        if result.returncode != 0:
            raise RuntimeError(f"ptxas failed for {kernel} ({arch}):\n{result.stderr}")
        result = subprocess.run([nvdisasm, "-c", cubin], capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"nvdisasm failed for {kernel} ({arch}):\n{result.stderr}")
    return result.stdout


_OPCODE = re.compile(r"/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P[T0-9]+\s+)?([A-Z][A-Z0-9_]*(?:\.[A-Z0-9_]+)*)")


def sass_opcodes(text):
    """``{opcode with its modifiers: count}`` of a SASS listing (:func:`sass`)."""
    counts = {}
    for match in _OPCODE.finditer(text):
        counts[match.group(1)] = counts.get(match.group(1), 0) + 1
    return counts


def global_load_runs(text):
    """The global loads (``LDG``) of a SASS listing (:func:`sass`) issued back to back
    before the next shared-memory store or barrier, one count per run, in program order:
    how many loads a staging round keeps in flight."""
    runs, count = [], 0
    for match in _OPCODE.finditer(text):
        op = match.group(1)
        if op.startswith("LDG"):
            count += 1
        elif op.startswith(("STS", "BAR")) and count:
            runs.append(count)
            count = 0
    return runs


def compile_ptx(spec, cc):
    """PTX text of a :class:`~gpuconv.cuda.kernels.KernelSpec` for compute capability ``cc``."""
    from numba import cuda

    ptx, _ = cuda.compile_ptx(spec.pyfunc, spec.signature, cc=cc,
                              launch_bounds=spec.launch_bounds)
    return ptx


def compile_ptx_multi(spec, ccs):
    """``{cc: PTX}`` for several compute capabilities, typing and lowering the kernel once.

    Our kernels use nothing that depends on the compute capability before NVVM, so the
    Numba-lowered module is shared and only NVVM runs per ``cc``. That path uses a Numba
    internal; if it is not there, each ``cc`` is compiled separately with the public
    :func:`numba.cuda.compile_ptx`.
    """
    try:
        from numba.cuda.compiler import _compile_pyfunc_with_fixup

        library, _ = _compile_pyfunc_with_fixup(
            spec.pyfunc, spec.signature, debug=False, lineinfo=False, device=False,
            fastmath=False, cc=max(ccs), opt=None, abi="numba", abi_info=None,
            forceinline=False, launch_bounds=spec.launch_bounds, lto=False)
        result = {}
        for cc in ccs:
            (ptx,) = library.get_asm_strs(cc=cc)
            result[cc] = ptx
        return result
    except (ImportError, TypeError, ValueError):
        return {cc: compile_ptx(spec, cc) for cc in ccs}


_REGISTERS = re.compile(r"Used (\d+) registers")
_SPILLS = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_CODE = re.compile(r"_(f16|f32|f64)(?:_|$)")
_SMEM = re.compile(r"(\d+) bytes smem")


def ptxas_info(ptx, arch, kernel="", ptxas=None, dynamic_smem=0):
    """Run ``ptxas -v -arch=<arch>`` on ``ptx`` and parse its resource report."""
    ptxas = ptxas or find_ptxas()
    if ptxas is None:
        raise FileNotFoundError("ptxas not found (pip install nvidia-cuda-nvcc)")
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "kernel.ptx")
        with open(path, "w") as f:
            f.write(ptx)
        result = subprocess.run([ptxas, "-v", f"-arch={arch}", path, "-o", os.devnull],
                                capture_output=True, text=True)
    text = result.stdout + result.stderr
    if result.returncode != 0:
        raise RuntimeError(f"ptxas failed for {kernel} ({arch}):\n{text}")
    stack, stores, loads = (int(v) for v in _SPILLS.search(text).groups())
    smem = _SMEM.search(text)
    return PtxasInfo(kernel, arch, int(_REGISTERS.search(text).group(1)), stores, loads, stack,
                     int(smem.group(1)) if smem else 0, dynamic_smem)


def _dynamic_smem_by_kernel():
    import numpy as np

    from . import grad_kernels, kernels, local_grad_gemm

    largest = {}
    for dtype in (np.float16, np.float32, np.float64):
        for _, geom in kernels.workload_geometries():
            config = kernels.conv2d_config(geom, dtype)
            local = kernels.local_conv2d_config(geom, dtype)
            launches = [(config.kernel, config.shared_bytes), (local.kernel, local.shared_bytes)]
            launches += [(tiled.kernel, tiled.shared_bytes) for tiled in
                         (kernels.local_conv2d_config(geom, dtype, t) for t in ("periodic", "blocks"))]
            launches += grad_kernels.grad_specialisations(geom, dtype)
            launches += local_grad_gemm.gemm_grad_specialisations(geom, dtype)
            for spec, shared_bytes in launches:
                largest[spec.name] = max(largest.get(spec.name, 0), shared_bytes)
    return largest


def _compile_share(codes, ccs, share, shares):
    """PTX of every ``shares``-th benchmark specialisation, starting at ``share``: a worker's
    part (specs hold closures, so workers rebuild them from the same deterministic list)."""
    from . import kernels

    specs = kernels.workload_specialisations(codes)[share::shares]
    return [(spec.name, compile_ptx_multi(spec, ccs)) for spec in specs]


def _compile_all(codes, ccs, processes):
    """``[(kernel name, {cc: ptx})]`` in the order of ``workload_specialisations``."""
    if processes <= 1:
        return _compile_share(codes, ccs, 0, 1)
    import multiprocessing

    context = multiprocessing.get_context("spawn")  # no fork of a process that holds CUDA
    with concurrent.futures.ProcessPoolExecutor(processes, mp_context=context) as pool:
        parts = list(pool.map(_compile_share, [codes] * processes, [ccs] * processes,
                              range(processes), [processes] * processes))
    ordered = []
    for i in range(max(len(p) for p in parts)):
        ordered.extend(part[i] for part in parts if i < len(part))
    return ordered


def ptx_report(codes=("f16", "f32", "f64"), ccs=((9, 0), (8, 0)),
               ptxas_codes=("f16", "f32", "f64"), ptx_cache=None, processes=None):
    """Compile every benchmark specialisation for each ``cc`` and run ``ptxas`` on those of
    ``ptxas_codes`` (the architecture matching the cc: ``sm_90`` for ``(9, 0)``).

    Numba compiles one kernel at a time per process, so the kernels are shared out over
    ``processes`` worker processes (default: the number of CPUs, at most 4).

    Returns a list of :class:`PtxasInfo`, one per (kernel, architecture). ``ptx_cache``, a
    dict, receives ``{(kernel name, cc): ptx}`` so callers can reuse the PTX.
    """
    ptxas = find_ptxas()
    dynamic = _dynamic_smem_by_kernel()
    if processes is None:
        processes = min(4, os.cpu_count() or 1)
    compiled = _compile_all(tuple(codes), tuple(ccs), processes)
    jobs = []
    with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, os.cpu_count() or 1)) as pool:
        for name, ptx_by_cc in compiled:
            for cc in ccs:
                ptx = ptx_by_cc[cc]
                if ptx_cache is not None:
                    ptx_cache[(name, cc)] = ptx
                if _CODE.search(name).group(1) in ptxas_codes:
                    jobs.append(pool.submit(ptxas_info, ptx, f"sm_{cc[0]}{cc[1]}", name,
                                            ptxas, dynamic.get(name, 0)))
        rows = [job.result() for job in jobs]
    return sorted(rows, key=lambda r: (r.arch != f"sm_{ccs[0][0]}{ccs[0][1]}", r.arch))


def format_report(rows):
    """The report as a fixed-width text table."""
    header = ("kernel", "arch", "regs", "spill st", "spill ld", "stack", "smem static",
              "smem dynamic")
    lines = [f"{header[0]:<32} {header[1]:<6} {header[2]:>5} {header[3]:>9} {header[4]:>9} "
             f"{header[5]:>6} {header[6]:>12} {header[7]:>13}"]
    lines.append("-" * len(lines[0]))
    for r in rows:
        lines.append(f"{r.kernel:<32} {r.arch:<6} {r.registers:>5} {r.spill_stores:>9} "
                     f"{r.spill_loads:>9} {r.stack_frame:>6} {r.static_smem:>12} "
                     f"{r.dynamic_smem:>13}")
    return "\n".join(lines)
