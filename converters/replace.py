"""Replacing a finished dataset without ever losing it (``--overwrite``).

The new dataset is built in a sibling directory, resumable there like any conversion, and only
once it is complete do the two directories trade places in one atomic rename (``renameat2`` with
``RENAME_EXCHANGE``); the old one is then removed. A source that fails, a full disk or a kill -9
at any moment before the exchange leaves the old dataset as it was, loadable; after it, the new
one is in place. What else the directory holds (the user's files, the conversion's lock) is
hard-linked into the new directory before the exchange, so it is there in every state.
"""
from __future__ import annotations

import ctypes
import errno
import os
import shutil
from pathlib import Path

from fastload.formats.manifest import MANIFEST, DatasetError, Manifest

from .jobs import PARTIAL, ConversionError

_AT_FDCWD, _RENAME_EXCHANGE = -100, 2


def staging_dir(out: Path) -> Path:
    """Where an overwrite of ``out`` builds the new dataset."""
    return out.parent / f".{out.name}.fastload-overwrite"


def _carried(out: Path) -> list[Path]:
    """What ``out`` holds besides its dataset (the files its manifest lists, the manifest, the
    conversion's scratch): carried into the new directory."""
    try:
        old = Manifest.read(out)
    except DatasetError as e:  # which files are the dataset's is unknown: nothing is deleted
        raise ConversionError(f"the dataset in {out} cannot be read ({e}): remove it, then convert again") from None
    dataset = {MANIFEST, PARTIAL} | {Path(f["path"]).parts[0] for s in old.split_names for f in old.split(s).files}
    return [entry for entry in out.iterdir() if entry.name not in dataset]


def prepare(out: Path) -> Path:
    """The staging directory for an overwrite of the dataset at ``out``: checked that what else
    ``out`` holds can be carried over (files and symlinks: a directory inside a dataset is
    refused, before any work), and emptied of a finished build left by an interrupted overwrite
    (an unfinished one is resumed there)."""
    stay = [e for e in _carried(out) if not (e.is_symlink() or e.is_file())]
    if stay:
        raise ConversionError(f"{out} holds {[e.name for e in stay][:5]} beside its dataset: --overwrite replaces "
                              "the directory whole and carries over files only; move those out first")
    staging = staging_dir(out)
    if (staging / MANIFEST).exists():
        shutil.rmtree(staging)
    try:
        staging.mkdir(exist_ok=True)
    except OSError as e:
        raise ConversionError(f"cannot create {staging} beside {out} for the new dataset ({e.strerror}): "
                              "--overwrite needs a writable parent directory") from None
    return staging


def swap_in(staging: Path, out: Path) -> None:
    """Make the complete dataset in ``staging`` the one at ``out``, then remove the old one."""
    for entry in _carried(out):
        target = staging / entry.name
        if target.exists() or target.is_symlink():
            target.unlink()
        if entry.is_symlink():
            os.symlink(os.readlink(entry), target)
        else:
            try:
                os.link(entry, target)  # the same file in both directories: never absent from out
            except OSError:
                shutil.copy2(entry, target)
    _fsync_dir(staging)
    _exchange(staging, out)
    _fsync_dir(out.parent)
    shutil.rmtree(staging)  # now the old dataset (and its links to the carried files)


def _exchange(a: Path, b: Path) -> None:
    """Swap two directories in one atomic step; where the filesystem cannot, with two renames (a
    moment without ``b``; a kill inside it leaves both directories intact under their names)."""
    libc = ctypes.CDLL(None, use_errno=True)
    renameat2 = getattr(libc, "renameat2", None)
    if renameat2 is not None:
        if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
            return
        code = ctypes.get_errno()
        if code not in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP):
            raise OSError(code, os.strerror(code), str(b))
    aside = a.with_name(a.name + ".old")
    os.rename(b, aside)
    os.rename(a, b)
    os.rename(aside, a)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)

