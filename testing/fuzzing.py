"""A fuzzer of dataset directories: structured mutations of real converted datasets, each loaded
by every backend that reads it, in a worker subprocess, so that a crash is seen as a crash.

A case is (dataset, mutation, crafted). The mutation edits one thing of a copy of a clean
dataset: a manifest entry, a records-index field, bytes of a data file or of one stored image,
TFRecord framing, the .beton header or tables, a file replaced by a symlink. ``crafted`` says
whether the checksums that would see the edit are recomputed (someone wrote the dataset that
way), or left as they were (a disk or a network damaged it).

Every case must end, in every backend, in one of:
- ``same``: the clean dataset's batches, bit for bit;
- ``error``: a named fastload error (DatasetError, SampleDecodeError);
- ``different`` (crafted cases only): well-formed batches of other values (what the crafted
  dataset says);
and never in a signal, a hang, another exception type, or (damage) silently different data.

Used by ``tests/test_fuzz.py`` (a few hundred cases, derandomized) and ``scripts/fuzz.py
--minutes N`` (random, as long as asked). The worker is ``python -m fastload.testing.fuzzing worker CORPUS``.
"""
from __future__ import annotations

import json
import os
import queue
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
# the shared sample data beside the checkout (CI has it too); elsewhere, where FASTLOAD_SHARED_DATA says
SHARED = Path(os.environ.get("FASTLOAD_SHARED_DATA") or HERE.parents[1] / "shared" / "data")
BACKENDS = {"beton": ("ffcv", "reference"), "tfrecord": ("dali", "reference")}
OK = ("same", "error")
NAMED_ERRORS = ("DatasetError", "SampleDecodeError")
CASE_SECONDS = 60  # a case longer than this is a hang


@dataclass
class Case:
    dataset: str                 # a corpus entry: photos-beton, photos-tfrecord, cifar-beton, cifar-tfrecord
    mutation: dict               # what to change (see apply)
    crafted: bool = False        # checksums recomputed to match the change

    def key(self) -> str:
        return json.dumps(asdict(self), sort_keys=True, default=str)


@dataclass
class Result:
    case: Case
    outcomes: dict = field(default_factory=dict)   # backend -> 'same' | 'error' | 'different' | failure text
    failure: str | None = None                     # what went wrong, or None

    @property
    def ok(self) -> bool:
        return self.failure is None


# --------------------------------------------------------------------------- the corpus
def build_corpus(root: Path) -> Path:
    """Small real datasets in both storages: 12 ImageNet photos as JPEG (longer side 96 px, to keep
    cases fast) and 16 CIFAR images stored raw (PNG sources)."""
    import datasets
    from PIL import Image

    from fastload import convert
    root = Path(root)
    if (root / "ready").exists():
        return root
    root.mkdir(parents=True, exist_ok=True)
    photos = datasets.load_dataset(str(SHARED / "imagenet-1k-sample"), split="validation").select(range(12))
    cifar = datasets.load_dataset(str(SHARED / "cifar10-sample"), split="test").select(range(16))

    def to_png(row):
        import io
        buf = io.BytesIO()
        row["img"].save(buf, format="PNG")
        row["img"] = Image.open(io.BytesIO(buf.getvalue()))
        return row
    cifar = cifar.map(to_png)
    for name, ds in (("photos", photos), ("cifar", cifar)):
        src = root / f"{name}-source"
        datasets.DatasetDict({"train": ds}).save_to_disk(str(src))
        for fmt in ("beton", "tfrecord"):
            convert(str(src), root / f"{name}-{fmt}", format=fmt, workers=1, shard_size=5, progress=False,
                    max_side=96 if name == "photos" else None, preset="imagenet" if name == "photos" else None)
    (root / "ready").touch()
    return root


