#!/usr/bin/env bash
# One idempotent setup for a fresh Debian 12 machine: apt packages for the
# ffcv build, a venv at .venv, pinned Python packages, fastload in editable
# mode. Safe to rerun: each step checks before it acts.
set -euo pipefail
cd "$(dirname "$0")/.."

APT_PACKAGES=(pkg-config libturbojpeg0-dev libjpeg62-turbo-dev libopencv-dev)
PYTHON=${PYTHON:-python3}
VENV=.venv

missing=()
for p in "${APT_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "setup: installing apt packages: ${missing[*]}"
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO=sudo
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${missing[@]}" >/dev/null
fi

[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"

# constraints.txt pins torch to the CPU wheel for this machine; GPU users
# install their own torch first (README) and skip it with FASTLOAD_TORCH=keep.
"$VENV/bin/python" -m pip install -q --upgrade pip wheel setuptools
if [ "${FASTLOAD_TORCH:-}" != "keep" ]; then
  "$VENV/bin/python" -m pip install -q -c constraints.txt torch
fi
# numpy first: ffcv's setup.py imports it at build time. ffcv goes in without its declared
# dependencies, then the ones it imports: its assertpy and fastargs serve only its benchmark
# suites, and come as sdists that no longer build with current setuptools/flit_core.
"$VENV/bin/python" -m pip install -q -c constraints.txt numpy
"$VENV/bin/python" -m pip install -q -c constraints.txt --no-build-isolation --no-deps ffcv
"$VENV/bin/python" -m pip install -q -c constraints.txt opencv-python terminaltables pytorch_pfn_extras
# every extra but stock-ffcv (installed above), for the same reason
"$VENV/bin/python" -m pip install -q -c constraints.txt --no-build-isolation -e ".[ffcv,dali,bench,test,lightning,remote,ray]"
"$VENV/bin/python" -c "import fastload, ffcv, nvidia.dali, datasets, torch" 
touch "$VENV/.fastload-setup-done"
echo "setup: ok ($(du -sh "$VENV" | cut -f1) in $VENV)"
