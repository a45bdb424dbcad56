"""Issue 11, item 4: a lock-busy verdict names the lock's holder, or says the lock is stale."""

from __future__ import annotations

import os
import signal
import subprocess
import textwrap
import time
from pathlib import Path

import pytest

from helpers_proc import PY
from retest import gitops, lockholder, proc_group

pytestmark = pytest.mark.usefixtures("native")

#: Creates the lock as git does (O_EXCL), keeps it open, says so, sleeps (bounded).
HOLDER = textwrap.dedent("""
    import os, sys, time
    fd = os.open(sys.argv[1], os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    print("held", flush=True)
    time.sleep(30)
""")


@pytest.fixture
def git_repo(tmp_path: Path) -> Path:
    repo = tmp_path / "repo"
    env = dict(os.environ, GIT_CONFIG_GLOBAL="/dev/null", GIT_CONFIG_NOSYSTEM="1")
    subprocess.run(["git", "init", "-q", str(repo)], check=True, env=env)
    (repo / "a.txt").write_text("a\n")
    return repo


def _git_add(repo: Path) -> proc_group.RunResult:
    return proc_group.run(["git", "-C", str(repo), "add", "a.txt"], timeout=20,
                          env=dict(os.environ, GIT_CONFIG_GLOBAL="/dev/null", GIT_CONFIG_NOSYSTEM="1"))


def test_a_held_index_lock_names_its_holder(git_repo: Path) -> None:
    lock = git_repo / ".git" / "index.lock"
    holder = subprocess.Popen([PY, "-c", HOLDER, str(lock)], stdout=subprocess.PIPE)
    try:
        assert holder.stdout is not None and holder.stdout.readline() == b"held\n"
        result = _git_add(git_repo)
        verdict = proc_group.classify(result)
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    assert (verdict.kind, verdict.rule) == ("lock-busy", "lock-busy.git-lock"), verdict
    assert f"is held by pid {holder.pid} " in verdict.reason
    assert "os.O_EXCL" in verdict.reason and "found in /proc/PID/fd" in verdict.reason


def test_an_index_lock_left_by_a_dead_process_is_stale(git_repo: Path) -> None:
    lock = git_repo / ".git" / "index.lock"
    holder = subprocess.Popen([PY, "-c", HOLDER, str(lock)], stdout=subprocess.PIPE)
    assert holder.stdout is not None and holder.stdout.readline() == b"held\n"
    holder.send_signal(signal.SIGKILL)  # dies holding it: git never removes it by itself
    holder.wait()
    verdict = proc_group.classify(_git_add(git_repo))
    assert verdict.rule == "lock-busy.git-lock"
    assert "is stale: no live process holds it" in verdict.reason
    info = lockholder.describe(str(lock))
    assert info.stale and info.pid is None and info.age_s is not None and info.age_s < 60


def test_the_gate_lock_names_the_flock_holder(tmp_path: Path) -> None:
    held = gitops.GateLock(str(tmp_path))
    assert held.acquire(0)
    try:
        info = lockholder.describe(held.path, flock=True)
    finally:
        held.release()
    assert (info.pid, info.how, info.stale) == (os.getpid(), "/proc/locks", False)
    own = Path("/proc/self/cmdline").read_bytes().split(b"\0")[0].decode()
    assert info.cmdline.startswith(own) and info.holder_age_s is not None  # this process, xdist or not
    assert f"held by pid {os.getpid()} " in info.text()


def test_a_gone_lock_says_so(tmp_path: Path) -> None:
    info = lockholder.describe(str(tmp_path / "index.lock"))
    assert not info.exists and "is gone now" in info.text()


def test_lock_path_in_git_output() -> None:
    out = b"fatal: Unable to create '/r/.git/index.lock': File exists.\n\nAnother git process"
    assert lockholder.lock_path_in(out) == "/r/.git/index.lock"
    assert lockholder.lock_path_in(b"nothing here") is None
