"""A dataset from elsewhere is untrusted input: crafted or damaged manifests, records indexes and
image bytes, on real photos and CIFAR, in every backend. Each case ends in a named fastload error
(or the right data), never a crash, a read outside the dataset or silently wrong pixels."""
from __future__ import annotations

import gc
import json
import shutil
import subprocess
import sys
import weakref
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import BACKEND_FORMAT, needs_shared
from fastload import FastLoader, Manifest, verify
from fastload.formats.manifest import DatasetError
from fastload.formats.writing import sha256_file
from fastload.formats.records import SampleDecodeError, SplitReader

BACKENDS = list(BACKEND_FORMAT)


def _copy(src: Path, tmp_path: Path, name: str = "copy") -> Path:
    d = tmp_path / name
    shutil.copytree(src, d)
    return d


def _edit_manifest(d: Path, edit) -> None:
    """Change the manifest as its writer would (its own checksum recomputed): a crafted dataset."""
    m = Manifest.read(d)
    edit(m.data)
    Manifest(d, m.data).write()


def _edit_records(d: Path, split: str, edit, crafted: bool = True) -> None:
    """Change the records index; ``crafted``: its size and sha256 in the manifest follow."""
    path = d / f"{split}.records.npy"
    records = np.load(path)
    edit(records)
    np.save(path, records)
    if crafted:
        def follow(data):
            for f in data["splits"][split]["files"]:
                if f["role"] == "records":
                    f["size"], f["sha256"] = path.stat().st_size, sha256_file(path)
        _edit_manifest(d, follow)


def _epoch(d: Path, backend: str, split: str = "validation", **kw):
    loader = FastLoader(d, split, batch_size=16, backend=backend, num_workers=2, order="sequential",
                        spec="imagenet:eval", drop_last=False, **kw)
    return [b for b in loader]


def _in_subprocess(code: str) -> subprocess.CompletedProcess:
    """A loader run where a crash is seen as a crash (a signal), not as this test process dying."""
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=180)


# --------------------------------------------------------------------------- containment
@needs_shared
@pytest.mark.parametrize("fmt", ["beton", "tfrecord"])
def test_files_outside_the_dataset_are_refused(imagenet_dirs, tmp_path, fmt):
    """A manifest naming ``../elsewhere``, an absolute path, or a symlink leading out: opening and
    verifying fail with one line naming the entry; nothing outside is read."""
    outside = _copy(imagenet_dirs[fmt], tmp_path, "elsewhere")
    data_name = next(f["path"] for f in Manifest.read(outside).split("validation").files if f["role"] == "data")
    for path in (f"../elsewhere/{data_name}", str(outside / data_name)):
        d = _copy(imagenet_dirs[fmt], tmp_path, f"crafted-{len(path)}")

        def point_out(data, path=path):
            next(f for f in data["splits"]["validation"]["files"] if f["role"] == "data")["path"] = path
        _edit_manifest(d, point_out)
        with pytest.raises(DatasetError, match=rf"path {path!r} is outside the dataset directory"):
            FastLoader(d, "validation")
        problems = verify(d)
        assert len(problems) == 1 and "is outside the dataset directory" in problems[0], problems
    d = _copy(imagenet_dirs[fmt], tmp_path, "symlinked")
    (d / data_name).unlink()
    (d / data_name).symlink_to(outside / data_name)  # an unchanged manifest: only the file is a link out
    with pytest.raises(DatasetError, match=r"leads outside the dataset directory \(a symlink\)"):
        FastLoader(d, "validation")
    assert "leads outside the dataset directory" in verify(d)[0]


