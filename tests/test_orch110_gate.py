"""ORCH-110 regression cases TC-04..TC-09 and TC-11: the merge gate on real repositories.

TC-04  an infra timeout re-queues: the task stays on deploy-staging, no rollback, no developer retry.
TC-05  a red re-test and a merge conflict still roll back to development.
TC-06  retries are bounded; exhaustion sends exactly one alert (also with two gate processes racing).
TC-07  lock-busy re-queues like a timeout.
TC-08  skip-when-current: skipped only when the rebase was a no-op on the validated sha; any doubt
       runs the re-test.
TC-09  timeout resolution: default 900, invalid values fall back with a warning, the reaper bound holds.
TC-11  each of the five kill-switches independently restores its prior behaviour.
Plus the ``MAIN_REGRESSION_MARKERS`` guard for ``classify_retest_failure``.

Every case runs ``merge_gate.retest_branch`` (or ``retest gate`` as a real process) on a git
repository built in ``tmp_path`` with a real pytest suite, a per-test ledger
(``RETEST_LEDGER_PATH`` under ``tmp_path``) and scaled-down deadlines (1-2 s suites, 0.5 s
grace). Assertions are on the ``GateDecision``, the raw ledger rows, the recorded pids of the
suite's processes and the user's checkout.
"""

from __future__ import annotations

import ast
import json
import logging
import math
import os
import shutil
import subprocess
import threading
from pathlib import Path
from typing import Any

import pytest

from gitrepo import FAILING_TEST, Repo, make_repo, sleeping_test
from helpers_proc import alive, child_env, kill_recorded, recorded_pids
from orch110_helpers import (
    PY,
    SWITCHES,
    counters,
    gate,
    kinds,
    ledger_rows,
    switches,
    tree_suite_files,
    with_env,
)
from retest import config, merge_gate, proc_group
from retest.ledger import Ledger
from retest.merge_gate import GateDecision, GateMetrics

REPO_ROOT = Path(__file__).resolve().parents[1]
#: The deadline of suites that must time out (they sleep 60 s).
SHORT = 1.0
#: The deadline of suites whose processes must be inside their test before it fires.
TREE = 2.0
#: The deadline of suites that must pass (generous: a loaded CI machine must not time them out).
GENEROUS = 60.0


@pytest.fixture
def repo(tmp_path: Path) -> Repo:
    return make_repo(tmp_path)


def tree_env(repo: Repo, pid_dir: Path, fault: Path | None = None, **extra: str) -> dict[str, str]:
    env = with_env(repo.env, ORCH110_PIDS=str(pid_dir), **extra)
    if fault is not None:
        env["ORCH110_FAULT"] = str(fault)
    return env


def assert_requeued(decision: GateDecision, verdict: str, rule: str, infra_attempt: int = 1) -> None:
    """The infra route: requeue on deploy-staging, backoff set, no rollback, no alert."""
    assert (decision.action, decision.stage, decision.verdict, decision.rule) == \
        ("requeue", "deploy-staging", verdict, rule)
    assert decision.infra is True and decision.alert is False
    assert decision.infra_attempt == infra_attempt
    assert decision.next_attempt_at is not None and decision.next_attempt_at > decision.decided_at


# --------------------------------------------------------------------------- TC-04


