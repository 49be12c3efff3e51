"""``fastload verify``: re-read a dataset directory and report everything wrong with it."""
from __future__ import annotations

import io
import warnings

import numpy as np

from .formats import tfrecord
from .formats.manifest import DatasetError, Manifest, sha256_file
from .formats.records import SplitReader


def verify(root, decode_images: bool = True, progress: bool = False) -> list[str]:
    """Return a list of problems (empty when the dataset is sound). Never modifies the directory."""
    try:
        manifest = Manifest.read(root)
    except DatasetError as e:
        return [str(e)]
    problems: list[str] = []
    for split in manifest.split_names:
        problems += _verify_split(manifest, split, decode_images, progress)
    return problems


def _verify_split(manifest: Manifest, split: str, decode_images: bool, progress: bool) -> list[str]:
    problems: list[str] = []
    info = manifest.split(split)
    for f in info.files:
        path = manifest.path(f["path"])
        problem = info.file_problem(manifest.root, f)
        if problem:
            problems.append(f"{split}: {problem}")
        elif sha256_file(path) != f["sha256"]:
            problems.append(f"{split}: file {f['path']} does not match its sha256 checksum (content changed)")
    if problems:
        return problems  # structure checks below would only repeat these
    try:
        reader = SplitReader(manifest, split)
    except DatasetError as e:
        return [f"{split}: {e}"]
    if manifest.storage == "tfrecord":
        problems += _check_tfrecords(manifest, split, reader)
    else:
        problems += _check_beton(manifest, split, reader)
    if decode_images:
        problems += _check_images(split, reader, progress)
    return problems


def _check_tfrecords(manifest: Manifest, split: str, reader: SplitReader) -> list[str]:
    problems = []
    counts = np.bincount(np.asarray(reader.records["file"]), minlength=len(reader.data_files))
    indexes = {f["for"]: f["path"] for f in manifest.split(split).files_with_role("dali_index")}
    target_multi = manifest.multi_label
    row = 0
    for fi, path in enumerate(reader.data_files):
        buf = path.read_bytes()
        offsets = []
        try:
            for off, data in tfrecord.read_records(buf, check_crc=True):
                offsets.append((off, len(data) + tfrecord.RECORD_OVERHEAD))
                if row < len(reader):
                    _, ints = tfrecord.decode_example(data)
                    want = reader.records[row]["label"]
                    want = [int(x) for x in want if x >= 0] if target_multi else [int(want)]
                    if ints.get("image/class/label") != want:
                        problems.append(f"{split}: {path.name} record {len(offsets) - 1}: label "
                                        f"{ints.get('image/class/label')} differs from the records index {want}")
                row += 1
        except tfrecord.TFRecordError as e:
            problems.append(f"{split}: {path.name}: {e}")
            continue
        if len(offsets) != counts[fi]:
            problems.append(f"{split}: {path.name} holds {len(offsets)} records, the records index says {counts[fi]}")
        idx_name = indexes.get(path.name)
        if idx_name is None:
            problems.append(f"{split}: {path.name} has no DALI index file listed")
        elif tfrecord.parse_index(manifest.path(idx_name).read_text()) != offsets:
            problems.append(f"{split}: {idx_name} does not match the records in {path.name}")
    return problems


def _check_beton(manifest: Manifest, split: str, reader: SplitReader) -> list[str]:
    from .formats.beton import import_ffcv
    try:
        import_ffcv()
    except ImportError as e:  # not a fault of the dataset: its sha256 is checked above; this is a second reader
        warnings.warn(f"{reader.data_files[0].name} not cross-checked with ffcv's own reader: {e}", RuntimeWarning)
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


def _check_images(split: str, reader: SplitReader, progress: bool) -> list[str]:
    from PIL import Image
    from tqdm.auto import tqdm
    if reader.codec == "raw":
        return []  # raw pixels need no decoding: their sizes are checked at open, their bytes by checksum
    problems = []
    for i in tqdm(range(len(reader)), desc=f"verify {split}", unit="img", disable=not progress):
        try:
            with Image.open(io.BytesIO(reader.stored(i).tobytes())) as im:
                if im.format != "JPEG" or im.mode != "RGB":
                    problems.append(f"{split}: image {i} is {im.format} {im.mode}, expected an RGB JPEG")
                    continue
                im.load()
                r = reader.records[i]
                if im.size != (int(r["width"]), int(r["height"])):
                    problems.append(f"{split}: image {i} is {im.size}, the records index says "
                                    f"{(int(r['width']), int(r['height']))}")
        except Exception as e:
            problems.append(f"{split}: image {i} does not decode ({type(e).__name__}: {e})")
        if len(problems) > 20:
            problems.append(f"{split}: stopping after 20 problems")
            break
    return problems
