"""The DALI backend: TFRecord storage decoded by DALI, in the order, crops and batches every
backend shares. Two engines, chosen by what the user asked (:func:`dali_backend`):

- ``device='cpu'`` with JPEG storage: :class:`~fastload.pipelines.dali_regions.DALIRegions`.
  DALI decodes only the region each output window reads, and fastload's kernel resamples,
  flips and normalizes it: the ffcv backend's batches, bit for bit.
- ``device='cuda'`` (nvJPEG), or raw pixel storage: :class:`~fastload.pipelines.dali_graph.DALIGraph`.
  The geometry runs in DALI's own ops.

What both share is in ``dali_engine.py`` (:class:`~fastload.pipelines.dali_engine.DALIEngine`).
"""
from __future__ import annotations

import warnings

from .base import Backend, BackendOptions
from .dali_graph import DALIGraph
from .dali_regions import DALIRegions


def dali_backend(reader, spec, options: BackendOptions) -> Backend:
    """The registry's 'dali' backend: the engine for ``options.device`` and the split's storage."""
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


