"""One shard of a conversion: a run of source rows written as one TFRecord file.

The same code writes a shard for every engine (``engines.py``): a worker process of this
machine or a Ray task on another. What it reads comes from a :class:`~.source_rows.Rows`
(a memory-mapped ``datasets`` split, or parquet row groups read where they lie); what it
returns, a :class:`ShardResult`, is recorded by the driver (:func:`record_shard`): the done
file and the shard's records (``.partial/``), so a rerun keeps finished shards whatever engine
wrote them.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from crc32c import crc32c

from fastload.formats import tfrecord
from fastload.formats.writing import HashingFile, atomic_write_bytes, fsync_file
from fastload.formats.records import records_dtype

from .images import CorruptImageError, prepare_image, source_bytes
from .jobs import ConversionError
from .sources import Schema, SchemaError

IMAGE_FEATURES = {"jpeg": "image/encoded", "raw": "image/raw"}  # the TFRecord bytes feature per codec
PROGRESS_EVERY = 64  # images between two progress reports of a shard


@dataclass(frozen=True)
class ShardTask:
    split: str
    shard: int
    num_shards: int
    start: int
    stop: int
    path: str         # final path of this shard's TFRecord file
    done_path: str    # .partial/<split>-NNNNN.json, written when the shard is complete

    @property
    def rows_path(self) -> Path:
        """The shard's records (.partial/<split>-NNNNN.rows.npy), written before its done file."""
        return Path(self.done_path).with_suffix(".rows.npy")

    def tmp_path(self, directory: Path | None = None) -> Path:
        """Where the shard is written until it is complete: a name of this process's own, so that
        two attempts at one shard (a retried Ray task beside one its dead driver left running)
        never write one file; both write the same bytes, and the rename is atomic."""
        directory = Path(self.path).parent if directory is None else Path(directory)
        return directory / f".{Path(self.path).name}.tmp-{os.getpid()}"

    @property
    def index_path(self) -> Path:
        return Path(self.path).with_suffix(".idx")


def shard_name(split: str, shard: int, num_shards: int) -> str:
    return f"{split}-{shard:05d}-of-{num_shards:05d}.tfrecord"


@dataclass
class ShardResult:
    done: dict           # what the done file holds
    records: bytes       # the shard's records array, as .npy bytes


def write_shard(task: ShardTask, rows, schema: Schema, settings: dict, progress=lambda n: None,
                directory: Path | None = None) -> ShardResult:
    """Write ``task``'s rows (from ``rows``, a :class:`~.source_rows.Rows`) into its TFRecord
    file and DALI index, in ``directory`` (default: where ``task.path`` lies); ``progress(n)``
    is told of images done, every ``PROGRESS_EVERY``. Nothing final is left behind on an error."""
    directory = Path(task.path).parent if directory is None else Path(directory)
    final_path = directory / Path(task.path).name
    tmp = task.tmp_path(directory)
    try:
        return _write(task, rows, schema, settings, progress, tmp, final_path)
    except BaseException:
        tmp.unlink(missing_ok=True)  # no half-written shard left behind
        raise


