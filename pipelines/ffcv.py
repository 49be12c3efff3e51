"""The ffcv backend: FFCV ``.beton`` storage, decoded and resampled by fastload's own engine.

The ``.beton`` file is what ffcv's writer produced (stock ffcv reads it); the records index
says where each JPEG lives in it, so this engine memory-maps the file and reads JPEGs
directly, with no ffcv ``Loader``. Why not ffcv's Loader: it compiled its pipeline for
several seconds per loader, had to be patched in five private places (thread counts,
traversal order, buffer allocation, error reporting), decoded with the fast DCT (1 level
off PIL), and kept an abandoned epoch's thread and buffers alive.

Per sample, on ``num_workers`` threads (each takes a 1/num_workers part of a batch, in one
compiled call that releases the GIL):
1. decode only the source rows and columns the output window reads (``native_numba.source_window``),
   with libjpeg's accurate DCT (``_jpeg.c``): PIL's pixels, bit for bit;
2. resample that region with PIL's filter (antialiased bilinear, bicubic, lanczos...), flip, and (fused) normalize
   straight into the batch (``native_numba.resample_window``, C called from numba, cached on disk).
Batches are tensors the caller owns (``buffers.py``: reused only once nothing holds them).
"""
from __future__ import annotations

import functools
import threading
from typing import Iterator

import numba as nb
import numpy as np
import torch

from .base import Backend, BackendOptions, OtherRows
from .buffers import BatchBuffers
from .engine import KernelOutput, PartWorkers
from .jpeg import MESSAGE_LEN
from .native import FILTER_CODES
from .native_numba import check_samples, decode_region, resample_window, source_window
from .samples import HealOnce, SampleChecks
from .sampling import FLIP, H, LEFT, OUT_H, OUT_W, PARAM_COLUMNS, TOP, W, X0, Y0, crop_rows, plan_batches

_DONE = np.iinfo(np.int64).max


@nb.njit(cache=True, nogil=True)
def _windows(rows, widths, dh, dw, filt, pad_mode):
    """Per geometry row, the rows [r0, r1) and columns [c0, c1) of its box that its window reads,
    and the scratch bytes the largest of those regions needs."""
    n = rows.shape[0]
    windows = np.empty((n, 4), np.int64)
    need = 0
    for k in range(n):
        p = rows[k]
        windows[k, 0], windows[k, 1], windows[k, 2], windows[k, 3] = source_window(
            p[H], p[W], p[OUT_H], p[OUT_W], p[TOP], p[LEFT], dh, dw, filt, pad_mode)
        need = max(need, (windows[k, 1] - windows[k, 0]) * widths[k] * 3)
    return windows, need


@nb.njit(cache=True, nogil=True)
def _decoded(k, addresses, sizes, heights, widths, rows, windows, scratch, message):
    """Image k's region (``windows[k]`` of its box) decoded into ``scratch``: (status, region,
    oy, ox) where box pixel (y, x) is region[oy + y, ox + x]; status 0, or 1 when it does not
    decode (libjpeg's words in ``message``)."""
    p = rows[k]
    r0, r1, c0, c1 = windows[k, 0], windows[k, 1], windows[k, 2], windows[k, 3]
    if r1 <= r0 or c1 <= c0:  # the window is all padding: nothing to decode
        return 0, np.zeros((1, 1, 3), np.uint8), 0, 0
    col0 = np.zeros(1, np.int32)
    if decode_region(addresses[k], sizes[k], heights[k], widths[k], p[Y0] + r0, p[Y0] + r1, p[X0] + c0, p[X0] + c1,
                     scratch.ctypes.data, widths[k] * 3, scratch.size, col0.ctypes.data, message.ctypes.data,
                     message.size):
        return 1, scratch[:3].reshape(1, 1, 3), 0, 0
    region = scratch[:(r1 - r0) * widths[k] * 3].reshape(r1 - r0, widths[k], 3)
    return 0, region, -r0, p[X0] - col0[0]


@nb.njit(cache=True, nogil=True)
def _prepared(addresses, sizes, crcs, heights, widths, what, rows, pad_mode, filt, dh, dw, scratch, message):
    """(status, windows) of a batch about to be decoded: its windows (``_windows``) and status
    ``_DONE`` when it may go ahead; -n when ``scratch`` is smaller than the n bytes a region needs;
    k >= 0 when sample k fails its checks (``what``: samples.py's flags; the words in ``message``)."""
    windows, need = _windows(rows, widths, dh, dw, filt, pad_mode)
    if need > scratch.size:
        return -need, windows
    if what:
        failed = check_samples(addresses.ctypes.data, sizes.ctypes.data, crcs.ctypes.data, heights.ctypes.data,
                               widths.ctypes.data, addresses.shape[0], what, message.ctypes.data, message.size)
        if failed >= 0:
            return failed, windows
    return _DONE, windows


