"""The ffcv backend: FFCV ``.beton`` storage, decoded and resampled by fastload's own engine.

The ``.beton`` file is what ffcv's writer produced (stock ffcv reads it); the records index
says where each JPEG lives in it, so this engine memory-maps the file and reads JPEGs
directly, with no ffcv ``Loader``. Why not ffcv's Loader: it compiled its pipeline for
several seconds per loader, had to be patched in five private places (thread counts,
traversal order, buffer allocation, error reporting), decoded with the fast DCT (1 level
off PIL), and kept an abandoned epoch's thread and buffers alive.

Per sample, on ``num_workers`` threads (each takes whole batches; the GIL is released in
both native calls):
1. decode only the source rows and columns the output window reads (``kernels.source_window``),
   with libjpeg's accurate DCT (``jpeg.py``): PIL's pixels, bit for bit;
2. resample that region with PIL's antialiased bilinear filter, flip, and (fused) normalize
   straight into the batch (``kernels.resample_window``, numba, cached on disk).
Batches are fresh tensors the caller owns.
"""
from __future__ import annotations

from collections import deque
from concurrent.futures import ThreadPoolExecutor, wait
from typing import Iterator

import numpy as np
import torch

from fastload.spec import RandomCrop

from .base import Backend, BackendOptions
from .jpeg import JPEGDecodeError, thread_decoder
from .kernels import PADDING_CODES, resample_window, source_window
from .sampling import FLIP, H, LEFT, OUT_H, OUT_W, TOP, W, X0, Y0, epoch_batches

_NO_NORMALIZE = (np.ones(3, np.float32), np.zeros(3, np.float32))


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
        self.heights, self.widths = reader.heights, reader.widths

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
        out = torch.empty((len(index), *self.shape), dtype=self.dtype)
        array = out.numpy()
        for k in range(len(index)):
            try:
                self._sample(int(index[k]), rows[k], array[k])
            except JPEGDecodeError as e:
                raise self.reader.sample_error(int(index[k]), str(e)) from None
        return out

    def _sample(self, i: int, p: np.ndarray, dst: np.ndarray) -> None:
        dh, dw = self.spec.size
        y0, x0, h, w = int(p[Y0]), int(p[X0]), int(p[H]), int(p[W])
        out_h, out_w, top, left = int(p[OUT_H]), int(p[OUT_W]), int(p[TOP]), int(p[LEFT])
        r0, r1, c0, c1 = source_window(h, w, out_h, out_w, top, left, dh, dw)
        if r1 <= r0 or c1 <= c0:  # the window is all padding
            region, oy, ox = np.zeros((1, 1, 3), np.uint8), 0, 0
        else:
            region, col0 = thread_decoder().decode(self.reader.jpeg(i), int(self.widths[i]),
                                                   y0 + r0, y0 + r1, x0 + c0, x0 + c1)
            oy, ox = -r0, x0 - col0  # box pixel (y, x) is region[oy + y, ox + x]
        if not self.resample:  # decode stage: the decoded window, no resampling
            h, w, out_h, out_w, top, left, oy, ox = r1 - r0, c1 - c0, r1 - r0, c1 - c0, 0, 0, 0, c0 + ox
        resample_window(region, oy, ox, h, w, out_h, out_w, top, left, bool(p[FLIP]), self.pad_mode, dst, dh, dw,
                        self.chw, self.fused, self.scale, self.shift)

    def close(self) -> None:
        self.workers.shutdown(wait=True, cancel_futures=True)

    def __del__(self):
        workers = getattr(self, "workers", None)
        if workers is not None:
            workers.shutdown(wait=False, cancel_futures=True)
