"""Shared fixtures: both backends, and a guard that no test leaves a process behind.

The pytest process makes itself a child subreaper at start-up, so anything a test starts
that escapes its parent (double fork, setsid) is re-parented to pytest rather than to
init. After each test the guard walks pytest's own descendants: each one was started by
this test run, so the guard may kill it (by pid, SIGKILL) and reap it, and then it fails
the test that leaked it. Nothing is ever killed by name.
"""

from __future__ import annotations

import ctypes
import functools
import os
import signal
import sys
import time
from pathlib import Path
from typing import Iterator

import pytest

from retest import proc_group

PR_SET_CHILD_SUBREAPER = 36


def _set_subreaper() -> bool:
    if not sys.platform.startswith("linux"):
        return False
    libc = ctypes.CDLL(None, use_errno=True)
    return libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0


SUBREAPER = _set_subreaper()


def set_subreaper(on: bool) -> None:
    """Turn this process's subreaper role on or off (off only briefly: ``ledgers.server``)."""
    if SUBREAPER:
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_CHILD_SUBREAPER, int(on), 0, 0, 0)


def children_of(pid: int) -> list[int]:
    """Direct children of ``pid`` from /proc (all its threads)."""
    kids: list[int] = []
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return kids
    for tid in tasks:
        try:
            text = Path(f"/proc/{pid}/task/{tid}/children").read_text()
        except OSError:
            continue
        kids.extend(int(x) for x in text.split())
    return kids


def descendants(pid: int | None = None) -> list[int]:
    """Every live descendant of ``pid`` (default: this process), zombies included, but not
    the native runner's idle shepherds: they are this process's own helpers, each waiting for
    the next run with no child (tests/test_shepherd_pool.py checks them)."""
    root = os.getpid() if pid is None else pid
    seen: list[int] = []
    idle = set(proc_group.idle_shepherds()) if pid is None else set()
    stack = [p for p in children_of(root) if p not in idle]
    while stack:
        child = stack.pop()
        if child in seen:
            continue
        seen.append(child)
        stack.extend(children_of(child))
    return seen


def is_zombie(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] == "Z"


