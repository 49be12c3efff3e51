"""Faults injected on real data: each ends in a clear error (or a correct result), never in a hang,
silently wrong data, a lost dataset or an orphaned process."""
from __future__ import annotations

import ctypes
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import BACKEND_FORMAT, CIFAR10, IMAGENET, ROOT, jpeg_bytes, needs_shared, save_splits
from fastload import FastLoader, Manifest, PreprocessSpec, convert, verify
from fastload.formats.manifest import DatasetError
from fastload.formats.records import SampleDecodeError, SplitReader

FASTLOAD = [sys.executable, "-m", "fastload.cli"]


def _one_line_error(r: subprocess.CompletedProcess, *needles: str) -> None:
    """A user error: exit code 2, one line on stderr naming the problem, no traceback."""
    lines = [ln for ln in r.stderr.splitlines() if ln.strip() and "%|" not in ln]  # progress bars aside
    assert r.returncode == 2, (r.returncode, r.stderr[-2000:])
    assert "Traceback" not in r.stderr, r.stderr[-2000:]
    assert len(lines) == 1 and lines[0].startswith("error: "), lines
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])


@contextmanager
def small_disk(path: Path, size: str, fs: str = "tmpfs"):
    """A real filesystem of ``size`` (tmpfs, or ext4 in a loop-mounted image file), to fill up for
    real. Needs root (CI runs as root)."""
    path.mkdir(parents=True, exist_ok=True)
    if fs == "tmpfs":
        mount = ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)]
    else:
        image = path.with_suffix(".img")
        subprocess.run(["truncate", "-s", size, str(image)], check=True)
        if subprocess.run(["mkfs.ext4", "-q", str(image)], capture_output=True).returncode != 0:
            pytest.skip("cannot make an ext4 image here (mkfs.ext4)")
        mount = ["mount", "-o", "loop", str(image), str(path)]
    if subprocess.run(mount, capture_output=True).returncode != 0:
        pytest.skip(f"cannot mount a small {fs} here (needs root)")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


def _children(pid: int) -> set[int]:
    kids = set()
    for f in Path(f"/proc/{pid}/task").glob("*/children"):
        try:
            kids |= {int(k) for k in f.read_text().split()}
        except OSError:
            pass
    return kids


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def _small_imagenet(tmp_path: Path, n: int = 40) -> Path:
    import datasets
    ds = datasets.load_dataset(str(IMAGENET), split="validation").select(range(n))
    return save_splits(tmp_path / "src", train=ds)


# --------------------------------------------------------------------------- loading
@needs_shared
@pytest.mark.parametrize("backend", ["ffcv", "dali", "reference"])
def test_abandoned_epochs_leak_nothing(imagenet_dirs, backend):
    """`break` after two batches, again and again: threads and memory stay flat."""
    import gc
    loader = FastLoader(imagenet_dirs[BACKEND_FORMAT[backend]], "validation", batch_size=32, backend=backend,
                        num_workers=2, spec="imagenet:train")

    def abandon():  # no garbage collection between epochs: an abandoned epoch is freed as it is dropped
        for k, _ in enumerate(loader):
            if k == 1:
                break

    def rss_mb():  # current resident memory, not the peak, after glibc returns its free pages
        gc.collect()
        ctypes.CDLL("libc.so.6").malloc_trim(0)
        return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    for _ in range(6):  # allocators and DALI's memory pools settle first
        abandon()
    threads, rss = threading.active_count(), rss_mb()
    for _ in range(12):
        abandon()
    assert threading.active_count() <= threads
    # a leak grows with every epoch: ffcv's loader used to keep ~160 MB per abandoned epoch (1.9 GB
    # here); allocator noise in a long test process reached 240 MB once without malloc_trim
    assert rss_mb() - rss < 250, rss_mb() - rss


