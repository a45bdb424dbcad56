"""Regression tests for defects found in review of the native runner (each names its defect)."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from retest import proc_group
from tests.conftest import children_of, pid_alive, wait_until

PYTHONPATH = os.pathsep.join(p for p in sys.path if p)


@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("unshare"),
                    reason="needs root and unshare for a private pid namespace")
@pytest.mark.skipif("libasan" in os.environ.get("LD_PRELOAD", ""),
                    reason="2,500 children each loading the ASan runtime do not start in time")
def test_thousands_of_children_are_all_killed_and_nobody_else(native: str) -> None:
    """A /proc children file over 8 KiB was cut mid-number and the cut taken for a pid (a cut
    '1xxxx' is pid 1: the whole machine). Run in a private pid namespace, so that a regression
    can only hurt the namespace, with a bystander process that must survive."""
    script = textwrap.dedent("""
        import os, sys
        from retest import proc_group as pg
        leader = '''
        import os, time
        for _ in range(2500):
            os.posix_spawn("/bin/sleep", ["sleep", "100"], os.environ)
        path = f"/proc/{os.getpid()}/task/{os.getpid()}/children"
        os.write(1, b"%d" % len(open(path, "rb").read()))
        time.sleep(100)
        '''
        bystander = os.posix_spawn("/bin/sleep", ["sleep", "60"], os.environ)
        # 12 s: spawning 2,500 processes takes ~3 s alone, over 5 s on a loaded 2-core machine
        r = pg.run([sys.executable, "-c", leader], timeout=12, grace=1)
        alive = os.waitpid(bystander, os.WNOHANG) == (0, 0)
        os.kill(bystander, 9)
        os.waitpid(bystander, 0)
        print(r.stdout.decode(), r.timed_out, r.killed_at_deadline, alive)
    """)
    proc = subprocess.run(["unshare", "--fork", "--pid", "--mount-proc", sys.executable, "-c", script],
                          capture_output=True, timeout=120, env=dict(os.environ, PYTHONPATH=PYTHONPATH))
    assert proc.returncode == 0, proc.stderr.decode()
    size, timed_out, killed, bystander_alive = proc.stdout.decode().split()
    assert int(size) > 8192  # the children file really was larger than the old buffer
    assert timed_out == "True" and int(killed) == 2501
    assert bystander_alive == "True"


def _shepherd_path() -> str:
    assert proc_group._shepherd_path is not None
    return proc_group._shepherd_path


def test_caller_gone_before_the_shepherd_reports_start(native: str, tmp_path: Path) -> None:
    """The shepherd marked the caller gone when sending STARTED failed, then stopped watching
    the socket: the command ran on with nobody to stop it."""
    ours, theirs = socket.socketpair()
    pidfile = tmp_path / "pid"
    try:
        ours.close()  # the caller is gone before the shepherd even starts
        shepherd = subprocess.Popen(
            [_shepherd_path(), "-1", "1000000000", "15", "-", "sh", "-c", f"echo $$ > {pidfile}; exec sleep 30"],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            pass_fds=(3,),  # exempt fd 3 from close_fds: preexec_fn put the socket there
            preexec_fn=lambda: os.dup2(theirs.fileno(), 3),
        )
    finally:
        theirs.close()
    try:
        started = time.monotonic()
        # Before the fix the shepherd sat out the command's 30 s (TimeoutExpired here).
        assert shepherd.wait(timeout=10) == 0
        assert time.monotonic() - started < 5
        # The command may die before it writes its pid; if it did write it, it is gone. (The
        # autouse guard would also fail this test if anything of the tree were left.)
        if pidfile.exists() and pidfile.read_text().strip():
            assert not pid_alive(int(pidfile.read_text()))
    finally:
        if shepherd.poll() is None:
            shepherd.kill()
            shepherd.wait()


@pytest.mark.parametrize("limit", [0, 1, 2, 64, 4096])
def test_tiny_capture_limits_keep_the_tail_and_count_every_byte(native: str, limit: int) -> None:
    """Reads were capped at half the capture limit: millions of tiny reads, and the end of the
    output (the pytest summary) lost to the drain bound."""
    writer = "import sys; sys.stdout.buffer.write(b'x' * 4_000_000 + b'SUMMARY')"
    r = proc_group.run([sys.executable, "-c", writer], capture_limit=limit, timeout=30)
    assert r.returncode == 0
    kept = len(r.stdout) - len(proc_group.OMITTED_MARKER % r.stdout_dropped)
    assert kept + r.stdout_dropped == 4_000_007
    if limit >= 14:
        assert r.stdout.endswith(b"SUMMARY")


def test_a_slow_callback_still_sees_the_last_line(native: str) -> None:
    """With the tree gone, the caller stopped reading 0.5 s later even while the pipe still
    held output: a slow on_output callback lost the end of the run."""
    seen: list[bytes] = []

    def slow(stream: str, chunk: bytes) -> None:
        seen.append(chunk)
        time.sleep(0.02)

    writer = "import sys; sys.stdout.buffer.write(b'y' * 1_000_000 + b'\\nSUMMARY-LINE')"
    r = proc_group.run([sys.executable, "-c", writer], capture_limit=64 * 1024, on_output=slow,
                       timeout=30)
    assert b"".join(seen).endswith(b"SUMMARY-LINE") and len(b"".join(seen)) == 1_000_013
    assert r.stdout.endswith(b"SUMMARY-LINE")


def test_second_ctrl_c_does_not_wait_for_a_stopped_shepherd(native: str, tmp_path: Path) -> None:
    """With no timeout and a stopped shepherd, Ctrl-C could not get the caller out."""
    pidfile = tmp_path / "leader"
    code = textwrap.dedent(f"""
        import signal, sys
        signal.signal(signal.SIGINT, signal.default_int_handler)
        from retest import proc_group as pg
        try:
            pg.run(["sh", "-c", "echo $$ > {pidfile}; exec sleep 60"])
        except KeyboardInterrupt:
            print("interrupted", flush=True)
    """)
    caller = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE,
                              env=dict(os.environ, PYTHONPATH=PYTHONPATH))
    try:
        assert wait_until(pidfile.exists, timeout=10)
        shepherds = children_of(caller.pid)
        assert len(shepherds) == 1
        os.kill(shepherds[0], signal.SIGSTOP)
        os.kill(caller.pid, signal.SIGINT)
        time.sleep(0.5)
        os.kill(caller.pid, signal.SIGINT)
        out, _ = caller.communicate(timeout=5)
        assert out == b"interrupted\n"
        assert wait_until(lambda: not pid_alive(int(pidfile.read_text())), timeout=3)
    finally:
        if caller.poll() is None:
            caller.kill()
            caller.wait()
