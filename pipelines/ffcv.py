"""The ffcv backend: FFCV ``.beton`` storage, decoded and resampled by fastload's own engine.

The ``.beton`` file is what ffcv's writer produced (stock ffcv reads it); the records index
says where each JPEG lives in it, so this engine memory-maps the file and reads JPEGs
directly, with no ffcv ``Loader``. Why not ffcv's Loader: it compiled its pipeline for
several seconds per loader, had to be patched in five private places (thread counts,
traversal order, buffer allocation, error reporting), decoded with the fast DCT (1 level
off PIL), and kept an abandoned epoch's thread and buffers alive.

Per sample, on ``num_workers`` threads (each takes whole batches, in chunks of ~1 MB of
pixels; the GIL is released in both native calls):
1. decode only the source rows and columns the output window reads (``kernels.source_window``),
   with libjpeg's accurate DCT (``_jpeg.c``): PIL's pixels, bit for bit;
2. resample that region with PIL's antialiased bilinear filter, flip, and (fused) normalize
   straight into the batch (``kernels.resample_window``, numba, cached on disk).
Batches are tensors the caller owns (``buffers.py``: reused only once nothing holds them).
"""
from __future__ import annotations

import threading
from collections import deque
from concurrent.futures import ThreadPoolExecutor, wait
from typing import Iterator

import numpy as np
import torch

from fastload.spec import RandomCrop

from .base import Backend, BackendOptions
from .buffers import BatchBuffers
from .jpeg import decode_regions
from .kernels import PADDING_CODES, batch_source_windows, resample_chunk
from .sampling import epoch_batches

_NO_NORMALIZE = (np.ones(3, np.float32), np.zeros(3, np.float32))
CHUNK_BYTES = 1 << 20  # decoded pixels per native call: about what stays in L2 until resampled


class FFCVBackend(Backend):
    name = "ffcv"
    storages = ("beton",)
    fuses_normalization = True

    def __init__(self, reader, spec, options: BackendOptions, resample: bool = True):
        super().__init__(reader, spec, options)
        self.pad_mode = PADDING_CODES[spec.geometry.padding_mode] if isinstance(spec.geometry, RandomCrop) else 0
        self.resample = resample  # False: bench's decode stage (decode the same region, cut the window)
        norm = self.normalize if resample else None
        self.scale, self.shift = (tuple(np.asarray(v, np.float32) for v in norm) if norm is not None
                                  else _NO_NORMALIZE)
        self.fused = norm is not None
        self.chw = self.fused and spec.layout == "NCHW"
        h, w = spec.size
        self.shape = (3, h, w) if self.chw else (h, w, 3)
        self.dtype = torch.float32 if self.fused else torch.uint8
        self.workers = ThreadPoolExecutor(max(1, options.num_workers), thread_name_prefix="fastload-ffcv")
        self.widths = reader.widths
        self._local = threading.local()
        self.buffers = BatchBuffers(capacity=options.num_workers + 4)  # in flight, ready, and the caller's

    def decode_stage(self) -> "FFCVBackend":
        return FFCVBackend(self.reader, self.spec, self.options, resample=False)

    def run_epoch(self, order: np.ndarray, params: np.ndarray) -> Iterator[tuple[torch.Tensor, np.ndarray]]:
        batches = deque(epoch_batches(order, self.options.batch_size, self.options.drop_last))
        in_flight = deque()
        try:
            while batches or in_flight:
                while batches and len(in_flight) <= self.options.num_workers:  # workers busy + one ready
                    index = batches.popleft()
                    in_flight.append((self.workers.submit(self._batch, index, params[index]), index))
                future, index = in_flight.popleft()
                yield future.result(), index
        finally:  # an abandoned epoch: drop queued batches, let running ones finish
            for future, _ in in_flight:
                future.cancel()
            wait([f for f, _ in in_flight])

    def _batch(self, index: np.ndarray, rows: np.ndarray) -> torch.Tensor:
        """One batch on one worker thread, in chunks of about ``CHUNK_BYTES`` of decoded pixels: one
        native decode call and one resample call per chunk (per-call costs are paid per chunk, not
        per image, and a chunk's pixels are still in cache when they are resampled)."""
        out = self.buffers.empty((len(index), *self.shape), self.dtype)
        array = out.numpy()
        dh, dw = self.spec.size
        rows = np.ascontiguousarray(rows, np.int64)
        regions = batch_source_windows(rows, dh, dw)
        widths = self.widths[index].astype(np.int32)
        nbytes = np.maximum(regions[:, 1] - regions[:, 0], 0).astype(np.int64) * widths * 3
        addresses, sizes = self.reader.jpeg_addresses(index)
        col0 = np.empty(len(index), np.int32)
        start = 0
        while start < len(index):
            # at least one image; then as many as fit in CHUNK_BYTES
            stop = start + max(1, int(np.searchsorted(np.cumsum(nbytes[start:]), CHUNK_BYTES, side="right")))
            offsets = np.concatenate([[0], np.cumsum(nbytes[start:stop])[:-1]])
            scratch = self._scratch(int(nbytes[start:stop].sum()))
            failed, message = decode_regions(addresses[start:stop], sizes[start:stop], regions[start:stop],
                                             widths[start:stop], scratch, offsets, col0[start:stop])
            if failed >= 0:
                raise self.reader.sample_error(int(index[start + failed]), message)
            resample_chunk(scratch, offsets, regions[start:stop], col0[start:stop], widths[start:stop],
                           rows[start:stop], self.resample, self.pad_mode, array[start:stop], dh, dw, self.chw,
                           self.fused, self.scale, self.shift)
            start = stop
        return out

    def _scratch(self, nbytes: int) -> np.ndarray:
        """This thread's decode buffer, grown as needed."""
        buf = getattr(self._local, "scratch", None)
        if buf is None or buf.size < nbytes:
            buf = self._local.scratch = np.empty(max(nbytes, CHUNK_BYTES), np.uint8)
        return buf

    def close(self) -> None:
        self.workers.shutdown(wait=True, cancel_futures=True)
