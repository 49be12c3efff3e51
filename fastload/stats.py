"""What the training loop waited for: the loader's meter of the loop it feeds, and its verdict.

Always on. Per batch the meter reads the clock twice: when the loop asks for a batch and when it
gets it (the wait), and again when it asks for the next (its step: the model's work). Around that,
per epoch, this process's and its workers' CPU time, the cores it may use, and for a remote
dataset the bytes and seconds spent waiting on the store. Cost, measured by
``scripts/bench_stats.py`` here: 0.6 us a batch and 0.2 ms an epoch, nothing per sample.

:func:`verdict` turns an epoch's figures into one line a person can act on: input-bound or
compute-bound, by how much, and the likely cause, in this order: the store (a cold or too small
cache), a rank slower than the others, augmentations on the CPU, too few workers, decoding at
the machine's limit (with the cores it would take).
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field

from .cpu import cpu_seconds, usable_cores

INPUT_BOUND = 0.10      # the loop waited more than this fraction of its time: input-bound
SLOW_RANK_MARGIN = 0.15  # a rank that waits this much more than the median of the others is the slow one


@dataclass
class LoaderStats:
    """One epoch of a FastLoader as the training loop saw it (``loader.stats()``; ``to_dict()``
    for JSON). Times in seconds, over the batches handed out so far."""
    epoch: int
    batches: int = 0
    images: int = 0
    wait_s: float = 0.0       # the loop blocked in next(): the loader was not ready
    first_wait_s: float = 0.0  # of it, for the epoch's first batch (the epoch's start)
    step_s: float = 0.0       # the loop's own work between batches (the model's step)
    batch_ops_s: float = 0.0  # of the wait: fastload's batch ops (augmentations, MixUp, normalization)
    cpu_s: float = 0.0        # CPU time of this process and its workers (the model's too, on a CPU run)
    cores: int = 1            # cores this process may use
    num_workers: int = 0
    store_bytes: int = 0      # a remote dataset's bytes downloaded during the epoch
    store_wait_s: float = 0.0  # seconds during which reading waited on the store
    cache_limit: int | None = None
    dataset_bytes: int = 0
    rank: int = 0
    rank_wait_fractions: list[float] | None = None  # every rank's, under torch.distributed (epoch end)
    done: bool = False        # the epoch ran to its end
    verdict: str = ""
    hints: dict = field(default_factory=dict)  # what the verdict knew: device, augmentations on CPU

    @property
    def seconds(self) -> float:
        return self.wait_s + self.step_s

    @property
    def wait_fraction(self) -> float:
        return self.wait_s / self.seconds if self.seconds > 0 else 0.0

    @property
    def images_per_s(self) -> float:
        """Images the loop received per second of its time (its training throughput)."""
        return self.images / self.seconds if self.seconds > 0 else 0.0

    @property
    def slowest_rank(self) -> int | None:
        if not self.rank_wait_fractions or len(self.rank_wait_fractions) < 2:
            return None
        return max(range(len(self.rank_wait_fractions)), key=self.rank_wait_fractions.__getitem__)

    @classmethod
    def combine(cls, epochs: list["LoaderStats"]) -> "LoaderStats":
        """Several epochs' figures as one (summed; the verdict of the whole)."""
        sums = ("batches", "images", "wait_s", "first_wait_s", "step_s", "batch_ops_s", "cpu_s", "store_bytes",
                "store_wait_s")
        last = epochs[-1]
        out = cls(**{**asdict(last), **{k: sum(getattr(e, k) for e in epochs) for k in sums}})
        out.verdict = verdict(out)
        return out

    def to_dict(self) -> dict:
        d = asdict(self)
        d.update(wait_fraction=self.wait_fraction, images_per_s=self.images_per_s, slowest_rank=self.slowest_rank,
                 seconds=self.seconds)
        return d


class LoopMeter:
    """The meter FastLoader keeps: one :class:`LoaderStats` per epoch iterated."""

    def __init__(self, **context):
        self.context = context  # LoaderStats fields the loader knows: num_workers, rank, cache_limit...
        self.history: list[LoaderStats] = []
        self.current: LoaderStats | None = None

    def metered(self, batches, epoch: int, store_counters, expected: int):
        """``batches`` (the loader's generator of ``expected`` ready batches), timed around each yield."""
        s = self.current = LoaderStats(epoch=epoch, cores=usable_cores(), **self.context)
        self.history = [*self.history[-99:], s]
        # what the epoch's end needs: its batch count, and the CPU and store readings at its start
        self._expected, self._store_counters = expected, store_counters
        self._cpu0, self._store0 = cpu_seconds(), store_counters()
        asked = time.perf_counter()
        for batch in batches:
            got = time.perf_counter()
            s.wait_s += got - asked
            if not s.batches:
                s.first_wait_s = got - asked
            s.batches += 1
            s.images += len(batch[1])
            yield batch
            asked = time.perf_counter()
            s.step_s += asked - got
        self._finish(s, gather=True)

    def _finish(self, s: LoaderStats, gather: bool) -> None:
        bytes0, store0 = self._store0
        s.cpu_s = cpu_seconds() - self._cpu0
        store_bytes, store_s = self._store_counters()
        s.store_bytes, s.store_wait_s = store_bytes - bytes0, store_s - store0
        s.done = True
        # every rank ends its epoch here together (DDP's ranks take as many batches): one collective
        s.rank_wait_fractions = _gather_wait_fractions(s) if gather else None
        s.verdict = verdict(s)

    def stats(self) -> LoaderStats | None:
        s = self.current
        if s is None or s.done:
            return s
        if s.batches >= self._expected:
            # every batch handed out, and the loop will not ask again (Lightning stops at len(loader)):
            # the epoch is done; its last step, not seen, is taken as long as the others on average
            s.step_s += s.step_s / max(1, s.batches - 1)
            self._finish(s, gather=False)
        else:
            s.verdict = verdict(s)
        return s