def test_tc04_infra_timeout_requeues_on_deploy_staging_without_rollback(repo: Repo, pid_dir: Path,
                                                                        tmp_path: Path) -> None:
    """TC-04: a timed-out re-test requeues; the same sha merges once the fault is gone."""
    fault = tmp_path / "fault"
    fault.write_text("the helper service is down\n")
    sha = repo.branch("slow", tree_suite_files())
    env = tree_env(repo, pid_dir, fault)
    before = repo.snapshot()

    decision = gate(repo, "slow", env=env, task_id="T-4", timeout=TREE)

    assert_requeued(decision, "timeout", "timeout.deadline")
    assert decision.action != "rollback" and decision.stage != "development"
    assert decision.sha == sha and decision.attempt == 1
    # Backoff: MERGE_GATE_INFRA_RETRY_BACKOFF_S=1 in the test environment.
    assert 0.5 < decision.next_attempt_at - decision.decided_at <= 1.5
    assert "infra retry 1 of 3" in decision.reason
    assert decision.evidence["timed_out"] is True and decision.evidence["backend"] == "native"
    # The suite's whole tree (pytest and its detached helper) was killed, and counted.
    recorded = kinds(pid_dir)
    assert len(recorded.get("test", ())) == 1 and len(recorded.get("helper", ())) == 1, recorded
    assert alive(recorded_pids(pid_dir)) == []
    assert decision.processes_killed >= 2
    # The ledger: one run, one infra failure on the budget, no alert, the decision recorded.
    assert [(r["task"], r["sha"], r["runs"]) for r in ledger_rows(env, "runs")] == [("T-4", sha, 1)]
    assert [(r["task"], r["sha"], r["verdict"], r["attempts"]) for r in ledger_rows(env, "infra_attempts")] \
        == [("T-4", sha, "timeout", 1)]
    assert ledger_rows(env, "alerts") == []
    docs = [json.loads(r["doc"]) for r in ledger_rows(env, "decisions")]
    assert [(d["action"], d["stage"], d["verdict"]) for d in docs] == [("requeue", "deploy-staging", "timeout")]
    # Nothing moved: not the user's checkout, not the branch (no developer involved).
    assert repo.snapshot() == before

    # No developer retry: the very same sha is re-tested and merges once the fault is gone.
    fault.unlink()
    again = gate(repo, "slow", env=env, task_id="T-4", timeout=GENEROUS)
    assert (again.action, again.stage, again.verdict) == ("merge", "main", "passed")
    assert again.sha == sha and again.attempt == 2
    assert repo.head("slow") == sha


# --------------------------------------------------------------------------- TC-05


def test_tc05_red_retest_still_rolls_back_to_development(repo: Repo) -> None:
    """TC-05: tests that really fail send the task back to development, every time."""
    sha = repo.branch("broken", {"tests/test_broken.py": FAILING_TEST})

    first = gate(repo, "broken", task_id="T-5")
    second = gate(repo, "broken", task_id="T-5")

    for attempt, decision in enumerate((first, second), start=1):
        assert (decision.action, decision.stage, decision.verdict, decision.rule) == \
            ("rollback", "development", "red", "red.tests-failed")
        assert decision.attempt == attempt and decision.sha == sha
        assert not decision.infra and not decision.alert
        assert decision.infra_attempt is None and decision.next_attempt_at is None
        assert "1 failed, 1 passed" in decision.reason
        assert "assert 4 == 5" in decision.evidence["output_tail"]
    assert ledger_rows(repo.env, "infra_attempts") == []
    assert ledger_rows(repo.env, "alerts") == []
    docs = [json.loads(r["doc"]) for r in ledger_rows(repo.env, "decisions")]
    assert [(d["action"], d["stage"]) for d in docs] == [("rollback", "development")] * 2


def test_tc05_merge_conflict_still_rolls_back_to_development(repo: Repo) -> None:
    """TC-05: a branch that does not rebase cleanly goes back to development; no suite runs."""
    repo.branch("clash", {"calc.py": "def add(a, b):\n    return b + a\n"})
    repo.commit({"calc.py": "def add(a, b):\n    return a + b + 0\n"}, "main changes add too")
    before = repo.snapshot()

    decision = gate(repo, "clash", task_id="T-5c")

    assert (decision.action, decision.stage, decision.verdict, decision.rule) == \
        ("rollback", "development", "conflict", "conflict.rebase")
    assert "CONFLICT" in decision.reason and "calc.py" in decision.reason
    assert not decision.infra and not decision.alert
    assert "suite_ran" not in decision.evidence
    assert ledger_rows(repo.env, "infra_attempts") == [] and ledger_rows(repo.env, "alerts") == []
    assert repo.snapshot() == before


# --------------------------------------------------------------------------- TC-06


