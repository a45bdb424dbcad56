"""cgroup v2 mode and the leak report (issue 10, items 1 and 4).

cgroup-only: a shepherd SIGKILLed mid-run still leaves no setsid escapee (the caller kills
the cgroup), and each run's cgroup is empty and removed when run() returns. In both modes: a
fork storm bounded by pids.max is contained with nothing left, the leak report names what the
command left behind, and ``--fail-on-leak`` fails such a run. Whatever a test's tree records
in its ``pid_dir`` is killed afterwards (conftest), pass or fail.
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import re
import shlex
import signal
import subprocess
import sys
import textwrap
import threading
from pathlib import Path
from typing import Iterator, Optional

import pytest

from helpers_proc import PY, alive, child_env, kill_recorded, pid_alive, py, recorded_pids, wait_until
from retest import proc_group
from retest.proc_group import RunResult, run

#: A daemon that left the command's session; the command goes on once the daemon *is* ``sleep``
#: (its pid file is written before the exec, and a sweep in between would name a bare ``sh``,
#: or nothing at all mid-exec, slow under the sanitizers' LD_PRELOAD).
ESCAPEE = ('setsid sh -c \'touch "$D/$$"; exec sleep 60\' & '
           'until p=$(ls "$D") && [ -n "$p" ] && [ "$(cat "/proc/$p/comm" 2>/dev/null)" = sleep ]; '
           'do sleep 0.01; done; ')


def _shepherd_of(leader: int) -> int:
    return int(Path(f"/proc/{leader}/stat").read_text().rsplit(")", 1)[1].split()[1])


# ----------------------------------------------------------------------------- cgroup only


def test_shepherd_killed_mid_run_leaves_no_setsid_escapee(cgroup_mode: str, pid_dir: Path) -> None:
    """Without a cgroup only the shepherd knew the escapee (docs: Known limits); now the caller
    kills the run's cgroup when its shepherd is lost."""
    cmd = ESCAPEE + f'touch "$D/leader-$$"; exec sleep 60'
    outcome: dict[str, RunResult] = {}
    worker = threading.Thread(target=lambda: outcome.update(result=run(
        ["sh", "-c", cmd], env=dict(os.environ, D=str(pid_dir)), grace=1, backend="native")))
    worker.start()
    try:
        assert wait_until(lambda: len(recorded_pids(pid_dir)) == 2, timeout=10)
        leader = int(next(n for n in os.listdir(pid_dir) if n.startswith("leader-")).split("-")[1])
        (escapee,) = [p for p in recorded_pids(pid_dir) if p != leader]
        os.kill(_shepherd_of(leader), signal.SIGKILL)
        worker.join(5)
        hung = worker.is_alive()
        escapee_alive = pid_alive(escapee)
    finally:
        kill_recorded(recorded_pids(pid_dir))
        worker.join(10)
    assert not hung
    result = outcome["result"]
    assert "shepherd lost" in (result.spawn_error or "")
    assert result.containment == "cgroup"
    assert not escapee_alive  # was: alive, out of everyone's reach
    assert result.cgroup is not None and not os.path.exists(result.cgroup)


@pytest.mark.parametrize("end", ["passes", "sweep", "deadline", "sigterm-ignored"])
def test_each_runs_cgroup_is_emptied_and_removed(cgroup_mode: str, pid_dir: Path, end: str) -> None:
    tail = {"passes": "exit 0", "sweep": "exit 0", "deadline": "exec sleep 60",
            "sigterm-ignored": "trap '' TERM; sleep 60"}[end]
    cmd = (ESCAPEE if end != "passes" else "") + "cat /proc/self/cgroup; " + tail
    result = run(["sh", "-c", cmd], env=dict(os.environ, D=str(pid_dir)), timeout=1, grace=0.3,
                 backend="native")

    assert result.containment == "cgroup"
    assert result.cgroup is not None
    name = os.path.basename(result.cgroup)
    assert re.fullmatch(rf"retest-{os.getpid()}-\d+", name), name
    assert f"0::/{name}\n".encode() in result.stdout or f"/{name}\n".encode() in result.stdout
    if end == "sigterm-ignored":  # cgroup.kill was needed: a killed cgroup is never kept
        assert not os.path.exists(result.cgroup)  # rmdir succeeded: nothing was left in it
    else:  # emptied without a kill: removed, or kept for the next run, empty (issue 15)
        assert not os.path.exists(result.cgroup) or (
            Path(result.cgroup, "cgroup.procs").read_text() == ""
            and "populated 0" in Path(result.cgroup, "cgroup.events").read_text())
    assert alive(recorded_pids(pid_dir)) == []
    assert result.timed_out == (end in ("deadline", "sigterm-ignored"))
    assert result.escalated == (end == "sigterm-ignored")
    assert result.user_cpu_s + result.sys_cpu_s > 0  # from the cgroup's cpu.stat