@needs_shared
@pytest.mark.serial  # RSS to the MB: alone, with no neighbour's load shifting what is in flight
def test_many_short_epochs_keep_memory_and_threads_flat(imagenet_dirs):
    """120 epochs of 2 batches, each backend in a fresh process as a job runs them: after the
    first 40 (pools, caches and allocators warm), threads stay the same and resident memory flat,
    every backend (a leak of 0.08 MB an epoch would show). Before: the reference backend's main
    process swung by 300-500 MB until the heap's free pages were returned at each epoch's end
    (storage/heap.py), and the DALI backend's by 25-30 MB until its host buffers came from DALI's
    pool (dali_engine.HOST_POOL_BELOW)."""
    procs = {b: subprocess.Popen([sys.executable, str(ROOT / "tests" / "flat_memory_worker.py"),
                                  str(imagenet_dirs[BACKEND_FORMAT[b]]), b, "120"],
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for b in ("ffcv", "dali", "reference")}
    for backend, p in procs.items():
        out, err = p.communicate(timeout=300)
        assert p.returncode == 0, err[-2000:]
        run = json.loads(out.strip().splitlines()[-1])
        rss, threads = run["rss"][40:], run["threads"][40:]
        assert max(threads) == min(threads), (backend, run["threads"])
        # measured over these 80 epochs: ffcv 0.2 MB, DALI 0.6, reference 0.3 (DALI on malloc: 24-30);
        # once in three runs ffcv's heap stepped up by 3.8 MB, once, and stayed there
        assert max(rss) - min(rss) < 6, (backend, [round(x, 1) for x in run["rss"]])


@needs_shared
@pytest.mark.parametrize("backend", ["ffcv", "dali", "reference"])
def test_undecodable_sample_is_named_in_every_backend(imagenet_dirs, tmp_path, backend):
    fmt = BACKEND_FORMAT[backend]
    d = tmp_path / fmt
    shutil.copytree(imagenet_dirs[fmt], d)
    reader = SplitReader(Manifest.read(d), "validation")
    r = reader.records[5]
    path = reader.data_files[int(r["file"])]
    with open(path, "r+b") as f:  # same size: only `verify`'s checksums can see it at open time
        f.seek(int(r["offset"]))
        f.write(b"\0" * 64)  # the JPEG header is gone
    loader = FastLoader(d, "validation", batch_size=16, backend=backend, num_workers=2, order="sequential",
                        spec="imagenet:eval")
    with pytest.raises(SampleDecodeError, match=rf"split 'validation' sample 5 \(in .*{path.name}\) does not decode"):
        for _ in loader:
            pass


@needs_shared
@pytest.mark.parametrize("fmt", ["beton", "tfrecord"])
def test_truncated_or_missing_data_file_is_refused_at_open(imagenet_dirs, tmp_path, fmt):
    d = tmp_path / fmt
    shutil.copytree(imagenet_dirs[fmt], d)
    data = sorted(p for p in d.iterdir() if p.suffix in (".beton", ".tfrecord"))[0]
    with open(data, "r+b") as f:
        f.truncate(data.stat().st_size - 100)
    with pytest.raises(DatasetError, match=rf"{data.name} is \d+ bytes, the manifest says \d+ \(truncated\)"):
        FastLoader(d, "validation")
    data.unlink()
    with pytest.raises(DatasetError, match=rf"{data.name} is missing"):
        FastLoader(d, "validation")


@needs_shared
def test_labels_out_of_range_are_refused_at_open(imagenet_dirs, tmp_path):
    d = tmp_path / "copy"
    shutil.copytree(imagenet_dirs["tfrecord"], d)
    records = np.load(d / "validation.records.npy")
    records["label"][7] = 1000  # ImageNet has 1000 classes: 0..999
    np.save(d / "validation.records.npy", records)  # same size: a bit flip in the labels
    with pytest.raises(DatasetError, match=r"labels outside 0\.\.999 at index\(es\) \[7\]"):
        FastLoader(d, "validation")


@pytest.mark.parametrize("rank, world", [("2", "2"), ("-1", "2"), ("0", "0"), ("x", "2")])
def test_bad_rank_environment_is_refused(labelled_colors, monkeypatch, rank, world):
    monkeypatch.setenv("RANK", rank)
    monkeypatch.setenv("WORLD_SIZE", world)
    with pytest.raises(ValueError, match=rf"RANK='{rank}', WORLD_SIZE='{world}' is invalid"):
        FastLoader(labelled_colors["tfrecord"], "train")


@pytest.mark.parametrize("make", [
    lambda: PreprocessSpec.preset("imagenet").replace(hflip=float("nan")),
    lambda: PreprocessSpec.from_dict({"mixup": {"mixup_alpha": float("inf")}}),
    lambda: PreprocessSpec.from_json('{"normalize": {"mean": [0.5, NaN, 0.5], "std": "imagenet"}}'),
    lambda: PreprocessSpec.from_dict({"color_jitter": {"brightness": float("nan")}}),
    lambda: PreprocessSpec.from_dict({"geometry": {"kind": "random_resized_crop", "ratio": [0.75, float("inf")]}}),
])
def test_non_finite_spec_values_are_refused(make):
    with pytest.raises(ValueError, match="is invalid: allowed a finite number"):
        make()


# --------------------------------------------------------------------------- converting
@needs_shared
def test_overwrite_with_a_bad_source_keeps_the_dataset(tmp_path):
    src = _small_imagenet(tmp_path, 20)
    out = tmp_path / "done"
    convert(str(src), out, format="tfrecord", progress=False)
    r = subprocess.run([*FASTLOAD, "convert", str(tmp_path / "typo"), "--format", "tfrecord", "--out", str(out),
                        "--overwrite"], capture_output=True, text=True)
    _one_line_error(r, "typo")
    assert verify(out) == []  # still complete, still sound


def _with_a_corrupt_image(tmp_path: Path, n: int = 20, at: int = 3) -> Path:
    import datasets
    ds = datasets.load_dataset(str(IMAGENET), split="validation").select(range(n))
    ds = ds.cast_column("image", datasets.Image(decode=False))
    rows = ds.to_dict()
    rows["image"][at] = {"bytes": b"\xff\xd8 not a JPEG", "path": None}
    return save_splits(tmp_path / "src-corrupt", train=datasets.Dataset.from_dict(rows, features=ds.features))


def _batches_of(out: Path):
    loader = FastLoader(out, "train", batch_size=8, num_workers=1, order="sequential", drop_last=False,
                        spec="imagenet:eval")
    return [(x.clone(), y.clone()) for x, y in loader]


@needs_shared
@pytest.mark.parametrize("fmt", ["beton", "tfrecord"])
def test_overwrite_that_fails_midway_keeps_the_old_dataset(tmp_path, fmt):
    """A source that fails at image 3: the finished dataset is still there, loadable, the same."""
    out = tmp_path / "done"
    convert(str(_small_imagenet(tmp_path, 20)), out, format=fmt, progress=False)
    (out / "NOTES.txt").write_text("the user's")
    before = _batches_of(out)
    r = subprocess.run([*FASTLOAD, "convert", str(_with_a_corrupt_image(tmp_path)), "--format", fmt, "--out",
                        str(out), "--overwrite"], capture_output=True, text=True)
    _one_line_error(r, "index 3")
    assert verify(out) == [] and (out / "NOTES.txt").read_text() == "the user's"
    after = _batches_of(out)
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(before, after))


