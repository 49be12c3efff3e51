"""Raw pixel storage (format version 2): CIFAR as the hub stores it (PNG) converts losslessly,
every backend reads it with no decode and hands back the source pixels exactly, stock ffcv and
stock DALI read the files, and version 1 directories still load."""
from __future__ import annotations

import io
import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import BACKEND_FORMAT, CIFAR10, MEAN255, STD255, color_label, needs_shared, save_splits, stock_ffcv
from fastload import FastLoader, Manifest, PreprocessSpec, convert
from fastload.formats.manifest import FORMAT_VERSION, DatasetError
from fastload.formats.writing import sha256_file
from fastload.formats.records import SplitReader

N = 400


@pytest.fixture(scope="module")
def png_cifar(tmp_path_factory):
    """400 real CIFAR-10 images re-saved as PNG (the hub's form), converted with the default codec."""
    if not CIFAR10.exists():
        pytest.skip("../shared/data is absent (outside CI)")
    import datasets
    ds = datasets.load_dataset(str(CIFAR10), split="test").select(range(N))
    pixels = [np.asarray(im.convert("RGB")) for im in ds["img"]]
    pngs = []
    for p in pixels:
        buf = io.BytesIO()
        Image.fromarray(p).save(buf, format="PNG")
        pngs.append({"bytes": buf.getvalue(), "path": None})
    feats = datasets.Features({"img": datasets.Image(), "label": ds.features["label"]})
    root = tmp_path_factory.mktemp("pngcifar")
    src = save_splits(root / "source", train=datasets.Dataset.from_dict({"img": pngs, "label": ds["label"]},
                                                                        features=feats))
    out = {"pixels": pixels, "labels": np.array(ds["label"]), "source": src}
    for fmt in ("beton", "tfrecord"):
        out[fmt] = root / fmt
        convert(str(src), out[fmt], format=fmt, workers=2, progress=False, shuffle_seed=None)
    return out


@needs_shared
def test_png_cifar_is_stored_raw_and_read_back_exactly(png_cifar):
    spec = PreprocessSpec.preset("cifar10", train=False).replace(dtype="uint8", layout="channels_last")
    for backend, fmt in BACKEND_FORMAT.items():
        m = Manifest.read(png_cifar[fmt])
        info = m.split("train")
        assert m.data["format_version"] == FORMAT_VERSION and info.image_codec == "raw"
        assert m.data["splits"]["train"]["image_feature"] == "image/raw"
        loader = FastLoader(png_cifar[fmt], "train", batch_size=64, spec=spec, backend=backend, num_workers=2,
                            order="sequential", drop_last=False, columns="index")
        seen = 0
        for b in loader:
            for x, y, i in zip(b.images, b.labels, b.index):
                assert np.array_equal(x.permute(1, 2, 0).numpy(), png_cifar["pixels"][int(i)]), (backend, int(i))
                assert int(y) == png_cifar["labels"][int(i)]
                seen += 1
        assert seen == N


@needs_shared
def test_train_crops_are_the_same_pixels_in_every_backend(png_cifar):
    """RandomCrop + flip moves pixels without resampling: on raw storage all backends agree exactly."""
    spec = PreprocessSpec.preset("cifar10", train=True).replace(dtype="uint8")
    out = {b: torch.cat([x for x, _ in FastLoader(png_cifar[f], "train", batch_size=100, spec=spec, backend=b,
                                                   num_workers=2, seed=3, drop_last=False)])
           for b, f in BACKEND_FORMAT.items()}
    assert out["ffcv"].shape == (N, 3, 32, 32)
    assert torch.equal(out["ffcv"], out["reference"]) and torch.equal(out["dali"], out["reference"])


@needs_shared
def test_stock_ffcv_and_stock_dali_read_raw_storage(png_cifar):
    stock_ffcv()
    from ffcv.fields.decoders import IntDecoder, SimpleRGBImageDecoder
    from ffcv.loader import Loader, OrderOption
    loader = Loader(str(png_cifar["beton"] / "train.beton"), batch_size=100, num_workers=1,
                    order=OrderOption.SEQUENTIAL,
                    pipelines={"image": [SimpleRGBImageDecoder()], "label": [IntDecoder()]})
    images = np.concatenate([np.array(x) for x, _ in loader])
    assert all(np.array_equal(images[i], png_cifar["pixels"][i]) for i in range(N))

    from nvidia.dali import fn, pipeline_def
    import nvidia.dali.tfrecord as tfrec
    info = Manifest.read(png_cifar["tfrecord"]).split("train")
    shards = [png_cifar["tfrecord"] / f["path"] for f in info.files_with_role("data")]
    idx = {f["for"]: png_cifar["tfrecord"] / f["path"] for f in info.files_with_role("dali_index")}

    @pipeline_def(batch_size=N, num_threads=1, device_id=None)
    def graph():
        f = fn.readers.tfrecord(path=[str(s) for s in shards], index_path=[str(idx[s.name]) for s in shards],
                                features={"image/raw": tfrec.FixedLenFeature((), tfrec.string, ""),
                                          "image/height": tfrec.FixedLenFeature([1], tfrec.int64, 0),
                                          "image/width": tfrec.FixedLenFeature([1], tfrec.int64, 0)},
                                random_shuffle=False)
        return f["image/raw"], f["image/height"], f["image/width"]

    pipe = graph()
    pipe.build()
    raw, h, w = pipe.run()
    for i in range(N):
        shape = (int(np.array(h[i])[0]), int(np.array(w[i])[0]), 3)
        assert np.array_equal(np.array(raw[i]).reshape(shape), png_cifar["pixels"][i])


