"""Conversion on a real Ray cluster of this machine (#23): a head node and worker nodes, each
its own raylet with its own CPUs (``ray.cluster_utils.Cluster``), started and stopped here. The
Ray engine's output must be the local engine's, file for file, through a node killed mid-run,
a driver killed and run again, and a task that meets a corrupt image."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import CIFAR10, IMAGENET, ROOT, jpeg_bytes, needs_shared

from fastload import convert
from fastload.converters.images import CorruptImageError
from fastload.formats.manifest import Manifest
from fastload.formats.records import SplitReader
from fastload.verification import verify

# Every Ray process of these tests on loopback: Ray would otherwise take the address of the
# interface a route leads out through, and its nodes would talk over it. (Read when ray is
# imported; the nodes and the CLI drivers started here inherit it.)
os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
LOOPBACK = {"node_ip_address": "127.0.0.1"}
ray = pytest.importorskip("ray")
pytestmark = [pytest.mark.slow, needs_shared]
FASTLOAD = [sys.executable, "-m", "fastload.cli"]


@pytest.fixture(scope="module")
def store():
    """moto's S3 server behind the counting proxy (tests/store_proxy.py)."""
    from fastload.testing.store_proxy import StoreServers
    servers = StoreServers()
    yield servers
    servers.close()


@pytest.fixture(scope="module")
def cluster(store):
    from ray.cluster_utils import Cluster
    # a killed node is seen dead in about 2 s (Ray's default health check takes about 15 s: 3 s x 5)
    health = {"health_check_initial_delay_ms": 0, "health_check_period_ms": 500, "health_check_failure_threshold": 4}
    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False,
                                                      "_system_config": health, **LOOPBACK})
    c.add_node(num_cpus=1, **LOOPBACK)
    c.wait_for_nodes()
    # the job's tasks reach the S3 server as a cluster's would its store: credentials in the job's env
    ray.init(address=c.address, logging_level="WARNING", runtime_env={"env_vars": store.env()})
    yield c
    ray.shutdown()
    c.shutdown()


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    """The CIFAR sample's first 3,000 rows as hub-style parquet (two files, row groups of 200
    rows), and the ImageNet sample as a save_to_disk folder (Arrow, memory-mapped)."""
    import datasets
    root = tmp_path_factory.mktemp("ray-sources")
    cifar = datasets.load_dataset(str(CIFAR10), split="test").select(range(3000))
    (root / "cifar" / "data").mkdir(parents=True)
    for k in range(2):
        part = cifar.select(range(k * 1500, (k + 1) * 1500))
        part.to_parquet(str(root / "cifar" / "data" / f"train-{k:05d}-of-00002.parquet"), batch_size=200)
    imagenet = datasets.load_dataset(str(IMAGENET))
    imagenet.save_to_disk(str(root / "imagenet"))
    return {"cifar": root / "cifar", "imagenet": root / "imagenet"}


def _files(m: Manifest) -> dict:
    return {f["path"]: f["sha256"] for s in m.split_names for f in m.split(s).files}


# Ray reads parquet where it lies, a row group at a time: its seeded write order permutes row
# groups (the local engine, through datasets' Arrow copy, rows). In the source's order (--keep-order)
# the two engines write the same files.
KEEP = {"cifar": {"shuffle_seed": None}, "imagenet": {}}


@pytest.fixture(scope="module")
def local(sources, tmp_path_factory):
    """Each source converted by the local engine: what the Ray engine must write."""
    root = tmp_path_factory.mktemp("ray-local")
    out = {}
    for name, fmt in (("cifar", "tfrecord"), ("imagenet", "beton"), ("imagenet", "tfrecord")):
        out[name, fmt] = convert(str(sources[name]), root / f"{name}-{fmt}", format=fmt, workers=2, shard_size=100,
                                 progress=False, **KEEP[name])
    return out


@pytest.fixture(scope="module")
def shuffled_parquet(cluster, sources, tmp_path_factory):
    """The parquet source converted by the Ray engine with the defaults: its row groups permuted."""
    out = tmp_path_factory.mktemp("ray-parquet") / "out"
    return convert(str(sources["cifar"]), out, format="tfrecord", engine="ray", shard_size=150, progress=False)