@needs_shared
def test_killed_overwrite_keeps_the_old_dataset_and_a_rerun_replaces_it(tmp_path):
    """kill -9 while the new dataset is being built: the old one stays whole and loadable; the same
    command again finishes the new one and swaps it in, the directory's other files kept."""
    out = tmp_path / "out"
    convert(str(_small_imagenet(tmp_path, 20)), out, format="tfrecord", progress=False)
    (out / "NOTES.txt").write_text("the user's")
    old = Manifest.read(out).split("train").num_examples
    cmd = [*FASTLOAD, "convert", str(CIFAR10), "--format", "tfrecord", "--out", str(out), "--overwrite",
           "--shard-size", "400", "--workers", "1"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    staging = out.parent / f".{out.name}.fastload-overwrite"
    deadline = time.time() + 120
    while time.time() < deadline and len(list((staging / ".partial").glob("test-*.json"))) < 2:
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert list((staging / ".partial").glob("test-*.json")), "the kill must land while the new one is built"
    assert verify(out) == [] and Manifest.read(out).split("train").num_examples == old
    assert len(_batches_of(out)) == 3
    r = subprocess.run(cmd, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "resuming:" in r.stdout
    m = Manifest.read(out)
    assert m.split_names == ["test"] and m.split("test").num_examples == 10000 and verify(out, decode_images=False) == []
    assert (out / "NOTES.txt").read_text() == "the user's" and not staging.exists()


@needs_shared
def test_a_dataset_finished_meanwhile_is_not_replaced(tmp_path, monkeypatch):
    """The race of two conversions into one --out: another one finishes while this one opens its
    source. Checked again under the output lock, so this one stops and the other's dataset stays."""
    import fastload.converters.convert as conversion
    finished = tmp_path / "finished"
    convert(str(_small_imagenet(tmp_path, 12)), finished, format="tfrecord", progress=False)
    out = tmp_path / "out"
    opened = conversion.open_source

    def open_while_another_finishes(source, splits):
        data = opened(source, splits)
        shutil.copytree(finished, out, dirs_exist_ok=True)  # the other conversion's result appears
        return data
    monkeypatch.setattr(conversion, "open_source", open_while_another_finishes)
    with pytest.raises(conversion.ConversionError, match="already holds a complete dataset"):
        convert(str(_small_imagenet(tmp_path / "other", 20)), out, format="tfrecord", progress=False)
    assert verify(out) == [] and Manifest.read(out).split("train").num_examples == 12


@needs_shared
def test_full_disk_tfrecord_is_one_line_and_leaves_no_temp_files(tmp_path):
    src = _small_imagenet(tmp_path, 60)  # about 6 MB of JPEGs
    with small_disk(tmp_path / "disk", "2m") as disk:
        out = disk / "out"
        r = subprocess.run([*FASTLOAD, "convert", str(src), "--format", "tfrecord", "--out", str(out),
                            "--shard-size", "8"], capture_output=True, text=True, timeout=120)
        _one_line_error(r, "is full", "rerun the same command")
        assert not list(out.glob(".*.tmp")) and not list(out.glob("*.tmp"))


@needs_shared
def test_disk_that_fills_while_a_finished_shard_is_recorded(tmp_path, monkeypatch):
    """The disk fills between a worker's shard and the driver's record of it (CI saw this race
    as a bare 'cannot write'): the same full-disk error, and the rerun keeps what was recorded."""
    import fastload.converters.convert as conversion
    src = _small_imagenet(tmp_path, 24)
    recorded = []
    record = conversion.record_shard

    def record_on_a_disk_filled_meanwhile(task, result):
        if len(recorded) == 1:  # someone else fills the disk after the first shard
            with open(disk / "filler", "wb") as f:
                try:
                    while True:
                        f.write(b"\0" * 2**16)
                        f.flush()
                except OSError:
                    pass
        record(task, result)
        recorded.append(task)

    with small_disk(tmp_path / "disk", "4m") as disk:
        monkeypatch.setattr(conversion, "record_shard", record_on_a_disk_filled_meanwhile)
        with pytest.raises(conversion.ConversionError, match="is full.*rerun the same command"):
            convert(str(src), disk / "out", format="tfrecord", shard_size=8, workers=1, progress=False)
        (disk / "filler").unlink()
        monkeypatch.setattr(conversion, "record_shard", record)
        m = convert(str(src), disk / "out", format="tfrecord", shard_size=8, workers=1, progress=False)
        assert verify(disk / "out") == [] and m.split("train").num_examples == 24


@needs_shared
def test_full_disk_beton_convert_is_one_line(tmp_path):
    """Too little room for the staged shards: one line from the CLI, no .beton, no manifest."""
    src = _small_imagenet(tmp_path, 60)
    with small_disk(tmp_path / "disk", "3m") as disk:
        r = subprocess.run([*FASTLOAD, "convert", str(src), "--format", "beton", "--out", str(disk / "out")],
                           capture_output=True, text=True, timeout=120)
        _one_line_error(r, "full")
        out = disk / "out"  # what is kept is the resumable staging, never a half .beton or a manifest
        assert not (out / "manifest.json").exists() and not list(out.rglob("*.beton*")), list(out.rglob("*"))


@needs_shared
def test_disk_that_fills_while_the_beton_is_written(tmp_path):
    """Room for the staged shards but not for the .beton: refused before writing it, staging
    kept for the rerun; and a write that runs out of room anyway (the disk filled by someone
    else) raises ENOSPC, leaving no half file in place of the .beton."""
    import errno
    from fastload.formats.beton import BetonChunk, plan_beton, write_beton
    src = _small_imagenet(tmp_path, 60)
    staged = _converted(tmp_path, src)
    size = sum(f.stat().st_size for f in staged.glob("*.tfrecord"))
    with small_disk(tmp_path / "disk", f"{int(size * 1.5) // 1024}k") as disk:
        r = subprocess.run([*FASTLOAD, "convert", str(src), "--format", "beton", "--out", str(disk / "out")],
                           capture_output=True, text=True, timeout=120)
        _one_line_error(r, "needs about", "rerun the same command")
        out = disk / "out"
        assert not list(out.rglob("*.beton*")) and len(list((out / ".partial").glob("*.tfrecord"))) >= 1

        reader = SplitReader(Manifest.read(staged), "train")
        rows = np.array(reader.records)
        chunks = [BetonChunk(f, rows[rows["file"] == k]) for k, f in enumerate(reader.data_files)]
        layout = plan_beton(lambda: iter(chunks), {"label": ("int", 0)}, "jpeg")
        with pytest.raises(OSError) as e:
            write_beton(disk / "x.beton", layout, lambda: iter(chunks))
        assert e.value.errno == errno.ENOSPC
        assert not (disk / "x.beton").exists()


@needs_shared
def test_direct_write_that_runs_out_of_room(tmp_path):
    """The .beton is written past the page cache (O_DIRECT, here on ext4): a disk that fills
    mid-file still raises ENOSPC and leaves no half file."""
    import errno
    from fastload.formats.beton import BetonChunk, plan_beton, write_beton
    from fastload.formats.bulk_write import BulkFile
    staged = _converted(tmp_path, _small_imagenet(tmp_path, 60))
    reader = SplitReader(Manifest.read(staged), "train")
    rows = np.array(reader.records)
    chunks = [BetonChunk(f, rows[rows["file"] == k]) for k, f in enumerate(reader.data_files)]
    layout = plan_beton(lambda: iter(chunks), {"label": ("int", 0)}, "jpeg")
    with small_disk(tmp_path / "disk", f"{layout.data_end // 2 // 1024 + 1024}k", fs="ext4") as disk:
        probe = BulkFile(disk / "probe")
        assert probe.direct
        probe.abandon()
        with pytest.raises(OSError) as e:
            write_beton(disk / "x.beton", layout, lambda: iter(chunks))
        assert e.value.errno == errno.ENOSPC
        assert not (disk / "x.beton").exists()


def _converted(tmp_path: Path, src: Path) -> Path:
    out = tmp_path / "staged"
    if not (out / "manifest.json").exists():
        convert(str(src), out, format="tfrecord", progress=False)
    return out


def test_read_only_output_is_one_line(tmp_path):
    src = save_splits(tmp_path / "src", train=_tiny_dataset(4))
    ro = tmp_path / "ro"
    ro.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(ro)],
                      capture_output=True).returncode != 0:
        pytest.skip("cannot mount a read-only tmpfs here (needs root)")
    try:
        r = subprocess.run([*FASTLOAD, "convert", str(src), "--format", "tfrecord", "--out", str(ro / "out")],
                           capture_output=True, text=True)
        _one_line_error(r, "writable")
    finally:
        subprocess.run(["umount", "-l", str(ro)])


