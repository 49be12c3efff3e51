"""fastload's C helpers, one shared library (``fastload.pipelines._native``, built by pip from
``_jpeg.c``, ``_samples.c`` and ``_resample.c``): found and loaded once here, and each function's signature
declared once (:data:`SIGNATURES`), from which both bindings are made: ctypes (here; ``jpeg.py``,
the DALI backend) and numba's by symbol name (``native_numba.py``, for the ffcv backend's
compiled loop). Python never imports the library as a module, and this module imports no numba.
"""
from __future__ import annotations

import ctypes
import functools
import importlib.util

from .sampling import PARAM_COLUMNS


def _path() -> str:
    spec = importlib.util.find_spec("fastload.pipelines._native")
    if spec is None or not spec.origin:
        raise ImportError("fastload's C helpers (fastload.pipelines._native) are not built: reinstall fastload "
                          "with a C compiler and libjpeg headers (Debian: apt install libjpeg62-turbo-dev)")
    return spec.origin


LIBRARY_PATH = _path()
LIB = ctypes.CDLL(LIBRARY_PATH)

# Each exported function: (return type, argument types), in the C code's own order. Types:
# i32/i64/u32/u64 integers, ptr an address (numpy's .ctypes.data, a buffer), void no value.
SIGNATURES = {
    # _jpeg.c
    "fl_jpeg_decode_region": ("i32", ["ptr", "u64", "i32", "i32", "i32", "i32", "i32", "i32", "ptr", "i64", "i64",
                                      "ptr", "ptr", "i32"]),
    "fl_jpeg_check": ("i32", ["ptr", "u64", "ptr", "i32"]),
    # _samples.c
    "fl_crc32c": ("u32", ["ptr", "u64"]),
    "fl_check_samples": ("i64", ["ptr", "ptr", "ptr", "ptr", "ptr", "i64", "i32", "ptr", "i32"]),
    # _resample.c
    "fl_param_columns": ("ptr", []),
    "fl_resample_level": ("i32", ["i32"]),
    "fl_source_window": ("void", ["i64"] * 8 + ["i32", "i32", "ptr"]),
    "fl_resample_window": ("i32", ["ptr"] + ["i64"] * 10 + ["i32", "i32", "i32", "ptr", "i64", "i64", "i32", "i32",
                                                             "ptr", "ptr"]),
    "fl_source_regions": ("void", ["ptr", "i64", "ptr", "ptr", "i64", "i64", "i32", "i32", "ptr"]),
    "fl_resample_regions": ("i32", ["ptr", "ptr", "ptr", "i64", "i32", "i32", "ptr", "i64", "i64", "i32", "i32",
                                    "ptr", "ptr"]),
}
_CTYPES = {"i32": ctypes.c_int32, "i64": ctypes.c_int64, "u32": ctypes.c_uint32, "u64": ctypes.c_uint64,
           "ptr": ctypes.c_void_p, "void": None}
for _name, (_returns, _arguments) in SIGNATURES.items():
    _function = getattr(LIB, _name)
    _function.restype, _function.argtypes = _CTYPES[_returns], [_CTYPES[a] for a in _arguments]

# The C code reads geometry rows by position: its column order must be sampling.py's
_C_COLUMNS = tuple(ctypes.string_at(LIB.fl_param_columns()).decode().split())
if _C_COLUMNS != PARAM_COLUMNS:
    raise ImportError(f"{LIBRARY_PATH} reads geometry rows as {_C_COLUMNS}, this fastload writes {PARAM_COLUMNS}: "
                      "rebuild fastload (pip install -e .)")


@functools.cache
def bind_for_numba() -> None:
    """Make the library's symbols visible to numba's JIT (``types.ExternalFunction`` by name: a
    ctypes pointer would stop numba from caching compiled code on disk)."""
    import llvmlite.binding
    llvmlite.binding.load_library_permanently(LIBRARY_PATH)


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
