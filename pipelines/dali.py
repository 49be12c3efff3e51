"""The DALI backend: JPEG bytes -> decode (CPU libjpeg-turbo, or nvJPEG with device='mixed')
-> torchvision-exact geometry -> batches (float32 normalized, or uint8 NHWC).

The graph is declared once and fed by an external source with each batch's JPEG bytes
(sliced from the memory-mapped TFRecord shards through the records index) and its
geometry rows. FastLoader decides the order, so epochs are exact (every sample once,
the last batch partial or dropped as asked), distributed shares follow one rule for
all backends, and crops are the same as in the other backends for the same seed.

On CPU, JPEG storage: DALI decodes only the source rows and columns the output window reads
(``decoders.image_slice``, fused decode + crop, on DALI's threads, prefetched), and fastload's
kernel (``_resample.c``, through ctypes: no numba here) resamples, flips and normalizes those
regions straight into the batch on ``num_workers`` threads of its own (``engine.py``). DALI's
CPU decode is PIL's, bit for bit, so the batches are the ffcv backend's; and one fused pass replaces DALI's ``resize`` + ``crop_mirror_normalize``
(measured on 2 cores: 0.53 ms of geometry per ImageNet photo in DALI, 0.16 ms in the kernel).

On GPU (nvJPEG) and for raw pixel storage, the geometry runs in DALI, per spec:
- RandomResizedCrop: ``decoders.image_slice`` decodes only the crop box (fused decode + crop),
  ``resize`` (antialiased linear) to the output size;
- Resize + CenterCrop: ``image_slice`` decodes only the rows and columns the centre crop reads,
  and ``resize`` produces the crop itself through its ROI (same scale as resizing everything);
- RandomCrop: whole-image decode, ``slice`` of the padded window;
then ``crop_mirror_normalize`` flips and (fused) normalizes. On CPU the batch is DALI's output
memory itself (its dynamic executor never reuses it); otherwise it is copied once into a buffer
the caller owns.
"""
from __future__ import annotations

import functools
import warnings
from collections import deque
from typing import Iterator

import numpy as np
import torch

from fastload.spec import RandomCrop, RandomResizedCrop, ResizeCenterCrop

from .base import Backend, BackendOptions
from .buffers import BatchBuffers
from . import native
from .engine import KernelOutput, PartWorkers
from .sampling import FLIP, H, LEFT, OUT_H, OUT_W, TOP, W, X0, Y0, plan_batches

PREFETCH = 2  # DALI's prefetch_queue_depth


# --------------------------------------------------------------------------- CPU: DALI decodes, fastload resamples
def _region_columns(heights, widths, out: KernelOutput, size, idx, p: np.ndarray) -> dict:
    """What DALI decodes for fastload's kernel: per sample, the image region (top, left, height,
    width) its output window reads (``_resample.c``'s ``fl_source_window``, the ffcv backend's rule)."""
    rows = np.ascontiguousarray(p, np.int64)
    regions = np.empty((len(rows), 4), np.int64)
    h, w = np.ascontiguousarray(heights[idx]), np.ascontiguousarray(widths[idx])
    native.LIB.fl_source_regions(rows.ctypes.data, len(rows), h.ctypes.data, w.ctypes.data, *size, out.filter,
                                 regions.ctypes.data)
    return {"box_anchor": regions[:, :2].astype(np.float32), "box_shape": regions[:, 2:].astype(np.float32),
            "regions": regions, "rows": rows}


# --------------------------------------------------------------------------- GPU and raw pixels: geometry in DALI


def _box_columns(size, idx, p: np.ndarray) -> dict:
    """The geometry's box (RandomResizedCrop: decoded, then resized to the output size) or window
    (RandomCrop: cut from the whole image with padding), and the flip."""
    return {"box_anchor": p[:, [Y0, X0]].astype(np.float32), "box_shape": p[:, [H, W]].astype(np.float32),
            "window": p[:, [TOP, LEFT]].astype(np.float32), "flip": p[:, FLIP].astype(np.int32)}


