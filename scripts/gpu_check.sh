#!/usr/bin/env bash
# DALI's GPU path (nvJPEG, device='mixed') and FastLoader on CUDA, with images/s. For a machine
# with an NVIDIA GPU and a CUDA torch; run from the repo root after `FASTLOAD_TORCH=keep make setup`.
#   scripts/gpu_check.sh [DATA]   (default ../shared/data/imagenet-1k-sample)
set -euo pipefail
cd "$(dirname "$0")/.."
data=${1:-../shared/data/imagenet-1k-sample}
PY=${PY:-.venv/bin/python}
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true
"$PY" - "$data" <<'PY'
import sys, time, torch
from fastload import FastLoader, convert
assert torch.cuda.is_available(), "CUDA is not available to torch"
out = ".cache/gpu_check/tfrecord"
import pathlib
if not (pathlib.Path(out) / "manifest.json").exists():
    convert(sys.argv[1], out, format="tfrecord", workers=4, progress=False)
for spec in ("imagenet:train", "imagenet:eval"):
    for device in ("cuda", "cpu"):
        loader = FastLoader(out, "validation", batch_size=64, spec=spec, backend="dali", device=device,
                            num_workers=4, drop_last=False)
        for _ in loader: pass
        torch.cuda.synchronize()
        t0, n = time.perf_counter(), 0
        for _ in range(5):
            for x, y in loader:
                n += x.shape[0]
        torch.cuda.synchronize()
        print(f"{spec:<15} device={device:<5} decode={loader.pipeline.decode_device:<5} "
              f"{n / (time.perf_counter() - t0):8.0f} img/s  batch {tuple(x.shape)} on {x.device}", flush=True)
ref = FastLoader(out, "validation", batch_size=64, spec="imagenet:eval", backend="reference", device="cuda",
                 num_workers=4, order="sequential", drop_last=False)
gpu = FastLoader(out, "validation", batch_size=64, spec="imagenet:eval", backend="dali", device="cuda",
                 num_workers=4, order="sequential", drop_last=False)
from fastload.spec import IMAGENET_STD
std = torch.tensor(IMAGENET_STD, device="cuda").view(1, 3, 1, 1) * 255
d = torch.cat([((a - b) * std).abs().mean(dim=(1, 2, 3)) for (a, _), (b, _) in zip(gpu, ref)])
print(f"nvJPEG eval vs reference: mean abs {d.mean():.2f}, worst image {d.max():.2f} (0..255 levels)")
PY
# Many short epochs of DALI on the GPU (nvJPEG): resident memory and threads after the first 40 of 120
# (tests/test_faults.py holds the CPU backends to 6 MB; measured there: 0.2-0.6 MB)
"$PY" tests/flat_memory_worker.py .cache/gpu_check/tfrecord dali 120 cuda | tail -1 | "$PY" -c '
import json, sys
r = json.load(sys.stdin); rss, threads = r["rss"][40:], r["threads"][40:]
print(f"dali cuda, 80 short epochs: RSS {min(rss):.1f}..{max(rss):.1f} MB (range {max(rss) - min(rss):.1f}), threads {sorted(set(threads))}")'
# Worker sweep of the CPU backends (ImageNet sample x5, train spec): how far decode scales with cores.
"$PY" - "$data" <<'PY'
import os, sys, time, pathlib, datasets
from fastload import FastLoader, convert
from fastload.bench import timed_epochs
src = pathlib.Path(".cache/gpu_check/tiled")
if not (src / "dataset_dict.json").exists():
    ds = datasets.load_dataset(sys.argv[1], split="validation")
    datasets.DatasetDict({"train": datasets.concatenate_datasets([ds] * 5)}).save_to_disk(str(src))
dirs = {}
for fmt in ("beton", "tfrecord"):
    dirs[fmt] = f".cache/gpu_check/tiled-{fmt}"
    if not (pathlib.Path(dirs[fmt]) / "manifest.json").exists():
        convert(str(src), dirs[fmt], format=fmt, workers=8, progress=False)
cores = os.cpu_count()
for workers in [w for w in (1, 2, 4, 8, 16) if w <= cores]:
    for backend, fmt in (("ffcv", "beton"), ("dali", "tfrecord")):
        loader = FastLoader(dirs[fmt], "train", batch_size=64, spec="imagenet:train", backend=backend, device="cpu",
                            num_workers=workers, drop_last=False)
        timed_epochs(lambda: iter(loader), 1)
        dt, n = timed_epochs(lambda: iter(loader), 1, min_seconds=3)
        print(f"sweep workers={workers:<3} {backend:<5} {n / dt:8.0f} img/s", flush=True)
PY
