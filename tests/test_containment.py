"""What only the native backend promises: the whole process tree is contained.

``subprocess.run`` kills the direct child and nothing else; these tests drive real trees
(xdist workers, setsid escapees, double-fork daemons, fork trees, stopped and
SIGTERM-ignoring processes) and assert that every process of the tree is gone when
``run()`` returns, or when the caller itself is interrupted or killed.

Tree processes record their pids as files in a directory of the test (helpers_proc);
every test kills what it recorded in a ``finally``, so a failing test leaves nothing.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import threading
import time
from pathlib import Path

import pytest

from helpers_proc import (
    PY,
    alive,
    child_env,
    children_of,
    descendants,
    kill_recorded,
    pid_alive,
    py,
    record_sh,
    recorded_pids,
    wait_until,
)
from retest import proc_group
from retest.proc_group import run


def proc_state(pid: int) -> str:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return "gone"
    return stat.rsplit(")", 1)[1].split()[0]


def proc_sid(pid: int) -> int:
    stat = Path(f"/proc/{pid}/stat").read_text()
    return int(stat.rsplit(")", 1)[1].split()[3])


# ----------------------------------------------------------------------------- pytest-xdist

XDIST_CONFTEST = """
import os
PIDS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "pids")

def pytest_configure(config):
    # the controller and every worker run this
    open(os.path.join(PIDS, "cfg-%d" % os.getpid()), "w").close()
"""

XDIST_TESTS = """
import os, subprocess, time
from conftest import PIDS

def record(kind):
    open(os.path.join(PIDS, "%s-%d" % (kind, os.getpid())), "w").close()

def test_sleeps():
    record("test")
    time.sleep(30)

def test_starts_a_server_then_sleeps():
    record("test")
    # a helper of the test that leaves the worker's session, as test servers often do
    subprocess.Popen(["sh", "-c", 'touch "$0/server-$$"; exec sleep 30', PIDS],
                     start_new_session=True)
    time.sleep(30)
