#!/usr/bin/env bash
# The contributors' setup (make setup): a venv at .venv with fastload in editable mode and every
# extra. Users install the wheel instead (README, Install). Idempotent: each step checks first.
#
# System packages serve two things only, and each is asked for only where it is missing:
#   - libjpeg-turbo's headers: the source build of fastload's C helpers (the ffcv and DALI-CPU
#     backends); without them the build goes on without the library (pyproject.toml);
#   - pkg-config, libturbojpeg and OpenCV headers: stock ffcv's build (raw FFCV in the benchmarks,
#     verify's second reader of .beton files); without them setup goes on without stock ffcv and
#     the tests that need it are skipped, saying why.
# As root (or with passwordless sudo) on Debian/Ubuntu they come from apt; otherwise setup names
# the packages and goes on.   scripts/setup.sh --check: print the plan, change nothing.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
VENV=.venv
CHECK=0; [ "${1:-}" = "--check" ] && CHECK=1

have_jpeg_headers() { printf '#include <stdio.h>\n#include <jpeglib.h>\n' | ${CC:-cc} -E -x c - >/dev/null 2>&1; }
have_pc() { command -v pkg-config >/dev/null && pkg-config --exists "$1" 2>/dev/null; }
have_ffcv_deps() { have_pc libturbojpeg && have_pc opencv4; }

# Debian's package names (Ubuntu: libjpeg-turbo8-dev for the first)
missing=()
have_jpeg_headers || missing+=(libjpeg62-turbo-dev)
command -v pkg-config >/dev/null || missing+=(pkg-config)
have_pc libturbojpeg || missing+=(libturbojpeg0-dev)
have_pc opencv4 || missing+=(libopencv-dev)

if [ ${#missing[@]} -gt 0 ]; then
  SUDO=""; can_apt=0
  if command -v apt-get >/dev/null; then
    if [ "$(id -u)" -eq 0 ]; then can_apt=1
    elif command -v sudo >/dev/null && sudo -n true 2>/dev/null; then can_apt=1; SUDO=sudo; fi
  fi
  if [ $can_apt -eq 1 ]; then
    echo "setup: installing apt packages: ${missing[*]}"
    if [ $CHECK -eq 0 ]; then
      $SUDO apt-get update -qq
      DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${missing[@]}" >/dev/null
    fi
  else
    echo "setup: missing system packages (no root to install them): ${missing[*]}"
    have_jpeg_headers || echo "setup:   without libjpeg-turbo's headers fastload builds without its C helpers:" \
      "the ffcv and DALI-CPU backends will say so; conda install -c conda-forge libjpeg-turbo brings them"
    have_ffcv_deps || echo "setup:   going on without stock ffcv: raw FFCV in the benchmarks and verify's" \
      "second reader are skipped, and so are the tests that need it"
  fi
fi
[ $CHECK -eq 1 ] && exit 0

[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"

# constraints.txt pins torch to the CPU wheel for this machine; GPU users
# install their own torch first (README) and skip it with FASTLOAD_TORCH=keep.
"$VENV/bin/python" -m pip install -q --upgrade pip wheel setuptools
if [ "${FASTLOAD_TORCH:-}" != "keep" ]; then
  "$VENV/bin/python" -m pip install -q -c constraints.txt torch
fi
"$VENV/bin/python" -m pip install -q -c constraints.txt numpy
checks="import fastload, nvidia.dali, datasets, torch"
if have_ffcv_deps; then
  # numpy first: ffcv's setup.py imports it at build time. ffcv goes in without its declared
  # dependencies, then the ones it imports: its assertpy and fastargs serve only its benchmark
  # suites, and come as sdists that no longer build with current setuptools/flit_core.
  "$VENV/bin/python" -m pip install -q -c constraints.txt --no-build-isolation --no-deps ffcv
  "$VENV/bin/python" -m pip install -q -c constraints.txt opencv-python terminaltables pytorch_pfn_extras
  checks="$checks, ffcv"
fi
# every extra but stock-ffcv (above, for the same reason); dist: make wheel's auditwheel
"$VENV/bin/python" -m pip install -q -c constraints.txt --no-build-isolation -e ".[ffcv,dali,bench,test,lightning,remote,ray,dist]"
"$VENV/bin/python" -c "$checks"
"$VENV/bin/python" -c "from fastload.pipelines import native as n; n.LIB or print(f'setup: note: fastload\'s C helpers \
{n.PROBLEM}: the ffcv and DALI-CPU backends will not run, and their tests fail')"
touch "$VENV/.fastload-setup-done"
echo "setup: ok ($(du -sh "$VENV" | cut -f1) in $VENV)"
