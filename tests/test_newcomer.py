"""What a newcomer meets first (#36, in part): one-line errors that name the problem and the
remedy in the words of the interface used, presets resolved one way everywhere, evaluation in
order by default, and a verify that says what it checked."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import ROOT, jpeg_bytes, save_splits
from fastload import FastLoader, PreprocessSpec, convert
from fastload.formats.errors import DatasetError
from fastload.spec import resolve_spec

FASTLOAD = [sys.executable, "-m", "fastload.cli"]


def one_line_error(r, *needles: str) -> str:
    """The one `error: ...` line of a CLI run (a CompletedProcess, or click's in-process Result)."""
    code = r.returncode if isinstance(r, subprocess.CompletedProcess) else r.exit_code
    lines = [ln for ln in r.stderr.splitlines() if ln.strip() and "%|" not in ln]
    assert code == 2 and "Traceback" not in r.stderr, (code, r.stderr[-2000:])
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


def test_a_backend_whose_extra_is_missing_says_which_in_one_line(imagenet_dirs):
    """A backend whose module needs an extra that is not installed (DALI imports nvidia.dali only
    as its pipeline starts) fails as it is chosen, in one line naming the extra. (The C helpers
    missing: tests/test_wheel.py.)"""
    from fastload import BackendUnavailable
    from fastload.pipelines import registry
    registry.register_backend("needs-extra", ("tfrecord",), "fastload.pipelines.dali:dali_backend",
                              requires=("nvidia.no_such_module",), extra="dali")
    try:
        with pytest.raises(BackendUnavailable, match=r"^backend='needs-extra' needs nvidia.no_such_module, which is "
                                                     r"not installed: pip install 'fastload\[dali\]'$"):
            FastLoader(imagenet_dirs["tfrecord"], "validation", batch_size=8, backend="needs-extra")
    finally:
        registry._REGISTRY.pop("needs-extra")


def test_a_gcs_store_that_cannot_be_reached_is_one_line_within_the_store_timeout(monkeypatch):
    """gcsfs retried each request 6 times with backoff up to 32 s under fastload's own retries,
    printing a traceback each time: minutes of them. Now one line, within FASTLOAD_STORE_TIMEOUT
    (fastload's own backoff shortened here; its 6 tries still run, against a closed port)."""
    import time
    from click.testing import CliRunner
    from fastload.cli import main
    from fastload.storage import location
    from fastload.testing.store_proxy import free_port
    pytest.importorskip("gcsfs")
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", f"http://127.0.0.1:{free_port()}")  # nothing listens there
    monkeypatch.setattr(location, "BACKOFF_S", 0.01)
    t0 = time.monotonic()
    r = CliRunner().invoke(main, ["verify", "gs://fastload-no-such-bucket/ds"], prog_name="fastload")
    assert time.monotonic() - t0 < location.TIMEOUT_S
    lines = [ln for ln in r.stderr.splitlines() if ln.strip() and "%|" not in ln]
    assert r.exit_code == 1 and "Traceback" not in r.stderr and len(lines) == 1, r.stderr[-3000:]
    assert lines[0].startswith("FAIL gs://fastload-no-such-bucket/ds/manifest.json: the store cannot be reached")
    assert "6 tries" in lines[0] and "check the network" in lines[0]


# --------------------------------------------------------------------------- the sweep
LOADER_ERRORS = [  # (argument, a bad value, what the one line must say)
    ("batch_size", 0, "batch_size=0 is invalid: allowed an int >= 1"),
    ("num_workers", -1, "num_workers=-1 is invalid"),
    ("seed", "x", "seed='x' is invalid"),
    ("order", "foo", "order='foo' is invalid: allowed 'auto'"),
    ("repeated_augmentation", 0, "repeated_augmentation=0 is invalid"),
    ("batch_transform", 3, "batch_transform=3 is invalid: allowed a callable"),
    ("backend", "x", "backend='x' is invalid: allowed 'auto' or one of"),
    ("epochs", 0, "epochs=0 is invalid"),
    ("check_samples", "yes", "check_samples='yes' is invalid: allowed True or False"),
    ("drop_last", "x", "drop_last='x' is invalid: allowed True, False, or None"),
    ("device", "tpu", "device='tpu' is invalid: allowed 'cpu', 'cuda'"),
    ("distributed", "x", "distributed='x' is invalid"),
    ("indices", [1000], "indices [1000] are outside split 'validation': allowed 0.."),
    ("classes", [5000], "classes [5000] are not class ids"),
    ("columns", ("nope",), "columns=['nope'] is invalid"),
    ("spec", "nosuch", "preset='nosuch' is unknown: allowed"),
    ("cache_limit", -1, "cache_limit=-1 is invalid"),
    ("max_pixels", 0, "max_pixels=0 is invalid"),
    ("cache_dir", 3, "cache_dir=3 is invalid"),
    ("split", "nosuch", "split 'nosuch' is not in"),
]


@pytest.mark.parametrize("argument,value,says", LOADER_ERRORS, ids=[a for a, _, _ in LOADER_ERRORS])
def test_every_bad_loader_argument_is_one_line_naming_what_is_allowed(imagenet_dirs, argument, value, says):
    with pytest.raises((ValueError, TypeError, DatasetError)) as e:
        FastLoader(imagenet_dirs["beton"], **{"split": "validation", argument: value})
    assert says in str(e.value) and "\n" not in str(e.value), str(e.value)


def test_every_cli_command_says_a_user_error_in_one_line(imagenet_dirs, tmp_path, monkeypatch):
    """The sweep over the CLI's commands: click's own usage errors too (they were three lines: a
    usage, a hint, the error), through the real entry point in this process."""
    from click.testing import CliRunner
    from fastload.cli import main
    beton, sample = str(imagenet_dirs["beton"]), "fastload/sample/imagenet-sample"
    cases = [
        (["convert", sample, "--format", "nope", "--out", "x"], "Invalid value for '--format'"),
        (["convert", sample, "--format", "beton", "--out", "x", "--workers", "0"], "'--workers': 0 is not in"),
        (["convert", sample, "--format", "beton", "--out", "x", "--keep-order", "--shuffle-seed", "3"],
         "--keep-order and --shuffle-seed contradict each other: give one"),
        (["convert"], "Missing argument 'SOURCE'. (see fastload convert --help)"),
        (["nosuchcmd"], "No such command 'nosuchcmd'"),
        (["convert", "/nonexistent", "--format", "beton", "--out", "x"], "could not be opened"),
        (["convert", sample, "--format", "beton", "--out", beton], "add --overwrite to replace it"),
        (["convert", sample, "--format", "beton", "--out", "x", "--split", "nosuch"], "not all in source"),
        (["inspect", beton, "--split", "nosuch", "--out", "g.png"], "split 'nosuch' is not in"),
        (["inspect", beton, "--split", "validation", "--spec", "nosuch", "--out", "g.png"], "preset='nosuch'"),
        (["inspect", beton, "--split", "validation", "--backend", "dali", "--out", "g.png"], "needs a TFRecord"),
        (["bench", beton, "--split", "validation", "--device", "tpu"], "device='tpu' is invalid"),
        (["bench", "/nonexistent"], "does not exist"),
        (["demo", "--source", "/nonexistent", "--out", str(tmp_path / "d")], "could not be opened"),
    ]
    (tmp_path / "fastload" / "sample").mkdir(parents=True)
    (tmp_path / sample).symlink_to(ROOT / sample)
    monkeypatch.chdir(tmp_path)
    runner = CliRunner()
    for args, says in cases:
        one_line_error(runner.invoke(main, args, prog_name="fastload"), says)