"""


def make_xdist_suite(tmp_path: Path) -> tuple[Path, Path]:
    pytest.importorskip("xdist", reason="pytest-xdist is part of the test extra")
    suite = tmp_path / "suite"
    (suite / "pids").mkdir(parents=True)
    (suite / "conftest.py").write_text(XDIST_CONFTEST)
    (suite / "test_slow.py").write_text(XDIST_TESTS)
    return suite, suite / "pids"


#: Long enough for xdist to start two workers and reach the tests on a loaded 2-core CI
#: machine (3 s was not); the tests sleep 30 s, so the deadline still fires.
XDIST_DEADLINE_S = 8


def xdist_argv(suite: Path) -> list[str]:
    return [PY, "-m", "pytest", "-n", "2", "-p", "no:cacheprovider", "-q", str(suite)]


def kinds(pid_dir: Path) -> dict[str, set[int]]:
    out: dict[str, set[int]] = {}
    for name in os.listdir(pid_dir):
        kind, _, pid = name.rpartition("-")
        out.setdefault(kind, set()).add(int(pid))
    return out


def test_xdist_workers_are_killed_at_the_deadline(containment: str, tmp_path: Path) -> None:
    suite, pids = make_xdist_suite(tmp_path)
    try:
        result = run(xdist_argv(suite), timeout=XDIST_DEADLINE_S, grace=1, backend="native", env=child_env())

        recorded = kinds(pids)
        workers = recorded.get("test", set())
        assert len(recorded.get("cfg", ())) == 3, f"controller + 2 workers expected: {recorded}"
        assert len(workers) == 2, f"both workers should have been inside a test: {recorded}"
        assert workers < recorded["cfg"]
        assert len(recorded.get("server", ())) == 1
        everyone = set(recorded_pids(pids))
        assert result.timed_out
        assert result.returncode == -signal.SIGTERM
        assert result.killed_at_deadline >= len(everyone)
        assert result.containment == containment  # controller, workers, the server
        assert alive(everyone) == []  # nothing of the tree outlives run()
        assert XDIST_DEADLINE_S <= result.duration_s < XDIST_DEADLINE_S + 1 + 2
    finally:
        kill_recorded(recorded_pids(pids))


def test_subprocess_backend_leaves_xdist_workers_alive(tmp_path: Path) -> None:
    """The contrast that motivated the native runner: subprocess.run orphans the workers."""
    suite, pids = make_xdist_suite(tmp_path)
    try:
        result = run(xdist_argv(suite), timeout=XDIST_DEADLINE_S, backend="subprocess", env=child_env())

        recorded = kinds(pids)
        workers = recorded.get("test", set())
        assert result.timed_out and result.returncode == -signal.SIGKILL
        assert len(workers) == 2, recorded
        controller = recorded["cfg"] - workers
        assert alive(controller) == []  # only the direct child was killed...
        assert sorted(alive(workers)) == sorted(workers)  # ...the workers live on
        assert alive(recorded["server"]) == sorted(recorded["server"])
    finally:
        # Ours to clean up, by recorded pid only (the autouse guard checks we did).
        kill_recorded(recorded_pids(pids))


# ----------------------------------------------------------------------------- escapees


ESCAPEE_LEADER = r"""
setsid sh -c 'touch "$0/$$"; exec sleep 60' "$D" &
while [ -z "$(ls "$D")" ]; do sleep 0.01; done
pid=$(ls "$D")
echo "escapee $pid sid $(cut -d' ' -f6 /proc/$pid/stat) leader $$"
"""


def test_setsid_escapee_holding_the_pipe_is_swept_after_a_passing_leader(containment: str, pid_dir: Path) -> None:
    started = time.monotonic()
    result = run(["sh", "-c", ESCAPEE_LEADER + "exit 0"], env=dict(os.environ, D=str(pid_dir)),
                 timeout=30, grace=1, backend="native")
    elapsed = time.monotonic() - started

    match = re.fullmatch(rb"escapee (\d+) sid (\d+) leader (\d+)\n", result.stdout)
    assert match, result.stdout
    escapee, sid, leader = (int(x) for x in match.groups())
    assert sid == escapee != leader  # it really left the leader's session
    assert result.containment == containment
    assert result.returncode == 0 and not result.timed_out
    assert result.swept_after_exit >= 1
    assert not pid_alive(escapee)
    assert elapsed < 5  # not the escapee's 60 s, though it held our stdout


def test_setsid_escapee_is_killed_at_the_deadline(containment: str, pid_dir: Path) -> None:
    result = run(["sh", "-c", ESCAPEE_LEADER + "exec sleep 60"], env=dict(os.environ, D=str(pid_dir)),
                 timeout=1, grace=1, backend="native")

    (escapee,) = recorded_pids(pid_dir)
    assert result.timed_out
    assert result.returncode == -signal.SIGTERM
    assert result.killed_at_deadline == 2  # the leader (sleep) and the escapee
    assert not pid_alive(escapee)
    assert result.duration_s < 1 + 1 + 2


GRANDCHILD_HOLDS_PIPE = """
import os, signal, sys, time
pid_dir, ignore_term = sys.argv[1], sys.argv[2] == "ignore-term"
child = os.fork()
if child == 0:
    if ignore_term:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    open(os.path.join(pid_dir, str(os.getpid())), "w").close()
    print("grandchild writes before the leader exits", flush=True)
    time.sleep(60)  # stdout and stderr stay open: it holds our pipes
    os._exit(0)
while not os.listdir(pid_dir):
    time.sleep(0.005)
