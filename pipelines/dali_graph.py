"""The DALI backend with its geometry in DALI's own ops: on the GPU (nvJPEG decode, ``device='mixed'``),
and for raw pixel storage on either device. Per spec:

- RandomResizedCrop: ``decoders.image_slice`` decodes only the crop box (fused decode + crop),
  ``resize`` (antialiased) to the output size;
- Resize + CenterCrop: ``image_slice`` decodes only the rows and columns the centre crop reads,
  and ``resize`` produces the crop itself through its ROI (same scale as resizing everything);
- RandomCrop: whole-image decode, ``slice`` of the padded window;

then ``crop_mirror_normalize`` flips and (fused) normalizes. Raw pixels are sliced, not decoded.
On CPU the batch is DALI's output memory itself (its dynamic executor never reuses it);
otherwise it is copied once into a tensor on the caller's device.
"""
from __future__ import annotations

import functools
from typing import Iterator

import numpy as np
import torch

from fastload.spec import RandomResizedCrop, ResizeCenterCrop

from .base import BackendOptions
from .dali_engine import DALI_FILTERS, DALIEngine
from .sampling import FLIP, H, LEFT, OUT_H, OUT_W, TOP, W, X0, Y0


def _box_columns(idx, p: np.ndarray) -> dict:
    """The geometry's box (RandomResizedCrop: decoded, then resized to the output size) or window
    (RandomCrop: cut from the whole image with padding), and the flip."""
    return {"box_anchor": p[:, [Y0, X0]].astype(np.float32), "box_shape": p[:, [H, W]].astype(np.float32),
            "window": p[:, [TOP, LEFT]].astype(np.float32), "flip": p[:, FLIP].astype(np.int32)}


def _window_roi_columns(interpolation: str, size, idx, p: np.ndarray) -> dict:
    """Resize + CenterCrop without resizing what the crop throws away: decode only the rows and
    columns the window reads, and let ``resize`` produce the window itself through its ROI (the
    window in input coordinates): same scale, so the same filter as resizing everything."""
    th, tw = size
    cols = {}
    for axis, (start, extent, out, window, n) in {"y": (Y0, H, OUT_H, TOP, th), "x": (X0, W, OUT_W, LEFT, tw)}.items():
        scale = p[:, extent] / p[:, out]
        lo, hi = p[:, window] * scale, (p[:, window] + n) * scale
        reach = DALI_FILTERS[interpolation][1] * np.maximum(scale, 1.0) + 2  # the filter's radius, and a margin
        first = np.clip(np.floor(lo - reach), 0, p[:, extent]).astype(np.int64)
        last = np.clip(np.ceil(hi + reach), 0, p[:, extent]).astype(np.int64)
        cols[axis] = (p[:, start] + first, last - first, lo - first, hi - first)
    (ay, sy, ry0, ry1), (ax, sx, rx0, rx1) = cols["y"], cols["x"]
    f32 = np.float32
    return {"box_anchor": np.stack([ay, ax], 1).astype(f32), "box_shape": np.stack([sy, sx], 1).astype(f32),
            "roi_start": np.stack([ry0, rx0], 1).astype(f32), "roi_end": np.stack([ry1, rx1], 1).astype(f32),
            "flip": p[:, FLIP].astype(np.int32)}


