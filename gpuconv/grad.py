"""Gradients of :func:`gpuconv.conv2d` and :func:`gpuconv.local_conv2d`, as ``torch.nn.grad``
has them for ``conv2d``: the backward pass of a layer, without an autograd engine.

For ``y = conv2d(x, w)`` (or ``local_conv2d``) and an upstream gradient ``gy = dL/dy``:

- :func:`conv2d_input` / :func:`local_conv2d_input` return ``dL/dx`` (a gather: each input
  pixel sums over the outputs whose windows cover it, for ``local_conv2d`` each with that
  output position's own kernel);
- :func:`conv2d_weight` / :func:`local_conv2d_weight` return ``dL/dw`` (for ``conv2d`` a sum
  over the batch and every output position, for ``local_conv2d`` a sum over the batch only:
  each position owns its kernel's gradient);
- bias gradients need no kernel: ``gy.sum(axis=(0, 2, 3))`` for a bias per output map
  ``(C_out,)``, ``gy.sum(axis=0)`` for ``local_conv2d``'s bias per position
  ``(C_out, H_out, W_out)``.

Arguments follow the forward's rules (stride, padding incl. ``"same"``, dilation, groups,
device choice, float32/float64, any strides) and its errors; ``grad_output`` must have the
forward's output shape. Results are new arrays of the kind of the first array argument
(``grad_output`` for the input gradients, ``input`` for the weight gradients). The kernels
are deterministic: the same call twice gives bitwise-identical results, on either device
(partial sums are reduced in a fixed order; no floating-point atomics).
"""

from __future__ import annotations

from .conv import call

__all__ = ["conv2d_input", "conv2d_weight", "local_conv2d_input", "local_conv2d_weight",
           "tiled_conv2d_input", "tiled_conv2d_weight"]

# The transposed convolutions' gradients are forward operations (gpuconv.transpose).
from .transpose import (conv_transpose2d_input, conv_transpose2d_weight,  # noqa: E402
                        local_conv_transpose2d_input, local_conv_transpose2d_weight)

__all__ += ["conv_transpose2d_input", "conv_transpose2d_weight",
            "local_conv_transpose2d_input", "local_conv_transpose2d_weight"]


def conv2d_input(input_size, weight, grad_output, stride=1, padding=0, dilation=1, groups=1, *,
                 device="auto"):
    """Gradient of :func:`gpuconv.conv2d` with respect to its input.

    ::

        gx[n, c, y, x] = sum over (o, u, v) with y + p_top = i * s_h + u * d_h and
                         x + p_left = j * s_w + v * d_w of weight[o, c', u, v] * gy[n, o, i, j]

    where ``o`` runs over the output channels of ``c``'s group and ``c'`` is ``c``'s index
    within it.

    Args:
        input_size: the input's shape ``(N, C_in, H, W)`` (a tuple of ints).
        weight: ``(C_out, C_in/groups, kH, kW)``.
        grad_output: ``(N, C_out, H_out, W_out)``, the gradient of the loss with respect to
            the forward's output; same dtype as ``weight``.
        stride, padding, dilation, groups, device: as :func:`gpuconv.conv2d`.

    Returns:
        ``(N, C_in, H, W)``, the kind of array ``grad_output`` is.

    >>> import numpy as np, gpuconv
    >>> w = np.ones((1, 1, 2, 2))
    >>> gy = np.ones((1, 1, 2, 2))
    >>> gpuconv.grad.conv2d_input((1, 1, 3, 3), w, gy, device="cpu")[0, 0]
    array([[1., 2., 1.],
           [2., 4., 2.],
           [1., 2., 1.]])
    """
    return call("conv2d_input", {"grad_output": grad_output, "weight": weight}, stride,
                padding, dilation, groups, device, sizes={"input_size": input_size})


