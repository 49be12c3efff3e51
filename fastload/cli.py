"""The ``fastload`` command line. Imports nothing heavy until a command runs (``--help`` is instant)."""
from __future__ import annotations

import contextlib
import sys
from typing import NoReturn

import click

from fastload.formats.manifest import STORAGES  # light: the rest loads when a command runs
from fastload.formats.records import DEFAULT_MAX_PIXELS
from fastload.pipelines.registry import backend_names  # names only, no backend imported
from fastload.spec import PRESETS


def _fail(message: str) -> NoReturn:
    click.echo(f"error: {message}", err=True)
    sys.exit(2)


@contextlib.contextmanager
def _conversion_errors(out):
    """A conversion's user errors (convert, demo), each one line."""
    from fastload.converters.convert import ConversionError
    from fastload.converters.images import CorruptImageError
    from fastload.converters.sources import SchemaError
    try:
        yield
    except ConversionError as e:
        _fail(e.cli)
    except (CorruptImageError, SchemaError, ValueError) as e:
        _fail(str(e))
    except OSError as e:  # the environment, not a bug: a read-only or vanished path
        _fail(f"cannot write {e.filename or out} ({e.strerror}): check that --out is on a writable disk "
              "with room, then rerun the same command (finished shards are kept)")


def _cache_dir_option(command):
    """``--cache-dir`` for commands that read a dataset, which may be a URL (fastload.storage)."""
    return click.option("--cache-dir", default=None, type=click.Path(file_okay=False),
                        help="Node-local cache for a dataset given as a URL (default: "
                             "$FASTLOAD_CACHE_DIR, else ~/.cache/fastload).")(command)


class _OneLineErrors(click.Group):
    """click's usage errors (a bad option value, a missing argument) as one line, like fastload's
    own: `error: ...`, the command's --help named, exit code 2."""

    def main(self, args=None, prog_name=None, **extra):
        try:
            code = super().main(args, prog_name, standalone_mode=False, **extra)
        except click.UsageError as e:
            where = e.ctx.command_path if e.ctx else "fastload"
            _fail(f"{e.format_message()} (see {where} --help)")
        except click.ClickException as e:
            _fail(e.format_message())
        except click.exceptions.Abort:
            click.echo("Aborted!", err=True)
            sys.exit(1)
        sys.exit(code if isinstance(code, int) else 0)


@click.group(cls=_OneLineErrors, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="fastload")
def main():
    """fastload: HF image datasets -> FFCV .beton / DALI TFRecord, one spec, one loader."""


@main.command()
@click.argument("source")
@click.option("--format", "fmt", type=click.Choice(STORAGES), required=True,
              help="beton for the ffcv backend, tfrecord for DALI.")
@click.option("--out", required=True, metavar="LOCATION",
              help="Dataset directory to write, or a URL (s3://bucket/prefix, gs://..., hf://...): staged "
                   "locally a few shards at a time, uploaded, the manifest last.")
@click.option("--split", "splits", multiple=True, help="Split(s) to convert (default: all).")
@click.option("--workers", default=None, type=click.IntRange(1),
              help="Worker processes of the local engine (default: every usable core).")
@click.option("--engine", type=click.Choice(["local", "ray"]), default="local", show_default=True,
              help="local: worker processes of this machine. ray: a task per shard on a Ray cluster "
                   "(pip install 'fastload[ray]'); each task reads its rows where they lie and writes its shard "
                   "to --out, which every node must reach (a shared directory, or s3://...).")
@click.option("--address", default=None, metavar="HOST:PORT",
              help="The Ray cluster to run on (default: $RAY_ADDRESS, else a cluster of this machine).")
@click.option("--max-side", type=click.IntRange(16), default=None, help="Downscale images whose longer side exceeds N.")
@click.option("--jpeg-quality", default=90, show_default=True, type=click.IntRange(1, 100),
              help="Quality for images that must be re-encoded (non-RGB, non-JPEG, oversized, rotated).")
@click.option("--skip-corrupt", is_flag=True, help="Skip undecodable images and list them in the manifest.")
@click.option("--label", default=None, help="Label column to train on (default: label / fine_label).")
@click.option("--shard-size", type=click.IntRange(1), default=None, help="Images per shard (default: auto, <= 1024).")
@click.option("--preset", type=click.Choice(sorted(PRESETS)), default=None,
              help="Default spec preset recorded in the manifest (default: guessed from the schema).")
