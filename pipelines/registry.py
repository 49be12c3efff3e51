"""The one list of backends: FastLoader, ``fastload bench``, the CLI and the scripts read it.

Built-in backends are named by import path, so listing them (``--help``, choices) imports no
ffcv, DALI or numba; a backend's module loads when it is first used.
"""
from __future__ import annotations

import importlib
import importlib.util
from dataclasses import dataclass
from typing import Callable

from fastload.formats.manifest import STORAGE_NAMES, DatasetError

from .errors import BackendUnavailable


@dataclass(frozen=True)
class BackendEntry:
    name: str
    storages: tuple[str, ...]     # what it reads; the first backend listed for a storage is its default
    target: str | Callable        # a Backend subclass or factory (reader, spec, options), or its 'module:name'
    requires: tuple[str, ...] = ()  # modules it imports, some only as it starts (DALI)...
    extra: str | None = None      # ...and the pip extra that brings them

    def load(self) -> Callable:
        """The backend's class or factory; BackendUnavailable (one line) where what it needs is
        missing here: checked before anything is built."""
        for module in self.requires:
            try:
                found = importlib.util.find_spec(module) is not None
            except ImportError:  # a parent package missing
                found = False
            if not found:
                raise BackendUnavailable(f"backend={self.name!r} needs {module}, which is not installed: "
                                         f"pip install 'fastload[{self.extra}]'")
        if not isinstance(self.target, str):
            return self.target
        module, _, cls = self.target.partition(":")
        try:
            return getattr(importlib.import_module(module), cls)
        except BackendUnavailable:
            raise
        except ImportError as e:
            if isinstance(e, ModuleNotFoundError) and (e.name or "").startswith("fastload"):
                raise  # fastload's own module missing: a broken install, a bug to see whole
            raise BackendUnavailable(f"backend={self.name!r} cannot load: {e}") from None


_REGISTRY: dict[str, BackendEntry] = {}


def register_backend(name: str, storages, target, requires=(), extra: str | None = None) -> None:
    """Add (or replace) a backend: ``target`` is a :class:`~fastload.pipelines.base.Backend`
    subclass, or a function ``(reader, spec, options) -> Backend``, or its 'module:name' path;
    ``requires``, modules it needs, and ``extra``, the pip extra that installs them (both named
    in the error where one is missing)."""
    if name == "auto":
        raise ValueError("backend name 'auto' is reserved (it picks the storage's default)")
    _REGISTRY[name] = BackendEntry(name, tuple(storages), target, tuple(requires), extra)


register_backend("ffcv", ("beton",), "fastload.pipelines.ffcv:FFCVBackend", requires=("numba",), extra="ffcv")
register_backend("dali", ("tfrecord",), "fastload.pipelines.dali:dali_backend", requires=("nvidia.dali",),
                 extra="dali")
register_backend("reference", ("beton", "tfrecord"), "fastload.pipelines.reference:ReferenceBackend")


def backend_names() -> tuple[str, ...]:
    return tuple(_REGISTRY)


def entry(name: str) -> BackendEntry:
    if name not in _REGISTRY:
        raise ValueError(f"backend={name!r} is invalid: allowed 'auto' or one of {backend_names()}")
    return _REGISTRY[name]


def backends_for(storage: str) -> tuple[str, ...]:
    return tuple(n for n, e in _REGISTRY.items() if storage in e.storages)


def resolve_backend(name: str, storage: str, root) -> BackendEntry:
    """The entry for ``name`` ('auto': the storage's default), checked against the storage."""
    if name == "auto":
        names = backends_for(storage)
        if not names:
            raise DatasetError(f"no backend reads storage {storage!r} ({root})")
        return _REGISTRY[names[0]]
    e = entry(name)
    if storage not in e.storages:
        readers = ", ".join(f"backend={n!r}" for n in backends_for(storage)) or "none"
        wanted = " or ".join(STORAGE_NAMES.get(s, s) for s in e.storages)
        raise DatasetError(f"backend={name!r} needs a {wanted} dataset; {root} was converted to "
                           f"{storage!r} (use {readers} or 'auto', or convert with --format {e.storages[0]})")
    return e
