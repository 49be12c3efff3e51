"""The binary wheel on a machine without libjpeg, JPEG headers, OpenCV or a C compiler (#33).

A mount namespace hides the system's JPEG and OpenCV libraries, every header and the compiler
(bind mounts over the files; CI runs as root). Inside it:

- a fresh venv gets ``make wheel``'s wheel with pip; its dependencies are the development
  venv's (a ``.pth`` to its site-packages, so that no test downloads torch; the wheel's own
  files and its bundled libjpeg come from the wheel alone). ``tests/wheel_job.py`` converts,
  verifies, reads every backend and runs ``fastload demo``: the batches equal the development
  install's, bit for bit, and the process maps the wheel's libjpeg, no other;
- a source build there (no compiler, no headers) installs without the C library: conversion,
  verify and the reference backend still work, with the same batches, and the ffcv and
  DALI-CPU backends fail in one line naming what is missing and the remedy.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
JOB = ROOT / "tests" / "wheel_job.py"

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(sys.platform != "linux" or os.geteuid() != 0 or shutil.which("unshare") is None,
                       reason="needs root and unshare for a mount namespace (CI runs as root)"),
]

# What the namespace hides: JPEG/OpenCV libraries, headers, the C compiler and its helpers
HIDE = r"""
set -euo pipefail
mount -t tmpfs none /usr/include
for d in /usr/lib/gcc /usr/libexec/gcc; do [ -d "$d" ] && mount -t tmpfs none "$d"; done
: > "$EMPTY"
for f in $(find /usr/lib /usr/local/lib -type f \( -name 'libjpeg*' -o -name 'libturbojpeg*' -o -name 'libopencv*' \) \
           2>/dev/null); do mount --bind "$EMPTY" "$f"; done
