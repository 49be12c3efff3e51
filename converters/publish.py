"""Where a conversion's finished files go.

A local conversion writes them in place (:class:`InPlace`). A conversion to a URL
(``--out s3://bucket/prefix``) runs the same local conversion in a staging directory under the
node's cache and :class:`Upload`\\ s its files: each TFRecord shard (and its DALI index) as soon
as it is complete, then deleted locally, so the staging disk holds a few shards at a time; the
records index and a .beton at the end; the manifest last, so a remote dataset is complete
exactly when its manifest exists. An uploaded shard is recorded beside its done file
(``.partial/<shard>.uploaded``): a conversion killed and run again uploads only what is not.
The bytes are the local conversion's, so the manifest is the same.
"""
from __future__ import annotations

import json
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from fastload.formats.manifest import MANIFEST, Manifest
from fastload.formats.writing import atomic_write_bytes
from fastload.storage.cache import default_cache_dir
from fastload.storage.location import Store, cache_name, is_url, local_path

from .jobs import ConversionError

UPLOADERS = 4  # shards uploaded at once, beside the conversion's workers


class InPlace:
    """A local conversion: files are final where they are written."""
    staging = None

    def shard_kept(self, task) -> bool:
        return Path(task.path).exists()

    def finished_staging(self, source: str, storage: str) -> Manifest | None:
        return None

    def shard_finished(self, task) -> None:
        pass

    def publish(self, manifest: Manifest) -> Manifest:
        return manifest

    def close(self) -> None:
        pass


class Upload:
    """A conversion to ``url``, staged in ``staging`` (default: under the node's cache)."""

    def __init__(self, url: str, staging: Path | None = None):
        self.url = url.rstrip("/")
        self.store = Store(self.url)
        self.store.check_writable()  # a missing bucket or a refused write: said before converting
        if self.store.exists(MANIFEST):
            raise ConversionError(f"{self.url} already holds a complete dataset ({MANIFEST} exists). Object storage has "
                                  "no atomic replace, so fastload does not overwrite there: remove that prefix first, "
                                  "or convert to another one")
        self.staging = Path(staging) if staging else default_cache_dir() / "convert" / cache_name(self.url)
        self.pool = ThreadPoolExecutor(UPLOADERS, thread_name_prefix="fastload-upload")
        self.pending = []

    def finished_staging(self, source: str, storage: str) -> Manifest | None:
        """A staged conversion of the same source that was complete when the job died: published
        now (what was uploaded is uploaded again only if it was not recorded). Another one's
        staging is cleared."""
        if not (self.staging / MANIFEST).exists():
            return None
        from .jobs import OutputLock
        with OutputLock(self.staging):
            staged = Manifest.read(self.staging)
            if staged.data["source"]["name"] == source and staged.storage == storage:
                try:
                    return self.publish(staged)
                finally:
                    self.close()
            shutil.rmtree(self.staging)
        return None

    @staticmethod
    def _marker(task) -> Path:
        return Path(task.done_path).with_suffix(".uploaded")

    def shard_kept(self, task) -> bool:
        return self._marker(task).exists() or Path(task.path).exists()

    def shard_finished(self, task) -> None:
        """Upload a finished TFRecord shard and its index, then drop the local copies."""
        if Path(task.path).parent != self.staging or self._marker(task).exists():
            return  # a .beton's staged shard (in .partial): assembled locally first
        done = json.loads(Path(task.done_path).read_text())
        if done.get("uploaded"):  # by its Ray task, from that task's node: recorded only
            atomic_write_bytes(self._marker(task), json.dumps(done["file"]).encode(), durable=False)
            return
        self.pending.append(self.pool.submit(self._upload_shard, task))
        self._raise_finished()

    def _upload_shard(self, task) -> None:
        done = json.loads(Path(task.done_path).read_text())
        for path in (Path(task.path), Path(task.path).with_suffix(".idx")):
            self.store.put(path, path.name)
        atomic_write_bytes(self._marker(task), json.dumps(done["file"]).encode(), durable=False)
        for path in (Path(task.path), Path(task.path).with_suffix(".idx")):
            path.unlink(missing_ok=True)

    def _raise_finished(self) -> None:
        still = []
        for fut in self.pending:
            if fut.done():
                fut.result()  # an upload's error, here
            else:
                still.append(fut)
        self.pending = still

    def publish(self, manifest: Manifest) -> Manifest:
        """Every file not yet uploaded, then the manifest: the dataset exists from that moment."""
        for fut in self.pending:
            fut.result()
        self.pending = []
        for split in manifest.split_names:
            for f in manifest.split(split).files:
                local = manifest.root / f["path"]
                if local.exists():
                    self.store.put(local, f["path"])
        self.store.put(manifest.root / MANIFEST, MANIFEST)
        shutil.rmtree(self.staging, ignore_errors=True)  # published: the staging copy has done its job
        return Manifest(manifest.root, manifest.data, location=self.url)

    def close(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)


def output_for(out) -> tuple[Path, InPlace | Upload]:
    """(the local directory the conversion writes, what publishes it) for ``--out``."""
    if is_url(out):
        upload = Upload(out)
        return upload.staging, upload
    return local_path(out), InPlace()