time.sleep(0.05)
print("leader done", flush=True)
os._exit(0)
"""


def test_grandchild_holding_the_pipe_after_the_leader_exits_0(containment: str, pid_dir: Path) -> None:
    result = run(py(GRANDCHILD_HOLDS_PIPE, str(pid_dir), "default"), timeout=30, grace=2,
                 backend="native")

    (grandchild,) = recorded_pids(pid_dir)
    assert result.returncode == 0
    assert not result.timed_out and not result.escalated
    assert result.swept_after_exit == 1
    assert result.stdout == b"grandchild writes before the leader exits\nleader done\n"
    assert not pid_alive(grandchild)
    assert result.duration_s < 2  # it died on SIGTERM: no grace wait, no 60 s wait


def test_grandchild_that_ignores_sigterm_is_killed_after_grace(containment: str, pid_dir: Path) -> None:
    result = run(py(GRANDCHILD_HOLDS_PIPE, str(pid_dir), "ignore-term"), timeout=30, grace=0.5,
                 backend="native")

    (grandchild,) = recorded_pids(pid_dir)
    assert result.returncode == 0  # the leader's own status survives the sweep
    assert not result.timed_out
    assert result.escalated
    assert result.swept_after_exit == 1
    assert not pid_alive(grandchild)
    assert 0.5 <= result.duration_s < 0.5 + 2


DOUBLE_FORK_DAEMON = """
import os, sys, time
pid_dir = sys.argv[1]
first = os.fork()
if first == 0:
    os.setsid()
    if os.fork() == 0:
        # the daemon: no controlling anything, stdio on /dev/null (it does NOT hold our pipe)
        null = os.open(os.devnull, os.O_RDWR)
        for fd in (0, 1, 2):
            os.dup2(null, fd)
        os.chdir("/")
        open(os.path.join(pid_dir, str(os.getpid())), "w").close()
        time.sleep(60)
    os._exit(0)
os.waitpid(first, 0)
while not os.listdir(pid_dir):
    time.sleep(0.005)
print("daemon started; leader passes", flush=True)
"""


def test_double_fork_daemon_left_by_a_passing_run_is_swept(containment: str, pid_dir: Path) -> None:
    result = run(py(DOUBLE_FORK_DAEMON, str(pid_dir)), timeout=30, grace=2, backend="native")

    (daemon,) = recorded_pids(pid_dir)
    assert result.returncode == 0 and result.ok
    assert result.containment == containment
    assert result.stdout == b"daemon started; leader passes\n"
    assert result.swept_after_exit == 1
    assert not pid_alive(daemon)
    assert result.duration_s < 2


def test_stopped_leftover_is_continued_and_swept(containment: str, pid_dir: Path) -> None:
    """A stopped process acts on SIGTERM only once continued: the sweep must send SIGCONT."""
    cmd = (f'sh -c \'{record_sh(pid_dir)}; exec sleep 60\' & '
           f'while [ -z "$(ls {pid_dir})" ]; do sleep 0.01; done; kill -STOP $!; '
           # leave only once it is really stopped (state T), so the sweep meets a stopped process
           'while [ "$(cut -d" " -f3 /proc/$!/stat)" != T ]; do sleep 0.01; done; exit 0')

    result = run(["sh", "-c", cmd], timeout=30, grace=5, backend="native")

    (leftover,) = recorded_pids(pid_dir)
    assert result.returncode == 0
    assert result.swept_after_exit == 1
    assert not result.escalated
    assert not pid_alive(leftover)
    assert result.duration_s < 2  # well under the 5 s grace: SIGTERM worked


# ----------------------------------------------------------------------------- deadline escalation


def test_leader_that_ignores_sigterm_is_killed_after_grace(containment: str, pid_dir: Path) -> None:
    cmd = f'trap "" TERM; {record_sh(pid_dir)}; exec sleep 60'  # sleep inherits the ignored TERM

    result = run(["sh", "-c", cmd], timeout=0.5, grace=0.7, backend="native")

    (leader,) = recorded_pids(pid_dir)
    assert leader == result.pid
    assert result.timed_out
    assert result.escalated
    assert result.returncode == -signal.SIGKILL
    assert result.killed_at_deadline == 1
    assert not pid_alive(leader)
    assert 0.5 + 0.7 - 0.05 <= result.duration_s < 0.5 + 0.7 + 1.5


def test_leader_that_stops_itself_is_continued_and_terminated(containment: str, pid_dir: Path) -> None:
    cmd = (f'sleep 60 & kill -STOP $!; touch {pid_dir}/bg-$!; '
           f'{record_sh(pid_dir)}; kill -STOP $$; echo resumed')
    states: dict[int, str] = {}

    def watch() -> None:
        # Prove the precondition: both really were stopped before the deadline fired.
        if wait_until(lambda: len(recorded_pids(pid_dir)) == 2, timeout=5):
            for pid in recorded_pids(pid_dir):
                wait_until(lambda: proc_state(pid) == "T", timeout=2, interval=0.005)
                states[pid] = proc_state(pid)

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        result = run(["sh", "-c", cmd], timeout=0.6, grace=5, backend="native")
    finally:
        watcher.join()

    assert sorted(states.values()) == ["T", "T"], states
    assert result.timed_out
    assert result.returncode == -signal.SIGTERM  # SIGCONT let it act on SIGTERM
    assert not result.escalated  # no need to wait 5 s for SIGKILL
    assert result.killed_at_deadline == 2
    assert b"resumed" not in result.stdout
    assert alive(recorded_pids(pid_dir)) == []
    assert result.duration_s < 0.6 + 2


FORK_TREE = """
import os, sys, time
pid_dir, depth, fanout = sys.argv[1], 3, 3
expected = sum(fanout ** level for level in range(depth + 1))