@needs_shared
def test_codec_choice_and_jpeg_override(png_cifar, imagenet_dirs, tmp_path):
    jpeg = convert(str(png_cifar["source"]), tmp_path / "jpeg", format="tfrecord", progress=False, shuffle_seed=None,
                   image_codec="jpeg")
    assert jpeg.split("train").image_codec == "jpeg"  # the old, lossy storage on request
    assert Manifest.read(imagenet_dirs["tfrecord"]).split("validation").image_codec == "jpeg"  # photos: JPEG
    with pytest.raises(ValueError, match="image_codec='png' is invalid: allowed"):
        convert(str(png_cifar["source"]), tmp_path / "x", image_codec="png", progress=False, shuffle_seed=None)


def test_raw_storage_of_larger_images_resamples_like_the_reference(labelled_colors, tmp_path):
    """``image_codec='raw'`` on 40..120 px photos-to-be: RandomResizedCrop from raw pixels in each
    backend, labels still paired with their colours."""
    import datasets
    src = tmp_path / "src"
    ds = datasets.load_from_disk(str(labelled_colors["tfrecord"].parent / "source"))
    save_splits(src, train=ds["train"])
    for fmt, backend in (("beton", "ffcv"), ("tfrecord", "dali"), ("tfrecord", "reference")):
        out = tmp_path / fmt
        if not (out / "manifest.json").exists():
            convert(str(src), out, format=fmt, progress=False, shuffle_seed=None, image_codec="raw", preset="imagenet")
        loader = FastLoader(out, "train", batch_size=40, backend=backend, spec="imagenet:train", num_workers=1,
                            drop_last=False)
        x, y = next(iter(loader))
        levels = x * STD255 + \
            MEAN255
        assert [color_label(m) for m in levels.mean(dim=(2, 3)).tolist()] == y.tolist()


def test_version_1_directories_still_load(labelled_colors, tmp_path):
    old = tmp_path / "v1"
    shutil.copytree(labelled_colors["tfrecord"], old)
    path = old / "manifest.json"
    data = json.loads(path.read_text())
    data["format_version"] = 1
    for split in data["splits"].values():
        split.pop("image_codec", None)
        split.pop("image_feature", None)
        for f in split["files"]:
            if f["role"] == "records":  # version 1 had no per-sample checksums
                records = np.load(old / f["path"])
                fields = [n for n in records.dtype.names if n != "crc32c"]
                np.save(old / f["path"], np.ascontiguousarray(records[fields]).astype(
                    np.dtype([(n, records.dtype[n]) for n in fields])))
                f["size"], f["sha256"] = (old / f["path"]).stat().st_size, sha256_file(old / f["path"])
    path.write_text(json.dumps(data))
    x, y = next(iter(FastLoader(old, "train", batch_size=8, backend="dali", num_workers=1)))
    assert x.shape == (8, 3, 224, 224) and Manifest.read(old).split("train").image_codec == "jpeg"
    data["format_version"] = 99
    path.write_text(json.dumps(data))
    with pytest.raises(DatasetError, match=r"format_version=99; this fastload reads versions \[1, 2, 3, 4\]"):
        FastLoader(old, "train")


@needs_shared
def test_a_raw_record_of_the_wrong_size_is_refused_at_open(png_cifar, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(png_cifar["tfrecord"], broken)
    rec_path = broken / "train.records.npy"
    rec = np.load(rec_path)
    rec["size"][7] -= 3  # a record that is not height x width x 3 bytes
    np.save(rec_path, rec)
    with pytest.raises(DatasetError, match=r"stores raw pixels, but sample\(s\) \[7\] are not height x width x 3"):
        SplitReader(Manifest.read(broken), "train")
