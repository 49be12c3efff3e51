"""Writing FFCV ``.beton`` files, laid out by fastload itself in ffcv's file format.

fastload does not use ffcv's ``DatasetWriter``: it re-encodes every image (``RGBImageField``
saves JPEGs at quality 90), copies every byte through a pool of processes that wait on each
other page by page, pads the file to whole 8 MiB pages (a 2,000-image CIFAR set took 17 MB for
2.4 MB of pixels), hangs when one of its workers dies, and importing ffcv alone takes seconds.
Here the already-prepared bytes (a passthrough JPEG, or raw pixels) are copied once, in order,
from the staged shards straight into the file's pieces (``fastload/bulk_write.py``: past the
page cache, hashed while written). No ffcv import is needed to write; reading with ffcv
(``verify``, the tests, raw FFCV in the benchmarks) goes through :func:`import_ffcv`, which
checks the version.

The layout is ffcv's file version 2, as ffcv 1.0.2's ``Reader`` and both of its memory
managers read it: header, field descriptors, the metadata table (one row per sample), data
blocks, then the allocation table up to the end of the file. One sample's bytes (its image,
then its multi-label ids) never cross a page boundary, because ffcv's process cache loads
whole pages; unlike ffcv's writer, the data starts right after the metadata and the last page
is not padded. The dtypes below are copied from ``ffcv/types.py`` and ``ffcv/fields/``;
``tests/test_convert.py`` checks them against the installed ffcv.
"""
from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .bulk_write import BulkFile

FFCV_TESTED = ("1.0.2",)
BETON_PAGE_BYTES = 8 * 2**20  # ffcv's DatasetWriter default page (4 x its 2 MiB minimum)
MAX_PAGE_BYTES = 1 << 32      # ffcv's limit: pages address with uint32

# ffcv/types.py
FILE_VERSION = 2
HEADER = np.dtype([("version", "<u2"), ("num_fields", "<u2"), ("page_size", "<u4"), ("num_samples", "<u8"),
                   ("alloc_table_ptr", "<u8")], align=True)
FIELD_DESCRIPTOR = np.dtype([("type_id", "<u1"), ("name", ("<u1", 16)), ("arguments", ("<u1", (1024,)))],
                            align=True)
ALLOC_TABLE = np.dtype([("sample_id", "<u8"), ("ptr", "<u8"), ("size", "<u8")])
# ffcv/fields: type ids (TYPE_ID_HANDLER), per-sample metadata, field arguments
INT_FIELD, RGB_IMAGE_FIELD, NDARRAY_FIELD = 1, 2, 4
IMAGE_METADATA = np.dtype([("mode", "<u1"), ("width", "<u2"), ("height", "<u2"), ("data_ptr", "<u8")])
IMAGE_MODES = {"jpeg": 0, "raw": 1}  # ffcv's IMAGE_MODES 'jpg', 'raw'
NDARRAY_ARGUMENTS = np.dtype([("shape", "<u8", 32), ("type_length", "<u8")])


def import_ffcv():
    """Import ffcv (a tested version), without letting it change torch's thread count (it sets 1
    at import)."""
    from importlib.metadata import PackageNotFoundError, version
    try:
        installed = version("ffcv")
    except PackageNotFoundError:
        raise ImportError("ffcv is not installed: `pip install 'fastload[stock-ffcv]'` (ffcv==1.0.2) to read .beton "
                          "files with ffcv") from None
    if installed not in FFCV_TESTED and not os.environ.get("FASTLOAD_FFCV_UNTESTED"):
        raise ImportError(f"ffcv {installed} is installed; fastload's .beton files are tested with "
                          f"ffcv {', '.join(FFCV_TESTED)} only: `pip install ffcv==1.0.2`, or set "
                          "FASTLOAD_FFCV_UNTESTED=1 to try anyway (then run `fastload verify` on the output)")
    import torch
    threads = torch.get_num_threads()
    try:
        import ffcv  # noqa: F401
    finally:
        torch.set_num_threads(threads)
    return ffcv


@dataclass
class BetonChunk:
    """Consecutive samples whose stored bytes lie in one file (a staged shard).

    ``rows`` is a records array (``fastload.records.records_dtype``): ``offset``/``size`` locate
    each sample's bytes in ``source``; ``height``, ``width`` and the label columns fill the
    .beton's metadata."""
    source: Path
    rows: np.ndarray


@dataclass(frozen=True)
class BetonField:
    """One ffcv field as the file records it."""
    name: str
    type_id: int
    metadata_type: np.dtype
    arguments: bytes = b""   # the descriptor's argument bytes (zeros for images and ints)
    block_bytes: int = 0     # bytes this field adds to a sample's data block


