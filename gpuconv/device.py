"""Device selection: where a convolution runs.

The rules, in order (see :func:`select_device`):

1. ``device`` must be ``"auto"``, ``"cpu"`` or ``"cuda"``.
2. ``"auto"`` is overridden by the environment variable ``GPUCONV_DEVICE``
   (``cpu`` | ``cuda`` | ``auto``).
3. ``"auto"`` follows the data: if any array lives on a GPU, ``"cuda"``.
4. Otherwise ``"auto"`` is ``"cuda"`` when a usable CUDA GPU is present, else ``"cpu"``.

Explicit requests are checked: ``"cuda"`` without a usable GPU raises
:class:`CudaUnavailableError`; ``"cpu"`` with arrays on a GPU raises ``ValueError``
(gpuconv never copies between devices behind the caller's back).
"""

from __future__ import annotations

import functools
import os
import sys
import threading
import time

__all__ = ["DEVICES", "ENV_VAR", "DLPACK_CUDA_DEVICES", "simulator_enabled", "c_strides",
           "is_c_contiguous", "CudaUnavailableError", "InsufficientMemoryError",
           "toolchain_problem", "cuda_toolchain_problem",
           "select_device", "cuda_available", "is_device_array", "explain_auto",
           "host_memory_available", "check_memory", "FreeMemory", "AUTOTUNE_ENV_VAR",
           "set_autotune", "autotune_enabled"]

DEVICES = ("auto", "cpu", "cuda")
ENV_VAR = "GPUCONV_DEVICE"

#: DLPack device types (dlpack.h) whose memory lives on a GPU: 2 = CUDA, 13 = CUDA managed
#: (1 = CPU and 3 = CUDA host, i.e. pinned, memory are host memory).
DLPACK_CUDA_DEVICES = (2, 13)


AUTOTUNE_ENV_VAR = "GPUCONV_AUTOTUNE"
_AUTOTUNE_WORDS = {"1": True, "true": True, "on": True, "yes": True,
                   "0": False, "false": False, "off": False, "no": False, "": False}
_AUTOTUNE = []  # [on or off], once read from the environment or set


def set_autotune(enabled):
    """Choose the CUDA forward kernels of conv2d and local_conv2d by measurement
    (``True``) or by the dispatcher's rules (``False``, the default; the environment
    variable ``GPUCONV_AUTOTUNE=1`` turns it on for a process). Returns the previous
    setting. See :mod:`gpuconv.cuda.autotune` for what a measured choice costs: the first
    call of each shape synchronises and times every candidate kernel, and results are
    bitwise reproducible within a process but not across processes."""
    if not isinstance(enabled, bool):
        raise TypeError(f"enabled must be True or False, got {type(enabled).__name__}")
    before = autotune_enabled()
    _AUTOTUNE[:] = [enabled]
    return before


def autotune_enabled():
    """Whether the CUDA forward kernels are chosen by measurement (:func:`set_autotune`)."""
    if not _AUTOTUNE:
        value = os.environ.get(AUTOTUNE_ENV_VAR, "")
        word = value.strip().lower()
        if word not in _AUTOTUNE_WORDS:
            raise ValueError(f"environment variable {AUTOTUNE_ENV_VAR} must be 1 or 0 "
                             f"(true/false, on/off, yes/no), got {value!r}")
        _AUTOTUNE[:] = [_AUTOTUNE_WORDS[word]]
    return _AUTOTUNE[0]


def simulator_enabled():
    """True when Numba's CUDA simulator stands in for the GPU (``NUMBA_ENABLE_CUDASIM=1``
    before Numba was imported): kernels run as Python threads on the CPU."""
    from numba.core import config

    return bool(getattr(config, "ENABLE_CUDASIM", False))


def c_strides(shape, itemsize):
    """Byte strides of a C-contiguous array of ``shape``."""
    strides, step = [], itemsize
    for size in reversed(shape):
        strides.append(step)
        step *= max(int(size), 1)
    return tuple(reversed(strides))


