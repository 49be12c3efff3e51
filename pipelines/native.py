"""fastload's C helpers, one shared library (``fastload.pipelines._native``, built by pip from
``_jpeg.c`` and ``_resample.c``): found and loaded once here, for ctypes (``jpeg.py``) and, by
symbol name, for numba code (``kernels.py``, ``ffcv.py``). Python never imports it as a module."""
from __future__ import annotations

import ctypes
import functools
import importlib.util


def _path() -> str:
    spec = importlib.util.find_spec("fastload.pipelines._native")
    if spec is None or not spec.origin:
        raise ImportError("fastload's C helpers (fastload.pipelines._native) are not built: reinstall fastload "
                          "with a C compiler and libjpeg headers (Debian: apt install libjpeg62-turbo-dev)")
    return spec.origin


LIBRARY_PATH = _path()
LIB = ctypes.CDLL(LIBRARY_PATH)


@functools.cache
def bind_for_numba() -> None:
    """Make the library's symbols visible to numba's JIT (``types.ExternalFunction`` by name: a
    ctypes pointer would stop numba from caching compiled code on disk)."""
    import llvmlite.binding
    llvmlite.binding.load_library_permanently(LIBRARY_PATH)