def test_a_killed_cgroup_is_never_reused(cgroup_mode: str) -> None:
    """A run whose tree needed cgroup.kill leaves its cgroup removed; the next run gets a
    cgroup of its own, with nothing of the last one in it."""
    first = run(["sh", "-c", "trap '' TERM; sleep 60"], timeout=0.2, grace=0.2, backend="native")
    second = run(["cat", "/proc/self/cgroup"], timeout=10, backend="native")
    assert first.timed_out and first.escalated and second.returncode == 0
    assert first.cgroup is not None and second.cgroup is not None
    assert first.cgroup != second.cgroup and not os.path.exists(first.cgroup)
    assert os.path.basename(second.cgroup).encode() in second.stdout


def test_a_cgroup_that_emptied_as_made_serves_the_next_run(cgroup_mode: str) -> None:
    """Issue 15: a run that ends with its cgroup empty, unkilled and unchanged leaves it for
    the next run (~200 us of kernel work saved); that run's accounting is its own, not the
    sum of both (the shepherd subtracts where the counters stood)."""
    burn = ("import time\nt = time.process_time()\n"
            "while time.process_time() - t < 0.4: pass\n")
    first = run([PY, "-c", burn], timeout=30, backend="native")
    second = run(["cat", "/proc/self/cgroup"], timeout=30, backend="native")
    assert first.returncode == 0 and second.returncode == 0
    if not _reusable_here(first.cgroup):
        pytest.skip("the run cgroups here have controllers: each run gets a fresh one")
    assert second.cgroup == first.cgroup
    assert os.path.basename(second.cgroup).encode() in second.stdout
    assert first.user_cpu_s + first.sys_cpu_s >= 0.35
    assert second.user_cpu_s + second.sys_cpu_s < 0.2  # a cat, not 0.4 s plus a cat


def test_a_kept_cgroups_stall_is_counted_from_the_runs_start(cgroup_mode: str) -> None:
    """The run's own CPU stall (``pressure.run_cpu``, from the cgroup's cpu.pressure) of a run
    in a kept cgroup is this run's: the stall of the run before it, which the counter still
    holds, is not in it."""
    hogs = " & ".join(["sh -c 'while :; do :; done'"] * 4)
    starved = run(["sh", "-c", f"{hogs} & sleep 1.5; kill 0"], timeout=30, backend="native")
    quiet = run(["sleep", "1.2"], timeout=30, backend="native")
    if not _reusable_here(quiet.cgroup):
        pytest.skip("the run cgroups here have controllers: each run gets a fresh one")
    assert quiet.cgroup == starved.cgroup
    before, after = starved.pressure, quiet.pressure
    assert before is not None and before.run_cpu is not None and before.run_cpu.some_share
    assert before.run_cpu.some_share > 0.3  # 4 spinning shells on <= 2 cores stall each other
    assert after is not None and after.run_cpu is not None
    assert after.run_cpu.some_share is not None and after.run_cpu.some_share < 0.1


