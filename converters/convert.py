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

import contextlib

import json
import math
import os
import shutil
import time
from pathlib import Path

import numpy as np

from fastload.formats.manifest import FORMAT_NAME, FORMAT_VERSION, MANIFEST, STORAGES, Manifest
from fastload.formats.writing import HashingFile, atomic_write_bytes, fsync_file
from fastload.formats.records import DEFAULT_MAX_PIXELS, check_max_pixels, records_dtype, records_filename

from . import replace
from .engines import ENGINES, LocalEngine, RayEngine, usable_cores
from .images import CODEC_CHOICES, CorruptImageError, choose_codec, source_bytes, stats_every, stats_from_histograms
from .jobs import (PARTIAL, ConversionError, OutputLock, SourcePages, check_free_space, children_die_with_parent,
                   full_disk_reported, pages_released_while_opening)
from .progress import Phase, PhaseBars
from .publish import InPlace, output_for
from .shards import IMAGE_FEATURES, ShardTask, record_shard, shard_done, shard_name
from .source_rows import ArrowSource, DatasetRows, ParquetSource, ParquetSplit, parquet_source, write_order_of
from .sources import Schema, detect_schema, guess_preset, open_source, source_fingerprint

SHARD_MAX, SHARDS_MIN = 1024, 8  # default shard size: at most SHARD_MAX images, at least SHARDS_MIN shards a split
# rows are written in a seeded random order unless asked to keep the source's (shuffle_seed=None):
# most sources large enough to stream (image folders, many hub datasets) are sorted by class
DEFAULT_SHUFFLE_SEED = 0


