"""Kill-cause attribution: a real OOM kill is ``other.oom-killed``, a stranger's kill -9 is not.

The real OOM kill runs the command in a memory cgroup of its own with a 64 MiB limit (a child
of this process's memory cgroup: cgroup v1 ``memory.limit_in_bytes`` or v2 ``memory.max``),
where it moves itself before allocating; the kernel kills it and says so in ``/proc/vmstat``
and ``/dev/kmsg``. The cgroup is removed afterwards, once its processes are gone.
"""

from __future__ import annotations

import gc
import os
import signal
import threading
import time
from pathlib import Path
from typing import Any, Iterator

import pytest

from conftest import kill_descendants, wait_until
from gitrepo import make_repo
from helpers_proc import in_fork_child
from retest import oom, proc_group
from retest import probe as _probe
from retest.merge_gate import GateMetrics, retest_branch
from retest.oom import OomKill, parse_kmsg_record
from retest.probe import ProbeReport

LIMIT = 64 << 20
ALLOCATE = "b = bytearray(); [b.extend(bytes(1 << 20)) for _ in range(1000)]"

# --------------------------------------------------------------------------- the kmsg parser

#: Records as /dev/kmsg gives them (6.18, a memcg kill of this machine's own test run) and
#: lines as dmesg prints them on older kernels (4.14: "Kill process ... or sacrifice child").
REAL_RECORDS = [
    ("4,342,2184445036,-;python3 invoked oom-killer: gfp_mask=0xcc0(GFP_KERNEL), order=0, "
     "oom_score_adj=0\n", None),
    ("6,418,2184449978,-;[   8120]     0  8120    20829    17949    16288     1661         0   "
     "192512        0             0 python3\n", None),
    ("6,419,2184449980,-;oom-kill:constraint=CONSTRAINT_MEMCG,nodemask=(null),cpuset=/,"
     "mems_allowed=0,oom_memcg=/process_api/4b57/oomtry,task_memcg=/process_api/4b57/oomtry,"
     "task=python3,pid=8120,uid=0\n",
     OomKill(8120, "python3", "/process_api/4b57/oomtry", "CONSTRAINT_MEMCG")),
    ("3,420,2184450000,-;Memory cgroup out of memory: Killed process 8120 (python3) "
     "total-vm:83316kB, anon-rss:65152kB, file-rss:6644kB, shmem-rss:0kB, UID:0 pgtables:188kB "
     "oom_score_adj:0\n SUBSYSTEM=memory\n", OomKill(8120, "python3")),
    ("[ 4242.123456] Out of memory: Killed process 4242 (python) total-vm:2104872kB, "
     "anon-rss:1923456kB, file-rss:0kB, shmem-rss:0kB, UID:1000 pgtables:3900kB oom_score_adj:0",
     OomKill(4242, "python")),
    ("oom-kill:constraint=CONSTRAINT_NONE,nodemask=(null),cpuset=/,mems_allowed=0,global_oom,"
     "task_memcg=/user.slice/user-1000.slice/session-3.scope,task=pytest,pid=5150,uid=1000",
     OomKill(5150, "pytest", "/user.slice/user-1000.slice/session-3.scope", "CONSTRAINT_NONE")),
    ("[  812.003311] Out of memory: Kill process 3022 (java) score 912 or sacrifice child", None),
    ("[  812.003400] Killed process 3022 (java) total-vm:4326560kB, anon-rss:3667212kB, "
     "file-rss:0kB, shmem-rss:0kB", OomKill(3022, "java")),
    # A task name may hold ")", spaces and commas (prctl PR_SET_NAME): the fixed text after it
    # decides where it ends.
    ("3,9,99,-;Out of memory: Killed process 77 (a) b, c) total-vm:1kB, anon-rss:1kB",
     OomKill(77, "a) b, c")),
    ("6,10,100,-;oom-kill:constraint=CONSTRAINT_NONE,task_memcg=/,task=x,pid=1,y,pid=78,uid=0",
     OomKill(78, "x,pid=1,y", "/", "CONSTRAINT_NONE")),
    ("6,11,101,-;oom_reaper: reaped process 8120 (python3), now anon-rss:0kB, file-rss:0kB, "
     "shmem-rss:0kB", None),
    ("6,12,102,-;Memory cgroup stats for /process_api/4b57/oomtry:", None),
    ("", None),
]


@pytest.mark.parametrize("record, expected", REAL_RECORDS)
def test_kmsg_parser_reads_the_kernels_real_formats(record: str,
                                                    expected: OomKill | None) -> None:
    assert parse_kmsg_record(record) == expected


# --------------------------------------------------------------------------- attribution


def _events(path: Path, kills: int, group: int = 0) -> None:
    path.write_text(f"low 0\nhigh 0\nmax 3\noom 1\noom_kill {kills}\noom_group_kill {group}\n")