def test_a_kept_cgroup_someone_moved_into_is_not_used(cgroup_mode: str,
                                                      caplog: pytest.LogCaptureFixture) -> None:
    """A kept cgroup found populated when a run takes it (a process came back into it) is not
    the run's: nothing of the command ran yet, so the run goes again in another cgroup (said
    in a warning) rather than count a stranger, and the parent stays usable."""
    warm = run(["true"], timeout=30, backend="native")
    if not _reusable_here(warm.cgroup):
        pytest.skip("the run cgroups here have controllers: each run gets a fresh one")
    assert warm.cgroup is not None
    stranger = subprocess.Popen(["sleep", "30"])
    try:
        Path(warm.cgroup, "cgroup.procs").write_text(str(stranger.pid))
        with caplog.at_level(logging.WARNING, logger="retest.proc_group"):
            taken = run(["cat", "/proc/self/cgroup"], timeout=30, backend="native")
        assert taken.returncode == 0, taken
        assert taken.containment == "cgroup" and taken.cgroup not in (None, warm.cgroup), taken
        assert os.path.basename(taken.cgroup).encode() in taken.stdout
        assert any("had a process back in it" in r.getMessage() for r in caplog.records)
        assert stranger.poll() is None
        assert Path(warm.cgroup, "cgroup.procs").read_text().split() == [str(stranger.pid)]
        assert stranger.poll() is None  # not ours to kill
    finally:
        stranger.kill()
        stranger.wait()
    wait_until(lambda: "populated 0" in Path(warm.cgroup, "cgroup.events").read_text(), 10)
    os.rmdir(warm.cgroup)
    after = run(["true"], timeout=30, backend="native")
    assert after.returncode == 0 and after.containment == "cgroup", after


def _reusable_here(path: Optional[str]) -> bool:
    """Whether run cgroups can be kept here: they have no controller."""
    assert path is not None
    parent = os.path.dirname(path)
    return Path(parent, "cgroup.subtree_control").read_text().strip() == ""


# A BPF_PROG_TYPE_CGROUP_DEVICE program that denies every device (r0 = 0; exit), attached to
# the cgroup in argv[1]: it stays there after this process exits.
_ATTACH_DENY_ALL = """
import ctypes, os, struct, sys
libc = ctypes.CDLL(None, use_errno=True)
libc.syscall.restype = ctypes.c_long
insns = ctypes.create_string_buffer(bytes.fromhex("b700000000000000" "9500000000000000"))
lic = ctypes.create_string_buffer(b"GPL")
attr = ctypes.create_string_buffer(struct.pack("=IIQQIIQI", 15, 2, ctypes.addressof(insns),
                                               ctypes.addressof(lic), 0, 0, 0, 0), 128)
prog = libc.syscall(321, 5, attr, 128)  # bpf(BPF_PROG_LOAD)
if prog < 0:
    sys.exit(5)
cg = os.open(sys.argv[1], os.O_RDONLY | os.O_DIRECTORY)
attr = ctypes.create_string_buffer(struct.pack("=IIII", cg, prog, 6, 0), 128)
sys.exit(0 if libc.syscall(321, 8, attr, 128) == 0 else 6)  # BPF_PROG_ATTACH, CGROUP_DEVICE
"""


@pytest.mark.parametrize("change", ["max.depth", "max.descendants", "child left", "pressure off",
                                    "frozen", "mode", "cgroup.kill", "came back", "xattr",
                                    "file mode", "bpf device filter"])
