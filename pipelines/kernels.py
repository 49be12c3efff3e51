"""torchvision-on-PIL geometry, exactly, for numba code (the ffcv backend's per-sample loop).

The rules themselves are C (``_resample.c``), written once for both backends: the DALI backend
on CPU calls them through ctypes, without numba. ``resample_window`` is PIL's ``Image.resize``
(Pillow's Resample.c: its filters, widened by the scale when downscaling, 22-bit fixed-point
coefficients, horizontal pass then vertical, uint8 rounding between, int32 accumulators; NEAREST
as its affine scale) computed only for the output window that survives the crop:
Resize(256)+CenterCrop(224) costs a 224x224 resample, not a 256xN one. Bit-exact with Pillow on
real photos (tests/test_kernels.py). ``source_window`` says which source rows and columns a
window needs, so the decoder can decode only those (the region-of-interest decode).

Here they are numba functions calling the C by symbol name (``types.ExternalFunction``), so
numba code calls them without leaving compiled code, and numba still caches that code on disk.
"""
from __future__ import annotations

import numba as nb
import numpy as np
from numba import types

from . import native
from .native import (BICUBIC, BILINEAR, BOX, FILTER_CODES, HAMMING, LANCZOS, NEAREST, PAD_CONSTANT, PAD_EDGE,
                     PAD_REFLECT, PADDING_CODES)

# the codes are native.py's (numba-free, for the DALI backend); here beside the kernels that take them
__all__ = ["source_window", "resample_window", "FILTER_CODES", "PADDING_CODES", "BOX", "BILINEAR", "HAMMING",
           "BICUBIC", "LANCZOS", "NEAREST", "PAD_CONSTANT", "PAD_EDGE", "PAD_REFLECT"]

_JIT = dict(cache=True, nogil=True)

native.bind_for_numba()
_source_window = types.ExternalFunction("fl_source_window", types.void(
    types.int64, types.int64, types.int64, types.int64, types.int64, types.int64, types.int64, types.int64,
    types.int32, types.voidptr))
_resample_window = types.ExternalFunction("fl_resample_window", types.int32(
    types.voidptr, types.int64, types.int64, types.int64, types.int64, types.int64, types.int64, types.int64,
    types.int64, types.int64, types.int64, types.int32, types.int32, types.int32, types.voidptr, types.int64,
    types.int64, types.int32, types.int32, types.voidptr, types.voidptr))


@nb.njit(**_JIT)
def source_window(h, w, out_h, out_w, top, left, dh, dw, filt):
    """Rows [r0, r1) and columns [c0, c1) of an h x w box that the (top, left, dh, dw) window of
    its resize to out_h x out_w with filter ``filt`` reads (clipped to the box; padding reads nothing)."""
    out = np.empty(4, np.int64)
    _source_window(h, w, out_h, out_w, top, left, dh, dw, np.int32(filt), out.ctypes.data)
    return out[0], out[1], out[2], out[3]


@nb.njit(**_JIT)
def resample_window(src, y0, x0, h, w, out_h, out_w, top, left, flip, pad_mode, filt, dst, dh, dw,
                    chw, norm, scale, shift):
    """Write the (top, left) window (dh x dw) of resize(box -> out_h x out_w) into ``dst``, where
    box pixel (y, x) is ``src[y0 + y, x0 + x]`` (y0/x0 may be negative when ``src`` holds only the
    rows/columns :func:`source_window` names). ``dst`` (C-contiguous): uint8 HWC, or with ``norm``
    float ``level * scale[c] - shift[c]`` in HWC or CHW (``chw``)."""
    src_c = np.ascontiguousarray(src)  # the C code walks rows by address (a no-op for decoded regions)
    if _resample_window(src_c.ctypes.data, src.shape[0], src.shape[1], y0, x0, h, w, out_h, out_w, top, left,
                        np.int32(flip), np.int32(pad_mode), np.int32(filt), dst.ctypes.data, dh, dw, np.int32(chw),
                        np.int32(norm), scale.ctypes.data, shift.ctypes.data):
        raise MemoryError("resample_window: out of memory")
