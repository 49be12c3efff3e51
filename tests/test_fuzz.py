"""The dataset fuzzer (fastload.testing.fuzzing) in the suite: 150 structured mutations of real
converted datasets, both storages, every backend, each case in a worker subprocess so that a crash
is seen as a crash. Derandomized here (the same cases every run); ``scripts/fuzz.py --minutes N``
runs new ones for as long as asked. Every failure the fuzzer found is an ``@example`` below."""
from __future__ import annotations

import pytest

from fastload.testing import fuzzing
from conftest import needs_shared

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, example, given, settings  # noqa: E402

CASES = 150  # in make test; scripts/fuzz.py --minutes N runs as many new ones as asked


@pytest.fixture(scope="module")
def runner(tmp_path_factory):
    r = fuzzing.Runner(fuzzing.build_corpus(tmp_path_factory.mktemp("fuzz-corpus")))
    yield r
    r.close()


def _case(dataset, crafted=False, **mutation):
    return fuzzing.Case(dataset=dataset, mutation=mutation, crafted=crafted)


@needs_shared
@pytest.mark.slow
@settings(max_examples=CASES, deadline=None, database=None, derandomize=True,
          suppress_health_check=list(HealthCheck))
@given(case=fuzzing.strategies())
# found by the fuzzer, kept: numpy's .npy header parser raised tokenize.TokenError for a damaged header
@example(case=_case("cifar-beton", kind="records_bytes", at=0.15625, bit=0, truncate=False))
# a manifest path of 300 characters: ENAMETOOLONG from the file system, not a DatasetError
@example(case=_case("photos-beton", True, kind="manifest", path=84, value=13, delete=False))
# a crafted manifest without stats, read by normalize='dataset' (cifar's preset): a ValueError
@example(case=_case("cifar-beton", True, kind="manifest", path=33, value=0, delete=True))
# a crafted manifest without a preset: another preset's shape, well-formed (not 'malformed')
@example(case=_case("cifar-tfrecord", True, kind="manifest", path=5, value=3, delete=True))
def test_damaged_and_crafted_datasets_end_in_data_or_a_named_error(runner, case):
    result = runner.run(case)
    assert result.ok, f"{result.failure}\n  case {case.key()}"


@needs_shared
@pytest.mark.slow
def test_the_fuzzer_ran_its_cases(runner):
    """(After the test above, in this module's order.) Every case went to the worker."""
    assert runner.cases >= CASES, runner.cases
