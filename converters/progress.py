"""Progress bars that also record what they showed, so the closing summary can repeat it.

Every phase of a conversion that handles images gets a bar; each bar records a
:class:`Phase` (images, seconds) when it closes. The bars show the average rate
(``smoothing=0``), the same figure the summary prints: images / seconds of that phase.
"""
from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass


@dataclass(frozen=True)
class Phase:
    name: str
    images: int
    seconds: float

    @property
    def images_per_s(self) -> float:
        return self.images / max(self.seconds, 1e-9)

    def __str__(self) -> str:
        return f"{self.name} {self.images} images in {self.seconds:.1f}s ({self.images_per_s:.0f} images/s)"


class PhaseBars:
    """``with bars.phase("convert", total) as advance: advance(n)``; ``bars.phases`` lists them."""

    def __init__(self, show: bool, phases: list[Phase] | None = None):
        self.show = show
        self.phases = phases if phases is not None else []

    @contextmanager
    def phase(self, name: str, total: int):
        from tqdm.auto import tqdm
        done = 0
        t0 = time.perf_counter()
        with tqdm(total=total, unit="img", desc=name, disable=not self.show, smoothing=0) as bar:
            def advance(n: int) -> None:
                nonlocal done
                done += n
                bar.update(n)
            yield advance
        self.phases.append(Phase(name, done, time.perf_counter() - t0))
