"""The dataset directory contract: ``manifest.json`` + data files (format documented in FORMAT.md).

A directory is complete exactly when its ``manifest.json`` exists: converters write it
last, atomically, after every data file is in place under its final name. Loaders
refuse a directory without one.

A dataset may come from someone else: everything read from the manifest is checked before it
is used (its shape and types, and every file it names lies inside the dataset's directory), and
a problem is one :class:`DatasetError` naming the entry.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from typing import TYPE_CHECKING

from .errors import DatasetError
from .versions import (CHECKSUM_FROM_VERSION, CHUNK_HASHES_FROM_VERSION, FORMAT_VERSION,  # noqa: F401 (the contract's)
                       RAW_FROM_VERSION, READABLE_VERSIONS)
from .writing import atomic_write_bytes

if TYPE_CHECKING:
    from .source import DatasetBytes

FORMAT_NAME = "fastload-dataset"
MANIFEST = "manifest.json"
STORAGE_NAMES = {"beton": ".beton", "tfrecord": "TFRecord"}  # the storages, and what users call them
STORAGES = tuple(STORAGE_NAMES)
IMAGE_CODECS = ("jpeg", "raw")
FILE_ROLES = ("data", "dali_index", "records")
CHECKSUM_KEY = "manifest_sha256"  # CHECKSUM_FROM_VERSION on: the manifest's own checksum (manifest_checksum)
MAX_MANIFEST_BYTES = 64 * 2**20  # ImageNet's, 1,250 shards listed: ~0.4 MB
LABEL_KINDS = ("single", "multi")


def contained_path(root: Path, relative, entry: str) -> Path:
    """``root / relative`` for a path a manifest names, which must stay inside the dataset's
    directory: relative, no ``..``, and no symlink on the way that leads out of it."""
    problem = None
    if (not isinstance(relative, str) or not relative or "\0" in relative or "\\" in relative
            or len(relative.encode(errors="replace")) > 1024 or any(len(part) > 255 for part in relative.split("/"))):
        problem = "is not a file name"
    else:
        parts = PurePosixPath(relative).parts
        if PurePosixPath(relative).is_absolute() or ".." in parts:
            problem = "is outside the dataset directory"
    if problem is None:
        path = Path(root) / relative
        real, real_root = os.path.realpath(path), os.path.realpath(root)
        if os.path.commonpath([real, real_root]) == real_root and real != real_root:
            return path
        problem = "leads outside the dataset directory (a symlink)"
    raise DatasetError(f"{Path(root) / MANIFEST}: {entry} path {relative!r} {problem}: a dataset's files must lie "
                       "inside its directory; this dataset cannot be used as it is")


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
        path = contained_path(root, f["path"], f"split {self.name!r} file")
        try:
            if not path.exists():
                return f"{path} is missing (listed in {root / MANIFEST})"
            if not path.is_file():
                return f"{path} is not a regular file (listed in {root / MANIFEST})"
            size = path.stat().st_size
        except OSError as e:
            return f"{path} cannot be read ({e.strerror}; listed in {root / MANIFEST})"
        if f.get("size") is not None and size != f["size"]:
            change = "truncated" if size < f["size"] else "grown"
            return f"{path} is {size} bytes, the manifest says {f['size']} ({change})"
        return None


@dataclass(frozen=True)
class Manifest:
    root: Path
    data: dict
    # where the bytes under ``root`` come from (formats/source.py): a local directory's are all
    # there; a dataset in object storage is its node-local cache, filled by fastload.storage
    source: "DatasetBytes" = field(default=None, compare=False)
    location: str | None = None  # the URL of a remote dataset, as its user gave it

    def __post_init__(self):
        if self.source is None:
            from .source import LocalBytes
            object.__setattr__(self, "source", LocalBytes(self.data))

    @property
    def name(self) -> str:
        """The dataset as its user named it: the URL of a remote one, else its directory."""
        return self.location or str(self.root)

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
        if path.stat().st_size > MAX_MANIFEST_BYTES:  # before reading it
            raise DatasetError(f"{path} is {path.stat().st_size} bytes: not a fastload manifest (at most "
                               f"{MAX_MANIFEST_BYTES} bytes)")
        return cls(root, parse_manifest(path.read_bytes(), path))

    @property
    def storage(self) -> str:
        return self.data["storage"]

    @property
    def split_names(self) -> list[str]:
        return list(self.data["splits"])

    def split(self, name: str) -> SplitInfo:
        splits = self.data["splits"]
        if name not in splits:
            raise DatasetError(f"split {name!r} is not in {self.name}: it has {sorted(splits)}")
        s = splits[name]
        return SplitInfo(name=name, num_examples=int(s["num_examples"]), files=s["files"],
                         stats=s.get("stats") or {}, skipped=s.get("skipped", []),
                         max_labels=int(s.get("max_labels", 1)), image_codec=s.get("image_codec", "jpeg"))

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

    def path(self, relative: str, entry: str = "file") -> Path:
        """A file the manifest names (checked to lie inside the dataset's directory)."""
        return contained_path(self.root, relative, entry)

    # -------------------------------------------------------------- writing
    def write(self) -> None:
        """Write ``manifest.json`` atomically, with its own checksum (version 3 on)."""
        data = {k: v for k, v in self.data.items() if k != CHECKSUM_KEY}
        if data["format_version"] >= CHECKSUM_FROM_VERSION:
            data[CHECKSUM_KEY] = manifest_checksum(data)
        atomic_write_bytes(self.root / MANIFEST, (json.dumps(data, indent=2) + "\n").encode())


# --------------------------------------------------------------------------- checking a manifest
def _is_int(v, lo: int = 0, hi: int = 2**63 - 1) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and lo <= v <= hi


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and v == v and abs(v) != float("inf")


def _problems(data) -> str | None:
    """The first thing wrong with a manifest's shape and values, or None."""
    if not isinstance(data, dict):
        return "is not a JSON object"
    if data.get("format") != FORMAT_NAME:
        return f"format={data.get('format')!r}, expected {FORMAT_NAME!r}"
    version = data.get("format_version")
    if version not in READABLE_VERSIONS or isinstance(version, bool):
        return (f"format_version={version!r}; this fastload reads versions {list(READABLE_VERSIONS)}: convert it "
                "again with this fastload")
    if data.get("storage") not in STORAGES:
        return f"storage={data.get('storage')!r}, expected one of {STORAGES}"
    labels = data.get("labels")
    if not isinstance(labels, dict) or labels.get("kind") not in LABEL_KINDS:
        return f"labels.kind is {labels.get('kind') if isinstance(labels, dict) else labels!r}, expected one of {LABEL_KINDS}"
    if not _is_int(labels.get("num_classes"), 1, 2**31 - 1):
        return f"labels.num_classes={labels.get('num_classes')!r}, expected an int >= 1"
    names = labels.get("names")
    if names is not None and not (isinstance(names, list) and len(names) == labels["num_classes"]
                                  and all(isinstance(n, str) for n in names)):
        return "labels.names is not a list of num_classes strings"
    if data.get("preset") is not None and not isinstance(data["preset"], str):
        return f"preset={data['preset']!r}, expected a preset name"
    splits = data.get("splits")
    if not isinstance(splits, dict) or not splits:
        return "splits is not a non-empty object"
    for name, s in splits.items():
        where = f"split {name!r}"
        if not isinstance(s, dict):
            return f"{where} is not an object"
        if not _is_int(s.get("num_examples")):
            return f"{where} num_examples={s.get('num_examples')!r}, expected an int >= 0"
        if s.get("image_codec", "jpeg") not in IMAGE_CODECS:
            return f"{where} has image_codec={s.get('image_codec')!r}, expected one of {IMAGE_CODECS}"
        if not _is_int(s.get("max_labels", 1), 1, 2**15 - 1):
            return f"{where} max_labels={s.get('max_labels')!r}, expected an int >= 1"
        stats = s.get("stats") or {}
        if not isinstance(stats, dict) or any(
                not (isinstance(stats.get(k), list) and len(stats[k]) == 3 and all(map(_is_number, stats[k])))
                for k in ("mean", "std") if k in stats):
            return f"{where} stats are not 3 numbers each for mean and std"
        if not isinstance(s.get("skipped", []), list):
            return f"{where} skipped is not a list"
        files = s.get("files")
        if not isinstance(files, list) or not files:
            return f"{where} lists no files"
        for k, f in enumerate(files):
            if not (isinstance(f, dict) and isinstance(f.get("path"), str) and f.get("role") in FILE_ROLES
                    and _is_int(f.get("size")) and (f.get("sha256") is None or isinstance(f.get("sha256"), str))):
                return f"{where} file entry {k} is not a path, role, size and sha256"
            if "chunk_size" in f and not (
                    _is_int(f["chunk_size"], 1) and isinstance(f.get("chunk_sha256"), list)
                    and len(f["chunk_sha256"]) == max(1, -(-f["size"] // f["chunk_size"]))
                    and all(isinstance(h, str) for h in f["chunk_sha256"])):
                return f"{where} file entry {k} has a chunk_size without a sha256 for each of its chunks"
        if sum(f["role"] == "records" for f in files) != 1 or not any(f["role"] == "data" for f in files):
            return f"{where} does not list one records index and its data files"
    return None


def manifest_checksum(data: dict) -> str:
    """sha256 of a manifest's content without its checksum: a changed byte of the manifest (a
    digit of the dataset's stats, a label name) is seen, as the data files' checksums see theirs."""
    body = {k: v for k, v in data.items() if k != CHECKSUM_KEY}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def parse_manifest(raw: bytes, where) -> dict:
    """A manifest's bytes read from ``where`` (a path or a URL), parsed and checked."""
    if len(raw) > MAX_MANIFEST_BYTES:
        raise DatasetError(f"{where} is {len(raw)} bytes: not a fastload manifest (at most {MAX_MANIFEST_BYTES} bytes)")
    try:
        data = json.loads(raw)
    except (ValueError, RecursionError) as e:  # JSON, UTF-8, or nesting too deep
        raise DatasetError(f"{where}: not valid JSON ({type(e).__name__}: {str(e)[:200]})") from None
    check_manifest(where, data)
    return data


def check_manifest(path: Path, data) -> None:
    """Raise :class:`DatasetError` naming the first problem of manifest ``data`` read from ``path``
    (every entry the loaders use is checked here; file paths also when they are used)."""
    problem = _problems(data)
    if problem is None and data["format_version"] >= CHECKSUM_FROM_VERSION and data.get(CHECKSUM_KEY) != manifest_checksum(data):
        problem = "does not match its own checksum (damaged or edited)"
    if problem:
        raise DatasetError(f"{path}: {problem}: this dataset cannot be used as it is; convert it again")
