"""Many runs, concurrent runs and huge outputs: no fd, zombie or memory growth.

Resource counts are taken from /proc/self (fds) and from this process's children
(zombies); peak memory is measured in a fresh child Python that reports its own
ru_maxrss, so pytest's own allocations do not blur the number.
"""

from __future__ import annotations

import gc
import json
import threading
import time
import tracemalloc
from pathlib import Path

from helpers_proc import (
    child_env,
    descendants,
    fd_targets,
    open_fds,
    payload,
    pid_alive,
    py,
    write_payload,
    zombie_children,
)
from retest.proc_group import run


def assert_no_growth(fds_before: set[int]) -> None:
    fds_after = open_fds()
    assert fds_after == fds_before, f"fds leaked: {fd_targets(sorted(fds_after - fds_before))}"
    assert zombie_children() == []
    assert [p for p in descendants() if pid_alive(p)] == []


# ----------------------------------------------------------------------------- hundreds of runs


def test_hundreds_of_runs_leak_no_fds_or_zombies(backend: str, tmp_path: Path) -> None:
    """300 runs through every path: success, failure, spawn errors, stdin, tee, callback, timeout."""
    tee_path = tmp_path / "tee.log"
    missing_cwd = tmp_path / "missing"
    chunks: list[bytes] = []
    with open(tee_path, "wb") as tee:
        kinds = [
            lambda i: (run(["sh", "-c", f"echo {i}"], backend=backend, timeout=10),
                       lambda r: r.returncode == 0 and r.stdout == f"{i}\n".encode()),
            lambda i: (run(["sh", "-c", f"echo {i} >&2; exit 3"], backend=backend, timeout=10),
                       lambda r: r.returncode == 3 and r.stderr == f"{i}\n".encode()),
            lambda i: (run(["retest-no-such-program"], backend=backend, timeout=10),
                       lambda r: r.returncode is None and r.spawn_error),
            lambda i: (run(["true"], cwd=missing_cwd, backend=backend, timeout=10),
                       lambda r: r.returncode is None and r.spawn_error.startswith("chdir")),
            lambda i: (run(["cat"], input=b"x" * i, backend=backend, timeout=10),
                       lambda r: r.stdout == b"x" * i),
            lambda i: (run(["sh", "-c", "echo teed"], tee=tee, backend=backend, timeout=10),
                       lambda r: r.stdout == b"teed\n"),
            lambda i: (run(["sh", "-c", "echo cb"], on_output=lambda s, c: chunks.append(c),
                           backend=backend, timeout=10),
                       lambda r: r.stdout == b"cb\n"),
        ]
        for i in range(5):  # warm-up: first-use allocations, lazy imports
            kinds[i % len(kinds)](i)
        fds_before = open_fds()
        failures = []
        for i in range(300):
            result, ok = kinds[i % len(kinds)](i)
            if not ok(result):
                failures.append((i, result))
        for i in range(10):  # the deadline path too
            result = run(["sleep", "5"], timeout=0.01, grace=1, backend=backend)
            if not result.timed_out:
                failures.append(("timeout", result))
        assert failures == []
        assert_no_growth(fds_before)
    assert tee_path.read_bytes().count(b"teed\n") == 300 // len(kinds) + 1


def test_repeated_runs_do_not_grow_traced_memory(native: str) -> None:
    """The C side allocates with PyMem_Raw*, which tracemalloc sees: a leak would show."""
    def batch() -> None:
        for i in range(100):
            result = run(["head", "-c", "50000", "/dev/zero"], capture_limit=20_000,
                         backend=native, timeout=10)
            assert result.stdout_dropped == 30_000

    batch()  # warm-up
    gc.collect()
    tracemalloc.start()
    try:
        batch()
        gc.collect()
        first, _ = tracemalloc.get_traced_memory()
        batch()
        gc.collect()
        second, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak >= 20_000, "tracemalloc does not see the runner's buffers: the check is blind"
    # 100 runs that each held > 20 kB of buffers: a per-run leak would add megabytes.
    assert second - first < 64 * 1024, f"traced memory grew by {second - first} bytes over 100 runs"


# ----------------------------------------------------------------------------- threads

THREADS = 8


