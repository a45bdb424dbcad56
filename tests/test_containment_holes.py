"""Holes in the subreaper containment, and small defects of the native backend (issue 10).

Each test drives real processes: a thread group whose leader thread exited, an orphan that
signals the shepherd, a run inside a pid namespace whose /proc is not its own, a large tree
(pid reuse safety), a PATH with a broken first candidate, a tee nobody reads, a huge capture
limit and a closed stdout under ``retest run``. Whatever a test's tree records in its
``pid_dir`` is killed afterwards, pass or fail (conftest), and the guard fails a test that
leaves any process behind.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import shutil
import signal
import subprocess
import textwrap
import threading
from pathlib import Path

import pytest

from helpers_proc import PY, alive, child_env, child_with_pid, pid_alive, py, recorded_pids, wait_until
from retest.proc_group import run

# ----------------------------------------------------------------------------- item 1


#: A process whose main (leader) thread calls pthread_exit while another thread sleeps: its
#: /proc/PID/stat reads "Z", yet the process lives on. ctypes releases the GIL for the call.
ZOMBIE_LEADER = """
import ctypes, os, sys, threading, time
pid_dir, mode = sys.argv[1], sys.argv[2]
if mode == "escapee":
    os.setsid()  # out of the leader's process group: only the /proc walk can find it
threading.Thread(target=time.sleep, args=(60,)).start()
open(os.path.join(pid_dir, str(os.getpid())), "w").close()
ctypes.CDLL(None).pthread_exit(None)
"""


def proc_state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return "gone"


def threads_alive(pid: int) -> bool:
    """True while the thread group of pid has a live thread (its leader may read Z)."""
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return False
    return any(proc_state_of_task(pid, tid) not in ("Z", "X", "gone") for tid in tids)


def proc_state_of_task(pid: int, tid: str) -> str:
    try:
        return Path(f"/proc/{pid}/task/{tid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return "gone"


def zombie_leader_cmd(pid_dir: Path, mode: str) -> list[str]:
    """A shell that starts the zombie-leader process in the background, waits until its
    leader thread has exited (state Z), then either waits (deadline) or exits 0 (sweep)."""
    starter = " ".join(map(_q, py(ZOMBIE_LEADER, str(pid_dir), mode)))
    wait_z = (f'while [ -z "$(ls {pid_dir})" ]; do sleep 0.01; done; p=$(ls {pid_dir}); '
              'while [ "$(cut -d" " -f3 /proc/$p/stat)" != Z ]; do sleep 0.01; done')
    tail = "exec sleep 60" if mode == "escapee" else "exit 0"
    return ["sh", "-c", f"{starter} & {wait_z}; echo leader-thread-gone; {tail}"]


def _q(arg: str) -> str:
    return "'" + arg.replace("'", "'\\''") + "'"


@pytest.mark.parametrize("mode", ["sweep", "escapee"])
def test_process_whose_leader_thread_exited_is_killed(containment: str, pid_dir: Path, mode: str) -> None:
    """Issue 10.1: such a process reads Z in /proc but is not dead; it must be signalled."""
    result = run(zombie_leader_cmd(pid_dir, mode), timeout=None if mode == "sweep" else 1.5,
                 grace=0.5, backend="native")

    (pid,) = recorded_pids(pid_dir)
    assert result.stdout == b"leader-thread-gone\n"
    assert result.unkillable == 0
    assert not threads_alive(pid)
    if mode == "sweep":
        assert result.returncode == 0 and result.swept_after_exit == 1
    else:
        assert result.timed_out and result.killed_at_deadline == 2  # sh and the escapee
    assert result.duration_s < 4  # was ~11 s: grace, then the 10 s give-up bound


# ----------------------------------------------------------------------------- item 2

#: A double-forked daemon that, once re-parented to the shepherd, sends it SIGUSR1 (as X
#: servers signal their parent when ready), then lingers. The leader waits for that, exits 0.
SIGNALS_ITS_NEW_PARENT = """
import os, signal, sys, time
pid_dir = sys.argv[1]
if os.fork() == 0:
    os.setsid()
    middle = os.getpid()
    if os.fork() == 0:
        while os.getppid() == middle:
            time.sleep(0.005)
        open(os.path.join(pid_dir, str(os.getpid())), "w").close()
        for sig in (signal.SIGUSR1, signal.SIGUSR2, signal.SIGALRM, signal.SIGTSTP,
                    signal.SIGPIPE, signal.SIGRTMIN):
            os.kill(os.getppid(), sig)
        open(os.path.join(pid_dir, "sent"), "w").close()
        time.sleep(60)
    os._exit(0)
while not os.path.exists(os.path.join(pid_dir, "sent")):
    time.sleep(0.005)
