"""Where a conversion's shards are written: the engines.

An engine runs :func:`~.shards.write_shard` for each task it is given and hands every
finished shard's :class:`~.shards.ShardResult` to ``finished(task, result)`` on the driver, in
the order they finish; the first error stops it and is raised as the task raised it. Progress
goes to ``advance(images)``.

- :class:`LocalEngine`: worker processes of this machine, forked, so the memory-mapped source
  is inherited rather than pickled.
- :class:`RayEngine` (``fastload[ray]``): one Ray task per shard on a Ray cluster. Each task
  reads its rows where they lie (``source_rows.py``) and writes its shard straight to the
  output: a directory every node shares, or object storage (uploaded from the task's node).
  A task whose node dies runs again elsewhere (Ray's retries; its output is the same bytes).
"""
from __future__ import annotations

import multiprocessing as mp
import os
import queue
import tempfile
import time
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from pathlib import Path

from .jobs import ConversionError, SourcePages, die_with_parent, full_disk_reported
from .shards import ShardResult, write_shard

ENGINES = ("local", "ray")
RAY_TASK_RETRIES = 3  # runs of a task beyond the first after its worker or node died


def usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


# --------------------------------------------------------------------------- local
_WORKER: dict = {}


def _init_worker(source_pages: SourcePages, rows: dict, schema, settings: dict, progress_queue) -> None:
    # fork start: the datasets (memory-mapped Arrow) are inherited, not pickled
    die_with_parent()  # a kill -9 of the job takes its workers with it
    _WORKER.update(source_pages=source_pages, rows=rows, schema=schema, settings=settings, progress=progress_queue)


def _local_shard(task) -> ShardResult:
    try:
        with full_disk_reported(Path(task.path).parent):
            return write_shard(task, _WORKER["rows"][task.split], _WORKER["schema"], _WORKER["settings"],
                               progress=_WORKER["progress"].put)
    finally:
        _WORKER["source_pages"].release()  # the shard's source rows, read: not kept


class LocalEngine:
    def __init__(self, workers: int, source_pages: SourcePages, rows: dict):
        self.workers, self.source_pages, self.rows = workers, source_pages, rows

    def run(self, todo, schema, settings, advance, finished) -> None:
        ctx = mp.get_context("fork")
        progress_queue = ctx.Queue()
        with ProcessPoolExecutor(max_workers=min(self.workers, len(todo)), mp_context=ctx, initializer=_init_worker,
                                 initargs=(self.source_pages, self.rows, schema, settings, progress_queue)) as pool:
            task_of = {pool.submit(_local_shard, t): t for t in todo}
            pending = set(task_of)
            try:
                while pending:
                    done, pending = wait(pending, timeout=0.2, return_when=FIRST_COMPLETED)
                    _drain(progress_queue, advance)
                    for fut in done:
                        finished(task_of[fut], fut.result())  # re-raises a worker's error here
            except BaseException:
                for fut in pending:
                    fut.cancel()
                raise
            _drain(progress_queue, advance)


def _drain(q, advance) -> None:
    while True:
        try:
            advance(q.get_nowait())
        except queue.Empty:
            return


# --------------------------------------------------------------------------- Ray
def import_ray():
    try:
        import ray
    except ImportError:
        raise ConversionError("--engine ray needs Ray: pip install 'fastload[ray]'") from None
    return ray


class _Progress:
    """A Ray actor counting each shard's images done, per attempt: a retried task counts again
    from zero, and the bar shows the furthest attempt of each shard, so nothing counts twice."""

    def __init__(self):
        self.done = {}

    def add(self, shard, attempt, n):
        per = self.done.setdefault(shard, {})
        per[attempt] = per.get(attempt, 0) + n

    def total(self) -> int:
        return sum(max(per.values()) for per in self.done.values())


def _warm_up() -> None:
    import importlib
    for module in ("datasets", "pyarrow.parquet", "fastload.converters.shards", "fastload.converters.source_rows"):
        importlib.import_module(module)


def report_every_s(cpus: int) -> float:
    """How often a task reports its progress: every half second, and less often on a large cluster,
    so that the one counting actor takes at most ~400 reports a second."""
    return max(0.5, cpus / 400)


