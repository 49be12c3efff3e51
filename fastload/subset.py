"""Which samples of a split a loader draws from: all, given indices, or those of given classes."""
from __future__ import annotations

import hashlib

import numpy as np


def select_samples(reader, indices=None, classes=None) -> np.ndarray:
    """Sample indices (int64) a loader draws from. ``indices``: ints of the split (repeats allowed:
    a sample listed twice is drawn twice) or a boolean mask; ``classes``: keep the samples with one
    of these labels (multi-label: any of them). Both given: the listed indices of those classes."""
    n = len(reader)
    if indices is None:
        chosen = np.arange(n, dtype=np.int64)
    else:
        raw = np.asarray(indices)
        if raw.dtype == bool:
            if raw.shape != (n,):
                raise ValueError(f"indices is a boolean mask of shape {raw.shape}: allowed shape ({n},), one "
                                 f"flag per sample of split {reader.split!r}")
            chosen = np.flatnonzero(raw)
        elif raw.ndim == 1 and (raw.size == 0 or np.issubdtype(raw.dtype, np.integer)):
            chosen = raw.astype(np.int64)
            bad = chosen[(chosen < 0) | (chosen >= n)]
            if bad.size:
                raise ValueError(f"indices {bad[:5].tolist()} are outside split {reader.split!r}: allowed 0..{n - 1}")
        else:
            raise ValueError(f"indices of dtype {raw.dtype} and shape {raw.shape} are invalid: allowed a 1-D "
                             "sequence of sample indices or a boolean mask")
    if classes is not None:
        wanted = np.unique(np.asarray(list(classes) if not np.isscalar(classes) else [classes], np.int64))
        num_classes = reader.manifest.num_classes
        bad = wanted[(wanted < 0) | (wanted >= num_classes)]
        if len(bad):
            raise ValueError(f"classes {bad[:5].tolist()} are not class ids of {reader.manifest.name}: allowed "
                             f"0..{num_classes - 1}")
        labels = reader.labels[chosen]
        hit = np.isin(labels, wanted)
        chosen = chosen[hit.any(axis=1) if hit.ndim == 2 else hit]
    if chosen.size == 0:
        raise ValueError(f"indices={_short(indices)}, classes={_short(classes)} select no sample of split "
                         f"{reader.split!r} ({n} samples)")
    return chosen


def subset_digest(indices: np.ndarray, n: int) -> str:
    """A short name of the selection for checkpoints: 'all', or a hash of the indices."""
    if len(indices) == n and np.array_equal(indices, np.arange(n)):
        return "all"
    return hashlib.sha256(np.ascontiguousarray(indices, np.int64).tobytes()).hexdigest()[:16]


def _short(value) -> str:
    if value is None or np.isscalar(value):
        return repr(value)
    items = np.asarray(value).ravel().tolist()
    return repr(items[:6])[:-1] + ", ...]" if len(items) > 6 else repr(items)
