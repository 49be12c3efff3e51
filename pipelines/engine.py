"""Running fastload's compiled kernels over batches: what they write for a spec, and the worker
threads that compute each batch in parts and hand batches out in order.

Used by the ffcv backend (decode + resample per sample) and by the DALI backend on CPU
(resample the regions DALI decoded). Each part is one compiled call that releases the GIL,
so ``num_workers`` threads use ``num_workers`` cores.
"""
from __future__ import annotations

from collections import deque
from concurrent.futures import ThreadPoolExecutor, wait
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator, TypeVar

import numpy as np
import torch

from fastload.spec import RandomCrop

from .native import FILTER_CODES, PADDING_CODES

T = TypeVar("T")
_NO_NORMALIZE = (np.ones(3, np.float32), np.zeros(3, np.float32))


@dataclass(frozen=True)
class KernelOutput:
    """What the resampling kernel (``_resample.c``) writes for a spec: its filter and
    padding codes, and either uint8 NHWC or float32 ``level * scale - shift`` (NCHW when the
    spec's layout is NCHW)."""
    filter: int
    pad_mode: int
    fused: bool
    chw: bool
    scale: np.ndarray
    shift: np.ndarray
    shape: tuple[int, int, int]   # one image
    dtype: torch.dtype

    @classmethod
    def of(cls, spec, normalize) -> "KernelOutput":
        """``normalize``: (scale[3], shift[3]) to fuse, or None for uint8 output."""
        fused = normalize is not None
        scale, shift = (tuple(np.asarray(v, np.float32) for v in normalize) if fused else _NO_NORMALIZE)
        chw = fused and spec.layout == "NCHW"
        h, w = spec.size
        return cls(filter=FILTER_CODES[spec.interpolation],
                   pad_mode=PADDING_CODES[spec.geometry.padding_mode] if isinstance(spec.geometry, RandomCrop) else 0,
                   fused=fused, chw=chw, scale=scale, shift=shift, shape=(3, h, w) if chw else (h, w, 3),
                   dtype=torch.float32 if fused else torch.uint8)


class PartWorkers:
    """``num_workers`` threads; each batch is split into one part per thread, so a batch is ready
    in 1/num_workers of one thread's time and the last batch of an epoch keeps every thread busy
    (as raw FFCV's ``prange`` over a batch does)."""

    def __init__(self, num_workers: int, name: str):
        self.num_workers = max(1, num_workers)
        self.pool = ThreadPoolExecutor(self.num_workers, thread_name_prefix=name)

    def in_order(self, jobs: Iterable[tuple[int, Callable[[int, int], None], T]], jobs_block: bool = False
                 ) -> Iterator[T]:
        """``jobs``: per batch (samples n, ``work(lo, hi)`` that computes samples lo..hi, result).
        Yields each result once its parts are done, in order, keeping the threads busy and one
        batch ready ahead. ``jobs_block``: taking a job may wait (DALI's next decoded batch), so
        none is taken while a batch is ready, nor before the epoch's first batch is out (nothing
        else is running: it is nearly ready). Closing the generator drops queued parts and waits
        for running ones (they write into buffers the caller may reuse)."""
        jobs, in_flight, first = iter(jobs), deque(), True
        try:
            while True:
                while len(in_flight) <= self.num_workers and not (
                        jobs_block and in_flight and (first or _done(in_flight[0][0]))):
                    job = next(jobs, None)
                    if job is None:
                        break
                    n, work, result = job
                    in_flight.append((self._submit(n, work), result))
                if not in_flight:
                    return
                parts, result = in_flight.popleft()
                for part in parts:
                    part.result()
                first = False
                yield result
        finally:
            parts = [part for queued, _ in in_flight for part in queued]
            for part in parts:
                part.cancel()
            wait(parts)
            if hasattr(jobs, "close"):
                jobs.close()

    def _submit(self, n: int, work: Callable[[int, int], None]):
        bounds = np.linspace(0, n, min(n, self.num_workers) + 1).astype(int)
        return [self.pool.submit(work, int(lo), int(hi)) for lo, hi in zip(bounds[:-1], bounds[1:])]

    def close(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)


def _done(parts) -> bool:
    return all(part.done() for part in parts)