def test_tc06_infra_retries_are_bounded_and_exhaustion_alerts_exactly_once(repo: Repo, tmp_path: Path) -> None:
    """TC-06: MAX requeues, then hold; one alert (hook, command and ledger row), never two."""
    sha = repo.branch("slow", {"tests/test_slow.py": sleeping_test(60)})
    sink = tmp_path / "alerts.jsonl"
    script = tmp_path / "alert.py"
    script.write_text(f"import sys\nopen({str(sink)!r}, 'ab').write(sys.stdin.buffer.read() + b'\\n')\n")
    env = with_env(repo.env, MERGE_GATE_INFRA_RETRY_MAX="2", MERGE_GATE_ALERT_COMMAND=f"{PY} {script}")
    hooked: list[dict[str, Any]] = []

    decisions = [gate(repo, "slow", env=env, task_id="T-6", timeout=SHORT, alert_hook=hooked.append)
                 for _ in range(4)]

    assert [d.action for d in decisions] == ["requeue", "requeue", "hold", "hold"]
    assert {d.stage for d in decisions} == {"deploy-staging"}  # never rolled back
    assert {(d.verdict, d.rule) for d in decisions} == {("timeout", "timeout.deadline")}
    assert [d.infra_attempt for d in decisions] == [1, 2, 3, 4]
    assert [d.alert for d in decisions] == [False, False, True, False]
    assert [d.next_attempt_at is None for d in decisions] == [False, False, True, True]
    assert "infra retries spent: 2 of 2; held" in decisions[2].reason
    # Exactly one alert, everywhere it can be seen.
    assert len(hooked) == 1 and (hooked[0]["task_id"], hooked[0]["sha"]) == ("T-6", sha)
    assert len(sink.read_text().splitlines()) == 1
    rows = ledger_rows(env, "alerts")
    assert [(r["task"], r["sha"], r["verdict"], r["pid"]) for r in rows] == [("T-6", sha, "timeout", os.getpid())]
    assert [r["attempts"] for r in ledger_rows(env, "infra_attempts")] == [4]


def test_tc06_two_gate_processes_racing_on_a_spent_budget_send_exactly_one_alert(repo: Repo,
                                                                                tmp_path: Path) -> None:
    """TC-06: two real ``retest gate`` processes, one ledger, one exhausted budget: one alert row."""
    sha = repo.branch("slow", {"tests/test_slow.py": sleeping_test(60)})
    env = with_env(repo.env, MERGE_GATE_INFRA_RETRY_MAX="1")
    # Two workers of an orchestrator, each with its own checkout of the same branch (the
    # gate lock is per repository, so they really run side by side), sharing the ledger.
    clones = []
    for name in ("worker-a", "worker-b"):
        dest = tmp_path / name
        repo.git("clone", "-q", str(repo.path), str(dest))
        clone = Repo(dest, repo.env)
        clone.git("branch", "-q", "slow", "origin/slow")
        assert clone.head("slow") == sha
        clones.append(clone)
    # Spend the budget (1 requeue) first, from this process.
    spent = gate(repo, "slow", env=env, task_id="T-RACE", timeout=SHORT)
    assert spent.action == "requeue" and spent.infra_attempt == 1

    results: list[proc_group.RunResult] = []
    lock = threading.Lock()

    def run_gate(clone: Repo) -> None:
        result = proc_group.run(
            [PY, "-m", "retest", "gate", "--repo", str(clone.path), "--branch", "slow",
             "--task", "T-RACE", "--timeout", "1", "--json"],
            env=env, cwd=clone.path, timeout=60)
        with lock:
            results.append(result)

    threads = [threading.Thread(target=run_gate, args=(clone,)) for clone in clones]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    assert [r.returncode for r in results] == [3, 3], [r.stderr[-2000:] for r in results]  # both hold
    docs = [json.loads(r.stdout) for r in results]
    assert {(d["action"], d["stage"], d["verdict"]) for d in docs} == {("hold", "deploy-staging", "timeout")}
    assert sorted(d["infra_attempt"] for d in docs) == [2, 3]
    assert sorted(d["alert"] for d in docs) == [False, True]
    assert sum(r.stderr.count(b"merge gate ALERT") for r in results) == 1
    rows = ledger_rows(env, "alerts")
    assert [(r["task"], r["sha"], r["verdict"]) for r in rows] == [("T-RACE", sha, "timeout")]
    (winner,) = [r for r, d in zip(results, docs) if d["alert"]]
    assert rows[0]["pid"] == winner.pid  # the process that inserted the row is the one that alerted
    assert [r["attempts"] for r in ledger_rows(env, "infra_attempts")] == [3]


# --------------------------------------------------------------------------- TC-07


