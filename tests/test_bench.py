"""fastload bench and fastload inspect: report schema, stages adding up, PNGs, errors."""
from __future__ import annotations

import json
import subprocess
import sys
import time

import numpy as np
import pytest
from PIL import Image

from conftest import needs_shared
from fastload.bench import STAGES, BenchError, run_bench
from fastload.inspect_grid import inspect_grid

FASTLOAD = [sys.executable, "-m", "fastload.cli"]

pytestmark = pytest.mark.serial  # measures the cores and times of this machine: runs alone (Makefile)


@pytest.fixture(scope="module")
def report(labelled_colors, tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    lines = []
    # ffcv and the reference over one .beton (DALI's bench runs in tests/test_docs.py, docs/profiling.md)
    rep = run_bench([str(labelled_colors["beton"])], split="train",
                    spec="imagenet:train", batch_size=16, batches=16, repeats=2, workers=2, json_out=out / "b.json",
                    plot=out / "b.png", progress=False, echo=lines.append, step_ms=5)
    return rep, out, "\n".join(lines)


def test_report_schema_and_table(report):
    rep, out, table = report
    on_disk = json.loads((out / "b.json").read_text())
    assert on_disk == json.loads(json.dumps(rep))
    assert rep["format"] == "fastload-bench/1" and rep["images"] == 120
    assert all(r["images_per_repeat"] == 2 * 120 for r in rep["results"])  # 16 batches of 16 = 2 epochs
    lim = rep["decode_limit"]
    assert lim["limit_images_per_s"] == pytest.approx(lim["per_core_images_per_s"] * lim["cores"])
    assert {r["backend"] for r in rep["results"]} == {"ffcv", "reference"}
    for r in rep["results"]:
        ips = r["images_per_s"]
        assert 0 < ips["min"] <= ips["median"] <= ips["max"] and len(ips["all"]) == 2
        assert r["cpu_s_per_image"] > 0 and r["peak_rss_mb"] > 50 and r["time_to_first_batch_s"] > 0
        assert r["fraction_of_decode_limit"] == pytest.approx(ips["median"] / lim["limit_images_per_s"])
        assert set(r["stages"]["ms_per_image"]) == set(STAGES)
        assert r["speedup_vs_reference"] == pytest.approx(
            ips["median"] / next(x for x in rep["results"] if x["backend"] == "reference")["images_per_s"]["median"])
        assert r["backend"] in table
    assert "decode limit" in table and "stage ms/img" in table
    for r in rep["results"]:  # --step-ms 5: would a model of 3,200 img/s be fed? each backend's loop says
        c = r["consume"]
        assert c["step_ms"] == 5 and c["model_images_per_s"] == pytest.approx(16 / 0.005)
        assert 0 <= c["wait_fraction"] <= 1 and c["images_per_s"] > 0 and c["fed"] == (c["wait_fraction"] < 0.10)
        assert c["verdict"].startswith("input-bound" if not c["fed"] else "compute-bound")
        assert f"a model of 3,200 img/s (a 5 ms step), {r['backend']}: " in table


def test_stage_costs_add_up_to_the_full_pipeline(report):
    """Stages come from truncated pipelines; their sum must match the full pipeline's cost as
    measured separately by the best throughput repeat (both are best-of timings; a missed or
    doubled stage would be off by far more than a loaded CI machine's 2x)."""
    rep, _, _ = report
    for r in rep["results"]:
        stages = r["stages"]["ms_per_image"]
        total = sum(stages.values())
        assert total == pytest.approx(r["stages"]["full_ms_per_image"], rel=1e-6)
        measured = 1e3 / r["images_per_s"]["max"]
        assert 0.5 < total / measured < 2.0, (r["backend"], stages, measured)
        assert stages["read"] > 0 and stages["decode"] > 0
        assert min(stages.values()) >= 0  # never negative: a stage below noise is 0 with a note
        measured_stages = r["stages"]["measured_ms_per_image"]
        for note in r["stages"]["notes"]:
            name = note.split()[0]
            assert stages[name] == 0 and name in measured_stages


def test_plot_png(report):
    _, out, _ = report
    with Image.open(out / "b.png") as im:
        assert im.format == "PNG" and im.size == (1000, 400)


def test_bench_errors(labelled_colors, tmp_path):
    with pytest.raises(BenchError, match="does not exist"):
        run_bench([str(tmp_path / "missing")], progress=False)
    with pytest.raises(BenchError, match="backend='tpu' is unknown"):
        run_bench([str(labelled_colors["beton"])], backend="tpu", progress=False)
    with pytest.raises(BenchError, match="backend 'dali' cannot read"):
        run_bench([str(labelled_colors["beton"])], backend="dali", progress=False)
    t0 = time.perf_counter()  # a bad spec fails before any backend process starts
    with pytest.raises(BenchError, match="preset=.* is unknown|'imagenet:foo' is invalid"):
        run_bench([str(labelled_colors["beton"])], spec="imagenet:foo", progress=False)
    assert time.perf_counter() - t0 < 2
    r = subprocess.run([*FASTLOAD, "bench", str(tmp_path / "missing")], capture_output=True, text=True)
    assert r.returncode == 2 and "does not exist" in r.stderr
    r = subprocess.run([*FASTLOAD, "bench", str(labelled_colors["beton"]), "--backend", "tpu"], capture_output=True,
                       text=True)
    assert r.returncode == 2 and "tpu" in r.stderr


def test_inspect_grid(labelled_colors, tmp_path):
    path = inspect_grid(labelled_colors["tfrecord"], split="train", spec="imagenet:train", backend="dali",
                        out=tmp_path / "grid.png", n=6)
    with Image.open(path) as im:
        assert im.format == "PNG" and im.size == (3 * 224, 2 * (224 + 28))
        tile = im.crop((0, 0, 224, 224)).convert("RGB")
        colours = tile.getcolors(maxcolors=10_000)
        assert colours and max(colours)[0] > 0.9 * 224 * 224  # a flat colour tile, denormalized
    r = subprocess.run([*FASTLOAD, "inspect", str(labelled_colors["tfrecord"]), "--split", "nope", "--out",
                        str(tmp_path / "x.png")], capture_output=True, text=True)
    assert r.returncode == 2 and "split 'nope'" in r.stderr


@needs_shared
def test_inspect_grid_blows_up_small_images(cifar_dirs, tmp_path):
    path = inspect_grid(cifar_dirs["tfrecord"], split="test", out=tmp_path / "cifar.png", n=4)
    with Image.open(path) as im:
        assert im.size == (2 * 128, 2 * (128 + 28))  # 32 px tiles shown at 4x
        tile = np.asarray(im.convert("RGB").crop((0, 0, 128, 128)))
    blocks = tile.reshape(32, 4, 32, 4, 3)
    assert (blocks == blocks[:, :1, :, :1]).all()  # nearest neighbour: each source pixel a 4x4 block


def test_cli_help_is_instant():
    import time
    t0 = time.perf_counter()
    r = subprocess.run([*FASTLOAD, "--help"], capture_output=True, text=True)
    assert r.returncode == 0 and "convert" in r.stdout and "bench" in r.stdout
    assert time.perf_counter() - t0 < 5


def test_sweep_workers_reports_the_best(labelled_colors, monkeypatch):
    """The sweep's logic: every worker count is measured, the best is reported (the measurement
    itself is the fixture's, on the real backends: here a fake whose rate peaks at one count)."""
    import os

    from fastload import bench
    cores = os.cpu_count() or 1
    rate = {w: 100.0 + (50 if w == max(1, cores // 2) else w) for w in (1, max(1, cores // 2), cores)}

    def measured(fn, directory, split, spec, entry, batch_size, batches, repeats, workers, *rest):
        assert fn is bench._measure_backend and entry.name == "ffcv"
        return {"backend": entry.name, "workers": workers, "images_per_s": {"median": rate[workers]}}
    monkeypatch.setattr(bench, "run_in_process", measured)
    monkeypatch.setattr(bench, "format_table", lambda report: "")
    rep = bench.run_bench([str(labelled_colors["beton"])], split="train", spec="imagenet:train", backend="ffcv",
                          batch_size=16, batches=8, repeats=1, sweep_workers=True, progress=False, echo=lambda s: None)
    assert sorted(r["workers"] for r in rep["sweep"]) == sorted(rate)
    assert [r["workers"] for r in rep["results"]] == [max(rate, key=rate.get)]
