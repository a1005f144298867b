"""What every command of gpuconv shares: argument types and the facts of the machine.

``gpuconv bench``, ``gpuconv train``, ``gpuconv info`` and the scripts record the same
machine block and take the same argument types; this module holds them, below every
command, so that no command reaches into another. It imports only the standard library and
NumPy at import time (Numba and numba-cuda when asked about the machine).
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform

import numpy as np

__all__ = ["positive_int", "gpu_description", "cpu_model", "machine_info", "git_state",
           "load_average"]


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
