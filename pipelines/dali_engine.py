"""What both DALI engines share (:class:`DALIEngine`): a graph declared once and fed by an external
source with each batch's stored bytes (read where they are mapped, through the records index)
and the columns the graph consumes, computed from the batch's geometry rows. FastLoader decides
the order, so epochs are exact (every sample once, the last batch partial or dropped as asked).
The engines are ``dali_regions.py`` and ``dali_graph.py``; ``dali.py`` picks one.
"""
from __future__ import annotations

import os
import threading
from abc import abstractmethod
from collections import deque
from typing import Callable

import numpy as np

from fastload.spec import RandomCrop

from .base import Backend, BackendOptions
from .samples import SampleChecks
from .sampling import plan_batches

PREFETCH = 2  # DALI's prefetch_queue_depth

# DALI's own pool for its host buffers under this size (its DALI_MALLOC_POOL_THRESHOLD; 0, DALI's
# default, leaves them to malloc). A decoded region is a fresh buffer of a new size every batch:
# from glibc, whose mmap threshold rises to each block freed, they fragment DALI's threads' arenas,
# and a loader's memory wandered by 25-30 MB over 300 short epochs (the drift #34 saw); from the
# pool, it stays flat once warm, and DALI runs 5% faster here (no fresh pages per region). Regions of
# larger photos still go to malloc: a bigger pool fluctuated as much as none.
HOST_POOL_BELOW = "1M"

# DALI's resampling filter per spec interpolation, and its radius in source pixels when not downscaling
DALI_FILTERS = {"bilinear": ("INTERP_LINEAR", 1.0), "bicubic": ("INTERP_CUBIC", 2.0),
                "lanczos": ("INTERP_LANCZOS3", 3.0), "nearest": ("INTERP_NN", 1.0)}


class _EpochSource:
    """Iterable the external source re-reads after each ``reset()``: one epoch of batches.

    ``fields`` names what the graph consumes (DALI warns about outputs left unused); ``columns``
    computes them from a batch's sample indices and geometry rows."""

    def __init__(self, reader, batch_size, drop_last, fields: tuple[str, ...], columns: Callable,
                 checks: SampleChecks):
        self.reader, self.batch_size, self.drop_last = reader, batch_size, drop_last
        self.fields, self.columns, self.checks = fields, columns, checks
        self.order = np.zeros(0, np.int64)
        self.params = None
        # (indices, rows, columns) of batches handed to DALI and not yet returned: in DALI's order
        # (to resample them on CPU, and to name a failing sample)
        self.fed = deque()
        # what DALI reads without copying (no_copy): kept alive until its iteration has run
        self.alive = deque(maxlen=PREFETCH + 2)

    def __iter__(self):
        self.fed.clear()
        raw = self.reader.codec == "raw"
        copies = self.reader.volatile
        for idx, rows in plan_batches(self.order, self.params, self.batch_size, self.drop_last):
            # DALI's decoders are handed only bytes that pass (samples.py): views of a local
            # dataset, checked copies of bytes that may change under the reader (a cache that another
            # rank evicts from)
            if copies:
                stored = [self._shaped(i, self.checks.read_checked(i)) for i in idx]
            else:
                self.checks(idx)
                stored = self.reader.stored_batch(idx, shaped=raw)
            columns = self.columns(idx, rows)
            self.fed.append((idx, rows, columns))
            batch = (stored, *(np.ascontiguousarray(columns[f]) for f in self.fields),
                     np.ascontiguousarray(idx, np.int64))
            self.alive.append(batch)
            yield batch


    def _shaped(self, i: int, data: np.ndarray) -> np.ndarray:
        """A raw split's bytes as (height, width, 3) pixels, as ``SplitReader.pixels`` gives them."""
        if self.reader.codec != "raw":
            return data
        return data.reshape(int(self.reader.heights[i]), int(self.reader.widths[i]), 3)


class _Run:
    """One pipeline and the source that feeds it: what one live epoch uses."""

    def __init__(self, source: _EpochSource, pipe):
        self.source, self.pipe = source, pipe


