"""How the public functions find the PyTorch layer without importing it.

A call of :func:`gpuconv.conv2d` (or another public function) on PyTorch tensors that require
grad goes through the differentiable operators of :mod:`gpuconv.torch`, a layer above the
public functions: they look it up in :mod:`gpuconv.ops` (:func:`gpuconv.ops.autograd`), where
:mod:`gpuconv.torch` registers it when it is imported. The package imports this module, which
gives :mod:`gpuconv.ops` the loader for the first such call made before anything imported
:mod:`gpuconv.torch` (PyTorch itself is then already imported: the tensors are its own).
"""

from .ops import set_autograd_loader


def load_torch_layer():
    """Import :mod:`gpuconv.torch` (it registers its autograd functions in :mod:`gpuconv.ops`)."""
    from . import torch  # noqa: F401


set_autograd_loader(load_torch_layer)