def test_a_cgroup_the_command_changed_is_not_reused(cgroup_mode: str, change: str,
                                                    pid_dir: Path,
                                                    caplog: pytest.LogCaptureFixture) -> None:
    """A command running as the cgroup's owner may write its core files. Whatever it changed
    (a limit, a child cgroup, PSI off, the freezer, the mode), the next run must not find it:
    that cgroup is not kept, and the next run gets a fresh one with the defaults."""
    from retest import cgroup as cg

    script = {
        # it kills its own cgroup: every later clone3 into that cgroup would be SIGKILLed
        "cgroup.kill": 'sleep 30 & echo 1 > "$CG/cgroup.kill"; wait',
        # a process that moved itself out and back in later would be counted in the next run
        "came back": 'export CG; sh -c \'touch "$D/$$"; echo $$ > "$MOUNT/cgroup.procs"; '
                     'sleep 0.5; echo $$ > "$CG/cgroup.procs"; exec sleep 30\' & sleep 0.2',
        "xattr": f'exec {sys.executable} -c "import os, sys; '
                 f'os.setxattr(sys.argv[1], \'user.oomd_avoid\', b\'1\')" "$CG" || exit 4',
        "file mode": 'chmod 600 "$CG/cgroup.procs"',
        "bpf device filter": f'exec {sys.executable} -c {shlex.quote(_ATTACH_DENY_ALL)} "$CG"',
        "max.depth": 'echo 0 > "$CG/cgroup.max.depth"',
        "max.descendants": 'echo 0 > "$CG/cgroup.max.descendants"',
        "child left": 'mkdir "$CG/c"',
        "pressure off": '[ -e "$CG/cgroup.pressure" ] || exit 3; echo 0 > "$CG/cgroup.pressure"',
        # it freezes itself until the deadline ends it (a frozen cgroup would
        # freeze the next command where it starts)
        "frozen": 'echo 1 > "$CG/cgroup.freeze"; sleep 60',
        "mode": 'chmod 700 "$CG"',
    }[change]
    warm = run(["true"], timeout=30, backend="native")
    if not _reusable_here(warm.cgroup):
        pytest.skip("the run cgroups here have controllers: each run gets a fresh one")
    mount = cg._v2_mount(Path("/proc/self/mountinfo").read_text())
    assert mount is not None
    env = dict(os.environ, MOUNT=mount[0], D=str(pid_dir))
    if change == "bpf device filter" and os.uname().machine != "x86_64":
        pytest.skip("the BPF loader here knows x86_64's bpf() number only")
    find_cg = 'CG="$MOUNT$(sed -n "s/^0:://p" /proc/self/cgroup)"; '
    changed = run(["sh", "-c", find_cg + script], env=env, timeout=1 if change == "frozen" else 30,
                  grace=0.3, backend="native")
    assert changed.cgroup is not None
    try:
        if change == "pressure off" and changed.returncode == 3:
            pytest.skip("no cgroup.pressure on this kernel")
        if change == "xattr" and changed.returncode == 4:
            pytest.skip("no setfattr here, or no user xattrs on cgroupfs")
        if change == "bpf device filter" and changed.returncode in (5, 6):
            pytest.skip("cannot load or attach a BPF program here")
        if change == "frozen":
            assert changed.timed_out, changed
        elif change == "cgroup.kill":
            assert changed.returncode == -signal.SIGKILL, changed
        else:
            assert changed.returncode == 0, changed
        after = run(["sh", "-c", find_cg + 'cat "$CG/cgroup.max.depth" "$CG/cgroup.max.descendants"'
                     ' "$CG/cgroup.freeze"; stat -c %a "$CG"; ls "$CG" | grep -cx c; '
                     'n=0; while read p; do n=$((n+1)); done < "$CG/cgroup.procs"; echo $n; '
                     'echo > /dev/null && echo devnull; true'],
                    env=env, timeout=30, backend="native")
        assert after.cgroup is not None and changed.cgroup != after.cgroup, (changed, after)
        assert after.returncode == 0 and after.stdout.split()[:3] == [b"max", b"max", b"0"], after
        # no child cgroup in it, only its own shell in it, /dev/null usable
        assert after.stdout.split()[4:] == [b"0", b"1", b"devnull"], after
        assert after.leak_count == 0, after
        # a command changing its own cgroup is no fault of the machine's: nothing to warn of
        if change != "came back":
            assert not [r for r in caplog.records if r.levelno >= logging.WARNING
                        and "cgroup" in r.getMessage()], caplog.text
    finally:
        if change == "came back":  # the one that moved out (recorded in pid_dir): gone now
            kill_recorded(recorded_pids(pid_dir))
            wait_until(lambda: not os.path.isdir(changed.cgroup) or
                       "populated 0" in Path(changed.cgroup, "cgroup.events").read_text(), 10)
        if os.path.isdir(os.path.join(changed.cgroup, "c")):
            os.rmdir(os.path.join(changed.cgroup, "c"))
        if os.path.isdir(changed.cgroup):
            if change == "frozen":
                Path(changed.cgroup, "cgroup.freeze").write_text("0")
            os.rmdir(changed.cgroup)


def _where_kept_cgroups_serve() -> tuple[str, dict[str, str]]:
    """A shell prefix that sets $CG to the command's own cgroup, and the env it needs; skip
    where run cgroups are not kept (they have controllers)."""
    from retest import cgroup as cg

    warm = run(["true"], timeout=30, backend="native")
    if not _reusable_here(warm.cgroup):
        pytest.skip("the run cgroups here have controllers: each run gets a fresh one")
    mount = cg._v2_mount(Path("/proc/self/mountinfo").read_text())
    assert mount is not None
    return 'CG="$MOUNT$(sed -n "s/^0:://p" /proc/self/cgroup)"; ', dict(os.environ, MOUNT=mount[0])