# (imagenet -> tfrecord: the s3 test below compares those files)
@pytest.mark.parametrize("name,fmt", [("cifar", "tfrecord"), ("imagenet", "beton")])
def test_ray_engine_writes_the_local_engines_dataset(cluster, sources, local, tmp_path, name, fmt):
    m = convert(str(sources[name]), tmp_path / "out", format=fmt, engine="ray", shard_size=100, progress=False,
                **KEEP[name])
    assert _files(m) == _files(local[name, fmt])  # every data file, index and records: the same sha256
    assert verify(tmp_path / "out") == []
    assert [p.name for p in (tmp_path / "out").glob(".*")] == []  # no lock, staging or temporary file left


def test_a_parquet_source_on_ray_is_written_with_its_row_groups_permuted(shuffled_parquet, sources):
    """Every source row once, each with its own label; the row groups (200 rows) in a seeded
    random order and a shard's row groups interleaved (150-row shards: every other one spans two)."""
    import datasets
    m = shuffled_parquet
    assert m.data["write_order"] == {"shuffled": True, "seed": 0, "by": "row group"}
    reader = SplitReader(m, "train")
    source_index = np.asarray(reader.records["source_index"])
    assert sorted(source_index.tolist()) == list(range(3000))
    src = datasets.load_dataset(str(sources["cifar"]), split="train")
    assert np.array_equal(np.asarray(src["label"])[source_index], reader.labels)
    starts = np.cumsum([0] + ([200] * 7 + [100]) * 2)[:-1]  # each file's row groups: 1,500 rows, 200 a group
    groups = np.searchsorted(starts, source_index, side="right") - 1
    assert not np.array_equal(np.unique(groups[:400]), [0, 1])  # not the first row groups first
    shards = [groups[k:k + 150] for k in range(0, 3000, 150)]
    spanning = [g for g in shards if len(np.unique(g)) > 1]
    assert len(spanning) >= 8, [len(np.unique(g)) for g in shards]  # 150-row shards over 200-row groups
    # interleaved, not one row group after the other
    assert all(np.sum(np.diff(g) != 0) > 2 * len(np.unique(g)) for g in spanning)
    assert verify(m.root) == []


def test_ray_cli_one_progress_bar_and_the_summary(cluster, sources, shuffled_parquet, tmp_path):
    out = tmp_path / "out"
    r = subprocess.run([*FASTLOAD, "convert", str(sources["cifar"]), "--format", "tfrecord", "--out", str(out),
                        "--engine", "ray", "--address", cluster.address, "--shard-size", "150"],
                       capture_output=True, text=True, cwd=ROOT, timeout=180)
    assert r.returncode == 0, r.stderr[-2000:]
    bars = [line for line in r.stderr.replace("\r", "\n").splitlines() if line.startswith("convert: 100%")]
    assert bars and bars[-1].split("|")[2].strip().startswith("3000/3000"), r.stderr[-1000:]
    assert "; convert 3000 images in" in r.stdout and "wrote" in r.stdout
    assert "ray: 20 tasks on 2 nodes" in r.stdout, r.stdout  # both nodes read their rows where they lie
    assert _files(Manifest.read(out)) == _files(shuffled_parquet)  # the same seeded order, run after run


def _done_shards(out: Path) -> int:
    return len(list((out / ".partial").glob("train-*.json"))) if (out / ".partial").exists() else 0


def test_a_node_killed_mid_run_changes_nothing(cluster, sources, local, tmp_path):
    """A third node takes tasks, and is killed (its raylet and workers, SIGKILL) once shards are
    done: its tasks run again on the others, and the dataset is the local engine's."""
    doomed = cluster.add_node(num_cpus=2, **LOOPBACK)
    cluster.wait_for_nodes()
    out = tmp_path / "out"
    result, error = {}, []

    def run():
        try:
            result["m"] = convert(str(sources["cifar"]), out, format="tfrecord", engine="ray", shard_size=100,
                                  progress=False, **KEEP["cifar"])
        except BaseException as e:  # noqa: BLE001 (raised again below)
            error.append(e)
    thread = threading.Thread(target=run)
    thread.start()
    deadline = time.time() + 120
    while time.time() < deadline and _done_shards(out) < 3:
        time.sleep(0.02)
    assert 3 <= _done_shards(out) < 30, "the kill must land mid-run"
    cluster.remove_node(doomed, allow_graceful=False)
    thread.join(180)
    assert not error, error
    assert _files(result["m"]) == _files(local["cifar", "tfrecord"])
    assert verify(out, decode_images=False) == []  # the same sha256s as the local engine: decoded there