def _tiny_dataset(n: int, labels=None, images=None):
    """n small JPEGs (or the given encoded images) with 3 classes."""
    import datasets
    feats = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=["a", "b", "c"])})
    images = images or [jpeg_bytes(np.full((24, 24, 3), 90, np.uint8))] * n
    labels = labels if labels is not None else [i % 3 for i in range(n)]
    return datasets.Dataset.from_dict({"image": [{"bytes": b, "path": None} for b in images], "label": labels},
                                      features=feats)


def _cifar_rows(n: int):
    """The first n real CIFAR-10 images (their stored JPEG bytes) and labels."""
    import datasets
    ds = datasets.load_dataset(str(CIFAR10), split="test").cast_column("img", datasets.Image(decode=False))
    rows = ds.select(range(n))
    return [r["bytes"] for r in rows["img"]], list(rows["label"]), ds.features["label"].names


def _dataset(images: list[bytes], labels: list[int], names: list[str]):
    import datasets
    feats = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=names)})
    return datasets.Dataset.from_dict({"image": [{"bytes": b, "path": None} for b in images], "label": labels},
                                      features=feats)


def test_user_errors_on_the_cli_are_one_line(tmp_path):
    import datasets
    cases = []
    cases.append((tmp_path / "nowhere", "could not be opened"))
    save_splits(tmp_path / "empty", train=_tiny_dataset(0))
    cases.append((tmp_path / "empty", "holds no rows"))
    nolabel = datasets.Dataset.from_dict({"image": [{"bytes": jpeg_bytes(np.zeros((8, 8, 3), np.uint8)),
                                                     "path": None}]},
                                         features=datasets.Features({"image": datasets.Image()}))
    save_splits(tmp_path / "nolabel", train=nolabel)
    cases.append((tmp_path / "nolabel", "no label column"))
    feats = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=["a", "b"])})
    black = {"bytes": jpeg_bytes(np.zeros((8, 8, 3), np.uint8)), "path": None}
    none = datasets.Dataset.from_dict({"image": [black] * 3, "label": [0, None, 1]}, features=feats)
    save_splits(tmp_path / "none", train=none)
    cases.append((tmp_path / "none", "index 1: label column(s) ['label'] are empty (None)"))
    for k, (src, needle) in enumerate(cases):
        r = subprocess.run([*FASTLOAD, "convert", str(src), "--format", "tfrecord", "--out", str(tmp_path / f"o{k}")],
                           capture_output=True, text=True)
        _one_line_error(r, needle)


