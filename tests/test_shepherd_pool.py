"""Idle shepherds serve run after run (issue 15), and nothing of one run reaches the next.

A shepherd that finished a run cleanly (no child left, its cgroup gone) waits on its socket
for the next request; a run takes one only if the caller's inherited state is the one it was
started from (tests/test_inherited_state.py pins what the command sees). These tests hold the
pool's own promises: reuse, what an idle shepherd holds, what disables or ends reuse, the
per-run accounting, threads, fork, and that letting them go leaves nothing behind.
"""

from __future__ import annotations

import errno
import json
import os
import resource
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Optional

import pytest

from conftest import children_of, is_zombie, pid_alive, wait_until
from helpers_proc import NS_LAST_PID, child_with_pid
from retest import proc_group
from retest.proc_group import run

PARENT = ["sh", "-c", "echo $PPID"]


def _parent(**kw: object) -> int:
    result = run(PARENT, timeout=30, backend="native", **kw)
    assert result.returncode == 0, result.spawn_error
    return int(result.stdout)


@pytest.fixture(autouse=True)
def fresh_pool(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("RETEST_SHEPHERD_POOL", raising=False)
    for mode in ("containment", "cgroup_mode"):  # their own runs first (cgroup_mode_unavailable):
        if mode in request.fixturenames:        # an autouse fixture is set up before them
            request.getfixturevalue(mode)
    proc_group.close_shepherds()


def test_one_shepherd_serves_run_after_run(containment: str) -> None:
    first = _parent()
    assert proc_group.idle_shepherds() == (first,)
    assert [_parent() for _ in range(5)] == [first] * 5
    assert children_of(first) == [], "an idle shepherd has no child"


def test_an_idle_shepherd_holds_nothing_of_the_last_run(containment: str, tmp_path: Path) -> None:
    """No pipe or file of a finished run stays open in it: only /dev/null, its socket to us, its
    signalfd, the four /proc files of its own that it checks before each final report, and, in
    cgroup mode, the emptied cgroup it kept for the next run (the directory and the files it
    reads there, never anything the command opened)."""
    log = tmp_path / "held.txt"
    result = run(["sh", "-c", f"echo data; echo more >&2; cat > {log}"], input=b"x" * 100_000,
                 timeout=30, backend="native")
    assert result.returncode == 0 and result.stdout == b"data\n" and log.stat().st_size == 100_000
    (shepherd,) = proc_group.idle_shepherds()
    targets = sorted(os.readlink(f"/proc/{shepherd}/fd/{fd}") for fd in os.listdir(f"/proc/{shepherd}/fd"))
    kept = [t for t in targets if result.cgroup is not None and
            (t == result.cgroup or os.path.dirname(t) == result.cgroup)]
    own = [f"/proc/{shepherd}/{name}" for name in
           ("cgroup", "coredump_filter", "oom_score_adj", "timerslack_ns")]
    assert sorted(t for t in targets if t.startswith(f"/proc/{shepherd}/")) == own, targets
    assert [t for t in targets if not t.startswith(("socket:", "anon_inode:[signalfd]"))
            and t not in kept and t not in own] == ["/dev/null"] * 3, targets
    assert len([t for t in targets if t.startswith("socket:")]) == 1, targets
    if containment == "cgroup":
        assert result.cgroup in kept and os.path.isdir(result.cgroup), targets
        assert {os.path.basename(t) for t in kept} <= {
            os.path.basename(result.cgroup), "cgroup.events", "cpu.stat", "cpu.pressure",
            "cgroup.controllers",
            "cgroup.freeze", "cgroup.type", "cgroup.max.descendants", "cgroup.max.depth",
            "cgroup.pressure", "cgroup.stat"}, kept


def test_pool_size_zero_starts_a_shepherd_per_run(containment: str,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RETEST_SHEPHERD_POOL", "0")
    parents = {_parent() for _ in range(3)}
    assert len(parents) == 3
    assert proc_group.idle_shepherds() == ()
    assert not any(pid_alive(p) for p in parents)
    assert [p for p in children_of(os.getpid()) if is_zombie(p)] == []


@pytest.mark.parametrize("how", ["timeout", "callback raised", "sweep of leftovers"])
def test_a_run_that_was_stopped_still_leaves_a_clean_shepherd_or_none(containment: str,
                                                                      how: str) -> None:
    """A terminate byte of ours may still be unread: that shepherd is not reused. A timeout or
    a sweep ends with nothing left: that one may be."""
    first = _parent()
    if how == "timeout":
        result = run(["sleep", "30"], timeout=0.3, grace=1, backend="native")
        assert result.timed_out
    elif how == "callback raised":
        def boom(stream: str, chunk: bytes) -> None:
            raise RuntimeError("stop")
        with pytest.raises(RuntimeError):
            run(["sh", "-c", "echo go; sleep 30"], on_output=boom, timeout=30, grace=1,
                backend="native")
    else:
        result = run(["sh", "-c", "(setsid sleep 30 &); echo left"], timeout=30, grace=1,
                     backend="native")
        assert result.leak_count >= 1
    after = _parent()
    if how == "callback raised":
        assert after != first and not pid_alive(first)
    assert children_of(after) == []
    assert set(proc_group.idle_shepherds()) == {after}


def test_a_shepherd_killed_while_idle_is_replaced(containment: str) -> None:
    first = _parent()
    os.kill(first, signal.SIGKILL)
    assert wait_until(lambda: is_zombie(first) or not pid_alive(first), 5)
    second = _parent()
    assert second != first
    assert proc_group.idle_shepherds() == (second,)
    assert not pid_alive(first) and first not in children_of(os.getpid())


def test_a_failed_start_retires_the_shepherd(containment: str) -> None:
    first = _parent()
    result = run(["retest-no-such-command-pool"], timeout=30, backend="native")
    assert result.returncode is None and "No such file" in (result.spawn_error or "")
    assert proc_group.idle_shepherds() == ()
    assert not pid_alive(first) and first not in children_of(os.getpid())


def test_accounting_is_the_runs_own_not_the_shepherds_life(containment: str) -> None:
    """rusage is summed over what this run's shepherd reaped for this run: a big, busy run
    before does not show in the next one (getrusage(RUSAGE_CHILDREN) would carry it)."""
    big = run([sys.executable, "-c",
               "import time; b = bytearray(300 << 20); t = time.process_time()\n"
               "while time.process_time() - t < 0.5: pass"], timeout=60, backend="native")
    assert big.returncode == 0 and big.max_rss_kb > 250_000
    assert big.user_cpu_s + big.sys_cpu_s >= 0.3
    small = run(["true"], timeout=30, backend="native")
    assert proc_group.idle_shepherds(), "the same shepherd served both"
    assert small.returncode == 0
    assert small.max_rss_kb < 100_000, small.max_rss_kb
    assert small.user_cpu_s + small.sys_cpu_s < 0.2


def test_threads_each_get_a_shepherd_and_the_pool_is_bounded(containment: str,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RETEST_SHEPHERD_POOL", "3")
    outputs: dict[int, list[bytes]] = {}

    def worker(n: int) -> None:
        outputs[n] = [run(["sh", "-c", f"echo {n}-{i}"], timeout=30, backend="native").stdout
                      for i in range(10)]

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert all(outputs[n] == [f"{n}-{i}\n".encode() for i in range(10)] for n in range(8))
    idle = proc_group.idle_shepherds()
    assert 1 <= len(idle) <= 3
    assert all(children_of(p) == [] for p in idle)
    assert [p for p in children_of(os.getpid()) if is_zombie(p)] == []


def test_a_forked_child_does_not_use_its_parents_shepherds(containment: str) -> None:
    parent_shepherd = _parent()
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: report, then leave without running any of pytest's clean-up
        try:
            idle_at_start = proc_group.idle_shepherds()
            held_at_start = _pidfds()
            ppid = _parent()
            ok = idle_at_start == () and held_at_start == {} and ppid != parent_shepherd
            proc_group.close_shepherds()
            os.write(write, b"ok" if ok else f"{idle_at_start} {held_at_start} {ppid}".encode())
        finally:
            os._exit(0)
    os.close(write)
    answer = os.read(read, 200)
    os.close(read)
    os.waitpid(pid, 0)
    assert answer == b"ok"
    assert proc_group.idle_shepherds() == (parent_shepherd,)
    assert _parent() == parent_shepherd


def test_close_shepherds_lets_them_go_and_reaps_them(containment: str) -> None:
    first = _parent()
    assert proc_group.close_shepherds() == 1
    assert proc_group.idle_shepherds() == ()
    assert first not in children_of(os.getpid())
    assert proc_group.close_shepherds() == 0


def test_a_changed_state_gets_a_fresh_shepherd(containment: str, tmp_path: Path) -> None:
    """The fingerprint at work (umask here; every attribute: test_inherited_state.py): the
    old shepherd stays idle for a caller in its state, the new state gets its own."""
    first = _parent()
    old = os.umask(0o077)
    try:
        second = _parent()
        assert second != first
        assert _parent() == second
    finally:
        os.umask(old)
    assert _parent() == first
    assert set(proc_group.idle_shepherds()) == {first, second}


def test_a_command_that_changes_its_shepherd_does_not_reach_the_next_run(containment: str) -> None:
    """The command's parent is the shepherd, and a process of the same user may renice it,
    lower its rlimits or raise its oom_score_adj: that shepherd is not reused, so the next
    command starts from the caller's state, not the changed one."""
    first = _parent()
    changed = run(["sh", "-c", "renice -n 7 -p $PPID >/dev/null && prlimit --pid $PPID "
                   "--nofile=77:77 && echo 500 > /proc/$PPID/oom_score_adj && echo $PPID"],
                  timeout=30, backend="native")
    assert changed.returncode == 0 and int(changed.stdout) == first, changed.stderr
    seen = run(["sh", "-c", "echo $PPID $(cut -d' ' -f19 /proc/self/stat) $(ulimit -n) "
                "$(cat /proc/self/oom_score_adj)"], timeout=30, backend="native")
    ppid, nice, nofile, oom = seen.stdout.split()
    assert int(ppid) != first and not pid_alive(first)
    assert int(nice) == os.getpriority(os.PRIO_PROCESS, 0)
    assert int(nofile) == resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    assert oom.decode() == Path("/proc/self/oom_score_adj").read_text().strip()


def _cpu_list(text: str) -> set[int]:
    """The CPUs of a ``Cpus_allowed_list`` value ("0-3,6")."""
    cpus: set[int] = set()
    for part in text.split(","):
        low, _, high = part.partition("-")
        cpus.update(range(int(low), int(high or low) + 1))
    return cpus


def _allowed(status: str) -> set[int]:
    """The CPUs of a /proc/<pid>/status text."""
    line = next(line for line in status.splitlines() if line.startswith("Cpus_allowed_list:"))
    return _cpu_list(line.split(":", 1)[1].strip())


#: The command's own CPUs, then its parent's (the shepherd's) while it runs.
CPUS_SEEN = ["sh", "-c", "grep Cpus_allowed_list /proc/self/status; "
             "grep Cpus_allowed_list /proc/$PPID/status; echo $PPID"]


def _cpus_seen() -> tuple[set[int], set[int], int]:
    result = run(CPUS_SEEN, timeout=30, backend="native")
    assert result.returncode == 0, result.stderr
    own, parents, ppid = result.stdout.decode().splitlines()
    return _cpu_list(own.split(":", 1)[1].strip()), _cpu_list(parents.split(":", 1)[1].strip()), \
        int(ppid)


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs 2 CPUs to tell a pin apart")
def test_a_reused_shepherd_runs_on_the_callers_cpu_and_its_command_has_the_callers_mask(
        containment: str) -> None:
    """Issue 15: a run handed to an idle shepherd pins that shepherd to the caller's CPU, so
    that the hand-off's wake-ups stay on one CPU; the command gets the mask it would have
    inherited, and the idle shepherd has its own back."""
    caller = os.sched_getaffinity(0)
    own, shepherds, first = _cpus_seen()
    assert own == caller and shepherds == caller, "a new shepherd is not pinned"
    for _ in range(3):
        own, shepherds, ppid = _cpus_seen()
        assert ppid == first, "the idle shepherd served the run"
        assert own == caller, "the command has the caller's CPUs, not the pinned one"
        assert len(shepherds) == 1 and shepherds <= caller, f"pinned to one CPU: {shepherds}"
        # after FINAL, with its IDLE checks, while the caller builds the result
        assert wait_until(lambda: _allowed(Path(f"/proc/{first}/status").read_text()) == caller), \
            "the idle shepherd has its start mask back"


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs 2 CPUs to narrow a mask")
def test_a_command_that_narrows_its_shepherds_cpus_does_not_narrow_the_next_run(
        containment: str) -> None:
    caller = os.sched_getaffinity(0)
    _parent()
    narrowed = run([sys.executable, "-c", f"import os; os.sched_setaffinity(os.getppid(), "
                    f"{{{min(caller)}}})"], timeout=30, backend="native")
    assert narrowed.returncode == 0, narrowed.stderr
    for _ in range(2):
        own, _, _ = _cpus_seen()
        assert own == caller


def test_the_core_dump_filter_is_the_callers(containment: str) -> None:
    path = Path("/proc/self/coredump_filter")
    old = hex(int(path.read_text(), 16))  # shown as bare hex; written back with its 0x
    first = _parent()
    path.write_text("0x7f")
    try:
        seen = run(["sh", "-c", "echo $PPID $(cat /proc/self/coredump_filter)"], timeout=30,
                   backend="native")
    finally:
        path.write_text(old)
    ppid, value = seen.stdout.split()
    assert int(ppid) != first and int(value, 16) == 0x7f


def test_a_forked_child_holding_the_socket_does_not_hang_a_stopped_run(containment: str) -> None:
    """A child forked while the run goes on holds a copy of the shepherd's socket: letting that
    shepherd go (the run was stopped, so it is not reused) must not wait for the child."""
    forked: list[int] = []

    def fork_then_raise(stream: str, chunk: bytes) -> None:
        pid = os.fork()
        if pid == 0:
            time.sleep(20)
            os._exit(0)
        forked.append(pid)
        raise RuntimeError("stop")

    t0 = time.monotonic()
    try:
        with pytest.raises(RuntimeError):
            run(["sh", "-c", "echo go; sleep 30"], on_output=fork_then_raise, timeout=60,
                grace=1, backend="native")
        took = time.monotonic() - t0
    finally:
        for pid in forked:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
    assert took < 10, f"run() took {took:.1f} s: it waited for the forked child"


def test_an_idle_shepherd_does_not_pin_the_directory_it_started_in(containment: str,
                                                                   tmp_path: Path) -> None:
    """Its commands get the caller's cwd with each request; its own is / (an unmount of the
    directory it was started in must not fail EBUSY because of it)."""
    old = os.getcwd()
    os.chdir(tmp_path)
    try:
        first = _parent()
        assert os.readlink(f"/proc/{first}/cwd") == "/"
        seen = run(["pwd"], timeout=30, backend="native")
        assert seen.stdout.decode().strip() == str(tmp_path)
    finally:
        os.chdir(old)


# ---------------------------------------------------------------- shepherds reaped by others

def _pidfds() -> dict[int, int]:
    """This process's pidfds: fd -> the pid each names (-1 once that process is reaped)."""
    held = {}
    for fd in os.listdir("/proc/self/fd"):
        try:
            if os.readlink(f"/proc/self/fd/{fd}") != "anon_inode:[pidfd]":
                continue
            info = Path(f"/proc/self/fdinfo/{fd}").read_text()
        except OSError:
            continue
        held[int(fd)] = int(info.split("\nPid:")[1].split()[0])
    return held


def _reap_as_a_stranger(pid: int) -> None:
    """What code outside retest in the same process may do: kill and reap a shepherd."""
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)


def _stop(child: Optional[subprocess.Popen]) -> None:
    """Kill and reap our own child (by its Popen), if it is still ours to."""
    if child is not None and child.returncode is None:
        child.kill()
        child.wait()


needs_pid_control = pytest.mark.skipif(
    os.geteuid() != 0 or not NS_LAST_PID.exists(),
    reason="choosing the next pid (/proc/sys/kernel/ns_last_pid) needs root")


def test_each_idle_shepherd_is_held_by_a_pidfd(containment: str) -> None:
    before = _pidfds()
    first = _parent()
    held = {fd: pid for fd, pid in _pidfds().items() if fd not in before}
    assert list(held.values()) == [first], held
    assert proc_group.close_shepherds() == 1
    assert _pidfds() == before, "letting a shepherd go closes its pidfd"


@needs_pid_control
@pytest.mark.parametrize("then", ["close_shepherds", "the next run"])
def test_a_shepherd_reaped_by_others_leaves_its_pids_next_owner_alone(containment: str,
                                                                      then: str) -> None:
    """An idle shepherd killed and reaped by code outside retest frees its pid, and another
    child of ours gets it: letting that shepherd go (close_shepherds, or the next run, whose
    request finds it dead) must neither kill that child nor reap it (its owner's wait would
    then find nothing)."""
    shepherd = _parent()
    _reap_as_a_stranger(shepherd)
    child = child_with_pid(shepherd, tries=50)
    try:
        if child is None:
            pytest.skip(f"pid {shepherd} kept going to other processes")
        if then == "close_shepherds":
            assert proc_group.close_shepherds() == 1
        else:
            assert _parent() != shepherd
            assert shepherd not in proc_group.idle_shepherds()
        assert child.poll() is None, "retest killed or reaped a child not its own"
        assert pid_alive(child.pid)
        child.kill()
        assert child.wait(10) == -signal.SIGKILL, "its owner sees its own exit status"
    finally:
        _stop(child)


@needs_pid_control
def test_a_lost_shepherd_reaped_by_others_is_not_waited_for(containment: str) -> None:
    """The shepherd dies during a run and code outside retest reaps it (here: the output
    callback), and another child of ours gets its pid: the end of the run must not wait for
    that child (until it exits) nor take its exit status."""
    taken: list[Optional[subprocess.Popen]] = []

    def reap_then_reuse(stream: str, chunk: bytes) -> None:
        if not taken:
            shepherd = int(chunk.split()[0])
            _reap_as_a_stranger(shepherd)
            taken.append(child_with_pid(shepherd, tries=50))

    watchdog = None
    try:
        # The old code blocked in waitpid on the child until it exited: end it after 5 s.
        watchdog = threading.Timer(5, lambda: taken and _stop(taken[0]))
        watchdog.start()
        t0 = time.monotonic()
        result = run(["sh", "-c", "echo $PPID; exec sleep 30"], on_output=reap_then_reuse,
                     timeout=30, grace=1, backend="native")
        took = time.monotonic() - t0
        watchdog.cancel()
        child = taken[0] if taken else None
        if child is None:
            pytest.skip("the shepherd's pid kept going to other processes")
        assert child.poll() is None, "retest waited for, or killed, a child not its own"
        assert took < 4, f"run() took {took:.1f} s: it waited for a child not its own"
        assert result.spawn_error == "retest shepherd lost: no final report", result.spawn_error
        child.kill()
        assert child.wait(10) == -signal.SIGKILL, "its owner sees its own exit status"
    finally:
        if watchdog is not None:
            watchdog.cancel()
        for child in taken:
            _stop(child)


def test_a_lost_shepherd_reports_how_it_died(containment: str) -> None:
    """Its wait status is made from waitid's siginfo: a SIGKILL reads as signal 9."""
    killed: list[int] = []

    def kill_it(stream: str, chunk: bytes) -> None:
        if not killed:
            killed.append(int(chunk.split()[0]))
            os.kill(killed[0], signal.SIGKILL)

    result = run(["sh", "-c", "echo $PPID; exec sleep 30"], on_output=kill_it, timeout=30,
                 grace=1, backend="native")
    assert result.spawn_error == "retest shepherd lost: killed by signal 9", result.spawn_error
    assert killed[0] not in children_of(os.getpid())


# A caller in which pidfd_open fails as it does on Linux < 5.3 (ENOSYS) or under a seccomp
# profile that refuses it (EPERM): a seccomp filter of its own makes it so. It reports, as
# JSON, what it saw of the pid-based fallback.
NO_PIDFD_CALLER = r"""
import ctypes, json, os, signal, struct, sys, time
from retest import proc_group

ARCH = {"x86_64": 0xC000003E, "aarch64": 0xC00000B7}[os.uname().machine]
PIDFD_OPEN = 434
refuse = int(sys.argv[1])
prog = [(0x20, 0, 0, 4),                      # A = arch
        (0x15, 0, 3, ARCH),                   # not ours: allow
        (0x20, 0, 0, 0),                      # A = syscall number
        (0x15, 0, 1, PIDFD_OPEN),
        (0x06, 0, 0, 0x00050000 | refuse),    # SECCOMP_RET_ERRNO
        (0x06, 0, 0, 0x7FFF0000)]             # SECCOMP_RET_ALLOW
code = ctypes.create_string_buffer(b"".join(struct.pack("HBBI", *i) for i in prog))
class Fprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]
fprog = Fprog(len(prog), ctypes.addressof(code))
libc = ctypes.CDLL(None, use_errno=True)
assert libc.prctl(38, 1, 0, 0, 0) == 0                         # PR_SET_NO_NEW_PRIVS
assert libc.prctl(22, 2, ctypes.byref(fprog), 0, 0) == 0       # PR_SET_SECCOMP, filter
assert libc.syscall(PIDFD_OPEN, os.getpid(), 0) == -1 and ctypes.get_errno() == refuse

def parent():
    r = proc_group.run(["sh", "-c", "echo $PPID"], timeout=30, backend="native")
    assert r.returncode == 0, r.spawn_error
    return int(r.stdout)

def pidfds():
    held = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            if os.readlink(f"/proc/self/fd/{fd}") == "anon_inode:[pidfd]":
                held.append(fd)
        except OSError:  # the directory's own fd, closed by now
            pass
    return held

def zombies():
    kids = open(f"/proc/self/task/{os.getpid()}/children").read().split()
    return [int(k) for k in kids
            if open(f"/proc/{k}/stat").read().rsplit(")", 1)[1].split()[0] == "Z"]

first = [parent() for _ in range(3)]
seen = {"reused": len(set(first)) == 1, "pidfds": pidfds(),
        "closed": proc_group.close_shepherds(), "gone": not os.path.exists(f"/proc/{first[0]}")}
second = parent()
os.kill(second, signal.SIGKILL)
os.waitpid(second, 0)                       # reaped by code outside retest, pid not reused
seen["reaped_closed"] = proc_group.close_shepherds()
third = parent()
seen["fresh"] = third not in (first[0], second)
os.kill(third, signal.SIGKILL)              # dies idle, not reaped: the next run replaces it
for _ in range(5000):
    if third in zombies():
        break
    time.sleep(0.001)
fourth = parent()
seen["replaced"] = fourth != third and not os.path.exists(f"/proc/{third}")
seen["closed_last"] = proc_group.close_shepherds()
seen["zombies"] = zombies()
print(json.dumps(seen))
"""


@pytest.mark.parametrize("refusal", [errno.ENOSYS, errno.EPERM])
def test_without_pidfds_shepherds_are_waited_for_by_pid(containment: str, refusal: int) -> None:
    """The fallback keeps the behaviour from before pidfds: runs and reuse work, letting a
    shepherd go reaps it, one reaped by others (pid not reused) is let go, one that died idle
    is replaced. (What it risks when a reaped shepherd's pid is reused: ext/child.c.)"""
    if os.uname().machine not in ("x86_64", "aarch64"):
        pytest.skip("the seccomp filter is written for x86_64 and aarch64")
    done = subprocess.run([sys.executable, "-c", NO_PIDFD_CALLER, str(refusal)],
                          capture_output=True, timeout=60)
    assert done.returncode == 0, done.stderr.decode()
    seen = json.loads(done.stdout)
    assert seen == {"reused": True, "pidfds": [], "closed": 1, "gone": True, "reaped_closed": 1,
                    "fresh": True, "replaced": True, "closed_last": 1, "zombies": []}, seen
