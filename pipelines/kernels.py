"""Numba kernels that reproduce torchvision-on-PIL geometry exactly, for the ffcv backend and the
DALI backend on CPU.

``resample_window`` is PIL's ``Image.resize`` (Pillow's Resample.c: its filters, widened by
the scale when downscaling, 22-bit fixed-point coefficients, horizontal pass then vertical,
uint8 rounding between, int32 accumulators; NEAREST as its affine scale) computed only for the
output window that survives the crop: Resize(256)+CenterCrop(224) costs a 224x224 resample,
not a 256xN one. Bit-exact with Pillow on real photos (tests/test_kernels.py).

Speed: the vertical pass runs over whole interleaved rows (``dw * 3`` int32 lanes per tap),
which LLVM vectorizes; the horizontal pass reads each needed source row once, in C
(``_resample.c``: a pixel's three channels and two taps in one pair of exact 16-bit SIMD
multiply-adds, which numba does not emit). Compiled with ``cache=True``: a fresh process loads
machine code from ``__pycache__`` instead of compiling.

``source_window`` says which source rows and columns a window needs, so the decoder can
decode only those (the ffcv backend's region-of-interest decode).
"""
from __future__ import annotations

import math

import numba as nb
import numpy as np
from numba import types

from . import native

PRECISION_BITS = 22  # Pillow: 32 - 8 - 2
PAD_CONSTANT, PAD_EDGE, PAD_REFLECT = 0, 1, 2
PADDING_CODES = {"constant": PAD_CONSTANT, "edge": PAD_EDGE, "reflect": PAD_REFLECT}
# Pillow's filters and their support (Resample.c); NEAREST is not a convolution there
BOX, BILINEAR, HAMMING, BICUBIC, LANCZOS, NEAREST = range(6)
FILTER_CODES = {"box": BOX, "bilinear": BILINEAR, "hamming": HAMMING, "bicubic": BICUBIC, "lanczos": LANCZOS,
                "nearest": NEAREST}
_SUPPORT = np.array([0.5, 1.0, 1.0, 2.0, 3.0, 0.0])
_HAMMING_A, _HAMMING_B = float(np.float32(0.54)), float(np.float32(0.46))  # C float literals in Pillow
_JIT = dict(cache=True, nogil=True)

native.bind_for_numba()
# _resample.c: (src, readable bytes, row bytes, rows, column 0's byte offset, bounds, coefficients,
# taps per row of coefficients, output pixels per row, out)
_resample_rows = types.ExternalFunction("fl_resample_rows", types.void(
    types.voidptr, types.int64, types.int64, types.int32, types.int64, types.voidptr, types.voidptr, types.int32,
    types.int32, types.voidptr))


@nb.njit(**_JIT)
def _sinc(x):
    if x == 0.0:
        return 1.0
    x = x * math.pi
    return math.sin(x) / x


@nb.njit(**_JIT)
def _weight(filt, x):
    """Pillow's filter functions, as written in Resample.c."""
    if filt == BILINEAR:
        x = abs(x)
        return 1.0 - x if x < 1.0 else 0.0
    if filt == BICUBIC:  # Keys, a = -0.5
        x = abs(x)
        if x < 1.0:
            return ((-0.5 + 2.0) * x - (-0.5 + 3.0)) * x * x + 1
        if x < 2.0:
            return (((x - 5) * x + 8) * x - 4) * -0.5
        return 0.0
    if filt == LANCZOS:
        return _sinc(x) * _sinc(x / 3) if -3.0 <= x < 3.0 else 0.0
    if filt == BOX:
        return 1.0 if -0.5 < x <= 0.5 else 0.0
    x = abs(x)  # HAMMING
    if x == 0.0:
        return 1.0
    if x >= 1.0:
        return 0.0
    x = x * math.pi
    return math.sin(x) / x * (_HAMMING_A + _HAMMING_B * math.cos(x))


