"""Converters and verify: round trips through each backend's own reader, schemas, images, failures."""
from __future__ import annotations

import io
import json
import os
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from PIL import Image

from conftest import CIFAR10, cifar100_dataset, coco_dataset, jpeg_bytes, needs_shared, png_bytes, save_splits, stock_ffcv
from fastload import convert, verify
from fastload.converters.convert import ConversionError
from fastload.converters.images import CorruptImageError
from fastload.converters.sources import SchemaError
from fastload.formats.manifest import DatasetError, Manifest
from fastload.formats.records import SplitReader

FASTLOAD = [sys.executable, "-m", "fastload.cli"]


def _source_bytes(ds):
    import datasets
    raw = ds.cast_column("image", datasets.Image(decode=False))
    return [r["bytes"] for r in raw["image"]]


def _decode(b: bytes) -> np.ndarray:
    from PIL import ImageOps
    im = Image.open(io.BytesIO(b))
    im = ImageOps.exif_transpose(im)
    return np.asarray(im.convert("RGB"), dtype=np.float64)


# --------------------------------------------------------------------------- round trips on real data
@needs_shared
def test_tfrecord_round_trip_through_dali_reader(imagenet_dirs, imagenet_source):
    from nvidia.dali import fn, pipeline_def
    import nvidia.dali.tfrecord as tfrec
    d = imagenet_dirs["tfrecord"]
    m = Manifest.read(d)
    info = m.split("validation")
    shards = [d / f["path"] for f in info.files_with_role("data")]
    assert len(shards) > 1  # several shards, read in order
    idx = {f["for"]: d / f["path"] for f in info.files_with_role("dali_index")}

    @pipeline_def(batch_size=50, num_threads=2, device_id=None)
    def graph():
        f = fn.readers.tfrecord(path=[str(s) for s in shards], index_path=[str(idx[s.name]) for s in shards],
                                features={"image/encoded": tfrec.FixedLenFeature((), tfrec.string, ""),
                                          "image/class/label": tfrec.FixedLenFeature([1], tfrec.int64, -1)},
                                random_shuffle=False)
        return f["image/encoded"], f["image/class/label"]

    pipe = graph()
    pipe.build()
    stored, labels = [], []
    for _ in range(4):
        enc, lab = pipe.run()
        stored += [np.array(enc[i]).tobytes() for i in range(len(enc))]
        labels += [int(np.array(lab[i])[0]) for i in range(len(lab))]
    assert labels == list(imagenet_source["label"])
    _check_stored_images(stored, _source_bytes(imagenet_source), info)


