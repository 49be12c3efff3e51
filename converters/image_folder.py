"""A local image folder with class subfolders, listed in seconds rather than minutes.

``datasets``' ``imagefolder`` infers splits by globbing 45 patterns over every file, then
looks up each file's metadata: 37 s for 50,000 CIFAR JPEGs here, before a single image is
read (so a 1.28 M-image ImageNet folder waits minutes), and its lists of every file stay in
the job's memory. For the two layouts every image-folder copy of CIFAR or ImageNet has,
``root/<class>/<file>`` (one split, 'train') and ``root/<split>/<class>/<file>``, this lists
the folder with ``os.scandir`` and gives the dataset ``datasets`` would: the same rows in
the same order (paths sorted), the same ``image`` (a path) and ``label`` (``ClassLabel`` of the
sorted class names) columns, the same split names. Anything it does not recognise (metadata
files, files at several depths, a split keyword inside a class or file name, one class only)
is left to ``datasets``: :func:`list_image_folder` returns None.
"""
from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path

# datasets' split keywords (datasets.data_files.SPLIT_KEYWORDS) and the split each names
SPLIT_DIRS = {"train": "train", "training": "train", "validation": "validation", "valid": "validation",
              "dev": "validation", "val": "validation", "test": "test", "testing": "test", "eval": "test",
              "evaluation": "test"}
# a keyword bounded by datasets' separators ("-._ 0-9") or a name's ends: datasets would read a
# split from such a name; such folders are left to it
_KEYWORD = re.compile(r"(?:^|[-._ 0-9])(?:%s)(?:[-._ 0-9]|$)" % "|".join(SPLIT_DIRS))
METADATA = ("metadata.csv", "metadata.jsonl", "metadata.parquet")


def _extensions() -> set[str]:
    from datasets.packaged_modules.imagefolder.imagefolder import ImageFolder
    return {e.lower() for e in ImageFolder.EXTENSIONS}


def _visible(name: str) -> bool:
    return not name.startswith((".", "__"))  # what datasets' globbing skips


def _dirs(path: str) -> list[os.DirEntry] | None:
    """The visible subfolders of ``path``, or None if it holds anything else visible."""
    out = []
    with os.scandir(path) as it:
        for e in it:
            if not _visible(e.name):
                continue
            if not e.is_dir():
                return None
            out.append(e)
    return out


def _class_files(class_dir: os.DirEntry, extensions: set[str], digest):
    """A class folder's image paths (sorted, an Arrow array: no Python string kept per file), or None."""
    names = []
    with os.scandir(class_dir.path) as it:
        for e in it:
            if not _visible(e.name):
                continue
            if e.is_dir() or e.name in METADATA or _KEYWORD.search(e.name):
                return None
            if os.path.splitext(e.name)[1].lower() in extensions:
                st = e.stat()
                names.append(e.name)
                digest.update(f"{e.name}:{st.st_size}:{st.st_mtime_ns};".encode())
    import pyarrow as pa
    prefix = class_dir.path + os.sep
    return pa.array([prefix + n for n in sorted(names)], pa.string())


def list_image_folder(root) -> dict | None:
    """{split: datasets.Dataset} for an image folder of a recognised layout, else None."""
    root = Path(root)
    if not root.is_dir() or any((root / m).exists() for m in METADATA):
        return None
    top = _dirs(str(root))
    if not top:
        return None
    if all(d.name in SPLIT_DIRS for d in top):
        if len({SPLIT_DIRS[d.name] for d in top}) != len(top):
            return None  # two folders for one split (train/ and training/): datasets merges them
        splits = {SPLIT_DIRS[d.name]: d for d in top}
    elif any(_KEYWORD.search(d.name) for d in top):
        return None
    else:
        splits = {"train": None}
    extensions = _extensions()
    listed, classes, digest = {}, set(), hashlib.sha256()
    for split, split_dir in splits.items():
        class_dirs = _dirs(split_dir.path) if split_dir is not None else top
        if not class_dirs or any(_KEYWORD.search(c.name) for c in class_dirs):
            return None
        files = []
        # paths sorted as strings, as datasets sorts them: a class folder's files follow its name and '/'
        for c in sorted(class_dirs, key=lambda c: c.name + "/"):
            paths = _class_files(c, extensions, digest)
            if paths is None:
                return None
            files.append((c.name, paths))
            classes.add(c.name)
        listed[split] = files
    if len(classes) < 2:
        return None  # datasets adds no label column then
    names = sorted(classes)
    out = {split: _dataset(files, names, digest.hexdigest()) for split, files in listed.items()}
    _return_freed_memory()
    return out


def _return_freed_memory() -> None:
    """Hand the listing's freed memory back to the OS (Arrow's pool and glibc keep it otherwise):
    the conversion's workers, forked next, would each count it in their resident memory."""
    import ctypes

    import pyarrow as pa
    pa.default_memory_pool().release_unused()
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


def _dataset(files, class_names: list[str], digest: str):
    import datasets
    import numpy as np
    import pyarrow as pa
    label_of = {n: i for i, n in enumerate(class_names)}
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=class_names)})
    schema = features.arrow_schema
    # a chunk per class folder, in the features' own Arrow types: no copy of the paths, no cast
    images = [pa.StructArray.from_arrays([pa.nulls(len(p), pa.binary()), p], fields=list(schema.field("image").type))
              for _, p in files]
    labels = [pa.array(np.full(len(p), label_of[name], np.int64)) for name, p in files]
    table = pa.Table.from_arrays([pa.chunked_array(images, schema.field("image").type),
                                  pa.chunked_array(labels, pa.int64())], schema=schema)
    # the files' names, sizes and times: what a resumed conversion checks it still reads (sources.py)
    info = datasets.DatasetInfo(features=features, description=f"fastload image folder, files {digest}")
    # the digest as its fingerprint: datasets would otherwise hash the whole table to make one
    # (pickling it: 0.45 GB held at once for 1.3 M paths)
    return datasets.Dataset(datasets.table.InMemoryTable(table), info=info, fingerprint=digest[:16])