time.sleep(0.2)  # the shepherd had time to die of it, if it would
print("leader passes", flush=True)
"""


def test_orphan_that_signals_the_shepherd_does_not_kill_it(containment: str, pid_dir: Path) -> None:
    """Issue 10.2: SIGUSR1 (and friends) from an orphan killed the shepherd; the daemon lived."""
    result = run(py(SIGNALS_ITS_NEW_PARENT, str(pid_dir)), timeout=20, grace=1, backend="native")

    (daemon,) = recorded_pids(pid_dir)
    assert result.spawn_error is None, result.spawn_error  # was "... killed by signal 10"
    assert result.returncode == 0
    assert result.stdout == b"leader passes\n"
    assert result.swept_after_exit == 1
    assert not pid_alive(daemon)


#: Not a Python child: Python itself ignores SIGPIPE and SIGXFSZ at start-up.
SHOW_SIGNAL_STATE = ["grep", "-E", "^Sig(Ign|Blk):", "/proc/self/status"]
SIGNAL_STATE_CLEAN = b"SigBlk:\t0000000000000000\nSigIgn:\t0000000000000000\n"


def _callers_unusual_ignores() -> int:
    """Signals this process ignores beyond what Python itself sets (SIGPIPE, SIGXFSZ), which
    subprocess restores in the child: a caller started with more ignored passes them on."""
    status = dict(line.split(":", 1) for line in open("/proc/self/status"))
    ignored = int(status["SigIgn"], 16)
    for sig in (signal.SIGPIPE, signal.SIGXFSZ):
        ignored &= ~(1 << (sig - 1))
    return ignored


def test_command_starts_with_default_dispositions_and_an_empty_mask(backend: str) -> None:
    """Issue 10.2: nothing ignored (32 and 33 included) and nothing blocked in the command."""
    if backend == "subprocess" and _callers_unusual_ignores():
        pytest.skip("this pytest ignores signals that the subprocess backend passes on")
    result = run(SHOW_SIGNAL_STATE, timeout=30, backend=backend)

    assert result.returncode == 0, result.stderr
    assert result.stdout == SIGNAL_STATE_CLEAN  # native: SigIgn was 0000000180000000


def test_callers_ignored_and_blocked_signals_do_not_reach_the_command(native: str) -> None:
    old_mask = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGUSR1, signal.SIGRTMIN + 3})
    old_usr2 = signal.signal(signal.SIGUSR2, signal.SIG_IGN)
    try:
        result = run(SHOW_SIGNAL_STATE, timeout=30, backend=native)
    finally:
        signal.signal(signal.SIGUSR2, old_usr2)
        signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)

    assert result.stdout == SIGNAL_STATE_CLEAN


# ----------------------------------------------------------------------------- item 3

#: Runs as pid 1 of a new pid namespace that still sees the machine's /proc. The shepherd is
#: pid 2 there, and /proc/2 is the machine's kthreadd, whose children have the small pids
#: that our bystanders get in the new namespace. The bystanders start once the run is going
#: (from on_output), outside the run's tree: they must survive its deadline.
FOREIGN_PROC_CALLER = """
import json, os, subprocess, sys
from retest.proc_group import run
bystanders = []
def start_bystanders(stream, chunk):
    if not bystanders:
        bystanders.extend(subprocess.Popen(["sleep", "60"]) for _ in range(40))
result = run(["sh", "-c", "echo started; exec sleep 60"], timeout=1.5, grace=0.5,
             on_output=start_bystanders, backend=sys.argv[1])
survivors = [p.pid for p in bystanders if p.poll() is None]
for p in bystanders:
    p.kill()
    p.wait()
print(json.dumps({"me": os.getpid(), "bystanders": len(bystanders), "survivors": len(survivors),
                  "timed_out": result.timed_out, "returncode": result.returncode,
                  "proc_foreign": getattr(result, "proc_foreign", None), "spawn_error": result.spawn_error,
                  "containment": getattr(result, "containment", None)}))
"""


def _unshare_pid_works() -> str | None:
    """None if ``unshare --pid --fork`` works here, else why not."""
    if os.geteuid() != 0:
        return "needs root (a new pid namespace)"
    if shutil.which("unshare") is None:
        return "unshare (util-linux) not installed"
    probe = subprocess.run(["unshare", "--pid", "--fork", "true"], capture_output=True, timeout=30)
    if probe.returncode != 0:
        return f"unshare --pid --fork failed: {probe.stderr.decode(errors='replace').strip()}"
    return None


def test_foreign_proc_never_kills_a_bystander(containment: str) -> None:
    """Issue 10.3: under ``unshare --pid --fork`` (no new /proc) the walk read another
    namespace's processes and SIGTERMed bystanders that are not part of the run."""
    why = _unshare_pid_works()
    if why:
        pytest.skip(why)
    # pid 1 of the namespace exits at the end: the kernel then kills whatever is left in it
    done = subprocess.run(["unshare", "--pid", "--fork", PY, "-c",
                           textwrap.dedent(FOREIGN_PROC_CALLER), "native"],
                          capture_output=True, timeout=60, env=child_env())

    assert done.returncode == 0, done.stderr.decode(errors="replace")
    report = json.loads(done.stdout)
    assert report["me"] == 1  # really pid 1 of a new namespace
    assert report["bystanders"] == 40
    assert report["survivors"] == 40  # was: the bystanders on kthreadd's pids were killed
    # cgroup mode needs no /proc to find the tree: it is not degraded (nothing to report)
    assert report["proc_foreign"] is (containment == "subreaper")
    assert report["containment"] == containment
    assert report["timed_out"] and report["returncode"] == -signal.SIGTERM
    assert report["spawn_error"] is None