@needs_shared
def test_beton_round_trip_through_ffcv_reader_and_loader(imagenet_dirs, imagenet_source):
    stock_ffcv()
    from ffcv.fields.basics import IntDecoder
    from ffcv.fields.rgb_image import CenterCropRGBImageDecoder
    from ffcv.loader import Loader, OrderOption
    from ffcv.reader import Reader
    d = imagenet_dirs["beton"]
    beton = str(d / "validation.beton")
    reader = Reader(beton)
    assert reader.num_samples == 200
    assert reader.metadata["f1"].tolist() == list(imagenet_source["label"])
    data = np.memmap(beton, dtype=np.uint8, mode="r")
    sizes = dict(zip(reader.alloc_table["ptr"].tolist(), reader.alloc_table["size"].tolist()))
    stored = [data[p:p + sizes[int(p)]].tobytes() for p in reader.metadata["f0"]["data_ptr"]]
    _check_stored_images(stored, _source_bytes(imagenet_source), Manifest.read(d).split("validation"))
    # no page padding: the file is its images plus ~100 bytes of tables per sample and, per 8 MiB
    # page, the tail where the next image did not fit (ffcv's own writer pads to whole pages)
    size = os.path.getsize(beton)
    pages = -(-size // int(reader.page_size))
    assert size <= sum(map(len, stored)) + 200 * 100 + pages * max(map(len, stored))
    # and ffcv's own Loader decodes every image, labels in order, with either of its memory
    # managers: the process cache reads whole pages, so no image may cross a page boundary
    decoded = {}
    for os_cache in (True, False):
        loader = Loader(beton, batch_size=50, num_workers=1, order=OrderOption.SEQUENTIAL, drop_last=False,
                        os_cache=os_cache,
                        pipelines={"image": [CenterCropRGBImageDecoder((64, 64), 1.0)], "label": [IntDecoder()]})
        batches = [(np.array(x), np.array(lab).reshape(-1)) for x, lab in loader]
        assert np.concatenate([lab for _, lab in batches]).tolist() == list(imagenet_source["label"])
        decoded[os_cache] = np.concatenate([x for x, _ in batches])
    assert reader.page_size == 8 * 2**20 and pages >= 3  # several pages: crossings were handled
    assert np.array_equal(decoded[True], decoded[False])


def test_beton_layout_constants_are_ffcvs():
    """fastload writes .beton files without importing ffcv: its copy of ffcv's file format must
    match the installed ffcv's, byte for byte."""
    from fastload.formats import beton
    stock_ffcv()
    from ffcv.fields import IntField, NDArrayField, RGBImageField
    from ffcv.fields.ndarray import NDArrayArgsType
    from ffcv.fields.rgb_image import IMAGE_MODES
    from ffcv.types import (ALLOC_TABLE_TYPE, CURRENT_VERSION, FieldDescType, HeaderType, TYPE_ID_HANDLER,
                            get_metadata_type)
    from ffcv.writer import MAX_PAGE_SIZE
    assert (beton.HEADER, beton.FIELD_DESCRIPTOR, beton.ALLOC_TABLE) == (HeaderType, FieldDescType, ALLOC_TABLE_TYPE)
    assert beton.FILE_VERSION == CURRENT_VERSION and beton.MAX_PAGE_BYTES == MAX_PAGE_SIZE
    assert beton.NDARRAY_ARGUMENTS == NDArrayArgsType
    assert beton.IMAGE_MODES == {"jpeg": IMAGE_MODES["jpg"], "raw": IMAGE_MODES["raw"]}
    ours = beton.beton_fields({"label": ("ids", 7), "coarse": ("int", 0)})
    theirs = [RGBImageField(), NDArrayField(np.dtype("<i2"), (7,)), IntField()]
    assert [f.type_id for f in ours] == [next(k for k, v in TYPE_ID_HANDLER.items() if v is type(t)) for t in theirs]
    assert [f.metadata_type for f in ours] == [t.metadata_type for t in theirs]
    for f, t in zip(ours, theirs):
        assert (f.arguments + bytes(1024 - len(f.arguments))) == t.to_binary().tobytes()
    layout = beton.BetonLayout(ours, "jpeg", 10, 100)
    assert layout.metadata_type == get_metadata_type(theirs)


def _check_stored_images(stored: list[bytes], source: list[bytes], info):
    assert len(stored) == len(source) == info.num_examples
    passthrough = [i for i in range(len(source)) if stored[i] == source[i]]
    reencoded = [i for i in range(len(source)) if stored[i] != source[i]]
    assert len(passthrough) >= 190  # RGB baseline JPEGs are stored byte for byte
    assert reencoded, "the sample holds grayscale/CMYK JPEGs that must be re-encoded"
    for i in reencoded:
        s = Image.open(io.BytesIO(stored[i]))
        assert (s.format, s.mode) == ("JPEG", "RGB")
        diff = np.abs(_decode(stored[i]) - _decode(source[i])).mean() / 255
        assert diff <= 2 / 255, (i, diff)


# --------------------------------------------------------------------------- schemas
def test_cifar100_keeps_both_labels(tmp_path):
    ds = cifar100_dataset(20)
    src = save_splits(tmp_path / "src", train=ds)
    for fmt in ("tfrecord", "beton"):
        m = convert(str(src), tmp_path / fmt, format=fmt, progress=False, shuffle_seed=None)
        r = SplitReader(m, "train")
        assert m.labels["target"] == "fine_label" and m.preset == "cifar100"
        assert r.labels.tolist() == ds["fine_label"]
        assert np.asarray(r.records["coarse_label"]).tolist() == ds["coarse_label"]
        assert m.labels["columns"]["coarse_label"]["num_classes"] == 20
        assert verify(tmp_path / fmt) == []
    coarse = convert(str(src), tmp_path / "coarse", format="tfrecord", label="coarse_label", progress=False, shuffle_seed=None)
    assert SplitReader(coarse, "train").labels.tolist() == ds["coarse_label"]
    from fastload.formats import tfrecord
    tm = Manifest.read(tmp_path / "tfrecord")
    shard = tmp_path / "tfrecord" / tm.split("train").files_with_role("data")[0]["path"]
    _, ints = tfrecord.decode_example(next(tfrecord.read_records(shard.read_bytes()))[1])
    assert ints["image/class/label"] == [ds["fine_label"][0]] and ints["image/class/coarse_label"] == [ds["coarse_label"][0]]


def test_coco_multilabel_ids_survive(tmp_path):
    ds = coco_dataset(12)
    src = save_splits(tmp_path / "src", train=ds)
    expected = [sorted(set(o["category"])) for o in ds["objects"]]
    for fmt in ("tfrecord", "beton"):
        m = convert(str(src), tmp_path / fmt, format=fmt, progress=False, shuffle_seed=None)
        assert m.multi_label and m.num_classes == 80 and m.preset == "coco"
        assert m.class_names[:2] == ["category_0", "category_1"]
        r = SplitReader(m, "train")
        got = [[int(v) for v in row if v >= 0] for row in r.labels]
        assert got == expected
        assert verify(tmp_path / fmt) == []
    # the .beton's own label field, read with ffcv's Loader: padded ids, -1 past the last
    stock_ffcv()
    from ffcv.fields.ndarray import NDArrayDecoder
    from ffcv.loader import Loader, OrderOption
    loader = Loader(str(tmp_path / "beton" / "train.beton"), batch_size=12, num_workers=1,
                    order=OrderOption.SEQUENTIAL, drop_last=False,
                    pipelines={"image": None, "label": [NDArrayDecoder()]})
    (ids,) = next(iter(loader))
    assert [[int(v) for v in row if v >= 0] for row in np.asarray(ids)] == expected


def test_source_that_cannot_be_opened(tmp_path):
    r = subprocess.run([*FASTLOAD, "convert", str(tmp_path / "nothing"), "--format", "tfrecord", "--out",
                        str(tmp_path / "out")], capture_output=True, text=True)
    assert r.returncode == 2 and "could not be opened" in r.stderr and "nothing" in r.stderr
    assert not (tmp_path / "out").exists()  # nothing left behind


def test_unknown_schema_lists_columns(tmp_path):
    import datasets
    ds = datasets.Dataset.from_dict({"picture": [b"x"], "target": [1]})
    src = save_splits(tmp_path / "src", train=ds)
    with pytest.raises(SchemaError, match=r"no image column found among columns \{'picture'.*--label"):
        convert(str(src), tmp_path / "out", format="tfrecord", progress=False)
    feats = datasets.Features({"image": datasets.Image(), "a": datasets.ClassLabel(names=["x"]),
                               "b": datasets.ClassLabel(names=["y"])})
    ds2 = datasets.Dataset.from_dict({"image": [{"bytes": jpeg_bytes(np.zeros((8, 8, 3), np.uint8)), "path": None}],
                                      "a": [0], "b": [0]}, features=feats)
    src2 = save_splits(tmp_path / "src2", train=ds2)
    with pytest.raises(SchemaError, match="several label columns"):
        convert(str(src2), tmp_path / "out2", format="tfrecord", progress=False)
    m = convert(str(src2), tmp_path / "out3", format="tfrecord", label="b", progress=False)
    assert m.labels["target"] == "b"
    with pytest.raises(SchemaError, match="split.*'nope'.*it has"):
        convert(str(src2), tmp_path / "out4", format="tfrecord", splits=["nope"], progress=False)


# --------------------------------------------------------------------------- image handling
def _image_dataset(images: list[bytes]):
    import datasets
    feats = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=["a", "b"])})
    return datasets.Dataset.from_dict({"image": [{"bytes": b, "path": None} for b in images],
                                       "label": [i % 2 for i in range(len(images))]}, features=feats)