for c in cc gcc g++ c++ clang tcc; do p=$(command -v $c || true); [ -n "$p" ] && mount --bind "$EMPTY" "$(readlink -f "$p")"; done
# proofs that they are gone
! cc --version >/dev/null 2>&1
! "$PY" -c "import ctypes; ctypes.CDLL('libjpeg.so.62')" 2>/dev/null
! "$PY" -c "import ctypes; ctypes.CDLL('libturbojpeg.so.0')" 2>/dev/null
[ -z "$(ls /usr/include)" ]
"""


class Job:
    """A command started now and waited for by the test that reads it: the three installs of this
    module (the development reference, the wheel, the source build) run side by side."""

    def __init__(self, args: list[str], env: dict | None = None):
        self.proc = subprocess.Popen(args, env={**os.environ, **(env or {})}, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True)

    def output(self, timeout: int = 400) -> str:
        out, _ = self.proc.communicate(timeout=timeout)
        assert self.proc.returncode == 0, out[-6000:]
        return out


def _in_namespace(script: str, env: dict) -> Job:
    return Job(["unshare", "--mount", "--propagation", "private", "bash", "-c", HIDE + script], env)


def _fresh_venv(path: Path) -> Path:
    """A venv with the development venv's packages beneath it (a .pth: read-only, after its own)."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(path)], check=True)
    site = next((path / "lib").glob("python3*/site-packages"))
    (site / "zz_dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    return path / "bin" / "python"


def _pip_install(python: Path, wheel) -> str:
    return (f"{sys.executable} -m pip --python {python} install -q --no-deps --no-index {wheel} "
            "2>&1 | grep -v 'is ignored' || true\n")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """make wheel's wheel, then three jobs at once: the development install's report (the
    reference), the wheel's and a source build's, each in a namespace without the system's libjpeg."""
    out = tmp_path_factory.mktemp("wheelhouse")
    build = subprocess.run(["bash", str(ROOT / "scripts" / "build_wheel.sh"), str(out)], cwd=ROOT,
                           capture_output=True, text=True, env={**os.environ, "PY": sys.executable})
    assert build.returncode == 0, build.stdout + build.stderr
    assert "libjpeg" in build.stdout and "manylinux" in build.stdout, build.stdout
    wheel = next(out.glob("fastload-*manylinux*.whl"))
    dev, installed, source = (tmp_path_factory.mktemp(n) for n in ("dev", "wheel", "source"))

    python = _fresh_venv(installed / "venv")
    jobs = {"dev": Job([sys.executable, str(JOB), str(dev / "out"), str(dev / "report.json"), "--batches-only"]),
            "wheel": _in_namespace(_pip_install(python, wheel) + f'"$PY" {JOB} {installed / "out"} '
                                   f'{installed / "report.json"}\n', {"PY": str(python), "EMPTY": str(installed / "e")})}
    # the source tree, built in the namespace: no compiler there, so the C library is left out
    python = _fresh_venv(source / "venv")
    shutil.copytree(ROOT, source / "src", ignore=shutil.ignore_patterns(
        ".venv", ".git", "build", "*.so", "__pycache__", ".cache", "*.egg-info", "demo-out", "wheelhouse"))
    jobs["source"] = _in_namespace(
        f"cd {source / 'src'} && {sys.executable} -m pip wheel -q --no-deps --no-build-isolation -w {source / 'w'} . "
        f"> {source / 'build.log'} 2>&1\n" + _pip_install(python, f"{source / 'w'}/fastload-*.whl")
        + f'"$PY" {JOB} {source / "out"} {source / "report.json"}\n', {"PY": str(python), "EMPTY": str(source / "e")})
    yield {"dev": dev, "wheel": installed, "source": source, "jobs": jobs}
    for job in jobs.values():
        job.proc.kill()


def _report(runs, name: str) -> dict:
    runs["jobs"][name].output()
    return json.loads((runs[name] / "report.json").read_text())


def test_the_wheel_works_where_the_system_has_no_libjpeg_headers_or_compiler(runs):
    report, development = _report(runs, "wheel"), _report(runs, "dev")
    venv = str(runs["wheel"] / "venv")
    assert report["fastload"].startswith(venv)  # the wheel's fastload, not the development checkout
    assert report["native"].startswith(venv)
    # the only libjpeg in the process is the wheel's own copy (PIL's bundled one has its own name)
    ours = [m for m in report["libjpeg"] if m.startswith(venv)]
    assert ours and all("fastload.libs" in m for m in ours), report["libjpeg"]
    assert not [m for m in report["libjpeg"] if m.startswith("/usr/")], report["libjpeg"]
    for step in ("demo", "convert", "verify"):
        assert report[step]["rc"] == 0, (step, report[step]["output"])
    assert report["verify"]["last"].startswith("OK ")
    assert "skipping" not in " ".join(report["demo"]["output"])  # every backend ran in the demo
    assert report["batches"] == development["batches"]  # bit for bit, every backend
    assert all("sha256" in b for b in report["batches"].values())


def test_a_source_build_without_headers_converts_and_reads_with_the_reference_backend(runs):
    report, development = _report(runs, "source"), _report(runs, "dev")
    assert report["native"] is None and "not built" in report["native_problem"]
    for step in ("demo", "convert", "verify"):
        assert report[step]["rc"] == 0, (step, report[step]["output"])
    assert report["verify"]["last"].startswith("OK ")
    batches, reference = report["batches"], development["batches"]
    assert batches["reference/beton"] == reference["reference/beton"]  # the same data without the C library
    for name in ("ffcv/beton", "dali/tfrecord"):
        error = batches[name]["error"]
        assert "\n" not in error and "C helpers" in error and "binary wheel" in error and "--only-binary" in error, error
        assert "libjpeg-turbo" in error  # the other remedy: the headers to build from source
    assert "skipping backend='ffcv'" in " ".join(report["demo"]["output"])


def test_setup_without_root_names_what_is_missing_and_goes_on(tmp_path):
    """make setup's plan (scripts/setup.sh --check) where the JPEG headers and OpenCV are absent:
    as root it installs them with apt; as another user it names them, says what goes without
    them, and goes on (exit 0)."""
    hide = ("mount -t tmpfs none /usr/include; "
            "for d in /usr/lib/*/pkgconfig /usr/share/pkgconfig; do mount -t tmpfs none $d; done; ")
    setup = f"bash {ROOT / 'scripts' / 'setup.sh'} --check"

    def plan(as_user: str) -> subprocess.CompletedProcess:
        return subprocess.run(["unshare", "--mount", "--propagation", "private", "bash", "-c", hide + as_user + setup],
                              capture_output=True, text=True, timeout=60)

    as_root = plan("")
    assert as_root.returncode == 0, as_root.stderr
    assert as_root.stdout.startswith("setup: installing apt packages: libjpeg62-turbo-dev")
    assert "libturbojpeg0-dev libopencv-dev" in as_root.stdout
    as_nobody = plan("setpriv --reuid=nobody --regid=nogroup --clear-groups ")
    assert as_nobody.returncode == 0, as_nobody.stderr
    lines = as_nobody.stdout.splitlines()
    assert lines[0] == ("setup: missing system packages (no root to install them): libjpeg62-turbo-dev "
                        "libturbojpeg0-dev libopencv-dev")
    assert "builds without its C helpers" in lines[1] and "going on without stock ffcv" in lines[2]
    assert "installing" not in as_nobody.stdout
    here = subprocess.run(["bash", str(ROOT / "scripts" / "setup.sh"), "--check"], capture_output=True, text=True)
    assert here.returncode == 0 and here.stdout == ""  # this machine has them all: nothing to do