def test_own_proc_is_not_reported_foreign(backend: str) -> None:
    result = run(["true"], timeout=30, backend=backend)
    assert result.proc_foreign is False
    assert result.to_dict()["proc_foreign"] is False


# ----------------------------------------------------------------------------- item 4

BIG_TREE = """
import os, sys, time
pid_dir, n = sys.argv[1], int(sys.argv[2])
for _ in range(n):
    if os.fork() == 0:
        open(os.path.join(pid_dir, str(os.getpid())), "w").close()
        time.sleep(60)
        os._exit(0)
while len(os.listdir(pid_dir)) < n:
    time.sleep(0.01)
print("tree ready", flush=True)
time.sleep(60)
"""


def test_a_250_process_tree_is_killed_at_the_deadline(containment: str, pid_dir: Path) -> None:
    """Issue 10.4: with pidfds the walk verifies each process before signalling it."""
    result = run(py(BIG_TREE, str(pid_dir), "249"), timeout=8, grace=2, backend="native")

    pids = recorded_pids(pid_dir)
    assert len(pids) == 249
    assert result.stdout == b"tree ready\n"
    assert result.timed_out
    assert result.killed_at_deadline == 250
    assert not result.escalated and result.unkillable == 0
    assert alive(pids) == []


def _reuse_window_tools() -> str | None:
    """None if this machine can stage a pid reuse on demand, else why not."""
    if os.geteuid() != 0:
        return "needs root (ns_last_pid)"
    if platform.machine() != "x86_64":
        return "reads the x86_64 syscall number of kill from /proc/PID/syscall"
    if shutil.which("strace") is None:
        return "strace not installed"
    return None


def _stopped_in_kill(pid: int) -> bool:
    """True while pid sits in a ptrace stop at the entry of kill() (x86_64: 62)."""
    try:
        return Path(f"/proc/{pid}/syscall").read_text().split()[0] == "62"
    except (OSError, IndexError):
        return False


def test_a_pid_reused_between_walk_and_kill_is_not_signalled(containment: str, pid_dir: Path) -> None:
    """Issue 10.4: strace holds the shepherd at its first kill(), after the walk; meanwhile a
    walked process dies and a bystander is given its pid. kill() by number hit the bystander;
    the pidfd taken at the walk refers to the dead process, so nothing is hit."""
    why = _reuse_window_tools()
    if why:
        pytest.skip(why)
    cmd = f"sleep 60 & touch {pid_dir}/victim-$!; touch {pid_dir}/leader-$$; wait"
    outcome: dict[str, object] = {}
    runner = threading.Thread(target=lambda: outcome.update(
        result=run(["sh", "-c", cmd], timeout=1.5, grace=1, backend="native")))
    tracer = bystander = None
    runner.start()
    try:
        assert wait_until(lambda: len(recorded_pids(pid_dir)) == 2, timeout=10)
        names = {n.split("-")[0]: int(n.split("-")[1]) for n in os.listdir(pid_dir)}
        victim, leader = names["victim"], names["leader"]
        shepherd = int(Path(f"/proc/{leader}/stat").read_text().rsplit(")", 1)[1].split()[1])
        tracer = subprocess.Popen(["strace", "-qq", "-o", os.devnull, "-e", "trace=kill",
                                   "-e", "inject=kill:delay_enter=3000000:when=1", "-p", str(shepherd)])
        assert wait_until(lambda: _stopped_in_kill(shepherd), timeout=10), "no kill() seen"
        os.kill(victim, signal.SIGKILL)  # sh's wait reaps it: its pid is free again
        assert wait_until(lambda: not os.path.exists(f"/proc/{victim}"), timeout=2)
        bystander = child_with_pid(victim)
        if bystander is None:
            pytest.skip("could not get the freed pid back (a busy machine)")
        runner.join(timeout=30)
        assert not runner.is_alive()
        assert outcome["result"].timed_out  # type: ignore[attr-defined]
        assert bystander.poll() is None, f"bystander killed: {bystander.returncode}"
    finally:
        runner.join(timeout=30)
        for proc in (bystander, tracer):
            if proc is not None and proc.poll() is None:
                proc.kill()
            if proc is not None:
                proc.wait(timeout=10)