class _Reporter:
    """A task's progress, sent to the :class:`_Progress` actor at most every ``every_s`` (a remote
    call per few images would cost the task more than its images)."""

    def __init__(self, actor, shard, attempt, every_s: float):
        self.actor, self.shard, self.attempt, self.every_s = actor, shard, attempt, every_s
        self.pending, self.sent = 0, time.monotonic()

    def __call__(self, n: int) -> None:
        self.pending += n
        if time.monotonic() - self.sent >= self.every_s:
            self.flush()

    def flush(self) -> None:
        if self.pending:
            self.actor.add.remote(self.shard, self.attempt, self.pending)
            self.pending, self.sent = 0, time.monotonic()


def _ray_node() -> str:
    import ray
    return ray.get_runtime_context().get_node_id()


_SOURCES: dict = {}  # in a Ray worker: the sources its tasks opened, by key (one conversion's)


def _ray_shard(task, source_key, source_ref, schema, settings, upload_url, progress, report_s) -> ShardResult:
    """One Ray task: ``task``'s rows from ``source``, written to its shared directory, or (with
    ``upload_url``) in a temporary directory of this node and uploaded to the store."""
    attempt = f"{os.uname().nodename}-{os.getpid()}-{time.monotonic_ns()}"
    # fetched once per worker (a reference in a list is not resolved for each task: an image folder's
    # paths would be deserialized again by every task), and what it opened is shared by its tasks
    source = _SOURCES.get(source_key)
    if source is None:
        import ray
        source = _SOURCES.setdefault(source_key, ray.get(source_ref[0]))
    rows = source.rows(task.split, schema.image_column, settings.get("shuffle_seed"))
    report = _Reporter(progress, (task.split, task.shard), attempt, report_s)
    node = _ray_node()
    try:
        if upload_url is None:
            with full_disk_reported(Path(task.path).parent):
                result = write_shard(task, rows, schema, settings, progress=report)
            result.done["node"] = node
            return result
        from fastload.storage.location import Store
        store = Store(upload_url)
        with tempfile.TemporaryDirectory(prefix="fastload-shard-") as tmp:
            result = write_shard(task, rows, schema, settings, progress=report, directory=Path(tmp))
            for name in (result.done["file"]["path"], result.done["index"]["path"]):
                store.put(Path(tmp) / name, name)
        result.done["uploaded"], result.done["node"] = True, node
        return result
    finally:
        report.flush()
        source.release()  # the shard's source rows, read: not kept


def _check_reachable(address: str | None, timeout: float = 5.0) -> None:
    """A cluster address that nothing answers at, refused at once (``ray.init`` retries it for
    minutes). 'auto', None and Ray Client's ray:// addresses are left to Ray."""
    if not address or address == "auto" or "://" in address:
        return
    import socket
    host, _, port = address.rpartition(":")
    try:
        socket.create_connection((host or "127.0.0.1", int(port)), timeout=timeout).close()
    except (OSError, ValueError) as e:
        raise ConversionError(f"cannot connect to the Ray cluster at {address!r} ({e}): start it (ray start --head) "
                              "or pass the address it printed (--address HOST:PORT)") from None