@nb.njit(cache=True, nogil=True)
def decode_resample_batch(addresses, sizes, crcs, heights, widths, what, rows, pad_mode, filt, dst, chw, norm,
                          scale, shift, scratch, message):
    """Every image of a batch, checked (``what``: samples.py's flags), then one after the other
    while its pixels are still in cache: decode the rows and columns its window reads
    (``source_window``) into ``scratch``, then resample them into ``dst[k]``. ``rows``: geometry
    rows (``sampling.PARAM_COLUMNS``).

    Returns ``_DONE``; or k >= 0 when image k fails its checks or does not decode (the words in
    ``message``); or -n when ``scratch`` is smaller than the n bytes a region needs (grow it and
    call again)."""
    dh, dw = (dst.shape[2], dst.shape[3]) if chw else (dst.shape[1], dst.shape[2])
    status, windows = _prepared(addresses, sizes, crcs, heights, widths, what, rows, pad_mode, filt, dh, dw, scratch,
                                message)
    if status != _DONE:
        return status
    for k in range(rows.shape[0]):
        status, region, oy, ox = _decoded(k, addresses, sizes, heights, widths, rows, windows, scratch, message)
        if status:
            return k
        p = rows[k]
        resample_window(region, oy, ox, p[H], p[W], p[OUT_H], p[OUT_W], p[TOP], p[LEFT], p[FLIP] != 0, pad_mode,
                        filt, dst[k], dh, dw, chw, norm, scale, shift)
    return _DONE


@nb.njit(cache=True, nogil=True)
def decode_crop_batch(addresses, sizes, crcs, heights, widths, what, rows, pad_mode, filt, dst, scratch, message):
    """``fastload bench``'s decode stage: check and decode what :func:`decode_resample_batch` does,
    and cut the decoded region's top-left window into ``dst[k]`` (uint8 HWC) instead of resampling.
    Returns as :func:`decode_resample_batch` does."""
    dh, dw = dst.shape[1], dst.shape[2]
    status, windows = _prepared(addresses, sizes, crcs, heights, widths, what, rows, pad_mode, filt, dh, dw, scratch,
                                message)
    if status != _DONE:
        return status
    one, zero = np.ones(3, np.float32), np.zeros(3, np.float32)
    for k in range(rows.shape[0]):
        status, region, oy, ox = _decoded(k, addresses, sizes, heights, widths, rows, windows, scratch, message)
        if status:
            return k
        h, w = windows[k, 1] - windows[k, 0], windows[k, 3] - windows[k, 2]  # the region as a box of its own
        resample_window(region, 0, ox + windows[k, 2], h, w, h, w, 0, 0, False, 0, filt, dst[k], dh, dw, False,
                        False, one, zero)
    return _DONE


@nb.njit(cache=True, nogil=True)
def resample_raw_batch(data, offsets, crcs, heights, widths, what, rows, pad_mode, filt, dst, chw, norm, scale, shift,
                       message):
    """:func:`decode_resample_batch` for raw storage: sample k's pixels are (heights[k], widths[k], 3)
    uint8 at ``data[offsets[k]:]``; nothing to decode. Returns ``_DONE``, or the first sample that
    fails its checks."""
    dh, dw = (dst.shape[2], dst.shape[3]) if chw else (dst.shape[1], dst.shape[2])
    if what:  # samples.py's checks
        addresses = offsets.astype(np.uint64) + np.uint64(data.ctypes.data)
        sizes = (heights * widths * 3).astype(np.uint64)
        failed = check_samples(addresses.ctypes.data, sizes.ctypes.data, crcs.ctypes.data, heights.ctypes.data,
                               widths.ctypes.data, addresses.shape[0], what, message.ctypes.data, message.size)
        if failed >= 0:
            return failed
    for k in range(rows.shape[0]):
        p = rows[k]
        n = heights[k] * widths[k] * 3
        image = data[offsets[k]:offsets[k] + n].reshape((heights[k], widths[k], 3))
        resample_window(image, p[Y0], p[X0], p[H], p[W], p[OUT_H], p[OUT_W], p[TOP], p[LEFT], p[FLIP] != 0, pad_mode,
                        filt, dst[k], dh, dw, chw, norm, scale, shift)
    return _DONE


def _compile_every_variant() -> None:
    """Compile (or load from numba's disk cache) every variant the backend calls, once, when this
    module is imported: float32 and uint8 batches, JPEG and raw storage. Nothing compiles later,
    on worker threads or after other code has used numba in the process (numba 0.68's dispatchers
    raised KeyError there, compiling a call after stock ffcv's loaders had run)."""
    n0, rows = np.zeros(0, np.int64), np.zeros((0, len(PARAM_COLUMNS)), np.int64)
    u64, u32 = np.zeros(0, np.uint64), np.zeros(0, np.uint32)
    message, scratch, data = np.zeros(8, np.uint8), np.zeros(8, np.uint8), np.zeros(8, np.uint8)
    data.setflags(write=False)  # as SplitReader.mapped gives it
    one, zero = np.ones(3, np.float32), np.zeros(3, np.float32)
    for dtype in (np.float32, np.uint8):
        dst = np.zeros((0, 1, 1, 3), dtype)
        decode_resample_batch(u64, u64, u32, n0, n0, 0, rows, 0, 0, dst, False, False, one, zero, scratch, message)
        resample_raw_batch(data, n0, u32, n0, n0, 0, rows, 0, 0, dst, False, False, one, zero, message)
    decode_crop_batch(u64, u64, u32, n0, n0, 0, rows, 0, 0, np.zeros((0, 1, 1, 3), np.uint8), scratch, message)


