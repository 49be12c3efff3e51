"""``fastload convert``: a source dataset -> a dataset directory (.beton or TFRecord shards).

Work is cut into shards of consecutive source rows. Each shard is prepared by a worker
process (decode check, passthrough or re-encode, pixel histogram of the stats sample),
written as a TFRecord file under a temporary name, renamed when complete, and recorded in
``.partial/`` (a done file, and the shard's records as .npy: the main process never holds
every row, so its memory is flat at any dataset size). A rerun after any interruption (kill -9 included)
keeps finished shards. Only when every shard is done are the final files assembled (the
records index streamed shard by shard; for a .beton, the shards' bytes copied once into
it) and ``manifest.json`` written, last.
"""
from __future__ import annotations

import hashlib
import io
import json
import math
import multiprocessing as mp
import os
import queue
import shutil
import threading
import time
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from crc32c import crc32c

from fastload.formats import tfrecord
from fastload.formats.manifest import (FORMAT_NAME, FORMAT_VERSION, MANIFEST, STORAGES, HashingFile, Manifest,
                                       atomic_write_bytes,
                               fsync_file)
from fastload.formats.records import DEFAULT_MAX_PIXELS, check_max_pixels, records_dtype, records_filename

from .images import (CODEC_CHOICES, CorruptImageError, choose_codec, prepare_image, source_bytes, stats_every,
                     stats_from_histograms)
from . import replace
from .publish import InPlace, output_for
from .jobs import (PARTIAL, ConversionError, OutputLock, check_free_space, children_die_with_parent, die_with_parent,
                   full_disk_reported, pages_released_while_opening, SourcePages)
from .progress import Phase, PhaseBars
from .sources import Schema, SchemaError, detect_schema, guess_preset, open_source, source_fingerprint

IMAGE_FEATURES = {"jpeg": "image/encoded", "raw": "image/raw"}  # the TFRecord bytes feature per codec


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

    @property
    def tmp_path(self) -> Path:
        """Where the shard is written until it is complete."""
        return Path(self.path).with_name(f".{Path(self.path).name}.tmp")


def shard_name(split: str, shard: int, num_shards: int) -> str:
    return f"{split}-{shard:05d}-of-{num_shards:05d}.tfrecord"


# --------------------------------------------------------------------------- worker side
_WORKER: dict = {}


def _init_worker(source_pages: SourcePages, schema: Schema, settings: dict, progress_queue) -> None:
    # fork start: the datasets (memory-mapped Arrow) are inherited, not pickled
    die_with_parent()  # a kill -9 of the job takes its workers with it
    _WORKER.update(datasets=source_pages.data, source_pages=source_pages, schema=schema, settings=settings,
                   progress=progress_queue)


def _run_shard(task: ShardTask) -> dict:
    try:
        with full_disk_reported(Path(task.path).parent):
            return _write_shard(task)
    except (OSError, ConversionError):
        task.tmp_path.unlink(missing_ok=True)  # no half-written shard left behind
        raise
    finally:
        _WORKER["source_pages"].release()  # the shard's source rows, read: not kept