def test_concurrent_runs_from_8_threads_each_get_their_own_bytes(backend: str) -> None:
    runs_per_thread = 5
    barrier = threading.Barrier(THREADS)
    problems: list[str] = []
    fds_before = open_fds()

    def worker(t: int) -> None:
        try:
            barrier.wait(timeout=10)
            for i in range(runs_per_thread):
                seed, size = 1000 * t + i, 20_000 + 37_000 * t + 1_000 * i
                streamed: list[tuple[str, bytes]] = []
                if i % 2:
                    data = payload(seed, size)  # distinct stdin, echoed back
                    result = run(["cat"], input=data, backend=backend, timeout=30,
                                 on_output=lambda s, c: streamed.append((s, c)))
                else:
                    data = payload(seed, size)
                    result = run(write_payload(seed, size), backend=backend, timeout=30,
                                 on_output=lambda s, c: streamed.append((s, c)))
                if result.returncode != 0 or result.stdout != data or result.stderr != b"":
                    problems.append(f"thread {t} run {i}: rc={result.returncode} "
                                    f"{len(result.stdout)} of {len(data)} bytes")
                if b"".join(c for s, c in streamed if s == "stdout") != data:
                    problems.append(f"thread {t} run {i}: callback saw other bytes")
        except Exception as err:  # reported below; a thread must not die silently
            problems.append(f"thread {t}: {err!r}")

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(THREADS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert not any(thread.is_alive() for thread in threads)
    assert problems == []
    assert_no_growth(fds_before)


def test_runs_from_8_threads_overlap_and_a_timeout_does_not_disturb_the_others(backend: str) -> None:
    """The GIL is released while waiting: 8 runs of 0.5 s take about 0.5 s, not 4 s."""
    barrier = threading.Barrier(THREADS)
    results: dict[int, object] = {}
    fds_before = open_fds()

    def worker(t: int) -> None:
        barrier.wait(timeout=10)
        if t == 0:
            results[t] = run(["sleep", "5"], timeout=0.3, grace=1, backend=backend)
        else:
            results[t] = run(["sh", "-c", f"sleep 0.5; echo thread-{t}"], timeout=10, backend=backend)

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(THREADS)]
    started = time.monotonic()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    elapsed = time.monotonic() - started

    assert results[0].timed_out
    for t in range(1, THREADS):
        assert not results[t].timed_out
        assert results[t].returncode == 0
        assert results[t].stdout == f"thread-{t}\n".encode()
    assert elapsed < 2.5, f"8 parallel 0.5 s runs took {elapsed:.2f} s: runs are serialized"
    assert_no_growth(fds_before)


# ----------------------------------------------------------------------------- 300 MB

MEASURE_300MB = """
import json, os, random, resource, sys, time
from retest.proc_group import run

MIB = 1 << 20
total_mib = int(sys.argv[1])
writer = '''
import os, random, sys
total_mib = int(sys.argv[1])
MIB = 1 << 20
first, last, middle = random.Random(1).randbytes(MIB), random.Random(2).randbytes(MIB), bytes(MIB)
for i in range(total_mib):
    block = first if i == 0 else last if i == total_mib - 1 else middle
    view = memoryview(block)
    while view:
        view = view[os.write(1, view):]
os.write(2, b"stderr stays small")
'''

def peak_kb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss

run([sys.executable, "-c", "print('warm-up')"], timeout=30)
before = peak_kb()
started = time.monotonic()
result = run([sys.executable, "-c", writer, str(total_mib)], capture_limit=MIB, timeout=120)
elapsed = time.monotonic() - started
after = peak_kb()
head = random.Random(1).randbytes(MIB)[: MIB // 2]
tail = random.Random(2).randbytes(MIB)[MIB // 2 :]
dropped = total_mib * MIB - MIB
print(json.dumps({
    "backend": result.backend,
    "returncode": result.returncode,
    "timed_out": result.timed_out,
    "stdout_dropped": result.stdout_dropped,
    "expected_dropped": dropped,
    "bytes_exact": result.stdout == head + b"\\n[retest: %d bytes omitted]\\n" % dropped + tail,
    "stderr": result.stderr.decode(),
    "peak_before_kb": before,
    "peak_after_kb": after,
    "seconds": elapsed,
}))
"""


def test_300_mb_of_output_with_bounded_memory(native: str) -> None:
    total_mib = 300
    measurer = run(py(MEASURE_300MB, str(total_mib)), env=child_env(), backend=native, timeout=120)

    assert measurer.returncode == 0, measurer.stderr.decode()[-2000:]
    report = json.loads(measurer.stdout)
    assert report["backend"] == "native"
    assert report["returncode"] == 0 and not report["timed_out"]
    assert report["stdout_dropped"] == report["expected_dropped"] == (total_mib - 1) << 20
    assert report["bytes_exact"], "head + marker + tail differ from what was written"
    assert report["stderr"] == "stderr stays small"
    grown_mb = (report["peak_after_kb"] - report["peak_before_kb"]) / 1024
    # Head + tail (1 MiB), a 1 MiB read buffer, the result bytes: a few MB, never the 300 MB.
    assert grown_mb < 24, f"peak RSS grew by {grown_mb:.1f} MB for {total_mib} MB of output"
