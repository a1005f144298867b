"""The transposed and 1-D operations add no kernels, but they launch specialisations of the
existing factories that the benchmark layers do not (input-gradient kernels on a decoder's
upsampling geometry, the depthwise 1 x 1 forward that adds the transposes' bias, the forward
kernels on height-one geometries). Each compiles to PTX and assembles without spills, as
tests/test_cuda_ptx.py requires of the benchmark specialisations (no GPU needed).
"""

import os

import numpy as np
import pytest

SIMULATOR = os.environ.get("NUMBA_ENABLE_CUDASIM") == "1"
CCS = ((9, 0), (8, 0))


def _skip_reason():
    if SIMULATOR:
        return "the CUDA simulator is on (it cannot compile PTX)"
    try:
        from numba import cuda

        def probe(a):
            a[0] = 1.0

        cuda.compile_ptx(probe, "void(float32[:])", cc=(8, 0))
    except Exception as exc:
        return f"numba-cuda cannot compile PTX here ({type(exc).__name__}: {exc})"
    from gpuconv.cuda import ptx

    if ptx.find_ptxas() is None:
        return "ptxas not found (pip install nvidia-cuda-nvcc)"
    return None


_SKIP = _skip_reason()
pytestmark = pytest.mark.skipif(_SKIP is not None, reason=str(_SKIP))


def _family_specialisations(dtype):
    """``{kernel name: spec}`` of what the new operations launch on typical layers."""
    from gpuconv.cuda import grad_kernels, kernels, launch
    from gpuconv.geometry import conv_geometry
    from gpuconv.transpose import transpose_geometry

    specs = []
    # a decoder's upsampling: ConvTranspose2d(64, 32, 4, stride=2, padding=1) on 16 x 16
    t = transpose_geometry((8, 64, 16, 16), (64, 32, 4, 4), False, 2, 1, 0, 1, 1)
    g = conv_geometry(t.reached_shape, (4, 4), 64, t.stride, t.forward_padding, t.dilation,
                      t.groups)
    specs.append(launch.conv2d_input_grad_config(g, dtype).kernel)  # 32 channels: GEMM
    specs.append(grad_kernels.local_conv2d_input_grad_config(g, dtype).kernel)
    # the transposes' bias: a depthwise 1 x 1 forward with unit weights
    e = conv_geometry((8, 32, 32, 32), (1, 1), 32, 1, 0, 1, 32)
    specs.append(kernels.conv2d_config(e, dtype).kernel)
    specs.append(kernels.local_conv2d_config(e, dtype).kernel)
    # Conv1d(64, 128, 5, padding="same") on length 1024: height one
    c = conv_geometry((8, 64, 1, 1024), (1, 5), 128, 1, "same", 1, 1)
    specs.append(kernels.conv2d_config(c, dtype).kernel)
    specs.append(kernels.local_conv2d_config(c, dtype).kernel)
    return {spec.name: spec for spec in specs}


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_the_families_specialisations_assemble_without_spills(dtype):
    from gpuconv.cuda import ptx

    for name, spec in _family_specialisations(dtype).items():
        by_cc = ptx.compile_ptx_multi(spec, CCS)
        for cc, text in by_cc.items():
            assert name in text
            info = ptx.ptxas_info(text, f"sm_{cc[0]}{cc[1]}", name)
            assert not (info.spill_stores or info.spill_loads or info.stack_frame), info
            threads, blocks = spec.launch_bounds or (256, 1)
            assert info.registers * threads * blocks <= 65536, info
