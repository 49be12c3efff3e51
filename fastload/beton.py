"""Writing and indexing FFCV ``.beton`` files (imports ffcv lazily: only converters need it).

ffcv's ``RGBImageField`` re-encodes every image at quality 90. fastload writes the
already-prepared JPEG bytes into that field's storage directly (mode 'jpg', the same
metadata ffcv's own encoder writes), so the file reads with stock ffcv decoders and
passthrough JPEGs stay byte for byte what the source held.
"""
from __future__ import annotations

import types
from pathlib import Path
from typing import Sequence

import numpy as np


def import_ffcv():
    """Import ffcv without letting it change torch's thread count (it sets 1 at import)."""
    import torch
    threads = torch.get_num_threads()
    try:
        import ffcv  # noqa: F401
    finally:
        torch.set_num_threads(threads)
    return ffcv


def _encode_jpeg_passthrough(self, destination, value, malloc):
    """``value`` is (jpeg bytes as uint8 array, height, width): stored as is, mode 'jpg'."""
    from ffcv.fields.rgb_image import IMAGE_MODES
    jpeg, height, width = value
    destination["mode"] = IMAGE_MODES["jpg"]
    destination["height"], destination["width"] = height, width
    destination["data_ptr"], storage = malloc(jpeg.nbytes)
    storage[:] = jpeg


def passthrough_image_field():
    """An ``RGBImageField`` whose encoder stores given JPEG bytes. It stays of type
    RGBImageField (ffcv records the field type by exact class), so readers need nothing custom."""
    import_ffcv()
    from ffcv.fields import RGBImageField
    field = RGBImageField(write_mode="jpg")
    field.encode = types.MethodType(_encode_jpeg_passthrough, field)
    return field


def write_beton(path: Path, dataset, label_fields: dict[str, tuple[str, int]], num_workers: int) -> None:
    """Write ``dataset[i] -> ((jpeg, h, w), label, extra labels...)`` to ``path``.

    ``label_fields`` maps field name -> ('int', 0) or ('ids', K) for padded multi-label ids.
    """
    import_ffcv()
    from ffcv.fields import IntField, NDArrayField
    from ffcv.writer import DatasetWriter
    import torch
    fields = {"image": passthrough_image_field()}
    for name, (kind, width) in label_fields.items():
        fields[name] = IntField() if kind == "int" else NDArrayField(np.dtype("<i2"), (width,))
    import ffcv.writer
    from tqdm import tqdm
    threads = torch.get_num_threads()
    bar = ffcv.writer.tqdm
    ffcv.writer.tqdm = lambda *a, **k: tqdm(*a, **{**k, "disable": True})  # fastload shows its own bar
    try:
        writer = DatasetWriter(str(path), fields, num_workers=max(1, num_workers))
        writer.from_indexed_dataset(dataset, chunksize=64)
    finally:
        ffcv.writer.tqdm = bar
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


def beton_field_names(path: Path) -> Sequence[str]:
    import_ffcv()
    from ffcv.reader import Reader
    return list(Reader(str(path)).handlers)
