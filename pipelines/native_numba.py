"""fastload's C library for numba code (the ffcv backend's compiled loop): each function of
:data:`native.SIGNATURES` it needs, bound by symbol name (``types.ExternalFunction``), so compiled
code calls C without leaving compiled code and numba still caches that code on disk.

The geometry is PIL's, in C once for both backends (``_resample.c``): ``resample_window`` is
Pillow's ``Image.resize`` (its filters, widened by the scale when downscaling, 22-bit fixed-point
coefficients, horizontal pass then vertical, uint8 rounding between; NEAREST as its affine scale)
computed only for the output window that survives the crop, so Resize(256)+CenterCrop(224) costs
a 224x224 resample, not a 256xN one; bit-exact with Pillow on real photos (tests/test_kernels.py).
``source_window`` says which source rows and columns a window needs, so the decoder decodes
only those (the region-of-interest decode).
"""
from __future__ import annotations

import numba as nb
import numpy as np
from numba import types

from . import native

_NUMBA = {"i32": types.int32, "i64": types.int64, "u32": types.uint32, "u64": types.uint64, "ptr": types.voidptr,
          "void": types.void}


def _external(name: str) -> types.ExternalFunction:
    returns, arguments = native.SIGNATURES[name]
    return types.ExternalFunction(name, _NUMBA[returns](*[_NUMBA[a] for a in arguments]))


native.bind_for_numba()
decode_region = _external("fl_jpeg_decode_region")  # arguments as _jpeg.c's fl_jpeg_decode_region
check_samples = _external("fl_check_samples")  # as _samples.c's fl_check_samples
_source_window = _external("fl_source_window")
_resample_window = _external("fl_resample_window")

_JIT = dict(cache=True, nogil=True)


@nb.njit(**_JIT)
def source_window(h, w, out_h, out_w, top, left, dh, dw, filt, pad_mode):
    """Rows [r0, r1) and columns [c0, c1) of an h x w box that the (top, left, dh, dw) window of
    its resize to out_h x out_w with filter ``filt`` reads (clipped to the box; constant padding
    reads nothing, edge and reflect padding what they mirror)."""
    out = np.empty(4, np.int64)
    _source_window(h, w, out_h, out_w, top, left, dh, dw, np.int32(filt), np.int32(pad_mode), out.ctypes.data)
    return out[0], out[1], out[2], out[3]


@nb.njit(**_JIT)
def resample_window(src, y0, x0, h, w, out_h, out_w, top, left, flip, pad_mode, filt, dst, dh, dw,
                    chw, norm, scale, shift):
    """Write the (top, left) window (dh x dw) of resize(box -> out_h x out_w) into ``dst``, where
    box pixel (y, x) is ``src[y0 + y, x0 + x]`` (y0/x0 may be negative when ``src`` holds only the
    rows/columns :func:`source_window` names). ``dst`` (C-contiguous): uint8 HWC, or with ``norm``
    float ``level * scale[c] - shift[c]`` in HWC or CHW (``chw``)."""
    src_c = np.ascontiguousarray(src)  # the C code walks rows by address (a no-op for decoded regions)
    status = _resample_window(src_c.ctypes.data, src.shape[0], src.shape[1], y0, x0, h, w, out_h, out_w, top, left,
                              np.int32(flip), np.int32(pad_mode), np.int32(filt), dst.ctypes.data, dh, dw,
                              np.int32(chw), np.int32(norm), scale.ctypes.data, shift.ctypes.data)
    if status == 1:
        raise MemoryError("resample_window: out of memory")
    if status == 2:  # a bug: the regions decoded are the ones source_window names
        raise RuntimeError("resample_window: the geometry reads outside the pixels it was given")