def live(level):
    open(os.path.join(pid_dir, str(os.getpid())), "w").close()
    for _ in range(fanout if level < depth else 0):
        if os.fork() == 0:
            if level + 1 == depth and os.getpid() % 2:
                os.setsid()  # some leaves leave the group, as daemons do
            live(level + 1)
    if level == 0:
        while len(os.listdir(pid_dir)) < expected:
            time.sleep(0.005)
        print("tree of", expected, flush=True)
    time.sleep(60)
    os._exit(0)

live(0)
"""


def test_fork_tree_is_killed_at_the_deadline(containment: str, pid_dir: Path) -> None:
    result = run(py(FORK_TREE, str(pid_dir)), timeout=2, grace=1, backend="native")

    tree = recorded_pids(pid_dir)
    assert result.stdout == b"tree of 40\n", "the tree was not complete before the deadline"
    assert result.containment == containment
    assert len(tree) == 40
    assert result.timed_out
    assert result.killed_at_deadline == 40
    assert not result.escalated
    assert alive(tree) == []


FORKS_WHILE_DYING = """
import os, signal, sys, time
pid_dir = sys.argv[1]
signal.signal(signal.SIGTERM, signal.SIG_IGN)  # inherited by every child
for _ in range(60):
    if os.fork() == 0:
        open(os.path.join(pid_dir, str(os.getpid())), "w").close()
        time.sleep(60)
        os._exit(0)
    time.sleep(0.02)  # keeps forking through the deadline and the grace period
time.sleep(60)
"""


def test_tree_that_keeps_forking_through_the_grace_period_is_killed(containment: str, pid_dir: Path) -> None:
    result = run(py(FORKS_WHILE_DYING, str(pid_dir)), timeout=0.4, grace=0.4, backend="native")

    children = recorded_pids(pid_dir)
    assert result.timed_out and result.escalated
    assert result.returncode == -signal.SIGKILL
    assert len(children) >= 5
    assert alive(children) == []
    assert result.duration_s < 0.4 + 0.4 + 2


def test_tree_cpu_and_memory_are_accounted(containment: str) -> None:
    code = """
import os, time
if os.fork() == 0:
    block = bytearray(64 * 1024 * 1024)
    for i in range(0, len(block), 4096):
        block[i] = 1  # touch every page
    end = time.process_time() + 0.3
    while time.process_time() < end:
        pass
    os._exit(0)
