"""kplane.aio.tune_malloc: freed stream-sized buffers are reused instead of page-faulted in anew (glibc only)."""

from __future__ import annotations

import os
import platform
import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt tuning is glibc's")

# A streaming-like workload: buffers of 100 KB to 1.1 MB, four alive at a time; prints the minor page faults.
WORKLOAD = """
import collections, random, resource, sys
from kplane.aio import tune_malloc
print(tune_malloc() if sys.argv[1] == "tune" else "-")
rng = random.Random(1)
q = collections.deque()
f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(2000):
    q.append(bytes(rng.randrange(100_000, 1_100_000)))
    if len(q) > 4:
        q.popleft()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0)
"""


def _run(mode: str, **env: str) -> tuple[str, int]:
    e = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES" and not k.startswith("MALLOC_")}
    out = subprocess.run([sys.executable, "-c", WORKLOAD, mode], env={**e, **env}, capture_output=True, text=True,
                         check=True).stdout.split()
    return out[0], int(out[1])


def test_freed_buffers_are_reused_instead_of_faulted_in_again() -> None:
    _, plain = _run("plain")
    answer, tuned = _run("tune")
    assert answer == "True"
    # each buffer zero-filled from fresh pages is ~25-270 faults; reused heap memory faults only when it grows
    assert tuned * 4 < plain, (tuned, plain)


def test_an_environment_that_tunes_malloc_itself_is_left_alone() -> None:
    answer, _ = _run("tune", GLIBC_TUNABLES="glibc.malloc.trim_threshold=131072")
    assert answer == "False"
    answer, _ = _run("tune", MALLOC_MMAP_THRESHOLD_="131072")
    assert answer == "False"
