"""CUDA launches of the tiled convolution (:func:`gpuconv.tiled_conv2d`) and its gradients.

As on the CPU (:mod:`gpuconv.cpu.tiled_conv2d`): ``T = (1, 1)`` launches conv2d's kernels on
the weight viewed as ``(C_out, C_in/groups, kH, kW)``, ``T = (H_out, W_out)`` local_conv2d's
on the weight as it is. Between them:

* forward: local_conv2d's batched GEMM in its tiled specialisation
  (:func:`gpuconv.cuda.kernels.local_conv2d_kernel` with ``tiling``): the same launch, the
  weights staged from each position's kernel slot;
* input gradient: the weight expanded to one kernel per position (:func:`expand_slots_kernel`,
  device scratch of the local weight's size), then local_conv2d's input gradient;
* weight gradient: local_conv2d's weight gradient into scratch of that size, then
  :func:`sum_slots_kernel`: each slot element adds its positions in a fixed order
  (deterministic, no atomics).
"""

from __future__ import annotations

import functools
import math

from numba import cuda, types, uint64

from . import grad_kernels, kernels
from .launch import (_flat, _numba_empty, launch_conv2d, launch_conv2d_input_grad,
                     launch_conv2d_weight_grad, launch_local_conv2d,
                     launch_local_conv2d_input_grad, launch_local_conv2d_weight_grad,
                     local_conv2d_scratch_elements)
from .spec import _COMPUTE, _SCALAR, KernelSpec, _array, _rename, check_grid, compiled, dtype_code

__all__ = ["launch_tiled_conv2d", "launch_tiled_conv2d_input_grad",
           "launch_tiled_conv2d_weight_grad", "tiled_conv2d_config",
           "tiled_conv2d_input_grad_config", "tiled_conv2d_weight_grad_config",
           "tiled_conv2d_scratch_elements", "tiled_conv2d_input_grad_scratch_elements",
           "tiled_conv2d_weight_grad_scratch_elements", "expand_slots_kernel",
           "sum_slots_kernel"]

_TILING_CODE = {"periodic": 1, "blocks": 2}


def _shared_shape(geom):
    return (geom.out_channels, geom.in_channels_per_group, geom.kernel_height,
            geom.kernel_width)


# --------------------------------------------------------------------------------------------
# configurations (chosen once per call key by the public layer's plan)
# --------------------------------------------------------------------------------------------

def tiled_conv2d_config(geom, dtype):
    """The configuration of the kernel the forward launches: conv2d's at ``T = (1, 1)``,
    local_conv2d's at ``T = (H_out, W_out)``, else local_conv2d's tiled specialisation."""
    plain = geom.untiled
    if geom.shared:
        return kernels.conv2d_config(plain, dtype)
    return kernels.local_conv2d_config(plain, dtype, None if geom.unshared else geom.tiling)


def tiled_conv2d_input_grad_config(geom, dtype):
    plain = geom.untiled
    if geom.shared:
        return grad_kernels.conv2d_input_grad_config(plain, dtype)
    return grad_kernels.local_conv2d_input_grad_config(plain, dtype)


def tiled_conv2d_weight_grad_config(geom, dtype):
    plain = geom.untiled
    if geom.shared:
        return grad_kernels.conv2d_weight_grad_config(plain, dtype)
    return grad_kernels.local_conv2d_weight_grad_config(plain, dtype)


def tiled_conv2d_scratch_elements(geom, dtype):
    """Device scratch of :func:`launch_tiled_conv2d`: that of the kernel it launches."""
    if geom.shared:
        return 1
    return local_conv2d_scratch_elements(geom.untiled, dtype)


def _expanded_elements(geom):
    return 0 if geom.shared or geom.unshared else math.prod(geom.local_weight_shape())


def tiled_conv2d_input_grad_scratch_elements(geom, dtype):
    """The expanded weight (between the ends of the dial)."""
    return _expanded_elements(geom)


def tiled_conv2d_weight_grad_scratch_elements(geom, dtype):
    """The local weight gradient (between the ends), or conv2d's weight-gradient scratch."""
    if geom.shared:
        return grad_kernels.conv2d_weight_grad_scratch_elements(geom.untiled, dtype)
    return _expanded_elements(geom)


# --------------------------------------------------------------------------------------------
# helper kernels: slots to positions and back
# --------------------------------------------------------------------------------------------

@functools.lru_cache(maxsize=None)
def expand_slots_kernel(code):
    """``local[o, oy, ox, r] = weight[o, slot(oy), slot(ox), r]`` (``r`` over ``k_len =
    c_Ig * k_H * k_W``), one element per thread, grid-stride, consecutive threads on
    consecutive ``r``. Arguments: flat ``weight (c_O, t_H, t_W, k_len)``, flat ``local
    (c_O, h_O, w_O, k_len)``, then ``c_O, h_O, w_O, t_H, t_W, k_len, tiling`` (1 periodic,
    2 blocks)."""

    def kernel(weight, local, c_O, h_O, w_O, t_H, t_W, k_len, tiling):
        total = c_O * h_O * w_O * k_len
        for e in range(cuda.grid(1), total, cuda.gridsize(1)):
            r = e % k_len
            p = e // k_len
            ox = p % w_O
            p //= w_O
            oy = p % h_O
            o = p // h_O
            if tiling == 1:
                sy = oy % t_H
                sx = ox % t_W
            else:
                sy = oy * t_H // h_O
                sx = ox * t_W // w_O
            local[uint64(e)] = weight[uint64(((o * t_H + sy) * t_W + sx) * k_len + r)]

    name = f"tiled_expand_slots_{code}"
    signature = (_array(code, 1),) * 2 + (types.int64,) * 7
    return KernelSpec(name, _rename(kernel, name), signature)