HOLD_GATE_LOCK = """
import sys
from retest import gitops
lock = gitops.GateLock(sys.argv[1])
assert lock.acquire(10)
print("held", flush=True)
sys.stdin.read()  # until the test closes our stdin
lock.release()
"""


def test_tc07_gate_lock_held_by_another_process_requeues_like_a_timeout(repo: Repo) -> None:
    """TC-07: another process holds the repository's gate lock: lock-busy, requeue, then merge."""
    sha = repo.branch("feature", {"feature.py": "VALUE = 1\n"})
    env = with_env(repo.env, MERGE_GATE_LOCK_WAIT_S="0.3")
    holder = subprocess.Popen([PY, "-c", HOLD_GATE_LOCK, str(repo.path / ".git")], env=child_env(),
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        assert holder.stdout is not None and holder.stdout.readline() == b"held\n"
        busy = gate(repo, "feature", env=env, task_id="T-7")
    finally:
        assert holder.stdin is not None
        holder.stdin.close()
        holder.wait(timeout=10)
        holder.stdout.close()

    assert_requeued(busy, "lock-busy", "lock-busy.gate-lock")
    assert proc_group.LOCK_BUSY_MESSAGE in busy.reason
    assert "suite_ran" not in busy.evidence  # nothing ran: no verdict on the code at all
    assert [(r["verdict"], r["attempts"]) for r in ledger_rows(env, "infra_attempts")] == [("lock-busy", 1)]
    assert ledger_rows(env, "alerts") == []
    # Once the lock is free, the same sha merges: no developer retry.
    merged = gate(repo, "feature", env=env, task_id="T-7")
    assert (merged.action, merged.stage, merged.sha, merged.attempt) == ("merge", "main", sha, 2)


SYNC_THEN_TEST = '''\
"""The re-test entry point: sync the shared fixtures checkout, then run the tests."""
import os
import subprocess
import sys

sync = subprocess.run(["git", "-C", os.environ["ORCH110_SHARED"], "add", "-A"],
                      capture_output=True, text=True)
if sync.returncode:
    sys.stderr.write(sync.stderr)
    sys.exit(sync.returncode)
sys.exit(subprocess.call([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider"]))
'''


def test_tc07_git_index_lock_met_by_the_suite_is_routed_like_a_timeout(repo: Repo, tmp_path: Path) -> None:
    """TC-07: the suite's git step meets a held ``index.lock``: requeue, bounded, one alert."""
    shared = make_repo(tmp_path / "shared", env=repo.env)
    (shared.path / "fixture.json").write_text("{}\n")
    (shared.path / ".git" / "index.lock").write_text("")  # another git process is writing
    sha = repo.branch("feature", {"ci/retest.py": SYNC_THEN_TEST})
    env = with_env(repo.env, ORCH110_SHARED=str(shared.path), MERGE_GATE_INFRA_RETRY_MAX="1")
    command = [PY, "ci/retest.py"]

    decisions = [gate(repo, "feature", env=env, task_id="T-7g", command=command) for _ in range(3)]

    assert_requeued(decisions[0], "lock-busy", "lock-busy.git-lock")
    assert "index.lock': File exists" in decisions[0].reason
    # The same route as a timeout (TC-06): MAX requeues, then hold with exactly one alert.
    assert [d.action for d in decisions] == ["requeue", "hold", "hold"]
    assert {d.stage for d in decisions} == {"deploy-staging"}
    assert [d.alert for d in decisions] == [False, True, False]
    assert [(r["task"], r["sha"], r["verdict"]) for r in ledger_rows(env, "alerts")] == \
        [("T-7g", sha, "lock-busy")]
    assert [(r["verdict"], r["attempts"]) for r in ledger_rows(env, "infra_attempts")] == [("lock-busy", 3)]

    # The lock was the only problem: without it the same sha merges (a new task id: the old
    # one is held for a human, never retried automatically).
    (shared.path / ".git" / "index.lock").unlink()
    merged = gate(repo, "feature", env=env, task_id="T-7g-after", command=command)
    assert (merged.action, merged.verdict, merged.sha) == ("merge", "passed", sha)


# --------------------------------------------------------------------------- TC-08


RECORDING_RED_TEST = '''\
import os


def test_records_that_it_ran_then_fails():
    with open(os.environ["ORCH110_RAN"], "a") as marker:
        marker.write("ran\\n")
    assert False, "this branch is red: merging it without a re-test would be wrong"
'''


def test_tc08_skipped_only_with_proof_of_a_no_op_rebase_on_the_validated_sha(repo: Repo, tmp_path: Path) -> None:
    """TC-08: the suite (red on purpose) is skipped only with the proof, which is recorded."""
    ran = tmp_path / "suite-ran"
    sha = repo.branch("validated", {"tests/test_red.py": RECORDING_RED_TEST})
    main_sha = repo.head("main")
    env = with_env(repo.env, ORCH110_RAN=str(ran))

    decision = gate(repo, "validated", env=env, task_id="T-8", validated_sha=sha)

    assert (decision.action, decision.stage, decision.verdict, decision.rule) == \
        ("skip-merge", "main", "passed", "passed.skip-when-current")
    assert decision.skipped and not ran.exists()  # the suite did not run
    assert "suite_ran" not in decision.evidence
    # The proof is git's own answer, recorded in the decision.
    assert repo.git("merge-base", "validated", "main") == main_sha
    assert decision.proof == {"branch_head": sha, "onto_tip": main_sha, "merge_base": main_sha,
                              "validated_sha": sha, "rebased_head": sha}
    assert decision.tested_sha == sha
    docs = [json.loads(r["doc"]) for r in ledger_rows(env, "decisions")]
    assert docs[-1]["proof"] == decision.proof
    assert counters(env)["retests_skipped"] == 1 and counters(env).get("retests_run", 0) == 0


@pytest.mark.parametrize(
    ("doubt", "why"),
    [
        ("no-sha", "no validated sha given"),
        ("short-sha", "is not a full commit id"),
        ("option-like", "is not a full commit id"),
        ("main-sha", "is not the validated sha"),
        ("unknown-sha", "is not the validated sha"),
        ("main-moved", "does not contain"),
    ],
)
def test_tc08_any_doubt_runs_the_retest(repo: Repo, tmp_path: Path, doubt: str, why: str) -> None:
    """TC-08: every doubt runs the (red) suite, and the decision says which doubt."""
    ran = tmp_path / "suite-ran"
    sha = repo.branch("validated", {"tests/test_red.py": RECORDING_RED_TEST})
    validated = {
        "no-sha": None,
        "short-sha": sha[:12],
        "option-like": "--upload-pack=touch /tmp/orch110-pwned",
        "main-sha": repo.head("main"),
        "unknown-sha": "0" * 40,
        "main-moved": sha,
    }[doubt]
    if doubt == "main-moved":
        repo.commit({"other.py": "OTHER = 2\n"}, "main moves on: the rebase is no longer a no-op")

    decision = gate(repo, "validated", env=with_env(repo.env, ORCH110_RAN=str(ran)),
                    validated_sha=validated)

    assert ran.read_text() == "ran\n"  # the suite ran, once
    assert not decision.skipped and decision.proof is None
    assert why in decision.evidence["skip"]
    assert (decision.action, decision.stage, decision.verdict) == ("rollback", "development", "red")


# --------------------------------------------------------------------------- TC-09


def test_tc09_default_deadline_is_900_seconds(repo: Repo) -> None:
    """TC-09: nothing set -> 900 s, in the resolver, in the gate's run and in the queue block."""
    assert merge_gate._resolve_retest_timeout(None) == 900.0
    assert merge_gate._resolve_retest_timeout("") == 900.0
    settings = config.GateSettings.from_env(repo.env)
    assert "MERGE_RETEST_TIMEOUT_S" not in repo.env and settings.retest_timeout_raw is None
    repo.branch("feature", {"feature.py": "VALUE = 1\n"})

    decision = gate(repo, "feature")

    assert decision.action == "merge"
    assert decision.evidence["timeout_s"] == 900.0
    block = merge_gate.queue_block(settings=settings, metrics=GateMetrics())
    assert block["settings"]["retest_timeout_s"] == 900.0


@pytest.mark.parametrize("value", ["abc", "", "  ", "-5", "0", "nan", "inf", "-inf", "1e999", "15m"])
def test_tc09_invalid_values_fall_back_to_900_with_one_warning(value: str, caplog: pytest.LogCaptureFixture) -> None:
    """TC-09: a value that is not a positive finite number -> 900 and one warning naming it."""
    with caplog.at_level(logging.WARNING, logger="retest.merge_gate"):
        resolved = merge_gate._resolve_retest_timeout(value, 5.0, 3600.0)
    assert resolved == 900.0
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    if value.strip() == "":
        assert warnings == []  # unset, not invalid: the default without a warning
    else:
        assert len(warnings) == 1
        assert "MERGE_RETEST_TIMEOUT_S" in warnings[0].getMessage()
        assert "using 900" in warnings[0].getMessage()


@pytest.mark.parametrize("value", ["1", "2.5", "30", "900", "3594"])
def test_tc09_valid_values_are_kept_without_warning(value: str, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="retest.merge_gate"):
        assert merge_gate._resolve_retest_timeout(value, 5.0, 3600.0) == float(value)
    assert caplog.records == []


def test_tc09_invalid_setting_in_the_gate_environment_runs_with_900(repo: Repo,
                                                                    caplog: pytest.LogCaptureFixture) -> None:
    """TC-09 through the gate: ``MERGE_RETEST_TIMEOUT_S=abc`` -> the suite runs with 900 s, one warning."""
    repo.branch("feature", {"feature.py": "VALUE = 1\n"})
    env = with_env(repo.env, MERGE_RETEST_TIMEOUT_S="abc")
    with caplog.at_level(logging.WARNING, logger="retest.merge_gate"):
        decision = gate(repo, "feature", env=env)
    assert decision.action == "merge" and decision.evidence["timeout_s"] == 900.0
    warnings = [r.getMessage() for r in caplog.records
                if r.name == "retest.merge_gate" and r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "MERGE_RETEST_TIMEOUT_S='abc'" in warnings[0]


def test_tc09_the_reaper_bound_holds_for_every_value(caplog: pytest.LogCaptureFixture) -> None:
    """TC-09: whatever is asked, timeout + grace stays below REAPER_MAX_RUNNING_S (clamped, warned)."""
    values: list[object] = [None, "", "1", "30", "899", "900", "3594", "3595", "1e9", "abc", "-1", "inf",
                            0, 12.5, math.inf, 10_000]
    for reaper in (60.0, 600.0, 3600.0):
        for grace in (0.0, 0.5, 5.0, 30.0):
            for value in values:
                caplog.clear()
                with caplog.at_level(logging.WARNING, logger="retest.merge_gate"):
                    resolved = merge_gate._resolve_retest_timeout(value, grace, reaper)
                assert 0 < resolved and resolved + grace < reaper, (value, grace, reaper, resolved)
                assert len(caplog.records) <= 1  # one warning per call, naming every fix
    with caplog.at_level(logging.WARNING, logger="retest.merge_gate"):
        caplog.clear()
        assert merge_gate._resolve_retest_timeout("3595", 5.0, 3600.0) == 3594.0
    assert len(caplog.records) == 1 and "REAPER_MAX_RUNNING_S=3600" in caplog.records[0].getMessage()


STUBBORN_TEST = """\
import signal
import time


def test_ignores_sigterm():
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    time.sleep(60)
"""


def test_tc09_the_reaper_bound_holds_for_the_gates_real_run(repo: Repo, monkeypatch: pytest.MonkeyPatch) -> None:
    """TC-09 through the gate: clamped deadline + the gate's grace really ends the run in time.

    REAPER_MAX_RUNNING_S=3 with a 0.5 s grace clamps a 60 s deadline to 1.5 s; a suite that
    ignores SIGTERM must then be SIGKILLed 0.5 s later, well before the reaper's 3 s.
    """
    monkeypatch.delenv("RETEST_KILL_GRACE_S", raising=False)  # the gate's env is what counts
    repo.branch("stubborn", {"tests/test_stubborn.py": STUBBORN_TEST})
    env = with_env(repo.env, REAPER_MAX_RUNNING_S="3", MERGE_RETEST_TIMEOUT_S="60", RETEST_KILL_GRACE_S="0.5")

    decision = gate(repo, "stubborn", env=env)

    assert decision.evidence["timeout_s"] == 1.5
    assert decision.evidence["timed_out"] is True and decision.evidence["escalated"] is True
    assert (decision.action, decision.verdict) == ("requeue", "timeout")
    assert decision.evidence["run_duration_s"] < 3.0  # the reaper bound, as the gate computed it


# --------------------------------------------------------------------------- TC-11


def settings_flags(env: dict[str, str]) -> dict[str, bool]:
    s = config.GateSettings.from_env(env)
    return {
        "SUBPROCESS_TREE_KILL_ENABLED": s.tree_kill_enabled,
        "MERGE_GATE_CLASSIFY_ENABLED": s.classify_enabled,
        "MERGE_GATE_INFRA_RETRY_ENABLED": s.infra_retry_enabled,
        "MERGE_RETEST_SKIP_WHEN_CURRENT_ENABLED": s.skip_when_current_enabled,
        "MERGE_GATE_METRICS_ENABLED": s.metrics_enabled,
    }


def only_off(repo: Repo, switch: str, **extra: str) -> dict[str, str]:
    env = with_env(switches(repo.env, off=[switch]), **extra)
    assert settings_flags(env) == {name: name != switch for name in SWITCHES}
    return env


def test_tc11_tree_kill_off_restores_the_subprocess_path_and_its_orphans(repo: Repo, pid_dir: Path) -> None:
    """TC-11 SUBPROCESS_TREE_KILL_ENABLED=false: the suite runs via subprocess.run; orphans survive."""
    repo.branch("slow", tree_suite_files())
    env_off = only_off(repo, "SUBPROCESS_TREE_KILL_ENABLED", ORCH110_PIDS=str(pid_dir))
    try:
        decision = gate(repo, "slow", env=env_off, timeout=TREE)

        assert decision.evidence["backend"] == "subprocess"
        recorded = kinds(pid_dir)
        assert len(recorded.get("helper", ())) == 1, recorded
        # The prior behaviour: the deadline killed pytest only; its helper is an orphan now.
        assert alive(recorded["test"]) == []
        assert alive(recorded["helper"]) == sorted(recorded["helper"])
        assert decision.processes_killed == 0
        # The other four switches are on: the timeout is still infra and still requeued.
        assert_requeued(decision, "timeout", "timeout.deadline")
    finally:
        kill_recorded(recorded_pids(pid_dir))
    assert alive(recorded_pids(pid_dir)) == []


def test_tc11_classify_off_makes_every_failure_red_again(repo: Repo) -> None:
    """TC-11 MERGE_GATE_CLASSIFY_ENABLED=false: timeout and other are red and roll back; conflict stays."""
    repo.branch("slow", {"tests/test_slow.py": sleeping_test(60)})
    repo.branch("clash", {"calc.py": "def add(a, b):\n    return b + a\n"})
    env = only_off(repo, "MERGE_GATE_CLASSIFY_ENABLED")

    timed_out = gate(repo, "slow", env=env, timeout=SHORT)
    missing = gate(repo, "slow", env=env, command=["retest-no-such-command-orch110"])
    repo.commit({"calc.py": "def add(a, b):\n    return a + b + 0\n"}, "main changes add too")
    clash = gate(repo, "clash", env=env)

    for decision, runner_kind in ((timed_out, "timeout"), (missing, "other")):
        assert (decision.verdict, decision.rule, decision.action, decision.stage) == \
            ("red", "red.classify-disabled", "rollback", "development")
        assert f"runner: {runner_kind}" in decision.reason
        assert not decision.alert and not decision.infra
    assert (clash.verdict, clash.action, clash.stage) == ("conflict", "rollback", "development")
    assert ledger_rows(env, "infra_attempts") == [] and ledger_rows(env, "alerts") == []


def test_tc11_infra_retry_off_rolls_infra_failures_back(repo: Repo) -> None:
    """TC-11 MERGE_GATE_INFRA_RETRY_ENABLED=false: a timeout rolls back; no budget, no alert."""
    repo.branch("slow", {"tests/test_slow.py": sleeping_test(60)})
    # A budget of 0 would hold and alert at the first timeout if the switch were on.
    env = only_off(repo, "MERGE_GATE_INFRA_RETRY_ENABLED", MERGE_GATE_INFRA_RETRY_MAX="0")

    decisions = [gate(repo, "slow", env=env, timeout=SHORT) for _ in range(2)]

    for decision in decisions:
        assert (decision.verdict, decision.rule) == ("timeout", "timeout.deadline")  # still classified
        assert (decision.action, decision.stage) == ("rollback", "development")
        assert decision.infra_attempt is None and not decision.alert
        assert "MERGE_GATE_INFRA_RETRY_ENABLED=false" in decision.reason
    assert ledger_rows(env, "infra_attempts") == [] and ledger_rows(env, "alerts") == []


def test_tc11_skip_when_current_off_always_runs_the_suite(repo: Repo, tmp_path: Path) -> None:
    """TC-11 MERGE_RETEST_SKIP_WHEN_CURRENT_ENABLED=false: even with the proof, the suite runs."""
    ran = tmp_path / "suite-ran"
    sha = repo.branch("validated", {"tests/test_red.py": RECORDING_RED_TEST})
    env = only_off(repo, "MERGE_RETEST_SKIP_WHEN_CURRENT_ENABLED", ORCH110_RAN=str(ran))

    decision = gate(repo, "validated", env=env, validated_sha=sha)

    assert ran.read_text() == "ran\n"
    assert not decision.skipped and decision.proof is None
    assert decision.evidence["skip"] == "MERGE_RETEST_SKIP_WHEN_CURRENT_ENABLED=false"
    assert (decision.action, decision.verdict) == ("rollback", "red")


def test_tc11_metrics_off_freezes_every_counter(repo: Repo) -> None:
    """TC-11 MERGE_GATE_METRICS_ENABLED=false: no counter moves, no decision is kept, block disabled."""
    repo.branch("feature", {"feature.py": "VALUE = 1\n"})
    repo.branch("broken", {"tests/test_broken.py": FAILING_TEST})
    env = only_off(repo, "MERGE_GATE_METRICS_ENABLED")
    metrics = GateMetrics()
    before = merge_gate.METRICS.snapshot()

    merged = gate(repo, "feature", env=env, metrics=metrics)
    rolled = gate(repo, "broken", env=env, metrics=metrics)

    assert (merged.action, rolled.action) == ("merge", "rollback")  # the gate itself is unchanged
    assert metrics.snapshot() == GateMetrics().snapshot()
    assert merge_gate.METRICS.snapshot() == before
    assert ledger_rows(env, "counters") == [] and ledger_rows(env, "decisions") == []
    assert len(ledger_rows(env, "runs")) == 2  # attempts are still counted: they key budgets
    settings = config.GateSettings.from_env(env)
    assert merge_gate.queue_block(settings=settings, metrics=metrics) == {"enabled": False}
    assert merge_gate.queue_block(settings=settings, ledger=Ledger(env["RETEST_LEDGER_PATH"])) == \
        {"enabled": False}


# --------------------------------------------------------------------------- MAIN_REGRESSION_MARKERS


def test_orch110_marker_holds_on_this_tree() -> None:
    """The marker names ``classify_retest_failure``, and this checkout still defines it."""
    assert ("ORCH-110", "classify_retest_failure", "python/retest/merge_gate.py") in \
        merge_gate.MAIN_REGRESSION_MARKERS
    assert merge_gate.check_regression_markers(REPO_ROOT) == []


def test_orch110_marker_reports_a_removed_classify_retest_failure(tmp_path: Path) -> None:
    """A copy of the tree without ``classify_retest_failure`` is reported (mentions do not count)."""
    shutil.copytree(REPO_ROOT / "python" / "retest", tmp_path / "python" / "retest",
                    ignore=shutil.ignore_patterns("__pycache__", "*.so", "_retest_shepherd"))
    target = tmp_path / "python" / "retest" / "merge_gate.py"
    source = target.read_text()
    (node,) = [n for n in ast.parse(source).body
               if isinstance(n, ast.FunctionDef) and n.name == "classify_retest_failure"]
    lines = source.splitlines(keepends=True)
    start = min([node.lineno] + [d.lineno for d in node.decorator_list]) - 1
    target.write_text("".join(lines[:start] + lines[node.end_lineno:]))
    assert "classify_retest_failure" in target.read_text()  # still named elsewhere (docs, __all__)

    problems = merge_gate.check_regression_markers(tmp_path)

    assert problems == ["ORCH-110: classify_retest_failure is no longer defined in python/retest/merge_gate.py"]
