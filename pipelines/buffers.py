"""Output batches the caller owns, recycled only once the caller has let go of them.

A fresh 38 MB batch (64 x 3 x 224 x 224 float32) costs ~10k page faults every time it is
allocated: measured here at 15-30 ms a batch, 10-20% of the loader's time. Libraries that
avoid it hand out the same buffer every iteration (ffcv's ring, DALI's iterator), so a batch
the user kept changes under them. Here a buffer returns to service only when no tensor and
no view of it is alive: ``torch.from_numpy`` storages hold a reference to their numpy array,
so the array's reference count says whether anything still uses it.

Buffers are torch's allocations, seen as numpy arrays: numpy asks the kernel for transparent huge
pages on each allocation of 4 MB or more (``madvise(MADV_HUGEPAGE)``). With THP on ``madvise``
(this machine's kernel, and Ubuntu's default), the huge-page faults of fresh batches took 30-35%
of a loader's CPU in its first epoch here (perf: ``clear_page_erms`` under the resampler's
stores; ImageNet photos, batch 256: 508 -> 805 img/s in a new process, 1.94 -> 1.25 CPU ms an image).
"""
from __future__ import annotations

import sys
import threading

import numpy as np
import torch

_NUMPY = {torch.float32: np.float32, torch.float16: np.float16, torch.uint8: np.uint8}


class BatchBuffers:
    def __init__(self, capacity: int):
        self.capacity = capacity  # buffers kept for reuse; beyond that, batches are plain allocations
        self.arrays: list[np.ndarray] = []
        self.lock = threading.Lock()

    def empty(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        """An uninitialized tensor that no one else holds."""
        np_dtype = np.dtype(_NUMPY[dtype])
        with self.lock:
            for array in self.arrays:
                # referrers: the list, this loop variable, getrefcount's argument
                if array.shape == shape and array.dtype == np_dtype and sys.getrefcount(array) <= 3:
                    return torch.from_numpy(array)
            array = torch.empty(shape, dtype=dtype).numpy()  # torch: no huge-page advice (above)
            if len(self.arrays) < self.capacity:
                self.arrays.append(array)
            else:  # the caller keeps many batches: stop pooling the surplus
                self.arrays = [a for a in self.arrays if sys.getrefcount(a) > 3] + [array]
                self.arrays = self.arrays[-self.capacity:]
            return torch.from_numpy(array)
