"""The DALI backend on CPU, for JPEG storage: DALI decodes, fastload's kernel resamples.

DALI decodes only the source rows and columns each output window reads (``decoders.image_slice``,
fused decode + crop, libjpeg-turbo on DALI's threads, prefetched); fastload's kernel
(``_resample.c``, through ctypes: no numba here) resamples, flips and normalizes those regions
straight into the batch on ``num_workers`` threads of its own (``engine.py``). DALI's CPU decode
is PIL's, bit for bit, so the batches are the ffcv backend's; and one fused pass replaces DALI's
``resize`` + ``crop_mirror_normalize`` (measured on 2 cores: 0.53 ms of geometry per ImageNet
photo in DALI, 0.16 ms in the kernel).
"""
from __future__ import annotations

import functools
from typing import Iterator

import numpy as np
import torch

from . import native
from .base import BackendOptions
from .buffers import BatchBuffers
from .dali_engine import DALIEngine
from .engine import KernelOutput, PartWorkers
from .sampling import H, W, X0, Y0, crop_rows


def _region_columns(heights, widths, out: KernelOutput, size, idx, p: np.ndarray) -> dict:
    """Per sample, the image region (top, left, height, width) its output window reads
    (``_resample.c``'s ``fl_source_regions``, the ffcv backend's rule), as DALI's slice arguments."""
    rows = np.ascontiguousarray(p, np.int64)
    regions = np.empty((len(rows), 4), np.int64)
    h, w = np.ascontiguousarray(heights[idx]), np.ascontiguousarray(widths[idx])
    native.LIB.fl_source_regions(rows.ctypes.data, len(rows), h.ctypes.data, w.ctypes.data, *size, out.filter,
                                 out.pad_mode, regions.ctypes.data)
    return {"box_anchor": regions[:, :2].astype(np.float32), "box_shape": regions[:, 2:].astype(np.float32),
            "regions": regions, "rows": rows}


class DALIRegions(DALIEngine):
    """``normalize`` fused, in fastload's kernel."""

    def __init__(self, reader, spec, options: BackendOptions):
        native.require("backend='dali' on the CPU")  # before DALI builds anything
        self.kernel = KernelOutput.of(spec, options.normalize if self.fuses_normalization else None)
        super().__init__(reader, spec, options)
        self.workers = PartWorkers(options.num_workers, "fastload-dali")
        self.buffers = BatchBuffers(capacity=options.num_workers + 4)  # in flight, ready, and the caller's

    def feed(self):
        columns = functools.partial(_region_columns, self.reader.heights.astype(np.int64),
                                    self.reader.widths.astype(np.int64), self.kernel, self.spec.size)
        return ("box_anchor", "box_shape"), columns

    def graph(self, stored, columns, index):
        from nvidia.dali import fn, types
        regions = fn.decoders.image_slice(stored, columns["box_anchor"], columns["box_shape"], axes=[0, 1],
                                          normalized_anchor=False, normalized_shape=False, device="cpu",
                                          output_type=types.RGB)
        return regions, index

    def decode_stage(self) -> "DALIRegions":
        return _DecodeStage(self.reader, self.spec, self.options)

    def kernel_rows(self, rows: np.ndarray, regions: np.ndarray) -> np.ndarray:
        """The geometry rows the kernel applies to the decoded regions: the epoch's."""
        return rows

    def run_epoch(self, order: np.ndarray, params: np.ndarray) -> Iterator[tuple[torch.Tensor, np.ndarray]]:
        if not self._has_batches(order):
            return iter(())
        return self.workers.in_order(self._resample_jobs(self._outputs(order, params)), jobs_block=True)

    def _resample_jobs(self, outputs):
        """Per batch of regions DALI decoded: the work of resampling them into a batch the caller
        owns (for :meth:`PartWorkers.in_order`). The work holds DALI's output until it has run."""
        k = self.kernel
        for regions, index, (_, _, columns) in outputs:
            n = len(index)
            placed = columns["regions"]
            rows = np.ascontiguousarray(self.kernel_rows(columns["rows"], placed), np.int64)
            # the kernel reads each region by address: its shape must be the one asked for
            if not np.array_equal(np.asarray(regions.shape(), np.int64).reshape(n, 3)[:, :2], placed[:, 2:]):
                raise RuntimeError(f"DALI decoded regions of other shapes than asked: {regions.shape()[:4]} ...")
            addresses = np.array([regions[i].data_ptr() for i in range(n)], np.uint64)
            out = self.buffers.empty((n, *k.shape), k.dtype)

            def work(lo, hi, regions=regions, addresses=addresses, placed=placed, rows=rows, out=out):
                # one C call per part, without the GIL (ctypes releases it)
                failed = native.LIB.fl_resample_regions(
                    addresses[lo:].ctypes.data, placed[lo:].ctypes.data, rows[lo:].ctypes.data, hi - lo,
                    k.pad_mode, k.filter, out[lo:].data_ptr(), *self.spec.size, k.chw, k.fused,
                    k.scale.ctypes.data, k.shift.ctypes.data)
                if failed & 3 == 1:
                    raise MemoryError("fastload's resampling kernel ran out of memory")
                if failed:  # a bug: DALI decoded the regions fl_source_regions named, checked above
                    raise RuntimeError(f"the resampling kernel was given a region that does not hold sample "
                                       f"{int(index[lo + (failed >> 2)])}'s window")
            yield n, work, (out, index)

    def close(self) -> None:
        self.workers.close()
        super().close()


class _DecodeStage(DALIRegions):
    """``fastload bench``'s decode stage: DALI decodes the same regions; the kernel cuts each
    one's top-left window, unresampled, as uint8."""
    fuses_normalization = False

    def kernel_rows(self, rows, regions):
        boxes = np.zeros_like(rows)  # each region as the box
        boxes[:, Y0], boxes[:, X0], boxes[:, H], boxes[:, W] = regions.T
        return crop_rows(boxes)