def _write_shard(task: ShardTask) -> dict:
    import datasets
    ds = _WORKER["datasets"][task.split]
    schema: Schema = _WORKER["schema"]
    settings = _WORKER["settings"]
    progress = _WORKER["progress"]
    # Raw bytes: we decide passthrough vs re-encode ourselves.
    ds = ds.cast_column(schema.image_column, datasets.Image(decode=False))
    tmp = task.tmp_path
    # shards are not fsynced here (a fsync per shard cost ~10% of a CIFAR job): writeback starts
    # in the background and assembly syncs them all; beton staging is temporary: no checksum either
    final = settings["format"] == "tfrecord"
    hist = np.zeros((3, 256), np.int64)
    rows, skipped, index_entries = [], [], []
    passthrough = 0
    pos = 0
    pending = 0
    codec = settings["image_codecs"][task.split]
    every = settings["stats_every"][task.split]
    stats_images = 0
    with open(tmp, "wb") as raw:
        f = HashingFile(raw)  # checksum while writing: no second read of the shard
        order = _write_order(task.split, len(ds), settings.get("shuffle_seed"))
        for offset in range(task.start, task.stop, 256):
            if order is None:
                batch = ds[offset:min(task.stop, offset + 256)]
            else:  # a seeded random order: its rows, gathered
                batch = ds[order[offset:min(task.stop, offset + 256)].tolist()]
            n = len(batch[schema.image_column])
            for k in range(n):
                index = offset + k if order is None else int(order[offset + k])
                row = {key: batch[key][k] for key in batch}
                try:
                    img = prepare_image(source_bytes(row[schema.image_column]), settings["max_side"],
                                        settings["jpeg_quality"], codec, histogram=index % every == 0,
                                        max_pixels=settings["max_pixels"])
                except CorruptImageError as e:
                    if not settings["skip_corrupt"]:
                        tmp.unlink(missing_ok=True)
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
                ex = tfrecord.encode_example({IMAGE_FEATURES[codec]: img.data}, ints)
                size = tfrecord.write_record(f, ex.data)
                index_entries.append((pos, size))
                rows.append((pos + tfrecord.RECORD_HEADER + ex.image_offset, len(img.data), crc32c(img.data),
                             img.height, img.width, index, labels[schema.target],
                             [labels[c][0] for c in schema.extra_labels]))
                pos += size
                if img.histogram is not None:
                    hist += img.histogram
                    stats_images += 1
                passthrough += img.passthrough
                pending += 1
                if pending >= 16:
                    progress.put(pending)
                    pending = 0
        raw.flush()
    progress.put(pending)
    idx_path = Path(task.path).with_suffix(".idx")
    index_bytes = tfrecord.format_index(index_entries).encode()
    atomic_write_bytes(idx_path, index_bytes, durable=False)
    records = _shard_records(rows, task.shard, schema)
    buffer = io.BytesIO()
    np.save(buffer, records)
    atomic_write_bytes(task.rows_path, buffer.getvalue(), durable=False)
    os.replace(tmp, task.path)
    done = {"split": task.split, "shard": task.shard, "count": len(rows), "passthrough": passthrough,
            "skipped": skipped, "histogram": hist.tolist(), "stats_images": stats_images,
            "max_labels": _max_labels(records, schema),
            "file": {"path": Path(task.path).name, "size": f.size,
                     "sha256": f.sha256.hexdigest() if final else None, "records": len(rows)},
            "index": {"path": idx_path.name, "size": len(index_bytes),
                      "sha256": hashlib.sha256(index_bytes).hexdigest() if final else None}}
    atomic_write_bytes(Path(task.done_path), json.dumps(done).encode(), durable=False)
    if final:  # start the shard's writeback now, beside the next shard's work (assembly waits for it)
        threading.Thread(target=fsync_file, args=(Path(task.path),), daemon=True).start()
    return done


def _write_order(split: str, n: int, seed: int | None) -> np.ndarray | None:
    """The source rows in the order they are written: as they are, or (``shuffle_seed``) a seeded
    permutation, so that shards of a class-sorted source (an image folder) each hold a mix of
    classes and a shard-aware shuffle draws batches as varied as a global one (pipelines/orders.py).
    ``source_index`` keeps each sample's row in the source."""
    if seed is None:
        return None
    key = (split, n, seed)
    if _WORKER.get("order_key") != key:
        _WORKER["order"] = np.random.default_rng([int(seed), n]).permutation(n)
        _WORKER["order_key"] = key
    return _WORKER["order"]


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


