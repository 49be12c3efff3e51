"""``fastload bench``: where the time goes, per backend, on the user's own data.

Each backend runs in a child process of its own (its own peak RSS, JIT and pipeline start-up):
- throughput of the full FastLoader (warm-up epoch excluded; median/min/max of repeats),
  CPU seconds per image, peak RSS, time to first batch;
- a stage breakdown from truncated pipelines over the same samples: read (JPEG bytes
  only), decode (+ a crop, no resampling), decode + geometry, full (batch ops, collate,
  transfer). Each stage's cost is a difference of measured rates;
- the machine's limit on these images: single-core libjpeg-turbo full decode x cores;
- the baseline a user would otherwise run: the reference backend (PIL + torch DataLoader).
"""
from __future__ import annotations

import json
import multiprocessing as mp
import os
import resource
import statistics
import time
from pathlib import Path

import numpy as np

from .cpu import cpu_seconds as _cpu_seconds
from .formats.manifest import DatasetError
from .storage import open_dataset
from .formats.records import SplitReader

STAGES = ("read", "decode", "geometry", "batch_ops")


class BenchError(ValueError):
    """Bad bench arguments or data: names the problem."""


def _peak_rss_mb() -> float:
    s, c = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return max(s.ru_maxrss, c.ru_maxrss) / 1024.0  # Linux reports KiB


def decode_limit(reader: SplitReader, max_images: int = 128) -> dict:
    """Single-core libjpeg-turbo full-decode rate on these images, and that times the cores (raw
    storage: the rate of copying the pixels out, the least any loader does with them)."""
    n = min(len(reader), max_images)
    if reader.codec == "raw":
        def decode(i):
            np.array(reader.pixels(i))
        decoder = "raw pixels, copied"
    else:
        jpegs = [np.array(reader.stored(i)) for i in range(n)]  # in memory: the rate is decode alone
        sizes = [(int(reader.records[i]["height"]), int(reader.records[i]["width"])) for i in range(n)]
        try:
            from .pipelines.jpeg import thread_decoder
            region = thread_decoder()

            def decode(i):
                h, w = sizes[i]
                region.decode(jpegs[i], h, w, 0, h, 0, w)
            decoder = "libjpeg-turbo full decode, accurate DCT"
        except ImportError:
            import io
            from PIL import Image

            def decode(i):
                Image.open(io.BytesIO(jpegs[i].tobytes())).convert("RGB").load()
            decoder = "PIL"
    for i in range(min(n, 8)):
        decode(i)
    t0 = time.perf_counter()
    for i in range(n):
        decode(i)
    per_core = n / (time.perf_counter() - t0)
    cores = os.cpu_count() or 1
    return {"decoder": decoder, "images": n, "per_core_images_per_s": per_core, "cores": cores,
            "limit_images_per_s": per_core * cores}


# --------------------------------------------------------------------------- one backend (child process)
def _endless(loader):
    while True:
        yield from loader


def _measure_backend(directory, split, spec, entry, batch_size, batches, repeats, workers, device,
                     cache_dir=None, step_s=None) -> dict:
    import torch
    from .loader import FastLoader
    from .pipelines import registry
    registry.register_backend(**vars(entry))  # as registered in the parent
    backend = entry.name
    t0 = time.perf_counter()
    loader = FastLoader(directory, split, batch_size=batch_size, spec=spec, backend=backend, device=device,
                        num_workers=workers, drop_last=False, order="random", distributed=False, cache_dir=cache_dir)
    per_repeat = batches or len(loader)
    stream = _endless(loader)
    first = next(stream)
    ttfb = time.perf_counter() - t0
    # warm-up: at least an epoch and a second (compile, caches, worker processes settle; a small
    # dataset's epoch alone measured start-up noise: 2x off on a cold machine)
    warm, t_warm = 1, time.perf_counter()
    while warm < len(loader) or time.perf_counter() - t_warm < 1.0:
        next(stream)
        warm += 1
    rates, cpu = [], []
    for _ in range(repeats):
        c0, t1, n = _cpu_seconds(), time.perf_counter(), 0
        for _ in range(per_repeat):
            images, _labels = next(stream)
            n += images.shape[0]
        if images.device.type == "cuda":
            torch.cuda.synchronize()
        dt = time.perf_counter() - t1
        rates.append(n / dt)
        cpu.append((_cpu_seconds() - c0) / n)
    del first
    stream.close()  # its epoch ends here: a live one would make every later epoch a second iterator's
    stages = _stage_breakdown(loader, repeats)  # --repeats sets the stages' best-of too
    return {"backend": backend, "workers": workers, "batch_size": batch_size, "images_per_repeat": n,
            "images_per_s": {"median": statistics.median(rates), "min": min(rates), "max": max(rates),
                             "all": rates},
            "cpu_s_per_image": statistics.median(cpu), "time_to_first_batch_s": ttfb,
            "peak_rss_mb": _peak_rss_mb(), "stages": stages,
            "consume": None if step_s is None else consume(loader, step_s, per_repeat)}