# DALI's resampling filter per spec interpolation, and its radius in source pixels when not downscaling
_DALI_FILTERS = {"bilinear": ("INTERP_LINEAR", 1.0), "bicubic": ("INTERP_CUBIC", 2.0),
                 "lanczos": ("INTERP_LANCZOS3", 3.0), "nearest": ("INTERP_NN", 1.0)}


def _window_roi_columns(interpolation: str, size, idx, p: np.ndarray) -> dict:
    """Resize + CenterCrop without resizing what the crop throws away: decode only the rows and
    columns the window reads, and let ``resize`` produce the window itself through its ROI (the
    window in input coordinates): same scale, so the same filter as resizing everything."""
    th, tw = size
    cols = {}
    for axis, (start, extent, out, window, n) in {"y": (Y0, H, OUT_H, TOP, th), "x": (X0, W, OUT_W, LEFT, tw)}.items():
        scale = p[:, extent] / p[:, out]
        lo, hi = p[:, window] * scale, (p[:, window] + n) * scale
        reach = _DALI_FILTERS[interpolation][1] * np.maximum(scale, 1.0) + 2  # the filter's radius, and a margin
        first = np.clip(np.floor(lo - reach), 0, p[:, extent]).astype(np.int64)
        last = np.clip(np.ceil(hi + reach), 0, p[:, extent]).astype(np.int64)
        cols[axis] = (p[:, start] + first, last - first, lo - first, hi - first)
    (ay, sy, ry0, ry1), (ax, sx, rx0, rx1) = cols["y"], cols["x"]
    f32 = np.float32
    return {"box_anchor": np.stack([ay, ax], 1).astype(f32), "box_shape": np.stack([sy, sx], 1).astype(f32),
            "roi_start": np.stack([ry0, rx0], 1).astype(f32), "roi_end": np.stack([ry1, rx1], 1).astype(f32),
            "flip": p[:, FLIP].astype(np.int32)}


class _EpochSource:
    """Iterable the external source re-reads after each ``reset()``: one epoch of batches.

    ``fields`` names what the graph consumes (DALI warns about outputs left unused); ``columns``
    computes them from a batch's sample indices and geometry rows."""

    def __init__(self, reader, batch_size, drop_last, fields: tuple[str, ...], columns):
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


