"""Exact mid-epoch resume: state_dict() / load_state_dict(), killed for real."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import BACKEND_FORMAT, ROOT, torchrun
from fastload import FastLoader

WORKER = str(ROOT / "tests" / "resume_worker.py")


def _kill_midway(cmd: list[str], checkpoints: list[Path], after: int) -> None:
    """Start the job, SIGKILL it (and its whole process group) once every rank has checkpointed
    ``after`` batches."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    deadline = time.time() + 120
    while time.time() < deadline:
        done = [len(json.loads(c.read_text())["batches"]) if c.exists() else 0 for c in checkpoints]
        if min(done) >= after or proc.poll() is not None:
            break
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the job must be killed midway, not finish"


def _run(cmd: list[str]) -> None:
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]


def _records(out: Path, ranks: int) -> list[dict]:
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(ranks)]


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["ffcv", "dali", "reference"])
def test_kill9_mid_epoch_then_resume_is_exact(labelled_colors, tmp_path, backend):
    """8 batches an epoch, 2 epochs; killed after 3 batches, resumed from the last checkpoint:
    every sample of the epoch exactly once, and every batch bit-identical to an uninterrupted run
    (ColorJitter included: its random parameters come from the batch's own stream)."""
    data = str(labelled_colors[BACKEND_FORMAT[backend]])
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    _run([sys.executable, WORKER, data, backend, str(tmp_path / "a"), "2"])
    cmd = [sys.executable, WORKER, data, backend, str(tmp_path / "b"), "2"]
    _kill_midway(cmd, [tmp_path / "b" / "rank0.json"], after=3)
    interrupted = len(_records(tmp_path / "b", 1)[0]["batches"])
    assert 3 <= interrupted < 16
    _run(cmd)
    (want,), (got,) = _records(tmp_path / "a", 1), _records(tmp_path / "b", 1)
    assert got["batches"] == want["batches"]  # bit-identical, before and after the kill
    for epoch in (0, 1):
        labels = [y for b in got["batches"] if b["epoch"] == epoch for y in b["labels"]]
        assert sorted(labels) == sorted(labelled_colors["labels"].tolist())  # each sample once


@pytest.mark.slow
def test_kill9_under_torchrun_then_resume_is_exact(labelled_colors, tmp_path):
    data = str(labelled_colors["tfrecord"])
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    _run([*torchrun(2), WORKER, data, "dali", str(tmp_path / "a"), "1"])
    cmd = [*torchrun(2), WORKER, data, "dali", str(tmp_path / "b"), "1"]
    _kill_midway(cmd, [tmp_path / "b" / f"rank{r}.json" for r in range(2)], after=1)
    _run(cmd)
    want, got = _records(tmp_path / "a", 2), _records(tmp_path / "b", 2)
    assert [g["batches"] for g in got] == [w["batches"] for w in want]
    labels = [y for g in got for b in g["batches"] for y in b["labels"]]
    assert sorted(labels) == sorted(labelled_colors["labels"].tolist())  # 60 + 60: disjoint, complete


def test_state_dict_round_trip_and_refusals(labelled_colors):
    loader = FastLoader(labelled_colors["tfrecord"], "train", batch_size=16, backend="reference", num_workers=0,
                        spec="imagenet:train", seed=5, drop_last=False)
    it = iter(loader)
    first = [next(it) for _ in range(3)]
    state = loader.state_dict()
    assert (state["epoch"], state["batches_done"]) == (0, 3)
    rest = list(it)
    assert loader.state_dict()["epoch"] == 1 and loader.state_dict()["batches_done"] == 0
    fresh = FastLoader(labelled_colors["tfrecord"], "train", batch_size=16, backend="reference", num_workers=0,
                       spec="imagenet:train", seed=5, drop_last=False)
    fresh.load_state_dict(json.loads(json.dumps(state)))  # survives a JSON checkpoint
    fresh.set_epoch(0)  # the usual loop calls set_epoch first: the resume point stays
    resumed = list(fresh)
    assert len(first) + len(resumed) == len(loader) == 8
    for (x, y), (rx, ry) in zip(rest, resumed):
        assert torch.equal(x, rx) and torch.equal(y, ry)
    other = FastLoader(labelled_colors["tfrecord"], "train", batch_size=8, backend="reference", num_workers=0,
                       spec="imagenet:train", seed=5, drop_last=False)
    with pytest.raises(ValueError, match=r"global batch size is 16 x 1 ranks, this loader's 8 x 1"):
        other.load_state_dict(state)
    with pytest.raises(ValueError, match="not a FastLoader state"):
        other.load_state_dict({"epoch": 1})


@pytest.mark.parametrize("backend", ["ffcv", "dali", "reference"])
def test_break_then_exit_prints_nothing(labelled_colors, backend):
    """Leaving a loop early (or a generator suspended) and exiting: no 'Exception ignored' noise."""
    data = str(labelled_colors[BACKEND_FORMAT[backend]])
    script = ("import sys\nfrom fastload import FastLoader\n"
              f"L = FastLoader({data!r}, 'train', batch_size=16, backend={backend!r}, num_workers=2)\n"
              "for i, _ in enumerate(L):\n    if i == 1:\n        break\n"
              "it = iter(L)\nnext(it)\nprint('exiting')\n")
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == "exiting", r.stderr[-2000:]
    assert "Exception ignored" not in r.stderr and "Traceback" not in r.stderr, r.stderr[-2000:]
