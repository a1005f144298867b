"""gpuconv: shared (conv2d) and unshared (local_conv2d) 2-D convolutions and their gradients
(:mod:`gpuconv.grad`), with Numba CUDA kernels for NVIDIA GPUs and Numba CPU kernels behind
one API. The rest of the family runs on the same kernels: the transposed convolutions
(:mod:`.transpose`) on the input-gradient kernels, the 1-D ones (:mod:`.one_dimensional`) on
the 2-D kernels with a height of one.

Layout: the public functions (:mod:`.conv`, :mod:`.grad`) check a call once and pick a device
(:mod:`.device`); :mod:`.ops` declares every operation and names its kernels in
:mod:`.cpu` and :mod:`.cuda`; :mod:`.geometry` holds the shapes and the notation.
:mod:`gpuconv.torch` (the ``torch`` extra, imported only on request) wraps both operations as
PyTorch custom operators, functional ops and modules.
"""

from . import grad
from .conv import conv2d, local_conv2d, tiled_conv2d
from .device import (CudaUnavailableError, InsufficientMemoryError, select_device,
                     set_autotune)
from .geometry import get_conv_outsize
from .transpose import conv_transpose2d, local_conv_transpose2d
from .one_dimensional import conv1d, local_conv1d
from . import torch_hook  # noqa: F401  (tensors that require grad reach gpuconv.torch)
from .params import (ParamCount, conv2d_param_count, format_note_arithmetic,
                     fully_connected_param_count, local_conv2d_param_count, note_arithmetic,
                     tiled_conv2d_param_count)

__version__ = "0.1.0"

__all__ = ["conv2d", "local_conv2d", "grad", "select_device", "get_conv_outsize",
           "CudaUnavailableError", "InsufficientMemoryError",
           "ParamCount", "conv2d_param_count", "local_conv2d_param_count",
           "fully_connected_param_count", "note_arithmetic", "format_note_arithmetic",
           "__version__"]
__all__ += ["tiled_conv2d", "tiled_conv2d_param_count", "set_autotune"]
__all__ += ["conv_transpose2d", "local_conv_transpose2d", "conv1d", "local_conv1d"]