def test_a_kill_counted_in_the_runs_own_cgroup_is_the_runs(tmp_path: Path) -> None:
    _events(tmp_path / "memory.events", 2)
    watch = oom.Watch(cgroup=str(tmp_path))
    _events(tmp_path / "memory.events", 3, group=1)
    evidence = watch.attribute(leader=1, returncode=1, timed_out=False)
    assert evidence is not None
    assert (evidence.source, evidence.oom_kill_delta, evidence.oom_group_kill_delta) == \
        ("memory.events", 1, 1)
    assert evidence.counter == str(tmp_path / "memory.events")


def test_a_cgroup_made_for_the_run_counts_from_zero(tmp_path: Path) -> None:
    watch = oom.Watch()  # the cgroup appears with the result (RunResult.cgroup)
    _events(tmp_path / "memory.events", 1)
    evidence = watch.attribute(leader=1, returncode=-9, timed_out=False, cgroup=str(tmp_path))
    assert evidence is not None and evidence.source == "memory.events"
    assert evidence.oom_kill_delta == 1
    _events(tmp_path / "memory.events", 0)
    quiet = oom.Watch().attribute(leader=1, returncode=-9, timed_out=False, cgroup=str(tmp_path))
    assert quiet is None  # the run's own counter did not move: the SIGKILL was someone's


def _result(**kw: Any) -> proc_group.RunResult:
    base: dict[str, Any] = dict(args=("python", "-m", "pytest"), returncode=-9, stdout=b"",
                                stderr=b"", timed_out=False, duration_s=1.0, spawn_error=None,
                                backend="native", pid=4242)
    base.update(kw)
    return proc_group.RunResult(**base)


LEADER_KILLED = oom.OomEvidence(source="kmsg", oom_kill_delta=1, counter="/proc/vmstat",
                                victim_pid=4242, victim_comm="python", victim_is_leader=True)


def test_the_verdict_names_the_victim_and_the_counter() -> None:
    verdict = proc_group.classify(_result(oom=LEADER_KILLED))
    assert (verdict.kind, verdict.rule, verdict.infra, verdict.evidence) == \
        ("other", "other.oom-killed", False, "runner")
    assert verdict.reason == \
        "killed by the kernel's OOM killer: pid 4242 (python) (oom_kill +1, /proc/vmstat)"


def test_failures_before_the_oom_kill_keep_it_other_and_are_named() -> None:
    failed = _probe.TestFailure("tests/test_a.py::test_one", "call", "failed")
    report = ProbeReport(session_started=True, collected=40, done=12, failure_count=1,
                         counts={"failed": 1, "passed": 11}, failures=(failed,))
    verdict = proc_group.classify(_result(oom=LEADER_KILLED, probe=report))
    assert verdict.rule == "other.oom-killed"
    assert "12 of 40 tests done" in verdict.reason
    assert ("tests had failed before it (1 failed, 11 passed): tests/test_a.py::test_one"
            in verdict.reason)

    output = _result(oom=LEADER_KILLED, args=("pytest",),
                     stdout=b"== 1 failed, 3 passed in 1.00s ==\n")
    verdict = proc_group.classify(output)
    assert verdict.rule == "other.oom-killed"
    assert "the output also shows pytest: 1 failed, 3 passed in 1.00s" in verdict.reason


def test_the_runners_own_facts_and_a_pass_come_first() -> None:
    assert proc_group.classify(_result(oom=LEADER_KILLED, timed_out=True)).kind == "timeout"
    assert proc_group.classify(_result(oom=LEADER_KILLED, returncode=0)).kind == "passed"
    child = oom.OomEvidence(source="kmsg", oom_kill_delta=1, counter="/proc/vmstat",
                            victim_pid=4300, victim_comm="worker")
    verdict = proc_group.classify(_result(oom=child, returncode=1))
    assert verdict.rule == "other.oom-killed"
    assert verdict.reason.startswith("the kernel's OOM killer killed pid 4300 (worker), a process "
                                     "of the run (oom_kill +1, /proc/vmstat); the command: exit 1")


# --------------------------------------------------------------------------- real OOM kills


def _memory_parent() -> tuple[str, str]:
    """``(version, directory)`` of this process's memory cgroup, or skip saying why not."""
    if os.geteuid() != 0:
        pytest.skip("a memory cgroup of the test's own needs root")
    v1_path = v2_path = None
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        _, controllers, path = line.split(":", 2)
        if "memory" in controllers.split(","):
            v1_path = path
        elif controllers == "":
            v2_path = path
    if v1_path is not None and os.path.isdir("/sys/fs/cgroup/memory" + v1_path):
        return "v1", "/sys/fs/cgroup/memory" + v1_path
    for root in ("/sys/fs/cgroup", "/sys/fs/cgroup/unified"):
        directory = root + (v2_path or "/")
        try:
            enabled = Path(root, "cgroup.controllers").read_text().split()
        except OSError:
            continue
        if v2_path is not None and "memory" in enabled and os.path.isdir(directory):
            return "v2", directory
    pytest.skip("no usable memory controller: neither cgroup v1 memory nor v2 with memory")


