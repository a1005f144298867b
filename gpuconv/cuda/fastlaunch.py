"""Kernel launches whose arguments are marshalled once per launch shape, not once per call.

Numba's dispatcher does on every launch what a repeated gpuconv call does not need: it types
every argument to pick an overload (a gpuconv kernel has exactly one), converts every
scalar into a new ctypes object and wraps every array in a memory view, then builds the
launch configuration. A gpuconv launch passes 3-5 arrays and 20-40 integer scalars (the
geometry, the tile and the staging walks' steps), and the scalars repeat on every call of
the same shape. :class:`FastKernel` keeps what the dispatcher would build for them:

- the compiled overload and, per GPU, its CUDA function;
- per launch shape ``[grid, block, stream, shared bytes]``, numba-cuda's launch
  configuration and its stream;
- per tuple of scalar values, their ctypes objects (the same types numba-cuda makes);

so a launch only reads each array's pointer, size and strides (an N-D C-contiguous array
stands for the flat 1-D parameter the kernels take, without a reshape) and queues the kernel
through the same ``cuda.core`` launch the dispatcher ends in. The arrays are Numba device
arrays or :class:`DeviceView` objects: the CUDA path views the caller's arrays, its output
and its scratch as those (a pointer, a shape, strides and the owner) instead of building a
Numba device array of each on every call. The argument list is numba-cuda's own format
(``_Kernel._prepare_args``: for an array ``meminfo, parent, size, itemsize, data, *shape,
*strides``; a scalar as ``ctypes.c_<type>``), and the first launch of every kernel in a
process is checked against what ``_prepare_args`` itself makes of the same arguments: a
difference, or a numba-cuda whose internals are not the ones this module reads, turns the
fast path off for that kernel (:func:`fallback_reasons` says why) and the dispatcher
launches it, as before.

The fast path is off in Numba's CUDA simulator and when ``GPUCONV_FAST_LAUNCH=0``
(:func:`set_enabled`); the results are the same either way (the kernel and its arguments
are), only the host's time per launch differs.
"""

from __future__ import annotations

import ctypes
import numbers
import operator
import os
import threading

import numpy as np

from ..device import c_strides, is_c_contiguous

__all__ = ["FastKernel", "DeviceView", "ENV_VAR", "enabled", "set_enabled", "fallback_reasons",
           "pack_array"]

ENV_VAR = "GPUCONV_FAST_LAUNCH"
_OFF_WORDS = ("0", "false", "off", "no")
_STATE = []  # [on or off], once read from the environment or set
_LOCK = threading.Lock()
#: Bound on the launch shapes and scalar tuples kept per kernel (a process that sweeps many
#: shapes starts over rather than growing without limit).
_MAX_ENTRIES = 256


def enabled():
    """Whether launches take the fast path (default on; ``GPUCONV_FAST_LAUNCH=0`` turns it
    off for a process, :func:`set_enabled` for the rest of it)."""
    if not _STATE:
        _STATE.append(os.environ.get(ENV_VAR, "1").strip().lower() not in _OFF_WORDS)
    return _STATE[0]


def set_enabled(on):
    """Turn the fast path on or off; returns the previous setting."""
    if not isinstance(on, bool):
        raise TypeError(f"on must be True or False, got {type(on).__name__}")
    before = enabled()
    _STATE[:] = [on]
    return before


_REASONS = {}  # kernel name -> why it launches through the dispatcher


def fallback_reasons():
    """``{kernel name: reason}`` for the kernels of this process that launch through
    Numba's dispatcher although the fast path is on."""
    return dict(_REASONS)


class _NotFast(Exception):
    """These arguments take the dispatcher (e.g. an array that is not a Numba device array)."""


_C_LAYOUTS = {}  # (shape, strides, itemsize) -> C-contiguous or not


def _is_c(shape, strides, itemsize):
    key = (shape, strides, itemsize)
    c = _C_LAYOUTS.get(key)
    if c is None:
        if len(_C_LAYOUTS) >= 4 * _MAX_ENTRIES:
            _C_LAYOUTS.clear()
        # (the strides of length-1 axes do not matter: the public layer's rule too)
        c = _C_LAYOUTS[key] = is_c_contiguous(shape, strides, itemsize)
    return c