@needs_shared
def test_resume_proves_it_continues_the_same_source(tmp_path, capsys):
    """Interrupted, then the source changes labels (same path, same rows): the rerun starts over
    instead of mixing stale shards with new ones. Real CIFAR-10 photos."""
    rows = 40
    images, labels_a, names = _cifar_rows(rows)
    images[-1] = images[-1][:60]  # the last one is cut short: the job stops there
    src = save_splits(tmp_path / "src", train=_dataset(images, labels_a, names))
    out = tmp_path / "out"
    with pytest.raises(Exception, match="index 39"):
        convert(str(src), out, format="tfrecord", shard_size=8, workers=1, progress=False)
    assert len(list((out / ".partial").glob("train-*.json"))) == 4  # 4 of 5 shards done
    labels_b = [(v + 1) % 10 for v in labels_a]
    shutil.rmtree(src)
    save_splits(src, train=_dataset(images, labels_b, names))
    m = convert(str(src), out, format="tfrecord", shard_size=8, workers=1, skip_corrupt=True, progress=False)
    assert "source changed" in capsys.readouterr().out
    assert SplitReader(m, "train").labels.tolist() == labels_b[:rows - 1]
    assert verify(out) == []


@needs_shared
def test_resume_of_a_conversion_an_older_fastload_started(tmp_path, capsys):
    """Its plan lacks a setting this version records (stats_every): the rerun starts over
    rather than refusing a setting the user never gave, or mixing old shards in."""
    rows = 24
    images, labels, names = _cifar_rows(rows)
    images[-1] = images[-1][:60]
    src = save_splits(tmp_path / "src", train=_dataset(images, labels, names))
    out = tmp_path / "out"
    with pytest.raises(Exception, match="index 23"):
        convert(str(src), out, format="tfrecord", shard_size=8, workers=1, progress=False)
    plan_path = out / ".partial" / "plan.json"
    plan = json.loads(plan_path.read_text())
    del plan["settings"]["stats_every"]  # as fastload wrote it before this setting existed
    plan_path.write_text(json.dumps(plan))
    m = convert(str(src), out, format="tfrecord", shard_size=8, workers=1, skip_corrupt=True, progress=False)
    assert "started by an older fastload: starting over" in capsys.readouterr().out
    assert m.split("train").num_examples == rows - 1 and m.split("train").stats["images"] == rows - 1
    assert verify(out) == []