@click.option("--overwrite", is_flag=True, help="Replace a complete dataset already in --out.")
@click.option("--max-pixels", type=click.IntRange(1), default=DEFAULT_MAX_PIXELS, show_default=True,
              help="Refuse source images with more pixels (a decompression-bomb guard); with --max-side, larger "
                   "JPEGs are decoded at a reduced size instead.")
@click.option("--image-codec", type=click.Choice(["auto", "jpeg", "raw"]), default="auto", show_default=True,
              help="How images are stored: auto = raw RGB pixels for small images (longer side <= 64 px), the "
                   "pixels every backend would decode (lossless); JPEG otherwise.")
@click.option("--shuffle-seed", type=int, default=None,
              help="Seed of the random order samples are written in (default: 0; recorded in the manifest). A "
                   "source sorted by class (an image folder) then streams shard-aware as varied as a global shuffle.")
@click.option("--keep-order", is_flag=True,
              help="Write samples in the source's order instead of a seeded random one.")
def convert(source, fmt, out, splits, workers, engine, address, max_side, jpeg_quality, skip_corrupt, label,
            shard_size, preset, overwrite, max_pixels, image_codec, shuffle_seed, keep_order):
    """Convert SOURCE (hub name, parquet folder, save_to_disk folder or image folder). Resumable."""
    from fastload.converters.convert import DEFAULT_SHUFFLE_SEED, convert as run
    import time
    if keep_order and shuffle_seed is not None:
        raise click.UsageError("--keep-order and --shuffle-seed contradict each other: give one")
    shuffle_seed = None if keep_order else DEFAULT_SHUFFLE_SEED if shuffle_seed is None else shuffle_seed
    t0 = time.perf_counter()
    phases = []
    with _conversion_errors(out):
        m = run(source, out, format=fmt, splits=list(splits) or None, workers=workers, max_side=max_side,
                jpeg_quality=jpeg_quality, skip_corrupt=skip_corrupt, label=label, shard_size=shard_size,
                preset=preset, overwrite=overwrite, image_codec=image_codec, phases=phases, max_pixels=max_pixels,
                shuffle_seed=shuffle_seed, engine=engine, address=address)
    dt = time.perf_counter() - t0
    total = sum(m.split(s).num_examples for s in m.split_names)
    for s in m.split_names:
        info = m.split(s)
        click.echo(f"{s}: {info.num_examples} images, {len(info.skipped)} skipped, stats mean={info.stats['mean']} "
                   f"std={info.stats['std']}")
    # the rates the bars showed, phase by phase, then the whole command (opening the source included)
    click.echo(f"wrote {out} ({m.storage}): {total} images in {dt:.1f}s"
               + "".join(f"; {p}" for p in phases))


@main.command()
@click.argument("directory", metavar="LOCATION")
@_cache_dir_option
@click.option("--no-decode", is_flag=True, help="Skip decoding every image (framing, checksums, labels only).")
@click.option("--max-pixels", type=click.IntRange(1), default=DEFAULT_MAX_PIXELS, show_default=True,
              help="Refuse images with more pixels (a decompression-bomb guard).")
def verify(directory, cache_dir, no_decode, max_pixels):
    """Vet a dataset directory, e.g. one from elsewhere, before training on it: every file inside it and
    matching its sha256, the records index in bounds, framing and CRCs, each sample's checksum and
    JPEG header against the index, and (unless --no-decode) a decode of every image."""
    from fastload.verification import verify as run
    problems = run(directory, decode_images=not no_decode, progress=True, max_pixels=max_pixels, cache_dir=cache_dir)
    if problems:
        for p in problems:
            click.echo(f"FAIL {p}", err=True)
        sys.exit(1)
    from fastload.verification import checked
    click.echo(f"OK {directory}: {checked(directory, decode_images=not no_decode, cache_dir=cache_dir)}")