# --------------------------------------------------------------------------- the records index
@needs_shared
@pytest.mark.parametrize("backend", BACKENDS)
def test_records_pointing_outside_their_file_are_refused_at_open(imagenet_dirs, tmp_path, backend):
    """An offset of 1 TiB, a sample past its file's end, a data file truncated with its manifest size
    edited to match, a width over JPEG's 65535 or a height of 0: refused at open, naming the records
    index."""
    fmt = BACKEND_FORMAT[backend]
    cases = {"offset": lambda r: r["offset"].__setitem__(3, 2**40),
             "size": lambda r: r["size"].__setitem__(3, 10**9),
             "width": lambda r: r["width"].__setitem__(3, 70000),
             "zero": lambda r: r["height"].__setitem__(3, 0)}
    for name, edit in cases.items():
        d = _copy(imagenet_dirs[fmt], tmp_path, name)
        _edit_records(d, "validation", edit)
        with pytest.raises(DatasetError, match=r"validation\.records\.npy: split 'validation' sample\(s\) \[3\]"):
            FastLoader(d, "validation", backend=backend)
    d = _copy(imagenet_dirs[fmt], tmp_path, "truncated")
    data = max((p for p in d.iterdir() if p.suffix in (".beton", ".tfrecord")), key=lambda p: p.stat().st_size)
    with open(data, "r+b") as f:
        f.truncate(data.stat().st_size // 2)

    def shrink(m):  # consistently: the file's size, its hash and its chunks' hashes
        import hashlib
        for f in m["splits"]["validation"]["files"]:
            if f["path"] == data.name:
                f["size"], f["sha256"] = data.stat().st_size, sha256_file(data)
                if "chunk_size" in f:
                    raw = data.read_bytes()
                    f["chunk_sha256"] = [hashlib.sha256(raw[i:i + f["chunk_size"]]).hexdigest()
                                         for i in range(0, len(raw), f["chunk_size"])]
    _edit_manifest(d, shrink)
    with pytest.raises(DatasetError, match=r"lie outside their data file"):
        FastLoader(d, "validation", backend=backend)


@needs_shared
def test_index_checks_at_open_are_vectorized(tmp_path):
    """The open-time checks on a 1.3 M-row records index (ImageNet's train split) take well under a
    second: they are numpy over columns, plus the index's sha256."""
    import time
    from fastload.formats.records import records_dtype
    n = 1_300_000
    records = np.zeros(n, records_dtype(["label"], False, 1))
    records["size"], records["height"], records["width"] = 100_000, 375, 500
    records["offset"] = np.arange(n, dtype=np.uint64) * 100_000
    records["label"] = np.arange(n) % 1000
    d = tmp_path / "big"
    d.mkdir()
    np.save(d / "train.records.npy", records)
    data = d / "train.data"
    with open(data, "wb") as f:
        f.truncate(n * 100_000)  # sparse: the checks read sizes, not data
    Manifest(d, {"format": "fastload-dataset", "format_version": 3, "storage": "tfrecord",
                 "labels": {"kind": "single", "num_classes": 1000},
                 "splits": {"train": {"num_examples": n, "image_codec": "jpeg", "files": [
                     {"path": "train.data", "size": n * 100_000, "sha256": None, "role": "data"},
                     {"path": "train.records.npy", "size": (d / "train.records.npy").stat().st_size,
                      "sha256": sha256_file(d / "train.records.npy"), "role": "records"}]}}}).write()
    t0 = time.perf_counter()
    reader = SplitReader(Manifest.read(d), "train")
    seconds = time.perf_counter() - t0
    assert len(reader) == n and seconds < 3.0, seconds
    print(f"open-time checks of {n} records: {seconds:.2f} s")


@needs_shared
@pytest.mark.parametrize("backend", BACKENDS)
def test_records_dimensions_that_disagree_with_the_jpeg_fail_the_sample(imagenet_dirs, tmp_path, backend):
    """A width of 8, 1 or 60000 in a crafted index (checksums recomputed): the JPEG header
    disagrees, and the sample fails with SampleDecodeError naming both sizes."""
    fmt = BACKEND_FORMAT[backend]
    for value in (8, 1, 60000):
        d = _copy(imagenet_dirs[fmt], tmp_path, f"dims-{value}")
        _edit_records(d, "validation", lambda r: r["width"].__setitem__(6, value))
        with pytest.raises(SampleDecodeError, match=rf"sample 6 .* the JPEG is \d+x\d+ pixels, the records index "
                                                    rf"says {value}x\d+"):
            _epoch(d, backend)


@needs_shared
@pytest.mark.parametrize("backend", BACKENDS)
def test_a_loader_whose_sample_failed_is_freed_at_once(imagenet_dirs, tmp_path, backend):
    """A user who catches SampleDecodeError and drops the loader gets its workers back at once:
    nothing holds the loader in a reference cycle (the reference backend's DataLoader workers
    took 5 s each to stop when a garbage collection found them)."""
    d = _copy(imagenet_dirs[BACKEND_FORMAT[backend]], tmp_path)
    _edit_records(d, "validation", lambda r: r["width"].__setitem__(6, 8))
    gc.collect()
    gc.disable()
    try:
        loader = FastLoader(d, "validation", batch_size=16, backend=backend, num_workers=2, spec="imagenet:eval")
        with pytest.raises(SampleDecodeError):
            for _ in loader:
                pass
        alive = weakref.ref(loader)
        del loader
        assert alive() is None  # freed by reference counting, not left to a collection
    finally:
        gc.enable()


# --------------------------------------------------------------------------- per-sample integrity
@needs_shared
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("where", ["entropy", "first"])
def test_a_flipped_byte_fails_its_sample_by_checksum(imagenet_dirs, tmp_path, backend, where):
    """One flipped byte inside a JPEG's entropy-coded data (libjpeg reports nothing) or its first
    byte (DALI crashed on it): the sample's CRC32C fails it, by name, before any decoder runs."""
    fmt = BACKEND_FORMAT[backend]
    d = _copy(imagenet_dirs[fmt], tmp_path)
    reader = SplitReader(Manifest.read(d), "validation")
    r = reader.records[9]
    at = int(r["offset"]) + (int(r["size"]) // 2 if where == "entropy" else 0)
    with open(reader.data_files[int(r["file"])], "r+b") as f:
        f.seek(at)
        b = f.read(1)
        f.seek(at)
        f.write(bytes([b[0] ^ 0x04]))
    with pytest.raises(SampleDecodeError, match=r"sample 9 .* do not match their checksum"):
        _epoch(d, backend)
    assert any("sample 9" in p and "checksum" in p for p in verify(d)), verify(d)


@needs_shared
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("damage", ["first", "cut", "garbage"])
def test_a_damaged_jpeg_with_matching_checksums_fails_as_in_the_ffcv_backend(imagenet_dirs, tmp_path, backend,
                                                                            damage):
    """A crafted JPEG (checksums recomputed, so only its own structure can tell): a bad first
    marker, a file cut mid-scan, garbage. Every backend fails the same sample with
    SampleDecodeError, in a subprocess so that a crash would show; never a partial image."""
    from crc32c import crc32c
    fmt = BACKEND_FORMAT[backend]
    d = _copy(imagenet_dirs[fmt], tmp_path)
    reader = SplitReader(Manifest.read(d), "validation")
    r = reader.records[4]
    start, size, data = int(r["offset"]), int(r["size"]), reader.data_files[int(r["file"])]
    del reader
    stored = bytearray(data.read_bytes()[start:start + size])
    if damage == "first":
        stored[0] ^= 0x01
    elif damage == "garbage":
        stored[2:] = np.random.default_rng(0).integers(0, 256, size - 2, dtype=np.uint8).tobytes()
    if damage == "cut":
        new_size = size * 2 // 3  # the index says the JPEG ends mid-scan
    else:
        new_size = size
        with open(data, "r+b") as f:
            f.seek(start)
            f.write(bytes(stored))

    def craft(rec):
        rec["size"][4] = new_size
        rec["crc32c"][4] = crc32c(bytes(stored[:new_size]))
    _edit_records(d, "validation", craft)
    if damage != "cut":  # the data file changed: its manifest checksum follows
        _edit_manifest(d, lambda m: [f.update(size=data.stat().st_size, sha256=sha256_file(data))
                                     for f in m["splits"]["validation"]["files"] if f["path"] == data.name])
    code = ("from fastload import FastLoader, SampleDecodeError\n"
            f"loader = FastLoader({str(d)!r}, 'validation', batch_size=16, backend={backend!r}, num_workers=2, "
            "order='sequential', spec='imagenet:train', drop_last=False)\n"
            "try:\n    [b for b in loader]\nexcept SampleDecodeError as e:\n    print('NAMED', e)\n")
    r = _in_subprocess(code)
    assert r.returncode == 0, (r.returncode, r.stderr[-3000:])
    assert "NAMED split 'validation' sample 4" in r.stdout, (r.stdout, r.stderr[-2000:])


# --------------------------------------------------------------------------- iterators
@needs_shared
@pytest.mark.parametrize("backend", BACKENDS)
def test_two_live_iterators_each_get_the_full_epoch(imagenet_dirs, backend):
    loader = FastLoader(imagenet_dirs[BACKEND_FORMAT[backend]], "validation", batch_size=16, backend=backend,
                        num_workers=2, spec="imagenet:train", drop_last=False)
    x_full, y_full = (torch.cat(t) for t in zip(*[(x, y) for x, y in loader]))
    loader.set_epoch(0)
    a, b = iter(loader), iter(loader)
    got = {"a": [], "b": []}
    live = {"a": a, "b": b}
    while live:
        for name, it in list(live.items()):  # interleaved, batch by batch
            try:
                got[name].append(next(it))
            except StopIteration:
                del live[name]
    for name in ("a", "b"):
        x, y = (torch.cat(t) for t in zip(*got[name]))
        assert torch.equal(y, y_full) and torch.equal(x, x_full), name


# --------------------------------------------------------------------------- limits
@needs_shared
def test_max_pixels_at_load_is_a_named_setting(imagenet_dirs):
    d = imagenet_dirs["beton"]
    biggest = int((SplitReader(Manifest.read(d), "validation").heights
                   * SplitReader(Manifest.read(d), "validation").widths).max())
    with pytest.raises(DatasetError, match=rf"more than max_pixels={biggest - 1} pixels"):
        FastLoader(d, "validation", max_pixels=biggest - 1)
    assert len(FastLoader(d, "validation", max_pixels=biggest)) > 0
    assert any("max_pixels" in p for p in verify(d, max_pixels=biggest - 1))


@pytest.mark.parametrize("bad", [True, 0, -1, 1.5])
def test_bad_loader_sizes_are_refused(labelled_colors, bad):
    with pytest.raises(ValueError, match=r"batch_size=.* is invalid"):
        FastLoader(labelled_colors["beton"], "train", batch_size=bad)


def test_a_manifest_changed_by_a_byte_is_refused(labelled_colors, tmp_path):
    """The manifest's own checksum: one changed digit (the dataset's stats, say) is seen."""
    d = _copy(labelled_colors["beton"], tmp_path)
    path = d / "manifest.json"
    text = path.read_text()
    data = json.loads(text)
    old = json.dumps(data["splits"]["train"]["stats"]["mean"][0])
    path.write_text(text.replace(old, old[:-1] + str((int(old[-1]) + 1) % 10), 1))
    with pytest.raises(DatasetError, match="does not match its own checksum"):
        FastLoader(d, "train")