def beton_fields(label_fields: dict[str, tuple[str, int]]) -> list[BetonField]:
    """The image, then ``label_fields`` in order: ('int', 0) -> ffcv's ``IntField``; ('ids', K) ->
    ``NDArrayField`` of K int16 class ids (its data stored right after the image)."""
    fields = [BetonField("image", RGB_IMAGE_FIELD, IMAGE_METADATA)]
    for name, (kind, width) in label_fields.items():
        if kind == "int":
            fields.append(BetonField(name, INT_FIELD, np.dtype("<i8")))
            continue
        args = np.zeros(1, NDARRAY_ARGUMENTS)
        args["shape"][0][0] = width
        descr = json.dumps(np.dtype("<i2").descr).encode("ascii")  # what NDArrayField.to_binary writes
        args["type_length"] = len(descr)
        fields.append(BetonField(name, NDARRAY_FIELD, np.dtype("<u8"), args.tobytes() + descr, 2 * width))
    return fields


class BetonLayout:
    """Where everything goes in a .beton of ``num_samples`` samples with ``fields``."""

    def __init__(self, fields: list[BetonField], codec: str, num_samples: int, largest_block: int):
        self.fields, self.codec, self.num_samples = fields, codec, num_samples
        # ffcv's get_metadata_type: one unnamed (f0, f1, ...) member per field, aligned
        self.metadata_type = np.dtype([("", f.metadata_type) for f in fields], align=True)
        self.ids_bytes = sum(f.block_bytes for f in fields)
        self.page_size = BETON_PAGE_BYTES  # a power of two that holds the largest sample
        while self.page_size < largest_block:
            self.page_size *= 2
        if self.page_size >= MAX_PAGE_BYTES:
            raise ValueError(f"a sample of {largest_block} bytes is too large for a .beton (ffcv's pages are "
                             f"under {MAX_PAGE_BYTES} bytes): convert with --max-side to shrink it")
        self.metadata_start = HEADER.itemsize + FIELD_DESCRIPTOR.itemsize * len(fields)
        self.data_start = self.metadata_start + self.metadata_type.itemsize * num_samples
        self.data_end = self.data_start  # where the allocation table starts (set by plan_beton)

    def placed(self, chunks: Callable[[], Iterator[BetonChunk]]) -> Iterator[tuple[BetonChunk, np.ndarray]]:
        """Each chunk with the file offsets of its samples' blocks (one pass over ``chunks()``):
        packed in order from the data start, a block that would cross a page boundary moved to
        the next page."""
        pos, page = self.data_start, self.page_size
        for chunk in chunks():
            sizes = chunk.rows["size"].astype(np.int64) + self.ids_bytes
            offsets = np.empty(len(sizes), np.uint64)
            i = 0
            while i < len(sizes):  # vectorized between page crossings (one per page, not per sample)
                ends = pos + np.cumsum(sizes[i:])
                starts = ends - sizes[i:]
                crossing = np.flatnonzero(starts // page != (ends - 1) // page)
                j = int(crossing[0]) if len(crossing) else len(starts)
                offsets[i:i + j] = starts[:j]
                if j == len(starts):
                    pos = int(ends[-1])
                    break
                pos = (int(starts[j]) // page + 1) * page
                offsets[i + j] = pos
                pos += int(sizes[i + j])
                i += j + 1
            yield chunk, offsets


def plan_beton(chunks: Callable[[], Iterator[BetonChunk]], label_fields: dict[str, tuple[str, int]],
               codec: str) -> BetonLayout:
    """The layout of the .beton that :func:`write_beton` writes for ``chunks``: two passes, one
    for the sample count and the page size, one for where the data ends."""
    fields = beton_fields(label_fields)
    ids = sum(f.block_bytes for f in fields)
    n, largest = 0, 1
    for chunk in chunks():
        n += len(chunk.rows)
        if len(chunk.rows):
            largest = max(largest, int(chunk.rows["size"].max()) + ids)
    layout = BetonLayout(fields, codec, n, largest)
    for chunk, offsets in layout.placed(chunks):
        if len(offsets):
            layout.data_end = int(offsets[-1]) + int(chunk.rows["size"][-1]) + ids
    return layout


CHUNK_BYTES = 32 * 2**20  # a remote reader's unit of transfer: a run of pages at most this long
# ...and at least this many to a file, pages allowing: a shard-aware order deals units to ranks, and
# a cache smaller than a node's share holds a few per rank, so a small dataset needs small units
CHUNKS_PER_FILE = 64


def chunk_size(layout: "BetonLayout") -> int:
    """Whole pages (no sample block crosses a page, so none crosses a chunk): at most CHUNK_BYTES,
    and about 1/CHUNKS_PER_FILE of the file where that is more than a page."""
    target = min(CHUNK_BYTES, layout.data_end // CHUNKS_PER_FILE)
    return layout.page_size * max(1, target // layout.page_size)


def write_beton(path: Path, layout: BetonLayout, chunks: Callable[[], Iterator[BetonChunk]],
                progress: Callable[[int], None] | None = None) -> tuple[int, str, list[str]]:
    """Write the .beton ``layout`` plans (see :func:`plan_beton`) to ``path``: one sequential
    pass, hashed as it goes. ``chunks()`` is read once per section (metadata, data, allocation
    table), each time yielding the same chunks in order; ``progress(n)`` counts samples whose
    bytes are written. Returns (size, sha256 hex, the sha256 hex of each ``chunk_size(layout)``)."""
    out = BulkFile(path, progress, chunk_size=chunk_size(layout))
    try:
        _write_sections(out, layout, chunks)
        out.close()
    except BaseException:
        out.abandon()
        Path(path).unlink(missing_ok=True)  # no half-written .beton left behind (a full disk, ^C)
        raise
    return out.size, out.sha256.hexdigest(), out.chunks.hexdigests()


def _read_blocks(piece: np.ndarray, fd: int, starts: np.ndarray, source_offsets: np.ndarray, sizes: np.ndarray,
                 labels: np.ndarray | None) -> None:
    """Each sample's stored bytes from file ``fd`` into ``piece`` at ``starts`` (read straight
    in: no map of the source to fault in), its ids array right after (as ffcv's NDArrayField
    reads it), and zeros in the gaps left before page boundaries."""
    view = memoryview(piece)
    ends = starts + sizes + (labels.shape[1] if labels is not None else 0)
    piece[:starts[0]] = 0
    for gap in np.flatnonzero(starts[1:] > ends[:-1]):
        piece[ends[gap]:starts[gap + 1]] = 0
    for k, (at, src, size) in enumerate(zip(starts.tolist(), source_offsets.tolist(), sizes.tolist())):
        if os.preadv(fd, [view[at:at + size]], src) != size:
            raise OSError(f"staged file ended before sample bytes {src}..{src + size}")
        if labels is not None:
            piece[at + size:at + size + labels.shape[1]] = labels[k]


def _write_sections(f: BulkFile, layout: BetonLayout, chunks) -> None:
    fields, ids = layout.fields, layout.ids_bytes
    header = np.zeros(1, HEADER)
    header["version"], header["num_fields"] = FILE_VERSION, len(fields)
    header["page_size"], header["num_samples"] = layout.page_size, layout.num_samples
    header["alloc_table_ptr"] = layout.data_end
    f.write(header.tobytes())
    descriptors = np.zeros(len(fields), FIELD_DESCRIPTOR)
    for i, field in enumerate(fields):
        name = np.frombuffer(field.name.encode("ascii"), "<u1")[:16]
        descriptors[i]["type_id"] = field.type_id
        descriptors[i]["name"][:len(name)] = name
        descriptors[i]["arguments"][:len(field.arguments)] = np.frombuffer(field.arguments, "<u1")
    f.write(descriptors.tobytes())

    for chunk, offsets in layout.placed(chunks):  # the metadata table
        meta = np.zeros(len(chunk.rows), layout.metadata_type)
        image = meta["f0"]
        image["mode"], image["data_ptr"] = IMAGE_MODES[layout.codec], offsets
        image["height"], image["width"] = chunk.rows["height"], chunk.rows["width"]
        for k, field in enumerate(fields[1:], start=1):
            if field.type_id == NDARRAY_FIELD:
                meta[f"f{k}"] = offsets + chunk.rows["size"]
            else:
                meta[f"f{k}"] = chunk.rows["label" if k == 1 else field.name]
        f.write(meta.tobytes())

    pos = layout.data_start  # the data blocks, read from the staged shards straight into the file's pieces
    for chunk, offsets in layout.placed(chunks):
        if not len(offsets):
            continue
        sizes = chunk.rows["size"].astype(np.int64)
        ends = offsets.astype(np.int64) + sizes + ids
        labels = np.ascontiguousarray(chunk.rows["label"], dtype="<i2").view(np.uint8) if ids else None
        with open(chunk.source, "rb", buffering=0) as source:
            i = 0
            while i < len(offsets):  # the samples whose blocks fit in the current piece (at least one)
                j = max(i + 1, int(np.searchsorted(ends, pos + f.room(), side="right")))
                nbytes = int(ends[j - 1]) - pos
                _read_blocks(f.take(nbytes, samples=j - i), source.fileno(), offsets[i:j].astype(np.int64) - pos,
                             chunk.rows["offset"][i:j], sizes[i:j], labels[i:j] if ids else None)
                pos, i = int(ends[j - 1]), j
    if pos != layout.data_end:
        raise AssertionError(f"data ends at {pos}, planned {layout.data_end}")

    sample = 0
    for chunk, offsets in layout.placed(chunks):  # the allocation table, to the end of the file
        n = len(offsets)
        table = np.zeros(n * (2 if ids else 1), ALLOC_TABLE)
        sample_ids = np.arange(sample, sample + n, dtype=np.uint64)
        table["sample_id"][:n], table["ptr"][:n], table["size"][:n] = sample_ids, offsets, chunk.rows["size"]
        if ids:
            table["sample_id"][n:], table["ptr"][n:] = sample_ids, offsets + chunk.rows["size"]
            table["size"][n:] = ids
        f.write(table.tobytes())
        sample += n
