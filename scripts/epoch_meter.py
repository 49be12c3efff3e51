"""One epoch of any loader, timed: img/s, first batch, distinct labels per batch and the store's
bytes. Shared by bench_streaming.py's fastload child and streaming_peers.py (the peers' venv), so
it needs only numpy and tests/store_proxy.py."""
from __future__ import annotations

import time

import numpy as np
from store_proxy import store_bytes


def measure_epoch(loader, since: float, endpoint: str | None) -> dict:
    """Iterate ``loader`` once; ``since``: when the clock for the first batch started (the
    loader's construction for a first epoch)."""
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
            "labels_per_batch": float(np.mean(full)), "bytes": store_bytes(endpoint, clear=True) if endpoint else 0}