def test_a_changed_cgroup_is_not_reused_by_another_shepherd_either(cgroup_mode: str,
                                                                    pid_dir: Path) -> None:
    """The shepherd that kept a cgroup checks it whole only after its final report (off the
    run's critical path, issue 15). A run that takes that cgroup in another shepherd (here: the
    caller's umask changed, so the idle one does not fit) must not run in a cgroup its last
    command changed: the caller reads the holder's verdict first (pg_pool_settle_cgroup), and
    the holder removes a cgroup that failed its check (either one alone keeps this true)."""
    find_cg, env = _where_kept_cgroups_serve()
    changed = run(["sh", "-c", find_cg + 'echo 0 > "$CG/cgroup.max.depth"; echo $PPID'],
                  env=env, timeout=30, backend="native")
    assert changed.returncode == 0 and changed.cgroup is not None, changed
    old = os.umask(0o077)
    try:
        after = run(["sh", "-c", find_cg + 'cat "$CG/cgroup.max.depth"; echo $PPID'],
                    env=env, timeout=30, backend="native")
    finally:
        os.umask(old)
        if os.path.isdir(changed.cgroup):
            os.rmdir(changed.cgroup)
    depth, shepherd = after.stdout.split()
    assert after.returncode == 0 and depth == b"max", after
    assert int(shepherd) != int(changed.stdout.split()[-1]), "a fresh shepherd (another umask)"
    assert after.cgroup != changed.cgroup and not os.path.isdir(changed.cgroup)


def test_a_changed_cgroup_that_could_not_be_removed_is_not_reused_later(cgroup_mode: str) -> None:
    """A command that made a child cgroup in its own leaves it unremovable (EBUSY) and unfit.
    Its shepherd finds that after its final report and says so in IDLE; when another run
    (here a subreaper run) is the one that reads that IDLE, the verdict must still reach the
    later run that asks for the cgroup (the caller's spares still hold it)."""
    find_cg, env = _where_kept_cgroups_serve()
    changed = run(["sh", "-c", find_cg + 'mkdir "$CG/c"'], env=env, timeout=30, backend="native")
    assert changed.returncode == 0 and changed.cgroup is not None, changed
    try:
        between = run(["true"], timeout=30, backend="native", containment="subreaper")
        assert between.returncode == 0 and between.containment == "subreaper", between
        assert os.path.isdir(os.path.join(changed.cgroup, "c")), "the child cgroup pins it"
        after = run(["sh", "-c", find_cg + 'echo "$CG"; ls "$CG" | grep -cx c; true'],
                    env=env, timeout=30, backend="native")
        assert after.returncode == 0 and after.containment == "cgroup", after
        assert after.cgroup != changed.cgroup, (changed, after)
        assert after.stdout.split()[-1] == b"0", after
    finally:
        for path in (os.path.join(changed.cgroup, "c"), changed.cgroup):
            if os.path.isdir(path):
                os.rmdir(path)


# ----------------------------------------------------------------------------- choice


