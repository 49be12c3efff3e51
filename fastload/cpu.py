"""CPU time of this process and its workers, and the cores it may use: what ``fastload bench``
and the loader's own meter (stats.py) measure the input pipeline's work with."""
from __future__ import annotations

import glob
import os
import resource


def cpu_seconds() -> float:
    """CPU time of this process (every thread), its finished children, and its live descendants
    (persistent DataLoader workers are not in RUSAGE_CHILDREN until they exit)."""
    s, c = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return s.ru_utime + s.ru_stime + c.ru_utime + c.ru_stime + live_descendants_cpu()


def live_descendants_cpu() -> float:
    tick = os.sysconf("SC_CLK_TCK")
    total, todo, seen = 0.0, [os.getpid()], set()
    while todo:
        pid = todo.pop()
        for children in glob.glob(f"/proc/{pid}/task/*/children"):
            try:
                kids = [int(k) for k in open(children).read().split()]
            except OSError:
                continue
            for kid in kids:
                if kid in seen:
                    continue
                seen.add(kid)
                todo.append(kid)
                try:
                    fields = open(f"/proc/{kid}/stat").read().rsplit(")", 1)[1].split()
                    total += (int(fields[11]) + int(fields[12])) / tick  # utime, stime
                except (OSError, IndexError, ValueError):
                    pass
    return total


def usable_cores() -> int:
    """The cores this process may run on (its affinity: a container's or a launcher's share)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1