def pack_array(ndim, layout, dtype, value):
    """numba-cuda's kernel arguments for an array parameter of ``ndim`` dimensions, ``layout``
    ('C' or 'A') and ``dtype``, from ``value`` (a :class:`DeviceView` or a Numba device
    array): ``[meminfo, parent, size, itemsize, data, *shape, *strides]``, as
    ``_Kernel._prepare_args`` makes them. A C-contiguous ``value`` of another shape stands
    for a 1-D C parameter (the arguments of its flat view). Raises :class:`_NotFast` for
    anything else (the dispatcher decides)."""
    if type(value) is DeviceView:
        ptr = value.ptr
    else:
        if getattr(value, "gpu_data", None) is None:  # not a Numba device array
            raise _NotFast
        ptr = None
    value_dtype = value.dtype
    if value_dtype is not dtype and value_dtype != dtype:
        raise _NotFast
    shape = value.shape
    itemsize = dtype.itemsize
    size = value.size
    strides = value.strides
    if len(shape) != ndim:
        if ndim != 1 or not (size <= 1 or _is_c(shape, strides, itemsize)):
            raise _NotFast
        shape, strides = (size,), (itemsize,)
    elif layout == "C" and not (size <= 1 or _is_c(shape, strides, itemsize)):
        raise _NotFast
    if ptr is None:
        ptr = value.device_ctypes_pointer.value
    return [0, 0, size, itemsize, ptr, *shape, *strides]


_DTYPES = {}  # typestr -> NumPy dtype
_STRIDES = {}  # (shape, itemsize) -> C strides


class DeviceView:
    """A GPU array as the fast path launches it: the caller's memory (pointer, shape,
    strides, dtype) and the object that owns it, kept alive as long as the view. Making one
    costs a few attribute reads where a Numba device array asks the driver about the
    pointer and builds a layout; ``__cuda_array_interface__`` lets Numba take it wherever a
    device array is needed (the dispatcher, when the fast path is off for a kernel)."""

    __slots__ = ("ptr", "shape", "strides", "dtype", "size", "ndim", "owner")

    def __init__(self, ptr, shape, dtype, strides=None, owner=None):
        shape = tuple(shape)
        if strides is None:
            key = (shape, dtype.itemsize)
            strides = _STRIDES.get(key)
            if strides is None:
                if len(_STRIDES) >= 4 * _MAX_ENTRIES:
                    _STRIDES.clear()
                strides = _STRIDES[key] = c_strides(shape, dtype.itemsize)
        size = 1
        for extent in shape:
            size *= extent
        self.ptr, self.shape, self.strides, self.dtype = ptr or 0, shape, tuple(strides), dtype
        self.size, self.ndim, self.owner = size, len(shape), owner

    @classmethod
    def from_interface(cls, cai, owner):
        """The view of an unmasked ``__cuda_array_interface__`` ``cai`` of ``owner``."""
        typestr = cai["typestr"]
        dtype = _DTYPES.get(typestr)
        if dtype is None:
            dtype = _DTYPES[typestr] = np.dtype(typestr)
        return cls(cai["data"][0], cai["shape"], dtype, cai.get("strides"), owner)

    @property
    def device_ctypes_pointer(self):
        return ctypes.c_void_p(self.ptr)

    def is_c_contiguous(self):
        return self.size <= 1 or _is_c(self.shape, self.strides, self.dtype.itemsize)

    def reshape(self, *shape):
        """A view of another shape over the same memory (C-contiguous views only)."""
        if len(shape) == 1 and isinstance(shape[0], (tuple, list)):
            shape = shape[0]
        view = DeviceView(self.ptr, shape, self.dtype, None, self.owner)
        if view.size != self.size or not self.is_c_contiguous():
            raise ValueError(f"cannot view an array of shape {self.shape} and strides "
                             f"{self.strides} as shape {tuple(shape)}")
        return view

    @property
    def __cuda_array_interface__(self):
        return {"shape": self.shape,
                "strides": None if self.is_c_contiguous() else self.strides,
                "typestr": self.dtype.str, "data": (self.ptr, False), "version": 3,
                "stream": None}


