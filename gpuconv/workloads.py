"""The benchmark layers: one table for ``gpuconv bench``, the CUDA kernel reports and
``scripts/gpu_check.py`` (see the table in BENCHMARKS.md).

Each :class:`Layer` is a square convolution from the seed note or a published network, with
the batch sizes the benchmark runs it at on a CPU and on a GPU. Importing this module
imports neither Numba nor PyTorch.
"""

from __future__ import annotations

from dataclasses import dataclass

from .geometry import conv_geometry

__all__ = ["Layer", "LAYERS", "gpu_geometry"]


@dataclass(frozen=True)
class Layer:
    """One benchmark layer (square input and kernel, as in the papers).

    ``network_op`` is the operation the network itself uses at this layer (DeepFace L4-L6
    are locally connected); the benchmark times both operations on every layer.
    """

    name: str
    title: str
    batch_cpu: int
    batch_gpu: int
    in_channels: int
    size: int
    out_channels: int
    kernel: int
    stride: int
    padding: int
    source: str
    groups: int = 1
    network_op: str = "conv2d"

    @property
    def short_title(self):
        """The title without its note in parentheses (``"DeepFace L4"``)."""
        return self.title.split(" (", 1)[0]

    def batch(self, device):
        return self.batch_gpu if device == "cuda" else self.batch_cpu

    def geometry(self, batch):
        return conv_geometry((batch, self.in_channels, self.size, self.size),
                             (self.kernel, self.kernel), self.out_channels,
                             self.stride, self.padding, 1, self.groups)


_KRIZHEVSKY = "Krizhevsky et al., NeurIPS 2012"
_SIMONYAN = "Simonyan & Zisserman, ICLR 2015"
_HE = "He et al., CVPR 2016"
_TAIGMAN = "Taigman et al. (DeepFace), CVPR 2014"

_LOCAL = "local_conv2d"

#: Every benchmark layer, by name, in the order of the table.
LAYERS = {layer.name: layer for layer in (
    Layer("seed-conv1", "seed conv1", 1, 32, 3, 500, 10, 5, 1, 0,
          "the seed note, figure 2 (5 x 5 x 3 x 10)"),
    Layer("seed-conv2", "seed conv2", 1, 32, 10, 496, 5, 3, 1, 0,
          "the seed note, section 4 (3 x 3 x 10 x 5)"),
    Layer("alexnet-conv1", "AlexNet conv1", 2, 32, 3, 227, 96, 11, 4, 0, _KRIZHEVSKY),
    Layer("alexnet-conv2", "AlexNet conv2 (ungrouped)", 2, 32, 96, 27, 256, 5, 1, 2,
          _KRIZHEVSKY),
    Layer("vgg16-conv3_2", "VGG-16 conv3_2", 1, 32, 256, 56, 256, 3, 1, 1, _SIMONYAN),
    Layer("vgg16-conv5_1", "VGG-16 conv5_1", 2, 32, 512, 14, 512, 3, 1, 1, _SIMONYAN),
    Layer("resnet50-conv1", "ResNet-50 conv1", 2, 32, 3, 224, 64, 7, 2, 3, _HE),
    Layer("resnet50-res2-3x3", "ResNet-50 res2 3x3", 4, 32, 64, 56, 64, 3, 1, 1, _HE),
    Layer("resnet50-res4-1x1", "ResNet-50 res4 1x1", 4, 32, 1024, 14, 256, 1, 1, 0, _HE),
    Layer("resnet50-res5-3x3", "ResNet-50 res5 3x3", 4, 32, 512, 7, 512, 3, 1, 1, _HE),
    Layer("deepface-l4", "DeepFace L4 (local)", 8, 128, 16, 63, 16, 9, 1, 0, _TAIGMAN,
          network_op=_LOCAL),
    Layer("deepface-l5", "DeepFace L5 (local)", 8, 128, 16, 55, 16, 7, 2, 0, _TAIGMAN,
          network_op=_LOCAL),
    Layer("deepface-l6", "DeepFace L6 (local)", 8, 128, 16, 25, 16, 5, 1, 0, _TAIGMAN,
          network_op=_LOCAL),
)}


def gpu_geometry(layer, batch=None):
    """The :class:`~gpuconv.geometry.ConvGeometry` of ``layer`` (a :class:`Layer` or its
    name) at its GPU batch size, or at ``batch``."""
    if isinstance(layer, str):
        layer = LAYERS[layer]
    return layer.geometry(layer.batch_gpu if batch is None else batch)
