"""The dataset contract's errors: one place, so that every layer (the contract, the storage that
fills a dataset, the backends that read it) raises and catches the same types."""
from __future__ import annotations


class DatasetError(ValueError):
    """A dataset directory that is missing, incomplete, or not what the caller asked for."""


class SampleDecodeError(DatasetError):
    """A stored sample that does not decode at load time; names the split, index and data file."""