class DALIGraph(DALIEngine):
    """``normalize`` fused, in DALI's ``crop_mirror_normalize``."""

    def __init__(self, reader, spec, options: BackendOptions, gpu: bool):
        self.gpu = gpu
        super().__init__(reader, spec, options)

    def feed(self):
        geometry = self.spec.geometry
        if isinstance(geometry, ResizeCenterCrop):
            return (("box_anchor", "box_shape", "roi_start", "roi_end", "flip"),
                    functools.partial(_window_roi_columns, self.spec.interpolation, self.spec.size))
        if isinstance(geometry, RandomResizedCrop):  # its window is the whole output: one size for all
            return ("box_anchor", "box_shape", "flip"), _box_columns
        return ("window", "flip"), _box_columns  # RandomCrop: the whole image, no resize, a padded window

    def decode(self, stored, columns):
        """What the graph decodes: the box when the columns name one, else the whole image."""
        from nvidia.dali import fn, types
        if self.reader.codec == "raw":
            pixels = stored.gpu() if self.gpu else stored
            if "box_anchor" not in columns:
                return pixels
            return fn.slice(pixels, columns["box_anchor"], columns["box_shape"], axes=[0, 1],
                            normalized_anchor=False, normalized_shape=False)
        decoder = "mixed" if self.gpu else "cpu"
        if "box_anchor" in columns:
            return fn.decoders.image_slice(stored, columns["box_anchor"], columns["box_shape"], axes=[0, 1],
                                           normalized_anchor=False, normalized_shape=False,
                                           device=decoder, output_type=types.RGB)
        return fn.decoders.image(stored, device=decoder, output_type=types.RGB)

    def window(self, images, anchor):
        """The output window of ``images`` at ``anchor``, zero padding outside the image."""
        from nvidia.dali import fn
        th, tw = self.spec.size
        return fn.slice(images, anchor, fn.constant(fdata=[float(th), float(tw)]), axes=[0, 1],
                        normalized_anchor=False, normalized_shape=False, out_of_bounds_policy="pad", fill_values=0)

    def graph(self, stored, columns, index):
        from nvidia.dali import fn, types
        th, tw = self.spec.size
        images = self.decode(stored, columns)
        interp = getattr(types, DALI_FILTERS[self.spec.interpolation][0])
        if "roi_start" in columns:
            images = fn.resize(images, size=[float(th), float(tw)], roi_start=columns["roi_start"],
                               roi_end=columns["roi_end"], roi_relative=False, antialias=True,
                               interp_type=interp, subpixel_scale=False)
        elif isinstance(self.spec.geometry, RandomResizedCrop):  # a constant size, as DALI's docs write it
            images = fn.resize(images, size=[float(th), float(tw)], antialias=True, interp_type=interp,
                               subpixel_scale=False)
        if "window" in columns:
            images = self.window(images, columns["window"])
        if self.normalize is None:
            return fn.flip(images, horizontal=columns["flip"]), index
        scale, shift = (np.asarray(v, np.float64) for v in self.normalize)
        # x * scale - shift == (x - mean) / std with mean = shift / scale, std = 1 / scale
        return fn.crop_mirror_normalize(images, mirror=columns["flip"], mean=(shift / scale).tolist(),
                                        std=(1.0 / scale).tolist(), dtype=types.FLOAT,
                                        output_layout="CHW" if self.spec.layout == "NCHW" else "HWC"), index

    def decode_stage(self) -> "DALIGraph":
        return _DecodeStage(self.reader, self.spec, self.options, self.gpu)

    def run_epoch(self, order: np.ndarray, params: np.ndarray) -> Iterator[tuple[torch.Tensor, np.ndarray]]:
        if not self._has_batches(order):
            return iter(())
        return ((self._to_torch(images), index) for images, index, _ in self._outputs(order, params))

    def _to_torch(self, images) -> torch.Tensor:
        """A tensor the caller owns. DALI's dynamic executor never reuses an output's memory: on CPU
        the tensor is that memory (DLPack, no copy; a 38 MB float batch copied in the main thread
        cost ~4% of train throughput on 2 cores). On GPU, one copy into a tensor on the caller's
        device and stream, with DALI's own ``feed_ndarray``."""
        from nvidia.dali.plugin.pytorch import feed_ndarray
        tensor = images.as_tensor()
        if not self.gpu:
            return torch.from_dlpack(tensor)
        dtype = torch.uint8 if self.normalize is None else torch.float32
        out = torch.empty(tensor.shape(), dtype=dtype, device=self.options.device)
        feed_ndarray(tensor, out, cuda_stream=torch.cuda.current_stream(out.device))
        return out


class _DecodeStage(DALIGraph):
    """``fastload bench``'s decode stage: decode what the full graph decodes, cut the window at
    its top-left corner (no resize, flip or normalization)."""
    fuses_normalization = False

    def feed(self):
        fields, columns = super().feed()
        return tuple(f for f in fields if f in ("box_anchor", "box_shape")), columns

    def graph(self, stored, columns, index):
        from nvidia.dali import fn
        return self.window(self.decode(stored, columns), fn.constant(fdata=[0.0, 0.0])), index