class DALIBackend(Backend):
    """``normalize`` fused: in fastload's kernel on CPU, in DALI's ``crop_mirror_normalize`` on GPU."""
    name = "dali"
    storages = ("tfrecord",)
    fuses_normalization = True
    interpolations = tuple(_DALI_FILTERS)

    def __init__(self, reader, spec, options: BackendOptions, decode_only: bool = False):
        """``decode_only``: the truncated pipeline of ``fastload bench``'s decode stage (decode what
        the full one decodes, cut the window)."""
        if isinstance(spec.geometry, RandomCrop) and spec.geometry.padding_mode != "constant":
            raise ValueError(f"random_crop.padding_mode={spec.geometry.padding_mode!r} is not supported by "
                             "backend 'dali' (its slice pads with a constant only): use 'constant' or "
                             "backend='ffcv'/'reference'")
        super().__init__(reader, spec, options)
        self.batch_size, self.num_workers, self.seed = options.batch_size, max(1, options.num_workers), options.seed
        self.device = options.device
        self.decode_only = decode_only
        self.interpolation = getattr(spec.geometry, "interpolation", "bilinear")
        # CPU decoding of JPEGs: DALI decodes regions, fastload's kernel does the geometry. A GPU
        # that then fails to build falls back to CPU with the geometry in DALI (_build)
        self.kernel = (KernelOutput.of(spec, None if decode_only else self.normalize)
                       if reader.codec != "raw" and not torch.cuda.is_available() else None)
        if self.kernel is not None:
            columns = functools.partial(_region_columns, reader.heights.astype(np.int64),
                                        reader.widths.astype(np.int64), self.kernel, spec.size)
            fields = ("box_anchor", "box_shape")
            self.workers = PartWorkers(options.num_workers, "fastload-dali")
            self.buffers = BatchBuffers(capacity=options.num_workers + 4)  # in flight, ready, and the caller's
        elif isinstance(spec.geometry, ResizeCenterCrop):
            columns = functools.partial(_window_roi_columns, self.interpolation, spec.size)
            fields = ("box_anchor", "box_shape", "roi_start", "roi_end", "flip")
        elif isinstance(spec.geometry, RandomResizedCrop):  # its window is the whole output: one size for all
            columns, fields = functools.partial(_box_columns, spec.size), ("box_anchor", "box_shape", "flip")
        else:  # RandomCrop: the whole image, no resize, a padded window
            columns, fields = functools.partial(_box_columns, spec.size), ("window", "flip")
        if decode_only and self.kernel is None:
            fields = fields[:2] if fields[0] == "box_anchor" else ()  # decode what the full graph decodes
        self.source = _EpochSource(reader, options.batch_size, options.drop_last, fields, columns)
        self.pipe = None
        self.decode_device = "cpu"
        self._epoch_finished = True

    def decode_stage(self) -> "DALIBackend":
        return DALIBackend(self.reader, self.spec, self.options, decode_only=True)

    def _build(self):
        want_gpu = torch.cuda.is_available()
        if want_gpu:
            try:
                self.pipe = self._make(gpu=True)
                self.decode_device = "mixed"
                return
            except RuntimeError as e:
                if self.device.type == "cuda":
                    raise RuntimeError(f"DALI could not build its GPU (nvJPEG) pipeline on {self.device}: {e}") from e
                warnings.warn(f"DALI GPU decoding unavailable ({e}); falling back to CPU decoding", RuntimeWarning)
        self.pipe = self._make(gpu=False)
        self.decode_device = "cpu"

    def _make(self, gpu: bool):
        from nvidia.dali import fn, pipeline_def, types
        th, tw = self.spec.size
        device_id = (self.device.index or 0) if (gpu and self.device.type == "cuda") else (0 if gpu else None)

        @pipeline_def(batch_size=self.batch_size, num_threads=self.num_workers, device_id=device_id,
                      seed=self.seed, prefetch_queue_depth=PREFETCH, exec_async=True, exec_pipelined=True,
                      exec_dynamic=True)  # outputs never reused: batches and regions stay valid while held
        def graph():
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
            stored, index = outputs[0], outputs[-1]
            arg = dict(zip(fields, outputs[1:-1]))
            decoder = "mixed" if gpu else "cpu"

            def window(images, anchor):  # the output window, zero padding outside the image
                return fn.slice(images, anchor, fn.constant(fdata=[float(th), float(tw)]), axes=[0, 1],
                                normalized_anchor=False, normalized_shape=False, out_of_bounds_policy="pad",
                                fill_values=0)

            if raw and "box_anchor" in arg:
                images = fn.slice(stored.gpu() if gpu else stored, arg["box_anchor"], arg["box_shape"], axes=[0, 1],
                                  normalized_anchor=False, normalized_shape=False)
            elif raw:
                images = stored.gpu() if gpu else stored
            elif "box_anchor" in arg:
                images = fn.decoders.image_slice(stored, arg["box_anchor"], arg["box_shape"], axes=[0, 1],
                                                 normalized_anchor=False, normalized_shape=False,
                                                 device=decoder, output_type=types.RGB)
            else:
                images = fn.decoders.image(stored, device=decoder, output_type=types.RGB)
            if self.kernel is not None:  # the regions, for fastload's kernel
                return images, index
            if self.decode_only:
                return window(images, fn.constant(fdata=[0.0, 0.0])), index
            interp = getattr(types, _DALI_FILTERS[self.interpolation][0])
            if "roi_start" in arg:
                images = fn.resize(images, size=[float(th), float(tw)], roi_start=arg["roi_start"],
                                   roi_end=arg["roi_end"], roi_relative=False, antialias=True,
                                   interp_type=interp, subpixel_scale=False)
            elif isinstance(self.spec.geometry, RandomResizedCrop):  # a constant size, as DALI's docs write it
                images = fn.resize(images, size=[float(th), float(tw)], antialias=True,
                                   interp_type=interp, subpixel_scale=False)
            if "window" in arg:
                images = window(images, arg["window"])
            flip = arg["flip"]
            if self.normalize is None:
                images = fn.flip(images, horizontal=flip)
            else:
                scale, shift = (np.asarray(v, np.float64) for v in self.normalize)
                # x * scale - shift == (x - mean) / std with mean = shift / scale, std = 1 / scale
                images = fn.crop_mirror_normalize(images, mirror=flip, mean=(shift / scale).tolist(),
                                                  std=(1.0 / scale).tolist(), dtype=types.FLOAT,
                                                  output_layout="CHW" if self.spec.layout == "NCHW" else "HWC")
            return images, index

        pipe = graph()
        pipe.build()
        return pipe

    def run_epoch(self, order: np.ndarray, params: np.ndarray) -> Iterator[tuple[torch.Tensor, np.ndarray]]:
        self.source.order, self.source.params = order, params
        if len(order) == 0 or (self.source.drop_last and len(order) < self.batch_size):
            return iter(())
        if self.kernel is not None:
            return self.workers.in_order(self._resample_jobs(self._outputs()), jobs_block=True)
        return ((self._to_torch(images), index) for images, index, _ in self._outputs())

    def _outputs(self):
        """DALI's outputs for this epoch: (images, sample indices, what the source fed for them)."""
        if self.pipe is None or not self._epoch_finished:
            # a fresh pipeline: nothing of an abandoned epoch is left in its prefetch queue
            self.pipe = None
            self._build()
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

    def _resample_jobs(self, outputs):
        """Per batch of regions DALI decoded: the work of resampling them into a batch the caller
        owns (for :meth:`PartWorkers.in_order`). The work holds DALI's output until it has run."""
        k = self.kernel
        for regions, index, (_, _, columns) in outputs:
            n = len(index)
            placed, rows = columns["regions"], columns["rows"]
            # the kernel reads each region by address: its shape must be the one asked for
            if not np.array_equal(np.asarray(regions.shape(), np.int64).reshape(n, 3)[:, :2], placed[:, 2:]):
                raise RuntimeError(f"DALI decoded regions of other shapes than asked: {regions.shape()[:4]} ...")
            addresses = np.array([regions[i].data_ptr() for i in range(n)], np.uint64)
            out = self.buffers.empty((n, *k.shape), k.dtype)

            def work(lo, hi, regions=regions, addresses=addresses, placed=placed, rows=rows, out=out):
                # one C call per part, without the GIL (ctypes releases it)
                if native.LIB.fl_resample_regions(
                        addresses[lo:].ctypes.data, placed[lo:].ctypes.data, rows[lo:].ctypes.data, hi - lo,
                        not self.decode_only, k.pad_mode, k.filter, out[lo:].data_ptr(), *self.spec.size, k.chw,
                        k.fused, k.scale.ctypes.data, k.shift.ctypes.data):
                    raise MemoryError("fastload's resampling kernel ran out of memory")
            yield n, work, (out, index)

    def close(self) -> None:
        if self.kernel is not None:
            self.workers.close()
        self.pipe = None

    def _sample_error(self):
        """DALI names a failing sample by its place in a batch: find it among the batches in flight."""
        for idx, _, _ in self.source.fed:
            for i in idx:
                try:
                    self.reader.image(int(i))
                except Exception as e:  # the reader names split, index and file
                    return e
        return None

    def _to_torch(self, images) -> torch.Tensor:
        """A tensor the caller owns. DALI's dynamic executor never reuses an output's memory: on CPU
        the tensor is that memory (DLPack, no copy; a 38 MB float batch copied in the main thread
        cost ~4% of train throughput on 2 cores). On GPU, one copy into a tensor on the caller's
        device and stream, with DALI's own ``feed_ndarray``."""
        from nvidia.dali.plugin.pytorch import feed_ndarray
        tensor = images.as_tensor()
        if self.decode_device == "cpu":
            return torch.from_dlpack(tensor)
        dtype = torch.uint8 if (self.normalize is None or self.decode_only) else torch.float32
        out = torch.empty(tensor.shape(), dtype=dtype, device=self.device if self.device.type == "cuda" else "cuda")
        feed_ndarray(tensor, out, cuda_stream=torch.cuda.current_stream(out.device))
        return out
