"""What a new user does after ``pip install fastload``, run by tests/test_wheel.py with the Python
of the install under test (a fresh venv from the wheel, or the development install): convert the
bundled sample to both formats (``fastload demo``, which also verifies and reads them, and
``fastload convert``), ``fastload verify``, then read an epoch through every backend. Writes a JSON report: where fastload and its C library came from, which
libjpeg the process mapped, each command's exit status and last line, and a digest of every
backend's batches (or its one-line error where it cannot run here).

    python tests/wheel_job.py OUT_DIR REPORT.json [--batches-only]

(``--batches-only``: convert with the API and read; the development install's reference run.)
"""
from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

out, report, batches_only = Path(sys.argv[1]), Path(sys.argv[2]), "--batches-only" in sys.argv
result: dict = {}

import fastload  # noqa: E402  (the install under test)
from fastload.demo import SAMPLE  # noqa: E402
from fastload.pipelines import native  # noqa: E402

result["fastload"] = fastload.__file__
result["native"] = native.LIBRARY_PATH if native.LIB is not None else None
result["native_problem"] = native.PROBLEM
result["libjpeg"] = sorted({line.split()[-1] for line in open("/proc/self/maps") if "libjpeg" in line})

cli = Path(sys.executable).parent / "fastload"


def run(name: str, *args: str) -> None:
    p = subprocess.run([str(cli), *args], capture_output=True, text=True)
    said = [line for line in p.stdout.splitlines() if line.strip()]
    result[name] = {"rc": p.returncode, "last": said[-1] if said else "", "output": (said + p.stderr.splitlines())[-12:]}


if batches_only:
    for fmt in ("beton", "tfrecord"):
        fastload.convert(str(SAMPLE), out / fmt, format=fmt, progress=False)
else:
    run("demo", "demo", "--out", str(out))  # writes out/beton and out/tfrecord
    run("convert", "convert", str(SAMPLE), "--format", "beton", "--out", str(out / "beton"), "--overwrite")
    run("verify", "verify", str(out / "tfrecord"))

batches = {}
for backend, fmt in (("ffcv", "beton"), ("reference", "beton"), ("dali", "tfrecord")):
    try:
        loader = fastload.FastLoader(str(out / fmt), "validation", batch_size=8, spec="imagenet:train",
                                     backend=backend, num_workers=2, seed=3)
        digest, n = hashlib.sha256(), 0
        for images, labels in loader:
            digest.update(images.numpy().tobytes())
            digest.update(labels.numpy().tobytes())
            n += len(labels)
        batches[f"{backend}/{fmt}"] = {"sha256": digest.hexdigest(), "images": n}
    except fastload.BackendUnavailable as e:
        batches[f"{backend}/{fmt}"] = {"error": str(e)}
result["batches"] = batches
report.write_text(json.dumps(result, indent=1))