# ----------------------------------------------------------------------------- item 5


def test_path_search_goes_on_after_a_candidate_that_cannot_be_executed(backend: str,
                                                                       tmp_path: Path) -> None:
    """Issue 10.5: like subprocess (and execvp), a broken first candidate is skipped."""
    broken, good, unreadable = tmp_path / "p1", tmp_path / "p2", tmp_path / "p0"
    for d in (broken, good, unreadable):
        d.mkdir()
    (broken / "foo").write_bytes(b"\x00\x01 not a program\n")
    (good / "foo").write_text("#!/bin/sh\necho from p2\n")
    (unreadable / "foo").write_text("#!/bin/sh\necho from p0\n")
    for f in (broken / "foo", good / "foo"):
        f.chmod(0o755)
    (unreadable / "foo").chmod(0o644)  # EACCES (even for root: no x bit at all)
    env = {"PATH": f"{unreadable}:{broken}:{good}"}

    result = run(["foo"], env=env, timeout=30, backend=backend)

    assert result.spawn_error is None, result.spawn_error  # native said ENOEXEC
    assert result.returncode == 0
    assert result.stdout == b"from p2\n"


def test_path_search_reports_the_first_real_error(backend: str, tmp_path: Path) -> None:
    """When every candidate fails, the first error other than ENOENT/ENOTDIR is reported."""
    (tmp_path / "p1").mkdir()
    (tmp_path / "p2").mkdir()
    (tmp_path / "p1" / "foo").write_bytes(b"\x00\x01 not a program\n")
    (tmp_path / "p1" / "foo").chmod(0o755)
    (tmp_path / "p2" / "foo").write_text("#!/bin/sh\n")
    (tmp_path / "p2" / "foo").chmod(0o644)
    env = {"PATH": f"{tmp_path / 'missing'}:{tmp_path / 'p1'}:{tmp_path / 'p2'}"}

    result = run(["foo"], env=env, timeout=30, backend=backend)

    assert result.returncode is None
    assert result.spawn_errno == 8  # ENOEXEC from p1, not EACCES from p2


def test_tee_write_failure_is_logged_once(backend: str, caplog: pytest.LogCaptureFixture) -> None:
    """Issue 10.5: a tee nobody reads (EPIPE) was silent in the native backend."""
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        with caplog.at_level(logging.WARNING, logger="retest.proc_group"):
            result = run(py("import sys; sys.stdout.write('x' * 100); sys.stderr.write('y')"),
                         tee=write_end, timeout=30, backend=backend)
    finally:
        os.close(write_end)

    assert result.returncode == 0
    assert result.stdout == b"x" * 100
    warnings = [r.getMessage() for r in caplog.records if "tee write failed" in r.getMessage()]
    assert warnings and all("Broken pipe" in w for w in warnings), warnings
    if backend == "native":
        assert len(warnings) == 1, warnings  # the tee stops at its first error
    # (the subprocess backend tees each stream after the run, and warns for each)


@pytest.mark.parametrize("limit", [2**63 - 1, 2**63, 2**70])
def test_a_capture_limit_beyond_any_buffer_keeps_everything(backend: str, limit: int) -> None:
    """Issue 10.5: 2**63 raised OverflowError in the native backend only."""
    result = run(py("import sys; sys.stdout.write('z' * 300000)"), capture_limit=limit,
                 timeout=30, backend=backend)

    assert result.returncode == 0
    assert result.stdout == b"z" * 300000
    assert result.stdout_dropped == 0


def test_retest_run_into_a_closed_pipe_stops_quietly(native: str, pid_dir: Path) -> None:
    """Issue 10.5: ``retest run ... | head -c 100`` ended in a BrokenPipeError traceback and 125.
    Now it stops like a GNU tool (141 = 128 + SIGPIPE), and the run still kills its tree."""
    writer = f'touch {pid_dir}/$$; while :; do echo "a line of output"; done'
    proc = subprocess.Popen([PY, "-m", "retest", "run", "--timeout", "30", "--", "sh", "-c", writer],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=child_env())
    try:
        assert proc.stdout is not None and proc.stderr is not None
        head = proc.stdout.read(100)
        proc.stdout.close()  # what head -c 100 does next
        stderr = proc.stderr.read()
        status = proc.wait(timeout=20)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()

    assert len(head) == 100
    assert b"Traceback" not in stderr, stderr.decode(errors="replace")
    assert b"BrokenPipeError" not in stderr
    assert status == 128 + signal.SIGPIPE
    (shell,) = recorded_pids(pid_dir)
    assert wait_until(lambda: not pid_alive(shell), timeout=2)