# --------------------------------------------------------------------------- mutations
RECORD_FIELDS = ("file", "offset", "size", "crc32c", "height", "width", "label", "source_index")
MANIFEST_PATHS = (("format_version",), ("storage",), ("labels", "num_classes"), ("labels", "kind"),
                  ("labels", "names"), ("preset",), ("splits",), ("splits", "train"), ("splits", "train", "num_examples"),
                  ("splits", "train", "image_codec"), ("splits", "train", "max_labels"),
                  ("splits", "train", "stats", "mean"), ("splits", "train", "stats", "std"),
                  ("splits", "train", "files"), ("splits", "train", "files", 0), ("splits", "train", "files", 0, "path"),
                  ("splits", "train", "files", 0, "size"), ("splits", "train", "files", 0, "role"),
                  ("splits", "train", "files", -1, "path"), ("splits", "train", "files", -1, "size"),
                  ("splits", "train", "files", -1, "role"), ("splits", "train", "files", -1, "sha256"))
ODD_VALUES = (None, 0, -1, 1, 2, 3, 2**31, 2**63, 2**64, 1.5, float("nan"), float("inf"), "", "x" * 300,
              "../outside.bin", "/etc/hostname", "manifest.json", ".", "train.records.npy", "raw", "jpeg", "multi",
              "beton", "tfrecord", "data", "records", [], {}, [1, 2, 3], [0.5, 0.5, 0.5], [0.0, 0.0, 0.0], True)


def _set_path(obj, path, value, delete=False):
    for key in path[:-1]:
        obj = obj[key]
    if delete:
        del obj[path[-1]]
    else:
        obj[path[-1]] = value


def _rewrite_manifest(directory: Path, data: dict, crafted: bool) -> None:
    """Write ``data`` as the manifest: with its own checksum recomputed when crafted."""
    from fastload.formats.manifest import CHECKSUM_KEY, manifest_checksum
    if crafted and isinstance(data, dict) and CHECKSUM_KEY in data:
        data[CHECKSUM_KEY] = manifest_checksum(data)
    (directory / "manifest.json").write_text(json.dumps(data))


def _record_listing(directory: Path) -> tuple[dict, dict]:
    manifest = json.loads((directory / "manifest.json").read_text())
    entry = next(f for f in manifest["splits"]["train"]["files"] if f["role"] == "records")
    return manifest, entry


def _refresh_checksums(directory: Path, paths: list[str]) -> None:
    """As a crafting writer would: the manifest's sizes and sha256 of ``paths``, and its own checksum."""
    from fastload.formats.writing import sha256_file
    manifest = json.loads((directory / "manifest.json").read_text())
    for f in manifest["splits"]["train"]["files"]:
        if f["path"] in paths and (directory / f["path"]).is_file():
            f["size"], f["sha256"] = (directory / f["path"]).stat().st_size, sha256_file(directory / f["path"])
    _rewrite_manifest(directory, manifest, crafted=True)


def _damage(path: Path, m: dict) -> None:
    """Flip one bit of the file at fraction ``m['at']``, or cut it short there (``m['truncate']``)."""
    raw = bytearray(path.read_bytes())
    at = int(m["at"] * (len(raw) - 1))
    if m.get("truncate"):
        del raw[at:]
    else:
        raw[at] ^= 1 << (m["bit"] % 8)
    path.write_bytes(bytes(raw))


def _data_files(directory: Path) -> list[str]:
    manifest = json.loads((directory / "manifest.json").read_text())
    return [f["path"] for f in manifest["splits"]["train"]["files"] if f["role"] == "data"]


