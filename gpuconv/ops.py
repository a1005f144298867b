"""The operations gpuconv computes, each declared once.

A call enters at a public function (:mod:`gpuconv.conv`, :mod:`gpuconv.grad`), is checked
once against its row here, picks a device, and reaches one kernel: the row names the CPU
kernel and the CUDA launch of every operation, so the kernel for ``(op, device)`` is one
look-up away::

    public function -> OPS[name] -> row.kernel(device) -> kernel

Each row says:

- ``name``; ``kind``: ``"forward"`` (``x, weight[, bias] -> y``), ``"input_grad"``
  (``grad_output, weight -> grad_x``) or ``"weight_grad"`` (``x, grad_output -> grad_w``);
- ``tiled``: ``T_h x T_w`` kernel slots shared by the output positions
  ``(C_out, T_h, T_w, C_in/groups, kH, kW)``, the geometry a
  :class:`~gpuconv.geometry.TiledGeometry` (the call's ``tiling`` picks the slots);
- ``local``: unshared weights ``(C_out, H_out, W_out, C_in/groups, kH, kW)`` instead of
  shared ``(C_out, C_in/groups, kH, kW)``; this fixes the weight rank and shape rule and
  which bias shapes the forward accepts;
- where its kernels are, as ``"module:function"`` strings resolved on first use (importing
  a kernel module compiles nothing, but it does import Numba or numba-cuda):

  - ``cpu(*operands, out, geom)``: operands in the order of the kind above, all
    C-contiguous host arrays of one dtype (the forward's bias as a 3-D ``(C_out, 1, 1)`` or
    ``(C_out, H_out, W_out)`` array and a ``has_bias`` flag); writes every element of ``out``;
  - ``cpu_scratch(geom, itemsize)``: bytes the CPU kernel allocates beyond ``out``;
  - ``cuda(*operands, out, geom, stream, empty=None)``: Numba device arrays (the forward's
    bias may be None); ``empty(shape, dtype)`` allocates scratch on the caller's stream;
  - ``cuda_scratch(geom, dtype)``: elements of device scratch the launch allocates.

Adding an operation is adding a row (and its kernels).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass

__all__ = ["Op", "OPS", "FORWARD", "INPUT_GRAD", "WEIGHT_GRAD", "register_autograd",
           "set_autograd_loader", "autograd"]

FORWARD, INPUT_GRAD, WEIGHT_GRAD = "forward", "input_grad", "weight_grad"

_SHARED_LAYOUT = "(C_out, C_in/groups, kH, kW)"
_LOCAL_LAYOUT = "(C_out, H_out, W_out, C_in/groups, kH, kW)"
_TILED_LAYOUT = "(C_out, T_h, T_w, C_in/groups, kH, kW)"


def _resolve(path):
    module, name = path.split(":")
    return getattr(importlib.import_module(module), name)


@dataclass(frozen=True)
class Op:
    """One operation: its argument rules and its kernels (see the module docstring)."""

    name: str
    kind: str
    local: bool
    cpu: str
    cpu_scratch: str
    cuda: str
    cuda_scratch: str
    tiled: bool = False

    @property
    def weight_rank(self):
        return 6 if self.local or self.tiled else 4

    @property
    def weight_layout(self):
        """The weight's axes, as error messages print them."""
        if self.tiled:
            return _TILED_LAYOUT
        return _LOCAL_LAYOUT if self.local else _SHARED_LAYOUT

    def weight_shape(self, geom):
        """The weight shape this geometry needs."""
        if self.tiled:
            return geom.tiled_weight_shape()
        return geom.local_weight_shape() if self.local else geom.shared_weight_shape()

    def bias_shapes(self, geom):
        """Bias shapes the forward accepts: one per map, and for ``local`` one per position
        (for ``tiled`` one per kernel slot)."""
        shapes = [(geom.out_channels,)]
        if self.local:
            shapes.append((geom.out_channels, geom.out_height, geom.out_width))
        if self.tiled:
            shapes.append((geom.out_channels, geom.tile_height, geom.tile_width))
        return shapes

    def output_shape(self, geom):
        """Shape of the array the operation returns."""
        if self.kind == FORWARD:
            return geom.output_shape
        if self.kind == INPUT_GRAD:
            return geom.input_shape
        return self.weight_shape(geom)

    def kernel(self, device):
        """The kernel (``"cpu"``) or launch function (``"cuda"``) of this operation."""
        return _resolve(self.cpu if device == "cpu" else self.cuda)

    def scratch(self, device):
        """The scratch estimate of this operation's kernel on ``device``."""
        return _resolve(self.cpu_scratch if device == "cpu" else self.cuda_scratch)


# Where a call on PyTorch tensors that require grad goes: the differentiable operators of
# gpuconv.torch, a layer above the public functions. That layer registers them here when it is
# imported (``"forward"`` for conv2d / local_conv2d, ``"tiled_forward"`` for tiled_conv2d,
# which also takes the call's tiling, ``"conv_transpose2d"``, ``"local_conv_transpose2d"``),
# so the public functions reach PyTorch's autograd without importing it; gpuconv.torch_hook
# sets the loader that imports it on the first such call.
_AUTOGRAD = {}
_AUTOGRAD_LOADER = []