os.wait()
"""
    result = run(py(code), timeout=30, backend="native")

    assert result.returncode == 0
    assert result.user_cpu_s + result.sys_cpu_s >= 0.25  # the grandchild's CPU, not just the leader's
    assert result.max_rss_kb >= 60 * 1024


# ----------------------------------------------------------------------------- the caller


def test_exception_in_on_output_kills_the_tree_promptly(containment: str, pid_dir: Path) -> None:
    def stop(stream: str, chunk: bytes) -> None:
        raise KeyboardInterrupt

    cmd = f'{record_sh(pid_dir)}; sh -c \'{record_sh(pid_dir)}; exec sleep 60\' & sleep 0.1; echo go; wait'
    started = time.monotonic()
    with pytest.raises(KeyboardInterrupt):
        run(["sh", "-c", cmd], on_output=stop, timeout=30, grace=1, backend="native")

    assert time.monotonic() - started < 3
    assert len(recorded_pids(pid_dir)) == 2
    assert alive(recorded_pids(pid_dir)) == []


CALLER = """
import os, signal, sys
from retest.proc_group import run
# A background job of a non-interactive shell starts with SIGINT ignored, and Python then
# installs no KeyboardInterrupt handler: ask for the one an interactive caller has.
signal.signal(signal.SIGINT, signal.default_int_handler)
pid_dir = sys.argv[1]
tree = (
    'touch "$D/$$"; '
    'setsid sh -c \\'touch "$D/$$"; exec sleep 60\\' & '          # an escapee
    'sh -c \\'trap "" TERM; touch "$D/$$"; exec sleep 60\\' & '   # ignores SIGTERM
    'sleep 60 & wait'
)
print("caller", os.getpid(), flush=True)
try:
    result = run(["sh", "-c", tree], env=dict(os.environ, D=pid_dir), grace=1)
except KeyboardInterrupt:
    print("run() raised KeyboardInterrupt", flush=True)
    raise