class FastKernel:
    """A Numba CUDA kernel of one signature, launched as the dispatcher launches it
    (``kernel[grid, block, stream, shared_bytes](*args)``) with its argument marshalling
    kept per launch shape and scalar values. Attributes it does not define are the
    dispatcher's (``get_regs_per_thread`` and the like)."""

    def __init__(self, dispatcher, signature, name):
        from numba.cuda import types

        self.dispatcher = dispatcher
        self.name = name
        self._launches = {}
        self._scalars = {}
        self._overload = None
        self._checked = False
        arrays, scalars = [], []
        for index, ty in enumerate(signature):
            if isinstance(ty, types.Array):
                arrays.append((index, ty.ndim, ty.layout, np.dtype(str(ty.dtype))))
            elif isinstance(ty, types.Integer):
                scalars.append((index, getattr(ctypes, f"c_{ty}")))
            else:  # a type this module does not marshal: always the dispatcher
                _REASONS[name] = f"argument {index} has type {ty}"
        self._arrays = tuple(arrays)
        self._scalar_slots = tuple(scalars)
        self._count = len(signature)
        specs = {i: (ndim, layout, dtype) for i, ndim, layout, dtype in arrays}
        self._slots = tuple((i, specs.get(i)) for i in range(self._count))
        self._ctypes = dict(scalars)
        # each array's part of the list: its place (5 + 2 * ndim entries) and its spec
        places, start = [], 0
        for i, spec in self._slots:
            if spec is None:
                start += 1
            else:
                places.append((i, start, start + 5 + 2 * spec[0], spec))
                start += 5 + 2 * spec[0]
        self._array_places = tuple(places)
        indices = [i for i, _ in scalars]
        self._scalar_key = (operator.itemgetter(*indices) if len(indices) > 1
                            else (lambda args, i=indices[0] if indices else 0: (args[i],)))

    def __getattr__(self, name):
        if name == "dispatcher":  # not yet set (an object made without __init__)
            raise AttributeError(name)
        return getattr(self.dispatcher, name)

    def __getitem__(self, launch):
        try:
            bound = self._launches.get(launch)
        except TypeError:  # an unhashable grid or block (a list): the dispatcher's launch
            return self.dispatcher[launch]
        if bound is None:
            if len(self._launches) >= _MAX_ENTRIES:
                self._launches.clear()
            bound = self._launches[launch] = _Launch(self, *launch)
        return bound

    # -- the dispatcher's work, done once -------------------------------------------------

    def _kernel(self):
        """The compiled overload (numba-cuda's ``_Kernel``): the dispatcher's only one."""
        if self._overload is None:
            overloads = self.dispatcher.overloads
            if len(overloads) != 1:
                _REASONS[self.name] = f"{len(overloads)} compiled overloads"
                raise _NotFast
            kernel = next(iter(overloads.values()))
            if (getattr(kernel, "debug", True) or getattr(kernel, "cooperative", True)
                    or getattr(kernel, "extensions", True)
                    or getattr(kernel, "launch_config_sensitive", False)
                    or getattr(self.dispatcher, "_launch_config_sensitive", False)):
                _REASONS[self.name] = ("compiled for debugging, cooperative launch, argument "
                                       "extensions or a launch-configuration-sensitive kernel")
                raise _NotFast
            self._overload = kernel
        return self._overload

    def _pack(self, args):
        """The argument list of a launch: the scalars' part made once per tuple of their
        values (a template with the arrays' places), each array's part read per call."""
        if len(args) != self._count:
            raise _NotFast
        key = self._scalar_key(args) if self._scalar_slots else ()
        try:
            template = self._scalars.get(key)
        except TypeError:  # an unhashable scalar argument: the dispatcher says what is wrong
            raise _NotFast from None
        if template is None:
            template = self._template(args)
            if len(self._scalars) >= _MAX_ENTRIES:
                self._scalars.clear()
            self._scalars[key] = template
        packed = template.copy()
        for index, start, stop, spec in self._array_places:
            packed[start:stop] = pack_array(*spec, args[index])
        return packed

    def _template(self, args):
        template = []
        for i, spec in self._slots:
            if spec is None:
                cls = self._ctypes[i]
                try:
                    template.append(cls(args[i]))
                except TypeError:  # not an integer: the dispatcher says what is wrong
                    raise _NotFast from None
            else:
                template.extend([None] * (5 + 2 * spec[0]))
        return template

    def _dispatcher_args(self, args):
        """The arguments as the dispatcher takes them (1-D parameters given flat views)."""
        args = list(args)
        for i, ndim, _, _ in self._arrays:
            value = args[i]
            if ndim == 1 and getattr(value, "ndim", 1) != 1:
                args[i] = value.reshape(value.size)
        return args

    def _check(self, kernel, args, packed, stream):
        """The first fast launch of this kernel: numba-cuda's own marshalling of the same
        arguments must give the same list (types and values)."""
        reference = []
        retr = []
        for ty, value in zip(kernel.argument_types, self._dispatcher_args(args)):
            kernel._prepare_args(ty, value, stream, retr, reference)
        if len(reference) != len(packed):
            return f"{len(packed)} kernel arguments where numba-cuda makes {len(reference)}"
        for position, (ours, theirs) in enumerate(zip(packed, reference)):
            if type(ours) is not type(theirs) and not (
                    isinstance(ours, numbers.Integral)
                    and isinstance(theirs, numbers.Integral)):
                return (f"kernel argument {position} is {type(ours).__name__} where "
                        f"numba-cuda makes {type(theirs).__name__}")
            value_ours = getattr(ours, "value", ours)
            value_theirs = getattr(theirs, "value", theirs)
            if value_ours != value_theirs:
                return (f"kernel argument {position} is {value_ours!r} where numba-cuda "
                        f"makes {value_theirs!r}")
        return None


