"""Opening a source dataset and reading its schema (which column is the image, which the labels).

Sources: a Hugging Face hub name (``cifar10``, ``imagenet-1k``, ``detection-datasets/coco``),
a local folder in the hub's parquet layout, a ``save_to_disk`` folder, or an image folder
with class subfolders. Hub names and local folders take the same ``load_dataset`` path.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from .image_folder import list_image_folder

IMAGE_COLUMNS = ("image", "img")
TARGET_PREFERENCE = ("label", "fine_label", "labels")
MULTI_LABEL_OBJECTS = ("objects",)


class SchemaError(ValueError):
    """The source's columns do not say which is the image or the label."""


@dataclass
class Schema:
    image_column: str
    target: str                                   # the training target column
    kind: str                                     # 'single' or 'multi'
    num_classes: int
    class_names: list[str]
    extra_labels: list[str] = field(default_factory=list)   # kept beside the target (cifar100 coarse_label)
    extra_names: dict[str, list[str]] = field(default_factory=dict)
    objects_column: str | None = None             # COCO: labels = categories present in `objects`

    @property
    def label_columns(self) -> list[str]:
        return [self.target, *self.extra_labels]

    def to_manifest(self) -> dict:
        columns = {self.target: {"num_classes": self.num_classes, "names": self.class_names}}
        for col in self.extra_labels:
            columns[col] = {"num_classes": len(self.extra_names[col]), "names": self.extra_names[col]}
        return {"kind": self.kind, "target": self.target, "num_classes": self.num_classes,
                "names": self.class_names, "columns": columns,
                "source_columns": {"image": self.image_column, "objects": self.objects_column}}

    def labels_of(self, row: dict) -> dict[str, list[int]]:
        """Label values of one source row, as lists (one id, or the multi-label ids)."""
        if self.kind == "multi":
            cats = row[self.objects_column]["category"]
            if any(c is None for c in cats):
                raise SchemaError(f"a category in {self.objects_column!r} is empty (None): fill it or drop the row "
                                  "(datasets' filter) before converting")
            return {self.target: sorted(set(int(c) for c in cats))}
        empty = [col for col in self.label_columns if row[col] is None]
        if empty:
            raise SchemaError(f"label column(s) {empty} are empty (None): fill them or drop those rows (e.g. "
                              f"ds.filter(lambda r: r[{empty[0]!r}] is not None)) before converting")
        return {col: [int(row[col])] for col in self.label_columns}


def _load_dataset(source: str, splits: list[str] | None):
    """``datasets.load_dataset(source, split=splits)``, its three steps spelled out so that a
    parquet source is prepared without pyarrow's pre-buffering, which reads all of a file's row
    groups into memory at once: preparing 8 parquet files of 1.3 M CIFAR images (360 MB each)
    peaked at 895 MB, 240 MB without it. ``fragment_scan_options`` is a field of datasets'
    ParquetConfig (datasets 2.15 on), read as the split is generated."""
    import datasets
    builder = datasets.load_dataset_builder(source)
    if builder.name == "parquet" and getattr(builder.config, "fragment_scan_options", False) is None:
        import pyarrow.dataset as pads
        builder.config.fragment_scan_options = pads.ParquetFragmentScanOptions(pre_buffer=False)
    builder.download_and_prepare()
    return builder.as_dataset(split=splits)


def open_source(source, splits: list[str] | None = None):
    """Return ``{split: datasets.Dataset}`` for the requested splits (all when None)."""
    import datasets
    if isinstance(source, datasets.Dataset):
        dd = {"train": source}
    elif isinstance(source, datasets.DatasetDict):
        dd = dict(source)
    else:
        path = Path(str(source))
        if path.exists() and not path.is_dir():
            raise SchemaError(f"source {str(source)!r} is a file; expected a dataset folder or a hub name")
        try:
            listed = None
            if path.is_dir() and ((path / "dataset_dict.json").exists() or (path / "state.json").exists()):
                loaded = datasets.load_from_disk(str(path))
            elif path.is_dir() and (listed := list_image_folder(path)) is not None:
                loaded = listed  # class subfolders, listed at once (image_folder.py)
            elif splits:  # hub names, parquet folders, image folders
                loaded = dict(zip(splits, _load_dataset(str(source), list(splits))))
            else:
                loaded = _load_dataset(str(source), None)
        except (ConnectionError, FileNotFoundError) as e:
            kind = "local folder" if path.exists() else "hub name or local path"
            raise SchemaError(f"source {str(source)!r} ({kind}) could not be opened: {e}") from None
        except (ValueError, IndexError) as e:  # what datasets raises for a source without rows, or a bad split
            if "Unknown split" in str(e):  # 'Unknown split "x". Should be one of [...]'
                raise SchemaError(f"split(s) {list(splits)} not all in source {source!r}: {e}") from None
            raise SchemaError(f"source {str(source)!r} could not be read ({type(e).__name__}: {e}); a source "
                              "that holds no rows has nothing to convert") from None
        dd = {"train": loaded} if isinstance(loaded, datasets.Dataset) else dict(loaded)
    if splits:
        missing = [s for s in splits if s not in dd]
        if missing:
            raise SchemaError(f"split(s) {missing} not in source {source!r}: it has {sorted(dd)}")
        dd = {s: dd[s] for s in splits}
    return dd


