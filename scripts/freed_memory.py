"""Benchmarks on a VM whose host takes back the guest's free memory (virtio-balloon free page
reporting): there each new page is faulted in from the host, and a write into new page-cache
pages ran at 150-280 MB/s (4-6 CPU s per GB) against 4.5 GB/s (0.2 s per GB) into pages freed a
moment before. ``--keep-freed-memory`` in ``bench_remote.py`` and ``bench_store_client.py``
measures as on a machine whose free memory stays with it: :func:`keep_freed_memory` has freed
pages reported only after a minute (Linux's page_reporting ``min_free_ms``; root; restored at
exit), and :func:`prime_free_memory` before each measured process frees pages the guest holds.
"""
from __future__ import annotations

import atexit
import os
from pathlib import Path

PAGE_REPORTING = Path("/sys/module/page_reporting/parameters/min_free_ms")


def describe() -> str | None:
    """A line on this machine's free page reporting, or None where it has none."""
    if not PAGE_REPORTING.exists():
        return None
    return (f"this machine returns free memory to its host (free page reporting, after "
            f"{PAGE_REPORTING.read_text().strip()} ms): new pages may be faulted in from it")


def keep_freed_memory() -> None:
    """Freed pages reported after 60 s for the rest of this process (then the setting restored)."""
    if not os.access(PAGE_REPORTING, os.W_OK):
        raise SystemExit(f"--keep-freed-memory needs root and Linux's page_reporting module ({PAGE_REPORTING})")
    was = PAGE_REPORTING.read_text().strip()
    atexit.register(PAGE_REPORTING.write_text, was)  # the machine's setting back, however this ends
    PAGE_REPORTING.write_text("60000")
    print(f"--keep-freed-memory: free pages reported after 60 s for this run (was {was} ms)")


def prime_free_memory(directory: Path, nbytes: int) -> None:
    """Pages the guest holds, freed: a file of ``nbytes`` written, flushed and deleted."""
    buf, path = bytes(8 << 20), Path(directory) / "prime"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        for i in range(-(-nbytes // len(buf))):
            os.pwrite(fd, buf, i * len(buf))
        os.fsync(fd)
    finally:
        os.close(fd)
        path.unlink()
