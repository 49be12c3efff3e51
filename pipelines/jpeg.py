"""Region-of-interest JPEG decoding and the converter's corruption check (``_jpeg.c``), called
through ctypes from Python (the GIL is released per call); the ffcv backend's numba code calls
the same decoder by symbol name (``native_numba.py``).

Pixels are PIL's: libjpeg's accurate DCT with fancy upsampling, bit-exact with
``Image.open(...).convert('RGB')`` on the stored RGB baseline JPEGs, whether the whole image
or a region is decoded (tests/test_kernels.py checks both on real photos).

Where the C library cannot load (a source install without libjpeg's headers), the whole-image
calls below fall back to PIL, whose pixels are the same; region decoding needs the library.
PIL's check is weaker: it accepts JPEGs that libjpeg only warns about, which the ffcv and DALI
backends then refuse as they read them (``fastload verify`` lists them).
"""
from __future__ import annotations

import ctypes
import functools
import io
import threading
import warnings

import numpy as np
from PIL import Image

from . import native

MESSAGE_LEN = 200  # bytes for libjpeg's message


class JPEGDecodeError(ValueError):
    """A stored JPEG that libjpeg refuses or warns about (corrupt or truncated data)."""


_LIB = native.LIB  # signatures: native.SIGNATURES; None where the library cannot load


def jpeg_problem(jpeg: bytes) -> str | None:
    """Why libjpeg refuses or warns about this JPEG (what every backend's decoder would then
    refuse), or None when it decodes cleanly. Reads all its entropy-coded data, as a full decode
    does, at about 60% of a decode's cost (scaled to 1/8: tests/test_kernels.py checks that it
    flags exactly the files a full decode refuses)."""
    if _LIB is None:
        _warn_pil_check()
        return _pil_problem(jpeg)
    message = ctypes.create_string_buffer(MESSAGE_LEN)
    if _LIB.fl_jpeg_check(jpeg, len(jpeg), message, MESSAGE_LEN):
        return message.value.decode(errors="replace") or "undecodable JPEG"
    return None


@functools.cache
def _warn_pil_check() -> None:
    warnings.warn(f"fastload's C helpers {native.PROBLEM}: JPEGs are checked by PIL, which accepts some that libjpeg "
                  "only warns about and the ffcv and DALI backends then refuse (fastload verify lists them); "
                  f"for libjpeg's check, {native.REMEDY}", RuntimeWarning, stacklevel=3)


def size_disagrees(width: int, height: int, index_width: int, index_height: int) -> str:
    """The fallbacks' words for a JPEG whose frame is not the records index's size (``_samples.c``'s)."""
    return f"the JPEG is {width}x{height} pixels, the records index says {index_width}x{index_height}"


def _pil_decode(jpeg) -> np.ndarray:
    """PIL's decode (the fallback), HWC uint8; JPEGDecodeError where PIL refuses it."""
    try:
        with Image.open(io.BytesIO(jpeg)) as im:
            return np.asarray(im.convert("RGB"))
    except Exception as e:  # PIL raises many types for bad data
        raise JPEGDecodeError(f"{type(e).__name__}: {e}" if str(e) else type(e).__name__) from None


def _pil_problem(jpeg) -> str | None:
    try:
        _pil_decode(jpeg)
    except JPEGDecodeError as e:
        return str(e)
    return None


class RegionDecoder:
    """Decodes regions into a scratch buffer of its own; one per thread (not thread-safe)."""

    def __init__(self):
        native.require("decoding a region of a JPEG")
        self.scratch = np.empty(0, np.uint8)
        self.col0 = ctypes.c_int()
        self.message = ctypes.create_string_buffer(MESSAGE_LEN)

    def decode(self, jpeg: np.ndarray, height: int, width: int, y0: int, y1: int, x0: int, x1: int
               ) -> tuple[np.ndarray, int]:
        """Rows [y0, y1) of a ``height`` x ``width`` image (the JPEG must be that size), at least
        columns [x0, x1) decoded: (an array [y1 - y0, width, 3] whose decoded columns start at the
        returned column, that column). The array is a view of the scratch buffer, valid until the
        next call."""
        need = (y1 - y0) * width * 3
        if self.scratch.size < need:
            self.scratch = np.empty(max(need, 2 * self.scratch.size), np.uint8)
        if _LIB.fl_jpeg_decode_region(jpeg.ctypes.data, jpeg.size, height, width, y0, y1, x0, x1,
                                      self.scratch.ctypes.data, width * 3, self.scratch.size, ctypes.byref(self.col0),
                                      self.message, MESSAGE_LEN):
            raise JPEGDecodeError(self.message.value.decode(errors="replace") or "undecodable JPEG")
        return self.scratch[:need].reshape(y1 - y0, width, 3), self.col0.value


_local = threading.local()


def thread_decoder() -> RegionDecoder:
    """This thread's decoder (scratch buffers stay per thread, so threads never share one)."""
    decoder = getattr(_local, "decoder", None)
    if decoder is None:
        decoder = _local.decoder = RegionDecoder()
    return decoder


def decode_rgb(jpeg: np.ndarray, height: int, width: int) -> np.ndarray:
    """The whole image (its size from the records index), HWC uint8 (a copy)."""
    if _LIB is None:  # PIL's decode: the same pixels
        pixels = _pil_decode(jpeg)
        if pixels.shape[:2] != (height, width):
            raise JPEGDecodeError(size_disagrees(pixels.shape[1], pixels.shape[0], width, height))
        return pixels
    region, _ = thread_decoder().decode(jpeg, height, width, 0, height, 0, width)
    return region.copy()
