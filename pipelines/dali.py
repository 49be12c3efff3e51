"""The DALI backend: TFRecord storage decoded by DALI, in the order, crops and batches every
backend shares. Two engines, chosen by what the user asked (:func:`dali_backend`):

- ``device='cpu'`` with JPEG storage: :class:`~fastload.pipelines.dali_regions.DALIRegions`.
  DALI decodes only the region each output window reads, and fastload's kernel resamples,
  flips and normalizes it: the ffcv backend's batches, bit for bit.
- ``device='cuda'`` (nvJPEG), or raw pixel storage: :class:`~fastload.pipelines.dali_graph.DALIGraph`.
  The geometry runs in DALI's own ops.

What both share is here (:class:`DALIEngine`): a graph declared once and fed by an external
source with each batch's stored bytes (read where they are mapped, through the records index)
and the columns the graph consumes, computed from the batch's geometry rows. FastLoader decides
the order, so epochs are exact (every sample once, the last batch partial or dropped as asked).
"""
from __future__ import annotations

import warnings
from abc import abstractmethod
from collections import deque
from typing import Callable

import numpy as np

from fastload.spec import RandomCrop

from .base import Backend, BackendOptions
from .sampling import plan_batches

PREFETCH = 2  # DALI's prefetch_queue_depth

# DALI's resampling filter per spec interpolation, and its radius in source pixels when not downscaling
DALI_FILTERS = {"bilinear": ("INTERP_LINEAR", 1.0), "bicubic": ("INTERP_CUBIC", 2.0),
                "lanczos": ("INTERP_LANCZOS3", 3.0), "nearest": ("INTERP_NN", 1.0)}


def dali_backend(reader, spec, options: BackendOptions) -> Backend:
    """The registry's 'dali' backend: the engine for ``options.device`` and the split's storage."""
    from .dali_graph import DALIGraph
    from .dali_regions import DALIRegions
    if options.device.type != "cuda":
        if reader.codec == "raw":
            return DALIGraph(reader, spec, options, gpu=False)
        return DALIRegions(reader, spec, options)
    engine = DALIGraph(reader, spec, options, gpu=True)
    try:
        engine.build()
    except RuntimeError as e:
        if not options.fallback_to_cpu:
            raise RuntimeError(f"DALI could not build its GPU (nvJPEG) pipeline on {options.device}: {e}; "
                               "use device='cpu'") from e
        warnings.warn(f"DALI GPU decoding unavailable ({e}); decoding on CPU", RuntimeWarning)
        return dali_backend(reader, spec, options.on_cpu())
    return engine


class _EpochSource:
    """Iterable the external source re-reads after each ``reset()``: one epoch of batches.

    ``fields`` names what the graph consumes (DALI warns about outputs left unused); ``columns``
    computes them from a batch's sample indices and geometry rows."""

    def __init__(self, reader, batch_size, drop_last, fields: tuple[str, ...], columns: Callable):
        self.reader, self.batch_size, self.drop_last = reader, batch_size, drop_last
        self.fields, self.columns = fields, columns
        self.order = np.zeros(0, np.int64)
        self.params = None
        # (indices, rows, columns) of batches handed to DALI and not yet returned: in DALI's order
        # (to resample them on CPU, and to name a failing sample)
        self.fed = deque()
        # what DALI reads without copying (no_copy): kept alive until its iteration has run
        self.alive = deque(maxlen=PREFETCH + 2)

    def __iter__(self):
        self.fed.clear()
        sample = self.reader.pixels if self.reader.codec == "raw" else self.reader.stored
        for idx, rows in plan_batches(self.order, self.params, self.batch_size, self.drop_last):
            columns = self.columns(idx, rows)
            self.fed.append((idx, rows, columns))
            batch = ([sample(int(i)) for i in idx], *(np.ascontiguousarray(columns[f]) for f in self.fields),
                     np.ascontiguousarray(idx, np.int64))
            self.alive.append(batch)
            yield batch


class DALIEngine(Backend):
    """A DALI pipeline over one split, fed by :class:`_EpochSource`. An engine says what the
    graph consumes per batch (:meth:`feed`) and what it computes (:meth:`graph`)."""
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
        fields, columns = self.feed()
        self.source = _EpochSource(reader, options.batch_size, options.drop_last, fields, columns)
        self.pipe = None
        self._epoch_finished = True

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
        from nvidia.dali import fn, pipeline_def, types
        device_id = (self.options.device.index or 0) if self.gpu else None

        @pipeline_def(batch_size=self.batch_size, num_threads=self.num_workers, device_id=device_id,
                      seed=self.options.seed, prefetch_queue_depth=PREFETCH, exec_async=True, exec_pipelined=True,
                      exec_dynamic=True)  # outputs never reused: batches and regions stay valid while held
        def pipeline():
            fields = self.source.fields
            raw = self.reader.codec == "raw"  # samples arrive as HWC pixels: nothing to decode
            # JPEGs: DALI reads the stored bytes where they are mapped (copying each ~100 KB JPEG in
            # the feeding thread cost ~4% of ImageNet train throughput on 2 cores; _EpochSource keeps
            # them alive). Raw CIFAR pixels (3 KB): copied, since DALI's per-sample cost of
            # borrowed buffers is larger than the copy (no_copy: 36k against 49k img/s)
            outputs = fn.external_source(
                source=self.source, num_outputs=len(fields) + 2, batch=True, cycle="raise", no_copy=not raw,
                dtype=[types.UINT8] + [types.INT32 if f == "flip" else types.FLOAT for f in fields] + [types.INT64],
                layout=["HWC" if raw else ""] + [""] * (len(fields) + 1))
            return self.graph(outputs[0], dict(zip(fields, outputs[1:-1])), outputs[-1])

        pipe = pipeline()
        pipe.build()
        self.pipe = pipe

    def _outputs(self):
        """DALI's outputs for this epoch: (images, sample indices, what the source fed for them)."""
        if self.pipe is None or not self._epoch_finished:
            # a fresh pipeline: nothing of an abandoned epoch is left in its prefetch queue
            self.pipe = None
            self.build()
        else:
            self.pipe.reset()
        self._epoch_finished = False
        while True:
            try:
                images, index = self.pipe.run()
            except StopIteration:
                break
            except RuntimeError as e:
                raise self._sample_error() or e
            yield images, np.asarray(index.as_array()).reshape(-1), self.source.fed.popleft()
        self._epoch_finished = True

    def _start(self, order: np.ndarray, params: np.ndarray) -> bool:
        """Hand the epoch to the source; False when it has no batch at all."""
        self.source.order, self.source.params = order, params
        return not (len(order) == 0 or (self.source.drop_last and len(order) < self.batch_size))

    def _sample_error(self):
        """DALI names a failing sample by its place in a batch: find it among the batches in flight."""
        for idx, _, _ in self.source.fed:
            for i in idx:
                try:
                    self.reader.image(int(i))
                except Exception as e:  # the reader names split, index and file
                    return e
        return None

    def close(self) -> None:
        self.pipe = None