class _Launch:
    """One launch shape of a :class:`FastKernel` (``kernel[grid, block, stream, shared]``)."""

    __slots__ = ("owner", "grid", "block", "stream", "shared", "_config", "_core_stream")

    def __init__(self, owner, grid, block, stream=0, shared=0):
        self.owner = owner
        self.grid, self.block, self.stream, self.shared = grid, block, stream, shared
        self._config = None
        self._core_stream = None

    def _slow(self, args):
        owner = self.owner
        return owner.dispatcher[self.grid, self.block, self.stream, self.shared](
            *owner._dispatcher_args(args))

    def _prepared(self, kernel):
        """numba-cuda's launch configuration and stream for this shape (as
        ``_Kernel.launch`` builds them)."""
        if self._config is None:
            from cuda.core import LaunchConfig
            from numba.cuda._compat import CUDA_CORE_GE_1_0
            from numba.cuda.cudadrv import driver
            from numba.cuda.errors import normalize_kernel_dimensions

            grid, block = normalize_kernel_dimensions(self.grid, self.block)
            flag = "is_cooperative" if CUDA_CORE_GE_1_0 else "cooperative_launch"
            self._core_stream = driver._to_core_stream(self.stream)
            self._config = LaunchConfig(grid=grid, block=block, shmem_size=self.shared,
                                        **{flag: kernel.cooperative})
        return self._config

    def __call__(self, *args):
        owner = self.owner
        if not enabled() or owner.name in _REASONS:
            return self._slow(args)
        try:
            kernel = owner._kernel() if owner._overload is None else owner._overload
            packed = owner._pack(args)
        except _NotFast:
            return self._slow(args)
        except Exception as exc:  # numba-cuda internals not as this module reads them
            _REASONS[owner.name] = f"{type(exc).__name__}: {exc}"
            return self._slow(args)
        if not owner._checked:
            with _LOCK:
                try:
                    self._prepared(kernel)  # numba-cuda marshals with the cuda.core stream
                    kernel._codelibrary.get_cufunc().kernel  # what every launch reads
                    _CORE_LAUNCH or _core_launch()
                    problem = owner._check(kernel, args, packed, self._core_stream)
                except Exception as exc:
                    problem = f"{type(exc).__name__}: {exc}"
                if problem is not None:
                    _REASONS[owner.name] = problem
                    return self._slow(args)
                owner._checked = True
        config = self._config or self._prepared(kernel)
        function = kernel._codelibrary.get_cufunc()
        (_CORE_LAUNCH or _core_launch())(self._core_stream, config, function.kernel, *packed)


_CORE_LAUNCH = None


def _core_launch():
    """``cuda.core.launch``, the call numba-cuda's ``_Kernel.launch`` ends in."""
    global _CORE_LAUNCH
    from cuda.core import launch

    _CORE_LAUNCH = launch
    return launch