def consume(loader, step_s: float, batches: int, min_seconds: float = 2.0) -> dict:
    """Epochs taken by a model whose step lasts ``step_s`` (a sleep: the cores stay the loader's,
    as on a GPU), at least ``batches`` batches and ``min_seconds``, then the loader's own account
    of that loop (FastLoader.stats, the epochs combined)."""
    from .stats import LoaderStats
    epochs, t0 = [], time.perf_counter()
    while not epochs or sum(e.batches for e in epochs) < batches or time.perf_counter() - t0 < min_seconds:
        loader.set_epoch(loader.epoch + 1)
        for _ in loader:
            time.sleep(step_s)
        epochs.append(loader.stats())
    s = LoaderStats.combine(epochs)
    return {"step_ms": step_s * 1e3, "model_images_per_s": loader.batch_size / step_s,
            "wait_fraction": s.wait_fraction, "images_per_s": s.images_per_s, "fed": s.wait_fraction < 0.10,
            "verdict": s.verdict}


def timed_epochs(make_iter, epochs: int = 1, min_seconds: float = 0.0) -> tuple[float, int]:
    """(seconds, images) of at least ``epochs`` whole epochs of ``make_iter()``, continuing until
    ``min_seconds`` have passed (small datasets would otherwise time mostly the epoch start)."""
    t0, n, done = time.perf_counter(), 0, 0
    while True:
        for images, _ in make_iter():
            n += images.shape[0]
        done += 1
        if done >= epochs and time.perf_counter() - t0 >= min_seconds:
            return time.perf_counter() - t0, n


def _stage_breakdown(loader, repeats: int = 3) -> dict:
    """ms per image of each stage, from truncated pipelines over the same order (each timed for at
    least 0.3 s, interleaved, best of ``repeats`` as ``timeit`` takes it: noise on a shared machine
    only ever adds time): read (touch the JPEG bytes), decode (the
    backend's ``decode_stage``: decode, cut the window), geometry (the backend: + resample, flip,
    fused normalization), batch ops (the full FastLoader: + labels, augmentations, transfer).

    Stages are differences of cumulative times. Each cumulative time is capped by the full
    pipeline's and is at least the previous one's, so stages are >= 0 and add up to the full
    pipeline; a stage that measured below 0 is reported as 0 and named in ``notes`` (its work is
    fused into the stage before it, or smaller than the timing noise)."""
    order, params = loader.epoch_plan(loader.epoch)
    reader = loader.reader
    decode_stage = loader.pipeline.decode_stage()

    def read():
        total = 0
        for i in order:
            total += int(reader.stored(int(i)).sum(dtype=np.uint64) & 1)  # touch every byte
        yield np.zeros((len(order), 1)), None

    runs = {"read": read, "decode": lambda: decode_stage.run_epoch(order, params),
            "geometry": lambda: loader.pipeline.run_epoch(order, params), "batch_ops": lambda: iter(loader)}
    for make in runs.values():
        timed_epochs(make)  # warm-up: pipeline builds, caches
    seconds = {name: [] for name in runs}
    for _ in range(repeats):
        for name, make in runs.items():
            dt, n = timed_epochs(make, min_seconds=0.3)
            seconds[name].append(dt / n)
    decode_stage.close()
    measured = {name: min(v) for name, v in seconds.items()}
    full = measured["batch_ops"]
    cumulative, notes, previous = {}, [], 0.0
    for name in STAGES:
        t = max(previous, min(measured[name], full))
        if measured[name] < previous:
            notes.append(f"{name} measured below the stage before it: reported as 0 ms "
                         "(fused into it, or within the timing noise)")
        cumulative[name], previous = t, t
    ms, previous = {}, 0.0
    for name in STAGES:
        ms[name] = (cumulative[name] - previous) * 1e3
        previous = cumulative[name]
    return {"ms_per_image": ms, "full_ms_per_image": full * 1e3, "notes": notes,
            "measured_ms_per_image": {k: v * 1e3 for k, v in measured.items()},
            "rates": {"decode": 1 / measured["decode"], "decode+geometry": 1 / measured["geometry"],
                      "full": 1 / full}}


