"""The README and docs/ as a newcomer runs them (#36).

Every ``bash`` and ``python`` block runs as written, in order, README first, in one working
directory that holds what a checkout gives a reader (the bundled sample at ``fastload/sample``,
the ``.venv``), with an S3-protocol server at ``AWS_ENDPOINT_URL`` holding the bucket
``my-bucket``. A block that cannot run here says why in its fence (``bash norun: the Hub...``);
``text`` blocks are output. The Lightning job (``python lightning-job``) is killed with SIGKILL
mid-epoch and restarted: the restarted job's losses are the uninterrupted job's, step for step.
FastLoader's argument table in the README matches its signature.
"""
from __future__ import annotations

import gc
import inspect
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT
from fastload.testing.store_proxy import StoreServers

PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^```(\S*)[ \t]*(.*?)\n(.*?)^```[ \t]*$", re.S | re.M)


def blocks(page: Path) -> list[tuple[str, str, str]]:
    """(language, the rest of the fence's line, code) of each fenced block."""
    return [(m.group(1), m.group(2).strip(), m.group(3)) for m in FENCE.finditer(page.read_text())]


def test_every_block_says_what_it_is():
    for page in PAGES:
        for language, rest, code in blocks(page):
            where = (page.name, code[:60])
            assert language in ("bash", "python", "text"), where
            if rest.startswith("norun"):
                assert re.match(r"norun: \S.{10,}", rest), ("a block that does not run says why", where)
            else:
                assert rest in ("", "lightning-job"), where


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """What a reader of the checkout has: the bundled sample and the venv; nothing else."""
    work = tmp_path_factory.mktemp("reader") / "checkout"
    (work / "fastload").mkdir(parents=True)
    (work / "fastload" / "sample").symlink_to(ROOT / "fastload" / "sample")
    (work / ".venv").symlink_to(Path(sys.executable).parents[1])
    return work


@pytest.fixture(scope="module")
def store_env():
    servers = StoreServers()
    env = servers.env()
    import s3fs
    s3fs.S3FileSystem(client_kwargs={"endpoint_url": env["AWS_ENDPOINT_URL"]}, key=env["AWS_ACCESS_KEY_ID"],
                      secret=env["AWS_SECRET_ACCESS_KEY"]).mkdir("my-bucket")
    yield env
    servers.close()


@pytest.mark.slow
def test_every_example_runs_as_written(workdir, store_env, monkeypatch):
    """Shell blocks in bash; Python blocks in this process, as doctest runs them (each in a fresh
    namespace, in the working directory, with the same environment): torch imported once."""
    env = {**store_env, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
           "FASTLOAD_CACHE_DIR": str(workdir.parent / "cache")}
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    monkeypatch.chdir(workdir)
    ran = 0
    for page in PAGES:
        for language, rest, code in blocks(page):
            if language == "text" or rest:  # output, norun: <why>, the Lightning job (below)
                continue
            if language == "bash":
                p = subprocess.run(["bash", "-euo", "pipefail", "-c", code], cwd=workdir, capture_output=True,
                                   text=True, timeout=300)
                assert p.returncode == 0, (page.name, code, p.stdout[-2000:], p.stderr[-3000:])
            else:
                exec(compile(code, f"{page.name}, block {ran}", "exec"), {"__name__": "__main__"})
                gc.collect()  # the block's loaders, before the next block's
            ran += 1
    assert ran >= 12
    assert (workdir / "grid.png").exists() and (workdir / "bench.json").exists()


LOSS = re.compile(r"^step (\d+) loss (\S+)$", re.M)


@pytest.mark.slow
def test_the_lightning_example_resumes_exactly_after_a_kill(workdir, tmp_path):
    """The README's Lightning job, run whole; then again, killed (SIGKILL) mid-epoch after a
    checkpoint, and restarted as the same command: from its last checkpoint on, the restarted job
    trains on the same batches with the same weights, so every loss equals the whole run's."""
    code = next(c for page in PAGES for _, rest, c in blocks(page) if rest == "lightning-job")
    data = workdir / "data"
    if not (data / "sample-beton").exists():  # the quickstart's conversion (when run alone)
        from fastload import convert
        convert(str(ROOT / "fastload" / "sample" / "imagenet-sample"), data / "sample-beton", format="beton",
                progress=False)
    script = tmp_path / "job.py"
    script.write_text(code)

    def job(directory: Path) -> subprocess.Popen:
        directory.mkdir(exist_ok=True)
        (directory / "data").exists() or (directory / "data").symlink_to(data)
        return subprocess.Popen([sys.executable, str(script)], cwd=directory, stdout=subprocess.PIPE,
                                stderr=subprocess.DEVNULL, text=True)

    whole, killed = job(tmp_path / "whole"), job(tmp_path / "restarted")  # side by side: two cores
    for line in killed.stdout:  # into the second epoch, past a checkpoint: killed at once
        if (m := LOSS.match(line.strip())) and int(m.group(1)) >= 10:
            break
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    losses = dict(LOSS.findall(whole.communicate(timeout=300)[0]))
    assert whole.returncode == 0 and len(losses) == 21, losses  # 29 photos, batches of 4: 7 steps x 3 epochs
    restarted = job(tmp_path / "restarted")
    after = LOSS.findall(restarted.communicate(timeout=300)[0])
    assert restarted.returncode == 0
    first = int(after[0][0])
    assert 0 < first < 14 and first % 7 != 0, after  # resumed mid-epoch, from a checkpoint, not from scratch
    assert [step for step, _ in after] == [str(s) for s in range(first, 21)]
    assert all(losses[step] == loss for step, loss in after), (after, losses)


def test_the_readme_table_of_fastloaders_arguments_is_its_signature():
    from fastload import FastLoader
    text = (ROOT / "README.md").read_text()
    table = text[text.index("## FastLoader's arguments"):text.index("## How-tos")]
    rows = re.findall(r"^\| `(\w+)` \|\s*(.*?)\s*\|", table, re.M)
    signature = [(name, p.default) for name, p in inspect.signature(FastLoader.__init__).parameters.items()
                 if name != "self"]
    assert [name for name, _ in rows] == [name for name, _ in signature]
    for (name, shown), (_, default) in zip(rows, signature):
        expected = "" if default is inspect.Parameter.empty else f"`{default!r}`"
        assert shown == expected, (name, shown, expected)


def _anchors(page: Path) -> set[str]:
    """GitHub's anchors for a page's headings: lowercased, punctuation dropped, spaces as hyphens."""
    heads = re.findall(r"^#+ (.+)$", FENCE.sub("", page.read_text()), re.M)
    return {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-") for h in heads}


def test_every_link_between_pages_resolves():
    for page in PAGES:
        for target in re.findall(r"\]\(([^)\s]+)\)", FENCE.sub("", page.read_text())):
            if re.match(r"\w+://", target):
                continue
            path, _, anchor = target.partition("#")
            linked = (page.parent / path).resolve() if path else page
            assert linked.exists(), (page.name, target)
            if anchor:
                assert anchor in _anchors(linked), (page.name, target, sorted(_anchors(linked)))
