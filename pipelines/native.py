"""fastload's C helpers, one shared library (``fastload.pipelines._native``, built by pip from
``_jpeg.c`` and ``_resample.c``): found and loaded once here, for ctypes (``jpeg.py``, ``dali.py``)
and, by symbol name, for numba code (``kernels.py``, ``ffcv.py``). Python never imports it as a
module, and this module imports no numba."""
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


LIB.fl_resample_level.argtypes = [ctypes.c_int]
LIB.fl_resample_level.restype = ctypes.c_int
RESAMPLE_PATHS = ("portable", "sse4.1", "avx2")


def resample_path(at_most: str | None = None) -> str:
    """The horizontal resampling pass's code path in use (``_resample.c``), after capping it at
    ``at_most`` when given: tests compare every path the CPU has, bit for bit."""
    return RESAMPLE_PATHS[LIB.fl_resample_level(-1 if at_most is None else RESAMPLE_PATHS.index(at_most))]


# _resample.c's codes: Pillow's filters (NEAREST is its affine scale, not a convolution) and padding
BOX, BILINEAR, HAMMING, BICUBIC, LANCZOS, NEAREST = range(6)
FILTER_CODES = {"box": BOX, "bilinear": BILINEAR, "hamming": HAMMING, "bicubic": BICUBIC, "lanczos": LANCZOS,
                "nearest": NEAREST}
PAD_CONSTANT, PAD_EDGE, PAD_REFLECT = range(3)
PADDING_CODES = {"constant": PAD_CONSTANT, "edge": PAD_EDGE, "reflect": PAD_REFLECT}

_P, _I64, _INT = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
LIB.fl_source_regions.argtypes = [_P, _I64, _P, _P, _I64, _I64, _INT, _P]
LIB.fl_source_regions.restype = None
LIB.fl_resample_regions.argtypes = [_P, _P, _P, _I64, _INT, _INT, _INT, _P, _I64, _I64, _INT, _INT, _P, _P]
LIB.fl_resample_regions.restype = _INT