_compile_every_variant()


def _healed(status: int, index: np.ndarray, heal: HealOnce) -> bool:
    """A batch call's failing sample (``status`` >= 0) fetched again by the heal rule: redo the part."""
    return 0 <= status != _DONE and heal.retry(int(index[status]))


class FFCVBackend(Backend):
    name = "ffcv"
    fuses_normalization = True
    interpolations = tuple(FILTER_CODES)  # Pillow's filters, bit for bit (_resample.c)

    def __init__(self, reader, spec, options: BackendOptions):
        super().__init__(reader, spec, options)
        self.out = KernelOutput.of(spec, self.normalize)
        self.workers = PartWorkers(options.num_workers, "fastload-ffcv")
        self.widths = reader.widths.astype(np.int64)
        self.heights = reader.heights.astype(np.int64)
        self._local = threading.local()
        self.buffers = BatchBuffers(capacity=options.num_workers + 4)  # in flight, ready, and the caller's
        self.checks = SampleChecks(reader, options.check_samples)

    def decode_stage(self) -> "FFCVBackend":
        if self.reader.codec == "raw":  # nothing to decode: the box cut out, unresampled
            return OtherRows(self, lambda order, params: crop_rows(params))
        return _FFCVDecodeStage(self.reader, self.spec, self.options)

    def run_epoch(self, order: np.ndarray, params: np.ndarray) -> Iterator[tuple[torch.Tensor, np.ndarray]]:
        return self.workers.in_order(self._jobs(order, params))

    def _jobs(self, order, params):
        for index, rows in plan_batches(order, params, self.options.batch_size, self.options.drop_last):
            out = self.buffers.empty((len(index), *self.out.shape), self.out.dtype)
            rows = np.ascontiguousarray(rows, np.int64)
            yield len(index), functools.partial(self._part, out, index, rows), (out, index)

    def _part(self, out: torch.Tensor, index: np.ndarray, rows: np.ndarray, lo: int, hi: int) -> None:
        """Samples lo..hi of a batch, checked, decoded and resampled into ``out[lo:hi]``."""
        dst, index, rows, o, checks = out.numpy()[lo:hi], index[lo:hi], rows[lo:hi], self.out, self.checks
        if self.reader.codec == "raw":
            self.reader.ensure(index)
            offsets = np.asarray(self.reader.records["offset"][index], np.int64)
            message, heal = np.zeros(MESSAGE_LEN, np.uint8), HealOnce(self.reader)
            while True:
                status = resample_raw_batch(self.reader.mapped(0), offsets, checks.crcs[index], self.heights[index],
                                            self.widths[index], checks.what, rows, o.pad_mode, o.filter, dst, o.chw,
                                            o.fused, o.scale, o.shift, message)
                if not _healed(status, index, heal):
                    return self._raise_for(status, index, message)
        self._decode(index, lambda addresses, sizes, crcs, heights, widths, what, scratch, message:
                     decode_resample_batch(addresses, sizes, crcs, heights, widths, what, rows, o.pad_mode, o.filter,
                                           dst, o.chw, o.fused, o.scale, o.shift, scratch, message))

    def _decode(self, index: np.ndarray, batch_call) -> None:
        """Run a compiled batch function over samples ``index`` with this thread's scratch buffer,
        growing it when a region needs more; a sample that fails raises its error."""
        addresses, sizes = self.reader.stored_addresses(index)
        crcs, heights, widths = self.checks.crcs[index], self.heights[index], self.widths[index]
        message, heal = np.zeros(MESSAGE_LEN, np.uint8), HealOnce(self.reader)
        while True:
            scratch = getattr(self._local, "scratch", None)
            if scratch is None:
                scratch = self._local.scratch = np.empty(1 << 20, np.uint8)
            status = batch_call(addresses, sizes, crcs, heights, widths, self.checks.what, scratch, message)
            if _healed(status, index, heal):
                continue
            if status >= 0 or status == _DONE:
                return self._raise_for(status, index, message)
            self._local.scratch = np.empty(-status, np.uint8)  # a bigger region than ever: grow, redo

    def _raise_for(self, status: int, index: np.ndarray, message: np.ndarray) -> None:
        if status != _DONE:
            text = bytes(message).split(b"\0", 1)[0].decode(errors="replace")
            raise self.reader.sample_error(int(index[status]), text)

    def close(self) -> None:
        self.workers.close()


class _FFCVDecodeStage(FFCVBackend):
    """The bench's decode stage: the same regions decoded, their top-left window cut (uint8)."""
    fuses_normalization = False

    def _part(self, out, index, rows, lo, hi):
        dst, index, rows, o = out.numpy()[lo:hi], index[lo:hi], rows[lo:hi], self.out
        self._decode(index, lambda addresses, sizes, crcs, heights, widths, what, scratch, message: decode_crop_batch(
            addresses, sizes, crcs, heights, widths, what, rows, o.pad_mode, o.filter, dst, scratch, message))
