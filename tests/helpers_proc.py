"""Helpers for tests that drive real process trees.

Tree processes record themselves by creating an empty file named after their pid in a
directory the test owns (creating a file is atomic, so a reader never sees half a pid).
A test kills what it recorded with ``kill_recorded`` in a ``finally``: only pids that are
still live descendants of this pytest process are killed (pytest is a child subreaper, see
conftest.py), so a recycled pid that now belongs to someone else is never touched.
"""

from __future__ import annotations

import os
import random
import shlex
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Callable, Iterable, Optional, Sequence

import retest
from conftest import children_of, descendants, is_zombie, kill_descendants, pid_alive, wait_until

__all__ = [
    "CPYTHON_EMFILE_LEAK",
    "assert_emfile_leaks_nothing_of_ours",
    "suite_env",
    "write_suite",
    "PY",
    "py",
    "payload",
    "WRITE_PAYLOAD",
    "write_payload",
    "child_env",
    "record_sh",
    "record_py",
    "recorded_pids",
    "kill_recorded",
    "alive",
    "open_fds",
    "in_fork_child",
    "zombie_children",
    "descendants",
    "pid_alive",
    "wait_until",
]

PY = sys.executable

#: Directory that holds the ``retest`` package being tested (``python/`` or site-packages).
PACKAGE_ROOT = str(Path(retest.__file__).resolve().parent.parent)


def in_fork_child(body: Callable[[], bytes]) -> bytes:
    """Run ``body`` in a child of ``os.fork()`` (what a fork inherits is the point); return
    the bytes it returned, after asserting that the child exited 0. The child never returns
    into pytest: it ends with ``os._exit``, whatever ``body`` does."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            os.close(r)
            os.write(w, body())
            code = 0
        finally:
            os._exit(code)
    os.close(w)
    try:
        with os.fdopen(r, "rb") as f:
            said = f.read()
    finally:
        _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0, said
    return said


def py(code: str, *args: str) -> list[str]:
    """argv of a tiny Python child running ``code`` (dedented)."""
    return [PY, "-c", textwrap.dedent(code), *args]


def child_env(**extra: str) -> dict[str, str]:
    """The environment for a child Python that must import the retest under test."""
    env = dict(os.environ)
    paths = [PACKAGE_ROOT] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    env["PYTHONPATH"] = os.pathsep.join(paths)
    env.update(extra)
    return env


def record_sh(directory: Path) -> str:
    """A shell command that records the current shell's pid (``$$``) in ``directory``."""
    return f"touch {shlex.quote(str(directory))}/$$"


def record_py(directory: Path) -> str:
    """A Python statement that records ``os.getpid()`` in ``directory`` (needs ``import os``)."""
    return f"open(os.path.join({str(directory)!r}, str(os.getpid())), 'w').close()"


def recorded_pids(directory: Path) -> list[int]:
    """The pids recorded in ``directory`` (files named ``PID`` or ``PREFIX-PID``)."""
    pids = []
    for name in os.listdir(directory):
        tail = name.rsplit("-", 1)[-1]
        if tail.isdigit():
            pids.append(int(tail))
    return sorted(set(pids))


def alive(pids: Iterable[int]) -> list[int]:
    """The pids of ``pids`` that are still running (zombies count as dead)."""
    return [p for p in pids if pid_alive(p)]


def kill_recorded(pids: Iterable[int]) -> list[int]:
    """SIGKILL the given pids that are live descendants of this process; reap; return them.

    Only our own descendants: a pid recorded by a test's tree may have been recycled by an
    unrelated process after the tree died, and that one must not be touched.
    """
    return kill_descendants(only=set(pids))


def open_fds() -> set[int]:
    """The file descriptors open in this process now, once the native runner's idle shepherds
    are let go (each holds one socket of ours, and their number follows the runs' mix) and the
    /proc files kept for the fingerprint are closed: what is left is what the runs themselves
    kept."""
    from retest import proc_group

    proc_group.close_shepherds()
    fds = set()
    for name in os.listdir("/proc/self/fd"):
        fds.add(int(name))
    return fds


