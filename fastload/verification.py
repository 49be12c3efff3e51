"""``fastload verify``: re-read a dataset directory and report everything wrong with it, so that a
dataset from elsewhere can be vetted before training on it.

In order, per split: every file the manifest lists lies inside the directory (no ``..``, no
absolute path, no symlink out) and matches its size and sha256; the records index is in bounds
(what opening a split checks: rows, files, offsets, sizes, dimensions, labels); TFRecord framing
and CRCs, DALI's index files, or the .beton as stock ffcv reads it; each sample's CRC32C and, for
JPEGs, its markers and frame size against the index (what every backend checks as it reads); a
decode of every image by the backends' decoder.
"""
from __future__ import annotations

import functools
import importlib.util
import warnings

import numpy as np

from .formats import tfrecord
from .formats.manifest import CHECKSUM_FROM_VERSION, DatasetError, Manifest
from .formats.records import DEFAULT_MAX_PIXELS, SplitReader
from .formats.writing import sha256_file
from .storage import open_dataset

MAX_PROBLEMS = 20  # per split: past that, one more line says the list stops


def verify(root, decode_images: bool = True, progress: bool = False, max_pixels: int = DEFAULT_MAX_PIXELS,
           cache_dir=None) -> list[str]:
    """Return a list of problems (empty when the dataset is sound). Never modifies the directory.
    A remote dataset is read through the node's cache at ``cache_dir``, every file fetched first."""
    try:
        manifest = open_dataset(root, cache_dir=cache_dir)
        _fetch_all(manifest, progress)
    except DatasetError as e:
        return [str(e)]
    if manifest.data["format_version"] < CHECKSUM_FROM_VERSION:
        warnings.warn(f"{manifest.root} is format version {manifest.data['format_version']}: its samples have no "
                      "checksums of their own (convert it again with this fastload to add them)", RuntimeWarning)
    problems: list[str] = []
    for split in manifest.split_names:
        problems += _verify_split(manifest, split, decode_images, progress, max_pixels)
    return problems


def checked(root, decode_images: bool = True, cache_dir=None) -> str:
    """What :func:`verify` checked of a sound dataset, in words: its splits, samples, files and
    bytes, and the checks (for ``fastload verify``'s OK line)."""
    m = open_dataset(root, cache_dir=cache_dir)
    files = [f for s in m.split_names for f in m.split(s).files]
    samples = sum(m.split(s).num_examples for s in m.split_names)
    reader = "TFRecord framing and CRCs" if m.storage == "tfrecord" else ".beton tables" + (
        " (stock ffcv's reader)" if _second_reader_problem() is None else
        " (not with stock ffcv's reader: pip install 'fastload[stock-ffcv]')")
    per_sample = "CRC32C and JPEG header" if m.data["format_version"] >= CHECKSUM_FROM_VERSION else "JPEG header"
    return (f"{len(m.split_names)} split(s), {samples:,} samples, {len(files)} files, "
            f"{sum(f['size'] for f in files) / 2**20:,.1f} MiB: each file's sha256, the records index's bounds, "
            f"{reader}, each sample's {per_sample}" + (", a decode of every image" if decode_images else
                                                        " (no decode: --no-decode)"))


def _fetch_all(manifest: Manifest, progress: bool) -> None:
    """Every file present (a remote dataset's fetched, each unit checked; a local one's are)."""
    from tqdm.auto import tqdm
    if manifest.location is None:
        return
    sizes = manifest.source.units.sizes
    with tqdm(total=sum(sizes.values()), unit="B", unit_scale=True, disable=not progress,
              desc=f"fetch {manifest.name}") as bar:
        for path in sizes:
            manifest.source.fetch_file(path, progress=bar.update)


def _verify_split(manifest: Manifest, split: str, decode_images: bool, progress: bool, max_pixels: int) -> list[str]:
    missing: list[str] = []
    changed: list[str] = []
    info = manifest.split(split)
    for f in info.files:
        try:
            problem = info.file_problem(manifest.root, f)
        except DatasetError as e:  # a path outside the dataset: nothing of it is read
            return [f"{split}: {e}"]
        if problem:
            missing.append(f"{split}: {problem}")
        elif f.get("sha256") and sha256_file(manifest.path(f["path"])) != f["sha256"]:
            changed.append(f"{split}: file {f['path']} does not match its sha256 checksum (content changed)")
    if missing:
        return missing  # structure checks below would only repeat these
    problems = changed  # the samples' own checks below say which samples changed
    try:
        reader = SplitReader(manifest, split, max_pixels=max_pixels)
    except DatasetError as e:
        return problems + [f"{split}: {e}"]
    if manifest.storage == "tfrecord":
        problems += _check_tfrecords(manifest, split, reader)
    else:
        problems += _check_beton(manifest, split, reader)
    problems += _check_samples(split, reader, decode_images, progress)
    return problems


