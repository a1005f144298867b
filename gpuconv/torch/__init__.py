"""PyTorch layers on gpuconv's kernels: custom operators, autograd, functional ops and modules.

Install with ``pip install "gpuconv[torch]"``; nothing else in gpuconv imports PyTorch.

- Functional, autograd-aware: :func:`conv2d` and :func:`local_conv2d` (tensors in, tensors out,
  like ``torch.nn.functional.conv2d``).
- Modules: :class:`Conv2d` (a drop-in for ``torch.nn.Conv2d`` with zeros padding: same
  parameter names, shapes and initialisation, so a ``state_dict`` loads into either) and
  :class:`LocallyConnected2d` (unshared weights: one kernel per output position).
- Custom operators (``torch.library.custom_op``), each with a fake (shape-only) kernel for
  ``torch.compile`` and an autograd formula, with CPU and CUDA kernels registered per device::

      gpuconv::conv2d(Tensor x, Tensor weight, Tensor? bias, int[] stride, int[] padding,
                      int[] dilation, int groups) -> Tensor
      gpuconv::local_conv2d(Tensor x, Tensor weight, Tensor? bias, int[] stride,
                            int[] padding, int[] dilation, int groups) -> Tensor
      gpuconv::conv2d_input(SymInt[] input_size, Tensor weight, Tensor grad_output, ...) -> Tensor
      gpuconv::conv2d_weight(Tensor input, SymInt[] weight_size, Tensor grad_output, ...) -> Tensor
      gpuconv::local_conv2d_input(...), gpuconv::local_conv2d_weight(...)  (the same)

  where ``...`` is ``int[] stride, int[] padding, int[] dilation, int groups``. The operators
  take 4-D inputs and explicit geometry: ``stride`` and ``dilation`` ``[h, w]``, ``padding``
  ``[top, bottom, left, right]``; the functional ops resolve ints, pairs, ``"same"``,
  ``"valid"`` and ``((top, bottom), (left, right))`` to that, and accept unbatched 3-D input.

The backward of each forward operator is the two gradient operators (and a sum for the bias);
the gradient operators' own backward is again made of these operators, so double backward
(``torch.autograd.grad(..., create_graph=True)``, ``gradgradcheck``) works too.

CPU tensors run gpuconv's CPU kernels; CUDA tensors run its CUDA kernels on PyTorch's current
stream, without copies. In plain eager mode the functional ops and modules call the same
kernels without the operator dispatcher (a ``torch.autograd.Function`` records the graph, with
the same gradient formulas), which saves PyTorch's per-call dispatch; under ``torch.compile``,
tracing, a dispatch or torch-function mode, functorch transforms or tensor subclasses they go
through the operators. float32 and float64 only: other dtypes raise ``TypeError``.

The transposed and one-dimensional layers (:func:`conv_transpose2d`,
:func:`local_conv_transpose2d`, :func:`conv1d`, :func:`local_conv1d` and their modules) are
built on the same operators (:mod:`.family`); the tiled convolution (:func:`tiled_conv2d`,
:class:`TiledConv2d`: kernel slots shared by the output positions) has operators of its own
(:mod:`.tiled`). Importing this package also registers, in
:mod:`gpuconv.ops`, where :func:`gpuconv.conv2d` and the other public functions send tensors
that require grad.
"""
from .layers import PADDING_MODES, Conv2d, LocallyConnected2d, conv2d, local_conv2d
from .family import (Conv1d, ConvTranspose2d, LocallyConnected1d, LocallyConnectedTranspose2d,
                     conv1d, conv_transpose2d, local_conv1d, local_conv_transpose2d)
from .tiled import TiledConv2d, tiled_conv2d

__all__ = ["conv2d", "local_conv2d", "Conv2d", "LocallyConnected2d",
           "conv_transpose2d", "local_conv_transpose2d", "conv1d", "local_conv1d",
           "ConvTranspose2d", "LocallyConnectedTranspose2d", "Conv1d", "LocallyConnected1d",
           "tiled_conv2d", "TiledConv2d"]
