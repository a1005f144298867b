"""The Numba-compiled functions of the CPU kernel modules (for the cache statistics)."""

import sys

__all__ = ["jit_functions"]


def jit_functions():
    """Every Numba-compiled function of the CPU kernel modules imported so far."""
    from numba.core.dispatcher import Dispatcher

    for name, module in list(sys.modules.items()):
        if name.startswith(__package__ + ".") and module is not None:
            yield from (v for v in vars(module).values() if isinstance(v, Dispatcher))