# --------------------------------------------------------------------------- main side
def convert(source, out, format: str = "tfrecord", splits: list[str] | None = None, workers: int = 1,
            max_side: int | None = None, jpeg_quality: int = 90, skip_corrupt: bool = False,
            label: str | None = None, shard_size: int | None = None, preset: str | None = None,
            overwrite: bool = False, progress: bool = True, image_codec: str = "auto",
            phases: list[Phase] | None = None, max_pixels: int = DEFAULT_MAX_PIXELS,
            shuffle_seed: int | None = None) -> Manifest:
    """Convert ``source`` into the dataset directory ``out``; returns its manifest.

    ``image_codec``: 'auto' (raw pixels for small images from a lossless source, see
    ``converters/images.py``), 'jpeg' or 'raw'. Resumable: rerun the same call after an
    interruption and finished shards are kept. ``phases``, when given, receives a
    :class:`Phase` (images, seconds) per progress bar shown, for a summary. ``max_pixels``: the
    decompression-bomb guard; a larger source image is refused by name, or with ``max_side`` a
    JPEG is decoded at a reduced size and stored downscaled. ``shuffle_seed``: write each split's
    samples in a seeded random order (for sources sorted by class, read shard-aware later).
    """
    if shuffle_seed is not None and (not isinstance(shuffle_seed, int) or isinstance(shuffle_seed, bool)):
        raise ValueError(f"shuffle_seed={shuffle_seed!r} is invalid: allowed an int, or None for the source's order")
    if format not in STORAGES:
        raise ValueError(f"format={format!r} is invalid: allowed {STORAGES}")
    if image_codec not in CODEC_CHOICES:
        raise ValueError(f"image_codec={image_codec!r} is invalid: allowed {CODEC_CHOICES}")
    if not 1 <= int(jpeg_quality) <= 100:
        raise ValueError(f"jpeg_quality={jpeg_quality!r} is invalid: allowed 1..100")
    if max_side is not None and max_side < 16:
        raise ValueError(f"max_side={max_side!r} is invalid: allowed >= 16 (or None to keep sizes)")
    check_max_pixels(max_pixels)
    if workers < 1:
        raise ValueError(f"workers={workers!r} is invalid: allowed >= 1")
    out, publisher = output_for(out)  # a URL: converted in a local staging directory, uploaded (publish.py)
    finished = publisher.finished_staging(str(source), format)
    if finished is not None:  # converted, killed before its upload ended: the upload is what is left
        return finished
    if (out / MANIFEST).exists() and not overwrite:  # at once; checked again under the lock
        raise _already_complete(out)
    # the source and its schema first: a bad source leaves nothing behind, and deletes nothing
    with pages_released_while_opening():  # memory flat at any source size (converters/jobs.py)
        data = open_source(source, splits)
    first = next(iter(data.values()))
    schema = detect_schema(first.features, label)
    empty = [s for s, d in data.items() if len(d) == 0]
    if empty:
        raise ConversionError(f"split(s) {empty} of source {source!r} hold no rows: nothing to convert "
                              "(choose other splits with --split)")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConversionError(f"cannot create {out} ({e.strerror}): choose a writable --out") from None
    with OutputLock(out):
        replacing = (out / MANIFEST).exists()
        if replacing and not overwrite:  # another conversion finished it meanwhile
            raise _already_complete(out)
        # an overwrite builds beside the finished dataset and swaps it in when complete (replace.py)
        target = replace.prepare(out) if replacing else out
        codecs = {split: choose_codec(_first_images(ds, schema), image_codec) for split, ds in data.items()}
        try:
            manifest = _convert_locked(source, target, data, schema, codecs, format=format, workers=workers,
                                       max_side=max_side, jpeg_quality=jpeg_quality, max_pixels=max_pixels,
                                       skip_corrupt=skip_corrupt, shard_size=shard_size, preset=preset,
                                       progress=progress, phases=phases, publisher=publisher,
                                       shuffle_seed=shuffle_seed)
        finally:
            publisher.close()
        if replacing:
            replace.swap_in(target, out)
            manifest = Manifest(out, manifest.data)
    if preset is None and manifest.location is None:
        _warn_if_preset_misfits(manifest)
    return manifest


def _already_complete(out: Path) -> ConversionError:
    return ConversionError(f"{out} already holds a complete dataset ({MANIFEST} exists); pass overwrite=True "
                           "(--overwrite) to replace it")


def _first_images(ds, schema: Schema, n: int = 16) -> list[bytes]:
    """The stored bytes of a split's first images (what 'auto' decides from)."""
    import datasets
    head = ds.select(range(min(n, len(ds)))).cast_column(schema.image_column, datasets.Image(decode=False))
    out = []
    for value in head[schema.image_column]:
        try:
            out.append(source_bytes(value))
        except CorruptImageError:
            continue
    return out


