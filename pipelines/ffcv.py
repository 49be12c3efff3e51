"""The FFCV backend: ``.beton`` -> uint8 NHWC batches, geometry exactly as torchvision on PIL.

One ffcv ``Loader`` per FastLoader (each compiles for ~15-20 s); every epoch reuses it:
the order comes from a traversal order we hand it, the per-sample crop/flip parameters
from a table the compiled decoder reads through a fixed address. ffcv's own random ops
draw from numba's unseeded per-thread generators; ours are seeded by construction.

Traps handled here (measured with ffcv 1.0.2):
- ffcv sets ``torch.set_num_threads`` on import, in ``Loader()`` and in its epoch thread:
  its Compiler is patched to set numba's thread count only.
- ffcv reuses its output buffers across batches: our decoder writes into a pool of buffers
  that are reused only once the user holds no tensor on them (no copy, no stale batches).
- ``NormalizeImage`` after ``ToTensor`` hangs on CPU: normalization is not done in ffcv.
"""
from __future__ import annotations

import ctypes
from dataclasses import replace
from typing import Iterator

import numpy as np
import torch

from fastload.beton import beton_field_names, import_ffcv
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

        from ffcv.loader.epoch_iterator import EpochIterator
        run = EpochIterator.run

        def run_recording_errors(self):
            try:
                run(self)
            except BaseException as e:  # kept for _checked to report
                self.fastload_error = f"{type(e).__name__}: {e}"
                raise

        EpochIterator.run = run_recording_errors
        _PATCHED = True


_DISPATCHERS = []


def _compiled_imdecode():
    """A numba dispatcher for ffcv's imdecode, one per decoder, as ffcv itself does (one shared
    dispatcher raced when two loaders compiled at once). They are kept alive: numba's finalizer
    for a collected dispatcher of this ctypes wrapper raises KeyError noise."""
    from ffcv.libffcv import imdecode
    from ffcv.pipeline.compiler import Compiler
    _DISPATCHERS.append(Compiler.compile(imdecode))
    return _DISPATCHERS[-1]


def _make_operations():
    """ffcv Operation subclasses, defined after ffcv is importable."""
    from ffcv.pipeline.allocation_query import AllocationQuery
    from ffcv.pipeline.compiler import Compiler
    from ffcv.pipeline.operation import Operation

    class SpecImageDecoder(Operation):
        """Full JPEG decode (libjpeg-turbo), then the sample's geometry row from the table."""

        def __init__(self, table: np.ndarray, size: tuple[int, int], pad_mode: int, normalize, chw: bool):
            super().__init__()
            self.table = table  # kept alive here; the compiled code reads it by address
            self.size = size
            self.pad_mode = pad_mode
            self.normalize = normalize  # None, or (scale[3], shift[3]) fused into the last resample pass
            self.chw = chw

        def declare_state_and_memory(self, previous_state):
            pixels = int((self.metadata["width"].astype(np.uint64) * self.metadata["height"]).max())
            h, w = self.size
            if self.normalize is None:
                out, dtype = (h, w, 3), np.dtype("u1")
            else:
                out, dtype = ((3, h, w) if self.chw else (h, w, 3)), np.dtype("<f4")
            return (replace(previous_state, jit_mode=True, shape=out, dtype=dtype),
                    (AllocationQuery(out, dtype), AllocationQuery((pixels * 3,), np.dtype("u1"))))

        def generate_code(self):
            mem_read = self.memory_read
            my_range = Compiler.get_iterator()
            imdecode_c = _compiled_imdecode()
            memcpy = _memcpy
            address = self.table.ctypes.data
            row_bytes = _NPARAM * 4
            pad_mode = self.pad_mode
            resample = resample_window
            norm = self.normalize is not None
            scale, shift = self.normalize if norm else (np.ones(3, np.float32), np.zeros(3, np.float32))
            chw = self.chw and norm
            out_h, out_w = self.size

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
                             pad_mode, destination[dst_ix], out_h, out_w, chw, norm, scale, shift)
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


