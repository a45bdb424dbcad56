"""ORCH-110 regression cases TC-01..TC-03: the runner (``retest.proc_group``).

TC-01  a timed-out re-test leaves no process of its tree alive (pytest-xdist workers included).
TC-02  ``SUBPROCESS_TREE_KILL_ENABLED=false`` takes the prior ``subprocess.run`` path and still
       never raises; the result says which backend ran.
TC-03  classification: timeout / red / lock-busy / other, each from a real run, with evidence.

Every case drives real processes (pytest with xdist, git, tiny Python children) and asserts
what happened to them: recorded pids gone or alive, exit statuses, verdicts and the evidence
quoted in their reasons.
"""

from __future__ import annotations

import errno
import json
import os
import signal
import textwrap
from pathlib import Path

import pytest

from conftest import descendants
from gitrepo import FAILING_TEST, gate_env, make_repo
from helpers_proc import (alive, child_env, kill_recorded, pid_alive, recorded_pids, suite_env,
                          write_suite)
from orch110_helpers import (
    PLAIN_SUITE,
    PY,
    XDIST_SUITE,
    incident_run_dir,
    incident_suite_files,
    kinds,
)
from retest import merge_gate, proc_group
from retest.proc_group import RunResult

pytest.importorskip("xdist", reason="pytest-xdist is part of the test extra")


# --------------------------------------------------------------------------- TC-01


def test_tc01_timed_out_xdist_retest_leaves_no_process_of_its_tree(native: str, tmp_path: Path) -> None:
    """TC-01: the deadline kills the whole tree: pytest, both xdist workers, their detached helpers."""
    suite = write_suite(tmp_path / "suite", incident_suite_files(tests=4, helpers=2))
    run_dir = incident_run_dir(tmp_path, "run")
    fault = tmp_path / "fault"
    fault.write_text("the helper services cannot come up\n")  # the suite hangs until the deadline
    env = suite_env(INCIDENT_RUN_DIR=str(run_dir), INCIDENT_FAULT=str(fault))
    pids = run_dir / "pids"
    try:
        # No backend forced: the automatic choice must be the containing one.
        result = proc_group.run(XDIST_SUITE, timeout=4, grace=1, cwd=suite, env=env)

        recorded = kinds(pids)
        everyone = set(recorded_pids(pids))
        # The tree really was an xdist tree, each worker inside a test with its helpers running.
        assert len(recorded.get("controller", ())) == 1, recorded
        assert len(recorded.get("worker", ())) == 2, recorded
        assert len(recorded.get("helper", ())) == 4, recorded
        assert result.timed_out and result.backend == "native"
        assert result.returncode == -signal.SIGTERM
        assert result.killed_at_deadline >= len(everyone)
        # Nothing of it outlives run(): not the workers, not the helpers in their own sessions.
        assert alive(everyone) == []
        assert [p for p in descendants() if pid_alive(p)] == []
        verdict = proc_group.classify(result)
        assert (verdict.kind, verdict.infra) == ("timeout", True)  # rule: starved / hung / deadline
        assert verdict.rule in ("timeout.deadline", "timeout.hung", "timeout.starved")
        assert merge_gate.classify_retest_failure(result) == "timeout"
    finally:
        kill_recorded(recorded_pids(pids))


# --------------------------------------------------------------------------- TC-02


GRANDCHILD_THEN_SLEEP = textwrap.dedent("""\
    import os, subprocess, sys, time
    pids = sys.argv[1]
    child = subprocess.Popen(["sh", "-c", 'touch "$0/grandchild-$$"; exec sleep 60', pids])
    open(os.path.join(pids, "leader-%d" % os.getpid()), "w").close()
    time.sleep(60)
    """)


@pytest.fixture
def prior_path(monkeypatch: pytest.MonkeyPatch) -> None:
    """The kill-switch off in this process's environment, where ``run()`` reads it."""
    monkeypatch.setenv("SUBPROCESS_TREE_KILL_ENABLED", "false")


@pytest.mark.parametrize("value", ["false", "0", "off", "no", "FALSE"])
def test_tc02_switch_off_selects_the_subprocess_backend(monkeypatch: pytest.MonkeyPatch, value: str) -> None:
    """TC-02: every spelling of "off" selects the prior path, and says why."""
    monkeypatch.setenv("SUBPROCESS_TREE_KILL_ENABLED", value)
    assert proc_group.backend_status() == ("subprocess", "SUBPROCESS_TREE_KILL_ENABLED=false")
    result = proc_group.run([PY, "-c", "print('hello')"], timeout=30)
    assert (result.backend, result.returncode, result.stdout) == ("subprocess", 0, b"hello\n")