def test_gray_cmyk_png_and_exif_become_upright_rgb_jpegs(tmp_path):
    yy, xx = np.mgrid[0:40, 0:60]
    rgb = np.stack([xx * 4, yy * 6, 120 + (xx + yy)], axis=-1).astype(np.uint8)  # smooth, like photos
    gray = Image.fromarray(rgb[..., 0])
    blocks = np.zeros((40, 60, 3), np.uint8)  # a palette image: four flat colours
    blocks[:20, :30], blocks[:20, 30:], blocks[20:, :30], blocks[20:, 30:] = (200, 40, 40), (40, 200, 40), (40, 40, 200), (90, 90, 90)
    cmyk = Image.fromarray(rgb).convert("CMYK")
    buf = io.BytesIO()
    cmyk.save(buf, "JPEG", quality=95)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 CW to display
    rotated = io.BytesIO()
    Image.fromarray(rgb).save(rotated, "JPEG", quality=95, exif=exif.tobytes())
    progressive = jpeg_bytes(rgb, progressive=True)
    sources = [jpeg_bytes(rgb), png_bytes(gray), buf.getvalue(), png_bytes(Image.fromarray(blocks).convert("P", palette=Image.ADAPTIVE)),
               rotated.getvalue(), progressive, png_bytes(Image.fromarray(rgb).convert("RGBA"))]
    ds = _image_dataset(sources)
    src = save_splits(tmp_path / "src", train=ds)
    m = convert(str(src), tmp_path / "out", format="tfrecord", progress=False, shuffle_seed=None, image_codec="jpeg")  # (auto: raw)
    r = SplitReader(m, "train")
    assert r.stored(0).tobytes() == sources[0]  # RGB baseline JPEG: byte for byte
    assert m.split("train").stats and m.data["splits"]["train"]["passthrough_jpegs"] == 1
    for i in range(len(sources)):
        im = Image.open(io.BytesIO(r.stored(i).tobytes()))
        assert (im.format, im.mode) == ("JPEG", "RGB"), i
        assert not im.info.get("progressive")
        assert im.getexif().get(0x0112) in (None, 1)
        # the pixels `datasets` shows the user (EXIF applied), within JPEG loss (4:2:0 chroma on
        # saturated synthetic edges costs more than on photos, where the bound is 2: see round trips)
        assert np.abs(_decode(r.stored(i).tobytes()) - _decode(sources[i])).mean() <= 4.0, i
    upright = Image.open(io.BytesIO(r.stored(4).tobytes()))
    assert upright.size == (40, 60)  # the 60x40 image, rotated by its orientation tag


def test_max_side_downscales(tmp_path):
    big = jpeg_bytes(np.full((300, 200, 3), 128, np.uint8))
    src = save_splits(tmp_path / "src", train=_image_dataset([big]))
    m = convert(str(src), tmp_path / "out", format="tfrecord", max_side=150, progress=False)
    r = SplitReader(m, "train")
    assert (int(r.records[0]["height"]), int(r.records[0]["width"])) == (150, 100)
    assert Image.open(io.BytesIO(r.stored(0).tobytes())).size == (100, 150)


