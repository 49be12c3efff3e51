"""What a newcomer meets first (#36, in part): one-line errors that name the problem and the
remedy in the words of the interface used, presets resolved one way everywhere, evaluation in
order by default, and a verify that says what it checked."""
from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from conftest import jpeg_bytes, save_splits
from fastload import FastLoader, PreprocessSpec, convert
from fastload.formats.errors import DatasetError
from fastload.spec import resolve_spec

FASTLOAD = [sys.executable, "-m", "fastload.cli"]


def one_line_error(r: subprocess.CompletedProcess, *needles: str) -> str:
    lines = [ln for ln in r.stderr.splitlines() if ln.strip() and "%|" not in ln]
    assert r.returncode == 2 and "Traceback" not in r.stderr, (r.returncode, r.stderr[-2000:])
    assert len(lines) == 1 and lines[0].startswith("error: "), lines
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


def test_presets_resolve_the_same_way_everywhere():
    for name in ("imagenet:eval", "imagenet:train", "cifar10:eval"):
        base, variant = name.split(":")
        assert PreprocessSpec.preset(name) == resolve_spec(name, "imagenet", train=True)
        assert PreprocessSpec.preset(name) == PreprocessSpec.preset(base, train=variant == "train")
    with pytest.raises(ValueError, match=r"spec='imagenet:test' is invalid"):
        PreprocessSpec.preset("imagenet:test")
    with pytest.raises(ValueError, match=r"preset='imagenot' is unknown: allowed \['cifar10', 'cifar100', 'coco'"):
        PreprocessSpec.preset("imagenot:eval")


def test_evaluation_splits_load_in_order_unless_asked(labelled_colors, imagenet_dirs):
    val = FastLoader(imagenet_dirs["beton"], "validation", batch_size=32, num_workers=1)
    assert val.order == "sequential" and not val.shuffle and not val.drop_last
    assert np.array_equal(val.epoch_plan(0)[0], np.arange(200)) and np.array_equal(val.epoch_plan(1)[0], np.arange(200))
    asked = FastLoader(imagenet_dirs["beton"], "validation", batch_size=32, num_workers=1, order="random")
    assert asked.shuffle and not np.array_equal(asked.epoch_plan(0)[0], np.arange(200))
    train = FastLoader(labelled_colors["beton"], "train", batch_size=32, num_workers=1)
    assert train.order == "random" and train.shuffle


def test_bad_loader_values_are_one_line_that_names_them(imagenet_dirs):
    with pytest.raises(ValueError, match=r"^device='tpu' is invalid: allowed 'cpu', 'cuda', 'cuda:N' or 'auto'$"):
        FastLoader(imagenet_dirs["beton"], "validation", device="tpu")
    with pytest.raises(ValueError, match=r"classes \[5000\] are not class ids of .*: allowed 0\.\.999$"):
        FastLoader(imagenet_dirs["beton"], "validation", classes=[5000])


def test_cli_errors_speak_the_cli(imagenet_dirs, tmp_path):
    r = subprocess.run([*FASTLOAD, "inspect", str(imagenet_dirs["beton"]), "--split", "validation", "--out",
                        str(tmp_path / "missing" / "dir" / "g.png")], capture_output=True, text=True)
    one_line_error(r, "missing/dir does not exist", "--out")
    a_file = tmp_path / "a-file"
    a_file.write_text("x")
    src = save_splits(tmp_path / "src", train=_tiny())
    r = subprocess.run([*FASTLOAD, "convert", str(src), "--format", "tfrecord", "--out", str(a_file)],
                       capture_output=True, text=True)
    one_line_error(r, f"{a_file} is a file, not a directory: give --out a directory")
    r = subprocess.run([*FASTLOAD, "convert", str(src), "--format", "beton", "--out", str(imagenet_dirs["beton"])],
                       capture_output=True, text=True)
    line = one_line_error(r, "already holds a complete dataset", "add --overwrite to replace it")
    assert "overwrite=True" not in line
    from fastload.converters.jobs import ConversionError
    with pytest.raises(ConversionError, match=r"pass overwrite=True to replace it$"):  # and Python's words in Python
        convert(str(src), imagenet_dirs["beton"], progress=False)


def _tiny(n: int = 4):
    import datasets
    feats = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=["a", "b"])})
    images = [{"bytes": jpeg_bytes(np.full((16, 16, 3), 40 * i, np.uint8)), "path": None} for i in range(n)]
    images[1] = {"bytes": b"this is not an image", "path": None}
    return datasets.Dataset.from_dict({"image": images, "label": [i % 2 for i in range(n)]}, features=feats)


def test_a_skipped_images_reason_is_the_same_words_every_run(tmp_path):
    src = save_splits(tmp_path / "src", train=_tiny())
    m = convert(str(src), tmp_path / "out", skip_corrupt=True, progress=False, workers=1)
    (skipped,) = m.split("train").skipped
    assert skipped["index"] == 1 and "cannot identify image file" in skipped["error"], skipped
    assert " at 0x" not in skipped["error"], skipped  # no memory address


def test_verify_says_what_it_checked(imagenet_dirs):
    r = subprocess.run([*FASTLOAD, "verify", str(imagenet_dirs["tfrecord"]), "--no-decode"], capture_output=True,
                       text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    line = r.stdout.strip().splitlines()[-1]
    assert line.startswith(f"OK {imagenet_dirs['tfrecord']}: 1 split(s), 200 samples, 15 files, "), line
    assert "each file's sha256" in line and "TFRecord framing and CRCs" in line and "CRC32C and JPEG header" in line
    assert "(no decode: --no-decode)" in line


def test_a_remote_datasets_errors_name_its_url_not_the_cache(imagenet_dirs, tmp_path):
    from fastload.testing.memory_store import memory_store
    with memory_store() as mem:
        url = mem.upload(imagenet_dirs["tfrecord"], "t")
        with pytest.raises(DatasetError, match=rf"split 'train' is not in {url}: it has \['validation'\]"):
            FastLoader(url, "train", cache_dir=tmp_path / "cache")