class _OutputPool:
    """Output buffers that ffcv's producer thread decodes into and the user then owns.

    ffcv hands out views of a small ring of buffers that it overwrites a few batches later.
    Here ffcv's ring for our decoder is replaced by this pool: each batch is decoded into a
    buffer no one else holds, given to the user as a torch tensor without a copy, and reused
    only after every tensor viewing it is gone (storage use count back to the pool's own).
    """

    def __init__(self):
        import threading
        self.lock = threading.Lock()
        self.entries: list[dict] = []
        self.by_ptr: dict[int, dict] = {}
        self.shape = None
        self.dtype = None

    @staticmethod
    def _uses(entry) -> int:
        return torch._C._storage_Use_Count(entry["tensor"].untyped_storage()._cdata)

    def new_epoch(self, ring: np.ndarray) -> "_OutputPool":
        with self.lock:
            self.shape, self.dtype = ring.shape[1:], ring.dtype
            # buffers of an abandoned epoch may still be written by its thread: let them go
            self.entries = [e for e in self.entries if e["state"] != "busy" and e["array"].shape == self.shape
                            and e["array"].dtype == self.dtype]
            self.by_ptr = {e["array"].ctypes.data: e for e in self.entries}
        return self

    def __getitem__(self, slot):  # ffcv's select_buffer: ring[slot][:count], in the producer thread
        with self.lock:
            for e in self.entries:
                if e["state"] == "free" or (e["state"] == "user" and self._uses(e) <= e["base_uses"]):
                    e["state"] = "busy"
                    return e["array"]
            array = np.empty(self.shape, self.dtype)
            tensor = torch.from_numpy(array)
            e = {"array": array, "tensor": tensor, "state": "busy"}
            e["base_uses"] = self._uses(e)
            self.entries.append(e)
            self.by_ptr[array.ctypes.data] = e
            return array

    def claim(self, batch: np.ndarray) -> torch.Tensor:
        """The user's tensor for a batch ffcv produced (a view of a pool buffer)."""
        with self.lock:
            e = self.by_ptr.get(batch.ctypes.data)
            if e is None:  # not ours (should not happen): hand out a copy, never a ring view
                return torch.from_numpy(batch.copy())
            e["state"] = "user"
            return e["tensor"][:len(batch)]


class _GivenOrder:
    """Stands in for ffcv's TraversalOrder: the epoch's order is decided by FastLoader."""

    def __init__(self):
        self.order = np.zeros(0, np.uint64)

    def sample_order(self, epoch):
        return self.order


class FFCVPipeline:
    name = "ffcv"

    def __init__(self, reader, spec, batch_size: int, num_workers: int, drop_last: bool, normalize=None):
        """``normalize``: None (yield uint8 NHWC), or (scale[3], shift[3]) to yield float32 already
        normalized, NCHW when ``spec.layout == 'NCHW'`` else NHWC: fused into the resample's last
        pass, it saves the batch ops a full pass over every batch."""
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
            pipelines = {name: None for name in beton_field_names(data)}
            # explicit decoders (a decoder given as a transform would run after ffcv's default one)
            self.normalize = normalize
            chw = spec.layout == "NCHW"
            decoder = SpecImageDecoder(self.table, spec.size, pad_mode,
                                       None if normalize is None else tuple(np.asarray(v, np.float32) for v in normalize),
                                       chw)
            pipelines["image"] = PipelineSpec("image", decoder=decoder)
            pipelines["label"] = PipelineSpec("label", decoder=SampleIndexDecoder())
            self.loader = Loader(str(data), batch_size=batch_size, num_workers=num_workers,
                                 order=OrderOption.SEQUENTIAL, pipelines=pipelines, drop_last=drop_last,
                                 os_cache=True, batches_ahead=2)
        finally:
            torch.set_num_threads(threads)
        self.order = _GivenOrder()
        self.loader.traversal_order = self.order
        self.pool = _OutputPool() if hasattr(torch._C, "_storage_Use_Count") else None
        if self.pool is not None:
            self._install_pool(decoder)

    def _install_pool(self, decoder) -> None:
        graph = self.loader.graph
        node_id = next(i for node, i in graph.node_to_id.items() if getattr(node, "decoder", None) is decoder)
        allocate = graph.allocate_memory
        pool = self.pool

        def allocate_with_pool(batch_size, slots):
            buffers = allocate(batch_size, slots)
            ring, temp = buffers["operation"][node_id]
            buffers["operation"][node_id] = (pool.new_epoch(ring), temp)
            return buffers

        graph.allocate_memory = allocate_with_pool

    def run_epoch(self, order: np.ndarray, params: np.ndarray) -> Iterator[tuple[torch.Tensor, np.ndarray]]:
        self.table[:] = params
        self.order.order = order.astype(np.uint64)
        self.loader.first_traversal_order = self.order.order  # ffcv's len() and drop_last read it
        for images, index in _checked(iter(self.loader)):
            # the caller owns what it gets: a pool buffer, or a copy of ffcv's ring slot
            owned = self.pool.claim(images) if self.pool is not None else torch.from_numpy(images.copy())
            yield owned, index[:, 0].copy()


def _checked(epoch_iterator):
    """Batches of an ffcv EpochIterator, raising when its thread dies (ffcv's own ``__next__``
    would wait on its queue forever: an error in a compiled op used to hang the training job)."""
    import queue
    while True:
        try:
            item = epoch_iterator.output_queue.get(timeout=1.0)
        except queue.Empty:
            if not epoch_iterator.is_alive():
                epoch_iterator.close()
                raise RuntimeError("ffcv's loader thread stopped without finishing the epoch; "
                                   f"its error: {getattr(epoch_iterator, 'fastload_error', 'unknown (see stderr)')}")
            continue
        if item is None:
            epoch_iterator.close()
            return
        slot, result = item
        if epoch_iterator.loader is not None and hasattr(epoch_iterator, "current_stream"):
            epoch_iterator.current_stream.wait_stream(epoch_iterator.cuda_streams[slot])
        yield result