class DALIEngine(Backend):
    """A DALI pipeline over one split, fed by :class:`_EpochSource`. An engine says what the
    graph consumes per batch (:meth:`feed`) and what it computes (:meth:`graph`).

    Each live epoch has a pipeline of its own, so two iterators of one loader each get their full
    epoch; a pipeline whose epoch ran to its end serves the next, one whose epoch was abandoned is
    dropped (nothing of it is left in a prefetch queue)."""
    name = "dali"
    fuses_normalization = True
    interpolations = tuple(DALI_FILTERS)
    gpu = False  # nvJPEG (device='mixed') and GPU ops

    def __init__(self, reader, spec, options: BackendOptions):
        if isinstance(spec.geometry, RandomCrop) and spec.geometry.padding_mode != "constant":
            raise ValueError(f"random_crop.padding_mode={spec.geometry.padding_mode!r} is not supported by "
                             "backend 'dali' (its slice pads with a constant only): use 'constant' or "
                             "backend='ffcv'/'reference'")
        super().__init__(reader, spec, options)
        self.batch_size, self.num_workers = options.batch_size, max(1, options.num_workers)
        self.fields, self.columns = self.feed()
        self.checks = SampleChecks(reader, options.check_samples)
        self._idle: list[_Run] = []  # pipelines whose epoch finished, ready for another
        self._lock = threading.Lock()

    @property
    def decode_device(self) -> str:
        return "mixed" if self.gpu else "cpu"

    @abstractmethod
    def feed(self) -> tuple[tuple[str, ...], Callable]:
        """(names of the per-sample columns the graph consumes, ``columns(indices, rows) -> dict``)."""

    @abstractmethod
    def graph(self, stored, columns: dict, index):
        """The graph's outputs, (images, index), from the external source's ``stored`` samples
        (uint8 bytes, or HWC pixels for raw storage), ``columns`` by name, and the sample indices."""

    def build(self) -> None:
        """Build a pipeline now (the factory checks that the GPU's can be built) and keep it ready."""
        run = self._new_run(np.zeros(0, np.int64), None)
        with self._lock:
            self._idle.append(run)

    def _new_run(self, order: np.ndarray, params: np.ndarray | None) -> _Run:
        # read once, when DALI makes its first host buffer; a user's own setting (0 included) is kept
        os.environ.setdefault("DALI_MALLOC_POOL_THRESHOLD", HOST_POOL_BELOW)
        from nvidia.dali import fn, pipeline_def, types
        device_id = (self.options.device.index or 0) if self.gpu else None
        source = _EpochSource(self.reader, self.batch_size, self.options.drop_last, self.fields, self.columns,
                              self.checks)
        source.order, source.params = order, params

        @pipeline_def(batch_size=self.batch_size, num_threads=self.num_workers, device_id=device_id,
                      seed=self.options.seed, prefetch_queue_depth=PREFETCH, exec_async=True, exec_pipelined=True,
                      exec_dynamic=True)  # outputs never reused: batches and regions stay valid while held
        def pipeline():
            raw = self.reader.codec == "raw"  # samples arrive as HWC pixels: nothing to decode
            # JPEGs: DALI reads the stored bytes where they are mapped (copying each ~100 KB JPEG in
            # the feeding thread cost ~4% of ImageNet train throughput on 2 cores; _EpochSource keeps
            # them alive). Raw CIFAR pixels (3 KB): copied, since DALI's per-sample cost of
            # borrowed buffers is larger than the copy (no_copy: 36k against 49k img/s)
            outputs = fn.external_source(
                source=source, num_outputs=len(self.fields) + 2, batch=True, cycle="raise", no_copy=not raw,
                dtype=[types.UINT8] + [types.INT32 if f == "flip" else types.FLOAT for f in self.fields]
                + [types.INT64], layout=["HWC" if raw else ""] + [""] * (len(self.fields) + 1))
            return self.graph(outputs[0], dict(zip(self.fields, outputs[1:-1])), outputs[-1])

        pipe = pipeline()
        pipe.build()
        return _Run(source, pipe)

    def _outputs(self, order: np.ndarray, params: np.ndarray):
        """DALI's outputs for one epoch: (images, sample indices, what the source fed for them)."""
        with self._lock:
            run = self._idle.pop() if self._idle else None
        if run is None:
            run = self._new_run(order, params)
        else:  # a pipeline whose last epoch ran to its end: its source starts over with this one
            run.source.order, run.source.params = order, params
            run.pipe.reset()
        finished = False
        try:
            while True:
                try:
                    images, index = run.pipe.run()
                except StopIteration:
                    break
                except RuntimeError as e:
                    raise self._sample_error(run.source, e) from e
                yield images, np.asarray(index.as_array()).reshape(-1), run.source.fed.popleft()
            finished = True
        finally:
            if finished:
                with self._lock:
                    self._idle.append(run)

    def _has_batches(self, order: np.ndarray) -> bool:
        return not (len(order) == 0 or (self.options.drop_last and len(order) < self.batch_size))

    def _sample_error(self, source: _EpochSource, error: RuntimeError) -> Exception:
        """DALI's decode error as fastload's: DALI names a failing sample only by its place in a
        batch, so the batches in flight are decoded again by the ffcv backend's decoder (libjpeg,
        which refuses what it warns about); the first that fails is named. Should every one decode
        there, the error names the samples DALI was decoding."""
        from .jpeg import JPEGDecodeError, decode_rgb
        fed = [int(i) for idx, _, _ in source.fed for i in idx]
        if self.reader.codec == "jpeg":
            for i in fed:
                try:
                    decode_rgb(self.reader.stored(i), int(self.reader.heights[i]), int(self.reader.widths[i]))
                except JPEGDecodeError as e:
                    return self.reader.sample_error(i, str(e))
        if not fed:
            return error
        return self.reader.sample_error(fed[0], f"DALI could not decode the batch of samples {fed[:8]}... holding it "
                                                f"({str(error).strip().splitlines()[0][:300]})")

    def close(self) -> None:
        with self._lock:
            self._idle.clear()