@pytest.fixture
def memory_cgroup() -> Iterator[Path]:
    """A memory cgroup with a 64 MiB limit (and no swap), a child of this process's own;
    emptied of our processes and removed afterwards."""
    version, parent = _memory_parent()
    path = Path(parent) / f"retest-oom-test-{os.getpid()}-{time.monotonic_ns()}"
    try:
        path.mkdir()
        if version == "v1":
            (path / "memory.limit_in_bytes").write_text(str(LIMIT))
            if (path / "memory.memsw.limit_in_bytes").exists():
                (path / "memory.memsw.limit_in_bytes").write_text(str(LIMIT))
            else:
                (path / "memory.swappiness").write_text("0")
        else:
            if "memory" not in (Path(parent) / "cgroup.subtree_control").read_text().split():
                (Path(parent) / "cgroup.subtree_control").write_text("+memory")
            (path / "memory.max").write_text(str(LIMIT))
            if (path / "memory.swap.max").exists():
                (path / "memory.swap.max").write_text("0")
    except OSError as err:
        if path.exists():
            path.rmdir()
        pytest.skip(f"cannot set up a memory cgroup under {parent}: {err}")
    try:
        yield path
    finally:
        procs = {int(p) for p in (path / "cgroup.procs").read_text().split()}
        if procs:
            kill_descendants(procs)  # ours only: a pid outside our tree is never touched
        wait_until(lambda: not (path / "cgroup.procs").read_text().split(), timeout=5)
        path.rmdir()


def _oom_command(cgroup: Path) -> list[str]:
    return ["sh", "-c", f"echo $$ > {cgroup}/cgroup.procs && exec python3 -c '{ALLOCATE}'"]


def test_a_real_oom_kill_is_other_oom_killed_with_the_victim(backend: str,
                                                             memory_cgroup: Path) -> None:
    result = proc_group.run(_oom_command(memory_cgroup), backend=backend, timeout=60)

    assert result.returncode == -9 and not result.timed_out
    assert result.oom is not None, "the kernel's OOM kill was not attributed"
    assert result.oom.oom_kill_delta >= 1 and result.oom.counter == "/proc/vmstat"
    verdict = proc_group.classify(result)
    assert (verdict.kind, verdict.rule, verdict.infra, verdict.evidence) == \
        ("other", "other.oom-killed", False, "runner")
    if oom.Watch().kmsg.fd >= 0:  # the kernel log is readable: the victim is named
        assert result.oom.source == "kmsg" and result.oom.victim_is_leader
        assert result.oom.victim_pid == result.pid
        assert result.oom.victim_comm == "python3"
        assert result.oom.victim_memcg is not None and memory_cgroup.name in result.oom.victim_memcg
        assert f"pid {result.pid} (python3)" in verdict.reason
    else:
        assert result.oom.source == "vmstat"
    assert verdict.reason.startswith("killed by the kernel's OOM killer: ")
    assert result.to_dict()["oom"]["victim_pid"] == result.oom.victim_pid


def _kmsg_fds() -> int:
    n = 0
    for fd in os.listdir("/proc/self/fd"):
        try:
            n += os.readlink(f"/proc/self/fd/{fd}") == "/dev/kmsg"
        except OSError:
            pass
    return n


#: kcmp(2) by architecture; KCMP_FILE: do two descriptors share one open file description.
_SYS_KCMP = {"x86_64": 312, "aarch64": 272}
_KCMP_FILE = 0


def _own_kmsg_file(parent: int) -> bool:
    """In a fork child: one of its /dev/kmsg descriptors is not the parent's open file under
    the same number (the child's own cursor; an inherited one would be the same file)."""
    import ctypes

    nr = _SYS_KCMP.get(os.uname().machine)
    if nr is None:
        return True  # cannot tell here: the attribution above is still checked
    libc = ctypes.CDLL(None, use_errno=True)
    for fd in os.listdir("/proc/self/fd"):
        try:
            if os.readlink(f"/proc/self/fd/{fd}") != "/dev/kmsg":
                continue
        except OSError:
            continue
        if libc.syscall(nr, parent, os.getpid(), _KCMP_FILE, int(fd), int(fd)) != 0:
            return True
    return False