def _check_tfrecords(manifest: Manifest, split: str, reader: SplitReader) -> list[str]:
    """Each shard's framing and CRCs, its record count, its labels against the records index (shards
    hold consecutive rows of it), and its DALI index file."""
    problems = []
    counts = np.bincount(np.asarray(reader.records["file"]), minlength=len(reader.data_files))
    first_rows = np.concatenate([[0], np.cumsum(counts)])
    indexes = {f["for"]: f["path"] for f in manifest.split(split).files_with_role("dali_index")}
    target_multi = manifest.multi_label
    for fi, path in enumerate(reader.data_files):
        buf = path.read_bytes()
        offsets = []
        try:
            for off, data in tfrecord.read_records(buf, check_crc=True):
                row = int(first_rows[fi]) + len(offsets)
                offsets.append((off, len(data) + tfrecord.RECORD_OVERHEAD))
                if row < first_rows[fi + 1]:
                    _, ints = tfrecord.decode_example(data)
                    want = reader.records[row]["label"]
                    want = [int(x) for x in want if x >= 0] if target_multi else [int(want)]
                    if ints.get("image/class/label") != want:
                        problems.append(f"{split}: {path.name} record {len(offsets) - 1}: label "
                                        f"{ints.get('image/class/label')} differs from the records index {want}")
        except tfrecord.TFRecordError as e:
            problems.append(f"{split}: {path.name}: {e}")
            continue
        if len(offsets) != counts[fi]:
            problems.append(f"{split}: {path.name} holds {len(offsets)} records, the records index says {counts[fi]}")
        idx_name = indexes.get(path.name)
        try:
            listed = None if idx_name is None else tfrecord.parse_index(
                manifest.path(idx_name, f"split {split!r} DALI index").read_text())
        except (tfrecord.TFRecordError, ValueError, UnicodeDecodeError) as e:
            listed = f"unreadable ({e})"
        if idx_name is None:
            problems.append(f"{split}: {path.name} has no DALI index file listed")
        elif listed != offsets:
            problems.append(f"{split}: {idx_name} does not match the records in {path.name}")
    return problems


@functools.cache
def _second_reader_problem() -> str | None:
    """Why stock ffcv cannot cross-check .beton files here, or None."""
    from .formats.beton import import_ffcv
    try:
        import_ffcv()
    except ImportError as e:
        return str(e)
    return None


def _check_beton(manifest: Manifest, split: str, reader: SplitReader) -> list[str]:
    if (problem := _second_reader_problem()) is not None:
        # not a fault of the dataset: its sha256 is checked above; this is a second reader, optional
        # (the OK line says it was not used); an ffcv installed but unusable is worth a warning
        if importlib.util.find_spec("ffcv") is not None:
            warnings.warn(f"{reader.data_files[0].name} not cross-checked with ffcv's own reader: {problem}",
                          RuntimeWarning)
        return []
    from ffcv.reader import Reader
    try:
        beton = Reader(str(reader.data_files[0]))
    except Exception as e:  # ffcv raises assorted errors on damaged files
        return [f"{split}: {reader.data_files[0].name} does not open as a .beton ({type(e).__name__}: {e})"]
    problems = []
    if beton.num_samples != len(reader):
        problems.append(f"{split}: {reader.data_files[0].name} holds {beton.num_samples} samples, "
                        f"manifest says {len(reader)}")
    else:
        labels = beton.metadata["f1"]
        if not manifest.multi_label and not np.array_equal(np.asarray(labels).reshape(-1), reader.labels):
            problems.append(f"{split}: labels in {reader.data_files[0].name} differ from the records index")
    return problems


def _check_samples(split: str, reader: SplitReader, decode: bool, progress: bool) -> list[str]:
    """Each sample as the backends check it when reading (samples.py), then, with ``decode``,
    decoded by their decoder (libjpeg, refusing what it warns about)."""
    from tqdm.auto import tqdm
    from .pipelines.jpeg import JPEGDecodeError, decode_rgb
    from .pipelines.samples import SampleChecks
    checks = SampleChecks(reader)
    problems, n, chunk = [], len(reader), 256
    with tqdm(total=n, desc=f"verify {split}", unit="img", disable=not progress) as bar:
        for start in range(0, n, chunk):
            index = np.arange(start, min(n, start + chunk))
            while len(index):
                failure = checks.first_failure(index)
                good = index if failure is None else index[:np.searchsorted(index, failure[0])]
                if failure is not None:
                    problems.append(f"{split}: {reader.sample_error(*failure)}")
                    index = index[len(good) + 1:]
                else:
                    index = index[:0]
                for i in (good if decode and reader.codec == "jpeg" else ()):
                    try:
                        decode_rgb(reader.stored(int(i)), int(reader.heights[i]), int(reader.widths[i]))
                    except JPEGDecodeError as e:
                        problems.append(f"{split}: {reader.sample_error(int(i), str(e))}")
            bar.update(min(chunk, n - start))
            if len(problems) > MAX_PROBLEMS:
                return problems[:MAX_PROBLEMS] + [f"{split}: stopping after {MAX_PROBLEMS} problems"]
    return problems