def _convert_locked(source, out, data, schema, codecs, *, format, workers, max_side, jpeg_quality, max_pixels,
                    skip_corrupt, shard_size, preset, progress, phases, publisher=None,
                    shuffle_seed=None) -> Manifest:
    publisher = publisher or InPlace()
    partial = out / PARTIAL
    partial.mkdir(exist_ok=True)
    source_pages = SourcePages(data)  # the parent's and (inherited at fork) every worker's
    settings = {"format": format, "source": str(source) if isinstance(source, (str, os.PathLike)) else "<in-memory>",
                "splits": list(data), "max_side": max_side, "jpeg_quality": int(jpeg_quality), "image_codecs": codecs,
                "max_pixels": max_pixels, "shuffle_seed": shuffle_seed,
                "skip_corrupt": bool(skip_corrupt), "label": schema.target,
                "sizes": {s: len(d) for s, d in data.items()},
                "stats_every": {s: stats_every(len(d), codecs[s]) for s, d in data.items()},
                "fingerprint": source_fingerprint(data, schema, released=source_pages.release),
                "format_version": FORMAT_VERSION}  # staged records of another version are not reused
    plan = _load_or_make_plan(partial, settings, data, shard_size, workers)

    staging = out if format == "tfrecord" else partial
    tasks = []
    for split, num_shards in plan["shards"].items():
        n = len(data[split])
        bounds = np.linspace(0, n, num_shards + 1).round().astype(int)
        for s in range(num_shards):
            name = shard_name(split, s, num_shards)
            tasks.append(ShardTask(split, s, num_shards, int(bounds[s]), int(bounds[s + 1]),
                                   str(staging / name), str(partial / f"{split}-{s:05d}.json")))
    todo = [t for t in tasks if not _shard_done(t, publisher)]
    done_count = len(tasks) - len(todo)
    if done_count:
        print(f"resuming: {done_count} of {len(tasks)} shards already done, {len(todo)} to go")

    bars = PhaseBars(progress, phases)
    with children_die_with_parent():
        _run_tasks(todo, source_pages, schema, settings, workers, bars, publisher.shard_finished)
        results = _shard_results(tasks)
        with full_disk_reported(out):
            manifest = _assemble(out, format, schema, settings, tasks, results, preset or guess_preset(schema), bars)
    manifest = publisher.publish(manifest)
    shutil.rmtree(partial, ignore_errors=True)
    return manifest


def _shard_results(tasks: list[ShardTask]) -> dict:
    """Each shard's done file, its pixel histogram summed into its split's on the way (one
    (3, 256) array per split, not one per shard: memory stays flat however many shards)."""
    results, histograms = {}, {}
    for t in tasks:
        done = json.loads(Path(t.done_path).read_text())
        hist = histograms.setdefault(t.split, np.zeros((3, 256), np.int64))
        hist += np.asarray(done.pop("histogram"), np.int64)
        results[t] = done
    for t in tasks:
        results[t]["split_histogram"] = histograms[t.split]
    return results


def _warn_if_preset_misfits(manifest: Manifest) -> None:
    """The guessed preset crops 224 px from every image: say so when the images are far smaller."""
    from fastload.formats.records import SplitReader
    from fastload.spec import PreprocessSpec
    size = max(PreprocessSpec.preset(manifest.preset, train=True).size)
    reader = SplitReader(manifest, manifest.split_names[0])
    side = float(np.median(np.maximum(reader.heights, reader.widths)))
    if side < size / 2:
        import warnings
        warnings.warn(f"{manifest.root}: images are small (median longer side {side:.0f} px) for the default preset "
                      f"{manifest.preset!r}, which crops {size} px: convert with --preset cifar10 for 32 px images, "
                      "or give FastLoader a spec", UserWarning, stacklevel=3)  # at the caller of convert()