def pid_alive(pid: int) -> bool:
    """True if ``pid`` exists and is not a zombie."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return not is_zombie(pid)


def reap_own_zombies() -> None:
    for child in children_of(os.getpid()):
        if is_zombie(child):
            try:
                os.waitpid(child, os.WNOHANG)
            except ChildProcessError:
                pass


def kill_descendants(only: "set[int] | None" = None) -> list[int]:
    """SIGKILL live descendants of this process (ours by construction), or only those of them
    in ``only``; reap; return the pids killed. A pid outside our tree is never touched, even if
    it is in ``only``: a recorded pid may have been recycled by a stranger since."""
    killed: list[int] = []
    for _ in range(100):
        reap_own_zombies()
        targets = [p for p in descendants() if (only is None or p in only) and pid_alive(p)]
        if not targets:
            break
        for pid in targets:
            try:
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)
            except ProcessLookupError:
                pass
        wait_until(lambda: not any(pid_alive(p) for p in targets), timeout=0.5)
    reap_own_zombies()
    return sorted(set(killed))


def wait_until(predicate, timeout: float = 5.0, interval: float = 0.01) -> bool:
    """Poll ``predicate`` until true or ``timeout``; return its last value."""
    deadline = time.monotonic() + timeout
    while True:
        if predicate():
            return True
        if time.monotonic() >= deadline:
            return bool(predicate())
        time.sleep(interval)


@pytest.fixture(autouse=True)
def no_leftover_processes(request: pytest.FixtureRequest) -> Iterator[None]:
    """Fail a test that leaves a process behind; kill what it left, even when it failed."""
    before = set(descendants())
    yield
    # A run returns only when its tree is gone; give processes killed by a test's own
    # clean-up a moment to be reaped before judging.
    wait_until(lambda: not [p for p in set(descendants()) - before if pid_alive(p)], timeout=1.0)
    reap_own_zombies()
    leftovers = [p for p in set(descendants()) - before if pid_alive(p)]
    if leftovers:
        described = []
        for pid in leftovers:
            try:
                described.append(f"{pid}: {Path(f'/proc/{pid}/cmdline').read_bytes()!r}")
            except OSError:
                described.append(str(pid))
        kill_descendants()
        if request.node.get_closest_marker("leaves_processes") is None:
            pytest.fail("test left processes behind: " + "; ".join(described), pytrace=False)


@pytest.fixture(autouse=True)
def pinned_timeout_rules(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    """Tests written before issue 11 assert ``timeout.deadline`` on suites of a few seconds,
    where pytest's start-up and the shared machine's load would make the refined rules
    (starved, hung) fire by chance: thresholds of 1 switch them off there. A module that
    tests the refined rules says ``REFINED_TIMEOUT_RULES = True``."""
    if getattr(request.module, "REFINED_TIMEOUT_RULES", False):
        return
    for name in ("RETEST_STARVED_PSI_SHARE", "RETEST_STARVED_FOREIGN_SHARE",
                 "RETEST_HUNG_RUNNING_SHARE"):
        monkeypatch.setenv(name, "1")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "leaves_processes: the test knowingly leaves orphans (the guard kills them quietly)"
    )


@pytest.fixture
def pid_dir(tmp_path: Path) -> Iterator[Path]:
    """A directory where a test's tree records its pids (one file per pid); whatever is
    recorded there is killed afterwards (helpers_proc.kill_recorded: our descendants only)."""
    from helpers_proc import kill_recorded, recorded_pids

    directory = tmp_path / "pids"
    directory.mkdir()
    yield directory
    kill_recorded(recorded_pids(directory))


NATIVE_REQUIRED = os.environ.get("RETEST_REQUIRE_NATIVE") == "1"


@pytest.fixture(params=["native", "subprocess"])
def backend(request: pytest.FixtureRequest) -> str:
    """Run a test once per backend. Native is required when RETEST_REQUIRE_NATIVE=1 (CI)."""
    if request.param == "native" and proc_group.backend_status()[0] != "native":
        _, why = proc_group.backend_status()
        if NATIVE_REQUIRED:
            pytest.fail(f"native backend required but unavailable: {why}")
        pytest.skip(f"native backend unavailable: {why}")
    return request.param


@pytest.fixture
def native() -> str:
    """For tests of what only the native backend promises (tree containment)."""
    if proc_group.backend_status()[0] != "native":
        _, why = proc_group.backend_status()
        if NATIVE_REQUIRED:
            pytest.fail(f"native backend required but unavailable: {why}")
        pytest.skip(f"native backend unavailable: {why}")
    return "native"


CGROUP_REQUIRED = os.environ.get("RETEST_REQUIRE_CGROUP") == "1"


@functools.lru_cache(maxsize=None)
def cgroup_mode_unavailable() -> "str | None":
    """None if a run here gets a cgroup of its own (tried for real, once), else why not."""
    if proc_group.backend_status()[0] != "native":
        return "native backend unavailable"
    result = proc_group.run(["true"], containment="cgroup", backend="native", timeout=30)
    if result.containment == "cgroup" and result.returncode == 0:
        return None
    return result.spawn_error or f"ran with containment {result.containment!r}"


@pytest.fixture(params=["cgroup", "subreaper"])
def containment(request: pytest.FixtureRequest, native: str, monkeypatch: pytest.MonkeyPatch) -> str:
    """Run a native test once per containment mode (RETEST_CONTAINMENT, inherited by child
    callers). cgroup mode is skipped where impossible, or fails with RETEST_REQUIRE_CGROUP=1."""
    if request.param == "cgroup":
        why = cgroup_mode_unavailable()
        if why is not None:
            if CGROUP_REQUIRED:
                pytest.fail(f"cgroup mode required but unavailable: {why}")
            pytest.skip(f"cgroup mode unavailable: {why}")
    monkeypatch.setenv("RETEST_CONTAINMENT", request.param)
    return request.param


@pytest.fixture
def cgroup_mode(native: str, monkeypatch: pytest.MonkeyPatch) -> str:
    """For tests of what only cgroup mode promises."""
    why = cgroup_mode_unavailable()
    if why is not None:
        if CGROUP_REQUIRED:
            pytest.fail(f"cgroup mode required but unavailable: {why}")
        pytest.skip(f"cgroup mode unavailable: {why}")
    monkeypatch.setenv("RETEST_CONTAINMENT", "cgroup")
    return "cgroup"


@pytest.fixture(params=["sqlite", "postgresql"])
def ledger_place(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator["object"]:
    """One test, both ledger backends (issue 12): see ``tests/ledgers.py``."""
    from ledgers import place

    yield from place(request.param, tmp_path)
