"""Writing and indexing FFCV ``.beton`` files: the one module that reaches into ffcv.

Only converters and ``verify`` import ffcv (loading a ``.beton`` needs no ffcv: see
``pipelines/ffcv.py``). ffcv's ``RGBImageField`` re-encodes every image at quality 90.
fastload writes the already-prepared bytes into that field's storage directly (mode 'jpg'
for JPEGs, 'raw' for raw pixels: the metadata ffcv's own encoder writes), so the file reads
with stock ffcv decoders and passthrough JPEGs stay byte for byte what the source held.

ffcv internals used here, checked against the installed version by :func:`import_ffcv`:
``RGBImageField.encode``'s signature and ``IMAGE_MODES``; in ``ffcv.writer``, the module
globals ``worker_job_indexed_dataset``, ``sleep`` and ``tqdm`` (its worker, its polling
loop and its bar); ``Reader.alloc_table`` and ``Reader.metadata`` field names.
"""
from __future__ import annotations

import os
import types
from pathlib import Path

import numpy as np

FFCV_TESTED = ("1.0.2",)
BETON_PAGE_BYTES = 4 * 2**20  # ffcv's DatasetWriter page size (its default)


def import_ffcv():
    """Import ffcv (a tested version), without letting it change torch's thread count (it sets 1
    at import)."""
    from importlib.metadata import PackageNotFoundError, version
    try:
        installed = version("ffcv")
    except PackageNotFoundError:
        raise ImportError("ffcv is not installed: `pip install 'fastload[ffcv]'` (ffcv==1.0.2) to write .beton "
                          "files") from None
    if installed not in FFCV_TESTED and not os.environ.get("FASTLOAD_FFCV_UNTESTED"):
        raise ImportError(f"ffcv {installed} is installed; fastload's .beton writer uses ffcv internals tested "
                          f"with {', '.join(FFCV_TESTED)} only: `pip install ffcv==1.0.2`, or set "
                          "FASTLOAD_FFCV_UNTESTED=1 to try anyway (then run `fastload verify` on the output)")
    import torch
    threads = torch.get_num_threads()
    try:
        import ffcv  # noqa: F401
    finally:
        torch.set_num_threads(threads)
    return ffcv


def _encode_prepared(self, destination, value, malloc, mode):
    """``value`` is (stored bytes as uint8 array, height, width): a JPEG file (mode 'jpg') or raw
    RGB pixels (mode 'raw', what ffcv's own raw encoder writes), stored as is."""
    from ffcv.fields.rgb_image import IMAGE_MODES
    data, height, width = value
    destination["mode"] = IMAGE_MODES[mode]
    destination["height"], destination["width"] = height, width
    destination["data_ptr"], storage = malloc(data.nbytes)
    storage[:] = data


def passthrough_image_field(codec: str = "jpeg"):
    """An ``RGBImageField`` whose encoder stores prepared bytes (a JPEG, or raw pixels). It stays
    of type RGBImageField (ffcv records the field type by exact class), so stock ffcv reads it."""
    import_ffcv()
    import functools
    from ffcv.fields import RGBImageField
    mode = {"jpeg": "jpg", "raw": "raw"}[codec]
    field = RGBImageField(write_mode=mode)
    field.encode = types.MethodType(functools.partial(_encode_prepared, mode=mode), field)
    return field


def write_beton(path: Path, dataset, label_fields: dict[str, tuple[str, int]], num_workers: int,
                progress=None, codec: str = "jpeg") -> None:
    """Write ``dataset[i] -> ((stored bytes, h, w), label, extra labels...)`` to ``path``.

    ``label_fields`` maps field name -> ('int', 0) or ('ids', K) for padded multi-label ids.
    ``progress(n)`` is called with the samples written since the last call.

    ffcv's writer waits for its workers by polling a counter: a worker that dies (a full disk,
    a bad sample) used to leave it waiting forever. Here a worker's error is recorded in shared
    memory, the polling loop raises it, and the remaining workers are killed.
    """
    import ctypes
    import errno
    import multiprocessing as mp
    import torch
    import_ffcv()
    import ffcv.writer
    from ffcv.fields import IntField, NDArrayField
    fields = {"image": passthrough_image_field(codec)}
    for name, (kind, width) in label_fields.items():
        fields[name] = IntField() if kind == "int" else NDArrayField(np.dtype("<i2"), (width,))
    failure = mp.get_context("fork").Array(ctypes.c_char, 512, lock=False)
    work, poll, bar = ffcv.writer.worker_job_indexed_dataset, ffcv.writer.sleep, ffcv.writer.tqdm

    def worker_reporting_errors(*args):
        try:
            work(*args)
        except BaseException as e:  # recorded for the parent; no traceback on the user's terminal
            failure.value = f"{type(e).__name__}: {e}".encode(errors="replace")[:511]
            os._exit(1)

    def poll_watching_workers(seconds):
        if failure.value:
            message = failure.value.decode(errors="replace")
            raise OSError(errno.ENOSPC if "No space left" in message else errno.EIO,
                          f"ffcv's writer failed: {message}")
        poll(seconds)

    class Bar:  # ffcv's bar, reported to fastload's instead of drawn
        def __init__(self, *a, **k):
            pass

        def update(self, n):
            if progress is not None:
                progress(n)

        def close(self):
            pass

    before = set(mp.active_children())
    threads = torch.get_num_threads()
    ffcv.writer.worker_job_indexed_dataset = worker_reporting_errors
    ffcv.writer.sleep, ffcv.writer.tqdm = poll_watching_workers, Bar
    try:
        writer = ffcv.writer.DatasetWriter(str(path), fields, num_workers=max(1, num_workers))
        writer.from_indexed_dataset(dataset, chunksize=64)
    except BaseException:
        for child in set(mp.active_children()) - before:  # blocked waiting for a page that never comes
            child.kill()
            child.join()
        raise
    finally:
        ffcv.writer.worker_job_indexed_dataset, ffcv.writer.sleep, ffcv.writer.tqdm = work, poll, bar
        torch.set_num_threads(threads)


def beton_image_locations(path: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(offset, size, height, width) of every image in a .beton, in sample order."""
    import_ffcv()
    from ffcv.reader import Reader
    reader = Reader(str(path))
    meta = reader.metadata["f0"]
    table = reader.alloc_table
    ptr_to_size = dict(zip(table["ptr"].tolist(), table["size"].tolist()))
    offsets = meta["data_ptr"].astype(np.uint64)
    sizes = np.array([ptr_to_size[int(p)] for p in offsets], dtype=np.uint64)
    return offsets, sizes, meta["height"].astype(np.uint32), meta["width"].astype(np.uint32)
