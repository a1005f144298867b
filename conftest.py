"""Doctest collection: gpuconv.torch needs PyTorch, an optional dependency (gpuconv[torch])."""

import importlib.util

collect_ignore = [] if importlib.util.find_spec("torch") else ["gpuconv/torch"]
