#!/usr/bin/env bash
# The venv of scripts/bench_streaming.py's peers: litdata and Mosaic streaming, as their users install
# them. Its own venv: both need torchvision (their docs' transforms), which does not import beside
# fastload's CPU torch, and Mosaic pins numpy<2.2.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=.cache/streaming-peers
PYTHON=${PYTHON:-python3}
[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --upgrade pip wheel
# torch 2.14.1 + torchvision 0.29.1: the pair that lies on this machine's disk for Python 3.11
"$VENV/bin/python" -m pip install -q torch==2.14.1 torchvision==0.29.1
"$VENV/bin/python" -m pip install -q litdata==0.2.76 mosaicml-streaming==0.13.0 pillow
"$VENV/bin/python" -c "import litdata, streaming, torchvision; print('streaming peers: litdata', litdata.__version__, '· streaming', streaming.__version__, '· torchvision', torchvision.__version__)"
# the S3-protocol server of the side-by-side: s3rver answers a range request from the file's range
# (moto copies the whole object per request, which would make every reader's figures moto's)
mkdir -p .cache/s3rver
(cd .cache/s3rver && npm install --no-audit --no-fund --silent s3rver@3.7.1)
# litdata's obstore downloads pass no allow_http, so they cannot reach the bench's http:// endpoint
# (a real bucket is https); without obstore, litdata downloads with boto3
"$VENV/bin/python" -m pip uninstall -y -q obstore