@nb.njit(**_JIT)
def _support_bounds(in_size, out_size, first, count, filt):
    """First source index and tap count of outputs first..first+count (Pillow's precompute_coeffs;
    NEAREST: ImagingScaleAffine's accumulated source position, one tap)."""
    scale = in_size / out_size
    bounds = np.empty((count, 2), np.int32)
    if filt == NEAREST:
        xo = scale * 0.5
        for _ in range(first):
            xo += scale
        for k in range(count):
            bounds[k, 0] = min(in_size - 1, -1 if xo < 0.0 else int(xo))
            bounds[k, 1] = 1
            xo += scale
        return bounds
    support = _SUPPORT[filt] * (scale if scale > 1.0 else 1.0)  # widened when downscaling
    for k in range(count):
        center = (first + k + 0.5) * scale
        xmin = max(0, int(center - support + 0.5))
        xmax = min(in_size, int(center + support + 0.5))
        bounds[k, 0] = xmin
        bounds[k, 1] = xmax - xmin
    return bounds


@nb.njit(**_JIT)
def _coefficients(in_size, out_size, first, count, filt):
    """Pillow's precompute_coeffs + normalize_coeffs_8bpc for outputs first..first+count:
    (bounds [count, 2] = (first source index, taps), int32 coefficients [count, max taps])."""
    scale = in_size / out_size
    filterscale = scale if scale > 1.0 else 1.0
    bounds = _support_bounds(in_size, out_size, first, count, filt)
    ksize = int(math.ceil(_SUPPORT[filt] * filterscale)) * 2 + 1
    kk = np.zeros((count, ksize), np.int32)
    if filt == NEAREST:
        kk[:, 0] = 1 << PRECISION_BITS
        return bounds, kk
    tmp = np.empty(ksize, np.float64)
    ss = 1.0 / filterscale
    for k in range(count):
        center = (first + k + 0.5) * scale
        xmin, n = bounds[k, 0], bounds[k, 1]
        ww = 0.0
        for x in range(n):
            w = _weight(filt, (x + xmin - center + 0.5) * ss)
            tmp[x] = w
            ww += w
        for x in range(n):
            v = tmp[x] / ww if ww != 0.0 else tmp[x]
            kk[k, x] = int(-0.5 + v * (1 << PRECISION_BITS)) if v < 0 else int(0.5 + v * (1 << PRECISION_BITS))
    return bounds, kk


@nb.njit(**_JIT)
def source_window(h, w, out_h, out_w, top, left, dh, dw, filt):
    """Rows [r0, r1) and columns [c0, c1) of an h x w box that the (top, left, dh, dw) window of
    its resize to out_h x out_w with filter ``filt`` reads (clipped to the box; padding reads nothing)."""
    if out_h != h:
        bv = _support_bounds(h, out_h, top, dh, filt)
        r0, r1 = bv[0, 0], bv[dh - 1, 0] + bv[dh - 1, 1]
    else:
        r0, r1 = max(0, top), min(h, top + dh)
    if out_w != w:
        bh = _support_bounds(w, out_w, left, dw, filt)
        c0, c1 = bh[0, 0], bh[dw - 1, 0] + bh[dw - 1, 1]
    else:
        c0, c1 = max(0, left), min(w, left + dw)
    return r0, max(r0, r1), c0, max(c0, c1)


@nb.njit(**_JIT, inline="always")
def _clip8(s):
    s >>= PRECISION_BITS
    return 0 if s < 0 else (255 if s > 255 else s)


@nb.njit(**_JIT)
def _reflect(i, n, mode):
    if mode == PAD_EDGE:
        return 0 if i < 0 else (n - 1 if i >= n else i)
    # reflect without repeating the edge (numpy/torchvision 'reflect')
    if n == 1:
        return 0
    period = 2 * n - 2
    i = abs(i) % period
    return period - i if i >= n else i