@needs_shared
def test_skip_corrupt_retry_keeps_finished_shards(tmp_path, capsys):
    images, labels, names = _cifar_rows(24)
    images[20:] = [b[:50] for b in images[20:]]  # the last shard's images are cut short
    src = save_splits(tmp_path / "src", train=_dataset(images, labels, names))
    out = tmp_path / "out"
    with pytest.raises(Exception, match="--skip-corrupt"):
        convert(str(src), out, format="tfrecord", shard_size=8, workers=1, progress=False, shuffle_seed=None)
    done = {p.name: p.stat().st_mtime_ns for p in (out / ".partial").glob("train-*.json")}
    assert len(done) == 2
    m = convert(str(src), out, format="tfrecord", shard_size=8, workers=1, skip_corrupt=True, progress=False, shuffle_seed=None)
    assert "resuming: 2 of 3 shards already done" in capsys.readouterr().out
    assert m.split("train").num_examples == 20 and len(m.split("train").skipped) == 4


@needs_shared
def test_sixteen_bit_png_is_scaled_not_white(tmp_path, imagenet_source):
    """A real photo's gray levels saved as a 16-bit PNG (v * 257, as 16-bit scanners and medical
    images store them)."""
    import datasets
    gray = np.asarray(imagenet_source[0]["image"].convert("L"))
    levels = gray.astype(np.uint16) * 257
    buf = io.BytesIO()
    Image.fromarray(levels).save(buf, format="PNG")
    assert Image.open(io.BytesIO(buf.getvalue())).mode.startswith("I")
    feats = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=["a"])})
    ds = datasets.Dataset.from_dict({"image": [{"bytes": buf.getvalue(), "path": None}], "label": [0]}, features=feats)
    m = convert(str(save_splits(tmp_path / "src", train=ds)), tmp_path / "out", format="tfrecord", progress=False)
    stored = np.asarray(SplitReader(m, "train").image(0).convert("L")).astype(float)
    assert (stored >= 250).mean() < (gray >= 250).mean() + 0.02  # it used to be 93-97% pure white
    assert np.abs(stored - gray).mean() < 2.0  # the photo's own levels, up to the JPEG's error