def register_autograd(name, function):
    """Called by :mod:`gpuconv.torch`: ``function`` records the autograd graph for ``name``."""
    _AUTOGRAD[name] = function


def set_autograd_loader(loader):
    """``loader()`` registers the autograd functions (imports :mod:`gpuconv.torch`)."""
    _AUTOGRAD_LOADER[:] = [loader]


def autograd(name):
    """The function registered for ``name``, loading the PyTorch layer on first use."""
    function = _AUTOGRAD.get(name)
    if function is None:
        for loader in _AUTOGRAD_LOADER:
            loader()
        function = _AUTOGRAD[name]
    return function


OPS = {op.name: op for op in (
    Op("conv2d", FORWARD, False,
       cpu="gpuconv.cpu.conv2d:conv2d_forward",
       cpu_scratch="gpuconv.cpu.conv2d:conv2d_scratch_bytes",
       cuda="gpuconv.cuda.launch:launch_conv2d",
       cuda_scratch="gpuconv.cuda.launch:no_scratch_elements"),
    Op("local_conv2d", FORWARD, True,
       cpu="gpuconv.cpu.local_conv2d:local_conv2d_forward",
       cpu_scratch="gpuconv.cpu.local_conv2d:local_conv2d_scratch_bytes",
       cuda="gpuconv.cuda.launch:launch_local_conv2d",
       cuda_scratch="gpuconv.cuda.launch:local_conv2d_scratch_elements"),
    Op("conv2d_input", INPUT_GRAD, False,
       cpu="gpuconv.cpu.conv2d_grad:conv2d_input_grad",
       cpu_scratch="gpuconv.cpu.conv2d_grad:conv2d_input_grad_scratch_bytes",
       cuda="gpuconv.cuda.launch:launch_conv2d_input_grad",
       cuda_scratch="gpuconv.cuda.launch:no_scratch_elements"),
    Op("conv2d_weight", WEIGHT_GRAD, False,
       cpu="gpuconv.cpu.conv2d_grad:conv2d_weight_grad",
       cpu_scratch="gpuconv.cpu.conv2d_grad:conv2d_weight_grad_scratch_bytes",
       cuda="gpuconv.cuda.launch:launch_conv2d_weight_grad",
       cuda_scratch="gpuconv.cuda.launch:conv2d_weight_grad_scratch_elements"),
    Op("local_conv2d_input", INPUT_GRAD, True,
       cpu="gpuconv.cpu.local_conv2d_grad:local_conv2d_input_grad",
       cpu_scratch="gpuconv.cpu.local_conv2d_grad:local_conv2d_input_grad_scratch_bytes",
       cuda="gpuconv.cuda.launch:launch_local_conv2d_input_grad",
       cuda_scratch="gpuconv.cuda.launch:local_conv2d_input_grad_scratch_elements"),
    Op("local_conv2d_weight", WEIGHT_GRAD, True,
       cpu="gpuconv.cpu.local_conv2d_grad:local_conv2d_weight_grad",
       cpu_scratch="gpuconv.cpu.local_conv2d_grad:local_conv2d_weight_grad_scratch_bytes",
       cuda="gpuconv.cuda.launch:launch_local_conv2d_weight_grad",
       cuda_scratch="gpuconv.cuda.launch:local_conv2d_weight_grad_scratch_elements"),
    Op("tiled_conv2d", FORWARD, False,
       cpu="gpuconv.cpu.tiled_conv2d:tiled_conv2d_forward",
       cpu_scratch="gpuconv.cpu.tiled_conv2d:tiled_conv2d_scratch_bytes",
       cuda="gpuconv.cuda.tiled:launch_tiled_conv2d",
       cuda_scratch="gpuconv.cuda.tiled:tiled_conv2d_scratch_elements", tiled=True),
    Op("tiled_conv2d_input", INPUT_GRAD, False,
       cpu="gpuconv.cpu.tiled_conv2d:tiled_conv2d_input_grad",
       cpu_scratch="gpuconv.cpu.tiled_conv2d:tiled_conv2d_input_grad_scratch_bytes",
       cuda="gpuconv.cuda.tiled:launch_tiled_conv2d_input_grad",
       cuda_scratch="gpuconv.cuda.tiled:tiled_conv2d_input_grad_scratch_elements", tiled=True),
    Op("tiled_conv2d_weight", WEIGHT_GRAD, False,
       cpu="gpuconv.cpu.tiled_conv2d:tiled_conv2d_weight_grad",
       cpu_scratch="gpuconv.cpu.tiled_conv2d:tiled_conv2d_weight_grad_scratch_bytes",
       cuda="gpuconv.cuda.tiled:launch_tiled_conv2d_weight_grad",
       cuda_scratch="gpuconv.cuda.tiled:tiled_conv2d_weight_grad_scratch_elements", tiled=True),
)}
