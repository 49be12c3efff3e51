"""Random access to a converted split, whatever its storage.

Every split has a records index, ``<split>.records.npy``: one row per stored image
with the data file it lives in, the byte offset and size of its stored bytes inside that
file (a JPEG, or raw RGB pixels when the split's ``image_codec`` is 'raw'),
its height/width and its labels. With it, any reader (the reference pipeline, DALI's
external source, ``verify``, ``inspect``) slices a JPEG straight out of a memory-mapped
``.beton`` or TFRecord shard: no scan, no backend import.
"""
from __future__ import annotations

import io
import threading

import numpy as np

from .errors import DatasetError, SampleDecodeError  # noqa: F401 (SampleDecodeError: raised by readers of this module)
from .manifest import CHECKSUM_FROM_VERSION, Manifest
from .writing import sha256_file

RECORD_FIELDS = [("file", "<u2"), ("offset", "<u8"), ("size", "<u4"), ("crc32c", "<u4"),
                 ("height", "<u4"), ("width", "<u4"), ("source_index", "<i8")]

MAX_SIDE = 65535  # pixels: JPEG's limit, and any stored image's
# pixels per image: the decompression-bomb guard at conversion and at load, by default PIL's own
# (twice Image.MAX_IMAGE_PIXELS, where PIL refuses to open an image)
DEFAULT_MAX_PIXELS = 178_956_970


def records_dtype(label_columns: list[str], multi_label: bool, max_labels: int) -> np.dtype:
    """``label`` is int64, or int16[max_labels] padded with -1 for multi-label data; other
    label columns (e.g. cifar100's ``coarse_label``) are int64 fields of their own name."""
    fields = list(RECORD_FIELDS)
    for i, col in enumerate(label_columns):
        name = "label" if i == 0 else col
        if i == 0 and multi_label:
            fields.append((name, "<i2", (max(1, max_labels),)))
        else:
            fields.append((name, "<i8"))
    return np.dtype(fields)


def records_filename(split: str) -> str:
    return f"{split}.records.npy"


def check_max_pixels(max_pixels) -> int:
    if not isinstance(max_pixels, int) or isinstance(max_pixels, bool) or max_pixels < 1:
        raise ValueError(f"max_pixels={max_pixels!r} is invalid: allowed an int >= 1 (default {DEFAULT_MAX_PIXELS}, "
                         "PIL's decompression-bomb limit)")
    return max_pixels


