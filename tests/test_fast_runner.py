"""Issue 15: the no-libc shepherd, the capture built in place, one wake-up less per run.

The capture tests run against both backends (one contract) at the in-place buffer's
boundaries: no output, exactly the limit, one byte over, the head/tail split, a tail ring that
wraps (direct reads, limit >= 512 KiB) and a small one (filled through the scratch buffer).
The shepherd tests check what the default build is (no libc, no dynamic loader) and that it
still reports every way a start can fail, in both containment modes.
"""

from __future__ import annotations

import errno
import os
import platform
import shutil
import threading
from pathlib import Path

import pytest

from helpers_proc import payload, py, write_payload
from retest import proc_group
from retest.proc_group import run

MARKER = b"\n[retest: %d bytes omitted]\n"


def expected_capture(data: bytes, limit: int) -> tuple[bytes, int]:
    """Half head, half tail, a marker in between (the contract, written out independently)."""
    if len(data) <= limit:
        return data, 0
    head = limit // 2
    dropped = len(data) - limit
    return data[:head] + MARKER % dropped + data[len(data) - (limit - head):], dropped


# ----------------------------------------------------------------------------- capture boundaries


def test_no_output_is_empty_bytes(backend: str) -> None:
    result = run(["true"], backend=backend, timeout=10, capture_limit=1 << 20)

    assert (result.stdout, result.stdout_dropped) == (b"", 0)
    assert (result.stderr, result.stderr_dropped) == (b"", 0)
    assert type(result.stdout) is bytes


@pytest.mark.parametrize("limit, size", [
    (1000, 1000),            # exactly the limit: all kept, no marker
    (1000, 1001),            # one over: one byte dropped from the middle
    (1001, 5000),            # odd limit: the head is the smaller half
    (0, 10),                 # nothing kept: only the marker
    (1, 10),                 # a one-byte ring
    (64 * 1024, 200_000),    # a small ring, filled through the scratch buffer
])
def test_capture_boundaries(backend: str, limit: int, size: int) -> None:
    data = payload(limit + size, size)

    result = run(write_payload(limit + size, size), backend=backend, timeout=30,
                 capture_limit=limit)

    assert result.returncode == 0, result.stderr
    assert (result.stdout, result.stdout_dropped) == expected_capture(data, limit)


#: A child that writes its whole payload with one write (one pipe-full: the first read sees
#: as much of it as the pipe holds).
WRITE_AT_ONCE = ("import os, random, sys\n"
                 "data = random.Random(int(sys.argv[1])).randbytes(int(sys.argv[2]))\n"
                 "view = memoryview(data)\n"
                 "while view:\n"
                 "    view = view[os.write(1, view):]\n")


@pytest.mark.parametrize("limit", [6000, 8 << 20])
@pytest.mark.parametrize("size", [1, 4095, 4096, 4097, 65536, 65537, 200_001])
def test_the_first_read_and_the_heads_growth_lose_no_byte(backend: str, limit: int,
                                                           size: int) -> None:
    """The first read lands in a 4 KiB buffer of the caller's and is copied into a result
    made for it; the head then doubles from 64 KiB. At 6000 the head (3000) is smaller than
    that first buffer."""
    data = payload(size + 3, size)

    result = run(py(WRITE_AT_ONCE, str(size + 3), str(size)), backend=backend, timeout=30,
                 capture_limit=limit)

    assert result.returncode == 0, result.stderr
    assert (result.stdout, result.stdout_dropped) == expected_capture(data, limit)


@pytest.mark.parametrize("argv, limit", [
    (["true"], 8 << 20),                              # no output at all
    (["sh", "-c", "echo hello; echo oops >&2"], 8 << 20),  # a few bytes on each stream
])
def test_a_small_output_gets_a_small_buffer(native: str, argv: list[str], limit: int) -> None:
    """A stream without output allocates nothing, and a small one a 64 KiB head at most:
    the limit is a bound, not an allocation (it was 1 MiB per stream, every run)."""
    import tracemalloc

    run(argv, backend="native", timeout=10, capture_limit=limit)  # warm: first-use state
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        result = run(argv, backend="native", timeout=10, capture_limit=limit)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()

    assert result.returncode == 0
    assert peak < 256 * 1024, peak
    if argv[0] == "sh":
        assert (result.stdout, result.stderr) == (b"hello\n", b"oops\n")


@pytest.mark.parametrize("size", [
    1 << 20,                 # head and tail exactly full: the limit, nothing dropped
    (1 << 20) + 1,           # one over, the ring wrapped by one byte
    5 * (1 << 20) + 12345,   # the ring wraps many times at odd offsets
])
def test_capture_with_a_wrapping_tail_ring(backend: str, size: int) -> None:
    limit = 1 << 20  # a 512 KiB tail: reads land in it directly
    data = payload(size, size)

    result = run(write_payload(size, size), backend=backend, timeout=60, capture_limit=limit)

    assert result.returncode == 0, result.stderr
    assert (result.stdout, result.stdout_dropped) == expected_capture(data, limit)