@functools.lru_cache(maxsize=None)
def sum_slots_kernel(code):
    """``out[o, sy, sx, r] = sum of local[o, oy, ox, r]`` over the positions of slot ``(sy,
    sx)``, added in order of ``oy``, then ``ox``, in the compute type and rounded once: one
    element per thread (grid-stride), consecutive threads on consecutive ``r``. Arguments
    as :func:`expand_slots_kernel`, ``local`` first and ``out`` second."""
    store = _SCALAR[code]
    scalar = _COMPUTE[code]

    def kernel(local, out, c_O, h_O, w_O, t_H, t_W, k_len, tiling):
        total = c_O * t_H * t_W * k_len
        for e in range(cuda.grid(1), total, cuda.gridsize(1)):
            r = e % k_len
            p = e // k_len
            sx = p % t_W
            p //= t_W
            sy = p % t_H
            o = p // t_H
            # The positions of slot (sy, sx): every t-th row (periodic) or a run (blocks).
            if tiling == 1:
                y0, y1, dy = sy, h_O, t_H
                x0, x1, dx = sx, w_O, t_W
            else:
                y0, y1, dy = -(-sy * h_O // t_H), -(-(sy + 1) * h_O // t_H), 1
                x0, x1, dx = -(-sx * w_O // t_W), -(-(sx + 1) * w_O // t_W), 1
            v = scalar(0)
            for oy in range(y0, y1, dy):
                for ox in range(x0, x1, dx):
                    v += local[uint64(((o * h_O + oy) * w_O + ox) * k_len + r)]
            out[uint64(e)] = store(v)

    name = f"tiled_sum_slots_{code}"
    signature = (_array(code, 1),) * 2 + (types.int64,) * 7
    return KernelSpec(name, _rename(kernel, name), signature)


def _launch_slots(spec, src, dst, geom, stream):
    threads = 256
    blocks = check_grid((max(1, min(-(-dst.size // threads), 65535)),), spec.name)
    k_len = geom.in_channels_per_group * geom.kernel_height * geom.kernel_width
    compiled(spec)[blocks, threads, stream](
        _flat(src), _flat(dst), geom.out_channels, geom.out_height, geom.out_width,
        geom.tile_height, geom.tile_width, k_len, _TILING_CODE[geom.tiling])


# --------------------------------------------------------------------------------------------
# launches (the rows of gpuconv.ops)
# --------------------------------------------------------------------------------------------

def launch_tiled_conv2d(x, weight, bias, out, geom, stream, config=None, empty=None):
    """Write the tiled convolution into ``out`` (see the module docstring)."""
    plain = geom.untiled
    config = config or tiled_conv2d_config(geom, x.dtype)
    if geom.shared:
        return launch_conv2d(x, weight.reshape(_shared_shape(geom)), bias, out, plain, stream,
                             config, empty)
    return launch_local_conv2d(x, weight, bias, out, plain, stream, config, empty,
                               tiles=geom.tiles)


def launch_tiled_conv2d_input_grad(grad_output, weight, out, geom, stream, empty=None,
                                   config=None):
    """The input gradient into ``out`` (see the module docstring)."""
    plain = geom.untiled
    config = config or tiled_conv2d_input_grad_config(geom, out.dtype)
    if geom.shared:
        return launch_conv2d_input_grad(grad_output, weight.reshape(_shared_shape(geom)), out,
                                        plain, stream, empty, config)
    if not geom.unshared:
        local = (empty or _numba_empty(stream))(geom.local_weight_shape(), weight.dtype)
        _launch_slots(expand_slots_kernel(dtype_code(weight.dtype)), weight, local, geom,
                      stream)
        weight = local
    return launch_local_conv2d_input_grad(grad_output, weight, out, plain, stream, empty,
                                          config)


def launch_tiled_conv2d_weight_grad(x, grad_output, out, geom, stream, empty=None,
                                    config=None):
    """The weight gradient into ``out`` (see the module docstring)."""
    plain = geom.untiled
    config = config or tiled_conv2d_weight_grad_config(geom, out.dtype)
    if geom.shared:
        return launch_conv2d_weight_grad(x, grad_output, out.reshape(_shared_shape(geom)),
                                         plain, stream, empty, config)
    if geom.unshared:
        return launch_local_conv2d_weight_grad(x, grad_output, out, plain, stream, empty,
                                               config)
    local = (empty or _numba_empty(stream))(geom.local_weight_shape(), out.dtype)
    launch_local_conv2d_weight_grad(x, grad_output, local, plain, stream, empty, config)
    _launch_slots(sum_slots_kernel(dtype_code(out.dtype)), local, out, geom, stream)