def _load_or_make_plan(partial: Path, settings: dict, data, shard_size, workers) -> dict:
    path = partial / "plan.json"
    if path.exists():
        plan = json.loads(path.read_text())
        # same path, different data: finished shards hold the old rows, so none can be kept; an
        # older fastload's shards lack what this one records (settings it did not have)
        restart = ("the source changed since the unfinished conversion in {} started (its rows differ)"
                   if plan["settings"].get("fingerprint") != settings["fingerprint"] else
                   "the unfinished conversion in {} was started by an older fastload"
                   if set(settings) - set(plan["settings"]) else None)
        if restart:
            print(restart.format(partial.parent) + ": starting over")
            shutil.rmtree(partial)
            partial.mkdir()
            for stale in partial.parent.glob("*.tfrecord"):
                stale.unlink()
            return _load_or_make_plan(partial, settings, data, shard_size, workers)
        if plan["settings"].get("skip_corrupt") is False and settings["skip_corrupt"]:
            plan["settings"]["skip_corrupt"] = True  # the advised retry: keep the shards already written
            atomic_write_bytes(path, json.dumps(plan, indent=2).encode())
        for key, value in settings.items():
            if plan["settings"].get(key) != value:
                raise ConversionError(
                    f"{partial.parent} holds an unfinished conversion with {key}={plan['settings'].get(key)!r}, "
                    f"this call asks {key}={value!r}: rerun with the same settings to resume, or remove "
                    f"{partial.parent} to start over")
        return plan
    shards = {}
    for split, ds in data.items():
        n = len(ds)
        size = shard_size or max(1, min(1024, math.ceil(n / (4 * workers))))
        shards[split] = max(1, math.ceil(n / size))
    plan = {"settings": settings, "shards": shards}
    atomic_write_bytes(path, json.dumps(plan, indent=2).encode())
    return plan


def _shard_done(task: ShardTask, publisher) -> bool:
    if not (all(Path(p).exists() for p in (task.done_path, task.rows_path)) and publisher.shard_kept(task)):
        return False
    try:  # bookkeeping is not fsynced: after a power cut a done file may be empty; redo the shard
        done = json.loads(Path(task.done_path).read_text())
        return not Path(task.path).exists() or os.path.getsize(task.path) == done["file"]["size"]
    except (ValueError, KeyError, TypeError):
        return False


def _run_tasks(todo: list[ShardTask], source_pages: SourcePages, schema, settings, workers,
               bars: PhaseBars, finished_shard=lambda task: None) -> None:
    if not todo:
        return
    ctx = mp.get_context("fork")
    progress_queue = ctx.Queue()
    total = sum(t.stop - t.start for t in todo)
    with bars.phase("convert", total) as advance, \
            ProcessPoolExecutor(max_workers=min(workers, len(todo)), mp_context=ctx, initializer=_init_worker,
                                initargs=(source_pages, schema, settings, progress_queue)) as pool:
        task_of = {pool.submit(_run_shard, t): t for t in todo}
        pending = set(task_of)
        try:
            while pending:
                finished, pending = wait(pending, timeout=0.2, return_when=FIRST_COMPLETED)
                _drain(progress_queue, advance)
                for fut in finished:
                    fut.result()  # re-raises a worker's error here
                    finished_shard(task_of[fut])  # a conversion to a URL uploads it now
        except BaseException:
            for fut in pending:
                fut.cancel()
            raise
        _drain(progress_queue, advance)


def _drain(q, advance) -> None:
    while True:
        try:
            advance(q.get_nowait())
        except queue.Empty:
            return


def _assemble(out: Path, format: str, schema: Schema, settings: dict, tasks, results, preset,
              bars: PhaseBars) -> Manifest:
    splits_meta = {}
    for split in settings["splits"]:
        split_tasks = [t for t in tasks if t.split == split]
        staged = _StagedSplit(split_tasks, results, schema)
        files = []
        if format == "tfrecord":
            for t in split_tasks:
                if Path(t.path).exists():  # (an uploaded shard is in the store, not here)
                    fsync_file(Path(t.path))  # on disk before the manifest says the dataset is complete
                    fsync_file(Path(t.path).with_suffix(".idx"))
                files.append({**results[t]["file"], "role": "data"})
                files.append({**results[t]["index"], "role": "dali_index", "for": results[t]["file"]["path"]})
            files.append(_write_records(out, split, staged))
        else:
            files += _write_split_beton(out, split, schema, staged, bars, settings["image_codecs"][split])
        hist = results[split_tasks[0]]["split_histogram"]
        skipped = [s for t in split_tasks for s in results[t]["skipped"]]
        passthrough = sum(results[t]["passthrough"] for t in split_tasks)
        codec = settings["image_codecs"][split]
        splits_meta[split] = {"num_examples": staged.num_samples, "source_rows": settings["sizes"][split],
                              "image_codec": codec, "image_feature": IMAGE_FEATURES[codec],
                              "passthrough_jpegs": passthrough,
                              "reencoded": staged.num_samples - passthrough if codec == "jpeg" else 0,
                              "skipped": skipped, "max_labels": staged.max_labels,
                              "stats": {**stats_from_histograms(hist), "every": settings["stats_every"][split],
                                        "images": sum(results[t]["stats_images"] for t in split_tasks)},
                              "files": files}
    from fastload import __version__
    data = {"format": FORMAT_NAME, "format_version": FORMAT_VERSION, "storage": format,
            "created_by": f"fastload {__version__}", "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "source": {"name": settings["source"], "image_column": schema.image_column},
            "encoding": {"jpeg_quality": settings["jpeg_quality"], "max_side": settings["max_side"],
                         "max_pixels": settings["max_pixels"]},
            "preset": preset, "labels": schema.to_manifest(), "splits": splits_meta}
    manifest = Manifest(out, data)
    manifest.write()
    return manifest