def test_tc02_prior_path_timeout_is_reported_and_kills_only_the_direct_child(
        prior_path: None, tmp_path: Path) -> None:
    """TC-02: timeout -> ``timed_out``; the prior path's known limit: the grandchild lives on."""
    pids = tmp_path / "pids"
    pids.mkdir()
    try:
        result = proc_group.run([PY, "-c", GRANDCHILD_THEN_SLEEP, str(pids)], timeout=1.5)

        assert result.backend == "subprocess"
        assert result.timed_out and result.returncode == -signal.SIGKILL
        assert result.spawn_error is None
        assert 1.5 <= result.duration_s < 10
        recorded = kinds(pids)
        assert len(recorded.get("leader", ())) == 1 and len(recorded.get("grandchild", ())) == 1
        assert alive(recorded["leader"]) == []
        # subprocess.run(timeout=...) killed the leader only: exactly what ORCH-110 fixed.
        assert alive(recorded["grandchild"]) == sorted(recorded["grandchild"])
        assert proc_group.classify(result).kind == "timeout"
    finally:
        kill_recorded(recorded_pids(pids))


def test_tc02_prior_path_never_raises_for_runtime_faults(prior_path: None, tmp_path: Path) -> None:
    """TC-02: missing executable, not executable, bad cwd: a ``spawn_error``, never an exception."""
    not_executable = tmp_path / "script.sh"
    not_executable.write_text("#!/bin/sh\necho hi\n")
    not_executable.chmod(0o644)
    cases = {
        "missing": (["retest-no-such-command-orch110"], None, errno.ENOENT),
        "not-executable": ([str(not_executable)], None, errno.EACCES),
        "a-directory": ([str(tmp_path)], None, errno.EACCES),
        "bad-cwd": ([PY, "-c", "pass"], str(tmp_path / "no-such-dir"), errno.ENOENT),
    }
    for name, (argv, cwd, expected_errno) in cases.items():
        result = proc_group.run(argv, timeout=10, cwd=cwd)
        assert isinstance(result, RunResult), name
        assert result.backend == "subprocess", name
        assert result.returncode is None and not result.timed_out, name
        assert result.spawn_error, name
        assert result.spawn_errno == expected_errno, (name, result.spawn_error)
        verdict = proc_group.classify(result)
        assert (verdict.kind, verdict.rule) == ("other", "other.spawn-error"), name
        assert merge_gate.classify_retest_failure(result) == "other"
    missing = proc_group.run(["retest-no-such-command-orch110"], timeout=10)
    assert missing.spawn_error == "exec 'retest-no-such-command-orch110': No such file or directory"


def test_tc02_cli_reports_the_backend_and_gnu_timeout_statuses(tmp_path: Path) -> None:
    """TC-02 through ``retest run --json`` in a real process with the switch off in its env."""
    env = child_env(SUBPROCESS_TREE_KILL_ENABLED="false")

    def retest_run(*cmd: str) -> tuple[int | None, dict]:
        result = proc_group.run([PY, "-m", "retest", "run", "--json", "--timeout", "1", "--", *cmd],
                                env=env, timeout=60)
        return result.returncode, json.loads(result.stdout)

    status, doc = retest_run(PY, "-c", "import time; time.sleep(30)")
    assert status == 124
    assert (doc["backend"], doc["timed_out"], doc["verdict"]) == ("subprocess", True, "timeout")
    status, doc = retest_run("retest-no-such-command-orch110")
    assert status == 127
    assert (doc["backend"], doc["verdict"], doc["rule"]) == ("subprocess", "other", "other.spawn-error")
    assert doc["returncode"] is None and "No such file or directory" in doc["spawn_error"]
    status, doc = retest_run(PY, "-c", "raise SystemExit(3)")
    assert status == 3 and doc["backend"] == "subprocess"


# --------------------------------------------------------------------------- TC-03


SLEEPY_TEST = "import time\n\n\ndef test_waits_for_a_slow_service():\n    time.sleep(60)\n"
PASSING_TEST = "def test_ok():\n    assert True\n"
PER_TEST_TIMEOUT = "import time\n\n\ndef test_hangs():\n    time.sleep(30)\n"
LOCK_MESSAGE_THEN_FAILURE = (
    "import sys\n\n\ndef test_fails_after_logging_a_lock():\n"
    "    sys.stderr.write('sqlite3.OperationalError: database is locked\\n')\n"
    "    assert 1 == 2\n"
)


def pytest_run(root: Path, files: dict[str, str], backend: str, *args: str, timeout: float = 60,
               env: dict[str, str] | None = None) -> RunResult:
    write_suite(root, files)
    return proc_group.run([*PLAIN_SUITE, *args], cwd=root, env=env or suite_env(), timeout=timeout,
                          grace=0.5, backend=backend)


def test_tc03_timeout_from_a_real_pytest_run(backend: str, tmp_path: Path) -> None:
    """TC-03 timeout: the runner's deadline fired on a real pytest run (infra)."""
    result = pytest_run(tmp_path, {"test_slow.py": SLEEPY_TEST}, backend, timeout=1.0)

    assert result.timed_out and result.backend == backend
    verdict = proc_group.classify(result)
    assert (verdict.kind, verdict.infra) == ("timeout", True)  # rule: starved / hung / deadline
    assert verdict.rule in ("timeout.deadline", "timeout.hung", "timeout.starved")
    assert "deadline" in verdict.reason
    assert merge_gate.classify_retest_failure(result) == "timeout"


