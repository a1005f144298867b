"""What every command of gpuconv shares: argument types, output paths, progress lines, the
command echo, JSON, thread counts, and the facts of the machine.

``gpuconv bench``, ``gpuconv train``, ``gpuconv info`` and the scripts take the same argument
types, check their output paths the same way before any work, say what they are doing on
stderr the same way, set Numba's and PyTorch's threads the same way and record the same
machine block; this module holds that plumbing, below every command, so that no command
reaches into another. It imports only the standard library and NumPy at import time (Numba
and numba-cuda when asked about the machine or the threads, matplotlib when asked for it).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import platform
import sys
import time

import numpy as np

__all__ = ["positive_int", "nonnegative_int", "unwritable", "check_output_path", "write_json",
           "command_line", "Progress", "bar", "require_matplotlib", "set_threads", "threads",
           "gpu_description",
           "cpu_model", "machine_info", "git_state", "load_average"]


# ----------------------------------------------------------------------------- arguments


def positive_int(text):
    """argparse type: an integer >= 1 (``100_000`` and ``1e5``-style integers accepted)."""
    try:
        value = int(text.replace("_", ""), 10)
    except ValueError:
        try:
            number = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
        if not number.is_integer():
            raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
        value = int(number)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {text!r}")
    return value


def nonnegative_int(text):
    """argparse type: an integer >= 0."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def command_line(prog, options):
    """The command as it was asked for, for the record: ``prog`` and each ``(flag, value)``
    of ``options`` in order: left out when ``value`` is false (``None``, ``False``, ``0``,
    empty), the flag alone for ``True``, a list's items after the flag, else ``flag value``."""
    words = [prog]
    for flag, value in options:
        if not value:
            continue
        if value is True:
            words.append(flag)
        elif isinstance(value, (list, tuple)):
            words.append(f"{flag} {' '.join(map(str, value))}")
        else:
            words.append(f"{flag} {value}")
    return " ".join(words)


# ----------------------------------------------------------------------------- output files

def unwritable(path):
    """Why ``path`` cannot be written (a short phrase), or ``None`` when it can.

    Opens it for appending, which changes nothing in an existing file, and removes it again
    if it did not exist, so that a bad output path is found before the work.
    """
    existed = os.path.lexists(path)
    try:
        with open(path, "ab"):
            pass
    except OSError as exc:
        return exc.strerror or str(exc)
    if not existed:
        os.remove(path)
    return None


def check_output_path(path, what):
    """``path`` (``None`` stays ``None``); ``ValueError`` naming ``what`` unless a file can be
    written there (:func:`unwritable`)."""
    if path is None:
        return None
    path = os.fspath(path)
    why = unwritable(path) if path else "empty path"
    if why:
        raise ValueError(f"{what} {path}: cannot write there ({why})")
    return path


def write_json(result, path):
    """``result`` as indented JSON, one trailing newline."""
    with open(path, "w") as handle:
        json.dump(result, handle, indent=1)
        handle.write("\n")