def _value_for(old: int, choice: int, rnd: float, bits: int, signed: bool) -> int:
    lo, hi = (-(1 << (bits - 1)), (1 << (bits - 1)) - 1) if signed else (0, (1 << bits) - 1)
    candidates = [0, 1, hi, hi - 1, lo, old + 1, old - 1, old * 2, old // 2, old + 4096, int(lo + rnd * (hi - lo))]
    return int(np.clip(candidates[choice % len(candidates)], lo, hi))


def apply(case: Case, directory: Path) -> None:
    """Make the case's change to the dataset copy at ``directory``."""
    m, crafted = case.mutation, case.crafted
    kind = m["kind"]
    if kind == "manifest":
        data = json.loads((directory / "manifest.json").read_text())
        path = MANIFEST_PATHS[m["path"] % len(MANIFEST_PATHS)]
        try:
            _set_path(data, path, ODD_VALUES[m["value"] % len(ODD_VALUES)], delete=m.get("delete", False))
        except (KeyError, IndexError, TypeError):
            pass  # that entry is absent here: the case loads the clean dataset
        _rewrite_manifest(directory, data, crafted)
    elif kind == "manifest_bytes":
        _damage(directory / "manifest.json", m)
    elif kind == "records":
        manifest, entry = _record_listing(directory)
        path = directory / entry["path"]
        records = np.load(path)
        name = RECORD_FIELDS[m["field"] % len(RECORD_FIELDS)]
        if name not in records.dtype.names:
            return
        row = int(m["row"] * (len(records) - 1))
        column = records[name]
        dtype = column.dtype.base
        old = int(column[row].flat[0])
        new = _value_for(old, m["choice"], m["rnd"], dtype.itemsize * 8, dtype.kind == "i")
        if column.ndim > 1:
            column[row, 0] = new
        else:
            column[row] = new
        np.save(path, records)
        if crafted:
            _refresh_checksums(directory, [entry["path"]])
    elif kind == "records_bytes":
        manifest, entry = _record_listing(directory)
        _damage(directory / entry["path"], m)
        if crafted:
            _refresh_checksums(directory, [entry["path"]])
    elif kind == "image_bytes":  # one stored image: a flipped bit, zeros, or cut short (its size edited)
        from fastload import Manifest
        from fastload.formats.records import SplitReader
        manifest, entry = _record_listing(directory)
        reader = SplitReader(Manifest.read(directory), "train")
        i = int(m["sample"] * (len(reader) - 1))
        r = reader.records[i]
        data_path = reader.data_files[int(r["file"])]
        start, size = int(r["offset"]), int(r["size"])
        del reader
        at = start + int(m["at"] * (size - 1))
        if m["how"] == "cut":  # the sample's bytes end early; the index says so
            records = np.load(directory / entry["path"])
            records["size"][i] = max(1, at - start)
            if crafted:
                from crc32c import crc32c
                stored = data_path.read_bytes()[start:start + int(records["size"][i])]
                if "crc32c" in records.dtype.names:
                    records["crc32c"][i] = crc32c(stored)
            np.save(directory / entry["path"], records)
            if crafted:
                _refresh_checksums(directory, [entry["path"]])
            return
        with open(data_path, "r+b") as f:
            f.seek(at)
            b = f.read(1)
            f.seek(at)
            f.write(bytes([b[0] ^ (1 << (m["bit"] % 8))]) if m["how"] == "flip" else b"\0" * min(16, size))
        if crafted:  # the index vouches for the new bytes
            from crc32c import crc32c
            records = np.load(directory / entry["path"])
            if "crc32c" in records.dtype.names:
                records["crc32c"][i] = crc32c(data_path.read_bytes()[start:start + size])
                np.save(directory / entry["path"], records)
            _refresh_checksums(directory, [entry["path"], data_path.name])
    elif kind == "file_bytes":  # anywhere in a data file: a flipped bit, or the file cut short
        files = _data_files(directory)
        path = directory / files[m["file"] % len(files)]
        _damage(path, m)
        if crafted:
            _refresh_checksums(directory, [path.name])
    elif kind == "framing":  # a TFRecord record's length or CRC bytes, or a .beton header/table byte
        files = _data_files(directory)
        path = directory / files[m["file"] % len(files)]
        raw = bytearray(path.read_bytes())
        if path.suffix == ".tfrecord":
            offsets = [0]
            while offsets[-1] + 12 <= len(raw):
                length = int.from_bytes(raw[offsets[-1]:offsets[-1] + 8], "little")
                offsets.append(offsets[-1] + 16 + length)
            start = offsets[int(m["record"] * (len(offsets) - 2))]
            at = start + (m["byte"] % 12)  # length (8) and its CRC (4)
        else:
            at = int(m["record"] * min(len(raw) - 1, 64 + 1024 * 3 + 64))  # header, field descriptors, metadata
        raw[at] ^= 1 << (m["bit"] % 8)
        path.write_bytes(bytes(raw))
        if crafted:
            _refresh_checksums(directory, [path.name])
    elif kind == "symlink":  # a listed file replaced by a symlink out of the dataset
        files = _data_files(directory) + [_record_listing(directory)[1]["path"]]
        victim = directory / files[m["file"] % len(files)]
        outside = directory.parent / "outside.bin"
        shutil.copy(victim, outside)
        victim.unlink()
        victim.symlink_to(outside if m.get("absolute") else Path("..") / outside.name)
    else:
        raise ValueError(f"unknown mutation {kind!r}")


# --------------------------------------------------------------------------- one case, in the worker
def _epoch(directory: Path, backend: str):
    """One epoch's (images, labels) of split 'train', eval geometry, in order."""
    import torch
    from fastload import FastLoader
    loader = FastLoader(directory, "train", batch_size=8, backend=backend, num_workers=0 if backend == "reference" else 1,
                        order="sequential", drop_last=False, distributed=False)  # the dataset's preset, as a user's
    xs, ys = [], []
    for x, y in loader:
        xs.append(x.clone())
        ys.append(y.clone())
    return torch.cat(xs), torch.cat(ys)


def run_case(case: Case, corpus: Path, clean: dict, report) -> dict:
    """The case, every backend: {backend: outcome}. ``report(backend)`` is said before each starts."""
    import torch
    outcomes = {}
    work = Path(tempfile.mkdtemp(prefix="fuzz-"))
    try:
        directory = work / "dataset"
        shutil.copytree(corpus / case.dataset, directory)
        apply(case, directory)
        storage = case.dataset.rsplit("-", 1)[1]
        for backend in BACKENDS[storage]:
            report(backend)
            try:
                x, y = _epoch(directory, backend)
            except Exception as e:  # noqa: BLE001 - the point is to see every type
                name = type(e).__name__
                named = any(c.__name__ in NAMED_ERRORS for c in type(e).__mro__)
                outcomes[backend] = "error" if named else f"{name}: {str(e)[:300]}"
                continue
            cx, cy = clean[(case.dataset, backend)]
            if x.shape == cx.shape and y.shape == cy.shape and torch.equal(x, cx) and torch.equal(y, cy):
                outcomes[backend] = "same"
            elif x.ndim == 4 and len(x) == len(y) and bool(torch.isfinite(x.float()).all()):
                outcomes[backend] = "different"  # (a crafted manifest may name another preset: another shape)
            else:
                outcomes[backend] = f"malformed batches: {tuple(x.shape)} {x.dtype}"
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return outcomes


def worker_main(corpus: str) -> None:
    """Read cases (JSON lines) on stdin; write {'backend': b} before each backend, then the outcomes."""
    os.environ.setdefault("TQDM_DISABLE", "1")
    import warnings
    warnings.simplefilter("ignore")
    out = sys.stdout

    def say(obj):
        out.write(json.dumps(obj) + "\n")
        out.flush()
    # the clean datasets' batches first (compiling and caching what loaders compile): cases then
    # time only themselves
    clean = {(name, backend): _epoch(Path(corpus) / name, backend)
             for name in ("photos-beton", "photos-tfrecord", "cifar-beton", "cifar-tfrecord")
             for backend in BACKENDS[name.rsplit("-", 1)[1]]}
    say({"ready": True})
    import faulthandler
    for line in sys.stdin:
        case = Case(**json.loads(line))
        faulthandler.dump_traceback_later(CASE_SECONDS - 5)  # a hang shows where it hangs
        outcomes = run_case(case, Path(corpus), clean, lambda b: say({"backend": b}))
        faulthandler.cancel_dump_traceback_later()
        say({"outcomes": outcomes})


# --------------------------------------------------------------------------- the parent's side
def judge(case: Case, outcomes: dict) -> str | None:
    """What is wrong with a case's outcomes, or None."""
    for backend, outcome in outcomes.items():
        if outcome in OK or (outcome == "different" and case.crafted):
            continue
        if outcome == "different":
            return f"{backend}: silently different data from a damaged dataset"
        return f"{backend}: {outcome}"
    return None


class Runner:
    """A worker subprocess that runs cases one after another, restarted after a crash or a hang."""

    def __init__(self, corpus: Path, timeout: float = CASE_SECONDS):
        self.corpus, self.timeout = Path(corpus), timeout
        self.proc = None
        self.cases = self.crashes = 0

    def _start(self) -> None:
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "TQDM_DISABLE": "1"}
        # stderr to a file: a pipe nobody reads fills up with the libraries' warnings and blocks the worker
        self.log = tempfile.TemporaryFile("w+")
        self.proc = subprocess.Popen([sys.executable, "-m", "fastload.testing.fuzzing", "worker", str(self.corpus)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log,
                                     text=True, env=env, cwd=str(HERE.parent))
        # lines arrive through a thread: a select() on the buffered pipe misses lines already read ahead
        self.lines: queue.Queue = queue.Queue()
        threading.Thread(target=self._pump, args=(self.proc.stdout, self.lines), daemon=True).start()
        message = self._read(300)
        if not (message and message.get("ready")):
            raise RuntimeError(f"fuzz worker did not start: {self._stop()}")

    @staticmethod
    def _pump(stream, lines: queue.Queue) -> None:
        for line in stream:
            lines.put(line)
        lines.put(None)  # the worker is gone

    def _read(self, timeout: float):
        try:
            line = self.lines.get(timeout=timeout)
        except queue.Empty:
            return None
        return json.loads(line) if line else None

    def _stop(self) -> str:
        if self.proc is None:
            return ""
        self.proc.kill()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            pass
        code = self.proc.returncode
        self.proc = None
        self.log.seek(0)
        err = self.log.read()[-3000:]
        self.log.close()
        return f"exit {code}; {err}"

    def run(self, case: Case) -> Result:
        if self.proc is None:
            self._start()
        self.cases += 1
        self.proc.stdin.write(json.dumps(asdict(case)) + "\n")
        self.proc.stdin.flush()
        backend, deadline = None, time.monotonic() + self.timeout
        while True:
            message = self._read(max(0.1, deadline - time.monotonic()))
            if message is None:
                hung = self.proc.poll() is None
                detail = self._stop()
                self.crashes += 1
                what = f"hang (no answer in time; {detail})" if hung else f"crash ({detail})"
                return Result(case, {backend: what}, f"{backend}: {what}")
            if "backend" in message:
                backend = message["backend"]
                continue
            outcomes = message["outcomes"]
            return Result(case, outcomes, judge(case, outcomes))

    def close(self) -> None:
        if self.proc is not None:
            try:
                self.proc.stdin.close()
                self.proc.wait(timeout=30)
            except (OSError, subprocess.TimeoutExpired):
                pass
            self._stop()


# --------------------------------------------------------------------------- hypothesis strategies
def strategies():
    from hypothesis import strategies as st
    unit = st.floats(0.0, 1.0, allow_nan=False)
    bit = st.integers(0, 7)
    kinds = st.one_of(
        st.fixed_dictionaries({"kind": st.just("manifest"), "path": st.integers(0, 99), "value": st.integers(0, 99),
                               "delete": st.booleans()}),
        st.fixed_dictionaries({"kind": st.just("manifest_bytes"), "at": unit, "bit": bit, "truncate": st.booleans()}),
        st.fixed_dictionaries({"kind": st.just("records"), "field": st.integers(0, 99), "row": unit,
                               "choice": st.integers(0, 99), "rnd": unit}),
        st.fixed_dictionaries({"kind": st.just("records_bytes"), "at": unit, "bit": bit,
                               "truncate": st.booleans()}),
        st.fixed_dictionaries({"kind": st.just("image_bytes"), "sample": unit, "at": unit, "bit": bit,
                               "how": st.sampled_from(["flip", "zeros", "cut"])}),
        st.fixed_dictionaries({"kind": st.just("file_bytes"), "file": st.integers(0, 99), "at": unit, "bit": bit,
                               "truncate": st.booleans()}),
        st.fixed_dictionaries({"kind": st.just("framing"), "file": st.integers(0, 99), "record": unit,
                               "byte": st.integers(0, 99), "bit": bit}),
        st.fixed_dictionaries({"kind": st.just("symlink"), "file": st.integers(0, 99), "absolute": st.booleans()}),
    )
    datasets = st.sampled_from(["photos-beton", "photos-tfrecord", "cifar-beton", "cifar-tfrecord"])
    return st.builds(Case, dataset=datasets, mutation=kinds, crafted=st.booleans())


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "worker":
        worker_main(sys.argv[2])
    else:
        sys.exit("usage: fuzzing.py worker CORPUS")
