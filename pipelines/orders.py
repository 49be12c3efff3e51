"""An epoch's order across ranks: global random, or shard-aware for data larger than a node's
cache; and the remainder of an interrupted epoch dealt to another number of ranks.

Every order is a *global sequence* G, a pure function of (seed, epoch, world size, dataset):
rank r reads ``G[r::world_size]`` in batches of the per-rank batch size. So after ``b`` steps of
a global batch ``B``, the ranks together have consumed exactly ``G[:b * B]``, whatever they are,
and an elastic resume deals ``G[b * B:]`` (each sample once) to the new ranks.

- ``"random"``: ``DistributedSampler``'s order (a permutation, padded with its own first samples
  or cut to a multiple of the world size): every rank draws from the whole dataset.
- ``"shards"``: the units (TFRecord shards, .beton chunks) in a random order, split into one
  contiguous block of samples per rank, and each block shuffled within windows of
  ``window_units`` units: a rank reads about 1/world of the units, a window at a time, so a
  node's cache holds its ranks' windows (Mosaic's py1b, litdata's chunk permutation + shuffle).
"""
from __future__ import annotations

import numpy as np

from .sampling import ORDER_STREAM, deal, rank_share, rng_for

ORDERS = ("random", "shards")  # the global sequences
# what FastLoader(order=...) takes: 'auto' picks one of ORDERS; 'sequential' is the dataset's own order
ORDER_CHOICES = ("auto", *ORDERS, "sequential")


def global_order(n: int, *, kind: str, shuffle: bool, seed: int, epoch: int, world_size: int, drop_last: bool,
                 units: np.ndarray | None = None, window_units: int = 8) -> np.ndarray:
    """The epoch's global sequence (see the module's docstring); ``units``: each sample's unit."""
    rng = rng_for(seed, epoch, ORDER_STREAM)
    total = rank_share(n, world_size, drop_last) * world_size
    if not shuffle or kind == "random":
        order = rng.permutation(n) if shuffle else np.arange(n)
        return deal(order, total)
    if kind != "shards":
        raise ValueError(f"order kind {kind!r} is invalid: allowed {ORDERS}")
    units = np.asarray(units, np.int64)
    unit_rank = np.empty(int(units.max()) + 1 if n else 0, np.int64)
    present = np.unique(units)
    unit_rank[present] = rng.permutation(len(present))
    within = rng.random(n)
    by_unit = np.lexsort((within, unit_rank[units]))  # units in random order, samples shuffled in each
    stream = deal(by_unit, total)
    share = total // world_size if world_size else 0
    per_unit = max(1, n // max(1, len(present)))
    window = max(1, window_units * per_unit)
    out = np.empty(total, np.int64)
    for r in range(world_size):
        block = stream[r * share:(r + 1) * share].copy()
        for start in range(0, len(block), window):  # a window of units, its samples mixed
            piece = block[start:start + window]
            block[start:start + window] = piece[rng.permutation(len(piece))]
        out[r::world_size] = block
    return out


def remainder(sequence: np.ndarray, consumed: int, world_size: int, drop_last: bool) -> np.ndarray:
    """What is left of an epoch whose global sequence is ``sequence`` after ``consumed`` samples,
    as a new global sequence for ``world_size`` ranks: every sample not yet seen, once, in the
    order it had, with the remainder rule applied to what is left."""
    seen = np.zeros(int(sequence.max()) + 1 if len(sequence) else 0, bool)
    seen[sequence[:consumed]] = True
    rest = sequence[consumed:]
    _, first = np.unique(rest, return_index=True)
    rest = rest[np.sort(first)]  # each sample once (padding repeats dropped)
    rest = rest[~seen[rest]]
    return deal(rest, rank_share(len(rest), world_size, drop_last) * world_size)


def order_quality(order: np.ndarray, labels: np.ndarray, units: np.ndarray, batch_size: int) -> dict:
    """Mean distinct labels and distinct units per batch of one rank's ``order``."""
    labels = np.asarray(labels)
    if labels.ndim > 1:  # multi-label: a sample's first id
        labels = labels[:, 0]
    nb = len(order) // batch_size
    if nb == 0:
        return {"labels_per_batch": 0.0, "units_per_batch": 0.0, "batches": 0}
    batches = order[:nb * batch_size].reshape(nb, batch_size)
    distinct = lambda a: float(np.mean([len(np.unique(row)) for row in a]))  # noqa: E731
    return {"labels_per_batch": distinct(labels[batches]), "units_per_batch": distinct(units[batches]),
            "batches": nb}


def shard_order_quality(mine: np.ndarray, labels: np.ndarray, units: np.ndarray, batch_size: int, seed: int,
                        name: str) -> dict:
    """Distinct labels per batch of a rank's shard-aware order ``mine`` (positions of the selected
    samples, whose ``labels`` and ``units`` are given) and of a global permutation's. Rows sorted
    by class (an image folder converted with --keep-order, or before conversions shuffled by default) put a class or
    two in each unit and so in each batch: said, with the remedy."""
    permuted = np.random.default_rng(seed).permutation(len(labels))[:len(mine)]
    q = {"labels_per_batch": order_quality(mine, labels, units, batch_size)["labels_per_batch"],
         "global_labels_per_batch": order_quality(permuted, labels, units, batch_size)["labels_per_batch"]}
    if q["labels_per_batch"] < 0.9 * q["global_labels_per_batch"]:
        import warnings
        warnings.warn(f"{name}: order='shards' gives {q['labels_per_batch']:.1f} distinct labels a batch, a global "
                      f"order {q['global_labels_per_batch']:.1f}: its rows are sorted by class. Convert it again "
                      "without --keep-order (rows are written in a seeded random order), or pass order='random'",
                      RuntimeWarning)
    return q
