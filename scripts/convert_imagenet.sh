#!/usr/bin/env bash
# The one-time ImageNet-1k conversion (train + validation), resumable: rerun after any stop.
#   scripts/convert_imagenet.sh OUT_DIR [beton|tfrecord] [WORKERS]
# Needs the hub dataset `imagenet-1k` (accept its terms on huggingface.co, `huggingface-cli login`);
# `datasets` downloads and prepares it first (~155 GB in the HF cache).
# Output at original resolution: ~150 GB (TFRecord, 1,281,167 + 50,000 images; RGB baseline JPEGs
# are stored byte for byte, the ~22k grayscale/CMYK/PNG ones re-encoded at quality 90);
# with MAX_SIDE=512 about 60 GB. Time: ~650 images/s per worker measured on real ImageNet JPEGs
# (decode check + histogram, no re-encode for RGB JPEGs): ~20 min with 2 workers; with many workers
# the disk (~100 KB per image) sets the pace.
set -euo pipefail
out=${1:?usage: $0 OUT_DIR [beton|tfrecord] [WORKERS]}
fmt=${2:-tfrecord}
workers=${3:-$(nproc)}
cd "$(dirname "$0")/.."
exec .venv/bin/fastload convert imagenet-1k --format "$fmt" --out "$out" --split train --split validation \
  --workers "$workers" ${MAX_SIDE:+--max-side "$MAX_SIDE"}
