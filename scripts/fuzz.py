"""Fuzz fastload's readers with damaged and crafted datasets for as long as asked.

    .venv/bin/python scripts/fuzz.py --minutes 5 [--seed N] [--corpus DIR]

Cases are Hypothesis-generated structured mutations of small real datasets (``fastload.testing.fuzzing``
says which), each loaded by every backend in a worker subprocess. Prints the cases run, the
outcomes per backend, and every failing case (crash, hang, unnamed exception, silently different
data), shrunk by Hypothesis to its simplest form; exits 1 if any failed.
"""
from __future__ import annotations

import argparse
import collections
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

from fastload.testing import fuzzing


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=5.0)
    parser.add_argument("--seed", type=int, default=None, help="Hypothesis seed (default: random)")
    parser.add_argument("--corpus", type=Path, default=ROOT / ".cache" / "fuzz-corpus")
    args = parser.parse_args()
    from hypothesis import HealthCheck, given, seed, settings

    corpus = fuzzing.build_corpus(args.corpus)
    runner = fuzzing.Runner(corpus)
    failures, outcomes, stop = [], collections.Counter(), time.monotonic() + 60 * args.minutes

    @settings(max_examples=200, deadline=None, database=None, suppress_health_check=list(HealthCheck))
    @given(fuzzing.strategies())
    def case(c):
        if time.monotonic() > stop:
            return
        result = runner.run(c)
        for backend, outcome in result.outcomes.items():
            outcomes[(c.mutation["kind"], "crafted" if c.crafted else "damage", backend,
                      outcome if outcome in ("same", "error", "different") else "FAIL")] += 1
        if not result.ok:
            raise AssertionError(f"{result.failure}\n  case {c.key()}")

    t0, round_ = time.monotonic(), 0
    try:
        while time.monotonic() < stop and not failures:  # rounds of 200 cases, each from a seed of its own
            try:
                (seed(args.seed + round_)(case) if args.seed is not None else case)()
            except Exception as e:  # noqa: BLE001 - the failure Hypothesis shrank (or its flaky-failure report)
                failures.append(str(e) if isinstance(e, AssertionError) else "\n".join(str(e).splitlines()[-3:]))
            round_ += 1
    finally:
        runner.close()
    print(f"{runner.cases} cases in {time.monotonic() - t0:.0f} s ({runner.crashes} worker crashes or hangs)")
    print(f"{'mutation':<16}{'mode':<9}{'backend':<11}{'outcome':<10}{'count':>7}")
    for key, n in sorted(outcomes.items()):
        print(f"{key[0]:<16}{key[1]:<9}{key[2]:<11}{key[3]:<10}{n:>7}")
    for failure in failures:
        print(f"FAILED (shrunk by Hypothesis) {failure}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