print("run() returned", result, flush=True)
"""


def start_caller(pid_dir: Path) -> subprocess.Popen:
    """A child Python that calls run() on a 4-process tree; returns once the tree is up."""
    caller = subprocess.Popen(py(CALLER, str(pid_dir)), env=child_env(), stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, start_new_session=True)
    if not wait_until(lambda: len(recorded_pids(pid_dir)) == 3, timeout=10):
        caller.kill()
        out, err = caller.communicate()
        pytest.fail(f"the tree did not start: {out!r} {err!r}")
    return caller


@pytest.mark.parametrize("target", ["process", "process-group"])
def test_ctrl_c_in_the_caller_kills_the_tree_and_propagates(containment: str, pid_dir: Path, target: str) -> None:
    caller = start_caller(pid_dir)
    try:
        shepherd_and_tree = descendants(caller.pid)
        assert len(shepherd_and_tree) >= 5  # the shepherd, sh, escapee, TERM-ignorer, sleep
        if target == "process":
            os.kill(caller.pid, signal.SIGINT)
        else:
            os.killpg(caller.pid, signal.SIGINT)  # what a terminal's Ctrl-C does
        sent = time.monotonic()
        out, err = caller.communicate(timeout=15)
        took = time.monotonic() - sent

        # An uncaught KeyboardInterrupt makes Python exit by SIGINT, after a traceback.
        assert caller.returncode == -signal.SIGINT, (out, err)
        assert b"run() raised KeyboardInterrupt" in out
        assert b"run() returned" not in out
        assert b"Traceback" in err and b"KeyboardInterrupt" in err
        assert took < 1 + 2  # grace for the TERM-ignorer, then SIGKILL
        assert alive(shepherd_and_tree) == []
        assert alive(recorded_pids(pid_dir)) == []
    finally:
        if caller.poll() is None:
            caller.kill()
            caller.communicate()
        kill_recorded(recorded_pids(pid_dir))


def test_caller_killed_with_sigkill_takes_the_tree_down(containment: str, pid_dir: Path) -> None:
    caller = start_caller(pid_dir)
    try:
        shepherd_and_tree = descendants(caller.pid)
        tree = recorded_pids(pid_dir)
        assert len(shepherd_and_tree) >= 5
        os.kill(caller.pid, signal.SIGKILL)
        caller.communicate(timeout=5)
        assert caller.returncode == -signal.SIGKILL

        # The shepherd sees its control socket hang up and runs the same escalation.
        grace = 1
        assert wait_until(lambda: alive(shepherd_and_tree) == [], timeout=grace + 2), (
            f"still alive {grace + 2} s after the caller died: {alive(shepherd_and_tree)}")
        assert alive(tree) == []
    finally:
        if caller.poll() is None:
            caller.kill()
            caller.communicate()
        kill_recorded(recorded_pids(pid_dir))


def _shepherds() -> list[int]:
    """The shepherds serving a run now (not the idle ones waiting for the next)."""
    found = []
    idle = set(proc_group.idle_shepherds())
    for pid in set(children_of(os.getpid())) - idle:
        try:
            if b"_retest_shepherd" in Path(f"/proc/{pid}/cmdline").read_bytes():
                found.append(pid)
        except OSError:
            pass
    return found


def test_shepherd_killed_mid_run_does_not_hang_the_caller(containment: str, pid_dir: Path) -> None:
    cmd = f'{record_sh(pid_dir)}; sh -c \'{record_sh(pid_dir)}; exec sleep 60\' & wait'
    outcome: dict[str, object] = {}

    def call() -> None:
        outcome["result"] = run(["sh", "-c", cmd], grace=1, backend="native")

    worker = threading.Thread(target=call)
    worker.start()
    try:
        assert wait_until(lambda: len(recorded_pids(pid_dir)) == 2 and _shepherds(), timeout=5)
        (shepherd,) = _shepherds()
        os.kill(shepherd, signal.SIGKILL)
        worker.join(3)
        hung = worker.is_alive()
        # The caller SIGKILLed the group but cannot reap it (not its children): a killed
        # process closes its pipes a moment before it is a zombie, so allow it that moment.
        wait_until(lambda: not alive(recorded_pids(pid_dir)), timeout=2)
        survivors = alive(recorded_pids(pid_dir))
    finally:
        kill_recorded(recorded_pids(pid_dir))  # unblocks a hung run()
        worker.join(10)
    assert not hung, f"run() still waiting 3 s after its shepherd died; tree alive: {survivors}"
    assert survivors == []
    result = outcome["result"]
    assert result.returncode is None
    assert "shepherd lost" in result.spawn_error


FD_KEEPER = """
import os, socket, sys, time
server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
server.bind(sys.argv[1])
server.listen(1)
print("listening", flush=True)
conn, _ = server.accept()
msg, fds, _, _ = socket.recv_fds(conn, 16, 4)
print("holding", len(fds), flush=True)
time.sleep(60)  # holds the run's stdout and stderr, from outside its tree
"""

HAND_OVER_PIPES = """
import socket, sys
client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
client.connect(sys.argv[1])
socket.send_fds(client, [b"x"], [1, 2])
print("handed over; leader exits 0", flush=True)
"""


def test_pipe_held_outside_the_tree_delays_the_return_only_briefly(containment: str, tmp_path: Path) -> None:
    """A process outside the tree got our pipes (SCM_RIGHTS): the drain after the tree is gone
    is bounded (docs/internals.md: 0.5 s), not as long as that holder lives."""
    address = str(tmp_path / "keeper.sock")
    keeper = subprocess.Popen(py(FD_KEEPER, address), stdout=subprocess.PIPE)
    try:
        assert keeper.stdout.readline() == b"listening\n"

        result = run(py(HAND_OVER_PIPES, address), timeout=30, grace=1, backend="native")

        assert keeper.stdout.readline() == b"holding 2\n"
        assert result.returncode == 0 and not result.timed_out
        assert result.stdout == b"handed over; leader exits 0\n"
        assert result.duration_s < 0.5 + 1.5
        assert keeper.poll() is None  # not ours to kill: it is outside the tree
    finally:
        keeper.kill()
        keeper.wait()