def is_c_contiguous(shape, strides, itemsize):
    """Whether an array of ``shape`` with byte ``strides`` (``None``: C order) is
    C-contiguous; the strides of length-1 axes do not matter."""
    if strides is None:
        return True
    return all(size == 1 or stride == expected for size, stride, expected
               in zip(shape, strides, c_strides(shape, itemsize)))


def unit_axes_interface(cai, shape):
    """The ``__cuda_array_interface__`` ``cai`` viewing the same elements as ``shape``, which
    differs from its shape by axes of length 1 only (inserted or dropped): the other axes
    keep their byte strides, a new unit axis takes the itemsize. No memory is touched."""
    import numpy as np

    old, shape = tuple(int(s) for s in cai["shape"]), tuple(int(s) for s in shape)
    itemsize = np.dtype(cai["typestr"]).itemsize
    strides = cai.get("strides") or c_strides(old, itemsize)
    kept = [(size, stride) for size, stride in zip(old, strides) if size != 1]
    if [size for size, _ in kept] != [size for size in shape if size != 1]:
        raise ValueError(f"shape {shape} is not {old} with unit axes inserted or dropped")
    new, rest = [], iter(kept)
    for size in shape:
        new.append(itemsize if size == 1 else next(rest)[1])
    return dict(cai, shape=shape, strides=tuple(new))


def numba_device_view(array, shape):
    """The Numba device array ``array`` viewed as ``shape`` (unit axes inserted or dropped;
    no copy). Numba's ``reshape`` refuses a non-contiguous array ("operation requires
    copying") and its arrays do not index with None, so the view is made through the CUDA
    array interface; the simulator's arrays (no interface) reshape."""
    cai = getattr(array, "__cuda_array_interface__", None)
    if cai is None or cai.get("strides") is None:  # the simulator's, or C-contiguous
        return array.reshape(shape)
    from numba import cuda

    return cuda.from_cuda_array_interface(unit_axes_interface(cai, shape), owner=array,
                                          sync=False)


class CudaUnavailableError(RuntimeError, ValueError):
    """``device="cuda"`` was asked for but no usable CUDA GPU is present.

    Derives from both ``RuntimeError`` and ``ValueError``.
    """


class InsufficientMemoryError(MemoryError, ValueError):
    """A call would need more memory than the device has free; raised before allocating.

    Derives from both ``MemoryError`` and ``ValueError``. The message says how much the call
    needs and how much is free.
    """


#: numba-cuda releases that are known not to work with a NumPy release: (the newest such
#: numba-cuda, the first such NumPy, why). numba-cuda up to 0.30.4 registers ``np.row_stack``
#: for its kernels when it compiles the first one; NumPy 2.5 removed that function, so the
#: first CUDA compilation dies with an ``AttributeError`` deep inside numba-cuda.
KNOWN_BROKEN_PAIRS = (
    ((0, 30, 4), (2, 5), "it uses np.row_stack, which NumPy 2.5 removed"),
)


def _release(version):
    """The leading numeric release of a version string: ``"2.5.0rc1"`` -> ``(2, 5, 0)``."""
    parts = []
    for piece in str(version).split("+")[0].split("."):
        digits = ""
        for ch in piece:
            if not ch.isdigit():
                break
            digits += ch
        if not digits:
            break
        parts.append(int(digits))
        if len(digits) != len(piece):
            break
    return tuple(parts)


def toolchain_problem(numba_cuda_version, numpy_version):
    """Why this numba-cuda / NumPy pair cannot compile CUDA kernels, or ``None``.

    >>> toolchain_problem("0.30.4", "2.4.6") is None
    True
    >>> print(toolchain_problem("0.30.4", "2.5.2"))  # doctest: +NORMALIZE_WHITESPACE
    numba-cuda 0.30.4 does not work with NumPy 2.5.2 (it uses np.row_stack, which NumPy 2.5
    removed): install NumPy below 2.5 (pip install "numpy<2.5"), or a numba-cuda release
    newer than 0.30.4 that supports NumPy 2.5
    """
    cuda_release, numpy_release = _release(numba_cuda_version), _release(numpy_version)
    for newest_broken, first_numpy, why in KNOWN_BROKEN_PAIRS:
        if cuda_release and cuda_release <= newest_broken and numpy_release >= first_numpy:
            numpy_floor = ".".join(map(str, first_numpy))
            newest = ".".join(map(str, newest_broken))
            return (f"numba-cuda {numba_cuda_version} does not work with NumPy {numpy_version} "
                    f"({why}): install NumPy below {numpy_floor} (pip install "
                    f"\"numpy<{numpy_floor}\"), or a numba-cuda release newer than {newest} "
                    f"that supports NumPy {numpy_floor}")
    return None