class _StagedSplit:
    """A split's staged shards, one at a time: their records (in the split's records dtype,
    multi-label ids padded to the split's widest row) and the file holding their bytes."""

    def __init__(self, tasks, results, schema: Schema):
        self.tasks, self.schema = tasks, schema
        self.num_samples = sum(results[t]["count"] for t in tasks)
        self.max_labels = max(results[t]["max_labels"] for t in tasks) if schema.kind == "multi" else 1
        self.dtype = records_dtype(schema.label_columns, schema.kind == "multi", self.max_labels)

    def chunks(self):
        from fastload.formats.beton import BetonChunk
        for t in self.tasks:
            shard = np.load(t.rows_path)
            rows = np.zeros(len(shard), self.dtype)
            for name in self.dtype.names:
                if name == "label" and self.schema.kind == "multi":
                    rows["label"] = -1
                    rows["label"][:, :shard["label"].shape[1]] = shard["label"]
                else:
                    rows[name] = shard[name]
            yield BetonChunk(Path(t.path), rows)


def _write_records(out: Path, split: str, staged: _StagedSplit, layout=None) -> dict:
    """``<split>.records.npy``, written shard by shard; with a .beton ``layout``, each sample's
    offset in the .beton replaces its offset in the staged shard."""
    path = out / records_filename(split)
    tmp = path.with_name(f".{path.name}.tmp")
    header = {"descr": np.lib.format.dtype_to_descr(staged.dtype), "fortran_order": False,
              "shape": (staged.num_samples,)}
    placed = layout.placed(staged.chunks) if layout is not None else ((c, None) for c in staged.chunks())
    with open(tmp, "wb") as raw:
        f = HashingFile(raw)
        np.lib.format.write_array_header_1_0(f, header)
        for chunk, offsets in placed:
            if offsets is not None:
                chunk.rows["file"], chunk.rows["offset"] = 0, offsets
            f.write(chunk.rows.tobytes())
        raw.flush()
        os.fsync(raw.fileno())
    os.replace(tmp, path)
    return {"path": path.name, "size": f.size, "sha256": f.sha256.hexdigest(), "role": "records"}


def _write_split_beton(out, split, schema, staged: _StagedSplit, bars: PhaseBars, codec) -> list[dict]:
    from fastload.formats.beton import chunk_size, plan_beton, write_beton
    path = out / f"{split}.beton"
    tmp = out / PARTIAL / f"{split}.beton.tmp"
    tmp.unlink(missing_ok=True)
    label_fields = {"label": ("ids", staged.max_labels) if schema.kind == "multi" else ("int", 0)}
    for col in schema.extra_labels:
        label_fields[col] = ("int", 0)
    layout = plan_beton(staged.chunks, label_fields, codec)
    check_free_space(out, layout.data_end + 24 * 2 * staged.num_samples)
    with bars.phase(f"write {path.name}", staged.num_samples) as advance:
        size, sha256, chunk_sha256 = write_beton(tmp, layout, staged.chunks, progress=advance)
    os.replace(tmp, path)
    records = _write_records(out, split, staged, layout)
    return [{"path": path.name, "size": size, "sha256": sha256, "records": staged.num_samples, "role": "data",
             "chunk_size": chunk_size(layout.page_size), "chunk_sha256": chunk_sha256}, records]

