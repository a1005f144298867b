"""Print the PTX/ptxas resource table of every CUDA kernel the benchmark layers launch.

No GPU needed: Numba compiles PTX for compute capabilities 9.0 and 8.0 and ``ptxas -v``
(from the ``nvidia-cuda-nvcc`` wheel, ``$CUDA_HOME`` or ``PATH``) reports registers, spills,
stack frame and shared memory per kernel.

    PYTHONPATH=. python scripts/ptx_report.py [--codes f16 f32 f64 | --float32-only]
                                              [--cc 9.0 8.0]
"""

import argparse
import sys
import time


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--codes", nargs="+", default=["f16", "f32", "f64"],
                        choices=["f16", "f32", "f64"],
                        help="dtype codes of the kernels (default: f16 f32 f64)")
    parser.add_argument("--float32-only", action="store_true",
                        help="only the float32 kernels (same as --codes f32)")
    parser.add_argument("--cc", nargs="+", default=["9.0", "8.0"],
                        help="compute capabilities (default: 9.0 8.0)")
    args = parser.parse_args(argv)
    from gpuconv.cuda import ptx as _cuda_ptx

    codes = ("f32",) if args.float32_only else tuple(args.codes)
    ccs = tuple(tuple(int(v) for v in cc.split(".")) for cc in args.cc)
    start = time.perf_counter()
    rows = _cuda_ptx.ptx_report(codes=codes, ccs=ccs, ptxas_codes=codes)
    print(_cuda_ptx.format_report(rows))
    from gpuconv.cuda import kernels as _cuda_kernels

    print("\nfloat32 kernels per benchmark layer (conv2d / local_conv2d):")
    for layer, (shared, unshared) in _cuda_kernels.workload_kernel_names().items():
        print(f"  {layer:<20} {shared:<28} {unshared}")
    print(f"\n{len(rows)} kernel/architecture pairs in {time.perf_counter() - start:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