def cuda_toolchain_problem():
    """:func:`toolchain_problem` for the numba-cuda and NumPy installed here (``None`` when
    numba-cuda is not installed as a package, or the pair is not known to be broken)."""
    from importlib import metadata

    import numpy

    try:
        numba_cuda = metadata.version("numba-cuda")
    except metadata.PackageNotFoundError:
        return None
    return toolchain_problem(numba_cuda, numpy.__version__)


def host_memory_available():
    """Bytes of host memory available to a new allocation, or ``None`` if unknown."""
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def check_memory(needed, available, where):
    """Raise :class:`InsufficientMemoryError` when ``needed`` bytes exceed ``available``."""
    if available is not None and needed > available:
        raise InsufficientMemoryError(
            f"this call needs about {_format_bytes(needed)} of {where} memory but only "
            f"{_format_bytes(available)} is free; use a smaller batch or split the layer")


class FreeMemory:
    """The free-memory check of :func:`check_memory`, made cheap for repeated calls.

    ``query()`` (bytes free, or ``None`` if unknown) is asked again only when a call needs
    more than :attr:`SHARE` of the last answer less what the calls since took, when that
    answer is older than :attr:`MAX_AGE_S`, or when there is none; otherwise that
    remainder is used. A call that does not fit what was free raises
    :class:`InsufficientMemoryError` as before (only ever on a fresh answer: a call that
    does not fit needs more than the share); one that needs less than an eighth of what was
    free a moment ago is not worth a system call (or a driver call) each time, and calls
    that keep their outputs run the remainder down until the driver is asked again.
    :meth:`clear` forgets the reading.
    """

    SHARE = 1 / 8
    MAX_AGE_S = 1.0

    def __init__(self, query, where):
        self._query, self._where = query, where
        self._free, self._when = None, 0.0
        self._lock = threading.Lock()

    def clear(self):
        with self._lock:
            self._free = None

    def check(self, needed, *query_args):
        """Raise :class:`InsufficientMemoryError` if ``needed`` bytes do not fit (``query_args``
        go to ``query`` when it is asked)."""
        free, now = self._free, time.monotonic()
        if free is None or needed > free * self.SHARE or now - self._when > self.MAX_AGE_S:
            free = self._query(*query_args)
            with self._lock:
                self._free, self._when = free, now
        check_memory(needed, free, self._where)
        # What this call takes is no longer free for the next one. (No lock: two threads'
        # subtractions racing can lose one, which leaves the reading as it was, no worse.)
        left = self._free
        if left is not None:
            self._free = max(left - needed, 0)


