"""The tiled convolution's helper kernels (slots to positions and back), for
:mod:`gpuconv.cuda.tiled` and the PTX reports: a kernel module like
:mod:`gpuconv.cuda.grad_kernels`, built on :mod:`gpuconv.cuda.spec` alone."""

from __future__ import annotations

import functools

from numba import cuda, types, uint64

from .spec import _COMPUTE, _SCALAR, KernelSpec, _array, _rename

__all__ = ["expand_slots_kernel", "sum_slots_kernel"]


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
