"""The FFCV backend: ``.beton`` -> uint8 NHWC batches, geometry exactly as torchvision on PIL.

One ffcv ``Loader`` per FastLoader (each compiles for ~15-20 s); every epoch reuses it:
the order comes from a traversal order we hand it, the per-sample crop/flip parameters
from a table the compiled decoder reads through a fixed address. ffcv's own random ops
draw from numba's unseeded per-thread generators; ours are seeded by construction.

Traps handled here (measured with ffcv 1.0.2):
- ffcv sets ``torch.set_num_threads`` on import, in ``Loader()`` and in its epoch thread:
  its Compiler is patched to set numba's thread count only.
- ffcv reuses its output buffers across batches: batches are copied out before the
  next one is requested (FastLoader's batch ops allocate fresh tensors).
- ``NormalizeImage`` after ``ToTensor`` hangs on CPU: normalization is not done in ffcv.
"""
from __future__ import annotations

import ctypes
from dataclasses import replace
from typing import Iterator

import numpy as np
import torch

from fastload.beton import import_ffcv
from fastload.spec import RandomCrop

from .kernels import PADDING_CODES, resample_window
from .sampling import PARAM_COLUMNS

_libc = ctypes.CDLL(None)
_memcpy = _libc.memcpy
_memcpy.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t]
_memcpy.restype = ctypes.c_void_p
_NPARAM = len(PARAM_COLUMNS)
_PATCHED = False


def _ffcv():
    """Import ffcv, keep torch's thread count, and stop ffcv from changing it later."""
    global _PATCHED
    import_ffcv()
    if not _PATCHED:
        import numba
        from multiprocessing import cpu_count
        from ffcv.pipeline.compiler import Compiler

        def set_num_threads(cls, n):
            n = cpu_count() if n < 1 else n
            cls.num_threads = n
            numba.set_num_threads(min(n, numba.config.NUMBA_NUM_THREADS))

        Compiler.set_num_threads = classmethod(set_num_threads)
        _PATCHED = True


def _make_operations():
    """ffcv Operation subclasses, defined after ffcv is importable."""
    from ffcv.libffcv import imdecode
    from ffcv.pipeline.allocation_query import AllocationQuery
    from ffcv.pipeline.compiler import Compiler
    from ffcv.pipeline.operation import Operation

    class SpecImageDecoder(Operation):
        """Full JPEG decode (libjpeg-turbo), then the sample's geometry row from the table."""

        def __init__(self, table: np.ndarray, size: tuple[int, int], pad_mode: int):
            super().__init__()
            self.table = table  # kept alive here; the compiled code reads it by address
            self.size = size
            self.pad_mode = pad_mode

        def declare_state_and_memory(self, previous_state):
            pixels = int((self.metadata["width"].astype(np.uint64) * self.metadata["height"]).max())
            out = (self.size[0], self.size[1], 3)
            return (replace(previous_state, jit_mode=True, shape=out, dtype=np.dtype("u1")),
                    (AllocationQuery(out, np.dtype("u1")), AllocationQuery((pixels * 3,), np.dtype("u1"))))

        def generate_code(self):
            mem_read = self.memory_read
            my_range = Compiler.get_iterator()
            imdecode_c = Compiler.compile(imdecode)
            memcpy = _memcpy
            address = self.table.ctypes.data
            row_bytes = _NPARAM * 4
            pad_mode = self.pad_mode
            resample = resample_window

            def decode(batch_indices, my_storage, metadata, storage_state):
                destination, temp_storage = my_storage
                for dst_ix in my_range(len(batch_indices)):
                    source_ix = batch_indices[dst_ix]
                    field = metadata[source_ix]
                    image_data = mem_read(field["data_ptr"], storage_state)
                    height = np.uint32(field["height"])
                    width = np.uint32(field["width"])
                    temp = temp_storage[dst_ix]
                    imdecode_c(image_data, temp, height, width, height, width, 0, 0, 1, 1, False, False)
                    image = temp.reshape(-1)[:3 * height * width].reshape(height, width, 3)
                    p = np.empty(9, np.int32)
                    memcpy(p.ctypes.data, address + source_ix * row_bytes, row_bytes)
                    resample(image, p[0], p[1], p[2], p[3], p[4], p[5], p[6], p[7], p[8] != 0,
                             pad_mode, destination[dst_ix])
                return destination[:len(batch_indices)]

            decode.is_parallel = True
            return decode

    class SampleIndexDecoder(Operation):
        """Emits the sample index of each row, so labels come from the records index
        for exactly the images ffcv decoded."""

        def declare_state_and_memory(self, previous_state):
            return (replace(previous_state, jit_mode=True, shape=(1,), dtype=np.dtype("<i8")),
                    AllocationQuery((1,), np.dtype("<i8")))

        def generate_code(self):
            def decode(batch_indices, destination, metadata, storage_state):
                for i in range(len(batch_indices)):
                    destination[i, 0] = batch_indices[i]
                return destination[:len(batch_indices)]
            return decode

    return SpecImageDecoder, SampleIndexDecoder


class _GivenOrder:
    """Stands in for ffcv's TraversalOrder: the epoch's order is decided by FastLoader."""

    def __init__(self):
        self.order = np.zeros(0, np.uint64)

    def sample_order(self, epoch):
        return self.order


class FFCVPipeline:
    name = "ffcv"

    def __init__(self, reader, spec, batch_size: int, num_workers: int, drop_last: bool):
        _ffcv()
        from ffcv.loader import Loader, OrderOption
        from ffcv.pipeline import PipelineSpec
        data = reader.data_files[0]
        if reader.manifest.storage != "beton":
            raise ValueError(f"backend 'ffcv' reads .beton datasets; {reader.manifest.root} is "
                             f"{reader.manifest.storage!r}: use backend='dali' or convert with --format beton")
        pad_mode = PADDING_CODES[spec.geometry.padding_mode] if isinstance(spec.geometry, RandomCrop) else 0
        self.table = np.zeros((len(reader), _NPARAM), np.int32)
        SpecImageDecoder, SampleIndexDecoder = _make_operations()
        threads = torch.get_num_threads()
        try:
            pipelines = {name: None for name in _field_names(data)}
            # explicit decoders (a decoder given as a transform would run after ffcv's default one)
            pipelines["image"] = PipelineSpec("image", decoder=SpecImageDecoder(self.table, spec.size, pad_mode))
            pipelines["label"] = PipelineSpec("label", decoder=SampleIndexDecoder())
            self.loader = Loader(str(data), batch_size=batch_size, num_workers=num_workers,
                                 order=OrderOption.SEQUENTIAL, pipelines=pipelines, drop_last=drop_last,
                                 os_cache=True, batches_ahead=2)
        finally:
            torch.set_num_threads(threads)
        self.order = _GivenOrder()
        self.loader.traversal_order = self.order

    def run_epoch(self, order: np.ndarray, params: np.ndarray) -> Iterator[tuple[torch.Tensor, np.ndarray]]:
        self.table[:] = params
        self.order.order = order.astype(np.uint64)
        self.loader.first_traversal_order = self.order.order  # ffcv's len() and drop_last read it
        for images, index in self.loader:
            # torch view of ffcv's buffer: valid until the next batch is requested
            yield torch.from_numpy(images), index[:, 0].copy()


def _field_names(path) -> list[str]:
    from ffcv.reader import Reader
    return list(Reader(str(path)).handlers)