def detect_schema(features, label: str | None = None) -> Schema:
    """Find the image and label columns of a ``datasets.Features``; ``label`` picks the target."""
    import datasets
    columns = {name: type(f).__name__ for name, f in features.items()}
    how = ("choose with --label COLUMN (a ClassLabel column), and make sure one column "
           "is a datasets.Image feature named 'image' or 'img'")
    images = [n for n, f in features.items() if isinstance(f, datasets.Image)]
    image = next((n for n in IMAGE_COLUMNS if n in images), images[0] if len(images) == 1 else None)
    if image is None:
        raise SchemaError(f"no image column found among columns {columns}: {how}")

    class_labels = {n: f for n, f in features.items() if isinstance(f, datasets.ClassLabel)}
    objects = None
    for n in MULTI_LABEL_OBJECTS:
        f = features.get(n)
        cat = f.get("category") if isinstance(f, dict) else None
        inner = getattr(cat, "feature", None)
        if isinstance(inner, datasets.ClassLabel):
            objects = (n, inner)

    if label is not None:
        if label in class_labels:
            target = label
        elif objects and label in (objects[0], "category"):
            target = None
        else:
            raise SchemaError(f"--label {label!r} is not a ClassLabel column; columns found: {columns}: {how}")
    elif class_labels:
        target = next((n for n in TARGET_PREFERENCE if n in class_labels), None)
        if target is None and len(class_labels) == 1:
            target = next(iter(class_labels))
        if target is None:
            raise SchemaError(f"several label columns {sorted(class_labels)} and none is the usual target: "
                              f"columns found: {columns}: {how}")
    elif objects:
        target = None
    else:
        raise SchemaError(f"no label column found among columns {columns}: {how}")

    if target is None:  # multi-label from detection objects (COCO)
        name, cl = objects
        return Schema(image_column=image, target="label", kind="multi", num_classes=cl.num_classes,
                      class_names=list(cl.names), objects_column=name)
    extras = [n for n in class_labels if n != target]
    return Schema(image_column=image, target=target, kind="single",
                  num_classes=class_labels[target].num_classes, class_names=list(class_labels[target].names),
                  extra_labels=extras, extra_names={n: list(class_labels[n].names) for n in extras})


def guess_preset(schema: Schema) -> str:
    """The spec preset FastLoader uses by default for this dataset."""
    if schema.kind == "multi":
        return "coco"
    if schema.target == "fine_label" or (schema.num_classes == 100 and "coarse_label" in schema.extra_labels):
        return "cifar100"
    if schema.image_column == "img" and schema.num_classes == 10:
        return "cifar10"
    return "imagenet"


def source_fingerprint(data: dict, schema: Schema, released=None) -> str:
    """A digest of what a conversion reads, so that a resumed job can prove it continues the same
    source: per split, its row count, the bytes of its label columns, and either ``datasets``' own
    fingerprint of the Arrow files (which changes with the files and with every transform) or,
    for an in-memory dataset, the bytes of every column. ``released()``, when given, is called
    every 256 chunks read and at the end (a memory-mapped source's pages, read, are dropped)."""
    import hashlib
    h = hashlib.sha256()
    label_columns = [schema.objects_column] if schema.kind == "multi" else schema.label_columns
    for split, ds in data.items():
        h.update(f"{split}:{len(ds)}:".encode())
        on_disk = bool(ds.cache_files)
        if on_disk:
            h.update(str(ds._fingerprint).encode())
        table = ds.data.table if hasattr(ds.data, "table") else ds.data
        if not on_disk:  # an image folder's description holds its files' names, sizes and times
            h.update(str(ds.info.description or "").encode())
        for col in (label_columns if on_disk else table.column_names):
            for k, chunk in enumerate(table.column(col).chunks):
                for buf in chunk.buffers():
                    if buf is not None:
                        h.update(memoryview(buf))
                if released is not None and k % 256 == 255:
                    released()
    if released is not None:
        released()
    return h.hexdigest()