def test_driver_killed_then_the_same_command_resumes(cluster, sources, shuffled_parquet, tmp_path):
    out = tmp_path / "out"
    cmd = [*FASTLOAD, "convert", str(sources["cifar"]), "--format", "tfrecord", "--out", str(out),
           "--engine", "ray", "--address", cluster.address, "--shard-size", "150"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=ROOT, start_new_session=True)
    deadline = time.time() + 120
    while time.time() < deadline and _done_shards(out) < 4:
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    before = _done_shards(out)
    assert 4 <= before < 20, "the kill must land mid-run"
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=180)
    assert r.returncode == 0, r.stderr[-2000:]
    kept = int(r.stdout.split("resuming: ")[1].split(" of ")[0])
    assert kept >= before  # the shards recorded before the kill were not written again
    assert _files(Manifest.read(out)) == _files(shuffled_parquet)
    assert verify(out, decode_images=False) == []  # the same sha256s as a run without a kill: decoded there


def test_a_task_on_a_corrupt_image_fails_as_the_local_engine_does(cluster, tmp_path):
    import datasets
    rng = np.random.default_rng(0)
    images = [{"bytes": jpeg_bytes(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)), "path": None}
              for _ in range(30)]
    images[17] = {"bytes": images[17]["bytes"][:200], "path": None}  # truncated mid-scan
    feats = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=["a", "b"])})
    src = tmp_path / "src"
    datasets.DatasetDict({"train": datasets.Dataset.from_dict({"image": images, "label": [0, 1] * 15},
                                                              features=feats)}).save_to_disk(str(src))
    with pytest.raises(CorruptImageError, match=r"split 'train' index 17: .*--skip-corrupt"):
        convert(str(src), tmp_path / "ray", format="tfrecord", engine="ray", shard_size=8, progress=False)
    m = convert(str(src), tmp_path / "ray", format="tfrecord", engine="ray", shard_size=8, skip_corrupt=True,
                progress=False)
    assert [s["index"] for s in m.split("train").skipped] == [17]
    local = convert(str(src), tmp_path / "local", format="tfrecord", shard_size=8, skip_corrupt=True, progress=False)
    assert _files(m) == _files(local)
    assert sorted(SplitReader(m, "train").records["source_index"].tolist()) == [i for i in range(30) if i != 17]


def test_ray_refuses_what_it_cannot_do_by_name(cluster, sources, tmp_path):
    with pytest.raises(ValueError, match="address=.*engine='ray'"):
        convert(str(sources["cifar"]), tmp_path / "b", format="tfrecord", address="auto", progress=False)
    r = subprocess.run([*FASTLOAD, "convert", str(sources["cifar"]), "--format", "tfrecord", "--out",
                        str(tmp_path / "c"), "--engine", "ray", "--address", "127.0.0.1:1"],
                       capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "Ray cluster" in r.stderr, r.stderr[-1500:]


def test_ray_tasks_upload_their_shards_to_s3_the_manifest_last(cluster, store, sources, local, tmp_path, monkeypatch):
    import uuid
    import s3fs
    for k, v in store.env().items():
        monkeypatch.setenv(k, v)
    monkeypatch.setenv("FASTLOAD_CACHE_DIR", str(tmp_path / "cache"))
    bucket = f"b-{uuid.uuid4().hex[:12]}"
    s3fs.S3FileSystem(skip_instance_cache=True).mkdir(bucket)
    store.clear_log()
    m = convert(str(sources["imagenet"]), f"s3://{bucket}/ray", format="tfrecord", engine="ray", shard_size=100,
                progress=False)
    assert _files(m) == _files(local["imagenet", "tfrecord"])
    puts = [e[1].rsplit("/", 1)[-1] for e in store.log() if e[0] == "PUT" and e[3] == 200 and bucket in e[1]
            and ".fastload-write-check-" not in e[1]]
    assert puts[-1] == "manifest.json" and sorted(puts[:-1]) == sorted(_files(m)), puts  # each file once
    staging = tmp_path / "cache" / "convert"
    assert not any(staging.rglob("*.tfrecord")), "a shard went through the driver's staging directory"
    assert verify(f"s3://{bucket}/ray") == []
