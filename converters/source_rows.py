"""Reading a split's source rows for a shard: the contract between a source and the shard writer.

A :class:`Rows` yields ``(indices, batch)`` pairs for a shard's rows ``start..stop`` of a split
(``batch``: column -> list, images undecoded, as ``datasets`` formats them), in write order.

- :class:`DatasetRows`: a ``datasets`` split, memory-mapped (what the local engine's workers
  inherit, and what a Ray task opens itself for a ``save_to_disk`` folder on a shared disk);
  with ``shuffle_seed`` (the default), its rows in a seeded random permutation.
- :class:`ParquetRows`: parquet files read where they lie (a local or shared disk, ``hf://``,
  ``s3://``, ``gs://``), only the row groups a shard needs: what a Ray task reads, so that no
  image passes through the driver. Resolved on the driver by :func:`parquet_source` from the
  files' footers alone. Parquet is read a row group at a time, so its seeded order permutes the
  row groups, and a shard's rows are its row groups' rows interleaved at random (a row-level
  permutation would read every row group once per shard).

Both give a shard the same rows: ``datasets`` itself formats a parquet split's rows as
``table.to_pydict()`` of the table cast to its features, which is what ``ParquetRows`` returns.
"""
from __future__ import annotations

import hashlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Iterator, Protocol, Sequence

import numpy as np

BATCH = 256  # rows formatted at a time
INTERLEAVED_BATCH = 32  # rows read at a time from each of a shard's row groups, when they are interleaved
READ_BUFFER = 4 << 20  # parquet read through a buffer of this size: pages held, not whole column chunks


class Rows(Protocol):
    def batches(self, start: int, stop: int) -> Iterator[tuple[Sequence[int], dict]]:
        """Rows ``start..stop`` of the split in write order, as (source indices, columns)."""


def write_order(n: int, seed: int | None) -> np.ndarray | None:
    """The source rows (or row groups) in the order they are written: as they are (``seed`` None,
    ``--keep-order``), or a seeded permutation, so that shards of a class-sorted source (an image
    folder) each hold a mix of classes and a shard-aware shuffle draws batches as varied as a
    global one (pipelines/orders.py). ``source_index`` keeps each sample's row in the source."""
    return None if seed is None else np.random.default_rng([int(seed), n]).permutation(n)


def write_order_of(parquet_on_ray: bool, seed: int | None) -> dict:
    """The manifest's ``write_order``: whether and how the rows were shuffled as written."""
    if seed is None:
        return {"shuffled": False, "seed": None, "by": None}
    return {"shuffled": True, "seed": int(seed), "by": "row group" if parquet_on_ray else "row"}


class DatasetRows:
    """A ``datasets`` split's rows, images undecoded (fastload decides passthrough or re-encode)."""

    def __init__(self, ds, image_column: str, shuffle_seed: int | None = None):
        import datasets
        self.ds = ds.cast_column(image_column, datasets.Image(decode=False))
        self.order = write_order(len(ds), shuffle_seed)

    def batches(self, start, stop):
        for offset in range(start, stop, BATCH):
            end = min(stop, offset + BATCH)
            if self.order is None:
                yield range(offset, end), self.ds[offset:end]
            else:  # a seeded random order: its rows, gathered
                indices = self.order[offset:end].tolist()
                yield indices, self.ds[indices]


# --------------------------------------------------------------------------- parquet, where it lies
@dataclass(frozen=True)
class ParquetFile:
    url: str                        # a local path or a URL fsspec opens
    rows: int
    row_groups: tuple[int, ...]     # rows per row group (from the footer)


@dataclass
class ParquetSplit:
    name: str
    files: list[ParquetFile]
    features: object                # datasets.Features

    def __len__(self) -> int:
        return sum(f.rows for f in self.files)

    def first_images(self, image_column: str, n: int = 16) -> list:
        """The first ``n`` image values (what 'auto' decides the codec from)."""
        _, batch = next(ParquetRows(self, image_column).batches(0, min(n, len(self))))
        return batch[image_column]

    def fingerprint(self) -> str:
        """What a resumed job compares: every file's name, rows and row groups (from its footer)."""
        h = hashlib.sha256(self.name.encode())
        for f in self.files:
            h.update(f"{f.url}:{f.rows}:{f.row_groups}".encode())
        return h.hexdigest()