def conv2d_weight(input, weight_size, grad_output, stride=1, padding=0, dilation=1, groups=1,
                  *, device="auto"):
    """Gradient of :func:`gpuconv.conv2d` with respect to its weight.

    ::

        gw[o, c, u, v] = sum_{n, i, j} gy[n, o, i, j]
                         * x_padded[n, g(o) * C_in/groups + c, i * s_h + u * d_h, j * s_w + v * d_w]

    Args:
        input: the forward's input ``(N, C_in, H, W)``.
        weight_size: the weight's shape ``(C_out, C_in/groups, kH, kW)``.
        grad_output: ``(N, C_out, H_out, W_out)``, same dtype as ``input``.
        stride, padding, dilation, groups, device: as :func:`gpuconv.conv2d`.

    Returns:
        ``(C_out, C_in/groups, kH, kW)``, the kind of array ``input`` is; zeros for an
        empty batch.

    >>> import numpy as np, gpuconv
    >>> x = np.arange(9, dtype=np.float64).reshape(1, 1, 3, 3)
    >>> gy = np.ones((1, 1, 2, 2))
    >>> gpuconv.grad.conv2d_weight(x, (1, 1, 2, 2), gy, device="cpu")[0, 0]
    array([[ 8., 12.],
           [20., 24.]])
    """
    return call("conv2d_weight", {"input": input, "grad_output": grad_output}, stride,
                padding, dilation, groups, device, sizes={"weight_size": weight_size})


def local_conv2d_input(input_size, weight, grad_output, stride=1, padding=0, dilation=1,
                       groups=1, *, device="auto"):
    """Gradient of :func:`gpuconv.local_conv2d` with respect to its input.

    As :func:`conv2d_input`, with each output position ``(i, j)`` contributing through its
    own kernel ``weight[o, i, j, c', u, v]``.

    Args:
        input_size: ``(N, C_in, H, W)``.
        weight: ``(C_out, H_out, W_out, C_in/groups, kH, kW)``.
        grad_output: ``(N, C_out, H_out, W_out)``, same dtype as ``weight``.
        stride, padding, dilation, groups, device: as :func:`gpuconv.conv2d`.

    Returns:
        ``(N, C_in, H, W)``, the kind of array ``grad_output`` is.

    >>> import numpy as np, gpuconv
    >>> w = np.zeros((1, 2, 2, 1, 2, 2)); w[0, 0, 0] = 1.0; w[0, 1, 1] = 2.0
    >>> gpuconv.grad.local_conv2d_input((1, 1, 3, 3), w, np.ones((1, 1, 2, 2)), device="cpu")[0, 0]
    array([[1., 1., 0.],
           [1., 3., 2.],
           [0., 2., 2.]])
    """
    return call("local_conv2d_input", {"grad_output": grad_output, "weight": weight}, stride,
                padding, dilation, groups, device, sizes={"input_size": input_size})


def local_conv2d_weight(input, weight_size, grad_output, stride=1, padding=0, dilation=1,
                        groups=1, *, device="auto"):
    """Gradient of :func:`gpuconv.local_conv2d` with respect to its weight.

    ::

        gw[o, i, j, c, u, v] = sum_n gy[n, o, i, j]
                               * x_padded[n, g(o) * C_in/groups + c, i * s_h + u * d_h, j * s_w + v * d_w]

    Args:
        input: the forward's input ``(N, C_in, H, W)``.
        weight_size: ``(C_out, H_out, W_out, C_in/groups, kH, kW)``.
        grad_output: ``(N, C_out, H_out, W_out)``, same dtype as ``input``.
        stride, padding, dilation, groups, device: as :func:`gpuconv.conv2d`.

    Returns:
        ``(C_out, H_out, W_out, C_in/groups, kH, kW)``, the kind of array ``input`` is;
        zeros for an empty batch.

    >>> import numpy as np, gpuconv
    >>> x = np.arange(9, dtype=np.float64).reshape(1, 1, 3, 3)
    >>> gw = gpuconv.grad.local_conv2d_weight(x, (1, 2, 2, 1, 2, 2), np.ones((1, 1, 2, 2)),
    ...                                       device="cpu")
    >>> gw[0, 1, 1, 0]
    array([[4., 5.],
           [7., 8.]])
    """
    return call("local_conv2d_weight", {"input": input, "grad_output": grad_output}, stride,
                padding, dilation, groups, device, sizes={"weight_size": weight_size})