def test_tc03_red_from_a_real_failing_pytest_run(backend: str, tmp_path: Path) -> None:
    """TC-03 red: tests ran and failed; the pytest summary line is the evidence."""
    result = pytest_run(tmp_path, {"calc.py": "def add(a, b):\n    return a + b\n",
                                   "test_calc.py": FAILING_TEST, "test_ok.py": PASSING_TEST}, backend)

    assert result.returncode == 1 and not result.timed_out
    summary = [ln for ln in result.stdout.decode().splitlines() if " in " in ln and "failed" in ln][-1]
    verdict = proc_group.classify(result)
    assert (verdict.kind, verdict.rule, verdict.infra) == ("red", "red.tests-failed", False)
    assert "1 failed, 1 passed in" in verdict.reason
    assert summary.split(" in ")[0] in verdict.reason  # the summary line, quoted
    assert merge_gate.classify_retest_failure(result) == "red"


def test_tc03_red_a_per_test_pytest_timeout_is_not_the_runners_timeout(backend: str, tmp_path: Path) -> None:
    """TC-03 red: a per-test pytest-timeout is the branch's fault, not an infra timeout."""
    pytest.importorskip("pytest_timeout")
    result = pytest_run(tmp_path, {"test_hang.py": PER_TEST_TIMEOUT}, backend,
                        "-p", "pytest_timeout", "--timeout", "0.5", "--timeout-method", "signal")

    assert not result.timed_out and result.returncode == 1
    verdict = proc_group.classify(result)
    assert verdict.kind == "red" and not verdict.infra
    assert "1 failed" in verdict.reason
    assert merge_gate.classify_retest_failure(result) == "red"


def test_tc03_red_a_lock_message_does_not_excuse_failed_tests(backend: str, tmp_path: Path) -> None:
    """TC-03 red beats lock-busy once a test failed (lock-busy is only *before* any test failed)."""
    result = pytest_run(tmp_path, {"test_lock_then_fail.py": LOCK_MESSAGE_THEN_FAILURE}, backend)

    assert b"database is locked" in result.stdout + result.stderr
    verdict = proc_group.classify(result)
    assert (verdict.kind, verdict.rule) == ("red", "red.tests-failed")


def test_tc03_lock_busy_from_a_real_git_index_lock(backend: str, tmp_path: Path) -> None:
    """TC-03 lock-busy: a real git command meets another process's ``index.lock``."""
    repo = make_repo(tmp_path, env=gate_env(tmp_path / "home"))
    (repo.path / "new.txt").write_text("work in progress\n")
    lock = repo.path / ".git" / "index.lock"
    lock.write_text("")  # another git process holds the index
    try:
        result = proc_group.run(["git", "add", "new.txt"], cwd=repo.path, env=repo.env, timeout=30,
                                backend=backend)
    finally:
        lock.unlink()

    assert result.returncode == 128 and not result.timed_out
    assert b"index.lock': File exists" in result.stderr
    verdict = proc_group.classify(result)
    assert (verdict.kind, verdict.rule, verdict.infra) == ("lock-busy", "lock-busy.git-lock", True)
    assert "index.lock': File exists" in verdict.reason and "exit 128" in verdict.reason
    assert merge_gate.classify_retest_failure(result) == "lock-busy"
    # The same command succeeds once the lock is gone: it was the lock, not the repository.
    again = proc_group.run(["git", "add", "new.txt"], cwd=repo.path, env=repo.env, timeout=30, backend=backend)
    assert again.returncode == 0 and merge_gate.classify_retest_failure(again) is None


def test_tc03_other_no_tests_collected(backend: str, tmp_path: Path) -> None:
    """TC-03 other: pytest exit 5 (no tests collected) proves neither the code nor the infra."""
    result = pytest_run(tmp_path, {"test_ok.py": PASSING_TEST}, backend, "-k", "nothing_matches_orch110")

    assert result.returncode == 5
    verdict = proc_group.classify(result)
    assert (verdict.kind, verdict.rule, verdict.infra) == ("other", "other.no-tests", False)
    assert "exit 5" in verdict.reason
    assert merge_gate.classify_retest_failure(result) == "other"


def test_tc03_other_missing_executable(backend: str) -> None:
    """TC-03 other: the suite's command cannot even start."""
    result = proc_group.run(["retest-no-such-command-orch110", "-q"], timeout=10, backend=backend)

    assert result.returncode is None and result.spawn_errno == errno.ENOENT
    verdict = proc_group.classify(result)
    assert (verdict.kind, verdict.rule, verdict.infra) == ("other", "other.spawn-error", False)
    assert "retest-no-such-command-orch110" in verdict.reason and "No such file" in verdict.reason
    assert merge_gate.classify_retest_failure(result) == "other"


def test_tc03_passed_is_none(backend: str, tmp_path: Path) -> None:
    """TC-03: a green run is no failure at all (``None``), with its summary as evidence."""
    result = pytest_run(tmp_path, {"test_ok.py": PASSING_TEST}, backend)

    verdict = proc_group.classify(result)
    assert (verdict.kind, verdict.rule) == ("passed", "passed.exit-0")
    assert "1 passed" in verdict.reason
    assert merge_gate.classify_retest_failure(result) is None