def _kmsg_readable() -> bool:
    watch = oom.Watch()
    try:
        return watch.kmsg.fd >= 0
    finally:
        watch.close()


def test_one_kernel_log_cursor_serves_every_run(native: str) -> None:
    """Issue 15: opening /dev/kmsg cost ~8% of the caller's CPU per run; the native runner
    keeps one cursor for the process, never one per run."""
    if not _kmsg_readable():
        pytest.skip("the kernel log is not readable here")
    gc.collect()
    before = _kmsg_fds()
    assert proc_group.run(["true"], timeout=30).returncode == 0
    opened = _kmsg_fds()
    assert opened - before in (0, 1)  # 0: an earlier run of this process opened it
    for _ in range(20):
        assert proc_group.run(["true"], timeout=30).returncode == 0
    assert _kmsg_fds() == opened
    threads = [threading.Thread(target=lambda: [proc_group.run(["true"], timeout=30)
                                                for _ in range(10)]) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert _kmsg_fds() == opened


def test_back_to_back_oom_kills_each_name_their_own_victim(native: str,
                                                            memory_cgroup: Path) -> None:
    """The shared cursor: each run takes the records of its own window, not the last run's."""
    if not _kmsg_readable():
        pytest.skip("the kernel log is not readable here")
    seen = []
    for _ in range(2):
        result = proc_group.run(_oom_command(memory_cgroup), timeout=60)
        assert result.returncode == -9 and result.oom is not None
        assert result.oom.source == "kmsg", result.oom
        assert result.oom.victim_pid == result.pid and result.oom.victim_is_leader
        seen.append(result.oom.victim_pid)
    assert seen[0] != seen[1]
    quiet = proc_group.run(["true"], timeout=30)
    assert quiet.returncode == 0 and quiet.oom is None


def test_a_fork_child_reads_the_log_on_a_cursor_of_its_own(native: str,
                                                           memory_cgroup: Path) -> None:
    """A child of fork() shares its parent's open files: it must not read on the parent's
    cursor (it would take the parent's records), so it opens its own."""
    if not _kmsg_readable():
        pytest.skip("the kernel log is not readable here")
    assert proc_group.run(["true"], timeout=30).returncode == 0  # the parent's cursor is open

    def child() -> bytes:  # one OOM run, its attribution
        result = proc_group.run(_oom_command(memory_cgroup), timeout=60)
        ok = (result.oom is not None and result.oom.source == "kmsg"
              and result.oom.victim_pid == result.pid and _own_kmsg_file(os.getppid()))
        return b"ok" if ok else repr(result.oom).encode()[:500]

    said = in_fork_child(child)
    assert said == b"ok", said
    result = proc_group.run(_oom_command(memory_cgroup), timeout=60)  # the parent's, after
    assert result.oom is not None and result.oom.source == "kmsg"
    assert result.oom.victim_pid == result.pid


def test_the_gate_holds_an_oom_killed_run_with_one_alert_carrying_oom(
        tmp_path: Path, memory_cgroup: Path) -> None:
    repo = make_repo(tmp_path)
    repo.branch("feature", {"feature.py": "VALUE = 1\n"})
    alerts: list[dict[str, Any]] = []

    def gate() -> Any:
        return retest_branch(repo.path, "feature", env=repo.env, metrics=GateMetrics(),
                             command=_oom_command(memory_cgroup), alert_hook=alerts.append)

    first, second = gate(), gate()

    assert (first.action, first.verdict, first.rule) == ("hold", "other", "other.oom-killed")
    assert first.alert and not second.alert and second.action == "hold"
    assert first.next_attempt_at is None and second.rule == "other.oom-killed"
    assert len(alerts) == 1
    assert alerts[0]["rule"] == "other.oom-killed"
    assert alerts[0]["oom"] is not None and alerts[0]["oom"]["oom_kill_delta"] >= 1
    assert alerts[0]["oom"] == first.evidence["oom"]


def test_a_strangers_kill_minus_9_is_still_other_signal(backend: str, tmp_path: Path) -> None:
    pidfile = tmp_path / "pid"
    command = ["sh", "-c",
               f"echo $$ > {pidfile}.tmp && mv {pidfile}.tmp {pidfile} && exec sleep 30"]

    def stranger() -> None:
        if wait_until(pidfile.exists, timeout=10):
            os.kill(int(pidfile.read_text()), signal.SIGKILL)

    killer = threading.Thread(target=stranger)
    killer.start()
    try:
        result = proc_group.run(command, backend=backend, timeout=20)
    finally:
        killer.join()

    assert result.returncode == -9 and not result.timed_out
    assert result.oom is None
    verdict = proc_group.classify(result)
    assert (verdict.kind, verdict.rule, verdict.reason) == \
        ("other", "other.signal", "killed by signal 9 (SIGKILL)")