def test_cgroup_required_where_impossible_is_a_spawn_error(native: str, tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """RETEST_CONTAINMENT=cgroup must not silently contain less; auto falls back."""
    not_a_cgroup = tmp_path / "plain-dir"
    not_a_cgroup.mkdir()
    monkeypatch.setenv("RETEST_CGROUP_PARENT", str(not_a_cgroup))

    required = run(["true"], timeout=10, backend="native", containment="cgroup")
    fallback = run(["true"], timeout=10, backend="native", containment="auto")

    assert required.returncode is None
    assert "cgroup" in (required.spawn_error or "") and str(not_a_cgroup) in required.spawn_error
    assert required.containment == "none"
    assert fallback.returncode == 0 and fallback.containment == "subreaper"
    assert list(not_a_cgroup.iterdir()) == []


def test_subprocess_backend_reports_no_containment() -> None:
    result = run(["true"], timeout=10, backend="subprocess")
    assert result.containment == "none" and result.leaks == () and result.leak_count == 0


def test_a_limit_without_its_controller_warns_once(cgroup_mode: str, monkeypatch: pytest.MonkeyPatch,
                                                   caplog: pytest.LogCaptureFixture) -> None:
    first = run(["true"], timeout=10, backend="native")
    assert first.cgroup is not None
    parent = os.path.dirname(first.cgroup)
    if "pids" in Path(parent, "cgroup.subtree_control").read_text().split():
        pytest.skip("the pids controller is enabled here: pids.max applies")
    monkeypatch.setenv("RETEST_CGROUP_PIDS_MAX", "64")
    with caplog.at_level(logging.WARNING, logger="retest.cgroup"):
        results = [run(["true"], timeout=10, backend="native") for _ in range(2)]
    assert all(r.returncode == 0 and r.containment == "cgroup" for r in results)
    warnings = [r.getMessage() for r in caplog.records if "RETEST_CGROUP_PIDS_MAX" in r.getMessage()]
    assert len(warnings) == 1, warnings


# ----------------------------------------------------------------------------- fork storm

FORK_STORM_CALLER = """
import json, sys
from retest.proc_group import run
storm = '''
import os, time
open(os.path.join(%r, "leader"), "w").close()
while True:
    try:
        os.fork()  # parent and child both go on forking
    except OSError:
        time.sleep(0.01)
'''
result = run([sys.executable, "-c", storm % sys.argv[1]], timeout=2, grace=0.5)
print(json.dumps({"timed_out": result.timed_out, "containment": result.containment,
                  "spawn_error": result.spawn_error, "killed": result.killed_at_deadline}))
"""

_storms = itertools.count()


@pytest.fixture
def pids_v1_cgroup() -> Iterator[Path]:
    """A v1 pids cgroup of this test (pids.max 48): removed after, whatever is in it killed
    (only this test's child and its descendants can be there)."""
    root = Path("/sys/fs/cgroup/pids")
    if os.geteuid() != 0 or not (root / "cgroup.procs").exists():
        pytest.skip("needs root and a cgroup v1 pids hierarchy at /sys/fs/cgroup/pids")
    group = root / f"retest-test-{os.getpid()}-{next(_storms)}"
    group.mkdir()
    try:
        (group / "pids.max").write_text("48")
        yield group
    finally:
        for _ in range(50):
            members = [int(p) for p in (group / "cgroup.procs").read_text().split()]
            if not members:
                break
            kill_recorded(members)
        group.rmdir()


def test_fork_storm_bounded_by_pids_max_is_contained(containment: str, pids_v1_cgroup: Path,
                                                     tmp_path: Path) -> None:
    procs = pids_v1_cgroup / "cgroup.procs"
    caller = subprocess.run(
        ["sh", "-c", f'echo $$ > {procs} && exec "$0" -c "$1" "$2"', PY,
         textwrap.dedent(FORK_STORM_CALLER), str(tmp_path)],
        capture_output=True, timeout=60, env=child_env())

    assert caller.returncode == 0, caller.stderr.decode(errors="replace")
    report = json.loads(caller.stdout)
    assert (tmp_path / "leader").exists()
    assert report["spawn_error"] is None
    assert report["containment"] == containment
    assert report["timed_out"]
    assert report["killed"] >= 10  # the storm filled the cgroup...
    events = (pids_v1_cgroup / "pids.events").read_text()
    assert int(events.split()[1]) > 0, events  # ...up to pids.max
    assert procs.read_text() == ""  # and nothing of it is left


# ----------------------------------------------------------------------------- leak report

DAEMON = """
import os, sys, time
pid_dir = sys.argv[1]
if os.fork() == 0:
    os.setsid()
    if os.fork() == 0:
        null = os.open(os.devnull, os.O_RDWR)
        for fd in (0, 1, 2):
            os.dup2(null, fd)
        open(os.path.join(pid_dir, str(os.getpid())), "w").close()
        os.execv("/bin/sleep", ["sleep", "60.5"])
    os._exit(0)
while not os.listdir(pid_dir):
    time.sleep(0.005)
time.sleep(0.3)
"""


def test_leak_report_names_the_daemon_left_by_the_command(containment: str, pid_dir: Path) -> None:
    result = run(py(DAEMON, str(pid_dir)), timeout=30, grace=1, backend="native")

    (daemon,) = recorded_pids(pid_dir)
    assert result.returncode == 0 and result.containment == containment
    assert result.leak_count == 1 and len(result.leaks) == 1
    pid, cmdline, age = result.leaks[0]
    assert pid == daemon
    assert cmdline == "sleep 60.5"
    assert age is not None and 0.25 <= age < 10
    assert not pid_alive(daemon)
    assert result.to_dict()["leaks"] == [{"pid": daemon, "cmdline": "sleep 60.5", "age_s": age}]


def test_leak_report_is_bounded_and_cuts_long_command_lines(containment: str, pid_dir: Path) -> None:
    long_arg = "0" * 300  # GNU sleep adds up its arguments: 60 + 0
    cmd = (f'for i in $(seq 55); do setsid sh -c \'touch "$0/$$"; exec sleep 60 "$1"\' "$D" {long_arg} & done; '
           'while [ "$(ls "$D" | wc -l)" -lt 55 ]; do sleep 0.01; done')
    result = run(["sh", "-c", cmd], env=dict(os.environ, D=str(pid_dir)), timeout=30, grace=1,
                 backend="native")

    assert result.returncode == 0
    assert result.leak_count == 55 and len(result.leaks) == 50
    assert {pid for pid, _, _ in result.leaks} <= set(recorded_pids(pid_dir))
    for _, cmdline, _ in result.leaks:
        assert cmdline == ("sleep 60 " + long_arg)[:200]
    assert alive(recorded_pids(pid_dir)) == []


def test_a_clean_run_reports_no_leak(containment: str) -> None:
    result = run(["sh", "-c", "sleep 0.01 & wait"], timeout=30, backend="native")
    assert result.returncode == 0 and result.leaks == () and result.leak_count == 0


@pytest.mark.parametrize("how", ["flag", "setting"])
def test_fail_on_leak_fails_a_run_that_left_a_process(containment: str, pid_dir: Path, how: str) -> None:
    cmd = [PY, "-m", "retest", "run", "--json", "--timeout", "30"]
    env = child_env(D=str(pid_dir))
    if how == "flag":
        cmd.append("--fail-on-leak")
    else:
        env["RETEST_FAIL_ON_LEAK"] = "1"
    leaky = cmd + ["--", "sh", "-c", ESCAPEE + "exit 0"]
    done = subprocess.run(leaky, capture_output=True, timeout=60, env=env)
    clean = subprocess.run(cmd + ["--", "true"], capture_output=True, timeout=60, env=env)

    doc = json.loads(done.stdout)
    assert done.returncode == 1, done.stderr
    assert (doc["verdict"], doc["rule"], doc["evidence"]) == ("other", "other.leaked-processes", "runner")
    # Under the sanitizer run's LD_PRELOAD every process that exits starts LeakSanitizer's
    # tracer task, which a sweep may catch too: there the daemon is one leak among several.
    asan = "libasan" in os.environ.get("LD_PRELOAD", "")
    assert doc["returncode"] == 0
    assert doc["leak_count"] == 1 or (asan and doc["leak_count"] >= 1), doc["leaks"]
    assert doc["containment"] == containment
    assert "sleep 60" in doc["reason"]
    assert clean.returncode == 0 and json.loads(clean.stdout)["rule"] == "passed.exit-0"
    assert alive(recorded_pids(pid_dir)) == []


def test_leaks_do_not_fail_a_run_by_default_nor_override_other_verdicts() -> None:
    base = dict(args=("true",), stdout=b"", stderr=b"", duration_s=0.1, spawn_error=None,
                backend="native", leaks=((4242, "sleep 60", 1.5),), leak_count=1)
    passed = RunResult(returncode=0, timed_out=False, **base)  # type: ignore[arg-type]
    timed_out = RunResult(returncode=-15, timed_out=True, **base)  # type: ignore[arg-type]
    failed = RunResult(returncode=3, timed_out=False, **base)  # type: ignore[arg-type]

    assert proc_group.classify(passed, fail_on_leak=False).rule == "passed.exit-0"
    leaked = proc_group.classify(passed, fail_on_leak=True)
    assert (leaked.kind, leaked.rule, leaked.evidence, leaked.infra) == \
        ("other", "other.leaked-processes", "runner", False)
    assert "4242 'sleep 60' (1.5s)" in leaked.reason
    assert proc_group.classify(timed_out, fail_on_leak=True).rule == "timeout.deadline"
    assert proc_group.classify(failed, fail_on_leak=True).rule == "other.exit-status"


# ----------------------------------------------------------------------------- made ahead


def _spares(parent: str) -> set[str]:
    return {n for n in os.listdir(parent) if re.fullmatch(rf"retest-{os.getpid()}-\d+", n)}


def test_the_next_runs_cgroup_is_made_ahead_taken_and_removed_at_exit(cgroup_mode: str) -> None:
    """Issue 15: a cgroup-mode run whose cgroup will not come back (here it needs cgroup.kill)
    makes the next one's cgroup while its command starts; the next run takes that one, and
    what no run took is removed (at exit)."""
    from retest import cgroup as cg

    cg.remove_spares()
    first = run(["sh", "-c", "trap '' TERM; sleep 60"], timeout=0.2, grace=0.1, backend="native")
    assert first.containment == "cgroup" and first.cgroup is not None and first.escalated
    parent = os.path.dirname(first.cgroup)
    assert not os.path.exists(first.cgroup)  # killed: removed
    (spare,) = _spares(parent)  # the next run's, made while the first one's command started
    assert not Path(parent, spare, "cgroup.procs").read_text().split()
    second = run(["cat", "/proc/self/cgroup"], backend="native")
    assert second.cgroup == os.path.join(parent, spare)  # taken, not made again
    assert spare.encode() in second.stdout
    waiting = _spares(parent)  # now: the second's own, kept (or removed), and maybe one ahead
    assert all(not Path(parent, n, "cgroup.procs").read_text().split() for n in waiting)
    cg.remove_spares()
    assert _spares(parent) == set()


def test_kept_cgroups_are_removed_at_exit(cgroup_mode: str) -> None:
    """The cgroups kept for later runs go with the process, as the ones made ahead do."""
    code = ("from retest.proc_group import run\n"
            "for _ in range(3):\n"
            "    r = run(['true'], backend='native'); assert r.containment == 'cgroup'\n"
            "print(r.cgroup)\n")
    done = subprocess.run([PY, "-c", code], capture_output=True, env=child_env(), timeout=60)
    assert done.returncode == 0, done.stderr
    path = done.stdout.decode().strip()
    parent, name = os.path.split(path)
    pid = name.split("-")[1]
    assert not [n for n in os.listdir(parent) if n.startswith(f"retest-{pid}-")]


def test_a_spare_swept_away_is_not_handed_to_a_run(cgroup_mode: str) -> None:
    """A spare that disappeared (a process in another pid namespace took us for dead) is
    skipped: the run gets a cgroup that exists."""
    from retest import cgroup as cg

    cg.remove_spares()
    first = run(["true"], backend="native")
    assert first.cgroup is not None
    parent = os.path.dirname(first.cgroup)
    waiting = _spares(parent)  # made ahead, and the first run's own if it was kept
    assert waiting
    for spare in waiting:  # even one an idle shepherd still holds open
        os.rmdir(os.path.join(parent, spare))
    second = run(["cat", "/proc/self/cgroup"], backend="native")
    assert second.returncode == 0 and second.containment == "cgroup"
    assert second.cgroup is not None and os.path.basename(second.cgroup) not in waiting
    assert os.path.basename(second.cgroup).encode() in second.stdout
    cg.remove_spares()


def test_stale_spares_of_a_dead_caller_are_swept_and_a_live_ones_are_kept(cgroup_mode: str,
                                                                           tmp_path: Path) -> None:
    """A caller SIGKILLed with a spare waiting leaves an empty cgroup; the first run of a
    later process under that parent removes it, and never one of a live process."""
    from retest import cgroup as cg

    parent = cg.parent_dir("")
    code = ("from retest.proc_group import run; import os, signal\n"
            "r = run(['true'], backend='native'); assert r.containment == 'cgroup'\n"
            "print(os.getpid(), flush=True); os.kill(os.getpid(), signal.SIGKILL)\n")
    dead = subprocess.run([PY, "-c", code], capture_output=True, env=child_env(), timeout=60)
    dead_pid = int(dead.stdout.split()[0])
    stale = [n for n in os.listdir(parent) if n.startswith(f"retest-{dead_pid}-")]
    assert stale, "the killed caller left no spare to sweep"
    live = Path(parent, f"retest-1-{os.getpid()}")  # pid 1 is alive: never swept
    live.mkdir()
    try:
        cg._swept.discard(parent)
        cg.remove_spares()
        assert run(["true"], backend="native").containment == "cgroup"
        assert not [n for n in os.listdir(parent) if n.startswith(f"retest-{dead_pid}-")]
        assert live.is_dir()
    finally:
        live.rmdir()
        cg.remove_spares()