def _with_frame_size(jpeg: bytes, height: int, width: int) -> bytes:
    """The JPEG with its frame header claiming another size (a decompression bomb's header)."""
    data = bytearray(jpeg)
    sof = data.index(b"\xff\xc0")
    data[sof + 5:sof + 9] = height.to_bytes(2, "big") + width.to_bytes(2, "big")
    return bytes(data)


@needs_shared
def test_max_pixels_is_a_named_limit_and_max_side_decodes_large_jpegs_smaller(tmp_path, imagenet_source):
    """A JPEG over --max-pixels is refused by that name (not as 'does not decode'); with --max-side
    it is decoded at a reduced size (libjpeg's DCT scaling) and stored downscaled, close to a full
    decode's downscale. A header claiming 20000x20000 is refused before anything is decoded."""
    photo = imagenet_source[0]["image"].convert("RGB").resize((3000, 2000), Image.LANCZOS)
    big = jpeg_bytes(np.asarray(photo), quality=92)
    src = save_splits(tmp_path / "src", train=_image_dataset([big]))
    with pytest.raises(CorruptImageError, match=r"image is 3000x2000 \(6000000 pixels\), over max_pixels=1000000 "
                                                r"\(a decompression-bomb guard\): pass --max-side"):
        convert(str(src), tmp_path / "refused", format="tfrecord", max_pixels=1_000_000, progress=False)
    m = convert(str(src), tmp_path / "small", format="tfrecord", max_pixels=1_000_000, max_side=512, progress=False)
    r = SplitReader(m, "train")
    assert (int(r.records[0]["height"]), int(r.records[0]["width"])) == (341, 512)
    whole = SplitReader(convert(str(src), tmp_path / "whole", format="tfrecord", max_side=512, progress=False),
                        "train")  # under the default limit: a full decode, then the same downscale
    diff = np.abs(np.asarray(r.image(0), np.float64) - np.asarray(whole.image(0), np.float64))
    assert diff.mean() < 1.5, diff.mean()  # measured 1.07 levels: DCT scaling is another low-pass
    bomb = _with_frame_size(jpeg_bytes(np.full((64, 64, 3), 90, np.uint8)), 20000, 20000)
    src = save_splits(tmp_path / "bomb-src", train=_image_dataset([bomb]))
    r = subprocess.run([*FASTLOAD, "convert", str(src), "--format", "tfrecord", "--out", str(tmp_path / "bomb")],
                       capture_output=True, text=True)
    assert r.returncode == 2 and "image is 20000x20000 (400000000 pixels), over max_pixels=178956970" in r.stderr


def test_dataset_stats_are_per_channel_pixel_stats(tmp_path):
    a = np.zeros((10, 10, 3), np.uint8)
    a[..., 0] = 255
    a[:5, :, 1] = 255
    src = save_splits(tmp_path / "src", train=_image_dataset([png_bytes(Image.fromarray(a))]))
    m = convert(str(src), tmp_path / "out", format="tfrecord", progress=False)
    stats = m.split("train").stats
    decoded = np.asarray(SplitReader(m, "train").image(0), np.float64) / 255  # stats describe the stored pixels' source
    assert stats["mean"][0] == pytest.approx(1.0, abs=0.01) and stats["mean"][1] == pytest.approx(0.5, abs=0.02)
    assert stats["std"][1] == pytest.approx(0.5, abs=0.02) and stats["std"][2] == pytest.approx(0.0, abs=0.02)
    assert decoded.shape == (10, 10, 3)