@nb.njit(**_JIT)
def _store_row(dst, yy, levels, dw, flip, chw, norm, scale, shift):
    """One output row of 0..255 levels (interleaved RGB int32) -> dst: uint8 HWC, or float
    ``level * scale[c] - shift[c]`` in HWC or CHW; mirrored when ``flip``. One loop per case,
    no branch inside (so LLVM vectorizes them)."""
    if chw:
        for c in range(3):
            out = dst[c, yy]
            s = scale[c]
            b = shift[c]
            if flip:
                for xx in range(dw):
                    out[dw - 1 - xx] = np.float32(levels[xx * 3 + c]) * s - b
            else:
                for xx in range(dw):
                    out[xx] = np.float32(levels[xx * 3 + c]) * s - b
        return
    out = dst[yy]
    for xx in range(dw):
        ox = dw - 1 - xx if flip else xx
        if norm:
            for c in range(3):
                out[ox, c] = np.float32(levels[xx * 3 + c]) * scale[c] - shift[c]
        else:
            for c in range(3):
                out[ox, c] = levels[xx * 3 + c]


@nb.njit(**_JIT)
def resample_window(src, y0, x0, h, w, out_h, out_w, top, left, flip, pad_mode, filt, dst, dh, dw,
                    chw, norm, scale, shift):
    """Write the (top, left) window (dh x dw) of resize(box -> out_h x out_w) into ``dst``, where
    box pixel (y, x) is ``src[y0 + y, x0 + x]`` (y0/x0 may be negative when ``src`` holds only the
    rows/columns :func:`source_window` names). ``dst``: uint8 HWC, or with ``norm`` float
    ``level * scale[c] - shift[c]`` in HWC or CHW (``chw``)."""
    half = np.int32(1 << (PRECISION_BITS - 1))
    row_levels = np.empty(dw * 3, np.int32)
    if out_h == h and out_w == w:
        # no resampling: a (padded) crop
        for yy in range(dh):
            sy = top + yy
            inside_y = 0 <= sy < h
            if not inside_y and pad_mode != PAD_CONSTANT:
                sy = _reflect(sy, h, pad_mode)
                inside_y = True
            for xx in range(dw):
                sx = left + xx
                inside = inside_y and 0 <= sx < w
                if inside_y and not inside and pad_mode != PAD_CONSTANT:
                    sx = _reflect(sx, w, pad_mode)
                    inside = True
                for c in range(3):
                    row_levels[xx * 3 + c] = src[y0 + sy, x0 + sx, c] if inside else 0
            _store_row(dst, yy, row_levels, dw, flip, chw, norm, scale, shift)
        return
    need_h = out_w != w
    need_v = out_h != h
    bh, kh = _coefficients(w, out_w, left, dw, filt)
    bv, kv = _coefficients(h, out_h, top, dh, filt)
    if need_v:
        r0 = bv[0, 0]
        r1 = bv[dh - 1, 0] + bv[dh - 1, 1]
    else:
        r0 = top
        r1 = top + dh
    # horizontal pass: each needed source row once, into uint8 rows of dw pixels
    tmp = np.empty((r1 - r0, dw * 3), np.uint8)
    row_bytes = src.shape[1] * 3
    first = (y0 + r0) * row_bytes
    if need_h:
        src_c = np.ascontiguousarray(src)  # the C pass walks rows by address (a no-op for decoded regions)
        _resample_rows(src_c.ctypes.data + first, src_c.size - first, row_bytes, r1 - r0, x0 * 3, bh.ctypes.data,
                       kh.ctypes.data, kh.shape[1], dw, tmp.ctypes.data)
    else:
        flat = src.reshape(src.shape[0], row_bytes)
        for r in range(r0, r1):
            tmp[r - r0] = flat[y0 + r, (x0 + left) * 3:(x0 + left + dw) * 3]
    # vertical pass: whole interleaved rows per tap (vectorized)
    n3 = dw * 3
    for yy in range(dh):
        if need_v:
            for j in range(n3):
                row_levels[j] = half
            ymin = bv[yy, 0] - r0
            for y in range(bv[yy, 1]):
                k = kv[yy, y]
                line = tmp[ymin + y]
                for j in range(n3):
                    row_levels[j] += np.int32(line[j]) * k
            for j in range(n3):
                row_levels[j] = _clip8(row_levels[j])
        else:
            line = tmp[yy]
            for j in range(n3):
                row_levels[j] = line[j]
        _store_row(dst, yy, row_levels, dw, flip, chw, norm, scale, shift)
