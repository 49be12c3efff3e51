"""fastload: HF image datasets -> FFCV .beton / DALI TFRecord, one preprocessing spec, one loader.

Heavy pieces (torch, ffcv, DALI, datasets) load on first use, so ``import fastload``
and ``fastload --help`` stay instant.
"""
from __future__ import annotations

__version__ = "0.1.0"

from .spec import PreprocessSpec, ProgressiveResolution  # light: stdlib only

__all__ = ["PreprocessSpec", "ProgressiveResolution", "FastLoader", "convert", "verify", "Manifest", "DatasetError",
           "SampleDecodeError", "BackendUnavailable", "__version__"]


def __getattr__(name):  # PEP 562 lazy exports
    if name == "FastLoader":
        from .loader import FastLoader
        return FastLoader
    if name == "convert":
        from .converters.convert import convert
        return convert
    if name == "verify":
        from .verification import verify
        return verify
    if name in ("Manifest", "DatasetError"):
        from .formats import manifest
        return getattr(manifest, name)
    if name == "SampleDecodeError":
        from .formats.errors import SampleDecodeError
        return SampleDecodeError
    if name == "BackendUnavailable":
        from .pipelines.errors import BackendUnavailable
        return BackendUnavailable
    raise AttributeError(f"module 'fastload' has no attribute {name!r}")