class RayEngine:
    """Shards as Ray tasks (one CPU each) on the cluster at ``address`` (None: ``RAY_ADDRESS``, else
    a cluster of this machine, as ``ray.init()`` does). At most ``in_flight`` tasks are submitted
    ahead (default: twice the cluster's CPUs), so the driver holds a window, not every task."""

    def __init__(self, address: str | None = None, upload_url: str | None = None, in_flight: int | None = None):
        self.ray = import_ray()
        self.source, self.address, self.upload_url, self.in_flight = None, address, upload_url, in_flight
        self.tasks_submitted, self.seconds, self.nodes = 0, 0.0, {}
        ray = self._connect()  # a cluster that is not there is said before any progress bar
        # each worker's imports (datasets, pyarrow: about a second) while the driver opens the source
        self._warming = [ray.remote(num_cpus=1)(_warm_up).remote() for _ in range(self.cpus())]

    def _connect(self):
        ray = self.ray
        if not ray.is_initialized():
            _check_reachable(self.address)
            try:
                ray.init(address=self.address, include_dashboard=False, log_to_driver=True,
                         logging_level="WARNING", configure_logging=True)
            except ConnectionError as e:
                raise ConversionError(f"cannot connect to the Ray cluster at {self.address!r} ({e}): start it "
                                      "(ray start --head) or pass its --address") from None
        return ray

    def cpus(self) -> int:
        return max(1, int(self._connect().cluster_resources().get("CPU", 1)))

    def run(self, todo, schema, settings, advance, finished) -> None:
        ray = self._connect()
        # spread over the nodes: each brings its CPUs, disk and network (Ray's default packs a node first)
        remote = ray.remote(num_cpus=1, max_retries=RAY_TASK_RETRIES, scheduling_strategy="SPREAD")(_ray_shard)
        # on the driver's node: a lost worker node takes tasks with it, never the count
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy
        here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
        progress = ray.remote(num_cpus=0, scheduling_strategy=here)(_Progress).remote()
        source, schema_ref, settings_ref = ray.put(self.source), ray.put(schema), ray.put(settings)
        source_key = f"{os.getpid()}-{time.time_ns()}"  # this run's: a worker never mixes two conversions' sources
        cpus = self.cpus()
        window, report_s = self.in_flight or 2 * cpus, report_every_s(cpus)
        waiting, running, shown, stored = list(todo), {}, 0, 0
        t0 = time.perf_counter()
        try:
            while waiting or running:
                while waiting and len(running) < window:
                    task = waiting.pop(0)
                    running[remote.remote(task, source_key, [source], schema_ref, settings_ref, self.upload_url,
                                                  progress, report_s)] = task
                    self.tasks_submitted += 1
                ready, _ = ray.wait(list(running), num_returns=len(running), timeout=0.2)
                for ref in ready:
                    task = running.pop(ref)
                    result = self._result(ref, task)
                    stored += result.done["count"]
                    self.nodes[result.done["node"]] = self.nodes.get(result.done["node"], 0) + 1
                    finished(task, result)
                shown = self._show(progress, shown, advance)
            if stored > shown:  # the last reports may reach the actor after the last look: the results say
                advance(stored - shown)
        except Exception:
            # no ray.cancel: in Ray 2.60 a cancel that races a task's reply aborts the driver
            # ("Check failed: it != submissible_tasks_.end()", the race of ray#54798; seen here in
            # the corrupt-image test). The tasks in flight, a shard each, finish instead, and those
            # that succeed are recorded for the rerun. (On ^C the driver leaves; Ray ends its tasks.)
            self._finish_in_flight(running, finished)
            raise
        finally:
            ray.kill(progress)
            self.seconds = time.perf_counter() - t0
        print(f"ray: {sum(self.nodes.values())} tasks on {len(self.nodes)} nodes in {self.seconds:.1f}s "
              f"({self.tasks_submitted / max(self.seconds, 1e-9):.1f} tasks/s)")

    def _show(self, progress, shown: int, advance) -> int:
        try:
            total = self.ray.get(progress.total.remote(), timeout=5)
        except (self.ray.exceptions.RayActorError, self.ray.exceptions.GetTimeoutError):
            return shown  # the bar waits for the results' counts; the conversion goes on
        if total > shown:
            advance(total - shown)
        return max(total, shown)

    def _finish_in_flight(self, running: dict, finished) -> None:
        for ref, task in running.items():
            try:
                finished(task, self._result(ref, task))
            except Exception:  # noqa: BLE001 - the first failure is the one raised
                pass

    def _result(self, ref, task) -> ShardResult:
        try:
            result = self.ray.get(ref)
        except self.ray.exceptions.RayTaskError as e:
            cause = getattr(e, "cause", None)
            if isinstance(cause, Exception):
                raise cause from None  # the task's own error, as the local engine raises it
            raise
        if self.upload_url is None:
            path = Path(task.path)
            if not path.exists() or path.stat().st_size != result.done["file"]["size"]:
                raise ConversionError(f"shard {path.name} was written by a Ray task but is not at {path} on the "
                                      "driver's node: --out must be a directory every Ray node shares, or a URL "
                                      "(s3://...)")
        return result