@main.command()
@click.argument("directories", nargs=-1, required=True, metavar="LOCATIONS...")
@_cache_dir_option
@click.option("--split", default="train", show_default=True)
@click.option("--spec", default=None, help="Preset name ('imagenet', 'imagenet:eval'), or a .json/.yaml spec file.")
@click.option("--backend", default="all", show_default=True,
              type=click.Choice(["all", *backend_names()]))
@click.option("--batch-size", default=64, show_default=True, type=click.IntRange(1))
@click.option("--batches", default=None, type=click.IntRange(1), help="Batches per repeat (default: one epoch).")
@click.option("--repeats", default=3, show_default=True, type=click.IntRange(1),
              help="Timed runs of each backend, and of each stage (the median and the best are reported).")
@click.option("--workers", default=None, type=click.IntRange(1), help="Worker threads/processes (default: cores).")
@click.option("--sweep-workers", is_flag=True, help="Try 1..cores workers and report the best.")
@click.option("--device", default="cpu", show_default=True)
@click.option("--consume", "consume_images_per_s", default=None, type=click.FloatRange(min=0.001),
              help="A model's speed in img/s: would this machine feed it? (each backend's loop, with that step time)")
@click.option("--step-ms", default=None, type=click.FloatRange(min=0.0),
              help="The same as a model's step time per batch, in milliseconds.")
@click.option("--json", "json_out", default=None, type=click.Path(dir_okay=False))
@click.option("--plot", default=None, type=click.Path(dir_okay=False))
def bench(directories, cache_dir, split, spec, backend, batch_size, batches, repeats, workers, sweep_workers, device,
          consume_images_per_s, step_ms, json_out, plot):
    """Profile throughput per backend, with a stage breakdown and the machine's decode limit.

    Give a .beton and a TFRecord directory of the same data to compare ffcv and DALI."""
    from fastload.bench import BenchError, run_bench
    try:
        run_bench(list(directories), split=split, spec=_load_spec(spec), backend=backend, batch_size=batch_size,
                  batches=batches, repeats=repeats, workers=workers, sweep_workers=sweep_workers, device=device,
                  json_out=json_out, plot=plot, cache_dir=cache_dir, consume_images_per_s=consume_images_per_s,
                  step_ms=step_ms)
    except BenchError as e:
        _fail(str(e))


@main.command()
@click.argument("directory", metavar="LOCATION")
@_cache_dir_option
@click.option("--split", default="train", show_default=True)
@click.option("--spec", default=None, help="Preset name or .json/.yaml spec file (default: the dataset's preset).")
@click.option("--backend", default="auto", show_default=True, type=click.Choice(["auto", *backend_names()]))
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="PNG file to write.")
@click.option("--n", default=16, show_default=True, type=click.IntRange(1, 256))
@click.option("--seed", default=0, show_default=True)
def inspect(directory, cache_dir, split, spec, backend, out, n, seed):
    """Write a grid of augmented samples with their class names, to check a pipeline by eye."""
    from fastload.inspect_grid import inspect_grid
    from fastload.formats.manifest import DatasetError
    from fastload.pipelines.errors import BackendUnavailable
    try:
        path = inspect_grid(directory, split=split, spec=_load_spec(spec), backend=backend, out=out, n=n, seed=seed,
                            cache_dir=cache_dir)
    except (DatasetError, ValueError, BackendUnavailable) as e:
        _fail(str(e))
    click.echo(f"wrote {path}")


@main.command()
@click.option("--source", default=None, help="Dataset to use (default: the sample shipped in the package).")
@click.option("--out", default="demo-out", show_default=True, type=click.Path(file_okay=False))
@click.option("--workers", default=2, show_default=True, type=click.IntRange(1))
def demo(source, out, workers):
    """Convert a sample to both formats, load it through both backends, print a throughput table."""
    from fastload.demo import run_demo
    with _conversion_errors(out):
        run_demo(source=source, out=out, workers=workers)


def _load_spec(text):
    if text is None:
        return None
    from pathlib import Path
    from fastload.spec import PreprocessSpec
    p = Path(text)
    if p.suffix in (".json", ".yaml", ".yml"):
        if not p.exists():
            _fail(f"spec file {text} does not exist")
        body = p.read_text()
        return PreprocessSpec.from_json(body) if p.suffix == ".json" else PreprocessSpec.from_yaml(body)
    return text


if __name__ == "__main__":
    main()