# --------------------------------------------------------------------------- main side
def convert(source, out, format: str = "tfrecord", splits: list[str] | None = None, workers: int | None = None,
            max_side: int | None = None, jpeg_quality: int = 90, skip_corrupt: bool = False,
            label: str | None = None, shard_size: int | None = None, preset: str | None = None,
            overwrite: bool = False, progress: bool = True, image_codec: str = "auto",
            phases: list[Phase] | None = None, max_pixels: int = DEFAULT_MAX_PIXELS,
            shuffle_seed: int | None = DEFAULT_SHUFFLE_SEED, engine: str = "local",
            address: str | None = None) -> Manifest:
    """Convert ``source`` into the dataset directory ``out``; returns its manifest.

    ``image_codec``: 'auto' (raw pixels for small images, see ``converters/images.py``), 'jpeg'
    or 'raw'. Resumable: rerun the same call after an interruption and finished shards are kept.
    ``phases``, when given, receives a :class:`Phase` (images, seconds) per progress bar shown,
    for a summary. ``max_pixels``: the decompression-bomb guard; a larger source image is refused
    by name, or with ``max_side`` a JPEG is decoded at a reduced size and stored downscaled.
    ``shuffle_seed``: each split's samples are written in a seeded random order (so that a source
    sorted by class, such as an image folder, reads shard-aware as varied as a global shuffle; the
    seed is in the manifest, ``source_index`` keeps the source row); None keeps the source's order
    (``--keep-order``). A parquet source on the Ray engine permutes its row groups (parquet is
    read a row group at a time) and interleaves each shard's at random. ``engine``: 'local' (``workers`` processes, default: every
    usable core) or 'ray' (a task per shard on the Ray cluster at ``address``; see
    ``engines.py``). The output is the same for either engine and any worker count.
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
    workers = usable_cores() if workers is None else workers
    if workers < 1:
        raise ValueError(f"workers={workers!r} is invalid: allowed >= 1")
    if engine not in ENGINES:
        raise ValueError(f"engine={engine!r} is invalid: allowed {ENGINES}")
    if address is not None and engine != "ray":
        raise ValueError(f"address={address!r} is for engine='ray' (--engine ray)")
    out, publisher = output_for(out)  # a URL: converted in a local staging directory, uploaded (publish.py)
    if engine == "ray" and format == "beton" and publisher.staging is not None:
        raise ConversionError("--engine ray writes a .beton (one file per split) on a directory every Ray node "
                              "shares: give --out such a directory, or use --format tfrecord for object storage")
    # connected first: a cluster that is not there is said at once, and its workers warm up meanwhile
    ray_engine = RayEngine(address, upload_url=publisher.url if publisher.staging else None) if engine == "ray" else None
    finished = publisher.finished_staging(str(source), format)
    if finished is not None:  # converted, killed before its upload ended: the upload is what is left
        return finished
    if (out / MANIFEST).exists() and not overwrite:  # at once; checked again under the lock
        raise _already_complete(out)
    # the source and its schema first: a bad source leaves nothing behind, and deletes nothing
    data, rows_source = _open_for(engine, source, splits)
    first = next(iter(data.values()))
    schema = detect_schema(first.features, label)
    empty = [s for s, d in data.items() if len(d) == 0]
    if empty:
        raise ConversionError(f"split(s) {empty} of source {source!r} hold no rows: nothing to convert "
                              "(choose other splits with --split)")
    if out.exists() and not out.is_dir():
        raise ConversionError(f"{out} is a file, not a directory: give out= a directory (new or a dataset's)",
                              cli=f"{out} is a file, not a directory: give --out a directory (new or a dataset's)")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConversionError(f"cannot create {out} ({e.strerror}): choose a writable out=",
                              cli=f"cannot create {out} ({e.strerror}): choose a writable --out") from None
    # a full disk anywhere below (a shard's bookkeeping, the lock file, the assembly) is the same one line
    with full_disk_reported(out), OutputLock(out):
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
                                       shuffle_seed=shuffle_seed, ray_engine=ray_engine, rows_source=rows_source)
        finally:
            publisher.close()
        if replacing:
            replace.swap_in(target, out)
            manifest = Manifest(out, manifest.data)
    if preset is None and manifest.location is None:
        _warn_if_preset_misfits(manifest)
    return manifest


def _open_for(engine: str, source, splits):
    """({split: rows' length and features}, what Ray tasks read) for ``source``. The local engine
    opens it with ``datasets`` (memory-mapped; its workers inherit it). The Ray engine reads a
    parquet source's footers only, its tasks the row groups; any other source is opened with
    ``datasets`` here and its tasks map the same Arrow files (which must lie on a shared disk)."""
    if engine == "ray" and isinstance(source, (str, os.PathLike)) and _may_be_parquet(source):
        parquet = parquet_source(str(source), splits)
        if parquet is not None:
            return parquet, ParquetSource(parquet)
    with pages_released_while_opening():  # memory flat at any source size (converters/jobs.py)
        data = open_source(source, splits)
    return data, (ArrowSource.of(data) if engine == "ray" else None)


def _may_be_parquet(source) -> bool:
    """A hub name, or a local folder holding parquet files (not a save_to_disk folder): asked of
    ``datasets``' builder. An image folder is not asked (its builder globs every file, slowly)."""
    path = Path(str(source))
    if not path.exists():
        return True
    if not path.is_dir() or (path / "dataset_dict.json").exists() or (path / "state.json").exists():
        return False
    return any(next(path.glob(pattern), None) is not None for pattern in ("*.parquet", "*/*.parquet",
                                                                          "*/*/*.parquet"))


def _already_complete(out: Path) -> ConversionError:
    held = f"{out} already holds a complete dataset ({MANIFEST} exists)"
    return ConversionError(f"{held}; pass overwrite=True to replace it", cli=f"{held}; add --overwrite to replace it")


def _first_images(ds, schema: Schema, n: int = 16) -> list[bytes]:
    """The stored bytes of a split's first images (what 'auto' decides from)."""
    if isinstance(ds, ParquetSplit):
        values = ds.first_images(schema.image_column, n)
    else:
        _, batch = next(DatasetRows(ds.select(range(min(n, len(ds)))), schema.image_column).batches(0, min(n, len(ds))))
        values = batch[schema.image_column]
    out = []
    for value in values:
        try:
            out.append(source_bytes(value))
        except CorruptImageError:
            continue
    return out


def _fingerprint(data: dict, schema: Schema, source_pages: SourcePages) -> str:
    if all(isinstance(d, ParquetSplit) for d in data.values()):
        import hashlib
        return hashlib.sha256("".join(d.fingerprint() for d in data.values()).encode()).hexdigest()
    return source_fingerprint(data, schema, released=source_pages.release)


def _convert_locked(source, out, data, schema, codecs, *, format, workers, max_side, jpeg_quality, max_pixels,
                    skip_corrupt, shard_size, preset, progress, phases, publisher=None,
                    shuffle_seed=None, ray_engine=None, rows_source=None) -> Manifest:
    publisher = publisher or InPlace()
    partial = out / PARTIAL
    partial.mkdir(exist_ok=True)
    source_pages = SourcePages(data)  # the parent's and (inherited at fork) every worker's
    settings = {"format": format, "source": str(source) if isinstance(source, (str, os.PathLike)) else "<in-memory>",
                "splits": list(data), "max_side": max_side, "jpeg_quality": int(jpeg_quality), "image_codecs": codecs,
                "max_pixels": max_pixels, "shuffle_seed": shuffle_seed,
                "write_order": write_order_of(isinstance(rows_source, ParquetSource), shuffle_seed),
                "skip_corrupt": bool(skip_corrupt), "label": schema.target,
                "sizes": {s: len(d) for s, d in data.items()},
                "stats_every": {s: stats_every(len(d), codecs[s]) for s, d in data.items()},
                "fingerprint": _fingerprint(data, schema, source_pages),
                "format_version": FORMAT_VERSION}  # staged records of another version are not reused
    plan = _load_or_make_plan(partial, settings, data, shard_size)

    staging = out if format == "tfrecord" else partial
    tasks = []
    for split, num_shards in plan["shards"].items():
        n = len(data[split])
        bounds = np.linspace(0, n, num_shards + 1).round().astype(int)
        for s in range(num_shards):
            name = shard_name(split, s, num_shards)
            tasks.append(ShardTask(split, s, num_shards, int(bounds[s]), int(bounds[s + 1]),
                                   str(staging / name), str(partial / f"{split}-{s:05d}.json")))
    todo = [t for t in tasks if not shard_done(t, publisher)]
    done_count = len(tasks) - len(todo)
    if done_count:
        print(f"resuming: {done_count} of {len(tasks)} shards already done, {len(todo)} to go")

    def finished(task: ShardTask, result) -> None:
        record_shard(task, result)  # from here on a rerun keeps the shard
        publisher.shard_finished(task)  # a conversion to a URL uploads it now (unless its task did)

    if ray_engine is not None:
        runner = ray_engine
        runner.source = rows_source
    else:
        rows = {split: DatasetRows(ds, schema.image_column, shuffle_seed) for split, ds in data.items()}
        runner = LocalEngine(workers, source_pages, rows)
    bars = PhaseBars(progress, phases)
    with children_die_with_parent():
        if todo:
            with bars.phase("convert", sum(t.stop - t.start for t in todo)) as advance:
                runner.run(todo, schema, settings, advance, finished)
        results = _shard_results(tasks)
        manifest = _assemble(out, format, schema, settings, tasks, results, preset or guess_preset(schema), bars)
    manifest = publisher.publish(manifest)
    shutil.rmtree(partial, ignore_errors=True)
    for stale in out.glob(".*.tmp-*"):  # what killed attempts (kill -9, a lost Ray node) were writing
        stale.unlink(missing_ok=True)
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


def _load_or_make_plan(partial: Path, settings: dict, data, shard_size) -> dict:
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
            return _load_or_make_plan(partial, settings, data, shard_size)
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
        # of the split's size alone, not of the workers or the engine: the same source and options
        # give the same files on any machine or cluster
        size = shard_size or max(1, min(SHARD_MAX, math.ceil(n / SHARDS_MIN)))
        shards[split] = max(1, math.ceil(n / size))
    plan = {"settings": settings, "shards": shards}
    atomic_write_bytes(path, json.dumps(plan, indent=2).encode())
    return plan


def _assemble(out: Path, format: str, schema: Schema, settings: dict, tasks, results, preset,
              bars: PhaseBars) -> Manifest:
    splits_meta = {}
    for split in settings["splits"]:
        split_tasks = [t for t in tasks if t.split == split]
        staged = _StagedSplit(split_tasks, results, schema)
        files = []
        if format == "tfrecord":
            for t in split_tasks:
                for path in (Path(t.path), Path(t.path).with_suffix(".idx")):
                    # on disk before the manifest says the dataset is complete; a shard uploaded
                    # meanwhile (--out URL) was removed by its uploader, at any moment: the store has it
                    with contextlib.suppress(FileNotFoundError):
                        fsync_file(path)
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
            "write_order": settings["write_order"],
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
             "chunk_size": chunk_size(layout), "chunk_sha256": chunk_sha256}, records]

