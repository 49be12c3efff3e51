"""The ffcv backend: FFCV ``.beton`` storage, decoded and resampled by fastload's own engine.

The ``.beton`` file is what ffcv's writer produced (stock ffcv reads it); the records index
says where each JPEG lives in it, so this engine memory-maps the file and reads JPEGs
directly, with no ffcv ``Loader``. Why not ffcv's Loader: it compiled its pipeline for
several seconds per loader, had to be patched in five private places (thread counts,
traversal order, buffer allocation, error reporting), decoded with the fast DCT (1 level
off PIL), and kept an abandoned epoch's thread and buffers alive.

Per sample, on ``num_workers`` threads (each takes a 1/num_workers part of a batch, in one
compiled call that releases the GIL):
1. decode only the source rows and columns the output window reads (``kernels.source_window``),
   with libjpeg's accurate DCT (``_jpeg.c``): PIL's pixels, bit for bit;
2. resample that region with PIL's filter (antialiased bilinear, bicubic, lanczos...), flip, and (fused) normalize
   straight into the batch (``kernels.resample_window``, numba, cached on disk).
Batches are tensors the caller owns (``buffers.py``: reused only once nothing holds them).
"""
from __future__ import annotations

import functools
import threading
from typing import Iterator

import numba as nb
import numpy as np
import torch
from numba import types

from .base import Backend, BackendOptions
from .buffers import BatchBuffers
from . import native
from .engine import KernelOutput, PartWorkers
from .jpeg import MESSAGE_LEN
from .kernels import FILTER_CODES, resample_window, source_window
from .sampling import plan_batches

# _jpeg.c's region decoder for numba code, by symbol name. Arguments as ``fl_jpeg_decode_region``.
native.bind_for_numba()
nb_decode_region = types.ExternalFunction("fl_jpeg_decode_region", types.int32(
    types.voidptr, types.uint64, types.int32, types.int32, types.int32, types.int32, types.voidptr, types.int32,
    types.CPointer(types.int32), types.voidptr, types.int32))

_DONE = np.iinfo(np.int64).max


@nb.njit(cache=True, nogil=True)
def decode_resample_batch(addresses, sizes, widths, rows, resample, pad_mode, filt, dst, chw, norm, scale, shift,
                          scratch, message):
    """Every image of a batch, one after the other while its pixels are still in cache: decode the
    rows and columns its window reads (``source_window``) into ``scratch``, then resample them into
    ``dst[k]``. ``rows``: geometry rows (``sampling.PARAM_COLUMNS``). ``resample=False``: cut the
    decoded region's top-left window instead (``fastload bench``'s decode stage).

    Returns ``_DONE``; or k >= 0 when image k does not decode (libjpeg's words in ``message``);
    or -n when ``scratch`` is smaller than the n bytes a region needs (grow it and call again)."""
    dh, dw = (dst.shape[2], dst.shape[3]) if chw else (dst.shape[1], dst.shape[2])
    n = rows.shape[0]
    windows = np.empty((n, 4), np.int64)
    need = 0
    for k in range(n):
        p = rows[k]
        windows[k, 0], windows[k, 1], windows[k, 2], windows[k, 3] = source_window(
            p[2], p[3], p[4], p[5], p[6], p[7], dh, dw, filt)
        need = max(need, (windows[k, 1] - windows[k, 0]) * widths[k] * 3)
    if need > scratch.size:
        return -need
    col0 = np.zeros(1, np.int32)
    empty = np.zeros((1, 1, 3), np.uint8)
    for k in range(n):
        p = rows[k]
        y0, x0, h, w, out_h, out_w, top, left = p[0], p[1], p[2], p[3], p[4], p[5], p[6], p[7]
        r0, r1, c0, c1 = windows[k, 0], windows[k, 1], windows[k, 2], windows[k, 3]
        if r1 <= r0 or c1 <= c0:  # the window is all padding: nothing to decode
            region, oy, ox = empty, 0, 0
        else:
            if nb_decode_region(addresses[k], sizes[k], y0 + r0, y0 + r1, x0 + c0, x0 + c1, scratch.ctypes.data,
                                widths[k] * 3, col0.ctypes, message.ctypes.data, message.size):
                return k
            region = scratch[:(r1 - r0) * widths[k] * 3].reshape(r1 - r0, widths[k], 3)
            oy, ox = -r0, x0 - col0[0]  # box pixel (y, x) is region[oy + y, ox + x]
        if not resample:
            h, w, out_h, out_w, top, left, oy, ox = r1 - r0, c1 - c0, r1 - r0, c1 - c0, 0, 0, 0, ox + c0
        resample_window(region, oy, ox, h, w, out_h, out_w, top, left, p[8] != 0, pad_mode, filt, dst[k], dh, dw,
                        chw, norm, scale, shift)
    return _DONE