def fd_targets(fds: Sequence[int]) -> dict[int, str]:
    """What each fd points to (for a readable failure message)."""
    out = {}
    for fd in fds:
        try:
            out[fd] = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            out[fd] = "?"
    return out


def zombie_children() -> list[int]:
    """Zombie children of this process (exited, never reaped)."""
    return [p for p in children_of(os.getpid()) if is_zombie(p)]


def payload(seed: int, size: int) -> bytes:
    """Deterministic binary bytes (every byte value, NULs included) a child can regenerate."""
    return random.Random(seed).randbytes(size)


#: A child that writes payload(seed, size) to a stream in irregular chunks, then exits.
WRITE_PAYLOAD = """
import os, random, sys
seed, size, fd = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
data = random.Random(seed).randbytes(size)
sizes = random.Random(seed + 1)
view = memoryview(data)
while view:
    n = os.write(fd, view[: sizes.choice((1, 7, 4096, 65536, 65537, 300000))])
    view = view[n:]
"""


def write_payload(seed: int, size: int, fd: int = 1) -> list[str]:
    return py(WRITE_PAYLOAD, str(seed), str(size), str(fd))


def suite_env(**extra: str) -> dict[str, str]:
    """A small, deterministic environment for pytest children (only the plugins asked for)."""
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": os.environ.get("HOME", "/tmp"),
        "LC_ALL": "C",
        "PYTHONDONTWRITEBYTECODE": "1",
        "PYTEST_DISABLE_PLUGIN_AUTOLOAD": "1",
    }
    env.update(extra)
    return env


def write_suite(root: Path, files: dict[str, str]) -> Path:
    """Write ``files`` (relative path -> text) under ``root``; return ``root``."""
    for name, text in files.items():
        target = root / name
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(text)
    return root


#: Child code defining ``cpython_emfile_leak(limit)``: how many fds CPython's own
#: ``subprocess.run`` (called as the subprocess backend calls it) leaves open when it fails
#: with EMFILE under RLIMIT_NOFILE = ``limit()``. CPython 3.11.2 keeps the pipe pair (or
#: /dev/null) it had opened before the failing call; 3.11.7 closes them (issue 14).
CPYTHON_EMFILE_LEAK = """
def cpython_emfile_leak(limit):
    import os, resource, subprocess
    def count():
        return len(os.listdir("/proc/self/fd"))
    before = count()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (limit(), hard))
    try:
        subprocess.run(["true"], stdin=subprocess.DEVNULL, capture_output=True, timeout=10)
    except OSError:
        pass
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    return count() - before
"""


def assert_emfile_leaks_nothing_of_ours(backend: str, leaked: int, cpython_leak: int) -> None:
    """The native backend closes everything a failed start opened: strictly nothing leaks.

    The subprocess backend is the prior ``subprocess.run`` path, and what it can leak is
    CPython's: on interpreters whose ``Popen`` keeps its pipes after EMFILE (3.11.2), it is
    bounded by what CPython's own call leaks under the same limit (at most a pipe pair and
    /dev/null), measured in the same child; on the others that is 0, and so is ours.
    """
    if backend == "native":
        assert leaked == 0
    else:
        assert 0 <= cpython_leak <= 3
        assert leaked <= cpython_leak, f"leaked {leaked}, CPython's own subprocess.run {cpython_leak}"


#: Where root chooses the pid the next fork gets (in this pid namespace).
NS_LAST_PID = Path("/proc/sys/kernel/ns_last_pid")


def child_with_pid(pid: int, tries: int = 200) -> "Optional[subprocess.Popen[bytes]]":
    """Start ``sleep 30``, a child of ours, with pid ``pid`` (free now), or None if other forks
    on the machine keep taking it first. Needs root (``NS_LAST_PID``). The caller kills it."""
    for _ in range(tries):
        NS_LAST_PID.write_text(str(pid - 1))
        child = subprocess.Popen(["sleep", "30"])
        if child.pid == pid:
            return child
        child.kill()
        child.wait()
    return None