def test_stats_of_a_large_jpeg_split_come_from_an_even_sample(tmp_path):
    """Over 1,000 JPEGs, every 2nd image's pixels (``stats_every``): exactly their stats, and
    close to all images'; raw storage decodes every image anyway and counts them all."""
    from fastload.converters.images import stats_from_histograms
    rng = np.random.default_rng(0)
    arrays = [(rng.integers(0, 256, (8, 8, 3)) // rng.integers(1, 4)).astype(np.uint8) for _ in range(1000)]
    sources = [jpeg_bytes(a) for a in arrays]
    src = save_splits(tmp_path / "src", train=_image_dataset(sources))
    stats = convert(str(src), tmp_path / "out", format="tfrecord", image_codec="jpeg",  # (auto: raw, 8 px)
                    progress=False).split("train").stats
    assert (stats["every"], stats["images"]) == (2, 500)

    def exact(images):
        hist = np.zeros((3, 256), np.int64)
        for b in images:
            px = np.asarray(Image.open(io.BytesIO(b)).convert("RGB"))
            for c in range(3):
                hist[c] += np.bincount(px[..., c].ravel(), minlength=256)
        return stats_from_histograms(hist)
    sampled, everything = exact(sources[::2]), exact(sources)
    assert stats["mean"] == sampled["mean"] and stats["std"] == sampled["std"]
    assert np.allclose(stats["mean"], everything["mean"], atol=0.01) and stats["mean"] != everything["mean"]
    raw = convert(str(src), tmp_path / "raw", format="tfrecord", image_codec="raw", progress=False).split("train").stats
    assert (raw["every"], raw["images"]) == (1, 1000)


@needs_shared
def test_jpeg_that_libjpeg_warns_about_is_stored_reencoded(tmp_path, imagenet_source):
    """A photo with a damaged byte that PIL still opens (libjpeg only warns) would be refused by
    the backends' decoder at training time: it is stored re-encoded from PIL's pixels instead."""
    from fastload.pipelines.jpeg import decode_rgb, jpeg_problem
    photo = _source_bytes(imagenet_source.select(range(1)))[0]
    rng = np.random.default_rng(1)
    scan = photo.find(b"\xff\xda") + 20
    while True:  # a flipped byte that libjpeg warns about and PIL decodes anyway
        damaged = bytearray(photo)
        damaged[int(rng.integers(scan, len(photo) - 10))] ^= 0xFF
        damaged = bytes(damaged)
        if jpeg_problem(damaged) is not None:
            try:
                Image.open(io.BytesIO(damaged)).load()
                break
            except OSError:
                continue
    src = save_splits(tmp_path / "src", train=_image_dataset([photo, damaged]))
    m = convert(str(src), tmp_path / "out", format="beton", progress=False)
    info = m.data["splits"]["train"]
    assert (info["passthrough_jpegs"], info["reencoded"]) == (1, 1)
    r = SplitReader(m, "train")
    assert r.stored(0).tobytes() == photo
    stored = r.stored(1).tobytes()
    reencoded = io.BytesIO()  # PIL's pixels of the damaged photo, saved at the default quality
    Image.open(io.BytesIO(damaged)).save(reencoded, format="JPEG", quality=90, progressive=False, optimize=False)
    assert stored == reencoded.getvalue() and jpeg_problem(stored) is None
    decode_rgb(np.frombuffer(stored, np.uint8), int(r.heights[1]), int(r.widths[1]))  # the ffcv backend's decoder


# --------------------------------------------------------------------------- failures
def test_corrupt_image_stops_with_split_and_index_and_skip_lists_it(tmp_path):
    good = jpeg_bytes(np.full((20, 20, 3), 100, np.uint8))
    ds = _image_dataset([good, good, good[: len(good) // 2], good])
    src = save_splits(tmp_path / "src", train=ds)
    out = tmp_path / "out"
    with pytest.raises(CorruptImageError, match=r"split 'train' index 2: image does not decode.*--skip-corrupt"):
        convert(str(src), out, format="tfrecord", progress=False)
    assert not (out / "manifest.json").exists()
    with pytest.raises(DatasetError, match="did not finish.*resume"):
        Manifest.read(out)
    r = subprocess.run([*FASTLOAD, "convert", str(src), "--format", "beton", "--out", str(tmp_path / "cli")],
                       capture_output=True, text=True)
    assert r.returncode == 2 and "split 'train' index 2" in r.stderr
    m = convert(str(src), tmp_path / "skipped", format="beton", skip_corrupt=True, progress=False)
    assert m.split("train").num_examples == 3
    assert [s["index"] for s in m.split("train").skipped] == [2]
    assert sorted(SplitReader(m, "train").records["source_index"].tolist()) == [0, 1, 3]
    assert verify(tmp_path / "skipped") == []


def test_rerun_with_other_settings_is_refused(tmp_path):
    good = jpeg_bytes(np.full((20, 20, 3), 100, np.uint8))
    src = save_splits(tmp_path / "src", train=_image_dataset([good, good[:40]]))
    with pytest.raises(CorruptImageError):
        convert(str(src), tmp_path / "out", format="tfrecord", progress=False)
    with pytest.raises(ConversionError, match="jpeg_quality=90.*jpeg_quality=80"):
        convert(str(src), tmp_path / "out", format="tfrecord", jpeg_quality=80, progress=False)
    with pytest.raises(ConversionError, match="already holds a complete dataset"):
        convert(str(src), tmp_path / "done", format="tfrecord", skip_corrupt=True, progress=False)
        convert(str(src), tmp_path / "done", format="tfrecord", skip_corrupt=True, progress=False)


@needs_shared
@pytest.mark.parametrize("fmt", ["tfrecord", "beton"])
def test_kill9_midway_then_rerun_resumes(tmp_path, fmt):
    out = tmp_path / "out"
    cmd = [*FASTLOAD, "convert", str(CIFAR10), "--format", fmt, "--out", str(out), "--shard-size", "400",
           "--workers", "1"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    deadline = time.time() + 120
    while time.time() < deadline and len(list((out / ".partial").glob("test-*.json"))) < 3:
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    done_before = sorted(p.name for p in (out / ".partial").glob("test-*.json"))
    assert 3 <= len(done_before) < 25, "the kill must land midway"
    assert not (out / "manifest.json").exists()
    kept = {p: p.stat().st_mtime_ns for p in (out / ".partial").glob("test-*.json")}
    r = subprocess.run(cmd, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert f"resuming: {len(done_before)} of 25 shards already done" in r.stdout
    assert verify(out) == []
    m = Manifest.read(out)
    import datasets
    labels = np.asarray(datasets.load_dataset(str(CIFAR10), split="test")["label"])
    reader = SplitReader(m, "test")  # (written in a seeded random order: the source is sorted by label)
    source_index = np.asarray(reader.records["source_index"])
    assert sorted(source_index.tolist()) == list(range(10000)) and not np.array_equal(source_index, np.arange(10000))
    assert np.array_equal(labels[source_index], reader.labels)
    assert m.data["write_order"] == {"shuffled": True, "seed": 0, "by": "row"}
    assert not (out / ".partial").exists()
    assert kept  # finished shards were not redone: their records were reused (checked by the message)
    # each phase had a bar, and the summary line repeats what the bars showed: the images that
    # phase handled (the resumed ones are not counted again) at the rate the bar ended on
    remaining = 400 * (25 - len(done_before))
    shown = {name: (int(n), float(rate)) for name, n, rate in
             re.findall(r"(convert|write test\.beton): 100%\|[^|]*\| (\d+)/\d+ \[[^,\]]*, ([\d.]+)img/s\]", r.stderr)}
    summary = {name: (int(n), float(rate)) for name, n, rate in
               re.findall(r"; (convert|write test\.beton) (\d+) images in [\d.]+s \((\d+) images/s\)", r.stdout)}
    expected = {"convert": remaining, **({"write test.beton": 10000} if fmt == "beton" else {})}
    assert {k: v[0] for k, v in shown.items()} == expected == {k: v[0] for k, v in summary.items()}, (r.stderr[-500:],
                                                                                                    r.stdout)
    for name, (_, rate) in shown.items():
        assert summary[name][1] == pytest.approx(rate, rel=0.1), (name, rate, r.stdout)


# --------------------------------------------------------------------------- verify
@needs_shared
def test_verify_catches_flipped_byte_in_tfrecord(imagenet_dirs, tmp_path):
    import shutil
    d = tmp_path / "copy"
    shutil.copytree(imagenet_dirs["tfrecord"], d)
    assert verify(d) == []
    shard = sorted(d.glob("*.tfrecord"))[1]
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0x01
    shard.write_bytes(bytes(data))
    problems = verify(d)
    assert any(shard.name in p and "sha256" in p for p in problems), problems
    r = subprocess.run([*FASTLOAD, "verify", str(d)], capture_output=True, text=True)
    assert r.returncode == 1 and shard.name in r.stderr
    # framing check on its own (manifest checksum updated as if the writer had lied)
    from fastload.formats.writing import sha256_file
    m = json.loads((d / "manifest.json").read_text())
    for f in m["splits"]["validation"]["files"]:
        if f["path"] == shard.name:
            f["sha256"] = sha256_file(shard)
    Manifest(d, m).write()  # with the manifest's own checksum, as a writer would
    problems = verify(d)
    assert any("checksum mismatch" in p and shard.name in p for p in problems), problems


@needs_shared
def test_verify_catches_truncated_beton(imagenet_dirs, tmp_path):
    import shutil
    d = tmp_path / "copy"
    shutil.copytree(imagenet_dirs["beton"], d)
    assert verify(d) == []
    beton = d / "validation.beton"
    size = beton.stat().st_size
    with open(beton, "r+b") as f:
        f.truncate(size - 1000)
    problems = verify(d)
    assert any("validation.beton" in p and "truncated" in p for p in problems), problems
    r = subprocess.run([*FASTLOAD, "verify", str(d)], capture_output=True, text=True)
    assert r.returncode == 1 and "truncated" in r.stderr


def test_verify_on_missing_directory(tmp_path):
    assert "does not exist" in verify(tmp_path / "nothing")[0]


def test_image_folder_with_class_subfolders(tmp_path):
    root = tmp_path / "folder"
    for cls, value in (("cat", 60), ("dog", 180)):
        (root / cls).mkdir(parents=True)
        for i in range(3):
            Image.fromarray(np.full((16, 20, 3), value + i, np.uint8)).save(root / cls / f"{i}.png")
    m = convert(str(root), tmp_path / "out", format="tfrecord", progress=False)
    assert m.class_names == ["cat", "dog"] and m.split_names == ["train"]
    r = SplitReader(m, "train")
    assert m.split("train").image_codec == "raw"  # small PNGs: stored as their pixels
    means = [np.asarray(r.image(i)).mean() for i in range(len(r))]
    assert [("cat" if v < 120 else "dog") for v in means] == [m.class_names[int(y)] for y in r.labels]
    assert sorted(r.labels.tolist()) == [0, 0, 0, 1, 1, 1]


def _resident_arrow_bytes(files=None) -> int:
    """Resident bytes of this process's maps of .arrow files (of ``files`` only, when given: other
    tests' datasets may hold pages of their own)."""
    total, arrow = 0, False
    with open("/proc/self/smaps") as f:
        for line in f:
            head = line.split()
            if "-" in head[0] and len(head) >= 5:  # a mapping's header line
                arrow = len(head) >= 6 and head[-1].endswith(".arrow") and (files is None or head[-1] in files)
            elif arrow and head[0] == "Rss:":
                total += int(head[1]) * 1024
    return total


@needs_shared
def test_source_pages_read_by_the_converter_are_released(tmp_path):
    """The converter's memory must not grow with the source: pages of the memory-mapped Arrow
    files it has read are dropped from the process, and reading them again still works."""
    from fastload.converters.jobs import SourcePages
    from fastload.converters.sources import open_source
    data = open_source(str(CIFAR10), ["test"])
    ds = data["test"]
    first = ds[0:2000]["img"]
    _ = ds[2000:10000]["label"], [v for v in ds.with_format("arrow")[:]["img"]]  # touch every page
    files = {f["filename"] for f in ds.cache_files}
    assert _resident_arrow_bytes(files) > 5 * 2**20
    SourcePages(data).release()
    assert _resident_arrow_bytes(files) < 2**20
    again = ds[0:2000]["img"]
    assert [np.asarray(a).tobytes() for a in again] == [np.asarray(a).tobytes() for a in first]


@needs_shared
def test_a_ray_task_opens_an_arrow_source_without_keeping_its_pages(tmp_path):
    """A Ray worker opens a save_to_disk source itself (converters/source_rows.ArrowSource):
    opening maps the Arrow files around every record batch (1.3 M CIFAR images: 0.8 GB resident in
    each worker, its RSS 1.1 GB), so the pages are released as it opens, and after each task."""
    import datasets
    from fastload.converters.jobs import SourcePages
    from fastload.converters.source_rows import ArrowSource
    datasets.load_dataset(str(CIFAR10), split="test").save_to_disk(str(tmp_path / "src"))
    data = {"train": datasets.load_from_disk(str(tmp_path / "src"))}
    files = {f["filename"] for f in data["train"].cache_files}
    SourcePages(data).release()  # the driver's own pages: not the task's
    source = ArrowSource.of(data)
    rows = source.rows("train", "img", 0)
    assert _resident_arrow_bytes(files) < 2**20
    got = [(indices, batch["label"]) for indices, batch in rows.batches(0, 1000)]
    assert _resident_arrow_bytes(files) > 2**20  # a task's rows, read: resident until released
    source.release()
    assert _resident_arrow_bytes(files) < 2**20
    labels = data["train"]["label"]
    assert [labels[i] for indices, _ in got for i in indices] == [y for _, ys in got for y in ys]


def _image_folder_rows(data) -> dict:
    import datasets
    return {s: ([v["path"] for v in ds.cast_column("image", datasets.Image(decode=False))["image"]], ds["label"],
                ds.features["label"].names) for s, ds in data.items()}


def test_image_folder_listing_is_datasets_own(tmp_path):
    """fastload's listing of class folders (image_folder.py) gives the rows, order, labels and
    splits of datasets' imagefolder, and leaves the layouts it does not recognise to datasets."""
    import datasets
    from fastload.converters.image_folder import list_image_folder
    root = tmp_path / "folder"
    img = jpeg_bytes(np.full((8, 8, 3), 100, np.uint8))
    for split in ("train", "val"):
        for cls in ("cat", "cat-x", "dog", "Zebra"):  # '-' sorts before '/': the order is by path
            (root / split / cls).mkdir(parents=True)
            for name in ("b.jpg", "a.JPG", "10.jpeg", "9.png"):
                (root / split / cls / name).write_bytes(img)
            (root / split / cls / "notes.txt").write_text("not an image")
            (root / split / cls / ".hidden.jpg").write_bytes(img)
    listed = list_image_folder(root)
    assert listed is not None and set(listed) == {"train", "validation"}
    assert _image_folder_rows(listed) == _image_folder_rows(datasets.load_dataset(str(root)))
    # a split keyword in a file name makes datasets split by name: left to it
    (root / "train" / "dog" / "test_1.jpg").write_bytes(img)
    assert list_image_folder(root) is None
    m = convert(str(root), tmp_path / "out", format="tfrecord", progress=False)
    assert sorted(m.split_names) == sorted(datasets.load_dataset(str(root)))


@needs_shared
def test_auto_stores_small_jpegs_as_the_pixels_every_backend_decodes(tmp_path):
    """An image-folder copy of CIFAR (32 px JPEG files): 'auto' stores the pixels raw, and they are
    what the backends' own decoder (and PIL) make of each JPEG: nothing lost, nothing to decode."""
    import datasets
    from fastload.pipelines.jpeg import decode_rgb
    ds = datasets.load_dataset(str(CIFAR10), split="test").select(range(0, 10000, 167))  # all classes (sorted)
    raw = ds.cast_column("img", datasets.Image(decode=False))
    root = tmp_path / "folder"
    names = ds.features["label"].names
    jpegs = {}
    for i, row in enumerate(raw):
        (root / names[row["label"]]).mkdir(parents=True, exist_ok=True)
        path = root / names[row["label"]] / f"{i:03d}.jpg"
        path.write_bytes(row["img"]["bytes"])
        jpegs[str(path)] = row["img"]["bytes"]
    m = convert(str(root), tmp_path / "out", format="tfrecord", progress=False)
    assert m.split("train").image_codec == "raw"
    r = SplitReader(m, "train")
    src = datasets.load_dataset(str(root), split="train").cast_column("image", datasets.Image(decode=False))
    for i in range(len(r)):
        jpeg = jpegs[src[int(r.records["source_index"][i])]["image"]["path"]]
        pixels = np.asarray(r.image(i))
        assert np.array_equal(pixels, decode_rgb(np.frombuffer(jpeg, np.uint8), 32, 32))
        assert np.array_equal(pixels, np.asarray(Image.open(io.BytesIO(jpeg)).convert("RGB")))


def test_small_jpegs_stored_raw_are_what_datasets_shows(tmp_path):
    """Stored raw, every small JPEG is the image datasets shows the user: a plain baseline RGB one
    through the backends' decoder, a rotated (EXIF), CMYK, grayscale or progressive one through PIL
    (EXIF applied); a truncated one is refused by name."""
    from PIL import ImageOps
    rng = np.random.default_rng(1)
    rgb = rng.integers(0, 256, (24, 40, 3), dtype=np.uint8)
    exif = Image.Exif()
    exif[0x0112] = 6
    rotated, cmyk = io.BytesIO(), io.BytesIO()
    Image.fromarray(rgb).save(rotated, "JPEG", exif=exif.tobytes())
    Image.fromarray(rgb).convert("CMYK").save(cmyk, "JPEG")
    sources = [jpeg_bytes(rgb), rotated.getvalue(), cmyk.getvalue(), jpeg_bytes(rgb[..., 0]),
               jpeg_bytes(rgb, progressive=True)]
    src = save_splits(tmp_path / "src", train=_image_dataset(sources))
    m = convert(str(src), tmp_path / "out", format="tfrecord", progress=False, shuffle_seed=None)
    assert m.split("train").image_codec == "raw"
    r = SplitReader(m, "train")
    for i, b in enumerate(sources):
        shown = np.asarray(ImageOps.exif_transpose(Image.open(io.BytesIO(b))).convert("RGB"))
        assert np.array_equal(np.asarray(r.image(i)), shown), i
    bad = save_splits(tmp_path / "bad", train=_image_dataset([sources[0], sources[0][:len(sources[0]) // 2]]))
    with pytest.raises(CorruptImageError, match="index 1"):
        convert(str(bad), tmp_path / "bad-out", format="tfrecord", progress=False, shuffle_seed=None)


_PREPARE = """
import os, sys, threading, time
import datasets  # imported before the baseline: the preparation's own memory is measured
from fastload.converters import sources
def rss():  # anonymous pages only: the Arrow files datasets maps are the page cache's
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) << 10 for l in f if l.startswith("RssAnon:"))
before, peak, done = rss(), [0], threading.Event()
def sample():
    while not done.is_set():
        peak[0] = max(peak[0], rss())
        time.sleep(0.002)
t = threading.Thread(target=sample)
t.start()
if sys.argv[2] == "plain":
    datasets.load_dataset(sys.argv[1])
else:
    sources._load_dataset(sys.argv[1], None)
done.set()
t.join()
print((peak[0] - before) >> 20)
"""


@pytest.mark.slow
@pytest.mark.serial  # memory to tens of MB: alone (a neighbour's load shifted it by 80 MB)
def test_a_parquet_source_is_prepared_one_row_group_at_a_time(tmp_path):
    """#34: datasets prepares parquet through pyarrow with pre-buffering, which holds all of a
    file's row groups at once (1.3 M CIFAR images: 895 MB). A file of 8 row groups of 20 MB,
    prepared in a fresh process as convert prepares it and as plain load_dataset does: the rise of
    anonymous memory is lower by more than a third of the file's size (here 216-228 against
    336-358 MB; with pre-buffering on, 336 against 336)."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    rng = np.random.default_rng(0)
    rows = [rng.bytes(20 << 10) for _ in range(8192)]  # 20 KB a row, 1,024 rows (20 MB) a row group
    table = pa.table({"image": [{"bytes": b, "path": None} for b in rows], "label": list(range(len(rows)))})
    (tmp_path / "src").mkdir()
    pq.write_table(table, tmp_path / "src" / "train-00000-of-00001.parquet", row_group_size=1024)
    size_mb = (tmp_path / "src" / "train-00000-of-00001.parquet").stat().st_size >> 20

    def peak(how: str) -> int:
        env = {**os.environ, "HF_DATASETS_CACHE": str(tmp_path / f"hf-{how}")}
        r = subprocess.run([sys.executable, "-c", _PREPARE, str(tmp_path / "src"), how], capture_output=True,
                           text=True, env=env, timeout=120)
        assert r.returncode == 0, r.stderr[-2000:]
        return int(r.stdout.split()[-1])
    ours, plain = peak("fastload"), peak("plain")
    # both keep some row groups' worth in pyarrow's pool; pre-buffering holds the file's 8 at once
    assert plain - ours > 0.35 * size_mb, (ours, plain, size_mb)