def _format_bytes(count):
    for unit in ("B", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if abs(count) < 1024 or unit == "PiB":
            return f"{count:.1f} {unit}" if unit != "B" else f"{count} B"
        count /= 1024


@functools.lru_cache(maxsize=None)
def _cuda_status():
    """(available, reason) for the CUDA path, computed once per process."""
    try:
        from numba import cuda
    except Exception as exc:  # numba-cuda missing or broken
        return False, f"numba.cuda could not be imported ({exc})"
    try:
        if cuda.is_available():
            if simulator_enabled():
                return True, "the Numba CUDA simulator is enabled (NUMBA_ENABLE_CUDASIM=1)"
            problem = cuda_toolchain_problem()
            if problem is not None:  # the first kernel compilation would crash
                return False, problem
            return True, "a CUDA GPU is present"
        return False, "numba.cuda.is_available() is False (no CUDA driver or GPU)"
    except Exception as exc:
        return False, f"CUDA initialisation failed ({exc})"


def cuda_available():
    """True when kernels can be launched through ``numba.cuda`` (or its simulator)."""
    return _cuda_status()[0]


def is_device_array(array):
    """True if ``array`` lives in GPU memory (CUDA array interface or a CUDA DLPack device)."""
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(array, torch.Tensor):
        # (asked of the tensor: PyTorch raises RuntimeError, not AttributeError, for the
        # array interface of a CUDA tensor that requires grad)
        return bool(array.is_cuda)
    if hasattr(array, "__cuda_array_interface__") or getattr(array, "__cuda_ndarray__", False):
        return True  # (the CUDA simulator's device arrays carry only the second mark)
    dlpack_device = getattr(array, "__dlpack_device__", None)
    if dlpack_device is not None and not hasattr(array, "__array_interface__"):
        try:
            return int(dlpack_device()[0]) in DLPACK_CUDA_DEVICES
        except Exception:
            return False
    return False


def _check_device_name(device, source):
    if not isinstance(device, str) or device not in DEVICES:
        raise ValueError(f"{source} must be one of {', '.join(map(repr, DEVICES))}, got {device!r}")
    return device


def _requested(device):
    device = _check_device_name(device, "device")
    if device == "auto":
        env = os.environ.get(ENV_VAR)
        if env is not None and env.strip() != "":
            return _check_device_name(env.strip().lower(), f"environment variable {ENV_VAR}"), ENV_VAR
    return device, "device"


def select_device(*arrays, device="auto"):
    """Resolve where a call on ``arrays`` runs: ``"cpu"`` or ``"cuda"``.

    Args:
        *arrays: the operands (``None`` entries are ignored).
        device: ``"auto"`` (default), ``"cpu"`` or ``"cuda"``.

    Returns:
        ``"cpu"`` or ``"cuda"``.

    Raises:
        ValueError: unknown ``device`` or ``GPUCONV_DEVICE`` value; ``"cpu"`` asked for
            with arrays on a GPU.
        CudaUnavailableError: ``"cuda"`` asked for (explicitly or by the environment) with
            no usable GPU.

    >>> import numpy as np
    >>> select_device(np.zeros(3), device="cpu")
    'cpu'
    """
    requested, source = _requested(device)
    on_gpu = [a for a in arrays if a is not None and is_device_array(a)]
    if requested == "cpu":
        if on_gpu:
            raise ValueError(
                f"{source}='cpu' was requested but some inputs live on a GPU; "
                "copy them to host memory first or use device='cuda'")
        return "cpu"
    if requested == "cuda" or on_gpu:
        available, reason = _cuda_status()
        if not available:
            raise CudaUnavailableError(
                f"{source}='cuda' needs a usable CUDA GPU, but {reason}. "
                "Use device='cpu' (or set GPUCONV_DEVICE=cpu) to run on the CPU, or install "
                "a GPU build: pip install 'gpuconv[cuda13]' (or 'gpuconv[cuda12]')."
                if requested == "cuda" else
                f"some inputs live on a GPU but the CUDA path is unusable: {reason}")
        return "cuda"
    if cuda_available():
        return "cuda"
    _warn_if_toolchain_broken()
    return "cpu"


@functools.lru_cache(maxsize=None)
def _warn_if_toolchain_broken():
    """Once per process: ``"auto"`` chose the CPU although a GPU is there, because the
    installed numba-cuda / NumPy pair cannot compile kernels (say so, with the fix)."""
    available, reason = _cuda_status()
    if not available and reason == cuda_toolchain_problem():
        import warnings

        warnings.warn(f"gpuconv runs on the CPU: a CUDA GPU is present but {reason}",
                      RuntimeWarning, stacklevel=3)


def explain_auto():
    """A sentence saying what ``device="auto"`` resolves to for host arrays, and why."""
    requested, source = _requested("auto")
    available, reason = _cuda_status()
    if source == ENV_VAR:
        return f"{requested} ({ENV_VAR}={os.environ[ENV_VAR]!r} overrides 'auto')"
    if available:
        return f"cuda ({reason})"
    return f"cpu ({reason})"