@nb.njit(cache=True, nogil=True)
def resample_raw_batch(data, offsets, heights, widths, rows, resample, pad_mode, filt, dst, chw, norm, scale, shift):
    """:func:`decode_resample_batch` for raw storage: sample k's pixels are (heights[k], widths[k], 3)
    uint8 at ``data[offsets[k]:]``; nothing to decode. ``resample=False``: cut the box's top-left
    window (the bench's decode stage: here, a copy)."""
    dh, dw = (dst.shape[2], dst.shape[3]) if chw else (dst.shape[1], dst.shape[2])
    for k in range(rows.shape[0]):
        p = rows[k]
        n = heights[k] * widths[k] * 3
        image = data[offsets[k]:offsets[k] + n].reshape((heights[k], widths[k], 3))
        if resample:
            resample_window(image, p[0], p[1], p[2], p[3], p[4], p[5], p[6], p[7], p[8] != 0, pad_mode, filt, dst[k],
                            dh, dw, chw, norm, scale, shift)
        else:
            resample_window(image, p[0], p[1], p[2], p[3], p[2], p[3], 0, 0, False, pad_mode, filt, dst[k],
                            dh, dw, chw, norm, scale, shift)


class FFCVBackend(Backend):
    name = "ffcv"
    storages = ("beton",)
    fuses_normalization = True
    interpolations = tuple(FILTER_CODES)  # Pillow's filters, bit for bit (kernels.py)

    def __init__(self, reader, spec, options: BackendOptions, resample: bool = True):
        super().__init__(reader, spec, options)
        self.resample = resample  # False: bench's decode stage (decode the same region, cut the window)
        self.out = KernelOutput.of(spec, self.normalize if resample else None)
        self.workers = PartWorkers(options.num_workers, "fastload-ffcv")
        self.widths = reader.widths.astype(np.int64)
        self.heights = reader.heights.astype(np.int64)
        self._local = threading.local()
        self.buffers = BatchBuffers(capacity=options.num_workers + 4)  # in flight, ready, and the caller's

    def decode_stage(self) -> "FFCVBackend":
        return FFCVBackend(self.reader, self.spec, self.options, resample=False)

    def run_epoch(self, order: np.ndarray, params: np.ndarray) -> Iterator[tuple[torch.Tensor, np.ndarray]]:
        return self.workers.in_order(self._jobs(order, params))

    def _jobs(self, order, params):
        for index, rows in plan_batches(order, params, self.options.batch_size, self.options.drop_last):
            out = self.buffers.empty((len(index), *self.out.shape), self.out.dtype)
            rows = np.ascontiguousarray(rows, np.int64)
            yield len(index), functools.partial(self._part, out, index, rows), (out, index)

    def _part(self, out: torch.Tensor, index: np.ndarray, rows: np.ndarray, lo: int, hi: int) -> None:
        """Samples lo..hi of a batch, decoded and resampled into ``out[lo:hi]``."""
        dst, index, rows, o = out.numpy()[lo:hi], index[lo:hi], rows[lo:hi], self.out
        if self.reader.codec == "raw":
            r = self.reader.records
            resample_raw_batch(self.reader.mapped(0), np.asarray(r["offset"][index], np.int64),
                               self.heights[index], self.widths[index], rows, self.resample, o.pad_mode,
                               o.filter, dst, o.chw, o.fused, o.scale, o.shift)
            return
        addresses, sizes = self.reader.stored_addresses(index)
        widths = self.widths[index]
        message = np.zeros(MESSAGE_LEN, np.uint8)
        while True:
            scratch = getattr(self._local, "scratch", None)
            if scratch is None:
                scratch = self._local.scratch = np.empty(1 << 20, np.uint8)
            status = decode_resample_batch(addresses, sizes, widths, rows, self.resample, o.pad_mode, o.filter,
                                           dst, o.chw, o.fused, o.scale, o.shift, scratch, message)
            if status == _DONE:
                return
            if status >= 0:
                text = bytes(message).split(b"\0", 1)[0].decode(errors="replace")
                raise self.reader.sample_error(int(index[status]), text)
            self._local.scratch = np.empty(-status, np.uint8)  # a bigger region than ever: grow, redo

    def close(self) -> None:
        self.workers.close()