class SplitReader:
    """Read-only view of one split: ``len``, ``stored(i)``, ``pixels(i)``, ``image(i)``, labels, sizes.

    Opening checks, vectorized over the records index, everything the loaders then rely on:
    every listed file inside the dataset, present at its recorded size; the index's own sha256, its
    fields and row count; every sample's bytes inside its data file, its size consistent with its
    codec, its dimensions positive and within ``max_pixels``, its labels class ids. A problem is one
    :class:`DatasetError` naming it. Each sample's bytes are checked when read (its CRC32C; for a
    JPEG, its markers and frame size: the backends' job, ``pipelines/samples.py``); a decode of
    every image is ``fastload verify``'s.

    The bytes come through ``manifest.source`` (formats/source.py): :meth:`ensure` makes samples
    present before they are read, :meth:`heal` fetches a sample again, ``volatile`` says whether
    bytes may change under a reader. A local directory's source does nothing."""

    def __init__(self, manifest: Manifest, split: str, max_pixels: int = DEFAULT_MAX_PIXELS):
        self.manifest = manifest
        self.info = manifest.split(split)
        self.split = split
        self.codec = self.info.image_codec
        self.max_pixels = check_max_pixels(max_pixels)
        self.remedy = remedy = f"run `fastload verify {manifest.name}`, then convert again"
        entry = self.info.files_with_role("records")[0]
        manifest.source.fetch_file(entry["path"])  # a remote dataset's index, fetched and checked first
        for f in self.info.files:
            problem = self.info.file_problem(manifest.root, f)
            if problem:
                raise DatasetError(f"{problem}: {remedy}")
        path = manifest.path(entry["path"], f"split {split!r} records index")
        data = self.info.files_with_role("data")
        self.data_files = [manifest.path(f["path"], f"split {split!r} data file") for f in data]
        self._data_sizes = np.array([f["size"] for f in data], np.uint64)  # each file's, checked above
        self.records = self._open_records(path)
        self._check_records(path)
        if entry.get("sha256") and sha256_file(path) != entry["sha256"]:
            raise DatasetError(f"{path} does not match its sha256 in the manifest (damaged or changed): {remedy}")
        self._data_paths = [f["path"] for f in data]
        self.source = manifest.source.open_split(self._data_paths, self.records, self.crcs)
        self._units = None
        self._maps: list[np.ndarray | None] = [None] * len(self.data_files)
        self._addresses = None
        self._lock = threading.RLock()  # maps are made once: a replaced map would unmap memory in use

    def _open_records(self, path) -> np.ndarray:
        """The records index, memory-mapped, with the fields and types this format version has."""
        try:
            records = np.load(path, mmap_mode="r", allow_pickle=False)
        except Exception as e:  # numpy's header parser raises assorted types for a damaged .npy
            raise DatasetError(f"{path} is not a records index ({type(e).__name__}: {e}): {self.remedy}") from None
        want = dict(RECORD_FIELDS)
        if self.manifest.data["format_version"] < CHECKSUM_FROM_VERSION:
            del want["crc32c"]
        names = records.dtype.names or ()
        label = records.dtype.fields.get("label") if records.dtype.fields else None
        multi = self.manifest.multi_label
        problem = None
        if records.ndim != 1 or not names:
            problem = "is not a one-dimensional table"
        elif any(n not in names or records.dtype[n] != np.dtype(d) for n, d in want.items()):
            problem = f"does not have the fields {want}"
        elif label is None or (label[0] != np.dtype("<i8") if not multi else
                               (label[0].base != np.dtype("<i2") or label[0].ndim != 1)):
            problem = "has no label field of the manifest's kind"
        elif any(records.dtype[n] != np.dtype("<i8") for n in names if n not in want and n != "label"):
            problem = "has a label column that is not int64"
        if problem:
            raise DatasetError(f"{path} {problem} ({records.dtype}): {self.remedy}")
        return records

    def _check_records(self, path) -> None:
        """Every row within bounds (vectorized: ~0.1 s for ImageNet's 1.28 M rows)."""
        r, split, remedy = self.records, self.split, self.remedy

        def refuse(mask: np.ndarray, what: str) -> None:
            bad = np.flatnonzero(mask)
            if len(bad):
                raise DatasetError(f"{path}: split {split!r} sample(s) {bad[:10].tolist()} {what}: {remedy}")
        if len(r) != self.info.num_examples:
            raise DatasetError(f"{path}: {len(r)} rows, manifest says {self.info.num_examples}")
        file = np.asarray(r["file"])
        refuse(file >= len(self.data_files), f"name a data file the split does not have (of {len(self.data_files)})")
        limit = self._data_sizes[file] if len(self.data_files) else np.zeros(len(r), np.uint64)
        offset, size = np.asarray(r["offset"]), np.asarray(r["size"]).astype(np.uint64)
        refuse((size > limit) | (offset > limit - np.minimum(size, limit)), "lie outside their data file")
        height, width = np.asarray(r["height"]).astype(np.uint64), np.asarray(r["width"]).astype(np.uint64)
        refuse((height < 1) | (width < 1) | (height > MAX_SIDE) | (width > MAX_SIDE),
               f"have a height or width outside 1..{MAX_SIDE}")
        refuse(height * width > self.max_pixels,
               f"have more than max_pixels={self.max_pixels} pixels (a decompression-bomb guard: raise max_pixels "
               "if you trust this dataset)")
        if self.codec == "raw":
            wrong = np.flatnonzero(size != height * width * 3)
            if len(wrong):
                raise DatasetError(f"{path}: split {split!r} stores raw pixels, but sample(s) {wrong[:10].tolist()} "
                                   f"are not height x width x 3 bytes: {remedy}")
        else:
            refuse(size < 4, "are too small to be JPEG files")
        bad = self.labels_out_of_range()
        if len(bad):
            raise DatasetError(f"{path}: split {split!r} has labels outside 0..{self.manifest.num_classes - 1} at "
                               f"index(es) {bad[:10].tolist()}: {remedy}")

    def labels_out_of_range(self) -> np.ndarray:
        """Indices of samples whose label is not a class id (multi-label rows: -1 pads)."""
        labels, n = self.labels, self.manifest.num_classes
        if self.manifest.multi_label:
            return np.nonzero(((labels < -1) | (labels >= n)).any(axis=1))[0]
        return np.nonzero((labels < 0) | (labels >= n))[0]

    def __len__(self) -> int:
        return len(self.records)

    def mapped(self, file_index: int) -> np.ndarray:
        """Data file ``file_index`` as a read-only uint8 array (memory-mapped once per reader)."""
        m = self._maps[file_index]
        if m is None:
            with self._lock:
                m = self._maps[file_index]
                if m is None:
                    path = self.data_files[file_index]
                    if not path.exists():
                        raise DatasetError(f"data file {path} is missing (listed in the manifest)")
                    # a plain ndarray view of the map (it keeps the map alive): slicing an np.memmap
                    # subclass costs ~10x more, which shows at CIFAR rates. An empty file has no map.
                    m = (np.memmap(path, dtype=np.uint8, mode="r").view(np.ndarray) if self._data_sizes[file_index]
                         else np.zeros(0, np.uint8))
                    m.setflags(write=False)  # read-only either way (one type for compiled readers)
                    self._maps[file_index] = m
        return m

    @property
    def volatile(self) -> bool:
        """Whether stored bytes may change under this reader (a cache that other ranks evict from):
        then they are always checked, and decoders get checked copies rather than views."""
        return self.source.volatile

    def ensure(self, index: np.ndarray) -> None:
        """Samples ``index`` present (a no-op for a local dataset; a remote one's fetched as needed)."""
        self.source.ensure(index)

    def heal(self, i: int) -> bool:
        """Sample i failed its check as read: fetch it again from where it came from (True: check
        it again). A local dataset has nothing to heal from."""
        return self.source.heal(i)

    def close(self) -> None:
        self.source.close()

    def stored(self, i: int) -> np.ndarray:
        """Sample i's stored bytes (a JPEG file, or raw pixels), a view of the mapped data file."""
        self.source.ensure(np.array([i]))
        r = self.records[i]
        off = int(r["offset"])
        return self.mapped(int(r["file"]))[off:off + int(r["size"])]

    def stored_addresses(self, index: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(memory address, size) of samples' stored bytes in the mapped data files, for native
        readers; valid while this reader lives."""
        if self._addresses is None:  # once per reader: per batch, two plain gathers
            with self._lock:
                bases = np.array([self.mapped(f).ctypes.data for f in range(len(self.data_files))], np.uint64)
                sizes = np.asarray(self.records["size"]).astype(np.uint64)
                self._addresses = (bases[np.asarray(self.records["file"])]
                                   + np.asarray(self.records["offset"]).astype(np.uint64), sizes)
        addresses, sizes = self._addresses
        self.ensure(index)
        return addresses[index], sizes[index]

    def pixels(self, i: int) -> np.ndarray:
        """A raw split's sample i as a read-only (height, width, 3) uint8 view of the data file."""
        r = self.records[i]
        return self.stored(i).reshape(int(r["height"]), int(r["width"]), 3)

    def stored_batch(self, index: np.ndarray, shaped: bool = False) -> list[np.ndarray]:
        """:meth:`stored` (``shaped``: :meth:`pixels`) of samples ``index``, made present at once:
        a batch's views in a few microseconds a sample less than one by one (the DALI backend's
        feed of 50,000 CIFAR images an epoch spent 0.2 s on them)."""
        index = np.asarray(index, np.int64)
        self.source.ensure(index)
        r = self.records[index]
        files, starts = r["file"].tolist(), r["offset"].astype(np.int64)
        ends = (starts + r["size"].astype(np.int64)).tolist()
        maps = {f: self.mapped(f) for f in set(files)}
        views = [maps[f][a:b] for f, a, b in zip(files, starts.tolist(), ends)]
        if not shaped:
            return views
        return [v.reshape(h, w, 3) for v, h, w in zip(views, r["height"].tolist(), r["width"].tolist())]

    def image(self, i: int, stored: np.ndarray | None = None):
        """The stored image as PIL (RGB): what the reference pipeline sees (decoded, or the raw
        pixels); from ``stored``, its bytes already read, when given."""
        from PIL import Image
        data = self.stored(i) if stored is None else stored
        if self.codec == "raw":
            r = self.records[i]
            return Image.fromarray(np.asarray(data).reshape(int(r["height"]), int(r["width"]), 3))
        try:
            im = Image.open(io.BytesIO(data.tobytes()))
            im.load()
        except Exception as e:  # PIL raises many types for bad image data, its bomb guard among them
            raise self.sample_error(i, f"{type(e).__name__}: {e}") from None
        return im.convert("RGB") if im.mode != "RGB" else im

    def sample_error(self, i: int, problem: str) -> SampleDecodeError:
        data = self.data_files[int(self.records[i]["file"])]
        return SampleDecodeError(f"split {self.split!r} sample {i} (in {data}) does not decode: {problem}. "
                                 f"Run `fastload verify {self.manifest.name}`: a damaged copy is copied or fetched "
                                 "again; an image bad in the source is left out by converting with --skip-corrupt")

    @property
    def crcs(self) -> np.ndarray | None:
        """Each sample's CRC32C, or None for a dataset written before format version 3."""
        return np.asarray(self.records["crc32c"]) if "crc32c" in self.records.dtype.names else None

    @property
    def units(self) -> np.ndarray:
        """Each sample's unit of transfer (the one it starts in: formats/units.py's numbering)."""
        if self._units is None:
            self._units = self.manifest.source.units.of_samples(self._data_paths, self.records)[0]
        return self._units

    @property
    def labels(self) -> np.ndarray:
        return np.asarray(self.records["label"])

    @property
    def heights(self) -> np.ndarray:
        return np.asarray(self.records["height"]).astype(np.int64)

    @property
    def widths(self) -> np.ndarray:
        return np.asarray(self.records["width"]).astype(np.int64)
