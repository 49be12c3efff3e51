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

from .manifest import DatasetError, Manifest


class SampleDecodeError(DatasetError):
    """A stored sample that does not decode at load time; names the split, index and data file."""


RECORD_FIELDS = [("file", "<u2"), ("offset", "<u8"), ("size", "<u4"),
                 ("height", "<u4"), ("width", "<u4"), ("source_index", "<i8")]


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


class SplitReader:
    """Read-only view of one split: ``len``, ``stored(i)``, ``pixels(i)``, ``image(i)``, labels, sizes.

    Opening checks what is cheap (every listed file present at its recorded size, row count,
    labels in range) and raises :class:`DatasetError` naming the problem; checksums and a
    decode of every image are ``fastload verify``'s job."""

    def __init__(self, manifest: Manifest, split: str):
        self.manifest = manifest
        self.info = manifest.split(split)
        self.split = split
        self.codec = self.info.image_codec
        index = self.info.files_with_role("records")
        if not index:
            raise DatasetError(f"split {split!r} of {manifest.root} lists no records index")
        remedy = f"run `fastload verify {manifest.root}`, then convert again"
        for f in self.info.files:
            problem = self.info.file_problem(manifest.root, f)
            if problem:
                raise DatasetError(f"{problem}: {remedy}")
        path = manifest.path(index[0]["path"])
        self.records = np.load(path, mmap_mode="r")
        self.data_files = [manifest.path(f["path"]) for f in self.info.files_with_role("data")]
        self._maps: list[np.ndarray | None] = [None] * len(self.data_files)
        self._addresses = None
        self._lock = threading.RLock()  # maps are made once: a replaced map would unmap memory in use
        if len(self.records) != self.info.num_examples:
            raise DatasetError(f"{path}: {len(self.records)} rows, manifest says {self.info.num_examples}")
        if self.codec == "raw":
            wrong = np.flatnonzero(self.records["size"] != self.records["height"].astype(np.uint64)
                                   * self.records["width"] * 3)
            if len(wrong):
                raise DatasetError(f"{path}: split {split!r} stores raw pixels, but sample(s) {wrong[:10].tolist()} "
                                   f"are not height x width x 3 bytes: {remedy}")
        bad = self.labels_out_of_range()
        if len(bad):
            raise DatasetError(f"{path}: split {split!r} has labels outside 0..{manifest.num_classes - 1} at "
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
                    # subclass costs ~10x more, which shows at CIFAR rates
                    m = self._maps[file_index] = np.memmap(path, dtype=np.uint8, mode="r").view(np.ndarray)
        return m

    def stored(self, i: int) -> np.ndarray:
        """Sample i's stored bytes (a JPEG file, or raw pixels), a view of the mapped data file."""
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
        return addresses[index], sizes[index]

    def pixels(self, i: int) -> np.ndarray:
        """A raw split's sample i as a read-only (height, width, 3) uint8 view of the data file."""
        r = self.records[i]
        return self.stored(i).reshape(int(r["height"]), int(r["width"]), 3)

    def image(self, i: int):
        """The stored image as PIL (RGB): what the reference pipeline sees (decoded, or the raw pixels)."""
        from PIL import Image
        if self.codec == "raw":
            return Image.fromarray(self.pixels(i))
        try:
            im = Image.open(io.BytesIO(self.stored(i).tobytes()))
            im.load()
        except (OSError, SyntaxError, ValueError) as e:  # PIL's errors for bad image data
            raise self.sample_error(i, f"{type(e).__name__}: {e}") from None
        return im.convert("RGB") if im.mode != "RGB" else im

    def sample_error(self, i: int, problem: str) -> SampleDecodeError:
        data = self.data_files[int(self.records[i]["file"])]
        return SampleDecodeError(f"split {self.split!r} sample {i} (in {data}) does not decode: {problem}. "
                                 f"Run `fastload verify {self.manifest.root}`; reconvert with --skip-corrupt "
                                 "to leave such images out")

    @property
    def labels(self) -> np.ndarray:
        return np.asarray(self.records["label"])

    @property
    def heights(self) -> np.ndarray:
        return np.asarray(self.records["height"]).astype(np.int64)

    @property
    def widths(self) -> np.ndarray:
        return np.asarray(self.records["width"]).astype(np.int64)