@needs_shared
def test_second_conversion_into_the_same_directory_refuses_at_once(tmp_path):
    out = tmp_path / "out"
    first = subprocess.Popen([*FASTLOAD, "convert", str(CIFAR10), "--format", "tfrecord", "--out", str(out),
                              "--workers", "1", "--shard-size", "500"], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.time() + 60
        def locked() -> bool:  # the owner's pid is written once the lock is held
            try:
                return (out / ".lock").read_text().startswith("pid")
            except OSError:
                return False
        while time.time() < deadline and not locked():
            time.sleep(0.01)
        os.kill(first.pid, signal.SIGSTOP)  # held mid-run, lock and all: a conversion takes ~1 s now
        t0 = time.time()
        r = subprocess.run([*FASTLOAD, "convert", str(CIFAR10), "--format", "tfrecord", "--out", str(out)],
                           capture_output=True, text=True, timeout=60)
        _one_line_error(r, "being written by another conversion", f"pid {first.pid}")
        assert time.time() - t0 < 30
    finally:
        os.kill(first.pid, signal.SIGCONT)
        first.kill()
        first.wait()


@needs_shared
def test_kill9_of_a_conversion_takes_its_workers_with_it(tmp_path):
    out = tmp_path / "out"
    proc = subprocess.Popen([*FASTLOAD, "convert", str(CIFAR10), "--format", "tfrecord", "--out", str(out),
                             "--workers", "2", "--shard-size", "200"], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.time() + 60
    workers: set[int] = set()
    while time.time() < deadline and len(workers) < 2:
        workers = {k for k in _children(proc.pid)}
        time.sleep(0.05)
    assert len(workers) >= 2, "the workers must have started"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    deadline = time.time() + 10
    while time.time() < deadline and any(_alive(w) for w in workers):
        time.sleep(0.1)
    assert not any(_alive(w) for w in workers)


def test_small_images_with_the_imagenet_preset_warn(tmp_path):
    src = save_splits(tmp_path / "src", train=_tiny_dataset(6))  # 24 px images, an 'image' column
    with pytest.warns(UserWarning, match=r"images are small \(median longer side 24 px\).*--preset cifar10"):
        m = convert(str(src), tmp_path / "out", format="tfrecord", progress=False)
    assert m.preset == "imagenet"
    with warnings_as_errors():  # an explicit preset is the user's choice: no warning
        convert(str(src), tmp_path / "out2", format="tfrecord", preset="cifar10", progress=False)


@contextmanager
def warnings_as_errors():
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        yield