def _write(task, rows, schema, settings, progress, tmp: Path, final_path: Path) -> ShardResult:
    # shards are not fsynced here (a fsync per shard cost ~10% of a CIFAR job): writeback starts
    # in the background and assembly syncs them all; beton staging is temporary: no checksum either
    final = settings["format"] == "tfrecord"
    hist = np.zeros((3, 256), np.int64)
    rows_out, skipped, index_entries = [], [], []
    passthrough = pos = pending = stats_images = 0
    codec = settings["image_codecs"][task.split]
    every = settings["stats_every"][task.split]
    feature = IMAGE_FEATURES[codec]
    with open(tmp, "wb") as raw:
        f = HashingFile(raw)  # checksum while writing: no second read of the shard
        for indices, batch in rows.batches(task.start, task.stop):
            images = batch[schema.image_column]
            for k, index in enumerate(indices):
                row = {key: batch[key][k] for key in batch}
                try:
                    img = prepare_image(source_bytes(images[k]), settings["max_side"], settings["jpeg_quality"],
                                        codec, histogram=index % every == 0, max_pixels=settings["max_pixels"])
                except CorruptImageError as e:
                    if not settings["skip_corrupt"]:
                        raise CorruptImageError(f"split {task.split!r} index {index}: {e}; "
                                                "rerun with --skip-corrupt to skip it and list it "
                                                "in the manifest") from None
                    skipped.append({"index": index, "error": str(e)})
                    continue
                try:
                    labels = schema.labels_of(row)
                except SchemaError as e:
                    raise ConversionError(f"split {task.split!r} index {index}: {e}") from None
                _check_labels(labels, schema, task.split, index)
                ints = {"image/height": [img.height], "image/width": [img.width],
                        "image/class/label": labels[schema.target], "image/source_index": [index]}
                for col in schema.extra_labels:
                    ints[f"image/class/{col}"] = labels[col]
                ex = tfrecord.encode_example({feature: img.data}, ints)
                size = tfrecord.write_record(f, ex.data)
                index_entries.append((pos, size))
                rows_out.append((pos + tfrecord.RECORD_HEADER + ex.image_offset, len(img.data), crc32c(img.data),
                                 img.height, img.width, index, labels[schema.target],
                                 [labels[c][0] for c in schema.extra_labels]))
                pos += size
                if img.histogram is not None:
                    hist += img.histogram
                    stats_images += 1
                passthrough += img.passthrough
                pending += 1
                if pending >= PROGRESS_EVERY:
                    progress(pending)
                    pending = 0
        raw.flush()
    progress(pending)
    index_bytes = tfrecord.format_index(index_entries).encode()
    atomic_write_bytes(final_path.with_suffix(".idx"), index_bytes, durable=False)
    records = _shard_records(rows_out, task.shard, schema)
    buffer = io.BytesIO()
    np.save(buffer, records)
    os.replace(tmp, final_path)
    done = {"split": task.split, "shard": task.shard, "count": len(rows_out), "passthrough": passthrough,
            "skipped": skipped, "histogram": hist.tolist(), "stats_images": stats_images,
            "max_labels": _max_labels(records, schema),
            "file": {"path": final_path.name, "size": f.size,
                     "sha256": f.sha256.hexdigest() if final else None, "records": len(rows_out)},
            "index": {"path": final_path.with_suffix(".idx").name, "size": len(index_bytes),
                      "sha256": hashlib.sha256(index_bytes).hexdigest() if final else None}}
    if final:  # start the shard's writeback now, beside the next shard's work (assembly waits for it)
        threading.Thread(target=fsync_file, args=(final_path,), daemon=True).start()
    return ShardResult(done, buffer.getvalue())


def record_shard(task: ShardTask, result: ShardResult) -> None:
    """The shard's records, then its done file: from that moment a rerun keeps the shard."""
    atomic_write_bytes(task.rows_path, result.records, durable=False)
    atomic_write_bytes(Path(task.done_path), json.dumps(result.done).encode(), durable=False)


def shard_done(task: ShardTask, publisher) -> bool:
    """Whether a rerun can keep ``task``'s shard: recorded, and its file (unless uploaded) whole."""
    if not (all(Path(p).exists() for p in (task.done_path, task.rows_path)) and publisher.shard_kept(task)):
        return False
    try:  # bookkeeping is not fsynced: after a power cut a done file may be empty; redo the shard
        done = json.loads(Path(task.done_path).read_text())
        return not Path(task.path).exists() or os.path.getsize(task.path) == done["file"]["size"]
    except (ValueError, KeyError, TypeError):
        return False


def _shard_records(rows: list[tuple], shard: int, schema: Schema) -> np.ndarray:
    """A shard's rows as a records array (``file`` = the shard, ``offset`` into its file), kept
    in ``.partial/`` rather than in memory: the job's memory stays flat at any dataset size."""
    multi = schema.kind == "multi"
    width = max([len(r[6]) for r in rows] + [1]) if multi else 1
    records = np.zeros(len(rows), records_dtype(schema.label_columns, multi, width))
    if not rows:
        return records
    offset, size, crc, height, width_px, source_index, target, extras = zip(*rows)
    records["file"], records["offset"], records["size"], records["crc32c"] = shard, offset, size, crc
    records["height"], records["width"], records["source_index"] = height, width_px, source_index
    if multi:
        records["label"] = -1
        for i, ids in enumerate(target):
            records["label"][i, :len(ids)] = ids
    else:
        records["label"] = [t[0] for t in target]
    for k, col in enumerate(schema.extra_labels):
        records[col] = [e[k] for e in extras]
    return records


def _max_labels(records: np.ndarray, schema: Schema) -> int:
    """Most class ids on one sample (1 for single-label data)."""
    if schema.kind != "multi" or not len(records):
        return 1
    return max(1, int((records["label"] >= 0).sum(axis=1).max()))


def _check_labels(labels: dict, schema: Schema, split: str, index: int) -> None:
    for col, values in labels.items():
        n = schema.num_classes if col == schema.target else len(schema.extra_names[col])
        bad = [v for v in values if not 0 <= v < n]
        if bad:
            raise ConversionError(f"split {split!r} index {index}: label column {col!r} has value(s) {bad} "
                                  f"outside 0..{n - 1}")
