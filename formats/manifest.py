"""The dataset directory contract: ``manifest.json`` + data files (format documented in FORMAT.md).

A directory is complete exactly when its ``manifest.json`` exists: converters write it
last, atomically, after every data file is in place under its final name. Loaders
refuse a directory without one.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

FORMAT_NAME = "fastload-dataset"
FORMAT_VERSION = 2           # 2: a split may store raw RGB pixels (``image_codec``); 1 stored JPEG only
READABLE_VERSIONS = (1, 2)   # a version 1 directory reads as version 2 with every split 'jpeg'
MANIFEST = "manifest.json"
STORAGE_NAMES = {"beton": ".beton", "tfrecord": "TFRecord"}  # the storages, and what users call them
STORAGES = tuple(STORAGE_NAMES)
IMAGE_CODECS = ("jpeg", "raw")


class DatasetError(ValueError):
    """A dataset directory that is missing, incomplete, or not what the caller asked for."""


def sha256_file(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


class HashingFile:
    """Sequential writes to file ``f``, hashed (sha256) and counted on the way: a checksum with
    no second read of what was written."""

    def __init__(self, f):
        self.f, self.sha256, self.size = f, hashlib.sha256(), 0

    def write(self, data) -> None:
        self.f.write(data)
        self.sha256.update(data)
        self.size += memoryview(data).nbytes


def atomic_write_bytes(path: Path, data: bytes, durable: bool = True) -> None:
    """Write ``path`` whole or not at all (a temporary name, renamed). ``durable``: on disk
    before the rename (fsync); without it the file survives the process (kill -9) but not a
    power cut, for bookkeeping that a later step syncs or can redo."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        if durable:
            os.fsync(f.fileno())
    os.replace(tmp, path)


def fsync_file(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


@dataclass(frozen=True)
class SplitInfo:
    name: str
    num_examples: int
    files: list[dict]
    stats: dict
    skipped: list[dict]
    max_labels: int
    image_codec: str = "jpeg"  # how each stored image is held: a JPEG file, or raw RGB uint8 (h, w, 3)

    def files_with_role(self, role: str) -> list[dict]:
        return [f for f in self.files if f["role"] == role]

    def file_problem(self, root: Path, f: dict) -> str | None:
        """What is wrong with listed file ``f`` that is cheap to see (missing, or not its recorded
        size), or None. Opening a split and ``verify`` both apply this one rule."""
        path = root / f["path"]
        if not path.exists():
            return f"{path} is missing (listed in {root / MANIFEST})"
        size = path.stat().st_size
        if f.get("size") is not None and size != f["size"]:
            change = "truncated" if size < f["size"] else "grown"
            return f"{path} is {size} bytes, the manifest says {f['size']} ({change})"
        return None


@dataclass(frozen=True)
class Manifest:
    root: Path
    data: dict

    # -------------------------------------------------------------- reading
    @classmethod
    def read(cls, root: str | os.PathLike) -> "Manifest":
        root = Path(root)
        if not root.exists():
            raise DatasetError(f"dataset directory {str(root)!r} does not exist")
        if not root.is_dir():
            raise DatasetError(f"{str(root)!r} is not a directory (expected a dataset directory with {MANIFEST})")
        path = root / MANIFEST
        if not path.exists():
            partial = (root / ".partial").exists()
            hint = (" A conversion started here and did not finish: rerun the same `fastload convert` to resume."
                    if partial else " Create one with `fastload convert`.")
            raise DatasetError(f"{str(root)!r} has no {MANIFEST}, so it is not a complete fastload dataset.{hint}")
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise DatasetError(f"{path}: not valid JSON ({e})") from None
        if data.get("format") != FORMAT_NAME:
            raise DatasetError(f"{path}: format={data.get('format')!r}, expected {FORMAT_NAME!r}")
        version = data.get("format_version")
        if version not in READABLE_VERSIONS:
            raise DatasetError(f"{path}: format_version={version!r}; this fastload reads versions "
                               f"{list(READABLE_VERSIONS)}: convert it again with this fastload")
        if data.get("storage") not in STORAGES:
            raise DatasetError(f"{path}: storage={data.get('storage')!r}, expected one of {STORAGES}")
        return cls(root, data)

    @property
    def storage(self) -> str:
        return self.data["storage"]

    @property
    def split_names(self) -> list[str]:
        return list(self.data["splits"])

    def split(self, name: str) -> SplitInfo:
        splits = self.data["splits"]
        if name not in splits:
            raise DatasetError(f"split {name!r} is not in {self.root}: it has {sorted(splits)}")
        s = splits[name]
        codec = s.get("image_codec", "jpeg")
        if codec not in IMAGE_CODECS:
            raise DatasetError(f"{self.root / MANIFEST}: split {name!r} has image_codec={codec!r}, expected one of "
                               f"{IMAGE_CODECS}")
        return SplitInfo(name=name, num_examples=int(s["num_examples"]), files=s["files"],
                         stats=s.get("stats") or {}, skipped=s.get("skipped", []),
                         max_labels=int(s.get("max_labels", 1)), image_codec=codec)

    @property
    def labels(self) -> dict:
        return self.data["labels"]

    @property
    def multi_label(self) -> bool:
        return self.labels["kind"] == "multi"

    @property
    def num_classes(self) -> int:
        return int(self.labels["num_classes"])

    @property
    def class_names(self) -> list[str]:
        return list(self.labels.get("names") or [str(i) for i in range(self.num_classes)])

    @property
    def preset(self) -> str:
        return self.data.get("preset") or "imagenet"

    def path(self, relative: str) -> Path:
        return self.root / relative

    # -------------------------------------------------------------- writing
    def write(self) -> None:
        atomic_write_bytes(self.root / MANIFEST, (json.dumps(self.data, indent=2) + "\n").encode())
