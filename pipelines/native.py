"""fastload's C helpers, one shared library (``fastload.pipelines._native``, built by pip from
``_jpeg.c``, ``_samples.c`` and ``_resample.c``; the binary wheel carries its libjpeg-turbo, see
``scripts/build_wheel.sh``): found and loaded once here, and each function's signature
declared once (:data:`SIGNATURES`), from which both bindings are made: ctypes (here; ``jpeg.py``,
the DALI backend) and numba's by symbol name (``native_numba.py``, for the ffcv backend's
compiled loop). Python never imports the library as a module, and this module imports no numba.
"""
from __future__ import annotations

import ctypes
import functools
import importlib.util

from .errors import BackendUnavailable
from .sampling import PARAM_COLUMNS


class NativeUnavailable(BackendUnavailable):
    """fastload's C library cannot load here: what needs it (the ffcv backend, DALI's CPU engine)
    says so in one line; everything else (conversion, verify, the reference backend) goes on
    without it (``jpeg.py`` and ``samples.py`` fall back to PIL and the crc32c package)."""


REMEDY = ("install fastload's binary wheel, which carries libjpeg-turbo (pip install --force-reinstall "
          "--only-binary fastload fastload), or libjpeg-turbo's headers (apt install libjpeg-turbo8-dev on Ubuntu, "
          "libjpeg62-turbo-dev on Debian; conda install -c conda-forge libjpeg-turbo) and reinstall from source")

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


def _load() -> tuple[ctypes.CDLL | None, str, str]:
    """(the library or None, its path, why it did not load)."""
    spec = importlib.util.find_spec("fastload.pipelines._native")
    if spec is None or not spec.origin:
        return None, "", "were not built when fastload was installed (no C compiler or no libjpeg headers)"
    try:
        lib = ctypes.CDLL(spec.origin)
    except OSError as e:  # e.g. libjpeg.so.62 missing: a source build on another machine
        return None, spec.origin, f"cannot load ({e})"
    for name, (returns, arguments) in SIGNATURES.items():
        function = getattr(lib, name)
        function.restype, function.argtypes = _CTYPES[returns], [_CTYPES[a] for a in arguments]
    # The C code reads geometry rows by position: its column order must be sampling.py's
    columns = tuple(ctypes.string_at(lib.fl_param_columns()).decode().split())
    if columns != PARAM_COLUMNS:
        return None, spec.origin, (f"read geometry rows as {columns}, this fastload writes {PARAM_COLUMNS} "
                                   "(a stale build: reinstall fastload)")
    return lib, spec.origin, ""


LIB, LIBRARY_PATH, PROBLEM = _load()


def require(user: str) -> ctypes.CDLL:
    """The library, for ``user`` (what needs it, named in the error), or one line saying why not
    and what to do."""
    if LIB is None:
        raise NativeUnavailable(f"{user} needs fastload's C helpers, which {PROBLEM}: {REMEDY}")
    return LIB


@functools.cache
def bind_for_numba() -> None:
    """Make the library's symbols visible to numba's JIT (``types.ExternalFunction`` by name: a
    ctypes pointer would stop numba from caching compiled code on disk)."""
    import llvmlite.binding
    require("the ffcv backend")
    llvmlite.binding.load_library_permanently(LIBRARY_PATH)


RESAMPLE_PATHS = ("portable", "sse4.1", "avx2")


def resample_path(at_most: str | None = None) -> str:
    """The horizontal resampling pass's code path in use (``_resample.c``), after capping it at
    ``at_most`` when given: tests compare every path the CPU has, bit for bit."""
    return RESAMPLE_PATHS[require("the C resampler").fl_resample_level(-1 if at_most is None else RESAMPLE_PATHS.index(at_most))]


# _resample.c's codes: Pillow's filters (NEAREST is its affine scale, not a convolution) and padding
BOX, BILINEAR, HAMMING, BICUBIC, LANCZOS, NEAREST = range(6)
FILTER_CODES = {"box": BOX, "bilinear": BILINEAR, "hamming": HAMMING, "bicubic": BICUBIC, "lanczos": LANCZOS,
                "nearest": NEAREST}
PAD_CONSTANT, PAD_EDGE, PAD_REFLECT = range(3)
PADDING_CODES = {"constant": PAD_CONSTANT, "edge": PAD_EDGE, "reflect": PAD_REFLECT}
