"""Issue 11: a timeout that says why (machine pressure, starved / hung / deadline).

Every test drives real processes: CPU hogs outside the tree are bounded busy loops the test
kills in a ``finally``; suites sleep or spin inside the runner's tree, which the runner kills.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import textwrap
import threading
import time
from pathlib import Path

import pytest

from helpers_proc import PY, in_fork_child, suite_env, write_suite
from orch110_helpers import cpu_ticks
from retest import pressure, proc_group

pytestmark = pytest.mark.usefixtures("native")
REFINED_TIMEOUT_RULES = True

#: A busy loop that ends by itself after ``s`` seconds (a bound if the test's kill is missed).
HOG = "import time\nend = time.monotonic() + {s}\nwhile time.monotonic() < end: pass\n"


def _pytest(root: Path) -> list[str]:
    # --rootdir: node ids relative to the suite wherever the tests run from (CI: a temp dir)
    return [PY, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--rootdir", str(root), str(root)]


def _start_hogs(n: int, seconds: float, *, sessions: bool = False) -> list[subprocess.Popen]:
    """``n`` busy loops; ``sessions``: each in a session of its own, as orphans of earlier
    runs are (with autogroup scheduling, one session's hogs share one fair share)."""
    return [subprocess.Popen([PY, "-c", HOG.format(s=seconds)], start_new_session=sessions)
            for _ in range(n)]


def _stop(procs: list[subprocess.Popen]) -> None:
    for p in procs:
        if p.poll() is None:
            p.send_signal(signal.SIGKILL)
        p.wait()


def _run_starved(cmd: list[str], timeout: float, *, sessions: bool = False,
                 ) -> tuple[proc_group.RunResult, list[subprocess.Popen]]:
    """``cmd`` (a pytest) under the runner while 2 x cores + 1 hogs outside the tree load the
    machine; the hogs are gone when this returns (their pids are still named)."""
    hogs = _start_hogs(2 * pressure.cores() + 1, 40, sessions=sessions)
    try:
        return proc_group.run(cmd, timeout=timeout, grace=2, env=suite_env()), hogs
    finally:
        _stop(hogs)


def test_every_run_has_pressure_evidence() -> None:
    result = proc_group.run(["sh", "-c", "sleep 0.3"], timeout=5)
    p = result.pressure
    assert p is not None and p.cores >= 1 and p.wall_s >= 0.29
    doc = result.to_dict()["pressure"]
    assert set(doc) >= {"psi", "psi_source", "tree_share", "foreign", "foreign_cpu_s"}
    if os.path.exists("/proc/pressure/cpu"):
        assert p.psi_source == "machine" and p.psi["cpu"].some_share is not None


#: The files the native runner's evidence keeps open for the process (ext/evidence.c).
KEPT_EVIDENCE = ("/proc/pressure/cpu", "/proc/pressure/memory", "/proc/pressure/io",
                 "/proc/stat", "/proc/vmstat", "/dev/kmsg")


def _fds_naming(paths: "tuple[str, ...]") -> dict[int, str]:
    out = {}
    for name in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{name}")
        except OSError:
            continue
        if target in paths:
            out[int(name)] = target
    return out


def test_kept_evidence_files_closed_and_reused_by_another_file_are_not_read() -> None:
    """Issue 15: the evidence's /proc files stay open for the process. Code that closes fds it
    does not own may give their numbers to other files: those are neither read nor closed,
    and the evidence is read from the files themselves."""
    if not os.path.exists("/proc/pressure/cpu"):
        pytest.skip("no PSI in this kernel")
    first = proc_group.run(["true"], timeout=30)
    kept = _fds_naming(KEPT_EVIDENCE)
    assert {"/proc/pressure/cpu", "/proc/stat"} <= set(kept.values())
    stranger = os.open("/etc/hostname", os.O_RDONLY)
    try:
        for fd in kept:  # each kept number now names somebody else's file
            os.dup2(stranger, fd)
        again = proc_group.run(["sh", "-c", "sleep 0.2"], timeout=30)
        assert all(os.readlink(f"/proc/self/fd/{fd}") == "/etc/hostname" for fd in kept), \
            "the strangers' files are left open"
        assert again.pressure is not None and first.pressure is not None
        assert set(again.pressure.psi) == set(first.pressure.psi) == {"cpu", "memory", "io"}
        assert all(psi.some_share is not None for psi in again.pressure.psi.values())
        assert again.pressure.psi_source == first.pressure.psi_source
        reopened = _fds_naming(KEPT_EVIDENCE)
        assert set(reopened.values()) == set(kept.values()) and not set(reopened) & set(kept)
    finally:
        for fd in kept:
            os.close(fd)
        os.close(stranger)


def test_a_fork_child_reads_the_evidence_through_files_of_its_own() -> None:
    """A child of fork() shares its parent's open files; it closes its copies of the kept
    evidence files at once (a read of several chunks would race with the parent's) and opens
    its own at its first run."""
    if not os.path.exists("/proc/pressure/cpu"):
        pytest.skip("no PSI in this kernel")
    assert proc_group.run(["true"], timeout=30).returncode == 0
    parents = _fds_naming(KEPT_EVIDENCE[:5])
    assert parents

    def child() -> bytes:
        inherited = sorted(_fds_naming(KEPT_EVIDENCE[:5]))
        result = proc_group.run(["sh", "-c", "sleep 0.2"], timeout=30)
        psi = result.pressure.psi if result.pressure is not None else {}
        return repr((inherited, sorted(psi), bool(_fds_naming(KEPT_EVIDENCE[:5])))).encode()

    said = in_fork_child(child).decode()
    assert said == repr(([], ["cpu", "io", "memory"], True))
    assert _fds_naming(KEPT_EVIDENCE[:5]) == parents, "the parent's stay as they were"


def test_the_run_has_a_timeline_of_samples(containment: str) -> None:
    """A busy 2 s child: the samples follow the run, and its tree's CPU shows in them (the
    cgroup's cpu.stat in cgroup mode, the shepherd's descendants otherwise)."""
    result = proc_group.run([PY, "-c", HOG.format(s=2.0)], timeout=20, probe=False)
    p = result.pressure
    assert p is not None and result.containment == containment
    times = [x.t for x in p.samples]
    assert len(times) >= 3 and times == sorted(times) and times[-1] <= p.wall_s + 0.1, times
    # The samples add up to the tree's CPU (from the kernel's accounting at the end) over the
    # span they cover, whatever the machine's load: a busy loop's CPU is in them.
    spans = list(zip([0.0, *times], p.samples))[1:]
    sampled = sum((x.t - t0) * x.tree_cores for t0, x in spans if x.tree_cores is not None)
    covered = times[-1] - times[0]
    expected = p.tree_cpu_s * covered / p.wall_s
    assert expected > 0.05 and 0.4 * expected <= sampled <= 1.6 * expected + 0.05, \
        (sampled, expected, p.to_dict()["samples"])
    assert all(x.busy_cores is None or x.busy_cores >= 0 for x in p.samples)
    if containment == "cgroup" and os.path.exists("/proc/pressure/cpu"):
        assert p.run_cpu is not None and p.run_cpu.some_share is not None
    else:
        assert containment == "cgroup" or p.run_cpu is None
    doc = result.to_dict()["pressure"]["samples"]
    assert set(doc[0]) == {"t", "cpu_some", "busy_cores", "tree_cores"}


def test_an_idle_child_has_an_idle_timeline() -> None:
    """Sleeping: the tree's cores stay near zero; the hog started by this test is not the tree."""
    hogs = _start_hogs(1, 10)
    try:
        result = proc_group.run(["sleep", "1.5"], timeout=20, probe=False)
    finally:
        _stop(hogs)
    trees = [x.tree_cores for x in result.pressure.samples if x.tree_cores is not None]
    assert trees and max(trees) < 0.2, result.pressure.to_dict()["samples"]


def test_the_timeline_is_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    """Past SAMPLES_MAX, pairs merge and the interval doubles: a long run keeps its whole span."""
    monkeypatch.setattr(pressure, "SAMPLES_MAX", 4)
    monkeypatch.setattr(pressure, "SAMPLE_S", 0.1)
    monkeypatch.setattr(pressure, "FIRST_SAMPLE_S", 0.05)
    result = proc_group.run(["sleep", "2"], timeout=20, probe=False)
    samples = result.pressure.samples
    assert 1 <= len(samples) <= 4 and samples[-1].t >= 1.0, [x.t for x in samples]


def test_a_short_run_measures_foreign_cpu_without_naming() -> None:
    """Shorter than the first sample: no process table was read, yet the CPU outside the tree
    is measured (from /proc/stat) and nothing is named."""
    result = proc_group.run(["true"], timeout=20, probe=False)
    p = result.pressure
    assert p is not None and p.samples == () and p.foreign == ()
    assert p.foreign_cpu_s >= 0.0 and p.wall_s < pressure.FIRST_SAMPLE_S * 4


def test_a_short_run_counts_a_foreign_hogs_cpu(backend: str) -> None:
    """Both backends read /proc/stat, PSI and their own CPU around the run (the native one in
    C, issue 15): a hog busy through a 0.2 s run shows as CPU outside the tree."""
    hogs = _start_hogs(1, 10)
    try:
        time.sleep(0.1)
        result = proc_group.run(["sleep", "0.2"], timeout=20, probe=False, backend=backend)
    finally:
        _stop(hogs)
    p = result.pressure
    assert p is not None and p.wall_s >= 0.19
    assert 0.08 <= p.foreign_cpu_s <= p.wall_s * p.cores + 0.05, p.to_dict()
    if os.path.exists("/proc/pressure/cpu"):
        cpu = p.psi["cpu"]
        assert cpu.some_share is not None and 0.0 <= cpu.some_share <= 1.0
        assert cpu.some_avg10 is not None and 0.0 <= cpu.some_avg10 <= 100.0


def test_a_command_that_closes_its_output_early_is_measured_to_its_end(native: str) -> None:
    """The native runner reads the end's evidence when the command closes its output (issue
    15); a command that closes it and goes on must still be measured until it ends."""
    hogs = _start_hogs(1, 10)
    try:
        time.sleep(0.1)
        result = proc_group.run(["sh", "-c", "exec >/dev/null 2>&1; sleep 0.6"], timeout=20,
                                probe=False)
    finally:
        _stop(hogs)
    p = result.pressure
    assert p is not None and p.wall_s >= 0.59
    assert p.foreign_cpu_s >= 0.2, p.to_dict()  # the hog's CPU over the 0.6 s, not 0


def test_a_slow_sample_does_not_hold_up_runs_on_other_threads(monkeypatch: pytest.MonkeyPatch) -> None:
    """The sampler reads every process's stat at a run's first sample (slow on a machine with
    thousands of processes): outside its lock, so another thread's run starts and ends
    meanwhile instead of waiting for it."""
    real = pressure._proc_table
    slow_started = threading.Event()

    def slow_table() -> dict:
        slow_started.set()
        time.sleep(2.0)
        return real()

    monkeypatch.setattr(pressure, "_proc_table", slow_table)
    outcome: dict[str, proc_group.RunResult] = {}
    worker = threading.Thread(target=lambda: outcome.update(
        slow=proc_group.run(["sleep", "0.5"], timeout=20, probe=False)))
    worker.start()
    try:
        assert slow_started.wait(10), "the first sample never came"
        started = time.monotonic()
        quick = proc_group.run(["true"], timeout=20, probe=False)
        took = time.monotonic() - started
    finally:
        worker.join(30)
    assert quick.returncode == 0 and took < 1.0, took  # was: the rest of the 2 s sample
    slow = outcome["slow"]
    assert slow.returncode == 0 and slow.pressure is not None  # it waited for its own sample


def _named_or_outranked(p: pressure.Pressure, pid: int, cpu_s: float) -> bool:
    """``pid`` is named, or the evidence is full of processes that used at least as much CPU
    (a loaded machine: other tests of a parallel run may burn more than this test's hog)."""
    if pid in {f.pid for f in p.foreign}:
        return True
    return len(p.foreign) == pressure.FOREIGN_MAX and min(f.cpu_s for f in p.foreign) >= cpu_s - 0.02


def test_a_foreign_hog_is_named_with_its_cpu() -> None:
    hogs = _start_hogs(1, 10)
    try:
        time.sleep(0.1)
        result = proc_group.run(["sh", "-c", "sleep 1.5"], timeout=5)
        hog_cpu = cpu_ticks(hogs[0].pid) / os.sysconf("SC_CLK_TCK")
    finally:
        _stop(hogs)
    named = {f.pid: f for f in result.pressure.foreign}
    assert _named_or_outranked(result.pressure, hogs[0].pid, 0.1), result.pressure.to_dict()
    if hogs[0].pid in named:
        hog = named[hogs[0].pid]
        assert 0.05 <= hog.cpu_s <= hog_cpu + 0.02 and "while time.monotonic()" in hog.cmdline
        assert not hog.orphan  # its parent is this live test, not init


def test_the_tree_itself_is_not_foreign() -> None:
    result = proc_group.run([PY, "-c", HOG.format(s=1.0)], timeout=5)
    assert result.pid not in {f.pid for f in result.pressure.foreign}
    # its CPU is the tree's (a loaded machine gives a busy loop less than a core: no absolute figure)
    assert result.pressure.tree_cpu_s >= 0.05 and result.pressure.tree_cpu_s <= result.duration_s * result.pressure.cores


def test_an_orphaned_pytest_is_marked(tmp_path: Path) -> None:
    # A pytest-like busy loop whose parent exits at once: re-parented to init or a subreaper.
    script = tmp_path / "pytest_orphan.py"
    script.write_text(HOG.format(s=8))
    pid_file = tmp_path / "pid"
    launcher = subprocess.run(
        ["sh", "-c", f"{PY} {script} -n 2 & echo $! > {pid_file}"], check=True)
    assert launcher.returncode == 0
    pid = int(pid_file.read_text())
    try:
        result = proc_group.run(["sh", "-c", "sleep 1"], timeout=5)
    finally:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    named = {f.pid: f for f in result.pressure.foreign}
    assert _named_or_outranked(result.pressure, pid, 0.1), result.pressure.to_dict()
    if pid not in named:
        return
    ppid = int(open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[1]) \
        if os.path.exists(f"/proc/{pid}") else None
    if ppid == 1:
        assert named[pid].orphan and "re-parented" in named[pid].orphan_why


def test_starved_by_cpu_hogs_outside_the_tree(tmp_path: Path) -> None:
    suite = write_suite(tmp_path / "suite", {"test_spin.py": textwrap.dedent("""
        import time
        def test_spins():
            end = time.monotonic() + 30
            while time.monotonic() < end:
                pass
    """)})
    result, hogs = _run_starved(_pytest(suite), 4)
    verdict = proc_group.classify(result)
    assert (verdict.kind, verdict.rule, verdict.infra) == ("timeout", "timeout.starved", True), \
        verdict.reason
    assert "the machine was starved" in verdict.reason
    assert any(f"pid {h.pid} " in verdict.reason for h in hogs), verdict.reason


def test_a_hang_on_a_starved_machine_is_hung(tmp_path: Path) -> None:
    """Found on attrs with another session loading the machine: the load slowed the tests
    before the hang, so the hung test had run 39 s of 60, under the 0.8 share, and the
    timeout read ``timeout.starved``. An idle test asked for no CPU: it is hung, and the
    reason says the machine was starved too. Budget 20 s: the spin takes 5 s and pytest's
    start-up up to 5 more, so the sleep runs 0.5-0.72 of it, over half the share (0.4)."""
    suite = write_suite(tmp_path / "suite", {"test_h.py": textwrap.dedent("""
        import time
        def test_spins():
            end = time.monotonic() + 5
            while time.monotonic() < end:
                pass
        def test_sleeps():
            time.sleep(120)
    """)})
    result, _ = _run_starved(_pytest(suite), 20)
    verdict = proc_group.classify(result)
    assert (verdict.kind, verdict.rule, verdict.infra) == ("timeout", "timeout.hung", True), \
        verdict.reason
    assert "hung: test_h.py::test_sleeps had been running" in verdict.reason
    assert "the machine was also starved" in verdict.reason
    assert "in test_sleeps: time.sleep(120)" in verdict.reason


def test_hung_test_is_named(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # pytest's own start-up (CPU and, on a loaded machine, seconds) weighs on a budget of a
    # few seconds; on a real one (900 s) it is noise.
    monkeypatch.setenv("RETEST_IDLE_CORES", "0.3")
    monkeypatch.setenv("RETEST_HUNG_RUNNING_SHARE", "0.5")
    suite = write_suite(tmp_path / "suite", {"test_h.py": textwrap.dedent("""
        import time
        def test_quick():
            pass
        def test_sleeps():
            time.sleep(60)
    """)})
    result = proc_group.run(_pytest(suite), timeout=5, grace=2, env=suite_env())
    verdict = proc_group.classify(result)
    assert (verdict.kind, verdict.rule, verdict.infra) == ("timeout", "timeout.hung", True), \
        verdict.reason
    assert "hung: test_h.py::test_sleeps had been running" in verdict.reason
    # The diagnostic stage's dump: the test's own frame, at the line that sleeps.
    assert 'test_h.py", line 6 in test_sleeps: time.sleep(60)' in verdict.reason
    (dump,) = [d for d in result.diagnostics if d.nodeid == "test_h.py::test_sleeps"]
    # time.sleep is C: the innermost Python frame is the test's own, quoted with its source line
    assert dump.summary().startswith('File "') and dump.summary().endswith("in test_sleeps: time.sleep(60)")
    assert dump.pid in result.probe.pids


def test_failures_before_a_hang_are_named(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Found on tomli: a branch with a failing test and a hung one was requeued, and nothing
    said the code was already proven red."""
    monkeypatch.setenv("RETEST_IDLE_CORES", "0.3")
    monkeypatch.setenv("RETEST_HUNG_RUNNING_SHARE", "0.5")
    suite = write_suite(tmp_path / "suite", {"test_h.py": textwrap.dedent("""
        import time
        def test_fails():
            assert 1 + 1 == 3
        def test_sleeps():
            time.sleep(60)
    """)})
    result = proc_group.run(_pytest(suite), timeout=5, grace=2, env=suite_env())
    verdict = proc_group.classify(result)
    assert (verdict.kind, verdict.rule) == ("timeout", "timeout.hung"), verdict.reason
    assert ("tests had failed before the deadline (1 failed): test_h.py::test_fails"
            in verdict.reason)


def test_a_busy_test_that_never_ends_is_named(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Not hung (it uses a core): the budget went to one test, and the reason says which,
    with its stack (found on tomli: it said only "neither starved nor hung"). On a machine
    that others load meanwhile (CI, once) the rule is ``timeout.starved``, and says it too."""
    monkeypatch.setenv("RETEST_IDLE_CORES", "0.3")
    monkeypatch.setenv("RETEST_HUNG_RUNNING_SHARE", "0.5")
    suite = write_suite(tmp_path / "suite", {"test_b.py": textwrap.dedent("""
        def test_spins():
            while True:
                pass
    """)})
    result = proc_group.run(_pytest(suite), timeout=5, grace=2, env=suite_env())
    verdict = proc_group.classify(result)
    assert verdict.kind == "timeout", verdict.reason
    assert verdict.rule in ("timeout.deadline", "timeout.starved"), verdict.reason
    if verdict.rule == "timeout.starved":
        assert "the machine was starved" in verdict.reason
    assert "one test took most of it: test_b.py::test_spins had been running" in verdict.reason
    assert "busy" in verdict.reason and "in test_spins" in verdict.reason


def test_a_suite_stuck_before_any_test_is_hung(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A module that blocks at import: the session started, no test ever did, and the tree
    sat idle (found on tomli: it was "timeout.deadline", 0 tests done)."""
    monkeypatch.setenv("RETEST_IDLE_CORES", "0.3")
    suite = write_suite(tmp_path / "suite", {"test_c.py": textwrap.dedent("""
        import time
        time.sleep(60)
        def test_never():
            pass
    """)})
    result = proc_group.run(_pytest(suite), timeout=5, grace=2, env=suite_env())
    verdict = proc_group.classify(result)
    assert (verdict.kind, verdict.rule) == ("timeout", "timeout.hung"), verdict.reason
    assert "the session sat idle during collection, no test had started" in verdict.reason
    assert 'test_c.py", line 3 in <module>' in verdict.reason


def test_slow_but_working_suite_is_deadline(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RETEST_IDLE_CORES", "0.3")
    suite = write_suite(tmp_path / "suite", {"test_slow.py": textwrap.dedent("""
        import time, pytest
        @pytest.mark.parametrize("i", range(60))
        def test_step(i):
            time.sleep(0.1)
    """)})
    result = proc_group.run(_pytest(suite), timeout=3, grace=2, env=suite_env())
    verdict = proc_group.classify(result)
    assert (verdict.kind, verdict.rule, verdict.infra) == ("timeout", "timeout.deadline", True)
    assert "neither starved nor hung" in verdict.reason and "cores" in verdict.reason
    assert result.probe is not None and result.probe.done > 5


def test_settings_clamp_and_fall_back(monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    from retest import config
    from retest.config import ForensicsSettings

    config._forget_warnings()
    monkeypatch.setenv("RETEST_STARVED_PSI_SHARE", "7")  # a share above 1: clamped to 1
    monkeypatch.setenv("RETEST_HUNG_RUNNING_SHARE", "most")  # not a number: the default
    monkeypatch.setenv("RETEST_DIAGNOSE_S", "0")  # 0 is meaningful: no diagnostic stage
    with caplog.at_level(logging.WARNING, logger="retest.config"):
        s = ForensicsSettings.from_env()
    assert (s.starved_psi_share, s.hung_running_share, s.diagnose_s) == (1.0, 0.8, 0.0)
    warned = " ".join(r.getMessage() for r in caplog.records)
    assert "RETEST_STARVED_PSI_SHARE" in warned and "RETEST_HUNG_RUNNING_SHARE" in warned
    assert "RETEST_DIAGNOSE_S" not in warned


def test_xdist_one_worker_hangs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # The default idle threshold: the median of the tree's cores over the hung test's span
    # is what counts, so xdist's busy start-up inside that span does not hide the hang.
    monkeypatch.setenv("RETEST_HUNG_RUNNING_SHARE", "0.5")  # xdist's start-up, on a loaded machine
    suite = write_suite(tmp_path / "suite", {"test_x.py": textwrap.dedent("""
        import time, pytest
        @pytest.mark.parametrize("i", range(6))
        def test_fine(i):
            pass
        def test_wedged():
            time.sleep(60)
    """)})
    argv = [PY, "-m", "pytest", "-q", "-p", "xdist", "-n", "2", "-p", "no:cacheprovider",
            "--rootdir", str(suite), str(suite)]
    result = proc_group.run(argv, timeout=8, grace=2, env=suite_env())
    verdict = proc_group.classify(result)
    assert verdict.kind == "timeout" and result.timed_out
    assert verdict.rule == "timeout.hung", verdict.reason
    assert "test_x.py::test_wedged (gw" in verdict.reason
    assert 'test_x.py", line 7 in test_wedged: time.sleep(60)' in verdict.reason
    # Every probe process dumped (the controller and both workers), each attributed.
    (wedged,) = [d for d in result.diagnostics if d.nodeid == "test_x.py::test_wedged"]
    assert wedged.worker is not None and wedged.worker.startswith("gw")
    assert len(result.diagnostics) == 3


def test_the_stage_never_delays_the_kill_beyond_its_bound(tmp_path: Path) -> None:
    # The suite blocks the dump signal and ignores SIGTERM: no dump ever comes, SIGKILL must.
    suite = write_suite(tmp_path / "suite", {"test_b.py": textwrap.dedent("""
        import signal, time
        def test_stubborn():
            signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGPWR})
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
            time.sleep(60)
    """)})
    import time

    began = time.monotonic()
    result = proc_group.run(_pytest(suite), timeout=2, grace=2, env=suite_env(RETEST_DIAGNOSE_S="1"))
    took = time.monotonic() - began
    assert result.timed_out and result.escalated and result.returncode == -signal.SIGKILL
    assert took < 2 + 2 + 1.0, took  # deadline + grace (the stage's second is inside the grace)
    assert result.diagnostics == ()
    assert not [pid for pid in result.probe.pids if os.path.exists(f"/proc/{pid}")]


def test_no_stage_when_disabled(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RETEST_DIAGNOSE_S", "0")
    suite = write_suite(tmp_path / "suite", {"test_s.py": "import time\ndef test_s():\n    time.sleep(60)\n"})
    result = proc_group.run(_pytest(suite), timeout=2, grace=1, env=suite_env())
    assert result.timed_out and result.diagnostics == () and result.duration_s < 3.0


def test_a_suite_that_oversubscribes_itself_is_not_starved(tmp_path: Path) -> None:
    """The tree's own processes make the machine's PSI high, but nothing outside it used the
    CPU: that is a slow suite (``timeout.deadline``), not a starved machine."""
    n = 2 * pressure.cores() + 1
    suite = write_suite(tmp_path / "suite", {"test_self.py": textwrap.dedent(f"""
        import subprocess, sys, time
        HOG = "import time\\nend = time.monotonic() + 20\\nwhile time.monotonic() < end: pass\\n"
        def test_spins_many():
            procs = [subprocess.Popen([sys.executable, "-c", HOG]) for _ in range({n})]
            try:
                end = time.monotonic() + 20
                while time.monotonic() < end:
                    pass
            finally:
                for p in procs:
                    p.kill()
    """)})
    result = proc_group.run(_pytest(suite), timeout=4, grace=2, env=suite_env())
    verdict = proc_group.classify(result)
    p = result.pressure
    assert verdict.kind == "timeout" and p is not None
    if p.foreign_share < 0.25:  # a quiet machine (other tests of a parallel run may load it)
        assert p.tree_cores > 0.5, p.text()  # the tree kept the machine busy
        assert verdict.rule == "timeout.deadline", verdict.reason
    else:  # others did load it: then starved is the truth, and the reason must say by whom
        assert verdict.rule in ("timeout.deadline", "timeout.starved"), verdict.reason


def test_the_gate_keeps_the_rules_evidence(tmp_path: Path) -> None:
    """A requeued or held timeout still says its verdict rests on the runner's facts."""
    from gitrepo import make_repo, sleeping_test
    from retest.merge_gate import GateMetrics, retest_branch

    repo = make_repo(tmp_path)
    repo.branch("slow", {"tests/test_slow.py": sleeping_test(60)})
    decision = retest_branch(repo.path, "slow", env=repo.env, metrics=GateMetrics(), task_id="EV-1",
                             timeout=2)
    assert (decision.verdict, decision.action) == ("timeout", "requeue")
    assert decision.evidence["verdict_evidence"] == "runner"


#: A test that needs 2.5 s of CPU (its own, not wall time): it passes in about 2.5 s on an idle
#: core and meets its 4 s pytest-timeout when hogs outside the tree hold the machine.
_CPU_BOUND_TEST = textwrap.dedent("""
    import time
    def test_needs_cpu():
        end = time.process_time() + 2.5
        while time.process_time() < end:
            pass
""")


#: The same need of CPU in a fixture's set-up: pytest-timeout makes it an error, not a failure.
_CPU_BOUND_FIXTURE = textwrap.dedent("""
    import time
    import pytest

    @pytest.fixture
    def warm():
        end = time.process_time() + 2.5
        while time.process_time() < end:
            pass

    def test_needs_cpu(warm):
        pass
""")


@pytest.mark.parametrize("method, suite", [("signal", _CPU_BOUND_TEST), ("thread", _CPU_BOUND_TEST),
                                           ("signal", _CPU_BOUND_FIXTURE)],
                         ids=["signal", "thread", "in-a-fixture"])
def test_a_per_test_timeout_on_a_starved_machine_is_infra(tmp_path: Path, method: str,
                                                          suite: str) -> None:
    """The incident one level down: the suite's own pytest-timeout counts wall time, so hogs
    outside the tree make a test that needs 2.5 s of CPU miss its 4 s. That is the machine,
    not the branch: ``timeout.test-starved`` (infra, requeued), naming the hogs, not red."""
    pytest.importorskip("pytest_timeout")
    suite = write_suite(tmp_path / "suite", {"test_cpu.py": suite})
    result, hogs = _run_starved(_pytest(suite) + ["-p", "pytest_timeout", "--timeout", "4",
                                                  "--timeout-method", method], 60, sessions=True)
    verdict = proc_group.classify(result)
    assert not result.timed_out and result.returncode == 1, result.stdout[-2000:]
    assert (verdict.kind, verdict.rule, verdict.infra, verdict.evidence) == \
        ("timeout", "timeout.test-starved", True, "runner"), verdict.reason
    assert "the machine was starved while test_cpu.py::test_needs_cpu ran" in verdict.reason
    assert any(f"pid {h.pid} " in verdict.reason for h in hogs), verdict.reason
    from retest import merge_gate
    assert merge_gate.classify_retest_failure(result) == "timeout"


def test_a_per_test_timeout_of_an_idle_test_stays_red_on_a_starved_machine(tmp_path: Path) -> None:
    """A test that sleeps asked for no CPU: the load is not why pytest-timeout stopped it, and
    a retry on an idle machine hangs again. Red, and the reason says why the load was ruled out."""
    pytest.importorskip("pytest_timeout")
    suite = write_suite(tmp_path / "suite", {"test_sleep.py": textwrap.dedent("""
        import time
        def test_waits():
            time.sleep(60)
    """)})
    result, _ = _run_starved(_pytest(suite) + ["-p", "pytest_timeout", "--timeout", "3"], 60)
    verdict = proc_group.classify(result)
    assert (verdict.kind, verdict.rule, verdict.infra) == ("red", "red.test-timeout", False), \
        verdict.reason
    assert "test_sleep.py::test_waits was idle while it ran" in verdict.reason
    assert "a hang, not the load" in verdict.reason


@pytest.mark.parametrize("suite, timeout", [(textwrap.dedent("""
        import time
        def test_spins():
            end = time.monotonic() + 60
            while time.monotonic() < end:
                pass
    """), "3"), (_CPU_BOUND_FIXTURE, "1")], ids=["test", "fixture"])
def test_a_per_test_timeout_on_a_quiet_machine_stays_red(tmp_path: Path, suite: str,
                                                         timeout: str) -> None:
    """No load outside the tree: a busy test (or fixture) that misses its pytest-timeout is
    too slow, red (``red.test-timeout``, the fixture's an error)."""
    pytest.importorskip("pytest_timeout")
    suite = write_suite(tmp_path / "suite", {"test_spin.py": suite})
    result = proc_group.run(_pytest(suite) + ["-p", "pytest_timeout", "--timeout", timeout],
                            timeout=60, grace=2, env=suite_env())
    verdict = proc_group.classify(result)
    p = result.pressure
    assert p is not None
    if p.foreign_share < 0.25:  # a quiet machine (other tests of a parallel run may load it)
        assert (verdict.kind, verdict.rule, verdict.infra) == ("red", "red.test-timeout", False), \
            verdict.reason
    else:
        assert verdict.rule in ("red.test-timeout", "timeout.test-starved"), verdict.reason