def require_matplotlib():
    """Import matplotlib with the Agg backend; raises ``ImportError`` when it is missing."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot  # noqa: F401


# ----------------------------------------------------------------------------- progress

def bar(done, total, width):
    """``[#####.....]``: ``done`` of ``total`` as a bar ``width`` characters wide."""
    filled = int(width * done / max(total, 1))
    return f"[{'#' * filled}{'.' * (width - filled)}]"


class Progress:
    """What a command says while it runs, on stderr.

    ``mode``: ``"bar"`` (a line redrawn in place, for a terminal), ``"lines"`` (news lines
    only, for a log or a pipe) or ``None`` (nothing). News lines are written in ``"bar"`` mode
    too, above the bar. ``total`` counts the :meth:`step` calls a bar fills up with;
    ``elapsed``: news lines start with the seconds since the start; ``interval``: the least
    seconds between two redraws of the bar (its last state is always drawn).
    """

    def __init__(self, total=0, stream=None, mode="bar", *, elapsed=True, interval=0.0):
        self.stream = stream or sys.stderr
        self.mode = mode
        self.total, self.done = total, 0
        self.elapsed, self.interval = elapsed, interval
        self.started = time.perf_counter()
        self.drawn = None  # when the bar was last drawn (None: not on screen)

    @classmethod
    def choose(cls, total, progress, stream=None, **options):
        """``progress``: ``None`` (a bar on a terminal, else lines), ``False`` (nothing),
        ``True`` (a bar), or a mode name."""
        stream = stream or sys.stderr
        if progress is None:
            tty = getattr(stream, "isatty", None)
            mode = "bar" if tty is not None and tty() else "lines"
        elif progress is True:
            mode = "bar"
        else:
            mode = progress or None
        return cls(total, stream, mode, **options)

    def draw(self, text, final=False):
        """Redraw the bar line as ``text`` (``"bar"`` mode only)."""
        if self.mode != "bar":
            return
        now = time.perf_counter()
        if not final and self.drawn is not None and now - self.drawn < self.interval:
            return
        self.drawn = now
        self.stream.write(f"\r{text}")
        self.stream.flush()

    def step(self, label):
        """One of ``total`` steps done: the bar shows the count and ``label``."""
        self.done += 1
        self.draw(f"{bar(self.done, self.total, 30)} {self.done}/{self.total} {label[:40]:<40}")

    def _clear(self):
        if self.drawn is not None:
            self.stream.write("\r\033[K")
            self.drawn = None

    def line(self, text):
        """One line of news (both modes; with ``elapsed``, after the seconds since the start)."""
        if self.mode is None:
            return
        self._clear()
        stamp = f"[{time.perf_counter() - self.started:5.0f} s] " if self.elapsed else ""
        self.stream.write(f"{stamp}{text}\n")
        self.stream.flush()

    def close(self):
        """Take the bar off the screen."""
        self._clear()
        self.stream.flush()


# ----------------------------------------------------------------------------- threads

def set_threads(count, torch=None):
    """Run gpuconv's CPU kernels (Numba, at most its configured thread count) and PyTorch
    (the module, when given) on ``count`` threads; returns the counts they had,
    ``(numba, torch)`` (``torch``: ``None`` when not given)."""
    import numba

    before = (numba.get_num_threads(),
              None if torch is None else torch.get_num_threads())
    numba.set_num_threads(min(count, numba.config.NUMBA_NUM_THREADS))
    if torch is not None:
        torch.set_num_threads(count)
    return before


@contextlib.contextmanager
def threads(count, torch=None):
    """:func:`set_threads` for the ``with`` block, the counts restored afterwards;
    ``count=None`` changes nothing."""
    if count is None:
        yield
        return
    import numba

    numba_before, torch_before = set_threads(count, torch)
    try:
        yield
    finally:
        numba.set_num_threads(numba_before)
        if torch is not None:
            torch.set_num_threads(torch_before)


# ----------------------------------------------------------------------------- the machine

def gpu_description():
    """Name and compute capability of the current CUDA device, or ``None``."""
    try:
        from numba import cuda

        from .device import simulator_enabled

        device = cuda.get_current_device()
    except Exception:
        return None
    name = getattr(device, "name", None)
    if isinstance(name, bytes):
        name = name.decode(errors="replace")
    if not name:
        name = ("Numba CUDA simulator" if simulator_enabled()
                else "unnamed CUDA device")
    try:
        major, minor = device.compute_capability
    except Exception:
        return name
    return f"{name} (compute capability {major}.{minor})"


def cpu_model():
    """The CPU's model name (``/proc/cpuinfo``), or what :mod:`platform` knows."""
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info(device, torch, ceilings, dtype):
    """What ran: CPU, cores, OS, Python, NumPy, Numba, PyTorch, gpuconv, the device and GPU,
    the dtype, the date (UTC), the measured ceilings and the git commit (with the package
    files modified in the checkout), as every command's JSON records it."""
    import numba

    from . import __version__

    info = {
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "os": platform.platform(),
        "python": platform.python_version(),
        "numpy": np.__version__,
        "numba": numba.__version__,
        "torch": getattr(torch, "__version__", None),
        "gpuconv": __version__,
        "device": device,
        "gpu": gpu_description() if device == "cuda" else None,
        "dtype": dtype,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "ceilings": ceilings,
    }
    info["git_commit"], info["git_modified"] = git_state()
    return info


def git_state():
    """``(commit, modified package files)`` when gpuconv runs from a git checkout."""
    import subprocess

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        commit = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=root,
                                capture_output=True, text=True, timeout=5)
        if commit.returncode != 0:
            return None, None
        status = subprocess.run(["git", "status", "--porcelain", "--", "gpuconv"], cwd=root,
                                capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None, None
    modified = sorted(line[3:] for line in status.stdout.splitlines() if line.strip())
    return commit.stdout.strip(), modified


def load_average():
    """1-minute load average (other work on the machine skews the timings), or None."""
    try:
        return round(os.getloadavg()[0], 2)
    except (OSError, AttributeError):
        return None
