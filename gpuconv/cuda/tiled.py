"""CUDA launches of the tiled convolution (:func:`gpuconv.tiled_conv2d`) and its gradients.

As on the CPU (:mod:`gpuconv.cpu.tiled_conv2d`): ``T = (1, 1)`` launches conv2d's kernels on
the weight viewed as ``(C_out, C_in/groups, kH, kW)``, ``T = (H_out, W_out)`` local_conv2d's
on the weight as it is. Between them:

* forward: local_conv2d's batched GEMM in its tiled specialisation
  (:func:`gpuconv.cuda.kernels.local_conv2d_kernel` with ``tiling``): the same launch, the
  weights staged from each position's kernel slot;
* input gradient: the weight expanded to one kernel per position
  (:func:`.tiled_kernels.expand_slots_kernel`, device scratch of the local weight's size),
  then local_conv2d's input gradient;
* weight gradient: local_conv2d's weight gradient into scratch of that size, then
  :func:`.tiled_kernels.sum_slots_kernel`: each slot element adds its positions in a fixed
  order (deterministic, no atomics).

The launch configurations are :mod:`gpuconv.cuda.launch`'s (``tiled_conv2d_config`` and the
gradients'), chosen once per call key.
"""

from __future__ import annotations

import math

from .launch import (_flat, _numba_empty, conv2d_weight_grad_scratch_elements, launch_conv2d,
                     launch_conv2d_input_grad, launch_conv2d_weight_grad, launch_local_conv2d,
                     launch_local_conv2d_input_grad, launch_local_conv2d_weight_grad,
                     local_conv2d_input_grad_scratch_elements,
                     local_conv2d_weight_grad_scratch_elements, tiled_conv2d_config,
                     tiled_conv2d_scratch_elements,
                     tiled_conv2d_input_grad_config, tiled_conv2d_weight_grad_config)
from .spec import check_grid, compiled, dtype_code
from .tiled_kernels import expand_slots_kernel, sum_slots_kernel

__all__ = ["launch_tiled_conv2d", "launch_tiled_conv2d_input_grad",
           "launch_tiled_conv2d_weight_grad", "tiled_conv2d_scratch_elements",
           "tiled_conv2d_input_grad_scratch_elements", "tiled_conv2d_weight_grad_scratch_elements"]

_TILING_CODE = {"periodic": 1, "blocks": 2}


def _shared_shape(geom):
    return (geom.out_channels, geom.in_channels_per_group, geom.kernel_height,
            geom.kernel_width)


# --------------------------------------------------------------------------------------------
# scratch (the configurations are gpuconv.cuda.launch's, chosen once per call key)
# --------------------------------------------------------------------------------------------

def _expanded_elements(geom):
    return 0 if geom.shared or geom.unshared else math.prod(geom.local_weight_shape())


def tiled_conv2d_input_grad_scratch_elements(geom, dtype):
    """The expanded weight (between the ends of the dial) and local_conv2d's input-gradient
    scratch (its columns, for many maps a group), or none (conv2d's input gradient)."""
    if geom.shared:
        return 0
    return _expanded_elements(geom) + local_conv2d_input_grad_scratch_elements(geom.untiled,
                                                                               dtype)


def tiled_conv2d_weight_grad_scratch_elements(geom, dtype):
    """The local weight gradient (between the ends) and local_conv2d's weight-gradient
    scratch (its batch slices), or conv2d's weight-gradient scratch."""
    if geom.shared:
        return conv2d_weight_grad_scratch_elements(geom.untiled, dtype)
    return _expanded_elements(geom) + local_conv2d_weight_grad_scratch_elements(geom.untiled,
                                                                                dtype)


# --------------------------------------------------------------------------------------------
# helper kernels (gpuconv.cuda.tiled_kernels): slots to positions and back
# --------------------------------------------------------------------------------------------

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