def tiled_conv2d_input(input_size, weight, grad_output, stride=1, padding=0, dilation=1,
                       groups=1, *, tiling="periodic", device="auto"):
    """Gradient of :func:`gpuconv.tiled_conv2d` with respect to its input.

    As :func:`local_conv2d_input`, with each output position ``(i, j)`` contributing through
    its slot's kernel ``weight[o, r(i), c(j), c', u, v]`` (slots as
    :func:`gpuconv.tiled_conv2d` assigns them for ``tiling``).

    Args:
        input_size: ``(N, C_in, H, W)``.
        weight: ``(C_out, T_h, T_w, C_in/groups, kH, kW)``.
        grad_output: ``(N, C_out, H_out, W_out)``, same dtype as ``weight``.
        stride, padding, dilation, groups, device: as :func:`gpuconv.conv2d`.
        tiling: ``"periodic"`` or ``"blocks"``, as the forward.

    Returns:
        ``(N, C_in, H, W)``, the kind of array ``grad_output`` is.

    >>> import numpy as np, gpuconv
    >>> w = np.zeros((1, 1, 2, 1, 1, 1)); w[0, 0, 0] = 1.0; w[0, 0, 1] = 2.0
    >>> gpuconv.grad.tiled_conv2d_input((1, 1, 1, 4), w, np.ones((1, 1, 1, 4)), device="cpu")[0, 0]
    array([[1., 2., 1., 2.]])
    """
    return call("tiled_conv2d_input", {"grad_output": grad_output, "weight": weight}, stride,
                padding, dilation, groups, device,
                sizes={"input_size": input_size, "tiling": tiling})


def tiled_conv2d_weight(input, weight_size, grad_output, stride=1, padding=0, dilation=1,
                        groups=1, *, tiling="periodic", device="auto"):
    """Gradient of :func:`gpuconv.tiled_conv2d` with respect to its weight.

    ::

        gw[o, s, t, c, u, v] = sum over n and the positions (i, j) of slot (s, t) of
                               gy[n, o, i, j] * x_padded[n, g(o) * C_in/groups + c,
                                                         i * s_h + u * d_h, j * s_w + v * d_w]

    Args:
        input: the forward's input ``(N, C_in, H, W)``.
        weight_size: ``(C_out, T_h, T_w, C_in/groups, kH, kW)``.
        grad_output: ``(N, C_out, H_out, W_out)``, same dtype as ``input``.
        stride, padding, dilation, groups, device: as :func:`gpuconv.conv2d`.
        tiling: ``"periodic"`` or ``"blocks"``, as the forward.

    Returns:
        ``(C_out, T_h, T_w, C_in/groups, kH, kW)``, the kind of array ``input`` is; zeros
        for an empty batch. Each slot sums its positions in a fixed order (deterministic).

    >>> import numpy as np, gpuconv
    >>> x = np.arange(4, dtype=np.float64).reshape(1, 1, 1, 4)
    >>> gw = gpuconv.grad.tiled_conv2d_weight(x, (1, 1, 2, 1, 1, 1), np.ones((1, 1, 1, 4)),
    ...                                       device="cpu")
    >>> gw[0, 0, :, 0, 0, 0]
    array([2., 4.])
    """
    return call("tiled_conv2d_weight", {"input": input, "grad_output": grad_output}, stride,
                padding, dilation, groups, device,
                sizes={"weight_size": weight_size, "tiling": tiling})
