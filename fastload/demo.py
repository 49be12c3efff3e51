"""``fastload demo`` / ``make demo``: the main job end to end on a small sample.

Convert the sample to both formats, verify them, load each through FastLoader on its
backend (and the reference), and print a throughput table.
"""
from __future__ import annotations

import time
from pathlib import Path

SAMPLE = Path(__file__).parent / "sample" / "imagenet-sample"


def _throughput(path: str, backend: str, workers: int, epochs: int = 3) -> dict:
    from .bench import timed_epochs
    from .loader import FastLoader
    t0 = time.perf_counter()
    loader = FastLoader(path, "validation", batch_size=16, spec="imagenet:train", backend=backend,
                        num_workers=workers, drop_last=False)
    images = next(iter(loader))[0]  # first batch: includes loading cached kernels
    first = time.perf_counter() - t0
    timed_epochs(lambda: iter(loader))  # rest of the warm-up
    dt, n = timed_epochs(lambda: iter(loader), epochs)
    rate = n / dt
    return {"backend": backend, "first_batch_s": first, "images_per_s": rate,
            "batch": tuple(images.shape), "dtype": str(images.dtype).replace("torch.", "")}


def run_demo(source=None, out="demo-out", workers: int = 2) -> list[dict]:
    from .converters.convert import convert
    from .verification import verify
    source = str(source or SAMPLE)
    out = Path(out)
    rows = []
    print(f"fastload demo: source {source}")
    from .pipelines.errors import BackendUnavailable
    from .pipelines.registry import backend_names, entry
    backends = []
    for backend in backend_names():
        try:
            entry(backend).load()  # once, outside the timings (torch + numba + DALI take seconds to import)
            backends.append(backend)
        except BackendUnavailable as e:
            print(f"  skipping backend={backend!r}: {e}")
    for fmt in ("beton", "tfrecord"):
        t0 = time.perf_counter()
        m = convert(source, out / fmt, format=fmt, workers=workers, overwrite=True, progress=False)
        dt = time.perf_counter() - t0
        n = sum(m.split(s).num_examples for s in m.split_names)
        problems = verify(out / fmt)
        print(f"  converted {n} images to {fmt:<8} in {dt:5.1f}s; verify: {'OK' if not problems else problems}")
    print("  (a sample this small measures start-up, not conversion speed: see scripts/bench_convert.py)")
    for backend in backends:
        try:
            rows.append(_throughput(str(out / entry(backend).storages[0]), backend, workers))
        except BackendUnavailable as e:  # a requirement its engine checks as it starts (DALI's CPU engine)
            print(f"  skipping backend={backend!r}: {e}")
    print(f"\n  train spec (RandomResizedCrop 224 + flip + normalize), batch 16, {workers} workers")
    print(f"  {'backend':<10} {'images/s':>9} {'first batch s':>14}  batch shape")
    for r in rows:
        print(f"  {r['backend']:<10} {r['images_per_s']:>9.0f} {r['first_batch_s']:>14.1f}  {r['batch']} {r['dtype']}")
    return rows