def test_capture_of_both_streams_at_once(backend: str) -> None:
    out, err = payload(1, 300_000), payload(2, 900_000)
    code = """
        import random, sys
        out = random.Random(1).randbytes(300_000)
        err = random.Random(2).randbytes(900_000)
        for i in range(0, 900_000, 4096):
            sys.stderr.buffer.write(err[i:i + 4096]); sys.stderr.buffer.flush()
            if i < 300_000:
                sys.stdout.buffer.write(out[i:i + 4096]); sys.stdout.buffer.flush()
    """

    result = run(py(code), backend=backend, timeout=60, capture_limit=600_000)

    assert result.returncode == 0
    assert (result.stdout, result.stdout_dropped) == expected_capture(out, 600_000)
    assert (result.stderr, result.stderr_dropped) == expected_capture(err, 600_000)


def test_callback_sees_every_byte_while_the_capture_stays_bounded(backend: str) -> None:
    size, limit = 3_000_000, 700_000
    data = payload(7, size)
    seen: list[bytes] = []

    result = run(write_payload(7, size), backend=backend, timeout=60, capture_limit=limit,
                 on_output=lambda stream, chunk: seen.append(chunk) if stream == "stdout" else None)

    assert b"".join(seen) == data
    assert (result.stdout, result.stdout_dropped) == expected_capture(data, limit)


def test_threads_capture_independently(native: str) -> None:
    """In-place buffers are per run: 4 threads, each its own seed, none sees another's bytes."""
    results: dict[int, proc_group.RunResult] = {}

    def one(seed: int) -> None:
        results[seed] = run(write_payload(seed, 1_500_000), timeout=60, capture_limit=1 << 20)

    threads = [threading.Thread(target=one, args=(seed,)) for seed in range(10, 14)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()

    for seed in range(10, 14):
        r = results[seed]
        assert (r.stdout, r.stdout_dropped) == expected_capture(payload(seed, 1_500_000), 1 << 20)


# ----------------------------------------------------------------------------- the tail kept in pipes


def run_reading_every_chunk(argv: list[str], limit: int) -> tuple[proc_group.RunResult, int]:
    """The same run with a callback: every chunk is read, so the tail goes through the ring."""
    seen = [0]

    def count(stream: str, chunk: bytes) -> None:
        seen[0] += len(chunk)

    return run(argv, timeout=120, capture_limit=limit, on_output=count), seen[0]


@pytest.mark.parametrize("limit", [1 << 20, 8 << 20])
def test_tail_kept_in_pipes_is_the_tail_the_ring_keeps(native: str, limit: int) -> None:
    """Issue 15: with no callback and no tee, the tail is moved through pipes (tailpipe.c),
    not read; its bytes must be the ones the ring keeps when every chunk is read. Irregular
    writes (1 byte to 300 KB) leave pages part-full, so the line's pipes hold less than their
    size; 3x the limit makes the line turn over several times."""
    size = 3 * limit + 777_777
    data = payload(21, size)

    moved = run(write_payload(21, size), timeout=120, capture_limit=limit)
    read, seen = run_reading_every_chunk(write_payload(21, size), limit)

    assert moved.returncode == 0, moved.stderr
    assert (moved.stdout, moved.stdout_dropped) == expected_capture(data, limit)
    assert (read.stdout, read.stdout_dropped) == (moved.stdout, moved.stdout_dropped)
    assert seen == size


def test_tails_of_both_streams_in_pipes_at_once(native: str) -> None:
    limit, out_size, err_size = 4 << 20, 10_000_000, 13_000_000
    out, err = payload(31, out_size), payload(32, err_size)
    code = f"""
        import os, random
        out = memoryview(random.Random(31).randbytes({out_size}))
        err = memoryview(random.Random(32).randbytes({err_size}))
        while out or err:
            if out:
                out = out[os.write(1, out[:65537]):]
            if err:
                err = err[os.write(2, err[:100_003]):]
    """

    result = run(py(code), timeout=120, capture_limit=limit)

    assert result.returncode == 0
    assert (result.stdout, result.stdout_dropped) == expected_capture(out, limit)
    assert (result.stderr, result.stderr_dropped) == expected_capture(err, limit)


FD_STARVED = """
import hashlib, json, os, resource, sys
from retest.proc_group import run
limit, size, argv = int(sys.argv[1]), int(sys.argv[2]), json.loads(sys.argv[3])
run(["true"], timeout=30)  # the idle shepherd and the fingerprint's files are open from here on
top = max(int(fd) for fd in os.listdir("/proc/self/fd"))
hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
out = []
for spare in range(2, 26):
    resource.setrlimit(resource.RLIMIT_NOFILE, (top + 1 + spare, hard))
    r = run(argv, timeout=60, capture_limit=limit)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    out.append([spare, r.spawn_error, r.returncode, hashlib.sha256(r.stdout).hexdigest(),
                r.stdout_dropped])
print(json.dumps(out))
"""


def test_tail_in_pipes_out_of_fds_falls_back_to_the_ring(native: str) -> None:
    """A caller short of fds (RLIMIT_NOFILE just above what it has open): the line cannot open
    /dev/null, its first pipe or a later one, at each budget a different one. What it held goes
    into the ring, in order, and the stream is read from there on: the capture is the same
    whatever the budget, or the run says it could not start (too few fds for the run itself)."""
    import hashlib
    import json
    import subprocess

    from helpers_proc import child_env

    limit, size = 4 << 20, 10_000_000
    want_bytes, want_dropped = expected_capture(payload(41, size), limit)
    want = hashlib.sha256(want_bytes).hexdigest()

    done = subprocess.run(py(FD_STARVED, str(limit), str(size), json.dumps(write_payload(41, size))),
                          capture_output=True, env=child_env(), timeout=600)

    assert done.returncode == 0, done.stderr.decode(errors="replace")
    rows = json.loads(done.stdout)
    started = [row for row in rows if row[1] is None]
    assert len(started) >= 10, rows  # most budgets are enough for the run itself
    assert all(row[2:] == [0, want, want_dropped] for row in started), rows


LINE_PIPES = """
import os, sys, threading, time
from retest.proc_group import run
limit = int(sys.argv[1])
writer = "import os, time\\nv = memoryview(bytes(1 << 20))\\nfor _ in range(60):\\n    os.write(1, v); time.sleep(0.002)\\n"
run(["true"], timeout=30)
def pipes():
    n = 0
    for fd in os.listdir("/proc/self/fd"):
        try:
            n += os.readlink(f"/proc/self/fd/{fd}").startswith("pipe:")
        except OSError:
            pass
    return n
base, most, done = pipes(), [0], threading.Event()
def watch():
    while not done.is_set():
        most[0] = max(most[0], pipes())
        time.sleep(0.001)
t = threading.Thread(target=watch)
t.start()
r = run([sys.executable, "-c", writer], timeout=120, capture_limit=limit)
done.set()
t.join()
print(r.returncode, r.stdout_dropped, most[0] - base)
"""


@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("setpriv"),
                    reason="needs root and setpriv to run a caller without CAP_SYS_RESOURCE")
