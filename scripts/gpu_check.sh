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
std = torch.tensor([0.229, 0.224, 0.225], device="cuda").view(1, 3, 1, 1) * 255
d = torch.cat([((a - b) * std).abs().mean(dim=(1, 2, 3)) for (a, _), (b, _) in zip(gpu, ref)])
print(f"nvJPEG eval vs reference: mean abs {d.mean():.2f}, worst image {d.max():.2f} (0..255 levels)")
PY
