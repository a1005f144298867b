"""gpuconv: shared (conv2d) and unshared (local_conv2d) 2-D convolutions, with Numba CUDA
kernels for NVIDIA GPUs and Numba CPU kernels behind one API."""

from ._conv import conv2d, local_conv2d
from ._device import CudaUnavailableError, select_device
from ._geometry import get_conv_outsize

__version__ = "0.1.0"

__all__ = ["conv2d", "local_conv2d", "select_device", "get_conv_outsize",
           "CudaUnavailableError", "__version__"]
