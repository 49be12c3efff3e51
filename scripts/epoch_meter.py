"""One epoch of any loader, timed: img/s, first batch, distinct labels per batch and the store's
bytes. Shared by bench_streaming.py's fastload child and streaming_peers.py (the peers' venv), so
it needs only numpy: the store's bytes come from the caller's ``bytes_read``."""
from __future__ import annotations

import time

from typing import Callable

import numpy as np


def measure_epoch(loader, since: float, bytes_read: Callable[[], int] | None = None) -> dict:
    """Iterate ``loader`` once; ``since``: when the clock for the first batch started (the
    loader's construction for a first epoch); ``bytes_read``: the store's bytes since last asked."""
    n, first, labels = 0, None, []
    t = time.perf_counter()
    for batch in loader:
        y = np.asarray(batch[1])
        if first is None:
            first = time.perf_counter() - since
        n += len(y)
        labels.append(len(np.unique(y)))
    dt = time.perf_counter() - t
    full = labels[:-1] if len(labels) > 1 else labels  # the last batch may be short
    return {"img_s": n / dt, "seconds": dt, "first_batch_s": first, "images": n,
            "labels_per_batch": float(np.mean(full)), "bytes": bytes_read() if bytes_read else 0}