@pytest.mark.parametrize("limit, privileged, uses_line", [
    (16 << 20, True, True),     # exempt from pipe-user-pages-soft: up to 16 pipes
    (8 << 20, False, True),     # the default limit's tail fits the 7 allowed otherwise
    (16 << 20, False, False),   # a bigger tail would not: it stays in the ring
])
def test_line_pipes_are_bounded_for_a_caller_under_the_per_user_pipe_limit(
        native: str, limit: int, privileged: bool, uses_line: bool) -> None:
    """Each 1 MiB pipe of the line counts 256 pages against pipe-user-pages-soft, and a user
    over it has 8 KiB pipes everywhere: a caller the limit applies to (no CAP_SYS_RESOURCE or
    CAP_SYS_ADMIN) gets a line of at most 7 pipes, else its tail stays in the ring."""
    import subprocess

    from helpers_proc import child_env

    drop = [] if privileged else ["setpriv", "--bounding-set", "-sys_admin,-sys_resource",
                                  "--inh-caps", "-sys_admin,-sys_resource"]
    done = subprocess.run([*drop, *py(LINE_PIPES, str(limit))], capture_output=True,
                          env=child_env(), timeout=300)

    assert done.returncode == 0, done.stderr.decode(errors="replace")
    rc, dropped, extra = (int(v) for v in done.stdout.split())
    assert (rc, dropped) == (0, 60 * (1 << 20) - limit)
    # the run's own pipes: 2 read ends, 4 fds for a moment while both ends are open; a line
    # of a 4 MiB or bigger tail is 5 or more pipes, 2 fds each
    if uses_line:
        assert extra >= 2 + 2 * 4, extra
    else:
        assert extra <= 5, extra


# ----------------------------------------------------------------------------- the shepherd build


def shepherd_path() -> str:
    proc_group._load_native()
    assert proc_group._shepherd_path is not None
    return proc_group._shepherd_path