def _call_into_queue(queue, fn, args):
    try:
        queue.put(("ok", fn(*args)))
    except BaseException as e:  # report, never leave the parent waiting
        queue.put(("error", f"{type(e).__name__}: {e}"))


def run_in_process(fn, *args, context: str = "spawn"):
    """``fn(*args)`` in a child process of its own; its result, or RuntimeError with its error.

    spawn by default: a fork of a process whose ffcv/DALI/TBB threads hold locks can deadlock
    (callers need an ``if __name__ == "__main__":`` guard). fork suits a parent with no loader."""
    ctx = mp.get_context(context)
    q = ctx.Queue()
    p = ctx.Process(target=_call_into_queue, args=(q, fn, args))
    p.start()
    status, payload = q.get()
    p.join()
    if status == "error":
        raise RuntimeError(payload)
    return payload


# --------------------------------------------------------------------------- driver
def run_bench(directories, split="train", spec=None, backend="all", batch_size=64, batches=None, repeats=3,
              workers=None, sweep_workers=False, device="cpu", json_out=None, plot=None, progress=True,
              echo=print, cache_dir=None, consume_images_per_s=None, step_ms=None) -> dict:
    from tqdm.auto import tqdm
    from .pipelines import registry
    from .spec import resolve_spec
    if isinstance(directories, (str, os.PathLike)):
        directories = [directories]
    if consume_images_per_s is not None and step_ms is not None:
        raise BenchError("give --consume IMG_PER_S or --step-ms, not both")
    step_s = (batch_size / consume_images_per_s if consume_images_per_s else
              step_ms / 1e3 if step_ms is not None else None)
    if backend != "all" and backend not in registry.backend_names():
        raise BenchError(f"backend={backend!r} is unknown: allowed 'all' or one of {registry.backend_names()}")
    from .arguments import resolve_device
    try:
        resolve_device(device)  # a bad device fails here, not in every backend's process
    except (ValueError, RuntimeError) as e:
        raise BenchError(f"--device: {e}") from None
    readers = {}
    for d in directories:
        try:
            m = open_dataset(d, cache_dir=cache_dir)
            readers[d] = SplitReader(m, split)
            resolve_spec(spec, m.preset, train=split == "train")  # a bad spec fails here, before any backend
        except (DatasetError, ValueError) as e:
            raise BenchError(str(e)) from None
    plan = []  # (directory, backend): each backend once, on the first directory it reads
    for d, r in readers.items():
        for b in registry.backends_for(r.manifest.storage):
            if (backend == "all" or backend == b) and not any(b == pb for _, pb in plan):
                plan.append((d, b))
    if not plan:
        stores = {str(d): r.manifest.storage for d, r in readers.items()}
        reads = {b: registry.entry(b).storages for b in registry.backend_names()}
        raise BenchError(f"backend {backend!r} cannot read {stores}: backends read {reads}")
    cores = os.cpu_count() or 1
    worker_list = sorted({1, max(1, cores // 2), cores}) if sweep_workers else [workers or cores]
    runs = []
    bar = tqdm(total=len(plan) * len(worker_list), desc="bench", unit="run", disable=not progress)
    for d, b in plan:
        for w in worker_list:
            bar.set_postfix_str(f"{b} x{w}")
            try:
                runs.append(run_in_process(_measure_backend, d, split, spec, registry.entry(b), batch_size, batches,
                                           repeats, w, device, cache_dir, step_s))
            except RuntimeError as e:
                bar.close()  # before the error's line, not around it
                raise BenchError(f"backend {b!r} failed: {e}") from None
            bar.update(1)
    bar.close()
    best = {}
    for r in runs:
        if r["backend"] not in best or r["images_per_s"]["median"] > best[r["backend"]]["images_per_s"]["median"]:
            best[r["backend"]] = r
    limit = decode_limit(next(iter(readers.values())))
    baseline = best.get("reference")
    for r in best.values():
        r["fraction_of_decode_limit"] = r["images_per_s"]["median"] / limit["limit_images_per_s"]
        r["speedup_vs_reference"] = (r["images_per_s"]["median"] / baseline["images_per_s"]["median"]
                                     if baseline else None)
    first = next(iter(readers.values()))
    report = {"format": "fastload-bench/1", "split": split, "spec": str(spec or first.manifest.preset),
              "images": len(first), "batch_size": batch_size, "device": device, "decode_limit": limit,
              "results": list(best.values()), "sweep": runs if sweep_workers else None}
    echo(format_table(report))
    if json_out:
        Path(json_out).write_text(json.dumps(report, indent=2))
    if plot:
        plot_report(report, plot)
    return report


def format_table(report: dict) -> str:
    lim = report["decode_limit"]
    lines = [f"split {report['split']!r}, {report['images']} images, batch {report['batch_size']}, "
             f"device {report['device']}; decode limit {lim['limit_images_per_s']:.0f} img/s "
             f"({lim['per_core_images_per_s']:.0f}/core x {lim['cores']}, {lim['decoder']})",
             f"{'backend':<10}{'workers':>8}{'img/s':>9}{'min':>8}{'max':>8}{'cpu ms/img':>12}{'rss MB':>9}"
             f"{'1st batch s':>12}{'% limit':>9}{'vs ref':>8}   stage ms/img: "
             + " / ".join(STAGES)]
    for r in report["results"]:
        ips = r["images_per_s"]
        st = r["stages"]["ms_per_image"]
        sp = r["speedup_vs_reference"]
        lines.append(f"{r['backend']:<10}{r['workers']:>8}{ips['median']:>9.0f}{ips['min']:>8.0f}{ips['max']:>8.0f}"
                     f"{r['cpu_s_per_image'] * 1e3:>12.2f}{r['peak_rss_mb']:>9.0f}{r['time_to_first_batch_s']:>12.1f}"
                     f"{100 * r['fraction_of_decode_limit']:>8.0f}%{(f'{sp:.2f}x' if sp else '-'):>8}   "
                     + " / ".join(f"{st[s]:.2f}" for s in STAGES))
    for r in report["results"]:
        for note in r["stages"].get("notes", []):
            lines.append(f"  note ({r['backend']}): {note}")
    for r in report["results"]:
        c = r.get("consume")
        if c:
            fed = "fed" if c["fed"] else "NOT fed"
            lines.append(f"a model of {c['model_images_per_s']:,.0f} img/s (a {c['step_ms']:.0f} ms step), "
                         f"{r['backend']}: {fed}, it would wait {c['wait_fraction']:.0%} of the time and run at "
                         f"{c['images_per_s']:,.0f} img/s. {c['verdict']}")
    return "\n".join(lines)


def plot_report(report: dict, path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    results = report["results"]
    names = [r["backend"] for r in results]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4), dpi=100)
    med = [r["images_per_s"]["median"] for r in results]
    err = [[m - r["images_per_s"]["min"] for m, r in zip(med, results)],
           [r["images_per_s"]["max"] - m for m, r in zip(med, results)]]
    ax1.bar(names, med, yerr=err, color="#4C72B0")
    ax1.axhline(report["decode_limit"]["limit_images_per_s"], color="#C44E52", ls="--", label="decode limit")
    ax1.set_ylabel("images / s")
    ax1.set_title("throughput")
    ax1.legend()
    bottom = np.zeros(len(results))
    for stage in STAGES:
        vals = np.array([r["stages"]["ms_per_image"][stage] for r in results])  # >= 0, add up to full
        ax2.bar(names, vals, bottom=bottom, label=stage)
        bottom += vals
    ax2.set_ylabel("ms / image (wall, at the run's parallelism)")
    ax2.set_title("where the time goes")
    ax2.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