def _open(url: str):
    import fsspec
    return fsspec.open(url, "rb").open()


@dataclass(frozen=True)
class _Piece:
    """Rows ``lo..hi`` of one row group, and the split's index of the group's first row."""
    url: str
    group: int
    first: int
    lo: int
    hi: int


class ParquetRows:
    """Rows of a :class:`ParquetSplit`, read row group by row group (memory: a batch per row group
    being read), in the source's order or (``shuffle_seed``) its row groups permuted."""

    def __init__(self, split: ParquetSplit, image_column: str, shuffle_seed: int | None = None):
        import datasets
        self.split, self.seed = split, shuffle_seed
        features = datasets.Features(split.features)
        features[image_column] = datasets.Image(decode=False)
        self.schema = features.arrow_schema
        # (url, row group, the split's index of its first row, rows), in write order
        groups, first = [], 0
        for ref in split.files:
            for g, n in enumerate(ref.row_groups):
                groups.append((ref.url, g, first, n))
                first += n
        order = write_order(len(groups), shuffle_seed)
        self.groups = groups if order is None else [groups[i] for i in order.tolist()]

    def _pieces(self, start: int, stop: int) -> list[_Piece]:
        """The parts of row groups that positions ``start..stop`` of the write order cover."""
        pieces, at = [], 0
        for url, g, first, n in self.groups:
            lo, hi = max(start, at) - at, min(stop, at + n) - at
            if lo < hi:
                pieces.append(_Piece(url, g, first, lo, hi))
            at += n
            if at >= stop:
                break
        return pieces

    def batches(self, start, stop):
        pieces = self._pieces(start, stop)
        if self.seed is None or len(pieces) < 2:
            for piece in pieces:
                yield from self._read(piece, BATCH)
            return
        # a shard's row groups interleaved at random (seeded by the shard): each row group's
        # rows in order, so each is read once, as a stream
        streams = [_RowStream(self._read(p, INTERLEAVED_BATCH)) for p in pieces]
        take = np.random.default_rng([int(self.seed), start, stop]).permutation(
            np.repeat(np.arange(len(pieces)), [p.hi - p.lo for p in pieces]))
        for offset in range(0, len(take), BATCH):
            rows = [streams[k].next() for k in take[offset:offset + BATCH].tolist()]
            yield [i for i, _ in rows], {c: [r[c] for _, r in rows] for c in rows[0][1]}

    def _read(self, piece: _Piece, batch_size: int):
        """(indices, columns) of ``piece``'s rows, ``batch_size`` at a time."""
        import pyarrow as pa
        import pyarrow.parquet as pq
        from datasets.table import table_cast
        with _open(piece.url) as raw:
            at = 0
            for batch in pq.ParquetFile(raw, buffer_size=READ_BUFFER).iter_batches(
                    batch_size=batch_size, row_groups=[piece.group], use_threads=False):
                s, e = max(piece.lo, at), min(piece.hi, at + batch.num_rows)
                if s < e:
                    table = table_cast(pa.Table.from_batches([batch.slice(s - at, e - s)]), self.schema)
                    yield range(piece.first + s, piece.first + e), table.to_pydict()
                at += batch.num_rows
                if at >= piece.hi:
                    break


class _RowStream:
    """One row at a time, ``(index, {column: value})``, from a stream of (indices, columns) batches."""

    def __init__(self, batches):
        self.batches, self.indices, self.columns, self.at = batches, [], {}, 0

    def next(self) -> tuple[int, dict]:
        while self.at >= len(self.indices):
            self.indices, self.columns = next(self.batches)
            self.at = 0
        i = self.at
        self.at += 1
        return self.indices[i], {c: v[i] for c, v in self.columns.items()}


class ParquetSource:
    """A source whose splits are parquet files: what each Ray task reads where it lies."""

    def __init__(self, splits: dict[str, ParquetSplit]):
        self.splits = splits

    def rows(self, split: str, image_column: str, shuffle_seed=None) -> ParquetRows:
        return ParquetRows(self.splits[split], image_column, shuffle_seed)

    def release(self) -> None:
        pass  # nothing mapped: a batch at a time is read