def test_default_shepherd_has_no_libc_and_no_loader(native: str) -> None:
    """Issue 15: the default build links no libc (ext/nolibc.c) and so has no PT_INTERP."""
    if os.environ.get("RETEST_SHEPHERD_LIBC", "none").lower() != "none" or \
            os.environ.get("RETEST_SANITIZE") or os.environ.get("RETEST_SANITIZED") or platform.machine() not in ("x86_64", "aarch64"):
        pytest.skip("a libc shepherd was asked for, or this machine has no no-libc build")
    binary = Path(shepherd_path()).read_bytes()

    assert binary[:4] == b"\x7fELF"
    assert b"ld-linux" not in binary and b"/lib64/" not in binary  # no dynamic loader
    assert b"GNU C Library" not in binary and b"GLIBC_" not in binary
    assert len(binary) < 200_000  # a static glibc build is ~800 kB


def test_shepherd_run_by_hand_exits_125(native: str) -> None:
    """Without its control socket (fd 3) the shepherd refuses at once: its own start-up works."""
    result = run([shepherd_path(), "1", "2"], backend="subprocess", timeout=10)

    assert result.returncode == 125


@pytest.mark.parametrize("case", ["missing", "not-executable", "directory", "garbage", "empty"])
def test_every_exec_failure_is_reported(containment: str, tmp_path: Path, case: str) -> None:
    target = tmp_path / "prog"
    expected = {"missing": errno.ENOENT, "not-executable": errno.EACCES,
                "directory": errno.EACCES, "garbage": errno.ENOEXEC, "empty": errno.ENOENT}[case]
    if case == "not-executable":
        target.write_text("#!/bin/sh\necho ran\n")
        target.chmod(0o644)
    elif case == "directory":
        target.mkdir()
    elif case == "garbage":
        target.write_bytes(b"\x00\x01 no format")
        target.chmod(0o755)
    argv0 = "" if case == "empty" else str(target)

    result = run([argv0], timeout=10)

    assert result.returncode is None and result.pid is None
    assert result.spawn_errno == expected
    assert result.spawn_error is not None and result.spawn_error.startswith("exec ")
    assert result.stdout == b""


def test_bad_cwd_is_reported(containment: str, tmp_path: Path) -> None:
    result = run(["true"], cwd=tmp_path / "gone", timeout=10)

    assert result.returncode is None
    assert result.spawn_errno == errno.ENOENT
    assert result.spawn_error is not None and result.spawn_error.startswith("chdir ")


def test_path_search_goes_on_past_a_non_enoent_failure(containment: str, tmp_path: Path) -> None:
    """As execvp and _posixsubprocess: an unrunnable match (EACCES) does not stop the search;
    when nothing runs, that first real error is the one reported, not ENOENT."""
    first, second = tmp_path / "a", tmp_path / "b"
    first.mkdir()
    second.mkdir()
    (first / "retest-probe").write_text("#!/bin/sh\necho wrong\n")
    (first / "retest-probe").chmod(0o644)
    (second / "retest-probe").write_text("#!/bin/sh\necho right\n")
    (second / "retest-probe").chmod(0o755)
    env = dict(os.environ, PATH=f"{tmp_path / 'none'}:{first}:{second}")

    found = run(["retest-probe"], env=env, timeout=10)
    (second / "retest-probe").unlink()
    refused = run(["retest-probe"], env=env, timeout=10)

    assert found.returncode == 0 and found.stdout == b"right\n"
    assert refused.returncode is None and refused.spawn_errno == errno.EACCES


def test_the_command_starts_with_no_signal_blocked_or_ignored(containment: str) -> None:
    """The shepherd blocks every signal and ignores none (issue 15); the command gets neither."""
    result = run(["cat", "/proc/self/status"], timeout=10)

    fields = dict(line.split(":\t", 1) for line in result.stdout.decode().splitlines()
                  if line.startswith(("SigBlk", "SigIgn")))
    assert result.returncode == 0
    assert {k: int(v, 16) for k, v in fields.items()} == {"SigBlk": 0, "SigIgn": 0}


def test_tail_in_pipes_ends_when_the_stream_ends_on_a_full_pipe(native: str) -> None:
    """A writer that ends just as the line's pipe is full of part-full pages (256 tiny writes,
    each spliced on its own): splice says EAGAIN, not 0, at that EOF. The stream must still end
    at once, not spin on POLLHUP until the drain after FINAL."""
    import time

    limit, n = 1 << 20, 256
    code = f"""
        import os, time
        os.write(1, b'H' * {limit // 2})
        time.sleep(0.05)
        for i in range({n}):
            os.write(1, b'%099d\\n' % i)
            time.sleep(0.003)
    """
    want = b"H" * (limit // 2) + b"".join(b"%099d\n" % i for i in range(n))

    cpu = time.process_time()
    result = run(py(code), timeout=30, capture_limit=limit)
    cpu = time.process_time() - cpu

    assert (result.returncode, result.stdout, result.stdout_dropped) == (0, want, 0)
    assert cpu < 0.3, f"the caller spun for {cpu:.2f} s of CPU after the stream ended"