def _gather_wait_fractions(s: LoaderStats) -> list[float] | None:
    """Every rank's wait fraction, at the end of an epoch every rank runs to (DDP's ranks do)."""
    import torch.distributed as dist
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() < 2:
        return None
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, round(s.wait_fraction, 4))
    return [float(x) for x in out]


def verdict(s: LoaderStats) -> str:
    """One line: input-bound or compute-bound, by how much, and the likely cause with its remedy."""
    if s.batches == 0:
        return "no batches yet"
    share = f"training waited for data {s.wait_fraction:.0%} of the time ({s.wait_s:.1f} s of {s.seconds:.1f} s)"
    slow = s.slowest_rank
    if slow is not None:
        others = sorted(f for r, f in enumerate(s.rank_wait_fractions) if r != slow)
        if s.rank_wait_fractions[slow] - others[len(others) // 2] > SLOW_RANK_MARGIN:
            return (f"input-bound on rank {slow}: it waited for data {s.rank_wait_fractions[slow]:.0%} of the time, "
                    f"the others {others[-1]:.0%} at most, and the job runs at its pace: look at that rank's node "
                    "(its cores, disk or network)")
    if s.wait_fraction < INPUT_BOUND:
        fed = s.images_per_s / max(1e-9, 1 - s.wait_fraction)  # what the step alone would allow
        return (f"compute-bound: {share}; the loop runs at {s.images_per_s:,.0f} img/s and the loader keeps up "
                f"(the model's step alone runs at {fed:,.0f} img/s)")
    head = f"input-bound: {share}, {s.images_per_s:,.0f} img/s"
    if s.store_wait_s > 0.5 * s.wait_s:
        if s.cache_limit is not None and s.cache_limit < s.dataset_bytes:
            why = (f"the cache (cache_limit={s.cache_limit / 2**30:.1f} GiB) holds less than the dataset "
                   f"({s.dataset_bytes / 2**30:.1f} GiB): raise cache_limit, or put the cache on a larger disk")
        else:
            why = "the cache was cold: the next epochs read it from local disk"
        return (f"{head}; reading waited on the store {s.store_wait_s:.1f} s ({s.store_bytes / 2**20:,.0f} MB "
                f"downloaded): {why}")
    if s.hints.get("augment_on_cpu") and s.batch_ops_s > 0.5 * s.wait_s:
        return (f"{head}; fastload's augmentations took {s.batch_ops_s:.1f} s of it on the CPU: "
                "device='cuda' runs them on the GPU")
    if s.first_wait_s > 0.5 * s.wait_s:
        return (f"{head}; most of it is the epoch's start ({s.first_wait_s:.2f} s for its first batch, {s.batches} "
                "batches an epoch): a short epoch pays its start each time; longer epochs amortize it")
    busy = s.cpu_s / max(1e-9, s.seconds)  # cores kept busy
    step_rate = s.images / max(1e-9, s.step_s)  # what the model could take
    if busy < 0.8 * s.cores:
        if s.num_workers < s.cores:
            return (f"{head}; num_workers={s.num_workers} of {s.cores} cores, {busy:.1f} cores busy: raise "
                    f"num_workers (e.g. num_workers={s.cores})")
        return (f"{head}; only {busy:.1f} of {s.cores} cores are busy: reading waits on the disk, or on this "
                "process's own thread (the loop's work, batch ops)")
    limit = f"{head}; decoding keeps {busy:.1f} of {s.cores} cores busy, the machine's limit"
    if s.step_s < 0.05 * s.wait_s:  # a loop that does next to nothing between batches (a benchmark)
        return f"{limit}: the loop itself does next to nothing, so this is the loader's own pace"
    need = max(s.cores, busy) * step_rate / max(1e-9, s.images_per_s)
    return (f"{limit}: the model could take {step_rate:,.0f} img/s, which would take about {need:.0f} cores (or a "
            "smaller resolution, or DALI on the GPU)")