class ArrowSource:
    """A source ``datasets`` opened by memory map (a ``save_to_disk`` folder, a prepared cache):
    each Ray task maps the same Arrow files, which must lie on a disk every node shares."""

    def __init__(self, files: dict[str, list[str]], infos: dict):
        self.files, self.infos = files, infos
        self._open, self._pages = {}, None

    @classmethod
    def of(cls, data: dict) -> "ArrowSource | InMemorySource":
        """The source Ray tasks read ``data`` (``{split: datasets.Dataset}``) from: its Arrow files,
        or, for a dataset in memory (an image folder's paths, a Dataset passed in), the dataset itself."""
        if not all(ds.cache_files and ds._indices is None for ds in data.values()):
            return InMemorySource(data)
        return cls({s: [f["filename"] for f in ds.cache_files] for s, ds in data.items()},
                   {s: ds.info for s, ds in data.items()})

    def __getstate__(self):
        return {"files": self.files, "infos": self.infos, "_open": {}, "_pages": None}

    def rows(self, split: str, image_column: str, shuffle_seed=None) -> DatasetRows:
        if split not in self._open:
            import datasets
            from .jobs import SourcePages, pages_released_while_opening
            # opening maps 64 KB around every record batch header: 0.8 GB of 1.3 M CIFAR images in
            # each Ray worker (its RSS 1.1 GB), released as the local engine releases it
            with pages_released_while_opening():
                parts = [datasets.Dataset.from_file(f, info=self.infos[split]) for f in self.files[split]]
                ds = parts[0] if len(parts) == 1 else datasets.concatenate_datasets(parts)
                self._open[split] = DatasetRows(ds, image_column, shuffle_seed)
            self._pages = SourcePages({s: r.ds for s, r in self._open.items()})
            self._pages.release()  # what the opening left mapped
        return self._open[split]

    def release(self) -> None:
        """Drop this process's pages of the files read (``jobs.SourcePages``)."""
        if self._pages is not None:
            self._pages.release()


class InMemorySource:
    """Datasets held in memory (an image folder's paths, a ``datasets.Dataset`` passed to convert):
    put in Ray's object store once, as they are; an image folder's files are read by each task
    from the disk every node shares."""

    def __init__(self, data: dict):
        self.data = data
        self._open = {}

    def __getstate__(self):
        return {"data": self.data, "_open": {}}

    def rows(self, split: str, image_column: str, shuffle_seed=None) -> DatasetRows:
        if split not in self._open:
            self._open[split] = DatasetRows(self.data[split], image_column, shuffle_seed)
        return self._open[split]

    def release(self) -> None:
        pass


def parquet_source(source: str, splits: list[str] | None = None) -> dict[str, ParquetSplit] | None:
    """The parquet files of a hub name, a local parquet folder or a URL of one, per split, with
    their features and row counts, read from the files' footers; None when the source is not
    parquet (then ``datasets`` opens it)."""
    import datasets
    try:
        builder = datasets.load_dataset_builder(str(source))
    except Exception:  # not a dataset datasets can resolve: the caller's open reports it
        return None
    if builder.name != "parquet" or not builder.config.data_files:
        return None
    files = {s: [str(f) for f in fs] for s, fs in builder.config.data_files.items()}
    if splits:
        missing = [s for s in splits if s not in files]
        if missing:
            from .sources import SchemaError
            raise SchemaError(f"split(s) {missing} not in source {source!r}: it has {sorted(files)}")
        files = {s: files[s] for s in splits}

    def footer(url: str):
        import pyarrow.parquet as pq
        with _open(url) as raw:
            meta = pq.ParquetFile(raw)
            groups = tuple(meta.metadata.row_group(g).num_rows for g in range(meta.metadata.num_row_groups))
            return ParquetFile(url, meta.metadata.num_rows, groups), meta.schema_arrow
    with ThreadPoolExecutor(16) as pool:  # one footer read per file: a hub split can hold hundreds
        read = {s: list(pool.map(footer, urls)) for s, urls in files.items()}
    out = {}
    for s, items in read.items():
        features = builder.info.features or datasets.Features.from_arrow_schema(items[0][1])
        out[s] = ParquetSplit(s, [ref for ref, _ in items], features)
    return out
